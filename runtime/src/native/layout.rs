//! The layout family's strided copies natively: `slice` (any steps, negative ones too) and
//! `pad` (constant, edge, reflect and wrap; negative pads crop) for f32, i64, i32 and bool.
//! Rows are copied whole where the trailing axes are untouched, not element by element
//! through the interpreter's index map. Parameters are read by the interpreter's own helpers
//! (`kiln_ir::ops::layout::{slice_params, slice_range, pad_amounts}`); anything they reject,
//! and other dtypes, return `None` so the interpreter runs the node and reports the error.

use kiln_ir::ops::layout::{pad_amounts, slice_params, slice_range};
use kiln_ir::{Elem, Node, OpKind, Tensor};

/// The output of a `slice` or `pad` node, or `None` where the interpreter runs it.
pub fn run(node: &Node, ins: &[Option<&Tensor>]) -> Option<Tensor> {
    let x = (*ins.first()?)?;
    match node.op {
        OpKind::Slice => slice_any(x, slice_plan(x.shape(), ins)?),
        OpKind::Pad => pad(node, x, ins),
        _ => None,
    }
}

/// The slice of `x` for the dtypes these copies take.
fn slice_any(x: &Tensor, (first, step, out): SlicePlan) -> Option<Tensor> {
    fn go<T: Elem + Copy>(
        x: &Tensor,
        first: &[i64],
        step: &[i64],
        out: &[usize],
    ) -> Option<Tensor> {
        let v = strided(x.as_slice::<T>()?, x.shape(), first, step, out);
        Some(Tensor::from_vec(out.to_vec(), v))
    }
    go::<f32>(x, &first, &step, &out)
        .or_else(|| go::<i64>(x, &first, &step, &out))
        .or_else(|| go::<i32>(x, &first, &step, &out))
        .or_else(|| go::<bool>(x, &first, &step, &out))
}

/// Integer values of an index-like input.
fn ints(t: &Tensor) -> Option<Vec<i64>> {
    if let Some(v) = t.as_slice::<i64>() {
        return Some(v.to_vec());
    }
    t.as_slice::<i32>()
        .map(|v| v.iter().map(|&x| i64::from(x)).collect())
}

/// Per axis: the first source index, the step and the output size.
type SlicePlan = (Vec<i64>, Vec<i64>, Vec<usize>);

fn slice_plan(shape: &[usize], ins: &[Option<&Tensor>]) -> Option<SlicePlan> {
    let starts = ints((*ins.get(1)?)?)?;
    let ends = ints((*ins.get(2)?)?)?;
    let axes = match ins.get(3).copied().flatten() {
        Some(a) => Some(ints(a)?),
        None => None,
    };
    let steps = match ins.get(4).copied().flatten() {
        Some(s) => Some(ints(s)?),
        None => None,
    };
    let params = slice_params(shape.len(), &starts, &ends, axes, steps).ok()?;
    let mut first = vec![0i64; shape.len()];
    let mut step = vec![1i64; shape.len()];
    let mut out = shape.to_vec();
    for (a, s, e, st) in params {
        let (f, c) = slice_range(shape[a], s, e, st);
        first[a] = f;
        step[a] = st;
        out[a] = c;
    }
    Some((first, step, out))
}

/// Copies the strided selection (`first`, `step`, sizes `out`) of `src` (shape `shape`).
fn strided<T: Copy>(
    src: &[T],
    shape: &[usize],
    first: &[i64],
    step: &[i64],
    out: &[usize],
) -> Vec<T> {
    let rank = shape.len();
    let total: usize = out.iter().product();
    let mut y = Vec::with_capacity(total);
    if total == 0 {
        return y;
    }
    let st = kiln_ir::tensor::strides(shape);
    // Trailing axes kept whole are one contiguous block per row.
    let mut k = rank;
    while k > 0 && first[k - 1] == 0 && step[k - 1] == 1 && out[k - 1] == shape[k - 1] {
        k -= 1;
    }
    let block: usize = out[k..].iter().product();
    if k == 0 {
        y.extend_from_slice(&src[..block]);
        return y;
    }
    // The innermost sliced axis `k - 1`: contiguous runs of `out[k-1]·block` when its step
    // is 1, else `out[k-1]` blocks at a stride.
    let ax = k - 1;
    let base: i64 = (0..rank).map(|d| first[d] * st[d] as i64).sum();
    let outer = &out[..ax];
    let mut idx = vec![0usize; ax];
    let mut off = base;
    let rows: usize = outer.iter().product();
    let sstep = step[ax] * st[ax] as i64;
    for _ in 0..rows {
        if step[ax] == 1 {
            let at = off as usize;
            y.extend_from_slice(&src[at..at + out[ax] * block]);
        } else {
            for j in 0..out[ax] {
                let at = (off + j as i64 * sstep) as usize;
                y.extend_from_slice(&src[at..at + block]);
            }
        }
        for d in (0..ax).rev() {
            idx[d] += 1;
            off += step[d] * st[d] as i64;
            if idx[d] < outer[d] {
                break;
            }
            off -= step[d] * st[d] as i64 * outer[d] as i64;
            idx[d] = 0;
        }
    }
    y
}

/// `pad`: each output index of each axis maps to a source index or to the fill value.
fn pad(node: &Node, x: &Tensor, ins: &[Option<&Tensor>]) -> Option<Tensor> {
    let shape = x.shape();
    let rank = shape.len();
    let pads = ints((*ins.get(1)?)?)?;
    let axes = match ins.get(3).copied().flatten() {
        Some(a) => ints(a)?,
        None => (0..rank as i64).collect(),
    };
    let per = pad_amounts(&pads, &axes, rank).ok()?;
    let mode = node.attrs.string_or("mode", "constant".into()).ok()?;
    if !matches!(mode.as_str(), "constant" | "edge" | "reflect" | "wrap") {
        return None;
    }
    let mut maps: Vec<Vec<Option<usize>>> = Vec::with_capacity(rank);
    let mut out = Vec::with_capacity(rank);
    for (k, &(b, e)) in per.iter().enumerate() {
        let n = shape[k] as i64;
        let (crop_b, crop_e) = ((-b).max(0), (-e).max(0));
        let kept = n - crop_b - crop_e;
        let size = kept.checked_add(b.max(0))?.checked_add(e.max(0))?;
        if kept < 0 || size > 1 << 40 || (mode != "constant" && kept == 0 && size > 0) {
            return None;
        }
        let map = (0..size)
            .map(|i| {
                let c = i - b.max(0);
                let src = if (0..kept).contains(&c) {
                    Some(c)
                } else {
                    match mode.as_str() {
                        "edge" => Some(c.clamp(0, kept - 1)),
                        "wrap" => Some(c.rem_euclid(kept)),
                        "reflect" if kept == 1 => Some(0),
                        "reflect" => {
                            let p = 2 * (kept - 1);
                            let m = c.rem_euclid(p);
                            Some(if m >= kept { p - m } else { m })
                        }
                        _ => None,
                    }
                };
                src.map(|s| (s + crop_b) as usize)
            })
            .collect();
        maps.push(map);
        out.push(size as usize);
    }
    let fill = match ins.get(2).copied().flatten() {
        Some(c) if c.len() == 1 => c.cast(x.dtype()),
        Some(c) if c.is_empty() => Tensor::zeros(x.dtype(), vec![]),
        Some(_) => return None,
        None => Tensor::zeros(x.dtype(), vec![]),
    };
    fn go<T: Elem + Copy>(
        x: &Tensor,
        fill: &Tensor,
        maps: &[Vec<Option<usize>>],
        out: &[usize],
    ) -> Option<Tensor> {
        let src = x.as_slice::<T>()?;
        let fv = *fill.as_slice::<T>()?.first()?;
        let total: usize = out.iter().product();
        let mut y = Vec::with_capacity(total);
        if total == 0 {
            return Some(Tensor::from_vec(out.to_vec(), y));
        }
        let Some((last, lead)) = maps.split_last() else {
            return Some(Tensor::from_vec(vec![], src.to_vec()));
        };
        let st = kiln_ir::tensor::strides(x.shape());
        let lst = st.last().copied().unwrap_or(1);
        let rows: usize = out[..lead.len()].iter().product();
        let mut idx = vec![0usize; lead.len()];
        for _ in 0..rows {
            let base = lead
                .iter()
                .zip(&idx)
                .zip(&st)
                .try_fold(0usize, |o, ((m, &i), &s)| m[i].map(|v| o + v * s));
            match base {
                None => y.extend(std::iter::repeat_n(fv, last.len())),
                Some(b) => y.extend(last.iter().map(|m| m.map_or(fv, |j| src[b + j * lst]))),
            }
            for d in (0..lead.len()).rev() {
                idx[d] += 1;
                if idx[d] < out[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        Some(Tensor::from_vec(out.to_vec(), y))
    }
    go::<f32>(x, &fill, &maps, &out)
        .or_else(|| go::<i64>(x, &fill, &maps, &out))
        .or_else(|| go::<i32>(x, &fill, &maps, &out))
        .or_else(|| go::<bool>(x, &fill, &maps, &out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::{Attr, Attrs, ValueId};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn node(op: OpKind, attrs: Attrs, n_in: usize) -> Node {
        Node {
            op,
            attrs,
            inputs: (0..n_in as u32).map(|i| Some(ValueId(i))).collect(),
            outputs: vec![ValueId(9)],
            name: String::new(),
        }
    }

    fn x_of(rng: &mut StdRng, shape: &[usize], int: bool) -> Tensor {
        let n: usize = shape.iter().product();
        if int {
            Tensor::from_vec(shape.to_vec(), (0..n as i64).collect::<Vec<i64>>())
        } else {
            Tensor::from_vec(
                shape.to_vec(),
                (0..n)
                    .map(|_| rng.gen_range(-5.0f32..5.0))
                    .collect::<Vec<f32>>(),
            )
        }
    }

    fn i64s(v: Vec<i64>) -> Tensor {
        Tensor::from_vec(vec![v.len()], v)
    }

    /// Native and interpreter agree exactly (a copy), or both decline / fail.
    fn same(nd: &Node, ins: &[Option<&Tensor>], what: &str) -> bool {
        let want = kiln_ir::ops::eval(nd.op, &nd.attrs, ins);
        match (run(nd, ins), want) {
            (Some(got), Ok(w)) => {
                assert_eq!(got, w[0], "{what}");
                true
            }
            (None, _) => false,
            (Some(got), Err(e)) => panic!("{what}: native gave {got:?}, the interpreter {e}"),
        }
    }

    #[test]
    fn slices_match_the_interpreter() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut native = 0;
        for case in 0..600 {
            let rank = rng.gen_range(1..5);
            let shape: Vec<usize> = (0..rank).map(|_| rng.gen_range(0..6)).collect();
            let x = x_of(&mut rng, &shape, case % 3 == 0);
            let k = rng.gen_range(1..=rank);
            let mut axes: Vec<i64> = (0..rank as i64).collect();
            for i in 0..rank {
                axes.swap(i, rng.gen_range(i..rank));
            }
            axes.truncate(k);
            let axes: Vec<i64> = axes
                .into_iter()
                .map(|a| {
                    if rng.gen_bool(0.3) {
                        a - rank as i64
                    } else {
                        a
                    }
                })
                .collect();
            let pick = |rng: &mut StdRng| match rng.gen_range(0..6) {
                0 => i64::MAX,
                1 => i64::MIN,
                _ => rng.gen_range(-7..8),
            };
            let starts: Vec<i64> = (0..k).map(|_| pick(&mut rng)).collect();
            let ends: Vec<i64> = (0..k).map(|_| pick(&mut rng)).collect();
            let steps: Vec<i64> = (0..k)
                .map(|_| [1, 1, 2, 3, -1, -2][rng.gen_range(0..6)])
                .collect();
            let (s, e, a, st) = (i64s(starts), i64s(ends), i64s(axes), i64s(steps));
            let nd = node(OpKind::Slice, Attrs::new(), 5);
            let ins = [Some(&x), Some(&s), Some(&e), Some(&a), Some(&st)];
            if same(&nd, &ins, &format!("case {case} {shape:?}")) {
                native += 1;
            }
        }
        // Zero steps and mismatched lengths are never generated: every case ran natively.
        assert_eq!(native, 600);
    }

    #[test]
    fn pads_match_the_interpreter_in_every_mode() {
        let mut rng = StdRng::seed_from_u64(5);
        let mut native = 0;
        for case in 0..600 {
            let rank = rng.gen_range(1..4);
            let shape: Vec<usize> = (0..rank).map(|_| rng.gen_range(1..5)).collect();
            let x = x_of(&mut rng, &shape, case % 4 == 0);
            let mode = ["constant", "edge", "reflect", "wrap"][case % 4];
            let pads: Vec<i64> = (0..2 * rank).map(|_| rng.gen_range(-2..4)).collect();
            let fill = if case % 4 == 0 {
                Tensor::from_vec(vec![], vec![7i64])
            } else {
                Tensor::from_vec(vec![1], vec![2.5f32])
            };
            let p = i64s(pads.clone());
            let attrs = Attrs::new().with("mode", Attr::Str(mode.into()));
            let nd = node(OpKind::Pad, attrs, 3);
            let ins = [Some(&x), Some(&p), Some(&fill)];
            if same(&nd, &ins, &format!("case {case} {shape:?} {mode} {pads:?}")) {
                native += 1;
            }
        }
        assert!(native > 400, "{native} of 600 ran natively");
        // Pads on some axes only.
        let x = x_of(&mut rng, &[2, 3, 4], false);
        let (p, a) = (i64s(vec![1, 2, 0, -1]), i64s(vec![-1, 0]));
        let nd = node(OpKind::Pad, Attrs::new(), 4);
        assert!(same(&nd, &[Some(&x), Some(&p), None, Some(&a)], "axes"));
    }
}
