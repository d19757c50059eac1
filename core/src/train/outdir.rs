//! The output directory of a run, before training starts: a new run never writes over
//! another run's outputs or checkpoints unless told to (`train.overwrite`, which removes
//! them first, so no stale checkpoint can later be resumed into the new run), and a resumed
//! run starts from a checkpoint whose files are intact.
//!
//! Only files lmms-ft writes are recognised and removed (by name, plus the model files the
//! finished run recorded copying), so a directory that merely holds a model, or the user's
//! own files, is never emptied.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};

use super::{checkpoint, integrity, metrics};
use crate::config::Config;

/// The record of the files a finished run wrote into its output directory (besides those
/// recognised by name), so `--overwrite` can remove exactly them.
pub const OUTPUTS_FILE: &str = "lmms-ft-outputs.json";

/// Output names a run writes, besides checkpoints.
fn is_run_file(name: &str) -> bool {
    matches!(
        name,
        metrics::FILE
            | super::run::CONFIG_FILE
            | OUTPUTS_FILE
            | "loss.png"
            | "adapter_model.safetensors"
            | "adapter_config.json"
            | "model.safetensors"
            | "model.safetensors.index.json"
            | integrity::STALLED_MARKER
    ) || (name.starts_with("model-") && name.ends_with(".safetensors"))
}

fn is_checkpoint(name: &str) -> bool {
    name.strip_prefix("checkpoint-")
        .map(|s| s.strip_suffix(".tmp").unwrap_or(s))
        .is_some_and(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
}

/// What of another run `out` holds, as file names, sorted (checkpoints last).
fn previous_run(out: &Path) -> Result<Vec<String>> {
    let mut files = Vec::new();
    let mut checkpoints = Vec::new();
    let Ok(entries) = std::fs::read_dir(out) else {
        return Ok(files);
    };
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", out.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_checkpoint(&name) {
            checkpoints.push(name);
        } else if is_run_file(&name) {
            files.push(name);
        }
    }
    files.sort();
    checkpoints.sort_by_key(|n| {
        let digits: String = n.chars().filter(|c| c.is_ascii_digit()).collect();
        digits.parse::<u64>().unwrap_or(u64::MAX)
    });
    files.extend(checkpoints);
    Ok(files)
}

/// Whether the weights in `out` are lmms-ft's (it also wrote its config or metrics there),
/// not a model directory chosen as the output by mistake.
fn written_by_lmms_ft(found: &[String]) -> bool {
    found
        .iter()
        .any(|n| n == metrics::FILE || n == super::run::CONFIG_FILE || n == OUTPUTS_FILE)
        || found.iter().any(|n| is_checkpoint(n))
        || !found.iter().any(|n| n.ends_with(".safetensors"))
}

/// Removes a previous run's files from `out`: checkpoints, outputs, and the model files its
/// record lists.
fn remove_previous(out: &Path, found: &[String]) -> Result<()> {
    let record = out.join(OUTPUTS_FILE);
    let mut names: Vec<String> = found.to_vec();
    if record.is_file() {
        let listed: Vec<String> = std::fs::read_to_string(&record)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        // Plain names only: the record must not reach outside the directory.
        names.extend(
            listed
                .into_iter()
                .filter(|n| !n.contains('/') && !n.contains('\\') && n != ".." && n != "."),
        );
    }
    for name in names {
        let path = out.join(&name);
        let result = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else if path.exists() {
            std::fs::remove_file(&path)
        } else {
            Ok(())
        };
        result.with_context(|| format!("--overwrite: removing {}", path.display()))?;
    }
    Ok(())
}

/// Records the model files a finished run copied into its output directory.
pub fn record_outputs(out: &Path, copied: &[String]) -> Result<()> {
    let path = out.join(OUTPUTS_FILE);
    std::fs::write(&path, serde_json::to_string_pretty(copied)?)
        .with_context(|| format!("writing {}", path.display()))
}

/// What `found` (from [`previous_run`]) says about the run in `out`, for messages:
/// `adapter_model.safetensors, metrics.jsonl (6 steps), ...; checkpoints 2, 4, 6`.
fn summary(out: &Path, found: &[String]) -> String {
    let (checkpoints, files): (Vec<&String>, Vec<&String>) =
        found.iter().partition(|n| is_checkpoint(n));
    let mut parts: Vec<String> = files
        .iter()
        .filter(|n| n.as_str() != OUTPUTS_FILE)
        .map(|n| {
            if n.as_str() == metrics::FILE {
                let steps = metrics::read_rows(&out.join(metrics::FILE))
                    .map(|rows| rows.iter().filter(|r| r.get("loss").is_some()).count())
                    .unwrap_or(0);
                format!("{n} ({steps} logged steps)")
            } else {
                n.to_string()
            }
        })
        .collect();
    if !checkpoints.is_empty() {
        let names: Vec<&str> = checkpoints.iter().map(|s| s.as_str()).collect();
        let shown = if names.len() <= 6 {
            names.join(", ")
        } else {
            format!(
                "{}, ... {} ({} in all)",
                names[..2].join(", "),
                names[names.len() - 2..].join(", "),
                names.len()
            )
        };
        parts.push(shown);
    }
    parts.join(", ")
}

/// What [`prepare`] decided about the output directory.
#[derive(Debug)]
pub struct Prepared {
    /// The checkpoint to resume from.
    pub resume: Option<PathBuf>,
    out: PathBuf,
    /// The previous run's files `--overwrite` removes, once the new run is ready to start.
    previous: Vec<String>,
}

impl Prepared {
    /// Removes what [`prepare`] found to remove and creates the directory. Called just
    /// before the first step, so a run that fails to start (bad data, a model that does
    /// not load) leaves the previous run as it was.
    pub fn clear(&self) -> Result<()> {
        let out = &self.out;
        if !self.previous.is_empty() {
            let what = summary(out, &self.previous);
            remove_previous(out, &self.previous)?;
            tracing::warn!(
                "--overwrite: removed the previous run from {} ({what})",
                out.display()
            );
        }
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))
    }
}

/// Checks `cfg.train.output_dir` for a run on the model in `model_dir` and picks the
/// checkpoint to resume from, if any; nothing is removed yet (see [`Prepared::clear`]). A
/// new run refuses a directory holding another run's outputs unless `train.overwrite`;
/// `resume = "latest"` takes the newest intact checkpoint, saying which damaged ones it
/// passed over; an explicit checkpoint directory must be intact.
pub fn prepare(cfg: &Config, model_dir: &Path) -> Result<Prepared> {
    let out = &cfg.train.output_dir;
    let resume = cfg.train.resume.as_deref().filter(|r| !r.is_empty());
    ensure!(
        !(cfg.train.overwrite && resume.is_some()),
        "--overwrite starts a new run and --resume continues one; pass only one"
    );
    if let (Ok(a), Ok(b)) = (std::fs::canonicalize(out), std::fs::canonicalize(model_dir)) {
        ensure!(
            a != b,
            "the output directory {} is the model directory; choose another --output-dir",
            out.display()
        );
    }
    let found = previous_run(out)?;
    let resumed = match resume {
        None => None,
        Some("latest") => {
            let (dir, damaged) = checkpoint::latest_intact(out)?;
            for d in &damaged {
                tracing::warn!("passing over a damaged checkpoint: {d}");
            }
            match (&dir, damaged.is_empty()) {
                (Some(dir), false) => tracing::warn!(
                    "resuming from {}, the newest intact checkpoint",
                    dir.display()
                ),
                (None, false) => bail!(
                    "cannot resume: every checkpoint in {} is damaged ({}); start a new run with --overwrite",
                    out.display(),
                    damaged.join("; ")
                ),
                (None, true) if !found.is_empty() => bail!(
                    "cannot resume: {} holds no checkpoint, only the outputs of a run ({}); \
                     pass --overwrite to start a new run there, or choose another --output-dir",
                    out.display(),
                    summary(out, &found)
                ),
                (None, true) => {
                    tracing::info!("no checkpoint in {}; starting fresh", out.display())
                }
                (Some(_), true) => {}
            }
            dir
        }
        Some(dir) => {
            let dir = PathBuf::from(dir);
            ensure!(
                dir.join("trainer_state.json").is_file(),
                "cannot resume from {}: it is not a checkpoint directory (no trainer_state.json)",
                dir.display()
            );
            integrity::verify(&dir)
                .with_context(|| format!("cannot resume from {}", dir.display()))?;
            Some(dir)
        }
    };
    if resume.is_none() && !found.is_empty() {
        if !cfg.train.overwrite {
            bail!(
                "{} already holds another run: {}; pass --overwrite to replace it (its files, \
                 checkpoints included, are removed first), --resume to continue it, or choose \
                 another --output-dir",
                out.display(),
                summary(out, &found)
            );
        }
        ensure!(
            written_by_lmms_ft(&found),
            "{} holds model weights lmms-ft did not write ({}); --overwrite only removes a \
             previous lmms-ft run; choose another --output-dir",
            out.display(),
            summary(out, &found)
        );
        return Ok(Prepared {
            resume: None,
            out: out.clone(),
            previous: found,
        });
    }
    if resume.is_some() {
        // A save cut short by a kill leaves its `.tmp`; it is never resumed from.
        for name in found.iter().filter(|n| n.ends_with(".tmp")) {
            let path = out.join(name);
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("removing the partial {}", path.display()))?;
            tracing::info!(
                "removed {}, left by a save that did not finish",
                path.display()
            );
        }
        let marker = out.join(integrity::STALLED_MARKER);
        if marker.exists() {
            let _ = std::fs::remove_file(marker);
        }
    }
    Ok(Prepared {
        resume: resumed,
        out: out.clone(),
        previous: Vec::new(),
    })
}
