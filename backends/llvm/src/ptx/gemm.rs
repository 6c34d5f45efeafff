//! The generated GEMM kernel for contractions (`matmul`, `gemm`, `linear`):
//! `C[z, m, n] = act(alpha · scale[z,m,n] · Σ_k A[z,m,k]·B[z,k,n] + beta · bias[z,m,n]) + residual[z,m,n]`
//! with the epilogue fused. A 16×16 thread block computes a 64×64 tile of C, each thread a
//! 4×4 register block (rows `ty + 16i`, columns `tx + 16j`, so stores are coalesced);
//! K advances in steps of 16 through shared-memory tiles of A (stored k-major) and B.
//! Every operand is addressed by element strides, so transposed, broadcast (stride 0) and
//! batched operands need no copies; the batch index `ctaid.z` splits into two levels
//! (`z0 = z / nb1`, `z1 = z % nb1`) with a stride each.
//!
//! Parameters (see [`super::geometry::GemmArgs`]): `M, N, K, nb1`; A: `ptr, b0, b1, m, k`;
//! B: `ptr, b0, b1, k, n`; C: `ptr, b0, b1, m` (unit column stride); then, for each
//! epilogue operand present (row scale, bias, residual, in that order): `ptr, b0, b1, m, n`.

use super::nv::{global, shared, Nv, PTX_KERNEL_CC, R};
use crate::vmath::e;
use inkwell::context::Context;
use inkwell::module::{Linkage, Module};
use inkwell::types::BasicMetadataTypeEnum;
use inkwell::values::{FloatValue, FunctionValue, IntValue, PointerValue};
use inkwell::{FloatPredicate, IntPredicate};
use kiln_plan::vmath::Func;

/// Rows of C per thread block.
pub const TILE_M: u32 = 64;
/// Columns of C per thread block.
pub const TILE_N: u32 = 64;
/// K per shared-memory step.
pub const TILE_K: u32 = 16;
/// Threads per block along x and along y.
pub const THREADS_XY: u32 = 16;
const MICRO: u32 = TILE_M / THREADS_XY;

/// The activation of a fused epilogue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Activation {
    /// None.
    None,
    /// `x > 0 ? x : 0` (NaN passes through, as in `linear`'s reference).
    Relu,
    /// `x · Φ(x)` with erf.
    Gelu,
    /// The tanh approximation of GELU.
    GeluTanh,
    /// `x · sigmoid(x)`.
    Silu,
}

impl Activation {
    /// From `linear`'s `activation` attribute.
    pub fn parse(s: &str) -> Option<Activation> {
        Some(match s {
            "none" => Activation::None,
            "relu" => Activation::Relu,
            "gelu" => Activation::Gelu,
            "gelu_tanh" => Activation::GeluTanh,
            "silu" => Activation::Silu,
            _ => return None,
        })
    }

    /// The attribute spelling.
    pub fn name(self) -> &'static str {
        match self {
            Activation::None => "none",
            Activation::Relu => "relu",
            Activation::Gelu => "gelu",
            Activation::GeluTanh => "gelu_tanh",
            Activation::Silu => "silu",
        }
    }
}

/// What a GEMM kernel fuses after the product (compile-time: one kernel per combination).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Epilogue {
    /// Multiplies the product.
    pub alpha: f32,
    /// Multiplies the bias.
    pub beta: f32,
    /// A row-scale operand (multiplies the product).
    pub scale: bool,
    /// A bias operand.
    pub bias: bool,
    /// The activation, after scale and bias.
    pub act: Activation,
    /// A residual operand, added after the activation.
    pub residual: bool,
}

impl Default for Epilogue {
    fn default() -> Self {
        Epilogue {
            alpha: 1.0,
            beta: 1.0,
            scale: false,
            bias: false,
            act: Activation::None,
            residual: false,
        }
    }
}

impl Epilogue {
    /// Epilogue operands present, in parameter order.
    pub fn operands(&self) -> usize {
        self.scale as usize + self.bias as usize + self.residual as usize
    }
}

fn activation<'ctx>(
    nv: &Nv<'_, 'ctx>,
    act: Activation,
    x: FloatValue<'ctx>,
) -> R<FloatValue<'ctx>> {
    let b = nv.b;
    let recipe = |f: Func| {
        super::loops::on_one_lane(nv, x, |v| crate::vmath::func(nv.cx, nv.module, b, f, v))
    };
    Ok(match act {
        Activation::None => x,
        Activation::Relu => {
            let keep = b
                .build_float_compare(FloatPredicate::UGT, x, nv.f32c(0.0), "")
                .map_err(e)?;
            b.build_select(keep, x, nv.f32c(0.0), "")
                .map_err(e)?
                .into_float_value()
        }
        // The shared recipes (`kiln_plan::vmath`): the CPU epilogues' and loop kernels' roundings.
        Activation::Gelu => recipe(Func::GeluErf)?,
        Activation::GeluTanh => recipe(Func::GeluTanh)?,
        Activation::Silu => recipe(Func::Silu)?,
    })
}

/// A strided operand: base pointer (already offset by the batch) and its m/k/n strides.
struct Operand<'ctx> {
    ptr: PointerValue<'ctx>,
    s0: IntValue<'ctx>,
    s1: IntValue<'ctx>,
}

/// Defines the GEMM `.entry` `name` with epilogue `ep`.
pub fn define<'ctx>(
    cx: &'ctx Context,
    module: &Module<'ctx>,
    ep: &Epilogue,
    name: &str,
) -> R<FunctionValue<'ctx>> {
    let gptr = cx.ptr_type(global());
    let i64t = cx.i64_type();
    let i32t = cx.i32_type();
    let f32t = cx.f32_type();
    let i: BasicMetadataTypeEnum = i64t.into();
    let pp: BasicMetadataTypeEnum = gptr.into();
    let mut params = vec![i, i, i, i, pp, i, i, i, i, pp, i, i, i, i, pp, i, i, i];
    for _ in 0..ep.operands() {
        params.extend([pp, i, i, i, i]);
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
    let p = |i: u32| -> R<inkwell::values::BasicValueEnum<'ctx>> {
        func.get_nth_param(i).ok_or_else(|| "missing param".into())
    };
    let pi = |i: u32| p(i).map(|v| v.into_int_value());
    let (m, n, k, nb1) = (pi(0)?, pi(1)?, pi(2)?, pi(3)?);
    let z = nv.sreg64("ctaid.z")?;
    let z0 = b.build_int_unsigned_div(z, nb1, "z0").map_err(e)?;
    let z1 = b.build_int_unsigned_rem(z, nb1, "z1").map_err(e)?;
    let mul = |x, y| b.build_int_mul(x, y, "").map_err(e);
    let add = |x, y| b.build_int_add(x, y, "").map_err(e);
    // SAFETY (of the generated code): batch offsets stay inside each operand.
    let gep = |ptr, off| unsafe { b.build_in_bounds_gep(f32t, ptr, &[off], "").map_err(e) };
    // An operand at parameter `at`: pointer, two batch strides, then two index strides.
    let operand = |at: u32, two: bool| -> R<Operand<'ctx>> {
        let ptr = p(at)?.into_pointer_value();
        let off = add(mul(z0, pi(at + 1)?)?, mul(z1, pi(at + 2)?)?)?;
        Ok(Operand {
            ptr: gep(ptr, off)?,
            s0: pi(at + 3)?,
            s1: if two {
                pi(at + 4)?
            } else {
                i64t.const_int(1, false)
            },
        })
    };
    let a = operand(4, true)?;
    let bm = operand(9, true)?;
    let c = operand(14, false)?;
    let mut at = 18;
    let mut extra = |present: bool| -> R<Option<Operand<'ctx>>> {
        if !present {
            return Ok(None);
        }
        let o = operand(at, true)?;
        at += 5;
        Ok(Some(o))
    };
    let scale = extra(ep.scale)?;
    let bias = extra(ep.bias)?;
    let resid = extra(ep.residual)?;

    let tile_ty = f32t.array_type(TILE_K * TILE_M);
    let smem = |nm: &str| {
        let g = module.add_global(tile_ty, Some(shared()), &format!("{name}_{nm}"));
        g.set_linkage(Linkage::Internal);
        g.set_initializer(&tile_ty.get_undef());
        g.set_alignment(16);
        g.as_pointer_value()
    };
    let (sa, sb) = (smem("a"), smem("b"));
    // SAFETY (of the generated code): shared indices are below TILE_K · TILE_M.
    let sgep = |base, idx: IntValue<'ctx>| unsafe {
        b.build_in_bounds_gep(tile_ty, base, &[i32t.const_zero(), idx], "")
            .map_err(e)
    };
    let tx = nv.sreg("tid.x")?;
    let ty = nv.sreg("tid.y")?;
    let t = b
        .build_int_add(
            b.build_int_mul(ty, i32t.const_int(THREADS_XY as u64, false), "")
                .map_err(e)?,
            tx,
            "t",
        )
        .map_err(e)?;
    let row0 = mul(nv.sreg64("ctaid.y")?, nv.i64c(TILE_M as u64))?;
    let col0 = mul(nv.sreg64("ctaid.x")?, nv.i64c(TILE_N as u64))?;
    let threads = THREADS_XY * THREADS_XY;
    let zero = nv.f32c(0.0);
    let init = vec![zero; (MICRO * MICRO) as usize];
    let z64 = |v: IntValue<'ctx>| b.build_int_z_extend(v, i64t, "").map_err(e);
    let ult = |x, y| b.build_int_compare(IntPredicate::ULT, x, y, "").map_err(e);
    let and = |x, y| b.build_and(x, y, "").map_err(e);
    // A bounds-checked load: the index is clamped to 0 when outside (the value discarded).
    let load_or_zero =
        |ptr: PointerValue<'ctx>, idx: IntValue<'ctx>, ok: IntValue<'ctx>| -> R<FloatValue<'ctx>> {
            let safe = b
                .build_select(ok, idx, i64t.const_zero(), "")
                .map_err(e)?
                .into_int_value();
            let v = b.build_load(f32t, gep(ptr, safe)?, "").map_err(e)?;
            Ok(b.build_select(ok, v.into_float_value(), zero, "")
                .map_err(e)?
                .into_float_value())
        };
    let acc = nv.for_loop(
        i64t.const_zero(),
        k,
        nv.i64c(TILE_K as u64),
        &init,
        |k0, acc| {
            for r in 0..(TILE_K * TILE_M) / threads {
                let idx = b
                    .build_int_add(t, i32t.const_int((r * threads) as u64, false), "")
                    .map_err(e)?;
                // A tile: kk = idx % 16, mm = idx / 16 (k fastest: coalesced for row-major A).
                let kk = b
                    .build_and(idx, i32t.const_int(TILE_K as u64 - 1, false), "")
                    .map_err(e)?;
                let mm = b
                    .build_right_shift(
                        idx,
                        i32t.const_int(TILE_K.trailing_zeros() as u64, false),
                        false,
                        "",
                    )
                    .map_err(e)?;
                let gm = add(row0, z64(mm)?)?;
                let gk = add(k0, z64(kk)?)?;
                let ok = and(ult(gm, m)?, ult(gk, k)?)?;
                let v = load_or_zero(a.ptr, add(mul(gm, a.s0)?, mul(gk, a.s1)?)?, ok)?;
                let sidx = b
                    .build_int_add(
                        b.build_int_mul(kk, i32t.const_int(TILE_M as u64, false), "")
                            .map_err(e)?,
                        mm,
                        "",
                    )
                    .map_err(e)?;
                b.build_store(sgep(sa, sidx)?, v).map_err(e)?;
                // B tile: nn = idx % 64, kk = idx / 64 (n fastest: coalesced for row-major B).
                let nn = b
                    .build_and(idx, i32t.const_int(TILE_N as u64 - 1, false), "")
                    .map_err(e)?;
                let kk = b
                    .build_right_shift(
                        idx,
                        i32t.const_int(TILE_N.trailing_zeros() as u64, false),
                        false,
                        "",
                    )
                    .map_err(e)?;
                let gn = add(col0, z64(nn)?)?;
                let gk = add(k0, z64(kk)?)?;
                let ok = and(ult(gk, k)?, ult(gn, n)?)?;
                let v = load_or_zero(bm.ptr, add(mul(gk, bm.s0)?, mul(gn, bm.s1)?)?, ok)?;
                let sidx = b
                    .build_int_add(
                        b.build_int_mul(kk, i32t.const_int(TILE_N as u64, false), "")
                            .map_err(e)?,
                        nn,
                        "",
                    )
                    .map_err(e)?;
                b.build_store(sgep(sb, sidx)?, v).map_err(e)?;
            }
            nv.barrier()?;
            let mut acc = acc.to_vec();
            for kk in 0..TILE_K {
                let av = (0..MICRO)
                    .map(|i| {
                        let idx = b
                            .build_int_add(
                                ty,
                                i32t.const_int((kk * TILE_M + i * THREADS_XY) as u64, false),
                                "",
                            )
                            .map_err(e)?;
                        Ok(b.build_load(f32t, sgep(sa, idx)?, "")
                            .map_err(e)?
                            .into_float_value())
                    })
                    .collect::<R<Vec<_>>>()?;
                let bv = (0..MICRO)
                    .map(|j| {
                        let idx = b
                            .build_int_add(
                                tx,
                                i32t.const_int((kk * TILE_N + j * THREADS_XY) as u64, false),
                                "",
                            )
                            .map_err(e)?;
                        Ok(b.build_load(f32t, sgep(sb, idx)?, "")
                            .map_err(e)?
                            .into_float_value())
                    })
                    .collect::<R<Vec<_>>>()?;
                for i in 0..MICRO as usize {
                    for j in 0..MICRO as usize {
                        let s = &mut acc[i * MICRO as usize + j];
                        *s = nv.fcall("llvm.fma", &[av[i], bv[j], *s])?;
                    }
                }
            }
            nv.barrier()?;
            Ok(acc)
        },
    )?;
    // Epilogue and store, bounds-checked per element.
    let fmul = |x, y| b.build_float_mul(x, y, "").map_err(e);
    let fadd = |x, y| b.build_float_add(x, y, "").map_err(e);
    for i in 0..MICRO {
        let gm = add(
            row0,
            z64(b
                .build_int_add(ty, i32t.const_int((i * THREADS_XY) as u64, false), "")
                .map_err(e)?)?,
        )?;
        for j in 0..MICRO {
            let gn = add(
                col0,
                z64(b
                    .build_int_add(tx, i32t.const_int((j * THREADS_XY) as u64, false), "")
                    .map_err(e)?)?,
            )?;
            let ok = and(ult(gm, m)?, ult(gn, n)?)?;
            let v0 = acc[(i * MICRO + j) as usize];
            nv.when(ok, || {
                let at = |o: &Operand<'ctx>| -> R<FloatValue<'ctx>> {
                    let idx = add(mul(gm, o.s0)?, mul(gn, o.s1)?)?;
                    Ok(b.build_load(f32t, gep(o.ptr, idx)?, "")
                        .map_err(e)?
                        .into_float_value())
                };
                let mut v = v0;
                if ep.alpha != 1.0 {
                    v = fmul(v, nv.f32c(ep.alpha))?;
                }
                if let Some(s) = &scale {
                    v = fmul(v, at(s)?)?;
                }
                if let Some(bo) = &bias {
                    let mut bv = at(bo)?;
                    if ep.beta != 1.0 {
                        bv = fmul(bv, nv.f32c(ep.beta))?;
                    }
                    v = fadd(v, bv)?;
                }
                v = activation(&nv, ep.act, v)?;
                if let Some(r) = &resid {
                    v = fadd(v, at(r)?)?;
                }
                let idx = add(mul(gm, c.s0)?, gn)?;
                b.build_store(gep(c.ptr, idx)?, v).map_err(e)?;
                Ok(())
            })?;
        }
    }
    b.build_return(None).map_err(e)?;
    if !func.verify(false) {
        return Err(format!("LLVM rejected the kernel {name}"));
    }
    Ok(func)
}
