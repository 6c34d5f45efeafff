//! The strided copy kernel behind the GPU's movement ops (transpose, expand, concat):
//! `dst[dst_off + Σ i_k·dst_st_k] = src[src_off + Σ i_k·src_st_k]` over a copy domain of
//! up to [`COPY_RANK`] dims, one element per thread in a grid-stride loop. One entry per
//! element size (4 and 8 bytes: f32/i32, i64/f64), as bits.
//!
//! Parameters (see [`super::geometry::CopyArgs`]): `total, dims[COPY_RANK]`, then `src,
//! src_off, src_strides[COPY_RANK]`, then `dst, dst_off, dst_strides[COPY_RANK]`.

use super::nv::{global, Nv, PTX_KERNEL_CC, R};
use crate::vmath::e;
use inkwell::context::Context;
use inkwell::module::Module;
use inkwell::types::BasicMetadataTypeEnum;
use inkwell::values::FunctionValue;

/// The most dims a copy domain has (leading dims of size 1 pad a smaller one).
pub const COPY_RANK: usize = 6;
/// Threads per copy block.
pub const COPY_THREADS: u32 = 256;

/// The entry name for elements of `bytes` bytes.
pub fn entry(bytes: usize) -> Option<&'static str> {
    match bytes {
        4 => Some("kiln_copy4"),
        8 => Some("kiln_copy8"),
        _ => None,
    }
}

/// Defines the copy entry for `bytes`-byte elements.
pub fn define<'ctx>(
    cx: &'ctx Context,
    module: &Module<'ctx>,
    bytes: usize,
) -> R<FunctionValue<'ctx>> {
    let name = entry(bytes).ok_or_else(|| format!("no copy kernel for {bytes}-byte elements"))?;
    let ety = if bytes == 8 {
        cx.i64_type()
    } else {
        cx.i32_type()
    };
    let gptr = cx.ptr_type(global());
    let i64t = cx.i64_type();
    let i: BasicMetadataTypeEnum = i64t.into();
    let mut params = vec![i; 1 + COPY_RANK];
    for _ in 0..2 {
        params.push(gptr.into());
        params.extend(vec![i; 1 + COPY_RANK]);
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
    let pv = |k: usize| {
        func.get_nth_param(k as u32)
            .ok_or_else(|| "missing param".to_string())
    };
    let pi = |k: usize| pv(k).map(|v| v.into_int_value());
    let total = pi(0)?;
    let dims = (0..COPY_RANK).map(|k| pi(1 + k)).collect::<R<Vec<_>>>()?;
    let src_at = 1 + COPY_RANK;
    let dst_at = src_at + 2 + COPY_RANK;
    let side = |at: usize| -> R<_> {
        Ok((
            pv(at)?.into_pointer_value(),
            pi(at + 1)?,
            (0..COPY_RANK)
                .map(|k| pi(at + 2 + k))
                .collect::<R<Vec<_>>>()?,
        ))
    };
    let (src, src_off, src_st) = side(src_at)?;
    let (dst, dst_off, dst_st) = side(dst_at)?;
    let tid = nv.sreg64("tid.x")?;
    let nt = nv.sreg64("ntid.x")?;
    let bid = nv.sreg64("ctaid.x")?;
    let nb = nv.sreg64("nctaid.x")?;
    let start = b
        .build_int_add(b.build_int_mul(bid, nt, "").map_err(e)?, tid, "")
        .map_err(e)?;
    let step = b.build_int_mul(nb, nt, "").map_err(e)?;
    nv.for_loop(start, total, step, &[], |idx, _| {
        let (mut so, mut doff, mut rest) = (src_off, dst_off, idx);
        for k in (0..COPY_RANK).rev() {
            let ik = b.build_int_unsigned_rem(rest, dims[k], "").map_err(e)?;
            rest = b.build_int_unsigned_div(rest, dims[k], "").map_err(e)?;
            so = b
                .build_int_add(so, b.build_int_mul(ik, src_st[k], "").map_err(e)?, "")
                .map_err(e)?;
            doff = b
                .build_int_add(doff, b.build_int_mul(ik, dst_st[k], "").map_err(e)?, "")
                .map_err(e)?;
        }
        // SAFETY (of the generated code): the host passes offsets and strides inside both.
        let (sp, dp) = unsafe {
            (
                b.build_in_bounds_gep(ety, src, &[so], "").map_err(e)?,
                b.build_in_bounds_gep(ety, dst, &[doff], "").map_err(e)?,
            )
        };
        let v = b.build_load(ety, sp, "").map_err(e)?;
        b.build_store(dp, v).map_err(e)?;
        Ok(vec![])
    })?;
    b.build_return(None).map_err(e)?;
    if !func.verify(false) {
        return Err(format!("LLVM rejected the kernel {name}"));
    }
    Ok(func)
}
