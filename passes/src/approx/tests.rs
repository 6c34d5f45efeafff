//! Tests of the budget machinery on a small GELU FFN: refusal under a tiny budget,
//! acceptance under a generous one with the error checked on inputs outside the calibration
//! sets, argument errors.

use super::*;
use crate::target::Target;
use crate::testutil::{f32_ty, node, Rng};
use kiln_ir::{Attr, Attrs, OpKind, Tensor};

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
    gelu_ffn_rows(ROWS)
}

/// `y = gelu(x W1) W2 + x` on `[rows, HIDDEN]`.
fn gelu_ffn_rows(rows: usize) -> Graph {
    gelu_ffn_dims(rows, HIDDEN, FFN)
}

/// `y = gelu(x W1) W2 + x` on `[rows, hidden]` with an FFN of width `ffn`.
fn gelu_ffn_dims(rows: usize, hidden: usize, ffn: usize) -> Graph {
    let mut rng = Rng::new(7);
    let mut g = Graph::new("ffn");
    let x = g.add_input("x", f32_ty(&[rows, hidden]));
    let w1 = g.add_constant("w1", weights(&mut rng, hidden, ffn));
    let w2 = g.add_constant("w2", weights(&mut rng, ffn, hidden));
    let a = node(&mut g, OpKind::MatMul, &[x, w1], "up", f32_ty(&[rows, ffn]));
    let h = node(&mut g, OpKind::Gelu, &[a], "h", f32_ty(&[rows, ffn]));
    let d = node(
        &mut g,
        OpKind::MatMul,
        &[h, w2],
        "down",
        f32_ty(&[rows, hidden]),
    );
    let y = node(&mut g, OpKind::Add, &[d, x], "y", f32_ty(&[rows, hidden]));
    g.outputs = vec![y];
    g
}

fn sets(seed: u64, n: usize) -> Vec<Vec<Tensor>> {
    sets_rows(seed, n, ROWS)
}

fn sets_rows(seed: u64, n: usize, rows: usize) -> Vec<Vec<Tensor>> {
    sets_dims(seed, n, rows, HIDDEN)
}

fn sets_dims(seed: u64, n: usize, rows: usize, hidden: usize) -> Vec<Vec<Tensor>> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| {
            let v: Vec<f32> = (0..rows * hidden)
                .map(|_| (rng.next() >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0)
                .collect();
            vec![Tensor::from_vec(vec![rows, hidden], v)]
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
fn the_sites_of_a_gelu_ffn_are_its_down_input_and_its_input() {
    let g = gelu_ffn();
    let sites = ffn::FfnThreshold::parse(None).unwrap().sites(&g);
    let found: Vec<(&str, &str)> = sites
        .iter()
        .map(|s| (s.name.as_str(), g.value(s.probe).name.as_str()))
        .collect();
    assert_eq!(found, [("%down", "h"), ("%up", "x")]);
}

/// `y = (silu(x Wg) ⊙ (x Wu)) Wd + x` on `[1, HIDDEN]`.
fn swiglu_ffn() -> Graph {
    let mut rng = Rng::new(11);
    let mut g = Graph::new("swiglu");
    let x = g.add_input("x", f32_ty(&[1, HIDDEN]));
    let wg = g.add_constant("wg", weights(&mut rng, HIDDEN, FFN));
    let wu = g.add_constant("wu", weights(&mut rng, HIDDEN, FFN));
    let wd = g.add_constant("wd", weights(&mut rng, FFN, HIDDEN));
    let a = node(&mut g, OpKind::MatMul, &[x, wg], "gate", f32_ty(&[1, FFN]));
    let s = node(&mut g, OpKind::Silu, &[a], "act", f32_ty(&[1, FFN]));
    let u = node(&mut g, OpKind::MatMul, &[x, wu], "up", f32_ty(&[1, FFN]));
    let h = node(&mut g, OpKind::Mul, &[s, u], "h", f32_ty(&[1, FFN]));
    let d = node(
        &mut g,
        OpKind::MatMul,
        &[h, wd],
        "down",
        f32_ty(&[1, HIDDEN]),
    );
    let y = node(&mut g, OpKind::Add, &[d, x], "y", f32_ty(&[1, HIDDEN]));
    g.outputs = vec![y];
    g
}

#[test]
fn the_ffn_input_site_sparsifies_gate_and_up_together_and_nothing_else() {
    let g = swiglu_ffn();
    let fam = ffn::FfnThreshold::parse(Some("0.5")).unwrap();
    let sites = fam.sites(&g);
    let input = sites
        .iter()
        .find(|s| g.value(s.probe).name == "x")
        .expect("an FFN input site");
    assert_eq!(input.name, "%gate,%up");
    let calib = sets(3, 4);
    let mut approx = g.clone();
    let values: Vec<Tensor> = calib.iter().map(|s| s[0].clone()).collect();
    let cost = crate::cost::CostModel::new(Target::host());
    let probe = Probe {
        values: &values,
        cost: &cost,
    };
    let cands = fam.candidates(&g, input, &probe);
    assert_eq!(cands.len(), 1);
    fam.apply(&mut approx, &cands[0]);
    kiln_ir::verify(&approx).unwrap();
    let shrink = approx
        .nodes
        .iter()
        .find(|n| n.op == OpKind::Shrink)
        .unwrap();
    let sparse = shrink.outputs[0];
    let readers: Vec<&str> = approx
        .nodes
        .iter()
        .filter(|n| n.inputs.contains(&Some(sparse)))
        .map(|n| approx.value(n.outputs[0]).name.as_str())
        .collect();
    assert_eq!(readers, ["gate", "up"]);
    // The residual sum still reads the input whole.
    let x = g.inputs[0];
    let y = approx
        .nodes
        .iter()
        .find(|n| approx.value(n.outputs[0]).name == "y")
        .unwrap();
    assert_eq!(y.inputs[1], Some(x));
    // Half the input is zeroed: the output moves, and equals the graph run on that input.
    let t = cands[0].values[1] as f32;
    let xin = calib[0][0].clone();
    let zeroed = Tensor::from_vec(
        xin.shape().to_vec(),
        xin.as_slice::<f32>()
            .unwrap()
            .iter()
            .map(|&v| if v.abs() <= t { 0.0 } else { v })
            .collect(),
    );
    let got = kiln_ir::run(&approx, vec![xin.clone()]).unwrap();
    let exact = kiln_ir::run(&g, vec![xin.clone()]).unwrap();
    assert_ne!(got, exact);
    // Reference: gate/up on the zeroed input, the residual on the whole one.
    let mut by_hand = g.clone();
    let xz = by_hand.add_input("xz", f32_ty(&[1, HIDDEN]));
    for n in by_hand.nodes.iter_mut() {
        if matches!(n.op, OpKind::MatMul) && n.inputs[0] == Some(x) {
            n.inputs[0] = Some(xz);
        }
    }
    let want = kiln_ir::run(&by_hand, vec![xin, zeroed]).unwrap();
    assert_eq!(got, want);
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
    // Enough sets that a threshold on the 16-wide FFN input is calibrated on more than a
    // handful of values (the unseen-input check below draws 8 more).
    let calib = Calibration::split(sets(1, 24), "test", true);
    assert_eq!((calib.calibrate.len(), calib.held_out.len()), (16, 8));
    let (approx, report) = approximate(
        &g,
        &request("ffn-threshold", budget),
        &calib,
        &Interpreter,
        Target::host(),
    )
    .unwrap();
    assert!(!report.accepted.is_empty(), "{report}");
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
    // The graph carries its report, and the text form keeps it.
    assert_eq!(recorded_report(&approx), Some(report.to_string().as_str()));
    let back = kiln_ir::text::parse(&kiln_ir::text::print(&approx)).unwrap();
    assert_eq!(recorded_report(&back), recorded_report(&approx));
    assert_eq!(recorded_report(&g), None);
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
    for p in [
        "ffn-threshold=1.5",
        "ffn-threshold=0",
        "ffn-threshold=abc",
        "ffn-topk=0",
        "ffn-topk=1.5",
        "ffn-topk=-0.1",
        "ffn-topk=abc",
        "ffn-topk=NaN",
        "attn-threshold=1",
        "attn-threshold=x",
    ] {
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

/// The `ffn-topk` rewrite keeps, per row, exactly the k entries of largest magnitude of the
/// down-projection input (checked on the interpreter with the masked value as an output).
#[test]
fn topk_keeps_the_k_largest_magnitudes_of_every_row() {
    let rows = 5;
    let g = gelu_ffn_rows(rows);
    let fam = topk::FfnTopK::parse(Some("0.25")).unwrap();
    let sites = fam.sites(&g);
    assert_eq!(sites.len(), 1);
    let k = topk::kept(0.25, FFN);
    assert_eq!(k, FFN / 4);
    let c = Candidate {
        family: topk::TOPK,
        site: sites[0].clone(),
        params: String::new(),
        values: vec![0.25, k as f64],
        saving: 1.0,
    };
    let mut approx = g.clone();
    fam.apply(&mut approx, &c);
    kiln_ir::verify(&approx).unwrap();
    // The masked activation: the down-projection's new input.
    let down = approx
        .nodes
        .iter()
        .find(|n| n.op == OpKind::MatMul && approx.value(n.outputs[0]).name == "down")
        .unwrap();
    let masked = down.inputs[0].unwrap();
    let h = sites[0].probe;
    approx.outputs.extend([h, masked]);
    for s in sets_rows(5, 3, rows) {
        let out = kiln_ir::run(&approx, s).unwrap();
        let (h, m) = (out[1].to_f64s(), out[2].to_f64s());
        for r in 0..rows {
            let (hr, mr) = (&h[r * FFN..(r + 1) * FFN], &m[r * FFN..(r + 1) * FFN]);
            let mut mags: Vec<f64> = hr.iter().map(|x| x.abs()).collect();
            mags.sort_by(|a, b| b.total_cmp(a));
            let kth = mags[k - 1];
            assert_eq!(mr.iter().filter(|&&x| x != 0.0).count(), k, "row {r}");
            for (x, y) in hr.iter().zip(mr) {
                let want = if x.abs() >= kth { *x } else { 0.0 };
                assert_eq!(*y, want, "row {r}");
            }
        }
    }
}

#[test]
fn topk_tiny_budget_is_refused_and_generous_budget_holds_on_unseen_inputs() {
    // One row (a decode step; with more, a neuron is skipped only when it is outside the
    // top k of every row of its block), widths at which the mask costs less than it saves.
    let (rows, hidden, ffn) = (1, 256, 1024);
    let g = gelu_ffn_dims(rows, hidden, ffn);
    let calib = Calibration::split(sets_dims(11, 6, rows, hidden), "test", true);
    let r = approximate(
        &g,
        &request("ffn-topk=0.3", 1e-9),
        &calib,
        &Interpreter,
        Target::host(),
    );
    match r {
        Err(ApproxError::Refused { why, .. }) => assert!(why.contains("fits the budget"), "{why}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    let budget = 0.3;
    let (approx, report) = approximate(
        &g,
        &request("ffn-topk", budget),
        &calib,
        &Interpreter,
        Target::host(),
    )
    .unwrap();
    assert_eq!(report.accepted.len(), 1, "{report}");
    assert_eq!(report.accepted[0].candidate.family, topk::TOPK);
    assert!(report.calibration_error > 0.0 && report.calibration_error <= budget);
    assert!(report.held_out_error.unwrap() <= budget);
    assert!(approx.nodes.iter().any(|n| n.op == OpKind::TopK));
    let names = vec!["y".to_string()];
    for s in sets_dims(1234, 8, rows, hidden) {
        let want = kiln_ir::run(&g, s.clone()).unwrap();
        let got = kiln_ir::run(&approx, s).unwrap();
        let e = measure(Metric::RelL2, &got, &want, &names).unwrap();
        assert!(e <= budget, "unseen error {e} over budget {budget}");
    }
    // The inspect listing finds the masked input as a sparse-input site.
    assert_eq!(ffn::sparse_input_sites(&approx).len(), 1);
}

/// A decode-step attention layer: `x[1, 1, 256]` → q/k/v projections → `[1, 4, 1, 64]` heads
/// → `attention` → back to `[1, 1, 256]` → output projection, plus the residual.
fn attention_layer() -> Graph {
    let (d, heads, hd) = (256usize, 4usize, 64usize);
    let mut rng = Rng::new(21);
    let mut g = Graph::new("attn_layer");
    let x = g.add_input("x", f32_ty(&[1, 1, d]));
    let split = g.add_constant(
        "split",
        Tensor::from_vec(vec![4], vec![1i64, 1, heads as i64, hd as i64]),
    );
    let merge = g.add_constant("merge", Tensor::from_vec(vec![3], vec![1i64, 1, d as i64]));
    let mut head = |g: &mut Graph, name: &str| {
        let w = g.add_constant(&format!("w{name}"), weights(&mut rng, d, d));
        let p = node(g, OpKind::MatMul, &[x, w], name, f32_ty(&[1, 1, d]));
        let r = node(
            g,
            OpKind::Reshape,
            &[p, split],
            &format!("{name}_r"),
            f32_ty(&[1, 1, heads, hd]),
        );
        crate::testutil::node_with(
            g,
            OpKind::Transpose,
            Attrs::new().with("perm", Attr::Ints(vec![0, 2, 1, 3])),
            &[r],
            &format!("{name}_t"),
            f32_ty(&[1, heads, 1, hd]),
        )
    };
    let (q, k, v) = (head(&mut g, "q"), head(&mut g, "k"), head(&mut g, "v"));
    let a = node(
        &mut g,
        OpKind::Attention,
        &[q, k, v],
        "a",
        f32_ty(&[1, heads, 1, hd]),
    );
    let t = crate::testutil::node_with(
        &mut g,
        OpKind::Transpose,
        Attrs::new().with("perm", Attr::Ints(vec![0, 2, 1, 3])),
        &[a],
        "a_t",
        f32_ty(&[1, 1, heads, hd]),
    );
    let m = node(
        &mut g,
        OpKind::Reshape,
        &[t, merge],
        "a_m",
        f32_ty(&[1, 1, d]),
    );
    let wo = g.add_constant("wo", weights(&mut rng, d, d));
    let o = node(&mut g, OpKind::MatMul, &[m, wo], "o", f32_ty(&[1, 1, d]));
    let y = node(&mut g, OpKind::Add, &[o, x], "y", f32_ty(&[1, 1, d]));
    g.outputs = vec![y];
    g
}

fn attention_sets(seed: u64, n: usize) -> Vec<Vec<Tensor>> {
    sets_dims(seed, n, 1, 256)
        .into_iter()
        .map(|s| vec![s[0].clone().reshaped(vec![1, 1, 256]).unwrap()])
        .collect()
}

#[test]
fn attn_threshold_finds_the_qkv_input_and_the_output_projection_input() {
    let g = attention_layer();
    let sites = attn::AttnThreshold::parse(None).unwrap().sites(&g);
    let probes: Vec<&str> = sites
        .iter()
        .map(|s| g.value(s.probe).name.as_str())
        .collect();
    assert_eq!(probes, ["x", "a_m"], "{sites:?}");
    assert_eq!(sites[0].name, "%q,%k,%v");
    assert_eq!(sites[1].name, "%o");
    // An FFN has no attention site.
    assert!(attn::AttnThreshold::parse(None)
        .unwrap()
        .sites(&gelu_ffn())
        .is_empty());
}

#[test]
fn attn_threshold_budget_is_enforced_and_holds_on_unseen_inputs() {
    let g = attention_layer();
    let calib = Calibration::split(attention_sets(5, 6), "test", true);
    match approximate(
        &g,
        &request("attn-threshold=0.5", 1e-9),
        &calib,
        &Interpreter,
        Target::host(),
    ) {
        Err(ApproxError::Refused { why, .. }) => assert!(why.contains("fits the budget"), "{why}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    let budget = 0.3;
    let (approx, report) = approximate(
        &g,
        &request("attn-threshold", budget),
        &calib,
        &Interpreter,
        Target::host(),
    )
    .unwrap();
    assert_eq!(report.accepted.len(), 2, "{report}");
    kiln_ir::verify(&approx).unwrap();
    // One shrink per site; q, k and v read the same one.
    let shrinks: Vec<&kiln_ir::Node> = approx
        .nodes
        .iter()
        .filter(|n| n.op == OpKind::Shrink)
        .collect();
    assert_eq!(shrinks.len(), 2);
    let qkv_in: Vec<_> = approx
        .nodes
        .iter()
        .filter(|n| {
            n.op == OpKind::MatMul
                && ["q", "k", "v"].contains(&approx.value(n.outputs[0]).name.as_str())
        })
        .map(|n| n.inputs[0])
        .collect();
    assert_eq!(qkv_in.len(), 3);
    assert!(qkv_in
        .iter()
        .all(|&i| i == qkv_in[0] && i == Some(shrinks[0].outputs[0])));
    assert!(report.held_out_error.unwrap() <= budget);
    let names = vec!["y".to_string()];
    for s in attention_sets(4321, 6) {
        let want = kiln_ir::run(&g, s.clone()).unwrap();
        let got = kiln_ir::run(&approx, s).unwrap();
        let e = measure(Metric::RelL2, &got, &want, &names).unwrap();
        assert!(e <= budget, "unseen error {e} over budget {budget}");
    }
}
