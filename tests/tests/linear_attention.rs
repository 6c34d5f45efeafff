//! `linearise_attention` end to end: the exported quadratic forms of linear attention and
//! retention (`tests/models/linattn/`, written by `scripts/make_linattn_models.py`, and the
//! shared `linattn_tiny`, `retnet_tiny`) become `linear_attention`, and the JIT running the
//! chunked kernel matches the interpreter running the unoptimised quadratic graph at odd
//! sequence lengths (1, 7, 65, 1000), batch 1 and 3, with a key padding mask where the
//! model has one; NaN and ±Inf in the inputs give non-finite outputs exactly where the
//! quadratic graph gives them.

use kiln::{Backend, Executable, Model, Options, Tensor};
use kiln_ir::OpKind;
use kiln_tests::{as_named, assert_outputs_match, model_dir, repo_root, test_data};
use std::path::PathBuf;

/// Relative tolerance (to the largest finite magnitude of the quadratic graph's output)
/// between the chunked f32 kernel and the interpreter's quadratic graph.
const LINATTN_MODEL_RTOL: f64 = 1e-4;

const VARIANTS: [&str; 5] = [
    "causal",
    "noncausal",
    "causal_padded",
    "retention",
    "causal_pos",
];

fn variant_dir(v: &str) -> PathBuf {
    repo_root().join("tests/models/linattn").join(v)
}

fn compile(path: PathBuf, opt_level: u8, backend: Backend) -> Executable {
    Model::load(&path)
        .and_then(|m| {
            m.compile(&Options {
                opt_level,
                backend,
                threads: 2,
                ..Options::default()
            })
        })
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Seeded inputs: xq, xk, v of `[batch, 2, seq, 8]` in (-2, 2), and the padding mask
/// (later keys of odd batch rows padded) when the model takes one.
fn inputs(exe: &Executable, batch: usize, seq: usize, seed: u64) -> Vec<(String, Tensor)> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
    };
    exe.inputs()
        .iter()
        .map(|i| {
            let t = if i.name == "pad" {
                let v: Vec<f32> = (0..batch * seq)
                    .map(|e| {
                        let (b, j) = (e / seq, e % seq);
                        if b % 2 == 1 && j >= seq.div_ceil(2) {
                            0.0
                        } else {
                            1.0
                        }
                    })
                    .collect();
                Tensor::from_vec(vec![batch, seq], v)
            } else {
                let v: Vec<f32> = (0..batch * 2 * seq * 8).map(|_| next()).collect();
                Tensor::from_vec(vec![batch, 2, seq, 8], v)
            };
            (i.name.clone(), t)
        })
        .collect()
}

/// Finite where the reference is finite and within the tolerance; non-finite where it is not.
fn assert_matches(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.shape(), want.shape(), "{what}");
    let (g, w) = (got.to_f64s(), want.to_f64s());
    let scale = w
        .iter()
        .filter(|x| x.is_finite())
        .fold(1e-6f64, |m, x| m.max(x.abs()));
    for (e, (a, b)) in g.iter().zip(&w).enumerate() {
        if b.is_finite() {
            assert!(
                (a - b).abs() <= LINATTN_MODEL_RTOL * scale,
                "{what}: element {e}: {a} vs {b} (scale {scale})"
            );
        } else {
            assert!(!a.is_finite(), "{what}: element {e}: {a} vs {b}");
        }
    }
}

fn linear_attention_count(exe: &Executable) -> usize {
    exe.graph()
        .nodes
        .iter()
        .filter(|n| n.op == OpKind::LinearAttention)
        .count()
}

#[test]
fn every_variant_is_linearised_and_matches_its_reference_data() {
    for v in VARIANTS {
        let jit = compile(variant_dir(v).join("model.onnx"), 1, Backend::Jit);
        assert_eq!(linear_attention_count(&jit), 1, "{v}");
        let (ins, want) = test_data(jit.graph(), &variant_dir(v));
        let got = jit.run(&as_named(&ins)).unwrap();
        assert_outputs_match(&format!("{v} jit vs numpy"), &got, &want);
    }
}

#[test]
fn linearised_models_match_the_quadratic_graph_at_odd_lengths_and_batches() {
    for v in VARIANTS {
        let path = variant_dir(v).join("model.onnx");
        let jit = compile(path.clone(), 1, Backend::Jit);
        let quadratic = compile(path, 0, Backend::Interp);
        for (batch, seq) in [
            (1, 1),
            (3, 1),
            (1, 7),
            (3, 7),
            (1, 65),
            (3, 65),
            (1, 1000),
            (3, 1000),
        ] {
            let ins = inputs(&jit, batch, seq, (batch * 7919 + seq) as u64);
            let got = jit.run(&as_named(&ins)).unwrap();
            let want = quadratic.run(&as_named(&ins)).unwrap();
            assert_matches(&format!("{v} batch {batch} seq {seq}"), &got[0], &want[0]);
        }
    }
}

#[test]
fn nan_and_inf_inputs_propagate_as_in_the_quadratic_graph() {
    for v in VARIANTS {
        let path = variant_dir(v).join("model.onnx");
        let jit = compile(path.clone(), 1, Backend::Jit);
        let quadratic = compile(path, 0, Backend::Interp);
        let mut poisoned = 0;
        for (case, bad) in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY]
            .into_iter()
            .enumerate()
        {
            for input in 0..3 {
                let mut ins = inputs(&jit, 3, 33, 11 + case as u64);
                let t = &ins[input].1;
                let mut vals = t.as_slice::<f32>().unwrap().to_vec();
                // Batch 1, head 0, position 20 (of 33): earlier rows see it only through
                // the masked products of the quadratic form.
                vals[2 * 33 * 8 + 20 * 8 + 3] = bad;
                ins[input].1 = Tensor::from_vec(t.shape().to_vec(), vals);
                let got = jit.run(&as_named(&ins)).unwrap();
                let want = quadratic.run(&as_named(&ins)).unwrap();
                // elu(-inf) + 1 = 0 is finite: not every case poisons the output.
                poisoned += want[0].to_f64s().iter().any(|x| !x.is_finite()) as usize;
                assert_matches(&format!("{v} input {input} = {bad}"), &got[0], &want[0]);
            }
        }
        assert!(
            poisoned >= 6,
            "{v}: {poisoned} of 9 cases had a non-finite output"
        );
    }
}

#[test]
fn shared_linear_attention_models_are_linearised_and_match_their_reference() {
    for name in ["tiny/linattn_tiny", "tiny/retnet_tiny"] {
        let path = model_dir(name).join("model.onnx");
        let jit = compile(path.clone(), 1, Backend::Jit);
        assert_eq!(linear_attention_count(&jit), 2, "{name}: one per layer");
        let (ins, want) = test_data(jit.graph(), &model_dir(name));
        let got = jit.run(&as_named(&ins)).unwrap();
        assert_outputs_match(&format!("{name} jit vs reference"), &got, &want);
        // And the quadratic graph at a longer, odd length.
        let quadratic = compile(path, 0, Backend::Interp);
        let ids: Vec<i64> = (0..3 * 131).map(|i| (i * 37 % 1000) as i64).collect();
        let ins = vec![("input_ids", Tensor::from_vec(vec![3, 131], ids))];
        let got = jit.run(&ins).unwrap();
        let want = quadratic.run(&ins).unwrap();
        assert_matches(&format!("{name} at [3, 131]"), &got[0], &want[0]);
    }
}
