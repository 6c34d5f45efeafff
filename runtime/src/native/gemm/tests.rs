//! GEMM against a naive f64 triple loop with the `linear` epilogue, over random shapes,
//! strides, epilogues, thread counts and both micro-kernels; plus the API's error cases.

use super::*;
use proptest::prelude::*;
use rand::{rngs::StdRng, Rng, SeedableRng};

/// Allowed error per element, per accumulated term, relative to the result's magnitude
/// (`|s|·Σ|a·b| + |bias| + |residual| + 1`): about 8 f32 ulps per term of the dot product,
/// which also covers the f32 activations (≤ 4e-6 relative).
const GEMM_TOL_PER_TERM: f64 = 1e-6;

fn erf64(x: f64) -> f64 {
    // Series near zero, continued fraction for erfc in the tails (accurate to ~1e-14).
    let a = x.abs();
    let r = if a < 2.5 {
        let (mut term, mut sum, mut n) = (a, a, 0.0);
        loop {
            n += 1.0;
            term *= -a * a / n;
            let t = term / (2.0 * n + 1.0);
            sum += t;
            if t.abs() <= 1e-17 * sum.abs() || n > 100.0 {
                break;
            }
        }
        sum * std::f64::consts::FRAC_2_SQRT_PI
    } else {
        let mut k = a;
        for i in (1..80).rev() {
            k = a + (i as f64 / 2.0) / k;
        }
        1.0 - (-a * a).exp() / std::f64::consts::PI.sqrt() / k
    };
    r.copysign(x)
}

fn act64(act: Activation, x: f64) -> f64 {
    match act {
        Activation::None => x,
        Activation::Relu => {
            if x > 0.0 {
                x
            } else {
                0.0
            }
        }
        Activation::GeluErf => 0.5 * x * (1.0 + erf64(x / std::f64::consts::SQRT_2)),
        Activation::GeluTanh => {
            let c = (2.0 / std::f64::consts::PI).sqrt();
            0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
        }
        Activation::Silu => x / (1.0 + (-x).exp()),
    }
}

const ACTS: [Activation; 5] = [
    Activation::None,
    Activation::Relu,
    Activation::GeluErf,
    Activation::GeluTanh,
    Activation::Silu,
];

/// One random problem: dense data plus the strides used to view it.
#[derive(Debug, Clone)]
struct Case {
    m: usize,
    n: usize,
    k: usize,
    seed: u64,
    a_col_major: bool,
    b_col_major: bool,
    pad: usize,
    prepack: bool,
    scale: bool,
    bias: bool,
    residual: bool,
    act: usize,
    threads: usize,
}

fn case(max_m: usize, max_n: usize, max_k: usize) -> impl Strategy<Value = Case> {
    (
        (1..=max_m, 1..=max_n, 0..=max_k, any::<u64>()),
        (any::<bool>(), any::<bool>(), 0..3usize, any::<bool>()),
        (
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            0..5usize,
            1..=3usize,
        ),
    )
        .prop_map(
            |(
                (m, n, k, seed),
                (a_col_major, b_col_major, pad, prepack),
                (scale, bias, residual, act, threads),
            )| Case {
                m,
                n,
                k,
                seed,
                a_col_major,
                b_col_major,
                pad,
                prepack,
                scale,
                bias,
                residual,
                act,
                threads,
            },
        )
}

fn rand_vec(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
}

/// Storage for a `rows × cols` matrix, row- or column-major with `pad` extra per line.
fn layout(rows: usize, cols: usize, col_major: bool, pad: usize) -> (usize, usize, usize) {
    let (rs, cs) = if col_major {
        (1, rows + pad)
    } else {
        (cols + pad, 1)
    };
    let len = if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * rs + (cols - 1) * cs + 1
    };
    (rs, cs, len)
}

fn run_case(c: &Case, isa: Isa) -> Result<(), TestCaseError> {
    if std::env::var_os("GEMM_TRACE").is_some() {
        eprintln!("{c:?} {isa:?}");
    }
    let mut rng = StdRng::seed_from_u64(c.seed);
    let (m, n, k) = (c.m, c.n, c.k);
    let (ars, acs, alen) = layout(m, k, c.a_col_major, c.pad);
    let (brs, bcs, blen) = layout(k, n, c.b_col_major, c.pad);
    let (rrs, rcs, rlen) = layout(m, n, c.a_col_major, c.pad);
    let a = rand_vec(&mut rng, alen);
    let b = rand_vec(&mut rng, blen);
    let scale = rand_vec(&mut rng, m);
    let bias = rand_vec(&mut rng, n);
    let res = rand_vec(&mut rng, rlen);
    let ldc = n + c.pad;
    let mut out = vec![f32::NAN; (m - 1) * ldc + n];
    let av = MatRef::new(&a, m, k, ars, acs).unwrap();
    let bv = MatRef::new(&b, k, n, brs, bcs).unwrap();
    let packed = PackedB::pack_for(bv, isa).unwrap();
    let rhs = if c.prepack {
        Rhs::Packed(&packed)
    } else {
        Rhs::Plain(bv)
    };
    let act = ACTS[c.act];
    let ep = Epilogue {
        row_scale: c.scale.then_some(&scale[..]),
        bias: c.bias.then_some(&bias[..]),
        activation: act,
        residual: c
            .residual
            .then(|| MatRef::new(&res, m, n, rrs, rcs).unwrap()),
    };
    let cfg = GemmConfig {
        threads: c.threads,
        isa,
    };
    gemm(
        av,
        rhs,
        MatMut::new(&mut out, m, n, ldc).unwrap(),
        &ep,
        &cfg,
    )
    .unwrap();
    for i in 0..m {
        for j in 0..n {
            let (mut acc, mut mag) = (0.0f64, 0.0f64);
            for p in 0..k {
                let t = a[i * ars + p * acs] as f64 * b[p * brs + j * bcs] as f64;
                acc += t;
                mag += t.abs();
            }
            if c.scale {
                acc *= scale[i] as f64;
                mag *= (scale[i] as f64).abs();
            }
            if c.bias {
                acc += bias[j] as f64;
                mag += (bias[j] as f64).abs();
            }
            acc = act64(act, acc);
            if c.residual {
                acc += res[i * rrs + j * rcs] as f64;
                mag += (res[i * rrs + j * rcs] as f64).abs();
            }
            let got = out[i * ldc + j] as f64;
            let tol = GEMM_TOL_PER_TERM * (k as f64 + 8.0) * (1.0 + mag);
            prop_assert!(
                (got - acc).abs() <= tol,
                "C[{i},{j}] = {got}, want {acc} (tol {tol}) in {c:?}"
            );
        }
    }
    // The padding between output rows is never written.
    for i in 0..m.saturating_sub(1) {
        for j in n..ldc {
            prop_assert!(out[i * ldc + j].is_nan(), "wrote padding C[{i},{j}]");
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, max_shrink_iters: 256, ..ProptestConfig::default() })]

    #[test]
    fn native_kernel_matches_f64_reference(c in case(40, 70, 300)) {
        run_case(&c, Isa::Auto)?;
    }

    #[test]
    fn every_available_kernel_matches_f64_reference(c in case(30, 80, 300)) {
        for isa in Isa::available() {
            run_case(&c, isa)?;
        }
    }

    #[test]
    fn portable_kernel_matches_f64_reference(c in case(40, 70, 300)) {
        run_case(&c, Isa::Portable)?;
    }

    #[test]
    fn tiny_shapes_match_f64_reference(c in case(13, 33, 3)) {
        for isa in Isa::available() {
            run_case(&c, isa)?;
        }
    }
}

fn fixed(m: usize, n: usize, k: usize, threads: usize) -> Case {
    Case {
        m,
        n,
        k,
        seed: (m * 31 + n * 7 + k) as u64,
        a_col_major: false,
        b_col_major: false,
        pad: 1,
        prepack: true,
        scale: true,
        bias: true,
        residual: true,
        act: 4,
        threads,
    }
}

#[test]
fn epilogue_after_several_slabs_matches_reference_for_every_activation() {
    // AVX-512's full-width tiles of the assembly loop take the epilogue in registers, after
    // adding what the earlier K slabs left in C (K over 1.5·KC: slabs of KC, KC and 5); the
    // 16-column edge panel stores first and runs it in memory. Every activation, A in place
    // and packed (a column-major A, with a strided residual that falls back too).
    for isa in Isa::available() {
        for act in 0..ACTS.len() {
            for a_col_major in [false, true] {
                let mut c = fixed(29, 2 * avx512::NR + 16, 2 * avx512::KC + 5, 1 + act % 2);
                c.act = act;
                c.a_col_major = a_col_major;
                run_case(&c, isa).unwrap();
            }
        }
    }
}

#[test]
fn blocks_larger_than_mc_kc_and_nc_match_reference() {
    // Crosses the MC (rows), KC (depth) and NC (columns) block edges, one thread and two.
    for isa in Isa::available() {
        for threads in [1, 2] {
            run_case(&fixed(avx512::MC + 7, 40, 2 * avx512::KC + 3, threads), isa).unwrap();
            run_case(&fixed(3, NC + avx512::NR + 5, 9, threads), isa).unwrap();
            run_case(&fixed(50, 9, 20, threads), isa).unwrap();
        }
    }
}

#[test]
fn zero_depth_gives_the_epilogue_of_zero() {
    for isa in Isa::available() {
        run_case(&fixed(5, 20, 0, 2), isa).unwrap();
    }
}

#[test]
fn empty_outputs_are_ok() {
    let cfg = GemmConfig::default();
    let a = MatRef::row_major(&[], 0, 4).unwrap();
    let b = PackedB::from_row_major(&[0.0; 8], 4, 2).unwrap();
    gemm(
        a,
        Rhs::Packed(&b),
        MatMut::row_major(&mut [], 0, 2).unwrap(),
        &Epilogue::default(),
        &cfg,
    )
    .unwrap();
}

#[test]
fn gemm_matches_the_interpreters_linear_op() {
    use kiln_ir::{ops, Attr, Attrs, OpKind, Tensor};
    let (m, n, k) = (9, 21, 33);
    let mut rng = StdRng::seed_from_u64(7);
    let (x, w, b, s, r) = (
        rand_vec(&mut rng, m * k),
        rand_vec(&mut rng, k * n),
        rand_vec(&mut rng, n),
        rand_vec(&mut rng, m),
        rand_vec(&mut rng, m * n),
    );
    for (name, act) in [
        ("none", Activation::None),
        ("relu", Activation::Relu),
        ("gelu", Activation::GeluErf),
        ("gelu_tanh", Activation::GeluTanh),
        ("silu", Activation::Silu),
    ] {
        assert_eq!(Activation::from_name(name), Some(act));
        let mut attrs = Attrs::new();
        attrs.set("activation", Attr::Str(name.into()));
        let ts = [
            Tensor::from_vec(vec![m, k], x.clone()),
            Tensor::from_vec(vec![k, n], w.clone()),
            Tensor::from_vec(vec![n], b.clone()),
            Tensor::from_vec(vec![m, 1], s.clone()),
            Tensor::from_vec(vec![m, n], r.clone()),
        ];
        let ins: Vec<Option<&Tensor>> = ts.iter().map(Some).collect();
        let want = ops::eval(OpKind::Linear, &attrs, &ins)
            .unwrap()
            .remove(0)
            .to_f64s();
        let mut got = vec![0.0; m * n];
        let ep = Epilogue {
            row_scale: Some(&s),
            bias: Some(&b),
            activation: act,
            residual: Some(MatRef::row_major(&r, m, n).unwrap()),
        };
        gemm(
            MatRef::row_major(&x, m, k).unwrap(),
            Rhs::Packed(&PackedB::from_row_major(&w, k, n).unwrap()),
            MatMut::row_major(&mut got, m, n).unwrap(),
            &ep,
            &GemmConfig::default(),
        )
        .unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!((*g as f64 - w).abs() < 1e-4, "{name}: {g} vs {w}");
        }
    }
}

#[test]
fn bad_shapes_and_strides_are_errors() {
    let d = [0.0f32; 12];
    let mut o = [0.0f32; 12];
    assert!(matches!(
        MatRef::new(&d, 3, 4, 4, 2),
        Err(GemmError::OutOfBounds { .. })
    ));
    assert!(matches!(
        MatRef::new(&d, 2, 2, usize::MAX, 1),
        Err(GemmError::Overflow { .. })
    ));
    assert!(matches!(
        MatMut::new(&mut o, 3, 4, 3),
        Err(GemmError::OverlappingRows { .. })
    ));
    assert!(matches!(
        MatMut::new(&mut o, 3, 4, 5),
        Err(GemmError::OutOfBounds { .. })
    ));
    let a = MatRef::row_major(&d, 3, 4).unwrap();
    let b34 = MatRef::row_major(&d, 3, 4).unwrap();
    let b43 = PackedB::from_row_major(&d, 4, 3).unwrap();
    let cfg = GemmConfig::default();
    let ep = Epilogue::default();
    let mut c = [0.0f32; 9];
    let err = gemm(
        a,
        Rhs::Plain(b34),
        MatMut::row_major(&mut c, 3, 3).unwrap(),
        &ep,
        &cfg,
    );
    assert!(matches!(err, Err(GemmError::Mismatch { .. })), "{err:?}");
    let err = gemm(
        a,
        Rhs::Packed(&b43),
        MatMut::row_major(&mut o, 3, 4).unwrap(),
        &ep,
        &cfg,
    );
    assert!(matches!(err, Err(GemmError::Mismatch { .. })), "{err:?}");
    for bad in [
        Epilogue {
            bias: Some(&d[..4]),
            ..ep
        },
        Epilogue {
            row_scale: Some(&d[..2]),
            ..ep
        },
        Epilogue {
            residual: Some(MatRef::row_major(&d, 3, 4).unwrap()),
            ..ep
        },
    ] {
        let err = gemm(
            a,
            Rhs::Packed(&b43),
            MatMut::row_major(&mut c, 3, 3).unwrap(),
            &bad,
            &cfg,
        );
        assert!(matches!(err, Err(GemmError::Mismatch { .. })), "{err:?}");
    }
    let zero = GemmConfig { threads: 0, ..cfg };
    let err = gemm(
        a,
        Rhs::Packed(&b43),
        MatMut::row_major(&mut c, 3, 3).unwrap(),
        &ep,
        &zero,
    );
    assert_eq!(err, Err(GemmError::ZeroThreads));
}

#[test]
fn physical_cores_is_positive() {
    assert!(physical_cores() >= 1);
}

#[test]
fn edge_sizes_match_reference_on_every_kernel() {
    // Not multiples of any tile; K = 1; N = 1; M = 1 (the direct-row GEMV path); A in place
    // and packed; one and two threads.
    for isa in Isa::available() {
        for threads in [1, 2] {
            for (m, n, k) in [
                (1, 1, 1),
                (1, 777, 300),
                (1, 33, 1),
                (13, 1, 17),
                (25, 47, 1),
                (12, 32, 256),
                (11, 31, 257),
                (29, 65, 513),
                // Many panels (AVX-512 reads A in place across all of them), and tiles of
                // 8 to 12 rows (the assembly k loop) next to shorter ones.
                (29, 13 * avx512::NR + 5, 300),
                (8, 40, 70),
                (100, 70, 33),
            ] {
                for act in 0..ACTS.len() {
                    let mut c = fixed(m, n, k, threads);
                    c.act = act;
                    run_case(&c, isa).unwrap();
                }
            }
        }
    }
}

/// Runs one `linear`-shaped GEMM with gelu and every epilogue operand on `isa`.
fn run_linear(
    a: &[f32],
    w: &PackedB,
    m: usize,
    k: usize,
    n: usize,
    isa: Isa,
    threads: usize,
) -> Vec<f32> {
    let bias: Vec<f32> = (0..n).map(|j| (j as f32 * 0.37).sin()).collect();
    let scale: Vec<f32> = (0..m).map(|i| 1.0 + i as f32 * 0.01).collect();
    let res: Vec<f32> = (0..m * n).map(|x| (x as f32 * 0.11).cos()).collect();
    let mut out = vec![0.0f32; m * n];
    let ep = Epilogue {
        row_scale: Some(&scale),
        bias: Some(&bias),
        activation: Activation::GeluErf,
        residual: Some(MatRef::row_major(&res, m, n).unwrap()),
    };
    gemm(
        MatRef::row_major(a, m, k).unwrap(),
        Rhs::Packed(w),
        MatMut::row_major(&mut out, m, n).unwrap(),
        &ep,
        &GemmConfig { threads, isa },
    )
    .unwrap();
    out
}

#[test]
fn results_are_bit_identical_across_thread_counts() {
    let (m, k, n) = (61, 300, 203);
    let mut rng = StdRng::seed_from_u64(7);
    let a = rand_vec(&mut rng, m * k);
    let b = rand_vec(&mut rng, k * n);
    for isa in Isa::available() {
        let w = PackedB::pack_for(MatRef::row_major(&b, k, n).unwrap(), isa).unwrap();
        // Big enough per thread that every count really splits the work.
        let one = run_linear(&a, &w, m, k, n, isa, 1);
        for threads in [2, 3, 4] {
            let many = run_linear(&a, &w, m, k, n, isa, threads);
            let same = one
                .iter()
                .zip(&many)
                .all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "{isa:?}: {threads} threads differ from 1");
        }
    }
}

#[test]
fn nan_and_inf_propagate_on_every_kernel() {
    let (m, k, n) = (14, 5, 35);
    for isa in Isa::available() {
        for act in ACTS {
            let mut a = vec![1.0f32; m * k];
            a[3 * k + 2] = f32::NAN; // row 3 is NaN everywhere
            a[7 * k] = f32::INFINITY; // row 7: +inf·b
            let b: Vec<f32> = (0..k * n).map(|x| 0.5 + (x % 3) as f32).collect();
            let w = PackedB::pack_for(MatRef::row_major(&b, k, n).unwrap(), isa).unwrap();
            let mut out = vec![0.0f32; m * n];
            let ep = Epilogue {
                activation: act,
                ..Epilogue::default()
            };
            gemm(
                MatRef::row_major(&a, m, k).unwrap(),
                Rhs::Packed(&w),
                MatMut::row_major(&mut out, m, n).unwrap(),
                &ep,
                &GemmConfig { threads: 1, isa },
            )
            .unwrap();
            for j in 0..n {
                assert!(
                    out[3 * n + j].is_nan(),
                    "{isa:?} {act:?}: NaN lost at col {j}"
                );
                let y = out[7 * n + j];
                // Every activation maps +inf to +inf (silu/gelu: x·1).
                assert_eq!(
                    y,
                    f32::INFINITY,
                    "{isa:?} {act:?}: +inf became {y} at col {j}"
                );
                assert!(out[j].is_finite(), "{isa:?} {act:?}: finite row broke");
            }
        }
    }
}

#[test]
fn packed_b_only_runs_with_a_matching_kernel() {
    let b = vec![1.0f32; 4 * 3];
    let a = vec![1.0f32; 2 * 4];
    let isas = Isa::available();
    for &packed_for in &isas {
        let w = PackedB::pack_for(MatRef::row_major(&b, 4, 3).unwrap(), packed_for).unwrap();
        for &isa in isas.iter().chain(&[Isa::Auto]) {
            let mut out = vec![0.0f32; 6];
            let r = gemm(
                MatRef::row_major(&a, 2, 4).unwrap(),
                Rhs::Packed(&w),
                MatMut::row_major(&mut out, 2, 3).unwrap(),
                &Epilogue::default(),
                &GemmConfig { threads: 1, isa },
            );
            // AVX2 and portable share a layout; AVX-512 has its own.
            let compatible =
                isa == Isa::Auto || (isa == Isa::Avx512) == (packed_for == Isa::Avx512);
            if compatible {
                r.unwrap();
                assert_eq!(out, vec![4.0; 6], "{packed_for:?} with {isa:?}");
            } else {
                assert!(
                    matches!(r, Err(GemmError::PackedForOtherKernel { .. })),
                    "{packed_for:?} with {isa:?}: {r:?}"
                );
            }
        }
    }
    if !avx512::available() {
        assert!(matches!(
            PackedB::pack_for(MatRef::row_major(&b, 4, 3).unwrap(), Isa::Avx512),
            Err(GemmError::IsaUnavailable { .. })
        ));
    }
}

/// The SIMD epilogues' activations against f64, elementwise, on every kernel: the same
/// bounds as `ACTIVATION_TOLERANCE` / `GELU_TANH_TOLERANCE` in tests/contraction.rs.
#[test]
fn simd_activations_match_f64_on_every_kernel() {
    const RTOL: f64 = 1e-6;
    const RTOL_GELU_TANH: f64 = 4e-6;
    const ATOL: f64 = 1e-12;
    let xs: Vec<f32> = (-2000..=2000).map(|i| i as f32 * 0.006).collect();
    let m = xs.len();
    for isa in Isa::available() {
        // x as a column (N = 1: every value in the masked/buffered edge path) and as a row
        // (M = 1: full vectors).
        for (rows, cols) in [(m, 1), (1, m)] {
            let w = PackedB::pack_for(MatRef::row_major(&[1.0], 1, 1).unwrap(), isa).unwrap();
            for act in ACTS {
                let mut out = vec![0.0f32; m];
                let ep = Epilogue {
                    activation: act,
                    ..Epilogue::default()
                };
                if rows == 1 {
                    // x·I is not a single product per element; scale the 1×1 weight by a
                    // row-scaled identity instead: out = x ⊙ 1 via row_scale on M rows.
                    let ones = vec![1.0f32; m];
                    let eye =
                        PackedB::pack_for(MatRef::new(&ones, 1, m, m, 1).unwrap(), isa).unwrap();
                    let scale = vec![1.0f32];
                    let bias = xs.clone();
                    let ep = Epilogue {
                        row_scale: Some(&scale),
                        bias: Some(&bias),
                        activation: act,
                        residual: None,
                    };
                    // 0·1 + x = x exactly.
                    gemm(
                        MatRef::row_major(&[0.0], 1, 1).unwrap(),
                        Rhs::Packed(&eye),
                        MatMut::row_major(&mut out, 1, m).unwrap(),
                        &ep,
                        &GemmConfig { threads: 1, isa },
                    )
                    .unwrap();
                } else {
                    gemm(
                        MatRef::row_major(&xs, m, 1).unwrap(),
                        Rhs::Packed(&w),
                        MatMut::row_major(&mut out, m, 1).unwrap(),
                        &ep,
                        &GemmConfig { threads: 1, isa },
                    )
                    .unwrap();
                }
                let rtol = if act == Activation::GeluTanh {
                    RTOL_GELU_TANH
                } else {
                    RTOL
                };
                for (&x, &y) in xs.iter().zip(&out) {
                    let want = act64(act, x as f64);
                    let err = (y as f64 - want).abs();
                    assert!(
                        err <= ATOL + rtol * want.abs(),
                        "{isa:?} {act:?} ({rows}x{cols}) at {x}: {y} vs {want}"
                    );
                }
            }
        }
    }
}

/// The fused silu / gelu / gelu_tanh epilogues give `kiln_plan::vmath`'s scalar recipe's bits
/// (the loop kernels' too) on every micro-kernel, full vectors and the buffered edge alike.
#[test]
fn epilogue_activations_equal_the_vmath_recipe_bit_for_bit() {
    use kiln_plan::vmath::accuracy::{random_inputs, same_bits, EDGES};
    use kiln_plan::vmath::Func;
    let mut xs = random_inputs(6000, 21);
    xs.extend(EDGES);
    xs.extend((-300..=300).map(|i| i as f32 * 0.05));
    let m = xs.len();
    // x·1 + 0 = x, except -0 (then +0): the activation's input.
    let pre: Vec<f32> = xs.iter().map(|&x| x + 0.0).collect();
    for isa in Isa::available() {
        let w = PackedB::pack_for(MatRef::row_major(&[1.0], 1, 1).unwrap(), isa).unwrap();
        for (act, f) in [
            (Activation::Silu, Func::Silu),
            (Activation::GeluErf, Func::GeluErf),
            (Activation::GeluTanh, Func::GeluTanh),
        ] {
            let mut out = vec![0.0f32; m];
            let ep = Epilogue {
                activation: act,
                ..Epilogue::default()
            };
            gemm(
                MatRef::row_major(&xs, m, 1).unwrap(),
                Rhs::Packed(&w),
                MatMut::row_major(&mut out, m, 1).unwrap(),
                &ep,
                &GemmConfig { threads: 1, isa },
            )
            .unwrap();
            same_bits(&format!("GEMM {isa:?}"), f, &pre, &out).unwrap();
            // A row (full vectors, the register-tile epilogue).
            let ones = vec![1.0f32; m];
            let eye = PackedB::pack_for(MatRef::new(&ones, 1, m, m, 1).unwrap(), isa).unwrap();
            let mut row = vec![0.0f32; m];
            let scale = [1.0f32];
            let ep = Epilogue {
                row_scale: Some(&scale),
                bias: Some(&xs),
                activation: act,
                residual: None,
            };
            gemm(
                MatRef::row_major(&[0.0], 1, 1).unwrap(),
                Rhs::Packed(&eye),
                MatMut::row_major(&mut row, 1, m).unwrap(),
                &ep,
                &GemmConfig { threads: 1, isa },
            )
            .unwrap();
            same_bits(&format!("GEMM row {isa:?}"), f, &pre, &row).unwrap();
        }
    }
}
