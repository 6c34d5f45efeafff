//! kiln-cuda: the GPU backend. A [`Program`] is everything about running one plan for one
//! set of input shapes that needs no device: the PTX module (from kiln-llvm's NVPTX
//! backend), each kernel's launch geometry and arguments, and the device memory plan (one
//! arena from kiln-plan's memory planner, weights in one blob uploaded once). A [`Device`]
//! opens a GPU through the CUDA driver, loaded at run time (cudarc, dynamic loading), and
//! [`Loaded`] runs a program on it: one stream, launches in plan order, host kernels
//! (ops the GPU has no kernel for) run by the interpreter with copies each way, and a
//! whole run captured into a CUDA graph when no kernel needs the host.
//!
//! Graphs are [`specialise`]d to concrete input shapes before they are optimised, so every
//! shape is static; a new set of input shapes gets a program of its own.

mod device;
mod program;

pub use device::{driver_present, Device, Loaded};
pub use program::{Program, Step};

use kiln_ir::{Dim, Graph, Shape};

/// Why the GPU backend could not build or run.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// No CUDA driver, or no such GPU.
    #[error("{0}")]
    NoDevice(String),
    /// A CUDA driver call failed.
    #[error("CUDA driver: {what}: {msg}")]
    Driver {
        /// What was being done.
        what: String,
        /// The driver's error.
        msg: String,
    },
    /// PTX generation failed.
    #[error(transparent)]
    Build(#[from] kiln_llvm::BuildError),
    /// The plan cannot run on the GPU as it is (e.g. a shape left unknown).
    #[error("{0}")]
    Plan(String),
    /// A kernel failed at run time.
    #[error("kernel {kernel}: {msg}")]
    Kernel {
        /// The kernel's label.
        kernel: String,
        /// What went wrong.
        msg: String,
    },
}

/// `g` with its inputs fixed to `shapes` (one per graph input, in order) and every value's
/// type inferred again, so shape arithmetic folds and every shape becomes static.
pub fn specialise(g: &Graph, shapes: &[Vec<usize>]) -> Result<Graph, CudaError> {
    if shapes.len() != g.inputs.len() {
        return Err(CudaError::Plan(format!(
            "the model takes {} inputs, got {} shapes",
            g.inputs.len(),
            shapes.len()
        )));
    }
    let mut g = g.clone();
    for (&v, s) in g.inputs.clone().iter().zip(shapes) {
        let val = &mut g.values[v.index()];
        if let Some(dims) = val.ty.shape.dims() {
            let fits = dims.len() == s.len()
                && dims
                    .iter()
                    .zip(s)
                    .all(|(d, &n)| d.fixed().is_none_or(|f| f as usize == n));
            if !fits {
                return Err(CudaError::Plan(format!(
                    "input `{}`: shape {s:?} does not fit {}",
                    val.name, val.ty
                )));
            }
        }
        val.ty.shape = Shape::new(s.iter().map(|&n| Dim::Fixed(n as u64)).collect());
    }
    kiln_ir::infer_types(&mut g).map_err(|e| CudaError::Plan(format!("shape inference: {e}")))?;
    Ok(g)
}

/// Makes every value's shape static in a specialised, optimised graph: infers types again,
/// then, where inference leaves a shape open (shape arithmetic it does not fold), runs the
/// reference interpreter once, on zero inputs of the graph's input shapes, over the nodes
/// those values depend on, and records the shapes it produced. A shape that depends on the input data is then checked at run time.
pub fn settle_shapes(g: &mut Graph) -> Result<(), CudaError> {
    kiln_ir::infer_types(g).map_err(|e| CudaError::Plan(format!("shape inference: {e}")))?;
    let open: Vec<kiln_ir::ValueId> = g
        .nodes
        .iter()
        .flat_map(|n| n.outputs.iter().copied())
        .filter(|&v| g.ty(v).shape.concrete().is_none())
        .collect();
    if open.is_empty() {
        return Ok(());
    }
    let mut inputs = vec![];
    for &v in &g.inputs {
        let s = g.ty(v).shape.concrete().ok_or_else(|| {
            CudaError::Plan(format!("input `{}` is not specialised", g.value(v).name))
        })?;
        inputs.push(kiln_ir::Tensor::zeros(g.ty(v).dtype, s));
    }
    // Only the nodes the open values depend on (shape arithmetic, masks): not the model.
    let producers = g.producers();
    let mut need = vec![false; g.nodes.len()];
    let mut stack: Vec<kiln_ir::ValueId> = open.clone();
    while let Some(v) = stack.pop() {
        if let Some(&n) = producers.get(&v) {
            if !std::mem::replace(&mut need[n], true) {
                stack.extend(g.nodes[n].inputs.iter().flatten().copied());
            }
        }
    }
    let mut probe = g.clone();
    probe.nodes = g
        .nodes
        .iter()
        .zip(&need)
        .filter(|(_, &k)| k)
        .map(|(n, _)| n.clone())
        .collect();
    probe.outputs = open.clone();
    let outs = kiln_ir::run(&probe, inputs)
        .map_err(|e| CudaError::Plan(format!("computing shapes inference left open: {e}")))?;
    for (v, t) in open.into_iter().zip(outs) {
        g.values[v.index()].ty.shape = Shape::fixed(t.shape());
    }
    Ok(())
}
