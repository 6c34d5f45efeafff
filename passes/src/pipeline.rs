//! The default optimisation pipeline, as one list read top to bottom. Each line is one
//! pass and why it sits there. Names are what `--passes=-name` and dump files use.

use crate::canon::{
    FuseAttention, FuseConvEpilogue, FuseGelu, FuseNorms, FuseQuantEpilogue, FuseRotary, FuseSilu,
    LineariseAttention, UnflattenGemm,
};
use crate::classic::{
    AbsorbHeadTransposes, EliminateCommonSubexpressions, EliminateDeadCode, FoldConstants,
    HoistShapeReads, RollBlocks, SimplifyOps,
};
use crate::{Pass, PassManager};

/// The passes of the default pipeline, in order, costed for the host
/// ([`crate::target::Target::host`]).
pub fn default_passes() -> Vec<Box<dyn Pass>> {
    default_passes_for(crate::target::Target::host())
}

/// The passes of the default pipeline, in order, with the cost model of `target` (a
/// backend compiling for another machine hands in its own).
pub fn default_passes_for(target: crate::target::Target) -> Vec<Box<dyn Pass>> {
    vec![
        // Drop identities, same-dtype casts, identity transposes and same-shape reshapes
        // that importers leave behind, so later passes see through them.
        Box::new(SimplifyOps),
        // Evaluate what does not depend on inputs, including static shape arithmetic
        // (shape -> gather -> concat on fixed dims); symbolic shapes stay symbolic.
        Box::new(FoldConstants::default()),
        // Folding turns reshape targets into constants: reshapes may now compose or vanish.
        Box::new(SimplifyOps),
        // Recurrences unrolled over time are rolled next, so that every pass after them runs
        // on one step, not S (compile time on a long unrolled export is mostly passes over
        // its copies). First the copies' duplicate constants merge (a step's weights read
        // as one value) and shape reads move to where a shape is first known (a step's
        // `shape(buffer)` would otherwise be one more reader of the chain below).
        Box::new(EliminateCommonSubexpressions),
        Box::new(crate::classic::HoistShapeReadsLocal),
        // A recurrence's `out[:, t] = h` over every step (a chain of row scatter_nds)
        // becomes one concat of the rows, which the roll below returns as a scan output
        // instead of carrying the whole buffer through its loop.
        Box::new(crate::classic::StackRowScatters),
        // Recurrences an exporter unrolled over time (one block of nodes per step, indexed by
        // the step's constants) become one `loop`, so the e-graph and every pass after it
        // see one step, not S (weight-tied layers roll last, with optimised bodies).
        Box::new(RollBlocks::recurrences()),
        // A loop whose carried values are linear recurrences (h = a ⊙ h + b: Mamba's scan)
        // becomes one `linear_scan` (sequential or chunked, by cost) with the rest of its
        // body run once over every step, so the pattern fusions below see the lifted ops;
        // other loops stay, their step's input projections lifted the same way.
        Box::new(crate::classic::SelectRecurrenceForm::new(target.clone())),
        // A gemm over rows an exporter flattened (GPT-2's Conv1D) becomes a matmul on the
        // unflattened input, so norms and epilogues meet it as they meet every matmul.
        Box::new(UnflattenGemm),
        // Canonicalisation: recognise what exporters decomposed as first-class ops.
        // Layer norms and LLaMA's RMS norms (ReduceMean/Pow/Sqrt/Div chains).
        Box::new(FuseNorms),
        // GELU in its erf (BERT, ViT) and tanh (GPT-2) forms.
        Box::new(FuseGelu),
        // x * sigmoid(x) (LLaMA's SwiGLU gate).
        Box::new(FuseSilu),
        // x*cos + rotate_half(x)*sin (LLaMA's RoPE).
        Box::new(FuseRotary),
        // softmax(q k^T * c + mask) v, grouped-query heads, KV caches.
        Box::new(FuseAttention),
        // Linear attention and retention in their quadratic form ((q kᵀ ⊙ causal mask or
        // decay) v, row-sum normaliser): one op run in the chunked recurrent form, exact
        // up to reassociation.
        Box::new(LineariseAttention::default()),
        // onnxruntime's dynamic quantisation: matmul_integer → cast → mul(scale) → add(bias)
        // becomes one integer GEMM with a scaling epilogue (bit-exact).
        Box::new(FuseQuantEpilogue),
        // Compose the transposes fuse_attention inserts with the exporter's head transposes.
        Box::new(SimplifyOps),
        // Merge duplicate constants and computations (after folding made more of them equal).
        Box::new(EliminateCommonSubexpressions),
        // Flattened gemms whose input's dims only became known through the fusions above
        // (an attention output reshaped back to [B, S, H·D]).
        Box::new(UnflattenGemm),
        // Centre the weights of linears whose every reader ignores a per-row shift (layer
        // norms, residual sums read only by layer norms): the stream becomes mean-free.
        Box::new(crate::classic::CentreMeanInvariant),
        // A shape read of a norm's or activation's output reads its input instead, so the
        // e-graph never keeps a norm alive only for its shape (local: never across layers).
        Box::new(crate::classic::HoistShapeReadsLocal),
        // The steps-first transposes rolling put in front of per-step reads move onto the
        // smaller operands of the elementwise chains they read, which then write that
        // layout themselves (not earlier: the pattern fusions see the exported layout).
        Box::new(crate::classic::MoveTransposesUp),
        // Equality saturation: norm folding, LN→RMSNorm, epilogue fusion; cheapest by cost model.
        Box::new(crate::egraph::SaturateEgraph::new(target)),
        // A conv's activation and residual add join it as one `fused_conv` (after the
        // e-graph folded BatchNorm into the conv), run in the GEMM's epilogue.
        Box::new(FuseConvEpilogue),
        // Attention reads and writes `[B, S, H, D]` instead of transposing heads around it.
        Box::new(AbsorbHeadTransposes),
        // `shape(layer_norm(x))` reads `x`'s shape instead, so a norm that the e-graph folded
        // into a matmul is not kept running for an exporter's reshape target.
        Box::new(HoistShapeReads),
        // Weight-tied blocks repeated back to back (ALBERT's shared layers) become one
        // `loop` whose body is compiled once; exact, and last, so the body is optimised.
        Box::new(RollBlocks::default()),
        // Remove whatever no longer reaches a graph output.
        Box::new(EliminateDeadCode),
    ]
}

/// A [`PassManager`] running [`default_passes`].
pub fn default_pipeline() -> PassManager {
    PassManager::new(default_passes())
}

/// A [`PassManager`] running [`default_passes_for`] `target`.
pub fn pipeline_for(target: crate::target::Target) -> PassManager {
    PassManager::new(default_passes_for(target))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::{Graph, Tensor};

    #[test]
    fn default_pipeline_names_are_verb_noun_and_run_on_a_constant_graph() {
        let pm = default_pipeline();
        for n in pm.pass_names() {
            assert!(n.contains('_') && n == n.to_lowercase(), "{n}");
        }
        let mut g = Graph::new("g");
        let x = g.add_input("x", kiln_ir::TensorType::unknown_shape(kiln_ir::DType::F32));
        let a = g.add_constant("a", Tensor::scalar(2.0f32));
        g.add_constant("b", Tensor::scalar(2.0f32));
        g.add_constant("dead", Tensor::scalar(3.0f32));
        g.outputs = vec![x, a];
        let report = pm.run(&mut g).unwrap();
        assert_eq!(report.passes.len(), 28);
        assert_eq!(g.nodes.len(), 1);
        assert_eq!(g.value(g.outputs[1]).name, "a");
    }

    /// A random graph on `[3, 3]` f32 values mixing ops the default passes rewrite
    /// (identities, same-dtype casts, transposes, reshapes, duplicate constants and
    /// duplicate nodes) with ordinary math.
    fn random_graph(seed: u64) -> Graph {
        use crate::testutil::Rng;
        use kiln_ir::{Attr, Attrs, GraphBuilder, OpKind, Shape, TensorType, ValueId};
        use std::sync::Arc;
        let mut rng = Rng::new(seed);
        let mut b = GraphBuilder::new("random");
        let ty = TensorType::new(kiln_ir::DType::F32, Shape::fixed(&[3, 3]));
        let mut vals: Vec<ValueId> = vec![b.input("x", ty.clone()), b.input("y", ty)];
        let konst = |t: Tensor| Attrs::new().with("value", Attr::Tensor(Arc::new(t)));
        let mut const_pool = vec![];
        for k in 0..3 {
            const_pool.push(
                crate::testutil::Rng::new(seed * 10 + k).tensor(kiln_ir::DType::F32, &[3, 3]),
            );
        }
        for i in 0..24 {
            let name = vec![(format!("v{i}"), None)];
            let pick =
                |rng: &mut Rng, vals: &[ValueId]| vals[(rng.next() % vals.len() as u64) as usize];
            let a = pick(&mut rng, &vals);
            let c = pick(&mut rng, &vals);
            let (op, attrs, ins) = match rng.next() % 11 {
                0 => (
                    OpKind::Constant,
                    konst(const_pool[(rng.next() % 3) as usize].clone()),
                    vec![],
                ),
                1 => (OpKind::Identity, Attrs::new(), vec![Some(a)]),
                2 => (
                    OpKind::Cast,
                    Attrs::new().with("to", Attr::Str("f32".into())),
                    vec![Some(a)],
                ),
                3 => {
                    let perm = if rng.next() & 1 == 0 {
                        vec![1, 0]
                    } else {
                        vec![0, 1]
                    };
                    (
                        OpKind::Transpose,
                        Attrs::new().with("perm", Attr::Ints(perm)),
                        vec![Some(a)],
                    )
                }
                4 => {
                    let s = b
                        .node(
                            OpKind::Constant,
                            konst(Tensor::from_vec(vec![2], vec![3i64, -1])),
                            vec![],
                            vec![(format!("s{i}"), None)],
                            "",
                        )
                        .unwrap()[0];
                    (OpKind::Reshape, Attrs::new(), vec![Some(a), Some(s)])
                }
                5 => (OpKind::Relu, Attrs::new(), vec![Some(a)]),
                6 => (OpKind::Neg, Attrs::new(), vec![Some(a)]),
                7 => (OpKind::Add, Attrs::new(), vec![Some(a), Some(c)]),
                8 => (OpKind::Mul, Attrs::new(), vec![Some(a), Some(c)]),
                9 => (OpKind::Sub, Attrs::new(), vec![Some(a), Some(c)]),
                _ => (OpKind::Abs, Attrs::new(), vec![Some(a)]),
            };
            vals.push(b.node(op, attrs, ins, name, "").unwrap()[0]);
        }
        let n = vals.len();
        let extra = vals[(rng.next() % n as u64) as usize];
        let mut outs = vec![vals[n - 1], vals[n - 2], extra];
        outs.dedup();
        b.finish(outs)
    }

    #[test]
    fn default_pipeline_preserves_random_graphs_bit_for_bit() {
        for seed in 1..=200 {
            let mut g = random_graph(seed);
            kiln_ir::verify(&g).unwrap();
            let before = g.clone();
            let report = default_pipeline()
                .run(&mut g)
                .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
            assert!(
                g.nodes.len() <= before.nodes.len(),
                "seed {seed}:\n{report}"
            );
            let names = |g: &Graph| {
                g.outputs
                    .iter()
                    .map(|&o| g.value(o).name.clone())
                    .collect::<Vec<_>>()
            };
            assert_eq!(
                names(&g),
                names(&before),
                "seed {seed}: output names are stable"
            );
            crate::testutil::assert_same_outputs(&before, &g);
            // A second run finds nothing left to do.
            let again = default_pipeline().run(&mut g).unwrap();
            assert!(
                again.passes.iter().all(|p| p.stats.is_noop()),
                "seed {seed}:\n{again}"
            );
        }
    }
}
