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

/// The accuracy contract of the inline transcendentals, checked by each backend's
/// `tests/vmath.rs` over [`accuracy::sweep_inputs`]: errors are in units in the last place of
/// the exact (f64) result, subnormal results in units of the smallest subnormal; special
/// values (NaN, ±inf, overflow, underflow) must match exactly.
pub mod accuracy {
    use kiln_plan::loop_ir::{erf_f64, UnOp};

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
    /// (measured 7.5 ulp at x = 3.2, a relative error of 4.4e-7).
    pub const ERF_MAX_ULP: f64 = 8.0;

    /// The transcendentals with their bounds.
    pub const OPS: [(UnOp, f64); 5] = [
        (UnOp::Exp, EXP_MAX_ULP),
        (UnOp::Log, LOG_MAX_ULP),
        (UnOp::Tanh, TANH_MAX_ULP),
        (UnOp::Sigmoid, SIGMOID_MAX_ULP),
        (UnOp::Erf, ERF_MAX_ULP),
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
    /// (zeros, overflow and underflow thresholds, subnormals, ±inf, NaN).
    pub fn sweep_inputs() -> Vec<f32> {
        let mut v: Vec<f32> = (0..0x7f80_0000u32)
            .step_by(SWEEP_STEP)
            .flat_map(|b| [f32::from_bits(b), -f32::from_bits(b)])
            .collect();
        v.extend([
            0.0,
            -0.0,
            1.0,
            -1.0,
            0.5,
            0.625,
            -0.625,
            88.72,
            88.73,
            89.0,
            -87.3,
            -103.9,
            -104.0,
            -150.0,
            1e-45,
            1e-40,
            f32::MIN_POSITIVE,
            f32::MAX,
            f32::MIN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            3.9,
            4.0,
            -4.0,
            10.0,
            -10.0,
            9.0,
            20.0,
        ]);
        v
    }

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
}
