//! One face for the vision towers ([`ClipVisionTower`], [`SiglipVisionTower`]), so a family
//! holding either keeps a `Box<dyn VisionEncoder>` instead of matching on the kind of tower
//! at every use.

use anyhow::Result;
use lmms_ft_core::nn::Linear;
use tch::Tensor;

use crate::clip::ClipVisionTower;
use crate::siglip::SiglipVisionTower;

/// A ViT-style vision tower as a family uses it.
pub trait VisionEncoder: Send {
    /// Hidden states `[tiles, tokens, hidden]` after each of `layers` (as transformers
    /// indexes `hidden_states`: 0 is the embeddings, negative counts from the end).
    fn hidden_states(&self, pixels: &Tensor, layers: &[i64]) -> Result<Vec<Tensor>>;
    /// Recompute each encoder block in backward instead of keeping its activations.
    fn set_gradient_checkpointing(&mut self, on: bool);
    /// Calls `f` with every linear layer's name, under `prefix` (the path it was built at).
    fn visit_linears(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Linear));
}

impl VisionEncoder for ClipVisionTower {
    fn hidden_states(&self, pixels: &Tensor, layers: &[i64]) -> Result<Vec<Tensor>> {
        ClipVisionTower::hidden_states(self, pixels, layers)
    }
    fn set_gradient_checkpointing(&mut self, on: bool) {
        ClipVisionTower::set_gradient_checkpointing(self, on)
    }
    fn visit_linears(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Linear)) {
        ClipVisionTower::visit_linears(self, prefix, f)
    }
}

impl VisionEncoder for SiglipVisionTower {
    fn hidden_states(&self, pixels: &Tensor, layers: &[i64]) -> Result<Vec<Tensor>> {
        SiglipVisionTower::hidden_states(self, pixels, layers)
    }
    fn set_gradient_checkpointing(&mut self, on: bool) {
        SiglipVisionTower::set_gradient_checkpointing(self, on)
    }
    fn visit_linears(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Linear)) {
        SiglipVisionTower::visit_linears(self, prefix, f)
    }
}
