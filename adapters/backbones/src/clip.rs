//! The CLIP vision tower (`CLIPVisionModel`): conv patch embedding without bias, a learned
//! class token, learned absolute positions, a LayerNorm before the encoder (`pre_layrnorm`,
//! spelled as in the checkpoints) and one after it that only the pooled output uses.
//! LLaVA reads intermediate hidden states, so the tower returns those rather than a pooled
//! embedding.

use anyhow::Result;
use lmms_ft_core::nn::{Embedding, LayerNorm, Linear, ParamInit};
use serde_json::Value;
use tch::nn::Path;
use tch::Tensor;

use crate::vit::{
    check_patching, embed_patches, encoder_layers, int, resolve_layers, select_hidden_states,
    visit_encoder_linears, weight_init, EncoderConfig, EncoderLayer,
};

#[derive(Debug, Clone, PartialEq)]
pub struct ClipVisionConfig {
    pub encoder: EncoderConfig,
    pub num_channels: i64,
    pub image_size: i64,
    pub patch_size: i64,
}

impl ClipVisionConfig {
    /// Parses a `vision_config` with `CLIPVisionConfig`'s defaults for absent keys.
    pub fn from_hf_json(v: &Value) -> Result<ClipVisionConfig> {
        let c = ClipVisionConfig {
            encoder: EncoderConfig::from_hf_json(v, 1e-5, "quick_gelu")?,
            num_channels: int(v, "num_channels", 3)?,
            image_size: int(v, "image_size", 224)?,
            patch_size: int(v, "patch_size", 32)?,
        };
        check_patching("CLIP", c.image_size, c.patch_size)?;
        Ok(c)
    }

    /// Patches per side of the (square) input; the conv drops a remainder.
    pub fn grid(&self) -> i64 {
        self.image_size / self.patch_size
    }

    /// Tokens per image out of the tower: the patches plus the class token.
    pub fn num_tokens(&self) -> i64 {
        self.grid() * self.grid() + 1
    }

    pub fn num_parameters(&self) -> u64 {
        let h = self.encoder.hidden_size as u64;
        let patch = h * (self.num_channels * self.patch_size * self.patch_size) as u64;
        let embeddings = h + patch + self.num_tokens() as u64 * h;
        // pre_layrnorm and post_layernorm, weight + bias each.
        embeddings + 4 * h + self.encoder.num_parameters()
    }
}

pub struct ClipVisionTower {
    pub config: ClipVisionConfig,
    class_embedding: Tensor,
    patch_embedding: Tensor,
    position_embedding: Embedding,
    pre_layrnorm: LayerNorm,
    layers: Vec<EncoderLayer>,
    /// Only the pooled output uses it; kept so checkpoints load and save unchanged.
    pub post_layernorm: LayerNorm,
    /// Recompute each encoder block in backward instead of keeping its activations.
    gradient_checkpointing: bool,
}

impl ClipVisionTower {
    /// See [`visit_encoder_linears`]; `prefix` is the path the tower was built under.
    pub fn visit_linears(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Linear)) {
        visit_encoder_linears(&mut self.layers, prefix, f);
    }

    /// `p` is the path of `embeddings` / `pre_layrnorm` / `encoder` (the Hub's
    /// `vision_tower.vision_model`).
    pub fn new(p: &Path, c: &ClipVisionConfig, init: ParamInit) -> ClipVisionTower {
        let h = c.encoder.hidden_size;
        let e = p / "embeddings";
        ClipVisionTower {
            class_embedding: e.var("class_embedding", &[h], weight_init(init)),
            patch_embedding: (&e / "patch_embedding").var(
                "weight",
                &[h, c.num_channels, c.patch_size, c.patch_size],
                weight_init(init),
            ),
            position_embedding: Embedding::new(
                &(&e / "position_embedding"),
                c.num_tokens(),
                h,
                init,
            ),
            pre_layrnorm: LayerNorm::new(&(p / "pre_layrnorm"), h, c.encoder.layer_norm_eps),
            layers: encoder_layers(p, &c.encoder, init),
            post_layernorm: LayerNorm::new(&(p / "post_layernorm"), h, c.encoder.layer_norm_eps),
            config: c.clone(),
            gradient_checkpointing: false,
        }
    }

    /// Trades compute for memory in training (see [`select_hidden_states`]).
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.gradient_checkpointing = on;
    }

    /// `transformers`' `hidden_states[i]` for each requested `i` (0 = embeddings after
    /// `pre_layrnorm`, negative from the end), each `[N, 1 + patches, H]`, for `pixels:
    /// [N, C, S, S]` at the configured `image_size` (no position interpolation, as LLaVA).
    pub fn hidden_states(&self, pixels: &Tensor, layers: &[i64]) -> Result<Vec<Tensor>> {
        let c = &self.config;
        let wanted = resolve_layers(layers, c.encoder.num_layers)?;
        let patches = embed_patches("CLIP", pixels, &self.patch_embedding, None, c.image_size)?;
        let n = patches.size()[0];
        let h = c.encoder.hidden_size;
        let cls = self
            .class_embedding
            .view([1, 1, h])
            .expand([n, 1, h], false);
        let x = Tensor::cat(&[cls, patches], 1) + self.position_embedding.weight.unsqueeze(0);
        let x = self.pre_layrnorm.forward(&x);
        Ok(select_hidden_states(
            x,
            &self.layers,
            &wanted,
            self.gradient_checkpointing,
        ))
    }
}
