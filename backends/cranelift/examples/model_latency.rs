//! JIT latency of the shared models: each model optimised by the default pipeline, compiled
//! with `compile_with(threads)`, run on its test_data_set_0 inputs; prints the minimum of N
//! runs per thread count, and with `--ops` the contraction kernels of each plan. Run with
//! `cargo run --release -p kiln-cranelift --example model_latency -- [--runs N]
//! [--threads 1,2] [--ops] [--profile] [MODEL_DIR...]` (default: every tiny and bench model).

use kiln_cranelift::{compile_with, JitOptions};
use kiln_runtime::kernel::Kernel;
use kiln_runtime::{Model, TestData};
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn main() -> anyhow::Result<()> {
    let mut runs = 10usize;
    let mut threads = vec![1usize, 2];
    let mut show_ops = false;
    let mut profile = false;
    let mut dirs: Vec<PathBuf> = vec![];
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--runs" => runs = args.next().unwrap_or_default().parse()?,
            "--threads" => {
                threads = args
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()?
            }
            "--ops" => show_ops = true,
            "--profile" => profile = true,
            _ => dirs.push(a.into()),
        }
    }
    if dirs.is_empty() {
        let root = PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../../shared/models"
        ));
        for set in ["tiny", "bench"] {
            let mut v: Vec<_> = std::fs::read_dir(root.join(set))?
                .flatten()
                .map(|e| e.path())
                .collect();
            v.sort();
            dirs.extend(v);
        }
    }
    for dir in dirs {
        let model = Model::load(dir.join("model.onnx"))?;
        let mut g = model.graph().clone();
        kiln_passes::pipeline::default_pipeline().run(&mut g)?;
        let data = TestData::load(&dir.join("test_data_set_0"))?;
        let ins: Vec<(&str, kiln_ir::Tensor)> = data
            .inputs
            .iter()
            .map(|(n, t)| (n.as_str(), t.clone()))
            .collect();
        let name = dir.file_name().unwrap_or_default().to_string_lossy();
        let mut line = format!("{name:<20}");
        for &t in &threads {
            let exe = compile_with(&g, &JitOptions { threads: t })?;
            if show_ops && t == threads[0] {
                for k in &exe.plan().kernels {
                    if let Kernel::Contraction(n) = k {
                        let node = &g.nodes[*n];
                        let tys: Vec<String> = node
                            .inputs
                            .iter()
                            .map(|i| i.map_or("-".into(), |v| g.ty(v).to_string()))
                            .collect();
                        eprintln!(
                            "  {name}: {} {:?} ({})",
                            node.op.name(),
                            node.attrs,
                            tys.join(", ")
                        );
                    }
                }
            }
            exe.run_named(&ins)?;
            let mut best = Duration::MAX;
            for _ in 0..runs {
                let t0 = Instant::now();
                exe.run_named(&ins)?;
                best = best.min(t0.elapsed());
            }
            if profile {
                let inputs = kiln_ir::interp::order_inputs(&g, &ins)?;
                let (_, rep) = exe.run_profiled(inputs)?;
                let mut by: std::collections::BTreeMap<String, (u64, usize)> = Default::default();
                for k in &rep.kernels {
                    let e = by.entry(format!("{} {}", k.kind, k.op)).or_default();
                    e.0 += k.nanos;
                    e.1 += 1;
                }
                for (k, (ns, c)) in by {
                    eprintln!(
                        "  {name} {t} thr: {k:<28} x{c:<4} {:>9.3} ms",
                        ns as f64 / 1e6
                    );
                }
            }
            line += &format!("  {t} thr: {:>9.3} ms", best.as_secs_f64() * 1e3);
        }
        println!("{line}");
    }
    Ok(())
}
