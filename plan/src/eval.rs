//! The portable reference evaluator of loop kernels: plain Rust, one element at a time,
//! in the same order of operations as the JIT's scalar path (transcendentals by
//! the [`crate::vmath`] recipes, so its bits are the compiled kernels').

use crate::layout::LoopShape;
use crate::loop_ir::{Expr, InnerAccess, LoopKernel, RedOp};
use kiln_ir::Tensor;

/// Runs `k` on `inputs` (one per kernel input), returning its outputs in order.
pub fn run_loop(k: &LoopKernel, inputs: &[&Tensor]) -> Result<Vec<Tensor>, String> {
    let ls = LoopShape::bind(k, inputs)?;
    let data: Vec<&[f32]> = inputs
        .iter()
        .map(|t| t.as_slice::<f32>().ok_or("loop kernel input is not f32"))
        .collect::<Result<_, _>>()?;
    let mut outs: Vec<Vec<f32>> = vec![vec![0.0; ls.numel()]; k.outputs.len()];
    let n = ls.n;
    let mut vals = vec![0.0f32; k.exprs.len()];
    let mut red = vec![0.0f32; k.reductions.len()];
    let eval_at = |vals: &mut [f32], red: &[f32], offs: &[usize], j: usize, upto: usize| {
        for (i, e) in k.exprs.iter().enumerate().take(upto) {
            vals[i] = match *e {
                Expr::Load(x) => {
                    let at = match k.inputs[x].inner {
                        InnerAccess::Contiguous => offs[x] + j,
                        InnerAccess::Broadcast => offs[x],
                    };
                    data[x].get(at).copied().unwrap_or(f32::NAN)
                }
                Expr::Const(c) => c,
                Expr::RowLen => n as f32,
                Expr::Reduced(r) => red.get(r).copied().unwrap_or(f32::NAN),
                Expr::Un(op, a) => crate::vmath::scalar::unary(op, vals[a]),
                Expr::Bin(op, a, b) => op.apply(vals[a], vals[b]),
            };
        }
    };
    ls.for_each_row(|row, offs| {
        for (r, rd) in k.reductions.iter().enumerate() {
            let mut acc = match rd.op {
                RedOp::Sum => 0.0f32,
                RedOp::Max => f32::NEG_INFINITY,
            };
            for j in 0..n {
                eval_at(&mut vals, &red, offs, j, rd.arg + 1);
                let x = vals[rd.arg];
                acc = match rd.op {
                    RedOp::Sum => acc + x,
                    RedOp::Max if x > acc => x,
                    RedOp::Max => acc,
                };
            }
            red[r] = acc;
        }
        for j in 0..n {
            eval_at(&mut vals, &red, offs, j, k.exprs.len());
            for (o, &(_, e)) in outs.iter_mut().zip(&k.outputs) {
                o[row * n + j] = vals[e];
            }
        }
    });
    Ok(outs
        .into_iter()
        .map(|v| Tensor::from_vec(ls.shape.clone(), v))
        .collect())
}
