//! `ffn-threshold`: TEAL/CATS-style training-free activation sparsity on the inputs of the
//! FFN projections of a SiLU/GELU model. Two kinds of site per FFN: the input of the
//! down-projection (`matmul`/`linear` with a constant `W[K, N]`, `K > N`, fed by a gate
//! product or a smooth activation), and the value its up/gate projections share (the FFN's
//! input, one threshold for all of them; see [`up_projections`]). Each goes through
//! `shrink(h, lambd = t, bias = 0)`, which zeroes every `|h| <= t`, for those projections
//! only (a residual sum or a norm reading the same value still reads it whole); `t` is the
//! magnitude quantile of the calibration activations at the target sparsity, per site. The
//! runtime's sparse-input GEMM then reads only the rows of W for non-zero activations.
//!
//! `ffn-threshold=S` asks for sparsity `S` in (0, 1) at every site; bare `ffn-threshold`
//! lets the budget pick per site from [`LADDER`].

use super::{ApproxError, ApproxRewrite, Candidate, Probe, Site};
use crate::rewrite::Namer;
use kiln_ir::{Attr, Attrs, DType, Graph, Node, OpKind, ValueId};
use std::collections::{HashMap, HashSet};

/// The family's `--approx` name.
pub const THRESHOLD: &str = "ffn-threshold";

/// Sparsities tried per site when none is given (the runtime's sparse GEMV pays off from
/// about 10% sparsity; see `RUNTIME_MAX_DENSITY`).
pub const LADDER: [f64; 7] = [0.3, 0.4, 0.5, 0.6, 0.7, 0.85, 0.95];

/// The densities up to which the CPU runtime takes its sparse-input GEMM: one row, and the
/// union per row block for more (mirrors `GEMV_MAX_DENSITY` / `GEMM_MAX_DENSITY` in
/// `runtime/src/native/gemm/sparse.rs`, measured there). A candidate whose density is above
/// them saves nothing and is not proposed.
pub const RUNTIME_MAX_DENSITY: (f64, f64) = (0.9, 0.4);

/// Rows the runtime's gather-GEMM takes together: with many rows, a neuron is skipped only
/// when it is inactive in every row of its block.
pub const ROW_BLOCK: usize = 8;

/// Magnitude thresholds on FFN down-projection inputs.
#[derive(Clone, Debug, PartialEq)]
pub struct FfnThreshold {
    /// The target sparsities to try (one when the user named it).
    pub sparsities: Vec<f64>,
}

impl FfnThreshold {
    /// From `--approx ffn-threshold[=S]`.
    pub fn parse(param: Option<&str>) -> Result<FfnThreshold, ApproxError> {
        Ok(FfnThreshold {
            sparsities: parse_sparsity(THRESHOLD, param)?,
        })
    }
}

/// The target sparsities of a threshold family: [`LADDER`] without a parameter, else the one
/// given, which must lie in (0, 1).
pub fn parse_sparsity(family: &str, param: Option<&str>) -> Result<Vec<f64>, ApproxError> {
    let Some(p) = param else {
        return Ok(LADDER.to_vec());
    };
    let bad = |why: &str| ApproxError::BadParam {
        family: family.into(),
        param: p.into(),
        why: why.into(),
    };
    let s: f64 = p
        .parse()
        .map_err(|_| bad("expected a target sparsity, a number in (0, 1)"))?;
    if s.is_nan() || s <= 0.0 || s >= 1.0 {
        return Err(bad("the target sparsity must lie in (0, 1)"));
    }
    Ok(vec![s])
}

/// Whether `n` is a contraction with a constant 2-D f32 right operand `[K, N]`, `K > N`.
fn down_projection(n: &Node, consts: &HashSet<ValueId>, g: &Graph) -> bool {
    if !matches!(n.op, OpKind::MatMul | OpKind::Linear) {
        return false;
    }
    let Some(Some(w)) = n.inputs.get(1) else {
        return false;
    };
    let ty = g.ty(*w);
    let dims: Option<Vec<u64>> = ty
        .shape
        .0
        .as_ref()
        .and_then(|d| d.iter().map(|d| d.fixed()).collect());
    consts.contains(w) && ty.dtype == DType::F32 && matches!(dims.as_deref(), Some([k, n]) if k > n)
}

/// Whether the producer makes dense, smooth activations (a gate product, GELU, SiLU): the
/// inputs this family sparsifies. ReLU outputs are exactly sparse already.
fn smooth_producer(n: &Node) -> bool {
    match n.op {
        OpKind::Mul | OpKind::Gelu | OpKind::Silu => true,
        OpKind::Linear => matches!(
            n.attrs.string_or("activation", "none".into()).as_deref(),
            Ok("gelu" | "gelu_tanh" | "silu")
        ),
        _ => false,
    }
}

/// The down-projections of SiLU/GELU FFNs in `g` ([`down_projection`] fed by a
/// [`smooth_producer`]): the sites of `ffn-threshold` and `ffn-topk`, probing their input.
pub(super) fn smooth_down_projection_sites(g: &Graph) -> Vec<Site> {
    let consts: HashSet<ValueId> = g
        .nodes
        .iter()
        .filter(|n| n.op == OpKind::Constant)
        .flat_map(|n| n.outputs.iter().copied())
        .collect();
    let producers = g.producers();
    g.nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| down_projection(n, &consts, g))
        .filter_map(|(i, n)| {
            let h = n.inputs.first().copied().flatten()?;
            let p = &g.nodes[*producers.get(&h)?];
            let out = *n.outputs.first()?;
            smooth_producer(p).then(|| Site {
                node: i,
                name: format!("%{}", g.value(out).name),
                probe: h,
            })
        })
        .collect()
}

/// How many gate/activation ops (`mul`, `silu`, `gelu`, `sigmoid`, and this family's own
/// `shrink`) may lie between an up/gate projection and its FFN's down-projection.
const UP_HOPS: usize = 3;

/// The FFN up/gate projections that read `x` as their input: contractions with a constant
/// 2-D f32 weight whose output reaches a down-projection ([`down_projection`]) as its input
/// through at most [`UP_HOPS`] gate/activation ops. Sorted by node index.
pub(super) fn up_projections(g: &Graph, x: ValueId) -> Vec<usize> {
    let consts = constants(g);
    let mut consumers: HashMap<ValueId, Vec<usize>> = HashMap::new();
    for (i, n) in g.nodes.iter().enumerate() {
        for v in n.inputs.iter().flatten() {
            consumers.entry(*v).or_default().push(i);
        }
    }
    fn reaches_down(
        g: &Graph,
        v: ValueId,
        hops: usize,
        consts: &HashSet<ValueId>,
        consumers: &HashMap<ValueId, Vec<usize>>,
    ) -> bool {
        consumers.get(&v).is_some_and(|cs| {
            cs.iter().any(|&c| {
                let n = &g.nodes[c];
                if down_projection(n, consts, g) && n.inputs.first() == Some(&Some(v)) {
                    return true;
                }
                hops > 0
                    && matches!(
                        n.op,
                        OpKind::Mul
                            | OpKind::Silu
                            | OpKind::Gelu
                            | OpKind::Sigmoid
                            | OpKind::Shrink
                    )
                    && n.outputs
                        .iter()
                        .any(|&o| reaches_down(g, o, hops - 1, consts, consumers))
            })
        })
    }
    let mut out: Vec<usize> = consumers
        .get(&x)
        .map(|cs| {
            cs.iter()
                .copied()
                .filter(|&c| {
                    let n = &g.nodes[c];
                    matches!(n.op, OpKind::MatMul | OpKind::Linear)
                        && n.inputs.first() == Some(&Some(x))
                        && n.inputs.get(1).copied().flatten().is_some_and(|w| {
                            consts.contains(&w)
                                && g.ty(w).dtype == DType::F32
                                && g.ty(w).shape.dims().is_some_and(|d| d.len() == 2)
                        })
                        && !down_projection(n, &consts, g)
                        && n.outputs
                            .iter()
                            .any(|&o| reaches_down(g, o, UP_HOPS, &consts, &consumers))
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort_unstable();
    out.dedup();
    out
}

/// The FFN inputs of `g`: one site per value that FFN up/gate projections read
/// ([`up_projections`]), anchored at the first of them, probing the value.
fn ffn_input_sites(g: &Graph) -> Vec<Site> {
    let mut seen = HashSet::new();
    let mut out = vec![];
    for n in &g.nodes {
        let Some(x) = n.inputs.first().copied().flatten() else {
            continue;
        };
        if !matches!(n.op, OpKind::MatMul | OpKind::Linear)
            || g.ty(x).dtype != DType::F32
            || !seen.insert(x)
        {
            continue;
        }
        let projs = up_projections(g, x);
        if let Some(&first) = projs.first() {
            let names: Vec<String> = projs
                .iter()
                .filter_map(|&p| g.nodes[p].outputs.first())
                .map(|&o| format!("%{}", g.value(o).name))
                .collect();
            out.push(Site {
                node: first,
                name: names.join(","),
                probe: x,
            });
        }
    }
    out
}

/// The constant values of `g`.
fn constants(g: &Graph) -> HashSet<ValueId> {
    g.nodes
        .iter()
        .filter(|n| n.op == OpKind::Constant)
        .flat_map(|n| n.outputs.iter().copied())
        .collect()
}

/// Rows per run of a site's activation: the product of its leading dims (1 when unknown).
pub(super) fn rows_of(g: &Graph, site: &Site, probe: &Probe<'_>) -> f64 {
    probe
        .cost
        .sizes(g.ty(site.probe))
        .map_or(1.0, |d| {
            d[..d.len().saturating_sub(1)].iter().product::<f64>()
        })
        .max(1.0)
}

/// The fraction of a row block's neurons the runtime skips when each row keeps a fraction
/// `density` of them independently, or 0 when the runtime would run the dense GEMM at that
/// density (its thresholds, [`RUNTIME_MAX_DENSITY`]).
pub(super) fn skipped_fraction(density: f64, rows: f64) -> f64 {
    let block = rows.min(ROW_BLOCK as f64);
    let skipped = (1.0 - density).clamp(0.0, 1.0).powf(block);
    let max = if block <= 1.0 {
        RUNTIME_MAX_DENSITY.0
    } else {
        RUNTIME_MAX_DENSITY.1
    };
    if 1.0 - skipped <= max {
        skipped
    } else {
        0.0
    }
}

/// A threshold family's candidates at `site`: for each target sparsity, the magnitude of the
/// probed values at that quantile, and the estimated saving of the projections that take
/// `time` when that fraction of their inputs is skipped. A neuron is skipped for a row block
/// only when inactive in all its rows, and the runtime goes sparse only below its measured
/// density thresholds ([`skipped_fraction`]).
pub fn threshold_candidates(
    family: &'static str,
    sparsities: &[f64],
    g: &Graph,
    site: &Site,
    probe: &Probe<'_>,
    time: f64,
) -> Vec<Candidate> {
    let mut mags: Vec<f32> = probe
        .values
        .iter()
        .filter_map(|t| t.as_slice::<f32>())
        .flat_map(|v| v.iter().map(|x| x.abs()))
        .filter(|x| !x.is_nan())
        .collect();
    if mags.is_empty() {
        return vec![];
    }
    mags.sort_by(f32::total_cmp);
    let rows = rows_of(g, site, probe);
    sparsities
        .iter()
        .map(|&s| {
            let at = ((mags.len() as f64 * s) as usize).min(mags.len() - 1);
            let t = mags[at];
            Candidate {
                family,
                site: site.clone(),
                params: format!("sparsity={s:.2} threshold={t:.4e}"),
                values: vec![s, t as f64],
                saving: time * skipped_fraction(1.0 - s, rows),
            }
        })
        .filter(|c| c.saving > 0.0)
        .collect()
}

impl ApproxRewrite for FfnThreshold {
    fn family(&self) -> &'static str {
        THRESHOLD
    }

    fn sites(&self, g: &Graph) -> Vec<Site> {
        let mut sites = smooth_down_projection_sites(g);
        sites.extend(ffn_input_sites(g));
        sites
    }

    fn candidates(&self, g: &Graph, site: &Site, probe: &Probe<'_>) -> Vec<Candidate> {
        let at = &g.nodes[site.node];
        let projs = if at.inputs.first() == Some(&Some(site.probe))
            && down_projection(at, &constants(g), g)
        {
            vec![site.node]
        } else {
            up_projections(g, site.probe)
        };
        let time: f64 = projs
            .iter()
            .map(|&p| probe.cost.node_cost(g, &g.nodes[p]).time)
            .sum();
        threshold_candidates(THRESHOLD, &self.sparsities, g, site, probe, time)
    }

    fn apply(&self, g: &mut Graph, c: &Candidate) {
        let h = c.site.probe;
        let anchor = &g.nodes[c.site.node];
        // The projections are found again (other sites' rewrites may have moved them): the
        // down-projection the site names, or every up/gate projection reading `h`.
        let projs = if anchor.inputs.first() == Some(&Some(h))
            && down_projection(anchor, &constants(g), g)
        {
            vec![c.site.node]
        } else {
            up_projections(g, h)
        };
        let Some(&at) = projs.first() else {
            return;
        };
        let ty = g.ty(h).clone();
        let base = format!("{}_sparse", g.value(h).name);
        let out = Namer::new(g).add_value(g, &base, ty);
        for &p in &projs {
            g.nodes[p].inputs[0] = Some(out);
        }
        let attrs = Attrs::new()
            .with("lambd", Attr::Float(c.values[1] as f32))
            .with("bias", Attr::Float(0.0));
        let node = Node {
            op: OpKind::Shrink,
            attrs,
            inputs: vec![Some(h)],
            outputs: vec![out],
            name: format!("approx:{THRESHOLD}"),
        };
        crate::rewrite::insert_nodes(g, vec![(at, node)]);
    }
}

/// Whether `n` makes mostly-zero outputs that the runtime's sparse-input GEMM skips: `relu`,
/// a `linear` with a ReLU epilogue, `shrink` (this family's rewrite), `thresholded_relu`.
pub fn sparsifying(n: &Node) -> bool {
    match n.op {
        OpKind::Relu | OpKind::Shrink | OpKind::ThresholdedRelu => true,
        OpKind::Linear => n.attrs.string_or("activation", "none".into()).as_deref() == Ok("relu"),
        _ => false,
    }
}

/// The FFN layers whose down-projection input is exactly sparse (see [`sparsifying`], and
/// the `ffn-topk` mask, [`super::topk::is_zero_where`]): the
/// contraction (`matmul`/`linear` with a constant 2-D weight) as the site, its input as the
/// probe.
pub fn sparse_input_sites(g: &Graph) -> Vec<Site> {
    let consts: HashSet<ValueId> = g
        .nodes
        .iter()
        .filter(|n| n.op == OpKind::Constant)
        .flat_map(|n| n.outputs.iter().copied())
        .collect();
    let producers = g.producers();
    g.nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| {
            matches!(n.op, OpKind::MatMul | OpKind::Linear)
                && n.inputs.get(1).copied().flatten().is_some_and(|w| {
                    consts.contains(&w) && g.ty(w).shape.dims().is_some_and(|d| d.len() == 2)
                })
        })
        .filter_map(|(i, n)| {
            let h = n.inputs.first().copied().flatten()?;
            let out = *n.outputs.first()?;
            let pi = *producers.get(&h)?;
            let pn = &g.nodes[pi];
            (sparsifying(pn) || super::topk::is_zero_where(pn, &g.nodes[..pi])).then(|| Site {
                node: i,
                name: format!("%{}", g.value(out).name),
                probe: h,
            })
        })
        .collect()
}

/// The fraction of non-zero elements of a float tensor (NaN counts as non-zero).
pub fn density(t: &kiln_ir::Tensor) -> f64 {
    let v = t.to_f64s();
    if v.is_empty() {
        return 0.0;
    }
    v.iter().filter(|&&x| x != 0.0).count() as f64 / v.len() as f64
}
