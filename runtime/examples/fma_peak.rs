//! The single-core f32 FMA peak of this machine, per vector ISA: 12 independent FMA chains
//! (enough to cover FMA latency × 2 ports) in registers, best of 5 timed loops. The GEMM's
//! "% of peak" is measured against this, not against a data-sheet figure.
//!
//! `cargo run --release -p kiln-runtime --example fma_peak`

use std::time::Instant;

const ITERS: u64 = 20_000_000;
const CHAINS: u64 = 12;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn avx512(iters: u64) -> f32 {
    use std::arch::x86_64::*;
    let a = _mm512_set1_ps(0.999_999);
    let b = _mm512_set1_ps(1e-7);
    let mut c = [_mm512_set1_ps(1.0); CHAINS as usize];
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

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2(iters: u64) -> f32 {
    use std::arch::x86_64::*;
    let a = _mm256_set1_ps(0.999_999);
    let b = _mm256_set1_ps(1e-7);
    let mut c = [_mm256_set1_ps(1.0); CHAINS as usize];
    for _ in 0..iters {
        for x in c.iter_mut() {
            *x = _mm256_fmadd_ps(*x, a, b);
        }
    }
    let mut out = [0f32; 8];
    let mut s = _mm256_setzero_ps();
    for x in c {
        s = _mm256_add_ps(s, x);
    }
    _mm256_storeu_ps(out.as_mut_ptr(), s);
    out.iter().sum()
}

fn best(lanes: u64, f: impl Fn(u64) -> f32) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        std::hint::black_box(f(ITERS));
        best = best.min(t.elapsed().as_secs_f64());
    }
    (ITERS * CHAINS * lanes * 2) as f64 / best / 1e9
}

fn main() {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked above).
            let g = best(16, |n| unsafe { avx512(n) });
            println!("avx512: {g:.1} GFLOP/s on one core");
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA (checked above).
            let g = best(8, |n| unsafe { avx2(n) });
            println!("avx2:   {g:.1} GFLOP/s on one core");
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    println!("no x86-64 vector ISA to measure");
}
