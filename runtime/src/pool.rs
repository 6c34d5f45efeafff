//! The thread pool kernels run on: one persistent pool per executable (rayon underneath), so
//! that a run never spawns OS threads. Work is split into fixed, schedule-independent pieces:
//! every index of a [`Pool::parallel_for`] is computed by exactly one call whose result does
//! not depend on which thread ran it or when, so outputs are bit-identical for any schedule.

use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use thiserror::Error;

/// Why a pool could not be made.
#[derive(Debug, Error)]
pub enum PoolError {
    /// Zero threads were asked for.
    #[error("a thread pool needs at least one thread")]
    ZeroThreads,
    /// The OS refused to start the worker threads.
    #[error("could not start {threads} worker threads: {msg}")]
    Spawn {
        /// Threads asked for.
        threads: usize,
        /// The OS's message.
        msg: String,
    },
}

/// A fixed-size pool. With one thread everything runs inline on the caller.
#[derive(Clone)]
pub struct Pool {
    threads: usize,
    inner: Option<Arc<Workers>>,
}

/// The rayon pool and its worker threads, which are joined when the last [`Pool`] clone
/// drops: a library (an AOT `.so`) must not leave threads running after its context is
/// destroyed (valgrind reports their stacks, and an unloaded library's code would vanish
/// under them).
struct Workers {
    pool: Option<rayon::ThreadPool>,
    handles: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Drop for Workers {
    fn drop(&mut self) {
        // Dropping the rayon pool tells its workers to exit once idle; then wait for them.
        drop(self.pool.take());
        let handles = std::mem::take(&mut *self.handles.lock().unwrap_or_else(|e| e.into_inner()));
        for h in handles {
            // A worker that panicked has nothing left to clean up.
            let _ = h.join();
        }
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("threads", &self.threads)
            .finish()
    }
}

impl Pool {
    /// A pool of `threads` threads (the caller blocks while they work).
    pub fn new(threads: usize) -> Result<Pool, PoolError> {
        if threads == 0 {
            return Err(PoolError::ZeroThreads);
        }
        if threads == 1 {
            return Ok(Self::single());
        }
        let handles: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let spawned = handles.clone();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("kiln-worker-{i}"))
            .spawn_handler(move |thread| {
                let mut b = std::thread::Builder::new();
                if let Some(name) = thread.name() {
                    b = b.name(name.to_owned());
                }
                if let Some(size) = thread.stack_size() {
                    b = b.stack_size(size);
                }
                let h = b.spawn(|| thread.run())?;
                spawned.lock().unwrap_or_else(|e| e.into_inner()).push(h);
                Ok(())
            })
            .build()
            .map_err(|e| PoolError::Spawn {
                threads,
                msg: e.to_string(),
            })?;
        Ok(Pool {
            threads,
            inner: Some(Arc::new(Workers {
                pool: Some(pool),
                handles,
            })),
        })
    }

    /// The one-thread pool: runs every job inline.
    pub fn single() -> Pool {
        Pool {
            threads: 1,
            inner: None,
        }
    }

    /// A process-wide shared pool of `threads` threads, made on first use (for callers
    /// without an executable of their own, e.g. the plain `gemm` entry point and benches).
    pub fn shared(threads: usize) -> Result<Pool, PoolError> {
        static POOLS: OnceLock<Mutex<Vec<Pool>>> = OnceLock::new();
        let pools = POOLS.get_or_init(|| Mutex::new(vec![]));
        // A poisoned lock only means another thread panicked while pushing; the list is fine.
        let mut pools = pools.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = pools.iter().find(|p| p.threads == threads) {
            return Ok(p.clone());
        }
        let p = Pool::new(threads)?;
        pools.push(p.clone());
        Ok(p)
    }

    /// Number of threads.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Calls `f(i)` once for every `i` in `0..n`, spread over the pool's threads; returns
    /// when all calls have returned. `f` must write only state owned by index `i` for the
    /// result to be schedule-independent. Runs inline when `n <= 1` or the pool has one
    /// thread.
    pub fn parallel_for<F: Fn(usize) + Sync + Send>(&self, n: usize, f: F) {
        match self.inner.as_ref().and_then(|w| w.pool.as_ref()) {
            Some(p) if n > 1 => {
                use rayon::prelude::*;
                p.install(|| (0..n).into_par_iter().with_max_len(1).for_each(&f));
            }
            _ => (0..n).for_each(f),
        }
    }

    /// Splits `0..n` into at most `threads` contiguous ranges of near-equal size (the split
    /// depends only on `n` and the thread count) and calls `f(range)` for each, in parallel.
    pub fn parallel_ranges<F: Fn(std::ops::Range<usize>) + Sync + Send>(&self, n: usize, f: F) {
        let parts = self.threads.min(n).max(1);
        self.parallel_for(parts, |t| f(n * t / parts..n * (t + 1) / parts));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn every_index_runs_exactly_once() {
        for threads in [1, 2, 3] {
            let pool = Pool::new(threads).unwrap();
            let hits: Vec<AtomicUsize> = (0..1000).map(|_| AtomicUsize::new(0)).collect();
            pool.parallel_for(1000, |i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
            let covered = AtomicUsize::new(0);
            pool.parallel_ranges(17, |r| {
                covered.fetch_add(r.len(), Ordering::Relaxed);
            });
            assert_eq!(covered.load(Ordering::Relaxed), 17);
        }
    }

    #[test]
    fn zero_threads_is_an_error() {
        assert!(matches!(Pool::new(0), Err(PoolError::ZeroThreads)));
    }
}
