//! Prepared f32 convolution of any geometry (1-D to 3-D and up, strides, dilations, pads,
//! auto_pad, groups, depthwise) on the GEMM, NCHW in and out, with bias, activation and a
//! residual add fused. The weight is laid out once (per group `[OC_g, C_g·k + 1]`, the bias
//! as the last column) when it is a constant; per image and group the output is
//! `Y_g[OC_g, P] = W_g · cols` where `cols[C_g·k + 1, P]` is im2col's matrix with a row of
//! ones (which adds the bias inside the product). The pixels are cut into chunks small
//! enough that a chunk's `cols` stays in cache: each chunk is one job (gather its columns,
//! one single-threaded GEMM writing its strip of the output in place, the epilogue's
//! activation and residual on it), and the pool's threads take chunks, so threads split
//! output pixels. A 1×1 stride-1 unpadded conv copies its rows of `x` instead of gathering.
//! Depthwise convs (one input and one output channel per group) accumulate directly, rows
//! split over the pool. Which input each kernel offset reads is precomputed per input shape
//! as runs along the last spatial axis ([`Geometry`]). Where the CPU has AVX-512 or AVX2,
//! 1-D and 2-D convs with a constant weight and more than one tap, and depthwise convs,
//! take [`super::conv_direct`] instead (this file decides, per run, which path applies).

use super::conv_direct::{self, DirectArgs, DirectGeo, DirectIsa, DirectWeights};
use super::gemm::{
    gemm_in, Activation, Epilogue, GemmConfig, GemmError, Isa, MatMut, MatRef, PackedB, Rhs,
};
use crate::pool::{Pool, SharedMut};
use kiln_ir::ops::linalg::conv_geometry;
use kiln_ir::Attrs;
use std::sync::{Arc, Mutex};

/// Values of one chunk's `cols` block (`(C_g·k + 1) × pixels`): 96 KiB, under glibc's mmap
/// threshold (the GEMM's per-call B packing allocates as much) and well inside L2.
const CHUNK_VALUES: usize = 128 * 1024;
/// Chunks per thread at least, where the pixels allow, so the dynamic job queue balances.
const CHUNKS_PER_THREAD: usize = 4;
/// Chunk widths are multiples of this (the AVX-512 kernel's panel width).
const CHUNK_ALIGN: usize = 32;

/// The weight laid out for the GEMM: per group a row-major `[mg, cg·ksize + 1]` block whose
/// last column is the bias (zero without one).
#[derive(Debug)]
pub struct ConvWeights {
    data: Vec<f32>,
    /// `[OC, C_g, k...]`, the weight's shape.
    shape: Vec<usize>,
    group: usize,
    /// Whether a bias was folded in.
    biased: bool,
}

impl ConvWeights {
    /// Lays out weight `w` (shape `shape`, `[OC, C_g, k...]`) and `bias` (`[OC]`) for `group`
    /// groups; `None` when the shapes do not fit.
    pub fn new(w: &[f32], shape: &[usize], bias: Option<&[f32]>, group: usize) -> Option<Self> {
        let (&m, rest) = shape.split_first()?;
        let ckk: usize = rest.iter().product();
        if group == 0 || m % group != 0 || w.len() != m * ckk || bias.is_some_and(|b| b.len() != m)
        {
            return None;
        }
        let mut data = Vec::with_capacity(m * (ckk + 1));
        for o in 0..m {
            data.extend_from_slice(&w[o * ckk..(o + 1) * ckk]);
            data.push(bias.map_or(0.0, |b| b[o]));
        }
        Some(ConvWeights {
            data,
            shape: shape.to_vec(),
            group,
            biased: bias.is_some(),
        })
    }
}

/// A run of `len` consecutive outputs from `out` (a flat output position) reading inputs
/// `src, src + step, ...` (`step`: the stride of the last spatial axis).
#[derive(Clone, Copy, Debug)]
struct Run {
    out: usize,
    src: usize,
    len: usize,
}

/// A conv's geometry for one input shape: sizes and, per kernel offset, the runs it reads.
#[derive(Debug)]
pub struct Geometry {
    x_shape: Vec<usize>,
    w_shape: Vec<usize>,
    out_shape: Vec<usize>,
    group: usize,
    /// Output pixels per image.
    p: usize,
    in_sp: usize,
    ksize: usize,
    /// Input step between consecutive outputs along the last axis.
    step: usize,
    /// 1×1, stride 1, no padding: `cols` is the input itself.
    pointwise: bool,
    /// Per kernel offset (row-major over the kernel), its runs in output order.
    runs: Vec<Vec<Run>>,
    /// The direct kernels' view (1-D and 2-D).
    direct: Option<DirectGeo>,
}

impl Geometry {
    /// The geometry of a conv with `attrs` on input shape `x` and weight shape `w`; `Err`
    /// (the reference's message) when the interpreter would reject it.
    pub fn new(attrs: &Attrs, x: &[usize], w: &[usize]) -> Result<Self, String> {
        let geo = conv_geometry(attrs, x, w)?;
        let spatial = &x[2..];
        let nsp = spatial.len();
        let in_sp: usize = spatial.iter().product();
        let p: usize = geo.out.iter().product();
        let ksize: usize = geo.kernel.iter().product();
        let mut out_shape = vec![x[0], w[0]];
        out_shape.extend_from_slice(&geo.out);
        let in_st = kiln_ir::tensor::strides(spatial);
        let last = nsp - 1;
        let (s, d, pb) = (
            geo.strides[last],
            geo.dilations[last],
            geo.pads_begin[last] as i64,
        );
        let (wl, ol) = (spatial[last] as i64, geo.out[last]);
        let outer_out: usize = geo.out[..last].iter().product();
        let mut runs = Vec::with_capacity(ksize);
        let mut k = vec![0usize; nsp];
        for _ in 0..ksize {
            let mut rs = vec![];
            // Last axis: outputs o with 0 <= o·s + k·d − pb < W.
            let base = (k[last] * d) as i64 - pb;
            let lo = if base >= 0 {
                0
            } else {
                ((-base) as usize).div_ceil(s)
            };
            let hi = if base >= wl {
                0
            } else {
                (((wl - 1 - base) as usize) / s + 1).min(ol)
            };
            let mut o = vec![0usize; last];
            for row in 0..outer_out {
                let mut src = Some(0usize);
                for i in 0..last {
                    let pos = (o[i] * geo.strides[i] + k[i] * geo.dilations[i]) as i64
                        - geo.pads_begin[i] as i64;
                    src = match src {
                        Some(a) if (0..spatial[i] as i64).contains(&pos) => {
                            Some(a + pos as usize * in_st[i])
                        }
                        _ => None,
                    };
                }
                if let (Some(a), true) = (src, lo < hi) {
                    rs.push(Run {
                        out: row * ol + lo,
                        src: a + (base + (lo * s) as i64) as usize,
                        len: hi - lo,
                    });
                }
                for i in (0..last).rev() {
                    o[i] += 1;
                    if o[i] < geo.out[i] {
                        break;
                    }
                    o[i] = 0;
                }
            }
            runs.push(rs);
            for i in (0..nsp).rev() {
                k[i] += 1;
                if k[i] < geo.kernel[i] {
                    break;
                }
                k[i] = 0;
            }
        }
        let pointwise = ksize == 1
            && geo.strides.iter().all(|&s| s == 1)
            && geo.pads_begin.iter().all(|&p| p == 0)
            && geo.out == spatial;
        let direct = DirectGeo::new(&geo, x, w);
        Ok(Geometry {
            direct,
            x_shape: x.to_vec(),
            w_shape: w.to_vec(),
            out_shape,
            group: geo.group,
            p,
            in_sp,
            ksize,
            step: s,
            pointwise,
            runs,
        })
    }

    /// The output shape `[N, OC, out...]`.
    pub fn out_shape(&self) -> &[usize] {
        &self.out_shape
    }

    /// Whether each group has one input and one output channel.
    fn depthwise(&self) -> bool {
        self.w_shape[1] == 1 && self.w_shape[0] == self.group
    }
}

/// A conv's fused activation: one the GEMM epilogue applies to the tile in registers, or
/// one applied to each finished output strip while it is still in cache (then the
/// residual is added after it there too).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ConvAct {
    /// In the GEMM epilogue (`none`, `relu`, `gelu`, `gelu_tanh`, `silu`).
    Epilogue(Activation),
    /// `1 / (1 + e^-x)`.
    Sigmoid,
    /// ONNX HardSwish: `x · clamp(x/6 + 1/2, 0, 1)`.
    HardSwish,
    /// ONNX Clip: below `lo` becomes `lo`, above `hi` becomes `hi`; NaN passes.
    Clip(Option<f32>, Option<f32>),
}

impl ConvAct {
    /// The activation a `fused_conv`'s attributes name (`None`: unknown).
    pub fn from_attrs(attrs: &Attrs) -> Option<Self> {
        let name = attrs.string_or("activation", "none".into()).ok()?;
        Some(match name.as_str() {
            "sigmoid" => ConvAct::Sigmoid,
            "hardswish" => ConvAct::HardSwish,
            "clip" => ConvAct::Clip(attrs.float("clip_min").ok()?, attrs.float("clip_max").ok()?),
            other => ConvAct::Epilogue(Activation::from_name(other)?),
        })
    }

    /// The activation of one value.
    #[inline(always)]
    pub fn apply(self, x: f32) -> f32 {
        match self {
            ConvAct::Epilogue(a) => a.apply(x),
            ConvAct::Sigmoid => kiln_plan::vmath::scalar::sigmoid(x),
            ConvAct::HardSwish => x * (x * (1.0 / 6.0) + 0.5).clamp(0.0, 1.0),
            ConvAct::Clip(lo, hi) => {
                let a = match lo {
                    Some(l) if x < l => l,
                    _ => x,
                };
                match hi {
                    Some(h) if a > h => h,
                    _ => a,
                }
            }
        }
    }

    /// Applies the activation to a slice (one loop per kind, so each vectorises).
    pub(crate) fn apply_slice(self, xs: &mut [f32]) {
        match self {
            ConvAct::Epilogue(Activation::None) => {}
            ConvAct::Epilogue(a) => xs.iter_mut().for_each(|v| *v = a.apply(*v)),
            ConvAct::Sigmoid => xs.iter_mut().for_each(|v| *v = ConvAct::Sigmoid.apply(*v)),
            ConvAct::HardSwish => xs
                .iter_mut()
                .for_each(|v| *v = ConvAct::HardSwish.apply(*v)),
            c @ ConvAct::Clip(..) => xs.iter_mut().for_each(|v| *v = c.apply(*v)),
        }
    }
}

/// A conv node prepared once: attributes, the fused activation, the weight laid out when it
/// is a constant, and the geometry of the last input shape seen.
#[derive(Debug)]
pub struct PreparedConv {
    attrs: Attrs,
    act: ConvAct,
    weights: Option<ConvWeights>,
    /// The direct kernels' ISA (`None`: this CPU has none, or they are switched off).
    direct_isa: Option<DirectIsa>,
    /// The weight packed for the direct kernel, when it is a constant, the kernel has more
    /// than one tap and this CPU has a direct ISA.
    direct: Option<(DirectIsa, DirectWeights)>,
    geometry: super::LastShapes<Geometry>,
}

/// The operands of one run.
pub struct ConvArgs<'a> {
    /// `[N, C, spatial...]`.
    pub x: &'a [f32],
    /// The weight `[OC, C_g, k...]` (ignored where a prepared layout of it exists).
    pub w: &'a [f32],
    /// `[OC]`.
    pub bias: Option<&'a [f32]>,
    /// Added after the activation, the output's own shape.
    pub residual: Option<&'a [f32]>,
}

impl PreparedConv {
    /// Prepares a conv with `attrs` and activation `act`; `w` (with its constant `bias`, if
    /// the node has one) is laid out now when it is a constant.
    pub fn new(
        attrs: &Attrs,
        act: ConvAct,
        w: Option<(&[f32], &[usize])>,
        bias: Option<&[f32]>,
    ) -> Self {
        let group = attrs
            .int_or("group", 1)
            .ok()
            .and_then(|g| usize::try_from(g).ok())
            .unwrap_or(0);
        let direct_isa = DirectIsa::detect();
        let direct = direct_isa.and_then(|isa| {
            let (w, shape) = w?;
            // Pointwise convs stay on the GEMM (no im2col to save there).
            if shape.len() < 3 || shape[2..].iter().product::<usize>() <= 1 {
                return None;
            }
            Some((isa, DirectWeights::new(w, shape, bias, group)?))
        });
        PreparedConv {
            attrs: attrs.clone(),
            act,
            weights: w.and_then(|(w, shape)| ConvWeights::new(w, shape, bias, group)),
            direct_isa,
            direct,
            geometry: Default::default(),
        }
    }

    /// This conv with its direct path dropped (or kept), for comparisons.
    pub fn with_direct(mut self, keep: bool) -> Self {
        if !keep {
            self.direct = None;
            self.direct_isa = None;
        }
        self
    }

    /// This conv's direct path on `isa` instead of the detected one (tests of the narrower
    /// ISA on a wider CPU).
    #[cfg(test)]
    fn with_direct_isa(mut self, isa: DirectIsa) -> Self {
        if let Some((i, _)) = &mut self.direct {
            *i = isa;
        }
        if self.direct_isa.is_some() {
            self.direct_isa = Some(isa);
        }
        self
    }

    /// Whether runs of geometry `geo` take the direct kernel.
    pub fn uses_direct(&self, geo: &Geometry, biased: bool) -> bool {
        if geo.depthwise() {
            return self.direct_isa.is_some() && geo.direct.is_some();
        }
        matches!((&self.direct, &geo.direct), (Some((_, w)), Some(_)) if w.fits(&geo.w_shape, geo.group, biased))
    }

    /// Whether the weight was laid out at prepare time.
    pub fn has_weights(&self) -> bool {
        self.weights.is_some()
    }

    /// The geometry for these shapes (cached for the last shapes seen).
    pub fn geometry(&self, x: &[usize], w: &[usize]) -> Result<Arc<Geometry>, String> {
        self.geometry.get(x, w, || Geometry::new(&self.attrs, x, w))
    }

    /// Runs the conv of geometry `geo` into `y` (`geo.out_shape()` values, every one
    /// written).
    pub fn run(
        &self,
        pool: &Pool,
        geo: &Geometry,
        a: &ConvArgs<'_>,
        y: &mut [f32],
    ) -> Result<(), String> {
        let total: usize = geo.out_shape.iter().product();
        let x_len: usize = geo.x_shape.iter().product();
        let w_len: usize = geo.w_shape.iter().product();
        let m = geo.w_shape[0];
        if y.len() != total
            || a.x.len() != x_len
            || a.residual.is_some_and(|r| r.len() != total)
            || a.bias.is_some_and(|b| b.len() != m)
        {
            return Err(format!(
                "conv: {} input / {} output values for shapes {:?} -> {:?}",
                a.x.len(),
                y.len(),
                geo.x_shape,
                geo.out_shape
            ));
        }
        if total == 0 {
            return Ok(());
        }
        if geo.depthwise() {
            if a.w.len() != w_len {
                return Err(format!(
                    "conv: {} weight values for {:?}",
                    a.w.len(),
                    geo.w_shape
                ));
            }
            if let (Some(isa), Some(dg)) = (self.direct_isa, &geo.direct) {
                let da = DirectArgs {
                    x: a.x,
                    residual: a.residual,
                };
                conv_direct::run_depthwise(pool, isa, dg, a.w, a.bias, &da, self.act, y);
                return Ok(());
            }
            depthwise(pool, geo, a, self.act, y);
            return Ok(());
        }
        if let (Some((isa, dw)), Some(dg)) = (&self.direct, &geo.direct) {
            if dw.fits(&geo.w_shape, geo.group, a.bias.is_some()) {
                let da = DirectArgs {
                    x: a.x,
                    residual: a.residual,
                };
                conv_direct::run(pool, *isa, dg, dw, &da, self.act, y);
                return Ok(());
            }
        }
        let here;
        let weights = match &self.weights {
            Some(w)
                if w.shape == geo.w_shape
                    && w.group == geo.group
                    && w.biased == a.bias.is_some() =>
            {
                w
            }
            _ => {
                if a.w.len() != w_len {
                    return Err(format!(
                        "conv: {} weight values for {:?}",
                        a.w.len(),
                        geo.w_shape
                    ));
                }
                here = ConvWeights::new(a.w, &geo.w_shape, a.bias, geo.group)
                    .ok_or_else(|| format!("conv: weight {:?} does not fit", geo.w_shape))?;
                &here
            }
        };
        gemm_conv(pool, geo, a, weights, self.act, y)
    }
}

/// The chunk width (pixels) for a `k1`-deep `cols` block of `p` pixels and `jobs_per_chunk`
/// other independent blocks (images × groups).
fn chunk_width(k1: usize, p: usize, blocks: usize, threads: usize) -> usize {
    let by_cache = (CHUNK_VALUES / k1.max(1)) / CHUNK_ALIGN * CHUNK_ALIGN;
    let mut w = by_cache.max(CHUNK_ALIGN);
    let want = threads * CHUNKS_PER_THREAD;
    if threads > 1 && blocks * p.div_ceil(w) < want {
        let per_block = want.div_ceil(blocks);
        w = w.min(p.div_ceil(per_block).next_multiple_of(CHUNK_ALIGN));
    }
    w.clamp(1, p.max(1))
}

/// One thread's `cols` block, packed for the GEMM, and the scratch row it is gathered in.
struct Scratch {
    packed: PackedB,
    row: Vec<f32>,
}

thread_local! {
    /// Each thread's [`Scratch`], grown on demand and kept for later calls.
    static COLS: std::cell::RefCell<Option<Scratch>> = const { std::cell::RefCell::new(None) };
}

/// Groups with several channels: per (image, group, pixel chunk) one job that gathers the
/// chunk's `cols` and runs the GEMM into its strip of `y`.
fn gemm_conv(
    pool: &Pool,
    geo: &Geometry,
    a: &ConvArgs<'_>,
    weights: &ConvWeights,
    act: ConvAct,
    y: &mut [f32],
) -> Result<(), String> {
    let (n, c) = (geo.x_shape[0], geo.x_shape[1]);
    let m = geo.w_shape[0];
    let (group, cg) = (geo.group, geo.w_shape[1]);
    let mg = m / group;
    let ckk = cg * geo.ksize;
    let k1 = ckk + 1;
    let p = geo.p;
    let cw = chunk_width(k1, p, n * group, pool.threads());
    let chunks = p.div_ceil(cw);
    let jobs = n * group * chunks;
    let y_len = y.len();
    let y_ptr = SharedMut::new(y.as_mut_ptr());
    let failed = Mutex::new(None);
    let cfg = GemmConfig {
        threads: 1,
        isa: Isa::Auto,
    };
    let single = Pool::single();
    pool.parallel_for(jobs, |job| {
        let (ng, ch) = (job / chunks, job % chunks);
        let (ni, g) = (ng / group, ng % group);
        let lo = ch * cw;
        let pc = cw.min(p - lo);
        let r: Result<(), GemmError> = COLS.with(|cell| {
            let mut cell = cell.borrow_mut();
            let sc = match cell.as_mut() {
                Some(sc) => sc,
                None => cell.insert(Scratch {
                    packed: PackedB::empty()?,
                    row: Vec::new(),
                }),
            };
            let img = &a.x[(ni * c + g * cg) * geo.in_sp..][..cg * geo.in_sp];
            sc.packed.refill(k1, pc, &mut sc.row, |r, row| {
                gather_row(geo, img, cg, r, lo, row)
            })?;
            let wg = &weights.data[g * mg * k1..][..mg * k1];
            let off = (ni * m + g * mg) * p + lo;
            let am = MatRef::row_major(wg, mg, k1)?;
            // SAFETY: this job alone writes rows `g·mg..(g+1)·mg` of image `ni`, pixels
            // `lo..lo + pc`: the view's elements, disjoint from every other job's; `y` lives
            // until `parallel_for` returns.
            let cm = unsafe { MatMut::from_raw(y_ptr.get().add(off), y_len - off, mg, pc, p)? };
            let ep = match act {
                ConvAct::Epilogue(activation) => Epilogue {
                    activation,
                    residual: match a.residual {
                        Some(r) => Some(MatRef::new(&r[off..], mg, pc, p, 1)?),
                        None => None,
                    },
                    ..Epilogue::default()
                },
                _ => Epilogue::default(),
            };
            gemm_in(&single, am, Rhs::Packed(&sc.packed), cm, &ep, &cfg)?;
            if !matches!(act, ConvAct::Epilogue(_)) {
                for o in 0..mg {
                    // SAFETY: as for the GEMM's view: this job's own strip of row `o`.
                    let row =
                        unsafe { std::slice::from_raw_parts_mut(y_ptr.get().add(off + o * p), pc) };
                    act.apply_slice(row);
                    if let Some(r) = a.residual {
                        let rr = &r[off + o * p..][..pc];
                        row.iter_mut().zip(rr).for_each(|(v, r)| *v += r);
                    }
                }
            }
            Ok(())
        });
        if let Err(e) = r {
            *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
        }
    });
    match failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(format!("conv: {e}")),
        None => Ok(()),
    }
}

/// Row `r` of `cols` for pixels `lo..lo + row.len()`: for `r = ci·ksize + k`, the input
/// channel `ci` read at kernel offset `k` (zero in the padding); the last row (`r =
/// cg·ksize`) is ones.
fn gather_row(geo: &Geometry, img: &[f32], cg: usize, r: usize, lo: usize, row: &mut [f32]) {
    let hi = lo + row.len();
    let in_sp = geo.in_sp;
    let (ci, k) = (r / geo.ksize, r % geo.ksize);
    if ci == cg {
        row.fill(1.0);
        return;
    }
    let xc = &img[ci * in_sp..][..in_sp];
    if geo.pointwise {
        row.copy_from_slice(&xc[lo..hi]);
        return;
    }
    let step = geo.step;
    let rs = &geo.runs[k];
    // The first run that ends after `lo`.
    let first = rs.partition_point(|run| run.out + run.len <= lo);
    let mut at = lo;
    for run in &rs[first..] {
        if run.out >= hi {
            break;
        }
        let (s, e) = (run.out.max(lo), (run.out + run.len).min(hi));
        row[at - lo..s - lo].fill(0.0);
        let src0 = run.src + (s - run.out) * step;
        let dst = &mut row[s - lo..e - lo];
        let n = dst.len();
        if step == 1 {
            dst.copy_from_slice(&xc[src0..src0 + n]);
        } else {
            // One bounds check for the run, then a plain strided loop (pairs for stride 2,
            // the common downsampling conv, which the compiler turns into shuffles).
            let src = &xc[src0..src0 + (n - 1) * step + 1];
            if step == 2 {
                let (body, last) = dst.split_at_mut(n - 1);
                for (v, c) in body.iter_mut().zip(src.chunks_exact(2)) {
                    *v = c[0];
                }
                last[0] = src[2 * (n - 1)];
            } else {
                for (v, c) in dst.iter_mut().zip(src.chunks(step)) {
                    *v = c[0];
                }
            }
        }
        at = e;
    }
    row[at - lo..].fill(0.0);
}

/// One input and one output channel per group: `y[n, ch] = act(b + Σ_k w[ch, k]·x[n, ch,
/// shifted]) + residual`, rows (image, channel) split over the pool.
fn depthwise(pool: &Pool, geo: &Geometry, a: &ConvArgs<'_>, act: ConvAct, y: &mut [f32]) {
    let c = geo.x_shape[1];
    let (p, in_sp, ksize, step) = (geo.p, geo.in_sp, geo.ksize, geo.step);
    let rows = geo.x_shape[0] * c;
    let y_ptr = SharedMut::new(y.as_mut_ptr());
    pool.parallel_ranges(rows, |range| {
        for row in range {
            // SAFETY: each row's `p` outputs are written by one call only; `y` holds
            // `rows · p` values and lives until `parallel_ranges` returns.
            let yr = unsafe { std::slice::from_raw_parts_mut(y_ptr.get().add(row * p), p) };
            let ch = row % c;
            yr.fill(a.bias.map_or(0.0, |b| b[ch]));
            let xr = &a.x[row * in_sp..(row + 1) * in_sp];
            for (k, rs) in geo.runs.iter().enumerate().take(ksize) {
                let wk = a.w[ch * ksize + k];
                for r in rs {
                    let d = &mut yr[r.out..r.out + r.len];
                    if step == 1 {
                        for (o, &v) in d.iter_mut().zip(&xr[r.src..r.src + r.len]) {
                            *o += wk * v;
                        }
                    } else {
                        for (j, o) in d.iter_mut().enumerate() {
                            *o += wk * xr[r.src + j * step];
                        }
                    }
                }
            }
            act.apply_slice(yr);
            if let Some(res) = a.residual {
                for (o, &v) in yr.iter_mut().zip(&res[row * p..(row + 1) * p]) {
                    *o += v;
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::{Attr, OpKind, Tensor};
    use kiln_reference::{compare, Tolerance};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// f32 sums of up to a few thousand products (bias inside the sum, f32 activations)
    /// against the interpreter's f64-accumulated conv.
    const TOL: Tolerance = Tolerance::ScaledByMax {
        rel: 2e-5,
        abs: 1e-6,
    };

    fn rand_t(rng: &mut StdRng, shape: Vec<usize>) -> Tensor {
        let n: usize = shape.iter().product();
        Tensor::from_vec(
            shape,
            (0..n)
                .map(|_| rng.gen_range(-1.0f32..1.0))
                .collect::<Vec<f32>>(),
        )
    }

    /// One random conv: (attrs, x, w, bias?, residual wanted, activation name).
    fn case(
        rng: &mut StdRng,
        i: usize,
    ) -> (Attrs, Tensor, Tensor, Option<Tensor>, bool, &'static str) {
        let nsp = [1, 2, 2, 2, 3][rng.gen_range(0..5)];
        let kind = i % 4; // 0 dense, 1 grouped, 2 depthwise, 3 pointwise
        let group = match kind {
            1 => rng.gen_range(2..4),
            2 => rng.gen_range(1..6),
            _ => 1,
        };
        let cg = if kind == 2 { 1 } else { rng.gen_range(1..6) };
        let mg = if kind == 2 {
            [1, 1, 2][rng.gen_range(0..3)]
        } else {
            rng.gen_range(1..20)
        };
        let k: Vec<usize> = (0..nsp)
            .map(|_| {
                if kind == 3 {
                    1
                } else {
                    [1, 2, 3, 5, 7][rng.gen_range(0..5)]
                }
            })
            .collect();
        let max_side = if nsp == 3 { 7 } else { 19 };
        let spatial: Vec<usize> = (0..nsp).map(|_| rng.gen_range(1..max_side)).collect();
        let mut attrs = Attrs::new().with("group", Attr::Int(group as i64));
        if kind != 3 {
            match rng.gen_range(0..4) {
                0 => {
                    attrs = attrs.with(
                        "auto_pad",
                        Attr::Str(
                            ["SAME_UPPER", "SAME_LOWER", "VALID"][rng.gen_range(0..3)].into(),
                        ),
                    )
                }
                _ => {
                    let pads: Vec<i64> = (0..2 * nsp).map(|_| rng.gen_range(0..4)).collect();
                    attrs = attrs.with("pads", Attr::Ints(pads));
                    let dil: Vec<i64> = (0..nsp).map(|_| rng.gen_range(1..3)).collect();
                    attrs = attrs.with("dilations", Attr::Ints(dil));
                }
            }
            let strides: Vec<i64> = (0..nsp).map(|_| rng.gen_range(1..3)).collect();
            attrs = attrs.with("strides", Attr::Ints(strides));
        }
        let n = rng.gen_range(1..4);
        let mut xs = vec![n, cg * group];
        xs.extend(&spatial);
        let mut ws = vec![mg * group, cg];
        ws.extend(&k);
        let x = rand_t(rng, xs);
        let w = rand_t(rng, ws);
        let b = rng.gen_bool(0.7).then(|| rand_t(rng, vec![mg * group]));
        let act = ["none", "relu", "silu", "sigmoid", "hardswish", "clip"][rng.gen_range(0..6)];
        (attrs, x, w, b, rng.gen_bool(0.5), act)
    }

    #[test]
    fn prepared_convs_match_the_interpreter_on_random_geometries() {
        let pools = [Pool::single(), Pool::new(3).unwrap()];
        let mut checked = 0;
        let mut direct_runs = 0;
        for seed in [1u64, 2, 3, 5, 8, 13] {
            let mut rng = StdRng::seed_from_u64(seed);
            for i in 0..60 {
                let (attrs, x, w, b, with_res, act) = case(&mut rng, i);
                let Ok(geo) = Geometry::new(&attrs, x.shape(), w.shape()) else {
                    // The interpreter must reject it too.
                    let ins = [Some(&x), Some(&w), b.as_ref()];
                    assert!(kiln_ir::ops::eval(OpKind::Conv, &attrs, &ins).is_err());
                    continue;
                };
                let res = with_res.then(|| rand_t(&mut rng, geo.out_shape().to_vec()));
                let mut fattrs = attrs.clone().with("activation", Attr::Str(act.into()));
                if act == "clip" {
                    fattrs = fattrs.with("clip_min", Attr::Float(-0.25));
                    if i % 2 == 0 {
                        fattrs = fattrs.with("clip_max", Attr::Float(0.5));
                    }
                }
                let ins = [Some(&x), Some(&w), b.as_ref(), res.as_ref()];
                let want = kiln_ir::ops::eval(OpKind::FusedConv, &fattrs, &ins).unwrap();
                let a = ConvAct::from_attrs(&fattrs).unwrap();
                for (pi, pool) in pools.iter().enumerate() {
                    // Weight at run time; constant (direct kernel where it applies); constant
                    // on the GEMM.
                    for (constant, direct) in [(false, false), (true, true), (true, false)] {
                        let pc = PreparedConv::new(
                            &attrs,
                            a,
                            constant.then(|| (w.as_slice::<f32>().unwrap(), w.shape())),
                            b.as_ref().map(|b| b.as_slice::<f32>().unwrap()),
                        )
                        .with_direct(direct);
                        let is_direct = pc.uses_direct(&geo, b.is_some());
                        assert!(direct || !is_direct);
                        direct_runs += usize::from(is_direct);
                        let args = ConvArgs {
                            x: x.as_slice().unwrap(),
                            w: w.as_slice().unwrap(),
                            bias: b.as_ref().map(|b| b.as_slice().unwrap()),
                            residual: res.as_ref().map(|r| r.as_slice().unwrap()),
                        };
                        // NaN-filled: every output must be written.
                        let mut y = vec![f32::NAN; geo.out_shape().iter().product()];
                        pc.run(pool, &geo, &args, &mut y).unwrap();
                        let got = Tensor::from_vec(geo.out_shape().to_vec(), y);
                        let r = compare(&got, &want[0], TOL);
                        assert!(
                            r.ok,
                            "seed {seed} case {i} pool {pi} constant {constant} direct {is_direct}: x {:?} w {:?} {attrs:?} act {act} res {with_res}: {r:?}",
                            x.shape(),
                            w.shape()
                        );
                        checked += 1;
                    }
                }
            }
        }
        assert!(checked > 1500, "{checked}");
        if DirectIsa::detect().is_some() {
            assert!(direct_runs > 200, "{direct_runs}");
        }
    }

    /// Wide convs (channel blocks with tails, several vectors of positions, bands over
    /// threads) on the direct kernel against the GEMM path and the interpreter.
    #[test]
    fn direct_convs_match_on_wide_geometries() {
        let Some(_) = DirectIsa::detect() else {
            return;
        };
        let pools = [Pool::single(), Pool::new(2).unwrap()];
        let mut rng = StdRng::seed_from_u64(77);
        // (C, OC, group, spatial, kernel, stride, dilation, pad)
        type Case = (
            usize,
            usize,
            usize,
            &'static [usize],
            usize,
            usize,
            usize,
            usize,
        );
        let cases: [Case; 11] = [
            (16, 32, 1, &[23, 37], 3, 1, 1, 1),
            (13, 19, 1, &[40, 9], 3, 2, 1, 1),
            (8, 40, 2, &[17, 33], 5, 1, 2, 4),
            (3, 16, 1, &[31, 30], 3, 2, 1, 0),
            (32, 64, 1, &[200], 7, 1, 1, 3),
            (24, 12, 1, &[101], 5, 3, 2, 2),
            (64, 128, 1, &[6, 5], 3, 1, 1, 1),
            (96, 96, 96, &[57, 56], 3, 1, 1, 1),
            (32, 32, 32, &[33, 31], 5, 2, 1, 2),
            (16, 16, 16, &[300], 7, 1, 2, 6),
            (40, 16, 1, &[70, 45], 7, 1, 4, 12),
        ];
        for (ci, &(c, oc, group, sp, k, s, d, pad)) in cases.iter().enumerate() {
            let nsp = sp.len();
            let attrs = Attrs::new()
                .with("group", Attr::Int(group as i64))
                .with("strides", Attr::Ints(vec![s as i64; nsp]))
                .with("dilations", Attr::Ints(vec![d as i64; nsp]))
                .with("pads", Attr::Ints(vec![pad as i64; 2 * nsp]));
            let mut xs = vec![2, c];
            xs.extend(sp);
            let mut ws = vec![oc, c / group];
            ws.extend(vec![k; nsp]);
            let x = rand_t(&mut rng, xs);
            let w = rand_t(&mut rng, ws);
            let b = rand_t(&mut rng, vec![oc]);
            let geo = Geometry::new(&attrs, x.shape(), w.shape()).unwrap();
            let res = rand_t(&mut rng, geo.out_shape().to_vec());
            let fattrs = attrs.clone().with("activation", Attr::Str("silu".into()));
            let want = kiln_ir::ops::eval(
                OpKind::FusedConv,
                &fattrs,
                &[Some(&x), Some(&w), Some(&b), Some(&res)],
            )
            .unwrap();
            let pc = PreparedConv::new(
                &attrs,
                ConvAct::from_attrs(&fattrs).unwrap(),
                Some((w.as_slice().unwrap(), w.shape())),
                Some(b.as_slice().unwrap()),
            );
            assert!(pc.uses_direct(&geo, true), "case {ci}");
            let isas: Vec<DirectIsa> = [DirectIsa::Avx512, DirectIsa::Avx2]
                .into_iter()
                .filter(|i| i.available())
                .collect();
            for (pool, isa) in pools.iter().flat_map(|p| isas.iter().map(move |i| (p, *i))) {
                let pc = PreparedConv::new(
                    &attrs,
                    ConvAct::from_attrs(&fattrs).unwrap(),
                    Some((w.as_slice().unwrap(), w.shape())),
                    Some(b.as_slice().unwrap()),
                )
                .with_direct_isa(isa);
                let args = ConvArgs {
                    x: x.as_slice().unwrap(),
                    w: w.as_slice().unwrap(),
                    bias: Some(b.as_slice().unwrap()),
                    residual: Some(res.as_slice().unwrap()),
                };
                let mut y = vec![f32::NAN; geo.out_shape().iter().product()];
                pc.run(pool, &geo, &args, &mut y).unwrap();
                let got = Tensor::from_vec(geo.out_shape().to_vec(), y);
                let r = compare(&got, &want[0], TOL);
                assert!(r.ok, "case {ci} threads {} {isa:?}: {r:?}", pool.threads());
            }
        }
    }

    #[test]
    fn a_nan_input_is_not_hidden_by_a_depthwise_conv() {
        let attrs = Attrs::new()
            .with("pads", Attr::Ints(vec![1, 1, 1, 1]))
            .with("group", Attr::Int(2));
        let mut xv = vec![0.5f32; 2 * 5 * 40];
        xv[310] = f32::NAN; // channel 1, row 2: 3 × 3 outputs
        let x = Tensor::from_vec(vec![1, 2, 5, 40], xv);
        let w = Tensor::from_vec(vec![2, 1, 3, 3], vec![0.1f32; 18]);
        let geo = Geometry::new(&attrs, x.shape(), w.shape()).unwrap();
        let fattrs = attrs.clone().with("activation", Attr::Str("relu".into()));
        let want = kiln_ir::ops::eval(OpKind::FusedConv, &fattrs, &[Some(&x), Some(&w)]).unwrap();
        for direct in [false, true] {
            let pc = PreparedConv::new(&attrs, ConvAct::Epilogue(Activation::Relu), None, None)
                .with_direct(direct);
            assert_eq!(
                pc.uses_direct(&geo, false),
                direct && DirectIsa::detect().is_some()
            );
            let args = ConvArgs {
                x: x.as_slice().unwrap(),
                w: w.as_slice().unwrap(),
                bias: None,
                residual: None,
            };
            let mut y = vec![0.0; 2 * 5 * 40];
            pc.run(&Pool::single(), &geo, &args, &mut y).unwrap();
            assert_eq!(
                y.iter().filter(|v| v.is_nan()).count(),
                9,
                "direct {direct}"
            );
            let r = compare(&Tensor::from_vec(vec![1, 2, 5, 40], y), &want[0], TOL);
            assert!(r.ok, "direct {direct}: {r:?}");
        }
    }

    #[test]
    fn a_nan_input_is_not_hidden() {
        let attrs = Attrs::new().with("pads", Attr::Ints(vec![1, 1, 1, 1]));
        let mut xv = vec![0.5f32; 2 * 5 * 5];
        xv[7] = f32::NAN;
        let x = Tensor::from_vec(vec![1, 2, 5, 5], xv);
        let w = Tensor::from_vec(vec![3, 2, 3, 3], vec![0.1f32; 54]);
        let geo = Geometry::new(&attrs, x.shape(), w.shape()).unwrap();
        let want = kiln_ir::ops::eval(
            OpKind::FusedConv,
            &attrs.clone().with("activation", Attr::Str("relu".into())),
            &[Some(&x), Some(&w)],
        )
        .unwrap();
        // Weight at run time (GEMM), constant (the direct kernel where this CPU has one).
        for constant in [false, true] {
            let pc = PreparedConv::new(
                &attrs,
                ConvAct::Epilogue(Activation::Relu),
                constant.then(|| (w.as_slice::<f32>().unwrap(), w.shape())),
                None,
            );
            if constant && DirectIsa::detect().is_some() {
                assert!(pc.uses_direct(&geo, false));
            }
            let args = ConvArgs {
                x: x.as_slice().unwrap(),
                w: w.as_slice().unwrap(),
                bias: None,
                residual: None,
            };
            let mut y = vec![0.0; 3 * 25];
            pc.run(&Pool::single(), &geo, &args, &mut y).unwrap();
            assert!(y.iter().any(|v| v.is_nan()), "constant {constant}");
            let r = compare(&Tensor::from_vec(vec![1, 3, 5, 5], y), &want[0], TOL);
            assert!(r.ok, "constant {constant}: {r:?}");
        }
    }
}
