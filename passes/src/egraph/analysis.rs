//! The e-class analysis: what is known about every e-class's value. Its type (from the IR
//! shape rules), its contents when constant (folded with the IR's own `eval`, which is how
//! rules' new weights such as `diag(γ)·W` get computed: exactly, never approximated),
//! and two facts the norm rules guard on: non-negative, and mean-free along the last axis.
//!
//! Invariant: facts only ever get stronger on merge (two members of one class are equal
//! values, so whatever is true of either is true of both).

use super::lang::{Helper, Kn};
use egg::{DidMerge, EGraph, Id};
use kiln_ir::{ops, Attrs, Fact, OpKind, Shape, Tensor, TensorData, TensorType};
use std::sync::Arc;

/// Results up to this many elements are constant-folded inside the e-graph.
pub const FOLD_LIMIT_ELEMS: usize = 1 << 24;

/// Relative tolerance under which a constant's last-axis means count as zero (centring
/// in f32 leaves rounding residue of a few ulps of the largest element).
pub const MEAN_FREE_RTOL: f64 = 1e-5;

/// What is known about one e-class.
#[derive(Clone, Debug, Default)]
pub struct Data {
    /// Type and, when known, contents (None for attribute leaves and holes).
    pub fact: Option<Fact>,
    /// The attributes, for attribute leaves.
    pub attrs: Option<Arc<Attrs>>,
    /// Every element is ≥ 0 (or NaN-free non-negative where computed).
    pub nonneg: bool,
    /// Every row along the last axis sums to zero.
    pub mean_free: bool,
}

impl Data {
    /// The constant contents, if known.
    pub fn konst(&self) -> Option<&Arc<Tensor>> {
        self.fact.as_ref().and_then(|f| f.konst.as_ref())
    }

    /// The static type, if known.
    pub fn ty(&self) -> Option<&TensorType> {
        self.fact.as_ref().map(|f| &f.ty)
    }

    /// The shape if fully static.
    pub fn concrete(&self) -> Option<Vec<usize>> {
        self.ty().and_then(|t| t.shape.concrete())
    }
}

/// The analysis: carries the graph inputs' types and the types of opaque nodes' outputs.
#[derive(Clone, Debug, Default)]
pub struct KilnAnalysis {
    /// Type of each graph input, by index.
    pub inputs: Vec<TensorType>,
    /// Type of each opaque node output, by (node index, output).
    pub opaque: std::collections::HashMap<(u32, u8), TensorType>,
}

/// The e-graph kiln saturates.
pub type KEGraph = EGraph<Kn, KilnAnalysis>;

impl egg::Analysis<Kn> for KilnAnalysis {
    type Data = Data;

    fn make(eg: &mut KEGraph, enode: &Kn, _id: Id) -> Data {
        match enode {
            Kn::Input(i) => Data {
                fact: eg.analysis.inputs.get(*i as usize).cloned().map(Fact::of),
                ..Data::default()
            },
            Kn::Opaque(n, o, _) => Data {
                fact: eg.analysis.opaque.get(&(*n, *o)).cloned().map(Fact::of),
                ..Data::default()
            },
            Kn::Const(k) => const_data(k.tensor.clone()),
            Kn::Attrs(a) => Data {
                attrs: Some(Arc::new(a.to_attrs())),
                ..Data::default()
            },
            Kn::Hole => Data::default(),
            Kn::Helper(Helper::LastAxis, _) => {
                const_data(Arc::new(Tensor::from_vec(vec![1], vec![-1i64])))
            }
            Kn::Helper(Helper::EpsLike, args) => {
                let eps = args
                    .first()
                    .and_then(|&a| eg[a].data.attrs.clone())
                    .and_then(|a| a.float_or("epsilon", 1e-5).ok());
                let dt = args.get(1).and_then(|&x| eg[x].data.ty().map(|t| t.dtype));
                match (eps, dt) {
                    (Some(e), Some(dt)) if dt.is_float() => {
                        let d = TensorData::from_f64s(dt, std::iter::once(e as f64));
                        match Tensor::new(vec![], d) {
                            Ok(t) => const_data(Arc::new(t)),
                            Err(_) => Data::default(),
                        }
                    }
                    _ => Data::default(),
                }
            }
            Kn::Helper(h, args) => {
                let ks: Option<Vec<Arc<Tensor>>> = args
                    .iter()
                    .filter(|&&a| eg[a].data.attrs.is_none())
                    .map(|&a| eg[a].data.konst().cloned())
                    .collect();
                let attrs = args.iter().find_map(|&a| eg[a].data.attrs.clone());
                match ks.and_then(|ks| eval_helper(*h, &ks, attrs.as_deref()).ok()) {
                    // Shared: the extracted graph's constant and the plan's are this one.
                    Some(t) => const_data(Arc::new(t.into_shared())),
                    None => Data::default(),
                }
            }
            Kn::Op { op, out, args } => make_op(eg, *op, *out as usize, args),
        }
    }

    fn merge(&mut self, a: &mut Data, b: Data) -> DidMerge {
        let mut da = false;
        let mut db = false;
        match (&mut a.fact, b.fact) {
            (None, Some(f)) => {
                a.fact = Some(f);
                da = true;
            }
            (Some(_), None) => db = true,
            (Some(fa), Some(fb)) => {
                if fa.konst.is_none() && fb.konst.is_some() {
                    fa.konst = fb.konst;
                    fa.ty.shape = fb.ty.shape.clone();
                    da = true;
                } else if fa.konst.is_some() && fb.konst.is_none() {
                    db = true;
                }
                if fa.ty.shape.concrete().is_none() && fb.ty.shape.concrete().is_some() {
                    fa.ty.shape = fb.ty.shape;
                    da = true;
                }
            }
            (None, None) => {}
        }
        if a.attrs.is_none() && b.attrs.is_some() {
            a.attrs = b.attrs;
            da = true;
        }
        for (x, y) in [(&mut a.nonneg, b.nonneg), (&mut a.mean_free, b.mean_free)] {
            if !*x && y {
                *x = true;
                da = true;
            } else if *x && !y {
                db = true;
            }
        }
        DidMerge(da, db)
    }

    fn modify(eg: &mut KEGraph, id: Id) {
        // A constant class gets its value as a leaf, so extraction can take it for free.
        let Some(k) = eg[id].data.konst().cloned() else {
            return;
        };
        if eg[id].nodes.iter().any(|n| matches!(n, Kn::Const(_))) {
            return;
        }
        let c = eg.add(Kn::Const(super::lang::ConstKey::new(k)));
        eg.union(id, c);
    }
}

/// Whether every element of `t` is ≥ 0 and whether it is mean-free along its last axis
/// ([`last_axis_mean_free`]): non-numeric tensors are non-negative and not mean-free. f32
/// is read in place, stopping at the first element or row that decides.
pub fn sign_and_mean_facts(t: &Tensor) -> (bool, bool) {
    if !(t.dtype().is_float() || t.dtype().is_signed_int()) {
        return (true, false);
    }
    if let Some(v) = t.as_slice::<f32>() {
        let nonneg = v.iter().all(|&x| x >= 0.0);
        let mean_free = match t.shape().last() {
            Some(&n) if n >= 2 && !v.is_empty() => v
                .chunks(n)
                .all(|row| crate::dense::row_mean_free(row, MEAN_FREE_RTOL)),
            _ => false,
        };
        return (nonneg, mean_free);
    }
    let v = t.to_f64s();
    let nonneg = v.iter().all(|&x| x >= 0.0);
    (nonneg, last_axis_mean_free(&v, t.shape()))
}

/// Facts of a constant tensor.
fn const_data(t: Arc<Tensor>) -> Data {
    let (nonneg, mean_free) = sign_and_mean_facts(&t);
    Data {
        fact: Some(Fact {
            ty: TensorType::new(t.dtype(), Shape::fixed(t.shape())),
            dims: None,
            konst: Some(t),
        }),
        attrs: None,
        nonneg,
        mean_free,
    }
}

/// True if every row along the last axis has mean zero (within [`MEAN_FREE_RTOL`] of the
/// row's largest magnitude). A rank-0 or empty tensor is not mean-free.
pub fn last_axis_mean_free(v: &[f64], shape: &[usize]) -> bool {
    let Some(&n) = shape.last() else {
        return false;
    };
    if n < 2 || v.is_empty() {
        return false;
    }
    v.chunks(n).all(|row| {
        let s: f64 = row.iter().sum();
        let m = row.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        s.is_finite() && (s / n as f64).abs() <= MEAN_FREE_RTOL * m.max(f64::MIN_POSITIVE)
    })
}

fn make_op(eg: &KEGraph, op: OpKind, out: usize, args: &[Id]) -> Data {
    let n_in = if super::lang::takes_attrs(op) {
        args.len().saturating_sub(1)
    } else {
        args.len()
    };
    let attrs: Attrs = if n_in < args.len() {
        eg[args[n_in]]
            .data
            .attrs
            .as_deref()
            .cloned()
            .unwrap_or_default()
    } else {
        Attrs::new()
    };
    let ins: Vec<&Data> = args[..n_in].iter().map(|&a| &eg[a].data).collect();
    let facts: Vec<Option<&Fact>> = ins.iter().map(|d| d.fact.as_ref()).collect();
    let mut fact = match ops::infer(op, &attrs, &facts) {
        Ok(mut fs) if out < fs.len() => Some(fs.swap_remove(out)),
        _ => None,
    };
    // Fold when every present input is constant.
    if let Some(f) = &mut fact {
        let tensors: Option<Vec<Option<&Tensor>>> = args[..n_in]
            .iter()
            .map(|&a| {
                let is_hole = eg[a].nodes.iter().any(|n| matches!(n, Kn::Hole));
                if is_hole {
                    Some(None)
                } else {
                    eg[a].data.konst().map(|k| Some(k.as_ref()))
                }
            })
            .collect();
        let small = f.ty.shape.concrete().is_some_and(|s| {
            s.iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .is_some_and(|n| n <= FOLD_LIMIT_ELEMS)
        });
        if let (Some(ts), true) = (tensors, small && !op.holds_graphs()) {
            if let Ok(mut outs) = ops::eval(op, &attrs, &ts) {
                if out < outs.len() && outs[out].dtype() == f.ty.dtype {
                    let t = Arc::new(outs.swap_remove(out));
                    return const_data(t);
                }
            }
        }
    }
    let last_dim_one = |d: &Data| {
        d.ty()
            .and_then(|t| {
                t.shape
                    .dims()
                    .map(|ds| ds.last().and_then(|x| x.fixed()) == Some(1) || ds.is_empty())
            })
            .unwrap_or(false)
    };
    let mf = |i: usize| ins.get(i).is_some_and(|d| d.mean_free);
    let nn = |i: usize| ins.get(i).is_some_and(|d| d.nonneg);
    let hole = |i: usize| {
        args.get(i)
            .is_some_and(|&a| eg[a].nodes.iter().any(|n| matches!(n, Kn::Hole)))
    };
    use OpKind::*;
    let mean_free = out == 0
        && match op {
            Add | Sub => mf(0) && mf(1),
            Neg | Identity => mf(0),
            Mul => {
                (mf(0) && ins.get(1).is_some_and(|d| last_dim_one(d)))
                    || (mf(1) && ins.first().is_some_and(|d| last_dim_one(d)))
            }
            MatMul => {
                mf(1)
                    && ins
                        .get(1)
                        .and_then(|d| d.ty())
                        .and_then(|t| t.shape.rank())
                        .is_some_and(|r| r >= 2)
            }
            Linear => {
                let act = attrs
                    .string_or("activation", "none".into())
                    .unwrap_or_default();
                act == "none" && mf(1) && (hole(2) || mf(2)) && (hole(4) || mf(4))
            }
            _ => false,
        };
    let nonneg = out == 0
        && match op {
            Relu | Abs | Exp | Sqrt | Sigmoid | Softmax => true,
            ReduceL1 | ReduceL2 | ReduceSumSquare => true,
            Mul => (args.len() == 2 && eg.find(args[0]) == eg.find(args[1])) || (nn(0) && nn(1)),
            Add | Div | Max | Min => nn(0) && nn(1),
            Reciprocal | Reshape | Transpose | Identity | ReduceMean | ReduceSum | ReduceMax => {
                nn(0)
            }
            _ => false,
        };
    Data {
        fact,
        attrs: None,
        nonneg,
        mean_free,
    }
}

/// Computes a helper's constant in f64, rounding once to the first operand's dtype.
pub fn eval_helper(h: Helper, ks: &[Arc<Tensor>], attrs: Option<&Attrs>) -> Result<Tensor, String> {
    let a = ks.first().ok_or("helper without operands")?;
    let dt = a.dtype();
    if !dt.is_float() {
        return Err("helpers fold floats only".into());
    }
    let make = |shape: Vec<usize>, v: Vec<f64>| {
        Tensor::new(shape, TensorData::from_f64s(dt, v.into_iter()))
    };
    if let Some(t) = eval_helper_f32(h, ks)? {
        return Ok(t);
    }
    let av = a.to_f64s();
    let arg = |i: usize| {
        ks.get(i)
            .ok_or_else(|| format!("helper {} needs {} operands", h.name(), i + 1))
    };
    match h {
        Helper::OnesLike => make(a.shape().to_vec(), vec![1.0; av.len()]),
        Helper::ZerosLike => make(a.shape().to_vec(), vec![0.0; av.len()]),
        Helper::Centre => {
            let n = *a.shape().last().ok_or("centre needs rank ≥ 1")?;
            let mut v = av;
            if n > 0 {
                for row in v.chunks_mut(n) {
                    let m = row.iter().sum::<f64>() / n as f64;
                    row.iter_mut().for_each(|x| *x -= m);
                }
            }
            make(a.shape().to_vec(), v)
        }
        Helper::ScaleRows => {
            // diag(g)·w: g [K], w [.., K, N]
            let w = arg(1)?;
            let ws = w.shape();
            let (k, n) = match ws {
                [.., k, n] => (*k, *n),
                _ => return Err("scale_rows needs a matrix".into()),
            };
            if a.shape() != [k] || w.dtype() != dt {
                return Err("scale_rows: g must be [K]".into());
            }
            let mut v = w.to_f64s();
            for (i, x) in v.iter_mut().enumerate() {
                *x *= av[(i / n.max(1)) % k.max(1)];
            }
            make(ws.to_vec(), v)
        }
        Helper::RowTimes => {
            // b·w: b [K], w [K, N] -> [N]
            let w = arg(1)?;
            let (k, n) = match w.shape() {
                [k, n] => (*k, *n),
                _ => return Err("row_times needs a [K, N] matrix".into()),
            };
            if a.shape() != [k] || w.dtype() != dt {
                return Err("row_times: b must be [K]".into());
            }
            let wv = w.to_f64s();
            let mut out = vec![0.0; n];
            for i in 0..k {
                for j in 0..n {
                    out[j] += av[i] * wv[i * n + j];
                }
            }
            make(vec![n], out)
        }
        Helper::BnScale => {
            let var = arg(1)?.to_f64s();
            if var.len() != av.len() {
                return Err("bn_scale: scale and var differ in length".into());
            }
            let eps = attrs
                .map(|a| a.float_or("epsilon", 1e-5))
                .transpose()?
                .unwrap_or(1e-5) as f64;
            let v = av
                .iter()
                .zip(&var)
                .map(|(s, v)| s / (v + eps).sqrt())
                .collect();
            make(a.shape().to_vec(), v)
        }
        Helper::BnShift => {
            let (m, k) = (arg(1)?.to_f64s(), arg(2)?.to_f64s());
            if m.len() != av.len() || k.len() != av.len() {
                return Err("bn_shift: operand lengths differ".into());
            }
            let v = (0..av.len()).map(|i| av[i] - m[i] * k[i]).collect();
            make(a.shape().to_vec(), v)
        }
        Helper::ScaleOut => {
            let k = arg(1)?.to_f64s();
            let s = a.shape();
            let mut v = av;
            if s.len() >= 3 {
                // conv weight [Cout, Cin/g, ...]
                let per = v.len() / s[0].max(1);
                if k.len() != s[0] {
                    return Err("scale_out: channel count".into());
                }
                for (i, x) in v.iter_mut().enumerate() {
                    *x *= k[i / per.max(1)];
                }
            } else {
                let n = *s.last().ok_or("scale_out needs rank ≥ 1")?;
                if k.len() != n {
                    return Err("scale_out: channel count".into());
                }
                for (i, x) in v.iter_mut().enumerate() {
                    *x *= k[i % n];
                }
            }
            make(s.to_vec(), v)
        }
        Helper::T => {
            let [r, c] = <[usize; 2]>::try_from(a.shape()).map_err(|_| "t needs a matrix")?;
            let v = (0..r * c).map(|i| av[(i % r) * c + i / r]).collect();
            make(vec![c, r], v)
        }
        Helper::LastAxis | Helper::EpsLike => Err("folded in make".into()),
    }
}

/// [`eval_helper`] on f32 weights (every weight so far) without f64 copies of them, the
/// same values where the f64 path rounds once ([`crate::dense`]); `None` where the helper
/// or the operands take the f64 path (small vectors, other dtypes, shapes it rejects).
fn eval_helper_f32(h: Helper, ks: &[Arc<Tensor>]) -> Result<Option<Tensor>, String> {
    use crate::dense;
    let f = |i: usize| ks.get(i).and_then(|t| t.as_slice::<f32>());
    let Some(a) = f(0) else {
        return Ok(None);
    };
    let shape = ks[0].shape();
    let t = match h {
        Helper::OnesLike => Tensor::from_vec(shape.to_vec(), vec![1.0f32; a.len()]),
        Helper::ZerosLike => Tensor::from_vec(shape.to_vec(), vec![0.0f32; a.len()]),
        Helper::Centre => {
            let n = *shape.last().ok_or("centre needs rank ≥ 1")?;
            Tensor::from_vec(shape.to_vec(), dense::centre_rows(a, n))
        }
        Helper::ScaleRows => {
            let (Some(w), [.., k, n]) = (f(1), ks.get(1).map_or(&[][..], |w| w.shape())) else {
                return Ok(None);
            };
            if shape != [*k] {
                return Ok(None);
            }
            Tensor::from_vec(ks[1].shape().to_vec(), dense::scale_rows(a, w, *n))
        }
        Helper::RowTimes => {
            let (Some(w), [k, n]) = (f(1), ks.get(1).map_or(&[][..], |w| w.shape())) else {
                return Ok(None);
            };
            if shape != [*k] {
                return Ok(None);
            }
            Tensor::from_vec(vec![*n], dense::row_times(a, w, *n))
        }
        Helper::T => {
            let [r, c] = <[usize; 2]>::try_from(shape).map_err(|_| "t needs a matrix")?;
            Tensor::from_vec(vec![c, r], dense::transpose(a, r, c))
        }
        _ => return Ok(None),
    };
    Ok(Some(t))
}

/// An f32 fact helper for tests.
#[cfg(test)]
pub fn f32_fact(dims: &[usize]) -> Fact {
    Fact::of(TensorType::new(kiln_ir::DType::F32, Shape::fixed(dims)))
}
