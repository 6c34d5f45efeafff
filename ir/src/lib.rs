//! kiln-ir: the tensor IR every part of kiln shares — dtypes, symbolic shapes, tensors,
//! the SSA graph, the op set with shape rules and reference semantics, the verifier, the
//! text form, and the reference interpreter.
#![warn(missing_docs)]

pub mod attr;
pub mod buf;
pub mod builder;
pub mod dtype;
pub mod graph;
pub mod infer;
pub mod interp;
pub mod limits;
pub mod ops;
pub mod shape;
pub mod tensor;
pub mod text;
pub mod verify;

pub use attr::{Attr, Attrs};
pub use builder::GraphBuilder;
pub use dtype::DType;
pub use graph::{Graph, Node, TensorType, Value, ValueId};
pub use infer::{infer_types, InferError};
pub use interp::{run, run_named, EvalError};
pub use ops::{Fact, OpKind};
pub use shape::{Dim, Shape};
pub use tensor::{Buf, Elem, Storage, Tensor, TensorData};
pub use verify::{verify, verify_and_infer, VerifyError};

#[doc(hidden)]
pub use half;
