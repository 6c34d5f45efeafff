//! How far an approximate graph's outputs are from the exact ones: relative L2 (the
//! default), max relative error, or top-1 disagreement on logits-like outputs. A NaN or
//! infinity that the exact output does not have is an infinite error: it never passes.

use kiln_ir::Tensor;
use std::fmt;

/// An error metric over a graph's outputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Metric {
    /// `‖a − b‖₂ / ‖b‖₂`, worst output.
    #[default]
    RelL2,
    /// `max |a − b| / max |b|`, worst output.
    MaxRel,
    /// The fraction of rows whose arg-max differs, over outputs named like logits.
    Top1,
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Metric::RelL2 => "rel-l2",
            Metric::MaxRel => "max-rel",
            Metric::Top1 => "top1",
        })
    }
}

impl std::str::FromStr for Metric {
    type Err = String;
    fn from_str(s: &str) -> Result<Metric, String> {
        Ok(match s {
            "rel-l2" => Metric::RelL2,
            "max-rel" => Metric::MaxRel,
            "top1" => Metric::Top1,
            _ => return Err(format!("unknown metric `{s}` (rel-l2, max-rel, top1)")),
        })
    }
}

/// Whether an output is logits-like (what `top1` compares): named `*logit*`, rank >= 1,
/// last dim >= 2.
pub fn logits_like(name: &str, t: &Tensor) -> bool {
    name.to_lowercase().contains("logit") && t.shape().last().is_some_and(|&d| d >= 2)
}

/// The error of outputs `got` against `want` (same order; `names` the output names).
/// Integer and bool outputs must match exactly (else infinite error).
pub fn measure(
    metric: Metric,
    got: &[Tensor],
    want: &[Tensor],
    names: &[String],
) -> Result<f64, String> {
    let mut worst = 0.0f64;
    let mut any_logits = false;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if g.shape() != w.shape() {
            return Ok(f64::INFINITY);
        }
        if !w.dtype().is_float() {
            if g.to_i64s() != w.to_i64s() {
                return Ok(f64::INFINITY);
            }
            continue;
        }
        let (a, b) = (g.to_f64s(), w.to_f64s());
        let name = names.get(i).map_or("", String::as_str);
        let e = match metric {
            Metric::RelL2 => rel_l2(&a, &b),
            Metric::MaxRel => max_rel(&a, &b),
            Metric::Top1 => {
                if !logits_like(name, w) {
                    continue;
                }
                any_logits = true;
                top1(&a, &b, *w.shape().last().unwrap_or(&1))
            }
        };
        worst = if e.is_nan() {
            f64::INFINITY
        } else {
            worst.max(e)
        };
    }
    if metric == Metric::Top1 && !any_logits {
        return Err("no output is logits-like (a float output named *logit* with a last dim >= 2); use rel-l2 or max-rel".into());
    }
    Ok(worst)
}

/// Non-finite values where the reference is finite (or a differing non-finite value).
fn non_finite_mismatch(a: f64, b: f64) -> bool {
    if a.is_finite() && b.is_finite() {
        return false;
    }
    !(a.is_nan() && b.is_nan() || a == b)
}

fn rel_l2(a: &[f64], b: &[f64]) -> f64 {
    let (mut num, mut den) = (0.0, 0.0);
    for (&x, &y) in a.iter().zip(b) {
        if non_finite_mismatch(x, y) {
            return f64::INFINITY;
        }
        if !y.is_finite() {
            continue;
        }
        num += (x - y) * (x - y);
        den += y * y;
    }
    ratio(num.sqrt(), den.sqrt())
}

fn max_rel(a: &[f64], b: &[f64]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        if non_finite_mismatch(x, y) {
            return f64::INFINITY;
        }
        if !y.is_finite() {
            continue;
        }
        num = num.max((x - y).abs());
        den = den.max(y.abs());
    }
    ratio(num, den)
}

fn ratio(num: f64, den: f64) -> f64 {
    if num == 0.0 {
        0.0
    } else if den == 0.0 {
        f64::INFINITY
    } else {
        num / den
    }
}

/// The fraction of rows (of `last` values) whose arg-max differs.
fn top1(a: &[f64], b: &[f64], last: usize) -> f64 {
    let argmax = |r: &[f64]| {
        r.iter()
            .enumerate()
            .fold((0, f64::NEG_INFINITY), |(bi, bv), (i, &v)| {
                if v > bv || v.is_nan() {
                    (i, if v.is_nan() { f64::INFINITY } else { v })
                } else {
                    (bi, bv)
                }
            })
            .0
    };
    let rows = a.len() / last.max(1);
    if rows == 0 {
        return 0.0;
    }
    if a.iter().any(|x| x.is_nan()) && !b.iter().any(|x| x.is_nan()) {
        return f64::INFINITY;
    }
    let differ = a
        .chunks(last)
        .zip(b.chunks(last))
        .filter(|(x, y)| argmax(x) != argmax(y))
        .count();
    differ as f64 / rows as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: Vec<f32>) -> Tensor {
        let n = v.len();
        Tensor::from_vec(vec![1, n], v)
    }

    #[test]
    fn rel_l2_max_rel_and_top1_measure_what_they_say() {
        let names = vec!["logits".to_string()];
        let want = [t(vec![3.0, 4.0])];
        let got = [t(vec![3.0, 4.5])];
        let e = measure(Metric::RelL2, &got, &want, &names).unwrap();
        assert!((e - 0.1).abs() < 1e-12, "{e}");
        let e = measure(Metric::MaxRel, &got, &want, &names).unwrap();
        assert!((e - 0.125).abs() < 1e-12, "{e}");
        assert_eq!(measure(Metric::Top1, &got, &want, &names).unwrap(), 0.0);
        let flipped = [t(vec![5.0, 4.0])];
        assert_eq!(measure(Metric::Top1, &flipped, &want, &names).unwrap(), 1.0);
    }

    #[test]
    fn a_nan_never_passes_and_top1_needs_logits() {
        let names = vec!["y".to_string()];
        let want = [t(vec![1.0, 2.0])];
        let got = [t(vec![f32::NAN, 2.0])];
        for m in [Metric::RelL2, Metric::MaxRel] {
            assert_eq!(measure(m, &got, &want, &names).unwrap(), f64::INFINITY);
        }
        assert!(measure(Metric::Top1, &want, &want, &names).is_err());
        assert_eq!(measure(Metric::RelL2, &want, &want, &names).unwrap(), 0.0);
    }
}
