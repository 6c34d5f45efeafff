//! The ONNX importer: decodes a `.onnx` protobuf (memory-mapped, weights kept as zero-copy
//! slices until they are copied once into kiln tensors), migrates older opsets to the
//! newest-opset form the IR uses, orders the nodes topologically and builds a kiln
//! [`Graph`] with shape inference.
//!
//! The work is split in two phases so each can be tested alone:
//! - [`lower`]: ONNX protos to a list of IR-shaped nodes named by string (topological
//!   sort, constants, attributes, opset migration in [`migrate`], If captures);
//! - [`build`]: that list into a [`kiln_ir::GraphBuilder`], which infers types.

pub mod proto;

mod attrs;
mod build;
mod lower;
mod migrate;
mod tensor;

pub(crate) use tensor::safe_location;
pub use tensor::{tensor_from_proto, tensor_to_proto};

use bytes::Bytes;
use kiln_ir::{Graph, InferError};
use prost::Message;
use std::fmt;
use std::path::{Path, PathBuf};

/// The newest `ai.onnx` opset kiln imports: that of the ONNX release (1.22.0) whose node
/// tests the conformance runner passes.
pub const NEWEST_OPSET: i64 = 27;

/// An op kiln cannot import, with how often the model uses it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnsupportedOp {
    /// `OpType` for the default domain, `domain.OpType` otherwise.
    pub op: String,
    /// How many nodes use it (subgraphs included).
    pub count: usize,
    /// The name of the first node that uses it (may be empty).
    pub first_node: String,
    /// Where that node is: its index in its graph's node list (subgraphs count their own),
    /// and its first output's name, for nodes without a name.
    pub first_index: usize,
    /// The first node's first output (may be empty).
    pub first_output: String,
}

impl fmt::Display for UnsupportedOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ×{} (first: ", self.op, self.count)?;
        if !self.first_node.is_empty() {
            write!(f, "node `{}`)", self.first_node)
        } else if !self.first_output.is_empty() {
            write!(
                f,
                "node #{}, unnamed, output `{}`)",
                self.first_index, self.first_output
            )
        } else {
            write!(f, "node #{}, unnamed)", self.first_index)
        }
    }
}

/// Frames of prost's field path kept at each end of a long decode error.
const DECODE_PATH_KEPT: usize = 2;

/// prost's decode error in one line: a path nested a hundred messages deep (the recursion
/// limit) keeps its first and last frames and the count of those left out.
fn short_decode_error(e: &prost::DecodeError) -> String {
    let full = e.to_string();
    let parts: Vec<&str> = full.split(": ").collect();
    // [prefix, frame..., description]
    if parts.len() <= 2 * DECODE_PATH_KEPT + 2 {
        return full;
    }
    let (head, rest) = parts.split_at(1 + DECODE_PATH_KEPT);
    let (skipped, tail) = rest.split_at(rest.len() - DECODE_PATH_KEPT - 1);
    format!(
        "{}: … {} more nested fields …: {}",
        head.join(": "),
        skipped.len(),
        tail.join(": ")
    )
}

fn list_ops(ops: &[UnsupportedOp]) -> String {
    ops.iter()
        .map(|o| o.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Everything that can go wrong importing an ONNX model.
#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    /// The file could not be read.
    #[error("cannot read `{path}`: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The bytes are not a valid protobuf message.
    #[error("malformed ONNX protobuf ({what}): {}", short_decode_error(.err))]
    Decode {
        /// The message that failed to decode.
        what: &'static str,
        /// prost's description (shown shortened: not a `source`, so that it is not
        /// printed a second time in full by error reporters that walk the chain).
        err: prost::DecodeError,
    },
    /// The model has no graph.
    #[error("the model has no graph")]
    NoGraph,
    /// The model imports an `ai.onnx` opset that does not exist, or one newer than kiln
    /// knows.
    #[error("the model imports ai.onnx opset {version}, which {}; kiln supports opsets 1 to {newest}", if *.version > *.newest { "is newer than kiln knows" } else { "does not exist" })]
    UnsupportedOpset {
        /// The version the model imports.
        version: i64,
        /// The newest `ai.onnx` opset kiln imports ([`NEWEST_OPSET`]).
        newest: i64,
    },
    /// A graph output is listed twice.
    #[error("graph output `{0}` is listed twice")]
    DuplicateOutput(String),
    /// The model does not import the default (`ai.onnx`) opset.
    #[error("the model imports no `ai.onnx` opset but uses its ops")]
    NoOpset,
    /// The model uses ops kiln does not implement; every one is listed.
    #[error("the model uses {} unsupported op type(s): {}", .ops.len(), list_ops(.ops))]
    UnsupportedOps {
        /// Each unsupported op type, most used first.
        ops: Vec<UnsupportedOp>,
    },
    /// A tensor, value or attribute uses an ONNX data type kiln does not have
    /// (strings, complex, 8-bit floats, an unknown code).
    #[error("{what} has data type {code} ({}), which kiln does not support", tensor::onnx_type_name(*.code))]
    UnsupportedDtype {
        /// What has it: "tensor `w`", "value `x`", "attribute `to`".
        what: String,
        /// The ONNX `TensorProto.DataType` number.
        code: i32,
    },
    /// A graph input or output is not a tensor (sequence, map, optional, sparse).
    #[error("value `{value}` has a {kind} type; kiln supports only tensors")]
    UnsupportedType {
        /// The value's name.
        value: String,
        /// The kind of type it has.
        kind: String,
    },
    /// A tensor (initializer, attribute or file) is malformed.
    #[error("tensor `{tensor}`: {msg}")]
    Tensor {
        /// The tensor's name.
        tensor: String,
        /// What is wrong.
        msg: String,
    },
    /// A tensor's external data location is unsafe or unreadable.
    #[error("tensor `{tensor}`: external data `{path}`: {msg}")]
    ExternalData {
        /// The tensor's name.
        tensor: String,
        /// The location as written in the model.
        path: String,
        /// What is wrong.
        msg: String,
    },
    /// A node reads a value nothing defines.
    #[error("missing initializer or input `{name}` used by node `{node}` ({op})")]
    MissingInput {
        /// The value name.
        name: String,
        /// The node that reads it.
        node: String,
        /// Its op type.
        op: String,
    },
    /// The nodes form a cycle.
    #[error("the graph has a cycle through node `{node}` ({op})")]
    Cycle {
        /// A node on the cycle.
        node: String,
        /// Its op type.
        op: String,
    },
    /// Two definitions of one value name.
    #[error("value `{name}` is defined twice (second time by {by})")]
    DuplicateValue {
        /// The value name.
        name: String,
        /// What defines it the second time.
        by: String,
    },
    /// A node is malformed (attribute kinds, migration).
    #[error("node `{node}` ({op}): {msg}")]
    Node {
        /// The node's name.
        node: String,
        /// Its op type.
        op: String,
        /// What is wrong.
        msg: String,
    },
    /// A declared type (graph input/output, value_info) is malformed or not a tensor type.
    #[error("value `{value}`: {msg}")]
    Type {
        /// The value's name.
        value: String,
        /// What is wrong.
        msg: String,
    },
    /// A graph output names a value nothing defines.
    #[error("graph output `{0}` is not defined by any node, initializer or input")]
    MissingOutput(String),
    /// Shape inference found an inconsistency.
    #[error(transparent)]
    Infer(#[from] InferError),
}

/// Loads an ONNX model file. The file is memory-mapped; external data files are found
/// relative to its folder.
pub fn load_model(path: &Path) -> Result<Graph, OnnxError> {
    let bytes = map_file(path)?;
    load_model_bytes(bytes, path.parent())
}

/// Loads an ONNX model from bytes. `base_dir` is the folder external data is relative
/// to; without it, a model with external data is an error.
pub fn load_model_bytes(bytes: Bytes, base_dir: Option<&Path>) -> Result<Graph, OnnxError> {
    let model = decode_model(bytes)?;
    let lowered = lower::lower_model(&model, base_dir)?;
    build::build_model(&lowered)
}

/// Decodes the protobuf only.
pub fn decode_model(bytes: Bytes) -> Result<proto::ModelProto, OnnxError> {
    proto::ModelProto::decode(bytes).map_err(|err| OnnxError::Decode {
        what: "ModelProto",
        err,
    })
}

/// Counts the op types of a decoded model's main graph and subgraphs, as `domain.Op`
/// (just `Op` for the default domain), most used first.
pub fn op_type_histogram(model: &proto::ModelProto) -> Vec<(String, usize)> {
    let mut m = std::collections::HashMap::<String, usize>::new();
    if let Some(g) = &model.graph {
        lower::walk_nodes(g, &mut |n| *m.entry(lower::op_key(n)).or_default() += 1);
    }
    let mut v: Vec<_> = m.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v
}

/// The opsets a model file imports, as (domain, version) with `""` for `ai.onnx`; `None`
/// if the file cannot be read or decoded. For display (`kiln info`).
pub fn opsets_of(path: &Path) -> Option<Vec<(String, i64)>> {
    let model = decode_model(map_file(path).ok()?).ok()?;
    Some(
        model
            .opset_import
            .iter()
            .map(|o| {
                let d = if o.domain == "ai.onnx" { "" } else { &o.domain };
                (d.to_string(), o.version)
            })
            .collect(),
    )
}

/// Memory-maps a file as `Bytes` (an empty file is an empty buffer: mapping it fails).
pub(crate) fn map_file(path: &Path) -> Result<Bytes, OnnxError> {
    let io = |source| OnnxError::Io {
        path: path.to_path_buf(),
        source,
    };
    if path.is_dir() {
        return Err(io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "it is a directory, not a model file",
        )));
    }
    let file = std::fs::File::open(path).map_err(io)?;
    if file.metadata().map_err(io)?.len() == 0 {
        return Ok(Bytes::new());
    }
    // SAFETY: the mapping is read-only; as with every mmap-based loader, the file must not
    // be truncated or modified by another process while it is mapped: while the model is
    // loaded, and after that while weights used in place from it are alive.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
    Ok(Bytes::from_owner(map))
}

#[cfg(test)]
mod tests;
