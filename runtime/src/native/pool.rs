//! Max and average pooling in f32 (windowed with pads, strides, dilations, ceil_mode and
//! auto_pad, over 1 to 3 spatial axes; and the global variants), planes (image, channel)
//! split over the pool. The geometry is the interpreter's own
//! (`kiln_ir::ops::pool::pool_geometry`), and the windows read the same taps in the same
//! order: a max starts from the window's first real element and takes each later one that
//! is greater (so NaN handling is the reference's), an average sums the real elements and
//! divides by their count (or by the whole window's with `count_include_pad`). MaxPool's
//! optional indices output, other dtypes and more spatial axes return `None` (the
//! interpreter runs the node).

use crate::executor::arena::Outputs;
use crate::pool::{Pool, SharedMut};
use kiln_ir::ops::pool::pool_geometry;
use kiln_ir::{Node, OpKind, Tensor};

/// Per axis and output index, the window's real (in-bounds) taps: the first one's input
/// offset (index × the axis's input stride), how many, and the offset step between them
/// (dilation × stride); and how many taps it has in all (pads included). Real taps are
/// consecutive window positions, so they form this progression.
#[derive(Clone, Copy)]
struct Taps {
    first: usize,
    real: usize,
    step: usize,
    total: usize,
}

/// The output of a pool node, or `None` where the interpreter runs it.
/// Its output goes to its planned region in `out` where it has one.
pub fn run(node: &Node, ins: &[Option<&Tensor>], pool: &Pool, out: &mut Outputs) -> Option<Tensor> {
    let op = node.op;
    let is_max = match op {
        OpKind::MaxPool | OpKind::GlobalMaxPool => true,
        OpKind::AveragePool | OpKind::GlobalAveragePool => false,
        _ => return None,
    };
    if node.outputs.len() != 1 {
        return None;
    }
    let x = (*ins.first()?)?;
    let xv = x.as_slice::<f32>()?;
    let shape = x.shape();
    let geo = pool_geometry(op, &node.attrs, shape).ok()?;
    let nsp = shape.len() - 2;
    if nsp > 3 {
        return None;
    }
    let spatial = &shape[2..];
    let in_st = kiln_ir::tensor::strides(spatial);
    // Unit axes in front so that every case runs the 3-axis loop.
    let unit = vec![Taps {
        first: 0,
        real: 1,
        step: 0,
        total: 1,
    }];
    let mut axes: Vec<Vec<Taps>> = vec![unit; 3 - nsp];
    for a in 0..nsp {
        let extent = spatial[a] + geo.pads[a] + geo.pads[nsp + a];
        let mut per = Vec::with_capacity(geo.out[a]);
        for o in 0..geo.out[a] {
            let (mut first, mut real, mut total) = (0, 0, 0);
            for k in 0..geo.kernel[a] {
                let pos = (o * geo.strides[a]).saturating_add(k.saturating_mul(geo.dilations[a]));
                if pos >= extent {
                    break;
                }
                total += 1;
                if let Some(r) = pos.checked_sub(geo.pads[a]).filter(|&r| r < spatial[a]) {
                    if real == 0 {
                        first = r * in_st[a];
                    }
                    real += 1;
                }
            }
            per.push(Taps {
                first,
                real,
                step: geo.dilations[a] * in_st[a],
                total,
            });
        }
        axes.push(per);
    }
    let planes = shape[0] * shape[1];
    let sp: usize = spatial.iter().product();
    let osp: usize = geo.out.iter().product();
    let mut out_shape = shape[..2].to_vec();
    out_shape.extend_from_slice(&geo.out);
    // Every element is written below.
    let mut y = out.f32s(0, planes.checked_mul(osp)?);
    if planes * osp == 0 {
        return Some(Tensor::from_buf(out_shape, y));
    }
    let include_pad = geo.count_include_pad;
    // Along the last axis, the outputs whose windows are whole (every tap real) start at
    // input column `o · stride − pad`: max pools fold those a tap at a time over the row.
    let last = &axes[2];
    let kw = geo.kernel[nsp - 1];
    let (sw, pw) = (geo.strides[nsp - 1], geo.pads[nsp - 1]);
    let whole = |o: usize, t: &Taps| t.real == kw && t.total == kw && o * sw >= pw;
    let olo = (0..last.len())
        .find(|&o| whole(o, &last[o]))
        .unwrap_or(last.len());
    let ohi = (olo..last.len())
        .find(|&o| !whole(o, &last[o]))
        .unwrap_or(last.len());
    let interior = is_max && ohi > olo;
    let y_ptr = SharedMut::new(y.as_mut_ptr());
    let axes = &axes;
    pool.parallel_ranges(planes, |range| {
        for plane in range {
            let xp = &xv[plane * sp..(plane + 1) * sp];
            // SAFETY: each plane's `osp` outputs are written by one call only; `y` holds
            // `planes · osp` values and lives until `parallel_ranges` returns.
            let yp = unsafe { std::slice::from_raw_parts_mut(y_ptr.get().add(plane * osp), osp) };
            let mut at = 0;
            for t0 in &axes[0] {
                for t1 in &axes[1] {
                    if interior && t0.real * t1.real > 0 {
                        let row = &mut yp[at..at + last.len()];
                        let rows = (0..t0.real).flat_map(|i| {
                            (0..t1.real)
                                .map(move |j| t0.first + i * t0.step + t1.first + j * t1.step)
                        });
                        max_rows(
                            xp,
                            rows,
                            olo * sw - pw,
                            last[olo].step,
                            kw,
                            sw,
                            &mut row[olo..ohi],
                        );
                        for (o, t2) in last.iter().enumerate() {
                            if o < olo || o >= ohi {
                                row[o] = window_max(xp, [t0, t1, t2]);
                            }
                        }
                        at += last.len();
                        continue;
                    }
                    for t2 in &axes[2] {
                        let w = [t0, t1, t2];
                        yp[at] = if is_max {
                            window_max(xp, w)
                        } else {
                            let sum = window_sum(xp, w);
                            let count = if include_pad {
                                t0.total * t1.total * t2.total
                            } else {
                                t0.real * t1.real * t2.real
                            };
                            if count == 0 {
                                f32::NAN
                            } else {
                                (sum / count as f64) as f32
                            }
                        };
                        at += 1;
                    }
                }
            }
        }
    });
    Some(Tensor::from_buf(out_shape, y))
}

/// The reference's max: the first real element, then each later one that is greater
/// (−∞ for a window of pads only).
#[inline(always)]
fn window_max(x: &[f32], [t0, t1, t2]: [&Taps; 3]) -> f32 {
    if t0.real * t1.real * t2.real == 0 {
        return f32::NEG_INFINITY;
    }
    let mut best = x[t0.first + t1.first + t2.first];
    for i in 0..t0.real {
        for j in 0..t1.real {
            let row = t0.first + i * t0.step + t1.first + j * t1.step + t2.first;
            if t2.step == 1 {
                for &e in &x[row..row + t2.real] {
                    best = if e > best { e } else { best };
                }
            } else {
                for k in 0..t2.real {
                    let e = x[row + k * t2.step];
                    best = if e > best { e } else { best };
                }
            }
        }
    }
    best
}

/// Max pool outputs `out[o]` whose windows are whole along the last axis: in each input
/// row offset of `rows` (the window's real rows in order), taps `k < kw` at column
/// `c0 + o · stride + k · step`. Folded a tap at a time over all outputs, each output's
/// taps in [`window_max`]'s order with its comparison, so the result (NaN included) is the
/// same; the loop over outputs vectorises where the stride is 1.
fn max_rows(
    x: &[f32],
    mut rows: impl Iterator<Item = usize>,
    c0: usize,
    step: usize,
    kw: usize,
    stride: usize,
    out: &mut [f32],
) {
    let n = out.len();
    let span = (n - 1) * stride + 1;
    let Some(r0) = rows.next() else {
        return;
    };
    let taps = |r: usize, k: usize| &x[r + c0 + k * step..][..span];
    if stride == 1 {
        out.copy_from_slice(taps(r0, 0));
    } else {
        out.iter_mut()
            .zip(taps(r0, 0).iter().step_by(stride))
            .for_each(|(b, &e)| *b = e);
    }
    let fold = |r: usize, k: usize, out: &mut [f32]| {
        let src = taps(r, k);
        if stride == 1 {
            for (b, &e) in out.iter_mut().zip(src) {
                *b = if e > *b { e } else { *b };
            }
        } else {
            for (b, &e) in out.iter_mut().zip(src.iter().step_by(stride)) {
                *b = if e > *b { e } else { *b };
            }
        }
    };
    for k in 1..kw {
        fold(r0, k, out);
    }
    for r in rows {
        for k in 0..kw {
            fold(r, k, out);
        }
    }
}

/// Sum of a window's real elements, in f64 and in the reference's order.
#[inline(always)]
fn window_sum(x: &[f32], [t0, t1, t2]: [&Taps; 3]) -> f64 {
    let mut s = 0f64;
    for i in 0..t0.real {
        for j in 0..t1.real {
            let row = t0.first + i * t0.step + t1.first + j * t1.step + t2.first;
            for k in 0..t2.real {
                s += x[row + k * t2.step] as f64;
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::{Attr, Attrs, ValueId};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// Wide rows (the whole-window fold over outputs), many NaNs and infinities, 1-D to
    /// 3-D, strides, dilations and pads: bit for bit the interpreter's max.
    #[test]
    fn max_pools_fold_wide_rows_exactly() {
        let pools = [Pool::single(), Pool::new(2).unwrap()];
        let mut rng = StdRng::seed_from_u64(29);
        let mut checked = 0;
        for case in 0..60 {
            let nsp = [1, 2, 2, 3][case % 4];
            let mut shape = vec![rng.gen_range(1..3), rng.gen_range(1..4)];
            shape.extend((0..nsp).map(|a| {
                if a + 1 == nsp {
                    rng.gen_range(20..70)
                } else {
                    rng.gen_range(1..7)
                }
            }));
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|_| match rng.gen_range(0..12) {
                    0 => f32::NAN,
                    1 => f32::INFINITY,
                    2 => f32::NEG_INFINITY,
                    _ => rng.gen_range(-4.0f32..4.0),
                })
                .collect();
            let x = Tensor::from_vec(shape, v);
            let attrs = Attrs::new()
                .with(
                    "kernel_shape",
                    Attr::Ints((0..nsp).map(|_| rng.gen_range(1..6)).collect()),
                )
                .with(
                    "strides",
                    Attr::Ints((0..nsp).map(|_| rng.gen_range(1..5)).collect()),
                )
                .with(
                    "dilations",
                    Attr::Ints((0..nsp).map(|_| rng.gen_range(1..3)).collect()),
                )
                .with(
                    "pads",
                    Attr::Ints((0..2 * nsp).map(|_| rng.gen_range(0..2)).collect()),
                );
            let node = Node {
                op: OpKind::MaxPool,
                attrs: attrs.clone(),
                inputs: vec![Some(ValueId(0))],
                outputs: vec![ValueId(1)],
                name: String::new(),
            };
            let Ok(want) = kiln_ir::ops::eval(OpKind::MaxPool, &attrs, &[Some(&x)]) else {
                continue;
            };
            for pool in &pools {
                let got = run(&node, &[Some(&x)], pool, &mut Outputs::none()).unwrap();
                let (gv, wv) = (
                    got.as_slice::<f32>().unwrap(),
                    want[0].as_slice::<f32>().unwrap(),
                );
                assert_eq!(got.shape(), want[0].shape());
                for (i, (a, b)) in gv.iter().zip(wv).enumerate() {
                    assert!(
                        a.to_bits() == b.to_bits(),
                        "case {case} {attrs:?} {:?} at {i}: {a} vs {b}",
                        x.shape()
                    );
                }
                checked += 1;
            }
        }
        assert!(checked > 60, "{checked}");
    }

    #[test]
    fn pools_match_the_interpreter_exactly_on_random_windows() {
        let pools = [Pool::single(), Pool::new(2).unwrap()];
        let mut native = 0;
        for seed in [3u64, 7, 11] {
            let mut rng = StdRng::seed_from_u64(seed);
            for case in 0..120 {
                let op = [
                    OpKind::MaxPool,
                    OpKind::AveragePool,
                    OpKind::GlobalMaxPool,
                    OpKind::GlobalAveragePool,
                ][case % 4];
                let nsp = rng.gen_range(1..4);
                let mut shape = vec![rng.gen_range(1..3), rng.gen_range(1..4)];
                shape.extend((0..nsp).map(|_| rng.gen_range(1..9)));
                let n: usize = shape.iter().product();
                let mut v: Vec<f32> = (0..n).map(|_| rng.gen_range(-4.0f32..4.0)).collect();
                if case % 7 == 0 {
                    // NaNs, first or later in a window.
                    v[rng.gen_range(0..n)] = f32::NAN;
                    v[0] = f32::NAN;
                }
                let x = Tensor::from_vec(shape, v);
                let mut attrs = Attrs::new()
                    .with(
                        "kernel_shape",
                        Attr::Ints((0..nsp).map(|_| rng.gen_range(1..5)).collect()),
                    )
                    .with(
                        "strides",
                        Attr::Ints((0..nsp).map(|_| rng.gen_range(1..4)).collect()),
                    );
                match rng.gen_range(0..3) {
                    0 => {
                        attrs = attrs.with(
                            "pads",
                            Attr::Ints((0..2 * nsp).map(|_| rng.gen_range(0..2)).collect()),
                        )
                    }
                    1 => attrs = attrs.with("auto_pad", Attr::Str("SAME_UPPER".into())),
                    _ => {}
                }
                if rng.gen_bool(0.3) {
                    attrs = attrs.with("ceil_mode", Attr::Int(1));
                }
                if rng.gen_bool(0.3) {
                    attrs = attrs.with("count_include_pad", Attr::Int(1));
                }
                if op == OpKind::MaxPool && rng.gen_bool(0.3) {
                    attrs = attrs.with(
                        "dilations",
                        Attr::Ints((0..nsp).map(|_| rng.gen_range(1..3)).collect()),
                    );
                }
                if matches!(op, OpKind::GlobalMaxPool | OpKind::GlobalAveragePool) {
                    attrs = Attrs::new();
                }
                let node = Node {
                    op,
                    attrs: attrs.clone(),
                    inputs: vec![Some(ValueId(0))],
                    outputs: vec![ValueId(1)],
                    name: String::new(),
                };
                let want = kiln_ir::ops::eval(op, &attrs, &[Some(&x)]);
                for pool in &pools {
                    match (run(&node, &[Some(&x)], pool, &mut Outputs::none()), &want) {
                        (Some(g), Ok(w)) => {
                            let (gv, wv) = (
                                g.as_slice::<f32>().unwrap(),
                                w[0].as_slice::<f32>().unwrap(),
                            );
                            assert_eq!(g.shape(), w[0].shape(), "{op:?} {attrs:?}");
                            for (a, b) in gv.iter().zip(wv) {
                                assert!(
                                    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                                    "seed {seed} case {case} {op:?} {attrs:?} {:?}: {gv:?} vs {wv:?}",
                                    x.shape()
                                );
                            }
                            native += 1;
                        }
                        (None, Err(_)) => {}
                        (g, w) => {
                            panic!("case {case} {op:?} {attrs:?}: native {g:?}, interpreter {w:?}")
                        }
                    }
                }
            }
        }
        assert!(native > 500, "{native}");
    }
}
