//! Native fast paths for data-movement ops the partitioner leaves as fallbacks (today:
//! f32 `transpose`), so glue between kernels costs a copy, not the interpreter's per-element
//! index map. Anything unusual (other dtypes, bad attributes) returns `None` and runs
//! through the interpreter, which also reports the errors.

use kiln_ir::{Node, OpKind, Tensor};

/// Whether ops of this kind may have a fast path (see [`run_fast`]).
pub fn has_fast_path(op: OpKind) -> bool {
    matches!(op, OpKind::Transpose)
}

/// The outputs of `node` computed natively, or `None` when it has no fast path here.
pub fn run_fast(node: &Node, ins: &[Option<&Tensor>]) -> Option<Vec<Tensor>> {
    match node.op {
        OpKind::Transpose => transpose(node, ins),
        _ => None,
    }
}

fn transpose(node: &Node, ins: &[Option<&Tensor>]) -> Option<Vec<Tensor>> {
    let x = (*ins.first()?)?;
    let src = x.as_slice::<f32>()?;
    let shape = x.shape();
    let rank = shape.len();
    let perm: Vec<usize> = match node.attrs.ints("perm").ok()? {
        Some(p) => p
            .iter()
            .map(|&a| usize::try_from(a).ok().filter(|&a| a < rank))
            .collect::<Option<_>>()?,
        None => (0..rank).rev().collect(),
    };
    if perm.len() != rank {
        return None;
    }
    let mut seen = vec![false; rank];
    for &p in &perm {
        if std::mem::replace(&mut seen[p], true) {
            return None;
        }
    }
    let st = kiln_ir::tensor::strides(shape);
    let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let in_st: Vec<usize> = perm.iter().map(|&p| st[p]).collect();
    let total = src.len();
    let mut out = Vec::with_capacity(total);
    if total > 0 {
        if rank == 0 {
            out.extend_from_slice(src);
        } else {
            let inner = out_shape[rank - 1];
            let ist = in_st[rank - 1];
            let outer = &out_shape[..rank - 1];
            let mut idx = vec![0usize; rank - 1];
            let mut off = 0usize;
            for _ in 0..total / inner {
                if ist == 1 {
                    out.extend_from_slice(&src[off..off + inner]);
                } else {
                    out.extend((0..inner).map(|j| src[off + j * ist]));
                }
                for d in (0..outer.len()).rev() {
                    idx[d] += 1;
                    off += in_st[d];
                    if idx[d] < outer[d] {
                        break;
                    }
                    off -= in_st[d] * outer[d];
                    idx[d] = 0;
                }
            }
        }
    }
    Some(vec![Tensor::from_vec(out_shape, out)])
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::{Attr, Attrs, ValueId};

    #[test]
    fn transpose_matches_the_interpreter() {
        let shapes: [&[usize]; 5] = [&[2, 3, 4, 5], &[1, 7, 3, 4], &[6], &[3, 1, 2], &[4, 0, 2]];
        for shape in shapes {
            let n: usize = shape.iter().product();
            let x = Tensor::from_vec(
                shape.to_vec(),
                (0..n).map(|i| i as f32 * 0.5 - 3.0).collect(),
            );
            let rank = shape.len() as i64;
            let perms: Vec<Option<Vec<i64>>> = match rank {
                1 => vec![None, Some(vec![0])],
                3 => vec![None, Some(vec![1, 0, 2]), Some(vec![2, 0, 1])],
                _ => vec![
                    None,
                    Some(vec![0, 2, 1, 3]),
                    Some(vec![0, 2, 3, 1]),
                    Some(vec![3, 1, 0, 2]),
                ],
            };
            for perm in perms {
                let attrs = match &perm {
                    Some(p) => Attrs::new().with("perm", Attr::Ints(p.clone())),
                    None => Attrs::new(),
                };
                let node = Node {
                    op: OpKind::Transpose,
                    attrs: attrs.clone(),
                    inputs: vec![Some(ValueId(0))],
                    outputs: vec![ValueId(1)],
                    name: String::new(),
                };
                let got = run_fast(&node, &[Some(&x)]).expect("fast path");
                let want = kiln_ir::ops::eval(OpKind::Transpose, &attrs, &[Some(&x)]).unwrap();
                assert_eq!(got[0], want[0], "shape {shape:?} perm {perm:?}");
            }
        }
    }

    #[test]
    fn bad_perms_and_other_dtypes_fall_back() {
        let x = Tensor::from_vec(vec![2, 3], vec![0f32; 6]);
        let i = Tensor::from_vec(vec![2, 3], vec![0i64; 6]);
        for (t, perm) in [
            (&x, vec![0, 0]),
            (&x, vec![0, 2]),
            (&x, vec![1]),
            (&i, vec![1, 0]),
        ] {
            let node = Node {
                op: OpKind::Transpose,
                attrs: Attrs::new().with("perm", Attr::Ints(perm.clone())),
                inputs: vec![Some(ValueId(0))],
                outputs: vec![ValueId(1)],
                name: String::new(),
            };
            assert!(run_fast(&node, &[Some(t)]).is_none(), "{perm:?}");
        }
    }
}
