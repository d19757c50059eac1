//! Per-sample loss of a model on a dataset under the label rule (`lmms-ft evaluate`), and
//! generated answers scored against the references ([`answers`], [`metrics`]).

pub mod answers;
pub mod metrics;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::data::dataset::Dataset;
use crate::data::prepare::{prepare, MediaOptions};
use crate::family::Pipeline;

#[derive(Debug, Clone, Serialize)]
pub struct SampleLoss {
    pub index: usize,
    /// Mean cross-entropy over this sample's labeled tokens.
    pub loss: f64,
    pub num_label_tokens: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// Mean over all labeled tokens of the dataset (token-weighted, as training reports it).
    pub mean_loss: f64,
    pub samples: Vec<SampleLoss>,
}

/// Runs every record through the model one at a time, without gradients. A record that fails
/// to load, or that has no labeled token, is an error naming it: a silent skip would make
/// the mean incomparable between runs.
pub fn evaluate(
    pipeline: &dyn Pipeline,
    dataset: &Dataset,
    media: &MediaOptions,
) -> Result<EvalReport> {
    let mut samples = Vec::new();
    let (mut total, mut tokens) = (0.0, 0i64);
    for (index, record) in dataset.records()?.enumerate() {
        let record = record?;
        let prepared = prepare(&record, media)?;
        let out = tch::no_grad(|| pipeline.forward(std::slice::from_ref(&prepared), false))
            .with_context(|| format!("evaluating sample at {}", record.location))?;
        let Some(sum) = out.loss_sum else {
            bail!(
                "the model returned no loss for sample at {}",
                record.location
            );
        };
        if out.num_label_tokens == 0 {
            bail!(
                "sample at {} has no labeled token (no assistant reply)",
                record.location
            );
        }
        let sum = sum.double_value(&[]);
        total += sum;
        tokens += out.num_label_tokens;
        samples.push(SampleLoss {
            index,
            loss: sum / out.num_label_tokens as f64,
            num_label_tokens: out.num_label_tokens,
        });
    }
    if tokens == 0 {
        bail!("{} has no samples to evaluate", dataset.path().display());
    }
    Ok(EvalReport {
        mean_loss: total / tokens as f64,
        samples,
    })
}
