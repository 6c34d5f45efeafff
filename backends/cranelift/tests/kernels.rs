//! Every JIT loop-kernel kind against the reference interpreter (and the portable kernel
//! evaluator) on random shapes: sizes that are not multiples of the vector width, a
//! symbolic leading dim bound to 1 or more, broadcast operands, and NaN/Inf inputs.

use kiln_ir::{Attr, Attrs, DType, Dim, Graph, GraphBuilder, OpKind, Shape, Tensor, TensorType};
use kiln_plan::Kernel;
use kiln_reference::{compare, Tolerance};
use kiln_runtime::executor::ReferenceRunner;
use proptest::prelude::*;

/// f32 kernels against the interpreter, which accumulates in f64: norms and softmax cancel,
/// so the error of a small element scales with the largest magnitude of the output, not its
/// own (an elementwise rtol failed on a layer_norm row of [-2.04, -0.034]).
const TOL: Tolerance = Tolerance::ScaledByMax {
    rel: 1e-4,
    abs: 1e-5,
};

/// Number of graph kinds `build` knows.
const KINDS: u8 = 17;

/// How the second operand broadcasts against x `[B, ..., n]`.
fn y_dims(x: &[Dim], mode: u8) -> Vec<Dim> {
    match mode % 4 {
        0 => x.to_vec(),
        1 => {
            let mut d = x.to_vec();
            *d.last_mut().unwrap() = Dim::Fixed(1);
            d
        }
        2 => vec![x.last().unwrap().clone()],
        _ => vec![],
    }
}

fn f32_ty(d: Vec<Dim>) -> TensorType {
    TensorType::new(DType::F32, Shape::new(d))
}

/// A `constant` node holding `t`.
fn konst(b: &mut GraphBuilder, name: &str, t: Tensor) -> kiln_ir::ValueId {
    let attrs = Attrs::new().with("value", Attr::Tensor(std::sync::Arc::new(t)));
    b.node(
        OpKind::Constant,
        attrs,
        vec![],
        vec![(name.into(), None)],
        "",
    )
    .unwrap()[0]
}

/// A graph of kind `kind` over x `[B, dims...]` and a broadcast operand y.
fn build(kind: u8, xd: &[Dim], mode: u8) -> Graph {
    let mut b = GraphBuilder::new("k");
    let x = b.input("x", f32_ty(xd.to_vec()));
    let y = b.input("y", f32_ty(y_dims(xd, mode)));
    let last = vec![xd.last().unwrap().clone()];
    let s = b.input("s", f32_ty(last.clone()));
    let bias = b.input("bias", f32_ty(last));
    let mut i = 0;
    let mut op = |b: &mut GraphBuilder, op: OpKind, attrs: Attrs, ins: Vec<kiln_ir::ValueId>| {
        i += 1;
        b.node(
            op,
            attrs,
            ins.into_iter().map(Some).collect(),
            vec![(format!("v{i}"), None)],
            "",
        )
        .unwrap()[0]
    };
    let no = Attrs::new;
    let out = match kind {
        0 => {
            let a = op(&mut b, OpKind::Add, no(), vec![x, y]);
            let r = op(&mut b, OpKind::Relu, no(), vec![a]);
            op(&mut b, OpKind::Mul, no(), vec![r, y])
        }
        1 => {
            let a = op(&mut b, OpKind::Mul, no(), vec![x, y]);
            op(&mut b, OpKind::Gelu, no(), vec![a])
        }
        2 => {
            let t = Attrs::new().with("approximate", Attr::Str("tanh".into()));
            let a = op(&mut b, OpKind::Sub, no(), vec![x, y]);
            op(&mut b, OpKind::Gelu, t, vec![a])
        }
        3 => {
            let a = op(&mut b, OpKind::Silu, no(), vec![x]);
            op(&mut b, OpKind::Mul, no(), vec![a, y])
        }
        4 => {
            let a = op(&mut b, OpKind::Add, no(), vec![x, y]);
            op(&mut b, OpKind::Softmax, no(), vec![a])
        }
        5 => op(&mut b, OpKind::LayerNorm, no(), vec![x, s, bias]),
        6 => {
            let a = op(&mut b, OpKind::Mul, no(), vec![x, y]);
            op(&mut b, OpKind::RmsNorm, no(), vec![a, s])
        }
        7 => {
            let a = op(&mut b, OpKind::Abs, no(), vec![x]);
            let e = op(&mut b, OpKind::Exp, no(), vec![a]);
            let l = op(&mut b, OpKind::Log, no(), vec![e]);
            let t = op(&mut b, OpKind::Tanh, no(), vec![y]);
            op(&mut b, OpKind::Sub, no(), vec![l, t])
        }
        8 => {
            let sg = op(&mut b, OpKind::Sigmoid, no(), vec![x]);
            let mx = op(&mut b, OpKind::Max, no(), vec![sg, y]);
            let mn = op(&mut b, OpKind::Min, no(), vec![x, y]);
            let ng = op(&mut b, OpKind::Neg, no(), vec![mn]);
            let ab = op(&mut b, OpKind::Abs, no(), vec![ng]);
            let sq = op(&mut b, OpKind::Sqrt, no(), vec![ab]);
            let rc = op(&mut b, OpKind::Reciprocal, no(), vec![mx]);
            op(&mut b, OpKind::Div, no(), vec![sq, rc])
        }
        9 => {
            // prologue (residual add), row op, epilogue (gelu), plus a second output
            let a = op(&mut b, OpKind::Add, no(), vec![x, y]);
            let ln = op(&mut b, OpKind::LayerNorm, no(), vec![a, s, bias]);
            let g = op(&mut b, OpKind::Gelu, no(), vec![ln]);
            return b.finish(vec![g, a]);
        }
        11 => {
            // leaky_relu, prelu (constant finite slope per column), hard_sigmoid, hard_swish.
            let al = Attrs::new().with("alpha", Attr::Float(0.3));
            let lr = op(&mut b, OpKind::LeakyRelu, al, vec![x]);
            let n = concrete(&[xd.last().unwrap().clone()], 1)[0];
            let slope = konst(
                &mut b,
                "slope",
                Tensor::from_vec(
                    vec![n],
                    (0..n).map(|i| 0.25 - 0.1 * i as f32).collect::<Vec<f32>>(),
                ),
            );
            let pr = op(&mut b, OpKind::PRelu, no(), vec![lr, slope]);
            let hs_attrs = Attrs::new()
                .with("alpha", Attr::Float(0.3))
                .with("beta", Attr::Float(0.4));
            let hs = op(&mut b, OpKind::HardSigmoid, hs_attrs, vec![y]);
            let hw = op(&mut b, OpKind::HardSwish, no(), vec![pr]);
            op(&mut b, OpKind::Add, no(), vec![hw, hs])
        }
        12 => {
            // softplus and mish (large |x| too: the inputs are scaled by 12), softsign.
            let k12 = konst(&mut b, "k12", Tensor::from_vec(vec![], vec![12.0f32]));
            let big = op(&mut b, OpKind::Mul, no(), vec![x, k12]);
            let sp = op(&mut b, OpKind::Softplus, no(), vec![big]);
            let mi = op(&mut b, OpKind::Mish, no(), vec![y]);
            let ss = op(&mut b, OpKind::Softsign, no(), vec![big]);
            let a = op(&mut b, OpKind::Add, no(), vec![sp, mi]);
            op(&mut b, OpKind::Sub, no(), vec![a, ss])
        }
        13 => {
            // selu and celu with non-default attributes, sign.
            let sa = Attrs::new()
                .with("alpha", Attr::Float(1.5))
                .with("gamma", Attr::Float(0.9));
            let se = op(&mut b, OpKind::Selu, sa, vec![x]);
            let ca = Attrs::new().with("alpha", Attr::Float(0.6));
            let ce = op(&mut b, OpKind::Celu, ca, vec![y]);
            let sg = op(&mut b, OpKind::Sign, no(), vec![x]);
            let a = op(&mut b, OpKind::Add, no(), vec![se, ce]);
            op(&mut b, OpKind::Mul, no(), vec![a, sg])
        }
        14 => {
            // clip with constant bounds, with only a max bound, and with graph-input bounds.
            let lo = konst(&mut b, "lo", Tensor::from_vec(vec![], vec![-0.5f32]));
            let hi = konst(&mut b, "hi", Tensor::from_vec(vec![1], vec![1.25f32]));
            let c1 = op(&mut b, OpKind::Clip, no(), vec![x, lo, hi]);
            // (A rank-0 bound: y may be rank 0, which a [1] bound would outrank.)
            let hi0 = konst(&mut b, "hi0", Tensor::from_vec(vec![], vec![1.25f32]));
            let c2 = b
                .node(
                    OpKind::Clip,
                    no(),
                    vec![Some(y), None, Some(hi0)],
                    vec![("c2".into(), None)],
                    "",
                )
                .unwrap()[0];
            let a = op(&mut b, OpKind::Add, no(), vec![c1, c2]);
            let blo = b.input("blo", f32_ty(vec![]));
            let bhi = b.input("bhi", f32_ty(vec![Dim::Fixed(1)]));
            op(&mut b, OpKind::Clip, no(), vec![a, blo, bhi])
        }
        15 => {
            // log_softmax on the last axis, after a broadcast add.
            let a = op(&mut b, OpKind::Add, no(), vec![x, y]);
            op(&mut b, OpKind::LogSoftmax, no(), vec![a])
        }
        16 => {
            // variadic sum and mean.
            let t = op(&mut b, OpKind::Tanh, no(), vec![x]);
            let su = op(&mut b, OpKind::Sum, no(), vec![x, y, t]);
            op(&mut b, OpKind::Mean, no(), vec![su, y])
        }
        _ => {
            // erf, and elu (linear attention's feature map) with a non-default alpha.
            let e = op(&mut b, OpKind::Erf, no(), vec![x]);
            let alpha = Attrs::new().with("alpha", Attr::Float(0.7));
            let el = op(&mut b, OpKind::Elu, alpha, vec![y]);
            op(&mut b, OpKind::Add, no(), vec![e, el])
        }
    };
    b.finish(vec![out])
}

/// Deterministic pseudo-random f32s in [-3, 3), with NaN/±Inf sprinkled in when asked.
fn data(shape: &[usize], seed: u64, specials: bool) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let u = (s >> 40) as f32 / (1u64 << 24) as f32;
            if specials && (s >> 20).is_multiple_of(11) {
                [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][((s >> 8) % 3) as usize]
            } else {
                u * 6.0 - 3.0
            }
        })
        .collect();
    Tensor::from_vec(shape.to_vec(), v)
}

fn concrete(d: &[Dim], b: usize) -> Vec<usize> {
    d.iter()
        .map(|d| match d {
            Dim::Fixed(f) => *f as usize,
            _ => b,
        })
        .collect()
}

fn check(kind: u8, dims: &[usize], batch: usize, mode: u8, seed: u64, specials: bool) {
    let mut xd = vec![Dim::Sym("B".into())];
    xd.extend(dims.iter().map(|&d| Dim::Fixed(d as u64)));
    let g = build(kind, &xd, mode);
    let exe = kiln_cranelift::compile(&g).expect("compiles");
    assert!(
        exe.plan()
            .kernels
            .iter()
            .all(|k| matches!(k, Kernel::Loop(_))),
        "kind {kind}: every node fuses into loop kernels: {:?}",
        exe.plan().kernels
    );
    assert!(exe.jit_kernel_count() >= 1);
    let names = ["x", "y", "s", "bias", "blo", "bhi"];
    let inputs: Vec<(&str, Tensor)> = g
        .inputs
        .iter()
        .zip(names)
        .enumerate()
        .map(|(i, (&v, n))| {
            let sh = concrete(g.ty(v).shape.dims().unwrap(), batch);
            (n, data(&sh, seed + i as u64, specials))
        })
        .collect();
    let want = kiln_ir::run_named(&g, &inputs).expect("interpreter");
    let got = exe.run_named(&inputs).expect("jit");
    let portable = exe
        .cpu_plan()
        .run_named(&inputs, &ReferenceRunner)
        .expect("portable");
    for (o, w) in want.iter().enumerate() {
        for (what, t) in [("jit", &got[o]), ("portable", &portable[o])] {
            let r = compare(t, w, TOL);
            assert!(
                r.ok,
                "kind {kind} {what} output {o} dims {dims:?} B={batch} mode {mode}: {r:?}\n got {:?}\nwant {:?}",
                t.to_f64s(),
                w.to_f64s()
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 160, ..ProptestConfig::default() })]

    #[test]
    fn jit_kernels_match_the_interpreter_on_random_shapes(
        kind in 0..KINDS,
        dims in proptest::collection::vec(1usize..13, 1..3),
        batch in 1usize..4,
        mode in 0u8..4,
        seed in 0u64..1000,
    ) {
        check(kind, &dims, batch, mode, seed, false);
    }

    #[test]
    fn jit_kernels_propagate_nan_and_inf_like_the_interpreter(
        kind in 0..KINDS,
        dims in proptest::collection::vec(1usize..10, 1..3),
        mode in 0u8..4,
        seed in 0u64..1000,
    ) {
        check(kind, &dims, 2, mode, seed, true);
    }
}

#[test]
fn clip_ignores_a_nan_bound_and_keeps_a_nan_input() {
    // Found by the property test in CI: a NaN bound from a graph input must leave x
    // unchanged (the interpreter's comparisons, and ONNX Runtime's), not make it NaN.
    check(14, &[1], 2, 0, 456, true);
    check(14, &[1, 2], 2, 3, 456, true);
}

#[test]
fn symbolic_dim_bound_to_one_and_odd_row_lengths_run() {
    for kind in 0..KINDS {
        for n in [1, 3, 4, 5, 7, 8, 9, 17] {
            check(kind, &[n], 1, 0, 7, false);
            check(kind, &[2, n], 1, 1, 9, false);
        }
    }
}

#[test]
fn unknown_input_shapes_at_run_time_are_errors_not_panics() {
    let xd = vec![Dim::Sym("B".into()), Dim::Fixed(5)];
    let g = build(0, &xd, 0);
    let exe = kiln_cranelift::compile(&g).unwrap();
    let ins = [
        ("x", data(&[2, 5], 1, false)),
        ("y", data(&[3, 5], 2, false)),
        ("s", data(&[5], 3, false)),
        ("bias", data(&[5], 4, false)),
    ];
    assert!(exe.run_named(&ins).is_err());
}

#[test]
fn executable_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<kiln_cranelift::JitExecutable>();
}

#[test]
fn row_split_results_are_bit_identical_for_any_thread_count() {
    use kiln_ir::ValueId;
    use kiln_plan::{BinOp, InnerAccess, LoopKernel, RedOp, UnOp};
    use kiln_runtime::executor::Serial;
    // softmax(x + y) * sigmoid(x) over 37 rows of 13 (odd row count and row length).
    let mut k = LoopKernel::new(vec![Dim::Fixed(37), Dim::Fixed(13)]);
    let x = k.load(ValueId(0), InnerAccess::Contiguous);
    let y = k.load(ValueId(1), InnerAccess::Broadcast);
    let a = k.bin(BinOp::Add, x, y);
    let m = k.reduce(RedOp::Max, a);
    let d = k.bin(BinOp::Sub, a, m);
    let e = k.un(UnOp::Exp, d);
    let s = k.reduce(RedOp::Sum, e);
    let p = k.bin(BinOp::Div, e, s);
    let g = k.un(UnOp::Sigmoid, x);
    let o = k.bin(BinOp::Mul, p, g);
    k.outputs.push((ValueId(2), o));
    let f = kiln_cranelift::compile_loop(&k).unwrap();
    let xt = data(&[37, 13], 5, true);
    let yt = data(&[37, 1], 6, false);
    let serial = f.run_split(&[&xt, &yt], &Serial).unwrap();
    for threads in [2, 3, 5] {
        let pool = kiln_runtime::pool::Pool::new(threads).unwrap();
        let par = f.run_split(&[&xt, &yt], &pool).unwrap();
        assert_eq!(
            serial[0]
                .as_slice::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect::<Vec<_>>(),
            par[0]
                .as_slice::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect::<Vec<_>>(),
            "{threads} threads"
        );
    }
    // And the split run matches the portable evaluator.
    let want = kiln_plan::eval::run_loop(&k, &[&xt, &yt]).unwrap();
    let r = compare(&serial[0], &want[0], TOL);
    assert!(r.ok, "{r:?}");
}

#[test]
fn a_kernel_equal_to_an_earlier_one_but_for_its_values_reuses_its_code() {
    // Two tanh·tanh kernels around a contraction (so they are two kernels), and a third
    // over another shape that must get code of its own.
    let g = kiln_ir::text::parse(
        "func @f(%x: f32[4, 8], %w: f32[8, 8], %v: f32[8, 4]) -> (f32[4, 8], f32[4, 4]) {
  %a = tanh %x
  %b = mul %a, %a
  %m = matmul %b, %w
  %c = tanh %m
  %d = mul %c, %c
  %n = matmul %d, %v
  %e = tanh %n
  %f = mul %e, %e
  return %d, %f
}
",
    )
    .unwrap();
    let exe = kiln_cranelift::compile(&g).unwrap();
    assert_eq!(exe.jit_kernel_count(), 3);
    assert_eq!(exe.reused_kernel_count(), 1);
    let ins = vec![
        data(&[4, 8], 1, false),
        data(&[8, 8], 2, false),
        data(&[8, 4], 3, false),
    ];
    let got = exe.run(ins.clone()).unwrap();
    let want = kiln_ir::run(&g, ins).unwrap();
    for (a, b) in got.iter().zip(&want) {
        assert!(compare(a, b, TOL).ok);
    }
}
