//! Bad inputs to the layout, index, generate and resize ops are errors, never panics or
//! huge allocations; and a randomized sweep feeds every one of them odd operands.

use kiln_ir::{ops, Attr, Attrs, DType, Fact, OpKind, Shape, Tensor, TensorData, TensorType};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::sync::Arc;

fn i64s(v: &[i64]) -> Tensor {
    Tensor::from_vec(vec![v.len()], v.to_vec())
}

fn eval_err(op: OpKind, attrs: Attrs, ins: &[Option<&Tensor>]) -> String {
    ops::eval(op, &attrs, ins).expect_err("should fail")
}

#[test]
fn data_derived_sizes_are_limited() {
    let e = eval_err(
        OpKind::ConstantOfShape,
        Attrs::new(),
        &[Some(&i64s(&[1 << 20, 1 << 20]))],
    );
    assert!(e.contains("limit"), "{e}");
    let e = eval_err(
        OpKind::ConstantOfShape,
        Attrs::new(),
        &[Some(&i64s(&[i64::MAX, 4]))],
    );
    assert!(e.contains("limit"), "{e}");
    let e = eval_err(OpKind::ConstantOfShape, Attrs::new(), &[Some(&i64s(&[-2]))]);
    assert!(e.contains("non-negative"), "{e}");
    let (s, l, d) = (
        Tensor::scalar(0i64),
        Tensor::scalar(i64::MAX),
        Tensor::scalar(1i64),
    );
    let e = eval_err(OpKind::Range, Attrs::new(), &[Some(&s), Some(&l), Some(&d)]);
    assert!(e.contains("limit"), "{e}");
    let z = Tensor::scalar(0i64);
    assert!(eval_err(OpKind::Range, Attrs::new(), &[Some(&s), Some(&l), Some(&z)]).contains("0"));
    let x = Tensor::from_vec(vec![2], vec![1f32, 2.]);
    let e = eval_err(
        OpKind::Tile,
        Attrs::new(),
        &[Some(&x), Some(&i64s(&[1 << 40]))],
    );
    assert!(e.contains("limit"), "{e}");
    let e = eval_err(
        OpKind::Expand,
        Attrs::new(),
        &[Some(&x), Some(&i64s(&[1 << 31, 2]))],
    );
    assert!(e.contains("limit"), "{e}");
    let e = eval_err(
        OpKind::Pad,
        Attrs::new(),
        &[Some(&x), Some(&i64s(&[0, i64::MAX]))],
    );
    assert!(!e.is_empty());
}

#[test]
fn out_of_range_indices_are_errors() {
    let x = Tensor::from_vec(vec![2, 2], vec![1f32, 2., 3., 4.]);
    let e = eval_err(OpKind::Gather, Attrs::new(), &[Some(&x), Some(&i64s(&[2]))]);
    assert!(e.contains("out of range"), "{e}");
    let e = eval_err(
        OpKind::Gather,
        Attrs::new(),
        &[Some(&x), Some(&i64s(&[-3]))],
    );
    assert!(e.contains("out of range"), "{e}");
    let idx = Tensor::from_vec(vec![2, 1], vec![0i64, 5]);
    let e = eval_err(
        OpKind::GatherElements,
        Attrs::new(),
        &[Some(&x), Some(&idx)],
    );
    assert!(e.contains("out of range"), "{e}");
    let upd = Tensor::from_vec(vec![2, 1], vec![0f32, 0.]);
    let e = eval_err(
        OpKind::ScatterElements,
        Attrs::new(),
        &[Some(&x), Some(&idx), Some(&upd)],
    );
    assert!(e.contains("out of range"), "{e}");
    let nd = Tensor::from_vec(vec![1, 2], vec![0i64, 2]);
    let e = eval_err(OpKind::GatherND, Attrs::new(), &[Some(&x), Some(&nd)]);
    assert!(e.contains("out of range"), "{e}");
    let e = eval_err(OpKind::TopK, Attrs::new(), &[Some(&x), Some(&i64s(&[3]))]);
    assert!(e.contains("exceeds"), "{e}");
}

#[test]
fn one_hot_indices_outside_depth_are_all_off() {
    // The ONNX spec: indices outside [-depth, depth - 1] give an all-off row.
    let idx = i64s(&[5, -5, -1]);
    let depth = Tensor::scalar(3i64);
    let vals = Tensor::from_vec(vec![2], vec![0f32, 1.]);
    let out = ops::eval(
        OpKind::OneHot,
        &Attrs::new(),
        &[Some(&idx), Some(&depth), Some(&vals)],
    )
    .unwrap();
    assert_eq!(out[0].to_f64s(), vec![0., 0., 0., 0., 0., 0., 0., 0., 1.]);
}

#[test]
fn negative_pads_crop_before_padding() {
    // pads [1, -1, 0, 2] on a 3x4: one row of fill on top, drop column 0, two columns right.
    let x = Tensor::from_vec(vec![3, 4], (0..12).map(|i| i as f32).collect());
    let out = ops::eval(
        OpKind::Pad,
        &Attrs::new(),
        &[
            Some(&x),
            Some(&i64s(&[1, -1, 0, 2])),
            Some(&Tensor::scalar(9f32)),
        ],
    )
    .unwrap();
    assert_eq!(out[0].shape(), &[4, 5]);
    assert_eq!(
        out[0].to_f64s(),
        vec![
            9., 9., 9., 9., 9., //
            1., 2., 3., 9., 9., //
            5., 6., 7., 9., 9., //
            9., 10., 11., 9., 9.
        ]
    );
}

#[test]
fn reshape_and_split_mismatches_are_errors() {
    let x = Tensor::from_vec(vec![2, 3], vec![0f32; 6]);
    let e = eval_err(
        OpKind::Reshape,
        Attrs::new(),
        &[Some(&x), Some(&i64s(&[4, -1]))],
    );
    assert!(e.contains("cannot reshape"), "{e}");
    let e = eval_err(
        OpKind::Reshape,
        Attrs::new(),
        &[Some(&x), Some(&i64s(&[-1, -1]))],
    );
    assert!(e.contains("more than one"), "{e}");
    let e = eval_err(
        OpKind::Split,
        Attrs::new(),
        &[Some(&x), Some(&i64s(&[1, 2]))],
    );
    assert!(e.contains("does not sum"), "{e}");
    let e = eval_err(
        OpKind::Slice,
        Attrs::new(),
        &[
            Some(&x),
            Some(&i64s(&[0])),
            Some(&i64s(&[1])),
            Some(&i64s(&[0])),
            Some(&i64s(&[0])),
        ],
    );
    assert!(e.contains("step"), "{e}");
    // A known-size mismatch is also a shape-rule error.
    let fx = Fact::of(TensorType::new(DType::F32, Shape::fixed(&[2, 3])));
    let ft = Fact {
        konst: Some(Arc::new(i64s(&[4, 2]))),
        ..Fact::of(TensorType::new(DType::I64, Shape::fixed(&[2])))
    };
    assert!(ops::infer(OpKind::Reshape, &Attrs::new(), &[Some(&fx), Some(&ft)]).is_err());
}

fn random_tensor(rng: &mut StdRng) -> Tensor {
    let rank = rng.gen_range(0..4);
    let shape: Vec<usize> = (0..rank).map(|_| rng.gen_range(0..4)).collect();
    let n: usize = shape.iter().product();
    let dt = DType::ALL[rng.gen_range(0..DType::ALL.len())];
    let dt = if rng.gen_bool(0.5) { DType::I64 } else { dt };
    let data = TensorData::from_i64s(dt, (0..n).map(|_| rng.gen_range(-5..6)));
    Tensor::new(shape, data).unwrap()
}

fn random_attrs(rng: &mut StdRng) -> Attrs {
    let mut a = Attrs::new();
    for name in [
        "axis",
        "batch_dims",
        "blocksize",
        "start",
        "end",
        "k",
        "upper",
        "largest",
        "num_outputs",
        "batch_axis",
        "time_axis",
        "allowzero",
    ] {
        if rng.gen_bool(0.3) {
            a.set(name, Attr::Int(rng.gen_range(-4..5)));
        }
    }
    if rng.gen_bool(0.3) {
        a.set(
            "perm",
            Attr::Ints(
                (0..rng.gen_range(0..4))
                    .map(|_| rng.gen_range(-1..4))
                    .collect(),
            ),
        );
    }
    if rng.gen_bool(0.3) {
        a.set(
            "axes",
            Attr::Ints(
                (0..rng.gen_range(0..3))
                    .map(|_| rng.gen_range(-3..4))
                    .collect(),
            ),
        );
    }
    let modes = [
        "constant", "reflect", "edge", "wrap", "nearest", "linear", "cubic", "DCR", "CRD",
    ];
    if rng.gen_bool(0.5) {
        a.set(
            "mode",
            Attr::Str(modes[rng.gen_range(0..modes.len())].into()),
        );
    }
    let ctm = [
        "half_pixel",
        "align_corners",
        "asymmetric",
        "tf_crop_and_resize",
        "pytorch_half_pixel",
    ];
    if rng.gen_bool(0.3) {
        a.set(
            "coordinate_transformation_mode",
            Attr::Str(ctm[rng.gen_range(0..ctm.len())].into()),
        );
    }
    if rng.gen_bool(0.2) {
        a.set(
            "reduction",
            Attr::Str(["add", "mul", "max", "min"][rng.gen_range(0..4)].into()),
        );
    }
    a
}

#[test]
fn random_operands_never_panic() {
    let fams = [
        ops::Family::Layout,
        ops::Family::Index,
        ops::Family::Generate,
        ops::Family::Resize,
    ];
    let my_ops: Vec<OpKind> = OpKind::ALL
        .iter()
        .copied()
        .filter(|o| fams.contains(&o.family()) && *o != OpKind::Constant)
        .collect();
    let seed: u64 = std::env::var("KILN_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    let iters: usize = std::env::var("KILN_FUZZ_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20000);
    let mut rng = StdRng::seed_from_u64(seed);
    for _ in 0..iters {
        let op = my_ops[rng.gen_range(0..my_ops.len())];
        let n = rng.gen_range(0..5);
        let ts: Vec<Option<Tensor>> = (0..n)
            .map(|_| (!rng.gen_bool(0.1)).then(|| random_tensor(&mut rng)))
            .collect();
        let attrs = random_attrs(&mut rng);
        let refs: Vec<Option<&Tensor>> = ts.iter().map(|t| t.as_ref()).collect();
        let _ = ops::eval(op, &attrs, &refs);
        let facts: Vec<Option<Fact>> = ts
            .iter()
            .map(|t| {
                t.as_ref().map(|t| Fact {
                    ty: TensorType::new(t.dtype(), Shape::fixed(t.shape())),
                    konst: rng.gen_bool(0.5).then(|| Arc::new(t.clone())),
                    dims: None,
                })
            })
            .collect();
        let frefs: Vec<Option<&Fact>> = facts.iter().map(|f| f.as_ref()).collect();
        let _ = ops::infer(op, &attrs, &frefs);
    }
}
