//! 4-bit weight quantisation for QLoRA, bit-compatible with `bitsandbytes`.
//!
//! Frozen base weights are stored the way bnb's `Linear4bit` / `Params4bit` store them
//! (packed codes `[ceil(n/2), 1]` uint8, fp32 absmax per block, optionally double-quantised),
//! so checkpoints quantised by bnb load here unchanged and our quantisation of a weight gives
//! bnb's bytes. Everything is expressed as tensor ops, so it runs on CPU and CUDA alike.

mod blockwise;
mod fourbit;
mod linear;
mod load;

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Result};
use tch::{Kind, Tensor};

pub use blockwise::{dequantize_blockwise, dynamic_code, quantize_blockwise, NESTED_BLOCKSIZE};
pub(crate) use fourbit::compress_absmax;
pub use fourbit::{code_4bit, dequantize_4bit, dequantize_4bit_as, quantize_4bit, BLOCKSIZES};
pub use linear::{QuantOptions, QuantWeight};
pub(crate) use load::{defer_source, placeholder};
pub use load::{
    deferred, load_quantized, materialize, materialize_random, Deferred, Materialized,
    QuantModules, QuantSpec,
};

/// `ceil(a / b)` for positive `b` (`i64::div_ceil` is not stable).
pub(crate) fn ceil_div(a: i64, b: i64) -> i64 {
    (a + b - 1) / b
}

/// The 4-bit data type: QLoRA's NormalFloat or bnb's 4-bit float.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantType {
    Nf4,
    Fp4,
}

impl QuantType {
    /// The name bnb and `transformers`' `BitsAndBytesConfig` use.
    pub fn as_str(self) -> &'static str {
        match self {
            QuantType::Nf4 => "nf4",
            QuantType::Fp4 => "fp4",
        }
    }
}

impl fmt::Display for QuantType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for QuantType {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "nf4" => Ok(QuantType::Nf4),
            "fp4" => Ok(QuantType::Fp4),
            other => bail!("unknown 4-bit quant type {other:?} (expected \"nf4\" or \"fp4\")"),
        }
    }
}

/// State of an 8-bit block-wise quantisation (bnb's nested `state2`).
#[derive(Debug)]
pub struct BlockwiseState {
    /// fp32, one per block.
    pub absmax: Tensor,
    /// fp32 `[256]` codebook.
    pub code: Tensor,
    pub blocksize: i64,
}

/// The per-block scales of a 4-bit weight.
#[derive(Debug)]
pub enum Absmax4bit {
    /// fp32, one per block (`compress_statistics=False`).
    Plain(Tensor),
    /// Double quantisation (`compress_statistics=True`): `qabsmax` uint8 codes of
    /// `absmax - offset` under `state2`; `offset` is the fp32 mean of the original absmax
    /// (0-dim tensor, kept on the device).
    Nested {
        qabsmax: Tensor,
        offset: Tensor,
        state2: BlockwiseState,
    },
}

/// What bnb's `QuantState` holds for a 4-bit weight.
#[derive(Debug)]
pub struct QuantState4bit {
    pub absmax: Absmax4bit,
    /// Shape of the original weight (`[out_features, in_features]` for a linear layer).
    pub shape: Vec<i64>,
    /// Kind the weight had and dequantises back to.
    pub dtype: Kind,
    pub blocksize: i64,
    pub quant_type: QuantType,
}

impl QuantState4bit {
    /// Number of quantised parameters.
    pub fn numel(&self) -> i64 {
        self.shape.iter().product()
    }

    /// Bytes this weight occupies in memory: packed codes plus its scale statistics. Used
    /// for memory budgets: with block size 64 it is 0.5 + 4/64 = 0.5625 byte per parameter
    /// plainly, and 0.5 + 1/64 + 4/(64*256) ≈ 0.516 byte (plus a 1 KiB code) nested.
    pub fn nbytes(&self) -> i64 {
        let codes = ceil_div(self.numel(), 2);
        let stats = match &self.absmax {
            Absmax4bit::Plain(a) => a.numel() as i64 * 4,
            Absmax4bit::Nested {
                qabsmax, state2, ..
            } => {
                qabsmax.numel() as i64
                    + 4
                    + (state2.absmax.numel() + state2.code.numel()) as i64 * 4
            }
        };
        codes + stats
    }
}

/// Forward of a 4-bit linear layer (`bnb.nn.Linear4bit`): dequantise the weight straight to
/// the input's dtype and apply `x @ W^T + bias`. The dequantised copy lives only for this call;
/// a training backward must dequantise again rather than keep it (see the QLoRA issue).
pub fn linear_4bit(
    x: &Tensor,
    packed: &Tensor,
    state: &QuantState4bit,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    if state.shape.len() != 2 {
        bail!(
            "4-bit linear needs a 2-D weight, the state has shape {:?}",
            state.shape
        );
    }
    let in_features = state.shape[1];
    if x.size().last() != Some(&in_features) {
        bail!(
            "4-bit linear: input {:?} does not end in in_features = {in_features}",
            x.size()
        );
    }
    let w = dequantize_4bit_as(packed, state, x.kind())?;
    let bias = bias.map(|b| b.to_kind(x.kind()));
    Ok(x.linear(&w, bias.as_ref()))
}
