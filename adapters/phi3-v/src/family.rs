//! The typed bundle the core drives: config, HD-transform processor, the Hub template with
//! Phi-3-V's image tags, collator and model.

use std::path::Path;

use anyhow::{bail, ensure, Result};
use lmms_ft_backbones::longrope::ScaledRope;
use lmms_ft_core::family::{Collator, Family, Placement, ProcessorOptions, TextBatch};
use tch::{Device, Kind, Tensor};

use crate::config::Phi3VConfig;
use crate::model::{Batch, Phi3VModel};
use crate::processor::{Phi3VProcessor, PhiMedia};
use crate::template::Phi3VTemplate;
use crate::vision::Images;

/// One encoded sample.
pub type Sample = lmms_ft_core::family::Sample<PhiMedia>;

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
    type Media = PhiMedia;
    type Batch = Batch;

    fn packs(&self) -> bool {
        true
    }

    fn assemble(
        &self,
        text: TextBatch,
        samples: Vec<Sample>,
        placements: &[Placement],
        device: Device,
    ) -> Result<Batch> {
        let (b, t) = text.input_ids.size2()?;
        let (position_ids, long_rope) = match &text.packed {
            // Padded rows: one sample each, its flag over the whole row.
            None => {
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
                (position_ids, long_rope)
            }
            // Packed rows: each sample's flag over its own span.
            Some(packed) => {
                let t = t as usize;
                let mut long = vec![false; b as usize * t];
                for (s, p) in samples.iter().zip(placements) {
                    let len = s.text.input_ids.len();
                    let at = p.row * t + p.offset;
                    let flag = self.is_long(len);
                    long[at..at + len].iter_mut().for_each(|x| *x = flag);
                }
                let long_rope = Tensor::from_slice(&long)
                    .view([b, t as i64])
                    .to_device(device);
                (packed.position_ids.shallow_clone(), long_rope)
            }
        };
        let (images, media_tokens) = self.images(&samples, device)?;
        Ok(Batch {
            input_ids: text.input_ids,
            targets: text.targets,
            position_ids,
            long_rope,
            images,
            media_tokens,
            attention_mask: text.packed.map(|p| p.attention_mask),
        })
    }
}

/// Phi-3-Vision and Phi-3.5-Vision share every piece.
pub struct Phi3V;

impl Family for Phi3V {
    type Config = Phi3VConfig;
    type Processor = Phi3VProcessor;
    type Template = Phi3VTemplate;
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

    fn collator(config: &Phi3VConfig) -> Phi3VCollator {
        Phi3VCollator {
            rope: config.rope_scaling.clone(),
        }
    }

    fn load(config: &Phi3VConfig, dir: &Path, device: Device, kind: Kind) -> Result<Phi3VModel> {
        Phi3VModel::load(config, dir, device, kind)
    }
}
