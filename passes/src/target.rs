//! What the optimiser knows about the machine it optimises for: peak arithmetic rate,
//! memory bandwidth and the fixed cost of launching one kernel. The cost model
//! ([`crate::cost`], used by both e-graph extraction and `kiln inspect`) turns an op's
//! FLOPs and bytes into seconds with these.

/// A target machine, as the cost model sees it (a roofline plus a per-kernel overhead).
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    /// A short name (`zen3-2c`).
    pub name: &'static str,
    /// Peak arithmetic rate over all cores, FLOP/s.
    pub peak_flops: f64,
    /// Sustained main-memory bandwidth, bytes/s (reads plus writes).
    pub mem_bandwidth: f64,
    /// Fixed cost of one kernel (dispatch, loop setup, thread wake-up), seconds.
    pub kernel_overhead: f64,
}

impl Target {
    /// This build machine: AMD Zen 3, 2 cores, AVX2 with FMA.
    ///
    /// - Peak: 87 GFLOP/s per core measured (f32 FMA loop), times 2 cores.
    /// - Bandwidth: 19 GB/s. Measured once here with a release-built (`-C opt-level=3
    ///   -C target-cpu=native`) loop that `copy_from_slice`s a 256 MiB f64 buffer into
    ///   another, best of 10 runs, counting bytes read plus bytes written: 18.7 to 20.4
    ///   GB/s over two runs.
    /// - Kernel overhead: 2 µs, an estimate of per-op dispatch and thread fork/join.
    pub fn zen3_2c() -> Target {
        Target {
            name: "zen3-2c",
            peak_flops: 2.0 * 87e9,
            mem_bandwidth: 19e9,
            kernel_overhead: 2e-6,
        }
    }

    /// Estimated seconds for a kernel doing `flops` arithmetic and moving `bytes`:
    /// the overhead plus the slower of compute and memory (a roofline).
    pub fn kernel_time(&self, flops: f64, bytes: f64) -> f64 {
        self.kernel_overhead + (flops / self.peak_flops).max(bytes / self.mem_bandwidth)
    }
}

impl Default for Target {
    fn default() -> Target {
        Target::zen3_2c()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_time_is_overhead_plus_the_slower_roof() {
        let t = Target::zen3_2c();
        assert_eq!(t.kernel_time(0.0, 0.0), t.kernel_overhead);
        let compute_bound = t.kernel_time(1e9, 1.0);
        assert!((compute_bound - t.kernel_overhead - 1e9 / t.peak_flops).abs() < 1e-12);
        let memory_bound = t.kernel_time(1.0, 1e9);
        assert!((memory_bound - t.kernel_overhead - 1e9 / t.mem_bandwidth).abs() < 1e-12);
    }
}
