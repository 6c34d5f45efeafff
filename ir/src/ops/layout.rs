//! The layout op family: shape rules and reference semantics side by side.

use super::{not_in_family, Fact};
use crate::{Attrs, OpKind, Tensor};

/// Shape rule of the layout ops.
pub fn infer(op: OpKind, _attrs: &Attrs, _inputs: &[Option<&Fact>]) -> Result<Vec<Fact>, String> {
    Err(not_in_family(op))
}

/// Reference semantics of the layout ops.
pub fn eval(
    op: OpKind,
    _attrs: &Attrs,
    _inputs: &[Option<&Tensor>],
) -> Result<Vec<Tensor>, String> {
    Err(not_in_family(op))
}
