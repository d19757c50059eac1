//! The training engine: which parameters train (per part: frozen, full or LoRA), AdamW with
//! per-part learning rates, warm-up + decay schedules, gradient accumulation normalised by
//! the label tokens of the whole accumulated batch, clipping, seeded steps, checkpoints and
//! exact resume.
//!
//! The engine sees the model only as [`Trainable`] and a micro-batch only through a forward
//! closure returning [`ModelOutput`], so it serves every family (and tests that build
//! batches by hand) without knowing their types.

pub mod batches;
pub mod checkpoint;
pub mod identity;
pub mod integrity;
pub mod metrics;
pub mod optim;
pub mod outdir;
pub mod plot;
pub mod run;
pub mod schedule;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use tch::{Kind, Tensor};

use crate::config::{ComponentMode, Config};
use crate::family::{ModelOutput, Trainable};
use crate::part::{Component, PerPart};
use crate::peft::{self, LoraSpec};
pub use optim::{clip_grad_norm, AdamW, Param};
pub use schedule::Schedule;

/// Puts the norm parameters of a bf16 / fp16 model in fp32 (in place, so every layer holding
/// them sees the change) and returns how many: mixed-precision training keeps norms, like
/// LoRA parameters, optimiser state and the loss, in fp32 while weights and matmuls stay in
/// the reduced dtype. Norms are told apart by their Hub names (a module whose last part
/// contains `norm` or starts with `ln`, as `input_layernorm`, `norm1`, `ln_q`,
/// `pre_layrnorm`), 1-D and not a linear layer's bias; other 1-D parameters (CLIP's
/// `class_embedding`) keep the model dtype because they join bf16 activations directly.
pub fn keep_norms_fp32(model: &mut dyn Trainable) -> usize {
    let mut linear_biases = std::collections::HashSet::new();
    model.visit_linears(&mut |name, _| {
        linear_biases.insert(format!("{name}.bias"));
    });
    let mut upcast = 0;
    for (name, mut var) in model.var_store().variables() {
        let reduced = matches!(var.kind(), Kind::BFloat16 | Kind::Half);
        let module = name.rsplit_once('.').map_or("", |(m, _)| m);
        let last = module.rsplit('.').next().unwrap_or(module);
        let is_norm = last.contains("norm") || last.starts_with("ln");
        if reduced && var.dim() == 1 && is_norm && !linear_biases.contains(&name) {
            tch::no_grad(|| var.set_data(&var.to_kind(Kind::Float)));
            upcast += 1;
        }
    }
    upcast
}

/// Everything the engine needs to know, resolved from the config.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub modes: PerPart<ComponentMode>,
    /// Required when a part is in `lora` mode; its `modules_to_save` apply in any mode.
    pub lora: Option<LoraSpec>,
    /// Peak learning rate per part.
    pub lrs: PerPart<f64>,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub max_grad_norm: f64,
    pub schedule: Schedule,
    pub seed: u64,
}

impl TrainOptions {
    pub fn from_config(c: &Config, total_steps: u64) -> Result<TrainOptions> {
        let t = &c.train;
        let modes = t.component_modes();
        let needs_lora = modes.contains(&ComponentMode::Lora) || !c.lora.modules_to_save.is_empty();
        Ok(TrainOptions {
            modes,
            lora: needs_lora
                .then(|| LoraSpec::from_config(&c.lora))
                .transpose()?,
            lrs: t.learning_rates(),
            weight_decay: t.weight_decay,
            beta1: t.adam_beta1,
            beta2: t.adam_beta2,
            eps: t.adam_epsilon,
            max_grad_norm: t.max_grad_norm,
            schedule: Schedule::with_ratio(t.scheduler, t.warmup_ratio, total_steps),
            seed: t.seed,
        })
    }
}

/// What one optimiser step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// 1-based number of the step just taken.
    pub step: u64,
    /// Mean token loss over every label token of the accumulated batch.
    pub loss: f64,
    /// Learning rate of the LLM group during the step.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub label_tokens: i64,
}

/// A step's statistics before they are read from the device. Reading them
/// ([`PendingStats::read`]) waits for the device to finish the step, so the run loop reads
/// only the steps it logs or checkpoints, and the device otherwise runs ahead.
#[derive(Debug)]
pub struct PendingStats {
    pub step: u64,
    pub lr: f64,
    pub label_tokens: i64,
    /// Summed loss of the step's micro-batches (fp32 scalar).
    loss_sum: Tensor,
    /// Global gradient norm before clipping (fp32 scalar).
    grad_norm: Tensor,
}

impl PendingStats {
    /// The step's numbers; a non-finite loss or gradient norm is an error here, since the
    /// step is only checked when read: the run loop reads every logged step and every step it
    /// is about to checkpoint, so a checkpoint never holds weights a NaN step wrote.
    pub fn read(&self) -> Result<StepStats> {
        let loss = self.loss_sum.double_value(&[]) / self.label_tokens as f64;
        if !loss.is_finite() {
            bail!(
                "loss is {loss} at step {}; stopping (the last checkpoint is intact)",
                self.step
            );
        }
        let grad_norm = self.grad_norm.double_value(&[]);
        if !grad_norm.is_finite() {
            bail!(
                "gradient norm is {grad_norm} at step {}; stopping (the last checkpoint is intact)",
                self.step
            );
        }
        Ok(StepStats {
            step: self.step,
            loss,
            lr: self.lr,
            grad_norm,
            label_tokens: self.label_tokens,
        })
    }
}

pub struct Trainer {
    pub options: TrainOptions,
    pub params: Vec<Param>,
    grads: Vec<Option<Tensor>>,
    /// Summed loss of the micro-batches so far in this step, kept on the device.
    loss_sum: Option<Tensor>,
    pub optimizer: AdamW,
    /// Optimiser steps taken so far.
    pub step: u64,
    training: Arc<AtomicBool>,
}

impl Trainer {
    /// Freezes and unfreezes the model's parts, attaches LoRA adapters where a part is in
    /// `lora` mode (keeping adapters already loaded, e.g. from an adapter directory), and
    /// collects the trainable parameters with their groups. Seeds torch with `seed` first so
    /// fresh adapters are reproducible.
    pub fn new(model: &mut dyn Trainable, options: TrainOptions) -> Result<Trainer> {
        tch::manual_seed(options.seed as i64);
        let upcast = keep_norms_fp32(model);
        if upcast > 0 {
            tracing::debug!(upcast, "norm parameters kept in fp32");
        }
        let training = Arc::new(AtomicBool::new(true));
        let modes = options.modes;
        if modes.contains(&ComponentMode::Lora) {
            let spec = options
                .lora
                .as_ref()
                .context("a part is in lora mode but no LoRA settings were given")?;
            peft::attach(model, spec, &modes, &training)?;
        }
        let group = |model: &dyn Trainable, name: &str| model.component(name);
        let mut params = Vec::new();
        let mut lora_items = Vec::new();
        model.visit_linears(&mut |name, linear| {
            if let Some(l) = &mut linear.lora {
                l.training = training.clone();
                lora_items.push((name.to_string(), l.a.shallow_clone(), l.b.shallow_clone()));
            }
        });
        for (name, a, b) in lora_items {
            let g = group(model, &name);
            for (which, t) in [("lora_A", a), ("lora_B", b)] {
                params.push(Param {
                    name: format!("{name}.{which}.weight"),
                    tensor: t,
                    lr: options.lrs[g],
                    weight_decay: options.weight_decay,
                });
            }
        }
        let mut vars: Vec<(String, Tensor)> = model.var_store().variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, var) in vars {
            let g = group(model, &name);
            let saved = options
                .lora
                .as_ref()
                .is_some_and(|s| s.saves_module_of(&name));
            let train = modes[g] == ComponentMode::Full || saved;
            let var = var.set_requires_grad(train);
            if train {
                // Norms and biases (the 1-D parameters) take no weight decay.
                let weight_decay = if var.dim() < 2 {
                    0.0
                } else {
                    options.weight_decay
                };
                params.push(Param {
                    name,
                    tensor: var,
                    lr: options.lrs[g],
                    weight_decay,
                });
            }
        }
        if params.is_empty() {
            bail!("nothing to train: every part of the model is frozen");
        }
        let n = params.len();
        Ok(Trainer {
            optimizer: AdamW::new(n, options.beta1, options.beta2, options.eps),
            grads: (0..n).map(|_| None).collect(),
            loss_sum: None,
            options,
            params,
            step: 0,
            training,
        })
    }

    /// Turns LoRA dropout on (training) or off (evaluation).
    pub fn set_training(&self, on: bool) {
        self.training.store(on, Ordering::Relaxed);
    }

    /// Number of trainable scalars.
    pub fn num_trainable(&self) -> i64 {
        self.params.iter().map(|p| p.tensor.numel() as i64).sum()
    }

    /// Back-propagates the summed loss of one micro-batch and adds its gradients (in fp32)
    /// to the step's accumulators. Nothing is read from the device: the loss joins the
    /// step's sum there. A micro-batch without label tokens contributes nothing and is
    /// skipped.
    pub fn backward(&mut self, out: &ModelOutput) -> Result<()> {
        let loss = out
            .loss_sum
            .as_ref()
            .context("the batch has no labels, so there is no loss to train on")?;
        if out.num_label_tokens == 0 {
            return Ok(());
        }
        // `loss.backward()` rather than `autograd.grad(loss, params)`: parameters used inside
        // a gradient-checkpointed block are reached only by the block's re-entrant inner
        // backward, which fills their `.grad` and is skipped entirely by an `autograd.grad`
        // restricted to the parameters (every LoRA factor would get no gradient). Each
        // `.grad` is then moved out into the fp32 accumulator.
        loss.f_backward().context("backward pass")?;
        for (acc, p) in self.grads.iter_mut().zip(&self.params) {
            let Some(g) = crate::autograd::take_grad(&p.tensor) else {
                continue;
            };
            let g = g.to_kind(Kind::Float);
            *acc = Some(match acc.take() {
                Some(a) => a + g,
                None => g,
            });
        }
        let loss = loss.detach().to_kind(Kind::Float);
        self.loss_sum = Some(match self.loss_sum.take() {
            Some(sum) => sum + loss,
            None => loss,
        });
        Ok(())
    }

    /// Ends an accumulated step: divides the gradients by `label_tokens` (the label tokens of
    /// every micro-batch together, so long and short samples weigh per token, not per
    /// micro-batch), clips, and applies AdamW at the scheduled learning rate, all without
    /// waiting for the device; the loss and gradient norm come back unread.
    pub fn optimizer_step_deferred(&mut self, label_tokens: i64) -> Result<PendingStats> {
        if label_tokens <= 0 {
            bail!(
                "step {} has no label tokens; every sample of the batch is fully masked",
                self.step + 1
            );
        }
        let loss_sum = self
            .loss_sum
            .take()
            .context("optimizer step without a backward pass")?;
        let scale = 1.0 / label_tokens as f64;
        for g in self.grads.iter_mut().flatten() {
            let _ = g.g_mul_scalar_(scale);
        }
        let grad_norm = clip_grad_norm(&mut self.grads, self.options.max_grad_norm);
        let factor = self.options.schedule.factor(self.step);
        self.optimizer.step(&self.params, &self.grads, factor);
        for g in self.grads.iter_mut() {
            *g = None;
        }
        self.step += 1;
        Ok(PendingStats {
            step: self.step,
            lr: self.options.lrs[Component::Llm] * factor,
            label_tokens,
            loss_sum,
            grad_norm,
        })
    }

    /// [`Trainer::optimizer_step_deferred`], read at once.
    pub fn optimizer_step(&mut self, label_tokens: i64) -> Result<StepStats> {
        self.optimizer_step_deferred(label_tokens)?.read()
    }

    /// One optimiser step over `micro_batches` (gradient accumulation). Torch's generator is
    /// seeded from `seed` and the step number first, so dropout is the same in a resumed run
    /// without saving generator state.
    pub fn train_step<B>(
        &mut self,
        micro_batches: &[B],
        forward: impl FnMut(&B) -> Result<ModelOutput>,
    ) -> Result<StepStats> {
        self.train_step_deferred(micro_batches, forward)?.read()
    }

    /// [`Trainer::train_step`] without reading the step's loss and gradient norm back from
    /// the device (the training loop reads them only when it logs).
    pub fn train_step_deferred<B>(
        &mut self,
        micro_batches: &[B],
        mut forward: impl FnMut(&B) -> Result<ModelOutput>,
    ) -> Result<PendingStats> {
        tch::manual_seed(self.options.seed.wrapping_add(1 + self.step) as i64);
        self.set_training(true);
        let mut tokens = 0;
        for mb in micro_batches {
            let out = forward(mb)?;
            tokens += out.num_label_tokens;
            self.backward(&out)?;
        }
        self.optimizer_step_deferred(tokens)
    }
}
