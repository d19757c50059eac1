//! Per-sample loss of a model on a dataset under the label rule (`lmms-ft evaluate`), and
//! generated answers scored against the references ([`answers`], [`metrics`]).

pub mod answers;
pub mod metrics;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::family::Pipeline;
use crate::train::batches::BatchLoad;

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
    pub num_label_tokens: i64,
    /// Per sample, when evaluated one sample per batch (`lmms-ft evaluate`); empty otherwise.
    pub samples: Vec<SampleLoss>,
}

/// Loss of the records of `load` under the run's data settings (`max_length`, `overlength`,
/// `train_on_prompt`, ...), without gradients, `batch_size` samples per forward pass: the one
/// evaluation of both `lmms-ft evaluate` (one sample per batch, for per-sample losses) and
/// the evaluation during training. Losses are summed on the device and read once per
/// sample, or once at the end for larger batches. A batch with no labeled token is an
/// error naming its first sample: a silent skip would make the mean incomparable between
/// runs. Samples the settings leave out (`overlength = "drop"`, skipped bad samples) are
/// logged where they are dropped.
pub fn evaluate(
    pipeline: &dyn Pipeline,
    load: &BatchLoad,
    batch_size: usize,
) -> Result<EvalReport> {
    let per_sample = batch_size == 1;
    let mut samples = Vec::new();
    let (mut sum, mut tokens) = (None::<tch::Tensor>, 0i64);
    let indices: Vec<usize> = (0..load.records.len()).collect();
    for chunk in indices.chunks(batch_size.max(1)) {
        let location = &load.records[chunk[0]].location;
        let Some(batch) = load
            .load(chunk)
            .with_context(|| format!("loading eval sample at {location}"))?
        else {
            continue;
        };
        let out = tch::no_grad(|| pipeline.forward_loaded(&batch, false))
            .with_context(|| format!("evaluating sample at {location}"))?;
        let Some(loss) = out.loss_sum else {
            bail!("the model returned no loss for sample at {location}");
        };
        if out.num_label_tokens == 0 {
            bail!("sample at {location} has no labeled token (no assistant reply)");
        }
        tokens += out.num_label_tokens;
        if per_sample {
            let value = loss.double_value(&[]);
            samples.push(SampleLoss {
                index: chunk[0],
                loss: value / out.num_label_tokens as f64,
                num_label_tokens: out.num_label_tokens,
            });
        }
        sum = Some(match sum {
            Some(total) => total + loss,
            None => loss,
        });
    }
    let Some(sum) = sum else {
        bail!("no sample to evaluate (every one was left out)");
    };
    Ok(EvalReport {
        mean_loss: sum.double_value(&[]) / tokens as f64,
        num_label_tokens: tokens,
        samples,
    })
}
