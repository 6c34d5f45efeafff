//! `hoist_shape_reads`: `shape(f(x, ..))` → `shape(x)` when `x` and `f`'s result have the
//! same fully known shape (fixed sizes, or the same symbols, which are equal by
//! definition), repeated up the chain of producers. Exporters take the shape of a
//! layer norm's output to build reshape targets: with the norm folded into the next matmul,
//! that `shape` was the norm's only reader and kept a whole layer norm running per layer.
//! Where the chain ends at a value that only shape reads need, the read moves to the
//! earliest value of the same fully known shape that is computed anyway (extraction may
//! pick `shape(matmul)` beside a `linear` that absorbed that matmul).
//! [`HoistShapeReadsLocal`], the one-step form, runs before the e-graph, after
//! `centre_mean_invariant` (an extra reader of `x` would hide from it that every other
//! reader of the residual stream is a layer norm); [`HoistShapeReads`] runs after the
//! e-graph. The result is exact (a `shape` reads no values); dead producers go in the next
//! `eliminate_dead_code`.

use crate::rewrite;
use crate::{Pass, PassError, PassStats};
use kiln_ir::{Dim, Graph, OpKind, Shape, ValueId};
use std::collections::HashMap;

/// Moves each `shape` to the earliest value of its input's shape.
#[derive(Clone, Copy, Debug, Default)]
pub struct HoistShapeReads;

/// The local form that runs before the e-graph: a read moves only through producers with
/// exactly one operand of its shape (a norm, an activation: `shape(layer_norm(x))` →
/// `shape(x)`), never through a residual sum to an earlier layer, and never to an unrelated
/// earlier value. Long-range reads there tied every layer to the first one, so stacked
/// layers no longer looked alike and ViT's whole-graph extraction came out dearer than its
/// input (6 of 18 linears fused instead of 18).
#[derive(Clone, Copy, Debug, Default)]
pub struct HoistShapeReadsLocal;

impl Pass for HoistShapeReadsLocal {
    fn name(&self) -> &'static str {
        "hoist_shape_reads_local"
    }

    fn run(&self, g: &mut Graph) -> Result<PassStats, PassError> {
        hoist(self.name(), g, true)
    }
}

impl Pass for HoistShapeReads {
    fn name(&self) -> &'static str {
        "hoist_shape_reads"
    }

    fn run(&self, g: &mut Graph) -> Result<PassStats, PassError> {
        hoist(self.name(), g, false)
    }
}

/// Both passes: each `shape` read moves up its chain of producers (see the module docs).
fn hoist(name: &'static str, g: &mut Graph, local: bool) -> Result<PassStats, PassError> {
    rewrite::check_ids(g).map_err(|m| PassError::graph(name, m))?;
    let producers = rewrite::producers(g);
    let needed = needed_for_values(g);
    let computed = computed_by_shape(g, &needed);
    let mut stats = PassStats::default();
    for i in 0..g.nodes.len() {
        if g.nodes[i].op != OpKind::Shape {
            continue;
        }
        let Some(x) = g.nodes[i].inputs.first().copied().flatten() else {
            continue;
        };
        let mut src = shape_source(g, &producers, x, local);
        if !local && !needed[src.index()] {
            let earlier = computed
                .get(&g.ty(src).shape)
                .filter(|&&(_, at)| at < i)
                .map(|&(v, _)| v);
            src = earlier.unwrap_or(src);
        }
        if src != x {
            g.nodes[i].inputs[0] = Some(src);
            stats.changed += 1;
            stats.bump("shape_reads_hoisted", 1);
        }
    }
    Ok(stats)
}

/// For each fully known shape, the earliest value of that shape that something other
/// than shape reads needs, with the index of the node defining it (0 for graph inputs).
fn computed_by_shape(g: &Graph, needed: &[bool]) -> HashMap<Shape, (ValueId, usize)> {
    let known = |v: ValueId| {
        g.ty(v)
            .shape
            .dims()
            .is_some_and(|d| d.iter().all(|d| !matches!(d, Dim::Unknown)))
    };
    let mut map = HashMap::new();
    let defs = g.inputs.iter().map(|&v| (v, 0)).chain(
        g.nodes
            .iter()
            .enumerate()
            .flat_map(|(i, n)| n.outputs.iter().map(move |&v| (v, i))),
    );
    for (v, at) in defs {
        if known(v) && needed[v.index()] {
            map.entry(g.ty(v).shape.clone()).or_insert((v, at));
        }
    }
    map
}

/// Per value: whether something other than a `shape` or `size` reads it, or it is a
/// graph output.
fn needed_for_values(g: &Graph) -> Vec<bool> {
    let mut needed = vec![false; g.values.len()];
    for &o in &g.outputs {
        needed[o.index()] = true;
    }
    for n in &g.nodes {
        if !matches!(n.op, OpKind::Shape | OpKind::Size) {
            for v in n.inputs.iter().flatten() {
                needed[v.index()] = true;
            }
        }
    }
    needed
}

/// The earliest value up `x`'s chain of producers with `x`'s shape: at each producer, its
/// first operand whose fully known shape equals the current value's.
/// With `local`, only through producers that have exactly one such operand.
fn shape_source(g: &Graph, producers: &[Option<usize>], x: ValueId, local: bool) -> ValueId {
    let known = |v: ValueId| {
        g.ty(v)
            .shape
            .dims()
            .is_some_and(|d| d.iter().all(|d| !matches!(d, Dim::Unknown)))
    };
    let mut cur = x;
    // Each step moves to an operand of an earlier node, so the walk ends.
    while known(cur) {
        let Some(j) = producers.get(cur.index()).copied().flatten() else {
            break;
        };
        let mut same_shaped = g.nodes[j]
            .inputs
            .iter()
            .flatten()
            .copied()
            .filter(|&v| g.ty(v).shape == g.ty(cur).shape);
        let same = same_shaped.next();
        if local && same_shaped.next().is_some() {
            break;
        }
        match same {
            Some(v) => cur = v,
            None => break,
        }
    }
    cur
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classic::EliminateDeadCode;
    use crate::testutil::*;
    use kiln_ir::{Attr, Attrs, DType, Shape, Tensor, TensorType};

    fn i64_ty(n: usize) -> TensorType {
        TensorType::new(DType::I64, Shape::fixed(&[n]))
    }

    #[test]
    fn shape_reads_through_shape_preserving_ops_and_the_dead_norm_goes() {
        let mut g = Graph::new("g");
        let ty = TensorType::new(
            DType::F32,
            Shape::new(vec![Dim::Sym("B".into()), Dim::Fixed(4)]),
        );
        let x = g.add_input("x", ty.clone());
        let w = g.add_constant("w", Tensor::from_vec(vec![4], vec![1.0f32; 4]));
        let ln = node(&mut g, OpKind::LayerNorm, &[x, w], "ln", ty.clone());
        let r = node(&mut g, OpKind::Relu, &[ln], "r", ty);
        let sh = node(&mut g, OpKind::Shape, &[r], "sh", i64_ty(2));
        g.outputs = vec![sh];
        let stats = HoistShapeReads.run(&mut g).unwrap();
        assert_eq!(stats.counter("shape_reads_hoisted"), 1);
        EliminateDeadCode.run(&mut g).unwrap();
        assert_eq!(ops(&g), vec![OpKind::Shape]);
        assert_eq!(g.nodes[0].inputs[0], Some(x));
    }

    #[test]
    fn a_value_only_shapes_need_gives_way_to_a_computed_one_of_the_same_shape() {
        let mut g = Graph::new("g");
        let b = |n| {
            TensorType::new(
                DType::F32,
                Shape::new(vec![Dim::Sym("B".into()), Dim::Fixed(n)]),
            )
        };
        let x = g.add_input("x", b(8));
        let w = g.add_constant("w", Tensor::from_vec(vec![8, 4], vec![1.0f32; 32]));
        let w2 = g.add_constant("w2", Tensor::from_vec(vec![8, 4], vec![2.0f32; 32]));
        let kept = node(&mut g, OpKind::MatMul, &[x, w2], "kept", b(4));
        assert_eq!(g.value(kept).name, "kept");
        let only_shape = node(&mut g, OpKind::MatMul, &[x, w], "only_shape", b(4));
        let sh = node(&mut g, OpKind::Shape, &[only_shape], "sh", i64_ty(2));
        g.outputs = vec![kept, sh];
        let stats = HoistShapeReads.run(&mut g).unwrap();
        assert_eq!(stats.counter("shape_reads_hoisted"), 1);
        EliminateDeadCode.run(&mut g).unwrap();
        let live: Vec<OpKind> = ops(&g)
            .into_iter()
            .filter(|&o| o != OpKind::Constant)
            .collect();
        assert_eq!(live, vec![OpKind::MatMul, OpKind::Shape]);
        let shape = g.nodes.iter().find(|n| n.op == OpKind::Shape).unwrap();
        let read = shape.inputs[0].unwrap();
        assert_eq!(g.value(read).name, "kept");
    }

    #[test]
    fn the_local_form_stops_at_a_residual_sum() {
        // shape(layer_norm(x + y)): the local form reads the sum (the norm's input), the
        // global one walks on through the sum to the graph input x.
        let mut g = Graph::new("g");
        let ty = f32_ty(&[2, 4]);
        let x = g.add_input("x", ty.clone());
        let y = g.add_input("y", ty.clone());
        let w = g.add_constant("w", Tensor::from_vec(vec![4], vec![1.0f32; 4]));
        let sum = node(&mut g, OpKind::Add, &[x, y], "sum", ty.clone());
        let ln = node(&mut g, OpKind::LayerNorm, &[sum, w], "ln", ty);
        let sh = node(&mut g, OpKind::Shape, &[ln], "sh", i64_ty(2));
        g.outputs = vec![ln, sh];
        let mut local = g.clone();
        assert_eq!(
            HoistShapeReadsLocal
                .run(&mut local)
                .unwrap()
                .counter("shape_reads_hoisted"),
            1
        );
        let read = |g: &Graph| {
            g.nodes
                .iter()
                .find(|n| n.op == OpKind::Shape)
                .unwrap()
                .inputs[0]
        };
        assert_eq!(read(&local), Some(sum));
        HoistShapeReads.run(&mut g).unwrap();
        assert_eq!(read(&g), Some(x));
    }

    #[test]
    fn shape_stays_where_the_shape_changes_or_is_unknown() {
        let mut g = Graph::new("g");
        let x = g.add_input("x", f32_ty(&[2, 3]));
        let perm = Attrs::new().with("perm", Attr::Ints(vec![1, 0]));
        let t = node_with(&mut g, OpKind::Transpose, perm, &[x], "t", f32_ty(&[3, 2]));
        let unknown = TensorType::new(DType::F32, Shape::new(vec![Dim::Unknown, Dim::Fixed(2)]));
        let u = node(&mut g, OpKind::Relu, &[t], "u", unknown);
        let s1 = node(&mut g, OpKind::Shape, &[t], "s1", i64_ty(2));
        let s2 = node(&mut g, OpKind::Shape, &[u], "s2", i64_ty(2));
        g.outputs = vec![s1, s2];
        let before = g.clone();
        assert!(HoistShapeReads.run(&mut g).unwrap().is_noop());
        assert_eq!(g, before);
    }
}
