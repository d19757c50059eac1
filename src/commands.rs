//! The commands that open a model or a dataset: `train`, `merge-lora`, `evaluate` and
//! `validate-data`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use lmms_ft_core::compose;
use lmms_ft_core::config::{Config, Precision};
use lmms_ft_core::data::prepare::{dataset_options, prepare, MediaOptions};
use lmms_ft_core::data::validate::{validate_dataset, Checks, MediaCheck};
use lmms_ft_core::data::video::load_video;
use lmms_ft_core::eval::answers::generate_answers;
use lmms_ft_core::eval::evaluate as run_evaluation;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use lmms_ft_core::data::media::load_image;
use lmms_ft_core::data::{Conversation, DecodedMedia, Part, Role, Turn};
use lmms_ft_core::family::{
    DynFamily, OpenOptions, Pipeline, PreparedConversation, ProcessorOptions,
};
use lmms_ft_core::hub::{self, CacheEnv};
use lmms_ft_core::peft;
use lmms_ft_core::peft::io::load_adapter;
use lmms_ft_core::registry::{self, RegistryError};
use lmms_ft_core::runtime;
use lmms_ft_core::train::batches::BatchLoad;
use lmms_ft_core::train::run::{read_records, Outcome};
use tch::{Device, Kind};

use crate::cli::{EvaluateArgs, GenerateArgs};

/// Config → model directory and the registered family that loads it: `model.path` if set
/// (the family comes from its `config.json`), else `model.id` through the Hugging Face cache,
/// or, with `model.kind`, a skeleton directory the registered composer of that kind writes
/// under `train.output_dir` (see [`lmms_ft_core::compose`]). A directory in a registered
/// foreign layout is read through the skeleton its adapter writes there too. The other
/// `[model]` keys are the composer's or the layout's settings; with neither, any is an error.
pub fn resolve_model(cfg: &Config) -> Result<(PathBuf, Implemented)> {
    let m = &cfg.model;
    if let Some(kind) = &m.kind {
        anyhow::ensure!(
            m.id.is_none() && m.path.is_none(),
            "model.kind = \"{kind}\" builds the model from its parts; remove model.id / model.path (or model.kind to load a checkpoint)"
        );
        let composer = compose::composer(kind)?;
        let dir = cfg.train.output_dir.join(COMPOSED_DIR);
        (composer.compose)(&m.settings, cfg.train.seed, &dir)
            .with_context(|| format!("composing a `{kind}` model"))?;
        let (family, _) = family_of_dir(&dir)?;
        return Ok((dir, family));
    }
    // Before resolving: a key no layout takes is refused whatever the directory holds.
    let layout_keys: Vec<&str> = compose::layouts()
        .iter()
        .flat_map(|l| l.settings.iter().copied())
        .collect();
    refuse_settings(m, &layout_keys)?;
    let dir = match (&cfg.model.id, &cfg.model.path) {
        (Some(id), path) => {
            let entry = registry::resolve_model(id)?;
            registry::implementation(entry)?;
            hub::resolve_model_dir(entry.hub_id, path.as_deref(), &CacheEnv::from_process())?
        }
        (None, Some(path)) => {
            hub::resolve_model_dir("(local)", Some(path), &CacheEnv::from_process())?
        }
        (None, None) => anyhow::bail!(
            "no model given: pass --model ID or --model-path DIR (or set model.id in the config)"
        ),
    };
    // A checkpoint of another layout is read through the skeleton its adapter writes,
    // converting in memory, with the layout's settings.
    let layout = layout_of_dir(&dir)?;
    refuse_settings(m, layout.map_or(&[][..], |l| l.settings))?;
    if let Some(layout) = layout {
        let skeleton = cfg.train.output_dir.join(COMPOSED_DIR);
        (layout.skeleton)(&dir, &m.settings, &skeleton).with_context(|| {
            format!(
                "reading {} as a `{}` checkpoint",
                dir.display(),
                layout.name
            )
        })?;
        let (family, _) = family_of_dir(&skeleton)?;
        return Ok((skeleton, family));
    }
    let (family, _) = family_of_dir(&dir)?;
    Ok((dir, family))
}

/// Refuses `[model]` settings that nothing reads: a checkpoint takes none (a layout only
/// its own), so a composer's key without `model.kind` is named with the kinds that take it.
fn refuse_settings(m: &lmms_ft_core::config::ModelSection, allowed: &[&str]) -> Result<()> {
    let Some(key) = m.settings.keys().find(|k| !allowed.contains(k)) else {
        return Ok(());
    };
    let kinds: Vec<&str> = compose::composers()
        .into_iter()
        .filter(|c| c.settings.contains(&key))
        .map(|c| c.kind)
        .collect();
    if kinds.is_empty() {
        anyhow::bail!(
            "unknown config key `model.{key}`; [model] takes id, path and kind, plus the settings of a registered composer (model.kind) or checkpoint layout"
        )
    }
    anyhow::bail!(
        "model.{key} describes a model to compose and needs model.kind (one of: {})",
        kinds.join(", ")
    )
}

/// The registered foreign layout of a model directory's `config.json`, if any.
fn layout_of_dir(dir: &Path) -> Result<Option<&'static compose::LayoutEntry>> {
    let path = dir.join("config.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok(compose::layout_of(&json))
}

/// Where a composed model's skeleton (config, tokenizer, processor; no weights) is written,
/// under `train.output_dir`.
pub const COMPOSED_DIR: &str = "composed";

/// The `config.json` of a model directory and the implemented family that loads it.
pub(crate) fn family_of_dir(dir: &Path) -> Result<(Implemented, serde_json::Value)> {
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path)
        .with_context(|| format!("reading {}", config_path.display()))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("parsing {}", config_path.display()))?;
    let entry = registry::family_for_config(&json)?;
    let implementation = entry
        .implementation
        .ok_or_else(|| RegistryError::NotImplemented {
            id: dir.display().to_string(),
            family: entry.name.to_string(),
            status: entry.status,
        })?;
    let found = Implemented {
        name: entry.name,
        family: implementation,
        entry,
    };
    Ok((found, json))
}

/// A registered family that has an implementation: its name (for logs), its code and its
/// registry entry (the modes it trains with).
#[derive(Clone, Copy)]
pub struct Implemented {
    pub name: &'static str,
    pub family: &'static dyn DynFamily,
    pub entry: &'static registry::FamilyEntry,
}

/// Device and dtype from `train.device` / `train.precision`: bf16 on CUDA, fp32 on CPU for
/// `auto`.
pub fn device_and_kind(cfg: &Config) -> Result<(Device, Kind)> {
    let device = runtime::parse_device(&cfg.train.device)?;
    let kind = match cfg.train.precision {
        Precision::Fp32 => Kind::Float,
        Precision::Bf16 => Kind::BFloat16,
        Precision::Auto if device.is_cuda() => Kind::BFloat16,
        Precision::Auto => Kind::Float,
    };
    Ok((device, kind))
}

/// Opens the configured model for inference (no gradients, evaluation mode), with a LoRA
/// adapter applied on the fly when given: no merge, so the base stays as it is on disk. The
/// adapter may come from lmms-ft or `peft` (runtime or transformers-4 Hub key layouts).
pub fn open_for_inference(cfg: &Config, adapter: Option<&Path>) -> Result<Box<dyn Pipeline>> {
    let (dir, family) = resolve_model(cfg)?;
    let (device, kind) = device_and_kind(cfg)?;
    let mut pipeline = family.family.open(
        &dir,
        OpenOptions {
            device,
            kind,
            processor: ProcessorOptions::from_config(&cfg.data),
        },
        None,
    )?;
    if let Some(adapter) = adapter {
        // Inference mode: the adapters' dropout stays off.
        let training = Arc::new(AtomicBool::new(false));
        let spec = load_adapter(pipeline.trainable(), adapter, &training)
            .with_context(|| format!("loading adapter {}", adapter.display()))?;
        tracing::info!(adapter = %adapter.display(), r = spec.r, alpha = spec.alpha, "LoRA adapter applied");
    }
    Ok(pipeline)
}

pub fn evaluate(cfg: &Config, req: &EvaluateArgs) -> Result<()> {
    let pipeline = open_for_inference(cfg, req.adapter.as_deref())?;
    let path = cfg
        .data
        .train
        .as_ref()
        .context("no dataset given: pass --data FILE (or set data.train in the config)")?;
    let records = read_records(path, &cfg.data)?;
    let media = MediaOptions::from_config(&cfg.data);
    let (device, _) = device_and_kind(cfg)?;
    // The same encoding, length fitting and loss as evaluation during training, one sample
    // per batch for per-sample losses.
    let load = BatchLoad::new(records, pipeline.batch_builder(), &cfg.data, device);
    let report = run_evaluation(pipeline.as_ref(), &load, 1)?;
    tracing::info!(
        samples = report.samples.len(),
        mean_loss = report.mean_loss,
        "evaluated"
    );
    let mut value = serde_json::to_value(&report)?;
    if req.generate {
        let records: Vec<_> = load.records.iter().cloned().enumerate().collect();
        let answers = generate_answers(
            pipeline.as_ref(),
            &records,
            &media,
            &req.generation.options(),
            req.batch_size,
        )?;
        tracing::info!(
            exact_match = answers.mean.exact_match,
            token_f1 = answers.mean.token_f1,
            rouge_l = answers.mean.rouge_l,
            "generated answers"
        );
        let path = req.predictions.clone().or_else(|| {
            req.report
                .as_ref()
                .map(|j| j.with_file_name("predictions.jsonl"))
        });
        if let Some(path) = &path {
            let mut text = String::new();
            for answer in &answers.samples {
                text.push_str(&serde_json::to_string(answer)?);
                text.push('\n');
            }
            std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        }
        value["generation"] = serde_json::to_value(&answers)?;
    }
    let text = serde_json::to_string_pretty(&value)?;
    match &req.report {
        Some(path) => {
            std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?
        }
        None => println!("{text}"),
    }
    Ok(())
}

pub fn validate_data(cfg: &Config) -> Result<()> {
    let path = cfg
        .data
        .train
        .as_ref()
        .context("no dataset given: pass --data FILE (or set data.train in the config)")?;
    let media = MediaOptions::from_config(&cfg.data);
    let has_model = cfg.model.id.is_some() || cfg.model.path.is_some() || cfg.model.kind.is_some();
    let data_pipeline = if has_model {
        let (dir, family) = resolve_model(cfg)?;
        let implementation = family.family;
        Some(implementation.open_data(&dir, &ProcessorOptions::from_config(&cfg.data))?)
    } else {
        tracing::warn!("no --model given: token lengths and max_length are not checked");
        None
    };
    let video_check =
        |p: &Path| -> Result<()> { load_video(p, &media.video).map(|_| ()).map_err(Into::into) };
    let token_length = |record: &lmms_ft_core::data::dataset::Record| -> Result<usize> {
        let pipeline = data_pipeline.as_ref().expect("only set with a model");
        pipeline.encoded_length(&prepare(record, &media)?)
    };
    let checks = Checks {
        media: MediaCheck::Decode,
        video_check: Some(&video_check),
        token_length: data_pipeline.as_ref().map(|_| &token_length as _),
        max_length: data_pipeline.as_ref().map(|_| cfg.data.max_length),
    };
    let report = validate_dataset(path, &dataset_options(&cfg.data), &checks);
    println!("{report}");
    anyhow::ensure!(
        report.is_clean(),
        "{} problem(s) in {}",
        report.problems.len(),
        path.display()
    );
    Ok(())
}

/// One user turn (images, then video, then the prompt, as the dataset convention puts media
/// first), rendered with the same template as training, generated until an end-of-turn token.
pub fn generate(cfg: &Config, req: &GenerateArgs) -> Result<()> {
    let pipeline = open_for_inference(cfg, req.adapter.as_deref())?;
    let media_opts = MediaOptions::from_config(&cfg.data);
    let mut media = DecodedMedia::default();
    let mut parts = Vec::new();
    for (i, path) in req.image.iter().enumerate() {
        media
            .images
            .push(load_image(path, &media_opts.image_limits)?);
        parts.push(Part::Image { index: i });
    }
    if let Some(path) = &req.video {
        media.videos.push(load_video(path, &media_opts.video)?);
        parts.push(Part::Video { index: 0 });
    }
    parts.push(Part::Text {
        text: req.prompt.clone(),
    });
    let mut turns = Vec::new();
    if let Some(system) = &req.system {
        turns.push(Turn::text(Role::System, system.clone()));
    }
    turns.push(Turn {
        role: Role::User,
        parts,
    });
    let prepared = PreparedConversation {
        conversation: Conversation { turns },
        media,
    };
    let out = pipeline.generate(&prepared, &req.generation.options())?;
    if req.json.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("{}", out.text);
    }
    Ok(())
}

pub fn train(cfg: &Config) -> Result<()> {
    let (dir, family) = resolve_model(cfg)?;
    let (device, kind) = device_and_kind(cfg)?;
    let implementation = family.family;
    family.entry.check_mode(cfg.train.mode)?;
    tracing::info!(model = %dir.display(), family = family.name, ?device, ?kind, "train");
    match lmms_ft_core::train::run::train(cfg, implementation, &dir, device, kind)? {
        Outcome::Finished { steps, output_dir } => {
            println!("trained {steps} steps; outputs in {}", output_dir.display())
        }
        Outcome::Interrupted { step, checkpoint } => println!(
            "interrupted after step {step}; checkpoint {} (continue with --resume)",
            checkpoint.display()
        ),
    }
    Ok(())
}

/// Torch dtype a checkpoint was saved in (`dtype` / `torch_dtype` of its config), so a merged
/// model keeps its base's precision.
pub(crate) fn saved_kind(config: &serde_json::Value) -> Kind {
    let dtype = config
        .get("dtype")
        .or_else(|| config.get("torch_dtype"))
        .or_else(|| config.pointer("/text_config/dtype"))
        .or_else(|| config.pointer("/text_config/torch_dtype"))
        .and_then(|v| v.as_str());
    match dtype {
        Some("bfloat16") => Kind::BFloat16,
        Some("float16") => Kind::Half,
        _ => Kind::Float,
    }
}

pub fn merge_lora(base: &Path, adapter: &Path, out: &Path) -> Result<()> {
    let (found, json) = family_of_dir(base)?;
    let mut model = found.family.load_model(
        base,
        OpenOptions {
            device: Device::Cpu,
            kind: saved_kind(&json),
            processor: ProcessorOptions::default(),
        },
    )?;
    let merged = peft::io::merge_lora(model.as_mut(), base, adapter, out, peft::io::SHARD_BYTES)?;
    println!("merged {merged} adapted layers; wrote {}", out.display());
    Ok(())
}
