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
//! features are `w_ab·x̃_a·x̃_b` over the pairs `a ≤ b` of `x̃` (two `gather`s, the second
//! from `[x̃, x̃/√2]` so the diagonal's weight comes with it, and a `mul`):
//! `(0, 0)` gives 1, `(0, i)` gives `x'_i` (the `t` term), `(i, i)` gives `x'_i²/√2` and
//! `(i, j)`, `i < j`, gives `x'_i·x'_j` — so the quadratic terms sum to `(x'·y')²/2`, the
//! `(x'⊗x')/√2` of the paper with each symmetric pair kept once: `m = (R+1)(R+2)/2` features
//! instead of `1 + R + R²`. `1 + t + t²/2 = ((t + 1)² + 1)/2 ≥ 1/2`: every weight is
//! positive, no stabiliser is needed. With `R < D` the queries and keys are first projected
//! by a seeded Gaussian `[D, R]` matrix scaled by `1/√R` (so `E[(Px)·(Py)] = x·y`), which
//! makes the map cheap on wide heads at the price of the projection's error: candidates
//! `R` in {D, 32, 16} (those below `D`), `poly:R` fixes it. Exact where `t` is small; where
//! it is not the budget refuses it like any other candidate.
//!
//! The hybrid exact local window (`linear-attention=hybrid[:W]`, causal sites only): the
//! `W` most recent keys of each query exact (softmax weights), the keys before them through
//! the feature map (FAVOR+ with `D` features, or the polynomial map at width `min(D, 16)`),
//! the two parts combined by their normalisers on the exact part's scale (derivation at
//! [`Hybrid::build`]). Composed of ordinary ops: the window gathers keys and values at
//! `i − W + 1 .. i` (O(S·W·D)), the far part is causal `linear_attention` on keys shifted by
//! `W`. The budget picks `W` in [`HYBRID_WINDOWS`]; the cost model proposes it only where
//! the gathers cost less than they save (long sequences).

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
    /// The hybrid exact local window (`linear-attention=hybrid[:W]`, causal sites): the
    /// window `W` (else [`HYBRID_WINDOWS`]) exact, FAVOR+ with `D` features or the
    /// polynomial map at width `min(D, 16)` for the keys before it.
    Hybrid(Option<usize>),
}

/// Windows tried by the hybrid form.
pub const HYBRID_WINDOWS: [usize; 3] = [16, 32, 64];

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
        if p == "hybrid" {
            return Ok(LinearAttentionApprox {
                kernels: Kernels::Hybrid(None),
            });
        }
        if let Some(w) = p.strip_prefix("hybrid:") {
            let w: usize = w
                .parse()
                .ok()
                .filter(|&w| (1..=65536).contains(&w))
                .ok_or_else(|| bad("expected hybrid:W with a window W in 1..=65536"))?;
            return Ok(LinearAttentionApprox {
                kernels: Kernels::Hybrid(Some(w)),
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
                bad("expected a feature count (an integer in 1..=65536), poly, poly:R, hybrid or hybrid:W")
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
            Kernels::Poly(_) | Kernels::Hybrid(_) => vec![],
        };
        // Polynomial: (R, seed of the projection); R = D is not projected.
        let poly: Vec<(usize, u64)> = match self.kernels {
            Kernels::Favor(_) | Kernels::Hybrid(_) => vec![],
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
        // Hybrid: causal sites only; FAVOR+ (m = D) or polynomial (R = min(D, 16)) far part.
        let windows: Vec<usize> = match self.kernels {
            Kernels::Hybrid(Some(w)) => vec![w],
            Kernels::Hybrid(None) => HYBRID_WINDOWS.to_vec(),
            _ => vec![],
        };
        for w in windows.into_iter().filter(|_| causal) {
            let r = s.d.min(16);
            for (kind, m, name) in [
                (KIND_FAVOR, s.d, format!("favor+ m={}", s.d)),
                (
                    KIND_POLY,
                    poly_features(r),
                    format!("poly m={} r={r}", poly_features(r)),
                ),
            ] {
                let chunk = choose_chunk(&probe.cost.target, m, dv + 1, true);
                trials.push((
                    format!("hybrid w={w} {name} chunk={chunk}{mask_note}"),
                    vec![
                        m as f64,
                        0.0,
                        chunk as f64,
                        f64::from(u8::from(mask_causal)),
                        kind,
                        r as f64,
                        w as f64,
                    ],
                ));
            }
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
        // The FAVOR+ stabilisers (query rows, keys per head), for the hybrid's rescaling.
        let (pq, mut pk, mut stab) = match poly_rank {
            None => {
                let w = features(s.d, m, seed, s.scale.sqrt());
                let (pq, pk, mq, mk) = favor_maps(&mut b, g, w, s.scale, m, (q, &s.dims), (k, &kd));
                (pq, pk, Some((mq, mk)))
            }
            Some(r) => {
                let pq = poly_map(&mut b, g, q, &s.dims, s.d, r, seed, s.scale);
                let pk = poly_map(&mut b, g, k, &kd, s.d, r, seed, s.scale);
                (pq, pk, None)
            }
        };
        let window = c.values.get(6).map_or(0, |&w| w as usize);
        let mut kept: Option<(ValueId, Vec<Dim>)> = None;
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
            kept = Some((keep, g.ty(keep).shape.dims().unwrap_or(&[]).to_vec()));
        }
        let (mut v, mut k) = (v, k);
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
            if window > 0 {
                k = b.op(
                    g,
                    OpKind::Gather,
                    axis1(),
                    vec![k, heads],
                    s.dims.clone(),
                    "k",
                );
                if let Some((mq, mk)) = stab {
                    let mut d1 = s.dims.clone();
                    d1[2] = Dim::Fixed(1);
                    d1[3] = Dim::Fixed(1);
                    let mk = b.op(g, OpKind::Gather, axis1(), vec![mk, heads], d1, "mk");
                    stab = Some((mq, mk));
                }
            }
        }
        if window > 0 && (s.causal || mask_causal) {
            let hy = Hybrid {
                window,
                scale: s.scale,
                m,
                chunk,
                stab,
                keep: kept,
            };
            let y = hy.build(&mut b, g, (q, k, v), (pq, pk), &s.dims, &vd);
            let out = g.nodes[at].outputs[0];
            g.nodes[at] = Node {
                op: if s.seq_major {
                    OpKind::Transpose
                } else {
                    OpKind::Identity
                },
                attrs: if s.seq_major {
                    perm(&swap)
                } else {
                    Attrs::new()
                },
                inputs: vec![Some(y)],
                outputs: vec![out],
                name: b.tag.clone(),
            };
            let inserts = b.nodes.into_iter().map(|n| (at, n)).collect();
            crate::rewrite::insert_nodes(g, inserts);
            return;
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

/// The hybrid form (see the module docs): softmax over the `window` most recent keys exact,
/// the feature map's linear attention for the keys before them, combined by their
/// normalisers.
struct Hybrid {
    window: usize,
    scale: f64,
    /// Feature count (FAVOR+'s `1/m` is undone in the rescaling).
    m: usize,
    chunk: usize,
    /// FAVOR+'s stabilisers `(a: [B, H, S, 1], b: [B, H, 1, 1])`; `None` for the polynomial
    /// map (its weights are the Taylor values themselves).
    stab: Option<(ValueId, ValueId)>,
    /// The kept-key vector `[B|1, 1, S, 1]` of a masked site, and its dims.
    keep: Option<(ValueId, Vec<Dim>)>,
}

impl Hybrid {
    /// `y: [B, H, S, Dv]` from head-major `q, k: [B, H, S, D]`, `v: [B, H, S, Dv]` (key and
    /// value heads already gathered per query head) and the feature maps `pq, pk` (dropped
    /// keys already zeroed).
    ///
    /// With `J_i = (i − w, i]` and `F_i = [0, i − w]`, the exact part is
    /// `e_ij = exp(s·q_i·k_j − M_i)` (`M_i` the window's max score) over `J_i`, the linear
    /// part `l_ij = φ(q_i)·φ(k_j)` over `F_i`, which estimates `exp(s·q_i·k_j)` up to the
    /// factor `m·exp(−a_i − b)` (FAVOR+; 1 for the polynomial map). On the exact part's scale
    /// `r_i = exp(a_i + b − ln m − M_i)` (`exp(−M_i)` polynomial) and
    /// `y_i = (Σ_J e_ij v_j + r_i Σ_F l_ij v_j) / (Σ_J e_ij + r_i Σ_F l_ij + ε)`.
    /// The window gathers `k, v` at `i − w + 1 + t` (`t < w`, positions below 0 masked):
    /// O(S·w·D). The far part is causal linear attention over keys and values shifted down
    /// by `w` rows (zeros first), with a column of ones appended to `v` for the normaliser.
    fn build(
        &self,
        b: &mut Builder,
        g: &mut Graph,
        (q, k, v): (ValueId, ValueId, ValueId),
        (pq, pk): (ValueId, ValueId),
        qd: &[Dim],
        vd: &[Dim],
    ) -> ValueId {
        let w = self.window;
        let i64s = |v: Vec<i64>| Tensor::from_vec(vec![v.len()], v);
        let (bd, hd, sd, dd, dvd) = (
            qd[0].clone(),
            qd[1].clone(),
            qd[2].clone(),
            qd[3].clone(),
            vd[3].clone(),
        );
        let wd = Dim::Fixed(w as u64);
        let one = Dim::Fixed(1);
        // Positions: idx[i, t] = i − w + 1 + t, valid where ≥ 0, clamped to 0.
        let shape = b.op_ty(
            g,
            OpKind::Shape,
            Attrs::new(),
            vec![q],
            DType::I64,
            vec![Dim::Fixed(4)],
            "hy_shape",
        );
        let two = b.constant(g, "hy_two", Tensor::scalar(2i64));
        let n = b.op_ty(
            g,
            OpKind::Gather,
            Attrs::new().with("axis", Attr::Int(0)),
            vec![shape, two],
            DType::I64,
            vec![],
            "hy_n",
        );
        let zero = b.constant(g, "hy_zero", Tensor::scalar(0i64));
        let step = b.constant(g, "hy_step", Tensor::scalar(1i64));
        let r = b.op_ty(
            g,
            OpKind::Range,
            Attrs::new(),
            vec![zero, n, step],
            DType::I64,
            vec![sd.clone()],
            "hy_pos",
        );
        let ax1 = b.constant(g, "hy_ax1", i64s(vec![1]));
        let col = b.op_ty(
            g,
            OpKind::Unsqueeze,
            Attrs::new(),
            vec![r, ax1],
            DType::I64,
            vec![sd.clone(), one.clone()],
            "hy_col",
        );
        let offs: Vec<i64> = (0..w as i64).map(|t| t + 1 - w as i64).collect();
        let offs = b.constant(g, "hy_offsets", Tensor::from_vec(vec![1, w], offs));
        let idx = b.op_ty(
            g,
            OpKind::Add,
            Attrs::new(),
            vec![col, offs],
            DType::I64,
            vec![sd.clone(), wd.clone()],
            "hy_idx",
        );
        let valid = b.op_ty(
            g,
            OpKind::GreaterOrEqual,
            Attrs::new(),
            vec![idx, zero],
            DType::Bool,
            vec![sd.clone(), wd.clone()],
            "hy_valid",
        );
        let idx = b.op_ty(
            g,
            OpKind::Max,
            Attrs::new(),
            vec![idx, zero],
            DType::I64,
            vec![sd.clone(), wd.clone()],
            "hy_idx0",
        );
        let gather2 = || Attrs::new().with("axis", Attr::Int(2));
        // Exact part: scores [B, H, S, w, 1] = k_g [B, H, S, w, D] · q [B, H, S, D, 1].
        let col5 = |last: Dim| vec![bd.clone(), hd.clone(), sd.clone(), wd.clone(), last];
        let kg = b.op(
            g,
            OpKind::Gather,
            gather2(),
            vec![k, idx],
            col5(dd.clone()),
            "hy_kg",
        );
        let ax4 = b.constant(g, "hy_ax4", i64s(vec![4]));
        let q5d = vec![bd.clone(), hd.clone(), sd.clone(), dd.clone(), one.clone()];
        let q5 = b.op(
            g,
            OpKind::Unsqueeze,
            Attrs::new(),
            vec![q, ax4],
            q5d,
            "hy_q5",
        );
        let row = col5(one.clone());
        let sc = b.op(
            g,
            OpKind::MatMul,
            Attrs::new(),
            vec![kg, q5],
            row.clone(),
            "hy_scores",
        );
        let sv = b.constant(g, "hy_scale", Tensor::scalar(self.scale as f32));
        let sc = b.op(
            g,
            OpKind::Mul,
            Attrs::new(),
            vec![sc, sv],
            row.clone(),
            "hy_scaled",
        );
        let ax2 = b.constant(g, "hy_ax2", i64s(vec![2]));
        let valid3 = b.op_ty(
            g,
            OpKind::Unsqueeze,
            Attrs::new(),
            vec![valid, ax2],
            DType::Bool,
            vec![sd.clone(), wd.clone(), one.clone()],
            "hy_valid3",
        );
        let ninf = b.constant(g, "hy_neg_inf", Tensor::scalar(f32::NEG_INFINITY));
        let sc = b.op(
            g,
            OpKind::Where,
            Attrs::new(),
            vec![valid3, sc, ninf],
            row.clone(),
            "hy_masked",
        );
        let ax3 = b.constant(g, "hy_ax3", i64s(vec![3]));
        let m5 = vec![bd.clone(), hd.clone(), sd.clone(), one.clone(), one.clone()];
        let mx = b.op(
            g,
            OpKind::ReduceMax,
            keep(),
            vec![sc, ax3],
            m5.clone(),
            "hy_max",
        );
        let sh = b.op(
            g,
            OpKind::Sub,
            Attrs::new(),
            vec![sc, mx],
            row.clone(),
            "hy_shifted",
        );
        let mut e = b.op(g, OpKind::Exp, Attrs::new(), vec![sh], row.clone(), "hy_e");
        if let Some((keep_v, kdims)) = &self.keep {
            // keep: [B|1, 1, S, 1] → gathered [B|1, 1, S, w, 1].
            let kb = kdims.first().cloned().unwrap_or(Dim::Unknown);
            let kgd = vec![kb, one.clone(), sd.clone(), wd.clone(), one.clone()];
            let kg = b.op(
                g,
                OpKind::Gather,
                gather2(),
                vec![*keep_v, idx],
                kgd,
                "hy_keep",
            );
            e = b.op(
                g,
                OpKind::Mul,
                Attrs::new(),
                vec![e, kg],
                row.clone(),
                "hy_e_kept",
            );
        }
        let ex_den = b.op(g, OpKind::ReduceSum, keep(), vec![e, ax3], m5, "hy_ex_den");
        let et = b.op(
            g,
            OpKind::Transpose,
            perm(&[0, 1, 2, 4, 3]),
            vec![e],
            vec![bd.clone(), hd.clone(), sd.clone(), one.clone(), wd.clone()],
            "hy_et",
        );
        let vg = b.op(
            g,
            OpKind::Gather,
            gather2(),
            vec![v, idx],
            col5(dvd.clone()),
            "hy_vg",
        );
        let n5 = vec![bd.clone(), hd.clone(), sd.clone(), one.clone(), dvd.clone()];
        let ex_num = b.op(
            g,
            OpKind::MatMul,
            Attrs::new(),
            vec![et, vg],
            n5,
            "hy_ex_num",
        );
        let y4 = vd.to_vec();
        let mut r4 = vd.to_vec();
        r4[3] = one.clone();
        let sq = |b: &mut Builder, g: &mut Graph, x: ValueId, dims: Vec<Dim>, base: &str| {
            b.op(g, OpKind::Squeeze, Attrs::new(), vec![x, ax3], dims, base)
        };
        let ex_num = sq(b, g, ex_num, y4.clone(), "hy_ex_num4");
        let ex_den = sq(b, g, ex_den, r4.clone(), "hy_ex_den4");
        let mx4 = sq(b, g, mx, r4.clone(), "hy_max4");
        // Far part: keys and values (with a ones column) shifted down by w rows.
        let pad = |b: &mut Builder,
                   g: &mut Graph,
                   x: ValueId,
                   pads: Vec<i64>,
                   val: f32,
                   dims: Vec<Dim>,
                   base: &str| {
            let p = b.constant(g, "hy_pads", i64s(pads));
            let c = b.constant(g, "hy_pad_value", Tensor::scalar(val));
            b.op(
                g,
                OpKind::Pad,
                Attrs::new().with("mode", Attr::Str("constant".into())),
                vec![x, p, c],
                dims,
                base,
            )
        };
        let plus = |d: &Dim, k: u64| match d {
            Dim::Fixed(n) => Dim::Fixed(n + k),
            _ => Dim::Unknown,
        };
        let vx_d = vec![bd.clone(), hd.clone(), sd.clone(), plus(&dvd, 1)];
        let vx = pad(
            b,
            g,
            v,
            vec![0, 0, 0, 0, 0, 0, 0, 1],
            1.0,
            vx_d.clone(),
            "hy_v1",
        );
        let w_i = w as i64;
        let shift = |b: &mut Builder, g: &mut Graph, x: ValueId, dims: Vec<Dim>, base: &str| {
            let mut pd = dims.clone();
            pd[2] = plus(&dims[2], w as u64);
            let padded = pad(
                b,
                g,
                x,
                vec![0, 0, w_i, 0, 0, 0, 0, 0],
                0.0,
                pd,
                &format!("{base}_pad"),
            );
            let st = b.constant(g, "hy_start", i64s(vec![0]));
            let en = b.constant(g, "hy_end", i64s(vec![-w_i]));
            let ax = b.constant(g, "hy_axis", i64s(vec![2]));
            b.op(
                g,
                OpKind::Slice,
                Attrs::new(),
                vec![padded, st, en, ax],
                dims,
                base,
            )
        };
        let pkd = g
            .ty(pk)
            .shape
            .dims()
            .map(<[Dim]>::to_vec)
            .unwrap_or_default();
        let pk_s = shift(b, g, pk, pkd, "hy_pk");
        let vx_s = shift(b, g, vx, vx_d.clone(), "hy_vx");
        let la = Attrs::new()
            .with("causal", Attr::Int(1))
            .with("normalize", Attr::Int(0))
            .with("epsilon", Attr::Float(0.0))
            .with("chunk", Attr::Int(self.chunk as i64));
        let lin = b.op(
            g,
            OpKind::LinearAttention,
            la,
            vec![pq, pk_s, vx_s],
            vx_d,
            "hy_lin",
        );
        let (st, en, ax) = (
            b.constant(g, "hy_num_start", i64s(vec![0])),
            b.constant(g, "hy_num_end", i64s(vec![-1])),
            b.constant(g, "hy_last_axis", i64s(vec![3])),
        );
        let lin_num = b.op(
            g,
            OpKind::Slice,
            Attrs::new(),
            vec![lin, st, en, ax],
            y4.clone(),
            "hy_lin_num",
        );
        let (st, en) = (
            b.constant(g, "hy_den_start", i64s(vec![-1])),
            b.constant(g, "hy_den_end", i64s(vec![i64::MAX])),
        );
        let lin_den = b.op(
            g,
            OpKind::Slice,
            Attrs::new(),
            vec![lin, st, en, ax],
            r4.clone(),
            "hy_lin_den",
        );
        // r = exp(a + b − ln m − M) (FAVOR+) or exp(−M) (polynomial).
        let log_r = match self.stab {
            Some((a, bb)) => {
                let ab = b.op(
                    g,
                    OpKind::Add,
                    Attrs::new(),
                    vec![a, bb],
                    r4.clone(),
                    "hy_ab",
                );
                let lm = b.constant(g, "hy_ln_m", Tensor::scalar((self.m as f64).ln() as f32));
                let ab = b.op(
                    g,
                    OpKind::Sub,
                    Attrs::new(),
                    vec![ab, lm],
                    r4.clone(),
                    "hy_ab_m",
                );
                b.op(
                    g,
                    OpKind::Sub,
                    Attrs::new(),
                    vec![ab, mx4],
                    r4.clone(),
                    "hy_log_r",
                )
            }
            None => b.op(
                g,
                OpKind::Neg,
                Attrs::new(),
                vec![mx4],
                r4.clone(),
                "hy_log_r",
            ),
        };
        let rr = b.op(
            g,
            OpKind::Exp,
            Attrs::new(),
            vec![log_r],
            r4.clone(),
            "hy_r",
        );
        let ln = b.op(
            g,
            OpKind::Mul,
            Attrs::new(),
            vec![lin_num, rr],
            y4.clone(),
            "hy_lin_num_r",
        );
        let ld = b.op(
            g,
            OpKind::Mul,
            Attrs::new(),
            vec![lin_den, rr],
            r4.clone(),
            "hy_lin_den_r",
        );
        let num = b.op(
            g,
            OpKind::Add,
            Attrs::new(),
            vec![ex_num, ln],
            y4.clone(),
            "hy_num",
        );
        let den = b.op(
            g,
            OpKind::Add,
            Attrs::new(),
            vec![ex_den, ld],
            r4.clone(),
            "hy_den",
        );
        let eps = b.constant(g, "hy_eps", Tensor::scalar(ROW_SUM_EPSILON));
        let den = b.op(
            g,
            OpKind::Add,
            Attrs::new(),
            vec![den, eps],
            r4,
            "hy_den_eps",
        );
        b.op(g, OpKind::Div, Attrs::new(), vec![num, den], y4, "hy_y")
    }
}

/// FAVOR+'s `(φ(q), φ(k))` with the `[D, m]` matrix `w` (see the module docs): queries
/// stabilised per row, keys per (batch, head); then the stabilisers subtracted, `[B, H,
/// S, 1]` and `[B, Hk, 1, 1]`.
fn favor_maps(
    b: &mut Builder,
    g: &mut Graph,
    w: Tensor,
    scale: f64,
    m: usize,
    (q, qd): (ValueId, &[Dim]),
    (k, kd): (ValueId, &[Dim]),
) -> (ValueId, ValueId, ValueId, ValueId) {
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
            (b.op(g, OpKind::Exp, Attrs::new(), vec![zs], fd, "phi"), mx)
        };
    let (pq, mq) = phi(b, g, q, qd, last, true);
    let (pk, mk) = phi(b, g, k, kd, per_head, false);
    (pq, pk, mq, mk)
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
    // The second factor is gathered from [x̃, x̃/√2]: the diagonal pairs (a = b > 0) read
    // the scaled half, so no [.., m] multiply by the weights is needed.
    let (mut ia, mut ib) = (vec![], vec![]);
    for a in 0..=r {
        for bb in a..=r {
            ia.push(a as i64);
            ib.push(if a == bb && a > 0 { bb + r + 1 } else { bb } as i64);
        }
    }
    let m = ia.len();
    let half = b.constant(
        g,
        "poly_rsqrt2",
        Tensor::scalar(std::f32::consts::FRAC_1_SQRT_2),
    );
    let xh = b.op(
        g,
        OpKind::Mul,
        Attrs::new(),
        vec![xt, half],
        with(r + 1),
        "poly_xh",
    );
    let both = b.op(
        g,
        OpKind::Concat,
        Attrs::new().with("axis", Attr::Int(3)),
        vec![xt, xh],
        with(2 * r + 2),
        "poly_both",
    );
    let ia = b.constant(g, "poly_a", Tensor::from_vec(vec![m], ia));
    let ib = b.constant(g, "poly_b", Tensor::from_vec(vec![m], ib));
    let axis = || Attrs::new().with("axis", Attr::Int(3));
    let xa = b.op(g, OpKind::Gather, axis(), vec![xt, ia], with(m), "poly_xa");
    let xb = b.op(
        g,
        OpKind::Gather,
        axis(),
        vec![both, ib],
        with(m),
        "poly_xb",
    );
    b.op(
        g,
        OpKind::Mul,
        Attrs::new(),
        vec![xa, xb],
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

    /// [`Builder::op`] with an output of another dtype.
    #[allow(clippy::too_many_arguments)]
    fn op_ty(
        &mut self,
        g: &mut Graph,
        op: OpKind,
        attrs: Attrs,
        inputs: Vec<ValueId>,
        dtype: DType,
        dims: Vec<Dim>,
        base: &str,
    ) -> ValueId {
        let out = self.op(g, op, attrs, inputs, dims, base);
        g.values[out.0 as usize].ty.dtype = dtype;
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
        hybrid_reference(x, causal, proj, 0)
    }

    /// [`poly_reference`] with the `window` most recent keys weighted by `exp(t)` instead
    /// (the hybrid form over the polynomial map; 0: no window).
    fn hybrid_reference(
        x: &[Tensor],
        causal: bool,
        proj: Option<&Tensor>,
        window: usize,
    ) -> Vec<f64> {
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
                    let w = if window > 0 && j <= i && j + window > i {
                        // In the window: exact (scores of the unprojected q, k).
                        let full: f64 = qi.iter().zip(&kj).map(|(a, b)| a * b).sum();
                        (full / (d as f64).sqrt()).exp()
                    } else {
                        1.0 + t + t * t / 2.0
                    };
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

    /// The hybrid rewrite of `g`'s one site: window `w`, the polynomial (`poly_r`) or
    /// FAVOR+ (`m` features) far part; `mask_causal` for masked sites.
    fn hybrid_rewritten(g: &Graph, w: usize, far: (f64, usize), mask_causal: bool) -> Graph {
        let (kind, n) = far;
        let m = if kind == KIND_POLY {
            poly_features(n)
        } else {
            n
        };
        let r = if kind == KIND_POLY { n } else { 0 };
        rewritten_with(
            g,
            vec![
                m as f64,
                0.0,
                16.0,
                f64::from(u8::from(mask_causal)),
                kind,
                r as f64,
                w as f64,
            ],
        )
    }

    #[test]
    fn the_hybrid_window_combines_exact_and_polynomial_weights_at_odd_lengths() {
        let d = 8;
        for n in [1, 7, 65] {
            let g = attention_graph(2, n, d, true, false);
            let x = inputs(50 + n as u64, &[1, 2, n, d], 3.0);
            for w in [1, 4, 16] {
                let approx = hybrid_rewritten(&g, w, (KIND_POLY, d), false);
                assert!(!approx.nodes.iter().any(|n| n.op == OpKind::Attention));
                let got = kiln_ir::run(&approx, x.clone()).unwrap()[0].to_f64s();
                let want = hybrid_reference(&x, true, None, w);
                let scale = want.iter().fold(1e-6f64, |m, x| m.max(x.abs()));
                for (e, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (a - b).abs() <= POLY_TOLERANCE * scale,
                        "n {n} w {w}: element {e}: {a} vs {b}"
                    );
                }
            }
        }
        // A window as long as the sequence is softmax attention itself.
        let g = attention_graph(2, 7, d, true, false);
        let x = inputs(3, &[1, 2, 7, d], 3.0);
        let want = kiln_ir::run(&g, x.clone()).unwrap();
        let got = kiln_ir::run(&hybrid_rewritten(&g, 7, (KIND_POLY, d), false), x).unwrap();
        assert!(rel_l2(&got[0], &want[0]) < 1e-5);
    }

    #[test]
    fn the_hybrid_window_rescales_favor_features_to_the_exact_part() {
        // Many features: the far part estimates exp(s·q·k) on the exact part's scale, so
        // the whole approaches softmax attention; a wrong rescaling (a factor e^x between
        // the parts) would not. Also a grouped-query site and a seq-major one.
        let (h, n, d) = (2, 48, 8);
        for bshd in [false, true] {
            let g = attention_graph(h, n, d, true, bshd);
            let dims = if bshd { [1, n, h, d] } else { [1, h, n, d] };
            let x = inputs(12, &dims, 1.0);
            let want = kiln_ir::run(&g, x.clone()).unwrap();
            let run = |w: usize| {
                let got = kiln_ir::run(
                    &hybrid_rewritten(&g, w, (KIND_FAVOR, 4096), false),
                    x.clone(),
                )
                .unwrap();
                rel_l2(&got[0], &want[0])
            };
            let e = run(8);
            assert!(e < MANY_FEATURES_TOLERANCE, "bshd {bshd}: rel-l2 {e}");
            // Better than the features alone, and exact when the window covers everything.
            let favor = kiln_ir::run(&rewritten(&g, 4096, 0), x.clone()).unwrap();
            assert!(e < rel_l2(&favor[0], &want[0]), "bshd {bshd}");
            assert!(run(n) < 1e-5, "bshd {bshd}");
        }
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
        let mut x = inputs(13, &[1, 2, 32, 8], 1.0);
        x[0] = Tensor::from_vec(
            vec![1, 4, 32, 8],
            [
                x[0].as_slice::<f32>().unwrap(),
                x[1].as_slice::<f32>().unwrap(),
            ]
            .concat(),
        );
        let want = kiln_ir::run(&g, x.clone()).unwrap();
        let got = kiln_ir::run(&hybrid_rewritten(&g, 8, (KIND_FAVOR, 4096), false), x).unwrap();
        let e = rel_l2(&got[0], &want[0]);
        assert!(e < MANY_FEATURES_TOLERANCE, "gqa: rel-l2 {e}");
    }

    #[test]
    fn the_hybrid_window_keeps_a_padding_mask() {
        let (h, s, d) = (2, 40, 8);
        let g = masked_graph(h, s, d);
        let mut x = inputs(4, &[1, h, s, d], 1.0);
        x.push(mask(s, true, 5, false));
        let want = kiln_ir::run(&g, x.clone()).unwrap();
        // A window covering the sequence: exact up to rounding.
        let exact =
            kiln_ir::run(&hybrid_rewritten(&g, s, (KIND_POLY, d), true), x.clone()).unwrap();
        assert!(rel_l2(&exact[0], &want[0]) < 1e-5);
        let got = kiln_ir::run(&hybrid_rewritten(&g, 8, (KIND_FAVOR, 4096), true), x).unwrap();
        let e = rel_l2(&got[0], &want[0]);
        assert!(e < MANY_FEATURES_TOLERANCE, "rel-l2 {e}");
    }

    #[test]
    fn the_budget_takes_or_refuses_the_hybrid_window() {
        // Long enough that the cost model expects a 16-key window plus features to win.
        let (h, s, d) = (2, 4096, 8);
        let g = attention_graph(h, s, d, true, false);
        let sets: Vec<Vec<Tensor>> = (0..3).map(|i| inputs(60 + i, &[1, h, s, d], 1.0)).collect();
        let calib = Calibration::split(sets, "test", true);
        let req = |e: f64| Request {
            rewrites: super::super::parse_families("linear-attention=hybrid:16").unwrap(),
            max_error: e,
            metric: Metric::RelL2,
        };
        let r = approximate(&g, &req(1e-6), &calib, &Interpreter, Target::host());
        assert!(matches!(r, Err(ApproxError::Refused { .. })), "{r:?}");
        let (_, report) = approximate(&g, &req(0.5), &calib, &Interpreter, Target::host()).unwrap();
        assert_eq!(report.accepted.len(), 1, "{report}");
        assert!(report.held_out_error.unwrap() <= 0.5, "{report}");
        let params = &report.accepted[0].candidate.params;
        assert!(params.starts_with("hybrid w=16 "), "{params}");
        // Not offered where attention is not causal.
        let g = attention_graph(h, 64, d, false, false);
        let fam = LinearAttentionApprox::parse(Some("hybrid")).unwrap();
        let site = fam.sites(&g)[0].clone();
        let probe = crate::approx::Probe {
            values: &[],
            cost: &crate::cost::CostModel::new(Target::host()),
        };
        assert!(fam.candidates(&g, &site, &probe).is_empty());
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
        assert_eq!(
            LinearAttentionApprox::parse(Some("hybrid:32"))
                .unwrap()
                .kernels,
            Kernels::Hybrid(Some(32))
        );
        for p in [
            "poly:0",
            "poly:",
            "poly:x",
            "poly:1000",
            "polynomial",
            "hybrid:0",
            "hybrid:",
        ] {
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
