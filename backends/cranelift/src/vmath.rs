//! The JIT's [`Emit`]ter for `kiln_plan::vmath`: the shared transcendental recipes (exp, log,
//! tanh, sigmoid, erf) emitted inline as Cranelift instructions on `F32` (the scalar tail) or
//! `F32X4` (the vector body), one instruction per operation, so a lane, the tail and every
//! other path of kiln (the runtime's kernels, the AOT backend) give bit-identical results for
//! the same input (checked against the scalar recipe by `tests/vmath.rs`). `fma` is
//! Cranelift's fused `fma` (one instruction where the host has FMA, a libm call otherwise).

use cranelift_codegen::ir::condcodes::FloatCC;
use cranelift_codegen::ir::{types, Endianness, InstBuilder, MemFlagsData, Type, Value};
use cranelift_frontend::FunctionBuilder;
use kiln_plan::vmath::{self, Cmp, Emit};
use kiln_plan::UnOp;
use std::convert::Infallible;

/// Emits op `op` applied to `x` (of type `ty`, `F32` or `F32X4`). Only transcendentals.
pub fn unary(b: &mut FunctionBuilder, op: UnOp, x: Value, ty: Type) -> Value {
    let mut m = Math { b, ty };
    match vmath::unary(&mut m, op, x) {
        Ok(Some(y)) => y,
        // Not transcendental: callers emit these inline.
        Ok(None) => unreachable!("vmath::unary called with {op:?}"),
    }
}

/// A function builder emitting lanes of type `ty`.
struct Math<'a, 'b> {
    b: &'a mut FunctionBuilder<'b>,
    ty: Type,
}

type R = Result<Value, Infallible>;

impl Math<'_, '_> {
    fn ity(&self) -> Type {
        if self.ty.is_vector() {
            types::I32X4
        } else {
            types::I32
        }
    }

    fn cast(&mut self, to: Type, v: Value) -> Value {
        self.b.ins().bitcast(
            to,
            MemFlagsData::new().with_endianness(Endianness::Little),
            v,
        )
    }

    fn splat_if_vector(&mut self, s: Value, vty: Type) -> Value {
        if self.ty.is_vector() {
            self.b.ins().splat(vty, s)
        } else {
            s
        }
    }
}

impl Emit for Math<'_, '_> {
    type F = Value;
    type I = Value;
    type Err = Infallible;
    fn f(&mut self, c: f32) -> R {
        let s = self.b.ins().f32const(c);
        Ok(self.splat_if_vector(s, self.ty))
    }
    fn i(&mut self, c: i32) -> R {
        let s = self.b.ins().iconst(types::I32, c as i64);
        let ity = self.ity();
        Ok(self.splat_if_vector(s, ity))
    }
    fn add(&mut self, a: Value, b: Value) -> R {
        Ok(self.b.ins().fadd(a, b))
    }
    fn sub(&mut self, a: Value, b: Value) -> R {
        Ok(self.b.ins().fsub(a, b))
    }
    fn mul(&mut self, a: Value, b: Value) -> R {
        Ok(self.b.ins().fmul(a, b))
    }
    fn div(&mut self, a: Value, b: Value) -> R {
        Ok(self.b.ins().fdiv(a, b))
    }
    fn fma(&mut self, a: Value, b: Value, c: Value) -> R {
        Ok(self.b.ins().fma(a, b, c))
    }
    fn neg(&mut self, a: Value) -> R {
        Ok(self.b.ins().fneg(a))
    }
    fn abs(&mut self, a: Value) -> R {
        Ok(self.b.ins().fabs(a))
    }
    // `c < x ? c : x` and `x < c ? c : x`: a NaN `x` fails the compare and stays. Written as
    // a select on `fcmp lt` so that x64 lowers each to one `minps`/`maxps` (`minss`/`maxss`);
    // `fmin`/`fmax` order ±0 and NaN per IEEE 754-2019 and cost about seven instructions.
    fn min(&mut self, x: Value, c: Value) -> R {
        self.select(Cmp::Lt, c, x, c, x)
    }
    fn max(&mut self, x: Value, c: Value) -> R {
        self.select(Cmp::Lt, x, c, c, x)
    }
    fn select(&mut self, cmp: Cmp, a: Value, b: Value, t: Value, f: Value) -> R {
        let cc = match cmp {
            Cmp::Lt => FloatCC::LessThan,
            Cmp::Ge => FloatCC::GreaterThanOrEqual,
            Cmp::Eq => FloatCC::Equal,
        };
        let m = self.b.ins().fcmp(cc, a, b);
        Ok(if self.ty.is_vector() {
            let m = self.cast(self.ty, m);
            self.b.ins().bitselect(m, t, f)
        } else {
            self.b.ins().select(m, t, f)
        })
    }
    fn bits(&mut self, a: Value) -> R {
        let ity = self.ity();
        Ok(self.cast(ity, a))
    }
    fn float_of_bits(&mut self, a: Value) -> R {
        Ok(self.cast(self.ty, a))
    }
    fn to_float(&mut self, a: Value) -> R {
        Ok(self.b.ins().fcvt_from_sint(self.ty, a))
    }
    fn iadd(&mut self, a: Value, b: Value) -> R {
        Ok(self.b.ins().iadd(a, b))
    }
    fn isub(&mut self, a: Value, b: Value) -> R {
        Ok(self.b.ins().isub(a, b))
    }
    fn and(&mut self, a: Value, b: Value) -> R {
        Ok(self.b.ins().band(a, b))
    }
    fn or(&mut self, a: Value, b: Value) -> R {
        Ok(self.b.ins().bor(a, b))
    }
    fn shl<const N: i32>(&mut self, a: Value) -> R {
        let n = self.b.ins().iconst(types::I32, N as i64);
        Ok(self.b.ins().ishl(a, n))
    }
    fn sra<const N: i32>(&mut self, a: Value) -> R {
        let n = self.b.ins().iconst(types::I32, N as i64);
        Ok(self.b.ins().sshr(a, n))
    }
    fn srl<const N: i32>(&mut self, a: Value) -> R {
        let n = self.b.ins().iconst(types::I32, N as i64);
        Ok(self.b.ins().ushr(a, n))
    }
}
