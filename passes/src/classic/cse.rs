//! `eliminate_common_subexpressions`: merges nodes that compute the same thing — the same
//! op, bitwise-equal attributes and the same inputs — including `constant` nodes holding
//! bitwise-equal tensors. Uses of the later node's results move to the earlier node's.
//!
//! Attributes compare bitwise (so `0.0` and `-0.0`, or two NaNs with different payloads,
//! are different). Nodes with subgraph attributes (`if`) are never merged: what their
//! bodies capture is not part of the key.

use crate::rewrite::{self, Subst};
use crate::{Pass, PassError, PassStats};
use kiln_ir::{Attr, Attrs, Graph, Node, Tensor};
use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};

/// Common-subexpression elimination.
#[derive(Clone, Copy, Debug, Default)]
pub struct EliminateCommonSubexpressions;

impl Pass for EliminateCommonSubexpressions {
    fn name(&self) -> &'static str {
        "eliminate_common_subexpressions"
    }

    fn aliases(&self) -> &'static [&'static str] {
        &["cse"]
    }

    fn run(&self, g: &mut Graph) -> Result<PassStats, PassError> {
        rewrite::check_ids(g).map_err(|m| PassError::graph(self.name(), m))?;
        let mut stats = PassStats::default();
        let mut subst = Subst::new(g);
        // Key hash -> indices of earlier nodes with that hash.
        let mut seen: HashMap<u64, Vec<usize>> = HashMap::new();
        for i in 0..g.nodes.len() {
            subst.rewrite_inputs(&mut g.nodes[i]);
            let node = &g.nodes[i];
            if node.outputs.is_empty() || has_subgraph(&node.attrs) {
                continue;
            }
            let key = node_key(node);
            let bucket = seen.entry(key).or_default();
            match bucket
                .iter()
                .find(|&&j| same_computation(&g.nodes[j], node))
            {
                Some(&j) => {
                    for (&from, &to) in node.outputs.iter().zip(&g.nodes[j].outputs) {
                        subst.replace(from, to);
                    }
                    stats.changed += 1;
                    stats.bump(
                        if node.op == kiln_ir::OpKind::Constant {
                            "constants_merged"
                        } else {
                            "nodes_merged"
                        },
                        1,
                    );
                }
                None => bucket.push(i),
            }
        }
        subst.apply(g);
        stats.removed = rewrite::remove_dead(g);
        Ok(stats)
    }
}

fn has_subgraph(attrs: &Attrs) -> bool {
    attrs.0.values().any(|a| matches!(a, Attr::Graph(_)))
}

/// True if two nodes compute the same results from the same operands.
fn same_computation(a: &Node, b: &Node) -> bool {
    a.op == b.op
        && a.inputs == b.inputs
        && a.outputs.len() == b.outputs.len()
        && attrs_eq(&a.attrs, &b.attrs)
}

/// Bitwise equality of attribute dictionaries.
pub(crate) fn attrs_eq(a: &Attrs, b: &Attrs) -> bool {
    a.0.len() == b.0.len()
        && a.0
            .iter()
            .zip(&b.0)
            .all(|((ka, va), (kb, vb))| ka == kb && attr_eq(va, vb))
}

fn attr_eq(a: &Attr, b: &Attr) -> bool {
    let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    match (a, b) {
        (Attr::Float(x), Attr::Float(y)) => x.to_bits() == y.to_bits(),
        (Attr::Floats(x), Attr::Floats(y)) => bits(x) == bits(y),
        // Tensor equality is bitwise (dtype, shape and bytes).
        (Attr::Tensor(x), Attr::Tensor(y)) => std::sync::Arc::ptr_eq(x, y) || x == y,
        (Attr::Graph(_), _) | (_, Attr::Graph(_)) => false,
        _ => a == b,
    }
}

/// A hash consistent with [`same_computation`].
fn node_key(n: &Node) -> u64 {
    let mut h = DefaultHasher::new();
    n.op.hash(&mut h);
    n.inputs.hash(&mut h);
    n.outputs.len().hash(&mut h);
    for (k, v) in &n.attrs.0 {
        k.hash(&mut h);
        hash_attr(v, &mut h);
    }
    h.finish()
}

fn hash_attr(a: &Attr, h: &mut DefaultHasher) {
    std::mem::discriminant(a).hash(h);
    match a {
        Attr::Int(x) => x.hash(h),
        Attr::Float(x) => x.to_bits().hash(h),
        Attr::Str(s) => s.hash(h),
        Attr::Ints(x) => x.hash(h),
        Attr::Floats(x) => x.iter().for_each(|f| f.to_bits().hash(h)),
        Attr::Strs(x) => x.hash(h),
        Attr::Tensor(t) => hash_tensor(t, h),
        Attr::Graph(_) => {}
    }
}

fn hash_tensor(t: &Tensor, h: &mut DefaultHasher) {
    t.dtype().hash(h);
    t.shape().hash(h);
    // A sample: the table compares equal-hash candidates in full.
    crate::egraph::lang::hash_sampled(t, h);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use kiln_ir::{OpKind, Tensor, ValueId};

    fn cse(g: &mut Graph) -> PassStats {
        EliminateCommonSubexpressions.run(g).unwrap()
    }

    #[test]
    fn bitwise_equal_constants_merge_and_outputs_keep_names() {
        let mut g = Graph::new("g");
        let a = g.add_constant("a", Tensor::from_vec(vec![2], vec![1.0f32, f32::NAN]));
        let b = g.add_constant("b", Tensor::from_vec(vec![2], vec![1.0f32, f32::NAN]));
        let c = g.add_constant("c", Tensor::from_vec(vec![2], vec![1.0f32, 2.0]));
        g.outputs = vec![a, b, c];
        let stats = cse(&mut g);
        assert_eq!(stats.counter("constants_merged"), 1);
        // `a` and `b` are now one value; `b` keeps its name through an identity.
        assert_eq!(g.outputs[0], g.nodes[0].outputs[0]);
        let names: Vec<_> = g
            .outputs
            .iter()
            .map(|&o| g.value(o).name.as_str())
            .collect();
        assert_eq!(names, vec!["a", "b", "c"]);
        assert_eq!(
            g.nodes.iter().filter(|n| n.op == OpKind::Constant).count(),
            2
        );
    }

    #[test]
    fn constants_differing_in_sign_of_zero_or_dtype_stay_apart() {
        let mut g = Graph::new("g");
        let a = g.add_constant("a", Tensor::scalar(0.0f32));
        let b = g.add_constant("b", Tensor::scalar(-0.0f32));
        let c = g.add_constant("c", Tensor::scalar(0.0f64));
        let d = g.add_constant("d", Tensor::from_vec(vec![1], vec![0.0f32]));
        g.outputs = vec![a, b, c, d];
        let stats = cse(&mut g);
        assert!(stats.is_noop());
        assert_eq!(g.nodes.len(), 4);
        kiln_ir::verify(&g).unwrap();
    }

    #[test]
    fn duplicate_nodes_merge_transitively() {
        let mut g = Graph::new("g");
        let x = g.add_input("x", f32_ty(&[3]));
        let r1 = node(&mut g, OpKind::Relu, &[x], "r1", f32_ty(&[3]));
        let r2 = node(&mut g, OpKind::Relu, &[x], "r2", f32_ty(&[3]));
        let e1 = node(&mut g, OpKind::Exp, &[r1], "e1", f32_ty(&[3]));
        let e2 = node(&mut g, OpKind::Exp, &[r2], "e2", f32_ty(&[3]));
        let s = node(&mut g, OpKind::Add, &[e1, e2], "s", f32_ty(&[3]));
        g.outputs = vec![s];
        let stats = cse(&mut g);
        assert_eq!(stats.counter("nodes_merged"), 2);
        assert_eq!(stats.removed, 2);
        assert_eq!(ops(&g), vec![OpKind::Relu, OpKind::Exp, OpKind::Add]);
        let e = g.nodes[1].outputs[0];
        assert_eq!(g.nodes[2].inputs, vec![Some(e), Some(e)]);
        assert_eq!(g.value(g.outputs[0]).name, "s");
    }

    #[test]
    fn nodes_with_different_attrs_or_input_order_stay_apart() {
        let mut g = Graph::new("g");
        let x = g.add_input("x", f32_ty(&[3]));
        let y = g.add_input("y", f32_ty(&[3]));
        let alpha = |a: f32| Attrs::new().with("alpha", Attr::Float(a));
        let l1 = node_with(
            &mut g,
            OpKind::LeakyRelu,
            alpha(0.1),
            &[x],
            "l1",
            f32_ty(&[3]),
        );
        let l2 = node_with(
            &mut g,
            OpKind::LeakyRelu,
            alpha(0.2),
            &[x],
            "l2",
            f32_ty(&[3]),
        );
        let s1 = node(&mut g, OpKind::Sub, &[x, y], "s1", f32_ty(&[3]));
        let s2 = node(&mut g, OpKind::Sub, &[y, x], "s2", f32_ty(&[3]));
        g.outputs = vec![l1, l2, s1, s2];
        assert!(cse(&mut g).is_noop());
        assert_eq!(g.nodes.len(), 4);
    }

    #[test]
    fn merged_graph_output_gets_identity_keeping_its_name() {
        let mut g = Graph::new("g");
        let x = g.add_input("x", f32_ty(&[3]));
        let r1 = node(&mut g, OpKind::Relu, &[x], "r1", f32_ty(&[3]));
        let r2 = node(&mut g, OpKind::Relu, &[x], "r2", f32_ty(&[3]));
        g.outputs = vec![r1, r2];
        cse(&mut g);
        assert_eq!(ops(&g), vec![OpKind::Relu, OpKind::Identity]);
        assert_eq!(g.value(g.outputs[1]).name, "r2");
        assert_eq!(g.nodes[1].inputs, vec![Some(r1)]);
        assert!(g.values.len() == 3 && g.outputs[1] == ValueId(2));
    }

    #[test]
    fn cse_preserves_results_numerically() {
        let mut g = Graph::new("g");
        let x = g.add_input("x", f32_ty(&[3]));
        let r1 = node(&mut g, OpKind::Relu, &[x], "r1", f32_ty(&[3]));
        let r2 = node(&mut g, OpKind::Relu, &[x], "r2", f32_ty(&[3]));
        let s = node(&mut g, OpKind::Mul, &[r1, r2], "s", f32_ty(&[3]));
        g.outputs = vec![s];
        let before = g.clone();
        cse(&mut g);
        assert_eq!(ops(&g), vec![OpKind::Relu, OpKind::Mul]);
        kiln_ir::verify(&g).unwrap();
        assert_same_outputs(&before, &g);
    }
}
