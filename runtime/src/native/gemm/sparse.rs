//! Sparse-input GEMM: `C = epilogue(A · B)` reading only the rows of `B[K, N]` (row-major, so
//! each row is contiguous) whose column of A is non-zero. For one row of A (a decode step)
//! that is a sparse-input GEMV over the active neurons; for many rows, A is taken in blocks
//! of [`ROW_BLOCK`] rows and a row of B is read once for the union of the
//! block's active neurons (a gather-GEMM). The caller picks it over the dense GEMM when the
//! measured density of A is at most [`max_density`] (see there for how the thresholds were
//! measured).
//!
//! The GEMV streams each active row of B whole (so at 100% density it reads B front to back,
//! as the dense GEMV reads its packed panels): four active rows per pass over `y`, which lives
//! in L1, with the next four rows prefetched; two or more threads split the columns. The
//! gather-GEMM packs a block's active columns of A (transposed, 8 rows per neuron) and
//! streams the block's active rows of B the same way, each 64-column piece of four rows held
//! in registers while every row of the block adds it (B is read once per row block, as
//! whole rows; an 8 × 32 register tile reading 128-byte pieces of rows scattered in DRAM was
//! 2–20× slower). Both have AVX-512 kernels; elsewhere a portable loop (compiled with AVX2 +
//! FMA when the CPU has them).
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

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Rows of A whose active neurons are gathered together (read together per row of B).
pub const ROW_BLOCK: usize = 8;

/// Active rows of B added per pass over `y` in the GEMV.
const GEMV_ROWS: usize = 4;

/// Below this many multiply-adds the GEMV stays on one thread.
const GEMV_PARALLEL_WORK: usize = 1 << 16;

/// The largest density (active fraction of K) at which one row (a GEMV) goes sparse
/// (`KILN_SPARSE_MAX_DENSITY` or [`set_max_density_override`] replace both thresholds).
/// Measured with `cargo run --release -p kiln-runtime --example sparse_gemv` (the script
/// `bench/sparsity.sh` runs it into `bench/sparsity.md`) on OPT-125m FFN widths, weights from
/// DRAM, 1 thread, AMD EPYC (Zen 4, AVX-512), loaded machine: sparse/dense 1.00 at 100%,
/// 0.90 at 90%, 0.80 at 70% density for 3072 → 768; 0.85, 0.86, 0.62 for 768 → 3072. The
/// sparse GEMV is never slower within noise, so one row goes sparse up to 90%.
pub const GEMV_MAX_DENSITY: f32 = 0.9;

/// The largest union density (per [`ROW_BLOCK`] rows) at which many rows go sparse. The same
/// measurement at 8 and 128 rows: sparse/dense 0.44–0.60 at a union density of 21–22%,
/// 0.89–1.15 at 55–57%, 1.1–1.9 at 94–100% (one outlier of 5.9 on the loaded machine);
/// crossover near 50%, so 40%.
pub const GEMM_MAX_DENSITY: f32 = 0.4;

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
    let mut union = vec![false; k];
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
            union.fill(false);
            for r in r0..r1 {
                for (u, &x) in union.iter_mut().zip(&a[r * k..r * k + k]) {
                    *u |= x != 0.0;
                }
            }
            act.extend(
                union
                    .iter()
                    .enumerate()
                    .filter(|(_, &u)| u)
                    .map(|(i, _)| i as u32),
            );
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
    sparse_gemm_with(Kernel::detect(), pool, a, m, k, b, n, active, c, ep)
}

/// [`sparse_gemm_in`] on the kernels `isa` (which the CPU must support).
#[allow(clippy::too_many_arguments)]
fn sparse_gemm_with(
    isa: Kernel,
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
    let out = SharedMut::new(c.as_mut_ptr().cast::<f32>());
    if m == 1 {
        // Column ranges (multiples of 16) per thread; one range when the work is small.
        let act = &active[0];
        let threads = pool.threads().max(1);
        let parts = if act.len().saturating_mul(n) < GEMV_PARALLEL_WORK {
            1
        } else {
            threads.min(n.div_ceil(16))
        };
        let step = n.div_ceil(parts).next_multiple_of(16);
        let parts = n.div_ceil(step);
        pool.parallel_for(parts, |t| {
            let (j0, j1) = (t * step, ((t + 1) * step).min(n));
            // SAFETY: the column ranges are disjoint and inside the one-row C (length
            // checked); B holds `k·n` values and active indices are < k (checked above).
            unsafe {
                let y = out.get();
                std::ptr::write_bytes(y.add(j0), 0, j1 - j0);
                isa.gemv(a, act, b.as_ptr(), n, j0, j1, y);
                ep.apply(OutPtr { ptr: y, rs: n }, 0, 1, j0, j1 - j0);
            }
        });
        return Ok(());
    }
    // Many rows: each block's active columns of A packed neuron-major (8 rows per neuron,
    // zero-padded), then each block streams its active rows of B.
    let offsets: Vec<usize> = active
        .iter()
        .scan(0usize, |s, act| {
            let o = *s;
            *s += act.len() * ROW_BLOCK;
            Some(o)
        })
        .collect();
    let packed_len = active
        .iter()
        .map(|act| act.len() * ROW_BLOCK)
        .sum::<usize>();
    let mut packed = vec![0f32; packed_len];
    let pk = SharedMut::new(packed.as_mut_ptr());
    pool.parallel_for(active.len(), |blk| {
        let r0 = blk * ROW_BLOCK;
        let rows = ROW_BLOCK.min(m - r0);
        let act = &active[blk];
        // SAFETY: block `blk` owns `packed[offsets[blk]..][..act.len() * ROW_BLOCK]`.
        let dst = unsafe {
            std::slice::from_raw_parts_mut(pk.get().add(offsets[blk]), act.len() * ROW_BLOCK)
        };
        for r in 0..rows {
            let row = &a[(r0 + r) * k..(r0 + r + 1) * k];
            for (i, &kk) in act.iter().enumerate() {
                dst[i * ROW_BLOCK + r] = row[kk as usize];
            }
        }
    });
    let packed = &packed;
    // Work items: (row block, column range); the columns split only when there are fewer
    // blocks than threads.
    let blocks = active.len();
    let threads = pool.threads().max(1);
    let parts = if blocks >= threads {
        1
    } else {
        threads.div_ceil(blocks).min(n.div_ceil(64))
    };
    let step = n.div_ceil(parts).next_multiple_of(16);
    let parts = n.div_ceil(step);
    pool.parallel_for(blocks * parts, |t| {
        let (blk, part) = (t / parts, t % parts);
        let (j0, j1) = (part * step, ((part + 1) * step).min(n));
        let r0 = blk * ROW_BLOCK;
        let rows = ROW_BLOCK.min(m - r0);
        let act = &active[blk];
        let ap = &packed[offsets[blk]..offsets[blk] + act.len() * ROW_BLOCK];
        // SAFETY: the (row block, column range) rectangles are disjoint and inside C; B
        // holds `k·n` values and active indices are < k (checked above).
        unsafe {
            let o = out.get();
            for r in r0..r0 + rows {
                std::ptr::write_bytes(o.add(r * n + j0), 0, j1 - j0);
            }
            isa.rows(ap, act, b.as_ptr(), n, j0, j1, rows, o.add(r0 * n), n);
            ep.apply(OutPtr { ptr: o, rs: n }, r0, rows, j0, j1 - j0);
        }
    });
    Ok(())
}

/// Which kernels run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    Avx512,
    Avx2,
    Portable,
}

impl Kernel {
    fn detect() -> Kernel {
        if super::avx512::available() {
            Kernel::Avx512
        } else if super::avx2::available() {
            Kernel::Avx2
        } else {
            Kernel::Portable
        }
    }

    /// `y[j0..j1] += Σ_{kk ∈ act} x[kk] · b[kk, j0..j1]`.
    ///
    /// # Safety
    /// `b` points to `k·n` readable values with every `act` index < k, `j0 <= j1 <= n`, and
    /// `y[j0..j1]` is writable and initialised. The selected kernel's CPU features exist.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemv(
        self,
        x: &[f32],
        act: &[u32],
        b: *const f32,
        n: usize,
        j0: usize,
        j1: usize,
        y: *mut f32,
    ) {
        // SAFETY: forwarded; `detect` checked the features.
        unsafe {
            match self {
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx512 => gemv_avx512(x, act, b, n, j0, j1, y),
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx2 => gemv_avx2(x, act, b, n, j0, j1, y),
                _ => gemv_portable(x, act, b, n, j0, j1, y),
            }
        }
    }

    /// `out[r, j0..j1] += Σ_i ap[i, r] · b[act[i], j0..j1]` for `r < rows` (`out` rows `ldo`
    /// apart); `ap` is neuron-major, [`ROW_BLOCK`] values per active neuron.
    ///
    /// # Safety
    /// As [`Kernel::gemv`] for `b` and the columns; `rows <= ROW_BLOCK`,
    /// `ap.len() >= act.len() · ROW_BLOCK`, and `out[r, j0..j1]` is writable and
    /// initialised for `r < rows`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn rows(
        self,
        ap: &[f32],
        act: &[u32],
        b: *const f32,
        n: usize,
        j0: usize,
        j1: usize,
        rows: usize,
        out: *mut f32,
        ldo: usize,
    ) {
        // SAFETY: forwarded; `detect` checked the features.
        unsafe {
            match self {
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx512 => rows_avx512(ap, act, b, n, j0, j1, rows, out, ldo),
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx2 => rows_avx2(ap, act, b, n, j0, j1, rows, out, ldo),
                _ => rows_portable(ap, act, b, n, j0, j1, rows, out, ldo),
            }
        }
    }
}

/// The AVX-512 GEMV: four active rows per pass over `y[j0..j1]` in 64-column steps (four
/// zmm of `y` loaded, 16 FMAs, stored), prefetching the next four rows' lines at the same
/// columns into L2; 16-wide and masked tails. (Measured with the example, weights from DRAM,
/// 1 thread, AMD EPYC: prefetching into L2 one group ahead gave sparse/dense 1.10 at 100%
/// density on 3072 → 768 where into L1 gave 1.84 and none 1.62; two or four groups ahead
/// were no better.)
///
/// # Safety
/// As [`Kernel::gemv`]; the CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn gemv_avx512(
    x: &[f32],
    act: &[u32],
    b: *const f32,
    n: usize,
    j0: usize,
    j1: usize,
    y: *mut f32,
) {
    // SAFETY: every load is at `b + kk·n + j` with `kk < k`, `j < j1 <= n` (masked past the
    // end) and every store inside `y[j0..j1]`; prefetches do not fault.
    unsafe {
        let row = |kk: u32| b.add(kk as usize * n);
        let groups = act.len() / GEMV_ROWS;
        for g in 0..groups {
            let q = &act[g * GEMV_ROWS..g * GEMV_ROWS + GEMV_ROWS];
            let r = [row(q[0]), row(q[1]), row(q[2]), row(q[3])];
            let xs = [q[0], q[1], q[2], q[3]].map(|kk| _mm512_set1_ps(x[kk as usize]));
            // The next group's rows (this group's when it is the last: harmless).
            let nq = act
                .get((g + 1) * GEMV_ROWS..(g + 2) * GEMV_ROWS)
                .unwrap_or(q);
            let p = [row(nq[0]), row(nq[1]), row(nq[2]), row(nq[3])];
            let mut j = j0;
            while j + 64 <= j1 {
                for c in 0..4 {
                    let o = j + 16 * c;
                    let mut acc = _mm512_loadu_ps(y.add(o));
                    acc = _mm512_fmadd_ps(xs[0], _mm512_loadu_ps(r[0].add(o)), acc);
                    acc = _mm512_fmadd_ps(xs[1], _mm512_loadu_ps(r[1].add(o)), acc);
                    acc = _mm512_fmadd_ps(xs[2], _mm512_loadu_ps(r[2].add(o)), acc);
                    acc = _mm512_fmadd_ps(xs[3], _mm512_loadu_ps(r[3].add(o)), acc);
                    _mm512_storeu_ps(y.add(o), acc);
                    for pr in p {
                        _mm_prefetch::<_MM_HINT_T1>(pr.add(o).cast());
                    }
                }
                j += 64;
            }
            while j < j1 {
                let mask: __mmask16 = if j1 - j >= 16 {
                    0xffff
                } else {
                    (1u16 << (j1 - j)) - 1
                };
                let mut acc = _mm512_maskz_loadu_ps(mask, y.add(j));
                for i in 0..GEMV_ROWS {
                    acc = _mm512_fmadd_ps(xs[i], _mm512_maskz_loadu_ps(mask, r[i].add(j)), acc);
                }
                _mm512_mask_storeu_ps(y.add(j), mask, acc);
                j += 16;
            }
        }
        for &kk in &act[groups * GEMV_ROWS..] {
            let r = row(kk);
            let xv = _mm512_set1_ps(x[kk as usize]);
            let mut j = j0;
            while j < j1 {
                let mask: __mmask16 = if j1 - j >= 16 {
                    0xffff
                } else {
                    (1u16 << (j1 - j)) - 1
                };
                let acc = _mm512_maskz_loadu_ps(mask, y.add(j));
                let acc = _mm512_fmadd_ps(xv, _mm512_maskz_loadu_ps(mask, r.add(j)), acc);
                _mm512_mask_storeu_ps(y.add(j), mask, acc);
                j += 16;
            }
        }
    }
}

/// The portable GEMV compiled with AVX2 + FMA.
///
/// # Safety
/// As [`Kernel::gemv`]; the CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn gemv_avx2(
    x: &[f32],
    act: &[u32],
    b: *const f32,
    n: usize,
    j0: usize,
    j1: usize,
    y: *mut f32,
) {
    // SAFETY: forwarded.
    unsafe { gemv_portable(x, act, b, n, j0, j1, y) }
}

/// The GEMV in plain loops over slices (vectorised by the compiler): four active rows per
/// pass over `y[j0..j1]`.
///
/// # Safety
/// As [`Kernel::gemv`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn gemv_portable(
    x: &[f32],
    act: &[u32],
    b: *const f32,
    n: usize,
    j0: usize,
    j1: usize,
    y: *mut f32,
) {
    let w = j1 - j0;
    // SAFETY: by the contract, `y[j0..j1]` and every `b[kk, j0..j1]` are in bounds.
    let (yv, row) = unsafe {
        (std::slice::from_raw_parts_mut(y.add(j0), w), |kk: u32| {
            std::slice::from_raw_parts(b.add(kk as usize * n + j0), w)
        })
    };
    let mut quads = act.chunks_exact(GEMV_ROWS);
    for q in quads.by_ref() {
        let (b0, b1, b2, b3) = (row(q[0]), row(q[1]), row(q[2]), row(q[3]));
        let [x0, x1, x2, x3] = [q[0], q[1], q[2], q[3]].map(|kk| x[kk as usize]);
        for i in 0..w {
            yv[i] += x0 * b0[i] + x1 * b1[i] + (x2 * b2[i] + x3 * b3[i]);
        }
    }
    for &kk in quads.remainder() {
        let (b0, x0) = (row(kk), x[kk as usize]);
        for i in 0..w {
            yv[i] += x0 * b0[i];
        }
    }
}

/// The AVX-512 row-block kernel: like the GEMV, four active rows of B per pass, streamed
/// whole (16 zmm of B per 64-column step, loaded once and used by every row of the block,
/// whose `y` rows stay in L1/L2), the next four rows prefetched into L2.
///
/// # Safety
/// As [`Kernel::rows`]; the CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn rows_avx512(
    ap: &[f32],
    act: &[u32],
    b: *const f32,
    n: usize,
    j0: usize,
    j1: usize,
    rows: usize,
    out: *mut f32,
    ldo: usize,
) {
    // SAFETY: loads of B at `kk·n + j` with `kk < k`, `j < j1 <= n` (masked past the end);
    // `ap` holds `ROW_BLOCK` values per neuron; stores inside `out[r, j0..j1]`, `r < rows`.
    unsafe {
        let row = |kk: u32| b.add(kk as usize * n);
        let a = ap.as_ptr();
        let groups = act.len() / GEMV_ROWS;
        for g in 0..groups {
            let q = &act[g * GEMV_ROWS..g * GEMV_ROWS + GEMV_ROWS];
            let src = [row(q[0]), row(q[1]), row(q[2]), row(q[3])];
            let nq = act
                .get((g + 1) * GEMV_ROWS..(g + 2) * GEMV_ROWS)
                .unwrap_or(q);
            let p = [row(nq[0]), row(nq[1]), row(nq[2]), row(nq[3])];
            let av = a.add(g * GEMV_ROWS * ROW_BLOCK);
            let mut j = j0;
            while j + 64 <= j1 {
                let mut w = [[_mm512_setzero_ps(); 4]; GEMV_ROWS];
                for (i, wi) in w.iter_mut().enumerate() {
                    for (c, wc) in wi.iter_mut().enumerate() {
                        *wc = _mm512_loadu_ps(src[i].add(j + 16 * c));
                    }
                }
                for pr in p {
                    for c in 0..4 {
                        _mm_prefetch::<_MM_HINT_T1>(pr.add(j + 16 * c).cast());
                    }
                }
                for r in 0..rows {
                    let x = [0, 1, 2, 3].map(|i| _mm512_set1_ps(*av.add(i * ROW_BLOCK + r)));
                    let y = out.add(r * ldo + j);
                    for c in 0..4 {
                        let mut acc = _mm512_loadu_ps(y.add(16 * c));
                        for (xi, wi) in x.iter().zip(&w) {
                            acc = _mm512_fmadd_ps(*xi, wi[c], acc);
                        }
                        _mm512_storeu_ps(y.add(16 * c), acc);
                    }
                }
                j += 64;
            }
            while j < j1 {
                let mask: __mmask16 = if j1 - j >= 16 {
                    0xffff
                } else {
                    (1u16 << (j1 - j)) - 1
                };
                let w = src.map(|s| _mm512_maskz_loadu_ps(mask, s.add(j)));
                for r in 0..rows {
                    let y = out.add(r * ldo + j);
                    let mut acc = _mm512_maskz_loadu_ps(mask, y);
                    for (i, wi) in w.iter().enumerate() {
                        acc = _mm512_fmadd_ps(_mm512_set1_ps(*av.add(i * ROW_BLOCK + r)), *wi, acc);
                    }
                    _mm512_mask_storeu_ps(y, mask, acc);
                }
                j += 16;
            }
        }
        for (i, &kk) in act.iter().enumerate().skip(groups * GEMV_ROWS) {
            let s = row(kk);
            let av = a.add(i * ROW_BLOCK);
            let mut j = j0;
            while j < j1 {
                let mask: __mmask16 = if j1 - j >= 16 {
                    0xffff
                } else {
                    (1u16 << (j1 - j)) - 1
                };
                let w = _mm512_maskz_loadu_ps(mask, s.add(j));
                for r in 0..rows {
                    let y = out.add(r * ldo + j);
                    let acc = _mm512_maskz_loadu_ps(mask, y);
                    let acc = _mm512_fmadd_ps(_mm512_set1_ps(*av.add(r)), w, acc);
                    _mm512_mask_storeu_ps(y, mask, acc);
                }
                j += 16;
            }
        }
    }
}

/// The portable row-block kernel compiled with AVX2 + FMA.
///
/// # Safety
/// As [`Kernel::rows`]; the CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn rows_avx2(
    ap: &[f32],
    act: &[u32],
    b: *const f32,
    n: usize,
    j0: usize,
    j1: usize,
    rows: usize,
    out: *mut f32,
    ldo: usize,
) {
    // SAFETY: forwarded.
    unsafe { rows_portable(ap, act, b, n, j0, j1, rows, out, ldo) }
}

/// The row-block kernel in plain loops: for each group of four active rows of B, each row
/// of the block adds the four in one pass over its `y` row.
///
/// # Safety
/// As [`Kernel::rows`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn rows_portable(
    ap: &[f32],
    act: &[u32],
    b: *const f32,
    n: usize,
    j0: usize,
    j1: usize,
    rows: usize,
    out: *mut f32,
    ldo: usize,
) {
    let w = j1 - j0;
    // SAFETY: by the contract, every `b[kk, j0..j1]` is in bounds.
    let brow = |kk: u32| unsafe { std::slice::from_raw_parts(b.add(kk as usize * n + j0), w) };
    let mut quads = act.chunks_exact(GEMV_ROWS);
    let mut i0 = 0;
    for q in quads.by_ref() {
        let (b0, b1, b2, b3) = (brow(q[0]), brow(q[1]), brow(q[2]), brow(q[3]));
        for r in 0..rows {
            let x = [0, 1, 2, 3].map(|i| ap[(i0 + i) * ROW_BLOCK + r]);
            // SAFETY: row `r < rows` of the output, columns `j0..j1`.
            let y = unsafe { std::slice::from_raw_parts_mut(out.add(r * ldo + j0), w) };
            for c in 0..w {
                y[c] += x[0] * b0[c] + x[1] * b1[c] + (x[2] * b2[c] + x[3] * b3[c]);
            }
        }
        i0 += GEMV_ROWS;
    }
    for (i, &kk) in quads.remainder().iter().enumerate() {
        let b0 = brow(kk);
        for r in 0..rows {
            let x = ap[(i0 + i) * ROW_BLOCK + r];
            // SAFETY: as above.
            let y = unsafe { std::slice::from_raw_parts_mut(out.add(r * ldo + j0), w) };
            for (yc, &bc) in y.iter_mut().zip(b0) {
                *yc += x * bc;
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
        for isa in kernels() {
            let mut sparse = vec![MaybeUninit::new(f32::NAN); m * n];
            sparse_gemm_with(isa, &pool, &a, m, k, &b, n, &act, &mut sparse, &ep).unwrap();
            let scale = dense.iter().fold(1e-6f32, |s, x| s.max(x.abs()));
            for (i, (s, d)) in sparse.iter().zip(&dense).enumerate() {
                // SAFETY: initialised above and overwritten by the kernel.
                let s = unsafe { s.assume_init() };
                // A NaN fails the comparison.
                assert!(
                    (s - d).abs() <= SPARSE_VS_DENSE_TOLERANCE * scale,
                    "{isa:?} m={m} k={k} n={n} density={density} threads={threads}: [{i}] {s} vs {d}"
                );
            }
        }
    }

    /// The kernels this CPU can run (the portable one always).
    fn kernels() -> Vec<Kernel> {
        let mut v = vec![Kernel::Portable];
        if super::super::avx2::available() {
            v.push(Kernel::Avx2);
        }
        if super::super::avx512::available() {
            v.push(Kernel::Avx512);
        }
        v
    }

    #[test]
    fn sparse_equals_dense_at_every_density() {
        // One row: short and long column ranges (64-wide steps, 16-wide and masked tails,
        // one group of four rows or fewer); many rows: ragged blocks, 64-wide steps and masked tails.
        for density in [0.0, 0.03, 0.3, 0.5, 0.9, 1.0] {
            for (m, k, n) in [
                (1, 96, 40),
                (1, 300, 77),
                (1, 3, 200),
                (1, 700, 1000),
                (5, 64, 33),
                (8, 256, 64),
                (19, 128, 70),
                (130, 200, 100),
            ] {
                for threads in [1, 3] {
                    check(m, k, n, density, threads);
                }
            }
        }
    }

    #[test]
    fn a_nan_activation_propagates() {
        let (m, k, n) = (9, 40, 50);
        for isa in kernels() {
            for m in [1, m] {
                let mut a = vec![0f32; m * k];
                a[m * k - 3] = f32::NAN;
                let b = vec![1f32; k * n];
                let (act, _) = active_columns(&a, m, k);
                let mut c = vec![MaybeUninit::new(0f32); m * n];
                let pool = Pool::single();
                sparse_gemm_with(
                    isa,
                    &pool,
                    &a,
                    m,
                    k,
                    &b,
                    n,
                    &act,
                    &mut c,
                    &Epilogue::default(),
                )
                .unwrap();
                // SAFETY: written by the kernel.
                let last = unsafe { c[(m - 1) * n + n - 1].assume_init() };
                assert!(last.is_nan(), "{isa:?} m={m}: {last}");
                if m > 1 {
                    // SAFETY: as above.
                    let first = unsafe { c[0].assume_init() };
                    assert_eq!(first, 0.0, "{isa:?}");
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
