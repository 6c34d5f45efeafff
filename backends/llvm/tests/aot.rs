//! AOT libraries end to end: every shared model is built into a `.so` with `kiln build`'s
//! library builder, a C host program (tests/c/host.c) is compiled against the generated
//! header and run on the model's test data, and its outputs must match the reference
//! within `MODEL_TOLERANCE`. Also: the library needs only libc/libm/libpthread, the Rust
//! loader agrees with the same plan run by the CPU runtime's portable evaluator on random
//! inputs, side-file weights work, and the C host is clean under valgrind. (The AOT-vs-JIT
//! comparison lives in tests/, which may depend on both backends.)

use kiln_ir::{DType, Tensor, TensorData};
use kiln_llvm::{build_library, AotLibrary, BuildOptions, WeightsMode};
use kiln_reference::{compare, TestData, MODEL_TOLERANCE};
use kiln_runtime::executor::{CpuPlan, ReferenceRunner};
use std::path::{Path, PathBuf};
use std::process::Command;

fn models_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/models")
}

fn optimised(name: &str) -> (kiln_ir::Graph, PathBuf) {
    let dir = models_root().join(name);
    let mut g =
        kiln_frontend::load(dir.join("model.onnx")).unwrap_or_else(|e| panic!("{name}: {e}"));
    kiln_passes::default_pipeline()
        .run(&mut g)
        .unwrap_or_else(|e| panic!("{name}: optimising: {e}"));
    (g, dir)
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

/// Builds the library and the C host for `g` in `dir`; returns the host executable.
/// Builds `g` into `dir/libmodel.so` for `cpu` (`native`, `x86-64-v3`, ...) with a C host.
fn build_with_host(g: &kiln_ir::Graph, dir: &Path, weights: WeightsMode, cpu: &str) -> PathBuf {
    let lib = dir.join("libmodel.so");
    let header = dir.join("model.h");
    let opts = BuildOptions {
        weights,
        header: Some(header.clone()),
        target_cpu: cpu.into(),
        ..BuildOptions::default()
    };
    build_library(g, &lib, &opts).unwrap_or_else(|e| panic!("building: {e}"));
    let host = dir.join("host");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/c/host.c");
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

/// Runs the C host on `inputs`; returns its outputs.
fn run_host(host: &Path, dir: &Path, inputs: &[Tensor], extra: &[&str]) -> Vec<Tensor> {
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    for (i, t) in inputs.iter().enumerate() {
        write_tensor(&data.join(format!("in_{i}.bin")), t);
    }
    let out = Command::new(host).arg(&data).args(extra).output().unwrap();
    assert!(
        out.status.success(),
        "C host failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut outs = vec![];
    for i in 0.. {
        let p = data.join(format!("out_{i}.bin"));
        if !p.exists() {
            break;
        }
        outs.push(read_tensor(&p));
    }
    outs
}

fn check_outputs(name: &str, got: &[Tensor], want: &[(String, Tensor)]) {
    assert_eq!(got.len(), want.len(), "{name}: output count");
    for (k, (g, (wname, w))) in got.iter().zip(want).enumerate() {
        let e = compare(g, w, MODEL_TOLERANCE);
        assert!(
            e.ok,
            "{name} output #{k} `{wname}`: max abs {:e}: {:?}",
            e.max_abs, e.reason
        );
    }
}

fn check_model(name: &str) {
    let (g, dir) = optimised(name);
    let data = TestData::load(&dir.join("test_data_set_0")).expect("test data");
    let tmp = tempfile::tempdir().unwrap();
    let host = build_with_host(&g, tmp.path(), WeightsMode::Embed, "native");
    let inputs: Vec<Tensor> = data.inputs.iter().map(|(_, t)| t.clone()).collect();
    let outs = run_host(&host, tmp.path(), &inputs, &["-", "2"]);
    check_outputs(name, &outs, &data.outputs);
}

macro_rules! model_tests {
    ($($test:ident: $path:literal;)*) => {$(
        #[test]
        fn $test() {
            check_model($path);
        }
    )*};
}

model_tests! {
    bert_tiny_c_host: "tiny/bert_tiny";
    gpt2_tiny_c_host: "tiny/gpt2_tiny";
    gpt2_tiny_kv_c_host: "tiny/gpt2_tiny_kv";
    llama_tiny_c_host: "tiny/llama_tiny";
    llama_tiny_kv_c_host: "tiny/llama_tiny_kv";
    opt_tiny_c_host: "tiny/opt_tiny";
    vit_tiny_c_host: "tiny/vit_tiny";
    bert_base_1l_c_host: "bench/bert_base_1l";
    opt_1l_c_host: "bench/opt_1l";
    llama_2l_512_c_host: "bench/llama_2l_512";
    llama_2l_512_kv_c_host: "bench/llama_2l_512_kv";
    vit_s16_6l_c_host: "bench/vit_s16_6l";
}

/// Shared libraries a kiln library may need at run time.
const ALLOWED_NEEDED: &[&str] = &[
    "libc.so.6",
    "libm.so.6",
    "libpthread.so.0",
    "ld-linux-x86-64.so.2",
];

#[test]
fn library_needs_only_libc_libm_pthread() {
    let (g, _) = optimised("tiny/bert_tiny");
    let tmp = tempfile::tempdir().unwrap();
    let lib = tmp.path().join("libmodel.so");
    build_library(&g, &lib, &BuildOptions::default()).unwrap();
    let out = Command::new("readelf")
        .arg("-d")
        .arg(&lib)
        .output()
        .expect("readelf (binutils) is needed by this test");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let needed: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| l.split('[').nth(1)?.split(']').next())
        .collect();
    assert!(!needed.is_empty(), "no NEEDED entries parsed from:\n{text}");
    for n in &needed {
        assert!(
            ALLOWED_NEEDED.contains(n),
            "the library needs {n}: {needed:?}"
        );
    }
    // Only the documented C ABI is exported.
    let out = Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(&lib)
        .output()
        .unwrap();
    let syms = String::from_utf8_lossy(&out.stdout);
    for l in syms.lines() {
        let name = l.split_whitespace().last().unwrap_or("");
        if l.contains(" T ") {
            assert!(
                kiln_llvm::EXPORTS.contains(&name),
                "unexpected export {name}"
            );
        }
    }
    for s in kiln_llvm::EXPORTS {
        assert!(syms.contains(s), "{s} is not exported");
    }
}

/// Random inputs of a model's declared types (symbolic dims set to `sym`).
fn random_inputs(g: &kiln_ir::Graph, seed: u64, sym: usize) -> Vec<Tensor> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    g.inputs
        .iter()
        .map(|&id| {
            let ty = g.ty(id);
            let shape: Vec<usize> = ty
                .shape
                .dims()
                .expect("ranked inputs")
                .iter()
                .map(|d| d.fixed().map_or(sym, |n| n as usize))
                .collect();
            let n: usize = shape.iter().product();
            let data = match ty.dtype {
                DType::F32 => TensorData::F32((0..n).map(|_| rng.gen_range(-1.0..1.0)).collect()),
                // Token ids, token types and masks: 0 and 1 are valid for every model here
                // (token-type tables have two rows).
                DType::I64 => TensorData::I64((0..n).map(|_| rng.gen_range(0..2)).collect()),
                d => panic!("no random generator for {d}"),
            };
            Tensor::new(shape, data).unwrap()
        })
        .collect()
}

fn aot_matches_the_portable_plan(name: &str) {
    let (g, _) = optimised(name);
    let tmp = tempfile::tempdir().unwrap();
    let lib = tmp.path().join("libmodel.so");
    build_library(&g, &lib, &BuildOptions::default()).unwrap();
    let mut aot = AotLibrary::load(&lib, None).unwrap();
    let plan = CpuPlan::partition(&g).unwrap();
    for seed in 0..2 {
        let inputs = random_inputs(&g, seed, 4);
        let want = plan.run(inputs.clone(), &ReferenceRunner).unwrap();
        let got = aot.run(&inputs).unwrap();
        let want: Vec<(String, Tensor)> = want.into_iter().map(|t| (String::new(), t)).collect();
        check_outputs(name, &got, &want);
    }
    // Profiled runs time every kernel of the same plan, under the plan's labels.
    let (outs, times) = aot.run_profiled(&random_inputs(&g, 7, 4)).unwrap();
    assert_eq!(outs.len(), g.outputs.len());
    let kernels = &plan.plan.kernels;
    assert_eq!(times.len(), kernels.len(), "{name}: profiled kernels");
    let loops = kernels
        .iter()
        .filter(|k| matches!(k, kiln_plan::Kernel::Loop(_)))
        .count();
    assert_eq!(times.iter().filter(|k| k.kind == "loop").count(), loops);
    let labels: Vec<String> = (0..kernels.len()).map(|i| plan.label(i)).collect();
    let got: Vec<String> = times.iter().map(|t| t.label.clone()).collect();
    assert_eq!(got, labels, "{name}: kernel labels");
}

#[test]
fn aot_matches_the_portable_plan_on_random_inputs_bert_tiny() {
    aot_matches_the_portable_plan("tiny/bert_tiny");
}

#[test]
fn aot_matches_the_portable_plan_on_random_inputs_gpt2_tiny() {
    aot_matches_the_portable_plan("tiny/gpt2_tiny");
}

#[test]
fn side_file_weights_are_mapped_and_checked() {
    let (g, dir) = optimised("tiny/vit_tiny");
    let data = TestData::load(&dir.join("test_data_set_0")).expect("test data");
    let tmp = tempfile::tempdir().unwrap();
    let lib = tmp.path().join("libvit.so");
    let r = build_library(
        &g,
        &lib,
        &BuildOptions {
            weights: WeightsMode::File,
            ..BuildOptions::default()
        },
    )
    .unwrap();
    let wf = r.weights_file.expect("a side file");
    let inputs: Vec<Tensor> = data.inputs.iter().map(|(_, t)| t.clone()).collect();
    let mut aot = AotLibrary::load(&lib, Some(&wf)).unwrap();
    check_outputs(
        "vit_tiny (side file)",
        &aot.run(&inputs).unwrap(),
        &data.outputs,
    );
    // Without the file, or with a damaged one, create fails with a message.
    let e = AotLibrary::load(&lib, None).unwrap_err().to_string();
    assert!(e.contains("side file"), "{e}");
    let bad = tmp.path().join("bad.weights");
    let mut bytes = std::fs::read(&wf).unwrap();
    bytes.truncate(bytes.len() - 1);
    std::fs::write(&bad, bytes).unwrap();
    let e = AotLibrary::load(&lib, Some(&bad)).unwrap_err().to_string();
    assert!(e.contains("not the ones"), "{e}");
}

/// The CPU the valgrind test compiles for: the newest level valgrind 3.19 decodes.
const VALGRIND_CPU: &str = "x86-64-v3";

#[test]
fn c_host_is_clean_under_valgrind() {
    if Command::new("valgrind").arg("--version").output().is_err() {
        eprintln!("SKIPPED: valgrind is not installed");
        return;
    }
    let (g, dir) = optimised("tiny/bert_tiny");
    let data = TestData::load(&dir.join("test_data_set_0")).expect("test data");
    let tmp = tempfile::tempdir().unwrap();
    // valgrind 3.19 cannot decode AVX-512 (EVEX) instructions, which `native` may select
    // on AVX-512 hosts (mask-register compares for the vector selects): pin AVX2.
    let host = build_with_host(&g, tmp.path(), WeightsMode::Embed, VALGRIND_CPU);
    let inputs: Vec<Tensor> = data.inputs.iter().map(|(_, t)| t.clone()).collect();
    let data_dir = tmp.path().join("data");
    std::fs::create_dir_all(&data_dir).unwrap();
    for (i, t) in inputs.iter().enumerate() {
        write_tensor(&data_dir.join(format!("in_{i}.bin")), t);
    }
    let out = Command::new("valgrind")
        .args([
            "--error-exitcode=99",
            "--leak-check=full",
            "--errors-for-leak-kinds=definite,indirect",
            "--show-leak-kinds=definite,indirect",
        ])
        .arg(&host)
        .arg(&data_dir)
        .args(["-", "2"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "valgrind reported problems:\n{err}");
    assert!(err.contains("ERROR SUMMARY: 0 errors"), "{err}");
    let outs: Vec<Tensor> = (0..data.outputs.len())
        .map(|i| read_tensor(&data_dir.join(format!("out_{i}.bin"))))
        .collect();
    check_outputs("bert_tiny under valgrind", &outs, &data.outputs);
}

#[test]
fn target_cpu_is_checked_and_portable_levels_build() {
    let (g, dir) = optimised("tiny/vit_tiny");
    let tmp = tempfile::tempdir().unwrap();
    let lib = tmp.path().join("libmodel.so");
    let opts = |cpu: &str| BuildOptions {
        target_cpu: cpu.into(),
        ..BuildOptions::default()
    };
    let e = build_library(&g, &lib, &opts("bogus"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown target CPU `bogus`"), "{e}");
    build_library(&g, &lib, &opts("x86-64-v3")).unwrap();
    let data = TestData::load(&dir.join("test_data_set_0")).expect("test data");
    let inputs: Vec<Tensor> = data.inputs.iter().map(|(_, t)| t.clone()).collect();
    let mut aot = AotLibrary::load(&lib, None).unwrap();
    check_outputs(
        "vit_tiny x86-64-v3",
        &aot.run(&inputs).unwrap(),
        &data.outputs,
    );
}
