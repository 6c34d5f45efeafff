//! The AOT backend's [`Emit`]ter for `kiln_plan::vmath`: the shared transcendental recipes
//! (exp, log, tanh, sigmoid, erf) as branch-free LLVM IR on `<N x float>` (the 8-lane body,
//! the 1-lane tail, NVPTX's `<1 x float>`), one instruction per operation. No instruction
//! carries a fast-math flag, not even `contract`: LLVM then may not fuse a multiply-add the
//! recipe keeps separate, and `fma` is `llvm.fma` (one rounding), so every path of kiln gives
//! the same bits (checked against the scalar recipe by `tests/vmath.rs`, which also bounds the
//! error against f64).

use inkwell::builder::Builder;
use inkwell::context::Context;
use inkwell::intrinsics::Intrinsic;
use inkwell::module::Module;
use inkwell::types::VectorType;
use inkwell::values::{BasicMetadataValueEnum, VectorValue};
use inkwell::FloatPredicate;
use kiln_plan::UnOp;

use kiln_plan::vmath::{self, Cmp, Emit};

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
    op.is_transcendental()
}

/// Emits `op(x)` for `x: <lanes x float>` at the builder's position. Only transcendentals.
pub fn unary<'ctx>(
    cx: &'ctx Context,
    module: &Module<'ctx>,
    b: &Builder<'ctx>,
    op: UnOp,
    x: V<'ctx>,
) -> R<V<'ctx>> {
    let mut m = Math {
        cx,
        module,
        b,
        lanes: x.get_type().get_size(),
    };
    vmath::unary(&mut m, op, x)?.ok_or_else(|| format!("vmath has no lowering of {op:?}"))
}

/// Emits the vector-math function `f(x)` (an activation of a fused epilogue, or a
/// transcendental) for `x: <lanes x float>` at the builder's position.
pub fn func<'ctx>(
    cx: &'ctx Context,
    module: &Module<'ctx>,
    b: &Builder<'ctx>,
    f: vmath::Func,
    x: V<'ctx>,
) -> R<V<'ctx>> {
    let mut m = Math {
        cx,
        module,
        b,
        lanes: x.get_type().get_size(),
    };
    f.emit(&mut m, x)
}

/// A builder emitting `<lanes x float>` / `<lanes x i32>`.
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

    fn cast(&self, v: V<'ctx>, to: VectorType<'ctx>) -> R<V<'ctx>> {
        Ok(self
            .b
            .build_bit_cast(v, to, "")
            .map_err(e)?
            .into_vector_value())
    }

    fn intrinsic(&self, name: &str, args: &[V<'ctx>]) -> R<V<'ctx>> {
        call_intrinsic(self.module, self.b, name, args)
    }

    fn int_splat(&self, c: i32) -> V<'ctx> {
        let s = self.cx.i32_type().const_int(c as i64 as u64, true);
        VectorType::const_vector(&vec![s; self.lanes as usize])
    }
}

impl<'ctx> Emit for Math<'_, 'ctx> {
    type F = V<'ctx>;
    type I = V<'ctx>;
    type Err = String;
    fn f(&mut self, c: f32) -> R<V<'ctx>> {
        let s = self.cx.f32_type().const_float(c as f64);
        Ok(VectorType::const_vector(&vec![s; self.lanes as usize]))
    }
    fn i(&mut self, c: i32) -> R<V<'ctx>> {
        Ok(self.int_splat(c))
    }
    fn add(&mut self, a: V<'ctx>, b: V<'ctx>) -> R<V<'ctx>> {
        self.b.build_float_add(a, b, "").map_err(e)
    }
    fn sub(&mut self, a: V<'ctx>, b: V<'ctx>) -> R<V<'ctx>> {
        self.b.build_float_sub(a, b, "").map_err(e)
    }
    fn mul(&mut self, a: V<'ctx>, b: V<'ctx>) -> R<V<'ctx>> {
        self.b.build_float_mul(a, b, "").map_err(e)
    }
    fn div(&mut self, a: V<'ctx>, b: V<'ctx>) -> R<V<'ctx>> {
        self.b.build_float_div(a, b, "").map_err(e)
    }
    fn fma(&mut self, a: V<'ctx>, b: V<'ctx>, c: V<'ctx>) -> R<V<'ctx>> {
        self.intrinsic("llvm.fma", &[a, b, c])
    }
    fn neg(&mut self, a: V<'ctx>) -> R<V<'ctx>> {
        self.b.build_float_neg(a, "").map_err(e)
    }
    fn abs(&mut self, a: V<'ctx>) -> R<V<'ctx>> {
        self.intrinsic("llvm.fabs", &[a])
    }
    // minimum/maximum propagate NaN.
    fn min(&mut self, x: V<'ctx>, c: V<'ctx>) -> R<V<'ctx>> {
        self.intrinsic("llvm.minimum", &[x, c])
    }
    fn max(&mut self, x: V<'ctx>, c: V<'ctx>) -> R<V<'ctx>> {
        self.intrinsic("llvm.maximum", &[x, c])
    }
    fn select(&mut self, cmp: Cmp, a: V<'ctx>, b: V<'ctx>, t: V<'ctx>, f: V<'ctx>) -> R<V<'ctx>> {
        let cc = match cmp {
            Cmp::Lt => FloatPredicate::OLT,
            Cmp::Ge => FloatPredicate::OGE,
            Cmp::Eq => FloatPredicate::OEQ,
        };
        let m = self.b.build_float_compare(cc, a, b, "").map_err(e)?;
        Ok(self
            .b
            .build_select(m, t, f, "")
            .map_err(e)?
            .into_vector_value())
    }
    fn bits(&mut self, a: V<'ctx>) -> R<V<'ctx>> {
        self.cast(a, self.ity())
    }
    fn float_of_bits(&mut self, a: V<'ctx>) -> R<V<'ctx>> {
        self.cast(a, self.fty())
    }
    fn to_float(&mut self, a: V<'ctx>) -> R<V<'ctx>> {
        self.b
            .build_signed_int_to_float(a, self.fty(), "")
            .map_err(e)
    }
    fn iadd(&mut self, a: V<'ctx>, b: V<'ctx>) -> R<V<'ctx>> {
        self.b.build_int_add(a, b, "").map_err(e)
    }
    fn isub(&mut self, a: V<'ctx>, b: V<'ctx>) -> R<V<'ctx>> {
        self.b.build_int_sub(a, b, "").map_err(e)
    }
    fn and(&mut self, a: V<'ctx>, b: V<'ctx>) -> R<V<'ctx>> {
        self.b.build_and(a, b, "").map_err(e)
    }
    fn or(&mut self, a: V<'ctx>, b: V<'ctx>) -> R<V<'ctx>> {
        self.b.build_or(a, b, "").map_err(e)
    }
    fn shl<const N: i32>(&mut self, a: V<'ctx>) -> R<V<'ctx>> {
        self.b.build_left_shift(a, self.int_splat(N), "").map_err(e)
    }
    fn sra<const N: i32>(&mut self, a: V<'ctx>) -> R<V<'ctx>> {
        self.b
            .build_right_shift(a, self.int_splat(N), true, "")
            .map_err(e)
    }
    fn srl<const N: i32>(&mut self, a: V<'ctx>) -> R<V<'ctx>> {
        self.b
            .build_right_shift(a, self.int_splat(N), false, "")
            .map_err(e)
    }
}
