//! Sequence packing: several samples share one row of at most `max_length` tokens, so a
//! batch wastes no compute on padding.
//!
//! Packing is only correct if the model cannot tell a packed row from the samples run one
//! by one. Three things make that so:
//! - attention is block-diagonal and causal ([`block_causal_mask`]): a token sees only
//!   earlier tokens of its own sample;
//! - position ids restart at 0 for every sample;
//! - the first label of every sample is [`IGNORE_INDEX`], as in `transformers`'
//!   `DataCollatorWithFlattening`: the causal-LM loss shifts labels by one, so without this
//!   the last token of a sample would be trained to predict the first token of the next.
//!   (A sample's own first label is never a target when it runs alone, so this drops nothing.)
//!
//! Families with their own position scheme (e.g. Qwen2-VL's 3-D rotary positions) compute
//! positions per sample and concatenate them using [`PackedRow::cu_seqlens`].

use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};

use crate::family::{EncodedText, IGNORE_INDEX};
use crate::loss::LossTargets;

/// How samples are assigned to rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PackStrategy {
    /// Fill rows in the given order, opening a new row when the next sample does not fit.
    /// Keeps the sampler's order (so resuming and shuffling mean what they say), at the cost
    /// of some unused space per row. The default.
    #[default]
    Greedy,
    /// Longest first, each into the first row with room (ties keep input order). Fills rows
    /// better but groups samples by length within the window it is given, so callers pass a
    /// window (e.g. a shuffled chunk), not a whole sorted dataset.
    FirstFitDecreasing,
}

/// One packed row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedRow {
    pub input_ids: Vec<i64>,
    /// Concatenated labels with each sample's first label set to [`IGNORE_INDEX`].
    pub labels: Vec<i64>,
    /// Per-sample positions, restarting at 0.
    pub position_ids: Vec<i64>,
    /// Sample boundaries: `[0, len₀, len₀+len₁, …, row_len]` (flash-attention's `cu_seqlens`).
    pub cu_seqlens: Vec<i64>,
}

impl PackedRow {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }
}

/// Assigns samples of the given lengths to rows of at most `max_length` tokens. Returns,
/// per row, positions into `lengths`.
///
/// Every sample must already fit (run [`super::fit_length`] first) and be non-empty; an
/// empty sample would be an invisible zero-width segment, which points at a bug upstream.
pub fn plan_packing(
    lengths: &[usize],
    max_length: usize,
    strategy: PackStrategy,
) -> Result<Vec<Vec<usize>>> {
    for (i, &len) in lengths.iter().enumerate() {
        if len == 0 {
            bail!("cannot pack sample {i}: it has no tokens");
        }
        if len > max_length {
            bail!(
                "cannot pack sample {i}: {len} tokens exceed max_length {max_length} \
                 (apply the overlength policy before packing)"
            );
        }
    }
    let mut rows: Vec<Vec<usize>> = Vec::new();
    match strategy {
        PackStrategy::Greedy => {
            let mut used = 0;
            for (i, &len) in lengths.iter().enumerate() {
                match rows.last_mut() {
                    Some(row) if used + len <= max_length => {
                        row.push(i);
                        used += len;
                    }
                    _ => {
                        rows.push(vec![i]);
                        used = len;
                    }
                }
            }
        }
        PackStrategy::FirstFitDecreasing => {
            let mut order: Vec<usize> = (0..lengths.len()).collect();
            order.sort_by(|&a, &b| lengths[b].cmp(&lengths[a]));
            let mut used: Vec<usize> = Vec::new();
            for i in order {
                match used.iter().position(|&u| u + lengths[i] <= max_length) {
                    Some(r) => {
                        rows[r].push(i);
                        used[r] += lengths[i];
                    }
                    None => {
                        rows.push(vec![i]);
                        used.push(lengths[i]);
                    }
                }
            }
        }
    }
    Ok(rows)
}

/// Concatenates samples into one row (see the module docs for the label and position rules).
pub fn pack_row(samples: &[&EncodedText]) -> Result<PackedRow> {
    if samples.is_empty() {
        bail!("cannot pack an empty row");
    }
    let total: usize = samples.iter().map(|s| s.input_ids.len()).sum();
    let mut row = PackedRow {
        input_ids: Vec::with_capacity(total),
        labels: Vec::with_capacity(total),
        position_ids: Vec::with_capacity(total),
        cu_seqlens: vec![0],
    };
    for (i, s) in samples.iter().enumerate() {
        let n = s.input_ids.len();
        if n == 0 {
            bail!("cannot pack row sample {i}: it has no tokens");
        }
        if s.labels.len() != n {
            bail!(
                "row sample {i}: {} labels for {n} input ids",
                s.labels.len()
            );
        }
        row.input_ids.extend_from_slice(&s.input_ids);
        row.labels.push(IGNORE_INDEX);
        row.labels.extend_from_slice(&s.labels[1..]);
        row.position_ids.extend(0..n as i64);
        row.cu_seqlens.push(row.input_ids.len() as i64);
    }
    Ok(row)
}

/// Block-diagonal causal mask `[T, T]` (bool, `true` = may attend) for a row whose samples
/// end at `cu_seqlens` and which is padded to `total_len`.
///
/// Real tokens never see padding. A padding query sees only itself: a fully masked softmax
/// row would be NaN, and NaN in outputs that are ignored still poisons gradients.
pub fn block_causal_mask(cu_seqlens: &[i64], total_len: i64, device: Device) -> Result<Tensor> {
    let segments = segment_ids(cu_seqlens, total_len)?;
    let seg = Tensor::from_slice(&segments).to_device(device);
    let same = seg.unsqueeze(1).eq_tensor(&seg.unsqueeze(0));
    let causal = Tensor::ones([total_len, total_len], (Kind::Bool, device)).tril(0);
    Ok(same.logical_and(&causal))
}

/// The same mask as an additive float bias (0 where allowed, -inf elsewhere), the form
/// `scaled_dot_product_attention` and eager attention add to the scores.
pub fn block_causal_mask_additive(
    cu_seqlens: &[i64],
    total_len: i64,
    kind: Kind,
    device: Device,
) -> Result<Tensor> {
    let allowed = block_causal_mask(cu_seqlens, total_len, device)?;
    Ok(Tensor::zeros([total_len, total_len], (kind, device))
        .masked_fill(&allowed.logical_not(), f64::NEG_INFINITY))
}

/// Segment index of every position; each padding position gets a segment of its own.
fn segment_ids(cu_seqlens: &[i64], total_len: i64) -> Result<Vec<i64>> {
    if cu_seqlens.first() != Some(&0) {
        bail!("cu_seqlens must start at 0, got {cu_seqlens:?}");
    }
    if cu_seqlens.windows(2).any(|w| w[1] < w[0]) {
        bail!("cu_seqlens must not decrease, got {cu_seqlens:?}");
    }
    let used = *cu_seqlens.last().unwrap_or(&0);
    if used > total_len {
        bail!("cu_seqlens end at {used}, beyond the padded length {total_len}");
    }
    let mut ids = Vec::with_capacity(total_len as usize);
    for (seg, w) in cu_seqlens.windows(2).enumerate() {
        ids.extend(std::iter::repeat_n(seg as i64, (w[1] - w[0]) as usize));
    }
    let segments = cu_seqlens.len() as i64 - 1;
    ids.extend((used..total_len).map(|p| segments + p));
    Ok(ids)
}

/// Packed rows padded into a batch, on the CPU until [`PackedBatch::to_device`].
#[derive(Debug)]
pub struct PackedBatch {
    /// `[B, T]` i64, padded with the pad id.
    pub input_ids: Tensor,
    /// `[B, T]` i64, padded with [`IGNORE_INDEX`].
    pub labels: Tensor,
    /// `[B, T]` i64, restarting at 0 per sample; 0 on padding.
    pub position_ids: Tensor,
    /// `[B, 1, T, T]` bool, `true` = may attend (broadcasts over heads).
    pub attention_mask: Tensor,
    /// Per row, the sample boundaries.
    pub cu_seqlens: Vec<Vec<i64>>,
    /// Where the loss is taken; never across a sample boundary, since each sample's first
    /// label is [`IGNORE_INDEX`] in its row.
    pub targets: LossTargets,
}

impl PackedBatch {
    pub fn to_device(self, device: Device) -> PackedBatch {
        PackedBatch {
            input_ids: self.input_ids.to_device(device),
            labels: self.labels.to_device(device),
            position_ids: self.position_ids.to_device(device),
            attention_mask: self.attention_mask.to_device(device),
            cu_seqlens: self.cu_seqlens,
            targets: self.targets.to_device(device),
        }
    }
}

/// Right-pads packed rows to the longest row and builds their masks.
pub fn collate_packed(rows: &[PackedRow], pad_id: i64) -> Result<PackedBatch> {
    if rows.is_empty() {
        bail!("cannot collate an empty packed batch");
    }
    let b = rows.len();
    let t = rows.iter().map(PackedRow::len).max().unwrap_or(0);
    let mut ids = vec![pad_id; b * t];
    let mut labels = vec![IGNORE_INDEX; b * t];
    let mut pos = vec![0i64; b * t];
    let mut masks = Vec::with_capacity(b);
    for (r, row) in rows.iter().enumerate() {
        let n = row.len();
        if row.labels.len() != n || row.position_ids.len() != n {
            bail!("packed row {r}: ids, labels and position ids differ in length");
        }
        if row.cu_seqlens.last() != Some(&(n as i64)) {
            bail!(
                "packed row {r}: cu_seqlens {:?} do not end at its length {n}",
                row.cu_seqlens
            );
        }
        ids[r * t..r * t + n].copy_from_slice(&row.input_ids);
        labels[r * t..r * t + n].copy_from_slice(&row.labels);
        pos[r * t..r * t + n].copy_from_slice(&row.position_ids);
        masks.push(block_causal_mask(&row.cu_seqlens, t as i64, Device::Cpu)?);
    }
    let shape = [b as i64, t as i64];
    Ok(PackedBatch {
        input_ids: Tensor::from_slice(&ids).reshape(shape),
        labels: Tensor::from_slice(&labels).reshape(shape),
        position_ids: Tensor::from_slice(&pos).reshape(shape),
        attention_mask: Tensor::stack(&masks, 0).unsqueeze(1),
        cu_seqlens: rows.iter().map(|r| r.cu_seqlens.clone()).collect(),
        targets: LossTargets::from_samples(
            rows.iter()
                .enumerate()
                .map(|(r, row)| (r * t, row.labels.as_slice())),
        ),
    })
}

/// Packs each row's samples ([`pack_row`]) and collates the rows ([`collate_packed`]): the
/// text side of a family's packed collation.
pub fn pack_batch(rows: &[Vec<&EncodedText>], pad_id: i64) -> Result<PackedBatch> {
    let packed = rows
        .iter()
        .enumerate()
        .map(|(r, row)| pack_row(row).with_context(|| format!("packing row {r}")))
        .collect::<Result<Vec<_>>>()?;
    collate_packed(&packed, pad_id)
}
