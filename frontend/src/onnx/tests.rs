//! Importer tests on models built here with the prost structs: malformed inputs give
//! clean errors, and the lowered form (topological order, constants, migrations, If
//! captures) is what the IR expects.

use super::lower::{lower_model, LGraph};
use super::proto::*;
use super::{load_model, load_model_bytes, OnnxError};
use kiln_ir::{Attr, DType, Dim, OpKind, Storage, Tensor};
use prost::Message;

fn tensor_vi(name: &str, dtype: DType, dims: &[&str]) -> ValueInfoProto {
    use tensor_shape_proto::{dimension::Value, Dimension};
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: match d.parse::<i64>() {
                Ok(v) => Some(Value::DimValue(v)),
                Err(_) if d.is_empty() => None,
                Err(_) => Some(Value::DimParam(d.to_string())),
            },
            denotation: String::new(),
        })
        .collect();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: dtype.onnx_code(),
                // No dims given: no shape at all (rank unknown).
                shape: (!dims.is_empty()).then_some(TensorShapeProto { dim }),
            })),
            denotation: String::new(),
        }),
        ..Default::default()
    }
}

fn node(op: &str, inputs: &[&str], outputs: &[&str], attrs: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        name: format!("{op}_{}", outputs.first().unwrap_or(&"")),
        op_type: op.into(),
        attribute: attrs,
        ..Default::default()
    }
}

fn ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attr_type::INTS,
        ints: v.to_vec(),
        ..Default::default()
    }
}

fn int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attr_type::INT,
        i: v,
        ..Default::default()
    }
}

fn float(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attr_type::FLOAT,
        f: v,
        ..Default::default()
    }
}

fn init(name: &str, t: &Tensor) -> TensorProto {
    super::tensor_to_proto(name, t)
}

fn graph(
    nodes: Vec<NodeProto>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
    inits: Vec<TensorProto>,
) -> GraphProto {
    GraphProto {
        node: nodes,
        name: "g".into(),
        initializer: inits,
        input: inputs,
        output: outputs,
        ..Default::default()
    }
}

fn model(g: GraphProto, opset: i64) -> ModelProto {
    ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: opset,
        }],
        graph: Some(g),
        ..Default::default()
    }
}

fn load(m: &ModelProto) -> Result<kiln_ir::Graph, OnnxError> {
    load_model_bytes(m.encode_to_vec().into(), None)
}

fn lower(m: &ModelProto) -> LGraph {
    lower_model(m, None).unwrap()
}

/// `(op, inputs, outputs)` of each lowered node, for compact assertions.
fn shape_of(g: &LGraph) -> Vec<(OpKind, Vec<String>, Vec<String>)> {
    g.nodes
        .iter()
        .map(|n| {
            let ins = n
                .inputs
                .iter()
                .map(|i| i.clone().unwrap_or_default())
                .collect();
            (n.op, ins, n.outputs.clone())
        })
        .collect()
}

fn const_of<'a>(g: &'a LGraph, name: &str) -> &'a Tensor {
    let n = g
        .nodes
        .iter()
        .find(|n| n.op == OpKind::Constant && n.outputs[0] == name)
        .unwrap_or_else(|| panic!("no constant {name}"));
    match n.attrs.get("value") {
        Some(Attr::Tensor(t)) => t,
        _ => panic!("constant without value"),
    }
}

fn x_to_y(op: &str, attrs: Vec<AttributeProto>, opset: i64) -> ModelProto {
    model(
        graph(
            vec![node(op, &["x"], &["y"], attrs)],
            vec![tensor_vi("x", DType::F32, &["2", "3", "4"])],
            vec![tensor_vi("y", DType::F32, &[])],
            vec![],
        ),
        opset,
    )
}

#[test]
fn truncated_or_garbage_protobuf_is_a_decode_error() {
    let m = x_to_y("Relu", vec![], 17).encode_to_vec();
    for bad in [&m[..m.len() / 2], &[0xff, 0xff, 0xff, 0xff][..]] {
        let e = load_model_bytes(bad.to_vec().into(), None).unwrap_err();
        assert!(matches!(e, OnnxError::Decode { .. }), "{e}");
        assert!(e.to_string().contains("malformed ONNX protobuf"), "{e}");
    }
}

#[test]
fn constant_only_model_imports_with_initializers_as_constants() {
    // `w` is both an input and an initializer: a constant with a default value.
    let w = Tensor::from_vec(vec![2], vec![1.5f32, 2.5]);
    let g = graph(
        vec![node(
            "Constant",
            &[],
            &["c"],
            vec![ints("value_ints", &[4, 5])],
        )],
        vec![tensor_vi("w", DType::F32, &["2"])],
        vec![
            tensor_vi("w", DType::F32, &["2"]),
            tensor_vi("c", DType::I64, &["2"]),
        ],
        vec![init("w", &w)],
    );
    let ir = load(&model(g, 17)).unwrap();
    assert!(ir.inputs.is_empty());
    assert_eq!(ir.nodes.len(), 2);
    assert_eq!(ir.constant_value(ir.outputs[0]).unwrap().as_ref(), &w);
    assert_eq!(
        ir.constant_value(ir.outputs[1]).unwrap().to_i64s(),
        vec![4, 5]
    );
    kiln_ir::verify(&ir).unwrap();
}

#[test]
fn graph_input_types_keep_symbols_and_unknowns() {
    let g = graph(
        vec![],
        vec![tensor_vi("x", DType::F16, &["B", "", "3"])],
        vec![tensor_vi("x", DType::F16, &[])],
        vec![],
    );
    let ir = load(&model(g, 17)).unwrap();
    let ty = ir.ty(ir.inputs[0]);
    assert_eq!(ty.dtype, DType::F16);
    assert_eq!(
        ty.shape.dims().unwrap(),
        &[Dim::Sym("B".into()), Dim::Unknown, Dim::Fixed(3)]
    );
}

#[test]
fn negative_and_zero_input_dims_are_fresh_symbols_and_elsewhere_unknown() {
    // As Paddle exports: -1 (and 0) for "unknown" on graph inputs; a user dim param that
    // happens to be the fresh name pushes it aside.
    let g = graph(
        vec![node("Relu", &["x"], &["y"], vec![])],
        vec![
            tensor_vi("x", DType::F32, &["-1", "0", "unk_x_0", "4"]),
            tensor_vi("z", DType::F32, &["-7"]),
        ],
        vec![tensor_vi("y", DType::F32, &["-1", "-1", "-1", "4"])],
        vec![],
    );
    let ir = load(&model(g, 17)).unwrap();
    let sym = |s: &str| Dim::Sym(s.into());
    assert_eq!(
        ir.ty(ir.inputs[0]).shape.dims().unwrap(),
        &[
            sym("unk_x_0_"),
            sym("unk_x_1"),
            sym("unk_x_0"),
            Dim::Fixed(4)
        ]
    );
    assert_eq!(ir.ty(ir.inputs[1]).shape.dims().unwrap(), &[sym("unk_z_0")]);
    // The output's -1s are unknown, so the input's symbols flow through.
    assert_eq!(
        ir.ty(ir.outputs[0]).shape.dims().unwrap(),
        ir.ty(ir.inputs[0]).shape.dims().unwrap()
    );
}

#[test]
fn declared_symbols_of_another_tool_yield_to_inferred_ones() {
    // ONNX Runtime's shape inference writes fresh `unk__N` names into value_info (and
    // graph outputs) for dims kiln infers as the input's `S`: the inferred symbol wins, so
    // equal dims stay equal; a declared symbol where inference knows nothing is kept.
    let mut g = graph(
        vec![
            node("Relu", &["x"], &["y"], vec![]),
            node("Add", &["x", "y"], &["z"], vec![]),
            node("NonZero", &["z"], &["nz"], vec![]),
        ],
        vec![tensor_vi("x", DType::F32, &["S", "4"])],
        vec![
            tensor_vi("z", DType::F32, &["unk__1", "4"]),
            tensor_vi("nz", DType::I64, &["2", "N"]),
        ],
        vec![],
    );
    g.value_info = vec![tensor_vi("y", DType::F32, &["unk__0", "4"])];
    let ir = load(&model(g, 17)).unwrap();
    let sym = |s: &str| Dim::Sym(s.into());
    let by_name = |n: &str| {
        let v = ir.values.iter().position(|v| v.name == n).unwrap();
        ir.ty(kiln_ir::ValueId(v as u32))
            .shape
            .dims()
            .unwrap()
            .to_vec()
    };
    assert_eq!(by_name("y"), [sym("S"), Dim::Fixed(4)]);
    assert_eq!(by_name("z"), [sym("S"), Dim::Fixed(4)]);
    assert_eq!(by_name("nz")[0], Dim::Fixed(2));
}

fn with_init(t: TensorProto) -> ModelProto {
    let name = t.name.clone();
    model(
        graph(
            vec![],
            vec![],
            vec![tensor_vi(&name, DType::F32, &[])],
            vec![t],
        ),
        17,
    )
}

#[test]
fn malformed_initializers_are_errors_naming_the_tensor() {
    let base = init("w", &Tensor::from_vec(vec![2], vec![1.0f32, 2.0]));
    let cases: Vec<(TensorProto, &str)> = vec![
        (
            TensorProto {
                data_type: 99,
                ..base.clone()
            },
            "data type 99",
        ),
        (
            TensorProto {
                data_type: 8,
                ..base.clone()
            },
            "STRING",
        ),
        (
            TensorProto {
                dims: vec![-2],
                ..base.clone()
            },
            "negative dimension",
        ),
        (
            TensorProto {
                dims: vec![1 << 40, 1 << 40, 1 << 40],
                ..base.clone()
            },
            "overflows",
        ),
        (
            TensorProto {
                dims: vec![3],
                ..base.clone()
            },
            "needs 12 bytes",
        ),
        (
            TensorProto {
                raw_data: Default::default(),
                float_data: vec![1.0],
                ..base.clone()
            },
            "float_data has 1",
        ),
    ];
    for (t, want) in cases {
        let e = load(&with_init(t)).unwrap_err().to_string();
        assert!(e.contains("`w`") && e.contains(want), "{want}: {e}");
    }
}

#[test]
fn typed_fields_decode_for_every_dtype() {
    for dt in DType::ALL {
        let mut t = TensorProto {
            dims: vec![2],
            data_type: dt.onnx_code(),
            name: "t".into(),
            ..Default::default()
        };
        match dt {
            DType::F32 => t.float_data = vec![0.0, 1.0],
            DType::F64 => t.double_data = vec![0.0, 1.0],
            DType::I64 => t.int64_data = vec![0, 1],
            DType::U32 | DType::U64 => t.uint64_data = vec![0, 1],
            DType::F16 => t.int32_data = vec![0, 0x3c00],
            DType::BF16 => t.int32_data = vec![0, 0x3f80],
            _ => t.int32_data = vec![0, 1],
        }
        let x = super::tensor_from_proto(&t, None).unwrap();
        assert_eq!((x.dtype(), x.to_f64s()), (dt, vec![0.0, 1.0]), "{dt}");
    }
}

#[test]
fn a_cycle_is_an_error_naming_a_node_on_it() {
    // a -> b -> a, and c downstream of the cycle.
    let g = graph(
        vec![
            node("Relu", &["y"], &["c"], vec![]),
            node("Add", &["x", "b"], &["a"], vec![]),
            node("Neg", &["a"], &["b"], vec![]),
            node("Abs", &["b"], &["y"], vec![]),
        ],
        vec![tensor_vi("x", DType::F32, &["1"])],
        vec![tensor_vi("c", DType::F32, &[])],
        vec![],
    );
    let e = load(&model(g, 17)).unwrap_err();
    match &e {
        OnnxError::Cycle { node, .. } => assert!(node == "Add_a" || node == "Neg_b", "{e}"),
        _ => panic!("{e}"),
    }
}

#[test]
fn a_missing_input_is_an_error_naming_value_node_and_op() {
    let g = graph(
        vec![node("MatMul", &["x", "weight"], &["y"], vec![])],
        vec![tensor_vi("x", DType::F32, &["1", "2"])],
        vec![tensor_vi("y", DType::F32, &[])],
        vec![],
    );
    let e = load(&model(g, 17)).unwrap_err().to_string();
    assert_eq!(
        e,
        "missing initializer or input `weight` used by node `MatMul_y` (MatMul)"
    );
}

#[test]
fn a_value_defined_twice_is_an_error() {
    let g = graph(
        vec![node("Relu", &["x"], &["x"], vec![])],
        vec![tensor_vi("x", DType::F32, &["1"])],
        vec![tensor_vi("x", DType::F32, &[])],
        vec![],
    );
    let e = load(&model(g, 17)).unwrap_err().to_string();
    assert!(e.contains("`x` is defined twice"), "{e}");
}

#[test]
fn unsorted_nodes_are_sorted_topologically_and_sorted_files_keep_their_order() {
    let g = graph(
        vec![
            node("Relu", &["b"], &["c"], vec![]),
            node("Neg", &["x"], &["a"], vec![]),
            node("Abs", &["a"], &["b"], vec![]),
            node("Exp", &["x"], &["d"], vec![]),
        ],
        vec![tensor_vi("x", DType::F32, &["1"])],
        vec![
            tensor_vi("c", DType::F32, &[]),
            tensor_vi("d", DType::F32, &[]),
        ],
        vec![],
    );
    let lg = lower(&model(g, 17));
    let ops: Vec<OpKind> = lg.nodes.iter().map(|n| n.op).collect();
    // Ready nodes are taken in file order.
    assert_eq!(ops, [OpKind::Neg, OpKind::Abs, OpKind::Relu, OpKind::Exp]);
    let g = graph(
        vec![
            node("Exp", &["x"], &["d"], vec![]),
            node("Neg", &["x"], &["a"], vec![]),
            node("Relu", &["d"], &["c"], vec![]),
            node("Abs", &["a"], &["b"], vec![]),
        ],
        vec![tensor_vi("x", DType::F32, &["1"])],
        vec![
            tensor_vi("c", DType::F32, &[]),
            tensor_vi("b", DType::F32, &[]),
        ],
        vec![],
    );
    let ops: Vec<OpKind> = lower(&model(g, 17)).nodes.iter().map(|n| n.op).collect();
    assert_eq!(ops, [OpKind::Exp, OpKind::Neg, OpKind::Relu, OpKind::Abs]);
}

#[test]
fn unsupported_ops_are_listed_together_with_counts_and_first_nodes() {
    let mut ms = node("FusedMatMul", &["x", "x"], &["a"], vec![]);
    ms.domain = "com.microsoft".into();
    let g = graph(
        vec![
            node("Relu", &["x"], &["r"], vec![]),
            node("Loop2", &["r"], &["l1"], vec![]),
            ms,
            node("Loop2", &["l1"], &["l2"], vec![]),
            node("StringNormalizer", &["l2"], &["s"], vec![]),
        ],
        vec![tensor_vi("x", DType::F32, &["1"])],
        vec![tensor_vi("s", DType::F32, &[])],
        vec![],
    );
    let e = load(&model(g, 17)).unwrap_err();
    let OnnxError::UnsupportedOps { ops } = &e else {
        panic!("{e}")
    };
    let summary: Vec<(&str, usize, &str)> = ops
        .iter()
        .map(|o| (o.op.as_str(), o.count, o.first_node.as_str()))
        .collect();
    assert_eq!(
        summary,
        [
            ("Loop2", 2, "Loop2_l1"),
            ("StringNormalizer", 1, "StringNormalizer_s"),
            ("com.microsoft.FusedMatMul", 1, "FusedMatMul_a"),
        ]
    );
    let msg = e.to_string();
    assert!(
        msg.starts_with("the model uses 3 unsupported op type(s): Loop2 ×2"),
        "{msg}"
    );
}

#[test]
fn external_data_escaping_the_folder_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    for loc in ["../secret.bin", "/etc/passwd", "a/../../b.bin"] {
        let t = TensorProto {
            dims: vec![1],
            data_type: 1,
            name: "w".into(),
            data_location: DATA_LOCATION_EXTERNAL,
            external_data: vec![StringStringEntryProto {
                key: "location".into(),
                value: loc.into(),
            }],
            ..Default::default()
        };
        let path = dir.path().join("m.onnx");
        std::fs::write(&path, with_init(t).encode_to_vec()).unwrap();
        let e = load_model(&path).unwrap_err();
        assert!(matches!(e, OnnxError::ExternalData { .. }), "{e}");
        let msg = e.to_string();
        assert!(msg.contains("`w`") && msg.contains(loc), "{msg}");
    }
}

fn kv(k: &str, v: &str) -> StringStringEntryProto {
    StringStringEntryProto {
        key: k.into(),
        value: v.into(),
    }
}

/// Writes `pad` zero bytes and then `xs` to `dir/file`, and returns an f32 tensor proto `w`
/// of `xs.len()` elements that points there with `external` entries.
fn external_f32(
    dir: &std::path::Path,
    file: &str,
    pad: usize,
    xs: &[f32],
    external: Vec<StringStringEntryProto>,
) -> TensorProto {
    let mut bytes = vec![0u8; pad];
    for x in xs {
        bytes.extend_from_slice(&x.to_le_bytes());
    }
    std::fs::write(dir.join(file), &bytes).unwrap();
    TensorProto {
        dims: vec![xs.len() as i64],
        data_type: 1,
        name: "w".into(),
        data_location: DATA_LOCATION_EXTERNAL,
        external_data: external,
        ..Default::default()
    }
}

#[test]
fn external_data_is_read_at_offset_relative_to_the_model() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("data")).unwrap();
    let t = external_f32(
        dir.path(),
        "data/w.bin",
        8,
        &[1.0, -2.0, 3.5],
        vec![
            kv("location", "data/w.bin"),
            kv("offset", "8"),
            kv("length", "12"),
        ],
    );
    let path = dir.path().join("m.onnx");
    std::fs::write(&path, with_init(t.clone()).encode_to_vec()).unwrap();
    let g = load_model(&path).unwrap();
    let w = g.constant_value(g.outputs[0]).unwrap();
    assert_eq!(w.as_slice::<f32>().unwrap(), &[1.0, -2.0, 3.5]);
    // Aligned in the mapped file: used in place, no copy.
    assert_eq!(w.data().storage(), Storage::Mapped);
    // Past the end of the file: an error, not a panic.
    let mut t2 = t;
    t2.external_data[1] = kv("offset", "16");
    std::fs::write(&path, with_init(t2).encode_to_vec()).unwrap();
    let e = load_model(&path).unwrap_err().to_string();
    assert!(e.contains("outside the file"), "{e}");
}

#[test]
fn unaligned_weights_are_copied_once_and_shared() {
    let dir = tempfile::tempdir().unwrap();
    let t = external_f32(
        dir.path(),
        "w.bin",
        3,
        &[1.0, f32::NAN, -0.0],
        vec![kv("location", "w.bin"), kv("offset", "3")],
    );
    let path = dir.path().join("m.onnx");
    std::fs::write(&path, with_init(t).encode_to_vec()).unwrap();
    let g = load_model(&path).unwrap();
    let w = g.constant_value(g.outputs[0]).unwrap();
    let got: Vec<u32> = w
        .as_slice::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect();
    let want: Vec<u32> = [1.0f32, f32::NAN, -0.0]
        .iter()
        .map(|x| x.to_bits())
        .collect();
    assert_eq!(got, want);
    // Offset 3 is not aligned for f32: one copy, which clones then share.
    assert_eq!(w.data().storage(), Storage::Shared);
    let c = w.clone();
    assert_eq!(
        c.as_slice::<f32>().unwrap().as_ptr(),
        w.as_slice::<f32>().unwrap().as_ptr()
    );
}

#[test]
fn dtype_attributes_become_kiln_dtype_names() {
    let m = x_to_y("Cast", vec![int("to", 7)], 17);
    let lg = lower(&m);
    assert_eq!(lg.nodes[0].attrs.get("to"), Some(&Attr::Str("i64".into())));
    let e = load(&x_to_y("Cast", vec![int("to", 8)], 17)).unwrap_err();
    assert!(
        matches!(e, OnnxError::UnsupportedDtype { code: 8, .. }),
        "{e}"
    );
}

#[test]
fn unnamed_outputs_get_fresh_names_and_trailing_ones_are_dropped() {
    let g = graph(
        vec![
            node("TopK", &["x", "k"], &["", "idx"], vec![]),
            node("Dropout", &["x"], &["d", ""], vec![]),
        ],
        vec![
            tensor_vi("x", DType::F32, &["4"]),
            tensor_vi("k", DType::I64, &["1"]),
        ],
        vec![
            tensor_vi("idx", DType::I64, &[]),
            tensor_vi("d", DType::F32, &[]),
        ],
        vec![],
    );
    let lg = lower(&model(g, 17));
    let topk = &lg.nodes[0].outputs;
    assert_eq!(topk.len(), 2);
    assert!(!topk[0].is_empty() && topk[0] != "idx" && topk[1] == "idx");
    assert_eq!(lg.nodes[1].outputs, ["d"]);
}

#[test]
#[allow(clippy::type_complexity)]
fn old_opset_attributes_become_constant_inputs() {
    let cases: Vec<(&str, Vec<AttributeProto>, i64, Vec<(usize, Vec<i64>)>)> = vec![
        (
            "Unsqueeze",
            vec![ints("axes", &[0])],
            11,
            vec![(1, vec![0])],
        ),
        ("Squeeze", vec![ints("axes", &[1])], 12, vec![(1, vec![1])]),
        (
            "ReduceSum",
            vec![ints("axes", &[1, 2])],
            12,
            vec![(1, vec![1, 2])],
        ),
        (
            "ReduceMean",
            vec![ints("axes", &[-1])],
            17,
            vec![(1, vec![-1])],
        ),
        (
            "Split",
            vec![ints("split", &[1, 1])],
            11,
            vec![(1, vec![1, 1])],
        ),
        (
            "Slice",
            vec![ints("starts", &[0]), ints("ends", &[2]), ints("axes", &[1])],
            9,
            vec![(1, vec![0]), (2, vec![2]), (3, vec![1])],
        ),
        (
            "Pad",
            vec![ints("pads", &[0, 1, 0, 0, 1, 0])],
            10,
            vec![(1, vec![0, 1, 0, 0, 1, 0])],
        ),
        ("TopK", vec![int("k", 2)], 9, vec![(1, vec![2])]),
    ];
    for (op, attrs, opset, want) in cases {
        let lg = lower(&x_to_y(op, attrs, opset));
        let n = lg.nodes.last().unwrap();
        assert!(n.attrs.is_empty(), "{op}: {:?}", n.attrs);
        for (i, v) in want {
            let name = n.inputs[i].as_deref().unwrap();
            assert_eq!(const_of(&lg, name).to_i64s(), v, "{op} input {i}");
        }
    }
    // At the newest opsets nothing changes.
    let lg = lower(&x_to_y("ReduceMean", vec![int("keepdims", 0)], 18));
    assert_eq!(
        shape_of(&lg),
        [(OpKind::ReduceMean, vec!["x".into()], vec!["y".into()])]
    );
}

#[test]
fn old_clip_and_pad_float_attributes_are_cast_like_the_data() {
    let lg = lower(&x_to_y(
        "Clip",
        vec![float("min", -1.0), float("max", 6.0)],
        6,
    ));
    let clip = lg.nodes.last().unwrap();
    assert_eq!(clip.op, OpKind::Clip);
    for i in [1, 2] {
        let cast = lg
            .nodes
            .iter()
            .find(|n| n.outputs[0] == clip.inputs[i].clone().unwrap())
            .unwrap();
        assert_eq!(cast.op, OpKind::CastLike);
        assert_eq!(cast.inputs[1].as_deref(), Some("x"));
    }
    let lg = lower(&x_to_y(
        "Pad",
        vec![ints("pads", &[1, 1]), float("value", 2.0)],
        2,
    ));
    let pad = lg.nodes.last().unwrap();
    assert_eq!(pad.inputs.len(), 3);
}

#[test]
fn softmax_before_opset_13_is_flattened_at_its_axis() {
    let lg = lower(&x_to_y("Softmax", vec![int("axis", 1)], 11));
    let ops: Vec<OpKind> = lg.nodes.iter().map(|n| n.op).collect();
    assert_eq!(
        ops,
        [
            OpKind::Shape,
            OpKind::Flatten,
            OpKind::Softmax,
            OpKind::Reshape
        ]
    );
    assert_eq!(lg.nodes[1].attrs.get("axis"), Some(&Attr::Int(1)));
    assert_eq!(lg.nodes[3].outputs, ["y"]);
    // Names made up for the new values are unique.
    let mut names: Vec<&String> = lg.nodes.iter().flat_map(|n| &n.outputs).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 4);
}

#[test]
fn if_branches_capture_outer_values_in_one_order() {
    let branch = |op: &str, input: &str| {
        let mut g = graph(
            vec![node(op, &[input], &[&format!("{op}_out")], vec![])],
            vec![],
            vec![tensor_vi(&format!("{op}_out"), DType::F32, &[])],
            vec![],
        );
        g.name = op.into();
        g
    };
    let attr = |name: &str, g: GraphProto| AttributeProto {
        name: name.into(),
        r#type: attr_type::GRAPH,
        g: Some(Box::new(g)),
        ..Default::default()
    };
    let g = graph(
        vec![
            node("Neg", &["x"], &["b"], vec![]),
            node(
                "If",
                &["cond"],
                &["y"],
                vec![
                    attr("then_branch", branch("Relu", "x")),
                    attr("else_branch", branch("Abs", "b")),
                ],
            ),
        ],
        vec![
            tensor_vi("cond", DType::Bool, &[]),
            tensor_vi("x", DType::F32, &["3"]),
        ],
        vec![tensor_vi("y", DType::F32, &[])],
        vec![],
    );
    let lg = lower(&model(g, 17));
    let if_node = lg.nodes.last().unwrap();
    assert_eq!(if_node.op, OpKind::If);
    let ins: Vec<&str> = if_node
        .inputs
        .iter()
        .map(|i| i.as_deref().unwrap())
        .collect();
    assert_eq!(ins, ["cond", "x", "b"]);
    for (_, sg) in &if_node.subgraphs {
        assert_eq!(sg.captures, ["x", "b"]);
    }
    // A branch using a value nothing defines is an error.
    let g = graph(
        vec![node(
            "If",
            &["cond"],
            &["y"],
            vec![
                attr("then_branch", branch("Relu", "nope")),
                attr("else_branch", branch("Abs", "cond")),
            ],
        )],
        vec![tensor_vi("cond", DType::Bool, &[])],
        vec![tensor_vi("y", DType::F32, &[])],
        vec![],
    );
    let e = lower_model(&model(g, 17), None).unwrap_err().to_string();
    assert!(e.contains("`nope`"), "{e}");
}

#[test]
fn constant_node_value_forms_become_tensors() {
    let c = |a: AttributeProto| node("Constant", &[], &["c"], vec![a]);
    let cases = vec![
        (c(float("value_float", 2.5)), DType::F32, vec![], vec![2.5]),
        (c(int("value_int", 7)), DType::I64, vec![], vec![7.0]),
        (
            c(ints("value_ints", &[1, 2])),
            DType::I64,
            vec![2],
            vec![1.0, 2.0],
        ),
        (
            c(AttributeProto {
                name: "value_floats".into(),
                r#type: attr_type::FLOATS,
                floats: vec![0.5],
                ..Default::default()
            }),
            DType::F32,
            vec![1],
            vec![0.5],
        ),
    ];
    for (n, dt, shape, vals) in cases {
        let g = graph(vec![n], vec![], vec![tensor_vi("c", dt, &[])], vec![]);
        let lg = lower(&model(g, 17));
        let t = const_of(&lg, "c");
        assert_eq!(
            (t.dtype(), t.shape().to_vec(), t.to_f64s()),
            (dt, shape, vals)
        );
    }
    let sparse = c(AttributeProto {
        name: "sparse_value".into(),
        r#type: attr_type::SPARSE_TENSOR,
        ..Default::default()
    });
    let g = graph(
        vec![sparse],
        vec![],
        vec![tensor_vi("c", DType::F32, &[])],
        vec![],
    );
    let e = load(&model(g, 17)).unwrap_err().to_string();
    assert!(e.contains("sparse constants are not supported"), "{e}");
}

#[test]
fn opsets_that_do_not_exist_or_are_too_new_are_errors() {
    for v in [0, -1, super::NEWEST_OPSET + 1, 30] {
        let e = load(&x_to_y("Relu", vec![], v)).unwrap_err();
        assert!(matches!(e, OnnxError::UnsupportedOpset { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("opset {v}"))
                && msg.contains(&format!("1 to {}", super::NEWEST_OPSET)),
            "{msg}"
        );
    }
    load(&x_to_y("Relu", vec![], super::NEWEST_OPSET)).unwrap();
}

#[test]
fn a_graph_output_listed_twice_is_an_error() {
    let mut m = x_to_y("Relu", vec![], 17);
    let g = m.graph.as_mut().unwrap();
    g.output.push(g.output[0].clone());
    let e = load(&m).unwrap_err();
    assert_eq!(e.to_string(), "graph output `y` is listed twice");
}

#[test]
fn an_unsupported_op_in_an_unnamed_node_is_named_by_index_and_output() {
    let mut n = node("NoSuchOp", &["r"], &["y"], vec![]);
    n.name.clear();
    let g = graph(
        vec![node("Relu", &["x"], &["r"], vec![]), n],
        vec![tensor_vi("x", DType::F32, &["1"])],
        vec![tensor_vi("y", DType::F32, &[])],
        vec![],
    );
    let msg = load(&model(g, 17)).unwrap_err().to_string();
    assert!(
        msg.ends_with("NoSuchOp ×1 (first: node #1, unnamed, output `y`)"),
        "{msg}"
    );
}

#[test]
fn protobuf_nested_past_the_recursion_limit_gives_a_short_error() {
    // If inside If inside If ...: prost stops at 100 nested messages.
    let mut g = graph(
        vec![node("Relu", &["x"], &["y"], vec![])],
        vec![],
        vec![tensor_vi("y", DType::F32, &[])],
        vec![],
    );
    for _ in 0..120 {
        let branch = AttributeProto {
            name: "then_branch".into(),
            r#type: attr_type::GRAPH,
            g: Some(Box::new(g)),
            ..Default::default()
        };
        g = graph(
            vec![node("If", &["c"], &["y"], vec![branch])],
            vec![],
            vec![tensor_vi("y", DType::F32, &[])],
            vec![],
        );
    }
    let e = load(&model(g, 17)).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, OnnxError::Decode { .. }), "{msg}");
    assert!(msg.contains("recursion limit"), "{msg}");
    assert!(
        msg.len() < 300 && !msg.contains('\n'),
        "{} bytes: {msg}",
        msg.len()
    );
    assert!(std::error::Error::source(&e).is_none());
}

#[test]
fn a_directory_given_as_the_model_is_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let e = load_model(dir.path()).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("is a directory"), "{msg}");
}
