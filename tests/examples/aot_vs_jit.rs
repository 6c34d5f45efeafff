//! Measures AOT (LLVM) libraries against the Cranelift JIT on models' test data: library
//! build time, end-to-end latency (min of N) and the loop kernels' share (min over runs
//! of the summed per-kernel loop times). Usage:
//! `cargo run --release -p kiln-tests --example aot_vs_jit -- MODEL_DIR... [--runs N]`

use kiln_llvm::{build_library, AotLibrary, BuildOptions};
use kiln_reference::TestData;
use std::path::PathBuf;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut runs = 10;
    let mut dirs = vec![];
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--runs" {
            runs = args.next().ok_or("--runs N")?.parse()?;
        } else {
            dirs.push(PathBuf::from(a));
        }
    }
    println!(
        "{:<18} {:>8} {:>10} {:>10} {:>10} {:>11} {:>11} {:>11}",
        "model", "build_s", "jit_ms", "aot1_ms", "aot2_ms", "jit_loop_ms", "aot1_loop", "aot2_loop"
    );
    for dir in dirs {
        let name = dir
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        let mut g = kiln_frontend::load(dir.join("model.onnx"))?;
        kiln_passes::default_pipeline().run(&mut g)?;
        let data = TestData::load(&dir.join("test_data_set_0"))?;
        let inputs: Vec<_> = data.inputs.iter().map(|(_, t)| t.clone()).collect();
        let tmp = tempfile::tempdir()?;
        let lib = tmp.path().join("libmodel.so");
        let t = Instant::now();
        build_library(&g, &lib, &BuildOptions::default())?;
        let build_s = t.elapsed().as_secs_f64();
        let mut aot = AotLibrary::load(&lib, None)?;
        let jit = kiln_cranelift::compile(&g)?;
        let loop_ms = |ks: &mut dyn Iterator<Item = (bool, u64)>| {
            ks.filter(|k| k.0).map(|k| k.1).sum::<u64>() as f64 / 1e6
        };
        let (mut jit_ms, mut jit_loop) = (f64::MAX, f64::MAX);
        for _ in 0..runs {
            let t = Instant::now();
            let (_, rep) = jit.run_profiled(inputs.clone())?;
            jit_ms = jit_ms.min(t.elapsed().as_secs_f64() * 1e3);
            jit_loop = jit_loop.min(loop_ms(
                &mut rep.kernels.iter().map(|k| (k.kind == "loop", k.nanos)),
            ));
        }
        let mut res = vec![];
        for threads in [1, 2] {
            aot.set_threads(threads)?;
            let (mut ms, mut lp) = (f64::MAX, f64::MAX);
            for _ in 0..runs {
                let t = Instant::now();
                let (_, times) = aot.run_profiled(&inputs)?;
                ms = ms.min(t.elapsed().as_secs_f64() * 1e3);
                lp = lp.min(loop_ms(
                    &mut times.iter().map(|k| (k.kind == "loop", k.nanos)),
                ));
            }
            res.push((ms, lp));
        }
        if std::env::var_os("AOT_VS_JIT_KINDS").is_some() {
            let (_, rep) = jit.run_profiled(inputs.clone())?;
            let (_, times) = aot.run_profiled(&inputs)?;
            for kind in ["loop", "contraction", "fallback"] {
                let j: u64 = rep
                    .kernels
                    .iter()
                    .filter(|k| k.kind == kind)
                    .map(|k| k.nanos)
                    .sum();
                let a: u64 = times
                    .iter()
                    .filter(|k| k.kind == kind)
                    .map(|k| k.nanos)
                    .sum();
                println!(
                    "  {kind:<12} jit {:>9.3} ms  aot {:>9.3} ms",
                    j as f64 / 1e6,
                    a as f64 / 1e6
                );
            }
        }
        println!(
            "{name:<18} {build_s:>8.2} {jit_ms:>10.2} {:>10.2} {:>10.2} {jit_loop:>11.3} {:>11.3} {:>11.3}",
            res[0].0, res[1].0, res[0].1, res[1].1
        );
    }
    Ok(())
}
