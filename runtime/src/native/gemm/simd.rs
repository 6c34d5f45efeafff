//! The fused epilogue in explicit SIMD (AVX-512F with 16 lanes, AVX2+FMA with 8), written
//! once over the [`Simd`] trait; the activations are `kiln_plan::vmath`'s recipes on the
//! runtime's emitters (`native::vmath`), so they round as the scalar activations in
//! `epilogue.rs` and the loop kernels do. Every element, the ragged right edge included, goes through
//! the same vector code (the edge via a lane buffer), so a value never depends on its column
//! position or on the thread split.

// `match` instead of `Option::map` here on purpose: a closure around an intrinsic does not
// inherit the caller's target features, so it would not inline into one instruction.
#![allow(clippy::manual_map)]

use super::epilogue::{Activation, Epilogue};
use super::OutPtr;
use kiln_plan::vmath::{self, Emit};
use std::convert::Infallible;

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// One vector ISA's f32 operations. All functions are `unsafe` because they require the ISA's
/// target features; they are only called from functions compiled with them.
pub(super) trait Simd {
    /// Lanes per vector.
    const LANES: usize;
    /// The vector.
    type V: Copy;
    /// The vector-math emitter on `V`.
    type E: Emit<F = Self::V, Err = Infallible>;
    /// # Safety: the CPU has the ISA's features and the emitter is used only in code
    /// compiled with them.
    unsafe fn emitter() -> Self::E;
    unsafe fn splat(x: f32) -> Self::V;
    /// # Safety: `p` readable for `LANES` values.
    unsafe fn load(p: *const f32) -> Self::V;
    /// # Safety: `p` writable for `LANES` values.
    unsafe fn store(p: *mut f32, v: Self::V);
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
    /// `x <= 0 ? 0 : x` (NaN kept).
    unsafe fn zero_le0(x: Self::V) -> Self::V;
}

/// `f(x)` by the shared vector-math recipe on `S`'s emitter.
macro_rules! vmath_fn {
    ($name:ident) => {
        #[inline(always)]
        unsafe fn $name<S: Simd>(x: S::V) -> S::V {
            // SAFETY: the caller has S's target features.
            let mut e = unsafe { S::emitter() };
            let Ok(y) = vmath::$name(&mut e, x);
            y
        }
    };
}
vmath_fn!(silu);
vmath_fn!(gelu_tanh);
vmath_fn!(gelu_erf);

/// One activation as a type, so that the epilogue loop is compiled once per activation with
/// the function inlined (a `match` per vector became a jump table that serialised the
/// vectors: gelu cost 3.4 cycles per element instead of about 1).
trait Act<S: Simd> {
    /// # Safety
    /// The CPU has `S`'s target features.
    unsafe fn f(v: S::V) -> S::V;
}

struct Identity;
struct Relu;
struct GeluErf;
struct GeluTanh;
struct Silu;

impl<S: Simd> Act<S> for Identity {
    #[inline(always)]
    unsafe fn f(v: S::V) -> S::V {
        v
    }
}
impl<S: Simd> Act<S> for Relu {
    #[inline(always)]
    unsafe fn f(v: S::V) -> S::V {
        // SAFETY: forwarded.
        unsafe { S::zero_le0(v) }
    }
}
impl<S: Simd> Act<S> for GeluErf {
    #[inline(always)]
    unsafe fn f(v: S::V) -> S::V {
        // SAFETY: forwarded.
        unsafe { gelu_erf::<S>(v) }
    }
}
impl<S: Simd> Act<S> for GeluTanh {
    #[inline(always)]
    unsafe fn f(v: S::V) -> S::V {
        // SAFETY: forwarded.
        unsafe { gelu_tanh::<S>(v) }
    }
}
impl<S: Simd> Act<S> for Silu {
    #[inline(always)]
    unsafe fn f(v: S::V) -> S::V {
        // SAFETY: forwarded.
        unsafe { silu::<S>(v) }
    }
}

/// The epilogue over rows `i0..i0 + rows`, columns `j0..j0 + w` of the output, in `S`'s
/// vectors.
///
/// # Safety
/// The CPU has `S`'s target features; the rectangle lies inside the output `out` points into,
/// `ep.check` passed for that output's shape, and no other reference to it is live.
#[inline(always)]
pub(super) unsafe fn apply<S: Simd>(
    ep: &Epilogue<'_>,
    out: OutPtr,
    i0: usize,
    rows: usize,
    j0: usize,
    w: usize,
) {
    if ep.is_plain() {
        return;
    }
    // SAFETY: forwarded.
    unsafe {
        match ep.activation {
            Activation::None => apply_act::<S, Identity>(ep, out, i0, rows, j0, w),
            Activation::Relu => apply_act::<S, Relu>(ep, out, i0, rows, j0, w),
            Activation::GeluErf => apply_act::<S, GeluErf>(ep, out, i0, rows, j0, w),
            Activation::GeluTanh => apply_act::<S, GeluTanh>(ep, out, i0, rows, j0, w),
            Activation::Silu => apply_act::<S, Silu>(ep, out, i0, rows, j0, w),
        }
    }
}

/// The epilogue on a finished full-width register tile before it is stored: `acc` holds
/// rows `i0..i0 + rows` of C, row `r` in `acc[2r]` (columns `j0 .. j0 + LANES`) and
/// `acc[2r + 1]` (the next `LANES`). Saves the pass that stores the tile, reads it back and
/// stores it again (the stores of fresh C lines wait for their lines; 197 × 1536 × 384 with a
/// bias, one thread: 55 µs of 1405 in that pass).
///
/// # Safety
/// The CPU has `S`'s target features; `ep.check` passed for the output; columns
/// `j0 .. j0 + 2·LANES` and rows `i0 .. i0 + rows` lie inside it; a residual, if any, has unit
/// column stride; `acc` holds at least `2·rows` vectors.
#[inline(always)]
pub(super) unsafe fn apply_regs<S: Simd>(
    ep: &Epilogue<'_>,
    acc: &mut [S::V],
    rows: usize,
    i0: usize,
    j0: usize,
) {
    // SAFETY: forwarded.
    unsafe {
        match ep.activation {
            Activation::None => regs_act::<S, Identity>(ep, acc, rows, i0, j0),
            Activation::Relu => regs_act::<S, Relu>(ep, acc, rows, i0, j0),
            Activation::GeluErf => regs_act::<S, GeluErf>(ep, acc, rows, i0, j0),
            Activation::GeluTanh => regs_act::<S, GeluTanh>(ep, acc, rows, i0, j0),
            Activation::Silu => regs_act::<S, Silu>(ep, acc, rows, i0, j0),
        }
    }
}

/// [`apply_regs`] with the activation fixed: rows in groups of `GROUP / 2` as one [`Wide`]
/// vector of [`GROUP`] (interleaved chains), the last rows one at a time.
///
/// # Safety
/// As [`apply_regs`].
#[inline(always)]
unsafe fn regs_act<S: Simd, A: Act<S> + Act<Wide<S, GROUP>>>(
    ep: &Epilogue<'_>,
    acc: &mut [S::V],
    rows: usize,
    i0: usize,
    j0: usize,
) {
    let l = S::LANES;
    // No closures around intrinsics (they would not inherit the target features).
    // SAFETY: target features by the caller's contract; the bias and residual ranges are
    // sliced from slices `ep.check` validated against the output.
    unsafe {
        let (b0, b1) = match ep.bias {
            Some(b) => {
                let p = b[j0..j0 + 2 * l].as_ptr();
                (Some(S::load(p)), Some(S::load(p.add(l))))
            }
            None => (None, None),
        };
        let row_scale = |i: usize| match ep.row_scale {
            Some(s) => Some(s[i]),
            None => None,
        };
        // The residual row `i`'s two vectors' address.
        let residual = |i: usize| match &ep.residual {
            Some(res) => Some(res.data[i * res.rs + j0..][..2 * l].as_ptr()),
            None => None,
        };
        let mut r = 0;
        while r + GROUP / 2 <= rows {
            let mut x = [S::splat(0.0); GROUP];
            x.copy_from_slice(&acc[2 * r..2 * r + GROUP]);
            let mut scale = [S::splat(0.0); GROUP];
            let mut bias = [S::splat(0.0); GROUP];
            let mut res = [S::splat(0.0); GROUP];
            for k in 0..GROUP {
                let i = i0 + r + k / 2;
                if let Some(s) = row_scale(i) {
                    scale[k] = S::splat(s);
                }
                if let (Some(b0), Some(b1)) = (b0, b1) {
                    bias[k] = if k % 2 == 0 { b0 } else { b1 };
                }
                if let Some(p) = residual(i) {
                    res[k] = S::load(p.add(k % 2 * l));
                }
            }
            let y = op::<Wide<S, GROUP>, A>(
                x,
                ep.row_scale.map(|_| scale),
                b0.map(|_| bias),
                ep.residual.as_ref().map(|_| res),
            );
            acc[2 * r..2 * r + GROUP].copy_from_slice(&y);
            r += GROUP / 2;
        }
        for r in r..rows {
            let i = i0 + r;
            let scale = match row_scale(i) {
                Some(s) => Some(S::splat(s)),
                None => None,
            };
            let (r0, r1) = match residual(i) {
                Some(p) => (Some(S::load(p)), Some(S::load(p.add(l)))),
                None => (None, None),
            };
            acc[2 * r] = op::<S, A>(acc[2 * r], scale, b0, r0);
            acc[2 * r + 1] = op::<S, A>(acc[2 * r + 1], scale, b1, r1);
        }
    }
}

/// Vectors per interleaved group of [`regs_act`]: four tile rows. 197 × 1536 × 384 with
/// bias and gelu, one thread: the gelu epilogue took ~310 µs one row (two chains) at a time,
/// ~250 in groups of four vectors and ~230 in groups of eight.
const GROUP: usize = 8;

/// `A(scale·v + bias) + residual` on one vector (a function, not a closure, so that it
/// inlines into the caller's target features).
///
/// # Safety
/// The CPU has `S`'s target features.
#[inline(always)]
unsafe fn op<S: Simd, A: Act<S>>(
    v: S::V,
    scale: Option<S::V>,
    bias: Option<S::V>,
    residual: Option<S::V>,
) -> S::V {
    // SAFETY: forwarded.
    unsafe {
        let mut v = v;
        if let Some(s) = scale {
            v = S::mul(v, s);
        }
        if let Some(b) = bias {
            v = S::add(v, b);
        }
        v = A::f(v);
        if let Some(r) = residual {
            v = S::add(v, r);
        }
        v
    }
}

/// [`apply`] with the activation fixed: `A(scale·v + bias) + residual` per vector.
///
/// # Safety
/// As [`apply`].
#[inline(always)]
unsafe fn apply_act<S: Simd, A: Act<S> + Act<Wide<S, 4>>>(
    ep: &Epilogue<'_>,
    out: OutPtr,
    i0: usize,
    rows: usize,
    j0: usize,
    w: usize,
) {
    let l = S::LANES;
    let mut buf = [0.0f32; 16];
    let mut rbuf = [0.0f32; 16];
    let mut bbuf = [0.0f32; 16];
    // No closures in here: a closure does not inherit the caller's target features, so the
    // intrinsics inside it stayed calls (a bias + residual epilogue cost as much as gelu).
    // SAFETY: target features by the caller's contract; every pointer below addresses the
    // caller's rectangle (in bounds, exclusive), a range of a slice checked by `ep.check` and
    // sliced here, or a lane buffer of 16 >= LANES values.
    unsafe {
        let bias = match ep.bias {
            Some(b) => Some(b[j0..j0 + w].as_ptr()),
            None => None,
        };
        let strided_residual = matches!(&ep.residual, Some(r) if r.cs != 1);
        // Full-width rows of a register tile, two rows (four vectors) at a time: four
        // independent activation chains in one basic block. A gelu chain is ~55 operations
        // and ~170 cycles deep, so with two chains per block the scheduler window held too
        // few independent operations to keep both vector ports busy.
        let mut i = i0;
        if !strided_residual && w == 2 * l {
            let row_at = |i: usize| out.ptr.add(i * out.rs + j0);
            while i + 2 <= i0 + rows {
                let (ra, rb) = (row_at(i), row_at(i + 1));
                let (sa, sb) = match ep.row_scale {
                    Some(s) => (Some(S::splat(s[i])), Some(S::splat(s[i + 1]))),
                    None => (None, None),
                };
                let (b0, b1) = match bias {
                    Some(p) => (Some(S::load(p)), Some(S::load(p.add(l)))),
                    None => (None, None),
                };
                let (r0, r1, r2, r3) = match &ep.residual {
                    Some(r) => {
                        let pa = r.data[i * r.rs + j0..][..w].as_ptr();
                        let pb = r.data[(i + 1) * r.rs + j0..][..w].as_ptr();
                        (
                            Some(S::load(pa)),
                            Some(S::load(pa.add(l))),
                            Some(S::load(pb)),
                            Some(S::load(pb.add(l))),
                        )
                    }
                    None => (None, None, None, None),
                };
                // The four vectors as one `Wide` vector: interleaved chains.
                let four =
                    |a: Option<S::V>, b: Option<S::V>, c: Option<S::V>, d: Option<S::V>| match (
                        a, b, c, d,
                    ) {
                        (Some(a), Some(b), Some(c), Some(d)) => Some([a, b, c, d]),
                        _ => None,
                    };
                let y = op::<Wide<S, 4>, A>(
                    [
                        S::load(ra),
                        S::load(ra.add(l)),
                        S::load(rb),
                        S::load(rb.add(l)),
                    ],
                    four(sa, sa, sb, sb),
                    four(b0, b1, b0, b1),
                    four(r0, r1, r2, r3),
                );
                S::store(ra, y[0]);
                S::store(ra.add(l), y[1]);
                S::store(rb, y[2]);
                S::store(rb.add(l), y[3]);
                i += 2;
            }
        }
        for i in i..i0 + rows {
            let row = out.ptr.add(i * out.rs + j0);
            let scale = match ep.row_scale {
                Some(s) => Some(S::splat(s[i])),
                None => None,
            };
            let res = match &ep.residual {
                Some(r) if r.cs == 1 => {
                    let start = i * r.rs + j0;
                    Some(r.data[start..start + w].as_ptr())
                }
                _ => None,
            };
            let mut j = 0;
            if !strided_residual {
                // Two vectors at a time (a full 32-wide AVX-512 tile row): two independent
                // activation chains in one basic block keep both vector ports busy.
                while j + 2 * l <= w {
                    let (b0, b1) = match bias {
                        Some(p) => (Some(S::load(p.add(j))), Some(S::load(p.add(j + l)))),
                        None => (None, None),
                    };
                    let (r0, r1) = match res {
                        Some(p) => (Some(S::load(p.add(j))), Some(S::load(p.add(j + l)))),
                        None => (None, None),
                    };
                    let y0 = op::<S, A>(S::load(row.add(j)), scale, b0, r0);
                    let y1 = op::<S, A>(S::load(row.add(j + l)), scale, b1, r1);
                    S::store(row.add(j), y0);
                    S::store(row.add(j + l), y1);
                    j += 2 * l;
                }
                while j + l <= w {
                    let b0 = match bias {
                        Some(p) => Some(S::load(p.add(j))),
                        None => None,
                    };
                    let r0 = match res {
                        Some(p) => Some(S::load(p.add(j))),
                        None => None,
                    };
                    S::store(row.add(j), op::<S, A>(S::load(row.add(j)), scale, b0, r0));
                    j += l;
                }
            }
            // The ragged edge (and every vector of a strided residual) through lane buffers,
            // by the same vector code.
            while j < w {
                let cnt = l.min(w - j);
                let b0 = match bias {
                    Some(p) => {
                        std::ptr::copy_nonoverlapping(p.add(j), bbuf.as_mut_ptr(), cnt);
                        Some(S::load(bbuf.as_ptr()))
                    }
                    None => None,
                };
                let r0 = match &ep.residual {
                    Some(r) => {
                        for (jj, x) in rbuf[..cnt].iter_mut().enumerate() {
                            *x = r.at(i, j0 + j + jj);
                        }
                        Some(S::load(rbuf.as_ptr()))
                    }
                    None => None,
                };
                std::ptr::copy_nonoverlapping(row.add(j), buf.as_mut_ptr(), cnt);
                let y = op::<S, A>(S::load(buf.as_ptr()), scale, b0, r0);
                S::store(buf.as_mut_ptr(), y);
                std::ptr::copy_nonoverlapping(buf.as_ptr(), row.add(j), cnt);
                j += l;
            }
        }
    }
}

/// AVX-512F, 16 lanes.
/// `N` vectors of `S` as one: every operation is applied to each of the `N` in turn, so an
/// activation written once over [`Simd`] runs as `N` independent chains interleaved step by
/// step. A gelu chain is ~55 operations deep; one chain at a time, the scheduler window held
/// too few independent operations to keep both vector ports busy.
pub(super) struct Wide<S, const N: usize>(std::marker::PhantomData<S>);

/// Implements a `Wide` method by applying `S`'s to each vector (a loop, not a closure: a
/// closure would not inherit the caller's target features).
macro_rules! wide_map {
    ($name:ident($first:ident $(, $arg:ident)*)) => {
        #[inline(always)]
        unsafe fn $name($first: Self::V $(, $arg: Self::V)*) -> Self::V {
            let mut out = $first;
            for (k, o) in out.iter_mut().enumerate() {
                // SAFETY: forwarded (same target features).
                *o = unsafe { S::$name($first[k] $(, $arg[k])*) };
            }
            out
        }
    };
}

impl<S: Simd, const N: usize> Simd for Wide<S, N> {
    const LANES: usize = S::LANES * N;
    type V = [S::V; N];
    type E = vmath::Wide<S::E, N>;
    #[inline(always)]
    unsafe fn emitter() -> Self::E {
        // SAFETY: forwarded.
        vmath::Wide(unsafe { S::emitter() })
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self::V {
        // SAFETY: forwarded.
        unsafe { [S::splat(x); N] }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self::V {
        // SAFETY: forwarded: `p` readable for `N·S::LANES` values.
        unsafe {
            let mut out = [S::splat(0.0); N];
            for (k, o) in out.iter_mut().enumerate() {
                *o = S::load(p.add(k * S::LANES));
            }
            out
        }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: Self::V) {
        for (k, x) in v.into_iter().enumerate() {
            // SAFETY: forwarded: `p` writable for `N·S::LANES` values.
            unsafe { S::store(p.add(k * S::LANES), x) }
        }
    }
    wide_map!(add(a, b));
    wide_map!(mul(a, b));
    wide_map!(zero_le0(x));
}

#[cfg(target_arch = "x86_64")]
pub(super) struct Avx512;

#[cfg(target_arch = "x86_64")]
impl Simd for Avx512 {
    const LANES: usize = 16;
    type V = __m512;
    type E = crate::native::vmath::Avx512;
    #[inline(always)]
    unsafe fn emitter() -> Self::E {
        // SAFETY: forwarded.
        unsafe { crate::native::vmath::Avx512::new() }
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> __m512 {
        unsafe { _mm512_set1_ps(x) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m512 {
        unsafe { _mm512_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m512) {
        unsafe { _mm512_storeu_ps(p, v) }
    }
    #[inline(always)]
    unsafe fn add(a: __m512, b: __m512) -> __m512 {
        unsafe { _mm512_add_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn mul(a: __m512, b: __m512) -> __m512 {
        unsafe { _mm512_mul_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn zero_le0(x: __m512) -> __m512 {
        unsafe {
            let m = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(x, _mm512_setzero_ps());
            _mm512_mask_blend_ps(m, x, _mm512_setzero_ps())
        }
    }
}

/// AVX2+FMA, 8 lanes.
#[cfg(target_arch = "x86_64")]
pub(super) struct Avx2;

#[cfg(target_arch = "x86_64")]
impl Simd for Avx2 {
    const LANES: usize = 8;
    type V = __m256;
    type E = crate::native::vmath::Avx2;
    #[inline(always)]
    unsafe fn emitter() -> Self::E {
        // SAFETY: forwarded.
        unsafe { crate::native::vmath::Avx2::new() }
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> __m256 {
        unsafe { _mm256_set1_ps(x) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m256 {
        unsafe { _mm256_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m256) {
        unsafe { _mm256_storeu_ps(p, v) }
    }
    #[inline(always)]
    unsafe fn add(a: __m256, b: __m256) -> __m256 {
        unsafe { _mm256_add_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn mul(a: __m256, b: __m256) -> __m256 {
        unsafe { _mm256_mul_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn zero_le0(x: __m256) -> __m256 {
        unsafe {
            let m = _mm256_cmp_ps::<_CMP_LE_OQ>(x, _mm256_setzero_ps());
            _mm256_andnot_ps(m, x)
        }
    }
}
