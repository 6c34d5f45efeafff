//! The nn op family: softmax along an axis and the normalisations (layer, rms, batch,
//! instance, group, lp, mean-variance, lrn) plus inference-mode dropout. Shape rules and
//! reference semantics side by side. Everything computes in f64 and rounds back to the
//! input's dtype once, so f16/bf16 inputs get f32-or-better intermediate precision.

use super::shared::{fact, from_f64s, split_axis, Bc};
use super::{arg, norm_axis, not_in_family, opt_arg, Fact};
use crate::{Attr, Attrs, DType, Dim, OpKind, Shape, Tensor, TensorData};

/// Shape rule of the nn ops.
pub fn infer(op: OpKind, attrs: &Attrs, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>, String> {
    let x = arg(inputs, 0)?;
    let same = || fact(x.ty.dtype, x.ty.shape.clone());
    Ok(match op {
        OpKind::LayerNorm => {
            let stats = match x.ty.shape.dims() {
                None => Shape::unknown(),
                Some(d) => {
                    let axis = norm_axis(attrs.int_or("axis", -1)?, d.len())?;
                    let mut s = d[..axis].to_vec();
                    s.resize(d.len(), Dim::Fixed(1));
                    Shape::new(s)
                }
            };
            let st = stash_dtype(attrs, x.ty.dtype)?;
            vec![same(), fact(st, stats.clone()), fact(st, stats)]
        }
        OpKind::BatchNorm => {
            let c = match x.ty.shape.dims() {
                Some(d) if d.len() >= 2 => d[1].clone(),
                _ => Dim::Unknown,
            };
            let cs = Shape::new(vec![c]);
            vec![same(), fact(x.ty.dtype, cs.clone()), fact(x.ty.dtype, cs)]
        }
        OpKind::Dropout => vec![same(), fact(DType::Bool, x.ty.shape.clone())],
        OpKind::Softmax
        | OpKind::LogSoftmax
        | OpKind::Hardmax
        | OpKind::RmsNorm
        | OpKind::InstanceNorm
        | OpKind::LpNorm
        | OpKind::MeanVarianceNorm => vec![same()],
        // Required attributes are checked here, so the verifier rejects a node without
        // them when the model loads (not the interpreter when it runs).
        OpKind::GroupNorm => {
            attrs.req_int("num_groups")?;
            vec![same()]
        }
        OpKind::Lrn => {
            attrs.req_int("size")?;
            vec![same()]
        }
        _ => return Err(not_in_family(op)),
    })
}

/// The dtype of layer_norm's mean and inv_std_dev outputs (`stash_type`, default f32).
fn stash_dtype(attrs: &Attrs, x: DType) -> Result<DType, String> {
    Ok(match attrs.get("stash_type") {
        None => DType::F32,
        Some(Attr::Int(c)) => DType::from_onnx_code(*c as i32).unwrap_or(x),
        Some(Attr::Str(s)) => s.parse()?,
        Some(other) => return Err(format!("attribute `stash_type` is {}", other.kind())),
    })
}

/// Reference semantics of the nn ops.
pub fn eval(op: OpKind, attrs: &Attrs, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
    let x = arg(inputs, 0)?;
    let dt = x.dtype();
    if !dt.is_float() && op != OpKind::Dropout {
        return Err(format!("`{}` needs a float input, got {dt}", op.name()));
    }
    let shape = x.shape().to_vec();
    let v = x.to_f64s();
    let eps = attrs.float_or("epsilon", 1e-5)? as f64;
    let one =
        |v: Vec<f64>| -> Result<Vec<Tensor>, String> { Ok(vec![from_f64s(dt, shape.clone(), v)?]) };
    match op {
        OpKind::Softmax | OpKind::LogSoftmax | OpKind::Hardmax => {
            let axis = norm_axis(attrs.int_or("axis", -1)?, shape.len())?;
            one(softmax(op, &v, &shape, axis))
        }
        OpKind::LayerNorm | OpKind::RmsNorm => {
            let axis = norm_axis(attrs.int_or("axis", -1)?, shape.len())?;
            let scale = arg(inputs, 1)?;
            let bias = opt_arg(inputs, 2).filter(|_| op == OpKind::LayerNorm);
            let outer: usize = shape[..axis].iter().product();
            let n: usize = shape[axis..].iter().product();
            let mut y = vec![0.0; v.len()];
            let (mut means, mut invs) = (Vec::with_capacity(outer), Vec::with_capacity(outer));
            for r in 0..outer {
                let row = &v[r * n..(r + 1) * n];
                let mean = if op == OpKind::LayerNorm {
                    row.iter().sum::<f64>() / n as f64
                } else {
                    0.0
                };
                let var = row.iter().map(|a| (a - mean) * (a - mean)).sum::<f64>() / n as f64;
                let inv = 1.0 / (var + eps).sqrt();
                for (o, a) in y[r * n..(r + 1) * n].iter_mut().zip(row) {
                    *o = (a - mean) * inv;
                }
                means.push(mean);
                invs.push(inv);
            }
            affine(&mut y, &shape, scale, bias)?;
            let mut out = vec![from_f64s(dt, shape.clone(), y)?];
            if op == OpKind::LayerNorm {
                let mut ss = shape[..axis].to_vec();
                ss.resize(shape.len(), 1);
                let st = stash_dtype(attrs, dt)?;
                out.push(from_f64s(st, ss.clone(), means)?);
                out.push(from_f64s(st, ss, invs)?);
            }
            Ok(out)
        }
        OpKind::BatchNorm => batch_norm(attrs, x, &v, inputs, eps),
        OpKind::InstanceNorm | OpKind::GroupNorm => {
            if shape.len() < 2 {
                return Err("input must have a channel axis".into());
            }
            let (n, c) = (shape[0], shape[1]);
            let groups = if op == OpKind::GroupNorm {
                let g = attrs.req_int("num_groups")?;
                usize::try_from(g)
                    .ok()
                    .filter(|&g| g > 0 && c % g == 0)
                    .ok_or_else(|| format!("num_groups {g} does not divide {c} channels"))?
            } else {
                c
            };
            let sp: usize = shape[2..].iter().product();
            let scale = per_channel(arg(inputs, 1)?, c, "scale")?;
            let bias = per_channel(arg(inputs, 2)?, c, "bias")?;
            let len = (c / groups.max(1)) * sp;
            let mut y = vec![0.0; v.len()];
            for gi in 0..n * groups {
                let row = &v[gi * len..(gi + 1) * len];
                let mean = row.iter().sum::<f64>() / len as f64;
                let var = row.iter().map(|a| (a - mean) * (a - mean)).sum::<f64>() / len as f64;
                let inv = 1.0 / (var + eps).sqrt();
                for (j, (o, a)) in y[gi * len..(gi + 1) * len].iter_mut().zip(row).enumerate() {
                    let ch = ((gi * len + j) / sp.max(1)) % c;
                    *o = (a - mean) * inv * scale[ch] + bias[ch];
                }
            }
            one(y)
        }
        OpKind::LpNorm => {
            let axis = norm_axis(attrs.int_or("axis", -1)?, shape.len())?;
            let p = attrs.int_or("p", 2)?;
            if p != 1 && p != 2 {
                return Err(format!("lp_norm p must be 1 or 2, got {p}"));
            }
            let (outer, len, inner) = split_axis(&shape, axis);
            let mut y = v.clone();
            for o in 0..outer {
                for i in 0..inner {
                    let idx = |j: usize| (o * len + j) * inner + i;
                    let norm = if p == 1 {
                        (0..len).map(|j| v[idx(j)].abs()).sum::<f64>()
                    } else {
                        (0..len).map(|j| v[idx(j)] * v[idx(j)]).sum::<f64>().sqrt()
                    };
                    // A zero vector stays zero (onnx reference), rather than 0/0.
                    for j in 0..len {
                        y[idx(j)] = if norm == 0.0 { 0.0 } else { v[idx(j)] / norm };
                    }
                }
            }
            one(y)
        }
        OpKind::MeanVarianceNorm => {
            let axes = attrs.ints_or("axes", vec![0, 2, 3])?;
            let axes: Vec<usize> = axes
                .iter()
                .map(|&a| norm_axis(a, shape.len()))
                .collect::<Result<_, _>>()?;
            let kept: Vec<usize> = (0..shape.len())
                .map(|i| if axes.contains(&i) { 1 } else { shape[i] })
                .collect();
            let slot = super::shared::bcast_offsets(&shape, &kept);
            let m: usize = kept.iter().product();
            let count: usize = axes.iter().map(|&a| shape[a]).product();
            let (mut s1, mut s2) = (vec![0.0; m], vec![0.0; m]);
            for (&a, &s) in v.iter().zip(&slot) {
                s1[s] += a;
                s2[s] += a * a;
            }
            let y = v
                .iter()
                .zip(&slot)
                .map(|(&a, &s)| {
                    let mean = s1[s] / count as f64;
                    let var = s2[s] / count as f64 - mean * mean;
                    (a - mean) / (var.max(0.0).sqrt() + 1e-9)
                })
                .collect();
            one(y)
        }
        OpKind::Lrn => {
            if shape.len() < 3 {
                return Err("lrn needs an (N, C, ...) input".into());
            }
            let size = attrs.req_int("size")?;
            if size < 1 {
                return Err(format!("lrn size must be positive, got {size}"));
            }
            let size = size as usize;
            let alpha = attrs.float_or("alpha", 1e-4)? as f64;
            let beta = attrs.float_or("beta", 0.75)? as f64;
            let bias = attrs.float_or("bias", 1.0)? as f64;
            let (n, c) = (shape[0], shape[1]);
            let sp: usize = shape[2..].iter().product();
            let (lo, hi) = ((size - 1) / 2, (size - 1).div_ceil(2));
            let mut y = vec![0.0; v.len()];
            for b in 0..n {
                for ch in 0..c {
                    let (c0, c1) = (ch.saturating_sub(lo), (ch + hi).min(c - 1));
                    for s in 0..sp {
                        let at = |k: usize| v[(b * c + k) * sp + s];
                        let sq: f64 = (c0..=c1).map(|k| at(k) * at(k)).sum();
                        y[(b * c + ch) * sp + s] =
                            at(ch) / (bias + alpha / size as f64 * sq).powf(beta);
                    }
                }
            }
            one(y)
        }
        OpKind::Dropout => {
            let training = opt_arg(inputs, 2)
                .map(|t| t.to_i64s().first().copied().unwrap_or(0) != 0)
                .unwrap_or(false);
            let ratio = opt_arg(inputs, 1)
                .map(|t| t.to_f64s().first().copied().unwrap_or(0.5))
                .unwrap_or(0.5);
            if training && ratio != 0.0 {
                return Err("training-mode dropout is random; the reference runs inference".into());
            }
            let mask = Tensor::new(shape.clone(), TensorData::Bool(vec![true; x.len()].into()))?;
            Ok(vec![x.clone(), mask])
        }
        _ => Err(not_in_family(op)),
    }
}

/// `y = y * scale + bias`, with scale and bias broadcast to the data's shape.
fn affine(
    y: &mut [f64],
    shape: &[usize],
    scale: &Tensor,
    bias: Option<&Tensor>,
) -> Result<(), String> {
    let check = |t: &Tensor| {
        if crate::shape::broadcast_concrete(t.shape(), shape).as_deref() != Some(shape) {
            return Err(format!("{:?} does not broadcast to {shape:?}", t.shape()));
        }
        Ok(())
    };
    check(scale)?;
    let sv = scale.to_f64s();
    let s = Bc::new(&sv, scale.shape(), shape);
    for (i, o) in y.iter_mut().enumerate() {
        *o *= s.get(i);
    }
    if let Some(b) = bias {
        check(b)?;
        let bv = b.to_f64s();
        let bb = Bc::new(&bv, b.shape(), shape);
        for (i, o) in y.iter_mut().enumerate() {
            *o += bb.get(i);
        }
    }
    Ok(())
}

fn per_channel(t: &Tensor, c: usize, what: &str) -> Result<Vec<f64>, String> {
    if t.len() != c {
        return Err(format!("{what} has {} elements, expected {c}", t.len()));
    }
    Ok(t.to_f64s())
}

fn softmax(op: OpKind, v: &[f64], shape: &[usize], axis: usize) -> Vec<f64> {
    let (outer, len, inner) = split_axis(shape, axis);
    let mut y = vec![0.0; v.len()];
    for o in 0..outer {
        for i in 0..inner {
            let idx = |j: usize| (o * len + j) * inner + i;
            let mut mx = f64::NEG_INFINITY;
            let mut arg = 0;
            for j in 0..len {
                if v[idx(j)] > mx {
                    mx = v[idx(j)];
                    arg = j;
                }
            }
            match op {
                OpKind::Hardmax => {
                    if len > 0 {
                        y[idx(arg)] = 1.0;
                    }
                }
                _ => {
                    let shift = if mx.is_finite() { mx } else { 0.0 };
                    let sum: f64 = (0..len).map(|j| (v[idx(j)] - shift).exp()).sum();
                    for j in 0..len {
                        let e = v[idx(j)] - shift;
                        y[idx(j)] = if op == OpKind::LogSoftmax {
                            e - sum.ln()
                        } else {
                            e.exp() / sum
                        };
                    }
                }
            }
        }
    }
    y
}

fn batch_norm(
    attrs: &Attrs,
    x: &Tensor,
    v: &[f64],
    inputs: &[Option<&Tensor>],
    eps: f64,
) -> Result<Vec<Tensor>, String> {
    let shape = x.shape();
    if shape.len() < 2 {
        return Err("batch_norm needs an (N, C, ...) input".into());
    }
    let (n, c) = (shape[0], shape[1]);
    let sp: usize = shape[2..].iter().product();
    let scale = per_channel(arg(inputs, 1)?, c, "scale")?;
    let bias = per_channel(arg(inputs, 2)?, c, "bias")?;
    let mut mean = per_channel(arg(inputs, 3)?, c, "mean")?;
    let mut var = per_channel(arg(inputs, 4)?, c, "var")?;
    let training = attrs.int_or("training_mode", 0)? != 0;
    let (mut run_mean, mut run_var) = (mean.clone(), var.clone());
    if training {
        let momentum = attrs.float_or("momentum", 0.9)? as f64;
        let cnt = (n * sp) as f64;
        for ch in 0..c {
            let vals = (0..n).flat_map(|b| v[(b * c + ch) * sp..(b * c + ch + 1) * sp].iter());
            let m = vals.clone().sum::<f64>() / cnt;
            let var_b = vals.map(|a| (a - m) * (a - m)).sum::<f64>() / cnt;
            run_mean[ch] = mean[ch] * momentum + m * (1.0 - momentum);
            run_var[ch] = var[ch] * momentum + var_b * (1.0 - momentum);
            mean[ch] = m;
            var[ch] = var_b;
        }
    }
    let y: Vec<f64> = v
        .iter()
        .enumerate()
        .map(|(i, &a)| {
            let ch = (i / sp.max(1)) % c;
            scale[ch] * (a - mean[ch]) / (var[ch] + eps).sqrt() + bias[ch]
        })
        .collect();
    let dt = x.dtype();
    Ok(vec![
        from_f64s(dt, shape.to_vec(), y)?,
        from_f64s(dt, vec![c], run_mean)?,
        from_f64s(dt, vec![c], run_var)?,
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TensorType;

    fn t32(shape: &[usize], v: Vec<f32>) -> Tensor {
        Tensor::from_vec(shape.to_vec(), v)
    }
    fn close(a: &Tensor, b: &[f32]) {
        let a = a.as_slice::<f32>().unwrap();
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{a:?} vs {b:?}");
        }
    }
    fn x() -> Tensor {
        t32(&[2, 3], vec![1.0, 2.0, 3.0, -1.0, 0.0, 4.0])
    }

    #[test]
    fn softmax_family_along_last_axis() {
        let r = eval(OpKind::Softmax, &Attrs::new(), &[Some(&x())]).unwrap();
        // scipy.special.softmax(x, axis=-1)
        close(
            &r[0],
            &[
                0.090_030_57,
                0.244_728_47,
                0.665_240_96,
                0.006_573_26,
                0.017_867_98,
                0.975_558_75,
            ],
        );
        let r = eval(OpKind::LogSoftmax, &Attrs::new(), &[Some(&x())]).unwrap();
        close(
            &r[0],
            &[
                -2.407_606,
                -1.407_606,
                -0.407_606,
                -5.024_745,
                -4.024_745,
                -0.024_744_89,
            ],
        );
        let a0 = Attrs::new().with("axis", Attr::Int(0));
        let r = eval(OpKind::Hardmax, &a0, &[Some(&x())]).unwrap();
        close(&r[0], &[1.0, 1.0, 0.0, 0.0, 0.0, 1.0]);
    }

    #[test]
    fn layer_norm_gives_mean_and_inv_std() {
        let scale = t32(&[3], vec![1.0, 2.0, 0.5]);
        let bias = t32(&[3], vec![0.0, 1.0, 0.0]);
        let r = eval(
            OpKind::LayerNorm,
            &Attrs::new(),
            &[Some(&x()), Some(&scale), Some(&bias)],
        )
        .unwrap();
        assert_eq!(r.len(), 3);
        // numpy: (x - m) / sqrt(v + 1e-5) * scale + bias
        close(
            &r[0],
            &[
                -1.224_735_7,
                1.0,
                0.612_367_84,
                -0.925_819_1,
                0.074_180_89,
                0.694_364_3,
            ],
        );
        assert_eq!(r[1].shape(), &[2, 1]);
        close(&r[1], &[2.0, 1.0]);
        close(&r[2], &[1.224_735_7, 0.462_909_55]);
    }

    #[test]
    fn rms_norm_scales_by_root_mean_square() {
        let scale = t32(&[3], vec![1.0, 1.0, 2.0]);
        let r = eval(OpKind::RmsNorm, &Attrs::new(), &[Some(&x()), Some(&scale)]).unwrap();
        // x / sqrt(mean(x^2) + 1e-5) * scale
        close(
            &r[0],
            &[
                0.462_909_55,
                0.925_819_1,
                2.777_457_3,
                -0.420_083_65,
                0.0,
                3.360_669_2,
            ],
        );
    }

    #[test]
    fn batch_norm_inference_uses_running_stats() {
        let x = t32(&[1, 2, 2], vec![1.0, 2.0, 3.0, 4.0]);
        let ones = t32(&[2], vec![1.0, 2.0]);
        let zeros = t32(&[2], vec![0.0, 1.0]);
        let mean = t32(&[2], vec![1.5, 3.0]);
        let var = t32(&[2], vec![0.25, 1.0]);
        let a = Attrs::new().with("epsilon", Attr::Float(0.0));
        let r = eval(
            OpKind::BatchNorm,
            &a,
            &[Some(&x), Some(&ones), Some(&zeros), Some(&mean), Some(&var)],
        )
        .unwrap();
        close(&r[0], &[-1.0, 1.0, 1.0, 3.0]);
    }

    #[test]
    fn group_and_instance_norm_normalise_per_group() {
        let x = t32(&[1, 4, 1], vec![1.0, 3.0, 10.0, 14.0]);
        let s = t32(&[4], vec![1.0, 1.0, 1.0, 2.0]);
        let b = t32(&[4], vec![0.0; 4]);
        let a = Attrs::new()
            .with("num_groups", Attr::Int(2))
            .with("epsilon", Attr::Float(0.0));
        let r = eval(OpKind::GroupNorm, &a, &[Some(&x), Some(&s), Some(&b)]).unwrap();
        close(&r[0], &[-1.0, 1.0, -1.0, 2.0]);
        let x = t32(&[1, 1, 2], vec![1.0, 3.0]);
        let one = t32(&[1], vec![1.0]);
        let zero = t32(&[1], vec![0.5]);
        let a = Attrs::new().with("epsilon", Attr::Float(0.0));
        let r = eval(
            OpKind::InstanceNorm,
            &a,
            &[Some(&x), Some(&one), Some(&zero)],
        )
        .unwrap();
        close(&r[0], &[-0.5, 1.5]);
    }

    #[test]
    fn dropout_inference_is_identity_with_true_mask() {
        let r = eval(OpKind::Dropout, &Attrs::new(), &[Some(&x())]).unwrap();
        assert_eq!(r[0], x());
        assert_eq!(r[1].as_slice::<bool>().unwrap(), &[true; 6]);
    }

    #[test]
    fn infer_layer_norm_stats_shape() {
        let f = Fact::of(TensorType::new(
            DType::F32,
            Shape::new(vec!["B".into(), "S".into(), Dim::Fixed(768)]),
        ));
        let r = infer(OpKind::LayerNorm, &Attrs::new(), &[Some(&f)]).unwrap();
        assert_eq!(r[0].ty.shape.to_string(), "[B, S, 768]");
        assert_eq!(r[1].ty.shape.to_string(), "[B, S, 1]");
    }
}
