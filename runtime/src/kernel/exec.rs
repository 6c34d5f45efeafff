//! Running a [`Plan`]: graph inputs checked against their declared types, kernels in
//! order, each value freed after its last use. Loop kernels go to a [`LoopRunner`] (the
//! reference evaluator or a JIT); contractions to their prepared CPU routines
//! ([`super::contraction`], on the runner's thread pool) or, where none applies, and
//! fallbacks to the interpreter's ops.

use super::ir::LoopKernel;
use super::partition::{Kernel, Plan};
use kiln_ir::{EvalError, Tensor, ValueId};
use std::borrow::Cow;
use std::collections::HashMap;
use std::time::Instant;

/// How long one kernel took in a profiled run.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelTime {
    /// The kernel's label ([`Plan::label`]).
    pub label: String,
    /// `loop`, `contraction` or `fallback`.
    pub kind: &'static str,
    /// The op (for loop kernels, `loop`).
    pub op: String,
    /// Wall time in nanoseconds.
    pub nanos: u64,
}

/// What a profiled run measured besides the outputs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunReport {
    /// Per-kernel wall time, in execution order.
    pub kernels: Vec<KernelTime>,
    /// The memory plan for this run's shapes.
    pub memory: super::memory::MemoryPlan,
}

/// Something that runs loop kernels. `index` is the kernel's position in
/// [`Plan::kernels`], so a runner can keep per-kernel compiled code.
pub trait LoopRunner: Send + Sync {
    /// Runs loop kernel `index` on its inputs, returning its outputs in order.
    fn run_loop(
        &self,
        index: usize,
        k: &LoopKernel,
        inputs: &[&Tensor],
    ) -> Result<Vec<Tensor>, String>;

    /// The thread pool contraction kernels run on (`None`: one thread, inline).
    fn pool(&self) -> Option<&crate::pool::Pool> {
        None
    }
}

/// Runs loop kernels with the portable evaluator in [`super::eval`].
#[derive(Clone, Copy, Debug, Default)]
pub struct ReferenceRunner;

impl LoopRunner for ReferenceRunner {
    fn run_loop(
        &self,
        _: usize,
        k: &LoopKernel,
        inputs: &[&Tensor],
    ) -> Result<Vec<Tensor>, String> {
        super::eval::run_loop(k, inputs)
    }
}

impl Plan {
    /// A short label for kernel `i` (for errors and dumps).
    pub fn label(&self, i: usize) -> String {
        let g = &self.graph;
        match self.kernels.get(i) {
            Some(Kernel::Loop(k)) => format!(
                "loop[{}]",
                k.outputs
                    .iter()
                    .map(|(v, _)| g.value(*v).name.clone())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Some(Kernel::Contraction(n)) | Some(Kernel::Fallback(n)) => {
                let node = &g.nodes[*n];
                if node.name.is_empty() {
                    format!(
                        "%{}",
                        node.outputs
                            .first()
                            .map(|&o| g.value(o).name.as_str())
                            .unwrap_or("")
                    )
                } else {
                    node.name.clone()
                }
            }
            None => format!("#{i}"),
        }
    }

    /// Runs the plan on inputs given by name; outputs come back in graph order.
    pub fn run_named(
        &self,
        inputs: &[(&str, Tensor)],
        runner: &dyn LoopRunner,
    ) -> Result<Vec<Tensor>, EvalError> {
        self.run(kiln_ir::interp::order_inputs(&self.graph, inputs)?, runner)
    }

    /// Runs the plan on inputs in graph order; outputs come back in graph order.
    pub fn run(
        &self,
        inputs: Vec<Tensor>,
        runner: &dyn LoopRunner,
    ) -> Result<Vec<Tensor>, EvalError> {
        self.run_with(inputs, runner, None)
    }

    /// Runs like [`Plan::run`], also filling `report` (per-kernel times, memory plan)
    /// when given.
    pub fn run_with(
        &self,
        inputs: Vec<Tensor>,
        runner: &dyn LoopRunner,
        mut report: Option<&mut RunReport>,
    ) -> Result<Vec<Tensor>, EvalError> {
        let g = &self.graph;
        if inputs.len() != g.inputs.len() {
            return Err(EvalError::UnknownInput {
                name: format!("#{}", inputs.len()),
                known: format!("{} inputs", g.inputs.len()),
            });
        }
        // Static shape arithmetic comes from the memo when an entry for these input shapes
        // exists (validated kernel by kernel); otherwise this run records one.
        let statics = self.memo.statics(self);
        let memo_key: Vec<Vec<usize>> = if statics.count > 0 {
            inputs.iter().map(|t| t.shape().to_vec()).collect()
        } else {
            Vec::new()
        };
        let memo_entry = if statics.count > 0 {
            self.memo.lookup(&memo_key)
        } else {
            None
        };
        let mut memo_live = memo_entry.is_some();
        let mut memo_rec: Option<super::memo::Entry> = (statics.count > 0 && memo_entry.is_none())
            .then(|| super::memo::Entry {
                outs: vec![Vec::new(); statics.count],
                seen: vec![Vec::new(); statics.count],
            });
        // Constants (the weights) are borrowed from the plan, never copied per run.
        let mut env: Vec<Option<Cow<'_, Tensor>>> = vec![None; g.values.len()];
        let mut bindings = HashMap::new();
        for (&id, t) in g.inputs.iter().zip(inputs) {
            let v = g.value(id);
            kiln_ir::interp::check_input(&v.name, &v.ty, &t, &mut bindings)?;
            env[id.index()] = Some(Cow::Owned(t));
        }
        for (v, t) in &self.constants {
            env[v.index()] = Some(Cow::Borrowed(t));
        }
        // The values a kernel reads, without allocating (this runs twice per kernel).
        let each_use = |k: &Kernel, f: &mut dyn FnMut(ValueId)| match k {
            Kernel::Loop(l) => l.inputs.iter().for_each(|i| f(i.value)),
            Kernel::Contraction(n) | Kernel::Fallback(n) => {
                g.nodes[*n].inputs.iter().flatten().for_each(|&v| f(v))
            }
        };
        let mut last_use = vec![usize::MAX; g.values.len()];
        for (ki, k) in self.kernels.iter().enumerate() {
            each_use(k, &mut |v| last_use[v.index()] = ki);
        }
        for &o in &g.outputs {
            last_use[o.index()] = usize::MAX;
        }
        // Lifetimes of the values kernels produce, for the memory plan of a reported run.
        let mut intervals = report.as_ref().map(|_| Vec::new());
        for (ki, k) in self.kernels.iter().enumerate() {
            let slot = statics.slot[ki];
            if let Some(s) = slot {
                // A static kernel: a fallback node, or a loop over static values.
                let (node, out_ids): (Option<&kiln_ir::Node>, Vec<ValueId>) = match k {
                    Kernel::Fallback(n) => (Some(&g.nodes[*n]), g.nodes[*n].outputs.clone()),
                    Kernel::Loop(l) => (None, l.outputs.iter().map(|o| o.0).collect()),
                    Kernel::Contraction(n) => (Some(&g.nodes[*n]), g.nodes[*n].outputs.clone()),
                };
                let shape_only = node.is_some_and(|n| super::memo::reads_shape_only(n.op));
                let seen = |env: &[Option<Cow<'_, Tensor>>]| {
                    node.and_then(|n| n.inputs.first().copied().flatten())
                        .and_then(|v| env[v.index()].as_deref())
                        .map(|t| t.shape().to_vec())
                        .unwrap_or_default()
                };
                if let (true, Some(e)) = (memo_live, memo_entry.as_deref()) {
                    if !shape_only || seen(&env) == e.seen[s] {
                        let started = report.as_ref().map(|_| Instant::now());
                        for (t, &o) in e.outs[s].iter().zip(&out_ids) {
                            env[o.index()] = Some(Cow::Borrowed(t));
                        }
                        if let (Some(r), Some(t0)) = (report.as_deref_mut(), started) {
                            r.kernels.push(KernelTime {
                                label: self.label(ki),
                                kind: "memo",
                                op: node.map_or("loop", |n| n.op.name()).to_string(),
                                nanos: t0.elapsed().as_nanos() as u64,
                            });
                        }
                        each_use(k, &mut |v| {
                            if last_use[v.index()] == ki {
                                env[v.index()] = None;
                            }
                        });
                        continue;
                    }
                    // A shape differs: compute the rest, recording a fresh entry that keeps
                    // the (validated) values before this kernel.
                    memo_live = false;
                    memo_rec = Some(super::memo::Entry {
                        outs: e.outs.clone(),
                        seen: e.seen.clone(),
                    });
                }
                if let Some(rec) = memo_rec.as_mut() {
                    if shape_only {
                        rec.seen[s] = seen(&env);
                    }
                }
            }
            // A reshape-like op on a tensor this kernel reads last takes the buffer over:
            // no copy at all. (Static kernels are left to the normal path, which records
            // their values in the memo.)
            if let (Kernel::Fallback(n), None) = (k, slot) {
                let node = &g.nodes[*n];
                if let (true, Some(&Some(x)), [o]) = (
                    super::glue::is_view(node.op),
                    node.inputs.first(),
                    node.outputs.as_slice(),
                ) {
                    let owned_here =
                        last_use[x.index()] == ki && matches!(env[x.index()], Some(Cow::Owned(_)));
                    let shape = owned_here
                        .then(|| {
                            let ins: Vec<Option<&Tensor>> = node
                                .inputs
                                .iter()
                                .map(|i| i.and_then(|i| env[i.index()].as_deref()))
                                .collect();
                            super::glue::movement_shape(node, &ins)
                        })
                        .flatten();
                    let ty = g.ty(*o);
                    let fits = |t: &Tensor, s: &[usize]| {
                        t.dtype() == ty.dtype
                            && ty.shape.admits(s)
                            && s.iter().product::<usize>() == t.len()
                    };
                    if let (Some(shape), Some(Cow::Owned(t))) = (shape, env[x.index()].as_ref()) {
                        if fits(t, &shape) {
                            let started = report.as_ref().map(|_| Instant::now());
                            let Some(Cow::Owned(t)) = env[x.index()].take() else {
                                unreachable!("checked to be owned above")
                            };
                            let t = t.reshaped(shape).map_err(|msg| EvalError::Node {
                                node: self.label(ki),
                                op: node.op.name().to_string(),
                                inputs: String::new(),
                                msg,
                            })?;
                            if let (Some(r), Some(t0)) = (report.as_deref_mut(), started) {
                                r.kernels.push(KernelTime {
                                    label: self.label(ki),
                                    kind: "fallback",
                                    op: node.op.name().to_string(),
                                    nanos: t0.elapsed().as_nanos() as u64,
                                });
                            }
                            if let Some(iv) = intervals.as_mut() {
                                iv.push(super::memory::Interval {
                                    value: *o,
                                    bytes: t.len() * t.dtype().size(),
                                    start: ki,
                                    end: if g.outputs.contains(o) {
                                        self.kernels.len()
                                    } else if last_use[o.index()] == usize::MAX {
                                        ki
                                    } else {
                                        last_use[o.index()]
                                    },
                                });
                            }
                            env[o.index()] = Some(Cow::Owned(t));
                            each_use(k, &mut |v| {
                                if last_use[v.index()] == ki {
                                    env[v.index()] = None;
                                }
                            });
                            continue;
                        }
                    }
                }
            }
            let ins_ids: Vec<Option<ValueId>> = match k {
                Kernel::Loop(l) => l.inputs.iter().map(|i| Some(i.value)).collect(),
                Kernel::Contraction(n) | Kernel::Fallback(n) => g.nodes[*n].inputs.clone(),
            };
            let ins: Vec<Option<&Tensor>> = ins_ids
                .iter()
                .map(|i| i.and_then(|i| env[i.index()].as_deref()))
                .collect();
            let err = |msg: String| EvalError::Node {
                node: self.label(ki),
                op: match k {
                    Kernel::Loop(_) => "loop".to_string(),
                    Kernel::Contraction(n) | Kernel::Fallback(n) => {
                        g.nodes[*n].op.name().to_string()
                    }
                },
                inputs: kiln_ir::interp::describe(&ins),
                msg,
            };
            for (j, i) in ins_ids.iter().enumerate() {
                if let (Some(v), None) = (i, ins[j]) {
                    return Err(err(format!(
                        "input #{j} `{}` has no value",
                        g.value(*v).name
                    )));
                }
            }
            let started = report.as_ref().map(|_| Instant::now());
            let (outs, out_ids): (Vec<Tensor>, Vec<ValueId>) = match k {
                Kernel::Loop(l) => {
                    let flat: Vec<&Tensor> = ins.iter().flatten().copied().collect();
                    let outs = runner.run_loop(ki, l, &flat).map_err(err)?;
                    (outs, l.outputs.iter().map(|o| o.0).collect())
                }
                Kernel::Fallback(n) if super::glue::has_fast_path(g.nodes[*n].op) => {
                    let node = &g.nodes[*n];
                    let single = crate::pool::Pool::single();
                    let pool = runner.pool().unwrap_or(&single);
                    let outs = match super::glue::run_fast_on(node, &ins, pool) {
                        Some(outs) => outs,
                        None => kiln_ir::ops::eval(node.op, &node.attrs, &ins).map_err(err)?,
                    };
                    (outs, node.outputs.clone())
                }
                Kernel::Contraction(n) | Kernel::Fallback(n) => {
                    let node = &g.nodes[*n];
                    let prepared = self.contractions.get(ki).and_then(|p| p.as_deref());
                    let fast = prepared.and_then(|p| match runner.pool() {
                        Some(pool) => p.run(&ins, pool),
                        None => p.run(&ins, &crate::pool::Pool::single()),
                    });
                    let mut outs = match fast {
                        Some(r) => r.map_err(err)?,
                        None => kiln_ir::ops::eval(node.op, &node.attrs, &ins).map_err(err)?,
                    };
                    outs.truncate(node.outputs.len());
                    (outs, node.outputs.clone())
                }
            };
            if outs.len() != out_ids.len() {
                return Err(err(format!(
                    "produced {} outputs, expected {}",
                    outs.len(),
                    out_ids.len()
                )));
            }
            for (t, &o) in outs.iter().zip(&out_ids) {
                let ty = g.ty(o);
                if t.dtype() != ty.dtype || !ty.shape.admits(t.shape()) {
                    return Err(err(format!(
                        "output `{}` is {}{:?} but its type is {ty}",
                        g.value(o).name,
                        t.dtype(),
                        t.shape()
                    )));
                }
            }
            drop(ins);
            if let (Some(r), Some(t0)) = (report.as_deref_mut(), started) {
                let (kind, op) = match k {
                    Kernel::Loop(_) => ("loop", "loop".to_string()),
                    Kernel::Contraction(n) => ("contraction", g.nodes[*n].op.name().to_string()),
                    Kernel::Fallback(n) => ("fallback", g.nodes[*n].op.name().to_string()),
                };
                r.kernels.push(KernelTime {
                    label: self.label(ki),
                    kind,
                    op,
                    nanos: t0.elapsed().as_nanos() as u64,
                });
            }
            if let Some(iv) = intervals.as_mut() {
                for (t, &o) in outs.iter().zip(&out_ids) {
                    let end = if g.outputs.contains(&o) {
                        self.kernels.len()
                    } else if last_use[o.index()] == usize::MAX {
                        ki
                    } else {
                        last_use[o.index()]
                    };
                    iv.push(super::memory::Interval {
                        value: o,
                        bytes: t.len() * t.dtype().size(),
                        start: ki,
                        end,
                    });
                }
            }
            if let (Some(s), Some(rec)) = (slot, memo_rec.as_mut()) {
                rec.outs[s] = outs.clone();
            }
            for (t, o) in outs.into_iter().zip(out_ids) {
                env[o.index()] = Some(Cow::Owned(t));
            }
            each_use(k, &mut |v| {
                if last_use[v.index()] == ki {
                    env[v.index()] = None;
                }
            });
        }
        if let Some(rec) = memo_rec {
            self.memo.store(memo_key, rec);
        }
        if let (Some(r), Some(iv)) = (report, intervals) {
            r.memory = super::memory::plan(&iv);
        }
        g.outputs
            .iter()
            .map(|&o| {
                env[o.index()]
                    .as_deref()
                    .cloned()
                    .ok_or_else(|| EvalError::Node {
                        node: format!("%{}", g.value(o).name),
                        op: "return".into(),
                        inputs: String::new(),
                        msg: "graph output was never computed".into(),
                    })
            })
            .collect()
    }
}
