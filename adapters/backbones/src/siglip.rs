//! The SigLIP vision tower (`SiglipVisionModel`): conv patch embedding with bias, learned
//! absolute positions, no class token and no LayerNorm before the encoder; a LayerNorm and an
//! optional attention-pooling head after it, which LLaVA-style models do not use (their
//! configs set `vision_use_head = false`). The head's parameters are still built when the
//! config asks for them, so such checkpoints load and count like `transformers`.

use anyhow::Result;
use lmms_ft_core::nn::{linear_params, Embedding, LayerNorm, Linear, ParamInit};
use serde_json::Value;
use tch::nn::{Init, Path};
use tch::Tensor;

use crate::vit::{
    boolean, check_patching, embed_patches, encoder_layers, int, resolve_layers,
    select_hidden_states, visit_encoder_linears, weight_init, EncoderConfig, EncoderLayer,
};

#[derive(Debug, Clone, PartialEq)]
pub struct SiglipVisionConfig {
    pub encoder: EncoderConfig,
    pub num_channels: i64,
    pub image_size: i64,
    pub patch_size: i64,
    pub vision_use_head: bool,
}

impl SiglipVisionConfig {
    /// Parses a `vision_config` with `SiglipVisionConfig`'s defaults for absent keys.
    pub fn from_hf_json(v: &Value) -> Result<SiglipVisionConfig> {
        let c = SiglipVisionConfig {
            encoder: EncoderConfig::from_hf_json(v, 1e-6, "gelu_pytorch_tanh")?,
            num_channels: int(v, "num_channels", 3)?,
            image_size: int(v, "image_size", 224)?,
            patch_size: int(v, "patch_size", 16)?,
            vision_use_head: boolean(v, "vision_use_head", true)?,
        };
        check_patching("SigLIP", c.image_size, c.patch_size)?;
        Ok(c)
    }

    /// Patches per side of the (square) input; SigLIP's conv drops a remainder.
    pub fn grid(&self) -> i64 {
        self.image_size / self.patch_size
    }

    /// Tokens per image out of the tower (no class token).
    pub fn num_tokens(&self) -> i64 {
        self.grid() * self.grid()
    }

    pub fn num_parameters(&self) -> u64 {
        let h = self.encoder.hidden_size as u64;
        let i = self.encoder.intermediate_size as u64;
        let patch = h * (self.num_channels * self.patch_size * self.patch_size) as u64 + h;
        let embeddings = patch + self.num_tokens() as u64 * h;
        // probe, in_proj (3h×h + 3h), out_proj, layernorm, mlp.
        let head = if self.vision_use_head {
            h + 3 * h * h
                + 3 * h
                + linear_params(h, h, true)
                + 2 * h
                + linear_params(h, i, true)
                + linear_params(i, h, true)
        } else {
            0
        };
        embeddings + self.encoder.num_parameters() + 2 * h + head
    }
}

/// Parameters of `SiglipMultiheadAttentionPoolingHead`, loaded but never run.
#[allow(dead_code)]
struct PoolingHead {
    probe: Tensor,
    in_proj_weight: Tensor,
    in_proj_bias: Tensor,
    out_proj: Linear,
    layernorm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

pub struct SiglipVisionTower {
    pub config: SiglipVisionConfig,
    patch_weight: Tensor,
    patch_bias: Tensor,
    position_embedding: Embedding,
    layers: Vec<EncoderLayer>,
    /// Applied only to the last hidden state; LLaVA reads `hidden_states`, which skip it.
    pub post_layernorm: LayerNorm,
    #[allow(dead_code)]
    head: Option<PoolingHead>,
    /// Recompute each encoder block in backward instead of keeping its activations.
    gradient_checkpointing: bool,
}

impl SiglipVisionTower {
    /// See [`visit_encoder_linears`]; `prefix` is the path the tower was built under.
    pub fn visit_linears(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Linear)) {
        visit_encoder_linears(&mut self.layers, prefix, f);
    }

    /// `p` is the path of `embeddings` / `encoder` / `post_layernorm` (the Hub's
    /// `vision_tower.vision_model`).
    pub fn new(p: &Path, c: &SiglipVisionConfig, init: ParamInit) -> SiglipVisionTower {
        let h = c.encoder.hidden_size;
        let e = p / "embeddings";
        let pe = &e / "patch_embedding";
        let head = c.vision_use_head.then(|| {
            let hp = p / "head";
            let attn = &hp / "attention";
            let mlp = &hp / "mlp";
            PoolingHead {
                probe: hp.var("probe", &[1, 1, h], weight_init(init)),
                in_proj_weight: attn.var("in_proj_weight", &[3 * h, h], weight_init(init)),
                in_proj_bias: attn.var("in_proj_bias", &[3 * h], Init::Const(0.0)),
                out_proj: Linear::new(&(&attn / "out_proj"), h, h, true, init),
                layernorm: LayerNorm::new(&(&hp / "layernorm"), h, c.encoder.layer_norm_eps),
                fc1: Linear::new(&(&mlp / "fc1"), h, c.encoder.intermediate_size, true, init),
                fc2: Linear::new(&(&mlp / "fc2"), c.encoder.intermediate_size, h, true, init),
            }
        });
        SiglipVisionTower {
            patch_weight: pe.var(
                "weight",
                &[h, c.num_channels, c.patch_size, c.patch_size],
                weight_init(init),
            ),
            patch_bias: pe.var("bias", &[h], Init::Const(0.0)),
            position_embedding: Embedding::new(
                &(&e / "position_embedding"),
                c.num_tokens(),
                h,
                init,
            ),
            layers: encoder_layers(p, &c.encoder, init),
            post_layernorm: LayerNorm::new(&(p / "post_layernorm"), h, c.encoder.layer_norm_eps),
            head,
            config: c.clone(),
            gradient_checkpointing: false,
        }
    }

    /// Trades compute for memory in training (see [`select_hidden_states`]).
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.gradient_checkpointing = on;
    }

    /// `transformers`' `hidden_states[i]` for each requested `i` (0 = embeddings, negative
    /// from the end), each `[N, patches, H]`, for `pixels: [N, C, S, S]` at `image_size`.
    pub fn hidden_states(&self, pixels: &Tensor, layers: &[i64]) -> Result<Vec<Tensor>> {
        let c = &self.config;
        let wanted = resolve_layers(layers, c.encoder.num_layers)?;
        let x = embed_patches(
            "SigLIP",
            pixels,
            &self.patch_weight,
            Some(&self.patch_bias),
            c.image_size,
        )?;
        let x = x + self.position_embedding.weight.unsqueeze(0);
        Ok(select_hidden_states(
            x,
            &self.layers,
            &wanted,
            self.gradient_checkpointing,
        ))
    }
}
