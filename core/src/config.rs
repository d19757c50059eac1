//! Run configuration, layered with `figment`:
//! built-in defaults < TOML file (`--config`) < environment (`LMMS_FT_<SECTION>__<KEY>`)
//! < command-line flags and `--set section.key=value`.
//!
//! Every struct denies unknown fields, so a misspelt key is an error that names the key and
//! the layer it came from instead of being silently ignored.

use std::path::{Path, PathBuf};

use figment::providers::{Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::{Deserialize, Serialize};

/// Prefix of configuration environment variables. Only variables with a `__` section
/// separator are read (`LMMS_FT_TRAIN__LEARNING_RATE`), so tool settings such as
/// `LMMS_FT_HOME` never collide with config keys.
pub const ENV_PREFIX: &str = "LMMS_FT_";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub model: ModelSection,
    pub data: DataSection,
    pub train: TrainSection,
    pub lora: LoraSection,
    pub quant: QuantSection,
}

/// `[model]`. Unknown keys are not refused here: every key besides `id`, `path` and `kind` is
/// a setting of the model to compose (or of the checkpoint layout `path` is in), which only
/// the adapter that registered that composer or layout knows; it refuses the keys it does not
/// take ([`ModelSettings::parse`]), and the command refuses any when nothing reads them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelSection {
    /// Registered id or alias (`lmms-ft list-models`).
    pub id: Option<String>,
    /// Local checkpoint directory; overrides the Hugging Face cache look-up.
    pub path: Option<PathBuf>,
    /// Build the model from parts instead of loading a checkpoint: the name of a registered
    /// composer (see [`crate::compose`]). Excludes `id` and `path`; the composer's settings
    /// describe the parts.
    pub kind: Option<String>,
    /// The composer's or layout's settings (`[model]`'s other keys), uninterpreted.
    #[serde(flatten)]
    pub settings: ModelSettings,
}

/// Settings of a composer or checkpoint layout: `[model]` keys the core passes through to the
/// adapter that registered it, as JSON values.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ModelSettings(pub std::collections::BTreeMap<String, serde_json::Value>);

impl ModelSettings {
    /// The settings as the adapter's own type, which should deny unknown fields so that a
    /// misspelt key is an error naming it.
    pub fn parse<T: serde::de::DeserializeOwned>(&self) -> anyhow::Result<T> {
        let object = serde_json::Value::Object(self.0.clone().into_iter().collect());
        serde_json::from_value(object).map_err(|e| anyhow::anyhow!("[model]: {e}"))
    }

    /// The keys that are set, in order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Sets `key` (a string value, as from a command-line flag).
    pub fn insert(&mut self, key: &str, value: impl Into<serde_json::Value>) {
        self.0.insert(key.to_string(), value.into());
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnBadSample {
    /// Stop with the sample's file, index and reason.
    Error,
    /// Log the reason and go on without the sample.
    Skip,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Overlength {
    /// Leave the sample out (counted and logged).
    Drop,
    /// Stop with an error naming the sample.
    Error,
    /// Cut text-only spans from the end; media tokens are never cut.
    Truncate,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    /// Training dataset: JSON array, JSONL, or OpenAI-style messages (auto-detected).
    pub train: Option<PathBuf>,
    pub eval: Option<PathBuf>,
    pub image_folder: Option<PathBuf>,
    pub video_folder: Option<PathBuf>,
    /// Longest sample, in tokens after media expansion.
    pub max_length: usize,
    pub overlength: Overlength,
    pub on_bad_sample: OnBadSample,
    /// Label every token, not only assistant replies.
    pub train_on_prompt: bool,
    /// Pixel budget per image (families that resize dynamically, e.g. Qwen2-VL); unset keeps
    /// the model's preprocessor config.
    pub min_pixels: Option<u64>,
    pub max_pixels: Option<u64>,
    /// Pixel budget per video frame.
    pub video_min_pixels: Option<u64>,
    pub video_max_pixels: Option<u64>,
    /// Sample this many frames uniformly; when unset, sample `video_fps` frames per second
    /// within `[video_min_frames, video_max_frames]`.
    pub video_num_frames: Option<usize>,
    pub video_fps: f64,
    pub video_min_frames: usize,
    pub video_max_frames: usize,
    /// Images whose header declares more pixels than this are refused (decompression bombs).
    pub max_image_pixels: u64,
    /// Pack the samples of each batch into rows of at most `max_length` tokens (in order)
    /// instead of padding them to the longest: attention stays within each sample and
    /// positions restart per sample, so the loss is the one of the samples run one by one,
    /// without compute spent on padding. `train.batch_size` still counts samples, so the
    /// sampler, resuming and the per-token loss normalisation are unchanged.
    pub packing: bool,
}

impl Default for DataSection {
    fn default() -> Self {
        DataSection {
            train: None,
            eval: None,
            image_folder: None,
            video_folder: None,
            max_length: 2048,
            overlength: Overlength::Drop,
            on_bad_sample: OnBadSample::Error,
            train_on_prompt: false,
            min_pixels: None,
            max_pixels: None,
            video_min_pixels: None,
            video_max_pixels: None,
            video_num_frames: None,
            video_fps: 2.0,
            video_min_frames: 4,
            video_max_frames: 768,
            max_image_pixels: crate::data::media::DEFAULT_MAX_IMAGE_PIXELS,
            packing: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Full,
    Lora,
    Qlora,
}

impl Mode {
    /// The config spelling (`"qlora"`).
    pub fn name(self) -> &'static str {
        match self {
            Mode::Full => "full",
            Mode::Lora => "lora",
            Mode::Qlora => "qlora",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// bf16 on CUDA, fp32 on CPU.
    Auto,
    Fp32,
    Bf16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheduler {
    Cosine,
    Linear,
    Constant,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    pub output_dir: PathBuf,
    pub mode: Mode,
    pub epochs: f64,
    /// Stop after this many optimiser steps, whatever `epochs` says.
    pub max_steps: Option<u64>,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub warmup_ratio: f64,
    pub scheduler: Scheduler,
    pub max_grad_norm: f64,
    pub seed: u64,
    pub precision: Precision,
    /// `auto` (CUDA when available), `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    pub gradient_checkpointing: bool,
    pub logging_steps: u64,
    pub save_steps: u64,
    pub save_total_limit: Option<usize>,
    pub eval_steps: Option<u64>,
    /// At each evaluation, also generate the last assistant turn of this many eval samples
    /// (the first ones) and log exact match, token F1 and ROUGE-L beside `eval_loss`; 0 = off.
    pub eval_generate_samples: usize,
    /// New-token limit of those generations (greedy).
    pub eval_max_new_tokens: usize,
    /// How each part trains; unset parts follow `mode` (see [`TrainSection::component_modes`]).
    pub vision: Option<ComponentMode>,
    pub projector: Option<ComponentMode>,
    pub llm: Option<ComponentMode>,
    /// Learning rates of the vision tower and projector (ms-swift's `vit_lr` / `aligner_lr`,
    /// LLaVA's `mm_projector_lr`); default `learning_rate`.
    pub vision_lr: Option<f64>,
    pub projector_lr: Option<f64>,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    /// Continue from a checkpoint: `"latest"` (the newest under `output_dir`; a fresh start
    /// when there is none) or a checkpoint directory.
    pub resume: Option<String>,
    /// Start a new run in an output directory that holds another run's outputs or
    /// checkpoints, removing them first (else such a directory is refused).
    pub overwrite: bool,
    /// Batch samples of similar token length (`transformers`' `group_by_length`); measures
    /// every sample once before training.
    pub group_by_length: bool,
    /// Threads that decode, encode and collate batches ahead of the model.
    pub dataloader_workers: usize,
    /// Largest weight shard of a full fine-tuning output, in bytes (`save_pretrained`'s
    /// `max_shard_size`).
    pub max_shard_size: u64,
    /// Labeled positions whose `lm_head` logits are computed at once by the loss: fewer
    /// holds less memory (one chunk's `[chunk, vocab]` fp32 logits at a time), more runs
    /// fewer, larger matrix products. The loss and gradients do not depend on it.
    pub loss_chunk_size: usize,
}

/// How one part of the model trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ComponentMode {
    Frozen,
    Full,
    Lora,
}

impl TrainSection {
    /// How each part trains. `mode = "full"` trains projector and LLM fully with the vision
    /// tower frozen; `lora` / `qlora` put LoRA on the LLM and freeze the rest, as the LLaVA and
    /// Qwen2-VL fine-tuning recipes do by default.
    pub fn component_modes(&self) -> crate::part::PerPart<ComponentMode> {
        let (v, p, l) = match self.mode {
            Mode::Full => (
                ComponentMode::Frozen,
                ComponentMode::Full,
                ComponentMode::Full,
            ),
            Mode::Lora | Mode::Qlora => (
                ComponentMode::Frozen,
                ComponentMode::Frozen,
                ComponentMode::Lora,
            ),
        };
        crate::part::PerPart {
            vision: self.vision.unwrap_or(v),
            projector: self.projector.unwrap_or(p),
            llm: self.llm.unwrap_or(l),
        }
    }

    /// Peak learning rate per part: `vision_lr` / `projector_lr`, else `learning_rate`.
    pub fn learning_rates(&self) -> crate::part::PerPart<f64> {
        crate::part::PerPart {
            vision: self.vision_lr.unwrap_or(self.learning_rate),
            projector: self.projector_lr.unwrap_or(self.learning_rate),
            llm: self.learning_rate,
        }
    }
}

impl Default for TrainSection {
    fn default() -> Self {
        TrainSection {
            output_dir: PathBuf::from("output"),
            mode: Mode::Lora,
            epochs: 1.0,
            max_steps: None,
            batch_size: 1,
            grad_accum: 1,
            learning_rate: 1e-4,
            weight_decay: 0.0,
            warmup_ratio: 0.03,
            scheduler: Scheduler::Cosine,
            max_grad_norm: 1.0,
            seed: 42,
            precision: Precision::Auto,
            device: "auto".into(),
            gradient_checkpointing: false,
            logging_steps: 10,
            save_steps: 500,
            save_total_limit: None,
            eval_steps: None,
            eval_generate_samples: 0,
            eval_max_new_tokens: 64,
            vision: None,
            projector: None,
            llm: None,
            vision_lr: None,
            projector_lr: None,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            resume: None,
            overwrite: false,
            group_by_length: false,
            dataloader_workers: 2,
            loss_chunk_size: crate::loss::DEFAULT_LOSS_CHUNK,
            max_shard_size: 5 * 1024 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraSection {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// As in PEFT: a list of module-name suffixes, or one string that is a regex the whole
    /// module name must match. The empty list means every linear layer of the LLM except
    /// `lm_head`.
    pub target_modules: TargetModules,
    pub use_rslora: bool,
    pub modules_to_save: Vec<String>,
}

impl Default for LoraSection {
    fn default() -> Self {
        LoraSection {
            r: 8,
            alpha: 16.0,
            dropout: 0.05,
            target_modules: TargetModules::Names(Vec::new()),
            use_rslora: false,
            modules_to_save: Vec::new(),
        }
    }
}

/// How `train.mode = "qlora"` quantises the frozen base (bitsandbytes' 4-bit settings).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuantSection {
    /// `"nf4"` or `"fp4"` (`bnb_4bit_quant_type`).
    #[serde(rename = "type")]
    pub quant_type: String,
    /// Quantise the block scales too (`bnb_4bit_use_double_quant`).
    pub double_quant: bool,
    /// Values per absmax block (bnb uses 64).
    pub blocksize: i64,
    /// `"auto"` (the model's dtype), `"fp32"`, `"bf16"` or `"fp16"`
    /// (`bnb_4bit_compute_dtype`).
    pub compute_dtype: String,
    /// Which linear layers to quantise, with `lora.target_modules`' syntax. The empty list
    /// means every linear layer of the LLM except `lm_head` (not the vision tower or the
    /// projector).
    pub modules: TargetModules,
}

impl Default for QuantSection {
    fn default() -> Self {
        QuantSection {
            quant_type: "nf4".into(),
            double_quant: true,
            blocksize: 64,
            compute_dtype: "auto".into(),
            modules: TargetModules::Names(Vec::new()),
        }
    }
}

/// PEFT's `target_modules`: a list matches names equal to or ending in `.` + an entry; a
/// single string is a regex matched against the whole (runtime) module name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    Regex(String),
    Names(Vec<String>),
}

/// A configuration error, worded for the user: which key, which layer, what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {0} does not exist")]
    MissingFile(PathBuf),
    #[error("invalid --set '{0}': expected section.key=value")]
    BadOverride(String),
    #[error("{}", .0.join("\n"))]
    Invalid(Vec<String>),
}

/// Where the layers come from. Flags are already `section.key` pairs.
#[derive(Debug, Default, Clone)]
pub struct Sources {
    pub file: Option<PathBuf>,
    /// Read `LMMS_FT_<SECTION>__<KEY>` variables.
    pub env: bool,
    /// Values of dedicated flags (`--model`, `--data`, ...), as (`section.key`, value).
    pub flags: Vec<(String, Value)>,
    /// Raw `--set section.key=value` strings, applied after `flags`.
    pub sets: Vec<String>,
}

/// A layer of already-parsed values with a name for error messages ("command line",
/// "environment"). Env and `--set` values share one parser ([`parse_set_value`]), so
/// `LMMS_FT_TRAIN__LEARNING_RATE=2e-5` and `--set train.learning_rate=2e-5` mean the same.
struct Layer {
    name: &'static str,
    values: Dict,
}

impl Provider for Layer {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.name)
    }

    fn data(&self) -> figment::Result<Map<Profile, Dict>> {
        Ok(Profile::Default.collect(self.values.clone()))
    }
}

/// `LMMS_FT_TRAIN__LEARNING_RATE` → `train.learning_rate`, for variables with a section.
fn env_key(var: &str) -> Option<String> {
    let rest = var.strip_prefix(ENV_PREFIX)?;
    rest.contains("__").then(|| {
        rest.split("__")
            .collect::<Vec<_>>()
            .join(".")
            .to_ascii_lowercase()
    })
}

/// Parses the right-hand side of `--set` as a TOML value (`3`, `1e-4`, `true`, `["a","b"]`),
/// falling back to a plain string so `--set model.id=qwen2-vl-7b` needs no quotes.
pub fn parse_set_value(raw: &str) -> Value {
    #[derive(Deserialize)]
    struct V {
        v: toml::Value,
    }
    match toml::from_str::<V>(&format!("v = {raw}")) {
        Ok(V { v }) => Value::serialize(v).unwrap_or_else(|_| Value::from(raw.to_string())),
        Err(_) => Value::from(raw.to_string()),
    }
}

fn insert_dotted(dict: &mut Dict, key: &str, value: Value) {
    let mut parts = key.split('.').peekable();
    let mut cur = dict;
    while let Some(part) = parts.next() {
        if parts.peek().is_none() {
            cur.insert(part.to_string(), value);
            return;
        }
        let entry = cur
            .entry(part.to_string())
            .or_insert_with(|| Value::from(Dict::new()));
        if entry.as_dict().is_none() {
            *entry = Value::from(Dict::new());
        }
        cur = match entry {
            Value::Dict(_, d) => d,
            _ => unreachable!("just made a dict"),
        };
    }
}

impl Sources {
    /// Builds the layered figment, without extracting.
    pub fn figment(&self) -> Result<Figment, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = &self.file {
            if !file.is_file() {
                return Err(ConfigError::MissingFile(file.clone()));
            }
            fig = fig.merge(Toml::file(file));
        }
        if self.env {
            let mut values = Dict::new();
            for (var, raw) in std::env::vars() {
                if let Some(key) = env_key(&var) {
                    insert_dotted(&mut values, &key, parse_set_value(raw.trim()));
                }
            }
            fig = fig.merge(Layer {
                name: "environment",
                values,
            });
        }
        let mut cli = Dict::new();
        for (key, value) in &self.flags {
            insert_dotted(&mut cli, key, value.clone());
        }
        for set in &self.sets {
            let (key, raw) = set
                .split_once('=')
                .filter(|(k, _)| k.trim().split('.').all(|part| !part.trim().is_empty()))
                .ok_or_else(|| ConfigError::BadOverride(set.clone()))?;
            insert_dotted(&mut cli, key.trim(), parse_set_value(raw.trim()));
        }
        Ok(fig.merge(Layer {
            name: "command line",
            values: cli,
        }))
    }

    /// Resolves the configuration, turning every extraction error into a message that names
    /// the key and the layer (file path, environment variable or command line) it came from.
    pub fn load(&self) -> Result<Config, ConfigError> {
        let fig = self.figment()?;
        fig.extract::<Config>()
            .map_err(|e| ConfigError::Invalid(e.into_iter().map(|e| describe(&fig, e)).collect()))
    }
}

fn describe_origin(md: Option<&Metadata>) -> String {
    match md {
        None => "unknown source".into(),
        Some(md) => match &md.source {
            Some(figment::Source::File(p)) => format!("{} {}", md.name, p.display()),
            Some(other) => format!("{} ({other})", md.name),
            None => md.name.to_string(),
        },
    }
}

fn describe(fig: &Figment, e: figment::Error) -> String {
    use figment::error::Kind;
    let parent = e.path.join(".");
    match &e.kind {
        Kind::UnknownField(field, expected) => {
            // figment's path already ends with the offending field for nested keys.
            let key = match e.path.last() {
                Some(last) if last == field => parent.clone(),
                _ if parent.is_empty() => field.clone(),
                _ => format!("{parent}.{field}"),
            };
            let origin = describe_origin(fig.find_metadata(&key));
            let env_hint = if origin.contains("environment") {
                format!(
                    " (variable {ENV_PREFIX}{})",
                    key.replace('.', "__").to_uppercase()
                )
            } else {
                String::new()
            };
            format!(
                "unknown config key `{key}` in {origin}{env_hint}; expected one of: {}",
                expected.join(", ")
            )
        }
        kind => {
            let origin = describe_origin(e.metadata.as_ref());
            format!("config key `{parent}` in {origin}: {kind}")
        }
    }
}

/// Loads a configuration from a TOML file alone (no env, no flags); for tests and tools.
pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
    Sources {
        file: Some(path.to_path_buf()),
        ..Default::default()
    }
    .load()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_values_parse_as_toml_with_string_fallback() {
        assert_eq!(parse_set_value("3").to_i128(), Some(3));
        assert_eq!(parse_set_value("1e-4").to_f64(), Some(1e-4));
        assert_eq!(parse_set_value("true").to_bool(), Some(true));
        assert_eq!(
            parse_set_value("some-model-7b").as_str(),
            Some("some-model-7b")
        );
        assert_eq!(parse_set_value("\"a b\"").as_str(), Some("a b"));
    }
}
