//! The native routine of the recurrent ops (`lstm`, `gru`, `rnn`) in f32, so a recurrent
//! model does not run its time loop on the interpreter's f64 path.
//!
//! Constant `W` and `R` are laid out once with the plan ([`PreparedRecurrent`]: `Wᵀ`
//! packed, `R` in the step's form), else on every run. Per direction: the input projection
//! `X·Wᵀ + Wb + Rb` of every time step is ONE GEMM (`[S·B, I] × [I, G·H]` on the pool,
//! biases in its epilogue); then the directions' time loops run, the two of a
//! bidirectional node on two threads where the pool has them. The per-step loop does the
//! recurrent `h·Rᵀ` for every batch entry at once, on a small register-blocked kernel over
//! `Rᵀ` for batches up to [`SMALL_BATCH`], else as one `[B, H] × [H, G·H]` GEMM on `Rᵀ` packed
//! once per run, followed by the gate math on each active batch entry's row. `gru` without
//! `linear_before_reset` needs `(r ⊙ h)·Rhᵀ`, so it splits `Rᵀ` into the z/r part and the h
//! part and does two GEMMs per step. Attribute parsing and shape checks are the reference's
//! ([`kiln_ir::ops::recurrent`]); anything unusual (other dtypes, shapes the checks refuse)
//! returns `None` and runs on the interpreter, which reports the error.

use crate::native::gemm::{gemm_in, Epilogue, GemmConfig, MatMut, MatRef, PackedB, Rhs};
use crate::pool::{Pool, SharedMut};
use kiln_ir::ops::recurrent::{input, seq_lens, Act, Cell, Dims, Spec};
use kiln_ir::{Attrs, Node, OpKind, Tensor};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

// sigmoid and tanh are `kiln_plan::vmath`'s recipes (the loop kernels' roundings); NaN
// stays NaN.
use kiln_plan::vmath::scalar::{sigmoid, tanh};

/// An activation on a slice in f32: sigmoid and tanh natively (one loop each, so each
/// vectorises), the rest through the reference's f64.
#[inline(always)]
fn act_slice(a: Act, xs: &mut [f32]) {
    // Plain loops, not `for_each`: a closure passed to an iterator method may be left out of
    // line, compiled without the caller's AVX2+FMA (and `floor` then is a libm call).
    match a {
        Act::Sigmoid => {
            for x in xs.iter_mut() {
                *x = sigmoid(*x);
            }
        }
        Act::Tanh => {
            for x in xs.iter_mut() {
                *x = tanh(*x);
            }
        }
        Act::Relu => {
            for x in xs.iter_mut() {
                if !(x.is_nan() || *x > 0.0) {
                    *x = 0.0;
                }
            }
        }
        other => {
            for x in xs.iter_mut() {
                *x = other.apply(f64::from(*x)) as f32;
            }
        }
    }
}

/// `clip`: every value bounded to `[-c, c]` (NaN stays NaN).
#[inline(always)]
fn clip_slice(clip: Option<f32>, xs: &mut [f32]) {
    if let Some(c) = clip {
        for x in xs.iter_mut() {
            *x = x.clamp(-c, c);
        }
    }
}

/// `z = p + q`, elementwise.
#[inline(always)]
fn add_into(z: &mut [f32], p: &[f32], q: &[f32]) {
    for ((zk, &pk), &qk) in z.iter_mut().zip(p).zip(q) {
        *zk = pk + qk;
    }
}

/// `z += a ⊙ b`, elementwise.
#[inline(always)]
fn add_product(z: &mut [f32], a: &[f32], b: &[f32]) {
    for ((zk, &ak), &bk) in z.iter_mut().zip(a).zip(b) {
        *zk += ak * bk;
    }
}

/// Batches up to this size do the per-step `h·Rᵀ` on a small register-blocked kernel over
/// `Rᵀ` (materialised once per run): each `Rᵀ` row is read once per step for up to four
/// batch entries, with no packing and no padding; larger batches use the GEMM on a packed
/// `Rᵀ`, whose micro-kernel computes 6 or 12 rows at a time.
const SMALL_BATCH: usize = 4;

/// Output columns per panel of the small-batch kernel's `Rᵀ` layout: an AVX-512 block
/// computes all 64 (`4 × 4` zmm accumulators for four batch entries: enough independent
/// FMAs to cover their latency), an AVX2 or portable one 16 at a time (`4 × 2` ymm).
const NC: usize = 64;

/// Output columns per block of the AVX2 and portable small-batch kernels.
const NC_NARROW: usize = 16;

/// One direction's recurrent weights (a block of `R`'s rows) in the form the step uses.
#[derive(Debug)]
enum Recur {
    /// `Rᵀ` (`[H, n]`) for the small-batch kernel, in panels of [`NC`] columns (the last
    /// one zero-padded), each `[H, NC]` row-major, so a block streams one contiguous panel.
    Cols(Vec<f32>, usize),
    /// `Rᵀ` packed for the GEMM.
    Packed(PackedB),
}

impl Recur {
    /// The number of output columns (rows of `R`).
    fn cols(&self) -> usize {
        match self {
            Recur::Cols(_, n) => *n,
            Recur::Packed(p) => p.cols(),
        }
    }

    /// `out[b, k] = Σ_j h[b, j]·R[k, j]` for every batch entry; `out` is `[B, cols]`.
    fn apply(&self, h: &[f32], b_n: usize, h_n: usize, out: &mut [f32]) -> Option<()> {
        let n = self.cols();
        match self {
            Recur::Cols(rt, _) => {
                small_batch(h, b_n, h_n, rt, n, out);
                Some(())
            }
            Recur::Packed(p) => gemm_in(
                &Pool::single(),
                MatRef::new(h, b_n, h_n, h_n, 1).ok()?,
                Rhs::Packed(p),
                MatMut::new(&mut out[..b_n * n], b_n, n, n).ok()?,
                &Epilogue::default(),
                &GemmConfig {
                    threads: 1,
                    ..GemmConfig::default()
                },
            )
            .ok(),
        }
    }
}

/// [`Recur::Cols`]'s product, with AVX-512F, or AVX2+FMA, where the CPU has it.
fn small_batch(h: &[f32], b_n: usize, h_n: usize, rt: &[f32], n: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX-512F and FMA (checked just above).
        unsafe { small_batch_avx512(h, b_n, h_n, rt, n, out) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if crate::native::gemm::avx2::available() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        unsafe { small_batch_avx2(h, b_n, h_n, rt, n, out) };
        return;
    }
    small_batch_body(h, b_n, h_n, rt, n, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn small_batch_avx512(
    h: &[f32],
    b_n: usize,
    h_n: usize,
    rt: &[f32],
    n: usize,
    out: &mut [f32],
) {
    let mut b0 = 0;
    while b0 < b_n {
        let bb = (b_n - b0).min(SMALL_BATCH);
        for kc in (0..n).step_by(NC) {
            let panel = &rt[kc * h_n..(kc + NC) * h_n];
            // SAFETY: the CPU has AVX-512F (the caller checked); the panel holds `h_n`
            // rows of NC columns.
            unsafe {
                match bb {
                    1 => block_avx512::<1>(h, h_n, panel, n, kc, out, b0),
                    2 => block_avx512::<2>(h, h_n, panel, n, kc, out, b0),
                    3 => block_avx512::<3>(h, h_n, panel, n, kc, out, b0),
                    _ => block_avx512::<4>(h, h_n, panel, n, kc, out, b0),
                }
            }
        }
        b0 += bb;
    }
}

/// All NC columns of a panel for `BB` batch entries from `b0`, in 16-lane registers. Each
/// output is `Σ_j h[b, j]·Rᵀ[j, k]` accumulated by FMAs in `j` order, as the portable
/// [`block`] does, so both give the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn block_avx512<const BB: usize>(
    h: &[f32],
    h_n: usize,
    panel: &[f32],
    n: usize,
    kc: usize,
    out: &mut [f32],
    b0: usize,
) {
    use std::arch::x86_64::*;
    const Q: usize = NC / 16;
    let hs = &h[b0 * h_n..(b0 + BB) * h_n];
    let mut acc = [[_mm512_setzero_ps(); Q]; BB];
    for (j, row) in panel.chunks_exact(NC).enumerate().take(h_n) {
        // SAFETY: `row` holds NC = 16·Q values.
        let r: [__m512; Q] =
            std::array::from_fn(|q| unsafe { _mm512_loadu_ps(row.as_ptr().add(16 * q)) });
        for (b, a) in acc.iter_mut().enumerate() {
            let x = _mm512_set1_ps(hs[b * h_n + j]);
            for q in 0..Q {
                a[q] = _mm512_fmadd_ps(x, r[q], a[q]);
            }
        }
    }
    let w = NC.min(n - kc);
    let mut lanes = [0f32; NC];
    for (b, a) in acc.iter().enumerate() {
        for (q, v) in a.iter().enumerate() {
            // SAFETY: `lanes` holds NC = 16·Q values.
            unsafe { _mm512_storeu_ps(lanes.as_mut_ptr().add(16 * q), *v) };
        }
        out[(b0 + b) * n + kc..(b0 + b) * n + kc + w].copy_from_slice(&lanes[..w]);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn small_batch_avx2(
    h: &[f32],
    b_n: usize,
    h_n: usize,
    rt: &[f32],
    n: usize,
    out: &mut [f32],
) {
    small_batch_body(h, b_n, h_n, rt, n, out);
}

#[inline(always)]
fn small_batch_body(h: &[f32], b_n: usize, h_n: usize, rt: &[f32], n: usize, out: &mut [f32]) {
    let mut b0 = 0;
    while b0 < b_n {
        let bb = (b_n - b0).min(SMALL_BATCH);
        for kc in (0..n).step_by(NC) {
            let panel = &rt[kc * h_n..(kc + NC) * h_n];
            for c0 in (0..NC).step_by(NC_NARROW).take_while(|c| kc + c < n) {
                match bb {
                    1 => block::<1>(h, h_n, panel, n, kc, c0, out, b0),
                    2 => block::<2>(h, h_n, panel, n, kc, c0, out, b0),
                    3 => block::<3>(h, h_n, panel, n, kc, c0, out, b0),
                    _ => block::<4>(h, h_n, panel, n, kc, c0, out, b0),
                }
            }
        }
        b0 += bb;
    }
}

/// Columns `kc + c0..kc + c0 + NC_NARROW` (those below `n`) of `BB` batch entries from `b0`,
/// from their panel (`[H, NC]`): the accumulators stay in registers over the whole
/// contraction.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn block<const BB: usize>(
    h: &[f32],
    h_n: usize,
    panel: &[f32],
    n: usize,
    kc: usize,
    c0: usize,
    out: &mut [f32],
    b0: usize,
) {
    let mut acc = [[0f32; NC_NARROW]; BB];
    let hs = &h[b0 * h_n..(b0 + BB) * h_n];
    for (j, row) in panel.chunks_exact(NC).enumerate().take(h_n) {
        let Ok(row) = <&[f32; NC_NARROW]>::try_from(&row[c0..c0 + NC_NARROW]) else {
            return;
        };
        for (b, a) in acc.iter_mut().enumerate() {
            let x = hs[b * h_n + j];
            for l in 0..NC_NARROW {
                a[l] = x.mul_add(row[l], a[l]);
            }
        }
    }
    let w = NC_NARROW.min(n - kc - c0);
    for (b, a) in acc.iter().enumerate() {
        let at = (b0 + b) * n + kc + c0;
        out[at..at + w].copy_from_slice(&a[..w]);
    }
}

/// A recurrent node's constant weights in the forms its run uses, prepared once with the
/// plan (like a contraction's packed weights): `Wᵀ` packed for the input projection per
/// direction now, and `R` per direction in the step's form for small batches (`Rᵀ`
/// row-major) or large ones (`Rᵀ` packed), each built at the first run that needs it and
/// kept.
#[derive(Debug)]
pub struct PreparedRecurrent {
    op: OpKind,
    attrs: Attrs,
    /// The shapes of `W` and `R` these were made from.
    w_shape: Vec<usize>,
    r_shape: Vec<usize>,
    /// Per direction, `Wᵀ` (`[I, G·H]`) packed.
    w: Vec<PackedB>,
    /// `R` itself (`[dirs, G·H, H]`), for the forms below.
    r: Vec<f32>,
    /// gru without `linear_before_reset`: `R` split into its z/r and h parts.
    split_gru: bool,
    /// Per direction, `R` for batches up to [`SMALL_BATCH`] and for larger ones.
    small: OnceLock<Vec<RecurPair>>,
    big: OnceLock<Vec<RecurPair>>,
}

/// One direction's `R` in the step's form: the main block and, for split gru, the h part.
type RecurPair = (Recur, Option<Recur>);

impl PreparedRecurrent {
    /// Prepares `op` with `attrs` when its `W` and `R` are constant f32 tensors; `None`
    /// otherwise (the run then lays them out on every call).
    pub fn new(op: OpKind, attrs: &Attrs, w: Option<&Tensor>, r: Option<&Tensor>) -> Option<Self> {
        let spec = Spec::new(op, attrs).ok()?;
        let (w, r) = (w?, r?);
        let (wv, rv) = (w.as_slice::<f32>()?, r.as_slice::<f32>()?);
        let [dirs, gh, i_n] = <[usize; 3]>::try_from(w.shape()).ok()?;
        let [rd, rgh, h_n] = <[usize; 3]>::try_from(r.shape()).ok()?;
        if rd != dirs || rgh != gh || gh != spec.cell.gates() * h_n || dirs != spec.dirs() {
            return None;
        }
        let packed = (0..dirs)
            .map(|d| {
                let wd = &wv[d * gh * i_n..(d + 1) * gh * i_n];
                PackedB::pack(MatRef::new(wd, i_n, gh, 1, i_n).ok()?).ok()
            })
            .collect::<Option<Vec<_>>>()?;
        Some(PreparedRecurrent {
            op,
            attrs: attrs.clone(),
            w_shape: w.shape().to_vec(),
            r_shape: r.shape().to_vec(),
            w: packed,
            r: rv.to_vec(),
            split_gru: spec.cell == Cell::Gru && !spec.linear_before_reset,
            small: OnceLock::new(),
            big: OnceLock::new(),
        })
    }

    /// Whether it was made from weights of these shapes.
    fn fits(&self, w: &[usize], r: &[usize]) -> bool {
        self.w_shape == w && self.r_shape == r
    }

    /// `R` of every direction in the step's form for batch `b_n`.
    fn recur(&self, b_n: usize) -> Option<&[RecurPair]> {
        let (dirs, gh, h_n) = (self.r_shape[0], self.r_shape[1], self.r_shape[2]);
        let build = || {
            (0..dirs)
                .map(|d| {
                    recur_pair(
                        &self.r[d * gh * h_n..(d + 1) * gh * h_n],
                        h_n,
                        b_n,
                        self.split_gru,
                    )
                })
                .collect::<Option<Vec<_>>>()
                .unwrap_or_default()
        };
        let forms = if b_n <= SMALL_BATCH {
            self.small.get_or_init(build)
        } else {
            self.big.get_or_init(build)
        };
        (forms.len() == dirs).then_some(forms.as_slice())
    }
}

/// R's rows `lo..hi` (of one direction's `rd`, `[G·H, H]`) as the step uses them: as
/// stored for small batches, else `Rᵀ` packed (`[H, hi − lo]`).
fn recur_block(rd: &[f32], h_n: usize, b_n: usize, lo: usize, hi: usize) -> Option<Recur> {
    let rows = &rd[lo * h_n..hi * h_n];
    let n = hi - lo;
    if b_n <= SMALL_BATCH {
        // Panels of NC columns (`[H, NC]` each, zero past column n).
        let mut rt = vec![0f32; h_n * n.div_ceil(NC) * NC];
        for k0 in (0..n).step_by(NC) {
            let panel = &mut rt[k0 * h_n..(k0 + NC) * h_n];
            for j in 0..h_n {
                for (kk, v) in panel[j * NC..(j + 1) * NC].iter_mut().enumerate() {
                    if k0 + kk < n {
                        *v = rows[(k0 + kk) * h_n + j];
                    }
                }
            }
        }
        return Some(Recur::Cols(rt, n));
    }
    let t = MatRef::new(rows, h_n, n, 1, h_n).ok()?;
    PackedB::pack(t).ok().map(Recur::Packed)
}

/// One direction's `R` in the step's form: `[H, G·H]`, or for split gru `[H, 2H]` (z, r)
/// and `[H, H]` (h).
fn recur_pair(rd: &[f32], h_n: usize, b_n: usize, split_gru: bool) -> Option<RecurPair> {
    let gh = rd.len() / h_n.max(1);
    Some(if split_gru {
        (
            recur_block(rd, h_n, b_n, 0, 2 * h_n)?,
            Some(recur_block(rd, h_n, b_n, 2 * h_n, gh)?),
        )
    } else {
        (recur_block(rd, h_n, b_n, 0, gh)?, None)
    })
}

/// The outputs of a recurrent node, or `None` to leave it to the interpreter.
pub(crate) fn run(node: &Node, ins: &[Option<&Tensor>], pool: &Pool) -> Option<Vec<Tensor>> {
    let mut out = run_op(node.op, &node.attrs, ins, pool, None)?;
    out.truncate(node.outputs.len());
    Some(out)
}

impl PreparedRecurrent {
    /// Every output of the prepared node (`Y`, `Y_h`, and `Y_c` for lstm) on `ins`, or
    /// `None` to leave it to the interpreter.
    pub fn run(&self, ins: &[Option<&Tensor>], pool: &Pool) -> Option<Vec<Tensor>> {
        run_op(self.op, &self.attrs, ins, pool, Some(self))
    }
}

/// Every output of `op` with `attrs` on `ins`, with the weights prepared once where `prep`
/// has them.
fn run_op(
    op: OpKind,
    attrs: &Attrs,
    ins: &[Option<&Tensor>],
    pool: &Pool,
    prep: Option<&PreparedRecurrent>,
) -> Option<Vec<Tensor>> {
    #[cfg(target_arch = "x86_64")]
    if crate::native::gemm::avx2::available() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        return unsafe { run_avx2(op, attrs, ins, pool, prep) };
    }
    run_body(op, attrs, ins, pool, prep)
}

/// [`run`] compiled with AVX2+FMA, so the gate math vectorises and the inline `exp` rounds
/// with `vroundps` instead of calling `floorf`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_avx2(
    op: OpKind,
    attrs: &Attrs,
    ins: &[Option<&Tensor>],
    pool: &Pool,
    prep: Option<&PreparedRecurrent>,
) -> Option<Vec<Tensor>> {
    run_body(op, attrs, ins, pool, prep)
}

/// What every direction's step loop reads, and where it writes.
struct Steps<'a> {
    spec: &'a Spec,
    d: &'a Dims,
    lens: &'a [usize],
    /// Per direction, the input projections `[S·B, G·H]` (biases folded in).
    proj: &'a [f32],
    /// Per direction, `R`'s bias (gru's `Rbh` under linear_before_reset is read from it).
    rbias: &'a [f32],
    recur: &'a [RecurPair],
    h0: Option<&'a [f32]>,
    c0: Option<&'a [f32]>,
    peep: Option<&'a [f32]>,
    /// `Y` (`[S, dirs, B, H]` or batch-major), `Y_h` and `Y_c`: each direction writes its
    /// own entries only.
    y: SharedMut,
    yh: SharedMut,
    yc: SharedMut,
}

impl Steps<'_> {
    /// Direction `dir`'s step loop, with AVX2+FMA where the CPU has it.
    fn direction(&self, dir: usize) -> Option<()> {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx512f") && crate::native::gemm::avx2::available() {
            // SAFETY: the CPU has AVX-512F, AVX2 and FMA (checked just above).
            return unsafe { self.direction_avx512(dir) };
        }
        #[cfg(target_arch = "x86_64")]
        if crate::native::gemm::avx2::available() {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            return unsafe { self.direction_avx2(dir) };
        }
        self.direction_body(dir)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn direction_avx2(&self, dir: usize) -> Option<()> {
        self.direction_body(dir)
    }

    /// The gate math in 16 lanes (elementwise: the same bits as in 8).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn direction_avx512(&self, dir: usize) -> Option<()> {
        self.direction_body(dir)
    }

    /// Direction `dir`'s time loop: the recurrent product and gate math per step; writes
    /// `Y[.., dir, ..]`, `Y_h[dir]` and `Y_c[dir]` only.
    #[inline(always)]
    fn direction_body(&self, dir: usize) -> Option<()> {
        let (spec, d, lens) = (self.spec, self.d, self.lens);
        let (s_n, b_n, h_n, dirs) = (d.seq, d.batch, d.hidden, d.dirs);
        let g_n = spec.cell.gates();
        let gh = g_n * h_n;
        let bm = spec.batch_major;
        let row = |t: usize, b: usize| if bm { b * s_n + t } else { t * b_n + b };
        let state_at = |b: usize| {
            if bm {
                (b * dirs + dir) * h_n
            } else {
                (dir * b_n + b) * h_n
            }
        };
        let y_at = |t: usize, b: usize| {
            if bm {
                ((b * s_n + t) * dirs + dir) * h_n
            } else {
                ((t * dirs + dir) * b_n + b) * h_n
            }
        };
        // SAFETY: `y` holds `S·dirs·B·H` values, `yh` and `yc` `dirs·B·H`; this direction
        // alone writes the `h_n`-long runs at `y_at(_, _)` and `state_at(_)` (both include
        // `dir`), and the buffers outlive the call.
        let put = |p: SharedMut, at: usize, v: &[f32]| unsafe {
            std::slice::from_raw_parts_mut(p.get().add(at), v.len()).copy_from_slice(v)
        };
        let proj = &self.proj[dir * s_n * b_n * gh..(dir + 1) * s_n * b_n * gh];
        let rbias = &self.rbias[dir * gh..(dir + 1) * gh];
        let (r_main, r_h) = &self.recur[dir];
        let split_gru = r_h.is_some();
        let main_cols = r_main.cols();
        let peep_d = self.peep.map(|p| &p[dir * 3 * h_n..(dir + 1) * 3 * h_n]);
        let acts = spec.acts_of(dir);
        let mut hr = vec![0f32; b_n * gh];
        let mut rh = vec![0f32; b_n * h_n];
        let mut hr_h = vec![0f32; b_n * h_n];
        // The states of every batch entry, `[B, H]`.
        let mut h = vec![0f32; b_n * h_n];
        let mut c = vec![0f32; b_n * h_n];
        // One batch entry's gate pre-activations.
        let mut z = vec![0f32; gh];
        for b in 0..b_n {
            let at = state_at(b);
            if let Some(v) = self.h0 {
                h[b * h_n..(b + 1) * h_n].copy_from_slice(&v[at..at + h_n]);
            }
            if let Some(v) = self.c0 {
                c[b * h_n..(b + 1) * h_n].copy_from_slice(&v[at..at + h_n]);
            }
        }
        let max_len = lens.iter().copied().max().unwrap_or(0);
        for s in 0..max_len {
            if h_n > 0 {
                r_main.apply(&h, b_n, h_n, &mut hr)?;
            }
            let active = |b: usize| lens[b] > s;
            let t_of = |b: usize| {
                if spec.reverse[dir] {
                    lens[b] - 1 - s
                } else {
                    s
                }
            };
            let clip = spec.clip;
            match spec.cell {
                Cell::Lstm => {
                    let (fa, ga, ha) = (acts[0], acts[1], acts[2]);
                    for b in (0..b_n).filter(|&b| active(b)) {
                        let t = t_of(b);
                        let p = &proj[row(t, b) * gh..(row(t, b) + 1) * gh];
                        let q = &hr[b * gh..(b + 1) * gh];
                        let hb = &mut h[b * h_n..(b + 1) * h_n];
                        let cb = &mut c[b * h_n..(b + 1) * h_n];
                        // Gate pre-activations in ONNX's order i, o, f, c.
                        add_into(&mut z, p, q);
                        let (zi, rest) = z.split_at_mut(h_n);
                        let (zo, rest) = rest.split_at_mut(h_n);
                        let (zf, zc) = rest.split_at_mut(h_n);
                        let (pi, po, pf) = match peep_d {
                            Some(pp) => (&pp[..h_n], &pp[h_n..2 * h_n], &pp[2 * h_n..]),
                            None => (&[][..], &[][..], &[][..]),
                        };
                        add_product(zi, pi, cb);
                        clip_slice(clip, zi);
                        act_slice(fa, zi);
                        if spec.input_forget {
                            for (f, &i) in zf.iter_mut().zip(zi.iter()) {
                                *f = 1.0 - i;
                            }
                        } else {
                            add_product(zf, pf, cb);
                            clip_slice(clip, zf);
                            act_slice(fa, zf);
                        }
                        clip_slice(clip, zc);
                        act_slice(ga, zc);
                        for (((cj, &f), &i), &g) in cb.iter_mut().zip(&*zf).zip(&*zi).zip(&*zc) {
                            *cj = f * *cj + i * g;
                        }
                        add_product(zo, po, cb);
                        clip_slice(clip, zo);
                        act_slice(fa, zo);
                        zc.copy_from_slice(cb);
                        act_slice(ha, zc);
                        for ((hj, &o), &g) in hb.iter_mut().zip(&*zo).zip(&*zc) {
                            *hj = o * g;
                        }
                    }
                }
                Cell::Rnn => {
                    for b in (0..b_n).filter(|&b| active(b)) {
                        let t = t_of(b);
                        let p = &proj[row(t, b) * gh..(row(t, b) + 1) * gh];
                        let q = &hr[b * gh..(b + 1) * gh];
                        let hb = &mut h[b * h_n..(b + 1) * h_n];
                        add_into(hb, p, q);
                        clip_slice(clip, hb);
                        act_slice(acts[0], hb);
                    }
                }
                Cell::Gru => {
                    let (fa, ga) = (acts[0], acts[1]);
                    // z and r of every active entry; `hr` now holds z, r in its first 2H
                    // columns (of `main_cols` per row).
                    for b in (0..b_n).filter(|&b| active(b)) {
                        let t = t_of(b);
                        let p = &proj[row(t, b) * gh..(row(t, b) + 1) * gh];
                        let q = &mut hr[b * main_cols..b * main_cols + 2 * h_n];
                        add_into(&mut z[..2 * h_n], &p[..2 * h_n], q);
                        q.copy_from_slice(&z[..2 * h_n]);
                        clip_slice(clip, q);
                        act_slice(fa, q);
                        for ((rj, &g), &hj) in rh[b * h_n..(b + 1) * h_n]
                            .iter_mut()
                            .zip(&q[h_n..])
                            .zip(&h[b * h_n..(b + 1) * h_n])
                        {
                            *rj = g * hj;
                        }
                    }
                    if let Some(rhp) = r_h {
                        // (r ⊙ h)·Rhᵀ for every entry (inactive rows are computed and unused).
                        rhp.apply(&rh, b_n, h_n, &mut hr_h)?;
                    }
                    for b in (0..b_n).filter(|&b| active(b)) {
                        let t = t_of(b);
                        let p = &proj[row(t, b) * gh + 2 * h_n..(row(t, b) + 1) * gh];
                        let q = &hr[b * main_cols..(b + 1) * main_cols];
                        let zc = &mut z[..h_n];
                        if split_gru {
                            add_into(zc, p, &hr_h[b * h_n..(b + 1) * h_n]);
                        } else {
                            // linear_before_reset: Wbh is in `p`, r ⊙ (h·Rhᵀ + Rbh) added here.
                            for (j, zj) in zc.iter_mut().enumerate() {
                                *zj = p[j] + q[h_n + j] * (q[2 * h_n + j] + rbias[2 * h_n + j]);
                            }
                        }
                        clip_slice(clip, zc);
                        act_slice(ga, zc);
                        for ((hj, &zg), &cand) in h[b * h_n..(b + 1) * h_n]
                            .iter_mut()
                            .zip(&q[..h_n])
                            .zip(&*zc)
                        {
                            *hj = (1.0 - zg) * cand + zg * *hj;
                        }
                    }
                }
            }
            for b in (0..b_n).filter(|&b| active(b)) {
                put(self.y, y_at(t_of(b), b), &h[b * h_n..(b + 1) * h_n]);
            }
        }
        for b in 0..b_n {
            put(self.yh, state_at(b), &h[b * h_n..(b + 1) * h_n]);
            put(self.yc, state_at(b), &c[b * h_n..(b + 1) * h_n]);
        }
        Some(())
    }
}

#[inline(always)]
fn run_body(
    op: OpKind,
    attrs: &Attrs,
    ins: &[Option<&Tensor>],
    pool: &Pool,
    prep: Option<&PreparedRecurrent>,
) -> Option<Vec<Tensor>> {
    let spec = Spec::new(op, attrs).ok()?;
    let get = |i: usize| ins.get(i).copied().flatten();
    // Every float operand in f32 (`None`: omitted); any other dtype goes to the interpreter.
    let f32s = |i: usize| -> Option<Option<&[f32]>> {
        match get(i) {
            None => Some(None),
            Some(t) => t.as_slice::<f32>().map(Some),
        }
    };
    let (x, w, r) = (f32s(input::X)??, f32s(input::W)??, f32s(input::R)??);
    let (bias, h0) = (f32s(input::B)?, f32s(input::INITIAL_H)?);
    let (c0, peep) = if spec.cell == Cell::Lstm {
        (f32s(input::INITIAL_C)?, f32s(input::P)?)
    } else {
        (None, None)
    };
    let shapes: Vec<Option<&[usize]>> = ins.iter().map(|t| t.map(Tensor::shape)).collect();
    let d = Dims::check(&spec, &shapes).ok()?;
    let lens = seq_lens(get(input::SEQ_LENS), &d).ok()?;
    let (s_n, b_n, i_n, h_n, dirs) = (d.seq, d.batch, d.input, d.hidden, d.dirs);
    let g_n = spec.cell.gates();
    let gh = g_n * h_n;
    let bm = spec.batch_major;
    let y_len = s_n.checked_mul(dirs)?.checked_mul(b_n)?.checked_mul(h_n)?;
    let mut y = vec![0f32; y_len];
    let mut yh = vec![0f32; dirs * b_n * h_n];
    let mut yc = vec![0f32; dirs * b_n * h_n];
    let big = GemmConfig {
        threads: pool.threads(),
        ..GemmConfig::default()
    };
    let split_gru = spec.cell == Cell::Gru && !spec.linear_before_reset;
    // The prepared weights, where they were made from operands of these shapes.
    let prep = prep.filter(|p| {
        let (ws, rs) = (
            get(input::W).map(Tensor::shape),
            get(input::R).map(Tensor::shape),
        );
        ws.zip(rs).is_some_and(|(ws, rs)| p.fits(ws, rs))
    });
    let rows = s_n * b_n;
    let dir_len = rows.checked_mul(gh)?;
    let mut proj = vec![0f32; dir_len.checked_mul(dirs)?];
    let mut rbias_all = vec![0f32; dirs * gh];
    for dir in 0..dirs {
        let wd = &w[dir * gh * i_n..(dir + 1) * gh * i_n];
        // The bias folded into the projection: Wb + Rb, except gru's Rbh under
        // linear_before_reset (it sits inside `r ⊙ (h·Rhᵀ + Rbh)`).
        let mut pbias = vec![0f32; gh];
        let rbias = &mut rbias_all[dir * gh..(dir + 1) * gh];
        if let Some(bv) = bias {
            let bd = &bv[dir * 2 * gh..(dir + 1) * 2 * gh];
            pbias.copy_from_slice(&bd[..gh]);
            rbias.copy_from_slice(&bd[gh..]);
        }
        let keep_rbh = spec.cell == Cell::Gru && spec.linear_before_reset;
        for k in 0..gh {
            if !(keep_rbh && k >= 2 * h_n) {
                pbias[k] += rbias[k];
            }
        }
        if rows > 0 && gh > 0 {
            let rhs = match prep {
                Some(p) => Rhs::Packed(&p.w[dir]),
                None => Rhs::Plain(MatRef::new(wd, i_n, gh, 1, i_n).ok()?),
            };
            gemm_in(
                pool,
                MatRef::new(x, rows, i_n, i_n, 1).ok()?,
                rhs,
                MatMut::new(&mut proj[dir * dir_len..(dir + 1) * dir_len], rows, gh, gh).ok()?,
                &Epilogue {
                    bias: Some(&pbias),
                    ..Epilogue::default()
                },
                &big,
            )
            .ok()?;
        }
    }
    let laid_out;
    let recur = match prep.and_then(|p| p.recur(b_n)) {
        Some(forms) => forms,
        None => {
            laid_out = (0..dirs)
                .map(|dir| {
                    recur_pair(
                        &r[dir * gh * h_n..(dir + 1) * gh * h_n],
                        h_n,
                        b_n,
                        split_gru,
                    )
                })
                .collect::<Option<Vec<_>>>()?;
            &laid_out
        }
    };
    let steps = Steps {
        spec: &spec,
        d: &d,
        lens: &lens,
        proj: &proj,
        rbias: &rbias_all,
        recur,
        h0,
        c0,
        peep,
        y: SharedMut::new(y.as_mut_ptr()),
        yh: SharedMut::new(yh.as_mut_ptr()),
        yc: SharedMut::new(yc.as_mut_ptr()),
    };
    // The directions are independent: on two threads where the pool has them.
    if dirs == 2 && pool.threads() >= 2 {
        let failed = AtomicBool::new(false);
        pool.parallel_for(2, |dir| {
            if steps.direction(dir).is_none() {
                failed.store(true, Ordering::Relaxed);
            }
        });
        if failed.load(Ordering::Relaxed) {
            return None;
        }
    } else {
        for dir in 0..dirs {
            steps.direction(dir)?;
        }
    }
    let mut out = vec![
        Tensor::from_vec(d.y_shape(bm), y),
        Tensor::from_vec(d.state_shape(bm), yh),
    ];
    if spec.cell == Cell::Lstm {
        out.push(Tensor::from_vec(d.state_shape(bm), yc));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::{Attr, Attrs, OpKind, ValueId};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// The native routine against the f64 reference: f32 GEMMs and the inline exp leave
    /// about 1e-6 per step; over a handful of steps 1e-4 absolute is ample and still
    /// catches any wrong gate, bias or time index (those are errors of order 0.1).
    const NATIVE_TOLERANCE: f64 = 1e-4;

    fn node(op: OpKind, attrs: Attrs, n_in: u32, n_out: u32) -> Node {
        Node {
            op,
            attrs,
            inputs: (0..n_in).map(|i| Some(ValueId(i))).collect(),
            outputs: (0..n_out).map(|i| ValueId(100 + i)).collect(),
            name: String::new(),
        }
    }

    fn rand_t(rng: &mut StdRng, shape: &[usize], scale: f32) -> Tensor {
        let n = shape.iter().product();
        let v = (0..n).map(|_| rng.gen_range(-scale..scale)).collect();
        Tensor::from_vec(shape.to_vec(), v)
    }

    fn check_case(rng: &mut StdRng, op: OpKind, attrs: Attrs, with_lens: bool, pool: &Pool) {
        let spec = Spec::new(op, &attrs).unwrap();
        let (s, b, i, h) = (
            rng.gen_range(1..6usize),
            // Batches on both sides of SMALL_BATCH: row dots and the packed GEMM.
            rng.gen_range(1..2 * SMALL_BATCH + 1),
            rng.gen_range(1..7usize),
            rng.gen_range(1..9usize),
        );
        let dirs = spec.dirs();
        let g = spec.cell.gates();
        let x_shape = if spec.batch_major {
            vec![b, s, i]
        } else {
            vec![s, b, i]
        };
        let state = if spec.batch_major {
            vec![b, dirs, h]
        } else {
            vec![dirs, b, h]
        };
        let x = rand_t(rng, &x_shape, 2.0);
        let w = rand_t(rng, &[dirs, g * h, i], 0.8);
        let r = rand_t(rng, &[dirs, g * h, h], 0.8);
        let bias = rand_t(rng, &[dirs, 2 * g * h], 0.5);
        let lens = Tensor::from_vec(
            vec![b],
            (0..b)
                .map(|_| rng.gen_range(0..=s) as i32)
                .collect::<Vec<_>>(),
        );
        let h0 = rand_t(rng, &state, 1.0);
        let c0 = rand_t(rng, &state, 1.0);
        let p = rand_t(rng, &[dirs, 3 * h], 0.5);
        let mut ins: Vec<Option<&Tensor>> = vec![
            Some(&x),
            Some(&w),
            Some(&r),
            Some(&bias),
            with_lens.then_some(&lens),
            Some(&h0),
        ];
        if spec.cell == Cell::Lstm {
            ins.push(Some(&c0));
            ins.push(Some(&p));
        }
        let n_out = spec.cell.outputs() as u32;
        let n = node(op, attrs.clone(), ins.len() as u32, n_out);
        let got = run(&n, &ins, pool).expect("the native routine takes f32 inputs");
        // With W and R prepared once: the same values, on the first run (which lays out
        // R's step form) and on the next (which reuses it).
        let prep = PreparedRecurrent::new(op, &attrs, Some(&w), Some(&r)).unwrap();
        for _ in 0..2 {
            let mut again = prep.run(&ins, pool).unwrap();
            again.truncate(got.len());
            assert_eq!(
                again, got,
                "{op:?} {attrs:?}: prepared against per-run weights"
            );
        }
        let want = kiln_ir::ops::eval(op, &attrs, &ins).unwrap();
        assert_eq!(got.len(), want.len());
        for (k, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.shape(), w.shape(), "{op:?} output {k}");
            for (a, e) in g.to_f64s().iter().zip(w.to_f64s()) {
                assert!(
                    (a - e).abs() <= NATIVE_TOLERANCE,
                    "{op:?} {attrs:?} output {k}: {a} vs {e} (S={s} B={b} I={i} H={h})"
                );
            }
        }
    }

    /// The small-batch `h·Rᵀ` over several 64-column panels and partial ones: the
    /// dispatched kernel (AVX-512, AVX2 or portable, by CPU) gives the portable one's bits,
    /// both within float rounding of an f64 product.
    #[test]
    fn small_batch_kernels_agree_across_panels() {
        let mut rng = StdRng::seed_from_u64(21);
        for &n in &[1usize, 17, 64, 65, 130] {
            for &h_n in &[1usize, 7, 33] {
                for b_n in 1..=SMALL_BATCH + 1 {
                    let r: Vec<f32> = (0..n * h_n).map(|_| rng.gen_range(-1.0..1.0)).collect();
                    let h: Vec<f32> = (0..b_n * h_n).map(|_| rng.gen_range(-1.0..1.0)).collect();
                    let Some(Recur::Cols(rt, _)) = recur_block(&r, h_n, 1, 0, n) else {
                        panic!("a small batch lays R out in panels");
                    };
                    let mut fast = vec![f32::NAN; b_n * n];
                    let mut portable = vec![f32::NAN; b_n * n];
                    small_batch(&h, b_n, h_n, &rt, n, &mut fast);
                    small_batch_body(&h, b_n, h_n, &rt, n, &mut portable);
                    assert_eq!(
                        fast.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                        portable.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                        "n {n} h {h_n} b {b_n}"
                    );
                    for b in 0..b_n {
                        for k in 0..n {
                            let want: f64 = (0..h_n)
                                .map(|j| f64::from(h[b * h_n + j]) * f64::from(r[k * h_n + j]))
                                .sum();
                            let got = f64::from(fast[b * n + k]);
                            assert!((got - want).abs() <= 1e-5 * h_n as f64, "{got} vs {want}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn native_cells_match_the_interpreter_in_every_direction_and_layout() {
        let mut rng = StdRng::seed_from_u64(14);
        // Two threads run a bidirectional node's directions at once.
        let pools = [Pool::new(2).unwrap(), Pool::single()];
        for (op, pool) in [OpKind::Lstm, OpKind::Gru, OpKind::Rnn]
            .into_iter()
            .flat_map(|op| pools.iter().map(move |p| (op, p)))
        {
            for dir in ["forward", "reverse", "bidirectional"] {
                for layout in [0, 1] {
                    for with_lens in [false, true] {
                        let mut attrs = Attrs::new()
                            .with("direction", Attr::Str(dir.into()))
                            .with("layout", Attr::Int(layout));
                        if op == OpKind::Gru && rng.gen_bool(0.5) {
                            attrs.set("linear_before_reset", Attr::Int(1));
                        }
                        check_case(&mut rng, op, attrs, with_lens, pool);
                    }
                }
            }
        }
    }

    #[test]
    fn native_cells_match_with_clip_input_forget_and_other_activations() {
        let mut rng = StdRng::seed_from_u64(5);
        let pool = Pool::single();
        let strs = |v: &[&str]| Attr::Strs(v.iter().map(|s| s.to_string()).collect());
        let cases = [
            (
                OpKind::Lstm,
                Attrs::new()
                    .with("clip", Attr::Float(0.7))
                    .with("input_forget", Attr::Int(1)),
            ),
            (
                OpKind::Lstm,
                Attrs::new().with(
                    "activations",
                    strs(&["HardSigmoid", "LeakyRelu", "Softsign"]),
                ),
            ),
            (
                OpKind::Gru,
                Attrs::new()
                    .with("direction", Attr::Str("bidirectional".into()))
                    .with(
                        "activations",
                        strs(&["Sigmoid", "Relu", "HardSigmoid", "Elu"]),
                    )
                    .with("activation_alpha", Attr::Floats(vec![0.3, 0.5]))
                    .with("activation_beta", Attr::Floats(vec![0.4])),
            ),
            (
                OpKind::Rnn,
                Attrs::new()
                    .with("clip", Attr::Float(0.5))
                    .with("activations", strs(&["ScaledTanh"]))
                    .with("activation_alpha", Attr::Floats(vec![1.5]))
                    .with("activation_beta", Attr::Floats(vec![0.7])),
            ),
        ];
        for (op, attrs) in cases {
            for with_lens in [false, true] {
                check_case(&mut rng, op, attrs.clone(), with_lens, &pool);
            }
        }
    }

    #[test]
    fn other_dtypes_and_bad_shapes_fall_back() {
        let x = Tensor::from_vec(vec![2, 1, 3], vec![0f64; 6]);
        let w = Tensor::from_vec(vec![1, 3, 3], vec![0f64; 9]);
        let r = Tensor::from_vec(vec![1, 3, 3], vec![0f64; 9]);
        let n = node(OpKind::Rnn, Attrs::new(), 3, 2);
        assert!(run(&n, &[Some(&x), Some(&w), Some(&r)], &Pool::single()).is_none());
        let x = Tensor::from_vec(vec![2, 1, 3], vec![0f32; 6]);
        let w = Tensor::from_vec(vec![1, 2, 3], vec![0f32; 6]);
        let r = Tensor::from_vec(vec![1, 3, 3], vec![0f32; 9]);
        assert!(run(&n, &[Some(&x), Some(&w), Some(&r)], &Pool::single()).is_none());
    }

    #[test]
    fn fast_sigmoid_and_tanh_are_close_and_keep_nan() {
        for k in -4000..=4000 {
            let x = k as f32 * 0.01;
            assert!((f64::from(sigmoid(x)) - Act::Sigmoid.apply(f64::from(x))).abs() < 1e-6);
            assert!((f64::from(tanh(x)) - f64::from(x).tanh()).abs() < 1e-6);
        }
        assert!(sigmoid(f32::NAN).is_nan() && tanh(f32::NAN).is_nan());
        assert_eq!(tanh(f32::INFINITY), 1.0);
        assert!(sigmoid(f32::NEG_INFINITY) < 1e-30);
    }
}
