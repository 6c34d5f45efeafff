//! The classic, local passes: dead-code elimination, common-subexpression merging,
//! constant folding and peephole simplification of no-op layout ops.

pub mod cse;
pub mod dce;
pub mod fold;
pub mod simplify;

pub use cse::EliminateCommonSubexpressions;
pub use dce::EliminateDeadCode;
pub use fold::FoldConstants;
pub use simplify::SimplifyOps;
