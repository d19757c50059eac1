//! `Qwen2VLForConditionalGeneration` / `Qwen2_5_VLForConditionalGeneration`: vision tokens
//! replace the `<|image_pad|>` / `<|video_pad|>` embeddings, then the Qwen2 decoder runs with
//! M-RoPE positions.

use std::path::Path;

use anyhow::{ensure, Result};
use lmms_ft_backbones::decoder::Decoder;
use lmms_ft_core::family::{Component, Model, Prefix, Trainable};
use lmms_ft_core::generate::DecodeState;
use lmms_ft_core::loss::LossTargets;
use lmms_ft_core::nn::{Linear, ParamInit};
use lmms_ft_core::weights::{load_into, LoadOptions};
use tch::{nn::VarStore, Device, Kind, Tensor};

pub use lmms_ft_backbones::qwen_vl::batch::{Batch, Media};

use crate::config::Qwen2VlConfig;
use crate::rope::mrope_cos_sin;
use crate::vision::VisionTower;
use lmms_ft_backbones::qwen_vl::rope::decode_inputs;

pub struct Qwen2VlModel {
    pub config: Qwen2VlConfig,
    vs: VarStore,
    visual: VisionTower,
    decoder: Decoder,
}

impl Qwen2VlModel {
    /// Builds the parameters (named as in the Hub checkpoint) without loading weights.
    pub fn new(config: &Qwen2VlConfig, device: Device, init: ParamInit) -> Qwen2VlModel {
        Qwen2VlModel::new_in(config, device, init, Kind::Float)
    }

    /// [`Qwen2VlModel::new`] with every parameter created in `kind` directly: casting after
    /// an fp32 build would hold an fp32 copy of the model (2 GB for a 7B embedding alone).
    pub fn new_in(
        config: &Qwen2VlConfig,
        device: Device,
        init: ParamInit,
        kind: Kind,
    ) -> Qwen2VlModel {
        let mut vs = VarStore::new(device);
        vs.set_kind(kind);
        let root = vs.root();
        let visual = VisionTower::new(&(&root / "visual"), &config.vision, config.variant, init);
        let decoder = Decoder::new(&(&root / "model"), &(&root / "lm_head"), &config.text, init);
        Qwen2VlModel {
            config: config.clone(),
            vs,
            visual,
            decoder,
        }
    }

    /// Loads a checkpoint directory into a model of `kind` on `device`.
    pub fn load(
        config: &Qwen2VlConfig,
        dir: &Path,
        device: Device,
        kind: Kind,
    ) -> Result<Qwen2VlModel> {
        let model = Qwen2VlModel::new_in(config, device, ParamInit::Zeros, kind);
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

    /// Token embeddings with every media placeholder replaced by its vision token.
    fn embeddings(&self, batch: &Batch) -> Result<Tensor> {
        let mut embeds = self.decoder.embed(&batch.input_ids);
        for (media, token) in [
            (&batch.images, self.config.image_token_id),
            (&batch.videos, self.config.video_token_id),
        ] {
            if let Some(media) = media {
                let feats = self
                    .visual
                    .forward(&media.pixels, &media.grids)
                    .to_kind(embeds.kind());
                let mask = batch.input_ids.eq(token).unsqueeze(-1).expand_as(&embeds);
                embeds = embeds.masked_scatter(&mask, &feats);
            }
        }
        Ok(embeds)
    }

    fn rotary(&self, positions: &Tensor, embeds: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = &self.config.text;
        ensure!(
            positions.size() == [3, embeds.size()[0], embeds.size()[1]],
            "position ids {:?} do not match the batch",
            positions.size()
        );
        Ok(mrope_cos_sin(
            positions,
            self.config.mrope_section,
            t.head_dim,
            t.rope_theta,
            embeds.kind(),
            embeds.device(),
        ))
    }
}

impl Model for Qwen2VlModel {
    type Batch = Batch;

    fn hidden_states(&self, batch: &Batch, _train: bool) -> Result<Tensor> {
        let embeds = self.embeddings(batch)?;
        let (cos, sin) = self.rotary(&batch.position_ids, &embeds)?;
        Ok(self
            .decoder
            .hidden_states(&embeds, &cos, &sin, batch.attention_mask.as_ref()))
    }

    fn loss_targets<'a>(&self, batch: &'a Batch) -> Option<&'a LossTargets> {
        batch.targets.as_ref()
    }

    fn lm_head(&self, hidden: &Tensor) -> Tensor {
        self.decoder.logits(hidden)
    }

    fn prefill(&self, batch: &Batch, lengths: &[usize]) -> Result<(Tensor, DecodeState)> {
        let embeds = self.embeddings(batch)?;
        let (cos, sin) = self.rotary(&batch.position_ids, &embeds)?;
        // Text after the prompt continues from the row's largest position on all three axes,
        // as transformers' rope_deltas do; padding positions are 0, so they never raise it.
        let next: Vec<i64> = Vec::try_from(
            batch
                .position_ids
                .amax([0, 2], false)
                .to_device(Device::Cpu),
        )?;
        let next = next.into_iter().map(|p| p + 1).collect();
        self.decoder.prefill(&embeds, &cos, &sin, lengths, next)
    }

    fn decode_step(&self, state: &mut DecodeState, tokens: &[i64]) -> Result<Tensor> {
        let device = self.vs.device();
        let (ids, positions) = decode_inputs(tokens, &state.next_positions, device);
        let t = &self.config.text;
        let (cos, sin) = mrope_cos_sin(
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

impl Trainable for Qwen2VlModel {
    fn var_store(&self) -> &VarStore {
        &self.vs
    }

    fn set_gradient_checkpointing(&mut self, on: bool) {
        self.decoder.set_gradient_checkpointing(on);
        self.visual.set_gradient_checkpointing(on);
    }

    fn visit_linears(&mut self, f: &mut dyn FnMut(&str, &mut Linear)) {
        self.visual.visit_linears("visual", f);
        self.decoder.visit_linears("model", "lm_head", f);
    }

    /// transformers 5 nests the text model under `model.language_model` and the vision tower
    /// under `model.visual`; `lm_head` stays at the top. The merger is the projector.
    fn prefixes(&self) -> &'static [Prefix] {
        const TABLE: &[Prefix] = &[
            Prefix::new("visual.merger", "model.visual.merger", Component::Projector),
            Prefix::new("visual", "model.visual", Component::Vision),
            Prefix::new("model.", "model.language_model.", Component::Llm),
        ];
        TABLE
    }
}
