//! Learning-rate schedules, as `transformers`' `get_scheduler`: linear warm-up from 0, then
//! cosine / linear decay to 0, or constant. Step `s` (0-based) of the optimiser uses
//! `factor(s)`, so the very first step of a warm-up runs at lr 0, exactly as in the HF
//! `Trainer`.

use std::f64::consts::PI;

use crate::config::Scheduler;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub kind: Scheduler,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl Schedule {
    /// Warm-up steps from a ratio: `ceil(ratio · total)`, as `TrainingArguments` does.
    pub fn with_ratio(kind: Scheduler, warmup_ratio: f64, total_steps: u64) -> Schedule {
        Schedule {
            kind,
            warmup_steps: (warmup_ratio * total_steps as f64).ceil() as u64,
            total_steps,
        }
    }

    /// Multiplier of the base learning rate at optimiser step `step`.
    pub fn factor(&self, step: u64) -> f64 {
        let (s, w, t) = (
            step as f64,
            self.warmup_steps as f64,
            self.total_steps as f64,
        );
        if step < self.warmup_steps {
            return s / w.max(1.0);
        }
        match self.kind {
            Scheduler::Constant => 1.0,
            Scheduler::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
            Scheduler::Cosine => {
                let progress = (s - w) / (t - w).max(1.0);
                (0.5 * (1.0 + (PI * progress).cos())).max(0.0)
            }
        }
    }
}
