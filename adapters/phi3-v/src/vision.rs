//! `Phi3ImageEmbedding` (`image_embedding_phi3_v.py`): the CLIP tower's second-to-last hidden
//! states without the class token (24×24 patches per 336² view), each 2×2 block of patches
//! merged into one token of 4× the channels, the crops laid out as one `12·rows × 12·cols`
//! map with `sub_GN` ending every row, the global view likewise (12 × 12 plus `sub_GN`),
//! joined by `glb_GN` (`sub_glb`: crops first), then the two-layer GELU projector.

use anyhow::{ensure, Context, Result};
use lmms_ft_backbones::clip::ClipVisionTower;
use lmms_ft_core::nn::{Linear, ParamInit};
use tch::nn::{Init, Path};
use tch::Tensor;

use crate::config::{HdOrder, Phi3VConfig};

/// Merged tokens per side of one view (24 patches, merged 2×2).
const SIDE: i64 = 12;

/// The images of a batch, on the device.
#[derive(Debug)]
pub struct Images {
    /// Every image's global view and crops, concatenated in image order:
    /// `[Σ (1 + rows·cols), 3, 336, 336]`.
    pub crops: Tensor,
    /// Per image, its crop grid `(rows, cols)`.
    pub grids: Vec<(i64, i64)>,
    /// Per placeholder run in the batch (row-major order of the ids), the image it shows.
    pub order: Vec<usize>,
}

pub struct ImageEmbedding {
    tower: ClipVisionTower,
    glb_gn: Tensor,
    sub_gn: Tensor,
    proj_0: Linear,
    proj_2: Linear,
    layer_idx: i64,
    order: HdOrder,
    merged: i64,
}

impl ImageEmbedding {
    /// Hub path prefix of the embedding.
    pub const PREFIX: &'static str = "model.vision_embed_tokens";

    /// `p` is `model.vision_embed_tokens`.
    pub fn new(p: &Path, c: &Phi3VConfig, init: ParamInit) -> ImageEmbedding {
        let merged = c.merged_dim();
        let h = c.text.hidden_size;
        let sep_init = match init {
            ParamInit::Zeros => Init::Const(0.0),
            ParamInit::Normal { std } => Init::Randn {
                mean: 0.0,
                stdev: std,
            },
        };
        let proj = p / "img_projection";
        ImageEmbedding {
            tower: ClipVisionTower::new(&(p / "img_processor" / "vision_model"), &c.clip, init),
            glb_gn: p.var("glb_GN", &[1, 1, merged], sep_init),
            sub_gn: p.var("sub_GN", &[1, 1, 1, merged], sep_init),
            proj_0: Linear::new(&(&proj / "0"), merged, h, true, init),
            proj_2: Linear::new(&(&proj / "2"), h, h, true, init),
            layer_idx: c.layer_idx,
            order: c.hd_order,
            merged,
        }
    }

    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.tower.set_gradient_checkpointing(on);
    }

    pub fn visit_linears(&mut self, f: &mut dyn FnMut(&str, &mut Linear)) {
        self.tower
            .visit_linears(&format!("{}.img_processor.vision_model", Self::PREFIX), f);
        f(
            &format!("{}.img_projection.0", Self::PREFIX),
            &mut self.proj_0,
        );
        f(
            &format!("{}.img_projection.2", Self::PREFIX),
            &mut self.proj_2,
        );
    }

    /// `[N, 24, 24, C]` patches → `[N, 12, 12, 4C]`, the 2×2 block's patches side by side.
    fn merge(&self, patches: &Tensor, n: i64) -> Tensor {
        let c = patches.size()[2];
        patches
            .reshape([n, SIDE, 2, SIDE, 2, c])
            .permute([0, 1, 3, 2, 4, 5])
            .reshape([n, SIDE, SIDE, 4 * c])
    }

    /// `map: [rows, cols, 4C]` with `sub_GN` appended to every row, flattened.
    fn with_row_ends(&self, map: Tensor) -> Tensor {
        let rows = map.size()[0];
        let sep = self
            .sub_gn
            .to_kind(map.kind())
            .view([1, 1, self.merged])
            .expand([rows, 1, self.merged], false);
        Tensor::cat(&[map, sep], 1).reshape([-1, self.merged])
    }

    /// One image's token sequence before the projector, from its views' patch features
    /// `[1 + rows·cols, 576, C]`.
    fn image_tokens(&self, feats: &Tensor, (rows, cols): (i64, i64)) -> Tensor {
        let views = 1 + rows * cols;
        let merged = self.merge(feats, views);
        let global = self.with_row_ends(merged.get(0));
        let crops = merged
            .narrow(0, 1, rows * cols)
            .reshape([rows, cols, SIDE, SIDE, self.merged])
            .permute([0, 2, 1, 3, 4])
            .reshape([rows * SIDE, cols * SIDE, self.merged]);
        let crops = self.with_row_ends(crops);
        let glb = self.glb_gn.to_kind(feats.kind()).view([1, self.merged]);
        match self.order {
            HdOrder::SubGlb => Tensor::cat(&[crops, glb, global], 0),
            HdOrder::GlbSub => Tensor::cat(&[global, glb, crops], 0),
        }
    }

    /// Projected features of every placeholder run, in `images.order`: `[tokens, H]`.
    pub fn forward(&self, images: &Images) -> Result<Tensor> {
        let views: i64 = images.grids.iter().map(|(r, c)| 1 + r * c).sum();
        ensure!(
            images.crops.size().first() == Some(&views),
            "{} image views given but the image grids call for {views}",
            images.crops.size().first().copied().unwrap_or(0)
        );
        let kind = self.glb_gn.kind();
        let states = self
            .tower
            .hidden_states(&images.crops.to_kind(kind), &[self.layer_idx])?
            .pop()
            .context("the tower returned no hidden states")?;
        let patches = states.narrow(1, 1, states.size()[1] - 1);
        let mut per_image = Vec::with_capacity(images.grids.len());
        let mut start = 0;
        for &grid in &images.grids {
            let n = 1 + grid.0 * grid.1;
            per_image.push(self.image_tokens(&patches.narrow(0, start, n), grid));
            start += n;
        }
        let lengths: Vec<i64> = per_image.iter().map(|t| t.size()[0]).collect();
        let projected = self.proj_2.forward(
            &self
                .proj_0
                .forward(&Tensor::cat(&per_image, 0))
                .gelu("none"),
        );
        let split = projected.split_with_sizes(&lengths, 0);
        let in_order = (0..split.len()).eq(images.order.iter().copied());
        if in_order {
            return Ok(projected);
        }
        let runs = images
            .order
            .iter()
            .map(|&i| {
                split
                    .get(i)
                    .map(Tensor::shallow_clone)
                    .with_context(|| format!("a placeholder names image {i} of {}", split.len()))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&runs, 0))
    }
}
