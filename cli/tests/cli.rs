//! End-to-end tests of the `kiln` binary: exit codes, messages and files written.

use std::path::PathBuf;
use std::process::{Command, Output};

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .expect("running kiln")
}

fn repo(p: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(p)
        .display()
        .to_string()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn run_with_test_data_passes_on_the_bundled_example() {
    let o = kiln(&[
        "run",
        &repo("examples/mlp/model.onnx"),
        "--test-data",
        &repo("examples/mlp/test_data_set_0"),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("probs"), "{}", text(&o));
}

#[test]
fn wrong_reference_output_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        repo("examples/mlp/test_data_set_0/input_0.pb"),
        dir.path().join("input_0.pb"),
    )
    .unwrap();
    // Use the input as a (wrongly shaped) expected output.
    let x = kiln_frontend::tensor_io::read_tensor_pb(std::path::Path::new(&repo(
        "examples/mlp/test_data_set_0/output_0.pb",
    )))
    .unwrap();
    let wrong = kiln_ir::Tensor::from_vec(x.1.shape().to_vec(), vec![0.5f32; x.1.len()]);
    kiln_frontend::tensor_io::write_tensor_pb(&dir.path().join("output_0.pb"), "probs", &wrong)
        .unwrap();
    let o = kiln(&[
        "run",
        &repo("examples/mlp/model.onnx"),
        "--test-data",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("MISMATCH"), "{}", text(&o));
}

#[test]
fn convert_then_run_the_text_form() {
    let dir = tempfile::tempdir().unwrap();
    let kir = dir.path().join("mlp.kir");
    let o = kiln(&[
        "convert",
        &repo("examples/mlp/model.onnx"),
        "-o",
        kir.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let src = std::fs::read_to_string(&kir).unwrap();
    assert!(src.contains("matmul") && src.contains("softmax"), "{src}");
    let o = kiln(&[
        "run",
        kir.to_str().unwrap(),
        "--test-data",
        &repo("examples/mlp/test_data_set_0"),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

#[test]
fn convert_with_a_weights_file_then_run_and_info() {
    let dir = tempfile::tempdir().unwrap();
    let kir = dir.path().join("mlp.kir");
    let st = dir.path().join("mlp.safetensors");
    let o = kiln(&[
        "convert",
        &repo("examples/mlp/model.onnx"),
        "-o",
        kir.to_str().unwrap(),
        "--weights",
        st.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("mlp.safetensors ("), "{}", text(&o));
    let src = std::fs::read_to_string(&kir).unwrap();
    assert!(src.contains(r#"file("mlp.safetensors", "#), "{src}");
    assert!(!src.contains("0x"), "no hex weights remain: {src}");
    let o = kiln(&[
        "run",
        kir.to_str().unwrap(),
        "--test-data",
        &repo("examples/mlp/test_data_set_0"),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let o = kiln(&["info", kir.to_str().unwrap()]);
    assert!(
        text(&o).contains("in the mapped file, no copy: 0.00"),
        "weights are mapped: {}",
        text(&o)
    );
    // A weights file outside the text's folder could not be read back: refused.
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let o = kiln(&[
        "convert",
        &repo("examples/mlp/model.onnx"),
        "-o",
        sub.join("m.kir").to_str().unwrap(),
        "--weights",
        st.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("must be in the folder"), "{}", text(&o));
}

#[test]
fn a_missing_input_or_attribute_in_the_text_form_is_a_load_error() {
    let dir = tempfile::tempdir().unwrap();
    for (body, want) in [
        (
            "%n = layer_norm %x {axis = -1, epsilon = 1e-5}",
            "layer_norm needs at least 2 inputs",
        ),
        ("%n = lrn %x {alpha = 0.1}", "missing attribute `size`"),
        ("%n = cast %x", "missing attribute `to`"),
    ] {
        let p = dir.path().join("m.kir");
        std::fs::write(
            &p,
            format!(
                "func @f(%x: f32[1, 4, 2, 2]) -> (f32[1, 4, 2, 2]) {{\n  {body}\n  return %n\n}}\n"
            ),
        )
        .unwrap();
        let o = kiln(&["info", p.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(1), "{body}: {}", text(&o));
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(
            stderr.contains(want) && stderr.contains("%n"),
            "{body}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn quiet_is_accepted_by_every_command_and_no_progress_goes_to_a_pipe() {
    let o = kiln(&[
        "run",
        "--quiet",
        &repo("examples/mlp/model.onnx"),
        "--test-data",
        &repo("examples/mlp/test_data_set_0"),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    // stderr is a pipe here: no progress line, however long compiling took.
    let o = kiln(&["-q", "info", &repo("examples/mlp/model.onnx")]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let o = kiln(&["run", &repo("examples/mlp/model.onnx"), "--random-inputs"]);
    assert!(
        o.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn run_writes_npy_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let o = kiln(&[
        "run",
        &repo("examples/mlp/model.onnx"),
        "--input",
        &format!("x={}", repo("examples/mlp/x.npy")),
        "--output-dir",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("probs: f32[3, 4]"), "{}", text(&o));
    let probs = kiln_frontend::tensor_io::read_npy(&dir.path().join("probs.npy")).unwrap();
    assert_eq!(probs.shape(), &[3, 4]);
    // Softmax rows sum to one.
    for row in probs.to_f64s().chunks(4) {
        assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-5);
    }
}

#[test]
fn user_errors_exit_1_with_a_message() {
    let o = kiln(&["run", "no/such/model.onnx"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("no/such/model.onnx"), "{}", text(&o));

    let o = kiln(&["run", &repo("examples/mlp/model.onnx")]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("missing input `x`"), "{}", text(&o));

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.kir");
    std::fs::write(
        &bad,
        "func @f(%x: f32[2]) -> (f32[2]) {\n  %y = nosuchop %x : f32[2]\n  return %y\n}\n",
    )
    .unwrap();
    let o = kiln(&["run", bad.to_str().unwrap(), "--random-inputs"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("2:"),
        "a line:column position: {}",
        text(&o)
    );

    let garbage = dir.path().join("garbage.onnx");
    std::fs::write(&garbage, b"\x0a\xff\xff\xff\xff\x0f").unwrap();
    let o = kiln(&["info", garbage.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
}

#[test]
fn info_lists_inputs_ops_and_parameters() {
    let o = kiln(&["info", &repo("examples/mlp/model.onnx")]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("%x: f32[batch, 16]"), "{t}");
    assert!(t.contains("parameters: 672"), "{t}");
    assert!(t.contains("matmul"), "{t}");
}

#[test]
fn run_matches_test_data_on_both_backends() {
    for backend in ["jit", "interp"] {
        let o = kiln(&[
            "run",
            &repo("examples/mlp/model.onnx"),
            "--test-data",
            &repo("examples/mlp/test_data_set_0"),
            "--backend",
            backend,
        ]);
        assert_eq!(o.status.code(), Some(0), "{backend}: {}", text(&o));
        assert!(text(&o).contains("probs"), "{backend}: {}", text(&o));
    }
    let o = kiln(&["run", &repo("examples/mlp/model.onnx"), "--backend", "gpu"]);
    assert_eq!(o.status.code(), Some(2), "clap's usage error: {}", text(&o));
    assert!(text(&o).contains("unknown backend `gpu`"), "{}", text(&o));
}

#[test]
fn run_names_a_wrongly_shaped_input() {
    let dir = tempfile::tempdir().unwrap();
    let x = dir.path().join("x.npy");
    let t = kiln_ir::Tensor::from_vec(vec![2, 15], vec![0.5f32; 30]);
    kiln_frontend::tensor_io::write_npy(&x, &t).unwrap();
    let o = kiln(&[
        "run",
        &repo("examples/mlp/model.onnx"),
        "--input",
        &format!("x={}", x.display()),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("input `x`: expected f32[batch, 16], got f32[2, 15]"),
        "{}",
        text(&o)
    );
}

fn tiny_model(name: &str) -> Option<String> {
    let p = PathBuf::from(repo("../shared/models/tiny"))
        .join(name)
        .join("model.onnx");
    if p.is_file() {
        Some(p.display().to_string())
    } else {
        eprintln!("skipping: {} is missing", p.display());
        None
    }
}

#[test]
fn bench_reports_latency_per_thread_count_as_text_md_and_json() {
    let Some(model) = tiny_model("bert_tiny") else {
        return;
    };
    let o = kiln(&[
        "bench",
        &model,
        "--runs",
        "2",
        "--threads",
        "1,2",
        "--profile",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("median ms") && out.contains("test_data_set_0"),
        "{out}"
    );
    assert!(
        out.contains("profile (jit, 2 threads)") && out.contains("contraction"),
        "{out}"
    );
    // Profiled runs after the first put their values in the arena, and say so.
    assert!(
        out.contains("arena: a ") && out.contains("written in place"),
        "{out}"
    );

    let o = kiln(&["bench", &model, "--runs", "2", "--format", "md"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let rows: Vec<&str> = out.lines().collect();
    assert_eq!(rows.len(), 3, "header, rule, one row: {out}");
    assert!(rows[2].starts_with("| bert_tiny | jit | 1 | "), "{out}");

    let o = kiln(&[
        "bench",
        &model,
        "--runs",
        "2",
        "--format",
        "json",
        "--backend",
        "interp",
        "--dim",
        "batch=2",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    assert_eq!(v["backend"], "interp");
    assert_eq!(v["inputs"], "random (seed 0)");
    assert!(v["results"][0]["median_ms"].as_f64().unwrap() > 0.0, "{v}");
}

#[test]
fn bench_compares_with_onnx_runtime_when_the_venv_has_it() {
    let Some(model) = tiny_model("gpt2_tiny") else {
        return;
    };
    let python = PathBuf::from(repo(".venv/bin/python"));
    let has_ort = Command::new(&python)
        .args(["-c", "import onnxruntime"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_ort {
        eprintln!(
            "skipping: no onnxruntime in {} (scripts/setup-venv.sh)",
            python.display()
        );
        return;
    }
    let o = kiln(&[
        "bench",
        &model,
        "--runs",
        "2",
        "--compare-ort",
        "--format",
        "json",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    let ort = &v["results"][0]["ort"];
    assert!(ort["median_ms"].as_f64().unwrap() > 0.0, "{v}");
    assert!(ort["ratio"].as_f64().unwrap() > 0.0, "{v}");
}

#[test]
fn bench_puts_the_aot_library_beside_the_jit() {
    let o = kiln(&[
        "bench",
        &repo("examples/mlp/model.onnx"),
        "--backend",
        "jit,aot",
        "--runs",
        "2",
        "--dim",
        "batch=3",
        "--format",
        "json",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    let backends: Vec<&str> = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["backend"].as_str().unwrap())
        .collect();
    assert_eq!(backends, ["jit", "aot"], "{v}");
    assert!(v["results"][1]["median_ms"].as_f64().unwrap() > 0.0, "{v}");
    let o = kiln(&[
        "bench",
        &repo("examples/mlp/model.onnx"),
        "--backend",
        "tpu",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("unknown backend `tpu`"), "{}", text(&o));
}

#[test]
fn build_writes_a_library_header_and_side_file() {
    let dir = tempfile::tempdir().unwrap();
    let lib = dir.path().join("libmlp.so");
    let header = dir.path().join("mlp.h");
    let o = kiln(&[
        "build",
        &repo("examples/mlp/model.onnx"),
        "-o",
        lib.to_str().unwrap(),
        "--header",
        header.to_str().unwrap(),
        "--weights",
        "file",
        "--target-cpu",
        "x86-64-v3",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(lib.is_file() && header.is_file(), "{}", text(&o));
    assert!(dir.path().join("libmlp.weights").is_file(), "{}", text(&o));
    let h = std::fs::read_to_string(&header).unwrap();
    assert!(
        h.contains("int kiln_run(") && h.contains("KILN_MODEL_NUM_INPUTS"),
        "{h}"
    );
    // A bad CPU name is a user error with a message, not an LLVM abort.
    let o = kiln(&[
        "build",
        &repo("examples/mlp/model.onnx"),
        "-o",
        lib.to_str().unwrap(),
        "--target-cpu",
        "pentium-mmx",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("unknown target CPU"), "{}", text(&o));
}

#[test]
fn build_decode_step_writes_a_step_library_that_info_names_and_refuses_what_it_cannot_step() {
    let dir = tempfile::tempdir().unwrap();
    let lib = dir.path().join("libstep.so");
    let o = kiln(&[
        "build",
        &repo("tests/models/linattn/causal_pos/model.onnx"),
        "--decode-step",
        "-o",
        lib.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains("%state.0.S -> %state_out.0.S") && text(&o).contains("`position: i64[]`"),
        "{}",
        text(&o)
    );
    let o = kiln(&["info", lib.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains("decode step: one token per run; 2 recurrent state input(s)")
            && text(&o).contains("`position` is the token's 0-based index"),
        "{}",
        text(&o)
    );
    // Non-causal linear attention has no step: exit 1, naming the node, without the
    // optimiser's "--opt 0" hint.
    let o = kiln(&[
        "build",
        &repo("tests/models/linattn/noncausal/model.onnx"),
        "--decode-step",
        "-o",
        lib.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("node `y` (linear_attention): non-causal")
            && !text(&o).contains("--opt 0"),
        "{}",
        text(&o)
    );
}

/// Whether this machine has the CUDA driver library (then `--device cuda` may work).
fn has_cuda_driver() -> bool {
    ["libcuda.so", "libcuda.so.1"].iter().any(|l| {
        // SAFETY: dlopen of a system library by name, closed at once.
        unsafe {
            let name = std::ffi::CString::new(*l).expect("name");
            let h = libc::dlopen(name.as_ptr(), libc::RTLD_LAZY);
            if !h.is_null() {
                libc::dlclose(h);
            }
            !h.is_null()
        }
    })
}

#[test]
fn device_cuda_without_a_driver_is_a_clear_error_with_exit_code_1() {
    if has_cuda_driver() {
        println!("skipping: this machine has a CUDA driver");
        return;
    }
    for cmd in ["run", "bench"] {
        let mut args = vec![cmd, "--device", "cuda"];
        let model = repo("examples/mlp/model.onnx");
        args.insert(1, &model);
        if cmd == "run" {
            args.push("--random-inputs");
        } else {
            args.extend(["--runs", "1", "--warmup", "0"]);
        }
        let o = kiln(&args);
        assert_eq!(o.status.code(), Some(1), "{cmd}: {}", text(&o));
        let t = text(&o);
        assert!(
            t.contains("cuda:0") && t.contains("no CUDA driver"),
            "{cmd}: {t}"
        );
        assert!(!t.contains("panicked"), "{cmd}: {t}");
    }
    let o = kiln(&["run", &repo("examples/mlp/model.onnx"), "--device", "tpu"]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "a bad device name is a usage error: {}",
        text(&o)
    );
}

#[test]
fn build_target_cuda_writes_ptx_manifest_and_weights() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let out = dir.path().join("mlp.ptx");
    let o = kiln(&[
        "build",
        &repo("examples/mlp/model.onnx"),
        "--target",
        "cuda",
        "--sm",
        "90",
        "-o",
        out.to_str().expect("utf-8 path"),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let ptx = std::fs::read_to_string(&out).expect("PTX written");
    assert!(
        ptx.contains(".target sm_90") && ptx.contains(".entry kiln_"),
        "{ptx}"
    );
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("mlp.json")).expect("manifest"))
            .expect("JSON manifest");
    assert_eq!(m["sm"], 90);
    let weights = std::fs::read(dir.path().join("mlp.weights")).expect("weights written");
    assert_eq!(
        weights.len() as u64,
        m["weights"]["bytes"].as_u64().expect("bytes")
    );
    let kernels = m["kernels"].as_array().expect("kernels");
    assert!(kernels.iter().any(|k| k["kind"] == "gemm"), "{m}");
    for k in kernels
        .iter()
        .filter(|k| k["kind"] == "gemm" || k["kind"] == "loop")
    {
        let entry = k["entry"].as_str().expect("entry");
        assert!(ptx.contains(&format!(".entry {entry}(")), "{entry}");
    }
    let o = kiln(&[
        "build",
        &repo("examples/mlp/model.onnx"),
        "--target",
        "cuda",
        "--sm",
        "75",
        "-o",
        out.to_str().expect("utf-8"),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("sm_75"), "{}", text(&o));
}
