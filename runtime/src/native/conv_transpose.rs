//! Prepared f32 `conv_transpose` of any geometry (1-D to 3-D and up, strides, dilations,
//! pads, output_padding, output_shape, auto_pad, groups) on the GEMM, NCHW in and out, bias
//! fused. Per image and group, `cols[(OC_g·k), P_in] = W_gᵀ · X_g` (the transposed weight,
//! row-major `[OC_g·k, C_g]`, is laid out once when the weight is a constant; `X_g` is packed
//! once per call as the GEMM's right-hand side, in chunks of input pixels) and col2im
//! scatter-adds each row of `cols` into its output channel, which starts as the bias. Jobs
//! are (image, group, block of output channels): each walks the input chunks, computing
//! its block's rows of `cols` for the chunk into a per-thread scratch that stays in cache
//! (single-threaded GEMM) and scattering them into its own output channels, so the pool's
//! threads never write the same output. Where each input lands for each kernel offset is
//! precomputed per input shape as runs along the last spatial axis ([`Geometry`]).

use super::gemm::{gemm_in, Epilogue, GemmConfig, GemmError, Isa, MatMut, MatRef, PackedB, Rhs};
use crate::pool::{Pool, SharedMut};
use kiln_ir::ops::linalg::conv_transpose_geometry;
use kiln_ir::Attrs;
use std::sync::{Arc, Mutex};

/// Values of one chunk's `cols` block (`channels·k × pixels`) at most: 256 KiB, inside L2.
const CHUNK_VALUES: usize = 64 * 1024;
/// Chunk widths are multiples of this (the AVX-512 kernel's panel width) where the input
/// allows.
const CHUNK_ALIGN: usize = 32;
/// Jobs per thread at least, where the channels allow, so the dynamic job queue balances.
const JOBS_PER_THREAD: usize = 4;

/// The weight `[C, OC_g, k...]` laid out per group as a row-major `[OC_g·k, C_g]` block
/// (`W_gᵀ`: row `o·k + ki` holds the weights from every input channel of the group to output
/// channel `o` at kernel offset `ki`).
#[derive(Debug)]
pub struct TransposedWeights {
    data: Vec<f32>,
    /// `[C, OC_g, k...]`, the weight's shape.
    shape: Vec<usize>,
    group: usize,
}

impl TransposedWeights {
    /// Lays out weight `w` (shape `shape`) for `group` groups; `None` when they do not fit.
    pub fn new(w: &[f32], shape: &[usize], group: usize) -> Option<Self> {
        let (&c, rest) = shape.split_first()?;
        let rows: usize = rest.iter().product(); // OC_g · k
        if group == 0 || c % group != 0 || w.len() != c.checked_mul(rows)? {
            return None;
        }
        let cg = c / group;
        let mut data = vec![0.0f32; w.len()];
        for g in 0..group {
            let src = &w[g * cg * rows..][..cg * rows];
            let dst = &mut data[g * cg * rows..][..cg * rows];
            for ci in 0..cg {
                for r in 0..rows {
                    dst[r * cg + ci] = src[ci * rows + r];
                }
            }
        }
        Some(TransposedWeights {
            data,
            shape: shape.to_vec(),
            group,
        })
    }
}

/// A run of `len` consecutive inputs from `src` (a flat input position) landing on outputs
/// `out, out + step, ...` (`step`: the stride of the last spatial axis).
#[derive(Clone, Copy, Debug)]
struct Run {
    src: usize,
    out: usize,
    len: usize,
}

/// A conv_transpose's geometry for one input shape: sizes and, per kernel offset, the runs
/// its inputs land on.
#[derive(Debug)]
pub struct Geometry {
    x_shape: Vec<usize>,
    w_shape: Vec<usize>,
    out_shape: Vec<usize>,
    group: usize,
    /// Output pixels per image.
    p: usize,
    /// Input pixels per image.
    in_sp: usize,
    ksize: usize,
    /// Output step between consecutive inputs along the last axis.
    step: usize,
    /// Per kernel offset (row-major over the kernel), its runs in input order.
    runs: Vec<Vec<Run>>,
}

/// Inputs `i` in `0..n` with `0 <= i·s + base < o`, as a range.
fn landing(base: i64, s: usize, n: usize, o: usize) -> std::ops::Range<usize> {
    let s = s as i64;
    let lo = if base >= 0 { 0 } else { (-base + s - 1) / s };
    let top = o as i64 - 1 - base; // i·s <= top
    let hi = if top < 0 {
        0
    } else {
        (top / s + 1).min(n as i64)
    };
    let lo = (lo as usize).min(n);
    lo..(hi as usize).max(lo)
}

impl Geometry {
    /// The geometry of a conv_transpose with `attrs` on input shape `x` and weight shape
    /// `w`; `Err` (the reference's message) when the interpreter would reject it.
    pub fn new(attrs: &Attrs, x: &[usize], w: &[usize]) -> Result<Self, String> {
        let geo = conv_transpose_geometry(attrs, x, w)?;
        let spatial = &x[2..];
        let nsp = spatial.len();
        let in_sp: usize = spatial.iter().product();
        let p: usize = geo.out.iter().product();
        let ksize: usize = geo.kernel.iter().product();
        let mut out_shape = vec![x[0], w[1] * geo.group];
        out_shape.extend_from_slice(&geo.out);
        let out_st = kiln_ir::tensor::strides(&geo.out);
        let last = nsp - 1;
        let (s, d) = (geo.strides[last], geo.dilations[last]);
        let (wl, ol) = (spatial[last], geo.out[last]);
        let outer_in: usize = spatial[..last].iter().product();
        let mut runs = Vec::with_capacity(ksize);
        let mut k = vec![0usize; nsp];
        for _ in 0..ksize {
            let mut rs = vec![];
            let base = (k[last] * d) as i64 - geo.begins[last];
            let range = landing(base, s, wl, ol);
            let mut ii = vec![0usize; last];
            for row in 0..outer_in {
                let mut dst = Some(0usize);
                for a in 0..last {
                    let pos =
                        (ii[a] * geo.strides[a] + k[a] * geo.dilations[a]) as i64 - geo.begins[a];
                    dst = match dst {
                        Some(o) if (0..geo.out[a] as i64).contains(&pos) => {
                            Some(o + pos as usize * out_st[a])
                        }
                        _ => None,
                    };
                }
                if let (Some(o), false) = (dst, range.is_empty()) {
                    rs.push(Run {
                        src: row * wl + range.start,
                        out: o + (base + (range.start * s) as i64) as usize,
                        len: range.len(),
                    });
                }
                for a in (0..last).rev() {
                    ii[a] += 1;
                    if ii[a] < spatial[a] {
                        break;
                    }
                    ii[a] = 0;
                }
            }
            runs.push(rs);
            for a in (0..nsp).rev() {
                k[a] += 1;
                if k[a] < geo.kernel[a] {
                    break;
                }
                k[a] = 0;
            }
        }
        Ok(Geometry {
            x_shape: x.to_vec(),
            w_shape: w.to_vec(),
            out_shape,
            group: geo.group,
            p,
            in_sp,
            ksize,
            step: s,
            runs,
        })
    }

    /// The output shape `[N, OC, out...]`.
    pub fn out_shape(&self) -> &[usize] {
        &self.out_shape
    }
}

/// A conv_transpose node prepared once: attributes, the weight laid out when it is a
/// constant, and the geometry of the last input shape seen.
#[derive(Debug)]
pub struct PreparedConvTranspose {
    attrs: Attrs,
    weights: Option<TransposedWeights>,
    geometry: super::LastShapes<Geometry>,
}

thread_local! {
    /// Each thread's `cols` block, grown on demand and kept for later calls.
    static COLS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl PreparedConvTranspose {
    /// Prepares a conv_transpose with `attrs`; `w` (value and shape) is laid out now when it
    /// is a constant.
    pub fn new(attrs: &Attrs, w: Option<(&[f32], &[usize])>) -> Self {
        let group = attrs
            .int_or("group", 1)
            .ok()
            .and_then(|g| usize::try_from(g).ok())
            .unwrap_or(0);
        PreparedConvTranspose {
            attrs: attrs.clone(),
            weights: w.and_then(|(w, shape)| TransposedWeights::new(w, shape, group)),
            geometry: Default::default(),
        }
    }

    /// Whether the weight was laid out at prepare time.
    pub fn has_weights(&self) -> bool {
        self.weights.is_some()
    }

    /// The geometry for these shapes (cached for the last shapes seen).
    pub fn geometry(&self, x: &[usize], w: &[usize]) -> Result<Arc<Geometry>, String> {
        self.geometry.get(x, w, || Geometry::new(&self.attrs, x, w))
    }

    /// Runs the conv_transpose of geometry `geo` on `x` (weight `w`, ignored where a
    /// prepared layout of it exists; `bias` `[OC]`) into `y` (`geo.out_shape()` values, every
    /// one written).
    pub fn run(
        &self,
        pool: &Pool,
        geo: &Geometry,
        x: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        y: &mut [f32],
    ) -> Result<(), String> {
        self.run_chunked(pool, geo, (x, w, bias), y, CHUNK_VALUES)
    }

    /// [`Self::run`] with chunks of `cols` of at most `chunk_values` values (where the
    /// chunk width allows).
    fn run_chunked(
        &self,
        pool: &Pool,
        geo: &Geometry,
        (x, w, bias): (&[f32], &[f32], Option<&[f32]>),
        y: &mut [f32],
        chunk_values: usize,
    ) -> Result<(), String> {
        let total: usize = geo.out_shape.iter().product();
        let x_len: usize = geo.x_shape.iter().product();
        let w_len: usize = geo.w_shape.iter().product();
        let m = geo.out_shape[1];
        if y.len() != total || x.len() != x_len || bias.is_some_and(|b| b.len() != m) {
            return Err(format!(
                "conv_transpose: {} input / {} output values for shapes {:?} -> {:?}",
                x.len(),
                y.len(),
                geo.x_shape,
                geo.out_shape
            ));
        }
        if total == 0 {
            return Ok(());
        }
        let here;
        let weights = match &self.weights {
            Some(tw) if tw.shape == geo.w_shape && tw.group == geo.group => tw,
            _ => {
                if w.len() != w_len {
                    return Err(format!(
                        "conv_transpose: {} weight values for {:?}",
                        w.len(),
                        geo.w_shape
                    ));
                }
                here = TransposedWeights::new(w, &geo.w_shape, geo.group).ok_or_else(|| {
                    format!("conv_transpose: weight {:?} does not fit", geo.w_shape)
                })?;
                &here
            }
        };
        let (n, c) = (geo.x_shape[0], geo.x_shape[1]);
        let group = geo.group;
        let (cg, mg) = (c / group, geo.w_shape[1]);
        let (k, p, in_sp) = (geo.ksize, geo.p, geo.in_sp);
        if in_sp == 0 || k == 0 || cg == 0 {
            // Nothing lands: the output is the bias.
            fill_bias(y, bias, m, p);
            return Ok(());
        }
        // Output channels per job: all of a group's where the images and groups give the
        // pool enough jobs, else fewer.
        let threads = pool.threads();
        let per_ng = if threads > 1 {
            (threads * JOBS_PER_THREAD).div_ceil(n * group).min(mg)
        } else {
            1
        };
        let blk = mg.div_ceil(per_ng);
        let blocks = mg.div_ceil(blk);
        // Input pixels per chunk: a chunk's `cols` block (`blk·k × cw`) stays in cache.
        let cw = ((chunk_values / (blk * k)) / CHUNK_ALIGN * CHUNK_ALIGN)
            .max(CHUNK_ALIGN)
            .min(in_sp);
        let chunks = in_sp.div_ceil(cw);
        // X_g's columns of each chunk (`[C_g, cw]`) packed once per call, on the pool, and
        // shared by the jobs of that image and group.
        let slots: Vec<Mutex<Option<Result<PackedB, GemmError>>>> =
            (0..n * group * chunks).map(|_| Mutex::new(None)).collect();
        pool.parallel_for(slots.len(), |j| {
            let (ng, ch) = (j / chunks, j % chunks);
            let (lo, pc) = (ch * cw, cw.min(in_sp - ch * cw));
            let xg = &x[ng * cg * in_sp..][..cg * in_sp];
            let packed = MatRef::new(&xg[lo..], cg, pc, in_sp, 1).and_then(PackedB::pack);
            *slots[j].lock().unwrap_or_else(|p| p.into_inner()) = Some(packed);
        });
        let packs = slots
            .into_iter()
            .map(|m| {
                m.into_inner()
                    .unwrap_or_else(|p| p.into_inner())
                    .unwrap_or(Err(GemmError::ZeroThreads))
            })
            .collect::<Result<Vec<_>, GemmError>>()
            .map_err(|e| format!("conv_transpose: {e}"))?;
        let jobs = n * group * blocks;
        let y_ptr = SharedMut::new(y.as_mut_ptr());
        let y_len = y.len();
        let failed = Mutex::new(None);
        let cfg = GemmConfig {
            threads: 1,
            isa: Isa::Auto,
        };
        let single = Pool::single();
        let rows_g = mg * k;
        pool.parallel_for(jobs, |job| {
            let (ng, b) = (job / blocks, job % blocks);
            let g = ng % group;
            let (lo, hi) = (b * blk, ((b + 1) * blk).min(mg));
            let rows = (hi - lo) * k;
            let chan = |o: usize| {
                let off = ((ng / group) * m + g * mg + o) * p;
                debug_assert!(off + p <= y_len);
                // SAFETY: output channel `g·mg + o` of this image (`p` values at `off`, inside
                // `y`) is written by this job only (its block of channels); `y` lives until
                // `parallel_for` returns.
                unsafe { std::slice::from_raw_parts_mut(y_ptr.get().add(off), p) }
            };
            for o in lo..hi {
                chan(o).fill(bias.map_or(0.0, |b| b[g * mg + o]));
            }
            let r: Result<(), GemmError> = COLS.with(|cell| {
                let mut cols = cell.borrow_mut();
                if cols.len() < rows * cw {
                    cols.resize(rows * cw, 0.0);
                }
                let wg = &weights.data[g * rows_g * cg..][..rows_g * cg];
                let am = MatRef::row_major(&wg[lo * k * cg..], rows, cg)?;
                for ch in 0..chunks {
                    let (x0, pc) = (ch * cw, cw.min(in_sp - ch * cw));
                    let cols = &mut cols[..rows * pc];
                    let cm = MatMut::row_major(cols, rows, pc)?;
                    let rhs = Rhs::Packed(&packs[ng * chunks + ch]);
                    gemm_in(&single, am, rhs, cm, &Epilogue::default(), &cfg)?;
                    for (oi, o) in (lo..hi).enumerate() {
                        scatter(geo, &cols[oi * k * pc..][..k * pc], x0, chan(o));
                    }
                }
                Ok(())
            });
            if let Err(e) = r {
                *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
            }
        });
        match failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(format!("conv_transpose: {e}")),
            None => Ok(()),
        }
    }
}

/// Every output channel set to its bias (zero without one).
fn fill_bias(y: &mut [f32], bias: Option<&[f32]>, m: usize, p: usize) {
    if p == 0 {
        return;
    }
    for (i, row) in y.chunks_exact_mut(p).enumerate() {
        row.fill(bias.map_or(0.0, |b| b[i % m]));
    }
}

/// col2im for one output channel and one chunk of input pixels: `crows` holds the chunk's
/// `k` rows of `cols` (one per kernel offset, inputs `x0..x0 + crows.len() / k`), each added
/// where its input lands.
fn scatter(geo: &Geometry, crows: &[f32], x0: usize, yr: &mut [f32]) {
    let pc = crows.len() / geo.ksize.max(1);
    let (x1, step) = (x0 + pc, geo.step);
    for (ki, rs) in geo.runs.iter().enumerate() {
        let row = &crows[ki * pc..][..pc];
        // The first run that ends after `x0`.
        let first = rs.partition_point(|r| r.src + r.len <= x0);
        for r in &rs[first..] {
            if r.src >= x1 {
                break;
            }
            let (a, e) = (r.src.max(x0), (r.src + r.len).min(x1));
            let src = &row[a - x0..e - x0];
            let out = r.out + (a - r.src) * step;
            if step == 1 {
                let dst = &mut yr[out..out + src.len()];
                dst.iter_mut().zip(src).for_each(|(o, v)| *o += v);
            } else {
                // One bounds check for the run, then a plain strided loop.
                let dst = &mut yr[out..out + (src.len() - 1) * step + 1];
                for (o, v) in dst.iter_mut().step_by(step).zip(src) {
                    *o += v;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::{Attr, OpKind, Tensor};
    use kiln_reference::{compare, Tolerance};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// f32 sums of up to a few hundred products against the interpreter's f64-accumulated
    /// conv_transpose (the scatter adds a few products per output in another order).
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

    /// One random conv_transpose: (attrs, x, w, bias?).
    fn case(rng: &mut StdRng, i: usize) -> (Attrs, Tensor, Tensor, Option<Tensor>) {
        let nsp = [1, 1, 2, 2, 2, 3][rng.gen_range(0..6)];
        let group = if i % 3 == 1 { rng.gen_range(2..4) } else { 1 };
        let cg = rng.gen_range(1..6);
        let mg = rng.gen_range(1..12);
        let k: Vec<usize> = (0..nsp)
            .map(|_| [1, 2, 3, 4, 5][rng.gen_range(0..5)])
            .collect();
        let max_side = if nsp == 3 { 5 } else { 13 };
        let spatial: Vec<usize> = (0..nsp).map(|_| rng.gen_range(1..max_side)).collect();
        let strides: Vec<i64> = (0..nsp).map(|_| rng.gen_range(1..4)).collect();
        let mut attrs = Attrs::new()
            .with("group", Attr::Int(group as i64))
            .with("strides", Attr::Ints(strides.clone()));
        if rng.gen_bool(0.5) {
            let dil: Vec<i64> = (0..nsp).map(|_| rng.gen_range(1..3)).collect();
            attrs = attrs.with("dilations", Attr::Ints(dil));
        }
        match rng.gen_range(0..5) {
            0 => {
                let ap = ["SAME_UPPER", "SAME_LOWER", "VALID"][rng.gen_range(0..3)];
                attrs = attrs.with("auto_pad", Attr::Str(ap.into()));
            }
            1 => {
                // output_shape: around the full size, sometimes above it.
                let os: Vec<i64> = (0..nsp)
                    .map(|a| {
                        let full = strides[a] * (spatial[a] as i64 - 1) + k[a] as i64;
                        (full + rng.gen_range(-2..3)).max(1)
                    })
                    .collect();
                attrs = attrs.with("output_shape", Attr::Ints(os));
                if rng.gen_bool(0.5) {
                    attrs = attrs.with("auto_pad", Attr::Str("SAME_UPPER".into()));
                }
            }
            _ => {
                let pads: Vec<i64> = (0..2 * nsp).map(|_| rng.gen_range(0..3)).collect();
                attrs = attrs.with("pads", Attr::Ints(pads));
                let op: Vec<i64> = strides.iter().map(|&s| rng.gen_range(0..s)).collect();
                attrs = attrs.with("output_padding", Attr::Ints(op));
            }
        }
        let n = rng.gen_range(1..3);
        let mut xs = vec![n, cg * group];
        xs.extend(&spatial);
        let mut ws = vec![cg * group, mg];
        ws.extend(&k);
        let x = rand_t(rng, xs);
        let w = rand_t(rng, ws);
        let b = rng.gen_bool(0.7).then(|| rand_t(rng, vec![mg * group]));
        (attrs, x, w, b)
    }

    #[test]
    fn conv_transposes_match_the_interpreter_on_random_geometries() {
        let pools = [Pool::single(), Pool::new(3).unwrap()];
        let mut checked = 0;
        for seed in [1u64, 2, 3, 5, 8, 13] {
            let mut rng = StdRng::seed_from_u64(seed);
            for i in 0..50 {
                let (attrs, x, w, b) = case(&mut rng, i);
                let ins = [Some(&x), Some(&w), b.as_ref()];
                let want = kiln_ir::ops::eval(OpKind::ConvTranspose, &attrs, &ins);
                let geo = match (Geometry::new(&attrs, x.shape(), w.shape()), want) {
                    (Ok(geo), Ok(want)) => (geo, want),
                    (Err(_), Err(_)) => continue,
                    (g, w) => panic!(
                        "seed {seed} case {i}: native {:?} / interpreter {:?} disagree on {attrs:?}",
                        g.map(|g| g.out_shape),
                        w.map(|w| w[0].shape().to_vec())
                    ),
                };
                let (geo, want) = geo;
                assert_eq!(geo.out_shape(), want[0].shape());
                for (pi, pool) in pools.iter().enumerate() {
                    for constant in [false, true] {
                        let pc = PreparedConvTranspose::new(
                            &attrs,
                            constant.then(|| (w.as_slice::<f32>().unwrap(), w.shape())),
                        );
                        assert_eq!(pc.has_weights(), constant);
                        // NaN-filled: every output must be written. Small chunks on the
                        // constant weight, so the chunked scatter is exercised.
                        let mut y = vec![f32::NAN; geo.out_shape().iter().product()];
                        let ops = (
                            x.as_slice().unwrap(),
                            w.as_slice().unwrap(),
                            b.as_ref().map(|b| b.as_slice().unwrap()),
                        );
                        let chunk = if constant { 1 } else { CHUNK_VALUES };
                        pc.run_chunked(pool, &geo, ops, &mut y, chunk).unwrap();
                        let got = Tensor::from_vec(geo.out_shape().to_vec(), y);
                        let r = compare(&got, &want[0], TOL);
                        assert!(
                            r.ok,
                            "seed {seed} case {i} pool {pi} constant {constant}: x {:?} w {:?} {attrs:?}: {r:?}",
                            x.shape(),
                            w.shape()
                        );
                        checked += 1;
                    }
                }
            }
        }
        assert!(checked > 800, "{checked}");
    }

    #[test]
    fn a_nan_input_is_not_hidden() {
        let attrs = Attrs::new().with("strides", Attr::Ints(vec![2, 2]));
        let mut xv = vec![0.5f32; 2 * 4 * 4];
        xv[5] = f32::NAN;
        let x = Tensor::from_vec(vec![1, 2, 4, 4], xv);
        let w = Tensor::from_vec(vec![2, 3, 3, 3], vec![0.1f32; 54]);
        let geo = Geometry::new(&attrs, x.shape(), w.shape()).unwrap();
        let pc = PreparedConvTranspose::new(&attrs, None);
        let mut y = vec![0.0; geo.out_shape().iter().product()];
        pc.run(
            &Pool::single(),
            &geo,
            x.as_slice().unwrap(),
            w.as_slice().unwrap(),
            None,
            &mut y,
        )
        .unwrap();
        assert!(y.iter().any(|v| v.is_nan()));
        let want =
            kiln_ir::ops::eval(OpKind::ConvTranspose, &attrs, &[Some(&x), Some(&w)]).unwrap();
        let got = Tensor::from_vec(geo.out_shape().to_vec(), y);
        assert!(compare(&got, &want[0], TOL).ok);
    }
}
