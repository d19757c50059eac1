//! What to do with a sample longer than `max_length`.
//!
//! Media tokens are never cut: each one stands for a slice of the processed media (patch
//! embeddings are scattered into exactly those positions), so removing one would leave the
//! model with more media features than placeholders. The caller says which ids are media
//! through a predicate; a family whose media block is wrapped in start/end markers (e.g.
//! `<|vision_start|>` … `<|vision_end|>`) can include the markers in the predicate to keep
//! them with the block.
//!
//! Labels follow their tokens: truncation removes the same positions from `input_ids` and
//! `labels`, so every kept token keeps exactly the label it had. Because the causal-LM loss
//! shifts labels by one inside the model, a kept token that used to be followed by a removed
//! one now "predicts" the next kept label; with the usual cut (a tail of the sequence) this
//! only shortens the target, which is what `transformers`' `truncation=True` does too.

use std::fmt;

use anyhow::{bail, Result};

use crate::config::Overlength;
use crate::family::EncodedText;

/// Why a sample could not be kept within `max_length`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OverlengthReason {
    /// Longer than `max_length` under the `drop` / `error` policies.
    TooLong { len: usize, max_length: usize },
    /// Its media tokens alone exceed `max_length`, so no truncation can fit it.
    MediaExceeds {
        media_tokens: usize,
        max_length: usize,
    },
}

impl fmt::Display for OverlengthReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OverlengthReason::TooLong { len, max_length } => {
                write!(f, "{len} tokens exceed max_length {max_length}")
            }
            OverlengthReason::MediaExceeds {
                media_tokens,
                max_length,
            } => write!(
                f,
                "its {media_tokens} media tokens alone exceed max_length {max_length} \
                 (media tokens are never cut; raise max_length or lower the image/video resolution)"
            ),
        }
    }
}

/// The result of [`fit_length`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fitted {
    /// Already within `max_length`; unchanged.
    Kept(EncodedText),
    /// Text tokens were removed to fit.
    Truncated {
        text: EncodedText,
        /// How many tokens were removed.
        removed: usize,
    },
    /// Left out under the `drop` policy (or `truncate` when media alone are too long); the
    /// caller counts and logs these.
    Dropped(OverlengthReason),
}

/// Applies the overlength policy to one encoded sample.
///
/// `sample` names the sample in errors (e.g. `"train.jsonl record 17"`). `is_media` tells
/// which ids must never be removed.
///
/// - `Drop`: too-long samples become [`Fitted::Dropped`].
/// - `Error`: too-long samples are an error naming the sample.
/// - `Truncate`: text tokens are removed starting from the end of the sequence, skipping
///   over (keeping) media tokens, until the sample fits. If the media tokens alone exceed
///   `max_length` the sample is dropped with [`OverlengthReason::MediaExceeds`].
///
/// An `EncodedText` whose `labels` and `input_ids` lengths differ is a bug in the template
/// that produced it, reported as an error rather than silently mislabeling.
pub fn fit_length(
    text: EncodedText,
    max_length: usize,
    policy: Overlength,
    is_media: impl Fn(i64) -> bool,
    sample: impl fmt::Display,
) -> Result<Fitted> {
    let len = text.input_ids.len();
    if text.labels.len() != len {
        bail!(
            "sample {sample}: {} labels for {len} input ids (they must be equal)",
            text.labels.len()
        );
    }
    if len <= max_length {
        return Ok(Fitted::Kept(text));
    }
    match policy {
        Overlength::Drop => Ok(Fitted::Dropped(OverlengthReason::TooLong { len, max_length })),
        Overlength::Error => bail!(
            "sample {sample}: {} (data.overlength = \"error\"; use \"drop\" or \"truncate\" to continue)",
            OverlengthReason::TooLong { len, max_length }
        ),
        Overlength::Truncate => {
            let media_tokens = text.input_ids.iter().filter(|&&id| is_media(id)).count();
            if media_tokens > max_length {
                return Ok(Fitted::Dropped(OverlengthReason::MediaExceeds {
                    media_tokens,
                    max_length,
                }));
            }
            // Walk backwards marking the last `excess` text tokens for removal.
            let mut excess = len - max_length;
            let mut keep = vec![true; len];
            for (pos, &id) in text.input_ids.iter().enumerate().rev() {
                if excess == 0 {
                    break;
                }
                if !is_media(id) {
                    keep[pos] = false;
                    excess -= 1;
                }
            }
            let mut out = EncodedText {
                input_ids: Vec::with_capacity(max_length),
                labels: Vec::with_capacity(max_length),
            };
            for (pos, kept) in keep.iter().enumerate() {
                if *kept {
                    out.input_ids.push(text.input_ids[pos]);
                    out.labels.push(text.labels[pos]);
                }
            }
            Ok(Fitted::Truncated {
                removed: len - out.input_ids.len(),
                text: out,
            })
        }
    }
}
