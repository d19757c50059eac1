//! The erased face of a family: [`Erased<F>`] derives [`DynFamily`] for any [`Family`], and
//! the pipeline and batch builder it opens keep the family's types inside this generic code.
//! Samples and batches cross the trainer's loader threads boxed, between two calls of the
//! same `Builder<F>` / `Opened<F>`, never through adapter code; a mismatch is an error
//! rather than a panic.

use std::any::Any;
use std::marker::PhantomData;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use tch::{nn, Device};

use super::{
    ChatTemplate, Collator, DataPipeline, DynFamily, EncodedText, Family, HfConfig, Media,
    ModelOutput, OpenOptions, Pipeline, PreparedConversation, Processor, ProcessorOptions, Sample,
    Trainable, IGNORE_INDEX,
};
use crate::data::batch::{plan_packing, PackStrategy};
use crate::generate::{generate_batch, generation_config_eos, GenerateOptions, Generated};
use crate::loss::LossHead;
use crate::quant::{load_quantized, QuantSpec};

/// Derives [`DynFamily`] for a `Family`. Adapters register `&Erased::<MyFamily>::NEW`.
pub struct Erased<F>(PhantomData<fn() -> F>);

impl<F> Erased<F> {
    pub const NEW: Self = Erased(PhantomData);
}

/// Processor + template of a family: the one place a prepared conversation becomes a typed
/// sample (media processed, then the text encoded with the media's token counts).
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

    /// A training sample (`label_all`: label the prompt too), or with `prompt` the
    /// generation prompt (nothing labeled); and the number of media tokens it holds.
    fn sample(
        &self,
        item: &PreparedConversation,
        label_all: bool,
        prompt: bool,
    ) -> Result<(Sample<Media<F>>, usize)> {
        let (media, tokens) = self
            .processor
            .process(&item.media.images, &item.media.videos)?;
        let text = if prompt {
            let input_ids = self.template.encode_prompt(&item.conversation, &tokens)?;
            let labels = vec![IGNORE_INDEX; input_ids.len()];
            EncodedText { input_ids, labels }
        } else {
            self.template
                .encode(&item.conversation, &tokens, label_all)?
        };
        let media_tokens = tokens.images.iter().chain(&tokens.videos).sum();
        Ok((Sample { text, media }, media_tokens))
    }
}

impl<F: Family> DataPipeline for Encoder<F> {
    fn encoded_length(&self, conv: &PreparedConversation) -> Result<usize> {
        Ok(self.sample(conv, false, false)?.0.text.input_ids.len())
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
        let samples = batch
            .iter()
            .map(|item| Ok(self.encoder.sample(item, false, false)?.0))
            .collect::<Result<Vec<_>>>()?;
        let batch = self.collator.collate(samples, self.device)?;
        self.loss_head.forward(&self.model, &batch, train)
    }

    fn var_store(&self) -> &nn::VarStore {
        self.model.var_store()
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
        let samples = convs
            .iter()
            .map(|conv| Ok(self.encoder.sample(conv, false, true)?.0))
            .collect::<Result<Vec<_>>>()?;
        let lengths: Vec<usize> = samples.iter().map(|s| s.text.input_ids.len()).collect();
        let batch = self.collator.collate(samples, self.device)?;
        generate_batch(
            &self.model,
            &batch,
            &lengths,
            &self.encoder.template,
            &self.stop_ids,
            opts,
            on_text,
        )
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
            .downcast_ref::<<F::Collator as Collator>::Batch>()
            .context("a batch built by another model's pipeline was passed to this one")?;
        self.loss_head.forward(&self.model, typed, train)
    }

    fn set_loss_head(&mut self, head: LossHead) {
        self.loss_head = head;
    }
}

impl<F: Family> DynFamily for Erased<F> {
    fn open(
        &self,
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
        let (sample, media_tokens) = self.encoder.sample(item, label_all, false)?;
        Ok(EncodedSample {
            text: sample.text,
            media_tokens,
            media: Box::new(sample.media),
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
    fn typed(samples: Vec<EncodedSample>) -> Result<Vec<Sample<Media<F>>>> {
        samples
            .into_iter()
            .map(|s| {
                let media = s.media.downcast::<Media<F>>().map_err(|_| {
                    anyhow::anyhow!("a sample encoded by another model was collated")
                })?;
                Ok(Sample {
                    text: s.text,
                    media: *media,
                })
            })
            .collect()
    }
}
