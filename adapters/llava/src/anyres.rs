//! LLaVA-NeXT's "anyres" geometry, as `transformers` computes it: which grid resolution an
//! image is tiled at, how many tiles it gets, and which rows / columns of the tile grid's
//! features survive the unpadding. Shared by the model (to pack features) and the token
//! count (which must equal the processor's placeholder count exactly).

/// `select_best_resolution`: the `(height, width)` pinpoint that keeps the most of the
/// image's resolution after an aspect-preserving downscale, ties going to the least waste.
/// `None` when `pinpoints` is empty.
pub fn select_best_resolution(original: [i64; 2], pinpoints: &[[i64; 2]]) -> Option<[i64; 2]> {
    let [oh, ow] = original;
    let mut best = None;
    let mut max_effective = 0i64;
    let mut min_wasted = i64::MAX;
    for &[h, w] in pinpoints {
        let scale = (w as f64 / ow as f64).min(h as f64 / oh as f64);
        let (dw, dh) = ((ow as f64 * scale) as i64, (oh as f64 * scale) as i64);
        let effective = (dw * dh).min(ow * oh);
        let wasted = w * h - effective;
        if effective > max_effective || (effective == max_effective && wasted < min_wasted) {
            max_effective = effective;
            min_wasted = wasted;
            best = Some([h, w]);
        }
    }
    best
}

/// Python's `int(round(x, 7))` for the non-negative values the unpadding produces: rounding
/// to 7 decimals first keeps values like 41.99999999 from truncating to 41.
fn int_round7(x: f64) -> i64 {
    ((x * 1e7).round() / 1e7) as i64
}

/// The tiling of one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tiling {
    /// Tiles down and across the chosen resolution (each `image_size` square).
    pub rows: i64,
    pub cols: i64,
}

impl Tiling {
    /// `original` is `(height, width)`; `tile` the tower's `image_size`.
    pub fn new(original: [i64; 2], pinpoints: &[[i64; 2]], tile: i64) -> Option<Tiling> {
        let [h, w] = select_best_resolution(original, pinpoints)?;
        Some(Tiling {
            rows: h / tile,
            cols: w / tile,
        })
    }

    /// Tiles fed to the tower: the base (whole-image) tile plus the grid.
    pub fn num_tiles(&self) -> i64 {
        1 + self.rows * self.cols
    }
}

/// `unpad_image` on a feature map of `current = (height, width)`: the row range (or column
/// range) left after removing the padding the resize-and-pad introduced, as
/// `(row_start, row_end, col_start, col_end)`.
pub fn unpad_ranges(original: [i64; 2], current: [i64; 2]) -> (i64, i64, i64, i64) {
    let [oh, ow] = original;
    let [ch, cw] = current;
    let original_ratio = ow as f64 / oh as f64;
    let current_ratio = cw as f64 / ch as f64;
    if original_ratio > current_ratio {
        let new_h = int_round7(oh as f64 * (cw as f64 / ow as f64));
        let pad = (ch - new_h).div_euclid(2);
        (pad, ch - pad, 0, cw)
    } else {
        let new_w = int_round7(ow as f64 * (ch as f64 / oh as f64));
        let pad = (cw - new_w).div_euclid(2);
        (0, ch, pad, cw - pad)
    }
}

/// Python's `a // b` for positive floats (`float_floor_div`): `(a - fmod(a, b)) / b`, floored
/// and nudged up when that quotient lies more than half above its floor.
fn py_floor_div(a: f64, b: f64) -> f64 {
    let m = a % b;
    let div = (a - m) / b;
    let floor = div.floor();
    if div - floor > 0.5 {
        floor + 1.0
    } else {
        floor
    }
}

/// OneVision's `anyres_max_N`: the `(height, width)` an unpadded feature map of `(h, w)` is
/// bilinearly downscaled to when it holds more than 1.1² × N tiles' worth of features
/// (`grid` per tile side), else `(h, w)` unchanged. Both `pack_image_features` and the
/// processor's count use `int(h // ratio)`.
pub fn anyres_max_shape(h: i64, w: i64, grid: i64, max_patches: i64) -> (i64, i64) {
    let ratio = ((h * w) as f64 / (max_patches * grid * grid) as f64).sqrt();
    if ratio > 1.1 {
        (
            py_floor_div(h as f64, ratio) as i64,
            py_floor_div(w as f64, ratio) as i64,
        )
    } else {
        (h, w)
    }
}

/// Placeholder tokens of one anyres image, NeXT or OneVision (`max_patches` set): the base
/// tile's features, then the unpadded (and, for OneVision, budget-limited) grid features with
/// one `image_newline` per row.
pub fn anyres_image_tokens(
    original: [i64; 2],
    tiling: Tiling,
    grid: i64,
    base: i64,
    max_patches: Option<i64>,
) -> i64 {
    let (r0, r1, c0, c1) = unpad_ranges(original, [tiling.rows * grid, tiling.cols * grid]);
    let (mut rows, mut cols) = (r1 - r0, c1 - c0);
    if let Some(max) = max_patches {
        (rows, cols) = anyres_max_shape(rows, cols, grid, max);
    }
    base + rows * (cols + 1)
}

/// Placeholder tokens of one video of `frames` frames, each giving a `grid`×`grid` feature
/// map: NeXT-Video pools it with a `stride` window (floor, as `AvgPool2d` / `MaxPool2d`);
/// OneVision halves it bilinearly (ceil) and adds one `image_newline` after the last frame.
pub fn video_tokens(frames: i64, grid: i64, pool_stride: Option<i64>) -> i64 {
    match pool_stride {
        Some(s) => frames * (grid / s) * (grid / s),
        None => {
            let half = (grid + 1) / 2;
            frames * half * half + 1
        }
    }
}
