//! The vector primitives the attention kernel is written over: AVX-512F (16 lanes), AVX2+FMA
//! (8 lanes) and a portable 8-lane array, plus the vector `exp` built from them (the same
//! Cody-Waite + degree-7 polynomial as the GEMM epilogue's scalar `exp`).
//!
//! Every method is `#[inline(always)]` so that, inlined into a `#[target_feature]` function,
//! the intrinsics compile to single instructions.

/// One SIMD register of f32 lanes.
pub(super) trait Simd {
    /// The register type.
    type V: Copy;
    /// Lanes per register.
    const W: usize;
    /// Whether the 8 × 32 score and `P·V` tiles run in assembly (`asm.rs`): AVX-512F only.
    const ASM_8X32: bool = false;
    /// # Safety
    /// `p..p + W` is readable.
    unsafe fn load(p: *const f32) -> Self::V;
    /// # Safety
    /// `p..p + W` is writable.
    unsafe fn store(p: *mut f32, v: Self::V);
    fn splat(x: f32) -> Self::V;
    fn add(a: Self::V, b: Self::V) -> Self::V;
    fn sub(a: Self::V, b: Self::V) -> Self::V;
    fn mul(a: Self::V, b: Self::V) -> Self::V;
    /// `a·b + c` (fused where the ISA has FMA).
    fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// `a > b ? a : b` lane-wise, so a NaN in either gives `b` (x86 `maxps`).
    fn max(a: Self::V, b: Self::V) -> Self::V;
    /// `a < b ? a : b` lane-wise, so a NaN in either gives `b` (x86 `minps`).
    fn min(a: Self::V, b: Self::V) -> Self::V;
    fn floor(a: Self::V) -> Self::V;
    /// The bits of `a` shifted left by 23 (building `2^n` from `n + 127 + 2^23`).
    fn shl23(a: Self::V) -> Self::V;
    /// `x == c ? a : b` lane-wise.
    fn select_eq(x: Self::V, c: Self::V, a: Self::V, b: Self::V) -> Self::V;
    /// Sum of the lanes in a fixed order.
    fn hsum(a: Self::V) -> f32;
    /// Largest lane (the lanes hold no NaN).
    fn hmax(a: Self::V) -> f32;
}

/// `e^x` lane-wise, as the scalar GEMM-epilogue `exp`: clamped to the normal range, NaN stays
/// NaN (the clamp keeps `x` as the second operand of max/min, which return it for NaN).
#[inline(always)]
pub(super) fn exp<S: Simd>(x: S::V) -> S::V {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = S::min(S::splat(88.0), S::max(S::splat(-87.0), x));
    let n = S::floor(S::fma(x, S::splat(std::f32::consts::LOG2_E), S::splat(0.5)));
    let r = S::fma(n, S::splat(-LN2_HI), x);
    let r = S::fma(n, S::splat(-LN2_LO), r);
    let mut p = S::splat(1.0 / 5040.0);
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = S::fma(p, r, S::splat(c));
    }
    let scale = S::shl23(S::add(n, S::splat(127.0 + 8_388_608.0)));
    S::mul(p, scale)
}

/// Eight lanes in plain Rust (any target); `fma` is an unfused multiply-add, so no libm call
/// where the hardware has none.
pub(super) struct Portable;

impl Simd for Portable {
    type V = [f32; 8];
    const W: usize = 8;
    #[inline(always)]
    unsafe fn load(p: *const f32) -> [f32; 8] {
        // SAFETY: the caller guarantees 8 readable values.
        unsafe { p.cast::<[f32; 8]>().read_unaligned() }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: [f32; 8]) {
        // SAFETY: the caller guarantees 8 writable values.
        unsafe { p.cast::<[f32; 8]>().write_unaligned(v) }
    }
    #[inline(always)]
    fn splat(x: f32) -> [f32; 8] {
        [x; 8]
    }
    #[inline(always)]
    fn add(a: [f32; 8], b: [f32; 8]) -> [f32; 8] {
        std::array::from_fn(|i| a[i] + b[i])
    }
    #[inline(always)]
    fn sub(a: [f32; 8], b: [f32; 8]) -> [f32; 8] {
        std::array::from_fn(|i| a[i] - b[i])
    }
    #[inline(always)]
    fn mul(a: [f32; 8], b: [f32; 8]) -> [f32; 8] {
        std::array::from_fn(|i| a[i] * b[i])
    }
    #[inline(always)]
    fn fma(a: [f32; 8], b: [f32; 8], c: [f32; 8]) -> [f32; 8] {
        std::array::from_fn(|i| a[i] * b[i] + c[i])
    }
    #[inline(always)]
    fn max(a: [f32; 8], b: [f32; 8]) -> [f32; 8] {
        std::array::from_fn(|i| if a[i] > b[i] { a[i] } else { b[i] })
    }
    #[inline(always)]
    fn min(a: [f32; 8], b: [f32; 8]) -> [f32; 8] {
        std::array::from_fn(|i| if a[i] < b[i] { a[i] } else { b[i] })
    }
    #[inline(always)]
    fn floor(a: [f32; 8]) -> [f32; 8] {
        std::array::from_fn(|i| a[i].floor())
    }
    #[inline(always)]
    fn shl23(a: [f32; 8]) -> [f32; 8] {
        std::array::from_fn(|i| f32::from_bits(a[i].to_bits() << 23))
    }
    #[inline(always)]
    fn select_eq(x: [f32; 8], c: [f32; 8], a: [f32; 8], b: [f32; 8]) -> [f32; 8] {
        std::array::from_fn(|i| if x[i] == c[i] { a[i] } else { b[i] })
    }
    #[inline(always)]
    fn hsum(a: [f32; 8]) -> f32 {
        ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))
    }
    #[inline(always)]
    fn hmax(a: [f32; 8]) -> f32 {
        a.iter()
            .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) use x86::{Avx2, Avx512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Simd;
    use std::arch::x86_64::*;

    /// AVX2 + FMA, 8 lanes. Only used inside functions compiled with those features.
    pub(in super::super) struct Avx2;

    // SAFETY (all methods): only called from code compiled with `avx2,fma` enabled, on a
    // CPU that has them (checked at dispatch).
    impl Simd for Avx2 {
        type V = __m256;
        const W: usize = 8;
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m256 {
            unsafe { _mm256_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m256) {
            unsafe { _mm256_storeu_ps(p, v) }
        }
        #[inline(always)]
        fn splat(x: f32) -> __m256 {
            unsafe { _mm256_set1_ps(x) }
        }
        #[inline(always)]
        fn add(a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_add_ps(a, b) }
        }
        #[inline(always)]
        fn sub(a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_sub_ps(a, b) }
        }
        #[inline(always)]
        fn mul(a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_mul_ps(a, b) }
        }
        #[inline(always)]
        fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
            unsafe { _mm256_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        fn max(a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_max_ps(a, b) }
        }
        #[inline(always)]
        fn min(a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_min_ps(a, b) }
        }
        #[inline(always)]
        fn floor(a: __m256) -> __m256 {
            unsafe { _mm256_floor_ps(a) }
        }
        #[inline(always)]
        fn shl23(a: __m256) -> __m256 {
            unsafe { _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_castps_si256(a))) }
        }
        #[inline(always)]
        fn select_eq(x: __m256, c: __m256, a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_blendv_ps(b, a, _mm256_cmp_ps::<_CMP_EQ_OQ>(x, c)) }
        }
        #[inline(always)]
        fn hsum(a: __m256) -> f32 {
            // ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)), in registers.
            unsafe {
                let h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
                let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
                _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)))
            }
        }
        #[inline(always)]
        fn hmax(a: __m256) -> f32 {
            unsafe {
                let h = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
                let h = _mm_max_ps(h, _mm_movehl_ps(h, h));
                _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)))
            }
        }
    }

    /// AVX-512F, 16 lanes. Only used inside functions compiled with `avx512f` enabled.
    pub(in super::super) struct Avx512;

    // SAFETY (all methods): only called from code compiled with `avx512f` enabled, on a CPU
    // that has it (checked at dispatch).
    impl Simd for Avx512 {
        type V = __m512;
        const W: usize = 16;
        const ASM_8X32: bool = true;
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m512 {
            unsafe { _mm512_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m512) {
            unsafe { _mm512_storeu_ps(p, v) }
        }
        #[inline(always)]
        fn splat(x: f32) -> __m512 {
            unsafe { _mm512_set1_ps(x) }
        }
        #[inline(always)]
        fn add(a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_add_ps(a, b) }
        }
        #[inline(always)]
        fn sub(a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_sub_ps(a, b) }
        }
        #[inline(always)]
        fn mul(a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_mul_ps(a, b) }
        }
        #[inline(always)]
        fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
            unsafe { _mm512_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        fn max(a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_max_ps(a, b) }
        }
        #[inline(always)]
        fn min(a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_min_ps(a, b) }
        }
        #[inline(always)]
        fn floor(a: __m512) -> __m512 {
            unsafe { _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(a) }
        }
        #[inline(always)]
        fn shl23(a: __m512) -> __m512 {
            unsafe { _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_castps_si512(a))) }
        }
        #[inline(always)]
        fn select_eq(x: __m512, c: __m512, a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_EQ_OQ>(x, c), b, a) }
        }
        #[inline(always)]
        fn hsum(a: __m512) -> f32 {
            // A fixed tree of adds (deterministic), in registers.
            unsafe { _mm512_reduce_add_ps(a) }
        }
        #[inline(always)]
        fn hmax(a: __m512) -> f32 {
            unsafe { _mm512_reduce_max_ps(a) }
        }
    }
}
