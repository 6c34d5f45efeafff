//! The AVX2+FMA micro-kernel: an `MR × NR` = 6 × 16 tile in twelve ymm accumulators, two B
//! vectors and one A broadcast per k step (15 of 16 registers). Tiles of 4 to 6 rows of a
//! packed A panel run the k loop in inline assembly ([`kloop`]; 128 × 3072 × 768 with weights
//! from L3, one thread on the AVX-512 Xeon: 90 → 101 GFLOP/s, 90% of its AVX2 FMA peak), the
//! rest a Rust loop.

use super::{simd, APanel, Ctx, Epilogue, MicroKernel, OutPtr, Prefetch};

/// Rows of the register tile.
pub(super) const MR: usize = 6;
/// Columns of the register tile (two AVX2 vectors of 8 f32).
pub(super) const NR: usize = 16;
/// Depth of a K slab: one `KC × NR` B panel (16 KiB) plus one `MR × KC` A panel (6 KiB) stay
/// in a 32 KiB L1d (Zen 3; more room on larger L1s).
pub(super) const KC: usize = 256;
/// Rows of a packed A block: `MC × KC` f32 = 144 KiB, well inside a 512 KiB L2.
pub(super) const MC: usize = 144;

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Whether the running CPU has AVX2 and FMA.
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The loop nest compiled with AVX2+FMA enabled (the epilogue vectorises with it).
///
/// # Safety
/// The CPU supports AVX2 and FMA ([`available`] returned true).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn run(ctx: &Ctx<'_>, i_lo: usize, i_hi: usize, p_lo: usize, p_hi: usize) {
    ctx.block_loop::<Avx2>(i_lo, i_hi, p_lo, p_hi)
}

/// Never called: [`available`] is false off x86-64, so the portable kernel runs instead.
///
/// # Safety
/// None needed; present for symmetry.
#[cfg(not(target_arch = "x86_64"))]
pub(super) unsafe fn run(ctx: &Ctx<'_>, i_lo: usize, i_hi: usize, p_lo: usize, p_hi: usize) {
    ctx.block_loop::<super::portable::Portable>(i_lo, i_hi, p_lo, p_hi)
}

#[cfg(target_arch = "x86_64")]
struct Avx2;

#[cfg(target_arch = "x86_64")]
impl MicroKernel for Avx2 {
    const MR: usize = MR;
    const NR: usize = NR;
    const KC: usize = KC;
    const MC: usize = MC;

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
        debug_assert!(b.len() >= kc * NR && (1..=MR).contains(&rows));
        let b = b.as_ptr();
        // SAFETY: forwarded from the trait contract (CPU features, buffer sizes, `c` tile);
        // a partial-width tile goes through a full-width buffer.
        unsafe {
            let mut edge = super::EdgeTile::new();
            let (t, ldt, acc) = edge.target::<NR>(c, ldc, cols, accumulate);
            if rows >= ASM_MIN_ROWS && a.k_step == MR && a.row_step == 1 {
                let v = kloop(rows, kc, a, b, pf);
                for r in 0..rows {
                    let cr = t.add(r * ldt);
                    let (mut lo, mut hi) = (v[2 * r], v[2 * r + 1]);
                    if acc {
                        lo = _mm256_add_ps(lo, _mm256_loadu_ps(cr));
                        hi = _mm256_add_ps(hi, _mm256_loadu_ps(cr.add(8)));
                    }
                    _mm256_storeu_ps(cr, lo);
                    _mm256_storeu_ps(cr.add(8), hi);
                }
                edge.finish::<NR>(c, ldc, rows, cols, accumulate);
                return;
            }
            match rows {
                6 => tile::<6, 1>(kc, a, b, t, ldt, acc, pf),
                5 => tile::<5, 1>(kc, a, b, t, ldt, acc, pf),
                4 => tile::<4, 1>(kc, a, b, t, ldt, acc, pf),
                3 => tile::<3, 2>(kc, a, b, t, ldt, acc, pf),
                2 => tile::<2, 2>(kc, a, b, t, ldt, acc, pf),
                _ => tile::<1, 4>(kc, a, b, t, ldt, acc, pf),
            }
            edge.finish::<NR>(c, ldc, rows, cols, accumulate);
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
        // SAFETY: forwarded; AVX2+FMA are enabled in the caller (`run`).
        unsafe { simd::apply::<simd::Avx2>(ep, out, i0, rows, j0, w) }
    }
}

/// `C[R × 16] (+)= A[R × kc] · B[kc × 16]` from packed panels (A k-major with stride MR, B
/// k-major with stride NR; `a_step` is MR for a packed panel). `U` copies of the accumulators take alternate k steps so that at
/// least eight FMA chains are in flight (FMA latency 4 × 2 ports) even for one or two rows.
/// The k steps also prefetch `pf`'s lines of the next B panel into L2, as the AVX-512 kernel
/// does.
///
/// # Safety
/// AVX2+FMA available; `a` readable for `kc·MR`, `b` for `kc·NR` values; `c` writable for
/// `R` rows of 16 with row stride `ldc`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn tile<const R: usize, const U: usize>(
    kc: usize,
    a: APanel,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    pf: Prefetch,
) {
    // SAFETY: every pointer offset below stays inside the ranges the caller guarantees:
    // step `p < kc` reads a[p·MR + r] (r < R <= MR) and b[p·NR .. p·NR + 16]; the stores
    // touch c[r·ldc .. r·ldc + 16] for r < R.
    unsafe {
        let mut acc = [[[_mm256_setzero_ps(); 2]; R]; U];
        let (mut ap, mut bp, rs) = (a.ptr, b, a.row_step);
        for q in 0..kc / U {
            for (u, acc_u) in acc.iter_mut().enumerate() {
                step::<R>(acc_u, ap, rs, bp);
                pf.step(q * U + u);
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
                lo = _mm256_add_ps(lo, acc_u[r][0]);
                hi = _mm256_add_ps(hi, acc_u[r][1]);
            }
            let cr = c.add(r * ldc);
            if accumulate {
                lo = _mm256_add_ps(lo, _mm256_loadu_ps(cr));
                hi = _mm256_add_ps(hi, _mm256_loadu_ps(cr.add(8)));
            }
            _mm256_storeu_ps(cr, lo);
            _mm256_storeu_ps(cr.add(8), hi);
        }
    }
}

/// One k step of an `R × 16` tile: two B vectors, `R` A broadcasts, `2R` FMAs. A function,
/// not a closure, so that it inlines into the `avx2,fma` caller and inherits its features.
///
/// # Safety
/// AVX2+FMA available; `ap` readable for `R` values, `bp` for 16.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn step<const R: usize>(
    acc: &mut [[__m256; 2]; R],
    ap: *const f32,
    rs: usize,
    bp: *const f32,
) {
    // SAFETY: the reads stay inside the ranges the caller guarantees.
    unsafe {
        let b0 = _mm256_loadu_ps(bp);
        let b1 = _mm256_loadu_ps(bp.add(8));
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let av = _mm256_broadcast_ss(&*ap.add(r * rs));
            acc_r[0] = _mm256_fmadd_ps(av, b0, acc_r[0]);
            acc_r[1] = _mm256_fmadd_ps(av, b1, acc_r[1]);
        }
    }
}

/// Tiles of at least this many rows of a packed A panel run the k loop in inline assembly
/// ([`kloop`]).
const ASM_MIN_ROWS: usize = 4;

/// k steps per iteration of the assembly loop (offsets folded into the addressing).
const UNROLL: usize = 4;

/// The k loop of an `R × 16` tile (`4 <= R <= 6`) over a packed A panel, in inline assembly
/// as the AVX-512 kernel's ([`super::avx512`]): four k steps per iteration with the A and B
/// offsets in the addressing (one pointer update per four steps instead of the Rust loop's
/// per-step updates and prefetch checks), and the next B panel's prefetches spread over the
/// iterations. Returns the accumulators (row `r` in elements `2r`, `2r + 1`).
///
/// # Safety
/// AVX2+FMA available; `a` a packed panel (`k_step = MR`, `row_step = 1`) readable for
/// `kc·MR` values; `b` readable for `kc·NR`. `4 <= rows <= 6`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn kloop(
    rows: usize,
    kc: usize,
    a: APanel,
    b: *const f32,
    pf: Prefetch,
) -> [__m256; 2 * MR] {
    debug_assert!((ASM_MIN_ROWS..=MR).contains(&rows) && a.k_step == MR && a.row_step == 1);
    let mut v = [_mm256_setzero_ps(); 2 * MR];
    let sp = pf.spread(kc, UNROLL);
    // Per row: its byte offset in a k step of the panel and its two accumulators.
    macro_rules! kloop_asm {
        ($($row:tt $off:literal $lo:tt $hi:tt),*) => {{
            // One k step at A byte offset `$da` and B byte offset `$db`.
            macro_rules! kstep {
                ($da:literal, $db:literal) => {
                    concat!(
                        "vmovups ymm13, ymmword ptr [{b} + ", $db, "]\n",
                        "vmovups ymm14, ymmword ptr [{b} + ", $db, " + 32]\n",
                        $("vbroadcastss ymm15, dword ptr [{a} + ", $da, " + ", $off, "]\n",
                          "vfmadd231ps ", $lo, ", ymm15, ymm13\n",
                          "vfmadd231ps ", $hi, ", ymm15, ymm14\n",)*
                    )
                };
            }
            // Four k steps (A: 24 bytes each, B: 64), then the pointers advanced.
            macro_rules! kgroup {
                () => {
                    concat!(
                        kstep!("0", "0"),
                        kstep!("24", "64"),
                        kstep!("48", "128"),
                        kstep!("72", "192"),
                        "add {b}, 256\n",
                        "add {a}, 96",
                    )
                };
            }
            // One k step, then the pointers advanced by one.
            macro_rules! kstep1 {
                () => {
                    concat!(kstep!("0", "0"), "add {b}, 64\n", "add {a}, 24")
                };
            }
            // SAFETY: reads A and B inside the ranges the caller guarantees; prefetches are
            // hints that never fault; every register written is an operand or clobbered.
            unsafe {
                std::arch::asm!(
                    $(concat!("vxorps ", $lo, ", ", $lo, ", ", $lo),
                      concat!("vxorps ", $hi, ", ", $hi, ", ", $hi),)*
                    spread_kloop!([kgroup!()], [kstep1!()]),
                    a = inout(reg) a.ptr => _,
                    b = inout(reg) b => _,
                    pf = inout(reg) pf.ptr => _,
                    npf = inout(reg) sp.npf => _,
                    every = in(reg) sp.every,
                    c = out(reg) _,
                    n = inout(reg) sp.rest => _,
                    t = inout(reg) sp.tail => _,
                    $(out($lo) v[2 * $row], out($hi) v[2 * $row + 1],)*
                    out("ymm13") _, out("ymm14") _, out("ymm15") _,
                    options(nostack, readonly),
                );
            }
        }};
    }
    match rows {
        6 => kloop_asm!(0 "0" "ymm0" "ymm1", 1 "4" "ymm2" "ymm3", 2 "8" "ymm4" "ymm5",
            3 "12" "ymm6" "ymm7", 4 "16" "ymm8" "ymm9", 5 "20" "ymm10" "ymm11"),
        5 => kloop_asm!(0 "0" "ymm0" "ymm1", 1 "4" "ymm2" "ymm3", 2 "8" "ymm4" "ymm5",
            3 "12" "ymm6" "ymm7", 4 "16" "ymm8" "ymm9"),
        _ => kloop_asm!(0 "0" "ymm0" "ymm1", 1 "4" "ymm2" "ymm3", 2 "8" "ymm4" "ymm5",
            3 "12" "ymm6" "ymm7"),
    }
    v
}
