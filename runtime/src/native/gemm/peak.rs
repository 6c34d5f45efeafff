//! The single-core f32 FMA peak of the running CPU per vector ISA, measured: twelve
//! independent FMA chains in registers (enough to cover FMA latency × two ports), best of five
//! timed loops. Benchmarks report a GEMM's "% of peak" against this figure, taken in the same
//! run, not against a data-sheet number (the machine's clock moves with load).

use super::Isa;

/// Iterations of one timed loop (about 35 ms with AVX-512 at 3.4 GHz).
const ITERS: u64 = 20_000_000;
/// Independent accumulators.
const CHAINS: usize = 12;
/// Timed loops; the fastest counts.
const TRIALS: usize = 5;

/// GFLOP/s of one core running only FMAs with `isa`'s vectors (2 flops per lane), or `None`
/// where the CPU lacks the ISA or it has no vector FMA (`Auto` measures the best one present;
/// `Portable` is `None`).
pub fn fma_peak_gflops(isa: Isa) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    {
        let avx512 = std::is_x86_feature_detected!("avx512f");
        let avx2 = std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
        match isa {
            // SAFETY: the CPU has AVX-512F (checked above).
            Isa::Avx512 | Isa::Auto if avx512 => Some(best(16, |n| unsafe { x86::avx512(n) })),
            // SAFETY: the CPU has AVX2 and FMA (checked above).
            Isa::Avx2 | Isa::Auto if avx2 => Some(best(8, |n| unsafe { x86::avx2(n) })),
            _ => None,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = isa;
        None
    }
}

/// The fastest of [`TRIALS`] loops of [`ITERS`] iterations, as GFLOP/s.
#[cfg(target_arch = "x86_64")]
fn best(lanes: u64, f: impl Fn(u64) -> f32) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..TRIALS {
        let t = std::time::Instant::now();
        std::hint::black_box(f(std::hint::black_box(ITERS)));
        best = best.min(t.elapsed().as_secs_f64());
    }
    (ITERS * CHAINS as u64 * lanes * 2) as f64 / best / 1e9
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::CHAINS;
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn avx512(iters: u64) -> f32 {
        let a = _mm512_set1_ps(0.999_999);
        let b = _mm512_set1_ps(1e-7);
        let mut c = [_mm512_set1_ps(1.0); CHAINS];
        for _ in 0..iters {
            for x in c.iter_mut() {
                *x = _mm512_fmadd_ps(*x, a, b);
            }
        }
        let mut s = _mm512_setzero_ps();
        for x in c {
            s = _mm512_add_ps(s, x);
        }
        _mm512_reduce_add_ps(s)
    }

    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn avx2(iters: u64) -> f32 {
        let a = _mm256_set1_ps(0.999_999);
        let b = _mm256_set1_ps(1e-7);
        let mut c = [_mm256_set1_ps(1.0); CHAINS];
        for _ in 0..iters {
            for x in c.iter_mut() {
                *x = _mm256_fmadd_ps(*x, a, b);
            }
        }
        let mut s = _mm256_setzero_ps();
        for x in c {
            s = _mm256_add_ps(s, x);
        }
        let mut out = [0f32; 8];
        // SAFETY: `out` holds 8 f32.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), s) };
        out.iter().sum()
    }
}
