//! Shared loops for the op families (elementwise, reduce, nn, linalg, pool): broadcasting
//! index maps, per-dtype scalar arithmetic, the dense matmul loop, and attribute helpers.
//! Written once here so each op in the family files is a line or a short function.

use super::Fact;
use crate::tensor::strides;
use crate::{Attrs, DType, Elem, Shape, Tensor, TensorData, TensorType};

/// A fact carrying only a dtype and a shape.
pub(crate) fn fact(dtype: DType, shape: Shape) -> Fact {
    Fact::of(TensorType::new(dtype, shape))
}

/// Broadcasts several concrete shapes together, or says which do not fit.
pub(crate) fn broadcast_all(shapes: &[&[usize]]) -> Result<Vec<usize>, String> {
    let mut out: Vec<usize> = Vec::new();
    for s in shapes {
        out = crate::shape::broadcast_concrete(&out, s)
            .ok_or_else(|| format!("cannot broadcast shapes {shapes:?}"))?;
    }
    Ok(out)
}

/// For each element of `out` (row-major), the offset of the element of a tensor of shape
/// `inp` (right-aligned, broadcast) that it reads. Invariant: `inp` broadcasts to `out`.
pub(crate) fn bcast_offsets(out: &[usize], inp: &[usize]) -> Vec<usize> {
    let n: usize = out.iter().product();
    let rank = out.len();
    let in_strides = strides(inp);
    // Stride of the input along each output axis; 0 where broadcast.
    let mut st = vec![0usize; rank];
    for i in 0..inp.len() {
        let o = rank - inp.len() + i;
        if inp[i] != 1 {
            st[o] = in_strides[i];
        }
    }
    let mut offs = Vec::with_capacity(n);
    if n == 0 {
        return offs;
    }
    if rank == 0 {
        offs.push(0);
        return offs;
    }
    let inner = out[rank - 1];
    let inner_st = st[rank - 1];
    let mut idx = vec![0usize; rank];
    let mut base = 0usize;
    loop {
        for j in 0..inner {
            offs.push(base + j * inner_st);
        }
        // Advance the odometer over the outer axes.
        let mut ax = rank - 1;
        loop {
            if ax == 0 {
                return offs;
            }
            ax -= 1;
            idx[ax] += 1;
            base += st[ax];
            if idx[ax] < out[ax] {
                break;
            }
            base -= st[ax] * idx[ax];
            idx[ax] = 0;
        }
    }
}

/// Reads `v` at the broadcast offsets for `out`, without the offset table when the shape
/// already equals `out` or is a single element.
pub(crate) enum Bc<'a, T> {
    Same(&'a [T]),
    Splat(T),
    Map(&'a [T], Vec<usize>),
}

impl<'a, T: Copy> Bc<'a, T> {
    pub(crate) fn new(v: &'a [T], shape: &[usize], out: &[usize]) -> Bc<'a, T> {
        let n: usize = shape.iter().product();
        if shape == out {
            Bc::Same(v)
        } else if n == 1 && !v.is_empty() {
            Bc::Splat(v[0])
        } else {
            Bc::Map(v, bcast_offsets(out, shape))
        }
    }
    #[inline]
    pub(crate) fn get(&self, i: usize) -> T {
        match self {
            Bc::Same(v) => v[i],
            Bc::Splat(x) => *x,
            Bc::Map(v, o) => v[o[i]],
        }
    }
}

/// Applies `f` elementwise over two broadcast operands.
pub(crate) fn zip2<A: Copy, B: Copy, O>(
    a: &[A],
    ash: &[usize],
    b: &[B],
    bsh: &[usize],
    mut f: impl FnMut(A, B) -> Result<O, String>,
) -> Result<(Vec<usize>, Vec<O>), String> {
    let out = crate::shape::broadcast_concrete(ash, bsh)
        .ok_or_else(|| format!("cannot broadcast {ash:?} with {bsh:?}"))?;
    let n = checked_numel(&out)?;
    let (ba, bb) = (Bc::new(a, ash, &out), Bc::new(b, bsh, &out));
    let mut v = Vec::with_capacity(n);
    for i in 0..n {
        v.push(f(ba.get(i), bb.get(i))?);
    }
    Ok((out, v))
}

/// Splits a shape around `axis` into (outer, axis length, inner) element counts.
pub(crate) fn split_axis(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    let outer = shape[..axis].iter().product();
    let len = shape.get(axis).copied().unwrap_or(1);
    let inner = shape[(axis + 1).min(shape.len())..].iter().product();
    (outer, len, inner)
}

/// Builds a tensor of `dtype` from f64 values.
pub(crate) fn from_f64s(dtype: DType, shape: Vec<usize>, v: Vec<f64>) -> Result<Tensor, String> {
    Tensor::new(shape, TensorData::from_f64s(dtype, v.into_iter()))
}

/// Applies `f` to every element through f64, keeping the dtype.
pub(crate) fn map_f64(t: &Tensor, f: impl Fn(f64) -> f64) -> Result<Tensor, String> {
    let data = crate::dispatch!(t.data(), v, T => {
        <T as Elem>::wrap(v.iter().map(|&x| <T as Elem>::from_f64(f(Elem::to_f64(x)))).collect())
    });
    Tensor::new(t.shape().to_vec(), data)
}

/// Applies `f` to every element through f64, giving a bool tensor.
pub(crate) fn test_f64(t: &Tensor, f: impl Fn(f64) -> bool) -> Result<Tensor, String> {
    let v: Vec<bool> = crate::dispatch!(t.data(), v, T => {
        v.iter().map(|&x| f(Elem::to_f64(x))).collect()
    });
    Tensor::new(t.shape().to_vec(), TensorData::Bool(v.into()))
}

/// Per-dtype scalar arithmetic with ONNX semantics: integers wrap, integer division by
/// zero is an error, f16/bf16 compute in f32 and round back.
pub(crate) trait Num: Elem {
    fn add(self, o: Self) -> Self;
    fn sub(self, o: Self) -> Self;
    fn mul(self, o: Self) -> Self;
    /// Division; integers truncate toward zero.
    fn div(self, o: Self) -> Result<Self, String>;
    /// Remainder: `fmod` takes the dividend's sign, otherwise the divisor's.
    fn rem(self, o: Self, fmod: bool) -> Result<Self, String>;
    /// Maximum, propagating NaN.
    fn max_(self, o: Self) -> Self;
    /// Minimum, propagating NaN.
    fn min_(self, o: Self) -> Self;
    fn neg(self) -> Self;
    fn abs_(self) -> Self;
    fn zero() -> Self;
    fn one() -> Self;
    /// The smallest value (-inf for floats).
    fn lowest() -> Self;
    /// The largest value (+inf for floats).
    fn highest() -> Self;
}

fn div_zero() -> String {
    "integer division by zero".to_string()
}

macro_rules! num_int {
    ($($t:ty),*) => {$(
        impl Num for $t {
            #[inline] fn add(self, o: Self) -> Self { self.wrapping_add(o) }
            #[inline] fn sub(self, o: Self) -> Self { self.wrapping_sub(o) }
            #[inline] fn mul(self, o: Self) -> Self { self.wrapping_mul(o) }
            fn div(self, o: Self) -> Result<Self, String> {
                if o == 0 { return Err(div_zero()); }
                Ok(self.wrapping_div(o))
            }
            #[allow(unused_comparisons)]
            fn rem(self, o: Self, fmod: bool) -> Result<Self, String> {
                if o == 0 { return Err(div_zero()); }
                let r = self.wrapping_rem(o);
                if !fmod && r != 0 && ((r < 0) != (o < 0)) {
                    return Ok(r.wrapping_add(o));
                }
                Ok(r)
            }
            #[inline] fn max_(self, o: Self) -> Self { if o > self { o } else { self } }
            #[inline] fn min_(self, o: Self) -> Self { if o < self { o } else { self } }
            #[allow(unused_comparisons)]
            #[inline] fn neg(self) -> Self { (0 as $t).wrapping_sub(self) }
            #[allow(unused_comparisons)]
            #[inline] fn abs_(self) -> Self { if self < 0 { self.neg() } else { self } }
            fn zero() -> Self { 0 }
            fn one() -> Self { 1 }
            fn lowest() -> Self { <$t>::MIN }
            fn highest() -> Self { <$t>::MAX }
        }
    )*};
}
num_int!(i8, i16, i32, i64, u8, u16, u32, u64);

fn float_rem(a: f64, b: f64, fmod: bool) -> f64 {
    let r = a % b;
    if !fmod && r != 0.0 && ((r < 0.0) != (b < 0.0)) {
        r + b
    } else {
        r
    }
}

macro_rules! num_float {
    ($t:ty, $to:expr, $from:expr) => {
        impl Num for $t {
            #[inline]
            fn add(self, o: Self) -> Self {
                $from($to(self) + $to(o))
            }
            #[inline]
            fn sub(self, o: Self) -> Self {
                $from($to(self) - $to(o))
            }
            #[inline]
            fn mul(self, o: Self) -> Self {
                $from($to(self) * $to(o))
            }
            #[inline]
            fn div(self, o: Self) -> Result<Self, String> {
                Ok($from($to(self) / $to(o)))
            }
            fn rem(self, o: Self, fmod: bool) -> Result<Self, String> {
                Ok($from(float_rem($to(self) as f64, $to(o) as f64, fmod) as _))
            }
            #[inline]
            fn max_(self, o: Self) -> Self {
                if $to(self).is_nan() || $to(o).is_nan() {
                    $from(f32::NAN as _)
                } else if $to(o) > $to(self) {
                    o
                } else {
                    self
                }
            }
            #[inline]
            fn min_(self, o: Self) -> Self {
                if $to(self).is_nan() || $to(o).is_nan() {
                    $from(f32::NAN as _)
                } else if $to(o) < $to(self) {
                    o
                } else {
                    self
                }
            }
            #[inline]
            fn neg(self) -> Self {
                $from(-$to(self))
            }
            #[inline]
            fn abs_(self) -> Self {
                $from($to(self).abs())
            }
            fn zero() -> Self {
                $from(0.0)
            }
            fn one() -> Self {
                $from(1.0)
            }
            fn lowest() -> Self {
                $from(f32::NEG_INFINITY as _)
            }
            fn highest() -> Self {
                $from(f32::INFINITY as _)
            }
        }
    };
}
num_float!(f32, |x: f32| x, |x: f32| x);
num_float!(f64, |x: f64| x, |x: f64| x);
num_float!(half::f16, |x: half::f16| x.to_f32(), |x: f32| {
    half::f16::from_f32(x)
});
num_float!(half::bf16, |x: half::bf16| x.to_f32(), |x: f32| {
    half::bf16::from_f32(x)
});

/// Bool never reaches arithmetic (the ops reject it first); these keep `dispatch!` total.
impl Num for bool {
    fn add(self, o: Self) -> Self {
        self | o
    }
    fn sub(self, o: Self) -> Self {
        self ^ o
    }
    fn mul(self, o: Self) -> Self {
        self & o
    }
    fn div(self, _: Self) -> Result<Self, String> {
        Err("arithmetic on bool".into())
    }
    fn rem(self, _: Self, _: bool) -> Result<Self, String> {
        Err("arithmetic on bool".into())
    }
    fn max_(self, o: Self) -> Self {
        self | o
    }
    fn min_(self, o: Self) -> Self {
        self & o
    }
    fn neg(self) -> Self {
        self
    }
    fn abs_(self) -> Self {
        self
    }
    fn zero() -> Self {
        false
    }
    fn one() -> Self {
        true
    }
    fn lowest() -> Self {
        false
    }
    fn highest() -> Self {
        true
    }
}

/// `c[m×n] += a[m×k] · b[k×n]`, all row-major and contiguous. The i-k-j order walks rows
/// of `b` and `c` contiguously, so the inner loop is a plain axpy the compiler vectorises.
pub(crate) fn matmul_acc<T>(a: &[T], b: &[T], c: &mut [T], m: usize, k: usize, n: usize)
where
    T: Copy + std::ops::Mul<Output = T> + std::ops::Add<Output = T>,
{
    if n == 0 || k == 0 {
        return;
    }
    for (a_row, c_row) in a.chunks_exact(k).zip(c.chunks_exact_mut(n)).take(m) {
        for (&aik, b_row) in a_row.iter().zip(b.chunks_exact(n)) {
            for (cj, &bj) in c_row.iter_mut().zip(b_row) {
                *cj = *cj + aik * bj;
            }
        }
    }
}

/// The spatial attributes shared by conv and pool ops, with defaults filled in.
pub(crate) struct Window {
    pub kernel: Vec<usize>,
    pub strides: Vec<usize>,
    pub dilations: Vec<usize>,
    /// Begin pads then end pads, as ONNX lists them.
    pub pads: Vec<usize>,
    pub auto_pad: String,
}

/// A non-negative int list attribute of length `n`, or `default` repeated.
pub(crate) fn usize_list(
    attrs: &Attrs,
    name: &str,
    n: usize,
    default: usize,
) -> Result<Vec<usize>, String> {
    match attrs.ints(name)? {
        None => Ok(vec![default; n]),
        Some(v) => {
            if v.len() != n {
                return Err(format!(
                    "attribute `{name}` has {} values, expected {n}",
                    v.len()
                ));
            }
            v.iter()
                .map(|&x| {
                    usize::try_from(x).map_err(|_| format!("attribute `{name}` has negative {x}"))
                })
                .collect()
        }
    }
}

impl Window {
    /// Reads kernel_shape (or `kernel` when given from the weights), strides, dilations,
    /// pads and auto_pad for `n` spatial dims.
    pub(crate) fn from_attrs(
        attrs: &Attrs,
        n: usize,
        kernel: Option<Vec<usize>>,
    ) -> Result<Window, String> {
        let kernel = match attrs.ints("kernel_shape")? {
            Some(_) => usize_list(attrs, "kernel_shape", n, 1)?,
            None => kernel.ok_or("missing attribute `kernel_shape`")?,
        };
        if kernel.len() != n {
            return Err(format!("kernel has {} dims, expected {n}", kernel.len()));
        }
        let strides = usize_list(attrs, "strides", n, 1)?;
        let dilations = usize_list(attrs, "dilations", n, 1)?;
        if strides.contains(&0) || dilations.contains(&0) {
            return Err("strides and dilations must be positive".into());
        }
        let pads = usize_list(attrs, "pads", 2 * n, 0)?;
        let auto_pad = attrs.string_or("auto_pad", "NOTSET".into())?;
        Ok(Window {
            kernel,
            strides,
            dilations,
            pads,
            auto_pad,
        })
    }

    /// The extent of the dilated kernel along axis `i`.
    pub(crate) fn span(&self, i: usize) -> usize {
        (self.kernel[i].saturating_sub(1))
            .saturating_mul(self.dilations[i])
            .saturating_add(1)
    }

    /// Conv-style output sizes (floor, or ceil when `ceil`), resolving auto_pad into
    /// `self.pads`. Errors when the window does not fit.
    pub(crate) fn resolve(&mut self, input: &[usize], ceil: bool) -> Result<Vec<usize>, String> {
        (0..input.len())
            .map(|i| self.resolve_axis(i, input[i], ceil))
            .collect()
    }

    /// The output size along spatial axis `i` for an input of size `inp`.
    pub(crate) fn resolve_axis(
        &mut self,
        i: usize,
        inp: usize,
        ceil: bool,
    ) -> Result<usize, String> {
        let n = self.kernel.len();
        let (s, span) = (self.strides[i], self.span(i));
        Ok(match self.auto_pad.as_str() {
            "SAME_UPPER" | "SAME_LOWER" => {
                let o = inp.div_ceil(s);
                let total = ((o.max(1) - 1) * s)
                    .saturating_add(span)
                    .saturating_sub(inp);
                let small = total / 2;
                let (b, e) = if self.auto_pad == "SAME_UPPER" {
                    (small, total - small)
                } else {
                    (total - small, small)
                };
                self.pads[i] = b;
                self.pads[n + i] = e;
                o
            }
            "VALID" | "NOTSET" | "" => {
                if self.auto_pad == "VALID" {
                    self.pads[i] = 0;
                    self.pads[n + i] = 0;
                }
                let padded = inp
                    .saturating_add(self.pads[i])
                    .saturating_add(self.pads[n + i]);
                if padded < span {
                    return Err(format!(
                        "window of extent {span} does not fit padded input of size {padded}"
                    ));
                }
                let mut o = if ceil {
                    (padded - span).div_ceil(s) + 1
                } else {
                    (padded - span) / s + 1
                };
                // A ceil-mode window must start inside the input or its begin pad.
                if ceil && (o - 1).saturating_mul(s) >= inp.saturating_add(self.pads[i]) {
                    o -= 1;
                }
                o
            }
            other => return Err(format!("unknown auto_pad `{other}`")),
        })
    }
}

/// Iterates over every multi-index of `shape` in row-major order, calling `f` with it.
pub(crate) fn for_each_index(shape: &[usize], mut f: impl FnMut(&[usize])) {
    if shape.contains(&0) {
        return;
    }
    let mut idx = vec![0usize; shape.len()];
    loop {
        f(&idx);
        let mut ax = shape.len();
        loop {
            if ax == 0 {
                return;
            }
            ax -= 1;
            idx[ax] += 1;
            if idx[ax] < shape[ax] {
                break;
            }
            idx[ax] = 0;
        }
    }
}

/// The element count of a shape, or an error if it overflows.
pub(crate) fn checked_numel(shape: &[usize]) -> Result<usize, String> {
    let n = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| format!("shape {shape:?} has too many elements"))?;
    // The loops here accumulate in f64: 8 bytes an element.
    crate::limits::check(n, std::mem::size_of::<f64>(), shape)?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bcast_offsets_repeat_broadcast_axes() {
        assert_eq!(bcast_offsets(&[2, 3], &[3]), vec![0, 1, 2, 0, 1, 2]);
        assert_eq!(bcast_offsets(&[2, 3], &[2, 1]), vec![0, 0, 0, 1, 1, 1]);
        assert_eq!(bcast_offsets(&[2, 2], &[]), vec![0, 0, 0, 0]);
        assert_eq!(bcast_offsets(&[0, 3], &[3]), Vec::<usize>::new());
    }

    #[test]
    fn integer_arithmetic_wraps_and_rejects_zero_division() {
        assert_eq!(Num::add(i8::MAX, 1), i8::MIN);
        assert_eq!(Num::div(i32::MIN, -1).unwrap(), i32::MIN);
        assert!(Num::div(5u8, 0).is_err());
        assert_eq!(Num::rem(-7i32, 3, false).unwrap(), 2);
        assert_eq!(Num::rem(-7i32, 3, true).unwrap(), -1);
    }
}
