//! The generation checks every family's tests run against `transformers`' greedy
//! `generate(do_sample=False)`, through the family contract (so a family added later gets
//! the same checks by calling [`check_generation`] with its fixture):
//!
//! - the pipeline's greedy reply equals transformers' tokens (which keep the stop token; the
//!   pipeline reports it as `stopped`);
//! - the prompt ids equal the oracle's, when it gives them;
//! - prefill + cached decode steps give transformers' logits at every step (≤ 1e-4), so the
//!   cache and the positions after the prompt are right, not only the argmax;
//! - cached decoding equals uncached: each step's logits equal those of a prefill of the
//!   whole sequence so far (≤ 1e-4);
//! - all prompts in one right-padded batch give every row's logits at every step (≤ 1e-4)
//!   and the pipeline's batched replies equal the one-by-one replies.

use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::max_abs_diff;
use crate::family::{
    ChatTemplate, Collator, DynFamily, EncodedText, Erased, Family, Model, OpenOptions,
    PreparedConversation, Processor, IGNORE_INDEX,
};
use crate::generate::GenerateOptions;

/// One prompt and what transformers generated from it.
pub struct GenerationCase {
    pub name: String,
    /// The conversation up to the last user turn (a trailing assistant turn is dropped by
    /// the template), with its media.
    pub conv: PreparedConversation,
    /// transformers' prompt ids, when the oracle recorded them.
    pub prompt_ids: Option<Vec<i64>>,
    /// transformers' new tokens, the stop token included when one ended the reply.
    pub generated: Vec<i64>,
    /// `[generated.len(), vocab]`: the logits each generated token was picked from.
    pub step_logits: Tensor,
    /// Largest difference to `step_logits` accepted: [`TOLERANCE`] unless our processor's
    /// pixels knowingly differ from transformers' (a different resize filter).
    pub logit_tolerance: f64,
}

/// Logit tolerance when the inputs are the same.
pub const TOLERANCE: f64 = 1e-4;

/// Runs every check of the module doc on the fixture checkpoint in `dir`; `max_new_tokens`
/// is what the oracle generated with.
pub fn check_generation<F: Family>(dir: &Path, cases: &[GenerationCase], max_new_tokens: usize) {
    assert!(
        cases.len() >= 3,
        "the batch check needs prompts of several lengths"
    );
    let opts = GenerateOptions {
        max_new_tokens,
        ..Default::default()
    };
    let family: &dyn DynFamily = &Erased::<F>::NEW;
    let pipeline = family
        .open(
            dir,
            OpenOptions {
                device: Device::Cpu,
                kind: Kind::Float,
                processor: Default::default(),
            },
            None,
        )
        .unwrap();
    let config = F::config(dir).unwrap();
    let model = F::load(&config, dir, Device::Cpu, Kind::Float).unwrap();
    let processor = F::processor(&config, dir, &Default::default()).unwrap();
    let template = F::template(&config, dir).unwrap();
    let collator = F::collator(&config);
    // Prompt ids of a case followed by `extra` tokens, as a typed batch of those rows.
    let batch_of = |rows: &[(&GenerationCase, &[i64])]| {
        let samples = rows
            .iter()
            .map(|(case, extra)| {
                let (media, tokens) = processor
                    .process(&case.conv.media.images, &case.conv.media.videos)
                    .unwrap();
                let mut input_ids = template
                    .encode_prompt(&case.conv.conversation, &tokens)
                    .unwrap();
                input_ids.extend_from_slice(extra);
                let labels = vec![IGNORE_INDEX; input_ids.len()];
                F::sample(EncodedText { input_ids, labels }, media)
            })
            .collect();
        collator.collate(samples, Device::Cpu).unwrap()
    };
    let prompt_len = |case: &GenerationCase| {
        let (_, tokens) = processor
            .process(&case.conv.media.images, &case.conv.media.videos)
            .unwrap();
        template
            .encode_prompt(&case.conv.conversation, &tokens)
            .unwrap()
    };
    tch::no_grad(|| {
        let mut lengths = Vec::new();
        for case in cases {
            let ids = prompt_len(case);
            if let Some(expected) = &case.prompt_ids {
                assert_eq!(&ids, expected, "{}: prompt ids", case.name);
            }
            lengths.push(ids.len());
            let n = case.generated.len();
            let (mut logits, mut state) = model
                .prefill(&batch_of(&[(case, &[])]), &[ids.len()])
                .unwrap();
            for (i, &token) in case.generated.iter().enumerate() {
                let d = max_abs_diff(&logits.get(0), &case.step_logits.get(i as i64));
                assert!(
                    d <= case.logit_tolerance,
                    "{}: step {i} logits differ by {d}",
                    case.name
                );
                if i > 0 {
                    let sofar = &case.generated[..i];
                    let len = ids.len() + i;
                    let (uncached, _) = model.prefill(&batch_of(&[(case, sofar)]), &[len]).unwrap();
                    let d = max_abs_diff(&logits, &uncached);
                    assert!(
                        d <= TOLERANCE,
                        "{}: step {i} cached vs uncached differ by {d}",
                        case.name
                    );
                }
                if i + 1 < n {
                    logits = model.decode_step(&mut state, &[token]).unwrap();
                }
            }
        }
        assert!(
            lengths.iter().any(|&l| l != lengths[0]),
            "the batch check needs prompts of different lengths, got {lengths:?}"
        );
        let rows: Vec<(&GenerationCase, &[i64])> = cases.iter().map(|c| (c, &[][..])).collect();
        let (mut logits, mut state) = model.prefill(&batch_of(&rows), &lengths).unwrap();
        let steps = cases.iter().map(|c| c.generated.len()).max().unwrap_or(0);
        for step in 0..steps {
            let mut feed = Vec::new();
            for (row, case) in cases.iter().enumerate() {
                if let Some(&token) = case.generated.get(step) {
                    let d =
                        max_abs_diff(&logits.get(row as i64), &case.step_logits.get(step as i64));
                    assert!(
                        d <= case.logit_tolerance,
                        "{}: batched step {step} logits differ by {d}",
                        case.name
                    );
                    feed.push(token);
                } else {
                    feed.push(*case.generated.last().expect("a token"));
                }
            }
            if step + 1 < steps {
                logits = model.decode_step(&mut state, &feed).unwrap();
            }
        }
        eprintln!(
            "batched prefill + decode of {} prompts (lengths {lengths:?}) match",
            cases.len()
        );
    });

    let mut singles = Vec::new();
    for case in cases {
        let out = pipeline.generate(&case.conv, &opts).unwrap();
        let mut ours = out.token_ids.clone();
        if out.stopped {
            ours.push(*case.generated.last().expect("a stop token"));
        }
        assert_eq!(ours, case.generated, "{}: generated tokens", case.name);
        eprintln!(
            "{}: generated {:?} ({:?})",
            case.name, case.generated, out.text
        );
        singles.push(out);
    }
    let convs: Vec<PreparedConversation> = cases
        .iter()
        .map(|c| PreparedConversation {
            conversation: c.conv.conversation.clone(),
            media: c.conv.media.clone(),
        })
        .collect();
    let batched = pipeline
        .generate_batch(&convs, &opts, &mut |_, _| {})
        .unwrap();
    for ((case, one), many) in cases.iter().zip(&singles).zip(&batched) {
        assert_eq!(
            one.token_ids, many.token_ids,
            "{}: batched tokens",
            case.name
        );
        assert_eq!(one.stopped, many.stopped, "{}: batched stop", case.name);
        assert_eq!(one.text, many.text, "{}: batched text", case.name);
    }
}
