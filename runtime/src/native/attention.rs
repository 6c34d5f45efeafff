//! Fused f32 scaled-dot-product attention (kiln's `attention` op, ir/src/ops/fused.rs),
//! flash-style: per (batch, query head, block of query rows) the scores of one block of keys
//! at a time, an online max/sum softmax and the `×V` accumulation, so the `B×H×S×T` score
//! tensor never exists. Grouped-query heads, `causal` with a kv cache (query `i` at position
//! `T − S + i`), additive masks (bool masks arrive as 0 / −inf), and the reference's NaN for a
//! row whose scores are all −inf.
//!
//! K is first packed once per (batch, kv head) transposed (`[D][T]`, so one vector covers
//! 8 or 16 keys) and V with its rows padded to 16 lanes; then each work unit computes its
//! `rows × keys` score tile with register-blocked FMAs, a vectorised online softmax, and the
//! `P·V` product into a `rows × Dv` accumulator. AVX-512F, AVX2+FMA and portable versions of
//! the same code are chosen at run time ([`Isa`]).
//!
//! Work units are (batch, head, query block) and each writes only its own output rows, in a
//! fixed order, so the result is bit-identical for any thread count.
//!
//! Tensors are head-major (`[B, H, S, D]`), or sequence-major (`[B, S, H, D]`, the op's
//! `layout = "bshd"`: as the projections produce them and the output projection reads them,
//! so no transposes run around the kernel); only the row strides differ.

#[cfg(target_arch = "x86_64")]
mod asm;
mod simd;

use crate::pool::{Pool, SharedMut};
use simd::{exp, Portable, Simd};

/// Query rows per work unit (their scores and accumulators stay in L1 next to one key
/// block).
const QB: usize = 32;
/// Keys per block (a multiple of every tile's key width).
const KB: usize = 128;
/// Keys per block under `causal`: smaller blocks let a unit skip more of the keys it cannot
/// see (llama's S = T = 128: 282 µs with 64-key blocks, 315 µs with 128).
const KB_CAUSAL: usize = 64;
/// V rows and the output accumulator are padded to a multiple of this (every ISA's lanes).
const DV_ALIGN: usize = 16;

/// Which instruction set the kernel runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// The widest the CPU has.
    Auto,
    /// AVX-512F (x86-64).
    Avx512,
    /// AVX2 + FMA (x86-64).
    Avx2,
    /// Plain Rust, any target.
    Portable,
}

impl Isa {
    /// Whether this CPU can run `self` (`Auto` and `Portable` always can).
    pub fn available(self) -> bool {
        match self {
            Isa::Auto | Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => std::is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// `Auto` resolved to a concrete ISA.
    fn resolve(self) -> Isa {
        match self {
            Isa::Auto if Isa::Avx512.available() => Isa::Avx512,
            Isa::Auto if Isa::Avx2.available() => Isa::Avx2,
            Isa::Auto => Isa::Portable,
            other => other,
        }
    }
}

/// An additive mask broadcast to the `[B, Hq, S, T]` scores: element `(b, h, i, j)` is
/// `data[b·sb + h·sh + i·si + j·sj]` (stride 0 where the mask broadcasts).
#[derive(Debug, Clone, Copy)]
pub struct Mask<'a> {
    /// Additive values (a bool mask as 0 for keep, −inf for drop).
    pub data: &'a [f32],
    /// Strides for b, h, i, j.
    pub strides: [usize; 4],
}

/// The problem: q `[B, Hq, S, D]`, k `[B, Hkv, T, D]`, v `[B, Hkv, T, Dv]` and the output
/// `[B, Hq, S, Dv]`, all dense; with `seq_major` the middle two axes of each are swapped
/// (`[B, S, Hq, D]`, ...).
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
    /// Sequence-major tensors (`[B, S, H, D]`) instead of head-major.
    pub seq_major: bool,
}

impl Attention<'_> {
    /// Where the rows of head `h` of batch `b` start in a tensor of `heads` heads × `len`
    /// rows × `width`, and the stride between consecutive rows.
    fn rows_of(
        &self,
        b: usize,
        h: usize,
        heads: usize,
        len: usize,
        width: usize,
    ) -> (usize, usize) {
        if self.seq_major {
            ((b * len * heads + h) * width, heads * width)
        } else {
            ((b * heads + h) * len * width, width)
        }
    }

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

/// K and V repacked per (batch, kv head) `g`.
struct Packed {
    /// `kt[g − g0][j / kb][dd][j % kb]`: per key block a `D × kb` transposed tile, contiguous so
    /// that a score tile streams through it (a `[D][T]` layout strides rows by whole pages
    /// and thrashes L1 sets). Zero past `T`.
    kt: Vec<f32>,
    /// `vp[g − g0][j][x]`, `tp` rows of `dvp` (zero past `T` and `Dv`); empty when `Dv` is
    /// already a multiple of [`DV_ALIGN`] and V is read in place (`T` rows of `Dv`: the
    /// `P·V` tiles read only the keys that exist).
    vp: Vec<f32>,
    /// Per group: one past the last V row holding a NaN or an infinity (0 when none). Key
    /// blocks past it that causal hides from every query of a unit can be skipped: they add
    /// exactly `0·v = 0`.
    v_bad_end: Vec<usize>,
    /// The first group (batch, kv head) held: group `g` is at `g − g0` in the buffers.
    g0: usize,
    /// Keys padded to a multiple of `kb`.
    tp: usize,
    /// Keys per block ([`KB`] or [`KB_CAUSAL`]): the layout of `kt` and the score tile width.
    kb: usize,
    /// `Dv` padded to a multiple of [`DV_ALIGN`].
    dvp: usize,
}

/// Packing buffers kept per calling thread between calls below this many floats each, so
/// that a model's attention layers do not fault fresh zeroed pages in on every call.
const KEEP_PACK_FLOATS: usize = 16 << 20;

thread_local! {
    /// A work unit's scores and output accumulator, reused by the thread's next unit.
    static UNIT_SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
    /// The calling thread's K and V packing buffers from its last call.
    static PACK_BUFS: std::cell::RefCell<(Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Packs K transposed and V padded for groups (batch, kv head) `g0..g0 + ng`, in parallel
/// over them on `pool`, into buffers reused from this thread's last call (every element,
/// padding included, is written here).
fn pack(pool: &Pool, p: &Attention<'_>, kb: usize, g0: usize, ng: usize) -> Packed {
    let [_, _, _, _, t, d, dv] = p.dims;
    let tp = t.div_ceil(kb) * kb;
    let dvp = dv.div_ceil(DV_ALIGN) * DV_ALIGN;
    let (mut kt, mut vp) = PACK_BUFS.with(|c| std::mem::take(&mut *c.borrow_mut()));
    kt.resize(ng * d * tp, 0.0);
    let v_in_place = dv == dvp;
    vp.resize(if v_in_place { 0 } else { ng * tp * dvp }, 0.0);
    let mut v_bad_end = vec![0usize; ng];
    let (ktp, vpp) = (
        SharedMut::new(kt.as_mut_ptr()),
        SharedMut::new(vp.as_mut_ptr()),
    );
    let badp = v_bad_end.as_mut_ptr() as usize;
    pool.parallel_for(ng, |i| {
        // SAFETY: local group `i` owns its own `d·tp`, `tp·dvp` and single-element ranges.
        let (kg, vg, bad) = unsafe {
            (
                std::slice::from_raw_parts_mut(ktp.get().add(i * d * tp), d * tp),
                (!v_in_place)
                    .then(|| std::slice::from_raw_parts_mut(vpp.get().add(i * tp * dvp), tp * dvp)),
                &mut *(badp as *mut usize).add(i),
            )
        };
        *bad = pack_group(p, g0 + i, kb, tp, dvp, kg, vg);
    });
    Packed {
        kt,
        vp,
        v_bad_end,
        g0,
        tp,
        kb,
        dvp,
    }
}

/// Packs group `g`'s keys transposed into `kg` (`d·tp`) and, when given, its values padded
/// into `vg` (`tp·dvp`); returns one past its last V row holding a NaN or an infinity
/// (computed only under `causal`, else 0).
fn pack_group(
    p: &Attention<'_>,
    g: usize,
    kb: usize,
    tp: usize,
    dvp: usize,
    kg: &mut [f32],
    vg: Option<&mut [f32]>,
) -> usize {
    let [_, _, hkv, _, t, d, dv] = p.dims;
    let (k0, ks) = p.rows_of(g / hkv, g % hkv, hkv, t, d);
    for jb in 0..tp / kb {
        let tile = &mut kg[jb * d * kb..][..d * kb];
        let kn = kb.min(t - jb * kb);
        let kblk = &p.k[k0 + jb * kb * ks..][..(kn - 1) * ks + d];
        transpose_keys(kblk, kn, d, ks, tile, kb);
        if kn < kb {
            for row in tile.chunks_exact_mut(kb) {
                row[kn..].fill(0.0);
            }
        }
    }
    let (v0, vs) = p.rows_of(g / hkv, g % hkv, hkv, t, dv);
    let vrow = |j: usize| &p.v[v0 + j * vs..][..dv];
    let mut bad = 0;
    if p.causal {
        // Only causal block skipping needs to know where V stops being finite.
        for j in 0..t {
            let row = vrow(j);
            // Exponent bits all ones (NaN or ±inf), as a branch-free fold that vectorises.
            const EXP: u32 = 0x7f80_0000;
            if row.iter().fold(0, |a: u32, x| a.max(x.to_bits() & EXP)) == EXP {
                bad = j + 1;
            }
        }
    }
    if let Some(vg) = vg {
        // (`max(1)`: with Dv = 0 the buffer is empty and there is nothing to copy.)
        for (j, dst) in vg.chunks_exact_mut(dvp.max(1)).enumerate() {
            if j < t {
                dst[..dv].copy_from_slice(vrow(j));
                dst[dv..].fill(0.0);
            } else {
                dst.fill(0.0);
            }
        }
    }
    bad
}

/// `tile[dd·kb + j] = keys[j·ks + dd]` for `j < kn`, `dd < d` (key rows at stride `ks`): a
/// key block transposed, eight keys at a time so that each write is a run of eight and the
/// eight key rows stay in L1. (Scattering each key row down a column at stride `kb` took
/// 48 µs per ViT layer, this 19.)
fn transpose_keys(keys: &[f32], kn: usize, d: usize, ks: usize, tile: &mut [f32], kb: usize) {
    assert!(kn <= kb && tile.len() >= d * kb);
    assert!(kn == 0 || keys.len() >= (kn - 1) * ks + d);
    let mut j0 = 0;
    while j0 + 8 <= kn {
        let rows: [&[f32]; 8] = std::array::from_fn(|j| &keys[(j0 + j) * ks..][..d]);
        for dd in 0..d {
            let out = &mut tile[dd * kb + j0..][..8];
            for (x, row) in out.iter_mut().zip(&rows) {
                *x = row[dd];
            }
        }
        j0 += 8;
    }
    for j in j0..kn {
        for dd in 0..d {
            tile[dd * kb + j] = keys[j * ks + dd];
        }
    }
}

impl Drop for Packed {
    /// Hands the buffers back to this thread for its next call (unless they are huge).
    fn drop(&mut self) {
        if self.kt.capacity() <= KEEP_PACK_FLOATS && self.vp.capacity() <= KEEP_PACK_FLOATS {
            let bufs = (std::mem::take(&mut self.kt), std::mem::take(&mut self.vp));
            // Ignore a thread being torn down (the buffers are then simply freed).
            let _ = PACK_BUFS.try_with(|c| *c.borrow_mut() = bufs);
        }
    }
}

/// Below this many flops (`2·B·Hq·S·T·(D+Dv)`) an attention call does not use the pool. The
/// pool's workers spin between a run's kernels, so a hand-off costs a microsecond or two: a
/// llama decode step (8 heads × 129 keys, 0.26 MFLOP, ~25 µs) is worth splitting. (When the
/// workers slept, a hand-off cost 15–40 µs and the bound was 4 MFLOP.)
const MIN_PARALLEL_FLOPS: usize = 200_000;

/// Groups (batch, kv head) per thread from which threads take whole groups, packing each
/// themselves, instead of packing all groups first and then sharing out query blocks.
const PER_GROUP_MIN: usize = 2;

/// Computes attention into `out` (`[B, Hq, S, Dv]`) on `pool`, with the widest ISA.
pub fn attention(pool: &Pool, p: &Attention<'_>, out: &mut [f32]) -> Result<(), String> {
    attention_with(pool, p, out, Isa::Auto)
}

/// [`attention`] with the instruction set chosen by the caller (tests force each one);
/// `Err` when this CPU lacks it.
pub fn attention_with(
    pool: &Pool,
    p: &Attention<'_>,
    out: &mut [f32],
    isa: Isa,
) -> Result<(), String> {
    p.check(out)?;
    if !isa.available() {
        return Err(format!("attention: this CPU cannot run {isa:?}"));
    }
    let isa = isa.resolve();
    let [b, hq, _, s, t, d, dv] = p.dims;
    // Small calls (decode steps, tiny models) run on the calling thread: waking the pool's
    // workers costs more than the work. Units compute the same either way.
    let single = Pool::single();
    let flops = 2usize
        .saturating_mul(b * hq)
        .saturating_mul(s.saturating_mul(t))
        .saturating_mul(d + dv);
    let pool = if flops < MIN_PARALLEL_FLOPS {
        &single
    } else {
        pool
    };
    if t == 0 {
        // No keys: the reference's sum over nothing.
        out.fill(0.0);
        return Ok(());
    }
    let kb = if p.causal { KB_CAUSAL } else { KB };
    let [_, _, hkv, ..] = p.dims;
    let (groups, qpg) = (b * hkv, hq / hkv);
    let qblocks = s.div_ceil(QB);
    let optr = SharedMut::new(out.as_mut_ptr());
    // Query rows `qb·QB ..` of head `h` in batch `bi`, with `packed` holding its group.
    let unit = |packed: &Packed, bi: usize, h: usize, qb: usize| {
        let i0 = qb * QB;
        let rows = QB.min(s - i0);
        let (o0, os) = p.rows_of(bi, h, hq, s, dv);
        let job = Unit {
            p,
            pk: packed,
            bi,
            h,
            i0,
            rows,
            // Row `i0` of the unit's head: in bounds (`out` checked above, `i0 < s`).
            out: optr.get().wrapping_add(o0 + i0 * os),
            os,
        };
        match isa {
            // SAFETY: `available` checked the features.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { unit_avx512(&job) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { unit_avx2(&job) },
            _ => job.run::<Portable, 4, 2, 2>(),
        }
    };
    if pool.threads() > 1 && groups >= PER_GROUP_MIN * pool.threads() {
        // Enough (batch, kv head) groups to share out whole: each thread packs the groups it
        // takes and runs all their query blocks, so K is transposed by the core that reads
        // it and the separate packing pass (and its hand-off) goes.
        pool.parallel_for(groups, |g| {
            let packed = pack(&Pool::single(), p, kb, g, 1);
            let (bi, first) = (g / hkv, (g % hkv) * qpg);
            for h in first..first + qpg {
                for qb in 0..qblocks {
                    unit(&packed, bi, h, qb);
                }
            }
        });
    } else {
        let packed = pack(pool, p, kb, 0, groups);
        pool.parallel_for(b * hq * qblocks, |u| {
            let (bh, qb) = (u / qblocks, u % qblocks);
            unit(&packed, bh / hq, bh % hq, qb);
        });
    }
    Ok(())
}

/// # Safety
/// The CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn unit_avx512(job: &Unit<'_>) {
    job.run::<simd::Avx512, 8, 2, 2>()
}

/// # Safety
/// The CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn unit_avx2(job: &Unit<'_>) {
    job.run::<simd::Avx2, 4, 2, 2>()
}

/// One work unit: query rows `i0..i0 + rows` of head `h` in batch `bi`.
struct Unit<'a> {
    p: &'a Attention<'a>,
    pk: &'a Packed,
    bi: usize,
    h: usize,
    i0: usize,
    rows: usize,
    /// Output row `i0` of the unit's head; rows at stride `os`. The unit's rows are
    /// disjoint from every other unit's (they may interleave with them in memory when
    /// sequence-major, hence a pointer rather than a slice).
    out: *mut f32,
    os: usize,
}

impl Unit<'_> {
    /// Runs the unit into its output rows with `R`-row tiles, `NK` vectors of keys per
    /// score tile and `NO` vectors of `Dv` per `P·V` tile.
    #[inline(always)]
    fn run<S: Simd, const R: usize, const NK: usize, const NO: usize>(&self) {
        let p = self.p;
        let [_, hq, _, s, _, d, _] = p.dims;
        let (bi, h, i0, rows, dvp) = (self.bi, self.h, self.i0, self.rows, self.pk.dvp);
        // The unit's query rows, read in place (row `r` at `r·qs`).
        let (q0, qs) = p.rows_of(bi, h, hq, s, d);
        let qbuf = &p.q[q0 + i0 * qs..][..(rows - 1) * qs + d];
        // Taken out and put back rather than used inside `with`'s closure: a closure does not
        // inherit the caller's target features, so the kernel would lose its intrinsics.
        let (mut sc, mut oacc) = UNIT_SCRATCH
            .try_with(|c| std::mem::take(&mut *c.borrow_mut()))
            .unwrap_or_default();
        sc.resize(QB * self.pk.kb, 0.0);
        oacc.clear();
        oacc.resize(rows * dvp, 0.0);
        self.blocks::<S, R, NK, NO>(qbuf, qs, &mut sc, &mut oacc);
        // A thread being torn down just frees them.
        let _ = UNIT_SCRATCH.try_with(|c| *c.borrow_mut() = (sc, oacc));
    }

    /// [`Unit::run`]'s body with its query rows (`qbuf`, row stride `qs`) and scratch:
    /// scores `sc` (`QB × kb`, any contents) and the zeroed accumulator `oacc` (`rows × dvp`).
    #[inline(always)]
    fn blocks<S: Simd, const R: usize, const NK: usize, const NO: usize>(
        &self,
        qbuf: &[f32],
        qs: usize,
        sc: &mut [f32],
        oacc: &mut [f32],
    ) {
        let p = self.p;
        let pk = self.pk;
        let [_, hq, hkv, s, t, d, dv] = p.dims;
        let (tp, dvp, w) = (pk.tp, pk.dvp, S::W);
        let (bi, h, i0, rows) = (self.bi, self.h, self.i0, self.rows);
        let g = bi * hkv + h / (hq / hkv);
        // V rows at stride `vs`: in place (`Dv` a multiple of the lanes) or padded.
        let (vp, vs) = if pk.vp.is_empty() {
            let (v0, vs) = p.rows_of(bi, g % hkv, hkv, t, dv);
            (&p.v[v0..][..(t - 1) * vs + dv], vs)
        } else {
            (&pk.vp[(g - pk.g0) * tp * dvp..][..tp * dvp], dvp)
        };
        let kt = &pk.kt[(g - pk.g0) * d * tp..][..d * tp];
        // Whole R-row tiles, then 4-row tiles, then single rows.
        let rows_r = rows / R * R;
        let rows_4 = rows_r + (rows - rows_r) / 4 * 4;
        let kb = pk.kb;
        debug_assert!(kb.is_multiple_of(NK * w) && dvp.is_multiple_of(w));
        let mut m = [f32::NEG_INFINITY; QB];
        let mut l = [0.0f32; QB];
        // Position of the unit's last query; keys past it are hidden from all its rows.
        let pos_last = t as i64 - s as i64 + (i0 + rows) as i64 - 1;
        let scale = p.scale;
        let mut j0 = 0;
        while j0 < t {
            let kn = kb.min(t - j0);
            let kn_v = kn.div_ceil(w) * w;
            if p.causal && j0 as i64 > pos_last && pk.v_bad_end[g - pk.g0] <= j0 {
                break;
            }
            // Keys any row of the unit can see; the score tile stops there.
            let kq = if p.causal {
                (pos_last + 1 - j0 as i64).clamp(0, kn as i64) as usize
            } else {
                kn
            };
            // Scores: sc[r][jj] = scale · q[r]·k[j0 + jj], in whole vectors up to `kq`.
            let kw = NK * w;
            let kq_v = kq.div_ceil(w) * w;
            let ktb = &kt[j0 * d..][..d * kb];
            for r0 in (0..rows_r).step_by(R) {
                let mut jg = 0;
                while jg + kw <= kq_v {
                    qk_tile::<S, R, NK>(qbuf, qs, ktb, sc, r0, jg, d, kb, scale);
                    jg += kw;
                }
                while jg < kq_v {
                    qk_tile::<S, R, 1>(qbuf, qs, ktb, sc, r0, jg, d, kb, scale);
                    jg += w;
                }
            }
            // Leftover rows: four at a time with four key vectors (16 accumulators), then
            // one at a time.
            for r0 in (rows_r..rows_4).step_by(4) {
                let mut jg = 0;
                while jg + 4 * w <= kq_v {
                    qk_tile::<S, 4, 4>(qbuf, qs, ktb, sc, r0, jg, d, kb, scale);
                    jg += 4 * w;
                }
                while jg < kq_v {
                    qk_tile::<S, 4, 1>(qbuf, qs, ktb, sc, r0, jg, d, kb, scale);
                    jg += w;
                }
            }
            for r0 in rows_4..rows {
                let mut jg = 0;
                while jg + kw <= kq_v {
                    qk_tile::<S, 1, NK>(qbuf, qs, ktb, sc, r0, jg, d, kb, scale);
                    jg += kw;
                }
                while jg < kq_v {
                    qk_tile::<S, 1, 1>(qbuf, qs, ktb, sc, r0, jg, d, kb, scale);
                    jg += w;
                }
            }
            // Online softmax per row; the scores become the weights P.
            for r in 0..rows {
                let i = i0 + r;
                let row = &mut sc[r * kb..][..kb];
                // Query i's absolute position; negative when S > T (no key visible).
                let pos = t as i64 - s as i64 + i as i64;
                let vis = if p.causal {
                    (pos + 1 - j0 as i64).clamp(0, kn as i64) as usize
                } else {
                    kn
                };
                if let Some(mk) = &p.mask {
                    let [sb, sh, si, sj] = mk.strides;
                    let base = bi * sb + h * sh + i * si + j0 * sj;
                    if sj == 1 {
                        for (x, &mv) in row[..vis].iter_mut().zip(&mk.data[base..][..vis]) {
                            *x += mv;
                        }
                    } else {
                        for (jj, x) in row[..vis].iter_mut().enumerate() {
                            *x += mk.data[base + jj * sj];
                        }
                    }
                }
                // Hidden keys and the block's padding up to whole vectors: −inf (overriding
                // any score there). Lanes past `kn_v` are neither written nor read.
                row[vis..kn_v].fill(f32::NEG_INFINITY);
                self.softmax_row::<S>(
                    &mut row[..kn_v],
                    &mut m[r],
                    &mut l[r],
                    &mut oacc[r * dvp..][..dvp],
                );
            }
            // oacc[r] += P[r] · V[j0..j0 + kn].
            let vblk = &vp[j0 * vs..][..(kn - 1) * vs + dvp];
            for r0 in (0..rows_r).step_by(R) {
                let mut x0 = 0;
                while x0 + NO * w <= dvp {
                    pv_tile::<S, R, NO>(sc, vblk, vs, oacc, r0, x0, kn, dvp, kb);
                    x0 += NO * w;
                }
                while x0 < dvp {
                    pv_tile::<S, R, 1>(sc, vblk, vs, oacc, r0, x0, kn, dvp, kb);
                    x0 += w;
                }
            }
            for r0 in (rows_r..rows_4).step_by(4) {
                let mut x0 = 0;
                while x0 + 4 * w <= dvp {
                    pv_tile::<S, 4, 4>(sc, vblk, vs, oacc, r0, x0, kn, dvp, kb);
                    x0 += 4 * w;
                }
                while x0 < dvp {
                    pv_tile::<S, 4, 1>(sc, vblk, vs, oacc, r0, x0, kn, dvp, kb);
                    x0 += w;
                }
            }
            for r0 in rows_4..rows {
                let mut x0 = 0;
                while x0 + NO * w <= dvp {
                    pv_tile::<S, 1, NO>(sc, vblk, vs, oacc, r0, x0, kn, dvp, kb);
                    x0 += NO * w;
                }
                while x0 < dvp {
                    pv_tile::<S, 1, 1>(sc, vblk, vs, oacc, r0, x0, kn, dvp, kb);
                    x0 += w;
                }
            }
            j0 += kn;
        }
        for r in 0..rows {
            let inv = l[r];
            // SAFETY: output row `i0 + r` of the unit's head, `dv` values inside the output
            // (checked by `attention_with`), written by this unit only.
            let y = unsafe { std::slice::from_raw_parts_mut(self.out.add(r * self.os), dv) };
            // 0/0 = NaN for a row with every score −inf, as in the reference.
            for (y, &a) in y.iter_mut().zip(&oacc[r * dvp..][..dv]) {
                *y = a / inv;
            }
        }
    }

    /// One row's online-softmax step over a key block: updates the running max `m` and sum
    /// `l`, rescales the row's accumulator `orow`, and turns `row` into `exp(score − shift)`.
    #[inline(always)]
    fn softmax_row<S: Simd>(&self, row: &mut [f32], m: &mut f32, l: &mut f32, orow: &mut [f32]) {
        let w = S::W;
        let m_old = *m;
        // `max(x, acc)` keeps `acc` for a NaN score, like the reference's `f64::max` fold.
        let mut mx = S::splat(m_old);
        for c in row.chunks_exact(w) {
            // SAFETY: `c` holds `w` values.
            mx = S::max(unsafe { S::load(c.as_ptr()) }, mx);
        }
        let m_new = S::hmax(mx);
        // The reference shifts by the row max when it is finite, else by 0.
        let shift = if m_new.is_finite() { m_new } else { 0.0 };
        // With no finite score seen yet everything so far is exp(−inf) = 0 (or NaN, kept by
        // 0·NaN); against a +inf score the old terms vanish. Computed and applied whether or
        // not the max moved (then the factor is exactly 1): a branch on the new max was
        // mispredicted on about every other key block.
        // The vector recipe on a splat (same bits as the scalar recipe, which outside an
        // FMA-enabled build would make its fused multiply-adds library calls or emulation:
        // that per-row scalar exp doubled bert_tiny's attention time).
        let moved = S::hmax(exp::<S>(S::splat(m_old - m_new)));
        let vanish = m_old == f32::NEG_INFINITY || m_new == f32::INFINITY;
        let corr = if m_new == m_old {
            1.0
        } else if vanish {
            0.0
        } else {
            moved
        };
        let cv = S::splat(corr);
        for c in orow.chunks_exact_mut(w) {
            // SAFETY: `c` holds `w` values.
            unsafe { S::store(c.as_mut_ptr(), S::mul(S::load(c.as_ptr()), cv)) };
        }
        *m = m_new;
        // exp clamps its argument; the infinities keep the reference's meaning.
        let (sh, zero) = (S::splat(shift), S::splat(0.0));
        let (ninf, pinf) = (S::splat(f32::NEG_INFINITY), S::splat(f32::INFINITY));
        let mut sum = zero;
        for c in row.chunks_exact_mut(w) {
            // SAFETY: `c` holds `w` values.
            let x = unsafe { S::load(c.as_ptr()) };
            let e = exp::<S>(S::sub(x, sh));
            let e = S::select_eq(x, ninf, zero, e);
            let e = S::select_eq(x, pinf, pinf, e);
            // SAFETY: as above.
            unsafe { S::store(c.as_mut_ptr(), e) };
            sum = S::add(sum, e);
        }
        *l = *l * corr + S::hsum(sum);
    }
}

/// `sc[r0..r0 + R][jg..jg + N·W] = scale · qbuf[r0..r0 + R] · ktb[..][jg..jg + N·W]` (query
/// rows at stride `qs`), the `R × N` accumulators in registers across `d`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn qk_tile<S: Simd, const R: usize, const N: usize>(
    qbuf: &[f32],
    qs: usize,
    ktb: &[f32],
    sc: &mut [f32],
    r0: usize,
    jg: usize,
    d: usize,
    kb: usize,
    scale: f32,
) {
    let w = S::W;
    assert!((r0 + R - 1) * qs + d <= qbuf.len() && (r0 + R) * kb <= sc.len());
    assert!(jg + N * w <= kb && d * kb <= ktb.len());
    #[cfg(target_arch = "x86_64")]
    if S::ASM_8X32 && R == 8 && N == 2 {
        // SAFETY: `S::ASM_8X32` means AVX-512F is enabled (only `simd::Avx512` sets it); the
        // ranges are the ones asserted above.
        unsafe {
            let sp = sc.as_mut_ptr().add(r0 * kb + jg);
            asm::qk_8x32(
                qbuf.as_ptr().add(r0 * qs),
                qs,
                d,
                ktb.as_ptr().add(jg),
                kb,
                sp,
                scale,
            );
        }
        return;
    }
    let mut acc = [[S::splat(0.0); N]; R];
    let kp = ktb.as_ptr();
    let qp = qbuf.as_ptr();
    for dd in 0..d {
        // SAFETY: `dd·kb + jg + N·w ≤ d·kb ≤ ktb.len()` (asserted above).
        let kv: [S::V; N] =
            std::array::from_fn(|v| unsafe { S::load(kp.add(dd * kb + jg + v * w)) });
        for (r, accr) in acc.iter_mut().enumerate() {
            // SAFETY: row `r0 + r` of `qbuf` exists (asserted above).
            let qb = S::splat(unsafe { *qp.add((r0 + r) * qs + dd) });
            for v in 0..N {
                accr[v] = S::fma(qb, kv[v], accr[v]);
            }
        }
    }
    for (r, accr) in acc.iter().enumerate() {
        for (v, &a) in accr.iter().enumerate() {
            // SAFETY: `(r0 + r)·kb + jg + v·w + w ≤ sc.len()` (asserted above).
            unsafe {
                S::store(
                    sc.as_mut_ptr().add((r0 + r) * kb + jg + v * w),
                    S::mul(a, S::splat(scale)),
                )
            };
        }
    }
}

/// `oacc[r0..r0 + R][x0..x0 + N·W] += P[r0..r0 + R][..kn] · vblk[..kn][x0..x0 + N·W]` (V
/// rows at stride `vs`), the accumulators in registers across the keys. No skip for a zero weight: `0·NaN` in V must
/// give NaN, as in the reference.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn pv_tile<S: Simd, const R: usize, const N: usize>(
    sc: &[f32],
    vblk: &[f32],
    vs: usize,
    oacc: &mut [f32],
    r0: usize,
    x0: usize,
    kn: usize,
    dvp: usize,
    kb: usize,
) {
    let w = S::W;
    assert!((r0 + R) * kb <= sc.len() && (r0 + R) * dvp <= oacc.len());
    assert!(kn >= 1 && (kn - 1) * vs + dvp <= vblk.len() && x0 + N * w <= dvp);
    let op = oacc.as_mut_ptr();
    #[cfg(target_arch = "x86_64")]
    if S::ASM_8X32 && R == 8 && N == 2 {
        // SAFETY: `S::ASM_8X32` means AVX-512F is enabled (only `simd::Avx512` sets it); the
        // ranges are the ones asserted above.
        unsafe {
            let o = op.add(r0 * dvp + x0);
            asm::pv_8x32(
                sc.as_ptr().add(r0 * kb),
                kb,
                vblk.as_ptr().add(x0),
                vs,
                kn,
                o,
                dvp,
            );
        }
        return;
    }
    // SAFETY (loads/stores below): rows `r0..r0 + R` exist in `sc` and `oacc`, columns
    // `x0..x0 + N·w` lie inside `dvp`, and keys `..kn` inside `vblk` (asserted above and
    // guaranteed by the caller's loop bounds).
    let mut acc: [[S::V; N]; R] = std::array::from_fn(|r| {
        std::array::from_fn(|v| unsafe { S::load(op.add((r0 + r) * dvp + x0 + v * w)) })
    });
    let sp = sc.as_ptr();
    let vpp = vblk.as_ptr();
    for j in 0..kn {
        let vv: [S::V; N] =
            std::array::from_fn(|v| unsafe { S::load(vpp.add(j * vs + x0 + v * w)) });
        for (r, accr) in acc.iter_mut().enumerate() {
            let pr = S::splat(unsafe { *sp.add((r0 + r) * kb + j) });
            for v in 0..N {
                accr[v] = S::fma(pr, vv[v], accr[v]);
            }
        }
    }
    for (r, accr) in acc.iter().enumerate() {
        for (v, &a) in accr.iter().enumerate() {
            unsafe { S::store(op.add((r0 + r) * dvp + x0 + v * w), a) };
        }
    }
}
