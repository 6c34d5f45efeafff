//! The classic, local passes: dead-code elimination, common-subexpression merging,
//! constant folding, peephole simplification of no-op layout ops, centring of weights
//! whose every reader is mean-invariant, moving `shape` reads up to where the shape is
//! first known, folding attention's head transposes into its layout, rolling
//! weight-tied repeated blocks into loops, stacking the rows a chain of `scatter_nd`s writes, and running loops of linear recurrences as
//! one scan over every step.

pub mod attention_layout;
pub mod centre;
pub mod cse;
pub mod dce;
pub mod fold;
pub mod recurrence_form;
pub mod roll;
pub mod row_scatters;
pub mod shape_reads;
pub mod simplify;
pub mod transpose_up;

pub use attention_layout::AbsorbHeadTransposes;
pub use centre::CentreMeanInvariant;
pub use cse::EliminateCommonSubexpressions;
pub use dce::EliminateDeadCode;
pub use fold::FoldConstants;
pub use recurrence_form::SelectRecurrenceForm;
pub use roll::RollBlocks;
pub use row_scatters::StackRowScatters;
pub use shape_reads::{HoistShapeReads, HoistShapeReadsLocal};
pub use simplify::SimplifyOps;
pub use transpose_up::MoveTransposesUp;
