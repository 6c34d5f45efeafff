//! f32 GEMM with a fused epilogue: `C = act(row_scale ⊙ (A·B) + bias) + residual`, exactly the
//! semantics of kiln's `linear` op (ir/src/ops/fused.rs), computed in f32.
//!
//! Structure (the classic Goto/BLIS loop nest):
//! - B is packed into `NR`-column panels per `KC`-deep slab ([`PackedB`]); constant weights are
//!   packed once and reused by every call.
//! - A is packed per `MC × KC` block into `MR`-row panels (the block lives in L2), except
//!   where the kernel reads a row-major A in place (AVX-512 always, every kernel for `M = 1`).
//! - The micro-kernel multiplies one `MR × kc` A panel by one `kc × NR` B panel into an
//!   `MR × NR` tile of C held in registers. Three families, chosen at run time: AVX-512F
//!   12 × 32 ([`avx512`], its k loop in inline assembly), AVX2+FMA 6 × 16 ([`avx2`]), and a
//!   portable loop ([`portable`],
//!   same layout as AVX2). Each family has its own `MR`, `NR`, `KC`, `MC`; a [`PackedB`]
//!   records the family it was packed for and only runs with a kernel of that layout.
//! - After the last `KC` slab the epilogue runs on the tile while it is still in L1, in the
//!   kernel's SIMD width ([`simd`]).
//! - Threads split the rows of C (or its columns when there are few row tiles); each owns a
//!   disjoint rectangle of C, cut on whole tiles so that every element is computed as on one
//!   thread.
//!
//! All shape and stride checks happen at the safe API boundary ([`MatRef::new`],
//! [`MatMut::new`], [`gemm`]); the inner loops rely on them.

/// The control flow that the AVX-512 and AVX2 assembly k loops share, as one template
/// string: `{npf}` prefetch points (two lines at `{pf}`, then `{every}` unrolled groups
/// each), then `{n}` more groups, then `{t}` single k steps ([`Spread`] counts them).
/// `[$group]` is one unrolled group and `[$step]` one k step, each with its pointer
/// updates; `{c}` is a scratch counter.
macro_rules! spread_kloop {
    ([$($group:tt)*], [$($step:tt)*]) => {
        concat!(
            "test {npf}, {npf}\n",
            "jz 3f\n",
            "6:\n",
            "prefetcht1 byte ptr [{pf}]\n",
            "prefetcht1 byte ptr [{pf} + 64]\n",
            "add {pf}, 128\n",
            "mov {c}, {every}\n",
            "2:\n",
            $($group)*, "\n",
            "dec {c}\n",
            "jnz 2b\n",
            "dec {npf}\n",
            "jnz 6b\n",
            "3:\n",
            "test {n}, {n}\n",
            "jz 5f\n",
            "4:\n",
            $($group)*, "\n",
            "dec {n}\n",
            "jnz 4b\n",
            "5:\n",
            "test {t}, {t}\n",
            "jz 8f\n",
            "7:\n",
            $($step)*, "\n",
            "dec {t}\n",
            "jnz 7b\n",
            "8:",
        )
    };
}

pub(crate) mod avx2;
pub(crate) mod avx512;
mod epilogue;
mod pack;
mod peak;
mod portable;
mod simd;
pub mod sparse;
#[cfg(test)]
mod tests;

pub use epilogue::{Activation, Epilogue};
pub use pack::{HugePages, PackedB};
pub use peak::fma_peak_gflops;

use crate::pool::Pool;
use pack::{pack_a, AlignedBuf};
use std::cell::Cell;
use std::sync::OnceLock;
use thiserror::Error;

/// Columns of C visited per outer block: an `MC × NC` block of C (384 KiB for 128 rows) stays
/// in L2 from one K slab to the next while the B panels stream past it. 128 × 3072 × 768 on
/// AVX-512, one thread: 161 GFLOP/s with NC = 3072 (C re-read from L3 per slab), 166 with 768
/// (at KC = 256); AVX2 level.
pub const NC: usize = 768;
/// The register tile of the kernels that use an edge-tile buffer ([`EdgeTile`]: AVX2 and
/// portable, 6 × 16; AVX-512 stores partial tiles with masks instead).
const MAX_TILE: usize = avx2::MR * avx2::NR;
/// Below this many flops per thread, handing work to another thread costs more than it saves.
const MIN_FLOPS_PER_THREAD: usize = 4_000_000;
/// A few-row product (decode's GEMVs) is bound by reading B, not by flops: below this many
/// bytes of B per thread, another thread costs more than it saves.
const MIN_B_BYTES_PER_THREAD: usize = 256 * 1024;

/// What can go wrong at the API boundary. Every shape or stride problem is reported here;
/// nothing past the boundary panics on caller input.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum GemmError {
    /// Two operands disagree about a dimension.
    #[error("{what}: expected {expected}, got {got}")]
    Mismatch {
        /// Which dimension or operand.
        what: &'static str,
        /// The size the other operands imply.
        expected: usize,
        /// The size given.
        got: usize,
    },
    /// A matrix view reaches past the end of its slice.
    #[error("{what}: the view needs {needed} elements but the slice has {len}")]
    OutOfBounds {
        /// Which operand.
        what: &'static str,
        /// One past the largest index the view touches.
        needed: usize,
        /// The slice length.
        len: usize,
    },
    /// A size or index computation overflows `usize`.
    #[error("{what}: size overflows usize")]
    Overflow {
        /// Which operand.
        what: &'static str,
    },
    /// The output's rows overlap (row stride smaller than the number of columns).
    #[error("output row stride {row_stride} is smaller than its {cols} columns")]
    OverlappingRows {
        /// The row stride given.
        row_stride: usize,
        /// The number of columns.
        cols: usize,
    },
    /// `GemmConfig::threads` was zero.
    #[error("thread count must be at least 1")]
    ZeroThreads,
    /// The requested micro-kernel needs CPU features this machine lacks.
    #[error("the {isa} GEMM kernel is not available on this CPU")]
    IsaUnavailable {
        /// The kernel asked for.
        isa: &'static str,
    },
    /// A packed B was packed for a kernel whose layout differs from the requested one.
    #[error("B was packed for the {packed} kernel and cannot run with the {kernel} kernel")]
    PackedForOtherKernel {
        /// The kernel B was packed for.
        packed: &'static str,
        /// The kernel asked for.
        kernel: &'static str,
    },
}

/// One past the largest index a `rows × cols` view with these strides touches (0 when empty).
fn extent(
    what: &'static str,
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
) -> Result<usize, GemmError> {
    if rows == 0 || cols == 0 {
        return Ok(0);
    }
    let of = || GemmError::Overflow { what };
    let last_r = (rows - 1).checked_mul(rs).ok_or_else(of)?;
    let last_c = (cols - 1).checked_mul(cs).ok_or_else(of)?;
    last_r
        .checked_add(last_c)
        .and_then(|x| x.checked_add(1))
        .ok_or_else(of)
}

/// A read-only strided matrix view: element `(i, j)` is `data[i * row_stride + j * col_stride]`.
/// Construction checks that every element is inside `data`.
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> MatRef<'a> {
    /// A strided view; `Err` if it reaches past the end of `data`.
    pub fn new(
        data: &'a [f32],
        rows: usize,
        cols: usize,
        row_stride: usize,
        col_stride: usize,
    ) -> Result<Self, GemmError> {
        let needed = extent("matrix", rows, cols, row_stride, col_stride)?;
        if needed > data.len() {
            return Err(GemmError::OutOfBounds {
                what: "matrix",
                needed,
                len: data.len(),
            });
        }
        Ok(MatRef {
            data,
            rows,
            cols,
            rs: row_stride,
            cs: col_stride,
        })
    }

    /// A dense row-major view (`row_stride = cols`, `col_stride = 1`).
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Result<Self, GemmError> {
        Self::new(data, rows, cols, cols, 1)
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Element `(i, j)`; the caller keeps `i < rows`, `j < cols` (checked indexing backs it up).
    #[inline(always)]
    fn at(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.rs + j * self.cs]
    }
}

/// The output: a row-major view with a row stride (`col_stride = 1`) whose rows do not overlap.
/// It may be uninitialised ([`MatMut::uninit`]): `gemm` writes every element before it reads
/// any (a product's first K slab overwrites; the epilogue reads what the kernel stored).
#[derive(Debug)]
pub struct MatMut<'a> {
    ptr: *mut f32,
    rows: usize,
    cols: usize,
    rs: usize,
    _data: std::marker::PhantomData<&'a mut [f32]>,
}

impl<'a> MatMut<'a> {
    /// A view with row stride `row_stride`; `Err` if rows overlap or it reaches past `data`.
    pub fn new(
        data: &'a mut [f32],
        rows: usize,
        cols: usize,
        row_stride: usize,
    ) -> Result<Self, GemmError> {
        Self::checked(data.as_mut_ptr(), data.len(), rows, cols, row_stride)
    }

    /// A dense row-major view.
    pub fn row_major(data: &'a mut [f32], rows: usize, cols: usize) -> Result<Self, GemmError> {
        Self::new(data, rows, cols, cols)
    }

    /// A view with row stride `row_stride` of `len` values at `ptr`; `Err` if rows overlap or
    /// it reaches past `len`. For callers whose threads each write a disjoint strided block
    /// of one buffer (a conv's output channels × a pixel range).
    ///
    /// # Safety
    /// `ptr` is valid for reads and writes of `len` f32s for `'a`, and nothing else reads or
    /// writes the elements the view covers while it lives.
    pub unsafe fn from_raw(
        ptr: *mut f32,
        len: usize,
        rows: usize,
        cols: usize,
        row_stride: usize,
    ) -> Result<Self, GemmError> {
        Self::checked(ptr, len, rows, cols, row_stride)
    }

    /// A dense row-major view of uninitialised memory (a fresh `Vec`'s spare capacity), which
    /// `gemm` fills completely: the caller may `set_len` after an `Ok` return. Zeroing every
    /// output first cost 4% of bert_base_1l at two threads.
    pub fn uninit(
        data: &'a mut [std::mem::MaybeUninit<f32>],
        rows: usize,
        cols: usize,
    ) -> Result<Self, GemmError> {
        Self::checked(data.as_mut_ptr().cast(), data.len(), rows, cols, cols)
    }

    fn checked(
        ptr: *mut f32,
        len: usize,
        rows: usize,
        cols: usize,
        row_stride: usize,
    ) -> Result<Self, GemmError> {
        if rows > 1 && row_stride < cols {
            return Err(GemmError::OverlappingRows { row_stride, cols });
        }
        let needed = extent("output", rows, cols, row_stride, 1)?;
        if needed > len {
            return Err(GemmError::OutOfBounds {
                what: "output",
                needed,
                len,
            });
        }
        Ok(MatMut {
            ptr,
            rows,
            cols,
            rs: row_stride,
            _data: std::marker::PhantomData,
        })
    }
}

/// The right-hand operand: a plain view (packed inside the call) or a pre-packed weight.
#[derive(Debug, Clone, Copy)]
pub enum Rhs<'a> {
    /// Packed on every call.
    Plain(MatRef<'a>),
    /// Packed once with [`PackedB::pack`].
    Packed(&'a PackedB),
}

/// Which micro-kernel to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Isa {
    /// The best kernel the running CPU has (AVX-512F, else AVX2+FMA, else portable); with a
    /// pre-packed B, the best one whose layout matches the packing.
    #[default]
    Auto,
    /// The AVX-512F kernel (an error where the CPU lacks it).
    Avx512,
    /// The AVX2+FMA kernel (an error where the CPU lacks it).
    Avx2,
    /// The portable kernel, whatever the CPU (tests use it to cover the fallback).
    Portable,
}

impl Isa {
    /// Every forced kernel this CPU can run (tests and benchmarks iterate over it).
    pub fn available() -> Vec<Isa> {
        let mut v = Vec::new();
        if avx512::available() {
            v.push(Isa::Avx512);
        }
        if avx2::available() {
            v.push(Isa::Avx2);
        }
        v.push(Isa::Portable);
        v
    }

    /// A short name (`avx512`, `avx2`, `portable`, `auto`).
    pub fn name(self) -> &'static str {
        match self {
            Isa::Auto => "auto",
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Portable => "portable",
        }
    }
}

/// Run-time settings of a call.
#[derive(Debug, Clone, Copy)]
pub struct GemmConfig {
    /// Upper bound on threads; small problems use fewer.
    pub threads: usize,
    /// Micro-kernel selection.
    pub isa: Isa,
}

impl Default for GemmConfig {
    fn default() -> Self {
        GemmConfig {
            threads: physical_cores(),
            isa: Isa::Auto,
        }
    }
}

/// The number of physical cores (SMT siblings counted once), at least 1.
pub fn physical_cores() -> usize {
    static CORES: OnceLock<usize> = OnceLock::new();
    *CORES.get_or_init(|| {
        let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
        linux_physical_cores().unwrap_or(logical).clamp(1, logical)
    })
}

/// Distinct `thread_siblings_list` entries under sysfs: one per physical core.
fn linux_physical_cores() -> Option<usize> {
    let mut sets = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir("/sys/devices/system/cpu").ok()? {
        let path = entry.ok()?.path();
        let name = path.file_name()?.to_str()?.to_owned();
        if name
            .strip_prefix("cpu")
            .is_some_and(|d| d.parse::<u32>().is_ok())
        {
            if let Ok(s) = std::fs::read_to_string(path.join("topology/thread_siblings_list")) {
                sets.insert(s.trim().to_owned());
            }
        }
    }
    (!sets.is_empty()).then_some(sets.len())
}

/// The micro-kernel family chosen for a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KernelIsa {
    Avx512,
    Avx2Fma,
    Portable,
}

impl KernelIsa {
    fn name(self) -> &'static str {
        match self {
            KernelIsa::Avx512 => "avx512",
            KernelIsa::Avx2Fma => "avx2",
            KernelIsa::Portable => "portable",
        }
    }

    /// `(NR, KC)`: what a packed B's layout depends on.
    fn layout(self) -> (usize, usize) {
        match self {
            KernelIsa::Avx512 => (avx512::NR, avx512::KC),
            KernelIsa::Avx2Fma | KernelIsa::Portable => (avx2::NR, avx2::KC),
        }
    }

    fn mr(self) -> usize {
        match self {
            KernelIsa::Avx512 => avx512::MR,
            KernelIsa::Avx2Fma | KernelIsa::Portable => avx2::MR,
        }
    }

    /// The best kernel of this CPU, detected once per process.
    fn best() -> KernelIsa {
        static BEST: OnceLock<KernelIsa> = OnceLock::new();
        *BEST.get_or_init(|| {
            if avx512::available() {
                KernelIsa::Avx512
            } else if avx2::available() {
                KernelIsa::Avx2Fma
            } else {
                KernelIsa::Portable
            }
        })
    }
}

/// The kernel for `isa`, given the kernel a pre-packed B was packed for (if any).
fn select_kernel(isa: Isa, packed: Option<KernelIsa>) -> Result<KernelIsa, GemmError> {
    let kernel = match isa {
        Isa::Auto => match packed {
            None => KernelIsa::best(),
            // B's layout decides; AVX2-layout panels run on AVX2 only where the CPU has it.
            Some(KernelIsa::Avx2Fma | KernelIsa::Portable) if avx2::available() => {
                KernelIsa::Avx2Fma
            }
            Some(KernelIsa::Avx2Fma | KernelIsa::Portable) => KernelIsa::Portable,
            Some(KernelIsa::Avx512) => KernelIsa::Avx512,
        },
        Isa::Avx512 => KernelIsa::Avx512,
        Isa::Avx2 => KernelIsa::Avx2Fma,
        Isa::Portable => KernelIsa::Portable,
    };
    let present = match kernel {
        KernelIsa::Avx512 => avx512::available(),
        KernelIsa::Avx2Fma => avx2::available(),
        KernelIsa::Portable => true,
    };
    if !present {
        return Err(GemmError::IsaUnavailable { isa: kernel.name() });
    }
    if let Some(p) = packed {
        if p.layout() != kernel.layout() {
            return Err(GemmError::PackedForOtherKernel {
                packed: p.name(),
                kernel: kernel.name(),
            });
        }
    }
    Ok(kernel)
}

/// `c = epilogue(a · b)` on the process-wide shared pool of `config.threads` threads. Checks
/// every shape against every other and against the epilogue; returns `Err` on any mismatch
/// and never panics on caller input.
pub fn gemm(
    a: MatRef<'_>,
    b: Rhs<'_>,
    c: MatMut<'_>,
    epilogue: &Epilogue<'_>,
    config: &GemmConfig,
) -> Result<(), GemmError> {
    if config.threads == 0 {
        return Err(GemmError::ZeroThreads);
    }
    let pool = if config.threads == 1 {
        Pool::single()
    } else {
        Pool::shared(config.threads).map_err(|_| GemmError::ZeroThreads)?
    };
    gemm_in(&pool, a, b, c, epilogue, config)
}

/// `c = epilogue(a · b)` using at most `min(config.threads, pool.threads())` threads of
/// `pool`. Each thread owns a fixed rectangle of C (the split depends only on the shape and
/// the thread count), so results do not depend on scheduling.
pub fn gemm_in(
    pool: &Pool,
    a: MatRef<'_>,
    b: Rhs<'_>,
    c: MatMut<'_>,
    epilogue: &Epilogue<'_>,
    config: &GemmConfig,
) -> Result<(), GemmError> {
    if config.threads == 0 {
        return Err(GemmError::ZeroThreads);
    }
    let packed_here;
    let (b, kernel) = match b {
        Rhs::Packed(p) => (p, select_kernel(config.isa, Some(p.kernel()))?),
        Rhs::Plain(v) => {
            let kernel = select_kernel(config.isa, None)?;
            packed_here = PackedB::pack_kernel(v, kernel, false)?;
            (&packed_here, kernel)
        }
    };
    let (m, k, n) = (a.rows, a.cols, b.cols());
    let check = |what, expected, got| {
        if expected == got {
            Ok(())
        } else {
            Err(GemmError::Mismatch {
                what,
                expected,
                got,
            })
        }
    };
    check("rows of B (the contraction)", k, b.rows())?;
    check("rows of C", m, c.rows)?;
    check("columns of C", n, c.cols)?;
    epilogue.check(m, n)?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    let out = OutPtr {
        ptr: c.ptr,
        rs: c.rs,
    };
    let ctx = Ctx {
        a,
        b,
        out,
        ep: epilogue,
        n,
        k,
        kernel,
    };
    let (nr, _) = kernel.layout();
    let mr = kernel.mr();
    let npanels = n.div_ceil(nr);
    let flops = m.saturating_mul(n).saturating_mul(k).saturating_mul(2);
    let b_bytes = k.saturating_mul(n).saturating_mul(4);
    let by_work = (flops / MIN_FLOPS_PER_THREAD)
        .max(b_bytes / MIN_B_BYTES_PER_THREAD)
        .max(1);
    let threads = config.threads.min(pool.threads()).min(by_work);
    // Split rows unless there are too few row tiles to go round, or B is much wider than A
    // is tall. Rows: each thread packs only its own rows of A and reads the rows its core
    // last wrote (0.52 vs 0.55 ms on bert's 128 × 768 × 768 at two threads). Columns for the
    // FFN's 128 × 3072 × 768 (1.98 vs 2.14 ms with weights from DRAM): each thread then
    // streams only its half of the weights, and packing all of a small A costs less.
    let split_cols = m.div_ceil(mr) < 2 * threads || n > 6 * m;
    let units = if split_cols { npanels } else { m };
    let threads = threads.min(units).max(1);
    let range = |t: usize| (units * t / threads, units * (t + 1) / threads);
    // Rows are split evenly (64/64 for 128 rows, not 72/56 on whole 12-row tiles) and each
    // part tiles itself into near-equal tiles of at least four rows ([`tile_rows`]), which sum
    // every element exactly as the one-thread tiling does.
    let job = |t: usize| {
        let (lo, hi) = range(t);
        if split_cols {
            ctx.run(0, m, lo, hi);
        } else {
            ctx.run(lo, hi, 0, npanels);
        }
    };
    if threads == 1 {
        job(0);
    } else {
        pool.parallel_for(threads, job);
    }
    Ok(())
}

thread_local! {
    /// Each thread's packed-A block buffer, grown on demand and kept for later calls.
    static APACK: Cell<Option<AlignedBuf>> = const { Cell::new(None) };
}

/// Where a micro-kernel reads its A rows: element `(r, p)` (row `r` of the tile, step `p` of
/// the K slab) at `ptr + p·k_step + r·row_step`. A packed panel has `row_step = 1`,
/// `k_step = MR`; A read in place (row-major, the kernel's [`MicroKernel::DIRECT_A`]) has
/// `row_step` = A's row stride and `k_step = 1`.
#[derive(Debug, Clone, Copy)]
pub(super) struct APanel {
    pub(super) ptr: *const f32,
    pub(super) k_step: usize,
    pub(super) row_step: usize,
}

/// Cache lines (16 f32) of the next B panel that a micro-kernel call prefetches into L2: the
/// block's tiles share the next panel between them, so the reads into L2 are spread over the
/// whole panel's compute instead of stalling the first tile's loads. The AVX-512 assembly loop
/// spreads a tile's share evenly over its k steps; the Rust loops ([`Prefetch::step`]) issue
/// two per k step from the first.
#[derive(Debug, Clone, Copy)]
pub(super) struct Prefetch {
    /// The first line (only a hint: never dereferenced, may be null when `lines` is 0).
    pub(super) ptr: *const f32,
    /// How many consecutive lines.
    pub(super) lines: usize,
}

/// How an assembly k loop of `unroll` steps per iteration runs a `kc`-step slab: prefetch
/// points of two lines each, spread evenly over the iterations (one pair every `every`)
/// rather than bunched at the start ([`Prefetch::spread`]).
#[derive(Debug, Clone, Copy)]
pub(super) struct Spread {
    /// Prefetch points, each followed by `every` iterations.
    pub(super) npf: usize,
    pub(super) every: usize,
    /// Iterations after the last prefetch point.
    pub(super) rest: usize,
    /// Single k steps after the iterations (`kc % unroll`).
    pub(super) tail: usize,
}

impl Prefetch {
    /// This prefetch's points over a `kc`-step slab in iterations of `unroll` steps.
    pub(super) fn spread(&self, kc: usize, unroll: usize) -> Spread {
        let groups = kc / unroll;
        let pairs = self.lines.div_ceil(2);
        let every = groups.checked_div(pairs).unwrap_or(1).max(1);
        let npf = pairs.min(groups / every);
        Spread {
            npf,
            every,
            rest: groups - npf * every,
            tail: kc % unroll,
        }
    }

    /// Issues the prefetches of k step `p`: lines `2p` and `2p + 1`, where they are in range.
    #[inline(always)]
    pub(super) fn step(&self, p: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
            let l = 2 * p;
            // SAFETY: a prefetch is a hint that never faults, whatever the address (hence
            // wrapping_add; SSE is baseline on x86-64).
            unsafe {
                if l < self.lines {
                    _mm_prefetch::<_MM_HINT_T1>(self.ptr.wrapping_add(l * 16).cast());
                }
                if l + 1 < self.lines {
                    _mm_prefetch::<_MM_HINT_T1>(self.ptr.wrapping_add(l * 16 + 16).cast());
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = p;
    }
}

/// Depth of the K slab that starts at `k0` (`k0 < k`) for a kernel family of slab depth
/// `kc_max`: `kc_max`, except that a K of up to 1.5 `kc_max` is one slab (ViT's K = 384: one
/// 384-deep slab instead of 256 + 128 saves re-reading and re-storing C; 197 × 1536 × 384
/// went from 160 to 165 GFLOP/s). [`PackedB`] and the loop nest both slice K with it.
pub(super) fn slab_depth(kc_max: usize, k: usize, k0: usize) -> usize {
    if k <= kc_max + kc_max / 2 {
        k - k0
    } else {
        kc_max.min(k - k0)
    }
}

/// Tile `t` of the `nt = ceil(mc / MR)` register tiles that cover an `mc`-row block, as
/// `(first row, rows)`: heights differ by at most one (128 rows are 7 × 12 + 4 × 11, not
/// 10 × 12 + 8), so no thread gets a slow short tile. A tile of four or more rows sums each
/// element over k in the same order whatever its height (only 1–3-row tiles interleave
/// accumulators), and every block of four or more rows tiles into such tiles, so outputs do
/// not depend on how rows are split between threads.
#[inline(always)]
fn tile_rows(mc: usize, nt: usize, t: usize) -> (usize, usize) {
    let (lo, hi) = (mc * t / nt, mc * (t + 1) / nt);
    (lo, hi - lo)
}

/// The output as a raw pointer so that threads can each write their own rectangle.
#[derive(Clone, Copy)]
struct OutPtr {
    ptr: *mut f32,
    rs: usize,
}

// SAFETY: the pointer comes from a `&mut [f32]` borrowed for the whole `gemm` call, and
// threads write pairwise-disjoint rectangles of it (disjoint column or row ranges). `MatMut`
// guarantees rows do not overlap (`rs >= cols` when `rows > 1`), so disjoint rectangles are
// disjoint memory.
unsafe impl Send for OutPtr {}
// SAFETY: as above; shared references to `OutPtr` only hand out the pointer.
unsafe impl Sync for OutPtr {}

/// Everything a worker needs, validated.
struct Ctx<'a> {
    a: MatRef<'a>,
    b: &'a PackedB,
    out: OutPtr,
    ep: &'a Epilogue<'a>,
    n: usize,
    k: usize,
    kernel: KernelIsa,
}

impl Ctx<'_> {
    /// Computes rows `i_lo..i_hi` and panels `p_lo..p_hi` (columns `p·NR ..`) of C.
    fn run(&self, i_lo: usize, i_hi: usize, p_lo: usize, p_hi: usize) {
        match self.kernel {
            // SAFETY: `Avx512` is only selected after `avx512::available()` confirmed
            // AVX-512F on this CPU (AVX2 and FMA come with every AVX-512F CPU).
            KernelIsa::Avx512 => unsafe { avx512::run(self, i_lo, i_hi, p_lo, p_hi) },
            // SAFETY: `Avx2Fma` is only selected after `avx2::available()` confirmed AVX2 and
            // FMA on this CPU.
            KernelIsa::Avx2Fma => unsafe { avx2::run(self, i_lo, i_hi, p_lo, p_hi) },
            KernelIsa::Portable => self.block_loop::<portable::Portable>(i_lo, i_hi, p_lo, p_hi),
        }
    }

    /// The loop nest around the micro-kernel. Inlined into each kernel's entry point so the
    /// epilogue is compiled with that kernel's target features.
    #[inline(always)]
    fn block_loop<K: MicroKernel>(&self, i_lo: usize, i_hi: usize, p_lo: usize, p_hi: usize) {
        let (n, k) = (self.n, self.k);
        let (mr, nr) = (K::MR, K::NR);
        debug_assert_eq!(self.b.layout(), (K::NR, K::KC));
        if i_lo >= i_hi || p_lo >= p_hi {
            return;
        }
        if k == 0 {
            // No products: C = epilogue(0) over this worker's rectangle.
            let (j0, j1) = (p_lo * nr, (p_hi * nr).min(n));
            for i in i_lo..i_hi {
                // SAFETY: row `i < m` and columns `j0..j1 <= n` are inside the output view
                // and inside this worker's rectangle (raw writes: it may be uninitialised).
                unsafe { std::ptr::write_bytes(self.out_ptr(i, j0), 0, j1 - j0) };
            }
            // SAFETY: the worker's rectangle, inside the output, written only by this worker;
            // the kernel's target features are enabled in its entry point.
            unsafe { K::epilogue(self.ep, self.out, i_lo, i_hi - i_lo, j0, j1 - j0) };
            return;
        }
        // A read in place, not packed: one row with contiguous A (GEMV), or a row-major A
        // for a kernel that reads strided rows ([`MicroKernel::DIRECT_A`]). With AVX-512's
        // assembly k loop, in place was as fast or faster than packed for every shape measured
        // (one thread, weights from L3: 128 × 768 × 768 160 → 175 GFLOP/s, 128 × 512 × 512
        // 164 → 182, 128 × 3072 × 768 and 128 × 1024 × 1024 level; row strides of 2–8 KiB
        // included), so it no longer depends on how many panels reuse a packed block.
        let direct_a = (self.a.cs == 1 || k == 1) && (i_hi - i_lo == 1 || K::DIRECT_A);
        // The A block buffer is per thread and reused across calls: a fresh zeroed 384 KiB
        // allocation per call costs page faults or a memset comparable to packing itself on
        // the small (128 × 768) projections. Sized to this call's largest block.
        let a_len = if direct_a {
            0
        } else {
            K::MC.min(i_hi - i_lo).div_ceil(mr) * mr * slab_depth(K::KC, k, 0)
        };
        // Taken out of the cell rather than borrowed in a closure, so that the loop below
        // stays in this function (and its caller's target features).
        let mut apack = APACK
            .with(Cell::take)
            .filter(|b| b.len() >= a_len)
            .unwrap_or_else(|| AlignedBuf::new(a_len));
        let nc_panels = (NC / nr).max(1);
        let mut jc = p_lo;
        while jc < p_hi {
            let jc_end = (jc + nc_panels).min(p_hi);
            let mut k0 = 0;
            while k0 < k {
                let kc = slab_depth(K::KC, k, k0);
                let (first, last) = (k0 == 0, k0 + kc == k);
                let mut ic = i_lo;
                while ic < i_hi {
                    let mc = K::MC.min(i_hi - ic);
                    let nt = mc.div_ceil(mr);
                    let ap = apack.as_mut_slice();
                    let a_base = if direct_a {
                        // Element (ic, k0) of A: in bounds (ic < m, k0 < k, the view checked).
                        self.a.data[ic * self.a.rs + k0 * self.a.cs..].as_ptr()
                    } else {
                        pack_a(&self.a, ic, mc, k0, kc, mr, ap);
                        ap.as_ptr()
                    };
                    for jp in jc..jc_end {
                        let bp = self.b.panel(k0, kc, jp);
                        // The next panel this worker reads, prefetched a share per tile
                        // (null when there is none).
                        let next = if jp + 1 < jc_end {
                            self.b.panel(k0, kc, jp + 1).as_ptr()
                        } else if ic + mc < i_hi {
                            self.b.panel(k0, kc, jc).as_ptr()
                        } else if !last {
                            self.b
                                .panel(k0 + kc, slab_depth(K::KC, k, k0 + kc), jc)
                                .as_ptr()
                        } else if jc_end < p_hi {
                            self.b.panel(0, slab_depth(K::KC, k, 0), jc_end).as_ptr()
                        } else {
                            std::ptr::null()
                        };
                        let j0 = jp * nr;
                        let w = nr.min(n - j0);
                        let panel_lines = if next.is_null() { 0 } else { kc * nr / 16 };
                        let share = panel_lines.div_ceil(nt);
                        for t in 0..nt {
                            let (r0, rows) = tile_rows(mc, nt, t);
                            let i0 = ic + r0;
                            let a = if direct_a {
                                APanel {
                                    ptr: a_base.wrapping_add(r0 * self.a.rs),
                                    k_step: 1,
                                    row_step: self.a.rs,
                                }
                            } else {
                                APanel {
                                    ptr: a_base.wrapping_add(t * mr * kc),
                                    k_step: mr,
                                    row_step: 1,
                                }
                            };
                            let pf = Prefetch {
                                ptr: next.wrapping_add(t * share * 16),
                                lines: share.min(panel_lines.saturating_sub(t * share)),
                            };
                            // SAFETY: rows `i0..i0 + rows` and columns `j0..j0 + w` lie inside
                            // the output (checked at the API boundary) and inside this
                            // worker's rectangle; `a` addresses rows `i0..i0 + rows`, columns
                            // `k0..k0 + kc` of A in place (inside the checked view; with
                            // k = 1 only column 0 is read) or the packed panel `t` (`kc·mr`
                            // values); the B panel holds `kc·nr`; `next` is only a hint.
                            // The epilogue's rectangle is that same tile.
                            if last {
                                // SAFETY: as above.
                                unsafe {
                                    K::kernel_last(
                                        kc,
                                        a,
                                        bp,
                                        (self.out, i0, j0),
                                        rows,
                                        w,
                                        !first,
                                        pf,
                                        self.ep,
                                    )
                                };
                            } else {
                                // SAFETY: as above.
                                unsafe {
                                    K::kernel(
                                        kc,
                                        a,
                                        bp,
                                        self.out_ptr(i0, j0),
                                        self.out.rs,
                                        rows,
                                        w,
                                        !first,
                                        pf,
                                    )
                                };
                            }
                        }
                    }
                    ic += mc;
                }
                k0 += kc;
            }
            jc = jc_end;
        }
        APACK.with(|c| c.set(Some(apack)));
    }

    /// Pointer to C(i, j).
    ///
    /// # Safety
    /// `i < m` and `j < n`.
    #[inline(always)]
    unsafe fn out_ptr(&self, i: usize, j: usize) -> *mut f32 {
        // SAFETY: in bounds of the output slice by the caller's contract and `MatMut::new`.
        unsafe { self.out.ptr.add(i * self.out.rs + j) }
    }
}

/// A register-tile micro-kernel: `C[rows × cols] (+)= A_panel · B_panel`, with its blocking.
trait MicroKernel {
    /// Rows of the register tile.
    const MR: usize;
    /// Columns of the register tile (and of a packed B panel).
    const NR: usize;
    /// Depth of a K slab.
    const KC: usize;
    /// Rows of a packed A block (a multiple of `MR`).
    const MC: usize;
    /// Whether the kernel reads a row-major A in place (strided rows) instead of packed.
    const DIRECT_A: bool = false;

    /// # Safety
    /// `c` points to `rows` rows of `cols` writable f32 with row stride `ldc`, not aliased by
    /// any live reference; `a` is readable at `p·k_step + r·row_step` for `p < kc`,
    /// `r < rows` (and, packed, for every `r < MR`, zero-padded); `b`
    /// holds at least `kc·NR` values; `1 <= rows <= MR`, `1 <= cols <= NR`; the CPU supports
    /// the kernel's target features. `pf` names lines to prefetch (hints, never dereferenced).
    #[allow(clippy::too_many_arguments)]
    unsafe fn kernel(
        kc: usize,
        a: APanel,
        b: &[f32],
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        accumulate: bool,
        pf: Prefetch,
    );

    /// The last K slab of a tile: [`Self::kernel`], then [`Self::epilogue`] on the finished
    /// tile `(i0, j0)` of `out`. A kernel that applies the epilogue in registers before its
    /// store overrides this.
    ///
    /// # Safety
    /// As [`Self::kernel`] and [`Self::epilogue`] for the same tile (`c` is C(i0, j0)).
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn kernel_last(
        kc: usize,
        a: APanel,
        b: &[f32],
        (out, i0, j0): (OutPtr, usize, usize),
        rows: usize,
        cols: usize,
        accumulate: bool,
        pf: Prefetch,
        ep: &Epilogue<'_>,
    ) {
        // SAFETY: forwarded.
        unsafe {
            kernel_then_epilogue::<Self>(kc, a, b, (out, i0, j0), rows, cols, accumulate, pf, ep)
        }
    }

    /// The epilogue on a tile just finished (scalar unless the kernel has a SIMD one).
    ///
    /// # Safety
    /// As [`Epilogue::apply`], plus the kernel's target features.
    #[inline(always)]
    unsafe fn epilogue(
        ep: &Epilogue<'_>,
        out: OutPtr,
        i0: usize,
        rows: usize,
        j0: usize,
        w: usize,
    ) {
        // SAFETY: forwarded.
        unsafe { ep.apply(out, i0, rows, j0, w) }
    }
}

/// [`MicroKernel::kernel_last`] without registers: the kernel stores the tile, then the
/// epilogue runs on it in memory (the default, and a register kernel's fallback).
///
/// # Safety
/// As [`MicroKernel::kernel_last`].
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn kernel_then_epilogue<K: MicroKernel + ?Sized>(
    kc: usize,
    a: APanel,
    b: &[f32],
    (out, i0, j0): (OutPtr, usize, usize),
    rows: usize,
    cols: usize,
    accumulate: bool,
    pf: Prefetch,
    ep: &Epilogue<'_>,
) {
    // SAFETY: forwarded.
    unsafe {
        let c = out.ptr.add(i0 * out.rs + j0);
        K::kernel(kc, a, b, c, out.rs, rows, cols, accumulate, pf);
        K::epilogue(ep, out, i0, rows, j0, cols);
    }
}

/// An edge-tile buffer for kernels that always write `rows × NR`: [`EdgeTile::target`] gives
/// where the full-width kernel should write (C itself when `cols == NR`, else the buffer), and
/// [`EdgeTile::finish`] stores (or adds) the buffer's first `cols` columns into C. Plain
/// functions, not a closure, so that the kernel call inlines into the caller's target features.
pub(super) struct EdgeTile {
    tile: [f32; MAX_TILE],
}

impl EdgeTile {
    #[inline(always)]
    pub(super) fn new() -> Self {
        EdgeTile {
            tile: [0.0; MAX_TILE],
        }
    }

    /// `(pointer, row stride, accumulate)` for the full-width kernel.
    #[inline(always)]
    pub(super) fn target<const NR: usize>(
        &mut self,
        c: *mut f32,
        ldc: usize,
        cols: usize,
        accumulate: bool,
    ) -> (*mut f32, usize, bool) {
        if cols == NR {
            (c, ldc, accumulate)
        } else {
            (self.tile.as_mut_ptr(), NR, false)
        }
    }

    /// Copies the buffered tile into C when the kernel wrote to the buffer.
    ///
    /// # Safety
    /// `c` points to `rows` rows of `cols` writable f32 at stride `ldc`, not aliased;
    /// `rows · NR <= MAX_TILE`.
    #[inline(always)]
    pub(super) unsafe fn finish<const NR: usize>(
        &self,
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        accumulate: bool,
    ) {
        if cols == NR {
            return;
        }
        for r in 0..rows {
            let t = &self.tile[r * NR..r * NR + cols];
            if accumulate {
                // SAFETY: row `r < rows` of C, `cols` values, by the caller's contract, and
                // already written (an earlier slab stored it).
                let row = unsafe { std::slice::from_raw_parts_mut(c.add(r * ldc), cols) };
                row.iter_mut().zip(t).for_each(|(c, t)| *c += t);
            } else {
                // SAFETY: as above; raw, since C may still be uninitialised.
                unsafe { std::ptr::copy_nonoverlapping(t.as_ptr(), c.add(r * ldc), cols) };
            }
        }
    }
}
