//! Symbolic shape propagation through the shape-arithmetic chains exporters emit:
//! `shape -> gather -> unsqueeze -> concat -> reshape` must give `[B, S, 12, 64]` for an
//! input of `[B, S, 768]`, and the graph must then run with the shapes it promised.

use kiln_ir::{
    run, Attr, Attrs, DType, Dim, GraphBuilder, OpKind, Shape, Tensor, TensorType, ValueId,
};
use std::sync::Arc;

fn sym(dims: &[&str]) -> Shape {
    Shape::new(
        dims.iter()
            .map(|d| {
                d.parse::<u64>()
                    .map(Dim::Fixed)
                    .unwrap_or(Dim::Sym(d.to_string()))
            })
            .collect(),
    )
}

struct B(GraphBuilder, usize);

impl B {
    fn new() -> B {
        B(GraphBuilder::new("chain"), 0)
    }
    fn input(&mut self, name: &str, dt: DType, shape: Shape) -> ValueId {
        self.0.input(name, TensorType::new(dt, shape))
    }
    fn node(&mut self, op: OpKind, attrs: Attrs, ins: &[ValueId]) -> ValueId {
        self.1 += 1;
        let name = format!("v{}", self.1);
        self.0
            .node(
                op,
                attrs,
                ins.iter().map(|&i| Some(i)).collect(),
                vec![(name, None)],
                "",
            )
            .expect("inference succeeds")[0]
    }
    fn konst(&mut self, t: Tensor) -> ValueId {
        self.node(
            OpKind::Constant,
            Attrs::new().with("value", Attr::Tensor(Arc::new(t))),
            &[],
        )
    }
    fn ints(&mut self, v: &[i64]) -> ValueId {
        self.konst(Tensor::from_vec(vec![v.len()], v.to_vec()))
    }
    fn shape_of(&self, v: ValueId) -> String {
        self.0.fact(v).ty.shape.to_string()
    }
    /// `unsqueeze(gather(shape_tensor, i), [0])`: one dim of a shape as a 1-element tensor.
    fn dim_of(&mut self, shape_tensor: ValueId, i: i64) -> ValueId {
        let idx = self.konst(Tensor::scalar(i));
        let g = self.node(
            OpKind::Gather,
            Attrs::new().with("axis", Attr::Int(0)),
            &[shape_tensor, idx],
        );
        let zero = self.ints(&[0]);
        self.node(OpKind::Unsqueeze, Attrs::new(), &[g, zero])
    }
}

fn concat(b: &mut B, parts: &[ValueId]) -> ValueId {
    b.node(
        OpKind::Concat,
        Attrs::new().with("axis", Attr::Int(0)),
        parts,
    )
}

#[test]
fn reshape_chain_keeps_batch_and_sequence_symbolic() {
    let mut b = B::new();
    let x = b.input("x", DType::F32, sym(&["B", "S", "768"]));
    let s = b.node(OpKind::Shape, Attrs::new(), &[x]);
    assert_eq!(
        b.0.fact(s).dims,
        Some(vec!["B".into(), "S".into(), Dim::Fixed(768)])
    );
    let bd = b.dim_of(s, 0);
    let sd = b.dim_of(s, -2);
    assert_eq!(b.0.fact(sd).dims, Some(vec!["S".into()]));
    let heads = b.ints(&[12, 64]);
    let target = concat(&mut b, &[bd, sd, heads]);
    assert_eq!(b.shape_of(target), "[4]");
    let r = b.node(OpKind::Reshape, Attrs::new(), &[x, target]);
    assert_eq!(b.shape_of(r), "[B, S, 12, 64]");

    // The same with -1 for the head size, and with -1 for the sequence.
    let h = b.ints(&[12, -1]);
    let t2 = concat(&mut b, &[bd, sd, h]);
    let r2 = b.node(OpKind::Reshape, Attrs::new(), &[x, t2]);
    assert_eq!(b.shape_of(r2), "[B, S, 12, 64]");
    let m1 = b.ints(&[-1]);
    let h64 = b.ints(&[12, 64]);
    let t3 = concat(&mut b, &[bd, m1, h64]);
    let r3 = b.node(OpKind::Reshape, Attrs::new(), &[x, t3]);
    assert_eq!(b.shape_of(r3), "[B, S, 12, 64]");

    // Back again: reshape to [0, 0, -1] copies B and S and infers 768.
    let back = b.ints(&[0, 0, -1]);
    let r4 = b.node(OpKind::Reshape, Attrs::new(), &[r, back]);
    assert_eq!(b.shape_of(r4), "[B, S, 768]");

    // A slice of the shape keeps its contents: shape(x)[:2] ++ [-1].
    let (st, en) = (b.ints(&[0]), b.ints(&[2]));
    let prefix = b.node(OpKind::Slice, Attrs::new(), &[s, st, en]);
    assert_eq!(b.0.fact(prefix).dims, Some(vec!["B".into(), "S".into()]));
    let t5 = concat(&mut b, &[prefix, m1]);
    let r5 = b.node(OpKind::Reshape, Attrs::new(), &[r, t5]);
    assert_eq!(b.shape_of(r5), "[B, S, 768]");

    // expand and constant_of_shape take their shapes from the same contents.
    let y = b.input("y", DType::F32, sym(&["1", "1", "64"]));
    let c64 = b.ints(&[64]);
    let et = concat(&mut b, &[bd, sd, c64]);
    let e = b.node(OpKind::Expand, Attrs::new(), &[y, et]);
    assert_eq!(b.shape_of(e), "[B, S, 64]");
    let z = b.node(OpKind::ConstantOfShape, Attrs::new(), &[target]);
    assert_eq!(b.0.fact(z).ty.to_string(), "f32[B, S, 12, 64]");
    // range(0, S, 1) has S elements.
    let s_scalar = {
        let idx = b.konst(Tensor::scalar(1i64));
        b.node(OpKind::Gather, Attrs::new(), &[s, idx])
    };
    let (zero, one) = (b.konst(Tensor::scalar(0i64)), b.konst(Tensor::scalar(1i64)));
    let pos = b.node(OpKind::Range, Attrs::new(), &[zero, s_scalar, one]);
    assert_eq!(b.shape_of(pos), "[S]");
    // flatten of [B, S, 12, 64] at 2, and size.
    let fl = b.node(
        OpKind::Flatten,
        Attrs::new().with("axis", Attr::Int(2)),
        &[r],
    );
    assert_eq!(b.shape_of(fl), "[?, 768]");
    let tr = b.node(
        OpKind::Transpose,
        Attrs::new().with("perm", Attr::Ints(vec![0, 2, 1, 3])),
        &[r],
    );
    assert_eq!(b.shape_of(tr), "[B, 12, S, 64]");

    // The graph runs, and every output fits its inferred type (the interpreter checks).
    let g = b.0.finish(vec![r, r2, r3, r4, r5, e, z, pos, fl, tr]);
    let xs = Tensor::from_vec(
        vec![2, 3, 768],
        (0..2 * 3 * 768).map(|i| i as f32).collect(),
    );
    let ys = Tensor::from_vec(vec![1, 1, 64], vec![1f32; 64]);
    let outs = run(&g, vec![xs.clone(), ys]).expect("runs");
    assert_eq!(outs[0].shape(), &[2, 3, 12, 64]);
    assert_eq!(outs[0].as_slice::<f32>(), xs.as_slice::<f32>());
    assert_eq!(outs[2].shape(), &[2, 3, 12, 64]);
    assert_eq!(outs[3].shape(), &[2, 3, 768]);
    assert_eq!(outs[5].shape(), &[2, 3, 64]);
    assert_eq!(outs[6].shape(), &[2, 3, 12, 64]);
    assert_eq!(outs[7].to_i64s(), vec![0, 1, 2]);
    assert_eq!(outs[9].shape(), &[2, 12, 3, 64]);
}

#[test]
fn reshape_with_unknown_entry_is_solved_by_the_element_count() {
    // Whatever the unknown entry holds, [B, ?, 12, 64] must have S there.
    let mut b = B::new();
    let x = b.input("x", DType::F32, sym(&["B", "S", "768"]));
    let t = b.input("t", DType::I64, sym(&["4"]));
    let r = b.node(OpKind::Reshape, Attrs::new(), &[x, t]);
    assert_eq!(b.shape_of(r), "[?, ?, ?, ?]");
    let s = b.node(OpKind::Shape, Attrs::new(), &[x]);
    let bd = b.dim_of(s, 0);
    let other = b.input("n", DType::I64, sym(&["1"]));
    let c = b.ints(&[12, 64]);
    let t2 = concat(&mut b, &[bd, other, c]);
    let r2 = b.node(OpKind::Reshape, Attrs::new(), &[x, t2]);
    assert_eq!(b.shape_of(r2), "[B, S, 12, 64]");
}

#[test]
fn squeeze_and_unsqueeze_keep_symbols() {
    let mut b = B::new();
    let x = b.input("x", DType::F32, sym(&["B", "1", "S"]));
    let ax = b.ints(&[1]);
    let sq = b.node(OpKind::Squeeze, Attrs::new(), &[x, ax]);
    assert_eq!(b.shape_of(sq), "[B, S]");
    let ax2 = b.ints(&[-1, 1]);
    let us = b.node(OpKind::Unsqueeze, Attrs::new(), &[sq, ax2]);
    assert_eq!(b.shape_of(us), "[B, 1, S, 1]");
    // Squeezing a known non-1 axis is a definite error.
    let ax3 = b.ints(&[0]);
    let y = b.input("y", DType::F32, sym(&["3", "S"]));
    let err =
        b.0.node(
            OpKind::Squeeze,
            Attrs::new(),
            vec![Some(y), Some(ax3)],
            vec![("bad".into(), None)],
            "",
        )
        .unwrap_err();
    assert!(err.msg.contains("cannot squeeze"), "{err}");
}

#[test]
fn if_runs_the_chosen_branch_and_merges_branch_shapes() {
    // then: x -> transpose (f32[3, 2]); else: x -> identity-like reshape to [2, 3].
    let branch = |perm: bool| {
        let mut g = GraphBuilder::new(if perm { "then" } else { "else" });
        let x = g.input("x", TensorType::new(DType::F32, sym(&["2", "3"])));
        let out = if perm {
            g.node(
                OpKind::Transpose,
                Attrs::new(),
                vec![Some(x)],
                vec![("t".into(), None)],
                "",
            )
            .expect("transpose")[0]
        } else {
            let s = g
                .node(
                    OpKind::Constant,
                    Attrs::new().with(
                        "value",
                        Attr::Tensor(Arc::new(Tensor::from_vec(vec![2], vec![2i64, 3]))),
                    ),
                    vec![],
                    vec![("s".into(), None)],
                    "",
                )
                .expect("constant")[0];
            g.node(
                OpKind::Reshape,
                Attrs::new(),
                vec![Some(x), Some(s)],
                vec![("r".into(), None)],
                "",
            )
            .expect("reshape")[0]
        };
        Arc::new(g.finish(vec![out]))
    };
    let mut b = B::new();
    let c = b.input("c", DType::Bool, sym(&[]));
    let x = b.input("x", DType::F32, sym(&["2", "3"]));
    let attrs = Attrs::new()
        .with("then_branch", Attr::Graph(branch(true)))
        .with("else_branch", Attr::Graph(branch(false)));
    let out = b.node(OpKind::If, attrs, &[c, x]);
    assert_eq!(b.shape_of(out), "[?, ?]");
    let g = b.0.finish(vec![out]);
    let xs = Tensor::from_vec(vec![2, 3], vec![0f32, 1., 2., 3., 4., 5.]);
    let t = run(&g, vec![Tensor::scalar(true), xs.clone()]).expect("then runs");
    assert_eq!(t[0].shape(), &[3, 2]);
    assert_eq!(t[0].to_f64s(), vec![0., 3., 1., 4., 2., 5.]);
    let e = run(&g, vec![Tensor::scalar(false), xs.clone()]).expect("else runs");
    assert_eq!(e[0], xs);
}

/// Mamba's split of `x [B, 256, L]` in halves: the slice ends are shape arithmetic
/// (`shape(x)[1] // 2`, times 1 and 2) on a tensor whose batch is symbolic, so not constants,
/// but their contents are known; and a slice to the axis's own symbolic size is the whole
/// axis. Both must keep every dim (a `?` there left the following elementwise ops unfused).
#[test]
fn slice_ends_from_shape_arithmetic_keep_dims() {
    let mut b = B::new();
    let x = b.input("x", DType::F32, sym(&["B", "256", "L"]));
    let s = b.node(OpKind::Shape, Attrs::new(), &[x]);
    let idx = b.konst(Tensor::from_vec(vec![1], vec![1i64]));
    let c = b.node(
        OpKind::Gather,
        Attrs::new().with("axis", Attr::Int(0)),
        &[s, idx],
    );
    let two = b.ints(&[2]);
    let half = b.node(OpKind::Div, Attrs::new(), &[c, two]);
    let full = b.node(OpKind::Mul, Attrs::new(), &[half, two]);
    let (zero, one) = (b.ints(&[0]), b.ints(&[1]));
    let lo = b.node(OpKind::Slice, Attrs::new(), &[x, zero, half, one]);
    let hi = b.node(OpKind::Slice, Attrs::new(), &[x, half, full, one]);
    assert_eq!(b.shape_of(lo), "[B, 128, L]");
    assert_eq!(b.shape_of(hi), "[B, 128, L]");
    // x[:, :, :L] with L read from the shape: the whole symbolic axis.
    let l = b.dim_of(s, 2);
    let m1 = b.ints(&[-1]);
    let all = b.node(OpKind::Slice, Attrs::new(), &[x, zero, l, m1]);
    assert_eq!(b.shape_of(all), "[B, 256, L]");
    // From 1 to L is one shorter than L: unknown, never L.
    let part = b.node(OpKind::Slice, Attrs::new(), &[x, one, l, m1]);
    assert_eq!(b.shape_of(part), "[B, 256, ?]");
    // And the graph runs with the shapes it promised.
    let g = b.0.finish(vec![lo, hi, all]);
    let xs = Tensor::from_vec(vec![2, 256, 3], vec![0.5f32; 2 * 256 * 3]);
    let outs = run(&g, vec![xs]).expect("runs");
    assert_eq!(outs[0].shape(), &[2, 128, 3]);
    assert_eq!(outs[2].shape(), &[2, 256, 3]);
}
