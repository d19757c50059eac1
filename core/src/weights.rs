//! Loading Hugging Face safetensors checkpoints into a [`VarStore`] whose variables carry the
//! Hub tensor names.
//!
//! Shards are memory-mapped and each tensor is copied straight from the mapping into its
//! variable (converting dtype and device on the way), so a 7B checkpoint never sits in
//! anonymous memory twice: the only resident copy is the model's own.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use safetensors::{Dtype, SafeTensors};
use tch::{nn::VarStore, Kind, Tensor};

/// The safetensors files of a checkpoint directory: the shards named by
/// `model.safetensors.index.json`, else `model.safetensors`, else every `*.safetensors`.
pub fn checkpoint_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index)
            .with_context(|| format!("reading {}", index.display()))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", index.display()))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .with_context(|| format!("{} has no weight_map", index.display()))?;
        let files: std::collections::BTreeSet<&str> =
            map.values().filter_map(|v| v.as_str()).collect();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("no *.safetensors weights in {}", dir.display());
    }
    Ok(files)
}

pub fn kind_of(dtype: Dtype) -> Result<Kind> {
    Ok(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::I16 => Kind::Int16,
        Dtype::I8 => Kind::Int8,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        other => bail!("unsupported safetensors dtype {other:?}"),
    })
}

/// The tensor names of the checkpoint in `dir` (headers only; no weight is read).
pub fn checkpoint_tensor_names(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for file in checkpoint_files(dir)? {
        let handle =
            std::fs::File::open(&file).with_context(|| format!("opening {}", file.display()))?;
        // SAFETY: read-only mapping, dropped before the next file.
        let mmap = unsafe { memmap2::Mmap::map(&handle) }
            .with_context(|| format!("mapping {}", file.display()))?;
        let (_, meta) = SafeTensors::read_metadata(&mmap)
            .with_context(|| format!("{} is not a valid safetensors file", file.display()))?;
        names.extend(meta.tensors().into_keys());
    }
    names.sort();
    Ok(names)
}

/// What to do with checkpoint tensors the model has no variable for.
pub struct LoadOptions<'a> {
    /// Checkpoint tensors that may be absent from the model (e.g. `lm_head.weight` when the
    /// embeddings are tied).
    pub ignore_unexpected: &'a dyn Fn(&str) -> bool,
}

impl Default for LoadOptions<'_> {
    fn default() -> Self {
        LoadOptions {
            ignore_unexpected: &|_| false,
        }
    }
}

/// Copies every tensor of the checkpoint in `dir` into the variable of the same name.
/// Every variable must be filled and every checkpoint tensor used (or ignored by `opts`);
/// a shape mismatch or a missing / unexpected tensor is an error naming it, which is how a
/// checkpoint of another model is caught.
pub fn load_into(vs: &VarStore, dir: &Path, opts: &LoadOptions) -> Result<()> {
    load_into_renamed(vs, dir, opts, &|name| Cow::Borrowed(name))
}

/// [`load_into`] for families whose checkpoints come in several naming layouts (LLaVA: the
/// Hub's `language_model.model.*`, transformers 5's `model.language_model.*`): `rename` maps
/// each checkpoint name to the variable name, and `opts.ignore_unexpected` sees the renamed
/// name. Two checkpoint tensors landing on one variable is an error, since one would silently
/// overwrite the other.
pub fn load_into_renamed(
    vs: &VarStore,
    dir: &Path,
    opts: &LoadOptions,
    rename: &dyn Fn(&str) -> Cow<'_, str>,
) -> Result<()> {
    let vars: HashMap<String, Tensor> = vs.variables();
    let mut filled: HashSet<String> = HashSet::new();
    let mut unexpected: Vec<String> = Vec::new();
    for file in checkpoint_files(dir)? {
        let handle =
            std::fs::File::open(&file).with_context(|| format!("opening {}", file.display()))?;
        // SAFETY: the mapping is read-only and lives until every view built on it is dropped
        // at the end of this loop iteration.
        let mmap = unsafe { memmap2::Mmap::map(&handle) }
            .with_context(|| format!("mapping {}", file.display()))?;
        let st = SafeTensors::deserialize(&mmap)
            .with_context(|| format!("{} is not a valid safetensors file", file.display()))?;
        for (name, view) in st.tensors() {
            let target = rename(&name).into_owned();
            let Some(var) = vars.get(&target) else {
                if !(opts.ignore_unexpected)(&target) {
                    unexpected.push(name);
                }
                continue;
            };
            if filled.contains(&target) {
                bail!(
                    "{}: tensor {name} fills {target}, which another checkpoint tensor already filled",
                    file.display()
                );
            }
            let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            if var.size() != shape {
                bail!(
                    "{}: tensor {name} has shape {shape:?} but the model built from config.json expects {:?}; is this checkpoint for another model or config?",
                    file.display(),
                    var.size()
                );
            }
            let kind =
                kind_of(view.dtype()).with_context(|| format!("{}: {name}", file.display()))?;
            // A weight the quantising loader fills later (see `quant::load`): checked here,
            // copied (or quantised) there.
            if crate::quant::defer_source(&target, &file, &name) {
                filled.insert(target);
                continue;
            }
            let src = tensor_view(view.data(), &shape, kind);
            tch::no_grad(|| var.shallow_clone().copy_(&src));
            filled.insert(target);
        }
    }
    let mut missing: Vec<&String> = vars.keys().filter(|k| !filled.contains(*k)).collect();
    missing.sort();
    if !missing.is_empty() {
        bail!(
            "checkpoint in {} lacks {} tensor(s) the model needs, e.g. {}; is it a checkpoint of another model?",
            dir.display(),
            missing.len(),
            missing.iter().take(5).map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
        );
    }
    if !unexpected.is_empty() {
        unexpected.sort();
        bail!(
            "checkpoint in {} has {} tensor(s) the model does not, e.g. {}; is it a checkpoint of another model?",
            dir.display(),
            unexpected.len(),
            unexpected.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
        );
    }
    Ok(())
}

/// A CPU tensor viewing `data` without copying. The caller must drop it before `data`.
pub(crate) fn tensor_view(data: &[u8], shape: &[i64], kind: Kind) -> Tensor {
    let mut strides = vec![1i64; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    // SAFETY: `data` holds exactly prod(shape) elements of `kind` (safetensors validated the
    // byte length against the header), and the view never outlives the borrow.
    unsafe { Tensor::from_blob(data.as_ptr(), shape, &strides, kind, tch::Device::Cpu) }
}
