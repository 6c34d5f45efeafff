//! One ONNX node to IR nodes, migrating older opsets to the newest-opset form the IR
//! uses: attributes that later opsets moved to inputs become constant inputs, and
//! Softmax-like ops before opset 13 (which flatten to 2-D at `axis`) are decomposed into
//! `shape`, `flatten`, the op on axis 1 and `reshape`.
//!
//! | op | attribute moved to an input | before opset |
//! |----|-----------------------------|--------------|
//! | Squeeze, Unsqueeze | `axes` | 13 |
//! | ReduceSum | `axes` | 13 |
//! | other Reduce* | `axes` | 18 |
//! | Split | `split` | 13 |
//! | Slice | `starts`, `ends`, `axes` | 10 |
//! | Pad | `pads` (`paddings` in opset 1), `value` | 11 |
//! | Clip | `min`, `max` | 11 |
//! | TopK | `k` | 10 |
//! | Dropout | `ratio` | 12 |

use super::attrs;
use super::lower::{Ctx, LGraph, LNode};
use super::proto::{attr_type, NodeProto};
use super::OnnxError;
use kiln_ir::{Attr, Attrs, OpKind, Tensor};
use std::sync::Arc;

/// Converts node `n` (whose outputs are already named `outputs`, whose lowered graph
/// attributes are `subgraphs` and whose branches capture `captures`) and appends the
/// resulting IR nodes to `out`.
pub(crate) fn convert_node(
    n: &NodeProto,
    outputs: Vec<String>,
    subgraphs: Vec<(String, LGraph)>,
    captures: Vec<String>,
    ctx: &mut Ctx<'_>,
    out: &mut Vec<LNode>,
) -> Result<(), OnnxError> {
    let node_label = if n.name.is_empty() {
        outputs.first().map(|o| format!("%{o}")).unwrap_or_default()
    } else {
        n.name.clone()
    };
    let err = |msg: String| OnnxError::Node {
        node: node_label.clone(),
        op: n.op_type.clone(),
        msg,
    };
    let op = OpKind::from_onnx(&n.op_type).ok_or_else(|| err("not a supported ONNX op".into()))?;
    if op == OpKind::Constant {
        let value = constant_value(n, &node_label, ctx)?;
        out.push(LNode {
            op,
            attrs: Attrs::new().with("value", Attr::Tensor(Arc::new(value))),
            inputs: vec![],
            outputs,
            name: n.name.clone(),
            subgraphs: vec![],
        });
        return Ok(());
    }
    let mut attrs = Attrs::new();
    for a in &n.attribute {
        if attrs::kind(a) == attr_type::GRAPH {
            continue;
        }
        attrs.set(
            &a.name,
            attrs::convert(&n.op_type, &node_label, a, ctx.base_dir)?,
        );
    }
    let mut inputs: Vec<Option<String>> = n
        .input
        .iter()
        .map(|s| (!s.is_empty()).then(|| s.clone()))
        .collect();
    if matches!(op, OpKind::Loop | OpKind::Scan) {
        if op == OpKind::Scan && ctx.opset < 9 {
            return Err(err(
                "Scan before opset 9 (with a batch axis and sequence_lens) is not supported".into(),
            ));
        }
        // Loop's optional trip count and condition keep their places.
        if op == OpKind::Loop {
            inputs.resize(inputs.len().max(2), None);
        }
        attrs.set("num_captures", Attr::Int(captures.len() as i64));
    }
    inputs.extend(captures.into_iter().map(Some));
    let mut m = Migration {
        ctx,
        out,
        base: node_label.trim_start_matches('%').to_string(),
    };
    let opset = m.ctx.opset;
    use OpKind::*;
    // Before opset 18, a Split without sizes splits equally into as many outputs as the
    // node names; the IR says so with `num_outputs`.
    if op == Split
        && opset < 18
        && attrs.get("split").is_none()
        && attrs.get("num_outputs").is_none()
        && inputs.get(1).is_none_or(|i| i.is_none())
    {
        attrs.set("num_outputs", Attr::Int(outputs.len() as i64));
    }
    match op {
        Squeeze | Unsqueeze if opset < 13 => m.ints_to_input(&mut attrs, &mut inputs, "axes", 1),
        ReduceSum if opset < 13 => m.ints_to_input(&mut attrs, &mut inputs, "axes", 1),
        ReduceMean | ReduceMax | ReduceMin | ReduceProd | ReduceL1 | ReduceL2 | ReduceLogSum
        | ReduceLogSumExp | ReduceSumSquare
            if opset < 18 =>
        {
            m.ints_to_input(&mut attrs, &mut inputs, "axes", 1)
        }
        Split if opset < 13 => m.ints_to_input(&mut attrs, &mut inputs, "split", 1),
        Slice if opset < 10 => {
            for (i, a) in ["starts", "ends", "axes"].into_iter().enumerate() {
                m.ints_to_input(&mut attrs, &mut inputs, a, i + 1);
            }
        }
        TopK if opset < 10 => {
            let k = attrs
                .int("k")
                .map_err(&err)?
                .ok_or_else(|| err("missing attribute `k`".into()))?;
            attrs.0.remove("k");
            let name = m.constant(Tensor::from_vec(vec![1], vec![k]));
            set_input(&mut inputs, 1, name);
        }
        Pad if opset < 11 => {
            let pads = attrs
                .0
                .remove("pads")
                .or_else(|| attrs.0.remove("paddings"));
            match pads {
                Some(Attr::Ints(p)) => {
                    let c = m.constant(Tensor::from_vec(vec![p.len()], p));
                    set_input(&mut inputs, 1, c);
                }
                _ => return Err(err("missing ints attribute `pads`".into())),
            }
            if let Some(v) = attrs.0.remove("value") {
                let Attr::Float(v) = v else {
                    return Err(err("attribute `value` should be a float".into()));
                };
                if v != 0.0 {
                    let c = m.scalar_like(v, &inputs, 0);
                    set_input(&mut inputs, 2, c);
                }
            }
        }
        Clip if opset < 11 => {
            for (i, a) in ["min", "max"].into_iter().enumerate() {
                if let Some(v) = attrs.0.remove(a) {
                    let Attr::Float(v) = v else {
                        return Err(err(format!("attribute `{a}` should be a float")));
                    };
                    let c = m.scalar_like(v, &inputs, 0);
                    set_input(&mut inputs, i + 1, c);
                }
            }
        }
        Dropout if opset < 12 => {
            attrs.0.remove("is_test");
            if let Some(Attr::Float(r)) = attrs.0.remove("ratio") {
                let c = m.constant(Tensor::scalar(r));
                set_input(&mut inputs, 1, c);
            }
        }
        Softmax | LogSoftmax | Hardmax if opset < 13 => {
            // Before opset 13 these flatten the input to 2-D at `axis` (default 1).
            let axis = attrs.int_or("axis", 1).map_err(&err)?;
            let [y] = outputs.as_slice() else {
                return Err(err(format!("expected 1 output, found {}", outputs.len())));
            };
            let x = inputs.first().cloned().flatten();
            let shape = m.ctx.fresh(&format!("{}_shape", m.base));
            let flat = m.ctx.fresh(&format!("{}_flat", m.base));
            let res = m.ctx.fresh(&format!("{}_2d", m.base));
            let part = |op: OpKind, attrs: Attrs, ins: Vec<Option<String>>, out: &str| LNode {
                op,
                attrs,
                inputs: ins,
                outputs: vec![out.to_string()],
                name: n.name.clone(),
                subgraphs: vec![],
            };
            m.out
                .push(part(Shape, Attrs::new(), vec![x.clone()], &shape));
            m.out.push(part(
                Flatten,
                Attrs::new().with("axis", Attr::Int(axis)),
                vec![x],
                &flat,
            ));
            m.out.push(part(
                op,
                Attrs::new().with("axis", Attr::Int(1)),
                vec![Some(flat)],
                &res,
            ));
            m.out
                .push(part(Reshape, Attrs::new(), vec![Some(res), Some(shape)], y));
            return Ok(());
        }
        _ => {}
    }
    out.push(LNode {
        op,
        attrs,
        inputs,
        outputs,
        name: n.name.clone(),
        subgraphs,
    });
    Ok(())
}

/// Puts `name` at operand `i`, padding skipped optional operands with `None`.
fn set_input(inputs: &mut Vec<Option<String>>, i: usize, name: String) {
    if inputs.len() <= i {
        inputs.resize(i + 1, None);
    }
    inputs[i] = Some(name);
}

/// Emits the helper nodes a migration needs, before the migrated node.
struct Migration<'c, 'a> {
    ctx: &'c mut Ctx<'a>,
    out: &'c mut Vec<LNode>,
    /// The migrated node's label, to derive helper value names from.
    base: String,
}

impl Migration<'_, '_> {
    /// Emits a `constant` node and returns its value's name.
    fn constant(&mut self, t: Tensor) -> String {
        let name = self.ctx.fresh(&format!("{}_const", self.base));
        self.out.push(LNode {
            op: OpKind::Constant,
            attrs: Attrs::new().with("value", Attr::Tensor(Arc::new(t))),
            inputs: vec![],
            outputs: vec![name.clone()],
            name: String::new(),
            subgraphs: vec![],
        });
        name
    }

    /// Moves ints attribute `attr`, if present, to constant operand `i`.
    fn ints_to_input(
        &mut self,
        attrs: &mut Attrs,
        inputs: &mut Vec<Option<String>>,
        attr: &str,
        i: usize,
    ) {
        if let Some(Attr::Ints(v)) = attrs.get(attr).cloned() {
            attrs.0.remove(attr);
            let c = self.constant(Tensor::from_vec(vec![v.len()], v));
            set_input(inputs, i, c);
        }
    }

    /// A scalar with value `v` in the dtype of operand `like` (via `cast_like`), for
    /// attributes that were floats whatever the data type.
    fn scalar_like(&mut self, v: f32, inputs: &[Option<String>], like: usize) -> String {
        let c = self.constant(Tensor::scalar(v));
        let Some(Some(x)) = inputs.get(like) else {
            return c;
        };
        let name = self.ctx.fresh(&format!("{}_cast", self.base));
        self.out.push(LNode {
            op: OpKind::CastLike,
            attrs: Attrs::new(),
            inputs: vec![Some(c), Some(x.clone())],
            outputs: vec![name.clone()],
            name: String::new(),
            subgraphs: vec![],
        });
        name
    }
}

/// The tensor of a `Constant` node, from whichever value attribute it has.
fn constant_value(n: &NodeProto, label: &str, ctx: &Ctx<'_>) -> Result<Tensor, OnnxError> {
    let err = |msg: String| OnnxError::Node {
        node: label.to_string(),
        op: n.op_type.clone(),
        msg,
    };
    let Some(a) = n.attribute.first() else {
        return Err(err("has no value attribute".into()));
    };
    if n.attribute.len() != 1 {
        return Err(err(format!(
            "has {} attributes; it needs exactly one value attribute",
            n.attribute.len()
        )));
    }
    match a.name.as_str() {
        "value" => match attrs::convert("Constant", label, a, ctx.base_dir)? {
            Attr::Tensor(t) => Ok(Arc::unwrap_or_clone(t)),
            other => Err(err(format!(
                "attribute `value` should be a tensor, is {}",
                other.kind()
            ))),
        },
        "value_float" => Ok(Tensor::scalar(a.f)),
        "value_floats" => Ok(Tensor::from_vec(vec![a.floats.len()], a.floats.clone())),
        "value_int" => Ok(Tensor::scalar(a.i)),
        "value_ints" => Ok(Tensor::from_vec(vec![a.ints.len()], a.ints.clone())),
        "sparse_value" => Err(err("sparse constants are not supported".into())),
        "value_string" | "value_strings" => Err(OnnxError::UnsupportedDtype {
            what: format!("constant `{label}`"),
            code: 8,
        }),
        other => Err(err(format!("unknown value attribute `{other}`"))),
    }
}
