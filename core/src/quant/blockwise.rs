//! 8-bit block-wise quantisation with bitsandbytes' signed "dynamic" code, the scheme bnb
//! uses to compress the per-block absmax of 4-bit weights (double quantisation).

use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

use super::ceil_div;

/// Block size bnb uses for the second-level (absmax of absmax) statistics.
pub const NESTED_BLOCKSIZE: i64 = 256;

/// The 256-entry signed dynamic code (Dettmers, "8-bit approximations"), built the way
/// bnb's `create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)` builds it:
/// for each decade `10^(i-6)`, `i = 0..7`, the midpoints of `2^i + 1` evenly spaced points
/// in `[0.1, 1]` (fp32 linspace), with both signs, plus `0` and `1`, all in fp32, sorted.
/// Its most negative entry is about -0.993, not -1: a block's most negative value, when it
/// is the absmax, maps to that entry.
pub fn dynamic_code() -> Tensor {
    let max_exponent_bits = 7i32;
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for i in 0..max_exponent_bits {
        let items = (1i64 << i) + 1;
        let bounds = Tensor::linspace(0.1, 1.0, items, (Kind::Float, Device::Cpu));
        let means = (bounds.narrow(0, 0, items - 1) + bounds.narrow(0, 1, items - 1)) / 2.0;
        let scale = 10f64.powf(f64::from(i - (max_exponent_bits - 1)));
        // bnb scales the fp32 tensor by a Python float: an fp32 product, as here.
        for signed in [&means * scale, &means * -scale] {
            // Small table (at most 64 values): reading it on the host is cheap.
            let v: Vec<f32> = signed.try_into().unwrap_or_default();
            data.extend(v);
        }
    }
    data.push(0.0);
    data.push(1.0);
    let mut code = data;
    code.sort_by(|a, b| a.total_cmp(b));
    Tensor::from_slice(&code)
}

/// Quantises `x` (any float kind, any shape) in flat blocks of `blocksize` to the nearest
/// entry of the sorted `code`; returns `(codes u8 of x's shape, absmax f32 per block)`.
///
/// Each value is divided by its block's absmax and rounded to the nearest code entry, a value
/// exactly half-way going to the lower entry (bnb's reference kernel's rule). bnb 0.50.2's
/// CPU C kernel is not exact: for about 3 values in 1000 it returns an entry up to ~1.5e-5
/// farther from the value than the nearest one (one or two steps among the dense entries
/// near 0), so double-quantised absmax codes can differ from bnb-on-CPU there, by a
/// dequantised amount below ~1.5e-5 of the second-level absmax.
pub fn quantize_blockwise(x: &Tensor, code: &Tensor, blocksize: i64) -> Result<(Tensor, Tensor)> {
    if blocksize <= 0 {
        bail!("blockwise quantisation: block size must be positive, got {blocksize}");
    }
    let flat = x.reshape([-1]).to_kind(Kind::Float);
    let n = flat.size()[0];
    if n == 0 {
        bail!("blockwise quantisation of an empty tensor");
    }
    if code.dim() != 1 || code.size()[0] < 2 || code.size()[0] > 256 {
        bail!(
            "blockwise quantisation needs a 1-D code of 2..=256 entries, got {:?}",
            code.size()
        );
    }
    let code = code.to_device(flat.device()).to_kind(Kind::Float);
    let (absmax, scaled) = block_absmax_and_scale(&flat, blocksize, Scaling::Divide);
    let k = code.size()[0];
    let bounds = (code.narrow(0, 0, k - 1) + code.narrow(0, 1, k - 1)) / 2.0;
    let q = scaled.bucketize(&bounds, false, false).to_kind(Kind::Uint8);
    Ok((q.reshape(x.size()), absmax))
}

/// `code[q] * absmax[block]` in fp32, then cast to `kind` — bnb's `dequantize_blockwise`.
pub fn dequantize_blockwise(
    q: &Tensor,
    absmax: &Tensor,
    code: &Tensor,
    blocksize: i64,
    kind: Kind,
) -> Result<Tensor> {
    if q.kind() != Kind::Uint8 {
        bail!(
            "blockwise dequantisation expects uint8 codes, got {:?}",
            q.kind()
        );
    }
    let n = q.numel() as i64;
    let blocks = ceil_div(n, blocksize.max(1));
    if blocksize <= 0 || absmax.numel() as i64 != blocks {
        bail!(
            "blockwise dequantisation: {n} codes in blocks of {blocksize} need {blocks} absmax \
             values, got {}",
            absmax.numel()
        );
    }
    if code.numel() != 256 {
        bail!(
            "blockwise dequantisation needs a 256-entry code, got {}",
            code.numel()
        );
    }
    let code = code.to_device(q.device()).to_kind(Kind::Float);
    let vals = code.index_select(0, &q.reshape([-1]).to_kind(Kind::Int64));
    let out = scale_by_blocks(&vals, &absmax.to_kind(Kind::Float), blocksize);
    Ok(out.to_kind(kind).reshape(q.size()))
}

/// How a value is brought into `[-1, 1]`: bnb's reference 4-bit kernel multiplies full blocks
/// by the reciprocal of the clamped absmax but divides the trailing partial block; its CPU
/// 8-bit kernel divides everywhere. The two can differ in the last bit, which moves near-tie codes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scaling {
    ReciprocalThenDivideTail,
    Divide,
}

/// Per-block absmax (unclamped, as stored) and the values scaled into `[-1, 1]` (flat, length
/// `n`), following bnb's handling of a trailing partial block.
pub(crate) fn block_absmax_and_scale(
    flat: &Tensor,
    blocksize: i64,
    scaling: Scaling,
) -> (Tensor, Tensor) {
    let n = flat.size()[0];
    let rem = n % blocksize;
    let full = n - rem;
    let blocks = full / blocksize;
    let mut absmaxes = Vec::new();
    let mut scaled = Vec::new();
    if blocks > 0 {
        let body = flat.narrow(0, 0, full).view([blocks, blocksize]);
        let am = body.abs().amax([1i64].as_slice(), false);
        let denom = am.clamp_min(1e-38).unsqueeze(1);
        let s = match scaling {
            Scaling::ReciprocalThenDivideTail => &body * denom.reciprocal(),
            Scaling::Divide => &body / denom,
        };
        scaled.push(s.clamp(-1.0, 1.0).reshape([-1]));
        absmaxes.push(am);
    }
    if rem > 0 {
        let tail = flat.narrow(0, full, rem);
        let am = tail.abs().max();
        let s = &tail / am.clamp_min(1e-38);
        scaled.push(s.clamp(-1.0, 1.0));
        absmaxes.push(am.reshape([1]));
    }
    (Tensor::cat(&absmaxes, 0), Tensor::cat(&scaled, 0))
}

/// Multiplies flat fp32 `vals` (length >= n, padded or not) by their block's absmax.
pub(crate) fn scale_by_blocks(vals: &Tensor, absmax: &Tensor, blocksize: i64) -> Tensor {
    let n = vals.size()[0];
    let blocks = absmax.size()[0];
    let padded = blocks * blocksize;
    let v = if padded > n {
        vals.constant_pad_nd([0, padded - n])
    } else {
        vals.narrow(0, 0, padded)
    };
    let out = v.view([blocks, blocksize]) * absmax.to_device(vals.device()).unsqueeze(1);
    out.reshape([-1]).narrow(0, 0, n.min(padded))
}
