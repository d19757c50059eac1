//! `config.json` of the LLaVA family (`llava`, `llava_next`), with `transformers`' defaults
//! for every absent key: the composite config's own (`vision_feature_layer = -2`,
//! `"default"` strategy, a CLIP ViT-L/14-336 tower when `vision_config` is missing), the
//! vision tower's (`CLIPVisionConfig` / `SiglipVisionConfig`) and the text model's
//! (`LlamaConfig` / `MistralConfig` / `Qwen2Config`).

use anyhow::{bail, Context, Result};
use lmms_ft_backbones::clip::ClipVisionConfig;
use lmms_ft_backbones::siglip::SiglipVisionConfig;
use lmms_ft_backbones::text_config::{parse_text_config, TextModel};
use lmms_ft_backbones::vit::{boolean, int, string, Activation};
use lmms_ft_core::family::HfConfig;
use lmms_ft_core::nn::linear_params;
use serde_json::{json, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// `LlavaForConditionalGeneration` (LLaVA-1.5, LLaVA-Interleave): one fixed-size tile.
    Llava,
    /// `LlavaNextForConditionalGeneration`: anyres tiles, unpadding and `image_newline`.
    LlavaNext,
}

#[derive(Debug, Clone, PartialEq)]
pub enum VisionConfig {
    Clip(ClipVisionConfig),
    Siglip(SiglipVisionConfig),
}

impl VisionConfig {
    pub fn hidden_size(&self) -> i64 {
        match self {
            VisionConfig::Clip(c) => c.encoder.hidden_size,
            VisionConfig::Siglip(c) => c.encoder.hidden_size,
        }
    }

    pub fn image_size(&self) -> i64 {
        match self {
            VisionConfig::Clip(c) => c.image_size,
            VisionConfig::Siglip(c) => c.image_size,
        }
    }

    pub fn patch_size(&self) -> i64 {
        match self {
            VisionConfig::Clip(c) => c.patch_size,
            VisionConfig::Siglip(c) => c.patch_size,
        }
    }

    /// Tokens per tile out of the tower (CLIP counts its class token).
    pub fn num_tokens(&self) -> i64 {
        match self {
            VisionConfig::Clip(c) => c.num_tokens(),
            VisionConfig::Siglip(c) => c.num_tokens(),
        }
    }

    pub fn num_parameters(&self) -> u64 {
        match self {
            VisionConfig::Clip(c) => c.num_parameters(),
            VisionConfig::Siglip(c) => c.num_parameters(),
        }
    }
}

/// `vision_feature_select_strategy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SelectStrategy {
    /// Drop the first token of every tile (CLIP's class token).
    Default,
    /// Keep every token.
    Full,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LlavaConfig {
    pub architecture: Architecture,
    pub text: TextModel,
    pub vision: VisionConfig,
    pub image_token_id: i64,
    /// `hidden_states` indices whose features are concatenated (one entry for an integer).
    pub vision_feature_layers: Vec<i64>,
    pub select_strategy: SelectStrategy,
    pub projector_act: Activation,
    pub projector_bias: bool,
    /// `(height, width)` resolutions anyres may pick (LLaVA-NeXT only).
    pub image_grid_pinpoints: Vec<[i64; 2]>,
    /// The original LLaVA's `image_aspect_ratio` (`"pad"`, `"square"`, `"anyres"`), when
    /// `config.json` carries it; the processor reads it (see `processor`).
    pub image_aspect_ratio: Option<String>,
}

/// `LlavaConfig`'s vision tower when `vision_config` is absent: CLIP ViT-L/14-336.
fn default_vision() -> Value {
    json!({
        "model_type": "clip_vision_model", "intermediate_size": 4096, "hidden_size": 1024,
        "patch_size": 14, "image_size": 336, "num_hidden_layers": 24, "num_attention_heads": 16,
    })
}

impl LlavaConfig {
    /// Features per tile after the strategy.
    pub fn tokens_per_tile(&self) -> i64 {
        let n = self.vision.num_tokens();
        match self.select_strategy {
            SelectStrategy::Default => n - 1,
            SelectStrategy::Full => n,
        }
    }

    pub fn projector_parameters(&self) -> u64 {
        let v = (self.vision.hidden_size() * self.vision_feature_layers.len() as i64) as u64;
        let h = self.text.decoder.hidden_size as u64;
        linear_params(v, h, self.projector_bias) + linear_params(h, h, self.projector_bias)
    }
}

impl HfConfig for LlavaConfig {
    fn from_hf_json(root: &Value) -> Result<Self> {
        let architecture = match root.get("model_type").and_then(Value::as_str) {
            Some("llava") => Architecture::Llava,
            Some("llava_next") => Architecture::LlavaNext,
            other => bail!("not a LLaVA / LLaVA-NeXT config (model_type {other:?})"),
        };
        let empty = json!({});
        let text_json = root
            .get("text_config")
            .filter(|v| !v.is_null())
            .unwrap_or(&empty);
        let text = parse_text_config(text_json, boolean(root, "tie_word_embeddings", false)?)
            .context("in text_config")?;
        let default_v = default_vision();
        let vision_json = root
            .get("vision_config")
            .filter(|v| !v.is_null())
            .unwrap_or(&default_v);
        let vision = match string(vision_json, "model_type", "clip_vision_model")? {
            "clip_vision_model" => VisionConfig::Clip(ClipVisionConfig::from_hf_json(vision_json).context("in vision_config")?),
            "siglip_vision_model" => {
                VisionConfig::Siglip(SiglipVisionConfig::from_hf_json(vision_json).context("in vision_config")?)
            }
            other => bail!("vision_config.model_type `{other}` is not supported (clip_vision_model, siglip_vision_model)"),
        };
        let vision_feature_layers = match root.get("vision_feature_layer") {
            None | Some(Value::Null) => vec![-2],
            Some(Value::Array(a)) if !a.is_empty() => a
                .iter()
                .map(|v| {
                    v.as_i64().with_context(|| {
                        format!("vision_feature_layer entries must be integers, got {v}")
                    })
                })
                .collect::<Result<_>>()?,
            Some(v) => vec![v.as_i64().with_context(|| {
                format!("vision_feature_layer must be an integer or a non-empty list, got {v}")
            })?],
        };
        let select_strategy = match string(root, "vision_feature_select_strategy", "default")? {
            "default" => SelectStrategy::Default,
            "full" => SelectStrategy::Full,
            other => bail!(
                "vision_feature_select_strategy must be \"default\" or \"full\", got {other:?}"
            ),
        };
        let image_grid_pinpoints = match root.get("image_grid_pinpoints") {
            None | Some(Value::Null) => vec![[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
            Some(Value::Array(a)) => a
                .iter()
                .map(|p| match p.as_array().map(|x| x.iter().filter_map(Value::as_i64).collect::<Vec<_>>()) {
                    Some(hw) if hw.len() == 2 && hw[0] > 0 && hw[1] > 0 => Ok([hw[0], hw[1]]),
                    _ => bail!("image_grid_pinpoints entries must be [height, width] of positive integers, got {p}"),
                })
                .collect::<Result<_>>()?,
            Some(v) => bail!("image_grid_pinpoints must be a list, got {v}"),
        };
        let config = LlavaConfig {
            architecture,
            text,
            vision,
            image_token_id: int(
                root,
                "image_token_index",
                int(root, "image_token_id", 32000)?,
            )?,
            vision_feature_layers,
            select_strategy,
            projector_act: Activation::parse(string(root, "projector_hidden_act", "gelu")?)?,
            projector_bias: boolean(root, "multimodal_projector_bias", true)?,
            image_grid_pinpoints,
            image_aspect_ratio: root
                .get("image_aspect_ratio")
                .and_then(Value::as_str)
                .map(str::to_string),
        };
        if config.image_token_id < 0 || config.image_token_id >= config.text.decoder.vocab_size {
            bail!(
                "image_token_index {} is outside the text model's vocabulary of {}",
                config.image_token_id,
                config.text.decoder.vocab_size
            );
        }
        Ok(config)
    }

    fn num_parameters(&self) -> u64 {
        let newline = match self.architecture {
            Architecture::Llava => 0,
            Architecture::LlavaNext => self.text.decoder.hidden_size as u64,
        };
        self.text.decoder.num_parameters()
            + self.vision.num_parameters()
            + self.projector_parameters()
            + newline
    }
}
