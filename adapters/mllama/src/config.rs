//! `config.json` of Llama-3.2-Vision (`model_type = "mllama"`): a nested `text_config`
//! (`mllama_text_model`: the Llama-3.1 decoder with cross-attention layers at
//! `cross_attention_layers`, llama3 rope scaling) and `vision_config`
//! (`mllama_vision_model`: a tiled ViT with a gated global encoder). Missing keys take
//! `transformers` 5.23's defaults, which the Hub files rely on.

use anyhow::{bail, ensure, Result};
use lmms_ft_backbones::decoder::DecoderConfig;
use lmms_ft_core::family::HfConfig;
use lmms_ft_core::hf_json::{boolean, float, int, string};
use lmms_ft_core::nn::linear_params;
use serde_json::Value;

/// `rope_type = "llama3"`: Llama-3.1's frequency-dependent scaling of the rotary frequencies.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3Rope {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    /// Sizes of the self-attention decoder; `num_layers` counts the cross-attention layers
    /// too, as `num_hidden_layers` does.
    pub decoder: DecoderConfig,
    /// Indices (into all layers) of the cross-attention layers.
    pub cross_attention_layers: Vec<i64>,
    /// `None` for plain rope.
    pub rope_scaling: Option<Llama3Rope>,
    pub pad_token_id: Option<i64>,
}

impl TextConfig {
    pub fn is_cross(&self, layer: i64) -> bool {
        self.cross_attention_layers.contains(&layer)
    }

    /// The embedding table has 8 rows past `vocab_size` (the image token and reserved ones),
    /// which `lm_head` does not predict.
    pub fn embedding_rows(&self) -> i64 {
        self.decoder.vocab_size + 8
    }

    pub fn num_parameters(&self) -> u64 {
        let d = &self.decoder;
        let h = d.hidden_size as u64;
        let hd = d.head_dim as u64;
        let q = (d.num_heads * d.head_dim) as u64;
        let kv = (d.num_kv_heads * d.head_dim) as u64;
        let attn = linear_params(h, q, false)
            + 2 * linear_params(h, kv, false)
            + linear_params(q, h, false);
        let mlp = 3 * linear_params(h, d.intermediate_size as u64, false);
        let self_layer = attn + mlp + 2 * h;
        // q/k norms of the head dimension, and the attention and MLP gates.
        let cross_layer = self_layer + 2 * hd + 2;
        let n_cross = (0..d.num_layers).filter(|&i| self.is_cross(i)).count() as u64;
        let n_self = d.num_layers as u64 - n_cross;
        let lm_head = if d.tie_word_embeddings {
            0
        } else {
            d.vocab_size as u64 * h
        };
        self.embedding_rows() as u64 * h + n_self * self_layer + n_cross * cross_layer + h + lm_head
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_layers: i64,
    pub num_global_layers: i64,
    pub num_heads: i64,
    pub num_channels: i64,
    pub image_size: i64,
    pub patch_size: i64,
    pub norm_eps: f64,
    pub max_num_tiles: i64,
    /// Local-encoder layers whose outputs are concatenated to the global encoder's.
    pub intermediate_layers_indices: Vec<i64>,
    /// `[width, height]` tile arrangements; only their count matters to the model (the
    /// processor enumerates arrangements from `max_image_tiles` as transformers does).
    pub supported_aspect_ratios: Vec<[i64; 2]>,
    pub vision_output_dim: i64,
    /// `gelu` in every published checkpoint.
    pub hidden_act: String,
}

impl VisionConfig {
    /// Patches of one tile plus the class token.
    pub fn num_patches(&self) -> i64 {
        let side = self.image_size / self.patch_size;
        side * side + 1
    }

    pub fn max_aspect_ratio_id(&self) -> i64 {
        self.supported_aspect_ratios.len() as i64
    }

    pub fn num_parameters(&self) -> u64 {
        let h = self.hidden_size as u64;
        let i = self.intermediate_size as u64;
        let n = self.num_patches() as u64;
        let tiles = self.max_num_tiles as u64;
        let ids = self.max_aspect_ratio_id() as u64 + 1;
        let patch = h * (self.num_channels * self.patch_size * self.patch_size) as u64;
        let positional = 1 + n * h + ids * tiles * n * h;
        let tile_embeddings = 2 * (ids * tiles * h + 1);
        let layer = 4 * linear_params(h, h, false)
            + linear_params(h, i, true)
            + linear_params(i, h, true)
            + 4 * h;
        patch
            + h
            + positional
            + tile_embeddings
            + 4 * h
            + self.num_layers as u64 * layer
            + self.num_global_layers as u64 * (layer + 2)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct MllamaConfig {
    pub text: TextConfig,
    pub vision: VisionConfig,
    pub image_token_id: i64,
}

/// The rope dictionary under its transformers-5 (`rope_parameters`) or 4.x (`rope_scaling`)
/// name, with θ; other scaled variants are refused rather than computed as plain rope.
fn rope(text: &Value) -> Result<(f64, Option<Llama3Rope>)> {
    let dict = ["rope_parameters", "rope_scaling"]
        .iter()
        .find_map(|k| text.get(*k).filter(|v| v.is_object()));
    let theta_default = float(text, "rope_theta", 500000.0)?;
    let Some(r) = dict else {
        return Ok((theta_default, None));
    };
    let theta = float(r, "rope_theta", theta_default)?;
    let kind = r
        .get("rope_type")
        .or_else(|| r.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    match kind {
        "default" => Ok((theta, None)),
        "llama3" => Ok((
            theta,
            Some(Llama3Rope {
                factor: float(r, "factor", 8.0)?,
                low_freq_factor: float(r, "low_freq_factor", 1.0)?,
                high_freq_factor: float(r, "high_freq_factor", 4.0)?,
                original_max_position_embeddings: float(
                    r,
                    "original_max_position_embeddings",
                    8192.0,
                )?,
            }),
        )),
        other => bail!("text_config: rope type `{other}` is not supported (default, llama3)"),
    }
}

fn int_list(obj: &Value, key: &str, default: &[i64]) -> Result<Vec<i64>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(default.to_vec()),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_i64()
                    .ok_or_else(|| anyhow::anyhow!("`{key}` must hold integers, got {x}"))
            })
            .collect(),
        Some(v) => bail!("`{key}` must be a list of integers, got {v}"),
    }
}

const DEFAULT_ASPECT_RATIOS: [[i64; 2]; 8] = [
    [1, 1],
    [1, 2],
    [1, 3],
    [1, 4],
    [2, 1],
    [2, 2],
    [3, 1],
    [4, 1],
];

impl HfConfig for MllamaConfig {
    fn from_hf_json(root: &Value) -> Result<Self> {
        match root.get("model_type").and_then(Value::as_str) {
            Some("mllama") => {}
            other => bail!("not a Llama-3.2-Vision config (model_type {other:?})"),
        }
        let empty = Value::Object(Default::default());
        let text = root
            .get("text_config")
            .filter(|v| v.is_object())
            .unwrap_or(&empty);
        let hidden = int(text, "hidden_size", 4096)?;
        let heads = int(text, "num_attention_heads", 32)?;
        ensure!(
            heads > 0 && hidden % heads == 0,
            "text_config: hidden_size {hidden} is not a multiple of num_attention_heads {heads}"
        );
        let kv = int(text, "num_key_value_heads", 8)?;
        ensure!(
            kv > 0 && heads % kv == 0,
            "text_config: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}"
        );
        let act = string(text, "hidden_act", "silu")?;
        ensure!(
            act == "silu",
            "text_config: hidden_act `{act}` is not supported (silu)"
        );
        let (rope_theta, rope_scaling) = rope(text)?;
        let num_layers = int(text, "num_hidden_layers", 40)?;
        let cross = int_list(
            text,
            "cross_attention_layers",
            &[3, 8, 13, 18, 23, 28, 33, 38],
        )?;
        if let Some(bad) = cross.iter().find(|&&i| i < 0 || i >= num_layers) {
            bail!("text_config: cross-attention layer {bad} is outside the {num_layers} layers");
        }
        let decoder = DecoderConfig {
            vocab_size: int(text, "vocab_size", 128256)?,
            hidden_size: hidden,
            intermediate_size: int(text, "intermediate_size", 14336)?,
            num_layers,
            num_heads: heads,
            num_kv_heads: kv,
            // transformers derives it (no `head_dim` key for mllama).
            head_dim: hidden / heads,
            rms_norm_eps: float(text, "rms_norm_eps", 1e-5)?,
            rope_theta,
            qkv_bias: false,
            o_bias: false,
            tie_word_embeddings: boolean(text, "tie_word_embeddings", false)?,
        };
        let pad_token_id = match text.get("pad_token_id") {
            None => Some(128004),
            Some(Value::Null) => None,
            Some(_) => Some(int(text, "pad_token_id", 128004)?),
        };
        let v = root
            .get("vision_config")
            .filter(|v| v.is_object())
            .unwrap_or(&empty);
        let vision = VisionConfig {
            hidden_size: int(v, "hidden_size", 1280)?,
            intermediate_size: int(v, "intermediate_size", 5120)?,
            num_layers: int(v, "num_hidden_layers", 32)?,
            num_global_layers: int(v, "num_global_layers", 8)?,
            num_heads: int(v, "attention_heads", int(v, "num_attention_heads", 16)?)?,
            num_channels: int(v, "num_channels", 3)?,
            image_size: int(v, "image_size", 448)?,
            patch_size: int(v, "patch_size", 14)?,
            norm_eps: float(v, "norm_eps", 1e-5)?,
            max_num_tiles: int(v, "max_num_tiles", 4)?,
            intermediate_layers_indices: int_list(
                v,
                "intermediate_layers_indices",
                &[3, 7, 15, 23, 30],
            )?,
            supported_aspect_ratios: match v.get("supported_aspect_ratios") {
                None | Some(Value::Null) => DEFAULT_ASPECT_RATIOS.to_vec(),
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|p| match p.as_array().map(|p| p.iter().map(Value::as_i64).collect::<Vec<_>>()) {
                        Some(x) if x.len() == 2 && x.iter().all(Option::is_some) => {
                            Ok([x[0].unwrap_or(1), x[1].unwrap_or(1)])
                        }
                        _ => bail!("vision_config.supported_aspect_ratios: {p} is not a pair of integers"),
                    })
                    .collect::<Result<_>>()?,
                Some(other) => bail!("vision_config.supported_aspect_ratios must be a list, got {other}"),
            },
            vision_output_dim: int(v, "vision_output_dim", 7680)?,
            hidden_act: string(v, "hidden_act", "gelu")?.to_string(),
        };
        let vs = &vision;
        ensure!(
            vs.num_heads > 0 && vs.hidden_size % vs.num_heads == 0,
            "vision_config: hidden_size {} is not a multiple of attention_heads {}",
            vs.hidden_size,
            vs.num_heads
        );
        ensure!(
            vs.patch_size > 0 && vs.image_size % vs.patch_size == 0,
            "vision_config: image_size {} is not a multiple of patch_size {}",
            vs.image_size,
            vs.patch_size
        );
        if let Some(bad) = vs
            .intermediate_layers_indices
            .iter()
            .find(|&&i| i < 0 || i >= vs.num_layers)
        {
            bail!(
                "vision_config: intermediate layer {bad} is outside the {} layers",
                vs.num_layers
            );
        }
        let concat = vs.hidden_size * (1 + vs.intermediate_layers_indices.len() as i64);
        ensure!(
            concat == vs.vision_output_dim,
            "vision_config: vision_output_dim {} differs from hidden_size × (1 + intermediate layers) = {concat}",
            vs.vision_output_dim
        );
        Ok(MllamaConfig {
            text: TextConfig {
                decoder,
                cross_attention_layers: cross,
                rope_scaling,
                pad_token_id,
            },
            vision,
            image_token_id: int(
                root,
                "image_token_index",
                int(root, "image_token_id", 128256)?,
            )?,
        })
    }

    fn num_parameters(&self) -> u64 {
        let projector = linear_params(
            self.vision.vision_output_dim as u64,
            self.text.decoder.hidden_size as u64,
            true,
        );
        self.text.num_parameters() + self.vision.num_parameters() + projector
    }
}
