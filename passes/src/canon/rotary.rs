//! `fuse_rotary`: rotary position embeddings as exporters write them (GPT-NeoX / LLaMA
//! layout) become the `rotary` op:
//!
//! `x · cos + concat(-x[..., h:], x[..., :h]) · sin` → `rotary(x, cos, sin)`, `h = D / 2`.
//!
//! Guards: both slices read the last axis of the same `x` with step 1, the halves split
//! at exactly `D / 2` (`D` known), the concat is on the last axis with the negated upper
//! half first, and cos/sin do not widen the rotated axis. The products and the sum may
//! come in either operand order.

use super::{run_matches, Fusion, Matcher, NewNode, Operand};
use crate::{Pass, PassError, PassStats};
use kiln_ir::{Attrs, Graph, OpKind, ValueId};

/// Recognises rotary embeddings (`x·cos + rotate_half(x)·sin`).
#[derive(Clone, Copy, Debug, Default)]
pub struct FuseRotary;

const NAME: &str = "fuse_rotary";

impl Pass for FuseRotary {
    fn name(&self) -> &'static str {
        NAME
    }

    fn run(&self, g: &mut Graph) -> Result<PassStats, PassError> {
        run_matches(g, NAME, find)
    }
}

/// `s = x[..., lo:hi]` on the last axis with step 1: returns (x, lo, hi) with `hi`
/// clamped to the axis length `d`.
fn last_axis_slice(m: &Matcher, s: ValueId) -> Option<(usize, ValueId, i64, i64)> {
    let (k, n) = m.def_op(s, OpKind::Slice)?;
    let x = Matcher::input(n, 0)?;
    let rank = m.dims(x)?.len();
    let d = m.dims(x)?.last()?.fixed()? as i64;
    let one = |v: Option<ValueId>| {
        v.and_then(|v| m.ints(v))
            .filter(|a| a.len() == 1)
            .map(|a| a[0])
    };
    let (lo, hi) = (one(Matcher::input(n, 1))?, one(Matcher::input(n, 2))?);
    if !m.is_last_axis(Matcher::input(n, 3), rank) {
        return None;
    }
    if let Some(step) = Matcher::input(n, 4) {
        if one(Some(step))? != 1 {
            return None;
        }
    }
    let clamp = |v: i64| if v < 0 { (v + d).max(0) } else { v.min(d) };
    Some((k, x, clamp(lo), clamp(hi)))
}

/// `r = concat(-x[..., h:], x[..., :h])` on the last axis: returns x and the nodes.
fn rotate_half(m: &Matcher, r: ValueId) -> Option<(ValueId, Vec<usize>)> {
    let (kc, cat) = m.def_op(r, OpKind::Concat)?;
    if cat.inputs.len() != 2 {
        return None;
    }
    let rank = m.dims(r)?.len() as i64;
    let axis = cat.attrs.int("axis").ok()??;
    if axis != -1 && axis != rank - 1 {
        return None;
    }
    let (kn, neg) = m.def_op(Matcher::input(cat, 0)?, OpKind::Neg)?;
    let (k_hi, x, lo1, hi1) = last_axis_slice(m, Matcher::input(neg, 0)?)?;
    let (k_lo, x2, lo2, hi2) = last_axis_slice(m, Matcher::input(cat, 1)?)?;
    let d = m.dims(x)?.last()?.fixed()? as i64;
    let h = d / 2;
    (x == x2 && d % 2 == 0 && (lo1, hi1, lo2, hi2) == (h, d, 0, h))
        .then(|| (x, vec![kc, kn, k_hi, k_lo]))
}

fn find(m: &Matcher, i: usize) -> Option<Fusion> {
    let add = &m.g.nodes[i];
    if add.op != OpKind::Add {
        return None;
    }
    for (a, b) in Matcher::operands(add)? {
        let Some((ka, ma)) = m.def_op(a, OpKind::Mul) else {
            continue;
        };
        let Some((kb, mb)) = m.def_op(b, OpKind::Mul) else {
            continue;
        };
        // b = rotate_half(x) · sin, a = x · cos.
        for (r, sin) in Matcher::operands(mb)? {
            let Some((x, mut interior)) = rotate_half(m, r) else {
                continue;
            };
            let Some((_, cos)) = Matcher::operands(ma)?.into_iter().find(|&(p, _)| p == x) else {
                continue;
            };
            // cos/sin must not widen the rotated axis (rotary rotates x before broadcasting).
            let d = m.dims(x)?.last()?.clone();
            let keeps_axis = |v: ValueId| {
                m.dims(v)
                    .is_some_and(|s| s.last().is_none_or(|l| *l == d || l.fixed() == Some(1)))
            };
            if !keeps_axis(cos) || !keeps_axis(sin) || !m.fact(cos).ty.dtype.is_float() {
                continue;
            }
            interior.extend([ka, kb, i]);
            if !m.closed(i, &interior) {
                continue;
            }
            return Some(Fusion {
                root: i,
                interior,
                nodes: vec![NewNode {
                    op: OpKind::Rotary,
                    attrs: Attrs::new(),
                    inputs: [x, cos, sin].map(|v| Some(Operand::Value(v))).to_vec(),
                    name: "rotary".into(),
                }],
                counter: "rotary_fused",
            });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::canon::testing::*;

    /// `x·cos + rotate_half(x)·sin` on `x: [B, H, S, 8]`, the end of the upper slice as
    /// `i64::MAX` as exporters write it.
    fn rope(b: &mut B, x: ValueId, cos: ValueId, sin: ValueId, split: i64) -> ValueId {
        let (z, h, end, ax, one) = (
            b.i64s(&[0]),
            b.i64s(&[split]),
            b.i64s(&[i64::MAX]),
            b.i64s(&[3]),
            b.i64s(&[1]),
        );
        let lo = b.op(OpKind::Slice, Attrs::new(), &[x, z, h, ax, one]);
        let hi = b.op(OpKind::Slice, Attrs::new(), &[x, h, end, ax, one]);
        let n = b.un(OpKind::Neg, hi);
        let r = b.op(
            OpKind::Concat,
            Attrs::new().with("axis", kiln_ir::Attr::Int(-1)),
            &[n, lo],
        );
        let xc = b.bin(OpKind::Mul, x, cos);
        let rs = b.bin(OpKind::Mul, r, sin);
        b.bin(OpKind::Add, rs, xc)
    }

    #[test]
    fn slice_neg_concat_rope_becomes_rotary_with_broadcast_cos_sin() {
        let mut b = B::new();
        let x = b.input("x", &[-2, 2, -1, 8]);
        let cos = b.input("cos", &[-2, 1, -1, 8]);
        let sin = b.input("sin", &[-2, 1, -1, 8]);
        let y = rope(&mut b, x, cos, sin, 4);
        let g = b.finish(&[y]);
        let after = rewrite_and_compare(&FuseRotary, &g);
        assert_eq!(crate::testutil::ops(&after), vec![OpKind::Rotary]);
        let ins: Vec<_> = after.nodes[0].inputs.iter().flatten().copied().collect();
        assert_eq!(ins, vec![x, cos, sin]);
    }

    #[test]
    fn a_split_off_the_middle_is_not_rotate_half() {
        let mut b = B::new();
        let x = b.input("x", &[1, 2, 3, 8]);
        let cos = b.input("cos", &[3, 8]);
        let sin = b.input("sin", &[3, 8]);
        let y = rope(&mut b, x, cos, sin, 3);
        let g = b.finish(&[y]);
        // The concat has 8 = 5 + 3 elements, but it is not rotate_half.
        let after = rewrite_and_compare(&FuseRotary, &g);
        assert_eq!(count(&after, OpKind::Rotary), 0);
    }
}
