//! The index family natively: `scatter_nd` (the data copied once, then each index tuple's
//! slice of updates written as one block; f32, i64, i32 and bool; reductions `none`, and
//! `add`/`mul` in f32) and `top_k` (f32, i64 and i32 along any axis: a linear-time selection
//! of the k first under the interpreter's order, then a sort of those k only).
//! Out-of-range indices, shape mismatches and other reductions return `None`: the
//! interpreter runs the node and reports the error.

use kiln_ir::{Elem, Node, OpKind, Tensor};
use std::cmp::Ordering;

/// The outputs of a `top_k` node (values and i64 indices), or `None` where the interpreter
/// runs it. Its order is the interpreter's: by value (NaN above every number; descending
/// when `largest`), ties by the lower index, so the k chosen and their order are the same.
pub fn top_k(node: &Node, ins: &[Option<&Tensor>]) -> Option<Vec<Tensor>> {
    let x = (*ins.first()?)?;
    let kt = (*ins.get(1)?)?;
    let k = match (kt.as_slice::<i64>(), kt.as_slice::<i32>()) {
        (Some([k]), _) => usize::try_from(*k).ok()?,
        (_, Some([k])) => usize::try_from(*k).ok()?,
        _ => return None,
    };
    let shape = x.shape();
    let rank = shape.len();
    let a = node.attrs.int_or("axis", -1).ok()?;
    let a = usize::try_from(if a < 0 { a + rank as i64 } else { a })
        .ok()
        .filter(|&a| a < rank)?;
    let n = shape[a];
    if k > n {
        return None;
    }
    let largest = node.attrs.int_or("largest", 1).ok()? != 0;
    let outer: usize = shape[..a].iter().product();
    let inner: usize = shape[a + 1..].iter().product();
    let mut out = shape.to_vec();
    out[a] = k;
    fn go<T: Elem + Copy + PartialOrd>(
        x: &Tensor,
        (outer, n, inner, k): (usize, usize, usize, usize),
        largest: bool,
        out: &[usize],
    ) -> Option<Vec<Tensor>> {
        let v = x.as_slice::<T>()?;
        let mut vals = vec![v.first().copied()?; outer * k * inner];
        let mut idx = vec![0i64; outer * k * inner];
        let mut line: Vec<(T, usize)> = Vec::with_capacity(n);
        // The interpreter's order: NaN (unequal to itself) above every number, then by index.
        #[allow(clippy::eq_op)]
        let cmp = |p: &(T, usize), q: &(T, usize)| {
            let c = match (p.0 != p.0, q.0 != q.0) {
                (true, true) => Ordering::Equal,
                (true, false) => Ordering::Greater,
                (false, true) => Ordering::Less,
                _ => p.0.partial_cmp(&q.0).unwrap_or(Ordering::Equal),
            };
            let c = if largest { c.reverse() } else { c };
            c.then(p.1.cmp(&q.1))
        };
        for o in 0..outer {
            for i in 0..inner {
                line.clear();
                line.extend((0..n).map(|j| (v[(o * n + j) * inner + i], j)));
                if k == 0 {
                    continue;
                }
                if k < n {
                    line.select_nth_unstable_by(k - 1, cmp);
                }
                line[..k].sort_unstable_by(cmp);
                for (r, &(val, j)) in line[..k].iter().enumerate() {
                    let dst = (o * k + r) * inner + i;
                    vals[dst] = val;
                    idx[dst] = j as i64;
                }
            }
        }
        Some(vec![
            Tensor::from_vec(out.to_vec(), vals),
            Tensor::from_vec(out.to_vec(), idx),
        ])
    }
    if x.is_empty() {
        return None;
    }
    let geo = (outer, n, inner, k);
    go::<f32>(x, geo, largest, &out)
        .or_else(|| go::<i64>(x, geo, largest, &out))
        .or_else(|| go::<i32>(x, geo, largest, &out))
}

/// The output of a `scatter_nd` node, or `None` where the interpreter runs it.
pub fn run(node: &Node, ins: &[Option<&Tensor>]) -> Option<Tensor> {
    let (x, upd) = ((*ins.first()?)?, (*ins.get(2)?)?);
    let plan = scatter_plan(node, ins)?;
    let mut out = Tensor::new(x.shape().to_vec(), x.data().deep_copy()).ok()?;
    plan.apply(&mut out, upd).then_some(out)
}

/// `scatter_nd` written into its data operand `x` itself (the executor's path when `x` is
/// at its last use and owned: a recurrence writing one row per step into a carried buffer
/// then costs the row, not the buffer). `Err(x)` gives `x` back unchanged where
/// [`run`] would return `None`.
pub fn run_in_place(node: &Node, x: Tensor, ind: &Tensor, upd: &Tensor) -> Result<Tensor, Tensor> {
    let Some(plan) = scatter_plan(node, &[Some(&x), Some(ind), Some(upd)]) else {
        return Err(x);
    };
    let mut x = x;
    if plan.apply(&mut x, upd) {
        Ok(x)
    } else {
        Err(x)
    }
}

/// Whether [`run`] (and [`run_in_place`]) compute this `scatter_nd` rather than decline.
pub fn scatter_runs_natively(node: &Node, ins: &[Option<&Tensor>]) -> bool {
    scatter_plan(node, ins).is_some()
}

/// A checked `scatter_nd`: where each index tuple's block goes, its length, the reduction.
struct ScatterPlan {
    offs: Vec<usize>,
    inner: usize,
    reduction: String,
}

/// Checks a `scatter_nd` (shapes, dtypes, indices in range, a reduction run natively)
/// before anything is written.
fn scatter_plan(node: &Node, ins: &[Option<&Tensor>]) -> Option<ScatterPlan> {
    if node.op != OpKind::ScatterND {
        return None;
    }
    let x = (*ins.first()?)?;
    let ind = (*ins.get(1)?)?;
    let upd = (*ins.get(2)?)?;
    let shape = x.shape();
    let q = ind.shape();
    let k = *q.last()?;
    if upd.dtype() != x.dtype() || k == 0 || k > shape.len() {
        return None;
    }
    let mut want = q[..q.len() - 1].to_vec();
    want.extend_from_slice(&shape[k..]);
    if upd.shape() != want.as_slice() {
        return None;
    }
    let idx: Vec<i64> = match ind.as_slice::<i64>() {
        Some(v) => v.to_vec(),
        None => ind
            .as_slice::<i32>()?
            .iter()
            .map(|&i| i64::from(i))
            .collect(),
    };
    let st = kiln_ir::tensor::strides(shape);
    let inner: usize = shape[k..].iter().product();
    // The destination of each tuple, checked before anything is written.
    let offs: Vec<usize> = idx
        .chunks(k.max(1))
        .take(q[..q.len() - 1].iter().product())
        .map(|t| {
            t.iter().take(k).enumerate().try_fold(0usize, |o, (j, &i)| {
                let n = shape[j] as i64;
                let i = if i < 0 { i + n } else { i };
                (0..n).contains(&i).then(|| o + i as usize * st[j])
            })
        })
        .collect::<Option<_>>()?;
    let reduction = node.attrs.string_or("reduction", "none".into()).ok()?;
    let native = match reduction.as_str() {
        "none" => matches!(
            x.dtype(),
            kiln_ir::DType::F32 | kiln_ir::DType::I64 | kiln_ir::DType::I32 | kiln_ir::DType::Bool
        ),
        "add" | "mul" => x.dtype() == kiln_ir::DType::F32,
        _ => false,
    };
    native.then_some(ScatterPlan {
        offs,
        inner,
        reduction,
    })
}

impl ScatterPlan {
    /// Writes the updates into `out` (of the data's shape and dtype); false for a dtype the
    /// plan does not run (nothing is written then).
    fn apply(&self, out: &mut Tensor, upd: &Tensor) -> bool {
        fn go<T: Elem + Copy>(
            out: &mut Tensor,
            upd: &Tensor,
            offs: &[usize],
            inner: usize,
            f: Option<fn(T, T) -> T>,
        ) -> bool {
            let Some(u) = upd.as_slice::<T>() else {
                return false;
            };
            let Some(dst) = out.as_mut_slice::<T>() else {
                return false;
            };
            for (t, &o) in offs.iter().enumerate() {
                let src = &u[t * inner..(t + 1) * inner];
                let d = &mut dst[o..o + inner];
                match f {
                    None => d.copy_from_slice(src),
                    Some(f) => d.iter_mut().zip(src).for_each(|(d, &s)| *d = f(*d, s)),
                }
            }
            true
        }
        let (o, i) = (&self.offs, self.inner);
        match self.reduction.as_str() {
            "none" => {
                go::<f32>(out, upd, o, i, None)
                    || go::<i64>(out, upd, o, i, None)
                    || go::<i32>(out, upd, o, i, None)
                    || go::<bool>(out, upd, o, i, None)
            }
            "add" => go::<f32>(out, upd, o, i, Some(|a, b| a + b)),
            "mul" => go::<f32>(out, upd, o, i, Some(|a, b| a * b)),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::{Attr, Attrs, ValueId};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    #[test]
    fn scatter_nd_matches_the_interpreter() {
        let mut rng = StdRng::seed_from_u64(11);
        let mut native = 0;
        for case in 0..400 {
            let rank = rng.gen_range(1..4);
            let shape: Vec<usize> = (0..rank).map(|_| rng.gen_range(1..5)).collect();
            let n: usize = shape.iter().product();
            let x = Tensor::from_vec(
                shape.clone(),
                (0..n)
                    .map(|_| rng.gen_range(-3.0f32..3.0))
                    .collect::<Vec<f32>>(),
            );
            let k = rng.gen_range(1..=rank);
            let tuples = rng.gen_range(0..4);
            // Distinct tuples (duplicates make `none` order-dependent, which both sides
            // resolve the same way anyway), negative spellings, sometimes out of range.
            let mut idx = vec![];
            for _ in 0..tuples {
                for &d in &shape[..k] {
                    let d = d as i64;
                    idx.push(match rng.gen_range(0..10) {
                        0 => d,
                        1..=3 => rng.gen_range(-d..0),
                        _ => rng.gen_range(0..d),
                    });
                }
            }
            let ind = Tensor::from_vec(vec![tuples, k], idx);
            let mut us = vec![tuples];
            us.extend_from_slice(&shape[k..]);
            let un: usize = us.iter().product();
            let upd = Tensor::from_vec(
                us,
                (0..un)
                    .map(|_| rng.gen_range(-3.0f32..3.0))
                    .collect::<Vec<f32>>(),
            );
            let red = ["none", "add", "mul"][case % 3];
            let attrs = Attrs::new().with("reduction", Attr::Str(red.into()));
            let nd = Node {
                op: OpKind::ScatterND,
                attrs,
                inputs: (0..3).map(|i| Some(ValueId(i))).collect(),
                outputs: vec![ValueId(3)],
                name: String::new(),
            };
            let ins = [Some(&x), Some(&ind), Some(&upd)];
            let want = kiln_ir::ops::eval(nd.op, &nd.attrs, &ins);
            match (run(&nd, &ins), want) {
                (Some(got), Ok(w)) => {
                    assert_eq!(got, w[0], "case {case}");
                    native += 1;
                }
                (None, Err(_)) => {}
                (got, want) => panic!("case {case}: native {got:?}, interpreter {want:?}"),
            }
        }
        assert!(native > 250, "{native}");
    }
}
