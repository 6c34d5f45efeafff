//! Helpers for the canonicalisation tests: a tiny graph-building DSL on top of
//! [`GraphBuilder`], and "same outputs within [`CANON_TOLERANCE`]" on random inputs.

use super::CANON_TOLERANCE;
use crate::Pass;
use kiln_ir::{
    Attr, Attrs, DType, Dim, Graph, GraphBuilder, OpKind, Shape, Tensor, TensorType, ValueId,
};
use std::sync::Arc;

/// A graph under construction, with shortcuts for the ops the patterns use.
pub struct B(pub GraphBuilder, usize);

impl B {
    pub fn new() -> B {
        B(GraphBuilder::new("t"), 0)
    }

    /// An f32 input; dims are sizes, or symbols for negative numbers (`-1` is `S`).
    pub fn input(&mut self, name: &str, dims: &[i64]) -> ValueId {
        let d = dims
            .iter()
            .map(|&x| {
                if x < 0 {
                    Dim::Sym(["S", "B", "T"][(-x - 1) as usize % 3].into())
                } else {
                    Dim::Fixed(x as u64)
                }
            })
            .collect();
        self.0
            .input(name, TensorType::new(DType::F32, Shape::new(d)))
    }

    pub fn op(&mut self, op: OpKind, attrs: Attrs, ins: &[ValueId]) -> ValueId {
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
            .unwrap_or_else(|e| panic!("{e}"))[0]
    }

    pub fn un(&mut self, op: OpKind, x: ValueId) -> ValueId {
        self.op(op, Attrs::new(), &[x])
    }

    pub fn bin(&mut self, op: OpKind, a: ValueId, b: ValueId) -> ValueId {
        self.op(op, Attrs::new(), &[a, b])
    }

    pub fn konst(&mut self, t: Tensor) -> ValueId {
        self.op(
            OpKind::Constant,
            Attrs::new().with("value", Attr::Tensor(Arc::new(t))),
            &[],
        )
    }

    pub fn f(&mut self, x: f32) -> ValueId {
        self.konst(Tensor::scalar(x))
    }

    pub fn i64s(&mut self, v: &[i64]) -> ValueId {
        self.konst(Tensor::from_vec(vec![v.len()], v.to_vec()))
    }

    pub fn finish(self, outs: &[ValueId]) -> Graph {
        let g = self.0.finish(outs.to_vec());
        kiln_ir::verify(&g).unwrap();
        g
    }
}

/// Runs `pass` on a copy of `g`, checks the result verifies and computes the same outputs
/// within [`CANON_TOLERANCE`] on random inputs, and returns it.
pub fn rewrite_and_compare(pass: &dyn Pass, g: &Graph) -> Graph {
    let mut after = g.clone();
    pass.run(&mut after).unwrap_or_else(|e| panic!("{e}"));
    kiln_ir::verify(&after).unwrap_or_else(|e| panic!("{e}"));
    assert_close_outputs(g, &after);
    after
}

/// Asserts that two graphs compute outputs equal within [`CANON_TOLERANCE`] (relative to
/// the largest magnitude of each output) on three sets of random inputs.
pub fn assert_close_outputs(before: &Graph, after: &Graph) {
    for seed in 1..=3 {
        let ins = crate::testutil::random_inputs(before, seed);
        let a = kiln_ir::run(before, ins.clone()).expect("original graph runs");
        let b = kiln_ir::run(after, ins).expect("rewritten graph runs");
        assert_eq!(a.len(), b.len());
        for (k, (x, y)) in a.iter().zip(&b).enumerate() {
            assert_eq!(x.shape(), y.shape(), "output #{k}");
            assert_eq!(x.dtype(), y.dtype(), "output #{k}");
            let (xv, yv) = (x.to_f64s(), y.to_f64s());
            let scale = xv.iter().fold(1e-6f64, |m, v| m.max(v.abs()));
            for (i, (p, q)) in xv.iter().zip(&yv).enumerate() {
                assert!(
                    (p - q).abs() <= CANON_TOLERANCE * scale || (p.is_nan() && q.is_nan()),
                    "output #{k} element {i}: {p} vs {q} (seed {seed})"
                );
            }
        }
    }
}

/// How many nodes of `op` the graph has.
pub fn count(g: &Graph, op: OpKind) -> usize {
    g.nodes.iter().filter(|n| n.op == op).count()
}
