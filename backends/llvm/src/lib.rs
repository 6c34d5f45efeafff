//! kiln-llvm: the ahead-of-time backend. [`build_library`] partitions an optimised graph,
//! lowers every loop kernel to LLVM IR ([`codegen`]), optimises with `default<O2>` for the
//! chosen CPU, emits an object file and links it with the serialized model and the
//! `kiln-aot-rt` static runtime into a shared library with a C ABI ([`header`] documents
//! it). [`AotLibrary`] loads such a library back into a Rust process.

pub mod codegen;
pub mod header;
mod library;
mod loader;
#[cfg(feature = "ptx")]
pub mod ptx;
pub mod vmath;

pub use library::{build_library, find_runtime, BuildOptions, BuildReport, WeightsMode, EXPORTS};
pub use loader::{AotLibrary, IoDesc, KernelTime, LoadError};

/// Why a library could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The graph could not be serialized or re-read, or partitioning failed.
    #[error("model: {0}")]
    Model(String),
    /// LLVM failed (target, code generation, passes, object emission).
    #[error("LLVM: {0}")]
    Llvm(String),
    /// Code generation of one kernel failed.
    #[error("code generation failed for {kernel}: {msg}")]
    Codegen {
        /// The kernel's label.
        kernel: String,
        /// What failed.
        msg: String,
    },
    /// The runtime static library was not found.
    #[error("{0}")]
    Runtime(String),
    /// Writing files or running the C compiler/linker failed.
    #[error("{0}")]
    Io(String),
}
