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
/// Scratch values per band (input rows of all the group's channels): about 192 KiB, so the
/// band stays in L2 while every block of output channels walks it.
const BAND_VALUES: usize = 48 * 1024;
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
    /// Extra phase rows/columns a tap reaches past the output position.
    halo_h: usize,
    /// Phase width: `ow + halo_w`.
    wq: usize,
}

impl DirectGeo {
    /// The direct geometry of a conv on input `x` (`[N, C, spatial...]`) with weight `w`,
    /// `None` where the direct kernel does not apply (3-D and up, depthwise).
    pub fn new(geo: &ConvGeometry, x: &[usize], w: &[usize]) -> Option<Self> {
        let nsp = x.len().checked_sub(2)?;
        if !(1..=2).contains(&nsp) || w.len() != x.len() {
            return None;
        }
        let (cg, mg) = (w[1], w[0] / geo.group);
        if cg == 1 && mg == 1 {
            return None;
        }
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
            wq: ow + (kw - 1) * dw / sw,
        })
    }

    fn phases(&self) -> usize {
        self.sh * self.sw
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
    let mut rows = (BAND_VALUES / row_vals.max(1))
        .saturating_sub(g.halo_h)
        .clamp(1, g.oh);
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
            fill_band(g, img, oh0, hb, xs);
            let lanes = isa.lanes();
            let q = r * g.wq;
            let qpad = q.next_multiple_of(lanes);
            if ys.len() < MB * qpad {
                ys.resize(MB * qpad, 0.0);
            }
            let phase_len = hb * g.wq;
            let mut offs = Vec::with_capacity(g.kh * g.kw);
            for kh in 0..g.kh {
                for kw in 0..g.kw {
                    let (a, b) = (kh * g.dh, kw * g.dw);
                    let phase = (a % g.sh) * g.sw + b % g.sw;
                    offs.push(phase * phase_len + (a / g.sh) * g.wq + b / g.sw);
                }
            }
            let ic_stride = g.phases() * phase_len;
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
                    let src = &ys[j * qpad..][..q];
                    for i in 0..r {
                        dst[i * g.ow..(i + 1) * g.ow]
                            .copy_from_slice(&src[i * g.wq..i * g.wq + g.ow]);
                    }
                    apply_act(act, isa, dst);
                    if let Some(res) = a.residual {
                        dst.iter_mut()
                            .zip(&res[off..off + r * g.ow])
                            .for_each(|(v, r)| *v += r);
                    }
                }
            }
        });
    });
}

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
/// (zero outside the input), plus a zero tail for the kernel's reads past the last phase.
fn fill_band(g: &DirectGeo, img: &[f32], oh0: usize, hb: usize, xs: &mut Vec<f32>) {
    let (sh, sw) = (g.sh, g.sw);
    let phase_len = hb * g.wq;
    let total = g.cg * g.phases() * phase_len;
    let tail = g.wq + 64;
    if xs.len() < total + tail {
        xs.resize(total + tail, 0.0);
    }
    xs[total..total + tail].fill(0.0);
    for ic in 0..g.cg {
        let xc = &img[ic * g.h * g.w..][..g.h * g.w];
        for ph in 0..sh {
            for pw in 0..sw {
                let base = (ic * g.phases() + ph * sw + pw) * phase_len;
                // Phase columns j read input column sw·j + pw − pl: those in 0..w.
                let jlo = g.pl.saturating_sub(pw).div_ceil(sw).min(g.wq);
                let jhi = if g.w + g.pl > pw {
                    (g.w + g.pl - pw).div_ceil(sw).min(g.wq)
                } else {
                    0
                }
                .max(jlo);
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
    let taps = offs.len();
    let mut wp = w;
    for ic in 0..cg {
        let xc = x.add(ic * ic_stride);
        for &off in offs.iter().take(taps) {
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
