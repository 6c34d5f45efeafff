//! The arena a run's intermediate values live in: one block per run, laid out by the
//! [`kiln_plan::memory`] plan recorded on the first run with the same input shapes, blocks
//! reused from run to run; the pool that graph outputs come from and go back to when the
//! caller drops them; and [`Outputs`], through which a kernel takes its outputs' planned
//! regions or pooled memory (or fresh memory where a value has neither).

use kiln_ir::{Buf, DType, Elem, ValueId};
use kiln_plan::memo::ShapesKey;
use kiln_plan::memory::{MemoryPlan, ALIGN};
use std::alloc::Layout;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};

/// Input-shape sets whose arena layouts a plan keeps; past this many, the oldest go.
const MAX_LAYOUTS: usize = 16;
/// Free blocks a plan keeps for reuse (one per concurrent run).
const MAX_FREE_BLOCKS: usize = 8;
/// Graph outputs smaller than this come from the allocator as before: small allocations
/// are served from the heap's bins without faulting in pages, and pooling them would only
/// add a lock.
const MIN_POOLED_OUTPUT_BYTES: usize = 64 << 10;
/// The most memory dropped outputs may keep in a plan's pool, and how many blocks.
const MAX_POOLED_BYTES: usize = 256 << 20;
const MAX_POOLED_BLOCKS: usize = 64;
/// A pooled block is reused for an output that needs at least this fraction of it.
const POOLED_FIT_DIVISOR: usize = 2;

/// Zeroed, [`ALIGN`]-aligned memory for one run's intermediate values.
pub struct Block {
    ptr: std::ptr::NonNull<u8>,
    layout: Layout,
}

// SAFETY: a `Block` is plain memory; who writes where is governed by the regions handed out
// (see `Outputs::region`), never by the block itself.
unsafe impl Send for Block {}
// SAFETY: as above.
unsafe impl Sync for Block {}
impl std::panic::RefUnwindSafe for Block {}

impl Block {
    fn new(bytes: usize) -> Option<Block> {
        let layout = Layout::from_size_align(bytes.max(ALIGN), ALIGN).ok()?;
        // SAFETY: the layout's size is non-zero. Zeroed, so every byte is initialised.
        let ptr = std::ptr::NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) })?;
        Some(Block { ptr, layout })
    }

    /// The block's size in bytes.
    pub fn bytes(&self) -> usize {
        self.layout.size()
    }
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Block({} bytes)", self.bytes())
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// Where one input-shape set's values go: the memory plan, and each placed value's
/// `(offset, bytes)`.
#[derive(Debug)]
pub struct ArenaLayout {
    /// The plan the offsets come from.
    pub plan: MemoryPlan,
    slots: HashMap<ValueId, (usize, usize)>,
    /// Values that took over their input's buffer (a reshape at the input's last use) in
    /// the recorded run: that buffer's interval covers them. Only these may take over a
    /// region.
    takeovers: HashSet<ValueId>,
}

impl ArenaLayout {
    /// Builds the layout from a recorded run: its intervals and the values that took over
    /// their input's buffer.
    pub fn new(plan: MemoryPlan, takeovers: HashSet<ValueId>) -> ArenaLayout {
        let slots = plan
            .values
            .iter()
            .map(|p| (p.interval.value, (p.offset, p.interval.bytes)))
            .collect();
        ArenaLayout {
            plan,
            slots,
            takeovers,
        }
    }

    /// Whether `v` took over its input's buffer in the recorded run.
    pub fn is_takeover(&self, v: ValueId) -> bool {
        self.takeovers.contains(&v)
    }
}

/// Blocks that dropped graph outputs left behind, for the next run's outputs.
type PoolFree = Mutex<Vec<Block>>;

/// The owner of a pooled output's memory: gives the block back to its pool (if the pool
/// still exists and has room) when the output's last clone of it goes.
struct Pooled {
    block: Option<Block>,
    home: Weak<PoolFree>,
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let (Some(b), Some(home)) = (self.block.take(), self.home.upgrade()) else {
            return;
        };
        let mut free = home.lock().unwrap_or_else(|e| e.into_inner());
        let kept: usize = free.iter().map(Block::bytes).sum();
        if free.len() < MAX_POOLED_BLOCKS && kept + b.bytes() <= MAX_POOLED_BYTES {
            free.push(b);
        }
    }
}

/// The memory graph outputs are written into: blocks that come back when the caller drops
/// an output, so a run that returns large outputs every time (a KV cache) reuses pages
/// already faulted in instead of new ones (glibc trims and re-maps the heap otherwise).
#[derive(Debug, Default)]
pub struct OutputPool {
    free: Arc<PoolFree>,
}

impl OutputPool {
    /// `n` elements of `T` in pooled memory, or `None` for outputs below
    /// [`MIN_POOLED_OUTPUT_BYTES`] and bools. The elements hold stale values: the kernel
    /// must write every one.
    pub fn take<T: Elem>(&self, n: usize) -> Option<Buf<T>> {
        let bytes = n.checked_mul(size_of::<T>())?;
        if T::DTYPE == DType::Bool || bytes < MIN_POOLED_OUTPUT_BYTES || align_of::<T>() > ALIGN {
            return None;
        }
        let reused = {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            let fits = |b: &Block| b.bytes() >= bytes && b.bytes() / POOLED_FIT_DIVISOR <= bytes;
            let best = (0..free.len())
                .filter(|&i| fits(&free[i]))
                .min_by_key(|&i| free[i].bytes());
            best.map(|i| free.swap_remove(i))
        };
        let block = match reused {
            Some(b) => b,
            None => Block::new(bytes)?,
        };
        if cfg!(debug_assertions) {
            // SAFETY: the block is `bytes()` long and nobody else holds it. NaN bytes, so a
            // kernel that leaves part of an output unwritten fails the tests.
            unsafe { std::ptr::write_bytes(block.ptr.as_ptr(), 0xFF, block.bytes()) };
        }
        let ptr = block.ptr.as_ptr().cast::<T>();
        let owner: kiln_ir::buf::Owner = Arc::new(Pooled {
            block: Some(block),
            home: Arc::downgrade(&self.free),
        });
        // SAFETY: the block is ALIGN-aligned (ALIGN >= align_of::<T>(), checked), at least
        // `bytes` long, initialised (zeroed when made, then only written with non-bool
        // element values, and every bit pattern is a valid non-bool element), and owned by
        // `owner` alone, which keeps it alive and hands it to no one else while it lives.
        Some(unsafe { Buf::pooled(owner, ptr, n) })
    }

    /// How many blocks the pool holds now.
    pub fn free_blocks(&self) -> usize {
        self.free.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// A plan's arena layouts (per input-shape set) and its free blocks.
#[derive(Debug, Default)]
pub struct Arenas {
    layouts: Mutex<Vec<(ShapesKey, Arc<ArenaLayout>)>>,
    free: Mutex<Vec<Block>>,
    /// Where graph outputs come from.
    pub outputs: Arc<OutputPool>,
}

/// A clone shares the recorded layouts, not the free blocks or the output pool.
impl Clone for Arenas {
    fn clone(&self) -> Self {
        let l = self.layouts.lock().unwrap_or_else(|e| e.into_inner());
        Arenas {
            layouts: Mutex::new(l.clone()),
            free: Mutex::new(Vec::new()),
            outputs: Default::default(),
        }
    }
}

impl Arenas {
    /// The layout recorded for these input shapes, if any.
    pub fn layout(&self, key: &[usize]) -> Option<Arc<ArenaLayout>> {
        let l = self.layouts.lock().unwrap_or_else(|e| e.into_inner());
        l.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
    }

    /// Keeps `layout` for these input shapes (the oldest goes past [`MAX_LAYOUTS`]).
    pub fn store(&self, key: ShapesKey, layout: ArenaLayout) {
        let mut l = self.layouts.lock().unwrap_or_else(|e| e.into_inner());
        if l.iter().any(|(k, _)| *k == key) {
            return;
        }
        if l.len() >= MAX_LAYOUTS {
            l.remove(0);
        }
        l.push((key, Arc::new(layout)));
    }

    /// A block of at least `bytes` for one run: a free one if one is big enough, else new.
    /// Debug builds fill it with NaN bytes first, so a kernel that leaves part of its
    /// region unwritten fails the tests instead of passing on last run's values.
    pub fn take(&self, bytes: usize) -> Option<Arc<Block>> {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        let found = free.iter().position(|b| b.bytes() >= bytes);
        let block = match found {
            Some(i) => free.swap_remove(i),
            None => {
                drop(free);
                Block::new(bytes)?
            }
        };
        if cfg!(debug_assertions) {
            // SAFETY: the block is `bytes()` long and nobody else holds it.
            unsafe { std::ptr::write_bytes(block.ptr.as_ptr(), 0xFF, block.bytes()) };
        }
        Some(Arc::new(block))
    }

    /// Returns a run's block for reuse. A block some buffer still points into (a region
    /// that escaped the run) is not reused: it is freed when that buffer goes.
    pub fn give_back(&self, block: Arc<Block>) {
        if let Ok(b) = Arc::try_unwrap(block) {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            if free.len() < MAX_FREE_BLOCKS {
                free.push(b);
            }
        }
    }
}

/// The places a kernel's outputs may go: output `i`'s planned region in this run's block,
/// when it has one (each region is handed out once), or pooled memory for a graph output.
pub struct Outputs {
    block: Option<Arc<Block>>,
    slots: Vec<Option<(usize, usize)>>,
    /// The pool, and which outputs are graph outputs that may take pooled memory.
    pooled: Option<(Arc<OutputPool>, Vec<bool>)>,
}

impl Outputs {
    /// No regions: every output is fresh memory.
    pub fn none() -> Outputs {
        Outputs {
            block: None,
            slots: Vec::new(),
            pooled: None,
        }
    }

    /// Lets output `i` take memory from `pool` where `graph_output(i)` (and it has no
    /// region).
    pub fn with_pool(mut self, pool: &Arc<OutputPool>, graph_output: Vec<bool>) -> Outputs {
        if graph_output.iter().any(|&o| o) {
            self.pooled = Some((pool.clone(), graph_output));
        }
        self
    }

    /// Regions of `block` for the outputs `values` of one kernel, from `layout`.
    ///
    /// # Safety
    /// `layout` must be the one recorded for this run's input shapes, and the caller must
    /// drop each value handed out at (or before) the end of its planned interval: the
    /// regions of values that live at the same time are disjoint only under that plan.
    pub unsafe fn planned(block: &Arc<Block>, layout: &ArenaLayout, values: &[ValueId]) -> Outputs {
        Outputs {
            block: Some(block.clone()),
            slots: values
                .iter()
                .map(|v| {
                    layout
                        .slots
                        .get(v)
                        .copied()
                        .filter(|&(off, bytes)| off + bytes <= block.bytes())
                })
                .collect(),
            pooled: None,
        }
    }

    /// Output `i`'s planned region as `n` elements of `T`, if it has one of at least that
    /// size that was not taken yet, or pooled memory for a graph output (never for bool,
    /// whose stale bytes may not be 0 or 1). Its elements hold stale values.
    pub fn region<T: Elem>(&mut self, i: usize, n: usize) -> Option<Buf<T>> {
        if T::DTYPE == DType::Bool {
            return None;
        }
        if let Some((pool, outs)) = &mut self.pooled {
            if outs.get(i).copied().unwrap_or(false) {
                // Handed out once, like a region.
                outs[i] = false;
                return pool.take::<T>(n);
            }
        }
        let block = self.block.as_ref()?;
        let (off, bytes) = self.slots.get_mut(i)?.take()?;
        if n.checked_mul(size_of::<T>())? > bytes || align_of::<T>() > ALIGN {
            return None;
        }
        let owner: kiln_ir::buf::Owner = block.clone();
        // SAFETY: `off + bytes` lies inside the block (checked in `planned`), `off` is a
        // multiple of ALIGN (the planner's) and the block is ALIGN-aligned, so the pointer
        // is aligned for T; the bytes are initialised (the block is zeroed when made, and
        // only ever written with non-bool element values), and every bit pattern is a
        // valid non-bool element. No other buffer uses these bytes while this one lives:
        // each slot is handed out once per run, and `planned`'s contract keeps values
        // whose intervals overlap in disjoint regions.
        Some(unsafe { Buf::region(owner, block.ptr.as_ptr().add(off).cast::<T>(), n) })
    }

    /// Output `i` as `n` f32s that `fill` writes: its planned region, else a fresh vector
    /// left uninitialised until `fill` writes it (zeroing first costs a pass over memory).
    ///
    /// # Safety
    /// When `fill` returns `Ok`, it must have written all `n` elements.
    pub unsafe fn write_f32<E>(
        &mut self,
        i: usize,
        n: usize,
        fill: impl FnOnce(&mut [std::mem::MaybeUninit<f32>]) -> Result<(), E>,
    ) -> Result<Buf<f32>, E> {
        if let Some(mut b) = self.region::<f32>(i, n) {
            let s: &mut [f32] = &mut b;
            // SAFETY: MaybeUninit<f32> has f32's layout, and `fill` only writes f32 values,
            // so the region stays initialised.
            let s = unsafe { &mut *(s as *mut [f32] as *mut [std::mem::MaybeUninit<f32>]) };
            fill(s)?;
            return Ok(b);
        }
        let mut v: Vec<f32> = Vec::with_capacity(n);
        fill(&mut v.spare_capacity_mut()[..n])?;
        // SAFETY: the caller's contract: `fill` returned Ok, so it wrote all `n` values.
        unsafe { v.set_len(n) };
        Ok(v.into())
    }

    /// Output `i` as `n` f32s, zeroed where they are fresh memory (its region holds stale
    /// values: the kernel must write every element).
    pub fn f32s(&mut self, i: usize, n: usize) -> Buf<f32> {
        self.region::<f32>(i, n)
            .unwrap_or_else(|| vec![0.0f32; n].into())
    }
}

#[cfg(test)]
mod tests {
    use crate::executor::{CpuPlan, ReferenceRunner, RunReport};
    use kiln_ir::{Storage, Tensor};

    /// Contractions and transposes (which write into regions) with a symbolic batch, some
    /// values live across others, a reshape that takes its input's buffer over, and a
    /// graph output that is also read by later kernels.
    const SRC: &str = "func @f(%x: f32[B, 8], %w: f32[8, 8]) -> (f32[B, 8], f32[8, B]) {
  %a = matmul %x, %w : f32[B, 8]
  %t = transpose %a {perm = [1, 0]} : f32[8, B]
  %u = transpose %t {perm = [1, 0]} : f32[B, 8]
  %b = matmul %u, %w : f32[B, 8]
  %c = matmul %b, %w : f32[B, 8]
  %s = constant {value = dense<i64[2]> [8, -1]} : i64[2]
  %r = reshape %c, %s : f32[8, ?]
  %q = transpose %r {perm = [1, 0]} : f32[?, 8]
  %d = matmul %q, %w : f32[?, 8]
  %e = matmul %a, %w : f32[B, 8]
  %y = add %d, %e : f32[B, 8]
  return %y, %t
}
";

    fn input(rows: usize, seed: u32) -> Tensor {
        let v = (0..rows * 8)
            .map(|i| ((i as u32).wrapping_mul(2654435761) ^ seed) as f32 / u32::MAX as f32 - 0.5)
            .collect();
        Tensor::from_vec(vec![rows, 8], v)
    }

    #[test]
    fn runs_on_a_recorded_layout_match_the_interpreter_for_each_shape() {
        let g = kiln_ir::text::parse(SRC).expect("parses");
        let plan = CpuPlan::partition(&g).expect("partitions");
        let w = input(8, 7);
        // Shapes come back: each set records its layout once, then runs in its arena.
        let mut recorded = std::collections::HashMap::new();
        for (i, rows) in [5, 5, 3, 5, 3, 16, 16].into_iter().enumerate() {
            let ins = vec![input(rows, rows as u32), w.clone()];
            let mut rep = RunReport::default();
            let got = plan
                .run_with(ins.clone(), &ReferenceRunner, Some(&mut rep))
                .expect("plan runs");
            let want = kiln_ir::interp::run(&g, ins).expect("interpreter runs");
            for (a, b) in got.iter().zip(&want) {
                let r = kiln_reference::compare(a, b, kiln_reference::MODEL_TOLERANCE);
                assert!(r.ok, "run {i}, {rows} rows: {r:?}");
            }
            // In the arena or not, the same bits.
            let first = recorded.entry(rows).or_insert_with(|| got.clone());
            assert_eq!(&got, first, "run {i}, {rows} rows");
            for t in &got {
                assert_ne!(t.data().storage(), Storage::Region, "an output escaped");
            }
            let first = [0, 2, 5].contains(&i);
            assert_eq!(rep.arena_bytes == 0, first, "run {i}: {rep:?}");
            if !first {
                // In regions: a, u, b, c (which r takes over), q, d, e. Not %t (an output)
                // nor the loop kernel's %y (the reference runner allocates).
                let want_in = 7 * rows * 8 * 4;
                assert_eq!(rep.in_arena_bytes, want_in, "run {i}: {rep:?}");
            }
        }
    }

    /// Rows enough that the transposed output `%t` (8 × rows f32) is pooled.
    const POOLED_ROWS: usize = 4096;

    #[test]
    fn a_dropped_output_gives_its_memory_to_the_next_run_and_a_kept_one_keeps_it() {
        let g = kiln_ir::text::parse(SRC).expect("parses");
        let plan = CpuPlan::partition(&g).expect("partitions");
        let w = input(8, 7);
        let ins = vec![input(POOLED_ROWS, 3), w.clone()];
        let want = kiln_ir::interp::run(&g, ins.clone()).expect("interpreter runs");
        let t_of = |outs: &[Tensor]| outs[1].as_slice::<f32>().expect("f32").as_ptr();
        // The first run records the layout; from the second on the output is pooled.
        let _ = plan.run(ins.clone(), &ReferenceRunner).expect("records");
        let first = plan.run(ins.clone(), &ReferenceRunner).expect("runs");
        assert_eq!(first[1].data().storage(), Storage::Pooled);
        let at = t_of(&first);
        drop(first);
        let second = plan.run(ins.clone(), &ReferenceRunner).expect("runs");
        assert_eq!(t_of(&second), at, "the dropped output's memory is reused");
        // Kept alive, an output is never handed out again: the next run writes elsewhere
        // and the kept values stay those of their own run.
        let other = plan
            .run(vec![input(POOLED_ROWS, 11), w], &ReferenceRunner)
            .expect("runs");
        assert_ne!(t_of(&other), at);
        for (a, b) in second.iter().zip(&want) {
            let r = kiln_reference::compare(a, b, kiln_reference::MODEL_TOLERANCE);
            assert!(r.ok, "{r:?}");
        }
        assert_ne!(other[1], second[1], "different inputs, different outputs");
        // A clone is an owned copy; dropping the plan first frees the memory later.
        assert_eq!(second[1].clone().data().storage(), Storage::Owned);
        drop(plan);
        drop(second);
    }

    #[test]
    fn concurrent_runs_take_separate_blocks() {
        let g = kiln_ir::text::parse(SRC).expect("parses");
        let plan = CpuPlan::partition(&g).expect("partitions");
        let w = input(8, 7);
        let ins = vec![input(9, 1), w];
        let want = plan.run(ins.clone(), &ReferenceRunner).expect("records");
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..20 {
                        let got = plan.run(ins.clone(), &ReferenceRunner).expect("runs");
                        assert_eq!(got, want);
                    }
                });
            }
        });
    }
}
