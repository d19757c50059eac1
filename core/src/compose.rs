//! Building a model from parts (`[model] kind = "llava"`, `text_model`, `vision_tower`, ...)
//! instead of loading one checkpoint: the LLaVA paper's recipe of joining a pretrained LLM
//! and a pretrained vision tower with a fresh projector.
//!
//! A composer is registered by an adapter crate under its `kind` and never named here. It
//! writes a *skeleton* model directory: everything a checkpoint directory has (config,
//! tokenizer, processor, chat template) except the weights, plus [`MANIFEST`] naming the
//! source directories. The family's loader recognises the manifest and reads the weights
//! straight from the sources, so a 7B LLM is never copied on disk before training; the
//! trainer's final save then writes the complete standard checkpoint.

use std::path::Path;

use anyhow::Result;

use crate::config::ModelSection;

/// File of a skeleton directory that names the weight sources. Files named `lmms-ft-*` are
/// run records, not model files, so outputs never inherit it (see
/// [`crate::peft::io::copy_model_files`]) and a trained output loads its own weights.
pub const MANIFEST: &str = "lmms-ft-compose.json";

/// Writes a skeleton model directory for `[model]` into `dir` (created if needed); `seed`
/// is recorded for the new parameters' initialisation.
pub type ComposeFn = fn(model: &ModelSection, seed: u64, dir: &Path) -> Result<()>;

/// One registered composer.
pub struct ComposerEntry {
    /// The `model.kind` value it answers to.
    pub kind: &'static str,
    pub compose: ComposeFn,
    pub registered_by: &'static str,
}

inventory::collect!(ComposerEntry);

/// Registers a composer from an adapter crate: `register_composer!(kind: "llava", compose: f)`.
#[macro_export]
macro_rules! register_composer {
    (kind: $kind:expr, compose: $compose:expr $(,)?) => {
        $crate::inventory::submit! {
            $crate::compose::ComposerEntry {
                kind: $kind,
                compose: $compose,
                registered_by: module_path!(),
            }
        }
    };
}

/// The composer registered for `kind`, or an error listing the known kinds.
pub fn composer(kind: &str) -> Result<&'static ComposerEntry> {
    let mut known: Vec<&str> = inventory::iter::<ComposerEntry>
        .into_iter()
        .map(|c| c.kind)
        .collect();
    known.sort_unstable();
    inventory::iter::<ComposerEntry>
        .into_iter()
        .find(|c| c.kind == kind)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "model.kind `{kind}` is not a known model kind to compose; known kinds: {}",
                if known.is_empty() {
                    "(none linked)".to_string()
                } else {
                    known.join(", ")
                }
            )
        })
}

/// Whether `dir` is a skeleton whose weights live in other directories.
pub fn is_skeleton(dir: &Path) -> bool {
    dir.join(MANIFEST).is_file()
}

/// A checkpoint layout other than `transformers`' that an adapter reads through a skeleton
/// (the original LLaVA repository's `LlavaLlamaForCausalLM` directories): `train` and
/// `evaluate` given such a directory write its skeleton and load that, converting the
/// weights in memory, and `lmms-ft convert NAME` writes it out as a standard checkpoint.
pub struct LayoutEntry {
    /// What `lmms-ft convert` calls it (`llava-original`).
    pub name: &'static str,
    /// Whether a `config.json` is in this layout.
    pub detect: fn(&serde_json::Value) -> bool,
    /// Writes a skeleton for the checkpoint `source` into `dir`; `vision_tower` is a tower
    /// directory the user named (`model.vision_tower`, `--vision-tower`), if any.
    pub skeleton: fn(source: &Path, vision_tower: Option<&Path>, dir: &Path) -> Result<()>,
    pub registered_by: &'static str,
}

inventory::collect!(LayoutEntry);

/// Registers a layout: `register_layout!(name: "llava-original", detect: f, skeleton: g)`.
#[macro_export]
macro_rules! register_layout {
    (name: $name:expr, detect: $detect:expr, skeleton: $skeleton:expr $(,)?) => {
        $crate::inventory::submit! {
            $crate::compose::LayoutEntry {
                name: $name,
                detect: $detect,
                skeleton: $skeleton,
                registered_by: module_path!(),
            }
        }
    };
}

/// The registered layout a `config.json` is in, if any.
pub fn layout_of(config: &serde_json::Value) -> Option<&'static LayoutEntry> {
    inventory::iter::<LayoutEntry>
        .into_iter()
        .find(|l| (l.detect)(config))
}

/// The layout registered as `name`, or an error listing the known ones.
pub fn layout(name: &str) -> Result<&'static LayoutEntry> {
    let mut known: Vec<&str> = inventory::iter::<LayoutEntry>
        .into_iter()
        .map(|l| l.name)
        .collect();
    known.sort_unstable();
    inventory::iter::<LayoutEntry>
        .into_iter()
        .find(|l| l.name == name)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "`{name}` is not a known checkpoint layout to convert; known layouts: {}",
                known.join(", ")
            )
        })
}
