//! The memory planner: value liveness over a plan's kernels → offsets in one arena, and
//! the planned peak bytes. (Interface only so far: filled in by the planner work.)

/// Where each intermediate value lives in the arena for one set of input shapes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MemoryPlan {
    /// The arena size: the largest `offset + bytes` over all placed values.
    pub arena_bytes: usize,
    /// The most bytes live at once (a lower bound on `arena_bytes`).
    pub live_peak_bytes: usize,
}
