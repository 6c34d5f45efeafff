//! The vector primitives the attention kernel is written over: AVX-512F (16 lanes), AVX2+FMA
//! (8 lanes) and a portable 8-lane array; the softmax's `exp` is `kiln_plan::vmath`'s recipe on
//! each one's emitter (the loop kernels' and the GEMM epilogue's roundings).
//!
//! Every method is `#[inline(always)]` so that, inlined into a `#[target_feature]` function,
//! the intrinsics compile to single instructions.

use kiln_plan::vmath::{self, Emit};
use std::convert::Infallible;

/// One SIMD register of f32 lanes.
pub(super) trait Simd {
    /// The register type.
    type V: Copy;
    /// The vector-math emitter on `V`.
    type E: Emit<F = Self::V, Err = Infallible>;
    /// The emitter (used, like every method, only where the ISA is enabled).
    fn emitter() -> Self::E;
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
    /// `x == c ? a : b` lane-wise.
    fn select_eq(x: Self::V, c: Self::V, a: Self::V, b: Self::V) -> Self::V;
    /// Sum of the lanes in a fixed order.
    fn hsum(a: Self::V) -> f32;
    /// Largest lane (the lanes hold no NaN).
    fn hmax(a: Self::V) -> f32;
}

/// `e^x` lane-wise by the shared recipe (clamped to `[-104, 89]`, NaN stays NaN).
#[inline(always)]
pub(super) fn exp<S: Simd>(x: S::V) -> S::V {
    let Ok(y) = vmath::exp(&mut S::emitter(), x);
    y
}

/// Eight lanes in plain Rust (any target); `fma` is an unfused multiply-add, so no libm call
/// where the hardware has none (the vector math's fma is a true one: `f32::mul_add`).
pub(super) struct Portable;

impl Simd for Portable {
    type V = [f32; 8];
    type E = vmath::Wide<vmath::SoftFma, 8>;
    #[inline(always)]
    fn emitter() -> Self::E {
        vmath::Wide(vmath::SoftFma)
    }
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
        type E = crate::native::vmath::Avx2;
        #[inline(always)]
        fn emitter() -> Self::E {
            unsafe { crate::native::vmath::Avx2::new() }
        }
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
        type E = crate::native::vmath::Avx512;
        #[inline(always)]
        fn emitter() -> Self::E {
            unsafe { crate::native::vmath::Avx512::new() }
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_plan::vmath::accuracy::{random_inputs, same_bits, sweep_inputs, EDGES};
    use kiln_plan::vmath::Func;

    #[inline(always)]
    fn exp_slice<S: Simd>(xs: &[f32]) -> Vec<f32> {
        let mut out = xs.to_vec();
        for c in out.chunks_exact_mut(S::W) {
            // SAFETY: `c` holds `W` values.
            unsafe { S::store(c.as_mut_ptr(), exp::<S>(S::load(c.as_ptr()))) };
        }
        out
    }

    /// The softmax's `exp` (of `x - max`, any argument) on every register type gives the
    /// scalar recipe's bits.
    #[test]
    fn softmax_exp_equals_the_vmath_recipe_bit_for_bit() {
        let mut xs = sweep_inputs();
        xs.extend(random_inputs(50_000, 17));
        for _ in 0..16 {
            xs.extend(EDGES);
            xs.push(-1.0);
        }
        xs.truncate(xs.len() / 16 * 16);
        same_bits("Portable", Func::Exp, &xs, &exp_slice::<Portable>(&xs)).unwrap();
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2(xs: &[f32]) -> Vec<f32> {
                exp_slice::<Avx2>(xs)
            }
            #[target_feature(enable = "avx512f")]
            unsafe fn avx512(xs: &[f32]) -> Vec<f32> {
                exp_slice::<Avx512>(xs)
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                // SAFETY: checked.
                same_bits("Avx2", Func::Exp, &xs, &unsafe { avx2(&xs) }).unwrap();
            } else {
                eprintln!("skipping AVX2: this CPU lacks it");
            }
            if is_x86_feature_detected!("avx512f") {
                // SAFETY: checked.
                same_bits("Avx512", Func::Exp, &xs, &unsafe { avx512(&xs) }).unwrap();
            } else {
                eprintln!("skipping AVX-512: this CPU lacks it");
            }
        }
    }
}
