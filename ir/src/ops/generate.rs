//! The generate op family (constant, constant_of_shape, range, eye_like): tensors made
//! from attributes or shapes. Shape rules and reference semantics side by side.

use super::{not_in_family, Fact};
use crate::{Attrs, OpKind, Shape, Tensor, TensorType};

/// Shape rule of the generate ops.
pub fn infer(op: OpKind, attrs: &Attrs, _inputs: &[Option<&Fact>]) -> Result<Vec<Fact>, String> {
    match op {
        // constant {value}: the tensor itself.
        OpKind::Constant => {
            let t = attrs.req_tensor("value")?;
            let ty = TensorType::new(t.dtype(), Shape::fixed(t.shape()));
            Ok(vec![Fact {
                ty,
                konst: Some(t),
                dims: None,
            }])
        }
        _ => Err(not_in_family(op)),
    }
}

/// Reference semantics of the generate ops.
pub fn eval(op: OpKind, attrs: &Attrs, _inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
    match op {
        OpKind::Constant => Ok(vec![attrs.req_tensor("value")?.as_ref().clone()]),
        _ => Err(not_in_family(op)),
    }
}
