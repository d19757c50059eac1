//! The samples, device batches and collator the Qwen-VL families share: token ids padded
//! (or packed) with their labels, the M-RoPE positions computed on the host, and every
//! sample's patches concatenated in placeholder order.

use anyhow::{bail, ensure, Result};
use lmms_ft_core::data::batch::{pack_batch, pad_batch, PaddingSide};
use lmms_ft_core::family::{Collator, EncodedText};
use lmms_ft_core::loss::LossTargets;
use tch::{Device, Tensor};

use super::processor::QwenMedia;
use super::rope::{position_ids, RopeSpec};

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

/// One encoded sample: token ids, labels and its processed media.
#[derive(Debug, Clone)]
pub struct Sample {
    pub text: EncodedText,
    pub media: QwenMedia,
}

impl Sample {
    /// Replaces the run of placeholder tokens of each video that has an expansion
    /// ([`QwenMedia::video_expansions`]) by that expansion, labels unchanged (the template
    /// gave the run exactly the expansion's length, all unlabeled).
    pub fn expand_videos(&mut self, video_token_id: i64) -> Result<()> {
        if self.media.video_expansions.is_empty() {
            return Ok(());
        }
        let ids = &mut self.text.input_ids;
        let mut expansions = self.media.video_expansions.iter();
        let mut i = 0;
        while i < ids.len() {
            if ids[i] != video_token_id {
                i += 1;
                continue;
            }
            let mut j = i;
            while j < ids.len() && ids[j] == video_token_id {
                j += 1;
            }
            let Some(expansion) = expansions.next() else {
                bail!("more video placeholder runs than videos");
            };
            ensure!(
                expansion.len() == j - i,
                "a video placeholder run has {} tokens but its video needs {}",
                j - i,
                expansion.len()
            );
            ids[i..j].copy_from_slice(expansion);
            // The expansion holds the video's own tokens again; continue after it.
            i = j;
        }
        ensure!(
            expansions.next().is_none(),
            "fewer video placeholder runs than videos"
        );
        Ok(())
    }
}

/// Collates [`Sample`]s into a [`Batch`].
pub struct QwenCollator {
    rope: RopeSpec,
    patch_dim: i64,
    /// Qwen3-VL: each temporal step of a video is its own token run (timestamp text between
    /// them), so positions treat every step as a one-frame grid.
    split_video_frames: bool,
}

impl QwenCollator {
    /// `patch_dim`: the length of one flattened patch (`channels × temporal × patch²`).
    pub fn new(rope: RopeSpec, patch_dim: i64) -> Self {
        QwenCollator {
            rope,
            patch_dim,
            split_video_frames: false,
        }
    }

    /// Positions for videos whose temporal steps are separate token runs (Qwen3-VL).
    pub fn with_split_video_frames(mut self) -> Self {
        self.split_video_frames = true;
        self
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
            let videos = s.media.video_grids.iter().zip(&s.media.video_seconds);
            let mut videos: Vec<([i64; 3], f64)> = if self.split_video_frames {
                videos
                    .flat_map(|(&[t, h, w], &sec)| (0..t).map(move |_| ([1, h, w], sec)))
                    .collect()
            } else {
                videos.map(|(&g, &sec)| (g, sec)).collect()
            };
            let pos = position_ids(
                &s.text.input_ids,
                &self.rope,
                &mut s.media.image_grids.iter().copied(),
                &mut videos.drain(..),
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

    fn expanded(&self, mut samples: Vec<Sample>) -> Result<Vec<Sample>> {
        for s in &mut samples {
            s.expand_videos(self.rope.video_token_id)?;
        }
        Ok(samples)
    }
}

impl Collator for QwenCollator {
    type Sample = Sample;
    type Batch = Batch;

    fn collate(&self, samples: Vec<Sample>, device: Device) -> Result<Batch> {
        ensure!(!samples.is_empty(), "cannot collate an empty batch");
        let samples = self.expanded(samples)?;
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
        let rows = rows
            .into_iter()
            .map(|row| self.expanded(row))
            .collect::<Result<Vec<_>>>()?;
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
