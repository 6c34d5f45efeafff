//! kiln-runtime: loads models (ONNX or the text form), runs them, and compares results with
//! reference data. Today graphs run on the reference interpreter; the JIT and AOT backends
//! will plug in behind [`Model::run`].

pub mod compare;
pub mod kernel;
pub mod kernels;
pub mod model;
pub mod pool;
pub mod testdata;

pub use compare::{compare, OutputError, Tolerance, MODEL_TOLERANCE, ONNX_NODE_TOLERANCE};
pub use model::{LoadError, Model};
pub use testdata::{TestData, TestDataError};
