//! kiln-plan: how an optimised graph runs, independent of any target. [`partition`] splits
//! the graph into [`Kernel`]s (fused loop nests in the [`loop_ir`], contractions, and
//! fallbacks to the interpreter's ops); [`eval`] runs a loop kernel portably;
//! [`memory`] lays values out in one arena; [`memo`] finds the shape arithmetic that
//! needs computing once per input-shape set; [`serial`] writes the kernel list so an AOT
//! library loads its plan instead of partitioning again.
//!
//! It depends on kiln-ir only: packing weights, running contractions and threads belong to
//! a backend's runtime (the CPU's is kiln-runtime).

#![warn(missing_docs)]

pub mod eval;
pub mod layout;
pub mod loop_ir;
pub mod memo;
pub mod memory;
pub mod partition;
pub mod serial;
pub mod vmath;

pub use layout::LoopShape;
pub use loop_ir::{
    erf_f64, gelu_f64, BinOp, Expr, ExprId, InnerAccess, LoopInput, LoopKernel, RedOp, Reduction,
    UnOp,
};
pub use memo::ShapeMemo;
pub use memory::MemoryPlan;
pub use partition::{inner_access, is_contraction, partition, Kernel, Plan};
