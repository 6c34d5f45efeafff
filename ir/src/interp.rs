//! The reference interpreter: runs a graph node by node with each op's `eval`. It defines
//! what a graph means; every backend is compared against it. It checks inputs against the
//! declared (symbolic) types, and each result against its node's declared output type.

use crate::infer::node_label;
use crate::{ops, Dim, Graph, Tensor, TensorType};
use std::collections::HashMap;

/// Why a run failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EvalError {
    /// A graph input was not given.
    #[error("missing input `{name}`: expected {expected}")]
    MissingInput {
        /// Input name.
        name: String,
        /// Its declared type.
        expected: String,
    },
    /// An input was given that the graph does not have.
    #[error("unknown input `{name}`; the graph's inputs are {known}")]
    UnknownInput {
        /// The given name.
        name: String,
        /// The graph's input names.
        known: String,
    },
    /// An input has the wrong dtype or shape.
    #[error("input `{name}`: expected {expected}, got {got}")]
    InputMismatch {
        /// Input name.
        name: String,
        /// Declared type.
        expected: String,
        /// What was passed.
        got: String,
    },
    /// A node failed.
    #[error("node `{node}` ({op}) with inputs {inputs}: {msg}")]
    Node {
        /// Node name (or its first output's).
        node: String,
        /// Op text name.
        op: String,
        /// Input dtypes and shapes.
        inputs: String,
        /// What went wrong.
        msg: String,
    },
}

/// Runs `g` on inputs given by name, returning the outputs in graph order.
pub fn run_named(g: &Graph, inputs: &[(&str, Tensor)]) -> Result<Vec<Tensor>, EvalError> {
    run(g, order_inputs(g, inputs)?)
}

/// Puts inputs given by name into graph order; an unknown or missing name is an error.
/// Every executor (interpreter, JIT) resolves named inputs through this.
pub fn order_inputs(g: &Graph, inputs: &[(&str, Tensor)]) -> Result<Vec<Tensor>, EvalError> {
    let mut by_name: HashMap<&str, &Tensor> = HashMap::new();
    for (n, t) in inputs {
        if !g.inputs.iter().any(|&i| g.value(i).name == *n) {
            return Err(EvalError::UnknownInput {
                name: n.to_string(),
                known: g
                    .inputs
                    .iter()
                    .map(|&i| g.value(i).name.clone())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        by_name.insert(n, t);
    }
    let mut ordered = Vec::with_capacity(g.inputs.len());
    for &i in &g.inputs {
        let v = g.value(i);
        let t = by_name
            .get(v.name.as_str())
            .ok_or_else(|| EvalError::MissingInput {
                name: v.name.clone(),
                expected: v.ty.to_string(),
            })?;
        ordered.push((*t).clone());
    }
    Ok(ordered)
}

/// Runs `g` on inputs given in graph order, returning the outputs in graph order.
pub fn run(g: &Graph, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, EvalError> {
    if inputs.len() != g.inputs.len() {
        let missing = g.inputs.get(inputs.len()).map(|&i| g.value(i));
        return Err(match missing {
            Some(v) => EvalError::MissingInput {
                name: v.name.clone(),
                expected: v.ty.to_string(),
            },
            None => EvalError::UnknownInput {
                name: format!("#{}", g.inputs.len()),
                known: format!("{} inputs", g.inputs.len()),
            },
        });
    }
    let mut env: Vec<Option<Tensor>> = vec![None; g.values.len()];
    let mut bindings: HashMap<String, usize> = HashMap::new();
    for (&id, t) in g.inputs.iter().zip(inputs) {
        let v = g.value(id);
        check_input(&v.name, &v.ty, &t, &mut bindings)?;
        env[id.index()] = Some(t);
    }
    // Free each value after its last use so large models fit.
    let mut last_use: Vec<usize> = vec![usize::MAX; g.values.len()];
    for (ni, n) in g.nodes.iter().enumerate() {
        for i in n.inputs.iter().flatten() {
            last_use[i.index()] = ni;
        }
    }
    for &o in &g.outputs {
        last_use[o.index()] = usize::MAX;
    }
    for (ni, node) in g.nodes.iter().enumerate() {
        let ins: Vec<Option<&Tensor>> = node
            .inputs
            .iter()
            .map(|i| i.and_then(|i| env[i.index()].as_ref()))
            .collect();
        let err = |msg: String| EvalError::Node {
            node: node_label(g, node),
            op: node.op.name().to_string(),
            inputs: describe(&ins),
            msg,
        };
        for (k, i) in node.inputs.iter().enumerate() {
            if let Some(i) = i {
                if env[i.index()].is_none() {
                    return Err(err(format!(
                        "input #{k} `{}` has no value",
                        g.value(*i).name
                    )));
                }
            }
        }
        let mut outs = ops::eval(node.op, &node.attrs, &ins).map_err(err)?;
        // Trailing optional outputs the node does not name are dropped.
        outs.truncate(node.outputs.len());
        if outs.len() != node.outputs.len() {
            return Err(err(format!(
                "produced {} outputs, the node has {}",
                outs.len(),
                node.outputs.len()
            )));
        }
        for (t, &o) in outs.iter().zip(&node.outputs) {
            let ty = g.ty(o);
            if t.dtype() != ty.dtype || !ty.shape.admits(t.shape()) {
                return Err(err(format!(
                    "output `{}` is {}{:?} but its type is {ty}",
                    g.value(o).name,
                    t.dtype(),
                    t.shape()
                )));
            }
        }
        for (t, &o) in outs.into_iter().zip(&node.outputs) {
            env[o.index()] = Some(t);
        }
        for i in node.inputs.iter().flatten() {
            if last_use[i.index()] == ni {
                env[i.index()] = None;
            }
        }
    }
    g.outputs
        .iter()
        .map(|&o| {
            env[o.index()].clone().ok_or_else(|| EvalError::Node {
                node: format!("%{}", g.value(o).name),
                op: "return".into(),
                inputs: String::new(),
                msg: "graph output was never computed".into(),
            })
        })
        .collect()
}

/// Checks a run-time input against its declared type, binding symbolic dims consistently.
pub fn check_input(
    name: &str,
    ty: &TensorType,
    t: &Tensor,
    bindings: &mut HashMap<String, usize>,
) -> Result<(), EvalError> {
    let mismatch = || EvalError::InputMismatch {
        name: name.to_string(),
        expected: ty.to_string(),
        got: format!("{}{:?}", t.dtype(), t.shape()),
    };
    if t.dtype() != ty.dtype || !ty.shape.admits(t.shape()) {
        return Err(mismatch());
    }
    if let Some(dims) = ty.shape.dims() {
        for (d, &n) in dims.iter().zip(t.shape()) {
            if let Dim::Sym(s) = d {
                if *bindings.entry(s.clone()).or_insert(n) != n {
                    return Err(mismatch());
                }
            }
        }
    }
    Ok(())
}

/// Input dtypes and shapes, for error messages: `(f32[2, 3], none)`.
pub fn describe(ins: &[Option<&Tensor>]) -> String {
    let parts: Vec<String> = ins
        .iter()
        .map(|t| {
            t.map(|t| format!("{}{:?}", t.dtype(), t.shape()))
                .unwrap_or_else(|| "none".into())
        })
        .collect();
    format!("({})", parts.join(", "))
}
