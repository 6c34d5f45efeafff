//! Comparing outputs with reference data under a named tolerance. A NaN never passes
//! unless the reference has a NaN in the same place. Integer and bool outputs are exact
//! arithmetic: they must equal their reference whatever the tolerance.

use kiln_ir::Tensor;

/// How close an output must be to its reference.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Tolerance {
    /// `max|got - want| <= rel * max|want|` (plus `abs` slack for all-zero references).
    ScaledByMax {
        /// Fraction of the reference's largest magnitude.
        rel: f64,
        /// Absolute slack.
        abs: f64,
    },
    /// numpy's `allclose`: `|got - want| <= atol + rtol * |want|` elementwise.
    AllClose {
        /// Relative tolerance.
        rtol: f64,
        /// Absolute tolerance.
        atol: f64,
    },
}

/// Model outputs against PyTorch references: max abs error within 1e-4 of the output's scale.
pub const MODEL_TOLERANCE: Tolerance = Tolerance::ScaledByMax {
    rel: 1e-4,
    abs: 1e-6,
};

/// Quantised models (`tests/models/*_dynq`, `*_qdq`) against ONNX Runtime's float outputs:
/// within half a u8 quantisation step (1/510) of the output's largest magnitude. Float ops
/// before a `DynamicQuantizeLinear` or `QuantizeLinear` (LayerNorm, softmax, GELU) differ
/// from ORT's in the last bits, which can flip a rounding there by one step and move the
/// outputs downstream by a fraction of a step; a wrong zero point, scale or dropped term moves
/// them by whole steps. The integer ops themselves are exact.
pub const QUANT_MODEL_TOLERANCE: Tolerance = Tolerance::ScaledByMax {
    rel: 1.0 / 510.0,
    abs: 1e-6,
};

/// The ONNX backend test suite's own default (`rtol=1e-3, atol=1e-7`).
pub const ONNX_NODE_TOLERANCE: Tolerance = Tolerance::AllClose {
    rtol: 1e-3,
    atol: 1e-7,
};

/// The result of comparing one output.
#[derive(Clone, Debug, PartialEq)]
pub struct OutputError {
    /// Largest absolute difference.
    pub max_abs: f64,
    /// Largest relative difference (`|got - want| / |want|`, over nonzero references).
    pub max_rel: f64,
    /// Whether it is within tolerance (and shapes and dtypes agree, and NaNs match).
    pub ok: bool,
    /// Why it failed, when it did.
    pub reason: Option<String>,
}

/// Compares `got` with `want`.
pub fn compare(got: &Tensor, want: &Tensor, tol: Tolerance) -> OutputError {
    let fail = |reason: String| OutputError {
        max_abs: f64::INFINITY,
        max_rel: f64::INFINITY,
        ok: false,
        reason: Some(reason),
    };
    if got.shape() != want.shape() {
        return fail(format!(
            "shape {:?} but expected {:?}",
            got.shape(),
            want.shape()
        ));
    }
    if got.dtype() != want.dtype() {
        return fail(format!(
            "dtype {} but expected {}",
            got.dtype(),
            want.dtype()
        ));
    }
    let (g, w) = (got.to_f64s(), want.to_f64s());
    let exact = !want.dtype().is_float();
    let scale = w
        .iter()
        .filter(|x| x.is_finite())
        .fold(0.0f64, |m, x| m.max(x.abs()));
    let (mut max_abs, mut max_rel, mut ok) = (0.0f64, 0.0f64, true);
    let mut reason = None;
    for (i, (&a, &b)) in g.iter().zip(&w).enumerate() {
        if a.is_nan() || b.is_nan() {
            if !(a.is_nan() && b.is_nan()) {
                ok = false;
                max_abs = f64::NAN;
                reason.get_or_insert_with(|| format!("element {i} is {a} but expected {b}"));
            }
            continue;
        }
        if a.is_infinite() || b.is_infinite() {
            if a != b {
                ok = false;
                max_abs = f64::INFINITY;
                reason.get_or_insert_with(|| format!("element {i} is {a} but expected {b}"));
            }
            continue;
        }
        let d = (a - b).abs();
        max_abs = max_abs.max(d);
        if b != 0.0 {
            max_rel = max_rel.max(d / b.abs());
        }
        let within = match tol {
            _ if exact => d == 0.0,
            Tolerance::ScaledByMax { rel, abs } => d <= rel * scale + abs,
            Tolerance::AllClose { rtol, atol } => d <= atol + rtol * b.abs(),
        };
        if !within {
            ok = false;
            reason.get_or_insert_with(|| format!("element {i} is {a} but expected {b}"));
        }
    }
    OutputError {
        max_abs,
        max_rel,
        ok,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nan_fails_unless_expected_and_shapes_must_match() {
        let want = Tensor::from_vec(vec![2], vec![1.0f32, 2.0]);
        let nan = Tensor::from_vec(vec![2], vec![1.0f32, f32::NAN]);
        assert!(!compare(&nan, &want, MODEL_TOLERANCE).ok);
        assert!(compare(&nan, &nan, MODEL_TOLERANCE).ok);
        let close = Tensor::from_vec(vec![2], vec![1.0f32, 2.0001]);
        assert!(compare(&close, &want, MODEL_TOLERANCE).ok);
        let far = Tensor::from_vec(vec![2], vec![1.0f32, 2.01]);
        assert!(!compare(&far, &want, MODEL_TOLERANCE).ok);
        let other = Tensor::from_vec(vec![1, 2], vec![1.0f32, 2.0]);
        assert!(!compare(&other, &want, MODEL_TOLERANCE).ok);
    }

    #[test]
    fn integers_must_be_exact_whatever_the_tolerance() {
        let want = Tensor::from_vec(vec![2], vec![100_000i32, 7]);
        let off = Tensor::from_vec(vec![2], vec![100_001i32, 7]);
        assert!(!compare(&off, &want, MODEL_TOLERANCE).ok);
        assert!(!compare(&off, &want, ONNX_NODE_TOLERANCE).ok);
        assert!(compare(&want, &want, ONNX_NODE_TOLERANCE).ok);
    }
}
