//! The commands that open a model or a dataset: `evaluate` and `validate-data`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use lmms_ft_core::config::{Config, Precision};
use lmms_ft_core::data::dataset::Dataset;
use lmms_ft_core::data::prepare::{dataset_options, prepare, MediaOptions};
use lmms_ft_core::data::validate::{validate_dataset, Checks, MediaCheck};
use lmms_ft_core::data::video::load_video;
use lmms_ft_core::eval::evaluate as run_evaluation;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use lmms_ft_core::data::media::load_image;
use lmms_ft_core::data::{Conversation, DecodedMedia, Part, Role, Turn};
use lmms_ft_core::family::{OpenOptions, PreparedConversation, ProcessorOptions};
use lmms_ft_core::generate::GenerateOptions;
use lmms_ft_core::hub::{self, CacheEnv};
use lmms_ft_core::peft::io::load_adapter;
use lmms_ft_core::registry::{self, FamilyEntry, RegistryError};
use lmms_ft_core::runtime;
use tch::{Device, Kind};

/// Config → model directory and the registered family that loads it: `model.path` if set
/// (the family comes from its `config.json`), else `model.id` through the Hugging Face cache.
pub fn resolve_model(cfg: &Config) -> Result<(PathBuf, &'static FamilyEntry)> {
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
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path)
        .with_context(|| format!("reading {}", config_path.display()))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("parsing {}", config_path.display()))?;
    let family = registry::family_for_config(&json)?;
    if family.implementation.is_none() {
        return Err(RegistryError::NotImplemented {
            id: dir.display().to_string(),
            family: family.name.to_string(),
            status: family.status,
        }
        .into());
    }
    Ok((dir, family))
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

fn dataset(cfg: &Config) -> Result<Dataset> {
    let path = cfg
        .data
        .train
        .as_ref()
        .context("no dataset given: pass --data FILE (or set data.train in the config)")?;
    Ok(Dataset::open(path, dataset_options(&cfg.data))?)
}

pub fn evaluate(cfg: &Config, json: Option<&Path>) -> Result<()> {
    let (dir, family) = resolve_model(cfg)?;
    let (device, kind) = device_and_kind(cfg)?;
    let implementation = family.implementation.expect("resolve_model checks it");
    let pipeline = implementation.open(
        &dir,
        OpenOptions {
            device,
            kind,
            processor: ProcessorOptions::from_config(&cfg.data),
        },
    )?;
    let report = run_evaluation(
        pipeline.as_ref(),
        &dataset(cfg)?,
        &MediaOptions::from_config(&cfg.data),
    )?;
    tracing::info!(
        samples = report.samples.len(),
        mean_loss = report.mean_loss,
        "evaluated"
    );
    let text = serde_json::to_string_pretty(&report)?;
    match json {
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
    let has_model = cfg.model.id.is_some() || cfg.model.path.is_some();
    let data_pipeline = if has_model {
        let (dir, family) = resolve_model(cfg)?;
        let implementation = family.implementation.expect("resolve_model checks it");
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

/// What `lmms-ft generate` was asked.
pub struct GenerateRequest {
    pub adapter: Option<PathBuf>,
    pub images: Vec<PathBuf>,
    pub video: Option<PathBuf>,
    pub prompt: String,
    pub system: Option<String>,
    pub options: GenerateOptions,
    pub json: bool,
}

/// One user turn (images, then video, then the prompt, as the dataset convention puts media
/// first), rendered with the same template as training, generated until an end-of-turn token.
pub fn generate(cfg: &Config, req: &GenerateRequest) -> Result<()> {
    let (dir, family) = resolve_model(cfg)?;
    let (device, kind) = device_and_kind(cfg)?;
    let implementation = family.implementation.expect("resolve_model checks it");
    let mut pipeline = implementation.open(
        &dir,
        OpenOptions {
            device,
            kind,
            processor: ProcessorOptions::from_config(&cfg.data),
        },
    )?;
    if let Some(adapter) = &req.adapter {
        let training = Arc::new(AtomicBool::new(false));
        load_adapter(pipeline.trainable(), adapter, &training)
            .with_context(|| format!("loading adapter {}", adapter.display()))?;
    }
    let media_opts = MediaOptions::from_config(&cfg.data);
    let mut media = DecodedMedia::default();
    let mut parts = Vec::new();
    for (i, path) in req.images.iter().enumerate() {
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
    let out = pipeline.generate(&prepared, &req.options)?;
    if req.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("{}", out.text);
    }
    Ok(())
}
