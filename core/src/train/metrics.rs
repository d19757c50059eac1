//! `metrics.jsonl`: one JSON object per logged optimiser step or evaluation, appended and
//! flushed as it happens so a killed run keeps every line written before the kill.
//!
//! Train rows: `step, loss, lr, grad_norm, tokens_per_s, peak_rss_mb`; evaluation rows:
//! `step, eval_loss, eval_tokens`; generation rows (`train.eval_generate_samples`): `step,
//! eval_exact_match, eval_token_f1, eval_rouge_l, eval_generated`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use serde_json::json;

use super::StepStats;
use crate::eval::metrics::Scores;

pub const FILE: &str = "metrics.jsonl";

pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
    last: Instant,
    /// Input tokens seen since the last train row.
    tokens: usize,
}

impl MetricsLog {
    /// Opens `dir/metrics.jsonl` for appending (a resumed run continues the same file).
    pub fn open(dir: &Path) -> Result<MetricsLog> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(FILE);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(MetricsLog {
            path,
            file,
            last: Instant::now(),
            tokens: 0,
        })
    }

    /// Opens the log of a run resumed at `step`: rows the interrupted run wrote after its
    /// checkpoint are dropped, since the resumed run writes those steps again.
    pub fn resume(dir: &Path, step: u64) -> Result<MetricsLog> {
        let path = dir.join(FILE);
        if path.is_file() {
            let kept: Vec<String> = read_rows(&path)?
                .into_iter()
                .filter(|r| r["step"].as_u64().is_some_and(|s| s <= step))
                .map(|r| r.to_string())
                .collect();
            let mut text = kept.join("\n");
            if !text.is_empty() {
                text.push('\n');
            }
            std::fs::write(&path, text).with_context(|| format!("rewriting {}", path.display()))?;
        }
        MetricsLog::open(dir)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Counts input tokens toward the next row's throughput.
    pub fn add_tokens(&mut self, tokens: usize) {
        self.tokens += tokens;
    }

    /// Appends a train row; tokens/s counts the input tokens added since the last row over
    /// the wall time since then.
    pub fn log(&mut self, s: &StepStats) -> Result<()> {
        let now = Instant::now();
        let secs = now.duration_since(self.last).as_secs_f64().max(1e-9);
        self.last = now;
        let tokens = std::mem::take(&mut self.tokens);
        self.write(json!({
            "step": s.step,
            "loss": s.loss,
            "lr": s.lr,
            "grad_norm": s.grad_norm,
            "tokens_per_s": tokens as f64 / secs,
            "peak_rss_mb": peak_rss_bytes().map(|b| b as f64 / (1024.0 * 1024.0)),
        }))
    }

    /// Appends an evaluation row.
    pub fn log_eval(&mut self, step: u64, loss: f64, tokens: i64) -> Result<()> {
        self.write(json!({"step": step, "eval_loss": loss, "eval_tokens": tokens}))
    }

    /// Appends the scores of answers generated at an evaluation.
    pub fn log_eval_generation(&mut self, step: u64, mean: &Scores, samples: usize) -> Result<()> {
        self.write(json!({
            "step": step,
            "eval_exact_match": mean.exact_match,
            "eval_token_f1": mean.token_f1,
            "eval_rouge_l": mean.rouge_l,
            "eval_generated": samples,
        }))
    }

    fn write(&mut self, row: serde_json::Value) -> Result<()> {
        writeln!(self.file, "{row}").with_context(|| format!("writing {}", self.path.display()))?;
        self.file
            .flush()
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

/// Every row of a metrics file.
pub fn read_rows(path: &Path) -> Result<Vec<serde_json::Value>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| format!("{}:{}", path.display(), i + 1))
        })
        .collect()
}

/// Peak resident set size of this process (`VmHWM`), where the OS reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    proc_kib("/proc/self/status", "VmHWM:")
        .ok()
        .map(|kib| kib * 1024)
}

/// A `Key:  N kB` field of a Linux `/proc` file (`/proc/self/status`' `VmRSS:`,
/// `/proc/meminfo`'s `MemAvailable:`), in KiB.
pub fn proc_kib(file: &str, key: &str) -> Result<u64> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {file}"))?;
    let line = text
        .lines()
        .find(|l| l.starts_with(key))
        .with_context(|| format!("{key} not in {file}"))?;
    line.split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("malformed line in {file}: {line}"))
}
