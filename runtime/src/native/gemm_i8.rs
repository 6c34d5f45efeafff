//! The exact 8-bit integer GEMM behind `matmul_integer`: `C[m×n] = (A - za)·(B - zb)` in
//! i32, A and B each u8 or i8, the zero point of A per tensor or per row, that of B per
//! tensor or per column. The result equals the interpreter's bit for bit (both wrap in 32
//! bits).
//!
//! Every path multiplies u8 by i8 (A shifted by +128 when it is i8, B by -128 when it is
//! u8, the zero points shifted alike) without the zero points, then corrects:
//! `Σ(a-za)(b-zb) = Σab - za·Σ_k b - zb·Σ_k a + K·za·zb`, in wrapping i32 arithmetic.
//! B is packed once ([`PackedB8`]: panels of 16 columns, each column's k values in groups
//! of four bytes, the `vpdpbusd` operand layout) with its column sums.
//!
//! Kernels, picked at run time ([`IsaI8::Auto`]):
//! - AVX-512 VNNI: `vpdpbusd` (u8 × i8, four products summed into an i32, no saturation:
//!   `4·255·128 < 2³¹`), an 8-row × 32-column tile in 16 zmm accumulators;
//! - AVX2: bytes widened to i16 (A zero-extended, B sign-extended) and `vpmaddwd`, whose
//!   pair sums (at most `2·255·128`) cannot saturate (unlike `vpmaddubsw`'s i16 sums);
//!   a 4-row × 16-column tile;
//! - portable: the same loops in scalar i32.

use crate::pool::Pool;

/// Columns per packed panel of B.
pub const PANEL: usize = 16;
/// Rows per register tile (A's run-time copy is padded to a multiple of it).
pub const MR: usize = 8;

/// Which operand of a register tile holds the signed bytes: the GEMM's own layout (A u8,
/// B i8), or the integer convolutions' (A the i8 weights, B the u8 activations), which
/// lets their symmetric weights (zero point 0) skip the column sums of B.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signs {
    /// A's bytes are u8, B's i8.
    UnsignedA,
    /// A's bytes are i8, B's u8.
    SignedA,
}

/// Which kernel runs the integer GEMM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IsaI8 {
    /// The best the running CPU has: AVX-512 VNNI, else AVX2, else portable.
    #[default]
    Auto,
    /// `vpdpbusd` on zmm (needs AVX-512F, BW and VNNI).
    Avx512Vnni,
    /// `vpmaddwd` on widened bytes (needs AVX2).
    Avx2,
    /// Scalar.
    Portable,
}

impl IsaI8 {
    /// The kernel `self` resolves to on this CPU, or `None` when it lacks the features.
    pub fn resolve(self) -> Option<IsaI8> {
        let vnni = vnni_available();
        let avx2 = avx2_available();
        match self {
            IsaI8::Auto if vnni => Some(IsaI8::Avx512Vnni),
            IsaI8::Auto if avx2 => Some(IsaI8::Avx2),
            IsaI8::Auto | IsaI8::Portable => Some(IsaI8::Portable),
            IsaI8::Avx512Vnni => vnni.then_some(self),
            IsaI8::Avx2 => avx2.then_some(self),
        }
    }
}

fn vnni_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn avx2_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// An 8-bit matrix operand: its elements and whether they are signed.
#[derive(Clone, Copy, Debug)]
pub enum Bytes<'a> {
    /// Unsigned bytes.
    U8(&'a [u8]),
    /// Signed bytes.
    I8(&'a [i8]),
}

impl Bytes<'_> {
    fn len(&self) -> usize {
        match self {
            Bytes::U8(v) => v.len(),
            Bytes::I8(v) => v.len(),
        }
    }
}

/// Errors of the integer GEMM (shapes that do not fit; never a wrong answer).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GemmI8Error {
    /// An operand's length or a zero point's length does not match the dims.
    #[error("integer GEMM: {0}")]
    Shape(String),
}

/// B[k×n] packed for the integer kernels: B shifted to i8, in panels of [`PANEL`] columns
/// (zero-padded), each panel `kq = ⌈k/4⌉` groups of `PANEL × 4` bytes (column-major within
/// a group: the four k values of column 0, then of column 1, ...).
#[derive(Clone, Debug)]
pub struct PackedB8 {
    k: usize,
    n: usize,
    kq: usize,
    /// What was subtracted from B's values (128 for u8, 0 for i8).
    shift: i32,
    data: Vec<i8>,
    /// `Σ_k b'[k][j]` of the shifted values.
    col_sums: Vec<i32>,
}

impl PackedB8 {
    /// Packs a row-major `k × n` matrix.
    pub fn pack(b: Bytes<'_>, k: usize, n: usize) -> Result<PackedB8, GemmI8Error> {
        if b.len() != k * n {
            return Err(GemmI8Error::Shape(format!(
                "B has {} elements, not {k}×{n}",
                b.len()
            )));
        }
        let (shift, get): (i32, Box<dyn Fn(usize) -> i8 + '_>) = match b {
            Bytes::U8(v) => (128, Box::new(move |i| (v[i] as i32 - 128) as i8)),
            Bytes::I8(v) => (0, Box::new(move |i| v[i])),
        };
        let kq = k.div_ceil(4);
        let panels = n.div_ceil(PANEL);
        let mut data = vec![0i8; panels * kq * PANEL * 4];
        let mut col_sums = vec![0i32; n];
        for p in 0..panels {
            for q in 0..kq {
                let group = &mut data[(p * kq + q) * PANEL * 4..][..PANEL * 4];
                for c in 0..PANEL {
                    let j = p * PANEL + c;
                    if j >= n {
                        break;
                    }
                    for d in 0..4 {
                        let kk = q * 4 + d;
                        if kk < k {
                            let v = get(kk * n + j);
                            group[c * 4 + d] = v;
                            col_sums[j] = col_sums[j].wrapping_add(v as i32);
                        }
                    }
                }
            }
        }
        Ok(PackedB8 {
            k,
            n,
            kq,
            shift,
            data,
            col_sums,
        })
    }

    /// Rows (K).
    pub fn rows(&self) -> usize {
        self.k
    }

    /// Columns (N).
    pub fn cols(&self) -> usize {
        self.n
    }

    fn panel(&self, p: usize) -> &[i8] {
        &self.data[p * self.kq * PANEL * 4..][..self.kq * PANEL * 4]
    }
}

/// `c = (a - za)·(b - zb)` for a row-major `m × k` A; `za` has 1 or `m` values, `zb` 1 or
/// `n` (in A's and B's own value ranges); `c` is row-major `m × n`. Row blocks run in
/// parallel on `pool`.
#[allow(clippy::too_many_arguments)] // operands, zero points, output, pool, ISA: each is needed
pub fn matmul_integer(
    a: Bytes<'_>,
    m: usize,
    za: &[i32],
    b: &PackedB8,
    zb: &[i32],
    c: &mut [i32],
    pool: &Pool,
    isa: IsaI8,
) -> Result<(), GemmI8Error> {
    let n = b.n;
    if c.len() != m * n {
        return Err(GemmI8Error::Shape(format!(
            "C has {} elements, not {m}×{n}",
            c.len()
        )));
    }
    let out = SharedI32(c.as_mut_ptr());
    run(a, m, za, b, zb, pool, isa, |i, j, v: &[i32]| {
        // SAFETY: row i < m, columns j..j + v.len() <= n, inside the m·n checked above;
        // written only by the tile owning row i.
        let dst = unsafe { std::slice::from_raw_parts_mut(out.get().add(i * n + j), v.len()) };
        dst.copy_from_slice(v);
    })
}

/// [`matmul_integer`] with a dequantising epilogue: `c = f32((a - za)·(b - zb)) · scale +
/// bias`, each element rounded to f32 at each step as a `cast`, `mul` and `add` would
/// (`scale` has 1 or `n` values, `bias` 0, 1 or `n`). Nothing in i32 is stored.
#[allow(clippy::too_many_arguments)] // as for `matmul_integer`, plus the epilogue's vectors
pub fn matmul_integer_scaled(
    a: Bytes<'_>,
    m: usize,
    za: &[i32],
    b: &PackedB8,
    zb: &[i32],
    scale: &[f32],
    bias: &[f32],
    c: &mut [std::mem::MaybeUninit<f32>],
    pool: &Pool,
    isa: IsaI8,
) -> Result<(), GemmI8Error> {
    let n = b.n;
    if c.len() != m * n {
        return Err(GemmI8Error::Shape(format!(
            "C has {} elements, not {m}×{n}",
            c.len()
        )));
    }
    if !(scale.len() == 1 || scale.len() == n) || !(bias.len() <= 1 || bias.len() == n) {
        return Err(GemmI8Error::Shape(format!(
            "a scale of {} and a bias of {} values for {n} columns",
            scale.len(),
            bias.len()
        )));
    }
    // One value per column (a single value repeated), so each segment is lane arithmetic.
    let per_col = |v: &[f32]| -> Vec<f32> {
        (0..n)
            .map(|j| v[if v.len() == 1 { 0 } else { j }])
            .collect()
    };
    let (scale, bias) = (
        per_col(scale),
        if bias.is_empty() {
            vec![]
        } else {
            per_col(bias)
        },
    );
    let out = SharedF32(c.as_mut_ptr().cast());
    let emit = |i: usize, j: usize, v: &[i32]| {
        // SAFETY: as in `matmul_integer`: row i < m, columns j..j + v.len() <= n, written
        // by the tile owning row i (f32 has MaybeUninit<f32>'s layout).
        let dst = unsafe { std::slice::from_raw_parts_mut(out.get().add(i * n + j), v.len()) };
        let s = &scale[j..j + v.len()];
        if bias.is_empty() {
            for ((y, &x), &s) in dst.iter_mut().zip(v).zip(s) {
                *y = x as f32 * s;
            }
        } else {
            // The product rounded, then the sum rounded: the mul and add it replaces.
            let bb = &bias[j..j + v.len()];
            for (((y, &x), &s), &b) in dst.iter_mut().zip(v).zip(s).zip(bb) {
                *y = x as f32 * s + b;
            }
        }
    };
    run(a, m, za, b, zb, pool, isa, emit)
}

/// The integer GEMM, handing each finished row segment `(row, first column, values)` to
/// `emit` (from the pool's threads; each element once).
#[allow(clippy::too_many_arguments)] // as for `matmul_integer`
fn run(
    a: Bytes<'_>,
    m: usize,
    za: &[i32],
    b: &PackedB8,
    zb: &[i32],
    pool: &Pool,
    isa: IsaI8,
    emit: impl Fn(usize, usize, &[i32]) + Sync,
) -> Result<(), GemmI8Error> {
    let (k, n) = (b.k, b.n);
    let bad = |what: String| Err(GemmI8Error::Shape(what));
    if a.len() != m * k {
        return bad(format!("A has {} elements, not {m}×{k}", a.len()));
    }
    if !(za.len() == 1 || za.len() == m) || !(zb.len() == 1 || zb.len() == n) {
        return bad(format!(
            "zero points of {} and {} values for {m} rows and {n} columns",
            za.len(),
            zb.len()
        ));
    }
    let isa = isa
        .resolve()
        .ok_or_else(|| GemmI8Error::Shape(format!("{isa:?} is not available on this CPU")))?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    // A shifted to u8, rows padded to 4·kq bytes and the row count to a multiple of MR.
    let (a_shift, kp) = (if matches!(a, Bytes::I8(_)) { 128 } else { 0 }, b.kq * 4);
    let mp = m.div_ceil(MR) * MR;
    let mut ap = vec![0u8; mp * kp];
    let mut row_sums = vec![0i32; m];
    for i in 0..m {
        let row = &mut ap[i * kp..][..k];
        match a {
            Bytes::U8(v) => row.copy_from_slice(&v[i * k..][..k]),
            Bytes::I8(v) => {
                for (d, &s) in row.iter_mut().zip(&v[i * k..][..k]) {
                    *d = (s as u8) ^ 0x80;
                }
            }
        }
        row_sums[i] = row.iter().map(|&x| x as i32).sum();
    }
    let kk = k as i32;
    let tiles = mp / MR;
    // B's zero point per column, shifted as B was (one vector, so the corrections below
    // are plain lane arithmetic).
    let zbs: Vec<i32> = (0..n)
        .map(|j| zb[if zb.len() == 1 { 0 } else { j }].wrapping_sub(b.shift))
        .collect();
    let (ap, row_sums, zbs, emit) = (&ap, &row_sums, &zbs, &emit);
    pool.parallel_ranges(tiles, |range| {
        let mut acc = [0i32; MR * PANEL * 2];
        let mut row = [0i32; PANEL * 2];
        for t in range {
            let r0 = t * MR;
            let a_tile = &ap[r0 * kp..][..MR * kp];
            let mut p = 0;
            let panels = n.div_ceil(PANEL);
            while p < panels {
                let two = p + 1 < panels;
                let width = if two { 2 } else { 1 };
                tile(isa, a_tile, kp, b, p, two, &mut acc);
                // Corrections of the valid rows and columns, a row segment at a time:
                // Σ(a-za)(b-zb) = Σab - za·Σb - zb·(Σa - K·za), in wrapping i32.
                let j0 = p * PANEL;
                let w = (width * PANEL).min(n - j0);
                let (cs, zj) = (&b.col_sums[j0..j0 + w], &zbs[j0..j0 + w]);
                for r in 0..MR.min(m - r0) {
                    let i = r0 + r;
                    let za_i = za[if za.len() == 1 { 0 } else { i }].wrapping_add(a_shift);
                    let t_i = row_sums[i].wrapping_sub(kk.wrapping_mul(za_i));
                    let a_row = &acc[r * PANEL * 2..][..w];
                    for (((o, &x), &c), &z) in row[..w].iter_mut().zip(a_row).zip(cs).zip(zj) {
                        *o = x
                            .wrapping_sub(za_i.wrapping_mul(c))
                            .wrapping_sub(z.wrapping_mul(t_i));
                    }
                    emit(i, j0, &row[..w]);
                }
                p += width;
            }
        }
    });
    Ok(())
}

/// A raw pointer to C shared by the row tiles, which write disjoint rows.
#[derive(Clone, Copy)]
struct SharedI32(*mut i32);
// SAFETY: each tile writes only its own rows of C.
unsafe impl Send for SharedI32 {}
// SAFETY: as above.
unsafe impl Sync for SharedI32 {}
impl SharedI32 {
    fn get(self) -> *mut i32 {
        self.0
    }
}

/// A raw pointer to the f32 C of [`matmul_integer_scaled`] (disjoint rows per tile).
#[derive(Clone, Copy)]
struct SharedF32(*mut f32);
// SAFETY: each tile writes only its own rows of C.
unsafe impl Send for SharedF32 {}
// SAFETY: as above.
unsafe impl Sync for SharedF32 {}
impl SharedF32 {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// The raw u8×i8 products of an `MR`-row A tile (`kp` bytes per row) with panel `p` (and
/// `p + 1` when `two`) into `acc` (`MR × 2·PANEL`, row-major).
fn tile(isa: IsaI8, a: &[u8], kp: usize, b: &PackedB8, p: usize, two: bool, acc: &mut [i32]) {
    let b1 = two.then(|| b.panel(p + 1));
    tile_panels(
        isa,
        (a, Signs::UnsignedA),
        kp,
        b.panel(p),
        b1,
        acc,
        PANEL * 2,
    );
}

/// The raw u8×i8 products of an `MR`-row A tile (`kp = 4·kq` bytes per row; which side
/// is signed is `signs`) with one or two panels in [`PackedB8`]'s layout (`kq` groups of `PANEL × 4` i8 each) into `acc`
/// (`MR` rows of `2·PANEL` i32, `ldc` apart; without `b1` the second half of each row may
/// be overwritten with values to ignore). For callers that pack B themselves, block by
/// block (the integer convolutions); `isa` must come from [`IsaI8::resolve`].
pub fn tile_panels(
    isa: IsaI8,
    (a, signs): (&[u8], Signs),
    kp: usize,
    b0: &[i8],
    b1: Option<&[i8]>,
    acc: &mut [i32],
    ldc: usize,
) {
    assert!(
        kp.is_multiple_of(4)
            && a.len() >= MR * kp
            && b0.len() >= kp * PANEL
            && b1.is_none_or(|b| b.len() >= kp * PANEL)
            && ldc >= PANEL * 2
            && acc.len() >= (MR - 1) * ldc + PANEL * 2,
        "integer GEMM tile: operand sizes"
    );
    let two = b1.is_some();
    let b1 = b1.unwrap_or(b0);
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `resolve` returned this kernel only where the CPU has its features; the
        // slices hold `MR·kp` and `kq·PANEL·4` bytes, and `acc` its rows (asserted above).
        IsaI8::Avx512Vnni => unsafe {
            match signs {
                Signs::UnsignedA => x86::vnni_tile::<false>(a, kp, b0, b1, acc, ldc),
                Signs::SignedA => x86::vnni_tile::<true>(a, kp, b0, b1, acc, ldc),
            }
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, AVX2.
        IsaI8::Avx2 => unsafe {
            let mut at = |b, off| match signs {
                Signs::UnsignedA => x86::avx2_tile_at::<false>(a, kp, b, acc, (off, ldc)),
                Signs::SignedA => x86::avx2_tile_at::<true>(a, kp, b, acc, (off, ldc)),
            };
            at(b0, 0);
            if two {
                at(b1, PANEL);
            }
        },
        _ => {
            portable_tile((a, signs), kp, b0, acc, (0, ldc));
            if two {
                portable_tile((a, signs), kp, b1, acc, (PANEL, ldc));
            }
        }
    }
}

/// Scalar reference of one tile: `acc[r·ldc + off + c] = Σ a[r][k]·panel[k][c]`.
fn portable_tile(
    (a, signs): (&[u8], Signs),
    kp: usize,
    panel: &[i8],
    acc: &mut [i32],
    (off, ldc): (usize, usize),
) {
    let signed_a = signs == Signs::SignedA;
    let sa = |x: u8| {
        if signed_a {
            i32::from(x as i8)
        } else {
            i32::from(x)
        }
    };
    let sb = |x: i8| {
        if signed_a {
            i32::from(x as u8)
        } else {
            i32::from(x)
        }
    };
    for r in 0..MR {
        let row = &a[r * kp..][..kp];
        let mut s = [0i32; PANEL];
        for (q, group) in panel.chunks_exact(PANEL * 4).enumerate() {
            let av = &row[q * 4..][..4];
            for (c, sc) in s.iter_mut().enumerate() {
                let bv = &group[c * 4..][..4];
                for d in 0..4 {
                    *sc = sc.wrapping_add(sa(av[d]) * sb(bv[d]));
                }
            }
        }
        acc[r * ldc + off..][..PANEL].copy_from_slice(&s);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{MR, PANEL};
    use std::arch::x86_64::*;

    /// `vpdpbusd`: 8 rows × 2 panels, one zmm of B per panel and k group (its u8 operand
    /// A's broadcast bytes, or with `A_SIGNED` the panel's).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn vnni_tile<const A_SIGNED: bool>(
        a: &[u8],
        kp: usize,
        b0: &[i8],
        b1: &[i8],
        acc: &mut [i32],
        ldc: usize,
    ) {
        let kq = kp / 4;
        debug_assert!(a.len() >= MR * kp && b0.len() >= kq * 64 && b1.len() >= kq * 64);
        let mut c = [[_mm512_setzero_si512(); 2]; MR];
        let (pa, p0, p1) = (a.as_ptr(), b0.as_ptr(), b1.as_ptr());
        for q in 0..kq {
            // SAFETY: q < kq, so each 64-byte group and 4-byte A read is in bounds.
            let v0 = _mm512_loadu_si512(p0.add(q * 64).cast());
            let v1 = _mm512_loadu_si512(p1.add(q * 64).cast());
            for (r, cr) in c.iter_mut().enumerate() {
                let av = _mm512_set1_epi32(pa.add(r * kp + q * 4).cast::<i32>().read_unaligned());
                if A_SIGNED {
                    cr[0] = _mm512_dpbusd_epi32(cr[0], v0, av);
                    cr[1] = _mm512_dpbusd_epi32(cr[1], v1, av);
                } else {
                    cr[0] = _mm512_dpbusd_epi32(cr[0], av, v0);
                    cr[1] = _mm512_dpbusd_epi32(cr[1], av, v1);
                }
            }
        }
        for (r, cr) in c.iter().enumerate() {
            let o = acc.as_mut_ptr().add(r * ldc);
            _mm512_storeu_si512(o.cast(), cr[0]);
            _mm512_storeu_si512(o.add(PANEL).cast(), cr[1]);
        }
    }

    /// One panel with `vpmaddwd` into `acc[r][off..off + PANEL]`: per k group, the panel's
    /// 64 bytes become four i16 vectors (4 columns × 4 k each); A's four bytes, widened and
    /// repeated, multiply them pairwise into i32 partial sums (two per column), which are
    /// added pairwise at the end. The u8 side is zero-extended, the i8 side sign-extended
    /// (A's with `A_SIGNED`, else B's); no pair sum reaches `2·255·128`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn avx2_tile_at<const A_SIGNED: bool>(
        a: &[u8],
        kp: usize,
        b: &[i8],
        acc: &mut [i32],
        (off, ldc): (usize, usize),
    ) {
        let kq = kp / 4;
        debug_assert!(a.len() >= MR * kp && b.len() >= kq * 64);
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        // Two rows at a time: 2 × 4 accumulators + 4 B vectors + A fit in 16 ymm.
        for r in (0..MR).step_by(2) {
            let mut c = [[_mm256_setzero_si256(); 4]; 2];
            for q in 0..kq {
                let g = pb.add(q * 64);
                let widen = |x: __m128i| {
                    if A_SIGNED {
                        _mm256_cvtepu8_epi16(x)
                    } else {
                        _mm256_cvtepi8_epi16(x)
                    }
                };
                let bw = [
                    widen(_mm_loadu_si128(g.cast())),
                    widen(_mm_loadu_si128(g.add(16).cast())),
                    widen(_mm_loadu_si128(g.add(32).cast())),
                    widen(_mm_loadu_si128(g.add(48).cast())),
                ];
                for (h, ch) in c.iter_mut().enumerate() {
                    let a4 = pa.add((r + h) * kp + q * 4).cast::<i32>().read_unaligned();
                    let a4 = _mm_set1_epi32(a4);
                    let aw = if A_SIGNED {
                        _mm256_cvtepi8_epi16(a4)
                    } else {
                        _mm256_cvtepu8_epi16(a4)
                    };
                    for (cv, bv) in ch.iter_mut().zip(&bw) {
                        *cv = _mm256_add_epi32(*cv, _mm256_madd_epi16(aw, *bv));
                    }
                }
            }
            for (h, ch) in c.iter().enumerate() {
                // Each vector holds (col, half) pairs of 4 columns; hadd joins the halves:
                // hadd(x, y) = [x01 x23 y01 y23 | x45 x67 y45 y67] per 128-bit lane.
                let s01 = _mm256_hadd_epi32(ch[0], ch[1]);
                let s23 = _mm256_hadd_epi32(ch[2], ch[3]);
                // s01 lanes: [c0 c1 c4 c5 | c2 c3 c6 c7]; reorder to c0..c7.
                let lo =
                    _mm256_permutevar8x32_epi32(s01, _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7));
                let hi =
                    _mm256_permutevar8x32_epi32(s23, _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7));
                let o = acc.as_mut_ptr().add((r + h) * ldc + off);
                _mm256_storeu_si256(o.cast(), lo);
                _mm256_storeu_si256(o.add(8).cast(), hi);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// The definition, in i64 then wrapped.
    fn naive(
        a: &[i64],
        b: &[i64],
        m: usize,
        k: usize,
        n: usize,
        za: &[i64],
        zb: &[i64],
    ) -> Vec<i32> {
        let mut c = vec![0i32; m * n];
        for i in 0..m {
            for j in 0..n {
                let zi = za[if za.len() == 1 { 0 } else { i }];
                let zj = zb[if zb.len() == 1 { 0 } else { j }];
                let s: i64 = (0..k)
                    .map(|p| (a[i * k + p] - zi) * (b[p * n + j] - zj))
                    .sum();
                c[i * n + j] = s as i32;
            }
        }
        c
    }

    fn values(rng: &mut rand::rngs::StdRng, n: usize, signed: bool) -> Vec<i64> {
        let (lo, hi) = if signed { (-128, 127) } else { (0, 255) };
        (0..n)
            .map(|_| match rng.gen_range(0..6) {
                0 => lo,
                1 => hi,
                2 => 0,
                _ => rng.gen_range(lo..=hi),
            })
            .collect()
    }

    fn as_bytes(v: &[i64], signed: bool) -> (Vec<u8>, Vec<i8>) {
        if signed {
            (vec![], v.iter().map(|&x| x as i8).collect())
        } else {
            (v.iter().map(|&x| x as u8).collect(), vec![])
        }
    }

    fn bytes<'a>(u: &'a [u8], s: &'a [i8], signed: bool) -> Bytes<'a> {
        if signed {
            Bytes::I8(s)
        } else {
            Bytes::U8(u)
        }
    }

    #[test]
    fn every_kernel_is_exact_on_extremes_and_odd_sizes() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let pool = Pool::new(2).unwrap();
        let isas: Vec<IsaI8> = [IsaI8::Portable, IsaI8::Avx2, IsaI8::Avx512Vnni]
            .into_iter()
            .filter(|i| i.resolve().is_some())
            .collect();
        for &(m, k, n) in &[
            (1, 1, 1),
            (3, 5, 17),
            (9, 64, 33),
            (8, 7, 16),
            (17, 130, 50),
            (2, 4, 64),
        ] {
            for (sa, sb) in [(false, true), (true, false), (false, false), (true, true)] {
                let (av, bv) = (values(&mut rng, m * k, sa), values(&mut rng, k * n, sb));
                let per_row = rng.gen_bool(0.5);
                let za = values(&mut rng, if per_row { m } else { 1 }, sa);
                let zb = values(&mut rng, if per_row { n } else { 1 }, sb);
                let want = naive(&av, &bv, m, k, n, &za, &zb);
                let (au, ai) = as_bytes(&av, sa);
                let (bu, bi) = as_bytes(&bv, sb);
                let packed = PackedB8::pack(bytes(&bu, &bi, sb), k, n).unwrap();
                let za32: Vec<i32> = za.iter().map(|&x| x as i32).collect();
                let zb32: Vec<i32> = zb.iter().map(|&x| x as i32).collect();
                for &isa in &isas {
                    let mut c = vec![7i32; m * n];
                    matmul_integer(
                        bytes(&au, &ai, sa),
                        m,
                        &za32,
                        &packed,
                        &zb32,
                        &mut c,
                        &pool,
                        isa,
                    )
                    .unwrap();
                    assert_eq!(c, want, "{isa:?} {m}x{k}x{n} signed {sa}/{sb}");
                    // The scaled form: the cast, product and sum of each element, bit for bit.
                    let scale: Vec<f32> = (0..if per_row { n } else { 1 })
                        .map(|j| 0.37 / (j as f32 + 3.0))
                        .collect();
                    for bias in [
                        vec![],
                        vec![0.25f32],
                        (0..n).map(|j| j as f32 - 0.5).collect(),
                    ] {
                        let mut y = vec![std::mem::MaybeUninit::new(f32::NAN); m * n];
                        matmul_integer_scaled(
                            bytes(&au, &ai, sa),
                            m,
                            &za32,
                            &packed,
                            &zb32,
                            &scale,
                            &bias,
                            &mut y,
                            &pool,
                            isa,
                        )
                        .unwrap();
                        for (e, (&got, &acc)) in y.iter().zip(&want).enumerate() {
                            let j = e % n;
                            let pick = |v: &[f32]| v[if v.len() == 1 { 0 } else { j }];
                            let mut w = acc as f32 * pick(&scale);
                            if !bias.is_empty() {
                                w += pick(&bias);
                            }
                            // SAFETY: every element was written (checked against NaN-free `w`).
                            let got = unsafe { got.assume_init() };
                            assert_eq!(
                                got.to_bits(),
                                w.to_bits(),
                                "{isa:?} scaled {m}x{k}x{n} at {e}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn extreme_products_do_not_saturate() {
        // All 0 or 255 against -128: the sums vpmaddubsw would saturate.
        let pool = Pool::single();
        let (m, k, n) = (8, 256, 16);
        for a_val in [0u8, 255] {
            let a = vec![a_val; m * k];
            let b = vec![-128i8; k * n];
            let packed = PackedB8::pack(Bytes::I8(&b), k, n).unwrap();
            for isa in [IsaI8::Portable, IsaI8::Avx2, IsaI8::Avx512Vnni] {
                if isa.resolve().is_none() {
                    continue;
                }
                let mut c = vec![0i32; m * n];
                matmul_integer(Bytes::U8(&a), m, &[0], &packed, &[0], &mut c, &pool, isa).unwrap();
                assert!(
                    c.iter().all(|&x| x == a_val as i32 * -128 * k as i32),
                    "{isa:?}"
                );
            }
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let packed = PackedB8::pack(Bytes::I8(&[1, 2, 3, 4]), 2, 2).unwrap();
        let mut c = vec![0i32; 4];
        let pool = Pool::single();
        let e = matmul_integer(
            Bytes::U8(&[1, 2, 3]),
            2,
            &[0],
            &packed,
            &[0],
            &mut c,
            &pool,
            IsaI8::Auto,
        );
        assert!(e.is_err());
        let e = matmul_integer(
            Bytes::U8(&[1; 4]),
            2,
            &[0; 3],
            &packed,
            &[0],
            &mut c,
            &pool,
            IsaI8::Auto,
        );
        assert!(e.is_err());
        assert!(PackedB8::pack(Bytes::I8(&[1, 2, 3]), 2, 2).is_err());
    }
}
