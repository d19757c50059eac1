//! `config.json` of Qwen3-VL (dense): the nested `text_config` / `vision_config` layout the
//! Hub checkpoints and `transformers` 5 use (a flat layout, text keys at the top level, is
//! read too). Missing keys take `transformers`' `Qwen3VLTextConfig` / `Qwen3VLVisionConfig`
//! defaults, which differ from the Hub models' sizes.

use anyhow::{bail, ensure, Result};
use lmms_ft_backbones::decoder::{DecoderConfig, DecoderOptions};
use lmms_ft_core::family::HfConfig;
use lmms_ft_core::hf_json::{boolean, float, int, string};
use lmms_ft_core::nn::linear_params;
use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    pub depth: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_heads: i64,
    /// Output width of the mergers: the LLM's hidden size.
    pub out_hidden_size: i64,
    pub in_channels: i64,
    pub patch_size: i64,
    pub temporal_patch_size: i64,
    pub spatial_merge_size: i64,
    pub hidden_act: String,
    /// Size of the learned position table, a square grid interpolated to each image.
    pub num_position_embeddings: i64,
    /// Vision blocks whose output, merged by its own merger, is added to the hidden states
    /// of LLM layer 0, 1, ... at the visual positions (DeepStack).
    pub deepstack_visual_indexes: Vec<i64>,
    pub rope_theta: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Qwen3VlConfig {
    pub text: DecoderConfig,
    /// Rotary frequencies per axis (time, rows, columns), interleaved.
    pub mrope_section: [i64; 3],
    pub vision: VisionConfig,
    pub image_token_id: i64,
    pub video_token_id: i64,
    pub vision_start_token_id: i64,
    pub vision_end_token_id: i64,
}

/// The rope dictionary, under its transformers-5 (`rope_parameters`) or 4 (`rope_scaling`) name.
fn rope_dict(obj: &Value) -> Option<&Value> {
    obj.get("rope_parameters")
        .filter(|v| v.is_object())
        .or_else(|| obj.get("rope_scaling").filter(|v| v.is_object()))
}

fn ints(v: &Value, key: &str, default: &[i64]) -> Result<Vec<i64>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(default.to_vec()),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_i64()
                    .ok_or_else(|| anyhow::anyhow!("`{key}` must hold integers, got {x}"))
            })
            .collect(),
        Some(other) => bail!("`{key}` must be a list of integers, got {other}"),
    }
}

impl Qwen3VlConfig {
    /// What the decoder adds to the Llama-style layout: per-head q/k RMSNorm.
    pub fn decoder_options(&self) -> DecoderOptions {
        DecoderOptions {
            qk_norm: true,
            ..DecoderOptions::default()
        }
    }
}

impl HfConfig for Qwen3VlConfig {
    fn from_hf_json(root: &Value) -> Result<Self> {
        match root.get("model_type").and_then(Value::as_str) {
            Some("qwen3_vl") => {}
            other => bail!("not a Qwen3-VL config (model_type {other:?})"),
        }
        let text = root
            .get("text_config")
            .filter(|v| v.is_object())
            .unwrap_or(root);
        let hidden = int(text, "hidden_size", 4096)?;
        let heads = int(text, "num_attention_heads", 32)?;
        let kv_heads = match text.get("num_key_value_heads") {
            None | Some(Value::Null) => heads,
            Some(_) => int(text, "num_key_value_heads", heads)?,
        };
        ensure!(
            heads > 0 && kv_heads > 0 && heads % kv_heads == 0,
            "num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
        );
        let rope = rope_dict(text).or_else(|| rope_dict(root));
        let rope_type = rope
            .and_then(|r| r.get("rope_type").or_else(|| r.get("type")))
            .and_then(Value::as_str)
            .unwrap_or("default");
        ensure!(
            rope_type == "default",
            "rope type `{rope_type}` is not supported for Qwen3-VL (only the default M-RoPE)"
        );
        let rope_theta = match rope.and_then(|r| r.get("rope_theta")) {
            Some(v) => v
                .as_f64()
                .ok_or_else(|| anyhow::anyhow!("`rope_theta` must be a number, got {v}"))?,
            None => float(text, "rope_theta", 500000.0)?,
        };
        let empty = Value::Object(Default::default());
        let section = ints(rope.unwrap_or(&empty), "mrope_section", &[24, 20, 20])?;
        let [t, h, w] = section[..] else {
            bail!("`mrope_section` must have 3 entries, got {section:?}");
        };
        let attention_bias = boolean(text, "attention_bias", false)?;
        let text_cfg = DecoderConfig {
            vocab_size: int(text, "vocab_size", 151936)?,
            hidden_size: hidden,
            intermediate_size: int(text, "intermediate_size", 22016)?,
            num_layers: int(text, "num_hidden_layers", 32)?,
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim: int(text, "head_dim", 128)?,
            rms_norm_eps: float(text, "rms_norm_eps", 1e-6)?,
            rope_theta,
            qkv_bias: attention_bias,
            o_bias: attention_bias,
            // transformers ties by the top-level flag of Qwen3VLConfig (default false).
            tie_word_embeddings: boolean(root, "tie_word_embeddings", false)?,
        };
        ensure!(
            (t + h + w) * 2 == text_cfg.head_dim,
            "mrope_section {section:?} covers {} rotary dims but head_dim is {}",
            (t + h + w) * 2,
            text_cfg.head_dim
        );
        ensure!(
            string(text, "hidden_act", "silu")? == "silu",
            "only the SiLU text MLP is supported"
        );
        let v = root.get("vision_config").unwrap_or(&empty);
        let vision = VisionConfig {
            depth: int(v, "depth", 27)?,
            hidden_size: int(v, "hidden_size", 1152)?,
            intermediate_size: int(v, "intermediate_size", 4304)?,
            num_heads: int(v, "num_heads", 16)?,
            out_hidden_size: int(v, "out_hidden_size", 3584)?,
            in_channels: int(v, "in_channels", 3)?,
            patch_size: int(v, "patch_size", 16)?,
            temporal_patch_size: int(v, "temporal_patch_size", 2)?,
            spatial_merge_size: int(v, "spatial_merge_size", 2)?,
            hidden_act: string(v, "hidden_act", "gelu_pytorch_tanh")?.to_string(),
            num_position_embeddings: int(v, "num_position_embeddings", 2304)?,
            deepstack_visual_indexes: ints(v, "deepstack_visual_indexes", &[8, 16, 24])?,
            rope_theta: rope_dict(v)
                .and_then(|r| r.get("rope_theta"))
                .and_then(Value::as_f64)
                .unwrap_or(10000.0),
        };
        ensure!(
            vision.num_heads > 0 && vision.hidden_size % vision.num_heads == 0,
            "vision hidden_size {} is not divisible by num_heads {}",
            vision.hidden_size,
            vision.num_heads
        );
        let side = (vision.num_position_embeddings as f64).sqrt() as i64;
        ensure!(
            side * side == vision.num_position_embeddings,
            "num_position_embeddings {} is not a square",
            vision.num_position_embeddings
        );
        for &i in &vision.deepstack_visual_indexes {
            ensure!(
                (0..vision.depth).contains(&i),
                "deepstack_visual_indexes names block {i} of a {}-block vision tower",
                vision.depth
            );
        }
        ensure!(
            vision.deepstack_visual_indexes.len() as i64 <= text_cfg.num_layers,
            "{} DeepStack features for {} LLM layers",
            vision.deepstack_visual_indexes.len(),
            text_cfg.num_layers
        );
        ensure!(
            matches!(
                vision.hidden_act.as_str(),
                "gelu_pytorch_tanh" | "gelu" | "silu" | "quick_gelu"
            ),
            "vision hidden_act `{}` is not supported",
            vision.hidden_act
        );
        Ok(Qwen3VlConfig {
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
        self.text.num_parameters()
            + self.decoder_options().extra_parameters(&self.text)
            + self.vision.num_parameters()
    }
}

impl VisionConfig {
    pub fn num_parameters(&self) -> u64 {
        let e = self.hidden_size as u64;
        let i = self.intermediate_size as u64;
        let patch = linear_params(
            (self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size)
                as u64,
            e,
            true,
        );
        let pos = self.num_position_embeddings as u64 * e;
        // Two LayerNorms (weight + bias), fused qkv and proj, fc1 / fc2, all with bias.
        let block = 4 * e
            + linear_params(e, 3 * e, true)
            + linear_params(e, e, true)
            + linear_params(e, i, true)
            + linear_params(i, e, true);
        let merged = e * (self.spatial_merge_size * self.spatial_merge_size) as u64;
        let mlp = linear_params(merged, merged, true)
            + linear_params(merged, self.out_hidden_size as u64, true);
        // The final merger normalises each patch, the DeepStack ones each merged group.
        let merger = 2 * e + mlp;
        let deepstack = self.deepstack_visual_indexes.len() as u64 * (2 * merged + mlp);
        patch + pos + self.depth as u64 * block + merger + deepstack
    }
}
