//! The AVX-512F micro-kernel: an `MR × NR` = 12 × 32 tile in 24 zmm accumulators, two B
//! vectors per k step and the A value broadcast from memory into each FMA (26 of 32
//! registers). Partial right-edge panels are stored with `__mmask16` masks, so no tile buffer
//! is needed; the epilogue runs in AVX-512 on the tile while it is in L1.

use super::{simd, APanel, Ctx, Epilogue, MicroKernel, OutPtr, Prefetch};

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Rows of the register tile. Measured with `gemm_bench --quick` on the Sapphire-Rapids-class
/// Xeon (1 thread, busy machine, best of trials; GFLOP/s on 128×768×768 / 128×2000×768):
/// 8 × 32: 151 / 139, 12 × 32: 151–158 / 151, 14 × 32: 158 / 135–152. 12 rows keep 24
/// independent FMA chains (2 ports × latency 4 needs 8) and divide the common M = 128 into
/// 10 full tiles + 8 rows (14 leaves a 2-row tile).
pub(super) const MR: usize = 12;
/// Columns of the register tile (two zmm vectors of 16 f32).
pub(super) const NR: usize = 32;
/// Depth of a K slab: the `KC × NR` B panel (32 KiB) that the `ir` loop reuses stays in the
/// 48 KiB L1d next to the streamed `MR × KC` A panel (12 KiB).
pub(super) const KC: usize = 256;
/// Rows of a packed A block: `MC × KC` f32 = 384 KiB, a fifth of the 2 MiB L2, so the block
/// and the B panels streaming through L2 do not evict each other.
pub(super) const MC: usize = 384;

/// Whether the running CPU has AVX-512F.
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The loop nest compiled with AVX-512F enabled.
///
/// # Safety
/// The CPU supports AVX-512F ([`available`] returned true).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
pub(super) unsafe fn run(ctx: &Ctx<'_>, i_lo: usize, i_hi: usize, p_lo: usize, p_hi: usize) {
    ctx.block_loop::<Avx512>(i_lo, i_hi, p_lo, p_hi)
}

/// Never called: [`available`] is false off x86-64.
///
/// # Safety
/// None needed; present for symmetry.
#[cfg(not(target_arch = "x86_64"))]
pub(super) unsafe fn run(ctx: &Ctx<'_>, i_lo: usize, i_hi: usize, p_lo: usize, p_hi: usize) {
    ctx.block_loop::<super::portable::Portable>(i_lo, i_hi, p_lo, p_hi)
}

#[cfg(target_arch = "x86_64")]
struct Avx512;

#[cfg(target_arch = "x86_64")]
impl MicroKernel for Avx512 {
    const MR: usize = MR;
    const NR: usize = NR;
    const KC: usize = KC;
    const MC: usize = MC;
    const DIRECT_A: bool = true;

    #[inline(always)]
    unsafe fn kernel(
        kc: usize,
        a: APanel,
        b: &[f32],
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        accumulate: bool,
        pf: Prefetch,
    ) {
        debug_assert!(b.len() >= kc * NR && (1..=MR).contains(&rows) && (1..=NR).contains(&cols));
        let b = b.as_ptr();
        // Lanes of the two column vectors that lie inside C.
        let m0: __mmask16 = if cols >= 16 {
            0xffff
        } else {
            (1u16 << cols) - 1
        };
        let m1: __mmask16 = if cols >= 32 {
            0xffff
        } else if cols > 16 {
            (1u16 << (cols - 16)) - 1
        } else {
            0
        };
        let m = (m0, m1);
        // SAFETY: forwarded from the trait contract (CPU features, buffer sizes, `c` tile).
        unsafe {
            // One monomorphised tile per (rows, prefetch?, A in place?).
            macro_rules! by_rows {
                ($pf:literal, $direct:literal) => {
                    match rows {
                        12 => tile::<12, 1, $pf, $direct>(kc, a, b, c, ldc, m, accumulate, pf),
                        11 => tile::<11, 1, $pf, $direct>(kc, a, b, c, ldc, m, accumulate, pf),
                        10 => tile::<10, 1, $pf, $direct>(kc, a, b, c, ldc, m, accumulate, pf),
                        9 => tile::<9, 1, $pf, $direct>(kc, a, b, c, ldc, m, accumulate, pf),
                        8 => tile::<8, 1, $pf, $direct>(kc, a, b, c, ldc, m, accumulate, pf),
                        7 => tile::<7, 1, $pf, $direct>(kc, a, b, c, ldc, m, accumulate, pf),
                        6 => tile::<6, 1, $pf, $direct>(kc, a, b, c, ldc, m, accumulate, pf),
                        5 => tile::<5, 1, $pf, $direct>(kc, a, b, c, ldc, m, accumulate, pf),
                        4 => tile::<4, 1, $pf, $direct>(kc, a, b, c, ldc, m, accumulate, pf),
                        3 => tile::<3, 2, $pf, $direct>(kc, a, b, c, ldc, m, accumulate, pf),
                        2 => tile::<2, 2, $pf, $direct>(kc, a, b, c, ldc, m, accumulate, pf),
                        _ => tile::<1, 4, $pf, $direct>(kc, a, b, c, ldc, m, accumulate, pf),
                    }
                };
            }
            match (pf.lines > 0, a.row_step != 1) {
                (false, false) => by_rows!(false, false),
                (false, true) => by_rows!(false, true),
                (true, false) => by_rows!(true, false),
                (true, true) => by_rows!(true, true),
            }
        }
    }

    #[inline(always)]
    unsafe fn epilogue(
        ep: &Epilogue<'_>,
        out: OutPtr,
        i0: usize,
        rows: usize,
        j0: usize,
        w: usize,
    ) {
        // SAFETY: forwarded; AVX-512F is enabled in the caller (`run`).
        unsafe { simd::apply::<simd::Avx512>(ep, out, i0, rows, j0, w) }
    }
}

/// `C[R × cols] (+)= A[R × kc] · B[kc × 32]`: A from a packed panel (k-major, rows adjacent)
/// or, with `DIRECT`, in place (row `r` at `r·row_step`), B from its packed panel (k-major
/// with stride NR). `U` copies of the accumulators take alternate k steps
/// so that at least eight FMA chains are in flight for one to three rows. With `PF`, the k steps
/// also prefetch `pf`'s lines of the next B panel into L2: weights are read from L3 (they do
/// not stay in L2 between calls), and the hardware prefetchers stop at each 4 KiB page.
///
/// # Safety
/// AVX-512F available; `a` readable at `p·a_step + r` for `p < kc`, `r < R`; `b` for `kc·NR`
/// values; `c` writable for `R` rows at stride `ldc` in the lanes the masks select.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn tile<const R: usize, const U: usize, const PF: bool, const DIRECT: bool>(
    kc: usize,
    a: APanel,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    (m0, m1): (__mmask16, __mmask16),
    accumulate: bool,
    pf: Prefetch,
) {
    // SAFETY: every read stays inside the ranges the caller guarantees; masked loads and
    // stores touch only the lanes inside C (pointers past it are formed with wrapping_add and
    // only dereferenced under a mask that excludes them).
    unsafe {
        let mut acc = [[[_mm512_setzero_ps(); 2]; R]; U];
        let (mut ap, mut bp) = (a.ptr, b);
        // Row `r` of A at `r·rs`: 1 in a packed panel (a constant the addressing folds), A's
        // row stride when read in place.
        let rs = if DIRECT { a.row_step } else { 1 };
        for q in 0..kc / U {
            for (u, acc_u) in acc.iter_mut().enumerate() {
                step::<R>(acc_u, ap, rs, bp);
                if PF {
                    pf.step(q * U + u);
                }
                ap = ap.add(a.k_step);
                bp = bp.add(NR);
            }
        }
        for _ in 0..kc % U {
            step::<R>(&mut acc[0], ap, rs, bp);
            ap = ap.add(a.k_step);
            bp = bp.add(NR);
        }
        for r in 0..R {
            let (mut lo, mut hi) = (acc[0][r][0], acc[0][r][1]);
            for acc_u in &acc[1..] {
                lo = _mm512_add_ps(lo, acc_u[r][0]);
                hi = _mm512_add_ps(hi, acc_u[r][1]);
            }
            let c0 = c.add(r * ldc);
            let c1 = c0.wrapping_add(16);
            if accumulate {
                lo = _mm512_add_ps(lo, _mm512_maskz_loadu_ps(m0, c0));
                hi = _mm512_add_ps(hi, _mm512_maskz_loadu_ps(m1, c1));
            }
            _mm512_mask_storeu_ps(c0, m0, lo);
            _mm512_mask_storeu_ps(c1, m1, hi);
        }
    }
}

/// One k step of an `R × 32` tile: two B vectors, `2R` FMAs with a broadcast A operand.
///
/// # Safety
/// AVX-512F available; `ap` readable for `R` values, `bp` for 32.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn step<const R: usize>(
    acc: &mut [[__m512; 2]; R],
    ap: *const f32,
    rs: usize,
    bp: *const f32,
) {
    // SAFETY: the reads stay inside the ranges the caller guarantees.
    unsafe {
        let b0 = _mm512_loadu_ps(bp);
        let b1 = _mm512_loadu_ps(bp.add(16));
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let av = _mm512_set1_ps(*ap.add(r * rs));
            acc_r[0] = _mm512_fmadd_ps(av, b0, acc_r[0]);
            acc_r[1] = _mm512_fmadd_ps(av, b1, acc_r[1]);
        }
    }
}
