//! The nn family's row ops natively in f32 where the loop kernels do not take them:
//! `softmax`/`log_softmax`/`hardmax` along any axis (a loop kernel takes the last one),
//! `instance_norm`/`group_norm` (per (batch, group) statistics over channels × space) and
//! inference-mode `batch_norm`. Statistics accumulate in f64 like the interpreter's; the
//! elementwise pass is f32 arithmetic on f64-derived per-row constants. Other dtypes, bad
//! attributes or shapes return `None`: the interpreter runs them and reports the errors.

use kiln_ir::{Node, OpKind, Tensor};

/// The output of an nn-family node on f32 input, or `None` where the interpreter runs it.
pub fn run(node: &Node, ins: &[Option<&Tensor>]) -> Option<Vec<Tensor>> {
    let x = (*ins.first()?)?;
    let v = x.as_slice::<f32>()?;
    let shape = x.shape();
    let y = match node.op {
        OpKind::Softmax | OpKind::LogSoftmax | OpKind::Hardmax => {
            let a = node.attrs.int_or("axis", -1).ok()?;
            let r = shape.len() as i64;
            let axis = usize::try_from(if a < 0 { a + r } else { a })
                .ok()
                .filter(|&a| a < shape.len())?;
            softmax(node.op, v, shape, axis)
        }
        OpKind::InstanceNorm | OpKind::GroupNorm => group_norm(node, v, shape, ins)?,
        OpKind::BatchNorm => {
            if node.attrs.int_or("training_mode", 0).ok()? != 0 || node.outputs.len() != 1 {
                return None;
            }
            batch_norm(node, v, shape, ins)?
        }
        _ => return None,
    };
    Some(vec![Tensor::from_vec(shape.to_vec(), y)])
}

/// Softmax-like along `axis` of `shape` (`outer × len × inner`), as the interpreter: the
/// maximum by `>` (NaN skipped), shifted by it where finite.
fn softmax(op: OpKind, v: &[f32], shape: &[usize], axis: usize) -> Vec<f32> {
    let outer: usize = shape[..axis].iter().product();
    let len = shape[axis];
    let inner: usize = shape[axis + 1..].iter().product();
    let mut y = vec![0f32; v.len()];
    let mut mx = vec![0f32; inner];
    let mut arg = vec![0usize; inner];
    let mut sum = vec![0f64; inner];
    for o in 0..outer {
        let base = o * len * inner;
        mx.fill(f32::NEG_INFINITY);
        arg.fill(0);
        for j in 0..len {
            let row = &v[base + j * inner..base + (j + 1) * inner];
            for ((m, a), &e) in mx.iter_mut().zip(arg.iter_mut()).zip(row) {
                if e > *m {
                    *m = e;
                    *a = j;
                }
            }
        }
        if op == OpKind::Hardmax {
            if len > 0 {
                for (i, &a) in arg.iter().enumerate() {
                    y[base + a * inner + i] = 1.0;
                }
            }
            continue;
        }
        for m in mx.iter_mut() {
            if !m.is_finite() {
                *m = 0.0;
            }
        }
        sum.fill(0.0);
        for j in 0..len {
            let at = base + j * inner;
            for ((s, &e), &m) in sum.iter_mut().zip(&v[at..at + inner]).zip(&mx) {
                *s += (e as f64 - m as f64).exp();
            }
        }
        for j in 0..len {
            let at = base + j * inner;
            let (src, dst) = (&v[at..at + inner], &mut y[at..at + inner]);
            for (((d, &e), &m), &s) in dst.iter_mut().zip(src).zip(&mx).zip(&sum) {
                let e = e as f64 - m as f64;
                *d = if op == OpKind::LogSoftmax {
                    (e - s.ln()) as f32
                } else {
                    (e.exp() / s) as f32
                };
            }
        }
    }
    y
}

/// A per-channel parameter of `c` values as f32, or `None` when it is not one.
fn per_channel(t: Option<&Tensor>, c: usize) -> Option<&[f32]> {
    t?.as_slice::<f32>().filter(|s| s.len() == c)
}

/// Instance and group normalisation over `(N, C, spatial...)`: mean and variance per
/// (sample, group) in f64, then `(x − mean)·inv·scale[c] + bias[c]`.
fn group_norm(
    node: &Node,
    v: &[f32],
    shape: &[usize],
    ins: &[Option<&Tensor>],
) -> Option<Vec<f32>> {
    if shape.len() < 2 {
        return None;
    }
    let (n, c) = (shape[0], shape[1]);
    let groups = if node.op == OpKind::GroupNorm {
        let g = usize::try_from(node.attrs.req_int("num_groups").ok()?).ok()?;
        (g > 0 && c % g == 0).then_some(g)?
    } else {
        c
    };
    let eps = node.attrs.float_or("epsilon", 1e-5).ok()? as f64;
    let scale = per_channel(ins.get(1).copied().flatten(), c)?;
    let bias = per_channel(ins.get(2).copied().flatten(), c)?;
    let sp: usize = shape[2..].iter().product();
    let per = c / groups;
    let len = per * sp;
    let mut y = vec![0f32; v.len()];
    if len == 0 {
        return Some(y);
    }
    for gi in 0..n * groups {
        let row = &v[gi * len..(gi + 1) * len];
        let mean = row.iter().map(|&a| a as f64).sum::<f64>() / len as f64;
        let var = row
            .iter()
            .map(|&a| (a as f64 - mean) * (a as f64 - mean))
            .sum::<f64>()
            / len as f64;
        let inv = 1.0 / (var + eps).sqrt();
        for k in 0..per {
            let ch = (gi % groups) * per + k;
            // y = (x − mean)·a + bias with a = inv·scale: centred first (folding the mean
            // into the bias cancels badly when the row is nearly constant).
            let (m, a, b) = (mean as f32, (inv * scale[ch] as f64) as f32, bias[ch]);
            let at = gi * len + k * sp;
            for (d, &e) in y[at..at + sp].iter_mut().zip(&row[k * sp..(k + 1) * sp]) {
                *d = (e - m) * a + b;
            }
        }
    }
    Some(y)
}

/// Inference-mode batch normalisation: `(x − mean[c])·scale[c]/sqrt(var[c] + eps) + bias[c]`.
fn batch_norm(
    node: &Node,
    v: &[f32],
    shape: &[usize],
    ins: &[Option<&Tensor>],
) -> Option<Vec<f32>> {
    if shape.len() < 2 {
        return None;
    }
    let c = shape[1];
    let eps = node.attrs.float_or("epsilon", 1e-5).ok()? as f64;
    let p = |i: usize| per_channel(ins.get(i).copied().flatten(), c);
    let (scale, bias, mean, var) = (p(1)?, p(2)?, p(3)?, p(4)?);
    let sp: usize = shape[2..].iter().product();
    let mut y = vec![0f32; v.len()];
    if sp == 0 {
        return Some(y);
    }
    for (i, (d, s)) in y.chunks_mut(sp).zip(v.chunks(sp)).enumerate() {
        let ch = i % c;
        let a = (scale[ch] as f64 / (var[ch] as f64 + eps).sqrt()) as f32;
        let (m, b) = (mean[ch], bias[ch]);
        for (d, &e) in d.iter_mut().zip(s) {
            *d = (e - m) * a + b;
        }
    }
    Some(y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::{Attr, Attrs, ValueId};
    use kiln_reference::{compare, Tolerance};

    /// f32 output of f64 statistics: norms cancel, so errors scale with the row's magnitude.
    const TOL: Tolerance = Tolerance::ScaledByMax {
        rel: 1e-5,
        abs: 1e-6,
    };

    fn node(op: OpKind, attrs: Attrs, n_in: u32) -> Node {
        Node {
            op,
            attrs,
            inputs: (0..n_in).map(|i| Some(ValueId(i))).collect(),
            outputs: vec![ValueId(n_in)],
            name: String::new(),
        }
    }

    fn data(n: usize, seed: u64, specials: bool) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                if specials && s.is_multiple_of(11) {
                    [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][(s >> 5) as usize % 3]
                } else {
                    ((s >> 40) as f32 / (1u64 << 24) as f32) * 8.0 - 4.0
                }
            })
            .collect()
    }

    fn check(n: &Node, ins: &[Option<&Tensor>], what: &str) {
        let want = kiln_ir::ops::eval(n.op, &n.attrs, ins).expect("reference");
        let got = run(n, ins).expect("native");
        let r = compare(&got[0], &want[0], TOL);
        assert!(r.ok, "{what}: {r:?}");
    }

    #[test]
    fn softmax_family_matches_the_interpreter_on_every_axis() {
        let shapes: [&[usize]; 4] = [&[5], &[3, 7], &[2, 3, 4], &[2, 1, 3, 5]];
        for (si, shape) in shapes.iter().enumerate() {
            let rank = shape.len() as i64;
            for axis in -rank..rank {
                for op in [OpKind::Softmax, OpKind::LogSoftmax, OpKind::Hardmax] {
                    for specials in [false, true] {
                        let x = Tensor::from_vec(
                            shape.to_vec(),
                            data(
                                shape.iter().product(),
                                (si as i64 * 8 + axis + 4) as u64,
                                specials,
                            ),
                        );
                        let nd = node(op, Attrs::new().with("axis", Attr::Int(axis)), 1);
                        check(&nd, &[Some(&x)], &format!("{op:?} {shape:?} axis {axis}"));
                    }
                }
            }
        }
    }

    #[test]
    fn instance_group_and_batch_norm_match_the_interpreter() {
        for (si, shape) in [&[1usize, 4, 5][..], &[2, 6, 3, 2], &[3, 4], &[2, 8, 7]]
            .iter()
            .enumerate()
        {
            let c = shape[1];
            let x = Tensor::from_vec(
                shape.to_vec(),
                data(shape.iter().product(), si as u64, false),
            );
            let p = |k: u64, shift: f32| {
                Tensor::from_vec(
                    vec![c],
                    data(c, k, false)
                        .iter()
                        .map(|v| v.abs() + shift)
                        .collect::<Vec<f32>>(),
                )
            };
            let (s, b, m, var) = (p(7, 0.1), p(8, -2.0), p(9, -1.0), p(10, 0.5));
            let eps = Attrs::new().with("epsilon", Attr::Float(1e-3));
            check(
                &node(OpKind::InstanceNorm, eps.clone(), 3),
                &[Some(&x), Some(&s), Some(&b)],
                &format!("instance_norm {shape:?}"),
            );
            for g in [1, 2, c] {
                if c % g == 0 {
                    let attrs = eps.clone().with("num_groups", Attr::Int(g as i64));
                    check(
                        &node(OpKind::GroupNorm, attrs, 3),
                        &[Some(&x), Some(&s), Some(&b)],
                        &format!("group_norm {shape:?} groups {g}"),
                    );
                }
            }
            check(
                &node(OpKind::BatchNorm, eps.clone(), 5),
                &[Some(&x), Some(&s), Some(&b), Some(&m), Some(&var)],
                &format!("batch_norm {shape:?}"),
            );
        }
        // Wrong parameter lengths and training mode go to the interpreter.
        let x = Tensor::from_vec(vec![1, 3, 2], data(6, 1, false));
        let short = Tensor::from_vec(vec![2], vec![1f32, 1.0]);
        let nd = node(OpKind::InstanceNorm, Attrs::new(), 3);
        assert!(run(&nd, &[Some(&x), Some(&short), Some(&short)]).is_none());
        let train = Attrs::new().with("training_mode", Attr::Int(1));
        let nd = node(OpKind::BatchNorm, train, 5);
        let ones = Tensor::from_vec(vec![3], vec![1f32; 3]);
        let ins = [Some(&x), Some(&ones), Some(&ones), Some(&ones), Some(&ones)];
        assert!(run(&nd, &ins).is_none());
    }
}
