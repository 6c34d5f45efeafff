//! Inline transcendentals for the AOT backend: exp, log, tanh, sigmoid and erf as
//! branch-free LLVM IR on `<N x float>`, emitted from the same instruction sequence for the
//! 8-lane body and the 1-lane tail, so a lane and the tail give bit-identical results for
//! the same input. This is a port of the Cranelift JIT's `vmath` (Cephes `expf`, `logf`,
//! `tanhf`; Eigen's clamped rational erf) with the same constants and operation order.
//! No instruction here carries a fast-math flag, not even `contract`: LLVM then may not fuse
//! a multiply-add, so every rounding is the one the JIT performs and the two backends agree
//! bitwise (checked by `tests/vmath.rs`, which also bounds the error against f64).

use inkwell::builder::Builder;
use inkwell::context::Context;
use inkwell::intrinsics::Intrinsic;
use inkwell::module::Module;
use inkwell::types::VectorType;
use inkwell::values::{BasicMetadataValueEnum, VectorValue};
use inkwell::FloatPredicate;
use kiln_plan::UnOp;

use kiln_runtime::executor::vmath::*;

type R<T> = Result<T, String>;
type V<'ctx> = VectorValue<'ctx>;

/// An inkwell error as this crate's error string.
pub(crate) fn e<E: std::fmt::Display>(x: E) -> String {
    x.to_string()
}

/// Calls the LLVM intrinsic `name` overloaded on the type of `args[0]` (every intrinsic used
/// here takes and returns one vector type).
pub(crate) fn call_intrinsic<'ctx>(
    module: &Module<'ctx>,
    b: &Builder<'ctx>,
    name: &str,
    args: &[V<'ctx>],
) -> R<V<'ctx>> {
    let i = Intrinsic::find(name).ok_or_else(|| format!("no intrinsic {name}"))?;
    let ty = args
        .first()
        .ok_or_else(|| format!("{name} called without arguments"))?
        .get_type();
    let f = i
        .get_declaration(module, &[ty.into()])
        .ok_or_else(|| format!("cannot declare {name}"))?;
    let a: Vec<BasicMetadataValueEnum> = args.iter().map(|&x| x.into()).collect();
    b.build_call(f, &a, "")
        .map_err(e)?
        .try_as_basic_value()
        .basic()
        .map(|v| v.into_vector_value())
        .ok_or_else(|| format!("{name} returned nothing"))
}

/// True for the ops [`unary`] lowers.
pub fn is_transcendental(op: UnOp) -> bool {
    matches!(
        op,
        UnOp::Exp | UnOp::Log | UnOp::Tanh | UnOp::Sigmoid | UnOp::Erf
    )
}

/// Emits `op(x)` for `x: <lanes x float>` at the builder's position. Only transcendentals.
pub fn unary<'ctx>(
    cx: &'ctx Context,
    module: &Module<'ctx>,
    b: &Builder<'ctx>,
    op: UnOp,
    x: V<'ctx>,
) -> R<V<'ctx>> {
    let m = Math {
        cx,
        module,
        b,
        lanes: x.get_type().get_size(),
    };
    match op {
        UnOp::Exp => m.exp(x),
        UnOp::Log => m.log(x),
        UnOp::Tanh => m.tanh(x),
        UnOp::Sigmoid => m.sigmoid(x),
        UnOp::Erf => m.erf(x),
        _ => Err(format!("vmath has no lowering of {op:?}")),
    }
}

struct Math<'a, 'ctx> {
    cx: &'ctx Context,
    module: &'a Module<'ctx>,
    b: &'a Builder<'ctx>,
    lanes: u32,
}

impl<'ctx> Math<'_, 'ctx> {
    fn fty(&self) -> VectorType<'ctx> {
        self.cx.f32_type().vec_type(self.lanes)
    }

    fn ity(&self) -> VectorType<'ctx> {
        self.cx.i32_type().vec_type(self.lanes)
    }

    fn f(&self, c: f32) -> V<'ctx> {
        let s = self.cx.f32_type().const_float(c as f64);
        VectorType::const_vector(&vec![s; self.lanes as usize])
    }

    fn i(&self, c: i32) -> V<'ctx> {
        let s = self.cx.i32_type().const_int(c as i64 as u64, true);
        VectorType::const_vector(&vec![s; self.lanes as usize])
    }

    fn bits_of(&self, v: V<'ctx>) -> R<V<'ctx>> {
        Ok(self
            .b
            .build_bit_cast(v, self.ity(), "")
            .map_err(e)?
            .into_vector_value())
    }

    fn float_of_bits(&self, v: V<'ctx>) -> R<V<'ctx>> {
        Ok(self
            .b
            .build_bit_cast(v, self.fty(), "")
            .map_err(e)?
            .into_vector_value())
    }

    fn add(&self, x: V<'ctx>, y: V<'ctx>) -> R<V<'ctx>> {
        self.b.build_float_add(x, y, "").map_err(e)
    }

    fn sub(&self, x: V<'ctx>, y: V<'ctx>) -> R<V<'ctx>> {
        self.b.build_float_sub(x, y, "").map_err(e)
    }

    fn mul(&self, x: V<'ctx>, y: V<'ctx>) -> R<V<'ctx>> {
        self.b.build_float_mul(x, y, "").map_err(e)
    }

    fn div(&self, x: V<'ctx>, y: V<'ctx>) -> R<V<'ctx>> {
        self.b.build_float_div(x, y, "").map_err(e)
    }

    fn intrinsic(&self, name: &str, args: &[V<'ctx>]) -> R<V<'ctx>> {
        call_intrinsic(self.module, self.b, name, args)
    }

    /// `cond(x, y) ? t : f` for floats.
    fn sel(
        &self,
        cc: FloatPredicate,
        x: V<'ctx>,
        y: V<'ctx>,
        t: V<'ctx>,
        f: V<'ctx>,
    ) -> R<V<'ctx>> {
        let m = self.b.build_float_compare(cc, x, y, "").map_err(e)?;
        Ok(self
            .b
            .build_select(m, t, f, "")
            .map_err(e)?
            .into_vector_value())
    }

    /// Horner evaluation of `coeffs[0] * x^k + ... + coeffs[k]` (separate mul and add, as
    /// the JIT rounds them).
    fn poly(&self, x: V<'ctx>, coeffs: &[f32]) -> R<V<'ctx>> {
        let mut acc = self.f(coeffs[0]);
        for &c in &coeffs[1..] {
            acc = self.add(self.mul(acc, x)?, self.f(c))?;
        }
        Ok(acc)
    }

    /// `2^n` for an integer vector `n` in `[-126, 127]`: the biased exponent shifted into
    /// place (ldexp by bit construction).
    fn pow2i(&self, n: V<'ctx>) -> R<V<'ctx>> {
        let b = self.b;
        let ex = b.build_int_add(n, self.i(127), "").map_err(e)?;
        let bits = b.build_left_shift(ex, self.i(23), "").map_err(e)?;
        self.float_of_bits(bits)
    }

    /// `e^x`: `x = n ln2 + r`, |r| <= ln2/2, `e^r` by Cephes' degree-7 polynomial, then
    /// scaled by `2^n` in two halves so that results in the subnormal range round once.
    fn exp(&self, x: V<'ctx>) -> R<V<'ctx>> {
        let b = self.b;
        // minimum/maximum propagate NaN, so a NaN input stays NaN through the polynomial.
        let x = self.intrinsic("llvm.minimum", &[x, self.f(EXP_HI)])?;
        let x = self.intrinsic("llvm.maximum", &[x, self.f(EXP_LO)])?;
        let t = self.mul(x, self.f(std::f32::consts::LOG2_E))?;
        let magic = self.f(ROUND_MAGIC);
        let k = self.add(t, magic)?;
        let nf = self.sub(k, magic)?;
        let n = b
            .build_int_sub(self.bits_of(k)?, self.i(ROUND_MAGIC_BITS), "")
            .map_err(e)?;
        let r = self.sub(x, self.mul(nf, self.f(LN2_HI))?)?;
        let r = self.sub(r, self.mul(nf, self.f(LN2_LO))?)?;
        let z = self.mul(r, r)?;
        let p = self.poly(r, &EXP_POLY)?;
        let p = self.mul(p, z)?;
        let p = self.add(p, r)?;
        let p = self.add(p, self.f(1.0))?;
        let n1 = b.build_right_shift(n, self.i(1), true, "").map_err(e)?;
        let n2 = b.build_int_sub(n, n1, "").map_err(e)?;
        let y = self.mul(p, self.pow2i(n1)?)?;
        self.mul(y, self.pow2i(n2)?)
    }

    /// `ln x`: `x = m 2^e` with `m` in `[sqrt(1/2), sqrt(2))`, `ln(m)` by Cephes' polynomial;
    /// subnormals are scaled up first; 0 → -inf, +inf → +inf, negative or NaN → NaN.
    fn log(&self, x0: V<'ctx>) -> R<V<'ctx>> {
        use FloatPredicate::{OEQ, OGE, OLT};
        let b = self.b;
        let minn = self.f(MIN_NORMAL);
        let xs = self.mul(x0, self.f(8_388_608.0))?;
        let x = self.sel(OLT, x0, minn, xs, x0)?;
        let zero = self.f(0.0);
        let eadj = self.sel(OLT, x0, minn, self.f(23.0), zero)?;
        let bits = self.bits_of(x)?;
        let eb = b
            .build_right_shift(bits, self.i(23), false, "")
            .map_err(e)?;
        let ei = b.build_int_sub(eb, self.i(126), "").map_err(e)?;
        let ef = b.build_signed_int_to_float(ei, self.fty(), "").map_err(e)?;
        let ex = self.sub(ef, eadj)?;
        let mb = b.build_and(bits, self.i(0x007F_FFFF), "").map_err(e)?;
        let mb = b.build_or(mb, self.i(0x3F00_0000), "").map_err(e)?;
        let m = self.float_of_bits(mb)?;
        let sqrthf = self.f(std::f32::consts::FRAC_1_SQRT_2);
        let one = self.f(1.0);
        let e1 = self.sub(ex, one)?;
        let ex = self.sel(OLT, m, sqrthf, e1, ex)?;
        let m2 = self.add(m, m)?;
        let m = self.sel(OLT, m, sqrthf, m2, m)?;
        let m = self.sub(m, one)?;
        let z = self.mul(m, m)?;
        let p = self.poly(m, &LOG_POLY)?;
        let p = self.mul(p, m)?;
        let y = self.mul(p, z)?;
        let y = self.add(y, self.mul(ex, self.f(LN2_LO))?)?;
        let y = self.add(y, self.mul(z, self.f(-0.5))?)?;
        let r = self.add(m, y)?;
        let r = self.add(r, self.mul(ex, self.f(LN2_HI))?)?;
        let inf = self.f(f32::INFINITY);
        let r = self.sel(OEQ, x0, inf, inf, r)?;
        let r = self.sel(OEQ, x0, zero, self.f(f32::NEG_INFINITY), r)?;
        // `x >= 0` (ordered) is false for negatives and NaN.
        self.sel(OGE, x0, zero, r, self.f(f32::NAN))
    }

    /// `tanh x`: Cephes' odd polynomial for |x| < 0.625, else `±(1 - 2 / (e^{2|x|} + 1))`.
    fn tanh(&self, x: V<'ctx>) -> R<V<'ctx>> {
        let z = self.mul(x, x)?;
        let p = self.poly(z, &TANH_POLY)?;
        let p = self.mul(p, z)?;
        let p = self.mul(p, x)?;
        let small = self.add(p, x)?;
        let a = self.intrinsic("llvm.fabs", &[x])?;
        let a2 = self.add(a, a)?;
        let ex = self.exp(a2)?;
        let one = self.f(1.0);
        let d = self.add(ex, one)?;
        let q = self.div(self.f(2.0), d)?;
        let big = self.sub(one, q)?;
        let nbig = self.b.build_float_neg(big, "").map_err(e)?;
        let big = self.sel(FloatPredicate::OLT, x, self.f(0.0), nbig, big)?;
        self.sel(FloatPredicate::OLT, a, self.f(TANH_SMALL), small, big)
    }

    /// `1 / (1 + e^-x)` as `r = 1 / (1 + e^-|x|)`, then `r` for x >= 0 and `e^-|x| r`
    /// below, so large negative inputs keep their tiny values instead of flushing to 0.
    fn sigmoid(&self, x: V<'ctx>) -> R<V<'ctx>> {
        let a = self.intrinsic("llvm.fabs", &[x])?;
        let na = self.b.build_float_neg(a, "").map_err(e)?;
        let ex = self.exp(na)?;
        let one = self.f(1.0);
        let d = self.add(one, ex)?;
        let r = self.div(one, d)?;
        let er = self.mul(ex, r)?;
        self.sel(FloatPredicate::OGE, x, self.f(0.0), r, er)
    }

    /// erf: Eigen's `x P(x^2) / Q(x^2)` on x clamped to [-4, 4] (erf(4) rounds to 1).
    fn erf(&self, x: V<'ctx>) -> R<V<'ctx>> {
        let x = self.intrinsic("llvm.minimum", &[x, self.f(4.0)])?;
        let x = self.intrinsic("llvm.maximum", &[x, self.f(-4.0)])?;
        let z = self.mul(x, x)?;
        let p = self.poly(z, &ERF_P)?;
        let q = self.poly(z, &ERF_Q)?;
        // x (P/Q) rather than (x P)/Q: x P underflows for tiny x.
        let r = self.div(p, q)?;
        self.mul(x, r)
    }
}
