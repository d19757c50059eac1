//! `Qwen3VLForConditionalGeneration`: vision tokens replace the `<|image_pad|>` /
//! `<|video_pad|>` embeddings, the Qwen3 decoder (q/k RMSNorm) runs with interleaved M-RoPE,
//! and DeepStack adds the i-th DeepStack feature to the output of LLM layer i at the visual
//! positions. Parameter names are the Hub's, which for Qwen3-VL are also transformers' run-time
//! names (`model.language_model.*`, `model.visual.*`, `lm_head`).

use std::path::Path;

use anyhow::{ensure, Result};
use lmms_ft_backbones::decoder::Decoder;
use lmms_ft_backbones::qwen_vl::rope::{decode_inputs, mrope_cos_sin_interleaved};
use lmms_ft_core::family::{Component, Model, Prefix, Trainable};
use lmms_ft_core::generate::DecodeState;
use lmms_ft_core::loss::LossTargets;
use lmms_ft_core::nn::{Linear, ParamInit};
use lmms_ft_core::weights::{load_into, LoadOptions};
use tch::{nn::VarStore, Device, Kind, Tensor};

pub use lmms_ft_backbones::qwen_vl::batch::{Batch, Media};

use crate::config::Qwen3VlConfig;
use crate::vision::VisionTower;

pub const VISUAL: &str = "model.visual";
pub const LANGUAGE_MODEL: &str = "model.language_model";

pub struct Qwen3VlModel {
    pub config: Qwen3VlConfig,
    vs: VarStore,
    visual: VisionTower,
    decoder: Decoder,
}

/// Token embeddings with the vision tokens in place, and what DeepStack adds to each early
/// layer: `(mask [B, T, H] of the visual positions, features in their order)` per layer.
struct Embedded {
    embeds: Tensor,
    deepstack: Vec<Vec<(Tensor, Tensor)>>,
}

impl Qwen3VlModel {
    /// Builds the parameters (named as in the Hub checkpoint) in `kind`, without weights.
    pub fn new_in(
        config: &Qwen3VlConfig,
        device: Device,
        init: ParamInit,
        kind: Kind,
    ) -> Qwen3VlModel {
        let mut vs = VarStore::new(device);
        vs.set_kind(kind);
        let root = vs.root();
        let visual = VisionTower::new(&(&root / "model" / "visual"), &config.vision, init);
        let decoder = Decoder::new_with(
            &(&root / "model" / "language_model"),
            &(&root / "lm_head"),
            &config.text,
            &config.decoder_options(),
            init,
        );
        Qwen3VlModel {
            config: config.clone(),
            vs,
            visual,
            decoder,
        }
    }

    /// Loads a checkpoint directory into a model of `kind` on `device`.
    pub fn load(
        config: &Qwen3VlConfig,
        dir: &Path,
        device: Device,
        kind: Kind,
    ) -> Result<Qwen3VlModel> {
        let model = Qwen3VlModel::new_in(config, device, ParamInit::Zeros, kind);
        let tied = config.text.tie_word_embeddings;
        load_into(
            &model.vs,
            dir,
            &LoadOptions {
                // Tied checkpoints may still carry a copy of the embeddings as lm_head.
                ignore_unexpected: &|name| tied && name == "lm_head.weight",
            },
        )?;
        Ok(model)
    }

    fn embed(&self, batch: &Batch) -> Result<Embedded> {
        let mut embeds = self.decoder.embed(&batch.input_ids);
        let layers = self.config.vision.deepstack_visual_indexes.len();
        let mut deepstack: Vec<Vec<(Tensor, Tensor)>> = (0..layers).map(|_| Vec::new()).collect();
        for (media, token) in [
            (&batch.images, self.config.image_token_id),
            (&batch.videos, self.config.video_token_id),
        ] {
            let Some(media) = media else { continue };
            let out = self.visual.forward(&media.pixels, &media.grids);
            let mask = batch.input_ids.eq(token).unsqueeze(-1).expand_as(&embeds);
            embeds = embeds.masked_scatter(&mask, &out.tokens.to_kind(embeds.kind()));
            for (layer, feature) in deepstack.iter_mut().zip(out.deepstack) {
                layer.push((mask.shallow_clone(), feature));
            }
        }
        Ok(Embedded { embeds, deepstack })
    }

    fn rotary(&self, positions: &Tensor, embeds: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = &self.config.text;
        ensure!(
            positions.size() == [3, embeds.size()[0], embeds.size()[1]],
            "position ids {:?} do not match the batch",
            positions.size()
        );
        Ok(mrope_cos_sin_interleaved(
            positions,
            self.config.mrope_section,
            t.head_dim,
            t.rope_theta,
            embeds.kind(),
            embeds.device(),
        ))
    }
}

/// Adds layer `i`'s DeepStack features at their visual positions (exactly transformers'
/// `hidden[mask] += features`: zeros elsewhere add nothing).
fn deepstack_add(deepstack: &[Vec<(Tensor, Tensor)>], i: usize, h: Tensor) -> Tensor {
    match deepstack.get(i) {
        Some(parts) if !parts.is_empty() => {
            let mut add = h.zeros_like();
            for (mask, feature) in parts {
                add = add.masked_scatter(mask, &feature.to_kind(h.kind()));
            }
            h + add
        }
        _ => h,
    }
}

impl Model for Qwen3VlModel {
    type Batch = Batch;

    fn hidden_states(&self, batch: &Batch, _train: bool) -> Result<Tensor> {
        let e = self.embed(batch)?;
        let (cos, sin) = self.rotary(&batch.position_ids, &e.embeds)?;
        let hook = |i: usize, h: Tensor| deepstack_add(&e.deepstack, i, h);
        Ok(self.decoder.hidden_states_hooked(
            &e.embeds,
            &cos,
            &sin,
            batch.attention_mask.as_ref(),
            Some(&hook),
        ))
    }

    fn loss_targets<'a>(&self, batch: &'a Batch) -> Option<&'a LossTargets> {
        batch.targets.as_ref()
    }

    fn lm_head(&self, hidden: &Tensor) -> Tensor {
        self.decoder.logits(hidden)
    }

    fn prefill(&self, batch: &Batch, lengths: &[usize]) -> Result<(Tensor, DecodeState)> {
        let e = self.embed(batch)?;
        let (cos, sin) = self.rotary(&batch.position_ids, &e.embeds)?;
        // Text after the prompt continues from the row's largest position on all three axes,
        // as transformers' rope_deltas do; padding positions are 0, so they never raise it.
        let next: Vec<i64> = Vec::try_from(
            batch
                .position_ids
                .amax([0, 2], false)
                .to_device(Device::Cpu),
        )?;
        let next = next.into_iter().map(|p| p + 1).collect();
        let hook = |i: usize, h: Tensor| deepstack_add(&e.deepstack, i, h);
        self.decoder
            .prefill_hooked(&e.embeds, &cos, &sin, lengths, next, Some(&hook))
    }

    fn decode_step(&self, state: &mut DecodeState, tokens: &[i64]) -> Result<Tensor> {
        let device = self.vs.device();
        let (ids, positions) = decode_inputs(tokens, &state.next_positions, device);
        let t = &self.config.text;
        let (cos, sin) = mrope_cos_sin_interleaved(
            &positions,
            self.config.mrope_section,
            t.head_dim,
            t.rope_theta,
            self.decoder.embed_tokens.weight.kind(),
            device,
        );
        Ok(self.decoder.decode_step(state, &ids, &cos, &sin))
    }
}

impl Trainable for Qwen3VlModel {
    fn var_store(&self) -> &VarStore {
        &self.vs
    }

    fn set_gradient_checkpointing(&mut self, on: bool) {
        self.decoder.set_gradient_checkpointing(on);
        self.visual.set_gradient_checkpointing(on);
    }

    fn visit_linears(&mut self, f: &mut dyn FnMut(&str, &mut Linear)) {
        self.visual.visit_linears(VISUAL, f);
        self.decoder.visit_linears(LANGUAGE_MODEL, "lm_head", f);
    }

    /// Hub and run-time names agree (transformers 5 layout). The merger and the DeepStack
    /// mergers are the projector: they map vision features into the LLM's space.
    fn prefixes(&self) -> &'static [Prefix] {
        const TABLE: &[Prefix] = &[
            Prefix::new(
                "model.visual.merger",
                "model.visual.merger",
                Component::Projector,
            ),
            Prefix::new(
                "model.visual.deepstack_merger_list",
                "model.visual.deepstack_merger_list",
                Component::Projector,
            ),
            Prefix::new(VISUAL, VISUAL, Component::Vision),
        ];
        TABLE
    }
}
