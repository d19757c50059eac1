//! Building a model from parts (`[model] kind = "..."` plus the composer's own settings)
//! instead of loading one checkpoint, e.g. joining a pretrained LLM and a pretrained vision
//! tower with a fresh projector.
//!
//! A composer is registered by an adapter crate under its `kind` and never named here; its
//! settings are the other `[model]` keys, which the core passes on uninterpreted
//! ([`ModelSettings`]), so a composer's options live in its crate alone. It writes a *skeleton* model directory: everything a checkpoint directory has (config,
//! tokenizer, processor, chat template) except the weights, plus [`MANIFEST`] naming the
//! source directories. The family's loader recognises the manifest and reads the weights
//! straight from the sources, so a 7B LLM is never copied on disk before training; the
//! trainer's final save then writes the complete standard checkpoint.

use std::path::Path;

use anyhow::Result;

use crate::config::ModelSettings;

/// File of a skeleton directory that names the weight sources. Files named `lmms-ft-*` are
/// run records, not model files, so outputs never inherit it (see
/// [`crate::peft::io::copy_model_files`]) and a trained output loads its own weights.
pub const MANIFEST: &str = "lmms-ft-compose.json";

/// Writes a skeleton model directory for the composer's `[model]` settings into `dir`
/// (created if needed); `seed` is recorded for the new parameters' initialisation. The
/// composer refuses settings it does not know ([`ModelSettings::parse`]).
pub type ComposeFn = fn(settings: &ModelSettings, seed: u64, dir: &Path) -> Result<()>;

/// One registered composer.
pub struct ComposerEntry {
    /// The `model.kind` value it answers to.
    pub kind: &'static str,
    /// The `[model]` keys it takes (its settings), for error messages and the boundary test.
    pub settings: &'static [&'static str],
    pub compose: ComposeFn,
    pub registered_by: &'static str,
}

inventory::collect!(ComposerEntry);

/// Registers a composer from an adapter crate:
/// `register_composer!(kind: "name", settings: &["key"], compose: f)`.
#[macro_export]
macro_rules! register_composer {
    (kind: $kind:expr, settings: $settings:expr, compose: $compose:expr $(,)?) => {
        $crate::inventory::submit! {
            $crate::compose::ComposerEntry {
                kind: $kind,
                settings: $settings,
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
/// (e.g. a research repository's own save format): `train` and `evaluate` given such a
/// directory write its skeleton and load that, converting the weights in memory, and
/// `lmms-ft convert NAME` writes it out as a standard checkpoint.
pub struct LayoutEntry {
    /// What `lmms-ft convert` calls it.
    pub name: &'static str,
    /// Whether a `config.json` is in this layout.
    pub detect: fn(&serde_json::Value) -> bool,
    /// The settings it takes: `[model]` keys for `train` / `evaluate`, and `convert` flags
    /// (`_` written `-`). Any other `[model]` key is refused before the layout is read.
    pub settings: &'static [&'static str],
    /// Writes a skeleton for the checkpoint `source` into `dir`, with the user's settings.
    pub skeleton: fn(source: &Path, settings: &ModelSettings, dir: &Path) -> Result<()>,
    pub registered_by: &'static str,
}

inventory::collect!(LayoutEntry);

/// Registers a layout:
/// `register_layout!(name: "name", detect: f, settings: &["key"], skeleton: g)`.
#[macro_export]
macro_rules! register_layout {
    (name: $name:expr, detect: $detect:expr, settings: $settings:expr, skeleton: $skeleton:expr $(,)?) => {
        $crate::inventory::submit! {
            $crate::compose::LayoutEntry {
                name: $name,
                detect: $detect,
                settings: $settings,
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

/// Every registered layout, by name.
pub fn layouts() -> Vec<&'static LayoutEntry> {
    let mut v: Vec<_> = inventory::iter::<LayoutEntry>.into_iter().collect();
    v.sort_by_key(|l| l.name);
    v
}

/// Every registered composer, by kind.
pub fn composers() -> Vec<&'static ComposerEntry> {
    let mut v: Vec<_> = inventory::iter::<ComposerEntry>.into_iter().collect();
    v.sort_by_key(|c| c.kind);
    v
}
