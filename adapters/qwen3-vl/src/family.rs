//! The typed bundle the core drives: Qwen3-VL config, processor (the shared Qwen-VL one plus
//! video timestamps), Hub chat template, the shared collator and the model.
//!
//! Qwen3-VL's processor writes each video as frame groups, `<t seconds>` +
//! `<|vision_start|>` + the group's tokens + `<|vision_end|>` per temporal patch, inside the
//! template's own `<|vision_start|>…<|vision_end|>`. The template only knows token counts, so
//! it writes a run of placeholders as long as that whole expansion, and the collator puts the
//! expansion in ([`expand_videos`](lmms_ft_backbones::qwen_vl::batch::expand_videos)): length fitting and validation see the true length
//! and never cut a video, and the positions are computed from the final ids.

use std::path::Path;

use anyhow::{Context, Result};
use lmms_ft_backbones::qwen_vl::batch::QwenCollator;
use lmms_ft_backbones::qwen_vl::processor::{
    PixelBudget, ProcessorDefaults, QwenMedia, QwenProcessor, VideoResize,
};
use lmms_ft_backbones::qwen_vl::rope::RopeSpec;
use lmms_ft_core::data::template::{
    load_dir_tokenizer, ContentMode, HfChatTemplate, MediaPlaceholders,
};
use lmms_ft_core::data::{RgbImage, VideoClip};
use lmms_ft_core::family::{Family, MediaTokens, Processor, ProcessorOptions};
use tch::{Device, Kind};
use tokenizers::Tokenizer;

use crate::config::Qwen3VlConfig;
use crate::model::Qwen3VlModel;

pub const IMAGE_PLACEHOLDER: &str = "<|image_pad|>";
pub const VIDEO_PLACEHOLDER: &str = "<|video_pad|>";

/// `Qwen2VLImageProcessor` as Qwen3-VL configures it and `Qwen3VLVideoProcessor`'s defaults,
/// for model directories whose processor files leave them out.
pub const DEFAULTS: ProcessorDefaults = ProcessorDefaults {
    image: PixelBudget {
        min_pixels: 65536,
        max_pixels: 16777216,
    },
    video: PixelBudget {
        min_pixels: 128 * 32 * 32,
        max_pixels: 32 * 32 * 768,
    },
    patch_size: 16,
    mean: [0.5; 3],
    std: [0.5; 3],
    video_resize: VideoResize::WholeClip,
};

/// Seconds at the middle of each temporal patch of a video of `frames` frames sampled at
/// `fps` (transformers' `Qwen3VLProcessor._calculate_timestamps`: frame `i` at `i / fps`, the
/// last frame repeated to fill the final patch, each patch at the mean of its first and last
/// frame). transformers times a frame by its index in the source file; a [`VideoClip`] keeps
/// only the mean rate of its sampled frames, so for a decoded file frame `i` is placed at
/// `i / sampled_fps`, which equals transformers' time when the frames are evenly spaced from
/// the first (raw frames, the fixture) and may differ by part of a sampling interval
/// otherwise (visible in the text only when the rounded tenth of a second changes).
pub fn frame_group_seconds(frames: usize, fps: f64, temporal_patch: usize) -> Vec<f64> {
    let padded = frames.div_ceil(temporal_patch) * temporal_patch;
    let at = |i: usize| i.min(frames.saturating_sub(1)) as f64 / fps;
    (0..padded)
        .step_by(temporal_patch)
        .map(|i| (at(i) + at(i + temporal_patch - 1)) / 2.0)
        .collect()
}

/// The shared Qwen-VL processor plus the token ids each video's placeholder becomes.
pub struct Qwen3Processor {
    pub inner: QwenProcessor,
    tokenizer: Tokenizer,
    video_token_id: i64,
    vision_start_token_id: i64,
    vision_end_token_id: i64,
}

impl Qwen3Processor {
    pub fn from_dir(config: &Qwen3VlConfig, dir: &Path, opts: &ProcessorOptions) -> Result<Self> {
        Ok(Qwen3Processor {
            inner: QwenProcessor::from_dir_with(dir, &DEFAULTS)?.with_options(opts),
            tokenizer: load_dir_tokenizer(dir)?,
            video_token_id: config.video_token_id,
            vision_start_token_id: config.vision_start_token_id,
            vision_end_token_id: config.vision_end_token_id,
        })
    }

    /// The ids of a video with grid `[t, h, w]`: per temporal patch its timestamp text, the
    /// vision delimiters and its `h · w / merge²` tokens.
    fn expansion(&self, grid: [i64; 3], seconds: &[f64]) -> Result<Vec<i64>> {
        let per_frame = self.inner.tokens([1, grid[1], grid[2]]);
        let mut ids = Vec::new();
        for s in seconds.iter().take(grid[0] as usize) {
            // Python's `f"{s:.1f}"`; Rust rounds the exact binary value half-to-even too.
            let text = format!("<{s:.1} seconds>");
            let enc = self
                .tokenizer
                .encode(text.as_str(), false)
                .map_err(|e| anyhow::anyhow!("tokenising the video timestamp {text:?}: {e}"))?;
            ids.extend(enc.get_ids().iter().map(|&i| i as i64));
            ids.push(self.vision_start_token_id);
            ids.extend(std::iter::repeat_n(self.video_token_id, per_frame));
            ids.push(self.vision_end_token_id);
        }
        Ok(ids)
    }
}

impl Processor for Qwen3Processor {
    type Media = QwenMedia;

    fn process(
        &self,
        images: &[RgbImage],
        videos: &[VideoClip],
    ) -> Result<(QwenMedia, MediaTokens)> {
        let (mut media, mut tokens) = self.inner.process(images, videos)?;
        let tp = self.inner.temporal_patch_size as usize;
        for (i, (clip, grid)) in videos.iter().zip(&media.video_grids).enumerate() {
            let seconds = frame_group_seconds(clip.frames.len(), clip.sampled_fps, tp);
            let ids = self
                .expansion(*grid, &seconds)
                .with_context(|| format!("video {}", i + 1))?;
            tokens.videos[i] = ids.len();
            media.video_expansions.push(ids);
        }
        Ok((media, tokens))
    }
}

/// The shared Qwen-VL collator, set up for this config: no time scaling of video positions,
/// and every temporal patch its own run.
pub fn collator(config: &Qwen3VlConfig) -> QwenCollator {
    let v = &config.vision;
    QwenCollator::new(
        RopeSpec {
            image_token_id: config.image_token_id,
            video_token_id: config.video_token_id,
            spatial_merge_size: v.spatial_merge_size,
            tokens_per_second: None,
        },
        v.in_channels * v.temporal_patch_size * v.patch_size * v.patch_size,
    )
    .with_split_video_frames()
}

pub struct Qwen3Vl;

impl Family for Qwen3Vl {
    type Config = Qwen3VlConfig;
    type Processor = Qwen3Processor;
    type Template = HfChatTemplate;
    type Collator = QwenCollator;
    type Model = Qwen3VlModel;

    fn processor(
        config: &Qwen3VlConfig,
        dir: &Path,
        opts: &ProcessorOptions,
    ) -> Result<Qwen3Processor> {
        Qwen3Processor::from_dir(config, dir, opts)
    }

    fn template(_config: &Qwen3VlConfig, dir: &Path) -> Result<HfChatTemplate> {
        HfChatTemplate::from_dir(
            dir,
            MediaPlaceholders::new(IMAGE_PLACEHOLDER, Some(VIDEO_PLACEHOLDER)),
            ContentMode::Parts,
        )
    }

    fn collator(config: &Qwen3VlConfig) -> QwenCollator {
        collator(config)
    }

    fn load(
        config: &Qwen3VlConfig,
        dir: &Path,
        device: Device,
        kind: Kind,
    ) -> Result<Qwen3VlModel> {
        Qwen3VlModel::load(config, dir, device, kind)
    }
}
