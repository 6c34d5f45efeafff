//! Sparse-input GEMM: `C = epilogue(A · B)` reading only the rows of `B[K, N]` (row-major, so
//! each row is contiguous) whose column of A is non-zero. For one row of A (a decode step)
//! that is a sparse-input GEMV over the active neurons; for many rows, A is taken in blocks
//! of [`ROW_BLOCK`] rows and a row of B is read once for the union of the block's active
//! neurons (a gather-GEMM). The caller picks it over the dense GEMM when the measured
//! density of A is at most [`max_density`] (see there for how the thresholds were measured).
//!
//! Exactness: the same products as the dense GEMM minus the ones whose A entry is ±0, summed
//! in a different order (rounding-level differences). A NaN or infinity in A counts as
//! active, so it propagates as in the dense product; a zero activation times an infinite or
//! NaN weight gives 0 here where the dense product gives NaN.

use super::{Epilogue, GemmError, OutPtr};
use crate::pool::{Pool, SharedMut};
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Rows of A whose active neurons are gathered together.
pub const ROW_BLOCK: usize = 8;

/// The largest density (active fraction of K) at which one row (a GEMV) goes sparse
/// (`KILN_SPARSE_MAX_DENSITY` or [`set_max_density_override`] replace both thresholds).
/// Measured with `cargo run --release -p kiln-runtime --example sparse_gemv` (the script
/// `bench/sparsity.sh` runs it into `bench/sparsity.md`) on OPT-125m FFN widths, 1 thread:
/// sparse/dense was 0.81 at 50% and 1.10 at 70% density for 3072 → 768, 0.59 and 0.87 for
/// 768 → 3072; the crossover lies at 63–78%, so one row goes sparse up to 60%.
pub const GEMV_MAX_DENSITY: f32 = 0.6;

/// The largest union density (per [`ROW_BLOCK`] rows) at which many rows go sparse. The same
/// measurement, 8 and 128 rows: the gather-GEMM costs about 3× the dense GEMM per active
/// neuron (it streams where the dense kernel is register-tiled): sparse/dense 0.32–0.57 at a
/// union density of 21–22%, 0.93–1.42 at 55–57%; crossover near 33%, so 30%.
pub const GEMM_MAX_DENSITY: f32 = 0.3;

/// A process-wide threshold override (f32 bits; `NONE` when unset).
static OVERRIDE: AtomicU32 = AtomicU32::new(NONE);
const NONE: u32 = u32::MAX;
/// Sparse-input GEMM calls so far (for tests and profiles: which path ran).
static RUNS: AtomicUsize = AtomicUsize::new(0);

/// Overrides the density threshold for every `m` (0 turns the sparse path off, 1 forces
/// it; `None` restores the measured constants). For measurements and tests.
pub fn set_max_density_override(v: Option<f32>) {
    OVERRIDE.store(v.map_or(NONE, f32::to_bits), Ordering::Relaxed);
}

/// How many times the sparse path has run in this process.
pub fn sparse_runs() -> usize {
    RUNS.load(Ordering::Relaxed)
}

/// The density threshold for `m` rows: [`set_max_density_override`], else the environment
/// variable `KILN_SPARSE_MAX_DENSITY` (read once), else [`GEMV_MAX_DENSITY`] for one row and
/// [`GEMM_MAX_DENSITY`] for more.
pub fn max_density(m: usize) -> f32 {
    let o = OVERRIDE.load(Ordering::Relaxed);
    if o != NONE {
        return f32::from_bits(o);
    }
    static ENV: OnceLock<Option<f32>> = OnceLock::new();
    let env = ENV.get_or_init(|| {
        std::env::var("KILN_SPARSE_MAX_DENSITY")
            .ok()
            .and_then(|s| s.trim().parse::<f32>().ok())
    });
    if let Some(v) = env {
        return *v;
    }
    if m == 1 {
        GEMV_MAX_DENSITY
    } else {
        GEMM_MAX_DENSITY
    }
}

/// The active columns of a row-major `a[m, k]`, per block of [`ROW_BLOCK`] rows (a column
/// is active when any row of the block has a non-zero, NaN included), and the mean active
/// fraction over the blocks.
pub fn active_columns(a: &[f32], m: usize, k: usize) -> (Vec<Vec<u32>>, f32) {
    let mut blocks = Vec::with_capacity(m.div_ceil(ROW_BLOCK));
    let mut total = 0usize;
    for r0 in (0..m).step_by(ROW_BLOCK) {
        let r1 = (r0 + ROW_BLOCK).min(m);
        let mut act = Vec::new();
        if r1 - r0 == 1 {
            let row = &a[r0 * k..r0 * k + k];
            act.extend(
                row.iter()
                    .enumerate()
                    .filter(|(_, &x)| x != 0.0)
                    .map(|(i, _)| i as u32),
            );
        } else {
            for kk in 0..k {
                if (r0..r1).any(|r| a[r * k + kk] != 0.0) {
                    act.push(kk as u32);
                }
            }
        }
        total += act.len();
        blocks.push(act);
    }
    let density = if m == 0 || k == 0 {
        0.0
    } else {
        total as f32 / (blocks.len() * k) as f32
    };
    (blocks, density)
}

/// `c[m, n] = epilogue(a[m, k] · b[k, n])` over the active columns `active` (from
/// [`active_columns`]); writes every element of `c`.
#[allow(clippy::too_many_arguments)]
pub fn sparse_gemm_in(
    pool: &Pool,
    a: &[f32],
    m: usize,
    k: usize,
    b: &[f32],
    n: usize,
    active: &[Vec<u32>],
    c: &mut [MaybeUninit<f32>],
    ep: &Epilogue<'_>,
) -> Result<(), GemmError> {
    let need = |what, expected: usize, got: usize| {
        if got < expected {
            Err(GemmError::OutOfBounds {
                what,
                needed: expected,
                len: got,
            })
        } else {
            Ok(())
        }
    };
    need("A", m * k, a.len())?;
    need("B", k * n, b.len())?;
    need("C", m * n, c.len())?;
    if active.len() != m.div_ceil(ROW_BLOCK) {
        return Err(GemmError::Mismatch {
            what: "row blocks of the active columns",
            expected: m.div_ceil(ROW_BLOCK),
            got: active.len(),
        });
    }
    if active.iter().flatten().any(|&kk| kk as usize >= k) {
        return Err(GemmError::Mismatch {
            what: "active column index",
            expected: k,
            got: k + 1,
        });
    }
    ep.check(m, n)?;
    RUNS.fetch_add(1, Ordering::Relaxed);
    if m == 0 || n == 0 {
        return Ok(());
    }
    // Column tiles: whole rows of B on one thread; a few tiles per thread otherwise.
    let threads = pool.threads().max(1);
    let work = m.saturating_mul(n).saturating_mul(k);
    let tiles = if threads == 1 || work < (1 << 16) {
        1
    } else {
        (threads * 2).min(n.div_ceil(64))
    };
    let tile = n.div_ceil(tiles).next_multiple_of(16).min(n);
    let tiles = n.div_ceil(tile);
    let blocks = active.len();
    let out = SharedMut::new(c.as_mut_ptr().cast::<f32>());
    let avx2 = super::avx2::available();
    pool.parallel_for(blocks * tiles, |t| {
        let (blk, ti) = (t / tiles, t % tiles);
        let (r0, j0) = (blk * ROW_BLOCK, ti * tile);
        let rows = ROW_BLOCK.min(m - r0);
        let w = tile.min(n - j0);
        let job = Job {
            a,
            k,
            b,
            n,
            act: &active[blk],
            r0,
            rows,
            j0,
            w,
            out: out.get(),
        };
        // SAFETY: the tiles of (row block, column range) are disjoint and inside C, whose
        // length was checked; active indices are < k (checked above).
        unsafe {
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                job.run_avx2();
            } else {
                job.run();
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                let _ = avx2;
                job.run();
            }
            ep.apply(
                OutPtr {
                    ptr: out.get(),
                    rs: n,
                },
                r0,
                rows,
                j0,
                w,
            );
        }
    });
    Ok(())
}

/// One (row block, column tile) of the product.
struct Job<'a> {
    a: &'a [f32],
    k: usize,
    b: &'a [f32],
    n: usize,
    act: &'a [u32],
    r0: usize,
    rows: usize,
    j0: usize,
    w: usize,
    out: *mut f32,
}

impl Job<'_> {
    /// # Safety
    /// As [`Job::run`]; the CPU has AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2(&self) {
        // SAFETY: forwarded.
        unsafe { self.run() }
    }

    /// # Safety
    /// Rows `r0..r0 + rows`, columns `j0..j0 + w` of the `n`-wide output are in bounds and
    /// owned by this job.
    #[inline(always)]
    unsafe fn run(&self) {
        let (k, n, w) = (self.k, self.n, self.w);
        // SAFETY: the caller's contract (rows of the output are `n` apart, `w <= n - j0`).
        let acc =
            |r: usize| unsafe { std::slice::from_raw_parts_mut(self.out.add(r * n + self.j0), w) };
        for r in self.r0..self.r0 + self.rows {
            acc(r).fill(0.0);
        }
        let brow = |kk: u32| {
            let s = kk as usize * n + self.j0;
            &self.b[s..s + w]
        };
        // Four active neurons at a time: their rows of B are read once for the whole block
        // and each row of the block adds all four in one pass over its accumulator.
        let mut quads = self.act.chunks_exact(4);
        for q in quads.by_ref() {
            let (b0, b1, b2, b3) = (brow(q[0]), brow(q[1]), brow(q[2]), brow(q[3]));
            for r in self.r0..self.r0 + self.rows {
                let arow = &self.a[r * k..r * k + k];
                let x = [q[0], q[1], q[2], q[3]].map(|kk| arow[kk as usize]);
                if x == [0.0; 4] {
                    continue;
                }
                let [x0, x1, x2, x3] = x;
                let rows = acc(r).iter_mut().zip(b0).zip(b1).zip(b2).zip(b3);
                for ((((c, &p0), &p1), &p2), &p3) in rows {
                    *c += x0 * p0 + x1 * p1 + (x2 * p2 + x3 * p3);
                }
            }
        }
        for &kk in quads.remainder() {
            let b0 = brow(kk);
            for r in self.r0..self.r0 + self.rows {
                let x = self.a[r * k + kk as usize];
                if x == 0.0 {
                    continue;
                }
                for (c, &p) in acc(r).iter_mut().zip(b0) {
                    *c += x * p;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::native::gemm::{gemm_in, Activation, GemmConfig, Isa, MatMut, MatRef, Rhs};

    /// Largest relative difference (to the largest magnitude of the dense result) tolerated
    /// between the sparse and dense products: f32 rounding of sums in another order.
    const SPARSE_VS_DENSE_TOLERANCE: f32 = 1e-5;

    fn rand(seed: &mut u64, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                *seed ^= *seed << 13;
                *seed ^= *seed >> 7;
                *seed ^= *seed << 17;
                (*seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
            })
            .collect()
    }

    fn check(m: usize, k: usize, n: usize, density: f32, threads: usize) {
        let mut seed = 0x1234_5678 + (m * 31 + k * 7 + n) as u64;
        let mut a = rand(&mut seed, m * k);
        let keep = rand(&mut seed, m * k);
        for (x, r) in a.iter_mut().zip(&keep) {
            if (r + 1.0) / 2.0 >= density {
                *x = 0.0;
            }
        }
        let b = rand(&mut seed, k * n);
        let bias = rand(&mut seed, n);
        let resid = rand(&mut seed, m * n);
        let ep = Epilogue {
            bias: Some(&bias),
            activation: Activation::Relu,
            residual: Some(MatRef::row_major(&resid, m, n).unwrap()),
            row_scale: None,
        };
        let pool = Pool::new(threads).unwrap();
        let mut dense = vec![0f32; m * n];
        gemm_in(
            &pool,
            MatRef::row_major(&a, m, k).unwrap(),
            Rhs::Plain(MatRef::row_major(&b, k, n).unwrap()),
            MatMut::row_major(&mut dense, m, n).unwrap(),
            &ep,
            &GemmConfig {
                threads,
                isa: Isa::Auto,
            },
        )
        .unwrap();
        let (act, d) = active_columns(&a, m, k);
        assert!(d <= 1.0);
        let mut sparse = vec![MaybeUninit::new(f32::NAN); m * n];
        sparse_gemm_in(&pool, &a, m, k, &b, n, &act, &mut sparse, &ep).unwrap();
        let scale = dense.iter().fold(1e-6f32, |s, x| s.max(x.abs()));
        for (i, (s, d)) in sparse.iter().zip(&dense).enumerate() {
            // SAFETY: initialised above and overwritten by the kernel.
            let s = unsafe { s.assume_init() };
            assert!(
                (s - d).abs() <= SPARSE_VS_DENSE_TOLERANCE * scale,
                "m={m} k={k} n={n} density={density} threads={threads}: [{i}] {s} vs {d}"
            );
        }
    }

    #[test]
    fn sparse_equals_dense_at_every_density() {
        for density in [0.0, 0.03, 0.3, 0.5, 0.9, 1.0] {
            for (m, k, n) in [(1, 96, 40), (1, 300, 77), (5, 64, 33), (19, 128, 70)] {
                for threads in [1, 3] {
                    check(m, k, n, density, threads);
                }
            }
        }
    }

    #[test]
    fn active_columns_are_the_union_per_block() {
        let (m, k) = (9, 4);
        let mut a = vec![0f32; m * k];
        a[k + 2] = 1.0; // row 1, col 2
        a[8 * k] = f32::NAN; // row 8 (second block), col 0
        let (act, d) = active_columns(&a, m, k);
        assert_eq!(act, vec![vec![2], vec![0]]);
        assert_eq!(d, 0.25);
    }

    #[test]
    fn bad_operands_are_errors_not_panics() {
        let pool = Pool::single();
        let mut c = vec![MaybeUninit::new(0f32); 4];
        let ep = Epilogue::default();
        let r = sparse_gemm_in(
            &pool,
            &[1.0; 4],
            2,
            2,
            &[1.0; 3],
            2,
            &[vec![0]],
            &mut c,
            &ep,
        );
        assert!(r.is_err());
        let r = sparse_gemm_in(
            &pool,
            &[1.0; 4],
            2,
            2,
            &[1.0; 4],
            2,
            &[vec![5]],
            &mut c,
            &ep,
        );
        assert!(r.is_err());
    }
}
