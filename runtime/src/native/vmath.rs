//! The x86 SIMD emitters of kiln's vector math: [`kiln_plan::vmath`]'s recipes (exp, log,
//! tanh, sigmoid, erf, silu, gelu, gelu_tanh) instantiated on AVX2+FMA (8 lanes) and
//! AVX-512F (16 lanes) registers, one intrinsic per [`Emit`] method, for the hand-written
//! kernels (the GEMM epilogue, the attention softmax) and [`map`]. The recipes, constants and
//! accuracy live in `kiln_plan::vmath`; these emitters only have to perform each operation
//! with the same rounding, which the tests check bit for bit against the scalar recipe.

use kiln_plan::vmath::Func;
#[cfg(target_arch = "x86_64")]
pub use x86::{Avx2, Avx512};

/// An instruction set [`map`] can run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// One value at a time ([`kiln_plan::vmath::Scalar`]).
    Scalar,
    /// AVX2 + FMA, 8 lanes.
    Avx2,
    /// AVX-512F, 16 lanes.
    Avx512,
}

impl Isa {
    /// Whether this CPU runs `self`.
    pub fn available(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => std::is_x86_feature_detected!("avx512f"),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }
}

/// Applies `f` to every element of `xs` on `isa` (the ragged end through a zero-padded
/// register, so every element goes through the same vector code). `false`, with `xs`
/// untouched, when this CPU lacks `isa`.
pub fn map(f: Func, isa: Isa, xs: &mut [f32]) -> bool {
    let p = xs.as_mut_ptr();
    // SAFETY: `p` covers `xs.len()` values; reading and writing the same element is the
    // in-place case `map_raw` allows.
    unsafe { map_raw(f, isa, p, p, xs.len()) }
}

/// Writes `f(src[i])` to `dst[i]` on `isa`: [`map`] from one buffer into another, one pass
/// over memory instead of a copy and a pass in place. `false`, with `dst` untouched, when
/// this CPU lacks `isa`.
///
/// # Panics
/// When the lengths differ.
pub fn map_into(f: Func, isa: Isa, src: &[f32], dst: &mut [f32]) -> bool {
    assert_eq!(src.len(), dst.len(), "map_into: lengths differ");
    // SAFETY: `src` and `dst` cover `len` values each and, one shared and one exclusive
    // borrow, do not overlap.
    unsafe { map_raw(f, isa, src.as_ptr(), dst.as_mut_ptr(), src.len()) }
}

/// Writes `f(*src.add(i))` to `*dst.add(i)` for `i < len` on `isa`, 16 or 8 values at a
/// time: each block is loaded before it is stored.
///
/// # Safety
/// `src` is valid for `len` reads and `dst` for `len` writes; the two are the same pointer
/// (in place) or do not overlap.
pub unsafe fn map_raw(f: Func, isa: Isa, src: *const f32, dst: *mut f32, len: usize) -> bool {
    if !isa.available() {
        return false;
    }
    match isa {
        Isa::Scalar => (0..len).for_each(|i| {
            // SAFETY: i < len, per the contract.
            unsafe { *dst.add(i) = f.soft(*src.add(i)) }
        }),
        // SAFETY: `available` checked the features; the pointers per the contract.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::map_avx2(f, src, dst, len) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::map_avx512(f, src, dst, len) },
        #[cfg(not(target_arch = "x86_64"))]
        _ => return false,
    }
    true
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use kiln_plan::vmath::{Cmp, Emit, Func};
    use std::arch::x86_64::*;
    use std::convert::Infallible;

    /// AVX2 + FMA emitter (`__m256` / `__m256i`).
    #[derive(Clone, Copy, Debug)]
    pub struct Avx2(());

    impl Avx2 {
        /// # Safety
        /// The CPU has AVX2 and FMA, and the emitter is only used inside functions compiled
        /// with them (its methods are `#[inline(always)]` single intrinsics).
        #[inline(always)]
        pub unsafe fn new() -> Self {
            Avx2(())
        }
    }

    /// AVX-512F emitter (`__m512` / `__m512i`).
    #[derive(Clone, Copy, Debug)]
    pub struct Avx512(());

    impl Avx512 {
        /// # Safety
        /// The CPU has AVX-512F, and the emitter is only used inside functions compiled with
        /// it.
        #[inline(always)]
        pub unsafe fn new() -> Self {
            Avx512(())
        }
    }

    /// One `Emit` method as one intrinsic expression.
    macro_rules! op {
        ($name:ident($($a:ident: $t:ty),*) -> $r:ty $body:block) => {
            #[inline(always)]
            fn $name(&mut self, $($a: $t),*) -> Result<$r, Infallible> {
                // SAFETY: the emitter exists only where the CPU has its features and is used
                // inside functions compiled with them (see `new`).
                Ok(unsafe { $body })
            }
        };
    }

    impl Emit for Avx2 {
        type F = __m256;
        type I = __m256i;
        type Err = Infallible;
        op!(f(c: f32) -> __m256 { _mm256_set1_ps(c) });
        op!(i(c: i32) -> __m256i { _mm256_set1_epi32(c) });
        op!(add(a: __m256, b: __m256) -> __m256 { _mm256_add_ps(a, b) });
        op!(sub(a: __m256, b: __m256) -> __m256 { _mm256_sub_ps(a, b) });
        op!(mul(a: __m256, b: __m256) -> __m256 { _mm256_mul_ps(a, b) });
        op!(div(a: __m256, b: __m256) -> __m256 { _mm256_div_ps(a, b) });
        op!(fma(a: __m256, b: __m256, c: __m256) -> __m256 { _mm256_fmadd_ps(a, b, c) });
        op!(neg(a: __m256) -> __m256 { _mm256_xor_ps(a, _mm256_set1_ps(-0.0)) });
        op!(abs(a: __m256) -> __m256 { _mm256_andnot_ps(_mm256_set1_ps(-0.0), a) });
        // minps/maxps return their second operand when either is NaN.
        op!(min(x: __m256, c: __m256) -> __m256 { _mm256_min_ps(c, x) });
        op!(max(x: __m256, c: __m256) -> __m256 { _mm256_max_ps(c, x) });
        op!(bits(a: __m256) -> __m256i { _mm256_castps_si256(a) });
        op!(float_of_bits(a: __m256i) -> __m256 { _mm256_castsi256_ps(a) });
        op!(to_float(a: __m256i) -> __m256 { _mm256_cvtepi32_ps(a) });
        op!(iadd(a: __m256i, b: __m256i) -> __m256i { _mm256_add_epi32(a, b) });
        op!(isub(a: __m256i, b: __m256i) -> __m256i { _mm256_sub_epi32(a, b) });
        op!(and(a: __m256i, b: __m256i) -> __m256i { _mm256_and_si256(a, b) });
        op!(or(a: __m256i, b: __m256i) -> __m256i { _mm256_or_si256(a, b) });
        #[inline(always)]
        fn select(
            &mut self,
            cmp: Cmp,
            a: __m256,
            b: __m256,
            t: __m256,
            f: __m256,
        ) -> Result<__m256, Infallible> {
            // SAFETY: as `op!`.
            Ok(unsafe {
                let m = match cmp {
                    Cmp::Lt => _mm256_cmp_ps::<_CMP_LT_OQ>(a, b),
                    Cmp::Ge => _mm256_cmp_ps::<_CMP_GE_OQ>(a, b),
                    Cmp::Eq => _mm256_cmp_ps::<_CMP_EQ_OQ>(a, b),
                };
                _mm256_blendv_ps(f, t, m)
            })
        }
        #[inline(always)]
        fn shl<const N: i32>(&mut self, a: __m256i) -> Result<__m256i, Infallible> {
            // SAFETY: as `op!`.
            Ok(unsafe { _mm256_slli_epi32::<N>(a) })
        }
        #[inline(always)]
        fn sra<const N: i32>(&mut self, a: __m256i) -> Result<__m256i, Infallible> {
            // SAFETY: as `op!`.
            Ok(unsafe { _mm256_srai_epi32::<N>(a) })
        }
        #[inline(always)]
        fn srl<const N: i32>(&mut self, a: __m256i) -> Result<__m256i, Infallible> {
            // SAFETY: as `op!`.
            Ok(unsafe { _mm256_srli_epi32::<N>(a) })
        }
    }

    impl Emit for Avx512 {
        type F = __m512;
        type I = __m512i;
        type Err = Infallible;
        op!(f(c: f32) -> __m512 { _mm512_set1_ps(c) });
        op!(i(c: i32) -> __m512i { _mm512_set1_epi32(c) });
        op!(add(a: __m512, b: __m512) -> __m512 { _mm512_add_ps(a, b) });
        op!(sub(a: __m512, b: __m512) -> __m512 { _mm512_sub_ps(a, b) });
        op!(mul(a: __m512, b: __m512) -> __m512 { _mm512_mul_ps(a, b) });
        op!(div(a: __m512, b: __m512) -> __m512 { _mm512_div_ps(a, b) });
        op!(fma(a: __m512, b: __m512, c: __m512) -> __m512 { _mm512_fmadd_ps(a, b, c) });
        // The sign flip as an integer xor (`_mm512_xor_ps` needs AVX-512DQ).
        op!(neg(a: __m512) -> __m512 {
            _mm512_castsi512_ps(_mm512_xor_si512(
                _mm512_castps_si512(a),
                _mm512_set1_epi32(i32::MIN),
            ))
        });
        op!(abs(a: __m512) -> __m512 { _mm512_abs_ps(a) });
        op!(min(x: __m512, c: __m512) -> __m512 { _mm512_min_ps(c, x) });
        op!(max(x: __m512, c: __m512) -> __m512 { _mm512_max_ps(c, x) });
        op!(bits(a: __m512) -> __m512i { _mm512_castps_si512(a) });
        op!(float_of_bits(a: __m512i) -> __m512 { _mm512_castsi512_ps(a) });
        op!(to_float(a: __m512i) -> __m512 { _mm512_cvtepi32_ps(a) });
        op!(iadd(a: __m512i, b: __m512i) -> __m512i { _mm512_add_epi32(a, b) });
        op!(isub(a: __m512i, b: __m512i) -> __m512i { _mm512_sub_epi32(a, b) });
        op!(and(a: __m512i, b: __m512i) -> __m512i { _mm512_and_si512(a, b) });
        op!(or(a: __m512i, b: __m512i) -> __m512i { _mm512_or_si512(a, b) });
        #[inline(always)]
        fn select(
            &mut self,
            cmp: Cmp,
            a: __m512,
            b: __m512,
            t: __m512,
            f: __m512,
        ) -> Result<__m512, Infallible> {
            // SAFETY: as `op!`.
            Ok(unsafe {
                let m = match cmp {
                    Cmp::Lt => _mm512_cmp_ps_mask::<_CMP_LT_OQ>(a, b),
                    Cmp::Ge => _mm512_cmp_ps_mask::<_CMP_GE_OQ>(a, b),
                    Cmp::Eq => _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(a, b),
                };
                _mm512_mask_blend_ps(m, f, t)
            })
        }
        // Shifts by a count register: the immediate forms take a `u32` constant; LLVM turns
        // a constant count into the immediate instruction.
        #[inline(always)]
        fn shl<const N: i32>(&mut self, a: __m512i) -> Result<__m512i, Infallible> {
            // SAFETY: as `op!`.
            Ok(unsafe { _mm512_sll_epi32(a, _mm_cvtsi32_si128(N)) })
        }
        #[inline(always)]
        fn sra<const N: i32>(&mut self, a: __m512i) -> Result<__m512i, Infallible> {
            // SAFETY: as `op!`.
            Ok(unsafe { _mm512_sra_epi32(a, _mm_cvtsi32_si128(N)) })
        }
        #[inline(always)]
        fn srl<const N: i32>(&mut self, a: __m512i) -> Result<__m512i, Infallible> {
            // SAFETY: as `op!`.
            Ok(unsafe { _mm512_srl_epi32(a, _mm_cvtsi32_si128(N)) })
        }
    }

    /// `f` from `src` into `dst` in AVX2 registers.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; the pointers are as [`super::map_raw`] requires.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn map_avx2(f: Func, src: *const f32, dst: *mut f32, len: usize) {
        // SAFETY: this function has the features.
        let mut e = unsafe { Avx2::new() };
        let full = len - len % 8;
        for i in (0..full).step_by(8) {
            // SAFETY: i + 8 <= len; the block is loaded before it is stored (in place).
            unsafe {
                let Ok(y) = f.emit(&mut e, _mm256_loadu_ps(src.add(i)));
                _mm256_storeu_ps(dst.add(i), y);
            }
        }
        let rest = len - full;
        if rest > 0 {
            let mut buf = [0.0f32; 8];
            // SAFETY: `rest` values from `full` on lie inside both buffers; `buf` holds 8.
            unsafe {
                std::ptr::copy(src.add(full), buf.as_mut_ptr(), rest);
                let Ok(y) = f.emit(&mut e, _mm256_loadu_ps(buf.as_ptr()));
                _mm256_storeu_ps(buf.as_mut_ptr(), y);
                std::ptr::copy(buf.as_ptr(), dst.add(full), rest);
            }
        }
    }

    /// `f` from `src` into `dst` in AVX-512 registers.
    ///
    /// # Safety
    /// The CPU has AVX-512F; the pointers are as [`super::map_raw`] requires.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn map_avx512(f: Func, src: *const f32, dst: *mut f32, len: usize) {
        // SAFETY: this function has the features.
        let mut e = unsafe { Avx512::new() };
        let full = len - len % 16;
        for i in (0..full).step_by(16) {
            // SAFETY: i + 16 <= len; the block is loaded before it is stored (in place).
            unsafe {
                let Ok(y) = f.emit(&mut e, _mm512_loadu_ps(src.add(i)));
                _mm512_storeu_ps(dst.add(i), y);
            }
        }
        let rest = len - full;
        if rest > 0 {
            let mut buf = [0.0f32; 16];
            // SAFETY: `rest` values from `full` on lie inside both buffers; `buf` holds 16.
            unsafe {
                std::ptr::copy(src.add(full), buf.as_mut_ptr(), rest);
                let Ok(y) = f.emit(&mut e, _mm512_loadu_ps(buf.as_ptr()));
                _mm512_storeu_ps(buf.as_mut_ptr(), y);
                std::ptr::copy(buf.as_ptr(), dst.add(full), rest);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_plan::vmath::accuracy::{random_inputs, same_bits, sweep_inputs, EDGES};

    fn inputs() -> Vec<f32> {
        let mut xs = sweep_inputs();
        xs.extend(random_inputs(100_000, 11));
        // Every edge case at every lane position, and in a ragged end.
        for k in 0..16 {
            xs.extend(std::iter::repeat_n(0.25, k));
            xs.extend(EDGES);
        }
        xs.push(-0.0);
        xs
    }

    #[test]
    fn simd_lanes_equal_the_scalar_recipe_bit_for_bit() {
        let xs = inputs();
        for isa in [Isa::Avx2, Isa::Avx512] {
            if !isa.available() {
                eprintln!("skipping {isa:?}: this CPU lacks it");
                continue;
            }
            for f in Func::ALL {
                let mut got = xs.clone();
                assert!(map(f, isa, &mut got));
                same_bits(&format!("{isa:?}"), f, &xs, &got).unwrap();
                assert!(
                    got.iter().zip(&xs).all(|(g, x)| !x.is_nan() || g.is_nan()),
                    "{isa:?} {f:?}: NaN in, not NaN out"
                );
            }
        }
    }

    #[test]
    fn map_into_another_buffer_equals_map_in_place_bit_for_bit() {
        let xs = inputs();
        for isa in [Isa::Scalar, Isa::Avx2, Isa::Avx512] {
            if !isa.available() {
                eprintln!("skipping {isa:?}: this CPU lacks it");
                continue;
            }
            for f in Func::ALL {
                let mut in_place = xs.clone();
                assert!(map(f, isa, &mut in_place));
                // Every ragged length, and a source that starts off a vector boundary.
                for (lo, len) in [(0, xs.len()), (1, 15), (3, 17), (5, 0), (7, 33)] {
                    let mut got = vec![f32::NAN; len];
                    assert!(map_into(f, isa, &xs[lo..lo + len], &mut got));
                    let want = &in_place[lo..lo + len];
                    assert!(
                        got.iter()
                            .zip(want)
                            .all(|(g, w)| g.to_bits() == w.to_bits()),
                        "{isa:?} {f:?}: map_into differs from map on [{lo}, {})",
                        lo + len
                    );
                }
            }
        }
    }
}
