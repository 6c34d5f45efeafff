//! Nearest-neighbour `resize` in f32: the source index along every axis comes from the
//! interpreter's own resolution of the attributes (`kiln_ir::ops::resize::nearest_picks`:
//! scales or sizes, coordinate transformation, nearest mode, extrapolation), and the
//! output is gathered row by row (rows of the last axis split over the pool). Other modes
//! and dtypes return `None` (the interpreter runs the node).

use crate::executor::arena::Outputs;
use crate::pool::{Pool, SharedMut};
use kiln_ir::{Node, OpKind, Tensor};

/// The output of a `resize` node, or `None` where the interpreter runs it.
/// Its output goes to its planned region in `out` where it has one.
pub fn run(node: &Node, ins: &[Option<&Tensor>], pool: &Pool, out: &mut Outputs) -> Option<Tensor> {
    if node.op != OpKind::Resize {
        return None;
    }
    let x = (*ins.first()?)?;
    let xv = x.as_slice::<f32>()?;
    let (shape, pick, extrap) = kiln_ir::ops::resize::nearest_picks(&node.attrs, ins).ok()??;
    let rank = shape.len();
    if rank == 0 || pick.len() != rank {
        return None;
    }
    let st = kiln_ir::tensor::strides(x.shape());
    let total: usize = shape.iter().product();
    // Every element is written below.
    let mut y = out.f32s(0, total);
    let last = shape[rank - 1];
    if total == 0 {
        return Some(Tensor::from_buf(shape, y));
    }
    let rows = total / last;
    // The last axis's source offsets, shared by every row.
    let cols: Vec<Option<usize>> = pick[rank - 1]
        .iter()
        .map(|p| p.map(|i| i * st[rank - 1]))
        .collect();
    let fill = extrap as f32;
    let y_ptr = SharedMut::new(y.as_mut_ptr());
    let (dims, pick, cols) = (&shape, &pick, &cols);
    pool.parallel_ranges(rows, |range| {
        let mut idx = vec![0usize; rank - 1];
        for row in range {
            // Row `row`'s index over the leading axes and its source offset.
            let mut r = row;
            for a in (0..rank - 1).rev() {
                idx[a] = r % dims[a];
                r /= dims[a];
            }
            let mut src = Some(0usize);
            for a in 0..rank - 1 {
                src = match (src, pick[a][idx[a]]) {
                    (Some(o), Some(p)) => Some(o + p * st[a]),
                    _ => None,
                };
            }
            // SAFETY: each row's `last` outputs are written by one call only; `y` holds
            // `rows · last` values and lives until `parallel_ranges` returns.
            let yr = unsafe { std::slice::from_raw_parts_mut(y_ptr.get().add(row * last), last) };
            match src {
                None => yr.fill(fill),
                Some(base) => {
                    for (v, c) in yr.iter_mut().zip(cols.iter()) {
                        *v = match c {
                            Some(c) => xv[base + c],
                            None => fill,
                        };
                    }
                }
            }
        }
    });
    Some(Tensor::from_buf(shape.clone(), y))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::{Attr, Attrs, ValueId};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    #[test]
    fn nearest_resizes_match_the_interpreter_exactly() {
        let mut rng = StdRng::seed_from_u64(17);
        let pool = Pool::new(2).unwrap();
        let mut native = 0;
        for case in 0..200 {
            let rank = rng.gen_range(1..5);
            let shape: Vec<usize> = (0..rank).map(|_| rng.gen_range(1..6)).collect();
            let n: usize = shape.iter().product();
            let x = Tensor::from_vec(
                shape.clone(),
                (0..n).map(|i| i as f32 * 0.5 - 3.0).collect::<Vec<f32>>(),
            );
            let ctm = [
                "half_pixel",
                "asymmetric",
                "align_corners",
                "pytorch_half_pixel",
                "tf_crop_and_resize",
            ][rng.gen_range(0..5)];
            let nm =
                ["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"][rng.gen_range(0..4)];
            let attrs = Attrs::new()
                .with(
                    "mode",
                    Attr::Str(if case % 9 == 0 { "linear" } else { "nearest" }.into()),
                )
                .with("coordinate_transformation_mode", Attr::Str(ctm.into()))
                .with("nearest_mode", Attr::Str(nm.into()))
                .with("extrapolation_value", Attr::Float(-7.0));
            let roi = Tensor::from_vec(
                vec![2 * rank],
                (0..2 * rank)
                    .map(|i| {
                        if i < rank {
                            rng.gen_range(-0.2f32..0.4)
                        } else {
                            rng.gen_range(0.6f32..1.2)
                        }
                    })
                    .collect::<Vec<f32>>(),
            );
            let (scales, sizes);
            let ins: Vec<Option<&Tensor>> = if rng.gen_bool(0.5) {
                scales = Tensor::from_vec(
                    vec![rank],
                    (0..rank)
                        .map(|_| [0.5f32, 1.0, 2.0, 3.0, 1.7][rng.gen_range(0..5)])
                        .collect::<Vec<f32>>(),
                );
                vec![Some(&x), Some(&roi), Some(&scales)]
            } else {
                sizes = Tensor::from_vec(
                    vec![rank],
                    (0..rank)
                        .map(|_| rng.gen_range(1..9) as i64)
                        .collect::<Vec<i64>>(),
                );
                vec![Some(&x), Some(&roi), None, Some(&sizes)]
            };
            let node = Node {
                op: OpKind::Resize,
                attrs: attrs.clone(),
                inputs: (0..ins.len()).map(|i| Some(ValueId(i as u32))).collect(),
                outputs: vec![ValueId(9)],
                name: String::new(),
            };
            let want = kiln_ir::ops::eval(OpKind::Resize, &attrs, &ins);
            match (run(&node, &ins, &pool, &mut Outputs::none()), want) {
                (Some(g), Ok(w)) => {
                    assert_eq!(g, w[0], "case {case} {attrs:?} {shape:?}");
                    native += 1;
                }
                (None, _) => {}
                (Some(g), Err(e)) => panic!("case {case}: native {g:?}, interpreter {e}"),
            }
        }
        assert!(native > 100, "{native}");
    }
}
