//! The attention kernel's AVX-512 score and `P·V` tiles (8 rows × 32 columns) with their
//! k loop in inline assembly.
//!
//! Both tiles broadcast one value per row from a row-major operand read in place (Q rows at
//! stride `d`, P rows at stride `kb`). Written in Rust, the compiler's addressing of those
//! eight strided rows moved with unrelated edits (a multiply and a chain of adds per k step, or
//! spilled strides), as it did in the GEMM kernel (`gemm/avx512.rs`); here the rows are three
//! base registers plus the row stride in bytes (`[p]`, `[p + rs]`, `[p + 2·rs]`).

use std::arch::x86_64::*;

/// `acc[2r + v] += Σ_{p < n} a[r·rs + p] · b[p·bs + 16v .. + 16]` for rows `r < 8`.
///
/// # Safety
/// AVX-512F available; `a` readable at `r·rs + p` and `b` at `p·bs + c` for `r < 8`,
/// `p < n`, `c < 32`.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn fma_8x32(
    acc: &mut [__m512; 16],
    a: *const f32,
    rs: usize,
    b: *const f32,
    bs: usize,
    n: usize,
) {
    if n == 0 {
        return;
    }
    // SAFETY: reads stay inside the ranges the caller guarantees; every register written is
    // an operand or clobbered.
    unsafe {
        std::arch::asm!(
            "2:",
            "vmovups zmm30, zmmword ptr [{b}]",
            "vmovups zmm31, zmmword ptr [{b} + 64]",
            "vbroadcastss zmm28, dword ptr [{a0}]",
            "vfmadd231ps zmm0, zmm28, zmm30",
            "vfmadd231ps zmm1, zmm28, zmm31",
            "vbroadcastss zmm29, dword ptr [{a0} + {rs}]",
            "vfmadd231ps zmm2, zmm29, zmm30",
            "vfmadd231ps zmm3, zmm29, zmm31",
            "vbroadcastss zmm28, dword ptr [{a0} + 2*{rs}]",
            "vfmadd231ps zmm4, zmm28, zmm30",
            "vfmadd231ps zmm5, zmm28, zmm31",
            "vbroadcastss zmm29, dword ptr [{a3}]",
            "vfmadd231ps zmm6, zmm29, zmm30",
            "vfmadd231ps zmm7, zmm29, zmm31",
            "vbroadcastss zmm28, dword ptr [{a3} + {rs}]",
            "vfmadd231ps zmm8, zmm28, zmm30",
            "vfmadd231ps zmm9, zmm28, zmm31",
            "vbroadcastss zmm29, dword ptr [{a3} + 2*{rs}]",
            "vfmadd231ps zmm10, zmm29, zmm30",
            "vfmadd231ps zmm11, zmm29, zmm31",
            "vbroadcastss zmm28, dword ptr [{a6}]",
            "vfmadd231ps zmm12, zmm28, zmm30",
            "vfmadd231ps zmm13, zmm28, zmm31",
            "vbroadcastss zmm29, dword ptr [{a6} + {rs}]",
            "vfmadd231ps zmm14, zmm29, zmm30",
            "vfmadd231ps zmm15, zmm29, zmm31",
            "add {b}, {bs}",
            "add {a0}, 4",
            "add {a3}, 4",
            "add {a6}, 4",
            "dec {n}",
            "jnz 2b",
            a0 = inout(reg) a => _,
            a3 = inout(reg) a.wrapping_add(3 * rs) => _,
            a6 = inout(reg) a.wrapping_add(6 * rs) => _,
            rs = in(reg) rs * 4,
            b = inout(reg) b => _,
            bs = in(reg) bs * 4,
            n = inout(reg) n => _,
            inout("zmm0") acc[0], inout("zmm1") acc[1], inout("zmm2") acc[2],
            inout("zmm3") acc[3], inout("zmm4") acc[4], inout("zmm5") acc[5],
            inout("zmm6") acc[6], inout("zmm7") acc[7], inout("zmm8") acc[8],
            inout("zmm9") acc[9], inout("zmm10") acc[10], inout("zmm11") acc[11],
            inout("zmm12") acc[12], inout("zmm13") acc[13], inout("zmm14") acc[14],
            inout("zmm15") acc[15],
            out("zmm28") _, out("zmm29") _, out("zmm30") _, out("zmm31") _,
            options(nostack, readonly),
        );
    }
}

/// Scores of 8 query rows × 32 keys: `sc[r·kb + c] = scale · Σ_dd q[r·qs + dd] · kt[dd·kb + c]`.
///
/// # Safety
/// AVX-512F available; `q` readable for 8 rows of `d` at stride `qs`; `kt` at `dd·kb + c`
/// for `dd < d`, `c < 32`; `sc` writable at `r·kb + c` for `r < 8`, `c < 32`.
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn qk_8x32(
    q: *const f32,
    qs: usize,
    d: usize,
    kt: *const f32,
    kb: usize,
    sc: *mut f32,
    scale: f32,
) {
    let mut acc = [_mm512_setzero_ps(); 16];
    // SAFETY: forwarded from the caller's contract.
    unsafe {
        fma_8x32(&mut acc, q, qs, kt, kb, d);
        let s = _mm512_set1_ps(scale);
        for (i, a) in acc.iter().enumerate() {
            _mm512_storeu_ps(sc.add((i / 2) * kb + (i % 2) * 16), _mm512_mul_ps(*a, s));
        }
    }
}

/// `o[r·dvp + c] += Σ_{j < kn} p[r·kb + j] · v[j·vs + c]` for 8 rows × 32 columns.
///
/// # Safety
/// AVX-512F available; `p` readable at `r·kb + j`, `v` at `j·vs + c`, and `o` readable and
/// writable at `r·dvp + c`, for `r < 8`, `j < kn`, `c < 32`.
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn pv_8x32(
    p: *const f32,
    kb: usize,
    v: *const f32,
    vs: usize,
    kn: usize,
    o: *mut f32,
    dvp: usize,
) {
    // SAFETY: forwarded from the caller's contract.
    unsafe {
        // A loop, not `array::from_fn`: a closure would not inherit the target feature.
        let mut acc = [_mm512_setzero_ps(); 16];
        for (i, a) in acc.iter_mut().enumerate() {
            *a = _mm512_loadu_ps(o.add((i / 2) * dvp + (i % 2) * 16));
        }
        fma_8x32(&mut acc, p, kb, v, vs, kn);
        for (i, a) in acc.iter().enumerate() {
            _mm512_storeu_ps(o.add((i / 2) * dvp + (i % 2) * 16), *a);
        }
    }
}
