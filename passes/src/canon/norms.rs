//! `fuse_norms`: layer and RMS normalisation written out in primitives become the
//! `layer_norm` and `rms_norm` ops (ONNX LayerNormalization / RMSNormalization semantics,
//! `axis = -1`, `epsilon` from the graph, `stash_type = 1` (f32)).
//!
//! - layer_norm: `d = x - mean(x)`, `(d / sqrt(mean(d²) + ε)) [· γ] [+ β]`, `d²` as
//!   `pow(d, 2)` or `d · d`.
//! - rms_norm (LLaMA exports): `x · (1 / sqrt(mean(x²) + ε)) [· γ]`, the reciprocal as
//!   `div(1, s)` or `reciprocal(s)`, or `x / sqrt(mean(x²) + ε)`.
//!
//! The means must reduce exactly the last axis with `keepdims = 1`. Without `γ` the op
//! gets a constant scale of ones (only when the last dim is known). `γ` and `β` must not
//! widen the result (they broadcast *into* x's shape).

use super::{run_matches, same_dim, Fusion, Matcher, NewNode, Operand};
use crate::{Pass, PassError, PassStats};
use kiln_ir::{Attr, Attrs, DType, Graph, OpKind, Tensor, ValueId};

/// Recognises decomposed layer norms and RMS norms.
#[derive(Clone, Copy, Debug, Default)]
pub struct FuseNorms;

const NAME: &str = "fuse_norms";

impl Pass for FuseNorms {
    fn name(&self) -> &'static str {
        NAME
    }

    fn run(&self, g: &mut Graph) -> Result<PassStats, PassError> {
        run_matches(g, NAME, find)
    }
}

/// `mean(v)` over the last axis with kept dims: returns the reduced value.
fn last_axis_mean(m: &Matcher, v: ValueId) -> Option<(usize, ValueId)> {
    let (k, n) = m.def_op(v, OpKind::ReduceMean)?;
    let x = Matcher::input(n, 0)?;
    let rank = m.dims(x)?.len();
    let keep = n.attrs.int_or("keepdims", 1).ok()? == 1;
    (keep && m.is_last_axis(Matcher::input(n, 1), rank)).then_some((k, x))
}

/// `v = x²` as `pow(x, 2)` or `x · x`: returns x.
fn square(m: &Matcher, v: ValueId) -> Option<(usize, ValueId)> {
    let (k, n) = m.def(v)?;
    match n.op {
        OpKind::Pow if m.is_scalar(Matcher::input(n, 1)?, 2.0) => Some((k, Matcher::input(n, 0)?)),
        OpKind::Mul if Matcher::input(n, 0)? == Matcher::input(n, 1)? => {
            Some((k, Matcher::input(n, 0)?))
        }
        _ => None,
    }
}

/// `s = sqrt(mean(y²) + ε)`: returns (y, ε, nodes).
fn root_mean_square(m: &Matcher, s: ValueId) -> Option<(ValueId, f64, Vec<usize>)> {
    let (ks, sq) = m.def_op(s, OpKind::Sqrt)?;
    let (ka, add) = m.def_op(Matcher::input(sq, 0)?, OpKind::Add)?;
    for (ms, e) in Matcher::operands(add)? {
        let Some(eps) = m.scalar(e) else { continue };
        let Some((km, sqv)) = last_axis_mean(m, ms) else {
            continue;
        };
        let Some((kp, y)) = square(m, sqv) else {
            continue;
        };
        return Some((y, eps, vec![ks, ka, km, kp]));
    }
    None
}

/// `n = x / s` or `x · (1 / s)` or `x · reciprocal(s)` with `s` a root mean square:
/// returns (x, y, ε, nodes) where y is the value squared under the mean.
fn normalised(m: &Matcher, n: ValueId) -> Option<(ValueId, ValueId, f64, Vec<usize>)> {
    let (k, node) = m.def(n)?;
    match node.op {
        OpKind::Div => {
            let (x, s) = (Matcher::input(node, 0)?, Matcher::input(node, 1)?);
            let (y, eps, mut nodes) = root_mean_square(m, s)?;
            nodes.push(k);
            Some((x, y, eps, nodes))
        }
        OpKind::Mul => {
            for (x, r) in Matcher::operands(node)? {
                let Some((kr, rn)) = m.def(r) else { continue };
                let s = match rn.op {
                    OpKind::Reciprocal => Matcher::input(rn, 0),
                    OpKind::Div if m.is_scalar(Matcher::input(rn, 0)?, 1.0) => {
                        Matcher::input(rn, 1)
                    }
                    _ => None,
                };
                let Some((y, eps, mut nodes)) = s.and_then(|s| root_mean_square(m, s)) else {
                    continue;
                };
                nodes.extend([kr, k]);
                return Some((x, y, eps, nodes));
            }
            None
        }
        _ => None,
    }
}

/// True if `p` broadcasts into `x`'s shape without widening it.
fn fits_into(m: &Matcher, p: ValueId, x: ValueId) -> bool {
    let (Some(pd), Some(xd)) = (m.dims(p), m.dims(x)) else {
        return false;
    };
    pd.len() <= xd.len()
        && pd
            .iter()
            .rev()
            .zip(xd.iter().rev())
            .all(|(a, b)| a.fixed() == Some(1) || same_dim(a, b))
}

fn find(m: &Matcher, i: usize) -> Option<Fusion> {
    let node = &m.g.nodes[i];
    if !matches!(node.op, OpKind::Div | OpKind::Mul) {
        return None;
    }
    let n = node.outputs[0];
    let (x, y, eps, mut interior) = normalised(m, n)?;
    // layer_norm if x (and y) is `x0 - mean(x0)`, rms_norm if y is x itself.
    let (kind, input) = if y == x {
        match m.def_op(x, OpKind::Sub).and_then(|(ks, sub)| {
            let x0 = Matcher::input(sub, 0)?;
            let (km, xm) = last_axis_mean(m, Matcher::input(sub, 1)?)?;
            (xm == x0).then_some((ks, km, x0))
        }) {
            Some((ks, km, x0)) => {
                interior.extend([ks, km]);
                (OpKind::LayerNorm, x0)
            }
            None => (OpKind::RmsNorm, x),
        }
    } else {
        return None;
    };
    let dtype = m.fact(input).ty.dtype;
    if !dtype.is_float() {
        return None;
    }
    // Optional affine tail: · γ, then (layer_norm only) + β.
    let mut root = i;
    let mut out = n;
    let mut gamma = None;
    let mut beta = None;
    if let Some((k, mul)) = m.sole_user(out).filter(|(_, u)| u.op == OpKind::Mul) {
        if let Some((_, gm)) = Matcher::operands(mul)?
            .into_iter()
            .find(|&(a, p)| a == out && fits_into(m, p, input))
        {
            gamma = Some(gm);
            interior.push(k);
            root = k;
            out = mul.outputs[0];
        }
    }
    if kind == OpKind::LayerNorm && gamma.is_some() {
        if let Some((k, add)) = m.sole_user(out).filter(|(_, u)| u.op == OpKind::Add) {
            if let Some((_, bt)) = Matcher::operands(add)?
                .into_iter()
                .find(|&(a, p)| a == out && fits_into(m, p, input))
            {
                beta = Some(bt);
                interior.push(k);
                root = k;
            }
        }
    }
    if !m.closed(root, &interior) {
        return None;
    }
    let scale = match gamma {
        Some(gm) => Operand::Value(gm),
        None => {
            let d = m.dims(input)?.last()?.fixed()? as usize;
            let ones = Tensor::from_vec(vec![d], vec![1.0f64; d]).cast(dtype);
            Operand::Const(ones)
        }
    };
    let attrs = Attrs::new()
        .with("axis", Attr::Int(-1))
        .with("epsilon", Attr::Float(eps as f32))
        .with("stash_type", Attr::Int(DType::F32.onnx_code() as i64));
    let mut inputs = vec![Some(Operand::Value(input)), Some(scale)];
    if let Some(b) = beta {
        inputs.push(Some(Operand::Value(b)));
    }
    Some(Fusion {
        root,
        interior,
        nodes: vec![NewNode {
            op: kind,
            attrs,
            inputs,
            name: kind.name().into(),
        }],
        counter: if kind == OpKind::LayerNorm {
            "layer_norm_fused"
        } else {
            "rms_norm_fused"
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::canon::testing::*;

    fn mean_last(b: &mut B, v: ValueId) -> ValueId {
        let axes = b.i64s(&[-1]);
        b.bin(OpKind::ReduceMean, v, axes)
    }

    fn layer_norm(b: &mut B, x: ValueId, pow: bool, affine: bool) -> ValueId {
        let mu = mean_last(b, x);
        let d = b.bin(OpKind::Sub, x, mu);
        let sq = if pow {
            let two = b.f(2.0);
            b.bin(OpKind::Pow, d, two)
        } else {
            b.bin(OpKind::Mul, d, d)
        };
        let var = mean_last(b, sq);
        let eps = b.f(1e-5);
        let ve = b.bin(OpKind::Add, var, eps);
        let s = b.un(OpKind::Sqrt, ve);
        let n = b.bin(OpKind::Div, d, s);
        if !affine {
            return n;
        }
        let gamma = b.input("gamma", &[8]);
        let beta = b.input("beta", &[8]);
        let y = b.bin(OpKind::Mul, gamma, n);
        b.bin(OpKind::Add, y, beta)
    }

    #[test]
    fn decomposed_layer_norm_with_and_without_affine_becomes_layer_norm() {
        for (pow, affine) in [(true, true), (false, true), (true, false)] {
            let mut b = B::new();
            let x = b.input("x", &[-2, -1, 8]);
            let y = layer_norm(&mut b, x, pow, affine);
            let g = b.finish(&[y]);
            let after = rewrite_and_compare(&FuseNorms, &g);
            let ops = crate::testutil::ops(&after);
            assert_eq!(count(&after, OpKind::LayerNorm), 1, "{ops:?}");
            assert_eq!(ops.len(), if affine { 1 } else { 2 }, "{ops:?}");
            let ln = after
                .nodes
                .iter()
                .find(|n| n.op == OpKind::LayerNorm)
                .unwrap();
            assert_eq!(ln.attrs.float("epsilon").unwrap(), Some(1e-5));
            assert_eq!(ln.inputs.len(), if affine { 3 } else { 2 });
        }
    }

    fn rms_norm(b: &mut B, x: ValueId, form: u8) -> ValueId {
        let two = b.f(2.0);
        let sq = b.bin(OpKind::Pow, x, two);
        let ms = mean_last(b, sq);
        let eps = b.f(1e-6);
        let me = b.bin(OpKind::Add, ms, eps);
        let s = b.un(OpKind::Sqrt, me);
        let n = match form {
            0 => {
                let one = b.f(1.0);
                let r = b.bin(OpKind::Div, one, s);
                b.bin(OpKind::Mul, x, r)
            }
            1 => {
                let r = b.un(OpKind::Reciprocal, s);
                b.bin(OpKind::Mul, r, x)
            }
            _ => b.bin(OpKind::Div, x, s),
        };
        let w = b.input("w", &[8]);
        b.bin(OpKind::Mul, w, n)
    }

    #[test]
    fn llama_rms_norm_in_each_reciprocal_form_becomes_rms_norm() {
        for form in 0..3 {
            let mut b = B::new();
            let x = b.input("x", &[-2, -1, 8]);
            let y = rms_norm(&mut b, x, form);
            let g = b.finish(&[y]);
            let after = rewrite_and_compare(&FuseNorms, &g);
            assert_eq!(
                crate::testutil::ops(&after),
                vec![OpKind::RmsNorm],
                "form {form}"
            );
            let n = &after.nodes[0];
            assert_eq!(n.attrs.int("axis").unwrap(), Some(-1));
            assert_eq!(n.attrs.int("stash_type").unwrap(), Some(1));
            assert_eq!(n.attrs.float("epsilon").unwrap(), Some(1e-6));
        }
    }

    #[test]
    fn means_over_other_axes_or_shared_interiors_are_left_alone() {
        // mean over axis 1 is not a norm over the last axis.
        let mut b = B::new();
        let x = b.input("x", &[4, 8]);
        let two = b.f(2.0);
        let sq = b.bin(OpKind::Pow, x, two);
        let axes = b.i64s(&[0]);
        let ms = b.bin(OpKind::ReduceMean, sq, axes);
        let eps = b.f(1e-6);
        let me = b.bin(OpKind::Add, ms, eps);
        let s = b.un(OpKind::Sqrt, me);
        let n = b.bin(OpKind::Div, x, s);
        let g = b.finish(&[n]);
        let after = rewrite_and_compare(&FuseNorms, &g);
        assert_eq!(count(&after, OpKind::RmsNorm), 0);
        // The variance is also an output.
        let mut b = B::new();
        let x = b.input("x", &[4, 8]);
        let y = rms_norm(&mut b, x, 2);
        let g0 = b.finish(&[y]);
        let mut g = g0.clone();
        let var = g
            .nodes
            .iter()
            .find(|n| n.op == OpKind::Sqrt)
            .unwrap()
            .outputs[0];
        g.outputs.push(var);
        let after = rewrite_and_compare(&FuseNorms, &g);
        assert_eq!(count(&after, OpKind::RmsNorm), 0);
    }
}
