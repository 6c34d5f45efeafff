//! The portable micro-kernel: plain Rust over an `MR × NR` array, correct on any CPU (the
//! compiler vectorises it for the baseline target).

use super::avx2::{KC, MC, MR, NR};
use super::MicroKernel;

/// Same tile and layout as the AVX2 kernel, so a B packed for either runs with both.
pub(super) struct Portable;

impl MicroKernel for Portable {
    const MR: usize = MR;
    const NR: usize = NR;
    const KC: usize = KC;
    const MC: usize = MC;

    #[inline(always)]
    unsafe fn kernel(
        kc: usize,
        a: super::APanel,
        b: &[f32],
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        accumulate: bool,
        _pf: super::Prefetch,
    ) {
        // SAFETY: the trait contract.
        unsafe {
            let mut edge = super::EdgeTile::new();
            let (t, ldt, acc) = edge.target::<NR>(c, ldc, cols, accumulate);
            portable_tile(kc, a, b, t, ldt, rows, acc);
            edge.finish::<NR>(c, ldc, rows, cols, accumulate);
        }
    }
}

/// The full-width tile.
///
/// # Safety
/// As [`MicroKernel::kernel`] with `cols == NR`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn portable_tile(
    kc: usize,
    a: super::APanel,
    b: &[f32],
    c: *mut f32,
    ldc: usize,
    rows: usize,
    accumulate: bool,
) {
    {
        let mut acc = [[0.0f32; NR]; MR];
        // A packed panel has all MR rows (zero-padded): a fixed-size row loop vectorises.
        let packed = a.k_step == MR && a.row_step == 1;
        let live = if packed { MR } else { rows };
        for (p, bk) in b.chunks_exact(NR).take(kc).enumerate() {
            for (r, acc_r) in acc.iter_mut().enumerate().take(live) {
                // SAFETY: the contract: `a` readable at `p·k_step + r·row_step` for
                // `r < rows`, and a packed panel for every `r < MR`.
                let av = unsafe { *a.ptr.add(p * a.k_step + r * a.row_step) };
                for (x, &bv) in acc_r.iter_mut().zip(bk) {
                    *x += av * bv;
                }
            }
        }
        for (r, acc_r) in acc.iter().enumerate().take(rows) {
            // SAFETY: the trait contract: `c` has `rows` writable rows of NR at stride `ldc`,
            // not aliased by any live reference.
            if accumulate {
                let row = unsafe { std::slice::from_raw_parts_mut(c.add(r * ldc), NR) };
                row.iter_mut().zip(acc_r).for_each(|(c, a)| *c += a);
            } else {
                // Raw: C may still be uninitialised.
                unsafe { std::ptr::copy_nonoverlapping(acc_r.as_ptr(), c.add(r * ldc), NR) };
            }
        }
    }
}
