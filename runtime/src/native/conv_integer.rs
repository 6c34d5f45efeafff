//! Prepared 8-bit convolutions, `conv_integer` and `qlinear_conv`, of any geometry (1-D to
//! 3-D and up, strides, dilations, pads, auto_pad, groups) on the exact int8 GEMM's register
//! tiles ([`super::gemm_i8`]), in NCHW orientation: per image, group and block of output
//! pixels, `Y[OC_g, P_blk] = (W_g − w_zp)·(cols − x_zp)`. The weight `W_g[OC_g, C_g·k]` is
//! the GEMM's A operand, packed once when it is a constant. The input is copied once per
//! run, padded with its zero point (so padding adds zero, as in the reference) and split
//! into stride phases ([`Taps`]); then every tap's im2col row over a block of pixels is a
//! plain slice of that copy, transposed four rows at a time into B's panel layout, so no
//! im2col matrix is ever built. Blocks run on the pool. Depthwise convs (one input and one
//! output channel per group) skip the GEMM: each tap's slice is multiplied and added in
//! i32 lanes.
//!
//! `conv_integer` stores the i32 sums; `qlinear_conv` adds its i32 bias and requantises as
//! the reference does (`saturate(round_half_even(acc · f32(f32(s_x·s_w)/s_y)) + z_y)`, the
//! product in f64), straight into the output rows, so both are equal to the interpreter's,
//! element for element. Forms the reference takes that this does not (non-f32 scales, zero
//! points of other shapes) return `None`: the interpreter runs them.

use super::gemm_i8::{self, IsaI8, Signs, MR, PANEL};
use crate::executor::arena::Outputs;
use crate::pool::Pool;
use kiln_ir::ops::linalg::{conv_geometry, ConvGeometry};
use kiln_ir::{Attrs, DType, OpKind, Tensor};

/// Bytes of one block's B panels (`kp` × block pixels) the GEMM path aims at: they stay in
/// L2 while every row tile of the weight passes over them.
const BLOCK_BYTES: usize = 128 << 10;
/// At most this many pixels per block of the GEMM path: a row tile's i32 sums over the
/// block (`MR ×` this × 4 bytes) stay in L1 until they are requantised.
const MAX_BLOCK: usize = 512;
/// Output pixels per block of a depthwise conv (its rows are short: one per tap).
const DEPTHWISE_BLOCK: usize = 512;
/// Bytes after the padded input that a block's last panel may read (and drop).
const SLACK: usize = 2 * PANEL;

/// A conv_integer or qlinear_conv node prepared once: its attributes and, when the weight
/// is a constant, each group's weight packed as the GEMM's A operand.
#[derive(Debug)]
pub struct PreparedConvI8 {
    op: OpKind,
    attrs: Attrs,
    /// The weight's shape and its per-group packing.
    packed: Option<(Vec<usize>, Vec<PackedRows>)>,
    /// The padded input's buffer, kept between runs (a run that finds it taken makes
    /// its own).
    padded: std::sync::Mutex<Vec<u8>>,
    /// The integer GEMM kernel (and, with it, how wide the other loops go).
    isa: IsaI8,
    /// The input and weight shapes last seen and their [`Taps`].
    #[allow(clippy::type_complexity)]
    taps: std::sync::Mutex<Option<(Vec<usize>, Vec<usize>, std::sync::Arc<Taps>)>>,
}

/// One group's weight `W_g[OC_g, C_g·k]` as the integer GEMM's signed A operand
/// ([`Signs::SignedA`]): each row as i8 (−128 when the weight is u8), zero-padded to
/// `kp = 4·⌈C_g·k/4⌉` bytes, the row count padded to a multiple of [`MR`]; with the row sums
/// of the shifted values.
#[derive(Debug)]
struct PackedRows {
    rows: usize,
    /// What was added to the weight's values (−128 for u8, 0 for i8).
    shift: i32,
    data: Vec<u8>,
    sums: Vec<i32>,
}

/// An 8-bit tensor's bytes and whether they are signed.
fn raw(t: &Tensor) -> Option<(&[u8], bool)> {
    match t.dtype() {
        DType::U8 => Some((t.as_slice::<u8>()?, false)),
        DType::I8 => {
            let v = t.as_slice::<i8>()?;
            // SAFETY: i8 and u8 have one size and alignment, and every bit pattern is a
            // valid value of both.
            Some((
                unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), v.len()) },
                true,
            ))
        }
        _ => None,
    }
}

/// Every group's `W_g[OC_g, C_g·k]` (rows of the ONNX weight as they are), packed.
fn pack_groups(w: &Tensor, group: usize) -> Option<Vec<PackedRows>> {
    let m = *w.shape().first()?;
    if group == 0 || m % group != 0 {
        return None;
    }
    let (bytes, signed) = raw(w)?;
    let ckk: usize = w.shape()[1..].iter().product();
    let (mg, kp) = (m / group, ckk.div_ceil(4) * 4);
    let flip = if signed { 0 } else { 0x80 };
    let rows = mg.div_ceil(MR) * MR;
    Some(
        (0..group)
            .map(|g| {
                let mut data = vec![0u8; rows * kp];
                let mut sums = vec![0i32; mg];
                for (o, sum) in sums.iter_mut().enumerate() {
                    let src = &bytes[(g * mg + o) * ckk..][..ckk];
                    for (d, &s) in data[o * kp..][..ckk].iter_mut().zip(src) {
                        *d = s ^ flip;
                        *sum += i32::from(*d as i8);
                    }
                }
                PackedRows {
                    rows: mg,
                    shift: if signed { 0 } else { -128 },
                    data,
                    sums,
                }
            })
            .collect(),
    )
}

/// The group count of `attrs` (0 when it is not a positive integer).
fn group_of(attrs: &Attrs) -> usize {
    attrs
        .int_or("group", 1)
        .ok()
        .and_then(|g| usize::try_from(g).ok())
        .unwrap_or(0)
}

/// A zero point as i32 values: absent (zero), one value, or (`per_channel`) one per
/// output channel; it must have its operand's dtype. `None` for any other form.
fn zero_point(
    z: Option<&Tensor>,
    operand: &Tensor,
    per_channel: Option<usize>,
) -> Option<Vec<i32>> {
    let Some(z) = z else {
        return Some(vec![0]);
    };
    if z.dtype() != operand.dtype() {
        return None;
    }
    let ok = z.len() == 1 || per_channel.is_some_and(|m| z.shape() == [m]);
    ok.then(|| z.to_i64s().into_iter().map(|v| v as i32).collect())
}

/// One f32 value, or (`per_channel`) one per output channel, as f64.
fn scale(t: &Tensor, per_channel: Option<usize>) -> Option<Vec<f64>> {
    let ok = t.len() == 1 || per_channel.is_some_and(|m| t.shape() == [m]);
    let v = t.as_slice::<f32>().filter(|_| ok)?;
    Some(v.iter().map(|&x| f64::from(x)).collect())
}

/// `v` rounded to the nearest integer, ties to even, for `|v| < 2⁵¹` (as
/// `f64::round_ties_even`, without a libm call on baseline x86-64); larger values stay
/// beyond any 8-bit range, so after the clamp the result is the same.
#[inline(always)]
pub(crate) fn round_even(v: f64) -> f64 {
    const MAGIC: f64 = 6_755_399_441_055_744.0; // 1.5 · 2⁵²
    (v + MAGIC) - MAGIC
}

/// Where im2col's rows read, in a copy of the input padded with its zero point on every
/// spatial axis (so that every tap of every output pixel lands inside it) and split into
/// stride phases (position `y` along an axis of stride `s` goes to phase `y mod s`, place
/// `y / s`). Output pixels are indexed by their place `q = Σ o_a·plane_stride_a` in a
/// phase plane, so each tap's im2col row over a run of `q`s is a plain slice of one phase
/// plane, at the tap's offset. Blocks run over `0..pq`; the `q`s that are no output pixel
/// (past an output row's end) are computed and dropped.
#[derive(Debug)]
struct Taps {
    /// Per kernel offset: where its row starts within a channel (its phase plane, and
    /// `Σ_a ⌊k_a·dilation_a / s_a⌋·plane_stride_a`).
    offsets: Vec<usize>,
    /// Output size per axis.
    out: Vec<usize>,
    /// Per axis: the stride and the phase plane's size.
    strides: Vec<usize>,
    plane: Vec<usize>,
    /// Elements per phase plane and per channel (all its phases).
    plane_len: usize,
    chan: usize,
    /// The `q` past the last output pixel.
    pq: usize,
    /// Per input row (all axes but the last, in order): its phase over those axes and its
    /// place in the plane; per phase `f` of the last axis that the row reaches: `f`, the
    /// row's first element that goes there, how many do, and their first place.
    in_rows: Vec<(usize, usize)>,
    in_last: Vec<(usize, usize, usize, usize)>,
}

impl Taps {
    fn new(geo: &ConvGeometry, xs: &[usize]) -> Taps {
        let nsp = xs.len() - 2;
        // Each axis holds its leading pad, the input and whatever the last tap reads past
        // its end, rounded up to whole strides.
        let plane: Vec<usize> = (0..nsp)
            .map(|a| {
                let reach = geo.out[a].saturating_sub(1) * geo.strides[a]
                    + (geo.kernel[a] - 1) * geo.dilations[a]
                    + 1;
                reach
                    .max(geo.pads_begin[a] + xs[2 + a])
                    .div_ceil(geo.strides[a])
            })
            .collect();
        let hst = kiln_ir::tensor::strides(&plane);
        let plane_len: usize = plane.iter().product();
        let phases: usize = geo.strides.iter().product();
        let ksize: usize = geo.kernel.iter().product();
        let mut offsets = Vec::with_capacity(ksize);
        let mut kix = vec![0usize; nsp];
        for _ in 0..ksize {
            let (mut phase, mut at) = (0, 0);
            for a in 0..nsp {
                let y = kix[a] * geo.dilations[a];
                phase = phase * geo.strides[a] + y % geo.strides[a];
                at += y / geo.strides[a] * hst[a];
            }
            offsets.push(phase * plane_len + at);
            for a in (0..nsp).rev() {
                kix[a] += 1;
                if kix[a] < geo.kernel[a] {
                    break;
                }
                kix[a] = 0;
            }
        }
        let pq = (0..nsp).map(|a| (geo.out[a] - 1) * hst[a]).sum::<usize>() + 1;
        let last = nsp - 1;
        let rows: usize = xs[2..2 + last].iter().product();
        let mut in_rows = Vec::with_capacity(rows);
        let mut pos = vec![0usize; last];
        for _ in 0..rows {
            let (mut phase, mut at) = (0, 0);
            for a in 0..last {
                let y = pos[a] + geo.pads_begin[a];
                phase = phase * geo.strides[a] + y % geo.strides[a];
                at += y / geo.strides[a] * hst[a];
            }
            in_rows.push((phase, at));
            for a in (0..last).rev() {
                pos[a] += 1;
                if pos[a] < xs[2 + a] {
                    break;
                }
                pos[a] = 0;
            }
        }
        let (w, pw, sw) = (xs[2 + last], geo.pads_begin[last], geo.strides[last]);
        let in_last = (0..sw)
            .filter_map(|f| {
                let i0 = (f + sw - pw % sw) % sw;
                (i0 < w).then(|| (f, i0, (w - i0).div_ceil(sw), (i0 + pw) / sw))
            })
            .collect();
        Taps {
            in_rows,
            in_last,
            offsets,
            out: geo.out.clone(),
            strides: geo.strides.clone(),
            plane,
            plane_len,
            chan: phases * plane_len,
            pq,
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx2")]
    unsafe fn pad_channel_avx512(&self, args: (&[u8], &[usize], &mut [u8], u8, u8)) {
        self.pad_channel(args);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn pad_channel_avx2(&self, args: (&[u8], &[usize], &mut [u8], u8, u8)) {
        self.pad_channel(args);
    }

    /// Channel `img` (spatial shape `xs`) into `dst` (`chan` bytes): every byte XORed with
    /// `flip` at its padded place in its phase plane, `pad` (already flipped) elsewhere.
    #[inline(always)]
    fn pad_channel(&self, (img, xs, dst, pad, flip): (&[u8], &[usize], &mut [u8], u8, u8)) {
        let nsp = xs.len();
        let (w, sw) = (xs[nsp - 1], self.strides[nsp - 1]);
        dst.fill(pad);
        for (row, &(phase, at)) in img.chunks_exact(w.max(1)).zip(&self.in_rows) {
            for &(f, i0, count, first) in &self.in_last {
                let start = (phase * sw + f) * self.plane_len + at + first;
                let d = &mut dst[start..start + count];
                match sw {
                    // u8 inputs are copied as they are.
                    1 if flip == 0 => d.copy_from_slice(row),
                    1 => {
                        for (d, &v) in d.iter_mut().zip(row) {
                            *d = v ^ flip;
                        }
                    }
                    // Pairs, so the loads stay in bounds and vectorise.
                    2 => {
                        let (body, last) = d.split_at_mut(count - 1);
                        let pairs = row[i0..i0 + 2 * (count - 1)].chunks_exact(2);
                        for (d, pair) in body.iter_mut().zip(pairs) {
                            *d = pair[0] ^ flip;
                        }
                        last[0] = row[i0 + 2 * (count - 1)] ^ flip;
                    }
                    _ => {
                        for (d, &v) in d.iter_mut().zip(row[i0..].iter().step_by(sw)) {
                            *d = v ^ flip;
                        }
                    }
                }
            }
        }
    }

    /// Every channel of `x` (bytes, shape `xs`, zero point byte `zx`) into `padded` (made
    /// `n·c·chan` bytes and [`SLACK`]), flipped by `flip`, on the pool.
    fn pad_input(
        &self,
        (x, xs, zx, flip): (&[u8], &[usize], u8, u8),
        wide: Wide,
        pool: &Pool,
        padded: &mut Vec<u8>,
    ) {
        let (chan, in_sp) = (self.chan, xs[2..].iter().product::<usize>());
        let channels = xs[0] * xs[1];
        // Every byte is written below.
        padded.resize(channels * chan + SLACK, 0);
        let dst = Out(padded.as_mut_ptr());
        pool.parallel_ranges(channels, |range| {
            for i in range {
                // SAFETY: channel i's `chan` bytes are written by this item only.
                let d = unsafe { std::slice::from_raw_parts_mut(dst.get().add(i * chan), chan) };
                let args = (&x[i * in_sp..][..in_sp], &xs[2..], d, zx ^ flip, flip);
                match wide {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: `wide_isa` found these features on this CPU.
                    Wide::Avx512 => unsafe { self.pad_channel_avx512(args) },
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: as above.
                    Wide::Avx2 => unsafe { self.pad_channel_avx2(args) },
                    _ => self.pad_channel(args),
                }
            }
        });
    }

    /// The output pixels among `q0..q1` into `segs`, as stretches `(column in the block,
    /// length, output pixel)` along the last axis.
    fn segments(&self, q0: usize, q1: usize, segs: &mut Vec<(usize, usize, usize)>) {
        segs.clear();
        let nsp = self.plane.len();
        let (wp, out_last) = (self.plane[nsp - 1], self.out[nsp - 1]);
        let mut q = q0;
        while q < q1 {
            // q's place in the plane, and whether it is an output pixel.
            let (mut rest, mut pixel, mut scale, mut valid) = (q / wp, 0usize, out_last, true);
            let ow = q % wp;
            for a in (0..nsp - 1).rev() {
                let o = rest % self.plane[a];
                rest /= self.plane[a];
                valid &= o < self.out[a];
                pixel += o * scale;
                scale *= self.out[a];
            }
            if valid && ow < out_last {
                let len = (out_last - ow).min(q1 - q);
                segs.push((q - q0, len, pixel + ow));
                q += len;
            } else {
                q += wp - ow;
            }
        }
    }
}

/// Four rows of [`PANEL`] bytes into one group of B's panel layout (each column's four
/// bytes together).
#[inline(always)]
fn transpose4(src: [&[u8]; 4], dst: &mut [i8]) {
    let (src, dst) = (&src.map(|r| &r[..PANEL]), &mut dst[..PANEL * 4]);
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        // SAFETY: SSE2 is part of x86-64; each load reads the 16 bytes of a row and the
        // stores write the 64 bytes of `dst` (both checked by the slicing above).
        unsafe {
            let ld = |d: usize| _mm_loadu_si128(src[d].as_ptr().cast());
            let r = [ld(0), ld(1), ld(2), ld(3)];
            let (t0, t1) = (_mm_unpacklo_epi8(r[0], r[1]), _mm_unpackhi_epi8(r[0], r[1]));
            let (t2, t3) = (_mm_unpacklo_epi8(r[2], r[3]), _mm_unpackhi_epi8(r[2], r[3]));
            let o = dst.as_mut_ptr().cast::<__m128i>();
            _mm_storeu_si128(o, _mm_unpacklo_epi16(t0, t2));
            _mm_storeu_si128(o.add(1), _mm_unpackhi_epi16(t0, t2));
            _mm_storeu_si128(o.add(2), _mm_unpacklo_epi16(t1, t3));
            _mm_storeu_si128(o.add(3), _mm_unpackhi_epi16(t1, t3));
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    for (d, row) in src.iter().enumerate() {
        for (c, &v) in row.iter().enumerate() {
            dst[c * 4 + d] = v as i8;
        }
    }
}

/// B's panels for the `q`s `q0..q0 + np` (whole panels) straight from a group's padded
/// channels `img` (row `r` of im2col starts at `img[row_at[r] + q]`), with each column's
/// sum `Σ_k b'` in `sums`. Rows past `row_at` (K's padding to whole groups) are zero.
#[inline(always)]
fn panels_direct(
    img: &[u8],
    row_at: &[usize],
    (q0, np, kp): (usize, usize, usize),
    panels: &mut [i8],
    mut sums: Option<&mut [i32]>,
    avx512: bool,
) {
    const ZERO: [u8; PANEL] = [0; PANEL];
    let with_sums = sums.is_some();
    let kq = kp / 4;
    let npanels = np.div_ceil(PANEL);
    // Four panels at a time in zmm registers where the CPU has AVX-512BW.
    let mut first = 0;
    #[cfg(target_arch = "x86_64")]
    if avx512 {
        while first + 4 <= npanels {
            let q = q0 + first * PANEL;
            // SAFETY: `avx512` is set only where the CPU has AVX-512F and BW.
            unsafe { x86::panels64(img, row_at, (q, first, kq), panels, sums.as_deref_mut()) };
            first += 4;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = avx512;
    for t in first..npanels {
        let q = q0 + t * PANEL;
        let mut cs = [0i32; PANEL];
        for g in 0..kq {
            let row = |d: usize| match row_at.get(g * 4 + d) {
                Some(&at) => &img[at + q..][..PANEL],
                None => &ZERO[..],
            };
            let rows = [row(0), row(1), row(2), row(3)];
            transpose4(rows, &mut panels[(t * kq + g) * PANEL * 4..]);
            if with_sums {
                for row in rows {
                    for (c, &v) in cs.iter_mut().zip(row) {
                        *c += i32::from(v);
                    }
                }
            }
        }
        if let Some(sums) = sums.as_deref_mut() {
            sums[t * PANEL..][..PANEL].copy_from_slice(&cs);
        }
    }
}

/// A raw pointer to the output, written in disjoint row segments by the pool's threads.
struct Out<T>(*mut T);
// SAFETY: every (image, channel, pixel block) segment is written by one work item only.
unsafe impl<T> Send for Out<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for Out<T> {}

impl<T> Out<T> {
    /// The pointer (a method, so closures capture the whole `Out`, not its field).
    fn get(&self) -> *mut T {
        self.0
    }
}

/// What a finished row segment of i32 sums becomes: the sums, or requantised bytes.
enum Sink {
    I32(Out<i32>),
    Q8 {
        out: Out<u8>,
        /// Per output channel: the multiplier and the bias.
        mult: Vec<f64>,
        bias: Vec<i32>,
        z: f64,
        lo: f64,
        hi: f64,
        /// Whether the CPU has AVX-512F and BW (16 values at a time, [`x86::requantise16`]).
        avx512: bool,
    },
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::PANEL;
    use std::arch::x86_64::*;

    /// [`super::panels_direct`] for the four panels `t..t + 4` (the `q`s `q..q + 64`): per
    /// group of four im2col rows, four 64-byte loads interleaved within 128-bit lanes (as
    /// [`super::transpose4`] does for one panel), then a 4×4 transpose of the lanes gives
    /// one group of each panel. Column sums, when asked for, add each pixel's four bytes.
    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    pub(super) unsafe fn panels64(
        img: &[u8],
        row_at: &[usize],
        (q, t, kq): (usize, usize, usize),
        panels: &mut [i8],
        sums: Option<&mut [i32]>,
    ) {
        const ZERO: [u8; 64] = [0; 64];
        assert!(panels.len() >= (t + 4) * kq * PANEL * 4);
        let (ones8, ones16) = (_mm512_set1_epi8(1), _mm512_set1_epi16(1));
        let mut cs = [_mm512_setzero_si512(); 4];
        for g in 0..kq {
            let row = |d: usize| match row_at.get(g * 4 + d) {
                Some(&at) => &img[at + q..][..64],
                None => &ZERO[..],
            };
            // SAFETY: each row slice holds 64 bytes.
            let ld = |d: usize| _mm512_loadu_si512(row(d).as_ptr().cast());
            let (r0, r1, r2, r3) = (ld(0), ld(1), ld(2), ld(3));
            let (t0, t1) = (_mm512_unpacklo_epi8(r0, r1), _mm512_unpackhi_epi8(r0, r1));
            let (t2, t3) = (_mm512_unpacklo_epi8(r2, r3), _mm512_unpackhi_epi8(r2, r3));
            // Lane l of u_i: the four bytes of pixels 16l + 4i .. 16l + 4i + 4.
            let (u0, u1) = (_mm512_unpacklo_epi16(t0, t2), _mm512_unpackhi_epi16(t0, t2));
            let (u2, u3) = (_mm512_unpacklo_epi16(t1, t3), _mm512_unpackhi_epi16(t1, t3));
            // Panel t + l's group: lane l of u0, u1, u2, u3.
            let v0 = _mm512_shuffle_i64x2::<0b01_00_01_00>(u0, u1);
            let v1 = _mm512_shuffle_i64x2::<0b11_10_11_10>(u0, u1);
            let v2 = _mm512_shuffle_i64x2::<0b01_00_01_00>(u2, u3);
            let v3 = _mm512_shuffle_i64x2::<0b11_10_11_10>(u2, u3);
            let out = [
                _mm512_shuffle_i64x2::<0b10_00_10_00>(v0, v2),
                _mm512_shuffle_i64x2::<0b11_01_11_01>(v0, v2),
                _mm512_shuffle_i64x2::<0b10_00_10_00>(v1, v3),
                _mm512_shuffle_i64x2::<0b11_01_11_01>(v1, v3),
            ];
            for (i, o) in out.iter().enumerate() {
                // SAFETY: panel t + i's group g lies inside `panels` (asserted above).
                let at = panels.as_mut_ptr().add(((t + i) * kq + g) * PANEL * 4);
                _mm512_storeu_si512(at.cast(), *o);
                if sums.is_some() {
                    // Each dword is one pixel's four u8 values: summed exactly.
                    let pairs = _mm512_maddubs_epi16(*o, ones8);
                    cs[i] = _mm512_add_epi32(cs[i], _mm512_madd_epi16(pairs, ones16));
                }
            }
        }
        if let Some(sums) = sums {
            for (i, c) in cs.iter().enumerate() {
                let dst = &mut sums[(t + i) * PANEL..][..PANEL];
                // SAFETY: 16 i32s written to `dst`.
                _mm512_storeu_si512(dst.as_mut_ptr().cast(), *c);
            }
        }
    }

    /// `dst[j] = clamp(round_half_even(f64(v[j] − fix.cols·cs[j] − fix.row) · mu) + z, lo,
    /// hi)` as a byte (the i32 arithmetic wrapping), 16 values at a time (`v.len()` a
    /// multiple of 16, `mu` and `z` finite): the arithmetic of the scalar loop, lane by
    /// lane, so the bytes are the same. The lower clamp is the saturation of the packs to
    /// bytes (a value below −2³¹ converts to i32::MIN, which saturates the same way). The
    /// bytes are packed in registers and stored 64 at a time (a narrowing store to memory
    /// is slow on some CPUs).
    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    pub(super) unsafe fn requantise16(
        (v, cs, fix): (&[i32], &[i32], super::Fix),
        dst: &mut [u8],
        (mu, z, lo, hi): (f64, f64, f64, f64),
    ) {
        assert!(v.len().is_multiple_of(16) && dst.len() == v.len() && cs.len() == v.len());
        let (vcols, vrow) = (_mm512_set1_epi32(fix.cols), _mm512_set1_epi32(fix.row));
        let (vmu, vz) = (_mm512_set1_pd(mu), _mm512_set1_pd(z));
        let vhi = _mm512_set1_pd(hi);
        let (ilo, ihi) = (_mm512_set1_epi32(lo as i32), _mm512_set1_epi32(hi as i32));
        let half = |x: __m256i| {
            let y = _mm512_mul_pd(_mm512_cvtepi32_pd(x), vmu);
            let y = _mm512_roundscale_pd::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(y);
            _mm512_cvtpd_epi32(_mm512_min_pd(_mm512_add_pd(y, vz), vhi))
        };
        let with_cols = fix.cols != 0;
        // 16 values (from `j`) as 16 i32 in a register.
        let lanes16 = |j: usize| {
            // SAFETY: 16 i32s read from `v` and `cs` at j (j + 16 ≤ len, from the loops).
            let mut raw = _mm512_loadu_si512(v.as_ptr().add(j).cast());
            if with_cols {
                let c = _mm512_loadu_si512(cs.as_ptr().add(j).cast());
                raw = _mm512_sub_epi32(raw, _mm512_mullo_epi32(vcols, c));
            }
            let v = _mm512_sub_epi32(raw, vrow);
            let lo8 = half(_mm512_castsi512_si256(v));
            let hi8 = half(_mm512_extracti64x4_epi64::<1>(v));
            _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo8), hi8)
        };
        // 64 at a time: saturating packs (exact: every value is in the output's range) to
        // i16 and then to bytes leave 128-bit lane l holding values 4l..4l+4 of each of
        // the four vectors; a dword permutation puts them in order.
        let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
        let whole = v.len() / 64 * 64;
        for (i, d) in dst[..whole].chunks_exact_mut(64).enumerate() {
            let j = i * 64;
            let ab = _mm512_packs_epi32(lanes16(j), lanes16(j + 16));
            let ce = _mm512_packs_epi32(lanes16(j + 32), lanes16(j + 48));
            let bytes = if lo < 0.0 {
                _mm512_packs_epi16(ab, ce)
            } else {
                _mm512_packus_epi16(ab, ce)
            };
            // SAFETY: 64 bytes written to `d`.
            _mm512_storeu_si512(
                d.as_mut_ptr().cast(),
                _mm512_permutexvar_epi32(order, bytes),
            );
        }
        for (i, d) in dst[whole..].chunks_exact_mut(16).enumerate() {
            let y = _mm512_min_epi32(_mm512_max_epi32(lanes16(whole + i * 16), ilo), ihi);
            // SAFETY: 16 bytes written to `d`.
            _mm_storeu_si128(d.as_mut_ptr().cast(), _mm512_cvtepi32_epi8(y));
        }
    }
}

/// The integer corrections of a row of raw sums `v`: the exact sums are
/// `v[j] − cols·Σ_k b'[j] − row` (wrapping, as i32 arithmetic in the reference).
#[derive(Clone, Copy)]
struct Fix {
    cols: i32,
    row: i32,
}

impl Fix {
    /// The exact sum of raw sum `a` in a column whose `Σ_k b'` is `c`.
    #[inline(always)]
    fn exact(self, a: i32, c: i32) -> i32 {
        a.wrapping_sub(self.cols.wrapping_mul(c))
            .wrapping_sub(self.row)
    }
}

impl Sink {
    /// Stores the exact sums of output channel `ch` (of `m`) of image `ni` from a block's
    /// row `v` (over the block's columns; `v` corrected by `fix` with the column sums `cs`)
    /// at the output pixels `segs` names (`(column, length, pixel)` of `p`). A requantised
    /// row is made whole in `bytes` (long vector loops) and its stretches copied out.
    ///
    /// # Safety
    /// The stretches lie inside the output, and no other thread writes them.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)] // the place, the row, the stretches and a buffer
    unsafe fn put_row(
        &self,
        (ni, ch): (usize, usize),
        dims: (usize, usize),
        v: &[i32],
        (cs, fix): (&[i32], Fix),
        segs: &[(usize, usize, usize)],
        bytes: &mut Vec<u8>,
    ) {
        let out = match self {
            Sink::I32(o) => {
                for &(j, len, pix) in segs {
                    let at = (ni * dims.0 + ch) * dims.1 + pix;
                    let dst = std::slice::from_raw_parts_mut(o.0.add(at), len);
                    for ((d, &a), &c) in dst.iter_mut().zip(&v[j..j + len]).zip(&cs[j..]) {
                        *d = fix.exact(a, c);
                    }
                }
                return;
            }
            Sink::Q8 { out, .. } => out,
        };
        let Some(&(j_end, len_end, _)) = segs.last() else {
            return;
        };
        let n = j_end + len_end;
        bytes.resize(n.max(bytes.len()), 0);
        self.requantise(ch, &v[..n], (&cs[..n], fix), &mut bytes[..n]);
        for &(j, len, pix) in segs {
            let at = (ni * dims.0 + ch) * dims.1 + pix;
            std::slice::from_raw_parts_mut(out.0.add(at), len).copy_from_slice(&bytes[j..j + len]);
        }
    }

    /// The requantised bytes of channel `ch`'s sums `v` (corrected by `fix`) into `dst`
    /// (a `Q8` sink; nothing otherwise).
    #[inline(always)]
    fn requantise(&self, ch: usize, v: &[i32], (cs, fix): (&[i32], Fix), dst: &mut [u8]) {
        let Sink::Q8 {
            mult,
            bias,
            z,
            lo,
            hi,
            avx512,
            ..
        } = self
        else {
            return;
        };
        let (mu, b, z, lo, hi) = (mult[ch], bias[ch], *z, *lo, *hi);
        if !(mu.is_finite() && z.is_finite()) {
            for ((d, &a), &c) in dst.iter_mut().zip(v).zip(cs) {
                let y = f64::from(fix.exact(a, c).wrapping_add(b)) * mu;
                // NaN becomes 0, as the reference's cast makes it.
                *d = (round_even(y) + z).clamp(lo, hi) as i32 as u8;
            }
            return;
        }
        // |acc| < 2³¹ and a finite f32 multiplier: the product is finite, so no NaN
        // reaches the compares, and after them the value is an integer in the 8-bit range
        // (an i8 result keeps its two's-complement byte).
        #[cfg(target_arch = "x86_64")]
        let (dst, v, cs) = if *avx512 {
            let n = v.len() / 16 * 16;
            let fixed = Fix {
                cols: fix.cols,
                row: fix.row.wrapping_sub(b),
            };
            // SAFETY: `avx512` is set only where the CPU has AVX-512F and BW.
            unsafe {
                x86::requantise16((&v[..n], &cs[..n], fixed), &mut dst[..n], (mu, z, lo, hi))
            };
            (&mut dst[n..], &v[n..], &cs[n..])
        } else {
            (dst, v, cs)
        };
        for ((d, &a), &c) in dst.iter_mut().zip(v).zip(cs) {
            let y = round_even(f64::from(fix.exact(a, c).wrapping_add(b)) * mu) + z;
            let y = if y < lo {
                lo
            } else if y > hi {
                hi
            } else {
                y
            };
            // SAFETY: finite, integral and inside the 8-bit range after the compares.
            *d = unsafe { y.to_int_unchecked::<i32>() } as u8;
        }
    }
}

/// One work item's buffers, reused across its blocks.
struct Scratch {
    panels: Vec<i8>,
    sums: Vec<i32>,
    /// A row tile's raw sums over the block (`MR` rows, `ldo` apart).
    out: Vec<i32>,
    /// The block's output stretches ([`Taps::segments`]).
    segs: Vec<(usize, usize, usize)>,
    /// A requantised row ([`Sink::put_row`]).
    bytes: Vec<u8>,
}

/// The vector width the per-block loops (im2col rows, column sums, depthwise taps,
/// requantisation) are compiled for, picked at run time.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wide {
    Avx512,
    Avx2,
    Baseline,
}

fn wide_isa() -> Wide {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bw") {
            return Wide::Avx512;
        }
        if std::is_x86_feature_detected!("avx2") {
            return Wide::Avx2;
        }
    }
    Wide::Baseline
}

/// The sizes one run works with.
struct Dims {
    c: usize,
    m: usize,
    cg: usize,
    mg: usize,
    group: usize,
    ksize: usize,
    /// K of the GEMM: `C_g · k`, and its padding to whole groups of four.
    ckk: usize,
    /// Output pixels per image.
    p: usize,
    kp: usize,
    /// Pixels per block, the row stride of a row tile's sums (the block rounded up to a
    /// whole pair of panels), and blocks per image and group.
    nb: usize,
    ldo: usize,
    blocks: usize,
}

/// One run of a prepared integer conv, split into work items (image, group, pixel block).
struct Job<'a> {
    taps: &'a Taps,
    packs: &'a [PackedRows],
    sink: Sink,
    isa: IsaI8,
    /// Every image's channels, padded ([`Taps::pad_channel`]), and [`SLACK`] bytes.
    padded: &'a [u8],
    /// Direct mode: where row `r` of im2col starts in a group's padded channels.
    row_at: Vec<usize>,
    dims: Dims,
    /// The weight's zero point per output channel, shifted as its values were, and
    /// whether any is not 0 (then the blocks need their column sums).
    za: Vec<i32>,
    need_sums: bool,
    /// Whether the CPU has AVX-512F and BW (the wide panel transpose).
    avx512: bool,
    /// The input's zero point, shifted as its values are (to u8).
    zb: i32,
    depthwise: bool,
}

impl Job<'_> {
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx2")]
    unsafe fn items_avx512(&self, s: &mut Scratch, range: std::ops::Range<usize>) {
        self.items(s, range);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn items_avx2(&self, s: &mut Scratch, range: std::ops::Range<usize>) {
        self.items(s, range);
    }

    /// Work items `range`, in order.
    #[inline(always)]
    fn items(&self, s: &mut Scratch, range: std::ops::Range<usize>) {
        let Dims {
            c,
            m,
            cg,
            mg,
            group,
            ksize,
            ckk,
            p,
            kp,
            nb,
            ldo,
            blocks,
        } = self.dims;
        let (taps, sink, zb) = (&self.taps, &self.sink, self.zb);
        let chan = taps.chan;
        for item in range {
            let (ni, g, b) = (
                item / (group * blocks),
                item / blocks % group,
                item % blocks,
            );
            let (p0, p1) = (b * nb, ((b + 1) * nb).min(taps.pq));
            let np = p1 - p0;
            // The group's padded channels (and what lies past them: a panel's last
            // columns may read beyond the last place).
            let img = &self.padded[(ni * c + g * cg) * chan..];
            // Where the block's columns go: stretches of output pixels.
            taps.segments(p0, p1, &mut s.segs);
            if s.segs.is_empty() {
                continue;
            }
            let pack = &self.packs[g];
            if self.depthwise {
                // One output channel: Σ_taps (w - zw)·x' in i32 lanes, less
                // zx'·Σ_taps (w - zw) once (wrapping, so exactly the reference's sum).
                let acc = &mut s.sums[..np];
                acc.fill(0);
                let za = self.za[g];
                let mut wsum = 0i32;
                for ki in 0..ksize {
                    let wv = i32::from(pack.data[ki] as i8) - za;
                    wsum = wsum.wrapping_add(wv);
                    let row = &img[taps.offsets[ki] + p0..][..np];
                    for (a, &v) in acc.iter_mut().zip(row) {
                        *a = a.wrapping_add(wv.wrapping_mul(i32::from(v)));
                    }
                }
                let fix = Fix {
                    cols: 0,
                    row: zb.wrapping_mul(wsum),
                };
                // SAFETY: this item alone writes channel g of image ni at these pixels.
                unsafe { sink.put_row((ni, g), (m, p), acc, (acc, fix), &s.segs, &mut s.bytes) };
                continue;
            }
            // Column sums only where some weight zero point is not 0 (after the shift).
            let sums = self.need_sums.then_some(&mut s.sums[..]);
            let wide = self.avx512;
            panels_direct(img, &self.row_at, (p0, np, kp), &mut s.panels, sums, wide);
            let npanels = np.div_ceil(PANEL);
            // The tiles write straight into `out`'s rows, `ldo` apart.
            for rt in 0..pack.rows.div_ceil(MR) {
                let live = MR.min(pack.rows - rt * MR);
                let a_tile = &pack.data[rt * MR * kp..][..MR * kp];
                for t in (0..npanels).step_by(2) {
                    let two = t + 1 < npanels;
                    let panel = |t: usize| &s.panels[t * kp * PANEL..][..kp * PANEL];
                    gemm_i8::tile_panels(
                        self.isa,
                        (a_tile, Signs::SignedA),
                        kp,
                        panel(t),
                        two.then(|| panel(t + 1)),
                        &mut s.out[t * PANEL..],
                        ldo,
                    );
                }
                for r in 0..live {
                    let o = rt * MR + r;
                    // Σ(w-zw)(x-zx) = Σa'b' − za'·Σ_k b' − zb'·(Σ_k a' − K·za').
                    let za_o = self.za[g * mg + o];
                    let t_o = pack.sums[o].wrapping_sub((ckk as i32).wrapping_mul(za_o));
                    let fix = Fix {
                        cols: za_o,
                        row: zb.wrapping_mul(t_o),
                    };
                    let (row, cs) = (&s.out[r * ldo..][..np], &s.sums[..np]);
                    // SAFETY: this item alone writes these pixels of channel g·mg + o
                    // of image ni.
                    unsafe {
                        sink.put_row(
                            (ni, g * mg + o),
                            (m, p),
                            row,
                            (cs, fix),
                            &s.segs,
                            &mut s.bytes,
                        )
                    };
                }
            }
        }
    }
}

/// qlinear_conv's requantisation: per output channel the multiplier (each step rounded
/// to f32 as in the reference) and the bias; the output zero point and dtype.
struct Requant {
    mult: Vec<f64>,
    bias: Vec<i32>,
    z: f64,
    ydt: DType,
}

impl Requant {
    /// From qlinear_conv's inputs `ins` (x of dtype `xdt`, `m` output channels), or
    /// `None` for the forms the interpreter runs.
    fn of(ins: &[Option<&Tensor>], xdt: DType, m: usize) -> Option<Requant> {
        let arg = |i: usize| ins.get(i).copied().flatten();
        let (sx, sw, sy, zy) = (
            scale(arg(1)?, None)?,
            scale(arg(4)?, Some(m))?,
            scale(arg(6)?, None)?,
            arg(7),
        );
        let ydt = zy.map_or(xdt, Tensor::dtype);
        if !matches!(ydt, DType::I8 | DType::U8) || zy.is_some_and(|z| z.len() != 1) {
            return None;
        }
        // The scale and zero point of the weight must have one shape.
        if arg(5).is_some_and(|z| {
            z.shape() != arg(4).map_or(&[][..], Tensor::shape) && !(z.len() == 1 && sw.len() == 1)
        }) {
            return None;
        }
        let bias = match arg(8) {
            Some(b) if b.dtype() == DType::I32 && b.shape() == [m] => b.as_slice::<i32>()?.to_vec(),
            Some(_) => return None,
            None => vec![0; m],
        };
        let mult = (0..m)
            .map(|o| {
                let sxw = f64::from((sx[0] * sw[if sw.len() == 1 { 0 } else { o }]) as f32);
                f64::from((sxw / sy[0]) as f32)
            })
            .collect();
        let z = zy.map_or(0.0, |z| z.to_f64s()[0]);
        Some(Requant { mult, bias, z, ydt })
    }
}

impl PreparedConvI8 {
    /// Prepares `op` (`conv_integer` or `qlinear_conv`) with `attrs`; `w` is packed now
    /// when it is a constant.
    pub fn new(op: OpKind, attrs: &Attrs, w: Option<&Tensor>) -> Option<Self> {
        if !matches!(op, OpKind::ConvInteger | OpKind::QLinearConv) {
            return None;
        }
        let packed = w.and_then(|w| Some((w.shape().to_vec(), pack_groups(w, group_of(attrs))?)));
        Some(PreparedConvI8 {
            op,
            attrs: attrs.clone(),
            packed,
            padded: std::sync::Mutex::new(Vec::new()),
            isa: IsaI8::Auto,
            taps: std::sync::Mutex::new(None),
        })
    }

    /// The same node on the integer GEMM kernel `isa` (narrower kernels for tests; a
    /// kernel this CPU lacks makes `run` return `None`).
    pub fn with_isa(mut self, isa: IsaI8) -> Self {
        self.isa = isa;
        self
    }

    /// Whether the weight was packed at prepare time.
    pub fn has_weights(&self) -> bool {
        self.packed.is_some()
    }

    /// The node's output on `ins` (in ONNX's input order), in its planned region of `out`
    /// where it has one, or `None` where the interpreter runs it.
    pub fn run(
        &self,
        ins: &[Option<&Tensor>],
        pool: &Pool,
        out: &mut Outputs,
    ) -> Option<Result<Tensor, String>> {
        let arg = |i: usize| ins.get(i).copied().flatten();
        let q = self.op == OpKind::QLinearConv;
        let (x, w) = if q {
            (arg(0)?, arg(3)?)
        } else {
            (arg(0)?, arg(1)?)
        };
        // The operands; qlinear_conv's scales are read by `Requant::of`.
        let (zx, zw) = if q {
            (arg(2), arg(5))
        } else {
            (arg(2), arg(3))
        };
        let (xs, ws) = (x.shape(), w.shape());
        let geo = conv_geometry(&self.attrs, xs, ws).ok()?;
        let (n, c, m) = (xs[0], xs[1], ws[0]);
        let group = geo.group;
        let (cg, mg) = (c / group, m / group);
        let ksize: usize = geo.kernel.iter().product();
        let (ckk, p) = (cg * ksize, geo.out.iter().product::<usize>());
        if ckk == 0 || p == 0 || mg == 0 || n == 0 {
            return None;
        }
        let (xbytes, xsigned) = raw(x)?;
        raw(w)?;
        let zx = zero_point(zx, x, None)?[0];
        let zw = zero_point(zw, w, Some(m))?;
        let mut shape = vec![n, m];
        shape.extend_from_slice(&geo.out);
        let requant = if q {
            Some(Requant::of(ins, x.dtype(), m)?)
        } else {
            None
        };
        let here;
        let packs = match &self.packed {
            Some((shape, packs)) if shape == ws && packs.len() == group => packs,
            _ => {
                here = pack_groups(w, group)?;
                &here
            }
        };
        let isa = self.isa.resolve()?;
        // The taps depend on the shapes alone: kept for the last shapes seen.
        let taps = {
            let mut cached = self.taps.lock().unwrap_or_else(|e| e.into_inner());
            match cached.as_ref().filter(|(x, w, _)| x == xs && w == ws) {
                Some((_, _, t)) => t.clone(),
                None => {
                    let t = std::sync::Arc::new(Taps::new(&geo, xs));
                    *cached = Some((xs.to_vec(), ws.to_vec(), t.clone()));
                    t
                }
            }
        };
        let taps = &*taps;
        let flip = if xsigned { 0x80u8 } else { 0 };
        // The vector loops go no wider than the GEMM kernel asked for.
        let wide = match isa {
            IsaI8::Avx512Vnni => wide_isa(),
            IsaI8::Avx2 if wide_isa() != Wide::Baseline => Wide::Avx2,
            _ => Wide::Baseline,
        };
        // The input once more, padded with its zero point and flipped to B's u8 values.
        let mut padded =
            std::mem::take(&mut *self.padded.lock().unwrap_or_else(|e| e.into_inner()));
        taps.pad_input((xbytes, xs, zx as u8, flip), wide, pool, &mut padded);
        let depthwise = cg == 1 && mg == 1;
        let kp = if depthwise {
            ksize
        } else {
            ckk.div_ceil(4) * 4
        };
        // Pixels per block: a multiple of two panels, the block's bytes near BLOCK_BYTES,
        // and enough blocks to keep every thread busy.
        let target = if depthwise {
            DEPTHWISE_BLOCK
        } else {
            (BLOCK_BYTES / kp / (2 * PANEL)).clamp(1, MAX_BLOCK / (2 * PANEL)) * 2 * PANEL
        };
        let domain = taps.pq;
        let want_blocks = (4 * pool.threads()).div_ceil(n * group);
        let nb = target
            .min(domain.div_ceil(want_blocks).div_ceil(2 * PANEL) * 2 * PANEL)
            .max(2 * PANEL);
        let nbp = nb.div_ceil(PANEL) * PANEL;
        let ldo = nbp.div_ceil(2 * PANEL) * 2 * PANEL;
        let blocks = domain.div_ceil(nb);
        // The integer identity behind the corrections, per output channel o and pixel j
        // (a' = w as i8, −128 for a u8 weight; b' = x as u8, +128 for an i8 input; each
        // side's zero point shifted alike):
        // Σ(w-zw)(x-zx) = Σa'b' − za'·Σ_k b' − zb'·(Σ_k a' − K·za').
        // Symmetric i8 weights (za' = 0 for every channel) need no column sums.
        let zb = zx + if xsigned { 128 } else { 0 };
        let za: Vec<i32> = (0..m)
            .map(|o| zw[if zw.len() == 1 { 0 } else { o }] + packs[o / mg].shift)
            .collect();
        let len = n * m * p;
        // The output: its planned region (stale values) or fresh memory; every element is
        // written below.
        fn buf<T: kiln_ir::tensor::Elem + Default>(
            out: &mut Outputs,
            len: usize,
        ) -> kiln_ir::buf::Buf<T> {
            out.region::<T>(0, len)
                .unwrap_or_else(|| vec![T::default(); len].into())
        }
        let (mut out_i32, mut out_u8, mut out_i8) = Default::default();
        let sink = match &requant {
            None => {
                out_i32 = buf::<i32>(out, len);
                Sink::I32(Out(out_i32.as_mut_slice().as_mut_ptr()))
            }
            Some(Requant { mult, z, ydt, bias }) => {
                // The sink writes bytes; an i8 output is written through its bytes.
                let out = if *ydt == DType::I8 {
                    out_i8 = buf::<i8>(out, len);
                    out_i8.as_mut_slice().as_mut_ptr().cast::<u8>()
                } else {
                    out_u8 = buf::<u8>(out, len);
                    out_u8.as_mut_slice().as_mut_ptr()
                };
                let (lo, hi) = if *ydt == DType::I8 {
                    (-128.0, 127.0)
                } else {
                    (0.0, 255.0)
                };
                Sink::Q8 {
                    avx512: wide == Wide::Avx512,
                    out: Out(out),
                    mult: mult.clone(),
                    bias: bias.clone(),
                    z: *z,
                    lo,
                    hi,
                }
            }
        };
        let row_at = (0..ckk)
            .map(|r| r / ksize * taps.chan + taps.offsets[r % ksize])
            .collect();
        let job = Job {
            taps,
            packs,
            sink,
            isa,
            padded: &padded,
            row_at,
            dims: Dims {
                c,
                m,
                cg,
                mg,
                group,
                ksize,
                ckk,
                p,
                kp,
                nb,
                ldo,
                blocks,
            },
            need_sums: za.iter().any(|&z| z != 0),
            avx512: wide == Wide::Avx512,
            za,
            zb,
            depthwise,
        };
        pool.parallel_ranges(n * group * blocks, |range| {
            let mut s = Scratch {
                panels: vec![0i8; if depthwise { 0 } else { kp * nbp }],
                sums: vec![0i32; nbp],
                out: vec![0i32; if depthwise { 0 } else { MR * ldo }],
                segs: Vec::new(),
                bytes: Vec::new(),
            };
            match wide {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `wide_isa` found these features on this CPU.
                Wide::Avx512 => unsafe { job.items_avx512(&mut s, range) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above.
                Wide::Avx2 => unsafe { job.items_avx2(&mut s, range) },
                _ => job.items(&mut s, range),
            }
        });
        *self.padded.lock().unwrap_or_else(|e| e.into_inner()) = padded;
        let Some(Requant { ydt, .. }) = requant else {
            return Some(Ok(Tensor::from_buf(shape, out_i32)));
        };
        Some(Ok(if ydt == DType::I8 {
            Tensor::from_buf(shape, out_i8)
        } else {
            Tensor::from_buf(shape, out_u8)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::Attr;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// The integer kernels this CPU runs (every one of them down to the portable loops).
    fn isas() -> Vec<IsaI8> {
        [IsaI8::Avx512Vnni, IsaI8::Avx2, IsaI8::Portable]
            .into_iter()
            .filter(|i| i.resolve().is_some())
            .collect()
    }

    fn t8(rng: &mut StdRng, shape: &[usize], signed: bool) -> Tensor {
        let n: usize = shape.iter().product();
        if signed {
            Tensor::from_vec(shape.to_vec(), (0..n).map(|_| rng.gen::<i8>()).collect())
        } else {
            Tensor::from_vec(shape.to_vec(), (0..n).map(|_| rng.gen::<u8>()).collect())
        }
    }

    #[test]
    fn round_even_is_round_ties_even_below_two_to_the_51() {
        let mut rng = StdRng::seed_from_u64(3);
        let ties = [
            0.5,
            1.5,
            2.5,
            -0.5,
            -1.5,
            -2.5,
            0.0,
            -0.0,
            3.49999,
            1e15 + 0.5,
            -1e15 - 0.5,
        ];
        let random = (0..10_000).map(|_| rng.gen_range(-1e6f64..1e6));
        for v in ties.into_iter().chain(random) {
            assert_eq!(round_even(v), v.round_ties_even(), "{v}");
        }
    }

    /// Random 1-D to 3-D geometries (groups, strides, dilations, pads, auto_pad), u8 and i8
    /// operands, zero points per tensor or per channel: both ops equal the interpreter's
    /// output element for element, with the weight packed at prepare time or per call.
    #[test]
    fn integer_convs_equal_the_interpreter_on_random_geometries() {
        let pools = [Pool::single(), Pool::new(3).unwrap()];
        let mut checked = 0;
        for seed in [1u64, 2, 3, 4] {
            let mut rng = StdRng::seed_from_u64(seed);
            for i in 0..40 {
                let nsp = [1, 2, 2, 3][rng.gen_range(0..4)];
                let group = if i % 3 == 0 { rng.gen_range(2..4) } else { 1 };
                let (cg, mg) = (rng.gen_range(1..5), rng.gen_range(1..9));
                let k: Vec<usize> = (0..nsp).map(|_| rng.gen_range(1..4)).collect();
                let side = if nsp == 3 { 6 } else { 12 };
                let spatial: Vec<usize> = (0..nsp).map(|_| rng.gen_range(1..side)).collect();
                let mut attrs = Attrs::new().with("group", Attr::Int(group as i64)).with(
                    "strides",
                    Attr::Ints((0..nsp).map(|_| rng.gen_range(1..3)).collect()),
                );
                if rng.gen_bool(0.3) {
                    let ap = ["SAME_UPPER", "SAME_LOWER", "VALID"][rng.gen_range(0..3)];
                    attrs = attrs.with("auto_pad", Attr::Str(ap.into()));
                } else {
                    attrs = attrs
                        .with(
                            "pads",
                            Attr::Ints((0..2 * nsp).map(|_| rng.gen_range(0..3)).collect()),
                        )
                        .with(
                            "dilations",
                            Attr::Ints((0..nsp).map(|_| rng.gen_range(1..3)).collect()),
                        );
                }
                let (sx, sw, sy) = (rng.gen_bool(0.5), rng.gen_bool(0.5), rng.gen_bool(0.5));
                let mut xs = vec![rng.gen_range(1..3), cg * group];
                xs.extend(&spatial);
                let m = mg * group;
                let mut ws = vec![m, cg];
                ws.extend(&k);
                let x = t8(&mut rng, &xs, sx);
                let w = t8(&mut rng, &ws, sw);
                let zx = t8(&mut rng, &[], sx);
                let zw_shape = if rng.gen_bool(0.5) { vec![m] } else { vec![] };
                let zw = t8(&mut rng, &zw_shape, sw);
                let x_scale = Tensor::scalar(rng.gen_range(0.001f32..0.05));
                let w_scale = if zw_shape.is_empty() {
                    Tensor::scalar(rng.gen_range(0.001f32..0.05))
                } else {
                    Tensor::from_vec(
                        vec![m],
                        (0..m).map(|_| rng.gen_range(0.001f32..0.05)).collect(),
                    )
                };
                let y_scale = Tensor::scalar([0.0005f32, 0.01, 0.2][rng.gen_range(0..3)]);
                let zy = t8(&mut rng, &[], sy);
                let bias = Tensor::from_vec(
                    vec![m],
                    (0..m).map(|_| rng.gen_range(-3000i32..3000)).collect(),
                );
                let int_ins = vec![Some(&x), Some(&w), Some(&zx), Some(&zw)];
                let mut q_ins = vec![
                    Some(&x),
                    Some(&x_scale),
                    Some(&zx),
                    Some(&w),
                    Some(&w_scale),
                    Some(&zw),
                    Some(&y_scale),
                    Some(&zy),
                ];
                if rng.gen_bool(0.5) {
                    q_ins.push(Some(&bias));
                }
                for (op, ins, wi) in [
                    (OpKind::ConvInteger, &int_ins, 1),
                    (OpKind::QLinearConv, &q_ins, 3),
                ] {
                    let want = kiln_ir::ops::eval(op, &attrs, ins);
                    let runs = pools
                        .iter()
                        .flat_map(|p| isas().into_iter().map(move |i| (p, i)));
                    for (pool, isa) in runs {
                        for constant in [false, true] {
                            let pc = PreparedConvI8::new(
                                op,
                                &attrs,
                                constant.then_some(ins[wi].unwrap()),
                            )
                            .unwrap()
                            .with_isa(isa);
                            assert_eq!(pc.has_weights(), constant);
                            match (pc.run(ins, pool, &mut Outputs::none()), &want) {
                                (Some(Ok(got)), Ok(want)) => {
                                    assert_eq!(got, want[0], "seed {seed} case {i} {op:?} x {xs:?} w {ws:?} {attrs:?}");
                                    checked += 1;
                                }
                                (None, _) => {}
                                (got, want) => panic!("seed {seed} case {i} {op:?}: native {got:?}, interpreter {want:?}"),
                            }
                        }
                    }
                }
            }
        }
        assert!(checked > 400, "{checked}");
    }

    /// Many channels (several row tiles of the weight, long rows of im2col), blocks that
    /// cross output rows, depthwise convs and channel multipliers, 1×1 and strided 1-D:
    /// qlinear_conv with per-channel weights equals the interpreter at 1 and 3 threads.
    #[test]
    fn wide_depthwise_and_pointwise_convs_equal_the_interpreter() {
        let pools = [Pool::single(), Pool::new(3).unwrap()];
        let mut rng = StdRng::seed_from_u64(11);
        // (x shape, weight shape, group, strides, pads, dilations)
        #[allow(clippy::type_complexity)]
        #[rustfmt::skip]
        let cases: [(&[usize], &[usize], i64, &[i64], &[i64], &[i64]); 7] = [
            (&[1, 24, 19, 23], &[40, 24, 3, 3], 1, &[1, 1], &[1, 1, 1, 1], &[1, 1]),
            (&[2, 16, 17, 17], &[33, 16, 3, 3], 1, &[2, 2], &[1, 0, 2, 1], &[1, 1]),
            (&[1, 32, 21, 20], &[32, 1, 3, 3], 32, &[1, 1], &[1, 1, 1, 1], &[1, 1]),
            (&[1, 12, 15, 15], &[12, 1, 5, 5], 12, &[2, 2], &[2, 2, 2, 2], &[1, 1]),
            (&[1, 8, 13, 13], &[16, 1, 3, 3], 8, &[1, 1], &[2, 2, 2, 2], &[2, 2]),
            (&[1, 64, 9, 11], &[48, 64, 1, 1], 1, &[1, 1], &[0, 0, 0, 0], &[1, 1]),
            (&[2, 20, 300], &[24, 10, 7], 2, &[3], &[3, 3], &[1]),
        ];
        for (xs, ws, group, strides, pads, dil) in cases {
            let attrs = Attrs::new()
                .with("group", Attr::Int(group))
                .with("strides", Attr::Ints(strides.to_vec()))
                .with("pads", Attr::Ints(pads.to_vec()))
                .with("dilations", Attr::Ints(dil.to_vec()));
            let m = ws[0];
            for (sx, sw) in [(false, true), (true, true), (false, false)] {
                let x = t8(&mut rng, xs, sx);
                let w = t8(&mut rng, ws, sw);
                let zx = t8(&mut rng, &[], sx);
                // Symmetric i8 weights (zero point 0: no column sums) as quantisers
                // make them, and random zero points.
                let zw = if sw && !sx {
                    Tensor::from_vec(vec![m], vec![0i8; m])
                } else {
                    t8(&mut rng, &[m], sw)
                };
                let x_scale = Tensor::scalar(0.02f32);
                let w_scale = Tensor::from_vec(
                    vec![m],
                    (0..m).map(|_| rng.gen_range(0.001f32..0.01)).collect(),
                );
                let (y_scale, zy) = (Tensor::scalar(0.3f32), t8(&mut rng, &[], sx != sw));
                let bias = Tensor::from_vec(
                    vec![m],
                    (0..m).map(|_| rng.gen_range(-3000i32..3000)).collect(),
                );
                let ins = [&x, &x_scale, &zx, &w, &w_scale, &zw, &y_scale, &zy, &bias].map(Some);
                let want = kiln_ir::ops::eval(OpKind::QLinearConv, &attrs, &ins).unwrap();
                let int_ins = [&x, &w, &zx, &zw].map(Some);
                let want_i = kiln_ir::ops::eval(OpKind::ConvInteger, &attrs, &int_ins).unwrap();
                for pool in &pools {
                    for isa in isas() {
                        let what = format!("x {xs:?} w {ws:?} signed {sx} {sw} {isa:?}");
                        let pc = PreparedConvI8::new(OpKind::QLinearConv, &attrs, Some(&w))
                            .unwrap()
                            .with_isa(isa);
                        let got = pc.run(&ins, pool, &mut Outputs::none()).unwrap().unwrap();
                        assert_eq!(got, want[0], "{what}");
                        let pc = PreparedConvI8::new(OpKind::ConvInteger, &attrs, None)
                            .unwrap()
                            .with_isa(isa);
                        let got = pc
                            .run(&int_ins, pool, &mut Outputs::none())
                            .unwrap()
                            .unwrap();
                        assert_eq!(got, want_i[0], "{what}");
                    }
                }
            }
        }
    }

    /// One prepared node run on inputs of changing spatial sizes (symbolic dims) keeps
    /// equal to the interpreter: what it keeps per shape follows the shapes.
    #[test]
    fn a_prepared_conv_follows_changing_input_shapes() {
        let mut rng = StdRng::seed_from_u64(5);
        let attrs = Attrs::new()
            .with("strides", Attr::Ints(vec![2, 1]))
            .with("pads", Attr::Ints(vec![1, 1, 1, 1]));
        let w = t8(&mut rng, &[8, 4, 3, 3], true);
        let zx = t8(&mut rng, &[], false);
        let pc = PreparedConvI8::new(OpKind::ConvInteger, &attrs, Some(&w)).unwrap();
        let pool = Pool::single();
        for (h, wd) in [(9, 13), (16, 5), (9, 13), (1, 1)] {
            let x = t8(&mut rng, &[1, 4, h, wd], false);
            let ins = [&x, &w, &zx].map(Some);
            let want = kiln_ir::ops::eval(OpKind::ConvInteger, &attrs, &ins).unwrap();
            let got = pc.run(&ins, &pool, &mut Outputs::none()).unwrap().unwrap();
            assert_eq!(got, want[0], "{h}×{wd}");
        }
    }
}
