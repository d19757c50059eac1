//! `Phi3VImageProcessor` (`image_processing_phi3_v.py`): the HD transform. An image is turned
//! landscape (transposed if taller than wide), resized with PIL's bilinear filter to the
//! largest `scale · 336` width whose 336-pixel crop grid stays within `num_crops`, padded with
//! white above and below to a multiple of 336, turned back, normalised, and cut into
//! `rows × cols` crops of 336², preceded by a global view: the whole padded image bicubically
//! interpolated (torch's, on the normalised pixels) to 336².
//!
//! The Hub pads every image's crops to `num_crops + 1` with zeros that the model then drops;
//! they are not made here.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use lmms_ft_core::data::media::{resize, ResampleFilter};
use lmms_ft_core::data::{RgbImage, VideoClip};
use lmms_ft_core::family::{MediaTokens, Processor};
use serde_json::Value;
use tch::{Kind, Tensor};

/// Side of one crop and of the global view.
pub const CROP: i64 = 336;

/// The processed images of one sample.
#[derive(Debug)]
pub struct PhiMedia {
    /// Per image `[1 + rows·cols, 3, 336, 336]` fp32: the global view, then the crops in
    /// row-major order.
    pub crops: Vec<Tensor>,
    /// Per image `(rows, cols)` of its crop grid (the Hub's `image_sizes / 336`).
    pub grids: Vec<(i64, i64)>,
}

#[derive(Debug, Clone)]
pub struct Phi3VProcessor {
    pub num_crops: i64,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// Tokens one image takes: `(rows·cols + 1)·144` merged patches, one `glb_GN`, and a
/// `sub_GN` ending each of the `12·rows` crop rows and the 12 global rows.
pub fn image_tokens(rows: i64, cols: i64) -> i64 {
    (rows * cols + 1) * 144 + 1 + (rows + 1) * 12
}

/// The HD canvas `(width, height)` an image of `width × height` is resized to before the
/// white padding, and its crop grid `(rows, cols)` (`calc_hd_transform_size`).
pub fn hd_size(width: u32, height: u32, num_crops: i64) -> ((u32, u32), (i64, i64)) {
    let transposed = width < height;
    let (w, h) = if transposed {
        (height, width)
    } else {
        (width, height)
    };
    let ratio = w as f64 / h as f64;
    let mut scale = 1i64;
    while (scale as f64) * (scale as f64 / ratio).ceil() <= num_crops as f64 {
        scale += 1;
    }
    scale -= 1;
    let new_w = (scale * CROP) as u32;
    let new_h = (new_w as f64 / ratio) as u32;
    let rows = (new_h as i64 + CROP - 1) / CROP;
    let cols = scale;
    if transposed {
        ((new_h, new_w), (cols, rows))
    } else {
        ((new_w, new_h), (rows, cols))
    }
}

fn transpose(img: &RgbImage) -> RgbImage {
    let (w, h) = img.dimensions();
    RgbImage::from_fn(h, w, |x, y| *img.get_pixel(y, x))
}

impl Phi3VProcessor {
    /// Reads `preprocessor_config.json` (`num_crops`, `image_mean`, `image_std`), with the
    /// processor class's defaults for absent keys.
    pub fn from_dir(dir: &Path) -> Result<Phi3VProcessor> {
        let path = dir.join("preprocessor_config.json");
        let v: Value = match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", path.display()))?,
            Err(_) => Value::Object(Default::default()),
        };
        Self::from_settings(&v).with_context(|| format!("settings in {}", path.display()))
    }

    pub fn from_settings(v: &Value) -> Result<Phi3VProcessor> {
        let num_crops = lmms_ft_backbones::vit::int(v, "num_crops", 1)?;
        ensure!(num_crops >= 1, "num_crops must be at least 1");
        let tokens = lmms_ft_backbones::vit::int(v, "num_img_tokens", 144)?;
        ensure!(tokens == 144, "num_img_tokens must be 144, got {tokens}");
        let triple = |key: &str, default: [f32; 3]| -> Result<[f32; 3]> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(Value::Array(a)) if a.len() == 3 => {
                    let mut out = [0f32; 3];
                    for (o, x) in out.iter_mut().zip(a) {
                        *o = x
                            .as_f64()
                            .with_context(|| format!("{key} must be numbers"))?
                            as f32;
                    }
                    Ok(out)
                }
                Some(_) => bail!("{key} must be a list of three numbers"),
            }
        };
        Ok(Phi3VProcessor {
            num_crops,
            mean: triple("image_mean", [0.481_454_66, 0.457_827_5, 0.408_210_73])?,
            std: triple("image_std", [0.268_629_54, 0.261_302_6, 0.275_777_1])?,
        })
    }

    /// The padded HD image, normalised: `[3, 336·rows, 336·cols]`, and its grid.
    pub fn hd_image(&self, img: &RgbImage) -> Result<(Tensor, (i64, i64))> {
        let (w, h) = img.dimensions();
        ensure!(w > 0 && h > 0, "empty image");
        let transposed = w < h;
        let land = if transposed {
            transpose(img)
        } else {
            img.clone()
        };
        let ((new_w, new_h), _) = hd_size(land.width(), land.height(), self.num_crops);
        ensure!(
            new_w > 0 && new_h > 0,
            "a {w}×{h} image is too elongated for the HD transform"
        );
        let resized = if (new_w, new_h) == land.dimensions() {
            land
        } else {
            resize(&land, new_w, new_h, ResampleFilter::Bilinear)?
        };
        let target = (new_h as i64 + CROP - 1) / CROP * CROP;
        let top = (target - new_h as i64) / 2;
        let mut padded = RgbImage::from_pixel(new_w, target as u32, image::Rgb([255, 255, 255]));
        image::imageops::replace(&mut padded, &resized, 0, top);
        let padded = if transposed {
            transpose(&padded)
        } else {
            padded
        };
        let (pw, ph) = padded.dimensions();
        let mut data = vec![0f32; 3 * (pw * ph) as usize];
        let plane = (pw * ph) as usize;
        for (i, px) in padded.pixels().enumerate() {
            for c in 0..3 {
                data[c * plane + i] = (px.0[c] as f32 / 255.0 - self.mean[c]) / self.std[c];
            }
        }
        let t = Tensor::from_slice(&data).view([3, ph as i64, pw as i64]);
        Ok((t, (ph as i64 / CROP, pw as i64 / CROP)))
    }

    /// Global view plus crops of one image, `[1 + rows·cols, 3, 336, 336]`, and its grid.
    pub fn image(&self, img: &RgbImage) -> Result<(Tensor, (i64, i64))> {
        let (hd, (rows, cols)) = self.hd_image(img)?;
        let global = hd
            .unsqueeze(0)
            .upsample_bicubic2d([CROP, CROP], false, None, None);
        let crops = hd
            .reshape([1, 3, rows, CROP, cols, CROP])
            .permute([0, 2, 4, 1, 3, 5])
            .reshape([-1, 3, CROP, CROP]);
        Ok((
            Tensor::cat(&[global, crops], 0).to_kind(Kind::Float),
            (rows, cols),
        ))
    }
}

impl Processor for Phi3VProcessor {
    type Media = PhiMedia;

    fn process(
        &self,
        images: &[RgbImage],
        videos: &[VideoClip],
    ) -> Result<(PhiMedia, MediaTokens)> {
        ensure!(
            videos.is_empty(),
            "Phi-3-V takes no videos; give the frames as images instead"
        );
        let mut media = PhiMedia {
            crops: Vec::with_capacity(images.len()),
            grids: Vec::with_capacity(images.len()),
        };
        let mut tokens = MediaTokens::default();
        for (i, img) in images.iter().enumerate() {
            let (crops, (rows, cols)) = self
                .image(img)
                .with_context(|| format!("image {} of the sample", i + 1))?;
            media.crops.push(crops);
            media.grids.push((rows, cols));
            tokens.images.push(image_tokens(rows, cols) as usize);
        }
        Ok((media, tokens))
    }
}
