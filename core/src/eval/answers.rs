//! `evaluate --generate` (and generation during training): each sample's last assistant
//! turn is taken as its reference, the model generates a reply to the conversation before
//! it, and the reply is scored against the reference ([`super::metrics`]).

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::data::dataset::Record;
use crate::data::prepare::{prepare, MediaOptions};
use crate::data::{Part, Role};
use crate::family::{Pipeline, PreparedConversation};
use crate::generate::GenerateOptions;

use super::metrics::Scores;

/// One sample's prediction next to its reference.
#[derive(Debug, Clone, Serialize)]
pub struct Answer {
    /// Position of the sample in the dataset.
    pub index: usize,
    /// Where the sample is (file and record), for finding it again.
    pub location: String,
    pub reference: String,
    pub prediction: String,
    pub num_new_tokens: usize,
    /// Whether an end-of-turn token ended the prediction (rather than `max_new_tokens`).
    pub stopped: bool,
    #[serde(flatten)]
    pub scores: Scores,
}

/// Mean scores over the samples, and every sample's answer.
#[derive(Debug, Clone, Serialize)]
pub struct AnswerReport {
    #[serde(flatten)]
    pub mean: Scores,
    pub num_samples: usize,
    pub samples: Vec<Answer>,
}

/// The prompt (the conversation without its last turn) and the reference (that turn's
/// text) of a record. A record not ending in an assistant text turn is an error naming it.
pub fn split_reference(
    record: &Record,
    media: &MediaOptions,
) -> Result<(PreparedConversation, String)> {
    let mut prepared = prepare(record, media)?;
    let last = prepared.conversation.turns.pop();
    let Some(last) = last.filter(|t| t.role == Role::Assistant) else {
        bail!(
            "sample at {} does not end with an assistant turn to generate",
            record.location
        );
    };
    let mut reference = String::new();
    for part in &last.parts {
        match part {
            Part::Text { text } => reference.push_str(text),
            _ => bail!(
                "sample at {}: the assistant turn to generate holds media",
                record.location
            ),
        }
    }
    Ok((prepared, reference))
}

/// Generates an answer for each of `records` (`(index, record)`), `batch_size` prompts at
/// a time, and scores them.
pub fn generate_answers(
    pipeline: &dyn Pipeline,
    records: &[(usize, Record)],
    media: &MediaOptions,
    opts: &GenerateOptions,
    batch_size: usize,
) -> Result<AnswerReport> {
    if records.is_empty() {
        bail!("no samples to generate answers for");
    }
    let mut samples = Vec::with_capacity(records.len());
    for chunk in records.chunks(batch_size.max(1)) {
        let mut prompts = Vec::with_capacity(chunk.len());
        let mut references = Vec::with_capacity(chunk.len());
        for (_, record) in chunk {
            let (prompt, reference) = split_reference(record, media)?;
            prompts.push(prompt);
            references.push(reference);
        }
        let replies = pipeline
            .generate_batch(&prompts, opts, &mut |_, _| {})
            .with_context(|| {
                format!(
                    "generating answers for the samples from {}",
                    chunk[0].1.location
                )
            })?;
        for (((index, record), reference), reply) in chunk.iter().zip(references).zip(replies) {
            let prediction = reply.text.trim().to_string();
            samples.push(Answer {
                index: *index,
                location: record.location.to_string(),
                scores: Scores::of(&prediction, &reference),
                reference,
                prediction,
                num_new_tokens: reply.token_ids.len(),
                stopped: reply.stopped,
            });
        }
    }
    let scores: Vec<Scores> = samples.iter().map(|a| a.scores).collect();
    Ok(AnswerReport {
        mean: Scores::mean(&scores),
        num_samples: samples.len(),
        samples,
    })
}
