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
        let label = infer::node_label(g, node);
        for (k, i) in node.inputs.iter().enumerate() {
            let Some(i) = i else { continue };
            if i.index() >= n {
                return bad(
                    label,
                    format!("input #{k} refers to value id {} out of range", i.0),
                );
            }
            if !defined[i.index()] {
                return bad(
                    label,
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
                    label,
                    format!("output refers to value id {} out of range", o.0),
                );
            }
            if std::mem::replace(&mut defined[o.index()], true) {
                return bad(label, format!("`%{}` is defined twice", g.value(o).name));
            }
        }
        let arity = node.op.arity();
        if node.inputs.len() > arity.max {
            return bad(
                label,
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
                label,
                format!(
                    "{} needs at least {} inputs; input #{k} is missing",
                    node.op.name(),
                    arity.min
                ),
            );
        }
        if node.op == OpKind::Constant && node.attrs.tensor("value").ok().flatten().is_none() {
            return bad(label, "constant without a tensor `value` attribute".into());
        }
        // A subgraph (a branch, a loop body) is a closed graph with the same invariants.
        for (name, a) in &node.attrs.0 {
            if let Attr::Graph(sub) = a {
                verify(sub).map_err(|e| VerifyError {
                    node: format!("{label}, in {name} `@{}` at {}", sub.name, e.node),
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
    infer::facts(g).map_err(|e| VerifyError {
        node: e.node.clone(),
        msg: e.to_string(),
    })?;
    Ok(())
}
