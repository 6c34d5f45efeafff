//! Running a plan on the CPU: [`CpuPlan`] is a [`Plan`] with its contractions prepared
//! (weights packed once) and the per-run state (memoised shape arithmetic, arena blocks).
//! A run checks graph inputs against their declared types, runs kernels in order, frees
//! each value after its last use and, from the second run with the same input shapes on,
//! writes values into their regions of an arena block ([`super::arena`]; the first run
//! records the layout). Loop kernels go to a [`LoopRunner`] (the reference evaluator or a
//! JIT's compiled code); contractions to their prepared routines ([`super::contraction`],
//! on the runner's thread pool) or, where none applies, and fallbacks to the native
//! routines ([`super::routines`]) or the interpreter's ops.

use super::arena::Outputs;
use kiln_ir::{EvalError, Tensor, ValueId};
use kiln_plan::memo::{self as memo, ShapeMemo};
use kiln_plan::memory::{self, Interval, MemoryPlan};
use kiln_plan::{Kernel, LoopKernel, Plan};
use std::borrow::Cow;
use std::collections::HashMap;
use std::time::Instant;

/// How long one kernel took in a profiled run.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelTime {
    /// The kernel's label ([`Plan::label`]).
    pub label: String,
    /// Which path ran it: `loop` (generated code), `contraction` (a prepared routine),
    /// `native` (a routine for a glue op, or a `loop` node's body plan run per iteration),
    /// `stepped` (a `loop` node run as one native loop over its body's row functions,
    /// [`super::stepped`]) or `interp` (the interpreter's op: no routine, or the routine
    /// declined these inputs).
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
    /// The memory plan for this run's shapes (every intermediate value and the outputs).
    pub memory: MemoryPlan,
    /// The size of the arena block this run used (0 on the first run with these input
    /// shapes, which records the layout).
    pub arena_bytes: usize,
    /// Bytes of the values this run wrote into their arena regions.
    pub in_arena_bytes: usize,
    /// Bytes of all values this run's kernels produced (outputs included).
    pub produced_bytes: usize,
}

/// Something that runs loop kernels: the one trait through which a code generator (the
/// Cranelift JIT, an AOT library's compiled code) plugs into the CPU runtime. `index` is the
/// kernel's position in [`Plan::kernels`], so a runner can keep per-kernel compiled code.
pub trait LoopRunner: Send + Sync {
    /// Runs loop kernel `index` on its inputs, returning its outputs in order; `out` has
    /// their planned arena regions (a runner may ignore them and allocate).
    fn run_loop(
        &self,
        index: usize,
        k: &LoopKernel,
        inputs: &[&Tensor],
        out: &mut Outputs,
    ) -> Result<Vec<Tensor>, String>;

    /// The thread pool contraction kernels run on (`None`: one thread, inline).
    fn pool(&self) -> Option<&crate::pool::Pool> {
        None
    }

    /// The runner for the body of the `loop`/`scan` node that kernel `index` runs
    /// ([`CpuPlan::bodies`]), where this runner compiled the body's loop kernels too
    /// (`None`: the portable evaluator runs them, contractions on this runner's pool).
    fn body_runner(&self, index: usize) -> Option<Box<dyn LoopRunner + '_>> {
        let _ = index;
        None
    }

    /// The compiled row function of loop kernel `index` and its post-map, where this
    /// runner runs that kernel through one ([`super::rows`]): what the native driver of
    /// stepped loops ([`super::stepped`]) calls directly (`None`: it then runs the general
    /// path).
    fn row_fn(&self, index: usize) -> Option<(super::rows::RowFn, Option<super::rows::PostMap>)> {
        let _ = index;
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
        _: &mut Outputs,
    ) -> Result<Vec<Tensor>, String> {
        kiln_plan::eval::run_loop(k, inputs)
    }
}

/// A plan prepared for the CPU: contraction weights packed once, and the state runs
/// share (memoised shape arithmetic, arena layouts and blocks). `Send + Sync`: any number
/// of threads may run it at once.
#[derive(Debug)]
pub struct CpuPlan {
    /// The backend-neutral plan.
    pub plan: Plan,
    /// Per kernel: the prepared routine of a `Contraction` (constant weights packed
    /// once), or `None` where the interpreter's op runs.
    pub contractions: Vec<Option<std::sync::Arc<super::contraction::Prepared>>>,
    /// Per kernel: the compiled body of a `loop` or `scan` node (its own plan, prepared
    /// once; its arena is reused from one iteration to the next).
    pub bodies: Vec<Option<std::sync::Arc<CpuPlan>>>,
    /// Per kernel: how a `loop` whose body is an elementwise time step runs as one native
    /// loop ([`super::stepped`]), where it is one.
    stepped: Vec<Option<super::stepped::StepPlan>>,
    /// Memoised shape arithmetic, filled by runs.
    memo: ShapeMemo,
    /// Arena layouts per input-shape set and reusable blocks, filled by runs.
    arenas: super::arena::Arenas,
    /// Per value: the last kernel that reads it (`usize::MAX`: none, or a graph output).
    last_use: Vec<usize>,
    /// Per value: whether it is a graph output.
    is_output: Vec<bool>,
    /// Per kernel: its input and output values, listed once (a body plan runs its kernels
    /// once per iteration).
    kernel_ids: Vec<KernelIds>,
}

/// A kernel's input values (as a node's optional inputs) and output values.
#[derive(Debug)]
struct KernelIds {
    ins: Vec<Option<ValueId>>,
    outs: Vec<ValueId>,
}

/// Per value: the last kernel of `plan` that reads it (`usize::MAX` for values no kernel
/// reads and for graph outputs), and whether it is a graph output. Computed once per plan:
/// a loop body's plan runs once per iteration.
fn value_uses(plan: &Plan) -> (Vec<usize>, Vec<bool>) {
    let g = &plan.graph;
    let mut last_use = vec![usize::MAX; g.values.len()];
    for (ki, k) in plan.kernels.iter().enumerate() {
        match k {
            Kernel::Loop(l) => l.inputs.iter().for_each(|i| last_use[i.value.index()] = ki),
            Kernel::Contraction(n) | Kernel::Fallback(n) => g.nodes[*n]
                .inputs
                .iter()
                .flatten()
                .for_each(|&v| last_use[v.index()] = ki),
        }
    }
    let mut is_output = vec![false; g.values.len()];
    for &o in &g.outputs {
        last_use[o.index()] = usize::MAX;
        is_output[o.index()] = true;
    }
    (last_use, is_output)
}

/// Each contraction kernel's prepared routine (weights packed), on every core: packing a
/// large model's weights is most of its preparation, and the kernels are independent.
fn prepare_contractions(plan: &Plan) -> Vec<Option<std::sync::Arc<super::contraction::Prepared>>> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let known: HashMap<ValueId, &Tensor> = plan.constants.iter().map(|(v, t)| (*v, t)).collect();
    let todo: Vec<(usize, usize)> = plan
        .kernels
        .iter()
        .enumerate()
        .filter_map(|(i, k)| match k {
            Kernel::Contraction(n) => Some((i, *n)),
            // Recurrent ops run a native routine whose constant weights are laid out once.
            Kernel::Fallback(n)
                if matches!(
                    plan.graph.nodes[*n].op,
                    kiln_ir::OpKind::Lstm | kiln_ir::OpKind::Gru | kiln_ir::OpKind::Rnn
                ) =>
            {
                Some((i, *n))
            }
            _ => None,
        })
        .collect();
    // Kernels that would prepare the same routine (the same op and attributes on the same
    // constant weights: an unrolled recurrence's per-step matmuls, tied weights) share one,
    // so its packed weights are packed and kept in cache once.
    let key = |n: usize| {
        let node = &plan.graph.nodes[n];
        let mut attrs = node.attrs.clone();
        attrs.0.remove("fused_from");
        // A kernel with a large tensor attribute keeps its own routine (printing it for the
        // key would cost more than packing).
        let large = attrs.0.values().any(|a| match a {
            kiln_ir::Attr::Tensor(t) => t.len() > 64,
            kiln_ir::Attr::Graph(_) => true,
            _ => false,
        });
        if large {
            return format!("#{n}");
        }
        let consts: Vec<Option<ValueId>> = node
            .inputs
            .iter()
            .map(|v| v.filter(|v| known.contains_key(v)))
            .collect();
        let sparse =
            node.inputs.first().copied().flatten().is_some_and(|a| {
                super::contraction::sparsifying_producer(&plan.graph.nodes[..n], a)
            });
        format!("{:?} {attrs:?} {consts:?} {sparse}", node.op)
    };
    let mut first_of: HashMap<String, usize> = HashMap::new();
    let mut same_as: Vec<(usize, usize)> = vec![];
    let todo: Vec<(usize, usize)> = todo
        .into_iter()
        .filter(|&(i, n)| match first_of.entry(key(n)) {
            std::collections::hash_map::Entry::Occupied(e) => {
                same_as.push((i, *e.get()));
                false
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(i);
                true
            }
        })
        .collect();
    let mut out: Vec<Option<std::sync::Arc<super::contraction::Prepared>>> =
        (0..plan.kernels.len()).map(|_| None).collect();
    let share = |out: &mut Vec<Option<std::sync::Arc<super::contraction::Prepared>>>| {
        for &(i, j) in &same_as {
            out[i] = out[j].clone();
        }
    };
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(todo.len());
    let prepare =
        |n: usize| super::contraction::prepare(&plan.graph, n, &known).map(std::sync::Arc::new);
    if threads <= 1 {
        for &(i, n) in &todo {
            out[i] = prepare(n);
        }
        share(&mut out);
        return out;
    }
    let next = AtomicUsize::new(0);
    let done: Vec<Vec<(usize, Option<std::sync::Arc<super::contraction::Prepared>>)>> =
        std::thread::scope(|s| {
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(|| {
                        let mut mine = vec![];
                        loop {
                            let j = next.fetch_add(1, Ordering::Relaxed);
                            let Some(&(i, n)) = todo.get(j) else { break };
                            mine.push((i, prepare(n)));
                        }
                        mine
                    })
                })
                .collect();
            // A worker that panicked re-raises here (prepare returns None, never panics,
            // on bad input).
            workers
                .into_iter()
                .map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        });
    for (i, p) in done.into_iter().flatten() {
        out[i] = p;
    }
    share(&mut out);
    out
}

impl CpuPlan {
    /// Prepares `plan` for the CPU: each contraction whose weights are constants gets its
    /// routine, weights packed.
    pub fn new(plan: Plan) -> CpuPlan {
        let contractions = prepare_contractions(&plan);
        let bodies = plan
            .kernels
            .iter()
            .map(|k| match k {
                Kernel::Fallback(n) if plan.graph.nodes[*n].op.holds_graphs() => {
                    let node = &plan.graph.nodes[*n];
                    let body = node.attrs.graph("body").ok().flatten()?;
                    // A body the partitioner declines runs in the interpreter.
                    let p = kiln_plan::partition(&body).ok()?;
                    Some(std::sync::Arc::new(CpuPlan::new(p)))
                }
                _ => None,
            })
            .collect();
        let stepped = plan
            .kernels
            .iter()
            .zip(&bodies)
            .map(
                |(k, b): (&Kernel, &Option<std::sync::Arc<CpuPlan>>)| match (k, b.as_deref()) {
                    (Kernel::Fallback(n), Some(b)) => {
                        super::stepped::StepPlan::new(&plan.graph.nodes[*n], b)
                    }
                    _ => None,
                },
            )
            .collect();
        let (last_use, is_output) = value_uses(&plan);
        let kernel_ids = plan
            .kernels
            .iter()
            .map(|k| match k {
                Kernel::Loop(l) => KernelIds {
                    ins: l.inputs.iter().map(|i| Some(i.value)).collect(),
                    outs: l.outputs.iter().map(|o| o.0).collect(),
                },
                Kernel::Contraction(n) | Kernel::Fallback(n) => KernelIds {
                    ins: plan.graph.nodes[*n].inputs.clone(),
                    outs: plan.graph.nodes[*n].outputs.clone(),
                },
            })
            .collect();
        CpuPlan {
            plan,
            contractions,
            bodies,
            stepped,
            memo: ShapeMemo::default(),
            arenas: Default::default(),
            last_use,
            is_output,
            kernel_ids,
        }
    }

    /// Partitions `g` ([`kiln_plan::partition`]) and prepares the plan.
    pub fn partition(g: &kiln_ir::Graph) -> Result<CpuPlan, String> {
        Ok(CpuPlan::new(kiln_plan::partition(g)?))
    }

    /// A short label for kernel `i` ([`Plan::label`]).
    pub fn label(&self, i: usize) -> String {
        self.plan.label(i)
    }

    /// How many static (memoised) kernels the plan has.
    pub fn static_kernels(&self) -> usize {
        self.memo.statics(&self.plan).count
    }

    /// Runs the plan on inputs given by name; outputs come back in graph order.
    pub fn run_named(
        &self,
        inputs: &[(&str, Tensor)],
        runner: &dyn LoopRunner,
    ) -> Result<Vec<Tensor>, EvalError> {
        self.run(
            kiln_ir::interp::order_inputs(&self.plan.graph, inputs)?,
            runner,
        )
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
        report: Option<&mut RunReport>,
    ) -> Result<Vec<Tensor>, EvalError> {
        self.run_cow(inputs.into_iter().map(Cow::Owned).collect(), runner, report)
    }

    /// Runs on inputs the caller keeps (graph order), without copying them: they are read
    /// where they are, like the plan's constants, so no kernel writes into them or takes
    /// their buffers over, and an output that is an input comes back as a copy.
    pub fn run_borrowed(
        &self,
        inputs: &[&Tensor],
        runner: &dyn LoopRunner,
        report: Option<&mut RunReport>,
    ) -> Result<Vec<Tensor>, EvalError> {
        self.run_cow(
            inputs.iter().map(|&t| Cow::Borrowed(t)).collect(),
            runner,
            report,
        )
    }

    /// The run itself: owned inputs may be written in place or taken over by a view;
    /// borrowed ones are only read.
    fn run_cow(
        &self,
        inputs: Vec<Cow<'_, Tensor>>,
        runner: &dyn LoopRunner,
        mut report: Option<&mut RunReport>,
    ) -> Result<Vec<Tensor>, EvalError> {
        let g = &self.plan.graph;
        if inputs.len() != g.inputs.len() {
            return Err(EvalError::UnknownInput {
                name: format!("#{}", inputs.len()),
                known: format!("{} inputs", g.inputs.len()),
            });
        }
        // Static shape arithmetic comes from the memo when an entry for these input shapes
        // exists (validated kernel by kernel); otherwise this run records one.
        let statics = self.memo.statics(&self.plan);
        let shapes_key = memo::shapes_key(inputs.iter().map(|t| t.as_ref()));
        let memo_entry = if statics.count > 0 {
            self.memo.lookup(&shapes_key)
        } else {
            None
        };
        // Intermediate values live in one arena block laid out by the plan the first run
        // with these input shapes recorded; that first run allocates and records.
        let layout = self.arenas.layout(&shapes_key);
        let block = layout
            .as_ref()
            .and_then(|l| self.arenas.take(l.plan.arena_bytes));
        let mut memo_live = memo_entry.is_some();
        let mut memo_rec: Option<memo::Entry> =
            (statics.count > 0 && memo_entry.is_none()).then(|| memo::Entry {
                outs: vec![Vec::new(); statics.count],
                seen: vec![Vec::new(); statics.count],
            });
        // Constants (the weights) are borrowed from the plan, never copied per run.
        let mut env: Vec<Option<Cow<'_, Tensor>>> = vec![None; g.values.len()];
        let mut bindings = HashMap::new();
        for (&id, t) in g.inputs.iter().zip(inputs) {
            let v = g.value(id);
            kiln_ir::interp::check_input(&v.name, &v.ty, &t, &mut bindings)?;
            env[id.index()] = Some(t);
        }
        for (v, t) in &self.plan.constants {
            env[v.index()] = Some(Cow::Borrowed(t));
        }
        // The values a kernel reads, without allocating (this runs twice per kernel).
        let each_use = |k: &Kernel, f: &mut dyn FnMut(ValueId)| match k {
            Kernel::Loop(l) => l.inputs.iter().for_each(|i| f(i.value)),
            Kernel::Contraction(n) | Kernel::Fallback(n) => {
                g.nodes[*n].inputs.iter().flatten().for_each(|&v| f(v))
            }
        };
        let (last_use, is_output) = (&self.last_use, &self.is_output);
        // Lifetimes of the values kernels produce: the arena layout of a first run, the
        // memory plan of a reported one. `interval_of` finds a value's interval (a value that
        // took over its input's buffer shares that buffer's), `takeovers` lists those values,
        // and `arena_ok` marks the intervals of kernels that write into regions.
        let mut intervals: Option<Vec<Interval>> =
            (report.is_some() || layout.is_none()).then(Vec::new);
        // (Only a run that records intervals reads it: a steady-state run, such as a loop
        // body's iterations, allocates nothing here.)
        let mut interval_of: Vec<Option<usize>> = match intervals {
            Some(_) => vec![None; g.values.len()],
            None => Vec::new(),
        };
        let mut arena_ok: Vec<bool> = Vec::new();
        let mut takeovers = std::collections::HashSet::new();
        let (mut in_arena_bytes, mut produced_bytes) = (0usize, 0usize);
        let end_of = |o: ValueId, ki: usize| {
            if is_output[o.index()] {
                self.plan.kernels.len()
            } else if last_use[o.index()] == usize::MAX {
                ki
            } else {
                last_use[o.index()]
            }
        };
        for (ki, k) in self.plan.kernels.iter().enumerate() {
            let slot = statics.slot[ki];
            if let Some(s) = slot {
                // A static kernel: a fallback node, or a loop over static values.
                let node = match k {
                    Kernel::Fallback(n) | Kernel::Contraction(n) => Some(&g.nodes[*n]),
                    Kernel::Loop(_) => None,
                };
                let out_ids: &[ValueId] = &self.kernel_ids[ki].outs;
                let shape_only = node.is_some_and(|n| memo::reads_shape_only(n.op));
                // What a `shape`/`size` kernel reads: its first input's shape.
                let read = node.and_then(|n| n.inputs.first().copied().flatten());
                if let (true, Some(e)) = (memo_live, memo_entry.as_deref()) {
                    if !shape_only || shape_in(&env, read) == e.seen[s].as_slice() {
                        let started = report.as_ref().map(|_| Instant::now());
                        for (t, &o) in e.outs[s].iter().zip(out_ids.iter()) {
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
                    memo_rec = Some(memo::Entry {
                        outs: e.outs.clone(),
                        seen: e.seen.clone(),
                    });
                }
                if let Some(rec) = memo_rec.as_mut() {
                    if shape_only {
                        rec.seen[s] = shape_in(&env, read).to_vec();
                    }
                }
            }
            // A reshape-like op on a tensor this kernel reads last takes the buffer over:
            // no copy at all; a `scatter_nd` into such a tensor writes its updates there.
            // (Static kernels are left to the normal path, which records their values in
            // the memo.)
            if let (Kernel::Fallback(n), None) = (k, slot) {
                let node = &g.nodes[*n];
                let scatter = node.op == kiln_ir::OpKind::ScatterND
                    && node.inputs.len() == 3
                    && node.inputs[1..].iter().all(|i| *i != node.inputs[0]);
                if let (true, Some(&Some(x)), [o]) = (
                    super::routines::is_view(node.op) || scatter,
                    node.inputs.first(),
                    node.outputs.as_slice(),
                ) {
                    // A buffer in the arena moves on only where the recorded layout has it
                    // move (its interval then covers the new value).
                    let movable = |t: &Tensor| {
                        t.data().storage() != kiln_ir::Storage::Region
                            || layout.as_ref().is_some_and(|l| l.is_takeover(*o))
                    };
                    let owned_here = last_use[x.index()] == ki
                        && matches!(&env[x.index()], Some(Cow::Owned(t)) if movable(t));
                    let shape = owned_here
                        .then(|| {
                            let ins: Vec<Option<&Tensor>> = node
                                .inputs
                                .iter()
                                .map(|i| i.and_then(|i| env[i.index()].as_deref()))
                                .collect();
                            if scatter {
                                crate::native::index::scatter_runs_natively(node, &ins)
                                    .then(|| ins[0].map(|t| t.shape().to_vec()))
                                    .flatten()
                            } else {
                                super::routines::movement_shape(node, &ins)
                            }
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
                            let t = if scatter {
                                let arg = |i: usize| {
                                    node.inputs[i].and_then(|v| env[v.index()].as_deref())
                                };
                                // Checked by `scatter_runs_natively` above: it cannot
                                // decline now.
                                let done = match (arg(1), arg(2)) {
                                    (Some(ind), Some(upd)) => {
                                        crate::native::index::run_in_place(node, t, ind, upd).ok()
                                    }
                                    _ => None,
                                };
                                done.ok_or_else(|| EvalError::Node {
                                    node: self.label(ki),
                                    op: node.op.name().to_string(),
                                    inputs: String::new(),
                                    msg: "scatter_nd declined after its check".into(),
                                })?
                            } else {
                                t.reshaped(shape).map_err(|msg| EvalError::Node {
                                    node: self.label(ki),
                                    op: node.op.name().to_string(),
                                    inputs: String::new(),
                                    msg,
                                })?
                            };
                            if let (Some(r), Some(t0)) = (report.as_deref_mut(), started) {
                                r.kernels.push(KernelTime {
                                    label: self.label(ki),
                                    kind: "fallback",
                                    op: node.op.name().to_string(),
                                    nanos: t0.elapsed().as_nanos() as u64,
                                });
                            }
                            if let Some(iv) = intervals.as_mut() {
                                match interval_of[x.index()] {
                                    // The buffer's interval now runs to the new value's end.
                                    Some(i) => {
                                        iv[i].end = iv[i].end.max(end_of(*o, ki));
                                        interval_of[o.index()] = Some(i);
                                        takeovers.insert(*o);
                                    }
                                    None => {
                                        interval_of[o.index()] = Some(iv.len());
                                        arena_ok.push(false);
                                        iv.push(Interval {
                                            value: *o,
                                            bytes: t.len() * t.dtype().size(),
                                            start: ki,
                                            end: end_of(*o, ki),
                                        });
                                    }
                                }
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
            // Borrowed from the node where it has them (no allocation per kernel).
            let ins_ids: &[Option<ValueId>] = &self.kernel_ids[ki].ins;
            let ins: smallvec::SmallVec<[Option<&Tensor>; 6]> = ins_ids
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
            let out_ids: &[ValueId] = &self.kernel_ids[ki].outs;
            // The outputs' arena regions. Not for static kernels (the memo keeps their
            // values), nor for graph outputs (returned to the caller), which the layout
            // leaves out: they take pooled memory that comes back when the caller drops it.
            let mut regions = match (&block, &layout, slot) {
                // SAFETY: `layout` was recorded for these input shapes, and every value is
                // dropped from `env` at its last use, which is where its interval ends.
                (Some(b), Some(l), None) => unsafe {
                    super::arena::Outputs::planned(b, l, out_ids)
                },
                _ => super::arena::Outputs::none(),
            };
            if slot.is_none() && out_ids.iter().any(|o| is_output[o.index()]) {
                let graph_output = out_ids.iter().map(|o| is_output[o.index()]).collect();
                regions = regions.with_pool(&self.arenas.outputs, graph_output);
            }
            let started = report.as_ref().map(|_| Instant::now());
            // Which path ran the kernel, for the profile: a declined fast path is `interp`.
            let mut kind = match k {
                Kernel::Loop(_) => "loop",
                Kernel::Contraction(_) => "contraction",
                Kernel::Fallback(_) => "native",
            };
            let outs: Vec<Tensor> = match k {
                Kernel::Loop(l) => {
                    let flat: smallvec::SmallVec<[&Tensor; 6]> =
                        ins.iter().flatten().copied().collect();
                    runner.run_loop(ki, l, &flat, &mut regions).map_err(err)?
                }
                Kernel::Fallback(n) if super::routines::has_fast_path(g.nodes[*n].op) => {
                    let node = &g.nodes[*n];
                    let single = crate::pool::Pool::single();
                    let pool = runner.pool().unwrap_or(&single);
                    let prepared = self.contractions.get(ki).and_then(|p| p.as_deref());
                    let fast = match prepared.and_then(|p| p.run(&ins, pool, &mut regions)) {
                        Some(r) => Some(r.map_err(err)?),
                        None => super::routines::run_fast_on(node, &ins, pool, &mut regions),
                    };
                    let mut outs = match fast {
                        Some(outs) => outs,
                        None => {
                            kind = "interp";
                            kiln_ir::ops::eval(node.op, &node.attrs, &ins).map_err(err)?
                        }
                    };
                    // Trailing optional outputs the node does not name (a recurrent op's
                    // `Y_c`, say) are dropped, as on the other paths.
                    outs.truncate(node.outputs.len());
                    outs
                }
                Kernel::Fallback(n) if self.bodies.get(ki).is_some_and(Option::is_some) => {
                    let node = &g.nodes[*n];
                    let body = self.bodies[ki].as_deref().expect("checked above");
                    let step = self.stepped[ki].as_ref();
                    let (mut outs, stepped) =
                        run_body_node(node, body, step, &ins, runner, ki).map_err(err)?;
                    if stepped {
                        kind = "stepped";
                    }
                    outs.truncate(node.outputs.len());
                    outs
                }
                Kernel::Contraction(n) | Kernel::Fallback(n) => {
                    let node = &g.nodes[*n];
                    let prepared = self.contractions.get(ki).and_then(|p| p.as_deref());
                    let fast = prepared.and_then(|p| match runner.pool() {
                        Some(pool) => p.run(&ins, pool, &mut regions),
                        None => p.run(&ins, &crate::pool::Pool::single(), &mut regions),
                    });
                    // A conv without a prepared routine: the general one, unpacked.
                    let fast = fast.or_else(|| {
                        let single = crate::pool::Pool::single();
                        let pool = runner.pool().unwrap_or(&single);
                        crate::native::conv_general::run(node, &ins, pool).map(|t| Ok(vec![t]))
                    });
                    let mut outs = match fast {
                        Some(r) => r.map_err(err)?,
                        None => {
                            kind = "interp";
                            kiln_ir::ops::eval(node.op, &node.attrs, &ins).map_err(err)?
                        }
                    };
                    outs.truncate(node.outputs.len());
                    outs
                }
            };
            drop(regions);
            if outs.len() != out_ids.len() {
                return Err(err(format!(
                    "produced {} outputs, expected {}",
                    outs.len(),
                    out_ids.len()
                )));
            }
            for (t, &o) in outs.iter().zip(out_ids.iter()) {
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
                let op = match k {
                    Kernel::Loop(_) => "loop".to_string(),
                    Kernel::Contraction(n) | Kernel::Fallback(n) => {
                        g.nodes[*n].op.name().to_string()
                    }
                };
                r.kernels.push(KernelTime {
                    label: self.label(ki),
                    kind,
                    op,
                    nanos: t0.elapsed().as_nanos() as u64,
                });
            }
            for t in &outs {
                let bytes = t.len() * t.dtype().size();
                produced_bytes += bytes;
                if t.data().storage() == kiln_ir::Storage::Region {
                    in_arena_bytes += bytes;
                }
            }
            if let Some(iv) = intervals.as_mut() {
                let writes_regions = slot.is_none() && takes_regions(k, g);
                for (t, &o) in outs.iter().zip(out_ids.iter()) {
                    interval_of[o.index()] = Some(iv.len());
                    arena_ok.push(writes_regions && !is_output[o.index()]);
                    iv.push(Interval {
                        value: o,
                        bytes: t.len() * t.dtype().size(),
                        start: ki,
                        end: end_of(o, ki),
                    });
                }
            }
            if let (Some(s), Some(rec)) = (slot, memo_rec.as_mut()) {
                rec.outs[s] = outs.clone();
            }
            for (t, o) in outs.into_iter().zip(out_ids.iter().copied()) {
                // A value nothing reads is dropped now, where its interval ends (its region
                // may be another value's from the next kernel on).
                if last_use[o.index()] != usize::MAX || is_output[o.index()] {
                    env[o.index()] = Some(Cow::Owned(t));
                }
            }
            each_use(k, &mut |v| {
                if last_use[v.index()] == ki {
                    env[v.index()] = None;
                }
            });
        }
        if let Some(rec) = memo_rec {
            self.memo.store(shapes_key.clone(), rec);
        }
        if let Some(iv) = &intervals {
            if layout.is_none() {
                // The arena holds the values of kernels that write into regions; a graph
                // output's buffer goes to the caller.
                let placed: Vec<_> = iv
                    .iter()
                    .zip(&arena_ok)
                    .filter(|(_, &ok)| ok)
                    .map(|(i, _)| *i)
                    .collect();
                let l = super::arena::ArenaLayout::new(memory::plan(&placed), takeovers);
                self.arenas.store(shapes_key, l);
            }
        }
        if let (Some(r), Some(iv)) = (report, intervals) {
            r.memory = memory::plan(&iv);
            r.arena_bytes = block.as_ref().map_or(0, |b| b.bytes());
            r.in_arena_bytes = in_arena_bytes;
            r.produced_bytes = produced_bytes;
        }
        // Outputs move to the caller, except arena regions (copied, so the block can be
        // reused) and a value returned twice (the earlier copies are clones).
        let outs = g
            .outputs
            .iter()
            .enumerate()
            .map(|(i, &o)| {
                let missing = || EvalError::Node {
                    node: format!("%{}", g.value(o).name),
                    op: "return".into(),
                    inputs: String::new(),
                    msg: "graph output was never computed".into(),
                };
                let last = !g.outputs[i + 1..].contains(&o);
                match env[o.index()].take() {
                    Some(Cow::Owned(t)) if t.data().storage() != kiln_ir::Storage::Region => {
                        if !last {
                            env[o.index()] = Some(Cow::Owned(t.clone()));
                        }
                        Ok(t)
                    }
                    Some(t) => {
                        let out = t.as_ref().clone();
                        env[o.index()] = Some(t);
                        Ok(out)
                    }
                    None => Err(missing()),
                }
            })
            .collect();
        drop(env);
        if let Some(b) = block {
            self.arenas.give_back(b);
        }
        outs
    }
}

/// The shape of value `v` in a run's environment (empty where there is none).
fn shape_in<'e>(env: &'e [Option<Cow<'_, Tensor>>], v: Option<ValueId>) -> &'e [usize] {
    v.and_then(|v| env[v.index()].as_deref())
        .map_or(&[], |t| t.shape())
}

/// Runs a `loop` or `scan` node natively: the iteration driver of kiln-ir's control family
/// calls the body's compiled plan once per iteration. The body's plan keeps its arena
/// layout and block from one iteration to the next (the same input shapes each time).
fn run_body_node(
    node: &kiln_ir::Node,
    body: &CpuPlan,
    step: Option<&super::stepped::StepPlan>,
    ins: &[Option<&Tensor>],
    runner: &dyn LoopRunner,
    index: usize,
) -> Result<(Vec<Tensor>, bool), String> {
    use kiln_ir::ops::control;
    let compiled = runner.body_runner(index);
    // An elementwise time step with compiled row functions: one native loop.
    if let (Some(step), Some(r)) = (step, &compiled) {
        let threads = runner.pool().map_or(1, |p| p.threads());
        if let Some(done) = super::stepped::run(step, body, ins, r.as_ref(), threads) {
            return done.map(|outs| (outs, true));
        }
    }
    let portable = BodyRunner { outer: runner };
    let inner: &dyn LoopRunner = match &compiled {
        Some(r) => r.as_ref(),
        None => &portable,
    };
    let mut run = |xs: Vec<Tensor>| body.run(xs, inner).map_err(|e| e.to_string());
    let g = &body.plan.graph;
    match node.op {
        kiln_ir::OpKind::Loop => control::run_loop(&node.attrs, ins, g, &mut run),
        _ => control::run_scan(&node.attrs, ins, g, &mut run),
    }
    .map(|outs| (outs, false))
}

/// Runs a body's loop kernels with the portable evaluator and its contractions on the
/// outer runner's pool.
struct BodyRunner<'a> {
    outer: &'a dyn LoopRunner,
}

impl LoopRunner for BodyRunner<'_> {
    fn run_loop(
        &self,
        _: usize,
        k: &LoopKernel,
        inputs: &[&Tensor],
        _: &mut Outputs,
    ) -> Result<Vec<Tensor>, String> {
        kiln_plan::eval::run_loop(k, inputs)
    }

    fn pool(&self) -> Option<&crate::pool::Pool> {
        self.outer.pool()
    }
}

/// Whether kernel `k` writes its outputs into arena regions when it has them (the loop
/// runners, the contractions, and the glue transposes, concats, gathers and copies); other
/// fallbacks allocate.
fn takes_regions(k: &Kernel, g: &kiln_ir::Graph) -> bool {
    match k {
        Kernel::Loop(_) | Kernel::Contraction(_) => true,
        Kernel::Fallback(n) => matches!(
            g.nodes[*n].op,
            kiln_ir::OpKind::Transpose
                | kiln_ir::OpKind::Concat
                | kiln_ir::OpKind::Gather
                | kiln_ir::OpKind::Cast
                | kiln_ir::OpKind::Reshape
                | kiln_ir::OpKind::Squeeze
                | kiln_ir::OpKind::Unsqueeze
                | kiln_ir::OpKind::Flatten
                | kiln_ir::OpKind::Identity
                | kiln_ir::OpKind::Split
                | kiln_ir::OpKind::Expand
                | kiln_ir::OpKind::Where
                | kiln_ir::OpKind::LinearAttention
                | kiln_ir::OpKind::LinearScan
                | kiln_ir::OpKind::MaxPool
                | kiln_ir::OpKind::AveragePool
                | kiln_ir::OpKind::GlobalMaxPool
                | kiln_ir::OpKind::GlobalAveragePool
                | kiln_ir::OpKind::Resize
                | kiln_ir::OpKind::Add
                | kiln_ir::OpKind::Sub
                | kiln_ir::OpKind::Mul
        ),
    }
}
