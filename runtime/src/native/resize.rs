//! `resize` in f32, nearest and interpolating (linear, and cubic on the same path). The
//! source indices (nearest) or interpolation taps (linear, cubic) along every axis come
//! from the interpreter's own resolution of the attributes
//! (`kiln_ir::ops::resize::{nearest_picks, interp_taps}`: scales or sizes, every coordinate
//! transformation mode, nearest mode, extrapolation). Nearest gathers the output row by row;
//! interpolation runs where only the last two axes resample (1-D and 2-D images, any
//! leading axes kept): per output row, the taps of the second-to-last axis blend input rows
//! into a scratch row, then the last axis's taps read it, the reference's order (axis by
//! axis) in f32. Output rows are split over the pool. Other dtypes, and interpolation along
//! leading axes, return `None` (the interpreter runs the node).

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
    let Some((shape, pick, extrap)) = kiln_ir::ops::resize::nearest_picks(&node.attrs, ins).ok()?
    else {
        return interpolate(node, x, xv, ins, pool, out);
    };
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

/// One axis's taps for the native path: `n` taps per output index (input index and f32
/// weight), or `None` per output index for the extrapolation value.
struct Taps {
    n: usize,
    idx: Vec<usize>,
    w: Vec<f32>,
    /// Per output index, whether it takes the extrapolation value.
    extrap: Vec<bool>,
}

impl Taps {
    /// Flattens one axis of the interpreter's taps; `None` when an index is past `len` or
    /// the tap counts differ.
    fn new(taps: &kiln_ir::ops::resize::AxisTaps, len: usize) -> Option<Self> {
        let n = taps.iter().flatten().map(|t| t.len()).max().unwrap_or(0);
        let mut t = Taps {
            n,
            idx: Vec::with_capacity(taps.len() * n),
            w: Vec::with_capacity(taps.len() * n),
            extrap: Vec::with_capacity(taps.len()),
        };
        for o in taps {
            match o {
                Some(ws) if ws.len() == n => {
                    for &(i, w) in ws {
                        if i >= len {
                            return None;
                        }
                        t.idx.push(i);
                        t.w.push(w as f32);
                    }
                    t.extrap.push(false);
                }
                Some(_) => return None,
                None => {
                    t.idx.extend(std::iter::repeat_n(0, n));
                    t.w.extend(std::iter::repeat_n(0.0, n));
                    t.extrap.push(true);
                }
            }
        }
        Some(t)
    }

    /// Whether every output `o` reads input `o` alone (every tap with a nonzero weight is
    /// on `o`, the weights summing to 1; pytorch_half_pixel on an axis of 1 takes it twice
    /// at 0.5): the axis is not resampled.
    fn identity(&self, len: usize) -> bool {
        self.extrap.len() == len
            && self.extrap.iter().enumerate().all(|(o, &e)| {
                let taps = (0..self.n).map(|t| (self.idx[o * self.n + t], self.w[o * self.n + t]));
                !e && taps.clone().all(|(i, w)| w == 0.0 || i == o)
                    && taps.map(|(_, w)| w).sum::<f32>() == 1.0
            })
    }
}

/// A linear or cubic resize where only the last two axes resample; `None` otherwise.
/// An axis left unresampled is copied (the reference multiplies its neighbours by zero
/// weights, so a NaN or infinity spreads one place further there; here it does not).
fn interpolate(
    node: &Node,
    x: &Tensor,
    xv: &[f32],
    ins: &[Option<&Tensor>],
    pool: &Pool,
    out: &mut Outputs,
) -> Option<Tensor> {
    let (shape, taps, extrap) = kiln_ir::ops::resize::interp_taps(&node.attrs, ins).ok()??;
    let xs = x.shape();
    let rank = xs.len();
    if rank == 0 || taps.len() != rank || xs.contains(&0) {
        return None;
    }
    let lead = rank.saturating_sub(2);
    for a in 0..lead {
        let t = Taps::new(&taps[a], xs[a])?;
        if shape[a] != xs[a] || !t.identity(xs[a]) {
            return None;
        }
    }
    let tw = Taps::new(&taps[rank - 1], xs[rank - 1])?;
    let th = if rank >= 2 {
        Some(Taps::new(&taps[rank - 2], xs[rank - 2])?)
    } else {
        None
    };
    let (ih, oh) = if rank >= 2 {
        (xs[rank - 2], shape[rank - 2])
    } else {
        (1, 1)
    };
    let (iw, ow) = (xs[rank - 1], shape[rank - 1]);
    let th = th.filter(|t| !(ih == oh && t.identity(ih)));
    let tw = (!(iw == ow && tw.identity(iw))).then_some(tw);
    let total: usize = shape.iter().product();
    let mut y = out.f32s(0, total);
    if total == 0 {
        return Some(Tensor::from_buf(shape, y));
    }
    let rows = total / ow;
    let fill = extrap as f32;
    let y_ptr = SharedMut::new(y.as_mut_ptr());
    let (th, tw) = (&th, &tw);
    pool.parallel_ranges(rows, |range| {
        let mut tmp = vec![0.0f32; iw];
        for row in range {
            let (plane, oy) = (row / oh, row % oh);
            let img = &xv[plane * ih * iw..][..ih * iw];
            // SAFETY: each output row's `ow` values are written by one call only; `y` holds
            // `rows · ow` values and lives until `parallel_ranges` returns.
            let yr = unsafe { std::slice::from_raw_parts_mut(y_ptr.get().add(row * ow), ow) };
            // The second-to-last axis: blend input rows into `tmp`.
            let src: &[f32] = match th {
                None => &img[oy * iw..][..iw],
                Some(t) if t.extrap[oy] => {
                    tmp.fill(fill);
                    &tmp
                }
                Some(t) => {
                    let (idx, w) = (&t.idx[oy * t.n..][..t.n], &t.w[oy * t.n..][..t.n]);
                    let r0 = &img[idx[0] * iw..][..iw];
                    tmp.iter_mut().zip(r0).for_each(|(v, &a)| *v = w[0] * a);
                    for k in 1..t.n {
                        let r = &img[idx[k] * iw..][..iw];
                        let wk = w[k];
                        tmp.iter_mut().zip(r).for_each(|(v, &a)| *v += wk * a);
                    }
                    &tmp
                }
            };
            // The last axis: read the blended row through its taps.
            match tw {
                None => yr.copy_from_slice(src),
                Some(t) if t.n == 2 => {
                    for (o, v) in yr.iter_mut().enumerate() {
                        *v = if t.extrap[o] {
                            fill
                        } else {
                            let (i, w) = (&t.idx[2 * o..2 * o + 2], &t.w[2 * o..2 * o + 2]);
                            w[0] * src[i[0]] + w[1] * src[i[1]]
                        };
                    }
                }
                Some(t) => {
                    for (o, v) in yr.iter_mut().enumerate() {
                        *v = if t.extrap[o] {
                            fill
                        } else {
                            let (i, w) = (&t.idx[o * t.n..][..t.n], &t.w[o * t.n..][..t.n]);
                            i.iter().zip(w).map(|(&i, &w)| w * src[i]).sum()
                        };
                    }
                }
            }
        }
    });
    Some(Tensor::from_buf(shape, y))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::{Attr, Attrs, ValueId};
    use kiln_reference::{compare, Tolerance};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// A few f32 products and sums per output (weights rounded to f32) against the
    /// interpreter's f64 interpolation.
    const TOL: Tolerance = Tolerance::ScaledByMax {
        rel: 1e-5,
        abs: 1e-6,
    };

    fn resize_node(attrs: &Attrs, n_ins: usize) -> Node {
        Node {
            op: OpKind::Resize,
            attrs: attrs.clone(),
            inputs: (0..n_ins).map(|i| Some(ValueId(i as u32))).collect(),
            outputs: vec![ValueId(9)],
            name: String::new(),
        }
    }

    /// Linear (and cubic) resizes of 1-D to 4-D tensors along their last one or two axes,
    /// every coordinate transformation mode, scales or sizes, against the interpreter.
    #[test]
    fn interpolating_resizes_match_the_interpreter() {
        let pools = [Pool::single(), Pool::new(3).unwrap()];
        let mut native = 0;
        for seed in [3u64, 4, 7, 11] {
            let mut rng = StdRng::seed_from_u64(seed);
            for case in 0..80 {
                let rank = rng.gen_range(1..5);
                let shape: Vec<usize> = (0..rank).map(|_| rng.gen_range(1..9)).collect();
                let n: usize = shape.iter().product();
                let x = Tensor::from_vec(
                    shape.clone(),
                    (0..n)
                        .map(|_| rng.gen_range(-2.0f32..2.0))
                        .collect::<Vec<f32>>(),
                );
                let ctm = [
                    "half_pixel",
                    "asymmetric",
                    "align_corners",
                    "pytorch_half_pixel",
                    "half_pixel_symmetric",
                    "tf_crop_and_resize",
                ][rng.gen_range(0..6)];
                let mode = if case % 5 == 4 { "cubic" } else { "linear" };
                let attrs = Attrs::new()
                    .with("mode", Attr::Str(mode.into()))
                    .with("coordinate_transformation_mode", Attr::Str(ctm.into()))
                    .with("exclude_outside", Attr::Int(rng.gen_range(0..2)))
                    .with("extrapolation_value", Attr::Float(-7.0));
                // Only the last one or two axes resample (else the interpreter runs it).
                let resampled = |a: usize| a + 2 >= rank;
                let roi = Tensor::from_vec(
                    vec![2 * rank],
                    (0..2 * rank)
                        .map(|i| match (resampled(i % rank), i < rank) {
                            (false, true) => 0.0,
                            (false, false) => 1.0,
                            (true, true) => rng.gen_range(-0.2f32..0.4),
                            (true, false) => rng.gen_range(0.6f32..1.2),
                        })
                        .collect::<Vec<f32>>(),
                );
                let (scales, sizes);
                let ins: Vec<Option<&Tensor>> = if rng.gen_bool(0.5) {
                    scales = Tensor::from_vec(
                        vec![rank],
                        (0..rank)
                            .map(|a| {
                                if resampled(a) {
                                    [0.5f32, 1.0, 2.0, 3.0, 1.7, 4.0][rng.gen_range(0..6)]
                                } else {
                                    1.0
                                }
                            })
                            .collect::<Vec<f32>>(),
                    );
                    vec![Some(&x), Some(&roi), Some(&scales)]
                } else {
                    sizes = Tensor::from_vec(
                        vec![rank],
                        (0..rank)
                            .map(|a| {
                                if resampled(a) {
                                    rng.gen_range(1..17) as i64
                                } else {
                                    shape[a] as i64
                                }
                            })
                            .collect::<Vec<i64>>(),
                    );
                    vec![Some(&x), Some(&roi), None, Some(&sizes)]
                };
                let node = resize_node(&attrs, ins.len());
                let want = kiln_ir::ops::eval(OpKind::Resize, &attrs, &ins);
                for pool in &pools {
                    match (run(&node, &ins, pool, &mut Outputs::none()), &want) {
                        (Some(g), Ok(w)) => {
                            let r = compare(&g, &w[0], TOL);
                            assert!(r.ok, "seed {seed} case {case} {attrs:?} {shape:?}: {r:?}");
                            native += 1;
                        }
                        (None, _) => {}
                        (Some(g), Err(e)) => panic!("case {case}: native {g:?}, interpreter {e}"),
                    }
                }
            }
        }
        // Every case resamples only the last two axes, so every one runs natively.
        assert_eq!(native, 4 * 80 * 2);
    }

    #[test]
    fn a_nan_input_is_not_hidden_by_bilinear_resize() {
        let mut xv = vec![0.5f32; 16];
        xv[5] = f32::NAN;
        let x = Tensor::from_vec(vec![1, 1, 4, 4], xv);
        let scales = Tensor::from_vec(vec![4], vec![1.0f32, 1.0, 2.0, 2.0]);
        let attrs = Attrs::new().with("mode", Attr::Str("linear".into()));
        let ins = [Some(&x), None, Some(&scales)];
        let got = run(
            &resize_node(&attrs, 3),
            &ins,
            &Pool::single(),
            &mut Outputs::none(),
        )
        .unwrap();
        let want = kiln_ir::ops::eval(OpKind::Resize, &attrs, &ins).unwrap();
        assert!(got.as_slice::<f32>().unwrap().iter().any(|v| v.is_nan()));
        assert!(compare(&got, &want[0], TOL).ok);
    }

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
                (Some(g), Ok(w)) if case % 9 == 0 => {
                    let r = compare(&g, &w[0], TOL);
                    assert!(r.ok, "case {case} {attrs:?} {shape:?}: {r:?}");
                }
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
