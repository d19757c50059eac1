//! The typed bundle the core drives: config, HD-transform processor, the Hub template with
//! Phi-3-V's image tags, collator and model.

use std::path::Path;

use anyhow::{bail, ensure, Result};
use lmms_ft_backbones::longrope::ScaledRope;
use lmms_ft_core::data::batch::{pack_batch, pad_batch, PaddingSide};
use lmms_ft_core::family::{Collator, EncodedText, Family, ProcessorOptions};
use tch::{Device, Kind, Tensor};

use crate::config::Phi3VConfig;
use crate::model::{Batch, Phi3VModel};
use crate::processor::{Phi3VProcessor, PhiMedia};
use crate::template::Phi3VTemplate;
use crate::vision::Images;

/// One encoded sample.
#[derive(Debug)]
pub struct Sample {
    pub text: EncodedText,
    pub media: PhiMedia,
}

pub struct Phi3VCollator {
    rope: Option<ScaledRope>,
}

/// Per placeholder run of `ids` (a sample's), the sample's image it shows: a run is a stretch
/// of `-N` as long as image N's token count, so two adjacent tags of one image are two runs.
fn runs(ids: &[i64], counts: &[i64]) -> Result<Vec<usize>> {
    let mut order = Vec::new();
    let mut left = 0;
    let mut current = 0;
    for &id in ids.iter().filter(|&&id| id < 0) {
        let image = (-id) as usize;
        if left == 0 || image != current {
            ensure!(left == 0, "a placeholder of image {current} is cut short");
            let count = counts.get(image - 1).copied().unwrap_or(0);
            ensure!(
                count > 0,
                "a placeholder names image {image}, which the sample lacks"
            );
            order.push(image - 1);
            current = image;
            left = count;
        }
        left -= 1;
    }
    ensure!(left == 0, "a placeholder of image {current} is cut short");
    Ok(order)
}

impl Phi3VCollator {
    /// Whether a sample of `len` tokens rotates with the long factors.
    fn is_long(&self, len: usize) -> bool {
        self.rope
            .as_ref()
            .is_some_and(|r| r.is_long(len as i64 - 1))
    }

    /// Images of the samples (in order), with each run's image index into the batch's list,
    /// and the number of media tokens.
    fn images<'a>(
        &self,
        samples: impl IntoIterator<Item = &'a Sample>,
        device: Device,
    ) -> Result<(Option<Images>, i64)> {
        let (mut crops, mut grids, mut order, mut tokens) = (Vec::new(), Vec::new(), Vec::new(), 0);
        for s in samples {
            let counts: Vec<i64> = s
                .media
                .grids
                .iter()
                .map(|&(r, c)| crate::processor::image_tokens(r, c))
                .collect();
            let base = grids.len();
            order.extend(
                runs(&s.text.input_ids, &counts)?
                    .into_iter()
                    .map(|i| base + i),
            );
            tokens += s.text.input_ids.iter().filter(|&&t| t < 0).count() as i64;
            crops.extend(s.media.crops.iter().map(Tensor::shallow_clone));
            grids.extend(s.media.grids.iter().copied());
        }
        if grids.is_empty() {
            return Ok((None, tokens));
        }
        let images = Images {
            crops: Tensor::cat(&crops, 0).to_device(device),
            grids,
            order,
        };
        Ok((Some(images), tokens))
    }
}

impl Collator for Phi3VCollator {
    type Sample = Sample;
    type Batch = Batch;

    fn collate(&self, samples: Vec<Sample>, device: Device) -> Result<Batch> {
        ensure!(!samples.is_empty(), "cannot collate an empty batch");
        let texts: Vec<&EncodedText> = samples.iter().map(|s| &s.text).collect();
        // Padding follows every real token under causal attention and carries no label.
        let padded = pad_batch(&texts, 0, PaddingSide::Right)?;
        let (b, t) = (samples.len() as i64, padded.input_ids.size()[1]);
        let long: Vec<bool> = samples
            .iter()
            .map(|s| self.is_long(s.text.input_ids.len()))
            .collect();
        let long_rope = Tensor::from_slice(&long)
            .view([b, 1])
            .expand([b, t], false)
            .to_device(device);
        let position_ids = Tensor::arange(t, (Kind::Int64, device))
            .unsqueeze(0)
            .expand([b, t], false);
        let (images, media_tokens) = self.images(&samples, device)?;
        Ok(Batch {
            input_ids: padded.input_ids.to_device(device),
            targets: Some(padded.targets.to_device(device)),
            position_ids,
            long_rope,
            images,
            media_tokens,
            attention_mask: None,
        })
    }

    fn collate_packed(&self, rows: Vec<Vec<Sample>>, device: Device) -> Result<Batch> {
        ensure!(!rows.is_empty(), "cannot collate an empty batch");
        let texts: Vec<Vec<&EncodedText>> = rows
            .iter()
            .map(|row| row.iter().map(|s| &s.text).collect())
            .collect();
        let packed = pack_batch(&texts, 0)?;
        let t = packed.input_ids.size()[1] as usize;
        let mut long = vec![false; rows.len() * t];
        for (r, (row, starts)) in rows.iter().zip(&packed.cu_seqlens).enumerate() {
            for (s, &at) in row.iter().zip(starts) {
                let len = s.text.input_ids.len();
                let flag = self.is_long(len);
                let at = r * t + at as usize;
                long[at..at + len].iter_mut().for_each(|x| *x = flag);
            }
        }
        let long_rope = Tensor::from_slice(&long)
            .view([rows.len() as i64, t as i64])
            .to_device(device);
        let (images, media_tokens) = self.images(rows.iter().flatten(), device)?;
        Ok(Batch {
            input_ids: packed.input_ids.to_device(device),
            targets: Some(packed.targets.to_device(device)),
            position_ids: packed.position_ids.to_device(device),
            long_rope,
            images,
            media_tokens,
            attention_mask: Some(packed.attention_mask.to_device(device)),
        })
    }
}

/// Phi-3-Vision and Phi-3.5-Vision share every piece.
pub struct Phi3V;

impl Family for Phi3V {
    type Config = Phi3VConfig;
    type Processor = Phi3VProcessor;
    type Template = Phi3VTemplate;
    type Sample = Sample;
    type Batch = Batch;
    type Collator = Phi3VCollator;
    type Model = Phi3VModel;

    /// Pixel budgets do not apply: the HD transform's canvas is set by `num_crops` in
    /// `preprocessor_config.json`, so a budget would be silently ignored; it is refused.
    fn processor(
        _config: &Phi3VConfig,
        dir: &Path,
        opts: &ProcessorOptions,
    ) -> Result<Phi3VProcessor> {
        if *opts != ProcessorOptions::default() {
            bail!("data.min_pixels / max_pixels / video_min_pixels / video_max_pixels do not apply to Phi-3-V, whose image canvas is set by num_crops in preprocessor_config.json; remove them");
        }
        Phi3VProcessor::from_dir(dir)
    }

    fn template(_config: &Phi3VConfig, dir: &Path) -> Result<Phi3VTemplate> {
        Phi3VTemplate::from_dir(dir)
    }

    fn sample(text: EncodedText, media: PhiMedia) -> Sample {
        Sample { text, media }
    }

    fn collator(config: &Phi3VConfig) -> Phi3VCollator {
        Phi3VCollator {
            rope: config.rope_scaling.clone(),
        }
    }

    fn load(config: &Phi3VConfig, dir: &Path, device: Device, kind: Kind) -> Result<Phi3VModel> {
        Phi3VModel::load(config, dir, device, kind)
    }
}
