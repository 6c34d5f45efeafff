//! `linear-attention`: softmax attention replaced by a kernel feature map (Performer's
//! FAVOR+ positive orthogonal random features), so that `attention(q, k, v)` becomes
//! `linear_attention(φ(q), φ(k), v)`, which the CPU runtime computes in its chunked
//! recurrent form, O(S·m·Dv) instead of O(S²·D). Opt-in, under the error budget of
//! [`super::approximate`]: pretrained softmax attention usually linearises poorly without
//! retraining, and the budget says so by refusing.
//!
//! With the attention scale `s` (default `1/√D`) and `c = √s`, `x' = c·x`:
//! `φ(x) = exp(W x' − |x'|²/2 − stab)`, `W: [m, D]` orthogonal Gaussian rows (blocks of `D`
//! rows orthogonalised, each row rescaled to the norm of a Gaussian vector). Then
//! `E[φ(q)·φ(k)] ∝ exp(s·q·k)`; the constants `1/m` and the stabilisers cancel in the row
//! normalisation, as long as `stab` is the same for every key of a head: queries subtract
//! their own row max over the features, keys one max over every key and feature of their
//! (batch, head). Every feature is positive, so the row sums never change sign; they get
//! [`ROW_SUM_EPSILON`] so an underflowed row gives 0, not NaN.
//!
//! Sites: `attention` with the same query and key length (prefill; a decode step with a
//! key cache is not a site), causal or not; grouped-query heads are gathered per query head
//! after the feature map. A mask input is allowed when, on every calibration set, it is a
//! key-padding mask (optionally causal, as exporters build them from `attention_mask`): the
//! rewrite then zeroes the features of dropped keys through `attention_key_keep`, which
//! checks the same pattern on every later input and fails the run (never a silent wrong
//! answer) when a mask breaks it. Candidates per site: `m` in {D, 2D, 4D} features ×
//! [`SEEDS`] seeds (`linear-attention=M` fixes `m`); the calibration sets pick among them,
//! and the cost model proposes only those that are cheaper at the calibration shapes.
//!
//! The polynomial kernel (`linear-attention=poly[:R]`, and among the default candidates):
//! the second-order Taylor expansion of `exp(t)`, `t = s·q·k`, as in "Based" (Arora et al.
//! 2024): `φ(x)·φ(y) = 1 + t + t²/2`. With `x' = √s·x` and `x̃ = [1, x']` (`pad`), the
//! features are `w_ab·x̃_a·x̃_b` over the pairs `a ≤ b` of `x̃` (two `gather`s and a `mul`):
//! `(0, 0)` gives 1, `(0, i)` gives `x'_i` (the `t` term), `(i, i)` gives `x'_i²/√2` and
//! `(i, j)`, `i < j`, gives `x'_i·x'_j` — so the quadratic terms sum to `(x'·y')²/2`, the
//! `(x'⊗x')/√2` of the paper with each symmetric pair kept once: `m = (R+1)(R+2)/2` features
//! instead of `1 + R + R²`. `1 + t + t²/2 = ((t + 1)² + 1)/2 ≥ 1/2`: every weight is
//! positive, no stabiliser is needed. With `R < D` the queries and keys are first projected
//! by a seeded Gaussian `[D, R]` matrix scaled by `1/√R` (so `E[(Px)·(Py)] = x·y`), which
//! makes the map cheap on wide heads at the price of the projection's error: candidates
//! `R` in {D, 32, 16} (those below `D`), `poly:R` fixes it. Exact where `t` is small; where
//! it is not the budget refuses it like any other candidate.
//! Not built: the hybrid exact local window.

use super::{ApproxError, ApproxRewrite, Candidate, Probe, Site};
use crate::canon::linear_attention::choose_chunk;
use crate::cost::CostModel;
use crate::rewrite::Namer;
use kiln_ir::{Attr, Attrs, DType, Dim, Graph, Node, OpKind, Shape, Tensor, TensorType, ValueId};
use std::sync::Arc;

/// The family's `--approx` name.
pub const LINEAR_ATTENTION: &str = "linear-attention";

/// Feature counts tried per site, as multiples of the head width `D`.
pub const FEATURE_LADDER: [usize; 3] = [1, 2, 4];

/// Random-feature seeds tried per feature count: the calibration sets keep the best.
pub const SEEDS: u64 = 2;

/// Added to the linear attention's row sums (see the module docs).
pub const ROW_SUM_EPSILON: f32 = 1e-30;

/// Projected widths tried for the polynomial kernel besides the head width itself (those
/// below it).
pub const POLY_RANKS: [usize; 2] = [32, 16];

/// The feature maps a `linear-attention` request tries.
#[derive(Clone, Debug, PartialEq)]
pub enum Kernels {
    /// FAVOR+ over the feature ladder and the polynomial kernel over its ranks.
    All,
    /// FAVOR+ with this many features (`linear-attention=M`).
    Favor(usize),
    /// The polynomial kernel (`linear-attention=poly[:R]`), projected to `R` when given.
    Poly(Option<usize>),
}

/// Softmax attention through a feature map.
#[derive(Clone, Debug, PartialEq)]
pub struct LinearAttentionApprox {
    /// Which feature maps the candidates use.
    pub kernels: Kernels,
}

/// `Candidate::values[4]`: the FAVOR+ feature map.
const KIND_FAVOR: f64 = 0.0;
/// `Candidate::values[4]`: the polynomial feature map (`values[5]` its width `R`).
const KIND_POLY: f64 = 1.0;

impl LinearAttentionApprox {
    /// From `--approx linear-attention[=M|poly|poly:R]`.
    pub fn parse(param: Option<&str>) -> Result<LinearAttentionApprox, ApproxError> {
        let Some(p) = param else {
            return Ok(LinearAttentionApprox {
                kernels: Kernels::All,
            });
        };
        let bad = |why: &str| ApproxError::BadParam {
            family: LINEAR_ATTENTION.into(),
            param: p.into(),
            why: why.into(),
        };
        if p == "poly" {
            return Ok(LinearAttentionApprox {
                kernels: Kernels::Poly(None),
            });
        }
        if let Some(r) = p.strip_prefix("poly:") {
            let r: usize = r
                .parse()
                .ok()
                .filter(|&r| (1..=256).contains(&r))
                .ok_or_else(|| bad("expected poly:R with a projected width R in 1..=256"))?;
            return Ok(LinearAttentionApprox {
                kernels: Kernels::Poly(Some(r)),
            });
        }
        let m: usize = p
            .parse()
            .ok()
            .filter(|&m| (1..=65536).contains(&m))
            .ok_or_else(|| {
                bad("expected a feature count (an integer in 1..=65536), poly or poly:R")
            })?;
        Ok(LinearAttentionApprox {
            kernels: Kernels::Favor(m),
        })
    }
}

/// The polynomial kernel's feature count at width `r`: the pairs `a ≤ b` of `r + 1`.
pub fn poly_features(r: usize) -> usize {
    (r + 1) * (r + 2) / 2
}

/// What a site's attention looks like: its inputs, scale and layout.
struct Shape4 {
    /// The mask input, if any.
    mask: Option<ValueId>,
    q: ValueId,
    k: ValueId,
    v: ValueId,
    /// `[B, H, S, D]` as the op takes it (`bshd` swapped back to head-major order).
    dims: Vec<Dim>,
    /// Grouped-query heads: `(query heads, key/value heads)` when they differ.
    groups: Option<(usize, usize)>,
    d: usize,
    dv: Dim,
    scale: f64,
    causal: bool,
    seq_major: bool,
}

/// A mask's dims right-aligned to rank 4 (leading 1s), as `attention` broadcasts it; ranks
/// above 4 are returned unchanged (and refused by the caller).
fn pad4(d: &[Dim]) -> Vec<Dim> {
    let mut full = vec![Dim::Fixed(1); 4usize.saturating_sub(d.len())];
    full.extend_from_slice(d);
    full
}

fn site_shape(g: &Graph, n: &Node) -> Option<Shape4> {
    if n.op != OpKind::Attention {
        return None;
    }
    let (q, k, v) = (n.inputs[0]?, n.inputs[1]?, n.inputs[2]?);
    let mask = n.inputs.get(3).copied().flatten();
    let seq_major = kiln_ir::ops::fused::attention_seq_major(&n.attrs).ok()?;
    let causal = n.attrs.int_or("causal", 0).ok()? == 1;
    let head_major = |v: ValueId| -> Option<Vec<Dim>> {
        let ty = g.ty(v);
        if ty.dtype != DType::F32 {
            return None;
        }
        let mut d = ty.shape.dims()?.to_vec();
        if d.len() != 4 {
            return None;
        }
        if seq_major {
            d.swap(1, 2);
        }
        Some(d)
    };
    let (qd, kd, vd) = (head_major(q)?, head_major(k)?, head_major(v)?);
    // Same batch everywhere, the same query, key and value length, query heads a multiple
    // of the key heads.
    if qd[0] != kd[0] || kd[..3] != vd[..3] || qd[2] != kd[2] {
        return None;
    }
    if let Some(m) = mask {
        // `[B|1, H|1, S|1, S|1]`, float or bool; dims shape inference could not name are
        // accepted (`attention_key_keep` checks the mask's shape and pattern on every run).
        let ty = g.ty(m);
        let fits = match ty.shape.dims() {
            None => true,
            Some(md) => {
                let ok =
                    |d: &Dim, want: &Dim| d == want || *d == Dim::Fixed(1) || *d == Dim::Unknown;
                // Leading dims may be left out (broadcast), as in `attention`.
                let md = pad4(md);
                md.len() == 4
                    && ok(&md[0], &qd[0])
                    && ok(&md[1], &qd[1])
                    && ok(&md[2], &qd[2])
                    && ok(&md[3], &kd[2])
            }
        };
        if !fits || !(ty.dtype == DType::F32 || ty.dtype == DType::Bool) {
            return None;
        }
    }
    let groups = if qd[1] == kd[1] {
        None
    } else {
        let (hq, hk) = (qd[1].fixed()? as usize, kd[1].fixed()? as usize);
        if hk == 0 || hq % hk != 0 {
            return None;
        }
        Some((hq, hk))
    };
    let d = qd[3].fixed()? as usize;
    if kd[3].fixed() != Some(d as u64) || d == 0 {
        return None;
    }
    let scale = match n.attrs.float("scale").ok()? {
        Some(s) => f64::from(s),
        None => 1.0 / (d as f64).sqrt(),
    };
    (scale > 0.0 && scale.is_finite()).then_some(Shape4 {
        mask,
        q,
        k,
        v,
        dims: qd,
        groups,
        d,
        dv: vd[3].clone(),
        scale,
        causal,
        seq_major,
    })
}

impl ApproxRewrite for LinearAttentionApprox {
    fn family(&self) -> &'static str {
        LINEAR_ATTENTION
    }

    fn sites(&self, g: &Graph) -> Vec<Site> {
        g.nodes
            .iter()
            .enumerate()
            .filter_map(|(i, n)| {
                let s = site_shape(g, n)?;
                let out = *n.outputs.first()?;
                Some(Site {
                    node: i,
                    name: format!("%{}", g.value(out).name),
                    probe: s.mask.unwrap_or(s.q),
                })
            })
            .collect()
    }

    fn candidates(&self, g: &Graph, site: &Site, probe: &Probe<'_>) -> Vec<Candidate> {
        let Some(s) = site_shape(g, &g.nodes[site.node]) else {
            return vec![];
        };
        // With a mask: causal + key padding, or key padding alone, on every calibration set
        // (else no candidate).
        let mask_causal = match s.mask {
            None => false,
            Some(_) => match mask_pattern(probe.values) {
                Some(c) => c,
                None => return vec![],
            },
        };
        let ms: Vec<usize> = match self.kernels {
            Kernels::Favor(m) => vec![m],
            Kernels::All => FEATURE_LADDER.iter().map(|f| f * s.d).collect(),
            Kernels::Poly(_) => vec![],
        };
        // Polynomial: (R, seed of the projection); R = D is not projected.
        let poly: Vec<(usize, u64)> = match self.kernels {
            Kernels::Favor(_) => vec![],
            Kernels::Poly(Some(r)) if r >= s.d => vec![(s.d, 0)],
            Kernels::Poly(Some(r)) => (0..SEEDS).map(|seed| (r, seed)).collect(),
            Kernels::All | Kernels::Poly(None) => std::iter::once((s.d, 0))
                .chain(
                    POLY_RANKS
                        .iter()
                        .filter(|&&r| r < s.d)
                        .flat_map(|&r| (0..SEEDS).map(move |seed| (r, seed))),
                )
                .collect(),
        };
        let mask_note = match (s.mask, mask_causal) {
            (None, _) => "",
            (Some(_), true) => " mask=causal+padding",
            (Some(_), false) => " mask=padding",
        };
        let causal = s.causal || mask_causal;
        let dv = dv_hint(probe.cost, &s.dv);
        let mut trials = vec![];
        for m in ms {
            let chunk = choose_chunk(&probe.cost.target, m, dv, causal);
            for seed in 0..SEEDS {
                trials.push((
                    format!("favor+ m={m} seed={seed} chunk={chunk}{mask_note}"),
                    vec![
                        m as f64,
                        seed as f64,
                        chunk as f64,
                        f64::from(u8::from(mask_causal)),
                        KIND_FAVOR,
                        0.0,
                    ],
                ));
            }
        }
        for (r, seed) in poly {
            let m = poly_features(r);
            let chunk = choose_chunk(&probe.cost.target, m, dv, causal);
            let proj = if r < s.d {
                format!(" proj={r} seed={seed}")
            } else {
                String::new()
            };
            trials.push((
                format!("poly m={m}{proj} chunk={chunk}{mask_note}"),
                vec![
                    m as f64,
                    seed as f64,
                    chunk as f64,
                    f64::from(u8::from(mask_causal)),
                    KIND_POLY,
                    r as f64,
                ],
            ));
        }
        let before = probe.cost.graph_cost(g).time;
        let mut out = vec![];
        for (params, values) in trials {
            let c = Candidate {
                family: LINEAR_ATTENTION,
                site: site.clone(),
                params,
                values,
                saving: 0.0,
            };
            let mut trial = g.clone();
            self.apply(&mut trial, &c);
            let saving = before - probe.cost.graph_cost(&trial).time;
            if saving > 0.0 {
                out.push(Candidate { saving, ..c });
            }
        }
        out
    }

    fn apply(&self, g: &mut Graph, c: &Candidate) {
        let at = c.site.node;
        let Some(s) = site_shape(g, &g.nodes[at]) else {
            return;
        };
        let (m, seed, chunk) = (
            c.values[0] as usize,
            c.values[1] as u64,
            c.values[2] as usize,
        );
        let mask_causal = c.values.get(3).is_some_and(|&x| x == 1.0);
        let poly_rank = (c.values.get(4) == Some(&KIND_POLY))
            .then(|| c.values.get(5).map_or(s.d, |&r| r as usize));
        let mut b = Builder {
            namer: Namer::new(g),
            nodes: vec![],
            tag: format!("approx:{LINEAR_ATTENTION}"),
        };
        // Head-major operands: bshd inputs are swapped first (and the result back).
        let swap = [0i64, 2, 1, 3];
        let hm = |b: &mut Builder, g: &mut Graph, v: ValueId, dims: &[Dim]| {
            if s.seq_major {
                b.op(
                    g,
                    OpKind::Transpose,
                    perm(&swap),
                    vec![v],
                    dims.to_vec(),
                    "hm",
                )
            } else {
                v
            }
        };
        let mut feat_dims = s.dims.clone();
        feat_dims[3] = Dim::Fixed(m as u64);
        let kv_heads = match s.groups {
            Some((_, hk)) => Dim::Fixed(hk as u64),
            None => s.dims[1].clone(),
        };
        let mut kd = s.dims.clone();
        kd[1] = kv_heads.clone();
        let mut kvd = kd.clone();
        kvd[3] = s.dv.clone();
        let mut vd = s.dims.clone();
        vd[3] = s.dv.clone();
        let q = hm(&mut b, g, s.q, &s.dims);
        let k = hm(&mut b, g, s.k, &kd);
        let v = hm(&mut b, g, s.v, &kvd);
        let (pq, mut pk) = match poly_rank {
            None => {
                let w = features(s.d, m, seed, s.scale.sqrt());
                favor_maps(&mut b, g, w, s.scale, m, (q, &s.dims), (k, &kd))
            }
            Some(r) => {
                let pq = poly_map(&mut b, g, q, &s.dims, s.d, r, seed, s.scale);
                let pk = poly_map(&mut b, g, k, &kd, s.d, r, seed, s.scale);
                (pq, pk)
            }
        };
        if let Some(mask) = s.mask {
            // Dropped keys get zero features (checked against the mask on every run).
            let md = g.ty(mask).shape.dims().map(pad4);
            let md = md.unwrap_or_else(|| vec![Dim::Unknown; 4]);
            let keep_dims = vec![md[0].clone(), Dim::Fixed(1), md[3].clone(), Dim::Fixed(1)];
            let ka = Attrs::new().with("causal", Attr::Int(i64::from(mask_causal)));
            let keep = b.op(
                g,
                OpKind::AttentionKeyKeep,
                ka,
                vec![mask],
                keep_dims,
                "keep",
            );
            let mut pkd = kd.clone();
            pkd[3] = Dim::Fixed(m as u64);
            pk = b.op(g, OpKind::Mul, Attrs::new(), vec![pk, keep], pkd, "pk_kept");
        }
        let mut v = v;
        if let Some((hq, hk)) = s.groups {
            // Query head h reads key/value head h / (hq / hk), as `attention` does.
            let idx: Vec<i64> = (0..hq).map(|h| (h / (hq / hk)) as i64).collect();
            let heads = b.constant(g, "favor_heads", Tensor::from_vec(vec![hq], idx));
            let axis1 = || Attrs::new().with("axis", Attr::Int(1));
            pk = b.op(
                g,
                OpKind::Gather,
                axis1(),
                vec![pk, heads],
                feat_dims.clone(),
                "pk",
            );
            v = b.op(g, OpKind::Gather, axis1(), vec![v, heads], vd.clone(), "v");
        }
        let la_attrs = Attrs::new()
            .with("causal", Attr::Int(i64::from(s.causal || mask_causal)))
            .with("normalize", Attr::Int(1))
            .with("epsilon", Attr::Float(ROW_SUM_EPSILON))
            .with("chunk", Attr::Int(chunk as i64));
        let out = g.nodes[at].outputs[0];
        let node = if s.seq_major {
            let y = b.op(
                g,
                OpKind::LinearAttention,
                la_attrs,
                vec![pq, pk, v],
                vd.clone(),
                "y",
            );
            Node {
                op: OpKind::Transpose,
                attrs: perm(&swap),
                inputs: vec![Some(y)],
                outputs: vec![out],
                name: b.tag.clone(),
            }
        } else {
            Node {
                op: OpKind::LinearAttention,
                attrs: la_attrs,
                inputs: vec![Some(pq), Some(pk), Some(v)],
                outputs: vec![out],
                name: b.tag.clone(),
            }
        };
        g.nodes[at] = node;
        let inserts = b.nodes.into_iter().map(|n| (at, n)).collect();
        crate::rewrite::insert_nodes(g, inserts);
    }
}

/// FAVOR+'s `(φ(q), φ(k))` with the `[D, m]` matrix `w` (see the module docs): queries
/// stabilised per row, keys per (batch, head).
fn favor_maps(
    b: &mut Builder,
    g: &mut Graph,
    w: Tensor,
    scale: f64,
    m: usize,
    (q, qd): (ValueId, &[Dim]),
    (k, kd): (ValueId, &[Dim]),
) -> (ValueId, ValueId) {
    let wv = b.constant(g, "favor_w", w);
    let half_c2 = b.constant(g, "favor_half_c2", Tensor::scalar((scale / 2.0) as f32));
    let last = b.constant(g, "favor_axis", Tensor::from_vec(vec![1], vec![-1i64]));
    let per_head = b.constant(g, "favor_axes", Tensor::from_vec(vec![2], vec![2i64, 3]));
    // x: `[B, h, S, D]` → φ(x): `[B, h, S, m]`, stabilised over `axes`.
    let phi =
        |b: &mut Builder, g: &mut Graph, x: ValueId, xd: &[Dim], axes: ValueId, per_row: bool| {
            let with = |last: Dim| {
                let mut d = xd.to_vec();
                d[3] = last;
                d
            };
            let (fd, rd) = (with(Dim::Fixed(m as u64)), with(Dim::Fixed(1)));
            let mut sd = rd.clone();
            if !per_row {
                sd[2] = Dim::Fixed(1);
            }
            // W x' − |x'|²/2 − stab, then exp.
            let proj = b.op(
                g,
                OpKind::MatMul,
                Attrs::new(),
                vec![x, wv],
                fd.clone(),
                "proj",
            );
            let sq = b.op(g, OpKind::Mul, Attrs::new(), vec![x, x], xd.to_vec(), "sq");
            let norm = b.op(
                g,
                OpKind::ReduceSum,
                keep(),
                vec![sq, last],
                rd.clone(),
                "norm",
            );
            let half = b.op(
                g,
                OpKind::Mul,
                Attrs::new(),
                vec![norm, half_c2],
                rd,
                "half",
            );
            let z = b.op(
                g,
                OpKind::Sub,
                Attrs::new(),
                vec![proj, half],
                fd.clone(),
                "z",
            );
            let mx = b.op(g, OpKind::ReduceMax, keep(), vec![z, axes], sd, "max");
            let zs = b.op(g, OpKind::Sub, Attrs::new(), vec![z, mx], fd.clone(), "zs");
            b.op(g, OpKind::Exp, Attrs::new(), vec![zs], fd, "phi")
        };
    let pq = phi(b, g, q, qd, last, true);
    let pk = phi(b, g, k, kd, per_head, false);
    (pq, pk)
}

/// The polynomial kernel's `φ(x)` (see the module docs) of `x: [B, h, S, d]`, projected to
/// width `r` first when `r < d` (seeded by `seed`): `[B, h, S, (r+1)(r+2)/2]`.
#[allow(clippy::too_many_arguments)]
fn poly_map(
    b: &mut Builder,
    g: &mut Graph,
    x: ValueId,
    xd: &[Dim],
    d: usize,
    r: usize,
    seed: u64,
    scale: f64,
) -> ValueId {
    let with = |last: usize| {
        let mut v = xd.to_vec();
        v[3] = Dim::Fixed(last as u64);
        v
    };
    let c = scale.sqrt();
    let xs = if r < d {
        let p = b.constant(g, "poly_proj", poly_projection(d, r, seed, c));
        b.op(
            g,
            OpKind::MatMul,
            Attrs::new(),
            vec![x, p],
            with(r),
            "poly_x",
        )
    } else {
        let cv = b.constant(g, "poly_c", Tensor::scalar(c as f32));
        b.op(g, OpKind::Mul, Attrs::new(), vec![x, cv], with(r), "poly_x")
    };
    // x̃ = [1, x']: pad the last axis at its start with 1.
    let pads = b.constant(
        g,
        "poly_pads",
        Tensor::from_vec(vec![8], vec![0i64, 0, 0, 1, 0, 0, 0, 0]),
    );
    let one = b.constant(g, "poly_one", Tensor::scalar(1.0f32));
    let xt = b.op(
        g,
        OpKind::Pad,
        Attrs::new().with("mode", Attr::Str("constant".into())),
        vec![xs, pads, one],
        with(r + 1),
        "poly_xt",
    );
    let (mut ia, mut ib, mut w) = (vec![], vec![], vec![]);
    for a in 0..=r {
        for bb in a..=r {
            ia.push(a as i64);
            ib.push(bb as i64);
            w.push(if a == bb && a > 0 {
                std::f32::consts::FRAC_1_SQRT_2
            } else {
                1.0
            });
        }
    }
    let m = ia.len();
    let ia = b.constant(g, "poly_a", Tensor::from_vec(vec![m], ia));
    let ib = b.constant(g, "poly_b", Tensor::from_vec(vec![m], ib));
    let wv = b.constant(g, "poly_w", Tensor::from_vec(vec![m], w));
    let axis = || Attrs::new().with("axis", Attr::Int(3));
    let xa = b.op(g, OpKind::Gather, axis(), vec![xt, ia], with(m), "poly_xa");
    let xb = b.op(g, OpKind::Gather, axis(), vec![xt, ib], with(m), "poly_xb");
    let ab = b.op(
        g,
        OpKind::Mul,
        Attrs::new(),
        vec![xa, xb],
        with(m),
        "poly_ab",
    );
    b.op(
        g,
        OpKind::Mul,
        Attrs::new(),
        vec![ab, wv],
        with(m),
        "poly_phi",
    )
}

/// The polynomial kernel's projection: a seeded Gaussian `[d, r]` matrix scaled by `c/√r`
/// (so `E[(Px)·(Py)] = c²·x·y`).
pub fn poly_projection(d: usize, r: usize, seed: u64, c: f64) -> Tensor {
    let mut rng = SplitMix(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x706f_6c79);
    let w: Vec<f32> = (0..d * r)
        .map(|_| (rng.gaussian() * c / (r as f64).sqrt()) as f32)
        .collect();
    Tensor::from_vec(vec![d, r], w)
}

/// The pattern of a mask on every calibration set: `Some(true)` causal + key padding,
/// `Some(false)` key padding alone, `None` neither (see `attention_key_keep`).
fn mask_pattern(values: &[Tensor]) -> Option<bool> {
    let fits = |causal: bool| {
        let attrs = Attrs::new().with("causal", Attr::Int(i64::from(causal)));
        !values.is_empty()
            && values.iter().all(|t| {
                kiln_ir::ops::linear_attention::eval(OpKind::AttentionKeyKeep, &attrs, &[Some(t)])
                    .is_ok()
            })
    };
    if fits(false) {
        Some(false)
    } else if fits(true) {
        Some(true)
    } else {
        None
    }
}

/// The value width's size for the chunk choice (its bound size, else the default dim).
fn dv_hint(cost: &CostModel, dv: &Dim) -> usize {
    match dv {
        Dim::Fixed(n) => *n as usize,
        Dim::Sym(s) => cost.dims.get(s).copied().unwrap_or(cost.default_dim) as usize,
        _ => cost.default_dim as usize,
    }
}

fn keep() -> Attrs {
    Attrs::new().with("keepdims", Attr::Int(1))
}

fn perm(p: &[i64]) -> Attrs {
    Attrs::new().with("perm", Attr::Ints(p.to_vec()))
}

/// Collects the nodes a rewrite inserts before its anchor.
struct Builder {
    namer: Namer,
    nodes: Vec<Node>,
    tag: String,
}

impl Builder {
    fn op(
        &mut self,
        g: &mut Graph,
        op: OpKind,
        attrs: Attrs,
        inputs: Vec<ValueId>,
        dims: Vec<Dim>,
        base: &str,
    ) -> ValueId {
        let ty = TensorType::new(DType::F32, Shape::new(dims));
        let out = self.namer.add_value(g, &format!("favor_{base}"), ty);
        self.nodes.push(Node {
            op,
            attrs,
            inputs: inputs.into_iter().map(Some).collect(),
            outputs: vec![out],
            name: self.tag.clone(),
        });
        out
    }

    fn constant(&mut self, g: &mut Graph, base: &str, t: Tensor) -> ValueId {
        let ty = TensorType::new(t.dtype(), Shape::fixed(t.shape()));
        let out = self.namer.add_value(g, base, ty);
        self.nodes.push(Node {
            op: OpKind::Constant,
            attrs: Attrs::new().with("value", Attr::Tensor(Arc::new(t))),
            inputs: vec![],
            outputs: vec![out],
            name: self.tag.clone(),
        });
        out
    }
}

/// `Wᵀ·c` as a `[D, m]` f32 matrix: `m` Gaussian rows of width `D`, orthogonalised in
/// blocks of `D` (Gram–Schmidt), each rescaled to the norm of an independent Gaussian
/// vector (FAVOR+'s orthogonal random features), times `c`. Deterministic in `seed`.
pub fn features(d: usize, m: usize, seed: u64, c: f64) -> Tensor {
    let mut rng = SplitMix(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x6b69_6c6e);
    let mut rows: Vec<Vec<f64>> = Vec::with_capacity(m);
    while rows.len() < m {
        let mut block: Vec<Vec<f64>> = Vec::with_capacity(d);
        while block.len() < d {
            let mut r: Vec<f64> = (0..d).map(|_| rng.gaussian()).collect();
            for b in &block {
                let dot: f64 = r.iter().zip(b).map(|(x, y)| x * y).sum();
                r.iter_mut().zip(b).for_each(|(x, y)| *x -= dot * y);
            }
            let n = r.iter().map(|x| x * x).sum::<f64>().sqrt();
            if n > 1e-6 {
                r.iter_mut().for_each(|x| *x /= n);
                block.push(r);
            }
        }
        for mut r in block.into_iter().take(m - rows.len()) {
            let norm = (0..d).map(|_| rng.gaussian().powi(2)).sum::<f64>().sqrt();
            r.iter_mut().for_each(|x| *x *= norm * c);
            rows.push(r);
        }
    }
    let mut w = vec![0f32; d * m];
    for (j, r) in rows.iter().enumerate() {
        for (i, x) in r.iter().enumerate() {
            w[i * m + j] = *x as f32;
        }
    }
    Tensor::from_vec(vec![d, m], w)
}

/// SplitMix64 with Box–Muller Gaussians: a small, seeded generator (the rewrite must be
/// reproducible from its parameters alone).
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn uniform(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    fn gaussian(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::approx::{approximate, measure, Calibration, Interpreter, Metric, Request};
    use crate::target::Target;
    use crate::testutil::{f32_ty, node_with, Rng};

    /// How close many random features get to softmax attention on small scores (rel-l2).
    const MANY_FEATURES_TOLERANCE: f64 = 0.1;
    /// Two layouts of one rewrite differ only by rounding.
    const LAYOUT_TOLERANCE: f32 = 1e-5;
    /// The polynomial rewrite (f32) against its f64 definition, relative to the largest
    /// magnitude.
    const POLY_TOLERANCE: f64 = 1e-4;
    /// The second-order Taylor kernel against softmax attention when `|t| ≲ 0.1` (rel-l2).
    const POLY_SMALL_SCORE_TOLERANCE: f64 = 0.01;

    /// `attention(q, k, v)` on `[1, H, S, D]` (or `[1, S, H, D]` with `bshd`).
    fn attention_graph(h: usize, s: usize, d: usize, causal: bool, bshd: bool) -> Graph {
        let mut g = Graph::new("attn");
        let dims = if bshd { [1, s, h, d] } else { [1, h, s, d] };
        let q = g.add_input("q", f32_ty(&dims));
        let k = g.add_input("k", f32_ty(&dims));
        let v = g.add_input("v", f32_ty(&dims));
        let mut attrs = Attrs::new().with("causal", Attr::Int(i64::from(causal)));
        if bshd {
            attrs = attrs.with("layout", Attr::Str("bshd".into()));
        }
        let y = node_with(
            &mut g,
            OpKind::Attention,
            attrs,
            &[q, k, v],
            "y",
            f32_ty(&dims),
        );
        g.outputs = vec![y];
        g
    }

    fn inputs(seed: u64, dims: &[usize], scale: f32) -> Vec<Tensor> {
        let mut rng = Rng::new(seed);
        (0..3)
            .map(|_| {
                let t = rng.tensor(DType::F32, dims);
                let v: Vec<f32> = t
                    .as_slice::<f32>()
                    .unwrap()
                    .iter()
                    .map(|x| x * scale / 4.0)
                    .collect();
                Tensor::from_vec(dims.to_vec(), v)
            })
            .collect()
    }

    fn rewritten(g: &Graph, m: usize, seed: u64) -> Graph {
        rewritten_with(g, vec![m as f64, seed as f64, 16.0])
    }

    /// `g`'s one site rewritten with the candidate values `[m, seed, chunk, mask causal?]`.
    fn rewritten_with(g: &Graph, values: Vec<f64>) -> Graph {
        let fam = LinearAttentionApprox {
            kernels: Kernels::Favor(values[0] as usize),
        };
        let sites = fam.sites(g);
        assert_eq!(sites.len(), 1);
        let c = Candidate {
            family: LINEAR_ATTENTION,
            site: sites[0].clone(),
            params: String::new(),
            values,
            saving: 1.0,
        };
        let mut out = g.clone();
        fam.apply(&mut out, &c);
        kiln_ir::verify(&out).unwrap();
        out
    }

    fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
        measure(
            Metric::RelL2,
            std::slice::from_ref(a),
            std::slice::from_ref(b),
            &["y".into()],
        )
        .unwrap()
    }

    #[test]
    fn many_random_features_approach_softmax_attention() {
        for causal in [false, true] {
            let g = attention_graph(2, 48, 8, causal, false);
            let approx = rewritten(&g, 4096, 0);
            assert!(approx.nodes.iter().any(|n| n.op == OpKind::LinearAttention));
            assert!(!approx.nodes.iter().any(|n| n.op == OpKind::Attention));
            let x = inputs(3, &[1, 2, 48, 8], 1.0);
            let want = kiln_ir::run(&g, x.clone()).unwrap();
            let got = kiln_ir::run(&approx, x).unwrap();
            let e = rel_l2(&got[0], &want[0]);
            assert!(e < MANY_FEATURES_TOLERANCE, "causal={causal}: rel-l2 {e}");
            // Fewer features, larger error: the estimate really depends on m.
            let few = kiln_ir::run(&rewritten(&g, 4, 0), inputs(3, &[1, 2, 48, 8], 1.0)).unwrap();
            assert!(rel_l2(&few[0], &want[0]) > e, "causal={causal}");
        }
    }

    #[test]
    fn grouped_query_heads_read_their_key_head() {
        // 4 query heads over 2 key/value heads.
        let mut g = Graph::new("gqa");
        let q = g.add_input("q", f32_ty(&[1, 4, 32, 8]));
        let k = g.add_input("k", f32_ty(&[1, 2, 32, 8]));
        let v = g.add_input("v", f32_ty(&[1, 2, 32, 8]));
        let attrs = Attrs::new().with("causal", Attr::Int(1));
        let y = node_with(
            &mut g,
            OpKind::Attention,
            attrs,
            &[q, k, v],
            "y",
            f32_ty(&[1, 4, 32, 8]),
        );
        g.outputs = vec![y];
        let approx = rewritten(&g, 4096, 0);
        let mut rng = Rng::new(11);
        let x: Vec<Tensor> = [[1, 4, 32, 8], [1, 2, 32, 8], [1, 2, 32, 8]]
            .iter()
            .map(|d| {
                let t = rng.tensor(DType::F32, d);
                let v = t
                    .as_slice::<f32>()
                    .unwrap()
                    .iter()
                    .map(|x| x / 4.0)
                    .collect();
                Tensor::from_vec(d.to_vec(), v)
            })
            .collect();
        let want = kiln_ir::run(&g, x.clone()).unwrap();
        let got = kiln_ir::run(&approx, x).unwrap();
        let e = rel_l2(&got[0], &want[0]);
        assert!(e < MANY_FEATURES_TOLERANCE, "rel-l2 {e}");
    }

    #[test]
    fn large_scores_give_finite_outputs() {
        let g = attention_graph(2, 40, 8, true, false);
        let approx = rewritten(&g, 16, 1);
        // Scores up to ~ 8·(30)²/√8: exp would overflow without the stabilisers.
        let got = kiln_ir::run(&approx, inputs(5, &[1, 2, 40, 8], 30.0)).unwrap();
        let v = got[0].as_slice::<f32>().unwrap();
        assert!(v.iter().all(|x| x.is_finite()), "non-finite output");
    }

    #[test]
    fn seq_major_layout_gives_the_head_major_result() {
        let (h, s, d) = (2, 24, 8);
        let hm = rewritten(&attention_graph(h, s, d, true, false), 32, 0);
        let sm = rewritten(&attention_graph(h, s, d, true, true), 32, 0);
        let x = inputs(8, &[1, h, s, d], 1.0);
        let swap = |t: &Tensor| -> Tensor {
            let a = t.as_slice::<f32>().unwrap();
            let (d0, d1, d2) = (t.shape()[1], t.shape()[2], t.shape()[3]);
            let mut out = vec![0f32; a.len()];
            for i in 0..d0 {
                for j in 0..d1 {
                    for c in 0..d2 {
                        out[(j * d0 + i) * d2 + c] = a[(i * d1 + j) * d2 + c];
                    }
                }
            }
            Tensor::from_vec(vec![1, d1, d0, d2], out)
        };
        let y_hm = kiln_ir::run(&hm, x.clone()).unwrap();
        let y_sm = kiln_ir::run(&sm, x.iter().map(swap).collect()).unwrap();
        let back = swap(&y_sm[0]);
        let (a, b) = (
            y_hm[0].as_slice::<f32>().unwrap(),
            back.as_slice::<f32>().unwrap(),
        );
        let worst = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(worst <= LAYOUT_TOLERANCE, "layouts differ by {worst}");
    }

    #[test]
    fn odd_masks_and_decode_attention_are_not_sites() {
        let fam = LinearAttentionApprox {
            kernels: Kernels::All,
        };
        // A mask that is not [B|1, H|1, S, S].
        let mut g = Graph::new("masked");
        let q = g.add_input("q", f32_ty(&[1, 2, 8, 4]));
        let mask = g.add_input("mask", f32_ty(&[1, 1, 3, 8]));
        let y = node_with(
            &mut g,
            OpKind::Attention,
            Attrs::new(),
            &[q, q, q, mask],
            "y",
            f32_ty(&[1, 2, 8, 4]),
        );
        g.outputs = vec![y];
        assert!(fam.sites(&g).is_empty());
        // A causal decode step: one query against a longer key cache.
        let mut g = Graph::new("decode");
        let q = g.add_input("q", f32_ty(&[1, 2, 1, 4]));
        let k = g.add_input("k", f32_ty(&[1, 2, 8, 4]));
        let attrs = Attrs::new().with("causal", Attr::Int(1));
        let y = node_with(
            &mut g,
            OpKind::Attention,
            attrs,
            &[q, k, k],
            "y",
            f32_ty(&[1, 2, 1, 4]),
        );
        g.outputs = vec![y];
        assert!(fam.sites(&g).is_empty());
        // The plain one is.
        assert_eq!(fam.sites(&attention_graph(2, 8, 4, true, false)).len(), 1);
    }

    #[test]
    fn the_budget_refuses_a_tiny_error_and_accepts_a_generous_one() {
        // Long enough that the cost model expects the linear form to win.
        let (h, s, d) = (2, 1024, 8);
        let g = attention_graph(h, s, d, true, false);
        let sets: Vec<Vec<Tensor>> = (0..3).map(|i| inputs(20 + i, &[1, h, s, d], 1.0)).collect();
        let calib = Calibration::split(sets, "test", true);
        let req = |e: f64| Request {
            rewrites: super::super::parse_families("linear-attention").unwrap(),
            max_error: e,
            metric: Metric::RelL2,
        };
        let r = approximate(&g, &req(1e-6), &calib, &Interpreter, Target::host());
        assert!(matches!(r, Err(ApproxError::Refused { .. })), "{r:?}");
        let (approx, report) =
            approximate(&g, &req(1.0), &calib, &Interpreter, Target::host()).unwrap();
        assert_eq!(report.accepted.len(), 1, "{report}");
        assert!(report.est_speedup > 1.0, "{report}");
        assert!(report.held_out_error.unwrap() <= 1.0);
        assert!(report.accepted[0].candidate.params.starts_with("favor+ m="));
        assert!(approx.nodes.iter().any(|n| n.op == OpKind::LinearAttention));
    }

    /// The polynomial kernel's output against its definition, computed here in f64:
    /// weights `1 + t + t²/2`, `t = s·(Pq)·(Pk)` (`P` the identity at full width).
    fn poly_reference(x: &[Tensor], causal: bool, proj: Option<&Tensor>) -> Vec<f64> {
        let sh = x[0].shape().to_vec();
        let (h, n, d) = (sh[1], sh[2], sh[3]);
        let s = 1.0 / (d as f64).sqrt();
        let f = |t: &Tensor| -> Vec<f64> { t.to_f64s() };
        let (q, k, v) = (f(&x[0]), f(&x[1]), f(&x[2]));
        // (Pq)·(Pk) = q·(P Pᵀ)k; with P scaled by √s the dot product already carries s.
        let (ppt, s) = match proj {
            None => (None, s),
            Some(p) => {
                let r = p.shape()[1];
                let pv = p.to_f64s();
                let mut m = vec![0f64; d * d];
                for a in 0..d {
                    for b in 0..d {
                        m[a * d + b] = (0..r).map(|c| pv[a * r + c] * pv[b * r + c]).sum();
                    }
                }
                (Some(m), 1.0)
            }
        };
        let mut y = vec![0f64; h * n * d];
        for hh in 0..h {
            let row = |t: &[f64], i: usize| -> Vec<f64> {
                t[(hh * n + i) * d..(hh * n + i + 1) * d].to_vec()
            };
            for i in 0..n {
                let qi = row(&q, i);
                let (mut num, mut den) = (vec![0f64; d], 0f64);
                for j in 0..n {
                    if causal && j > i {
                        continue;
                    }
                    let kj = row(&k, j);
                    let dot: f64 = match &ppt {
                        None => qi.iter().zip(&kj).map(|(a, b)| a * b).sum(),
                        Some(m) => (0..d)
                            .map(|a| (0..d).map(|b| qi[a] * m[a * d + b] * kj[b]).sum::<f64>())
                            .sum(),
                    };
                    let t = s * dot;
                    let w = 1.0 + t + t * t / 2.0;
                    den += w;
                    for (c, vj) in row(&v, j).iter().enumerate() {
                        num[c] += w * vj;
                    }
                }
                for c in 0..d {
                    y[(hh * n + i) * d + c] = num[c] / (den + f64::from(ROW_SUM_EPSILON));
                }
            }
        }
        y
    }

    /// The poly rewrite of `g`'s one site at width `r` (projection seed 0).
    fn poly_rewritten(g: &Graph, d: usize, r: usize) -> Graph {
        rewritten_with(
            g,
            vec![poly_features(r) as f64, 0.0, 16.0, 0.0, KIND_POLY, r as f64],
        )
        .tap(|a| {
            assert!(
                a.nodes.iter().any(|n| n.op == OpKind::LinearAttention),
                "{d}"
            )
        })
    }

    trait Tap: Sized {
        fn tap(self, f: impl FnOnce(&Self)) -> Self {
            f(&self);
            self
        }
    }
    impl Tap for Graph {}

    #[test]
    fn the_polynomial_kernel_computes_its_taylor_weights_at_odd_lengths() {
        // Scores up to |t| ~ 3: far from softmax, but the map must still be exactly
        // 1 + t + t²/2 (and positive: no NaN, no sign change in the row sums).
        let d = 8;
        for n in [1, 7, 65] {
            for causal in [false, true] {
                let g = attention_graph(2, n, d, causal, false);
                let x = inputs(40 + n as u64, &[1, 2, n, d], 4.0);
                for r in [d, 5] {
                    let approx = poly_rewritten(&g, d, r);
                    let got = kiln_ir::run(&approx, x.clone()).unwrap()[0].to_f64s();
                    let p =
                        (r < d).then(|| poly_projection(d, r, 0, 1.0 / (d as f64).sqrt().sqrt()));
                    let want = poly_reference(&x, causal, p.as_ref());
                    let scale = want.iter().fold(1e-6f64, |m, x| m.max(x.abs()));
                    for (e, (a, b)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (a - b).abs() <= POLY_TOLERANCE * scale,
                            "n {n} causal {causal} r {r}: element {e}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn the_polynomial_kernel_approaches_softmax_on_small_scores() {
        for causal in [false, true] {
            let g = attention_graph(2, 33, 8, causal, false);
            let x = inputs(9, &[1, 2, 33, 8], 0.5);
            let want = kiln_ir::run(&g, x.clone()).unwrap();
            let got = kiln_ir::run(&poly_rewritten(&g, 8, 8), x.clone()).unwrap();
            let e = rel_l2(&got[0], &want[0]);
            assert!(
                e < POLY_SMALL_SCORE_TOLERANCE,
                "causal={causal}: rel-l2 {e}"
            );
            // Larger scores, larger error: the Taylor expansion really is truncated.
            let big = inputs(9, &[1, 2, 33, 8], 8.0);
            let want = kiln_ir::run(&g, big.clone()).unwrap();
            let got = kiln_ir::run(&poly_rewritten(&g, 8, 8), big).unwrap();
            assert!(rel_l2(&got[0], &want[0]) > e, "causal={causal}");
        }
    }

    #[test]
    fn the_budget_takes_or_refuses_the_polynomial_kernel() {
        // Long enough that the cost model expects the 45-feature map to win.
        let (h, s, d) = (2, 2048, 8);
        let g = attention_graph(h, s, d, true, false);
        let sets: Vec<Vec<Tensor>> = (0..3).map(|i| inputs(30 + i, &[1, h, s, d], 1.0)).collect();
        let calib = Calibration::split(sets, "test", true);
        let req = |e: f64| Request {
            rewrites: super::super::parse_families("linear-attention=poly").unwrap(),
            max_error: e,
            metric: Metric::RelL2,
        };
        let r = approximate(&g, &req(1e-6), &calib, &Interpreter, Target::host());
        assert!(matches!(r, Err(ApproxError::Refused { .. })), "{r:?}");
        let (approx, report) =
            approximate(&g, &req(0.5), &calib, &Interpreter, Target::host()).unwrap();
        assert_eq!(report.accepted.len(), 1, "{report}");
        assert!(report.held_out_error.unwrap() <= 0.5, "{report}");
        let params = &report.accepted[0].candidate.params;
        assert!(params.starts_with("poly m=45 "), "{params}");
        assert!(approx.nodes.iter().any(|n| n.op == OpKind::LinearAttention));
        // A NaN in a query or a key gives NaN wherever softmax attention gives it (its row;
        // every later row), never a finite value in its place. (The `linear_attention`
        // reference sums the masked terms too, NaN · 0: a NaN key poisons its whole head,
        // earlier rows included, as in the exported quadratic graphs.)
        for input in [0, 1] {
            let mut x = inputs(33, &[1, h, s, d], 1.0);
            let mut vals = x[input].as_slice::<f32>().unwrap().to_vec();
            vals[(s + 700) * d + 3] = f32::NAN;
            x[input] = Tensor::from_vec(vec![1, h, s, d], vals);
            let want = kiln_ir::run(&g, x.clone()).unwrap()[0].to_f64s();
            let got = kiln_ir::run(&approx, x).unwrap()[0].to_f64s();
            assert!(want.iter().any(|x| x.is_nan()), "input {input}");
            for (e, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(
                    b.is_finite() || !a.is_finite(),
                    "input {input} element {e}: {a}"
                );
            }
        }
    }

    #[test]
    fn bad_feature_counts_are_errors() {
        for p in ["0", "-3", "x", "70000"] {
            assert!(matches!(
                LinearAttentionApprox::parse(Some(p)),
                Err(ApproxError::BadParam { .. })
            ));
        }
        assert_eq!(
            LinearAttentionApprox::parse(Some("64")).unwrap().kernels,
            Kernels::Favor(64)
        );
        assert_eq!(
            LinearAttentionApprox::parse(Some("poly")).unwrap().kernels,
            Kernels::Poly(None)
        );
        assert_eq!(
            LinearAttentionApprox::parse(Some("poly:16"))
                .unwrap()
                .kernels,
            Kernels::Poly(Some(16))
        );
        for p in ["poly:0", "poly:", "poly:x", "poly:1000", "polynomial"] {
            assert!(
                matches!(
                    LinearAttentionApprox::parse(Some(p)),
                    Err(ApproxError::BadParam { .. })
                ),
                "{p}"
            );
        }
    }

    /// `attention(q, k, v, mask)` with an additive mask input `[1, 1, S, S]` (non-causal op).
    fn masked_graph(h: usize, s: usize, d: usize) -> Graph {
        let mut g = Graph::new("masked");
        let dims = [1, h, s, d];
        let q = g.add_input("q", f32_ty(&dims));
        let k = g.add_input("k", f32_ty(&dims));
        let v = g.add_input("v", f32_ty(&dims));
        let mask = g.add_input("mask", f32_ty(&[1, 1, s, s]));
        let y = node_with(
            &mut g,
            OpKind::Attention,
            Attrs::new(),
            &[q, k, v, mask],
            "y",
            f32_ty(&dims),
        );
        g.outputs = vec![y];
        g
    }

    /// HF-style additive mask: `f32::MIN` where dropped (future keys when causal, the last
    /// `pad` keys), 0 elsewhere; `bias` adds a small value at [0, 0] (not a padding mask).
    fn mask(s: usize, causal: bool, pad: usize, bias: bool) -> Tensor {
        let mut m = vec![0f32; s * s];
        for i in 0..s {
            for j in 0..s {
                if (causal && j > i) || j >= s - pad {
                    m[i * s + j] = f32::MIN;
                }
            }
        }
        if bias {
            m[0] = 0.5;
        }
        Tensor::from_vec(vec![1, 1, s, s], m)
    }

    #[test]
    fn mask_patterns_are_classified_on_the_calibration_sets() {
        assert_eq!(mask_pattern(&[mask(8, true, 2, false)]), Some(true));
        assert_eq!(mask_pattern(&[mask(8, false, 2, false)]), Some(false));
        assert_eq!(mask_pattern(&[mask(8, false, 0, false)]), Some(false));
        assert_eq!(mask_pattern(&[mask(8, true, 0, true)]), None);
        // A [S, T] mask (leading dims left out, as `attention` broadcasts it) is the same.
        let flat = |t: Tensor| {
            Tensor::from_vec(
                t.shape()[2..].to_vec(),
                t.as_slice::<f32>().unwrap().to_vec(),
            )
        };
        assert_eq!(mask_pattern(&[flat(mask(8, true, 0, false))]), Some(true));
        assert_eq!(mask_pattern(&[flat(mask(8, false, 3, false))]), Some(false));
        assert_eq!(mask_pattern(&[flat(mask(8, true, 0, true))]), None);
        // One set that breaks the pattern is enough to refuse.
        assert_eq!(
            mask_pattern(&[mask(8, true, 0, false), mask(8, true, 0, true)]),
            None
        );
    }

    #[test]
    fn a_causal_padding_mask_is_linearised_and_checked_on_every_run() {
        let (h, s, d) = (2, 40, 8);
        let g = masked_graph(h, s, d);
        let sites = LinearAttentionApprox {
            kernels: Kernels::All,
        }
        .sites(&g);
        assert_eq!(sites.len(), 1);
        assert_eq!(sites[0].probe, g.inputs[3], "the mask is the probe");
        let approx = rewritten_with(&g, vec![4096.0, 0.0, 16.0, 1.0]);
        assert!(approx
            .nodes
            .iter()
            .any(|n| n.op == OpKind::AttentionKeyKeep));
        let mut x = inputs(4, &[1, h, s, d], 1.0);
        x.push(mask(s, true, 5, false));
        let want = kiln_ir::run(&g, x.clone()).unwrap();
        let got = kiln_ir::run(&approx, x.clone()).unwrap();
        let e = rel_l2(&got[0], &want[0]);
        assert!(e < MANY_FEATURES_TOLERANCE, "rel-l2 {e}");
        // A mask that is not causal + padding fails the run, naming the element.
        x[3] = mask(s, true, 5, true);
        let err = kiln_ir::run(&approx, x.clone()).unwrap_err().to_string();
        assert!(
            err.contains("not a causal key-padding mask at [0, 0, 0, 0]"),
            "{err}"
        );
        x[3] = mask(s, false, 0, false);
        let err = kiln_ir::run(&approx, x).unwrap_err().to_string();
        assert!(err.contains("not a causal key-padding mask"), "{err}");
    }
}
