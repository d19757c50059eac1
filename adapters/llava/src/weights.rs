//! Loading LLaVA checkpoints whose tensor names come in several layouts: the llava-hf Hub
//! one (`language_model.model.*`, `language_model.lm_head.weight`,
//! `vision_tower.vision_model.*`), what `transformers` 5 `save_pretrained` writes
//! (`vision_tower.*` without `vision_model`), and the runtime module paths
//! (`model.language_model.*`, `model.vision_tower.*`, `lm_head.weight`). Every name is mapped
//! to the Hub layout the model's variables use, then copied from the memory-mapped shard.
//!
//! This is the core's `weights::load_into` plus a renaming step; it lives here because the
//! core loader matches names exactly.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use anyhow::{bail, Context, Result};
use lmms_ft_core::weights::{checkpoint_files, kind_of};
use safetensors::SafeTensors;
use tch::{nn::VarStore, Tensor};

/// Maps any accepted checkpoint name to the Hub layout.
pub fn canonical_name(name: &str) -> String {
    if let Some(rest) = name.strip_prefix("model.language_model.") {
        return format!("language_model.model.{rest}");
    }
    if name == "lm_head.weight" {
        return "language_model.lm_head.weight".into();
    }
    let vision = name
        .strip_prefix("model.vision_tower.")
        .or_else(|| name.strip_prefix("vision_tower."));
    if let Some(rest) = vision {
        let rest = rest.strip_prefix("vision_model.").unwrap_or(rest);
        return format!("vision_tower.vision_model.{rest}");
    }
    if let Some(rest) = name.strip_prefix("model.") {
        if rest.starts_with("multi_modal_projector.") || rest == "image_newline" {
            return rest.to_string();
        }
    }
    name.to_string()
}

/// Copies every checkpoint tensor of `dir` into the variable its canonical name denotes.
/// Missing, unexpected (unless `ignore` says so, by canonical name), duplicated or
/// mis-shaped tensors are errors that name the tensor and the file.
pub fn load_llava(vs: &VarStore, dir: &Path, ignore: &dyn Fn(&str) -> bool) -> Result<()> {
    let vars: HashMap<String, Tensor> = vs.variables();
    let mut filled: HashSet<String> = HashSet::new();
    let mut unexpected: Vec<String> = Vec::new();
    for file in checkpoint_files(dir)? {
        let handle =
            std::fs::File::open(&file).with_context(|| format!("opening {}", file.display()))?;
        // SAFETY: read-only mapping, dropped at the end of this iteration after every view
        // built on it.
        let mmap = unsafe { memmap2::Mmap::map(&handle) }
            .with_context(|| format!("mapping {}", file.display()))?;
        let st = SafeTensors::deserialize(&mmap)
            .with_context(|| format!("{} is not a valid safetensors file", file.display()))?;
        for (name, view) in st.tensors() {
            let canonical = canonical_name(&name);
            let Some(var) = vars.get(&canonical) else {
                if !ignore(&canonical) {
                    unexpected.push(name);
                }
                continue;
            };
            if !filled.insert(canonical.clone()) {
                bail!(
                    "{}: tensor {name} fills {canonical}, which another tensor already filled",
                    file.display()
                );
            }
            let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            if var.size() != shape {
                bail!(
                    "{}: tensor {name} has shape {shape:?} but the model built from config.json expects {:?}",
                    file.display(),
                    var.size()
                );
            }
            let kind =
                kind_of(view.dtype()).with_context(|| format!("{}: {name}", file.display()))?;
            let src = tensor_view(view.data(), &shape, kind);
            tch::no_grad(|| var.shallow_clone().copy_(&src));
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

/// A CPU tensor viewing `data` without copying; the caller drops it before `data`.
fn tensor_view(data: &[u8], shape: &[i64], kind: tch::Kind) -> Tensor {
    let mut strides = vec![1i64; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    // SAFETY: safetensors validated that `data` holds prod(shape) elements of `kind`, and the
    // view does not outlive the borrow.
    unsafe { Tensor::from_blob(data.as_ptr(), shape, &strides, kind, tch::Device::Cpu) }
}

#[cfg(test)]
mod tests {
    use super::canonical_name;

    /// The llava-hf Hub names, transformers 5's `save_pretrained` names and its runtime
    /// module paths all land on the same variable.
    #[test]
    fn every_layout_maps_to_the_hub_names() {
        let cases = [
            (
                "language_model.model.layers.0.mlp.up_proj.weight",
                "language_model.model.layers.0.mlp.up_proj.weight",
            ),
            (
                "model.language_model.layers.0.mlp.up_proj.weight",
                "language_model.model.layers.0.mlp.up_proj.weight",
            ),
            (
                "language_model.lm_head.weight",
                "language_model.lm_head.weight",
            ),
            ("lm_head.weight", "language_model.lm_head.weight"),
            (
                "vision_tower.vision_model.pre_layrnorm.bias",
                "vision_tower.vision_model.pre_layrnorm.bias",
            ),
            (
                "vision_tower.pre_layrnorm.bias",
                "vision_tower.vision_model.pre_layrnorm.bias",
            ),
            (
                "model.vision_tower.encoder.layers.1.mlp.fc1.weight",
                "vision_tower.vision_model.encoder.layers.1.mlp.fc1.weight",
            ),
            (
                "model.multi_modal_projector.linear_1.weight",
                "multi_modal_projector.linear_1.weight",
            ),
            (
                "multi_modal_projector.linear_2.bias",
                "multi_modal_projector.linear_2.bias",
            ),
            ("model.image_newline", "image_newline"),
            ("image_newline", "image_newline"),
        ];
        for (name, expected) in cases {
            assert_eq!(canonical_name(name), expected, "{name}");
        }
    }
}
