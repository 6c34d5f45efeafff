//! Loading a model file: the format dispatch (`.onnx`, or kiln's text form for `.kir`) and
//! verification. The host API's `kiln::Model` is built on [`load`].

use kiln_ir::Graph;
use std::path::Path;

/// Why a model could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The ONNX importer rejected the file.
    #[error(transparent)]
    Onnx(#[from] crate::onnx::OnnxError),
    /// The text form did not parse.
    #[error("{path}:\n{err}")]
    Text {
        /// The file.
        path: String,
        /// The parse error, with line and column.
        err: kiln_ir::text::ParseError,
    },
    /// The graph does not verify.
    #[error("{path}: {err}")]
    Verify {
        /// The file.
        path: String,
        /// The broken invariant.
        err: kiln_ir::VerifyError,
    },
    /// The file could not be read.
    #[error("cannot read {path}: {err}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        err: std::io::Error,
    },
}

/// Loads an ONNX file, or a text-form file when the extension is `.kir`, and verifies it.
pub fn load(path: impl AsRef<Path>) -> Result<Graph, LoadError> {
    let path = path.as_ref();
    let shown = path.display().to_string();
    let graph = if path.extension().is_some_and(|e| e == "kir") {
        let src = std::fs::read_to_string(path).map_err(|err| LoadError::Io {
            path: shown.clone(),
            err,
        })?;
        let mut weights = crate::weights::WeightsReader::new(path.parent());
        let mut resolve =
            |r: &kiln_ir::text::ExternalRef, dtype: kiln_ir::DType, shape: &[usize]| {
                weights.read(r, dtype, shape)
            };
        kiln_ir::text::parse_with(&src, &mut resolve).map_err(|err| LoadError::Text {
            path: shown.clone(),
            err,
        })?
    } else {
        crate::onnx::load_model(path)?
    };
    kiln_ir::verify(&graph).map_err(|err| LoadError::Verify { path: shown, err })?;
    Ok(graph)
}
