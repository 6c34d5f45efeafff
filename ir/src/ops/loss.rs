//! The loss op family: ONNX's training losses over class scores `[N, C, d1, ...]` and
//! integer targets `[N, d1, ...]`. Shape rules and reference semantics side by side.
//!
//! - `negative_log_likelihood_loss(x, target, weight?)`: `loss[n, d] = -x[n, t, d] · w[t]`
//!   with `t = target[n, d]`, and `0` where `t == ignore_index`.
//! - `softmax_cross_entropy_loss(scores, labels, weight?)`: the same loss over
//!   `log_prob = log_softmax(scores, axis 1)`, which is its optional second output.
//!
//! `reduction` is `none` (the per-element loss, shaped like the target), `sum`, or `mean`
//! (default): the sum divided by the sum of the applied weights (`w[t]`, or 1 without
//! `weight`; ignored elements weigh 0), so a mean over nothing but ignored elements is
//! `0/0 = NaN`. Everything computes in f64 and rounds to the input's dtype once.

use super::movement::checked_numel;
use super::shared::{fact, from_f64s};
use super::{arg, not_in_family, opt_arg, Fact};
use crate::{Attrs, Dim, OpKind, Shape, Tensor};

/// Shape rule of the loss ops: the loss (target-shaped or a scalar) and, for
/// `softmax_cross_entropy_loss`, `log_prob` shaped like the scores.
pub fn infer(op: OpKind, attrs: &Attrs, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>, String> {
    if !matches!(
        op,
        OpKind::NegativeLogLikelihoodLoss | OpKind::SoftmaxCrossEntropyLoss
    ) {
        return Err(not_in_family(op));
    }
    let reduce = reduction(attrs)?;
    let (x, t) = (arg(inputs, 0)?, arg(inputs, 1)?);
    if !x.ty.dtype.is_float() {
        return Err(format!(
            "`{}` needs float scores, got {}",
            op.name(),
            x.ty.dtype
        ));
    }
    if !t.ty.dtype.is_int() {
        return Err(format!(
            "`{}` needs integer targets, got {}",
            op.name(),
            t.ty.dtype
        ));
    }
    let target_shape = match x.ty.shape.dims() {
        Some(d) if d.len() < 2 => {
            return Err(format!(
                "`{}` needs scores of rank >= 2, got {}",
                op.name(),
                d.len()
            ))
        }
        Some(d) => {
            let mut s: Vec<Dim> = vec![d[0].clone()];
            s.extend_from_slice(&d[2..]);
            if let Some(td) = t.ty.shape.dims() {
                if td.len() != s.len() {
                    return Err(format!(
                        "target rank {} does not fit scores of rank {}",
                        td.len(),
                        d.len()
                    ));
                }
                s = td
                    .iter()
                    .zip(&s)
                    .map(|(a, b)| super::movement::unify(a, b))
                    .collect::<Result<_, _>>()?;
            }
            Shape::new(s)
        }
        None => t.ty.shape.clone(),
    };
    let loss = match reduce {
        Reduction::None => target_shape,
        _ => Shape::new(vec![]),
    };
    let mut out = vec![fact(x.ty.dtype, loss)];
    if op == OpKind::SoftmaxCrossEntropyLoss {
        out.push(fact(x.ty.dtype, x.ty.shape.clone()));
    }
    Ok(out)
}

/// Reference semantics of the loss ops.
pub fn eval(op: OpKind, attrs: &Attrs, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
    let x = arg(inputs, 0)?;
    let dt = x.dtype();
    if !dt.is_float() {
        return Err(format!("`{}` needs float scores, got {dt}", op.name()));
    }
    let xs = x.shape();
    if xs.len() < 2 {
        return Err(format!(
            "`{}` needs scores of rank >= 2, got {xs:?}",
            op.name()
        ));
    }
    let (n, c) = (xs[0], xs[1]);
    checked_numel(xs)?;
    // The target's element count, checked on its own: a zero class count empties `x`.
    let mut tshape = vec![n];
    tshape.extend_from_slice(&xs[2..]);
    checked_numel(&tshape)?;
    let d: usize = xs[2..].iter().product();
    let v = x.to_f64s();
    match op {
        OpKind::NegativeLogLikelihoodLoss => Ok(vec![nll(attrs, inputs, &v, (n, c, d))?]),
        OpKind::SoftmaxCrossEntropyLoss => {
            // log_softmax along axis 1, max-shifted.
            let mut lp = v;
            for ni in 0..n {
                for di in 0..d {
                    let at = |ci: usize| (ni * c + ci) * d + di;
                    let mx = (0..c)
                        .map(|ci| lp[at(ci)])
                        .fold(f64::NEG_INFINITY, f64::max);
                    let sum: f64 = (0..c).map(|ci| (lp[at(ci)] - mx).exp()).sum();
                    let lse = mx + sum.ln();
                    for ci in 0..c {
                        lp[at(ci)] -= lse;
                    }
                }
            }
            let loss = nll(attrs, inputs, &lp, (n, c, d))?;
            Ok(vec![loss, from_f64s(dt, xs.to_vec(), lp)?])
        }
        _ => Err(not_in_family(op)),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Reduction {
    None,
    Sum,
    Mean,
}

fn reduction(attrs: &Attrs) -> Result<Reduction, String> {
    match attrs.string_or("reduction", "mean".into())?.as_str() {
        "none" => Ok(Reduction::None),
        "sum" => Ok(Reduction::Sum),
        "mean" => Ok(Reduction::Mean),
        other => Err(format!("unknown loss reduction `{other}`")),
    }
}

/// The weighted negative log-likelihood of log-probabilities `lp` (`[N, C, D]` flattened),
/// with the target (input 1), optional class weights (input 2) and the attributes.
fn nll(
    attrs: &Attrs,
    inputs: &[Option<&Tensor>],
    lp: &[f64],
    (n, c, d): (usize, usize, usize),
) -> Result<Tensor, String> {
    let reduce = reduction(attrs)?;
    let ignore = attrs.int("ignore_index")?;
    let x = arg(inputs, 0)?;
    let t = arg(inputs, 1)?;
    if !t.dtype().is_int() {
        return Err(format!("loss targets must be integers, got {}", t.dtype()));
    }
    let mut want = vec![n];
    want.extend_from_slice(&x.shape()[2..]);
    if t.shape() != want.as_slice() {
        return Err(format!(
            "target {:?} does not fit scores {:?} (expected {want:?})",
            t.shape(),
            x.shape()
        ));
    }
    let w = match opt_arg(inputs, 2) {
        None => None,
        Some(w) if w.shape() == [c] && w.dtype().is_float() => Some(w.to_f64s()),
        Some(w) => {
            return Err(format!(
                "loss weight must be float [{c}], got {} {:?}",
                w.dtype(),
                w.shape()
            ))
        }
    };
    let tv = t.to_i64s();
    let mut loss = vec![0.0; n * d];
    let mut weight_sum = 0.0;
    for ni in 0..n {
        for di in 0..d {
            let k = tv[ni * d + di];
            if Some(k) == ignore {
                continue;
            }
            let ci = usize::try_from(k)
                .ok()
                .filter(|&ci| ci < c)
                .ok_or_else(|| format!("target {k} is out of range for {c} classes"))?;
            let wk = w.as_ref().map_or(1.0, |w| w[ci]);
            loss[ni * d + di] = -lp[(ni * c + ci) * d + di] * wk;
            weight_sum += wk;
        }
    }
    let dt = x.dtype();
    match reduce {
        Reduction::None => from_f64s(dt, want, loss),
        Reduction::Sum => from_f64s(dt, vec![], vec![loss.iter().sum()]),
        Reduction::Mean => from_f64s(dt, vec![], vec![loss.iter().sum::<f64>() / weight_sum]),
    }
}

#[cfg(test)]
mod tests {
    use crate::{ops, Attr, Attrs, OpKind, Tensor};

    fn run(op: OpKind, attrs: Attrs, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        ops::eval(op, &attrs, ins)
    }

    #[test]
    fn nll_weights_ignores_and_averages_by_applied_weight() {
        // x [N=2, C=3]; targets [2, 1]; weights [1, 2, 3].
        let x = Tensor::from_vec(vec![2, 3], vec![-1.0f32, -2.0, -3.0, -4.0, -5.0, -6.0]);
        let t = Tensor::from_vec(vec![2], vec![2i64, 1]);
        let w = Tensor::from_vec(vec![3], vec![1.0f32, 2.0, 3.0]);
        let none = Attrs::new().with("reduction", Attr::Str("none".into()));
        let out = run(
            OpKind::NegativeLogLikelihoodLoss,
            none.clone(),
            &[Some(&x), Some(&t), Some(&w)],
        )
        .unwrap();
        assert_eq!(out[0].to_f64s(), vec![9.0, 10.0]);
        // mean = (9 + 10) / (3 + 2).
        let out = run(
            OpKind::NegativeLogLikelihoodLoss,
            Attrs::new(),
            &[Some(&x), Some(&t), Some(&w)],
        )
        .unwrap();
        assert_eq!(out[0].shape(), &[] as &[usize]);
        assert!((out[0].to_f64s()[0] - 3.8).abs() < 1e-6);
        // Ignoring class 1: mean over the one remaining element, unweighted.
        let ig = Attrs::new().with("ignore_index", Attr::Int(1));
        let out = run(OpKind::NegativeLogLikelihoodLoss, ig, &[Some(&x), Some(&t)]).unwrap();
        assert_eq!(out[0].to_f64s(), vec![3.0]);
        // An out-of-range target is an error.
        let bad = Tensor::from_vec(vec![2], vec![3i64, 0]);
        assert!(run(
            OpKind::NegativeLogLikelihoodLoss,
            none,
            &[Some(&x), Some(&bad)]
        )
        .is_err());
    }

    #[test]
    fn softmax_cross_entropy_of_equal_scores_is_log_c() {
        let x = Tensor::from_vec(vec![1, 4, 1], vec![0.5f32; 4]);
        let t = Tensor::from_vec(vec![1, 1], vec![3i64]);
        let sum = Attrs::new().with("reduction", Attr::Str("sum".into()));
        let out = run(OpKind::SoftmaxCrossEntropyLoss, sum, &[Some(&x), Some(&t)]).unwrap();
        assert!((out[0].to_f64s()[0] - 4f64.ln()).abs() < 1e-6);
        assert_eq!(out[1].shape(), &[1, 4, 1]);
        assert!((out[1].to_f64s()[2] + 4f64.ln()).abs() < 1e-6);
    }
}
