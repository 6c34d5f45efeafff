//! [`Backend::Aot`](crate::Backend::Aot): the optimised graph built into a shared library by
//! kiln-llvm (as `kiln build` makes it, in a temporary folder the executable owns), loaded
//! with dlopen and run through its C ABI.

use crate::{Backend, Error, KernelTime};
use kiln_ir::{Graph, Tensor};

#[cfg(feature = "aot")]
pub(crate) struct Aot {
    /// The library's context takes one run at a time.
    lib: std::sync::Mutex<kiln_llvm::AotLibrary>,
    threads: usize,
    kernels: (usize, usize),
    /// Holds the library file while it is loaded.
    _dir: tempfile::TempDir,
}

#[cfg(feature = "aot")]
impl Aot {
    pub(crate) fn build(g: &Graph, threads: usize) -> Result<Aot, Error> {
        let err = |msg: String| Error::Compile {
            backend: Backend::Aot,
            msg,
        };
        let dir = tempfile::tempdir()
            .map_err(|e| err(format!("creating a folder for the library: {e}")))?;
        let path = dir.path().join("libmodel.so");
        let report = kiln_llvm::build_library(g, &path, &kiln_llvm::BuildOptions::default())
            .map_err(|e| err(e.to_string()))?;
        let mut lib = kiln_llvm::AotLibrary::load(&path, None).map_err(|e| err(e.to_string()))?;
        let threads = if threads == 0 {
            kiln_runtime::native::gemm::physical_cores()
        } else {
            threads
        };
        lib.set_threads(threads).map_err(|e| err(e.to_string()))?;
        Ok(Aot {
            lib: std::sync::Mutex::new(lib),
            threads,
            kernels: (report.loop_kernels, report.kernels),
            _dir: dir,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, kiln_llvm::AotLibrary> {
        // A panic inside a run leaves the context as the library left it; its next run
        // starts afresh, so a poisoned lock is still usable.
        self.lib.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs on inputs in graph order (the library's input order is the graph's).
    pub(crate) fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, Error> {
        self.lock().run(inputs).map_err(run_err)
    }

    /// Runs with per-kernel timing, under the plan's kernel labels.
    pub(crate) fn run_profiled(
        &self,
        inputs: &[Tensor],
    ) -> Result<(Vec<Tensor>, Vec<KernelTime>), Error> {
        let (outs, times) = self.lock().run_profiled(inputs).map_err(run_err)?;
        let kernels = times
            .into_iter()
            .map(|t| KernelTime {
                label: t.label,
                kind: t.kind,
                op: t.kind.to_string(),
                nanos: t.nanos,
            })
            .collect();
        Ok((outs, kernels))
    }

    pub(crate) fn threads(&self) -> usize {
        self.threads
    }

    /// (loop kernels compiled by LLVM, kernels in the plan).
    pub(crate) fn kernel_counts(&self) -> (usize, usize) {
        self.kernels
    }
}

#[cfg(feature = "aot")]
fn run_err(e: kiln_llvm::LoadError) -> Error {
    Error::Run(kiln_ir::EvalError::Node {
        node: "AOT library".into(),
        op: "kiln_run".into(),
        inputs: String::new(),
        msg: e.to_string(),
    })
}

/// Without the `aot` feature the backend exists but refuses to compile.
#[cfg(not(feature = "aot"))]
pub(crate) enum Aot {}

#[cfg(not(feature = "aot"))]
impl Aot {
    pub(crate) fn build(_: &Graph, _: usize) -> Result<Aot, Error> {
        Err(Error::Compile {
            backend: Backend::Aot,
            msg: "this build of kiln has no AOT backend (the `aot` feature is off)".into(),
        })
    }
    pub(crate) fn run(&self, _: &[Tensor]) -> Result<Vec<Tensor>, Error> {
        match *self {}
    }
    pub(crate) fn run_profiled(
        &self,
        _: &[Tensor],
    ) -> Result<(Vec<Tensor>, Vec<KernelTime>), Error> {
        match *self {}
    }
    pub(crate) fn threads(&self) -> usize {
        match *self {}
    }
    pub(crate) fn kernel_counts(&self) -> (usize, usize) {
        match *self {}
    }
}
