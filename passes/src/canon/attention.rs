//! `fuse_attention`: scaled-dot-product attention as exporters write it becomes one
//! `attention(q, k, v, mask?)` op:
//!
//! `matmul(softmax(matmul(q, kᵀ) · c [+ mask]), v)` → `attention(q, k, v, mask, scale = c)`
//!
//! - the scale is `· c` or `/ c` with `c` a scalar constant, or absent (`scale = 1`);
//! - `kᵀ` is `transpose(k, [0, 1, 3, 2])` (then `k` is used directly), or any other
//!   `[B, H, D, T]` value (then a `transpose` to `[B, H, T, D]` is inserted, which
//!   `simplify_ops` composes with the exporter's head transposes);
//! - grouped-query heads: `k` and `v` written as LLaMA's `repeat_kv`
//!   (`reshape(expand(unsqueeze(k, 2), [B, Hkv, g, T, D]), [B, Hkv·g, T, D])`) are
//!   replaced by the un-repeated `[B, Hkv, T, D]` tensors when the head counts and
//!   widths are known to match (the op's kv-head grouping does the repeat);
//! - the mask is whatever the graph adds to the scaled scores (HF's `Where(keep, 0,
//!   finfo.min)` causal and padding masks, with or without a KV cache, where `T` counts
//!   the cached keys). It stays an additive float input, so rows masked with `finfo.min`
//!   keep their finite decomposed semantics; it must not be known to widen the scores.
//!
//! Heads stay split by the exporter's reshape/transpose around the op: q, k, v arrive as
//! `[B, H, S, D]` and the output `[B, H, S, Dv]` goes back through its transpose/reshape.

use super::{run_matches, same_dim, Fusion, Matcher, NewNode, Operand};
use crate::{Pass, PassError, PassStats};
use kiln_ir::{Attr, Attrs, Dim, Graph, OpKind, ValueId};

/// Recognises scaled-dot-product attention.
#[derive(Clone, Copy, Debug, Default)]
pub struct FuseAttention;

const NAME: &str = "fuse_attention";

impl Pass for FuseAttention {
    fn name(&self) -> &'static str {
        NAME
    }

    fn run(&self, g: &mut Graph) -> Result<PassStats, PassError> {
        run_matches(g, NAME, find)
    }
}

fn rank4<'a>(m: &'a Matcher, v: ValueId) -> Option<&'a [Dim]> {
    m.dims(v).filter(|d| d.len() == 4)
}

/// `t = matmul(q, kᵀ)`, `matmul(q, kᵀ) · c` or `matmul(q, kᵀ) / c`: returns the matmul
/// node, the scale and the nodes.
fn scaled_scores(m: &Matcher, t: ValueId) -> Option<(usize, f64, Vec<usize>)> {
    let (k, n) = m.def(t)?;
    match n.op {
        OpKind::MatMul => Some((k, 1.0, vec![k])),
        OpKind::Mul => Matcher::operands(n)?.into_iter().find_map(|(s, c)| {
            let c = m.scalar(c)?;
            let (km, _) = m.def_op(s, OpKind::MatMul)?;
            m.sole_user(s)?;
            Some((km, c, vec![km, k]))
        }),
        OpKind::Div => {
            let (s, c) = (Matcher::input(n, 0)?, m.scalar(Matcher::input(n, 1)?)?);
            let (km, _) = m.def_op(s, OpKind::MatMul)?;
            m.sole_user(s)?;
            (c != 0.0).then(|| (km, 1.0 / c, vec![km, k]))
        }
        _ => None,
    }
}

/// False if a mask of shape `mask` is known to widen `scores` when added (a score axis
/// of size 1 meeting a larger mask axis). Unknown sizes are accepted: a mask that
/// widened the scores at run time would make `attention` fail, never compute otherwise.
fn mask_fits(mask: &[Dim], scores: &[Dim]) -> bool {
    mask.len() <= scores.len()
        && mask
            .iter()
            .rev()
            .zip(scores.iter().rev())
            .all(|(a, s)| a.fixed() == Some(1) || same_dim(a, s) || s.fixed() != Some(1))
}

/// Two dims that may be equal: equal when both are known, anything when one is not.
fn may_equal(a: &Dim, b: &Dim) -> bool {
    same_dim(a, b) || *a == Dim::Unknown || *b == Dim::Unknown
}

/// LLaMA's `repeat_kv`: returns the un-repeated `[B, Hkv, T, D]` value and the nodes.
fn strip_repeat_kv(m: &Matcher, v: ValueId) -> Option<(ValueId, Vec<usize>)> {
    let (kr, r) = m.def_op(v, OpKind::Reshape)?;
    let e = Matcher::input(r, 0)?;
    let (ke, ex) = m.def_op(e, OpKind::Expand)?;
    let u = Matcher::input(ex, 0)?;
    let (ku, un) = m.def_op(u, OpKind::Unsqueeze)?;
    if m.ints(Matcher::input(un, 1)?)? != [2] || m.sole_user(e)?.0 != kr || m.sole_user(u)?.0 != ke
    {
        return None;
    }
    let k0 = Matcher::input(un, 0)?;
    let x = rank4(m, k0)?;
    let eo = m.dims(e).filter(|d| d.len() == 5)?;
    let ro = rank4(m, v)?;
    // The kv heads and the head width must be known; the repeat factor g follows from
    // the merged head count. Batch and sequence sizes may be unknown (importers lose
    // them through shape arithmetic): a mismatch there makes `attention` fail at run
    // time rather than compute something else.
    let hkv = x[1].fixed().filter(|&h| h > 0)?;
    let merged = ro[1].fixed()?;
    let g = (merged % hkv == 0).then_some(merged / hkv)?;
    let ok = same_dim(&eo[1], &x[1])
        && same_dim(&eo[4], &x[3])
        && same_dim(&ro[3], &x[3])
        && (eo[2] == Dim::Unknown || eo[2].fixed() == Some(g))
        && may_equal(&eo[0], &x[0])
        && may_equal(&eo[3], &x[2])
        && may_equal(&ro[0], &x[0])
        && may_equal(&ro[2], &x[2]);
    ok.then(|| (k0, vec![kr, ke, ku]))
}

fn find(m: &Matcher, i: usize) -> Option<Fusion> {
    let sm = &m.g.nodes[i];
    if sm.op != OpKind::Softmax || sm.outputs.len() != 1 {
        return None;
    }
    let p = sm.outputs[0];
    let scores_dims = rank4(m, p)?;
    let axis = sm.attrs.int_or("axis", -1).ok()?;
    if axis != -1 && axis != 3 {
        return None;
    }
    // P · V: the root.
    let (root, pv) = m.sole_user(p)?;
    if pv.op != OpKind::MatMul || Matcher::input(pv, 0)? != p {
        return None;
    }
    let v = Matcher::input(pv, 1)?;
    // (q · kᵀ) · c [+ mask]
    let s = Matcher::input(sm, 0)?;
    let mut interior = vec![i, root];
    let (mm, scale, nodes, mask) = match m.def(s) {
        Some((ka, add)) if add.op == OpKind::Add => {
            let (mm, scale, nodes, mask) =
                Matcher::operands(add)?.into_iter().find_map(|(t, mk)| {
                    let (mm, c, nodes) = scaled_scores(m, t)?;
                    m.sole_user(t)?;
                    Some((mm, c, nodes, mk))
                })?;
            interior.push(ka);
            (mm, scale, nodes, Some(mask))
        }
        _ => {
            let (mm, c, nodes) = scaled_scores(m, s)?;
            (mm, c, nodes, None)
        }
    };
    interior.extend(nodes);
    if let Some(mk) = mask {
        let md = m.dims(mk)?;
        if !mask_fits(md, scores_dims) || !m.fact(mk).ty.dtype.is_float() {
            return None;
        }
    }
    let qk = &m.g.nodes[mm];
    let (q, kt) = (Matcher::input(qk, 0)?, Matcher::input(qk, 1)?);
    let (qd, ktd, vd) = (rank4(m, q)?, rank4(m, kt)?, rank4(m, v)?);
    let _ = (qd, ktd, vd);
    let mut nodes = vec![];
    // kᵀ → k
    let k = match m.def_op(kt, OpKind::Transpose) {
        Some((kk, tr))
            if tr.attrs.ints("perm").ok()?.as_deref() == Some(&[0, 1, 3, 2][..])
                && m.sole_user(kt).is_some() =>
        {
            interior.push(kk);
            Operand::Value(Matcher::input(tr, 0)?)
        }
        _ => {
            nodes.push(NewNode {
                op: OpKind::Transpose,
                attrs: Attrs::new().with("perm", Attr::Ints(vec![0, 1, 3, 2])),
                inputs: vec![Some(Operand::Value(kt))],
                name: "k".into(),
            });
            Operand::New(0)
        }
    };
    // Grouped-query heads: look through repeat_kv.
    let kv_grouped = |x: Operand, interior: &mut Vec<usize>| match x {
        Operand::Value(val) if m.users(val).len() == 1 => match strip_repeat_kv(m, val) {
            Some((base, more)) => {
                interior.extend(more);
                Operand::Value(base)
            }
            None => Operand::Value(val),
        },
        other => other,
    };
    let k = kv_grouped(k, &mut interior);
    let v = kv_grouped(Operand::Value(v), &mut interior);
    if !m.closed(root, &interior) {
        return None;
    }
    let dtype = m.fact(q).ty.dtype;
    if !dtype.is_float() {
        return None;
    }
    nodes.push(NewNode {
        op: OpKind::Attention,
        attrs: Attrs::new()
            .with("scale", Attr::Float(scale as f32))
            .with("causal", Attr::Int(0)),
        inputs: vec![
            Some(Operand::Value(q)),
            Some(k),
            Some(v),
            mask.map(Operand::Value),
        ],
        name: "attention".into(),
    });
    if mask.is_none() {
        nodes.last_mut()?.inputs.pop();
    }
    Some(Fusion {
        root,
        interior,
        nodes,
        counter: "attention_fused",
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::canon::testing::*;

    /// `softmax(q·kᵀ·c + mask)·v` with kᵀ = transpose(k, perm).
    fn sdpa(
        b: &mut B,
        q: ValueId,
        kt: ValueId,
        v: ValueId,
        mask: Option<ValueId>,
        div: bool,
    ) -> ValueId {
        let s = b.bin(OpKind::MatMul, q, kt);
        let s = if div {
            let c = b.f(4.0);
            b.bin(OpKind::Div, s, c)
        } else {
            let c = b.f(0.25);
            b.bin(OpKind::Mul, c, s)
        };
        let s = match mask {
            Some(mk) => b.bin(OpKind::Add, mk, s),
            None => s,
        };
        let p = b.op(
            OpKind::Softmax,
            Attrs::new().with("axis", Attr::Int(-1)),
            &[s],
        );
        b.bin(OpKind::MatMul, p, v)
    }

    fn transpose(b: &mut B, x: ValueId, perm: &[i64]) -> ValueId {
        b.op(
            OpKind::Transpose,
            Attrs::new().with("perm", Attr::Ints(perm.to_vec())),
            &[x],
        )
    }

    #[test]
    fn masked_scaled_attention_with_transposed_k_becomes_attention() {
        for div in [false, true] {
            let mut b = B::new();
            let q = b.input("q", &[-2, 2, -1, 4]);
            let k = b.input("k", &[-2, 2, -1, 4]);
            let v = b.input("v", &[-2, 2, -1, 4]);
            let mask = b.input("mask", &[-2, 1, -1, -1]);
            let kt = transpose(&mut b, k, &[0, 1, 3, 2]);
            let y = sdpa(&mut b, q, kt, v, Some(mask), div);
            let g = b.finish(&[y]);
            let after = rewrite_and_compare(&FuseAttention, &g);
            assert_eq!(crate::testutil::ops(&after), vec![OpKind::Attention]);
            let n = &after.nodes[0];
            assert_eq!(n.inputs, vec![Some(q), Some(k), Some(v), Some(mask)]);
            assert_eq!(n.attrs.float("scale").unwrap(), Some(0.25));
        }
    }

    #[test]
    fn heads_split_by_reshape_transpose_keep_their_layout_ops_and_k_gets_a_transpose() {
        // x: [B, S, 8] -> [B, S, 2, 4] -> q [B, 2, S, 4], kᵀ [B, 2, 4, S] (GPT-2/BERT style).
        let mut b = B::new();
        let x = b.input("x", &[-2, 3, 8]);
        let shape = b.i64s(&[0, 0, 2, 4]);
        let h = b.bin(OpKind::Reshape, x, shape);
        let q = transpose(&mut b, h, &[0, 2, 1, 3]);
        let kt = transpose(&mut b, h, &[0, 2, 3, 1]);
        let y = sdpa(&mut b, q, kt, q, None, false);
        let g = b.finish(&[y]);
        let after = rewrite_and_compare(&FuseAttention, &g);
        assert_eq!(count(&after, OpKind::Attention), 1);
        assert_eq!(count(&after, OpKind::MatMul), 0);
        assert_eq!(count(&after, OpKind::Softmax), 0);
    }

    #[test]
    fn repeat_kv_is_looked_through_as_grouped_query_heads() {
        let mut b = B::new();
        let q = b.input("q", &[1, 4, 3, 4]);
        let k = b.input("k", &[1, 2, 5, 4]);
        let v = b.input("v", &[1, 2, 5, 4]);
        let rep = |b: &mut B, x: ValueId| {
            let ax = b.i64s(&[2]);
            let u = b.bin(OpKind::Unsqueeze, x, ax);
            let s5 = b.i64s(&[1, 2, 2, 5, 4]);
            let e = b.bin(OpKind::Expand, u, s5);
            let s4 = b.i64s(&[1, 4, 5, 4]);
            b.bin(OpKind::Reshape, e, s4)
        };
        let kr = rep(&mut b, k);
        let vr = rep(&mut b, v);
        let kt = transpose(&mut b, kr, &[0, 1, 3, 2]);
        let y = sdpa(&mut b, q, kt, vr, None, false);
        let g = b.finish(&[y]);
        let after = rewrite_and_compare(&FuseAttention, &g);
        assert_eq!(crate::testutil::ops(&after), vec![OpKind::Attention]);
        assert_eq!(after.nodes[0].inputs, vec![Some(q), Some(k), Some(v)]);
    }

    #[test]
    fn probabilities_used_elsewhere_or_softmax_on_another_axis_are_left_alone() {
        let mut b = B::new();
        let q = b.input("q", &[1, 2, 3, 4]);
        let k = b.input("k", &[1, 2, 3, 4]);
        let kt = transpose(&mut b, k, &[0, 1, 3, 2]);
        let y = sdpa(&mut b, q, kt, q, None, false);
        let g0 = b.finish(&[y]);
        let mut g = g0.clone();
        let p = g
            .nodes
            .iter()
            .find(|n| n.op == OpKind::Softmax)
            .unwrap()
            .outputs[0];
        g.outputs.push(p);
        let after = rewrite_and_compare(&FuseAttention, &g);
        assert_eq!(count(&after, OpKind::Attention), 0);
        let mut g = g0;
        for n in &mut g.nodes {
            if n.op == OpKind::Softmax {
                n.attrs.set("axis", Attr::Int(2));
            }
        }
        let after = rewrite_and_compare(&FuseAttention, &g);
        assert_eq!(count(&after, OpKind::Attention), 0);
    }
}
