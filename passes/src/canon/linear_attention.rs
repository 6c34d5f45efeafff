//! `linearise_attention`: linear attention and retention exported in their quadratic
//! parallel form become one `linear_attention` op, which the CPU runtime computes in the
//! recurrent, chunked form (O(n·d²) instead of O(n²·d)):
//!
//! - `(q kᵀ ⊙ M) v / (rowsum(q kᵀ ⊙ M) + eps)`, `M` the causal ones (`tril(ones(S, S))`,
//!   "Transformers are RNNs"), → `linear_attention(q, k, v, causal = 1, normalize = 1)`;
//! - the same without `M` → `causal = 0` (only with the normaliser: an unnormalised
//!   `(q kᵀ) v` is a plain matmul chain, left to the GEMMs);
//! - `(q kᵀ ⊙ D) v`, `D[h, i, j] = where(i ≥ j, exp((i − j) · log γ_h), 0)` (retention),
//!   → `linear_attention(q, k, v, log γ, causal = 1)`; also `γ_h ^ (i − j)` written with `pow`.
//!
//! Exact, so on by default: the guards prove what the rewrite assumes. The mask is a
//! `trilu(constant_of_shape([S, S], 1), 0)` with `upper = 0` on the scores' own `S × S`
//! (or a constant equal to the causal ones); `i` and `j` are `range(0, S, 1)` reshaped to
//! `[S, 1]` and `[1, S]`, compared the right way round; `log γ` is a constant, finite and
//! `≤ 0`, one per head or one for all; the masked weights are exact zeros. Anything else
//! (a shifted triangle, a random mask, a decay that is not geometric in `i − j`) is left
//! alone. What changes is only the order of the sums (floating-point reassociation).
//!
//! The chunk length is chosen here by [`choose_chunk`] from the head widths and the
//! target's cache sizes; sequences no longer than a chunk run as one block (the parallel
//! form), longer ones block by block with a `d × dv` state carried between blocks.

use super::{run_matches, same_dim, Fusion, Matcher, NewNode, Operand};
use crate::target::Target;
use crate::{Pass, PassError, PassStats};
use kiln_ir::{Attr, Attrs, DType, Dim, Graph, OpKind, Tensor, ValueId};

/// Recognises linear attention and retention in their quadratic form.
#[derive(Clone, Debug, Default)]
pub struct LineariseAttention {
    /// The machine the chunk length is chosen for.
    pub target: Target,
}

const NAME: &str = "linearise_attention";

impl Pass for LineariseAttention {
    fn name(&self) -> &'static str {
        NAME
    }

    fn run(&self, g: &mut Graph) -> Result<PassStats, PassError> {
        run_matches(g, NAME, |m, i| find(m, i, &self.target))
    }
}

/// What multiplies the scores: nothing, the causal ones, or the causal geometric decay
/// (its `log γ` per head, or one value for every head).
#[derive(Clone, Debug, PartialEq)]
enum Weights {
    None,
    Causal,
    Decay(Vec<f64>),
}

/// Integer or float constant values of `v`.
fn values(m: &Matcher, v: ValueId) -> Option<Vec<f64>> {
    let k = m.konst(v)?;
    if k.dtype().is_float() {
        Some(k.to_f64s())
    } else if k.dtype().is_int() {
        Some(k.to_i64s().into_iter().map(|x| x as f64).collect())
    } else {
        None
    }
}

/// `v` is a constant whose every element equals `want`.
fn all_equal(m: &Matcher, v: ValueId, want: f64) -> bool {
    values(m, v).is_some_and(|x| !x.is_empty() && x.iter().all(|&e| e == want))
}

/// `v` is `constant_of_shape(..)` filled with `want` (ONNX's default fill is 0), or a
/// constant of `want`s.
fn filled_with(m: &Matcher, v: ValueId, want: f64) -> bool {
    if let Some((_, n)) = m.def_op(v, OpKind::ConstantOfShape) {
        return match n.attrs.tensor("value") {
            Ok(Some(t)) => t.len() == 1 && t.to_f64s()[0] == want,
            Ok(None) => want == 0.0,
            Err(_) => false,
        };
    }
    all_equal(m, v, want)
}

/// The last two dims of `v`, if they are known to be `[s, s]`.
fn is_square(m: &Matcher, v: ValueId, s: &Dim) -> bool {
    m.dims(v).is_some_and(|d| {
        d.len() >= 2 && same_dim(&d[d.len() - 2], s) && same_dim(&d[d.len() - 1], s)
    })
}

/// `v` is the causal ones `[j ≤ i]` on an `s × s` grid, with only leading 1s before it:
/// `trilu(ones, 0)` (`upper = 0`) or a constant with exactly those values.
fn is_causal_ones(m: &Matcher, v: ValueId, s: &Dim) -> bool {
    if !is_square(m, v, s) || !leading_ones(m, v, 2) {
        return false;
    }
    if let Some((_, tr)) = m.def_op(v, OpKind::Trilu) {
        let lower = tr.attrs.int_or("upper", 1).ok() == Some(0);
        let k0 = match Matcher::input(tr, 1) {
            None => true,
            Some(k) => m.ints(k).is_some_and(|k| k == [0]),
        };
        return lower && k0 && Matcher::input(tr, 0).is_some_and(|x| filled_with(m, x, 1.0));
    }
    let (Some(vals), Some(n)) = (values(m, v), s.fixed()) else {
        return false;
    };
    let n = n as usize;
    vals.len() == n * n
        && vals
            .iter()
            .enumerate()
            .all(|(e, &x)| x == if e % n <= e / n { 1.0 } else { 0.0 })
}

/// Every dim of `v` before its last `keep` is a known 1.
fn leading_ones(m: &Matcher, v: ValueId, keep: usize) -> bool {
    m.dims(v).is_some_and(|d| {
        d.len() >= keep && d[..d.len() - keep].iter().all(|x| x.fixed() == Some(1))
    })
}

/// `v` is the positions `0, 1, …, s−1` laid along `axis` of a rank-2 `[s, 1]` (axis 0) or
/// `[1, s]` (axis 1): a `range(0, s, 1)` (or a constant `0..s`), reshaped or unsqueezed.
fn is_positions(m: &Matcher, v: ValueId, s: &Dim, axis: usize) -> bool {
    let Some(d) = m.dims(v) else { return false };
    if d.len() != 2 || !same_dim(&d[axis], s) || d[1 - axis].fixed() != Some(1) {
        return false;
    }
    let Some((_, n)) = m.def(v) else { return false };
    if !matches!(n.op, OpKind::Reshape | OpKind::Unsqueeze) || n.outputs.len() != 1 {
        return false;
    }
    let Some(r) = Matcher::input(n, 0) else {
        return false;
    };
    // Reshaping a 1-D vector to [s, 1] or [1, s] keeps its order.
    if !m
        .dims(r)
        .is_some_and(|rd| rd.len() == 1 && same_dim(&rd[0], s))
    {
        return false;
    }
    if let Some((_, rg)) = m.def_op(r, OpKind::Range) {
        let scalar = |k: usize, want: f64| {
            Matcher::input(rg, k)
                .and_then(|x| values(m, x))
                .is_some_and(|x| x == [want])
        };
        return scalar(0, 0.0) && scalar(2, 1.0);
    }
    values(m, r).is_some_and(|x| x.iter().enumerate().all(|(i, &e)| e == i as f64))
}

/// `c` is `i ≥ j` over positions (`greater_equal(i, j)` or `less_equal(j, i)`).
fn is_causal_condition(m: &Matcher, c: ValueId, s: &Dim) -> bool {
    let Some((_, n)) = m.def(c) else { return false };
    let (a, b) = match (Matcher::input(n, 0), Matcher::input(n, 1)) {
        (Some(a), Some(b)) => (a, b),
        _ => return false,
    };
    let (i, j) = match n.op {
        OpKind::GreaterOrEqual => (a, b),
        OpKind::LessOrEqual => (b, a),
        _ => return false,
    };
    is_positions(m, i, s, 0) && is_positions(m, j, s, 1)
}

/// `x` is `i − j` over positions, possibly cast to a float type.
fn is_offset(m: &Matcher, x: ValueId, s: &Dim) -> bool {
    let x = match m.def_op(x, OpKind::Cast) {
        Some((_, c)) => match Matcher::input(c, 0) {
            Some(x) => x,
            None => return false,
        },
        None => x,
    };
    let Some((_, sub)) = m.def_op(x, OpKind::Sub) else {
        return false;
    };
    match (Matcher::input(sub, 0), Matcher::input(sub, 1)) {
        (Some(i), Some(j)) => is_positions(m, i, s, 0) && is_positions(m, j, s, 1),
        _ => false,
    }
}

/// The values of a float constant `l` that broadcasts against `[H, S, S]` as one value
/// per head (dims `[.., H, 1, 1]`, leading 1s) or one value for all (every dim 1).
fn per_head(m: &Matcher, l: ValueId, heads: &Dim) -> Option<Vec<f64>> {
    let vals = values(m, l)?;
    let d = m.dims(l)?;
    if vals.is_empty() || !m.fact(l).ty.dtype.is_float() {
        return None;
    }
    if vals.len() == 1 {
        return Some(vals);
    }
    let r = d.len();
    let fits = r >= 3
        && d[r - 1].fixed() == Some(1)
        && d[r - 2].fixed() == Some(1)
        && d[..r - 3].iter().all(|x| x.fixed() == Some(1))
        && heads.fixed() == Some(vals.len() as u64);
    fits.then_some(vals)
}

/// `w` is `where(i ≥ j, γ^(i−j), 0)` with a constant `0 < γ ≤ 1` per head: returns
/// `log γ` (finite, `≤ 0`). `γ^(i−j)` is `exp((i − j) · log γ)` or `pow(γ, i − j)`.
fn decay(m: &Matcher, w: ValueId, s: &Dim, heads: &Dim) -> Option<Vec<f64>> {
    let (_, wh) = m.def_op(w, OpKind::Where)?;
    let (c, e, z) = (
        Matcher::input(wh, 0)?,
        Matcher::input(wh, 1)?,
        Matcher::input(wh, 2)?,
    );
    if !is_causal_condition(m, c, s) || !filled_with(m, z, 0.0) {
        return None;
    }
    let (_, en) = m.def(e)?;
    let log_gamma = match en.op {
        OpKind::Exp => {
            let (_, mul) = m.def_op(Matcher::input(en, 0)?, OpKind::Mul)?;
            Matcher::operands(mul)?
                .into_iter()
                .find_map(|(x, l)| is_offset(m, x, s).then(|| per_head(m, l, heads))?)?
        }
        OpKind::Pow => {
            let (gm, x) = (Matcher::input(en, 0)?, Matcher::input(en, 1)?);
            if !is_offset(m, x, s) {
                return None;
            }
            let g = per_head(m, gm, heads)?;
            if g.iter().any(|&g| !(g > 0.0 && g <= 1.0)) {
                return None;
            }
            g.into_iter().map(f64::ln).collect()
        }
        _ => return None,
    };
    log_gamma
        .iter()
        .all(|x| x.is_finite() && *x <= 0.0)
        .then_some(log_gamma)
}

/// `a` = the scores `q kᵀ`, times causal weights or not: the scores' matmul, the
/// weights, and the nodes.
fn weighted_scores(m: &Matcher, a: ValueId) -> Option<(usize, Weights, Vec<usize>)> {
    let (ka, n) = m.def(a)?;
    match n.op {
        OpKind::MatMul => Some((ka, Weights::None, vec![ka])),
        OpKind::Mul => Matcher::operands(n)?.into_iter().find_map(|(sc, w)| {
            let (km, _) = m.def_op(sc, OpKind::MatMul)?;
            m.sole_user(sc)?;
            let sd = m.dims(sc).filter(|d| d.len() == 4)?;
            let ad = m.dims(a)?;
            // The weights must not widen the scores.
            if ad.len() != 4 || !(0..4).all(|x| same_dim(&ad[x], &sd[x])) {
                return None;
            }
            let s = &sd[2];
            if is_causal_ones(m, w, s) {
                return Some((km, Weights::Causal, vec![km, ka]));
            }
            decay(m, w, s, &sd[1]).map(|ld| (km, Weights::Decay(ld), vec![km, ka]))
        }),
        _ => None,
    }
}

/// `den = rowsum(a) [+ eps]`: the epsilon and the nodes.
fn row_sum_plus_eps(m: &Matcher, den: ValueId, a: ValueId) -> Option<(f64, Vec<usize>)> {
    let row_sum = |r: ValueId| -> Option<usize> {
        let (kr, rs) = m.def_op(r, OpKind::ReduceSum)?;
        let ok = Matcher::input(rs, 0)? == a
            && rs.attrs.int_or("keepdims", 1).ok()? == 1
            && m.is_last_axis(Matcher::input(rs, 1), 4);
        ok.then_some(kr)
    };
    if let Some(kr) = row_sum(den) {
        return Some((0.0, vec![kr]));
    }
    let (kadd, add) = m.def_op(den, OpKind::Add)?;
    Matcher::operands(add)?.into_iter().find_map(|(r, e)| {
        let eps = m.scalar(e)?;
        let kr = row_sum(r)?;
        m.sole_user(r)?;
        eps.is_finite().then_some((eps, vec![kr, kadd]))
    })
}

fn find(m: &Matcher, i: usize, target: &Target) -> Option<Fusion> {
    let root_node = &m.g.nodes[i];
    if root_node.outputs.len() != 1 {
        return None;
    }
    // y = (a v) / den, or y = a v.
    let (num, norm) = match root_node.op {
        OpKind::Div => (Matcher::input(root_node, 0)?, Matcher::input(root_node, 1)),
        OpKind::MatMul => (root_node.outputs[0], None),
        _ => return None,
    };
    let (kav, av) = m.def_op(num, OpKind::MatMul)?;
    let (a, v) = (Matcher::input(av, 0)?, Matcher::input(av, 1)?);
    let (kqk, weights, mut interior) = weighted_scores(m, a)?;
    interior.push(kav);
    let mut epsilon = 0.0;
    if let Some(den) = norm {
        m.sole_user(num)?;
        let (eps, more) = row_sum_plus_eps(m, den, a)?;
        epsilon = eps;
        interior.extend(more);
        interior.push(i);
    } else if weights == Weights::None {
        return None;
    }
    let qk = &m.g.nodes[kqk];
    let (q, kt) = (Matcher::input(qk, 0)?, Matcher::input(qk, 1)?);
    // Shapes: q [B, H, S, D], kᵀ [B, H, D, S], v [B, H, S, Dv], all of one float dtype,
    // every batch and head dim known equal (no broadcasting inside the matmuls).
    let (qd, ktd, vd) = (m.dims(q)?, m.dims(kt)?, m.dims(v)?);
    if qd.len() != 4 || ktd.len() != 4 || vd.len() != 4 {
        return None;
    }
    let eq = |x: &Dim, y: &Dim| same_dim(x, y);
    let shapes_ok = (0..2).all(|x| eq(&qd[x], &ktd[x]) && eq(&qd[x], &vd[x]))
        && eq(&qd[3], &ktd[2])
        && eq(&qd[2], &ktd[3])
        && eq(&qd[2], &vd[2]);
    let dtype = m.fact(q).ty.dtype;
    if !shapes_ok || dtype != DType::F32 && !dtype.is_float() {
        return None;
    }
    if [kt, v].iter().any(|&x| m.fact(x).ty.dtype != dtype) {
        return None;
    }
    let mut nodes = vec![];
    let k = match m.def_op(kt, OpKind::Transpose) {
        Some((kk, tr))
            if tr.attrs.ints("perm").ok()?.as_deref() == Some(&[0, 1, 3, 2][..])
                && m.sole_user(kt).is_some() =>
        {
            interior.push(kk);
            Operand::Value(Matcher::input(tr, 0)?)
        }
        _ => {
            nodes.push(NewNode {
                op: OpKind::Transpose,
                attrs: Attrs::new().with("perm", Attr::Ints(vec![0, 1, 3, 2])),
                inputs: vec![Some(Operand::Value(kt))],
                name: "k".into(),
            });
            Operand::New(0)
        }
    };
    if !m.closed(i, &interior) {
        return None;
    }
    let (d, dv) = (qd[3].fixed(), vd[3].fixed());
    let causal = weights != Weights::None;
    let chunk = choose_chunk(
        target,
        d.unwrap_or(64) as usize,
        dv.unwrap_or(64) as usize,
        causal,
    );
    let mut inputs = vec![Some(Operand::Value(q)), Some(k), Some(Operand::Value(v))];
    if let Weights::Decay(ld) = &weights {
        let heads = match (ld.len(), qd[1].fixed()) {
            (n, Some(h)) if n == h as usize => ld.clone(),
            (1, Some(h)) => vec![ld[0]; h as usize],
            _ => return None,
        };
        let t = Tensor::from_vec(vec![heads.len()], heads.iter().map(|&x| x as f32).collect());
        let t = if dtype == DType::F32 {
            t
        } else {
            kiln_ir::ops::eval(
                OpKind::Cast,
                &Attrs::new().with("to", Attr::Str(dtype.to_string())),
                &[Some(&t)],
            )
            .ok()?
            .remove(0)
        };
        inputs.push(Some(Operand::Const(t)));
    }
    nodes.push(NewNode {
        op: OpKind::LinearAttention,
        attrs: Attrs::new()
            .with("causal", Attr::Int(causal as i64))
            .with("normalize", Attr::Int(norm.is_some() as i64))
            .with("epsilon", Attr::Float(epsilon as f32))
            .with("chunk", Attr::Int(chunk as i64)),
        inputs,
        name: "linear_attention".into(),
    });
    Some(Fusion {
        root: i,
        interior,
        nodes,
        counter: "linear_attention_fused",
    })
}

/// Chunk lengths the cost model chooses from.
pub const CHUNK_CANDIDATES: [usize; 6] = [16, 32, 64, 128, 256, 512];

/// The estimated seconds per query row of `linear_attention` in the chunked form with
/// chunk `c` on `target`, head widths `d`, `dv`, for a long sequence (`n ≫ c`). The
/// intra-chunk scores and their product with `v` cost `(c + 1)·(d + dv)` FLOPs per row
/// (half the `c × c` block, causal), the state read and update `4·d·dv`; a block whose
/// working set (`q`, `k`, `v` rows, scores, state) spills out of L1 runs at the L2
/// bandwidth instead of the arithmetic peak for its bytes; every chunk pays a fixed setup
/// (the decay table, the state pass) of [`Target::kernel_overhead`]` / 8`.
pub fn chunk_row_time(target: &Target, c: usize, d: usize, dv: usize) -> f64 {
    let (c, d, dv) = (c as f64, d as f64, dv as f64);
    let flops = (c + 1.0) * (d + dv) + 4.0 * d * dv;
    let working_set = 4.0 * (c * (2.0 * d + dv) + c * c + d * dv);
    // Bytes each row touches in the block: its share of the scores and of the state.
    let bytes_row = 4.0 * (c + 2.0 * d * dv / c);
    let (l1_bw, l2_bw) = cache_bandwidth(target);
    let bw = if working_set <= target.l1_bytes as f64 {
        l1_bw
    } else if working_set <= target.l2_bytes as f64 {
        l2_bw
    } else {
        target.mem_bandwidth
    };
    (flops / target.peak_flops).max(bytes_row / bw) + target.kernel_overhead / 8.0 / c
}

/// Bytes per second from L1 and from L2 over all cores, estimated from the peak: a core
/// loads two vectors from L1 per cycle, as many bytes as FLOPs at FMA peak (2 bytes per
/// FLOP with 4-byte lanes: `lanes × 4 × 2` bytes against `lanes × 2 × 2` FLOPs), and half of
/// that from L2. Estimates from the load ports, not measurements.
pub fn cache_bandwidth(target: &Target) -> (f64, f64) {
    (2.0 * target.peak_flops, target.peak_flops)
}

/// The chunk length with the least [`chunk_row_time`] (causal forms; a non-causal one
/// has no blocks: its state is summed over the whole sequence first, so `0`).
pub fn choose_chunk(target: &Target, d: usize, dv: usize, causal: bool) -> usize {
    if !causal {
        return 0;
    }
    CHUNK_CANDIDATES
        .into_iter()
        .min_by(|&a, &b| {
            chunk_row_time(target, a, d, dv).total_cmp(&chunk_row_time(target, b, d, dv))
        })
        .unwrap_or(64)
}

/// One way to compute a `linear_attention` node, with its estimated cost at sequence `n`.
#[derive(Clone, Debug, PartialEq)]
pub struct FormCost {
    /// `quadratic (exported)`, `parallel`, `chunked C=..`, `recurrent`.
    pub form: String,
    /// FLOPs (a multiply-add counts 2).
    pub flops: f64,
    /// Bytes read and written, intermediates included.
    pub bytes: f64,
    /// Estimated seconds on the target.
    pub time: f64,
}

/// The alternatives for `bh` heads (batch × heads) of sequence `n` and widths `d`, `dv`:
/// the exported quadratic graph (scores, mask, row sums materialised), the fused
/// parallel form (one block), the chunked form at `chunk`, and the token-by-token
/// recurrence. What `kiln inspect` prints beside the chosen form.
pub fn form_costs(
    target: &Target,
    bh: f64,
    n: f64,
    d: f64,
    dv: f64,
    causal: bool,
    chunk: usize,
) -> Vec<FormCost> {
    let io = 4.0 * bh * n * (2.0 * d + 2.0 * dv);
    let mut out = vec![];
    let quad_flops = bh * (2.0 * n * n * (d + dv) + 3.0 * n * n);
    // The scores are written, masked (read, written), summed and read by the product.
    let quad_bytes = io + bh * 4.0 * n * n * 5.0;
    out.push(FormCost {
        form: "quadratic (exported)".into(),
        flops: quad_flops,
        bytes: quad_bytes,
        time: 4.0 * target.kernel_overhead + target_time(target, quad_flops, quad_bytes),
    });
    let half = if causal { 0.5 } else { 1.0 };
    let par_flops = bh * half * 2.0 * n * n * (d + dv);
    out.push(FormCost {
        form: "parallel (one block)".into(),
        flops: par_flops,
        bytes: io,
        time: target.kernel_time(par_flops, io),
    });
    let chunked = |c: usize, form: String| {
        let c = c.max(1);
        let flops = bh * n * 2.0 * ((c as f64 + 1.0) * (d + dv) / 2.0 + 2.0 * d * dv);
        FormCost {
            form,
            flops,
            bytes: io,
            time: target.kernel_overhead
                + bh * n * chunk_row_time(target, c, d as usize, dv as usize),
        }
    };
    if causal {
        if chunk > 0 {
            out.push(chunked(chunk, format!("chunked C={chunk}")));
        }
        out.push(chunked(1, "recurrent (C=1)".into()));
    } else {
        let flops = bh * n * 2.0 * 2.0 * d * dv;
        out.push(FormCost {
            form: "state (k^T v first)".into(),
            flops,
            bytes: io,
            time: target.kernel_time(flops, io),
        });
    }
    out
}

fn target_time(target: &Target, flops: f64, bytes: f64) -> f64 {
    (flops / target.peak_flops).max(bytes / target.mem_bandwidth)
}

#[cfg(test)]
mod tests;
