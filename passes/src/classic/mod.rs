//! The classic, local passes: dead-code elimination, common-subexpression merging,
//! constant folding, peephole simplification of no-op layout ops, centring of weights
//! whose every reader is mean-invariant, moving `shape` reads up to where the shape is
//! first known, folding attention's head transposes into its layout, and rolling
//! weight-tied repeated blocks into loops.

pub mod attention_layout;
pub mod centre;
pub mod cse;
pub mod dce;
pub mod fold;
pub mod roll;
pub mod shape_reads;
pub mod simplify;

pub use attention_layout::AbsorbHeadTransposes;
pub use centre::CentreMeanInvariant;
pub use cse::EliminateCommonSubexpressions;
pub use dce::EliminateDeadCode;
pub use fold::FoldConstants;
pub use roll::RollBlocks;
pub use shape_reads::{HoistShapeReads, HoistShapeReadsLocal};
pub use simplify::SimplifyOps;
