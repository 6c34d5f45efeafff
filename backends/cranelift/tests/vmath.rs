//! The JIT's inline transcendentals: the same bits as `kiln_plan::vmath`'s scalar recipe on a
//! dense sweep of f32 bit patterns, random values and edge cases (so the JIT, the AOT backend
//! and the runtime's kernels agree), and within the accuracy contract of
//! `kiln_plan::vmath::accuracy` (ulp bounds against f64, special values exact), in the vector
//! body and the scalar tail alike; and the runtime's AVX2/AVX-512 vector math, which the JIT
//! leaves a kernel's root transcendental to, gives the same bits as the inline code.

use kiln_ir::{Dim, Tensor, ValueId};
use kiln_plan::vmath::accuracy::{self, random_inputs, same_bits, sweep_inputs, Worst, OPS};
use kiln_plan::vmath::Func;
use kiln_plan::{Expr, InnerAccess, LoopKernel, UnOp};

/// `op` over `xs` as the JIT computes it: inline Cranelift code, and (where this CPU has
/// AVX2 or AVX-512) the runtime's vector math applied to the kernel's output root. Both
/// must give the same bits; the inline result is returned.
fn jit(op: UnOp, xs: &[f32]) -> Vec<f32> {
    let mut k = LoopKernel::new(vec![Dim::Fixed(xs.len() as u64)]);
    let x = k.load(ValueId(0), InnerAccess::Contiguous);
    let y = k.push(Expr::Un(op, x));
    k.outputs.push((ValueId(1), y));
    let t = Tensor::from_vec(vec![xs.len()], xs.to_vec());
    let run = |f: kiln_cranelift::LoopFn| {
        let out = f.run(&[&t]).expect("runs");
        out[0].as_slice::<f32>().unwrap().to_vec()
    };
    let inline = run(kiln_cranelift::compile_loop_inline(&k).expect("compiles"));
    let f = kiln_cranelift::compile_loop(&k).expect("compiles");
    assert_eq!(
        f.post_map(),
        wide_isa().then(|| func(op)),
        "{op:?}: the root transcendental goes to the runtime exactly where AVX2 or AVX-512 is"
    );
    let mapped = run(f);
    if let Some(i) = (0..xs.len()).find(|&i| inline[i].to_bits() != mapped[i].to_bits()) {
        panic!(
            "{op:?}({:e}): inline {:e}, post-mapped {:e}",
            xs[i], inline[i], mapped[i]
        );
    }
    inline
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
    for (op, _) in OPS {
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

/// Whether this CPU has AVX2+FMA or AVX-512F, where the JIT maps root transcendentals with
/// the runtime's routines.
fn wide_isa() -> bool {
    use kiln_runtime::native::vmath::Isa;
    Isa::Avx2.available() || Isa::Avx512.available()
}

/// The vector-math function a transcendental op computes.
fn func(op: UnOp) -> Func {
    Func::of(op).unwrap_or_else(|| unreachable!("{op:?} is not transcendental"))
}

#[test]
fn jit_bits_equal_the_scalar_recipe() {
    let mut xs = sweep_inputs();
    xs.extend(random_inputs(50_000, 5));
    // Keep a scalar tail.
    if xs.len().is_multiple_of(4) {
        xs.push(0.3);
    }
    let failures: Vec<String> = OPS
        .iter()
        .filter_map(|&(op, _)| same_bits("JIT", func(op), &xs, &jit(op, &xs)).err())
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn jit_silu_and_gelu_tanh_equal_the_scalar_recipe() {
    // The graph ops lowered to loop kernels (x·sigmoid(x); x·sigmoid(2c(x + a x³))), compiled.
    let mut xs = random_inputs(20_000, 9);
    xs.extend(accuracy::EDGES);
    let n = xs.len();
    for (f, src) in [
        (Func::Silu, "silu %x"),
        (Func::GeluTanh, "gelu %x {approximate = \"tanh\"}"),
        (Func::GeluErf, "gelu %x"),
    ] {
        let g: kiln_ir::Graph =
            format!("func @t(%x: f32[{n}]) -> f32[{n}] {{\n  %y = {src}\n  return %y\n}}\n")
                .parse()
                .expect("test graph parses");
        let plan = kiln_plan::partition(&g).expect("partitions");
        let k = plan
            .kernels
            .iter()
            .find_map(|k| match k {
                kiln_plan::Kernel::Loop(l) => Some(l),
                _ => None,
            })
            .expect("a loop kernel");
        let t = Tensor::from_vec(vec![n], xs.clone());
        let mapped = kiln_cranelift::compile_loop(k).expect("compiles");
        // silu is x·sigmoid(x) in the loop IR and goes to the runtime whole; the gelus keep
        // an outer product or are one op.
        if f == Func::Silu || f == Func::GeluErf {
            assert_eq!(mapped.post_map(), wide_isa().then_some(f), "{src}");
        }
        for f_jit in [
            mapped,
            kiln_cranelift::compile_loop_inline(k).expect("compiles"),
        ] {
            let out = f_jit.run(&[&t]).expect("runs");
            same_bits("JIT", f, &xs, out[0].as_slice::<f32>().unwrap()).unwrap();
        }
    }
}

#[test]
fn a_kernel_that_only_maps_its_input_gives_the_inline_bits_at_every_shape() {
    // Such a kernel runs as one pass from the input into the output (`vmath::map_raw`),
    // run by run: long rows, short rows that `bind` folds, ragged lengths, one element.
    for shape in [
        vec![6usize, 33],
        vec![5, 16],
        vec![3, 5, 17],
        vec![4, 3, 9],
        vec![2, 3000],
        vec![1],
    ] {
        let numel: usize = shape.iter().product();
        let xs: Vec<f32> = random_inputs(numel, 5)
            .into_iter()
            .map(|x| x.clamp(-30.0, 30.0))
            .collect();
        let t = Tensor::from_vec(shape.clone(), xs);
        for f in [Func::Exp, Func::Tanh, Func::Silu, Func::GeluErf] {
            let mut k = LoopKernel::new(shape.iter().map(|&d| Dim::Fixed(d as u64)).collect());
            let x = k.load(ValueId(0), InnerAccess::Contiguous);
            let y = match f {
                Func::Silu => {
                    let s = k.push(Expr::Un(UnOp::Sigmoid, x));
                    k.push(Expr::Bin(kiln_plan::BinOp::Mul, x, s))
                }
                Func::Exp => k.push(Expr::Un(UnOp::Exp, x)),
                Func::Tanh => k.push(Expr::Un(UnOp::Tanh, x)),
                _ => k.push(Expr::Un(UnOp::Gelu, x)),
            };
            k.outputs.push((ValueId(1), y));
            let want = kiln_cranelift::compile_loop_inline(&k)
                .expect("compiles")
                .run(&[&t])
                .expect("runs");
            let mapped = kiln_cranelift::compile_loop(&k).expect("compiles");
            assert_eq!(mapped.post_map(), wide_isa().then_some(f), "{f:?}");
            let got = mapped.run(&[&t]).expect("runs");
            assert_eq!(got[0].shape(), shape.as_slice(), "{f:?}");
            let (g, w) = (
                got[0].as_slice::<f32>().unwrap(),
                want[0].as_slice::<f32>().unwrap(),
            );
            if let Some(i) = (0..g.len()).find(|&i| g[i].to_bits() != w[i].to_bits()) {
                panic!(
                    "{f:?} over {shape:?}: element {i} mapped {:e}, inline {:e}",
                    g[i], w[i]
                );
            }
        }
    }
}
