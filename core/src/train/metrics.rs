//! `metrics.jsonl`: one JSON object per optimiser step, appended and flushed as it happens
//! so a killed run keeps every line written before the kill.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use serde_json::json;

use super::StepStats;

pub struct MetricsLog {
    file: std::fs::File,
    last: Instant,
}

impl MetricsLog {
    /// Opens `dir/metrics.jsonl` for appending (a resumed run continues the same file).
    pub fn open(dir: &Path) -> Result<MetricsLog> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("metrics.jsonl");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(MetricsLog {
            file,
            last: Instant::now(),
        })
    }

    /// Appends a step; tokens/s counts label tokens over the wall time since the last line.
    pub fn log(&mut self, s: &StepStats) -> Result<()> {
        let now = Instant::now();
        let secs = now.duration_since(self.last).as_secs_f64().max(1e-9);
        self.last = now;
        let line = json!({
            "step": s.step,
            "loss": s.loss,
            "lr": s.lr,
            "grad_norm": s.grad_norm,
            "tokens_per_s": s.label_tokens as f64 / secs,
        });
        writeln!(self.file, "{line}").context("writing metrics.jsonl")?;
        self.file.flush().context("writing metrics.jsonl")
    }
}
