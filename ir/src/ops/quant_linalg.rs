//! The quantized linear-algebra op family: ONNX `MatMulInteger`, `ConvInteger`,
//! `QLinearMatMul` and `QLinearConv`. Shape rules and reference semantics side by side.
//!
//! All four are exact integer arithmetic up to the requantisation of the QLinear ops:
//!
//! - `matmul_integer(a, b, a_zp?, b_zp?) = (a - a_zp) · (b - b_zp)` in i32, the zero point of
//!   `a` per tensor or per row, that of `b` per tensor or per column.
//! - `conv_integer(x, w, x_zp?, w_zp?) = conv(x - x_zp, w - w_zp)` in i32, `x_zp` per tensor,
//!   `w_zp` per tensor or per output channel. Padding reads `x_zp` (zero after centring).
//! - `qlinear_matmul(a, sa, za, b, sb, zb, sy, zy)` and `qlinear_conv(x, sx, zx, w, sw, zw,
//!   sy, zy, bias?)`: the integer product `acc` above (plus the i32 bias), then
//!   `saturate(round_half_even(acc · (s_a·s_b / s_y)) + z_y)` in `z_y`'s dtype. As in ONNX's
//!   reference, the multiplier `s_a·s_b / s_y` is computed in the scales' dtype (each step
//!   rounded to it) and the product `acc · multiplier` in f64.
//!
//! - `matmul_integer_scaled(a, b, a_zp?, b_zp?, scale, bias?)` (kiln's, made by the
//!   `fuse_quant_epilogue` pass from onnxruntime's dynamic quantisation):
//!   `f32(matmul_integer(a, b, a_zp, b_zp)) · scale (+ bias)`, each step rounded to f32 as the
//!   `cast`, `mul` and `add` it replaces (so the fused form equals them bit for bit). `scale`
//!   and `bias` are f32 and broadcast to the product's shape without enlarging it.
//!
//! The integer products run through the linalg family's matmul and conv on centred i32
//! operands, so there is one dense kernel; accumulation wraps in 32 bits, as ONNX allows.

use super::shared::{fact, zip2, Bc};
use super::{arg, linalg, not_in_family, opt_arg, Fact};
use crate::{Attrs, DType, OpKind, Tensor, TensorData};

/// Shape rule: the shape of the matmul/conv of the two integer operands, in i32 (the
/// `Integer` ops) or the output zero point's dtype (the `QLinear` ops).
pub fn infer(op: OpKind, attrs: &Attrs, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>, String> {
    let (a, b, inner) = operands(op, inputs)?;
    for (f, what) in [(a, "first operand"), (b, "second operand")] {
        check_int8(f.ty.dtype, what)?;
    }
    if op == OpKind::MatMulIntegerScaled {
        for (i, what) in [(4, "scale"), (5, "bias")] {
            match opt_arg(inputs, i) {
                Some(f) if f.ty.dtype != DType::F32 => {
                    return Err(format!("the {what} must be f32, got {}", f.ty.dtype))
                }
                None if i == 4 => return Err("the scale (input #4) is missing".into()),
                _ => {}
            }
        }
    }
    let dtype = match op {
        OpKind::MatMulInteger | OpKind::ConvInteger => DType::I32,
        OpKind::MatMulIntegerScaled => DType::F32,
        _ => match opt_arg(inputs, 7) {
            Some(z) => {
                check_int8(z.ty.dtype, "output zero point")?;
                z.ty.dtype
            }
            None => a.ty.dtype,
        },
    };
    let mut out = linalg::infer(inner, attrs, &[Some(a), Some(b)])?;
    let shape = out.remove(0).ty.shape;
    Ok(vec![fact(dtype, shape)])
}

/// The two integer operands of `op` and the float op whose shape rule it shares.
fn operands<'a, T>(op: OpKind, inputs: &[Option<&'a T>]) -> Result<(&'a T, &'a T, OpKind), String> {
    Ok(match op {
        OpKind::MatMulInteger | OpKind::MatMulIntegerScaled => {
            (arg(inputs, 0)?, arg(inputs, 1)?, OpKind::MatMul)
        }
        OpKind::ConvInteger => (arg(inputs, 0)?, arg(inputs, 1)?, OpKind::Conv),
        OpKind::QLinearMatMul => (arg(inputs, 0)?, arg(inputs, 3)?, OpKind::MatMul),
        OpKind::QLinearConv => (arg(inputs, 0)?, arg(inputs, 3)?, OpKind::Conv),
        _ => return Err(not_in_family(op)),
    })
}

/// Reference semantics of the quantized contractions.
pub fn eval(op: OpKind, attrs: &Attrs, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
    let (a, b, inner) = operands(op, inputs)?;
    let conv = inner == OpKind::Conv;
    // Where each operand's zero point and scale sit.
    let (la, lb) = if conv {
        (Layout::Tensor, Layout::Channel)
    } else {
        (Layout::Row, Layout::Col)
    };
    let (za, zb) = match op {
        OpKind::MatMulInteger | OpKind::ConvInteger | OpKind::MatMulIntegerScaled => {
            (opt_arg(inputs, 2), opt_arg(inputs, 3))
        }
        _ => (opt_arg(inputs, 2), opt_arg(inputs, 5)),
    };
    let ca = centre(a, za, la, "first operand")?;
    let cb = centre(b, zb, lb, "second operand")?;
    let mut ins = vec![Some(&ca), Some(&cb)];
    let bias = if op == OpKind::QLinearConv {
        opt_arg(inputs, 8)
    } else {
        None
    };
    if let Some(bias) = bias {
        if bias.dtype() != DType::I32 {
            return Err(format!("the bias must be i32, got {}", bias.dtype()));
        }
        ins.push(Some(bias));
    }
    let acc = linalg::eval(inner, attrs, &ins)?.remove(0);
    let out = match op {
        OpKind::MatMulInteger | OpKind::ConvInteger => acc,
        OpKind::MatMulIntegerScaled => scale_epilogue(acc, arg(inputs, 4)?, opt_arg(inputs, 5))?,
        _ => {
            let sa = arg(inputs, 1)?;
            let sb = arg(inputs, 4)?;
            let sy = arg(inputs, 6)?;
            let zy = opt_arg(inputs, 7);
            let ydt = zy.map_or(a.dtype(), Tensor::dtype);
            check_int8(ydt, "output")?;
            let mut sa_shape = param_shape(sa, a.shape(), la, "first operand's scale")?;
            let sb_shape = param_shape(sb, b.shape(), lb, "second operand's scale")?;
            if !conv && b.rank() == 1 && !sa_shape.is_empty() {
                // A matrix times a vector: the output has no column axis.
                sa_shape.pop();
            }
            check_same_shape(sa, za, "first operand")?;
            check_same_shape(sb, zb, "second operand")?;
            if sy.len() != 1 || zy.is_some_and(|z| z.len() != 1) {
                return Err(format!(
                    "the output scale and zero point must be single values, got {:?} and {:?}",
                    sy.shape(),
                    zy.map(Tensor::shape)
                ));
            }
            requantize(&acc, (sa, &sa_shape), (sb, &sb_shape), sy, zy, ydt, conv)?
        }
    };
    Ok(vec![out])
}

/// `matmul_integer_scaled`'s epilogue: `f32(acc) · scale (+ bias)` by the elementwise ops
/// it stands for, the result keeping the product's shape.
fn scale_epilogue(acc: Tensor, scale: &Tensor, bias: Option<&Tensor>) -> Result<Tensor, String> {
    let shape = acc.shape().to_vec();
    let to_f32 = Attrs::new().with("to", crate::Attr::Str("f32".into()));
    let mut y = super::eval(OpKind::Cast, &to_f32, &[Some(&acc)])?.remove(0);
    y = super::eval(OpKind::Mul, &Attrs::new(), &[Some(&y), Some(scale)])?.remove(0);
    if let Some(b) = bias {
        y = super::eval(OpKind::Add, &Attrs::new(), &[Some(&y), Some(b)])?.remove(0);
    }
    if y.shape() != shape {
        return Err(format!(
            "the scale {:?} and bias {:?} must broadcast to the product {shape:?} without enlarging it",
            scale.shape(),
            bias.map(Tensor::shape)
        ));
    }
    Ok(y)
}

/// Where a zero point or scale applies within its operand.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Layout {
    /// One value for the whole tensor.
    Tensor,
    /// A matmul's left operand: per tensor, per row (1-D of M, or the operand's rank with
    /// the last dim 1).
    Row,
    /// A matmul's right operand: per tensor, per column (1-D of N, or the operand's rank
    /// with the second-last dim 1).
    Col,
    /// A conv weight (M × C/g × k…): per tensor or per output channel (1-D of M).
    Channel,
}

/// The shape a zero point or scale `p` is read as, broadcasting against its operand of
/// shape `xs`; an error naming `what` when `p` fits none of `layout`'s forms.
fn param_shape(p: &Tensor, xs: &[usize], layout: Layout, what: &str) -> Result<Vec<usize>, String> {
    if p.len() == 1 {
        return Ok(vec![]);
    }
    let r = xs.len();
    let ps = p.shape();
    let fits = match layout {
        Layout::Tensor => None,
        Layout::Row if r >= 2 && ps == [xs[r - 2]] => Some(vec![xs[r - 2], 1]),
        Layout::Col if r >= 2 && ps == [xs[r - 1]] => Some(vec![xs[r - 1]]),
        Layout::Row | Layout::Col if r >= 2 && ps.len() == r => {
            // Per row: [.., M, 1]; per column: [.., 1, N]; leading dims broadcast.
            let unit = if layout == Layout::Row { r - 1 } else { r - 2 };
            let ok = ps[unit] == 1
                && ps
                    .iter()
                    .zip(xs)
                    .enumerate()
                    .all(|(i, (&p, &x))| i == unit || p == x || p == 1);
            ok.then(|| ps.to_vec())
        }
        Layout::Channel if r >= 1 && ps == [xs[0]] => {
            let mut s = vec![1; r];
            s[0] = xs[0];
            Some(s)
        }
        _ => None,
    };
    fits.ok_or_else(|| {
        let forms = match layout {
            Layout::Tensor => "a single value",
            Layout::Row => "a single value or one per row",
            Layout::Col => "a single value or one per column",
            Layout::Channel => "a single value or one per output channel",
        };
        format!(
            "{what}: quantization parameter {ps:?} does not fit operand {xs:?} (expected {forms})"
        )
    })
}

/// The scale and zero point of one operand must have one shape.
fn check_same_shape(s: &Tensor, z: Option<&Tensor>, what: &str) -> Result<(), String> {
    match z {
        Some(z) if z.shape() != s.shape() && !(z.len() == 1 && s.len() == 1) => Err(format!(
            "{what}: scale {:?} and zero point {:?} differ in shape",
            s.shape(),
            z.shape()
        )),
        _ => Ok(()),
    }
}

/// Quantized operands are i8 or u8.
fn check_int8(dt: DType, what: &str) -> Result<(), String> {
    match dt {
        DType::I8 | DType::U8 => Ok(()),
        other => Err(format!("the {what} must be i8 or u8, got {other}")),
    }
}

/// `x - zp` as an i32 tensor of x's shape (exact: both are 8-bit).
fn centre(x: &Tensor, zp: Option<&Tensor>, layout: Layout, what: &str) -> Result<Tensor, String> {
    check_int8(x.dtype(), what)?;
    let xv = x.to_i64s();
    let Some(z) = zp else {
        return Tensor::new(
            x.shape().to_vec(),
            TensorData::from_i64s(DType::I32, xv.into_iter()),
        );
    };
    if z.dtype() != x.dtype() {
        return Err(format!(
            "the {what}'s zero point is {}, the {what} is {}",
            z.dtype(),
            x.dtype()
        ));
    }
    let zs = param_shape(z, x.shape(), layout, &format!("{what}'s zero point"))?;
    let (shape, v) = zip2(&xv, x.shape(), &z.to_i64s(), &zs, |a, b| Ok(a - b))?;
    if shape != x.shape() {
        return Err(format!(
            "the {what}'s zero point {:?} does not fit {:?}",
            z.shape(),
            x.shape()
        ));
    }
    Tensor::new(shape, TensorData::from_i64s(DType::I32, v.into_iter()))
}

/// Rounds an f64 to the nearest value of float dtype `dt` (exact for the sums, products and
/// quotients of two values of `dt`: f64 carries more than twice their precision).
fn round_to(dt: DType, x: f64) -> f64 {
    match dt {
        DType::F32 => f64::from(x as f32),
        DType::F16 => crate::half::f16::from_f64(x).to_f64(),
        DType::BF16 => crate::half::bf16::from_f64(x).to_f64(),
        _ => x,
    }
}

/// The QLinear ops' output: `saturate(round_half_even(acc · sa·sb/sy) + zy)`.
fn requantize(
    acc: &Tensor,
    (sa, sa_shape): (&Tensor, &[usize]),
    (sb, sb_shape): (&Tensor, &[usize]),
    sy: &Tensor,
    zy: Option<&Tensor>,
    ydt: DType,
    conv: bool,
) -> Result<Tensor, String> {
    let sdt = sa.dtype();
    if !sdt.is_float() || sb.dtype() != sdt || sy.dtype() != sdt {
        return Err(format!(
            "the scales must be floats of one dtype, got {}, {} and {}",
            sa.dtype(),
            sb.dtype(),
            sy.dtype()
        ));
    }
    let out = acc.shape();
    // A conv's per-channel weight scale [M, 1, k..] applies along the output's axis 1.
    let sb_shape: Vec<usize> = if conv && !sb_shape.is_empty() {
        let mut s = vec![1; out.len()];
        s[1] = sb_shape[0];
        s
    } else {
        sb_shape.to_vec()
    };
    let (sav, sbv) = (sa.to_f64s(), sb.to_f64s());
    let (ba, bb) = (Bc::new(&sav, sa_shape, out), Bc::new(&sbv, &sb_shape, out));
    let y = sy.to_f64s()[0];
    let z = zy.map_or(0.0, |z| z.to_f64s()[0]);
    let (lo, hi) = if ydt == DType::I8 {
        (-128.0, 127.0)
    } else {
        (0.0, 255.0)
    };
    let v = acc
        .to_i64s()
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let m = round_to(sdt, round_to(sdt, ba.get(i) * bb.get(i)) / y);
            ((c as f64 * m).round_ties_even() + z).clamp(lo, hi) as i64
        })
        .collect::<Vec<_>>();
    Tensor::new(out.to_vec(), TensorData::from_i64s(ydt, v.into_iter()))
}

#[cfg(test)]
mod tests {
    use crate::{ops, Attr, Attrs, OpKind, Tensor};
    use rand::{Rng, SeedableRng};

    fn run(op: OpKind, attrs: &Attrs, ins: &[Option<&Tensor>]) -> Result<Tensor, String> {
        ops::eval(op, attrs, ins).map(|mut v| v.remove(0))
    }

    /// Random 8-bit values, a quarter of them at the extremes of the type.
    fn bytes(rng: &mut rand::rngs::StdRng, n: usize, signed: bool) -> Vec<i64> {
        let (lo, hi) = if signed { (-128, 127) } else { (0, 255) };
        (0..n)
            .map(|_| match rng.gen_range(0..8) {
                0 => lo,
                1 => hi,
                _ => rng.gen_range(lo..=hi),
            })
            .collect()
    }

    fn t8(shape: &[usize], v: &[i64], signed: bool) -> Tensor {
        if signed {
            Tensor::from_vec(shape.to_vec(), v.iter().map(|&x| x as i8).collect())
        } else {
            Tensor::from_vec(shape.to_vec(), v.iter().map(|&x| x as u8).collect())
        }
    }

    #[test]
    fn matmul_integer_scaled_is_the_cast_mul_add_it_replaces() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let a = t8(&[2, 3, 5], &bytes(&mut rng, 30, false), false);
        let b = t8(&[5, 4], &bytes(&mut rng, 20, true), true);
        let (za, zb) = (Tensor::scalar(131u8), Tensor::scalar(-3i8));
        let scale = Tensor::from_vec(vec![4], vec![0.013f32, 1e-3, 7.5, -0.25]);
        let bias = Tensor::from_vec(vec![4], vec![0.5f32, -1.0, 3.25, 1e-7]);
        let ins = [Some(&a), Some(&b), Some(&za), Some(&zb)];
        let acc = run(OpKind::MatMulInteger, &Attrs::new(), &ins).unwrap();
        let to = Attrs::new().with("to", Attr::Str("f32".into()));
        let f = run(OpKind::Cast, &to, &[Some(&acc)]).unwrap();
        let m = run(OpKind::Mul, &Attrs::new(), &[Some(&f), Some(&scale)]).unwrap();
        let want = run(OpKind::Add, &Attrs::new(), &[Some(&m), Some(&bias)]).unwrap();
        let mut sins = ins.to_vec();
        sins.extend([Some(&scale), Some(&bias)]);
        let got = run(OpKind::MatMulIntegerScaled, &Attrs::new(), &sins).unwrap();
        assert_eq!(got, want);
        let got = run(OpKind::MatMulIntegerScaled, &Attrs::new(), &sins[..5]).unwrap();
        assert_eq!(got, m);
        // A scale that would enlarge the product, or an integer scale: errors.
        let big = Tensor::from_vec(vec![3, 1, 1, 4], vec![1f32; 12]);
        sins[4] = Some(&big);
        assert!(run(OpKind::MatMulIntegerScaled, &Attrs::new(), &sins).is_err());
        let int = Tensor::scalar(2i32);
        sins[4] = Some(&int);
        assert!(run(OpKind::MatMulIntegerScaled, &Attrs::new(), &sins).is_err());
    }

    #[test]
    fn matmul_integer_matches_the_onnx_example() {
        // The example of the ONNX operator documentation.
        let a = Tensor::from_vec(vec![4, 3], vec![11u8, 7, 3, 10, 6, 2, 9, 5, 1, 8, 4, 0]);
        let b = Tensor::from_vec(vec![3, 2], vec![1u8, 4, 2, 5, 3, 6]);
        let za = Tensor::scalar(12u8);
        let zb = Tensor::scalar(0u8);
        let y = run(
            OpKind::MatMulInteger,
            &Attrs::new(),
            &[Some(&a), Some(&b), Some(&za), Some(&zb)],
        )
        .unwrap();
        assert_eq!(
            y.as_slice::<i32>().unwrap(),
            &[-38, -83, -44, -98, -50, -113, -56, -128]
        );
    }

    #[test]
    fn matmul_integer_per_row_and_column_zero_points_match_a_triple_loop() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for &(m, k, n, sa, sb) in &[
            (3, 5, 4, false, true),
            (1, 7, 2, true, false),
            (5, 1, 3, true, true),
        ] {
            let (av, bv) = (bytes(&mut rng, m * k, sa), bytes(&mut rng, k * n, sb));
            let (zav, zbv) = (bytes(&mut rng, m, sa), bytes(&mut rng, n, sb));
            let y = run(
                OpKind::MatMulInteger,
                &Attrs::new(),
                &[
                    Some(&t8(&[m, k], &av, sa)),
                    Some(&t8(&[k, n], &bv, sb)),
                    Some(&t8(&[m], &zav, sa)),
                    Some(&t8(&[n], &zbv, sb)),
                ],
            )
            .unwrap();
            let mut want = vec![0i32; m * n];
            for i in 0..m {
                for j in 0..n {
                    for p in 0..k {
                        want[i * n + j] +=
                            ((av[i * k + p] - zav[i]) * (bv[p * n + j] - zbv[j])) as i32;
                    }
                }
            }
            assert_eq!(y.as_slice::<i32>().unwrap(), &want[..], "{m}x{k}x{n}");
        }
    }

    #[test]
    fn matmul_integer_rejects_bad_zero_points_and_dtypes() {
        let a = Tensor::from_vec(vec![2, 3], vec![1u8; 6]);
        let b = Tensor::from_vec(vec![3, 2], vec![1u8; 6]);
        let z3 = Tensor::from_vec(vec![3], vec![0u8; 3]);
        let e = run(
            OpKind::MatMulInteger,
            &Attrs::new(),
            &[Some(&a), Some(&b), Some(&z3)],
        )
        .unwrap_err();
        assert!(e.contains("does not fit operand [2, 3]"), "{e}");
        let zi = Tensor::scalar(0i8);
        let e = run(
            OpKind::MatMulInteger,
            &Attrs::new(),
            &[Some(&a), Some(&b), Some(&zi)],
        )
        .unwrap_err();
        assert!(e.contains("zero point is i8"), "{e}");
        let f = Tensor::from_vec(vec![2, 3], vec![1.0f32; 6]);
        assert!(run(OpKind::MatMulInteger, &Attrs::new(), &[Some(&f), Some(&b)]).is_err());
    }

    #[test]
    fn conv_integer_pads_with_the_zero_point_and_takes_per_channel_weight_zero_points() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let (c, h, w, m) = (2usize, 4usize, 3usize, 3usize);
        let xv = bytes(&mut rng, c * h * w, false);
        let wv = bytes(&mut rng, m * c * 4, true);
        let zw = bytes(&mut rng, m, true);
        let zx = 37i64;
        let attrs = Attrs::new().with("pads", Attr::Ints(vec![1, 1, 1, 1]));
        let y = run(
            OpKind::ConvInteger,
            &attrs,
            &[
                Some(&t8(&[1, c, h, w], &xv, false)),
                Some(&t8(&[m, c, 2, 2], &wv, true)),
                Some(&Tensor::scalar(zx as u8)),
                Some(&t8(&[m], &zw, true)),
            ],
        )
        .unwrap();
        assert_eq!(y.shape(), &[1, m, h + 1, w + 1]);
        // Direct convolution; padding reads the zero point, i.e. contributes nothing.
        let mut want = Vec::new();
        for o in 0..m {
            for oy in 0..h + 1 {
                for ox in 0..w + 1 {
                    let mut s = 0i64;
                    for ci in 0..c {
                        for ky in 0..2 {
                            for kx in 0..2 {
                                let (iy, ix) = (oy + ky, ox + kx);
                                let xval = if iy < 1 || ix < 1 || iy > h || ix > w {
                                    zx
                                } else {
                                    xv[(ci * h + iy - 1) * w + ix - 1]
                                };
                                let wval = wv[((o * c + ci) * 2 + ky) * 2 + kx];
                                s += (xval - zx) * (wval - zw[o]);
                            }
                        }
                    }
                    want.push(s as i32);
                }
            }
        }
        assert_eq!(y.as_slice::<i32>().unwrap(), &want[..]);
    }

    #[test]
    fn qlinear_matmul_rounds_half_to_even_and_saturates() {
        // acc = 40·a; multiplier 0.5·0.5/4 = 1/16 (exact), so y = 2.5·a + 100.
        let b = Tensor::from_vec(vec![1, 1], vec![40i8]);
        let b_zp = Tensor::scalar(0i8);
        let a_zp = Tensor::scalar(0i8);
        let (sa, sb, sy) = (
            Tensor::scalar(0.5f32),
            Tensor::scalar(0.5f32),
            Tensor::scalar(4.0f32),
        );
        let zy = Tensor::scalar(100u8);
        let a10 = Tensor::from_vec(vec![5, 1], vec![1i8, 3, -1, 100, -100]);
        let y = run(
            OpKind::QLinearMatMul,
            &Attrs::new(),
            &[
                Some(&a10),
                Some(&sa),
                Some(&a_zp),
                Some(&b),
                Some(&sb),
                Some(&b_zp),
                Some(&sy),
                Some(&zy),
            ],
        )
        .unwrap();
        // 2.5 → 2, 7.5 → 8, -2.5 → -2 (ties to even), then + 100, saturated to [0, 255].
        assert_eq!(y.as_slice::<u8>().unwrap(), &[102, 108, 98, 255, 0]);
    }

    #[test]
    fn qlinear_conv_adds_the_bias_and_scales_per_channel() {
        // 1×1 conv over one pixel: acc_m = (x - zx)(w_m - zw_m) + bias_m.
        let x = Tensor::from_vec(vec![1, 1, 1, 1], vec![130u8]);
        let w = Tensor::from_vec(vec![2, 1, 1, 1], vec![3i8, -5]);
        let zw = Tensor::from_vec(vec![2], vec![1i8, 0]);
        let sw = Tensor::from_vec(vec![2], vec![1.0f32, 0.25]);
        let bias = Tensor::from_vec(vec![2], vec![7i32, -8]);
        let y = run(
            OpKind::QLinearConv,
            &Attrs::new(),
            &[
                Some(&x),
                Some(&Tensor::scalar(1.0f32)),
                Some(&Tensor::scalar(128u8)),
                Some(&w),
                Some(&sw),
                Some(&zw),
                Some(&Tensor::scalar(2.0f32)),
                Some(&Tensor::scalar(-3i8)),
                Some(&bias),
            ],
        )
        .unwrap();
        // m=0: (2·2 + 7) · 1/2 = 5.5 → 6, - 3 = 3; m=1: (2·-5 - 8) · 0.125 = -2.25 → -2, - 3.
        assert_eq!(y.as_slice::<i8>().unwrap(), &[3, -5]);
    }

    #[test]
    fn infer_gives_i32_or_the_output_zero_point_dtype() {
        use crate::{DType, Dim, Shape, TensorType};
        let f = |dt, dims: Vec<Dim>| ops::Fact::of(TensorType::new(dt, Shape::new(dims)));
        let a = f(DType::U8, vec![Dim::Sym("batch".into()), Dim::Fixed(8)]);
        let b = f(DType::I8, vec![Dim::Fixed(8), Dim::Fixed(4)]);
        let out = ops::infer(OpKind::MatMulInteger, &Attrs::new(), &[Some(&a), Some(&b)])
            .unwrap()
            .remove(0);
        assert_eq!(out.ty.dtype, DType::I32);
        assert_eq!(
            out.ty.shape,
            Shape::new(vec![Dim::Sym("batch".into()), Dim::Fixed(4)])
        );
        let s = f(DType::F32, vec![]);
        let zy = f(DType::I8, vec![]);
        let out = ops::infer(
            OpKind::QLinearMatMul,
            &Attrs::new(),
            &[
                Some(&a),
                Some(&s),
                Some(&zy),
                Some(&b),
                Some(&s),
                Some(&zy),
                Some(&s),
                Some(&zy),
            ],
        )
        .unwrap()
        .remove(0);
        assert_eq!(out.ty.dtype, DType::I8);
        let fl = f(DType::F32, vec![Dim::Fixed(8), Dim::Fixed(4)]);
        assert!(ops::infer(OpKind::MatMulInteger, &Attrs::new(), &[Some(&a), Some(&fl)]).is_err());
    }
}
