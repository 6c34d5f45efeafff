//! ONNX test-data folders (`test_data_set_0/input_0.pb`, `output_0.pb`, ...): loading the
//! inputs and reference outputs, in index order.

use kiln_ir::Tensor;
use std::path::{Path, PathBuf};

/// Why a test-data folder could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TestDataError {
    /// Listing the folder failed.
    #[error("cannot read test data folder {path}: {err}")]
    Io {
        /// The folder.
        path: String,
        /// The OS error.
        err: std::io::Error,
    },
    /// A tensor file failed to decode.
    #[error("{path}: {msg}")]
    Tensor {
        /// The file.
        path: String,
        /// What is wrong.
        msg: String,
    },
}

/// The inputs and expected outputs of one test case, each with its name.
#[derive(Debug, Clone)]
pub struct TestData {
    /// `input_<i>.pb` in order of i.
    pub inputs: Vec<(String, Tensor)>,
    /// `output_<i>.pb` in order of i.
    pub outputs: Vec<(String, Tensor)>,
}

impl TestData {
    /// Reads `dir/input_*.pb` and `dir/output_*.pb`.
    pub fn load(dir: &Path) -> Result<TestData, TestDataError> {
        Ok(TestData {
            inputs: read_series(dir, "input_")?,
            outputs: read_series(dir, "output_")?,
        })
    }
}

fn read_series(dir: &Path, prefix: &str) -> Result<Vec<(String, Tensor)>, TestDataError> {
    let io = |err| TestDataError::Io {
        path: dir.display().to_string(),
        err,
    };
    let mut files: Vec<(usize, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if let Some(idx) = name
            .strip_prefix(prefix)
            .and_then(|r| r.strip_suffix(".pb"))
        {
            if let Ok(i) = idx.parse::<usize>() {
                files.push((i, path.clone()));
            }
        }
    }
    files.sort();
    files
        .into_iter()
        .map(|(_, p)| {
            kiln_frontend::tensor_io::read_tensor_pb(&p).map_err(|e| TestDataError::Tensor {
                path: p.display().to_string(),
                msg: e.to_string(),
            })
        })
        .collect()
}
