//! A resampler that reproduces `PIL.Image.resize` on 8-bit images.
//!
//! The processors of LLaVA (CLIP) and Qwen2-VL resize with PIL, and general-purpose resizers
//! differ from it by up to 24/255 (see `shared/notes/verified-facts.md`), which would feed the
//! model different pixels than it was trained on. This follows PIL's scheme, written from its
//! description rather than its code:
//!
//! * separable: one pass along each axis, the intermediate stored as 8-bit; PIL chooses the
//!   order from the sizes (see `vertical_first`) and skips a pass whose size is unchanged;
//! * when downscaling by `s > 1`, the filter is stretched by `s` (support and argument), so
//!   every source pixel contributes;
//! * each output pixel's taps are normalised to sum to one, then turned into fixed-point
//!   integers with 22 fractional bits (rounded half away from zero);
//! * accumulation starts at one half (rounding), the sum is shifted back and clamped to 0–255.
//!
//! Nearest-neighbour follows PIL's separate affine path: the source index for output `x` is
//! `floor(x * s + s / 2)`, accumulated step by step in double precision as PIL does.

use image::RgbImage;

/// Fractional bits of the fixed-point coefficients: 32 bits minus 8 for the sample and 2 of
/// headroom for negative lobes, as in PIL.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// PIL's resampling filters (`Image.Resampling`), with PIL's definitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResampleFilter {
    Nearest,
    /// Triangle filter, support 1 (`BILINEAR`).
    Bilinear,
    /// Keys cubic with a = -0.5, support 2 (`BICUBIC`).
    Bicubic,
    /// Lanczos with three lobes, support 3 (`LANCZOS`).
    Lanczos,
}

impl ResampleFilter {
    fn support(self) -> f64 {
        match self {
            ResampleFilter::Nearest => 0.0,
            ResampleFilter::Bilinear => 1.0,
            ResampleFilter::Bicubic => 2.0,
            ResampleFilter::Lanczos => 3.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            ResampleFilter::Nearest => 0.0,
            ResampleFilter::Bilinear => {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            ResampleFilter::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            ResampleFilter::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let px = x * std::f64::consts::PI;
        px.sin() / px
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ResizeError {
    #[error("cannot resize a {from_w}x{from_h} image to {to_w}x{to_h}: sizes must be non-zero")]
    EmptySize {
        from_w: u32,
        from_h: u32,
        to_w: u32,
        to_h: u32,
    },
}

/// Resizes like `PIL.Image.resize((width, height), filter)` on an RGB image.
pub fn resize(
    img: &RgbImage,
    width: u32,
    height: u32,
    filter: ResampleFilter,
) -> Result<RgbImage, ResizeError> {
    let (src_w, src_h) = img.dimensions();
    if src_w == 0 || src_h == 0 || width == 0 || height == 0 {
        return Err(ResizeError::EmptySize {
            from_w: src_w,
            from_h: src_h,
            to_w: width,
            to_h: height,
        });
    }
    if (src_w, src_h) == (width, height) {
        return Ok(img.clone());
    }
    let src = Plane {
        data: img.as_raw(),
        width: src_w as usize,
        height: src_h as usize,
        channels: 3,
    };
    let out = match filter {
        ResampleFilter::Nearest => nearest(&src, width as usize, height as usize),
        _ => convolve(&src, width as usize, height as usize, filter),
    };
    // The buffer length is width * height * 3 by construction.
    Ok(RgbImage::from_raw(width, height, out).unwrap_or_else(|| RgbImage::new(width, height)))
}

/// An interleaved 8-bit image borrowed as a flat buffer.
struct Plane<'a> {
    data: &'a [u8],
    width: usize,
    height: usize,
    channels: usize,
}

/// Fixed-point taps for every output position along one axis.
struct Taps {
    /// First source index and number of taps for each output position.
    spans: Vec<(usize, usize)>,
    /// `stride` coefficients per output position; only the first `spans[i].1` are used.
    coeffs: Vec<i32>,
    stride: usize,
}

fn taps(in_size: usize, out_size: usize, filter: ResampleFilter) -> Taps {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = filter.support() * filter_scale;
    let stride = support.ceil() as usize * 2 + 1;
    let mut spans = Vec::with_capacity(out_size);
    let mut coeffs = vec![0i32; out_size * stride];
    let mut weights = vec![0f64; stride];
    for (xx, kk) in coeffs.chunks_exact_mut(stride).enumerate() {
        let center = (xx as f64 + 0.5) * scale;
        // `as` truncates toward zero like a C cast; negative starts are clamped anyway.
        let start = ((center - support + 0.5) as i64).max(0) as usize;
        let end = ((center + support + 0.5) as i64).clamp(0, in_size as i64) as usize;
        let n = end.saturating_sub(start).min(stride);
        let inv_scale = 1.0 / filter_scale;
        let mut total = 0.0;
        for (x, w) in weights[..n].iter_mut().enumerate() {
            *w = filter.weight((x as f64 + start as f64 - center + 0.5) * inv_scale);
            total += *w;
        }
        let one = f64::from(1u32 << PRECISION_BITS);
        for (k, w) in kk.iter_mut().zip(&weights[..n]) {
            let w = if total != 0.0 { *w / total } else { *w };
            *k = if w < 0.0 {
                (w * one - 0.5) as i32
            } else {
                (w * one + 0.5) as i32
            };
        }
        spans.push((start, n));
    }
    Taps {
        spans,
        coeffs,
        stride,
    }
}

#[inline]
fn finish(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Whether PIL runs the vertical pass first. Pillow 13 (the version transformers 5.23 is
/// tested with here) picks the order by size: vertical first when the height shrinks and
/// `2 * (out_w - in_w) > out_h - in_h`, else horizontal first. Found by comparing both orders
/// with PIL on ~700 random size pairs (3 to 1500 px, bicubic and bilinear); the order matters
/// because the intermediate image is rounded to 8 bits.
fn vertical_first(in_w: usize, in_h: usize, out_w: usize, out_h: usize) -> bool {
    let (in_w, in_h, out_w, out_h) = (in_w as i64, in_h as i64, out_w as i64, out_h as i64);
    out_h < in_h && 2 * (out_w - in_w) > out_h - in_h
}

fn convolve(src: &Plane, out_w: usize, out_h: usize, filter: ResampleFilter) -> Vec<u8> {
    let mut cur = src.data.to_vec();
    let (mut w, mut h) = (src.width, src.height);
    let ch = src.channels;
    let passes: [bool; 2] = if vertical_first(w, h, out_w, out_h) {
        [false, true]
    } else {
        [true, false]
    };
    for horizontal in passes {
        if horizontal && out_w != w {
            cur = horizontal_pass(&cur, w, h, ch, out_w, filter);
            w = out_w;
        } else if !horizontal && out_h != h {
            cur = vertical_pass(&cur, w, h, ch, out_h, filter);
            h = out_h;
        }
    }
    cur
}

const HALF: i64 = 1 << (PRECISION_BITS - 1);

fn horizontal_pass(
    data: &[u8],
    w: usize,
    h: usize,
    ch: usize,
    out_w: usize,
    filter: ResampleFilter,
) -> Vec<u8> {
    let t = taps(w, out_w, filter);
    let mut buf = vec![0u8; out_w * h * ch];
    for (row_in, row_out) in data
        .chunks_exact(w * ch)
        .zip(buf.chunks_exact_mut(out_w * ch))
    {
        for (xx, &(start, n)) in t.spans.iter().enumerate() {
            let k = &t.coeffs[xx * t.stride..xx * t.stride + n];
            for c in 0..ch {
                let mut acc = HALF;
                for (i, &wt) in k.iter().enumerate() {
                    acc += i64::from(row_in[(start + i) * ch + c]) * i64::from(wt);
                }
                row_out[xx * ch + c] = finish(acc);
            }
        }
    }
    buf
}

fn vertical_pass(
    data: &[u8],
    w: usize,
    h: usize,
    ch: usize,
    out_h: usize,
    filter: ResampleFilter,
) -> Vec<u8> {
    let t = taps(h, out_h, filter);
    let row_len = w * ch;
    let mut out = vec![0u8; out_h * row_len];
    for (yy, row_out) in out.chunks_exact_mut(row_len).enumerate() {
        let (start, n) = t.spans[yy];
        let k = &t.coeffs[yy * t.stride..yy * t.stride + n];
        for (j, o) in row_out.iter_mut().enumerate() {
            let mut acc = HALF;
            for (i, &wt) in k.iter().enumerate() {
                acc += i64::from(data[(start + i) * row_len + j]) * i64::from(wt);
            }
            *o = finish(acc);
        }
    }
    out
}

/// Source index for each output index along one axis, stepping in double precision.
fn nearest_indices(in_size: usize, out_size: usize) -> Vec<usize> {
    let step = in_size as f64 / out_size as f64;
    let mut pos = step * 0.5;
    let mut idx = Vec::with_capacity(out_size);
    for _ in 0..out_size {
        idx.push((pos.max(0.0) as usize).min(in_size - 1));
        pos += step;
    }
    idx
}

fn nearest(src: &Plane, out_w: usize, out_h: usize) -> Vec<u8> {
    let ch = src.channels;
    let xs = nearest_indices(src.width, out_w);
    let ys = nearest_indices(src.height, out_h);
    let mut out = Vec::with_capacity(out_w * out_h * ch);
    for &y in &ys {
        let row = &src.data[y * src.width * ch..(y + 1) * src.width * ch];
        for &x in &xs {
            out.extend_from_slice(&row[x * ch..x * ch + ch]);
        }
    }
    out
}
