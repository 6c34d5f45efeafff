//! `unflatten_gemm`: a `gemm` over rows that an exporter flattened, `reshape(gemm(reshape(x,
//! [-1, K]), W, b), [d0, .., dn, N])` with the outer reshape restoring x's leading dims,
//! becomes `matmul(x, W) + b` on x itself (GPT-2's Conv1D, many TF and Paddle exports).
//! The norm before it is then adjacent to the matmul, so the norm-into-linear rules and
//! the `linear` epilogue fusions see the projection as they see every other one.
//!
//! Exact: the same products and sums in the same order; only the views go.

use super::{run_matches, same_dim, Fusion, Matcher, NewNode, Operand};
use crate::{Pass, PassError, PassStats};
use kiln_ir::{Attr, Attrs, Graph, OpKind, ValueId};

/// Turns flattened-row `gemm`s back into `matmul` (+ `add`) on the unflattened input.
#[derive(Clone, Copy, Debug, Default)]
pub struct UnflattenGemm;

const NAME: &str = "unflatten_gemm";

impl Pass for UnflattenGemm {
    fn name(&self) -> &'static str {
        NAME
    }

    fn run(&self, g: &mut Graph) -> Result<PassStats, PassError> {
        run_matches(g, NAME, find)
    }
}

fn find(m: &Matcher, i: usize) -> Option<Fusion> {
    // Root: the reshape that restores the leading dims.
    let outer = &m.g.nodes[i];
    if outer.op != OpKind::Reshape || outer.outputs.len() != 1 {
        return None;
    }
    let y = Matcher::input(outer, 0)?;
    let (gi, gemm) = m.def_op(y, OpKind::Gemm)?;
    m.sole_user(y)?;
    let attr = |k: &str, d: f32| gemm.attrs.float_or(k, d).ok();
    let int = |k: &str| gemm.attrs.int_or(k, 0).ok();
    if attr("alpha", 1.0)? != 1.0 || int("transA")? != 0 {
        return None;
    }
    let a = Matcher::input(gemm, 0)?;
    let w = Matcher::input(gemm, 1)?;
    let bias = Matcher::input(gemm, 2);
    if bias.is_some() && attr("beta", 1.0)? != 1.0 {
        return None;
    }
    let (_, inner) = m.def_op(a, OpKind::Reshape)?;
    let x = Matcher::input(inner, 0)?;
    let xd = m.dims(x)?;
    let ad = m.dims(a)?;
    let yd = m.dims(outer.outputs[0])?;
    let wd = m.dims(w)?;
    // x: [d0, .., dn, K] with n ≥ 1; a: [?, K]; W: [K, N] (or [N, K] transposed).
    if xd.len() < 3 || ad.len() != 2 || wd.len() != 2 || !same_dim(&ad[1], xd.last()?) {
        return None;
    }
    let trans_b = int("transB")? != 0;
    let n = if trans_b { &wd[0] } else { &wd[1] };
    // The outer reshape gives back exactly x's leading dims, then N: known from the
    // dims, or from its target being built out of x's own shape.
    let (lead, last) = yd.split_at(yd.len() - 1);
    let by_dims = lead
        .iter()
        .zip(&xd[..xd.len() - 1])
        .all(|(p, q)| same_dim(p, q))
        && same_dim(&last[0], n);
    let by_target = || {
        let target = Matcher::input(outer, 1)?;
        let parts = shape_parts(m, target, x)?;
        let want_n = match n {
            kiln_ir::Dim::Fixed(v) => *v as i64,
            _ => return None,
        };
        let mut expect: Vec<Part> = (0..xd.len() - 1).map(Part::DimOf).collect();
        expect.push(Part::Lit(want_n));
        (parts == expect).then_some(())
    };
    if yd.len() != xd.len() || !(by_dims || by_target().is_some()) {
        return None;
    }
    // The bias broadcasts along rows: a scalar, [N] or [1, N].
    if let Some(b) = bias {
        let bd = m.dims(b)?;
        let row = match bd {
            [] => true,
            [c] => same_dim(c, n),
            [one, c] => *one == kiln_ir::Dim::Fixed(1) && same_dim(c, n),
            _ => false,
        };
        if !row {
            return None;
        }
    }
    let w_op = if trans_b {
        // Only a constant weight is transposed here (folding it once).
        let k = m.konst(w)?;
        let perm = Attrs::new().with("perm", Attr::Ints(vec![1, 0]));
        let t = kiln_ir::ops::eval(OpKind::Transpose, &perm, &[Some(&k)]).ok()?;
        Operand::Const(t.into_iter().next()?)
    } else {
        Operand::Value(w)
    };
    let mut nodes = vec![NewNode {
        op: OpKind::MatMul,
        attrs: Attrs::new(),
        inputs: vec![Some(Operand::Value(x)), Some(w_op)],
        name: "matmul".into(),
    }];
    if let Some(b) = bias {
        nodes.push(NewNode {
            op: OpKind::Add,
            attrs: Attrs::new(),
            inputs: vec![Some(Operand::New(0)), Some(Operand::Value(b))],
            name: "bias".into(),
        });
    }
    Some(Fusion {
        root: i,
        interior: vec![gi, i],
        nodes,
        counter: "gemm_unflattened",
    })
}

/// One entry of a shape vector, as matched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    /// Dim k of the tensor whose shape was read.
    DimOf(usize),
    /// A literal.
    Lit(i64),
}

/// The entries of the 1-D shape vector `v` as literals and dims of `x`, where `v` is a
/// constant or a `concat` of constants, `unsqueeze(gather(shape(x), k))`,
/// `gather(shape(x), [k..])` and `slice(shape(x), [a], [b])` pieces (how exporters build
/// reshape targets from a tensor's own shape).
fn shape_parts(m: &Matcher, v: ValueId, x: ValueId) -> Option<Vec<Part>> {
    if let Some(k) = m.ints(v) {
        return Some(k.into_iter().map(Part::Lit).collect());
    }
    let (_, n) = m.def(v)?;
    let shape_of_x = |s: ValueId| {
        m.def_op(s, OpKind::Shape).is_some_and(|(_, sh)| {
            Matcher::input(sh, 0) == Some(x) && sh.attrs.0.is_empty() && sh.inputs.len() == 1
        })
    };
    let rank = m.dims(x)?.len() as i64;
    let norm = |k: i64| {
        let k = if k < 0 { k + rank } else { k };
        (0..rank).contains(&k).then_some(k as usize)
    };
    match n.op {
        OpKind::Concat if n.attrs.int_or("axis", 0).ok()? == 0 => {
            let mut out = vec![];
            for i in &n.inputs {
                out.extend(shape_parts(m, (*i)?, x)?);
            }
            Some(out)
        }
        OpKind::Unsqueeze => {
            // A scalar made 1-D.
            let s = Matcher::input(n, 0)?;
            if !m.dims(s)?.is_empty() || m.ints(Matcher::input(n, 1)?)? != [0] {
                return None;
            }
            let (_, gather) = m.def_op(s, OpKind::Gather)?;
            gather_parts(m, gather, &shape_of_x, &norm)
        }
        OpKind::Gather => gather_parts(m, n, &shape_of_x, &norm),
        OpKind::Slice => {
            if !shape_of_x(Matcher::input(n, 0)?) || n.inputs.len() > 4 {
                return None;
            }
            let (start, end) = (
                m.ints(Matcher::input(n, 1)?)?,
                m.ints(Matcher::input(n, 2)?)?,
            );
            let (&[a], &[b]) = (start.as_slice(), end.as_slice()) else {
                return None;
            };
            let a = norm(a)?;
            let b = if b >= rank { rank as usize } else { norm(b)? };
            Some((a..b).map(Part::DimOf).collect())
        }
        _ => None,
    }
}

fn gather_parts(
    m: &Matcher,
    gather: &kiln_ir::Node,
    shape_of_x: &dyn Fn(ValueId) -> bool,
    norm: &dyn Fn(i64) -> Option<usize>,
) -> Option<Vec<Part>> {
    if !shape_of_x(Matcher::input(gather, 0)?) || gather.attrs.int_or("axis", 0).ok()? != 0 {
        return None;
    }
    m.ints(Matcher::input(gather, 1)?)?
        .into_iter()
        .map(|k| norm(k).map(Part::DimOf))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::canon::testing::*;
    use kiln_ir::Tensor;

    /// `reshape(gemm(reshape(x, [-1, K]), W, b), [B, S, N])` with x: [B, S, K], where the
    /// outer target is built from x's shape as exporters do.
    fn flattened(b: &mut B, trans_b: bool, bias: Option<&[usize]>, restore: bool) -> ValueIdPair {
        let x = b.input("x", &[-2, -1, 6]);
        let flat = b.i64s(&[-1, 6]);
        let a = b.bin(OpKind::Reshape, x, flat);
        let w = if trans_b {
            b.konst(Tensor::from_vec(
                vec![5, 6],
                (0..30).map(|v| v as f32 * 0.1).collect(),
            ))
        } else {
            b.konst(Tensor::from_vec(
                vec![6, 5],
                (0..30).map(|v| v as f32 * 0.1).collect(),
            ))
        };
        let mut ins = vec![a, w];
        if let Some(bd) = bias {
            let n: usize = bd.iter().product();
            ins.push(b.konst(Tensor::from_vec(bd.to_vec(), vec![0.5f32; n])));
        }
        let attrs = Attrs::new().with("transB", Attr::Int(trans_b as i64));
        let y = b.op(OpKind::Gemm, attrs, &ins);
        let s = b.un(OpKind::Shape, x);
        let zero = b.i64s(&[0]);
        let one = b.i64s(&[if restore { 1 } else { 0 }]);
        let d0 = b.op(OpKind::Gather, Attrs::new(), &[s, zero]);
        let d1 = b.op(OpKind::Gather, Attrs::new(), &[s, one]);
        let nn = b.i64s(&[5]);
        let target = b.op(
            OpKind::Concat,
            Attrs::new().with("axis", Attr::Int(0)),
            &[d0, d1, nn],
        );
        (x, b.bin(OpKind::Reshape, y, target))
    }

    type ValueIdPair = (kiln_ir::ValueId, kiln_ir::ValueId);

    #[test]
    fn flattened_gemm_becomes_matmul_on_the_original_rank() {
        for (trans_b, bias) in [
            (false, Some(&[5usize][..])),
            (true, Some(&[1, 5][..])),
            (false, None),
            (true, Some(&[][..])),
        ] {
            let mut b = B::new();
            let (_, y) = flattened(&mut b, trans_b, bias, true);
            let g = b.finish(&[y]);
            let after = rewrite_and_compare(&UnflattenGemm, &g);
            assert_eq!(
                count(&after, OpKind::Gemm),
                0,
                "transB={trans_b} bias={bias:?}"
            );
            assert_eq!(count(&after, OpKind::MatMul), 1);
            assert_eq!(count(&after, OpKind::Add), bias.is_some() as usize);
        }
    }

    #[test]
    fn a_reshape_that_does_not_restore_the_leading_dims_is_left_alone() {
        // The outer target is [B, B, N]: only equal to x's dims when B == S.
        let mut b = B::new();
        let (_, y) = flattened(&mut b, false, Some(&[5]), false);
        let g = b.finish(&[y]);
        let after = rewrite_and_compare(&UnflattenGemm, &g);
        assert_eq!(count(&after, OpKind::Gemm), 1);
    }

    #[test]
    fn a_bias_per_row_or_a_scaled_gemm_is_left_alone() {
        let mut b = B::new();
        let x = b.input("x", &[2, 3, 6]);
        let flat = b.i64s(&[-1, 6]);
        let a = b.bin(OpKind::Reshape, x, flat);
        let w = b.konst(Tensor::from_vec(vec![6, 5], vec![0.25f32; 30]));
        let c = b.konst(Tensor::from_vec(vec![6, 5], vec![1f32; 30]));
        let y1 = b.op(OpKind::Gemm, Attrs::new(), &[a, w, c]);
        let y2 = b.op(
            OpKind::Gemm,
            Attrs::new().with("alpha", Attr::Float(2.0)),
            &[a, w],
        );
        let back = b.i64s(&[2, 3, 5]);
        let r1 = b.bin(OpKind::Reshape, y1, back);
        let r2 = b.bin(OpKind::Reshape, y2, back);
        let g = b.finish(&[r1, r2]);
        let after = rewrite_and_compare(&UnflattenGemm, &g);
        assert_eq!(count(&after, OpKind::Gemm), 2);
    }
}
