//! `fold_constants`: evaluates at compile time what does not depend on graph inputs.
//!
//! Two sources of constants: nodes whose operands are all constants are evaluated with
//! the reference semantics (`kiln_ir::ops::eval`), and values whose [`kiln_ir::Fact`] has
//! known contents (`konst`) become constants even when their operands are not — e.g.
//! `shape(x)` of an `x` with static dims, and the `gather`/`concat` shape arithmetic on
//! it. Values only known symbolically (`[B, 16]` from `shape(x)` with a symbolic `B`)
//! are left as they are. A folded node is turned into a `constant` node in place, so its
//! value keeps its id and name.
//!
//! `identity` nodes are not folded (see the comment in `run`).
//!
//! Size limit: a result bigger than `max_elems` is only materialised when it replaces
//! large constants that die with it (so folding `transpose(W)` of a single-use weight is
//! fine, but broadcasting a scalar into a huge tensor, or copying a weight that is also
//! used elsewhere, is not).

use crate::rewrite::{self, Namer, Subst};
use crate::{Pass, PassError, PassStats};
use kiln_ir::{ops, Attr, Attrs, Fact, Graph, Node, OpKind, Shape, Tensor, TensorData, TensorType};
use std::sync::Arc;

/// Constant folding.
#[derive(Clone, Copy, Debug)]
pub struct FoldConstants {
    /// Results with more elements than this are not materialised unless they replace
    /// at least as many elements of constants that become dead.
    pub max_elems: usize,
}

impl Default for FoldConstants {
    fn default() -> FoldConstants {
        FoldConstants {
            max_elems: kiln_ir::infer::FOLD_LIMIT_ELEMS,
        }
    }
}

const NAME: &str = "fold_constants";

/// Bytes of evaluation budget per operand element: a gathered element's index and value.
const FOLD_BYTES_PER_ELEM: usize = 16;

impl Pass for FoldConstants {
    fn name(&self) -> &'static str {
        NAME
    }

    fn run(&self, g: &mut Graph) -> Result<PassStats, PassError> {
        rewrite::check_ids(g).map_err(|m| PassError::graph(NAME, m))?;
        let facts = kiln_ir::infer::facts(g).map_err(|e| PassError::graph(NAME, e))?;
        let mut known: Vec<Option<Arc<Tensor>>> = facts.iter().map(konst_of).collect();
        known.resize(g.values.len(), None);
        let uses = rewrite::use_counts(g);
        let mut stats = PassStats::default();
        let mut subst = Subst::new(g);
        let mut namer = Namer::new(g);
        let mut inserts: Vec<(usize, Node)> = Vec::new();
        for i in 0..g.nodes.len() {
            if g.nodes[i].op == OpKind::Constant || g.nodes[i].op.holds_graphs() {
                continue;
            }
            if g.nodes[i].op == OpKind::Identity {
                // Left in place: an identity that survives `simplify_ops` keeps a graph
                // output's name, and folding it would copy its operand (and then
                // `eliminate_common_subexpressions` would bring the identity back).
                if let (Some(Some(x)), [o]) = (g.nodes[i].inputs.first(), &g.nodes[i].outputs[..]) {
                    if known[o.index()].is_none() {
                        known[o.index()] = known[x.index()].clone();
                    }
                }
                continue;
            }
            let node = g.nodes[i].clone();
            let operands: Option<Vec<Option<Arc<Tensor>>>> = node
                .inputs
                .iter()
                .map(|v| match v {
                    None => Some(None),
                    Some(v) => known.get(v.index())?.clone().map(Some),
                })
                .collect();
            if let Some(operands) = &operands {
                if node.outputs.iter().any(|o| known[o.index()].is_none()) {
                    let refs: Vec<Option<&Tensor>> =
                        operands.iter().map(|t| t.as_deref()).collect();
                    // Evaluated under a budget: what the operands hold (a transposed
                    // weight), or the fold limit when they are small, so that a tiny
                    // constant_of_shape/expand/tile/range asking for gigabytes stays a node.
                    let operand_elems: usize = refs.iter().flatten().map(|t| t.len()).sum();
                    let budget = kiln_ir::infer::FOLD_BUDGET_BYTES
                        .max(operand_elems.saturating_mul(FOLD_BYTES_PER_ELEM));
                    let evaluated = kiln_ir::limits::with_budget(budget, || {
                        ops::eval(node.op, &node.attrs, &refs)
                    });
                    match evaluated {
                        Ok(outs) if outs.len() == node.outputs.len() => {
                            for (t, &o) in outs.into_iter().zip(&node.outputs) {
                                if known[o.index()].is_none() && fits(g.ty(o), &t) {
                                    known[o.index()] = Some(Arc::new(t));
                                }
                            }
                        }
                        // An op that cannot be evaluated here (not implemented, or an
                        // error the interpreter will report at run time) stays a node.
                        _ => stats.bump("eval_failed", 1),
                    }
                }
            }
            // Elements of large constant operands that die when this node is folded.
            let freed: usize = node
                .inputs
                .iter()
                .flatten()
                .filter_map(|v| Some((v, known.get(v.index())?.as_ref()?)))
                .filter(|(v, t)| t.len() > self.max_elems && uses[v.index()] == 1)
                .map(|(_, t)| t.len())
                .sum();
            let large_operand_survives = node.inputs.iter().flatten().any(|v| {
                known[v.index()]
                    .as_ref()
                    .is_some_and(|t| t.len() > self.max_elems && uses[v.index()] > 1)
            });
            let out_elems: Option<usize> = node
                .outputs
                .iter()
                .map(|o| known[o.index()].as_ref().map(|t| t.len()))
                .sum();
            let allowed = |t: &Tensor| {
                t.len() <= self.max_elems
                    || (operands.is_some()
                        && !large_operand_survives
                        && out_elems.is_some_and(|n| n <= freed))
            };
            let foldable: Vec<bool> = node
                .outputs
                .iter()
                .map(|o| known[o.index()].as_ref().is_some_and(|t| allowed(t)))
                .collect();
            if foldable.iter().all(|&f| f) {
                // Every result is known: the node itself becomes constant(s).
                for (k, &o) in node.outputs.iter().enumerate() {
                    let t = known[o.index()].clone().expect("foldable means known");
                    let c = constant_node(t.clone(), o, &node.name);
                    g.values[o.index()].ty = fixed_type(&t);
                    if k == 0 {
                        g.nodes[i] = c;
                    } else {
                        inserts.push((i, c));
                        stats.added += 1;
                    }
                }
                stats.changed += 1;
                stats.bump(
                    if operands.is_some() {
                        "nodes_evaluated"
                    } else {
                        "facts_materialised"
                    },
                    1,
                );
            } else {
                // Some results are known: give them their own constants and move the uses.
                for (&o, &f) in node.outputs.iter().zip(&foldable) {
                    if !f || uses[o.index()] == 0 {
                        continue;
                    }
                    let t = known[o.index()].clone().expect("foldable means known");
                    let base = g.value(o).name.clone();
                    let c = namer.add_value(g, &base, fixed_type(&t));
                    known.push(Some(t.clone()));
                    inserts.push((i, constant_node(t, c, "")));
                    subst.replace(o, c);
                    stats.added += 1;
                    stats.bump("outputs_materialised", 1);
                }
            }
        }
        rewrite::insert_nodes(g, inserts);
        subst.apply(g);
        stats.removed = rewrite::remove_dead(g);
        Ok(stats)
    }
}

/// The contents a fact knows: its `konst`, or its `dims` when every one is a fixed size
/// (`shape(x)` of a static `x`), as a tensor of the fact's integer type.
fn konst_of(f: &Fact) -> Option<Arc<Tensor>> {
    if let Some(k) = &f.konst {
        return Some(k.clone());
    }
    let dims = f.dims.as_ref()?;
    if !f.ty.dtype.is_int() {
        return None;
    }
    let shape = f.ty.shape.concrete()?;
    if shape.len() > 1 || shape.iter().product::<usize>() != dims.len() {
        return None;
    }
    let xs: Vec<i64> = dims
        .iter()
        .map(|d| d.fixed().and_then(|n| i64::try_from(n).ok()))
        .collect::<Option<_>>()?;
    let data = TensorData::from_i64s(f.ty.dtype, xs.into_iter());
    Tensor::new(shape, data).ok().map(Arc::new)
}

/// True if an evaluated tensor agrees with the value's declared type.
fn fits(ty: &TensorType, t: &Tensor) -> bool {
    t.dtype() == ty.dtype && ty.shape.admits(t.shape())
}

fn fixed_type(t: &Tensor) -> TensorType {
    TensorType::new(t.dtype(), Shape::fixed(t.shape()))
}

fn constant_node(t: Arc<Tensor>, out: kiln_ir::ValueId, name: &str) -> Node {
    Node {
        op: OpKind::Constant,
        attrs: Attrs::new().with("value", Attr::Tensor(t)),
        inputs: vec![],
        outputs: vec![out],
        name: name.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use kiln_ir::{DType, Dim, GraphBuilder, ValueId};

    fn fold(g: &mut Graph) -> PassStats {
        FoldConstants::default().run(g).unwrap()
    }

    #[test]
    fn constant_only_graph_is_unchanged() {
        let mut g = Graph::new("g");
        let x = g.add_input("x", f32_ty(&[2]));
        let k = g.add_constant("k", Tensor::scalar(3i64));
        g.outputs = vec![x, k];
        let before = g.clone();
        let stats = fold(&mut g);
        assert!(stats.is_noop(), "{stats}");
        assert_eq!(g, before);
        assert_same_outputs(&before, &g);
    }

    #[test]
    fn unevaluable_node_on_constants_is_kept_and_counted() {
        // `fold_constants` must not fail when an op cannot be evaluated at compile time.
        // (Uses the raw graph: shape inference of `neg` may not exist yet, so the facts
        // are computed only when it does.)
        let mut g = Graph::new("g");
        let k = g.add_constant("k", Tensor::scalar(3.0f32));
        let n = node(&mut g, OpKind::Neg, &[k], "n", f32_ty(&[]));
        g.outputs = vec![n];
        match FoldConstants::default().run(&mut g) {
            Ok(stats) => {
                // Ops have landed: `neg` folded to a constant holding -3.
                assert_eq!(ops(&g), vec![OpKind::Constant]);
                assert_eq!(stats.counter("nodes_evaluated"), 1);
                let t = g.constant_value(g.outputs[0]).unwrap();
                assert_eq!(t.as_slice::<f32>().unwrap(), &[-3.0]);
                assert_eq!(g.value(g.outputs[0]).name, "n");
            }
            Err(e) => assert!(
                e.to_string().starts_with("running pass fold_constants"),
                "{e}"
            ),
        }
    }

    fn add_chain() -> Graph {
        // out = (a + b) * x, with a and b constants: only the add folds.
        let mut g = Graph::new("g");
        let x = g.add_input("x", f32_ty(&[3]));
        let a = g.add_constant("a", Tensor::from_vec(vec![3], vec![1.0f32, 2.0, 3.0]));
        let b = g.add_constant("b", Tensor::from_vec(vec![3], vec![0.5f32, 0.25, 8.0]));
        let s = node(&mut g, OpKind::Add, &[a, b], "s", f32_ty(&[3]));
        let out = node(&mut g, OpKind::Mul, &[s, x], "out", f32_ty(&[3]));
        g.outputs = vec![out];
        g
    }

    #[test]
    fn node_on_constants_becomes_a_constant_keeping_its_name() {
        let mut g = add_chain();
        let before = g.clone();
        let stats = fold(&mut g);
        assert_eq!(stats.counter("nodes_evaluated"), 1);
        assert_eq!(stats.removed, 2, "a and b die");
        assert_eq!(ops(&g), vec![OpKind::Constant, OpKind::Mul]);
        assert_eq!(g.value(g.nodes[0].outputs[0]).name, "s");
        let t = g.constant_value(g.nodes[0].outputs[0]).unwrap();
        assert_eq!(t.as_slice::<f32>().unwrap(), &[1.5, 2.25, 11.0]);
        kiln_ir::verify(&g).unwrap();
        assert_same_outputs(&before, &g);
    }

    #[test]
    fn large_results_are_not_materialised_but_single_use_weights_are_replaced() {
        // broadcast: small operands, big result -> not folded.
        let mut g = Graph::new("g");
        let one = g.add_constant("one", Tensor::scalar(1.0f32));
        let big = g.add_constant("big", Tensor::zeros(DType::F32, vec![64]));
        let sum = node(&mut g, OpKind::Add, &[one, big], "sum", f32_ty(&[64]));
        let neg = node(&mut g, OpKind::Neg, &[big], "neg", f32_ty(&[64]));
        g.outputs = vec![sum, neg];
        let before = g.clone();
        let stats = FoldConstants { max_elems: 16 }.run(&mut g).unwrap();
        // `big` is used twice, so neither result may copy it.
        assert!(stats.is_noop(), "{stats}");
        assert_eq!(g, before);

        // A single-use weight transformed once is replaced by its result.
        let mut g = Graph::new("g");
        let w = g.add_constant("w", Tensor::zeros(DType::F32, vec![64]));
        let neg = node(&mut g, OpKind::Neg, &[w], "neg", f32_ty(&[64]));
        g.outputs = vec![neg];
        let before = g.clone();
        let stats = FoldConstants { max_elems: 16 }.run(&mut g).unwrap();
        assert_eq!((stats.changed, stats.removed), (1, 1));
        assert_eq!(ops(&g), vec![OpKind::Constant]);
        assert_same_outputs(&before, &g);
    }

    #[test]
    fn small_result_of_a_multi_output_node_is_materialised_alone() {
        // split(w, [2, 18]) where w is also used elsewhere: only the small half folds.
        let mut g = Graph::new("g");
        let w = g.add_constant(
            "w",
            Tensor::from_vec(vec![20], (0..20).map(|i| i as f32).collect()),
        );
        let sizes = g.add_constant("sizes", Tensor::from_vec(vec![2], vec![2i64, 18]));
        let parts = g.add_node(
            OpKind::Split,
            Attrs::new(),
            vec![Some(w), Some(sizes)],
            vec![("lo".into(), f32_ty(&[2])), ("hi".into(), f32_ty(&[18]))],
            "",
        );
        let n = node(&mut g, OpKind::Neg, &[w], "n", f32_ty(&[20]));
        g.outputs = vec![parts[0], parts[1], n];
        kiln_ir::verify(&g).unwrap();
        let before = g.clone();
        let stats = FoldConstants { max_elems: 4 }.run(&mut g).unwrap();
        assert_eq!(stats.counter("outputs_materialised"), 1, "{stats}");
        assert_eq!(g.value(g.outputs[0]).name, "lo");
        let lo = g.constant_value(g.outputs[0]).unwrap();
        assert_eq!(lo.as_slice::<f32>().unwrap(), &[0.0, 1.0]);
        assert!(g.nodes.iter().any(|n| n.op == OpKind::Split));
        kiln_ir::verify(&g).unwrap();
        assert_same_outputs(&before, &g);
    }

    #[test]
    fn out_of_range_ids_are_an_error_not_a_panic() {
        let mut g = Graph::new("g");
        g.outputs = vec![ValueId(3)];
        let e = FoldConstants::default().run(&mut g).unwrap_err();
        assert!(e.to_string().contains("out of range"), "{e}");
        assert!(crate::classic::SimplifyOps.run(&mut g).is_err());
        assert!(crate::classic::EliminateCommonSubexpressions
            .run(&mut g)
            .is_err());
        assert!(crate::classic::EliminateDeadCode.run(&mut g).is_err());
    }

    fn shape_chain(batch: Dim) -> Graph {
        // shape(x) -> gather([1]) -> concat with [-1] -> reshape(x, ...)
        let mut b = GraphBuilder::new("g");
        let x = b.input(
            "x",
            TensorType::new(
                DType::F32,
                Shape::new(vec![batch, Dim::Fixed(4), Dim::Fixed(2)]),
            ),
        );
        let out = |n: &str| vec![(n.to_string(), None)];
        let sh = b
            .node(OpKind::Shape, Attrs::new(), vec![Some(x)], out("sh"), "")
            .unwrap()[0];
        let idx = b
            .node(
                OpKind::Constant,
                Attrs::new().with(
                    "value",
                    Attr::Tensor(Arc::new(Tensor::from_vec(vec![1], vec![0i64]))),
                ),
                vec![],
                out("idx"),
                "",
            )
            .unwrap()[0];
        let d0 = b
            .node(
                OpKind::Gather,
                Attrs::new(),
                vec![Some(sh), Some(idx)],
                out("d0"),
                "",
            )
            .unwrap()[0];
        let m1 = b
            .node(
                OpKind::Constant,
                Attrs::new().with(
                    "value",
                    Attr::Tensor(Arc::new(Tensor::from_vec(vec![1], vec![-1i64]))),
                ),
                vec![],
                out("m1"),
                "",
            )
            .unwrap()[0];
        let target = b
            .node(
                OpKind::Concat,
                Attrs::new().with("axis", Attr::Int(0)),
                vec![Some(d0), Some(m1)],
                out("target"),
                "",
            )
            .unwrap()[0];
        let r = b
            .node(
                OpKind::Reshape,
                Attrs::new(),
                vec![Some(x), Some(target)],
                out("r"),
                "",
            )
            .unwrap()[0];
        b.finish(vec![r])
    }

    #[test]
    fn static_shape_arithmetic_becomes_a_constant() {
        let mut g = shape_chain(Dim::Fixed(5));
        let before = g.clone();
        let stats = fold(&mut g);
        assert!(stats.counter("facts_materialised") >= 1, "{stats}");
        assert_eq!(ops(&g), vec![OpKind::Constant, OpKind::Reshape]);
        let t = g.constant_value(g.nodes[1].inputs[1].unwrap()).unwrap();
        assert_eq!(t.to_i64s(), vec![5, -1]);
        kiln_ir::verify(&g).unwrap();
        assert_same_outputs(&before, &g);
    }

    #[test]
    fn symbolic_shape_arithmetic_is_left_alone() {
        let mut g = shape_chain(Dim::Sym("B".into()));
        let before = g.clone();
        fold(&mut g);
        assert_eq!(
            ops(&g),
            vec![
                OpKind::Shape,
                OpKind::Constant,
                OpKind::Gather,
                OpKind::Constant,
                OpKind::Concat,
                OpKind::Reshape
            ]
        );
        kiln_ir::verify(&g).unwrap();
        assert_same_outputs(&before, &g);
    }
}
