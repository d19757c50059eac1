//! Images → pixel tiles, as `transformers`' PIL-backed ("slow") image processors make them:
//!
//! * **CLIP** (`CLIPImageProcessor`, `LlavaImageProcessor`; LLaVA-1.5): resize the shortest
//!   edge with PIL bicubic, center crop (zero-padding an image smaller than the crop), rescale
//!   and normalise.
//! * **SigLIP** (`SiglipImageProcessor`; LLaVA-Interleave): resize to the exact square.
//! * **NeXT anyres** (`LlavaNextImageProcessor`): pick the best `image_grid_pinpoints`
//!   resolution, resize keeping the aspect ratio, zero-pad to it centred, cut it into tiles,
//!   and put the whole image squashed to one tile first; each tile then goes through the CLIP
//!   steps.
//! * **OneVision** (`LlavaOnevisionImageProcessor`): the same anyres tiling with tiles
//!   resized to the exact size; but when a sample has several images, each is padded to a
//!   square with the mean colour and becomes one tile (transformers does this when a
//!   sample's images are passed together, `batch_num_images > 1`, as the OneVision recipe
//!   treats multi-image data).
//! * **Video frames** (`LlavaNextVideoVideoProcessor`, `LlavaOnevisionVideoProcessor`): each
//!   frame through the per-tile steps of the video processor's config. transformers runs these
//!   through torchvision on tensors; we resample with PIL's filter, which agrees within a few
//!   levels of 255 (frames that need no resize are exact).
//!
//! Rescale and normalise follow the float order of `image_processing_backends.PilBackend`
//! (`u8 as f64 × scale` → f32, then `(x − mean) / std` in f32), so unresized pixels are
//! bit-exact.
//!
//! # `image_aspect_ratio = "pad"`
//!
//! The original LLaVA-1.5 was trained with its images expanded to a square filled with the
//! mean colour (`int(mean × 255)` per channel) before the CLIP steps, while the llava-hf
//! `CLIPImageProcessor` center-crops, cutting off the borders of non-square images. We pad
//! when, in order of precedence:
//! 1. `config.json` has the original LLaVA's `image_aspect_ratio`: `"pad"` pads, any other
//!    value (`"square"`, `"anyres"`) does not;
//! 2. the processor is a `LlavaImageProcessor`: its `do_pad` (transformers' own
//!    implementation of the same expansion, default off);
//! 3. otherwise, a `llava` checkpoint with a CLIP tower and a CLIP-style processor pads (the
//!    LLaVA-1.5 recipe, also what lmms-finetune's LLaVA-1.5 training reproduces); SigLIP
//!    towers (Interleave, resized to a square without cropping) and NeXT (anyres) do not.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use lmms_ft_core::data::media::{resize, ResampleFilter};
use lmms_ft_core::data::{RgbImage, VideoClip};
use lmms_ft_core::family::{MediaTokens, Processor};
use serde_json::Value;

use crate::anyres::{anyres_image_tokens, select_best_resolution, video_tokens, Tiling};
use crate::config::{Architecture, LlavaConfig, VisionConfig};

// transformers' decimal constants, rounded to f32 as numpy does for a float32 image.
#[allow(clippy::excessive_precision)]
const OPENAI_CLIP_MEAN: [f32; 3] = [0.48145466, 0.4578275, 0.40821073];
#[allow(clippy::excessive_precision)]
const OPENAI_CLIP_STD: [f32; 3] = [0.26862954, 0.26130258, 0.27577711];
const STANDARD_MEAN_STD: [f32; 3] = [0.5, 0.5, 0.5];

/// The `size` of an image processor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeTo {
    /// Shortest edge to this length, the other by `int(size × long / short)`.
    ShortestEdge(u32),
    Exact {
        height: u32,
        width: u32,
    },
}

/// The per-tile steps of `PilBackend._preprocess`, each optional as in the config.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageTransform {
    /// Expand to a square of this colour first (see the module doc).
    pub pad_to_square: Option<[u8; 3]>,
    pub resize: Option<ResizeTo>,
    pub resample: ResampleFilter,
    /// `(height, width)`.
    pub crop: Option<(u32, u32)>,
    pub rescale: Option<f64>,
    pub normalize: Option<([f32; 3], [f32; 3])>,
}

/// `image_processor.pad_to_square`: the image centred (top / left offset floored) on a square
/// of its longer side.
pub fn pad_to_square(img: &RgbImage, colour: [u8; 3]) -> RgbImage {
    let (w, h) = img.dimensions();
    if w == h {
        return img.clone();
    }
    let side = w.max(h);
    let fill = colour.repeat((side * side) as usize);
    let mut out = RgbImage::from_raw(side, side, fill).expect("buffer of side² RGB pixels");
    let (dx, dy) = ((side - w) / 2, (side - h) / 2);
    for (x, y, p) in img.enumerate_pixels() {
        out.put_pixel(x + dx, y + dy, *p);
    }
    out
}

/// `center_crop` to `(height, width)`: the window's top-left is `(size − crop) // 2` (floor,
/// also when negative); rows or columns outside the image are zero, as numpy pads there.
pub fn center_crop(img: &RgbImage, height: u32, width: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    if (w, h) == (width, height) {
        return img.clone();
    }
    let top = (h as i64 - height as i64).div_euclid(2);
    let left = (w as i64 - width as i64).div_euclid(2);
    let mut out = RgbImage::new(width, height);
    for y in 0..height {
        let sy = y as i64 + top;
        if sy < 0 || sy >= h as i64 {
            continue;
        }
        for x in 0..width {
            let sx = x as i64 + left;
            if sx >= 0 && sx < w as i64 {
                out.put_pixel(x, y, *img.get_pixel(sx as u32, sy as u32));
            }
        }
    }
    out
}

/// PIL resize, skipped when the size is unchanged (PIL then returns a copy).
fn resize_to(img: &RgbImage, width: u32, height: u32, filter: ResampleFilter) -> Result<RgbImage> {
    if img.dimensions() == (width, height) {
        return Ok(img.clone());
    }
    Ok(resize(img, width, height, filter)?)
}

impl ImageTransform {
    /// `(height, width)` a resize produces from an image of `(h, w)`.
    pub fn resized_size(&self, h: u32, w: u32) -> (u32, u32) {
        match self.resize {
            None => (h, w),
            Some(ResizeTo::Exact { height, width }) => (height, width),
            Some(ResizeTo::ShortestEdge(s)) => {
                let (short, long) = if w <= h { (w, h) } else { (h, w) };
                let new_long = (s as f64 * long as f64 / short as f64) as u32;
                if w <= h {
                    (new_long, s)
                } else {
                    (s, new_long)
                }
            }
        }
    }

    /// Every step up to (not including) rescaling: the 8-bit tile.
    pub fn pixels(&self, img: &RgbImage) -> Result<RgbImage> {
        let padded;
        let img = match self.pad_to_square {
            Some(c) => {
                padded = pad_to_square(img, c);
                &padded
            }
            None => img,
        };
        let (w, h) = img.dimensions();
        let (rh, rw) = self.resized_size(h, w);
        ensure!(rh > 0 && rw > 0, "image of {w}x{h} resizes to nothing");
        let img = resize_to(img, rw, rh, self.resample)?;
        Ok(match self.crop {
            Some((ch, cw)) => center_crop(&img, ch, cw),
            None => img,
        })
    }

    /// Rescaled and normalised planes `[3][h·w]`, appended to `out`.
    pub fn planes(&self, img: &RgbImage, out: &mut Vec<f32>) {
        let (w, h) = img.dimensions();
        let n = (w * h) as usize;
        let start = out.len();
        out.resize(start + 3 * n, 0.0);
        let planes = &mut out[start..];
        for (i, px) in img.pixels().enumerate() {
            for c in 0..3 {
                let x = match self.rescale {
                    Some(s) => (px.0[c] as f64 * s) as f32,
                    None => px.0[c] as f32,
                };
                planes[c * n + i] = match self.normalize {
                    Some((mean, std)) => (x - mean[c]) / std[c],
                    None => x,
                };
            }
        }
    }
}

/// LLaVA-NeXT's anyres settings.
#[derive(Debug, Clone, PartialEq)]
pub struct AnyRes {
    pub pinpoints: Vec<[i64; 2]>,
    /// `(height, width)` the base (whole-image) tile is squashed to before the tile steps.
    pub base: (u32, u32),
    /// Feature grid side of one tile and features of the base tile (for token counts).
    pub grid: i64,
    pub base_tokens: i64,
    /// OneVision's `anyres_max_N` budget (see [`crate::anyres::anyres_max_shape`]).
    pub max_patches: Option<i64>,
}

/// `get_patch_output_size`: the aspect-preserving size that fits `target = (h, w)`.
pub fn patch_output_size(h: u32, w: u32, target: [i64; 2]) -> (u32, u32) {
    let (th, tw) = (target[0] as f64, target[1] as f64);
    let (sw, sh) = (tw / w as f64, th / h as f64);
    if sw < sh {
        (((h as f64 * sw).ceil()).min(th) as u32, tw as u32)
    } else {
        (th as u32, ((w as f64 * sh).ceil()).min(tw) as u32)
    }
}

impl AnyRes {
    /// The base tile then the grid tiles (row-major), each still 8-bit and before the tile
    /// steps, plus the tiling.
    pub fn tiles(
        &self,
        img: &RgbImage,
        tile: u32,
        filter: ResampleFilter,
    ) -> Result<(Vec<RgbImage>, Tiling)> {
        let (w, h) = img.dimensions();
        let best = select_best_resolution([h as i64, w as i64], &self.pinpoints)
            .context("image_grid_pinpoints is empty")?;
        let tiling = Tiling {
            rows: best[0] / tile as i64,
            cols: best[1] / tile as i64,
        };
        let (nh, nw) = patch_output_size(h, w, best);
        let resized = resize_to(img, nw, nh, filter)?;
        let (bh, bw) = (best[0] as u32, best[1] as u32);
        let (top, left) = ((bh - nh) / 2, (bw - nw) / 2);
        let mut canvas = RgbImage::new(bw, bh);
        for (x, y, p) in resized.enumerate_pixels() {
            canvas.put_pixel(x + left, y + top, *p);
        }
        let mut tiles = vec![resize_to(img, self.base.1, self.base.0, filter)?];
        for r in 0..tiling.rows as u32 {
            for c in 0..tiling.cols as u32 {
                let mut t = RgbImage::new(tile, tile);
                for y in 0..tile {
                    for x in 0..tile {
                        t.put_pixel(x, y, *canvas.get_pixel(c * tile + x, r * tile + y));
                    }
                }
                tiles.push(t);
            }
        }
        Ok((tiles, tiling))
    }
}

/// The image (and video frame) processor of a LLaVA-family checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct LlavaProcessor {
    pub transform: ImageTransform,
    /// Side of every tile the tower sees (its `image_size`).
    pub tile: u32,
    /// Placeholder tokens of a one-tile image (LLaVA; OneVision multi-image samples add one
    /// `image_newline` to it).
    pub tokens_per_image: i64,
    /// All but LLaVA-1.5 / Interleave.
    pub anyres: Option<AnyRes>,
    /// OneVision: the colour each image of a multi-image sample is padded to a square with
    /// (`int(mean × 255)`) before becoming one tile, as `LlavaOnevisionImageProcessor` does
    /// when a sample's images arrive together (`batch_num_images > 1`).
    pub multi_image_pad: Option<[u8; 3]>,
    /// NeXT-Video and OneVision.
    pub video: Option<FrameProcessor>,
}

/// How video frames become tiles, and what each video costs in placeholder tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct FrameProcessor {
    /// The video processor's per-frame steps (resize, crop, rescale, normalise).
    pub transform: ImageTransform,
    /// Feature grid side of one frame (`image_size / patch_size`).
    pub grid: i64,
    /// NeXT-Video's pooling stride; `None` for OneVision (bilinear halving plus a newline).
    pub pool_stride: Option<i64>,
}

/// Processed media of one sample: every tile of every image, `[tiles][3][tile][tile]`, and
/// every frame of every video, `[frames][3][tile][tile]`.
#[derive(Debug, Clone, Default)]
pub struct LlavaMedia {
    pub pixels: Vec<f32>,
    pub num_tiles: usize,
    /// `(height, width)` of each original image (NeXT's unpadding needs them).
    pub image_sizes: Vec<[i64; 2]>,
    /// Per image, whether it was tiled anyres-style (see [`crate::model::Batch`]).
    pub image_anyres: Vec<bool>,
    pub video_pixels: Vec<f32>,
    /// Frames of each video.
    pub video_frames: Vec<i64>,
}

fn read_json(dir: &Path, name: &str) -> Result<Option<Value>> {
    let path = dir.join(name);
    if !path.is_file() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(Some(
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?,
    ))
}

fn u32_of(v: &Value, key: &str) -> Option<u32> {
    v.get(key).and_then(Value::as_u64).map(|x| x as u32)
}

fn flag(v: &Value, key: &str, default: bool) -> Result<bool> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => bail!("`{key}` must be true or false, got {other}"),
    }
}

fn triple(v: &Value, key: &str, default: [f32; 3]) -> Result<[f32; 3]> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Number(n)) => Ok([n.as_f64().unwrap_or(0.0) as f32; 3]),
        Some(x) => {
            let a: Vec<f32> = x
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|y| y.as_f64().map(|f| f as f32))
                        .collect()
                })
                .unwrap_or_default();
            a.try_into()
                .map_err(|_| anyhow::anyhow!("`{key}` must be 3 numbers, got {x}"))
        }
    }
}

fn size_of(v: &Value, key: &str) -> Result<Option<ResizeTo>> {
    let Some(s) = v.get(key).filter(|s| !s.is_null()) else {
        return Ok(None);
    };
    if let Some(n) = s.as_u64() {
        return Ok(Some(ResizeTo::ShortestEdge(n as u32)));
    }
    match (
        u32_of(s, "height"),
        u32_of(s, "width"),
        u32_of(s, "shortest_edge"),
    ) {
        (Some(height), Some(width), _) if height > 0 && width > 0 => {
            Ok(Some(ResizeTo::Exact { height, width }))
        }
        (_, _, Some(e)) if e > 0 => Ok(Some(ResizeTo::ShortestEdge(e))),
        _ => bail!("`{key}` must give positive height and width, or shortest_edge; got {s}"),
    }
}

/// PIL's resampling codes (`Image.Resampling`).
fn resample(v: &Value) -> Result<ResampleFilter> {
    Ok(match v.get("resample").and_then(Value::as_u64) {
        None | Some(3) => ResampleFilter::Bicubic,
        Some(0) => ResampleFilter::Nearest,
        Some(1) => ResampleFilter::Lanczos,
        Some(2) => ResampleFilter::Bilinear,
        Some(other) => bail!("resample {other} is not supported (0, 1, 2 or 3)"),
    })
}

/// Defaults of one processor class.
struct Defaults {
    size: ResizeTo,
    crop: bool,
    mean: [f32; 3],
    std: [f32; 3],
}

const CLIP_DEFAULTS: Defaults = Defaults {
    size: ResizeTo::ShortestEdge(224),
    crop: true,
    mean: OPENAI_CLIP_MEAN,
    std: OPENAI_CLIP_STD,
};

/// The per-tile steps a processor config describes, checked to produce tiles the tower
/// takes.
fn transform_from(
    v: &Value,
    d: &Defaults,
    pad: impl FnOnce(&Value) -> Result<bool>,
    tile: u32,
) -> Result<(ImageTransform, ResizeTo)> {
    let size = size_of(v, "size")?.unwrap_or(d.size);
    let crop_size = match size_of(v, "crop_size")? {
        Some(ResizeTo::Exact { height, width }) => Some((height, width)),
        Some(ResizeTo::ShortestEdge(e)) => Some((e, e)),
        None if !d.crop => None,
        None => Some((224, 224)),
    };
    let mean = triple(v, "image_mean", d.mean)?;
    let std = triple(v, "image_std", d.std)?;
    let transform = ImageTransform {
        pad_to_square: pad(v)?.then(|| mean.map(|m| (m as f64 * 255.0) as u8)),
        resize: flag(v, "do_resize", true)?.then_some(size),
        resample: resample(v)?,
        crop: if flag(v, "do_center_crop", d.crop)? {
            crop_size
        } else {
            None
        },
        rescale: flag(v, "do_rescale", true)?.then(|| {
            v.get("rescale_factor")
                .and_then(Value::as_f64)
                .unwrap_or(1.0 / 255.0)
        }),
        normalize: flag(v, "do_normalize", true)?.then_some((mean, std)),
    };
    let made = match (transform.crop, transform.resize) {
        (Some((h, w)), _) | (None, Some(ResizeTo::Exact { height: h, width: w })) => (h, w),
        _ => bail!("the processor neither crops nor resizes to a fixed size, so its tiles would not fit the vision tower"),
    };
    ensure!(
        made == (tile, tile),
        "the processor makes {}x{} tiles but the vision tower takes {tile}x{tile}",
        made.0,
        made.1
    );
    Ok((transform, size))
}

impl LlavaProcessor {
    /// Reads `preprocessor_config.json` (Hub layout) or the `image_processor` entry of the
    /// `processor_config.json` transformers 5 writes, with transformers' defaults for the
    /// processor type (inferred from the tower when the file names none); for the video
    /// architectures also `video_preprocessor_config.json` or the `video_processor` entry,
    /// else the image settings.
    pub fn from_dir(config: &LlavaConfig, dir: &Path) -> Result<LlavaProcessor> {
        let nested = read_json(dir, "processor_config.json")?;
        let entry = |file: &str, key: &str| -> Result<Value> {
            Ok(match read_json(dir, file)? {
                Some(v) => v,
                None => nested
                    .as_ref()
                    .and_then(|n| n.get(key).cloned())
                    .unwrap_or(Value::Null),
            })
        };
        let settings = entry("preprocessor_config.json", "image_processor")?;
        let mut processor = Self::from_settings(config, &settings)
            .with_context(|| format!("image processor settings in {}", dir.display()))?;
        if config.architecture.video() {
            // Repos converted before transformers had video processors keep one
            // `preprocessor_config.json` for both; its resize and normalisation then apply to
            // frames too.
            let video = match entry("video_preprocessor_config.json", "video_processor")? {
                Value::Null => settings.clone(),
                v => v,
            };
            processor.video = Some(
                FrameProcessor::from_settings(config, &video)
                    .with_context(|| format!("video processor settings in {}", dir.display()))?,
            );
        }
        Ok(processor)
    }

    /// The image processor alone (`video` stays `None`; see [`FrameProcessor`]).
    pub fn from_settings(config: &LlavaConfig, v: &Value) -> Result<LlavaProcessor> {
        let siglip_tower = matches!(config.vision, VisionConfig::Siglip(_));
        let kind = v
            .get("image_processor_type")
            .and_then(Value::as_str)
            .map(|s| s.trim_end_matches("Fast").trim_end_matches("Pil"))
            .unwrap_or(match config.architecture {
                Architecture::LlavaOnevision => "LlavaOnevisionImageProcessor",
                Architecture::LlavaNext | Architecture::LlavaNextVideo => "LlavaNextImageProcessor",
                Architecture::Llava if siglip_tower => "SiglipImageProcessor",
                Architecture::Llava => "CLIPImageProcessor",
            });
        let defaults = match kind {
            "SiglipImageProcessor" => Defaults {
                size: ResizeTo::Exact {
                    height: 224,
                    width: 224,
                },
                crop: false,
                mean: STANDARD_MEAN_STD,
                std: STANDARD_MEAN_STD,
            },
            "LlavaOnevisionImageProcessor" => Defaults {
                size: ResizeTo::Exact {
                    height: 384,
                    width: 384,
                },
                crop: false,
                mean: OPENAI_CLIP_MEAN,
                std: OPENAI_CLIP_STD,
            },
            // ChineseCLIPImageProcessor has CLIP's steps and defaults.
            "CLIPImageProcessor" | "ChineseCLIPImageProcessor" | "LlavaImageProcessor"
            | "LlavaNextImageProcessor" | "LlavaNextVideoImageProcessor" => CLIP_DEFAULTS,
            other => bail!("image_processor_type `{other}` is not supported for LLaVA (CLIPImageProcessor, ChineseCLIPImageProcessor, LlavaImageProcessor, LlavaNextImageProcessor, LlavaOnevisionImageProcessor, SiglipImageProcessor)"),
        };
        ensure!(
            (kind == "LlavaOnevisionImageProcessor")
                == (config.architecture == Architecture::LlavaOnevision),
            "image_processor_type `{kind}` does not fit a {:?} checkpoint",
            config.architecture
        );
        let pad = |v: &Value| {
            Ok(match (&config.image_aspect_ratio, kind) {
                (Some(ratio), _) => ratio == "pad",
                (None, "LlavaImageProcessor") => flag(v, "do_pad", false)?,
                (None, "CLIPImageProcessor" | "ChineseCLIPImageProcessor") => {
                    config.architecture == Architecture::Llava
                }
                _ => false,
            })
        };
        let tile = config.vision.image_size() as u32;
        let (transform, size) = transform_from(v, &defaults, pad, tile)?;
        let anyres = if config.architecture.anyres() {
            if let Some(p) = v.get("image_grid_pinpoints").filter(|p| !p.is_null()) {
                let ours: Vec<[i64; 2]> = serde_json::from_value(p.clone())
                    .with_context(|| format!("image_grid_pinpoints {p}"))?;
                ensure!(
                    ours == config.image_grid_pinpoints,
                    "the processor's image_grid_pinpoints {ours:?} differ from config.json's {:?}, so token counts would not match the model",
                    config.image_grid_pinpoints
                );
            }
            let base = match size {
                ResizeTo::Exact { height, width } => (height, width),
                ResizeTo::ShortestEdge(e) => (e, e),
            };
            Some(AnyRes {
                pinpoints: config.image_grid_pinpoints.clone(),
                base,
                grid: config.vision.image_size() / config.vision.patch_size(),
                base_tokens: config.tokens_per_tile(),
                max_patches: config.max_patches,
            })
        } else {
            None
        };
        let multi_image_pad = (config.architecture == Architecture::LlavaOnevision)
            .then(|| {
                transform
                    .normalize
                    .map(|(mean, _)| mean)
                    .unwrap_or(OPENAI_CLIP_MEAN)
            })
            .map(|mean| mean.map(|m| (m as f64 * 255.0) as u8));
        Ok(LlavaProcessor {
            transform,
            tile,
            tokens_per_image: config.tokens_per_tile(),
            anyres,
            multi_image_pad,
            video: None,
        })
    }

    /// One image's tiles appended to `media`; returns its placeholder token count. `alone`:
    /// whether it is its sample's only image (OneVision tiles only those).
    pub fn image(&self, img: &RgbImage, alone: bool, media: &mut LlavaMedia) -> Result<usize> {
        let (w, h) = img.dimensions();
        ensure!(w > 0 && h > 0, "image is empty");
        let size = [h as i64, w as i64];
        let single = self.multi_image_pad.filter(|_| !alone);
        let (tiles, tokens) = match (&self.anyres, single) {
            (Some(_), Some(colour)) => {
                let t = self.transform.pixels(&pad_to_square(img, colour))?;
                self.transform.planes(&t, &mut media.pixels);
                media.num_tiles += 1;
                media.image_sizes.push(size);
                media.image_anyres.push(false);
                return Ok((self.tokens_per_image + 1) as usize);
            }
            (None, _) => (vec![img.clone()], self.tokens_per_image),
            (Some(any), None) => {
                let (tiles, tiling) = any.tiles(img, self.tile, self.transform.resample)?;
                let n =
                    anyres_image_tokens(size, tiling, any.grid, any.base_tokens, any.max_patches);
                (tiles, n)
            }
        };
        for t in &tiles {
            let t = self.transform.pixels(t)?;
            self.transform.planes(&t, &mut media.pixels);
        }
        media.num_tiles += tiles.len();
        media.image_sizes.push(size);
        media.image_anyres.push(self.anyres.is_some());
        Ok(tokens as usize)
    }
}

impl FrameProcessor {
    /// The video processor of a NeXT-Video (`LlavaNextVideoVideoProcessor`: CLIP-style
    /// shortest-edge resize and center crop) or OneVision (`LlavaOnevisionVideoProcessor`:
    /// resize to the exact size) checkpoint, with that class's defaults.
    pub fn from_settings(config: &LlavaConfig, v: &Value) -> Result<FrameProcessor> {
        let defaults = match config.architecture {
            Architecture::LlavaOnevision => Defaults {
                size: ResizeTo::Exact {
                    height: 384,
                    width: 384,
                },
                crop: false,
                mean: OPENAI_CLIP_MEAN,
                std: OPENAI_CLIP_STD,
            },
            Architecture::LlavaNextVideo => CLIP_DEFAULTS,
            other => bail!("{other:?} checkpoints take no videos"),
        };
        let tile = config.vision.image_size() as u32;
        let (transform, _) = transform_from(v, &defaults, |_| Ok(false), tile)?;
        Ok(FrameProcessor {
            transform,
            grid: config.vision.image_size() / config.vision.patch_size(),
            pool_stride: config.video_pool.map(|(_, s)| s),
        })
    }

    /// One video's frames appended to `media`; returns its placeholder token count.
    pub fn video(&self, clip: &VideoClip, media: &mut LlavaMedia) -> Result<usize> {
        ensure!(!clip.frames.is_empty(), "video has no frames");
        for (i, frame) in clip.frames.iter().enumerate() {
            let t = self
                .transform
                .pixels(frame)
                .with_context(|| format!("frame {}", i + 1))?;
            self.transform.planes(&t, &mut media.video_pixels);
        }
        let frames = clip.frames.len() as i64;
        media.video_frames.push(frames);
        Ok(video_tokens(frames, self.grid, self.pool_stride) as usize)
    }
}

impl Processor for LlavaProcessor {
    type Media = LlavaMedia;

    fn process(
        &self,
        images: &[RgbImage],
        videos: &[VideoClip],
    ) -> Result<(LlavaMedia, MediaTokens)> {
        let frames = match (&self.video, videos.is_empty()) {
            (_, true) => None,
            (Some(f), false) => Some(f),
            (None, false) => bail!("LLaVA-1.5 / Interleave / NeXT checkpoints take images only; this sample has {} video(s) (LLaVA-NeXT-Video and OneVision take videos; for Interleave, give the frames as images)", videos.len()),
        };
        let mut media = LlavaMedia::default();
        let mut tokens = MediaTokens::default();
        let alone = images.len() == 1;
        for (i, img) in images.iter().enumerate() {
            tokens.images.push(
                self.image(img, alone, &mut media)
                    .with_context(|| format!("image {}", i + 1))?,
            );
        }
        if let Some(f) = frames {
            for (i, clip) in videos.iter().enumerate() {
                tokens.videos.push(
                    f.video(clip, &mut media)
                        .with_context(|| format!("video {}", i + 1))?,
                );
            }
        }
        Ok((media, tokens))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hand-computed: a 3×1 image centred on a 3×3 square; a 4×2 crop of a 2×2 image keeps
    /// the image in the middle columns (left offset (2−4)//2 = −1) with zero columns around.
    #[test]
    fn pad_and_crop_geometry() {
        let img = RgbImage::from_raw(3, 1, vec![1, 1, 1, 2, 2, 2, 3, 3, 3]).unwrap();
        let sq = pad_to_square(&img, [9, 9, 9]);
        assert_eq!(sq.dimensions(), (3, 3));
        assert_eq!(sq.get_pixel(0, 0).0, [9, 9, 9]);
        assert_eq!(sq.get_pixel(1, 1).0, [2, 2, 2]);
        assert_eq!(sq.get_pixel(2, 2).0, [9, 9, 9]);
        let small = RgbImage::from_raw(2, 2, (1..=12).collect()).unwrap();
        let c = center_crop(&small, 2, 4);
        assert_eq!(c.get_pixel(0, 0).0, [0, 0, 0]);
        assert_eq!(c.get_pixel(1, 0).0, [1, 2, 3]);
        assert_eq!(c.get_pixel(2, 1).0, [10, 11, 12]);
        assert_eq!(c.get_pixel(3, 1).0, [0, 0, 0]);
        // 300 wide × 100 high into 50×100 (h×w): width-limited (1/3 < 1/2), so w = 100 and
        // h = ceil(100 / 3) = 34.
        assert_eq!(patch_output_size(100, 300, [50, 100]), (34, 100));
    }

    /// A OneVision directory with only the Hub's `preprocessor_config.json` (no video
    /// processor file): frames get the image settings' exact 384 resize and 0.5 mean / std,
    /// not the video class defaults (OpenAI CLIP statistics); multi-image padding uses
    /// int(0.5 × 255) = 127.
    #[test]
    fn video_settings_fall_back_to_the_image_processor() {
        let config = <LlavaConfig as lmms_ft_core::family::HfConfig>::from_hf_json(
            &serde_json::json!({"model_type": "llava_onevision"}),
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let settings = serde_json::json!({
            "image_processor_type": "LlavaOnevisionImageProcessor",
            "size": {"height": 384, "width": 384},
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        });
        std::fs::write(
            dir.path().join("preprocessor_config.json"),
            settings.to_string(),
        )
        .unwrap();
        let p = LlavaProcessor::from_dir(&config, dir.path()).unwrap();
        let frames = p.video.unwrap();
        let half = ([0.5f32; 3], [0.5f32; 3]);
        assert_eq!(frames.transform.normalize, Some(half));
        assert_eq!(
            frames.transform.resize,
            Some(ResizeTo::Exact {
                height: 384,
                width: 384
            })
        );
        assert_eq!(frames.transform.crop, None);
        assert_eq!((frames.grid, frames.pool_stride), (27, None));
        assert_eq!(p.multi_image_pad, Some([127, 127, 127]));
        assert_eq!(p.anyres.unwrap().max_patches, Some(9));
    }
}
