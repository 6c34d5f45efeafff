//! Soundness tests of `linearise_attention`: every rule rewrites the exported quadratic
//! form and computes the same outputs (interpreter, random inputs, odd lengths); every
//! guard rejects a near miss (a shifted or reversed triangle, a random mask, a decay
//! that is not geometric in `i − j`, a growing "decay").

use super::*;
use crate::canon::testing::*;
use kiln_ir::Tensor;
use std::sync::Arc;

/// How the exported graph weights its scores.
#[derive(Clone, Copy, Debug)]
enum Mask {
    None,
    /// `trilu(constant_of_shape([S, S], 1), k)` with `upper`.
    Trilu {
        k: i64,
        upper: i64,
    },
    /// A constant `[S, S]` mask from a function of `(i, j)`.
    Const(fn(usize, usize) -> f32),
    /// Retention: `where(cond(i, j), exp(offset · log γ), 0)`, `log γ: [H, 1, 1]`.
    Decay(DecayForm),
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum DecayForm {
    /// The exporter's form: `greater_equal(i, j)`, `exp((i − j) · log γ)`.
    Exported,
    /// `pow(γ, i − j)` with `less_equal(j, i)`.
    Pow,
    /// `greater_equal(j, i)`: the upper triangle.
    ReversedCondition,
    /// `exp((j − i) · log γ)`.
    ReversedOffset,
    /// `exp((i − j)² · log γ)`: not geometric.
    Squared,
    /// `log γ > 0` for one head.
    Growing,
    /// The else branch is 1, not 0.
    NonZeroElse,
}

const H: usize = 2;
const D: usize = 4;

fn transpose(b: &mut B, x: ValueId, perm: &[i64]) -> ValueId {
    b.op(
        OpKind::Transpose,
        Attrs::new().with("perm", Attr::Ints(perm.to_vec())),
        &[x],
    )
}

/// `elu(x) + 1`, the feature map of linear attention (keeps row sums positive).
fn phi(b: &mut B, x: ValueId) -> ValueId {
    let e = b.op(
        OpKind::Elu,
        Attrs::new().with("alpha", Attr::Float(1.0)),
        &[x],
    );
    let one = b.f(1.0);
    b.bin(OpKind::Add, e, one)
}

/// The positions `0..s` as `[s, 1]` (axis 0) or `[1, s]` (axis 1).
fn positions(b: &mut B, s: usize, axis: usize) -> ValueId {
    let (start, lim, step) = (
        b.konst(Tensor::scalar(0i64)),
        b.konst(Tensor::scalar(s as i64)),
        b.konst(Tensor::scalar(1i64)),
    );
    let r = b.op(OpKind::Range, Attrs::new(), &[start, lim, step]);
    let shape = b.i64s(if axis == 0 { &[-1, 1] } else { &[1, -1] });
    b.bin(OpKind::Reshape, r, shape)
}

fn mask_value(b: &mut B, mask: Mask, s: usize) -> Option<ValueId> {
    Some(match mask {
        Mask::None => return None,
        Mask::Trilu { k, upper } => {
            let shape = b.i64s(&[s as i64, s as i64]);
            let ones = b.op(
                OpKind::ConstantOfShape,
                Attrs::new().with(
                    "value",
                    Attr::Tensor(Arc::new(Tensor::from_vec(vec![1], vec![1.0f32]))),
                ),
                &[shape],
            );
            let k = b.konst(Tensor::scalar(k));
            b.op(
                OpKind::Trilu,
                Attrs::new().with("upper", Attr::Int(upper)),
                &[ones, k],
            )
        }
        Mask::Const(f) => {
            let v: Vec<f32> = (0..s * s).map(|e| f(e / s, e % s)).collect();
            b.konst(Tensor::from_vec(vec![s, s], v))
        }
        Mask::Decay(form) => {
            let (i, j) = (positions(b, s, 0), positions(b, s, 1));
            let cond = match form {
                DecayForm::Pow => b.bin(OpKind::LessOrEqual, j, i),
                DecayForm::ReversedCondition => b.bin(OpKind::GreaterOrEqual, j, i),
                _ => b.bin(OpKind::GreaterOrEqual, i, j),
            };
            let off = match form {
                DecayForm::ReversedOffset => b.bin(OpKind::Sub, j, i),
                _ => b.bin(OpKind::Sub, i, j),
            };
            let off = if form == DecayForm::Squared {
                b.bin(OpKind::Mul, off, off)
            } else {
                off
            };
            let off = b.op(
                OpKind::Cast,
                Attrs::new().with("to", Attr::Str("f32".into())),
                &[off],
            );
            let lg: Vec<f32> = match form {
                DecayForm::Growing => vec![-0.2, 0.05],
                _ => vec![-0.2, -0.01],
            };
            let e = if form == DecayForm::Pow {
                let g = b.konst(Tensor::from_vec(
                    vec![H, 1, 1],
                    lg.iter().map(|x| x.exp()).collect::<Vec<f32>>(),
                ));
                b.bin(OpKind::Pow, g, off)
            } else {
                let l = b.konst(Tensor::from_vec(vec![H, 1, 1], lg));
                let x = b.bin(OpKind::Mul, off, l);
                b.un(OpKind::Exp, x)
            };
            let zero = b.f(if form == DecayForm::NonZeroElse {
                1.0
            } else {
                0.0
            });
            b.op(OpKind::Where, Attrs::new(), &[cond, e, zero])
        }
    })
}

/// The exported quadratic form on `x: [batch, H, s, D]` (q = φ(x·a), k = φ(x·b), v = x).
fn quadratic(batch: usize, s: usize, mask: Mask, normalise: bool, eps: f32) -> Graph {
    quadratic_summed_over(batch, s, mask, normalise, eps, -1)
}

/// [`quadratic`] with the row sums taken over `axis`.
fn quadratic_summed_over(
    batch: usize,
    s: usize,
    mask: Mask,
    normalise: bool,
    eps: f32,
    axis: i64,
) -> Graph {
    let mut b = B::new();
    let xq = b.input("xq", &[batch as i64, H as i64, s as i64, D as i64]);
    let xk = b.input("xk", &[batch as i64, H as i64, s as i64, D as i64]);
    let v = b.input("v", &[batch as i64, H as i64, s as i64, D as i64]);
    let q = phi(&mut b, xq);
    let k = phi(&mut b, xk);
    let kt = transpose(&mut b, k, &[0, 1, 3, 2]);
    let scores = b.bin(OpKind::MatMul, q, kt);
    let a = match mask_value(&mut b, mask, s) {
        Some(m) => b.bin(OpKind::Mul, scores, m),
        None => scores,
    };
    let av = b.bin(OpKind::MatMul, a, v);
    let y = if normalise {
        let axes = b.i64s(&[axis]);
        let rs = b.op(
            OpKind::ReduceSum,
            Attrs::new().with("keepdims", Attr::Int(1)),
            &[a, axes],
        );
        let den = if eps != 0.0 {
            let e = b.f(eps);
            b.bin(OpKind::Add, rs, e)
        } else {
            rs
        };
        b.bin(OpKind::Div, av, den)
    } else {
        av
    };
    b.finish(&[y])
}

fn pass() -> LineariseAttention {
    LineariseAttention::default()
}

#[test]
fn causal_linear_attention_with_trilu_mask_becomes_one_op_at_odd_lengths() {
    for (batch, s) in [(1, 1), (3, 7), (1, 65), (3, 16)] {
        let g = quadratic(batch, s, Mask::Trilu { k: 0, upper: 0 }, true, 1e-6);
        let after = rewrite_and_compare(&pass(), &g);
        assert_eq!(
            count(&after, OpKind::LinearAttention),
            1,
            "batch {batch} seq {s}"
        );
        assert_eq!(count(&after, OpKind::MatMul), 0);
        assert_eq!(count(&after, OpKind::ReduceSum), 0);
        let n = after
            .nodes
            .iter()
            .find(|n| n.op == OpKind::LinearAttention)
            .unwrap();
        assert_eq!(n.attrs.int("causal").unwrap(), Some(1));
        assert_eq!(n.attrs.int("normalize").unwrap(), Some(1));
        assert_eq!(n.attrs.float("epsilon").unwrap(), Some(1e-6));
        assert!(n.attrs.int("chunk").unwrap().unwrap() > 0);
    }
}

#[test]
fn a_constant_causal_mask_and_the_unmasked_normalised_form_are_recognised() {
    let g = quadratic(1, 9, Mask::Const(|i, j| (j <= i) as i32 as f32), true, 0.0);
    let after = rewrite_and_compare(&pass(), &g);
    assert_eq!(count(&after, OpKind::LinearAttention), 1);
    let g = quadratic(3, 7, Mask::None, true, 1e-6);
    let after = rewrite_and_compare(&pass(), &g);
    let n = after
        .nodes
        .iter()
        .find(|n| n.op == OpKind::LinearAttention)
        .unwrap();
    assert_eq!(n.attrs.int("causal").unwrap(), Some(0));
    // Unnormalised and unmasked: a plain matmul chain, left alone.
    let g = quadratic(1, 7, Mask::None, false, 0.0);
    assert_eq!(
        count(&rewrite_and_compare(&pass(), &g), OpKind::LinearAttention),
        0
    );
}

#[test]
fn retention_decay_in_exp_and_pow_forms_becomes_one_op() {
    for form in [DecayForm::Exported, DecayForm::Pow] {
        for (batch, s) in [(1, 1), (3, 7), (1, 65)] {
            let g = quadratic(batch, s, Mask::Decay(form), false, 0.0);
            let after = rewrite_and_compare(&pass(), &g);
            assert_eq!(
                count(&after, OpKind::LinearAttention),
                1,
                "{form:?} seq {s}"
            );
            assert_eq!(count(&after, OpKind::Exp) + count(&after, OpKind::Pow), 0);
            let n = after
                .nodes
                .iter()
                .find(|n| n.op == OpKind::LinearAttention)
                .unwrap();
            assert_eq!(n.inputs.len(), 4, "the decay is an input");
        }
    }
}

#[test]
fn near_misses_are_left_alone() {
    let cases: Vec<(&str, Mask, bool)> = vec![
        ("shifted triangle k=1", Mask::Trilu { k: 1, upper: 0 }, true),
        (
            "shifted triangle k=-1",
            Mask::Trilu { k: -1, upper: 0 },
            true,
        ),
        ("upper triangle", Mask::Trilu { k: 0, upper: 1 }, true),
        (
            "strict lower constant",
            Mask::Const(|i, j| (j < i) as i32 as f32),
            true,
        ),
        (
            "random constant",
            Mask::Const(|i, j| ((i * 7 + j * 3) % 5) as f32 / 4.0),
            true,
        ),
        (
            "all ones but one",
            Mask::Const(|i, j| {
                if (i, j) == (2, 1) {
                    0.5
                } else {
                    (j <= i) as i32 as f32
                }
            }),
            true,
        ),
        (
            "reversed condition",
            Mask::Decay(DecayForm::ReversedCondition),
            false,
        ),
        (
            "reversed offset",
            Mask::Decay(DecayForm::ReversedOffset),
            false,
        ),
        ("squared offset", Mask::Decay(DecayForm::Squared), false),
        ("growing", Mask::Decay(DecayForm::Growing), false),
        ("non-zero else", Mask::Decay(DecayForm::NonZeroElse), false),
    ];
    for (what, mask, norm) in cases {
        let g = quadratic(1, 6, mask, norm, 1e-6);
        let after = rewrite_and_compare(&pass(), &g);
        assert_eq!(count(&after, OpKind::LinearAttention), 0, "{what}");
    }
}

#[test]
fn a_row_sum_over_another_axis_or_a_shared_score_is_left_alone() {
    // Sum over the query axis instead (seq = D, so the shapes still fit).
    let g = quadratic_summed_over(1, D, Mask::Trilu { k: 0, upper: 0 }, true, 1e-6, 2);
    assert_eq!(
        count(&rewrite_and_compare(&pass(), &g), OpKind::LinearAttention),
        0
    );
    // The weighted scores are also a graph output: nothing to gain, and not closed.
    let mut g = quadratic(1, 5, Mask::Trilu { k: 0, upper: 0 }, true, 1e-6);
    let a = g
        .nodes
        .iter()
        .find(|n| n.op == OpKind::ReduceSum)
        .unwrap()
        .inputs[0]
        .unwrap();
    g.outputs.push(a);
    assert_eq!(
        count(&rewrite_and_compare(&pass(), &g), OpKind::LinearAttention),
        0
    );
}

#[test]
fn the_chunk_is_the_cheapest_candidate_and_the_forms_rank_as_expected() {
    let t = Target::default();
    for (d, dv) in [(16, 16), (64, 64), (128, 128)] {
        let c = choose_chunk(&t, d, dv, true);
        assert!(CHUNK_CANDIDATES.contains(&c));
        for other in CHUNK_CANDIDATES {
            assert!(chunk_row_time(&t, c, d, dv) <= chunk_row_time(&t, other, d, dv));
        }
    }
    assert_eq!(choose_chunk(&t, 64, 64, false), 0);
    // At 16K tokens the chunked form is far cheaper than the quadratic one, and the
    // quadratic one grows as n² while the chunked one grows as n.
    let c = choose_chunk(&t, 64, 64, true);
    let at = |n: f64| form_costs(&t, 4.0, n, 64.0, 64.0, true, c);
    let (a, b) = (at(4096.0), at(16384.0));
    assert!(b[0].time > 10.0 * b[2].time, "{b:?}");
    assert!((b[0].flops / a[0].flops - 16.0).abs() < 0.1);
    assert!((b[2].flops / a[2].flops - 4.0).abs() < 0.01);
}
