//! Binding a loop kernel to run-time tensors: the concrete domain (symbolic dims bound
//! from the inputs), the row length, and each input's element offset for every row.

use crate::loop_ir::{InnerAccess, LoopKernel};
use kiln_ir::{DType, Dim, Tensor};

/// A loop kernel's concrete iteration space for one call.
#[derive(Clone, Debug, PartialEq)]
pub struct LoopShape {
    /// The concrete domain shape (every output's shape).
    pub shape: Vec<usize>,
    /// The inner row length (the domain's last dim; 1 for rank 0).
    pub n: usize,
    /// Number of rows (the product of the other dims).
    pub rows: usize,
    /// Per input: its element stride for each outer domain dim (0 where broadcast).
    strides: Vec<Vec<usize>>,
}

impl LoopShape {
    /// Binds `k` to `inputs` (one per kernel input, in order), checking dtypes, the static
    /// shape and the inner access of each input.
    pub fn bind(k: &LoopKernel, inputs: &[&Tensor]) -> Result<LoopShape, String> {
        if inputs.len() != k.inputs.len() {
            return Err(format!(
                "loop kernel takes {} inputs, got {}",
                k.inputs.len(),
                inputs.len()
            ));
        }
        let rank = k.shape.len();
        let mut shape: Vec<usize> = vec![1; rank];
        if inputs.is_empty() {
            for (s, d) in shape.iter_mut().zip(&k.shape) {
                *s = d
                    .fixed()
                    .ok_or("a loop kernel without inputs needs fixed dims")?
                    as usize;
            }
        }
        for t in inputs {
            if t.dtype() != DType::F32 {
                return Err(format!("loop kernel input is {}, not f32", t.dtype()));
            }
            if t.rank() > rank {
                return Err(format!("input {:?} has rank above {rank}", t.shape()));
            }
            let off = rank - t.rank();
            for (i, &d) in t.shape().iter().enumerate() {
                let s = &mut shape[off + i];
                if *s == 1 {
                    *s = d;
                } else if d != 1 && d != *s {
                    return Err(format!(
                        "input {:?} does not broadcast to {shape:?}",
                        t.shape()
                    ));
                }
            }
        }
        for (s, d) in shape.iter().zip(&k.shape) {
            if let Dim::Fixed(f) = d {
                if *f != *s as u64 {
                    return Err(format!("domain {shape:?} does not match {:?}", k.shape));
                }
            }
        }
        // An all-broadcast input set would leave a size-1 dim where the static type names a
        // larger fixed size; that was rejected above.
        let n = shape.last().copied().unwrap_or(1);
        let mut rows: usize = 1;
        for &d in shape.iter().take(rank.saturating_sub(1)) {
            rows = rows.checked_mul(d).ok_or("domain size overflows")?;
        }
        rows.checked_mul(n).ok_or("domain size overflows")?;
        let mut strides = vec![];
        for (t, spec) in inputs.iter().zip(&k.inputs) {
            let off = rank - t.rank();
            let last = if t.rank() == 0 {
                1
            } else {
                t.shape()[t.rank() - 1]
            };
            let ok = match spec.inner {
                InnerAccess::Contiguous => t.rank() > 0 && last == n,
                InnerAccess::Broadcast => last == 1,
            };
            if !ok {
                return Err(format!(
                    "input {:?} cannot be read {:?} along a row of {n}",
                    t.shape(),
                    spec.inner
                ));
            }
            let mut st = vec![0usize; rank.saturating_sub(1)];
            let mut acc = 1usize;
            for i in (0..t.rank()).rev() {
                let d = t.shape()[i];
                if off + i + 1 < rank && d != 1 {
                    st[off + i] = acc;
                }
                acc = acc.saturating_mul(d);
            }
            strides.push(st);
        }
        Ok(LoopShape {
            shape,
            n,
            rows,
            strides,
        })
    }

    /// Total elements in the domain.
    pub fn numel(&self) -> usize {
        self.rows * self.n
    }

    /// Calls `f(row, offsets)` for every row in order, where `offsets[i]` is input `i`'s
    /// element offset of that row's start (the output row starts at `row * n`).
    pub fn for_each_row(&self, f: impl FnMut(usize, &[usize])) {
        self.for_rows(0, self.rows, f)
    }

    /// Like [`LoopShape::for_each_row`] for the rows `lo..hi` only (clamped to the domain),
    /// so disjoint row ranges can run on different threads.
    pub fn for_rows(&self, lo: usize, hi: usize, mut f: impl FnMut(usize, &[usize])) {
        let hi = hi.min(self.rows);
        if self.n == 0 || lo >= hi {
            return;
        }
        let outer = &self.shape[..self.shape.len().saturating_sub(1)];
        // The odometer position of row `lo`.
        let mut idx = vec![0usize; outer.len()];
        let mut rest = lo;
        for d in (0..outer.len()).rev() {
            idx[d] = rest % outer[d];
            rest /= outer[d];
        }
        let mut offs: Vec<usize> = self
            .strides
            .iter()
            .map(|st| idx.iter().zip(st).map(|(i, s)| i * s).sum())
            .collect();
        for r in lo..hi {
            f(r, &offs);
            // Odometer step over the outer dims.
            for d in (0..outer.len()).rev() {
                idx[d] += 1;
                for (o, st) in offs.iter_mut().zip(&self.strides) {
                    *o += st[d];
                }
                if idx[d] < outer[d] {
                    break;
                }
                for (o, st) in offs.iter_mut().zip(&self.strides) {
                    *o -= st[d] * outer[d];
                }
                idx[d] = 0;
            }
        }
    }
}
