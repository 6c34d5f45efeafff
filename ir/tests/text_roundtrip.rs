//! The text form round-trips: `parse(print(g)) == g` for random graphs, printed forms are
//! pinned by snapshots, and each kind of parse error points at the right line and column.

use expect_test::{expect, Expect};
use kiln_ir::text::{parse, parse_with, print, print_with, ExternalRef};
use kiln_ir::{Attr, Attrs, DType, Dim, Graph, OpKind, Shape, Tensor, TensorData, TensorType};
use proptest::prelude::*;
use proptest::sample::{select, Index};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

// ---------------------------------------------------------------- random graphs

/// Names: plain identifiers, ONNX-style names, and arbitrary Unicode (incl. empty).
fn arb_name() -> BoxedStrategy<String> {
    prop_oneof![
        4 => "[a-z][a-z0-9_]{0,6}",
        2 => "[0-9]{1,3}",
        2 => "[A-Za-z0-9_.:/-]{1,8}",
        1 => any::<String>().prop_map(|s| s.chars().take(6).collect()),
        1 => "[\"\\\\ \n\t\u{0}\u{7f}\u{2028}é]{0,4}",
    ]
    .boxed()
}

fn arb_dim() -> impl Strategy<Value = Dim> {
    prop_oneof![
        4 => (0u64..100).prop_map(Dim::Fixed),
        1 => any::<u64>().prop_map(Dim::Fixed),
        2 => arb_name().prop_map(Dim::Sym),
        1 => Just(Dim::Unknown),
    ]
}

fn arb_type() -> impl Strategy<Value = TensorType> {
    let shape = prop_oneof![
        5 => prop::collection::vec(arb_dim(), 0..4).prop_map(Shape::new),
        1 => Just(Shape::unknown()),
    ];
    (select(DType::ALL.to_vec()), shape).prop_map(|(d, s)| TensorType::new(d, s))
}

/// One element's bits: random, or a value that printing must take care over.
fn element_bits(dtype: DType, kind: u8, rnd: u64) -> u64 {
    // [-0.0, inf, -inf, canonical NaN] per float width.
    let specials: [u64; 4] = match dtype {
        DType::F32 => [0x8000_0000, 0x7f80_0000, 0xff80_0000, 0x7fc0_0000],
        DType::F64 => [1 << 63, 0x7ff0 << 48, 0xfff0 << 48, 0x7ff8 << 48],
        DType::F16 => [0x8000, 0x7c00, 0xfc00, 0x7e00],
        DType::BF16 => [0x8000, 0x7f80, 0xff80, 0x7fc0],
        _ => [0, u64::MAX, 1 << (8 * dtype.size() - 1), 1],
    };
    match kind {
        0..=3 => specials[kind as usize],
        // A short decimal such as 0.25 or 42.0.
        4 => {
            let x = (rnd % 400) as f64 / 4.0;
            match dtype {
                DType::F32 => (x as f32).to_bits() as u64,
                DType::F64 => x.to_bits(),
                DType::F16 => kiln_ir::half::f16::from_f64(x).to_bits() as u64,
                DType::BF16 => kiln_ir::half::bf16::from_f64(x).to_bits() as u64,
                _ => rnd % 100,
            }
        }
        _ => rnd,
    }
}

fn arb_tensor() -> impl Strategy<Value = Tensor> {
    let shape = prop_oneof![
        4 => prop::collection::vec(0usize..4, 0..4),
        1 => prop::collection::vec(1usize..6, 2..4), // often past the list limit: hex
    ];
    (select(DType::ALL.to_vec()), shape)
        .prop_flat_map(|(dtype, shape)| {
            let n: usize = shape.iter().product();
            let elems = prop::collection::vec((0u8..8, any::<u64>()), n);
            (Just(dtype), Just(shape), elems)
        })
        .prop_map(|(dtype, shape, elems)| {
            let mut bytes = Vec::new();
            for (k, r) in elems {
                let b = element_bits(dtype, k, r).to_le_bytes();
                bytes.extend_from_slice(&b[..dtype.size()]);
            }
            let data = TensorData::from_le_bytes(dtype, &bytes).unwrap();
            Tensor::new(shape, data).unwrap()
        })
}

/// Float attributes: anything but NaN (`Attr`'s equality is IEEE, so NaN != NaN; NaN bits
/// are checked by `nan_float_attributes_keep_their_bits`).
fn arb_f32() -> impl Strategy<Value = f32> {
    prop_oneof![
        3 => any::<u32>().prop_map(f32::from_bits).prop_filter("not NaN", |x| !x.is_nan()),
        1 => select(vec![0.0f32, -0.0, 1.0, f32::INFINITY, f32::NEG_INFINITY, 1e-5, f32::MAX]),
    ]
}

fn arb_attr(depth: u32) -> BoxedStrategy<Attr> {
    let leaf = prop_oneof![
        any::<i64>().prop_map(Attr::Int),
        arb_f32().prop_map(Attr::Float),
        arb_name().prop_map(Attr::Str),
        prop::collection::vec(any::<i64>(), 0..4).prop_map(Attr::Ints),
        prop::collection::vec(arb_f32(), 0..4).prop_map(Attr::Floats),
        prop::collection::vec(arb_name(), 0..3).prop_map(Attr::Strs),
        arb_tensor().prop_map(|t| Attr::Tensor(Arc::new(t))),
    ];
    if depth == 0 {
        leaf.boxed()
    } else {
        prop_oneof![
            8 => leaf,
            1 => arb_graph(depth - 1).prop_map(|g| Attr::Graph(Arc::new(g))),
        ]
        .boxed()
    }
}

fn arb_attrs(depth: u32) -> impl Strategy<Value = Attrs> {
    let key = prop_oneof![4 => "[a-z_]{1,8}", 1 => arb_name()];
    prop::collection::btree_map(key, arb_attr(depth), 0..3).prop_map(Attrs)
}

#[derive(Debug, Clone)]
struct NodePlan {
    op: OpKind,
    attrs: Attrs,
    inputs: Vec<Option<Index>>,
    outputs: Vec<(String, TensorType)>,
    name: String,
}

fn arb_node(depth: u32) -> impl Strategy<Value = NodePlan> {
    let node_name =
        prop_oneof![3 => Just(String::new()), 1 => arb_name(), 1 => "/[a-z]{1,4}/[A-Z][a-z]{1,4}"];
    (
        select(OpKind::ALL.to_vec()),
        arb_attrs(depth),
        prop::collection::vec(prop::option::weighted(0.8, any::<Index>()), 0..4),
        prop::collection::vec((arb_name(), arb_type()), 0..3),
        node_name,
    )
        .prop_map(|(op, attrs, inputs, outputs, name)| NodePlan {
            op,
            attrs,
            inputs,
            outputs,
            name,
        })
}

/// A random graph: values are only used after their definition and names are unique, as
/// in any graph the verifier accepts; ops, types and attributes are otherwise arbitrary.
fn arb_graph(depth: u32) -> BoxedStrategy<Graph> {
    (
        arb_name(),
        prop::collection::vec((arb_name(), arb_type()), 0..4),
        prop::collection::vec(arb_node(depth), 0..6),
        prop::collection::vec(any::<Index>(), 0..3),
        // Graph metadata (an approximation report and the like): any keys, any text.
        prop::collection::btree_map(arb_name(), any::<String>(), 0..3),
    )
        .prop_map(|(name, inputs, nodes, outputs, metadata)| {
            let mut g = Graph::new(&name);
            g.metadata = metadata;
            let mut used = HashSet::new();
            let mut unique = |n: String| {
                let mut n2 = n.clone();
                let mut k = 0;
                while !used.insert(n2.clone()) {
                    k += 1;
                    n2 = format!("{n}#{k}");
                }
                n2
            };
            let mut defined = vec![];
            for (n, t) in inputs {
                defined.push(g.add_input(&unique(n), t));
            }
            for plan in nodes {
                let ins = plan
                    .inputs
                    .iter()
                    .map(|i| match i {
                        Some(i) if !defined.is_empty() => Some(*i.get(&defined)),
                        _ => None,
                    })
                    .collect();
                let outs = plan
                    .outputs
                    .into_iter()
                    .map(|(n, t)| (unique(n), t))
                    .collect();
                let ids = g.add_node(plan.op, plan.attrs, ins, outs, &plan.name);
                defined.extend(ids);
            }
            if !defined.is_empty() {
                g.outputs = outputs.iter().map(|i| *i.get(&defined)).collect();
            }
            g
        })
        .boxed()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn printed_graphs_parse_back_equal(g in arb_graph(2)) {
        let text = print(&g);
        let back = parse(&text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        prop_assert_eq!(&back, &g, "{}", text);
        prop_assert_eq!(print(&back), text);
    }
}

#[test]
fn graph_metadata_prints_as_attributes_and_parses_back() {
    let src = "func @f(%x: f32[2]) -> (f32[2]) attributes {approx_report = \"approximation: metric rel-l2\\n  accepted 1\", \"odd key\" = \"\"} {\n  %y = relu %x : f32[2]\n  return %y\n}\n";
    let g = parse(src).unwrap();
    assert_eq!(
        g.metadata.get("approx_report").map(String::as_str),
        Some("approximation: metric rel-l2\n  accepted 1")
    );
    assert_eq!(g.metadata.get("odd key").map(String::as_str), Some(""));
    assert_eq!(print(&g), src);
    let bad = "func @f(%x: f32[2]) -> (f32[2]) attributes {n = 3} {\n  return %x\n}\n";
    let e = parse(bad).unwrap_err().to_string();
    assert!(e.contains("must be a string"), "{e}");
}

/// Prints `g` with every tensor in a weights "file" (a map here), every second one as a
/// keyed safetensors entry and the others as one-tensor files; returns the text and map.
fn print_external(g: &Graph) -> (String, BTreeMap<ExternalRef, Tensor>) {
    let mut files = BTreeMap::new();
    let text = print_with(g, &mut |t| {
        let n = files.len();
        let r = if n % 2 == 0 {
            ExternalRef {
                file: "w.safetensors".into(),
                key: Some(format!("t{n}")),
            }
        } else {
            ExternalRef {
                file: format!("t{n}.npy"),
                key: None,
            }
        };
        files.insert(r.clone(), t.clone());
        Some(r)
    });
    (text, files)
}

fn parse_external(
    text: &str,
    files: &BTreeMap<ExternalRef, Tensor>,
) -> Result<Graph, kiln_ir::text::ParseError> {
    parse_with(text, &mut |r, _, _| {
        files.get(r).cloned().ok_or_else(|| format!("no {r:?}"))
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn graphs_with_weights_in_files_parse_back_equal(g in arb_graph(2)) {
        let (text, files) = print_external(&g);
        prop_assert!(!text.contains("dense<") || text.contains("file("));
        let back = parse_external(&text, &files).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        prop_assert_eq!(&back, &g, "{}", text);
        // Printed inline, the graph read from files is the same text as the original.
        prop_assert_eq!(print(&back), print(&g));
    }
}

#[test]
fn file_tensors_print_as_documented_and_are_checked() {
    let mut g = Graph::new("w");
    let k = g.add_constant(
        "k",
        Tensor::from_vec(vec![2, 2], vec![1.0f32, 2.0, 3.0, 4.0]),
    );
    g.outputs = vec![k];
    let (text, files) = print_external(&g);
    expect![[r#"
        func @w() -> (f32[2, 2]) {
          %k = constant {value = dense<f32[2, 2]> file("w.safetensors", "t0")} : f32[2, 2]
          return %k
        }
    "#]]
    .assert_eq(&text);
    assert_eq!(parse_external(&text, &files).unwrap(), g);
    // Without a resolver the reference is an error at the reference, not a panic.
    let e = parse(&text).unwrap_err();
    assert_eq!(
        (e.line, e.message.contains("reads no files")),
        (2, true),
        "{e}"
    );
    // A tensor whose type differs from the declared one is an error naming the file.
    let e = parse_with(&text, &mut |_, _, _| {
        Ok(Tensor::from_vec(vec![4], vec![0.0f32; 4]))
    })
    .unwrap_err();
    assert!(
        e.message.contains("w.safetensors") && e.message.contains("[2, 2]"),
        "{e}"
    );
    // The resolver's own error is shown at the reference.
    let e = parse_with(&text, &mut |_, _, _| Err("no such tensor".into())).unwrap_err();
    assert!(e.message.contains("no such tensor"), "{e}");
    for bad in ["file()", "file(\"w\", 3)", "file(w.npy)", "file(\"w.npy\""] {
        let src = text.replace("file(\"w.safetensors\", \"t0\")", bad);
        assert!(parse_external(&src, &files).is_err(), "{src}");
    }
}

/// An edit to printed text: at a position, drop some bytes and insert a snippet.
fn arb_edits() -> impl Strategy<Value = Vec<(Index, usize, String)>> {
    let snippet = prop_oneof![
        Just(String::new()),
        select(vec![
            "%",
            "@",
            "\"",
            "{",
            "}",
            "[",
            "]",
            "(",
            ")",
            ",",
            ":",
            "=",
            "-",
            "_",
            "0x",
            "func @g() -> () {",
            "return",
            "nan(",
            "1e999",
            "99999999999999999999",
            "dense<",
            "\\u{",
            "*",
            "?",
            "ints[",
            " ",
            "\n",
            "//"
        ])
        .prop_map(String::from),
        any::<String>(),
    ];
    prop::collection::vec((any::<Index>(), 0usize..4, snippet), 1..4)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Mangled text never panics the parser, and whatever parses re-prints stably.
    #[test]
    fn mangled_text_is_an_error_or_round_trips(g in arb_graph(1), edits in arb_edits()) {
        let mut text = print(&g);
        for (at, drop, insert) in edits {
            let mut i = at.index(text.len() + 1);
            while !text.is_char_boundary(i) { i -= 1; }
            let mut j = (i + drop).min(text.len());
            while !text.is_char_boundary(j) { j += 1; }
            text.replace_range(i..j, &insert);
        }
        if let Ok(g2) = parse(&text) {
            let p = print(&g2);
            let g3 = parse(&p).map_err(|e| TestCaseError::fail(format!("{e}\n{p}")))?;
            prop_assert_eq!(print(&g3), p);
        }
    }
}

// ---------------------------------------------------------------- snapshots

fn check(g: &Graph, expect: Expect) {
    let text = print(g);
    expect.assert_eq(&text);
    assert_eq!(parse(&text).unwrap(), *g);
    assert_eq!(g.to_string(), text);
}

fn ty(dtype: DType, dims: &[Dim]) -> TensorType {
    TensorType::new(dtype, Shape::new(dims.to_vec()))
}

#[test]
fn mlp_prints_as_expected() {
    let b = || Dim::from("B");
    let mut g = Graph::new("mlp");
    let x = g.add_input("x", ty(DType::F32, &[b(), 5.into()]));
    // 20 elements: past the list limit, so printed as hex.
    let w = g.add_constant(
        "w",
        Tensor::from_vec(vec![5, 4], (0..20).map(|i| i as f32 * 0.5).collect()),
    );
    let bias = g.add_constant(
        "b",
        Tensor::from_vec(vec![4], vec![0.1f32, -0.0, f32::INFINITY, f32::NAN]),
    );
    let h = g.add_node(
        OpKind::MatMul,
        Attrs::new(),
        vec![Some(x), Some(w)],
        vec![("0".into(), ty(DType::F32, &[b(), 4.into()]))],
        "/fc/MatMul",
    )[0];
    let h = g.add_node(
        OpKind::Add,
        Attrs::new(),
        vec![Some(h), Some(bias)],
        vec![("onnx::Relu_7".into(), ty(DType::F32, &[b(), 4.into()]))],
        "",
    )[0];
    let y = g.add_node(
        OpKind::Relu,
        Attrs::new(),
        vec![Some(h)],
        vec![("out put".into(), ty(DType::F32, &[b(), Dim::Unknown]))],
        "/Relu",
    )[0];
    let halves = g.add_node(
        OpKind::Split,
        Attrs::new().with("axis", Attr::Int(-1)),
        vec![Some(y), None],
        vec![
            ("a".into(), TensorType::unknown_shape(DType::F32)),
            ("c".into(), ty(DType::F32, &[b(), "half".into()])),
        ],
        "",
    );
    g.outputs = vec![y, halves[0]];
    check(
        &g,
        expect![[r#"
            func @mlp(%x: f32[B, 5]) -> (f32[B, ?], f32[*]) {
              %w = constant {value = dense<f32[5, 4]> 0x000000000000003f0000803f0000c03f0000004000002040000040400000604000008040000090400000a0400000b0400000c0400000d0400000e0400000f04000000041000008410000104100001841} : f32[5, 4]
              %b = constant {value = dense<f32[4]> [0.1, -0.0, inf, nan]} : f32[4]
              %0 = matmul %x, %w : f32[B, 4] loc("/fc/MatMul")
              %onnx::Relu_7 = add %0, %b : f32[B, 4]
              %"out put" = relu %onnx::Relu_7 : f32[B, ?] loc("/Relu")
              %a, %c = split %"out put", _ {axis = -1} : f32[*], f32[B, half]
              return %"out put", %a
            }
        "#]],
    );
}

#[test]
fn if_node_prints_its_branches_nested() {
    let scalar = TensorType::new(DType::F32, Shape::new(vec![]));
    let branch = |name: &str, v: f32| {
        let mut g = Graph::new(name);
        let k = g.add_constant("k", Tensor::scalar(v));
        g.outputs = vec![k];
        g
    };
    let mut g = Graph::new("choose");
    let c = g.add_input("cond", TensorType::new(DType::Bool, Shape::new(vec![])));
    let attrs = Attrs::new()
        .with("then_branch", Attr::Graph(Arc::new(branch("then", 1.0))))
        .with("else_branch", Attr::Graph(Arc::new(branch("else", -2.5))));
    let r = g.add_node(
        OpKind::If,
        attrs,
        vec![Some(c)],
        vec![("r".into(), scalar)],
        "",
    );
    g.outputs = r;
    check(
        &g,
        expect![[r#"
            func @choose(%cond: bool[]) -> (f32[]) {
              %r = if %cond {else_branch = func @else() -> (f32[]) {
                %k = constant {value = dense<f32[]> [-2.5]} : f32[]
                return %k
              }, then_branch = func @then() -> (f32[]) {
                %k = constant {value = dense<f32[]> [1.0]} : f32[]
                return %k
              }} : f32[]
              return %r
            }
        "#]],
    );
}

#[test]
fn every_attribute_kind_prints_as_documented() {
    let mut g = Graph::new("attrs");
    let mut m = BTreeMap::new();
    m.insert("i".to_string(), Attr::Int(i64::MIN));
    m.insert("f".to_string(), Attr::Float(1e-5));
    m.insert("s".to_string(), Attr::Str("a\"b\\c\n".into()));
    m.insert("is".to_string(), Attr::Ints(vec![]));
    m.insert(
        "fs".to_string(),
        Attr::Floats(vec![1.0, -0.0, f32::NEG_INFINITY]),
    );
    m.insert("ss".to_string(), Attr::Strs(vec!["x".into()]));
    m.insert("odd key".to_string(), Attr::Floats(vec![]));
    m.insert(
        "t".to_string(),
        Attr::Tensor(Arc::new(Tensor::from_vec(
            vec![2],
            vec![kiln_ir::half::f16::from_f32(0.5), kiln_ir::half::f16::MAX],
        ))),
    );
    m.insert(
        "b".to_string(),
        Attr::Tensor(Arc::new(Tensor::from_vec(vec![2, 1], vec![true, false]))),
    );
    g.add_node(OpKind::Identity, Attrs(m), vec![], vec![], "");
    check(
        &g,
        expect![[r#"
            func @attrs() -> () {
              identity {b = dense<bool[2, 1]> [true, false], f = 1e-5, fs = [1.0, -0.0, -inf], i = -9223372036854775808, is = ints[], "odd key" = floats[], s = "a\"b\\c\n", ss = ["x"], t = dense<f16[2]> [0.5, 65504.0]}
              return
            }
        "#]],
    );
}

// ---------------------------------------------------------------- parsing details

#[test]
fn nan_float_attributes_keep_their_bits() {
    for bits in [0x7fc0_0000u32, 0xffc0_0000, 0x7fc0_0001, 0x7f80_0001] {
        let mut g = Graph::new("g");
        let attrs = Attrs::new()
            .with("x", Attr::Float(f32::from_bits(bits)))
            .with("xs", Attr::Floats(vec![f32::from_bits(bits)]));
        g.add_node(OpKind::Identity, attrs, vec![], vec![], "");
        let back = parse(&print(&g)).unwrap();
        let a = &back.nodes[0].attrs;
        assert_eq!(a.float("x").unwrap().unwrap().to_bits(), bits);
        assert_eq!(a.floats("xs").unwrap().unwrap()[0].to_bits(), bits);
    }
}

#[test]
fn omitted_types_are_inferred_and_given_types_are_verbatim() {
    let g = parse(
        "func @k() -> i64[2] {
           %k = constant {value = dense<i64[2]> [1, -2]}
           %j = constant {value = ints[1]} : f32[N, ?]   // verbatim, even if wrong
           return %k
         }",
    )
    .unwrap();
    assert_eq!(g.ty(g.outputs[0]).to_string(), "i64[2]");
    assert_eq!(g.values[1].ty.to_string(), "f32[N, ?]");
}

#[test]
fn well_typed_text_verifies_and_ill_typed_text_does_not() {
    let good = parse(
        "func @k() -> (f32[2]) {\n  %k = constant {value = dense<f32[2]> [1.0, 2]} : f32[2]\n  return %k\n}",
    )
    .unwrap();
    assert!(kiln_ir::verify(&good).is_ok());
    let bad = parse(
        "func @k() -> (f32[3]) {\n  %k = constant {value = dense<f32[2]> [1.0, 2]} : f32[3]\n  return %k\n}",
    )
    .unwrap();
    assert!(kiln_ir::verify(&bad).is_err());
}

#[test]
fn large_tensors_round_trip_through_hex() {
    let n = 1 << 16;
    let t = Tensor::from_vec(vec![n], (0..n).map(|i| (i as f32).sin()).collect());
    let mut g = Graph::new("big");
    let k = g.add_constant("k", t);
    g.outputs = vec![k];
    let text = print(&g);
    assert!(text.contains("> 0x"));
    assert_eq!(parse(&text).unwrap(), g);
}

#[test]
fn statements_need_no_separators() {
    // `range` has no inputs, so `%b` must start the next statement, not be an input.
    let g = parse(
        "func @f(%x: f32[1]) -> (f32[1]) {
           %a = range
           %b, %c = split %x
           %d = relu %b, _ : f32[1]
           return %d
         }",
    );
    // The untyped nodes' shape rules may not exist yet; either way `%b` is not an input.
    match g {
        Ok(g) => assert!(g.nodes[0].inputs.is_empty()),
        Err(e) => assert_eq!((e.line, e.column), (2, 17), "{e}"),
    }
}

// ---------------------------------------------------------------- errors

/// Parses `src`, expecting an error at `line:col` whose rendering is `expect`.
fn check_err(src: &str, line: usize, col: usize, expect: Expect) {
    let e = parse(src).unwrap_err();
    assert_eq!((e.line, e.column), (line, col), "{e}");
    expect.assert_eq(&e.to_string());
}

#[test]
fn error_missing_equals() {
    check_err(
        "func @f(%x: f32[4], %w: f32[4]) -> (f32[4]) {\n\n  %0 matmul %x, %w\n  return %0\n}",
        3,
        6,
        expect![[r#"
            error: expected `=` after `%0`, found `matmul`
             --> 3:6
              |
            3 |   %0 matmul %x, %w
              |      ^"#]],
    );
}

#[test]
fn error_unknown_op_suggests_the_closest() {
    check_err(
        "func @f(%x: f32[4]) -> (f32[4]) {\n  %0 = relux %x : f32[4]\n  return %0\n}",
        2,
        8,
        expect![[r#"
            error: unknown op `relux`; did you mean `relu`?
             --> 2:8
              |
            2 |   %0 = relux %x : f32[4]
              |        ^"#]],
    );
}

#[test]
fn error_undefined_value() {
    check_err(
        "func @f(%x: f32[4]) -> (f32[4]) {\n  %0 = relu %y : f32[4]\n  return %0\n}",
        2,
        13,
        expect![[r#"
            error: use of undefined value `%y`
             --> 2:13
              |
            2 |   %0 = relu %y : f32[4]
              |             ^"#]],
    );
}

#[test]
fn error_value_defined_twice() {
    check_err(
        "func @f(%x: f32[4]) -> (f32[4]) {\n  %x = relu %x : f32[4]\n  return %x\n}",
        2,
        3,
        expect![[r#"
            error: `%x` is defined twice
             --> 2:3
              |
            2 |   %x = relu %x : f32[4]
              |   ^"#]],
    );
}

#[test]
fn error_number_out_of_range() {
    check_err(
        "func @f(%x: f32[99999999999999999999]) -> () {\n  return\n}",
        1,
        17,
        expect![[r#"
            error: `99999999999999999999` is too large
             --> 1:17
              |
            1 | func @f(%x: f32[99999999999999999999]) -> () {
              |                 ^"#]],
    );
    check_err(
        "func @f() -> () {\n\tidentity {v = dense<i8[2]> [1, 200]}\n\treturn\n}",
        2,
        33,
        expect![[r#"
            error: 200 is out of range for i8
             --> 2:33
              |
            2 | 	identity {v = dense<i8[2]> [1, 200]}
              | 	                               ^"#]],
    );
    let e =
        parse("func @f() -> () {\n  identity {v = 9223372036854775808}\n  return\n}").unwrap_err();
    assert_eq!(
        (e.line, e.column, e.message.as_str()),
        (2, 17, "9223372036854775808 is out of range for i64")
    );
    let e = parse("func @f() -> () {\n  identity {v = 1e39}\n  return\n}").unwrap_err();
    assert_eq!(
        (e.line, e.column, e.message.as_str()),
        (2, 17, "`1e39` is out of range for f32")
    );
}

#[test]
fn error_type_count_mismatch() {
    check_err(
        "func @f(%x: f32[4]) -> () {\n  %a, %b = split %x : f32[2]\n  return\n}",
        2,
        21,
        expect![[r#"
            error: the node has 2 results but 1 types
             --> 2:21
              |
            2 |   %a, %b = split %x : f32[2]
              |                     ^"#]],
    );
}

#[test]
fn error_unterminated_string() {
    let e = parse("func @f() -> () {\n  identity loc(\"abc\n  return\n}").unwrap_err();
    assert_eq!((e.line, e.column), (2, 16));
    assert_eq!(e.message, "unterminated string");
}

#[test]
fn error_tensor_element_count() {
    let e = parse("func @f() -> () {\n  identity {v = dense<f32[3]> [1.0, 2.0]}\n  return\n}")
        .unwrap_err();
    assert_eq!((e.line, e.column), (2, 31));
    assert_eq!(e.message, "the shape holds 3 elements but 2 are given");
    let e =
        parse("func @f() -> () {\n  identity {v = dense<f32[1]> 0x0000}\n  return\n}").unwrap_err();
    assert_eq!((e.line, e.column), (2, 31));
    assert_eq!(
        e.message,
        "expected 8 hex digits for 1 f32 elements, found 4"
    );
}

#[test]
fn error_empty_list_needs_a_kind() {
    let e = parse("func @f() -> () {\n  identity {v = []}\n  return\n}").unwrap_err();
    assert_eq!((e.line, e.column), (2, 17));
    assert!(e.message.contains("`ints[]`"), "{e}");
}

#[test]
fn error_result_type_differs_from_signature() {
    check_err(
        "func @f(%x: f32[4]) -> (f32[5]) {\n  return %x\n}",
        1,
        25,
        expect![[r#"
            error: declared result type f32[5] but `%x` is f32[4]
             --> 1:25
              |
            1 | func @f(%x: f32[4]) -> (f32[5]) {
              |                         ^"#]],
    );
}

#[test]
fn error_op_gives_fewer_results_than_named() {
    let e =
        parse("func @f() -> () {\n  %a, %b = constant {value = ints[]}\n  return\n}").unwrap_err();
    assert_eq!((e.line, e.column), (2, 12), "{e}");
    assert!(
        e.message
            .starts_with("cannot infer the result types of `constant`"),
        "{e}"
    );
}

#[test]
fn error_unexpected_character_and_trailing_input() {
    let e = parse("func @f() -> () {\n  return $\n}").unwrap_err();
    assert_eq!(
        (e.line, e.column, e.message.as_str()),
        (2, 10, "unexpected character '$'")
    );
    let e = parse("func @f() -> () {\n  return\n}\nfunc").unwrap_err();
    assert_eq!((e.line, e.column), (4, 1));
    assert!(e.message.starts_with("expected end of input"), "{e}");
}

#[test]
fn error_deep_nesting_is_rejected_without_overflow() {
    let mut src = String::new();
    for _ in 0..10_000 {
        src.push_str("func @g() -> () {\n identity {g = ");
    }
    let e = parse(&src).unwrap_err();
    assert_eq!(e.line, kiln_ir::text::MAX_NESTING + 2, "{e}");
    assert!(e.message.contains("nest too deeply"), "{e}");
}

#[test]
fn error_long_lines_show_an_excerpt() {
    let src = format!(
        "func @f() -> () {{\n  identity {{v = dense<u8[40]> 0x{}zz}}\n  return\n}}",
        "00".repeat(40)
    );
    let e = parse(&src).unwrap_err();
    assert_eq!((e.line, e.column), (2, 113));
    assert!(e.source_line.chars().count() < 140);
    let shown = e.to_string();
    let caret_line = shown.lines().last().unwrap();
    let src_line = shown.lines().nth(3).unwrap();
    assert_eq!(
        &src_line[caret_line.len() - 1..caret_line.len() + 1],
        "zz",
        "{shown}"
    );
}

/// `cargo test -p kiln-ir --release --test text_roundtrip -- --ignored --nocapture`
#[test]
#[ignore]
fn a_36_mb_constant_prints_and_parses_quickly() {
    let n = 9 << 20;
    let t = Tensor::from_vec(vec![n], (0..n).map(|i| i as f32).collect());
    let mut g = Graph::new("big");
    let k = g.add_constant("k", t);
    g.outputs = vec![k];
    let t0 = std::time::Instant::now();
    let bytes = g.constant_value(k).unwrap().data().to_le_bytes();
    println!("to_le_bytes {:?} ({} bytes)", t0.elapsed(), bytes.len());
    let t0 = std::time::Instant::now();
    let text = print(&g);
    let t1 = std::time::Instant::now();
    let back = parse(&text).unwrap();
    let t2 = std::time::Instant::now();
    println!(
        "print {:?}, parse {:?} for {} MB of text",
        t1 - t0,
        t2 - t1,
        text.len() >> 20
    );
    assert_eq!(back, g);
}

#[test]
#[ignore]
fn show_a_random_graph() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::default();
    for _ in 0..3 {
        let g = arb_graph(2).new_tree(&mut runner).unwrap().current();
        println!("{}", print(&g));
    }
}
