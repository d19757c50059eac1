//! AdamW with fp32 state, the arithmetic of `torch.optim.AdamW` (single-tensor path), and
//! global gradient-norm clipping as `torch.nn.utils.clip_grad_norm_`.
//!
//! Parameters of any dtype are updated through an fp32 copy of the update, so bf16 weights
//! keep fp32 moments; gradients arrive already in fp32 (the trainer accumulates them so).

use tch::{Kind, Tensor};

/// One trainable tensor with its group's hyper-parameters.
#[derive(Debug)]
pub struct Param {
    /// Hub name (`model.layers.0.mlp.up_proj.weight`, or `...q_proj.lora_A.weight`).
    pub name: String,
    pub tensor: Tensor,
    /// Peak learning rate of its group (per component).
    pub lr: f64,
    pub weight_decay: f64,
}

/// Moments of one parameter. `step` counts the updates it received: a parameter that got
/// no gradient in a step is skipped, as torch skips parameters whose `.grad` is `None`.
#[derive(Debug)]
pub struct State {
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
    pub step: i64,
}

#[derive(Debug)]
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub states: Vec<Option<State>>,
}

impl AdamW {
    pub fn new(n: usize, beta1: f64, beta2: f64, eps: f64) -> AdamW {
        AdamW {
            beta1,
            beta2,
            eps,
            states: (0..n).map(|_| None).collect(),
        }
    }

    /// Applies one update with learning rate `param.lr · factor` to each parameter that has
    /// a gradient.
    pub fn step(&mut self, params: &[Param], grads: &[Option<Tensor>], factor: f64) {
        tch::no_grad(|| {
            for ((p, g), state) in params.iter().zip(grads).zip(self.states.iter_mut()) {
                let Some(g) = g else { continue };
                let st = state.get_or_insert_with(|| State {
                    exp_avg: g.zeros_like(),
                    exp_avg_sq: g.zeros_like(),
                    step: 0,
                });
                st.step += 1;
                let lr = p.lr * factor;
                let fp32 = p.tensor.kind() == Kind::Float;
                let mut w = if fp32 {
                    p.tensor.shallow_clone()
                } else {
                    p.tensor.to_kind(Kind::Float)
                };
                let _ = w.g_mul_scalar_(1.0 - lr * p.weight_decay);
                let _ = st.exp_avg.lerp_(g, 1.0 - self.beta1);
                let _ = st.exp_avg_sq.g_mul_scalar_(self.beta2);
                let _ = st.exp_avg_sq.addcmul_(&(g * (1.0 - self.beta2)), g);
                let bc1 = 1.0 - self.beta1.powi(st.step as i32);
                let bc2 = 1.0 - self.beta2.powi(st.step as i32);
                let step_size = lr / bc1;
                let denom = st.exp_avg_sq.sqrt() / bc2.sqrt() + self.eps;
                let _ = w.addcdiv_(&(&st.exp_avg * -step_size), &denom);
                if !fp32 {
                    p.tensor.shallow_clone().copy_(&w);
                }
            }
        });
    }
}

/// Scales gradients so their global L2 norm is at most `max_norm`; returns the norm before
/// clipping, as an fp32 scalar on the gradients' device. Computed there as torch does
/// (`max_norm / (norm + 1e-6)`, clamped at 1), so nothing waits for the device.
/// `max_norm <= 0` only measures.
pub fn clip_grad_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> Tensor {
    let norms: Vec<Tensor> = grads.iter().flatten().map(|g| g.norm()).collect();
    if norms.is_empty() {
        return Tensor::zeros([], (Kind::Float, tch::Device::Cpu));
    }
    let total = Tensor::stack(&norms, 0).norm().to_kind(Kind::Float);
    if max_norm > 0.0 {
        let coef = ((&total + 1e-6).reciprocal() * max_norm).clamp_max(1.0);
        for g in grads.iter_mut().flatten() {
            let _ = g.g_mul_(&coef);
        }
    }
    total
}
