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

/// `o[..DV] += Σ_j e[j]·v[j, ..]` with the accumulator in a fixed-size local array (kept in
/// registers), same order of operations as the generic loop.
#[inline(always)]
fn pv_fixed<F: Fma, const DV: usize>(e: &[f32], v: &[f32], o: &mut [f32]) {
    let o: &mut [f32; DV] = o.try_into().expect("DV wide");
    let mut acc = *o;
    for (&ej, vrow) in e.iter().zip(v.chunks_exact(DV)) {
        let vrow: &[f32; DV] = vrow.try_into().expect("DV wide");
        for x in 0..DV {
            acc[x] = F::fma(ej, vrow[x], acc[x]);
        }
    }
    *o = acc;
}

/// Lane-wise maximum that ignores NaN (as the reference's `f64::max` fold does).
#[inline(always)]
fn max_ignoring_nan(xs: &[f32; KB]) -> f32 {
    let mut m = [f32::NEG_INFINITY; 8];
    for c in xs.chunks_exact(8) {
        for l in 0..8 {
            m[l] = if c[l] > m[l] { c[l] } else { m[l] };
        }
    }
    m.iter()
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a })
}

/// One work unit: query rows `i0..i0 + rows` of head `h` in batch `bi` into `o`. Per key
/// block the keys are transposed into `kt[D × KB]` (zero-padded), so that one query row's
/// `KB` scores are `Σ_d q[d]·kt[d, ..]`: axpys over a fixed-width row that vectorise.
#[inline(always)]
fn unit<F: Fma>(p: &Attention<'_>, bi: usize, h: usize, i0: usize, rows: usize, o: &mut [f32]) {
    let [_, hq, hkv, s, t, d, dv] = p.dims;
    let kh = h / (hq / hkv);
    let qbase = ((bi * hq + h) * s + i0) * d;
    let kbase = (bi * hkv + kh) * t;
    let mut m = [f32::NEG_INFINITY; QB];
    let mut l = [0.0f32; QB];
    let mut kt = vec![0.0f32; d * KB];
    o.fill(0.0);
    let mut j0 = 0;
    while j0 < t {
        let kn = KB.min(t - j0);
        for jj in 0..KB {
            if jj < kn {
                let krow = &p.k[(kbase + j0 + jj) * d..][..d];
                for (dd, &x) in krow.iter().enumerate() {
                    kt[dd * KB + jj] = x;
                }
            } else {
                for dd in 0..d {
                    kt[dd * KB + jj] = 0.0;
                }
            }
        }
        for r in 0..rows {
            let i = i0 + r;
            let qrow = &p.q[qbase + r * d..][..d];
            let mut sc = [0.0f32; KB];
            for (dd, &qv) in qrow.iter().enumerate() {
                let krow: &[f32; KB] = kt[dd * KB..][..KB].try_into().expect("KB wide");
                for j in 0..KB {
                    sc[j] = F::fma(qv, krow[j], sc[j]);
                }
            }
            for x in sc.iter_mut() {
                *x *= p.scale;
            }
            if let Some(mk) = &p.mask {
                let [sb, sh, si, sj] = mk.strides;
                let base = bi * sb + h * sh + i * si + j0 * sj;
                for (jj, x) in sc[..kn].iter_mut().enumerate() {
                    *x += mk.data[base + jj * sj];
                }
            }
            // Query i's absolute position; negative when S > T (no key visible).
            let pos = t as i64 - s as i64 + i as i64;
            // Keys past the block's end are padding: −inf like hidden keys.
            let visible = if p.causal {
                (pos + 1 - j0 as i64).clamp(0, kn as i64) as usize
            } else {
                kn
            };
            sc[visible..].fill(f32::NEG_INFINITY);
            let m_old = m[r];
            let m_new = m_old.max(max_ignoring_nan(&sc));
            // The reference shifts by the row max when it is finite, else by 0.
            let shift = if m_new.is_finite() { m_new } else { 0.0 };
            let orow = &mut o[r * dv..][..dv];
            if m_new != m_old {
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
            // fast_exp clamps its argument; the infinities keep the reference's meaning.
            for x in sc.iter_mut() {
                let e = fast_exp(*x - shift);
                *x = if *x == f32::NEG_INFINITY {
                    0.0
                } else if *x == f32::INFINITY {
                    f32::INFINITY
                } else {
                    e
                };
            }
            let mut lanes = [0.0f32; 8];
            for c in sc.chunks_exact(8) {
                for q in 0..8 {
                    lanes[q] += c[q];
                }
            }
            l[r] += ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
                + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
            // No skip for e == 0: 0·NaN in v must give NaN, as in the reference.
            let vblock = &p.v[(kbase + j0) * dv..][..kn * dv];
            if dv == 64 {
                // The common head size: the output row lives in registers across the keys.
                pv_fixed::<F, 64>(&sc[..kn], vblock, orow);
            } else {
                for (&e, vrow) in sc[..kn].iter().zip(vblock.chunks_exact(dv)) {
                    for (ov, &vv) in orow.iter_mut().zip(vrow) {
                        *ov = F::fma(e, vv, *ov);
                    }
                }
            }
        }
        j0 += kn;
    }
    for r in 0..rows {
        let inv = l[r];
        // 0/0 = NaN for a row with every score −inf, as in the reference.
        o[r * dv..][..dv].iter_mut().for_each(|x| *x /= inv);
    }
}
