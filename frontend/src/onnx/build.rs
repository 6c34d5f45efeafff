//! Phase two of the import: a lowered graph into a [`GraphBuilder`], which runs each op's
//! shape rule as nodes are added and refines the result with the types the model
//! declares. `If` branches are built in the scope of their node, with the captured outer
//! values' current types as their inputs; `Loop` and `Scan` bodies take their own inputs
//! first, typed from the node's operands (a carried value whose shape changes from one
//! iteration to the next gets unknown dims there).

use super::lower::LGraph;
use super::lower::LNode;
use super::OnnxError;
use kiln_ir::{Attr, DType, Dim, Graph, GraphBuilder, OpKind, Shape, TensorType, ValueId};
use std::collections::HashMap;
use std::sync::Arc;

/// Builds the top-level graph.
pub(crate) fn build_model(lg: &LGraph) -> Result<Graph, OnnxError> {
    let mut seen = std::collections::HashSet::new();
    if let Some(o) = lg.outputs.iter().find(|o| !seen.insert(o.as_str())) {
        return Err(OnnxError::DuplicateOutput(o.clone()));
    }
    build_graph(lg, &lg.inputs)
}

/// Builds a graph whose inputs are `inputs` (a subgraph's are its captures).
fn build_graph(lg: &LGraph, inputs: &[(String, TensorType)]) -> Result<Graph, OnnxError> {
    let mut b = GraphBuilder::new(&lg.name);
    let mut ids: HashMap<&str, ValueId> = HashMap::new();
    let dup = |name: &str, by: String| OnnxError::DuplicateValue {
        name: name.to_string(),
        by,
    };
    for (name, ty) in inputs {
        if ids.insert(name, b.input(name, ty.clone())).is_some() {
            return Err(dup(name, "a second graph input".into()));
        }
    }
    for n in &lg.nodes {
        let lookup = |name: &str| {
            ids.get(name)
                .copied()
                .ok_or_else(|| OnnxError::MissingInput {
                    name: name.to_string(),
                    node: n.name.clone(),
                    op: n.op.onnx_name().to_string(),
                })
        };
        let inputs: Vec<Option<ValueId>> = n
            .inputs
            .iter()
            .map(|i| i.as_deref().map(lookup).transpose())
            .collect::<Result<_, _>>()?;
        let mut attrs = n.attrs.clone();
        for (attr, sg) in &n.subgraphs {
            let caps = sg
                .captures
                .iter()
                .map(|c| Ok((c.clone(), b.fact(lookup(c)?).ty.clone())))
                .collect::<Result<Vec<_>, OnnxError>>()?;
            let sub = if matches!(n.op, OpKind::Loop | OpKind::Scan) {
                let facts: Vec<Option<TensorType>> = inputs
                    .iter()
                    .map(|i| i.map(|i| b.fact(i).ty.clone()))
                    .collect();
                build_body(n, sg, &facts, &caps)?
            } else {
                build_graph(sg, &caps)?
            };
            attrs.set(attr, Attr::Graph(Arc::new(sub)));
        }
        let outs = n
            .outputs
            .iter()
            .map(|o| (o.clone(), lg.declared.get(o).cloned()))
            .collect();
        let ids_out = b.node(n.op, attrs, inputs, outs, &n.name)?;
        for (o, id) in n.outputs.iter().zip(ids_out) {
            if ids.insert(o, id).is_some() {
                return Err(dup(o, format!("node `{}` ({})", n.name, n.op.onnx_name())));
            }
        }
    }
    let outputs = lg
        .outputs
        .iter()
        .map(|o| {
            ids.get(o.as_str())
                .copied()
                .ok_or_else(|| OnnxError::MissingOutput(o.clone()))
        })
        .collect::<Result<_, _>>()?;
    Ok(b.finish(outputs))
}

/// Builds a `Loop` or `Scan` body. Its own inputs are typed from the node's operands
/// (`operands`: their types, captures last) refined by what the model declares; a carried
/// value whose shape the body changes is rebuilt with the dims that differ unknown.
fn build_body(
    n: &LNode,
    sg: &LGraph,
    operands: &[Option<TensorType>],
    caps: &[(String, TensorType)],
) -> Result<Graph, OnnxError> {
    let err = |msg: String| OnnxError::Node {
        node: n.name.clone(),
        op: n.op.onnx_name().to_string(),
        msg,
    };
    let own = operands.len() - caps.len();
    if sg.params.len() != own {
        return Err(err(format!(
            "the body takes {} inputs, but the node passes {own}",
            sg.params.len()
        )));
    }
    let scalar = |d: DType| TensorType::new(d, Shape::new(vec![]));
    let operand = |i: usize| {
        operands[i]
            .clone()
            .ok_or_else(|| err(format!("operand #{i} is omitted, but the body takes it")))
    };
    // (first carried input of the body, first carried output of the body, how many)
    let (mut derived, carried): (Vec<TensorType>, (usize, usize, usize)) = if n.op == OpKind::Loop {
        let mut d = vec![scalar(DType::I64), scalar(DType::Bool)];
        for i in 2..own {
            d.push(operand(i)?);
        }
        (d, (2, 1, own.saturating_sub(2)))
    } else {
        let m = n.attrs.int_or("num_scan_inputs", 0).map_err(&err)?;
        let m = usize::try_from(m)
            .ok()
            .filter(|&m| m <= own)
            .ok_or_else(|| {
                err(format!(
                    "num_scan_inputs is {m}, the node has {own} operands"
                ))
            })?;
        let axes = n
            .attrs
            .ints_or("scan_input_axes", vec![0; m])
            .map_err(&err)?;
        let mut d = vec![];
        for i in 0..own {
            let t = operand(i)?;
            if i < own - m {
                d.push(t);
                continue;
            }
            // A slice: the operand without its scanned axis.
            let axis = axes.get(i - (own - m)).copied().unwrap_or(0);
            let shape = match t.shape.dims() {
                Some(dims) if !dims.is_empty() => {
                    let r = dims.len() as i64;
                    let a = if axis < 0 { axis + r } else { axis };
                    let mut v = dims.to_vec();
                    if (0..r).contains(&a) {
                        v.remove(a as usize);
                        Shape::new(v)
                    } else {
                        Shape::unknown()
                    }
                }
                _ => Shape::unknown(),
            };
            d.push(TensorType::new(t.dtype, shape));
        }
        (d, (0, 0, own - m))
    };
    for (t, (_, declared)) in derived.iter_mut().zip(&sg.params) {
        if let Some(dec) = declared {
            *t = if dec.dtype == t.dtype {
                kiln_ir::infer::refine(dec, t).unwrap_or_else(|_| t.clone())
            } else {
                // A different dtype: kept, so that the shape rule names the mismatch.
                dec.clone()
            };
        }
    }
    // A few rounds reach the fixpoint: each round only turns dims unknown.
    for _ in 0..4 {
        let mut inputs: Vec<(String, TensorType)> = sg
            .params
            .iter()
            .zip(&derived)
            .map(|((name, _), t)| (name.clone(), t.clone()))
            .collect();
        inputs.extend(caps.iter().cloned());
        let g = build_graph(sg, &inputs)?;
        let (first_in, first_out, count) = carried;
        let mut changed = false;
        for c in 0..count {
            let Some(&o) = g.outputs.get(first_out + c) else {
                break;
            };
            let t = &mut derived[first_in + c];
            let joined = join(&t.shape, &g.ty(o).shape);
            if joined != t.shape {
                t.shape = joined;
                changed = true;
            }
        }
        if !changed {
            return Ok(g);
        }
    }
    for c in 0..carried.2 {
        derived[carried.0 + c].shape = Shape::unknown();
    }
    let mut inputs: Vec<(String, TensorType)> = sg
        .params
        .iter()
        .zip(&derived)
        .map(|((name, _), t)| (name.clone(), t.clone()))
        .collect();
    inputs.extend(caps.iter().cloned());
    build_graph(sg, &inputs)
}

/// The shape both of two shapes fit: equal dims kept, differing ones unknown.
fn join(a: &Shape, b: &Shape) -> Shape {
    match (a.dims(), b.dims()) {
        (Some(x), Some(y)) if x.len() == y.len() => Shape::new(
            x.iter()
                .zip(y)
                .map(|(p, q)| if p == q { p.clone() } else { Dim::Unknown })
                .collect(),
        ),
        _ => Shape::unknown(),
    }
}
