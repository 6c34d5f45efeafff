//! Shape inference over a whole graph: runs each op's shape rule in topological order,
//! folds small constant computations so shape arithmetic stays exact, and merges the
//! result with the types the graph already declares (refining, never contradicting).

use crate::ops::{self, Fact};
use crate::{Dim, Graph, OpKind, Shape, TensorType};
use std::sync::Arc;

/// Constant inputs up to this many elements are evaluated during inference, so that
/// shape tensors (`[B, S, 12, 64]`) are known exactly.
pub const FOLD_LIMIT_ELEMS: usize = 1 << 16;

/// The memory budget ([`crate::limits::with_budget`]) a fold evaluates under: enough for
/// [`FOLD_LIMIT_ELEMS`] gathered elements (an 8-byte index and an 8-byte element each).
/// A constant_of_shape, expand, tile or range that would make more fails fast and stays
/// a node, evaluated (under the run-time memory limit) only when the graph runs.
pub const FOLD_BUDGET_BYTES: usize = FOLD_LIMIT_ELEMS * 16;

/// Shape inference failed at a node: the types are inconsistent.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("shape inference failed at node `{node}` ({op}) with inputs {inputs}: {msg}")]
pub struct InferError {
    /// The node's name, or its first output's name if it has none.
    pub node: String,
    /// The op's text name.
    pub op: String,
    /// The input types, printed.
    pub inputs: String,
    /// What is wrong.
    pub msg: String,
}

/// Infers every value's facts without changing the graph.
pub fn facts(g: &Graph) -> Result<Vec<Fact>, InferError> {
    let mut facts: Vec<Option<Fact>> = vec![None; g.values.len()];
    for &i in &g.inputs {
        facts[i.index()] = Some(Fact::of(g.ty(i).clone()));
    }
    for node in &g.nodes {
        let ins: Vec<Option<&Fact>> = node
            .inputs
            .iter()
            .map(|i| i.and_then(|i| facts[i.index()].as_ref()))
            .collect();
        // The description is built only for an error (this runs for every node of every
        // verification).
        let err = |msg: String| InferError {
            node: node_label(g, node),
            op: node.op.name().to_string(),
            inputs: describe(&ins),
            msg,
        };
        let mut out = ops::infer(node.op, &node.attrs, &ins).map_err(err)?;
        // Trailing optional outputs the node does not name are dropped.
        out.truncate(node.outputs.len());
        if out.len() != node.outputs.len() {
            return Err(err(format!(
                "the shape rule gave {} outputs, the node has {}",
                out.len(),
                node.outputs.len()
            )));
        }
        fold_small_constants(node.op, &node.attrs, &ins, &mut out);
        for (f, &o) in out.iter_mut().zip(&node.outputs) {
            f.ty = refine(g.ty(o), &f.ty)
                .map_err(|m| err(format!("output `{}`: {m}", g.value(o).name)))?;
            if f.dims.is_none() {
                f.dims = f.value_dims();
            }
        }
        for (f, &o) in out.into_iter().zip(&node.outputs) {
            facts[o.index()] = Some(f);
        }
    }
    Ok(facts
        .into_iter()
        .zip(&g.values)
        .map(|(f, v)| f.unwrap_or_else(|| Fact::of(v.ty.clone())))
        .collect())
}

/// Infers types and writes them into the graph's values.
pub fn infer_types(g: &mut Graph) -> Result<(), InferError> {
    let facts = facts(g)?;
    for (v, f) in g.values.iter_mut().zip(facts) {
        v.ty = f.ty;
    }
    Ok(())
}

/// Evaluates a node whose inputs are all small constants, so its outputs become constants.
pub(crate) fn fold_small_constants(
    op: OpKind,
    attrs: &crate::Attrs,
    ins: &[Option<&Fact>],
    out: &mut [Fact],
) {
    if op.holds_graphs() {
        return;
    }
    // An output the shape rule already knows to be large is not worth evaluating.
    let large = |f: &Fact| {
        f.ty.shape.concrete().is_some_and(|d| {
            d.iter()
                .try_fold(1usize, |a, &b| a.checked_mul(b))
                .is_none_or(|n| n > FOLD_LIMIT_ELEMS)
        })
    };
    if out.iter().any(large) {
        return;
    }
    // Most nodes read a non-constant: known before allocating anything.
    if ins.iter().flatten().any(|f| f.konst.is_none()) {
        return;
    }
    let mut tensors = Vec::with_capacity(ins.len());
    for i in ins {
        match i {
            None => tensors.push(None),
            Some(f) => match &f.konst {
                Some(k) if k.len() <= FOLD_LIMIT_ELEMS => tensors.push(Some(k.as_ref())),
                _ => return,
            },
        }
    }
    let results = crate::limits::with_budget(FOLD_BUDGET_BYTES, || ops::eval(op, attrs, &tensors));
    if let Ok(results) = results {
        for (f, t) in out.iter_mut().zip(results) {
            if t.len() <= FOLD_LIMIT_ELEMS && t.dtype() == f.ty.dtype {
                f.ty.shape = Shape::fixed(t.shape());
                f.konst = Some(Arc::new(t));
            }
        }
    }
}

/// Merges a declared type with an inferred one: the inferred dtype must match; each dim
/// takes whichever side knows more, and two known sizes must agree.
pub fn refine(declared: &TensorType, inferred: &TensorType) -> Result<TensorType, String> {
    refine_with(declared, inferred, false)
}

/// [`refine`] for a type a model declares for a node's output (ONNX value_info, graph
/// outputs): where both sides name a symbol, the inferred one wins. Inferred symbols tie
/// the value to the graph's inputs (`seq` through `Shape → Gather → Range`); a declared
/// one is another tool's name for the same size (ONNX Runtime's shape inference writes
/// fresh `unk__N` names), and keeping it would make equal dims look unrelated, so that
/// broadcasts and row kernels over them could not fuse.
pub fn refine_declared(declared: &TensorType, inferred: &TensorType) -> Result<TensorType, String> {
    refine_with(declared, inferred, true)
}

fn refine_with(
    declared: &TensorType,
    inferred: &TensorType,
    inferred_syms: bool,
) -> Result<TensorType, String> {
    if declared.dtype != inferred.dtype {
        return Err(format!("declared {declared} but inferred {inferred}"));
    }
    let shape = match (declared.shape.dims(), inferred.shape.dims()) {
        (None, _) => inferred.shape.clone(),
        (Some(_), None) => declared.shape.clone(),
        (Some(d), Some(i)) => {
            if d.len() != i.len() {
                return Err(format!("declared {declared} but inferred {inferred}"));
            }
            let mut dims = Vec::with_capacity(d.len());
            for (a, b) in d.iter().zip(i) {
                dims.push(match (a, b) {
                    (Dim::Fixed(x), Dim::Fixed(y)) if x != y => {
                        return Err(format!("declared {declared} but inferred {inferred}"))
                    }
                    (Dim::Fixed(_), _) => a.clone(),
                    (_, Dim::Fixed(_)) => b.clone(),
                    (Dim::Sym(_), Dim::Sym(_)) if inferred_syms => b.clone(),
                    (Dim::Sym(_), _) => a.clone(),
                    (Dim::Unknown, _) => b.clone(),
                });
            }
            Shape::new(dims)
        }
    };
    Ok(TensorType::new(declared.dtype, shape))
}

/// A node's name for messages: its own, or its first output's.
pub(crate) fn node_label(g: &Graph, node: &crate::Node) -> String {
    if !node.name.is_empty() {
        node.name.clone()
    } else if let Some(&o) = node.outputs.first() {
        format!("%{}", g.value(o).name)
    } else {
        "<unnamed>".to_string()
    }
}

fn describe(ins: &[Option<&Fact>]) -> String {
    let parts: Vec<String> = ins
        .iter()
        .map(|f| f.map(|f| f.ty.to_string()).unwrap_or_else(|| "none".into()))
        .collect();
    format!("({})", parts.join(", "))
}
