//! kiln-runtime: the CPU runtime. It runs a backend-neutral [`kiln_plan::Plan`] on the CPU
//! ([`executor::CpuPlan`]: contraction weights packed once, the executor, the arena); owns
//! the hand-written CPU kernels ([`native`]: GEMM, attention, conv, int8 GEMM, chunked
//! linear attention), the routines for glue ops ([`executor::routines`]) and the thread
//! pool ([`pool`]). Code generators (the Cranelift JIT, AOT libraries) plug in through
//! [`executor::LoopRunner`].

pub mod executor;
pub mod native;
pub mod pool;
