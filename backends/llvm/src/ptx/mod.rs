//! The PTX backend (feature `ptx`): every kernel of a [`Plan`] becomes a PTX `.entry`
//! through LLVM's NVPTX target. Loop kernels keep their fused form ([`loops`]); `matmul`,
//! `gemm` and `linear` contractions become a generated tiled GEMM with their epilogue fused
//! ([`gemm`]); every other kernel runs on the host (its inputs copied down, the
//! interpreter's op run, its outputs copied up): [`DeviceKernel::Host`] says which and why.
//! [`geometry`] holds the launch geometry, kernel arguments and device memory plan, all
//! computable without a device.

pub mod attention;
pub mod copy;
pub mod gemm;
pub mod geometry;
pub mod loops;
mod nv;

use crate::BuildError;
use gemm::Epilogue;
use inkwell::context::Context;
use inkwell::passes::PassBuilderOptions;
use inkwell::targets::{
    CodeModel, FileType, InitializationConfig, RelocMode, Target, TargetMachine, TargetTriple,
};
use inkwell::OptimizationLevel;
use kiln_plan::{Kernel, Plan};

/// GPU architectures kiln emits PTX for (`sm_80` = A100, `sm_90` = H100/H200).
pub const SUPPORTED_SM: &[u32] = &[80, 86, 89, 90];
/// The PTX ISA version requested (8.0: CUDA 12.0 drivers and later load it).
pub const PTX_FEATURES: &str = "+ptx80";
/// LLVM's NVPTX target triple.
pub const TRIPLE: &str = "nvptx64-nvidia-cuda";

/// What to emit.
#[derive(Clone, Debug)]
pub struct PtxOptions {
    /// The compute capability × 10 (80, 90, ...).
    pub sm: u32,
}

impl Default for PtxOptions {
    fn default() -> Self {
        PtxOptions { sm: 80 }
    }
}

/// How one plan kernel runs on the GPU.
#[derive(Clone, Debug, PartialEq)]
pub enum DeviceKernel {
    /// A loop kernel: `.entry` `name`.
    Loop {
        /// The entry's name.
        name: String,
        /// Whether it reduces rows (one row per block).
        reductions: bool,
    },
    /// A contraction as the generated GEMM `name` with this epilogue.
    Gemm {
        /// The entry's name.
        name: String,
        /// The fused epilogue.
        epilogue: Epilogue,
    },
    /// The fused `attention` op as the attention kernel `name`.
    Attention {
        /// The entry's name.
        name: String,
        /// Keys past the query's position are masked.
        causal: bool,
        /// It takes a (float) mask operand.
        mask: bool,
    },
    /// A movement op (transpose, expand, concat) as strided copies with entry `name`.
    Copy {
        /// The entry's name.
        name: String,
    },
    /// Run on the host by the interpreter's op, with copies each way.
    Host {
        /// The op's text name.
        op: String,
    },
}

impl DeviceKernel {
    /// The `.entry` name, for device kernels.
    pub fn entry(&self) -> Option<&str> {
        match self {
            DeviceKernel::Loop { name, .. }
            | DeviceKernel::Gemm { name, .. }
            | DeviceKernel::Attention { name, .. }
            | DeviceKernel::Copy { name } => Some(name),
            DeviceKernel::Host { .. } => None,
        }
    }
}

/// A PTX module for a plan: its text and how each plan kernel runs.
#[derive(Clone, Debug)]
pub struct PtxModule {
    /// The PTX assembly.
    pub ptx: String,
    /// One entry per plan kernel, in plan order.
    pub kernels: Vec<DeviceKernel>,
    /// The compute capability × 10 it targets.
    pub sm: u32,
}

impl PtxModule {
    /// The ops this module leaves to the host, with their counts (sorted by name).
    pub fn host_ops(&self) -> Vec<(String, usize)> {
        let mut m = std::collections::BTreeMap::<String, usize>::new();
        for k in &self.kernels {
            if let DeviceKernel::Host { op } = k {
                *m.entry(op.clone()).or_default() += 1;
            }
        }
        m.into_iter().collect()
    }
}

/// The NVPTX target machine for `sm`.
fn target_machine(sm: u32) -> Result<TargetMachine, BuildError> {
    if !SUPPORTED_SM.contains(&sm) {
        return Err(BuildError::Llvm(format!(
            "unsupported GPU architecture sm_{sm}; kiln emits PTX for {}",
            SUPPORTED_SM
                .iter()
                .map(|s| format!("sm_{s}"))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    Target::initialize_nvptx(&InitializationConfig::default());
    let triple = TargetTriple::create(TRIPLE);
    let target = Target::from_triple(&triple).map_err(|e| BuildError::Llvm(e.to_string()))?;
    target
        .create_target_machine(
            &triple,
            &format!("sm_{sm}"),
            PTX_FEATURES,
            OptimizationLevel::Aggressive,
            RelocMode::Default,
            CodeModel::Default,
        )
        .ok_or_else(|| BuildError::Llvm(format!("no NVPTX target machine for sm_{sm}")))
}

/// Emits one PTX module holding an entry for every loop kernel of `plan` (`kiln_k<i>` for
/// plan kernel `i`) and one GEMM entry per distinct epilogue (`kiln_gemm<j>`).
pub fn emit(plan: &Plan, opts: &PtxOptions) -> Result<PtxModule, BuildError> {
    let tm = target_machine(opts.sm)?;
    let cx = Context::create();
    let module = cx.create_module("kiln_ptx");
    module.set_triple(&tm.get_triple());
    module.set_data_layout(&tm.get_target_data().get_data_layout());
    let mut kernels = vec![];
    let mut gemms: Vec<(String, String)> = vec![];
    for (i, k) in plan.kernels.iter().enumerate() {
        let name = format!("kiln_k{i}");
        let err = |msg: String| BuildError::Codegen {
            kernel: plan.label(i),
            msg,
        };
        kernels.push(match k {
            Kernel::Loop(l) => {
                loops::define(&cx, &module, l, &name).map_err(err)?;
                DeviceKernel::Loop {
                    name,
                    reductions: !l.reductions.is_empty(),
                }
            }
            Kernel::Contraction(n) | Kernel::Fallback(n) => {
                let node = &plan.graph.nodes[*n];
                let f32_out = node
                    .outputs
                    .iter()
                    .all(|&o| plan.graph.ty(o).dtype == kiln_ir::DType::F32);
                let f32_in = |i: usize| {
                    node.inputs
                        .get(i)
                        .copied()
                        .flatten()
                        .is_some_and(|v| plan.graph.ty(v).dtype == kiln_ir::DType::F32)
                };
                // Movement ops whose data has one element size of 4 or 8 bytes: strided copies.
                let out_dt = node.outputs.first().map(|&o| plan.graph.ty(o).dtype);
                let same_dt = |i: usize| {
                    node.inputs
                        .get(i)
                        .copied()
                        .flatten()
                        .map(|v| plan.graph.ty(v).dtype)
                        == out_dt
                };
                let data_inputs = if node.op == kiln_ir::OpKind::Concat {
                    node.inputs.len()
                } else {
                    1
                };
                let copy_entry = out_dt.and_then(|d| copy::entry(d.size())).filter(|_| {
                    geometry::COPY_OPS.contains(&node.op)
                        && node.outputs.len() == 1
                        && (0..data_inputs).all(same_dt)
                });
                if let (Some(entry), Some(dt)) = (copy_entry, out_dt) {
                    if !gemms.iter().any(|(k, _)| k == entry) {
                        copy::define(&cx, &module, dt.size()).map_err(err)?;
                        gemms.push((entry.to_string(), entry.to_string()));
                    }
                    kernels.push(DeviceKernel::Copy {
                        name: entry.to_string(),
                    });
                    continue;
                }
                let attn = geometry::attention_variant(node, f32_in(3))
                    .filter(|_| f32_out && (0..3).all(f32_in));
                if let Some((causal, mask)) = attn {
                    let key = format!("attention {causal} {mask}");
                    let name = match gemms.iter().find(|(k, _)| *k == key) {
                        Some((_, n)) => n.clone(),
                        None => {
                            let name = format!("kiln_attn{}", gemms.len());
                            attention::define(&cx, &module, causal, mask, &name).map_err(err)?;
                            gemms.push((key, name.clone()));
                            name
                        }
                    };
                    kernels.push(DeviceKernel::Attention { name, causal, mask });
                    continue;
                }
                match geometry::gemm_epilogue(node).filter(|_| f32_out) {
                    Some(ep) => {
                        // One entry per distinct epilogue, shared by every GEMM that uses it.
                        let key = format!("{ep:?}");
                        let name = match gemms.iter().find(|(k, _)| *k == key) {
                            Some((_, n)) => n.clone(),
                            None => {
                                let name = format!("kiln_gemm{}", gemms.len());
                                gemm::define(&cx, &module, &ep, &name).map_err(err)?;
                                gemms.push((key, name.clone()));
                                name
                            }
                        };
                        DeviceKernel::Gemm { name, epilogue: ep }
                    }
                    None => DeviceKernel::Host {
                        op: node.op.name().to_string(),
                    },
                }
            }
        });
    }
    module
        .verify()
        .map_err(|e| BuildError::Llvm(format!("module verification: {e}")))?;
    module
        .run_passes("default<O3>", &tm, PassBuilderOptions::create())
        .map_err(|e| BuildError::Llvm(format!("default<O3>: {e}")))?;
    let buf = tm
        .write_to_memory_buffer(&module, FileType::Assembly)
        .map_err(|e| BuildError::Llvm(format!("emitting PTX: {e}")))?;
    let ptx = String::from_utf8_lossy(buf.as_slice())
        .trim_end_matches('\0')
        .to_string();
    Ok(PtxModule {
        ptx,
        kernels,
        sm: opts.sm,
    })
}
