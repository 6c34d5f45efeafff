//! The fused `attention` op as one PTX entry: a thread block per (query row, head, batch),
//! `ctaid = (i, h, b)`. Its threads stride over the keys, each score
//! `scale · q_i·k_j (+ mask) (−∞ past the causal edge)` kept in dynamic shared memory; the
//! row max and sum are block reductions (warp shuffles, then shared memory), the
//! probabilities `exp(s − max)` replace the scores in place, and the threads then stride
//! over the value dims, each summing `p_j · v_j[d]` over every key. Grouped-query heads read
//! kv head `h / group`. Every tensor is addressed by strides, so head-major (`bhsd`) and
//! sequence-major (`bshd`) layouts are the same kernel.
//!
//! Parameters (see [`super::geometry::AttentionArgs`]): `S, T, D, DV, group` (i64),
//! `scale` (f64); then q, k, v, out, each `ptr, batch stride, head stride, row stride`
//! (unit stride along d); then, with a mask, `ptr` and its strides over
//! `[b, h, i, j]`. Dynamic shared memory: `4·T` bytes.

use super::loops::{combine, identity, unary, warp_reduce};
use super::nv::{global, shared, Nv, PTX_KERNEL_CC, R};
use crate::vmath::e;
use inkwell::context::Context;
use inkwell::module::{Linkage, Module};
use inkwell::types::BasicMetadataTypeEnum;
use inkwell::values::{FloatValue, FunctionValue, IntValue, PointerValue};
use inkwell::{FloatPredicate, IntPredicate};
use kiln_plan::{RedOp, UnOp};

/// Threads per attention block.
pub const ATTENTION_THREADS: u32 = 128;

/// Defines the attention entry `name`.
pub fn define<'ctx>(
    cx: &'ctx Context,
    module: &Module<'ctx>,
    causal: bool,
    mask: bool,
    name: &str,
) -> R<FunctionValue<'ctx>> {
    let gptr = cx.ptr_type(global());
    let i64t = cx.i64_type();
    let f32t = cx.f32_type();
    let i: BasicMetadataTypeEnum = i64t.into();
    let p: BasicMetadataTypeEnum = gptr.into();
    let mut params = vec![i, i, i, i, i, cx.f64_type().into()];
    for _ in 0..4 {
        params.extend([p, i, i, i]);
    }
    if mask {
        params.extend([p, i, i, i, i]);
    }
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
    let pv = |k: u32| {
        func.get_nth_param(k)
            .ok_or_else(|| "missing param".to_string())
    };
    let pi = |k: u32| pv(k).map(|v| v.into_int_value());
    let (s, t, d, dv, group) = (pi(0)?, pi(1)?, pi(2)?, pi(3)?, pi(4)?);
    let scale = b
        .build_float_trunc(pv(5)?.into_float_value(), f32t, "scale")
        .map_err(e)?;
    let mul = |x, y| b.build_int_mul(x, y, "").map_err(e);
    let add = |x, y| b.build_int_add(x, y, "").map_err(e);
    // SAFETY (of the generated code): the host passes strides inside each tensor.
    let gep = |ptr, off| unsafe { b.build_in_bounds_gep(f32t, ptr, &[off], "").map_err(e) };
    let qi = nv.sreg64("ctaid.x")?;
    let h = nv.sreg64("ctaid.y")?;
    let bb = nv.sreg64("ctaid.z")?;
    let kh = b.build_int_unsigned_div(h, group, "kh").map_err(e)?;
    // Row bases: q and out at (b, h, i); k and v at (b, kh) (rows j added per key).
    let base = |at: u32,
                head: IntValue<'ctx>,
                row: Option<IntValue<'ctx>>|
     -> R<(PointerValue<'ctx>, IntValue<'ctx>)> {
        let ptr = pv(at)?.into_pointer_value();
        let mut off = add(mul(bb, pi(at + 1)?)?, mul(head, pi(at + 2)?)?)?;
        if let Some(r) = row {
            off = add(off, mul(r, pi(at + 3)?)?)?;
        }
        Ok((gep(ptr, off)?, pi(at + 3)?))
    };
    let (q, _) = base(6, h, Some(qi))?;
    let (k, ks) = base(10, kh, None)?;
    let (v, vs) = base(14, kh, None)?;
    let (out, _) = base(18, h, Some(qi))?;
    let mask_row = if mask {
        let ptr = pv(22)?.into_pointer_value();
        let off = add(add(mul(bb, pi(23)?)?, mul(h, pi(24)?)?)?, mul(qi, pi(25)?)?)?;
        Some((gep(ptr, off)?, pi(26)?))
    } else {
        None
    };
    let scores_ty = f32t.array_type(0);
    let scores = module.add_global(scores_ty, Some(shared()), &format!("{name}_scores"));
    scores.set_linkage(Linkage::External);
    scores.set_alignment(4);
    let red_ty = f32t.array_type(66);
    let red = module.add_global(red_ty, Some(shared()), &format!("{name}_red"));
    red.set_linkage(Linkage::Internal);
    red.set_initializer(&red_ty.get_undef());
    red.set_alignment(4);
    // SAFETY (of the generated code): j < T and the block has 4·T bytes of dynamic shared memory.
    let score = |j: IntValue<'ctx>| unsafe {
        b.build_in_bounds_gep(f32t, scores.as_pointer_value(), &[j], "")
            .map_err(e)
    };
    let tx = nv.sreg64("tid.x")?;
    let nt = nv.sreg64("ntid.x")?;
    let lane = b.build_and(tx, nv.i64c(31), "lane").map_err(e)?;
    let warp = b
        .build_right_shift(tx, nv.i64c(5), false, "warp")
        .map_err(e)?;
    let nwarps = b
        .build_right_shift(add(nt, nv.i64c(31))?, nv.i64c(5), false, "")
        .map_err(e)?;
    // The same two-level block reduction as the loop kernels', slots `33·slot ..`.
    let block_reduce = |op: RedOp, v: FloatValue<'ctx>, slot: u64| -> R<FloatValue<'ctx>> {
        let v = warp_reduce(&nv, op, v)?;
        let at = |i: IntValue<'ctx>| -> R<PointerValue<'ctx>> {
            let i = add(i, nv.i64c(33 * slot))?;
            // SAFETY (of the generated code): i < 66.
            unsafe {
                b.build_in_bounds_gep(red_ty, red.as_pointer_value(), &[i64t.const_zero(), i], "")
                    .map_err(e)
            }
        };
        let lane0 = b
            .build_int_compare(IntPredicate::EQ, lane, i64t.const_zero(), "")
            .map_err(e)?;
        nv.when(lane0, || {
            b.build_store(at(warp)?, v).map_err(e)?;
            Ok(())
        })?;
        nv.barrier()?;
        let warp0 = b
            .build_int_compare(IntPredicate::EQ, warp, i64t.const_zero(), "")
            .map_err(e)?;
        nv.when(warp0, || {
            let has = b
                .build_int_compare(IntPredicate::ULT, lane, nwarps, "")
                .map_err(e)?;
            let idx = b
                .build_select(has, lane, i64t.const_zero(), "")
                .map_err(e)?
                .into_int_value();
            let x = b
                .build_load(f32t, at(idx)?, "")
                .map_err(e)?
                .into_float_value();
            let x = b
                .build_select(has, x, nv.f32c(identity(op)), "")
                .map_err(e)?
                .into_float_value();
            let x = warp_reduce(&nv, op, x)?;
            nv.when(lane0, || {
                b.build_store(at(nv.i64c(32))?, x).map_err(e)?;
                Ok(())
            })
        })?;
        nv.barrier()?;
        Ok(b.build_load(f32t, at(nv.i64c(32))?, "")
            .map_err(e)?
            .into_float_value())
    };
    // Query i's absolute position: T − S + i (signed; keys past it are masked when causal).
    let pos = add(b.build_int_sub(t, s, "").map_err(e)?, qi)?;
    let ninf = nv.f32c(f32::NEG_INFINITY);
    let mx = nv.for_loop(tx, t, nt, &[ninf], |j, acc| {
        let krow = gep(k, mul(j, ks)?)?;
        let dot = nv.for_loop(
            i64t.const_zero(),
            d,
            nv.i64c(1),
            &[nv.f32c(0.0)],
            |dd, a| {
                let x = b
                    .build_load(f32t, gep(q, dd)?, "")
                    .map_err(e)?
                    .into_float_value();
                let y = b
                    .build_load(f32t, gep(krow, dd)?, "")
                    .map_err(e)?
                    .into_float_value();
                Ok(vec![nv.fcall("llvm.fma", &[x, y, a[0]])?])
            },
        )?[0];
        let mut sc = b.build_float_mul(dot, scale, "").map_err(e)?;
        if let Some((m, mt)) = mask_row {
            let x = b
                .build_load(f32t, gep(m, mul(j, mt)?)?, "")
                .map_err(e)?
                .into_float_value();
            sc = b.build_float_add(sc, x, "").map_err(e)?;
        }
        if causal {
            let past = b
                .build_int_compare(IntPredicate::SGT, j, pos, "")
                .map_err(e)?;
            sc = b
                .build_select(past, ninf, sc, "")
                .map_err(e)?
                .into_float_value();
        }
        b.build_store(score(j)?, sc).map_err(e)?;
        Ok(vec![combine(&nv, RedOp::Max, acc[0], sc)?])
    })?[0];
    let mx = block_reduce(RedOp::Max, mx, 0)?;
    let fin = b
        .build_float_compare(
            FloatPredicate::OLT,
            nv.fcall("llvm.fabs", &[mx])?,
            nv.f32c(f32::INFINITY),
            "",
        )
        .map_err(e)?;
    let shift = b
        .build_select(fin, mx, nv.f32c(0.0), "")
        .map_err(e)?
        .into_float_value();
    let sum = nv.for_loop(tx, t, nt, &[nv.f32c(0.0)], |j, acc| {
        let sc = b
            .build_load(f32t, score(j)?, "")
            .map_err(e)?
            .into_float_value();
        let p = unary(&nv, UnOp::Exp, b.build_float_sub(sc, shift, "").map_err(e)?)?;
        b.build_store(score(j)?, p).map_err(e)?;
        Ok(vec![b.build_float_add(acc[0], p, "").map_err(e)?])
    })?[0];
    let sum = block_reduce(RedOp::Sum, sum, 1)?;
    nv.for_loop(tx, dv, nt, &[], |dd, _| {
        let o = nv.for_loop(i64t.const_zero(), t, nv.i64c(1), &[nv.f32c(0.0)], |j, a| {
            let p = b
                .build_load(f32t, score(j)?, "")
                .map_err(e)?
                .into_float_value();
            let x = b
                .build_load(f32t, gep(v, add(mul(j, vs)?, dd)?)?, "")
                .map_err(e)?
                .into_float_value();
            Ok(vec![nv.fcall("llvm.fma", &[p, x, a[0]])?])
        })?[0];
        let y = b.build_float_div(o, sum, "").map_err(e)?;
        b.build_store(gep(out, dd)?, y).map_err(e)?;
        Ok(vec![])
    })?;
    b.build_return(None).map_err(e)?;
    if !func.verify(false) {
        return Err(format!("LLVM rejected the kernel {name}"));
    }
    Ok(func)
}
