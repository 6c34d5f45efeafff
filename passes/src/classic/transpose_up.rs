//! `move_transposes_up`: a `transpose` of an elementwise chain computed only for it moves
//! onto the chain's operands, where they are smaller than the result (broadcast operands:
//! Mamba's `exp(A ⊙ Δ)` over `[B, D, S, N]` from `[D, N]` and `[B, D, S]`), so the chain's
//! loop kernel writes the transposed layout itself and no full-size copy is made.
//! Exact: an elementwise op reads the same elements in any layout.
//!
//! It runs after `select_recurrence_form`, on the steps-first transposes that rolling puts
//! in front of per-step reads, and not earlier, so the pattern fusions see the exported
//! graph as it came.

use crate::rewrite::{self, Namer, Subst};
use crate::{Pass, PassError, PassStats};
use kiln_ir::ops::Family;
use kiln_ir::{Attr, Attrs, DType, Dim, Graph, Node, OpKind, Shape, Tensor, TensorType, ValueId};
use std::sync::Arc;

/// The pass: see the module docs.
#[derive(Clone, Copy, Debug, Default)]
pub struct MoveTransposesUp;

/// Elements of a type, symbolic dims counted as 1 (they cancel in the comparisons here).
fn elems(ty: &TensorType) -> Option<f64> {
    Some(
        ty.shape
            .dims()?
            .iter()
            .map(|d| d.fixed().unwrap_or(1) as f64)
            .product(),
    )
}

/// An op the rewrite may move a transpose through: elementwise, broadcasting.
fn movable(op: OpKind) -> bool {
    (op.family() == Family::Elementwise || op == OpKind::Silu) && !matches!(op, OpKind::CastLike)
}

struct Mover<'a> {
    g: &'a mut Graph,
    producer: Vec<Option<usize>>,
    uses: Vec<usize>,
    namer: Namer,
    nodes: Vec<Node>,
}

impl Mover<'_> {
    /// Whether `v` is an elementwise result read only by the transpose being moved.
    fn through(&self, v: ValueId) -> Option<&Node> {
        let n = &self.g.nodes[self.producer.get(v.index()).copied().flatten()?];
        (movable(n.op)
            && self.uses.get(v.index()) == Some(&1)
            && !self.g.outputs.contains(&v)
            && n.outputs.len() == 1
            && n.inputs.iter().all(Option::is_some))
        .then_some(n)
    }

    /// Elements the transposes cost if moved onto `v`'s elementwise operands (recursively),
    /// for a value of rank `rank`.
    fn cost(&self, v: ValueId, rank: usize) -> Option<f64> {
        let own = elems(self.g.ty(v))?;
        let Some(n) = self.through(v) else {
            return Some(own);
        };
        let mut sum = 0.0;
        for i in n.inputs.iter().flatten() {
            let r = self.g.ty(*i).shape.rank()?;
            sum += if r == 0 {
                0.0
            } else if r == rank {
                self.cost(*i, rank)?
            } else {
                elems(self.g.ty(*i))?
            };
        }
        Some(sum.min(own))
    }

    fn push(
        &mut self,
        op: OpKind,
        attrs: Attrs,
        inputs: Vec<ValueId>,
        name: &str,
        ty: TensorType,
    ) -> ValueId {
        let v = self.namer.add_value(self.g, name, ty);
        self.nodes.push(Node {
            op,
            attrs,
            inputs: inputs.into_iter().map(Some).collect(),
            outputs: vec![v],
            name: String::new(),
        });
        v
    }

    /// `v` transposed by `perm` (of `v`'s rank after unit axes in front): the chain
    /// recomputed on transposed operands where that is cheaper, else one transpose.
    fn transposed(&mut self, v: ValueId, perm: &[i64]) -> Option<ValueId> {
        let ty = self.g.ty(v).clone();
        let dims = ty.shape.dims()?.to_vec();
        let rank = perm.len();
        if dims.is_empty() {
            return Some(v);
        }
        let name = format!("{}_t", self.g.value(v).name);
        // A lower-rank operand gets unit axes in front first (broadcasting aligns right).
        let (v, dims) = if dims.len() < rank {
            let pad = rank - dims.len();
            let axes: Vec<i64> = (0..pad as i64).collect();
            let axes_t = Tensor::from_vec(vec![pad], axes);
            let axes_ty = TensorType::new(DType::I64, Shape::fixed(&[pad]));
            let c = self.namer.add_value(self.g, "axes", axes_ty);
            self.nodes.push(Node {
                op: OpKind::Constant,
                attrs: Attrs::new().with("value", Attr::Tensor(Arc::new(axes_t))),
                inputs: vec![],
                outputs: vec![c],
                name: String::new(),
            });
            let mut full = vec![Dim::Fixed(1); pad];
            full.extend(dims);
            let ty = TensorType::new(ty.dtype, Shape::new(full.clone()));
            (
                self.push(OpKind::Unsqueeze, Attrs::new(), vec![v, c], &name, ty),
                full,
            )
        } else {
            (v, dims)
        };
        let out_dims: Vec<Dim> = perm.iter().map(|&p| dims[p as usize].clone()).collect();
        let out_ty = TensorType::new(ty.dtype, Shape::new(out_dims));
        let chain = self.through(v).cloned().filter(|_| {
            self.cost(v, rank)
                .zip(elems(&out_ty))
                .is_some_and(|(c, o)| c < o)
        });
        match chain {
            Some(n) => {
                let mut ins = vec![];
                for i in n.inputs.iter().flatten() {
                    ins.push(self.transposed(*i, perm)?);
                }
                Some(self.push(n.op, n.attrs.clone(), ins, &name, out_ty))
            }
            None => {
                let attrs = Attrs::new().with("perm", Attr::Ints(perm.to_vec()));
                Some(self.push(OpKind::Transpose, attrs, vec![v], &name, out_ty))
            }
        }
    }
}

impl Pass for MoveTransposesUp {
    fn name(&self) -> &'static str {
        "move_transposes_up"
    }

    fn run(&self, g: &mut Graph) -> Result<PassStats, PassError> {
        let mut stats = PassStats::default();
        // The indexes are built once and again only after a rewrite (which moves nodes).
        let mut index = None;
        let mut namer = Namer::new(g);
        let mut ti = 0;
        while ti < g.nodes.len() {
            let n = &g.nodes[ti];
            let (Some(Some(x)), [y], OpKind::Transpose) =
                (n.inputs.first(), n.outputs.as_slice(), n.op)
            else {
                ti += 1;
                continue;
            };
            let (x, y) = (*x, *y);
            let rank = g.ty(x).shape.rank();
            // A permutation of the operand's axes (the verifier checked; this pass must not
            // index out of range on anything else).
            let perm = n.attrs.ints("perm").ok().flatten().filter(|p| {
                let mut seen = vec![false; p.len()];
                p.iter().all(|&a| {
                    usize::try_from(a)
                        .is_ok_and(|a| a < seen.len() && !std::mem::replace(&mut seen[a], true))
                })
            });
            let (Some(perm), Some(rank)) = (perm, rank) else {
                ti += 1;
                continue;
            };
            let (producer, uses) =
                index.get_or_insert_with(|| (rewrite::producers(g), rewrite::use_counts(g)));
            let mut m = Mover {
                producer: std::mem::take(producer),
                uses: std::mem::take(uses),
                namer: std::mem::take(&mut namer),
                nodes: vec![],
                g,
            };
            let worth = m.through(x).is_some()
                && perm.len() == rank
                && m.cost(x, rank)
                    .zip(elems(m.g.ty(y)))
                    .is_some_and(|(c, o)| c < o);
            let moved = if worth { m.transposed(x, &perm) } else { None };
            let nodes = std::mem::take(&mut m.nodes);
            namer = std::mem::take(&mut m.namer);
            let (producer, uses) = (m.producer, m.uses);
            match moved {
                Some(root) => {
                    let added = nodes.len();
                    rewrite::insert_nodes(g, nodes.into_iter().map(|n| (ti, n)).collect());
                    let mut sub = Subst::new(g);
                    sub.replace(y, root);
                    sub.apply(g);
                    stats.changed += 1;
                    stats.added += added;
                    stats.bump("transposes_moved", 1);
                    index = None;
                    ti += added + 1;
                }
                None => {
                    index = Some((producer, uses));
                    ti += 1;
                }
            }
        }
        if stats.changed > 0 {
            stats.removed += rewrite::remove_dead(g);
        }
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{assert_same_outputs, f32_ty, node, node_with, ops};

    /// `transpose(exp(a ⊙ b) ⊙ c)` with `a: [1, 4, 1, 3]`, `b: [2, 4, 5, 1]`, `c: [5, 1]` read
    /// as `[2, 4, 5, 3]` and transposed steps-first (`[2, 0, 1, 3]`).
    fn chain(extra_use: bool) -> Graph {
        let mut g = Graph::new("chain");
        let a = g.add_input("a", f32_ty(&[1, 4, 1, 3]));
        let b = g.add_input("b", f32_ty(&[2, 4, 5, 1]));
        let c = g.add_input("c", f32_ty(&[5, 1]));
        let m = node(&mut g, OpKind::Mul, &[a, b], "m", f32_ty(&[2, 4, 5, 3]));
        let e = node(&mut g, OpKind::Exp, &[m], "e", f32_ty(&[2, 4, 5, 3]));
        let f = node(&mut g, OpKind::Mul, &[e, c], "f", f32_ty(&[2, 4, 5, 3]));
        let perm = Attrs::new().with("perm", Attr::Ints(vec![2, 0, 1, 3]));
        let t = node_with(
            &mut g,
            OpKind::Transpose,
            perm,
            &[f],
            "t",
            f32_ty(&[5, 2, 4, 3]),
        );
        g.outputs = vec![t];
        if extra_use {
            g.outputs.push(e);
        }
        g
    }

    #[test]
    fn a_transpose_moves_onto_the_small_operands_of_an_elementwise_chain() {
        let before = chain(false);
        let mut after = before.clone();
        let stats = MoveTransposesUp.run(&mut after).unwrap();
        kiln_ir::verify(&after).unwrap();
        assert_eq!(stats.counter("transposes_moved"), 1, "{stats}");
        // Three transposes of the operands, none of the [2, 4, 5, 3] result.
        let o = ops(&after);
        assert_eq!(
            o.iter().filter(|&&k| k == OpKind::Transpose).count(),
            3,
            "{o:?}"
        );
        let out = after.outputs[0];
        assert_eq!(after.ty(out).shape, Shape::fixed(&[5, 2, 4, 3]));
        assert_same_outputs(&before, &after);
    }

    #[test]
    fn a_chain_read_elsewhere_keeps_its_transpose_where_it_was() {
        let before = chain(true);
        let mut after = before.clone();
        MoveTransposesUp.run(&mut after).unwrap();
        kiln_ir::verify(&after).unwrap();
        assert_same_outputs(&before, &after);
        // `e` is read twice: the transpose may only move past the last multiply, onto `e`
        // (the same size): not worth it, nothing changes.
        assert_eq!(ops(&after), ops(&before));
    }
}
