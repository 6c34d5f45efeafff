//! Every tiny shared model, optimised by the default pipeline and run through the JIT
//! executable, matches its test_data_set_0 reference and the interpreter.

use kiln_runtime::{compare, Model, TestData, MODEL_TOLERANCE};
use std::path::PathBuf;

fn models_dir() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/models/tiny"
    ))
}

#[test]
fn tiny_models_match_reference_data_and_the_interpreter() {
    let dir = models_dir();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        eprintln!("no models at {}: skipped", dir.display());
        return;
    };
    let mut names: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    names.sort();
    assert!(!names.is_empty());
    for m in names {
        let model = Model::load(m.join("model.onnx")).expect("loads");
        let mut g = model.graph().clone();
        kiln_passes::pipeline::default_pipeline()
            .run(&mut g)
            .expect("pipeline");
        let exe = kiln_cranelift::compile(&g).expect("compiles");
        assert!(
            exe.jit_kernel_count() > 0,
            "{}: no JIT kernels",
            m.display()
        );
        let data = TestData::load(&m.join("test_data_set_0")).expect("test data");
        let ins: Vec<(&str, kiln_ir::Tensor)> = data
            .inputs
            .iter()
            .map(|(n, t)| (n.as_str(), t.clone()))
            .collect();
        let got = exe.run_named(&ins).expect("jit run");
        // The second run borrows memoised shape arithmetic; it must change nothing.
        let again = exe.run_named(&ins).expect("second jit run");
        assert_eq!(again, got, "{}: second run differs", m.display());
        let interp = kiln_ir::run_named(&g, &ins).expect("interpreter run");
        assert_eq!(got.len(), data.outputs.len());
        for (i, (_, want)) in data.outputs.iter().enumerate() {
            let r = compare(&got[i], want, MODEL_TOLERANCE);
            assert!(r.ok, "{} output {i} vs reference: {r:?}", m.display());
            let r = compare(&got[i], &interp[i], MODEL_TOLERANCE);
            assert!(r.ok, "{} output {i} vs interpreter: {r:?}", m.display());
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
    use kiln_runtime::kernel::Kernel;
    for m in ["bert_tiny", "llama_tiny"] {
        let model = Model::load(models_dir().join(m).join("model.onnx")).unwrap();
        let mut g = model.graph().clone();
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
