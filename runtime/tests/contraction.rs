//! Every CPU contraction routine (`executor::contraction`) against the interpreter's op on
//! random shapes: sizes off the 6/16/8 tile grid, dims of 1, batch broadcasting, transposes,
//! every epilogue combination, attention with causal / masks / grouped heads / kv cache,
//! patch convs; NaN propagation; bit-identical results across thread counts and runs; and the
//! `linear` GEMM on every micro-kernel this CPU has (avx512 / avx2 / portable, forced).

use kiln_ir::{Attr, Attrs, OpKind, Tensor};
use kiln_reference::{compare, Tolerance};
use kiln_runtime::executor::arena::Outputs;
use kiln_runtime::executor::contraction::{prepare_op, Prepared};
use kiln_runtime::native::gemm::{
    gemm, Activation, Epilogue, GemmConfig, Isa, MatMut, MatRef, PackedB, Rhs,
};
use kiln_runtime::pool::Pool;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// f32 kernels against the f64 interpreter: error relative to the output's scale.
const CONTRACTION_TOLERANCE: Tolerance = Tolerance::ScaledByMax {
    rel: 2e-5,
    abs: 1e-6,
};

fn rand_t(rng: &mut StdRng, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::from_vec(
        shape.to_vec(),
        (0..n)
            .map(|_| rng.gen_range(-1.0f32..1.0))
            .collect::<Vec<_>>(),
    )
}

/// Runs `op` both ways (weights constant when `const_w`) on 1 and 3 threads and checks
/// the result against the interpreter. Returns the kernel's output.
fn check(op: OpKind, attrs: &Attrs, ins: &[Option<&Tensor>], const_w: bool, what: &str) -> Tensor {
    let want = kiln_ir::ops::eval(op, attrs, ins).expect("interpreter")[0].clone();
    let prepared: Prepared =
        prepare_op(op, attrs, |i| if const_w && i == 1 { ins[1] } else { None })
            .unwrap_or_else(|| panic!("{what}: no routine"));
    let mut first: Option<Tensor> = None;
    for threads in [1, 3] {
        let pool = Pool::new(threads).unwrap();
        let got = prepared
            .run(ins, &pool, &mut Outputs::none())
            .unwrap_or_else(|| panic!("{what}: routine declined"))
            .unwrap_or_else(|e| panic!("{what}: {e}"))
            .remove(0);
        let r = compare(&got, &want, CONTRACTION_TOLERANCE);
        assert!(r.ok, "{what} ({threads} threads): {r:?}");
        if let Some(f) = &first {
            assert_eq!(bits(f), bits(&got), "{what}: thread count changed the bits");
        }
        first = Some(got);
    }
    first.unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.as_slice::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

/// A size that is often 1 and often off the 6/16/8 grid.
fn dim(rng: &mut StdRng, max: usize) -> usize {
    match rng.gen_range(0..4) {
        0 => 1,
        _ => rng.gen_range(1..=max),
    }
}

#[test]
fn matmul_flat_and_batched_with_broadcasting() {
    let mut rng = StdRng::seed_from_u64(1);
    for case in 0..60 {
        let (m, k, n) = (dim(&mut rng, 40), dim(&mut rng, 70), dim(&mut rng, 50));
        let b1 = dim(&mut rng, 3);
        // [B, M, K] x [K, N]: one (B·M) x K GEMM, weight packed or plain.
        let a = rand_t(&mut rng, &[b1, m, k]);
        let w = rand_t(&mut rng, &[k, n]);
        check(
            OpKind::MatMul,
            &Attrs::new(),
            &[Some(&a), Some(&w)],
            case % 2 == 0,
            "flat",
        );
        // [K] x [K, N].
        let v = rand_t(&mut rng, &[k]);
        check(
            OpKind::MatMul,
            &Attrs::new(),
            &[Some(&v), Some(&w)],
            true,
            "vector",
        );
        // [B, H, M, K] x [1|B, H, K, N].
        let h = dim(&mut rng, 3);
        let a4 = rand_t(&mut rng, &[b1, h, m, k]);
        let bb = if rng.gen_bool(0.5) { 1 } else { b1 };
        let b4 = rand_t(&mut rng, &[bb, h, k, n]);
        check(
            OpKind::MatMul,
            &Attrs::new(),
            &[Some(&a4), Some(&b4)],
            false,
            "batched",
        );
        // [M, K] x [H, K, N]: A broadcast over the batch.
        let a2 = rand_t(&mut rng, &[m, k]);
        let b3 = rand_t(&mut rng, &[h, k, n]);
        check(
            OpKind::MatMul,
            &Attrs::new(),
            &[Some(&a2), Some(&b3)],
            false,
            "bcast A",
        );
    }
}

#[test]
fn linear_every_epilogue_combination_and_activation() {
    let mut rng = StdRng::seed_from_u64(2);
    let acts = ["none", "relu", "gelu", "gelu_tanh", "silu"];
    for case in 0..160 {
        let (b, s, k, n) = (
            dim(&mut rng, 2),
            dim(&mut rng, 30),
            dim(&mut rng, 60),
            dim(&mut rng, 40),
        );
        let x = rand_t(&mut rng, &[b, s, k]);
        let w = rand_t(&mut rng, &[k, n]);
        let bias = [None, Some(vec![n]), Some(vec![1, n]), Some(vec![1])][case % 4].clone();
        let scale = [None, Some(vec![b, s, 1]), Some(vec![s, 1])][(case / 4) % 3].clone();
        let resid = [None, Some(vec![b, s, n]), Some(vec![n])][(case / 12) % 3].clone();
        let act = acts[(case / 36 + case) % 5];
        let bias = bias.map(|sh| rand_t(&mut rng, &sh));
        let scale = scale.map(|sh| rand_t(&mut rng, &sh));
        let resid = resid.map(|sh| rand_t(&mut rng, &sh));
        let attrs = Attrs::new().with("activation", Attr::Str(act.into()));
        let ins = [
            Some(&x),
            Some(&w),
            bias.as_ref(),
            scale.as_ref(),
            resid.as_ref(),
        ];
        check(
            OpKind::Linear,
            &attrs,
            &ins,
            case % 3 != 0,
            &format!("linear case {case} {act}"),
        );
    }
}

#[test]
fn linear_activation_over_a_wide_input_range() {
    // Large |x| reaches the activations' saturated tails.
    let mut rng = StdRng::seed_from_u64(3);
    for act in ["gelu", "gelu_tanh", "silu"] {
        let x = Tensor::from_vec(
            vec![37, 5],
            (0..185)
                .map(|_| rng.gen_range(-4.0f32..4.0))
                .collect::<Vec<_>>(),
        );
        let w = rand_t(&mut rng, &[5, 23]);
        let attrs = Attrs::new().with("activation", Attr::Str(act.into()));
        check(OpKind::Linear, &attrs, &[Some(&x), Some(&w)], true, act);
    }
}

#[test]
fn gemm_transposes_alpha_beta_and_c_shapes() {
    let mut rng = StdRng::seed_from_u64(4);
    for case in 0..64 {
        let (m, k, n) = (dim(&mut rng, 30), dim(&mut rng, 40), dim(&mut rng, 35));
        let (ta, tb) = (case % 2 == 1, (case / 2) % 2 == 1);
        let a = rand_t(&mut rng, &if ta { [k, m] } else { [m, k] });
        let b = rand_t(&mut rng, &if tb { [n, k] } else { [k, n] });
        let c = [None, Some(vec![n]), Some(vec![m, n]), Some(vec![m, 1])][(case / 4) % 4]
            .clone()
            .map(|sh| rand_t(&mut rng, &sh));
        let (alpha, beta) = if case % 16 < 8 {
            (1.0, 1.0)
        } else {
            (0.5, -2.0)
        };
        let attrs = Attrs::new()
            .with("transA", Attr::Int(ta as i64))
            .with("transB", Attr::Int(tb as i64))
            .with("alpha", Attr::Float(alpha))
            .with("beta", Attr::Float(beta));
        check(
            OpKind::Gemm,
            &attrs,
            &[Some(&a), Some(&b), c.as_ref()],
            case % 3 == 0,
            "gemm",
        );
    }
}

#[test]
fn attention_causal_masks_grouped_heads_and_kv_cache() {
    let mut rng = StdRng::seed_from_u64(5);
    for case in 0..80 {
        let b = dim(&mut rng, 2);
        let hkv = dim(&mut rng, 3);
        let hq = hkv * [1, 2, 4][case % 3];
        let s = dim(&mut rng, 40);
        // T > S: a kv cache; T < S exercises queries that see no key under causal.
        let t = if case % 4 == 0 {
            dim(&mut rng, 20)
        } else {
            s + dim(&mut rng, 90) - 1
        };
        let d = [64, 8, 13, 1][case % 4];
        let dv = if case % 5 == 0 { 7 } else { d };
        let q = rand_t(&mut rng, &[b, hq, s, d]);
        let k = rand_t(&mut rng, &[b, hkv, t, d]);
        let v = rand_t(&mut rng, &[b, hkv, t, dv]);
        let mask = match case % 3 {
            0 => None,
            1 => Some(rand_t(&mut rng, &[b, 1, 1, t])),
            _ => {
                let n = b * s * t;
                Some(Tensor::from_vec(
                    vec![b, 1, s, t],
                    (0..n).map(|_| rng.gen_bool(0.8)).collect::<Vec<_>>(),
                ))
            }
        };
        let mut attrs = Attrs::new().with("causal", Attr::Int((case % 2) as i64));
        if case % 7 == 0 {
            attrs.set("scale", Attr::Float(0.3));
        }
        let causal = case % 2 == 1;
        let all_masked_possible = (causal && t < s) || case % 3 == 2;
        let got = check(
            OpKind::Attention,
            &attrs,
            &[Some(&q), Some(&k), Some(&v), mask.as_ref()],
            false,
            &format!("attention case {case}"),
        );
        if !all_masked_possible {
            assert!(got.as_slice::<f32>().unwrap().iter().all(|x| x.is_finite()));
        }
    }
}

#[test]
fn attention_fully_masked_row_is_nan() {
    let mut rng = StdRng::seed_from_u64(6);
    let q = rand_t(&mut rng, &[1, 2, 3, 16]);
    let k = rand_t(&mut rng, &[1, 2, 5, 16]);
    let mut keep = vec![true; 15];
    keep[5..10].fill(false); // row 1 sees nothing
    let mask = Tensor::from_vec(vec![1, 1, 3, 5], keep);
    let got = check(
        OpKind::Attention,
        &Attrs::new(),
        &[Some(&q), Some(&k), Some(&k), Some(&mask)],
        false,
        "masked row",
    );
    let y = got.as_slice::<f32>().unwrap();
    assert!(y[16..32].iter().all(|x| x.is_nan()));
    assert!(y[..16].iter().chain(&y[32..48]).all(|x| x.is_finite()));
}

#[test]
fn patch_conv_matches_the_interpreter() {
    let mut rng = StdRng::seed_from_u64(7);
    for case in 0..12 {
        let p = [2, 3, 4, 16][case % 4];
        let (n, c, oc) = (dim(&mut rng, 2), dim(&mut rng, 3), dim(&mut rng, 20));
        let (h, w) = (p * dim(&mut rng, 5) + case % 2, p * dim(&mut rng, 5));
        let x = rand_t(&mut rng, &[n, c, h, w]);
        let wt = rand_t(&mut rng, &[oc, c, p, p]);
        let bias = (case % 3 != 0).then(|| rand_t(&mut rng, &[oc]));
        let pi = p as i64;
        let attrs = Attrs::new()
            .with("kernel_shape", Attr::Ints(vec![pi, pi]))
            .with("strides", Attr::Ints(vec![pi, pi]))
            .with("pads", Attr::Ints(vec![0; 4]))
            .with("dilations", Attr::Ints(vec![1, 1]))
            .with("group", Attr::Int(1));
        check(
            OpKind::Conv,
            &attrs,
            &[Some(&x), Some(&wt), bias.as_ref()],
            true,
            "conv",
        );
    }
    // Padding or a stride other than the kernel: the general prepared conv
    // (`native/conv_gemm.rs`), with the weight constant or not, dense, grouped and 1-D.
    let padded = Attrs::new()
        .with("strides", Attr::Ints(vec![2, 2]))
        .with("pads", Attr::Ints(vec![1, 0, 2, 1]));
    assert!(matches!(
        prepare_op(OpKind::Conv, &padded, |_| None),
        Some(Prepared::Conv(_))
    ));
    let x = rand_t(&mut rng, &[2, 6, 9, 7]);
    for (attrs, w) in [
        (padded.clone(), rand_t(&mut rng, &[5, 6, 3, 3])),
        (
            padded.with("group", Attr::Int(3)),
            rand_t(&mut rng, &[9, 2, 3, 3]),
        ),
    ] {
        for const_w in [false, true] {
            check(
                OpKind::Conv,
                &attrs,
                &[Some(&x), Some(&w)],
                const_w,
                "padded conv",
            );
        }
    }
    let x1 = rand_t(&mut rng, &[3, 4, 50]);
    let w1 = rand_t(&mut rng, &[8, 4, 5]);
    let b1 = rand_t(&mut rng, &[8]);
    let a1 = Attrs::new()
        .with("dilations", Attr::Ints(vec![2]))
        .with("auto_pad", Attr::Str("SAME_UPPER".into()));
    check(
        OpKind::Conv,
        &a1,
        &[Some(&x1), Some(&w1), Some(&b1)],
        true,
        "conv1d",
    );
}

#[test]
fn nan_and_inf_inputs_propagate_like_the_interpreter() {
    let mut rng = StdRng::seed_from_u64(8);
    let mut x = rand_t(&mut rng, &[9, 20]);
    let mut xv = x.as_slice::<f32>().unwrap().to_vec();
    xv[3] = f32::NAN;
    xv[50] = f32::INFINITY;
    x = Tensor::from_vec(vec![9, 20], xv);
    let w = rand_t(&mut rng, &[20, 17]);
    let attrs = Attrs::new().with("activation", Attr::Str("gelu".into()));
    check(
        OpKind::Linear,
        &attrs,
        &[Some(&x), Some(&w)],
        true,
        "nan linear",
    );
    let mut q = rand_t(&mut rng, &[1, 1, 4, 8])
        .as_slice::<f32>()
        .unwrap()
        .to_vec();
    q[9] = f32::NAN;
    let q = Tensor::from_vec(vec![1, 1, 4, 8], q);
    let k = rand_t(&mut rng, &[1, 1, 6, 8]);
    check(
        OpKind::Attention,
        &Attrs::new(),
        &[Some(&q), Some(&k), Some(&k)],
        false,
        "nan attention",
    );
}

#[test]
fn unsupported_dtypes_are_declined_not_miscomputed() {
    let a = Tensor::from_vec(vec![2, 3], vec![1.0f64; 6]);
    let b = Tensor::from_vec(vec![3, 2], vec![1.0f64; 6]);
    let p = prepare_op(OpKind::MatMul, &Attrs::new(), |_| None).unwrap();
    assert!(p
        .run(&[Some(&a), Some(&b)], &Pool::single(), &mut Outputs::none())
        .is_none());
}

#[test]
fn results_are_bit_identical_across_runs_on_a_shared_pool() {
    let mut rng = StdRng::seed_from_u64(9);
    let x = rand_t(&mut rng, &[3, 130, 96]);
    let w = rand_t(&mut rng, &[96, 200]);
    let lin = prepare_op(OpKind::Linear, &Attrs::new(), |i| (i == 1).then_some(&w)).unwrap();
    let q = rand_t(&mut rng, &[1, 4, 70, 64]);
    let attn = prepare_op(OpKind::Attention, &Attrs::new(), |_| None).unwrap();
    let pool = Pool::new(4).unwrap();
    let run = |p: &Prepared, ins: &[Option<&Tensor>]| {
        bits(&p.run(ins, &pool, &mut Outputs::none()).unwrap().unwrap()[0])
    };
    let (l0, a0) = (
        run(&lin, &[Some(&x), Some(&w)]),
        run(&attn, &[Some(&q), Some(&q), Some(&q)]),
    );
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..10 {
                    assert_eq!(run(&lin, &[Some(&x), Some(&w)]), l0);
                    assert_eq!(run(&attn, &[Some(&q), Some(&q), Some(&q)]), a0);
                }
            });
        }
    });
}

/// The epilogue's f32 activations against the interpreter's f64 formulas, elementwise:
/// 1e-6 relative. The absolute slack covers the far negative tails (|y| < 1e-6), where an
/// exponent argument near 28 carries f32 rounding of ~1e-6 absolute (so ~2e-6 relative on a
/// value of 1e-9), and where the reference's own `1 + erf(·)` / `1 + tanh(·)` cancels in f64.
const ACTIVATION_TOLERANCE: Tolerance = Tolerance::AllClose {
    rtol: 1e-6,
    atol: 1e-12,
};

/// `gelu_tanh` for x < -3: `x / (1 + e^{-2u})` with `2u = 2·√(2/π)·(x + 0.044715·x³)`
/// up to ~30, whose f32 rounding (constants included) is ~1e-6 absolute, so ~3e-6 relative.
const GELU_TANH_TOLERANCE: Tolerance = Tolerance::AllClose {
    rtol: 4e-6,
    atol: 1e-12,
};

#[test]
fn epilogue_activations_match_the_f64_reference_to_1e_6() {
    // x·1 is exact, so the output is act(x) in f32 against act(x) in f64.
    let xs: Vec<f32> = (-2000..=2000).map(|i| i as f32 * 0.006).collect();
    let n = xs.len();
    let x = Tensor::from_vec(vec![n, 1], xs);
    let w = Tensor::from_vec(vec![1, 1], vec![1.0f32]);
    for (act, tol) in [
        ("relu", ACTIVATION_TOLERANCE),
        ("gelu", ACTIVATION_TOLERANCE),
        ("silu", ACTIVATION_TOLERANCE),
        ("gelu_tanh", GELU_TANH_TOLERANCE),
    ] {
        let attrs = Attrs::new().with("activation", Attr::Str(act.into()));
        let want = kiln_ir::ops::eval(OpKind::Linear, &attrs, &[Some(&x), Some(&w)]).unwrap();
        let p = prepare_op(OpKind::Linear, &attrs, |i| (i == 1).then_some(&w)).unwrap();
        let got = p
            .run(&[Some(&x), Some(&w)], &Pool::single(), &mut Outputs::none())
            .unwrap()
            .unwrap();
        let r = compare(&got[0], &want[0], tol);
        assert!(r.ok, "{act}: {r:?}");
    }
}

/// Runs `linear` (x [m,k] · w [k,n] + bias, activation, + residual) through the public GEMM
/// with the micro-kernel forced to `isa`.
fn linear_on(
    isa: Isa,
    x: &Tensor,
    w: &Tensor,
    bias: &Tensor,
    resid: &Tensor,
    act: Activation,
    threads: usize,
) -> Tensor {
    let (m, k) = (x.shape()[0], x.shape()[1]);
    let n = w.shape()[1];
    let packed = PackedB::pack_for(
        MatRef::row_major(w.as_slice::<f32>().unwrap(), k, n).unwrap(),
        isa,
    )
    .unwrap();
    let mut out = vec![0.0f32; m * n];
    let ep = Epilogue {
        row_scale: None,
        bias: Some(bias.as_slice::<f32>().unwrap()),
        activation: act,
        residual: Some(MatRef::row_major(resid.as_slice::<f32>().unwrap(), m, n).unwrap()),
    };
    gemm(
        MatRef::row_major(x.as_slice::<f32>().unwrap(), m, k).unwrap(),
        Rhs::Packed(&packed),
        MatMut::row_major(&mut out, m, n).unwrap(),
        &ep,
        &GemmConfig { threads, isa },
    )
    .unwrap();
    Tensor::from_vec(vec![m, n], out)
}

#[test]
fn every_available_gemm_kernel_matches_the_interpreters_linear() {
    let mut rng = StdRng::seed_from_u64(11);
    let acts = [
        ("none", Activation::None),
        ("relu", Activation::Relu),
        ("gelu", Activation::GeluErf),
        ("gelu_tanh", Activation::GeluTanh),
        ("silu", Activation::Silu),
    ];
    // Off every tile grid (6×16, 12×32), with M = 1, K = 1 and N = 1 among them.
    let shapes = [
        (1, 1, 1),
        (1, 300, 77),
        (13, 1, 33),
        (25, 47, 1),
        (29, 65, 513),
        (130, 33, 70),
    ];
    for isa in Isa::available() {
        for &(m, k, n) in &shapes {
            for (name, act) in acts {
                let x = rand_t(&mut rng, &[m, k]);
                let w = rand_t(&mut rng, &[k, n]);
                let bias = rand_t(&mut rng, &[n]);
                let resid = rand_t(&mut rng, &[m, n]);
                let attrs = Attrs::new().with("activation", Attr::Str(name.into()));
                let ins = [Some(&x), Some(&w), Some(&bias), None, Some(&resid)];
                let want = kiln_ir::ops::eval(OpKind::Linear, &attrs, &ins).unwrap();
                let one = linear_on(isa, &x, &w, &bias, &resid, act, 1);
                let r = compare(&one, &want[0], CONTRACTION_TOLERANCE);
                assert!(r.ok, "{isa:?} {m}x{k}x{n} {name}: {r:?}");
                let two = linear_on(isa, &x, &w, &bias, &resid, act, 2);
                assert_eq!(
                    bits(&one),
                    bits(&two),
                    "{isa:?} {m}x{k}x{n} {name}: threads"
                );
            }
        }
    }
}

#[test]
fn every_available_gemm_kernel_meets_the_activation_tolerances() {
    // x·1 + 0 is exact, so the output is act(x) in f32 against act(x) in f64.
    let xs: Vec<f32> = (-2000..=2000).map(|i| i as f32 * 0.006).collect();
    let n = xs.len();
    let x = Tensor::from_vec(vec![n, 1], xs);
    let w = Tensor::from_vec(vec![1, 1], vec![1.0f32]);
    let zero_b = Tensor::from_vec(vec![1], vec![0.0f32]);
    let zero_r = Tensor::from_vec(vec![n, 1], vec![0.0f32; n]);
    for isa in Isa::available() {
        for (name, act, tol) in [
            ("relu", Activation::Relu, ACTIVATION_TOLERANCE),
            ("gelu", Activation::GeluErf, ACTIVATION_TOLERANCE),
            ("silu", Activation::Silu, ACTIVATION_TOLERANCE),
            ("gelu_tanh", Activation::GeluTanh, GELU_TANH_TOLERANCE),
        ] {
            let attrs = Attrs::new().with("activation", Attr::Str(name.into()));
            let want = kiln_ir::ops::eval(OpKind::Linear, &attrs, &[Some(&x), Some(&w)]).unwrap();
            let got = linear_on(isa, &x, &w, &zero_b, &zero_r, act, 1);
            let r = compare(&got, &want[0], tol);
            assert!(r.ok, "{isa:?} {name}: {r:?}");
        }
    }
}

#[test]
fn linear_runs_a_residual_in_either_slot_natively() {
    // The optimiser may fuse a full residual into the bias slot and leave a per-column shift
    // in the residual slot; with no activation both run natively (never the interpreter).
    let mut rng = StdRng::seed_from_u64(9);
    let (x, w) = (rand_t(&mut rng, &[2, 5, 7]), rand_t(&mut rng, &[7, 6]));
    let full = rand_t(&mut rng, &[2, 5, 6]);
    let col = rand_t(&mut rng, &[6]);
    let rows = rand_t(&mut rng, &[5, 1]);
    let scale = rand_t(&mut rng, &[2, 5, 1]);
    let cases: [(&str, [Option<&Tensor>; 5]); 5] = [
        (
            "full in bias",
            [Some(&x), Some(&w), Some(&full), None, None],
        ),
        (
            "column in residual",
            [Some(&x), Some(&w), None, None, Some(&col)],
        ),
        (
            "column in residual, row scale",
            [Some(&x), Some(&w), None, Some(&scale), Some(&col)],
        ),
        (
            "full in bias, row scale",
            [Some(&x), Some(&w), Some(&full), Some(&scale), None],
        ),
        (
            "row-broadcast residual",
            [Some(&x), Some(&w), Some(&col), None, Some(&rows)],
        ),
    ];
    for (what, ins) in cases {
        for const_w in [false, true] {
            check(OpKind::Linear, &Attrs::new(), &ins, const_w, what);
        }
    }
}
