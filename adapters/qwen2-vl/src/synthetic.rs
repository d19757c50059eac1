//! Batches without a dataset, for the memory and speed measurements under `examples/`: what
//! they measure depends on a step's shapes, not its content, and real-scale runs must not need
//! a tokenizer or pictures on disk.

use anyhow::{bail, Result};
use lmms_ft_core::family::IGNORE_INDEX;
use lmms_ft_core::loss::LossTargets;
use tch::{Device, Kind, Tensor};

use crate::config::Qwen2VlConfig;
use crate::model::{Batch, Media};
use crate::rope::{position_ids, RopeSpec};

/// One sample of `seq` tokens: text, one random `image`×`image` picture's tokens, text; every
/// text token is a label. Pixels are made in fp32 and stored as `pixel_kind`.
pub fn image_batch(c: &Qwen2VlConfig, seq: i64, image: i64, pixel_kind: Kind) -> Result<Batch> {
    let patch = c.vision.patch_size;
    let side = image / patch;
    let grid = [1, side, side];
    let merge = c.vision.spatial_merge_size;
    let image_tokens = side * side / (merge * merge);
    if image_tokens + 16 > seq {
        bail!("a sequence of {seq} tokens cannot hold a {image_tokens}-token image");
    }
    let text = seq - image_tokens;
    let mut ids: Vec<i64> = (0..text / 2).map(|i| 2000 + i % 1000).collect();
    ids.extend(std::iter::repeat_n(c.image_token_id, image_tokens as usize));
    ids.extend((0..text - text / 2).map(|i| 3000 + i % 1000));
    let labels: Vec<i64> = ids
        .iter()
        .map(|&t| {
            if t == c.image_token_id {
                IGNORE_INDEX
            } else {
                t
            }
        })
        .collect();
    let spec = RopeSpec {
        image_token_id: c.image_token_id,
        video_token_id: c.video_token_id,
        spatial_merge_size: merge,
        tokens_per_second: None,
    };
    let pos = position_ids(
        &ids,
        &spec,
        &mut std::iter::once(grid),
        &mut std::iter::empty::<([i64; 3], f64)>(),
    )?;
    let patch_dim = c.vision.in_channels * c.vision.temporal_patch_size * patch * patch;
    Ok(Batch {
        input_ids: Tensor::from_slice(&ids).view([1, -1]),
        targets: Some(LossTargets::from_samples([(0, labels.as_slice())])),
        position_ids: Tensor::from_slice(&pos.concat()).view([3, 1, -1]),
        images: Some(Media {
            pixels: Tensor::randn([side * side, patch_dim], (Kind::Float, Device::Cpu))
                .to_kind(pixel_kind),
            grids: vec![grid],
        }),
        videos: None,
        attention_mask: None,
    })
}
