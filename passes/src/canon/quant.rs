//! `fuse_quant_epilogue`: onnxruntime's dynamic quantisation writes each linear as
//! `matmul_integer(a, w, a_zp, w_zp) → cast to f32 → mul by (a_scale · w_scale) → add bias`;
//! the chain becomes one `matmul_integer_scaled(a, w, a_zp, w_zp, scale, bias?)`, run as the
//! integer GEMM with the scale and bias applied as its results are stored (no i32 tensor,
//! no separate cast and epilogue kernels).
//!
//! The fused op rounds exactly where the chain did (the i32 sum to f32, the product, the
//! sum), so unlike the other canonicalisations this one is bit-exact. The scale must be
//! one value or one per column and the bias one per column (or one value), as the fused
//! kernel applies them; the cast, the mul and the add must have no other users.
//!
//! The QDQ form's `dequantize_linear(constant int8 weight, per tensor or per channel) →
//! matmul / gemm` needs no pattern of its own: `fold_constants` evaluates the dequantised
//! weight once (the interpreter's values, so exactly the f32 weight the graph computed), and
//! the product becomes an ordinary f32 `linear` on a packed weight (tested below).

use super::{run_matches, Fusion, Matcher, NewNode, Operand};
use crate::{Pass, PassError, PassStats};
use kiln_ir::{Attrs, DType, Dim, Graph, OpKind, ValueId};

/// Fuses the dynamic-quantisation epilogue into `matmul_integer_scaled`.
#[derive(Clone, Copy, Debug, Default)]
pub struct FuseQuantEpilogue;

const NAME: &str = "fuse_quant_epilogue";

impl Pass for FuseQuantEpilogue {
    fn name(&self) -> &'static str {
        NAME
    }

    fn run(&self, g: &mut Graph) -> Result<PassStats, PassError> {
        run_matches(g, NAME, find)
    }
}

fn find(m: &Matcher, i: usize) -> Option<Fusion> {
    let mmi = &m.g.nodes[i];
    if mmi.op != OpKind::MatMulInteger || mmi.outputs.len() != 1 {
        return None;
    }
    let out = m.dims(mmi.outputs[0])?;
    let (ci, cast) = m.sole_user(mmi.outputs[0])?;
    if cast.op != OpKind::Cast || m.fact(cast.outputs[0]).ty.dtype != DType::F32 {
        return None;
    }
    let (mi, mul) = m.sole_user(cast.outputs[0])?;
    if mul.op != OpKind::Mul {
        return None;
    }
    let (_, scale) = Matcher::operands(mul)?
        .into_iter()
        .find(|&(c, _)| c == cast.outputs[0])?;
    if !per_column(m, scale, out) {
        return None;
    }
    let mut interior = vec![i, ci, mi];
    let mut root = mi;
    let mut bias = None;
    if let Some((ai, add)) = m.sole_user(mul.outputs[0]) {
        if add.op == OpKind::Add {
            let b = Matcher::operands(add)?
                .into_iter()
                .find(|&(p, _)| p == mul.outputs[0])
                .map(|(_, b)| b);
            if let Some(b) = b.filter(|&b| per_column(m, b, out)) {
                bias = Some(b);
                interior.push(ai);
                root = ai;
            }
        }
    }
    // The root keeps its output's shape: neither operand may enlarge the product.
    if m.dims(m.g.nodes[root].outputs[0])?.len() != out.len() {
        return None;
    }
    let mut inputs: Vec<Option<Operand>> = (0..4)
        .map(|k| Matcher::input(mmi, k).map(Operand::Value))
        .collect();
    inputs.push(Some(Operand::Value(scale)));
    if let Some(b) = bias {
        inputs.push(Some(Operand::Value(b)));
    }
    Some(Fusion {
        root,
        interior,
        nodes: vec![NewNode {
            op: OpKind::MatMulIntegerScaled,
            attrs: Attrs::new(),
            inputs,
            name: "qlinear".into(),
        }],
        counter: "quant_epilogue_fused",
    })
}

/// Whether `v` is f32 with static dims that are one value or one per column of a product
/// of dims `out` (all 1 but a last dim equal to `out`'s), and no more dims than `out`.
fn per_column(m: &Matcher, v: ValueId, out: &[Dim]) -> bool {
    let f = m.fact(v);
    let Some(d) = f.ty.shape.dims() else {
        return false;
    };
    if f.ty.dtype != DType::F32 || d.len() > out.len() {
        return false;
    }
    let one = Dim::Fixed(1);
    match d.split_last() {
        None => true,
        Some((last, lead)) => {
            lead.iter().all(|x| *x == one)
                && (*last == one || out.last().is_some_and(|o| super::same_dim(last, o)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::canon::testing::*;
    use kiln_ir::{Attr, GraphBuilder, Shape, Tensor, TensorType};
    use std::sync::Arc;

    /// `x → dynamic_quantize_linear → matmul_integer(w) → cast → mul(scale) → add(bias)`,
    /// ORT's form; `bias` false stops at the mul, `extra_user` reads the cast elsewhere too.
    fn dynq_linear(bias: bool, extra_user: bool, per_col: bool) -> Graph {
        let mut b = GraphBuilder::new("t");
        let f32t = |d: Vec<Dim>| TensorType::new(DType::F32, Shape::new(d));
        let x = b.input("x", f32t(vec![Dim::Sym("S".into()), Dim::Fixed(6)]));
        let konst = |b: &mut GraphBuilder, name: &str, t: Tensor| {
            b.node(
                OpKind::Constant,
                Attrs::new().with("value", Attr::Tensor(Arc::new(t))),
                vec![],
                vec![(name.into(), None)],
                name,
            )
            .unwrap()[0]
        };
        let q = b
            .node(
                OpKind::DynamicQuantizeLinear,
                Attrs::new(),
                vec![Some(x)],
                vec![("q".into(), None), ("s".into(), None), ("z".into(), None)],
                "dq",
            )
            .unwrap();
        let wv: Vec<i8> = (0..30).map(|i| ((i * 37) % 255 - 127) as i8).collect();
        let w = konst(&mut b, "w", Tensor::from_vec(vec![6, 5], wv));
        let wz = konst(&mut b, "wz", Tensor::scalar(0i8));
        let ws = if per_col {
            konst(
                &mut b,
                "ws",
                Tensor::from_vec(vec![5], vec![0.01f32, 0.02, 0.005, 0.03, 0.011]),
            )
        } else {
            konst(&mut b, "ws", Tensor::scalar(0.0123f32))
        };
        let node = |b: &mut GraphBuilder, op, attrs, ins: Vec<ValueId>, name: &str| {
            b.node(
                op,
                attrs,
                ins.into_iter().map(Some).collect(),
                vec![(name.into(), None)],
                name,
            )
            .unwrap()[0]
        };
        let scale = node(&mut b, OpKind::Mul, Attrs::new(), vec![q[1], ws], "scale");
        let acc = node(
            &mut b,
            OpKind::MatMulInteger,
            Attrs::new(),
            vec![q[0], w, q[2], wz],
            "mm",
        );
        let to = Attrs::new().with("to", Attr::Str("f32".into()));
        let c = node(&mut b, OpKind::Cast, to, vec![acc], "cast");
        let y = node(&mut b, OpKind::Mul, Attrs::new(), vec![c, scale], "y");
        let mut outs = vec![];
        if bias {
            let bv = konst(
                &mut b,
                "bias",
                Tensor::from_vec(vec![5], vec![0.1f32, -0.2, 0.3, 0.0, 1.5]),
            );
            outs.push(node(&mut b, OpKind::Add, Attrs::new(), vec![bv, y], "out"));
        } else {
            outs.push(y);
        }
        if extra_user {
            outs.push(node(&mut b, OpKind::Neg, Attrs::new(), vec![c], "other"));
        }
        let g = b.finish(outs);
        kiln_ir::verify(&g).unwrap();
        g
    }

    /// The rewritten graph's outputs equal the original's bit for bit.
    fn assert_bit_exact(before: &Graph, after: &Graph) {
        for seed in 1..=3 {
            let ins = crate::testutil::random_inputs(before, seed);
            let a = kiln_ir::run(before, ins.clone()).expect("original runs");
            let b = kiln_ir::run(after, ins).expect("rewritten runs");
            assert_eq!(a, b, "seed {seed}");
        }
    }

    #[test]
    fn the_dynamic_quant_epilogue_fuses_bit_exactly() {
        for (bias, per_col) in [(true, false), (false, false), (true, true), (false, true)] {
            let g = dynq_linear(bias, false, per_col);
            let after = rewrite_and_compare(&FuseQuantEpilogue, &g);
            assert_bit_exact(&g, &after);
            assert_eq!(
                count(&after, OpKind::MatMulIntegerScaled),
                1,
                "{bias} {per_col}"
            );
            assert_eq!(count(&after, OpKind::MatMulInteger), 0);
            assert_eq!(count(&after, OpKind::Cast), 0);
            assert_eq!(count(&after, OpKind::Add), 0);
            // Only the scale's own product of the two scales stays.
            assert_eq!(count(&after, OpKind::Mul), 1);
        }
    }

    #[test]
    fn a_cast_with_other_users_is_left_alone() {
        let g = dynq_linear(true, true, false);
        let after = rewrite_and_compare(&FuseQuantEpilogue, &g);
        assert_eq!(count(&after, OpKind::MatMulIntegerScaled), 0);
        assert_eq!(count(&after, OpKind::MatMulInteger), 1);
    }

    #[test]
    fn a_dequantised_constant_weight_folds_into_an_f32_matmul() {
        let mut b = GraphBuilder::new("t");
        let x = b.input(
            "x",
            TensorType::new(
                DType::F32,
                Shape::new(vec![Dim::Sym("S".into()), Dim::Fixed(6)]),
            ),
        );
        let konst = |b: &mut GraphBuilder, name: &str, t: Tensor| {
            b.node(
                OpKind::Constant,
                Attrs::new().with("value", Attr::Tensor(Arc::new(t))),
                vec![],
                vec![(name.into(), None)],
                name,
            )
            .unwrap()[0]
        };
        let wv: Vec<i8> = (0..30).map(|i| ((i * 53) % 255 - 127) as i8).collect();
        let w = konst(&mut b, "w", Tensor::from_vec(vec![6, 5], wv));
        let s = konst(
            &mut b,
            "s",
            Tensor::from_vec(vec![5], vec![0.01f32, 0.027, 0.0031, 0.3, 0.011]),
        );
        let z = konst(
            &mut b,
            "z",
            Tensor::from_vec(vec![5], vec![0i8, 3, -2, 0, 1]),
        );
        let axis = Attrs::new().with("axis", Attr::Int(1));
        let dq = b
            .node(
                OpKind::DequantizeLinear,
                axis.clone(),
                vec![Some(w), Some(s), Some(z)],
                vec![("wf".into(), None)],
                "dq",
            )
            .unwrap()[0];
        let y = b
            .node(
                OpKind::MatMul,
                Attrs::new(),
                vec![Some(x), Some(dq)],
                vec![("y".into(), None)],
                "mm",
            )
            .unwrap()[0];
        let g = b.finish(vec![y]);
        let mut after = g.clone();
        crate::pipeline::default_pipeline().run(&mut after).unwrap();
        assert_close_outputs(&g, &after);
        assert_eq!(count(&after, OpKind::DequantizeLinear), 0);
        assert_eq!(
            count(&after, OpKind::MatMul) + count(&after, OpKind::Linear),
            1
        );
        // The weight the product reads is the interpreter's dequantised weight, bit for bit.
        let (wt, st, zt) = (
            g.constant_value(w).unwrap(),
            g.constant_value(s).unwrap(),
            g.constant_value(z).unwrap(),
        );
        let want = kiln_ir::ops::eval(
            OpKind::DequantizeLinear,
            &axis,
            &[Some(&*wt), Some(&*st), Some(&*zt)],
        )
        .unwrap()
        .remove(0);
        let mm = after
            .nodes
            .iter()
            .find(|n| matches!(n.op, OpKind::MatMul | OpKind::Linear))
            .unwrap();
        let folded = after
            .constant_value(mm.inputs[1].unwrap())
            .expect("a constant weight");
        assert_eq!(*folded, want);
    }
}
