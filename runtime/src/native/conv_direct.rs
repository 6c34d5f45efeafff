//! Direct f32 convolution for 1-D and 2-D convs with a small kernel (3×3, 5×5, 7-tap...,
//! any stride, dilation, padding, groups), NCHW in and out, no im2col. Per (image, group,
//! band of output rows) one job copies the band's input, zero-padded and split into
//! stride phases, into a scratch block where every kernel tap is a constant offset from the
//! output position: with `Wq` the phase width, output `q = oh·Wq + ow` reads phase
//! `((kh·dh) % sh, (kw·dw) % sw)` at `q + ((kh·dh)/sh)·Wq + (kw·dw)/sw` (the `Wq − OW`
//! extra columns are computed and dropped). The micro-kernel keeps `MB` output channels ×
//! `V` vectors of output positions in registers, loads the input vectors of each tap
//! contiguously and broadcasts the weights (packed once, `[ic][tap][oc]` per block of `MB`
//! output channels); AVX-512 (16 lanes) or AVX2+FMA (8 lanes), chosen at run time; without
//! either the caller keeps its GEMM path. The bias starts the sums; the activation and the
//! residual are applied to each finished strip of output while it is in cache.

use super::conv_gemm::ConvAct;
use super::vmath;
use crate::pool::{Pool, SharedMut};
use kiln_ir::ops::linalg::ConvGeometry;
use kiln_plan::vmath::Func;

/// Output channels per register block (the weight packing's block size).
pub const MB: usize = 6;
/// Scratch values per band (input rows of all the group's channels): 512 KiB, so the band
/// mostly stays in L2 while every block of output channels walks it (each micro-tile reads
/// it once per block, few enough loads per FMA that L3 keeps up where it does not fit).
/// Measured on 3×3 convs of 64 channels at 256² (`examples/conv_bench.rs`): 48 Ki values
/// (1-row bands, each input row copied three times) 85 GFLOP/s, 128 Ki 95, 256 Ki 100.
const BAND_VALUES: usize = 128 * 1024;
/// Output rows per band at least, in halo rows (the rows copied twice): bands of 2 × the
/// halo copy the input at most 1.5 times.
const MIN_ROWS_PER_HALO: usize = 2;
/// Jobs per thread at least, where the rows allow, so the dynamic job queue balances.
const JOBS_PER_THREAD: usize = 4;

/// The vector ISA of the direct kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirectIsa {
    /// AVX-512F, 16 lanes, `MB × 4` vectors.
    Avx512,
    /// AVX2 + FMA, 8 lanes, `MB × 2` vectors.
    Avx2,
}

impl DirectIsa {
    /// The best ISA this CPU runs (`None`: no direct path).
    pub fn detect() -> Option<Self> {
        if vmath::Isa::Avx512.available() {
            Some(DirectIsa::Avx512)
        } else if vmath::Isa::Avx2.available() {
            Some(DirectIsa::Avx2)
        } else {
            None
        }
    }

    /// Whether this CPU runs `self`.
    pub fn available(self) -> bool {
        match self {
            DirectIsa::Avx512 => vmath::Isa::Avx512.available(),
            DirectIsa::Avx2 => vmath::Isa::Avx2.available(),
        }
    }

    fn lanes(self) -> usize {
        match self {
            DirectIsa::Avx512 => 16,
            DirectIsa::Avx2 => 8,
        }
    }

    /// Vectors of output positions per micro-tile.
    fn vecs(self) -> usize {
        match self {
            DirectIsa::Avx512 => 4,
            DirectIsa::Avx2 => 2,
        }
    }
}

/// The weight packed for the direct kernel: per group and block of `MB` output channels,
/// `[cg][taps][mlen]` (`mlen` the block's channel count), and the bias (zeros without one).
#[derive(Debug)]
pub struct DirectWeights {
    data: Vec<f32>,
    bias: Vec<f32>,
    /// `[OC, C_g, k...]`.
    shape: Vec<usize>,
    group: usize,
    biased: bool,
}

impl DirectWeights {
    /// Packs `w` (`[OC, C_g, k...]`) and `bias` for `group` groups; `None` when they do not
    /// fit.
    pub fn new(w: &[f32], shape: &[usize], bias: Option<&[f32]>, group: usize) -> Option<Self> {
        let (&m, rest) = shape.split_first()?;
        let (&cg, ks) = rest.split_first()?;
        let taps: usize = ks.iter().product();
        if group == 0
            || m % group != 0
            || w.len() != m * cg * taps
            || bias.is_some_and(|b| b.len() != m)
        {
            return None;
        }
        let mg = m / group;
        let blocks = mg.div_ceil(MB);
        let mut data = vec![0.0f32; group * blocks * MB * cg * taps];
        for g in 0..group {
            for b in 0..blocks {
                let m0 = b * MB;
                let mlen = MB.min(mg - m0);
                let dst = &mut data[(g * blocks + b) * MB * cg * taps..][..mlen * cg * taps];
                for ic in 0..cg {
                    for t in 0..taps {
                        for j in 0..mlen {
                            let oc = g * mg + m0 + j;
                            dst[(ic * taps + t) * mlen + j] = w[(oc * cg + ic) * taps + t];
                        }
                    }
                }
            }
        }
        Some(DirectWeights {
            data,
            bias: bias.map_or_else(|| vec![0.0; m], <[f32]>::to_vec),
            shape: shape.to_vec(),
            group,
            biased: bias.is_some(),
        })
    }

    /// Whether these weights are for weight shape `shape`, `group` groups, with a bias or
    /// not.
    pub fn fits(&self, shape: &[usize], group: usize, biased: bool) -> bool {
        self.shape == shape && self.group == group && self.biased == biased
    }
}

/// A conv's geometry as the direct kernel sees it (1-D as one row).
#[derive(Debug, Clone)]
pub struct DirectGeo {
    n: usize,
    cg: usize,
    mg: usize,
    group: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    sh: usize,
    sw: usize,
    dh: usize,
    dw: usize,
    pt: usize,
    pl: usize,
    oh: usize,
    ow: usize,
    /// Extra phase rows a tap reaches below the output position.
    halo_h: usize,
    /// Extra phase columns a tap reaches right of the output position.
    halo_w: usize,
    /// Phase row width: at least `ow`, and narrower than `ow + halo_w` where the zero
    /// columns of the left padding can be shared: a tap reading past a row's end then reads
    /// the next row's leading zeros (see [`phase_width`]).
    wq: usize,
    /// Zeros after each phase's last row, for those reads past it.
    spill: usize,
}

/// Phase columns `jlo..jhi` of phase `pw` hold input (read column `sw·j + pw − pl`).
fn phase_columns(w: usize, sw: usize, pl: usize, pw: usize) -> (usize, usize) {
    let jlo = pl.saturating_sub(pw).div_ceil(sw);
    let jhi = if w + pl > pw {
        (w + pl - pw).div_ceil(sw)
    } else {
        0
    };
    (jlo, jhi.max(jlo))
}

/// The phase row width of a conv's last spatial axis and the spill it needs: the output
/// position `j < ow` reads column `j + t` of phase `pw` for each tap offset `t ≤ mx_pw`
/// there, so columns up to `need = ow + mx_pw` are read; a width `wq < need` is right where
/// the columns past it, read from the next row's start, are that row's zeros (`need − wq ≤
/// jlo`) and the input columns read (`jlo..min(jhi, need)`) fit in the row.
fn phase_width(w: usize, k: usize, s: usize, d: usize, pl: usize, ow: usize) -> (usize, usize) {
    let mut wq = ow.max(1);
    let mut need_max = 0;
    for pw in 0..s {
        let Some(mx) = (0..k)
            .map(|t| t * d)
            .filter(|b| b % s == pw)
            .map(|b| b / s)
            .max()
        else {
            continue;
        };
        let need = ow + mx;
        let (jlo, jhi) = phase_columns(w, s, pl, pw);
        wq = wq.max(jhi.min(need)).max(need.saturating_sub(jlo));
        need_max = need_max.max(need);
    }
    (wq, need_max.saturating_sub(wq))
}

impl DirectGeo {
    /// The direct geometry of a conv on input `x` (`[N, C, spatial...]`) with weight `w`,
    /// `None` where the direct kernels do not apply (3-D and up).
    pub fn new(geo: &ConvGeometry, x: &[usize], w: &[usize]) -> Option<Self> {
        let nsp = x.len().checked_sub(2)?;
        if !(1..=2).contains(&nsp) || w.len() != x.len() {
            return None;
        }
        let (cg, mg) = (w[1], w[0] / geo.group);
        let two = nsp == 2;
        let (h, kh, sh, dh, pt, oh) = if two {
            (
                x[2],
                geo.kernel[0],
                geo.strides[0],
                geo.dilations[0],
                geo.pads_begin[0],
                geo.out[0],
            )
        } else {
            (1, 1, 1, 1, 0, 1)
        };
        let l = nsp - 1;
        let (wd, kw, sw, dw, pl, ow) = (
            x[2 + l],
            geo.kernel[l],
            geo.strides[l],
            geo.dilations[l],
            geo.pads_begin[l],
            geo.out[l],
        );
        if [kh, kw, sh, sw, dh, dw].contains(&0) {
            return None;
        }
        let (wq, spill) = phase_width(wd, kw, sw, dw, pl, ow);
        Some(DirectGeo {
            n: x[0],
            cg,
            mg,
            group: geo.group,
            h,
            w: wd,
            kh,
            kw,
            sh,
            sw,
            dh,
            dw,
            pt,
            pl,
            oh,
            ow,
            halo_h: (kh - 1) * dh / sh,
            halo_w: (kw - 1) * dw / sw,
            wq,
            spill,
        })
    }

    fn phases(&self) -> usize {
        self.sh * self.sw
    }

    /// Scratch values per phase of a band of `hb` phase rows.
    fn phase_len(&self, hb: usize) -> usize {
        hb * self.wq + self.spill
    }
}

thread_local! {
    /// Each thread's band scratch and output strip, grown on demand and kept.
    static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// The operands of one direct run (the weight and bias come packed).
pub struct DirectArgs<'a> {
    /// `[N, C, spatial...]`.
    pub x: &'a [f32],
    /// Added after the activation, the output's own shape.
    pub residual: Option<&'a [f32]>,
}

/// Runs the conv of geometry `g` with packed weights `wt` into `y` (`[N, OC, out...]`,
/// every value written). The caller has checked the operand lengths.
pub fn run(
    pool: &Pool,
    isa: DirectIsa,
    g: &DirectGeo,
    wt: &DirectWeights,
    a: &DirectArgs<'_>,
    act: ConvAct,
    y: &mut [f32],
) {
    let m = g.mg * g.group;
    let p = g.oh * g.ow;
    debug_assert_eq!(y.len(), g.n * m * p);
    debug_assert_eq!(a.x.len(), g.n * g.cg * g.group * g.h * g.w);
    let blocks = g.mg.div_ceil(MB);
    // Rows per band: the scratch in cache, then enough jobs for the threads.
    let row_vals = g.cg * g.phases() * g.wq;
    let mut rows = band_rows(g, row_vals);
    let want = pool.threads() * JOBS_PER_THREAD;
    let outer = g.n * g.group;
    if pool.threads() > 1 && outer * g.oh.div_ceil(rows) < want {
        rows = rows.min(g.oh.div_ceil(want.div_ceil(outer)).max(1));
    }
    let bands = g.oh.div_ceil(rows);
    // Blocks of output channels split too where the rows alone leave threads idle.
    let mut parts = 1;
    if pool.threads() > 1 && outer * bands < want {
        parts = want.div_ceil(outer * bands).min(blocks);
    }
    let jobs = outer * bands * parts;
    let y_ptr = SharedMut::new(y.as_mut_ptr());
    let y_len = y.len();
    pool.parallel_for(jobs, |job| {
        let (rest, part) = (job / parts, job % parts);
        let (ng, band) = (rest / bands, rest % bands);
        let (ni, gi) = (ng / g.group, ng % g.group);
        let oh0 = band * rows;
        let r = rows.min(g.oh - oh0);
        let (b0, b1) = (blocks * part / parts, blocks * (part + 1) / parts);
        SCRATCH.with(|cell| {
            let mut cell = cell.borrow_mut();
            let (xs, ys) = &mut *cell;
            let img = &a.x[(ni * g.group + gi) * g.cg * g.h * g.w..][..g.cg * g.h * g.w];
            let hb = r + g.halo_h;
            fill_band(isa, g, img, oh0, hb, xs);
            let lanes = isa.lanes();
            let q = r * g.wq;
            let qpad = q.next_multiple_of(lanes);
            if ys.len() < MB * qpad {
                ys.resize(MB * qpad, 0.0);
            }
            let offs = tap_offsets(g, hb);
            let ic_stride = g.phases() * g.phase_len(hb);
            let taps = offs.len();
            for b in b0..b1 {
                let m0 = b * MB;
                let mlen = MB.min(g.mg - m0);
                let wb = &wt.data[(gi * blocks + b) * MB * g.cg * taps..][..mlen * g.cg * taps];
                let oc0 = gi * g.mg + m0;
                let bias = &wt.bias[oc0..oc0 + mlen];
                // SAFETY: the band scratch holds `cg · ic_stride` values plus a zero tail
                // past every read (`fill_band`); `ys` holds `MB · qpad`; the ISA was
                // detected by the caller.
                unsafe {
                    tiles(
                        isa,
                        xs.as_ptr(),
                        ic_stride,
                        g.cg,
                        &offs,
                        wb.as_ptr(),
                        bias,
                        ys.as_mut_ptr(),
                        qpad,
                    )
                };
                for j in 0..mlen {
                    let off = ((ni * m + oc0 + j) * g.oh + oh0) * g.ow;
                    debug_assert!(off + r * g.ow <= y_len);
                    // SAFETY: rows `oh0..oh0 + r` of output channel `oc0 + j` of image `ni`
                    // belong to this job alone; `y` lives until `parallel_for` returns.
                    let dst =
                        unsafe { std::slice::from_raw_parts_mut(y_ptr.get().add(off), r * g.ow) };
                    let res = a.residual.map(|res| &res[off..off + r * g.ow]);
                    epilogue(g, r, &ys[j * qpad..][..q], dst, act, isa, res);
                }
            }
        });
    });
}

/// Runs a depthwise conv (one input and one output channel per group) of geometry `g`:
/// per (image, channel, band of output rows) one job fills the band like [`run`] does and
/// sums the taps over vectors of output positions, the weight (`[C, 1, k...]`, run-time
/// or constant) broadcast per tap. `bias` is `[C]`.
#[allow(clippy::too_many_arguments)]
pub fn run_depthwise(
    pool: &Pool,
    isa: DirectIsa,
    g: &DirectGeo,
    w: &[f32],
    bias: Option<&[f32]>,
    a: &DirectArgs<'_>,
    act: ConvAct,
    y: &mut [f32],
) {
    debug_assert!(g.cg == 1 && g.mg == 1);
    let c = g.group;
    let p = g.oh * g.ow;
    let taps = g.kh * g.kw;
    debug_assert_eq!(y.len(), g.n * c * p);
    debug_assert_eq!(w.len(), c * taps);
    let row_vals = g.phases() * g.wq;
    let rows = band_rows(g, row_vals);
    let bands = g.oh.div_ceil(rows);
    let jobs = g.n * c * bands;
    let y_ptr = SharedMut::new(y.as_mut_ptr());
    let y_len = y.len();
    pool.parallel_for(jobs, |job| {
        let (row, band) = (job / bands, job % bands);
        let ch = row % c;
        let oh0 = band * rows;
        let r = rows.min(g.oh - oh0);
        SCRATCH.with(|cell| {
            let mut cell = cell.borrow_mut();
            let (xs, ys) = &mut *cell;
            let img = &a.x[row * g.h * g.w..][..g.h * g.w];
            let hb = r + g.halo_h;
            fill_band(isa, g, img, oh0, hb, xs);
            let q = r * g.wq;
            let qpad = q.next_multiple_of(isa.lanes());
            if ys.len() < qpad {
                ys.resize(qpad, 0.0);
            }
            let offs = tap_offsets(g, hb);
            let wc = &w[ch * taps..][..taps];
            let b = bias.map_or(0.0, |b| b[ch]);
            // SAFETY: as in `run` (one block of one channel); the ISA was detected by the
            // caller.
            unsafe { dw_rows(isa, xs.as_ptr(), &offs, wc, b, ys.as_mut_ptr(), qpad) };
            let off = (row * g.oh + oh0) * g.ow;
            debug_assert!(off + r * g.ow <= y_len);
            // SAFETY: rows `oh0..oh0 + r` of this (image, channel) belong to this job alone;
            // `y` lives until `parallel_for` returns.
            let dst = unsafe { std::slice::from_raw_parts_mut(y_ptr.get().add(off), r * g.ow) };
            epilogue(
                g,
                r,
                &ys[..q],
                dst,
                act,
                isa,
                a.residual.map(|res| &res[off..off + r * g.ow]),
            );
        });
    });
}

/// Output rows per band for `row_vals` scratch values per output row: the band in
/// [`BAND_VALUES`], but at least [`MIN_ROWS_PER_HALO`] × the halo while the band stays
/// within 4 × [`BAND_VALUES`] (wide dilated kernels).
fn band_rows(g: &DirectGeo, row_vals: usize) -> usize {
    let fit = |vals: usize| (vals / row_vals.max(1)).saturating_sub(g.halo_h);
    fit(BAND_VALUES)
        .max((MIN_ROWS_PER_HALO * g.halo_h).min(fit(4 * BAND_VALUES)))
        .clamp(1, g.oh)
}

/// The scratch offset of each kernel tap (row-major over the kernel) from an output
/// position, for a band of `hb` phase rows.
fn tap_offsets(g: &DirectGeo, hb: usize) -> Vec<usize> {
    let phase_len = g.phase_len(hb);
    let mut offs = Vec::with_capacity(g.kh * g.kw);
    for kh in 0..g.kh {
        for kw in 0..g.kw {
            let (a, b) = (kh * g.dh, kw * g.dw);
            let phase = (a % g.sh) * g.sw + b % g.sw;
            offs.push(phase * phase_len + (a / g.sh) * g.wq + b / g.sw);
        }
    }
    offs
}

/// Copies the `ow` valid columns of each of `r` rows of `src` (`[r][wq]`) into `dst`
/// (`[r][ow]`), then applies the activation and adds the residual.
fn epilogue(
    g: &DirectGeo,
    r: usize,
    src: &[f32],
    dst: &mut [f32],
    act: ConvAct,
    isa: DirectIsa,
    residual: Option<&[f32]>,
) {
    for i in 0..r {
        dst[i * g.ow..(i + 1) * g.ow].copy_from_slice(&src[i * g.wq..i * g.wq + g.ow]);
    }
    apply_act(act, isa, dst);
    if let Some(res) = residual {
        dst.iter_mut().zip(res).for_each(|(v, r)| *v += r);
    }
}

/// `out[q] = bias + Σ_t w[t] · x[offs[t] + q]` for `q < qpad` (a multiple of the lanes).
///
/// # Safety
/// `x` is readable at every `offs[t] + qpad`; `out` is writable for `qpad`; the CPU has
/// `isa`.
unsafe fn dw_rows(
    isa: DirectIsa,
    x: *const f32,
    offs: &[usize],
    w: &[f32],
    bias: f32,
    out: *mut f32,
    qpad: usize,
) {
    #[cfg(target_arch = "x86_64")]
    match isa {
        DirectIsa::Avx512 => dw_rows512(x, offs, w, bias, out, qpad),
        DirectIsa::Avx2 => dw_rows256(x, offs, w, bias, out, qpad),
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("{isa:?} on another architecture");
}

/// Defines a depthwise row kernel on one vector ISA: four vectors of output positions at
/// a time (then one), each tap's weight broadcast once per step.
macro_rules! dw_kernel {
    ($name:ident, $feat:literal, $lanes:literal, $set1:ident, $load:ident, $fma:ident, $store:ident) => {
        /// [`dw_rows`] on one ISA.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feat)]
        unsafe fn $name(
            x: *const f32,
            offs: &[usize],
            w: &[f32],
            bias: f32,
            out: *mut f32,
            qpad: usize,
        ) {
            use std::arch::x86_64::*;
            const L: usize = $lanes;
            let b = $set1(bias);
            let mut q = 0;
            while q + 4 * L <= qpad {
                let mut acc = [b; 4];
                for (&off, &wt) in offs.iter().zip(w) {
                    let wv = $set1(wt);
                    let xt = x.add(off + q);
                    for (j, a) in acc.iter_mut().enumerate() {
                        *a = $fma(wv, $load(xt.add(j * L)), *a);
                    }
                }
                for (j, a) in acc.iter().enumerate() {
                    $store(out.add(q + j * L), *a);
                }
                q += 4 * L;
            }
            while q < qpad {
                let mut acc = b;
                for (&off, &wt) in offs.iter().zip(w) {
                    acc = $fma($set1(wt), $load(x.add(off + q)), acc);
                }
                $store(out.add(q), acc);
                q += L;
            }
        }
    };
}

dw_kernel!(
    dw_rows512,
    "avx512f",
    16,
    _mm512_set1_ps,
    _mm512_loadu_ps,
    _mm512_fmadd_ps,
    _mm512_storeu_ps
);
dw_kernel!(
    dw_rows256,
    "avx2,fma",
    8,
    _mm256_set1_ps,
    _mm256_loadu_ps,
    _mm256_fmadd_ps,
    _mm256_storeu_ps
);

/// The activation of `act` over `xs`, vectorised where `vmath` has the function.
pub fn apply_act(act: ConvAct, isa: DirectIsa, xs: &mut [f32]) {
    use super::gemm::Activation as A;
    let f = match act {
        ConvAct::Epilogue(A::Silu) => Some(Func::Silu),
        ConvAct::Epilogue(A::GeluErf) => Some(Func::GeluErf),
        ConvAct::Epilogue(A::GeluTanh) => Some(Func::GeluTanh),
        ConvAct::Sigmoid => Some(Func::Sigmoid),
        _ => None,
    };
    let v = match isa {
        DirectIsa::Avx512 => vmath::Isa::Avx512,
        DirectIsa::Avx2 => vmath::Isa::Avx2,
    };
    if let Some(f) = f {
        if vmath::map(f, v, xs) {
            return;
        }
    }
    act.apply_slice(xs);
}

/// Copies rows `oh0·sh − pt ..` of `img` (`[cg, h, w]`) into `xs` as `[cg][phase][hb][wq]`
/// (zero outside the input; each phase followed by `spill` zeros), plus a zero tail for the
/// kernel's reads past the last phase.
fn fill_band(isa: DirectIsa, g: &DirectGeo, img: &[f32], oh0: usize, hb: usize, xs: &mut Vec<f32>) {
    let (sh, sw) = (g.sh, g.sw);
    let phase_len = g.phase_len(hb);
    let total = g.cg * g.phases() * phase_len;
    // Reads past the last phase: a tap's offset within the row plus a vector's overshoot.
    let tail = g.wq + g.halo_w + 64;
    if xs.len() < total + tail {
        xs.resize(total + tail, 0.0);
    }
    xs[total..total + tail].fill(0.0);
    for ic in 0..g.cg {
        let xc = &img[ic * g.h * g.w..][..g.h * g.w];
        for ph in 0..sh {
            for pw in 0..sw {
                let base = (ic * g.phases() + ph * sw + pw) * phase_len;
                xs[base + hb * g.wq..base + phase_len].fill(0.0);
                // Columns past `wq` are either not read or zeros ([`phase_width`]).
                let (jlo, jhi) = phase_columns(g.w, sw, g.pl, pw);
                let (jlo, jhi) = (jlo.min(g.wq), jhi.min(g.wq));
                for i in 0..hb {
                    let dst = &mut xs[base + i * g.wq..][..g.wq];
                    let ir = (sh * (oh0 + i) + ph) as isize - g.pt as isize;
                    if ir < 0 || ir >= g.h as isize {
                        dst.fill(0.0);
                        continue;
                    }
                    let row = &xc[ir as usize * g.w..][..g.w];
                    dst[..jlo].fill(0.0);
                    dst[jhi..].fill(0.0);
                    if jlo < jhi {
                        let c0 = sw * jlo + pw - g.pl;
                        if sw == 1 {
                            dst[jlo..jhi].copy_from_slice(&row[c0..c0 + jhi - jlo]);
                        } else if sw == 2 {
                            let n = jhi - jlo;
                            let src = &row[c0..c0 + 2 * n - 1];
                            // SAFETY: the ISA was detected by the caller.
                            unsafe { copy_stride2(isa, src, &mut dst[jlo..jhi]) };
                        } else {
                            let src = &row[c0..];
                            for (d, s) in dst[jlo..jhi].iter_mut().zip(src.iter().step_by(sw)) {
                                *d = *s;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `dst[i] = src[2i]` for every `i < dst.len()` (`src.len() == 2 · dst.len() − 1`), a vector
/// of outputs at a time from two vectors of input.
///
/// # Safety
/// The CPU has `isa`.
unsafe fn copy_stride2(isa: DirectIsa, src: &[f32], dst: &mut [f32]) {
    let n = dst.len();
    debug_assert_eq!(src.len(), (2 * n).saturating_sub(1));
    #[cfg(target_arch = "x86_64")]
    let i = {
        use std::arch::x86_64::*;
        let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
        match isa {
            DirectIsa::Avx512 => {
                #[target_feature(enable = "avx512f")]
                unsafe fn body(s: *const f32, d: *mut f32, n: usize) -> usize {
                    let idx = _mm512_setr_epi32(
                        0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30,
                    );
                    let mut i = 0;
                    // Reads `src[2i .. 2i + 32]`: within `2n − 1` while `i + 16 < n`.
                    while i + 16 < n {
                        let a = _mm512_loadu_ps(s.add(2 * i));
                        let b = _mm512_loadu_ps(s.add(2 * i + 16));
                        _mm512_storeu_ps(d.add(i), _mm512_permutex2var_ps(a, idx, b));
                        i += 16;
                    }
                    i
                }
                body(s, d, n)
            }
            DirectIsa::Avx2 => {
                #[target_feature(enable = "avx2")]
                unsafe fn body(s: *const f32, d: *mut f32, n: usize) -> usize {
                    let mut i = 0;
                    while i + 8 < n {
                        let a = _mm256_loadu_ps(s.add(2 * i));
                        let b = _mm256_loadu_ps(s.add(2 * i + 8));
                        // [a0 a2 b0 b2 | a4 a6 b4 b6] -> [a0 a2 a4 a6 b0 b2 b4 b6]
                        let t = _mm256_shuffle_ps::<0b10_00_10_00>(a, b);
                        let t = _mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(t));
                        _mm256_storeu_ps(d.add(i), _mm256_castpd_ps(t));
                        i += 8;
                    }
                    i
                }
                body(s, d, n)
            }
        }
    };
    #[cfg(not(target_arch = "x86_64"))]
    let i = {
        let _ = isa;
        0
    };
    for j in i..n {
        dst[j] = src[2 * j];
    }
}

/// All micro-tiles of one block of `mlen = bias.len()` output channels over `qpad`
/// positions (a multiple of the ISA's lanes) into `out` (`[mlen][qpad]`).
///
/// # Safety
/// `x` is readable for `cg · ic_stride` values plus every `offs[t] + qpad` past a channel's
/// start; `w` holds `cg · offs.len() · mlen` values; `out` is writable for `mlen · qpad`;
/// the CPU has `isa`.
#[allow(clippy::too_many_arguments)]
unsafe fn tiles(
    isa: DirectIsa,
    x: *const f32,
    ic_stride: usize,
    cg: usize,
    offs: &[usize],
    w: *const f32,
    bias: &[f32],
    out: *mut f32,
    qpad: usize,
) {
    let lanes = isa.lanes();
    let nv = qpad / lanes;
    let vb = isa.vecs();
    let mut v0 = 0;
    while v0 < nv {
        let v = vb.min(nv - v0);
        let (xp, op) = (x.add(v0 * lanes), out.add(v0 * lanes));
        macro_rules! go {
            ($f:ident, [$($m:literal),*], $vs:tt) => {
                match bias.len() {
                    $( $m => go!(@v $f, $m, $vs), )*
                    _ => unreachable!(),
                }
            };
            (@v $f:ident, $m:literal, [$($v:literal),*]) => {
                match v {
                    $( $v => $f::<$m, $v>(xp, ic_stride, cg, offs, w, bias.as_ptr(), op, qpad), )*
                    _ => unreachable!(),
                }
            };
        }
        #[cfg(target_arch = "x86_64")]
        match isa {
            DirectIsa::Avx512 => go!(tile512, [1, 2, 3, 4, 5, 6], [1, 2, 3, 4]),
            DirectIsa::Avx2 => go!(tile256, [1, 2, 3, 4, 5, 6], [1, 2]),
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("{isa:?} on another architecture");
        v0 += v;
    }
}

/// One `M × V`-vector micro-tile on AVX-512: `out[m][v] = bias[m] + Σ_ic Σ_t w[ic][t][m] ·
/// x[ic·ic_stride + offs[t] + v]`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile512<const M: usize, const V: usize>(
    x: *const f32,
    ic_stride: usize,
    cg: usize,
    offs: &[usize],
    w: *const f32,
    bias: *const f32,
    out: *mut f32,
    out_stride: usize,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); V]; M];
    for (m, row) in acc.iter_mut().enumerate() {
        let b = _mm512_set1_ps(*bias.add(m));
        for a in row.iter_mut() {
            *a = b;
        }
    }
    let mut wp = w;
    for ic in 0..cg {
        let xc = x.add(ic * ic_stride);
        for &off in offs {
            let xt = xc.add(off);
            let mut xv = [_mm512_setzero_ps(); V];
            for (v, r) in xv.iter_mut().enumerate() {
                *r = _mm512_loadu_ps(xt.add(16 * v));
            }
            for (m, row) in acc.iter_mut().enumerate() {
                let wv = _mm512_set1_ps(*wp.add(m));
                for (a, xr) in row.iter_mut().zip(xv.iter()) {
                    *a = _mm512_fmadd_ps(wv, *xr, *a);
                }
            }
            wp = wp.add(M);
        }
    }
    for (m, row) in acc.iter().enumerate() {
        for (v, a) in row.iter().enumerate() {
            _mm512_storeu_ps(out.add(m * out_stride + 16 * v), *a);
        }
    }
}

/// [`tile512`] on AVX2 + FMA (8 lanes).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile256<const M: usize, const V: usize>(
    x: *const f32,
    ic_stride: usize,
    cg: usize,
    offs: &[usize],
    w: *const f32,
    bias: *const f32,
    out: *mut f32,
    out_stride: usize,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); V]; M];
    for (m, row) in acc.iter_mut().enumerate() {
        let b = _mm256_set1_ps(*bias.add(m));
        for a in row.iter_mut() {
            *a = b;
        }
    }
    let mut wp = w;
    for ic in 0..cg {
        let xc = x.add(ic * ic_stride);
        for &off in offs {
            let xt = xc.add(off);
            let mut xv = [_mm256_setzero_ps(); V];
            for (v, r) in xv.iter_mut().enumerate() {
                *r = _mm256_loadu_ps(xt.add(8 * v));
            }
            for (m, row) in acc.iter_mut().enumerate() {
                let wv = _mm256_set1_ps(*wp.add(m));
                for (a, xr) in row.iter_mut().zip(xv.iter()) {
                    *a = _mm256_fmadd_ps(wv, *xr, *a);
                }
            }
            wp = wp.add(M);
        }
    }
    for (m, row) in acc.iter().enumerate() {
        for (v, a) in row.iter().enumerate() {
            _mm256_storeu_ps(out.add(m * out_stride + 8 * v), *a);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows share their padding columns where the left padding covers the right reach.
    #[test]
    fn phase_rows_share_padding_columns() {
        // 3 taps, pad 1: [0 x0 .. x9] + the next row's leading 0 as the right pad.
        assert_eq!(phase_width(10, 3, 1, 1, 1, 10), (11, 1));
        // No left padding: nothing to share, the full reach.
        assert_eq!(phase_width(10, 3, 1, 1, 0, 8), (10, 0));
        // 5 taps, pad 2.
        assert_eq!(phase_width(20, 5, 1, 1, 2, 20), (22, 2));
        // Stride 2, 3 taps, pad 1: phase 0 (input columns -1, 1, ..) reaches one column
        // right and holds input there; phase 1 reaches none.
        assert_eq!(phase_width(20, 3, 2, 1, 1, 10), (11, 0));
        // Stride 2, 3 taps, pad 2: phase 0 starts with a zero to share.
        assert_eq!(phase_width(20, 3, 2, 1, 2, 11), (11, 1));
        // A dilated kernel wider than the output.
        assert_eq!(phase_width(3, 3, 1, 4, 4, 3), (7, 4));
    }
}
