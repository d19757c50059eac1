//! The model registry: adapter crates announce their families and model ids here at link
//! time with [`inventory::submit!`], so the core never names a family. The binary links every
//! adapter crate; whatever it links is what `lmms-ft list-models` shows.

use serde::Serialize;

use crate::family::DynFamily;

/// Training modes a family can support (`train.mode`). The trainer refuses a mode a family
/// does not list ([`FamilyEntry::check_mode`]).
pub use crate::config::Mode as TrainMode;

/// How far a family's adapter is. `list-models` prints this verbatim so users are never
/// misled about what works.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// Registered so the id resolves and configs validate, but no model code exists yet.
    Planned,
    /// Model, processor and template exist and match `transformers` on the fixtures.
    Implemented,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Status::Planned => "planned",
            Status::Implemented => "implemented",
        })
    }
}

/// A model family: one adapter crate serves one or more families.
pub struct FamilyEntry {
    /// Short family name, e.g. `qwen2-vl`; model entries refer to it.
    pub name: &'static str,
    /// `config.json` `architectures` values this family loads.
    pub architectures: &'static [&'static str],
    /// `config.json` `model_type` values this family loads.
    pub model_types: &'static [&'static str],
    pub modes: &'static [TrainMode],
    pub status: Status,
    /// Module path of the registering crate (`module_path!()`); shows provenance.
    pub registered_by: &'static str,
    /// The implementation, present once `status` is `Implemented`.
    pub implementation: Option<&'static dyn DynFamily>,
}

/// One user-facing model id.
pub struct ModelEntry {
    /// Canonical id, e.g. `qwen2-vl-7b-instruct`.
    pub id: &'static str,
    /// Extra names that resolve to this id, e.g. `qwen2-vl-7b`.
    pub aliases: &'static [&'static str],
    /// Hugging Face Hub repository, e.g. `Qwen/Qwen2-VL-7B-Instruct`.
    pub hub_id: &'static str,
    /// Name of the [`FamilyEntry`] that implements it.
    pub family: &'static str,
    /// Whether this checkpoint was trained to take video (not just several images).
    pub video: bool,
    pub registered_by: &'static str,
}

/// A family's tiny model for the `lmms-ft demo` quickstart, which trains it from random
/// weights on generated pictures: the family writes the checkpoint, the demo owns the task.
pub struct DemoEntry {
    /// The family it builds; the demo's output directories are named after it.
    pub name: &'static str,
    /// Writes a complete checkpoint directory (config, tokenizer, template, processor config,
    /// random weights from `seed`) whose tokenizer has each of `words` as one token and
    /// whose processor takes `side` × `side` images without resizing.
    pub write_model:
        fn(dir: &std::path::Path, words: &[&str], side: u32, seed: u64) -> anyhow::Result<()>,
    pub registered_by: &'static str,
}

inventory::collect!(FamilyEntry);
inventory::collect!(ModelEntry);
inventory::collect!(DemoEntry);

/// Registers a demo model: `register_demo!(name: "family", write_model: f)`.
#[macro_export]
macro_rules! register_demo {
    (name: $name:expr, write_model: $write:expr $(,)?) => {
        $crate::inventory::submit! {
            $crate::registry::DemoEntry { name: $name, write_model: $write, registered_by: module_path!() }
        }
    };
}

/// Every registered demo model, by name.
pub fn demos() -> Vec<&'static DemoEntry> {
    let mut v: Vec<_> = inventory::iter::<DemoEntry>.into_iter().collect();
    v.sort_by_key(|d| d.name);
    v
}

/// Registers a family from an adapter crate. Provenance is filled in automatically.
#[macro_export]
macro_rules! register_family {
    ($($field:ident : $value:expr),* $(,)?) => {
        $crate::inventory::submit! {
            $crate::registry::FamilyEntry { $($field: $value,)* registered_by: module_path!() }
        }
    };
}

/// Registers model ids from an adapter crate:
/// `register_models!("family", [(id, hub_id, [aliases], video), ...])`.
#[macro_export]
macro_rules! register_models {
    ($family:expr, [$(($id:expr, $hub:expr, [$($alias:expr),* $(,)?], $video:expr)),* $(,)?]) => {
        $(
            $crate::inventory::submit! {
                $crate::registry::ModelEntry {
                    id: $id,
                    aliases: &[$($alias),*],
                    hub_id: $hub,
                    family: $family,
                    video: $video,
                    registered_by: module_path!(),
                }
            }
        )*
    };
}

/// Every registered family, sorted by name.
pub fn families() -> Vec<&'static FamilyEntry> {
    let mut v: Vec<_> = inventory::iter::<FamilyEntry>.into_iter().collect();
    v.sort_by_key(|f| f.name);
    v
}

/// Every registered model, in family then id order.
pub fn models() -> Vec<&'static ModelEntry> {
    let mut v: Vec<_> = inventory::iter::<ModelEntry>.into_iter().collect();
    v.sort_by(|a, b| (a.family, a.id).cmp(&(b.family, b.id)));
    v
}

impl FamilyEntry {
    /// Refuses a `train.mode` the family does not list, or any mode when it has no
    /// implementation.
    pub fn check_mode(&self, mode: TrainMode) -> Result<(), RegistryError> {
        if self.implementation.is_some() && self.modes.contains(&mode) {
            return Ok(());
        }
        Err(RegistryError::UnsupportedMode {
            family: self.name.to_string(),
            mode,
            supported: self.supported_modes(),
        })
    }

    /// The modes it can train with: none before it is implemented, whatever it lists.
    pub fn supported_modes(&self) -> &'static [TrainMode] {
        if self.implementation.is_some() {
            self.modes
        } else {
            &[]
        }
    }
}

pub fn family(name: &str) -> Option<&'static FamilyEntry> {
    inventory::iter::<FamilyEntry>
        .into_iter()
        .find(|f| f.name == name)
}

/// Errors of registry look-ups.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("unknown model id '{id}'{hint}")]
    UnknownModel { id: String, hint: String },
    #[error("no registered family accepts config.json with model_type '{model_type}' / architectures {architectures:?}; known model_types: {known}")]
    UnknownArchitecture {
        model_type: String,
        architectures: Vec<String>,
        known: String,
    },
    #[error("the {family} family does not train with train.mode = \"{}\"; it supports: {}", mode.name(), if supported.is_empty() { "none (not implemented)".to_string() } else { supported.iter().map(|m| m.name()).collect::<Vec<_>>().join(", ") })]
    UnsupportedMode {
        family: String,
        mode: TrainMode,
        supported: &'static [TrainMode],
    },
    #[error("family '{family}' of model '{id}' is registered as {status}: its adapter is not implemented yet")]
    NotImplemented {
        id: String,
        family: String,
        status: Status,
    },
}

/// Resolves an id, an alias or a Hub repo id (case-insensitive) to its model entry.
pub fn resolve_model(name: &str) -> Result<&'static ModelEntry, RegistryError> {
    let all = models();
    let lower = name.to_ascii_lowercase();
    if let Some(m) = all.iter().find(|m| {
        m.id == lower
            || m.aliases.iter().any(|a| *a == lower)
            || m.hub_id.eq_ignore_ascii_case(name)
    }) {
        return Ok(m);
    }
    let close: Vec<&str> = all
        .iter()
        .map(|m| m.id)
        .filter(|id| id.contains(&lower) || lower.contains(id.split('-').next().unwrap_or(id)))
        .take(6)
        .collect();
    let hint = if close.is_empty() {
        "; run `lmms-ft list-models` to see the supported ids".to_string()
    } else {
        format!("; did you mean one of: {}?", close.join(", "))
    };
    Err(RegistryError::UnknownModel {
        id: name.to_string(),
        hint,
    })
}

/// Finds the family that accepts a `config.json`, by `model_type` first, then `architectures`.
pub fn family_for_config(
    config: &serde_json::Value,
) -> Result<&'static FamilyEntry, RegistryError> {
    let model_type = config
        .get("model_type")
        .and_then(|v| v.as_str())
        .unwrap_or("")
        .to_string();
    let architectures: Vec<String> = config
        .get("architectures")
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let fams = families();
    fams.iter()
        .find(|f| f.model_types.contains(&model_type.as_str()))
        .or_else(|| {
            fams.iter().find(|f| {
                architectures
                    .iter()
                    .any(|a| f.architectures.contains(&a.as_str()))
            })
        })
        .copied()
        .ok_or_else(|| RegistryError::UnknownArchitecture {
            model_type,
            architectures,
            known: fams
                .iter()
                .flat_map(|f| f.model_types.iter().copied())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// The implementation behind a model entry, or a clear error if its family is only planned.
pub fn implementation(model: &ModelEntry) -> Result<&'static dyn DynFamily, RegistryError> {
    let fam = family(model.family);
    match fam.and_then(|f| f.implementation) {
        Some(i) => Ok(i),
        None => Err(RegistryError::NotImplemented {
            id: model.id.to_string(),
            family: model.family.to_string(),
            status: fam.map(|f| f.status).unwrap_or(Status::Planned),
        }),
    }
}

/// Row of `list-models --json`.
#[derive(Debug, Serialize)]
pub struct ModelRow {
    pub id: &'static str,
    pub hub_id: &'static str,
    pub family: &'static str,
    pub aliases: &'static [&'static str],
    pub status: Status,
    /// The modes it trains with now (none while planned).
    pub modes: &'static [TrainMode],
    pub video: bool,
    pub registered_by: &'static str,
}

/// The table `list-models` prints: every model joined with its family.
pub fn model_table() -> Vec<ModelRow> {
    models()
        .into_iter()
        .map(|m| {
            let f = family(m.family);
            ModelRow {
                id: m.id,
                hub_id: m.hub_id,
                family: m.family,
                aliases: m.aliases,
                status: f.map(|f| f.status).unwrap_or(Status::Planned),
                modes: f.map(|f| f.supported_modes()).unwrap_or(&[]),
                video: m.video,
                registered_by: m.registered_by,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unimplemented_family_trains_in_no_mode() {
        let entry = FamilyEntry {
            name: "toy",
            architectures: &[],
            model_types: &[],
            modes: &[TrainMode::Full, TrainMode::Lora],
            status: Status::Implemented,
            registered_by: "test",
            implementation: None,
        };
        // Without an implementation nothing trains, whatever the entry lists.
        let err = entry.check_mode(TrainMode::Full).unwrap_err().to_string();
        assert!(err.contains("none (not implemented)"), "{err}");
        assert!(entry.supported_modes().is_empty());
    }

    #[test]
    fn core_alone_registers_nothing() {
        // Families come only from adapter crates; core's own test binary links none.
        assert!(families().is_empty());
        assert!(models().is_empty());
        assert!(matches!(
            resolve_model("some-model-7b"),
            Err(RegistryError::UnknownModel { .. })
        ));
    }
}
