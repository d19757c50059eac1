//! Command-line parsing and dispatch.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Arg, Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use figment::value::Value;
use lmms_ft_core::compose;
use lmms_ft_core::config::{Config, ConfigError, ModelSettings, Sources};
use lmms_ft_core::hub::ResolveError;
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
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    /// More detailed logs (RUST_LOG overrides).
    #[arg(short, long, global = true)]
    pub verbose: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// `--log-format`: human-readable lines, or one JSON object per line for log collectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

// Flag conventions, the same in every command: `--json` is a switch that prints JSON on
// stdout; a file or directory written is `--report` / `--predictions` / `--output-dir`; a
// model directory is `--model-path` (a registered id `--model`). Older spellings (`--out`,
// `--base`, `convert --model`, `evaluate --json FILE`) stay as aliases.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// List supported models with their Hub ids, families and implementation status.
    ListModels(JsonArg),
    /// Inspect configuration.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Quickstart: train a tiny model from scratch on generated pictures of coloured shapes
    /// (CPU, a few minutes), then report its held-out accuracy.
    Demo(crate::demo::DemoArgs),
    /// Check that libtorch loads, computes and differentiates on the chosen device.
    Doctor {
        #[arg(long, default_value = "auto")]
        device: String,
    },
    /// Fine-tune a model (full, LoRA or QLoRA).
    Train(TrainArgs),
    /// Per-sample loss of a model on a dataset, written as JSON; with --generate also the
    /// answers it generates, scored against the references.
    Evaluate(EvaluateArgs),
    /// Check every record of a dataset before training.
    ValidateData(RunArgs),
    /// Generate a reply for a prompt with optional images or video.
    Generate(GenerateArgs),
    /// Convert a checkpoint of another layout (one an adapter registers) into a standard
    /// Hugging Face directory. Each layout's settings are flags of this command.
    Convert(ConvertArgs),
    /// Talk to a model: an interactive multi-turn session that streams each reply. Reads one
    /// user turn per line from stdin (a terminal or a pipe); `/image PATH` adds an image to
    /// the next turn, `/video PATH` a video, `/reset` starts over, `/exit` ends.
    Chat(ChatArgs),
    /// Merge a LoRA adapter into its base model.
    MergeLora(MergeLoraArgs),
}

/// `--json`: print JSON instead of text.
#[derive(Args, Debug, Clone, Copy, Default)]
pub struct JsonArg {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Continue from a checkpoint: `--resume` (the newest in the output directory) or
    /// `--resume DIR` (train.resume).
    #[arg(long, num_args = 0..=1, default_missing_value = "latest", value_name = "DIR")]
    pub resume: Option<String>,
    /// Start a new run in an output directory that holds another run, removing that
    /// run's outputs and checkpoints first (train.overwrite).
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
}

#[derive(Args, Debug)]
pub struct EvaluateArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Where to write the per-sample results (default: stdout).
    #[arg(long, alias = "json", value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// LoRA adapter directory, applied on the fly (no merge).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Also generate each sample's last assistant turn and score it (exact match,
    /// token F1, ROUGE-L).
    #[arg(long)]
    pub generate: bool,
    /// Per-sample predictions as JSONL (default: `predictions.jsonl` beside --report).
    #[arg(long, value_name = "FILE")]
    pub predictions: Option<PathBuf>,
    /// Prompts generated together.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[command(flatten)]
    pub generation: GenerationArgs,
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// LoRA adapter directory, applied on the fly (no merge).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    #[arg(long)]
    pub image: Vec<PathBuf>,
    #[arg(long)]
    pub video: Option<PathBuf>,
    #[arg(long)]
    pub prompt: String,
    /// System prompt (the template's default when omitted).
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub generation: GenerationArgs,
    /// Print a JSON object (text, token ids, whether a stop token ended it).
    #[command(flatten)]
    pub json: JsonArg,
}

#[derive(Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// LoRA adapter directory, applied on the fly (no merge).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Images for the first turn.
    #[arg(long)]
    pub image: Vec<PathBuf>,
    /// System prompt (the template's default when omitted).
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub generation: GenerationArgs,
    /// Print one JSON object per reply (text, token ids, stopped) instead of streaming.
    #[command(flatten)]
    pub json: JsonArg,
}

#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// The layout of --model-path (see the error for the registered ones).
    pub layout: String,
    /// The checkpoint to convert.
    #[arg(long, alias = "model", value_name = "DIR")]
    pub model_path: PathBuf,
    /// Where the standard checkpoint is written (a new or empty directory).
    #[arg(long, alias = "out", value_name = "DIR")]
    pub output_dir: PathBuf,
    /// The registered layouts' settings given as flags, filled in by [`parse`].
    #[arg(skip)]
    pub settings: ModelSettings,
}

#[derive(Args, Debug)]
pub struct MergeLoraArgs {
    /// The base model the adapter was trained on.
    #[arg(long, alias = "base", value_name = "DIR")]
    pub model_path: PathBuf,
    /// The LoRA adapter directory (lmms-ft's or peft's).
    #[arg(long, value_name = "DIR")]
    pub adapter: PathBuf,
    /// Where the merged model is written.
    #[arg(long, alias = "out", value_name = "DIR")]
    pub output_dir: PathBuf,
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
    Show(RunArgs),
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
    #[arg(long, value_name = "DIR")]
    pub model_path: Option<PathBuf>,
    /// Output directory (train.output_dir).
    #[arg(long, value_name = "DIR")]
    pub output_dir: Option<PathBuf>,
}

/// The dataset flags, for the commands that read one (not `generate` / `chat`).
#[derive(Args, Debug, Default)]
pub struct DataArgs {
    /// Training dataset (data.train).
    #[arg(long, value_name = "FILE")]
    pub data: Option<PathBuf>,
    /// Image root (data.image_folder).
    #[arg(long, value_name = "DIR")]
    pub image_folder: Option<PathBuf>,
    /// Video root (data.video_folder).
    #[arg(long, value_name = "DIR")]
    pub video_folder: Option<PathBuf>,
}

/// A run configuration with a dataset.
#[derive(Args, Debug, Default)]
pub struct RunArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    #[command(flatten)]
    pub data: DataArgs,
}

fn path_flags<'a>(
    flags: &mut Vec<(String, Value)>,
    pairs: impl IntoIterator<Item = (&'a str, &'a Option<PathBuf>)>,
) {
    for (key, p) in pairs {
        if let Some(p) = p {
            flags.push((key.into(), Value::from(p.to_string_lossy().into_owned())));
        }
    }
}

impl ConfigArgs {
    pub fn sources(&self) -> Sources {
        let mut flags: Vec<(String, Value)> = Vec::new();
        if let Some(m) = &self.model {
            flags.push(("model.id".into(), Value::from(m.clone())));
        }
        path_flags(
            &mut flags,
            [
                ("model.path", &self.model_path),
                ("train.output_dir", &self.output_dir),
            ],
        );
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

impl RunArgs {
    pub fn sources(&self) -> Sources {
        let mut sources = self.config.sources();
        path_flags(
            &mut sources.flags,
            [
                ("data.train", &self.data.data),
                ("data.image_folder", &self.data.image_folder),
                ("data.video_folder", &self.data.video_folder),
            ],
        );
        sources
    }

    pub fn load(&self) -> Result<Config> {
        Ok(self.sources().load()?)
    }
}

/// Parses the command line. The core knows no layout's settings, so each registered layout's
/// setting `key` becomes a `convert --key-with-dashes VALUE` flag here, at run time.
pub fn parse() -> Cli {
    let mut keys: Vec<&'static str> = compose::layouts()
        .iter()
        .flat_map(|l| l.settings.iter().copied())
        .collect();
    keys.sort_unstable();
    keys.dedup();
    let command = Cli::command().mut_subcommand("convert", |mut c| {
        for key in &keys {
            // clap wants 'static names; the handful of flags is made once per process.
            let flag: &'static str = Box::leak(key.replace('_', "-").into_boxed_str());
            let layouts: Vec<&str> = compose::layouts()
                .iter()
                .filter(|l| l.settings.contains(key))
                .map(|l| l.name)
                .collect();
            c = c.arg(Arg::new(*key).long(flag).value_name("VALUE").help(format!(
                "Setting `{key}` of the {} layout (model.{key} for train / evaluate)",
                layouts.join(", ")
            )));
        }
        c
    });
    let matches = command.get_matches();
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let (Command::Convert(args), Some(sub)) =
        (&mut cli.command, matches.subcommand_matches("convert"))
    {
        for key in keys {
            if let Some(value) = sub.get_one::<String>(key) {
                args.settings.insert(key, value.clone());
            }
        }
    }
    cli
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::ListModels(JsonArg { json }) => list_models(json),
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
        Command::Demo(args) => crate::demo::run(&args),
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
        Command::Evaluate(args) => commands::evaluate(&args.run.load()?, &args),
        Command::ValidateData(args) => commands::validate_data(&args.load()?),
        Command::Generate(args) => commands::generate(&args.config.load()?, &args),
        Command::Chat(args) => crate::chat::run(&args.config.load()?, &args),
        Command::Train(args) => {
            let mut sources = args.run.sources();
            if let Some(resume) = args.resume {
                sources
                    .flags
                    .push(("train.resume".into(), Value::from(resume)));
            }
            if args.overwrite {
                sources
                    .flags
                    .push(("train.overwrite".into(), Value::from(true)));
            }
            commands::train(&sources.load()?)
        }
        Command::MergeLora(args) => {
            commands::merge_lora(&args.model_path, &args.adapter, &args.output_dir)
        }
        Command::Convert(args) => crate::convert::convert(
            &args.layout,
            &args.model_path,
            &args.settings,
            &args.output_dir,
        ),
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
