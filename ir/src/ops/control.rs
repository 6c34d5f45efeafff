//! The control op family (if): ops whose attributes hold subgraphs. Shape rules and
//! reference semantics side by side.
//!
//! `if(cond, captures...) {then_branch, else_branch}`: each branch is a graph whose inputs
//! are the captures, in order; the op's outputs are the chosen branch's outputs.

use super::{arg, not_in_family, Fact};
use crate::{Attrs, Dim, Graph, OpKind, Shape, Tensor, TensorType};

/// Shape rule of the control ops.
pub fn infer(op: OpKind, attrs: &Attrs, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>, String> {
    match op {
        OpKind::If => {
            let cond = arg(inputs, 0)?;
            let then_g = attrs.req_graph("then_branch")?;
            let else_g = attrs.req_graph("else_branch")?;
            let then_t = branch_types(&then_g)?;
            let else_t = branch_types(&else_g)?;
            if then_t.len() != else_t.len() {
                return Err(format!(
                    "then_branch has {} outputs, else_branch {}",
                    then_t.len(),
                    else_t.len()
                ));
            }
            // A constant condition picks its branch's types exactly.
            if let Some(c) = cond.konst.as_ref().and_then(|k| truth(k).ok()) {
                let t = if c { then_t } else { else_t };
                return Ok(t.into_iter().map(Fact::of).collect());
            }
            then_t
                .into_iter()
                .zip(else_t)
                .map(|(a, b)| {
                    if a.dtype != b.dtype {
                        return Err(format!("branches give {} and {}", a.dtype, b.dtype));
                    }
                    let shape = match (a.shape.dims(), b.shape.dims()) {
                        (Some(x), Some(y)) if x.len() == y.len() => Shape::new(
                            x.iter()
                                .zip(y)
                                .map(|(p, q)| if p == q { p.clone() } else { Dim::Unknown })
                                .collect(),
                        ),
                        _ => Shape::unknown(),
                    };
                    Ok(Fact::of(TensorType::new(a.dtype, shape)))
                })
                .collect()
        }
        _ => Err(not_in_family(op)),
    }
}

/// Reference semantics of the control ops.
pub fn eval(op: OpKind, attrs: &Attrs, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
    match op {
        OpKind::If => {
            let cond = truth(arg(inputs, 0)?)?;
            let g = attrs.req_graph(if cond { "then_branch" } else { "else_branch" })?;
            let mut captures = Vec::with_capacity(inputs.len().saturating_sub(1));
            for (i, t) in inputs.iter().enumerate().skip(1) {
                captures.push(
                    (*t).ok_or_else(|| format!("capture #{i} is missing"))?
                        .clone(),
                );
            }
            crate::interp::run(&g, captures)
                .map_err(|e| format!("in {} branch: {e}", if cond { "then" } else { "else" }))
        }
        _ => Err(not_in_family(op)),
    }
}

/// The value of a one-element condition.
fn truth(t: &Tensor) -> Result<bool, String> {
    match t.to_f64s().as_slice() {
        [x] => Ok(*x != 0.0),
        v => Err(format!(
            "the condition must be one element, has {}",
            v.len()
        )),
    }
}

/// A branch's output types: inferred where inference succeeds, else as declared.
fn branch_types(g: &Graph) -> Result<Vec<TensorType>, String> {
    let facts = crate::infer::facts(g).ok();
    g.outputs
        .iter()
        .map(|o| {
            let inferred = facts.as_ref().and_then(|f| f.get(o.index())).map(|f| &f.ty);
            let declared = g.values.get(o.index()).map(|v| &v.ty);
            inferred
                .or(declared)
                .cloned()
                .ok_or_else(|| format!("branch `{}` has an undefined output", g.name))
        })
        .collect()
}
