//! Fused attention benchmark on the bench models' shapes (head dim 64), on every ISA the CPU
//! has (1 thread) and the widest on 2 threads; prints the best of N runs and GFLOP/s
//! (4·B·Hq·S·T·D flops, causal counted in full). Run with
//! `cargo run --release -p kiln-runtime --example attention_bench [name filter]`; with
//! `SEQ_MAJOR=1` in the environment, q, k, v and the output are sequence-major (`[B, S, H, D]`,
//! the `layout = "bshd"` the optimiser gives ViT and BERT) instead of head-major.

use kiln_runtime::native::attention::{attention_with, Attention, Isa};
use kiln_runtime::pool::Pool;
use std::time::{Duration, Instant};

fn main() {
    // (name, B, Hq, Hkv, S, T, causal)
    let shapes = [
        ("vit_s16 layer", 1, 6, 6, 197, 197, false),
        ("bert_base layer S=128", 1, 12, 12, 128, 128, false),
        ("llama GQA S=128", 1, 8, 4, 128, 128, true),
        ("llama kv decode T=129", 1, 8, 4, 1, 129, false),
    ];
    let filter = std::env::args().nth(1).unwrap_or_default();
    for (name, b, hq, hkv, s, t, causal) in shapes {
        if !name.contains(&filter) {
            continue;
        }
        let d = 64;
        let gen = |n: usize, seed: usize| -> Vec<f32> {
            (0..n)
                .map(|i| (((i * 31 + seed) % 97) as f32 - 48.0) / 97.0)
                .collect()
        };
        let (q, k, v) = (
            gen(b * hq * s * d, 1),
            gen(b * hkv * t * d, 2),
            gen(b * hkv * t * d, 3),
        );
        let seq_major = std::env::var_os("SEQ_MAJOR").is_some();
        let p = Attention {
            q: &q,
            k: &k,
            v: &v,
            dims: [b, hq, hkv, s, t, d, d],
            scale: 0.125,
            causal,
            mask: None,
            seq_major,
        };
        let mut out = vec![0.0f32; b * hq * s * d];
        let runs = [
            (Isa::Avx512, 1),
            (Isa::Avx2, 1),
            (Isa::Portable, 1),
            (Isa::Auto, 2),
        ];
        for (isa, threads) in runs.into_iter().filter(|(i, _)| i.available()) {
            let pool = Pool::new(threads).expect("pool");
            let mut best = Duration::MAX;
            for _ in 0..50 {
                let t0 = Instant::now();
                attention_with(&pool, &p, &mut out, isa).expect("attention");
                best = best.min(t0.elapsed());
            }
            let gf = 4.0 * (b * hq * s * t * d) as f64 / best.as_secs_f64() / 1e9;
            println!(
                "{name:<24} {:<9} {threads} thr: {:>8.1} µs {gf:>6.1} GFLOP/s",
                format!("{isa:?}"),
                best.as_secs_f64() * 1e6
            );
        }
    }
}
