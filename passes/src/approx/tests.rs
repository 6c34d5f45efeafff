//! Tests of the budget machinery on a small GELU FFN: refusal under a tiny budget,
//! acceptance under a generous one with the error checked on inputs outside the calibration
//! sets, argument errors.

use super::*;
use crate::target::Target;
use crate::testutil::{f32_ty, node, Rng};
use kiln_ir::{OpKind, Tensor};

const HIDDEN: usize = 16;
const FFN: usize = 64;
const ROWS: usize = 1;

fn weights(rng: &mut Rng, k: usize, n: usize) -> Tensor {
    let scale = 1.0 / (k as f32).sqrt();
    let v: Vec<f32> = (0..k * n)
        .map(|_| ((rng.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale * 1.7)
        .collect();
    Tensor::from_vec(vec![k, n], v)
}

/// `y = gelu(x W1) W2 + x` on `[ROWS, HIDDEN]`.
fn gelu_ffn() -> Graph {
    let mut rng = Rng::new(7);
    let mut g = Graph::new("ffn");
    let x = g.add_input("x", f32_ty(&[ROWS, HIDDEN]));
    let w1 = g.add_constant("w1", weights(&mut rng, HIDDEN, FFN));
    let w2 = g.add_constant("w2", weights(&mut rng, FFN, HIDDEN));
    let a = node(&mut g, OpKind::MatMul, &[x, w1], "up", f32_ty(&[ROWS, FFN]));
    let h = node(&mut g, OpKind::Gelu, &[a], "h", f32_ty(&[ROWS, FFN]));
    let d = node(
        &mut g,
        OpKind::MatMul,
        &[h, w2],
        "down",
        f32_ty(&[ROWS, HIDDEN]),
    );
    let y = node(&mut g, OpKind::Add, &[d, x], "y", f32_ty(&[ROWS, HIDDEN]));
    g.outputs = vec![y];
    g
}

fn sets(seed: u64, n: usize) -> Vec<Vec<Tensor>> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| {
            let v: Vec<f32> = (0..ROWS * HIDDEN)
                .map(|_| (rng.next() >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0)
                .collect();
            vec![Tensor::from_vec(vec![ROWS, HIDDEN], v)]
        })
        .collect()
}

fn request(spec: &str, max_error: f64) -> Request {
    Request {
        rewrites: parse_families(spec).unwrap(),
        max_error,
        metric: Metric::RelL2,
    }
}

#[test]
fn the_down_projection_of_a_gelu_ffn_is_the_one_site() {
    let g = gelu_ffn();
    let sites = ffn::FfnThreshold::parse(None).unwrap().sites(&g);
    assert_eq!(sites.len(), 1);
    assert_eq!(sites[0].name, "%down");
    assert_eq!(g.value(sites[0].probe).name, "h");
}

#[test]
fn a_tiny_budget_is_refused() {
    let g = gelu_ffn();
    let calib = Calibration::split(sets(1, 6), "test", true);
    let r = approximate(
        &g,
        &request("ffn-threshold=0.5", 1e-9),
        &calib,
        &Interpreter,
        Target::host(),
    );
    match r {
        Err(ApproxError::Refused { budget, .. }) => assert_eq!(budget, 1e-9),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn a_generous_budget_is_accepted_and_holds_on_unseen_inputs() {
    let g = gelu_ffn();
    let budget = 0.2;
    let calib = Calibration::split(sets(1, 6), "test", true);
    assert_eq!((calib.calibrate.len(), calib.held_out.len()), (4, 2));
    let (approx, report) = approximate(
        &g,
        &request("ffn-threshold", budget),
        &calib,
        &Interpreter,
        Target::host(),
    )
    .unwrap();
    assert_eq!(report.accepted.len(), 1, "{report}");
    assert!(report.calibration_error <= budget && report.calibration_error > 0.0);
    assert!(report.held_out_error.unwrap() <= budget);
    assert!(report.est_speedup > 1.0, "{report}");
    assert!(approx.nodes.iter().any(|n| n.op == OpKind::Shrink));
    kiln_ir::verify(&approx).unwrap();
    // Inputs never seen: the error stays under the budget.
    let names = vec!["y".to_string()];
    for s in sets(99, 8) {
        let want = kiln_ir::run(&g, s.clone()).unwrap();
        let got = kiln_ir::run(&approx, s).unwrap();
        let e = measure(Metric::RelL2, &got, &want, &names).unwrap();
        assert!(e <= budget, "unseen error {e} over budget {budget}");
    }
    // The requested sparsity is what the threshold gives on the calibration activations.
    let (s, t) = (
        report.accepted[0].candidate.values[0],
        report.accepted[0].candidate.values[1],
    );
    assert!(s > 0.0 && t > 0.0);
    assert!(report.to_string().contains("ffn-threshold"));
}

#[test]
fn a_larger_budget_accepts_at_least_as_much_sparsity() {
    let g = gelu_ffn();
    let calib = Calibration::split(sets(3, 6), "test", true);
    let sparsity = |b: f64| {
        approximate(
            &g,
            &request("ffn-threshold", b),
            &calib,
            &Interpreter,
            Target::host(),
        )
        .map(|(_, r)| r.accepted[0].candidate.values[0])
        .unwrap_or(0.0)
    };
    assert!(sparsity(0.5) >= sparsity(0.05));
}

#[test]
fn bad_arguments_are_errors() {
    assert!(matches!(
        parse_families("ffn-magic"),
        Err(ApproxError::UnknownFamily { .. })
    ));
    for p in ["ffn-threshold=1.5", "ffn-threshold=0", "ffn-threshold=abc"] {
        assert!(
            matches!(parse_families(p), Err(ApproxError::BadParam { .. })),
            "{p}"
        );
    }
    let g = gelu_ffn();
    let calib = Calibration::split(sets(1, 3), "test", true);
    for b in [-1.0, f64::NAN] {
        let r = approximate(
            &g,
            &request("ffn-threshold", b),
            &calib,
            &Interpreter,
            Target::host(),
        );
        assert!(matches!(r, Err(ApproxError::BadBudget(_))));
    }
    let none = Calibration::split(vec![], "test", true);
    let r = approximate(
        &g,
        &request("ffn-threshold", 0.1),
        &none,
        &Interpreter,
        Target::host(),
    );
    assert!(matches!(r, Err(ApproxError::NoCalibration)));
}
