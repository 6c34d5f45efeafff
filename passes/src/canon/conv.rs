//! `fuse_conv_epilogue`: an f32 `conv` followed by its activation (`relu`, `silu`,
//! `sigmoid`, `hardswish`, `clip` with constant bounds) and/or a
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

/// A `fused_conv` activation: its name and extra attributes.
type Act = (&'static str, Vec<(&'static str, f32)>);

/// The `fused_conv` activation of activation node `n` (its name and attributes), if the
/// conv routine has it: `relu`, `silu`, `sigmoid`, `hardswish`, or `clip` with constant
/// scalar bounds.
fn activation(m: &Matcher, n: &kiln_ir::Node) -> Option<Act> {
    Some(match n.op {
        OpKind::Relu => ("relu", vec![]),
        OpKind::Silu => ("silu", vec![]),
        OpKind::Sigmoid => ("sigmoid", vec![]),
        OpKind::HardSwish => ("hardswish", vec![]),
        OpKind::Clip => {
            let mut bounds = vec![];
            for (k, name) in [(1, "clip_min"), (2, "clip_max")] {
                if let Some(v) = Matcher::input(n, k) {
                    let t = m.konst(v)?;
                    if t.dtype() != DType::F32 || t.len() > 1 {
                        return None;
                    }
                    if let Some(&b) = t.as_slice::<f32>()?.first() {
                        bounds.push((name, b));
                    }
                }
            }
            ("clip", bounds)
        }
        _ => return None,
    })
}

/// A match rooted at node `i`: an `add` of a residual and an (activated) conv, or an
/// activation of a conv that no `add` takes (that add is the root of its own match).
fn find(m: &Matcher, i: usize) -> Option<Fusion> {
    let root = &m.g.nodes[i];
    // A candidate: the conv, the activation node (if any), the activation, the residual.
    type Candidate = (usize, Option<usize>, Act, Option<ValueId>);
    // Accepted when the conv is a one-output f32 conv and the interior dies with the root.
    let accept = |(conv_at, act_at, act, residual): Candidate| {
        let conv = &m.g.nodes[conv_at];
        if conv.outputs.len() != 1 || m.fact(conv.outputs[0]).ty.dtype != DType::F32 {
            return None;
        }
        let mut interior = vec![conv_at];
        interior.extend(act_at);
        if residual.is_some() {
            interior.push(i);
        }
        m.closed(i, &interior)
            .then_some((conv_at, interior, act, residual))
    };
    let (conv_at, interior, act, residual) = if root.op == OpKind::Add {
        let mut found = None;
        for (r, y) in Matcher::operands(root)? {
            let Some((at, n)) = m.def(y) else { continue };
            let cand = match activation(m, n) {
                Some(a) => match Matcher::input(n, 0).and_then(|v| m.def_op(v, OpKind::Conv)) {
                    Some((c, _)) => (c, Some(at), a),
                    None => continue,
                },
                None if n.op == OpKind::Conv => (at, None, ("none", vec![])),
                None => continue,
            };
            // The residual must live on after the fusion: not the conv's own output.
            if !same_shape(m, r, y) || m.g.nodes[cand.0].outputs[0] == r {
                continue;
            }
            if let Some(f) = accept((cand.0, cand.1, cand.2, Some(r))) {
                found = Some(f);
                break;
            }
        }
        found?
    } else {
        let act = activation(m, root)?;
        let (conv_at, _) = m.def_op(Matcher::input(root, 0)?, OpKind::Conv)?;
        // Leave it to the add's match when the activation feeds one that may fuse it.
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
        accept((conv_at, Some(i), act, None))?
    };
    let conv = &m.g.nodes[conv_at];
    let mut attrs = conv.attrs.clone();
    attrs.0.remove(super::FUSED_FROM);
    let (name, extra) = act;
    attrs.set("activation", Attr::Str(name.into()));
    for (k, v) in extra {
        attrs.set(k, Attr::Float(v));
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::canon::testing::*;
    use kiln_ir::{Attrs, Tensor};

    fn weight(b: &mut B, oc: usize, c: usize) -> ValueId {
        let n = oc * c * 9;
        b.konst(Tensor::from_vec(
            vec![oc, c, 3, 3],
            (0..n)
                .map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.05)
                .collect::<Vec<f32>>(),
        ))
    }

    fn conv(b: &mut B, x: ValueId, w: ValueId) -> ValueId {
        let attrs = Attrs::new().with("pads", Attr::Ints(vec![1, 1, 1, 1]));
        b.op(OpKind::Conv, attrs, &[x, w])
    }

    #[test]
    fn activations_and_residual_adds_join_the_conv() {
        let mut b = B::new();
        let x = b.input("x", &[1, 4, 6, 5]);
        let w = weight(&mut b, 4, 4);
        // silu(conv(x)) + x: one fused_conv with the residual.
        let c1 = conv(&mut b, x, w);
        let s1 = b.un(OpKind::Silu, c1);
        let y1 = b.bin(OpKind::Add, x, s1);
        // clip(conv(y1), 0, 6): the bounds become attributes.
        let c2 = conv(&mut b, y1, w);
        let (lo, hi) = (b.f(0.0), b.f(6.0));
        let y2 = b.op(OpKind::Clip, Attrs::new(), &[c2, lo, hi]);
        // hardswish, sigmoid, relu, and a bare conv + add.
        let c3 = conv(&mut b, y2, w);
        let y3 = b.op(OpKind::HardSwish, Attrs::new(), &[c3]);
        let c4 = conv(&mut b, y3, w);
        let y4 = b.un(OpKind::Sigmoid, c4);
        let c5 = conv(&mut b, y4, w);
        let y5 = b.un(OpKind::Relu, c5);
        let c6 = conv(&mut b, y5, w);
        let y6 = b.bin(OpKind::Add, c6, y5);
        let g = b.finish(&[y6]);
        let after = rewrite_and_compare(&FuseConvEpilogue, &g);
        assert_eq!(count(&after, OpKind::FusedConv), 6);
        assert_eq!(count(&after, OpKind::Conv), 0);
        for op in [
            OpKind::Silu,
            OpKind::Clip,
            OpKind::HardSwish,
            OpKind::Sigmoid,
            OpKind::Relu,
            OpKind::Add,
        ] {
            assert_eq!(count(&after, op), 0, "{op:?}");
        }
    }

    #[test]
    fn a_conv_read_elsewhere_or_a_residual_of_another_shape_stays_apart() {
        let mut b = B::new();
        let x = b.input("x", &[1, 4, 6, 5]);
        let w = weight(&mut b, 4, 4);
        // The conv's output is also a graph output: nothing fuses.
        let c1 = conv(&mut b, x, w);
        let s1 = b.un(OpKind::Relu, c1);
        // A broadcast residual ([4, 1, 1]) is not fused; the relu before it is.
        let c2 = conv(&mut b, s1, w);
        let r2 = b.un(OpKind::Relu, c2);
        let bias = b.konst(Tensor::from_vec(
            vec![4, 1, 1],
            vec![0.5f32, -1.0, 2.0, 0.0],
        ));
        let y2 = b.bin(OpKind::Add, r2, bias);
        // A clip whose bound is not a constant stays a clip.
        let c3 = conv(&mut b, y2, w);
        let lo = b.input("lo", &[]);
        let y3 = b.op(OpKind::Clip, Attrs::new(), &[c3, lo]);
        let g = b.finish(&[c1, y3]);
        let after = rewrite_and_compare(&FuseConvEpilogue, &g);
        assert_eq!(count(&after, OpKind::FusedConv), 1);
        assert_eq!(count(&after, OpKind::Conv), 2);
        assert_eq!(count(&after, OpKind::Add), 1);
        assert_eq!(count(&after, OpKind::Clip), 1);
    }
}
