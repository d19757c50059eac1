//! The frozen 4-bit base weight of a QLoRA linear layer and its autograd.
//!
//! Only the packed codes and block scales stay resident (≈ 0.52 byte per parameter with
//! double quantisation). Forward dequantises to the compute dtype, multiplies and lets the
//! dense copy go; backward dequantises once more to form `grad_input = grad_out · W`, so the
//! graph keeps the layer's input (as any linear does) but never a weight-sized tensor. The
//! base weight is frozen, so it gets no gradient — as in `bnb.nn.Linear4bit` under PEFT.

use anyhow::{bail, Result};
use tch::{Kind, Tensor};

use super::fourbit::dequantize_4bit_cpu_into;
use super::{
    ceil_div, compress_absmax, dequantize_4bit_as, dynamic_code, quantize_4bit, Absmax4bit,
    BlockwiseState, QuantState4bit, QuantType, NESTED_BLOCKSIZE,
};
use crate::autograd::{custom_function, grad_enabled};

/// Values (de)quantised per step by [`QuantWeight::quantize_as`] and
/// [`QuantWeight::dequantize`]: 2^19, a multiple of every 4-bit block size (and even, so no
/// chunk but the last needs padding), keeping their temporaries near 10 MiB.
pub const QUANT_CHUNK: i64 = 1 << 19;

/// How a weight is quantised (bnb's `BitsAndBytesConfig` 4-bit fields).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QuantOptions {
    pub quant_type: QuantType,
    /// `bnb_4bit_use_double_quant` (`compress_statistics`).
    pub double_quant: bool,
    pub blocksize: i64,
    /// `bnb_4bit_compute_dtype`: the dtype the weight dequantises to and the matmul runs in;
    /// `None` follows the input's dtype.
    pub compute_dtype: Option<Kind>,
}

impl Default for QuantOptions {
    fn default() -> Self {
        QuantOptions {
            quant_type: QuantType::Nf4,
            double_quant: true,
            blocksize: 64,
            compute_dtype: None,
        }
    }
}

/// A quantised base weight: bnb's packed codes plus its [`QuantState4bit`].
#[derive(Debug)]
pub struct QuantWeight {
    /// `[ceil(out·in / 2), 1]` uint8, bnb's layout.
    pub packed: Tensor,
    pub state: QuantState4bit,
    pub compute_dtype: Option<Kind>,
}

fn shallow_state(s: &QuantState4bit) -> QuantState4bit {
    let absmax = match &s.absmax {
        Absmax4bit::Plain(a) => Absmax4bit::Plain(a.shallow_clone()),
        Absmax4bit::Nested {
            qabsmax,
            offset,
            state2,
        } => Absmax4bit::Nested {
            qabsmax: qabsmax.shallow_clone(),
            offset: offset.shallow_clone(),
            state2: BlockwiseState {
                absmax: state2.absmax.shallow_clone(),
                code: state2.code.shallow_clone(),
                blocksize: state2.blocksize,
            },
        },
    };
    QuantState4bit {
        absmax,
        shape: s.shape.clone(),
        dtype: s.dtype,
        blocksize: s.blocksize,
        quant_type: s.quant_type,
    }
}

impl QuantWeight {
    /// Quantises a dense `[out, in]` weight (any float dtype; it may be a view of a mapped
    /// checkpoint) into codes that dequantise to `kind`. Works through the flat weight in
    /// chunks of [`QUANT_CHUNK`] values (a multiple of every block size), so the fp32 and
    /// index temporaries of quantisation stay a few tens of MiB whatever the layer's size;
    /// blocks are independent, so the bytes equal one-shot [`quantize_4bit`]'s.
    pub fn quantize_as(weight: &Tensor, opts: &QuantOptions, kind: Kind) -> Result<QuantWeight> {
        if weight.dim() != 2 {
            bail!(
                "only 2-D linear weights can be quantised, got shape {:?}",
                weight.size()
            );
        }
        let flat = weight.detach().reshape([-1]);
        let n = flat.size()[0];
        let mut packed = Vec::new();
        let mut absmax = Vec::new();
        let mut start = 0;
        while start < n {
            let len = QUANT_CHUNK.min(n - start);
            let (p, s) = tch::no_grad(|| {
                quantize_4bit(
                    &flat.narrow(0, start, len),
                    opts.quant_type,
                    opts.blocksize,
                    false,
                )
            })?;
            packed.push(p);
            absmax.push(s.absmax_f32()?);
            start += len;
        }
        let absmax = compress_absmax(Tensor::cat(&absmax, 0), opts.double_quant)?;
        Ok(QuantWeight {
            packed: Tensor::cat(&packed, 0),
            state: QuantState4bit {
                absmax,
                shape: weight.size(),
                dtype: kind,
                blocksize: opts.blocksize,
                quant_type: opts.quant_type,
            },
            compute_dtype: opts.compute_dtype,
        })
    }

    /// [`QuantWeight::quantize_as`] dequantising to the weight's own dtype.
    pub fn quantize(weight: &Tensor, opts: &QuantOptions) -> Result<QuantWeight> {
        QuantWeight::quantize_as(weight, opts, weight.kind())
    }

    /// A random 4-bit `[out, in]` weight made directly in packed form (uniform codes, block
    /// scales around `2.2 · std`, giving an RMS of about `std`), never dense: for benchmarks
    /// and tests of models too large to hold unquantised. `kind` is what it dequantises to.
    pub fn random(shape: &[i64], opts: &QuantOptions, std: f64, kind: Kind) -> Result<QuantWeight> {
        if shape.len() != 2 || shape.iter().any(|&d| d <= 0) {
            bail!("a random 4-bit weight needs a 2-D non-empty shape, got {shape:?}");
        }
        let n: i64 = shape.iter().product();
        let blocks = ceil_div(n, opts.blocksize);
        let device = tch::Device::Cpu;
        let packed = Tensor::randint(256, [ceil_div(n, 2), 1], (Kind::Uint8, device));
        let scale = 2.2 * std;
        let absmax = if opts.double_quant {
            let blocks2 = ceil_div(blocks, NESTED_BLOCKSIZE);
            Absmax4bit::Nested {
                qabsmax: Tensor::randint(256, [blocks], (Kind::Uint8, device)),
                offset: Tensor::from(scale as f32),
                state2: BlockwiseState {
                    absmax: Tensor::full([blocks2], scale / 2.0, (Kind::Float, device)),
                    code: dynamic_code(),
                    blocksize: NESTED_BLOCKSIZE,
                },
            }
        } else {
            Absmax4bit::Plain((Tensor::rand([blocks], (Kind::Float, device)) + 0.5) * scale)
        };
        Ok(QuantWeight {
            packed,
            state: QuantState4bit {
                absmax,
                shape: shape.to_vec(),
                dtype: kind,
                blocksize: opts.blocksize,
                quant_type: opts.quant_type,
            },
            compute_dtype: opts.compute_dtype,
        })
    }

    /// A second handle on the same storage (for closures the autograd graph keeps).
    pub fn shallow_clone(&self) -> QuantWeight {
        QuantWeight {
            packed: self.packed.shallow_clone(),
            state: shallow_state(&self.state),
            compute_dtype: self.compute_dtype,
        }
    }

    /// The dense weight in `kind` (a fresh tensor; nothing keeps it). Off CPU, dequantises
    /// [`QUANT_CHUNK`] values at a time into the output, so the only weight-sized tensor is the
    /// result itself (a one-shot dequantisation of a 7B MLP layer holds about 1 GB of
    /// index and fp32 temporaries). Values are per element, so they equal the one-shot ones.
    pub fn dequantize(&self, kind: Kind) -> Result<Tensor> {
        let n = self.state.numel();
        // On CPU the fused kernel writes straight into the result with no temporaries.
        if n <= QUANT_CHUNK || self.packed.device() == tch::Device::Cpu {
            return dequantize_4bit_as(&self.packed, &self.state, kind);
        }
        let bs = self.state.blocksize;
        let absmax = self.state.absmax_f32()?;
        let packed = self.packed.reshape([-1]);
        let out = Tensor::empty([n], (kind, self.packed.device()));
        let mut start = 0;
        while start < n {
            let len = QUANT_CHUNK.min(n - start);
            let chunk = QuantState4bit {
                absmax: Absmax4bit::Plain(absmax.narrow(0, start / bs, ceil_div(len, bs))),
                shape: vec![len],
                dtype: kind,
                blocksize: bs,
                quant_type: self.state.quant_type,
            };
            let vals =
                dequantize_4bit_as(&packed.narrow(0, start / 2, ceil_div(len, 2)), &chunk, kind)?;
            out.narrow(0, start, len).copy_(&vals);
            start += len;
        }
        Ok(out.reshape(self.state.shape.as_slice()))
    }

    /// Runs `f` on the dense weight in `kind`. On CPU the weight is dequantised into a
    /// per-thread scratch buffer kept from call to call: a fresh weight-sized allocation
    /// per layer is a fresh `mmap` whose page faults cost more than the dequantisation itself
    /// (about 3/4 of the time at 7B sizes). `f` must not keep the tensor it is given (a
    /// matmul's result is a new tensor; the weight is frozen, so autograd saves nothing of
    /// it). The buffer holds the largest weight seen, one layer's worth, for the thread's
    /// lifetime; a nested call (none is expected) falls back to an owned tensor.
    pub fn with_dense<R>(&self, kind: Kind, f: impl FnOnce(&Tensor) -> R) -> Result<R> {
        thread_local! {
            static SCRATCH: std::cell::RefCell<Option<Tensor>> = const { std::cell::RefCell::new(None) };
        }
        let n = self.state.numel();
        let on_cpu = self.packed.device() == tch::Device::Cpu
            && matches!(kind, Kind::Float | Kind::BFloat16 | Kind::Half);
        if !on_cpu {
            return Ok(f(&self.dequantize(kind)?));
        }
        SCRATCH.with(|cell| {
            let Ok(mut slot) = cell.try_borrow_mut() else {
                return Ok(f(&self.dequantize(kind)?));
            };
            let fits = slot
                .as_ref()
                .is_some_and(|t| t.kind() == kind && t.numel() as i64 >= n);
            if !fits {
                *slot = None; // free the old buffer before allocating the larger one
                *slot = Some(Tensor::empty([n], (kind, tch::Device::Cpu)));
            }
            let buf = slot.as_ref().expect("just filled").narrow(0, 0, n);
            let absmax = self.state.absmax_f32()?;
            dequantize_4bit_cpu_into(
                &self.packed.reshape([-1]),
                &absmax,
                self.state.quant_type,
                self.state.blocksize,
                &buf,
            )?;
            Ok(f(&buf.view(self.state.shape.as_slice())))
        })
    }

    /// Resident bytes of the quantised weight.
    pub fn nbytes(&self) -> i64 {
        self.state.nbytes()
    }

    /// `x Wᵀ + bias` with the weight dequantised to `x`'s dtype for this call only
    /// (`bnb.matmul_4bit`'s forward).
    fn dense_linear(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let [_, in_features] = self.state.shape[..] else {
            bail!(
                "4-bit linear needs a 2-D weight, the state has shape {:?}",
                self.state.shape
            );
        };
        if x.size().last() != Some(&in_features) {
            bail!(
                "4-bit linear: input {:?} does not end in in_features = {in_features}",
                x.size()
            );
        }
        self.with_dense(x.kind(), |w| x.linear(w, bias))
    }

    /// `x Wᵀ + bias` in the compute dtype, cast back to `x`'s dtype, differentiable in `x`
    /// through a hand-written backward that dequantises again (see the module docs). A
    /// frozen bias is fused into the matmul (one rounding, as a dense `linear`); a trainable
    /// one joins outside the custom function, so it gets its gradient from the ordinary graph.
    pub fn linear(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let in_kind = x.kind();
        let compute = self.compute_dtype.unwrap_or(in_kind);
        let xc = x.to_kind(compute);
        let (fused, outside) = match bias {
            Some(b) if b.requires_grad() => (None, Some(b)),
            Some(b) => (Some(b.to_kind(compute)), None),
            None => (None, None),
        };
        let y = if grad_enabled() && xc.requires_grad() {
            let fw = self.shallow_clone();
            let bw = self.shallow_clone();
            let mut forward_err = None;
            let mut outs = custom_function(
                &[&xc],
                |xs| match fw.dense_linear(&xs[0], fused.as_ref()) {
                    Ok(y) => vec![y],
                    Err(e) => {
                        forward_err = Some(e);
                        vec![Tensor::zeros([0], (compute, xs[0].device()))]
                    }
                },
                move |_inputs, grads| {
                    let g = &grads[0];
                    // The inputs were validated in forward, so the state is consistent here;
                    // a failure would be a corrupted weight, reported by the panic guard.
                    let gx = bw
                        .with_dense(g.kind(), |w| g.matmul(w))
                        .unwrap_or_else(|e| panic!("4-bit linear backward: {e:#}"));
                    vec![Some(gx)]
                },
            )?;
            if let Some(e) = forward_err {
                return Err(e);
            }
            outs.swap_remove(0)
        } else {
            self.dense_linear(&xc, fused.as_ref())?
        };
        let y = match outside {
            Some(b) => y + b.to_kind(compute),
            None => y,
        };
        Ok(y.to_kind(in_kind))
    }
}
