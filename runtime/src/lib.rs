//! kiln-runtime: the CPU runtime. It runs a backend-neutral [`kiln_plan::Plan`] on the CPU
//! ([`kernel::CpuPlan`]: contraction weights packed once, the executor, the arena); owns
//! the hand-written CPU kernels ([`kernels`]: GEMM, attention, conv), the native routines
//! and the thread pool ([`pool`]). Code generators (the Cranelift JIT, AOT libraries) plug
//! in through [`kernel::LoopRunner`].

pub mod kernel;
pub mod kernels;
pub mod pool;
