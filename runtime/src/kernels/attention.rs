//! Fused f32 scaled-dot-product attention (kiln's `attention` op, ir/src/ops/fused.rs),
//! flash-style: per (batch, query head, block of query rows) the scores of one block of keys
//! at a time, an online max/sum softmax and the `×V` accumulation, so the `B×H×S×T` score
//! tensor never exists. Grouped-query heads, `causal` with a kv cache (query `i` at position
//! `T − S + i`), additive masks (bool masks arrive as 0 / −inf), and the reference's NaN for a
//! row whose scores are all −inf.
//!
//! Work units are (batch, head, query block) and each writes only its own output rows, so
//! the result is the same for any thread schedule.

use super::gemm::{avx2, fast_exp};
use crate::pool::Pool;

/// Query rows per work unit (their accumulators stay in L1 next to one key block).
const QB: usize = 16;
/// Keys per block.
const KB: usize = 64;

/// An additive mask broadcast to the `[B, Hq, S, T]` scores: element `(b, h, i, j)` is
/// `data[b·sb + h·sh + i·si + j·sj]` (stride 0 where the mask broadcasts).
#[derive(Debug, Clone, Copy)]
pub struct Mask<'a> {
    /// Additive values (a bool mask as 0 for keep, −inf for drop).
    pub data: &'a [f32],
    /// Strides for b, h, i, j.
    pub strides: [usize; 4],
}

/// The problem: q `[B, Hq, S, D]`, k `[B, Hkv, T, D]`, v `[B, Hkv, T, Dv]`, all dense.
#[derive(Debug, Clone, Copy)]
pub struct Attention<'a> {
    /// Queries.
    pub q: &'a [f32],
    /// Keys.
    pub k: &'a [f32],
    /// Values.
    pub v: &'a [f32],
    /// `[B, Hq, Hkv, S, T, D, Dv]`.
    pub dims: [usize; 7],
    /// Factor on `q·k`.
    pub scale: f32,
    /// Hide key `j > T − S + i`.
    pub causal: bool,
    /// Optional additive mask.
    pub mask: Option<Mask<'a>>,
}

impl Attention<'_> {
    /// Checks every slice length against the dims (the caller has already checked that the
    /// shapes agree); `Err` names what is short.
    fn check(&self, out: &[f32]) -> Result<(), String> {
        let [b, hq, hkv, s, t, d, dv] = self.dims;
        if hkv == 0 || hq % hkv != 0 {
            return Err(format!(
                "{hq} query heads are not a multiple of {hkv} kv heads"
            ));
        }
        let need = |what: &str, len: usize, dims: &[usize]| {
            let n = dims
                .iter()
                .try_fold(1usize, |a, &x| a.checked_mul(x))
                .ok_or_else(|| format!("attention {what}: size overflows"))?;
            if n != len {
                return Err(format!("attention {what}: {len} values for {dims:?}"));
            }
            Ok(())
        };
        need("q", self.q.len(), &[b, hq, s, d])?;
        need("k", self.k.len(), &[b, hkv, t, d])?;
        need("v", self.v.len(), &[b, hkv, t, dv])?;
        need("output", out.len(), &[b, hq, s, dv])?;
        if let Some(m) = &self.mask {
            let last = [b, hq, s, t]
                .iter()
                .zip(m.strides)
                .map(|(&n, st)| n.saturating_sub(1).saturating_mul(st))
                .fold(0usize, |a, x| a.saturating_add(x));
            if b * hq * s * t > 0 && last >= m.data.len() {
                return Err(format!(
                    "attention mask: {} values, strides {:?} reach {last}",
                    m.data.len(),
                    m.strides
                ));
            }
        }
        Ok(())
    }
}

/// Output pointer shared by work units, each writing its own rows.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: units write pairwise-disjoint rows of the output slice, which outlives the call.
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer (a method, so closures capture the whole `Send + Sync` wrapper).
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// Computes attention into `out` (`[B, Hq, S, Dv]`) on `pool`.
pub fn attention(pool: &Pool, p: &Attention<'_>, out: &mut [f32]) -> Result<(), String> {
    p.check(out)?;
    let [b, hq, _, s, _, _, dv] = p.dims;
    let qblocks = s.div_ceil(QB);
    let units = b * hq * qblocks;
    let optr = OutPtr(out.as_mut_ptr());
    let use_avx2 = avx2::available();
    pool.parallel_for(units, |u| {
        let (bh, qb) = (u / qblocks, u % qblocks);
        let i0 = qb * QB;
        let rows = QB.min(s - i0);
        let base = (bh * s + i0) * dv;
        // SAFETY: unit `u` owns rows `i0..i0 + rows` of head `bh`, disjoint from every other
        // unit's, inside `out` (checked above); `out` is borrowed for the whole call.
        let o = unsafe { std::slice::from_raw_parts_mut(optr.ptr().add(base), rows * dv) };
        if use_avx2 {
            // SAFETY: AVX2 and FMA are present.
            unsafe { unit_avx2(p, bh / hq, bh % hq, i0, rows, o) }
        } else {
            unit::<Plain>(p, bh / hq, bh % hq, i0, rows, o)
        }
    });
    Ok(())
}

/// `a·b + c`, fused where the target has FMA.
trait Fma {
    fn fma(a: f32, b: f32, c: f32) -> f32;
}
struct Plain;
impl Fma for Plain {
    #[inline(always)]
    fn fma(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}
struct Fused;
impl Fma for Fused {
    #[inline(always)]
    fn fma(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

/// # Safety
/// The CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn unit_avx2(p: &Attention<'_>, bi: usize, h: usize, i0: usize, rows: usize, o: &mut [f32]) {
    unit::<Fused>(p, bi, h, i0, rows, o)
}

/// # Safety
/// None (never called off x86-64).
#[cfg(not(target_arch = "x86_64"))]
unsafe fn unit_avx2(p: &Attention<'_>, bi: usize, h: usize, i0: usize, rows: usize, o: &mut [f32]) {
    unit::<Plain>(p, bi, h, i0, rows, o)
}

/// Dot product with 8 independent lanes (vectorises without reassociating a single sum).
#[inline(always)]
fn dot<F: Fma>(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] = F::fma(x[l], y[l], acc[l]);
        }
    }
    let mut tail = 0.0;
    for (x, y) in ar.iter().zip(br) {
        tail = F::fma(*x, *y, tail);
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// One work unit: query rows `i0..i0 + rows` of head `h` in batch `bi` into `o`.
#[inline(always)]
fn unit<F: Fma>(p: &Attention<'_>, bi: usize, h: usize, i0: usize, rows: usize, o: &mut [f32]) {
    let [_, hq, hkv, s, t, d, dv] = p.dims;
    let kh = h / (hq / hkv);
    let qbase = ((bi * hq + h) * s + i0) * d;
    let kbase = (bi * hkv + kh) * t;
    let mut m = [f32::NEG_INFINITY; QB];
    let mut l = [0.0f32; QB];
    let mut sc = [0.0f32; KB];
    o.fill(0.0);
    let mut j0 = 0;
    while j0 < t {
        let kn = KB.min(t - j0);
        for r in 0..rows {
            let i = i0 + r;
            // Query i's absolute position; negative when S > T (no key visible).
            let pos = t as i64 - s as i64 + i as i64;
            let qrow = &p.q[qbase + r * d..][..d];
            let mut bmax = f32::NEG_INFINITY;
            for (jj, scv) in sc[..kn].iter_mut().enumerate() {
                let j = j0 + jj;
                let krow = &p.k[(kbase + j) * d..][..d];
                let mut x = dot::<F>(qrow, krow) * p.scale;
                if let Some(mk) = &p.mask {
                    let [sb, sh, si, sj] = mk.strides;
                    x += mk.data[bi * sb + h * sh + i * si + j * sj];
                }
                if p.causal && j as i64 > pos {
                    x = f32::NEG_INFINITY;
                }
                *scv = x;
                // f32::max ignores NaN, as the reference's fold does.
                bmax = bmax.max(x);
            }
            let m_old = m[r];
            let m_new = m_old.max(bmax);
            // The reference shifts by the row max when it is finite, else by 0.
            let shift = if m_new.is_finite() { m_new } else { 0.0 };
            let orow = &mut o[r * dv..][..dv];
            if m_new != m_old {
                // Rescale what was accumulated under the old shift. With no finite score
                // seen yet everything so far is exp(−inf) = 0 (or NaN, kept by 0·NaN).
                // With no finite score seen yet everything so far is exp(−inf) = 0 (or NaN,
                // kept by 0·NaN); against a +inf score the old terms vanish.
                let corr = if m_old == f32::NEG_INFINITY || m_new == f32::INFINITY {
                    0.0
                } else {
                    fast_exp(m_old - m_new)
                };
                l[r] *= corr;
                orow.iter_mut().for_each(|x| *x *= corr);
            }
            m[r] = m_new;
            let mut sum = 0.0f32;
            for (jj, &x) in sc[..kn].iter().enumerate() {
                // fast_exp clamps its argument; the infinities keep the reference's meaning.
                let e = if x == f32::NEG_INFINITY {
                    0.0
                } else if x == f32::INFINITY {
                    f32::INFINITY
                } else {
                    fast_exp(x - shift)
                };
                sum += e;
                // No skip for e == 0: 0·NaN in v must give NaN, as in the reference.
                let vrow = &p.v[(kbase + j0 + jj) * dv..][..dv];
                for (ov, &vv) in orow.iter_mut().zip(vrow) {
                    *ov = F::fma(e, vv, *ov);
                }
            }
            l[r] += sum;
        }
        j0 += kn;
    }
    for r in 0..rows {
        let inv = l[r];
        // 0/0 = NaN for a row with every score −inf, as in the reference.
        o[r * dv..][..dv].iter_mut().for_each(|x| *x /= inv);
    }
}
