//! kiln-runtime: loads models (ONNX or the text form), runs them on the interpreter, and
//! compares results with reference data; owns the backend-neutral kernel layer ([`kernel`]:
//! partitioning, the plan executor both backends plug into), the hand-written CPU kernels
//! ([`kernels`]: GEMM, attention, conv) and the thread pool ([`pool`]).

pub mod compare;
pub mod kernel;
pub mod kernels;
pub mod model;
pub mod pool;
pub mod testdata;

pub use compare::{compare, OutputError, Tolerance, MODEL_TOLERANCE, ONNX_NODE_TOLERANCE};
pub use model::{LoadError, Model};
pub use testdata::{TestData, TestDataError};
