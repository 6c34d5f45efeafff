//! Transpose as a copy: the permutation reduced to its fewest dims (size-1 dims dropped,
//! dims that stay neighbours merged), then whole rows copied where the innermost dim keeps
//! its place, and square tiles of the plane that swaps it transposed otherwise.
//!
//! `[1, 512, 64, 1]` permuted by `[2, 0, 1, 3]` is a 64 × 512 plane transposed: element by
//! element with an odometer per value it cost about 5 ns a value; in 16 × 16 tiles each
//! side of the copy touches whole cache lines.

/// Side of a transposed tile: 16 rows of 16 f32 are 16 cache lines read and 16 written.
const TILE: usize = 16;

/// A permutation of a row-major tensor, reduced to its fewest dims.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Permute {
    /// The reduced output dims (no 1s), outermost first.
    dims: Vec<usize>,
    /// Per reduced output dim: its element stride in the input.
    in_st: Vec<usize>,
    /// Per reduced output dim: its element stride in the (contiguous) output.
    out_st: Vec<usize>,
    /// How the work is cut into independent units.
    shape: Shape,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    /// One unit per output row: the innermost dim is contiguous on both sides.
    Rows { len: usize },
    /// The innermost output dim is strided in the input; dim `p` is the input's contiguous
    /// one. One unit per band of `TILE` values of dim `p` in every plane.
    Tiles { p: usize, bands: usize },
}

impl Permute {
    /// The reduced form of permuting a tensor of `shape` by `perm` (output dim `i` is input
    /// dim `perm[i]`). `perm` must be a permutation of `0..shape.len()`.
    pub fn new(shape: &[usize], perm: &[usize]) -> Permute {
        let st = kiln_ir::tensor::strides(shape);
        let mut dims: Vec<usize> = vec![];
        let mut in_st: Vec<usize> = vec![];
        for &a in perm {
            let (d, s) = (shape[a], st[a]);
            if d == 1 {
                continue;
            }
            match (dims.last_mut(), in_st.last_mut()) {
                // The previous output dim steps over exactly this one in the input too.
                (Some(pd), Some(ps)) if *ps == s * d => {
                    *pd *= d;
                    *ps = s;
                }
                _ => {
                    dims.push(d);
                    in_st.push(s);
                }
            }
        }
        let mut out_st = vec![1usize; dims.len()];
        for i in (0..dims.len().saturating_sub(1)).rev() {
            out_st[i] = out_st[i + 1] * dims[i + 1];
        }
        let shape = match (dims.last(), in_st.last()) {
            (Some(&len), Some(&1)) => Shape::Rows { len },
            (Some(_), Some(_)) => {
                // Some output dim is the input's innermost (stride 1), and not the last one.
                let p = in_st.iter().position(|&s| s == 1).unwrap_or(0);
                Shape::Tiles {
                    p,
                    bands: dims[p].div_ceil(TILE),
                }
            }
            // No dim left: one value.
            _ => Shape::Rows { len: 1 },
        };
        Permute {
            dims,
            in_st,
            out_st,
            shape,
        }
    }

    /// The number of independent units of work, for splitting over threads.
    pub fn units(&self) -> usize {
        let all: usize = self.dims.iter().product();
        match self.shape {
            Shape::Rows { len } => all / len.max(1),
            Shape::Tiles { p, bands } => {
                let last = *self.dims.last().unwrap_or(&1);
                all / (self.dims[p] * last) * bands
            }
        }
    }

    /// Copies units `lo..hi` (clamped to [`Permute::units`]) of the permutation of `src`
    /// into `dst`, the contiguous output.
    ///
    /// # Safety
    /// `dst` must be valid for writes of `src.len()` values (the output's size), with no
    /// other writer of the units `lo..hi` at the same time.
    pub unsafe fn run<T: Copy>(&self, src: &[T], dst: *mut T, lo: usize, hi: usize) {
        let hi = hi.min(self.units());
        if lo >= hi {
            return;
        }
        match self.shape {
            Shape::Rows { len } => {
                let outer = self.dims.len().saturating_sub(1);
                let (dims, st) = (&self.dims[..outer], &self.in_st[..outer]);
                // The odometer over the outer dims, from row `lo`.
                let mut idx = vec![0usize; outer];
                let mut rest = lo;
                for d in (0..outer).rev() {
                    idx[d] = rest % dims[d];
                    rest /= dims[d];
                }
                let mut from: usize = idx.iter().zip(st).map(|(i, s)| i * s).sum();
                for u in lo..hi {
                    // SAFETY: row u covers dst[u·len ..][..len] (the output has units·len
                    // values), and `from..from+len` is one input row.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            src[from..from + len].as_ptr(),
                            dst.add(u * len),
                            len,
                        )
                    };
                    for d in (0..outer).rev() {
                        idx[d] += 1;
                        from += st[d];
                        if idx[d] < dims[d] {
                            break;
                        }
                        from -= st[d] * dims[d];
                        idx[d] = 0;
                    }
                }
            }
            Shape::Tiles { p, bands } => {
                let k = self.dims.len();
                let (rows, cols) = (self.dims[p], self.dims[k - 1]);
                let (col_in, row_out) = (self.in_st[k - 1], self.out_st[p]);
                // The plane dims (p and the last) are left out of the odometer.
                let others: Vec<usize> = (0..k - 1).filter(|&d| d != p).collect();
                let o_dims: Vec<usize> = others.iter().map(|&d| self.dims[d]).collect();
                let o_in: Vec<usize> = others.iter().map(|&d| self.in_st[d]).collect();
                let o_out: Vec<usize> = others.iter().map(|&d| self.out_st[d]).collect();
                for u in lo..hi {
                    let (plane, band) = (u / bands, u % bands);
                    let from = offset(plane, &o_dims, &o_in);
                    let to = offset(plane, &o_dims, &o_out);
                    let (r0, r1) = (band * TILE, ((band + 1) * TILE).min(rows));
                    for c0 in (0..cols).step_by(TILE) {
                        let c1 = (c0 + TILE).min(cols);
                        for r in r0..r1 {
                            let o = to + r * row_out;
                            for c in c0..c1 {
                                // SAFETY: (r, c) lies in the plane, so the index is inside
                                // the output; each (plane, band) is one unit's alone.
                                unsafe { *dst.add(o + c) = src[from + r + c * col_in] };
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The offset of odometer position `u` over `dims` (outermost first) with `strides`.
fn offset(mut u: usize, dims: &[usize], strides: &[usize]) -> usize {
    let mut off = 0;
    for (&d, &s) in dims.iter().zip(strides).rev() {
        off += (u % d) * s;
        u /= d;
    }
    off
}

#[cfg(test)]
mod tests {
    use super::Permute;

    /// The permutation by the definition: output index → input index, one value at a time.
    fn by_definition(shape: &[usize], perm: &[usize], src: &[u32]) -> Vec<u32> {
        let st = kiln_ir::tensor::strides(shape);
        let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
        let n = src.len();
        (0..n)
            .map(|mut i| {
                let mut from = 0;
                for (d, &p) in perm.iter().enumerate().rev() {
                    from += (i % out_shape[d]) * st[p];
                    i /= out_shape[d];
                }
                src[from]
            })
            .collect()
    }

    #[test]
    fn every_reduced_form_matches_the_definition_in_any_split() {
        let cases: [(&[usize], &[usize]); 9] = [
            (&[1, 512, 64, 1], &[2, 0, 1, 3]),
            (&[3, 37, 19], &[0, 2, 1]),
            (&[2, 3, 4, 5], &[3, 1, 0, 2]),
            (&[2, 3, 4, 5], &[0, 2, 3, 1]),
            (&[2, 3, 4, 5], &[0, 1, 2, 3]),
            (&[5, 1, 33], &[2, 1, 0]),
            (&[1, 1], &[1, 0]),
            (&[7], &[0]),
            (&[17, 2, 40], &[1, 2, 0]),
        ];
        for (shape, perm) in cases {
            let n: usize = shape.iter().product();
            let src: Vec<u32> = (0..n as u32).collect();
            let want = by_definition(shape, perm, &src);
            let p = Permute::new(shape, perm);
            let units = p.units();
            for cut in [1, 2, 3, 7] {
                let mut got = vec![u32::MAX; n];
                let step = units.div_ceil(cut).max(1);
                for lo in (0..units).step_by(step) {
                    // SAFETY: `got` holds n values; the ranges are disjoint.
                    unsafe { p.run(&src, got.as_mut_ptr(), lo, lo + step) };
                }
                assert_eq!(
                    got, want,
                    "shape {shape:?} perm {perm:?} in {cut} parts ({p:?})"
                );
            }
        }
    }

    #[test]
    fn neighbouring_dims_merge_and_ones_drop() {
        // [1, 512, 64, 1] by [2, 0, 1, 3]: a 64 × 512 plane.
        let p = Permute::new(&[1, 512, 64, 1], &[2, 0, 1, 3]);
        assert_eq!(
            (p.dims.as_slice(), p.in_st.as_slice()),
            (&[64, 512][..], &[1, 64][..])
        );
        // Heads split [B, S, H, D] -> [B, H, S, D] keeps D rows.
        let p = Permute::new(&[2, 8, 4, 16], &[0, 2, 1, 3]);
        assert_eq!(p.dims, vec![2, 4, 8, 16]);
        // The identity is one row.
        let p = Permute::new(&[2, 3, 4], &[0, 1, 2]);
        assert_eq!(p.dims, vec![24]);
    }
}
