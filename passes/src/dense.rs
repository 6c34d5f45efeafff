//! The f32 loops the passes fold weights with (row means, centring, row scales, `b·W`,
//! transposes): read in place, written once, each element rounded once from its exact
//! or f64 value, as the f64 reference paths they replace. Compile time of a stacked
//! transformer is mostly this data work (issue 18), so the loops avoid f64 copies of whole
//! weights and split large tensors over the cores.

/// Independent partial sums of a row mean: enough to hide the f64 add latency.
const MEAN_LANES: usize = 4;
/// Tensors with fewer elements than this are folded on one thread.
const PAR_MIN_ELEMS: usize = 1 << 18;
/// The side of a transpose tile (f32: a 16 KiB tile pair stays in L1).
const T_TILE: usize = 32;

/// The mean of `row` in f64: [`MEAN_LANES`] partial sums in a fixed order, so the result is
/// the same on every machine and every call.
pub fn row_mean(row: &[f32]) -> f64 {
    let mut acc = [0.0f64; MEAN_LANES];
    let mut chunks = row.chunks_exact(MEAN_LANES);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += x as f64;
        }
    }
    let tail: f64 = chunks.remainder().iter().map(|&x| x as f64).sum();
    ((acc[0] + acc[1]) + (acc[2] + acc[3]) + tail) / row.len().max(1) as f64
}

/// Whether `row`'s mean is zero within `rtol` of its largest magnitude (and finite).
pub fn row_mean_free(row: &[f32], rtol: f64) -> bool {
    let m = row.iter().fold(0.0f32, |m, &x| m.max(x.abs())) as f64;
    let mean = row_mean(row);
    mean.is_finite() && mean.abs() <= rtol * m.max(f64::MIN_POSITIVE)
}

/// How many threads fold a tensor of `len` elements.
fn threads_for(len: usize) -> usize {
    if len < PAR_MIN_ELEMS {
        return 1;
    }
    std::thread::available_parallelism().map_or(1, |n| n.get().min(len / PAR_MIN_ELEMS).max(1))
}

/// Fills `out` (rows of `n`) from `f(first_row, rows_out)`, split by whole rows over the cores.
fn par_rows(out: &mut [f32], n: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let rows = out.len().checked_div(n).unwrap_or(0);
    let t = threads_for(out.len());
    if t <= 1 || rows < 2 {
        f(0, out);
        return;
    }
    let per = rows.div_ceil(t);
    std::thread::scope(|s| {
        for (i, part) in out.chunks_mut(per * n).enumerate() {
            let f = &f;
            s.spawn(move || f(i * per, part));
        }
    });
}

/// `v` (rows of `n`) minus each row's [`row_mean`], each element rounded once.
pub fn centre_rows(v: &[f32], n: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; v.len()];
    if n == 0 {
        return out;
    }
    par_rows(&mut out, n, |r0, o| {
        for (i, orow) in o.chunks_mut(n).enumerate() {
            let row = &v[(r0 + i) * n..(r0 + i + 1) * n];
            let m = row_mean(row);
            for (y, &x) in orow.iter_mut().zip(row) {
                *y = (x as f64 - m) as f32;
            }
        }
    });
    out
}

/// `w` (`[.., K, N]`) with row `i mod K` scaled by `g[i]`: diag(g)·W per matrix. An f32
/// product is the exact product rounded once.
pub fn scale_rows(g: &[f32], w: &[f32], n: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; w.len()];
    let k = g.len().max(1);
    if n == 0 {
        return out;
    }
    par_rows(&mut out, n, |r0, o| {
        for (i, orow) in o.chunks_mut(n).enumerate() {
            let r = r0 + i;
            let s = g.get(r % k).copied().unwrap_or(0.0);
            for (y, &x) in orow.iter_mut().zip(&w[r * n..(r + 1) * n]) {
                *y = x * s;
            }
        }
    });
    out
}

/// `b·W` for `b` `[K]` and `W` `[K, N]`: f64 sums in the order of `i`, rounded once.
pub fn row_times(b: &[f32], w: &[f32], n: usize) -> Vec<f32> {
    let mut acc = vec![0.0f64; n];
    for (i, &bi) in b.iter().enumerate() {
        let bi = bi as f64;
        for (a, &x) in acc.iter_mut().zip(&w[i * n..(i + 1) * n]) {
            *a += bi * x as f64;
        }
    }
    acc.into_iter().map(|x| x as f32).collect()
}

/// The transpose of the `[r, c]` matrix `v`, in tiles.
pub fn transpose(v: &[f32], r: usize, c: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; r * c];
    if r == 0 || c == 0 {
        return out;
    }
    // Output rows are input columns: split the output by rows of `r`.
    par_rows(&mut out, r, |c0, o| {
        let cols = o.len() / r;
        for cb in (0..cols).step_by(T_TILE) {
            for rb in (0..r).step_by(T_TILE) {
                for j in cb..(cb + T_TILE).min(cols) {
                    let src_col = c0 + j;
                    for i in rb..(rb + T_TILE).min(r) {
                        o[j * r + i] = v[i * c + src_col];
                    }
                }
            }
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let h = (i as u32).wrapping_mul(2654435761) ^ seed.wrapping_mul(40503);
                (h % 20011) as f32 / 10007.0 - 1.0
            })
            .collect()
    }

    /// Sizes below and above the threading threshold, with ragged tiles.
    const SHAPES: [(usize, usize); 4] = [(3, 5), (33, 70), (700, 513), (1, 1)];

    #[test]
    fn folds_match_their_f64_definitions() {
        for (s, &(r, c)) in SHAPES.iter().enumerate() {
            let v = data(r * c, s as u32);
            let g = data(r, 99 + s as u32);
            let t = transpose(&v, r, c);
            let sr = scale_rows(&g, &v, c);
            let ce = centre_rows(&v, c);
            for i in 0..r {
                let m = v[i * c..(i + 1) * c].iter().map(|&x| x as f64).sum::<f64>() / c as f64;
                for j in 0..c {
                    let x = v[i * c + j];
                    assert_eq!(t[j * r + i].to_bits(), x.to_bits(), "transpose {r}x{c}");
                    let want = (x as f64 * g[i] as f64) as f32;
                    assert_eq!(sr[i * c + j].to_bits(), want.to_bits(), "scale_rows");
                    // Only the summation order of the mean differs from the plain sum.
                    let want = (x as f64 - m) as f32;
                    assert!((ce[i * c + j] - want).abs() <= 1e-6, "centre {r}x{c}");
                }
                assert!(row_mean_free(&ce[i * c..(i + 1) * c], 1e-5) || c == 1);
            }
            let rt = row_times(&g, &v, c);
            for (j, &y) in rt.iter().enumerate() {
                let want: f64 = (0..r).map(|i| g[i] as f64 * v[i * c + j] as f64).sum();
                assert_eq!(y.to_bits(), (want as f32).to_bits(), "row_times");
            }
        }
    }

    #[test]
    fn a_row_with_a_mean_or_a_nan_is_not_mean_free() {
        assert!(!row_mean_free(&[1.0, 2.0, 3.0], 1e-5));
        assert!(row_mean_free(&[1.0, -1.0, 2.0, -2.0], 1e-5));
        assert!(!row_mean_free(&[f32::NAN, 1.0, -1.0], 1e-5));
        assert!(!row_mean_free(&[f32::INFINITY, -1.0], 1e-5));
    }
}
