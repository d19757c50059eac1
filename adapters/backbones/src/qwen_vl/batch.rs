//! The samples, device batches and collator the Qwen-VL families share: token ids padded
//! (or packed) with their labels, the M-RoPE positions computed on the host, and every
//! sample's patches concatenated in placeholder order.

use anyhow::{bail, ensure, Result};
use lmms_ft_core::family::{Collator, Placement, TextBatch};
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
pub type Sample = lmms_ft_core::family::Sample<QwenMedia>;

/// Replaces the run of placeholder tokens of each video that has an expansion
/// ([`QwenMedia::video_expansions`]) by that expansion, labels unchanged (the template gave
/// the run exactly the expansion's length, all unlabeled).
pub fn expand_videos(sample: &mut Sample, video_token_id: i64) -> Result<()> {
    if sample.media.video_expansions.is_empty() {
        return Ok(());
    }
    let ids = &mut sample.text.input_ids;
    let mut expansions = sample.media.video_expansions.iter();
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
}

impl Collator for QwenCollator {
    type Media = QwenMedia;
    type Batch = Batch;

    fn packs(&self) -> bool {
        true
    }

    fn prepare(&self, sample: &mut Sample) -> Result<()> {
        expand_videos(sample, self.rope.video_token_id)
    }

    fn assemble(
        &self,
        text: TextBatch,
        samples: Vec<Sample>,
        placements: &[Placement],
        device: Device,
    ) -> Result<Batch> {
        let size = text.input_ids.size();
        let placed: Vec<(usize, usize, &Sample)> = samples
            .iter()
            .zip(placements)
            .map(|(s, p)| (p.row, p.offset, s))
            .collect();
        let position_ids = self
            .placed_positions(&placed, size[0] as usize, size[1] as usize)?
            .to_device(device);
        let [images, videos] = self.media_of(samples, device);
        Ok(Batch {
            input_ids: text.input_ids,
            targets: text.targets,
            position_ids,
            images,
            videos,
            attention_mask: text.packed.map(|p| p.attention_mask),
        })
    }
}
