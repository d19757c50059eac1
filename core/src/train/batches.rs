//! Encoding, length fitting and collation of dataset records into device batches.

use std::sync::Arc;

use anyhow::{ensure, Context, Result};
use tch::Device;

use crate::config::{DataSection, OnBadSample, Overlength};
use crate::data::batch::length::{fit_length, Fitted};
use crate::data::dataset::Record;
use crate::data::prepare::{prepare, MediaOptions};
use crate::family::{BatchBuilder, EncodedSample, LoadedBatch};

/// Turns dataset indices into a device batch under the run's data settings (media options,
/// `max_length` / `overlength`, `on_bad_sample`, `train_on_prompt`, packing); runs on loader
/// threads. Training and evaluation (in training and `lmms-ft evaluate`) share it, so a
/// sample is encoded the same way in both.
pub struct BatchLoad {
    pub records: Arc<Vec<Record>>,
    builder: Arc<dyn BatchBuilder>,
    pub media: MediaOptions,
    max_length: usize,
    overlength: Overlength,
    on_bad_sample: OnBadSample,
    label_all: bool,
    /// `data.packing`.
    packing: bool,
    device: Device,
}

impl BatchLoad {
    pub fn new(
        records: Vec<Record>,
        builder: Arc<dyn BatchBuilder>,
        data: &DataSection,
        device: Device,
    ) -> Self {
        BatchLoad {
            records: Arc::new(records),
            builder,
            media: MediaOptions::from_config(data),
            max_length: data.max_length,
            overlength: data.overlength,
            on_bad_sample: data.on_bad_sample,
            label_all: data.train_on_prompt,
            packing: data.packing,
            device,
        }
    }

    /// The batch of `indices`, or `None` when every sample was left out.
    pub fn load(&self, indices: &[usize]) -> Result<Option<LoadedBatch>> {
        let mut samples = Vec::with_capacity(indices.len());
        for &i in indices {
            let record = self
                .records
                .get(i)
                .with_context(|| format!("sample index {i} is out of range"))?;
            let encoded = match self.encode(record) {
                Ok(encoded) => encoded,
                Err(e) => match self.on_bad_sample {
                    OnBadSample::Error => return Err(e),
                    OnBadSample::Skip => {
                        tracing::warn!("skipping sample at {}: {e:#}", record.location);
                        continue;
                    }
                },
            };
            if let Some(sample) = self.fit(record, encoded)? {
                samples.push(sample);
            }
        }
        if samples.is_empty() {
            return Ok(None);
        }
        if self.packing {
            return self
                .builder
                .collate_packed(samples, self.max_length, self.device)
                .map(Some);
        }
        self.builder.collate(samples, self.device).map(Some)
    }

    /// Decodes and encodes one record; failures here are bad samples.
    fn encode(&self, record: &Record) -> Result<EncodedSample> {
        let prepared = prepare(record, &self.media)?;
        self.builder
            .encode(&prepared, self.label_all)
            .with_context(|| format!("encoding sample at {}", record.location))
    }

    /// Applies `data.overlength`; `None` when the sample is dropped.
    fn fit(&self, record: &Record, mut sample: EncodedSample) -> Result<Option<EncodedSample>> {
        let builder = &self.builder;
        let text = std::mem::take(&mut sample.text);
        if text.input_ids.len() > self.max_length && self.overlength == Overlength::Truncate {
            let marked = text
                .input_ids
                .iter()
                .filter(|&&id| builder.is_media_token(id))
                .count();
            ensure!(
                marked == sample.media_tokens,
                "cannot truncate sample at {}: the model's template marks {marked} of its {} media tokens, so cutting could remove some",
                record.location,
                sample.media_tokens
            );
        }
        let fitted = fit_length(
            text,
            self.max_length,
            self.overlength,
            |id| builder.is_media_token(id),
            &record.location,
        )?;
        sample.text = match fitted {
            Fitted::Kept(text) => text,
            Fitted::Truncated { text, removed } => {
                tracing::debug!(
                    "truncated sample at {} by {removed} tokens",
                    record.location
                );
                text
            }
            Fitted::Dropped(reason) => {
                tracing::warn!("dropping sample at {}: {reason}", record.location);
                return Ok(None);
            }
        };
        Ok(Some(sample))
    }
}
