//! The contract between the core and a model-family adapter.
//!
//! An adapter implements [`Family`] with its own typed config, processed media, model and
//! batch; the core drives it only through [`DynFamily`], the object-safe face that [`Erased`]
//! derives from any `Family` ([`erased`]), so the typed values stay inside the generic code
//! that owns them. The core owns what every family would otherwise repeat: the sample
//! ([`Sample`]), the text side of a batch and the collator skeleton ([`collate`]), the loss
//! ([`LossHead`]) and the generation loop ([`crate::generate`]).
//!
//! The data flow of one training step is:
//! conversation + decoded media → [`Processor::process`] (media, token count per media)
//! → [`ChatTemplate::encode`] (ids with media placeholders expanded, labels) → [`Sample`]
//! → [`Collator::collate`] (the core's [`TextBatch`] + the family's media, on the device)
//! → [`Model::hidden_states`] (final hidden states) → the core's [`LossHead`] (`lm_head` and
//! cross-entropy at the labeled positions only: summed loss, label count).

pub mod collate;
pub mod erased;

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use tch::{nn, Device, Kind, Tensor};

use crate::data::{Conversation, DecodedMedia, RgbImage, VideoClip};
use crate::generate::{DecodeState, GenerateOptions, Generated};
use crate::loss::{LossHead, LossTargets};
use crate::nn::Linear;
use crate::quant::QuantSpec;

pub use crate::part::{Component, PerPart};
pub use collate::{Collator, PackedText, Placement, Sample, TextBatch};
pub use erased::{BatchBuilder, EncodedSample, Erased, LoadedBatch};

/// Label value for positions that do not contribute to the loss (as in `transformers`).
pub const IGNORE_INDEX: i64 = -100;

/// A family's `config.json`, parsed.
pub trait HfConfig: Sized + Send + Sync {
    /// Parses a `config.json` value. Must accept both the flat layout and the nested
    /// `text_config` / `vision_config` layout, and apply the same per-`model_type` defaults as
    /// `transformers`, since Hub configs omit keys that equal the defaults.
    fn from_hf_json(value: &serde_json::Value) -> Result<Self>;

    /// Number of parameters the model built from this config has, computed from the shapes
    /// alone (no allocation), equal to what `transformers` reports for the same config.
    fn num_parameters(&self) -> u64;
}

/// Turns decoded media into model inputs.
pub trait Processor: Send + Sync {
    /// Processed media of one sample (e.g. patches plus grid sizes), in placeholder order.
    /// `'static` so the training loader can carry it between threads.
    type Media: Send + 'static;

    /// Resizes, normalises and patchifies all media of one sample. Returns the processed
    /// media and, per image then per video in order, the number of tokens its placeholder
    /// expands to; the template relies on these counts being exact.
    fn process(
        &self,
        images: &[RgbImage],
        videos: &[VideoClip],
    ) -> Result<(Self::Media, MediaTokens)>;
}

/// Number of placeholder tokens each image and video of a sample expands to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MediaTokens {
    pub images: Vec<usize>,
    pub videos: Vec<usize>,
}

/// Token ids and labels of one conversation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EncodedText {
    pub input_ids: Vec<i64>,
    /// Same length as `input_ids`; [`IGNORE_INDEX`] where no loss is taken.
    pub labels: Vec<i64>,
}

/// Renders conversations to token ids.
pub trait ChatTemplate: Send + Sync {
    /// Whether `id` is a media token (one placeholder position), which length fitting must
    /// never cut. The default knows none; truncation then refuses samples with media rather
    /// than cutting blindly.
    fn is_media_token(&self, id: i64) -> bool {
        let _ = id;
        false
    }

    /// Encodes a training conversation. Each image / video placeholder becomes exactly
    /// `media.images[i]` / `media.videos[j]` media tokens. Labels follow the project's
    /// label rule: assistant content plus the end-of-turn tokens the template emits right
    /// after it are labeled; everything else is [`IGNORE_INDEX`]. With `label_all`, every
    /// token except media tokens is labeled.
    fn encode(
        &self,
        conv: &Conversation,
        media: &MediaTokens,
        label_all: bool,
    ) -> Result<EncodedText>;

    /// Encodes the prompt for generation (`add_generation_prompt`). It must be an exact
    /// prefix of what [`ChatTemplate::encode`] produces for the same conversation followed by
    /// an assistant turn, so inference sees what training saw.
    fn encode_prompt(&self, conv: &Conversation, media: &MediaTokens) -> Result<Vec<i64>>;

    /// Text of generated ids, without special tokens.
    fn decode(&self, _ids: &[i64]) -> Result<String> {
        anyhow::bail!("this chat template cannot decode token ids")
    }

    /// Ids that end an assistant reply: the end-of-turn token(s) the template writes after
    /// assistant content, and the tokenizer's end-of-sequence token.
    fn stop_token_ids(&self) -> Vec<i64> {
        Vec::new()
    }
}

/// Output of a training or evaluation forward pass. Full logits are not part of it: the
/// loss is taken at the labeled positions only ([`LossHead`]); [`Model::logits`] gives them
/// for tools that need every position.
pub struct ModelOutput {
    /// Sum (not mean) of the token cross-entropies over labeled positions, as a fp32 scalar;
    /// `None` when the batch carries no labels. Summing lets the trainer average over all
    /// label tokens of an accumulated batch rather than per micro-batch.
    pub loss_sum: Option<Tensor>,
    /// Number of labeled positions behind `loss_sum`.
    pub num_label_tokens: i64,
}

impl ModelOutput {
    /// Mean token loss, as `transformers` reports it for one batch.
    pub fn mean_loss(&self) -> Option<Tensor> {
        self.loss_sum
            .as_ref()
            .map(|s| s / (self.num_label_tokens.max(1) as f64))
    }
}

/// One row of a family's module-name table ([`Trainable::prefixes`]): a Hub-name prefix,
/// the prefix `transformers` 5 uses for it at run time, and the part it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefix {
    pub hub: &'static str,
    pub runtime: &'static str,
    pub component: Component,
}

impl Prefix {
    pub const fn new(hub: &'static str, runtime: &'static str, component: Component) -> Self {
        Prefix {
            hub,
            runtime,
            component,
        }
    }
}

/// The first row of `table` whose Hub prefix starts `name`.
fn prefix_of(table: &[Prefix], name: &str) -> Option<Prefix> {
    table.iter().copied().find(|p| name.starts_with(p.hub))
}

/// A loaded model as the trainer, LoRA, quantisation and checkpoint code see it: parameters,
/// linear layers, parts and names, without a batch type (so it is object-safe). Every
/// [`Model`] is one.
pub trait Trainable: Send {
    /// The parameters, named exactly as in the Hub checkpoint (`model.layers.0...`).
    fn var_store(&self) -> &nn::VarStore;

    /// Turns gradient checkpointing of the decoder layers and vision blocks on or off
    /// (`train.gradient_checkpointing`). A family without it keeps the default, which trains
    /// correctly, only with more memory.
    fn set_gradient_checkpointing(&mut self, on: bool) {
        let _ = on;
    }

    /// Calls `f` with the Hub module name (`model.layers.0.self_attn.q_proj`) of every
    /// [`Linear`] layer, so the trainer can attach LoRA adapters or merge them. A family that
    /// keeps the default exposes none, and asking it for LoRA is an error, not a silent no-op.
    fn visit_linears(&mut self, f: &mut dyn FnMut(&str, &mut Linear)) {
        let _ = f;
    }

    /// The family's module names, declared once: per Hub-name prefix, the run-time prefix and
    /// the part, most specific first (the first match wins; `""` matches every name).
    /// [`Trainable::component`] and [`Trainable::runtime_name`] read it.
    fn prefixes(&self) -> &'static [Prefix] {
        &[]
    }

    /// Which part of the model a parameter or module (Hub name) belongs to; the trainer
    /// freezes, fully trains or adapts each part and gives it its own learning rate. By the
    /// prefix table; the LLM when no row matches.
    fn component(&self, name: &str) -> Component {
        prefix_of(self.prefixes(), name).map_or(Component::Llm, |p| p.component)
    }

    /// The module path `transformers` 5 uses at run time for a Hub name; PEFT adapters are
    /// keyed by it, while checkpoints keep Hub names. By the prefix table; the Hub name when no
    /// row matches.
    fn runtime_name(&self, hub_name: &str) -> String {
        match prefix_of(self.prefixes(), hub_name) {
            Some(p) => format!("{}{}", p.runtime, &hub_name[p.hub.len()..]),
            None => hub_name.to_string(),
        }
    }

    /// Other names older tools gave a module or parameter (Hub name) in adapter files, which
    /// loading an adapter accepts besides the Hub and runtime names. None by default.
    fn legacy_names(&self, hub_name: &str) -> Vec<String> {
        let _ = hub_name;
        Vec::new()
    }
}

/// A loaded model: what it computes for a batch.
pub trait Model: Trainable {
    type Batch;

    /// Runs the model up to its final norm: hidden states `[batch, seq, hidden]`.
    fn hidden_states(&self, batch: &Self::Batch, train: bool) -> Result<Tensor>;

    /// Where the batch's loss is taken ([`TextBatch::targets`], kept by the collator);
    /// `None` for a batch without labels.
    fn loss_targets<'a>(&self, batch: &'a Self::Batch) -> Option<&'a LossTargets>;

    /// The output projection (`lm_head`, or the tied embeddings): `[.., hidden]` →
    /// `[.., vocab]`.
    fn lm_head(&self, hidden: &Tensor) -> Tensor;

    /// Summed loss of the batch through the core's [`LossHead`] with its default chunking.
    /// Labels are shifted (position t
    /// predicts label t+1), as in `transformers`' causal-LM loss. Families do not override
    /// it: the loss is the core's, the same for all of them.
    fn forward(&self, batch: &Self::Batch, train: bool) -> Result<ModelOutput> {
        LossHead::default().forward(self, batch, train)
    }

    /// Full logits `[batch, seq, vocab]` of every position, for tools and tests that need
    /// them (inference, parity checks); training never builds them.
    fn logits(&self, batch: &Self::Batch) -> Result<Tensor> {
        Ok(self.lm_head(&self.hidden_states(batch, false)?))
    }

    /// Runs a batch of prompts, collated right-padded as for training, row `i` holding
    /// `lengths[i]` real tokens, and fills a key/value cache. Returns the logits of each row's
    /// last prompt token (`[B, vocab]`) and the state [`Model::decode_step`] continues from
    /// (see [`crate::generate`] for how padding is masked).
    fn prefill(&self, _batch: &Self::Batch, _lengths: &[usize]) -> Result<(Tensor, DecodeState)> {
        anyhow::bail!("this model does not support generation")
    }

    /// Feeds one token per row; returns the logits for the next ones (`[B, vocab]`).
    fn decode_step(&self, _state: &mut DecodeState, _tokens: &[i64]) -> Result<Tensor> {
        anyhow::bail!("this model does not support generation")
    }
}

/// The processed media of one sample of family `F`.
pub type Media<F> = <<F as Family>::Processor as Processor>::Media;

/// A model family: the typed bundle an adapter crate implements once.
pub trait Family: Send + Sync + 'static {
    type Config: HfConfig;
    type Processor: Processor;
    type Template: ChatTemplate;
    type Collator: Collator<Media = Media<Self>>;
    type Model: Model<Batch = <Self::Collator as Collator>::Batch> + 'static;

    /// Reads `config.json` from a model directory.
    fn config(dir: &Path) -> Result<Self::Config> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let value: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        Self::Config::from_hf_json(&value)
            .with_context(|| format!("interpreting {}", path.display()))
    }

    /// Builds the processor from the model directory's preprocessor / processor config,
    /// with the user's overrides (pixel budgets) applied.
    fn processor(
        config: &Self::Config,
        dir: &Path,
        opts: &ProcessorOptions,
    ) -> Result<Self::Processor>;

    /// Builds the chat template from the directory's tokenizer and template files.
    fn template(config: &Self::Config, dir: &Path) -> Result<Self::Template>;

    /// Joins the encoded text and processed media of one sample.
    fn sample(text: EncodedText, media: Media<Self>) -> Sample<Media<Self>> {
        Sample { text, media }
    }

    fn collator(config: &Self::Config) -> Self::Collator;

    /// Loads weights from the directory's safetensors (single file or sharded with an
    /// index) into a model on `device` with floating-point `kind`. A directory holding
    /// another model's checkpoint must be an error naming the mismatch.
    fn load(config: &Self::Config, dir: &Path, device: Device, kind: Kind) -> Result<Self::Model>;
}

/// User overrides of a processor's settings; `None` keeps the model's own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcessorOptions {
    pub min_pixels: Option<u64>,
    pub max_pixels: Option<u64>,
    pub video_min_pixels: Option<u64>,
    pub video_max_pixels: Option<u64>,
}

impl ProcessorOptions {
    pub fn from_config(data: &crate::config::DataSection) -> Self {
        ProcessorOptions {
            min_pixels: data.min_pixels,
            max_pixels: data.max_pixels,
            video_min_pixels: data.video_min_pixels,
            video_max_pixels: data.video_max_pixels,
        }
    }
}

/// How to open a model for [`DynFamily::open`].
#[derive(Debug, Clone, Copy)]
pub struct OpenOptions {
    pub device: Device,
    pub kind: Kind,
    pub processor: ProcessorOptions,
}

/// A conversation with its media already decoded.
pub struct PreparedConversation {
    pub conversation: Conversation,
    pub media: DecodedMedia,
}

/// The data side of a model (processor and template, no weights): what `validate-data`
/// needs to measure samples with the real tokenizer and media token counts.
pub trait DataPipeline: Send + Sync {
    /// Tokens of a conversation after media expansion.
    fn encoded_length(&self, conv: &PreparedConversation) -> Result<usize>;
}

/// An opened model with its processor, template and collator: what the trainer, `evaluate`
/// and `generate` use, without knowing the family.
pub trait Pipeline {
    /// Its processor and template, usable from other threads.
    fn data(&self) -> &dyn DataPipeline;
    /// Encodes, collates and runs a batch of conversations.
    fn forward(&self, batch: &[PreparedConversation], train: bool) -> Result<ModelOutput>;
    fn var_store(&self) -> &nn::VarStore;
    /// The model, for the trainer to attach adapters, freeze parts and save.
    fn trainable(&mut self) -> &mut dyn Trainable;
    /// Generates an assistant reply to a conversation (its last turn from the user).
    fn generate(&self, conv: &PreparedConversation, opts: &GenerateOptions) -> Result<Generated> {
        let mut replies = self.generate_batch(std::slice::from_ref(conv), opts, &mut |_, _| {})?;
        replies.pop().context("generation returned no reply")
    }
    /// Replies to several conversations at once (one batch through the cache); each equals
    /// what [`Pipeline::generate`] gives for it alone. `on_text(row, piece)` receives each
    /// row's text as it is generated.
    fn generate_batch(
        &self,
        convs: &[PreparedConversation],
        opts: &GenerateOptions,
        on_text: &mut dyn FnMut(usize, &str),
    ) -> Result<Vec<Generated>>;
    /// Encoding and collation, shareable with loader threads (training).
    fn batch_builder(&self) -> Arc<dyn BatchBuilder>;
    /// Runs a batch built by this pipeline's [`BatchBuilder`].
    fn forward_loaded(&self, batch: &LoadedBatch, train: bool) -> Result<ModelOutput>;
    /// Sets how [`Pipeline::forward`] and [`Pipeline::forward_loaded`] take the loss
    /// (`train.loss_chunk_size`); [`LossHead::default`] until called.
    fn set_loss_head(&mut self, head: LossHead);
}

/// Object-safe face of a [`Family`], stored in the registry.
pub trait DynFamily: Send + Sync {
    /// Opens the model with its processor, template and collator. With `quant` (QLoRA), the
    /// linear layers it selects are quantised to 4 bits while the checkpoint is read, never
    /// held dense as a whole (`quant::load`).
    fn open(
        &self,
        dir: &Path,
        opts: OpenOptions,
        quant: Option<&QuantSpec>,
    ) -> Result<Box<dyn Pipeline>>;
    fn open_data(&self, dir: &Path, opts: &ProcessorOptions) -> Result<Box<dyn DataPipeline>>;
    /// Parameter count for a `config.json`, without building the model.
    fn num_parameters(&self, config: &serde_json::Value) -> Result<u64>;
    /// The model alone (no processor or template), for weight-only tools such as
    /// `merge-lora`.
    fn load_model(&self, dir: &Path, opts: OpenOptions) -> Result<Box<dyn Trainable>>;
}
