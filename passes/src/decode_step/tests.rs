//! `decode_step` on small text-form graphs: the step of each `linear_attention` form
//! (normalised, retention's decay, with a position table) reproduces the full graph row by
//! row ([`check_against_prefix`]; the 64-step runs from C and the JIT are in
//! tests/tests/decode_step.rs); a step graph with a wrong update (no decay, positions held
//! at 0) is caught by the check; what the step cannot express is refused naming the node.

use super::*;

fn parse(src: &str) -> Graph {
    kiln_ir::text::parse(src).unwrap_or_else(|e| panic!("{e}\n{src}"))
}

/// Linear attention (`normalize`, optional retention decay, optional learned positions
/// `table[range(0, S, 1)]` added to the queries) on `q, k, v: [batch, 2, seq, 4]`.
fn model(normalize: bool, decay: bool, positions: bool) -> Graph {
    let mut body = String::new();
    let mut q = "%q";
    if positions {
        body.push_str(
            "  %c0 = constant {value = dense<i64[]> [0]} : i64[]
  %c1 = constant {value = dense<i64[]> [1]} : i64[]
  %c2 = constant {value = dense<i64[]> [2]} : i64[]
  %table = constant {value = dense<f32[16, 4]> [0.1, -0.2, 0.3, 0.4, 0.5, -0.6, 0.7, 0.8, 0.9, 1.0, -1.1, 1.2, 1.3, 1.4, 1.5, -1.6, 0.2, 0.1, 0.0, -0.1, -0.2, -0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, -0.9, -0.8, -0.7, -0.6, 0.25, 0.5, 0.75, 1.0, -0.25, -0.5, -0.75, -1.0, 1.25, 1.5, 1.75, 2.0, 0.3, 0.2, 0.1, 0.0, 0.9, 0.8, -0.7, 0.6, 0.5, 0.4, 0.3, -0.2, 0.1, 0.3, 0.5, 0.7, -0.2, -0.4, -0.6, -0.8]} : f32[16, 4]
  %shape = shape %q : i64[4]
  %n = gather %shape, %c2 {axis = 0} : i64[]
  %r = range %c0, %n, %c1 : i64[seq]
  %pos = gather %table, %r {axis = 0} : f32[seq, 4]
  %qp = add %q, %pos : f32[batch, 2, seq, 4]
",
        );
        q = "%qp";
    }
    let (ld_arg, ld_const) = if decay {
        (
            ", %ld",
            "  %ld = constant {value = dense<f32[2]> [-0.05, -0.3]} : f32[2]\n",
        )
    } else {
        ("", "")
    };
    parse(&format!(
        "func @la(%q: f32[batch, 2, seq, 4], %k: f32[batch, 2, seq, 4], %v: f32[batch, 2, seq, 3]) -> (f32[batch, 2, seq, 3]) {{
{body}{ld_const}  %y = linear_attention {q}, %k, %v{ld_arg} {{causal = 1, chunk = 0, epsilon = 1e-6, normalize = {}}} : f32[batch, 2, seq, 3]
  return %y
}}",
        normalize as i64
    ))
}

#[test]
fn each_form_becomes_its_recurrent_step_and_matches_every_row() {
    for (normalize, decay, positions) in [
        (true, false, false),
        (false, true, false),
        (true, false, true),
        (false, false, false),
    ] {
        let what = format!("normalize {normalize} decay {decay} positions {positions}");
        let full = model(normalize, decay, positions);
        let mut step = full.clone();
        let report = decode_step(&mut step).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(report.seq, "seq", "{what}");
        assert_eq!(report.position, positions, "{what}");
        assert_eq!(report.states.len(), 1, "{what}");
        assert_eq!(report.states[0].decay, decay, "{what}");
        let names: Vec<&str> = report.states[0]
            .tensors
            .iter()
            .map(|t| t.0.as_str())
            .collect();
        let want: &[&str] = if normalize {
            &["state.0.S", "state.0.z"]
        } else {
            &["state.0.S"]
        };
        assert_eq!(names, want, "{what}");
        assert!(
            step.nodes.iter().all(|n| n.op != OpKind::LinearAttention),
            "{what}"
        );
        // Inputs: the model's, then `position`, then the states; outputs: y, then states.
        let ins: Vec<String> = step
            .inputs
            .iter()
            .map(|&i| step.value(i).name.clone())
            .collect();
        let outs: Vec<String> = step
            .outputs
            .iter()
            .map(|&i| step.value(i).name.clone())
            .collect();
        assert_eq!(&ins[..3], ["q", "k", "v"], "{what}");
        assert_eq!(
            ins.contains(&POSITION_INPUT.to_string()),
            positions,
            "{what}"
        );
        assert_eq!(outs[0], "y", "{what}");
        assert_eq!(outs.len(), 1 + want.len(), "{what}");
        let s_dims = step
            .ty(step.inputs[ins.len() - want.len()])
            .shape
            .to_string();
        assert_eq!(s_dims, "[batch, 2, 4, 3]", "{what}");
        assert_eq!(
            step.ty(step.outputs[0]).shape.to_string(),
            "[batch, 2, 1, 3]",
            "{what}"
        );
        let worst =
            check_against_prefix(&full, &step, &report).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(worst <= CHECK_RTOL, "{what}: {worst}");
        assert!(
            step.metadata[DECODE_STEP_METADATA].contains("state.0.S"),
            "{what}"
        );
    }
}

#[test]
fn a_step_with_a_wrong_update_is_caught_by_the_check() {
    // Retention whose step forgets the decay: equal at position 0, then not.
    let full = model(false, true, false);
    let mut step = full.clone();
    let report = decode_step(&mut step).unwrap();
    let mul = step
        .nodes
        .iter()
        .position(|n| n.op == OpKind::Mul && step.value(n.inputs[0].unwrap()).name == "state.0.S")
        .expect("the decay multiply");
    let s_in = step.nodes[mul].inputs[0];
    let out = step.nodes[mul].outputs[0];
    for n in &mut step.nodes {
        for i in &mut n.inputs {
            if *i == Some(out) {
                *i = s_in;
            }
        }
    }
    let e = check_against_prefix(&full, &step, &report).unwrap_err();
    assert!(
        matches!(e, DecodeStepError::Mismatch(_)) && e.to_string().contains("at position 1"),
        "{e}"
    );
    // Positions held at 0: the row at position 1 differs.
    let full = model(true, false, true);
    let mut step = full.clone();
    let report = decode_step(&mut step).unwrap();
    let pos = step
        .inputs
        .iter()
        .position(|&i| step.value(i).name == POSITION_INPUT)
        .unwrap();
    let zero = step.add_constant("zero_position", Tensor::scalar(0i64));
    // add_constant appends its node: it must run before the position's users.
    if let Some(at) = step.nodes.iter().position(|n| n.outputs.contains(&zero)) {
        let n = step.nodes.remove(at);
        step.nodes.insert(0, n);
    }
    let p = step.inputs.remove(pos);
    for n in &mut step.nodes {
        for i in &mut n.inputs {
            if *i == Some(p) {
                *i = Some(zero);
            }
        }
    }
    let mut report = report;
    report.position = false;
    let e = check_against_prefix(&full, &step, &report).unwrap_err();
    assert!(e.to_string().contains("at position 1"), "{e}");
}

#[test]
fn what_the_step_cannot_express_is_refused_naming_the_node() {
    let la = |attrs: &str, ty: &str| {
        parse(&format!(
            "func @la(%q: f32{ty}, %k: f32{ty}, %v: f32{ty}) -> (f32{ty}) {{
  %y = linear_attention %q, %k, %v {{{attrs}}} : f32{ty}
  return %y
}}"
        ))
    };
    let sym = "[batch, 2, seq, 4]";
    let attrs = "causal = 1, chunk = 0, epsilon = 1e-6, normalize = 1";
    let e = decode_step(&mut la(
        "causal = 0, chunk = 0, epsilon = 1e-6, normalize = 1",
        sym,
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("node `y` (linear_attention): non-causal"), "{e}");
    let e = decode_step(&mut la(attrs, "[1, 2, 9, 4]"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("fixed at 9"), "{e}");
    // No linear attention at all.
    let mut g = parse(
        "func @f(%x: f32[batch, seq, 4]) -> (f32[batch, seq, 4]) {
  %y = relu %x : f32[batch, seq, 4]
  return %y
}",
    );
    let e = decode_step(&mut g).unwrap_err();
    assert!(matches!(e, DecodeStepError::NoLinearAttention), "{e}");
    // A running sum over the positions beside the linear attention.
    let mut g = parse(
        "func @f(%q: f32[batch, 2, seq, 4], %k: f32[batch, 2, seq, 4], %v: f32[batch, 2, seq, 4]) -> (f32[batch, 2, seq, 4]) {
  %ax = constant {value = dense<i64[]> [2]} : i64[]
  %c = cumsum %q, %ax : f32[batch, 2, seq, 4]
  %y = linear_attention %c, %k, %v {causal = 1, chunk = 0, epsilon = 1e-6, normalize = 1} : f32[batch, 2, seq, 4]
  return %y
}",
    );
    let e = decode_step(&mut g).unwrap_err().to_string();
    assert!(e.contains("node `c` (cumsum): a running sum"), "{e}");
    // Positions that do not start at 0.
    let mut g = model(true, false, true);
    let src =
        kiln_ir::text::print(&g).replace("%r = range %c0, %n, %c1", "%r = range %c1, %n, %c1");
    let src = src.replace("i64[seq] loc", "i64[?] loc");
    g = kiln_ir::text::parse(&src).unwrap_or_else(|e| panic!("{e}\n{src}"));
    let e = decode_step(&mut g).unwrap_err().to_string();
    assert!(e.contains("node `r` (range)"), "{e}");
}
