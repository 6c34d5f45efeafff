//! Reference cases for the layout, index, generate and resize ops: inputs and expected
//! outputs computed with the ONNX reference evaluator (onnx 1.22, opset 21) and stored in
//! `data/ops_reference.txt`. Each case checks `eval` against the expected outputs and
//! that the shape rule, given the inputs as constants and as bare types, admits them.

use kiln_ir::{ops, Attr, Attrs, DType, Fact, OpKind, Shape, Tensor, TensorData, TensorType};
use std::sync::Arc;

const CASES: &str = include_str!("data/ops_reference.txt");

/// Parses `dtype rank dims... : values...`.
fn parse_tensor(s: &str) -> Tensor {
    let (head, vals) = s.split_once(':').expect("tensor has ':'");
    let h: Vec<&str> = head.split_whitespace().collect();
    let dt: DType = h[0].parse().expect("dtype");
    let rank: usize = h[1].parse().expect("rank");
    let shape: Vec<usize> = h[2..2 + rank]
        .iter()
        .map(|x| x.parse().expect("dim"))
        .collect();
    let v: Vec<&str> = vals.split_whitespace().collect();
    let data = if dt.is_float() {
        TensorData::from_f64s(dt, v.iter().map(|x| x.parse::<f64>().expect("float")))
    } else {
        TensorData::from_i64s(dt, v.iter().map(|x| x.parse::<i128>().expect("int") as i64))
    };
    Tensor::new(shape, data).expect("consistent tensor")
}

fn parse_attr(rest: &str) -> (String, Attr) {
    let mut p = rest.splitn(3, ' ');
    let name = p.next().expect("name").to_string();
    let kind = p.next().expect("kind");
    let v = p.next().unwrap_or("");
    let a = match kind {
        "int" => Attr::Int(v.parse().expect("int")),
        "float" => Attr::Float(v.parse().expect("float")),
        "str" => Attr::Str(v.to_string()),
        "ints" => Attr::Ints(
            v.split_whitespace()
                .map(|x| x.parse().expect("int"))
                .collect(),
        ),
        "tensor" => Attr::Tensor(Arc::new(parse_tensor(v))),
        k => panic!("unknown attribute kind {k}"),
    };
    (name, a)
}

fn close(got: &Tensor, want: &Tensor) -> bool {
    got.shape() == want.shape()
        && got.dtype() == want.dtype()
        && got
            .to_f64s()
            .iter()
            .zip(want.to_f64s())
            .all(|(a, b)| (a - b).abs() <= 1e-5 + 1e-5 * b.abs())
}

struct Case {
    name: String,
    op: OpKind,
    attrs: Attrs,
    inputs: Vec<Option<Tensor>>,
    outputs: Vec<Tensor>,
}

fn cases() -> Vec<Case> {
    let mut out = vec![];
    let mut cur: Option<Case> = None;
    for line in CASES.lines().filter(|l| !l.starts_with('#')) {
        let (k, rest) = line.split_once(' ').unwrap_or((line, ""));
        let c = cur.get_or_insert_with(|| Case {
            name: String::new(),
            op: OpKind::Identity,
            attrs: Attrs::new(),
            inputs: vec![],
            outputs: vec![],
        });
        match k {
            "case" => c.name = rest.to_string(),
            "op" => c.op = OpKind::from_onnx(rest).expect("known op"),
            "attr" => {
                let (n, a) = parse_attr(rest);
                c.attrs.set(&n, a);
            }
            "input" if rest == "none" => c.inputs.push(None),
            "input" => c.inputs.push(Some(parse_tensor(rest))),
            "output" => c.outputs.push(parse_tensor(rest)),
            "end" => out.extend(cur.take()),
            k => panic!("unknown line kind {k}"),
        }
    }
    out
}

#[test]
fn eval_matches_onnx_reference() {
    let cases = cases();
    assert!(cases.len() > 50);
    let mut failures = vec![];
    for c in &cases {
        let ins: Vec<Option<&Tensor>> = c.inputs.iter().map(|t| t.as_ref()).collect();
        match ops::eval(c.op, &c.attrs, &ins) {
            Ok(got)
                if got.len() == c.outputs.len()
                    && got.iter().zip(&c.outputs).all(|(g, w)| close(g, w)) => {}
            Ok(got) => failures.push(format!("{}: got {got:?}, want {:?}", c.name, c.outputs)),
            Err(e) => failures.push(format!("{}: {e}", c.name)),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn shape_rules_admit_reference_outputs() {
    let mut failures = vec![];
    for c in &cases() {
        // Once with every input constant (exact shapes), once with the data input as a bare type.
        for with_data_const in [true, false] {
            let facts: Vec<Option<Fact>> = c
                .inputs
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    t.as_ref().map(|t| Fact {
                        ty: TensorType::new(t.dtype(), Shape::fixed(t.shape())),
                        konst: (i > 0 || with_data_const).then(|| Arc::new(t.clone())),
                        dims: None,
                    })
                })
                .collect();
            let refs: Vec<Option<&Fact>> = facts.iter().map(|f| f.as_ref()).collect();
            match ops::infer(c.op, &c.attrs, &refs) {
                Ok(fs)
                    if fs.len() == c.outputs.len()
                        && fs.iter().zip(&c.outputs).all(|(f, w)| {
                            f.ty.dtype == w.dtype() && f.ty.shape.admits(w.shape())
                        }) => {}
                Ok(fs) => failures.push(format!(
                    "{}: inferred {:?}",
                    c.name,
                    fs.iter().map(|f| f.ty.to_string()).collect::<Vec<_>>()
                )),
                Err(e) => failures.push(format!("{}: {e}", c.name)),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
