//! `attn-threshold`: TEAL-style magnitude thresholds on the inputs of attention projections.
//! Two kinds of site per attention layer: the value the q/k/v projections read (the
//! normalised hidden state; one threshold shared by every projection that reads it, so each
//! of them takes the runtime's sparse-input GEMM on the same zeros), and the input of the
//! output projection (the attention output through its reshape/transpose). A projection is a
//! `matmul`/`linear` with a constant 2-D f32 weight; it belongs to attention when its output
//! reaches an `attention` node through views (`reshape`, `transpose`, `rotary`, `concat`),
//! or its input comes from one through `reshape`/`transpose`. The rewrite is the one of
//! `ffn-threshold`: `shrink(h, lambd = t, bias = 0)` with `t` the per-site magnitude quantile
//! of the calibration activations at the target sparsity.
//!
//! `attn-threshold=S` asks for sparsity `S` in (0, 1) at every site; bare `attn-threshold`
//! lets the budget pick per site from [`super::ffn::LADDER`].

use super::ffn::threshold_candidates;
use super::{ApproxError, ApproxRewrite, Candidate, Probe, Site};
use crate::rewrite::Namer;
use kiln_ir::{Attr, Attrs, DType, Graph, Node, OpKind, ValueId};
use std::collections::{HashMap, HashSet};

/// The family's `--approx` name.
pub const ATTN_THRESHOLD: &str = "attn-threshold";

/// How many view ops a projection may be away from its attention node.
const MAX_HOPS: usize = 4;

/// Magnitude thresholds on attention projection inputs.
#[derive(Clone, Debug, PartialEq)]
pub struct AttnThreshold {
    /// The target sparsities to try (one when the user named it).
    pub sparsities: Vec<f64>,
}

impl AttnThreshold {
    /// From `--approx attn-threshold[=S]`.
    pub fn parse(param: Option<&str>) -> Result<AttnThreshold, ApproxError> {
        Ok(AttnThreshold {
            sparsities: super::ffn::parse_sparsity(ATTN_THRESHOLD, param)?,
        })
    }
}

/// The graph facts the site search needs.
struct Facts {
    consts: HashSet<ValueId>,
    producers: HashMap<ValueId, usize>,
    consumers: HashMap<ValueId, Vec<usize>>,
}

impl Facts {
    fn of(g: &Graph) -> Facts {
        let mut consumers: HashMap<ValueId, Vec<usize>> = HashMap::new();
        for (i, n) in g.nodes.iter().enumerate() {
            for v in n.inputs.iter().flatten() {
                consumers.entry(*v).or_default().push(i);
            }
        }
        Facts {
            consts: g
                .nodes
                .iter()
                .filter(|n| n.op == OpKind::Constant)
                .flat_map(|n| n.outputs.iter().copied())
                .collect(),
            producers: g.producers(),
            consumers,
        }
    }

    /// A `matmul`/`linear` with a constant 2-D f32 weight.
    fn projection(&self, g: &Graph, n: &Node) -> bool {
        matches!(n.op, OpKind::MatMul | OpKind::Linear)
            && n.inputs.get(1).copied().flatten().is_some_and(|w| {
                self.consts.contains(&w)
                    && g.ty(w).dtype == DType::F32
                    && g.ty(w).shape.dims().is_some_and(|d| d.len() == 2)
            })
    }

    /// Whether `v` reaches an `attention` node through at most `hops` views.
    fn feeds_attention(&self, g: &Graph, v: ValueId, hops: usize) -> bool {
        self.consumers.get(&v).is_some_and(|cs| {
            cs.iter().any(|&c| {
                let n = &g.nodes[c];
                match n.op {
                    OpKind::Attention => true,
                    OpKind::Reshape | OpKind::Transpose | OpKind::Rotary | OpKind::Concat
                        if hops > 0 =>
                    {
                        n.outputs
                            .iter()
                            .any(|&o| self.feeds_attention(g, o, hops - 1))
                    }
                    _ => false,
                }
            })
        })
    }

    /// Whether `v` comes from an `attention` node through at most `hops` views.
    fn made_by_attention(&self, g: &Graph, v: ValueId, hops: usize) -> bool {
        self.producers.get(&v).is_some_and(|&p| {
            let n = &g.nodes[p];
            match n.op {
                OpKind::Attention => true,
                OpKind::Reshape | OpKind::Transpose if hops > 0 => n
                    .inputs
                    .first()
                    .copied()
                    .flatten()
                    .is_some_and(|x| self.made_by_attention(g, x, hops - 1)),
                _ => false,
            }
        })
    }

    /// The projections reading `h` as their input that belong to attention (q/k/v: their
    /// output feeds an attention node; o: `h` comes from one).
    fn attention_projections(&self, g: &Graph, h: ValueId) -> Vec<usize> {
        let from = self.made_by_attention(g, h, MAX_HOPS);
        self.consumers
            .get(&h)
            .map(|cs| {
                cs.iter()
                    .copied()
                    .filter(|&c| {
                        let n = &g.nodes[c];
                        n.inputs.first().copied().flatten() == Some(h)
                            && self.projection(g, n)
                            && (from
                                || n.outputs
                                    .first()
                                    .is_some_and(|&o| self.feeds_attention(g, o, MAX_HOPS)))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl ApproxRewrite for AttnThreshold {
    fn family(&self) -> &'static str {
        ATTN_THRESHOLD
    }

    fn sites(&self, g: &Graph) -> Vec<Site> {
        let facts = Facts::of(g);
        let mut seen = HashSet::new();
        let mut out = vec![];
        for n in &g.nodes {
            let Some(h) = n.inputs.first().copied().flatten() else {
                continue;
            };
            if !facts.projection(g, n) || g.ty(h).dtype != DType::F32 || !seen.insert(h) {
                continue;
            }
            let projs = facts.attention_projections(g, h);
            if let Some(&first) = projs.first() {
                let names: Vec<String> = projs
                    .iter()
                    .filter_map(|&p| g.nodes[p].outputs.first())
                    .map(|&o| g.value(o).name.clone())
                    .collect();
                out.push(Site {
                    node: first,
                    name: format!("%{}", names.join(",%")),
                    probe: h,
                });
            }
        }
        out
    }

    fn candidates(&self, g: &Graph, site: &Site, probe: &Probe<'_>) -> Vec<Candidate> {
        let time: f64 = Facts::of(g)
            .attention_projections(g, site.probe)
            .iter()
            .map(|&p| probe.cost.node_cost(g, &g.nodes[p]).time)
            .sum();
        threshold_candidates(ATTN_THRESHOLD, &self.sparsities, g, site, probe, time)
    }

    fn apply(&self, g: &mut Graph, c: &Candidate) {
        let h = c.site.probe;
        // The consumers are found again: other sites' rewrites may have moved them.
        let projs = Facts::of(g).attention_projections(g, h);
        let Some(&at) = projs.iter().min() else {
            return;
        };
        let ty = g.ty(h).clone();
        let base = format!("{}_sparse", g.value(h).name);
        let out = Namer::new(g).add_value(g, &base, ty);
        for &p in &projs {
            g.nodes[p].inputs[0] = Some(out);
        }
        let node = Node {
            op: OpKind::Shrink,
            attrs: Attrs::new()
                .with("lambd", Attr::Float(c.values[1] as f32))
                .with("bias", Attr::Float(0.0)),
            inputs: vec![Some(h)],
            outputs: vec![out],
            name: format!("approx:{ATTN_THRESHOLD}"),
        };
        crate::rewrite::insert_nodes(g, vec![(at, node)]);
    }
}
