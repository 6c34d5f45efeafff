//! Tensor files: `.pb` and `.npy` round trips for every dtype, byte-for-byte interop with
//! files numpy and onnx wrote (fixtures in tests/data, made by numpy 2 / onnx 1.22), and
//! clean errors for malformed files.

use kiln_frontend::tensor_io::*;
use kiln_ir::{DType, Tensor, TensorData};
use std::path::{Path, PathBuf};

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

/// A small tensor of each dtype with awkward values (extremes, negatives, NaN).
fn sample(dt: DType) -> Tensor {
    let xs = [0.0, 1.0, -2.0, 127.0, 3.5, -128.0];
    let mut t = Tensor::new(vec![2, 3], TensorData::from_f64s(dt, xs.into_iter())).unwrap();
    if dt == DType::F32 {
        t = Tensor::from_vec(
            vec![2, 3],
            vec![f32::NAN, -0.0, f32::INFINITY, 1e-40, 3.0, f32::MAX],
        );
    }
    if dt == DType::U64 {
        t = Tensor::from_vec(vec![3], vec![0u64, u64::MAX, 1 << 63]);
    }
    t
}

#[test]
fn pb_round_trips_every_dtype() {
    let dir = tempfile::tempdir().unwrap();
    for dt in DType::ALL {
        let t = sample(dt);
        let p = dir.path().join(format!("{dt}.pb"));
        write_tensor_pb(&p, "x", &t).unwrap();
        let (name, back) = read_tensor_pb(&p).unwrap();
        assert_eq!(name, "x");
        assert_eq!(back, t, "{dt}");
    }
}

#[test]
fn npy_round_trips_every_dtype_including_scalars_and_empty() {
    let dir = tempfile::tempdir().unwrap();
    for dt in DType::ALL {
        for t in [
            sample(dt),
            Tensor::zeros(dt, vec![]),
            Tensor::zeros(dt, vec![0, 4]),
        ] {
            let p = dir.path().join(format!("{dt}.npy"));
            write_npy(&p, &t).unwrap();
            assert_eq!(read_npy(&p).unwrap(), t, "{dt} {:?}", t.shape());
        }
    }
}

const FIXTURES: &[(&str, DType, &[usize])] = &[
    ("f32_2x3", DType::F32, &[2, 3]),
    ("f64_3", DType::F64, &[3]),
    ("f16_2x2", DType::F16, &[2, 2]),
    ("i8_4", DType::I8, &[4]),
    ("i16_3", DType::I16, &[3]),
    ("i32_2", DType::I32, &[2]),
    ("i64_scalar", DType::I64, &[]),
    ("u8_3", DType::U8, &[3]),
    ("u16_2", DType::U16, &[2]),
    ("u32_2", DType::U32, &[2]),
    ("u64_2", DType::U64, &[2]),
    ("bool_2x2", DType::Bool, &[2, 2]),
    ("f32_empty_0x3", DType::F32, &[0, 3]),
];

#[test]
fn numpy_files_read_and_are_rewritten_byte_for_byte() {
    for &(name, dt, shape) in FIXTURES {
        let file = std::fs::read(data(&format!("{name}.npy"))).unwrap();
        let t = read_npy_bytes(&file).unwrap();
        assert_eq!((t.dtype(), t.shape()), (dt, shape), "{name}");
        assert_eq!(write_npy_bytes(&t), file, "{name}");
        // The .pb written by onnx.numpy_helper holds the same tensor.
        let (pb_name, from_pb) = read_tensor_pb(&data(&format!("{name}.pb"))).unwrap();
        assert_eq!(pb_name, name);
        assert_eq!(from_pb, t, "{name}");
        // (onnx also writes an empty `raw_data` for empty tensors: proto2 presence.)
        if !t.is_empty() {
            assert_eq!(
                write_tensor_pb_bytes(name, &t),
                std::fs::read(data(&format!("{name}.pb"))).unwrap(),
                "{name}"
            );
        }
    }
    let t = read_npy(&data("f32_2x3.npy")).unwrap();
    assert_eq!(t.to_f64s(), vec![0.0, 0.25, 0.5, 0.75, 1.0, 1.25]);
    let t = read_npy(&data("u64_2.npy")).unwrap();
    assert_eq!(t.as_slice::<u64>().unwrap(), &[0, u64::MAX]);
    let t = read_npy(&data("bool_2x2.npy")).unwrap();
    assert_eq!(t.as_slice::<bool>().unwrap(), &[true, false, false, true]);
}

#[test]
fn npy_version_2_headers_are_read() {
    let t = read_npy(&data("v2_f32_2.npy")).unwrap();
    assert_eq!(t.as_slice::<f32>().unwrap(), &[1.0, 2.0]);
}

#[test]
fn pb_typed_fields_written_by_onnx_helper_are_read() {
    let f32s = read_tensor_pb(&data("typed_f32.pb")).unwrap().1;
    assert_eq!(f32s.as_slice::<f32>().unwrap(), &[1.0, 2.5]);
    let i64s = read_tensor_pb(&data("typed_i64.pb")).unwrap().1;
    assert_eq!(i64s.as_slice::<i64>().unwrap(), &[1, -2, 3]);
    let f16s = read_tensor_pb(&data("typed_f16.pb")).unwrap().1;
    assert_eq!(f16s.to_f64s(), vec![1.0, -0.5]);
    let bools = read_tensor_pb(&data("typed_bool.pb")).unwrap().1;
    assert_eq!(bools.as_slice::<bool>().unwrap(), &[true, false, true]);
    let u64s = read_tensor_pb(&data("typed_u64.pb")).unwrap().1;
    assert_eq!(u64s.as_slice::<u64>().unwrap(), &[u64::MAX]);
}

#[test]
fn fortran_order_npy_is_a_clear_error() {
    let e = read_npy(&data("fortran_2x3.npy")).unwrap_err().to_string();
    assert!(e.contains("fortran_order"), "{e}");
}

fn npy_with_header(h: &str, payload: &[u8]) -> Vec<u8> {
    let mut v = b"\x93NUMPY\x01\x00".to_vec();
    v.extend_from_slice(&(h.len() as u16).to_le_bytes());
    v.extend_from_slice(h.as_bytes());
    v.extend_from_slice(payload);
    v
}

#[test]
fn malformed_npy_files_are_clean_errors() {
    let good = std::fs::read(data("f32_2x3.npy")).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty", vec![], "magic"),
        ("bad magic", b"\x93NUMPX\x01\x00\x00\x00".to_vec(), "magic"),
        ("truncated header", good[..40].to_vec(), "longer than the file"),
        ("truncated data", good[..good.len() - 1].to_vec(), "needs 24 data bytes"),
        ("version 9", [&good[..6], &[9, 0], &good[8..]].concat(), "version 9"),
        (
            "big endian",
            npy_with_header("{'descr': '>f4', 'fortran_order': False, 'shape': (1,), }", &[0; 4]),
            "big-endian",
        ),
        (
            "object dtype",
            npy_with_header("{'descr': '|O', 'fortran_order': False, 'shape': (1,), }", &[0; 8]),
            "unsupported dtype",
        ),
        (
            "overflowing shape",
            npy_with_header(
                "{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296, 4294967296), }",
                &[],
            ),
            "overflows",
        ),
        (
            "huge dim",
            npy_with_header(
                "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999999,), }",
                &[],
            ),
            "overflows",
        ),
        (
            "missing shape",
            npy_with_header("{'descr': '<f4', 'fortran_order': False}", &[]),
            "no `shape`",
        ),
        ("not a dict", npy_with_header("hello", &[]), "malformed header"),
    ];
    for (what, bytes, want) in cases {
        let e = read_npy_bytes(&bytes).expect_err(what).to_string();
        assert!(e.contains(want), "{what}: {e}");
    }
}

#[test]
fn malformed_pb_files_are_clean_errors() {
    let good = std::fs::read(data("f32_2x3.pb")).unwrap();
    let e = read_tensor_pb_bytes(&good[..good.len() - 3], None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("malformed") || e.contains("needs"), "{e}");
    let e = read_tensor_pb_bytes(&[0xff, 0xff, 0xff], None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("malformed"), "{e}");
}
