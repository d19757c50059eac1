//! Phi-3's scaled rotary positions (`rope_scaling.type` = `su` / `longrope`, and `yarn`): the
//! plain inverse frequencies divided per dimension by `short_factor` or `long_factor`, and
//! `cos` / `sin` multiplied by one attention factor. Which factors apply depends on the
//! longest position a forward pass sees (longer than `original_max_position_embeddings` →
//! long), so callers pass a per-token choice: one sample's tokens then rotate the same
//! whatever else is in the batch.

use anyhow::{ensure, Result};
use tch::{Device, Kind, Tensor};

/// How the attention factor grows with the context extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaledRopeKind {
    /// `sqrt(1 + ln(s) / ln(original))` (`su`, `longrope`).
    LongRope,
    /// `0.1 ln(s) + 1` (`yarn` in Phi-3's remote code).
    Yarn,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ScaledRope {
    pub kind: ScaledRopeKind,
    pub short_factor: Vec<f64>,
    pub long_factor: Vec<f64>,
    pub original_max_position_embeddings: i64,
    pub max_position_embeddings: i64,
}

impl ScaledRope {
    /// Checks the factor lists against the rotary dimension (`head_dim / 2` entries each).
    pub fn check(&self, head_dim: i64) -> Result<()> {
        for (what, f) in [("short", &self.short_factor), ("long", &self.long_factor)] {
            ensure!(
                f.len() as i64 * 2 == head_dim,
                "rope_scaling.{what}_factor has {} entries, head_dim {head_dim} needs {}",
                f.len(),
                head_dim / 2
            );
        }
        ensure!(
            self.original_max_position_embeddings > 0,
            "original_max_position_embeddings must be positive"
        );
        Ok(())
    }

    /// The factor `cos` and `sin` are multiplied by.
    pub fn attention_factor(&self) -> f64 {
        let scale =
            self.max_position_embeddings as f64 / self.original_max_position_embeddings as f64;
        if scale <= 1.0 {
            return 1.0;
        }
        match self.kind {
            ScaledRopeKind::LongRope => {
                (1.0 + scale.ln() / (self.original_max_position_embeddings as f64).ln()).sqrt()
            }
            ScaledRopeKind::Yarn => 0.1 * scale.ln() + 1.0,
        }
    }

    /// Whether a pass whose largest position is `max_position` uses the long factors.
    pub fn is_long(&self, max_position: i64) -> bool {
        max_position + 1 > self.original_max_position_embeddings
    }

    /// `cos`, `sin` (`[B, T, head_dim]`, in `kind`) for `positions: [B, T]` and `long: [B, T]`
    /// (bool, which factors each token uses); computed in fp32 as the Hub code does.
    pub fn cos_sin(
        &self,
        positions: &Tensor,
        long: &Tensor,
        head_dim: i64,
        theta: f64,
        kind: Kind,
    ) -> (Tensor, Tensor) {
        let device = positions.device();
        let inv = |factors: &[f64]| inv_freq(factors, head_dim, theta, device);
        let (short, long_inv) = (inv(&self.short_factor), inv(&self.long_factor));
        let inv = long_inv.where_self(&long.unsqueeze(-1), &short);
        let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * inv;
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        let factor = self.attention_factor();
        (
            (emb.cos() * factor).to_kind(kind),
            (emb.sin() * factor).to_kind(kind),
        )
    }
}

/// `1 / (factor_i · θ^(2i/d))` in fp32.
fn inv_freq(factors: &[f64], head_dim: i64, theta: f64, device: Device) -> Tensor {
    let exponent =
        Tensor::arange_start_step(0, head_dim, 2, (Kind::Float, device)) / (head_dim as f64);
    let base = Tensor::from(theta)
        .to_kind(Kind::Float)
        .to_device(device)
        .pow(&exponent);
    let factors: Vec<f32> = factors.iter().map(|&f| f as f32).collect();
    (Tensor::from_slice(&factors).to_device(device) * base).reciprocal()
}
