//! `Phi3VForCausalLM`: the image features replace the embeddings of the negative (media)
//! ids, then the Phi-3 decoder (fused `qkv_proj` / `gate_up_proj`) runs with su / longrope
//! rotary positions.

use std::path::Path;

use anyhow::{ensure, Result};
use lmms_ft_backbones::decoder::{rope_cos_sin, Decoder, DecoderOptions, ProjectionLayout};
use lmms_ft_core::family::{Component, Model, Trainable};
use lmms_ft_core::generate::DecodeState;
use lmms_ft_core::loss::LossTargets;
use lmms_ft_core::nn::{rope_inv_freq, Linear, ParamInit};
use lmms_ft_core::weights::{load_into, LoadOptions};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::config::Phi3VConfig;
use crate::vision::{ImageEmbedding, Images};

/// A device batch.
#[derive(Debug)]
pub struct Batch {
    /// `[B, T]`, right-padded; image tokens are negative (`-N` for image N of the sample).
    pub input_ids: Tensor,
    /// Where the loss is taken; `None` for inference.
    pub targets: Option<LossTargets>,
    /// `[B, T]` positions (restarting per sample in packed rows).
    pub position_ids: Tensor,
    /// `[B, T]` bool: which tokens rotate with the long factors (their sample is longer than
    /// `original_max_position_embeddings`).
    pub long_rope: Tensor,
    pub images: Option<Images>,
    /// Media tokens in `input_ids`, counted on the host by the collator.
    pub media_tokens: i64,
    /// Packed rows: `[B, 1, T, T]` bool (true = attend); `None` for plain causal rows.
    pub attention_mask: Option<Tensor>,
}

pub struct Phi3VModel {
    pub config: Phi3VConfig,
    vs: VarStore,
    vision: ImageEmbedding,
    decoder: Decoder,
}

/// The checkpoint's second name for the embeddings, which the image embedding shares.
const SHARED_WTE: &str = "model.vision_embed_tokens.wte.weight";

impl Phi3VModel {
    /// Builds the parameters, named as in the Hub checkpoint, in `kind`, without loading.
    pub fn new_in(config: &Phi3VConfig, device: Device, init: ParamInit, kind: Kind) -> Phi3VModel {
        let mut vs = VarStore::new(device);
        vs.set_kind(kind);
        let root = vs.root();
        let vision = ImageEmbedding::new(&(&root / "model" / "vision_embed_tokens"), config, init);
        let opts = DecoderOptions {
            projections: ProjectionLayout::Fused,
            ..DecoderOptions::default()
        };
        let decoder = Decoder::new_with(
            &(&root / "model"),
            &(&root / "lm_head"),
            &config.text,
            &opts,
            init,
        );
        Phi3VModel {
            config: config.clone(),
            vs,
            vision,
            decoder,
        }
    }

    pub fn load(
        config: &Phi3VConfig,
        dir: &Path,
        device: Device,
        kind: Kind,
    ) -> Result<Phi3VModel> {
        let model = Phi3VModel::new_in(config, device, ParamInit::Zeros, kind);
        let tied = config.text.tie_word_embeddings;
        load_into(
            &model.vs,
            dir,
            &LoadOptions {
                ignore_unexpected: &|name| name == SHARED_WTE || (tied && name == "lm_head.weight"),
            },
        )?;
        Ok(model)
    }

    /// Token embeddings with the media tokens replaced by image features.
    fn embeddings(&self, batch: &Batch) -> Result<Tensor> {
        let mut embeds = self.decoder.embed(&batch.input_ids.clamp_min(0));
        match &batch.images {
            Some(images) => {
                let feats = self.vision.forward(images)?;
                ensure!(
                    feats.size()[0] == batch.media_tokens,
                    "the batch has {} image tokens but its images give {} features",
                    batch.media_tokens,
                    feats.size()[0]
                );
                let mask = batch.input_ids.lt(0).unsqueeze(-1).expand_as(&embeds);
                embeds = embeds.masked_scatter(&mask, &feats.to_kind(embeds.kind()));
            }
            None => ensure!(
                batch.media_tokens == 0,
                "the batch has {} image tokens but no images",
                batch.media_tokens
            ),
        }
        Ok(embeds)
    }

    fn check_window(&self, len: i64) -> Result<()> {
        if let Some(window) = self.config.sliding_window {
            ensure!(
                len <= window,
                "sequence of {len} tokens exceeds the sliding window of {window}, which is not implemented"
            );
        }
        Ok(())
    }

    /// Rotary tables for `positions` / `long` (`[B, T]`), in the decoder's dtype.
    fn rotary(&self, positions: &Tensor, long: &Tensor) -> (Tensor, Tensor) {
        let t = &self.config.text;
        let kind = self.decoder.embed_tokens.weight.kind();
        match &self.config.rope_scaling {
            Some(r) => r.cos_sin(positions, long, t.head_dim, self.config.rope_theta, kind),
            None => {
                let inv = rope_inv_freq(t.head_dim, self.config.rope_theta, positions.device());
                rope_cos_sin(positions, &inv, kind)
            }
        }
    }

    /// Per-row long-factor choice for rows whose largest positions are `max_positions`.
    fn long_rows(&self, max_positions: &[i64], width: i64) -> Tensor {
        let flags: Vec<bool> = max_positions
            .iter()
            .map(|&p| {
                self.config
                    .rope_scaling
                    .as_ref()
                    .is_some_and(|r| r.is_long(p))
            })
            .collect();
        let b = flags.len() as i64;
        Tensor::from_slice(&flags)
            .view([b, 1])
            .expand([b, width], false)
            .to_device(self.vs.device())
    }
}

impl Model for Phi3VModel {
    type Batch = Batch;

    fn hidden_states(&self, batch: &Batch, _train: bool) -> Result<Tensor> {
        let embeds = self.embeddings(batch)?;
        self.check_window(embeds.size()[1])?;
        let (cos, sin) = self.rotary(&batch.position_ids, &batch.long_rope);
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

    /// Prompt rows are right-padded with positions `0..T`; each row picks its factors by its
    /// own length, as the Hub code does for that prompt alone.
    fn prefill(&self, batch: &Batch, lengths: &[usize]) -> Result<(Tensor, DecodeState)> {
        let embeds = self.embeddings(batch)?;
        let (b, t) = (embeds.size()[0], embeds.size()[1]);
        self.check_window(t)?;
        let positions = Tensor::arange(t, (Kind::Int64, embeds.device()))
            .unsqueeze(0)
            .expand([b, t], false);
        let last: Vec<i64> = lengths.iter().map(|&l| l as i64 - 1).collect();
        let (cos, sin) = self.rotary(&positions, &self.long_rows(&last, t));
        let next = lengths.iter().map(|&l| l as i64).collect();
        self.decoder.prefill(&embeds, &cos, &sin, lengths, next)
    }

    fn decode_step(&self, state: &mut DecodeState, tokens: &[i64]) -> Result<Tensor> {
        let b = tokens.len() as i64;
        if let Some(&last) = state.next_positions.iter().max() {
            self.check_window(last + 1)?;
        }
        let device = self.vs.device();
        let ids = Tensor::from_slice(tokens).view([b, 1]).to_device(device);
        let positions = Tensor::from_slice(&state.next_positions)
            .view([b, 1])
            .to_device(device);
        let long = self.long_rows(&state.next_positions, 1);
        let (cos, sin) = self.rotary(&positions, &long);
        Ok(self.decoder.decode_step(state, &ids, &cos, &sin))
    }
}

impl Trainable for Phi3VModel {
    fn var_store(&self) -> &VarStore {
        &self.vs
    }

    fn set_gradient_checkpointing(&mut self, on: bool) {
        self.decoder.set_gradient_checkpointing(on);
        self.vision.set_gradient_checkpointing(on);
    }

    fn visit_linears(&mut self, f: &mut dyn FnMut(&str, &mut Linear)) {
        self.vision.visit_linears(f);
        self.decoder.visit_linears("model", "lm_head", f);
    }

    fn component(&self, name: &str) -> Component {
        let Some(rest) = name.strip_prefix(ImageEmbedding::PREFIX) else {
            return Component::Llm;
        };
        if rest.starts_with(".img_processor") {
            Component::Vision
        } else {
            Component::Projector
        }
    }
}
