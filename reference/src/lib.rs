//! kiln-reference: what a result is checked against. [`TestData`] reads an ONNX test-data
//! folder (inputs and reference outputs); [`compare`] measures one output against its
//! reference under a named [`Tolerance`]. Used by `kiln run --test-data`, `kiln compare`
//! and the tests; no backend depends on it.

pub mod compare;
pub mod testdata;

pub use compare::{
    compare, OutputError, Tolerance, MODEL_TOLERANCE, ONNX_NODE_TOLERANCE, QUANT_MODEL_TOLERANCE,
};
pub use testdata::{TestData, TestDataError};
