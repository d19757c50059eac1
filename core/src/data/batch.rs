//! Turning encoded samples into batches: the length policy ([`length`]), dynamic padding
//! ([`pad`]), epoch orders ([`sampler`]) and sequence packing ([`pack`]).
//!
//! The stages are deliberately independent functions over [`EncodedText`] so that every
//! family's collator can reuse them and keep only its media handling to itself.
//!
//! [`EncodedText`]: crate::family::EncodedText

pub mod length;
pub mod pack;
pub mod pad;
pub mod sampler;

pub use length::{fit_length, Fitted, OverlengthReason};
pub use pack::{
    block_causal_mask, block_causal_mask_additive, collate_packed, pack_batch, pack_row,
    plan_packing, PackStrategy, PackedBatch, PackedRow,
};
pub use pad::{pad_batch, PaddedBatch, PaddingSide};
pub use sampler::{permutation, BatchSampler, LengthGroupedSampler, SamplerState, ShuffledSampler};
