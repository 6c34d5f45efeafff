//! The classic, local passes: dead-code elimination, common-subexpression merging,
//! constant folding, peephole simplification of no-op layout ops, and centring of
//! weights whose every reader is mean-invariant.

pub mod centre;
pub mod cse;
pub mod dce;
pub mod fold;
pub mod simplify;

pub use centre::CentreMeanInvariant;
pub use cse::EliminateCommonSubexpressions;
pub use dce::EliminateDeadCode;
pub use fold::FoldConstants;
pub use simplify::SimplifyOps;
