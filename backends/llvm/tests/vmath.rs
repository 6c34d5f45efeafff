//! Accuracy of the AOT backend's inline transcendentals (`src/vmath.rs`) against their f64
//! definitions, over a dense sweep of f32 bit patterns (every `SWEEP_STEP`-th, both signs)
//! plus edge cases, run through a compiled library's loop kernels (vector body and 1-lane
//! tail alike); special values must match exactly; lanes and tail agree bitwise; and the
//! AOT results equal `kiln_plan::vmath`'s scalar recipe and the Cranelift JIT's bit for bit
//! (one recipe, the same roundings). Errors are in
//! units in the last place of the exact result (subnormal results count in units of the
//! smallest subnormal).

use kiln_ir::{Dim, Tensor, ValueId};
use kiln_llvm::{build_library, AotLibrary, BuildOptions};
use kiln_plan::vmath::accuracy::{
    self, random_inputs, same_bits, sweep_inputs, Worst, ERF_MAX_ULP, EXP_MAX_ULP, GELU_MAX_ULP,
    LOG_MAX_ULP, SIGMOID_MAX_ULP, SOFTPLUS_MAX_ULP, TANH_MAX_ULP,
};
use kiln_plan::vmath::Func;
use kiln_plan::{Expr, InnerAccess, LoopKernel, UnOp};

/// The ops in the order of the test graph's outputs, with their text-form names and bounds.
const OPS: [(UnOp, &str, f64); 7] = [
    (UnOp::Exp, "exp", EXP_MAX_ULP),
    (UnOp::Log, "log", LOG_MAX_ULP),
    (UnOp::Tanh, "tanh", TANH_MAX_ULP),
    (UnOp::Sigmoid, "sigmoid", SIGMOID_MAX_ULP),
    (UnOp::Erf, "erf", ERF_MAX_ULP),
    (UnOp::Gelu, "gelu", GELU_MAX_ULP),
    (UnOp::Softplus, "softplus", SOFTPLUS_MAX_ULP),
];

/// The vector-math function of each op of [`OPS`].
const FUNCS: [Func; 7] = [
    Func::Exp,
    Func::Log,
    Func::Tanh,
    Func::Sigmoid,
    Func::Erf,
    Func::GeluErf,
    Func::Softplus,
];

fn inputs() -> Vec<f32> {
    let mut v = sweep_inputs();
    v.extend(random_inputs(20_000, 13));
    // Keep a tail: the last `len % 8` elements run in the 1-lane loop.
    if v.len().is_multiple_of(8) {
        v.push(0.3);
    }
    v
}

/// Compiles a library with one input of `shape` and one output per op of [`OPS`] (loop
/// kernels over rows of the last dimension), and runs it on `xs`.
fn aot(xs: &[f32], shape: &[usize]) -> Vec<Vec<f32>> {
    let n = xs.len();
    assert_eq!(n, shape.iter().product::<usize>());
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let ty = format!("f32[{}]", dims.join(", "));
    let outs: Vec<String> = OPS.iter().map(|_| ty.clone()).collect();
    let mut src = format!("func @t(%x: {ty}) -> ({}) {{\n", outs.join(", "));
    for (_, name, _) in OPS {
        src += &format!("  %{name} = {name} %x\n");
    }
    let names: Vec<String> = OPS.iter().map(|(_, n, _)| format!("%{n}")).collect();
    src += &format!("  return {}\n}}\n", names.join(", "));
    let g: kiln_ir::Graph = src.parse().expect("test graph parses");
    let tmp = tempfile::tempdir().unwrap();
    let lib = tmp.path().join("libvmath.so");
    let r = build_library(&g, &lib, &BuildOptions::default()).expect("builds");
    assert!(r.loop_kernels >= 1, "expected loop kernels");
    let mut l = AotLibrary::load(&lib, None).expect("loads");
    let t = Tensor::from_vec(shape.to_vec(), xs.to_vec());
    let got = l.run(&[t]).expect("runs");
    assert_eq!(got.len(), OPS.len());
    got.iter()
        .map(|t| t.as_slice::<f32>().unwrap().to_vec())
        .collect()
}

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

/// The largest ulp error of `got` over `xs`, and where; special values must match exactly.
fn max_ulp(op: UnOp, xs: &[f32], got: &[f32]) -> Worst {
    let worst = accuracy::max_ulp(op, xs, got).unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "AOT {op:?}: max {:.3} ulp at x = {:e} (got {:e}, exact {:e})",
        worst.0, worst.1, worst.2, worst.3
    );
    worst
}

#[test]
fn transcendentals_are_within_their_ulp_bounds_and_match_the_jit() {
    let xs = inputs();
    let got = aot(&xs, &[xs.len()]);
    let mut failures = vec![];
    for (((op, _, bound), g), f) in OPS.iter().zip(&got).zip(FUNCS) {
        if let Err(d) = same_bits("AOT", f, &xs, g) {
            failures.push(d);
        }
        let w = max_ulp(*op, &xs, g);
        if w.0 > *bound {
            failures.push(format!("{op:?}: {w:?} exceeds {bound} ulp"));
        }
        // Same constants, same operation order, no contraction: the JIT's bits exactly.
        let j = jit(*op, &xs);
        let differ = xs
            .iter()
            .zip(g.iter().zip(&j))
            .filter(|(_, (a, b))| a.to_bits() != b.to_bits() && !(a.is_nan() && b.is_nan()))
            .map(|(x, (a, b))| (*x, *a, *b))
            .collect::<Vec<_>>();
        if !differ.is_empty() {
            failures.push(format!(
                "{op:?}: {} inputs differ from the JIT, first (x, aot, jit) = {:?}",
                differ.len(),
                &differ[..differ.len().min(4)]
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn vector_lanes_and_scalar_tail_agree_bitwise() {
    // Rows of 8 + 3 copies of one value: the last three run in the 1-lane tail; each value
    // appears at every lane position and in the tail.
    const ROW: usize = 11;
    let vals = [
        0.3f32, -2.7, 40.0, -90.0, 1e-3, 7.5, -0.9, 1e-40, -103.5, 88.5,
    ];
    let xs: Vec<f32> = vals.iter().flat_map(|&v| [v; ROW]).collect();
    let got = aot(&xs, &[vals.len(), ROW]);
    for ((op, _, _), out) in OPS.iter().zip(&got) {
        for (v, row) in vals.iter().zip(out.chunks(ROW)) {
            assert!(
                row.iter().all(|g| g.to_bits() == row[0].to_bits()),
                "{op:?}({v}) differs between lanes and tail: {row:?}"
            );
        }
    }
}
