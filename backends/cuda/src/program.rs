//! A plan prepared for the GPU for one set of input shapes, without a device: the PTX
//! module, each kernel's launch and arguments, and the device memory plan; and the
//! manifest `kiln build --target cuda` writes beside the PTX.

use crate::CudaError;
use kiln_ir::{Tensor, ValueId};
use kiln_llvm::ptx::geometry::{
    self, attention_args, attention_launch, copy_launch, copy_plan, device_memory, gemm_args,
    gemm_launch, loop_launch, AttentionArgs, CopyArgs, DeviceMemory, GemmArgs, Launch, LoopArgs,
};
use kiln_llvm::ptx::{emit, DeviceKernel, PtxModule, PtxOptions};
use kiln_plan::{Kernel, Plan};
use serde_json::{json, Value as Json};

/// How one plan kernel runs.
#[derive(Clone, Debug)]
pub enum Step {
    /// A loop kernel launch.
    Loop {
        /// The `.entry`.
        entry: String,
        /// Grid and block.
        launch: Launch,
        /// Its scalar arguments.
        args: LoopArgs,
        /// Values read (kernel input order).
        inputs: Vec<ValueId>,
        /// Values written.
        outputs: Vec<ValueId>,
    },
    /// A GEMM launch.
    Gemm {
        /// The `.entry`.
        entry: String,
        /// Grid and block.
        launch: Launch,
        /// Its scalar arguments.
        args: GemmArgs,
        /// A, B, C, then the epilogue operands present.
        operands: Vec<ValueId>,
    },
    /// An attention kernel launch.
    Attention {
        /// The `.entry`.
        entry: String,
        /// Grid, block and shared memory.
        launch: Launch,
        /// Its scalar arguments.
        args: AttentionArgs,
        /// q, k, v, out, then the mask when there is one.
        operands: Vec<ValueId>,
    },
    /// A movement op as strided copies (one launch each) into `out`.
    Strided {
        /// The `.entry`.
        entry: String,
        /// Per copy: its launch, arguments and source value.
        copies: Vec<(Launch, CopyArgs, ValueId)>,
        /// The value written.
        out: ValueId,
    },
    /// The interpreter runs node `node` on the host; `why` says why it is not on the GPU.
    Host {
        /// The node index.
        node: usize,
        /// Why.
        why: String,
    },
    /// A view op (reshape, flatten, squeeze, unsqueeze, identity): the bytes copied on
    /// the device from `from` to `to`.
    Copy {
        /// The value read.
        from: ValueId,
        /// The value written.
        to: ValueId,
        /// Bytes.
        bytes: usize,
    },
    /// Nothing to compute (an empty output).
    Empty,
}

/// Ops whose output holds the input's bytes unchanged (with a new shape).
const VIEW_OPS: &[kiln_ir::OpKind] = &[
    kiln_ir::OpKind::Reshape,
    kiln_ir::OpKind::Flatten,
    kiln_ir::OpKind::Squeeze,
    kiln_ir::OpKind::Unsqueeze,
    kiln_ir::OpKind::Identity,
];

/// A plan ready for the GPU for one set of input shapes.
#[derive(Clone, Debug)]
pub struct Program {
    /// The (specialised, optimised) plan.
    pub plan: Plan,
    /// Its PTX.
    pub module: PtxModule,
    /// One step per plan kernel.
    pub steps: Vec<Step>,
    /// Arena and weight layout.
    pub memory: DeviceMemory,
}

/// A value's static shape.
pub(crate) fn shape_of(plan: &Plan, v: ValueId) -> Result<Vec<usize>, CudaError> {
    let val = plan.graph.value(v);
    val.ty.shape.concrete().ok_or_else(|| {
        CudaError::Plan(format!(
            "value `{}` has no static shape ({}); the GPU backend needs every shape known \
             once the inputs' shapes are",
            val.name, val.ty
        ))
    })
}

fn bytes_of(plan: &Plan, v: ValueId) -> Result<usize, CudaError> {
    let s = shape_of(plan, v)?;
    Ok(s.iter().product::<usize>() * plan.graph.ty(v).dtype.size())
}

impl Program {
    /// Prepares `plan` (made from a [`crate::specialise`]d graph) for `sm`.
    pub fn new(plan: Plan, sm: u32) -> Result<Program, CudaError> {
        let module = emit(&plan, &PtxOptions { sm })?;
        let memory = device_memory(&plan, |v| bytes_of(&plan, v).map_err(|e| e.to_string()))
            .map_err(CudaError::Plan)?;
        let mut steps = vec![];
        for (i, (k, dk)) in plan.kernels.iter().zip(&module.kernels).enumerate() {
            let err = |msg: String| CudaError::Kernel {
                kernel: plan.label(i),
                msg,
            };
            steps.push(match (k, dk) {
                (Kernel::Loop(l), DeviceKernel::Loop { name, reductions }) => {
                    let shapes = l
                        .inputs
                        .iter()
                        .map(|x| shape_of(&plan, x.value))
                        .collect::<Result<Vec<_>, _>>()?;
                    let refs: Vec<&[usize]> = shapes.iter().map(|s| s.as_slice()).collect();
                    let args = LoopArgs::bind(l, &refs).map_err(err)?;
                    if args.rows == 0 || args.n == 0 {
                        Step::Empty
                    } else {
                        Step::Loop {
                            entry: name.clone(),
                            launch: loop_launch(args.n as usize, args.rows as usize, *reductions),
                            args,
                            inputs: l.inputs.iter().map(|x| x.value).collect(),
                            outputs: l.outputs.iter().map(|o| o.0).collect(),
                        }
                    }
                }
                (Kernel::Contraction(n) | Kernel::Fallback(n), DeviceKernel::Gemm { name, .. }) => {
                    let node = &plan.graph.nodes[*n];
                    let ins = node
                        .inputs
                        .iter()
                        .map(|v| v.map(|v| shape_of(&plan, v)).transpose())
                        .collect::<Result<Vec<_>, _>>()?;
                    let refs: Vec<Option<&[usize]>> = ins.iter().map(|s| s.as_deref()).collect();
                    let out = shape_of(&plan, node.outputs[0])?;
                    match gemm_args(node, &refs, &out) {
                        Ok(args) if args.m == 0 || args.n == 0 => Step::Empty,
                        Ok(args) => {
                            let idx: &[usize] = match node.op {
                                kiln_ir::OpKind::Gemm => &[0, 1, usize::MAX, 2],
                                kiln_ir::OpKind::Linear => &[0, 1, usize::MAX, 3, 2, 4],
                                _ => &[0, 1, usize::MAX],
                            };
                            let operands = idx
                                .iter()
                                .filter_map(|&i| {
                                    if i == usize::MAX {
                                        Some(node.outputs[0])
                                    } else {
                                        node.inputs.get(i).copied().flatten()
                                    }
                                })
                                .collect();
                            Step::Gemm {
                                entry: name.clone(),
                                launch: gemm_launch(&args),
                                args,
                                operands,
                            }
                        }
                        Err(why) => Step::Host { node: *n, why },
                    }
                }
                (
                    Kernel::Contraction(n) | Kernel::Fallback(n),
                    DeviceKernel::Attention { name, .. },
                ) => {
                    let node = &plan.graph.nodes[*n];
                    let ins = node
                        .inputs
                        .iter()
                        .map(|v| v.map(|v| shape_of(&plan, v)).transpose())
                        .collect::<Result<Vec<_>, _>>()?;
                    let refs: Vec<Option<&[usize]>> = ins.iter().map(|s| s.as_deref()).collect();
                    match attention_args(node, &refs) {
                        Ok(a) if a.b * a.hq * a.s * a.dv == 0 => Step::Empty,
                        Ok(args) => {
                            let mut operands: Vec<ValueId> =
                                node.inputs.iter().take(3).flatten().copied().collect();
                            operands.push(node.outputs[0]);
                            operands.extend(node.inputs.get(3).copied().flatten());
                            Step::Attention {
                                entry: name.clone(),
                                launch: attention_launch(&args),
                                args,
                                operands,
                            }
                        }
                        Err(why) => Step::Host { node: *n, why },
                    }
                }
                (Kernel::Contraction(n) | Kernel::Fallback(n), DeviceKernel::Copy { name }) => {
                    let node = &plan.graph.nodes[*n];
                    let ins = node
                        .inputs
                        .iter()
                        .map(|v| v.map(|v| shape_of(&plan, v)).transpose())
                        .collect::<Result<Vec<_>, _>>()?;
                    let refs: Vec<Option<&[usize]>> = ins.iter().map(|s| s.as_deref()).collect();
                    let out = shape_of(&plan, node.outputs[0])?;
                    match copy_plan(node, &refs, &out) {
                        Ok(c) if c.iter().all(|(_, a)| a.total == 0) => Step::Empty,
                        Ok(c) => Step::Strided {
                            entry: name.clone(),
                            copies: c
                                .into_iter()
                                .filter_map(|(i, a)| {
                                    let v = node.inputs.get(i).copied().flatten()?;
                                    Some((copy_launch(&a), a, v))
                                })
                                .collect(),
                            out: node.outputs[0],
                        },
                        Err(why) => Step::Host { node: *n, why },
                    }
                }
                (Kernel::Contraction(n) | Kernel::Fallback(n), DeviceKernel::Host { op }) => {
                    let node = &plan.graph.nodes[*n];
                    let view = match (
                        node.inputs.first().copied().flatten(),
                        node.outputs.as_slice(),
                    ) {
                        (Some(x), &[y]) if VIEW_OPS.contains(&node.op) => {
                            let (bx, by) = (bytes_of(&plan, x)?, bytes_of(&plan, y)?);
                            let same = plan.graph.ty(x).dtype == plan.graph.ty(y).dtype;
                            (same && bx == by).then_some((x, y, by))
                        }
                        _ => None,
                    };
                    match view {
                        Some((_, _, 0)) => Step::Empty,
                        Some((from, to, bytes)) => Step::Copy { from, to, bytes },
                        None => Step::Host {
                            node: *n,
                            why: format!("no GPU kernel for `{op}`"),
                        },
                    }
                }
                _ => return Err(err("the PTX module does not match the plan".into())),
            });
        }
        Ok(Program {
            plan,
            module,
            steps,
            memory,
        })
    }

    /// Nodes run on the host: `(op name, count)`, sorted by name.
    pub fn host_ops(&self) -> Vec<(String, usize)> {
        let mut m = std::collections::BTreeMap::<String, usize>::new();
        for s in &self.steps {
            if let Step::Host { node, .. } = s {
                *m.entry(self.plan.graph.nodes[*node].op.name().to_string())
                    .or_default() += 1;
            }
        }
        m.into_iter().collect()
    }

    /// The weight blob: every plan constant at its offset, little-endian.
    pub fn weight_blob(&self) -> Vec<u8> {
        let mut blob = vec![0u8; self.memory.weight_bytes];
        for ((_, t), &(_, off, nb)) in self.plan.constants.iter().zip(&self.memory.weights) {
            blob[off..off + nb].copy_from_slice(&t.data().le_bytes());
        }
        blob
    }

    /// The host copy of a constant.
    pub fn constant(&self, v: ValueId) -> Option<&Tensor> {
        self.plan
            .constants
            .iter()
            .find(|(c, _)| *c == v)
            .map(|(_, t)| t)
    }

    /// The manifest: kernels with launch geometry and arguments, the arena layout and the
    /// weight layout, as JSON.
    pub fn manifest(&self, ptx_file: &str, weights_file: &str) -> Json {
        let g = &self.plan.graph;
        let name = |v: ValueId| g.value(v).name.clone();
        let names = |vs: &[ValueId]| vs.iter().map(|&v| name(v)).collect::<Vec<_>>();
        let io = |vs: &[ValueId]| {
            vs.iter()
                .map(|&v| {
                    json!({
                        "name": name(v),
                        "dtype": g.ty(v).dtype.to_string(),
                        "shape": g.ty(v).shape.concrete(),
                        "offset": self.memory.offsets.get(&v),
                    })
                })
                .collect::<Vec<_>>()
        };
        let launch =
            |l: &Launch| json!({"grid": l.grid, "block": l.block, "shared_bytes": l.shared});
        let kernels: Vec<Json> = self
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let label = self.plan.label(i);
                match s {
                    Step::Loop {
                        entry,
                        launch: l,
                        args,
                        inputs,
                        outputs,
                    } => json!({
                        "index": i, "label": label, "kind": "loop", "entry": entry,
                        "launch": launch(l), "n": args.n, "rows": args.rows,
                        "shape": args.shape, "strides": args.strides,
                        "reads": names(inputs), "writes": names(outputs),
                    }),
                    Step::Gemm {
                        entry,
                        launch: l,
                        args,
                        operands,
                    } => json!({
                        "index": i, "label": label, "kind": "gemm", "entry": entry,
                        "launch": launch(l), "m": args.m, "n": args.n, "k": args.k,
                        "batch": args.batch, "nb1": args.nb1, "a": args.a, "b": args.b,
                        "c": args.c, "epilogue": args.extras, "operands": names(operands),
                    }),
                    Step::Attention {
                        entry,
                        launch: l,
                        args,
                        operands,
                    } => json!({
                        "index": i, "label": label, "kind": "attention", "entry": entry,
                        "launch": launch(l), "s": args.s, "t": args.t, "d": args.d,
                        "dv": args.dv, "group": args.group, "scale": args.scale,
                        "strides": args.strides, "mask_strides": args.mask,
                        "operands": names(operands),
                    }),
                    Step::Strided { entry, copies, out } => json!({
                        "index": i, "label": label, "kind": "copy", "entry": entry,
                        "launch": copies.first().map(|c| launch(&c.0)),
                        "copies": copies.iter().map(|(l, a, v)| json!({
                            "launch": launch(l), "from": name(*v), "dims": a.dims,
                            "src": a.src, "dst": a.dst,
                        })).collect::<Vec<_>>(),
                        "writes": [name(*out)],
                    }),
                    Step::Host { node, why } => json!({
                        "index": i, "label": label, "kind": "host",
                        "op": g.nodes[*node].op.name(), "why": why,
                        "reads": names(&g.nodes[*node].inputs.iter().flatten().copied().collect::<Vec<_>>()),
                        "writes": names(&g.nodes[*node].outputs),
                    }),
                    Step::Copy { from, to, bytes } => json!({
                        "index": i, "label": label, "kind": "copy",
                        "reads": [name(*from)], "writes": [name(*to)], "bytes": bytes,
                    }),
                    Step::Empty => json!({"index": i, "label": label, "kind": "empty"}),
                }
            })
            .collect();
        let values: Vec<Json> = self
            .memory
            .arena
            .values
            .iter()
            .map(|p| {
                json!({
                    "name": name(p.interval.value), "offset": p.offset,
                    "bytes": p.interval.bytes, "first": p.interval.start, "last": p.interval.end,
                })
            })
            .collect();
        let weights: Vec<Json> = self
            .plan
            .constants
            .iter()
            .zip(&self.memory.weights)
            .map(|((v, t), &(_, off, nb))| {
                json!({"name": name(*v), "dtype": t.dtype().to_string(), "shape": t.shape(),
                       "offset": off, "bytes": nb})
            })
            .collect();
        json!({
            "format": "kiln-cuda/1",
            "ptx": ptx_file,
            "sm": self.module.sm,
            "inputs": io(&g.inputs),
            "outputs": io(&g.outputs),
            "arena_bytes": self.memory.arena.arena_bytes,
            "live_peak_bytes": self.memory.arena.live_peak_bytes,
            "values": values,
            "weights": {"file": weights_file, "bytes": self.memory.weight_bytes,
                        "align": geometry::WEIGHT_ALIGN, "tensors": weights},
            "host_ops": self.host_ops(),
            "kernels": kernels,
        })
    }
}
