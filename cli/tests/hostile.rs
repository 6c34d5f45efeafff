//! Hostile and careless input, end to end: a corpus of malformed and resource-hostile
//! models, generated here with the ONNX protobuf structs (no binary blobs), run through
//! `kiln info`, `run`, `inspect` and `build` under an address-space limit (`ulimit -v`).
//! A malformed model must exit 1 with a one- or two-line message and never panic or
//! abort; a tiny model that asks for gigabytes must load without allocating them and fail
//! to run with a clear error. Also careless command lines (`--dim`, `--input`) and a
//! closed stdout.
//!
//! With `KILN_WRITE_FUZZ_SEEDS=DIR` set, `write_fuzz_seeds` writes the corpus's models
//! into DIR as seeds for the `onnx_decode` fuzz target (`scripts/fuzz.sh` does this).

use kiln_frontend::onnx::proto::*;
use kiln_ir::{DType, Tensor};
use prost::Message;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The address-space limit every corpus command runs under, in KiB (`ulimit -v`): far
/// below the gigabytes the hostile models ask for, so an unchecked allocation aborts.
const ULIMIT_KB: u64 = 4 << 20;

/// The longest error message accepted: one or two readable lines.
const MAX_MESSAGE_BYTES: usize = 400;

fn kiln_limited(args: &[&str]) -> Output {
    Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -v {ULIMIT_KB} && exec \"$0\" \"$@\""))
        .arg(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .expect("running kiln")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

// ---- building models ----

fn vi(name: &str, dtype: DType, dims: &[&str]) -> ValueInfoProto {
    use tensor_shape_proto::{dimension::Value, Dimension};
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d.parse::<i64>() {
                Ok(v) => Value::DimValue(v),
                Err(_) => Value::DimParam(d.to_string()),
            }),
            denotation: String::new(),
        })
        .collect();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: dtype.onnx_code(),
                shape: Some(TensorShapeProto { dim }),
            })),
            denotation: String::new(),
        }),
        ..Default::default()
    }
}

/// An output whose type the importer infers.
fn out(name: &str) -> ValueInfoProto {
    ValueInfoProto {
        name: name.into(),
        ..Default::default()
    }
}

fn node(op: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
    NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        name: format!("{op}_{}", outputs.first().unwrap_or(&"")),
        op_type: op.into(),
        ..Default::default()
    }
}

fn i64s(name: &str, v: &[i64]) -> TensorProto {
    kiln_frontend::onnx::tensor_to_proto(name, &Tensor::from_vec(vec![v.len()], v.to_vec()))
}

fn scalar(name: &str, v: i64) -> TensorProto {
    kiln_frontend::onnx::tensor_to_proto(name, &Tensor::from_vec(vec![], vec![v]))
}

fn model_with(
    nodes: Vec<NodeProto>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
    inits: Vec<TensorProto>,
    opset: i64,
) -> ModelProto {
    ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: opset,
        }],
        graph: Some(GraphProto {
            node: nodes,
            name: "g".into(),
            initializer: inits,
            input: inputs,
            output: outputs,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn relu_model() -> ModelProto {
    model_with(
        vec![node("Relu", &["x"], &["y"])],
        vec![vi("x", DType::F32, &["batch", "4"])],
        vec![out("y")],
        vec![],
        17,
    )
}

/// Malformed models: every command must exit 1 without panicking.
fn malformed() -> Vec<(&'static str, Vec<u8>)> {
    let relu = relu_model().encode_to_vec();
    let mut v: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("garbage", vec![0xff; 64]),
        ("truncated", relu[..relu.len() / 2].to_vec()),
        ("no_graph", ModelProto::default().encode_to_vec()),
    ];
    let mut m = relu_model();
    m.opset_import[0].version = 30;
    v.push(("opset_30", m.encode_to_vec()));
    let mut m = relu_model();
    let g = m.graph.as_mut().unwrap();
    g.output.push(out("y"));
    v.push(("duplicate_output", m.encode_to_vec()));
    let mut m = relu_model();
    let g = m.graph.as_mut().unwrap();
    g.node[0].op_type = "NoSuchOp".into();
    g.node[0].name.clear();
    v.push(("unsupported_unnamed", m.encode_to_vec()));
    let mut m = relu_model();
    m.graph.as_mut().unwrap().node[0].input[0] = "nowhere".into();
    v.push(("missing_input", m.encode_to_vec()));
    v.push((
        "cycle",
        model_with(
            vec![node("Relu", &["b"], &["a"]), node("Relu", &["a"], &["b"])],
            vec![],
            vec![out("b")],
            vec![],
            17,
        )
        .encode_to_vec(),
    ));
    v.push((
        "reshape_mismatch",
        model_with(
            vec![node("Reshape", &["x", "s"], &["y"])],
            vec![vi("x", DType::F32, &["2", "3"])],
            vec![out("y")],
            vec![i64s("s", &[7])],
            17,
        )
        .encode_to_vec(),
    ));
    // An initializer that claims 2^40 elements but holds 8 bytes.
    let mut t = i64s("w", &[1]);
    t.dims = vec![1 << 20, 1 << 20];
    v.push((
        "short_initializer",
        model_with(
            vec![node("Relu", &["w"], &["y"])],
            vec![],
            vec![out("y")],
            vec![t],
            17,
        )
        .encode_to_vec(),
    ));
    let mut t = i64s("w", &[1]);
    t.dims = vec![i64::MAX, i64::MAX];
    v.push((
        "overflowing_initializer",
        model_with(
            vec![node("Relu", &["w"], &["y"])],
            vec![],
            vec![out("y")],
            vec![t],
            17,
        )
        .encode_to_vec(),
    ));
    v.push(("nested_if", nested_if(120).encode_to_vec()));
    // A Loop whose body takes no carried value though the node passes one.
    v.push((
        "loop_body_arity",
        loop_model(
            vec![vi("i", DType::I64, &[]), vi("c", DType::Bool, &[])],
            vec![node("Identity", &["c"], &["c_out"])],
            vec![out("c_out")],
        )
        .encode_to_vec(),
    ));
    // A Loop whose body reads a value defined nowhere.
    v.push((
        "loop_body_undefined",
        loop_model(
            vec![
                vi("i", DType::I64, &[]),
                vi("c", DType::Bool, &[]),
                vi("v", DType::F32, &["3"]),
            ],
            vec![
                node("Identity", &["c"], &["c_out"]),
                node("Add", &["v", "nowhere"], &["v_out"]),
            ],
            vec![out("c_out"), out("v_out")],
        )
        .encode_to_vec(),
    ));
    v
}

/// `y = Loop(n, "", x)` with the given body.
fn loop_model(
    inputs: Vec<ValueInfoProto>,
    nodes: Vec<NodeProto>,
    outputs: Vec<ValueInfoProto>,
) -> ModelProto {
    let body = GraphProto {
        node: nodes,
        name: "body".into(),
        input: inputs,
        output: outputs,
        ..Default::default()
    };
    let mut n = node("Loop", &["n", "", "x"], &["y"]);
    n.attribute.push(AttributeProto {
        name: "body".into(),
        r#type: attr_type::GRAPH,
        g: Some(Box::new(body)),
        ..Default::default()
    });
    model_with(
        vec![n],
        vec![vi("x", DType::F32, &["3"])],
        vec![out("y")],
        vec![scalar("n", 3)],
        17,
    )
}

/// `If` inside `If` `depth` times: past prost's recursion limit of 100.
fn nested_if(depth: usize) -> ModelProto {
    let mut g = GraphProto {
        node: vec![node("Relu", &["x"], &["y"])],
        output: vec![out("y")],
        ..Default::default()
    };
    for _ in 0..depth {
        let mut n = node("If", &["c"], &["y"]);
        n.attribute.push(AttributeProto {
            name: "then_branch".into(),
            r#type: attr_type::GRAPH,
            g: Some(Box::new(g)),
            ..Default::default()
        });
        g = GraphProto {
            node: vec![n],
            output: vec![out("y")],
            ..Default::default()
        };
    }
    ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }],
        graph: Some(g),
        ..Default::default()
    }
}

/// Well-formed models of a few dozen bytes whose outputs would take gigabytes or more:
/// `info` must load them without allocating that (exit 0), `run` must refuse (exit 1).
fn hostile() -> Vec<(&'static str, ModelProto)> {
    let generated = |op: &str, inputs: &[&str], inits: Vec<TensorProto>| {
        model_with(
            vec![node(op, inputs, &["y"])],
            vec![],
            vec![out("y")],
            inits,
            17,
        )
    };
    vec![
        (
            "constant_of_shape_2e31",
            generated("ConstantOfShape", &["s"], vec![i64s("s", &[1 << 31])]),
        ),
        (
            "constant_of_shape_4879104x98",
            generated("ConstantOfShape", &["s"], vec![i64s("s", &[4879104, 98])]),
        ),
        (
            "expand_2e40",
            generated(
                "Expand",
                &["x", "s"],
                vec![i64s("x", &[1]), i64s("s", &[1 << 20, 1 << 20])],
            ),
        ),
        (
            "tile_2e40",
            generated(
                "Tile",
                &["x", "r"],
                vec![i64s("x", &[1]), i64s("r", &[1 << 40])],
            ),
        ),
        (
            "range_2e40",
            generated(
                "Range",
                &["a", "b", "d"],
                vec![scalar("a", 0), scalar("b", 1 << 40), scalar("d", 1)],
            ),
        ),
        (
            "range_2e30_then_expand",
            model_with(
                vec![
                    node("Range", &["a", "b", "d"], &["r"]),
                    node("Expand", &["r", "s"], &["y"]),
                ],
                vec![],
                vec![out("y")],
                vec![
                    scalar("a", 0),
                    scalar("b", 1 << 16),
                    scalar("d", 1),
                    i64s("s", &[1 << 16, 1 << 16]),
                ],
                17,
            ),
        ),
    ]
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let p = dir.join(format!("{name}.onnx"));
    std::fs::write(&p, bytes).unwrap();
    p.display().to_string()
}

fn check_clean_failure(what: &str, o: &Output) {
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{what}: {}", text(o));
    assert!(!stderr.contains("panicked"), "{what}: {stderr}");
    assert!(
        stderr.len() <= MAX_MESSAGE_BYTES && stderr.trim_end().lines().count() <= 2,
        "{what}: a {} byte message: {stderr}",
        stderr.len()
    );
}

/// The commands of the corpus, for a model at `path` (`build` writes into `dir`).
fn commands(path: &str, dir: &Path) -> Vec<Vec<String>> {
    let lib = dir.join("lib.so").display().to_string();
    [
        vec!["info", path],
        vec!["run", path, "--random-inputs"],
        vec!["inspect", path],
        vec!["build", path, "-o", &lib],
    ]
    .into_iter()
    .map(|c| c.into_iter().map(String::from).collect())
    .collect()
}

#[test]
fn malformed_models_exit_1_without_panicking_under_a_memory_limit() {
    let dir = tempfile::tempdir().unwrap();
    let mut models: Vec<(String, String)> = malformed()
        .into_iter()
        .map(|(name, bytes)| (name.to_string(), write(dir.path(), name, &bytes)))
        .collect();
    // A directory given as the model.
    models.push(("directory".into(), dir.path().display().to_string()));
    for (name, path) in &models {
        for cmd in commands(path, dir.path()) {
            let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
            let o = kiln_limited(&args);
            check_clean_failure(&format!("{name}: kiln {}", args[0]), &o);
        }
    }
}

#[test]
fn models_asking_for_gigabytes_load_without_them_and_fail_to_run() {
    let dir = tempfile::tempdir().unwrap();
    for (name, m) in hostile() {
        let bytes = m.encode_to_vec();
        assert!(bytes.len() < 200, "{name}: {} bytes", bytes.len());
        let path = write(dir.path(), name, &bytes);
        let o = kiln_limited(&["info", &path]);
        assert_eq!(o.status.code(), Some(0), "{name}: info: {}", text(&o));
        for backend in ["jit", "interp"] {
            let o = kiln_limited(&["run", &path, "--random-inputs", "--backend", backend]);
            check_clean_failure(&format!("{name}: run --backend {backend}"), &o);
            let stderr = String::from_utf8_lossy(&o.stderr);
            assert!(
                stderr.contains("memory limit") || stderr.contains("limit of"),
                "{name}: {stderr}"
            );
        }
        // inspect and build optimise (and build compiles) the graph: they may succeed
        // or refuse, but must not allocate what the model asks for, or panic.
        for cmd in commands(&path, dir.path()).into_iter().skip(2) {
            let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
            let o = kiln_limited(&args);
            let stderr = String::from_utf8_lossy(&o.stderr);
            assert!(
                matches!(o.status.code(), Some(0 | 1)) && !stderr.contains("panicked"),
                "{name}: kiln {}: {}",
                args[0],
                text(&o)
            );
        }
    }
}

#[test]
fn the_memory_limit_is_named_in_the_error_and_can_be_raised() {
    let dir = tempfile::tempdir().unwrap();
    // 2^20 f32 zeros: 4 MiB of output, 16 MiB while gathered.
    let m = model_with(
        vec![node("ConstantOfShape", &["s"], &["y"])],
        vec![],
        vec![out("y")],
        vec![i64s("s", &[1 << 20])],
        17,
    );
    let path = write(dir.path(), "ones", &m.encode_to_vec());
    let o = kiln_limited(&["run", &path, "--backend", "interp", "--max-memory", "1M"]);
    check_clean_failure("--max-memory 1M", &o);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("ConstantOfShape") || stderr.contains("constant_of_shape"),
        "names the op: {stderr}"
    );
    assert!(
        stderr.contains("[1048576]") && stderr.contains("1.0 MB"),
        "{stderr}"
    );
    let o = kiln_limited(&["run", &path, "--backend", "interp", "--max-memory", "64M"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let o = kiln_limited(&["info", &path, "--max-memory", "lots"]);
    check_clean_failure("--max-memory lots", &o);
}

#[test]
fn careless_command_lines_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "relu", &relu_model().encode_to_vec());
    let npy = dir.path().join("x.npy");
    kiln_frontend::tensor_io::write_npy(&npy, &Tensor::from_vec(vec![1, 4], vec![0f32; 4]))
        .unwrap();
    let given = format!("x={}", npy.display());
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "run",
                &path,
                "--random-inputs",
                "--dim",
                "batch=1099511627776",
            ],
            "memory limit",
        ),
        (
            vec![
                "run",
                &path,
                "--random-inputs",
                "--dim",
                "batch=2147483648",
                "--dim",
                "batch=2147483648",
            ],
            "given twice",
        ),
        (
            vec!["run", &path, "--random-inputs", "--dim", "nosuch=4"],
            "no symbolic dim `nosuch`",
        ),
        (
            vec!["run", &path, "--input", &given, "--input", &given],
            "given twice",
        ),
    ];
    for (args, want) in cases {
        let o = kiln_limited(&args);
        check_clean_failure(&args.join(" "), &o);
        assert!(text(&o).contains(want), "{}: {}", args.join(" "), text(&o));
    }
    // A huge dim on a model with two symbolic dims: no "capacity overflow" panic.
    let m = model_with(
        vec![node("Relu", &["x"], &["y"])],
        vec![vi("x", DType::F32, &["batch", "seq"])],
        vec![out("y")],
        vec![],
        17,
    );
    let path = write(dir.path(), "relu2", &m.encode_to_vec());
    let o = kiln_limited(&[
        "run",
        &path,
        "--random-inputs",
        "--dim",
        "batch=2147483648",
        "--dim",
        "seq=2147483648",
    ]);
    check_clean_failure("batch × seq = 2^62", &o);
}

#[test]
fn a_closed_stdout_ends_every_command_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "relu", &relu_model().encode_to_vec());
    let out = |f: &str| dir.path().join(f).display().to_string();
    let (kir, lib) = (out("relu.kir"), out("librelu.so"));
    for args in [
        vec!["info", path.as_str()],
        vec!["inspect", path.as_str()],
        vec!["inspect", path.as_str(), "--dot"],
        vec!["compare", path.as_str()],
        vec!["run", path.as_str(), "--random-inputs"],
        vec!["convert", path.as_str(), "-o", kir.as_str()],
        vec!["bench", path.as_str(), "--runs", "2", "--warmup", "1"],
        vec!["build", path.as_str(), "-o", lib.as_str()],
        vec!["--help"],
        vec!["--version"],
    ] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Close the read end before kiln has written anything (`kiln info m | true`).
        drop(child.stdout.take());
        let o = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(stderr.is_empty(), "kiln {}: {stderr}", args[0]);
        assert_ne!(o.status.code(), Some(101), "kiln {}", args[0]);
    }
}

/// Writes the corpus's models as fuzz seeds into `$KILN_WRITE_FUZZ_SEEDS` (no-op without).
#[test]
fn write_fuzz_seeds() {
    let Some(dir) = std::env::var_os("KILN_WRITE_FUZZ_SEEDS").map(PathBuf::from) else {
        return;
    };
    std::fs::create_dir_all(&dir).unwrap();
    for (name, bytes) in malformed() {
        write(&dir, name, &bytes);
    }
    for (name, m) in hostile() {
        write(&dir, name, &m.encode_to_vec());
    }
    write(&dir, "relu", &relu_model().encode_to_vec());
}

/// `kiln run MODEL --random-inputs` works on every shared model: integer inputs that index
/// a table stay within its rows (bert's token types in 2 rows, OPT's positions computed
/// from the mask), and related symbolic dims (a KV model's `total_seq = past_seq + 1`) take
/// the sizes of the export.json beside the model.
#[test]
fn random_inputs_run_every_shared_model() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/models");
    let mut ran = 0;
    for set in ["tiny", "bench"] {
        let Ok(entries) = std::fs::read_dir(root.join(set)) else {
            continue;
        };
        for e in entries.flatten() {
            let model = e.path().join("model.onnx");
            if !model.is_file() {
                continue;
            }
            let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
                .args(["run", &model.display().to_string(), "--random-inputs"])
                .output()
                .unwrap();
            assert_eq!(
                o.status.code(),
                Some(0),
                "{}: {}",
                model.display(),
                text(&o)
            );
            ran += 1;
        }
    }
    eprintln!("ran {ran} shared models with random inputs");
}
