//! The fused epilogue of kiln's `linear` op, applied to an output tile while it is in cache:
//! `y = act(row_scale ⊙ acc + bias) + residual`; the activations are `kiln_plan::vmath`'s
//! recipes (branch-free, so that they vectorise inside the AVX2 loop nest).

use super::{GemmError, MatRef, OutPtr};

/// The activation of `linear`'s `activation` attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Activation {
    /// Identity.
    #[default]
    None,
    /// `max(x, 0)`, NaN passes through.
    Relu,
    /// `0.5·x·(1 + erf(x/√2))` (`gelu`).
    GeluErf,
    /// `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))` (`gelu_tanh`).
    GeluTanh,
    /// `x·sigmoid(x)`.
    Silu,
}

impl Activation {
    /// The activation named by `linear`'s attribute (`none`, `relu`, `gelu`, `gelu_tanh`,
    /// `silu`).
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "none" => Self::None,
            "relu" => Self::Relu,
            "gelu" => Self::GeluErf,
            "gelu_tanh" => Self::GeluTanh,
            "silu" => Self::Silu,
            _ => return None,
        })
    }

    /// Applies the activation to one value.
    #[inline(always)]
    pub fn apply(self, x: f32) -> f32 {
        match self {
            Self::None => x,
            Self::Relu => relu(x),
            Self::GeluErf => gelu_erf(x),
            Self::GeluTanh => gelu_tanh(x),
            Self::Silu => silu(x),
        }
    }

    /// Applies the activation to a slice (one loop per activation, so each vectorises).
    #[inline(always)]
    fn apply_slice(self, xs: &mut [f32]) {
        // inline(always): a non-inlined helper would be compiled without the caller's
        // AVX2+FMA target features (SSE2 only, with `floor` as a slow libm call).
        #[inline(always)]
        fn each(xs: &mut [f32], f: impl Fn(f32) -> f32) {
            xs.iter_mut().for_each(|x| *x = f(*x));
        }
        match self {
            Self::None => {}
            Self::Relu => each(xs, relu),
            Self::GeluErf => each(xs, gelu_erf),
            Self::GeluTanh => each(xs, gelu_tanh),
            Self::Silu => each(xs, silu),
        }
    }
}

/// The epilogue operands of one GEMM: `C = act(row_scale ⊙ (A·B) + bias) + residual`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Epilogue<'a> {
    /// One factor per row of C (`[M]`).
    pub row_scale: Option<&'a [f32]>,
    /// One value per column of C (`[N]`).
    pub bias: Option<&'a [f32]>,
    /// Applied after scale and bias.
    pub activation: Activation,
    /// Added last (`[M, N]`, any strides).
    pub residual: Option<MatRef<'a>>,
}

impl Epilogue<'_> {
    /// Checks the operands against an `m × n` output.
    pub(super) fn check(&self, m: usize, n: usize) -> Result<(), GemmError> {
        let eq = |what, expected, got| {
            if expected == got {
                Ok(())
            } else {
                Err(GemmError::Mismatch {
                    what,
                    expected,
                    got,
                })
            }
        };
        if let Some(s) = self.row_scale {
            eq("row_scale length", m, s.len())?;
        }
        if let Some(b) = self.bias {
            eq("bias length", n, b.len())?;
        }
        if let Some(r) = &self.residual {
            eq("residual rows", m, r.rows())?;
            eq("residual columns", n, r.cols())?;
        }
        Ok(())
    }

    /// Whether the epilogue is the identity.
    #[inline(always)]
    pub(super) fn is_plain(&self) -> bool {
        self.row_scale.is_none()
            && self.bias.is_none()
            && self.activation == Activation::None
            && self.residual.is_none()
    }

    /// Applies the epilogue to rows `i0..i0 + rows`, columns `j0..j0 + w` of the output.
    ///
    /// # Safety
    /// The rectangle lies inside the output that `out` points into, `check` passed for that
    /// output's shape, and no other reference to the rectangle is live.
    #[inline(always)]
    pub(super) unsafe fn apply(&self, out: OutPtr, i0: usize, rows: usize, j0: usize, w: usize) {
        if self.is_plain() {
            return;
        }
        for i in i0..i0 + rows {
            // SAFETY: by the caller's contract the row segment is in bounds and exclusive.
            let row = unsafe { std::slice::from_raw_parts_mut(out.ptr.add(i * out.rs + j0), w) };
            if let Some(s) = self.row_scale {
                let s = s[i];
                row.iter_mut().for_each(|x| *x *= s);
            }
            if let Some(b) = self.bias {
                row.iter_mut()
                    .zip(&b[j0..j0 + w])
                    .for_each(|(x, b)| *x += b);
            }
            self.activation.apply_slice(row);
            if let Some(r) = &self.residual {
                if r.cs == 1 {
                    let start = i * r.rs + j0;
                    let src = &r.data[start..start + w];
                    row.iter_mut().zip(src).for_each(|(x, r)| *x += r);
                } else {
                    for (jj, x) in row.iter_mut().enumerate() {
                        *x += r.at(i, j0 + jj);
                    }
                }
            }
        }
    }
}

#[inline(always)]
fn relu(x: f32) -> f32 {
    // Same NaN rule as the reference: NaN is not replaced by zero.
    if x.is_nan() || x > 0.0 {
        x
    } else {
        0.0
    }
}

// The activations: `kiln_plan::vmath`'s recipes on one value, the same roundings as the
// SIMD epilogue (`simd.rs`) and the loop kernels.
use kiln_plan::vmath::scalar::{gelu_erf, gelu_tanh, silu};

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_plan::vmath::scalar::exp;

    /// Relative error of the f32 activations against f64 formulas.
    const ACT_TOL: f64 = 4e-6;

    fn close(got: f32, want: f64) -> bool {
        (got as f64 - want).abs() <= ACT_TOL * (1.0 + want.abs())
    }

    #[test]
    fn activations_match_f64_formulas_over_a_wide_range() {
        let erf = |x: f64| {
            // High-precision reference by Simpson integration of 2/sqrt(pi)·e^{-t²}.
            let n = 2000;
            let h = x / n as f64;
            let f = |t: f64| (-t * t).exp();
            let mut s = f(0.0) + f(x);
            for i in 1..n {
                s += f(i as f64 * h) * if i % 2 == 1 { 4.0 } else { 2.0 };
            }
            s * h / 3.0 * std::f64::consts::FRAC_2_SQRT_PI
        };
        for i in -400..=400 {
            let x = i as f64 * 0.025;
            let xf = x as f32;
            assert!(close(exp(xf), x.exp()), "exp({x})");
            assert!(close(silu(xf), x / (1.0 + (-x).exp())), "silu({x})");
            let c = (2.0 / std::f64::consts::PI).sqrt();
            let gt = 0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh());
            assert!(close(gelu_tanh(xf), gt), "gelu_tanh({x})");
            let ge = 0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2));
            assert!(
                close(gelu_erf(xf), ge),
                "gelu({x}): {} vs {ge}",
                gelu_erf(xf)
            );
        }
    }

    #[test]
    fn activations_saturate_and_keep_nan() {
        assert!(silu(-200.0).abs() < 1e-30);
        assert_eq!(silu(200.0), 200.0);
        assert!(gelu_erf(-50.0).abs() < 1e-30);
        assert_eq!(gelu_erf(50.0), 50.0);
        assert_eq!(gelu_tanh(30.0), 30.0);
        assert!(exp(f32::NAN).is_nan());
        assert!(relu(f32::NAN).is_nan());
        assert_eq!(relu(-1.0), 0.0);
    }
}
