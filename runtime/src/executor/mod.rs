//! The CPU executor and the routines it runs besides generated code: [`exec`] runs a
//! [`kiln_plan::Plan`] prepared for the CPU ([`CpuPlan`]), [`contraction`] prepares and runs
//! contractions on the hand-written kernels, [`routines`] holds the native data-movement and
//! small-op routines (and dispatches to `recurrent`, the LSTM/GRU/RNN routine), [`arena`]
//! the memory values are placed in, [`rows`] the row runner both code generators' loop
//! kernels run through, [`stepped`] the native driver of loops whose body is an
//! elementwise time step, [`par`] the parallel-for over rows.

pub mod arena;
pub mod contraction;
pub mod exec;
pub mod par;
mod recurrent;
pub mod routines;
pub mod rows;
pub mod stepped;

pub use exec::{CpuPlan, KernelTime, LoopRunner, ReferenceRunner, RunReport};
pub use par::{ParallelFor, Serial};
