//! GEMM benchmark: kiln's f32 GEMM (pre-packed and plain B, plus the fused bias+gelu epilogue)
//! with every micro-kernel this CPU has (avx512 / avx2 / portable), against the `gemm` crate on
//! transformer shapes, at 1 and 2 threads. Prints and writes a
//! markdown table to `bench/gemm.md`. Run with
//! `cargo run --release -p kiln-runtime --example gemm_bench [-- --quick]`.

use kiln_runtime::native::gemm::{
    fma_peak_gflops, gemm, Activation, Epilogue, GemmConfig, Isa, MatMut, MatRef, PackedB, Rhs,
};
use std::time::{Duration, Instant};

/// (M, N, K): C[M,N] = A[M,K]·B[K,N].
const SHAPES: [(usize, usize, usize); 5] = [
    (128, 768, 768),
    (128, 3072, 768),
    (128, 768, 3072),
    (128, 2000, 768),
    (1, 768, 768),
];

/// Best (lowest) mean time per call of each variant. Variants take turns, one trial of about
/// `target` each per round for `rounds` rounds, so that all of them see the same background
/// load on a shared machine and each keeps its least disturbed trial.
fn best_times(rounds: usize, target: Duration, fs: &mut [&mut dyn FnMut()]) -> Vec<Duration> {
    let reps: Vec<u32> = fs
        .iter_mut()
        .map(|f| {
            f();
            let t0 = Instant::now();
            f();
            let once = t0.elapsed().max(Duration::from_nanos(100));
            (target.as_secs_f64() / once.as_secs_f64()).clamp(1.0, 100_000.0) as u32
        })
        .collect();
    let mut best = vec![Duration::MAX; fs.len()];
    for _ in 0..rounds {
        for ((f, &r), b) in fs.iter_mut().zip(&reps).zip(best.iter_mut()) {
            let t = Instant::now();
            for _ in 0..r {
                f();
            }
            *b = (*b).min(t.elapsed() / r);
        }
    }
    best
}

fn gflops(m: usize, n: usize, k: usize, t: Duration) -> f64 {
    2.0 * (m * n * k) as f64 / t.as_secs_f64() / 1e9
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (trials, target) = if quick {
        (8, Duration::from_millis(5))
    } else {
        // Many short trials: on a shared machine the best one is the least disturbed.
        (30, Duration::from_millis(10))
    };
    let mut rows = Vec::new();
    for &(m, n, k) in &SHAPES {
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) / 7.0)
            .collect();
        let b: Vec<f32> = (0..k * n)
            .map(|i| ((i * 5 % 11) as f32 - 5.0) / 9.0)
            .collect();
        let bias: Vec<f32> = (0..n).map(|j| j as f32 / n as f32).collect();
        let c = vec![0.0f32; m * n];
        let av = MatRef::row_major(&a, m, k).expect("A view");
        let bv = MatRef::row_major(&b, k, n).expect("B view");
        for (threads, isa) in [1usize, 2]
            .into_iter()
            .flat_map(|t| Isa::available().into_iter().map(move |i| (t, i)))
        {
            let packed = PackedB::pack_for(bv, isa).expect("pack B");
            let cfg = GemmConfig { threads, isa };
            let run = |rhs: Rhs<'_>, ep: &Epilogue<'_>, c: &mut Vec<f32>| {
                gemm(
                    av,
                    rhs,
                    MatMut::row_major(c, m, n).expect("C view"),
                    ep,
                    &cfg,
                )
                .expect("gemm");
            };
            let plain_ep = Epilogue::default();
            let fused_ep = Epilogue {
                bias: Some(&bias),
                activation: Activation::GeluErf,
                ..Epilogue::default()
            };
            let par = if threads == 1 {
                gemm::Parallelism::None
            } else {
                gemm::Parallelism::Rayon(threads)
            };
            let (mut c1, mut c2, mut c3, mut c4) = (c.clone(), c.clone(), c.clone(), c.clone());
            let mut f_packed = || run(Rhs::Packed(&packed), &plain_ep, &mut c1);
            let mut f_plain = || run(Rhs::Plain(bv), &plain_ep, &mut c2);
            let mut f_fused = || run(Rhs::Packed(&packed), &fused_ep, &mut c3);
            let mut f_crate = || {
                // SAFETY: the pointers and strides describe the row-major buffers a (m×k),
                // b (k×n) and c4 (m×n) above, which outlive the call.
                unsafe {
                    gemm::gemm(
                        m,
                        n,
                        k,
                        c4.as_mut_ptr(),
                        1,
                        n as isize,
                        false,
                        a.as_ptr(),
                        1,
                        k as isize,
                        b.as_ptr(),
                        1,
                        n as isize,
                        0.0f32,
                        1.0f32,
                        false,
                        false,
                        false,
                        par,
                    )
                }
            };
            let t = best_times(
                trials,
                target,
                &mut [&mut f_packed, &mut f_plain, &mut f_fused, &mut f_crate],
            );
            let (t_packed, t_plain, t_fused, t_crate) = (t[0], t[1], t[2], t[3]);
            let g = |t| gflops(m, n, k, t);
            // The FMA peak of `threads` cores, measured right after this row's trials.
            let of_peak = fma_peak_gflops(isa).map_or("–".to_owned(), |p| {
                format!("{:.0}%", 100.0 * g(t_packed) / (p * threads as f64))
            });
            let row = format!(
                "| {m}×{n}×{k} | {threads} | {} | {:.1} | {of_peak} | {:.1} | {:.1} | {:.1} | {:.2} |",
                isa.name(),
                g(t_packed),
                g(t_plain),
                g(t_fused),
                g(t_crate),
                g(t_packed) / g(t_crate)
            );
            println!("{row}");
            rows.push(row);
        }
    }
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into());
    let mut md = String::new();
    md.push_str("# f32 GEMM: kiln vs the `gemm` crate 0.19\n\n");
    md.push_str(&format!(
        "Machine: {cpu}, {} logical CPUs; load average at the end of the run: {load}. \
         Kernels measured: {}. GFLOP/s = 2·M·N·K / time; each cell is the best of {trials} \
         trials (mean over repeated calls of ~{} ms per trial; the four variants take turns \
         trial by trial), because the machine is shared with other builders.\n\
         Generated by `cargo run --release -p kiln-runtime --example gemm_bench`.\n\n",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        Isa::available()
            .iter()
            .map(|i| i.name())
            .collect::<Vec<_>>()
            .join(", "),
        target.as_millis()
    ));
    md.push_str(
        "- **kiln packed**: B pre-packed once (`PackedB`), as for constant weights.\n\
         - **% of peak**: kiln packed against the FMA peak of as many cores \
         (`fma_peak_gflops`: FMAs only, in registers), measured right after the row's trials.\n\
         - **kiln plain**: B packed inside every call.\n\
         - **kiln +bias+gelu**: packed B with the fused `bias` + erf-`gelu` epilogue (a fused op: \
         counted with the same GEMM flops).\n\
         - **gemm crate**: `gemm::gemm` with read_dst=false, alpha=0, beta=1 (Parallelism::None \
         or Rayon(2)).\n\n",
    );
    md.push_str("| M×N×K | threads | kernel | kiln packed | % of peak | kiln plain | kiln +bias+gelu | gemm crate | packed / crate |\n");
    md.push_str("|---|---|---|---|---|---|---|---|---|\n");
    for r in &rows {
        md.push_str(r);
        md.push('\n');
    }
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/gemm.md");
    match std::fs::write(&path, md) {
        Ok(()) => println!("wrote {}", path.display()),
        Err(e) => eprintln!("could not write {}: {e}", path.display()),
    }
}
