//! The host API (`kiln::Model` → `Executable`) on the shared models: the JIT matches each
//! model's PyTorch reference and the interpreter; one executable shared by many threads gives
//! bit-identical outputs; NaN and ±Inf propagate as in the interpreter; bad inputs are errors
//! that name the input and what it expects.

use kiln::{Backend, Executable, Model, Options, Tensor};
use kiln_tests::{as_named, assert_outputs_match, model_dir, test_data};

fn compile(name: &str, backend: Backend) -> Executable {
    let model =
        Model::load(model_dir(name).join("model.onnx")).unwrap_or_else(|e| panic!("{name}: {e}"));
    model
        .compile(&Options {
            backend,
            ..Options::default()
        })
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The JIT, through the host API, matches the model's reference outputs and the interpreter
/// running the same optimised graph.
fn check_model(name: &str) {
    let jit = compile(name, Backend::Jit);
    let interp = compile(name, Backend::Interp);
    let (inputs, want) = test_data(jit.graph(), &model_dir(name));
    let named = as_named(&inputs);
    let got = jit.run(&named).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_outputs_match(&format!("{name} jit vs reference"), &got, &want);
    let reference = interp.run(&named).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_outputs_match(&format!("{name} jit vs interpreter"), &got, &reference);
}

macro_rules! host_model_tests {
    ($($test:ident: $path:literal;)*) => {$(
        #[test]
        fn $test() {
            check_model($path);
        }
    )*};
}

host_model_tests! {
    jit_bert_tiny_matches_reference_and_interpreter: "tiny/bert_tiny";
    jit_gpt2_tiny_matches_reference_and_interpreter: "tiny/gpt2_tiny";
    jit_gpt2_tiny_kv_matches_reference_and_interpreter: "tiny/gpt2_tiny_kv";
    jit_llama_tiny_matches_reference_and_interpreter: "tiny/llama_tiny";
    jit_llama_tiny_kv_matches_reference_and_interpreter: "tiny/llama_tiny_kv";
    jit_opt_tiny_matches_reference_and_interpreter: "tiny/opt_tiny";
    jit_vit_tiny_matches_reference_and_interpreter: "tiny/vit_tiny";
}

// The five bench models together took 18 s in a debug build on 2 shared cores (mostly the
// interpreter), 8 s in release: CI's debug `cargo test --workspace` can afford them.
host_model_tests! {
    jit_bert_base_1l_matches_reference_and_interpreter: "bench/bert_base_1l";
    jit_opt_1l_matches_reference_and_interpreter: "bench/opt_1l";
    jit_llama_2l_512_matches_reference_and_interpreter: "bench/llama_2l_512";
    jit_llama_2l_512_kv_matches_reference_and_interpreter: "bench/llama_2l_512_kv";
    jit_vit_s16_6l_matches_reference_and_interpreter: "bench/vit_s16_6l";
}

/// Every element's bits, so NaN payloads and signed zeros count too.
fn bits(t: &Tensor) -> (kiln::DType, Vec<usize>, Vec<u64>) {
    let b = match t.as_slice::<f32>() {
        Some(s) => s.iter().map(|x| x.to_bits() as u64).collect(),
        None => t.to_f64s().iter().map(|x| x.to_bits()).collect(),
    };
    (t.dtype(), t.shape().to_vec(), b)
}

#[test]
fn one_executable_shared_by_8_threads_gives_bit_identical_outputs() {
    const THREADS: usize = 8;
    const RUNS: usize = 50;
    let name = "tiny/gpt2_tiny";
    // Two kernel threads as well, so the kernels' own splitting runs concurrently too.
    let model = Model::load(model_dir(name).join("model.onnx")).unwrap();
    let exe = model
        .compile(&Options {
            threads: 2,
            ..Options::default()
        })
        .unwrap();
    let (inputs, _) = test_data(exe.graph(), &model_dir(name));
    let named = as_named(&inputs);
    let first: Vec<_> = exe.run(&named).unwrap().iter().map(bits).collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let (exe, named, first) = (&exe, &named, &first);
                s.spawn(move || {
                    for r in 0..RUNS {
                        let outs: Vec<_> = exe.run(named).unwrap().iter().map(bits).collect();
                        assert!(
                            outs == *first,
                            "thread {t} run {r} differs from the first run"
                        );
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("a runner thread panicked");
        }
    });
}

/// A small graph over every kernel kind the JIT has (contraction, fused elementwise,
/// row reductions, softmax, norm) with NaN and ±Inf in its input.
const SPECIALS_GRAPH: &str = r#"
func @specials(%x: f32[4, 8], %w: f32[8, 8], %g: f32[8], %b: f32[8]) -> (f32[4, 8], f32[4, 8], f32[4, 8], f32[4, 1], f32[4, 1], f32[4, 8]) {
  %m = matmul %x, %w
  %e = exp %x
  %t = tanh %m
  %s = softmax %x {axis = -1}
  %ax = constant {value = dense<i64[1]> 0xffffffffffffffff}
  %mx = reduce_max %x, %ax {keepdims = 1}
  %sm = reduce_sum %e, %ax {keepdims = 1}
  %ln = layer_norm %x, %g, %b {axis = -1, epsilon = 0.00001}
  %r = relu %ln
  %a = add %r, %t
  return %m, %a, %s, %mx, %sm, %ln
}
"#;

#[test]
fn nan_and_inf_inputs_propagate_through_the_jit_as_in_the_interpreter() {
    let g = kiln_ir::text::parse(SPECIALS_GRAPH).expect("the test graph parses");
    kiln_ir::verify(&g).expect("the test graph verifies");
    let model = Model::from_graph(g);
    let compile = |backend| {
        model
            .compile(&Options {
                backend,
                opt_level: 0,
                ..Options::default()
            })
            .unwrap()
    };
    let (jit, interp) = (compile(Backend::Jit), compile(Backend::Interp));
    let (native, all) = jit.kernel_counts().expect("the JIT has a plan");
    assert!(native >= 3, "only {native} of {all} kernels are JIT code");
    // Row 0 has a NaN, row 1 +Inf, row 2 -Inf, row 3 is finite.
    let mut x: Vec<f32> = (0..32).map(|i| (i as f32 - 16.0) / 8.0).collect();
    x[3] = f32::NAN;
    x[8 + 5] = f32::INFINITY;
    x[16 + 1] = f32::NEG_INFINITY;
    let w: Vec<f32> = (0..64)
        .map(|i| ((i * 7) % 11) as f32 / 10.0 - 0.5)
        .collect();
    let inputs = [
        ("x", Tensor::from_vec(vec![4, 8], x)),
        ("w", Tensor::from_vec(vec![8, 8], w)),
        ("g", Tensor::from_vec(vec![8], vec![1.5f32; 8])),
        ("b", Tensor::from_vec(vec![8], vec![0.25f32; 8])),
    ];
    let got = jit.run(&inputs).unwrap();
    let want = interp.run(&inputs).unwrap();
    let mut specials = 0;
    for (k, (gt, wt)) in got.iter().zip(&want).enumerate() {
        let (gs, ws) = (gt.as_slice::<f32>().unwrap(), wt.as_slice::<f32>().unwrap());
        assert_eq!(gt.shape(), wt.shape(), "output #{k}");
        for (i, (&a, &b)) in gs.iter().zip(ws).enumerate() {
            let same_class = (a.is_nan() && b.is_nan())
                || (a.is_infinite() && a == b)
                || (a.is_finite() && b.is_finite() && (a - b).abs() <= 1e-4 * (1.0 + b.abs()));
            assert!(same_class, "output #{k} [{i}]: jit {a} vs interpreter {b}");
            specials += usize::from(!b.is_finite());
        }
    }
    // The inputs really did reach the outputs as NaN/Inf (the test can fail).
    assert!(specials > 10, "only {specials} non-finite outputs");
}

fn bert(backend: Backend) -> Executable {
    compile("tiny/bert_tiny", backend)
}

#[test]
fn bad_inputs_are_errors_naming_the_input_and_its_type() {
    for backend in [Backend::Jit, Backend::Interp] {
        let exe = bert(backend);
        let ids = || Tensor::from_vec(vec![1, 16], vec![1i64; 16]);
        let err = |inputs: &[(&str, Tensor)]| exe.run(inputs).unwrap_err().to_string();

        let e = err(&[
            ("input_ids", Tensor::from_vec(vec![1, 16], vec![1.0f32; 16])),
            ("attention_mask", ids()),
            ("token_type_ids", ids()),
        ]);
        assert!(
            e.contains("input `input_ids`") && e.contains("i64[") && e.contains("dtype is f32"),
            "{backend}: {e}"
        );

        let e = err(&[
            ("input_ids", ids()),
            ("attention_mask", Tensor::from_vec(vec![16], vec![1i64; 16])),
            ("token_type_ids", ids()),
        ]);
        assert!(
            e.contains("input `attention_mask`") && e.contains("rank is 1"),
            "{backend}: {e}"
        );

        let e = err(&[
            ("input_ids", ids()),
            ("attention_mask", ids()),
            (
                "token_type_ids",
                Tensor::from_vec(vec![2, 16], vec![1i64; 32]),
            ),
        ]);
        assert!(
            e.contains("input `token_type_ids`") && e.contains("input `input_ids` set"),
            "{backend}: {e}"
        );

        let e = err(&[("input_ids", ids()), ("attention_mask", ids())]);
        assert!(
            e.contains("missing input `token_type_ids`") && e.contains("i64["),
            "{backend}: {e}"
        );

        let e = err(&[
            ("input_ids", ids()),
            ("attention_mask", ids()),
            ("token_type_ids", ids()),
            ("position_ids", ids()),
        ]);
        assert!(
            e.contains("unknown input `position_ids`") && e.contains("`input_ids` (i64["),
            "{backend}: {e}"
        );

        let e = err(&[
            ("input_ids", ids()),
            ("input_ids", ids()),
            ("attention_mask", ids()),
        ]);
        assert!(e.contains("`input_ids` is given twice"), "{backend}: {e}");
    }
}

#[test]
fn executable_reports_its_inputs_outputs_and_compile_time() {
    let exe = bert(Backend::Jit);
    let names: Vec<&str> = exe.inputs().iter().map(|io| io.name.as_str()).collect();
    assert_eq!(names, ["input_ids", "attention_mask", "token_type_ids"]);
    assert_eq!(exe.inputs()[0].ty.dtype, kiln::DType::I64);
    assert_eq!(exe.outputs().len(), 1);
    assert!(exe.compile_time() >= exe.optimise_time());
    assert!(exe.compile_time().as_nanos() > 0);
    let (jit, all) = exe.kernel_counts().expect("the JIT has a plan");
    assert!(jit > 0 && jit <= all, "{jit} of {all}");
    let (inputs, want) = test_data(exe.graph(), &model_dir("tiny/bert_tiny"));
    let (outs, report) = exe.run_profiled(&as_named(&inputs)).unwrap();
    assert_outputs_match("bert_tiny profiled", &outs, &want);
    assert_eq!(report.kernels.len(), all, "one time per kernel");
}

#[test]
fn unknown_pass_toggle_is_an_error() {
    let model = Model::load(model_dir("tiny/bert_tiny").join("model.onnx")).unwrap();
    let e = model
        .compile(&Options {
            passes: "-no_such_pass".into(),
            ..Options::default()
        })
        .unwrap_err()
        .to_string();
    assert!(e.contains("no_such_pass"), "{e}");
}
