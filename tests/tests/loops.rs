//! Loops end to end: `loop` and `scan` graphs compiled by the JIT (the body compiled once as
//! its own plan, run as a native loop) against the interpreter; and `roll_blocks`, which
//! must never change a result: on every shared model the optimised graph with rolling
//! equals the one without, on the interpreter and the JIT, and ALBERT's four weight-tied
//! layers become one loop.

use kiln::{Backend, Model, Options};
use kiln_ir::{OpKind, Tensor};
use kiln_tests::{as_named, model_dir, shared_models, test_data};

/// A loop over a matmul with a captured weight, a condition and a scanned value.
const WHILE_MATMUL: &str = "func @f(%n: i64[], %x: f32[3, 8], %w: f32[8, 8]) -> (f32[3, 8], f32[?, 3, 8]) {
  %t = constant {value = dense<bool[]> [true]}
  %s, %all = loop %n, %t, %x, %w {body = func @body(%i: i64[], %c: bool[], %v: f32[3, 8], %k: f32[8, 8]) -> (bool[], f32[3, 8], f32[3, 8]) {
    %m = matmul %v, %k
    %h = tanh %m
    %r = add %h, %v
    %lim = constant {value = dense<i64[]> [5]}
    %one = constant {value = dense<i64[]> [1]}
    %next = add %i, %one
    %go = less %next, %lim
    return %go, %r, %h
  }, num_captures = 1}
  return %s, %all
}
";

/// A scan reading rows forwards and columns backwards, stacking on the last axis.
const SCAN: &str = "func @g(%init: f32[4], %xs: f32[T, 4], %ys: f32[4, T]) -> (f32[4], f32[4, T]) {
  %s, %out = scan %init, %xs, %ys {body = func @body(%acc: f32[4], %x: f32[4], %y: f32[4]) -> (f32[4], f32[4]) {
    %a = mul %acc, %x
    %b = add %a, %y
    %c = sigmoid %b
    return %c, %b
  }, num_scan_inputs = 2, scan_input_axes = [0, 1], scan_input_directions = [0, 1], scan_output_axes = [1], scan_output_directions = [1]}
  return %s, %out
}
";

fn random(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect();
    Tensor::from_vec(shape.to_vec(), v)
}

fn compile(m: &Model, backend: Backend, passes: &str) -> kiln::Executable {
    m.compile(&Options {
        backend,
        threads: 2,
        passes: passes.into(),
        ..Options::default()
    })
    .unwrap_or_else(|e| panic!("{backend}: {e}"))
}

/// Bit-for-bit equality, NaN never equal.
fn same(a: &[Tensor], b: &[Tensor]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.shape() == y.shape()
                && x.dtype() == y.dtype()
                && x.to_f64s()
                    .iter()
                    .zip(y.to_f64s())
                    .all(|(p, q)| p.to_bits() == q.to_bits() && !p.is_nan())
        })
}

fn close(a: &[Tensor], b: &[Tensor]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| kiln_reference::compare(x, y, kiln_reference::MODEL_TOLERANCE).ok)
}

/// A recurrent step as `roll_recurrences` leaves one: the step's index read from a
/// stacked constant at the iteration number, the step's row of the input, a matmul with a
/// weight the body holds (prepared once), a bias, tanh; the new state returned carried and
/// scanned. `{W}` is the weight's values; the batch is symbolic.
const RNN_STEPS: &str = "func @rnn(%x: f32[B, 6, 8], %h0: f32[B, 8]) -> (f32[B, 8], f32[5, B, 8]) {
  %n = constant {value = dense<i64[]> [5]}
  %h, %ys = loop %n, _, %h0, %x {body = func @step(%i: i64[], %c: bool[], %hin: f32[B, 8], %xs: f32[B, 6, 8]) -> (bool[], f32[B, 8], f32[B, 8]) {
    %steps = constant {value = dense<i64[5]> [1, 2, 3, 4, 5]}
    %w = constant {value = dense<f32[8, 8]> [{W}]}
    %bias = constant {value = dense<f32[8]> [0.5, -0.25, 0.125, 0.0, 1.0, -1.0, 0.75, -0.5]}
    %t = gather %steps, %i {axis = 0}
    %xt = gather %xs, %t {axis = 1}
    %m = matmul %hin, %w
    %mb = add %m, %bias
    %a = add %mb, %xt
    %h = tanh %a
    return %c, %h, %h
  }, num_captures = 1}
  return %h, %ys
}
";

/// A loop whose step is row reads, a matmul with its weight in the body and elementwise
/// kernels runs as one native loop (`stepped` in the profile: the matmul on its prepared
/// routine, the rest on the JIT's row functions, no plan run per step) and gives the
/// interpreter's values, at batch 1 and 3.
#[test]
fn a_recurrent_step_with_a_matmul_runs_as_a_stepped_loop() {
    let w: Vec<String> = random(&[8, 8], 9)
        .to_f64s()
        .iter()
        .map(|v| format!("{v}"))
        .collect();
    let text = RNN_STEPS.replace("{W}", &w.join(", "));
    let m = Model::from_graph(text.parse().unwrap());
    let jit = compile(&m, Backend::Jit, "");
    let interp = compile(&m, Backend::Interp, "");
    for b in [1usize, 3] {
        let ins = vec![("x", random(&[b, 6, 8], 4)), ("h0", random(&[b, 8], 5))];
        let (got, report) = jit.run_profiled(&ins).unwrap();
        let kinds: Vec<&str> = report.kernels.iter().map(|k| k.kind).collect();
        assert!(kinds.contains(&"stepped"), "batch {b}: {kinds:?}");
        let want = interp.run(&ins).unwrap();
        assert_eq!(got[1].shape(), [5, b, 8].as_slice());
        assert!(close(&got, &want), "batch {b}: {got:?} vs {want:?}");
    }
}

/// A stepped loop whose trip count runs past its per-step index table fails with an error
/// naming the loop and the index, as the interpreter does: never a panic or a wrong row.
#[test]
fn a_stepped_loop_past_its_step_table_is_an_error() {
    let w: Vec<String> = (0..64)
        .map(|i| format!("{}", (i % 7) as f32 * 0.01))
        .collect();
    let text = RNN_STEPS
        .replace("{W}", &w.join(", "))
        .replace("dense<i64[]> [5]", "dense<i64[]> [7]")
        .replace("f32[5, B, 8]", "f32[7, B, 8]");
    let m = Model::from_graph(text.parse().unwrap());
    let jit = compile(&m, Backend::Jit, "");
    let interp = compile(&m, Backend::Interp, "");
    let ins = vec![("x", random(&[2, 6, 8], 4)), ("h0", random(&[2, 8], 5))];
    let got = jit.run(&ins).expect_err("the jit must refuse step 5 of 5");
    let msg = got.to_string();
    assert!(
        msg.contains("out of range") && msg.contains("loop"),
        "{msg}"
    );
    assert!(interp.run(&ins).is_err(), "the interpreter refuses it too");
}

#[test]
fn jit_runs_loops_and_scans_like_the_interpreter() {
    let m = Model::from_graph(WHILE_MATMUL.parse().unwrap());
    let jit = compile(&m, Backend::Jit, "");
    let interp = compile(&m, Backend::Interp, "");
    for n in [0i64, 1, 3, 9] {
        let ins = vec![
            ("n", Tensor::scalar(n)),
            ("x", random(&[3, 8], 1)),
            ("w", random(&[8, 8], 2)),
        ];
        let a = jit.run(&ins).unwrap();
        let b = interp.run(&ins).unwrap();
        assert_eq!(a[1].shape()[0], n.clamp(0, 5) as usize, "n = {n}");
        assert!(close(&a, &b), "n = {n}: {a:?} vs {b:?}");
    }
    let m = Model::from_graph(SCAN.parse().unwrap());
    let jit = compile(&m, Backend::Jit, "");
    let interp = compile(&m, Backend::Interp, "");
    for t in [0usize, 1, 6] {
        let ins = vec![
            ("init", random(&[4], 3)),
            ("xs", random(&[t, 4], 4)),
            ("ys", random(&[4, t], 5)),
        ];
        let a = jit.run(&ins).unwrap();
        let b = interp.run(&ins).unwrap();
        assert!(close(&a, &b), "t = {t}: {a:?} vs {b:?}");
    }
}

#[test]
fn the_jit_runs_a_whole_loop_as_one_kernel() {
    let m = Model::from_graph(WHILE_MATMUL.parse().unwrap());
    let jit = compile(&m, Backend::Jit, "-roll_blocks");
    let ins = vec![
        ("n", Tensor::scalar(9i64)),
        ("x", random(&[3, 8], 1)),
        ("w", random(&[8, 8], 2)),
    ];
    let (_, report) = jit.run_profiled(&ins).unwrap();
    // One fallback kernel runs the whole loop (not one kernel per iteration).
    let loops: Vec<_> = report.kernels.iter().filter(|k| k.op == "loop").collect();
    assert_eq!(loops.len(), 1, "{:?}", report.kernels);
}

/// The shared models kiln's tests run (every folder with a model and test data).
fn shared() -> Vec<String> {
    let mut v = vec![];
    for group in ["tiny", "bench"] {
        let Ok(rd) = std::fs::read_dir(shared_models().join(group)) else {
            continue;
        };
        for e in rd.flatten() {
            if e.path().join("model.onnx").is_file() && e.path().join("test_data_set_0").is_dir() {
                v.push(format!("{group}/{}", e.file_name().to_string_lossy()));
            }
        }
    }
    v.sort();
    v
}

/// Runs `name` optimised with and without `roll_blocks` on the JIT; the outputs must be
/// the same bit for bit (the body is the first copy's nodes). Returns the loop count.
fn rolled_equals_unrolled(name: &str) -> usize {
    let dir = model_dir(name);
    let m = Model::load(dir.join("model.onnx")).unwrap_or_else(|e| panic!("{name}: {e}"));
    let rolled = compile(&m, Backend::Jit, "");
    let unrolled = compile(&m, Backend::Jit, "-roll_blocks");
    let (inputs, _) = test_data(rolled.graph(), &dir);
    let a = rolled.run(&as_named(&inputs)).unwrap();
    let b = unrolled.run(&as_named(&inputs)).unwrap();
    assert!(same(&a, &b), "{name}: rolled and unrolled outputs differ");
    rolled
        .graph()
        .nodes
        .iter()
        .filter(|n| n.op == OpKind::Loop)
        .count()
}

#[test]
fn albert_tiny_rolls_its_four_tied_layers_into_one_loop() {
    let dir = model_dir("tiny/albert_tiny");
    if !dir.join("model.onnx").is_file() {
        eprintln!("SKIPPED: {} not found", dir.display());
        return;
    }
    let m = Model::load(dir.join("model.onnx")).unwrap();
    let g = m.optimised(&Options::default()).unwrap();
    if let Some(p) = std::env::var_os("KILN_DUMP_ALBERT") {
        let unrolled = m
            .optimised(&Options {
                passes: "-roll_blocks".into(),
                ..Options::default()
            })
            .unwrap();
        std::fs::write(p, kiln_ir::text::print(&unrolled)).unwrap();
    }
    assert_eq!(rolled_equals_unrolled("tiny/albert_tiny"), 1);
    let l = g.nodes.iter().find(|n| n.op == OpKind::Loop).unwrap();
    let trips = g.constant_value(l.inputs[0].unwrap()).unwrap();
    assert_eq!(trips.to_i64s(), vec![4]);
    // Matches PyTorch on the interpreter too (the interpreter runs the body graph).
    let interp = compile(&m, Backend::Interp, "");
    kiln_tests::check_on_test_data(interp.graph(), &dir, |x| interp.run(x));
}

#[test]
fn rolling_never_changes_a_shared_model_result() {
    let models = shared();
    if models.is_empty() {
        eprintln!("SKIPPED: no shared models");
        return;
    }
    for name in &models {
        rolled_equals_unrolled(name);
    }
}
