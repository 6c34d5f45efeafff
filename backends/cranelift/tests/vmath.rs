//! Accuracy of the JIT's inline transcendentals against their f64 definitions (the contract
//! in `kiln_runtime::executor::vmath::accuracy`: ulp bounds over a dense sweep of f32 bit
//! patterns plus edge cases, special values exact), in the vector body and the scalar tail
//! alike.

use kiln_ir::{Dim, Tensor, ValueId};
use kiln_plan::{Expr, InnerAccess, LoopKernel, UnOp};
use kiln_runtime::executor::vmath::accuracy::{self, sweep_inputs, Worst, OPS};

fn jit(op: UnOp, xs: &[f32]) -> Vec<f32> {
    let mut k = LoopKernel::new(vec![Dim::Fixed(xs.len() as u64)]);
    let x = k.load(ValueId(0), InnerAccess::Contiguous);
    let y = k.push(Expr::Un(op, x));
    k.outputs.push((ValueId(1), y));
    let f = kiln_cranelift::compile_loop(&k).expect("compiles");
    let t = Tensor::from_vec(vec![xs.len()], xs.to_vec());
    let out = f.run(&[&t]).expect("runs");
    out[0].as_slice::<f32>().unwrap().to_vec()
}

/// The largest ulp error over the sweep, and where; special values must match exactly.
fn max_ulp(op: UnOp) -> Worst {
    let xs = sweep_inputs();
    let got = jit(op, &xs);
    let worst = accuracy::max_ulp(op, &xs, &got).unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "{op:?}: max {:.3} ulp at x = {:e} (got {:e}, exact {:e})",
        worst.0, worst.1, worst.2, worst.3
    );
    worst
}

#[test]
fn transcendentals_are_within_their_ulp_bounds() {
    let failures: Vec<String> = OPS
        .iter()
        .filter_map(|&(op, bound)| {
            let w = max_ulp(op);
            (w.0 > bound).then(|| format!("{op:?}: {w:?} exceeds {bound} ulp"))
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn vector_lanes_and_scalar_tail_agree_bitwise() {
    // 4k + 3 elements: the last three run in the scalar tail; each value appears at every
    // lane position and in the tail.
    let vals = [0.3f32, -2.7, 40.0, -90.0, 1e-3, 7.5, -0.9];
    for op in [UnOp::Exp, UnOp::Log, UnOp::Tanh, UnOp::Sigmoid, UnOp::Erf] {
        for &v in &vals {
            let xs = vec![v; 11];
            let got = jit(op, &xs);
            assert!(
                got.iter().all(|g| g.to_bits() == got[0].to_bits()),
                "{op:?}({v}) differs between lanes and tail: {got:?}"
            );
        }
    }
}
