//! LLVM code generation for loop kernels: one function per kernel that processes a run of
//! `m` rows, `void f(const float **ins, float **outs, int64_t n, int64_t m, const int64_t
//! *in_strides)` (the Cranelift backend's ABI, `RowFn`): row `r` reads input `i` at
//! `ins[i] + r * in_strides[i]` and writes output `o` at `outs[o] + r * n`.
//! Each pass over a row (one per reduction, then the store pass) is an explicit
//! `<8 x float>` loop over `n & !7` elements followed by a `<1 x float>` tail loop, so
//! the order of every reduction is fixed by the code (four `<8 x float>` accumulators over
//! `n & !31`, combined pairwise, then one over the rest of `n & !7`, then its lanes combined
//! in order) rather than by the optimiser. fmul/fadd/fsub carry only the
//! `contract` flag (FMA fusion); no flag that changes results otherwise is set.
//! Transcendentals are inline branch-free polynomials ([`crate::vmath`]), emitted from one
//! instruction sequence for both widths, so vector lanes and the tail agree bitwise.

use crate::vmath;
use inkwell::builder::Builder;
use inkwell::context::Context;
use inkwell::module::{Linkage, Module};
use inkwell::types::VectorType;
use inkwell::values::FastMathFlags;
use inkwell::values::{
    FloatValue, FunctionValue, InstructionValue, IntValue, PointerValue, VectorValue,
};
use inkwell::FloatPredicate;
use kiln_plan::{BinOp, Expr, ExprId, InnerAccess, LoopKernel, RedOp, UnOp};
use std::collections::HashMap;

/// Lanes of the main loop. On AVX targets this is one ymm register; on SSE-only targets
/// LLVM splits it into two xmm halves (same results: the lane order is part of the IR).
pub const LANES: u32 = 8;
/// Independent accumulators of a row reduction (the add latency over its throughput).
const UNROLL: u32 = 4;

type R<T> = Result<T, String>;

use vmath::e;

/// Marks a float instruction as contractable (FMA fusion allowed, nothing else).
fn contract(v: VectorValue) -> VectorValue {
    if let Some(i) = v.as_instruction() {
        let _ = i.set_fast_math_flags(FastMathFlags::AllowContract);
    }
    v
}

fn contract_scalar(v: FloatValue) -> FloatValue {
    let i: Option<InstructionValue> = v.as_instruction();
    if let Some(i) = i {
        let _ = i.set_fast_math_flags(FastMathFlags::AllowContract);
    }
    v
}

/// Per-function generation state.
struct Gen<'a, 'ctx> {
    cx: &'ctx Context,
    module: &'a Module<'ctx>,
    b: &'a Builder<'ctx>,
    k: &'a LoopKernel,
    func: FunctionValue<'ctx>,
    in_ptrs: Vec<PointerValue<'ctx>>,
    n: IntValue<'ctx>,
    red: Vec<FloatValue<'ctx>>,
}

impl<'a, 'ctx> Gen<'a, 'ctx> {
    fn vty(&self, lanes: u32) -> VectorType<'ctx> {
        self.cx.f32_type().vec_type(lanes)
    }

    fn splat(&self, s: FloatValue<'ctx>, lanes: u32) -> R<VectorValue<'ctx>> {
        let i32t = self.cx.i32_type();
        let undef = self.vty(lanes).get_undef();
        let v = self
            .b
            .build_insert_element(undef, s, i32t.const_zero(), "")
            .map_err(e)?;
        if lanes == 1 {
            return Ok(v);
        }
        let mask = VectorType::const_vector(&vec![i32t.const_zero(); lanes as usize]);
        self.b
            .build_shuffle_vector(v, undef, mask, "splat")
            .map_err(e)
    }

    fn fconst(&self, c: f32, lanes: u32) -> VectorValue<'ctx> {
        let f = self.cx.f32_type().const_float(c as f64);
        VectorType::const_vector(&vec![f; lanes as usize])
    }

    fn intrinsic(&self, name: &str, args: &[VectorValue<'ctx>]) -> R<VectorValue<'ctx>> {
        vmath::call_intrinsic(self.module, self.b, name, args)
    }

    fn select(
        &self,
        mask: VectorValue<'ctx>,
        x: VectorValue<'ctx>,
        y: VectorValue<'ctx>,
    ) -> R<VectorValue<'ctx>> {
        Ok(self
            .b
            .build_select(mask, x, y, "")
            .map_err(e)?
            .into_vector_value())
    }

    /// Address of element `j` of input/output row pointer `p`.
    fn elem_ptr(&self, p: PointerValue<'ctx>, j: IntValue<'ctx>) -> R<PointerValue<'ctx>> {
        // SAFETY (of the generated code): `j < n` and every row pointer covers `n` floats.
        unsafe {
            self.b
                .build_in_bounds_gep(self.cx.f32_type(), p, &[j], "")
                .map_err(e)
        }
    }

    fn expr(
        &self,
        id: ExprId,
        lanes: u32,
        j: IntValue<'ctx>,
        memo: &mut HashMap<ExprId, VectorValue<'ctx>>,
    ) -> R<VectorValue<'ctx>> {
        if let Some(&v) = memo.get(&id) {
            return Ok(v);
        }
        let b = self.b;
        let f32t = self.cx.f32_type();
        let v = match self.k.exprs[id] {
            Expr::Load(i) => match self.k.inputs[i].inner {
                InnerAccess::Contiguous => {
                    let at = self.elem_ptr(self.in_ptrs[i], j)?;
                    let v = b
                        .build_load(self.vty(lanes), at, "")
                        .map_err(e)?
                        .into_vector_value();
                    if let Some(ins) = v.as_instruction() {
                        ins.set_alignment(4).map_err(e)?;
                    }
                    v
                }
                InnerAccess::Broadcast => {
                    let s = b
                        .build_load(f32t, self.in_ptrs[i], "")
                        .map_err(e)?
                        .into_float_value();
                    self.splat(s, lanes)?
                }
            },
            Expr::Const(c) => self.fconst(c, lanes),
            Expr::RowLen => {
                let s = b.build_signed_int_to_float(self.n, f32t, "").map_err(e)?;
                self.splat(s, lanes)?
            }
            Expr::Reduced(r) => self.splat(self.red[r], lanes)?,
            Expr::Bin(op, x, y) => {
                let x = self.expr(x, lanes, j, memo)?;
                let y = self.expr(y, lanes, j, memo)?;
                match op {
                    BinOp::Add => contract(b.build_float_add(x, y, "").map_err(e)?),
                    BinOp::Sub => contract(b.build_float_sub(x, y, "").map_err(e)?),
                    BinOp::Mul => contract(b.build_float_mul(x, y, "").map_err(e)?),
                    BinOp::Div => b.build_float_div(x, y, "").map_err(e)?,
                    // NaN-propagating, as the kernel IR defines them.
                    BinOp::Max => self.intrinsic("llvm.maximum", &[x, y])?,
                    BinOp::Min => self.intrinsic("llvm.minimum", &[x, y])?,
                    BinOp::ClampBelow | BinOp::ClampAbove => {
                        let p = match op {
                            BinOp::ClampBelow => FloatPredicate::OLT,
                            _ => FloatPredicate::OGT,
                        };
                        let c = b.build_float_compare(p, x, y, "").map_err(e)?;
                        self.select(c, y, x)?
                    }
                }
            }
            Expr::Un(op, x) => {
                let x = self.expr(x, lanes, j, memo)?;
                match op {
                    UnOp::Neg => b.build_float_neg(x, "").map_err(e)?,
                    UnOp::Abs => self.intrinsic("llvm.fabs", &[x])?,
                    UnOp::Sqrt => self.intrinsic("llvm.sqrt", &[x])?,
                    UnOp::Recip => b
                        .build_float_div(self.fconst(1.0, lanes), x, "")
                        .map_err(e)?,
                    UnOp::Relu => {
                        let z = self.fconst(0.0, lanes);
                        let gt = b
                            .build_float_compare(FloatPredicate::OGT, x, z, "")
                            .map_err(e)?;
                        self.select(gt, x, z)?
                    }
                    UnOp::FiniteOrZero => {
                        let a = self.intrinsic("llvm.fabs", &[x])?;
                        let inf = self.fconst(f32::INFINITY, lanes);
                        let fin = b
                            .build_float_compare(FloatPredicate::OLT, a, inf, "")
                            .map_err(e)?;
                        self.select(fin, x, self.fconst(0.0, lanes))?
                    }
                    // exp, log, tanh, sigmoid, erf: inline, the same sequence at every width.
                    _ if vmath::is_transcendental(op) => {
                        vmath::unary(self.cx, self.module, b, op, x)?
                    }
                    _ => return Err(format!("no lowering of {op:?}")),
                }
            }
        };
        memo.insert(id, v);
        Ok(v)
    }

    /// Emits `for j in (lo..hi).step_by(step)` carrying vector accumulators `init`;
    /// returns their final values, leaving the builder in the exit block.
    fn emit_loop(
        &self,
        lo: IntValue<'ctx>,
        hi: IntValue<'ctx>,
        step: u32,
        init: &[VectorValue<'ctx>],
        mut body: impl FnMut(IntValue<'ctx>, &[VectorValue<'ctx>]) -> R<Vec<VectorValue<'ctx>>>,
    ) -> R<Vec<VectorValue<'ctx>>> {
        let b = self.b;
        let i64t = self.cx.i64_type();
        let pre = b.get_insert_block().ok_or("builder not positioned")?;
        let header = self.cx.append_basic_block(self.func, "header");
        let body_blk = self.cx.append_basic_block(self.func, "body");
        let exit = self.cx.append_basic_block(self.func, "exit");
        b.build_unconditional_branch(header).map_err(e)?;
        b.position_at_end(header);
        let jphi = b.build_phi(i64t, "j").map_err(e)?;
        jphi.add_incoming(&[(&lo, pre)]);
        let mut phis = vec![];
        for v in init {
            let p = b.build_phi(v.get_type(), "acc").map_err(e)?;
            p.add_incoming(&[(v, pre)]);
            phis.push(p);
        }
        let j = jphi.as_basic_value().into_int_value();
        let accs: Vec<VectorValue> = phis
            .iter()
            .map(|p| p.as_basic_value().into_vector_value())
            .collect();
        let more = b
            .build_int_compare(inkwell::IntPredicate::SLT, j, hi, "")
            .map_err(e)?;
        b.build_conditional_branch(more, body_blk, exit)
            .map_err(e)?;
        b.position_at_end(body_blk);
        let next = body(j, &accs)?;
        let j2 = b
            .build_int_add(j, i64t.const_int(step as u64, false), "")
            .map_err(e)?;
        let end = b.get_insert_block().ok_or("builder not positioned")?;
        jphi.add_incoming(&[(&j2, end)]);
        for (p, v) in phis.iter().zip(&next) {
            p.add_incoming(&[(v, end)]);
        }
        b.build_unconditional_branch(header).map_err(e)?;
        b.position_at_end(exit);
        Ok(accs)
    }

    fn combine(
        &self,
        op: RedOp,
        acc: VectorValue<'ctx>,
        x: VectorValue<'ctx>,
    ) -> R<VectorValue<'ctx>> {
        match op {
            RedOp::Sum => Ok(contract(self.b.build_float_add(acc, x, "").map_err(e)?)),
            // `x > acc ? x : acc`: NaN elements are skipped.
            RedOp::Max => {
                let gt = self
                    .b
                    .build_float_compare(FloatPredicate::OGT, x, acc, "")
                    .map_err(e)?;
                self.select(gt, x, acc)
            }
        }
    }

    fn combine_scalar(
        &self,
        op: RedOp,
        acc: FloatValue<'ctx>,
        x: FloatValue<'ctx>,
    ) -> R<FloatValue<'ctx>> {
        match op {
            RedOp::Sum => Ok(contract_scalar(
                self.b.build_float_add(acc, x, "").map_err(e)?,
            )),
            RedOp::Max => {
                let gt = self
                    .b
                    .build_float_compare(FloatPredicate::OGT, x, acc, "")
                    .map_err(e)?;
                Ok(self
                    .b
                    .build_select(gt, x, acc, "")
                    .map_err(e)?
                    .into_float_value())
            }
        }
    }
}

/// Defines the row function of `k` as `name` (internal linkage) in `module`.
pub fn define<'ctx>(
    cx: &'ctx Context,
    module: &Module<'ctx>,
    k: &LoopKernel,
    name: &str,
) -> R<FunctionValue<'ctx>> {
    let ptr = cx.ptr_type(inkwell::AddressSpace::default());
    let i64t = cx.i64_type();
    let fty = cx.void_type().fn_type(
        &[ptr.into(), ptr.into(), i64t.into(), i64t.into(), ptr.into()],
        false,
    );
    let func = module.add_function(name, fty, Some(Linkage::Internal));
    let nounwind = cx.create_enum_attribute(
        inkwell::attributes::Attribute::get_named_enum_kind_id("nounwind"),
        0,
    );
    func.add_attribute(inkwell::attributes::AttributeLoc::Function, nounwind);
    let b = cx.create_builder();
    let entry = cx.append_basic_block(func, "entry");
    b.position_at_end(entry);
    let param = |i: u32| func.get_nth_param(i).ok_or("missing param");
    let ins = param(0)?.into_pointer_value();
    let outs = param(1)?.into_pointer_value();
    let n = param(2)?.into_int_value();
    let m = param(3)?.into_int_value();
    let strides = param(4)?.into_pointer_value();
    let load = |base: PointerValue<'ctx>, i: usize, ty: inkwell::types::BasicTypeEnum<'ctx>| {
        // SAFETY (of the generated code): the caller passes one pointer (and one stride) per
        // input, one pointer per output.
        let at = unsafe {
            b.build_in_bounds_gep(ty, base, &[i64t.const_int(i as u64, false)], "")
                .map_err(e)?
        };
        b.build_load(ty, at, "").map_err(e)
    };
    let in_bases = (0..k.inputs.len())
        .map(|i| Ok(load(ins, i, ptr.into())?.into_pointer_value()))
        .collect::<R<Vec<_>>>()?;
    let in_steps = (0..k.inputs.len())
        .map(|i| Ok(load(strides, i, i64t.into())?.into_int_value()))
        .collect::<R<Vec<_>>>()?;
    let out_bases = (0..k.outputs.len())
        .map(|i| Ok(load(outs, i, ptr.into())?.into_pointer_value()))
        .collect::<R<Vec<_>>>()?;
    // The run: for r in 0..m, one row.
    let header = cx.append_basic_block(func, "run");
    let body = cx.append_basic_block(func, "row");
    let exit = cx.append_basic_block(func, "done");
    b.build_unconditional_branch(header).map_err(e)?;
    b.position_at_end(header);
    let rphi = b.build_phi(i64t, "r").map_err(e)?;
    rphi.add_incoming(&[(&i64t.const_zero(), entry)]);
    let r = rphi.as_basic_value().into_int_value();
    let more = b
        .build_int_compare(inkwell::IntPredicate::SLT, r, m, "")
        .map_err(e)?;
    b.build_conditional_branch(more, body, exit).map_err(e)?;
    b.position_at_end(body);
    let f32t = cx.f32_type();
    let row_ptr = |base: PointerValue<'ctx>, step: IntValue<'ctx>| -> R<PointerValue<'ctx>> {
        let off = b.build_int_mul(r, step, "").map_err(e)?;
        // SAFETY (of the generated code): the caller's pointers cover all `m` rows.
        unsafe { b.build_gep(f32t, base, &[off], "").map_err(e) }
    };
    let in_ptrs = in_bases
        .iter()
        .zip(&in_steps)
        .map(|(&p, &st)| row_ptr(p, st))
        .collect::<R<Vec<_>>>()?;
    let out_ptrs = out_bases
        .iter()
        .map(|&p| row_ptr(p, n))
        .collect::<R<Vec<_>>>()?;
    emit_row(cx, module, &b, k, func, in_ptrs, &out_ptrs, n)?;
    let r2 = b
        .build_int_add(r, i64t.const_int(1, false), "")
        .map_err(e)?;
    let end = b.get_insert_block().ok_or("builder not positioned")?;
    rphi.add_incoming(&[(&r2, end)]);
    b.build_unconditional_branch(header).map_err(e)?;
    b.position_at_end(exit);
    b.build_return(None).map_err(e)?;
    if !func.verify(false) {
        return Err(format!("LLVM rejected the function {name}"));
    }
    Ok(func)
}

/// Emits one row of `k` (its reduction passes, then the store pass) reading inputs at
/// `in_ptrs` and writing outputs at `out_ptrs`; the builder is left after the row.
#[allow(clippy::too_many_arguments)]
fn emit_row<'ctx>(
    cx: &'ctx Context,
    module: &Module<'ctx>,
    b: &Builder<'ctx>,
    k: &LoopKernel,
    func: FunctionValue<'ctx>,
    in_ptrs: Vec<PointerValue<'ctx>>,
    out_ptrs: &[PointerValue<'ctx>],
    n: IntValue<'ctx>,
) -> R<()> {
    let i64t = cx.i64_type();
    let nv = b
        .build_and(n, i64t.const_int(!(LANES as u64 - 1), true), "nv")
        .map_err(e)?;
    let nu = b
        .build_and(
            n,
            i64t.const_int(!((UNROLL * LANES) as u64 - 1), true),
            "nu",
        )
        .map_err(e)?;
    let zero = i64t.const_zero();
    let mut g = Gen {
        cx,
        module,
        b,
        k,
        func,
        in_ptrs,
        n,
        red: vec![],
    };
    let i32t = cx.i32_type();
    for rd in &k.reductions {
        let id = match rd.op {
            RedOp::Sum => 0.0f32,
            RedOp::Max => f32::NEG_INFINITY,
        };
        let init = g.fconst(id, LANES);
        // UNROLL independent accumulators over UNROLL·8 elements per iteration (one chain
        // waited on every add), combined pairwise, then single vectors up to `nv`.
        let inits = [init; UNROLL as usize];
        let accs = g.emit_loop(zero, nu, UNROLL * LANES, &inits, |j, a| {
            (0..UNROLL)
                .map(|u| {
                    let ju = b
                        .build_int_add(j, i64t.const_int((u * LANES) as u64, false), "")
                        .map_err(e)?;
                    let x = g.expr(rd.arg, LANES, ju, &mut HashMap::new())?;
                    g.combine(rd.op, a[u as usize], x)
                })
                .collect()
        })?;
        let lo = g.combine(rd.op, accs[0], accs[1])?;
        let hi = g.combine(rd.op, accs[2], accs[3])?;
        let init = g.combine(rd.op, lo, hi)?;
        let acc = g.emit_loop(nu, nv, LANES, &[init], |j, a| {
            let x = g.expr(rd.arg, LANES, j, &mut HashMap::new())?;
            Ok(vec![g.combine(rd.op, a[0], x)?])
        })?[0];
        let mut h = b
            .build_extract_element(acc, i32t.const_zero(), "")
            .map_err(e)?
            .into_float_value();
        for l in 1..LANES {
            let x = b
                .build_extract_element(acc, i32t.const_int(l as u64, false), "")
                .map_err(e)?
                .into_float_value();
            h = g.combine_scalar(rd.op, h, x)?;
        }
        let h1 = g.splat(h, 1)?;
        let acc = g.emit_loop(nv, n, 1, &[h1], |j, a| {
            let x = g.expr(rd.arg, 1, j, &mut HashMap::new())?;
            Ok(vec![g.combine(rd.op, a[0], x)?])
        })?[0];
        let s = b
            .build_extract_element(acc, i32t.const_zero(), "")
            .map_err(e)?
            .into_float_value();
        g.red.push(s);
    }
    for (lanes, lo, hi) in [(LANES, zero, nv), (1, nv, n)] {
        g.emit_loop(lo, hi, lanes, &[], |j, _| {
            let mut memo = HashMap::new();
            for (o, &(_, ex)) in k.outputs.iter().enumerate() {
                let v = g.expr(ex, lanes, j, &mut memo)?;
                let at = g.elem_ptr(out_ptrs[o], j)?;
                let st = b.build_store(at, v).map_err(e)?;
                st.set_alignment(4).map_err(e)?;
            }
            Ok(vec![])
        })?;
    }
    Ok(())
}
