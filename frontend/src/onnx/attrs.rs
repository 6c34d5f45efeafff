//! ONNX attributes to kiln [`Attr`]s. Graph-valued attributes are lowered by the caller
//! (they need scope); dtype-valued attributes become kiln dtype names.

use super::proto::{attr_type as ty, AttributeProto};
use super::tensor::{dtype_of, tensor_from_proto};
use super::OnnxError;
use kiln_ir::Attr;
use std::path::Path;
use std::sync::Arc;

/// True if attribute `attr` of ONNX op `op` holds a `TensorProto.DataType` code, which
/// kiln stores as a dtype name (`"f32"`). `LayerNormalization.stash_type` is a precision
/// hint, not an output dtype, and stays an int.
pub(crate) fn is_dtype_attr(op: &str, attr: &str) -> bool {
    matches!(
        (op, attr),
        ("Cast", "to")
            | ("EyeLike", "dtype")
            | ("RandomNormal", "dtype")
            | ("RandomUniform", "dtype")
            | ("RandomNormalLike", "dtype")
            | ("RandomUniformLike", "dtype")
            | ("Multinomial", "dtype")
            | ("Bernoulli", "dtype")
            | ("QuantizeLinear", "output_dtype")
            | ("DequantizeLinear", "output_dtype")
    )
}

/// The attribute's kind: its `type` field, or for IR < 0.0.2 files without one, the
/// field that is set.
pub(crate) fn kind(a: &AttributeProto) -> i32 {
    if a.r#type != ty::UNDEFINED {
        return a.r#type;
    }
    if a.g.is_some() {
        ty::GRAPH
    } else if a.t.is_some() {
        ty::TENSOR
    } else if !a.s.is_empty() {
        ty::STRING
    } else if !a.floats.is_empty() {
        ty::FLOATS
    } else if !a.ints.is_empty() {
        ty::INTS
    } else if !a.strings.is_empty() {
        ty::STRINGS
    } else if a.f != 0.0 {
        ty::FLOAT
    } else {
        ty::INT
    }
}

fn utf8(b: &[u8], name: &str) -> Result<String, String> {
    String::from_utf8(b.to_vec()).map_err(|_| format!("attribute `{name}` is not valid UTF-8"))
}

/// Converts a non-graph attribute of ONNX op `op` on node `node`.
pub(crate) fn convert(
    op: &str,
    node: &str,
    a: &AttributeProto,
    base_dir: Option<&Path>,
) -> Result<Attr, OnnxError> {
    if is_dtype_attr(op, &a.name) && kind(a) == ty::INT {
        let code = i32::try_from(a.i).unwrap_or(-1);
        let dt = dtype_of(code, || {
            format!("attribute `{}` of node `{node}` ({op})", a.name)
        })?;
        return Ok(Attr::Str(dt.name().to_string()));
    }
    convert_inner(op, a, base_dir).map_err(|e| match e {
        Inner::Msg(msg) => OnnxError::Node {
            node: node.to_string(),
            op: op.to_string(),
            msg,
        },
        Inner::Onnx(e) => e,
    })
}

enum Inner {
    Msg(String),
    Onnx(OnnxError),
}

impl From<String> for Inner {
    fn from(s: String) -> Inner {
        Inner::Msg(s)
    }
}

fn convert_inner(op: &str, a: &AttributeProto, base_dir: Option<&Path>) -> Result<Attr, Inner> {
    let name = a.name.as_str();
    if !a.ref_attr_name.is_empty() {
        return Err(format!(
            "attribute `{name}` refers to a function attribute; functions are not supported"
        )
        .into());
    }
    let k = kind(a);
    if is_dtype_attr(op, name) {
        return Err(format!("attribute `{name}` should be a data type code (int)").into());
    }
    Ok(match k {
        ty::FLOAT => Attr::Float(a.f),
        ty::INT => Attr::Int(a.i),
        ty::STRING => Attr::Str(utf8(&a.s, name)?),
        ty::FLOATS => Attr::Floats(a.floats.clone()),
        ty::INTS => Attr::Ints(a.ints.clone()),
        ty::STRINGS => Attr::Strs(
            a.strings
                .iter()
                .map(|s| utf8(s, name))
                .collect::<Result<_, _>>()?,
        ),
        ty::TENSOR => {
            let t =
                a.t.as_ref()
                    .ok_or_else(|| format!("attribute `{name}` is a tensor but holds none"))?;
            Attr::Tensor(Arc::new(
                tensor_from_proto(t, base_dir).map_err(Inner::Onnx)?,
            ))
        }
        ty::GRAPH => return Err(format!("attribute `{name}`: graph handled by the caller").into()),
        other => {
            return Err(format!(
                "attribute `{name}` has kind {} which kiln does not support",
                kind_name(other)
            )
            .into())
        }
    })
}

fn kind_name(k: i32) -> String {
    match k {
        ty::TENSORS => "TENSORS".into(),
        ty::GRAPHS => "GRAPHS".into(),
        ty::SPARSE_TENSOR => "SPARSE_TENSOR".into(),
        ty::SPARSE_TENSORS => "SPARSE_TENSORS".into(),
        ty::TYPE_PROTO => "TYPE_PROTO".into(),
        ty::TYPE_PROTOS => "TYPE_PROTOS".into(),
        k => format!("#{k}"),
    }
}
