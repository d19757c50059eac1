//! LoRA with PEFT semantics: which linear layers get an adapter, how adapters are initialised
//! and scaled, and ([`io`]) the PEFT on-disk layout so adapters move freely between lmms-ft
//! and `peft`.

pub mod io;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use regex::Regex;
use tch::{Kind, Tensor};

use crate::config::{ComponentMode, LoraSection, TargetModules};
use crate::family::Trainable;
use crate::nn::{Linear, LoraAdapter};
use crate::part::PerPart;

/// Which modules an adapter goes on.
#[derive(Debug, Clone)]
pub enum Targets {
    /// Every linear layer of the parts in `lora` mode except the output head (`lm_head`).
    AllLinear,
    /// Names equal to an entry or ending in `.` + entry.
    Suffixes(Vec<String>),
    /// A regex the whole runtime module name must match (`re.fullmatch` in PEFT).
    Regex(Regex),
}

impl Targets {
    pub fn from_config(t: &TargetModules) -> Result<Targets> {
        Ok(match t {
            TargetModules::Names(v) if v.is_empty() => Targets::AllLinear,
            TargetModules::Names(v) if v.len() == 1 && v[0] == "all-linear" => Targets::AllLinear,
            TargetModules::Names(v) => Targets::Suffixes(v.clone()),
            TargetModules::Regex(s) if s == "all-linear" => Targets::AllLinear,
            TargetModules::Regex(s) => Targets::Regex(
                Regex::new(&format!("^(?:{s})$"))
                    .with_context(|| format!("lora.target_modules: invalid regex {s:?}"))?,
            ),
        })
    }

    /// PEFT's rule, applied to the Hub and the runtime name (suffixes agree on both; a regex
    /// is written against the runtime names `peft` sees).
    pub fn matches(&self, hub: &str, runtime: &str) -> bool {
        match self {
            Targets::AllLinear => !is_output_head(hub),
            Targets::Suffixes(list) => list
                .iter()
                .any(|t| suffix_match(hub, t) || suffix_match(runtime, t)),
            Targets::Regex(re) => re.is_match(runtime),
        }
    }
}

/// `key == target` or `key` ends with `.target`, as PEFT's `check_target_module_exists`.
pub fn suffix_match(key: &str, target: &str) -> bool {
    key == target || key.ends_with(&format!(".{target}"))
}

fn is_output_head(name: &str) -> bool {
    name == "lm_head" || name.ends_with(".lm_head")
}

/// A resolved LoRA configuration.
#[derive(Debug, Clone)]
pub struct LoraSpec {
    pub r: i64,
    pub alpha: f64,
    pub dropout: f64,
    pub use_rslora: bool,
    pub targets: Targets,
    pub modules_to_save: Vec<String>,
}

impl LoraSpec {
    pub fn from_config(c: &LoraSection) -> Result<LoraSpec> {
        if c.r == 0 {
            bail!("lora.r must be at least 1");
        }
        if !(0.0..1.0).contains(&c.dropout) {
            bail!("lora.dropout must be in [0, 1), got {}", c.dropout);
        }
        Ok(LoraSpec {
            r: c.r as i64,
            alpha: c.alpha,
            dropout: c.dropout,
            use_rslora: c.use_rslora,
            targets: Targets::from_config(&c.target_modules)?,
            modules_to_save: c.modules_to_save.clone(),
        })
    }

    /// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA (PEFT's `scaling`).
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// Whether a parameter (Hub name) belongs to a `modules_to_save` module and so trains
    /// fully and is saved with the adapter. PEFT wraps the whole matching module, so an entry
    /// naming a container (LLaVA's `multi_modal_projector`) covers every parameter below it,
    /// not only those whose immediate module matches.
    pub fn saves_module_of(&self, param: &str) -> bool {
        let mut rest = param;
        while let Some((module, _)) = rest.rsplit_once('.') {
            if self.modules_to_save.iter().any(|t| suffix_match(module, t)) {
                return true;
            }
            rest = module;
        }
        false
    }
}

/// A fresh adapter as PEFT initialises one: `lora_A` Kaiming-uniform with `a = √5` (bound
/// `1/√in`), `lora_B` zero, so training starts from the base model. Uses torch's global
/// generator, which the trainer seeds.
pub fn new_adapter(linear: &Linear, spec: &LoraSpec, training: &Arc<AtomicBool>) -> LoraAdapter {
    let device = linear.weight.device();
    let (inp, out) = (linear.in_features(), linear.out_features());
    let bound = 1.0 / (inp as f64).sqrt();
    let a = Tensor::empty([spec.r, inp], (Kind::Float, device)).uniform_(-bound, bound);
    let b = Tensor::zeros([out, spec.r], (Kind::Float, device));
    LoraAdapter {
        a: a.set_requires_grad(true),
        b: b.set_requires_grad(true),
        scaling: spec.scaling(),
        dropout: spec.dropout,
        training: training.clone(),
    }
}

/// Whether a linear layer gets an adapter: its part is in `lora` mode and it matches the
/// targets.
pub fn is_target(
    model: &dyn Trainable,
    hub: &str,
    spec: &LoraSpec,
    modes: &PerPart<ComponentMode>,
) -> bool {
    let mode = modes[model.component(hub)];
    mode == ComponentMode::Lora && spec.targets.matches(hub, &model.runtime_name(hub))
}

/// Attaches fresh adapters to every target linear that has none yet. Returns the adapted
/// module names (Hub names); no match at all is an error, as in PEFT.
pub fn attach(
    model: &mut dyn Trainable,
    spec: &LoraSpec,
    modes: &PerPart<ComponentMode>,
    training: &Arc<AtomicBool>,
) -> Result<Vec<String>> {
    let mut names = Vec::new();
    model.visit_linears(&mut |name, _| names.push(name.to_string()));
    let targets: Vec<String> = names
        .into_iter()
        .filter(|n| is_target(model, n, spec, modes))
        .collect();
    if targets.is_empty() {
        bail!(
            "LoRA target modules {:?} match no linear layer of the parts in lora mode; \
             module names look like `model.language_model.layers.0.self_attn.q_proj`",
            spec.targets
        );
    }
    model.visit_linears(&mut |name, linear| {
        if linear.lora.is_none() && targets.iter().any(|t| t == name) {
            linear.lora = Some(new_adapter(linear, spec, training));
        }
    });
    Ok(targets)
}

/// Folds every adapter into its base weight (PEFT's `merge_and_unload`). Fails on a 4-bit
/// base (see [`Linear::merge_lora`]).
pub fn merge_all(model: &mut dyn Trainable) -> Result<usize> {
    let mut merged = 0;
    let mut result = Ok(());
    model.visit_linears(&mut |name, linear| {
        if result.is_ok() && linear.lora.is_some() {
            result = linear
                .merge_lora()
                .with_context(|| format!("merging the adapter of {name}"));
            merged += 1;
        }
    });
    result.map(|()| merged)
}
