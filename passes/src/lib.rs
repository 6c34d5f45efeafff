//! kiln-passes: the optimiser. A [`Pass`] rewrites a [`kiln_ir::Graph`] in place; the
//! [`PassManager`] runs a pipeline of them (verifying, timing, dumping and bisecting), and
//! [`pipeline`] is the default list. The classic passes live in [`classic`]; all graph
//! surgery goes through [`rewrite`] so that value ids and graph outputs stay consistent.
#![warn(missing_docs)]

pub mod classic;
pub mod manager;
pub mod pass;
pub mod pipeline;
pub mod rewrite;

#[cfg(test)]
pub(crate) mod testutil;

pub use manager::{ManagerError, PassManager, PassReport, PipelineReport};
pub use pass::{Pass, PassError, PassStats};
pub use pipeline::{default_passes, default_pipeline};
