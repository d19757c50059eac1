//! Epoch orders: which sample indices make up each batch, in which order.
//!
//! Every order is a pure function of `(seed, epoch)`, so resuming from a checkpoint needs
//! only [`SamplerState`] (epoch and batches already consumed): recomputing the epoch and
//! skipping the consumed batches gives exactly the batches an uninterrupted run would have
//! seen. Randomness comes from ChaCha8 (`rand_chacha`, whose output stream is fixed by its
//! specification) with our own Fisher–Yates and rejection sampling on `u64`, so the order
//! does not depend on the platform's pointer width or on `rand`'s range-sampling internals.

use anyhow::{bail, Result};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Where a run stands within its epochs; stored in checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SamplerState {
    pub epoch: u64,
    /// Batches of `epoch` already consumed.
    pub consumed: usize,
}

/// A deterministic source of batches.
pub trait BatchSampler: Send + Sync {
    /// All batches of `epoch`, each a list of dataset indices.
    fn epoch_batches(&self, epoch: u64) -> Vec<Vec<usize>>;

    /// The batches still to come after `state.consumed` batches of `state.epoch`.
    ///
    /// A `consumed` beyond the epoch's length means the checkpoint belongs to another
    /// dataset or batch size; that is an error rather than a silently empty epoch.
    fn resume(&self, state: SamplerState) -> Result<Vec<Vec<usize>>> {
        let mut batches = self.epoch_batches(state.epoch);
        if state.consumed > batches.len() {
            bail!(
                "cannot resume epoch {} after {} batches: the epoch has only {} batches \
                 (did the dataset or batch size change since the checkpoint?)",
                state.epoch,
                state.consumed,
                batches.len()
            );
        }
        Ok(batches.split_off(state.consumed))
    }
}

/// Uniform draw in `0..bound` (bound > 0) by rejection, unbiased and platform independent.
fn below(rng: &mut ChaCha8Rng, bound: u64) -> u64 {
    // Values under `threshold` would make the low residues more likely; 2^64 - threshold is
    // a multiple of `bound`.
    let threshold = bound.wrapping_neg() % bound;
    loop {
        let x = rng.next_u64();
        if x >= threshold {
            return x % bound;
        }
    }
}

/// A random permutation of `0..n`, fixed by `(seed, epoch)`: the epoch selects a separate
/// ChaCha stream, so epochs are independent without reseeding tricks.
pub fn permutation(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(epoch);
    let mut perm: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = below(&mut rng, i as u64 + 1) as usize;
        perm.swap(i, j);
    }
    perm
}

fn into_batches(order: Vec<usize>, batch_size: usize, drop_last: bool) -> Vec<Vec<usize>> {
    let mut batches: Vec<Vec<usize>> = order.chunks(batch_size).map(<[usize]>::to_vec).collect();
    if drop_last && batches.last().is_some_and(|b| b.len() < batch_size) {
        batches.pop();
    }
    batches
}

/// Plain shuffled batches (`RandomSampler` + `BatchSampler` in PyTorch terms).
#[derive(Debug, Clone)]
pub struct ShuffledSampler {
    len: usize,
    batch_size: usize,
    seed: u64,
    drop_last: bool,
}

impl ShuffledSampler {
    pub fn new(len: usize, batch_size: usize, seed: u64, drop_last: bool) -> Result<Self> {
        if batch_size == 0 {
            bail!("batch size must be at least 1");
        }
        Ok(ShuffledSampler {
            len,
            batch_size,
            seed,
            drop_last,
        })
    }
}

impl BatchSampler for ShuffledSampler {
    fn epoch_batches(&self, epoch: u64) -> Vec<Vec<usize>> {
        into_batches(
            permutation(self.len, self.seed, epoch),
            self.batch_size,
            self.drop_last,
        )
    }
}

/// Batches of similar length, as `transformers`' `LengthGroupedSampler`: a random
/// permutation is cut into megabatches of `mega_batch_mult × batch_size`, each sorted by
/// length (longest first, ties in permutation order), and the longest sample overall is
/// swapped to the front of the first megabatch so the first batch is the largest and an
/// out-of-memory shows at step one rather than hours in.
#[derive(Debug, Clone)]
pub struct LengthGroupedSampler {
    lengths: Vec<usize>,
    batch_size: usize,
    seed: u64,
    drop_last: bool,
    mega_batch_mult: usize,
}

impl LengthGroupedSampler {
    /// `lengths[i]` is the token length of sample `i`. The megabatch multiplier is
    /// `transformers`' default: `min(len / (4 × batch_size), 50)`, at least 1.
    pub fn new(lengths: Vec<usize>, batch_size: usize, seed: u64, drop_last: bool) -> Result<Self> {
        if batch_size == 0 {
            bail!("batch size must be at least 1");
        }
        let mega_batch_mult = (lengths.len() / (batch_size * 4)).clamp(1, 50);
        Ok(LengthGroupedSampler {
            lengths,
            batch_size,
            seed,
            drop_last,
            mega_batch_mult,
        })
    }

    /// Overrides the megabatch multiplier (`transformers`' `mega_batch_mult` argument).
    pub fn with_mega_batch_mult(mut self, mult: usize) -> Result<Self> {
        if mult == 0 {
            bail!("mega_batch_mult must be at least 1");
        }
        self.mega_batch_mult = mult;
        Ok(self)
    }

    pub fn megabatch_size(&self) -> usize {
        self.mega_batch_mult * self.batch_size
    }

    /// The flat sample order of `epoch` (before cutting into batches).
    pub fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let perm = permutation(self.lengths.len(), self.seed, epoch);
        let mut megabatches: Vec<Vec<usize>> = perm
            .chunks(self.megabatch_size())
            .map(|mb| {
                let mut mb = mb.to_vec();
                // Stable, like Python's `sorted(..., reverse=True)`.
                mb.sort_by(|&a, &b| self.lengths[b].cmp(&self.lengths[a]));
                mb
            })
            .collect();
        // First megabatch holding the maximum, as `torch.argmax` picks it.
        let mut max_idx = 0;
        for (i, mb) in megabatches.iter().enumerate() {
            if self.lengths[mb[0]] > self.lengths[megabatches[max_idx][0]] {
                max_idx = i;
            }
        }
        if max_idx != 0 {
            let longest = megabatches[max_idx][0];
            megabatches[max_idx][0] = megabatches[0][0];
            megabatches[0][0] = longest;
        }
        megabatches.into_iter().flatten().collect()
    }
}

impl BatchSampler for LengthGroupedSampler {
    fn epoch_batches(&self, epoch: u64) -> Vec<Vec<usize>> {
        into_batches(self.epoch_order(epoch), self.batch_size, self.drop_last)
    }
}
