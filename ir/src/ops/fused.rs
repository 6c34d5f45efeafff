//! The fused op family: kiln-only ops that canonicalisation recognises in exported graphs
//! (ONNX exporters decompose them into primitives) so that backends can implement them as
//! one fast kernel. Shape rules and reference semantics side by side.
//!
//! - `silu(x) = x · sigmoid(x)`.
//! - `rotary(x, cos, sin) = x · cos + rotate_half(x) · sin`, numpy broadcasting of cos/sin.
//! - `attention(q, k, v, mask?)`: scaled-dot-product attention with grouped-query heads;
//!   `layout = "bshd"` takes and gives sequence-major tensors (`[B, S, H, D]`) instead of
//!   head-major ones (`[B, H, S, D]`, the default `"bhsd"`).
//! - `linear(x, w, bias?, row_scale?, residual?) = act(row_scale ⊙ (x·w) + bias) + residual`.
//! - `onnx_attention` is ONNX `Attention` (opset 23/24) itself: 3-D or 4-D q/k/v, kv cache
//!   (past in, present out), causal and padding masks, softcap and the optional
//!   `qk_matmul_output`. It lives here beside `attention`, the kiln form it generalises.
//! - `rotary_embedding` is ONNX `RotaryEmbedding` (opset 23): `rotary` with cos/sin caches
//!   looked up by `position_ids`, a partial `rotary_embedding_dim`, and 3-D or 4-D input.
//!
//! Like the nn family, everything computes in f64 and rounds to the input's dtype once, so
//! f16/bf16 inputs get better-than-f32 intermediate precision. Decomposed graphs round at
//! every step; tests compare the two within named tolerances.

use super::movement::{checked_numel, unify};
use super::shared::{bcast_offsets, fact, from_f64s, Bc};
use super::{arg, not_in_family, opt_arg, Fact};
use crate::shape::{broadcast, broadcast_concrete};
use crate::{Attrs, DType, Dim, OpKind, Shape, Tensor, TensorData};

/// Shape rule of the fused ops.
pub fn infer(op: OpKind, attrs: &Attrs, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>, String> {
    if op == OpKind::OnnxAttention {
        return onnx_attention_shape(attrs, inputs);
    }
    let x = arg(inputs, 0)?;
    let dtype = x.ty.dtype;
    let shape = match op {
        OpKind::Silu => x.ty.shape.clone(),
        OpKind::RotaryEmbedding => x.ty.shape.clone(),
        OpKind::Rotary => {
            interleaved(attrs)?;
            let (cos, sin) = (arg(inputs, 1)?, arg(inputs, 2)?);
            if let Some(d) =
                x.ty.shape
                    .dims()
                    .and_then(|d| d.last())
                    .and_then(Dim::fixed)
            {
                if d % 2 != 0 {
                    return Err(format!("rotary needs an even last dim, got {d}"));
                }
            }
            broadcast(&broadcast(&x.ty.shape, &cos.ty.shape)?, &sin.ty.shape)?
        }
        OpKind::Attention => {
            attention_attrs(attrs)?;
            if attention_seq_major(attrs)? {
                // The head-major rule on swapped q, k, v (the mask indexes the scores
                // `[B, H, S, T]` in either layout), its result swapped back.
                let facts: Vec<Option<Fact>> = inputs
                    .iter()
                    .enumerate()
                    .map(|(i, f)| f.map(|f| if i < 3 { swap_facts(f) } else { f.clone() }))
                    .collect();
                let refs: Vec<Option<&Fact>> = facts.iter().map(Option::as_ref).collect();
                swap_middle(attention_shape(&refs)?)
            } else {
                attention_shape(inputs)?
            }
        }
        OpKind::Linear => {
            activation(attrs)?;
            linear_shape(inputs)?
        }
        OpKind::InvStd | OpKind::InvRms => row_stat_shape(x, arg(inputs, 1)?)?,
        OpKind::FusedConv => {
            let _ = conv_activation(attrs)?;
            let conv = super::linalg::infer(
                OpKind::Conv,
                &conv_attrs(attrs),
                &inputs[..3.min(inputs.len())],
            )?;
            let out = conv
                .into_iter()
                .next()
                .ok_or("conv has one output")?
                .ty
                .shape;
            if let Some(r) = opt_arg(inputs, 3) {
                broadcast(&r.ty.shape, &out)?;
            }
            out
        }
        _ => return Err(not_in_family(op)),
    };
    Ok(vec![fact(dtype, shape)])
}

/// Reference semantics of the fused ops.
pub fn eval(op: OpKind, attrs: &Attrs, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
    if op == OpKind::OnnxAttention {
        return onnx_attention(attrs, inputs);
    }
    let x = arg(inputs, 0)?;
    let dt = x.dtype();
    if !dt.is_float() {
        return Err(format!("`{}` needs a float input, got {dt}", op.name()));
    }
    let out = match op {
        OpKind::Silu => {
            let v: Vec<f64> = x.to_f64s().into_iter().map(silu).collect();
            from_f64s(dt, x.shape().to_vec(), v)?
        }
        OpKind::Rotary => rotary(attrs, inputs)?,
        OpKind::RotaryEmbedding => rotary_embedding(attrs, inputs)?,
        OpKind::Attention => attention(attrs, inputs)?,
        OpKind::Linear => linear(attrs, inputs)?,
        OpKind::InvStd => row_stat(x, arg(inputs, 1)?, true)?,
        OpKind::InvRms => row_stat(x, arg(inputs, 1)?, false)?,
        OpKind::FusedConv => fused_conv(attrs, inputs)?,
        _ => return Err(not_in_family(op)),
    };
    Ok(vec![out])
}

/// A `fused_conv`'s attributes without `activation`: those of its conv.
fn conv_attrs(attrs: &Attrs) -> Attrs {
    let mut a = attrs.clone();
    a.0.remove("activation");
    a
}

/// A `fused_conv`'s activation: one of `linear`'s, or `sigmoid`, `hardswish` (ONNX
/// HardSwish) or `clip` (ONNX Clip between the optional `clip_min` and `clip_max`
/// attributes: NaN passes through, as does a NaN bound).
#[allow(clippy::type_complexity)]
fn conv_activation(attrs: &Attrs) -> Result<Box<dyn Fn(f64) -> f64>, String> {
    Ok(
        match attrs.string_or("activation", "none".into())?.as_str() {
            "sigmoid" => Box::new(|x: f64| 1.0 / (1.0 + (-x).exp())),
            "hardswish" => Box::new(|x: f64| x * (x / 6.0 + 0.5).clamp(0.0, 1.0)),
            "clip" => {
                let lo = attrs.float("clip_min")?.map(|v| v as f64);
                let hi = attrs.float("clip_max")?.map(|v| v as f64);
                Box::new(move |x: f64| {
                    let a = match lo {
                        Some(l) if x < l => l,
                        _ => x,
                    };
                    match hi {
                        Some(h) if a > h => h,
                        _ => a,
                    }
                })
            }
            _ => Box::new(activation(attrs)?),
        },
    )
}

/// `fused_conv(x, w, bias?, residual?)` = `act(conv(x, w, bias)) + residual` (the conv's
/// attributes, `activation` as `linear`'s); the residual broadcasts to the conv's output
/// and does not enlarge it.
fn fused_conv(attrs: &Attrs, inputs: &[Option<&Tensor>]) -> Result<Tensor, String> {
    let act = conv_activation(attrs)?;
    let conv = super::linalg::eval(
        OpKind::Conv,
        &conv_attrs(attrs),
        &inputs[..3.min(inputs.len())],
    )?;
    let y = conv.into_iter().next().ok_or("conv has one output")?;
    let dt = y.dtype();
    let shape = y.shape().to_vec();
    let mut v: Vec<f64> = y.to_f64s().into_iter().map(&act).collect();
    if let Some(r) = opt_arg(inputs, 3) {
        fits(r, &shape, "residual")?;
        let rv = float_input(r, "residual", dt)?;
        let offs = bcast_offsets(&shape, r.shape());
        for (o, off) in v.iter_mut().zip(offs) {
            *o += rv[off];
        }
    }
    from_f64s(dt, shape, v)
}

/// `inv_std(x, eps)` / `inv_rms(x, eps)`: x `[.., K]` and a scalar epsilon give `[.., 1]`.
fn row_stat_shape(x: &Fact, eps: &Fact) -> Result<Shape, String> {
    if eps.ty.shape.rank().is_some_and(|r| r != 0) {
        return Err(format!("epsilon must be a scalar, got {}", eps.ty.shape));
    }
    Ok(match x.ty.shape.dims() {
        None => Shape::unknown(),
        Some([]) => return Err("a row statistic needs rank >= 1".into()),
        Some(d) => {
            let mut d = d.to_vec();
            if let Some(last) = d.last_mut() {
                *last = Dim::Fixed(1);
            }
            Shape::new(d)
        }
    })
}

/// Per row along the last axis: `1/sqrt(mean((x − mean(x))²) + eps)` (`centred`, the
/// layer_norm divisor) or `1/sqrt(mean(x²) + eps)` (the rms_norm divisor), kept as a
/// trailing dim of 1.
fn row_stat(x: &Tensor, eps: &Tensor, centred: bool) -> Result<Tensor, String> {
    let dt = x.dtype();
    if !eps.shape().is_empty() {
        return Err(format!("epsilon must be a scalar, got {:?}", eps.shape()));
    }
    let e = float_input(eps, "epsilon", dt)?
        .first()
        .copied()
        .unwrap_or(0.0);
    let xs = x.shape();
    let (&k, lead) = xs.split_last().ok_or("a row statistic needs rank >= 1")?;
    let mut out = lead.to_vec();
    out.push(1);
    let rows = checked_numel(&out)?;
    let v = float_input(x, "x", dt)?;
    let mut r = Vec::with_capacity(rows);
    for i in 0..rows {
        let row = v.get(i * k..(i + 1) * k).unwrap_or(&[]);
        let n = k.max(1) as f64;
        let m = if centred {
            row.iter().sum::<f64>() / n
        } else {
            0.0
        };
        let var = row.iter().map(|a| (a - m) * (a - m)).sum::<f64>() / n;
        r.push(1.0 / (var + e).sqrt());
    }
    from_f64s(dt, out, r)
}

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

fn gelu_erf(x: f64) -> f64 {
    0.5 * x * (1.0 + super::elementwise::erf(x / std::f64::consts::SQRT_2))
}

fn gelu_tanh(x: f64) -> f64 {
    let c = (2.0 / std::f64::consts::PI).sqrt();
    0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
}

/// The epilogue activation named by `linear`'s `activation` attribute.
fn activation(attrs: &Attrs) -> Result<fn(f64) -> f64, String> {
    Ok(
        match attrs.string_or("activation", "none".into())?.as_str() {
            "none" => |x| x,
            "relu" => |x: f64| if x.is_nan() || x > 0.0 { x } else { 0.0 },
            "gelu" => gelu_erf,
            "gelu_tanh" => gelu_tanh,
            "silu" => silu,
            other => return Err(format!("unknown linear activation `{other}`")),
        },
    )
}

/// `rotary`'s `interleaved` attribute: 0 rotates halves (GPT-NeoX/LLaMA layout), 1 rotates
/// adjacent pairs (GPT-J layout).
fn interleaved(attrs: &Attrs) -> Result<bool, String> {
    match attrs.int_or("interleaved", 0)? {
        0 => Ok(false),
        1 => Ok(true),
        other => Err(format!("rotary `interleaved` must be 0 or 1, got {other}")),
    }
}

/// Whether an `attention`'s `layout` is sequence-major (`"bshd"`) rather than head-major
/// (`"bhsd"`, the default).
pub fn attention_seq_major(attrs: &Attrs) -> Result<bool, String> {
    match attrs.string("layout")?.as_deref() {
        None | Some("bhsd") => Ok(false),
        Some("bshd") => Ok(true),
        Some(other) => Err(format!(
            "attention `layout` must be \"bhsd\" or \"bshd\", got {other:?}"
        )),
    }
}

/// A rank-4 shape with its axes 1 and 2 swapped (any other shape as it is).
fn swap_middle(s: Shape) -> Shape {
    match s.dims() {
        Some([a, b, c, d]) => Shape::new(vec![a.clone(), c.clone(), b.clone(), d.clone()]),
        _ => s,
    }
}

/// A fact with its shape's axes 1 and 2 swapped (contents dropped: only the shape rule reads it).
fn swap_facts(f: &Fact) -> Fact {
    let mut f = Fact::of(f.ty.clone());
    f.ty.shape = swap_middle(f.ty.shape);
    f
}

/// A dense rank-4 f64 tensor of `shape` with its axes 1 and 2 swapped: `[a, b, c, d]` in,
/// `[a, c, b, d]` out.
fn swap_middle_values(v: &[f64], [a, b, c, d]: [usize; 4]) -> Vec<f64> {
    let mut out = Vec::with_capacity(v.len());
    for ia in 0..a {
        for ic in 0..c {
            for ib in 0..b {
                out.extend_from_slice(&v[((ia * b + ib) * c + ic) * d..][..d]);
            }
        }
    }
    out
}

/// `attention`'s (scale, causal) attributes. `scale` defaults to 1/sqrt(D) when absent.
fn attention_attrs(attrs: &Attrs) -> Result<(Option<f64>, bool), String> {
    let scale = attrs.float("scale")?.map(f64::from);
    let causal = match attrs.int_or("causal", 0)? {
        0 => false,
        1 => true,
        other => return Err(format!("attention `causal` must be 0 or 1, got {other}")),
    };
    Ok((scale, causal))
}

fn float_input(t: &Tensor, what: &str, dt: DType) -> Result<Vec<f64>, String> {
    if t.dtype() != dt {
        return Err(format!("{what} is {}, expected {dt}", t.dtype()));
    }
    Ok(t.to_f64s())
}

/// Checks that `t` broadcasts to exactly `shape` (it may not enlarge it).
fn fits(t: &Tensor, shape: &[usize], what: &str) -> Result<(), String> {
    if broadcast_concrete(t.shape(), shape).as_deref() != Some(shape) {
        return Err(format!(
            "{what} {:?} does not broadcast to {shape:?}",
            t.shape()
        ));
    }
    Ok(())
}

fn rotary(attrs: &Attrs, inputs: &[Option<&Tensor>]) -> Result<Tensor, String> {
    let inter = interleaved(attrs)?;
    let x = arg(inputs, 0)?;
    let (cos, sin) = (arg(inputs, 1)?, arg(inputs, 2)?);
    let dt = x.dtype();
    if !cos.dtype().is_float() || !sin.dtype().is_float() {
        return Err("rotary cos and sin must be float".into());
    }
    let (cv, sv) = (cos.to_f64s(), sin.to_f64s());
    let xs = x.shape();
    let d = *xs.last().ok_or("rotary needs x of rank >= 1")?;
    if d % 2 != 0 {
        return Err(format!("rotary needs an even last dim, got {d}"));
    }
    let out = super::shared::broadcast_all(&[xs, cos.shape(), sin.shape()])?;
    if out.last() != Some(&d) {
        return Err(format!("cos/sin widen x's rotated axis {d} to {out:?}"));
    }
    checked_numel(&out)?;
    let xv = x.to_f64s();
    // rotate_half(x), or the pairwise rotation when interleaved, at x's own shape.
    let h = d / 2;
    let mut rot = vec![0.0; xv.len()];
    for (r, row) in rot
        .chunks_exact_mut(d.max(1))
        .zip(xv.chunks_exact(d.max(1)))
    {
        for j in 0..h {
            if inter {
                r[2 * j] = -row[2 * j + 1];
                r[2 * j + 1] = row[2 * j];
            } else {
                r[j] = -row[j + h];
                r[j + h] = row[j];
            }
        }
    }
    let (bx, br) = (Bc::new(&xv, xs, &out), Bc::new(&rot, xs, &out));
    let (bc, bs) = (
        Bc::new(&cv, cos.shape(), &out),
        Bc::new(&sv, sin.shape(), &out),
    );
    let n: usize = out.iter().product();
    let y = (0..n)
        .map(|i| bx.get(i) * bc.get(i) + br.get(i) * bs.get(i))
        .collect();
    from_f64s(dt, out, y)
}

fn dims4<'a>(f: &'a Fact, what: &str) -> Result<Option<&'a [Dim]>, String> {
    match f.ty.shape.dims() {
        None => Ok(None),
        Some(d) if d.len() == 4 => Ok(Some(d)),
        Some(d) => Err(format!(
            "attention {what} must be 4-D, got rank {}",
            d.len()
        )),
    }
}

fn attention_shape(inputs: &[Option<&Fact>]) -> Result<Shape, String> {
    let (q, k, v) = (arg(inputs, 0)?, arg(inputs, 1)?, arg(inputs, 2)?);
    let (qd, kd, vd) = (dims4(q, "q")?, dims4(k, "k")?, dims4(v, "v")?);
    let unknown = [Dim::Unknown, Dim::Unknown, Dim::Unknown, Dim::Unknown];
    let (qd, kd, vd) = (
        qd.unwrap_or(&unknown),
        kd.unwrap_or(&unknown),
        vd.unwrap_or(&unknown),
    );
    let b = unify(&unify(&qd[0], &kd[0])?, &vd[0])?;
    let hkv = unify(&kd[1], &vd[1])?;
    let t = unify(&kd[2], &vd[2])?;
    unify(&qd[3], &kd[3])?;
    if let (Some(hq), Some(hk)) = (qd[1].fixed(), hkv.fixed()) {
        if hk == 0 || hq % hk != 0 {
            return Err(format!(
                "{hq} query heads are not a multiple of {hk} kv heads"
            ));
        }
    }
    let out = vec![b, qd[1].clone(), qd[2].clone(), vd[3].clone()];
    if let Some(m) = opt_arg(inputs, 3) {
        if !(m.ty.dtype.is_float() || m.ty.dtype == DType::Bool) {
            return Err(format!(
                "attention mask must be float or bool, got {}",
                m.ty.dtype
            ));
        }
        let scores = Shape::new(vec![out[0].clone(), out[1].clone(), out[2].clone(), t]);
        broadcast(&m.ty.shape, &scores)?;
    }
    Ok(Shape::new(out))
}

/// Scaled-dot-product attention. Query head `h` reads kv head `h / (Hq / Hkv)`. With
/// `causal`, query `i` sits at absolute position `T - S + i` (the cache holds the earlier
/// keys) and sees keys `j <= T - S + i`. A bool mask keeps `true` entries; a float mask is
/// added to the scaled scores. Masked-out scores are `-inf` before the softmax, and the
/// softmax is the `softmax` op's (max-shifted): a row whose scores are all `-inf` gives
/// `0/0 = NaN`, exactly as Softmax over a `Where(mask, s, -inf)` decomposition does. A
/// float mask of large finite negatives (HF's `finfo.min`) keeps such rows finite, as in
/// the decomposed graph.
fn attention(attrs: &Attrs, inputs: &[Option<&Tensor>]) -> Result<Tensor, String> {
    let (scale, causal) = attention_attrs(attrs)?;
    let seq_major = attention_seq_major(attrs)?;
    let (q, k, v) = (arg(inputs, 0)?, arg(inputs, 1)?, arg(inputs, 2)?);
    let dt = q.dtype();
    let shape4 = |t: &Tensor, what: &str| -> Result<[usize; 4], String> {
        let [a, b, c, d] = <[usize; 4]>::try_from(t.shape())
            .map_err(|_| format!("attention {what} must be 4-D, got {:?}", t.shape()))?;
        Ok(if seq_major {
            [a, c, b, d]
        } else {
            [a, b, c, d]
        })
    };
    // Head-major values: a sequence-major input is swapped once here.
    let values = |t: &Tensor, what: &str| -> Result<Vec<f64>, String> {
        let v = float_input(t, what, dt)?;
        Ok(match <[usize; 4]>::try_from(t.shape()) {
            Ok(sh) if seq_major => swap_middle_values(&v, sh),
            _ => v,
        })
    };
    let (qv, kv, vv) = (values(q, "q")?, values(k, "k")?, values(v, "v")?);
    let [b, hq, s, d] = shape4(q, "q")?;
    let [bk, hkv, t, dk] = shape4(k, "k")?;
    let [bv, hkv_v, tv, dv] = shape4(v, "v")?;
    if (bk, dk) != (b, d) || (bv, hkv_v, tv) != (b, hkv, t) {
        return Err(format!(
            "attention shapes disagree: q {:?}, k {:?}, v {:?}",
            q.shape(),
            k.shape(),
            v.shape()
        ));
    }
    if hkv == 0 || hq % hkv != 0 {
        return Err(format!(
            "{hq} query heads are not a multiple of {hkv} kv heads"
        ));
    }
    let group = hq / hkv;
    let scale = scale.unwrap_or(1.0 / (d as f64).sqrt());
    let scores_shape = [b, hq, s, t];
    checked_numel(&scores_shape)?;
    let out_shape = vec![b, hq, s, dv];
    let n_out = checked_numel(&out_shape)?;
    // The mask, as an additive term per score (-inf where a bool mask says drop).
    let mask: Option<(Vec<f64>, Vec<usize>)> = match opt_arg(inputs, 3) {
        None => None,
        Some(m) => {
            fits(m, &scores_shape, "attention mask")?;
            let vals = match m.data() {
                TensorData::Bool(bs) => bs
                    .iter()
                    .map(|&keep| if keep { 0.0 } else { f64::NEG_INFINITY })
                    .collect(),
                _ if m.dtype().is_float() => m.to_f64s(),
                _ => {
                    return Err(format!(
                        "attention mask must be float or bool, got {}",
                        m.dtype()
                    ))
                }
            };
            Some((vals, bcast_offsets(&scores_shape, m.shape())))
        }
    };
    let mut y = vec![0.0; n_out];
    let mut row = vec![0.0; t];
    for bi in 0..b {
        for h in 0..hq {
            let kh = h / group;
            let kbase = (bi * hkv + kh) * t;
            for i in 0..s {
                let qrow = &qv[((bi * hq + h) * s + i) * d..][..d];
                let srow = ((bi * hq + h) * s + i) * t;
                // Query i's absolute position; negative when S > T (no key is visible).
                let pos = t as i64 - s as i64 + i as i64;
                for (j, r) in row.iter_mut().enumerate() {
                    let krow = &kv[(kbase + j) * d..][..d];
                    let mut acc: f64 = qrow.iter().zip(krow).map(|(a, b)| a * b).sum();
                    acc *= scale;
                    if let Some((mv, off)) = &mask {
                        acc += mv[off[srow + j]];
                    }
                    if causal && j as i64 > pos {
                        acc = f64::NEG_INFINITY;
                    }
                    *r = acc;
                }
                let mx = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let shift = if mx.is_finite() { mx } else { 0.0 };
                let mut sum = 0.0;
                for r in row.iter_mut() {
                    *r = (*r - shift).exp();
                    sum += *r;
                }
                let out = &mut y[((bi * hq + h) * s + i) * dv..][..dv];
                for (j, &p) in row.iter().enumerate() {
                    let p = p / sum;
                    let vrow = &vv[(kbase + j) * dv..][..dv];
                    for (o, &x) in out.iter_mut().zip(vrow) {
                        *o += p * x;
                    }
                }
            }
        }
    }
    if seq_major {
        return from_f64s(
            dt,
            vec![b, s, hq, dv],
            swap_middle_values(&y, [b, hq, s, dv]),
        );
    }
    from_f64s(dt, out_shape, y)
}

fn linear_shape(inputs: &[Option<&Fact>]) -> Result<Shape, String> {
    let (x, w) = (arg(inputs, 0)?, arg(inputs, 1)?);
    let n = match w.ty.shape.dims() {
        None => Dim::Unknown,
        Some([kw, n]) => {
            if let Some(kx) = x.ty.shape.dims().and_then(|d| d.last()) {
                unify(kx, kw).map_err(|e| format!("linear contraction: {e}"))?;
            }
            n.clone()
        }
        Some(d) => return Err(format!("linear weight must be 2-D, got rank {}", d.len())),
    };
    let out = match x.ty.shape.dims() {
        None => Shape::unknown(),
        Some([]) => return Err("linear input must have rank >= 1".into()),
        Some(d) => {
            let mut o = d[..d.len() - 1].to_vec();
            o.push(n);
            Shape::new(o)
        }
    };
    for i in 2..5 {
        if let Some(f) = opt_arg(inputs, i) {
            broadcast(&f.ty.shape, &out)?;
        }
    }
    Ok(out)
}

/// An optional epilogue operand of `linear`: values and shape.
type Operand = (Vec<f64>, Vec<usize>);

/// `act(row_scale ⊙ (x·w) + bias) + residual`. Bias, row_scale and residual must
/// broadcast to the product's shape `[..., N]`; they do not enlarge it.
fn linear(attrs: &Attrs, inputs: &[Option<&Tensor>]) -> Result<Tensor, String> {
    let act = activation(attrs)?;
    let (x, w) = (arg(inputs, 0)?, arg(inputs, 1)?);
    let dt = x.dtype();
    let (xv, wv) = (float_input(x, "x", dt)?, float_input(w, "w", dt)?);
    let xs = x.shape();
    let (&k, lead) = xs.split_last().ok_or("linear input must have rank >= 1")?;
    let [kw, n] = <[usize; 2]>::try_from(w.shape())
        .map_err(|_| format!("linear weight must be 2-D, got {:?}", w.shape()))?;
    if kw != k {
        return Err(format!(
            "linear contraction: x {xs:?} and w {:?}",
            w.shape()
        ));
    }
    let mut out = lead.to_vec();
    out.push(n);
    let total = checked_numel(&out)?;
    let m: usize = lead.iter().product();
    let mut y = vec![0.0; total];
    super::shared::matmul_acc(&xv, &wv, &mut y, m, k, n);
    let operand = |i: usize, what: &str| -> Result<Option<Operand>, String> {
        match opt_arg(inputs, i) {
            None => Ok(None),
            Some(t) => {
                fits(t, &out, what)?;
                Ok(Some((float_input(t, what, dt)?, t.shape().to_vec())))
            }
        }
    };
    let (bias, scale, resid) = (
        operand(2, "bias")?,
        operand(3, "row_scale")?,
        operand(4, "residual")?,
    );
    fn bc<'a>(o: &'a Option<Operand>, out: &[usize]) -> Option<Bc<'a, f64>> {
        o.as_ref().map(|(v, s)| Bc::new(v, s, out))
    }
    let (bias, scale, resid) = (bc(&bias, &out), bc(&scale, &out), bc(&resid, &out));
    for (i, o) in y.iter_mut().enumerate() {
        let mut a = *o;
        if let Some(s) = &scale {
            a *= s.get(i);
        }
        if let Some(b) = &bias {
            a += b.get(i);
        }
        a = act(a);
        if let Some(r) = &resid {
            a += r.get(i);
        }
        *o = a;
    }
    from_f64s(dt, out, y)
}

/// ONNX `RotaryEmbedding`. Each head row `x[.., 0..D]` of a `[B, H, S, D]` or
/// `[B, S, H·D]` input rotates its first `R` (`rotary_embedding_dim`, default `D`)
/// entries: pairs `(x1, x2)` are the two halves (or, `interleaved`, adjacent entries) and
/// become `(cos·x1 − sin·x2, sin·x1 + cos·x2)`, with `cos`/`sin` of shape `[B, S, R/2]`
/// given directly, or `[P, R/2]` caches read at `position_ids [B, S]`. The rest is copied.
fn rotary_embedding(attrs: &Attrs, inputs: &[Option<&Tensor>]) -> Result<Tensor, String> {
    let inter = interleaved(attrs)?;
    let x = arg(inputs, 0)?;
    let (cos, sin) = (arg(inputs, 1)?, arg(inputs, 2)?);
    if !cos.dtype().is_float() || !sin.dtype().is_float() || cos.shape() != sin.shape() {
        return Err("RotaryEmbedding cos and sin caches must be float and of one shape".into());
    }
    let (b, h, s, d, heads_outer) = match *x.shape() {
        [b, h, s, d] => (b, h, s, d, true),
        [b, s, hid] => {
            let h = attrs
                .int("num_heads")?
                .and_then(|h| usize::try_from(h).ok())
                .filter(|&h| h > 0 && hid % h == 0)
                .ok_or("3-D RotaryEmbedding input needs num_heads dividing its hidden size")?;
            (b, h, s, hid / h, false)
        }
        _ => {
            return Err(format!(
                "RotaryEmbedding input must be 3-D or 4-D, got {:?}",
                x.shape()
            ))
        }
    };
    let r = match attrs.int_or("rotary_embedding_dim", 0)? {
        0 => d,
        r => usize::try_from(r)
            .ok()
            .filter(|&r| r <= d && r % 2 == 0)
            .ok_or_else(|| format!("rotary_embedding_dim {r} must be even and at most {d}"))?,
    };
    let half = r / 2;
    let (cv, sv) = (cos.to_f64s(), sin.to_f64s());
    // The offset of the cache row for (batch, position).
    let row: Box<dyn Fn(usize, usize) -> Result<usize, String>> = match opt_arg(inputs, 3) {
        Some(p) => {
            let [pmax, hc] = <[usize; 2]>::try_from(cos.shape())
                .map_err(|_| "with position_ids, the caches must be 2-D".to_string())?;
            if hc != half || p.shape() != [b, s] || !p.dtype().is_int() {
                return Err(format!(
                    "RotaryEmbedding caches {:?} / position_ids {:?} do not fit [{b}, {s}] and R/2 = {half}",
                    cos.shape(),
                    p.shape()
                ));
            }
            let pos = p.to_i64s();
            Box::new(move |bi, si| {
                let q = pos[bi * s + si];
                usize::try_from(q)
                    .ok()
                    .filter(|&q| q < pmax)
                    .map(|q| q * half)
                    .ok_or_else(|| format!("position id {q} is out of range for {pmax} positions"))
            })
        }
        None => {
            let [cb, cs, hc] = <[usize; 3]>::try_from(cos.shape())
                .map_err(|_| "without position_ids, the caches must be 3-D".to_string())?;
            if hc != half || cs != s || (cb != b && cb != 1) {
                return Err(format!(
                    "RotaryEmbedding caches {:?} do not fit [{b}, {s}, {half}]",
                    cos.shape()
                ));
            }
            Box::new(move |bi, si| Ok(((if cb == 1 { 0 } else { bi }) * s + si) * half))
        }
    };
    let mut y = x.to_f64s();
    for bi in 0..b {
        for si in 0..s {
            let c0 = row(bi, si)?;
            let (cr, sr) = (&cv[c0..][..half], &sv[c0..][..half]);
            for hi in 0..h {
                let base = if heads_outer {
                    ((bi * h + hi) * s + si) * d
                } else {
                    ((bi * s + si) * h + hi) * d
                };
                let xr = &mut y[base..][..d];
                for j in 0..half {
                    let (i1, i2) = if inter {
                        (2 * j, 2 * j + 1)
                    } else {
                        (j, j + half)
                    };
                    let (x1, x2) = (xr[i1], xr[i2]);
                    xr[i1] = cr[j] * x1 - sr[j] * x2;
                    xr[i2] = sr[j] * x1 + cr[j] * x2;
                }
            }
        }
    }
    from_f64s(x.dtype(), x.shape().to_vec(), y)
}

/// `onnx_attention`'s attributes, checked.
struct OnnxAttnAttrs {
    q_heads: Option<i64>,
    kv_heads: Option<i64>,
    scale: Option<f64>,
    softcap: f64,
    causal: bool,
    /// 0 or 1: the (softcapped) scaled `q·k`; 2: plus the mask; 3: after the softmax.
    qk_mode: i64,
}

fn onnx_attention_attrs(attrs: &Attrs) -> Result<OnnxAttnAttrs, String> {
    let causal = match attrs.int_or("is_causal", 0)? {
        0 => false,
        1 => true,
        other => return Err(format!("Attention `is_causal` must be 0 or 1, got {other}")),
    };
    let qk_mode = attrs.int_or("qk_matmul_output_mode", 0)?;
    if !(0..=3).contains(&qk_mode) {
        return Err(format!(
            "Attention `qk_matmul_output_mode` must be 0..=3, got {qk_mode}"
        ));
    }
    Ok(OnnxAttnAttrs {
        q_heads: attrs.int("q_num_heads")?,
        kv_heads: attrs.int("kv_num_heads")?,
        scale: attrs.float("scale")?.map(f64::from),
        softcap: f64::from(attrs.float_or("softcap", 0.0)?),
        causal,
        qk_mode,
    })
}

/// The `[B, H, S, D]` view of a 3-D `[B, S, H·D]` or 4-D q/k/v type, as far as known.
fn heads_view(f: &Fact, heads: Option<i64>) -> Result<Vec<Dim>, String> {
    let h = heads.and_then(|h| u64::try_from(h).ok()).filter(|&h| h > 0);
    Ok(match f.ty.shape.dims() {
        Some([b, hh, s, d]) => vec![b.clone(), hh.clone(), s.clone(), d.clone()],
        Some([b, s, hid]) => {
            let h = h.ok_or("3-D Attention inputs need q_num_heads and kv_num_heads")?;
            let d = match hid.fixed() {
                Some(n) if n % h != 0 => {
                    return Err(format!("hidden size {n} is not a multiple of {h} heads"))
                }
                Some(n) => Dim::Fixed(n / h),
                None => Dim::Unknown,
            };
            vec![b.clone(), Dim::Fixed(h), s.clone(), d]
        }
        Some(d) => {
            return Err(format!(
                "Attention inputs must be 3-D or 4-D, got rank {}",
                d.len()
            ))
        }
        None => vec![Dim::Unknown; 4],
    })
}

fn dim_add(a: &Dim, b: &Dim) -> Dim {
    match (a, b) {
        (Dim::Fixed(x), Dim::Fixed(y)) => x.checked_add(*y).map_or(Dim::Unknown, Dim::Fixed),
        (x, Dim::Fixed(0)) | (Dim::Fixed(0), x) => x.clone(),
        _ => Dim::Unknown,
    }
}

fn dim_mul(a: &Dim, b: &Dim) -> Dim {
    match (a, b) {
        (Dim::Fixed(x), Dim::Fixed(y)) => x.checked_mul(*y).map_or(Dim::Unknown, Dim::Fixed),
        (x, Dim::Fixed(1)) | (Dim::Fixed(1), x) => x.clone(),
        _ => Dim::Unknown,
    }
}

/// Shape rule of `onnx_attention`: `Y`, `present_key`, `present_value`, `qk_matmul_output`.
fn onnx_attention_shape(attrs: &Attrs, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>, String> {
    let a = onnx_attention_attrs(attrs)?;
    let (q, k, v) = (arg(inputs, 0)?, arg(inputs, 1)?, arg(inputs, 2)?);
    let qd = heads_view(q, a.q_heads)?;
    let kd = heads_view(k, a.kv_heads)?;
    let vd = heads_view(v, a.kv_heads)?;
    let b = unify(&unify(&qd[0], &kd[0])?, &vd[0])?;
    let hkv = unify(&kd[1], &vd[1])?;
    let l = unify(&kd[2], &vd[2])?;
    let dk = unify(&qd[3], &kd[3])?;
    let dv = vd[3].clone();
    if let (Some(hq), Some(hk)) = (qd[1].fixed(), hkv.fixed()) {
        if hk == 0 || hq % hk != 0 {
            return Err(format!(
                "{hq} query heads are not a multiple of {hk} kv heads"
            ));
        }
    }
    let total = match opt_arg(inputs, 4).and_then(|p| p.ty.shape.dims().map(|d| d.to_vec())) {
        Some(p) if p.len() == 4 => dim_add(&p[2], &l),
        Some(p) => {
            return Err(format!(
                "Attention past_key must be 4-D, got rank {}",
                p.len()
            ))
        }
        None if opt_arg(inputs, 4).is_some() => Dim::Unknown,
        None => l,
    };
    let y = match q.ty.shape.rank() {
        Some(4) => Shape::new(vec![b.clone(), qd[1].clone(), qd[2].clone(), dv.clone()]),
        Some(_) => Shape::new(vec![b.clone(), qd[2].clone(), dim_mul(&qd[1], &dv)]),
        None => Shape::unknown(),
    };
    let pk = Shape::new(vec![b.clone(), hkv.clone(), total.clone(), dk]);
    let pv = Shape::new(vec![b.clone(), hkv, total.clone(), dv]);
    let qk = Shape::new(vec![b, qd[1].clone(), qd[2].clone(), total]);
    Ok(vec![
        fact(q.ty.dtype, y),
        fact(k.ty.dtype, pk),
        fact(v.ty.dtype, pv),
        fact(q.ty.dtype, qk),
    ])
}

/// A q/k/v operand as `[B, H, S, D]` values: 4-D as is, 3-D `[B, S, H·D]` split into
/// `heads` heads and transposed.
fn to_heads(t: &Tensor, heads: Option<i64>, what: &str) -> Result<([usize; 4], Vec<f64>), String> {
    let v = t.to_f64s();
    match *t.shape() {
        [b, h, s, d] => Ok(([b, h, s, d], v)),
        [b, s, hid] => {
            let h = heads
                .and_then(|h| usize::try_from(h).ok())
                .filter(|&h| h > 0)
                .ok_or("3-D Attention inputs need positive q_num_heads and kv_num_heads")?;
            if hid % h != 0 {
                return Err(format!(
                    "{what} hidden size {hid} is not a multiple of {h} heads"
                ));
            }
            let d = hid / h;
            let mut out = vec![0.0; v.len()];
            for bi in 0..b {
                for si in 0..s {
                    for hi in 0..h {
                        let src = &v[((bi * s + si) * h + hi) * d..][..d];
                        out[((bi * h + hi) * s + si) * d..][..d].copy_from_slice(src);
                    }
                }
            }
            Ok(([b, h, s, d], out))
        }
        _ => Err(format!(
            "Attention {what} must be 3-D or 4-D, got {:?}",
            t.shape()
        )),
    }
}

/// `past ++ new` along the sequence axis of `[B, H, ·, D]` tensors.
fn concat_seq(
    past: Option<(&[usize], Vec<f64>)>,
    new: &[f64],
    [b, h, l, d]: [usize; 4],
    what: &str,
) -> Result<(usize, Vec<f64>), String> {
    let Some((ps, pv)) = past else {
        return Ok((l, new.to_vec()));
    };
    let [pb, ph, p, pd] = <[usize; 4]>::try_from(ps)
        .map_err(|_| format!("Attention {what} must be 4-D, got {ps:?}"))?;
    if (pb, ph, pd) != (b, h, d) {
        return Err(format!(
            "Attention {what} {ps:?} does not fit [{b}, {h}, _, {d}]"
        ));
    }
    let t = p.checked_add(l).ok_or("sequence length overflows")?;
    checked_numel(&[b, h, t, d])?;
    let mut out = Vec::with_capacity(b * h * t * d);
    for bh in 0..b * h {
        out.extend_from_slice(&pv[bh * p * d..][..p * d]);
        out.extend_from_slice(&new[bh * l * d..][..l * d]);
    }
    Ok((t, out))
}

/// ONNX `Attention`. Query head `h` reads kv head `h / (Hq / Hkv)`. The bias added to the
/// scaled (and softcapped, when `softcap > 0`: `c·tanh(x/c)`) scores is the mask (a bool
/// mask keeps `true`; a mask shorter than the total kv length is padded with `-inf`), plus
/// `-inf` where `is_causal` hides key `j > P + i` (P = past length), plus `-inf` for keys
/// at or past `nonpad_kv_seqlen[b]`. A fully masked row gives NaN, as in the reference.
fn onnx_attention(attrs: &Attrs, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
    let a = onnx_attention_attrs(attrs)?;
    let (q, k, v) = (arg(inputs, 0)?, arg(inputs, 1)?, arg(inputs, 2)?);
    let dt = q.dtype();
    if !dt.is_float() || !k.dtype().is_float() || !v.dtype().is_float() {
        return Err("Attention q, k and v must be float".into());
    }
    if q.rank() != k.rank() || q.rank() != v.rank() {
        return Err("Attention q, k and v must have the same rank".into());
    }
    let ([b, hq, s, d], qv) = to_heads(q, a.q_heads, "q")?;
    let ([bk, hkv, l, dk], kv) = to_heads(k, a.kv_heads, "k")?;
    let ([bv, hv, lv, dv], vv) = to_heads(v, a.kv_heads, "v")?;
    if (bk, dk) != (b, d) || (bv, hv, lv) != (b, hkv, l) {
        return Err(format!(
            "Attention shapes disagree: q {:?}, k {:?}, v {:?}",
            q.shape(),
            k.shape(),
            v.shape()
        ));
    }
    if hkv == 0 || hq % hkv != 0 {
        return Err(format!(
            "{hq} query heads are not a multiple of {hkv} kv heads"
        ));
    }
    let group = hq / hkv;
    let (pk, pv) = (opt_arg(inputs, 4), opt_arg(inputs, 5));
    if pk.is_some() != pv.is_some() {
        return Err("Attention needs both past_key and past_value, or neither".into());
    }
    let past = pk.map_or(0, |t| t.shape().get(2).copied().unwrap_or(0));
    let (t, kall) = concat_seq(
        pk.map(|t| (t.shape(), t.to_f64s())),
        &kv,
        [b, hkv, l, d],
        "past_key",
    )?;
    let (tv, vall) = concat_seq(
        pv.map(|t| (t.shape(), t.to_f64s())),
        &vv,
        [b, hkv, l, dv],
        "past_value",
    )?;
    if tv != t {
        return Err("Attention past_key and past_value lengths differ".into());
    }
    let scale = a.scale.unwrap_or(1.0 / (d as f64).sqrt());
    let scores_shape = [b, hq, s, t];
    let n_scores = checked_numel(&scores_shape)?;
    // The mask, padded to length T along its last axis, as an additive term.
    let mask: Option<(Vec<f64>, Vec<usize>)> = match opt_arg(inputs, 3) {
        None => None,
        Some(m) => {
            let ms = m.shape();
            let (&mt, lead) = ms
                .split_last()
                .ok_or("Attention mask must have rank >= 1")?;
            if ms.len() > 4 || mt > t {
                return Err(format!(
                    "Attention mask {ms:?} does not fit scores {scores_shape:?}"
                ));
            }
            let vals: Vec<f64> = match m.data() {
                TensorData::Bool(bs) => bs
                    .iter()
                    .map(|&keep| if keep { 0.0 } else { f64::NEG_INFINITY })
                    .collect(),
                _ if m.dtype().is_float() => m.to_f64s(),
                _ => {
                    return Err(format!(
                        "Attention mask must be float or bool, got {}",
                        m.dtype()
                    ))
                }
            };
            let mut padded_shape = lead.to_vec();
            padded_shape.push(t);
            checked_numel(&padded_shape)?;
            let mut padded = Vec::with_capacity(padded_shape.iter().product());
            for row in vals.chunks_exact(mt.max(1)).take(lead.iter().product()) {
                padded.extend_from_slice(&row[..mt]);
                padded.extend(std::iter::repeat_n(f64::NEG_INFINITY, t - mt));
            }
            if mt == 0 {
                padded = vec![f64::NEG_INFINITY; padded_shape.iter().product()];
            }
            if broadcast_concrete(&padded_shape, &scores_shape).as_deref()
                != Some(&scores_shape[..])
            {
                return Err(format!(
                    "Attention mask {ms:?} does not broadcast to {scores_shape:?}"
                ));
            }
            Some((padded, bcast_offsets(&scores_shape, &padded_shape)))
        }
    };
    let nonpad: Option<Vec<i64>> = match opt_arg(inputs, 6) {
        None => None,
        Some(n) => {
            if !n.dtype().is_int() || n.shape() != [b] {
                return Err(format!(
                    "Attention nonpad_kv_seqlen must be int [{b}], got {} {:?}",
                    n.dtype(),
                    n.shape()
                ));
            }
            Some(n.to_i64s())
        }
    };
    let mut y = vec![0.0; checked_numel(&[b, hq, s, dv])?];
    let mut qk_out = vec![0.0; n_scores];
    let mut row = vec![0.0; t];
    for bi in 0..b {
        for h in 0..hq {
            let kbase = (bi * hkv + h / group) * t;
            for i in 0..s {
                let qrow = &qv[((bi * hq + h) * s + i) * d..][..d];
                let srow = ((bi * hq + h) * s + i) * t;
                for (j, r) in row.iter_mut().enumerate() {
                    let krow = &kall[(kbase + j) * d..][..d];
                    let mut x = qrow.iter().zip(krow).map(|(p, q)| p * q).sum::<f64>() * scale;
                    if a.softcap > 0.0 {
                        x = a.softcap * (x / a.softcap).tanh();
                    }
                    if a.qk_mode <= 1 {
                        qk_out[srow + j] = x;
                    }
                    if let Some((mv, off)) = &mask {
                        x += mv[off[srow + j]];
                    }
                    if a.causal && j > past + i {
                        x += f64::NEG_INFINITY;
                    }
                    if nonpad.as_ref().is_some_and(|n| j as i64 >= n[bi]) {
                        x += f64::NEG_INFINITY;
                    }
                    if a.qk_mode == 2 {
                        qk_out[srow + j] = x;
                    }
                    *r = x;
                }
                let mx = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let mut sum = 0.0;
                for r in row.iter_mut() {
                    *r = (*r - mx).exp();
                    sum += *r;
                }
                let out = &mut y[((bi * hq + h) * s + i) * dv..][..dv];
                for (j, r) in row.iter_mut().enumerate() {
                    *r /= sum;
                    if a.qk_mode == 3 {
                        qk_out[srow + j] = *r;
                    }
                    let vrow = &vall[(kbase + j) * dv..][..dv];
                    for (o, &x) in out.iter_mut().zip(vrow) {
                        *o += *r * x;
                    }
                }
            }
        }
    }
    let y = if q.rank() == 3 {
        let mut t3 = vec![0.0; y.len()];
        for bi in 0..b {
            for h in 0..hq {
                for i in 0..s {
                    let src = &y[((bi * hq + h) * s + i) * dv..][..dv];
                    t3[((bi * s + i) * hq + h) * dv..][..dv].copy_from_slice(src);
                }
            }
        }
        from_f64s(dt, vec![b, s, hq * dv], t3)?
    } else {
        from_f64s(dt, vec![b, hq, s, dv], y)?
    };
    Ok(vec![
        y,
        from_f64s(k.dtype(), vec![b, hkv, t, d], kall)?,
        from_f64s(v.dtype(), vec![b, hkv, t, dv], vall)?,
        from_f64s(dt, scores_shape.to_vec(), qk_out)?,
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ops, Attr};
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// Fused f32 ops against f32 decompositions: f64 accumulation vs per-step rounding.
    const F32_TOL: f64 = 1e-5;
    /// f16/bf16 fused ops against the same op in f32: one rounding of the result.
    const HALF_TOL: f64 = 2e-2;

    fn run(op: OpKind, attrs: Attrs, xs: &[&Tensor]) -> Tensor {
        let ins: Vec<Option<&Tensor>> = xs.iter().map(|&t| Some(t)).collect();
        ops::eval(op, &attrs, &ins)
            .unwrap_or_else(|e| panic!("{}: {e}", op.name()))
            .remove(0)
    }

    fn rand_t(rng: &mut StdRng, shape: &[usize]) -> Tensor {
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.gen_range(-2.0f32..2.0)).collect();
        Tensor::from_vec(shape.to_vec(), v)
    }

    fn c64(shape: &[usize], v: Vec<i64>) -> Tensor {
        Tensor::from_vec(shape.to_vec(), v)
    }

    fn scalar(x: f32) -> Tensor {
        Tensor::scalar(x)
    }

    fn assert_close(a: &Tensor, b: &Tensor, tol: f64) {
        assert_eq!(a.shape(), b.shape());
        for (i, (x, y)) in a.to_f64s().iter().zip(b.to_f64s()).enumerate() {
            let ok = (x - y).abs() <= tol * (1.0 + y.abs()) || (x.is_nan() && y.is_nan());
            assert!(ok, "element {i}: {x} vs {y}");
        }
    }

    #[test]
    fn silu_matches_x_times_sigmoid() {
        let mut rng = StdRng::seed_from_u64(1);
        let x = rand_t(&mut rng, &[3, 5]);
        let got = run(OpKind::Silu, Attrs::new(), &[&x]);
        let sig = run(OpKind::Sigmoid, Attrs::new(), &[&x]);
        assert_close(&got, &run(OpKind::Mul, Attrs::new(), &[&x, &sig]), F32_TOL);
    }

    /// rotate_half written with the primitive ops: concat(-x[..., h:], x[..., :h]).
    fn rotate_half(x: &Tensor) -> Tensor {
        let d = *x.shape().last().unwrap() as i64;
        let sl = |a: i64, b: i64| {
            let args = [
                x,
                &c64(&[1], vec![a]),
                &c64(&[1], vec![b]),
                &c64(&[1], vec![-1]),
            ];
            run(OpKind::Slice, Attrs::new(), &args)
        };
        let (lo, hi) = (sl(0, d / 2), sl(d / 2, d));
        let neg = run(OpKind::Neg, Attrs::new(), &[&hi]);
        run(
            OpKind::Concat,
            Attrs::new().with("axis", Attr::Int(-1)),
            &[&neg, &lo],
        )
    }

    #[test]
    fn rotary_matches_slice_neg_concat_decomposition_with_broadcast_cos_sin() {
        let mut rng = StdRng::seed_from_u64(2);
        let x = rand_t(&mut rng, &[2, 3, 4, 8]);
        let cos = rand_t(&mut rng, &[1, 1, 4, 8]);
        let sin = rand_t(&mut rng, &[4, 8]);
        let got = run(OpKind::Rotary, Attrs::new(), &[&x, &cos, &sin]);
        let a = run(OpKind::Mul, Attrs::new(), &[&x, &cos]);
        let b = run(OpKind::Mul, Attrs::new(), &[&rotate_half(&x), &sin]);
        assert_close(&got, &run(OpKind::Add, Attrs::new(), &[&a, &b]), F32_TOL);
    }

    #[test]
    fn rotary_interleaved_rotates_adjacent_pairs() {
        let x = Tensor::from_vec(vec![4], vec![1.0f32, 2.0, 3.0, 4.0]);
        let one = Tensor::from_vec(vec![4], vec![0.0f32; 4]);
        let sin = Tensor::from_vec(vec![4], vec![1.0f32; 4]);
        let attrs = Attrs::new().with("interleaved", Attr::Int(1));
        let got = run(OpKind::Rotary, attrs, &[&x, &one, &sin]);
        assert_eq!(got.as_slice::<f32>().unwrap(), &[-2.0, 1.0, -4.0, 3.0]);
    }

    #[test]
    fn rotary_rejects_odd_width_and_widening_cos() {
        let x = Tensor::from_vec(vec![3], vec![1.0f32; 3]);
        let e = ops::eval(
            OpKind::Rotary,
            &Attrs::new(),
            &[Some(&x), Some(&x), Some(&x)],
        );
        assert!(e.unwrap_err().contains("even"));
        let x = Tensor::from_vec(vec![2, 1], vec![1.0f32; 2]);
        let c = Tensor::from_vec(vec![2, 2], vec![1.0f32; 4]);
        let e = ops::eval(
            OpKind::Rotary,
            &Attrs::new(),
            &[Some(&x), Some(&c), Some(&c)],
        );
        assert!(e.is_err());
    }

    /// repeat_kv with the primitive ops: [B, Hkv, T, D] → [B, Hkv·g, T, D].
    fn repeat_kv(k: &Tensor, g: usize) -> Tensor {
        let [b, h, t, d] = <[usize; 4]>::try_from(k.shape()).unwrap();
        let u = run(OpKind::Unsqueeze, Attrs::new(), &[k, &c64(&[1], vec![2])]);
        let shape5 = c64(&[5], vec![b as i64, h as i64, g as i64, t as i64, d as i64]);
        let e = run(OpKind::Expand, Attrs::new(), &[&u, &shape5]);
        let shape4 = c64(&[4], vec![b as i64, (h * g) as i64, t as i64, d as i64]);
        run(OpKind::Reshape, Attrs::new(), &[&e, &shape4])
    }

    /// MatMul → Mul(scale) → Add(mask) → Softmax → MatMul, with the primitive ops.
    fn sdpa_reference(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f32,
        mask: Option<&Tensor>,
    ) -> Tensor {
        let g = q.shape()[1] / k.shape()[1];
        let (k, v) = (repeat_kv(k, g), repeat_kv(v, g));
        let perm = Attrs::new().with("perm", Attr::Ints(vec![0, 1, 3, 2]));
        let kt = run(OpKind::Transpose, perm, &[&k]);
        let s = run(OpKind::MatMul, Attrs::new(), &[q, &kt]);
        let mut s = run(OpKind::Mul, Attrs::new(), &[&s, &scalar(scale)]);
        if let Some(m) = mask {
            s = run(OpKind::Add, Attrs::new(), &[&s, m]);
        }
        let p = run(
            OpKind::Softmax,
            Attrs::new().with("axis", Attr::Int(-1)),
            &[&s],
        );
        run(OpKind::MatMul, Attrs::new(), &[&p, &v])
    }

    fn causal_additive(s: usize, t: usize) -> Tensor {
        let mut m = vec![0.0f32; s * t];
        for i in 0..s {
            for j in 0..t {
                if j + s > t + i {
                    m[i * t + j] = f32::NEG_INFINITY;
                }
            }
        }
        Tensor::from_vec(vec![s, t], m)
    }

    #[test]
    fn attention_matches_decomposition_with_grouped_kv_heads() {
        let mut rng = StdRng::seed_from_u64(3);
        let (q, k, v) = (
            rand_t(&mut rng, &[2, 4, 3, 8]),
            rand_t(&mut rng, &[2, 2, 5, 8]),
            rand_t(&mut rng, &[2, 2, 5, 6]),
        );
        let attrs = Attrs::new().with("scale", Attr::Float(0.3));
        let got = run(OpKind::Attention, attrs, &[&q, &k, &v]);
        assert_eq!(got.shape(), &[2, 4, 3, 6]);
        assert_close(&got, &sdpa_reference(&q, &k, &v, 0.3, None), F32_TOL);
    }

    #[test]
    fn sequence_major_attention_is_the_transposed_head_major_one() {
        let mut rng = StdRng::seed_from_u64(4);
        let (q, k, v) = (
            rand_t(&mut rng, &[2, 4, 3, 8]),
            rand_t(&mut rng, &[2, 2, 5, 8]),
            rand_t(&mut rng, &[2, 2, 5, 6]),
        );
        let swap = |t: &Tensor| {
            let perm = Attrs::new().with("perm", Attr::Ints(vec![0, 2, 1, 3]));
            crate::ops::eval(OpKind::Transpose, &perm, &[Some(t)]).unwrap()[0].clone()
        };
        let mask = Tensor::from_vec(
            vec![1, 1, 3, 5],
            (0..15).map(|i| i % 4 != 1).collect::<Vec<_>>(),
        );
        for causal in [0, 1] {
            let attrs = Attrs::new().with("causal", Attr::Int(causal));
            let want = run(OpKind::Attention, attrs.clone(), &[&q, &k, &v, &mask]);
            let seq = attrs.with("layout", Attr::Str("bshd".into()));
            let (qs, ks, vs) = (swap(&q), swap(&k), swap(&v));
            let got = run(OpKind::Attention, seq.clone(), &[&qs, &ks, &vs, &mask]);
            assert_eq!(got.shape(), &[2, 3, 4, 6]);
            assert_eq!(got, swap(&want));
            let facts: Vec<Fact> = [&qs, &ks, &vs, &mask]
                .iter()
                .map(|t| Fact::of(crate::TensorType::new(t.dtype(), Shape::fixed(t.shape()))))
                .collect();
            let refs: Vec<Option<&Fact>> = facts.iter().map(Some).collect();
            let inferred = infer(OpKind::Attention, &seq, &refs).unwrap();
            assert_eq!(inferred[0].ty.shape, Shape::fixed(&[2, 3, 4, 6]));
        }
        let bad = Attrs::new().with("layout", Attr::Str("sbhd".into()));
        let err = crate::ops::eval(OpKind::Attention, &bad, &[Some(&q), Some(&k), Some(&v)]);
        assert!(err.unwrap_err().contains("layout"));
    }

    #[test]
    fn attention_causal_with_kv_cache_offsets_query_positions() {
        let mut rng = StdRng::seed_from_u64(4);
        // S = 2 new queries against T = 5 keys (3 cached): query i sits at 3 + i.
        let (q, k, v) = (
            rand_t(&mut rng, &[1, 2, 2, 4]),
            rand_t(&mut rng, &[1, 1, 5, 4]),
            rand_t(&mut rng, &[1, 1, 5, 4]),
        );
        let attrs = Attrs::new()
            .with("scale", Attr::Float(0.5))
            .with("causal", Attr::Int(1));
        let got = run(OpKind::Attention, attrs, &[&q, &k, &v]);
        let want = sdpa_reference(&q, &k, &v, 0.5, Some(&causal_additive(2, 5)));
        assert_close(&got, &want, F32_TOL);
    }

    #[test]
    fn attention_additive_and_bool_padding_masks_agree_with_decomposition() {
        let mut rng = StdRng::seed_from_u64(5);
        let (q, k, v) = (
            rand_t(&mut rng, &[2, 2, 3, 4]),
            rand_t(&mut rng, &[2, 2, 3, 4]),
            rand_t(&mut rng, &[2, 2, 3, 4]),
        );
        // Batch 0 keeps all keys, batch 1 drops the last: [B, 1, 1, T].
        let keep = [true, true, true, true, true, false];
        let bmask = Tensor::new(vec![2, 1, 1, 3], TensorData::Bool(keep.to_vec().into())).unwrap();
        let add: Vec<f32> = keep.iter().map(|&k| if k { 0.0 } else { -1e9 }).collect();
        let amask = Tensor::from_vec(vec![2, 1, 1, 3], add);
        let attrs = Attrs::new().with("scale", Attr::Float(0.5));
        let want = sdpa_reference(&q, &k, &v, 0.5, Some(&amask));
        let got_b = run(OpKind::Attention, attrs.clone(), &[&q, &k, &v, &bmask]);
        let got_a = run(OpKind::Attention, attrs, &[&q, &k, &v, &amask]);
        assert_close(&got_b, &want, F32_TOL);
        assert_close(&got_a, &want, F32_TOL);
    }

    #[test]
    fn attention_fully_masked_row_is_nan_like_softmax_of_all_neg_inf() {
        let q = Tensor::from_vec(vec![1, 1, 1, 2], vec![1.0f32, 2.0]);
        let k = Tensor::from_vec(vec![1, 1, 2, 2], vec![1.0f32, 0.0, 0.0, 1.0]);
        let mask = Tensor::new(vec![2], TensorData::Bool(vec![false, false].into())).unwrap();
        let got = run(OpKind::Attention, Attrs::new(), &[&q, &k, &k, &mask]);
        let neg = Tensor::from_vec(vec![2], vec![f32::NEG_INFINITY; 2]);
        let want = sdpa_reference(&q, &k, &k, 1.0 / 2f32.sqrt(), Some(&neg));
        assert!(got.to_f64s().iter().all(|x| x.is_nan()));
        assert_close(&got, &want, F32_TOL);
    }

    #[test]
    fn attention_rejects_heads_that_do_not_group() {
        let q = Tensor::zeros(DType::F32, vec![1, 3, 1, 2]);
        let k = Tensor::zeros(DType::F32, vec![1, 2, 1, 2]);
        let e = ops::eval(
            OpKind::Attention,
            &Attrs::new(),
            &[Some(&q), Some(&k), Some(&k)],
        );
        assert!(e.unwrap_err().contains("multiple"));
    }

    fn linear_reference(
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        s: &Tensor,
        r: &Tensor,
        act: OpKind,
    ) -> Tensor {
        let y = run(OpKind::MatMul, Attrs::new(), &[x, w]);
        let y = run(OpKind::Mul, Attrs::new(), &[&y, s]);
        let y = run(OpKind::Add, Attrs::new(), &[&y, b]);
        let y = match act {
            OpKind::Identity => y,
            OpKind::Silu => {
                let sig = run(OpKind::Sigmoid, Attrs::new(), &[&y]);
                run(OpKind::Mul, Attrs::new(), &[&y, &sig])
            }
            OpKind::Gelu => run(OpKind::Gelu, Attrs::new(), &[&y]),
            other => run(other, Attrs::new(), &[&y]),
        };
        run(OpKind::Add, Attrs::new(), &[&y, r])
    }

    #[test]
    fn linear_epilogue_matches_matmul_scale_bias_act_residual() {
        let mut rng = StdRng::seed_from_u64(6);
        let x = rand_t(&mut rng, &[2, 3, 5]);
        let w = rand_t(&mut rng, &[5, 4]);
        let b = rand_t(&mut rng, &[4]);
        let s = rand_t(&mut rng, &[2, 3, 1]);
        let r = rand_t(&mut rng, &[2, 3, 4]);
        for (name, act) in [
            ("none", OpKind::Identity),
            ("relu", OpKind::Relu),
            ("gelu", OpKind::Gelu),
            ("silu", OpKind::Silu),
        ] {
            let attrs = Attrs::new().with("activation", Attr::Str(name.into()));
            let got = run(OpKind::Linear, attrs, &[&x, &w, &b, &s, &r]);
            assert_close(&got, &linear_reference(&x, &w, &b, &s, &r, act), F32_TOL);
        }
        let attrs = Attrs::new().with("activation", Attr::Str("gelu_tanh".into()));
        let got = run(OpKind::Linear, attrs, &[&x, &w, &b, &s, &r]);
        let y = run(OpKind::MatMul, Attrs::new(), &[&x, &w]);
        let y = run(OpKind::Mul, Attrs::new(), &[&y, &s]);
        let y = run(OpKind::Add, Attrs::new(), &[&y, &b]);
        let tanh = Attrs::new().with("approximate", Attr::Str("tanh".into()));
        let y = run(OpKind::Gelu, tanh, &[&y]);
        assert_close(&got, &run(OpKind::Add, Attrs::new(), &[&y, &r]), F32_TOL);
    }

    #[test]
    fn linear_optional_operands_may_be_absent() {
        let mut rng = StdRng::seed_from_u64(7);
        let x = rand_t(&mut rng, &[3, 5]);
        let w = rand_t(&mut rng, &[5, 2]);
        let r = rand_t(&mut rng, &[3, 2]);
        let ins = [Some(&x), Some(&w), None, None, Some(&r)];
        let got = ops::eval(OpKind::Linear, &Attrs::new(), &ins)
            .unwrap()
            .remove(0);
        let mm = run(OpKind::MatMul, Attrs::new(), &[&x, &w]);
        assert_close(&got, &run(OpKind::Add, Attrs::new(), &[&mm, &r]), F32_TOL);
        let bad = Tensor::zeros(DType::F32, vec![4, 2]);
        let e = ops::eval(
            OpKind::Linear,
            &Attrs::new(),
            &[Some(&x), Some(&w), None, None, Some(&bad)],
        );
        assert!(e.is_err());
        let attrs = Attrs::new().with("activation", Attr::Str("swish".into()));
        assert!(ops::eval(OpKind::Linear, &attrs, &[Some(&x), Some(&w)]).is_err());
    }

    #[test]
    fn half_precision_fused_ops_round_once_from_f32_results() {
        let mut rng = StdRng::seed_from_u64(8);
        let q = rand_t(&mut rng, &[1, 2, 3, 4]);
        let k = rand_t(&mut rng, &[1, 1, 3, 4]);
        let cs = rand_t(&mut rng, &[3, 4]);
        for dt in [DType::F16, DType::BF16, DType::F64] {
            let (qh, kh, ch) = (q.cast(dt), k.cast(dt), cs.cast(dt));
            let cases: [(OpKind, Attrs, Vec<&Tensor>, Vec<&Tensor>); 3] = [
                (OpKind::Silu, Attrs::new(), vec![&qh], vec![&q]),
                (
                    OpKind::Rotary,
                    Attrs::new(),
                    vec![&qh, &ch, &ch],
                    vec![&q, &cs, &cs],
                ),
                (
                    OpKind::Attention,
                    Attrs::new(),
                    vec![&qh, &kh, &kh],
                    vec![&q, &k, &k],
                ),
            ];
            for (op, attrs, half, full) in cases {
                let got = run(op, attrs.clone(), &half);
                assert_eq!(got.dtype(), dt);
                assert_close(&got, &run(op, attrs, &full), HALF_TOL);
            }
        }
    }

    #[test]
    fn shape_rules_keep_symbols_and_check_heads() {
        let f = |dt: DType, d: Vec<Dim>| Fact::of(crate::TensorType::new(dt, Shape::new(d)));
        let sym = |s: &str| Dim::Sym(s.into());
        let q = f(
            DType::F32,
            vec![sym("B"), Dim::Fixed(8), sym("S"), Dim::Fixed(16)],
        );
        let k = f(
            DType::F32,
            vec![sym("B"), Dim::Fixed(2), sym("T"), Dim::Fixed(16)],
        );
        let m = f(
            DType::Bool,
            vec![sym("B"), Dim::Fixed(1), Dim::Fixed(1), sym("T")],
        );
        let out = ops::infer(
            OpKind::Attention,
            &Attrs::new(),
            &[Some(&q), Some(&k), Some(&k), Some(&m)],
        )
        .unwrap();
        assert_eq!(out[0].ty.shape.to_string(), "[B, 8, S, 16]");
        let k3 = f(
            DType::F32,
            vec![sym("B"), Dim::Fixed(3), sym("T"), Dim::Fixed(16)],
        );
        let e = ops::infer(
            OpKind::Attention,
            &Attrs::new(),
            &[Some(&q), Some(&k3), Some(&k3)],
        );
        assert!(e.unwrap_err().contains("multiple"));
        let x = f(DType::F32, vec![sym("B"), sym("S"), Dim::Fixed(5)]);
        let w = f(DType::F32, vec![Dim::Fixed(5), Dim::Fixed(7)]);
        let out = ops::infer(OpKind::Linear, &Attrs::new(), &[Some(&x), Some(&w)]).unwrap();
        assert_eq!(out[0].ty.shape.to_string(), "[B, S, 7]");
        let w6 = f(DType::F32, vec![Dim::Fixed(6), Dim::Fixed(7)]);
        assert!(ops::infer(OpKind::Linear, &Attrs::new(), &[Some(&x), Some(&w6)]).is_err());
        let cs = f(DType::F32, vec![sym("S"), Dim::Fixed(5)]);
        let e = ops::infer(
            OpKind::Rotary,
            &Attrs::new(),
            &[Some(&x), Some(&cs), Some(&cs)],
        );
        assert!(e.unwrap_err().contains("even"));
        let out = ops::infer(OpKind::Silu, &Attrs::new(), &[Some(&x)]).unwrap();
        assert_eq!(out[0].ty.shape.to_string(), "[B, S, 5]");
    }

    #[test]
    fn onnx_attention_uses_the_kv_cache_and_masks_padding() {
        let t4 = |v: Vec<f32>, s: usize| Tensor::from_vec(vec![1, 1, s, 1], v);
        let q = t4(vec![1.0], 1);
        let k_past = t4(vec![0.0], 1);
        let k_new = t4(vec![3f32.ln()], 1);
        let (v_past, v_new) = (t4(vec![4.0], 1), t4(vec![8.0], 1));
        let attrs = Attrs::new()
            .with("scale", Attr::Float(1.0))
            .with("is_causal", Attr::Int(1));
        let ins = [
            Some(&q),
            Some(&k_new),
            Some(&v_new),
            None,
            Some(&k_past),
            Some(&v_past),
        ];
        let out = ops::eval(OpKind::OnnxAttention, &attrs, &ins).unwrap();
        // Weights softmax([0, ln 3]) = [1/4, 3/4]: y = 4/4 + 3·8/4 = 7.
        assert_close(&out[0], &t4(vec![7.0], 1), 1e-6);
        assert_eq!(out[1].shape(), &[1, 1, 2, 1]);
        assert_close(
            &out[3],
            &Tensor::from_vec(vec![1, 1, 1, 2], vec![0.0f32, 3f32.ln()]),
            1e-6,
        );
        // nonpad_kv_seqlen = 1 hides the new key.
        let n = c64(&[1], vec![1]);
        let ins = [
            Some(&q),
            Some(&k_new),
            Some(&v_new),
            None,
            Some(&k_past),
            Some(&v_past),
            Some(&n),
        ];
        let out = ops::eval(OpKind::OnnxAttention, &attrs, &ins).unwrap();
        assert_close(&out[0], &t4(vec![4.0], 1), 1e-6);
        // 3-D inputs without head counts are an error, not a panic.
        let q3 = Tensor::from_vec(vec![1, 1, 2], vec![1.0f32, 2.0]);
        let e = ops::eval(
            OpKind::OnnxAttention,
            &Attrs::new(),
            &[Some(&q3), Some(&q3), Some(&q3)],
        );
        assert!(e.unwrap_err().contains("q_num_heads"));
    }

    #[test]
    fn rotary_embedding_rotates_pairs_at_their_positions() {
        // One head, D = 4, R = 2: (x0, x1) rotates by the cache row at position 1; x2, x3 stay.
        let x = Tensor::from_vec(vec![1, 1, 1, 4], vec![1.0f32, 2.0, 3.0, 4.0]);
        let cos = Tensor::from_vec(vec![2, 1], vec![1.0f32, 0.0]);
        let sin = Tensor::from_vec(vec![2, 1], vec![0.0f32, 1.0]);
        let pos = c64(&[1, 1], vec![1]);
        let attrs = Attrs::new().with("rotary_embedding_dim", Attr::Int(2));
        let ins = [Some(&x), Some(&cos), Some(&sin), Some(&pos)];
        let y = ops::eval(OpKind::RotaryEmbedding, &attrs, &ins)
            .unwrap()
            .remove(0);
        // cos 0, sin 1: (x1, x2) -> (-x2, x1).
        assert_eq!(y.to_f64s(), vec![-2.0, 1.0, 3.0, 4.0]);
        let bad = c64(&[1, 1], vec![2]);
        let ins = [Some(&x), Some(&cos), Some(&sin), Some(&bad)];
        assert!(ops::eval(OpKind::RotaryEmbedding, &attrs, &ins).is_err());
    }

    #[test]
    fn inv_std_and_inv_rms_are_the_norms_row_divisors() {
        let x = Tensor::from_vec(vec![2, 2], vec![1.0f32, 3.0, -2.0, 2.0]);
        let eps = Tensor::scalar(0.0f32);
        let s = run(OpKind::InvStd, Attrs::new(), &[&x, &eps]);
        assert_eq!(s.shape(), &[2, 1]);
        // rows: mean 2, var 1; mean 0, var 4
        assert_close(&s, &Tensor::from_vec(vec![2, 1], vec![1.0f32, 0.5]), 1e-6);
        let r = run(OpKind::InvRms, Attrs::new(), &[&x, &eps]);
        // rows: mean square 5; 4
        let want = vec![1.0 / 5f32.sqrt(), 0.5];
        assert_close(&r, &Tensor::from_vec(vec![2, 1], want), 1e-6);
        let facts = [Some(Fact::of(crate::TensorType::new(
            DType::F32,
            Shape::new(vec![Dim::Sym("S".into()), Dim::Fixed(8)]),
        )))];
        let e = Fact::of(crate::TensorType::new(DType::F32, Shape::fixed(&[])));
        let ins = [facts[0].as_ref(), Some(&e)];
        let f = ops::infer(OpKind::InvStd, &Attrs::new(), &ins).unwrap();
        assert_eq!(
            f[0].ty.shape,
            Shape::new(vec![Dim::Sym("S".into()), Dim::Fixed(1)])
        );
        let bad = Tensor::from_vec(vec![1], vec![0.0f32]);
        assert!(ops::eval(OpKind::InvStd, &Attrs::new(), &[Some(&x), Some(&bad)]).is_err());
    }
}
