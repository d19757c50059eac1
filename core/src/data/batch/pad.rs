//! Dynamic padding: a batch is padded to its own longest sample, never to `max_length`,
//! so short batches (which length grouping makes common) cost only what they contain.

use std::borrow::Borrow;

use anyhow::{bail, Result};
use tch::{Device, Tensor};

use crate::family::{EncodedText, IGNORE_INDEX};
use crate::loss::LossTargets;

/// Where the padding goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PaddingSide {
    /// Training: real tokens start at position 0, so position ids need no offset.
    #[default]
    Right,
    /// Generation: every prompt ends at the last column, so new tokens append uniformly.
    Left,
}

/// A padded text batch, on the CPU until [`PaddedBatch::to_device`].
#[derive(Debug)]
pub struct PaddedBatch {
    /// `[B, T]` i64, padded with the pad id.
    pub input_ids: Tensor,
    /// `[B, T]` i64, padded with [`IGNORE_INDEX`].
    pub labels: Tensor,
    /// `[B, T]` i64: 1 on real tokens, 0 on padding (the `transformers` convention).
    pub attention_mask: Tensor,
    /// Unpadded length of each sample.
    pub lengths: Vec<usize>,
    /// Labelled positions after the one-token shift of the causal loss (the divisor of the
    /// mean loss), counted while the labels are at hand so collators need no copy of them.
    pub num_label_tokens: i64,
    /// Where the loss is taken, found on the host while the labels are at hand.
    pub targets: LossTargets,
}

impl PaddedBatch {
    pub fn to_device(self, device: Device) -> PaddedBatch {
        PaddedBatch {
            input_ids: self.input_ids.to_device(device),
            labels: self.labels.to_device(device),
            attention_mask: self.attention_mask.to_device(device),
            lengths: self.lengths,
            num_label_tokens: self.num_label_tokens,
            targets: self.targets.to_device(device),
        }
    }
}

/// Pads `samples` to the longest of them.
///
/// An empty batch, or a sample whose labels and ids differ in length, is an error: both mean
/// a bug upstream, and a silent empty tensor would only fail later in a less telling place.
/// Takes owned or borrowed texts, so a collator pads its samples' texts in place.
pub fn pad_batch<T: Borrow<EncodedText>>(
    samples: &[T],
    pad_id: i64,
    side: PaddingSide,
) -> Result<PaddedBatch> {
    let samples: Vec<&EncodedText> = samples.iter().map(Borrow::borrow).collect();
    if samples.is_empty() {
        bail!("cannot pad an empty batch");
    }
    for (i, s) in samples.iter().enumerate() {
        if s.labels.len() != s.input_ids.len() {
            bail!(
                "batch sample {i}: {} labels for {} input ids",
                s.labels.len(),
                s.input_ids.len()
            );
        }
    }
    let b = samples.len();
    let t = samples.iter().map(|s| s.input_ids.len()).max().unwrap_or(0);
    let mut ids = vec![pad_id; b * t];
    let mut labels = vec![IGNORE_INDEX; b * t];
    let mut mask = vec![0i64; b * t];
    let mut starts = Vec::with_capacity(b);
    for (row, s) in samples.iter().enumerate() {
        let n = s.input_ids.len();
        let start = row * t
            + match side {
                PaddingSide::Right => 0,
                PaddingSide::Left => t - n,
            };
        ids[start..start + n].copy_from_slice(&s.input_ids);
        labels[start..start + n].copy_from_slice(&s.labels);
        mask[start..start + n].fill(1);
        starts.push(start);
    }
    let targets = LossTargets::from_samples(
        starts
            .iter()
            .zip(&samples)
            .map(|(&start, s)| (start, s.labels.as_slice())),
    );
    let shape = [b as i64, t as i64];
    Ok(PaddedBatch {
        input_ids: Tensor::from_slice(&ids).reshape(shape),
        labels: Tensor::from_slice(&labels).reshape(shape),
        attention_mask: Tensor::from_slice(&mask).reshape(shape),
        lengths: samples.iter().map(|s| s.input_ids.len()).collect(),
        num_label_tokens: targets.count,
        targets,
    })
}
