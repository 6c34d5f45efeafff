//! What the optimiser knows about the machine it optimises for: peak arithmetic rate,
//! memory bandwidth, cache sizes and the fixed cost of launching one kernel. The cost
//! model ([`crate::cost`], used by both e-graph extraction and `kiln inspect`) turns an
//! op's FLOPs and bytes into seconds with these. [`Target::host`] describes the machine
//! kiln runs on (detected once); a backend compiling for another machine hands in its own.

use std::sync::OnceLock;

/// A target machine, as the cost model sees it (a roofline plus a per-kernel overhead).
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    /// A short name (`x86_64-avx2-2c`, `zen3-2c`).
    pub name: String,
    /// The widest vector ISA the kernels use (`avx512`, `avx2`, `sse2`, `neon`, `scalar`).
    pub isa: &'static str,
    /// f32 lanes per vector register of that ISA.
    pub lanes: u32,
    /// Cores the runtime may use.
    pub cores: u32,
    /// Peak arithmetic rate over all cores, FLOP/s.
    pub peak_flops: f64,
    /// Sustained main-memory bandwidth, bytes/s (reads plus writes).
    pub mem_bandwidth: f64,
    /// Fixed cost of one kernel (dispatch, loop setup, thread wake-up), seconds.
    pub kernel_overhead: f64,
    /// Per-core L1 data cache, bytes.
    pub l1_bytes: u64,
    /// Per-core L2 cache, bytes.
    pub l2_bytes: u64,
    /// Last-level cache (shared), bytes.
    pub llc_bytes: u64,
    /// Where the figures come from (`measured`, `tabled from ISA and core count`).
    pub source: &'static str,
}

/// Clock assumed for the tabled peak when the OS does not say (GHz). Zen 3 reached 87
/// GFLOP/s per core with AVX2 FMA here, which is 8 lanes × 2 FLOP × 2 pipes × 2.7 GHz.
pub const TABLED_CLOCK_GHZ: f64 = 2.7;
/// Sustained main-memory bandwidth per core used by the tabled target (bytes/s), from
/// the measured 19 GB/s of the 2-core Zen 3 below; the total is capped at
/// [`TABLED_BANDWIDTH_CAP`] because a socket's memory channels saturate.
pub const TABLED_BANDWIDTH_PER_CORE: f64 = 9.5e9;
/// The most bandwidth the tabled target assumes, bytes/s.
pub const TABLED_BANDWIDTH_CAP: f64 = 80e9;
/// Per-kernel overhead estimate (dispatch plus thread fork/join), seconds.
pub const KERNEL_OVERHEAD_S: f64 = 2e-6;

impl Target {
    /// A fixed, reproducible target: AMD Zen 3, 2 cores, AVX2 with FMA (the machine the
    /// cost model was first calibrated on; tests that compare costs use it).
    ///
    /// - Peak: 87 GFLOP/s per core measured (f32 FMA loop), times 2 cores.
    /// - Bandwidth: 19 GB/s. Measured with a release-built (`-C opt-level=3
    ///   -C target-cpu=native`) loop that `copy_from_slice`s a 256 MiB f64 buffer into
    ///   another, best of 10 runs, counting bytes read plus bytes written: 18.7 to 20.4
    ///   GB/s over two runs.
    /// - Kernel overhead: 2 µs, an estimate of per-op dispatch and thread fork/join.
    pub fn zen3_2c() -> Target {
        Target {
            name: "zen3-2c".into(),
            isa: "avx2",
            lanes: 8,
            cores: 2,
            peak_flops: 2.0 * 87e9,
            mem_bandwidth: 19e9,
            kernel_overhead: KERNEL_OVERHEAD_S,
            l1_bytes: 32 << 10,
            l2_bytes: 512 << 10,
            llc_bytes: 32 << 20,
            source: "measured",
        }
    }

    /// The machine kiln runs on, detected once per process: ISA width from CPUID, cores
    /// from the OS, cache sizes from sysfs where Linux has them; peak and bandwidth
    /// tabled from those (see [`Target::tabled`]).
    pub fn host() -> Target {
        static HOST: OnceLock<Target> = OnceLock::new();
        HOST.get_or_init(|| {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
            let (isa, lanes) = host_isa();
            let mut t = Target::tabled(isa, lanes, cores);
            if let Some((l1, l2, llc)) = sysfs_caches() {
                (t.l1_bytes, t.l2_bytes, t.llc_bytes) = (l1, l2, llc);
            }
            t
        })
        .clone()
    }

    /// A target from an ISA, its f32 lanes and a core count: peak = cores × lanes × 2
    /// (FMA) × 2 (FMA pipes) × [`TABLED_CLOCK_GHZ`]; bandwidth
    /// [`TABLED_BANDWIDTH_PER_CORE`] per core up to [`TABLED_BANDWIDTH_CAP`]; typical
    /// caches (32 KiB L1, 1 MiB L2, 2 MiB of LLC per core).
    pub fn tabled(isa: &'static str, lanes: u32, cores: u32) -> Target {
        let cores = cores.max(1);
        let fma = if matches!(isa, "avx512" | "avx2" | "neon") {
            2.0
        } else {
            1.0
        };
        Target {
            name: format!("{}-{isa}-{cores}c", std::env::consts::ARCH),
            isa,
            lanes,
            cores,
            peak_flops: cores as f64 * lanes as f64 * fma * 2.0 * TABLED_CLOCK_GHZ * 1e9,
            mem_bandwidth: (cores as f64 * TABLED_BANDWIDTH_PER_CORE).min(TABLED_BANDWIDTH_CAP),
            kernel_overhead: KERNEL_OVERHEAD_S,
            l1_bytes: 32 << 10,
            l2_bytes: 1 << 20,
            llc_bytes: (2u64 << 20) * cores as u64,
            source: "tabled from ISA and core count",
        }
    }

    /// Estimated seconds for a kernel doing `flops` arithmetic and moving `bytes`:
    /// the overhead plus the slower of compute and memory (a roofline).
    pub fn kernel_time(&self, flops: f64, bytes: f64) -> f64 {
        self.kernel_overhead + (flops / self.peak_flops).max(bytes / self.mem_bandwidth)
    }

    /// One line for people: name, ISA, cores, rates, caches and where they come from.
    pub fn describe(&self) -> String {
        format!(
            "{} ({} × {} f32 lanes, {} cores, {:.0} GFLOP/s, {:.0} GB/s, {:.1} µs per kernel, \
             L1 {} KiB, L2 {} KiB, LLC {} MiB; {})",
            self.name,
            self.isa,
            self.lanes,
            self.cores,
            self.peak_flops / 1e9,
            self.mem_bandwidth / 1e9,
            self.kernel_overhead * 1e6,
            self.l1_bytes >> 10,
            self.l2_bytes >> 10,
            self.llc_bytes >> 20,
            self.source
        )
    }
}

impl Default for Target {
    /// The host ([`Target::host`]).
    fn default() -> Target {
        Target::host()
    }
}

/// The widest vector ISA this CPU has that kiln's kernels use, with its f32 lanes.
fn host_isa() -> (&'static str, u32) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return ("avx512", 16);
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return ("avx2", 8);
        }
        ("sse2", 4)
    }
    #[cfg(target_arch = "aarch64")]
    {
        ("neon", 4)
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        ("scalar", 1)
    }
}

/// Per-core L1d and L2 and the largest cache (LLC) of cpu0, from Linux sysfs.
fn sysfs_caches() -> Option<(u64, u64, u64)> {
    let dir = std::path::Path::new("/sys/devices/system/cpu/cpu0/cache");
    let (mut l1, mut l2, mut llc) = (None, None, None);
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let read = |f: &str| std::fs::read_to_string(e.path().join(f)).ok();
        let (Some(level), Some(kind), Some(size)) = (read("level"), read("type"), read("size"))
        else {
            continue;
        };
        let Some(bytes) = parse_cache_size(size.trim()) else {
            continue;
        };
        match (level.trim(), kind.trim()) {
            ("1", "Data") => l1 = Some(bytes),
            ("2", _) => l2 = Some(bytes),
            (l, _) if l != "1" => llc = Some(llc.map_or(bytes, |c: u64| c.max(bytes))),
            _ => {}
        }
    }
    let (l1, l2) = (l1?, l2?);
    Some((l1, l2, llc.unwrap_or(l2)))
}

/// `"32K"`, `"1024K"`, `"32M"` → bytes.
fn parse_cache_size(s: &str) -> Option<u64> {
    let (num, mult) = match s.as_bytes().last()? {
        b'K' => (&s[..s.len() - 1], 1u64 << 10),
        b'M' => (&s[..s.len() - 1], 1 << 20),
        b'G' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
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

    #[test]
    fn tabled_zen3_matches_the_measured_peak_within_a_percent() {
        let t = Target::tabled("avx2", 8, 2);
        let measured = Target::zen3_2c();
        assert!((t.peak_flops / measured.peak_flops - 1.0).abs() < 0.01);
        assert_eq!(t.mem_bandwidth, measured.mem_bandwidth);
        // Wider vectors and more cores give a faster machine; bandwidth saturates.
        assert!(Target::tabled("avx512", 16, 2).peak_flops > t.peak_flops);
        assert_eq!(
            Target::tabled("avx2", 8, 64).mem_bandwidth,
            TABLED_BANDWIDTH_CAP
        );
    }

    #[test]
    fn host_target_is_plausible_and_described() {
        let t = Target::host();
        assert!(t.cores >= 1 && t.lanes >= 1 && t.peak_flops > 0.0);
        assert!(t.l1_bytes > 0 && t.l2_bytes >= t.l1_bytes && t.llc_bytes >= t.l2_bytes);
        let d = t.describe();
        assert!(d.contains(t.isa) && d.contains("cores"), "{d}");
        assert_eq!(Target::default(), t);
    }

    #[test]
    fn cache_sizes_parse() {
        assert_eq!(parse_cache_size("32K"), Some(32 << 10));
        assert_eq!(parse_cache_size("32M"), Some(32 << 20));
        assert_eq!(parse_cache_size("512"), Some(512));
        assert_eq!(parse_cache_size("x"), None);
        assert_eq!(parse_cache_size(""), None);
    }
}
