//! Decode-step libraries end to end (`kiln build --decode-step`, pass `decode_step`): each
//! causal linear-attention or retention model (`tests/models/linattn/` — plain, padded,
//! retention, with learned and cosine positions — and the shared `linattn_tiny`,
//! `retnet_tiny`) is built into a `.so`, a C host (tests/c/decode_host.c) runs it for
//! [`STEPS`] tokens at batch 2, carrying the states and counting `position`, and every
//! step's outputs must equal the last row of the quadratic graph (the interpreter on the
//! model as imported) run on the prefix up to that token, within [`DECODE_STEP_RTOL`]. The
//! JIT (`Options::decode_step`) runs the same loop. Models the step cannot express are
//! refused with an error naming the node.

use kiln::{Backend, Model, Options, Tensor};
use kiln_ir::{Attr, Attrs, DType, Dim, Graph, OpKind, TensorData};
use kiln_tests::{model_dir, repo_root};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Relative tolerance (to the largest finite magnitude of the reference row) between a
/// step's output (the recurrent f32 update) and the quadratic graph's last row: the two
/// differ by the reassociation of at most [`STEPS`]-term sums.
const DECODE_STEP_RTOL: f64 = 1e-4;

/// Tokens each decode loop runs.
const STEPS: usize = 64;

/// The batch of the decode loops (the symbolic `batch` dim).
const BATCH: usize = 2;

fn fixture(v: &str) -> PathBuf {
    repo_root()
        .join("tests/models/linattn")
        .join(v)
        .join("model.onnx")
}

fn models() -> Vec<(String, PathBuf)> {
    let mut m: Vec<(String, PathBuf)> = ["causal", "causal_padded", "retention", "causal_pos"]
        .iter()
        .map(|v| (v.to_string(), fixture(v)))
        .collect();
    for name in ["tiny/linattn_tiny", "tiny/retnet_tiny"] {
        m.push((name.into(), model_dir(name).join("model.onnx")));
    }
    m
}

fn write_tensor(path: &Path, t: &Tensor) {
    let mut b = vec![];
    b.extend_from_slice(&t.dtype().onnx_code().to_le_bytes());
    b.extend_from_slice(&(t.rank() as i32).to_le_bytes());
    for &d in t.shape() {
        b.extend_from_slice(&(d as i64).to_le_bytes());
    }
    b.extend_from_slice(&t.data().to_le_bytes());
    std::fs::write(path, b).unwrap();
}

fn read_tensor(path: &Path) -> Tensor {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let code = i32::from_le_bytes(b[0..4].try_into().unwrap());
    let rank = i32::from_le_bytes(b[4..8].try_into().unwrap()) as usize;
    let shape: Vec<usize> = (0..rank)
        .map(|i| i64::from_le_bytes(b[8 + 8 * i..16 + 8 * i].try_into().unwrap()) as usize)
        .collect();
    let dtype = DType::from_onnx_code(code).expect("dtype code");
    let data = TensorData::from_le_bytes(dtype, &b[8 + 8 * rank..]).unwrap();
    Tensor::new(shape, data).unwrap()
}

/// The axis of `full`'s value `name` that the step graph binds to 1 (the sequence).
fn seq_axis(full: &Graph, step: &Graph, name: &str, input: bool) -> Option<usize> {
    let find = |g: &Graph| {
        let ids = if input { &g.inputs } else { &g.outputs };
        ids.iter()
            .find(|&&i| g.value(i).name == name)
            .and_then(|&i| g.ty(i).shape.dims().map(<[Dim]>::to_vec))
    };
    let (f, s) = (find(full)?, find(step)?);
    f.iter()
        .zip(&s)
        .position(|(a, b)| matches!(a, Dim::Sym(_)) && b.fixed() == Some(1))
}

/// Seeded tokens: per step, one tensor per non-state, non-position input of `step`
/// (symbolic dims other than the sequence = [`BATCH`]): floats in (-2, 2), token ids in
/// [0, 256), and a padding mask that drops batch row 1's keys at every third step.
fn tokens(step: &Graph, seed: u64) -> Vec<Vec<(String, Tensor)>> {
    let mut state = seed.wrapping_mul(6364136223846793005) | 1;
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 40) as f64 / (1u64 << 24) as f64
    };
    (0..STEPS)
        .map(|t| {
            step.inputs
                .iter()
                .map(|&i| step.value(i))
                .filter(|v| {
                    v.name != kiln_passes::decode_step::POSITION_INPUT
                        && !v
                            .name
                            .starts_with(kiln_passes::decode_step::STATE_IN_PREFIX)
                })
                .map(|v| {
                    let dims: Vec<usize> =
                        v.ty.shape
                            .dims()
                            .unwrap()
                            .iter()
                            .map(|d| d.fixed().map_or(BATCH, |x| x as usize))
                            .collect();
                    let n: usize = dims.iter().product();
                    let t = match v.ty.dtype {
                        DType::I64 => Tensor::from_vec(
                            dims,
                            (0..n).map(|_| (next() * 256.0) as i64).collect(),
                        ),
                        _ if v.name == "pad" => Tensor::from_vec(
                            dims,
                            (0..n)
                                .map(|b| if b == 1 && t % 3 == 2 { 0.0f32 } else { 1.0 })
                                .collect(),
                        ),
                        _ => Tensor::from_vec(
                            dims,
                            (0..n).map(|_| (next() * 4.0 - 2.0) as f32).collect(),
                        ),
                    };
                    (v.name.clone(), t)
                })
                .collect()
        })
        .collect()
}

fn concat(ts: &[&Tensor], axis: usize) -> Tensor {
    let attrs = Attrs::new().with("axis", Attr::Int(axis as i64));
    let ins: Vec<Option<&Tensor>> = ts.iter().copied().map(Some).collect();
    kiln_ir::ops::eval(OpKind::Concat, &attrs, &ins)
        .unwrap()
        .remove(0)
}

fn last_row(t: &Tensor, axis: usize) -> Tensor {
    let n = t.shape()[axis] as i64;
    let one = |x: i64| Tensor::from_vec(vec![1], vec![x]);
    let (s, e, a) = (one(n - 1), one(n), one(axis as i64));
    kiln_ir::ops::eval(
        OpKind::Slice,
        &Attrs::new(),
        &[Some(t), Some(&s), Some(&e), Some(&a)],
    )
    .unwrap()
    .remove(0)
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
                (a - b).abs() <= DECODE_STEP_RTOL * scale,
                "{what}: element {e}: {a} vs {b} (scale {scale})"
            );
        } else {
            assert!(!a.is_finite(), "{what}: element {e}: {a} vs {b}");
        }
    }
}

/// Per step, the last row of each output of the quadratic graph run on the prefix.
fn reference_rows(
    path: &Path,
    full: &Graph,
    step: &Graph,
    toks: &[Vec<(String, Tensor)>],
) -> Vec<Vec<Tensor>> {
    let quadratic = Model::load(path)
        .and_then(|m| {
            m.compile(&Options {
                opt_level: 0,
                backend: Backend::Interp,
                ..Options::default()
            })
        })
        .unwrap();
    (0..toks.len())
        .map(|t| {
            let ins: Vec<(&str, Tensor)> = toks[0]
                .iter()
                .enumerate()
                .map(|(k, (name, first))| {
                    let t = match seq_axis(full, step, name, true) {
                        Some(a) => {
                            concat(&toks[..=t].iter().map(|s| &s[k].1).collect::<Vec<_>>(), a)
                        }
                        None => first.clone(),
                    };
                    (name.as_str(), t)
                })
                .collect();
            let outs = quadratic.run(&ins).unwrap();
            full.outputs
                .iter()
                .zip(outs)
                .map(|(&o, y)| {
                    let a = seq_axis(full, step, &full.value(o).name, false)
                        .expect("every output runs over the sequence");
                    last_row(&y, a)
                })
                .collect()
        })
        .collect()
}

/// Builds the library and the C decode host for `step` in `dir`; returns the host.
fn build_host(step: &Graph, dir: &Path) -> PathBuf {
    let lib = dir.join("libstep.so");
    let header = dir.join("step.h");
    let opts = kiln_llvm::BuildOptions {
        header: Some(header.clone()),
        ..kiln_llvm::BuildOptions::default()
    };
    kiln_llvm::build_library(step, &lib, &opts).unwrap_or_else(|e| panic!("building: {e}"));
    let host = dir.join("decode_host");
    let src = repo_root().join("tests/c/decode_host.c");
    let out = Command::new("cc")
        .args(["-std=c99", "-O1", "-g", "-Wall", "-Wextra", "-Werror"])
        .arg(format!("-DMODEL_HEADER=\"{}\"", header.display()))
        .arg(&src)
        .arg("-o")
        .arg(&host)
        .arg(&lib)
        .arg(format!("-Wl,-rpath,{}", dir.display()))
        .output()
        .expect("running cc");
    assert!(
        out.status.success(),
        "compiling the C host: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    host
}

#[test]
fn decode_step_libraries_match_the_quadratic_graph_over_64_steps_from_c_and_the_jit() {
    for (k, (name, path)) in models().into_iter().enumerate() {
        let model = Model::load(&path).unwrap();
        let opts = Options {
            decode_step: true,
            threads: 2,
            ..Options::default()
        };
        let full = model.optimised(&Options::default()).unwrap();
        let step = model
            .optimised(&opts)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(
            step.nodes.iter().all(|n| n.op != OpKind::LinearAttention),
            "{name}: the step keeps no linear_attention op"
        );
        let nstates = step
            .inputs
            .iter()
            .filter(|&&i| {
                step.value(i)
                    .name
                    .starts_with(kiln_passes::decode_step::STATE_IN_PREFIX)
            })
            .count();
        assert!(nstates >= 1, "{name}: no state inputs");
        assert_eq!(
            step.outputs.len(),
            full.outputs.len() + nstates,
            "{name}: one state output per state input"
        );
        let takes_position = step
            .inputs
            .iter()
            .any(|&i| step.value(i).name == kiln_passes::decode_step::POSITION_INPUT);
        assert_eq!(
            takes_position,
            name == "causal_pos",
            "{name}: position input"
        );
        let toks = tokens(&step, 17 + k as u64);
        let want = reference_rows(&path, &full, &step, &toks);

        // From C.
        let tmp = tempfile::tempdir().unwrap();
        let host = build_host(&step, tmp.path());
        let data = tmp.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let index = |n: &str| step.inputs.iter().position(|&i| step.value(i).name == n);
        for (t, ins) in toks.iter().enumerate() {
            for (n, x) in ins {
                let i = index(n).unwrap();
                write_tensor(&data.join(format!("step_{t}_in_{i}.bin")), x);
            }
        }
        let out = Command::new(&host)
            .arg(&data)
            .arg(STEPS.to_string())
            .arg(BATCH.to_string())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: C host failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        for (t, rows) in want.iter().enumerate() {
            for (o, w) in rows.iter().enumerate() {
                let got = read_tensor(&data.join(format!("step_{t}_out_{o}.bin")));
                assert_matches(&format!("{name} (C) step {t} output {o}"), &got, w);
            }
        }

        // The JIT, through the Rust API.
        let jit = model
            .compile(&opts)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut states: Vec<Tensor> = vec![];
        for (t, rows) in want.iter().enumerate() {
            let mut si = 0;
            let ins: Vec<(&str, Tensor)> = jit
                .inputs()
                .iter()
                .map(|io| {
                    let x = if io.name == kiln_passes::decode_step::POSITION_INPUT {
                        Tensor::scalar(t as i64)
                    } else if io
                        .name
                        .starts_with(kiln_passes::decode_step::STATE_IN_PREFIX)
                    {
                        si += 1;
                        match states.get(si - 1) {
                            Some(s) => s.clone(),
                            None => {
                                let dims = io.ty.shape.dims().unwrap();
                                let dims = dims
                                    .iter()
                                    .map(|d| d.fixed().map_or(BATCH, |x| x as usize))
                                    .collect();
                                Tensor::zeros(io.ty.dtype, dims)
                            }
                        }
                    } else {
                        toks[t]
                            .iter()
                            .find(|(n, _)| *n == io.name)
                            .unwrap()
                            .1
                            .clone()
                    };
                    (io.name.as_str(), x)
                })
                .collect();
            let mut got = jit.run(&ins).unwrap();
            states = got.split_off(rows.len());
            for (o, w) in rows.iter().enumerate() {
                assert_matches(&format!("{name} (JIT) step {t} output {o}"), &got[o], w);
            }
        }
    }
}

#[test]
fn models_without_a_recurrent_step_are_refused_naming_the_node() {
    let step = Options {
        decode_step: true,
        ..Options::default()
    };
    let refused = |path: PathBuf| -> String {
        let m = Model::load(&path).unwrap();
        m.optimised(&step)
            .map(|_| ())
            .expect_err("refused")
            .to_string()
    };
    let e = refused(fixture("noncausal"));
    assert!(e.contains("non-causal") && e.contains("`y`"), "{e}");
    let e = refused(model_dir("tiny/gpt2_tiny").join("model.onnx"));
    assert!(
        e.contains("softmax attention") && e.contains("(attention)"),
        "{e}"
    );
    let e = refused(model_dir("tiny/bert_tiny").join("model.onnx"));
    assert!(e.contains("--decode-step"), "{e}");
    let m = Model::load(fixture("causal")).unwrap();
    let e = m
        .optimised(&Options {
            opt_level: 0,
            ..step
        })
        .expect_err("opt 0")
        .to_string();
    assert!(e.contains("opt_level 1"), "{e}");
}
