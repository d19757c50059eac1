//! The causal-LM loss, owned by the core for every family: a model hands over its final
//! hidden states and its `lm_head`, and [`LossHead`] computes the summed cross-entropy only at
//! the positions that predict a label.
//!
//! In supervised fine-tuning most positions (media tokens, prompts, padding) carry no label,
//! and at a 150k vocabulary full-vocabulary logits dominate both the FLOPs and the memory of
//! a step: `[batch, seq, vocab]` logits, their fp32 log-softmax and their gradient. Here the
//! labeled positions are gathered first ([`LossTargets`], built on the host by the collator,
//! so no device sync is needed to find them) and the head runs over them in chunks of
//! [`LossHead::chunk_size`] positions, so at most one chunk's logits exist at a time.
//!
//! When the head is frozen (LoRA, QLoRA, or a frozen LLM under a trained vision tower), each
//! chunk's gradient with respect to its hidden states is computed right away and its logits
//! freed; backward then only multiplies that stored `[labels, hidden]` gradient by the
//! incoming one. When the head trains, the chunks go through ordinary autograd, which keeps
//! each chunk's log-softmax for backward (still only at labeled positions).

use anyhow::{ensure, Context, Result};
use tch::{Device, Kind, Reduction, Tensor};

use crate::autograd::{custom_function, grad_enabled};
use crate::family::{Model, ModelOutput, IGNORE_INDEX};

/// Positions per chunk when the config does not say: at a 152k vocabulary one chunk's fp32
/// logits are 37 MiB (the chunk's transients, logits, log-softmax and its gradient, about
/// four times that), while the head's matrix product stays large enough to run at full speed.
pub const DEFAULT_LOSS_CHUNK: usize = 64;

/// Where a batch takes its loss: the flattened `[batch · seq]` position of every token that
/// predicts a label (the one before the label, after the causal shift) and that label.
#[derive(Debug)]
pub struct LossTargets {
    /// `[N]` i64, ascending.
    pub positions: Tensor,
    /// `[N]` i64, never [`IGNORE_INDEX`].
    pub labels: Tensor,
    /// `N`, known on the host: the divisor of the mean loss.
    pub count: i64,
}

impl LossTargets {
    /// Targets of samples laid out in a flattened `[batch · seq]` batch: each item is the
    /// position of a sample's first token and the sample's labels. Position `start + t`
    /// predicts `labels[t + 1]`; a sample's first label is never a target, as when it runs
    /// alone, so samples packed into one row never predict across their boundary.
    pub fn from_samples<'a>(samples: impl IntoIterator<Item = (usize, &'a [i64])>) -> LossTargets {
        let mut positions = Vec::new();
        let mut labels = Vec::new();
        for (start, row) in samples {
            for (t, &label) in row.iter().enumerate().skip(1) {
                if label != IGNORE_INDEX {
                    positions.push((start + t - 1) as i64);
                    labels.push(label);
                }
            }
        }
        LossTargets {
            count: positions.len() as i64,
            positions: Tensor::from_slice(&positions),
            labels: Tensor::from_slice(&labels),
        }
    }

    /// Targets of a `[batch, seq]` label tensor, read to the host: for batches built by
    /// hand (tests, benchmarks); collators use [`LossTargets::from_rows`] on the labels they
    /// already hold.
    pub fn from_labels(labels: &Tensor) -> Result<LossTargets> {
        let (b, t) = labels.size2().context("labels must be [batch, seq]")?;
        let flat: Vec<i64> = Vec::try_from(labels.to_device(Device::Cpu).flatten(0, -1))
            .context("reading labels")?;
        let t = t as usize;
        Ok(LossTargets::from_samples(
            (0..b as usize).map(|r| (r * t, &flat[r * t..(r + 1) * t])),
        ))
    }

    pub fn to_device(self, device: Device) -> LossTargets {
        LossTargets {
            positions: self.positions.to_device(device),
            labels: self.labels.to_device(device),
            count: self.count,
        }
    }
}

/// The dtype the loss is computed and summed in: fp32, or fp64 for an fp64 model (never
/// lower than the logits).
pub fn accumulation_kind(logits: Kind) -> Kind {
    if logits == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    }
}

/// The chunked `lm_head` + cross-entropy (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LossHead {
    /// Labeled positions whose logits are computed at once.
    pub chunk_size: usize,
}

impl Default for LossHead {
    fn default() -> Self {
        LossHead {
            chunk_size: DEFAULT_LOSS_CHUNK,
        }
    }
}

impl LossHead {
    pub fn new(chunk_size: usize) -> Result<LossHead> {
        ensure!(chunk_size > 0, "the loss chunk size must be at least 1");
        Ok(LossHead { chunk_size })
    }

    /// Sum of the token cross-entropies at `targets`, as an fp32 scalar (fp64 for an fp64
    /// model), of `hidden`
    /// (`[batch, seq, H]`) through `head` (`[n, H]` → `[n, vocab]`). Equal in value and
    /// gradients to the cross-entropy of the full shifted logits.
    pub fn loss_sum(
        &self,
        hidden: &Tensor,
        targets: &LossTargets,
        head: &dyn Fn(&Tensor) -> Tensor,
    ) -> Result<Tensor> {
        ensure!(
            self.chunk_size > 0,
            "the loss chunk size must be at least 1"
        );
        ensure!(
            hidden.dim() == 3,
            "hidden states must be [batch, seq, hidden], got {:?}",
            hidden.size()
        );
        let device = hidden.device();
        if targets.count == 0 {
            return Ok(Tensor::zeros(
                [],
                (accumulation_kind(hidden.kind()), device),
            ));
        }
        let picked = hidden.flatten(0, 1).index_select(0, &targets.positions);
        let needs_grad = grad_enabled() && picked.requires_grad();
        // A one-row probe (a negligible matmul) tells whether any head parameter trains,
        // without the family having to list its head's tensors.
        let head_trains = grad_enabled() && head(&picked.narrow(0, 0, 1).detach()).requires_grad();
        let chunks = self.chunks(targets.count);
        let ce = |x: &Tensor, start: i64, len: i64| {
            let logits = head(x);
            let kind = accumulation_kind(logits.kind());
            logits.to_kind(kind).cross_entropy_loss::<Tensor>(
                &targets.labels.narrow(0, start, len),
                None,
                Reduction::Sum,
                IGNORE_INDEX,
                0.0,
            )
        };
        let sum = |losses: Vec<Tensor>| Tensor::stack(&losses, 0).sum(losses[0].kind());
        let plain = || -> Vec<Tensor> {
            chunks
                .iter()
                .map(|&(start, len)| ce(&picked.narrow(0, start, len), start, len))
                .collect()
        };
        if head_trains {
            return Ok(sum(plain()));
        }
        if !needs_grad {
            return Ok(tch::no_grad(|| sum(plain())));
        }
        // Frozen head: each chunk's loss and its gradient with respect to the chunk's hidden
        // states now, then the logits are gone.
        let mut losses = Vec::with_capacity(chunks.len());
        let mut grads = Vec::with_capacity(chunks.len());
        for &(start, len) in &chunks {
            let x = picked
                .narrow(0, start, len)
                .detach()
                .set_requires_grad(true);
            let loss = ce(&x, start, len);
            let mut g = Tensor::f_run_backward(&[&loss], &[&x], false, false)
                .context("backward through the lm_head")?;
            grads.push(g.pop().context("no gradient for the lm_head input")?);
            losses.push(loss.detach());
        }
        let total = sum(losses);
        let grad = Tensor::cat(&grads, 0);
        drop(grads);
        let mut out = custom_function(
            &[&picked],
            |_| vec![total],
            move |_, upstream| vec![Some(&grad * upstream[0].to_kind(grad.kind()))],
        )?;
        out.pop().context("the loss function returned nothing")
    }

    /// `(start, len)` of every chunk of `n` positions.
    fn chunks(&self, n: i64) -> Vec<(i64, i64)> {
        let size = i64::try_from(self.chunk_size).unwrap_or(i64::MAX).min(n);
        (0..n)
            .step_by(size.max(1) as usize)
            .map(|start| (start, size.min(n - start)))
            .collect()
    }
}

impl LossHead {
    /// Runs `model` on `batch` and takes the loss of its labeled positions: what
    /// [`Model::forward`] returns, with this head's chunking.
    pub fn forward<M: Model + ?Sized>(
        &self,
        model: &M,
        batch: &M::Batch,
        train: bool,
    ) -> Result<ModelOutput> {
        let hidden = model.hidden_states(batch, train)?;
        let Some(targets) = model.loss_targets(batch) else {
            return Ok(ModelOutput {
                loss_sum: None,
                num_label_tokens: 0,
            });
        };
        let loss_sum = self.loss_sum(&hidden, targets, &|h| model.lm_head(h))?;
        Ok(ModelOutput {
            loss_sum: Some(loss_sum),
            num_label_tokens: targets.count,
        })
    }
}
