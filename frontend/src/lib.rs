//! kiln-frontend: model files to IR (ONNX import, protobuf to IR; the text form through
//! kiln-ir's parser; [`load`] picks by extension) and tensor files (.pb, .npy).

pub mod load;
pub mod onnx;
pub mod tensor_io;
pub mod weights;

/// The buffer type [`load_model_bytes`] takes, re-exported so callers need no `bytes` dependency.
pub use bytes::Bytes;
pub use load::{load, LoadError};
pub use onnx::{load_model, load_model_bytes, OnnxError, UnsupportedOp};
