//! The PEFT adapter layout (`adapter_config.json` + `adapter_model.safetensors`) and
//! Hugging Face weight files.
//!
//! Adapter keys use the module paths `transformers` 5 sees at run time
//! (`base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight`): `peft`
//! given other names does not fail but warns and runs the base model. Loading also accepts
//! the Hub-name keys of transformers-4-era adapters (`base_model.model.model.layers.0...`) and
//! the names a family lists as legacy (the original LLaVA repository's `model.layers.0...`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use safetensors::tensor::{Dtype, View};
use serde_json::json;
use tch::{Kind, Tensor};

use super::{suffix_match, LoraSpec, Targets};
use crate::family::Trainable;
use crate::nn::LoraAdapter;

const PREFIX: &str = "base_model.model.";

/// A CPU copy of a tensor in safetensors form.
pub struct Blob {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl Blob {
    pub fn from_tensor(t: &Tensor) -> Result<Blob> {
        let t = t.detach().to_device(tch::Device::Cpu).contiguous();
        let dtype = match t.kind() {
            Kind::Float => Dtype::F32,
            Kind::BFloat16 => Dtype::BF16,
            Kind::Half => Dtype::F16,
            Kind::Double => Dtype::F64,
            Kind::Int64 => Dtype::I64,
            Kind::Int => Dtype::I32,
            Kind::Uint8 => Dtype::U8,
            Kind::Bool => Dtype::BOOL,
            k => bail!("cannot write a {k:?} tensor to safetensors"),
        };
        let bytes = t.numel() * t.kind().elt_size_in_bytes();
        let mut data = vec![0u8; bytes];
        t.copy_data_u8(&mut data, t.numel());
        Ok(Blob {
            dtype,
            shape: t.size().iter().map(|&d| d as usize).collect(),
            data,
        })
    }
}

impl View for &Blob {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Writes tensors to one safetensors file with `{"format": "pt"}` metadata (transformers
/// refuses files without it), through a temporary name and a rename.
pub fn write_safetensors(path: &Path, tensors: &BTreeMap<String, Blob>) -> Result<()> {
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let tmp = path.with_extension("safetensors.tmp");
    safetensors::serialize_to_file(
        tensors.iter().map(|(k, v)| (k.as_str(), v)),
        Some(meta),
        &tmp,
    )
    .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

/// Reads every tensor of a safetensors file (to CPU).
pub fn read_safetensors(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    Ok(Tensor::read_safetensors(path)
        .with_context(|| format!("reading {}", path.display()))?
        .into_iter()
        .collect())
}

/// Saves the model's adapters (and `modules_to_save` parameters) in PEFT layout.
pub fn save_adapter(
    model: &mut dyn Trainable,
    spec: &LoraSpec,
    dir: &Path,
    base_model: Option<&str>,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut tensors = BTreeMap::new();
    let mut adapted = Vec::new();
    let mut all_linears = Vec::new();
    let mut err = None;
    let mut items: Vec<(String, Tensor, Tensor)> = Vec::new();
    model.visit_linears(&mut |name, linear| {
        all_linears.push(name.to_string());
        if let Some(l) = &linear.lora {
            items.push((name.to_string(), l.a.shallow_clone(), l.b.shallow_clone()));
        }
    });
    for (name, a, b) in items {
        let runtime = model.runtime_name(&name);
        for (which, t) in [("lora_A", &a), ("lora_B", &b)] {
            match Blob::from_tensor(t) {
                Ok(blob) => {
                    tensors.insert(format!("{PREFIX}{runtime}.{which}.weight"), blob);
                }
                Err(e) => err = Some(e),
            }
        }
        adapted.push(runtime);
    }
    if let Some(e) = err {
        return Err(e);
    }
    if adapted.is_empty() {
        bail!("the model has no LoRA adapter to save");
    }
    for (name, var) in model.var_store().variables() {
        if spec.saves_module_of(&name) {
            let runtime = model.runtime_name(&name);
            tensors.insert(format!("{PREFIX}{runtime}"), Blob::from_tensor(&var)?);
        }
    }
    // Every module PEFT could match, not only the linears: a suffix such as `proj` (a vision
    // block's attention output) also names Qwen2-VL's `patch_embed.proj` convolution, which
    // PEFT would then adapt and report as missing from the file.
    let mut modules: Vec<String> = all_linears;
    modules.extend(
        model
            .var_store()
            .variables()
            .keys()
            .filter_map(|n| n.rsplit_once('.').map(|(m, _)| m.to_string())),
    );
    modules.sort();
    modules.dedup();
    let runtime_all: Vec<String> = modules.iter().map(|n| model.runtime_name(n)).collect();
    let config = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": spec.r,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "use_rslora": spec.use_rslora,
        "target_modules": target_list(&adapted, &runtime_all),
        "modules_to_save": if spec.modules_to_save.is_empty() { serde_json::Value::Null } else { json!(spec.modules_to_save) },
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "use_dora": false,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null,
    });
    write_safetensors(&dir.join("adapter_model.safetensors"), &tensors)?;
    let text = serde_json::to_string_pretty(&config)?;
    let path = dir.join("adapter_config.json");
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
}

/// `target_modules` for `adapter_config.json`: the short suffix list (`q_proj`, ...) when it
/// selects exactly the adapted modules among all the model's modules under PEFT's rule, else
/// every full runtime name, so `peft` rebuilds the same layers either way.
fn target_list(adapted: &[String], all: &[String]) -> Vec<String> {
    let mut short: Vec<String> = adapted
        .iter()
        .map(|n| n.rsplit('.').next().unwrap_or(n).to_string())
        .collect();
    short.sort();
    short.dedup();
    let selected = all
        .iter()
        .filter(|n| short.iter().any(|s| suffix_match(n, s)))
        .count();
    if selected == adapted.len() {
        short
    } else {
        let mut full = adapted.to_vec();
        full.sort();
        full
    }
}

/// Reads an adapter directory's `adapter_config.json` into a [`LoraSpec`].
pub fn read_adapter_config(dir: &Path) -> Result<LoraSpec> {
    let path = dir.join("adapter_config.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let peft_type = v
        .get("peft_type")
        .and_then(|t| t.as_str())
        .unwrap_or("LORA");
    if peft_type != "LORA" {
        bail!(
            "{}: peft_type {peft_type} is not supported (only LORA)",
            path.display()
        );
    }
    let r = v
        .get("r")
        .and_then(|r| r.as_i64())
        .with_context(|| format!("{}: missing integer `r`", path.display()))?;
    let alpha = v
        .get("lora_alpha")
        .and_then(|a| a.as_f64())
        .with_context(|| format!("{}: missing number `lora_alpha`", path.display()))?;
    if v.get("use_dora").and_then(|d| d.as_bool()) == Some(true) {
        bail!("{}: DoRA adapters are not supported", path.display());
    }
    let strings = |key: &str| -> Vec<String> {
        match v.get(key) {
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect(),
            _ => Vec::new(),
        }
    };
    Ok(LoraSpec {
        r,
        alpha,
        dropout: v
            .get("lora_dropout")
            .and_then(|d| d.as_f64())
            .unwrap_or(0.0),
        use_rslora: v
            .get("use_rslora")
            .and_then(|d| d.as_bool())
            .unwrap_or(false),
        targets: Targets::Suffixes(strings("target_modules")),
        modules_to_save: strings("modules_to_save"),
    })
}

/// Loads a PEFT adapter onto the model: attaches (or overwrites) an adapter on every linear
/// the file names, and copies `modules_to_save` weights. Keys may use runtime or Hub module
/// names; a key that names no module of the model is an error, not a warning.
pub fn load_adapter(
    model: &mut dyn Trainable,
    dir: &Path,
    training: &Arc<AtomicBool>,
) -> Result<LoraSpec> {
    let spec = read_adapter_config(dir)?;
    let file = dir.join("adapter_model.safetensors");
    let tensors = read_safetensors(&file)?;
    let mut by_name: HashMap<String, String> = HashMap::new(); // runtime or hub → hub
    let mut linears = Vec::new();
    model.visit_linears(&mut |name, _| linears.push(name.to_string()));
    for hub in &linears {
        for alias in model.legacy_names(hub) {
            by_name.insert(alias, hub.clone());
        }
        by_name.insert(model.runtime_name(hub), hub.clone());
        by_name.insert(hub.clone(), hub.clone());
    }
    let vars = model.var_store().variables();
    let mut var_by_name: HashMap<String, String> = HashMap::new();
    for name in vars.keys() {
        for alias in model.legacy_names(name) {
            var_by_name.insert(alias, name.clone());
        }
        var_by_name.insert(model.runtime_name(name), name.clone());
        var_by_name.insert(name.clone(), name.clone());
    }
    let mut pairs: HashMap<String, (Option<Tensor>, Option<Tensor>)> = HashMap::new();
    let mut unknown = Vec::new();
    for (key, t) in &tensors {
        let Some(rest) = key.strip_prefix(PREFIX) else {
            unknown.push(key.clone());
            continue;
        };
        let lora = rest
            .strip_suffix(".lora_A.weight")
            .map(|m| (m, true))
            .or_else(|| rest.strip_suffix(".lora_B.weight").map(|m| (m, false)));
        match lora {
            Some((module, is_a)) => match by_name.get(module) {
                Some(hub) => {
                    let e = pairs.entry(hub.clone()).or_default();
                    if is_a {
                        e.0 = Some(t.shallow_clone());
                    } else {
                        e.1 = Some(t.shallow_clone());
                    }
                }
                None => unknown.push(key.clone()),
            },
            None => match var_by_name.get(rest) {
                Some(var) => {
                    let dst = &vars[var];
                    if dst.size() != t.size() {
                        bail!(
                            "{}: {key} has shape {:?}, the model's {var} is {:?}",
                            file.display(),
                            t.size(),
                            dst.size()
                        );
                    }
                    tch::no_grad(|| dst.shallow_clone().copy_(t));
                }
                None => unknown.push(key.clone()),
            },
        }
    }
    if !unknown.is_empty() {
        bail!(
            "{}: {} key(s) name no module of this model, e.g. {}; is the adapter for another model?",
            file.display(),
            unknown.len(),
            unknown.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
        );
    }
    if pairs.is_empty() {
        bail!("{}: no lora_A / lora_B weights", file.display());
    }
    let mut err = None;
    model.visit_linears(&mut |name, linear| {
        let Some((a, b)) = pairs.get(name) else {
            return;
        };
        let (Some(a), Some(b)) = (a, b) else {
            err = Some(format!(
                "{name}: the adapter has only one of lora_A / lora_B"
            ));
            return;
        };
        let (out, inp) = (linear.out_features(), linear.in_features());
        if a.size() != [spec.r, inp] || b.size() != [out, spec.r] {
            err = Some(format!(
                "{name}: lora_A {:?} / lora_B {:?} do not fit a {out}x{inp} layer with r = {}",
                a.size(),
                b.size(),
                spec.r
            ));
            return;
        }
        let device = linear.weight.device();
        linear.lora = Some(LoraAdapter {
            a: a.to_kind(Kind::Float)
                .to_device(device)
                .set_requires_grad(true),
            b: b.to_kind(Kind::Float)
                .to_device(device)
                .set_requires_grad(true),
            scaling: spec.scaling(),
            dropout: spec.dropout,
            training: training.clone(),
        });
    });
    if let Some(e) = err {
        bail!("{}: {e}", file.display());
    }
    Ok(spec)
}

/// Writes every variable as Hugging Face weights: `model.safetensors`, or above
/// `shard_bytes` numbered shards `model-0000i-of-0000n.safetensors` plus
/// `model.safetensors.index.json`, as `save_pretrained` does.
pub fn save_hf_weights(model: &dyn Trainable, dir: &Path, shard_bytes: usize) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let vars: BTreeMap<String, Tensor> = model.var_store().variables().into_iter().collect();
    let mut shards: Vec<BTreeMap<String, Blob>> = vec![BTreeMap::new()];
    let mut size = 0usize;
    let mut total = 0usize;
    for (name, t) in &vars {
        let blob = Blob::from_tensor(t)?;
        let n = blob.data.len();
        if size > 0 && size + n > shard_bytes {
            shards.push(BTreeMap::new());
            size = 0;
        }
        size += n;
        total += n;
        shards
            .last_mut()
            .expect("one shard")
            .insert(name.clone(), blob);
    }
    if shards.len() == 1 {
        return write_safetensors(&dir.join("model.safetensors"), &shards[0]);
    }
    let count = shards.len();
    let mut weight_map = serde_json::Map::new();
    for (i, shard) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, count);
        for name in shard.keys() {
            weight_map.insert(name.clone(), json!(file));
        }
        write_safetensors(&dir.join(&file), shard)?;
    }
    let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    let path = dir.join("model.safetensors.index.json");
    std::fs::write(&path, serde_json::to_string_pretty(&index)?)
        .with_context(|| format!("writing {}", path.display()))
}

/// Copies config, tokenizer, processor and template files (everything but weights and
/// adapters) from a model directory, so an output directory is self-contained.
pub fn copy_model_files(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for entry in std::fs::read_dir(from).with_context(|| format!("listing {}", from.display()))? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        let weights = name.ends_with(".safetensors")
            || name == "model.safetensors.index.json"
            || name.starts_with("adapter_")
            // Run records (resolved config, compose manifest) describe a run, not the model.
            || name.starts_with("lmms-ft-");
        if path.is_file() && !weights {
            std::fs::copy(&path, to.join(&name))
                .with_context(|| format!("copying {}", path.display()))?;
        }
    }
    Ok(())
}

/// Default shard size of merged checkpoints (as `save_pretrained`'s `max_shard_size`).
pub const SHARD_BYTES: usize = 5 * 1024 * 1024 * 1024;

/// `merge-lora`: loads the adapter in `adapter` onto `model` (already loaded from `base`),
/// folds it into the base weights, and writes a self-contained Hugging Face directory
/// `out` (config, tokenizer and processor files of `base`, merged weights).
pub fn merge_lora(
    model: &mut dyn Trainable,
    base: &Path,
    adapter: &Path,
    out: &Path,
    shard_bytes: usize,
) -> Result<usize> {
    load_adapter(model, adapter, &Arc::new(AtomicBool::new(false)))
        .with_context(|| format!("loading the adapter in {}", adapter.display()))?;
    let merged = super::merge_all(model)?;
    copy_model_files(base, out)?;
    save_hf_weights(model, out, shard_bytes)?;
    Ok(merged)
}
