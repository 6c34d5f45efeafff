//! The index family's `scatter_nd` natively: the data copied once, then each index tuple's
//! slice of updates written as one block (f32, i64, i32 and bool; reductions `none`, and
//! `add`/`mul` in f32). Out-of-range indices, shape mismatches and other reductions return
//! `None`: the interpreter runs the node and reports the error.

use kiln_ir::{Elem, Node, OpKind, Tensor};

/// The output of a `scatter_nd` node, or `None` where the interpreter runs it.
pub fn run(node: &Node, ins: &[Option<&Tensor>]) -> Option<Tensor> {
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
    let combine = node.attrs.string_or("reduction", "none".into()).ok()?;
    fn go<T: Elem + Copy>(
        x: &Tensor,
        upd: &Tensor,
        offs: &[usize],
        inner: usize,
        f: Option<fn(T, T) -> T>,
    ) -> Option<Tensor> {
        let mut out = x.as_slice::<T>()?.to_vec();
        let u = upd.as_slice::<T>()?;
        for (t, &o) in offs.iter().enumerate() {
            let src = &u[t * inner..(t + 1) * inner];
            let dst = &mut out[o..o + inner];
            match f {
                None => dst.copy_from_slice(src),
                Some(f) => dst.iter_mut().zip(src).for_each(|(d, &s)| *d = f(*d, s)),
            }
        }
        Some(Tensor::from_vec(x.shape().to_vec(), out))
    }
    match combine.as_str() {
        "none" => go::<f32>(x, upd, &offs, inner, None)
            .or_else(|| go::<i64>(x, upd, &offs, inner, None))
            .or_else(|| go::<i32>(x, upd, &offs, inner, None))
            .or_else(|| go::<bool>(x, upd, &offs, inner, None)),
        "add" => go::<f32>(x, upd, &offs, inner, Some(|a, b| a + b)),
        "mul" => go::<f32>(x, upd, &offs, inner, Some(|a, b| a * b)),
        _ => None,
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
