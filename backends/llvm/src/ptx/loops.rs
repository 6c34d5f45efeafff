//! Loop kernels as PTX entries: one thread block row (`tid.y`) per domain row, its threads
//! striding over the row (`j = tid.x; j < n; j += ntid.x`). Each reduction is one pass
//! over the row, combined per thread in index order, then across the warp with
//! `shfl.sync.bfly` and across warps through shared memory (a fixed tree, so a row's
//! result does not depend on scheduling); the store pass follows. Transcendentals are the
//! shared branch-free polynomials of [`crate::vmath`] (on `<1 x float>`).
//!
//! Parameters (see [`super::geometry::LoopArgs`]): `n, rows, d[0..r]` (the `r` outer dims),
//! then per input its pointer and `r` element strides (0 where broadcast), then one pointer
//! per output (contiguous, `rows × n`).

use super::nv::{global, shared, Nv, PTX_KERNEL_CC, R};
use crate::vmath::{self, e};
use inkwell::context::Context;
use inkwell::module::{Linkage, Module};
use inkwell::types::BasicMetadataTypeEnum;
use inkwell::values::{FloatValue, FunctionValue, IntValue, PointerValue};
use inkwell::{FloatPredicate, IntPredicate};
use kiln_plan::{BinOp, Expr, ExprId, InnerAccess, LoopKernel, RedOp, UnOp};
use std::collections::HashMap;

/// Shared-memory floats per reduction: one partial per warp (at most 32) and the result.
pub const RED_SLOTS: u32 = 33;

struct Gen<'a, 'ctx> {
    nv: Nv<'a, 'ctx>,
    k: &'a LoopKernel,
    ins: Vec<PointerValue<'ctx>>,
    n: IntValue<'ctx>,
    red: Vec<FloatValue<'ctx>>,
}

fn contract(v: FloatValue) -> FloatValue {
    if let Some(i) = v.as_instruction() {
        let _ = i.set_fast_math_flags(inkwell::values::FastMathFlags::AllowContract);
    }
    v
}

impl<'ctx> Gen<'_, 'ctx> {
    fn expr(
        &self,
        id: ExprId,
        j: IntValue<'ctx>,
        memo: &mut HashMap<ExprId, FloatValue<'ctx>>,
    ) -> R<FloatValue<'ctx>> {
        if let Some(&v) = memo.get(&id) {
            return Ok(v);
        }
        let nv = &self.nv;
        let b = nv.b;
        let f32t = nv.cx.f32_type();
        let v = match self.k.exprs[id] {
            Expr::Load(i) => {
                let at = match self.k.inputs[i].inner {
                    // SAFETY (of the generated code): `j < n` and the row holds `n` floats.
                    InnerAccess::Contiguous => unsafe {
                        b.build_in_bounds_gep(f32t, self.ins[i], &[j], "")
                            .map_err(e)?
                    },
                    InnerAccess::Broadcast => self.ins[i],
                };
                b.build_load(f32t, at, "").map_err(e)?.into_float_value()
            }
            Expr::Const(c) => nv.f32c(c),
            Expr::RowLen => b.build_signed_int_to_float(self.n, f32t, "").map_err(e)?,
            Expr::Reduced(r) => *self
                .red
                .get(r)
                .ok_or_else(|| format!("reduction {r} read before it runs"))?,
            Expr::Bin(op, x, y) => {
                let x = self.expr(x, j, memo)?;
                let y = self.expr(y, j, memo)?;
                match op {
                    BinOp::Add => contract(b.build_float_add(x, y, "").map_err(e)?),
                    BinOp::Sub => contract(b.build_float_sub(x, y, "").map_err(e)?),
                    BinOp::Mul => contract(b.build_float_mul(x, y, "").map_err(e)?),
                    BinOp::Div => b.build_float_div(x, y, "").map_err(e)?,
                    BinOp::Max => nv.fcall("llvm.maximum", &[x, y])?,
                    BinOp::Min => nv.fcall("llvm.minimum", &[x, y])?,
                    BinOp::ClampBelow | BinOp::ClampAbove => {
                        let p = match op {
                            BinOp::ClampBelow => FloatPredicate::OLT,
                            _ => FloatPredicate::OGT,
                        };
                        let c = b.build_float_compare(p, x, y, "").map_err(e)?;
                        b.build_select(c, y, x, "").map_err(e)?.into_float_value()
                    }
                }
            }
            Expr::Un(op, x) => {
                let x = self.expr(x, j, memo)?;
                unary(&self.nv, op, x)?
            }
        };
        memo.insert(id, v);
        Ok(v)
    }
}

/// `op(x)` for one float.
pub(crate) fn unary<'ctx>(nv: &Nv<'_, 'ctx>, op: UnOp, x: FloatValue<'ctx>) -> R<FloatValue<'ctx>> {
    let b = nv.b;
    let z = nv.f32c(0.0);
    Ok(match op {
        UnOp::Neg => b.build_float_neg(x, "").map_err(e)?,
        UnOp::Abs => nv.fcall("llvm.fabs", &[x])?,
        UnOp::Sqrt => nv.fcall("llvm.sqrt", &[x])?,
        UnOp::Recip => b.build_float_div(nv.f32c(1.0), x, "").map_err(e)?,
        UnOp::Relu => {
            let gt = b
                .build_float_compare(FloatPredicate::OGT, x, z, "")
                .map_err(e)?;
            b.build_select(gt, x, z, "").map_err(e)?.into_float_value()
        }
        UnOp::FiniteOrZero => {
            let a = nv.fcall("llvm.fabs", &[x])?;
            let fin = b
                .build_float_compare(FloatPredicate::OLT, a, nv.f32c(f32::INFINITY), "")
                .map_err(e)?;
            b.build_select(fin, x, z, "").map_err(e)?.into_float_value()
        }
        _ if vmath::is_transcendental(op) => {
            on_one_lane(nv, x, |v| vmath::unary(nv.cx, nv.module, b, op, v))?
        }
        _ => return Err(format!("no PTX lowering of {op:?}")),
    })
}

/// `f` (emitting on `<1 x float>`, as the shared vector math does) applied to a scalar.
pub(crate) fn on_one_lane<'ctx>(
    nv: &Nv<'_, 'ctx>,
    x: FloatValue<'ctx>,
    f: impl FnOnce(inkwell::values::VectorValue<'ctx>) -> R<inkwell::values::VectorValue<'ctx>>,
) -> R<FloatValue<'ctx>> {
    let b = nv.b;
    let i32t = nv.cx.i32_type();
    let v1 = nv.cx.f32_type().vec_type(1).get_undef();
    let v = b
        .build_insert_element(v1, x, i32t.const_zero(), "")
        .map_err(e)?;
    let y = f(v)?;
    Ok(b.build_extract_element(y, i32t.const_zero(), "")
        .map_err(e)?
        .into_float_value())
}

pub(crate) fn combine<'ctx>(
    nv: &Nv<'_, 'ctx>,
    op: RedOp,
    acc: FloatValue<'ctx>,
    x: FloatValue<'ctx>,
) -> R<FloatValue<'ctx>> {
    let b = nv.b;
    match op {
        RedOp::Sum => Ok(b.build_float_add(acc, x, "").map_err(e)?),
        // `x > acc ? x : acc`: NaN elements are skipped, as on the CPU.
        RedOp::Max => {
            let gt = b
                .build_float_compare(FloatPredicate::OGT, x, acc, "")
                .map_err(e)?;
            Ok(b.build_select(gt, x, acc, "")
                .map_err(e)?
                .into_float_value())
        }
    }
}

pub(crate) fn identity(op: RedOp) -> f32 {
    match op {
        RedOp::Sum => 0.0,
        RedOp::Max => f32::NEG_INFINITY,
    }
}

/// Butterfly reduction over the 32 lanes of a warp (every lane gets the result).
pub(crate) fn warp_reduce<'ctx>(
    nv: &Nv<'_, 'ctx>,
    op: RedOp,
    mut v: FloatValue<'ctx>,
) -> R<FloatValue<'ctx>> {
    for off in [16, 8, 4, 2, 1] {
        let o = nv.shfl_xor(v, off)?;
        v = combine(nv, op, v, o)?;
    }
    Ok(v)
}

/// Defines the `.entry` for loop kernel `k` as `name`.
pub fn define<'ctx>(
    cx: &'ctx Context,
    module: &Module<'ctx>,
    k: &LoopKernel,
    name: &str,
) -> R<FunctionValue<'ctx>> {
    let gptr = cx.ptr_type(global());
    let i64t = cx.i64_type();
    let i32t = cx.i32_type();
    let f32t = cx.f32_type();
    let r = k.shape.len().saturating_sub(1);
    let mut params: Vec<BasicMetadataTypeEnum> = vec![i64t.into(); 2 + r];
    for _ in &k.inputs {
        params.push(gptr.into());
        params.extend(std::iter::repeat_n(BasicMetadataTypeEnum::from(i64t), r));
    }
    params.extend(std::iter::repeat_n(
        BasicMetadataTypeEnum::from(gptr),
        k.outputs.len(),
    ));
    let func = module.add_function(name, cx.void_type().fn_type(&params, false), None);
    func.set_call_conventions(PTX_KERNEL_CC);
    let b = cx.create_builder();
    b.position_at_end(cx.append_basic_block(func, "entry"));
    let nv = Nv {
        cx,
        module,
        b: &b,
        func,
    };
    let p = |i: usize| -> R<inkwell::values::BasicValueEnum<'ctx>> {
        func.get_nth_param(i as u32)
            .ok_or_else(|| "missing param".into())
    };
    let n = p(0)?.into_int_value();
    let rows = p(1)?.into_int_value();
    let dims: Vec<IntValue> = (0..r)
        .map(|d| p(2 + d).map(|v| v.into_int_value()))
        .collect::<R<_>>()?;
    let mut at = 2 + r;
    let mut in_base = vec![];
    let mut in_strides = vec![];
    for _ in &k.inputs {
        in_base.push(p(at)?.into_pointer_value());
        in_strides.push(
            (0..r)
                .map(|d| p(at + 1 + d).map(|v| v.into_int_value()))
                .collect::<R<Vec<_>>>()?,
        );
        at += 1 + r;
    }
    let out_base: Vec<PointerValue> = (0..k.outputs.len())
        .map(|o| p(at + o).map(|v| v.into_pointer_value()))
        .collect::<R<_>>()?;

    let tx = nv.sreg64("tid.x")?;
    let nt = nv.sreg64("ntid.x")?;
    let ty = nv.sreg64("tid.y")?;
    let nty = nv.sreg64("ntid.y")?;
    let bx = nv.sreg64("ctaid.x")?;
    let row = b
        .build_int_add(b.build_int_mul(bx, nty, "").map_err(e)?, ty, "row")
        .map_err(e)?;
    let body = cx.append_basic_block(func, "row");
    let done = cx.append_basic_block(func, "done");
    let inside = b
        .build_int_compare(IntPredicate::ULT, row, rows, "")
        .map_err(e)?;
    b.build_conditional_branch(inside, body, done).map_err(e)?;
    b.position_at_end(done);
    b.build_return(None).map_err(e)?;
    b.position_at_end(body);

    // Each input's row start: the odometer position of `row` over the outer dims.
    let mut offs = vec![nv.i64c(0); k.inputs.len()];
    let mut rest = row;
    for d in (0..r).rev() {
        let idx = b.build_int_unsigned_rem(rest, dims[d], "").map_err(e)?;
        rest = b.build_int_unsigned_div(rest, dims[d], "").map_err(e)?;
        for (o, st) in offs.iter_mut().zip(&in_strides) {
            let t = b.build_int_mul(idx, st[d], "").map_err(e)?;
            *o = b.build_int_add(*o, t, "").map_err(e)?;
        }
    }
    let ins = in_base
        .iter()
        .zip(&offs)
        // SAFETY (of the generated code): the host passes strides inside each input.
        .map(|(&p, &o)| unsafe { b.build_in_bounds_gep(f32t, p, &[o], "").map_err(e) })
        .collect::<R<Vec<_>>>()?;
    let out_off = b.build_int_mul(row, n, "").map_err(e)?;
    let outs = out_base
        .iter()
        // SAFETY (of the generated code): each output holds `rows × n` floats.
        .map(|&p| unsafe { b.build_in_bounds_gep(f32t, p, &[out_off], "").map_err(e) })
        .collect::<R<Vec<_>>>()?;

    let mut g = Gen {
        nv,
        k,
        ins,
        n,
        red: vec![],
    };
    if !k.reductions.is_empty() {
        let slots = RED_SLOTS * k.reductions.len() as u32;
        let smem = module.add_global(
            f32t.array_type(slots),
            Some(shared()),
            &format!("{name}_red"),
        );
        smem.set_linkage(Linkage::Internal);
        smem.set_initializer(&f32t.array_type(slots).get_undef());
        smem.set_alignment(4);
        let base = smem.as_pointer_value();
        let lane = b
            .build_and(tx, i64t.const_int(31, false), "lane")
            .map_err(e)?;
        let warp = b
            .build_right_shift(tx, i64t.const_int(5, false), false, "warp")
            .map_err(e)?;
        let nwarps = b
            .build_right_shift(
                b.build_int_add(nt, i64t.const_int(31, false), "")
                    .map_err(e)?,
                i64t.const_int(5, false),
                false,
                "",
            )
            .map_err(e)?;
        for (ri, rd) in k.reductions.iter().enumerate() {
            let id = g.nv.f32c(identity(rd.op));
            let acc = g.nv.for_loop(tx, n, nt, &[id], |j, a| {
                let x = g.expr(rd.arg, j, &mut HashMap::new())?;
                Ok(vec![combine(&g.nv, rd.op, a[0], x)?])
            })?[0];
            let acc = warp_reduce(&g.nv, rd.op, acc)?;
            let slot = |i: IntValue<'ctx>| -> R<PointerValue<'ctx>> {
                let i = b
                    .build_int_add(i, i64t.const_int(ri as u64 * RED_SLOTS as u64, false), "")
                    .map_err(e)?;
                // SAFETY (of the generated code): `i < RED_SLOTS` within reduction `ri`.
                unsafe {
                    b.build_in_bounds_gep(f32t.array_type(slots), base, &[i64t.const_zero(), i], "")
                        .map_err(e)
                }
            };
            let lane0 = b
                .build_int_compare(IntPredicate::EQ, lane, i64t.const_zero(), "")
                .map_err(e)?;
            g.nv.when(lane0, || {
                b.build_store(slot(warp)?, acc).map_err(e)?;
                Ok(())
            })?;
            g.nv.barrier()?;
            let warp0 = b
                .build_int_compare(IntPredicate::EQ, warp, i64t.const_zero(), "")
                .map_err(e)?;
            g.nv.when(warp0, || {
                let has = b
                    .build_int_compare(IntPredicate::ULT, lane, nwarps, "")
                    .map_err(e)?;
                // Lanes past the last warp read slot 0 and replace it by the identity.
                let idx = b
                    .build_select(has, lane, i64t.const_zero(), "")
                    .map_err(e)?
                    .into_int_value();
                let v = b
                    .build_load(f32t, slot(idx)?, "")
                    .map_err(e)?
                    .into_float_value();
                let v = b
                    .build_select(has, v, g.nv.f32c(identity(rd.op)), "")
                    .map_err(e)?
                    .into_float_value();
                let v = warp_reduce(&g.nv, rd.op, v)?;
                g.nv.when(lane0, || {
                    b.build_store(slot(i64t.const_int(32, false))?, v)
                        .map_err(e)?;
                    Ok(())
                })
            })?;
            g.nv.barrier()?;
            let s = b
                .build_load(f32t, slot(i64t.const_int(32, false))?, "")
                .map_err(e)?
                .into_float_value();
            g.red.push(s);
        }
    }
    let _ = i32t;
    g.nv.for_loop(tx, n, nt, &[], |j, _| {
        let mut memo = HashMap::new();
        for (o, &(_, ex)) in k.outputs.iter().enumerate() {
            let v = g.expr(ex, j, &mut memo)?;
            // SAFETY (of the generated code): `j < n`.
            let at = unsafe { b.build_in_bounds_gep(f32t, outs[o], &[j], "").map_err(e)? };
            b.build_store(at, v).map_err(e)?;
        }
        Ok(vec![])
    })?;
    b.build_return(None).map_err(e)?;
    if !func.verify(false) {
        return Err(format!("LLVM rejected the kernel {name}"));
    }
    Ok(func)
}
