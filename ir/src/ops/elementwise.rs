//! The elementwise op family: unary math and activations, casts, clip, and the binary and
//! variadic ops with numpy broadcasting. Shape rules and reference semantics side by side;
//! every binary op runs through the one broadcasting loop in `shared::zip2`.
// `dispatch!` instantiates the generic comparisons at `bool` too, where clippy would
// rewrite `a < b` as bit logic; the generic form is the point.
#![allow(clippy::bool_comparison)]

use super::shared::{self, fact, map_f64, test_f64, zip2, Bc, Num};
use super::{arg, not_in_family, opt_arg, Fact};
use crate::{Attrs, DType, Dim, Elem, OpKind, Tensor, TensorData};

/// Shape rule of the elementwise ops.
pub fn infer(op: OpKind, attrs: &Attrs, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>, String> {
    use OpKind::*;
    let x = arg(inputs, 0)?;
    let xty = &x.ty;
    let out = match op {
        Identity => x.clone(),
        IsNaN | IsInf => fact(DType::Bool, xty.shape.clone()),
        Cast => {
            let to = cast_target(attrs)?;
            let mut f = fact(to, xty.shape.clone());
            if to.is_int() && xty.dtype.is_int() {
                f.dims = x.dims.clone();
            }
            f
        }
        CastLike => fact(arg(inputs, 1)?.ty.dtype, xty.shape.clone()),
        Clip => fact(xty.dtype, xty.shape.clone()),
        _ if is_unary(op) => fact(xty.dtype, xty.shape.clone()),
        _ => {
            let mut shape = xty.shape.clone();
            for f in inputs.iter().skip(1).flatten() {
                shape = crate::shape::broadcast(&shape, &f.ty.shape)?;
            }
            let dtype = match op {
                Equal | Less | LessOrEqual | Greater | GreaterOrEqual | And | Or | Xor => {
                    DType::Bool
                }
                Where => arg(inputs, 1)?.ty.dtype,
                _ => xty.dtype,
            };
            let mut f = fact(dtype, shape);
            if matches!(op, Add | Sub | Mul | Div) {
                f.dims = dims_arith(op, inputs);
            }
            f
        }
    };
    Ok(vec![out])
}

/// Symbolic contents of `a op b` for small shape tensors: exact where both are known,
/// the symbol itself where the other side is the identity (`S * 1`, `B + 0`).
fn dims_arith(op: OpKind, inputs: &[Option<&Fact>]) -> Option<Vec<Dim>> {
    let a = inputs.first().copied().flatten()?.value_dims()?;
    let b = inputs.get(1).copied().flatten()?.value_dims()?;
    let n = a.len().max(b.len());
    if !(a.len() == n || a.len() == 1) || !(b.len() == n || b.len() == 1) {
        return None;
    }
    let pick = |v: &[Dim], i: usize| v[if v.len() == 1 { 0 } else { i }].clone();
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let (x, y) = (pick(&a, i), pick(&b, i));
        out.push(match (op, &x, &y) {
            (_, Dim::Fixed(p), Dim::Fixed(q)) => match op {
                OpKind::Add => Dim::Fixed(p.checked_add(*q)?),
                OpKind::Sub if p >= q => Dim::Fixed(p - q),
                OpKind::Mul => Dim::Fixed(p.checked_mul(*q)?),
                OpKind::Div if *q != 0 => Dim::Fixed(p / q),
                _ => Dim::Unknown,
            },
            (OpKind::Add | OpKind::Sub, _, Dim::Fixed(0)) => x.clone(),
            (OpKind::Add, Dim::Fixed(0), _) => y.clone(),
            (OpKind::Mul | OpKind::Div, _, Dim::Fixed(1)) => x.clone(),
            (OpKind::Mul, Dim::Fixed(1), _) => y.clone(),
            _ => Dim::Unknown,
        });
    }
    Some(out)
}

/// The one-input ops (casts, clip and the math/activation functions).
fn is_unary(op: OpKind) -> bool {
    op.keeps_shape()
}

fn cast_target(attrs: &Attrs) -> Result<DType, String> {
    match attrs.get("to") {
        Some(crate::Attr::Str(s)) => s.parse(),
        Some(crate::Attr::Int(code)) => DType::from_onnx_code(*code as i32)
            .ok_or_else(|| format!("unsupported cast target code {code}")),
        _ => Err("missing attribute `to`".into()),
    }
}

/// Reference semantics of the elementwise ops.
pub fn eval(op: OpKind, attrs: &Attrs, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
    use OpKind::*;
    let x = arg(inputs, 0)?;
    let out = match op {
        Identity => x.clone(),
        Cast => x.cast(cast_target(attrs)?),
        CastLike => x.cast(arg(inputs, 1)?.dtype()),
        Abs | Neg | Sign | Relu if x.dtype() != DType::Bool => {
            let data = crate::dispatch!(x.data(), v, T => {
                let f: fn(T) -> T = match op {
                    Abs => |a| a.abs_(),
                    Neg => |a| a.neg(),
                    Relu => |a| if a > T::zero() { a } else { T::zero() },
                    _ => |a| {
                        if a > T::zero() { T::one() }
                        else if a < T::zero() { T::one().neg() }
                        else { a }
                    },
                };
                <T as Elem>::wrap(v.iter().map(|&a| f(a)).collect())
            });
            Tensor::new(x.shape().to_vec(), data)?
        }
        Not => {
            let v = x.as_slice::<bool>().ok_or("`not` needs a bool input")?;
            Tensor::from_vec(x.shape().to_vec(), v.iter().map(|b| !b).collect())
        }
        BitwiseNot => {
            int_only(x)?;
            let v = x.to_i64s().into_iter().map(|a| !a);
            Tensor::new(x.shape().to_vec(), TensorData::from_i64s(x.dtype(), v))?
        }
        IsNaN => test_f64(x, f64::is_nan)?,
        IsInf => {
            let neg = attrs.int_or("detect_negative", 1)? != 0;
            let pos = attrs.int_or("detect_positive", 1)? != 0;
            test_f64(x, |a| {
                a.is_infinite() && ((a > 0.0 && pos) || (a < 0.0 && neg))
            })?
        }
        Clip => clip(x, opt_arg(inputs, 1), opt_arg(inputs, 2))?,
        _ if is_unary(op) => {
            if x.dtype() == DType::Bool {
                return Err(format!("`{}` does not take bool", op.name()));
            }
            let f = unary_fn(op, attrs)?;
            map_f64(x, f)?
        }
        Add | Sub | Mul | Div | Mod | Max | Min | Sum | Mean => {
            let fmod = attrs.int_or("fmod", 0)? != 0;
            let ar = match op {
                Add | Sum | Mean => Arith::Add,
                Sub => Arith::Sub,
                Mul => Arith::Mul,
                Div => Arith::Div,
                Mod => Arith::Mod(fmod),
                Max => Arith::Max,
                _ => Arith::Min,
            };
            let mut acc = x.clone();
            let mut count = 1usize;
            for t in inputs.iter().skip(1) {
                let t = t.ok_or("missing operand")?;
                acc = arith(ar, &acc, t)?;
                count += 1;
            }
            if op == Mean {
                let n = count as f64;
                acc = map_f64(&acc, |s| s / n)?;
            }
            acc
        }
        Pow => pow(x, arg(inputs, 1)?)?,
        PRelu => {
            let s = arg(inputs, 1)?;
            same_dtype(x, s)?;
            crate::dispatch!(x.data(), v, T => {
                let sv = <T as Elem>::unwrap(s.data()).ok_or("dtype mismatch")?;
                let (sh, o) = zip2(v, x.shape(), sv, s.shape(), |a: T, b: T| {
                    Ok(if a < T::zero() { a.mul(b) } else { a })
                })?;
                Tensor::new(sh, <T as Elem>::wrap(o))?
            })
        }
        Equal | Less | LessOrEqual | Greater | GreaterOrEqual => {
            let y = arg(inputs, 1)?;
            same_dtype(x, y)?;
            crate::dispatch!(x.data(), v, T => {
                let yv = <T as Elem>::unwrap(y.data()).ok_or("dtype mismatch")?;
                let f: fn(T, T) -> bool = match op {
                    Equal => |a, b| a == b,
                    Less => |a, b| a < b,
                    LessOrEqual => |a, b| a <= b,
                    Greater => |a, b| a > b,
                    _ => |a, b| a >= b,
                };
                let (sh, o) = zip2(v, x.shape(), yv, y.shape(), |a, b| Ok(f(a, b)))?;
                Tensor::from_vec(sh, o)
            })
        }
        And | Or | Xor => {
            let y = arg(inputs, 1)?;
            let (a, b) = (
                x.as_slice::<bool>().ok_or("logical ops need bool inputs")?,
                y.as_slice::<bool>().ok_or("logical ops need bool inputs")?,
            );
            let f: fn(bool, bool) -> bool = match op {
                And => |a, b| a & b,
                Or => |a, b| a | b,
                _ => |a, b| a ^ b,
            };
            let (sh, o) = zip2(a, x.shape(), b, y.shape(), |a, b| Ok(f(a, b)))?;
            Tensor::from_vec(sh, o)
        }
        BitwiseAnd | BitwiseOr | BitwiseXor | BitShift => {
            let y = arg(inputs, 1)?;
            same_dtype(x, y)?;
            int_only(x)?;
            let bits = 8 * x.dtype().size() as u64;
            let left = attrs.string_or("direction", "LEFT".into())? == "LEFT";
            let f: Box<dyn Fn(i64, i64) -> i64> = match op {
                BitwiseAnd => Box::new(|a, b| a & b),
                BitwiseOr => Box::new(|a, b| a | b),
                BitwiseXor => Box::new(|a, b| a ^ b),
                _ => Box::new(move |a, b| {
                    let (a, b) = (a as u64, b as u64);
                    if b >= bits {
                        0
                    } else if left {
                        (a << b) as i64
                    } else {
                        (a >> b) as i64
                    }
                }),
            };
            let (sh, o) = zip2(&x.to_i64s(), x.shape(), &y.to_i64s(), y.shape(), |a, b| {
                Ok(f(a, b))
            })?;
            Tensor::new(sh, TensorData::from_i64s(x.dtype(), o.into_iter()))?
        }
        Where => {
            let (a, b) = (arg(inputs, 1)?, arg(inputs, 2)?);
            same_dtype(a, b)?;
            let c = x
                .as_slice::<bool>()
                .ok_or("`where` condition must be bool")?;
            let out = shared::broadcast_all(&[x.shape(), a.shape(), b.shape()])?;
            let n = shared::checked_numel(&out)?;
            let bc = Bc::new(c, x.shape(), &out);
            crate::dispatch!(a.data(), av, T => {
                let bv = <T as Elem>::unwrap(b.data()).ok_or("dtype mismatch")?;
                let (ba, bb) = (Bc::new(av, a.shape(), &out), Bc::new(bv, b.shape(), &out));
                let o: Vec<T> = (0..n)
                    .map(|i| if bc.get(i) { ba.get(i) } else { bb.get(i) })
                    .collect();
                Tensor::new(out, <T as Elem>::wrap(o))?
            })
        }
        _ => return Err(not_in_family(op)),
    };
    Ok(vec![out])
}

fn same_dtype(a: &Tensor, b: &Tensor) -> Result<(), String> {
    if a.dtype() != b.dtype() {
        return Err(format!(
            "operands have different dtypes {} and {}",
            a.dtype(),
            b.dtype()
        ));
    }
    Ok(())
}

fn int_only(t: &Tensor) -> Result<(), String> {
    if !t.dtype().is_int() {
        return Err(format!("needs an integer tensor, got {}", t.dtype()));
    }
    Ok(())
}

#[derive(Clone, Copy)]
enum Arith {
    Add,
    Sub,
    Mul,
    Div,
    Mod(bool),
    Max,
    Min,
}

fn arith_t<T: Num>(
    op: Arith,
    a: &[T],
    ash: &[usize],
    b: &[T],
    bsh: &[usize],
) -> Result<(Vec<usize>, Vec<T>), String> {
    match op {
        Arith::Add => zip2(a, ash, b, bsh, |x, y| Ok(x.add(y))),
        Arith::Sub => zip2(a, ash, b, bsh, |x, y| Ok(x.sub(y))),
        Arith::Mul => zip2(a, ash, b, bsh, |x, y| Ok(x.mul(y))),
        Arith::Div => zip2(a, ash, b, bsh, |x: T, y| x.div(y)),
        Arith::Mod(f) => zip2(a, ash, b, bsh, |x: T, y| x.rem(y, f)),
        Arith::Max => zip2(a, ash, b, bsh, |x: T, y| Ok(x.max_(y))),
        Arith::Min => zip2(a, ash, b, bsh, |x: T, y| Ok(x.min_(y))),
    }
}

/// The one broadcasting arithmetic loop behind add, sub, mul, div, mod, max, min, sum, mean.
fn arith(op: Arith, a: &Tensor, b: &Tensor) -> Result<Tensor, String> {
    same_dtype(a, b)?;
    if a.dtype() == DType::Bool && !matches!(op, Arith::Max | Arith::Min) {
        return Err("arithmetic on bool tensors".into());
    }
    crate::dispatch!(a.data(), av, T => {
        let bv = <T as Elem>::unwrap(b.data()).ok_or("dtype mismatch")?;
        let (sh, v) = arith_t(op, av, a.shape(), bv, b.shape())?;
        Tensor::new(sh, <T as Elem>::wrap(v))
    })
}

/// Integer power with wrapping; negative exponents truncate `1 / b^e` toward zero.
fn ipow(b: i64, e: i64) -> Result<i64, String> {
    if e < 0 {
        return match b {
            0 => Err("zero to a negative integer power".into()),
            1 => Ok(1),
            -1 => Ok(if e % 2 == 0 { 1 } else { -1 }),
            _ => Ok(0),
        };
    }
    let (mut base, mut e, mut acc) = (b, e as u64, 1i64);
    while e > 0 {
        if e & 1 == 1 {
            acc = acc.wrapping_mul(base);
        }
        base = base.wrapping_mul(base);
        e >>= 1;
    }
    Ok(acc)
}

/// `pow`: the exponent may have another dtype; the result has the base's dtype.
fn pow(x: &Tensor, y: &Tensor) -> Result<Tensor, String> {
    if x.dtype() == DType::Bool || y.dtype() == DType::Bool {
        return Err("pow does not take bool".into());
    }
    if x.dtype().is_int() && y.dtype().is_int() {
        let (sh, v) = zip2(&x.to_i64s(), x.shape(), &y.to_i64s(), y.shape(), ipow)?;
        return Tensor::new(sh, TensorData::from_i64s(x.dtype(), v.into_iter()));
    }
    let (sh, v) = zip2(&x.to_f64s(), x.shape(), &y.to_f64s(), y.shape(), |a, b| {
        Ok(a.powf(b))
    })?;
    shared::from_f64s(x.dtype(), sh, v)
}

/// `clip` with optional scalar `min` and `max` inputs, comparing in the input's dtype.
fn clip(x: &Tensor, lo: Option<&Tensor>, hi: Option<&Tensor>) -> Result<Tensor, String> {
    crate::dispatch!(x.data(), v, T => {
        let bound = |t: Option<&Tensor>| -> Result<Option<T>, String> {
            match t {
                None => Ok(None),
                Some(t) => {
                    let s = <T as Elem>::unwrap(t.data()).ok_or("clip bound has another dtype")?;
                    match s.as_slice() {
                        [b] => Ok(Some(*b)),
                        [] => Ok(None),
                        _ => Err("clip bounds must be scalars".to_string()),
                    }
                }
            }
        };
        let (lo, hi) = (bound(lo)?, bound(hi)?);
        let o: Vec<T> = v
            .iter()
            .map(|&a| {
                let a = match lo { Some(l) if a < l => l, _ => a };
                match hi { Some(h) if a > h => h, _ => a }
            })
            .collect();
        Tensor::new(x.shape().to_vec(), <T as Elem>::wrap(o))
    })
}

/// The error function, accurate to about 1e-15: a Taylor series near zero and a
/// continued fraction for erfc in the tails.
pub(crate) fn erf(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    let a = x.abs();
    let r = if a < 2.0 {
        // erf(x) = 2/sqrt(pi) * sum (-1)^n x^(2n+1) / (n! (2n+1))
        let x2 = a * a;
        let (mut term, mut sum, mut n) = (a, a, 0.0);
        loop {
            n += 1.0;
            term *= -x2 / n;
            let t = term / (2.0 * n + 1.0);
            sum += t;
            if t.abs() <= 1e-17 * sum.abs() || n > 100.0 {
                break;
            }
        }
        sum * std::f64::consts::FRAC_2_SQRT_PI
    } else if a < 6.0 {
        // erfc(x) = exp(-x^2)/sqrt(pi) / (x + (1/2)/(x + 1/(x + (3/2)/(x + ...))))
        let mut k = a;
        for i in (1..80).rev() {
            k = a + (i as f64 / 2.0) / k;
        }
        1.0 - (-a * a).exp() / std::f64::consts::PI.sqrt() / k
    } else {
        1.0
    };
    r.copysign(x)
}

fn softplus(x: f64) -> f64 {
    if x > 0.0 {
        x + (-x).exp().ln_1p()
    } else {
        x.exp().ln_1p()
    }
}

/// The f64 function of a unary float op, with its attributes bound.
fn unary_fn(op: OpKind, attrs: &Attrs) -> Result<Box<dyn Fn(f64) -> f64>, String> {
    use OpKind::*;
    let a = |name: &str, d: f32| -> Result<f64, String> { Ok(attrs.float_or(name, d)? as f64) };
    Ok(match op {
        Abs => Box::new(f64::abs),
        Neg => Box::new(|x: f64| -x),
        Sqrt => Box::new(f64::sqrt),
        Exp => Box::new(f64::exp),
        Log => Box::new(f64::ln),
        Reciprocal => Box::new(|x: f64| 1.0 / x),
        Floor => Box::new(f64::floor),
        Ceil => Box::new(f64::ceil),
        Round => Box::new(f64::round_ties_even),
        Sign => Box::new(|x: f64| {
            if x == 0.0 || x.is_nan() {
                x
            } else {
                x.signum()
            }
        }),
        Sin => Box::new(f64::sin),
        Cos => Box::new(f64::cos),
        Tan => Box::new(f64::tan),
        Asin => Box::new(f64::asin),
        Acos => Box::new(f64::acos),
        Atan => Box::new(f64::atan),
        Sinh => Box::new(f64::sinh),
        Cosh => Box::new(f64::cosh),
        Asinh => Box::new(f64::asinh),
        Acosh => Box::new(f64::acosh),
        Atanh => Box::new(f64::atanh),
        Erf => Box::new(erf),
        Tanh => Box::new(f64::tanh),
        Sigmoid => Box::new(|x: f64| {
            if x >= 0.0 {
                1.0 / (1.0 + (-x).exp())
            } else {
                let e = x.exp();
                e / (1.0 + e)
            }
        }),
        Relu => Box::new(|x: f64| if x > 0.0 { x } else { 0.0 }),
        LeakyRelu => {
            let al = a("alpha", 0.01)?;
            Box::new(move |x| if x < 0.0 { al * x } else { x })
        }
        Elu => {
            let al = a("alpha", 1.0)?;
            Box::new(move |x| if x < 0.0 { al * x.exp_m1() } else { x })
        }
        Selu => {
            let al = a("alpha", 1.673_263_2)?;
            let g = a("gamma", 1.050_701)?;
            Box::new(move |x| {
                if x <= 0.0 {
                    g * (al * x.exp() - al)
                } else {
                    g * x
                }
            })
        }
        Celu => {
            let al = a("alpha", 1.0)?;
            // NaN stays NaN (numpy's maximum/minimum, as the ONNX reference); f64::max and
            // min would drop it and give celu(NaN) = 0.
            Box::new(move |x: f64| {
                if x.is_nan() {
                    x
                } else {
                    x.max(0.0) + (al * (x / al).exp_m1()).min(0.0)
                }
            })
        }
        Gelu => {
            if attrs.string_or("approximate", "none".into())? == "tanh" {
                Box::new(|x: f64| {
                    let c = (2.0 / std::f64::consts::PI).sqrt();
                    0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
                })
            } else {
                Box::new(|x: f64| 0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2)))
            }
        }
        Mish => Box::new(|x: f64| x * softplus(x).tanh()),
        Softplus => Box::new(softplus),
        Softsign => Box::new(|x: f64| x / (1.0 + x.abs())),
        HardSigmoid => {
            let (al, be) = (a("alpha", 0.2)?, a("beta", 0.5)?);
            Box::new(move |x| (al * x + be).clamp(0.0, 1.0))
        }
        HardSwish => Box::new(|x: f64| x * (x / 6.0 + 0.5).clamp(0.0, 1.0)),
        ThresholdedRelu => {
            let al = a("alpha", 1.0)?;
            Box::new(move |x| if x > al { x } else { 0.0 })
        }
        Shrink => {
            let (bias, l) = (a("bias", 0.0)?, a("lambd", 0.5)?);
            Box::new(move |x| {
                if x < -l {
                    x + bias
                } else if x > l {
                    x - bias
                } else {
                    0.0
                }
            })
        }
        _ => return Err(not_in_family(op)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Attr, Shape, TensorType};
    use proptest::prelude::*;

    fn t32(shape: &[usize], v: &[f32]) -> Tensor {
        Tensor::from_vec(shape.to_vec(), v.to_vec())
    }
    fn run(op: OpKind, attrs: Attrs, ins: &[&Tensor]) -> Result<Tensor, String> {
        let ins: Vec<Option<&Tensor>> = ins.iter().map(|t| Some(*t)).collect();
        eval(op, &attrs, &ins).map(|mut v| v.remove(0))
    }
    fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 1e-6 * (1.0 + y.abs()), "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn add_broadcasts_row_against_column() {
        let a = t32(&[2, 1], &[1.0, 2.0]);
        let b = t32(&[3], &[10.0, 20.0, 30.0]);
        let r = run(OpKind::Add, Attrs::new(), &[&a, &b]).unwrap();
        assert_eq!(r.shape(), &[2, 3]);
        assert_eq!(
            r.as_slice::<f32>().unwrap(),
            &[11.0, 21.0, 31.0, 12.0, 22.0, 32.0]
        );
        assert!(run(OpKind::Add, Attrs::new(), &[&a, &t32(&[3, 1], &[0.0; 3])]).is_err());
    }

    #[test]
    fn integer_div_truncates_wraps_and_errors_on_zero() {
        let a = Tensor::from_vec(vec![3], vec![-7i32, 7, i32::MIN]);
        let b = Tensor::from_vec(vec![3], vec![2i32, -2, -1]);
        let r = run(OpKind::Div, Attrs::new(), &[&a, &b]).unwrap();
        assert_eq!(r.as_slice::<i32>().unwrap(), &[-3, -3, i32::MIN]);
        let z = Tensor::from_vec(vec![3], vec![1i32, 0, 1]);
        assert!(run(OpKind::Div, Attrs::new(), &[&a, &z]).is_err());
        let m = Tensor::from_vec(vec![2], vec![250u8, 10]);
        let r = run(OpKind::Mul, Attrs::new(), &[&m, &m]).unwrap();
        assert_eq!(r.as_slice::<u8>().unwrap(), &[36, 100]);
    }

    #[test]
    fn mod_follows_divisor_sign_unless_fmod() {
        // numpy: np.mod([-4,7,5], [3,-3,8]) = [2,-2,5]; np.fmod = [-1,1,5]
        let a = Tensor::from_vec(vec![3], vec![-4i64, 7, 5]);
        let b = Tensor::from_vec(vec![3], vec![3i64, -3, 8]);
        let r = run(OpKind::Mod, Attrs::new(), &[&a, &b]).unwrap();
        assert_eq!(r.to_i64s(), vec![2, -2, 5]);
        let f = Attrs::new().with("fmod", Attr::Int(1));
        assert_eq!(
            run(OpKind::Mod, f, &[&a, &b]).unwrap().to_i64s(),
            vec![-1, 1, 5]
        );
    }

    #[test]
    fn pow_takes_exponent_of_another_dtype() {
        let x = t32(&[3], &[1.0, 2.0, 3.0]);
        let e = Tensor::from_vec(vec![3], vec![4i64, 5, 6]);
        let r = run(OpKind::Pow, Attrs::new(), &[&x, &e]).unwrap();
        assert_eq!(r.as_slice::<f32>().unwrap(), &[1.0, 32.0, 729.0]);
        let xi = Tensor::from_vec(vec![2], vec![3i32, 2]);
        let ef = t32(&[2], &[2.0, 0.5]);
        let r = run(OpKind::Pow, Attrs::new(), &[&xi, &ef]).unwrap();
        assert_eq!(r.as_slice::<i32>().unwrap(), &[9, 1]);
    }

    #[test]
    fn variadic_max_sum_mean_broadcast() {
        let a = t32(&[3], &[3.0, 2.0, 1.0]);
        let b = t32(&[3], &[1.0, 4.0, 4.0]);
        let c = t32(&[1], &[2.0]);
        let m = run(OpKind::Max, Attrs::new(), &[&a, &b, &c]).unwrap();
        assert_eq!(m.as_slice::<f32>().unwrap(), &[3.0, 4.0, 4.0]);
        let s = run(OpKind::Sum, Attrs::new(), &[&a, &b, &c]).unwrap();
        assert_eq!(s.as_slice::<f32>().unwrap(), &[6.0, 8.0, 7.0]);
        let mean = run(OpKind::Mean, Attrs::new(), &[&a, &b, &c]).unwrap();
        close(
            mean.as_slice::<f32>().unwrap(),
            &[2.0, 8.0 / 3.0, 7.0 / 3.0],
        );
    }

    #[test]
    fn unary_float_ops_match_numpy() {
        let x = t32(&[4], &[-1.5, -0.5, 0.5, 2.5]);
        let erf = run(OpKind::Erf, Attrs::new(), &[&x]).unwrap();
        // scipy.special.erf
        close(
            erf.as_slice::<f32>().unwrap(),
            &[-0.966_105_1, -0.520_499_9, 0.520_499_9, 0.999_593],
        );
        let round = run(OpKind::Round, Attrs::new(), &[&x]).unwrap();
        assert_eq!(round.as_slice::<f32>().unwrap(), &[-2.0, -0.0, 0.0, 2.0]);
        let gelu = run(OpKind::Gelu, Attrs::new(), &[&x]).unwrap();
        close(
            gelu.as_slice::<f32>().unwrap(),
            &[-0.100_210_8, -0.154_268_77, 0.345_731_23, 2.484_475_8],
        );
        let gt = Attrs::new().with("approximate", Attr::Str("tanh".into()));
        let gelu_t = run(OpKind::Gelu, gt, &[&x]).unwrap();
        close(
            gelu_t.as_slice::<f32>().unwrap(),
            &[-0.100_428_42, -0.154_286, 0.345_714, 2.484_915_7],
        );
        let sig = run(OpKind::Sigmoid, Attrs::new(), &[&x]).unwrap();
        close(
            sig.as_slice::<f32>().unwrap(),
            &[0.182_425_52, 0.377_540_7, 0.622_459_3, 0.924_141_8],
        );
    }

    #[test]
    fn erf_is_accurate_across_ranges() {
        // math.erf values
        for (x, e) in [
            (0.1, 0.112_462_916_018_284_9),
            (1.0, 0.842_700_792_949_714_9),
            (2.9, 0.999_958_902_121_900_5),
            (2.1, 0.997_020_533_343_667),
            (3.5, 0.999_999_256_901_627_7),
            (-4.2, -0.999_999_997_144_505_8),
            (0.0, 0.0),
            (1e-300, 1.128_379_167_095_512_6e-300),
        ] {
            assert!((erf(x) - e).abs() < 1e-14, "erf({x}) = {} vs {e}", erf(x));
        }
    }

    #[test]
    fn comparisons_and_where_broadcast() {
        let a = Tensor::from_vec(vec![3], vec![1i64, 5, 3]);
        let b = Tensor::scalar(3i64);
        let lt = run(OpKind::Less, Attrs::new(), &[&a, &b]).unwrap();
        assert_eq!(lt.as_slice::<bool>().unwrap(), &[true, false, false]);
        let ge = run(OpKind::GreaterOrEqual, Attrs::new(), &[&a, &b]).unwrap();
        assert_eq!(ge.as_slice::<bool>().unwrap(), &[false, true, true]);
        let x = t32(&[3], &[1.0, 2.0, 3.0]);
        let y = t32(&[], &[-1.0]);
        let w = run(OpKind::Where, Attrs::new(), &[&lt, &x, &y]).unwrap();
        assert_eq!(w.as_slice::<f32>().unwrap(), &[1.0, -1.0, -1.0]);
    }

    #[test]
    fn clip_with_optional_bounds_and_int_dtypes() {
        let x = Tensor::from_vec(vec![4], vec![-5i32, 0, 5, 10]);
        let lo = Tensor::scalar(-1i32);
        let r = eval(OpKind::Clip, &Attrs::new(), &[Some(&x), Some(&lo), None]).unwrap();
        assert_eq!(r[0].as_slice::<i32>().unwrap(), &[-1, 0, 5, 10]);
        let hi = Tensor::scalar(6i32);
        let r = eval(OpKind::Clip, &Attrs::new(), &[Some(&x), None, Some(&hi)]).unwrap();
        assert_eq!(r[0].as_slice::<i32>().unwrap(), &[-5, 0, 5, 6]);
    }

    #[test]
    fn bitshift_and_isinf_attributes() {
        let x = Tensor::from_vec(vec![3], vec![16u8, 4, 1]);
        let s = Tensor::from_vec(vec![3], vec![1u8, 2, 8]);
        let r = run(
            OpKind::BitShift,
            Attrs::new().with("direction", Attr::Str("RIGHT".into())),
            &[&x, &s],
        )
        .unwrap();
        assert_eq!(r.as_slice::<u8>().unwrap(), &[8, 1, 0]);
        let l = run(
            OpKind::BitShift,
            Attrs::new().with("direction", Attr::Str("LEFT".into())),
            &[&x, &s],
        )
        .unwrap();
        assert_eq!(l.as_slice::<u8>().unwrap(), &[32, 16, 0]);
        let f = t32(&[3], &[f32::INFINITY, f32::NEG_INFINITY, 1.0]);
        let pos = Attrs::new().with("detect_negative", Attr::Int(0));
        let r = run(OpKind::IsInf, pos, &[&f]).unwrap();
        assert_eq!(r.as_slice::<bool>().unwrap(), &[true, false, false]);
    }

    #[test]
    fn half_floats_compute_and_round_back() {
        use half::f16;
        let x = Tensor::from_vec(vec![2], vec![f16::from_f32(0.5), f16::from_f32(-2.0)]);
        let r = run(OpKind::Tanh, Attrs::new(), &[&x]).unwrap();
        let v = r.as_slice::<f16>().unwrap();
        assert_eq!(v[0], f16::from_f64(0.5f64.tanh()));
        assert_eq!(r.dtype(), DType::F16);
    }

    #[test]
    fn infer_keeps_symbols_and_gives_bool_for_comparisons() {
        let a = Fact::of(TensorType::new(
            DType::F32,
            Shape::new(vec!["B".into(), "S".into(), Dim::Fixed(768)]),
        ));
        let b = Fact::of(TensorType::new(DType::F32, Shape::fixed(&[768])));
        let r = infer(OpKind::Add, &Attrs::new(), &[Some(&a), Some(&b)]).unwrap();
        assert_eq!(r[0].ty.shape.to_string(), "[B, S, 768]");
        let r = infer(OpKind::Less, &Attrs::new(), &[Some(&a), Some(&b)]).unwrap();
        assert_eq!(r[0].ty.dtype, DType::Bool);
        let c = infer(
            OpKind::Cast,
            &Attrs::new().with("to", Attr::Str("i64".into())),
            &[Some(&a)],
        )
        .unwrap();
        assert_eq!(c[0].ty.dtype, DType::I64);
        let bad = Fact::of(TensorType::new(DType::F32, Shape::fixed(&[5])));
        assert!(infer(OpKind::Mul, &Attrs::new(), &[Some(&a), Some(&bad)]).is_err());
    }

    #[test]
    fn infer_multiplies_symbolic_shape_contents_by_one() {
        let mut a = Fact::of(TensorType::new(DType::I64, Shape::fixed(&[2])));
        a.dims = Some(vec!["B".into(), Dim::Fixed(4)]);
        let mut b = Fact::of(TensorType::new(DType::I64, Shape::fixed(&[2])));
        b.dims = Some(vec![Dim::Fixed(1), Dim::Fixed(3)]);
        let r = infer(OpKind::Mul, &Attrs::new(), &[Some(&a), Some(&b)]).unwrap();
        assert_eq!(r[0].dims, Some(vec!["B".into(), Dim::Fixed(12)]));
    }

    proptest! {
        #[test]
        fn broadcast_add_matches_explicit_expansion(
            r in 1usize..4, c in 1usize..4, row in any::<bool>(),
            seed in proptest::collection::vec(-100i32..100, 16),
        ) {
            let a: Vec<i32> = (0..r * c).map(|i| seed[i % 16]).collect();
            let (bshape, blen) = if row { (vec![1, c], c) } else { (vec![r, 1], r) };
            let b: Vec<i32> = (0..blen).map(|i| seed[(i + 7) % 16]).collect();
            let ta = Tensor::from_vec(vec![r, c], a.clone());
            let tb = Tensor::from_vec(bshape, b.clone());
            let out = run(OpKind::Add, Attrs::new(), &[&ta, &tb]).unwrap();
            let mut want = Vec::new();
            for i in 0..r {
                for j in 0..c {
                    want.push(a[i * c + j] + if row { b[j] } else { b[i] });
                }
            }
            prop_assert_eq!(out.as_slice::<i32>().unwrap(), &want[..]);
        }
    }
}
