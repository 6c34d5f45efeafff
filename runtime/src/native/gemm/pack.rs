//! Packing: B into `nr`-column panels per `kc` slab ([`PackedB`], done once for constant
//! weights, in the layout of the micro-kernel family chosen at pack time), A into `mr`-row
//! panels per `MC × KC` block, and 64-byte-aligned buffers for both.

use super::{GemmError, KernelIsa, MatRef};

/// From this many bytes a long-lived buffer ([`AlignedBuf::huge`]: packed weights) is placed
/// on 2 MiB boundaries and offered to transparent huge pages (Linux `madvise`): a model's
/// packed weights (tens to hundreds of MiB, read once per run) then take one TLB entry per
/// 2 MiB instead of one per 4 KiB. When the advice is given is [`HugePages`].
const HUGE_MIN_BYTES: usize = 1 << 20;
const HUGE_PAGE: usize = 2 << 20;

/// When packed weights are offered to transparent huge pages (`KILN_HUGE_PAGES`, read once
/// per process: `lazy`, the default, `eager` or `off`).
///
/// With the kernel's usual `defrag=madvise` setting, a page fault in advised memory compacts
/// memory *synchronously* until a 2 MiB page is free: on a machine whose RAM is full of page
/// cache, packing a 12-layer BERT-base (340 MiB) on advised memory took 1–4 s of faults
/// (`eager`), against about 0.2 s on plain pages. `lazy` packs on plain pages and advises
/// afterwards, so `khugepaged` merges them into huge pages in the background while the model
/// runs; `eager` advises before packing (huge pages from the first run, at that cost);
/// `off` never advises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HugePages {
    /// Advise after packing (the default).
    Lazy,
    /// Advise before packing.
    Eager,
    /// Never advise.
    Off,
}

impl HugePages {
    /// The process-wide choice from `KILN_HUGE_PAGES` (unknown values mean the default).
    pub fn current() -> HugePages {
        static MODE: std::sync::OnceLock<HugePages> = std::sync::OnceLock::new();
        *MODE.get_or_init(|| match std::env::var("KILN_HUGE_PAGES").as_deref() {
            Ok("eager") => HugePages::Eager,
            Ok("off") => HugePages::Off,
            _ => HugePages::Lazy,
        })
    }
}

/// A zeroed buffer of f32 whose usable part starts on a 64-byte (cache line) boundary, or on
/// a huge-page boundary ([`AlignedBuf::huge`]).
pub(super) struct AlignedBuf {
    ptr: std::ptr::NonNull<f32>,
    len: usize,
    storage: Storage,
}

enum Storage {
    /// A zeroed `Vec` (calloc: fresh pages cost nothing until touched) with 16 spare values
    /// to slide the start onto a cache line.
    Vec(#[allow(dead_code)] Vec<f32>),
    /// A 2 MiB-aligned anonymous mapping of this many bytes (zero pages until written).
    #[cfg(unix)]
    Map(usize),
}

// SAFETY: an owned allocation, like a `Vec<f32>`.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only reads.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// `len` zeros on a cache-line boundary (scratch and per-call buffers).
    pub(super) fn new(len: usize) -> Self {
        let mut raw = vec![0.0f32; len + 16];
        // align_offset may refuse (usize::MAX); then fall back to no alignment.
        let start = raw.as_ptr().align_offset(64).min(16);
        // SAFETY: `start <= 16`, inside the `len + 16` values; the Vec is kept (never
        // reallocated) for as long as the pointer is used.
        let ptr = unsafe { std::ptr::NonNull::new_unchecked(raw.as_mut_ptr().add(start)) };
        AlignedBuf {
            ptr,
            len,
            storage: Storage::Vec(raw),
        }
    }

    /// `len` zeros for a long-lived buffer: from [`HUGE_MIN_BYTES`] a 2 MiB-aligned mapping,
    /// advised for huge pages now under [`HugePages::Eager`] (else by [`Self::settle`]).
    pub(super) fn huge(len: usize) -> Self {
        let bytes = len
            .max(1)
            .checked_mul(4)
            .expect("buffer size overflows usize");
        if bytes < HUGE_MIN_BYTES {
            return Self::new(len);
        }
        #[cfg(not(unix))]
        return Self::new(len);
        #[cfg(unix)]
        {
            let size = bytes.next_multiple_of(HUGE_PAGE);
            // SAFETY: a fresh private anonymous mapping (zero-filled by the kernel), one huge
            // page longer than needed; the slack before the first 2 MiB boundary and after
            // `size` bytes is unmapped again, so exactly `[ptr, ptr + size)` stays mapped
            // until `Drop` unmaps it.
            unsafe {
                let map = size + HUGE_PAGE;
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    map,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                if p == libc::MAP_FAILED {
                    std::alloc::handle_alloc_error(
                        std::alloc::Layout::from_size_align(size, HUGE_PAGE).expect("layout"),
                    );
                }
                let base = p as usize;
                let start = base.next_multiple_of(HUGE_PAGE);
                if start > base {
                    libc::munmap(p, start - base);
                }
                let tail = base + map - (start + size);
                if tail > 0 {
                    libc::munmap((start + size) as *mut libc::c_void, tail);
                }
                let buf = AlignedBuf {
                    ptr: std::ptr::NonNull::new_unchecked(start as *mut f32),
                    len,
                    storage: Storage::Map(size),
                };
                if HugePages::current() == HugePages::Eager {
                    buf.advise_huge();
                }
                buf
            }
        }
    }

    /// Marks a filled long-lived buffer for huge pages under [`HugePages::Lazy`].
    pub(super) fn settle(&self) {
        if HugePages::current() == HugePages::Lazy {
            self.advise_huge();
        }
    }

    fn advise_huge(&self) {
        #[cfg(target_os = "linux")]
        if let Storage::Map(size) = self.storage {
            // SAFETY: advice on our own mapping; where THP is off it fails harmlessly.
            unsafe { libc::madvise(self.ptr.as_ptr().cast(), size, libc::MADV_HUGEPAGE) };
        }
    }

    /// Usable length.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn as_slice(&self) -> &[f32] {
        // SAFETY: `len` initialised f32 live as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub(super) fn as_mut_slice(&mut self) -> &mut [f32] {
        // SAFETY: as above, borrowed exclusively.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        #[cfg(unix)]
        if let Storage::Map(size) = self.storage {
            // SAFETY: mapped in `huge` with exactly this start and size.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), size) };
        }
    }
}

impl Clone for AlignedBuf {
    fn clone(&self) -> Self {
        let mut b = match self.storage {
            Storage::Vec(_) => AlignedBuf::new(self.len),
            #[cfg(unix)]
            Storage::Map(_) => AlignedBuf::huge(self.len),
        };
        b.as_mut_slice().copy_from_slice(self.as_slice());
        b.settle();
        b
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .finish()
    }
}

/// A right-hand matrix `B[K, N]` packed for one micro-kernel family; pack constant weights
/// once and pass them as [`super::Rhs::Packed`] to every call.
///
/// Layout (`nr`, `kc_max` are the family's panel width and slab depth): for each K slab
/// `k0 = 0, kc_max, ..` (depth `kc = min(kc_max, K - k0)`), for each panel `p` of `nr`
/// columns, `kc` rows of `nr` values (zero-padded past column `N`). Panel `(k0, p)` starts at
/// `k0·Np + p·kc·nr` where `Np` is `N` rounded up to `nr`. The layout is recorded, and a call
/// only runs a kernel whose layout matches it.
#[derive(Debug, Clone)]
pub struct PackedB {
    buf: AlignedBuf,
    rows: usize,
    cols: usize,
    padded_cols: usize,
    nr: usize,
    kc_max: usize,
    kernel: KernelIsa,
}

impl PackedB {
    /// Packs `b` (any strides) for the best micro-kernel of this CPU (chosen once per
    /// process).
    pub fn pack(b: MatRef<'_>) -> Result<Self, GemmError> {
        Self::pack_for(b, super::Isa::Auto)
    }

    /// Packs `b` for the micro-kernel `isa` names; `Err` if this CPU lacks it.
    pub fn pack_for(b: MatRef<'_>, isa: super::Isa) -> Result<Self, GemmError> {
        let kernel = super::select_kernel(isa, None)?;
        Self::pack_kernel(b, kernel, true)
    }

    /// `long_lived`: a constant weight (on huge pages when large) rather than one call's B.
    pub(super) fn pack_kernel(
        b: MatRef<'_>,
        kernel: KernelIsa,
        long_lived: bool,
    ) -> Result<Self, GemmError> {
        let (nr, kc_max) = kernel.layout();
        let (k, n) = (b.rows(), b.cols());
        let of = || GemmError::Overflow { what: "packed B" };
        let padded_cols = n.div_ceil(nr).checked_mul(nr).ok_or_else(of)?;
        let len = k.checked_mul(padded_cols).ok_or_else(of)?;
        len.checked_add(16).ok_or_else(of)?;
        let mut buf = if long_lived {
            AlignedBuf::huge(len)
        } else {
            AlignedBuf::new(len)
        };
        let dst = buf.as_mut_slice();
        let npanels = padded_cols / nr;
        let mut k0 = 0;
        while k0 < k {
            let kc = super::slab_depth(kc_max, k, k0);
            for p in 0..npanels {
                let base = k0 * padded_cols + p * kc * nr;
                let panel = &mut dst[base..base + kc * nr];
                let (j0, w) = (p * nr, nr.min(n - p * nr));
                for (kk, row) in panel.chunks_exact_mut(nr).enumerate() {
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
        buf.settle();
        Ok(PackedB {
            buf,
            rows: k,
            cols: n,
            padded_cols,
            nr,
            kc_max,
            kernel,
        })
    }

    /// An empty packing (0 × 0) for the best micro-kernel of this CPU, to [`Self::refill`].
    pub fn empty() -> Result<Self, GemmError> {
        let kernel = super::select_kernel(super::Isa::Auto, None)?;
        let (nr, kc_max) = kernel.layout();
        Ok(PackedB {
            buf: AlignedBuf::new(0),
            rows: 0,
            cols: 0,
            padded_cols: 0,
            nr,
            kc_max,
            kernel,
        })
    }

    /// Repacks in place as the `k × n` matrix whose row `r` `fill(r, row)` writes into `row`
    /// (`n` values of `scratch`), growing the buffer when it is too small: for a B built
    /// on every call (a conv's im2col block) by a caller that keeps one packing per thread,
    /// with no separate unpacked copy and no allocation once warm.
    pub fn refill(
        &mut self,
        k: usize,
        n: usize,
        scratch: &mut Vec<f32>,
        mut fill: impl FnMut(usize, &mut [f32]),
    ) -> Result<(), GemmError> {
        let (nr, kc_max) = (self.nr, self.kc_max);
        let of = || GemmError::Overflow { what: "packed B" };
        let padded_cols = n.div_ceil(nr).checked_mul(nr).ok_or_else(of)?;
        let len = k.checked_mul(padded_cols).ok_or_else(of)?;
        if self.buf.len() < len {
            self.buf = AlignedBuf::new(len);
        }
        if scratch.len() < padded_cols {
            scratch.resize(padded_cols, 0.0);
        }
        let row = &mut scratch[..padded_cols];
        row[n..].fill(0.0);
        let dst = self.buf.as_mut_slice();
        let npanels = padded_cols / nr;
        let mut k0 = 0;
        while k0 < k {
            let kc = super::slab_depth(kc_max, k, k0);
            for kk in 0..kc {
                fill(k0 + kk, &mut row[..n]);
                for p in 0..npanels {
                    let at = k0 * padded_cols + p * kc * nr + kk * nr;
                    dst[at..at + nr].copy_from_slice(&row[p * nr..(p + 1) * nr]);
                }
            }
            k0 += kc;
        }
        self.rows = k;
        self.cols = n;
        self.padded_cols = padded_cols;
        Ok(())
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

    /// The micro-kernel family this was packed for.
    pub(super) fn kernel(&self) -> KernelIsa {
        self.kernel
    }

    /// `(panel width, slab depth)` of the layout.
    pub(super) fn layout(&self) -> (usize, usize) {
        (self.nr, self.kc_max)
    }

    /// The `kc × nr` panel `p` of the slab starting at `k0`.
    #[inline(always)]
    pub(super) fn panel(&self, k0: usize, kc: usize, p: usize) -> &[f32] {
        let base = k0 * self.padded_cols + p * kc * self.nr;
        &self.buf.as_slice()[base..base + kc * self.nr]
    }
}

/// Packs rows `i0..i0 + mc`, columns `k0..k0 + kc` of `a` into `dst` as `ceil(mc / mr)` panels
/// of `kc × mr` values (k-major), one per register tile of [`super::tile_rows`] (tiles of
/// near-equal height), zero-padding each panel's rows past its tile.
pub(super) fn pack_a(
    a: &MatRef<'_>,
    i0: usize,
    mc: usize,
    k0: usize,
    kc: usize,
    mr: usize,
    dst: &mut [f32],
) {
    let nt = mc.div_ceil(mr);
    for (t, panel) in dst[..nt * mr * kc].chunks_exact_mut(mr * kc).enumerate() {
        let (r0, rows) = super::tile_rows(mc, nt, t);
        if a.cs == 1 {
            // Row-major A (the usual case): read each row contiguously, write strided.
            if rows < mr {
                panel.fill(0.0);
            }
            for r in 0..rows {
                let start = (i0 + r0 + r) * a.rs + k0;
                for (kk, &v) in a.data[start..start + kc].iter().enumerate() {
                    panel[kk * mr + r] = v;
                }
            }
            continue;
        }
        for (kk, col) in panel.chunks_exact_mut(mr).enumerate() {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_lived_buffers_are_zeroed_aligned_and_independent() {
        // 3 MiB + a bit: a mapping of two huge pages, its slack unmapped again.
        let len = (3 << 20) / 4 + 5;
        let mut a = AlignedBuf::huge(len);
        assert_eq!(a.len(), len);
        assert_eq!(a.as_slice().as_ptr() as usize % HUGE_PAGE, 0);
        assert!(a.as_slice().iter().all(|&v| v == 0.0));
        for (i, v) in a.as_mut_slice().iter_mut().enumerate() {
            *v = i as f32;
        }
        a.settle();
        let b = a.clone();
        a.as_mut_slice()[len - 1] = -1.0;
        assert_eq!(b.as_slice()[len - 1], (len - 1) as f32);
        assert_eq!(b.as_slice().as_ptr() as usize % HUGE_PAGE, 0);
        drop(a);
        assert_eq!(b.as_slice()[7], 7.0);
        // Small ones stay on the heap, cache-line aligned.
        let s = AlignedBuf::huge(1000);
        assert_eq!(s.as_slice().as_ptr() as usize % 64, 0);
        assert!(s.as_slice().iter().all(|&v| v == 0.0));
    }

    #[test]
    fn packed_weights_on_a_mapping_hold_the_matrix() {
        let (k, n) = (700, 600); // 1.6 MiB packed: a mapping
        let data: Vec<f32> = (0..k * n).map(|i| (i % 977) as f32 - 400.0).collect();
        let p = PackedB::from_row_major(&data, k, n).unwrap();
        let (nr, kc_max) = p.layout();
        let mut k0 = 0;
        while k0 < k {
            let kc = crate::native::gemm::slab_depth(kc_max, k, k0);
            for panel in 0..n.div_ceil(nr) {
                let got = p.panel(k0, kc, panel);
                for kk in 0..kc {
                    for j in 0..nr {
                        let c = panel * nr + j;
                        let want = if c < n { data[(k0 + kk) * n + c] } else { 0.0 };
                        assert_eq!(got[kk * nr + j], want);
                    }
                }
            }
            k0 += kc;
        }
    }
}
