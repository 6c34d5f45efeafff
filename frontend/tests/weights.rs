//! `.kir` models with weights files: tensors named in a safetensors file or an `.npy` file
//! beside the model load memory-mapped, every path stays inside the model's folder, and
//! malformed or mismatched files are clear errors, never panics.

use kiln_frontend::tensor_io::write_npy;
use kiln_frontend::weights::{read_safetensors, write_safetensors};
use kiln_frontend::{load, Bytes};
use kiln_ir::{Attr, OpKind, Storage, Tensor};
use std::path::Path;

fn weight(n: usize) -> Tensor {
    Tensor::from_vec(
        vec![n, 4],
        (0..n * 4).map(|i| i as f32 * 0.25 - 1.0).collect(),
    )
}

fn model(dir: &Path, w_ref: &str, b_ref: &str) -> std::path::PathBuf {
    let src = format!(
        "func @m(%x: f32[B, 8]) -> (f32[B, 4]) {{\n  \
         %w = constant {{value = dense<f32[8, 4]> {w_ref}}}\n  \
         %b = constant {{value = dense<f32[4]> {b_ref}}}\n  \
         %y = matmul %x, %w\n  \
         %z = add %y, %b\n  \
         return %z\n}}\n"
    );
    let p = dir.join("m.kir");
    std::fs::write(&p, src).unwrap();
    p
}

fn constants(g: &kiln_ir::Graph) -> Vec<Tensor> {
    g.nodes
        .iter()
        .filter(|n| n.op == OpKind::Constant)
        .map(|n| match n.attrs.get("value") {
            Some(Attr::Tensor(t)) => t.as_ref().clone(),
            _ => panic!("constant without value"),
        })
        .collect()
}

fn load_err(p: &Path) -> String {
    match load(p) {
        Ok(_) => panic!("{} loaded", p.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn safetensors_and_npy_weights_load_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let (w, b) = (
        weight(8),
        Tensor::from_vec(vec![4], vec![0.5f32, -0.5, 1.5, 2.0]),
    );
    write_safetensors(&dir.path().join("w.safetensors"), &[("w".into(), &w)]).unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    write_npy(&dir.path().join("sub/b.npy"), &b).unwrap();
    let p = model(
        dir.path(),
        r#"file("w.safetensors", "w")"#,
        r#"file("sub/b.npy")"#,
    );
    let g = load(&p).unwrap();
    let ks = constants(&g);
    assert_eq!(ks, vec![w, b]);
    // safetensors aligns its data: the weight is used in the mapped file, not copied.
    assert_eq!(ks[0].data().storage(), Storage::Mapped);
}

#[test]
fn paths_outside_the_models_folder_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let inner = dir.path().join("model");
    std::fs::create_dir(&inner).unwrap();
    write_safetensors(
        &dir.path().join("w.safetensors"),
        &[("w".into(), &weight(8))],
    )
    .unwrap();
    for r in [
        r#"file("../w.safetensors", "w")"#,
        r#"file("/etc/passwd", "w")"#,
        r#"file("", "w")"#,
    ] {
        let p = model(&inner, r, "[1.0, 2.0, 3.0, 4.0]");
        let e = load_err(&p);
        assert!(
            e.contains("escapes") || e.contains("relative") || e.contains("empty"),
            "{r}: {e}"
        );
    }
}

#[test]
fn mismatched_missing_and_malformed_weights_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_safetensors(&d.join("w.safetensors"), &[("w".into(), &weight(3))]).unwrap();
    write_safetensors(&d.join("ok.safetensors"), &[("w".into(), &weight(8))]).unwrap();
    std::fs::write(
        d.join("junk.safetensors"),
        b"\xff\xff\xff\xff\xff\xff\xff\x7f{",
    )
    .unwrap();
    std::fs::write(d.join("short.safetensors"), b"\x02\0\0").unwrap();
    std::fs::write(d.join("bad.npy"), b"\x93NUMPY\x01\0\x10\0{'descr': '<f4'").unwrap();
    write_npy(
        &d.join("i.npy"),
        &Tensor::from_vec(vec![4], vec![1i64, 2, 3, 4]),
    )
    .unwrap();
    let b = "[1.0, 2.0, 3.0, 4.0]";
    let cases: [(&str, &str, &str); 8] = [
        (r#"file("w.safetensors", "w")"#, b, "[3, 4]"),
        (r#"file("w.safetensors", "v")"#, b, "no tensor `v`"),
        (
            r#"file("missing.safetensors", "w")"#,
            b,
            "missing.safetensors",
        ),
        (
            r#"file("junk.safetensors", "w")"#,
            b,
            "not a valid safetensors file",
        ),
        (
            r#"file("short.safetensors", "w")"#,
            b,
            "not a valid safetensors file",
        ),
        (r#"file("w.safetensors")"#, b, "name the tensor"),
        (
            r#"file("ok.safetensors", "w")"#,
            r#"file("bad.npy")"#,
            "npy",
        ),
        (r#"file("ok.safetensors", "w")"#, r#"file("i.npy")"#, "i64"),
    ];
    for (w, bias, want) in cases {
        let p = model(d, w, bias);
        let e = load_err(&p);
        assert!(e.contains(want), "{w} / {bias}: expected `{want}` in: {e}");
        assert!(e.contains("m.kir"), "the error names the model: {e}");
    }
}

#[test]
fn safetensors_round_trip_every_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let ts: Vec<(String, Tensor)> = kiln_ir::DType::ALL
        .iter()
        .map(|&dt| {
            let data = kiln_ir::TensorData::from_i64s(dt, (0..6).map(|i| i % 2));
            (
                dt.name().to_string(),
                Tensor::new(vec![2, 3], data).unwrap(),
            )
        })
        .collect();
    let refs: Vec<(String, &Tensor)> = ts.iter().map(|(n, t)| (n.clone(), t)).collect();
    let p = dir.path().join("all.safetensors");
    write_safetensors(&p, &refs).unwrap();
    let mut want = ts.clone();
    want.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        read_safetensors(&Bytes::from(std::fs::read(&p).unwrap())).unwrap(),
        want
    );
}

#[test]
fn truncated_safetensors_files_are_errors_at_every_length() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("w.safetensors");
    write_safetensors(&p, &[("w".into(), &weight(2))]).unwrap();
    let full = std::fs::read(&p).unwrap();
    for n in 0..full.len() {
        assert!(
            read_safetensors(&Bytes::copy_from_slice(&full[..n])).is_err(),
            "{n} bytes"
        );
    }
    assert!(read_safetensors(&Bytes::from(full)).is_ok());
}
