//! `Phi3VConfig` (`configuration_phi3_v.py`): a flat Phi-3 text config plus `embd_layer` (how
//! image features become tokens) and `img_processor` (the CLIP tower). Absent keys take the
//! defaults of the Hub's `Phi3VConfig.__init__`.
//!
//! The Hub code hard-codes the tower (`CLIP_VIT_LARGE_PATCH14_336_CONFIG` for
//! `openai/clip-vit-large-patch14-336`, the only `model_name` it accepts). A config may
//! describe another CLIP in `img_processor.clip_config` (a `CLIPVisionConfig` dict, which the
//! Hub code ignores); the test fixture's tiny tower is given that way.

use anyhow::{bail, ensure, Context, Result};
use lmms_ft_backbones::clip::ClipVisionConfig;
use lmms_ft_backbones::decoder::DecoderConfig;
use lmms_ft_backbones::longrope::{ScaledRope, ScaledRopeKind};
use lmms_ft_backbones::vit::{boolean, float, int, string};
use lmms_ft_core::family::HfConfig;
use lmms_ft_core::nn::linear_params;
use serde_json::{json, Value};

/// The one tower the Hub code builds.
pub const CLIP_MODEL_NAME: &str = "openai/clip-vit-large-patch14-336";

/// The Hub's `CLIP_VIT_LARGE_PATCH14_336_CONFIG`.
fn clip_vit_large_336() -> Value {
    json!({
        "hidden_act": "quick_gelu", "hidden_size": 1024, "image_size": 336,
        "intermediate_size": 4096, "layer_norm_eps": 1e-5, "num_attention_heads": 16,
        "num_channels": 3, "num_hidden_layers": 24, "patch_size": 14
    })
}

/// Which image tokens come first in an image's sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HdOrder {
    /// Crops, `glb_GN`, global view (`sub_glb`, the released checkpoints).
    SubGlb,
    /// Global view, `glb_GN`, crops.
    GlbSub,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Phi3VConfig {
    pub text: DecoderConfig,
    pub rope_theta: f64,
    /// `None`: plain rotary positions (`rope_scaling` null).
    pub rope_scaling: Option<ScaledRope>,
    /// Width of the sliding attention window; the decoder has only full causal attention,
    /// equal to it for sequences no longer than the window, so longer ones are refused.
    pub sliding_window: Option<i64>,
    pub clip: ClipVisionConfig,
    /// `hidden_states[layer_idx]` of the tower feeds the projector (-2: second to last).
    pub layer_idx: i64,
    pub hd_order: HdOrder,
    /// `img_processor.num_img_tokens`: tokens per 336-pixel view after the 2×2 merge.
    pub num_img_tokens: i64,
}

impl Phi3VConfig {
    /// Channels of one merged token (four CLIP patches side by side).
    pub fn merged_dim(&self) -> i64 {
        4 * self.clip.encoder.hidden_size
    }
}

fn rope_scaling(v: &Value, max_pos: i64, original: i64) -> Result<Option<ScaledRope>> {
    let Some(r) = v.get("rope_scaling").filter(|r| !r.is_null()) else {
        return Ok(None);
    };
    let kind = match r
        .get("type")
        .or_else(|| r.get("rope_type"))
        .and_then(Value::as_str)
    {
        Some("su") | Some("longrope") => ScaledRopeKind::LongRope,
        Some("yarn") => ScaledRopeKind::Yarn,
        other => bail!("rope_scaling type {other:?} is not supported (su, longrope, yarn)"),
    };
    let factors = |key: &str| -> Result<Vec<f64>> {
        r.get(key)
            .and_then(Value::as_array)
            .with_context(|| format!("rope_scaling.{key} must be a list of numbers"))?
            .iter()
            .map(|x| x.as_f64().context("rope_scaling factors must be numbers"))
            .collect()
    };
    Ok(Some(ScaledRope {
        kind,
        short_factor: factors("short_factor")?,
        long_factor: factors("long_factor")?,
        original_max_position_embeddings: original,
        max_position_embeddings: max_pos,
    }))
}

impl HfConfig for Phi3VConfig {
    fn from_hf_json(v: &Value) -> Result<Self> {
        let model_type = string(v, "model_type", "phi3_v")?;
        ensure!(
            model_type == "phi3_v",
            "model_type `{model_type}` is not Phi-3-V"
        );
        let hidden = int(v, "hidden_size", 3072)?;
        let heads = int(v, "num_attention_heads", 32)?;
        ensure!(
            heads > 0 && hidden % heads == 0,
            "hidden_size {hidden} is not a multiple of num_attention_heads {heads}"
        );
        let kv = match v.get("num_key_value_heads") {
            None | Some(Value::Null) => heads,
            Some(_) => int(v, "num_key_value_heads", heads)?,
        };
        ensure!(
            kv > 0 && heads % kv == 0,
            "num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}"
        );
        let head_dim = hidden / heads;
        let text = DecoderConfig {
            vocab_size: int(v, "vocab_size", 32064)?,
            hidden_size: hidden,
            intermediate_size: int(v, "intermediate_size", 8192)?,
            num_layers: int(v, "num_hidden_layers", 32)?,
            num_heads: heads,
            num_kv_heads: kv,
            head_dim,
            rms_norm_eps: float(v, "rms_norm_eps", 1e-5)?,
            rope_theta: float(v, "rope_theta", 10000.0)?,
            qkv_bias: false,
            o_bias: false,
            tie_word_embeddings: boolean(v, "tie_word_embeddings", false)?,
        };
        let act = string(v, "hidden_act", "silu")?;
        ensure!(act == "silu", "hidden_act `{act}` is not supported (silu)");
        let max_pos = int(v, "max_position_embeddings", 4096)?;
        let original = int(v, "original_max_position_embeddings", 4096)?;
        let rope_scaling = rope_scaling(v, max_pos, original)?;
        if let Some(r) = &rope_scaling {
            r.check(head_dim)?;
        }
        let sliding_window = match v.get("sliding_window") {
            None | Some(Value::Null) => None,
            Some(_) => Some(int(v, "sliding_window", 0)?),
        };

        let embd = v.get("embd_layer").filter(|e| e.is_object()).context(
            "embd_layer must describe the image embedding (a text-only Phi-3 is not Phi-3-V)",
        )?;
        let flag = |key: &str| boolean(embd, key, false);
        ensure!(
            flag("use_hd_transform")? && flag("with_learnable_separator")?,
            "embd_layer: only the HD transform with learnable separators is supported"
        );
        let projection = string(embd, "projection_cls", "linear")?;
        ensure!(
            projection == "mlp",
            "embd_layer.projection_cls `{projection}` is not supported (mlp)"
        );
        let hd_order = match string(embd, "hd_transform_order", "glb_sub")? {
            "sub_glb" => HdOrder::SubGlb,
            "glb_sub" => HdOrder::GlbSub,
            other => bail!("embd_layer.hd_transform_order `{other}` is not supported"),
        };

        let img = v
            .get("img_processor")
            .filter(|e| e.is_object())
            .context("img_processor must describe the CLIP tower")?;
        let name = string(img, "name", "")?;
        ensure!(
            name == "clip_vision_model",
            "img_processor.name `{name}` is not supported (clip_vision_model)"
        );
        let clip_json = match img.get("clip_config") {
            Some(c) if c.is_object() => c.clone(),
            _ => {
                let model = string(img, "model_name", "")?;
                ensure!(
                    model == CLIP_MODEL_NAME,
                    "img_processor.model_name `{model}` is not supported ({CLIP_MODEL_NAME})"
                );
                clip_vit_large_336()
            }
        };
        let clip = ClipVisionConfig::from_hf_json(&clip_json).context("img_processor")?;
        ensure!(
            clip.grid() == 24,
            "the HD transform needs a 24×24 patch grid (336 / 14), the tower gives {}×{}",
            clip.grid(),
            clip.grid()
        );
        let dim_out = int(img, "image_dim_out", clip.encoder.hidden_size)?;
        ensure!(
            dim_out == clip.encoder.hidden_size,
            "img_processor.image_dim_out {dim_out} differs from the tower's hidden size {}",
            clip.encoder.hidden_size
        );
        let feature = string(img, "type_feature", "patch")?;
        ensure!(
            feature == "patch",
            "img_processor.type_feature `{feature}` is not supported (patch)"
        );
        let num_img_tokens = int(img, "num_img_tokens", 144)?;
        ensure!(
            num_img_tokens == 144,
            "img_processor.num_img_tokens must be 144 (12×12 merged patches), got {num_img_tokens}"
        );
        Ok(Phi3VConfig {
            text,
            rope_theta: float(v, "rope_theta", 10000.0)?,
            rope_scaling,
            sliding_window,
            layer_idx: int(img, "layer_idx", -2)?,
            clip,
            hd_order,
            num_img_tokens,
        })
    }

    /// Decoder + CLIP tower (with its unused `post_layernorm`, which the checkpoint holds) +
    /// the two separators + the two-layer projector.
    fn num_parameters(&self) -> u64 {
        let h = self.text.hidden_size as u64;
        let merged = self.merged_dim() as u64;
        let projector = linear_params(merged, h, true) + linear_params(h, h, true);
        self.text.num_parameters() + self.clip.num_parameters() + 2 * merged + projector
    }
}
