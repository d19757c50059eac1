//! NF4 / FP4 block-wise quantisation in bitsandbytes' storage format, so a weight quantised
//! here has the same bytes as `bnb.functional.quantize_4bit` gives (and bnb can read ours).

use anyhow::{bail, Result};
use tch::{Kind, Tensor};

use super::blockwise::{
    block_absmax_and_scale, dequantize_blockwise, dynamic_code, quantize_blockwise,
    scale_by_blocks, Scaling, NESTED_BLOCKSIZE,
};
use super::{ceil_div, Absmax4bit, BlockwiseState, QuantState4bit, QuantType};

/// Block sizes bnb accepts for 4-bit quantisation.
pub const BLOCKSIZES: [i64; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

/// The NormalFloat-4 codebook of QLoRA (quantiles of N(0, 1), with an exact zero), in code
/// order: code `i` dequantises to `NF4[i] * absmax`. These are the published values bnb ships.
const NF4: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// FP4 (1 sign, 2 exponent, 1 mantissa bit, bias 2 as bnb defines it) in bit-pattern order,
/// before normalising by the largest magnitude (12): code 8..15 are the negated 0..7.
const FP4_RAW: [f32; 16] = [
    0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0,
];

/// The 16-entry fp32 codebook of `quant_type` in code order (bnb's `get_4bit_type`).
pub fn code_4bit(quant_type: QuantType) -> Tensor {
    match quant_type {
        QuantType::Nf4 => Tensor::from_slice(&NF4),
        QuantType::Fp4 => {
            let raw = Tensor::from_slice(&FP4_RAW);
            let max = raw.abs().max();
            raw / max
        }
    }
}

/// Half-way points between consecutive codebook values in ascending order, and for each
/// ascending position the code that holds it. FP4's +0 and -0 tie: the stable order puts
/// +0 (code 0) first, which is the order bnb's sort yields, so small negatives map to code 0
/// and small positives to code 8 — as in bnb.
fn bounds_and_order(quant_type: QuantType) -> (Tensor, Tensor) {
    let code = code_4bit(quant_type);
    let order = code.argsort_stable(true, 0, false);
    let sorted = code.index_select(0, &order);
    let bounds = (sorted.narrow(0, 0, 15) + sorted.narrow(0, 1, 15)) / 2.0;
    (bounds, order)
}

/// Quantises `weight` (fp32, bf16 or fp16; any shape) to packed 4-bit codes, as
/// `bnb.functional.quantize_4bit(weight, blocksize, compress_statistics, quant_type)` does.
///
/// The weight is read flat in blocks of `blocksize`; each value is scaled by its block's
/// absmax into `[-1, 1]` and rounded to the nearest codebook value (a value exactly half-way
/// goes to the lower one). Two codes share a byte, the earlier element in the high nibble; an
/// odd element count is padded with the code of 0. The packed tensor is `[ceil(n/2), 1]`
/// uint8, absmax fp32 per block. With `compress_statistics` the absmax minus its mean is
/// further quantised to 8 bits in blocks of 256 with the dynamic code ([`Absmax4bit::Nested`]).
///
/// All work is tensor ops on the weight's device; nothing is copied to the host.
pub fn quantize_4bit(
    weight: &Tensor,
    quant_type: QuantType,
    blocksize: i64,
    compress_statistics: bool,
) -> Result<(Tensor, QuantState4bit)> {
    if !BLOCKSIZES.contains(&blocksize) {
        bail!("4-bit quantisation: block size {blocksize} is not one of {BLOCKSIZES:?}");
    }
    let dtype = weight.kind();
    if !matches!(dtype, Kind::Float | Kind::BFloat16 | Kind::Half) {
        bail!("4-bit quantisation supports fp32, bf16 and fp16 weights, got {dtype:?}");
    }
    let flat = weight.reshape([-1]).to_kind(Kind::Float);
    let n = flat.size()[0];
    if n == 0 {
        bail!("4-bit quantisation of an empty tensor");
    }
    let device = flat.device();
    let (absmax, mut scaled) =
        block_absmax_and_scale(&flat, blocksize, Scaling::ReciprocalThenDivideTail);
    if n % 2 == 1 {
        scaled = scaled.constant_pad_nd([0, 1]);
    }
    let (bounds, order) = bounds_and_order(quant_type);
    let pos = scaled.bucketize(&bounds.to_device(device), false, false);
    let q = match quant_type {
        QuantType::Nf4 => pos,
        QuantType::Fp4 => order.to_device(device).index_select(0, &pos),
    }
    .to_kind(Kind::Uint8);
    let hi = q.slice(0, 0, None, 2);
    let lo = q.slice(0, 1, None, 2);
    let packed = (hi * 16i64 + lo).unsqueeze(1);

    let absmax = compress_absmax(absmax, compress_statistics)?;
    let state = QuantState4bit {
        absmax,
        shape: weight.size(),
        dtype,
        blocksize,
        quant_type,
    };
    Ok((packed, state))
}

/// The scale statistics of a 4-bit weight from its fp32 per-block absmax: kept as is, or
/// (`compress_statistics`, bnb's double quantisation) minus their mean, 8-bit quantised in
/// blocks of 256 with the dynamic code.
pub(crate) fn compress_absmax(absmax: Tensor, compress_statistics: bool) -> Result<Absmax4bit> {
    if !compress_statistics {
        return Ok(Absmax4bit::Plain(absmax));
    }
    let offset = absmax.mean(Kind::Float);
    let code = dynamic_code().to_device(absmax.device());
    let (qabsmax, absmax2) = quantize_blockwise(&(&absmax - &offset), &code, NESTED_BLOCKSIZE)?;
    Ok(Absmax4bit::Nested {
        qabsmax,
        offset,
        state2: BlockwiseState {
            absmax: absmax2,
            code,
            blocksize: NESTED_BLOCKSIZE,
        },
    })
}

/// Unpacks and rescales 4-bit codes back to a tensor of `state.shape` and `state.dtype`, as
/// `bnb.functional.dequantize_4bit` does: `code[q] * absmax[block]` in fp32, then one cast.
/// Accepts bnb's `[ceil(n/2), 1]` layout or any shape with that many bytes.
pub fn dequantize_4bit(packed: &Tensor, state: &QuantState4bit) -> Result<Tensor> {
    dequantize_4bit_as(packed, state, state.dtype)
}

/// [`dequantize_4bit`] cast straight to `kind` instead of the weight's own dtype — what bnb's
/// 4-bit matmul does with the input's dtype (one rounding, not two).
pub fn dequantize_4bit_as(packed: &Tensor, state: &QuantState4bit, kind: Kind) -> Result<Tensor> {
    if packed.kind() != Kind::Uint8 {
        bail!(
            "4-bit dequantisation expects uint8 packed codes, got {:?}",
            packed.kind()
        );
    }
    if !BLOCKSIZES.contains(&state.blocksize) {
        bail!(
            "4-bit dequantisation: block size {} is not one of {BLOCKSIZES:?}",
            state.blocksize
        );
    }
    if state.shape.iter().any(|&d| d < 0) {
        bail!(
            "4-bit dequantisation: negative dimension in shape {:?}",
            state.shape
        );
    }
    let n: i64 = state.shape.iter().product();
    if n == 0 {
        bail!("4-bit dequantisation: empty shape {:?}", state.shape);
    }
    let bytes = ceil_div(n, 2);
    if packed.numel() as i64 != bytes {
        bail!(
            "4-bit dequantisation: shape {:?} needs {bytes} packed bytes, got {}",
            state.shape,
            packed.numel()
        );
    }
    let absmax = state.absmax_f32()?;
    let blocks = ceil_div(n, state.blocksize);
    if absmax.numel() as i64 != blocks {
        bail!(
            "4-bit dequantisation: {n} values in blocks of {} need {blocks} absmax values, got {}",
            state.blocksize,
            absmax.numel()
        );
    }
    let out = match dequantize_4bit_fused_cpu(
        packed,
        &absmax,
        state.quant_type,
        n,
        state.blocksize,
        kind,
    )? {
        Some(out) => out,
        None => dequantize_4bit_ops(packed, &absmax, state.quant_type, n, state.blocksize, kind),
    };
    Ok(out.reshape(state.shape.as_slice()))
}

/// The tensor-op dequantisation (any device): `code[q] * absmax[block]` in fp32, one cast.
fn dequantize_4bit_ops(
    packed: &Tensor,
    absmax: &Tensor,
    quant_type: QuantType,
    n: i64,
    blocksize: i64,
    kind: Kind,
) -> Tensor {
    let device = packed.device();
    let bytes_flat = packed.reshape([-1]);
    let hi = bytes_flat.bitwise_right_shift_tensor_scalar(4);
    let lo = bytes_flat.bitwise_and(15);
    let q = Tensor::stack(&[hi, lo], 1).reshape([-1]).narrow(0, 0, n);
    let code = code_4bit(quant_type).to_device(device);
    let vals = code.index_select(0, &q.to_kind(Kind::Int));
    scale_by_blocks(&vals, &absmax.to_device(device), blocksize).to_kind(kind)
}

extern "C" {
    /// `core/csrc/dequant_4bit.cpp`.
    fn lmms_dequant_4bit_cpu(
        packed: *const u8,
        absmax: *const f32,
        code: *const f32,
        n: i64,
        blocksize: i64,
        out_kind: i32,
        out: *mut std::ffi::c_void,
    ) -> i32;
}

/// The one-pass C++ dequantisation for CPU tensors (bit-identical to the tensor-op path, see
/// `csrc/dequant_4bit.cpp`); `None` where it does not apply (another device or dtype), so
/// the caller falls back to tensor ops. On CUDA those ops are elementwise kernels already.
fn dequantize_4bit_fused_cpu(
    packed: &Tensor,
    absmax: &Tensor,
    quant_type: QuantType,
    n: i64,
    blocksize: i64,
    kind: Kind,
) -> Result<Option<Tensor>> {
    if !matches!(kind, Kind::Float | Kind::BFloat16 | Kind::Half) {
        return Ok(None);
    }
    if packed.device() != tch::Device::Cpu || absmax.device() != tch::Device::Cpu {
        return Ok(None);
    }
    let packed = packed.reshape([-1]).contiguous();
    let absmax = absmax.to_kind(Kind::Float).contiguous();
    let out = Tensor::empty([n], (kind, tch::Device::Cpu));
    dequantize_4bit_cpu_into(&packed, &absmax, quant_type, blocksize, &out)?;
    Ok(Some(out))
}

/// The fused CPU kernel writing into `out` (contiguous CPU, fp32 / bf16 / fp16, as many
/// elements as the weight has): lets a caller reuse one buffer across layers, so no step
/// pays the page faults of a fresh weight-sized allocation per layer.
pub(crate) fn dequantize_4bit_cpu_into(
    packed: &Tensor,
    absmax: &Tensor,
    quant_type: QuantType,
    blocksize: i64,
    out: &Tensor,
) -> Result<()> {
    let kind = out.kind();
    let out_kind = match kind {
        Kind::Float => 0,
        Kind::BFloat16 => 1,
        Kind::Half => 2,
        _ => bail!("the 4-bit CPU kernel writes fp32, bf16 or fp16, not {kind:?}"),
    };
    let n = out.numel() as i64;
    let ok_layout = out.device() == tch::Device::Cpu
        && out.is_contiguous()
        && packed.device() == tch::Device::Cpu
        && packed.kind() == Kind::Uint8
        && packed.is_contiguous()
        && packed.numel() as i64 == ceil_div(n, 2)
        && absmax.kind() == Kind::Float
        && absmax.is_contiguous()
        && absmax.numel() as i64 == ceil_div(n, blocksize);
    if !ok_layout {
        bail!(
            "4-bit CPU kernel: {n} values need {} contiguous packed bytes and {} fp32 scales, got {} and {}",
            ceil_div(n, 2),
            ceil_div(n, blocksize),
            packed.numel(),
            absmax.numel()
        );
    }
    let code = code_4bit(quant_type).contiguous();
    // SAFETY: all four buffers are contiguous CPU tensors of the sizes the kernel reads and
    // writes (checked above), alive for the whole call.
    let rc = unsafe {
        lmms_dequant_4bit_cpu(
            packed.data_ptr() as *const u8,
            absmax.data_ptr() as *const f32,
            code.data_ptr() as *const f32,
            n,
            blocksize,
            out_kind,
            out.data_ptr(),
        )
    };
    if rc != 0 {
        bail!("4-bit dequantisation kernel refused block size {blocksize} / dtype {kind:?}");
    }
    Ok(())
}

impl QuantState4bit {
    /// The per-block absmax in fp32, expanding the nested 8-bit form the way bnb does
    /// (`dequantize_blockwise(qabsmax, state2) + offset`).
    pub fn absmax_f32(&self) -> Result<Tensor> {
        match &self.absmax {
            Absmax4bit::Plain(a) => Ok(a.to_kind(Kind::Float)),
            Absmax4bit::Nested {
                qabsmax,
                offset,
                state2,
            } => {
                let a = dequantize_blockwise(
                    qabsmax,
                    &state2.absmax,
                    &state2.code,
                    state2.blocksize,
                    Kind::Float,
                )?;
                Ok(a + offset.to_device(qabsmax.device()).to_kind(Kind::Float))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fused CPU kernel writes the same bits as the tensor-op path (which the bnb tests
    /// check against bitsandbytes) for every dtype, both codebooks, an odd element count and a
    /// partial last block, and sizes that split across threads.
    #[test]
    fn fused_cpu_kernel_equals_tensor_ops() {
        tch::manual_seed(7);
        for &(n, blocksize) in &[
            (1i64, 64i64),
            (63, 64),
            (4097, 32),
            (300_001, 64),
            (1 << 20, 256),
        ] {
            let w = Tensor::randn([n], (Kind::Float, tch::Device::Cpu)) * 0.02;
            for quant_type in [QuantType::Nf4, QuantType::Fp4] {
                for double in [false, true] {
                    let (packed, state) = quantize_4bit(&w, quant_type, blocksize, double).unwrap();
                    let absmax = state.absmax_f32().unwrap();
                    for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
                        let fused = dequantize_4bit_fused_cpu(
                            &packed, &absmax, quant_type, n, blocksize, kind,
                        )
                        .unwrap()
                        .expect("CPU float kinds take the fused path");
                        let ops =
                            dequantize_4bit_ops(&packed, &absmax, quant_type, n, blocksize, kind);
                        let same = fused
                            .view_dtype(Kind::Uint8)
                            .equal(&ops.view_dtype(Kind::Uint8));
                        assert!(
                            same,
                            "n {n} bs {blocksize} {quant_type:?} double {double} {kind:?}"
                        );
                    }
                }
            }
        }
    }
}
