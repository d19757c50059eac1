//! Truncation, padding, samplers and packing.
//!
//! Expectations are hand-computed on crafted samples, checked as properties over random
//! inputs, or (for the length-grouped order) produced by `transformers`' own
//! `get_length_grouped_indices`. Packing is proven correct by running a small random
//! attention layer on packed rows and on each sample alone.

use std::collections::HashSet;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use lmms_ft_core::config::Overlength;
use lmms_ft_core::data::batch::sampler::permutation;
use lmms_ft_core::data::batch::*;
use lmms_ft_core::family::{EncodedText, IGNORE_INDEX};
use proptest::prelude::*;
use tch::{Device, Kind, Reduction, Tensor};

const M: i64 = 9; // the media token id in crafted samples
const I: i64 = IGNORE_INDEX;

fn enc(ids: &[i64], labels: &[i64]) -> EncodedText {
    EncodedText {
        input_ids: ids.to_vec(),
        labels: labels.to_vec(),
    }
}

fn is_media(id: i64) -> bool {
    id == M
}

fn vec_i64(t: &Tensor) -> Vec<i64> {
    Vec::<i64>::try_from(t.flatten(0, -1)).expect("i64 tensor")
}

// ---------------------------------------------------------------- length policy

/// ids 1 2 M M M 3 4 5; only the answer 3 4 5 is labeled.
fn crafted() -> EncodedText {
    enc(&[1, 2, M, M, M, 3, 4, 5], &[I, I, I, I, I, 13, 14, 15])
}

#[test]
fn fitting_sample_is_kept_under_every_policy() {
    for policy in [Overlength::Drop, Overlength::Error, Overlength::Truncate] {
        let out = fit_length(crafted(), 8, policy, is_media, "rec 0").unwrap();
        assert_eq!(out, Fitted::Kept(crafted()));
    }
}

#[test]
fn drop_policy_reports_reason() {
    let out = fit_length(crafted(), 6, Overlength::Drop, is_media, "rec 3").unwrap();
    assert_eq!(
        out,
        Fitted::Dropped(OverlengthReason::TooLong {
            len: 8,
            max_length: 6
        })
    );
}

#[test]
fn error_policy_names_the_sample() {
    let err = fit_length(
        crafted(),
        6,
        Overlength::Error,
        is_media,
        "train.jsonl record 3",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("train.jsonl record 3"), "{err}");
    assert!(err.contains("8 tokens exceed max_length 6"), "{err}");
}

#[test]
fn truncate_cuts_text_from_the_end_with_labels() {
    let out = fit_length(crafted(), 6, Overlength::Truncate, is_media, "r").unwrap();
    assert_eq!(
        out,
        Fitted::Truncated {
            text: enc(&[1, 2, M, M, M, 3], &[I, I, I, I, I, 13]),
            removed: 2
        }
    );
}

#[test]
fn truncate_skips_over_media_and_keeps_all_of_it() {
    // Needs 4 removals: 5, 4, 3, then (skipping M M M) 2.
    let out = fit_length(crafted(), 4, Overlength::Truncate, is_media, "r").unwrap();
    assert_eq!(
        out,
        Fitted::Truncated {
            text: enc(&[1, M, M, M], &[I, I, I, I]),
            removed: 4
        }
    );
    // Media at the very end: the text before it goes, the media stays.
    let tail = enc(&[1, 2, 3, M, M], &[11, 12, 13, I, I]);
    let out = fit_length(tail, 3, Overlength::Truncate, is_media, "r").unwrap();
    assert_eq!(
        out,
        Fitted::Truncated {
            text: enc(&[1, M, M], &[11, I, I]),
            removed: 2
        }
    );
    // Exactly the media fit.
    let out = fit_length(crafted(), 3, Overlength::Truncate, is_media, "r").unwrap();
    assert_eq!(
        out,
        Fitted::Truncated {
            text: enc(&[M, M, M], &[I, I, I]),
            removed: 5
        }
    );
}

#[test]
fn truncate_drops_when_media_alone_are_too_long() {
    let out = fit_length(crafted(), 2, Overlength::Truncate, is_media, "r").unwrap();
    assert_eq!(
        out,
        Fitted::Dropped(OverlengthReason::MediaExceeds {
            media_tokens: 3,
            max_length: 2
        })
    );
}

#[test]
fn mismatched_labels_are_an_error() {
    let bad = enc(&[1, 2, 3], &[I, 2]);
    let err = fit_length(bad, 10, Overlength::Truncate, is_media, "rec 5").unwrap_err();
    assert!(err.to_string().contains("rec 5"), "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Truncation keeps every media token, reaches exactly `max_length`, removes only
    /// text, and keeps each surviving token paired with its own label: the result is a
    /// subsequence of (id, label) pairs, and the removed tokens are the last text tokens.
    #[test]
    fn truncate_properties(
        tokens in prop::collection::vec((0i64..12, -100i64..50), 1..60),
        max_length in 1usize..60,
    ) {
        let text = EncodedText {
            input_ids: tokens.iter().map(|t| t.0).collect(),
            labels: tokens.iter().map(|t| t.1).collect(),
        };
        let media = text.input_ids.iter().filter(|&&id| is_media(id)).count();
        let len = text.input_ids.len();
        let out = fit_length(text.clone(), max_length, Overlength::Truncate, is_media, "p").unwrap();
        match out {
            Fitted::Kept(t) => { prop_assert!(len <= max_length); prop_assert_eq!(t, text); }
            Fitted::Dropped(OverlengthReason::MediaExceeds { media_tokens, .. }) => {
                prop_assert!(media > max_length);
                prop_assert_eq!(media_tokens, media);
            }
            Fitted::Dropped(r) => prop_assert!(false, "unexpected {:?}", r),
            Fitted::Truncated { text: t, removed } => {
                prop_assert!(len > max_length && media <= max_length);
                prop_assert_eq!(t.input_ids.len(), max_length);
                prop_assert_eq!(removed, len - max_length);
                prop_assert_eq!(t.input_ids.iter().filter(|&&id| is_media(id)).count(), media);
                // Independent reconstruction: the text positions, last `removed` of them cut.
                let text_pos: Vec<usize> = (0..len).filter(|&p| !is_media(text.input_ids[p])).collect();
                let cut: HashSet<usize> = text_pos[text_pos.len() - removed..].iter().copied().collect();
                let expect: Vec<(i64, i64)> = (0..len)
                    .filter(|p| !cut.contains(p))
                    .map(|p| (text.input_ids[p], text.labels[p]))
                    .collect();
                let got: Vec<(i64, i64)> = t.input_ids.iter().copied().zip(t.labels.iter().copied()).collect();
                prop_assert_eq!(got, expect);
            }
        }
    }
}

// ---------------------------------------------------------------- padding

fn three_samples() -> Vec<EncodedText> {
    vec![
        enc(&[1, 2, 3], &[I, 2, 3]),
        enc(&[4, 5, 6, 7, 8], &[I, I, 6, 7, 8]),
        enc(&[9], &[9]),
    ]
}

#[test]
fn right_padding_to_longest_sample() {
    let b = pad_batch(&three_samples(), 0, PaddingSide::Right).unwrap();
    assert_eq!(b.input_ids.size(), [3, 5]);
    assert_eq!(b.labels.size(), [3, 5]);
    assert_eq!(b.attention_mask.size(), [3, 5]);
    assert_eq!(b.input_ids.kind(), Kind::Int64);
    #[rustfmt::skip]
    assert_eq!(vec_i64(&b.input_ids), [1, 2, 3, 0, 0,  4, 5, 6, 7, 8,  9, 0, 0, 0, 0]);
    #[rustfmt::skip]
    assert_eq!(vec_i64(&b.labels), [I, 2, 3, I, I,  I, I, 6, 7, 8,  9, I, I, I, I]);
    #[rustfmt::skip]
    assert_eq!(vec_i64(&b.attention_mask), [1, 1, 1, 0, 0,  1, 1, 1, 1, 1,  1, 0, 0, 0, 0]);
    assert_eq!(b.lengths, [3, 5, 1]);
    // Shifted label count, by hand: {2, 3} + {6, 7, 8} + {} (the first token of a row is never a target).
    assert_eq!(b.num_label_tokens, 5);
}

#[test]
fn left_padding_for_generation() {
    let b = pad_batch(&three_samples(), 77, PaddingSide::Left).unwrap();
    assert_eq!(b.input_ids.size(), [3, 5]);
    #[rustfmt::skip]
    assert_eq!(vec_i64(&b.input_ids), [77, 77, 1, 2, 3,  4, 5, 6, 7, 8,  77, 77, 77, 77, 9]);
    #[rustfmt::skip]
    assert_eq!(vec_i64(&b.labels), [I, I, I, 2, 3,  I, I, 6, 7, 8,  I, I, I, I, 9]);
    #[rustfmt::skip]
    assert_eq!(vec_i64(&b.attention_mask), [0, 0, 1, 1, 1,  1, 1, 1, 1, 1,  0, 0, 0, 0, 1]);
    // Counted per sample, so the padding side cannot change it.
    assert_eq!(b.num_label_tokens, 5);
}

#[test]
fn padding_never_goes_to_max_length_and_rejects_bad_batches() {
    let short = vec![enc(&[1, 2], &[1, 2]), enc(&[3], &[3])];
    let b = pad_batch(&short, 0, PaddingSide::Right).unwrap();
    assert_eq!(b.input_ids.size(), [2, 2]);
    assert!(pad_batch::<EncodedText>(&[], 0, PaddingSide::Right).is_err());
    assert!(pad_batch(&[enc(&[1, 2], &[1])], 0, PaddingSide::Right).is_err());
}

// ---------------------------------------------------------------- samplers

fn random_lengths(n: usize, seed: u64, max: usize) -> Vec<usize> {
    // Independent of the code under test: a simple LCG.
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            1 + ((x >> 33) as usize) % max
        })
        .collect()
}

fn assert_each_index_once(batches: &[Vec<usize>], n: usize) {
    let mut seen = vec![0u32; n];
    for b in batches {
        for &i in b {
            seen[i] += 1;
        }
    }
    assert!(seen.iter().all(|&c| c == 1), "every index exactly once");
}

#[test]
fn samplers_cover_every_index_once_per_epoch() {
    for n in [0, 1, 7, 100, 1001] {
        let lengths = random_lengths(n, n as u64, 500);
        let lg = LengthGroupedSampler::new(lengths, 8, 42, false).unwrap();
        let sh = ShuffledSampler::new(n, 8, 42, false).unwrap();
        for epoch in 0..3 {
            for batches in [lg.epoch_batches(epoch), sh.epoch_batches(epoch)] {
                assert_each_index_once(&batches, n);
                assert_eq!(batches.len(), n.div_ceil(8));
                assert!(batches.iter().rev().skip(1).all(|b| b.len() == 8));
            }
        }
    }
    // drop_last removes only the partial batch.
    let sh = ShuffledSampler::new(20, 8, 1, true).unwrap();
    let b = sh.epoch_batches(0);
    assert_eq!(b.len(), 2);
    assert!(b.iter().all(|b| b.len() == 8));
}

#[test]
fn samplers_are_deterministic_per_seed_and_epoch() {
    let lengths = random_lengths(500, 3, 300);
    let a = LengthGroupedSampler::new(lengths.clone(), 4, 7, false).unwrap();
    let b = LengthGroupedSampler::new(lengths.clone(), 4, 7, false).unwrap();
    let other_seed = LengthGroupedSampler::new(lengths, 4, 8, false).unwrap();
    assert_eq!(a.epoch_batches(2), b.epoch_batches(2));
    assert_ne!(a.epoch_batches(0), a.epoch_batches(1));
    assert_ne!(a.epoch_batches(0), other_seed.epoch_batches(0));

    let s = ShuffledSampler::new(500, 4, 7, false).unwrap();
    let t = ShuffledSampler::new(500, 4, 7, false).unwrap();
    assert_eq!(s.epoch_batches(5), t.epoch_batches(5));
    assert_ne!(s.epoch_batches(0), s.epoch_batches(1));
    // A shuffle, not the identity.
    let flat: Vec<usize> = s.epoch_batches(0).concat();
    assert_ne!(flat, (0..500).collect::<Vec<_>>());
}

#[test]
fn length_grouped_first_batch_holds_the_longest_sample() {
    for seed in 0..20 {
        let lengths = random_lengths(300, seed + 100, 1000);
        let max = *lengths.iter().max().unwrap();
        let s = LengthGroupedSampler::new(lengths.clone(), 6, seed, false).unwrap();
        for epoch in 0..3 {
            let first = &s.epoch_batches(epoch)[0];
            assert_eq!(lengths[first[0]], max, "seed {seed} epoch {epoch}");
        }
    }
}

#[test]
fn length_grouped_megabatches_are_sorted() {
    let lengths = random_lengths(2000, 9, 700);
    let s = LengthGroupedSampler::new(lengths.clone(), 5, 11, false).unwrap();
    // transformers' default: min(2000 / 20, 50) = 50.
    assert_eq!(s.megabatch_size(), 250);
    let order = s.epoch_order(0);
    let perm = permutation(2000, 11, 0);
    for (m, mb) in order.chunks(250).enumerate() {
        // After the longest-first swap only position 0 may break the order.
        assert!(
            mb[1..].windows(2).all(|w| lengths[w[0]] >= lengths[w[1]]),
            "megabatch {m}"
        );
        // Same members as the permutation's chunk, except for the swapped heads.
        let mut a: Vec<usize> = mb[1..].to_vec();
        let chunk: HashSet<usize> = perm[m * 250..(m + 1) * 250].iter().copied().collect();
        a.retain(|i| !chunk.contains(i));
        assert!(
            a.is_empty(),
            "megabatch {m} holds samples from another chunk"
        );
    }
    let max = *lengths.iter().max().unwrap();
    assert_eq!(lengths[order[0]], max);
}

/// The order equals `transformers`' `get_length_grouped_indices` given the same
/// permutation, including ties (stable sort), tiny datasets and explicit multipliers.
#[test]
fn length_grouped_matches_transformers() {
    let mut cases = Vec::new();
    let mut ours = Vec::new();
    let configs: [(usize, usize, usize, Option<usize>); 6] = [
        (1000, 4, 2000, None), // distinct-ish lengths, mult 50
        (500, 8, 5, None),     // heavy ties
        (37, 4, 100, None),    // tiny: mult 2
        (10, 4, 10, None),     // tinier: mult 1
        (300, 3, 50, Some(7)), // explicit multiplier
        (1, 2, 3, None),
    ];
    for (k, &(n, bs, max, mult)) in configs.iter().enumerate() {
        let lengths = random_lengths(n, k as u64 + 500, max);
        let mut s = LengthGroupedSampler::new(lengths.clone(), bs, 1234 + k as u64, false).unwrap();
        if let Some(m) = mult {
            s = s.with_mega_batch_mult(m).unwrap();
        }
        let epoch = k as u64 % 3;
        cases.push(serde_json::json!({
            "lengths": lengths,
            "batch_size": bs,
            "perm": permutation(n, 1234 + k as u64, epoch),
            "mega_batch_mult": mult,
        }));
        ours.push(s.epoch_order(epoch));
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../scripts/oracle/length_grouped_indices.py");
    let mut child = Command::new(lmms_ft_core::testing::oracle_python())
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start python oracle");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(serde_json::to_string(&cases).unwrap().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "oracle failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let theirs: Vec<Vec<usize>> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(theirs.len(), ours.len());
    for (k, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        assert_eq!(a, b, "case {k}");
    }
}

#[test]
fn resume_continues_with_the_same_batches() {
    let lengths = random_lengths(403, 5, 90);
    let samplers: Vec<Box<dyn BatchSampler>> = vec![
        Box::new(LengthGroupedSampler::new(lengths, 4, 99, false).unwrap()),
        Box::new(ShuffledSampler::new(403, 4, 99, true).unwrap()),
    ];
    for s in &samplers {
        for epoch in [0, 3] {
            let full = s.epoch_batches(epoch);
            for consumed in [0, 1, 37, full.len()] {
                // As a restarted process would: only (seed, epoch, consumed) survive.
                let state: SamplerState = serde_json::from_str(
                    &serde_json::to_string(&SamplerState { epoch, consumed }).unwrap(),
                )
                .unwrap();
                assert_eq!(s.resume(state).unwrap(), full[consumed..].to_vec());
            }
            let err = s
                .resume(SamplerState {
                    epoch,
                    consumed: full.len() + 1,
                })
                .unwrap_err();
            assert!(err.to_string().contains("dataset or batch size"), "{err}");
        }
    }
}

// ---------------------------------------------------------------- packing

#[test]
fn plan_packing_by_hand() {
    let lengths = [3, 4, 2, 5, 1];
    let greedy = plan_packing(&lengths, 6, PackStrategy::Greedy).unwrap();
    assert_eq!(greedy, vec![vec![0], vec![1, 2], vec![3, 4]]);
    let ffd = plan_packing(&lengths, 6, PackStrategy::FirstFitDecreasing).unwrap();
    assert_eq!(ffd, vec![vec![3, 4], vec![1, 2], vec![0]]);
    let err = plan_packing(&[3, 7], 6, PackStrategy::Greedy).unwrap_err();
    assert!(
        err.to_string()
            .contains("sample 1: 7 tokens exceed max_length 6"),
        "{err}"
    );
    assert!(plan_packing(&[3, 0], 6, PackStrategy::Greedy).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(100))]
    #[test]
    fn plan_packing_properties(lengths in prop::collection::vec(1usize..20, 0..40), ffd in any::<bool>()) {
        let strategy = if ffd { PackStrategy::FirstFitDecreasing } else { PackStrategy::Greedy };
        let rows = plan_packing(&lengths, 20, strategy).unwrap();
        let mut seen: Vec<usize> = rows.concat();
        seen.sort_unstable();
        prop_assert_eq!(seen, (0..lengths.len()).collect::<Vec<_>>());
        for row in &rows {
            prop_assert!(row.iter().map(|&i| lengths[i]).sum::<usize>() <= 20);
        }
        if !ffd {
            // Greedy keeps the order, and a new row opens only when the next sample overflows.
            prop_assert_eq!(rows.concat(), (0..lengths.len()).collect::<Vec<_>>());
            for w in rows.windows(2) {
                let used: usize = w[0].iter().map(|&i| lengths[i]).sum();
                prop_assert!(used + lengths[w[1][0]] > 20);
            }
        }
    }
}

#[test]
fn pack_row_by_hand() {
    let a = enc(&[10, 11, 12], &[20, 21, 22]);
    let b = enc(&[13, 14], &[23, 24]);
    let row = pack_row(&[&a, &b]).unwrap();
    assert_eq!(row.input_ids, [10, 11, 12, 13, 14]);
    assert_eq!(row.labels, [I, 21, 22, I, 24]);
    assert_eq!(row.position_ids, [0, 1, 2, 0, 1]);
    assert_eq!(row.cu_seqlens, [0, 3, 5]);
    assert!(pack_row(&[]).is_err());
    assert!(pack_row(&[&enc(&[1, 2], &[1])]).is_err());
}

#[test]
fn block_mask_by_hand() {
    // Samples at [0, 2) and [2, 3), one padding position.
    let mask = block_causal_mask(&[0, 2, 3], 4, Device::Cpu).unwrap();
    assert_eq!(mask.kind(), Kind::Bool);
    #[rustfmt::skip]
    assert_eq!(vec_i64(&mask.to_kind(Kind::Int64)), [
        1, 0, 0, 0,
        1, 1, 0, 0,
        0, 0, 1, 0,
        0, 0, 0, 1, // padding sees only itself
    ]);
    let add = block_causal_mask_additive(&[0, 2, 3], 4, Kind::Float, Device::Cpu).unwrap();
    let add = Vec::<f32>::try_from(add.flatten(0, -1)).unwrap();
    let ninf = f32::NEG_INFINITY;
    #[rustfmt::skip]
    assert_eq!(add, [0.0, ninf, ninf, ninf, 0.0, 0.0, ninf, ninf, ninf, ninf, 0.0, ninf, ninf, ninf, ninf, 0.0]);
    assert!(block_causal_mask(&[0, 5], 4, Device::Cpu).is_err());
    assert!(block_causal_mask(&[1, 2], 4, Device::Cpu).is_err());
}

const VOCAB: i64 = 40;
const DIM: i64 = 16;
const HEADS: i64 = 2;

/// One random attention layer (token + learned position embeddings, multi-head attention,
/// residual, vocabulary head): enough for any cross-sample leak or position mix-up to show.
struct TinyLayer {
    tok: Tensor,
    pos: Tensor,
    wq: Tensor,
    wk: Tensor,
    wv: Tensor,
    wo: Tensor,
    head: Tensor,
}

enum Attn<'a> {
    /// `scaled_dot_product_attention` with an optional bool mask and `is_causal`.
    Sdpa(Option<&'a Tensor>, bool),
    /// Softmax attention written out, with an additive float mask.
    Manual(&'a Tensor),
}

impl TinyLayer {
    fn new() -> Self {
        tch::manual_seed(0);
        let r = |shape: &[i64]| Tensor::randn(shape, (Kind::Float, Device::Cpu)) * 0.5;
        TinyLayer {
            tok: r(&[VOCAB, DIM]),
            pos: r(&[32, DIM]),
            wq: r(&[DIM, DIM]),
            wk: r(&[DIM, DIM]),
            wv: r(&[DIM, DIM]),
            wo: r(&[DIM, DIM]),
            head: r(&[DIM, VOCAB]),
        }
    }

    /// `ids`, `pos`: `[B, T]`; returns logits `[B, T, V]`.
    fn forward(&self, ids: &Tensor, pos: &Tensor, attn: Attn) -> Tensor {
        let (b, t) = ids.size2().unwrap();
        let x = self
            .tok
            .index_select(0, &ids.flatten(0, -1))
            .view([b, t, DIM])
            + self
                .pos
                .index_select(0, &pos.flatten(0, -1))
                .view([b, t, DIM]);
        let split = |w: &Tensor| x.matmul(w).view([b, t, HEADS, DIM / HEADS]).transpose(1, 2);
        let (q, k, v) = (split(&self.wq), split(&self.wk), split(&self.wv));
        let o = match attn {
            Attn::Sdpa(mask, causal) => {
                Tensor::scaled_dot_product_attention(&q, &k, &v, mask, 0.0, causal, None, false)
            }
            Attn::Manual(bias) => {
                let scores = q.matmul(&k.transpose(-2, -1)) / ((DIM / HEADS) as f64).sqrt() + bias;
                scores.softmax(-1, Kind::Float).matmul(&v)
            }
        };
        let h = o.transpose(1, 2).reshape([b, t, DIM]).matmul(&self.wo) + x;
        h.matmul(&self.head)
    }

    /// A sample run alone with plain causal attention: the reference.
    fn alone(&self, s: &EncodedText) -> Tensor {
        let n = s.input_ids.len() as i64;
        let ids = Tensor::from_slice(&s.input_ids).view([1, n]);
        let pos = Tensor::arange(n, (Kind::Int64, Device::Cpu)).view([1, n]);
        self.forward(&ids, &pos, Attn::Sdpa(None, true))
            .squeeze_dim(0)
    }
}

/// Samples whose first label is a real token, so a missing boundary mask would count.
fn pack_samples() -> Vec<EncodedText> {
    let lens = [5usize, 3, 4, 6, 2];
    let mut x = 17u64;
    lens.iter()
        .map(|&n| {
            let mut ids = Vec::new();
            let mut labels = Vec::new();
            for p in 0..n {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                let id = ((x >> 33) % VOCAB as u64) as i64;
                ids.push(id);
                labels.push(if p == 2 { I } else { (id * 7 + 3) % VOCAB });
            }
            enc(&ids, &labels)
        })
        .collect()
}

fn packed_batch(samples: &[EncodedText]) -> (Vec<Vec<usize>>, PackedBatch) {
    let lengths: Vec<usize> = samples.iter().map(|s| s.input_ids.len()).collect();
    let plan = plan_packing(&lengths, 12, PackStrategy::Greedy).unwrap();
    assert_eq!(plan, vec![vec![0, 1, 2], vec![3, 4]]);
    let rows: Vec<PackedRow> = plan
        .iter()
        .map(|r| pack_row(&r.iter().map(|&i| &samples[i]).collect::<Vec<_>>()).unwrap())
        .collect();
    (plan, collate_packed(&rows, 0).unwrap())
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn packed_attention_equals_each_sample_alone() {
    let layer = TinyLayer::new();
    let samples = pack_samples();
    let (plan, batch) = packed_batch(&samples);
    assert_eq!(batch.input_ids.size(), [2, 12]);
    assert_eq!(batch.attention_mask.size(), [2, 1, 12, 12]);
    assert_eq!(
        vec_i64(&batch.position_ids.get(1)),
        [0, 1, 2, 3, 4, 5, 0, 1, 0, 0, 0, 0]
    );

    let sdpa = layer.forward(
        &batch.input_ids,
        &batch.position_ids,
        Attn::Sdpa(Some(&batch.attention_mask), false),
    );
    let bias = Tensor::stack(
        &batch
            .cu_seqlens
            .iter()
            .map(|cu| block_causal_mask_additive(cu, 12, Kind::Float, Device::Cpu).unwrap())
            .collect::<Vec<_>>(),
        0,
    )
    .unsqueeze(1);
    let manual = layer.forward(&batch.input_ids, &batch.position_ids, Attn::Manual(&bias));
    // Padding queries see themselves, so nothing is NaN anywhere.
    assert!(bool::try_from(sdpa.isfinite().all()).unwrap());
    assert!(bool::try_from(manual.isfinite().all()).unwrap());

    for (r, row) in plan.iter().enumerate() {
        let cu = &batch.cu_seqlens[r];
        for (j, &s) in row.iter().enumerate() {
            let reference = layer.alone(&samples[s]);
            for packed in [&sdpa, &manual] {
                let got = packed.get(r as i64).narrow(0, cu[j], cu[j + 1] - cu[j]);
                let d = max_diff(&got, &reference);
                assert!(d <= 1e-5, "row {r} sample {s}: max diff {d}");
            }
        }
    }

    // Negative controls, so the check above can fail: a plain causal mask lets the second
    // sample of a row see the first; continuous positions shift its position embeddings.
    let second = layer.alone(&samples[1]);
    let causal = layer.forward(
        &batch.input_ids,
        &batch.position_ids,
        Attn::Sdpa(None, true),
    );
    let leaked = max_diff(&causal.get(0).narrow(0, 5, 3), &second);
    assert!(
        leaked > 1e-3,
        "a causal mask should leak across samples ({leaked})"
    );
    let flat_pos = Tensor::arange(12, (Kind::Int64, Device::Cpu))
        .unsqueeze(0)
        .repeat([2, 1]);
    let shifted = layer.forward(
        &batch.input_ids,
        &flat_pos,
        Attn::Sdpa(Some(&batch.attention_mask), false),
    );
    let moved = max_diff(&shifted.get(0).narrow(0, 5, 3), &second);
    assert!(moved > 1e-3, "positions should matter ({moved})");
}

/// Shifted cross-entropy, summed over labeled positions, of logits `[.., T, V]`.
fn shifted_loss(logits: &Tensor, labels: &Tensor) -> (f64, i64) {
    let t = logits.size()[logits.dim() - 2];
    let l = logits.narrow(-2, 0, t - 1).reshape([-1, VOCAB]);
    let y = labels.narrow(-1, 1, t - 1).reshape([-1]);
    let loss = l.cross_entropy_loss::<Tensor>(&y, None, Reduction::Sum, IGNORE_INDEX, 0.0);
    (
        loss.double_value(&[]),
        y.ne(IGNORE_INDEX).sum(Kind::Int64).int64_value(&[]),
    )
}

#[test]
fn packed_loss_equals_sum_of_sample_losses() {
    let layer = TinyLayer::new();
    let samples = pack_samples();
    let (_, batch) = packed_batch(&samples);
    let logits = layer.forward(
        &batch.input_ids,
        &batch.position_ids,
        Attn::Sdpa(Some(&batch.attention_mask), false),
    );
    let (packed, packed_count) = shifted_loss(&logits, &batch.labels);
    let mut sum = 0.0;
    let mut count = 0;
    for s in &samples {
        let (l, c) = shifted_loss(&layer.alone(s), &Tensor::from_slice(&s.labels));
        sum += l;
        count += c;
    }
    assert_eq!(packed_count, count);
    assert!(
        (packed - sum).abs() <= 1e-4 * sum.abs().max(1.0),
        "packed {packed} vs {sum}"
    );

    // Without the boundary rule the loss would include cross-sample targets.
    let mut naive = vec_i64(&batch.labels);
    for (r, cu) in batch.cu_seqlens.iter().enumerate() {
        let row = &[&[0usize, 1, 2][..], &[3, 4][..]][r];
        for (j, &s) in row.iter().enumerate() {
            naive[r * 12 + cu[j] as usize] = samples[s].labels[0];
        }
    }
    let (leaky, leaky_count) = shifted_loss(&logits, &Tensor::from_slice(&naive).view([2, 12]));
    assert!(leaky_count > count && (leaky - sum).abs() > 1e-3);
}
