//! The linear-scan family: `linear_scan(a, b, h0) -> (h, h_last)`, the first-order linear
//! recurrence `h_t = a_t ⊙ h_{t−1} + b_t` (Mamba's selective scan, a decayed state, any
//! elementwise linear recurrence), which `select_recurrence_form` (kiln-passes) finds in
//! the body of a `loop`. Its shape rule and reference semantics live here; the CPU runtime
//! runs it in the form the optimiser's cost model chose (`native/linear_scan.rs`).
//!
//! Operands: `a, b: [S, *state]` (step `t` is slice `t` of axis 0) and `h0: [*state]`.
//! Outputs: `h: [S, *state]`, every step's state, and `h_last: [*state]`, the state after
//! the last step (`h0` when `S = 0`). Each step is the two rounded operations the loop it
//! replaces ran, a product then a sum (`round(round(a_t · h_{t−1}) + b_t)`), never a fused
//! multiply-add: the sequential form is bit-equal to that loop.
//!
//! `chunk` (≥ 0) is a schedule hint, not semantics: 0 runs the steps in order (the state's
//! elements spread over the threads); `C > 0` splits time into blocks of `C` steps, each
//! thread scans its blocks from a zero state while multiplying the decays up, the block
//! boundaries are then carried across in order, and each block is rescanned from its true
//! incoming state. Only those incoming states differ from the sequential form (a
//! reassociated product), so the chunked form is exact up to rounding.

use super::shared::{fact, from_f64s};
use super::{arg, not_in_family, Fact};
use crate::{Attrs, Dim, OpKind, Shape, Tensor};

/// State elements a thread takes at least in the sequential form (smaller states run on
/// one thread: a fork/join costs more than the work). The runtime splits by it and the
/// optimiser's cost model counts threads by it.
pub const MIN_ELEMS_PER_THREAD: usize = 4096;

/// The block length of the chunked form, checked (0: the sequential form).
pub fn chunk_of(attrs: &Attrs) -> Result<usize, String> {
    let c = attrs.int_or("chunk", 0)?;
    usize::try_from(c).map_err(|_| format!("linear_scan `chunk` must be >= 0, got {c}"))
}

/// Shape rule: `[S, *state] × [S, *state] × [*state] → [S, *state], [*state]`.
pub fn infer(op: OpKind, attrs: &Attrs, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>, String> {
    if op != OpKind::LinearScan {
        return Err(not_in_family(op));
    }
    chunk_of(attrs)?;
    let (a, b, h0) = (arg(inputs, 0)?, arg(inputs, 1)?, arg(inputs, 2)?);
    let dtype = a.ty.dtype;
    if !dtype.is_float() || b.ty.dtype != dtype || h0.ty.dtype != dtype {
        return Err(format!(
            "linear_scan a, b, h0 must be one float dtype, got {}, {}, {}",
            a.ty.dtype, b.ty.dtype, h0.ty.dtype
        ));
    }
    let (Some(ad), Some(bd), Some(hd)) = (a.ty.shape.dims(), b.ty.shape.dims(), h0.ty.shape.dims())
    else {
        return Ok(vec![
            fact(dtype, Shape::unknown()),
            fact(dtype, Shape::unknown()),
        ]);
    };
    if ad.len() != hd.len() + 1 || bd.len() != ad.len() {
        return Err(format!(
            "linear_scan a and b must be [S, *state] with h0 [*state]: got ranks {}, {}, {}",
            ad.len(),
            bd.len(),
            hd.len()
        ));
    }
    let mut out = Vec::with_capacity(ad.len());
    for axis in 0..ad.len() {
        let d = super::movement::unify(&ad[axis], &bd[axis])
            .map_err(|e| format!("linear_scan a and b disagree on axis {axis}: {e}"))?;
        let d = if axis == 0 {
            d
        } else {
            super::movement::unify(&d, &hd[axis - 1]).map_err(|e| {
                format!(
                    "linear_scan a and h0 disagree on state axis {}: {e}",
                    axis - 1
                )
            })?
        };
        out.push(d);
    }
    let state: Vec<Dim> = out[1..].to_vec();
    Ok(vec![
        fact(dtype, Shape::new(out)),
        fact(dtype, Shape::new(state)),
    ])
}

/// Reference semantics: the steps in order, each product and sum rounded to the dtype.
pub fn eval(op: OpKind, attrs: &Attrs, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
    if op != OpKind::LinearScan {
        return Err(not_in_family(op));
    }
    chunk_of(attrs)?;
    let (a, b, h0) = (arg(inputs, 0)?, arg(inputs, 1)?, arg(inputs, 2)?);
    let dt = a.dtype();
    if !dt.is_float() || b.dtype() != dt || h0.dtype() != dt {
        return Err(format!(
            "linear_scan a, b, h0 must be one float dtype, got {}, {}, {}",
            dt,
            b.dtype(),
            h0.dtype()
        ));
    }
    if a.rank() != h0.rank() + 1 || a.shape() != b.shape() || a.shape()[1..] != *h0.shape() {
        return Err(format!(
            "linear_scan a and b must be [S, *state] with h0 [*state]: got {:?}, {:?}, {:?}",
            a.shape(),
            b.shape(),
            h0.shape()
        ));
    }
    // Rounds through the dtype, as the interpreter's `mul` and `add` do for every dtype:
    // f32 arithmetic is f64 arithmetic rounded once.
    let round: fn(f64) -> f64 = crate::dispatch!(h0.data(), _v, T => |x| crate::Elem::to_f64(<T as crate::Elem>::from_f64(x)));
    let (av, bv) = (a.to_f64s(), b.to_f64s());
    let mut h = h0.to_f64s();
    let n = h.len();
    let s = a.shape()[0];
    let mut all = Vec::with_capacity(s * n);
    for t in 0..s {
        for (i, hi) in h.iter_mut().enumerate() {
            *hi = round(round(av[t * n + i] * *hi) + bv[t * n + i]);
        }
        all.extend_from_slice(&h);
    }
    Ok(vec![
        from_f64s(dt, a.shape().to_vec(), all)?,
        from_f64s(dt, h0.shape().to_vec(), h)?,
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Attr, DType, TensorType};

    fn t(shape: &[usize], v: &[f32]) -> Tensor {
        Tensor::from_vec(shape.to_vec(), v.to_vec())
    }

    #[test]
    fn steps_run_in_order_and_the_last_state_is_returned() {
        // h_t = a_t h_{t-1} + b_t over two state elements, three steps.
        let a = t(&[3, 2], &[0.5, 2.0, 0.5, 2.0, 0.0, -1.0]);
        let b = t(&[3, 2], &[1.0, 0.0, 1.0, 1.0, 3.0, 0.5]);
        let h0 = t(&[2], &[2.0, 1.0]);
        let out = eval(
            OpKind::LinearScan,
            &Attrs::new(),
            &[Some(&a), Some(&b), Some(&h0)],
        )
        .unwrap();
        // Element 0: 0.5·2+1 = 2, 0.5·2+1 = 2, 0·2+3 = 3. Element 1: 2, 5, -4.5.
        assert_eq!(out[0].to_f64s(), vec![2.0, 2.0, 2.0, 5.0, 3.0, -4.5]);
        assert_eq!(out[1].to_f64s(), vec![3.0, -4.5]);
        assert_eq!(out[0].shape(), [3, 2]);
        // No steps: the initial state comes back.
        let e = t(&[0, 2], &[]);
        let out = eval(
            OpKind::LinearScan,
            &Attrs::new(),
            &[Some(&e), Some(&e), Some(&h0)],
        )
        .unwrap();
        assert_eq!(out[1].to_f64s(), vec![2.0, 1.0]);
        assert_eq!(out[0].shape(), [0, 2]);
    }

    #[test]
    fn each_step_rounds_its_product_before_the_sum() {
        // A fused multiply-add would keep the product's low bits: (1+2^-12)^2 - 1 rounds
        // differently (2^-11 in f32, 2^-11 + 2^-24 fused).
        let x = 1.0f32 + f32::EPSILON * 2048.0;
        let a = t(&[1, 1], &[x]);
        let b = t(&[1, 1], &[-1.0]);
        let h0 = t(&[1], &[x]);
        let out = eval(
            OpKind::LinearScan,
            &Attrs::new(),
            &[Some(&a), Some(&b), Some(&h0)],
        )
        .unwrap();
        assert_eq!(out[1].to_f64s()[0], f64::from(x * x - 1.0));
        assert_ne!(f64::from(x.mul_add(x, -1.0)), f64::from(x * x - 1.0));
    }

    #[test]
    fn shapes_must_agree_and_the_chunk_must_not_be_negative() {
        let f = |d: &[usize]| Fact::of(TensorType::new(DType::F32, Shape::fixed(d)));
        let (a, h0) = (f(&[5, 2, 3]), f(&[2, 3]));
        let out = infer(
            OpKind::LinearScan,
            &Attrs::new(),
            &[Some(&a), Some(&a), Some(&h0)],
        )
        .unwrap();
        assert_eq!(out[0].ty.shape, Shape::fixed(&[5, 2, 3]));
        assert_eq!(out[1].ty.shape, Shape::fixed(&[2, 3]));
        let bad = f(&[5, 2, 4]);
        let e = infer(
            OpKind::LinearScan,
            &Attrs::new(),
            &[Some(&a), Some(&bad), Some(&h0)],
        );
        assert!(e.unwrap_err().contains("axis 2"));
        let e = infer(
            OpKind::LinearScan,
            &Attrs::new(),
            &[Some(&a), Some(&a), Some(&a)],
        );
        assert!(e.unwrap_err().contains("ranks"));
        let neg = Attrs::new().with("chunk", Attr::Int(-1));
        let e = infer(OpKind::LinearScan, &neg, &[Some(&a), Some(&a), Some(&h0)]);
        assert!(e.unwrap_err().contains("chunk"));
    }
}
