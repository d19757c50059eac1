//! Command-line parsing and dispatch.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use figment::value::Value;
use lmms_ft_core::config::{Config, ConfigError, Sources};
use lmms_ft_core::hub::ResolveError;
use lmms_ft_core::logging::LogFormat;
use lmms_ft_core::registry::{self, RegistryError};

use crate::commands;
use lmms_ft_core::runtime;

#[derive(Parser, Debug)]
#[command(
    name = "lmms-ft",
    version,
    about = "Fine-tune large multimodal models on libtorch"
)]
pub struct Cli {
    /// Log format: human or json.
    #[arg(long, global = true, default_value = "human")]
    pub log_format: LogFormat,
    /// More detailed logs (RUST_LOG overrides).
    #[arg(short, long, global = true)]
    pub verbose: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// List supported models with their Hub ids, families and implementation status.
    ListModels {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Inspect configuration.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Quickstart: train a tiny Qwen2-VL from scratch on generated pictures of coloured
    /// shapes (CPU, a few minutes), then report its held-out accuracy.
    Demo {
        /// Where the model, data samples and trained weights go.
        #[arg(long, default_value = "lmms-ft-demo")]
        out: PathBuf,
        #[arg(long, default_value_t = 500)]
        steps: u64,
        #[arg(long, default_value_t = 2000)]
        train_samples: usize,
        #[arg(long, default_value_t = 100)]
        test_samples: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Check that libtorch loads, computes and differentiates on the chosen device.
    Doctor {
        #[arg(long, default_value = "auto")]
        device: String,
    },
    /// Fine-tune a model (full, LoRA or QLoRA).
    Train {
        #[command(flatten)]
        config: ConfigArgs,
        /// Continue from a checkpoint: `--resume` (the newest in the output directory) or
        /// `--resume DIR` (train.resume).
        #[arg(long, num_args = 0..=1, default_missing_value = "latest", value_name = "DIR")]
        resume: Option<String>,
        /// Start a new run in an output directory that holds another run, removing that
        /// run's outputs and checkpoints first (train.overwrite).
        #[arg(long, conflicts_with = "resume")]
        overwrite: bool,
    },
    /// Per-sample loss of a model on a dataset, written as JSON; with --generate also the
    /// answers it generates, scored against the references.
    Evaluate {
        #[command(flatten)]
        config: ConfigArgs,
        /// Where to write the per-sample results.
        #[arg(long)]
        json: Option<PathBuf>,
        /// LoRA adapter directory, applied on the fly (no merge).
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// Also generate each sample's last assistant turn and score it (exact match,
        /// token F1, ROUGE-L).
        #[arg(long)]
        generate: bool,
        /// Per-sample predictions as JSONL (default: `predictions.jsonl` beside --json).
        #[arg(long)]
        predictions: Option<PathBuf>,
        /// Prompts generated together.
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
        #[command(flatten)]
        generation: GenerationArgs,
    },
    /// Check every record of a dataset before training.
    ValidateData(ConfigArgs),
    /// Generate a reply for a prompt with optional images or video.
    Generate {
        #[command(flatten)]
        config: ConfigArgs,
        #[arg(long)]
        adapter: Option<PathBuf>,
        #[arg(long)]
        image: Vec<PathBuf>,
        #[arg(long)]
        video: Option<PathBuf>,
        #[arg(long)]
        prompt: String,
        /// System prompt (the template's default when omitted).
        #[arg(long)]
        system: Option<String>,
        #[command(flatten)]
        generation: GenerationArgs,
        /// Print a JSON object (text, token ids, whether a stop token ended it).
        #[arg(long)]
        json: bool,
    },
    /// Convert a checkpoint of another layout into a standard Hugging Face directory:
    /// `llava-original` (the original LLaVA repository's `LlavaLlamaForCausalLM`).
    Convert {
        /// The layout of --model (llava-original).
        layout: String,
        #[arg(long)]
        model: PathBuf,
        /// The vision tower's directory (default: the checkpoint's mm_vision_tower, as a
        /// local directory or from the Hugging Face cache).
        #[arg(long)]
        vision_tower: Option<PathBuf>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Talk to a model: an interactive multi-turn session that streams each reply. Reads one
    /// user turn per line from stdin (a terminal or a pipe); `/image PATH` adds an image to
    /// the next turn, `/video PATH` a video, `/reset` starts over, `/exit` ends.
    Chat {
        #[command(flatten)]
        config: ConfigArgs,
        /// LoRA adapter directory, applied on the fly (no merge).
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// Images for the first turn.
        #[arg(long)]
        image: Vec<PathBuf>,
        /// System prompt (the template's default when omitted).
        #[arg(long)]
        system: Option<String>,
        #[command(flatten)]
        generation: GenerationArgs,
        /// Print one JSON object per reply (text, token ids, stopped) instead of streaming.
        #[arg(long)]
        json: bool,
    },
    /// Merge a LoRA adapter into its base model.
    MergeLora {
        #[arg(long)]
        base: PathBuf,
        #[arg(long)]
        adapter: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
}

/// Decoding settings shared by `generate`, `chat` and `evaluate --generate`.
#[derive(Args, Debug, Clone)]
pub struct GenerationArgs {
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl GenerationArgs {
    pub fn options(&self) -> lmms_ft_core::generate::GenerateOptions {
        lmms_ft_core::generate::GenerateOptions {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Print the resolved configuration (defaults < file < env < flags) as TOML.
    Show(ConfigArgs),
}

/// Flags shared by every command that reads a run configuration. Each dedicated flag is a
/// shorthand for one `--set`.
#[derive(Args, Debug, Default)]
pub struct ConfigArgs {
    /// TOML configuration file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override any key: `--set train.learning_rate=2e-5` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Model id or alias (model.id).
    #[arg(long)]
    pub model: Option<String>,
    /// Local model directory (model.path).
    #[arg(long)]
    pub model_path: Option<PathBuf>,
    /// Training dataset (data.train).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Image root (data.image_folder).
    #[arg(long)]
    pub image_folder: Option<PathBuf>,
    /// Video root (data.video_folder).
    #[arg(long)]
    pub video_folder: Option<PathBuf>,
    /// Output directory (train.output_dir).
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
}

impl ConfigArgs {
    pub fn sources(&self) -> Sources {
        let mut flags: Vec<(String, Value)> = Vec::new();
        let path = |p: &PathBuf| Value::from(p.to_string_lossy().into_owned());
        if let Some(m) = &self.model {
            flags.push(("model.id".into(), Value::from(m.clone())));
        }
        for (key, p) in [
            ("model.path", &self.model_path),
            ("data.train", &self.data),
            ("data.image_folder", &self.image_folder),
            ("data.video_folder", &self.video_folder),
            ("train.output_dir", &self.output_dir),
        ] {
            if let Some(p) = p {
                flags.push((key.into(), path(p)));
            }
        }
        Sources {
            file: self.config.clone(),
            env: true,
            flags,
            sets: self.sets.clone(),
        }
    }

    pub fn load(&self) -> Result<Config> {
        Ok(self.sources().load()?)
    }
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::ListModels { json } => list_models(json),
        Command::Config {
            command: ConfigCommand::Show(args),
        } => {
            let cfg = args.load()?;
            print!(
                "{}",
                toml::to_string_pretty(&cfg).context("rendering config")?
            );
            Ok(())
        }
        Command::Demo {
            out,
            steps,
            train_samples,
            test_samples,
            seed,
        } => crate::demo::run(&crate::demo::DemoOptions {
            out,
            steps,
            train_samples,
            test_samples,
            seed,
        }),
        Command::Doctor { device } => {
            let device = runtime::parse_device(&device)?;
            let report = runtime::self_check(device)?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            anyhow::ensure!(
                report.autograd_check_error < 1e-3,
                "libtorch autograd check failed: gradient error {}",
                report.autograd_check_error
            );
            tracing::info!(device = %report.device, "libtorch self-check passed");
            Ok(())
        }
        Command::Evaluate {
            config,
            json,
            adapter,
            generate,
            predictions,
            batch_size,
            generation,
        } => commands::evaluate(
            &config.load()?,
            &commands::EvaluateRequest {
                json,
                adapter,
                generate: generate.then(|| commands::GenerateEval {
                    options: generation.options(),
                    batch_size,
                    predictions,
                }),
            },
        ),
        Command::ValidateData(args) => commands::validate_data(&args.load()?),
        Command::Generate {
            config,
            adapter,
            image,
            video,
            prompt,
            system,
            generation,
            json,
        } => commands::generate(
            &config.load()?,
            &commands::GenerateRequest {
                adapter,
                images: image,
                video,
                prompt,
                system,
                options: generation.options(),
                json,
            },
        ),
        Command::Chat {
            config,
            adapter,
            image,
            system,
            generation,
            json,
        } => crate::chat::run(
            &config.load()?,
            &crate::chat::ChatRequest {
                adapter,
                images: image,
                system,
                options: generation.options(),
                json,
            },
        ),
        Command::Train {
            config,
            resume,
            overwrite,
        } => {
            let mut sources = config.sources();
            if let Some(resume) = resume {
                sources
                    .flags
                    .push(("train.resume".into(), Value::from(resume)));
            }
            if overwrite {
                sources
                    .flags
                    .push(("train.overwrite".into(), Value::from(true)));
            }
            commands::train(&sources.load()?)
        }
        Command::MergeLora { base, adapter, out } => commands::merge_lora(&base, &adapter, &out),
        Command::Convert {
            layout,
            model,
            vision_tower,
            out,
        } => crate::convert::convert(&layout, &model, vision_tower.as_deref(), &out),
    }
}

fn list_models(json: bool) -> Result<()> {
    let rows = registry::model_table();
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<30} {:<44} {:<17} {:<12} {:<6} aliases",
        "id", "hub id", "family", "status", "video"
    );
    for r in rows {
        println!(
            "{:<30} {:<44} {:<17} {:<12} {:<6} {}",
            r.id,
            r.hub_id,
            r.family,
            r.status.to_string(),
            if r.video { "yes" } else { "no" },
            r.aliases.join(", ")
        );
    }
    Ok(())
}

/// A next step for the user, chosen by the kind of error.
pub fn hint_for(e: &anyhow::Error) -> String {
    if e.downcast_ref::<ConfigError>().is_some() {
        return "`lmms-ft config show --config FILE` prints the resolved configuration; configs/ has a commented example per family".into();
    }
    if let Some(r) = e.downcast_ref::<RegistryError>() {
        return match r {
            RegistryError::NotImplemented { .. } => {
                "`lmms-ft list-models` shows which families are implemented".into()
            }
            _ => "`lmms-ft list-models` lists every supported id and alias".into(),
        };
    }
    if e.downcast_ref::<ResolveError>().is_some() {
        return "pass --model-path DIR to use a local checkpoint".into();
    }
    "run with -v for more detail".into()
}
