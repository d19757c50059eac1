//! `config.json` of the LLaVA family (`llava`, `llava_next`, `llava_next_video`,
//! `llava_onevision`), with `transformers`' defaults for every absent key: the composite
//! config's own (per `model_type`: feature layer, strategy, token ids, pinpoints, and the tower
//! when `vision_config` is missing: CLIP ViT-L/14-336, or SigLIP-so400m for OneVision), the
//! vision tower's (`CLIPVisionConfig` / `SiglipVisionConfig`) and the text model's
//! (`LlamaConfig` / `MistralConfig` / `Qwen2Config`).

use anyhow::{bail, ensure, Context, Result};
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
    /// `LlavaNextVideoForConditionalGeneration`: NeXT images, and video frames whose features
    /// are pooled spatially (`vision_resampler`) before the projector.
    LlavaNextVideo,
    /// `LlavaOnevisionForConditionalGeneration`: anyres with a feature budget
    /// (`anyres_max_N`), one tile per image in multi-image samples, and video frames pooled
    /// bilinearly after the projector with one `image_newline` closing each video.
    LlavaOnevision,
}

impl Architecture {
    /// Whether images are tiled anyres-style and packed with `image_newline`.
    pub fn anyres(self) -> bool {
        self != Architecture::Llava
    }

    /// Whether the architecture takes videos.
    pub fn video(self) -> bool {
        matches!(
            self,
            Architecture::LlavaNextVideo | Architecture::LlavaOnevision
        )
    }
}

/// NeXT-Video's `spatial_pool_mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolMode {
    Average,
    Max,
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
    /// `video_token_index` (NeXT-Video, OneVision).
    pub video_token_id: Option<i64>,
    /// NeXT-Video's `spatial_pool_mode` and `spatial_pool_stride`.
    pub video_pool: Option<(PoolMode, i64)>,
    /// OneVision's `vision_aspect_ratio = "anyres_max_N"`: N, the tile budget beyond which an
    /// image's unpadded feature map is downscaled.
    pub max_patches: Option<i64>,
}

/// The vision tower when `vision_config` is absent: CLIP ViT-L/14-336, or OneVision's
/// SigLIP-so400m-384 without its pooling head.
fn default_vision(arch: Architecture) -> Value {
    if arch == Architecture::LlavaOnevision {
        return json!({
            "model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
            "patch_size": 14, "image_size": 384, "num_hidden_layers": 26,
            "num_attention_heads": 16, "vision_use_head": false,
        });
    }
    json!({
        "model_type": "clip_vision_model", "intermediate_size": 4096, "hidden_size": 1024,
        "patch_size": 14, "image_size": 336, "num_hidden_layers": 24, "num_attention_heads": 16,
    })
}

/// `image_grid_pinpoints` when absent: NeXT's five 336-pixel layouts, or OneVision's 6×6
/// grid of 384-pixel multiples.
fn default_pinpoints(arch: Architecture) -> Vec<[i64; 2]> {
    if arch == Architecture::LlavaOnevision {
        return (1..=6)
            .flat_map(|h| (1..=6).map(move |w| [384 * h, 384 * w]))
            .collect();
    }
    vec![[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
}

/// The `N` of `vision_aspect_ratio = "anyres_max_N"`.
fn parse_max_patches(root: &Value) -> Result<i64> {
    let ratio = string(root, "vision_aspect_ratio", "anyres_max_9")?;
    ratio
        .strip_prefix("anyres_max_")
        .and_then(|n| n.parse::<i64>().ok())
        .filter(|&n| n > 0)
        .with_context(|| {
            format!("vision_aspect_ratio must be \"anyres_max_N\" with N > 0, got {ratio:?}")
        })
}

fn parse_video_pool(root: &Value) -> Result<(PoolMode, i64)> {
    let mode = match string(root, "spatial_pool_mode", "average")? {
        "average" => PoolMode::Average,
        "max" => PoolMode::Max,
        "conv" => bail!("spatial_pool_mode \"conv\" (a learned pooling convolution) is not supported; \"average\" and \"max\" are"),
        other => bail!("spatial_pool_mode must be \"average\", \"max\" or \"conv\", got {other:?}"),
    };
    let stride = int(root, "spatial_pool_stride", 2)?;
    ensure!(
        stride > 0,
        "spatial_pool_stride must be positive, got {stride}"
    );
    Ok((mode, stride))
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
        // The original repository's configs say `model_type = "llava"` too, but are the LLM's
        // config with LLaVA keys added; read as llava-hf's they would silently get defaults.
        ensure!(
            !crate::original::is_original(root),
            "this is an original LLaVA checkpoint (architectures {:?}), not a llava-hf one: `train` / `evaluate` read it directly (model.path, with model.vision_tower naming the tower), or convert it with `lmms-ft convert llava-original --model DIR --vision-tower DIR --out DIR`",
            root.get("architectures").cloned().unwrap_or(Value::Null)
        );
        let architecture = match root.get("model_type").and_then(Value::as_str) {
            Some("llava") => Architecture::Llava,
            Some("llava_next") => Architecture::LlavaNext,
            Some("llava_next_video") => Architecture::LlavaNextVideo,
            Some("llava_onevision") => Architecture::LlavaOnevision,
            other => bail!(
                "not a LLaVA / LLaVA-NeXT / NeXT-Video / OneVision config (model_type {other:?})"
            ),
        };
        let onevision = architecture == Architecture::LlavaOnevision;
        // OneVision's text model defaults to Qwen2, the others' to Llama.
        let mut text_owned = root
            .get("text_config")
            .filter(|v| !v.is_null())
            .cloned()
            .unwrap_or_else(|| json!({}));
        if onevision && text_owned.get("model_type").is_none_or(Value::is_null) {
            if let Some(obj) = text_owned.as_object_mut() {
                obj.insert("model_type".into(), json!("qwen2"));
            }
        }
        let text_json = &text_owned;
        let text = parse_text_config(text_json, boolean(root, "tie_word_embeddings", false)?)
            .context("in text_config")?;
        let default_v = default_vision(architecture);
        let vision_json = root
            .get("vision_config")
            .filter(|v| !v.is_null())
            .unwrap_or(&default_v);
        let tower_default = if onevision {
            "siglip_vision_model"
        } else {
            "clip_vision_model"
        };
        let vision = match string(vision_json, "model_type", tower_default)? {
            // Chinese-CLIP's vision tower is CLIP's, tensor for tensor, with the same config
            // keys and defaults (`ChineseCLIPVisionConfig`); only its text tower differs.
            "clip_vision_model" | "chinese_clip_vision_model" => VisionConfig::Clip(ClipVisionConfig::from_hf_json(vision_json).context("in vision_config")?),
            "siglip_vision_model" => {
                VisionConfig::Siglip(SiglipVisionConfig::from_hf_json(vision_json).context("in vision_config")?)
            }
            other => bail!("vision_config.model_type `{other}` is not supported (clip_vision_model, chinese_clip_vision_model, siglip_vision_model)"),
        };
        let vision_feature_layers = match root.get("vision_feature_layer") {
            None | Some(Value::Null) => vec![if onevision { -1 } else { -2 }],
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
        let strategy_default = if onevision { "full" } else { "default" };
        let select_strategy =
            match string(root, "vision_feature_select_strategy", strategy_default)? {
                "default" => SelectStrategy::Default,
                "full" => SelectStrategy::Full,
                other => bail!(
                    "vision_feature_select_strategy must be \"default\" or \"full\", got {other:?}"
                ),
            };
        let image_grid_pinpoints = match root.get("image_grid_pinpoints") {
            None | Some(Value::Null) => default_pinpoints(architecture),
            Some(Value::Array(a)) => a
                .iter()
                .map(|p| match p.as_array().map(|x| x.iter().filter_map(Value::as_i64).collect::<Vec<_>>()) {
                    Some(hw) if hw.len() == 2 && hw[0] > 0 && hw[1] > 0 => Ok([hw[0], hw[1]]),
                    _ => bail!("image_grid_pinpoints entries must be [height, width] of positive integers, got {p}"),
                })
                .collect::<Result<_>>()?,
            Some(v) => bail!("image_grid_pinpoints must be a list, got {v}"),
        };
        let (image_default, video_default) = match architecture {
            Architecture::Llava | Architecture::LlavaNext => (32000, None),
            Architecture::LlavaNextVideo => (32001, Some(32000)),
            Architecture::LlavaOnevision => (151646, Some(151647)),
        };
        let video_token_id = match video_default {
            Some(d) => Some(int(
                root,
                "video_token_index",
                int(root, "video_token_id", d)?,
            )?),
            None => None,
        };
        let config = LlavaConfig {
            architecture,
            text,
            vision,
            image_token_id: int(
                root,
                "image_token_index",
                int(root, "image_token_id", image_default)?,
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
            video_token_id,
            video_pool: (architecture == Architecture::LlavaNextVideo)
                .then(|| parse_video_pool(root))
                .transpose()?,
            max_patches: onevision.then(|| parse_max_patches(root)).transpose()?,
        };
        let vocab = config.text.decoder.vocab_size;
        for (key, id) in [
            ("image_token_index", Some(config.image_token_id)),
            ("video_token_index", config.video_token_id),
        ] {
            if let Some(id) = id {
                ensure!(
                    (0..vocab).contains(&id),
                    "{key} {id} is outside the text model's vocabulary of {vocab}"
                );
            }
        }
        ensure!(
            config.video_token_id != Some(config.image_token_id),
            "image_token_index and video_token_index are both {}",
            config.image_token_id
        );
        Ok(config)
    }

    fn num_parameters(&self) -> u64 {
        let newline = if self.architecture.anyres() {
            self.text.decoder.hidden_size as u64
        } else {
            0
        };
        self.text.decoder.num_parameters()
            + self.vision.num_parameters()
            + self.projector_parameters()
            + newline
    }
}
