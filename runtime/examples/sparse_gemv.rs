//! The sparse-input GEMM ([`kiln_runtime::native::gemm::sparse`]) against the packed dense
//! GEMM on OPT-125m FFN widths, at input densities from 100% down to 3%, for one row (the
//! decode-step GEMV) and for row blocks (prefill, where the union of a block's active
//! neurons is read). Prints markdown tables: median of N runs, and sparse / dense.
//! The crossover densities it shows are where `GEMV_MAX_DENSITY` / `GEMM_MAX_DENSITY` come
//! from. `bench/sparsity.sh` runs it.
//!
//! Before every timed call a buffer larger than the last-level cache is read, so both paths
//! find their weights in DRAM (as a decode step over many layers does) and neither evicts the
//! other's: the dense and sparse timings see the same cache state.
//!
//! `cargo run --release -p kiln-runtime --example sparse_gemv [threads] [runs]`

use kiln_runtime::native::gemm::sparse::{active_columns, sparse_gemm_in};
use kiln_runtime::native::gemm::{
    gemm_in, Epilogue, GemmConfig, Isa, MatMut, MatRef, PackedB, Rhs,
};
use kiln_runtime::pool::Pool;
use std::mem::MaybeUninit;
use std::time::Instant;

fn rand(seed: &mut u64, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            (*seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect()
}

/// Reads `buf` (larger than the last-level cache) so that the weights leave the caches.
fn evict(buf: &[f32]) -> f32 {
    buf.iter().step_by(16).sum()
}

/// Bytes read by [`evict`]: above the 32 MiB L3 of the machines we measure on.
const EVICT_BYTES: usize = 96 << 20;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let threads: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(1);
    let runs: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(200);
    let pool = Pool::new(threads).expect("pool");
    let cfg = GemmConfig {
        threads,
        isa: Isa::Auto,
    };
    let flush = vec![1f32; EVICT_BYTES / 4];
    let mut sink = 0f32;
    let densities = [1.0f32, 0.9, 0.7, 0.5, 0.3, 0.1, 0.03];
    println!(
        "threads {threads}, median of {runs} runs (rows 1) or {} (more rows); times in µs\n",
        runs / 10 + 1
    );
    // (K, N): the down-projection 3072 → 768 (what ReLU feeds) and the up-projection.
    for (k, n) in [(3072usize, 768usize), (768, 3072)] {
        let mut seed = 42u64;
        let b = rand(&mut seed, k * n);
        let packed = PackedB::pack(MatRef::row_major(&b, k, n).unwrap()).unwrap();
        for m in [1usize, 8, 128] {
            let reps = if m == 1 { runs } else { runs / 10 + 1 };
            println!("### K={k}, N={n}, rows={m}\n");
            println!("| input density | active (union per 8 rows) | dense µs | sparse µs | sparse / dense |");
            println!("|---|---|---|---|---|");
            let full = rand(&mut seed, m * k);
            let keep = rand(&mut seed, m * k);
            for &d in &densities {
                let a: Vec<f32> = full
                    .iter()
                    .zip(&keep)
                    .map(|(&x, &r)| if (r + 1.0) / 2.0 < d { x } else { 0.0 })
                    .collect();
                let mut c = vec![0f32; m * n];
                let mut dense = vec![];
                let mut sparse = vec![];
                let mut cu = vec![MaybeUninit::new(0f32); m * n];
                let mut union = 0.0;
                for r in 0..reps + 3 {
                    sink += evict(&flush);
                    let s = Instant::now();
                    gemm_in(
                        &pool,
                        MatRef::row_major(&a, m, k).unwrap(),
                        Rhs::Packed(&packed),
                        MatMut::row_major(&mut c, m, n).unwrap(),
                        &Epilogue::default(),
                        &cfg,
                    )
                    .unwrap();
                    let t_dense = s.elapsed().as_secs_f64();
                    sink += evict(&flush);
                    let s = Instant::now();
                    let (act, u) = active_columns(&a, m, k);
                    sparse_gemm_in(&pool, &a, m, k, &b, n, &act, &mut cu, &Epilogue::default())
                        .unwrap();
                    let t_sparse = s.elapsed().as_secs_f64();
                    union = u;
                    if r >= 3 {
                        dense.push(t_dense);
                        sparse.push(t_sparse);
                    }
                }
                let (td, ts) = (median(dense) * 1e6, median(sparse) * 1e6);
                println!(
                    "| {:.0}% | {:.1}% | {td:.1} | {ts:.1} | {:.2} |",
                    d * 100.0,
                    union * 100.0,
                    ts / td
                );
            }
            println!();
        }
    }
    std::hint::black_box(sink);
}
