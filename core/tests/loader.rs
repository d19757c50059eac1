//! The background loader: order, error positions, early drop and the prefetch bound, under
//! deliberately uneven per-batch delays.
//!
//! Batches here carry a `tch::Tensor`, which is `Send` but not `Sync`, so these tests also
//! prove at compile time that the loader does not require `Sync` batches.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use lmms_ft_core::data::batch::{BatchSampler, ShuffledSampler};
use lmms_ft_core::data::loader::{Loader, LoaderOptions};
use tch::Tensor;

/// Pseudo-random delay in 0..max_ms fixed by the batch's first index.
fn delay(indices: &[usize], max_ms: u64) -> Duration {
    let x = (indices.first().copied().unwrap_or(0) as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    Duration::from_millis((x >> 40) % max_ms)
}

struct Batch {
    ids: Tensor,
    thread: String,
}

fn load(indices: &[usize]) -> Result<Batch> {
    thread::sleep(delay(indices, 12));
    let ids: Vec<i64> = indices.iter().map(|&i| i as i64).collect();
    Ok(Batch {
        ids: Tensor::from_slice(&ids),
        thread: thread::current().name().unwrap_or("").to_string(),
    })
}

#[test]
fn batches_arrive_in_sampler_order() {
    let sampler = ShuffledSampler::new(200, 5, 3, false).unwrap();
    let expected = sampler.epoch_batches(0);
    for (workers, prefetch) in [(1, 1), (3, 4), (8, 8), (4, 2)] {
        let loader =
            Loader::new(expected.clone(), load, LoaderOptions { workers, prefetch }).unwrap();
        let mut threads = HashSet::new();
        let mut got = Vec::new();
        for batch in loader {
            let batch = batch.unwrap();
            threads.insert(batch.thread);
            let ids = Vec::<i64>::try_from(&batch.ids).unwrap();
            got.push(ids.into_iter().map(|i| i as usize).collect::<Vec<_>>());
        }
        assert_eq!(got, expected, "workers {workers} prefetch {prefetch}");
        if workers > 1 && prefetch > 1 {
            assert!(
                threads.len() > 1,
                "work should spread over workers: {threads:?}"
            );
        }
    }
}

#[test]
fn errors_and_panics_arrive_at_their_position() {
    let jobs: Vec<Vec<usize>> = (0..12).map(|i| vec![i]).collect();
    let loader = Loader::new(
        jobs,
        |idx: &[usize]| {
            thread::sleep(delay(idx, 8));
            match idx[0] {
                3 | 7 => bail!("corrupt image in sample {}", idx[0]),
                9 => panic!("decoder bug"),
                i => Ok(Tensor::from(i as i64)),
            }
        },
        LoaderOptions {
            workers: 4,
            prefetch: 4,
        },
    )
    .unwrap();
    let mut outcomes = Vec::new();
    for (pos, item) in loader.enumerate() {
        match item {
            Ok(t) => {
                assert_eq!(t.int64_value(&[]), pos as i64);
                outcomes.push(None);
            }
            Err(e) => outcomes.push(Some(format!("{e:#}"))),
        }
    }
    assert_eq!(outcomes.len(), 12, "iteration continues after errors");
    for (pos, o) in outcomes.iter().enumerate() {
        match pos {
            3 | 7 => {
                let msg = o.as_deref().expect("an error");
                assert!(
                    msg.contains(&format!("loading batch {pos} (samples [{pos}])")),
                    "{msg}"
                );
                assert!(
                    msg.contains(&format!("corrupt image in sample {pos}")),
                    "{msg}"
                );
            }
            9 => {
                let msg = o.as_deref().expect("an error");
                assert!(msg.contains("panicked: decoder bug"), "{msg}");
            }
            _ => assert!(o.is_none(), "batch {pos}: {o:?}"),
        }
    }
}

#[test]
fn dropping_early_stops_the_workers() {
    let marker = Arc::new(());
    let started = Arc::new(AtomicUsize::new(0));
    let (m, s) = (Arc::clone(&marker), Arc::clone(&started));
    // An endless job stream: only cancellation can end the workers.
    let mut loader = Loader::new(
        (0..).map(|i| vec![i]),
        move |idx: &[usize]| {
            let _keep = &m;
            s.fetch_add(1, Ordering::SeqCst);
            thread::sleep(Duration::from_millis(30));
            Ok(Tensor::from(idx[0] as i64))
        },
        LoaderOptions {
            workers: 4,
            prefetch: 8,
        },
    )
    .unwrap();
    for expected in 0..3 {
        let t = loader.next().unwrap().unwrap();
        assert_eq!(t.int64_value(&[]), expected);
    }
    assert_eq!(loader.position(), 3);
    let t0 = Instant::now();
    drop(loader);
    let took = t0.elapsed();
    // Each worker finishes at most the 30 ms load it is in.
    assert!(took < Duration::from_millis(500), "drop took {took:?}");
    // The workers held the only other references to the closure: all have exited.
    assert_eq!(Arc::strong_count(&marker), 1);
    let after = started.load(Ordering::SeqCst);
    thread::sleep(Duration::from_millis(60));
    assert_eq!(started.load(Ordering::SeqCst), after, "no loads after drop");
    // 3 consumed + at most 8 ahead.
    assert!(after <= 3 + 8, "{after} loads started");
}

/// A batch that counts itself live from the start of its load until the consumer drops it.
struct Tracked {
    _ids: Tensor,
    live: Arc<AtomicUsize>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.live.fetch_sub(1, Ordering::SeqCst);
    }
}

#[test]
fn prefetch_depth_is_bounded() {
    for (workers, prefetch) in [(4, 3), (2, 5), (6, 1)] {
        let live = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let (l, p) = (Arc::clone(&live), Arc::clone(&peak));
        let loader = Loader::new(
            (0..40).map(|i| vec![i]),
            move |idx: &[usize]| {
                let now = l.fetch_add(1, Ordering::SeqCst) + 1;
                p.fetch_max(now, Ordering::SeqCst);
                thread::sleep(delay(idx, 3));
                Ok(Tracked {
                    _ids: Tensor::from(idx[0] as i64),
                    live: Arc::clone(&l),
                })
            },
            LoaderOptions { workers, prefetch },
        )
        .unwrap();
        let mut n = 0;
        for batch in loader {
            // A slow consumer, so the workers run as far ahead as they are allowed.
            thread::sleep(Duration::from_millis(4));
            drop(batch.unwrap());
            n += 1;
        }
        assert_eq!(n, 40);
        let peak = peak.load(Ordering::SeqCst);
        // `prefetch` ahead plus the one the consumer holds.
        assert!(
            peak <= prefetch + 1,
            "workers {workers} prefetch {prefetch}: peak {peak}"
        );
        assert!(peak >= prefetch, "prefetching should happen: peak {peak}");
        assert_eq!(live.load(Ordering::SeqCst), 0);
    }
}

#[test]
fn exhausted_loader_ends_and_bad_options_are_rejected() {
    let order = Arc::new(Mutex::new(Vec::new()));
    let o = Arc::clone(&order);
    let mut loader = Loader::new(
        Vec::<Vec<usize>>::new(),
        move |idx: &[usize]| {
            o.lock().unwrap().push(idx.to_vec());
            Ok(())
        },
        LoaderOptions::default(),
    )
    .unwrap();
    assert!(loader.next().is_none());
    assert!(loader.next().is_none());
    assert!(order.lock().unwrap().is_empty());
    let bad = |workers, prefetch| {
        Loader::new(
            vec![vec![0usize]],
            |_: &[usize]| Ok(()),
            LoaderOptions { workers, prefetch },
        )
        .is_err()
    };
    assert!(bad(0, 2));
    assert!(bad(2, 0));
}
