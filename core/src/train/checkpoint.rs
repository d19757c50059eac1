//! Checkpoints `OUT/checkpoint-<step>/`: trainable weights, AdamW moments and step counts,
//! the optimiser step (which fixes the schedule and, through per-step seeding, the RNG) and
//! the caller's data position. LoRA runs also get the adapter in PEFT layout, so any
//! checkpoint loads in `peft` as it is.
//!
//! A checkpoint is written into `checkpoint-<step>.tmp`, its files synced and listed with
//! their sizes and checksums in a manifest (see [`super::integrity`]), then renamed into
//! place, so a run killed mid-write leaves either the previous set of checkpoints or the
//! complete new one, and a checkpoint damaged later is recognised before it is used.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::json;
use tch::Tensor;

use super::optim::State;
use super::{integrity, Trainer};
use crate::family::Trainable;
use crate::peft::io::{read_safetensors, save_adapter, write_safetensors, Blob};

const STATE_FILE: &str = "trainer_state.json";
const TENSORS_FILE: &str = "trainer_state.safetensors";

/// Complete checkpoints under `out`, oldest first, as (step, path).
pub fn list(out: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(out) else {
        return Ok(found);
    };
    for entry in entries {
        let path = entry
            .with_context(|| format!("listing {}", out.display()))?
            .path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if let Some(step) = name
            .strip_prefix("checkpoint-")
            .and_then(|s| s.parse::<u64>().ok())
        {
            if path.join(STATE_FILE).is_file() {
                found.push((step, path));
            }
        }
    }
    found.sort();
    Ok(found)
}

/// The newest complete checkpoint, for `resume = "latest"`.
pub fn latest(out: &Path) -> Result<Option<PathBuf>> {
    Ok(list(out)?.pop().map(|(_, p)| p))
}

/// The newest checkpoint under `out` whose files match its manifest, with a message for
/// every newer one passed over because it is damaged (naming the file), for `resume =
/// "latest"`.
pub fn latest_intact(out: &Path) -> Result<(Option<PathBuf>, Vec<String>)> {
    let mut skipped = Vec::new();
    for (_, dir) in list(out)?.into_iter().rev() {
        match integrity::verify(&dir) {
            Ok(_) => return Ok((Some(dir), skipped)),
            Err(e) => skipped.push(format!("{}: {e:#}", dir.display())),
        }
    }
    Ok((None, skipped))
}

/// The `trainer_state.json` of a checkpoint, parsed.
pub fn read_state(dir: &Path) -> Result<serde_json::Value> {
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&state_path)
        .with_context(|| format!("reading {}", state_path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", state_path.display()))
}

/// Bytes a checkpoint of `trainer` takes, for the message of a save that ran out of space:
/// every trainable tensor and its two AdamW moments, again in the adapter file for LoRA.
fn estimated_bytes(trainer: &Trainer) -> u64 {
    let bytes = |t: &Tensor| (t.numel() * t.kind().elt_size_in_bytes()) as u64;
    let params: u64 = trainer.params.iter().map(|p| bytes(&p.tensor)).sum();
    let moments: u64 = trainer
        .optimizer
        .states
        .iter()
        .flatten()
        .map(|s| bytes(&s.exp_avg) + bytes(&s.exp_avg_sq))
        .sum();
    let adapter = if trainer.options.lora.is_some() {
        params
    } else {
        0
    };
    params + moments + adapter
}

impl Trainer {
    /// Writes `out/checkpoint-<step>` atomically, then deletes the oldest checkpoints beyond
    /// `keep` (`None` keeps all). `extra` is stored verbatim (data position, epoch, ...).
    /// A save that fails (a full disk) removes its partial `.tmp` directory, leaves every
    /// earlier checkpoint as it was, and says how much space it needed.
    pub fn save_checkpoint(
        &self,
        model: &mut dyn Trainable,
        out: &Path,
        extra: serde_json::Value,
        keep: Option<usize>,
    ) -> Result<PathBuf> {
        let final_dir = out.join(format!("checkpoint-{}", self.step));
        let tmp = out.join(format!("checkpoint-{}.tmp", self.step));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)
                .with_context(|| format!("removing stale {}", tmp.display()))?;
        }
        if let Err(e) = self.write_checkpoint(model, out, &tmp, extra) {
            let removed = std::fs::remove_dir_all(&tmp);
            let mut e = e.context(format!("saving {} failed", final_dir.display()));
            if integrity::is_out_of_space(&e) {
                let free = integrity::free_bytes(out)
                    .map(|b| format!("{} free", integrity::human_bytes(b)))
                    .unwrap_or_else(|| "unknown free space".into());
                e = e.context(format!(
                    "out of disk space: the checkpoint needs about {} and {} has {free}",
                    integrity::human_bytes(estimated_bytes(self)),
                    out.display()
                ));
            }
            let previous = match list(out).ok().and_then(|mut l| l.pop()) {
                Some((_, dir)) => format!("the previous checkpoint {} is intact", dir.display()),
                None => "there is no earlier checkpoint".into(),
            };
            return Err(match removed {
                Ok(()) => e.context(format!(
                    "the partial {} was removed; {previous}",
                    tmp.display()
                )),
                Err(r) => e.context(format!(
                    "the partial {} could not be removed ({r}); {previous}",
                    tmp.display()
                )),
            });
        }
        if final_dir.exists() {
            std::fs::remove_dir_all(&final_dir)
                .with_context(|| format!("replacing {}", final_dir.display()))?;
        }
        std::fs::rename(&tmp, &final_dir)
            .with_context(|| format!("renaming {} to {}", tmp.display(), final_dir.display()))?;
        if let Some(keep) = keep {
            let all = list(out)?;
            let excess = all.len().saturating_sub(keep.max(1));
            for (_, old) in all.into_iter().take(excess) {
                std::fs::remove_dir_all(&old)
                    .with_context(|| format!("removing old {}", old.display()))?;
            }
        }
        Ok(final_dir)
    }

    /// Every file of a checkpoint into `tmp`, the manifest last.
    fn write_checkpoint(
        &self,
        model: &mut dyn Trainable,
        out: &Path,
        tmp: &Path,
        extra: serde_json::Value,
    ) -> Result<()> {
        std::fs::create_dir_all(tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut tensors = BTreeMap::new();
        let mut adam_steps = serde_json::Map::new();
        for (p, st) in self.params.iter().zip(&self.optimizer.states) {
            tensors.insert(format!("param.{}", p.name), Blob::from_tensor(&p.tensor)?);
            if let Some(st) = st {
                tensors.insert(
                    format!("exp_avg.{}", p.name),
                    Blob::from_tensor(&st.exp_avg)?,
                );
                tensors.insert(
                    format!("exp_avg_sq.{}", p.name),
                    Blob::from_tensor(&st.exp_avg_sq)?,
                );
                adam_steps.insert(p.name.clone(), json!(st.step));
            }
        }
        write_safetensors(&tmp.join(TENSORS_FILE), &tensors)?;
        drop(tensors);
        integrity::injected_stall(out, self.step);
        if let Some(spec) = &self.options.lora {
            if self
                .params
                .iter()
                .any(|p| p.name.ends_with(".lora_A.weight"))
            {
                save_adapter(model, spec, tmp, None)?;
            }
        }
        let state = json!({
            "step": self.step,
            "seed": self.options.seed,
            "adam_steps": adam_steps,
            "extra": extra,
        });
        let state_path = tmp.join(STATE_FILE);
        std::fs::write(&state_path, serde_json::to_string_pretty(&state)?)
            .with_context(|| format!("writing {}", state_path.display()))?;
        integrity::injected_disk_full(out, tmp)?;
        integrity::write_manifest(tmp)?;
        Ok(())
    }

    /// Restores weights, optimiser moments and the step from a checkpoint written by a
    /// trainer with the same trainable parameters; returns the stored `extra`.
    /// Its files are checked against the manifest first: a damaged checkpoint is an error
    /// naming the file.
    pub fn load_checkpoint(&mut self, dir: &Path) -> Result<serde_json::Value> {
        if !integrity::verify(dir)? {
            tracing::warn!(
                "{} has no {} (an older lmms-ft wrote it), so its files cannot be checked",
                dir.display(),
                integrity::MANIFEST_FILE
            );
        }
        let state_path = dir.join(STATE_FILE);
        let state = read_state(dir)?;
        let step = state["step"]
            .as_u64()
            .with_context(|| format!("{}: no `step`", state_path.display()))?;
        let tensors = read_safetensors(&dir.join(TENSORS_FILE))?;
        let get = |key: &str| -> Option<&Tensor> { tensors.get(key) };
        for (p, st) in self.params.iter().zip(self.optimizer.states.iter_mut()) {
            let Some(value) = get(&format!("param.{}", p.name)) else {
                bail!(
                    "{} has no weights for trainable parameter {}; was it written with other training settings?",
                    dir.display(),
                    p.name
                );
            };
            if value.size() != p.tensor.size() {
                bail!(
                    "{}: {} has shape {:?}, expected {:?}",
                    dir.display(),
                    p.name,
                    value.size(),
                    p.tensor.size()
                );
            }
            tch::no_grad(|| p.tensor.shallow_clone().copy_(value));
            *st = match (
                get(&format!("exp_avg.{}", p.name)),
                get(&format!("exp_avg_sq.{}", p.name)),
                state["adam_steps"][&p.name].as_i64(),
            ) {
                (Some(m), Some(v), Some(n)) => Some(State {
                    exp_avg: m.to_device(p.tensor.device()),
                    exp_avg_sq: v.to_device(p.tensor.device()),
                    step: n,
                }),
                _ => None,
            };
        }
        let known = tensors.keys().filter(|k| k.starts_with("param.")).count();
        if known != self.params.len() {
            bail!(
                "{} holds {known} trainable tensors but this run trains {}; resume with the same settings",
                dir.display(),
                self.params.len()
            );
        }
        self.step = step;
        Ok(state["extra"].clone())
    }
}
