//! The backends side by side through the host API (`kiln::Model` → `Backend::{Jit, Aot,
//! Interp}`): the AOT library and the JIT run the same serialised plan, so they agree with
//! each other on random inputs, and both with the model's reference data; the AOT library's
//! profile carries the plan's kernel labels, and it partitions nothing when it loads (its
//! kernel count is the plan the JIT compiled). Comparing backends lives here, not in a
//! backend's own tests, so no backend depends on another.

use kiln::{Backend, Executable, Model, Options, Tensor};
use kiln_tests::{as_named, assert_outputs_match, model_dir, test_data};

fn compile(model: &Model, backend: Backend) -> Executable {
    model
        .compile(&Options {
            backend,
            threads: 2,
            ..Options::default()
        })
        .unwrap_or_else(|e| panic!("{backend}: {e}"))
}

/// Seeded inputs in [-1, 1) (f32) or {0, 1} (i64: ids, token types and masks are valid for
/// every tiny model), symbolic dims bound to `dim`.
fn random_inputs(exe: &Executable, seed: u64, dim: usize) -> Vec<(String, Tensor)> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    exe.inputs()
        .iter()
        .map(|io| {
            let shape: Vec<usize> = io
                .ty
                .shape
                .dims()
                .expect("ranked inputs")
                .iter()
                .map(|d| d.fixed().map_or(dim, |n| n as usize))
                .collect();
            let n = shape.iter().product();
            let t = match io.ty.dtype {
                kiln::DType::F32 => Tensor::from_vec(
                    shape,
                    (0..n)
                        .map(|_| (next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
                        .collect::<Vec<f32>>(),
                ),
                kiln::DType::I64 => Tensor::from_vec(
                    shape,
                    (0..n).map(|_| (next() >> 63) as i64).collect::<Vec<i64>>(),
                ),
                d => panic!("no random generator for {d}"),
            };
            (io.name.clone(), t)
        })
        .collect()
}

fn aot_and_jit_agree(name: &str) {
    let model =
        Model::load(model_dir(name).join("model.onnx")).unwrap_or_else(|e| panic!("{name}: {e}"));
    let jit = compile(&model, Backend::Jit);
    let aot = compile(&model, Backend::Aot);
    assert_eq!(aot.backend(), Backend::Aot);
    assert_eq!(
        aot.kernel_counts(),
        jit.kernel_counts(),
        "{name}: the library runs the plan the JIT compiled"
    );
    let (inputs, want) = test_data(aot.graph(), &model_dir(name));
    let got = aot.run(&as_named(&inputs)).expect("aot runs");
    assert_outputs_match(&format!("{name} aot vs reference"), &got, &want);
    for seed in 0..2 {
        let inputs = random_inputs(&jit, seed, 3);
        let named = as_named(&inputs);
        let want = jit.run(&named).expect("jit runs");
        let got = aot.run(&named).expect("aot runs");
        assert_outputs_match(&format!("{name} aot vs jit, seed {seed}"), &got, &want);
    }
    let (_, jit_report) = jit.run_profiled(&as_named(&inputs)).expect("jit profiles");
    let (_, aot_report) = aot.run_profiled(&as_named(&inputs)).expect("aot profiles");
    let labels = |r: &kiln::RunReport| -> Vec<String> {
        r.kernels.iter().map(|k| k.label.clone()).collect()
    };
    assert_eq!(
        labels(&aot_report),
        labels(&jit_report),
        "{name}: kernel labels"
    );
}

#[test]
fn aot_and_jit_agree_on_bert_tiny() {
    aot_and_jit_agree("tiny/bert_tiny");
}

#[test]
fn aot_and_jit_agree_on_gpt2_tiny() {
    aot_and_jit_agree("tiny/gpt2_tiny");
}

#[test]
fn backends_parse_from_their_names() {
    for b in Backend::ALL {
        assert_eq!(b.to_string().parse::<Backend>(), Ok(b));
    }
    let err = "gpu".parse::<Backend>().unwrap_err();
    assert!(err.contains("jit, aot or interp"), "{err}");
}
