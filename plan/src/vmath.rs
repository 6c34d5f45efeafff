//! kiln's f32 vector math: every transcendental (exp, log, tanh, sigmoid, erf) and the
//! activations built on them (silu, gelu, gelu_tanh), each written ONCE as a recipe over the
//! [`Emit`] trait: constants, range reduction and the exact sequence of roundings (which steps
//! are one fused multiply-add, which are a multiply then an add). Every code path instantiates
//! the same recipe: [`Scalar`] (the portable evaluator, recurrent cells, tails), [`Wide`]
//! (several vectors as one), the runtime's AVX2 and AVX-512 emitters (GEMM epilogues, the
//! attention softmax), the Cranelift JIT's and the LLVM AOT / NVPTX builders. An emitter
//! performs exactly one IEEE operation per method (round to nearest even, no contraction,
//! `fma` a true fused multiply-add), so every path gives the same bits for the same input
//! (NaN: some NaN); each backend's tests compare its bits with [`scalar`].
//!
//! Sources: Cody–Waite range reduction and Cephes' `expf`, `logf`, `tanhf` polynomials;
//! Eigen's clamped rational erf. Accuracy against the f64 definitions (the interpreter's, see
//! [`accuracy::exact`]) over [`accuracy::sweep_inputs`], measured by this module's tests
//! (errors in ulps of the exact result; subnormal results in units of the smallest subnormal):
//!
//! | function | max error measured (x)        | bound ([`accuracy`]) |
//! |----------|-------------------------------|----------------------|
//! | exp      | 0.98 ulp (4.55)               | 2 ulp                |
//! | log      | 0.76 ulp (2.69)               | 2 ulp                |
//! | tanh     | 1.22 ulp (0.636)              | 3 ulp                |
//! | sigmoid  | 2.62 ulp (-2.76)              | 3 ulp                |
//! | erf      | 4.59 ulp (3.94, rel. 2.4e-7)  | 5 ulp                |
//! | gelu     | 6.45 ulp (-13.1)              | 8 ulp                |
//!
//! The activations are defined as the loop-kernel lowering of the graph ops computes them
//! (`crate::partition`), so a fused GEMM epilogue and a loop kernel agree bitwise:
//! `silu(x) = x·sigmoid(x)`; `gelu` (erf form) is the loop IR's own op [`UnOp::Gelu`],
//! `0.5·x·erfc(-x/√2)` with an erfc accurate in the negative tail (where `1 + erf` would
//! cancel); `gelu_tanh(x) = x·sigmoid(2√(2/π)·(x + 0.044715·x²·x))`, which equals
//! `0.5·x·(1 + tanh(..))` without its cancellation. Their error is measured by
//! [`accuracy::ACTIVATIONS`]'s test against the f64 formulas: within 4e-7 relative times
//! `1 + κ` (κ the condition number: an argument computed in f32 carries a few ulps) plus
//! 2e-43 absolute (a subnormal sigmoid times |x|); measured worst 0.45 (silu), 0.76 (gelu) and
//! 0.67 (gelu_tanh) of that bound.

// Coefficients are quoted with the digits their sources give.
#![allow(clippy::excessive_precision)]

use crate::loop_ir::UnOp;
use std::convert::Infallible;

/// `2^23 * 1.5`: adding it rounds an f32 of magnitude below `2^22` to an integer, which
/// then sits in the low mantissa bits.
pub const ROUND_MAGIC: f32 = 12_582_912.0;
/// The bit pattern of [`ROUND_MAGIC`].
pub const ROUND_MAGIC_BITS: i32 = 0x4B40_0000;
/// Beyond this, `e^x` overflows f32 (the reduction still yields `inf` naturally).
pub const EXP_HI: f32 = 89.0;
/// Below this, `e^x` rounds to 0 in f32 (`e^-104 < 2^-150`).
pub const EXP_LO: f32 = -104.0;
/// `ln 2` split so that `n * LN2_HI` is exact for |n| < 2^8 (Cody–Waite).
pub const LN2_HI: f32 = 0.693359375;
/// `ln 2 - LN2_HI`.
pub const LN2_LO: f32 = -2.12194440e-4;
/// The smallest normal f32; smaller log arguments are scaled by 2^23 first.
pub const MIN_NORMAL: f32 = f32::MIN_POSITIVE;
/// Below this |x|, tanh uses its odd polynomial (Cephes `tanhf`), above it `1 - 2/(e^2x+1)`.
pub const TANH_SMALL: f32 = 0.625;
/// erf's argument is clamped to `[-ERF_CLAMP, ERF_CLAMP]` (erf(4) rounds to 1 in f32 within
/// the rational's accuracy).
pub const ERF_CLAMP: f32 = 4.0;
/// `2·√(2/π)`: gelu_tanh is `x·sigmoid(GELU_TANH_2C·(x + GELU_TANH_A·x³))`.
pub const GELU_TANH_2C: f32 = 1.595_769_2;
/// gelu_tanh's cubic coefficient.
pub const GELU_TANH_A: f32 = 0.044715;

/// Numerical Recipes' Chebyshev fit of `ln(erfc(z)·(1 + z/2)) + z²` in `t = 1/(1 + z/2)`
/// (relative error of erfc below 1.2e-7 for every z >= 0), highest degree first.
pub const ERFC_POLY: [f32; 10] = [
    0.17087277,
    -0.82215223,
    1.48851587,
    -1.13520398,
    0.27886807,
    -0.18628806,
    0.09678418,
    0.37409196,
    1.00002368,
    -1.26551223,
];
/// Cephes `expf`'s polynomial for `(e^r - 1 - r) / r^2`.
pub const EXP_POLY: [f32; 6] = [
    1.9875691500E-4,
    1.3981999507E-3,
    8.3334519073E-3,
    4.1665795894E-2,
    1.6666665459E-1,
    5.0000001201E-1,
];
/// Cephes `logf`'s polynomial.
pub const LOG_POLY: [f32; 9] = [
    7.0376836292E-2,
    -1.1514610310E-1,
    1.1676998740E-1,
    -1.2420140846E-1,
    1.4249322787E-1,
    -1.6668057665E-1,
    2.0000714765E-1,
    -2.4999993993E-1,
    3.3333331174E-1,
];
/// Cephes `tanhf`'s odd polynomial (in `x^2`).
pub const TANH_POLY: [f32; 5] = [
    -5.70498872745E-3,
    2.06390887954E-2,
    -5.37397155531E-2,
    1.33314422036E-1,
    -3.33332819422E-1,
];
/// Eigen's erf numerator (in `x^2`).
pub const ERF_P: [f32; 7] = [
    -2.72614225801306e-10,
    2.77068142495902e-08,
    -2.10102402082508e-06,
    -5.69250639462346e-05,
    -7.34990630326855e-04,
    -2.95459980854025e-03,
    -1.60960333262415e-02,
];
/// Eigen's erf denominator (in `x^2`).
pub const ERF_Q: [f32; 5] = [
    -1.45660718464996e-05,
    -2.13374055278905e-04,
    -1.68282697438203e-03,
    -7.37332916720468e-03,
    -1.42647390514189e-02,
];

/// An ordered float comparison (false when either side is NaN).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmp {
    /// `a < b`.
    Lt,
    /// `a >= b`.
    Ge,
    /// `a == b`.
    Eq,
}

/// The operations a recipe is written in, on f32 lanes `F` and i32 lanes `I` of the same
/// width. Each method is one IEEE-754 operation rounded to nearest even; nothing may be
/// contracted or reassociated, so every emitter computes the same bits.
pub trait Emit {
    /// A vector (or scalar) of f32.
    type F: Copy;
    /// A vector (or scalar) of i32 with as many lanes as `F`.
    type I: Copy;
    /// What emitting can fail with (a code generator's builder error; `Infallible` for
    /// arithmetic done on the spot).
    type Err;
    /// `c` in every lane.
    fn f(&mut self, c: f32) -> Result<Self::F, Self::Err>;
    /// `c` in every lane.
    fn i(&mut self, c: i32) -> Result<Self::I, Self::Err>;
    /// `a + b`.
    fn add(&mut self, a: Self::F, b: Self::F) -> Result<Self::F, Self::Err>;
    /// `a - b`.
    fn sub(&mut self, a: Self::F, b: Self::F) -> Result<Self::F, Self::Err>;
    /// `a · b`.
    fn mul(&mut self, a: Self::F, b: Self::F) -> Result<Self::F, Self::Err>;
    /// `a / b`.
    fn div(&mut self, a: Self::F, b: Self::F) -> Result<Self::F, Self::Err>;
    /// `a · b + c` with one rounding.
    fn fma(&mut self, a: Self::F, b: Self::F, c: Self::F) -> Result<Self::F, Self::Err>;
    /// `-a`.
    fn neg(&mut self, a: Self::F) -> Result<Self::F, Self::Err>;
    /// `|a|`.
    fn abs(&mut self, a: Self::F) -> Result<Self::F, Self::Err>;
    /// `min(x, c)` for a non-NaN `c`: a NaN `x` gives NaN.
    fn min(&mut self, x: Self::F, c: Self::F) -> Result<Self::F, Self::Err>;
    /// `max(x, c)` for a non-NaN `c`: a NaN `x` gives NaN.
    fn max(&mut self, x: Self::F, c: Self::F) -> Result<Self::F, Self::Err>;
    /// `cmp(a, b) ? t : f` lane-wise.
    fn select(
        &mut self,
        cmp: Cmp,
        a: Self::F,
        b: Self::F,
        t: Self::F,
        f: Self::F,
    ) -> Result<Self::F, Self::Err>;
    /// The bits of `a`.
    fn bits(&mut self, a: Self::F) -> Result<Self::I, Self::Err>;
    /// The f32 with bits `a`.
    fn float_of_bits(&mut self, a: Self::I) -> Result<Self::F, Self::Err>;
    /// `a` converted to f32 (exact for the small integers recipes convert).
    fn to_float(&mut self, a: Self::I) -> Result<Self::F, Self::Err>;
    /// `a + b` (wrapping).
    fn iadd(&mut self, a: Self::I, b: Self::I) -> Result<Self::I, Self::Err>;
    /// `a - b` (wrapping).
    fn isub(&mut self, a: Self::I, b: Self::I) -> Result<Self::I, Self::Err>;
    /// `a & b`.
    fn and(&mut self, a: Self::I, b: Self::I) -> Result<Self::I, Self::Err>;
    /// `a | b`.
    fn or(&mut self, a: Self::I, b: Self::I) -> Result<Self::I, Self::Err>;
    /// `a << N`.
    fn shl<const N: i32>(&mut self, a: Self::I) -> Result<Self::I, Self::Err>;
    /// `a >> N`, sign-filling.
    fn sra<const N: i32>(&mut self, a: Self::I) -> Result<Self::I, Self::Err>;
    /// `a >> N`, zero-filling.
    fn srl<const N: i32>(&mut self, a: Self::I) -> Result<Self::I, Self::Err>;
}

/// Horner evaluation of `coeffs[0]·x^k + ... + coeffs[k]`, one fma per step.
#[inline(always)]
fn poly<E: Emit>(e: &mut E, x: E::F, coeffs: &[f32]) -> Result<E::F, E::Err> {
    let mut acc = e.f(coeffs[0])?;
    for &c in &coeffs[1..] {
        let c = e.f(c)?;
        acc = e.fma(acc, x, c)?;
    }
    Ok(acc)
}

/// `2^n` for integers `n` in `[-126, 127]`: the biased exponent shifted into place.
#[inline(always)]
fn pow2i<E: Emit>(e: &mut E, n: E::I) -> Result<E::F, E::Err> {
    let bias = e.i(127)?;
    let b = e.iadd(n, bias)?;
    let b = e.shl::<23>(b)?;
    e.float_of_bits(b)
}

/// `e^x`: `x = n ln2 + r`, |r| <= ln2/2, `n` rounded to nearest by the magic-number trick
/// (`fma(x, log2 e, 1.5·2^23)`), `e^r = 1 + r + r² P(r)` by Cephes' polynomial, then scaled by
/// `2^n` in two halves so that results in the subnormal range round once. Clamped to
/// `[EXP_LO, EXP_HI]` first (so ±inf give inf and 0); NaN stays NaN.
#[inline(always)]
pub fn exp<E: Emit>(e: &mut E, x: E::F) -> Result<E::F, E::Err> {
    let hi = e.f(EXP_HI)?;
    let x = e.min(x, hi)?;
    let lo = e.f(EXP_LO)?;
    let x = e.max(x, lo)?;
    let (nf, n) = exp_n(e, x)?;
    let c1 = e.f(-LN2_HI)?;
    let r = e.fma(nf, c1, x)?;
    let c2 = e.f(-LN2_LO)?;
    let r = e.fma(nf, c2, r)?;
    exp_scaled(e, r, n)
}

/// `n = round(x·log2 e)` for a clamped `x`, as a float and as an integer.
#[inline(always)]
fn exp_n<E: Emit>(e: &mut E, x: E::F) -> Result<(E::F, E::I), E::Err> {
    let log2e = e.f(std::f32::consts::LOG2_E)?;
    let magic = e.f(ROUND_MAGIC)?;
    let k = e.fma(x, log2e, magic)?;
    let nf = e.sub(k, magic)?;
    let kb = e.bits(k)?;
    let mb = e.i(ROUND_MAGIC_BITS)?;
    let n = e.isub(kb, mb)?;
    Ok((nf, n))
}

/// `2^n · e^r` for the reduced argument `r`: Cephes' polynomial, then the two-half scaling.
#[inline(always)]
fn exp_scaled<E: Emit>(e: &mut E, r: E::F, n: E::I) -> Result<E::F, E::Err> {
    let z = e.mul(r, r)?;
    let p = poly(e, r, &EXP_POLY)?;
    let p = e.fma(p, z, r)?;
    let one = e.f(1.0)?;
    let p = e.add(p, one)?;
    let n1 = e.sra::<1>(n)?;
    let n2 = e.isub(n, n1)?;
    let s1 = pow2i(e, n1)?;
    let s2 = pow2i(e, n2)?;
    let y = e.mul(p, s1)?;
    e.mul(y, s2)
}

/// `e^(a + b)` for `a <= 0` known exactly and `|b|` small: `a` is reduced (Cody–Waite) before
/// `b` is added, so the sum is never rounded before the reduction and a large exact `a`
/// (gelu's `-x²/2`) keeps its precision. 0 where `a + b < EXP_LO`; NaN stays NaN.
#[inline(always)]
fn exp_sum<E: Emit>(e: &mut E, a: E::F, b: E::F) -> Result<E::F, E::Err> {
    let s = e.add(a, b)?;
    let hi = e.f(EXP_HI)?;
    let sc = e.min(s, hi)?;
    let lo = e.f(EXP_LO)?;
    let sc = e.max(sc, lo)?;
    let (nf, n) = exp_n(e, sc)?;
    let c1 = e.f(-LN2_HI)?;
    let r = e.fma(nf, c1, a)?;
    let c2 = e.f(-LN2_LO)?;
    let r = e.fma(nf, c2, r)?;
    let r = e.add(r, b)?;
    let y = exp_scaled(e, r, n)?;
    let zero = e.f(0.0)?;
    e.select(Cmp::Lt, s, lo, zero, y)
}

/// `ln x`: `x = m 2^e` with `m` in `[sqrt(1/2), sqrt(2))`, `ln(m)` by Cephes' polynomial;
/// subnormals are scaled up by 2^23 first; 0 → -inf, +inf → +inf, negative or NaN → NaN.
#[inline(always)]
pub fn log<E: Emit>(e: &mut E, x0: E::F) -> Result<E::F, E::Err> {
    let minn = e.f(MIN_NORMAL)?;
    let scale = e.f(8_388_608.0)?;
    let xs = e.mul(x0, scale)?;
    let x = e.select(Cmp::Lt, x0, minn, xs, x0)?;
    let k23 = e.f(23.0)?;
    let zero = e.f(0.0)?;
    let eadj = e.select(Cmp::Lt, x0, minn, k23, zero)?;
    let bits = e.bits(x)?;
    let eb = e.srl::<23>(bits)?;
    let c126 = e.i(126)?;
    let ei = e.isub(eb, c126)?;
    let ex = e.to_float(ei)?;
    let ex = e.sub(ex, eadj)?;
    let mant = e.i(0x007F_FFFF)?;
    let half = e.i(0x3F00_0000)?;
    let mb = e.and(bits, mant)?;
    let mb = e.or(mb, half)?;
    let m = e.float_of_bits(mb)?;
    let sqrthf = e.f(std::f32::consts::FRAC_1_SQRT_2)?;
    let one = e.f(1.0)?;
    let e1 = e.sub(ex, one)?;
    let ex = e.select(Cmp::Lt, m, sqrthf, e1, ex)?;
    let m2 = e.add(m, m)?;
    let m = e.select(Cmp::Lt, m, sqrthf, m2, m)?;
    let m = e.sub(m, one)?;
    let z = e.mul(m, m)?;
    let p = poly(e, m, &LOG_POLY)?;
    let p = e.mul(p, m)?;
    let y = e.mul(p, z)?;
    let c2 = e.f(LN2_LO)?;
    let y = e.fma(ex, c2, y)?;
    let mhalf = e.f(-0.5)?;
    let y = e.fma(z, mhalf, y)?;
    let r = e.add(m, y)?;
    let c1 = e.f(LN2_HI)?;
    let r = e.fma(ex, c1, r)?;
    let inf = e.f(f32::INFINITY)?;
    let r = e.select(Cmp::Eq, x0, inf, inf, r)?;
    let ninf = e.f(f32::NEG_INFINITY)?;
    let r = e.select(Cmp::Eq, x0, zero, ninf, r)?;
    let nan = e.f(f32::NAN)?;
    // `x >= 0` is false for negatives and NaN.
    e.select(Cmp::Ge, x0, zero, r, nan)
}

/// `tanh x`: Cephes' odd polynomial for |x| < 0.625, else `±(1 - 2 / (e^{2|x|} + 1))`.
#[inline(always)]
pub fn tanh<E: Emit>(e: &mut E, x: E::F) -> Result<E::F, E::Err> {
    let z = e.mul(x, x)?;
    let p = poly(e, z, &TANH_POLY)?;
    let p = e.mul(p, z)?;
    let small = e.fma(p, x, x)?;
    let a = e.abs(x)?;
    let a2 = e.add(a, a)?;
    let ex = exp(e, a2)?;
    let one = e.f(1.0)?;
    let two = e.f(2.0)?;
    let d = e.add(ex, one)?;
    let q = e.div(two, d)?;
    let big = e.sub(one, q)?;
    let nbig = e.neg(big)?;
    let zero = e.f(0.0)?;
    let big = e.select(Cmp::Lt, x, zero, nbig, big)?;
    let lim = e.f(TANH_SMALL)?;
    e.select(Cmp::Lt, a, lim, small, big)
}

/// `1 / (1 + e^-x)` as `r = 1 / (1 + e^-|x|)`, then `r` for x >= 0 and `e^-|x| r`
/// below, so large negative inputs keep their tiny values instead of flushing to 0.
#[inline(always)]
pub fn sigmoid<E: Emit>(e: &mut E, x: E::F) -> Result<E::F, E::Err> {
    let a = e.abs(x)?;
    let na = e.neg(a)?;
    let ex = exp(e, na)?;
    let one = e.f(1.0)?;
    let d = e.add(one, ex)?;
    let r = e.div(one, d)?;
    let er = e.mul(ex, r)?;
    let zero = e.f(0.0)?;
    e.select(Cmp::Ge, x, zero, r, er)
}

/// erf: Eigen's `x P(x^2) / Q(x^2)` on x clamped to [-4, 4].
#[inline(always)]
pub fn erf<E: Emit>(e: &mut E, x: E::F) -> Result<E::F, E::Err> {
    let hi = e.f(ERF_CLAMP)?;
    let x = e.min(x, hi)?;
    let lo = e.f(-ERF_CLAMP)?;
    let x = e.max(x, lo)?;
    let z = e.mul(x, x)?;
    let p = poly(e, z, &ERF_P)?;
    let q = poly(e, z, &ERF_Q)?;
    // x (P/Q) rather than (x P)/Q: x P underflows for tiny x.
    let r = e.div(p, q)?;
    e.mul(x, r)
}

/// `silu(x) = x · sigmoid(x)` (the loop kernels' `silu`).
#[inline(always)]
pub fn silu<E: Emit>(e: &mut E, x: E::F) -> Result<E::F, E::Err> {
    let s = sigmoid(e, x)?;
    e.mul(x, s)
}

/// `softplus(x) = ln(1 + e^x) = max(x, 0) + ln(1 + u)`, `u = e^-|x|` (the loop IR's
/// [`UnOp::Softplus`]): `ln(1 + u)` as `ln(w) - ((w - 1) - u)/w` with `w = 1 + u`, which
/// restores the part of `u` that rounding `w` lost (so small `u`, far from 0, keeps its digits).
#[inline(always)]
pub fn softplus<E: Emit>(e: &mut E, x: E::F) -> Result<E::F, E::Err> {
    let zero = e.f(0.0)?;
    let one = e.f(1.0)?;
    let pos = e.max(x, zero)?;
    let a = e.abs(x)?;
    let na = e.neg(a)?;
    let u = exp(e, na)?;
    let w = e.add(one, u)?;
    let lw = log(e, w)?;
    let wm1 = e.sub(w, one)?;
    let err = e.sub(wm1, u)?;
    let c = e.div(err, w)?;
    let l1p = e.sub(lw, c)?;
    e.add(pos, l1p)
}

/// `gelu(x) = 0.5·x·(1 + erf(x/√2)) = 0.5·x·erfc(-x/√2)` (the loop IR's [`UnOp::Gelu`]):
/// erfc by Numerical Recipes' fit, `erfc(z) = t·e^(-z² + P(t))` with `t = 1/(1 + z/2)`,
/// `z = |x|/√2`, and `2 - erfc` for x >= 0. The exponent is taken from `x` itself: `x² = hi +
/// lo` split exactly by an fma and `-hi/2` reduced exactly (`exp_sum`), because rounding
/// `z` or `z²` would be amplified by `2z²` in the far tail.
#[inline(always)]
pub fn gelu_erf<E: Emit>(e: &mut E, x: E::F) -> Result<E::F, E::Err> {
    let c = e.f(std::f32::consts::FRAC_1_SQRT_2)?;
    let xz = e.mul(x, c)?;
    let z = e.abs(xz)?;
    let half = e.f(0.5)?;
    let one = e.f(1.0)?;
    let d = e.fma(half, z, one)?;
    let t = e.div(one, d)?;
    let p = poly(e, t, &ERFC_POLY)?;
    let hi = e.mul(x, x)?;
    let nhi = e.neg(hi)?;
    let lo = e.fma(x, x, nhi)?;
    // lo is ±inf or NaN where x² overflows, and must not matter there.
    let zero = e.f(0.0)?;
    let alo = e.abs(lo)?;
    let inf = e.f(f32::INFINITY)?;
    let lo = e.select(Cmp::Lt, alo, inf, lo, zero)?;
    let mhalf = e.f(-0.5)?;
    let a = e.mul(mhalf, hi)?;
    let b = e.fma(mhalf, lo, p)?;
    let ex = exp_sum(e, a, b)?;
    let erfc_z = e.mul(t, ex)?;
    let two = e.f(2.0)?;
    let gp = e.sub(two, erfc_z)?;
    let g = e.select(Cmp::Ge, x, zero, gp, erfc_z)?;
    let hx = e.mul(half, x)?;
    e.mul(hx, g)
}

/// `gelu_tanh(x) = 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`, computed as
/// `x·sigmoid(2√(2/π)·(x + 0.044715·(x·x)·x))` (equal, and without the cancellation of
/// `1 + tanh` for negative x), in the order of the loop-kernel lowering of `gelu` with
/// `approximate = "tanh"`.
#[inline(always)]
pub fn gelu_tanh<E: Emit>(e: &mut E, x: E::F) -> Result<E::F, E::Err> {
    let x2 = e.mul(x, x)?;
    let x3 = e.mul(x2, x)?;
    let a = e.f(GELU_TANH_A)?;
    let ax3 = e.mul(a, x3)?;
    let inner = e.add(x, ax3)?;
    let c = e.f(GELU_TANH_2C)?;
    let z = e.mul(c, inner)?;
    let s = sigmoid(e, z)?;
    e.mul(x, s)
}

/// The loop IR's transcendental `op` applied to `x`; `Ok(None)` for ops that are not
/// transcendental (callers emit those inline).
#[inline(always)]
pub fn unary<E: Emit>(e: &mut E, op: UnOp, x: E::F) -> Result<Option<E::F>, E::Err> {
    Ok(Some(match op {
        UnOp::Exp => exp(e, x)?,
        UnOp::Log => log(e, x)?,
        UnOp::Tanh => tanh(e, x)?,
        UnOp::Sigmoid => sigmoid(e, x)?,
        UnOp::Erf => erf(e, x)?,
        UnOp::Gelu => gelu_erf(e, x)?,
        UnOp::Softplus => softplus(e, x)?,
        _ => return Ok(None),
    }))
}

/// `a·b + c` rounded once, bit-identical to [`f32::mul_add`], in inline arithmetic: the
/// product of two f32 is exact in f64; the f64 sum is turned into its round-to-odd value
/// (TwoSum gives the rounding error; an inexact sum with an even last bit moves one ulp toward
/// the exact value), and round-to-odd at 53 bits followed by round-to-nearest at 24 bits is
/// correctly rounded (53 ≥ 2·24 + 2; Boldo and Melquiond, "Emulation of FMA and correctly
/// rounded sums", 2008). Branch-free. Outside FMA-enabled code, `mul_add` is a libm `fmaf`
/// call: this is about 1.6× faster than that call on a CPU with FMA and far faster than
/// glibc's software `fmaf` on one without.
#[inline(always)]
pub fn fma_emulated(a: f32, b: f32, c: f32) -> f32 {
    let p = a as f64 * b as f64;
    let c = c as f64;
    let s = p + c;
    let bb = s - p;
    let err = (p - (s - bb)) + (c - bb);
    let bits = s.to_bits() as i64;
    let inexact_even = (err != 0.0) & (bits & 1 == 0) & (s.abs() < f64::INFINITY);
    // The exact value lies away from zero when the error has the sum's sign.
    let away = ((err.to_bits() ^ s.to_bits()) as i64) >= 0;
    let step = inexact_even as i64 * (2 * away as i64 - 1);
    f64::from_bits((bits + step) as u64) as f32
}

/// Plain f32 arithmetic, one value at a time (`fma` is [`f32::mul_add`]: one instruction
/// where it is inlined into code compiled with FMA, such as a `#[target_feature]` kernel, and
/// a libm `fmaf` call elsewhere; the portable paths use [`SoftFma`] instead).
#[derive(Clone, Copy, Debug, Default)]
pub struct Scalar;

impl Emit for Scalar {
    type F = f32;
    type I = i32;
    type Err = Infallible;
    #[inline(always)]
    fn f(&mut self, c: f32) -> Result<f32, Infallible> {
        Ok(c)
    }
    #[inline(always)]
    fn i(&mut self, c: i32) -> Result<i32, Infallible> {
        Ok(c)
    }
    #[inline(always)]
    fn add(&mut self, a: f32, b: f32) -> Result<f32, Infallible> {
        Ok(a + b)
    }
    #[inline(always)]
    fn sub(&mut self, a: f32, b: f32) -> Result<f32, Infallible> {
        Ok(a - b)
    }
    #[inline(always)]
    fn mul(&mut self, a: f32, b: f32) -> Result<f32, Infallible> {
        Ok(a * b)
    }
    #[inline(always)]
    fn div(&mut self, a: f32, b: f32) -> Result<f32, Infallible> {
        Ok(a / b)
    }
    #[inline(always)]
    fn fma(&mut self, a: f32, b: f32, c: f32) -> Result<f32, Infallible> {
        Ok(a.mul_add(b, c))
    }
    #[inline(always)]
    fn neg(&mut self, a: f32) -> Result<f32, Infallible> {
        Ok(-a)
    }
    #[inline(always)]
    fn abs(&mut self, a: f32) -> Result<f32, Infallible> {
        Ok(a.abs())
    }
    #[inline(always)]
    fn min(&mut self, x: f32, c: f32) -> Result<f32, Infallible> {
        Ok(if x > c { c } else { x })
    }
    #[inline(always)]
    fn max(&mut self, x: f32, c: f32) -> Result<f32, Infallible> {
        Ok(if x < c { c } else { x })
    }
    #[inline(always)]
    fn select(&mut self, cmp: Cmp, a: f32, b: f32, t: f32, f: f32) -> Result<f32, Infallible> {
        let c = match cmp {
            Cmp::Lt => a < b,
            Cmp::Ge => a >= b,
            Cmp::Eq => a == b,
        };
        Ok(if c { t } else { f })
    }
    #[inline(always)]
    fn bits(&mut self, a: f32) -> Result<i32, Infallible> {
        Ok(a.to_bits() as i32)
    }
    #[inline(always)]
    fn float_of_bits(&mut self, a: i32) -> Result<f32, Infallible> {
        Ok(f32::from_bits(a as u32))
    }
    #[inline(always)]
    fn to_float(&mut self, a: i32) -> Result<f32, Infallible> {
        Ok(a as f32)
    }
    #[inline(always)]
    fn iadd(&mut self, a: i32, b: i32) -> Result<i32, Infallible> {
        Ok(a.wrapping_add(b))
    }
    #[inline(always)]
    fn isub(&mut self, a: i32, b: i32) -> Result<i32, Infallible> {
        Ok(a.wrapping_sub(b))
    }
    #[inline(always)]
    fn and(&mut self, a: i32, b: i32) -> Result<i32, Infallible> {
        Ok(a & b)
    }
    #[inline(always)]
    fn or(&mut self, a: i32, b: i32) -> Result<i32, Infallible> {
        Ok(a | b)
    }
    #[inline(always)]
    fn shl<const N: i32>(&mut self, a: i32) -> Result<i32, Infallible> {
        Ok(a.wrapping_shl(N as u32))
    }
    #[inline(always)]
    fn sra<const N: i32>(&mut self, a: i32) -> Result<i32, Infallible> {
        Ok(a >> N)
    }
    #[inline(always)]
    fn srl<const N: i32>(&mut self, a: i32) -> Result<i32, Infallible> {
        Ok(((a as u32) >> N) as i32)
    }
}

/// [`Scalar`] with [`fma_emulated`] for its fused multiply-adds: the emitter of the portable
/// paths (CPUs without AVX2+FMA), which run outside FMA-enabled code, so that the recipes
/// there make no library call per operation. Same bits as [`Scalar`].
#[derive(Clone, Copy, Debug, Default)]
pub struct SoftFma;

macro_rules! soft_fma_delegate {
    ($($name:ident($($a:ident: $t:ty),*) -> $r:ty;)*) => {$(
        #[inline(always)]
        fn $name(&mut self, $($a: $t),*) -> Result<$r, Infallible> {
            Scalar.$name($($a),*)
        }
    )*};
}

impl Emit for SoftFma {
    type F = f32;
    type I = i32;
    type Err = Infallible;
    soft_fma_delegate! {
        f(c: f32) -> f32;
        i(c: i32) -> i32;
        add(a: f32, b: f32) -> f32;
        sub(a: f32, b: f32) -> f32;
        mul(a: f32, b: f32) -> f32;
        div(a: f32, b: f32) -> f32;
        neg(a: f32) -> f32;
        abs(a: f32) -> f32;
        min(x: f32, c: f32) -> f32;
        max(x: f32, c: f32) -> f32;
        select(cmp: Cmp, a: f32, b: f32, t: f32, f: f32) -> f32;
        bits(a: f32) -> i32;
        float_of_bits(a: i32) -> f32;
        to_float(a: i32) -> f32;
        iadd(a: i32, b: i32) -> i32;
        isub(a: i32, b: i32) -> i32;
        and(a: i32, b: i32) -> i32;
        or(a: i32, b: i32) -> i32;
    }
    #[inline(always)]
    fn fma(&mut self, a: f32, b: f32, c: f32) -> Result<f32, Infallible> {
        Ok(fma_emulated(a, b, c))
    }
    #[inline(always)]
    fn shl<const N: i32>(&mut self, a: i32) -> Result<i32, Infallible> {
        Scalar.shl::<N>(a)
    }
    #[inline(always)]
    fn sra<const N: i32>(&mut self, a: i32) -> Result<i32, Infallible> {
        Scalar.sra::<N>(a)
    }
    #[inline(always)]
    fn srl<const N: i32>(&mut self, a: i32) -> Result<i32, Infallible> {
        Scalar.srl::<N>(a)
    }
}

/// `N` values of an emitter as one: every operation is applied to each in turn, so a recipe
/// runs as `N` independent chains interleaved step by step (more independent work for the
/// scheduler), or, over [`Scalar`], as a portable array of lanes.
#[derive(Clone, Copy, Debug, Default)]
pub struct Wide<E, const N: usize>(pub E);

/// A [`Wide`] method: the inner emitter's applied to each element (direct calls in a loop,
/// so that they inline into a caller's target features).
macro_rules! wide_fn {
    ($name:ident: $T:ident, $first:ident $(, $rest:ident)*) => {
        #[inline(always)]
        fn $name(&mut self, $first: Self::$T $(, $rest: Self::$T)*) -> Result<Self::$T, E::Err> {
            let mut out = $first;
            for k in 0..N {
                out[k] = self.0.$name($first[k] $(, $rest[k])*)?;
            }
            Ok(out)
        }
    };
}

impl<E: Emit, const N: usize> Emit for Wide<E, N> {
    type F = [E::F; N];
    type I = [E::I; N];
    type Err = E::Err;
    #[inline(always)]
    fn f(&mut self, c: f32) -> Result<Self::F, E::Err> {
        Ok([self.0.f(c)?; N])
    }
    #[inline(always)]
    fn i(&mut self, c: i32) -> Result<Self::I, E::Err> {
        Ok([self.0.i(c)?; N])
    }
    wide_fn!(add: F, a, b);
    wide_fn!(sub: F, a, b);
    wide_fn!(mul: F, a, b);
    wide_fn!(div: F, a, b);
    #[inline(always)]
    fn fma(&mut self, a: Self::F, b: Self::F, c: Self::F) -> Result<Self::F, E::Err> {
        let mut out = a;
        for k in 0..N {
            out[k] = self.0.fma(a[k], b[k], c[k])?;
        }
        Ok(out)
    }
    wide_fn!(neg: F, a);
    wide_fn!(abs: F, a);
    wide_fn!(min: F, x, c);
    wide_fn!(max: F, x, c);
    #[inline(always)]
    fn select(
        &mut self,
        cmp: Cmp,
        a: Self::F,
        b: Self::F,
        t: Self::F,
        f: Self::F,
    ) -> Result<Self::F, E::Err> {
        let mut out = t;
        for k in 0..N {
            out[k] = self.0.select(cmp, a[k], b[k], t[k], f[k])?;
        }
        Ok(out)
    }
    #[inline(always)]
    fn bits(&mut self, a: Self::F) -> Result<Self::I, E::Err> {
        let mut out = [self.0.i(0)?; N];
        for k in 0..N {
            out[k] = self.0.bits(a[k])?;
        }
        Ok(out)
    }
    #[inline(always)]
    fn float_of_bits(&mut self, a: Self::I) -> Result<Self::F, E::Err> {
        let mut out = [self.0.f(0.0)?; N];
        for k in 0..N {
            out[k] = self.0.float_of_bits(a[k])?;
        }
        Ok(out)
    }
    #[inline(always)]
    fn to_float(&mut self, a: Self::I) -> Result<Self::F, E::Err> {
        let mut out = [self.0.f(0.0)?; N];
        for k in 0..N {
            out[k] = self.0.to_float(a[k])?;
        }
        Ok(out)
    }
    wide_fn!(iadd: I, a, b);
    wide_fn!(isub: I, a, b);
    wide_fn!(and: I, a, b);
    wide_fn!(or: I, a, b);
    #[inline(always)]
    fn shl<const S: i32>(&mut self, a: Self::I) -> Result<Self::I, E::Err> {
        let mut out = a;
        for k in 0..N {
            out[k] = self.0.shl::<S>(a[k])?;
        }
        Ok(out)
    }
    #[inline(always)]
    fn sra<const S: i32>(&mut self, a: Self::I) -> Result<Self::I, E::Err> {
        let mut out = a;
        for k in 0..N {
            out[k] = self.0.sra::<S>(a[k])?;
        }
        Ok(out)
    }
    #[inline(always)]
    fn srl<const S: i32>(&mut self, a: Self::I) -> Result<Self::I, E::Err> {
        let mut out = a;
        for k in 0..N {
            out[k] = self.0.srl::<S>(a[k])?;
        }
        Ok(out)
    }
}

/// The recipes on plain f32 values ([`Scalar`]).
pub mod scalar {
    use super::Scalar;
    use crate::loop_ir::UnOp;

    macro_rules! scalar_fns {
        ($($(#[$doc:meta])* $name:ident;)*) => {$(
            $(#[$doc])*
            #[inline(always)]
            pub fn $name(x: f32) -> f32 {
                let Ok(y) = super::$name(&mut Scalar, x);
                y
            }
        )*};
    }
    scalar_fns! {
        /// [`super::exp`] on one value.
        exp;
        /// [`super::log`] on one value.
        log;
        /// [`super::tanh`] on one value.
        tanh;
        /// [`super::sigmoid`] on one value.
        sigmoid;
        /// [`super::erf`] on one value.
        erf;
        /// [`super::silu`] on one value.
        silu;
        /// [`super::gelu_erf`] on one value.
        gelu_erf;
        /// [`super::gelu_tanh`] on one value.
        gelu_tanh;
    }

    /// The loop IR's `op` on one value: transcendentals by their recipe, the rest by
    /// [`UnOp::apply`] (exact in f32 already).
    #[inline(always)]
    pub fn unary(op: UnOp, x: f32) -> f32 {
        let Ok(y) = super::unary(&mut Scalar, op, x);
        y.unwrap_or_else(|| op.apply(x))
    }
}

/// A function of this module, for callers that pick one at run time (tests, the runtime's
/// slice maps).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Func {
    /// [`exp`].
    Exp,
    /// [`log`].
    Log,
    /// [`tanh`].
    Tanh,
    /// [`sigmoid`].
    Sigmoid,
    /// [`erf`].
    Erf,
    /// [`silu`].
    Silu,
    /// [`gelu_erf`].
    GeluErf,
    /// [`gelu_tanh`].
    GeluTanh,
    /// [`softplus`].
    Softplus,
}

impl Func {
    /// Every function.
    pub const ALL: [Func; 9] = [
        Func::Exp,
        Func::Log,
        Func::Tanh,
        Func::Sigmoid,
        Func::Erf,
        Func::Silu,
        Func::GeluErf,
        Func::GeluTanh,
        Func::Softplus,
    ];

    /// The function a loop-IR transcendental computes (`None` for the other unary ops;
    /// silu and gelu_tanh are expressions, not ops).
    pub fn of(op: UnOp) -> Option<Func> {
        Some(match op {
            UnOp::Exp => Func::Exp,
            UnOp::Log => Func::Log,
            UnOp::Tanh => Func::Tanh,
            UnOp::Sigmoid => Func::Sigmoid,
            UnOp::Erf => Func::Erf,
            UnOp::Gelu => Func::GeluErf,
            UnOp::Softplus => Func::Softplus,
            _ => return None,
        })
    }

    /// Applies the recipe with emitter `e`.
    #[inline(always)]
    pub fn emit<E: Emit>(self, e: &mut E, x: E::F) -> Result<E::F, E::Err> {
        match self {
            Func::Exp => exp(e, x),
            Func::Log => log(e, x),
            Func::Tanh => tanh(e, x),
            Func::Sigmoid => sigmoid(e, x),
            Func::Erf => erf(e, x),
            Func::Silu => silu(e, x),
            Func::GeluErf => gelu_erf(e, x),
            Func::GeluTanh => gelu_tanh(e, x),
            Func::Softplus => softplus(e, x),
        }
    }

    /// The recipe on one value.
    pub fn scalar(self, x: f32) -> f32 {
        let Ok(y) = self.emit(&mut Scalar, x);
        y
    }

    /// The recipe on one value through [`SoftFma`] (the portable paths; same bits).
    pub fn soft(self, x: f32) -> f32 {
        let Ok(y) = self.emit(&mut SoftFma, x);
        y
    }

    /// The exact value in f64 (the interpreter's definitions).
    pub fn exact(self, x: f32) -> f64 {
        let d = x as f64;
        match self {
            Func::Exp => accuracy::exact(UnOp::Exp, x),
            Func::Log => accuracy::exact(UnOp::Log, x),
            Func::Tanh => accuracy::exact(UnOp::Tanh, x),
            Func::Sigmoid => accuracy::exact(UnOp::Sigmoid, x),
            Func::Erf => accuracy::exact(UnOp::Erf, x),
            Func::Softplus => accuracy::exact(UnOp::Softplus, x),
            Func::Silu | Func::GeluErf | Func::GeluTanh => self.exact_f64(d),
        }
    }
}

impl Func {
    /// The exact value of an activation at an f64 argument (the transcendentals: see
    /// [`accuracy::exact`]).
    pub fn exact_f64(self, d: f64) -> f64 {
        let sigmoid = |u: f64| {
            if u >= 0.0 {
                1.0 / (1.0 + (-u).exp())
            } else {
                u.exp() / (1.0 + u.exp())
            }
        };
        match self {
            Func::Silu => d * sigmoid(d),
            Func::GeluErf => crate::loop_ir::gelu_f64(d),
            // 0.5·(1 + tanh(u)) = sigmoid(2u), without the cancellation.
            Func::GeluTanh => {
                let u = (2.0 / std::f64::consts::PI).sqrt() * (d + 0.044715 * d * d * d);
                d * sigmoid(2.0 * u)
            }
            f => f.exact(d as f32),
        }
    }
}

/// The accuracy contract of the recipes, checked over [`accuracy::sweep_inputs`] by this
/// module's tests (the scalar recipe) and each backend's `tests/vmath.rs` (bit equality with
/// the scalar recipe, and these bounds): errors are in units in the last place of the exact
/// (f64) result, subnormal results in units of the smallest subnormal; special values (NaN,
/// ±inf, overflow, underflow) must match exactly.
pub mod accuracy {
    use crate::loop_ir::{erf_f64, gelu_f64, softplus_f64, UnOp};

    /// Stride through the f32 bit patterns (prime, so every exponent and many mantissas are hit).
    pub const SWEEP_STEP: usize = 997;
    /// Maximum error of exp, in ulps.
    pub const EXP_MAX_ULP: f64 = 2.0;
    /// Maximum error of log, in ulps.
    pub const LOG_MAX_ULP: f64 = 2.0;
    /// Maximum error of tanh, in ulps.
    pub const TANH_MAX_ULP: f64 = 3.0;
    /// Maximum error of sigmoid, in ulps.
    pub const SIGMOID_MAX_ULP: f64 = 3.0;
    /// Maximum error of erf, in ulps: Eigen's rational loses a few ulps where erf nears 1
    /// (measured 4.6 ulp at x = 3.94, a relative error of 2.4e-7).
    pub const ERF_MAX_ULP: f64 = 5.0;
    /// Maximum error of gelu (erf form), in ulps.
    pub const GELU_MAX_ULP: f64 = 8.0;
    /// Maximum error of softplus, in ulps (measured 1.8 ulp at x = -5.84).
    pub const SOFTPLUS_MAX_ULP: f64 = 3.0;
    /// The activations' error bounds `(f, rel, abs)`: `|got - exact| <= rel·|exact|·(1 + κ) +
    /// abs`, with `κ = |x f'(x) / f(x)|` the condition number (the recipes compute their
    /// arguments in f32: gelu_tanh's `x + 0.044715x³` carries a few ulps into `e^-|z|`, which
    /// multiplies them by |z| in the negative tail); `abs` covers results whose intermediate
    /// (sigmoid) is subnormal.
    pub const ACTIVATIONS: [(super::Func, f64, f64); 3] = [
        (super::Func::Silu, 4e-7, 2e-43),
        (super::Func::GeluErf, 4e-7, 2e-43),
        (super::Func::GeluTanh, 4e-7, 2e-43),
    ];

    /// `κ = |x f'(x) / f(x)|` of `f` at `x`, by a central difference in f64.
    pub fn condition(f: super::Func, x: f32) -> f64 {
        let d = x as f64;
        let h = 1e-7;
        let (p, m) = (f.exact_f64(d * (1.0 + h)), f.exact_f64(d * (1.0 - h)));
        let k = ((p - m) / (2.0 * h) / f.exact_f64(d)).abs();
        if k.is_finite() {
            k
        } else {
            0.0
        }
    }

    /// The transcendentals with their bounds.
    pub const OPS: [(UnOp, f64); 7] = [
        (UnOp::Exp, EXP_MAX_ULP),
        (UnOp::Log, LOG_MAX_ULP),
        (UnOp::Tanh, TANH_MAX_ULP),
        (UnOp::Sigmoid, SIGMOID_MAX_ULP),
        (UnOp::Erf, ERF_MAX_ULP),
        (UnOp::Gelu, GELU_MAX_ULP),
        (UnOp::Softplus, SOFTPLUS_MAX_ULP),
    ];

    /// The worst error found: (ulps, x, got, exact).
    pub type Worst = (f64, f32, f32, f64);

    /// The exact value of `op(x)`, in f64 (non-transcendentals: their f32 meaning).
    pub fn exact(op: UnOp, x: f32) -> f64 {
        let d = x as f64;
        match op {
            UnOp::Exp => d.exp(),
            UnOp::Log => d.ln(),
            UnOp::Tanh => d.tanh(),
            UnOp::Erf => erf_f64(d),
            UnOp::Gelu => gelu_f64(d),
            UnOp::Softplus => softplus_f64(d),
            UnOp::Sigmoid => {
                if d >= 0.0 {
                    1.0 / (1.0 + (-d).exp())
                } else {
                    d.exp() / (1.0 + d.exp())
                }
            }
            _ => op.apply(x) as f64,
        }
    }

    /// The f32 ulp at magnitude `r` (the subnormal spacing below the normal range).
    pub fn ulp(r: f64) -> f64 {
        let a = r.abs();
        if a < f32::MIN_POSITIVE as f64 {
            return f64::from(f32::from_bits(1));
        }
        let e = a.log2().floor();
        // `a` may round up to the next binade in f32; the smaller ulp is the stricter.
        2f64.powf(e - 23.0)
    }

    /// Every [`SWEEP_STEP`]-th finite f32 bit pattern with both signs, then edge cases
    /// (zeros, overflow and underflow thresholds, clamp limits, subnormals, ±inf, NaN).
    pub fn sweep_inputs() -> Vec<f32> {
        let mut v: Vec<f32> = (0..0x7f80_0000u32)
            .step_by(SWEEP_STEP)
            .flat_map(|b| [f32::from_bits(b), -f32::from_bits(b)])
            .collect();
        v.extend(EDGES);
        v
    }

    /// Inputs every path must agree on: zeros, ±tiny, ±huge, the clamp limits and their
    /// neighbours, the branch points, ±inf and NaN.
    pub const EDGES: [f32; 41] = [
        0.0,
        -0.0,
        1.0,
        -1.0,
        0.5,
        0.625,
        -0.625,
        0.624_999_94,
        88.72,
        88.73,
        89.0,
        89.000_01,
        -87.3,
        -103.9,
        -104.0,
        -104.000_01,
        -150.0,
        1e-45,
        -1e-45,
        1e-40,
        -1e-40,
        f32::MIN_POSITIVE,
        f32::MAX,
        f32::MIN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        3.9,
        4.0,
        4.000_000_5,
        -4.0,
        -4.000_000_5,
        5.656_854,
        -5.656_854,
        10.0,
        -10.0,
        9.0,
        20.0,
        -20.0,
        1e30,
        -1e30,
    ];

    /// The largest ulp error of `got` (op applied to `xs`) and where; `Err` names the first
    /// special value that does not match exactly or an error that is NaN.
    pub fn max_ulp(op: UnOp, xs: &[f32], got: &[f32]) -> Result<Worst, String> {
        let mut worst = (0.0, 0.0, 0.0, 0.0);
        for (&x, &g) in xs.iter().zip(got) {
            let r = exact(op, x);
            let rf = r as f32;
            if !rf.is_finite() || !g.is_finite() {
                if !((rf.is_nan() && g.is_nan()) || rf == g) {
                    return Err(format!("{op:?}({x:e}) = {g:e}, expected {rf:e}"));
                }
                continue;
            }
            let e = (g as f64 - r).abs() / ulp(r);
            if e.is_nan() {
                return Err(format!("{op:?}({x:e}) = {g:e}, expected {r:e}"));
            }
            if e > worst.0 {
                worst = (e, x, g, r);
            }
        }
        Ok(worst)
    }

    /// The bits of `got` against the scalar recipe's on `xs` (NaN matches any NaN): `Err`
    /// names how many differ and the first few `(x, got, scalar)`.
    pub fn same_bits(what: &str, f: super::Func, xs: &[f32], got: &[f32]) -> Result<(), String> {
        if xs.len() != got.len() {
            return Err(format!(
                "{what} {f:?}: {} results for {} inputs",
                got.len(),
                xs.len()
            ));
        }
        let differ: Vec<(f32, f32, f32)> = xs
            .iter()
            .zip(got)
            .map(|(&x, &g)| (x, g, f.scalar(x)))
            .filter(|(_, g, s)| g.to_bits() != s.to_bits() && !(g.is_nan() && s.is_nan()))
            .collect();
        if differ.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{what} {f:?}: {} of {} inputs differ from the scalar recipe, first (x, got, scalar) = {:?}",
                differ.len(),
                xs.len(),
                &differ[..differ.len().min(4)]
            ))
        }
    }

    /// Deterministic pseudo-random inputs over wide ranges: uniform in `[-range, range]` for
    /// several ranges, and random bit patterns.
    pub fn random_inputs(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed | 1;
        let mut next = move || {
            // xorshift64*
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            s.wrapping_mul(0x2545_F491_4F6C_DD1D)
        };
        let ranges = [1.0f32, 4.0, 10.0, 100.0, 1e4];
        (0..n)
            .map(|i| {
                let r = next();
                if i % 4 == 3 {
                    f32::from_bits((r >> 32) as u32)
                } else {
                    let u = (r >> 40) as f32 / (1u64 << 24) as f32;
                    (2.0 * u - 1.0) * ranges[i % ranges.len()]
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::accuracy::*;
    use super::*;

    #[test]
    fn emulated_fma_is_bit_identical_to_mul_add() {
        // Random bit patterns (every class: NaN, ±inf, subnormals, overflow) and products
        // cancelled against an addend within a few ulp (the hard rounding cases).
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 16) as u32
        };
        for i in 0..4_000_000u32 {
            let (a, b, c) = if i % 2 == 0 {
                (
                    f32::from_bits(next()),
                    f32::from_bits(next()),
                    f32::from_bits(next()),
                )
            } else {
                let a = f32::from_bits(next() & 0x3fff_ffff | 0x3f00_0000);
                let b = f32::from_bits(next() & 0x3fff_ffff | 0x3f00_0000);
                let tiny = f32::from_bits(next() & 0x007f_ffff | 0x3300_0000);
                (a, b, -(a * b) + if next() & 1 == 0 { tiny } else { -tiny })
            };
            let (w, g) = (a.mul_add(b, c), fma_emulated(a, b, c));
            assert!(
                w.to_bits() == g.to_bits() || (w.is_nan() && g.is_nan()),
                "fma({a:e}, {b:e}, {c:e}) = {w:e}, emulated {g:e}"
            );
        }
        for (a, b, c) in [
            (0.0f32, -0.0, 0.0),
            (-0.0, 0.0, -0.0),
            (f32::MAX, 2.0, -f32::MAX),
            (f32::MIN_POSITIVE, 0.5, 0.0),
            (1e-30, 1e-30, -0.0),
            (f32::INFINITY, 0.0, 1.0),
            (3.0, f32::NAN, 1.0),
        ] {
            let (w, g) = (a.mul_add(b, c), fma_emulated(a, b, c));
            assert!(
                w.to_bits() == g.to_bits() || (w.is_nan() && g.is_nan()),
                "{a} {b} {c}"
            );
        }
    }

    #[test]
    fn transcendentals_are_within_their_ulp_bounds() {
        let xs = sweep_inputs();
        let mut failures = vec![];
        for (op, bound) in OPS {
            let got: Vec<f32> = xs.iter().map(|&x| scalar::unary(op, x)).collect();
            let w = max_ulp(op, &xs, &got).unwrap_or_else(|e| panic!("{e}"));
            eprintln!(
                "{op:?}: max {:.3} ulp at x = {:e} (got {:e}, exact {:e})",
                w.0, w.1, w.2, w.3
            );
            if w.0 > bound {
                failures.push(format!("{op:?}: {w:?} exceeds {bound} ulp"));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn activations_are_within_their_bounds() {
        let mut xs = sweep_inputs();
        xs.extend(random_inputs(200_000, 7));
        xs.extend((-4000..=4000).map(|i| i as f32 * 0.005));
        let mut failures = vec![];
        for (f, rel, abs) in ACTIVATIONS {
            let mut worst = (0.0f64, 0.0f32);
            for &x in &xs {
                let g = f.scalar(x);
                let r = f.exact(x);
                if x.is_nan() {
                    assert!(g.is_nan(), "{f:?}(NaN) = {g}");
                    continue;
                }
                if !r.is_finite() || !(r as f32).is_finite() {
                    if (r as f32) != g && !(r.is_nan() && g.is_nan()) {
                        failures.push(format!("{f:?}({x:e}) = {g:e}, expected {r:e}"));
                    }
                    continue;
                }
                let err = (g as f64 - r).abs() / (rel * r.abs() * (1.0 + condition(f, x)) + abs);
                if err.is_nan() || err > worst.0 {
                    worst = (err, x);
                }
            }
            eprintln!(
                "{f:?}: worst {:.3} of the bound at x = {:e}",
                worst.0, worst.1
            );
            if worst.0.is_nan() || worst.0 > 1.0 {
                failures.push(format!("{f:?}: {worst:?} exceeds the bound"));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn constants_are_the_nearest_f32() {
        let two_c = 2.0 * (2.0 / std::f64::consts::PI).sqrt();
        assert_eq!(GELU_TANH_2C, two_c as f32);
        assert_eq!(ROUND_MAGIC.to_bits() as i32, ROUND_MAGIC_BITS);
        assert!((LN2_HI as f64 + LN2_LO as f64 - std::f64::consts::LN_2).abs() < 1e-10);
        // n·LN2_HI is exact for the |n| <= 150 that exp reduces by.
        assert_eq!(LN2_HI.to_bits() & 0x3fff, 0);
    }

    #[test]
    fn nan_in_nan_out_and_limits() {
        for f in Func::ALL {
            assert!(f.scalar(f32::NAN).is_nan(), "{f:?}(NaN)");
            assert!(f.scalar(-f32::NAN).is_nan(), "{f:?}(-NaN)");
        }
        assert_eq!(scalar::exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(scalar::exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(scalar::exp(0.0), 1.0);
        assert_eq!(scalar::log(1.0), 0.0);
        assert_eq!(scalar::log(0.0), f32::NEG_INFINITY);
        assert!(scalar::log(-1.0).is_nan());
        assert_eq!(scalar::tanh(f32::INFINITY), 1.0);
        assert_eq!(scalar::tanh(f32::NEG_INFINITY), -1.0);
        assert_eq!(scalar::sigmoid(f32::INFINITY), 1.0);
        assert_eq!(scalar::sigmoid(f32::NEG_INFINITY), 0.0);
        assert_eq!(scalar::erf(f32::INFINITY), 1.0);
        assert_eq!(scalar::silu(200.0), 200.0);
        assert!(scalar::silu(-200.0).abs() < 1e-30);
        assert_eq!(scalar::gelu_erf(50.0), 50.0);
        assert_eq!(scalar::gelu_tanh(30.0), 30.0);
    }

    #[test]
    fn wide_lanes_equal_the_scalar_recipe() {
        let mut xs = sweep_inputs();
        xs.extend(random_inputs(4096, 3));
        xs.truncate(xs.len() / 8 * 8);
        for f in Func::ALL {
            let mut got = vec![];
            for c in xs.chunks(8) {
                let mut v = [0.0f32; 8];
                v.copy_from_slice(c);
                let Ok(y) = f.emit(&mut Wide::<Scalar, 8>(Scalar), v);
                got.extend(y);
            }
            same_bits("Wide<Scalar, 8>", f, &xs, &got).unwrap();
            let soft: Vec<f32> = xs.iter().map(|&x| f.soft(x)).collect();
            same_bits("SoftFma", f, &xs, &soft).unwrap();
        }
    }
}
