//! Shared loops of the data-movement families (layout, index, generate, resize): gathering
//! elements through an index map, walking multi-indices, reading integer operands, the
//! size limit on shapes computed from data, and symbolic size arithmetic for shape rules.
//!
//! Data-movement ops are written as "output element `i` comes from input element `map[i]`"
//! so that the one dtype-generic gather here serves all of them.

use super::Fact;
use crate::{DType, Dim, Elem, Shape, Tensor, TensorData, TensorType};
use std::collections::BTreeMap;

/// The most elements an op may create from sizes found in input data (2^31). Larger
/// requests are errors rather than allocations.
pub(crate) const MAX_ELEMS: usize = 1 << 31;

/// The element count of a shape computed from data, checked for overflow and the limit.
pub(crate) fn checked_numel(shape: &[usize]) -> Result<usize, String> {
    // Each dim on its own too: an empty tensor may still be walked along a huge axis.
    if let Some(d) = shape.iter().find(|&&d| d > MAX_ELEMS) {
        return Err(format!(
            "dim {d} of shape {shape:?} is over the limit of {MAX_ELEMS}"
        ));
    }
    let mut n: usize = 1;
    for &d in shape {
        n = n
            .checked_mul(d)
            .ok_or_else(|| format!("shape {shape:?} overflows"))?;
    }
    // A zero anywhere makes the count zero even if a prefix was huge.
    if shape.contains(&0) {
        return Ok(0);
    }
    if n > MAX_ELEMS {
        return Err(format!(
            "shape {shape:?} has {n} elements, more than the limit of {MAX_ELEMS}"
        ));
    }
    crate::limits::check(n, GATHERED_ELEM_BYTES, shape)?;
    Ok(n)
}

/// What one element of a data-movement op's output costs while it is made: its index in
/// the gather map (8 bytes) and the element itself (at most 8).
const GATHERED_ELEM_BYTES: usize = 16;

/// Converts a size read from data to usize, rejecting negatives.
pub(crate) fn to_size(x: i64, what: &str) -> Result<usize, String> {
    usize::try_from(x).map_err(|_| format!("{what} must be non-negative, got {x}"))
}

/// `data[map[i]]` for every `i`, in any dtype. Out-of-range entries are an error.
pub(crate) fn take(data: &TensorData, map: &[usize]) -> Result<TensorData, String> {
    crate::dispatch!(data, v, T => {
        let mut out: Vec<T> = Vec::with_capacity(map.len());
        for &i in map {
            out.push(*v.get(i).ok_or_else(|| format!("element index {i} is out of range"))?);
        }
        Ok(<T as Elem>::wrap(out))
    })
}

/// Like [`take`], with `None` entries filled by the single element of `fill` (which must
/// have the same dtype as `data`).
pub(crate) fn take_or(
    data: &TensorData,
    map: &[Option<usize>],
    fill: &TensorData,
) -> Result<TensorData, String> {
    crate::dispatch!(data, v, T => {
        let f: T = *<T as Elem>::unwrap(fill)
            .and_then(|f| f.first())
            .ok_or("the fill value must be one element of the data's dtype")?;
        let mut out: Vec<T> = Vec::with_capacity(map.len());
        for &i in map {
            out.push(match i {
                Some(i) => *v.get(i).ok_or_else(|| format!("element index {i} is out of range"))?,
                None => f,
            });
        }
        Ok(<T as Elem>::wrap(out))
    })
}

/// A tensor whose elements are `map`-selected elements of `x`.
pub(crate) fn gathered(x: &Tensor, shape: Vec<usize>, map: &[usize]) -> Result<Tensor, String> {
    Tensor::new(shape, take(x.data(), map)?)
}

/// Calls `f` with every multi-index of `shape`, in row-major order.
pub(crate) fn for_each_index(
    shape: &[usize],
    mut f: impl FnMut(&[usize]) -> Result<(), String>,
) -> Result<(), String> {
    if shape.contains(&0) {
        return Ok(());
    }
    let mut idx = vec![0usize; shape.len()];
    loop {
        f(&idx)?;
        let mut k = shape.len();
        loop {
            if k == 0 {
                return Ok(());
            }
            k -= 1;
            idx[k] += 1;
            if idx[k] < shape[k] {
                break;
            }
            idx[k] = 0;
        }
    }
}

/// Row-major strides of a shape.
pub(crate) fn strides(shape: &[usize]) -> Vec<usize> {
    crate::tensor::strides(shape)
}

/// The index map of a transpose of `shape` by `perm` (output dim `i` is input dim
/// `perm[i]`), and the output shape. `perm` must be a permutation (checked by callers).
pub(crate) fn transpose_map(shape: &[usize], perm: &[usize]) -> (Vec<usize>, Vec<usize>) {
    let st = strides(shape);
    let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let pst: Vec<usize> = perm.iter().map(|&p| st[p]).collect();
    let mut map = Vec::with_capacity(crate::tensor::numel(&out_shape));
    let _ = for_each_index(&out_shape, |ix| {
        map.push(ix.iter().zip(&pst).map(|(a, b)| a * b).sum());
        Ok(())
    });
    (map, out_shape)
}

/// Checks that `perm` is a permutation of `0..rank`.
pub(crate) fn check_perm(perm: &[i64], rank: usize) -> Result<Vec<usize>, String> {
    if perm.len() != rank {
        return Err(format!("perm {perm:?} does not have rank {rank} entries"));
    }
    let mut seen = vec![false; rank];
    let mut out = Vec::with_capacity(rank);
    for &p in perm {
        let a = axis(p, rank)?;
        if std::mem::replace(&mut seen[a], true) {
            return Err(format!("perm {perm:?} repeats axis {p}"));
        }
        out.push(a);
    }
    Ok(out)
}

/// The elements of an integer tensor as i64; an error for other dtypes.
pub(crate) fn ints(t: &Tensor, what: &str) -> Result<Vec<i64>, String> {
    if !t.dtype().is_int() {
        return Err(format!(
            "{what} must be an integer tensor, got {}",
            t.dtype()
        ));
    }
    if t.dtype() == DType::U64 {
        let v = t.as_slice::<u64>().unwrap_or(&[]);
        return v
            .iter()
            .map(|&x| i64::try_from(x).map_err(|_| format!("{what} value {x} is too large")))
            .collect();
    }
    Ok(t.to_i64s())
}

/// The single element of an integer tensor of one element.
pub(crate) fn int_scalar(t: &Tensor, what: &str) -> Result<i64, String> {
    let v = ints(t, what)?;
    match v.as_slice() {
        [x] => Ok(*x),
        _ => Err(format!("{what} must have one element, it has {}", v.len())),
    }
}

/// Normalises a possibly negative axis against a rank; unlike [`super::norm_axis`] a
/// scalar has no axis 0, since every caller here indexes dims with the result.
pub(crate) fn axis(a: i64, rank: usize) -> Result<usize, String> {
    let n = super::norm_axis(a, rank)?;
    if n >= rank {
        return Err(format!("axis {a} is out of range for rank {rank}"));
    }
    Ok(n)
}

/// Normalises a list of axes against a rank, rejecting repeats.
pub(crate) fn norm_axes(axes: &[i64], rank: usize) -> Result<Vec<usize>, String> {
    let mut out = Vec::with_capacity(axes.len());
    for &a in axes {
        let n = axis(a, rank)?;
        if out.contains(&n) {
            return Err(format!("axis {a} is repeated in {axes:?}"));
        }
        out.push(n);
    }
    Ok(out)
}

// ---- shape-rule helpers

/// A fact of the given dtype and shape.
pub(crate) fn fact(dtype: DType, shape: Shape) -> Fact {
    Fact::of(TensorType::new(dtype, shape))
}

/// A fact that also knows its contents as dims.
pub(crate) fn fact_dims(dtype: DType, shape: Shape, dims: Option<Vec<Dim>>) -> Fact {
    Fact {
        ty: TensorType::new(dtype, shape),
        konst: None,
        dims,
    }
}

/// The constant contents of an integer fact as i64, when known.
pub(crate) fn const_ints(f: &Fact) -> Option<Vec<i64>> {
    let k = f.konst.as_ref()?;
    ints(k, "").ok()
}

/// The contents of a rank-0/1 integer fact as dims, or as unknowns when only its length is
/// known.
pub(crate) fn dims_or_len(f: &Fact) -> Option<Vec<Dim>> {
    if let Some(d) = f.value_dims() {
        return Some(d);
    }
    match f.ty.shape.dims()? {
        [] => Some(vec![Dim::Unknown]),
        [Dim::Fixed(n)] if *n <= 1 << 16 => Some(vec![Dim::Unknown; *n as usize]),
        _ => None,
    }
}

/// A product of dims as a constant times a multiset of symbols.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Mono {
    k: u64,
    syms: BTreeMap<String, u32>,
}

impl Mono {
    /// The product of `dims`; `None` if one is unknown or the constant overflows.
    pub(crate) fn of(dims: &[Dim]) -> Option<Mono> {
        let mut m = Mono {
            k: 1,
            syms: BTreeMap::new(),
        };
        for d in dims {
            match d {
                Dim::Fixed(n) => m.k = m.k.checked_mul(*n)?,
                Dim::Sym(s) => *m.syms.entry(s.clone()).or_default() += 1,
                Dim::Unknown => return None,
            }
        }
        Some(m)
    }

    /// `self / other` when it is exact (every symbol of `other` cancels, the constant
    /// divides).
    pub(crate) fn div(&self, other: &Mono) -> Option<Mono> {
        if other.k == 0 || !self.k.is_multiple_of(other.k) {
            return None;
        }
        let mut syms = self.syms.clone();
        for (s, &n) in &other.syms {
            let e = syms.get_mut(s)?;
            if *e < n {
                return None;
            }
            *e -= n;
            if *e == 0 {
                syms.remove(s);
            }
        }
        Some(Mono {
            k: self.k / other.k,
            syms,
        })
    }

    /// As one dim, when it is a constant or a single symbol.
    pub(crate) fn to_dim(&self) -> Dim {
        if self.k == 0 {
            return Dim::Fixed(0);
        }
        let n: u32 = self.syms.values().sum();
        match n {
            0 => Dim::Fixed(self.k),
            1 if self.k == 1 => Dim::Sym(self.syms.keys().next().cloned().unwrap_or_default()),
            _ => Dim::Unknown,
        }
    }
}

/// The product of dims as one dim (`Unknown` unless constant or a single symbol).
pub(crate) fn dim_product(dims: &[Dim]) -> Dim {
    Mono::of(dims).map(|m| m.to_dim()).unwrap_or(Dim::Unknown)
}

/// `a * k` for a dim and a constant.
pub(crate) fn dim_mul(a: &Dim, k: u64) -> Dim {
    match (a, k) {
        (_, 0) => Dim::Fixed(0),
        (d, 1) => d.clone(),
        (Dim::Fixed(n), k) => n.checked_mul(k).map(Dim::Fixed).unwrap_or(Dim::Unknown),
        _ => Dim::Unknown,
    }
}

/// Merges two dims that must be equal; `Err` if both are known and differ.
pub(crate) fn unify(a: &Dim, b: &Dim) -> Result<Dim, String> {
    Ok(match (a, b) {
        (Dim::Fixed(x), Dim::Fixed(y)) if x != y => {
            return Err(format!("dims {x} and {y} must be equal"))
        }
        (Dim::Fixed(_), _) => a.clone(),
        (_, Dim::Fixed(_)) => b.clone(),
        (Dim::Sym(x), Dim::Sym(y)) if x == y => a.clone(),
        (Dim::Sym(_), Dim::Unknown) => a.clone(),
        (Dim::Unknown, Dim::Sym(_)) => b.clone(),
        _ => Dim::Unknown,
    })
}
