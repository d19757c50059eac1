//! Building a model whose linear weights are quantised on the way in from the checkpoint.
//!
//! Families construct their layers with `Linear::new` and fill them with
//! [`crate::weights::load_into`]; neither knows about quantisation, and the decision which
//! layers to quantise needs the built model (its [`Trainable::component`] and names). So
//! loading runs in two phases on this thread:
//!
//! 1. [`deferred`] runs the family's ordinary loader inside a scope in which `Linear::new`
//!    registers a storage-less placeholder (a zero scalar expanded to `[out, in]`, stride 0)
//!    instead of allocating the weight, and `load_into` checks each placeholder's checkpoint
//!    tensor (name, shape) but only remembers where it lies instead of copying it.
//! 2. [`materialize`] then walks the model's linears: a selected one is quantised straight
//!    from the memory-mapped checkpoint tensor and its placeholder leaves the `VarStore`;
//!    any other gets a dense tensor copied from the mapping.
//!
//! At no point is more than one layer's dense weight in memory, so loading a 7B model for
//! QLoRA needs about 0.52 byte per quantised parameter plus the unquantised parts.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use safetensors::SafeTensors;
use tch::{Kind, Tensor};

use super::linear::{QuantOptions, QuantWeight};
use super::BLOCKSIZES;
use crate::config::QuantSection;
use crate::family::{Component, Trainable};
use crate::peft::Targets;
use crate::weights::{kind_of, tensor_view};

/// Which linear layers are quantised.
#[derive(Debug, Clone)]
pub enum QuantModules {
    /// Every linear layer of the LLM except the output head: not the vision tower, the
    /// projector or `lm_head` (norms and embeddings are never linears).
    LlmLinears,
    /// PEFT-style targets (suffixes or a regex) over all linear layers.
    Targets(Targets),
}

/// A resolved `[quant]` section.
#[derive(Debug, Clone)]
pub struct QuantSpec {
    pub options: QuantOptions,
    pub modules: QuantModules,
}

impl QuantSpec {
    pub fn from_config(c: &QuantSection) -> Result<QuantSpec> {
        let quant_type = c.quant_type.parse().context("quant.type")?;
        if !BLOCKSIZES.contains(&c.blocksize) {
            bail!(
                "quant.blocksize must be one of {BLOCKSIZES:?}, got {}",
                c.blocksize
            );
        }
        let compute_dtype = match c.compute_dtype.as_str() {
            "auto" => None,
            "fp32" | "float32" => Some(Kind::Float),
            "bf16" | "bfloat16" => Some(Kind::BFloat16),
            "fp16" | "float16" => Some(Kind::Half),
            other => bail!(
                "quant.compute_dtype must be \"auto\", \"fp32\", \"bf16\" or \"fp16\", got {other:?}"
            ),
        };
        let modules = match Targets::from_config(&c.modules).context("quant.modules")? {
            Targets::AllLinear => QuantModules::LlmLinears,
            t => QuantModules::Targets(t),
        };
        Ok(QuantSpec {
            options: QuantOptions {
                quant_type,
                double_quant: c.double_quant,
                blocksize: c.blocksize,
                compute_dtype,
            },
            modules,
        })
    }

    /// Whether the linear layer `hub` (Hub name) is quantised.
    pub fn selects(&self, model: &dyn Trainable, hub: &str) -> bool {
        match &self.modules {
            QuantModules::LlmLinears => {
                model.component(hub) == Component::Llm && Targets::AllLinear.matches(hub, hub)
            }
            QuantModules::Targets(t) => t.matches(hub, &model.runtime_name(hub)),
        }
    }
}

/// Where the checkpoint tensor of a deferred weight lies.
#[derive(Debug, Clone)]
struct Source {
    file: PathBuf,
    tensor: String,
}

struct Scope {
    kind: Kind,
    placeholders: HashSet<String>,
    sources: HashMap<String, Source>,
}

thread_local! {
    static SCOPE: RefCell<Option<Scope>> = const { RefCell::new(None) };
}

/// Weights whose allocation was deferred, and where the loader found their data.
pub struct Deferred {
    kind: Kind,
    placeholders: HashSet<String>,
    sources: HashMap<String, Source>,
}

impl Deferred {
    /// Number of linear weights built as placeholders.
    pub fn len(&self) -> usize {
        self.placeholders.len()
    }

    pub fn is_empty(&self) -> bool {
        self.placeholders.is_empty()
    }
}

/// Runs `build` (a family's constructor or loader) with linear weights deferred: they are
/// created as storage-less placeholders of `kind`, and checkpoint loading records their
/// sources instead of copying. Finish with [`materialize`] (or [`materialize_random`]).
pub fn deferred<T>(kind: Kind, build: impl FnOnce() -> Result<T>) -> Result<(T, Deferred)> {
    let nested = SCOPE.with(|s| s.borrow().is_some());
    if nested {
        bail!("deferred model construction cannot be nested");
    }
    SCOPE.with(|s| {
        *s.borrow_mut() = Some(Scope {
            kind,
            placeholders: HashSet::new(),
            sources: HashMap::new(),
        })
    });
    let built = build();
    let scope = SCOPE.with(|s| s.borrow_mut().take());
    let built = built?;
    let scope = scope.context("the deferred-construction scope vanished")?;
    Ok((
        built,
        Deferred {
            kind: scope.kind,
            placeholders: scope.placeholders,
            sources: scope.sources,
        },
    ))
}

/// Inside [`deferred`]: a placeholder `[out, in]` weight registered as `name` under `p`
/// (no storage: a zero scalar expanded), else `None` and the caller allocates as usual.
pub(crate) fn placeholder(p: &tch::nn::Path, name: &str, shape: &[i64]) -> Option<Tensor> {
    SCOPE.with(|s| {
        let mut guard = s.borrow_mut();
        let scope = guard.as_mut()?;
        let t = Tensor::zeros([0i64; 0], (scope.kind, p.device())).expand(shape, false);
        scope.placeholders.insert(p.path(name));
        Some(p.add(name, t, false))
    })
}

/// Inside [`deferred`]: if `var` is a placeholder, remembers that checkpoint tensor `tensor`
/// of `file` fills it and returns true (the loader then skips the copy).
pub(crate) fn defer_source(var: &str, file: &Path, tensor: &str) -> bool {
    SCOPE.with(|s| {
        let mut guard = s.borrow_mut();
        let Some(scope) = guard.as_mut() else {
            return false;
        };
        if !scope.placeholders.contains(var) {
            return false;
        }
        scope.sources.insert(
            var.to_string(),
            Source {
                file: file.to_path_buf(),
                tensor: tensor.to_string(),
            },
        );
        true
    })
}

/// Counts of what [`materialize`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Materialized {
    pub quantized: usize,
    pub dense: usize,
    /// Resident bytes of the quantised weights.
    pub quantized_bytes: i64,
}

/// A deferred weight made real.
enum Made {
    Dense(Tensor),
    Quant(QuantWeight),
}

/// Makes one deferred weight: `(variable name, shape, quantisation options if selected)`.
type MakeWeight<'a> = dyn FnMut(&str, &[i64], Option<&QuantOptions>) -> Result<Made> + 'a;

/// Gives every deferred linear weight its storage, one layer at a time: `make(name, shape,
/// quantise)` returns a dense tensor or, when `spec` selects the layer and passes its options,
/// possibly a quantised weight directly.
fn finish(
    model: &mut dyn Trainable,
    deferred: &Deferred,
    spec: Option<&QuantSpec>,
    make: &mut MakeWeight<'_>,
) -> Result<Materialized> {
    let mut names = Vec::new();
    model.visit_linears(&mut |name, _| names.push(name.to_string()));
    let selected: HashSet<String> = names
        .iter()
        .filter(|n| spec.is_some_and(|s| s.selects(&*model, n)))
        .cloned()
        .collect();
    let mut done = Materialized::default();
    let mut result = Ok(());
    let vs_vars = model.var_store().variables_.clone();
    model.visit_linears(&mut |name, linear| {
        if result.is_err() {
            return;
        }
        let var = format!("{name}.weight");
        if !deferred.placeholders.contains(&var) {
            return;
        }
        let step = (|| -> Result<()> {
            let shape = linear.weight.size();
            let opts = spec.filter(|_| selected.contains(name)).map(|s| &s.options);
            let made = match make(&var, &shape, opts)? {
                Made::Dense(dense) => match opts {
                    Some(o) => Made::Quant(
                        QuantWeight::quantize(&dense, o)
                            .with_context(|| format!("quantising {var}"))?,
                    ),
                    None => Made::Dense(dense),
                },
                quant => quant,
            };
            match made {
                Made::Quant(q) => {
                    done.quantized += 1;
                    done.quantized_bytes += q.nbytes();
                    linear.quant = Some(q);
                    let mut vars = vs_vars
                        .lock()
                        .map_err(|_| anyhow::anyhow!("the VarStore lock is poisoned"))?;
                    vars.named_variables.remove(&var);
                }
                Made::Dense(dense) => {
                    tch::no_grad(|| linear.weight.set_data(&dense));
                    done.dense += 1;
                }
            }
            Ok(())
        })();
        result = step;
    });
    result?;
    Ok(done)
}

/// Phase 2 of quantised loading (see the module docs): fills every placeholder from the
/// checkpoint tensor [`deferred`] recorded for it, quantising the layers `spec` selects.
pub fn materialize(
    model: &mut dyn Trainable,
    deferred: &Deferred,
    spec: &QuantSpec,
) -> Result<Materialized> {
    let device = model.var_store().device();
    let kind = deferred.kind;
    let mut maps: HashMap<PathBuf, memmap2::Mmap> = HashMap::new();
    let mut fill = |var: &str, shape: &[i64], quant: Option<&QuantOptions>| -> Result<Made> {
        let src = deferred
            .sources
            .get(var)
            .with_context(|| format!("the checkpoint has no tensor for {var}"))?;
        if !maps.contains_key(&src.file) {
            let handle = std::fs::File::open(&src.file)
                .with_context(|| format!("opening {}", src.file.display()))?;
            // SAFETY: read-only mapping; every view of it is copied or quantised into fresh
            // tensors before this function returns.
            let map = unsafe { memmap2::Mmap::map(&handle) }
                .with_context(|| format!("mapping {}", src.file.display()))?;
            maps.insert(src.file.clone(), map);
        }
        let map = &maps[&src.file];
        let st = SafeTensors::deserialize(map)
            .with_context(|| format!("{} is not a valid safetensors file", src.file.display()))?;
        let view = st
            .tensor(&src.tensor)
            .with_context(|| format!("{}: {}", src.file.display(), src.tensor))?;
        let src_kind = kind_of(view.dtype())?;
        let t = tensor_view(view.data(), shape, src_kind);
        let made = match quant {
            // Straight from the mapping, chunk by chunk: no dense copy of the layer.
            Some(o) => Made::Quant(
                QuantWeight::quantize_as(&t, o, kind)
                    .with_context(|| format!("quantising {var}"))?,
            ),
            None => {
                // A fresh tensor: `to_kind` of a same-kind CPU view would alias the mapping.
                let dense = Tensor::empty(shape, (kind, device));
                tch::no_grad(|| dense.shallow_clone().copy_(&t));
                Made::Dense(dense)
            }
        };
        drop(t);
        release(map, &view);
        Ok(made)
    };
    finish(model, deferred, Some(spec), &mut fill)
}

/// [`materialize`] for models without a checkpoint (benchmarks): dense layers are drawn from
/// N(0, std) one at a time, and the layers `spec` selects are made random directly in 4-bit
/// ([`QuantWeight::random`]), so the dense LLM never exists, not even one layer at a time.
pub fn materialize_random(
    model: &mut dyn Trainable,
    deferred: &Deferred,
    spec: Option<&QuantSpec>,
    std: f64,
) -> Result<Materialized> {
    let device = model.var_store().device();
    let kind = deferred.kind;
    let mut fill = |_: &str, shape: &[i64], quant: Option<&QuantOptions>| -> Result<Made> {
        Ok(match quant {
            Some(o) => Made::Quant(QuantWeight::random(shape, o, std, kind)?),
            None => Made::Dense(Tensor::empty(shape, (kind, device)).normal_(0.0, std)),
        })
    };
    finish(model, deferred, spec, &mut fill)
}

/// Drops the pages of a consumed checkpoint tensor from this process's mapping, so the
/// resident set does not grow by the file size while a large checkpoint streams through
/// (the kernel keeps them in the page cache; reading them again costs no I/O).
fn release(map: &memmap2::Mmap, view: &safetensors::tensor::TensorView<'_>) {
    let base = map.as_ptr() as usize;
    let data = view.data();
    let page = 4096;
    let start = (data.as_ptr() as usize - base) / page * page;
    let end = data.as_ptr() as usize - base + data.len();
    // SAFETY: the mapping is read-only and file-backed; after MADV_DONTNEED its pages read
    // back from the file unchanged, and nothing borrows the released range any more.
    let _ = unsafe {
        map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
    };
}

/// Loads a model for QLoRA: runs `load` (the family's ordinary loader) with linear weights
/// deferred, then quantises the selected ones straight from the checkpoint.
pub fn load_quantized<M: Trainable>(
    kind: Kind,
    spec: &QuantSpec,
    load: impl FnOnce() -> Result<M>,
) -> Result<(M, Materialized)> {
    let (mut model, deferred) = deferred(kind, load)?;
    let done = materialize(&mut model, &deferred, spec)?;
    if done.quantized == 0 {
        bail!(
            "quant.modules {:?} select no linear layer of this model; nothing would be quantised",
            spec.modules
        );
    }
    Ok((model, done))
}
