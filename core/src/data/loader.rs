//! Background loading: worker threads decode, encode and collate upcoming batches while the
//! model trains on the current one.
//!
//! Batches come out in exactly the order the sampler gave, whatever the workers' timing, so
//! a run is reproducible and resumable regardless of the number of workers. At most
//! `prefetch` batches are loading or waiting ahead of the consumer, which bounds memory (a
//! collated multimodal batch can be large). A failed batch is delivered as an `Err` at its
//! own position and iteration continues after it, so the caller decides whether a bad batch
//! stops training or is skipped. Dropping the [`Loader`] stops the workers: each finishes
//! at most the batch it is working on, then the threads are joined.
//!
//! Batches need only be `Send` (not `Sync`): `tch::Tensor` is `Send` but not `Sync`, and
//! a batch is only ever owned by one thread at a time.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use anyhow::{anyhow, bail, Context, Result};

/// How a [`Loader`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoaderOptions {
    /// Worker threads (at least 1).
    pub workers: usize,
    /// Most batches loading or loaded but not yet handed to the consumer (at least 1). The
    /// batch the consumer currently holds is not counted. Fewer than `workers` leaves
    /// workers idle.
    pub prefetch: usize,
}

impl Default for LoaderOptions {
    fn default() -> Self {
        LoaderOptions {
            workers: 2,
            prefetch: 4,
        }
    }
}

type Jobs = Box<dyn Iterator<Item = Vec<usize>> + Send>;
type LoadFn<B> = dyn Fn(&[usize]) -> Result<B> + Send + Sync;

struct State<B> {
    jobs: Jobs,
    /// The job iterator has ended; `dispatched` is the total.
    exhausted: bool,
    /// Jobs taken by workers so far (the next job's position).
    dispatched: usize,
    /// Batches handed to the consumer so far (the next position to yield).
    yielded: usize,
    ready: BTreeMap<usize, Result<B>>,
    cancelled: bool,
    live_workers: usize,
}

struct Shared<B> {
    state: Mutex<State<B>>,
    changed: Condvar,
}

impl<B> Shared<B> {
    fn lock(&self) -> MutexGuard<'_, State<B>> {
        // Nothing panics while holding the lock (loads run outside it and are caught), so a
        // poisoned state is still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, State<B>>) -> MutexGuard<'a, State<B>> {
        self.changed
            .wait(guard)
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Iterator over loaded batches, in sampler order.
pub struct Loader<B> {
    shared: Arc<Shared<B>>,
    threads: Vec<JoinHandle<()>>,
    done: bool,
}

impl<B: Send + 'static> Loader<B> {
    /// Starts the workers on `batches` (lists of dataset indices, e.g. from a
    /// [`BatchSampler`](crate::data::batch::BatchSampler)); `load` turns one list into a
    /// batch.
    pub fn new<I, F>(batches: I, load: F, opts: LoaderOptions) -> Result<Self>
    where
        I: IntoIterator<Item = Vec<usize>>,
        I::IntoIter: Send + 'static,
        F: Fn(&[usize]) -> Result<B> + Send + Sync + 'static,
    {
        if opts.workers == 0 {
            bail!("the data loader needs at least 1 worker");
        }
        if opts.prefetch == 0 {
            bail!("the data loader's prefetch depth must be at least 1");
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                jobs: Box::new(batches.into_iter()),
                exhausted: false,
                dispatched: 0,
                yielded: 0,
                ready: BTreeMap::new(),
                cancelled: false,
                live_workers: opts.workers,
            }),
            changed: Condvar::new(),
        });
        let load: Arc<LoadFn<B>> = Arc::new(load);
        let mut loader = Loader {
            shared,
            threads: Vec::with_capacity(opts.workers),
            done: false,
        };
        for w in 0..opts.workers {
            let shared = Arc::clone(&loader.shared);
            let load = Arc::clone(&load);
            let spawned = std::thread::Builder::new()
                .name(format!("lmms-ft-data-{w}"))
                .spawn(move || worker(&shared, &*load, opts.prefetch));
            match spawned {
                Ok(handle) => loader.threads.push(handle),
                Err(e) => {
                    // The workers not started will never report; account for them so the
                    // consumer is not left waiting (dropping `loader` joins the others).
                    let mut st = loader.shared.lock();
                    st.live_workers -= opts.workers - w;
                    drop(st);
                    return Err(anyhow!(e).context("starting data loader threads"));
                }
            }
        }
        Ok(loader)
    }
}

impl<B> Loader<B> {
    /// Number of batches handed out so far (the position of the next one).
    pub fn position(&self) -> usize {
        self.shared.lock().yielded
    }
}

/// Decrements the live-worker count however the worker exits, so the consumer never waits
/// on a worker that is gone.
struct LiveGuard<'a, B>(&'a Shared<B>);

impl<B> Drop for LiveGuard<'_, B> {
    fn drop(&mut self) {
        self.0.lock().live_workers -= 1;
        self.0.changed.notify_all();
    }
}

fn describe(indices: &[usize]) -> String {
    const SHOWN: usize = 8;
    if indices.len() <= SHOWN {
        format!("{indices:?}")
    } else {
        format!("{:?} and {} more", &indices[..SHOWN], indices.len() - SHOWN)
    }
}

fn worker<B>(shared: &Shared<B>, load: &LoadFn<B>, prefetch: usize) {
    let _live = LiveGuard(shared);
    loop {
        let (pos, indices) = {
            let mut st = shared.lock();
            loop {
                if st.cancelled || st.exhausted {
                    return;
                }
                if st.dispatched - st.yielded < prefetch {
                    break;
                }
                st = shared.wait(st);
            }
            match st.jobs.next() {
                Some(indices) => {
                    st.dispatched += 1;
                    (st.dispatched - 1, indices)
                }
                None => {
                    st.exhausted = true;
                    shared.changed.notify_all();
                    return;
                }
            }
        };
        let result = match catch_unwind(AssertUnwindSafe(|| load(&indices))) {
            Ok(result) => result,
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                Err(anyhow!("the batch loader panicked: {msg}"))
            }
        }
        .with_context(|| format!("loading batch {pos} (samples {})", describe(&indices)));
        let mut st = shared.lock();
        if st.cancelled {
            return;
        }
        st.ready.insert(pos, result);
        shared.changed.notify_all();
    }
}

impl<B> Iterator for Loader<B> {
    type Item = Result<B>;

    fn next(&mut self) -> Option<Result<B>> {
        if self.done {
            return None;
        }
        let shared = &*self.shared;
        let mut st = shared.lock();
        loop {
            let pos = st.yielded;
            if let Some(result) = st.ready.remove(&pos) {
                st.yielded += 1;
                shared.changed.notify_all();
                return Some(result);
            }
            if st.exhausted && pos == st.dispatched {
                self.done = true;
                return None;
            }
            if st.live_workers == 0 {
                self.done = true;
                return Some(Err(anyhow!(
                    "data loader workers stopped before batch {pos} was loaded"
                )));
            }
            st = shared.wait(st);
        }
    }
}

impl<B> Drop for Loader<B> {
    fn drop(&mut self) {
        self.shared.lock().cancelled = true;
        self.shared.changed.notify_all();
        for handle in self.threads.drain(..) {
            // A worker's own panic was already turned into a batch error; nothing to add.
            let _ = handle.join();
        }
    }
}
