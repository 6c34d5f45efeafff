//! `absorb_head_transposes`: `transpose(attention(transpose(q'), transpose(k'),
//! transpose(v'), mask?))` with every transpose `perm = [0, 2, 1, 3]` becomes
//! `attention{layout = "bshd"}(q', k', v', mask?)`. Exporters split heads as
//! `[B, S, H, D] → [B, H, S, D]` before attention and merge them back after it; the
//! sequence-major attention reads the projections' outputs as they are and writes what the
//! output projection reads, so the four copies per layer go (ViT-S: 24 transposes, 0.36 ms
//! of 34 ms at one thread). Exact: only the layout changes. Runs after the e-graph, whose
//! attention rules see the head-major form.

use crate::rewrite;
use crate::{Pass, PassError, PassStats};
use kiln_ir::{Attr, Graph, OpKind, ValueId};

/// Folds the head transposes around `attention` into its `layout`.
#[derive(Clone, Copy, Debug, Default)]
pub struct AbsorbHeadTransposes;

/// The head split/merge permutation.
const SWAP_HEADS: [i64; 4] = [0, 2, 1, 3];

impl Pass for AbsorbHeadTransposes {
    fn name(&self) -> &'static str {
        "absorb_head_transposes"
    }

    fn run(&self, g: &mut Graph) -> Result<PassStats, PassError> {
        rewrite::check_ids(g).map_err(|m| PassError::graph(self.name(), m))?;
        let producers = rewrite::producers(g);
        let uses = rewrite::use_counts(g);
        let mut consumer: Vec<Option<usize>> = vec![None; g.values.len()];
        for (i, n) in g.nodes.iter().enumerate() {
            for v in n.inputs.iter().flatten() {
                consumer[v.index()] = Some(i);
            }
        }
        let is_swap = |g: &Graph, i: usize| {
            let n = &g.nodes[i];
            n.op == OpKind::Transpose
                && n.attrs.ints("perm").ok().flatten().as_deref() == Some(&SWAP_HEADS[..])
        };
        let mut stats = PassStats::default();
        let mut dropped = vec![];
        for a in 0..g.nodes.len() {
            let n = &g.nodes[a];
            if n.op != OpKind::Attention || n.attrs.get("layout").is_some() {
                continue;
            }
            // q, k and v each the output of a head-swapping transpose.
            let mut sources: Vec<ValueId> = vec![];
            for k in 0..3 {
                let src = n.inputs.get(k).copied().flatten().and_then(|v| {
                    let p = producers.get(v.index()).copied().flatten()?;
                    is_swap(g, p).then(|| g.nodes[p].inputs.first().copied().flatten())?
                });
                match src {
                    Some(s) => sources.push(s),
                    None => break,
                }
            }
            // The result read once, by a head-swapping transpose (not a graph output).
            let Some(&y) = n.outputs.first() else {
                continue;
            };
            let merge = consumer[y.index()]
                .filter(|&c| uses[y.index()] == 1 && !g.outputs.contains(&y) && is_swap(g, c));
            let (Some(t), 3) = (merge, sources.len()) else {
                continue;
            };
            let z = g.nodes[t].outputs[0];
            let n = &mut g.nodes[a];
            for (k, s) in sources.into_iter().enumerate() {
                n.inputs[k] = Some(s);
            }
            n.attrs.set("layout", Attr::Str("bshd".into()));
            n.outputs[0] = z;
            dropped.push(t);
            stats.changed += 1;
            stats.bump("head_transposes_absorbed", 1);
        }
        if dropped.is_empty() {
            return Ok(stats);
        }
        // The merge transposes now have nothing to read; the split ones go once unread.
        dropped.sort_unstable();
        for t in dropped.into_iter().rev() {
            g.nodes.remove(t);
        }
        stats.removed = rewrite::remove_dead(g);
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use kiln_ir::{Attrs, DType, Shape, TensorType};

    fn swap(g: &mut Graph, x: ValueId, name: &str, dims: [usize; 4]) -> ValueId {
        let attrs = Attrs::new().with("perm", Attr::Ints(SWAP_HEADS.to_vec()));
        let [a, b, c, d] = dims;
        node_with(
            g,
            OpKind::Transpose,
            attrs,
            &[x],
            name,
            f32_ty(&[a, c, b, d]),
        )
    }

    /// `merge(attention(split(q), split(k), split(v)))` on sequence-major inputs
    /// (`[2, 5, 3, 4]`; kv 2 heads, 7 keys).
    fn split_heads_graph(mask: bool) -> Graph {
        let mut g = Graph::new("g");
        let q = g.add_input("q", f32_ty(&[2, 5, 4, 8]));
        let k = g.add_input("k", f32_ty(&[2, 7, 2, 8]));
        let v = g.add_input("v", f32_ty(&[2, 7, 2, 6]));
        let qh = swap(&mut g, q, "qh", [2, 5, 4, 8]);
        let kh = swap(&mut g, k, "kh", [2, 7, 2, 8]);
        let vh = swap(&mut g, v, "vh", [2, 7, 2, 6]);
        let mut ins = vec![qh, kh, vh];
        if mask {
            let m = g.add_input(
                "m",
                TensorType::new(DType::Bool, Shape::fixed(&[2, 1, 5, 7])),
            );
            ins.push(m);
        }
        let attrs = Attrs::new().with("causal", Attr::Int(1));
        let y = node_with(
            &mut g,
            OpKind::Attention,
            attrs,
            &ins,
            "y",
            f32_ty(&[2, 4, 5, 6]),
        );
        let z = swap(&mut g, y, "z", [2, 4, 5, 6]);
        g.outputs = vec![z];
        g
    }

    #[test]
    fn head_transposes_fold_into_a_sequence_major_attention() {
        for mask in [false, true] {
            let before = split_heads_graph(mask);
            let mut g = before.clone();
            let stats = AbsorbHeadTransposes.run(&mut g).unwrap();
            assert_eq!(stats.counter("head_transposes_absorbed"), 1);
            assert_eq!(ops(&g), vec![OpKind::Attention]);
            assert_eq!(
                g.nodes[0].attrs.string("layout").unwrap().as_deref(),
                Some("bshd")
            );
            assert_eq!(g.value(g.outputs[0]).name, "z");
            kiln_ir::verify(&g).expect("verifies");
            assert_same_outputs(&before, &g);
        }
    }

    #[test]
    fn other_layouts_and_shared_results_are_left_alone() {
        // The attention result also read elsewhere: its head-major form is needed.
        let mut g = split_heads_graph(false);
        let y = g.nodes[3].outputs[0];
        g.outputs.push(y);
        assert!(AbsorbHeadTransposes.run(&mut g).unwrap().is_noop());
        // A different permutation on k.
        let mut g = split_heads_graph(false);
        g.nodes[1].attrs.set("perm", Attr::Ints(vec![0, 2, 3, 1]));
        let before = g.clone();
        assert!(AbsorbHeadTransposes.run(&mut g).unwrap().is_noop());
        assert_eq!(g, before);
    }
}
