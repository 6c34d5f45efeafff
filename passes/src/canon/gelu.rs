//! `fuse_gelu`: the two GELU decompositions exporters write become the `gelu` op.
//!
//! - Erf form (BERT, ViT): `0.5 · x · (1 + erf(x / √2))`, the `/ √2` also as `· (1/√2)`.
//! - Tanh form (GPT-2): `0.5 · x · (1 + tanh(√(2/π) · (x + 0.044715 · x³)))`, with `x³`
//!   as `pow(x, 3)` or `x · x · x`; becomes `gelu(x, approximate = "tanh")`.
//!
//! The three-way product `0.5 · x · (1 + …)` is matched in each association
//! (`(x · e) · 0.5`, `(x · 0.5) · e`, `(e · 0.5) · x`) and each operand order. Every
//! constant is checked (within f32 rounding) and every interior value must have no
//! users outside the pattern.

use super::{run_matches, Fusion, Matcher, NewNode, Operand};
use crate::{Pass, PassError, PassStats};
use kiln_ir::{Attr, Attrs, Graph, OpKind, ValueId};

/// Recognises GELU in its erf and tanh forms.
#[derive(Clone, Copy, Debug, Default)]
pub struct FuseGelu;

const NAME: &str = "fuse_gelu";

impl Pass for FuseGelu {
    fn name(&self) -> &'static str {
        NAME
    }

    fn run(&self, g: &mut Graph) -> Result<PassStats, PassError> {
        run_matches(g, NAME, find)
    }
}

const SQRT_2: f64 = std::f64::consts::SQRT_2;
/// √(2/π), the tanh form's inner scale.
const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
const CUBIC: f64 = 0.044715;

fn find(m: &Matcher, i: usize) -> Option<Fusion> {
    let anchor = &m.g.nodes[i];
    let (x, mut interior, tanh) = match anchor.op {
        OpKind::Erf => {
            let (x, k) = erf_argument(m, Matcher::input(anchor, 0)?)?;
            (x, vec![k, i], false)
        }
        OpKind::Tanh => {
            let (x, nodes) = tanh_argument(m, Matcher::input(anchor, 0)?)?;
            let mut v = nodes;
            v.push(i);
            (x, v, true)
        }
        _ => return None,
    };
    // 1 + erf(..) / 1 + tanh(..)
    let (ai, add) = m.sole_user(anchor.outputs[0])?;
    if add.op != OpKind::Add {
        return None;
    }
    let (_, one) = Matcher::operands(add)?
        .into_iter()
        .find(|&(a, _)| a == anchor.outputs[0])?;
    if !m.is_scalar(one, 1.0) {
        return None;
    }
    interior.push(ai);
    let (root, more) = half_product(m, x, add.outputs[0])?;
    interior.extend(more);
    interior.push(root);
    if !m.closed(root, &interior) {
        return None;
    }
    let mut attrs = Attrs::new();
    if tanh {
        attrs.set("approximate", Attr::Str("tanh".into()));
    }
    Some(Fusion {
        root,
        interior,
        nodes: vec![NewNode {
            op: OpKind::Gelu,
            attrs,
            inputs: vec![Some(Operand::Value(x))],
            name: "gelu".into(),
        }],
        counter: if tanh {
            "gelu_tanh_fused"
        } else {
            "gelu_erf_fused"
        },
    })
}

/// `u = x / √2` or `x · (1/√2)`: returns `x` and the node.
fn erf_argument(m: &Matcher, u: ValueId) -> Option<(ValueId, usize)> {
    let (k, n) = m.def(u)?;
    match n.op {
        OpKind::Div => {
            let (x, c) = (Matcher::input(n, 0)?, Matcher::input(n, 1)?);
            m.is_scalar(c, SQRT_2).then_some((x, k))
        }
        OpKind::Mul => Matcher::operands(n)?
            .into_iter()
            .find(|&(_, c)| m.is_scalar(c, 1.0 / SQRT_2))
            .map(|(x, _)| (x, k)),
        _ => None,
    }
}

/// `√(2/π) · (x + 0.044715 · x³)`: returns `x` and the interior nodes.
fn tanh_argument(m: &Matcher, v: ValueId) -> Option<(ValueId, Vec<usize>)> {
    let (k0, scaled) = m.def_op(v, OpKind::Mul)?;
    let (w, _) = Matcher::operands(scaled)?
        .into_iter()
        .find(|&(_, c)| m.is_scalar(c, SQRT_2_OVER_PI))?;
    let (k1, sum) = m.def_op(w, OpKind::Add)?;
    for (x, t) in Matcher::operands(sum)? {
        let Some((k2, term)) = m.def_op(t, OpKind::Mul) else {
            continue;
        };
        let Some((cube, _)) = Matcher::operands(term)?
            .into_iter()
            .find(|&(_, c)| m.is_scalar(c, CUBIC))
        else {
            continue;
        };
        if let Some(cube_nodes) = is_cube(m, cube, x) {
            let mut nodes = vec![k0, k1, k2];
            nodes.extend(cube_nodes);
            return Some((x, nodes));
        }
    }
    None
}

/// `c = pow(x, 3)` or `x · (x · x)` in any association: returns the nodes.
fn is_cube(m: &Matcher, c: ValueId, x: ValueId) -> Option<Vec<usize>> {
    let (k, n) = m.def(c)?;
    match n.op {
        OpKind::Pow => {
            let e = Matcher::input(n, 1)?;
            (Matcher::input(n, 0)? == x && m.is_scalar(e, 3.0)).then(|| vec![k])
        }
        OpKind::Mul => {
            for (a, b) in Matcher::operands(n)? {
                if a != x {
                    continue;
                }
                if let Some((k2, sq)) = m.def_op(b, OpKind::Mul) {
                    if Matcher::input(sq, 0) == Some(x) && Matcher::input(sq, 1) == Some(x) {
                        return Some(vec![k, k2]);
                    }
                }
            }
            None
        }
        _ => None,
    }
}

/// The product `0.5 · x · e` built on `e`: returns the root node and the other nodes.
fn half_product(m: &Matcher, x: ValueId, e: ValueId) -> Option<(usize, Vec<usize>)> {
    let (k1, m1) = m.sole_user(e)?;
    if m1.op != OpKind::Mul {
        return None;
    }
    let (_, other) = Matcher::operands(m1)?.into_iter().find(|&(a, _)| a == e)?;
    if other == x || m.is_scalar(other, 0.5) {
        // (x · e) · 0.5 or (e · 0.5) · x
        let want_last = |v: ValueId| {
            if other == x {
                m.is_scalar(v, 0.5)
            } else {
                v == x
            }
        };
        let (k2, m2) = m.sole_user(m1.outputs[0])?;
        if m2.op != OpKind::Mul {
            return None;
        }
        let (_, last) = Matcher::operands(m2)?
            .into_iter()
            .find(|&(a, _)| a == m1.outputs[0])?;
        return want_last(last).then(|| (k2, vec![k1]));
    }
    // (x · 0.5) · e
    let (kh, half) = m.def_op(other, OpKind::Mul)?;
    Matcher::operands(half)?
        .into_iter()
        .any(|(a, c)| a == x && m.is_scalar(c, 0.5))
        .then(|| (k1, vec![kh]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::canon::testing::*;

    fn erf_gelu(b: &mut B, x: ValueId, assoc: u8) -> ValueId {
        let r2 = b.f(std::f32::consts::SQRT_2);
        let u = b.bin(OpKind::Div, x, r2);
        let e = b.un(OpKind::Erf, u);
        let one = b.f(1.0);
        let e1 = b.bin(OpKind::Add, e, one);
        let half = b.f(0.5);
        match assoc {
            0 => {
                let p = b.bin(OpKind::Mul, x, e1);
                b.bin(OpKind::Mul, p, half)
            }
            1 => {
                let h = b.bin(OpKind::Mul, half, x);
                b.bin(OpKind::Mul, e1, h)
            }
            _ => {
                let p = b.bin(OpKind::Mul, e1, half);
                b.bin(OpKind::Mul, x, p)
            }
        }
    }

    #[test]
    fn erf_gelu_in_every_association_becomes_gelu() {
        for assoc in 0..3 {
            let mut b = B::new();
            let x = b.input("x", &[-1, 16]);
            let y = erf_gelu(&mut b, x, assoc);
            let g = b.finish(&[y]);
            let after = rewrite_and_compare(&FuseGelu, &g);
            assert_eq!(
                crate::testutil::ops(&after),
                vec![OpKind::Gelu],
                "assoc {assoc}"
            );
            assert!(after.nodes[0].attrs.get("approximate").is_none());
        }
    }

    fn tanh_gelu(b: &mut B, x: ValueId, cube_by_pow: bool, coef: f32) -> ValueId {
        let cube = if cube_by_pow {
            let three = b.f(3.0);
            b.bin(OpKind::Pow, x, three)
        } else {
            let sq = b.bin(OpKind::Mul, x, x);
            b.bin(OpKind::Mul, x, sq)
        };
        let c = b.f(coef);
        let t = b.bin(OpKind::Mul, cube, c);
        let s = b.bin(OpKind::Add, x, t);
        let k = b.f(0.797_884_6);
        let v = b.bin(OpKind::Mul, k, s);
        let th = b.un(OpKind::Tanh, v);
        let one = b.f(1.0);
        let e1 = b.bin(OpKind::Add, th, one);
        let half = b.f(0.5);
        let h = b.bin(OpKind::Mul, x, half);
        b.bin(OpKind::Mul, h, e1)
    }

    #[test]
    fn tanh_gelu_with_pow_or_mul_cube_becomes_approximate_gelu() {
        for by_pow in [true, false] {
            let mut b = B::new();
            let x = b.input("x", &[3, 8]);
            let y = tanh_gelu(&mut b, x, by_pow, 0.044715);
            let g = b.finish(&[y]);
            let after = rewrite_and_compare(&FuseGelu, &g);
            assert_eq!(crate::testutil::ops(&after), vec![OpKind::Gelu]);
            assert_eq!(
                after.nodes[0]
                    .attrs
                    .string("approximate")
                    .unwrap()
                    .as_deref(),
                Some("tanh")
            );
        }
    }

    #[test]
    fn wrong_constants_or_shared_interior_values_are_not_gelu() {
        let mut b = B::new();
        let x = b.input("x", &[3, 8]);
        let y = tanh_gelu(&mut b, x, true, 0.05);
        let g = b.finish(&[y]);
        let after = rewrite_and_compare(&FuseGelu, &g);
        assert_eq!(count(&after, OpKind::Gelu), 0);
        // The erf value is also a graph output: fusing would compute it twice.
        let mut b = B::new();
        let x = b.input("x", &[3, 8]);
        let y = erf_gelu(&mut b, x, 0);
        let g0 = b.finish(&[y]);
        let erf = g0
            .nodes
            .iter()
            .find(|n| n.op == OpKind::Erf)
            .unwrap()
            .outputs[0];
        let mut g = g0.clone();
        g.outputs.push(erf);
        let after = rewrite_and_compare(&FuseGelu, &g);
        assert_eq!(count(&after, OpKind::Gelu), 0);
    }
}
