//! Packing: B into `NR`-column panels per `KC` slab ([`PackedB`], done once for constant
//! weights), A into `MR`-row panels per `MC × KC` block, and 64-byte-aligned buffers for both.

use super::{GemmError, MatRef, KC, MR, NR};

/// A buffer of f32 whose usable part starts on a 64-byte (cache line) boundary.
#[derive(Debug, Clone)]
pub(super) struct AlignedBuf {
    raw: Vec<f32>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// `len` zeros, aligned.
    pub(super) fn new(len: usize) -> Self {
        let raw = vec![0.0f32; len + 16];
        // align_offset may refuse (usize::MAX); then fall back to no alignment.
        let start = raw.as_ptr().align_offset(64).min(16);
        AlignedBuf { raw, start, len }
    }

    pub(super) fn as_slice(&self) -> &[f32] {
        &self.raw[self.start..self.start + self.len]
    }

    pub(super) fn as_mut_slice(&mut self) -> &mut [f32] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

/// A right-hand matrix `B[K, N]` packed for the micro-kernel; pack constant weights once and
/// pass them as [`super::Rhs::Packed`] to every call.
///
/// Layout: for each K slab `k0 = 0, KC, 2·KC, ..` (depth `kc = min(KC, K - k0)`), for each
/// panel `p` of `NR` columns, `kc` rows of `NR` values (zero-padded past column `N`). Panel
/// `(k0, p)` starts at `k0·Np + p·kc·NR` where `Np` is `N` rounded up to `NR`.
#[derive(Debug, Clone)]
pub struct PackedB {
    buf: AlignedBuf,
    rows: usize,
    cols: usize,
    padded_cols: usize,
}

impl PackedB {
    /// Packs `b` (any strides).
    pub fn pack(b: MatRef<'_>) -> Result<Self, GemmError> {
        let (k, n) = (b.rows(), b.cols());
        let of = || GemmError::Overflow { what: "packed B" };
        let padded_cols = n.div_ceil(NR).checked_mul(NR).ok_or_else(of)?;
        let len = k.checked_mul(padded_cols).ok_or_else(of)?;
        len.checked_add(16).ok_or_else(of)?;
        let mut buf = AlignedBuf::new(len);
        let dst = buf.as_mut_slice();
        let npanels = padded_cols / NR;
        let mut k0 = 0;
        while k0 < k {
            let kc = KC.min(k - k0);
            for p in 0..npanels {
                let base = k0 * padded_cols + p * kc * NR;
                let panel = &mut dst[base..base + kc * NR];
                let (j0, w) = (p * NR, NR.min(n - p * NR));
                for (kk, row) in panel.chunks_exact_mut(NR).enumerate() {
                    if b.cs == 1 {
                        // Contiguous rows (the usual case): copy the panel's slice of the row.
                        let start = (k0 + kk) * b.rs + j0;
                        row[..w].copy_from_slice(&b.data[start..start + w]);
                    } else {
                        for (jj, v) in row[..w].iter_mut().enumerate() {
                            *v = b.at(k0 + kk, j0 + jj);
                        }
                    }
                    row[w..].fill(0.0);
                }
            }
            k0 += kc;
        }
        Ok(PackedB {
            buf,
            rows: k,
            cols: n,
            padded_cols,
        })
    }

    /// Packs a dense row-major `k × n` matrix.
    pub fn from_row_major(data: &[f32], k: usize, n: usize) -> Result<Self, GemmError> {
        Self::pack(MatRef::row_major(data, k, n)?)
    }

    /// K, the contraction size.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// N, the output columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The `kc × NR` panel `p` of the slab starting at `k0`.
    #[inline(always)]
    pub(super) fn panel(&self, k0: usize, kc: usize, p: usize) -> &[f32] {
        let base = k0 * self.padded_cols + p * kc * NR;
        &self.buf.as_slice()[base..base + kc * NR]
    }
}

/// Packs rows `i0..i0 + mc`, columns `k0..k0 + kc` of `a` into `dst` as `ceil(mc / MR)` panels
/// of `kc × MR` values (k-major), zero-padding the last panel's missing rows.
pub(super) fn pack_a(a: &MatRef<'_>, i0: usize, mc: usize, k0: usize, kc: usize, dst: &mut [f32]) {
    for (p, panel) in dst[..mc.div_ceil(MR) * MR * kc]
        .chunks_exact_mut(MR * kc)
        .enumerate()
    {
        let r0 = p * MR;
        let rows = MR.min(mc - r0);
        for (kk, col) in panel.chunks_exact_mut(MR).enumerate() {
            for (r, v) in col.iter_mut().enumerate() {
                *v = if r < rows {
                    a.at(i0 + r0 + r, k0 + kk)
                } else {
                    0.0
                };
            }
        }
    }
}
