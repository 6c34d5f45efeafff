//! The quant family's per-tensor `quantize_linear` (f32 to u8/i8) and `dequantize_linear`
//! (u8/i8/i32 to f32) natively. Each reproduces the interpreter's arithmetic exactly: the
//! quotient `x / scale` in f32 rounded half to even, the zero point added and clamped
//! (exact integers, so f32 and the interpreter's f64 agree); `(q − zp)·scale` exact in
//! f64 and rounded once. Per-axis or blocked parameters, other dtypes and `output_dtype`
//! attributes return `None`: the interpreter runs those and reports errors.
//!
//! `dynamic_quantize_linear` (f32 to u8 with the scale and zero point of the tensor's
//! range) in two vectorisable passes, equal to the interpreter bit for bit: the range in
//! f32 lanes (a minimum or maximum does not depend on the order; only the sign of a zero
//! could, and the scale and zero point do not), the parameters by the interpreter's own
//! arithmetic, then each `x / scale` rounded half to even by the `1.5·2²³` trick (exact in
//! f32 below 2²², and quotients are clamped into ±1024 first, which cannot change a result
//! that is clamped into 0..=255 after adding a zero point in that range), branch-free so
//! that both passes vectorise. A NaN or an infinity in the input returns `None`: the
//! interpreter reports it.

use crate::pool::Pool;
use kiln_ir::{DType, Node, OpKind, Tensor};

/// Lanes of both passes (four SSE or two AVX registers of f32).
const LANES: usize = 16;
/// `1.5·2²³`: adding and subtracting it rounds an f32 of magnitude below 2²² to the nearest
/// integer, ties to even (the default rounding of f32 addition).
const ROUND_MAGIC: f32 = 12_582_912.0;
/// Quotients are clamped into ±this before rounding (any value past ±255 + 255 saturates).
const QUOTIENT_BOUND: f32 = 1024.0;
/// Elements per parallel chunk of the quantize pass (below two chunks it runs on one thread).
const CHUNK: usize = 1 << 15;

/// `dynamic_quantize_linear(x)`: `[y (u8, x's shape), scale (f32 scalar), zero point (u8
/// scalar)]`, or `None` where the interpreter runs it (not f32, non-finite values).
pub fn dynamic(ins: &[Option<&Tensor>], pool: &Pool) -> Option<Vec<Tensor>> {
    let x = (*ins.first()?)?;
    let v = x.as_slice::<f32>()?;
    let (lo, hi) = range(v)?;
    // The interpreter's arithmetic on the range's ends (it starts its range at 0, so the
    // two ends alone give the same minimum and maximum).
    let (scale, zp) = kiln_ir::ops::quant::dynamic_params(&[lo, hi]).ok()?;
    let mut y = vec![0u8; v.len()];
    if v.len() >= 2 * CHUNK && pool.threads() > 1 {
        let dst = SharedU8(y.as_mut_ptr());
        pool.parallel_ranges(v.len().div_ceil(CHUNK), |r| {
            let (a, b) = (r.start * CHUNK, (r.end * CHUNK).min(v.len()));
            // SAFETY: chunks `r` own elements `a..b` of `y` (len `v.len()`), written only here.
            let out = unsafe { std::slice::from_raw_parts_mut(dst.get().add(a), b - a) };
            quantize(&v[a..b], scale, zp, (0.0, 255.0), out);
        });
    } else {
        quantize(v, scale, zp, (0.0, 255.0), &mut y);
    }
    Some(vec![
        Tensor::from_vec(x.shape().to_vec(), y),
        Tensor::scalar(scale),
        Tensor::scalar(zp as u8),
    ])
}

/// The minimum and maximum of `v` and 0, or `None` when `v` holds a NaN or an infinity.
fn range(v: &[f32]) -> Option<(f32, f32)> {
    let (mut lo, mut hi, mut bad) = ([0f32; LANES], [0f32; LANES], [0f32; LANES]);
    let mut step = |i: usize, e: f32| {
        lo[i] = if e < lo[i] { e } else { lo[i] };
        hi[i] = if e > hi[i] { e } else { hi[i] };
        // `e - e` is 0 for finite values and NaN for a NaN or an infinity.
        #[allow(clippy::eq_op)]
        let nonfinite = e - e;
        bad[i] += nonfinite;
    };
    let chunks = v.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        let c: &[f32; LANES] = c.try_into().expect("a whole chunk");
        for (i, &e) in c.iter().enumerate() {
            step(i, e);
        }
    }
    for (i, &e) in tail.iter().enumerate() {
        step(i, e);
    }
    if bad.iter().any(|b| *b != 0.0) {
        return None;
    }
    let lo = lo.iter().fold(0f32, |a, &b| if b < a { b } else { a });
    let hi = hi.iter().fold(0f32, |a, &b| if b > a { b } else { a });
    Some((lo, hi))
}

/// `y = clamp(round_half_even(x / scale) + zp, lo, hi)` (a NaN giving 0, as the
/// interpreter's saturating cast does), each value's low byte in two's complement, in lanes
/// of [`LANES`]. A scale that is not a normal number (zero, a range so small that it
/// underflowed, an infinity, a NaN) takes the interpreter's own scalar formula.
fn quantize(v: &[f32], scale: f32, zp: f32, (lo, hi): (f32, f32), y: &mut [u8]) {
    if !scale.is_normal() {
        for (o, &e) in y.iter_mut().zip(v) {
            *o = ((e / scale).round_ties_even() + zp).clamp(lo, hi) as i32 as u8;
        }
        return;
    }
    let mut yc = y.chunks_exact_mut(LANES);
    let mut vc = v.chunks_exact(LANES);
    for (o, c) in (&mut yc).zip(&mut vc) {
        let o: &mut [u8; LANES] = o.try_into().expect("a whole chunk");
        let c: &[f32; LANES] = c.try_into().expect("a whole chunk");
        for (o, &e) in o.iter_mut().zip(c) {
            *o = quantize_one(e, scale, zp, lo, hi);
        }
    }
    for (o, &e) in yc.into_remainder().iter_mut().zip(vc.remainder()) {
        *o = quantize_one(e, scale, zp, lo, hi);
    }
}

/// One element of [`quantize`] (normal `scale`, `lo..=hi` within -128..=255), branch-free so
/// that the loops vectorise: the quotient clamped, rounded by [`ROUND_MAGIC`], shifted and
/// clamped, a NaN made 0, and the integer read from the low mantissa bits of
/// `r + ROUND_MAGIC` (exact for |r| < 2²², whose low byte is r's two's complement byte).
#[inline(always)]
fn quantize_one(e: f32, scale: f32, zp: f32, lo: f32, hi: f32) -> u8 {
    let q = e / scale;
    let q = if q < -QUOTIENT_BOUND {
        -QUOTIENT_BOUND
    } else {
        q
    };
    let q = if q > QUOTIENT_BOUND {
        QUOTIENT_BOUND
    } else {
        q
    };
    let r = (q + ROUND_MAGIC) - ROUND_MAGIC + zp;
    let r = if r < lo { lo } else { r };
    let r = if r > hi { hi } else { r };
    #[allow(clippy::eq_op)]
    let r = if r == r { r } else { 0.0 };
    ((r + ROUND_MAGIC).to_bits() & 0xff) as u8
}

/// `y`'s buffer shared by the quantize chunks, which write disjoint ranges.
#[derive(Clone, Copy)]
struct SharedU8(*mut u8);
// SAFETY: each chunk writes only its own range.
unsafe impl Send for SharedU8 {}
// SAFETY: as above.
unsafe impl Sync for SharedU8 {}
impl SharedU8 {
    fn get(self) -> *mut u8 {
        self.0
    }
}

/// The output of a per-tensor quantize/dequantize node, or `None`.
pub fn run(node: &Node, ins: &[Option<&Tensor>]) -> Option<Tensor> {
    if node.attrs.get("output_dtype").is_some() {
        return None;
    }
    let x = (*ins.first()?)?;
    let st = (*ins.get(1)?)?;
    if st.len() != 1 {
        return None;
    }
    let scale = st.as_slice::<f32>()?[0];
    let zp = ins.get(2).copied().flatten();
    if zp.is_some_and(|z| z.len() != 1) {
        return None;
    }
    let shape = x.shape().to_vec();
    match node.op {
        OpKind::QuantizeLinear => {
            let v = x.as_slice::<f32>()?;
            let mut y = vec![0u8; v.len()];
            match zp.map(Tensor::dtype) {
                None | Some(DType::U8) => {
                    let z =
                        zp.map_or(Some(0.0), |z| z.as_slice::<u8>().map(|z| f32::from(z[0])))?;
                    quantize(v, scale, z, (0.0, 255.0), &mut y);
                    Some(Tensor::from_vec(shape, y))
                }
                Some(DType::I8) => {
                    let z = f32::from(zp?.as_slice::<i8>()?[0]);
                    quantize(v, scale, z, (-128.0, 127.0), &mut y);
                    // The low byte of each value in two's complement.
                    let y: Vec<i8> = y.into_iter().map(|b| b as i8).collect();
                    Some(Tensor::from_vec(shape, y))
                }
                _ => None,
            }
        }
        OpKind::DequantizeLinear => {
            if zp.is_some_and(|z| z.dtype() != x.dtype()) {
                return None;
            }
            let s = f64::from(scale);
            let y: Vec<f32> = match x.dtype() {
                DType::U8 => {
                    let z =
                        zp.map_or(Some(0.0), |z| z.as_slice::<u8>().map(|z| f64::from(z[0])))?;
                    x.as_slice::<u8>()?
                        .iter()
                        .map(|&q| ((f64::from(q) - z) * s) as f32)
                        .collect()
                }
                DType::I8 => {
                    let z =
                        zp.map_or(Some(0.0), |z| z.as_slice::<i8>().map(|z| f64::from(z[0])))?;
                    x.as_slice::<i8>()?
                        .iter()
                        .map(|&q| ((f64::from(q) - z) * s) as f32)
                        .collect()
                }
                DType::I32 => {
                    let z =
                        zp.map_or(Some(0.0), |z| z.as_slice::<i32>().map(|z| f64::from(z[0])))?;
                    x.as_slice::<i32>()?
                        .iter()
                        .map(|&q| ((f64::from(q) - z) * s) as f32)
                        .collect()
                }
                _ => return None,
            };
            Some(Tensor::from_vec(shape, y))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::{Attrs, ValueId};

    fn node(op: OpKind, n_in: u32) -> Node {
        Node {
            op,
            attrs: Attrs::new(),
            inputs: (0..n_in).map(|i| Some(ValueId(i))).collect(),
            outputs: vec![ValueId(n_in)],
            name: String::new(),
        }
    }

    #[test]
    fn per_tensor_quantize_and_dequantize_match_the_interpreter_bit_for_bit() {
        let xs: Vec<f32> = (0..400)
            .map(|i| (i as f32 - 200.0) * 0.173)
            // Quotients at every half step (ties) for the 0.25 scale.
            .chain((-600..600).map(|k| k as f32 * 0.125))
            .chain([0.5, 1.5, -0.5, -2.5, 1e9, -1e9, f32::NAN, f32::INFINITY])
            .chain([
                f32::NEG_INFINITY,
                -0.0,
                f32::from_bits(0x7fc0_00ff),
                -f32::NAN,
            ])
            .collect();
        let x = Tensor::from_vec(vec![xs.len()], xs);
        for odd in [-0.3f32, 0.0, 1e-40, f32::INFINITY] {
            let s = Tensor::scalar(odd);
            for zp in [Tensor::scalar(7u8), Tensor::scalar(-3i8)] {
                let ins = [Some(&x), Some(&s), Some(&zp)];
                let n = node(OpKind::QuantizeLinear, 3);
                let want = kiln_ir::ops::eval(n.op, &n.attrs, &ins).expect("reference");
                assert_eq!(run(&n, &ins).expect("native"), want[0], "scale {odd}");
            }
        }
        let scale = Tensor::scalar(0.25f32);
        let zps = [
            None,
            Some(Tensor::scalar(7u8)),
            Some(Tensor::scalar(-3i8)),
            Some(Tensor::from_vec(vec![1], vec![128u8])),
        ];
        for zp in &zps {
            let ins = [Some(&x), Some(&scale), zp.as_ref()];
            let n = node(OpKind::QuantizeLinear, 3);
            let want = kiln_ir::ops::eval(n.op, &n.attrs, &ins).expect("reference");
            let q = run(&n, &ins).expect("native");
            assert_eq!(q, want[0], "quantize, zero point {zp:?}");
            let dins = [Some(&q), Some(&scale), zp.as_ref()];
            let d = node(OpKind::DequantizeLinear, 3);
            let want = kiln_ir::ops::eval(d.op, &d.attrs, &dins).expect("reference");
            assert_eq!(
                run(&d, &dins).expect("native"),
                want[0],
                "dequantize {zp:?}"
            );
        }
        let acc = Tensor::from_vec(vec![4], vec![i32::MIN, -5, 0, i32::MAX]);
        let d = node(OpKind::DequantizeLinear, 2);
        let ins = [Some(&acc), Some(&scale)];
        let want = kiln_ir::ops::eval(d.op, &d.attrs, &ins).expect("reference");
        assert_eq!(run(&d, &ins).expect("native"), want[0]);
        // Per-axis scales go to the interpreter.
        let axis = Tensor::from_vec(vec![2], vec![0.5f32, 0.25]);
        let x2 = Tensor::from_vec(vec![2, 2], vec![1f32, 2.0, 3.0, 4.0]);
        assert!(run(&node(OpKind::QuantizeLinear, 2), &[Some(&x2), Some(&axis)]).is_none());
    }

    /// Bit patterns of an f32 slice (so that a NaN compares equal to itself only by bits).
    fn bits(t: &Tensor) -> Vec<u32> {
        t.as_slice::<f32>()
            .unwrap()
            .iter()
            .map(|f| f.to_bits())
            .collect()
    }

    #[test]
    fn dynamic_quantize_equals_the_interpreter_bit_for_bit() {
        let mut s = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32
        };
        let mut cases: Vec<Vec<f32>> = vec![
            vec![],
            vec![0.0; 5],
            vec![-0.0, 0.0, -0.0],
            vec![1.0, 2.0, 3.0],
            vec![-1.0, -7.5],
            // Ties at every step of the quotient, both signs.
            (0..600)
                .map(|i| (i as f32 - 300.0) * (1003.0 / 255.0) * 0.5)
                .collect(),
            // A denormal range: the scale underflows to 0.
            vec![1e-45, 0.0, 2e-45],
            vec![f32::MAX, f32::MIN],
            vec![3.4e38, 1.0],
        ];
        for n in [1, 7, 8, 9, 31, 1000, 70_001] {
            let (a, b) = (next() * 20.0 - 10.0, next() * 3.0);
            cases.push((0..n).map(|_| a + b * (next() - 0.5)).collect());
        }
        let pools = [Pool::single(), Pool::new(2).expect("pool")];
        for (ci, c) in cases.iter().enumerate() {
            let x = Tensor::from_vec(vec![c.len()], c.clone());
            let want = kiln_ir::ops::eval(
                OpKind::DynamicQuantizeLinear,
                &Default::default(),
                &[Some(&x)],
            )
            .expect("reference");
            for pool in &pools {
                let got = dynamic(&[Some(&x)], pool).expect("native");
                assert_eq!(got[0], want[0], "case {ci}: values");
                assert_eq!(bits(&got[1]), bits(&want[1]), "case {ci}: scale");
                assert_eq!(got[2], want[2], "case {ci}: zero point");
            }
        }
        // A NaN or an infinity anywhere: the interpreter runs (and reports it).
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for at in [0, 5, 12] {
                let mut v = vec![0.5f32; 13];
                v[at] = bad;
                let x = Tensor::from_vec(vec![13], v);
                assert!(
                    dynamic(&[Some(&x)], &Pool::single()).is_none(),
                    "{bad} at {at}"
                );
                assert!(kiln_ir::ops::eval(
                    OpKind::DynamicQuantizeLinear,
                    &Default::default(),
                    &[Some(&x)]
                )
                .is_err());
            }
        }
        let ints = Tensor::from_vec(vec![2], vec![1i64, 2]);
        assert!(dynamic(&[Some(&ints)], &Pool::single()).is_none());
    }
}
