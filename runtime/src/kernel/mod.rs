//! The backend-neutral kernel layer: an optimised graph partitioned into kernels (fused
//! loop nests, contractions, interpreter fallbacks), the loop-kernel IR, its run-time
//! binding, a portable evaluator, and the plan executor backends plug into.

pub mod arena;
pub mod contraction;
pub mod eval;
pub mod exec;
pub mod glue;
pub mod ir;
pub mod layout;
pub mod memo;
pub mod memory;
pub mod par;
pub mod partition;
pub mod rows;
pub mod vmath;

pub use exec::{KernelTime, LoopRunner, ReferenceRunner, RunReport};
pub use ir::{
    erf_f64, BinOp, Expr, ExprId, InnerAccess, LoopInput, LoopKernel, RedOp, Reduction, UnOp,
};
pub use layout::LoopShape;
pub use memory::MemoryPlan;
pub use par::{ParallelFor, Serial};
pub use partition::{is_contraction, partition, Kernel, Plan};
