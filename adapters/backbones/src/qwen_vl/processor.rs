//! Images and videos → flattened patches, as `transformers`' Qwen-VL processors make them
//! (Qwen2-VL, Qwen2.5-VL and Qwen3-VL share them): `smart_resize` to multiples of
//! `patch × merge` within `[min_pixels, max_pixels]`, PIL bicubic resampling, rescale and
//! normalise in the same float order, then patches laid out merge-block by merge-block with
//! each patch flattened as (channel, time, row, column). Images are repeated over the temporal
//! patch; videos are padded to a multiple of it with their last frame. Qwen3-VL's video
//! processor measures its pixel budget over the whole clip (frames × height × width) instead
//! of per frame ([`VideoResize`]).

use std::path::Path;

use anyhow::{bail, Context, Result};
use lmms_ft_core::data::media::{resize, ResampleFilter};
use lmms_ft_core::data::{RgbImage, VideoClip};
use lmms_ft_core::family::{MediaTokens, Processor, ProcessorOptions};
use serde_json::Value;

/// Pixel budget of one image or video frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PixelBudget {
    pub min_pixels: u64,
    pub max_pixels: u64,
}

/// How a video's frame size is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VideoResize {
    /// Qwen2-VL / Qwen2.5-VL: each frame within the budget, like an image.
    PerFrame,
    /// Qwen3-VL: frames × height × width within the budget (the frame count rounded to the
    /// temporal patch), frames smaller than one merge block scaled up first.
    WholeClip,
}

/// What a model family's processor assumes where its config files are silent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcessorDefaults {
    pub image: PixelBudget,
    pub video: PixelBudget,
    pub patch_size: u32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub video_resize: VideoResize,
}

impl ProcessorDefaults {
    /// `Qwen2VLImageProcessor` / `Qwen2VLVideoProcessor`'s defaults.
    pub const QWEN2_VL: ProcessorDefaults = ProcessorDefaults {
        image: PixelBudget {
            min_pixels: 56 * 56,
            max_pixels: 28 * 28 * 1280,
        },
        video: PixelBudget {
            min_pixels: 128 * 28 * 28,
            max_pixels: 28 * 28 * 768,
        },
        patch_size: 14,
        mean: OPENAI_CLIP_MEAN,
        std: OPENAI_CLIP_STD,
        video_resize: VideoResize::PerFrame,
    };
}

#[derive(Debug, Clone, PartialEq)]
pub struct QwenProcessor {
    pub image: PixelBudget,
    pub video: PixelBudget,
    pub video_resize: VideoResize,
    pub patch_size: u32,
    pub temporal_patch_size: u32,
    pub merge_size: u32,
    pub rescale_factor: f64,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// Processed media of one sample, kept on the host until the collator builds the batch.
#[derive(Debug, Clone, Default)]
pub struct QwenMedia {
    pub image_patches: Vec<f32>,
    pub image_grids: Vec<[i64; 3]>,
    pub video_patches: Vec<f32>,
    pub video_grids: Vec<[i64; 3]>,
    /// Seconds covered by one temporal grid step of each video (`temporal_patch / fps`).
    pub video_seconds: Vec<f64>,
    /// Per video, the ids that replace its run of placeholder tokens before positions are
    /// computed (Qwen3-VL: each frame group's timestamp text and vision delimiters around its
    /// tokens); empty when a run is only placeholder tokens (Qwen2-VL).
    pub video_expansions: Vec<Vec<i64>>,
}

/// `transformers`' `smart_resize`: both sides multiples of `factor`, area within the budget,
/// aspect ratio kept as closely as possible. Python's `round` rounds halves to even.
pub fn smart_resize(
    height: u32,
    width: u32,
    factor: u32,
    budget: PixelBudget,
) -> Result<(u32, u32)> {
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    if h.max(w) / h.min(w) > 200.0 {
        bail!(
            "absolute aspect ratio must be smaller than 200, got {}",
            h.max(w) / h.min(w)
        );
    }
    let mut hb = (h / f).round_ties_even() * f;
    let mut wb = (w / f).round_ties_even() * f;
    if hb * wb > budget.max_pixels as f64 {
        let beta = (h * w / budget.max_pixels as f64).sqrt();
        hb = f.max((h / beta / f).floor() * f);
        wb = f.max((w / beta / f).floor() * f);
    } else if hb * wb < budget.min_pixels as f64 {
        let beta = (budget.min_pixels as f64 / (h * w)).sqrt();
        hb = (h * beta / f).ceil() * f;
        wb = (w * beta / f).ceil() * f;
    }
    Ok((hb as u32, wb as u32))
}

/// Qwen3-VL's video `smart_resize`: the budget bounds `frames × height × width`, with the
/// frame count rounded to the temporal patch; frames smaller than `factor` are scaled up
/// first (truncating, as Python's `int`).
pub fn smart_resize_clip(
    num_frames: u32,
    height: u32,
    width: u32,
    temporal_factor: u32,
    factor: u32,
    budget: PixelBudget,
) -> Result<(u32, u32)> {
    if num_frames < temporal_factor {
        bail!("a video needs at least {temporal_factor} frames, got {num_frames}");
    }
    let (mut h, mut w, f) = (height as f64, width as f64, factor as f64);
    if h < f || w < f {
        let scale = (f / h).max(f / w);
        h = (h * scale).trunc();
        w = (w * scale).trunc();
    }
    if h.max(w) / h.min(w) > 200.0 {
        bail!(
            "absolute aspect ratio must be smaller than 200, got {}",
            h.max(w) / h.min(w)
        );
    }
    let t = num_frames as f64;
    let tf = temporal_factor as f64;
    let mut hb = (h / f).round_ties_even() * f;
    let mut wb = (w / f).round_ties_even() * f;
    let tb = (t / tf).round_ties_even() * tf;
    if tb * hb * wb > budget.max_pixels as f64 {
        let beta = (t * h * w / budget.max_pixels as f64).sqrt();
        hb = f.max((h / beta / f).floor() * f);
        wb = f.max((w / beta / f).floor() * f);
    } else if tb * hb * wb < budget.min_pixels as f64 {
        let beta = (budget.min_pixels as f64 / (t * h * w)).sqrt();
        hb = (h * beta / f).ceil() * f;
        wb = (w * beta / f).ceil() * f;
    }
    Ok((hb as u32, wb as u32))
}

fn get_u64(obj: &Value, keys: &[&str]) -> Option<u64> {
    keys.iter()
        .find_map(|k| obj.get(*k).and_then(Value::as_u64))
}

fn triple(obj: &Value, key: &str, default: [f32; 3]) -> Result<[f32; 3]> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => {
            let a: Vec<f32> = v
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_f64().map(|f| f as f32))
                        .collect()
                })
                .unwrap_or_default();
            a.try_into()
                .map_err(|_| anyhow::anyhow!("`{key}` must be 3 numbers, got {v}"))
        }
    }
}

fn budget(obj: &Value, default: PixelBudget) -> PixelBudget {
    let size = obj.get("size").cloned().unwrap_or(Value::Null);
    PixelBudget {
        min_pixels: get_u64(obj, &["min_pixels"])
            .or_else(|| get_u64(&size, &["shortest_edge", "min_pixels"]))
            .unwrap_or(default.min_pixels),
        max_pixels: get_u64(obj, &["max_pixels"])
            .or_else(|| get_u64(&size, &["longest_edge", "max_pixels"]))
            .unwrap_or(default.max_pixels),
    }
}

// transformers' decimal constants, rounded to f32 exactly as numpy does for a float32 image.
#[allow(clippy::excessive_precision)]
const OPENAI_CLIP_MEAN: [f32; 3] = [0.48145466, 0.4578275, 0.40821073];
#[allow(clippy::excessive_precision)]
const OPENAI_CLIP_STD: [f32; 3] = [0.26862954, 0.26130258, 0.27577711];

impl QwenProcessor {
    /// Reads the processor settings of a model directory: the Hub's
    /// `preprocessor_config.json` (+ `video_preprocessor_config.json`), or the nested
    /// `processor_config.json` that `transformers` 5 writes; defaults are transformers'.
    pub fn from_dir(dir: &Path) -> Result<QwenProcessor> {
        QwenProcessor::from_dir_with(dir, &ProcessorDefaults::QWEN2_VL)
    }

    /// [`QwenProcessor::from_dir`] with another family's defaults.
    pub fn from_dir_with(dir: &Path, defaults: &ProcessorDefaults) -> Result<QwenProcessor> {
        let read = |name: &str| -> Result<Option<Value>> {
            let path = dir.join(name);
            if !path.is_file() {
                return Ok(None);
            }
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            Ok(Some(
                serde_json::from_str(&text)
                    .with_context(|| format!("parsing {}", path.display()))?,
            ))
        };
        let nested = read("processor_config.json")?;
        let image = match read("preprocessor_config.json")? {
            Some(v) => v,
            None => nested
                .as_ref()
                .and_then(|n| n.get("image_processor").cloned())
                .unwrap_or(Value::Null),
        };
        let video = match read("video_preprocessor_config.json")? {
            Some(v) => v,
            None => nested
                .as_ref()
                .and_then(|n| n.get("video_processor").cloned())
                .unwrap_or(Value::Null),
        };
        let image_budget = budget(&image, defaults.image);
        let video_budget = if video.is_null() {
            defaults.video
        } else {
            budget(&video, defaults.video)
        };
        let p = QwenProcessor {
            image: image_budget,
            video: video_budget,
            video_resize: defaults.video_resize,
            patch_size: get_u64(&image, &["patch_size"]).unwrap_or(defaults.patch_size as u64)
                as u32,
            temporal_patch_size: get_u64(&image, &["temporal_patch_size"]).unwrap_or(2) as u32,
            merge_size: get_u64(&image, &["merge_size"]).unwrap_or(2) as u32,
            rescale_factor: image
                .get("rescale_factor")
                .and_then(Value::as_f64)
                .unwrap_or(1.0 / 255.0),
            mean: triple(&image, "image_mean", defaults.mean)?,
            std: triple(&image, "image_std", defaults.std)?,
        };
        if p.patch_size == 0 || p.merge_size == 0 || p.temporal_patch_size == 0 {
            bail!(
                "{}: patch_size, merge_size and temporal_patch_size must be positive",
                dir.display()
            );
        }
        Ok(p)
    }

    /// Applies the user's pixel budgets (`data.max_pixels`, `data.video_max_pixels`, ...).
    pub fn with_options(mut self, opts: &ProcessorOptions) -> Self {
        self.image.min_pixels = opts.min_pixels.unwrap_or(self.image.min_pixels);
        self.image.max_pixels = opts.max_pixels.unwrap_or(self.image.max_pixels);
        self.video.min_pixels = opts.video_min_pixels.unwrap_or(self.video.min_pixels);
        self.video.max_pixels = opts.video_max_pixels.unwrap_or(self.video.max_pixels);
        self
    }

    fn factor(&self) -> u32 {
        self.patch_size * self.merge_size
    }

    /// Resized, rescaled and normalised planes `[3][h·w]` of one frame.
    fn planes(&self, img: &RgbImage, size: (u32, u32)) -> Result<(Vec<f32>, u32, u32)> {
        let (h, w) = size;
        let resized;
        let img = if img.dimensions() == (w, h) {
            img
        } else {
            resized = resize(img, w, h, ResampleFilter::Bicubic)?;
            &resized
        };
        let n = (h * w) as usize;
        let mut out = vec![0f32; 3 * n];
        for (i, px) in img.pixels().enumerate() {
            for c in 0..3 {
                // transformers: (u8 as f64 × scale) → f32, then (x − mean) / std in f32.
                let x = (px.0[c] as f64 * self.rescale_factor) as f32;
                out[c * n + i] = (x - self.mean[c]) / self.std[c];
            }
        }
        Ok((out, h, w))
    }

    /// Patches of `frames` (each `[3][h·w]` planes, already a multiple of the temporal
    /// patch), appended to `out`; returns the grid.
    fn patchify(&self, frames: &[&[f32]], h: u32, w: u32, out: &mut Vec<f32>) -> [i64; 3] {
        let (p, m, tp) = (
            self.patch_size as usize,
            self.merge_size as usize,
            self.temporal_patch_size as usize,
        );
        let (h, w) = (h as usize, w as usize);
        let (gh, gw) = (h / p, w / p);
        let gt = frames.len() / tp;
        let n = h * w;
        out.reserve(gt * gh * gw * 3 * tp * p * p);
        for t in 0..gt {
            for bh in 0..gh / m {
                for bw in 0..gw / m {
                    for ih in 0..m {
                        for iw in 0..m {
                            let (row0, col0) = ((bh * m + ih) * p, (bw * m + iw) * p);
                            for c in 0..3 {
                                for frame in &frames[t * tp..(t + 1) * tp] {
                                    for y in 0..p {
                                        let start = c * n + (row0 + y) * w + col0;
                                        out.extend_from_slice(&frame[start..start + p]);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        [gt as i64, gh as i64, gw as i64]
    }

    /// One image → its patches appended to `out`, and its grid `(1, h/14, w/14)`.
    pub fn image(&self, img: &RgbImage, out: &mut Vec<f32>) -> Result<[i64; 3]> {
        let (w, h) = img.dimensions();
        let size = smart_resize(h, w, self.factor(), self.image)?;
        let (planes, h, w) = self.planes(img, size)?;
        let frames = vec![planes.as_slice(); self.temporal_patch_size as usize];
        Ok(self.patchify(&frames, h, w, out))
    }

    /// One video → its patches appended to `out`, its grid, and seconds per temporal step.
    pub fn video(&self, clip: &VideoClip, out: &mut Vec<f32>) -> Result<([i64; 3], f64)> {
        let first = clip.frames.first().context("video has no frames")?;
        let (w, h) = first.dimensions();
        let size = match self.video_resize {
            VideoResize::PerFrame => smart_resize(h, w, self.factor(), self.video)?,
            VideoResize::WholeClip => smart_resize_clip(
                clip.frames.len() as u32,
                h,
                w,
                self.temporal_patch_size,
                self.factor(),
                self.video,
            )?,
        };
        let mut planes = Vec::with_capacity(clip.frames.len());
        for frame in &clip.frames {
            if frame.dimensions() != (w, h) {
                bail!(
                    "video frames change size ({:?} then {:?})",
                    (w, h),
                    frame.dimensions()
                );
            }
            planes.push(self.planes(frame, size)?.0);
        }
        let tp = self.temporal_patch_size as usize;
        let mut frames: Vec<&[f32]> = planes.iter().map(Vec::as_slice).collect();
        while frames.len() % tp != 0 {
            frames.push(frames[frames.len() - 1]);
        }
        let grid = self.patchify(&frames, size.0, size.1, out);
        if clip.sampled_fps.is_nan() || clip.sampled_fps <= 0.0 {
            bail!(
                "video sampled_fps must be positive, got {}",
                clip.sampled_fps
            );
        }
        Ok((grid, self.temporal_patch_size as f64 / clip.sampled_fps))
    }

    /// LLM tokens a grid turns into.
    pub fn tokens(&self, grid: [i64; 3]) -> usize {
        let m = self.merge_size as i64;
        (grid[0] * grid[1] * grid[2] / (m * m)) as usize
    }
}

impl Processor for QwenProcessor {
    type Media = QwenMedia;

    fn process(
        &self,
        images: &[RgbImage],
        videos: &[VideoClip],
    ) -> Result<(QwenMedia, MediaTokens)> {
        let mut media = QwenMedia::default();
        let mut tokens = MediaTokens::default();
        for (i, img) in images.iter().enumerate() {
            let grid = self
                .image(img, &mut media.image_patches)
                .with_context(|| format!("image {}", i + 1))?;
            tokens.images.push(self.tokens(grid));
            media.image_grids.push(grid);
        }
        for (i, clip) in videos.iter().enumerate() {
            let (grid, seconds) = self
                .video(clip, &mut media.video_patches)
                .with_context(|| format!("video {}", i + 1))?;
            tokens.videos.push(self.tokens(grid));
            media.video_grids.push(grid);
            media.video_seconds.push(seconds);
        }
        Ok((media, tokens))
    }
}
