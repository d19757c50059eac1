//! The contract between the core and a model-family adapter.
//!
//! An adapter implements [`Family`] with its own typed config, processed-media, sample and
//! batch types; nothing crosses as `dyn Any`. The core drives a family only through
//! [`DynFamily`], the object-safe face that [`Erased`] derives from any `Family`, so the
//! typed values never leave the generic code that owns them.
//!
//! The data flow of one training step is:
//! conversation + decoded media → [`Processor::process`] (tensors, token count per media)
//! → [`ChatTemplate::encode`] (ids with media placeholders expanded, labels)
//! → [`Family::sample`] → [`Collator::collate`] (a padded batch on the device)
//! → [`Model::hidden_states`] (final hidden states) → the core's [`LossHead`] (`lm_head` and
//! cross-entropy at the labeled positions only: summed loss, label count).

use std::any::Any;
use std::marker::PhantomData;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use tch::{nn, Device, Kind, Tensor};

use crate::data::batch::{plan_packing, PackStrategy};
use crate::data::{Conversation, DecodedMedia, RgbImage, VideoClip};
use crate::generate::{
    decode_loop, generation_config_eos, DecodeState, GenerateOptions, Generated, TextStream,
};
use crate::loss::{LossHead, LossTargets};
use crate::nn::Linear;
pub use crate::part::{Component, PerPart};
use crate::quant::{load_quantized, QuantSpec};

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

/// Builds a device batch from samples.
pub trait Collator: Send + Sync {
    type Sample: Send;
    type Batch;

    /// Pads to the longest sample in `samples` (never to `max_length`), with labels padded by
    /// [`IGNORE_INDEX`], and moves the result to `device`.
    fn collate(&self, samples: Vec<Self::Sample>, device: Device) -> Result<Self::Batch>;

    /// `data.packing`: each inner list becomes one row, its samples concatenated in order
    /// (rows right-padded to the longest), with attention confined to each sample and
    /// positions restarting per sample, so the model computes what it computes for the
    /// samples one by one (the text side is [`crate::data::batch::pack_batch`]). The default
    /// refuses, naming the setting.
    fn collate_packed(&self, rows: Vec<Vec<Self::Sample>>, device: Device) -> Result<Self::Batch> {
        let _ = (rows, device);
        anyhow::bail!("this model family does not support data.packing; set it to false")
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

/// A loaded model.
pub trait Model: Send {
    type Batch;

    /// Runs the model up to its final norm: hidden states `[batch, seq, hidden]`.
    fn hidden_states(&self, batch: &Self::Batch, train: bool) -> Result<Tensor>;

    /// Where the batch's loss is taken (built by the collator); `None` for a batch without
    /// labels.
    fn loss_targets<'a>(&self, batch: &'a Self::Batch) -> Option<&'a LossTargets>;

    /// The output projection (`lm_head`, or the tied embeddings): `[.., hidden]` →
    /// `[.., vocab]`.
    fn lm_head(&self, hidden: &Tensor) -> Tensor;

    /// Summed loss of the batch through the core's [`LossHead`] with its default chunking.
    /// Labels are shifted (position t predicts label t+1), as in `transformers`' causal-LM
    /// loss. Families do not override it: the loss is the core's, the same for all of them.
    fn forward(&self, batch: &Self::Batch, train: bool) -> Result<ModelOutput> {
        LossHead::default().forward(self, batch, train)
    }

    /// Full logits `[batch, seq, vocab]` of every position, for tools and tests that need
    /// them (inference, parity checks); training never builds them.
    fn logits(&self, batch: &Self::Batch) -> Result<Tensor> {
        Ok(self.lm_head(&self.hidden_states(batch, false)?))
    }

    /// The parameters, named exactly as in the Hub checkpoint (`model.layers.0...`).
    fn var_store(&self) -> &nn::VarStore;

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

    /// Which part of the model a parameter or module (Hub name) belongs to; the trainer
    /// freezes, fully trains or adapts each part and gives it its own learning rate.
    fn component(&self, name: &str) -> Component {
        let _ = name;
        Component::Llm
    }

    /// The module path `transformers` 5 uses at run time for a Hub name; PEFT adapters are
    /// keyed by it (Qwen2-VL: `model.layers.0` → `model.language_model.layers.0`), while
    /// checkpoints keep Hub names.
    fn runtime_name(&self, hub_name: &str) -> String {
        hub_name.to_string()
    }

    /// Other names older tools gave a module or parameter (Hub name) in adapter files, which
    /// loading an adapter accepts besides the Hub and runtime names (LLaVA: the original
    /// LLaVA repository's `model.layers.0...`). None by default.
    fn legacy_names(&self, hub_name: &str) -> Vec<String> {
        let _ = hub_name;
        Vec::new()
    }
}

/// The object-safe part of [`Model`] the trainer needs: parameters, linear layers, parts and
/// names, without the family's batch type.
pub trait Trainable {
    fn var_store(&self) -> &nn::VarStore;
    fn visit_linears(&mut self, f: &mut dyn FnMut(&str, &mut Linear));
    fn component(&self, name: &str) -> Component;
    fn runtime_name(&self, hub_name: &str) -> String;
    fn legacy_names(&self, hub_name: &str) -> Vec<String>;
    fn set_gradient_checkpointing(&mut self, on: bool);
}

impl<M: Model> Trainable for M {
    fn var_store(&self) -> &nn::VarStore {
        Model::var_store(self)
    }
    fn visit_linears(&mut self, f: &mut dyn FnMut(&str, &mut Linear)) {
        Model::visit_linears(self, f)
    }
    fn component(&self, name: &str) -> Component {
        Model::component(self, name)
    }
    fn runtime_name(&self, hub_name: &str) -> String {
        Model::runtime_name(self, hub_name)
    }
    fn legacy_names(&self, hub_name: &str) -> Vec<String> {
        Model::legacy_names(self, hub_name)
    }
    fn set_gradient_checkpointing(&mut self, on: bool) {
        Model::set_gradient_checkpointing(self, on)
    }
}

/// A model family: the typed bundle an adapter crate implements once.
pub trait Family: Send + Sync + 'static {
    type Config: HfConfig;
    type Processor: Processor;
    type Template: ChatTemplate;
    type Sample: Send;
    /// `Send + 'static` so batches can be collated on loader threads.
    type Batch: Send + 'static;
    type Collator: Collator<Sample = Self::Sample, Batch = Self::Batch>;
    type Model: Model<Batch = Self::Batch> + 'static;

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
    fn sample(text: EncodedText, media: <Self::Processor as Processor>::Media) -> Self::Sample;

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

/// Derives [`DynFamily`] for a `Family`. Adapters register `&Erased::<MyFamily>::NEW`.
pub struct Erased<F>(PhantomData<fn() -> F>);

impl<F> Erased<F> {
    pub const NEW: Self = Erased(PhantomData);
}

/// Processor + template of a family: turns a prepared conversation into a typed sample.
struct Encoder<F: Family> {
    processor: F::Processor,
    template: F::Template,
}

impl<F: Family> Encoder<F> {
    fn new(config: &F::Config, dir: &Path, opts: &ProcessorOptions) -> Result<Self> {
        Ok(Encoder {
            processor: F::processor(config, dir, opts)?,
            template: F::template(config, dir)?,
        })
    }

    fn encode(
        &self,
        item: &PreparedConversation,
    ) -> Result<(EncodedText, <F::Processor as Processor>::Media)> {
        let (media, tokens) = self
            .processor
            .process(&item.media.images, &item.media.videos)?;
        Ok((
            self.template.encode(&item.conversation, &tokens, false)?,
            media,
        ))
    }
}

impl<F: Family> DataPipeline for Encoder<F> {
    fn encoded_length(&self, conv: &PreparedConversation) -> Result<usize> {
        Ok(self.encode(conv)?.0.input_ids.len())
    }
}

struct Opened<F: Family> {
    encoder: Arc<Encoder<F>>,
    collator: Arc<F::Collator>,
    model: F::Model,
    device: Device,
    /// Template end-of-turn / end-of-sequence ids plus `generation_config.json`'s.
    stop_ids: Vec<i64>,
    loss_head: LossHead,
}

impl<F: Family> Pipeline for Opened<F> {
    fn data(&self) -> &dyn DataPipeline {
        self.encoder.as_ref()
    }

    fn forward(&self, batch: &[PreparedConversation], train: bool) -> Result<ModelOutput> {
        let mut samples = Vec::with_capacity(batch.len());
        for item in batch {
            let (text, media) = self.encoder.encode(item)?;
            samples.push(F::sample(text, media));
        }
        let batch = self.collator.collate(samples, self.device)?;
        self.loss_head.forward(&self.model, &batch, train)
    }

    fn var_store(&self) -> &nn::VarStore {
        Model::var_store(&self.model)
    }

    fn trainable(&mut self) -> &mut dyn Trainable {
        &mut self.model
    }

    fn generate_batch(
        &self,
        convs: &[PreparedConversation],
        opts: &GenerateOptions,
        on_text: &mut dyn FnMut(usize, &str),
    ) -> Result<Vec<Generated>> {
        anyhow::ensure!(!convs.is_empty(), "nothing to generate for");
        let mut samples = Vec::with_capacity(convs.len());
        let mut lengths = Vec::with_capacity(convs.len());
        for conv in convs {
            let (media, tokens) = self
                .encoder
                .processor
                .process(&conv.media.images, &conv.media.videos)?;
            let input_ids = self
                .encoder
                .template
                .encode_prompt(&conv.conversation, &tokens)?;
            lengths.push(input_ids.len());
            let labels = vec![IGNORE_INDEX; input_ids.len()];
            samples.push(F::sample(EncodedText { input_ids, labels }, media));
        }
        let batch = self.collator.collate(samples, self.device)?;
        let template = &self.encoder.template;
        let decode = |ids: &[i64]| template.decode(ids);
        let mut streams: Vec<TextStream> = convs.iter().map(|_| TextStream::new()).collect();
        let mut stream_err = None;
        let rows = tch::no_grad(|| -> Result<_> {
            let (logits, mut state) = self.model.prefill(&batch, &lengths)?;
            decode_loop(
                logits,
                &mut |tokens| self.model.decode_step(&mut state, tokens),
                &self.stop_ids,
                opts,
                &mut |row, id| match streams[row].push(id, &decode) {
                    Ok(piece) if !piece.is_empty() => on_text(row, &piece),
                    Ok(_) => {}
                    Err(e) => stream_err = Some(e),
                },
            )
        })?;
        if let Some(e) = stream_err {
            return Err(e);
        }
        rows.into_iter()
            .map(|row| {
                Ok(Generated {
                    text: template.decode(&row.token_ids)?,
                    token_ids: row.token_ids,
                    stopped: row.stopped,
                })
            })
            .collect()
    }

    fn batch_builder(&self) -> Arc<dyn BatchBuilder> {
        Arc::new(Builder::<F> {
            encoder: self.encoder.clone(),
            collator: self.collator.clone(),
        })
    }

    fn forward_loaded(&self, batch: &LoadedBatch, train: bool) -> Result<ModelOutput> {
        let typed = batch
            .batch
            .downcast_ref::<F::Batch>()
            .context("a batch built by another model's pipeline was passed to this one")?;
        self.loss_head.forward(&self.model, typed, train)
    }

    fn set_loss_head(&mut self, head: LossHead) {
        self.loss_head = head;
    }
}

fn open_with<F: Family>(
    dir: &Path,
    opts: OpenOptions,
    quant: Option<&QuantSpec>,
) -> Result<Box<dyn Pipeline>> {
    let config = F::config(dir)?;
    let encoder = Encoder::<F>::new(&config, dir, &opts.processor)?;
    let mut stop_ids = encoder.template.stop_token_ids();
    stop_ids.extend(generation_config_eos(dir));
    stop_ids.sort_unstable();
    stop_ids.dedup();
    let load = || F::load(&config, dir, opts.device, opts.kind);
    let model = match quant {
        None => load()?,
        Some(spec) => {
            let (model, done) = load_quantized(opts.kind, spec, load)?;
            tracing::info!(
                quantized = done.quantized,
                dense = done.dense,
                "quantised {} linear layers to {} ({:.1} MiB)",
                done.quantized,
                spec.options.quant_type,
                done.quantized_bytes as f64 / (1 << 20) as f64
            );
            model
        }
    };
    Ok(Box::new(Opened::<F> {
        encoder: Arc::new(encoder),
        collator: Arc::new(F::collator(&config)),
        model,
        device: opts.device,
        stop_ids,
        loss_head: LossHead::default(),
    }))
}

impl<F: Family> DynFamily for Erased<F> {
    fn open(
        &self,
        dir: &Path,
        opts: OpenOptions,
        quant: Option<&QuantSpec>,
    ) -> Result<Box<dyn Pipeline>> {
        open_with::<F>(dir, opts, quant)
    }

    fn open_data(&self, dir: &Path, opts: &ProcessorOptions) -> Result<Box<dyn DataPipeline>> {
        let config = F::config(dir)?;
        Ok(Box::new(Encoder::<F>::new(&config, dir, opts)?))
    }

    fn num_parameters(&self, config: &serde_json::Value) -> Result<u64> {
        Ok(F::Config::from_hf_json(config)?.num_parameters())
    }

    fn load_model(&self, dir: &Path, opts: OpenOptions) -> Result<Box<dyn Trainable>> {
        let config = F::config(dir)?;
        Ok(Box::new(F::load(&config, dir, opts.device, opts.kind)?))
    }
}

// ---- Batch building off the training thread -------------------------------------------------
//
// The trainer's loader threads encode and collate while the model trains, without knowing
// the family. The typed sample media and batch travel boxed as `Any` between two calls of the
// same generic `Builder<F>` / `Opened<F>`, never through adapter code, and a mismatch is an
// error rather than a panic.

/// One encoded sample: its text (which the caller may shorten to fit `max_length`, never
/// removing media tokens) and its processed media, opaque until collation.
pub struct EncodedSample {
    pub text: EncodedText,
    /// Media tokens the processor asked for (sum over the sample's images and videos).
    pub media_tokens: usize,
    media: Box<dyn Any + Send>,
}

impl EncodedSample {
    /// Tokens of the sample.
    pub fn len(&self) -> usize {
        self.text.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.text.input_ids.is_empty()
    }
}

/// A collated device batch, ready for [`Pipeline::forward_loaded`].
pub struct LoadedBatch {
    batch: Box<dyn Any + Send>,
    /// Samples in the batch.
    pub samples: usize,
    /// Tokens of the batch without padding.
    pub tokens: usize,
}

/// A family's encoding and collation, usable from any thread.
pub trait BatchBuilder: Send + Sync {
    /// Processes the media and encodes the conversation (`label_all`: label the prompt too).
    fn encode(&self, item: &PreparedConversation, label_all: bool) -> Result<EncodedSample>;
    /// See [`ChatTemplate::is_media_token`].
    fn is_media_token(&self, id: i64) -> bool;
    /// Pads and moves samples to `device`.
    fn collate(&self, samples: Vec<EncodedSample>, device: Device) -> Result<LoadedBatch>;
    /// Packs samples, in order, into rows of at most `max_length` tokens
    /// ([`Collator::collate_packed`]) and moves them to `device`.
    fn collate_packed(
        &self,
        samples: Vec<EncodedSample>,
        max_length: usize,
        device: Device,
    ) -> Result<LoadedBatch>;
}

struct Builder<F: Family> {
    encoder: Arc<Encoder<F>>,
    collator: Arc<F::Collator>,
}

impl<F: Family> BatchBuilder for Builder<F> {
    fn encode(&self, item: &PreparedConversation, label_all: bool) -> Result<EncodedSample> {
        let (media, tokens) = self
            .encoder
            .processor
            .process(&item.media.images, &item.media.videos)?;
        let text = self
            .encoder
            .template
            .encode(&item.conversation, &tokens, label_all)?;
        Ok(EncodedSample {
            text,
            media_tokens: tokens.images.iter().chain(&tokens.videos).sum(),
            media: Box::new(media),
        })
    }

    fn is_media_token(&self, id: i64) -> bool {
        self.encoder.template.is_media_token(id)
    }

    fn collate(&self, samples: Vec<EncodedSample>, device: Device) -> Result<LoadedBatch> {
        let (n, tokens) = (samples.len(), samples.iter().map(EncodedSample::len).sum());
        let typed = Self::typed(samples)?;
        Ok(LoadedBatch {
            batch: Box::new(self.collator.collate(typed, device)?),
            samples: n,
            tokens,
        })
    }

    fn collate_packed(
        &self,
        samples: Vec<EncodedSample>,
        max_length: usize,
        device: Device,
    ) -> Result<LoadedBatch> {
        let lengths: Vec<usize> = samples.iter().map(EncodedSample::len).collect();
        let (n, tokens) = (samples.len(), lengths.iter().sum());
        // Greedy keeps the samples in order, so each row is a run of consecutive samples.
        let plan = plan_packing(&lengths, max_length, PackStrategy::Greedy)?;
        let mut typed = Self::typed(samples)?.into_iter();
        let rows = plan
            .iter()
            .map(|row| typed.by_ref().take(row.len()).collect())
            .collect();
        Ok(LoadedBatch {
            batch: Box::new(self.collator.collate_packed(rows, device)?),
            samples: n,
            tokens,
        })
    }
}

impl<F: Family> Builder<F> {
    fn typed(samples: Vec<EncodedSample>) -> Result<Vec<F::Sample>> {
        samples
            .into_iter()
            .map(|s| {
                let media = s
                    .media
                    .downcast::<<F::Processor as Processor>::Media>()
                    .map_err(|_| {
                        anyhow::anyhow!("a sample encoded by another model was collated")
                    })?;
                Ok(F::sample(s.text, *media))
            })
            .collect()
    }
}
