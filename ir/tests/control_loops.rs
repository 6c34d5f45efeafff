//! The `loop` and `scan` ops: their text form round-trips, the interpreter runs them with
//! ONNX's semantics (trip count 0 and 1, a dynamic trip count with a condition, reverse
//! directions and axes), shape inference types their outputs, and malformed loops are
//! clear verifier errors.

use kiln_ir::text::{parse, print};
use kiln_ir::{interp, verify, Graph, Tensor};

/// `x` doubled `n` times; every iteration's value before doubling is scanned out.
const DOUBLING: &str = "func @doubling(%n: i64[], %x: f32[3]) -> (f32[3], f32[?, 3]) {
  %s, %all = loop %n, _, %x {body = func @body(%i: i64[], %c: bool[], %v: f32[3]) -> (bool[], f32[3], f32[3]) {
    %two = constant {value = dense<f32[]> [2.0]}
    %w = mul %v, %two
    return %c, %w, %v
  }}
  return %s, %all
}
";

/// A while loop: runs while `i < limit` (the body's condition) and `i < n`; the carried
/// value adds the scale captured from outside (`num_captures = 1`) each time.
const WHILE: &str = "func @while(%n: i64[], %limit: i64[], %x: f32[2], %scale: f32[2]) -> (f32[2], i64[?]) {
  %t = constant {value = dense<bool[]> [true]}
  %s, %iters = loop %n, %t, %x, %scale, %limit {body = func @body(%i: i64[], %c: bool[], %v: f32[2], %k: f32[2], %lim: i64[]) -> (bool[], f32[2], i64[]) {
    %w = add %v, %k
    %one = constant {value = dense<i64[]> [1]}
    %next = add %i, %one
    %go = less %next, %lim
    return %go, %w, %i
  }, num_captures = 2}
  return %s, %iters
}
";

fn f32s(shape: &[usize], v: &[f32]) -> Tensor {
    Tensor::from_vec(shape.to_vec(), v.to_vec())
}

fn floats(t: &Tensor) -> Vec<f32> {
    t.as_slice::<f32>().expect("f32").to_vec()
}

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0
        })
        .collect()
}

#[test]
fn loop_and_scan_text_round_trips() {
    for src in [DOUBLING, WHILE, SCAN] {
        let g: Graph = parse(src).unwrap();
        verify(&g).unwrap();
        let text = print(&g);
        assert_eq!(parse(&text).unwrap(), g, "{text}");
    }
}

#[test]
fn loop_runs_zero_one_and_many_times() {
    let g: Graph = parse(DOUBLING).unwrap();
    let x = random(3, 1);
    for n in [0i64, 1, 4] {
        let out = interp::run(&g, vec![Tensor::scalar(n), f32s(&[3], &x)]).unwrap();
        let scale = 2f32.powi(n as i32);
        let want: Vec<f32> = x.iter().map(|v| v * scale).collect();
        assert_eq!(floats(&out[0]), want, "n = {n}");
        // The scanned values: x, 2x, 4x, ... stacked on a new axis 0.
        assert_eq!(out[1].shape(), &[n as usize, 3], "n = {n}");
        let stacked: Vec<f32> = (0..n)
            .flat_map(|k| x.iter().map(move |v| v * 2f32.powi(k as i32)))
            .collect();
        assert_eq!(floats(&out[1]), stacked, "n = {n}");
    }
}

#[test]
fn negative_trip_count_runs_no_iteration() {
    let g: Graph = parse(DOUBLING).unwrap();
    let x = random(3, 2);
    let out = interp::run(&g, vec![Tensor::scalar(-5i64), f32s(&[3], &x)]).unwrap();
    assert_eq!(floats(&out[0]), x);
    assert_eq!(out[1].shape(), &[0, 3]);
}

#[test]
fn while_loop_stops_at_the_condition_or_the_trip_count() {
    let g: Graph = parse(WHILE).unwrap();
    let x = random(2, 3);
    let k = random(2, 4);
    // (trip count, limit) -> iterations: the condition is checked after each iteration.
    for (n, limit) in [(10i64, 3i64), (2, 5), (10, 0), (0, 4)] {
        let iterations = if n == 0 { 0 } else { n.min(limit.max(1)) };
        let out = interp::run(
            &g,
            vec![
                Tensor::scalar(n),
                Tensor::scalar(limit),
                f32s(&[2], &x),
                f32s(&[2], &k),
            ],
        )
        .unwrap();
        let mut want = x.clone();
        for _ in 0..iterations {
            for (w, d) in want.iter_mut().zip(&k) {
                *w += d;
            }
        }
        assert_eq!(floats(&out[0]), want, "n = {n}, limit = {limit}");
        let iters: Vec<i64> = (0..iterations).collect();
        assert_eq!(out[1].to_i64s(), iters, "n = {n}, limit = {limit}");
    }
}

/// A running sum over axis 1 of `%xs`, read last-to-first, whose partial sums are stacked
/// along axis 1 in reverse step order (so they line up with the columns they end at).
const SCAN: &str = "func @suffix_sums(%init: f32[2], %xs: f32[2, T], %ys: f32[T, 2]) -> (f32[2], f32[2, T], f32[T, 2]) {
  %s, %sums, %fwd = scan %init, %xs, %ys {body = func @body(%acc: f32[2], %col: f32[2], %row: f32[2]) -> (f32[2], f32[2], f32[2]) {
    %next = add %acc, %col
    %r = mul %row, %next
    return %next, %next, %r
  }, num_scan_inputs = 2, scan_input_axes = [1, 0], scan_input_directions = [1, 0], scan_output_axes = [-1, 0], scan_output_directions = [1, 0]}
  return %s, %sums, %fwd
}
";

#[test]
fn scan_reads_and_writes_in_reverse_along_axes() {
    let g: Graph = parse(SCAN).unwrap();
    for t in [0usize, 1, 5] {
        let init = random(2, 5);
        let xs = random(2 * t, 6);
        let ys = random(2 * t, 7);
        let out = interp::run(
            &g,
            vec![f32s(&[2], &init), f32s(&[2, t], &xs), f32s(&[t, 2], &ys)],
        )
        .unwrap();
        // Step s reads column t-1-s of xs and row s of ys.
        let mut acc = init.clone();
        let mut sums = vec![0f32; 2 * t];
        let mut fwd = vec![0f32; 2 * t];
        for s in 0..t {
            let col = t - 1 - s;
            for r in 0..2 {
                acc[r] += xs[r * t + col];
                // Output stacked in reverse along the last axis: step s lands at column
                // t-1-s.
                sums[r * t + (t - 1 - s)] = acc[r];
                fwd[s * 2 + r] = ys[s * 2 + r] * acc[r];
            }
        }
        assert_eq!(floats(&out[0]), acc, "t = {t}");
        assert_eq!(out[1].shape(), &[2, t]);
        assert_eq!(floats(&out[1]), sums, "t = {t}");
        assert_eq!(out[2].shape(), &[t, 2]);
        assert_eq!(floats(&out[2]), fwd, "t = {t}");
    }
}

#[test]
fn scan_inputs_of_different_lengths_are_an_error() {
    // Unknown lengths (`?`), so that the input check lets them through to the scan.
    let g: Graph = parse(&SCAN.replace("[2, T]", "[2, ?]").replace("[T, 2]", "[?, 2]")).unwrap();
    let e = interp::run(
        &g,
        vec![
            f32s(&[2], &[0.0; 2]),
            f32s(&[2, 3], &[0.0; 6]),
            f32s(&[4, 2], &[0.0; 8]),
        ],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("steps"), "{e}");
}

#[test]
fn shape_inference_types_loop_and_scan_outputs() {
    let g: Graph = parse(
        "func @f(%x: f32[3]) -> (f32[3], f32[4, 3]) {
  %n = constant {value = dense<i64[]> [4]}
  %s, %all = loop %n, _, %x {body = func @body(%i: i64[], %c: bool[], %v: f32[3]) -> (bool[], f32[3], f32[3]) {
    return %c, %v, %v
  }}
  return %s, %all
}
",
    )
    .unwrap();
    let facts = kiln_ir::infer::facts(&g).unwrap();
    // A constant trip count without a condition fixes the stacked axis.
    assert_eq!(facts[g.outputs[1].index()].ty.to_string(), "f32[4, 3]");
    let g: Graph = parse(SCAN).unwrap();
    let facts = kiln_ir::infer::facts(&g).unwrap();
    assert_eq!(facts[g.outputs[1].index()].ty.to_string(), "f32[2, T]");
    assert_eq!(facts[g.outputs[2].index()].ty.to_string(), "f32[T, 2]");
}

#[test]
fn body_arity_mismatch_is_a_verifier_error() {
    // The body takes no carried value, but the loop passes one. Without a declared
    // result type the parser cannot type the loop and says why; with one, the verifier.
    let src = "func @f(%n: i64[], %x: f32[3]) -> (f32[3]) {
  %s = loop %n, _, %x {body = func @body(%i: i64[], %c: bool[]) -> (bool[]) {
    return %c
  }}
  return %s
}
";
    let e = parse(src).unwrap_err().to_string();
    assert!(e.contains("body `@body` takes 2 inputs"), "{e}");
    let g: Graph = parse(&src.replace("}}\n  return", "}} : f32[3]\n  return")).unwrap();
    let e = verify(&g).unwrap_err().to_string();
    assert!(
        e.contains("%s") && e.contains("body `@body` takes 2 inputs"),
        "{e}"
    );
    // A scan body returning fewer values than the state.
    let g: Graph = parse(
        "func @f(%a: f32[3], %b: f32[3], %xs: f32[4, 3]) -> (f32[3]) {
  %s = scan %a, %b, %xs {body = func @body(%p: f32[3], %q: f32[3], %x: f32[3]) -> (f32[3]) {
    return %p
  }, num_scan_inputs = 1} : f32[3]
  return %s
}
",
    )
    .unwrap();
    let e = verify(&g).unwrap_err().to_string();
    assert!(e.contains("fewer than the 2 state values"), "{e}");
}

#[test]
fn body_reading_an_undefined_value_is_an_error() {
    // In the text form a body is a scope of its own: the outer `%x` is unknown there.
    let e = parse(
        "func @f(%n: i64[], %x: f32[3]) -> (f32[3]) {
  %s = loop %n, _, %x {body = func @body(%i: i64[], %c: bool[], %v: f32[3]) -> (bool[], f32[3]) {
    %w = add %v, %x
    return %c, %w
  }}
  return %s
}
",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("%x"), "{e}");
    // A graph built in memory whose body reads a value nothing defines.
    let mut g: Graph = parse(DOUBLING).unwrap();
    let mut body = g.nodes[0].attrs.req_graph("body").unwrap().as_ref().clone();
    let ghost = body.add_value("ghost", body.ty(body.inputs[2]).clone());
    body.nodes[1].inputs[0] = Some(ghost);
    g.nodes[0]
        .attrs
        .set("body", kiln_ir::Attr::Graph(std::sync::Arc::new(body)));
    let e = verify(&g).unwrap_err().to_string();
    assert!(
        e.contains("in body `@body`") && e.contains("%ghost") && e.contains("before it is defined"),
        "{e}"
    );
}

#[test]
fn a_loop_without_trip_count_or_condition_is_an_error() {
    let g: Graph = parse(
        "func @f(%x: f32[3]) -> (f32[3]) {
  %s = loop _, _, %x {body = func @body(%i: i64[], %c: bool[], %v: f32[3]) -> (bool[], f32[3]) {
    return %c, %v
  }}
  return %s
}
",
    )
    .unwrap();
    let e = interp::run(&g, vec![f32s(&[3], &[1.0; 3])])
        .unwrap_err()
        .to_string();
    assert!(e.contains("never ends"), "{e}");
}

/// A loop whose carried value becomes a capture: the body returns what it reads from
/// outside, which the loop shares with the operand (no copy) while it runs.
const RETURNS_CAPTURE: &str = "func @returns_capture(%n: i64[], %x: f32[4], %k: f32[4]) -> (f32[4]) {
  %s = loop %n, _, %x, %k {body = func @body(%i: i64[], %c: bool[], %v: f32[4], %kk: f32[4]) -> (bool[], f32[4]) {
    %w = identity %kk
    return %c, %w
  }, num_captures = 1}
  return %s
}
";

#[test]
fn a_loop_result_never_shares_memory_with_a_capture() {
    let g: Graph = parse(RETURNS_CAPTURE).unwrap();
    verify(&g).unwrap();
    let (x, k) = (random(4, 5), random(4, 6));
    let kt = f32s(&[4], &k);
    let k_range = kt.data().byte_range();
    let out = interp::run(&g, vec![Tensor::scalar(3i64), f32s(&[4], &x), kt]).unwrap();
    assert_eq!(floats(&out[0]), k);
    // The operands are gone with the run; the result is a copy of its own.
    let (a, n) = out[0].data().byte_range();
    assert!(a + n <= k_range.0 || k_range.0 + k_range.1 <= a || n == 0);
    assert_ne!(out[0].data().storage(), kiln_ir::Storage::Mapped);
}
