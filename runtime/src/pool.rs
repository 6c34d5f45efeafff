//! The thread pool kernels run on: one persistent pool per executable, so that a run never
//! spawns OS threads, and whose idle workers spin for a while before they sleep, so that the
//! next kernel of a run starts on every core at once instead of waiting for the OS to wake a
//! sleeping thread (tens of microseconds on a virtual machine, more than a decode GEMV takes).
//! Work is split into fixed, schedule-independent pieces: every index of a
//! [`Pool::parallel_for`] is computed by exactly one call whose result does not depend on which
//! thread ran it or when, so outputs are bit-identical for any schedule.
//!
//! One job runs at a time. The caller publishes it (a pointer to a [`Job`] on its stack and an
//! odd `epoch`), claims indices beside the workers, waits until every index has finished, then
//! closes the epoch and waits until no worker still holds the job. A worker announces itself in
//! `active` before it re-checks the epoch, so (both sides sequentially consistent) either it sees
//! the job closed and never touches it, or the caller sees it active and waits.

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use thiserror::Error;

/// How long an idle worker spins, watching for the next job, before it sleeps. Kernels of one
/// run follow each other within microseconds; a whole run's gap is longer, and then the
/// workers sleep instead of burning the core.
const SPIN: Duration = Duration::from_micros(300);

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

/// A raw pointer handed to a [`Pool::parallel_for`] job whose calls each write their own
/// disjoint part of the buffer behind it (which outlives the job).
#[derive(Clone, Copy)]
pub struct SharedMut(*mut f32);

// SAFETY: the calls write pairwise-disjoint ranges (the constructor's contract).
unsafe impl Send for SharedMut {}
// SAFETY: as above.
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// Wraps `p`; the caller keeps the buffer alive for the job and the writes disjoint.
    pub fn new(p: *mut f32) -> Self {
        SharedMut(p)
    }

    /// The pointer (a method, so closures capture the whole `Send + Sync` wrapper).
    pub fn get(self) -> *mut f32 {
        self.0
    }
}

/// A fixed-size pool. With one thread everything runs inline on the caller.
#[derive(Clone)]
pub struct Pool {
    threads: usize,
    inner: Option<Arc<Workers>>,
}

/// The job being run: the caller's closure and its index count.
struct Job<'a> {
    f: &'a (dyn Fn(usize) + Sync),
    n: usize,
}

/// State shared by the caller and the workers.
struct Shared {
    /// Odd while a job is open; bumped to open and again to close each job.
    epoch: AtomicU64,
    /// The open job (a `Job` on the caller's stack; valid while the epoch is odd and until
    /// `active` drops to zero after it closes).
    job: AtomicPtr<Job<'static>>,
    /// The next index to claim.
    next: AtomicUsize,
    /// Indices claimed but not finished, plus those not yet claimed.
    pending: AtomicUsize,
    /// Workers that may be reading the job.
    active: AtomicUsize,
    /// Workers asleep (or about to sleep) on `wake`.
    sleeping: AtomicUsize,
    /// Set when the pool drops.
    shutdown: AtomicBool,
    /// A panic raised by a worker inside the job, re-raised on the caller.
    panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
    lock: Mutex<()>,
    wake: Condvar,
    /// Held by the caller of the running job: a second, concurrent caller (another thread
    /// running the same executable) runs its job inline instead of waiting.
    busy: Mutex<()>,
}

/// The worker threads, joined when the last [`Pool`] clone drops: a library (an AOT `.so`)
/// must not leave threads running after its context is destroyed (valgrind reports their
/// stacks, and an unloaded library's code would vanish under them).
struct Workers {
    shared: Arc<Shared>,
    handles: Vec<JoinHandle<()>>,
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, SeqCst);
        {
            let _g = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for h in self.handles.drain(..) {
            // A worker never panics outside a job (job panics are caught and handed over).
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

impl Shared {
    /// Claims and runs indices of the open job until none are left.
    ///
    /// # Safety
    /// `job` is the open job and stays valid for the duration (the caller's own job, or a
    /// worker's after it registered in `active` and saw the job's epoch).
    unsafe fn drain(&self, job: &Job<'_>) {
        loop {
            let i = self.next.fetch_add(1, Relaxed);
            if i >= job.n {
                return;
            }
            if let Err(p) = catch_unwind(AssertUnwindSafe(|| (job.f)(i))) {
                let mut slot = self.panic.lock().unwrap_or_else(|e| e.into_inner());
                slot.get_or_insert(p);
            }
            self.pending.fetch_sub(1, Release);
        }
    }

    /// A worker's life: wait for an epoch it has not seen, join the job, repeat.
    fn work(&self) {
        let mut seen = 0u64;
        loop {
            let Some(e) = self.wait_for_job(seen) else {
                return;
            };
            seen = e;
            if e % 2 == 0 {
                continue; // opened and closed while we looked away
            }
            self.active.fetch_add(1, SeqCst);
            if self.epoch.load(SeqCst) == e {
                // SAFETY: the epoch is still `e` after we registered in `active`, so the
                // caller has not closed the job and will wait for `active` before its stack
                // frame (and the job) goes away.
                unsafe { self.drain(&*self.job.load(Acquire)) };
            }
            self.active.fetch_sub(1, SeqCst);
        }
    }

    /// Spins, then sleeps, until the epoch differs from `seen`; `None` on shutdown.
    fn wait_for_job(&self, seen: u64) -> Option<u64> {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            let e = self.epoch.load(Acquire);
            if e != seen {
                return Some(e);
            }
            if self.shutdown.load(Relaxed) {
                return None;
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(64) && start.elapsed() > SPIN {
                break;
            }
            std::hint::spin_loop();
        }
        let mut g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.sleeping.fetch_add(1, SeqCst);
        let e = loop {
            let e = self.epoch.load(SeqCst);
            if e != seen || self.shutdown.load(SeqCst) {
                break e;
            }
            g = self.wake.wait(g).unwrap_or_else(|e| e.into_inner());
        };
        self.sleeping.fetch_sub(1, SeqCst);
        drop(g);
        (!self.shutdown.load(SeqCst)).then_some(e)
    }
}

impl Pool {
    /// A pool of `threads` threads: the caller and `threads - 1` workers.
    pub fn new(threads: usize) -> Result<Pool, PoolError> {
        if threads == 0 {
            return Err(PoolError::ZeroThreads);
        }
        if threads == 1 {
            return Ok(Self::single());
        }
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            next: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            sleeping: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
            panic: Mutex::new(None),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            busy: Mutex::new(()),
        });
        let mut workers = Workers {
            shared: shared.clone(),
            handles: Vec::with_capacity(threads - 1),
        };
        for i in 1..threads {
            let s = shared.clone();
            let h = std::thread::Builder::new()
                .name(format!("kiln-worker-{i}"))
                .spawn(move || s.work())
                .map_err(|e| PoolError::Spawn {
                    threads,
                    msg: e.to_string(),
                })?; // `workers` drops here and joins those already started
            workers.handles.push(h);
        }
        Ok(Pool {
            threads,
            inner: Some(Arc::new(workers)),
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
    /// result to be schedule-independent. Runs inline when `n <= 1`, when the pool has one
    /// thread, when called from inside a job, or while another thread's job holds the pool.
    /// A panic in `f` is re-raised here once every index has finished.
    pub fn parallel_for<F: Fn(usize) + Sync + Send>(&self, n: usize, f: F) {
        let Some(w) = self.inner.as_ref().filter(|_| n > 1) else {
            return (0..n).for_each(f);
        };
        let s = &*w.shared;
        let Ok(_busy) = s.busy.try_lock() else {
            return (0..n).for_each(f);
        };
        let job = Job { f: &f, n };
        s.next.store(0, Relaxed);
        s.pending.store(n, Relaxed);
        // The job's lifetime is erased for the store; the protocol in the module docs keeps
        // workers from reading it after this function returns.
        s.job
            .store((&job as *const Job<'_>).cast_mut().cast(), Release);
        let opened = s.epoch.fetch_add(1, SeqCst) + 1;
        debug_assert!(opened % 2 == 1);
        if s.sleeping.load(SeqCst) > 0 {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        // SAFETY: our own job, alive for this whole call.
        unsafe { s.drain(&job) };
        let mut spins = 0u32;
        while s.pending.load(Acquire) != 0 {
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1024) {
                // Oversubscribed (more pools than cores): let the worker holding an index run.
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        s.epoch.fetch_add(1, SeqCst);
        while s.active.load(SeqCst) != 0 {
            std::hint::spin_loop();
        }
        let panic = s.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
        drop(_busy);
        if let Some(p) = panic {
            resume_unwind(p);
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
    fn back_to_back_jobs_nested_and_concurrent_calls_each_run_every_index_once() {
        let pool = Pool::new(3).unwrap();
        // Many short jobs in a row: workers are still spinning on the previous epoch.
        for round in 0..2000 {
            let n = 1 + round % 7;
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            pool.parallel_for(n, |i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(
                hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                "round {round}"
            );
        }
        // A job that calls the pool again runs the inner job inline.
        let inner = AtomicUsize::new(0);
        pool.parallel_for(4, |_| {
            pool.parallel_for(5, |_| {
                inner.fetch_add(1, Ordering::Relaxed);
            })
        });
        assert_eq!(inner.load(Ordering::Relaxed), 20);
        // Callers on several threads share the pool (one at a time; the others run inline).
        let total = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..200 {
                        pool.parallel_for(6, |i| {
                            total.fetch_add(i + 1, Ordering::Relaxed);
                        });
                    }
                });
            }
        });
        assert_eq!(total.load(Ordering::Relaxed), 4 * 200 * 21);
    }

    #[test]
    fn a_panic_in_a_job_reaches_the_caller_after_every_index_finished() {
        let pool = Pool::new(2).unwrap();
        let done = AtomicUsize::new(0);
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
            pool.parallel_for(8, |i| {
                if i == 3 {
                    panic!("index 3");
                }
                done.fetch_add(1, Ordering::Relaxed);
            })
        }));
        assert!(r.is_err());
        assert_eq!(done.load(Ordering::Relaxed), 7);
        // The pool still works afterwards.
        let again = AtomicUsize::new(0);
        pool.parallel_for(8, |_| {
            again.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(again.load(Ordering::Relaxed), 8);
    }

    #[test]
    fn workers_sleep_when_idle_and_wake_for_the_next_job() {
        let pool = Pool::new(2).unwrap();
        std::thread::sleep(SPIN * 10);
        let hits = AtomicUsize::new(0);
        pool.parallel_for(2, |_| {
            hits.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(hits.load(Ordering::Relaxed), 2);
        let w = pool.inner.as_ref().unwrap();
        drop(pool.clone());
        assert_eq!(Arc::strong_count(w), 1);
    }

    #[test]
    fn zero_threads_is_an_error() {
        assert!(matches!(Pool::new(0), Err(PoolError::ZeroThreads)));
    }
}
