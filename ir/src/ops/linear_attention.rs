//! The linear-attention family: `linear_attention(q, k, v, log_decay?)`, the op that
//! `linearise_attention` (kiln-passes) recognises in linear attention and retention written
//! in their quadratic parallel form. Its shape rule and reference semantics live here; the
//! CPU runtime computes it in the recurrent, chunked form (`native/linear_attention.rs`).
//!
//! With `q, k: [B, H, S, D]`, `v: [B, H, S, Dv]` (already feature-mapped: the `elu + 1` of
//! linear attention stays an ordinary op before this one) and weights
//!
//! - `w(i, j) = 1` (`causal = 0`),
//! - `w(i, j) = [j ≤ i]` (`causal = 1`),
//! - `w(i, j) = [j ≤ i] · exp((i − j) · log_decay[h])` (`causal = 1` with `log_decay: [H]`,
//!   retention's `γ^(i−j)`, `log_decay = log γ ≤ 0`),
//!
//! the op computes `a(i, j) = (q_i · k_j) · w(i, j)` and `y_i = Σ_j a(i, j) v_j`, divided by
//! `Σ_j a(i, j) + epsilon` when `normalize = 1`. That is the quadratic form
//! `((q kᵀ) ⊙ W) v` [`/ (rowsum((q kᵀ) ⊙ W) + eps)`], and the reference below evaluates it
//! literally, sum over every `j` including the masked ones: a masked weight is an exact
//! zero, so a non-finite score there gives `NaN` (`Inf · 0`), and a non-finite `v_j` gives
//! `NaN` in its columns, as in the exported graph. Decay powers are only ever taken for
//! `i − j ≥ 0` (never `exp` of a positive number, which overflows in the exported graph's
//! upper triangle before `where` drops it).
//!
//! `chunk` (≥ 0) is a schedule hint, not semantics: the block length of the chunked
//! recurrent form the CPU kernel runs (0: one block, the parallel form). The optimiser's
//! cost model picks it.
//!
//! `attention_key_keep(mask)` (attribute `causal`) serves the approximate linearisation of
//! masked softmax attention (`--approx linear-attention`): it checks that an attention mask
//! `[B|1, H|1, S, T]` (additive float: 0 kept, ≤ [`MASKED_AT_OR_BELOW`] dropped; or bool)
//! is a key-padding mask, causal when `causal = 1` (key `j` seen by query `i` iff
//! `keep[j]` and, causal, `j ≤ i + T − S`), and returns `keep` as `f32 [B|1, 1, T, 1]` (1 or
//! 0). Any other mask (a bias, a non-causal pattern, heads that differ) is a run-time error
//! naming the element: the approximate graph never silently assumes a mask it was not given.

use super::movement::unify;
use super::shared::{fact, from_f64s};
use super::{arg, not_in_family, opt_arg, Fact};
use crate::{Attrs, Dim, OpKind, Shape, Tensor};

/// The attributes of `linear_attention`, checked.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinearAttentionAttrs {
    /// Key `j` is seen by query `i` only when `j ≤ i`.
    pub causal: bool,
    /// Divide by the row sums of the weighted scores (plus `epsilon`).
    pub normalize: bool,
    /// Added to the row sums before dividing.
    pub epsilon: f64,
    /// Block length of the chunked form (0: one block).
    pub chunk: usize,
}

impl LinearAttentionAttrs {
    /// Reads and checks the attributes.
    pub fn of(attrs: &Attrs) -> Result<LinearAttentionAttrs, String> {
        let flag = |name: &str, default: i64| match attrs.int_or(name, default)? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(format!(
                "linear_attention `{name}` must be 0 or 1, got {other}"
            )),
        };
        let chunk = attrs.int_or("chunk", 0)?;
        let chunk = usize::try_from(chunk)
            .map_err(|_| format!("linear_attention `chunk` must be >= 0, got {chunk}"))?;
        let epsilon = f64::from(attrs.float_or("epsilon", 0.0)?);
        if !epsilon.is_finite() {
            return Err(format!(
                "linear_attention `epsilon` must be finite, got {epsilon}"
            ));
        }
        Ok(LinearAttentionAttrs {
            causal: flag("causal", 1)?,
            normalize: flag("normalize", 0)?,
            epsilon,
            chunk,
        })
    }
}

fn dims4<'a>(f: &'a Fact, what: &str) -> Result<Option<&'a [Dim]>, String> {
    match f.ty.shape.dims() {
        None => Ok(None),
        Some(d) if d.len() == 4 => Ok(Some(d)),
        Some(d) => Err(format!(
            "linear_attention {what} must be 4-D [B, H, S, D], got rank {}",
            d.len()
        )),
    }
}

/// Shape rule: `[B, H, S, D] × [B, H, S, D] × [B, H, S, Dv] (× [H]) → [B, H, S, Dv]`.
pub fn infer(op: OpKind, attrs: &Attrs, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>, String> {
    if op == OpKind::AttentionKeyKeep {
        return key_keep_shape(attrs, arg(inputs, 0)?);
    }
    if op != OpKind::LinearAttention {
        return Err(not_in_family(op));
    }
    let a = LinearAttentionAttrs::of(attrs)?;
    let (q, k, v) = (arg(inputs, 0)?, arg(inputs, 1)?, arg(inputs, 2)?);
    let dtype = q.ty.dtype;
    if !dtype.is_float() || k.ty.dtype != dtype || v.ty.dtype != dtype {
        return Err(format!(
            "linear_attention q, k, v must be one float dtype, got {}, {}, {}",
            q.ty.dtype, k.ty.dtype, v.ty.dtype
        ));
    }
    let unknown = [Dim::Unknown, Dim::Unknown, Dim::Unknown, Dim::Unknown];
    let qd = dims4(q, "q")?.unwrap_or(&unknown);
    let kd = dims4(k, "k")?.unwrap_or(&unknown);
    let vd = dims4(v, "v")?.unwrap_or(&unknown);
    let mut out = vec![];
    for axis in 0..3 {
        let d = unify(&qd[axis], &kd[axis])
            .and_then(|x| unify(&x, &vd[axis]))
            .map_err(|e| format!("linear_attention q, k, v disagree on axis {axis}: {e}"))?;
        out.push(d);
    }
    unify(&qd[3], &kd[3]).map_err(|e| format!("linear_attention q and k widths: {e}"))?;
    out.push(vd[3].clone());
    if let Some(ld) = opt_arg(inputs, 3) {
        if !a.causal {
            return Err("linear_attention: a decay needs `causal = 1`".into());
        }
        if ld.ty.dtype != dtype {
            return Err(format!(
                "linear_attention log_decay is {}, expected {dtype}",
                ld.ty.dtype
            ));
        }
        match ld.ty.shape.dims() {
            Some([h]) => {
                unify(h, &out[1]).map_err(|e| format!("linear_attention log_decay heads: {e}"))?;
            }
            Some(d) => {
                return Err(format!(
                    "linear_attention log_decay must be [H], got rank {}",
                    d.len()
                ))
            }
            None => {}
        }
    }
    Ok(vec![fact(dtype, Shape::new(out))])
}

/// Reference semantics: the quadratic form, in f64, rounded once (see the module docs).
pub fn eval(op: OpKind, attrs: &Attrs, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
    if op == OpKind::AttentionKeyKeep {
        return Ok(vec![key_keep(attrs, arg(inputs, 0)?)?]);
    }
    if op != OpKind::LinearAttention {
        return Err(not_in_family(op));
    }
    let a = LinearAttentionAttrs::of(attrs)?;
    let (q, k, v) = (arg(inputs, 0)?, arg(inputs, 1)?, arg(inputs, 2)?);
    let dt = q.dtype();
    if !dt.is_float() || k.dtype() != dt || v.dtype() != dt {
        return Err(format!(
            "linear_attention q, k, v must be one float dtype, got {}, {}, {}",
            dt,
            k.dtype(),
            v.dtype()
        ));
    }
    let shape4 = |t: &Tensor, what: &str| -> Result<[usize; 4], String> {
        <[usize; 4]>::try_from(t.shape()).map_err(|_| {
            format!(
                "linear_attention {what} must be 4-D [B, H, S, D], got {:?}",
                t.shape()
            )
        })
    };
    let ([b, h, s, d], ks, [vb, vh, vs, dv]) = (shape4(q, "q")?, shape4(k, "k")?, shape4(v, "v")?);
    if ks != [b, h, s, d] || [vb, vh, vs] != [b, h, s] {
        return Err(format!(
            "linear_attention shapes disagree: q {:?}, k {:?}, v {:?}",
            q.shape(),
            k.shape(),
            v.shape()
        ));
    }
    let log_decay = match opt_arg(inputs, 3) {
        None => None,
        Some(_) if !a.causal => return Err("linear_attention: a decay needs `causal = 1`".into()),
        Some(t) if t.dtype() != dt || t.shape() != [h] => {
            return Err(format!(
                "linear_attention log_decay must be {dt}[{h}], got {}{:?}",
                t.dtype(),
                t.shape()
            ))
        }
        Some(t) => Some(t.to_f64s()),
    };
    let (qv, kv, vv) = (q.to_f64s(), k.to_f64s(), v.to_f64s());
    let mut y = vec![0.0f64; b * h * s * dv];
    let mut acc = vec![0.0f64; dv];
    for bh in 0..b * h {
        let head = bh % h;
        let (qh, kh) = (&qv[bh * s * d..][..s * d], &kv[bh * s * d..][..s * d]);
        let vhd = &vv[bh * s * dv..][..s * dv];
        for i in 0..s {
            acc.fill(0.0);
            let mut den = 0.0f64;
            let qi = &qh[i * d..][..d];
            for j in 0..s {
                let score: f64 = qi.iter().zip(&kh[j * d..][..d]).map(|(x, y)| x * y).sum();
                let w = if a.causal && j > i {
                    0.0
                } else {
                    match &log_decay {
                        // i − j ≥ 0 here: a power γ^m with m ≥ 0, never above 1 for γ ≤ 1.
                        Some(ld) => ((i - j) as f64 * ld[head]).exp(),
                        None => 1.0,
                    }
                };
                let aij = score * w;
                den += aij;
                for (o, x) in acc.iter_mut().zip(&vhd[j * dv..][..dv]) {
                    *o += aij * x;
                }
            }
            let out = &mut y[(bh * s + i) * dv..][..dv];
            for (o, x) in out.iter_mut().zip(&acc) {
                *o = if a.normalize {
                    x / (den + a.epsilon)
                } else {
                    *x
                };
            }
        }
    }
    Ok(vec![from_f64s(dt, vec![b, h, s, dv], y)?])
}

/// An additive mask value at or below this drops its key (`exp` of it is 0 in f32 and f64
/// against scores of any sane size); 0 keeps it; anything else is not a padding mask.
pub const MASKED_AT_OR_BELOW: f64 = -1e4;

fn key_keep_causal(attrs: &Attrs) -> Result<bool, String> {
    match attrs.int_or("causal", 0)? {
        0 => Ok(false),
        1 => Ok(true),
        c => Err(format!(
            "attention_key_keep `causal` must be 0 or 1, got {c}"
        )),
    }
}

/// Shape rule: `[B, H, S, T] → f32 [B, 1, T, 1]`.
fn key_keep_shape(attrs: &Attrs, m: &Fact) -> Result<Vec<Fact>, String> {
    key_keep_causal(attrs)?;
    if !(m.ty.dtype.is_float() || m.ty.dtype == crate::DType::Bool) {
        return Err(format!(
            "attention_key_keep takes a float or bool mask, got {}",
            m.ty.dtype
        ));
    }
    let shape = match m.ty.shape.dims() {
        None => Shape::unknown(),
        Some(d) if (2..=4).contains(&d.len()) => {
            // Right-aligned like `attention`'s broadcast: [S, T] and [H|B, S, T] are a
            // [1, 1, S, T] and [1, H|B, S, T] mask.
            let b = if d.len() == 4 { d[0].clone() } else { Dim::Fixed(1) };
            let t = d[d.len() - 1].clone();
            Shape::new(vec![b, Dim::Fixed(1), t, Dim::Fixed(1)])
        }
        Some(d) => {
            return Err(format!(
                "attention_key_keep takes a mask [B, H, S, T] (leading dims may be left out), got rank {}",
                d.len()
            ))
        }
    };
    Ok(vec![fact(crate::DType::F32, shape)])
}

/// Reference semantics (see the module docs): the per-key keep flags of a key-padding
/// (optionally causal) mask, or an error naming the first element that breaks the pattern.
fn key_keep(attrs: &Attrs, m: &Tensor) -> Result<Tensor, String> {
    let causal = key_keep_causal(attrs)?;
    let ms = m.shape();
    if !(2..=4).contains(&ms.len()) {
        return Err(format!(
            "attention_key_keep takes a mask [B, H, S, T] (leading dims may be left out), got {ms:?}"
        ));
    }
    let mut full = vec![1usize; 4 - ms.len()];
    full.extend_from_slice(ms);
    let [b, h, s, t] = <[usize; 4]>::try_from(full).map_err(|f| format!("mask shape {f:?}"))?;
    let kept: Vec<Option<bool>> = match m.data() {
        crate::TensorData::Bool(v) => v.iter().map(|&x| Some(x)).collect(),
        _ if m.dtype().is_float() => m
            .to_f64s()
            .into_iter()
            .map(|x| {
                if x == 0.0 {
                    Some(true)
                } else if x <= MASKED_AT_OR_BELOW {
                    Some(false)
                } else {
                    None
                }
            })
            .collect(),
        _ => {
            return Err(format!(
                "attention_key_keep takes a float or bool mask, got {}",
                m.dtype()
            ))
        }
    };
    let mut keep = vec![0f32; b * t];
    for bi in 0..b {
        // The keys the last query sees: with a causal pattern it sees every key.
        let row = |hi: usize, i: usize| &kept[((bi * h + hi) * s + i) * t..][..t];
        for j in 0..t {
            keep[bi * t + j] = if s == 0 {
                0.0
            } else {
                f32::from(u8::from(row(0, s - 1)[j] == Some(true)))
            };
        }
        for hi in 0..h {
            for i in 0..s {
                for (j, &k) in row(hi, i).iter().enumerate() {
                    let visible = !causal || j + s <= i + t;
                    let want = keep[bi * t + j] == 1.0 && visible;
                    if k != Some(want) {
                        return Err(format!(
                            "the attention mask is not a {}key-padding mask at [{bi}, {hi}, {i}, {j}] \
                             (value {}): the model was linearised approximately (--approx \
                             linear-attention) for such masks only; compile it exactly for this input",
                            if causal { "causal " } else { "" },
                            m.to_f64s()[((bi * h + hi) * s + i) * t + j]
                        ));
                    }
                }
            }
        }
    }
    Ok(Tensor::from_vec(vec![b, 1, t, 1], keep))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Attr, DType, Tensor};

    fn t(shape: &[usize], f: impl Fn(usize) -> f32) -> Tensor {
        let n = shape.iter().product();
        Tensor::from_vec(shape.to_vec(), (0..n).map(f).collect::<Vec<f32>>())
    }

    fn run(attrs: &Attrs, ins: &[&Tensor]) -> Result<Tensor, String> {
        let ins: Vec<Option<&Tensor>> = ins.iter().map(|t| Some(*t)).collect();
        eval(OpKind::LinearAttention, attrs, &ins).map(|mut v| v.remove(0))
    }

    /// The quadratic form written with explicit matrices, for one head.
    fn quadratic(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        s: usize,
        d: usize,
        w: impl Fn(usize, usize) -> f64,
        norm: bool,
    ) -> Vec<f64> {
        let mut y = vec![];
        for i in 0..s {
            let a: Vec<f64> = (0..s)
                .map(|j| {
                    let sc: f64 = (0..d)
                        .map(|x| f64::from(q[i * d + x]) * f64::from(k[j * d + x]))
                        .sum();
                    sc * w(i, j)
                })
                .collect();
            let den: f64 = a.iter().sum();
            for c in 0..d {
                let num: f64 = (0..s).map(|j| a[j] * f64::from(v[j * d + c])).sum();
                y.push(if norm { num / (den + 1e-6) } else { num });
            }
        }
        y
    }

    #[test]
    fn causal_normalised_and_decayed_forms_match_explicit_matrices() {
        let (s, d) = (5, 3);
        let q = t(&[1, 1, s, d], |i| ((i * 7 % 11) as f32) / 10.0 + 0.1);
        let k = t(&[1, 1, s, d], |i| ((i * 5 % 13) as f32) / 12.0 + 0.05);
        let v = t(&[1, 1, s, d], |i| ((i * 3 % 7) as f32) - 3.0);
        let (qs, ks, vs) = (
            q.as_slice::<f32>().unwrap(),
            k.as_slice::<f32>().unwrap(),
            v.as_slice::<f32>().unwrap(),
        );
        let lg = -0.3f64;
        let cases: Vec<(Attrs, Option<Tensor>, Vec<f64>)> = vec![
            (
                Attrs::new().with("causal", Attr::Int(0)),
                None,
                quadratic(qs, ks, vs, s, d, |_, _| 1.0, false),
            ),
            (
                Attrs::new()
                    .with("normalize", Attr::Int(1))
                    .with("epsilon", Attr::Float(1e-6)),
                None,
                quadratic(
                    qs,
                    ks,
                    vs,
                    s,
                    d,
                    |i, j| if j <= i { 1.0 } else { 0.0 },
                    true,
                ),
            ),
            (
                Attrs::new(),
                Some(Tensor::from_vec(vec![1], vec![lg as f32])),
                quadratic(
                    qs,
                    ks,
                    vs,
                    s,
                    d,
                    |i, j| {
                        if j <= i {
                            ((i - j) as f64 * f64::from(lg as f32)).exp()
                        } else {
                            0.0
                        }
                    },
                    false,
                ),
            ),
        ];
        for (attrs, ld, want) in cases {
            let mut ins = vec![&q, &k, &v];
            if let Some(ld) = &ld {
                ins.push(ld);
            }
            let got = run(&attrs, &ins).unwrap();
            assert_eq!(got.shape(), &[1, 1, s, d]);
            for (g, w) in got.to_f64s().iter().zip(&want) {
                assert!((g - w).abs() <= 1e-5 * w.abs().max(1.0), "{g} vs {w}");
            }
        }
    }

    #[test]
    fn masked_non_finite_scores_give_nan_as_the_quadratic_graph_does() {
        // k at position 2 is +inf: rows 0 and 1 never see it causally, but their masked
        // score inf · 0 is NaN, as in the exported `(q kᵀ) ⊙ tril` graph.
        let q = t(&[1, 1, 3, 2], |_| 1.0);
        let k = t(&[1, 1, 3, 2], |i| if i == 4 { f32::INFINITY } else { 1.0 });
        let v = t(&[1, 1, 3, 2], |_| 1.0);
        let y = run(&Attrs::new(), &[&q, &k, &v]).unwrap().to_f64s();
        assert!(y[..4].iter().all(|x| x.is_nan()), "{y:?}");
        assert!(y[4..].iter().all(|x| x.is_infinite()), "{y:?}");
    }

    #[test]
    fn shapes_and_bad_inputs() {
        let f = |d: &[i64]| {
            Fact::of(crate::TensorType::new(
                DType::F32,
                Shape::new(
                    d.iter()
                        .map(|&x| {
                            if x < 0 {
                                Dim::Sym("S".into())
                            } else {
                                Dim::Fixed(x as u64)
                            }
                        })
                        .collect(),
                ),
            ))
        };
        let (q, v) = (f(&[2, 4, -1, 8]), f(&[2, 4, -1, 6]));
        let out = infer(
            OpKind::LinearAttention,
            &Attrs::new(),
            &[Some(&q), Some(&q), Some(&v)],
        )
        .unwrap();
        assert_eq!(out[0].ty.shape, f(&[2, 4, -1, 6]).ty.shape);
        let bad_heads = f(&[3]);
        let err = infer(
            OpKind::LinearAttention,
            &Attrs::new(),
            &[Some(&q), Some(&q), Some(&v), Some(&bad_heads)],
        )
        .unwrap_err();
        assert!(err.contains("log_decay"), "{err}");
        let noncausal = Attrs::new().with("causal", Attr::Int(0));
        let ld = f(&[4]);
        assert!(infer(
            OpKind::LinearAttention,
            &noncausal,
            &[Some(&q), Some(&q), Some(&v), Some(&ld)]
        )
        .is_err());
        let x = t(&[1, 1, 3, 2], |_| 1.0);
        let y = t(&[1, 1, 4, 2], |_| 1.0);
        let err = run(&Attrs::new(), &[&x, &y, &x]).unwrap_err();
        assert!(err.contains("disagree"), "{err}");
        let err = run(&Attrs::new().with("chunk", Attr::Int(-1)), &[&x, &x, &x]).unwrap_err();
        assert!(err.contains("chunk"), "{err}");
    }
}
