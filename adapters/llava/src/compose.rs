//! Build-your-own LLaVA (`[model] kind = "llava"`): a pretrained LLM (`LlamaForCausalLM`,
//! `MistralForCausalLM`, `Qwen2ForCausalLM`) and a pretrained vision tower (`CLIPVisionModel`
//! / `CLIPModel`, `ChineseCLIPVisionModel` / `ChineseCLIPModel`, `SiglipVisionModel` /
//! `SiglipModel`) joined by a new projector, the LLaVA paper's starting point for its two
//! training stages.
//!
//! [`compose`] writes a skeleton `LlavaForConditionalGeneration` directory (see
//! [`lmms_ft_core::compose`]): `config.json` with nested `text_config` / `vision_config`, the
//! LLM's tokenizer with `<image>` added, the image processor, the chat template, and the
//! manifest naming the two source directories. [`load`] fills the model from the sources
//! without copying them on disk; the trainer's save then writes a self-contained checkpoint
//! that `transformers` loads as is.
//!
//! # Choices (LLaVA-1.5 defaults)
//!
//! * `projector = "mlp2x_gelu"`: `linear_1 → GELU → linear_2`, transformers'
//!   `LlavaMultiModalProjector`. `"linear"` (LLaVA-1.0's single layer) has no format of its
//!   own in transformers, so it is saved as the same two layers with `projector_hidden_act =
//!   "linear"` (identity) and `linear_2` initialised to the identity: the same function
//!   class, starting as one linear layer, loadable anywhere.
//! * Projector weights start as transformers' `_init_weights` would make them: N(0,
//!   `initializer_range`) (the LLM's, 0.02 by default) with zero biases, drawn from torch's
//!   generator seeded with `train.seed`, so a run is reproducible.
//! * `vision_feature_layer = -2`; `vision_feature_select_strategy` `"default"` (drop CLIP's
//!   class token) for CLIP and Chinese-CLIP and `"full"` for SigLIP, which has no class token.
//! * `image_aspect_ratio = "pad"`: images are expanded to a square of the mean colour, as
//!   LLaVA-1.5 trained; written as a `LlavaImageProcessor` with `do_pad = true`, so
//!   `transformers` pads too. `"square"` keeps the tower's own processor (CLIP's center crop,
//!   SigLIP's square resize).
//! * `<image>` is added to the tokenizer as a special token unless it has one; if its id lies
//!   beyond the LLM's vocabulary, the embedding and `lm_head` grow to fit it. The new rows
//!   are set to the mean of the existing rows: transformers' `resize_token_embeddings`
//!   (`mean_resizing`) draws them from N(mean, 1e-9·covariance), i.e. the mean up to noise
//!   of order 1e-5 of the embeddings' spread, which this keeps deterministic.
//! * Chat template: LLaVA-1.5's (`USER: … ASSISTANT:`) for Llama / Mistral LLMs (trained
//!   with `</s>` ending each answer, see [`crate::family`]), LLaVA-Interleave's ChatML for
//!   Qwen2; `chat_template = "vicuna" | "chatml"` overrides.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use lmms_ft_core::compose::MANIFEST;
use lmms_ft_core::config::ModelSettings;
use lmms_ft_core::data::template::load_dir_tokenizer;
use lmms_ft_core::family::Trainable;
use lmms_ft_core::hf_json::{boolean, float, int};
use lmms_ft_core::nn::ParamInit;
use lmms_ft_core::register_composer;
use lmms_ft_core::weights::{checkpoint_files, load_into, load_into_renamed, LoadOptions};
use serde_json::{json, Map, Value};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::config::LlavaConfig;
use crate::family::IMAGE_PLACEHOLDER;
use crate::model::LlavaModel;

register_composer!(kind: "llava", settings: SETTINGS, compose: compose);

/// The `[model]` keys of `kind = "llava"` (see [`Settings`]).
const SETTINGS: &[&str] = &[
    "text_model",
    "vision_tower",
    "projector",
    "vision_feature_layer",
    "vision_feature_select_strategy",
    "image_aspect_ratio",
    "chat_template",
];

/// `[model]` of `kind = "llava"`; the core hands these keys over uninterpreted.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Directory of the LLM checkpoint to build on (e.g. a `LlamaForCausalLM`); its
    /// tokenizer becomes the model's.
    pub text_model: Option<PathBuf>,
    /// Directory of the vision encoder checkpoint (e.g. `CLIPVisionModel`, `SiglipModel`).
    pub vision_tower: Option<PathBuf>,
    /// Projector between the two: `"mlp2x_gelu"` (LLaVA-1.5, the default) or `"linear"`.
    pub projector: Option<String>,
    /// Vision hidden-state index whose features are projected (default -2, LLaVA-1.5's).
    pub vision_feature_layer: Option<i64>,
    /// `"default"` drops the class token (CLIP's default) or `"full"` keeps every token
    /// (SigLIP's default, since it has no class token).
    pub vision_feature_select_strategy: Option<String>,
    /// `"pad"` (LLaVA-1.5: expand to a square of the mean colour; the default) or
    /// `"square"` (the tower's own resize / center crop).
    pub image_aspect_ratio: Option<String>,
    /// `"vicuna"` (LLaVA-1.5's `USER: / ASSISTANT:`) or `"chatml"` (`<|im_start|>`,
    /// LLaVA-Interleave's); default by LLM: chatml for Qwen2, vicuna otherwise.
    pub chat_template: Option<String>,
}

/// LLaVA-1.5's Hub template (llava-hf/llava-1.5-7b-hf `chat_template.jinja`).
pub(crate) const VICUNA_TEMPLATE: &str = include_str!("compose_vicuna.jinja");
/// LLaVA-Interleave's Hub template (llava-hf/llava-interleave-qwen-7b-hf).
pub(crate) const CHATML_TEMPLATE: &str = include_str!("compose_chatml.jinja");

/// `architectures` entries of the LLMs the LLaVA text model can be built from.
const TEXT_ARCHITECTURES: &[&str] = &["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"];
const TEXT_MODEL_TYPES: &[&str] = &["llama", "mistral", "qwen2"];

#[allow(clippy::excessive_precision)]
const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
#[allow(clippy::excessive_precision)]
const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Projector {
    Mlp2xGelu,
    Linear,
}

impl Projector {
    fn parse(name: &str) -> Result<Projector> {
        match name {
            "mlp2x_gelu" => Ok(Projector::Mlp2xGelu),
            "linear" => Ok(Projector::Linear),
            other => bail!("model.projector `{other}` is not supported (mlp2x_gelu, linear)"),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Projector::Mlp2xGelu => "mlp2x_gelu",
            Projector::Linear => "linear",
        }
    }
}

pub(crate) fn read_json(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

pub(crate) fn read_json_opt(path: &Path) -> Result<Option<Value>> {
    if path.is_file() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

pub(crate) fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}

/// A source directory named by `key`, made absolute so the manifest stays valid wherever
/// the run is started from.
fn source_dir(dir: Option<&Path>, key: &str, what: &str) -> Result<PathBuf> {
    let dir = dir.with_context(|| {
        format!("model.kind = \"llava\" needs model.{key} = DIR ({what} checkpoint directory)")
    })?;
    ensure!(
        dir.is_dir(),
        "model.{key} {} is not a directory",
        dir.display()
    );
    let dir = std::fs::canonicalize(dir)
        .with_context(|| format!("resolving model.{key} {}", dir.display()))?;
    ensure!(
        dir.join("config.json").is_file(),
        "model.{key} {} has no config.json; is it a Hugging Face checkpoint directory?",
        dir.display()
    );
    checkpoint_files(&dir).with_context(|| format!("model.{key} {}", dir.display()))?;
    Ok(dir)
}

/// The LLM's config, refused unless it is one of the supported causal LMs.
pub(crate) fn text_config(dir: &Path) -> Result<Value> {
    let json = read_json(&dir.join("config.json"))?;
    let model_type = json.get("model_type").and_then(Value::as_str).unwrap_or("");
    let architectures: Vec<&str> = json
        .get("architectures")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let known_arch = architectures.iter().any(|a| TEXT_ARCHITECTURES.contains(a));
    ensure!(
        TEXT_MODEL_TYPES.contains(&model_type) && (architectures.is_empty() || known_arch),
        "model.text_model {}: model_type `{model_type}` / architectures {architectures:?} is not a supported LLM (supported: {})",
        dir.display(),
        TEXT_ARCHITECTURES.join(", ")
    );
    ensure!(
        json.get("vocab_size").and_then(Value::as_i64).is_some(),
        "model.text_model {}: config.json has no vocab_size",
        dir.display()
    );
    Ok(json)
}

/// The vision towers a LLaVA can be composed with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TowerKind {
    Clip,
    /// Chinese-CLIP's tower is CLIP's (same tensors, keys and defaults); it differs in its
    /// model type and its image processor's name.
    ChineseClip,
    Siglip,
}

impl TowerKind {
    fn siglip(self) -> bool {
        self == TowerKind::Siglip
    }

    /// The image processor transformers pairs with the tower when its directory names none.
    fn default_processor(self) -> &'static str {
        match self {
            TowerKind::Clip => "CLIPImageProcessor",
            TowerKind::ChineseClip => "ChineseCLIPImageProcessor",
            TowerKind::Siglip => "SiglipImageProcessor",
        }
    }
}

/// The vision tower's config as a `vision_config` entry (with its `model_type`), and its
/// kind. Full CLIP / Chinese-CLIP / SigLIP checkpoints contribute their `vision_config`.
pub(crate) fn vision_config(dir: &Path) -> Result<(Value, TowerKind)> {
    let json = read_json(&dir.join("config.json"))?;
    let model_type = json.get("model_type").and_then(Value::as_str).unwrap_or("");
    let (vision_type, tower, nested) = match model_type {
        "clip_vision_model" => ("clip_vision_model", TowerKind::Clip, false),
        "clip" => ("clip_vision_model", TowerKind::Clip, true),
        "chinese_clip_vision_model" => ("chinese_clip_vision_model", TowerKind::ChineseClip, false),
        "chinese_clip" => ("chinese_clip_vision_model", TowerKind::ChineseClip, true),
        "siglip_vision_model" => ("siglip_vision_model", TowerKind::Siglip, false),
        "siglip" => ("siglip_vision_model", TowerKind::Siglip, true),
        other => bail!(
            "model.vision_tower {}: model_type `{other}` is not a supported vision tower (CLIPVisionModel, CLIPModel, ChineseCLIPVisionModel, ChineseCLIPModel, SiglipVisionModel, SiglipModel)",
            dir.display()
        ),
    };
    let mut vision = if nested {
        json.get("vision_config")
            .filter(|v| v.is_object())
            .cloned()
            .unwrap_or_else(|| json!({}))
    } else {
        json.clone()
    };
    let obj = vision
        .as_object_mut()
        .context("vision config is not an object")?;
    obj.insert("model_type".into(), json!(vision_type));
    for key in ["architectures", "_name_or_path", "transformers_version"] {
        obj.remove(key);
    }
    Ok((vision, tower))
}

/// The id of the largest token in a `tokenizer.json`: model vocabulary (an object for
/// BPE / WordPiece / WordLevel, a list for Unigram) and added tokens.
fn largest_token_id(tok: &Value) -> Option<i64> {
    let vocab = tok.pointer("/model/vocab");
    let model_max = match vocab {
        Some(Value::Object(m)) => m.values().filter_map(Value::as_i64).max(),
        Some(Value::Array(a)) => (!a.is_empty()).then(|| a.len() as i64 - 1),
        _ => None,
    };
    let added_max = tok
        .get("added_tokens")
        .and_then(Value::as_array)
        .and_then(|a| a.iter().filter_map(|t| t.get("id")?.as_i64()).max());
    model_max.max(added_max)
}

/// Copies the LLM's tokenizer into `out` with `<image>` added as a special token (unless it
/// has one). Returns `<image>`'s id.
///
/// The file is written as the LLM's tokenizer behaves in `transformers`, not as its
/// `tokenizer.json` reads: for a `llava` directory transformers 5 takes `tokenizer.json`
/// literally, whereas for the Llama LLM it rebuilt the pre-tokenizer from
/// `tokenizer_config.json` (see [`load_dir_tokenizer`]); writing the rebuilt one keeps the
/// text tokenising as the LLM was trained (`<image>\n` → `<image>`, `\n`, not `▁`, `\n`).
pub(crate) fn write_tokenizer(text_dir: &Path, out: &Path) -> Result<i64> {
    let path = text_dir.join("tokenizer.json");
    ensure!(
        path.is_file(),
        "model.text_model {} has no tokenizer.json; the composed model needs the LLM's fast tokenizer (transformers' save_pretrained writes one)",
        text_dir.display()
    );
    let as_used = load_dir_tokenizer(text_dir)
        .with_context(|| format!("model.text_model {}", text_dir.display()))?
        .to_string(false)
        .map_err(|e| anyhow::anyhow!("serialising the tokenizer of {}: {e}", text_dir.display()))?;
    let mut tok: Value = serde_json::from_str(&as_used)?;
    let existing = tok
        .get("added_tokens")
        .and_then(Value::as_array)
        .and_then(|a| {
            a.iter()
                .find(|t| t.get("content").and_then(Value::as_str) == Some(IMAGE_PLACEHOLDER))
        })
        .and_then(|t| t.get("id").and_then(Value::as_i64));
    let token = json!({
        "content": IMAGE_PLACEHOLDER, "single_word": false, "lstrip": false, "rstrip": false,
        "normalized": false, "special": true,
    });
    let id = match existing {
        Some(id) => id,
        None => {
            let id = largest_token_id(&tok)
                .with_context(|| format!("{} has no vocabulary", path.display()))?
                + 1;
            let mut entry = token.clone();
            entry["id"] = json!(id);
            match tok.get_mut("added_tokens").and_then(Value::as_array_mut) {
                Some(list) => list.push(entry),
                None => tok["added_tokens"] = json!([entry]),
            }
            id
        }
    };
    write_json(&out.join("tokenizer.json"), &tok)?;

    let mut config = read_json_opt(&text_dir.join("tokenizer_config.json"))?
        .unwrap_or_else(|| json!({"tokenizer_class": "PreTrainedTokenizerFast"}));
    let obj = config
        .as_object_mut()
        .context("tokenizer_config.json is not an object")?;
    let decoder = obj
        .entry("added_tokens_decoder")
        .or_insert_with(|| json!({}));
    if let Some(map) = decoder.as_object_mut() {
        map.entry(id.to_string()).or_insert(token);
    }
    obj.insert(
        "extra_special_tokens".into(),
        json!({ "image_token": IMAGE_PLACEHOLDER }),
    );
    obj.insert("processor_class".into(), json!("LlavaProcessor"));
    // The composed model's template is chat_template.jinja; an LLM's own (text-only) one
    // must not shadow it.
    obj.remove("chat_template");
    write_json(&out.join("tokenizer_config.json"), &config)?;
    for name in ["special_tokens_map.json", "generation_config.json"] {
        let from = text_dir.join(name);
        if from.is_file() {
            std::fs::copy(&from, out.join(name))
                .with_context(|| format!("copying {}", from.display()))?;
        }
    }
    Ok(id)
}

/// `preprocessor_config.json` and `processor_config.json` for a `LlavaProcessor`: the
/// tower's own image settings (or transformers' defaults for it), with LLaVA's padding.
pub(crate) fn write_processor(
    vision_dir: &Path,
    out: &Path,
    vision: &Value,
    tower: TowerKind,
    pad: bool,
    strategy: &str,
) -> Result<()> {
    let siglip = tower.siglip();
    let source = match read_json_opt(&vision_dir.join("preprocessor_config.json"))? {
        Some(v) => v,
        None => read_json_opt(&vision_dir.join("processor_config.json"))?
            .and_then(|v| v.get("image_processor").cloned())
            .unwrap_or_else(|| json!({})),
    };
    let size = int(vision, "image_size", 224)?;
    let patch = int(vision, "patch_size", if siglip { 16 } else { 32 })?;
    let mut p = Map::new();
    if siglip {
        p.insert("size".into(), json!({"height": size, "width": size}));
        p.insert("do_center_crop".into(), json!(false));
        p.insert("image_mean".into(), json!([0.5, 0.5, 0.5]));
        p.insert("image_std".into(), json!([0.5, 0.5, 0.5]));
    } else {
        p.insert("size".into(), json!({"shortest_edge": size}));
        p.insert("crop_size".into(), json!({"height": size, "width": size}));
        p.insert("do_center_crop".into(), json!(true));
        p.insert("image_mean".into(), json!(OPENAI_CLIP_MEAN));
        p.insert("image_std".into(), json!(OPENAI_CLIP_STD));
    }
    p.insert("resample".into(), json!(3));
    for key in [
        "size",
        "crop_size",
        "do_center_crop",
        "image_mean",
        "image_std",
        "resample",
        "rescale_factor",
        "do_resize",
        "do_rescale",
        "do_normalize",
        "do_convert_rgb",
    ] {
        if let Some(v) = source.get(key).filter(|v| !v.is_null()) {
            p.insert(key.into(), v.clone());
        }
    }
    let own_type = source
        .get("image_processor_type")
        .and_then(Value::as_str)
        .unwrap_or(tower.default_processor());
    if pad {
        p.insert("image_processor_type".into(), json!("LlavaImageProcessor"));
        p.insert("do_pad".into(), json!(true));
    } else {
        p.insert("image_processor_type".into(), json!(own_type));
    }
    p.insert("processor_class".into(), json!("LlavaProcessor"));
    write_json(&out.join("preprocessor_config.json"), &Value::Object(p))?;
    write_json(
        &out.join("processor_config.json"),
        &json!({
            "processor_class": "LlavaProcessor",
            "image_token": IMAGE_PLACEHOLDER,
            "patch_size": patch,
            "vision_feature_select_strategy": strategy,
            // CLIP's class token comes out of the tower; SigLIP has none.
            "num_additional_image_tokens": if siglip { 0 } else { 1 },
        }),
    )
}

/// What a LLaVA skeleton directory is made of, besides its manifest.
pub(crate) struct SkeletonParts<'a> {
    /// The LLM's `config.json` (becomes `text_config`, with the vocabulary grown to fit
    /// `<image>`).
    pub text: &'a Value,
    /// Where the LLM's tokenizer is.
    pub text_dir: &'a Path,
    pub vision: &'a Value,
    pub vision_dir: &'a Path,
    pub tower: TowerKind,
    pub layer: i64,
    pub strategy: &'a str,
    /// `"pad"` or `"square"`.
    pub aspect: &'a str,
    pub projector_act: &'a str,
    pub template: &'a str,
}

/// Writes `config.json`, tokenizer (with `<image>`), processor and chat template of a
/// `LlavaForConditionalGeneration` into `dir`; returns the LLM's own vocabulary size.
pub(crate) fn write_skeleton(p: &SkeletonParts, dir: &Path) -> Result<i64> {
    let image_token_id = write_tokenizer(p.text_dir, dir)?;
    let source_vocab = p
        .text
        .get("vocab_size")
        .and_then(Value::as_i64)
        .context("text config without vocab_size")?;
    let vocab = source_vocab.max(image_token_id + 1);
    let mut text_config = p.text.clone();
    text_config["vocab_size"] = json!(vocab);
    let tie = boolean(p.text, "tie_word_embeddings", false)?;
    let siglip = p.tower.siglip();
    let image_size = int(p.vision, "image_size", 224)?;
    let patch = int(p.vision, "patch_size", 32)?;
    ensure!(
        patch > 0 && image_size % patch == 0,
        "the vision tower's image_size {image_size} is not a multiple of its patch_size {patch}"
    );
    let grid = image_size / patch;
    let tokens = grid * grid + i64::from(!siglip) - i64::from(p.strategy == "default");
    let config = json!({
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "text_config": text_config,
        "vision_config": p.vision,
        "image_token_index": image_token_id,
        "image_seq_length": tokens,
        "projector_hidden_act": p.projector_act,
        "multimodal_projector_bias": true,
        "vision_feature_layer": p.layer,
        "vision_feature_select_strategy": p.strategy,
        "image_aspect_ratio": p.aspect,
        "tie_word_embeddings": tie,
        "vocab_size": vocab,
    });
    write_json(&dir.join("config.json"), &config)?;
    write_processor(
        p.vision_dir,
        dir,
        p.vision,
        p.tower,
        p.aspect == "pad",
        p.strategy,
    )?;
    let path = dir.join("chat_template.jinja");
    std::fs::write(&path, p.template).with_context(|| format!("writing {}", path.display()))?;
    Ok(source_vocab)
}

/// Writes the skeleton of a LLaVA built from `model.text_model` and `model.vision_tower`
/// into `dir` (see the module doc for every default).
pub fn compose(settings: &ModelSettings, seed: u64, dir: &Path) -> Result<()> {
    let model: Settings = settings.parse()?;
    let text_dir = source_dir(model.text_model.as_deref(), "text_model", "an LLM")?;
    let vision_dir = source_dir(
        model.vision_tower.as_deref(),
        "vision_tower",
        "a vision tower",
    )?;
    let text = text_config(&text_dir)?;
    let (vision, tower) = vision_config(&vision_dir)?;
    let siglip = tower.siglip();
    let projector = Projector::parse(model.projector.as_deref().unwrap_or("mlp2x_gelu"))?;
    let layers = int(&vision, "num_hidden_layers", 12)?;
    let layer = model.vision_feature_layer.unwrap_or(-2);
    ensure!(
        (-(layers + 1)..=layers).contains(&layer),
        "model.vision_feature_layer = {layer} is outside the tower's hidden states (-{} ..= {layers}: the embeddings, then {layers} layers)",
        layers + 1
    );
    let strategy = model
        .vision_feature_select_strategy
        .as_deref()
        .unwrap_or(if siglip { "full" } else { "default" });
    ensure!(
        matches!(strategy, "default" | "full"),
        "model.vision_feature_select_strategy must be \"default\" or \"full\", got {strategy:?}"
    );
    let aspect = model.image_aspect_ratio.as_deref().unwrap_or("pad");
    ensure!(
        matches!(aspect, "pad" | "square"),
        "model.image_aspect_ratio must be \"pad\" or \"square\", got {aspect:?}"
    );
    let qwen = text.get("model_type").and_then(Value::as_str) == Some("qwen2");
    let template =
        match model
            .chat_template
            .as_deref()
            .unwrap_or(if qwen { "chatml" } else { "vicuna" })
        {
            "vicuna" => VICUNA_TEMPLATE,
            "chatml" => CHATML_TEMPLATE,
            other => bail!("model.chat_template must be \"vicuna\" or \"chatml\", got {other:?}"),
        };

    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let initializer_range = float(&text, "initializer_range", 0.02)?;
    let parts = SkeletonParts {
        text: &text,
        text_dir: &text_dir,
        vision: &vision,
        vision_dir: &vision_dir,
        tower,
        layer,
        strategy,
        aspect,
        projector_act: match projector {
            Projector::Mlp2xGelu => "gelu",
            Projector::Linear => "linear",
        },
        template,
    };
    let source_vocab = write_skeleton(&parts, dir)?;
    write_json(
        &dir.join(MANIFEST),
        &json!({
            "kind": "llava",
            "text_model": text_dir,
            "vision_tower": vision_dir,
            "source_vocab_size": source_vocab,
            "projector": projector.name(),
            "initializer_range": initializer_range,
            "seed": seed,
        }),
    )
}

/// A store whose variables are (views of) `vars` under new names, so the core's checked
/// loader can fill part of a model from a checkpoint with other names or a smaller
/// vocabulary: writes go straight into the model's tensors.
pub(crate) fn view_store(device: Device, views: Vec<(String, Tensor)>) -> Result<VarStore> {
    let vs = VarStore::new(device);
    {
        let mut vars = vs
            .variables_
            .lock()
            .map_err(|_| anyhow::anyhow!("variable store lock poisoned"))?;
        vars.named_variables.extend(views);
    }
    Ok(vs)
}

/// Fills the tower's variables (`vision_tower.*` of `vars`) from a vision checkpoint
/// directory, every tensor accounted for; `what` names the directory's origin in errors.
pub(crate) fn load_tower(
    vars: &HashMap<String, Tensor>,
    vision_dir: &Path,
    device: Device,
    what: &str,
) -> Result<()> {
    let vision_views = vars
        .iter()
        .filter_map(|(name, t)| {
            let rest = name.strip_prefix("vision_tower.")?;
            Some((rest.to_string(), t.shallow_clone()))
        })
        .collect();
    // transformers 4 (and full CLIP / SigLIP checkpoints) name the tower's tensors
    // `vision_model.*`; transformers 5 saves a `*VisionModel` without that prefix. A full
    // checkpoint also holds its text model and contrastive heads, which are left out.
    const OTHER_PARTS: &[&str] = &[
        "text_model.",
        "visual_projection.",
        "text_projection.",
        "logit_scale",
        "logit_bias",
    ];
    load_into_renamed(
        &view_store(device, vision_views)?,
        vision_dir,
        &LoadOptions {
            ignore_unexpected: &|name| !name.starts_with("vision_model."),
        },
        &|name| {
            if name.starts_with("vision_model.") || OTHER_PARTS.iter().any(|p| name.starts_with(p))
            {
                Cow::Borrowed(name)
            } else {
                Cow::Owned(format!("vision_model.{name}"))
            }
        },
    )
    .with_context(|| {
        format!(
            "loading the vision tower from {what} {}",
            vision_dir.display()
        )
    })
}

/// Whether a (llava-hf) variable is one of the two whose rows are the vocabulary.
pub(crate) fn is_vocab_matrix(name: &str) -> bool {
    name == "language_model.model.embed_tokens.weight" || name == "language_model.lm_head.weight"
}

/// Sets the rows `source_vocab..` of the embedding and `lm_head` (tokens the LLM did not
/// have, `<image>`) to the mean of the LLM's rows (see the module doc).
pub(crate) fn fill_new_rows(vars: &HashMap<String, Tensor>, source_vocab: i64, vocab: i64) {
    if vocab <= source_vocab {
        return;
    }
    tch::no_grad(|| {
        for (_, w) in vars.iter().filter(|(n, _)| is_vocab_matrix(n)) {
            let mean = w.narrow(0, 0, source_vocab).to_kind(Kind::Double).mean_dim(
                Some(&[0i64][..]),
                true,
                Kind::Double,
            );
            let rows = vocab - source_vocab;
            w.narrow(0, source_vocab, rows)
                .copy_(&mean.expand([rows, w.size()[1]], false));
        }
    });
}

/// Loads a skeleton: a composed model (the LLM and the tower from their source directories,
/// every tensor accounted for, as in any checkpoint load; new vocabulary rows at the mean of
/// the old ones; a freshly initialised projector), or an original-LLaVA checkpoint (see
/// [`crate::original`]).
pub fn load(config: &LlavaConfig, dir: &Path, device: Device, kind: Kind) -> Result<LlavaModel> {
    let manifest = read_json(&dir.join(MANIFEST))?;
    if manifest.get("kind").and_then(Value::as_str) == Some(crate::original::LAYOUT) {
        return crate::original::load(config, &dir.join(MANIFEST), &manifest, device, kind);
    }
    let field = |key: &str| {
        manifest
            .get(key)
            .with_context(|| format!("{}: no `{key}`", dir.join(MANIFEST).display()))
    };
    let text_dir = PathBuf::from(
        field("text_model")?
            .as_str()
            .context("text_model is not a path")?,
    );
    let vision_dir = PathBuf::from(
        field("vision_tower")?
            .as_str()
            .context("vision_tower is not a path")?,
    );
    let source_vocab = field("source_vocab_size")?
        .as_i64()
        .context("source_vocab_size is not an integer")?;
    let projector = Projector::parse(field("projector")?.as_str().unwrap_or(""))?;
    let std = field("initializer_range")?.as_f64().unwrap_or(0.02);
    let seed = field("seed")?.as_u64().unwrap_or(0);
    let vocab = config.text.decoder.vocab_size;
    ensure!(
        (1..=vocab).contains(&source_vocab),
        "the LLM's vocabulary of {source_vocab} does not fit the composed model's {vocab}"
    );

    let model = LlavaModel::new_in(config, device, ParamInit::Zeros, kind);
    let vs = Trainable::var_store(&model);
    let vars: HashMap<String, Tensor> = vs.variables();

    let text_views = vars
        .iter()
        .filter_map(|(name, t)| {
            let rest = name.strip_prefix("language_model.")?;
            let view = if is_vocab_matrix(name) {
                t.narrow(0, 0, source_vocab)
            } else {
                t.shallow_clone()
            };
            Some((rest.to_string(), view))
        })
        .collect();
    let tied = config.text.decoder.tie_word_embeddings;
    load_into(
        &view_store(device, text_views)?,
        &text_dir,
        &LoadOptions {
            ignore_unexpected: &|name| {
                (tied && name == "lm_head.weight") || name.ends_with("rotary_emb.inv_freq")
            },
        },
    )
    .with_context(|| {
        format!(
            "loading the LLM from model.text_model {}",
            text_dir.display()
        )
    })?;
    load_tower(&vars, &vision_dir, device, "model.vision_tower")?;
    fill_new_rows(&vars, source_vocab, vocab);

    tch::no_grad(|| -> Result<()> {
        tch::manual_seed(seed as i64);
        for (name, identity) in [
            ("multi_modal_projector.linear_1.weight", false),
            (
                "multi_modal_projector.linear_2.weight",
                projector == Projector::Linear,
            ),
        ] {
            let w = vars
                .get(name)
                .with_context(|| format!("the model has no {name}"))?;
            let init = if identity {
                Tensor::eye_m(w.size()[0], w.size()[1], (Kind::Float, device))
            } else {
                Tensor::randn(w.size(), (Kind::Float, Device::Cpu)) * std
            };
            w.shallow_clone().copy_(&init);
        }
        Ok(())
    })?;
    Ok(model)
}
