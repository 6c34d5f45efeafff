//! kiln issue 14's own test models (`tests/models/`, made by
//! `scripts/make_recurrent_models.py`): a bidirectional LSTM and a bidirectional GRU with
//! initial states (PyTorch references), and a model whose inputs declare dims as -1 and 0,
//! through the host API on the JIT, the AOT library and the interpreter. The recurrent nodes
//! run on the CPU runtime's native routine in the compiled backends, not on the interpreter.

use kiln::{Backend, Executable, Model, Options, Tensor};
use kiln_ir::OpKind;
use kiln_tests::{as_named, assert_outputs_match, repo_root, test_data};
use std::path::PathBuf;

fn dir(name: &str) -> PathBuf {
    repo_root().join("tests/models").join(name)
}

fn compile(model: &Model, backend: Backend) -> Executable {
    model
        .compile(&Options {
            backend,
            threads: 2,
            ..Options::default()
        })
        .unwrap_or_else(|e| panic!("{backend}: {e}"))
}

/// Runs `name` on its test data with `backend` and checks every output against PyTorch's.
fn matches_reference(name: &str, backend: Backend) -> Executable {
    let model = Model::load(dir(name).join("model.onnx")).unwrap_or_else(|e| panic!("{name}: {e}"));
    let exe = compile(&model, backend);
    let (inputs, want) = test_data(exe.graph(), &dir(name));
    let got = exe
        .run(&as_named(&inputs))
        .unwrap_or_else(|e| panic!("{name} on {backend}: {e}"));
    assert_outputs_match(&format!("{name} on {backend}"), &got, &want);
    exe
}

/// The compiled plan runs the recurrent op on its native routine (not on the interpreter's
/// f64 path).
fn runs_natively(exe: &Executable, name: &str, op: OpKind) {
    let (inputs, _) = test_data(exe.graph(), &dir(name));
    let (_, report) = exe.run_profiled(&as_named(&inputs)).expect("profiles");
    let k = report
        .kernels
        .iter()
        // The JIT's report names the op; the AOT library's reports only labels, so
        // the exporter's node name (`/rnn/LSTM`) finds it there.
        .find(|k| k.op == op.name() || k.label.ends_with(op.onnx_name()))
        .unwrap_or_else(|| panic!("{name}: no `{}` kernel in {:?}", op.name(), report.kernels));
    assert_eq!(k.kind, "native", "{name}: {k:?}");
    assert!(kiln_runtime::executor::routines::has_fast_path(op));
}

/// The plan lays out the recurrent node's constant `W` and `R` once (a prepared routine
/// in its kernel's slot), instead of on every run.
fn weights_prepared_once(name: &str, op: OpKind) {
    let model = Model::load(dir(name).join("model.onnx")).unwrap();
    let plan = kiln_runtime::executor::CpuPlan::partition(model.graph()).unwrap();
    let i = plan
        .plan
        .kernels
        .iter()
        .position(
            |k| matches!(k, kiln_plan::Kernel::Fallback(n) if plan.plan.graph.nodes[*n].op == op),
        )
        .unwrap_or_else(|| panic!("{name}: no `{}` kernel", op.name()));
    assert!(
        plan.contractions[i].is_some(),
        "{name}: `{}` has no prepared weights",
        op.name()
    );
}

/// The JIT against the interpreter on other sequence lengths and batch sizes than the test
/// data's (the models' seq and batch dims are symbolic).
fn jit_matches_interp_on_other_sizes(name: &str) {
    let model = Model::load(dir(name).join("model.onnx")).unwrap();
    let jit = compile(&model, Backend::Jit);
    let interp = compile(&model, Backend::Interp);
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for (seq, batch) in [(1, 1), (7, 2), (3, 4)] {
        let inputs: Vec<(String, Tensor)> = jit
            .inputs()
            .iter()
            .map(|io| {
                let shape: Vec<usize> = io
                    .ty
                    .shape
                    .dims()
                    .unwrap()
                    .iter()
                    .map(|d| match (d.fixed(), d.to_string().as_str()) {
                        (Some(n), _) => n as usize,
                        (None, "seq") => seq,
                        _ => batch,
                    })
                    .collect();
                let n = shape.iter().product();
                let v: Vec<f32> = (0..n)
                    .map(|_| {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
                    })
                    .collect();
                (io.name.clone(), Tensor::from_vec(shape, v))
            })
            .collect();
        let named = as_named(&inputs);
        let want = interp.run(&named).expect("interp runs");
        let got = jit.run(&named).expect("jit runs");
        assert_outputs_match(
            &format!("{name} jit vs interp, S={seq} B={batch}"),
            &got,
            &want,
        );
    }
}

#[test]
fn lstm_bidir_matches_pytorch_on_jit_and_interpreter() {
    let jit = matches_reference("lstm_bidir", Backend::Jit);
    runs_natively(&jit, "lstm_bidir", OpKind::Lstm);
    weights_prepared_once("lstm_bidir", OpKind::Lstm);
    matches_reference("lstm_bidir", Backend::Interp);
    jit_matches_interp_on_other_sizes("lstm_bidir");
}

#[test]
fn gru_bidir_matches_pytorch_on_jit_and_interpreter() {
    let jit = matches_reference("gru_bidir", Backend::Jit);
    runs_natively(&jit, "gru_bidir", OpKind::Gru);
    weights_prepared_once("gru_bidir", OpKind::Gru);
    matches_reference("gru_bidir", Backend::Interp);
    jit_matches_interp_on_other_sizes("gru_bidir");
}

#[test]
fn lstm_bidir_matches_pytorch_through_the_aot_library() {
    let aot = matches_reference("lstm_bidir", Backend::Aot);
    runs_natively(&aot, "lstm_bidir", OpKind::Lstm);
}

#[test]
fn inputs_declaring_minus_one_and_zero_dims_take_any_size() {
    let model = Model::load(dir("unknown_dims").join("model.onnx")).unwrap();
    let shape = model.graph().ty(model.graph().inputs[0]).shape.to_string();
    assert!(
        shape.contains("unk_x_0") && shape.contains("unk_x_1"),
        "{shape}"
    );
    matches_reference("unknown_dims", Backend::Jit);
    matches_reference("unknown_dims", Backend::Interp);
}

#[test]
fn recurrent_models_round_trip_through_the_text_form() {
    for name in ["lstm_bidir", "gru_bidir", "unknown_dims"] {
        let model = Model::load(dir(name).join("model.onnx")).unwrap();
        let text = kiln_ir::text::print(model.graph());
        let reparsed = kiln_ir::text::parse(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(reparsed == *model.graph(), "{name}: parse(print(g)) != g");
        let exe = compile(&Model::from_graph(reparsed), Backend::Interp);
        let (inputs, want) = test_data(exe.graph(), &dir(name));
        let got = exe.run(&as_named(&inputs)).unwrap();
        assert_outputs_match(&format!("{name} reparsed"), &got, &want);
    }
    // Omitted optional operands in the middle (no B, no sequence_lens), string and list
    // attributes, and a node naming only Y_h.
    let src = r#"
func @f(%x: f32[s, b, 3], %w: f32[2, 8, 3], %r: f32[2, 8, 2], %h: f32[2, b, 2]) -> (f32[2, b, 2]) {
  %y, %yh = lstm %x, %w, %r, _, _, %h {activations = ["Sigmoid", "Tanh", "Tanh"], clip = 3.0, direction = "bidirectional"}
  return %yh
}
"#;
    let g = kiln_ir::text::parse(src).unwrap();
    assert_eq!(kiln_ir::text::parse(&kiln_ir::text::print(&g)).unwrap(), g);
    let lstm = g.nodes.iter().find(|n| n.op == OpKind::Lstm).unwrap();
    assert_eq!(lstm.inputs.len(), 6);
    assert!(lstm.inputs[3].is_none() && lstm.inputs[4].is_none());
}
