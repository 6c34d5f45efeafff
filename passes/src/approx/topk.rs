//! `ffn-topk`: per-row top-k activation sparsity. The input `h[.., K]` of an FFN
//! down-projection of a SiLU/GELU model (the sites of `ffn-threshold`) keeps, in every row,
//! its `k = ceil(F·K)` entries of largest magnitude and zeroes the rest, so each row has
//! density at most F whatever its activation distribution (a threshold gives the target
//! sparsity only on average). The rewrite is made of ops the interpreter defines:
//!
//! ```text
//! a = abs(h); (v, _) = top_k(a, k, axis = -1); t = reduce_min(v, axes = [-1])
//! h' = where(greater_equal(a, t), h, 0)
//! ```
//!
//! (ties at the k-th magnitude are all kept; a row with fewer than k non-zeros is unchanged).
//! The runtime recognises `where(_, _, 0)` as a sparsifying producer and runs the down
//! projection on its sparse-input GEMM.
//!
//! `ffn-topk=F` keeps the fraction F in (0, 1] at every site; bare `ffn-topk` lets the budget
//! pick per site from [`FRACTIONS`].

use super::ffn::{rows_of, skipped_fraction, smooth_down_projection_sites};
use super::{ApproxError, ApproxRewrite, Candidate, Probe, Site};
use crate::rewrite::Namer;
use kiln_ir::{Attr, Attrs, DType, Graph, Node, OpKind, Shape, Tensor, TensorType};
use std::sync::Arc;

/// The family's `--approx` name.
pub const TOPK: &str = "ffn-topk";

/// Kept fractions tried per site when none is given.
pub const FRACTIONS: [f64; 7] = [0.7, 0.6, 0.5, 0.4, 0.3, 0.15, 0.05];

/// Top-k magnitude masks on FFN down-projection inputs.
#[derive(Clone, Debug, PartialEq)]
pub struct FfnTopK {
    /// The kept fractions to try (one when the user named it).
    pub fractions: Vec<f64>,
}

impl FfnTopK {
    /// From `--approx ffn-topk[=F]`.
    pub fn parse(param: Option<&str>) -> Result<FfnTopK, ApproxError> {
        let Some(p) = param else {
            return Ok(FfnTopK {
                fractions: FRACTIONS.to_vec(),
            });
        };
        let bad = |why: &str| ApproxError::BadParam {
            family: TOPK.into(),
            param: p.into(),
            why: why.into(),
        };
        let f: f64 = p
            .parse()
            .map_err(|_| bad("expected the kept fraction of each row, a number in (0, 1]"))?;
        if f.is_nan() || f <= 0.0 || f > 1.0 {
            return Err(bad("the kept fraction must lie in (0, 1]"));
        }
        Ok(FfnTopK { fractions: vec![f] })
    }
}

/// The last dim of `h` when fixed.
fn width(g: &Graph, h: kiln_ir::ValueId) -> Option<usize> {
    let dims = g.ty(h).shape.dims()?;
    dims.last()?.fixed().map(|k| k as usize)
}

/// `k` for a kept fraction `f` of `width` (at least 1).
pub fn kept(f: f64, width: usize) -> usize {
    ((f * width as f64).ceil() as usize).clamp(1, width.max(1))
}

impl ApproxRewrite for FfnTopK {
    fn family(&self) -> &'static str {
        TOPK
    }

    fn sites(&self, g: &Graph) -> Vec<Site> {
        smooth_down_projection_sites(g)
            .into_iter()
            .filter(|s| width(g, s.probe).is_some_and(|k| k > 1))
            .collect()
    }

    fn candidates(&self, g: &Graph, site: &Site, probe: &Probe<'_>) -> Vec<Candidate> {
        let Some(kw) = width(g, site.probe) else {
            return vec![];
        };
        let time = probe.cost.node_cost(g, &g.nodes[site.node]).time;
        let rows = rows_of(g, site, probe);
        let base = probe.cost.graph_cost(g).time;
        let mut seen = Vec::new();
        self.fractions
            .iter()
            .filter_map(|&f| {
                let k = kept(f, kw);
                if k >= kw || seen.contains(&k) {
                    return None;
                }
                seen.push(k);
                let density = k as f64 / kw as f64;
                let mut c = Candidate {
                    family: TOPK,
                    site: site.clone(),
                    params: format!("k={k}/{kw} ({:.0}% kept)", density * 100.0),
                    values: vec![density, k as f64],
                    saving: 0.0,
                };
                // The mask's own cost (abs, top_k, compare, where) is paid on every run.
                let mut trial = g.clone();
                self.apply(&mut trial, &c);
                let extra = (probe.cost.graph_cost(&trial).time - base).max(0.0);
                c.saving = time * skipped_fraction(density, rows) - extra;
                (c.saving > 0.0).then_some(c)
            })
            .collect()
    }

    fn apply(&self, g: &mut Graph, c: &Candidate) {
        let at = c.site.node;
        let h = c.site.probe;
        let ty = g.ty(h).clone();
        let k = c.values[1] as i64;
        let base = g.value(h).name.clone();
        let mut namer = Namer::new(g);
        let mut nodes: Vec<Node> = Vec::new();
        let name = format!("approx:{TOPK}");
        let mut constant = |g: &mut Graph, nodes: &mut Vec<Node>, what: &str, t: Tensor| {
            let cty = TensorType::new(t.dtype(), Shape::fixed(t.shape()));
            let v = namer.add_value(g, &format!("{base}_{what}"), cty);
            nodes.push(Node {
                op: OpKind::Constant,
                attrs: Attrs::new().with("value", Attr::Tensor(Arc::new(t))),
                inputs: vec![],
                outputs: vec![v],
                name: name.clone(),
            });
            v
        };
        let kv = constant(g, &mut nodes, "k", Tensor::from_vec(vec![1], vec![k]));
        let axes = constant(
            g,
            &mut nodes,
            "axes",
            Tensor::from_vec(vec![1], vec![-1i64]),
        );
        let zero = constant(g, &mut nodes, "zero", Tensor::from_vec(vec![], vec![0f32]));
        let dims = ty.shape.dims().map(|d| d.to_vec());
        let with_last = |last: u64| match &dims {
            Some(d) => {
                let mut d = d.clone();
                if let Some(l) = d.last_mut() {
                    *l = kiln_ir::Dim::Fixed(last);
                }
                Shape::new(d)
            }
            None => Shape::unknown(),
        };
        let mut value = |g: &mut Graph, what: &str, t: TensorType| {
            namer.add_value(g, &format!("{base}_{what}"), t)
        };
        let abs = value(g, "abs", ty.clone());
        let top = value(g, "topk", TensorType::new(ty.dtype, with_last(k as u64)));
        let idx = value(
            g,
            "topk_idx",
            TensorType::new(DType::I64, with_last(k as u64)),
        );
        let t = value(g, "kth", TensorType::new(ty.dtype, with_last(1)));
        let keep = value(g, "keep", TensorType::new(DType::Bool, ty.shape.clone()));
        let out = value(g, "sparse", ty.clone());
        let op = |op: OpKind, attrs: Attrs, inputs: &[kiln_ir::ValueId], outputs: Vec<_>| Node {
            op,
            attrs,
            inputs: inputs.iter().map(|&v| Some(v)).collect(),
            outputs,
            name: name.clone(),
        };
        nodes.push(op(OpKind::Abs, Attrs::new(), &[h], vec![abs]));
        nodes.push(op(
            OpKind::TopK,
            Attrs::new()
                .with("axis", Attr::Int(-1))
                .with("largest", Attr::Int(1))
                .with("sorted", Attr::Int(0)),
            &[abs, kv],
            vec![top, idx],
        ));
        nodes.push(op(OpKind::ReduceMin, Attrs::new(), &[top, axes], vec![t]));
        nodes.push(op(
            OpKind::GreaterOrEqual,
            Attrs::new(),
            &[abs, t],
            vec![keep],
        ));
        nodes.push(op(OpKind::Where, Attrs::new(), &[keep, h, zero], vec![out]));
        g.nodes[at].inputs[0] = Some(out);
        crate::rewrite::insert_nodes(g, nodes.into_iter().map(|n| (at, n)).collect());
    }
}

/// Whether `n` is this family's mask: a `where` whose third operand is made by a constant
/// of zeros among the nodes `before` it.
pub fn is_zero_where(n: &Node, before: &[Node]) -> bool {
    if n.op != OpKind::Where {
        return false;
    }
    let Some(Some(z)) = n.inputs.get(2) else {
        return false;
    };
    before
        .iter()
        .rev()
        .find(|p| p.outputs.contains(z))
        .is_some_and(|p| {
            p.op == OpKind::Constant
                && matches!(p.attrs.get("value"), Some(Attr::Tensor(t)) if t.to_f64s().iter().all(|&x| x == 0.0))
        })
}
