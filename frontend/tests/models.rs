//! Every model in shared/models decodes, has the op histogram its export.json records,
//! and converts to IR (or, while an op family is still being written, stops only at a
//! shape rule that is not implemented yet).

use kiln_frontend::onnx::{decode_model, load_model, op_type_histogram, OnnxError};
use std::path::{Path, PathBuf};
use std::time::Instant;

fn models() -> Vec<PathBuf> {
    // `<repo>/../shared/models` in the main checkout; worktrees sit one level deeper, so
    // look in every ancestor.
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let Some(root) = here
        .ancestors()
        .map(|a| a.join("shared/models"))
        .find(|p| p.is_dir())
    else {
        return vec![];
    };
    let mut out = vec![];
    for set in ["tiny", "bench"] {
        let Ok(dirs) = std::fs::read_dir(root.join(set)) else {
            continue;
        };
        for d in dirs.flatten() {
            let p = d.path().join("model.onnx");
            if p.exists() {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The `"ops"` object of export.json, parsed just enough (`"Name": count` pairs).
fn exported_ops(model: &Path) -> Option<Vec<(String, usize)>> {
    let text = std::fs::read_to_string(model.with_file_name("export.json")).ok()?;
    let start = text.find("\"ops\"")?;
    let body = &text[start..];
    let body = &body[body.find('{')? + 1..body.find('}')?];
    let mut v: Vec<(String, usize)> = body
        .split(',')
        .filter_map(|kv| {
            let (k, c) = kv.split_once(':')?;
            Some((
                k.trim().trim_matches('"').to_string(),
                c.trim().parse().ok()?,
            ))
        })
        .collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    Some(v)
}

#[test]
fn every_shared_model_decodes_with_its_recorded_op_histogram() {
    let models = models();
    if models.is_empty() {
        eprintln!("no models under shared/models: skipped");
        return;
    }
    for p in &models {
        let bytes = bytes::Bytes::from(std::fs::read(p).unwrap());
        let m = decode_model(bytes).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let hist = op_type_histogram(&m);
        assert!(!hist.is_empty(), "{}", p.display());
        if let Some(want) = exported_ops(p) {
            assert_eq!(hist, want, "{}", p.display());
        }
    }
}

#[test]
fn every_shared_model_converts_to_ir() {
    for p in models() {
        let t = Instant::now();
        match load_model(&p) {
            Ok(g) => {
                eprintln!(
                    "{}: {} nodes in {:?}",
                    p.display(),
                    g.nodes.len(),
                    t.elapsed()
                );
                assert!(!g.inputs.is_empty() && !g.outputs.is_empty());
                kiln_ir::verify(&g).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            }
            // Until every op family has landed, a missing shape rule is the only
            // acceptable failure.
            Err(OnnxError::Infer(e)) if e.msg.contains("is not implemented by its family") => {
                eprintln!("{}: pending shape rule: {e}", p.display())
            }
            Err(e) => panic!("{}: {e}", p.display()),
        }
    }
}
