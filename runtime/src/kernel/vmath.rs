//! The constants of kiln's inline f32 transcendentals (exp, log, tanh, sigmoid, erf), shared
//! by every backend that emits them (the Cranelift JIT's `vmath.rs`, the LLVM AOT's
//! `vmath.rs`) so both compute the same roundings from the same numbers: Cody–Waite range
//! reduction and Cephes' `expf`/`logf`/`tanhf` polynomials, Eigen's clamped rational erf.

// Coefficients are quoted with the digits their sources give.
#![allow(clippy::excessive_precision)]

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
pub const LN2_LO: f32 = -2.12194440e-4;
/// The smallest normal f32; smaller log arguments are scaled by 2^23 first.
pub const MIN_NORMAL: f32 = f32::MIN_POSITIVE;
/// Below this |x|, tanh uses its odd polynomial (Cephes `tanhf`), above it `1 - 2/(e^2x+1)`.
pub const TANH_SMALL: f32 = 0.625;

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
