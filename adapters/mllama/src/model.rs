//! `MllamaForConditionalGeneration`: the vision model's features go through the projector
//! and reach the text decoder only through its cross-attention layers, masked per text
//! token by the `cross_attention_mask` the collator builds from the `<|image|>` positions.

use std::path::Path;

use anyhow::{ensure, Result};
use lmms_ft_core::family::{Component, Model, Trainable};
use lmms_ft_core::generate::DecodeState;
use lmms_ft_core::loss::LossTargets;
use lmms_ft_core::nn::{Linear, ParamInit};
use lmms_ft_core::weights::{load_into, LoadOptions};
use tch::{nn::VarStore, Device, Kind, Tensor};

use crate::config::MllamaConfig;
use crate::text::{CrossContext, TextModel};
use crate::vision::{finfo_min, VisionModel};

/// The image side of a batch, padded to the batch's most images.
#[derive(Debug)]
pub struct Images {
    /// `[B, N, max_num_tiles, 3, S, S]`.
    pub pixels: Tensor,
    /// `[B, N]`, 0 for padding images.
    pub aspect_ratio_ids: Tensor,
    /// `[B, N, max_num_tiles]`.
    pub aspect_ratio_mask: Tensor,
    /// `[B, T, N, max_num_tiles]`, 1 where a text token attends to a tile.
    pub cross_attention_mask: Tensor,
}

/// A device batch, as the collator builds it.
#[derive(Debug)]
pub struct Batch {
    /// `[B, T]`, right-padded.
    pub input_ids: Tensor,
    /// Where the loss is taken; `None` for inference.
    pub targets: Option<LossTargets>,
    /// `[B, T]`.
    pub position_ids: Tensor,
    pub images: Option<Images>,
}

pub struct MllamaModel {
    pub config: MllamaConfig,
    vs: VarStore,
    pub vision: VisionModel,
    projector: Linear,
    pub text: TextModel,
}

/// Hub prefixes: the checkpoint keeps transformers 4's layout.
const TEXT: &str = "language_model.model";
const LM_HEAD: &str = "language_model.lm_head";
const VISION: &str = "vision_model";
const PROJECTOR: &str = "multi_modal_projector";

impl MllamaModel {
    /// Builds the parameters (named as in the Hub checkpoint) in `kind` without loading.
    pub fn new_in(
        config: &MllamaConfig,
        device: Device,
        init: ParamInit,
        kind: Kind,
    ) -> Result<MllamaModel> {
        let mut vs = VarStore::new(device);
        vs.set_kind(kind);
        let root = vs.root();
        let vision = VisionModel::new(&(&root / VISION), &config.vision, init)?;
        let projector = Linear::new(
            &(&root / PROJECTOR),
            config.vision.vision_output_dim,
            config.text.decoder.hidden_size,
            true,
            init,
        );
        let text = TextModel::new(
            &(&root / "language_model" / "model"),
            &(&root / "language_model" / "lm_head"),
            &config.text,
            init,
        );
        Ok(MllamaModel {
            config: config.clone(),
            vs,
            vision,
            projector,
            text,
        })
    }

    pub fn load(
        config: &MllamaConfig,
        dir: &Path,
        device: Device,
        kind: Kind,
    ) -> Result<MllamaModel> {
        let model = MllamaModel::new_in(config, device, ParamInit::Zeros, kind)?;
        let tied = config.text.decoder.tie_word_embeddings;
        load_into(
            &model.vs,
            dir,
            &LoadOptions {
                ignore_unexpected: &|name| tied && name == "language_model.lm_head.weight",
            },
        )?;
        Ok(model)
    }

    /// Projected vision states and the prepared masks (`_prepare_cross_attention_mask`).
    pub fn cross_context(&self, images: &Images, kind: Kind) -> Result<CrossContext> {
        let feats = self.vision.forward(
            &images.pixels,
            &images.aspect_ratio_ids,
            &images.aspect_ratio_mask,
        )?;
        let size = feats.size();
        let (b, patches) = (size[0], size[3]);
        let h = self.config.text.decoder.hidden_size;
        let states = self
            .projector
            .forward(&feats)
            .reshape([b, -1, h])
            .to_kind(kind);
        let cam = &images.cross_attention_mask;
        let (cb, t) = (cam.size()[0], cam.size()[1]);
        ensure!(
            cb == b && cam.size()[2] == size[1] && cam.size()[3] == size[2],
            "cross-attention mask {:?} does not match the images {:?}",
            cam.size(),
            size
        );
        let min = finfo_min(kind);
        let m = cam
            .to_kind(kind)
            .repeat_interleave_self_int(patches, Some(3), None)
            .view([b, t, -1])
            .unsqueeze(1);
        let inverted = m.ones_like() - &m;
        let masked = inverted.masked_fill(&inverted.to_kind(Kind::Bool), min);
        let full_row = masked
            .ne(min)
            .any_dim(-1, false)
            .to_kind(kind)
            .unsqueeze(-1);
        // transformers lets a row that sees no image attend to every vision token of the
        // batch row; those of padding image slots are kept out, so that the row computes
        // the same next to a sample with more images as alone (equal when nothing is padded).
        let real = images.aspect_ratio_ids.ne(0).to_kind(kind);
        let per_slot = size[2] * patches;
        let slot_bias = (real.ones_like() - &real)
            .repeat_interleave_self_int(per_slot, Some(1), None)
            .view([b, 1, 1, -1])
            * min;
        let mask = &masked * &full_row + (full_row.ones_like() - &full_row) * slot_bias;
        let full_row = full_row.squeeze_dim(1);
        Ok(CrossContext {
            states,
            mask,
            has_images: full_row.amax([1], true),
            full_row,
        })
    }

    fn inputs(&self, batch: &Batch) -> Result<(Tensor, Option<CrossContext>)> {
        let embeds = self.text.embed(&batch.input_ids);
        let cross = match &batch.images {
            Some(images) => Some(self.cross_context(images, embeds.kind())?),
            None => None,
        };
        Ok((embeds, cross))
    }
}

impl Model for MllamaModel {
    type Batch = Batch;

    fn hidden_states(&self, batch: &Batch, _train: bool) -> Result<Tensor> {
        let (embeds, cross) = self.inputs(batch)?;
        ensure!(
            batch.position_ids.size() == batch.input_ids.size(),
            "position ids {:?} do not match the batch {:?}",
            batch.position_ids.size(),
            batch.input_ids.size()
        );
        let (cos, sin) = self.text.rotary(&batch.position_ids, embeds.kind());
        Ok(self.text.hidden_states(&embeds, &cos, &sin, cross.as_ref()))
    }

    fn loss_targets<'a>(&self, batch: &'a Batch) -> Option<&'a LossTargets> {
        batch.targets.as_ref()
    }

    fn lm_head(&self, hidden: &Tensor) -> Tensor {
        self.text.logits(hidden)
    }

    fn prefill(&self, batch: &Batch, lengths: &[usize]) -> Result<(Tensor, DecodeState)> {
        let (embeds, cross) = self.inputs(batch)?;
        self.text.prefill(&embeds, lengths, cross.as_ref())
    }

    fn decode_step(&self, state: &mut DecodeState, tokens: &[i64]) -> Result<Tensor> {
        let b = tokens.len() as i64;
        let ids = Tensor::from_slice(tokens)
            .view([b, 1])
            .to_device(self.vs.device());
        Ok(self.text.decode_step(state, &ids))
    }
}

impl Trainable for MllamaModel {
    fn var_store(&self) -> &VarStore {
        &self.vs
    }

    fn set_gradient_checkpointing(&mut self, on: bool) {
        self.text.set_gradient_checkpointing(on);
        self.vision.set_gradient_checkpointing(on);
    }

    fn visit_linears(&mut self, f: &mut dyn FnMut(&str, &mut Linear)) {
        self.vision.visit_linears(VISION, f);
        f(PROJECTOR, &mut self.projector);
        self.text.visit_linears(TEXT, LM_HEAD, f);
    }

    fn component(&self, name: &str) -> Component {
        if name.starts_with(PROJECTOR) {
            Component::Projector
        } else if name.starts_with(VISION) {
            Component::Vision
        } else {
            Component::Llm
        }
    }

    /// transformers 5 runs `model.language_model.*` (no inner `.model`), `lm_head`,
    /// `model.vision_model.*` and `model.multi_modal_projector`.
    fn runtime_name(&self, hub_name: &str) -> String {
        if let Some(rest) = hub_name.strip_prefix(TEXT) {
            format!("model.language_model{rest}")
        } else if let Some(rest) = hub_name.strip_prefix(LM_HEAD) {
            format!("lm_head{rest}")
        } else if hub_name.starts_with(VISION) || hub_name.starts_with(PROJECTOR) {
            format!("model.{hub_name}")
        } else {
            hub_name.to_string()
        }
    }
}
