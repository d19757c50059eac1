//! A composite model's `text_config` (Llama / Vicuna, Mistral, Qwen2) turned into a
//! [`DecoderConfig`], with `transformers`' per-`model_type` defaults for absent keys: Hub
//! configs often give only the keys that differ (llava-1.5's `text_config` names three).

use anyhow::{bail, Result};
use serde_json::Value;

use crate::decoder::DecoderConfig;
use crate::vit::{boolean, float, int, string};

/// Which decoder the text config describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextModelType {
    Llama,
    Mistral,
    Qwen2,
}

/// A parsed text model: the decoder sizes plus what the decoder itself does not model.
#[derive(Debug, Clone, PartialEq)]
pub struct TextModel {
    pub model_type: TextModelType,
    pub decoder: DecoderConfig,
    /// Sliding-window attention width when the config enables it. The shared decoder has
    /// only full causal attention, which equals sliding-window attention for sequences no
    /// longer than the window; callers must refuse longer ones.
    pub sliding_window: Option<i64>,
}

/// The rope θ, from `rope_parameters` (transformers 5), `rope_theta` (4.x) or the default;
/// scaled rope variants are refused rather than silently computed as plain rope.
fn rope_theta(text: &Value, default: f64) -> Result<f64> {
    for key in ["rope_parameters", "rope_scaling"] {
        if let Some(r) = text.get(key).filter(|v| v.is_object()) {
            let kind = r
                .get("rope_type")
                .or_else(|| r.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("default");
            if kind != "default" {
                bail!("text_config.{key}: rope type `{kind}` is not supported (only plain rope)");
            }
            if let Some(theta) = r.get("rope_theta").and_then(Value::as_f64) {
                return Ok(theta);
            }
        }
    }
    float(text, "rope_theta", default)
}

/// Parses a `text_config` object. `tie_default` is the enclosing config's
/// `tie_word_embeddings`, which `transformers` ORs with the text config's own.
pub fn parse_text_config(text: &Value, tie_default: bool) -> Result<TextModel> {
    let model_type = match string(text, "model_type", "llama")? {
        "llama" => TextModelType::Llama,
        "mistral" => TextModelType::Mistral,
        "qwen2" => TextModelType::Qwen2,
        other => bail!("text_config.model_type `{other}` is not supported (llama, mistral, qwen2)"),
    };
    // transformers' LlamaConfig / MistralConfig / Qwen2Config defaults.
    let (vocab, inter, kv_default) = match model_type {
        TextModelType::Llama => (32000, 11008, None),
        TextModelType::Mistral => (32000, 14336, Some(8)),
        TextModelType::Qwen2 => (151936, 22016, None),
    };
    let hidden = int(text, "hidden_size", 4096)?;
    let heads = int(text, "num_attention_heads", 32)?;
    if heads <= 0 || hidden % heads != 0 && text.get("head_dim").is_none_or(Value::is_null) {
        bail!("text_config: hidden_size {hidden} is not a multiple of num_attention_heads {heads}");
    }
    let kv = int(text, "num_key_value_heads", kv_default.unwrap_or(heads))?;
    if kv <= 0 || heads % kv != 0 {
        bail!("text_config: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}");
    }
    let (qkv_bias, o_bias) = match model_type {
        TextModelType::Llama => {
            if boolean(text, "mlp_bias", false)? {
                bail!("text_config: Llama `mlp_bias = true` is not supported");
            }
            let b = boolean(text, "attention_bias", false)?;
            (b, b)
        }
        TextModelType::Mistral => (false, false),
        TextModelType::Qwen2 => (true, false),
    };
    let sliding_window = match model_type {
        TextModelType::Llama => None,
        TextModelType::Mistral => match text.get("sliding_window") {
            None => Some(4096),
            Some(Value::Null) => None,
            Some(_) => Some(int(text, "sliding_window", 4096)?),
        },
        TextModelType::Qwen2 => {
            if boolean(text, "use_sliding_window", false)? {
                Some(int(text, "sliding_window", 4096)?)
            } else {
                None
            }
        }
    };
    let tie = tie_default || boolean(text, "tie_word_embeddings", false)?;
    Ok(TextModel {
        model_type,
        decoder: DecoderConfig {
            vocab_size: int(text, "vocab_size", vocab)?,
            hidden_size: hidden,
            intermediate_size: int(text, "intermediate_size", inter)?,
            num_layers: int(text, "num_hidden_layers", 32)?,
            num_heads: heads,
            num_kv_heads: kv,
            head_dim: int(text, "head_dim", hidden / heads)?,
            rms_norm_eps: float(text, "rms_norm_eps", 1e-6)?,
            rope_theta: rope_theta(text, 10000.0)?,
            qkv_bias,
            o_bias,
            tie_word_embeddings: tie,
        },
        sliding_window,
    })
}
