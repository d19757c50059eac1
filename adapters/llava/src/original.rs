//! Checkpoints of the original LLaVA repository (haotian-liu/LLaVA, the `liuhaotian/llava-v1.5-*`
//! Hub repositories and what its training scripts save): one `LlavaLlamaForCausalLM` (or
//! `LlavaMistralForCausalLM`) directory whose `config.json` is the LLM's with LLaVA's keys
//! added (`mm_vision_tower`, `mm_vision_select_layer`, `mm_vision_select_feature`,
//! `mm_projector_type`, `mm_patch_merge_type`, `image_aspect_ratio`, ...), and whose weights
//! are the LLM's plus `model.mm_projector.*`. The vision tower is not in it: it is named by
//! Hub id (`openai/clip-vit-large-patch14-336`) and loaded from its own directory, unless
//! the tower was trained too (`unfreeze_mm_vision_tower`), in which case its tensors are in
//! the checkpoint as `model.vision_tower.vision_tower.*`.
//!
//! Such a directory is read through a skeleton, like a composed model (see
//! [`crate::compose`]): [`skeleton`] writes the llava-hf `config.json`, the tokenizer with
//! `<image>` added, the tower's processor (LLaVA's `pad` as a `LlavaImageProcessor` with
//! `do_pad`) and the Vicuna (`v1`) template, and [`load`] fills the model from the original
//! files through [`KEY_MAP`]. `train` / `evaluate` do this in memory; `lmms-ft convert
//! llava-original` saves the result as a standard directory.
//!
//! # Name mapping (original → llava-hf Hub names)
//!
//! | original                                        | llava-hf                           |
//! |-------------------------------------------------|------------------------------------|
//! | `model.mm_projector.0.{weight,bias}`            | `multi_modal_projector.linear_1.*` |
//! | `model.mm_projector.2.{weight,bias}`            | `multi_modal_projector.linear_2.*` |
//! | `model.vision_tower.vision_tower.vision_model.*`| `vision_tower.vision_model.*`      |
//! | `model.*` (embeddings, layers, norm)            | `language_model.model.*`           |
//! | `lm_head.weight`                                | `language_model.lm_head.weight`    |
//! | `model.image_newline` (LLaVA-NeXT)              | `image_newline`                    |
//!
//! (`mm_projector.1` is the GELU, which has no tensors.) The same table names the modules of
//! PEFT adapters trained on the original repository (`LlavaModel::legacy_names`). Config keys: `mm_vision_select_layer`
//! → `vision_feature_layer`; `mm_vision_select_feature` `"patch"` → strategy `"default"`,
//! `"cls_patch"` → `"full"`; `image_aspect_ratio` `"pad"` / `"square"` kept. LLaVA-NeXT
//! settings (`anyres`, `mm_patch_merge_type = "spatial_unpad"`), `mm_use_im_start_end`,
//! `mm_use_im_patch_token` and projectors other than `mlp2x_gelu` are refused by name.
//!
//! `<image>` is added to the tokenizer (the original lacks it: LLaVA splices features in at a
//! sentinel id, -200), and its embedding and `lm_head` rows start at the mean of the LLM's
//! rows, as in composing (transformers' `convert_llava_weights_to_hf` does the same, plus
//! noise and a `<pad>` row). The embedding row never reaches the model, whose `<image>`
//! positions carry image features; the `lm_head` row is one more class in the output
//! distribution, which training teaches never to predict.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use lmms_ft_core::compose::MANIFEST;
use lmms_ft_core::config::ModelSettings;
use lmms_ft_core::family::Trainable;
use lmms_ft_core::hf_json::{int, string};
use lmms_ft_core::hub::{resolve_model_dir, CacheEnv};
use lmms_ft_core::nn::ParamInit;
use lmms_ft_core::register_layout;
use lmms_ft_core::weights::{checkpoint_files, checkpoint_tensor_names, load_into, LoadOptions};
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

use crate::compose::{
    fill_new_rows, is_vocab_matrix, load_tower, read_json, view_store, vision_config, write_json,
    write_skeleton, SkeletonParts, CHATML_TEMPLATE, VICUNA_TEMPLATE,
};
use crate::config::LlavaConfig;
use crate::model::LlavaModel;

/// The layout's name (`lmms-ft convert llava-original`) and its skeleton manifest `kind`.
pub const LAYOUT: &str = "llava-original";

register_layout!(name: LAYOUT, detect: is_original, settings: &["vision_tower"], skeleton: skeleton);

/// The layout's one setting: the tower directory (`model.vision_tower`, `--vision-tower`).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    vision_tower: Option<PathBuf>,
}

/// Original tensor-name prefix → llava-hf prefix; the first matching entry applies (see the
/// module doc). Both directions use this one table.
pub const KEY_MAP: &[(&str, &str)] = &[
    ("model.mm_projector.0.", "multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "multi_modal_projector.linear_2."),
    (
        "model.vision_tower.vision_tower.vision_model.",
        "vision_tower.vision_model.",
    ),
    // LLaVA-NeXT's (not converted here, but adapters trained on it name it so).
    ("model.image_newline", "image_newline"),
    ("model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
];

/// The original LLaVA's model classes and the text model each wraps.
const ARCHITECTURES: &[(&str, &str)] = &[
    ("LlavaLlamaForCausalLM", "llama"),
    ("LlavaMistralForCausalLM", "mistral"),
    ("LlavaQwen2ForCausalLM", "qwen2"),
];

/// Config keys of the original LLaVA that are not the LLM's.
const LLAVA_KEYS: &[&str] = &[
    "image_aspect_ratio",
    "image_grid_pinpoints",
    "freeze_mm_mlp_adapter",
    "freeze_mm_vision_resampler",
    "tune_mm_mlp_adapter",
    "tune_mm_vision_resampler",
    "unfreeze_mm_vision_tower",
    "use_mm_proj",
    "tokenizer_model_max_length",
    "tokenizer_padding_side",
    "_name_or_path",
    "transformers_version",
];

/// The llava-hf name of an original tensor name, if the layout has one. Inside the projector
/// and tower namespaces only the exact entries map (`model.mm_projector.1.*` is not a
/// layer), so a name there never falls through to the LLM's `model.` rule.
pub fn hf_name(original: &str) -> Option<String> {
    if original.starts_with("model.mm_projector.")
        && !KEY_MAP[..2].iter().any(|(o, _)| original.starts_with(o))
    {
        return None;
    }
    if original.starts_with("model.vision_tower.") && !original.starts_with(KEY_MAP[2].0) {
        return None;
    }
    KEY_MAP
        .iter()
        .find_map(|(o, h)| original.strip_prefix(o).map(|rest| format!("{h}{rest}")))
}

/// The original name of a llava-hf tensor name (the table read backwards).
pub fn original_name(hf: &str) -> Option<String> {
    KEY_MAP
        .iter()
        .find_map(|(o, h)| hf.strip_prefix(h).map(|rest| format!("{o}{rest}")))
}

fn architectures(config: &Value) -> Vec<&str> {
    config
        .get("architectures")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// Whether a `config.json` is the original LLaVA's: one of its model classes, or LLaVA's
/// `mm_vision_tower` key on a config without llava-hf's nested `text_config`.
pub fn is_original(config: &Value) -> bool {
    let known = architectures(config)
        .iter()
        .any(|a| ARCHITECTURES.iter().any(|(name, _)| name == a));
    known || (config.get("mm_vision_tower").is_some() && config.get("text_config").is_none())
}

/// The tower directory: the one the user named, else `mm_vision_tower` as a local directory
/// or a Hub id in the Hugging Face cache.
fn tower_dir(config: &Value, named: Option<&Path>, source: &Path) -> Result<PathBuf> {
    if let Some(dir) = named {
        ensure!(
            dir.is_dir(),
            "vision tower {} is not a directory",
            dir.display()
        );
        return Ok(dir.to_path_buf());
    }
    let id = config
        .get("mm_vision_tower")
        .or_else(|| config.get("vision_tower"))
        .and_then(Value::as_str)
        .with_context(|| {
            format!(
                "{}: config.json has no mm_vision_tower; name the tower with model.vision_tower = DIR (--vision-tower DIR for convert)",
                source.display()
            )
        })?;
    if Path::new(id).is_dir() {
        return Ok(PathBuf::from(id));
    }
    resolve_model_dir(id, None, &CacheEnv::from_process()).with_context(|| {
        format!(
            "{}: its vision tower `{id}` (mm_vision_tower) is not in the Hugging Face cache; download it, or name its directory with model.vision_tower = DIR (--vision-tower DIR for convert)",
            source.display()
        )
    })
}

/// Refuses the original settings this conversion does not reproduce, by key.
fn check_supported(config: &Value, path: &Path) -> Result<()> {
    let at = || path.display();
    let projector = string(config, "mm_projector_type", "linear")?;
    ensure!(
        projector == "mlp2x_gelu",
        "{}: mm_projector_type `{projector}` is not supported (mlp2x_gelu, LLaVA-1.5's)",
        at()
    );
    let merge = string(config, "mm_patch_merge_type", "flat")?;
    ensure!(
        merge == "flat",
        "{}: mm_patch_merge_type `{merge}` (LLaVA-NeXT's anyres) is not supported; only LLaVA-1.5's `flat`",
        at()
    );
    for key in ["mm_use_im_start_end", "mm_use_im_patch_token"] {
        if config.get(key).and_then(Value::as_bool) == Some(true) {
            bail!(
                "{}: {key} = true (extra image marker tokens) is not supported; LLaVA-1.5 sets it false",
                at()
            );
        }
    }
    Ok(())
}

/// Writes the skeleton for the original checkpoint `source` into `dir` (see the module doc).
pub fn skeleton(source: &Path, settings: &ModelSettings, dir: &Path) -> Result<()> {
    let Settings { vision_tower } = settings.parse()?;
    let named_tower = vision_tower.as_deref();
    let config_path = source.join("config.json");
    let config = read_json(&config_path)?;
    ensure!(
        is_original(&config),
        "{} is not an original LLaVA config (architectures {:?})",
        config_path.display(),
        architectures(&config)
    );
    let text_type = architectures(&config)
        .iter()
        .find_map(|a| ARCHITECTURES.iter().find(|(n, _)| n == a).map(|(_, t)| *t))
        .with_context(|| {
            format!(
                "{}: architectures {:?} is not one of the original LLaVA's ({})",
                config_path.display(),
                architectures(&config),
                ARCHITECTURES
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
    check_supported(&config, &config_path)?;
    if let Err(e) = checkpoint_files(source) {
        let has_bin = std::fs::read_dir(source)
            .map(|d| {
                d.filter_map(|e| e.ok()).any(|e| {
                    e.path()
                        .extension()
                        .is_some_and(|x| x == "bin" || x == "pth")
                })
            })
            .unwrap_or(false);
        if has_bin {
            bail!("{e:#}; the checkpoint is in PyTorch pickle files (pytorch_model*.bin), which lmms-ft does not read: save it as safetensors first (transformers: `LlamaForCausalLM.from_pretrained(DIR).save_pretrained(DIR)` keeps every tensor name)");
        }
        return Err(e);
    }
    ensure!(
        source.join("tokenizer.json").is_file(),
        "{} has no tokenizer.json (the original repositories ship only tokenizer.model); write one with `python -c \"from transformers import AutoTokenizer as T; T.from_pretrained('{}').save_pretrained('{}')\"`",
        source.display(),
        source.display(),
        source.display()
    );
    let aspect = string(&config, "image_aspect_ratio", "square")?;
    ensure!(
        matches!(aspect, "pad" | "square"),
        "{}: image_aspect_ratio `{aspect}` is not supported (pad, square)",
        config_path.display()
    );
    let strategy = match string(&config, "mm_vision_select_feature", "patch")? {
        "patch" => "default",
        "cls_patch" => "full",
        other => bail!(
            "{}: mm_vision_select_feature `{other}` is not supported (patch, cls_patch)",
            config_path.display()
        ),
    };
    let layer = int(&config, "mm_vision_select_layer", -1)?;

    let tower_dir = tower_dir(&config, named_tower, source)?;
    let tower_dir = std::fs::canonicalize(&tower_dir)
        .with_context(|| format!("resolving {}", tower_dir.display()))?;
    let (vision, tower) = vision_config(&tower_dir)?;
    let hidden = int(&vision, "hidden_size", 768)?;
    if let Some(mm_hidden) = config.get("mm_hidden_size").and_then(Value::as_i64) {
        ensure!(
            mm_hidden == hidden,
            "{}: mm_hidden_size {mm_hidden} differs from the vision tower's hidden_size {hidden} ({}); is it the tower this checkpoint was trained with?",
            config_path.display(),
            tower_dir.display()
        );
    }
    let layers = int(&vision, "num_hidden_layers", 12)?;
    ensure!(
        (-(layers + 1)..=layers).contains(&layer),
        "{}: mm_vision_select_layer {layer} is outside the tower's {layers} layers",
        config_path.display()
    );

    let mut text = config.clone();
    let obj = text
        .as_object_mut()
        .context("config.json is not an object")?;
    obj.retain(|k, _| !k.starts_with("mm_") && !LLAVA_KEYS.contains(&k.as_str()));
    obj.remove("vision_tower");
    obj.insert("model_type".into(), json!(text_type));
    obj.insert(
        "architectures".into(),
        json!([format!(
            "{}ForCausalLM",
            match text_type {
                "llama" => "Llama",
                "mistral" => "Mistral",
                _ => "Qwen2",
            }
        )]),
    );

    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let parts = SkeletonParts {
        text: &text,
        text_dir: source,
        vision: &vision,
        vision_dir: &tower_dir,
        tower,
        layer,
        strategy,
        aspect,
        projector_act: "gelu",
        // The original `v1` conversation template is Vicuna's; Qwen2 LLMs get ChatML.
        template: if text_type == "qwen2" {
            CHATML_TEMPLATE
        } else {
            VICUNA_TEMPLATE
        },
    };
    let source_vocab = write_skeleton(&parts, dir)?;
    let names = checkpoint_tensor_names(source)?;
    let tower_in_checkpoint = names.iter().any(|n| n.starts_with(KEY_MAP[2].0));
    let source =
        std::fs::canonicalize(source).with_context(|| format!("resolving {}", source.display()))?;
    write_json(
        &dir.join(MANIFEST),
        &json!({
            "kind": LAYOUT,
            "checkpoint": source,
            "vision_tower": tower_dir,
            "source_vocab_size": source_vocab,
            "tower_in_checkpoint": tower_in_checkpoint,
        }),
    )
}

/// Loads an original checkpoint through its skeleton's `manifest` (at `manifest_path`).
pub fn load(
    config: &LlavaConfig,
    manifest_path: &Path,
    manifest: &Value,
    device: Device,
    kind: Kind,
) -> Result<LlavaModel> {
    let field = |key: &str| {
        manifest
            .get(key)
            .with_context(|| format!("{}: no `{key}`", manifest_path.display()))
    };
    let path = |key: &str| -> Result<PathBuf> {
        Ok(PathBuf::from(field(key)?.as_str().with_context(|| {
            format!("{}: `{key}` is not a path", manifest_path.display())
        })?))
    };
    let checkpoint = path("checkpoint")?;
    let tower_dir = path("vision_tower")?;
    let source_vocab = field("source_vocab_size")?
        .as_i64()
        .context("source_vocab_size is not an integer")?;
    let tower_in_checkpoint = field("tower_in_checkpoint")?.as_bool().unwrap_or(false);
    let vocab = config.text.decoder.vocab_size;
    ensure!(
        (1..=vocab).contains(&source_vocab),
        "the checkpoint's vocabulary of {source_vocab} does not fit the model's {vocab}"
    );

    let model = LlavaModel::new(config, device, ParamInit::Zeros);
    let vs = Trainable::var_store(&model);
    vs.root().set_kind(kind);
    let vars: HashMap<String, Tensor> = vs.variables();
    let mut views = Vec::new();
    for (name, t) in &vars {
        if name.starts_with("vision_tower.") && !tower_in_checkpoint {
            continue;
        }
        let original = original_name(name)
            .with_context(|| format!("the LLaVA variable {name} has no original name"))?;
        let view = if is_vocab_matrix(name) {
            t.narrow(0, 0, source_vocab)
        } else {
            t.shallow_clone()
        };
        views.push((original, view));
    }
    let names = checkpoint_tensor_names(&checkpoint)?;
    let foreign: Vec<&String> = names
        .iter()
        .filter(|n| hf_name(n).is_none() && !n.ends_with("rotary_emb.inv_freq"))
        .collect();
    ensure!(
        foreign.is_empty(),
        "original LLaVA checkpoint {}: tensor(s) {} are not in the original layout (model.*, lm_head.*, model.mm_projector.{{0,2}}.*, model.vision_tower.vision_tower.vision_model.*)",
        checkpoint.display(),
        foreign.iter().take(5).map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
    );
    let tied = config.text.decoder.tie_word_embeddings;
    load_into(
        &view_store(device, views)?,
        &checkpoint,
        &LoadOptions {
            ignore_unexpected: &|name| {
                (tied && name == "lm_head.weight") || name.ends_with("rotary_emb.inv_freq")
            },
        },
    )
    .with_context(|| {
        format!(
            "loading the original LLaVA checkpoint {} (names mapped as lmms_ft_llava::original::KEY_MAP documents)",
            checkpoint.display()
        )
    })?;
    if !tower_in_checkpoint {
        load_tower(&vars, &tower_dir, device, "the vision tower directory")?;
    }
    fill_new_rows(&vars, source_vocab, vocab);
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::{hf_name, original_name};

    /// Hand-written pairs from the original LLaVA's module names and llava-hf's; the table
    /// maps each way and refuses names outside the layout.
    #[test]
    fn names_map_both_ways() {
        let pairs = [
            (
                "model.mm_projector.0.weight",
                "multi_modal_projector.linear_1.weight",
            ),
            (
                "model.mm_projector.2.bias",
                "multi_modal_projector.linear_2.bias",
            ),
            (
                "model.vision_tower.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
                "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
            ),
            (
                "model.layers.3.self_attn.q_proj.weight",
                "language_model.model.layers.3.self_attn.q_proj.weight",
            ),
            (
                "model.embed_tokens.weight",
                "language_model.model.embed_tokens.weight",
            ),
            ("model.norm.weight", "language_model.model.norm.weight"),
            ("model.image_newline", "image_newline"),
            ("lm_head.weight", "language_model.lm_head.weight"),
        ];
        for (original, hf) in pairs {
            assert_eq!(hf_name(original).as_deref(), Some(hf), "{original}");
            assert_eq!(original_name(hf).as_deref(), Some(original), "{hf}");
        }
        for foreign in [
            "model.mm_projector.1.weight",
            "model.vision_tower.foo",
            "vision_model.x",
        ] {
            assert_eq!(hf_name(foreign), None, "{foreign}");
        }
    }
}
