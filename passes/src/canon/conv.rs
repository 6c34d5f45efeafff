//! `fuse_conv_epilogue`: an f32 `conv` followed by its activation (`relu`, `silu`) and/or a
//! residual `add` of the conv's own output shape becomes one `fused_conv(x, w, bias,
//! residual)`, which the CPU runs with the activation and the add in the GEMM's epilogue
//! while the output tile is in cache. Runs after the e-graph, so BatchNorm is already folded
//! into the conv's weight and bias. Each interior value (the conv's output, the activation's)
//! must have no other user, so nothing is computed twice.

use super::{run_matches, same_dim, Fusion, Matcher, NewNode, Operand};
use crate::{Pass, PassError, PassStats};
use kiln_ir::{Attr, DType, Graph, OpKind, ValueId};

/// Fuses a conv's activation and residual add into a `fused_conv`.
#[derive(Clone, Copy, Debug, Default)]
pub struct FuseConvEpilogue;

const NAME: &str = "fuse_conv_epilogue";

impl Pass for FuseConvEpilogue {
    fn name(&self) -> &'static str {
        NAME
    }

    fn run(&self, g: &mut Graph) -> Result<PassStats, PassError> {
        run_matches(g, NAME, find)
    }
}

/// The `fused_conv` activation name of an activation node, if the epilogue has it.
fn activation(op: OpKind) -> Option<&'static str> {
    match op {
        OpKind::Relu => Some("relu"),
        OpKind::Silu => Some("silu"),
        _ => None,
    }
}

/// A match rooted at node `i`: an `add` of a residual and an (activated) conv, or an
/// activation of a conv that no `add` takes (that add is the root of its own match).
fn find(m: &Matcher, i: usize) -> Option<Fusion> {
    let root = &m.g.nodes[i];
    let (conv_at, act_at, act, residual) = if root.op == OpKind::Add {
        let mut found = None;
        for (r, y) in Matcher::operands(root)? {
            let (at, n) = m.def(y)?;
            let (conv_at, act_at, act) = match activation(n.op) {
                Some(a) => (
                    m.def_op(Matcher::input(n, 0)?, OpKind::Conv)?.0,
                    Some(at),
                    a,
                ),
                None if n.op == OpKind::Conv => (at, None, "none"),
                None => continue,
            };
            // The residual must live on after the fusion: not the conv's own output.
            if same_shape(m, r, y) && m.g.nodes[conv_at].outputs[0] != r {
                found = Some((conv_at, act_at, act, Some(r)));
                break;
            }
        }
        found?
    } else {
        let act = activation(root.op)?;
        let (conv_at, _) = m.def_op(Matcher::input(root, 0)?, OpKind::Conv)?;
        // Leave it to the add's match when the activation feeds one that fuses.
        if let Some((_, user)) = m.sole_user(root.outputs[0]) {
            if user.op == OpKind::Add
                && Matcher::operands(user).is_some_and(|ops| {
                    ops.iter()
                        .any(|&(r, y)| y == root.outputs[0] && same_shape(m, r, y))
                })
            {
                return None;
            }
        }
        (conv_at, Some(i), act, None)
    };
    let conv = &m.g.nodes[conv_at];
    if conv.outputs.len() != 1 || m.fact(conv.outputs[0]).ty.dtype != DType::F32 {
        return None;
    }
    let mut interior = vec![conv_at];
    interior.extend(act_at);
    if residual.is_some() {
        interior.push(i);
    }
    if !m.closed(i, &interior) {
        return None;
    }
    let mut attrs = conv.attrs.clone();
    attrs.0.remove(super::FUSED_FROM);
    attrs.set("activation", Attr::Str(act.into()));
    let mut inputs: Vec<Option<Operand>> = (0..3)
        .map(|k| Matcher::input(conv, k).map(Operand::Value))
        .collect();
    inputs.push(residual.map(Operand::Value));
    while inputs.last().is_some_and(Option::is_none) {
        inputs.pop();
    }
    Some(Fusion {
        root: i,
        interior,
        nodes: vec![NewNode {
            op: OpKind::FusedConv,
            attrs,
            inputs,
            name: "conv".into(),
        }],
        counter: "conv_epilogue_fused",
    })
}

/// Whether `r` and `y` have the same known shape (so the residual is added elementwise).
fn same_shape(m: &Matcher, r: ValueId, y: ValueId) -> bool {
    match (m.dims(r), m.dims(y)) {
        (Some(a), Some(b)) => a.len() == b.len() && a.iter().zip(b).all(|(x, z)| same_dim(x, z)),
        _ => false,
    }
}
