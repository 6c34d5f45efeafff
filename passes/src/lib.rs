//! kiln-passes: the optimiser. A [`Pass`] rewrites a [`kiln_ir::Graph`] in place; the
//! [`PassManager`] runs a pipeline of them (verifying, timing, dumping and bisecting), and
//! [`pipeline`] is the default list. The classic passes live in [`classic`]; all graph
//! surgery goes through [`rewrite`] so that value ids and graph outputs stay consistent.
//!
//! ```
//! use kiln_ir::{Graph, Tensor};
//!
//! let mut g = Graph::new("g");
//! let a = g.add_constant("a", Tensor::scalar(2.0f32));
//! g.add_constant("unused", Tensor::scalar(3.0f32));
//! g.outputs = vec![a];
//!
//! let mut pm = kiln_passes::default_pipeline();
//! pm.configure("-simplify_ops").unwrap(); // as `--passes=-simplify_ops` would
//! let report = pm.run(&mut g).unwrap(); // verifies after every pass
//! assert_eq!(g.nodes.len(), 1);
//! println!("{report}"); // one line per pass: time, node counts, stats
//! ```
#![warn(missing_docs)]

pub mod approx;
pub mod canon;
pub mod classic;
pub mod cost;
pub mod decode_step;
pub mod dense;
pub mod egraph;
pub mod manager;
pub mod pass;
pub mod pipeline;
pub mod rewrite;
pub mod target;

#[cfg(test)]
pub(crate) mod testutil;

pub use manager::{ManagerError, PassManager, PassReport, PipelineReport, Progress};
pub use pass::{Pass, PassError, PassStats};
pub use pipeline::{default_passes, default_passes_for, default_pipeline, pipeline_for};
