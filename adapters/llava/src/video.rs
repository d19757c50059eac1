//! Video features of NeXT-Video and OneVision: every frame goes through the vision tower as
//! one tile, then
//!
//! * NeXT-Video (`get_video_features`): the selected features of each frame, as a
//!   `grid × grid` map, are pooled with `spatial_pool_mode` over `spatial_pool_stride`
//!   windows (`vision_resampler`), then projected;
//! * OneVision (`get_video_features` + `apply_pooling`): the projected features of each frame
//!   are resized bilinearly to `ceil(grid / 2)` per side, and each video ends with one
//!   `image_newline`.
//!
//! The frames of a video follow one another, each flattened row by row.

use anyhow::{ensure, Context, Result};
use tch::Tensor;

use crate::config::PoolMode;
use crate::model::LlavaModel;

impl LlavaModel {
    /// Video features in placeholder order, `[total_tokens, H]`, from `pixels` of
    /// `[frames, C, S, S]` (with `counts` frames per video) or `[videos, frames, C, S, S]`.
    pub(crate) fn video_features(&self, pixels: &Tensor, counts: &[i64]) -> Result<Tensor> {
        let c = &self.config;
        let size = pixels.size();
        let (frames, counts) = match size.len() {
            5 => {
                ensure!(
                    counts.is_empty() || counts.iter().all(|&n| n == size[1]),
                    "video frame counts {counts:?} do not match pixel values {size:?}"
                );
                (pixels.flatten(0, 1), vec![size[1]; size[0] as usize])
            }
            4 => {
                ensure!(
                    counts.iter().all(|&n| n > 0) && counts.iter().sum::<i64>() == size[0],
                    "video frame counts {counts:?} do not add up to the {} frames given",
                    size[0]
                );
                (pixels.shallow_clone(), counts.to_vec())
            }
            _ => anyhow::bail!("video pixel values must be 4-D or 5-D, got {size:?}"),
        };
        let grid = c.vision.image_size() / c.vision.patch_size();
        let selected = self.selected_features(&frames)?;
        let (n, tokens, dim) = selected.size3()?;
        ensure!(
            tokens == grid * grid,
            "{tokens} features per frame cannot form a {grid}x{grid} grid (a CLS token kept with the \"full\" strategy?)"
        );
        let map = |x: &Tensor, d: i64| x.view([n, grid, grid, d]).permute([0, 3, 1, 2]);
        let per_frame = match c.video_pool {
            Some((mode, s)) => {
                let m = map(&selected, dim);
                let pooled = match mode {
                    PoolMode::Average => m.avg_pool2d([s, s], [s, s], [0, 0], false, true, None),
                    PoolMode::Max => m.max_pool2d([s, s], [s, s], [0, 0], [1, 1], false),
                };
                self.project(&pooled.flatten(2, 3).transpose(1, 2))
            }
            None => {
                let x = self.project(&selected);
                let h = x.size()[2];
                let half = (grid + 1) / 2;
                map(&x, h)
                    .upsample_bilinear2d([half, half], false, None, None)
                    .permute([0, 2, 3, 1])
                    .reshape([n, half * half, h])
            }
        };
        let h = per_frame.size()[2];
        let newline = match c.video_pool {
            Some(_) => None,
            None => Some(
                self.image_newline
                    .as_ref()
                    .context("OneVision model without image_newline")?
                    .to_kind(per_frame.kind())
                    .view([1, h]),
            ),
        };
        let mut out = Vec::with_capacity(counts.len() * 2);
        let mut start = 0;
        for &f in &counts {
            out.push(per_frame.narrow(0, start, f).flatten(0, 1));
            start += f;
            if let Some(nl) = &newline {
                out.push(nl.shallow_clone());
            }
        }
        Ok(Tensor::cat(&out, 0))
    }
}
