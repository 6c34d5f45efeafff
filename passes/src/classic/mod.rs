//! The classic, local passes: dead-code elimination, common-subexpression merging,
//! constant folding, peephole simplification of no-op layout ops, centring of weights
//! whose every reader is mean-invariant, moving `shape` reads up to where the shape is
//! first known, and folding attention's head transposes into its layout.

pub mod attention_layout;
pub mod centre;
pub mod cse;
pub mod dce;
pub mod fold;
pub mod shape_reads;
pub mod simplify;

pub use attention_layout::AbsorbHeadTransposes;
pub use centre::CentreMeanInvariant;
pub use cse::EliminateCommonSubexpressions;
pub use dce::EliminateDeadCode;
pub use fold::FoldConstants;
pub use shape_reads::HoistShapeReads;
pub use simplify::SimplifyOps;
