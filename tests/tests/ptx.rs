//! The PTX backend on every shared model, without a GPU: each tiny model (and the bench
//! models, `#[ignore]`d for time) is specialised to its test data's input shapes, optimised,
//! partitioned and emitted as PTX for sm_80 and sm_90, and `ptxas` (from the
//! `nvidia-cuda-nvcc` wheel that scripts/setup-venv.sh installs) must assemble every
//! module with no error. Where `ptxas` is missing the test says so and passes.

use kiln::{Model, Options};
use kiln_tests::{model_dir, repo_root, shared_models, test_data};
use std::path::{Path, PathBuf};
use std::process::Command;

/// `$KILN_PTXAS`, `ptxas` on PATH, or the one in `.venv`'s `nvidia-cuda-nvcc` wheel.
fn ptxas() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("KILN_PTXAS") {
        return Some(PathBuf::from(p));
    }
    if Command::new("ptxas")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Some(PathBuf::from("ptxas"));
    }
    let lib = repo_root().join(".venv/lib");
    for entry in std::fs::read_dir(lib).ok()?.flatten() {
        for cu in ["cu13", "cu12"] {
            let p = entry
                .path()
                .join(format!("site-packages/nvidia/{cu}/bin/ptxas"));
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

/// The plan of `dir`'s model specialised to its test-data shapes and optimised.
fn plan(dir: &Path) -> kiln_plan::Plan {
    let name = dir.display();
    let model = Model::load(dir.join("model.onnx")).unwrap_or_else(|e| panic!("{name}: {e}"));
    let (inputs, _) = test_data(model.graph(), dir);
    let shapes: Vec<Vec<usize>> = inputs.iter().map(|(_, t)| t.shape().to_vec()).collect();
    let g = kiln_cuda::specialise(model.graph(), &shapes).unwrap_or_else(|e| panic!("{name}: {e}"));
    let mut g = Model::from_graph(g)
        .optimised(&Options::default())
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    kiln_cuda::settle_shapes(&mut g).unwrap_or_else(|e| panic!("{name}: {e}"));
    kiln_plan::partition(&g).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// PTX for `plan`, for `sm`.
fn emit(dir: &Path, plan: &kiln_plan::Plan, sm: u32) -> kiln_cuda::Program {
    kiln_cuda::Program::new(plan.clone(), sm)
        .unwrap_or_else(|e| panic!("{}: sm_{sm}: {e}", dir.display()))
}

/// Assembles `ptx` with `ptxas -arch=sm_<sm>`; panics with its messages on an error.
fn assemble(ptxas: &Path, what: &str, ptx: &str, sm: u32) {
    let dir = tempfile::tempdir().expect("temporary folder");
    let src = dir.path().join("m.ptx");
    std::fs::write(&src, ptx).expect("writing PTX");
    let out = Command::new(ptxas)
        .arg(format!("-arch=sm_{sm}"))
        .arg(&src)
        .arg("-o")
        .arg(dir.path().join("m.cubin"))
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", ptxas.display()));
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !msg.contains("error"),
        "{what}: ptxas -arch=sm_{sm} failed ({}):\n{msg}",
        out.status
    );
}

fn models(group: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(shared_models().join(group))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.join("model.onnx").is_file())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn check_group(group: &str) {
    let Some(ptxas) = ptxas() else {
        println!(
            "skipping: ptxas not found (set KILN_PTXAS, or run scripts/setup-venv.sh, which \
             installs the nvidia-cuda-nvcc wheel into .venv)"
        );
        return;
    };
    let dirs = models(group);
    assert!(!dirs.is_empty(), "no shared models under {group}");
    for dir in dirs {
        let name = dir
            .file_name()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default();
        let plan = plan(&dir);
        for sm in [80, 90] {
            let p = emit(&dir, &plan, sm);
            let entries = p
                .module
                .kernels
                .iter()
                .filter(|k| k.entry().is_some())
                .count();
            assert!(entries > 0, "{name}: no GPU kernel at all");
            for k in &p.module.kernels {
                if let Some(e) = k.entry() {
                    assert!(
                        p.module.ptx.contains(&format!(".entry {e}(")),
                        "{name}: {e} missing"
                    );
                }
            }
            assemble(&ptxas, &name, &p.module.ptx, sm);
            println!(
                "{name} sm_{sm}: {entries} entries, {} bytes of PTX, host ops {:?}",
                p.module.ptx.len(),
                p.host_ops()
            );
        }
    }
}

#[test]
fn every_tiny_model_assembles_for_sm80_and_sm90() {
    check_group("tiny");
}

#[test]
#[ignore = "bench models: ~1 min in debug builds; run with --ignored"]
fn every_bench_model_assembles_for_sm80_and_sm90() {
    check_group("bench");
}

#[test]
fn the_manifest_places_every_value_and_names_every_kernel() {
    let dir = model_dir("tiny/bert_tiny");
    let p = emit(&dir, &plan(&dir), 80);
    let m = p.manifest("m.ptx", "m.weights");
    let kernels = m["kernels"].as_array().expect("kernels");
    assert_eq!(kernels.len(), p.plan.kernels.len());
    for k in kernels {
        match k["kind"].as_str() {
            Some("loop") | Some("gemm") | Some("attention") => {
                let grid = k["launch"]["grid"].as_array().expect("grid");
                assert!(
                    grid.iter().all(|g| g.as_u64().is_some_and(|g| g >= 1)),
                    "{k}"
                );
                let block = k["launch"]["block"].as_array().expect("block");
                let threads: u64 = block.iter().map(|b| b.as_u64().unwrap_or(0)).product();
                assert!(
                    (32..=1024).contains(&threads) && threads.is_multiple_of(32),
                    "{k}"
                );
            }
            Some("host") | Some("empty") | Some("copy") => {}
            other => panic!("unknown kernel kind {other:?}"),
        }
    }
    // Every arena value lies inside the arena; the weights inside the blob.
    let arena = m["arena_bytes"].as_u64().expect("arena bytes");
    for v in m["values"].as_array().expect("values") {
        let (o, b) = (
            v["offset"].as_u64().unwrap_or(u64::MAX),
            v["bytes"].as_u64().unwrap_or(0),
        );
        assert!(o + b <= arena, "{v}");
    }
    let blob = p.weight_blob();
    assert_eq!(
        blob.len() as u64,
        m["weights"]["bytes"].as_u64().expect("weight bytes")
    );
    for (v, t) in &p.plan.constants {
        let w = p
            .memory
            .weights
            .iter()
            .find(|w| w.0 == *v)
            .expect("placed weight");
        assert_eq!(&blob[w.1..w.1 + w.2], &t.data().le_bytes()[..]);
    }
}
