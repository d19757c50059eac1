//! `Qwen2VLForConditionalGeneration` / `Qwen2_5_VLForConditionalGeneration`: vision tokens
//! replace the `<|image_pad|>` / `<|video_pad|>` embeddings, then the Qwen2 decoder runs with
//! M-RoPE positions.

use std::path::Path;

use anyhow::{ensure, Result};
use lmms_ft_backbones::decoder::Decoder;
use lmms_ft_core::family::{Component, Model};
use lmms_ft_core::generate::DecodeState;
use lmms_ft_core::loss::LossTargets;
use lmms_ft_core::nn::{Linear, ParamInit};
use lmms_ft_core::weights::{load_into, LoadOptions};
use tch::{nn::VarStore, Device, Kind, Tensor};

use crate::config::Qwen2VlConfig;
use crate::rope::mrope_cos_sin;
use crate::vision::VisionTower;

/// Processed media of a batch: flattened patches and their `(t, h, w)` grids.
#[derive(Debug)]
pub struct Media {
    pub pixels: Tensor,
    pub grids: Vec<[i64; 3]>,
}

/// A device batch, as the collator builds it.
#[derive(Debug)]
pub struct Batch {
    /// `[B, T]`, right-padded.
    pub input_ids: Tensor,
    /// Where the loss is taken; `None` for inference.
    pub targets: Option<LossTargets>,
    /// `[3, B, T]` M-RoPE positions (restarting per sample in packed rows).
    pub position_ids: Tensor,
    pub images: Option<Media>,
    pub videos: Option<Media>,
    /// Packed rows (`data.packing`): `[B, 1, T, T]` bool, true where a token may attend
    /// (its own sample, causally); `None` for padded rows, which are plain causal.
    pub attention_mask: Option<Tensor>,
}

pub struct Qwen2VlModel {
    pub config: Qwen2VlConfig,
    vs: VarStore,
    visual: VisionTower,
    decoder: Decoder,
}

impl Qwen2VlModel {
    /// Builds the parameters (named as in the Hub checkpoint) without loading weights.
    pub fn new(config: &Qwen2VlConfig, device: Device, init: ParamInit) -> Qwen2VlModel {
        let vs = VarStore::new(device);
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
        let mut model = Qwen2VlModel::new(config, device, ParamInit::Zeros);
        model.vs.set_kind(kind);
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

    /// Logits `[vocab]` of the last position of row 0.
    fn last_logits(&self, hidden: &Tensor) -> Tensor {
        let t = hidden.size()[1];
        self.decoder.logits(&hidden.get(0).get(t - 1))
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

    fn var_store(&self) -> &VarStore {
        &self.vs
    }

    fn set_gradient_checkpointing(&mut self, on: bool) {
        self.decoder.set_gradient_checkpointing(on);
        self.visual.set_gradient_checkpointing(on);
    }

    fn prefill(&self, batch: &Batch) -> Result<(Tensor, DecodeState)> {
        ensure!(
            batch.input_ids.size()[0] == 1,
            "generation takes one prompt at a time"
        );
        let embeds = self.embeddings(batch)?;
        let (cos, sin) = self.rotary(&batch.position_ids, &embeds)?;
        let mut state = DecodeState::default();
        let hidden = self
            .decoder
            .hidden_states_cached(&embeds, &cos, &sin, &mut state.cache);
        // Text after the prompt continues from its largest position on all three axes, as
        // transformers' rope_deltas do.
        state.next_position = batch.position_ids.max().int64_value(&[]) + 1;
        Ok((self.last_logits(&hidden), state))
    }

    fn decode_step(&self, state: &mut DecodeState, token: i64) -> Result<Tensor> {
        let device = self.vs.device();
        let ids = Tensor::from_slice(&[token]).view([1, 1]).to_device(device);
        let embeds = self.decoder.embed(&ids);
        let positions = Tensor::from_slice(&[state.next_position; 3])
            .view([3, 1, 1])
            .to_device(device);
        let (cos, sin) = self.rotary(&positions, &embeds)?;
        let hidden = self
            .decoder
            .hidden_states_cached(&embeds, &cos, &sin, &mut state.cache);
        state.next_position += 1;
        Ok(self.last_logits(&hidden))
    }

    fn visit_linears(&mut self, f: &mut dyn FnMut(&str, &mut Linear)) {
        self.visual.visit_linears("visual", f);
        self.decoder.visit_linears("model", "lm_head", f);
    }

    fn component(&self, name: &str) -> Component {
        if name.starts_with("visual.merger") {
            Component::Projector
        } else if name.starts_with("visual") {
            Component::Vision
        } else {
            Component::Llm
        }
    }

    /// transformers 5 nests the text model under `model.language_model` and the vision tower
    /// under `model.visual`; `lm_head` stays at the top.
    fn runtime_name(&self, hub_name: &str) -> String {
        if let Some(rest) = hub_name.strip_prefix("visual") {
            format!("model.visual{rest}")
        } else if let Some(rest) = hub_name.strip_prefix("model.") {
            format!("model.language_model.{rest}")
        } else {
            hub_name.to_string()
        }
    }
}
