//! What a run is, recorded in each of its checkpoints so `--resume` can tell whether a
//! checkpoint belongs to the run at hand: the base model (where it came from and a
//! fingerprint of its `config.json` and weight layout), the family, the trainable
//! parameters, the dataset and the resolved configuration.
//!
//! A checkpoint of another model or another set of trainable tensors is refused: its
//! weights and optimiser moments would be loaded into the wrong places, or, when the shapes
//! happen to agree, into a model they were never trained with. A changed dataset or
//! hyper-parameter is the user's call (lowering the learning rate mid-run is common), so it
//! is only reported, key by key.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::Trainer;
use crate::config::Config;
use crate::data::batch::sampler::SamplerState;

/// Config keys that say how this invocation starts, not what the run is.
const INVOCATION_KEYS: [&str; 2] = ["train.resume", "train.overwrite"];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelIdentity {
    /// The Hub id the user asked for (`model.id`), if any.
    pub id: Option<String>,
    /// The directory the weights were read from.
    pub path: String,
    /// SHA-256 of `config.json`.
    pub config_sha256: String,
    /// SHA-256 over the weight files' names and safetensors headers (every tensor's name,
    /// dtype, shape and offsets) and `model.safetensors.index.json`; `None` for a composed
    /// model whose directory holds no weights.
    pub weights_sha256: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetIdentity {
    pub path: String,
    pub bytes: u64,
    /// Records left after screening.
    pub records: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunIdentity {
    pub model: ModelIdentity,
    pub family: String,
    /// Every trainable tensor as (name, shape, dtype), in the trainer's order.
    pub trainable: Vec<(String, Vec<i64>, String)>,
    pub dataset: DatasetIdentity,
    /// The resolved configuration.
    pub config: serde_json::Value,
}

fn sha256_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(hex(&Sha256::digest(&bytes)))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Largest safetensors header read for the fingerprint (the format's own limit).
const MAX_HEADER: u64 = 100_000_000;

/// Fingerprint of a model directory's weight layout without reading the weights: the
/// safetensors headers are a few kilobytes even for a 7B model.
fn weights_fingerprint(dir: &Path) -> Result<Option<String>> {
    let files = match crate::weights::checkpoint_files(dir) {
        Ok(files) => files,
        Err(_) => return Ok(None),
    };
    let mut hasher = Sha256::new();
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        hasher
            .update(std::fs::read(&index).with_context(|| format!("reading {}", index.display()))?);
    }
    for file in files {
        let name = file.file_name().map(|n| n.to_string_lossy().into_owned());
        hasher.update(name.unwrap_or_default().as_bytes());
        let mut f =
            std::fs::File::open(&file).with_context(|| format!("opening {}", file.display()))?;
        let mut len = [0u8; 8];
        f.read_exact(&mut len)
            .with_context(|| format!("{}: no safetensors header", file.display()))?;
        let n = u64::from_le_bytes(len);
        if n > MAX_HEADER {
            bail!(
                "{}: its safetensors header claims {n} bytes (at most {MAX_HEADER} allowed)",
                file.display()
            );
        }
        let mut header = Vec::new();
        f.take(n)
            .read_to_end(&mut header)
            .with_context(|| format!("reading the header of {}", file.display()))?;
        hasher.update(len);
        hasher.update(&header);
    }
    Ok(Some(hex(&hasher.finalize())))
}

impl RunIdentity {
    /// The identity of the run `cfg` describes, training `trainer`'s parameters on the
    /// model in `model_dir` with `records` usable samples of `dataset`.
    pub fn new(
        cfg: &Config,
        model_dir: &Path,
        trainer: &Trainer,
        dataset: &Path,
        records: usize,
    ) -> Result<RunIdentity> {
        let config_path = model_dir.join("config.json");
        let config_json: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(&config_path)
                .with_context(|| format!("reading {}", config_path.display()))?,
        )
        .with_context(|| format!("parsing {}", config_path.display()))?;
        let family = crate::registry::family_for_config(&config_json)
            .map(|f| f.name.to_string())
            .unwrap_or_else(|_| "unknown".into());
        let path = std::fs::canonicalize(model_dir).unwrap_or_else(|_| model_dir.to_path_buf());
        let data_path = std::fs::canonicalize(dataset).unwrap_or_else(|_| dataset.to_path_buf());
        Ok(RunIdentity {
            model: ModelIdentity {
                id: cfg.model.id.clone(),
                path: path.display().to_string(),
                config_sha256: sha256_file(&config_path)?,
                weights_sha256: weights_fingerprint(model_dir)?,
            },
            family,
            trainable: trainer
                .params
                .iter()
                .map(|p| {
                    (
                        p.name.clone(),
                        p.tensor.size(),
                        format!("{:?}", p.tensor.kind()),
                    )
                })
                .collect(),
            dataset: DatasetIdentity {
                path: data_path.display().to_string(),
                bytes: std::fs::metadata(dataset)
                    .with_context(|| format!("reading {}", dataset.display()))?
                    .len(),
                records: records as u64,
            },
            config: serde_json::to_value(cfg).context("recording the resolved config")?,
        })
    }

    /// Checks that the checkpoint whose identity is `stored` belongs to this run: an error
    /// when its model, family or trainable layout differs; otherwise what changed in the
    /// dataset or configuration, one line per key, for the caller to report.
    pub fn check(&self, stored: &RunIdentity, dir: &Path) -> Result<Vec<String>> {
        let d = dir.display();
        let start_new = "start a new run instead (--overwrite, or another --output-dir)";
        if stored.family != self.family {
            bail!(
                "cannot resume from {d}: it was written for a {} base model, this run trains a {} model; {start_new}",
                stored.family,
                self.family
            );
        }
        let (a, b) = (&stored.model, &self.model);
        if a.config_sha256 != b.config_sha256
            || a.weights_sha256 != b.weights_sha256
            || (a.id.is_some() && b.id.is_some() && a.id != b.id)
        {
            bail!(
                "cannot resume from {d}: it was written for the base model {} and this run trains {} \
                 (their config.json or weights differ); resume with the same base model, or {start_new}",
                describe_model(a),
                describe_model(b)
            );
        }
        if stored.trainable != self.trainable {
            bail!(
                "cannot resume from {d}: it trains other parameters than this run ({}); \
                 resume with the same training settings (mode, parts, lora.*), or {start_new}",
                layout_diff(&stored.trainable, &self.trainable)
            );
        }
        let mut changes = Vec::new();
        if a.path != b.path {
            changes.push(format!(
                "model path: {} → {} (same config and weights)",
                a.path, b.path
            ));
        }
        let (x, y) = (&stored.dataset, &self.dataset);
        for (what, old, new) in [
            ("dataset path", x.path.clone(), y.path.clone()),
            (
                "dataset size",
                format!("{} bytes", x.bytes),
                format!("{} bytes", y.bytes),
            ),
            (
                "dataset records",
                x.records.to_string(),
                y.records.to_string(),
            ),
        ] {
            if old != new {
                changes.push(format!("{what}: {old} → {new}"));
            }
        }
        let (old, new) = (flatten(&stored.config), flatten(&self.config));
        let keys: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
        for key in keys {
            if INVOCATION_KEYS.contains(&key.as_str()) {
                continue;
            }
            let (o, n) = (old.get(key), new.get(key));
            if o != n {
                let show = |v: Option<&serde_json::Value>| {
                    v.map_or("(unset)".to_string(), |v| v.to_string())
                };
                changes.push(format!("{key}: {} → {}", show(o), show(n)));
            }
        }
        Ok(changes)
    }
}

fn describe_model(m: &ModelIdentity) -> String {
    let short = |h: &str| h.chars().take(12).collect::<String>();
    match &m.id {
        Some(id) => format!("{id} ({}, config {})", m.path, short(&m.config_sha256)),
        None => format!("{} (config {})", m.path, short(&m.config_sha256)),
    }
}

/// The first few tensors only one layout has, or whose shape or dtype differs.
fn layout_diff(old: &[(String, Vec<i64>, String)], new: &[(String, Vec<i64>, String)]) -> String {
    let o: BTreeMap<&String, (&Vec<i64>, &String)> =
        old.iter().map(|(n, s, k)| (n, (s, k))).collect();
    let n: BTreeMap<&String, (&Vec<i64>, &String)> =
        new.iter().map(|(n, s, k)| (n, (s, k))).collect();
    let mut parts = Vec::new();
    let missing: Vec<&str> = o
        .keys()
        .filter(|k| !n.contains_key(*k))
        .map(|k| k.as_str())
        .collect();
    let added: Vec<&str> = n
        .keys()
        .filter(|k| !o.contains_key(*k))
        .map(|k| k.as_str())
        .collect();
    let some = |v: &[&str]| v.iter().take(3).copied().collect::<Vec<_>>().join(", ");
    if !missing.is_empty() {
        parts.push(format!(
            "{} tensor(s) only in the checkpoint, e.g. {}",
            missing.len(),
            some(&missing)
        ));
    }
    if !added.is_empty() {
        parts.push(format!(
            "{} tensor(s) only in this run, e.g. {}",
            added.len(),
            some(&added)
        ));
    }
    for (name, (shape, kind)) in &o {
        if let Some((s, k)) = n.get(name) {
            if (s, k) != (shape, kind) {
                parts.push(format!(
                    "{name} is {kind} {shape:?} in the checkpoint, {k} {s:?} here"
                ));
                break;
            }
        }
    }
    if parts.is_empty() {
        parts.push("the same tensors in another order".into());
    }
    parts.join("; ")
}

/// `{"train": {"learning_rate": 1e-4}}` → `{"train.learning_rate": 1e-4}`.
fn flatten(v: &serde_json::Value) -> BTreeMap<String, serde_json::Value> {
    fn walk(prefix: &str, v: &serde_json::Value, out: &mut BTreeMap<String, serde_json::Value>) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            other => {
                out.insert(prefix.to_string(), other.clone());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk("", v, &mut out);
    out
}

/// What a run records in each checkpoint besides the weights and the optimizer state: where
/// the data stood, the shape of an epoch then, and which run wrote it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResumeState {
    /// The sampler's epoch and the batches of it already consumed.
    pub epoch: u64,
    pub consumed: usize,
    /// Batches per epoch and samples when the checkpoint was written.
    pub batches_per_epoch: usize,
    pub num_samples: usize,
    /// Absent from checkpoints written before run identities were recorded.
    #[serde(default)]
    pub identity: Option<RunIdentity>,
}

impl ResumeState {
    /// Reads the record of the checkpoint `dir`.
    pub fn read(dir: &Path) -> Result<ResumeState> {
        let state = super::checkpoint::read_state(dir)?;
        serde_json::from_value(state["extra"].clone()).with_context(|| {
            format!(
                "{}: the checkpoint's record of the run (data position, identity) is missing or damaged",
                dir.display()
            )
        })
    }

    /// Checks the stored identity against this run's, logging what changed; a checkpoint
    /// written before identities were recorded is accepted with a warning.
    pub fn check_identity(&self, dir: &Path, current: &RunIdentity) -> Result<()> {
        let Some(stored) = &self.identity else {
            tracing::warn!(
                "{} records no run identity (an older lmms-ft wrote it); cannot check that it belongs to this model and data",
                dir.display()
            );
            return Ok(());
        };
        let changes = current.check(stored, dir)?;
        if !changes.is_empty() {
            tracing::warn!(
                "resuming from {} with settings that differ from the run that wrote it: {}",
                dir.display(),
                changes.join("; ")
            );
        }
        Ok(())
    }

    /// Where in the data a resumed run starts: the stored sampler position when the data and
    /// batch size give the same batches per epoch (an exact resume), else the same epoch at
    /// the same fraction of it, with a warning that the batches differ from the original
    /// run's.
    pub fn position(
        &self,
        batches_per_epoch: usize,
        num_records: usize,
        dir: &Path,
    ) -> SamplerState {
        let (epoch, consumed) = (self.epoch, self.consumed);
        let (stored_batches, stored_samples) = (self.batches_per_epoch, self.num_samples);
        if stored_batches == batches_per_epoch && stored_samples == num_records {
            return SamplerState { epoch, consumed };
        }
        let mapped = (consumed as u128 * batches_per_epoch as u128 / stored_batches.max(1) as u128)
            .min(batches_per_epoch.saturating_sub(1) as u128) as usize;
        tracing::warn!(
            "{} was written for {stored_samples} samples in {stored_batches} batches per epoch, this run has \
             {num_records} in {batches_per_epoch}: continuing epoch {epoch} at batch {mapped} (was {consumed}); \
             the batches from here differ from those the original run would have seen",
            dir.display()
        );
        SamplerState {
            epoch,
            consumed: mapped,
        }
    }
}
