//! Cranelift code generation for loop kernels: one native function per kernel that
//! processes a run of `m` rows, `fn(ins: *const *const f32, outs: *const *mut f32, n: i64,
//! m: i64, in_strides: *const i64)` (the [`RowFn`] ABI). Each pass over a row (one per reduction, then the store pass) is an F32X4 loop over
//! `n & !3` elements followed by a scalar tail; every pass first runs four F32X4 chains side
//! by side over `n & !15` (four accumulators in a reduction). Transcendentals are inlined ([`crate::vmath`]).

use cranelift_codegen::ir::condcodes::FloatCC;
use cranelift_codegen::ir::{types, AbiParam, Endianness, InstBuilder, MemFlagsData, Type, Value};
use cranelift_codegen::Context;
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{FuncId, Linkage, Module};
use kiln_plan::{BinOp, Expr, ExprId, InnerAccess, LoopKernel, RedOp, UnOp};
use std::collections::HashMap;

pub use kiln_runtime::executor::rows::RowFn;
use kiln_runtime::executor::rows::{post_root, PostMap};

const LANES: i64 = 4;
/// Independent F32X4 accumulators of a row reduction (4: the add latency over its throughput).
const UNROLL: i64 = 4;

/// A JIT module for the host.
pub fn new_module() -> Result<JITModule, String> {
    let b = JITBuilder::with_flags(
        &[("opt_level", "speed")],
        cranelift_module::default_libcall_names(),
    )
    .map_err(|e| e.to_string())?;
    Ok(JITModule::new(b))
}

/// The kernel to compile for `k`, and the function the runtime applies to its output after
/// it: where `k` has one output whose root is a transcendental the runtime maps on wider
/// registers ([`post_root`]) and this CPU has AVX2 or AVX-512, the compiled kernel stops
/// below that root. Otherwise `k` itself and `None`.
pub fn split_post(k: &LoopKernel) -> (LoopKernel, Option<PostMap>) {
    let Some((post, arg)) =
        post_root(k).and_then(|(func, arg)| PostMap::widest(func).map(|p| (p, arg)))
    else {
        return (k.clone(), None);
    };
    let mut code = k.clone();
    code.outputs[0].1 = arg;
    (code, Some(post))
}

/// Declares and defines the row function of `k` in `module` (finalize separately).
pub fn define(module: &mut JITModule, k: &LoopKernel, name: &str) -> Result<FuncId, String> {
    let ptr = module.target_config().pointer_type();
    let mut ctx: Context = module.make_context();
    ctx.func.signature.params = vec![
        AbiParam::new(ptr),
        AbiParam::new(ptr),
        AbiParam::new(types::I64),
        AbiParam::new(types::I64),
        AbiParam::new(ptr),
    ];
    let id = module
        .declare_function(name, Linkage::Local, &ctx.func.signature)
        .map_err(|e| e.to_string())?;
    let mut fctx = FunctionBuilderContext::new();
    {
        let mut b = FunctionBuilder::new(&mut ctx.func, &mut fctx);
        let entry = b.create_block();
        b.append_block_params_for_function_params(entry);
        b.switch_to_block(entry);
        let params = b.block_params(entry).to_vec();
        let (ins, outs, n, m, strides) = (params[0], params[1], params[2], params[3], params[4]);
        let flags = MemFlagsData::new().with_notrap();
        let in_bases: Vec<Value> = (0..k.inputs.len())
            .map(|i| b.ins().load(ptr, flags, ins, (i * 8) as i32))
            .collect();
        let in_steps: Vec<Value> = (0..k.inputs.len())
            .map(|i| {
                let st = b.ins().load(types::I64, flags, strides, (i * 8) as i32);
                b.ins().ishl_imm_s(st, 2)
            })
            .collect();
        let out_bases: Vec<Value> = (0..k.outputs.len())
            .map(|i| b.ins().load(ptr, flags, outs, (i * 8) as i32))
            .collect();
        let out_step = b.ins().ishl_imm_s(n, 2);
        let zero = b.ins().iconst(types::I64, 0);
        let row = Row {
            n,
            n4: b.ins().band_imm_s(n, !(LANES - 1)),
            n_unrolled: b.ins().band_imm_s(n, !(UNROLL * LANES - 1)),
            zero,
        };
        // The run: row `r` reads input `i` at `in_bases[i] + r * in_steps[i]` bytes and
        // writes at `out_bases[o] + r * 4n`.
        emit_loop(&mut b, zero, m, 1, &[], types::F32X4, |b, r, _| {
            let at = |b: &mut FunctionBuilder, base: Value, step: Value| {
                let off = b.ins().imul(r, step);
                b.ins().iadd(base, off)
            };
            let in_ptrs: Vec<Value> = in_bases
                .iter()
                .zip(&in_steps)
                .map(|(&p, &st)| at(b, p, st))
                .collect();
            let out_ptrs: Vec<Value> = out_bases.iter().map(|&p| at(b, p, out_step)).collect();
            emit_row(b, k, &row, in_ptrs, &out_ptrs);
            vec![]
        });
        b.ins().return_(&[]);
        b.seal_all_blocks();
        b.finalize(module.target_config());
    }
    module
        .define_function(id, &mut ctx)
        .map_err(|e| format!("{e:?}"))?;
    module.clear_context(&mut ctx);
    Ok(id)
}

/// The row-length values every row of a run shares.
struct Row {
    n: Value,
    n4: Value,
    n_unrolled: Value,
    zero: Value,
}

/// Emits one row of `k`: its reduction passes, then the store pass, reading inputs at
/// `in_ptrs` and writing outputs at `out_ptrs`. The builder is left after the row.
fn emit_row(
    b: &mut FunctionBuilder,
    k: &LoopKernel,
    row: &Row,
    in_ptrs: Vec<Value>,
    out_ptrs: &[Value],
) {
    let Row {
        n,
        n4,
        n_unrolled,
        zero,
    } = *row;
    let flags = MemFlagsData::new().with_notrap();
    let mut g = Gen {
        k,
        in_ptrs,
        n,
        red: vec![],
    };
    for r in 0..k.reductions.len() {
        let rd = &k.reductions[r];
        let id = match rd.op {
            RedOp::Sum => 0.0f32,
            RedOp::Max => f32::NEG_INFINITY,
        };
        let idv = b.ins().f32const(id);
        let init = b.ins().splat(types::F32X4, idv);
        // UNROLL independent accumulators over UNROLL·4 elements per iteration: with one,
        // every step waited for the previous add (4 cycles per 4 elements).
        let inits = [init; UNROLL as usize];
        let accs = emit_loop(
            b,
            zero,
            n_unrolled,
            UNROLL * LANES,
            &inits,
            types::F32X4,
            |b, j, a| {
                (0..UNROLL)
                    .map(|u| {
                        let ju = b.ins().iadd_imm_s(j, u * LANES);
                        let x = g.expr(b, rd.arg, types::F32X4, ju, &mut HashMap::new());
                        combine(b, rd.op, a[u as usize], x, types::F32X4)
                    })
                    .collect()
            },
        );
        let lo = combine(b, rd.op, accs[0], accs[1], types::F32X4);
        let hi = combine(b, rd.op, accs[2], accs[3], types::F32X4);
        let init = combine(b, rd.op, lo, hi, types::F32X4);
        let acc = emit_loop(
            b,
            n_unrolled,
            n4,
            LANES,
            &[init],
            types::F32X4,
            |b, j, a| {
                let x = g.expr(b, rd.arg, types::F32X4, j, &mut HashMap::new());
                vec![combine(b, rd.op, a[0], x, types::F32X4)]
            },
        );
        let mut h = b.ins().extractlane(acc[0], 0u8);
        for l in 1..LANES as u8 {
            let x = b.ins().extractlane(acc[0], l);
            h = combine(b, rd.op, h, x, types::F32);
        }
        let acc = emit_loop(b, n4, n, 1, &[h], types::F32, |b, j, a| {
            let x = g.expr(b, rd.arg, types::F32, j, &mut HashMap::new());
            vec![combine(b, rd.op, a[0], x, types::F32)]
        });
        g.red.push(acc[0]);
    }
    // The store pass: UNROLL independent F32X4 chains per iteration (one basic block, so
    // the CPU overlaps them: an inlined exp is a long dependent chain), then single
    // vectors, then scalars.
    emit_loop(
        b,
        zero,
        n_unrolled,
        UNROLL * LANES,
        &[],
        types::F32X4,
        |b, j, _| {
            for u in 0..UNROLL {
                let ju = b.ins().iadd_imm_s(j, u * LANES);
                let mut memo = HashMap::new();
                let off = b.ins().ishl_imm_s(ju, 2);
                for (o, &(_, e)) in k.outputs.iter().enumerate() {
                    let v = g.expr(b, e, types::F32X4, ju, &mut memo);
                    let at = b.ins().iadd(out_ptrs[o], off);
                    b.ins().store(flags, v, at, 0);
                }
            }
            vec![]
        },
    );
    for (step, ty, lo, hi) in [
        (LANES, types::F32X4, n_unrolled, n4),
        (1, types::F32, n4, n),
    ] {
        emit_loop(b, lo, hi, step, &[], ty, |b, j, _| {
            let mut memo = HashMap::new();
            let off = b.ins().ishl_imm_s(j, 2);
            for (o, &(_, e)) in k.outputs.iter().enumerate() {
                let v = g.expr(b, e, ty, j, &mut memo);
                let at = b.ins().iadd(out_ptrs[o], off);
                b.ins().store(flags, v, at, 0);
            }
            vec![]
        });
    }
}

/// Emits `for j in (lo..hi).step_by(step)` carrying accumulators of type `acc_ty`; returns
/// their final values. The builder is left in the exit block.
fn emit_loop(
    b: &mut FunctionBuilder,
    lo: Value,
    hi: Value,
    step: i64,
    init: &[Value],
    acc_ty: Type,
    mut body: impl FnMut(&mut FunctionBuilder, Value, &[Value]) -> Vec<Value>,
) -> Vec<Value> {
    let header = b.create_block();
    let body_blk = b.create_block();
    let exit = b.create_block();
    b.append_block_param(header, types::I64);
    for _ in init {
        b.append_block_param(header, acc_ty);
        b.append_block_param(exit, acc_ty);
    }
    let args: Vec<_> = std::iter::once(lo)
        .chain(init.iter().copied())
        .map(Into::into)
        .collect();
    b.ins().jump(header, &args);
    b.switch_to_block(header);
    let hp = b.block_params(header).to_vec();
    let (j, accs) = (hp[0], &hp[1..]);
    let more = b.ins().icmp(
        cranelift_codegen::ir::condcodes::IntCC::SignedLessThan,
        j,
        hi,
    );
    let exit_args: Vec<_> = accs.iter().copied().map(Into::into).collect();
    b.ins().brif(more, body_blk, &[], exit, &exit_args);
    b.switch_to_block(body_blk);
    let next = body(b, j, accs);
    let j2 = b.ins().iadd_imm_s(j, step);
    let args: Vec<_> = std::iter::once(j2).chain(next).map(Into::into).collect();
    b.ins().jump(header, &args);
    b.switch_to_block(exit);
    b.block_params(exit).to_vec()
}

/// `mask ? x : y` for a float comparison result, scalar or F32X4.
fn select(b: &mut FunctionBuilder, mask: Value, x: Value, y: Value, ty: Type) -> Value {
    if ty.is_vector() {
        let m = b.ins().bitcast(
            ty,
            MemFlagsData::new().with_endianness(Endianness::Little),
            mask,
        );
        b.ins().bitselect(m, x, y)
    } else {
        b.ins().select(mask, x, y)
    }
}

/// One reduction step.
fn combine(b: &mut FunctionBuilder, op: RedOp, acc: Value, x: Value, ty: Type) -> Value {
    match op {
        RedOp::Sum => b.ins().fadd(acc, x),
        RedOp::Max => {
            let gt = b.ins().fcmp(FloatCC::GreaterThan, x, acc);
            select(b, gt, x, acc, ty)
        }
    }
}

struct Gen<'a> {
    k: &'a LoopKernel,
    in_ptrs: Vec<Value>,
    n: Value,
    red: Vec<Value>,
}

impl Gen<'_> {
    fn fconst(&self, b: &mut FunctionBuilder, c: f32, ty: Type) -> Value {
        let s = b.ins().f32const(c);
        if ty.is_vector() {
            b.ins().splat(ty, s)
        } else {
            s
        }
    }

    fn expr(
        &self,
        b: &mut FunctionBuilder,
        id: ExprId,
        ty: Type,
        j: Value,
        memo: &mut HashMap<ExprId, Value>,
    ) -> Value {
        if let Some(&v) = memo.get(&id) {
            return v;
        }
        let flags = MemFlagsData::new().with_notrap();
        let splat = |b: &mut FunctionBuilder, s: Value| {
            if ty.is_vector() {
                b.ins().splat(ty, s)
            } else {
                s
            }
        };
        let v = match self.k.exprs[id] {
            Expr::Load(i) => match self.k.inputs[i].inner {
                InnerAccess::Contiguous => {
                    let off = b.ins().ishl_imm_s(j, 2);
                    let at = b.ins().iadd(self.in_ptrs[i], off);
                    b.ins().load(ty, flags, at, 0)
                }
                InnerAccess::Broadcast => {
                    let s = b.ins().load(types::F32, flags, self.in_ptrs[i], 0);
                    splat(b, s)
                }
            },
            Expr::Const(c) => self.fconst(b, c, ty),
            Expr::RowLen => {
                let s = b.ins().fcvt_from_sint(types::F32, self.n);
                splat(b, s)
            }
            Expr::Reduced(r) => {
                let s = self.red[r];
                splat(b, s)
            }
            Expr::Bin(op, x, y) => {
                let x = self.expr(b, x, ty, j, memo);
                let y = self.expr(b, y, ty, j, memo);
                match op {
                    BinOp::Add => b.ins().fadd(x, y),
                    BinOp::Sub => b.ins().fsub(x, y),
                    BinOp::Mul => b.ins().fmul(x, y),
                    BinOp::Div => b.ins().fdiv(x, y),
                    BinOp::Max => b.ins().fmax(x, y),
                    BinOp::Min => b.ins().fmin(x, y),
                    BinOp::ClampBelow => {
                        let lt = b.ins().fcmp(FloatCC::LessThan, x, y);
                        select(b, lt, y, x, ty)
                    }
                    BinOp::ClampAbove => {
                        let gt = b.ins().fcmp(FloatCC::GreaterThan, x, y);
                        select(b, gt, y, x, ty)
                    }
                }
            }
            Expr::Un(op, x) => {
                let x = self.expr(b, x, ty, j, memo);
                match op {
                    UnOp::Neg => b.ins().fneg(x),
                    UnOp::Abs => b.ins().fabs(x),
                    UnOp::Sqrt => b.ins().sqrt(x),
                    UnOp::Recip => {
                        let one = self.fconst(b, 1.0, ty);
                        b.ins().fdiv(one, x)
                    }
                    UnOp::Relu => {
                        let z = self.fconst(b, 0.0, ty);
                        let gt = b.ins().fcmp(FloatCC::GreaterThan, x, z);
                        select(b, gt, x, z, ty)
                    }
                    UnOp::FiniteOrZero => {
                        let z = self.fconst(b, 0.0, ty);
                        let d = b.ins().fsub(x, x);
                        let fin = b.ins().fcmp(FloatCC::Equal, d, z);
                        select(b, fin, x, z, ty)
                    }
                    _ => crate::vmath::unary(b, op, x, ty),
                }
            }
        };
        memo.insert(id, v);
        v
    }
}
