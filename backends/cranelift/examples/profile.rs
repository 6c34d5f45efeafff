//! Per-model JIT timings: for every tiny model the minimum per-run wall time over `RUNS`
//! runs; for every bench model the per-kernel profile (top kernels and totals by kind/op).
//! `cargo run --release -p kiln-cranelift --example profile [tiny|bench|tinyprof|all] [threads]`
//! (`tinyprof`: the per-kernel profile of the tiny models).

use kiln_runtime::{Model, TestData};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Runs per model for the minimum.
const RUNS: usize = 50;
/// Profiled runs per bench model (the minimum per kernel is kept).
const BENCH_RUNS: usize = 5;
/// Kernels listed per bench model.
const TOP: usize = 15;

fn models(kind: &str) -> Vec<PathBuf> {
    let dir = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/models"
    ))
    .join(kind);
    let mut v: Vec<_> = std::fs::read_dir(&dir)
        .map(|e| e.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

fn load(m: &Path, threads: usize) -> (kiln_cranelift::JitExecutable, Vec<kiln_ir::Tensor>) {
    let model = Model::load(m.join("model.onnx")).expect("loads");
    let mut g = model.graph().clone();
    kiln_passes::pipeline::default_pipeline()
        .run(&mut g)
        .expect("pipeline");
    let exe = kiln_cranelift::compile_with(&g, &kiln_cranelift::JitOptions { threads })
        .expect("compiles");
    let data = TestData::load(&m.join("test_data_set_0")).expect("test data");
    let ins: Vec<(&str, kiln_ir::Tensor)> = data
        .inputs
        .iter()
        .map(|(n, t)| (n.as_str(), t.clone()))
        .collect();
    let ordered = kiln_ir::interp::order_inputs(&g, &ins).expect("inputs");
    (exe, ordered)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let which = args.get(1).map(String::as_str).unwrap_or("all");
    let threads = args.get(2).and_then(|t| t.parse().ok()).unwrap_or(0);
    if which != "bench" {
        for m in models("tiny") {
            let (exe, ins) = load(&m, threads);
            let mut best = f64::INFINITY;
            for _ in 0..RUNS {
                let t = Instant::now();
                exe.run(ins.clone()).expect("runs");
                best = best.min(t.elapsed().as_secs_f64());
            }
            let (_, rep) = exe.run_profiled(ins.clone()).expect("runs");
            let fb = rep.kernels.iter().filter(|k| k.kind == "fallback").count();
            println!(
                "tiny {:14} {:8.1} us/run  kernels {:3} (loop {:3}, fallback {:3})  arena {} B, live peak {} B",
                m.file_name().unwrap().to_string_lossy(),
                best * 1e6,
                rep.kernels.len(),
                exe.jit_kernel_count(),
                fb,
                rep.memory.arena_bytes,
                rep.memory.live_peak_bytes
            );
        }
    }
    if which != "tiny" {
        let set = if which == "tinyprof" { "tiny" } else { "bench" };
        for m in models(set) {
            let (exe, ins) = load(&m, threads);
            let mut best: Vec<(String, &'static str, String, u64)> = vec![];
            let mut total = f64::INFINITY;
            for r in 0..BENCH_RUNS {
                let t = Instant::now();
                let (_, rep) = exe.run_profiled(ins.clone()).expect("runs");
                total = total.min(t.elapsed().as_secs_f64());
                if r == 0 {
                    best = rep
                        .kernels
                        .into_iter()
                        .map(|k| (k.label, k.kind, k.op, k.nanos))
                        .collect();
                } else {
                    // Kinds from the latest run: later runs borrow memoised shape
                    // arithmetic (kind `memo`).
                    for (b, k) in best.iter_mut().zip(rep.kernels) {
                        b.1 = k.kind;
                        b.3 = b.3.min(k.nanos);
                    }
                }
            }
            let name = m.file_name().unwrap().to_string_lossy().to_string();
            println!(
                "bench {name}: {:.2} ms/run (min of {BENCH_RUNS}), {} kernels",
                total * 1e3,
                best.len()
            );
            let mut by: HashMap<(String, &str), (u64, usize)> = HashMap::new();
            for (_, kind, op, ns) in &best {
                let e = by.entry((op.clone(), *kind)).or_default();
                e.0 += ns;
                e.1 += 1;
            }
            let mut by: Vec<_> = by.into_iter().collect();
            by.sort_by_key(|e| std::cmp::Reverse(e.1 .0));
            for ((op, kind), (ns, c)) in by {
                println!("  {kind:12} {op:16} x{c:3} {:9.3} ms", ns as f64 / 1e6);
            }
            best.sort_by_key(|e| std::cmp::Reverse(e.3));
            for (label, kind, op, ns) in best.iter().take(TOP) {
                println!("    {:9.3} ms {kind:12} {op:14} {label}", *ns as f64 / 1e6);
            }
        }
    }
}
