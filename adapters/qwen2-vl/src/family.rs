//! The typed bundle the core drives: Qwen2-VL / Qwen2.5-VL config, processor, Hub chat
//! template, collator and model.

use std::path::Path;

use anyhow::{ensure, Result};
use lmms_ft_core::data::batch::{pack_batch, pad_batch, PaddingSide};
use lmms_ft_core::data::template::{ContentMode, HfChatTemplate, MediaPlaceholders};
use lmms_ft_core::family::{Collator, EncodedText, Family, ProcessorOptions};
use tch::{Device, Kind, Tensor};

use crate::config::{Qwen2VlConfig, Variant};
use crate::model::{Batch, Media, Qwen2VlModel};
use crate::processor::{QwenMedia, QwenProcessor};
use crate::rope::{position_ids, RopeSpec};

pub const IMAGE_PLACEHOLDER: &str = "<|image_pad|>";
pub const VIDEO_PLACEHOLDER: &str = "<|video_pad|>";

/// One encoded sample: token ids, labels and its processed media.
#[derive(Debug, Clone)]
pub struct Sample {
    pub text: EncodedText,
    pub media: QwenMedia,
}

pub struct QwenCollator {
    rope: RopeSpec,
    patch_dim: i64,
}

impl QwenCollator {
    pub fn new(config: &Qwen2VlConfig) -> Self {
        let v = &config.vision;
        QwenCollator {
            rope: RopeSpec {
                image_token_id: config.image_token_id,
                video_token_id: config.video_token_id,
                spatial_merge_size: v.spatial_merge_size,
                tokens_per_second: (config.variant == Variant::Qwen25Vl)
                    .then_some(v.tokens_per_second),
            },
            patch_dim: v.in_channels * v.temporal_patch_size * v.patch_size * v.patch_size,
        }
    }

    /// `[3, B, T]` positions for right-padded rows; padding positions are 0, as in
    /// `transformers` when an attention mask is given.
    pub fn positions(&self, samples: &[Sample], len: usize) -> Result<Tensor> {
        let placed: Vec<(usize, usize, &Sample)> =
            samples.iter().enumerate().map(|(r, s)| (r, 0, s)).collect();
        self.placed_positions(&placed, samples.len(), len)
    }

    /// `[3, rows, T]` positions of samples placed at `(row, offset)`, each sample's own
    /// positions starting from 0 wherever it sits (packed rows hold several).
    fn placed_positions(
        &self,
        placed: &[(usize, usize, &Sample)],
        rows: usize,
        len: usize,
    ) -> Result<Tensor> {
        let mut flat = vec![0i64; 3 * rows * len];
        for &(row, offset, s) in placed {
            let pos = position_ids(
                &s.text.input_ids,
                &self.rope,
                &mut s.media.image_grids.iter().copied(),
                &mut s
                    .media
                    .video_grids
                    .iter()
                    .copied()
                    .zip(s.media.video_seconds.iter().copied()),
            )?;
            for (axis, values) in pos.iter().enumerate() {
                let start = (axis * rows + row) * len + offset;
                flat[start..start + values.len()].copy_from_slice(values);
            }
        }
        Ok(Tensor::from_slice(&flat).view([3, rows as i64, len as i64]))
    }

    /// Every sample's media, concatenated in sample order (the order of their placeholder
    /// tokens in the batch).
    fn media_of(
        &self,
        samples: impl IntoIterator<Item = Sample>,
        device: Device,
    ) -> [Option<Media>; 2] {
        let mut media = [(Vec::new(), Vec::new()), (Vec::new(), Vec::new())];
        for s in samples {
            media[0].0.extend(s.media.image_patches);
            media[0].1.extend(s.media.image_grids);
            media[1].0.extend(s.media.video_patches);
            media[1].1.extend(s.media.video_grids);
        }
        let [(ip, ig), (vp, vg)] = media;
        [self.media(ip, ig, device), self.media(vp, vg, device)]
    }

    fn media(&self, patches: Vec<f32>, grids: Vec<[i64; 3]>, device: Device) -> Option<Media> {
        (!grids.is_empty()).then(|| Media {
            pixels: Tensor::from_slice(&patches)
                .view([-1, self.patch_dim])
                .to_device(device),
            grids,
        })
    }
}

impl Collator for QwenCollator {
    type Sample = Sample;
    type Batch = Batch;

    fn collate(&self, samples: Vec<Sample>, device: Device) -> Result<Batch> {
        ensure!(!samples.is_empty(), "cannot collate an empty batch");
        let texts: Vec<&EncodedText> = samples.iter().map(|s| &s.text).collect();
        // Pad id 0 is never a media token, and padded positions carry no loss.
        let padded = pad_batch(&texts, 0, PaddingSide::Right)?;
        let len = padded.input_ids.size()[1] as usize;
        let position_ids = self.positions(&samples, len)?.to_device(device);
        let [images, videos] = self.media_of(samples, device);
        Ok(Batch {
            input_ids: padded.input_ids.to_device(device),
            targets: Some(padded.targets.to_device(device)),
            position_ids,
            images,
            videos,
            attention_mask: None,
        })
    }

    fn collate_packed(&self, rows: Vec<Vec<Sample>>, device: Device) -> Result<Batch> {
        ensure!(!rows.is_empty(), "cannot collate an empty batch");
        let texts: Vec<Vec<&EncodedText>> = rows
            .iter()
            .map(|row| row.iter().map(|s| &s.text).collect())
            .collect();
        // Pad id 0 is never a media token, and padded positions carry no loss.
        let packed = pack_batch(&texts, 0)?;
        let len = packed.input_ids.size()[1] as usize;
        let placed: Vec<(usize, usize, &Sample)> = rows
            .iter()
            .zip(&packed.cu_seqlens)
            .enumerate()
            .flat_map(|(r, (row, cu))| row.iter().zip(cu).map(move |(s, &at)| (r, at as usize, s)))
            .collect();
        let position_ids = self
            .placed_positions(&placed, rows.len(), len)?
            .to_device(device);
        let [images, videos] = self.media_of(rows.into_iter().flatten(), device);
        Ok(Batch {
            input_ids: packed.input_ids.to_device(device),
            targets: Some(packed.targets.to_device(device)),
            position_ids,
            images,
            videos,
            attention_mask: Some(packed.attention_mask.to_device(device)),
        })
    }
}

/// Qwen2-VL and Qwen2.5-VL share every piece; the variant comes from `config.json`.
pub struct Qwen2Vl;

impl Family for Qwen2Vl {
    type Config = Qwen2VlConfig;
    type Processor = QwenProcessor;
    type Template = HfChatTemplate;
    type Sample = Sample;
    type Batch = Batch;
    type Collator = QwenCollator;
    type Model = Qwen2VlModel;

    fn processor(
        _config: &Qwen2VlConfig,
        dir: &Path,
        opts: &ProcessorOptions,
    ) -> Result<QwenProcessor> {
        Ok(QwenProcessor::from_dir(dir)?.with_options(opts))
    }

    fn template(_config: &Qwen2VlConfig, dir: &Path) -> Result<HfChatTemplate> {
        HfChatTemplate::from_dir(
            dir,
            MediaPlaceholders::new(IMAGE_PLACEHOLDER, Some(VIDEO_PLACEHOLDER)),
            ContentMode::Parts,
        )
    }

    fn sample(text: EncodedText, media: QwenMedia) -> Sample {
        Sample { text, media }
    }

    fn collator(config: &Qwen2VlConfig) -> QwenCollator {
        QwenCollator::new(config)
    }

    fn load(
        config: &Qwen2VlConfig,
        dir: &Path,
        device: Device,
        kind: Kind,
    ) -> Result<Qwen2VlModel> {
        Qwen2VlModel::load(config, dir, device, kind)
    }
}
