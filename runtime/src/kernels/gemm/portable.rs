//! The portable micro-kernel: plain Rust over an `MR × NR` array, correct on any CPU (the
//! compiler vectorises it for the baseline target).

use super::{MicroKernel, MR, NR};

pub(super) struct Portable;

impl MicroKernel for Portable {
    #[inline(always)]
    unsafe fn kernel(
        kc: usize,
        a: &[f32],
        b: &[f32],
        c: *mut f32,
        ldc: usize,
        rows: usize,
        accumulate: bool,
    ) {
        let mut acc = [[0.0f32; NR]; MR];
        for (ak, bk) in a.chunks_exact(MR).zip(b.chunks_exact(NR)).take(kc) {
            for (acc_r, &av) in acc.iter_mut().zip(ak) {
                for (x, &bv) in acc_r.iter_mut().zip(bk) {
                    *x += av * bv;
                }
            }
        }
        for (r, acc_r) in acc.iter().enumerate().take(rows) {
            // SAFETY: the trait contract: `c` has `rows` writable rows of NR at stride `ldc`,
            // not aliased by any live reference.
            let row = unsafe { std::slice::from_raw_parts_mut(c.add(r * ldc), NR) };
            if accumulate {
                row.iter_mut().zip(acc_r).for_each(|(c, a)| *c += a);
            } else {
                row.copy_from_slice(acc_r);
            }
        }
    }
}
