//! kiln-frontend: ONNX import (protobuf to IR) and tensor files (.pb, .npy).

pub mod onnx;
pub mod tensor_io;

pub use onnx::{load_model, load_model_bytes, OnnxError, UnsupportedOp};
