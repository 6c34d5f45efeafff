//! NVPTX building blocks shared by the PTX kernels: special registers, barriers, warp
//! shuffles, scalar intrinsics and a loop emitter carrying scalar values in phis.

use crate::vmath::e;
use inkwell::builder::Builder;
use inkwell::context::Context;
use inkwell::intrinsics::Intrinsic;
use inkwell::module::Module;
use inkwell::types::BasicTypeEnum;
use inkwell::values::{
    BasicMetadataValueEnum, BasicValueEnum, FloatValue, FunctionValue, IntValue,
};
use inkwell::{AddressSpace, IntPredicate};

pub(crate) type R<T> = Result<T, String>;

/// LLVM's `ptx_kernel` calling convention: the function becomes a PTX `.entry`.
pub(crate) const PTX_KERNEL_CC: u32 = 71;
/// Global memory.
pub(crate) fn global() -> AddressSpace {
    AddressSpace::from(1u16)
}
/// Shared (per thread block) memory.
pub(crate) fn shared() -> AddressSpace {
    AddressSpace::from(3u16)
}

/// Code-emission state for one kernel function.
pub(crate) struct Nv<'a, 'ctx> {
    pub cx: &'ctx Context,
    pub module: &'a Module<'ctx>,
    pub b: &'a Builder<'ctx>,
    pub func: FunctionValue<'ctx>,
}

impl<'ctx> Nv<'_, 'ctx> {
    /// Calls intrinsic `name`, overloaded on `overload` types (empty when not overloaded).
    pub fn call(
        &self,
        name: &str,
        overload: &[BasicTypeEnum<'ctx>],
        args: &[BasicValueEnum<'ctx>],
    ) -> R<Option<BasicValueEnum<'ctx>>> {
        let i = Intrinsic::find(name).ok_or_else(|| format!("no intrinsic {name}"))?;
        let f = i
            .get_declaration(self.module, overload)
            .ok_or_else(|| format!("cannot declare {name}"))?;
        let a: Vec<BasicMetadataValueEnum> = args.iter().map(|&x| x.into()).collect();
        Ok(self
            .b
            .build_call(f, &a, "")
            .map_err(e)?
            .try_as_basic_value()
            .basic())
    }

    /// A special register (`tid.x`, `ntid.y`, `ctaid.z`, ...) as i32.
    pub fn sreg(&self, name: &str) -> R<IntValue<'ctx>> {
        self.call(&format!("llvm.nvvm.read.ptx.sreg.{name}"), &[], &[])?
            .map(|v| v.into_int_value())
            .ok_or_else(|| format!("sreg {name} returned nothing"))
    }

    /// A special register zero-extended to i64.
    pub fn sreg64(&self, name: &str) -> R<IntValue<'ctx>> {
        let v = self.sreg(name)?;
        self.b
            .build_int_z_extend(v, self.cx.i64_type(), "")
            .map_err(e)
    }

    /// `bar.sync 0`.
    pub fn barrier(&self) -> R<()> {
        self.call("llvm.nvvm.barrier0", &[], &[])?;
        Ok(())
    }

    /// `shfl.sync.bfly.b32` of a float over the full warp.
    pub fn shfl_xor(&self, v: FloatValue<'ctx>, lane_mask: u32) -> R<FloatValue<'ctx>> {
        let i32t = self.cx.i32_type();
        self.call(
            "llvm.nvvm.shfl.sync.bfly.f32",
            &[],
            &[
                i32t.const_all_ones().into(),
                v.into(),
                i32t.const_int(lane_mask as u64, false).into(),
                i32t.const_int(31, false).into(),
            ],
        )?
        .map(|v| v.into_float_value())
        .ok_or_else(|| "shfl returned nothing".into())
    }

    /// A float intrinsic overloaded on f32 (`llvm.maximum`, `llvm.fabs`, `llvm.sqrt`, ...).
    pub fn fcall(&self, name: &str, args: &[FloatValue<'ctx>]) -> R<FloatValue<'ctx>> {
        let f32t = self.cx.f32_type();
        let a: Vec<BasicValueEnum> = args.iter().map(|&x| x.into()).collect();
        self.call(name, &[f32t.into()], &a)?
            .map(|v| v.into_float_value())
            .ok_or_else(|| format!("{name} returned nothing"))
    }

    pub fn i64c(&self, v: u64) -> IntValue<'ctx> {
        self.cx.i64_type().const_int(v, false)
    }

    pub fn f32c(&self, v: f32) -> FloatValue<'ctx> {
        self.cx.f32_type().const_float(v as f64)
    }

    /// `if cond { then() }`, leaving the builder after the join.
    pub fn when(&self, cond: IntValue<'ctx>, then: impl FnOnce() -> R<()>) -> R<()> {
        let t = self.cx.append_basic_block(self.func, "then");
        let j = self.cx.append_basic_block(self.func, "join");
        self.b.build_conditional_branch(cond, t, j).map_err(e)?;
        self.b.position_at_end(t);
        then()?;
        self.b.build_unconditional_branch(j).map_err(e)?;
        self.b.position_at_end(j);
        Ok(())
    }

    /// `for (j = lo; j < hi; j += step)` (signed i64 or i32, by `lo`'s type) carrying
    /// float values `init`; returns their final values, leaving the builder after the loop.
    pub fn for_loop(
        &self,
        lo: IntValue<'ctx>,
        hi: IntValue<'ctx>,
        step: IntValue<'ctx>,
        init: &[FloatValue<'ctx>],
        mut body: impl FnMut(IntValue<'ctx>, &[FloatValue<'ctx>]) -> R<Vec<FloatValue<'ctx>>>,
    ) -> R<Vec<FloatValue<'ctx>>> {
        let b = self.b;
        let pre = b.get_insert_block().ok_or("builder not positioned")?;
        let header = self.cx.append_basic_block(self.func, "header");
        let body_blk = self.cx.append_basic_block(self.func, "body");
        let exit = self.cx.append_basic_block(self.func, "exit");
        b.build_unconditional_branch(header).map_err(e)?;
        b.position_at_end(header);
        let jphi = b.build_phi(lo.get_type(), "j").map_err(e)?;
        jphi.add_incoming(&[(&lo, pre)]);
        let mut phis = vec![];
        for v in init {
            let p = b.build_phi(v.get_type(), "acc").map_err(e)?;
            p.add_incoming(&[(v, pre)]);
            phis.push(p);
        }
        let j = jphi.as_basic_value().into_int_value();
        let accs: Vec<FloatValue> = phis
            .iter()
            .map(|p| p.as_basic_value().into_float_value())
            .collect();
        let more = b
            .build_int_compare(IntPredicate::SLT, j, hi, "")
            .map_err(e)?;
        b.build_conditional_branch(more, body_blk, exit)
            .map_err(e)?;
        b.position_at_end(body_blk);
        let next = body(j, &accs)?;
        let j2 = b.build_int_add(j, step, "").map_err(e)?;
        let end = b.get_insert_block().ok_or("builder not positioned")?;
        jphi.add_incoming(&[(&j2, end)]);
        for (p, v) in phis.iter().zip(&next) {
            p.add_incoming(&[(v, end)]);
        }
        b.build_unconditional_branch(header).map_err(e)?;
        b.position_at_end(exit);
        Ok(accs)
    }
}
