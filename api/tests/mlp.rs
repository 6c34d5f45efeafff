//! The host API on the bundled example MLP (`examples/mlp`): both backends match its
//! reference output, and every kind of bad input is an error naming the input.

use kiln::{Backend, Error, Model, Options, Tensor};
use std::path::PathBuf;

/// Softmax probabilities of a 2-layer MLP: f32 JIT vs the exporter's reference.
const MLP_TOLERANCE: f32 = 1e-5;

fn example(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/mlp")
        .join(p)
}

fn read_pb(p: &str) -> Tensor {
    kiln_frontend::tensor_io::read_tensor_pb(&example(p))
        .expect("reading the example's test data")
        .1
}

#[test]
fn both_backends_match_the_reference_output() {
    let model = Model::load(example("model.onnx")).unwrap();
    let x = read_pb("test_data_set_0/input_0.pb");
    let want = read_pb("test_data_set_0/output_0.pb");
    let want = want.as_slice::<f32>().unwrap();
    for backend in [Backend::Jit, Backend::Interp] {
        let exe = model
            .compile(&Options {
                backend,
                ..Options::default()
            })
            .unwrap();
        assert_eq!(exe.backend(), backend);
        let outs = exe.run(&[("x", x.clone())]).unwrap();
        let got = outs[0].as_slice::<f32>().unwrap();
        assert_eq!(got.len(), want.len());
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            // Written so that a NaN fails.
            assert!(
                (a - b).abs() <= MLP_TOLERANCE,
                "{backend} [{i}]: {a} vs {b}"
            );
        }
    }
}

#[test]
fn bad_inputs_name_the_input_and_what_it_expects() {
    let exe = Model::load(example("model.onnx"))
        .unwrap()
        .compile(&Options::default())
        .unwrap();
    let e = exe
        .run(&[("x", Tensor::from_vec(vec![2, 16], vec![1i64; 32]))])
        .unwrap_err();
    assert!(
        matches!(e, Error::BadInput { ref name, .. } if name == "x"),
        "{e}"
    );
    assert_eq!(
        e.to_string(),
        "input `x`: expected f32[batch, 16], got i64[2, 16]: dtype is i64, the model takes f32"
    );
    let e = exe
        .run(&[("x", Tensor::from_vec(vec![32], vec![1f32; 32]))])
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "input `x`: expected f32[batch, 16], got f32[32]: rank is 1, the model takes rank 2"
    );
    let e = exe.run(&[]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "missing input `x`: the model expects f32[batch, 16]"
    );
    let e = exe
        .run(&[("y", Tensor::from_vec(vec![1, 16], vec![1f32; 16]))])
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "unknown input `y`: the model's inputs are `x` (f32[batch, 16])"
    );
    let e = exe.run_ordered(vec![]).unwrap_err();
    assert!(e.to_string().contains("missing input `x`"), "{e}");
}

#[test]
fn backends_parse_from_their_names() {
    assert_eq!("jit".parse::<Backend>(), Ok(Backend::Jit));
    assert_eq!("interp".parse::<Backend>(), Ok(Backend::Interp));
    assert!("llvm".parse::<Backend>().unwrap_err().contains("llvm"));
    assert_eq!(Options::default().backend, Backend::Jit);
    assert_eq!(Options::default().opt_level, 1);
}

#[test]
fn compile_with_progress_reports_every_pass_then_codegen() {
    use std::sync::{Arc, Mutex};
    let model = Model::load(example("model.onnx")).unwrap();
    let seen: Arc<Mutex<Vec<kiln::Phase>>> = Arc::default();
    let s = seen.clone();
    let opts = Options::default();
    model
        .compile_with_progress(&opts, Some(Arc::new(move |p| s.lock().unwrap().push(p))))
        .unwrap();
    let seen = seen.lock().unwrap();
    let passes: Vec<(usize, usize)> = seen
        .iter()
        .filter_map(|p| match p {
            kiln::Phase::Pass { index, total, .. } => Some((*index, *total)),
            _ => None,
        })
        .collect();
    let total = kiln_passes::default_pipeline().enabled_names().len();
    assert_eq!(passes, (1..=total).map(|i| (i, total)).collect::<Vec<_>>());
    assert_eq!(
        seen.last(),
        Some(&kiln::Phase::Codegen {
            backend: Backend::Jit
        })
    );
}
