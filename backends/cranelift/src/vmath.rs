//! Inline transcendentals for the JIT: exp, log, tanh, sigmoid and erf as branch-free f32
//! code, emitted for `F32` (the scalar tail) or `F32X4` (the vector body) from the same
//! instruction sequence, so a lane and the tail give bit-identical results for the same
//! input. Range reductions and polynomials follow Cephes (`expf`, `logf`, `tanhf`); erf is
//! Eigen's clamped rational approximation. Accuracy against the f64 definition
//! ([`UnOp::apply`]) is measured by `tests/vmath.rs`.

use cranelift_codegen::ir::condcodes::FloatCC;
use cranelift_codegen::ir::{types, Endianness, InstBuilder, MemFlagsData, Type, Value};
use cranelift_frontend::FunctionBuilder;
use kiln_plan::UnOp;

use kiln_runtime::executor::vmath::*;

/// Emits op `op` applied to `x` (of type `ty`, `F32` or `F32X4`). Only transcendentals.
pub fn unary(b: &mut FunctionBuilder, op: UnOp, x: Value, ty: Type) -> Value {
    let m = Math { ty };
    match op {
        UnOp::Exp => m.exp(b, x),
        UnOp::Log => m.log(b, x),
        UnOp::Tanh => m.tanh(b, x),
        UnOp::Sigmoid => m.sigmoid(b, x),
        UnOp::Erf => m.erf(b, x),
        // Not transcendental: callers emit these inline; keep the meaning anyway.
        _ => unreachable!("vmath::unary called with {op:?}"),
    }
}

struct Math {
    ty: Type,
}

impl Math {
    fn ity(&self) -> Type {
        if self.ty.is_vector() {
            types::I32X4
        } else {
            types::I32
        }
    }

    fn f(&self, b: &mut FunctionBuilder, c: f32) -> Value {
        let s = b.ins().f32const(c);
        if self.ty.is_vector() {
            b.ins().splat(self.ty, s)
        } else {
            s
        }
    }

    fn i(&self, b: &mut FunctionBuilder, c: i32) -> Value {
        let s = b.ins().iconst(types::I32, c as i64);
        if self.ty.is_vector() {
            b.ins().splat(types::I32X4, s)
        } else {
            s
        }
    }

    fn cast(&self, b: &mut FunctionBuilder, to: Type, v: Value) -> Value {
        b.ins().bitcast(
            to,
            MemFlagsData::new().with_endianness(Endianness::Little),
            v,
        )
    }

    fn bits_of(&self, b: &mut FunctionBuilder, v: Value) -> Value {
        self.cast(b, self.ity(), v)
    }

    fn float_of_bits(&self, b: &mut FunctionBuilder, v: Value) -> Value {
        self.cast(b, self.ty, v)
    }

    /// `cond(x, y) ? t : e` for floats.
    fn sel(
        &self,
        b: &mut FunctionBuilder,
        cc: FloatCC,
        x: Value,
        y: Value,
        t: Value,
        e: Value,
    ) -> Value {
        let m = b.ins().fcmp(cc, x, y);
        if self.ty.is_vector() {
            let m = self.cast(b, self.ty, m);
            b.ins().bitselect(m, t, e)
        } else {
            b.ins().select(m, t, e)
        }
    }

    /// Horner evaluation of `coeffs[0] * x^k + ... + coeffs[k]`.
    fn poly(&self, b: &mut FunctionBuilder, x: Value, coeffs: &[f32]) -> Value {
        let mut acc = self.f(b, coeffs[0]);
        for &c in &coeffs[1..] {
            let t = b.ins().fmul(acc, x);
            let c = self.f(b, c);
            acc = b.ins().fadd(t, c);
        }
        acc
    }

    /// `2^n` for an integer vector `n` in `[-126, 127]`.
    fn pow2i(&self, b: &mut FunctionBuilder, n: Value) -> Value {
        let bias = self.i(b, 127);
        let e = b.ins().iadd(n, bias);
        let sh = b.ins().iconst(types::I32, 23);
        let bits = b.ins().ishl(e, sh);
        self.float_of_bits(b, bits)
    }

    /// `e^x`: `x = n ln2 + r`, |r| <= ln2/2, `e^r` by Cephes' degree-7 polynomial, then
    /// scaled by `2^n` in two halves so that results in the subnormal range round once.
    fn exp(&self, b: &mut FunctionBuilder, x: Value) -> Value {
        let hi = self.f(b, EXP_HI);
        let lo = self.f(b, EXP_LO);
        // fmin/fmax propagate NaN, so a NaN input stays NaN through the polynomial.
        let x = b.ins().fmin(x, hi);
        let x = b.ins().fmax(x, lo);
        let log2e = self.f(b, std::f32::consts::LOG2_E);
        let t = b.ins().fmul(x, log2e);
        let magic = self.f(b, ROUND_MAGIC);
        let k = b.ins().fadd(t, magic);
        let nf = b.ins().fsub(k, magic);
        let kb = self.bits_of(b, k);
        let mb = self.i(b, ROUND_MAGIC_BITS);
        let n = b.ins().isub(kb, mb);
        let c1 = self.f(b, LN2_HI);
        let c2 = self.f(b, LN2_LO);
        let a = b.ins().fmul(nf, c1);
        let r = b.ins().fsub(x, a);
        let a = b.ins().fmul(nf, c2);
        let r = b.ins().fsub(r, a);
        let z = b.ins().fmul(r, r);
        let p = self.poly(b, r, &EXP_POLY);
        let p = b.ins().fmul(p, z);
        let p = b.ins().fadd(p, r);
        let one = self.f(b, 1.0);
        let p = b.ins().fadd(p, one);
        let one_i = b.ins().iconst(types::I32, 1);
        let n1 = b.ins().sshr(n, one_i);
        let n2 = b.ins().isub(n, n1);
        let s1 = self.pow2i(b, n1);
        let s2 = self.pow2i(b, n2);
        let y = b.ins().fmul(p, s1);
        b.ins().fmul(y, s2)
    }

    /// `ln x`: `x = m 2^e` with `m` in `[sqrt(1/2), sqrt(2))`, `ln(m)` by Cephes' polynomial;
    /// subnormals are scaled up first; 0 → -inf, +inf → +inf, negative or NaN → NaN.
    fn log(&self, b: &mut FunctionBuilder, x0: Value) -> Value {
        let minn = self.f(b, MIN_NORMAL);
        let scale = self.f(b, 8_388_608.0);
        let xs = b.ins().fmul(x0, scale);
        let x = self.sel(b, FloatCC::LessThan, x0, minn, xs, x0);
        let k23 = self.f(b, 23.0);
        let zero = self.f(b, 0.0);
        let eadj = self.sel(b, FloatCC::LessThan, x0, minn, k23, zero);
        let bits = self.bits_of(b, x);
        let sh = b.ins().iconst(types::I32, 23);
        let eb = b.ins().ushr(bits, sh);
        let c126 = self.i(b, 126);
        let ei = b.ins().isub(eb, c126);
        let e = b.ins().fcvt_from_sint(self.ty, ei);
        let e = b.ins().fsub(e, eadj);
        let mant = self.i(b, 0x007F_FFFF);
        let half = self.i(b, 0x3F00_0000);
        let mb = b.ins().band(bits, mant);
        let mb = b.ins().bor(mb, half);
        let m = self.float_of_bits(b, mb);
        let sqrthf = self.f(b, std::f32::consts::FRAC_1_SQRT_2);
        let one = self.f(b, 1.0);
        let e1 = b.ins().fsub(e, one);
        let e = self.sel(b, FloatCC::LessThan, m, sqrthf, e1, e);
        let m2 = b.ins().fadd(m, m);
        let m = self.sel(b, FloatCC::LessThan, m, sqrthf, m2, m);
        let m = b.ins().fsub(m, one);
        let z = b.ins().fmul(m, m);
        let p = self.poly(b, m, &LOG_POLY);
        let p = b.ins().fmul(p, m);
        let y = b.ins().fmul(p, z);
        let c2 = self.f(b, LN2_LO);
        let t = b.ins().fmul(e, c2);
        let y = b.ins().fadd(y, t);
        let mhalf = self.f(b, -0.5);
        let t = b.ins().fmul(z, mhalf);
        let y = b.ins().fadd(y, t);
        let r = b.ins().fadd(m, y);
        let c1 = self.f(b, LN2_HI);
        let t = b.ins().fmul(e, c1);
        let r = b.ins().fadd(r, t);
        let inf = self.f(b, f32::INFINITY);
        let ninf = self.f(b, f32::NEG_INFINITY);
        let nan = self.f(b, f32::NAN);
        let r = self.sel(b, FloatCC::Equal, x0, inf, inf, r);
        let r = self.sel(b, FloatCC::Equal, x0, zero, ninf, r);
        // `x >= 0` is false for negatives and NaN.
        self.sel(b, FloatCC::GreaterThanOrEqual, x0, zero, r, nan)
    }

    /// `tanh x`: Cephes' odd polynomial for |x| < 0.625, else `±(1 - 2 / (e^{2|x|} + 1))`.
    fn tanh(&self, b: &mut FunctionBuilder, x: Value) -> Value {
        let z = b.ins().fmul(x, x);
        let p = self.poly(b, z, &TANH_POLY);
        let p = b.ins().fmul(p, z);
        let p = b.ins().fmul(p, x);
        let small = b.ins().fadd(p, x);
        let a = b.ins().fabs(x);
        let a2 = b.ins().fadd(a, a);
        let e = self.exp(b, a2);
        let one = self.f(b, 1.0);
        let two = self.f(b, 2.0);
        let d = b.ins().fadd(e, one);
        let q = b.ins().fdiv(two, d);
        let big = b.ins().fsub(one, q);
        let nbig = b.ins().fneg(big);
        let zero = self.f(b, 0.0);
        let big = self.sel(b, FloatCC::LessThan, x, zero, nbig, big);
        let lim = self.f(b, TANH_SMALL);
        self.sel(b, FloatCC::LessThan, a, lim, small, big)
    }

    /// `1 / (1 + e^-x)` as `r = 1 / (1 + e^-|x|)`, then `r` for x >= 0 and `e^-|x| r`
    /// below, so large negative inputs keep their tiny values instead of flushing to 0.
    fn sigmoid(&self, b: &mut FunctionBuilder, x: Value) -> Value {
        let a = b.ins().fabs(x);
        let na = b.ins().fneg(a);
        let e = self.exp(b, na);
        let one = self.f(b, 1.0);
        let d = b.ins().fadd(one, e);
        let r = b.ins().fdiv(one, d);
        let er = b.ins().fmul(e, r);
        let zero = self.f(b, 0.0);
        self.sel(b, FloatCC::GreaterThanOrEqual, x, zero, r, er)
    }

    /// erf: Eigen's `x P(x^2) / Q(x^2)` on x clamped to [-4, 4] (erf(4) rounds to 1).
    fn erf(&self, b: &mut FunctionBuilder, x: Value) -> Value {
        let hi = self.f(b, 4.0);
        let lo = self.f(b, -4.0);
        let x = b.ins().fmin(x, hi);
        let x = b.ins().fmax(x, lo);
        let z = b.ins().fmul(x, x);
        let p = self.poly(b, z, &ERF_P);
        let q = self.poly(b, z, &ERF_Q);
        // x (P/Q) rather than (x P)/Q: x P underflows for tiny x.
        let r = b.ins().fdiv(p, q);
        b.ins().fmul(x, r)
    }
}
