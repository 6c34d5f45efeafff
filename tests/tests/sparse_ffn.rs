//! FFN sparsity end to end (issue 16). Exact: the JIT with the sparse-input GEMM forced on
//! equals the JIT with it forced off within `SPARSE_FFN_TOLERANCE` on our ReLU FFN
//! (`tests/models/sparse/relu_ffn`, from `scripts/make_sparse_models.py`) at ReLU densities
//! 0%, ~25%, ~50%, ~75% and 100%, decode and prefill shapes, and on every shared ReLU model
//! (opt_tiny, opt_1l, opt_1l_kv) on its test data; the default thresholds take the sparse
//! path where the density is low. Approximate: `ffn-threshold` on the SwiGLU FFN is refused
//! under a tiny budget and, under a generous one, accepted with its error below the budget
//! on inputs outside the calibration sets. `ffn-topk`: the JIT of the masked SwiGLU FFN (its
//! down-projection on the sparse-input GEMM) equals the interpreter of the same graph at
//! kept densities 0%, ~3%, 50% and 100% (its budget is tested in `kiln-passes`, on an FFN
//! wide enough for the cost model to see a saving: at this FFN's width the mask costs more
//! than it saves, so the budget machinery proposes nothing).

use kiln::approx::{self, ApproxError, Calibration, Metric, Request};
use kiln::{Model, Options, Tensor};
use kiln_runtime::native::gemm::sparse;
use kiln_tests::{model_dir, repo_root, test_data};
use std::path::PathBuf;
use std::sync::Mutex;

/// Largest difference between the sparse and dense runs, relative to the largest magnitude
/// of the dense output: f32 sums in another order.
const SPARSE_FFN_TOLERANCE: f64 = 1e-5;

/// The threshold override is process-wide: tests that set it take turns.
static OVERRIDE: Mutex<()> = Mutex::new(());

fn local(name: &str) -> PathBuf {
    repo_root()
        .join("tests/models/sparse")
        .join(name)
        .join("model.onnx")
}

fn run_with(model: &Model, inputs: &[Tensor], threshold: Option<f32>) -> (Vec<Tensor>, usize) {
    sparse::set_max_density_override(threshold);
    let exe = model
        .compile(&Options {
            threads: 2,
            ..Options::default()
        })
        .unwrap();
    let before = sparse::sparse_runs();
    let out = exe.run_ordered(inputs.to_vec()).unwrap();
    let runs = sparse::sparse_runs() - before;
    sparse::set_max_density_override(None);
    (out, runs)
}

fn assert_close(what: &str, got: &[Tensor], want: &[Tensor]) {
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g.shape(), w.shape(), "{what}");
        let (a, b) = (g.to_f64s(), w.to_f64s());
        let scale = b.iter().fold(1e-12f64, |m, x| m.max(x.abs()));
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!(
                (x - y).abs() <= SPARSE_FFN_TOLERANCE * scale && !x.is_nan(),
                "{what}: [{i}] sparse {x} vs dense {y}"
            );
        }
    }
}

fn xorshift(seed: &mut u64) -> f32 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    (*seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
}

#[test]
fn exact_relu_skip_equals_dense_at_every_density() {
    let _g = OVERRIDE.lock().unwrap_or_else(|e| e.into_inner());
    let model = Model::load(local("relu_ffn")).unwrap();
    let mut seed = 99u64;
    // (shift, the ReLU density it gives: checked below from the model's own activations)
    for shift in [-1e3f32, -0.6, 0.0, 0.6, 1e3] {
        for (batch, seq) in [(1, 1), (1, 16), (3, 5)] {
            let x: Vec<f32> = (0..batch * seq * 32)
                .map(|_| 2.0 * xorshift(&mut seed))
                .collect();
            let ins = vec![
                Tensor::from_vec(vec![batch, seq, 32], x),
                Tensor::from_vec(vec![128], vec![shift; 128]),
            ];
            let (dense, d_runs) = run_with(&model, &ins, Some(0.0));
            let (sparse_out, s_runs) = run_with(&model, &ins, Some(1.0));
            let what = format!("relu_ffn shift {shift} batch {batch} seq {seq}");
            assert_eq!(d_runs, 0, "{what}: threshold 0 must keep the dense GEMM");
            assert!(s_runs >= 1, "{what}: threshold 1 must take the sparse path");
            assert_close(&what, &sparse_out, &dense);
            // And both equal the interpreter on the unoptimised graph.
            let reference = kiln_ir::run(model.graph(), ins.clone()).unwrap();
            let scale = reference[0]
                .to_f64s()
                .iter()
                .fold(1e-12f64, |m, x| m.max(x.abs()));
            for (a, b) in sparse_out[0].to_f64s().iter().zip(reference[0].to_f64s()) {
                assert!(
                    (a - b).abs() <= 1e-4 * scale,
                    "{what}: {a} vs interpreter {b}"
                );
            }
        }
    }
}

#[test]
fn the_measured_thresholds_pick_sparse_for_a_dead_decode_step_and_dense_for_a_live_one() {
    let _g = OVERRIDE.lock().unwrap_or_else(|e| e.into_inner());
    let model = Model::load(local("relu_ffn")).unwrap();
    let x = Tensor::from_vec(vec![1, 1, 32], vec![0.5f32; 32]);
    let dead = vec![x.clone(), Tensor::from_vec(vec![128], vec![-1e3f32; 128])];
    let live = vec![x, Tensor::from_vec(vec![128], vec![1e3f32; 128])];
    assert!(
        run_with(&model, &dead, None).1 >= 1,
        "0% density: sparse path"
    );
    assert_eq!(
        run_with(&model, &live, None).1,
        0,
        "100% density: dense GEMM"
    );
}

#[test]
fn exact_relu_skip_equals_dense_on_every_shared_relu_model() {
    let _g = OVERRIDE.lock().unwrap_or_else(|e| e.into_inner());
    for name in ["tiny/opt_tiny", "bench/opt_1l", "bench/opt_1l_kv"] {
        // `KILN_SHARED_MODELS` points at the shared models from a checkout that has no
        // `../shared` beside it (a worktree).
        let dir = std::env::var_os("KILN_SHARED_MODELS")
            .map_or_else(|| model_dir(name), |d| PathBuf::from(d).join(name));
        let model = Model::load(dir.join("model.onnx")).unwrap();
        let (ins, _) = test_data(model.graph(), &dir);
        let ins: Vec<Tensor> = ins.into_iter().map(|(_, t)| t).collect();
        let (dense, d_runs) = run_with(&model, &ins, Some(0.0));
        let (sparse_out, s_runs) = run_with(&model, &ins, Some(1.0));
        assert_eq!(d_runs, 0, "{name}");
        assert!(s_runs >= 1, "{name}: no sparse-input FFN found");
        assert_close(name, &sparse_out, &dense);
    }
}

fn swiglu() -> (Model, Calibration) {
    let dir = repo_root().join("tests/models/sparse/swiglu_ffn");
    let model = Model::load(dir.join("model.onnx")).unwrap();
    let sets = (0..6)
        .map(|k| {
            let d = dir.join(format!("test_data_set_{k}"));
            let data = kiln_reference::TestData::load(&d).unwrap();
            data.inputs.into_iter().map(|(_, t)| t).collect()
        })
        .collect::<Vec<Vec<Tensor>>>();
    let calib = Calibration::split(sets, "swiglu_ffn", false);
    (model, calib)
}

fn request(spec: &str, e: f64) -> Request {
    Request {
        rewrites: approx::parse_families(spec).unwrap(),
        max_error: e,
        metric: Metric::RelL2,
    }
}

#[test]
fn ffn_threshold_budget_is_enforced_on_a_swiglu_ffn() {
    let _g = OVERRIDE.lock().unwrap_or_else(|e| e.into_inner());
    let (model, calib) = swiglu();
    let opts = Options::default();
    match model.approximate(&opts, &request("ffn-threshold=0.5", 1e-7), &calib) {
        Err(kiln::Error::Approx(ApproxError::Refused { .. })) => {}
        other => panic!(
            "a 1e-7 budget must be refused, got {:?}",
            other.map(|r| r.1)
        ),
    }
    let budget = 0.25;
    let (g, report) = model
        .approximate(&opts, &request("ffn-threshold=0.8", budget), &calib)
        .unwrap();
    assert_eq!(report.accepted.len(), 1, "{report}");
    assert!(report.held_out_error.unwrap() <= budget, "{report}");
    // Unseen inputs: error under the budget, and the sparse GEMV serves the thresholded
    // layer (a decode step: one row).
    let exact = model.compile(&opts).unwrap();
    let apx = model.compile_optimised(g, &opts).unwrap();
    let mut seed = 5u64;
    for seq in [1usize, 4] {
        let x: Vec<f32> = (0..seq * 32).map(|_| 2.0 * xorshift(&mut seed)).collect();
        let ins = vec![Tensor::from_vec(vec![1, seq, 32], x)];
        let want = exact.run_ordered(ins.clone()).unwrap();
        let before = sparse::sparse_runs();
        let got = apx.run_ordered(ins).unwrap();
        if seq == 1 {
            assert!(
                sparse::sparse_runs() > before,
                "decode step took the dense GEMM"
            );
        }
        let e = approx::measure(Metric::RelL2, &got, &want, &["logits".into()]).unwrap();
        assert!(e <= budget, "seq {seq}: error {e} over budget {budget}");
    }
}

/// Largest difference between the JIT and the interpreter on the same approximate graph,
/// relative to the largest output magnitude: f32 sums in another order.
const TOPK_JIT_TOLERANCE: f64 = 1e-4;

#[test]
fn ffn_topk_on_the_jit_equals_the_interpreter_at_every_density() {
    let _g = OVERRIDE.lock().unwrap_or_else(|e| e.into_inner());
    let (model, _) = swiglu();
    let opts = Options::default();
    let g = model.optimised(&opts).unwrap();
    let fam = approx::topk::FfnTopK::parse(None).unwrap();
    let sites = approx::ApproxRewrite::sites(&fam, &g);
    assert_eq!(sites.len(), 1, "one SwiGLU down-projection");
    let width = g
        .ty(sites[0].probe)
        .shape
        .dims()
        .unwrap()
        .last()
        .unwrap()
        .fixed()
        .unwrap() as usize;
    let mut seed = 9u64;
    for (what, kept, scale) in [
        ("0% (zero input)", width / 2, 0.0f32),
        ("~3%", approx::topk::kept(0.03, width), 2.0),
        ("50%", width / 2, 2.0),
        ("100%", width, 2.0),
    ] {
        let c = approx::Candidate {
            family: approx::topk::TOPK,
            site: sites[0].clone(),
            params: String::new(),
            values: vec![kept as f64 / width as f64, kept as f64],
            saving: 1.0,
        };
        let mut ag = g.clone();
        approx::ApproxRewrite::apply(&fam, &mut ag, &c);
        let exe = model.compile_optimised(ag.clone(), &opts).unwrap();
        for seq in [1usize, 3] {
            let x: Vec<f32> = (0..seq * 32).map(|_| scale * xorshift(&mut seed)).collect();
            let ins = vec![Tensor::from_vec(vec![1, seq, 32], x)];
            let want = kiln_ir::run(&ag, ins.clone()).unwrap();
            let before = sparse::sparse_runs();
            let got = exe.run_ordered(ins).unwrap();
            if seq == 1 && kept < width {
                assert!(
                    sparse::sparse_runs() > before,
                    "{what}: decode step took the dense GEMM"
                );
            }
            for (gt, wt) in got.iter().zip(&want) {
                let (a, b) = (gt.to_f64s(), wt.to_f64s());
                let m = b.iter().fold(1e-12f64, |m, x| m.max(x.abs()));
                for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                    assert!(
                        (x - y).abs() <= TOPK_JIT_TOLERANCE * m,
                        "{what} seq {seq}: [{i}] jit {x} vs interpreter {y}"
                    );
                }
            }
        }
    }
}
