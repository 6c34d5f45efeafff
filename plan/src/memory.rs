//! The memory planner: value liveness over a plan's kernels → offsets in one arena, and
//! the planned peak bytes. Sizes are those of one run (symbolic dims bound), so
//! the CPU executor plans from the tensors a run actually produced.

use kiln_ir::ValueId;

/// Every placement starts on this boundary (a cache line; what SIMD loads like).
pub const ALIGN: usize = 64;

/// One intermediate value's lifetime: produced by kernel `start`, last read by kernel
/// `end` (inclusive; graph outputs stay live to the last kernel).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Interval {
    /// The value.
    pub value: ValueId,
    /// Its size in bytes.
    pub bytes: usize,
    /// The kernel that produces it.
    pub start: usize,
    /// The last kernel that needs it (`>= start`).
    pub end: usize,
}

/// Where one value lives in the arena.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    /// The value and its lifetime.
    pub interval: Interval,
    /// Its byte offset in the arena (a multiple of [`ALIGN`]).
    pub offset: usize,
}

/// Where each intermediate value lives in the arena for one set of input shapes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MemoryPlan {
    /// The arena size: the largest `offset + bytes` over all placed values.
    pub arena_bytes: usize,
    /// The most bytes live at once, sizes rounded up to [`ALIGN`] (a lower bound on
    /// `arena_bytes`).
    pub live_peak_bytes: usize,
    /// Every placed value, in the order of the intervals given to [`plan`].
    pub values: Vec<Placement>,
}

fn aligned(bytes: usize) -> usize {
    bytes.div_ceil(ALIGN) * ALIGN
}

fn overlaps(a: &Interval, b: &Interval) -> bool {
    a.start <= b.end && b.start <= a.end
}

/// Places `intervals` in one arena: largest first, each into the smallest gap between the
/// already-placed values whose lifetimes overlap its own (best fit), else above them.
pub fn plan(intervals: &[Interval]) -> MemoryPlan {
    let mut order: Vec<usize> = (0..intervals.len()).collect();
    order.sort_by(|&a, &b| {
        let (x, y) = (&intervals[a], &intervals[b]);
        y.bytes.cmp(&x.bytes).then(x.start.cmp(&y.start))
    });
    let mut offsets: Vec<Option<usize>> = vec![None; intervals.len()];
    let mut busy: Vec<(usize, usize)> = vec![];
    for &i in &order {
        let iv = &intervals[i];
        let size = aligned(iv.bytes);
        busy.clear();
        busy.extend(
            (0..intervals.len())
                .filter(|&j| overlaps(iv, &intervals[j]))
                .filter_map(|j| offsets[j].map(|o| (o, o + aligned(intervals[j].bytes)))),
        );
        busy.sort_unstable();
        let mut best: Option<(usize, usize)> = None; // (gap size, offset)
        let mut cursor = 0usize;
        for &(lo, hi) in &busy {
            if lo > cursor {
                let gap = lo - cursor;
                if gap >= size && best.is_none_or(|(g, _)| gap < g) {
                    best = Some((gap, cursor));
                }
            }
            cursor = cursor.max(hi);
        }
        offsets[i] = Some(best.map_or(cursor, |(_, o)| o));
    }
    let values: Vec<Placement> = intervals
        .iter()
        .zip(&offsets)
        .map(|(iv, o)| Placement {
            interval: *iv,
            offset: o.unwrap_or(0),
        })
        .collect();
    let arena_bytes = values
        .iter()
        .map(|p| p.offset + aligned(p.interval.bytes))
        .max()
        .unwrap_or(0);
    let steps = intervals.iter().map(|iv| iv.end + 1).max().unwrap_or(0);
    let mut delta = vec![0isize; steps + 1];
    for iv in intervals {
        delta[iv.start] += aligned(iv.bytes) as isize;
        delta[iv.end + 1] -= aligned(iv.bytes) as isize;
    }
    let (mut live, mut live_peak_bytes) = (0isize, 0usize);
    for d in delta {
        live += d;
        live_peak_bytes = live_peak_bytes.max(live as usize);
    }
    MemoryPlan {
        arena_bytes,
        live_peak_bytes,
        values,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iv(v: u32, bytes: usize, start: usize, end: usize) -> Interval {
        Interval {
            value: ValueId(v),
            bytes,
            start,
            end,
        }
    }

    fn check_no_overlap(p: &MemoryPlan) {
        for (i, a) in p.values.iter().enumerate() {
            assert_eq!(a.offset % ALIGN, 0);
            assert!(a.offset + a.interval.bytes <= p.arena_bytes);
            for b in &p.values[i + 1..] {
                if overlaps(&a.interval, &b.interval)
                    && a.interval.bytes > 0
                    && b.interval.bytes > 0
                {
                    let disjoint = a.offset + a.interval.bytes <= b.offset
                        || b.offset + b.interval.bytes <= a.offset;
                    assert!(disjoint, "{a:?} and {b:?} overlap");
                }
            }
        }
        assert!(p.arena_bytes >= p.live_peak_bytes, "{p:?}");
    }

    #[test]
    fn a_chain_reuses_two_buffers() {
        // v0 -> v1 -> v2 -> v3, each read only by the next kernel: two slots suffice.
        let p = plan(&[
            iv(0, 1000, 0, 1),
            iv(1, 1000, 1, 2),
            iv(2, 1000, 2, 3),
            iv(3, 1000, 3, 3),
        ]);
        check_no_overlap(&p);
        assert_eq!(p.live_peak_bytes, 2 * 1024);
        assert_eq!(p.arena_bytes, 2 * 1024);
        let offs: Vec<usize> = p.values.iter().map(|v| v.offset).collect();
        assert_eq!(offs, vec![0, 1024, 0, 1024]);
    }

    #[test]
    fn best_fit_takes_the_smallest_hole() {
        // Live together at step 2: a hole of 128 (after v1 dies) and space above.
        let p = plan(&[
            iv(0, 512, 0, 5),
            iv(1, 128, 0, 1),
            iv(2, 256, 0, 5),
            iv(3, 64, 2, 3),
        ]);
        check_no_overlap(&p);
        let v1 = p.values[1].offset;
        assert_eq!(p.values[3].offset, v1, "{p:?}");
        assert_eq!(p.arena_bytes, 512 + 256 + 128);
    }

    #[test]
    fn random_lifetimes_never_overlap() {
        let mut s = 12345u64;
        let mut next = |m: usize| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 33) as usize % m
        };
        for _ in 0..200 {
            let n = 1 + next(30);
            let ivs: Vec<Interval> = (0..n)
                .map(|v| {
                    let start = next(20);
                    iv(v as u32, next(5000), start, start + next(8))
                })
                .collect();
            check_no_overlap(&plan(&ivs));
        }
    }
}
