//! The parallel-for boundary kernels split work through: `run(n, f)` calls `f(i)` for every
//! task `0..n`, possibly concurrently, and returns when all are done. Backends take a
//! `&dyn ParallelFor`, so the thread pool behind it can change without touching them.
//!
//! The runtime's persistent [`Pool`] implements it; [`Serial`] runs everything inline.

use crate::pool::Pool;

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

impl ParallelFor for Pool {
    fn threads(&self) -> usize {
        Pool::threads(self)
    }
    fn run(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        self.parallel_for(n, f)
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
                let pool = Pool::new(threads).expect("pool");
                ParallelFor::run(&pool, n, &|i| {
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
