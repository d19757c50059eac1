//! Image decoding that yields the same RGB8 pixels the `transformers` processors see, and a
//! resampler that reproduces PIL's ([`resize`]).
//!
//! Reference behaviour (transformers 5.23, Pillow 13): the slow ("pil") processors call
//! `image_transforms.convert_to_rgb` on the PIL image, which composites any transparency
//! (an alpha band, or a `transparency` entry such as a palette tRNS chunk) onto an opaque
//! WHITE background with `Image.alpha_composite`, and otherwise uses `Image.convert("RGB")`.
//! `transformers.image_utils.load_image` applies `ImageOps.exif_transpose` before converting,
//! so we apply the EXIF orientation too. (Beware: `load_image` itself then calls
//! `convert("RGB")`, which *drops* alpha instead of compositing; we follow the processors'
//! compositing, which is what a training script that opens images with PIL gets.)
//!
//! One deliberate divergence: PIL opens 16-bit grayscale PNGs as mode `I;16` and its
//! conversion to RGB clamps every value above 255 to white, which destroys the image. We take
//! the high byte instead, which is also what PIL does for 16-bit RGB, RGBA and LA PNGs.

mod resize;

pub use resize::{resize, ResampleFilter, ResizeError};

use std::io::Cursor;
use std::path::Path;

use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage};

/// Pillow's `Image.MAX_IMAGE_PIXELS` (89,478,485) times two: the size at which Pillow stops
/// warning and refuses to open an image as a likely decompression bomb.
pub const DEFAULT_MAX_IMAGE_PIXELS: u64 = 2 * 89_478_485;

/// Guards against decompression bombs: a few kilobytes of PNG can declare gigapixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLimits {
    /// Images whose header declares more pixels than this are refused before decoding.
    pub max_pixels: u64,
}

impl Default for ImageLimits {
    fn default() -> Self {
        ImageLimits {
            max_pixels: DEFAULT_MAX_IMAGE_PIXELS,
        }
    }
}

impl ImageLimits {
    /// Bytes the decoder may allocate: the largest image allowed in the widest pixel type we
    /// accept (16-bit RGBA, 8 bytes per pixel) plus room for a decoder's scratch buffers, so
    /// an image under the pixel limit is never refused by the allocation limit.
    fn max_alloc_bytes(&self) -> u64 {
        self.max_pixels
            .saturating_mul(8)
            .saturating_add(64 * 1024 * 1024)
    }
}

/// Why an image could not be loaded; every variant names the file (or the label given to
/// [`load_image_from_bytes`]) so a bad sample can be found in the dataset.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image {path}: file not found")]
    Missing { path: String },
    #[error("image {path}: cannot read file: {source}")]
    Unreadable {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("image {path}: unsupported or unrecognised image format{detail}")]
    UnsupportedFormat { path: String, detail: String },
    #[error("image {path}: corrupt or truncated image data: {reason}")]
    Corrupt { path: String, reason: String },
    #[error(
        "image {path}: {width}x{height} = {pixels} pixels exceeds the limit of {limit} pixels \
         (refused as a possible decompression bomb; raise the image pixel limit if it is genuine)"
    )]
    TooLarge {
        path: String,
        width: u32,
        height: u32,
        pixels: u64,
        limit: u64,
    },
}

/// Loads an image file as upright RGB8, the way the `transformers` processors see it (see the
/// module docs). The format is guessed from the content, never from the extension, because
/// datasets often carry PNGs named `.jpg`.
pub fn load_image(path: &Path, limits: &ImageLimits) -> Result<RgbImage, ImageError> {
    let label = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => ImageError::Missing {
            path: label.clone(),
        },
        _ => ImageError::Unreadable {
            path: label.clone(),
            source,
        },
    })?;
    load_image_from_bytes(&bytes, &label, limits)
}

/// Like [`load_image`] for an image already in memory (e.g. base64 in a dataset record);
/// `origin` is how errors refer to it.
pub fn load_image_from_bytes(
    bytes: &[u8],
    origin: &str,
    limits: &ImageLimits,
) -> Result<RgbImage, ImageError> {
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| corrupt(origin, e.to_string()))?;
    if reader.format().is_none() {
        return Err(ImageError::UnsupportedFormat {
            path: origin.to_string(),
            detail: String::new(),
        });
    }
    let mut decoder_limits = image::Limits::default();
    decoder_limits.max_alloc = Some(limits.max_alloc_bytes());
    reader.limits(decoder_limits);
    // Building the decoder reads only the header, so the pixel check happens before any
    // large allocation.
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| map_decode_error(origin, e))?;
    let (width, height) = decoder.dimensions();
    let pixels = u64::from(width) * u64::from(height);
    if pixels > limits.max_pixels {
        return Err(ImageError::TooLarge {
            path: origin.to_string(),
            width,
            height,
            pixels,
            limit: limits.max_pixels,
        });
    }
    // A malformed EXIF block must not cost the image: PIL's exif_transpose also ignores it.
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder).map_err(|e| map_decode_error(origin, e))?;
    img.apply_orientation(orientation);
    Ok(to_rgb8_like_transformers(img))
}

fn corrupt(origin: &str, reason: String) -> ImageError {
    ImageError::Corrupt {
        path: origin.to_string(),
        reason,
    }
}

fn map_decode_error(origin: &str, err: image::ImageError) -> ImageError {
    match err {
        image::ImageError::Unsupported(e) => ImageError::UnsupportedFormat {
            path: origin.to_string(),
            detail: format!(": {e}"),
        },
        image::ImageError::Limits(e) => corrupt(
            origin,
            format!("decoder memory limit reached ({e}); the image may be a decompression bomb"),
        ),
        other => corrupt(origin, other.to_string()),
    }
}

/// PIL's `alpha_composite` of a pixel over opaque white, reduced to 8-bit integer arithmetic:
/// `round((c*a + 255*(255-a)) / 255)`. Checked against PIL for all 65,536 (c, a) pairs in the
/// `media_images` test.
#[inline]
fn over_white(c: u8, a: u8) -> u8 {
    let (c, a) = (u32::from(c), u32::from(a));
    ((c * a + 255 * (255 - a) + 127) / 255) as u8
}

/// 16-bit samples keep their high byte, as PIL's 16-bit PNG modes do.
#[inline]
fn hi(v: u16) -> u8 {
    (v >> 8) as u8
}

#[inline]
fn unit_f32_to_u8(v: f32) -> u8 {
    (v.clamp(0.0, 1.0) * 255.0).round() as u8
}

/// Converts any decoded layout to RGB8 with transparency composited onto white.
fn to_rgb8_like_transformers(img: DynamicImage) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    let mut out = RgbImage::new(w, h);
    let dst = out.as_mut();
    let mut put = |i: usize, rgb: [u8; 3]| dst[3 * i..3 * i + 3].copy_from_slice(&rgb);
    match img {
        DynamicImage::ImageRgb8(im) => return im,
        DynamicImage::ImageLuma8(im) => {
            for (i, p) in im.as_raw().iter().enumerate() {
                put(i, [*p; 3]);
            }
        }
        DynamicImage::ImageLumaA8(im) => {
            for (i, p) in im.as_raw().chunks_exact(2).enumerate() {
                put(i, [over_white(p[0], p[1]); 3]);
            }
        }
        DynamicImage::ImageRgba8(im) => {
            for (i, p) in im.as_raw().chunks_exact(4).enumerate() {
                put(
                    i,
                    [
                        over_white(p[0], p[3]),
                        over_white(p[1], p[3]),
                        over_white(p[2], p[3]),
                    ],
                );
            }
        }
        DynamicImage::ImageLuma16(im) => {
            for (i, p) in im.as_raw().iter().enumerate() {
                put(i, [hi(*p); 3]);
            }
        }
        DynamicImage::ImageLumaA16(im) => {
            for (i, p) in im.as_raw().chunks_exact(2).enumerate() {
                put(i, [over_white(hi(p[0]), hi(p[1])); 3]);
            }
        }
        DynamicImage::ImageRgb16(im) => {
            for (i, p) in im.as_raw().chunks_exact(3).enumerate() {
                put(i, [hi(p[0]), hi(p[1]), hi(p[2])]);
            }
        }
        DynamicImage::ImageRgba16(im) => {
            for (i, p) in im.as_raw().chunks_exact(4).enumerate() {
                let a = hi(p[3]);
                put(
                    i,
                    [
                        over_white(hi(p[0]), a),
                        over_white(hi(p[1]), a),
                        over_white(hi(p[2]), a),
                    ],
                );
            }
        }
        DynamicImage::ImageRgb32F(im) => {
            for (i, p) in im.as_raw().chunks_exact(3).enumerate() {
                put(
                    i,
                    [
                        unit_f32_to_u8(p[0]),
                        unit_f32_to_u8(p[1]),
                        unit_f32_to_u8(p[2]),
                    ],
                );
            }
        }
        other => {
            // Layouts added to `image` later (the enum is non-exhaustive): go through RGBA8.
            for (i, p) in other.to_rgba8().as_raw().chunks_exact(4).enumerate() {
                put(
                    i,
                    [
                        over_white(p[0], p[3]),
                        over_white(p[1], p[3]),
                        over_white(p[2], p[3]),
                    ],
                );
            }
        }
    }
    out
}
