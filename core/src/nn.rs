//! Layers shared by every family, with parameters named as in Hub checkpoints and numerics
//! that follow `transformers` (RMSNorm in fp32, rotary embeddings, SDPA attention).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tch::nn::{Init, Path};
use tch::{Kind, Tensor};

use crate::quant::QuantWeight;

/// How fresh parameters are filled. Loading a checkpoint overwrites them, so `Zeros` avoids
/// spending time on random numbers; `Normal` is for training from scratch (the quickstart).
#[derive(Debug, Clone, Copy)]
pub enum ParamInit {
    Zeros,
    /// `transformers`' `_init_weights`: N(0, std) for weights, zeros for biases.
    Normal {
        std: f64,
    },
}

impl ParamInit {
    fn weight(self) -> Init {
        match self {
            ParamInit::Zeros => Init::Const(0.0),
            ParamInit::Normal { std } => Init::Randn {
                mean: 0.0,
                stdev: std,
            },
        }
    }
}

/// A low-rank update `ΔW = scaling · B A` beside a frozen base weight (PEFT's LoRA layer).
///
/// `a` / `b` stay fp32 whatever the base dtype, so small updates are not lost to bf16
/// rounding; the product is cast back to the activation dtype before it joins the base path.
#[derive(Debug)]
pub struct LoraAdapter {
    /// `lora_A`: `[r, in]`.
    pub a: Tensor,
    /// `lora_B`: `[out, r]`.
    pub b: Tensor,
    /// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub scaling: f64,
    pub dropout: f64,
    /// Shared by every adapter of a model; dropout only applies while it is set, which is
    /// how evaluation inside a training run turns dropout off without a `train` argument on
    /// every layer.
    pub training: Arc<AtomicBool>,
}

impl LoraAdapter {
    fn delta(&self, x: &Tensor) -> Tensor {
        let train = self.training.load(Ordering::Relaxed);
        let x = x.to_kind(self.a.kind());
        let x = if train && self.dropout > 0.0 {
            x.dropout(self.dropout, true)
        } else {
            x
        };
        x.linear::<Tensor>(&self.a, None)
            .linear::<Tensor>(&self.b, None)
            * self.scaling
    }

    /// `scaling · B A`, in fp32: what [`Linear::merge_lora`] adds to the base weight.
    pub fn delta_weight(&self) -> Tensor {
        self.b.matmul(&self.a) * self.scaling
    }
}

/// `y = x Wᵀ + b` with `W: [out, in]`, named `weight` / `bias` like `torch.nn.Linear`, plus an
/// optional LoRA adapter the trainer attaches after loading.
///
/// The base path goes through [`Linear::base_forward`] alone, so a quantised base weight
/// (QLoRA's NF4) replaces the dense `weight` there without touching the adapter.
///
/// QLoRA is a storage variant of this same layer rather than a separate type, so every
/// family's `visit_linears`, LoRA attachment, PEFT I/O and gradient checkpointing work on
/// quantised models unchanged. When `quant` is set, `weight` is a storage-less placeholder
/// (a zero scalar expanded to `[out, in]`) that only carries shape, dtype and device, and it
/// is no longer in the `VarStore`, so it is neither trained nor saved.
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<LoraAdapter>,
    /// The frozen 4-bit base weight, when the layer is quantised.
    pub quant: Option<QuantWeight>,
}

impl Linear {
    /// Inside [`crate::quant::deferred`] the weight is a placeholder the quantising loader
    /// fills later (so a model built for QLoRA never allocates its dense linears).
    pub fn new(p: &Path, input: i64, output: i64, bias: bool, init: ParamInit) -> Linear {
        let weight = crate::quant::placeholder(p, "weight", &[output, input])
            .unwrap_or_else(|| p.var("weight", &[output, input], init.weight()));
        Linear {
            weight,
            bias: bias.then(|| p.var("bias", &[output], Init::Const(0.0))),
            lora: None,
            quant: None,
        }
    }

    pub fn in_features(&self) -> i64 {
        self.weight.size()[1]
    }

    pub fn out_features(&self) -> i64 {
        self.weight.size()[0]
    }

    pub fn base_forward(&self, x: &Tensor) -> Tensor {
        match &self.quant {
            // The quantised weight was validated when it was built, so a failure here is a
            // shape mismatch with the input: a programming error, like in `x.linear` itself.
            Some(q) => q
                .linear(x, self.bias.as_ref())
                .unwrap_or_else(|e| panic!("4-bit linear: {e:#}")),
            None => x.linear(&self.weight, self.bias.as_ref()),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let base = self.base_forward(x);
        match &self.lora {
            None => base,
            Some(lora) => {
                let kind = base.kind();
                base + lora.delta(x).to_kind(kind)
            }
        }
    }

    /// Folds the adapter into the base weight (in fp32, then back to the weight's dtype) and
    /// removes it, as PEFT's `merge_and_unload`. A 4-bit base is refused: merging into it
    /// would re-quantise the update away; merge into the bf16 base loaded normally instead.
    pub fn merge_lora(&mut self) -> anyhow::Result<()> {
        if self.quant.is_some() && self.lora.is_some() {
            anyhow::bail!(
                "refusing to merge a LoRA adapter into a 4-bit base weight; load the \
                 unquantised base model and merge there"
            );
        }
        if let Some(lora) = self.lora.take() {
            let kind = self.weight.kind();
            let merged = (self.weight.to_kind(Kind::Float)
                + lora.delta_weight().to_device(self.weight.device()))
            .to_kind(kind);
            tch::no_grad(|| self.weight.shallow_clone().copy_(&merged));
        }
        Ok(())
    }
}

/// Number of parameters of a [`Linear`], for config-only parameter counts.
pub const fn linear_params(input: u64, output: u64, bias: bool) -> u64 {
    input * output + if bias { output } else { 0 }
}

/// RMSNorm as in Llama / Qwen2: normalise in fp32, cast back, then scale.
#[derive(Debug)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn new(p: &Path, dim: i64, eps: f64) -> RmsNorm {
        RmsNorm {
            weight: p.var("weight", &[dim], Init::Const(1.0)),
            eps,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let h = x.to_kind(Kind::Float);
        let var = h.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        let h = h * (var + self.eps).rsqrt();
        // Training in bf16 keeps the weight in fp32; the product goes back to the activation
        // dtype so the next (bf16) layer gets what it expects.
        (&self.weight * h.to_kind(kind)).to_kind(kind)
    }
}

/// `torch.nn.LayerNorm` with affine weight and bias.
#[derive(Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
    dim: i64,
}

impl LayerNorm {
    pub fn new(p: &Path, dim: i64, eps: f64) -> LayerNorm {
        LayerNorm {
            weight: p.var("weight", &[dim], Init::Const(1.0)),
            bias: p.var("bias", &[dim], Init::Const(0.0)),
            eps,
            dim,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.layer_norm(
            [self.dim],
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
            true,
        )
    }
}

impl crate::autograd::ShallowClone for LayerNorm {
    fn shallow_clone(&self) -> Self {
        LayerNorm {
            weight: self.weight.shallow_clone(),
            bias: self.bias.shallow_clone(),
            eps: self.eps,
            dim: self.dim,
        }
    }
}

/// Token embedding table named `weight`.
#[derive(Debug)]
pub struct Embedding {
    pub weight: Tensor,
}

impl Embedding {
    pub fn new(p: &Path, vocab: i64, dim: i64, init: ParamInit) -> Embedding {
        Embedding {
            weight: p.var("weight", &[vocab, dim], init.weight()),
        }
    }

    pub fn forward(&self, ids: &Tensor) -> Tensor {
        Tensor::embedding(&self.weight, ids, -1, false, false)
    }
}

/// `torch.cat((-x2, x1), -1)` for the two halves of the last dimension.
pub fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size().last().copied().unwrap_or(0) / 2;
    let x1 = x.narrow(-1, 0, half);
    let x2 = x.narrow(-1, half, half);
    Tensor::cat(&[x2.neg(), x1], -1)
}

/// `x * cos + rotate_half(x) * sin`, with `cos` / `sin` broadcast against `x`.
pub fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    x * cos + rotate_half(x) * sin
}

/// Inverse frequencies `1 / base^(2i/dim)` for `i < dim/2`, in fp32 as `transformers` does.
pub fn rope_inv_freq(dim: i64, base: f64, device: tch::Device) -> Tensor {
    let exponent = Tensor::arange_start_step(0, dim, 2, (Kind::Float, device)) / (dim as f64);
    (Tensor::from(base)
        .to_device(device)
        .to_kind(Kind::Float)
        .pow(&exponent))
    .reciprocal()
}

/// Repeats key/value heads for grouped-query attention: `[B, kv, T, D]` → `[B, kv·n, T, D]`.
pub fn repeat_kv(x: &Tensor, n_rep: i64) -> Tensor {
    if n_rep == 1 {
        return x.shallow_clone();
    }
    let (b, kv, t, d) = x.size4().expect("attention states are 4-D");
    x.unsqueeze(2)
        .expand([b, kv, n_rep, t, d], false)
        .reshape([b, kv * n_rep, t, d])
}

/// Attention through `scaled_dot_product_attention`, so CUDA can pick flash / memory-efficient
/// kernels. `mask` is an additive float or boolean (true = attend) mask; with `causal` and no
/// mask, no `T × T` mask is materialised.
pub fn sdpa(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    causal: bool,
    scale: f64,
) -> Tensor {
    Tensor::scaled_dot_product_attention(q, k, v, mask, 0.0, causal && mask.is_none(), scale, false)
}

/// Cross-entropy summed over positions whose label is not `ignore`, after the causal shift
/// (position t predicts label t+1), computed in fp32 (fp64 for fp64 logits), from the full
/// `[batch, seq, vocab]` logits: what `transformers` computes, and the reference the core's
/// chunked loss head ([`crate::loss::LossHead`]) is tested against.
pub fn shifted_token_loss_sum(logits: &Tensor, labels: &Tensor, ignore: i64) -> Tensor {
    let (_, t, v) = logits.size3().expect("logits are [batch, seq, vocab]");
    let shift_logits = logits
        .narrow(1, 0, t - 1)
        .reshape([-1, v])
        .to_kind(crate::loss::accumulation_kind(logits.kind()));
    let shift_labels = labels.narrow(1, 1, t - 1).reshape([-1]);
    shift_logits.cross_entropy_loss::<Tensor>(&shift_labels, None, tch::Reduction::Sum, ignore, 0.0)
}

/// Labeled positions after the causal shift: labels other than `ignore`, excluding each
/// row's first position (it is never predicted).
pub fn count_shifted_labels(labels: &[Vec<i64>], ignore: i64) -> i64 {
    labels
        .iter()
        .map(|row| row.iter().skip(1).filter(|&&l| l != ignore).count() as i64)
        .sum()
}
