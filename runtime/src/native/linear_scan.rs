//! The CPU kernel of `linear_scan` (f32): the recurrence `h_t = a_t ⊙ h_{t−1} + b_t` over
//! `[S, *state]` operands, in the form the optimiser chose (the op's `chunk`):
//!
//! - sequential (`chunk = 0`, or a sequence no longer than one chunk): the steps in order,
//!   the state's elements split into contiguous ranges, one per thread (each range is an
//!   independent recurrence). Bit-equal to the reference: a product, then a sum, each
//!   rounded, never fused;
//! - chunked (`chunk = C`): time in blocks of `C` steps. Each block is scanned from a zero
//!   state while its decays are multiplied up (blocks spread over the threads); the block
//!   boundaries are carried across in order (`h_in(c+1) = P_c ⊙ h_in(c) + local_c`); then
//!   each block is rescanned from its true incoming state, writing the output. Twice the
//!   work, but every thread busy when the state is too small to split.
//!
//! The loops are plain slices that LLVM vectorises.

use crate::pool::{Pool, SharedMut};
use kiln_ir::Tensor;

use kiln_ir::ops::linear_scan::MIN_ELEMS_PER_THREAD;
/// Ranges of the state start on multiples of this many elements (a cache line of f32s), so
/// threads never write the same line.
const ALIGN: usize = 16;

/// `linear_scan(a, b, h0)` for f32 tensors: `[h, h_last]`, `h` written into `out`'s region
/// when it has one; `None` (the interpreter then runs it and reports what is wrong) for
/// other dtypes or inconsistent shapes.
pub fn run(
    attrs: &kiln_ir::Attrs,
    ins: &[Option<&Tensor>],
    pool: &Pool,
    out: &mut crate::executor::arena::Outputs,
) -> Option<Vec<Tensor>> {
    let chunk = kiln_ir::ops::linear_scan::chunk_of(attrs).ok()?;
    let (a, b, h0) = ((*ins.first()?)?, (*ins.get(1)?)?, (*ins.get(2)?)?);
    let (av, bv, hv) = (
        a.as_slice::<f32>()?,
        b.as_slice::<f32>()?,
        h0.as_slice::<f32>()?,
    );
    if a.rank() != h0.rank() + 1 || a.shape() != b.shape() || a.shape()[1..] != *h0.shape() {
        return None;
    }
    let (s, n) = (a.shape()[0], hv.len());
    let mut region = out.region::<f32>(0, s * n);
    let mut owned: Vec<f32> = vec![];
    let dst: &mut [f32] = match region.as_mut() {
        Some(r) => &mut r[..s * n],
        None => {
            owned = vec![0.0; s * n];
            &mut owned
        }
    };
    let last = if chunk == 0 || s <= chunk {
        sequential(av, bv, hv, dst, pool)
    } else {
        chunked(av, bv, hv, dst, chunk, pool)
    };
    let shape = a.shape().to_vec();
    let h = match region {
        Some(r) => Tensor::from_buf(shape, r),
        None => Tensor::from_vec(shape, owned),
    };
    Some(vec![h, Tensor::from_vec(h0.shape().to_vec(), last)])
}

/// Runs steps `a.len() / h.len()` times over the state `h` in place: `h = a_t·h + b_t`,
/// writing each step's state to `out` (all three laid out `[steps, h.len()]` with row
/// stride `stride`, `h` covering columns `lo..lo + h.len()`).
fn scan_range(
    a: &[f32],
    b: &[f32],
    h: &mut [f32],
    out: SharedMut,
    steps: usize,
    stride: usize,
    lo: usize,
) {
    let w = h.len();
    for t in 0..steps {
        let row = t * stride + lo;
        let (at, bt) = (&a[row..row + w], &b[row..row + w]);
        // SAFETY: the caller owns columns `lo..lo + w` of rows `0..steps` of `out`.
        let ot = unsafe { std::slice::from_raw_parts_mut(out.get().add(row), w) };
        for i in 0..w {
            let x = at[i] * h[i] + bt[i];
            h[i] = x;
            ot[i] = x;
        }
    }
}

/// The sequential form; returns the last state.
fn sequential(a: &[f32], b: &[f32], h0: &[f32], dst: &mut [f32], pool: &Pool) -> Vec<f32> {
    let (n, s) = (h0.len(), a.len() / h0.len().max(1));
    let mut last = h0.to_vec();
    if n == 0 {
        return last;
    }
    let parts = pool.threads().min(n / MIN_ELEMS_PER_THREAD).max(1);
    let ptr = SharedMut::new(dst.as_mut_ptr());
    let lp = SharedMut::new(last.as_mut_ptr());
    let bound = |p: usize| ((n * p / parts) / ALIGN * ALIGN).min(n);
    let one = |p: usize| {
        let (lo, hi) = (bound(p), if p + 1 == parts { n } else { bound(p + 1) });
        // SAFETY: part `p` owns columns `lo..hi` of `last` (and of `dst`, in scan_range).
        let h = unsafe { std::slice::from_raw_parts_mut(lp.get().add(lo), hi - lo) };
        scan_range(a, b, h, ptr, s, n, lo);
    };
    if parts > 1 {
        pool.parallel_for(parts, one);
    } else {
        one(0);
    }
    last
}

/// The chunked form with blocks of `c` steps; returns the last state.
fn chunked(a: &[f32], b: &[f32], h0: &[f32], dst: &mut [f32], c: usize, pool: &Pool) -> Vec<f32> {
    let (n, s) = (h0.len(), a.len() / h0.len().max(1));
    if n == 0 {
        return h0.to_vec();
    }
    let blocks = s.div_ceil(c);
    // Per block but the last: its product of decays and its scan from a zero state.
    let mut prod = vec![1.0f32; blocks * n];
    let mut local = vec![0.0f32; blocks * n];
    let (pp, lp) = (
        SharedMut::new(prod.as_mut_ptr()),
        SharedMut::new(local.as_mut_ptr()),
    );
    pool.parallel_for(blocks - 1, |k| {
        // SAFETY: block `k` owns row `k` of `prod` and `local`.
        let (p, l) = unsafe {
            (
                std::slice::from_raw_parts_mut(pp.get().add(k * n), n),
                std::slice::from_raw_parts_mut(lp.get().add(k * n), n),
            )
        };
        for t in k * c..((k + 1) * c).min(s) {
            let (at, bt) = (&a[t * n..][..n], &b[t * n..][..n]);
            for i in 0..n {
                l[i] = at[i] * l[i] + bt[i];
                p[i] *= at[i];
            }
        }
    });
    // Incoming states in order: row k of `carry` enters block k.
    let mut carry = vec![0.0f32; blocks * n];
    carry[..n].copy_from_slice(h0);
    for k in 1..blocks {
        let (done, rest) = carry.split_at_mut(k * n);
        let (prev, next) = (&done[(k - 1) * n..], &mut rest[..n]);
        let (p, l) = (&prod[(k - 1) * n..][..n], &local[(k - 1) * n..][..n]);
        for i in 0..n {
            next[i] = p[i] * prev[i] + l[i];
        }
    }
    let ptr = SharedMut::new(dst.as_mut_ptr());
    let cp = SharedMut::new(carry.as_mut_ptr());
    pool.parallel_for(blocks, |k| {
        let (t0, t1) = (k * c, ((k + 1) * c).min(s));
        // SAFETY: block `k` owns row `k` of `carry` and rows `t0..t1` of `dst`.
        let h = unsafe { std::slice::from_raw_parts_mut(cp.get().add(k * n), n) };
        let out = SharedMut::new(unsafe { ptr.get().add(t0 * n) });
        scan_range(
            &a[t0 * n..t1 * n],
            &b[t0 * n..t1 * n],
            h,
            out,
            t1 - t0,
            n,
            0,
        );
    });
    carry[(blocks - 1) * n..].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::{Attr, Attrs, OpKind};

    fn rand(seed: u64, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                lo + (hi - lo) * ((x >> 40) as f32 / (1u64 << 24) as f32)
            })
            .collect()
    }

    /// Relative tolerance of the chunked form against the sequential reference: only the
    /// blocks' incoming states are reassociated (a few roundings per block boundary).
    const CHUNKED_RTOL: f32 = 1e-5;

    #[test]
    fn both_forms_match_the_reference_at_any_thread_count() {
        for (s, state, chunk) in [
            (1, 3, 0),
            (37, 5, 0),
            (64, 9000, 0),
            (257, 7, 16),
            (100, 33, 99),
            (5, 4, 1),
            (0, 3, 4),
        ] {
            let a = Tensor::from_vec(vec![s, state], rand(1, s * state, 0.5, 1.0));
            let b = Tensor::from_vec(vec![s, state], rand(2, s * state, -1.0, 1.0));
            let h0 = Tensor::from_vec(vec![state], rand(3, state, -1.0, 1.0));
            let attrs = Attrs::new().with("chunk", Attr::Int(chunk as i64));
            let ins = [Some(&a), Some(&b), Some(&h0)];
            let want = kiln_ir::ops::eval(OpKind::LinearScan, &attrs, &ins).unwrap();
            for threads in [1, 2, 3] {
                let pool = Pool::new(threads).unwrap();
                let got = run(
                    &attrs,
                    &ins,
                    &pool,
                    &mut crate::executor::arena::Outputs::none(),
                )
                .unwrap();
                for (g, w) in got.iter().zip(&want) {
                    assert_eq!(g.shape(), w.shape());
                    let (g, w) = (g.as_slice::<f32>().unwrap(), w.as_slice::<f32>().unwrap());
                    for (x, y) in g.iter().zip(w) {
                        if chunk == 0 || s <= chunk {
                            assert_eq!(
                                x.to_bits(),
                                y.to_bits(),
                                "s {s} state {state} threads {threads}"
                            );
                        } else {
                            assert!(
                                (x - y).abs() <= CHUNKED_RTOL * (1.0 + y.abs()),
                                "{x} vs {y} (s {s}, chunk {chunk})"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn nan_in_a_step_reaches_every_later_state_in_both_forms() {
        let (s, state) = (40, 3);
        let mut av = rand(4, s * state, 0.5, 1.0);
        av[5 * state + 1] = f32::NAN;
        let a = Tensor::from_vec(vec![s, state], av);
        let b = Tensor::from_vec(vec![s, state], rand(5, s * state, -1.0, 1.0));
        let h0 = Tensor::from_vec(vec![state], vec![0.5f32; state]);
        for chunk in [0, 8] {
            let attrs = Attrs::new().with("chunk", Attr::Int(chunk));
            let got = run(
                &attrs,
                &[Some(&a), Some(&b), Some(&h0)],
                &Pool::new(2).unwrap(),
                &mut crate::executor::arena::Outputs::none(),
            )
            .unwrap();
            let h = got[0].as_slice::<f32>().unwrap();
            for t in 0..s {
                assert_eq!(h[t * state + 1].is_nan(), t >= 5, "chunk {chunk} step {t}");
                assert!(!h[t * state].is_nan());
            }
            assert!(got[1].as_slice::<f32>().unwrap()[1].is_nan());
        }
    }
}
