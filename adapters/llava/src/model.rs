//! `LlavaForConditionalGeneration`, `LlavaNextForConditionalGeneration`,
//! `LlavaNextVideoForConditionalGeneration` and `LlavaOnevisionForConditionalGeneration`:
//! vision tower → selected hidden states → two-layer projector → the features replace the
//! `<image>` / `<video>` placeholder embeddings (anyres packing with `image_newline` for all
//! but LLaVA-1.5; video pooling in [`crate::video`]) → the text decoder with plain 1-D rotary
//! positions.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use lmms_ft_backbones::clip::ClipVisionTower;
use lmms_ft_backbones::decoder::{rope_cos_sin, Decoder};
use lmms_ft_backbones::encoder::VisionEncoder;
use lmms_ft_backbones::siglip::SiglipVisionTower;
use lmms_ft_core::family::{Component, Model, Prefix, Trainable};
use lmms_ft_core::generate::DecodeState;
use lmms_ft_core::loss::LossTargets;
use lmms_ft_core::nn::{rope_inv_freq, Linear, ParamInit};
use tch::nn::{Init, VarStore};
use tch::{Device, Kind, Tensor};

use crate::anyres::{anyres_max_shape, unpad_ranges, Tiling};
use crate::config::{LlavaConfig, SelectStrategy, VisionConfig};
use crate::weights::load_llava;

/// A device batch.
#[derive(Debug)]
pub struct Batch {
    /// `[B, T]`, right-padded.
    pub input_ids: Tensor,
    /// Where the loss is taken; `None` for inference.
    pub targets: Option<LossTargets>,
    /// LLaVA: `[images, C, S, S]`. NeXT: every image's tiles concatenated (`[tiles, C, S,
    /// S]`, base tile first), or the processor's `[images, max_tiles, C, S, S]`, whose
    /// padding tiles are dropped using `image_sizes`.
    pub pixel_values: Option<Tensor>,
    /// `(height, width)` of each original image; required by NeXT, ignored by LLaVA.
    pub image_sizes: Vec<[i64; 2]>,
    /// Per image, whether it was tiled anyres-style; `false` for each image of a OneVision
    /// multi-image sample, which is one tile. Empty means every image was (NeXT always is).
    pub image_anyres: Vec<bool>,
    /// Video frames, `[frames, C, S, S]` (every video's frames concatenated) or
    /// `[videos, frames, C, S, S]`.
    pub pixel_values_videos: Option<Tensor>,
    /// Frames of each video, in placeholder order; may be empty for 5-D video pixels.
    pub video_frames: Vec<i64>,
    /// `<image>` and `<video>` placeholder tokens in `input_ids`, counted on the host (by the
    /// collator), so checking them against the features needs no device sync.
    pub media_tokens: [i64; 2],
    /// Packed rows (`data.packing`): `[B, T]` positions restarting per sample, and the
    /// `[B, 1, T, T]` bool mask confining attention to each sample. `None` for padded rows
    /// (positions `0..T`, plain causal attention).
    pub packing: Option<PackedLayout>,
}

/// Positions and attention mask of packed rows.
#[derive(Debug)]
pub struct PackedLayout {
    pub position_ids: Tensor,
    pub attention_mask: Tensor,
}

pub struct LlavaModel {
    pub config: LlavaConfig,
    vs: VarStore,
    tower: Box<dyn VisionEncoder>,
    linear_1: Linear,
    linear_2: Linear,
    pub(crate) image_newline: Option<Tensor>,
    decoder: Decoder,
}

impl LlavaModel {
    /// Builds the parameters, named as in the llava-hf Hub checkpoints, without loading.
    pub fn new(config: &LlavaConfig, device: Device, init: ParamInit) -> LlavaModel {
        LlavaModel::new_in(config, device, init, Kind::Float)
    }

    /// [`LlavaModel::new`] with every parameter created in `kind` directly, so a bf16 load
    /// never holds an fp32 copy of the model.
    pub fn new_in(config: &LlavaConfig, device: Device, init: ParamInit, kind: Kind) -> LlavaModel {
        let mut vs = VarStore::new(device);
        vs.set_kind(kind);
        let root = vs.root();
        let vp = &root / "vision_tower" / "vision_model";
        let tower: Box<dyn VisionEncoder> = match &config.vision {
            VisionConfig::Clip(c) => Box::new(ClipVisionTower::new(&vp, c, init)),
            VisionConfig::Siglip(c) => Box::new(SiglipVisionTower::new(&vp, c, init)),
        };
        let pp = &root / "multi_modal_projector";
        let h = config.text.decoder.hidden_size;
        let vin = config.vision.hidden_size() * config.vision_feature_layers.len() as i64;
        let linear_1 = Linear::new(&(&pp / "linear_1"), vin, h, config.projector_bias, init);
        let linear_2 = Linear::new(&(&pp / "linear_2"), h, h, config.projector_bias, init);
        let image_newline = config.architecture.anyres().then(|| {
            let std = 1.0 / (h as f64).sqrt();
            root.var(
                "image_newline",
                &[h],
                Init::Randn {
                    mean: 0.0,
                    stdev: std,
                },
            )
        });
        let lm = &root / "language_model";
        let decoder = Decoder::new(
            &(&lm / "model"),
            &(&lm / "lm_head"),
            &config.text.decoder,
            init,
        );
        LlavaModel {
            config: config.clone(),
            vs,
            tower,
            linear_1,
            linear_2,
            image_newline,
            decoder,
        }
    }

    /// Loads a checkpoint directory (any of the layouts [`crate::weights`] accepts).
    pub fn load(
        config: &LlavaConfig,
        dir: &Path,
        device: Device,
        kind: Kind,
    ) -> Result<LlavaModel> {
        let model = LlavaModel::new_in(config, device, ParamInit::Zeros, kind);
        let tied = config.text.decoder.tie_word_embeddings;
        // Tied checkpoints may still carry the head as a copy of the embeddings.
        load_llava(&model.vs, dir, &|name| {
            tied && name == "language_model.lm_head.weight"
        })?;
        Ok(model)
    }

    /// Selected (strategy applied) and concatenated tower features of a stack of tiles,
    /// before the projector: `[tiles, tokens_per_tile, layers × vision hidden]`. Public so a
    /// tower's features can be held against `transformers`' `hidden_states` directly.
    pub fn selected_features(&self, pixels: &Tensor) -> Result<Tensor> {
        let layers = &self.config.vision_feature_layers;
        let states = self.tower.hidden_states(pixels, layers)?;
        let states: Vec<Tensor> = match self.config.select_strategy {
            SelectStrategy::Default => states
                .iter()
                .map(|s| s.narrow(1, 1, s.size()[1] - 1))
                .collect(),
            SelectStrategy::Full => states,
        };
        Ok(Tensor::cat(&states, -1))
    }

    /// The two-layer projector.
    pub(crate) fn project(&self, selected: &Tensor) -> Tensor {
        let x = self.linear_1.forward(selected);
        self.linear_2.forward(&self.config.projector_act.apply(&x))
    }

    /// Projected features `[tiles, tokens_per_tile, H]` of a stack of tiles.
    fn tile_features(&self, pixels: &Tensor) -> Result<Tensor> {
        Ok(self.project(&self.selected_features(pixels)?))
    }

    /// Image features in placeholder order, `[total_tokens, H]`.
    fn image_features(&self, pixels: &Tensor, batch: &Batch) -> Result<Tensor> {
        if self.config.architecture.anyres() {
            return self.anyres_features(pixels, &batch.image_sizes, &batch.image_anyres);
        }
        ensure!(
            pixels.dim() == 4,
            "LLaVA pixel values must be [images, C, H, W], got {:?}",
            pixels.size()
        );
        Ok(self.tile_features(pixels)?.flatten(0, 1))
    }

    /// `pack_image_features`: per anyres image, the base tile's features, then the tile
    /// grid's feature map unpadded to the image's aspect ratio (OneVision: then downscaled to
    /// its `anyres_max` budget) with `image_newline` ending each row; per single-tile image
    /// (OneVision multi-image samples), its features then one `image_newline`.
    fn anyres_features(
        &self,
        pixels: &Tensor,
        sizes: &[[i64; 2]],
        anyres: &[bool],
    ) -> Result<Tensor> {
        let c = &self.config;
        let tile = c.vision.image_size();
        ensure!(
            anyres.is_empty() || anyres.len() == sizes.len(),
            "{} anyres flags for {} images",
            anyres.len(),
            sizes.len()
        );
        let tilings = sizes
            .iter()
            .enumerate()
            .map(|(i, &s)| {
                ensure!(s[0] > 0 && s[1] > 0, "image size {s:?} must be positive");
                if !anyres.get(i).copied().unwrap_or(true) {
                    return Ok(None);
                }
                Tiling::new(s, &c.image_grid_pinpoints, tile)
                    .context("image_grid_pinpoints is empty")
                    .map(Some)
            })
            .collect::<Result<Vec<_>>>()?;
        let tiles_of = |t: &Option<Tiling>| t.as_ref().map_or(1, Tiling::num_tiles);
        let pixels = match pixels.dim() {
            4 => pixels.shallow_clone(),
            5 => {
                let per: Vec<Tensor> = tilings
                    .iter()
                    .enumerate()
                    .map(|(i, t)| pixels.get(i as i64).narrow(0, 0, tiles_of(t)))
                    .collect();
                Tensor::cat(&per, 0)
            }
            _ => bail!(
                "LLaVA-NeXT pixel values must be 4-D or 5-D, got {:?}",
                pixels.size()
            ),
        };
        let total: i64 = tilings.iter().map(tiles_of).sum();
        ensure!(
            pixels.size()[0] == total,
            "{} tiles given but the image sizes call for {total}",
            pixels.size()[0]
        );
        let feats = self.tile_features(&pixels)?;
        let (per_tile, dim) = (feats.size()[1], feats.size()[2]);
        let grid = tile / c.vision.patch_size();
        let newline = self
            .image_newline
            .as_ref()
            .context("NeXT model without image_newline")?;
        let mut out = Vec::with_capacity(sizes.len());
        let mut start = 0;
        for (size, tiling) in sizes.iter().zip(&tilings) {
            let f = feats.narrow(0, start, tiles_of(tiling));
            start += tiles_of(tiling);
            let base = f.get(0);
            let Some(tiling) = tiling else {
                out.push(Tensor::cat(
                    &[base, newline.to_kind(f.kind()).view([1, dim])],
                    0,
                ));
                continue;
            };
            ensure!(
                per_tile == grid * grid,
                "{per_tile} features per tile cannot form a {grid}x{grid} grid (a CLS token kept with the \"full\" strategy?)"
            );
            let (rows, cols) = (tiling.rows, tiling.cols);
            let map = f
                .narrow(0, 1, rows * cols)
                .view([rows, cols, grid, grid, dim])
                .permute([4, 0, 2, 1, 3])
                .reshape([dim, rows * grid, cols * grid]);
            let (r0, r1, c0, c1) = unpad_ranges(*size, [rows * grid, cols * grid]);
            let map = map.narrow(1, r0, r1 - r0).narrow(2, c0, c1 - c0);
            let map = match c.max_patches {
                Some(max) => {
                    let (h, w) = anyres_max_shape(r1 - r0, c1 - c0, grid, max);
                    if (h, w) == (r1 - r0, c1 - c0) {
                        map
                    } else {
                        map.unsqueeze(0)
                            .upsample_bilinear2d([h, w], false, None, None)
                            .squeeze_dim(0)
                    }
                }
                None => map,
            };
            let nl = newline
                .to_kind(map.kind())
                .view([dim, 1, 1])
                .expand([dim, map.size()[1], 1], false);
            let map = Tensor::cat(&[map, nl], 2).flatten(1, 2).transpose(0, 1);
            out.push(Tensor::cat(&[base, map], 0));
        }
        Ok(Tensor::cat(&out, 0))
    }

    /// Token embeddings with the `<image>` / `<video>` placeholders replaced by features.
    fn embeddings(&self, batch: &Batch) -> Result<Tensor> {
        let mut embeds = self.decoder.embed(&batch.input_ids);
        if let Some(pixels) = &batch.pixel_values {
            let feats = self.image_features(pixels, batch)?;
            embeds = scatter(
                &embeds,
                &batch.input_ids,
                (self.config.image_token_id, batch.media_tokens[0]),
                &feats,
                "image",
            )?;
        }
        if let Some(frames) = &batch.pixel_values_videos {
            let id = self
                .config
                .video_token_id
                .context("this LLaVA architecture takes no videos")?;
            let feats = self.video_features(frames, &batch.video_frames)?;
            let placeholders = (id, batch.media_tokens[1]);
            embeds = scatter(&embeds, &batch.input_ids, placeholders, &feats, "video")?;
        }
        Ok(embeds)
    }

    /// Final hidden states `[B, T, H]`.
    fn final_hidden(&self, batch: &Batch) -> Result<Tensor> {
        let embeds = self.embeddings(batch)?;
        let (b, t) = (embeds.size()[0], embeds.size()[1]);
        self.check_window(t)?;
        let positions = match &batch.packing {
            Some(p) => p.position_ids.shallow_clone(),
            None => Tensor::arange(t, (Kind::Int64, embeds.device()))
                .unsqueeze(0)
                .expand([b, t], false),
        };
        let (cos, sin) = self.rotary(&positions);
        let mask = batch.packing.as_ref().map(|p| &p.attention_mask);
        Ok(self.decoder.hidden_states(&embeds, &cos, &sin, mask))
    }

    /// The shared decoder has only full causal attention, equal to sliding-window attention
    /// up to the window's length.
    fn check_window(&self, len: i64) -> Result<()> {
        if let Some(window) = self.config.text.sliding_window {
            ensure!(
                len <= window,
                "sequence of {len} tokens exceeds the text model's sliding window of {window}, which is not implemented"
            );
        }
        Ok(())
    }

    /// Plain 1-D rotary tables for `positions: [B, T]`, in the decoder's dtype.
    fn rotary(&self, positions: &Tensor) -> (Tensor, Tensor) {
        let d = &self.config.text.decoder;
        let inv_freq = rope_inv_freq(d.head_dim, d.rope_theta, positions.device());
        rope_cos_sin(
            positions,
            &inv_freq,
            self.decoder.embed_tokens.weight.kind(),
        )
    }
}

/// `masked_scatter` of `feats` (`[tokens, H]`) into the positions of `token` in `ids`, which
/// holds `placeholders` of them.
fn scatter(
    embeds: &Tensor,
    ids: &Tensor,
    (token, placeholders): (i64, i64),
    feats: &Tensor,
    what: &str,
) -> Result<Tensor> {
    let mask = ids.eq(token);
    ensure!(
        placeholders == feats.size()[0],
        "the batch has {placeholders} {what} tokens but its {what}s give {} features",
        feats.size()[0]
    );
    Ok(embeds.masked_scatter(
        &mask.unsqueeze(-1).expand_as(embeds),
        &feats.to_kind(embeds.kind()),
    ))
}

impl Model for LlavaModel {
    type Batch = Batch;

    fn hidden_states(&self, batch: &Batch, _train: bool) -> Result<Tensor> {
        self.final_hidden(batch)
    }

    fn loss_targets<'a>(&self, batch: &'a Batch) -> Option<&'a LossTargets> {
        batch.targets.as_ref()
    }

    fn lm_head(&self, hidden: &Tensor) -> Tensor {
        self.decoder.logits(hidden)
    }

    /// Prompt rows are right-padded with positions `0..T`, so a row's first new token takes
    /// position `lengths[i]`.
    fn prefill(&self, batch: &Batch, lengths: &[usize]) -> Result<(Tensor, DecodeState)> {
        let embeds = self.embeddings(batch)?;
        let (b, t) = (embeds.size()[0], embeds.size()[1]);
        self.check_window(t)?;
        let positions = Tensor::arange(t, (Kind::Int64, embeds.device()))
            .unsqueeze(0)
            .expand([b, t], false);
        let (cos, sin) = self.rotary(&positions);
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
        let (cos, sin) = self.rotary(&positions);
        Ok(self.decoder.decode_step(state, &ids, &cos, &sin))
    }
}

impl Trainable for LlavaModel {
    /// Decoder layers and vision encoder blocks (the projector is two linears, not worth it).
    fn set_gradient_checkpointing(&mut self, on: bool) {
        self.decoder.set_gradient_checkpointing(on);
        self.tower.set_gradient_checkpointing(on);
    }

    fn var_store(&self) -> &VarStore {
        &self.vs
    }

    fn visit_linears(&mut self, f: &mut dyn FnMut(&str, &mut Linear)) {
        let vision = "vision_tower.vision_model";
        self.tower.visit_linears(vision, f);
        f("multi_modal_projector.linear_1", &mut self.linear_1);
        f("multi_modal_projector.linear_2", &mut self.linear_2);
        self.decoder
            .visit_linears("language_model.model", "language_model.lm_head", f);
    }

    /// The original LLaVA repository (`LlavaLlamaForCausalLM`), and adapters trained on it,
    /// name the text model `model.*`, the projector `model.mm_projector.{0,2}` and the tower
    /// `model.vision_tower.vision_tower.vision_model.*`.
    fn legacy_names(&self, hub_name: &str) -> Vec<String> {
        // One table for checkpoints and adapters (crate::original::KEY_MAP); it maps
        // prefixes ending in a dot, module names have none.
        crate::original::original_name(&format!("{hub_name}."))
            .map(|name| name.trim_end_matches('.').to_string())
            .into_iter()
            .collect()
    }

    /// transformers 5 runs the text model as `model.language_model`, the tower as
    /// `model.vision_tower` and the projector as `model.multi_modal_projector`.
    fn prefixes(&self) -> &'static [Prefix] {
        const TABLE: &[Prefix] = &[
            Prefix::new(
                "vision_tower.vision_model.",
                "model.vision_tower.",
                Component::Vision,
            ),
            Prefix::new("vision_tower.", "model.vision_tower.", Component::Vision),
            Prefix::new(
                "multi_modal_projector.",
                "model.multi_modal_projector.",
                Component::Projector,
            ),
            Prefix::new("image_newline", "model.image_newline", Component::Projector),
            Prefix::new(
                "language_model.model.",
                "model.language_model.",
                Component::Llm,
            ),
            Prefix::new("language_model.", "", Component::Llm),
            Prefix::new("", "model.", Component::Llm),
        ];
        TABLE
    }
}
