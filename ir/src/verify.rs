//! The verifier: checks the graph invariants that every pass must keep (single definition,
//! topological order, unique names, consistent types). A failure is a compiler bug or a
//! malformed input, reported with the node it concerns.

use crate::{infer, Attr, Graph, OpKind};
use std::collections::HashSet;

/// A broken invariant.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("verifier: at {node}: {msg}")]
pub struct VerifyError {
    /// The node (or value) concerned.
    pub node: String,
    /// What is wrong.
    pub msg: String,
}

/// Checks every invariant of `g`, including that its types agree with shape inference.
pub fn verify(g: &Graph) -> Result<(), VerifyError> {
    check_structure(g)?;
    infer::facts(g).map_err(inference_failed)?;
    Ok(())
}

/// [`verify`], then writes the inferred types into `g`'s values ([`infer::infer_types`]),
/// with shape inference run once for both: what the pass manager does after every pass
/// that changed the graph.
pub fn verify_and_infer(g: &mut Graph) -> Result<(), VerifyError> {
    check_structure(g)?;
    let facts = infer::facts(g).map_err(inference_failed)?;
    for (v, f) in g.values.iter_mut().zip(facts) {
        v.ty = f.ty;
    }
    Ok(())
}

fn inference_failed(e: infer::InferError) -> VerifyError {
    VerifyError {
        node: e.node.clone(),
        msg: e.to_string(),
    }
}

/// Every invariant but the types' agreement with shape inference.
fn check_structure(g: &Graph) -> Result<(), VerifyError> {
    let n = g.values.len();
    let bad = |node: String, msg: String| Err(VerifyError { node, msg });
    let mut defined = vec![false; n];
    let mut names = HashSet::new();
    for v in &g.values {
        if !names.insert(v.name.as_str()) {
            return bad(format!("%{}", v.name), "value name is used twice".into());
        }
    }
    for &i in &g.inputs {
        if i.index() >= n {
            return bad(
                "graph inputs".into(),
                format!("value id {} out of range", i.0),
            );
        }
        if std::mem::replace(&mut defined[i.index()], true) {
            return bad(
                format!("%{}", g.value(i).name),
                "graph input listed twice".into(),
            );
        }
    }
    for node in &g.nodes {
        // Built only for an error (this runs for every node after every pass).
        let label = || infer::node_label(g, node);
        for (k, i) in node.inputs.iter().enumerate() {
            let Some(i) = i else { continue };
            if i.index() >= n {
                return bad(
                    label(),
                    format!("input #{k} refers to value id {} out of range", i.0),
                );
            }
            if !defined[i.index()] {
                return bad(
                    label(),
                    format!(
                        "input #{k} `%{}` is used before it is defined (a cycle, or nodes out of order)",
                        g.value(*i).name
                    ),
                );
            }
        }
        for &o in &node.outputs {
            if o.index() >= n {
                return bad(
                    label(),
                    format!("output refers to value id {} out of range", o.0),
                );
            }
            if std::mem::replace(&mut defined[o.index()], true) {
                return bad(label(), format!("`%{}` is defined twice", g.value(o).name));
            }
        }
        let arity = node.op.arity();
        if node.inputs.len() > arity.max {
            return bad(
                label(),
                format!(
                    "{} takes at most {} inputs, got {}",
                    node.op.name(),
                    arity.max,
                    node.inputs.len()
                ),
            );
        }
        if let Some(k) = (0..arity.min).find(|&k| node.inputs.get(k).is_none_or(Option::is_none)) {
            return bad(
                label(),
                format!(
                    "{} needs at least {} inputs; input #{k} is missing",
                    node.op.name(),
                    arity.min
                ),
            );
        }
        if node.op == OpKind::Constant && node.attrs.tensor("value").ok().flatten().is_none() {
            return bad(
                label(),
                "constant without a tensor `value` attribute".into(),
            );
        }
        // A subgraph (a branch, a loop body) is a closed graph with the same invariants.
        for (name, a) in &node.attrs.0 {
            if let Attr::Graph(sub) = a {
                verify(sub).map_err(|e| VerifyError {
                    node: format!("{}, in {name} `@{}` at {}", label(), sub.name, e.node),
                    msg: e.msg,
                })?;
            }
        }
    }
    for &o in &g.outputs {
        if o.index() >= n || !defined[o.index()] {
            return bad(
                "return".into(),
                format!("graph output id {} is never defined", o.0),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DType, Shape, TensorType};

    fn f32_ty(shape: Shape) -> TensorType {
        TensorType::new(DType::F32, shape)
    }

    /// `relu(x)` over `[2, 3]` whose output type declares nothing about its shape.
    fn relu_graph() -> Graph {
        let mut g = Graph::new("g");
        let x = g.add_input("x", f32_ty(Shape::fixed(&[2, 3])));
        let y = g.add_node(
            OpKind::Relu,
            crate::Attrs::new(),
            vec![Some(x)],
            vec![("y".into(), f32_ty(Shape::unknown()))],
            "r",
        );
        g.outputs = y;
        g
    }

    #[test]
    fn verify_and_infer_checks_like_verify_and_types_like_infer_types() {
        let mut a = relu_graph();
        let mut b = relu_graph();
        verify(&a).unwrap();
        infer::infer_types(&mut a).unwrap();
        verify_and_infer(&mut b).unwrap();
        assert_eq!(b.ty(b.outputs[0]).shape, Shape::fixed(&[2, 3]));
        assert_eq!(
            a.values.iter().map(|v| &v.ty).collect::<Vec<_>>(),
            b.values.iter().map(|v| &v.ty).collect::<Vec<_>>()
        );
        // A broken graph: the same error, and the types are left alone.
        let mut bad = relu_graph();
        bad.values[1].ty = f32_ty(Shape::fixed(&[4]));
        let before = bad.values.clone();
        let want = verify(&bad).unwrap_err();
        assert_eq!(verify_and_infer(&mut bad).unwrap_err(), want);
        assert_eq!(bad.values, before);
    }
}
