//! Images → tiles, as `transformers`' `MllamaImageProcessorPil` makes them: pick the tile
//! arrangement (canvas) whose scale is the smallest upscale, else the largest downscale
//! (ties: the smallest area), resize the image to fit it keeping the aspect ratio (PIL
//! bilinear on the 8-bit image), zero-pad right and bottom to the canvas, rescale and
//! normalise in the same float order as `PilBackend` (`u8 as f64 × scale` → f32, then
//! `(x − mean) / std` in f32), and cut the canvas into `size × size` tiles, row by row.
//!
//! Every image becomes exactly one `<|image|>` token; the vision features reach the text
//! through cross-attention, not as tokens.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use lmms_ft_core::data::media::{resize, ResampleFilter};
use lmms_ft_core::data::{RgbImage, VideoClip};
use lmms_ft_core::family::{MediaTokens, Processor};
use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
pub struct MllamaProcessor {
    /// Tile side (`size.height == size.width`).
    pub tile_size: u32,
    pub max_image_tiles: u32,
    pub resample: ResampleFilter,
    pub rescale_factor: f64,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// Most images one sample may hold ([`DEFAULT_MAX_IMAGES`]): every image of a batch
    /// costs `max_image_tiles` tiles of vision compute and cross-attention keys, for every
    /// sample of the batch, so an unbounded count is refused rather than run out of memory.
    pub max_images: usize,
}

/// One image, tiled.
#[derive(Debug, Clone, PartialEq)]
pub struct TiledImage {
    /// `[tiles, 3, size, size]`, row-major.
    pub pixels: Vec<f32>,
    /// `(tiles down, tiles across)`.
    pub arrangement: (u32, u32),
    /// Index of the arrangement among [`supported_aspect_ratios`] plus one (0 is padding).
    pub aspect_ratio_id: i64,
}

impl TiledImage {
    pub fn num_tiles(&self) -> i64 {
        (self.arrangement.0 * self.arrangement.1) as i64
    }
}

/// Processed media of one sample, in `<|image|>` order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MllamaMedia {
    pub images: Vec<TiledImage>,
}

/// `get_all_supported_aspect_ratios`: `(a, b)` with `a · b ≤ max_tiles`, `a` outer; the
/// processor reads `a` as tiles down and `b` as tiles across.
pub fn supported_aspect_ratios(max_tiles: u32) -> Vec<(u32, u32)> {
    let mut out = Vec::new();
    for a in 1..=max_tiles {
        for b in 1..=max_tiles {
            if a * b <= max_tiles {
                out.push((a, b));
            }
        }
    }
    out
}

/// `get_optimal_tiled_canvas`: `(height, width)` of the chosen canvas, in pixels.
pub fn optimal_canvas(height: u32, width: u32, max_tiles: u32, tile: u32) -> (u32, u32) {
    let canvases: Vec<(u32, u32)> = supported_aspect_ratios(max_tiles)
        .into_iter()
        .map(|(a, b)| (a * tile, b * tile))
        .collect();
    let scales: Vec<f64> = canvases
        .iter()
        .map(|&(ch, cw)| {
            let sh = ch as f64 / height as f64;
            let sw = cw as f64 / width as f64;
            if sw > sh {
                sh
            } else {
                sw
            }
        })
        .collect();
    let up = scales
        .iter()
        .copied()
        .filter(|&s| s >= 1.0)
        .reduce(f64::min);
    let selected = match up {
        Some(s) => s,
        None => scales
            .iter()
            .copied()
            .filter(|&s| s < 1.0)
            .fold(f64::NEG_INFINITY, f64::max),
    };
    // Among equal scales, the first of the smallest area (numpy's argmin).
    let mut best: Option<(u32, u32)> = None;
    for (c, s) in canvases.iter().zip(&scales) {
        if *s == selected && best.is_none_or(|b| c.0 * c.1 < b.0 * b.1) {
            best = Some(*c);
        }
    }
    best.unwrap_or((tile, tile))
}

/// `get_image_size_fit_to_canvas`: `(height, width)` after the aspect-preserving resize.
pub fn fit_to_canvas(height: u32, width: u32, canvas: (u32, u32), tile: u32) -> (u32, u32) {
    let (ch, cw) = canvas;
    let tw = width.clamp(tile.min(cw), cw.max(tile));
    let th = height.clamp(tile.min(ch), ch.max(tile));
    let scale_h = th as f64 / height as f64;
    let scale_w = tw as f64 / width as f64;
    if scale_w < scale_h {
        let nh = ((height as f64 * scale_w).floor() as u32).max(1);
        (nh.min(th), tw)
    } else {
        let nw = ((width as f64 * scale_h).floor() as u32).max(1);
        (th, nw.min(tw))
    }
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

fn resample(v: &Value) -> Result<ResampleFilter> {
    Ok(
        match v.get("resample").and_then(Value::as_i64).unwrap_or(2) {
            0 => ResampleFilter::Nearest,
            2 => ResampleFilter::Bilinear,
            3 => ResampleFilter::Bicubic,
            1 => ResampleFilter::Lanczos,
            other => bail!(
                "`resample` {other} is not supported (0 nearest, 1 lanczos, 2 bilinear, 3 bicubic)"
            ),
        },
    )
}

/// Images one sample may carry unless the processor config says otherwise.
pub const DEFAULT_MAX_IMAGES: usize = 8;

impl MllamaProcessor {
    /// Reads `preprocessor_config.json`, or the `image_processor` of the nested
    /// `processor_config.json` `transformers` 5 writes.
    pub fn from_dir(dir: &Path) -> Result<MllamaProcessor> {
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
        let v = match read("preprocessor_config.json")? {
            Some(v) => v,
            None => read("processor_config.json")?
                .and_then(|n| n.get("image_processor").cloned())
                .unwrap_or(Value::Null),
        };
        Self::from_settings(&v).with_context(|| format!("image processor of {}", dir.display()))
    }

    pub fn from_settings(v: &Value) -> Result<MllamaProcessor> {
        for flag in ["do_resize", "do_pad"] {
            if v.get(flag).and_then(Value::as_bool) == Some(false) {
                bail!("MllamaImageProcessor does not support `{flag} = false`");
            }
        }
        let size = v.get("size").cloned().unwrap_or(Value::Null);
        let h = size.get("height").and_then(Value::as_u64).unwrap_or(224);
        let w = size.get("width").and_then(Value::as_u64).unwrap_or(224);
        ensure!(
            h == w && h > 0,
            "`size` must be a non-empty square, got {h}x{w}"
        );
        let max_image_tiles = v
            .get("max_image_tiles")
            .and_then(Value::as_u64)
            .unwrap_or(4);
        ensure!(max_image_tiles > 0, "`max_image_tiles` must be positive");
        let rescale = v.get("do_rescale").and_then(Value::as_bool).unwrap_or(true);
        let normalize = v
            .get("do_normalize")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        ensure!(
            rescale && normalize,
            "only do_rescale = do_normalize = true is supported"
        );
        Ok(MllamaProcessor {
            tile_size: h as u32,
            max_image_tiles: max_image_tiles as u32,
            resample: resample(v)?,
            rescale_factor: v
                .get("rescale_factor")
                .and_then(Value::as_f64)
                .unwrap_or(1.0 / 255.0),
            // The class defaults are IMAGENET_STANDARD (0.5); the Hub file gives CLIP's.
            mean: triple(v, "image_mean", [0.5; 3])?,
            std: triple(v, "image_std", [0.5; 3])?,
            max_images: DEFAULT_MAX_IMAGES,
        })
    }

    /// Tiles one image.
    pub fn tile(&self, img: &RgbImage) -> Result<TiledImage> {
        let (w, h) = img.dimensions();
        ensure!(w > 0 && h > 0, "empty image");
        let s = self.tile_size;
        let canvas = optimal_canvas(h, w, self.max_image_tiles, s);
        let (nh, nw) = fit_to_canvas(h, w, canvas, s);
        let resized;
        let img = if (nw, nh) == (w, h) {
            img
        } else {
            resized = resize(img, nw, nh, self.resample)?;
            &resized
        };
        let arrangement = (canvas.0 / s, canvas.1 / s);
        let aspect_ratio_id = supported_aspect_ratios(self.max_image_tiles)
            .iter()
            .position(|&a| a == arrangement)
            .context("canvas outside the supported arrangements")?
            as i64
            + 1;
        let (th, tw) = arrangement;
        let (s_us, cw) = (s as usize, canvas.1 as usize);
        let tile_len = 3 * s_us * s_us;
        let mut pixels = vec![0f32; (th * tw) as usize * tile_len];
        // The padding is 0 before rescaling, so it normalises to −mean/std.
        let pad: [f32; 3] = std::array::from_fn(|c| (0.0 - self.mean[c]) / self.std[c]);
        for (t, chunk) in pixels.chunks_mut(tile_len).enumerate() {
            let (ty, tx) = (t / tw as usize, t % tw as usize);
            for c in 0..3 {
                let plane = &mut chunk[c * s_us * s_us..(c + 1) * s_us * s_us];
                for y in 0..s_us {
                    let gy = ty * s_us + y;
                    for x in 0..s_us {
                        let gx = tx * s_us + x;
                        plane[y * s_us + x] = if gy < nh as usize && gx < nw as usize && gx < cw {
                            let v = img.get_pixel(gx as u32, gy as u32).0[c];
                            ((v as f64 * self.rescale_factor) as f32 - self.mean[c]) / self.std[c]
                        } else {
                            pad[c]
                        };
                    }
                }
            }
        }
        Ok(TiledImage {
            pixels,
            arrangement,
            aspect_ratio_id,
        })
    }
}

impl Processor for MllamaProcessor {
    type Media = MllamaMedia;

    fn process(
        &self,
        images: &[RgbImage],
        videos: &[VideoClip],
    ) -> Result<(MllamaMedia, MediaTokens)> {
        ensure!(
            videos.is_empty(),
            "Llama-3.2-Vision takes images only; this sample has {} video(s)",
            videos.len()
        );
        ensure!(
            images.len() <= self.max_images,
            "this sample has {} images, more than the {} this model accepts per sample",
            images.len(),
            self.max_images
        );
        let images = images
            .iter()
            .enumerate()
            .map(|(i, img)| self.tile(img).with_context(|| format!("image {}", i + 1)))
            .collect::<Result<Vec<_>>>()?;
        let tokens = MediaTokens {
            images: vec![1; images.len()],
            videos: Vec::new(),
        };
        Ok((MllamaMedia { images }, tokens))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrangements_and_canvases() {
        assert_eq!(
            supported_aspect_ratios(4),
            vec![
                (1, 1),
                (1, 2),
                (1, 3),
                (1, 4),
                (2, 1),
                (2, 2),
                (3, 1),
                (4, 1)
            ]
        );
        // Square image larger than one tile: 2×2 upscales least (scale 1.12).
        assert_eq!(optimal_canvas(1000, 1000, 4, 560), (1120, 1120));
        // A tiny image: every canvas upscales; the smallest is one tile.
        assert_eq!(optimal_canvas(10, 10, 4, 560), (560, 560));
        // Far too wide for any canvas: the largest downscale, 1×4.
        assert_eq!(optimal_canvas(10, 100000, 4, 560), (560, 2240));
        assert_eq!(fit_to_canvas(10, 100000, (560, 2240), 560), (1, 2240));
        assert_eq!(fit_to_canvas(300, 500, (560, 560), 560), (336, 560));
    }
}
