//! The AVX-512F micro-kernel: an `MR × NR` = 12 × 32 tile in 24 zmm accumulators, two B
//! vectors per k step and the A value broadcast from memory into each FMA (27 of 32
//! registers). Tiles of 8 to 12 rows run the k loop in inline assembly ([`kloop`]), shorter
//! ones (a block's ragged bottom) a Rust loop. Partial right-edge panels are stored with
//! `__mmask16` masks, so no tile buffer is needed; the epilogue runs in AVX-512 on the tile
//! while it is in L1.

use super::{kernel_then_epilogue, simd, APanel, Ctx, Epilogue, MicroKernel, OutPtr, Prefetch};

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
/// Depth of a K slab: the `KC × NR` B panel (96 KiB) that the `ir` loop reuses is read from
/// L2. A K of up to 1152 is then one slab, so C is written once instead of accumulated per
/// slab (one thread, calls rotating over six weight matrices so that B comes from L3,
/// GFLOP/s on 128 × 3072 × 768 / 128 × 768 × 3072: KC 256 (a 32 KiB panel in L1d) 163 / 167,
/// 128 158 / 160, 512 173 / 169, 768 174 / 171, 1024 173 / 171).
pub(super) const KC: usize = 768;
/// Rows of C per block (of a packed A block when A is not read in place). 192 was level
/// (faster on 512 × 768 × 768, slower on ViT's 197 rows, which 384 keeps in one block).
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
            // Short tiles (the ragged bottom of a block): one monomorphised Rust loop per
            // (rows, prefetch?, A in place?).
            macro_rules! by_rows {
                ($pf:literal, $direct:literal) => {
                    match rows {
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
            if rows >= ASM_MIN_ROWS {
                let acc = kloop(rows, kc, a, b, pf);
                store(&acc, rows, c, ldc, m, accumulate);
                return;
            }
            match (pf.lines > 0, a.row_step != 1) {
                (false, false) => by_rows!(false, false),
                (false, true) => by_rows!(false, true),
                (true, false) => by_rows!(true, false),
                (true, true) => by_rows!(true, true),
            }
        }
    }

    /// Full-width tiles of the assembly loop take the epilogue in registers before their one
    /// store ([`simd::apply_regs`]); the rest store, then run it on the tile in memory.
    #[inline(always)]
    unsafe fn kernel_last(
        kc: usize,
        a: APanel,
        b: &[f32],
        (out, i0, j0): (OutPtr, usize, usize),
        rows: usize,
        cols: usize,
        accumulate: bool,
        pf: Prefetch,
        ep: &Epilogue<'_>,
    ) {
        // SAFETY: forwarded from the trait contract (CPU features, buffer sizes, the tile
        // inside the output, `ep` checked against it).
        unsafe {
            let unit_residual = ep.residual.as_ref().is_none_or(|r| r.cs == 1);
            if ep.is_plain() || cols != NR || rows < ASM_MIN_ROWS || !unit_residual {
                let tile = (out, i0, j0);
                return kernel_then_epilogue::<Self>(
                    kc, a, b, tile, rows, cols, accumulate, pf, ep,
                );
            }
            let c = out.ptr.add(i0 * out.rs + j0);
            debug_assert!(b.len() >= kc * NR);
            let mut acc = kloop(rows, kc, a, b.as_ptr(), pf);
            if accumulate {
                for r in 0..rows {
                    let row = c.add(r * out.rs);
                    acc[2 * r] = _mm512_add_ps(acc[2 * r], _mm512_loadu_ps(row));
                    acc[2 * r + 1] = _mm512_add_ps(acc[2 * r + 1], _mm512_loadu_ps(row.add(16)));
                }
            }
            simd::apply_regs::<simd::Avx512>(ep, &mut acc, rows, i0, j0);
            store(&acc, rows, c, out.rs, (0xffff, 0xffff), false);
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
        let mut sum = [_mm512_setzero_ps(); 2 * MR];
        for r in 0..R {
            let (mut lo, mut hi) = (acc[0][r][0], acc[0][r][1]);
            for acc_u in &acc[1..] {
                lo = _mm512_add_ps(lo, acc_u[r][0]);
                hi = _mm512_add_ps(hi, acc_u[r][1]);
            }
            sum[2 * r] = lo;
            sum[2 * r + 1] = hi;
        }
        store(&sum, R, c, ldc, (m0, m1), accumulate);
    }
}

/// Stores (or, with `accumulate`, adds) rows `0..rows` of a finished tile, row `r` in
/// `acc[2r]` (columns 0–15) and `acc[2r + 1]` (16–31), into C under the column masks.
///
/// # Safety
/// AVX-512F available; `c` writable for `rows` rows at stride `ldc` in the masked lanes (and
/// readable there when accumulating).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn store(
    acc: &[__m512; 2 * MR],
    rows: usize,
    c: *mut f32,
    ldc: usize,
    (m0, m1): (__mmask16, __mmask16),
    accumulate: bool,
) {
    // SAFETY: masked loads and stores touch only the lanes inside C (pointers past it are
    // formed with wrapping_add and only dereferenced under a mask that excludes them).
    unsafe {
        for r in 0..rows {
            let (mut lo, mut hi) = (acc[2 * r], acc[2 * r + 1]);
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

/// Tiles of at least this many rows run the k loop in inline assembly ([`kloop`]).
const ASM_MIN_ROWS: usize = 8;

/// k steps per iteration of the assembly loop: their A and B offsets are folded into the
/// addressing, so the five pointer updates come once per four steps and take fewer issue
/// slots beside the FMAs (one thread, weights from L3: 128 × 768 × 768 164 → 172 GFLOP/s,
/// 128 × 3072 × 768 155 → 161, 197 × 1536 × 384 161 → 172).
const UNROLL: usize = 4;

/// The k loop of an `R × 32` tile (`8 <= R <= 12`) in inline assembly, returning the
/// accumulators (row `r` in elements `2r`, `2r + 1`; the rest zero).
///
/// Written in assembly because the compiler's register allocation of the same loop in Rust
/// moved with unrelated edits: A read in place (rows at a stride) came out with the stride
/// spilled and reloaded eleven times per k step, or with twelve row pointers on the stack,
/// and ran at 134–160 GFLOP/s where this loop runs at 185 (384 × 32 × 256, B in L1, one
/// thread). Row `r` of A is addressed as `base[r / 3] + (r % 3)·row_step` with four base
/// registers (rows 0, 3, 6, 9) and the row stride in bytes, the same code for a packed panel
/// (stride 4 bytes) and A in place, four k steps per iteration ([`UNROLL`]). The loop also
/// prefetches `pf`'s lines of the next B panel into L2, two lines every `kc / ceil(lines / 2)`
/// k steps (rounded to whole iterations): issued two per k step at the start of the tile, the
/// prefetches of weights coming from DRAM outnumbered the line fill buffers
/// (128 × 3072 × 768 with weights from DRAM, one thread: 142 → 157–161 GFLOP/s spread out).
///
/// # Safety
/// AVX-512F available; as [`MicroKernel::kernel`]: A readable at `p·k_step + r·row_step`
/// for `p < kc`, `r < rows`; `b` readable for `kc·NR` values. `8 <= rows <= 12`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn kloop(
    rows: usize,
    kc: usize,
    a: APanel,
    b: *const f32,
    pf: Prefetch,
) -> [__m512; 2 * MR] {
    debug_assert!((ASM_MIN_ROWS..=MR).contains(&rows));
    let mut v = [_mm512_setzero_ps(); 2 * MR];
    let rs = a.row_step * 4;
    let ks = a.k_step * 4;
    // The loop body is four k steps with the A and B offsets folded into the addressing, so
    // the pointers advance once per four steps; the last `kc % 4` steps run one at a time.
    let sp = pf.spread(kc, UNROLL);
    let base = |r: usize| a.ptr.wrapping_add(r * a.row_step);
    // The loop for one tile height and A layout: the byte offsets of A in k steps 1–3 of a
    // group (`ks` times 1, 2, 3 as literals), then per row its A address and its two
    // accumulators.
    macro_rules! kloop_asm {
        ($d1:literal $d2:literal $d3:literal; $($row:tt $addr:tt $lo:tt $hi:tt),*) => {{
            // One k step as one template string: two B vectors at byte offset `$db`, per row
            // a broadcast of A at byte offset `$da` and two FMAs.
            macro_rules! kstep {
                ($da:literal, $db:literal) => {
                    concat!(
                        "vmovups zmm30, zmmword ptr [{b} + ", $db, "]\n",
                        "vmovups zmm31, zmmword ptr [{b} + ", $db, " + 64]\n",
                        $("vbroadcastss zmm28, dword ptr [", $addr, " + ", $da, "]\n",
                          "vfmadd231ps ", $lo, ", zmm28, zmm30\n",
                          "vfmadd231ps ", $hi, ", zmm28, zmm31\n",)*
                    )
                };
            }
            // Four k steps, then the pointers advanced by four.
            macro_rules! kgroup {
                () => {
                    concat!(
                        kstep!("0", "0"),
                        kstep!($d1, "128"),
                        kstep!($d2, "256"),
                        kstep!($d3, "384"),
                        "add {b}, 512\n",
                        "add {a0}, {ks4}\n",
                        "add {a3}, {ks4}\n",
                        "add {a6}, {ks4}\n",
                        "add {a9}, {ks4}",
                    )
                };
            }
            // One k step, then the pointers advanced by one.
            macro_rules! kstep1 {
                () => {
                    concat!(
                        kstep!("0", "0"),
                        "add {b}, 128\n",
                        "add {a0}, {ks}\n",
                        "add {a3}, {ks}\n",
                        "add {a6}, {ks}\n",
                        "add {a9}, {ks}",
                    )
                };
            }
            // SAFETY: reads A and B inside the ranges the caller guarantees; prefetches are
            // hints that never fault; every register written is an operand or clobbered.
            unsafe {
                std::arch::asm!(
                    $(concat!("vxorps ", $lo, ", ", $lo, ", ", $lo),
                      concat!("vxorps ", $hi, ", ", $hi, ", ", $hi),)*
                    spread_kloop!([kgroup!()], [kstep1!()]),
                    a0 = inout(reg) base(0) => _,
                    a3 = inout(reg) base(3) => _,
                    a6 = inout(reg) base(6) => _,
                    a9 = inout(reg) base(9) => _,
                    rs = in(reg) rs,
                    ks = in(reg) ks,
                    ks4 = in(reg) UNROLL * ks,
                    b = inout(reg) b => _,
                    pf = inout(reg) pf.ptr => _,
                    npf = inout(reg) sp.npf => _,
                    every = in(reg) sp.every,
                    c = out(reg) _,
                    n = inout(reg) sp.rest => _,
                    t = inout(reg) sp.tail => _,
                    $(out($lo) v[2 * $row], out($hi) v[2 * $row + 1],)*
                    out("zmm28") _, out("zmm30") _, out("zmm31") _,
                    options(nostack, readonly),
                );
            }
        }};
    }
    // Per tile height, the rows as `base[r / 3] + (r % 3)·rs`; per A layout, the offsets of
    // k steps 1–3: 4, 8, 12 bytes in place (k_step 1), 48, 96, 144 in a packed panel (k_step
    // MR = 12).
    macro_rules! by_height {
        ($d1:literal $d2:literal $d3:literal) => {
            match rows {
                12 => kloop_asm!($d1 $d2 $d3;
                    0 "{a0}" "zmm0" "zmm1", 1 "{a0} + {rs}" "zmm2" "zmm3", 2 "{a0} + 2*{rs}" "zmm4" "zmm5",
                    3 "{a3}" "zmm6" "zmm7", 4 "{a3} + {rs}" "zmm8" "zmm9", 5 "{a3} + 2*{rs}" "zmm10" "zmm11",
                    6 "{a6}" "zmm12" "zmm13", 7 "{a6} + {rs}" "zmm14" "zmm15", 8 "{a6} + 2*{rs}" "zmm16" "zmm17",
                    9 "{a9}" "zmm18" "zmm19", 10 "{a9} + {rs}" "zmm20" "zmm21", 11 "{a9} + 2*{rs}" "zmm22" "zmm23"),
                11 => kloop_asm!($d1 $d2 $d3;
                    0 "{a0}" "zmm0" "zmm1", 1 "{a0} + {rs}" "zmm2" "zmm3", 2 "{a0} + 2*{rs}" "zmm4" "zmm5",
                    3 "{a3}" "zmm6" "zmm7", 4 "{a3} + {rs}" "zmm8" "zmm9", 5 "{a3} + 2*{rs}" "zmm10" "zmm11",
                    6 "{a6}" "zmm12" "zmm13", 7 "{a6} + {rs}" "zmm14" "zmm15", 8 "{a6} + 2*{rs}" "zmm16" "zmm17",
                    9 "{a9}" "zmm18" "zmm19", 10 "{a9} + {rs}" "zmm20" "zmm21"),
                10 => kloop_asm!($d1 $d2 $d3;
                    0 "{a0}" "zmm0" "zmm1", 1 "{a0} + {rs}" "zmm2" "zmm3", 2 "{a0} + 2*{rs}" "zmm4" "zmm5",
                    3 "{a3}" "zmm6" "zmm7", 4 "{a3} + {rs}" "zmm8" "zmm9", 5 "{a3} + 2*{rs}" "zmm10" "zmm11",
                    6 "{a6}" "zmm12" "zmm13", 7 "{a6} + {rs}" "zmm14" "zmm15", 8 "{a6} + 2*{rs}" "zmm16" "zmm17",
                    9 "{a9}" "zmm18" "zmm19"),
                9 => kloop_asm!($d1 $d2 $d3;
                    0 "{a0}" "zmm0" "zmm1", 1 "{a0} + {rs}" "zmm2" "zmm3", 2 "{a0} + 2*{rs}" "zmm4" "zmm5",
                    3 "{a3}" "zmm6" "zmm7", 4 "{a3} + {rs}" "zmm8" "zmm9", 5 "{a3} + 2*{rs}" "zmm10" "zmm11",
                    6 "{a6}" "zmm12" "zmm13", 7 "{a6} + {rs}" "zmm14" "zmm15", 8 "{a6} + 2*{rs}" "zmm16" "zmm17"),
                _ => kloop_asm!($d1 $d2 $d3;
                    0 "{a0}" "zmm0" "zmm1", 1 "{a0} + {rs}" "zmm2" "zmm3", 2 "{a0} + 2*{rs}" "zmm4" "zmm5",
                    3 "{a3}" "zmm6" "zmm7", 4 "{a3} + {rs}" "zmm8" "zmm9", 5 "{a3} + 2*{rs}" "zmm10" "zmm11",
                    6 "{a6}" "zmm12" "zmm13", 7 "{a6} + {rs}" "zmm14" "zmm15"),
            }
        };
    }
    match a.k_step {
        1 => by_height!("4" "8" "12"),
        MR => by_height!("48" "96" "144"),
        _ => unreachable!("A panels step by 1 (in place) or MR (packed)"),
    }
    v
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
