//! The collator skeleton every family shares: the core pads or packs the text of a batch
//! ([`TextBatch`]: ids, where the loss is taken, packed rows' positions and mask), the family
//! adds its media and positions in [`Collator::assemble`].

use anyhow::{bail, ensure, Result};
use tch::{Device, Tensor};

use super::EncodedText;
use crate::data::batch::{pack_batch, pad_batch, PaddingSide};
use crate::loss::LossTargets;

/// One encoded sample: its text (ids with media placeholders expanded, labels) and the
/// processor's media for it.
#[derive(Debug, Clone)]
pub struct Sample<M> {
    pub text: EncodedText,
    pub media: M,
}

/// The text side of a collated batch, which the core builds for every family and
/// [`Collator::assemble`] turns into the family's batch.
pub struct TextBatch {
    /// `[B, T]` token ids, right-padded with [`Collator::pad_id`].
    pub input_ids: Tensor,
    /// Where the loss is taken, found on the host while the labels were at hand.
    pub targets: Option<LossTargets>,
    /// Packed rows (`data.packing`) only.
    pub packed: Option<PackedText>,
}

/// What packing adds to the text of a batch.
pub struct PackedText {
    /// `[B, T]` positions restarting at 0 per sample (0 on padding).
    pub position_ids: Tensor,
    /// `[B, 1, T, T]` bool, true where a token may attend: within its own sample, causally.
    pub attention_mask: Tensor,
}

/// Where a sample sits in a batch: its row and the position of its first token there (0
/// unless rows are packed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub row: usize,
    pub offset: usize,
}

/// Builds a device batch from samples. The text is the core's (padding to the longest
/// sample, never to `max_length`; labels padded by [`super::IGNORE_INDEX`]; loss targets);
/// a family implements [`Collator::assemble`] for its media and positions.
pub trait Collator: Send + Sync {
    /// The processor's media of one sample.
    type Media: Send;
    /// `Send + 'static` so batches can be collated on loader threads.
    type Batch: Send + 'static;

    /// The id rows are padded with. Padding sits after every real token under causal
    /// attention and carries no label; it only must not be a media token.
    fn pad_id(&self) -> i64 {
        0
    }

    /// Whether [`Collator::assemble`] handles packed rows (`data.packing`): positions
    /// restarting per sample and attention confined to each ([`TextBatch::packed`]), so the
    /// model computes what it computes for the samples one by one. Packing is refused,
    /// naming the setting, for a family that keeps the default.
    fn packs(&self) -> bool {
        false
    }

    /// Adjusts a sample before its text is collated (e.g. a placeholder expansion the
    /// template cannot write). Nothing by default.
    fn prepare(&self, sample: &mut Sample<Self::Media>) -> Result<()> {
        let _ = sample;
        Ok(())
    }

    /// The family's batch: `text` as the core collated it and every sample's media, sample
    /// `i` of `samples` sitting at `placements[i]` (in placeholder order).
    fn assemble(
        &self,
        text: TextBatch,
        samples: Vec<Sample<Self::Media>>,
        placements: &[Placement],
        device: Device,
    ) -> Result<Self::Batch>;

    /// Pads `samples` (one per row) and moves the batch to `device`.
    fn collate(
        &self,
        mut samples: Vec<Sample<Self::Media>>,
        device: Device,
    ) -> Result<Self::Batch> {
        ensure!(!samples.is_empty(), "cannot collate an empty batch");
        for s in &mut samples {
            self.prepare(s)?;
        }
        let texts: Vec<&EncodedText> = samples.iter().map(|s| &s.text).collect();
        let padded = pad_batch(&texts, self.pad_id(), PaddingSide::Right)?;
        let placements: Vec<Placement> = (0..samples.len())
            .map(|row| Placement { row, offset: 0 })
            .collect();
        let text = TextBatch {
            input_ids: padded.input_ids.to_device(device),
            targets: Some(padded.targets.to_device(device)),
            packed: None,
        };
        self.assemble(text, samples, &placements, device)
    }

    /// `data.packing`: each inner list becomes one row, its samples concatenated in order
    /// (the text side is [`crate::data::batch::pack_batch`]).
    fn collate_packed(
        &self,
        mut rows: Vec<Vec<Sample<Self::Media>>>,
        device: Device,
    ) -> Result<Self::Batch> {
        if !self.packs() {
            bail!("this model family does not support data.packing; set it to false");
        }
        ensure!(!rows.is_empty(), "cannot collate an empty batch");
        for s in rows.iter_mut().flatten() {
            self.prepare(s)?;
        }
        let texts: Vec<Vec<&EncodedText>> = rows
            .iter()
            .map(|row| row.iter().map(|s| &s.text).collect())
            .collect();
        let packed = pack_batch(&texts, self.pad_id())?;
        let placements: Vec<Placement> = packed
            .cu_seqlens
            .iter()
            .zip(&rows)
            .enumerate()
            .flat_map(|(row, (starts, samples))| {
                starts.iter().take(samples.len()).map(move |&at| Placement {
                    row,
                    offset: at as usize,
                })
            })
            .collect();
        let text = TextBatch {
            input_ids: packed.input_ids.to_device(device),
            targets: Some(packed.targets.to_device(device)),
            packed: Some(PackedText {
                position_ids: packed.position_ids.to_device(device),
                attention_mask: packed.attention_mask.to_device(device),
            }),
        };
        self.assemble(
            text,
            rows.into_iter().flatten().collect(),
            &placements,
            device,
        )
    }
}
