//! The parallel-for boundary kernels split work through: `run(n, f)` calls `f(i)` for every
//! task `0..n`, possibly concurrently, and returns when all are done. Backends take a
//! `&dyn ParallelFor`, so the thread pool behind it can change without touching them.
//!
//! [`default_parallel`] gives the runtime's persistent [`Pool`] behind this boundary;
//! [`ScopedThreads`] (fresh `std::thread::scope` threads per call) remains only as the
//! fallback when a pool cannot be created.

use crate::pool::Pool;
use std::sync::Arc;

/// A parallel-for over task indices.
pub trait ParallelFor: Send + Sync {
    /// How many tasks are worth creating (the number of workers).
    fn threads(&self) -> usize;
    /// Runs `f(i)` for every `i in 0..n` and returns when all have finished. Tasks must not
    /// assume any order or assignment to threads.
    fn run(&self, n: usize, f: &(dyn Fn(usize) + Sync));
}

/// Runs every task on the calling thread, in order.
#[derive(Clone, Copy, Debug, Default)]
pub struct Serial;

impl ParallelFor for Serial {
    fn threads(&self) -> usize {
        1
    }
    fn run(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        (0..n).for_each(f);
    }
}

/// Spawns up to `threads - 1` scoped threads per call (the caller works too); tasks are
/// handed out round-robin. A stop-gap until the runtime has a persistent pool: spawning
/// costs tens of microseconds, so callers only split big kernels.
#[derive(Clone, Copy, Debug)]
pub struct ScopedThreads(pub usize);

impl ParallelFor for ScopedThreads {
    fn threads(&self) -> usize {
        self.0.max(1)
    }
    fn run(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        let t = self.threads().min(n);
        if t <= 1 {
            return (0..n).for_each(f);
        }
        std::thread::scope(|s| {
            for w in 1..t {
                s.spawn(move || (w..n).step_by(t).for_each(f));
            }
            (0..n).step_by(t).for_each(f);
        });
    }
}

impl ParallelFor for Pool {
    fn threads(&self) -> usize {
        Pool::threads(self)
    }
    fn run(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        self.parallel_for(n, f)
    }
}

/// The parallel-for kernels use for `threads` workers (1 or fewer: serial): a persistent
/// [`Pool`], or scoped threads should the pool fail to start.
pub fn default_parallel(threads: usize) -> Arc<dyn ParallelFor> {
    if threads <= 1 {
        return Arc::new(Serial);
    }
    match Pool::new(threads) {
        Ok(p) => Arc::new(p),
        Err(_) => Arc::new(ScopedThreads(threads)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn every_task_runs_exactly_once() {
        for threads in [1, 2, 3, 8] {
            for n in [0, 1, 2, 5, 17] {
                let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                default_parallel(threads).run(n, &|i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(
                    hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                    "threads {threads} n {n}"
                );
            }
        }
    }
}
