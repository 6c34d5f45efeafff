//! `kiln convert`: write a model in the text form, its weights inline (hex) or, with
//! `--weights FILE.safetensors`, in one safetensors file beside the text that the text
//! names (`dense<f32[64, 64]> file("m.safetensors", "wq")`).

use anyhow::{bail, Context, Result};
use kiln_ir::Tensor;
use std::path::{Component, Path};

pub fn convert(model: &Path, output: &Path, weights: Option<&Path>) -> Result<()> {
    let m = kiln::Model::load(model)?;
    let g = m.graph();
    let (text, stored) = match weights {
        None => (kiln_ir::text::print(g), None),
        Some(w) => {
            let rel = relative_to_output(output, w)?;
            let (text, tensors) = kiln_frontend::weights::externalised(g, &rel);
            let refs: Vec<(String, &Tensor)> = tensors
                .iter()
                .map(|(k, t)| (k.clone(), t.as_ref()))
                .collect();
            kiln_frontend::weights::write_safetensors(w, &refs).map_err(anyhow::Error::msg)?;
            (text, Some((w, tensors.len())))
        }
    };
    std::fs::write(output, &text).with_context(|| format!("writing {}", output.display()))?;
    println!(
        "wrote {} ({} nodes, {} bytes)",
        output.display(),
        g.nodes.len(),
        text.len()
    );
    if let Some((w, n)) = stored {
        println!(
            "wrote {} ({n} tensors, {} bytes)",
            w.display(),
            std::fs::metadata(w).map(|m| m.len()).unwrap_or(0)
        );
    }
    Ok(())
}

/// The weights file's name as the text must give it: relative to the text file's folder,
/// inside it (the loader reads nothing outside the model's folder).
fn relative_to_output(output: &Path, weights: &Path) -> Result<String> {
    let abs = |p: &Path| -> Result<std::path::PathBuf> {
        let p = if p.is_absolute() {
            p.to_path_buf()
        } else {
            std::env::current_dir()?.join(p)
        };
        // Normalise `.` and `..` lexically (the files need not exist yet).
        let mut out = std::path::PathBuf::new();
        for c in p.components() {
            match c {
                Component::ParentDir => {
                    out.pop();
                }
                Component::CurDir => {}
                c => out.push(c),
            }
        }
        Ok(out)
    };
    let dir = abs(output)?
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let w = abs(weights)?;
    let Ok(rel) = w.strip_prefix(&dir) else {
        bail!(
            "--weights {}: the weights file must be in the folder of {} (or below it): a model reads nothing outside its folder",
            weights.display(),
            output.display()
        );
    };
    let Some(s) = rel.to_str().filter(|s| !s.is_empty()) else {
        bail!("--weights {}: not a usable file name", weights.display());
    };
    Ok(s.to_string())
}
