//! Binding a loop kernel to run-time tensors: the concrete domain (symbolic dims bound
//! from the inputs), the row length, and each input's element offset for every row.

use crate::loop_ir::{Expr, InnerAccess, LoopKernel};
use kiln_ir::{DType, Dim, Tensor};
use smallvec::SmallVec;

/// Per-dim or per-input numbers of one binding, inline up to rank 6 / 6 inputs (a loop
/// kernel is bound once per call; on graphs of small kernels the heap traffic showed).
pub type Small = SmallVec<[usize; 6]>;

/// A loop kernel's concrete iteration space for one call.
#[derive(Clone, Debug, PartialEq)]
pub struct LoopShape {
    /// The concrete domain shape (every output's shape).
    pub shape: Vec<usize>,
    /// The row length: the domain's last dim (1 for rank 0), times the outer dims folded
    /// into it ([`MIN_ROW`]).
    pub n: usize,
    /// Number of rows (the product of the outer dims).
    pub rows: usize,
    /// The outer dims: the domain's dims before the row, less those folded into it.
    outer: Small,
    /// Per input: its element stride for each outer dim (0 where broadcast).
    strides: SmallVec<[Small; 6]>,
}

/// Rows shorter than this take in the outer dims next to them where every input continues
/// its row there (contiguous inputs) or stays put (inputs broadcast along the row), unless
/// the kernel's meaning depends on the row (a reduction, the row length): a domain like
/// `[64, 1, 512, 1]` is then one row of 32,768 values, not 32,768 rows of one. Rows are not
/// merged past this, so a big kernel keeps rows to split between threads.
pub const MIN_ROW: usize = 1024;

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
        let mut strides: SmallVec<[Small; 6]> = SmallVec::new();
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
            let mut st: Small = smallvec::smallvec![0usize; rank.saturating_sub(1)];
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
        let mut outer: Small = shape[..rank.saturating_sub(1)].iter().copied().collect();
        let (mut n, mut rows) = (n, rows);
        let row_bound = !k.reductions.is_empty()
            || k.exprs
                .iter()
                .any(|e| matches!(e, Expr::RowLen | Expr::Reduced(_)));
        while let (Some(&d), false) = (outer.last(), row_bound) {
            let last = outer.len() - 1;
            let continues = d == 1
                || k.inputs
                    .iter()
                    .zip(&strides)
                    .all(|(spec, st)| match spec.inner {
                        InnerAccess::Contiguous => st[last] == n,
                        InnerAccess::Broadcast => st[last] == 0,
                    });
            if d == 0 || n == 0 || n >= MIN_ROW || !continues {
                break;
            }
            n *= d;
            rows /= d;
            outer.pop();
            for st in &mut strides {
                st.pop();
            }
        }
        Ok(LoopShape {
            shape,
            n,
            rows,
            outer,
            strides,
        })
    }

    /// Total elements in the domain.
    pub fn numel(&self) -> usize {
        self.rows * self.n
    }

    /// Per input: its element stride between consecutive rows of a run (the stride of the
    /// domain's last outer dim; 0 where broadcast, and for a domain without outer dims).
    pub fn run_strides(&self) -> Small {
        self.strides
            .iter()
            .map(|st| st.last().copied().unwrap_or(0))
            .collect()
    }

    /// Calls `f(row, offsets, m)` for the rows `lo..hi` (clamped to the domain) in runs: `m`
    /// consecutive rows along the domain's last outer dim, starting at `row`, where input `i`'s
    /// rows start at `offsets[i] + r * run_strides()[i]` for `r < m`. A row function that
    /// walks a run itself pays one call per run, not per row (rows of 16 elements cost more
    /// in the call than in the work).
    pub fn for_row_runs(&self, lo: usize, hi: usize, mut f: impl FnMut(usize, &[usize], usize)) {
        let hi = hi.min(self.rows);
        if self.n == 0 || lo >= hi {
            return;
        }
        let outer = &self.outer;
        let Some(&run_len) = outer.last() else {
            // No outer dims: the single row is its own run.
            let zeros: Small = smallvec::smallvec![0; self.strides.len()];
            f(lo, &zeros, 1);
            return;
        };
        let last = outer.len() - 1;
        let mut idx: Small = smallvec::smallvec![0usize; outer.len()];
        let mut rest = lo;
        for d in (0..outer.len()).rev() {
            idx[d] = rest % outer[d];
            rest /= outer[d];
        }
        let mut offs: Small = self
            .strides
            .iter()
            .map(|st| idx.iter().zip(st).map(|(i, s)| i * s).sum())
            .collect();
        let mut r = lo;
        while r < hi {
            let m = (run_len - idx[last]).min(hi - r);
            f(r, &offs, m);
            r += m;
            // Step past the run, then carry through the outer dims like an odometer.
            idx[last] += m;
            for (o, st) in offs.iter_mut().zip(&self.strides) {
                *o += st[last] * m;
            }
            for d in (0..outer.len()).rev() {
                if idx[d] < outer[d] {
                    break;
                }
                for (o, st) in offs.iter_mut().zip(&self.strides) {
                    *o -= st[d] * outer[d];
                }
                idx[d] = 0;
                if d > 0 {
                    idx[d - 1] += 1;
                    for (o, st) in offs.iter_mut().zip(&self.strides) {
                        *o += st[d - 1];
                    }
                }
            }
        }
    }

    /// Calls `f(row, offsets)` for every row in order, where `offsets[i]` is input `i`'s
    /// element offset of that row's start (the output row starts at `row * n`).
    pub fn for_each_row(&self, f: impl FnMut(usize, &[usize])) {
        self.for_rows(0, self.rows, f)
    }

    /// Like [`LoopShape::for_each_row`] for the rows `lo..hi` only (clamped to the domain),
    /// so disjoint row ranges can run on different threads.
    pub fn for_rows(&self, lo: usize, hi: usize, mut f: impl FnMut(usize, &[usize])) {
        let st = self.run_strides();
        let mut row_offs: Small = smallvec::smallvec![0; st.len()];
        self.for_row_runs(lo, hi, |row, offs, m| {
            for r in 0..m {
                for ((o, &base), &s) in row_offs.iter_mut().zip(offs).zip(&st) {
                    *o = base + r * s;
                }
                f(row + r, &row_offs);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::{LoopShape, Small, MIN_ROW};
    use crate::loop_ir::{BinOp, Expr, InnerAccess, LoopKernel, RedOp};
    use kiln_ir::{Dim, Tensor, ValueId};

    /// `x + y` over a domain of `dims`, `y` read with `y_inner`; with `reduce`, a row sum too.
    fn add_kernel(dims: &[u64], y_inner: InnerAccess, reduce: bool) -> LoopKernel {
        let mut k = LoopKernel::new(dims.iter().map(|&d| Dim::Fixed(d)).collect());
        let x = k.load(ValueId(0), InnerAccess::Contiguous);
        let y = k.load(ValueId(1), y_inner);
        let mut e = k.push(Expr::Bin(BinOp::Add, x, y));
        if reduce {
            let r = k.reduce(RedOp::Sum, x);
            e = k.push(Expr::Bin(BinOp::Add, e, r));
        }
        k.outputs.push((ValueId(2), e));
        k
    }

    fn zeros(shape: &[usize]) -> Tensor {
        Tensor::from_vec(shape.to_vec(), vec![0.0f32; shape.iter().product()])
    }

    #[test]
    fn short_rows_take_in_the_outer_dims_their_inputs_continue_in() {
        // Trailing and inner 1s, all contiguous: one row of everything.
        let k = add_kernel(&[64, 1, 512, 1], InnerAccess::Contiguous, false);
        let (x, y) = (zeros(&[64, 1, 512, 1]), zeros(&[64, 1, 512, 1]));
        let ls = LoopShape::bind(&k, &[&x, &y]).unwrap();
        assert_eq!(
            (ls.n, ls.rows, ls.shape.clone()),
            (64 * 512, 1, vec![64, 1, 512, 1])
        );
        // y broadcast along the row ([64, 512, 1]): it changes from row to row, so nothing
        // merges past its row dim.
        let k = add_kernel(&[64, 512, 16], InnerAccess::Broadcast, false);
        let (x, y) = (zeros(&[64, 512, 16]), zeros(&[64, 512, 1]));
        let ls = LoopShape::bind(&k, &[&x, &y]).unwrap();
        assert_eq!((ls.n, ls.rows), (16, 64 * 512));
        // y a row vector shared by every row: x continues, y does not.
        let k = add_kernel(&[8, 16], InnerAccess::Contiguous, false);
        let (x, y) = (zeros(&[8, 16]), zeros(&[16]));
        let ls = LoopShape::bind(&k, &[&x, &y]).unwrap();
        assert_eq!((ls.n, ls.rows), (16, 8));
        // A row reduction keeps its rows.
        let k = add_kernel(&[64, 1, 8], InnerAccess::Contiguous, true);
        let (x, y) = (zeros(&[64, 1, 8]), zeros(&[64, 1, 8]));
        let ls = LoopShape::bind(&k, &[&x, &y]).unwrap();
        assert_eq!((ls.n, ls.rows), (8, 64));
        // Rows stop growing at MIN_ROW, so big kernels keep rows for the threads.
        let k = add_kernel(&[64, 80, 80], InnerAccess::Contiguous, false);
        let (x, y) = (zeros(&[64, 80, 80]), zeros(&[64, 80, 80]));
        let ls = LoopShape::bind(&k, &[&x, &y]).unwrap();
        assert!(ls.n >= MIN_ROW && ls.rows > 1, "{ls:?}");
        assert_eq!((ls.n, ls.rows), (6400, 64));
    }

    /// Every (row, offsets) of `for_rows`, expanded from the runs of `for_row_runs`.
    fn expanded_runs(ls: &LoopShape, lo: usize, hi: usize) -> Vec<(usize, Vec<usize>)> {
        let st = ls.run_strides();
        let mut v = vec![];
        ls.for_row_runs(lo, hi, |row, offs, m| {
            assert!(m >= 1);
            for r in 0..m {
                v.push((
                    row + r,
                    offs.iter().zip(&st).map(|(o, s)| o + r * s).collect(),
                ));
            }
        });
        v
    }

    /// Row `row`'s input offsets by the definition: its index over the outer dims, times
    /// each input's strides.
    fn offsets_of(ls: &LoopShape, row: usize) -> Vec<usize> {
        let mut idx = vec![0; ls.outer.len()];
        let mut rest = row;
        for d in (0..ls.outer.len()).rev() {
            idx[d] = rest % ls.outer[d];
            rest /= ls.outer[d];
        }
        ls.strides
            .iter()
            .map(|st| idx.iter().zip(st).map(|(i, s)| i * s).sum())
            .collect()
    }

    #[test]
    fn row_runs_cover_the_rows_in_order() {
        // Domain [3, 4, 5, n=2]: input 0 contiguous over all of it, input 1 broadcast over
        // the middle dim, input 2 broadcast over the run dim.
        let ls = LoopShape {
            shape: vec![3, 4, 5, 2],
            n: 2,
            rows: 60,
            outer: [3, 4, 5].into_iter().collect(),
            strides: [[40, 10, 2], [10, 0, 2], [8, 2, 0]]
                .into_iter()
                .map(|st| st.into_iter().collect())
                .collect(),
        };
        for (lo, hi) in [
            (0, 60),
            (0, 7),
            (3, 4),
            (4, 23),
            (19, 61),
            (59, 60),
            (10, 10),
        ] {
            let want: Vec<(usize, Vec<usize>)> =
                (lo..hi.min(60)).map(|r| (r, offsets_of(&ls, r))).collect();
            assert_eq!(expanded_runs(&ls, lo, hi), want, "runs, rows {lo}..{hi}");
            let mut rows = vec![];
            ls.for_rows(lo, hi, |row, offs| rows.push((row, offs.to_vec())));
            assert_eq!(rows, want, "rows {lo}..{hi}");
        }
        // Rank 1: one row, one run.
        let ls = LoopShape {
            shape: vec![7],
            n: 7,
            rows: 1,
            outer: Small::new(),
            strides: [Small::new()].into_iter().collect(),
        };
        assert_eq!(expanded_runs(&ls, 0, 1), vec![(0, vec![0])]);
    }
}
