//! `config.json` of Qwen2-VL and Qwen2.5-VL, in both layouts: the flat one the Hub
//! checkpoints use (text keys at the top level) and the nested `text_config` one that
//! `transformers` 5 writes. Missing keys take `transformers`' defaults for the `model_type`.

use anyhow::{bail, Result};
use lmms_ft_backbones::decoder::DecoderConfig;
use lmms_ft_core::family::HfConfig;
use lmms_ft_core::hf_json::{boolean, float, int};
use lmms_ft_core::nn::linear_params;
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// LayerNorm + GELU MLP vision blocks, full attention.
    Qwen2Vl,
    /// RMSNorm + SwiGLU vision blocks, window attention except `fullatt_block_indexes`, and
    /// video time positions scaled by `tokens_per_second`.
    Qwen25Vl,
}

#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    pub depth: i64,
    /// Width of the ViT (`embed_dim` in Qwen2-VL, `hidden_size` in Qwen2.5-VL).
    pub embed_dim: i64,
    pub num_heads: i64,
    /// Hidden width of each block's MLP.
    pub mlp_dim: i64,
    /// Output width of the merger: the LLM's hidden size.
    pub out_dim: i64,
    pub in_channels: i64,
    pub patch_size: i64,
    pub temporal_patch_size: i64,
    pub spatial_merge_size: i64,
    /// `quick_gelu` for Qwen2-VL, `silu` for Qwen2.5-VL.
    pub hidden_act: String,
    pub rope_theta: f64,
    pub window_size: i64,
    pub fullatt_block_indexes: Vec<i64>,
    pub tokens_per_second: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Qwen2VlConfig {
    pub variant: Variant,
    pub text: DecoderConfig,
    /// Split of the rotary half-dimension between temporal, height and width positions.
    pub mrope_section: [i64; 3],
    pub vision: VisionConfig,
    pub image_token_id: i64,
    pub video_token_id: i64,
    pub vision_start_token_id: i64,
    pub vision_end_token_id: i64,
}

/// The rope dictionary, under its transformers-4 (`rope_scaling`) or 5 (`rope_parameters`) name.
fn rope_dict(obj: &Value) -> Option<&Value> {
    obj.get("rope_parameters")
        .filter(|v| v.is_object())
        .or_else(|| obj.get("rope_scaling").filter(|v| v.is_object()))
}

impl HfConfig for Qwen2VlConfig {
    fn from_hf_json(root: &Value) -> Result<Self> {
        let variant = match root.get("model_type").and_then(Value::as_str) {
            Some("qwen2_vl") => Variant::Qwen2Vl,
            Some("qwen2_5_vl") => Variant::Qwen25Vl,
            other => bail!("not a Qwen2-VL / Qwen2.5-VL config (model_type {other:?})"),
        };
        // Nested layout: text keys live in text_config; flat: at the top level.
        let text = root
            .get("text_config")
            .filter(|v| v.is_object())
            .unwrap_or(root);
        let hidden = int(text, "hidden_size", 8192)?;
        let heads = int(text, "num_attention_heads", 64)?;
        let rope = rope_dict(text).or_else(|| rope_dict(root));
        let rope_theta = match rope.and_then(|r| r.get("rope_theta")) {
            Some(v) => v.as_f64().unwrap_or(1e6),
            None => float(text, "rope_theta", float(root, "rope_theta", 1e6)?)?,
        };
        let mrope: Vec<i64> = rope
            .and_then(|r| r.get("mrope_section"))
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_i64).collect())
            .unwrap_or_else(|| vec![16, 24, 24]);
        let [t, h, w] = mrope[..] else {
            bail!("`mrope_section` must have 3 entries, got {mrope:?}");
        };
        let tie = boolean(root, "tie_word_embeddings", false)?
            || boolean(text, "tie_word_embeddings", false)?;
        let text_cfg = DecoderConfig {
            vocab_size: int(text, "vocab_size", 152064)?,
            hidden_size: hidden,
            intermediate_size: int(text, "intermediate_size", 29568)?,
            num_layers: int(text, "num_hidden_layers", 80)?,
            num_heads: heads,
            num_kv_heads: int(text, "num_key_value_heads", 8)?,
            head_dim: hidden / heads,
            rms_norm_eps: float(text, "rms_norm_eps", 1e-5)?,
            rope_theta,
            qkv_bias: true,
            o_bias: false,
            tie_word_embeddings: tie,
        };
        if (t + h + w) * 2 != text_cfg.head_dim {
            bail!(
                "mrope_section {mrope:?} covers {} rotary dims but head_dim is {}",
                (t + h + w) * 2,
                text_cfg.head_dim
            );
        }
        let empty = Value::Object(Default::default());
        let v = root.get("vision_config").unwrap_or(&empty);
        let in_channels = int(v, "in_channels", int(v, "in_chans", 3)?)?;
        let vision_theta = rope_dict(v)
            .and_then(|r| r.get("rope_theta"))
            .and_then(Value::as_f64)
            .unwrap_or(10000.0);
        let vision = match variant {
            Variant::Qwen2Vl => {
                let embed = int(v, "embed_dim", 1280)?;
                VisionConfig {
                    depth: int(v, "depth", 32)?,
                    embed_dim: embed,
                    num_heads: int(v, "num_heads", 16)?,
                    mlp_dim: embed * int(v, "mlp_ratio", 4)?,
                    out_dim: int(v, "hidden_size", 3584)?,
                    in_channels,
                    patch_size: int(v, "patch_size", 14)?,
                    temporal_patch_size: int(v, "temporal_patch_size", 2)?,
                    spatial_merge_size: int(v, "spatial_merge_size", 2)?,
                    hidden_act: v
                        .get("hidden_act")
                        .and_then(Value::as_str)
                        .unwrap_or("quick_gelu")
                        .to_string(),
                    rope_theta: vision_theta,
                    window_size: 0,
                    fullatt_block_indexes: Vec::new(),
                    tokens_per_second: 1.0,
                }
            }
            Variant::Qwen25Vl => VisionConfig {
                depth: int(v, "depth", 32)?,
                embed_dim: int(v, "hidden_size", 3584)?,
                num_heads: int(v, "num_heads", 16)?,
                mlp_dim: int(v, "intermediate_size", 3420)?,
                out_dim: int(v, "out_hidden_size", 3584)?,
                in_channels,
                patch_size: int(v, "patch_size", 14)?,
                temporal_patch_size: int(v, "temporal_patch_size", 2)?,
                spatial_merge_size: int(v, "spatial_merge_size", 2)?,
                hidden_act: v
                    .get("hidden_act")
                    .and_then(Value::as_str)
                    .unwrap_or("silu")
                    .to_string(),
                rope_theta: vision_theta,
                window_size: int(v, "window_size", 112)?,
                fullatt_block_indexes: match v.get("fullatt_block_indexes") {
                    Some(Value::Array(a)) => a.iter().filter_map(Value::as_i64).collect(),
                    _ => vec![7, 15, 23, 31],
                },
                tokens_per_second: float(v, "tokens_per_second", 4.0)?,
            },
        };
        if vision.embed_dim % vision.num_heads != 0 {
            bail!(
                "vision width {} is not divisible by num_heads {}",
                vision.embed_dim,
                vision.num_heads
            );
        }
        Ok(Qwen2VlConfig {
            variant,
            text: text_cfg,
            mrope_section: [t, h, w],
            vision,
            image_token_id: int(root, "image_token_id", 151655)?,
            video_token_id: int(root, "video_token_id", 151656)?,
            vision_start_token_id: int(root, "vision_start_token_id", 151652)?,
            vision_end_token_id: int(root, "vision_end_token_id", 151653)?,
        })
    }

    fn num_parameters(&self) -> u64 {
        self.text.num_parameters() + self.vision.num_parameters(self.variant)
    }
}

impl VisionConfig {
    pub fn num_parameters(&self, variant: Variant) -> u64 {
        let e = self.embed_dim as u64;
        let m = self.mlp_dim as u64;
        let patch = e
            * (self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size)
                as u64;
        let (norms, mlp) = match variant {
            // Two LayerNorms (weight + bias); fc1 / fc2 with bias.
            Variant::Qwen2Vl => (4 * e, linear_params(e, m, true) + linear_params(m, e, true)),
            // Two RMSNorms (weight only); gate / up / down with bias.
            Variant::Qwen25Vl => (
                2 * e,
                2 * linear_params(e, m, true) + linear_params(m, e, true),
            ),
        };
        let block = norms + linear_params(e, 3 * e, true) + linear_params(e, e, true) + mlp;
        let merged = e * (self.spatial_merge_size * self.spatial_merge_size) as u64;
        let ln_q = match variant {
            Variant::Qwen2Vl => 2 * e,
            Variant::Qwen25Vl => e,
        };
        let merger = ln_q
            + linear_params(merged, merged, true)
            + linear_params(merged, self.out_dim as u64, true);
        patch + self.depth as u64 * block + merger
    }
}
