//! Every shared model (tiny and bench), optimised by the default pipeline and run through
//! the JIT executable, matches its test_data_set_0 reference (and, for the tiny ones, the
//! interpreter); one executable shared by 8 threads gives bit-identical outputs.

use kiln_reference::{compare, TestData, MODEL_TOLERANCE};
use std::path::PathBuf;

fn models_dir() -> PathBuf {
    set_dir("tiny")
}

fn set_dir(set: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/models"
    ))
    .join(set)
}

#[test]
fn tiny_models_match_reference_data_and_the_interpreter() {
    check_set("tiny", true);
}

/// The bench models, against their reference data only (the interpreter takes minutes on
/// them in debug builds). Run in release: `cargo test --release -p kiln-cranelift --test
/// models`.
#[test]
fn bench_models_match_reference_data() {
    check_set("bench", false);
}

#[test]
fn one_executable_on_8_threads_gives_identical_bits() {
    let dir = set_dir("tiny").join("bert_tiny");
    let Ok(mut g) = kiln_frontend::load(dir.join("model.onnx")) else {
        eprintln!("no model at {}: skipped", dir.display());
        return;
    };
    kiln_passes::pipeline::default_pipeline()
        .run(&mut g)
        .expect("pipeline");
    let exe = kiln_cranelift::compile_with(&g, &kiln_cranelift::JitOptions { threads: 2 })
        .expect("compiles");
    let data = TestData::load(&dir.join("test_data_set_0")).expect("test data");
    let ins: Vec<(&str, kiln_ir::Tensor)> = data
        .inputs
        .iter()
        .map(|(n, t)| (n.as_str(), t.clone()))
        .collect();
    let bits = |outs: Vec<kiln_ir::Tensor>| -> Vec<Vec<u32>> {
        outs.iter()
            .map(|t| {
                t.as_slice::<f32>()
                    .expect("f32 output")
                    .iter()
                    .map(|x| x.to_bits())
                    .collect()
            })
            .collect()
    };
    let want = bits(exe.run_named(&ins).expect("run"));
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                for _ in 0..50 {
                    assert_eq!(bits(exe.run_named(&ins).expect("run")), want);
                }
            });
        }
    });
}

fn check_set(set: &str, with_interpreter: bool) {
    let dir = set_dir(set);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        eprintln!("no models at {}: skipped", dir.display());
        return;
    };
    let mut names: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    names.sort();
    assert!(!names.is_empty());
    for m in names {
        let mut g = kiln_frontend::load(m.join("model.onnx")).expect("loads");
        kiln_passes::pipeline::default_pipeline()
            .run(&mut g)
            .expect("pipeline");
        let exe = kiln_cranelift::compile(&g).expect("compiles");
        assert!(
            exe.jit_kernel_count() > 0,
            "{}: no JIT kernels",
            m.display()
        );
        // Every contraction of the transformer models has a CPU routine (none left to the
        // interpreter). mamba_tiny's causal depthwise conv has none yet: the conv work of
        // issue 14.
        let plan = exe.cpu_plan();
        let all_routines = !m.ends_with("mamba_tiny");
        for (i, k) in plan.plan.kernels.iter().enumerate() {
            if let (true, kiln_plan::Kernel::Contraction(n)) = (all_routines, k) {
                assert!(
                    plan.contractions[i].is_some(),
                    "{}: {} has no CPU routine",
                    m.display(),
                    g.nodes[*n].op.name()
                );
            }
        }
        let data = TestData::load(&m.join("test_data_set_0")).expect("test data");
        let ins: Vec<(&str, kiln_ir::Tensor)> = data
            .inputs
            .iter()
            .map(|(n, t)| (n.as_str(), t.clone()))
            .collect();
        let got = exe.run_named(&ins).expect("jit run");
        // The second run borrows memoised shape arithmetic and puts its intermediate values
        // in the arena the first run laid out; the third reuses the block. Neither may
        // change a bit.
        let again = exe.run_named(&ins).expect("second jit run");
        assert_eq!(again, got, "{}: second run differs", m.display());
        let ordered = kiln_ir::interp::order_inputs(&g, &ins).expect("inputs in order");
        let (third, rep) = exe.run_profiled(ordered).expect("third jit run");
        assert_eq!(third, got, "{}: third run differs", m.display());
        // Most intermediate values (the outputs go to the caller) are in the arena: 80%,
        // except in the recurrences unrolled over time, whose many small fallback ops
        // (scatter_nd, slices) allocate (measured: rwkv_tiny 62%; rolling them into loops
        // is issue 18).
        let out_bytes: usize = third.iter().map(|t| t.len() * t.dtype().size()).sum();
        let inter = rep.produced_bytes - out_bytes;
        let tenths = if m.ends_with("rwkv_tiny") || m.ends_with("mamba_tiny") {
            5
        } else {
            8
        };
        assert!(
            rep.arena_bytes > 0 && rep.in_arena_bytes * 10 >= inter * tenths,
            "{}: {} of {inter} intermediate bytes in an arena of {}",
            m.display(),
            rep.in_arena_bytes,
            rep.arena_bytes
        );
        eprintln!(
            "{}: {} of {inter} intermediate bytes in the arena ({} bytes; live peak {})",
            m.display(),
            rep.in_arena_bytes,
            rep.arena_bytes,
            rep.memory.live_peak_bytes
        );
        assert_eq!(got.len(), data.outputs.len());
        for (i, (_, want)) in data.outputs.iter().enumerate() {
            let r = compare(&got[i], want, MODEL_TOLERANCE);
            assert!(r.ok, "{} output {i} vs reference: {r:?}", m.display());
        }
        if with_interpreter {
            let interp = kiln_ir::run_named(&g, &ins).expect("interpreter run");
            for (i, g) in got.iter().enumerate() {
                let r = compare(g, &interp[i], MODEL_TOLERANCE);
                assert!(r.ok, "{} output {i} vs interpreter: {r:?}", m.display());
            }
        }
        eprintln!(
            "{}: {} kernels, {} JIT",
            m.display(),
            exe.plan().kernels.len(),
            exe.jit_kernel_count()
        );
    }
}

#[test]
#[ignore = "diagnostic: prints which ops fall back, and their types"]
fn print_fallback_ops() {
    use kiln_plan::Kernel;
    for m in ["bert_tiny", "llama_tiny"] {
        let mut g = kiln_frontend::load(models_dir().join(m).join("model.onnx")).unwrap();
        kiln_passes::pipeline::default_pipeline()
            .run(&mut g)
            .unwrap();
        let exe = kiln_cranelift::compile(&g).unwrap();
        for k in &exe.plan().kernels {
            if let Kernel::Fallback(n) = k {
                let node = &g.nodes[*n];
                let tys: Vec<String> = node.outputs.iter().map(|&o| g.ty(o).to_string()).collect();
                eprintln!("{m}: {} -> {}", node.op.name(), tys.join(", "));
            }
        }
    }
}
