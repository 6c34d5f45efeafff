//! Prepared 8-bit convolutions, `conv_integer` and `qlinear_conv`, of any geometry (1-D to
//! 3-D and up, strides, dilations, pads, auto_pad, groups) on the exact int8 GEMM
//! ([`super::gemm_i8`]): per image and group, `Yᵀ[P, OC_g] = (colsᵀ − x_zp)·(W_gᵀ − w_zp)`,
//! where `colsᵀ[P, C_g·k]` is im2col's byte matrix (padding reads `x_zp`, so it adds zero, as
//! in the reference) and `W_gᵀ[C_g·k, OC_g]` is packed once when the weight is a constant.
//! `conv_integer` stores the i32 sums; `qlinear_conv` adds its i32 bias and requantises as
//! the reference does (`saturate(round_half_even(acc · f32(f32(s_x·s_w)/s_y)) + z_y)`, the
//! product in f64), so both are equal to the interpreter's, element for element. The GEMM's
//! row blocks (output pixels) run on the pool. Forms the reference takes that this does not
//! (non-f32 scales, zero points of other shapes) return `None`: the interpreter runs them.

use super::gemm_i8::{self, Bytes, IsaI8, PackedB8};
use crate::pool::Pool;
use kiln_ir::ops::linalg::conv_geometry;
use kiln_ir::{Attrs, DType, OpKind, Tensor};

/// A conv_integer or qlinear_conv node prepared once: its attributes and, when the weight
/// is a constant, `W_gᵀ` per group packed for the integer GEMM.
#[derive(Debug)]
pub struct PreparedConvI8 {
    op: OpKind,
    attrs: Attrs,
    /// The weight's shape and its per-group packing.
    packed: Option<(Vec<usize>, Vec<PackedB8>)>,
    /// The input and weight shapes last seen and [`sources`] for them.
    #[allow(clippy::type_complexity)]
    sources: std::sync::Mutex<Option<(Vec<usize>, Vec<usize>, std::sync::Arc<Vec<u32>>)>>,
}

/// An 8-bit tensor's elements.
fn bytes(t: &Tensor) -> Option<Bytes<'_>> {
    match t.dtype() {
        DType::U8 => t.as_slice::<u8>().map(Bytes::U8),
        DType::I8 => t.as_slice::<i8>().map(Bytes::I8),
        _ => None,
    }
}

/// `W_gᵀ` (`[C_g·k, OC_g]`, row-major) of every group, packed.
fn pack_groups(w: &Tensor, group: usize) -> Option<Vec<PackedB8>> {
    let m = *w.shape().first()?;
    if group == 0 || m % group != 0 {
        return None;
    }
    let ckk: usize = w.shape()[1..].iter().product();
    let mg = m / group;
    fn tr<T: Copy + Default>(v: &[T], g: usize, mg: usize, ckk: usize) -> Vec<T> {
        let mut out = vec![T::default(); ckk * mg];
        for o in 0..mg {
            for kk in 0..ckk {
                out[kk * mg + o] = v[(g * mg + o) * ckk + kk];
            }
        }
        out
    }
    (0..group)
        .map(|g| {
            let packed = match bytes(w)? {
                Bytes::U8(v) => PackedB8::pack(Bytes::U8(&tr(v, g, mg, ckk)), ckk, mg),
                Bytes::I8(v) => PackedB8::pack(Bytes::I8(&tr(v, g, mg, ckk)), ckk, mg),
            };
            packed.ok()
        })
        .collect()
}

/// The group count of `attrs` (0 when it is not a positive integer).
fn group_of(attrs: &Attrs) -> usize {
    attrs
        .int_or("group", 1)
        .ok()
        .and_then(|g| usize::try_from(g).ok())
        .unwrap_or(0)
}

/// A zero point as i32 values: absent (zero), one value, or (`per_channel`) one per
/// output channel; it must have its operand's dtype. `None` for any other form.
fn zero_point(
    z: Option<&Tensor>,
    operand: &Tensor,
    per_channel: Option<usize>,
) -> Option<Vec<i32>> {
    let Some(z) = z else {
        return Some(vec![0]);
    };
    if z.dtype() != operand.dtype() {
        return None;
    }
    let ok = z.len() == 1 || per_channel.is_some_and(|m| z.shape() == [m]);
    ok.then(|| z.to_i64s().into_iter().map(|v| v as i32).collect())
}

/// One f32 value, or (`per_channel`) one per output channel, as f64.
fn scale(t: &Tensor, per_channel: Option<usize>) -> Option<Vec<f64>> {
    let ok = t.len() == 1 || per_channel.is_some_and(|m| t.shape() == [m]);
    let v = t.as_slice::<f32>().filter(|_| ok)?;
    Some(v.iter().map(|&x| f64::from(x)).collect())
}

/// im2col's transpose for one image and group into `cols`: `cols[p, ci·k + ki]` = the input
/// channel `ci` read at kernel offset `ki` for output pixel `p`, `zp` in the padding; `src`
/// is pixel-major (`src[p·k + ki]`), so each pixel's offsets are read once per channel
/// from one cache line or two.
fn gather<T: Copy>(
    img: &[T],
    zp: T,
    src: &[u32],
    (cg, k, in_sp): (usize, usize, usize),
    cols: &mut Vec<T>,
) {
    let p = src.len() / k.max(1);
    cols.clear();
    cols.reserve(p * cg * k);
    for offs in src.chunks_exact(k) {
        for ci in 0..cg {
            let xc = &img[ci * in_sp..][..in_sp];
            cols.extend(
                offs.iter()
                    .map(|&s| if s == u32::MAX { zp } else { xc[s as usize] }),
            );
        }
    }
}

/// `v` rounded to the nearest integer, ties to even, for `|v| < 2⁵¹` (as
/// `f64::round_ties_even`, without a libm call on baseline x86-64); larger values stay
/// beyond any 8-bit range, so after the clamp the result is the same.
#[inline(always)]
fn round_even(v: f64) -> f64 {
    const MAGIC: f64 = 6_755_399_441_055_744.0; // 1.5 · 2⁵²
    (v + MAGIC) - MAGIC
}

/// For each output pixel and kernel offset, the input offset it reads (`u32::MAX`:
/// padding), pixel-major; `None` when the input is too large for u32 offsets.
fn sources(geo: &kiln_ir::ops::linalg::ConvGeometry, xs: &[usize]) -> Option<Vec<u32>> {
    let nsp = xs.len() - 2;
    let in_sp: usize = xs[2..].iter().product();
    if in_sp >= u32::MAX as usize {
        return None;
    }
    let ksize: usize = geo.kernel.iter().product();
    let p: usize = geo.out.iter().product();
    let in_st = kiln_ir::tensor::strides(&xs[2..]);
    let mut src = vec![u32::MAX; ksize * p];
    let mut kix = vec![0usize; nsp];
    for ki in 0..ksize {
        let mut o = vec![0usize; nsp];
        for pi in 0..p {
            let mut off = Some(0usize);
            for a in 0..nsp {
                let pos = (o[a] * geo.strides[a] + kix[a] * geo.dilations[a]) as i64
                    - geo.pads_begin[a] as i64;
                off = match off {
                    Some(v) if (0..xs[2 + a] as i64).contains(&pos) => {
                        Some(v + pos as usize * in_st[a])
                    }
                    _ => None,
                };
            }
            if let Some(v) = off {
                src[pi * ksize + ki] = v as u32;
            }
            for a in (0..nsp).rev() {
                o[a] += 1;
                if o[a] < geo.out[a] {
                    break;
                }
                o[a] = 0;
            }
        }
        for a in (0..nsp).rev() {
            kix[a] += 1;
            if kix[a] < geo.kernel[a] {
                break;
            }
            kix[a] = 0;
        }
    }
    Some(src)
}

impl PreparedConvI8 {
    /// Prepares `op` (`conv_integer` or `qlinear_conv`) with `attrs`; `w` is packed now
    /// when it is a constant.
    pub fn new(op: OpKind, attrs: &Attrs, w: Option<&Tensor>) -> Option<Self> {
        if !matches!(op, OpKind::ConvInteger | OpKind::QLinearConv) {
            return None;
        }
        let packed = w.and_then(|w| Some((w.shape().to_vec(), pack_groups(w, group_of(attrs))?)));
        Some(PreparedConvI8 {
            op,
            attrs: attrs.clone(),
            packed,
            sources: std::sync::Mutex::new(None),
        })
    }

    /// Whether the weight was packed at prepare time.
    pub fn has_weights(&self) -> bool {
        self.packed.is_some()
    }

    /// The node's output on `ins` (in ONNX's input order), or `None` where the interpreter
    /// runs it.
    pub fn run(&self, ins: &[Option<&Tensor>], pool: &Pool) -> Option<Result<Tensor, String>> {
        let arg = |i: usize| ins.get(i).copied().flatten();
        let q = self.op == OpKind::QLinearConv;
        let (x, w) = if q {
            (arg(0)?, arg(3)?)
        } else {
            (arg(0)?, arg(1)?)
        };
        let (zx, zw) = if q {
            (arg(2), arg(5))
        } else {
            (arg(2), arg(3))
        };
        let (xs, ws) = (x.shape(), w.shape());
        let geo = conv_geometry(&self.attrs, xs, ws).ok()?;
        let (n, c, m) = (xs[0], xs[1], ws[0]);
        let group = geo.group;
        let (cg, mg) = (c / group, m / group);
        let ksize: usize = geo.kernel.iter().product();
        let (ckk, p, in_sp) = (
            cg * ksize,
            geo.out.iter().product::<usize>(),
            xs[2..].iter().product::<usize>(),
        );
        if ckk == 0 || p == 0 || mg == 0 || n == 0 {
            return None;
        }
        let zx = zero_point(zx, x, None)?;
        let zw = zero_point(zw, w, Some(m))?;
        // qlinear_conv: scales, output zero point and dtype, bias.
        let requant = if q {
            let (sx, sw, sy, zy) = (
                scale(arg(1)?, None)?,
                scale(arg(4)?, Some(m))?,
                scale(arg(6)?, None)?,
                arg(7),
            );
            let ydt = zy.map_or(x.dtype(), Tensor::dtype);
            if !matches!(ydt, DType::I8 | DType::U8) || zy.is_some_and(|z| z.len() != 1) {
                return None;
            }
            // The scale and zero point of the weight must have one shape.
            if arg(5).is_some_and(|z| {
                z.shape() != arg(4).map_or(&[][..], Tensor::shape)
                    && !(z.len() == 1 && sw.len() == 1)
            }) {
                return None;
            }
            let bias = match arg(8) {
                Some(b) if b.dtype() == DType::I32 && b.shape() == [m] => {
                    Some(b.as_slice::<i32>()?)
                }
                Some(_) => return None,
                None => None,
            };
            // The multiplier per output channel, each step rounded to f32 as in the reference.
            let mult: Vec<f64> = (0..m)
                .map(|o| {
                    let sxw = f64::from((sx[0] * sw[if sw.len() == 1 { 0 } else { o }]) as f32);
                    f64::from((sxw / sy[0]) as f32)
                })
                .collect();
            let z = zy.map_or(0.0, |z| z.to_f64s()[0]);
            Some((mult, z, ydt, bias))
        } else {
            None
        };
        // Which input each output pixel reads, cached for the last shapes seen.
        let src = {
            let mut cached = self.sources.lock().unwrap_or_else(|e| e.into_inner());
            match cached.as_ref().filter(|(x, w, _)| x == xs && w == ws) {
                Some((_, _, s)) => s.clone(),
                None => {
                    let s = std::sync::Arc::new(sources(&geo, xs)?);
                    *cached = Some((xs.to_vec(), ws.to_vec(), s.clone()));
                    s
                }
            }
        };
        let here;
        let packs = match &self.packed {
            Some((shape, packs)) if shape == ws && packs.len() == group => packs,
            _ => {
                here = pack_groups(w, group)?;
                &here
            }
        };
        let mut acc = vec![0i32; n * m * p];
        let mut yt = vec![0i32; p * mg];
        let (mut cols_u, mut cols_i) = (Vec::new(), Vec::new());
        for ni in 0..n {
            for g in 0..group {
                let zb: Vec<i32> = if zw.len() == 1 {
                    zw.clone()
                } else {
                    zw[g * mg..(g + 1) * mg].to_vec()
                };
                let at = (ni * c + g * cg) * in_sp;
                let r = match bytes(x)? {
                    Bytes::U8(v) => {
                        let img = &v[at..at + cg * in_sp];
                        gather(img, zx[0] as u8, &src, (cg, ksize, in_sp), &mut cols_u);
                        gemm_i8::matmul_integer(
                            Bytes::U8(&cols_u),
                            p,
                            &zx,
                            &packs[g],
                            &zb,
                            &mut yt,
                            pool,
                            IsaI8::Auto,
                        )
                    }
                    Bytes::I8(v) => {
                        let img = &v[at..at + cg * in_sp];
                        gather(img, zx[0] as i8, &src, (cg, ksize, in_sp), &mut cols_i);
                        gemm_i8::matmul_integer(
                            Bytes::I8(&cols_i),
                            p,
                            &zx,
                            &packs[g],
                            &zb,
                            &mut yt,
                            pool,
                            IsaI8::Auto,
                        )
                    }
                };
                if let Err(e) = r {
                    return Some(Err(format!("{}: {e}", self.op.name())));
                }
                for o in 0..mg {
                    let dst = &mut acc[(ni * m + g * mg + o) * p..][..p];
                    for (pi, d) in dst.iter_mut().enumerate() {
                        *d = yt[pi * mg + o];
                    }
                }
            }
        }
        let mut shape = vec![n, m];
        shape.extend_from_slice(&geo.out);
        let Some((mult, z, ydt, bias)) = requant else {
            return Some(Ok(Tensor::from_vec(shape, acc)));
        };
        let (lo, hi) = if ydt == DType::I8 {
            (-128.0, 127.0)
        } else {
            (0.0, 255.0)
        };
        // Row by row (one output channel of one image each): its multiplier and bias once.
        fn requantise<T>(
            acc: &[i32],
            p: usize,
            m: usize,
            (mult, bias, z, lo, hi): (&[f64], Option<&[i32]>, f64, f64, f64),
            to: impl Fn(f64) -> T,
        ) -> Vec<T> {
            let mut out = Vec::with_capacity(acc.len());
            for (r, row) in acc.chunks_exact(p).enumerate() {
                let ch = r % m;
                let (mu, b) = (mult[ch], bias.map_or(0, |b| b[ch]));
                out.extend(row.iter().map(|&a| {
                    to((round_even(f64::from(a.wrapping_add(b)) * mu) + z).clamp(lo, hi))
                }));
            }
            out
        }
        let params = (&mult[..], bias, z, lo, hi);
        Some(Ok(if ydt == DType::I8 {
            Tensor::from_vec(shape, requantise(&acc, p, m, params, |v| v as i8))
        } else {
            Tensor::from_vec(shape, requantise(&acc, p, m, params, |v| v as u8))
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::Attr;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn t8(rng: &mut StdRng, shape: &[usize], signed: bool) -> Tensor {
        let n: usize = shape.iter().product();
        if signed {
            Tensor::from_vec(shape.to_vec(), (0..n).map(|_| rng.gen::<i8>()).collect())
        } else {
            Tensor::from_vec(shape.to_vec(), (0..n).map(|_| rng.gen::<u8>()).collect())
        }
    }

    #[test]
    fn round_even_is_round_ties_even_below_two_to_the_51() {
        let mut rng = StdRng::seed_from_u64(3);
        let ties = [
            0.5,
            1.5,
            2.5,
            -0.5,
            -1.5,
            -2.5,
            0.0,
            -0.0,
            3.49999,
            1e15 + 0.5,
            -1e15 - 0.5,
        ];
        let random = (0..10_000).map(|_| rng.gen_range(-1e6f64..1e6));
        for v in ties.into_iter().chain(random) {
            assert_eq!(round_even(v), v.round_ties_even(), "{v}");
        }
    }

    /// Random 1-D to 3-D geometries (groups, strides, dilations, pads, auto_pad), u8 and i8
    /// operands, zero points per tensor or per channel: both ops equal the interpreter's
    /// output element for element, with the weight packed at prepare time or per call.
    #[test]
    fn integer_convs_equal_the_interpreter_on_random_geometries() {
        let pools = [Pool::single(), Pool::new(3).unwrap()];
        let mut checked = 0;
        for seed in [1u64, 2, 3, 4] {
            let mut rng = StdRng::seed_from_u64(seed);
            for i in 0..40 {
                let nsp = [1, 2, 2, 3][rng.gen_range(0..4)];
                let group = if i % 3 == 0 { rng.gen_range(2..4) } else { 1 };
                let (cg, mg) = (rng.gen_range(1..5), rng.gen_range(1..9));
                let k: Vec<usize> = (0..nsp).map(|_| rng.gen_range(1..4)).collect();
                let side = if nsp == 3 { 6 } else { 12 };
                let spatial: Vec<usize> = (0..nsp).map(|_| rng.gen_range(1..side)).collect();
                let mut attrs = Attrs::new().with("group", Attr::Int(group as i64)).with(
                    "strides",
                    Attr::Ints((0..nsp).map(|_| rng.gen_range(1..3)).collect()),
                );
                if rng.gen_bool(0.3) {
                    let ap = ["SAME_UPPER", "SAME_LOWER", "VALID"][rng.gen_range(0..3)];
                    attrs = attrs.with("auto_pad", Attr::Str(ap.into()));
                } else {
                    attrs = attrs
                        .with(
                            "pads",
                            Attr::Ints((0..2 * nsp).map(|_| rng.gen_range(0..3)).collect()),
                        )
                        .with(
                            "dilations",
                            Attr::Ints((0..nsp).map(|_| rng.gen_range(1..3)).collect()),
                        );
                }
                let (sx, sw, sy) = (rng.gen_bool(0.5), rng.gen_bool(0.5), rng.gen_bool(0.5));
                let mut xs = vec![rng.gen_range(1..3), cg * group];
                xs.extend(&spatial);
                let m = mg * group;
                let mut ws = vec![m, cg];
                ws.extend(&k);
                let x = t8(&mut rng, &xs, sx);
                let w = t8(&mut rng, &ws, sw);
                let zx = t8(&mut rng, &[], sx);
                let zw_shape = if rng.gen_bool(0.5) { vec![m] } else { vec![] };
                let zw = t8(&mut rng, &zw_shape, sw);
                let x_scale = Tensor::scalar(rng.gen_range(0.001f32..0.05));
                let w_scale = if zw_shape.is_empty() {
                    Tensor::scalar(rng.gen_range(0.001f32..0.05))
                } else {
                    Tensor::from_vec(
                        vec![m],
                        (0..m).map(|_| rng.gen_range(0.001f32..0.05)).collect(),
                    )
                };
                let y_scale = Tensor::scalar([0.0005f32, 0.01, 0.2][rng.gen_range(0..3)]);
                let zy = t8(&mut rng, &[], sy);
                let bias = Tensor::from_vec(
                    vec![m],
                    (0..m).map(|_| rng.gen_range(-3000i32..3000)).collect(),
                );
                let int_ins = vec![Some(&x), Some(&w), Some(&zx), Some(&zw)];
                let mut q_ins = vec![
                    Some(&x),
                    Some(&x_scale),
                    Some(&zx),
                    Some(&w),
                    Some(&w_scale),
                    Some(&zw),
                    Some(&y_scale),
                    Some(&zy),
                ];
                if rng.gen_bool(0.5) {
                    q_ins.push(Some(&bias));
                }
                for (op, ins, wi) in [
                    (OpKind::ConvInteger, &int_ins, 1),
                    (OpKind::QLinearConv, &q_ins, 3),
                ] {
                    let want = kiln_ir::ops::eval(op, &attrs, ins);
                    for pool in &pools {
                        for constant in [false, true] {
                            let pc = PreparedConvI8::new(
                                op,
                                &attrs,
                                constant.then_some(ins[wi].unwrap()),
                            )
                            .unwrap();
                            assert_eq!(pc.has_weights(), constant);
                            match (pc.run(ins, pool), &want) {
                                (Some(Ok(got)), Ok(want)) => {
                                    assert_eq!(got, want[0], "seed {seed} case {i} {op:?} x {xs:?} w {ws:?} {attrs:?}");
                                    checked += 1;
                                }
                                (None, _) => {}
                                (got, want) => panic!("seed {seed} case {i} {op:?}: native {got:?}, interpreter {want:?}"),
                            }
                        }
                    }
                }
            }
        }
        assert!(checked > 400, "{checked}");
    }
}
