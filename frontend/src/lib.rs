//! kiln-frontend: ONNX import (protobuf to IR) and tensor files (.pb, .npy).

pub mod onnx;
pub mod tensor_io;

/// The buffer type [`load_model_bytes`] takes, re-exported so callers need no `bytes` dependency.
pub use bytes::Bytes;
pub use onnx::{load_model, load_model_bytes, OnnxError, UnsupportedOp};
