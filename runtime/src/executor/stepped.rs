//! Running a `loop` whose body is one time step of a recurrence (a row of each per-step
//! input read at the step's index, compiled loop kernels and prepared contractions over
//! the carried state, rows returned or carried: an RNN cell, RWKV's WKV after
//! `roll_recurrences`) as one native loop: every buffer is bound once per loop run, and an
//! iteration is the row copies, one call per compiled row function and one per prepared
//! contraction (its packed weights reused every step), with no plan run, allocation of the
//! loop kernels' values or shape check per step. The row functions and routines are the
//! ones the body's plan runs, on the same values, so results are bit for bit the general
//! path's. [`StepPlan::new`] decides at prepare time whether a body qualifies; anything else
//! runs through the general path.

use super::exec::{CpuPlan, LoopRunner};
use super::rows::{work_per_element, PostMap, RowFn, PAR_MIN_WORK};
use crate::native::vmath;
use kiln_ir::ops::control;
use kiln_ir::{DType, Dim, Node, OpKind, Tensor, ValueId};
use kiln_plan::layout::LoopShape;
use kiln_plan::Kernel;
use std::collections::HashMap;

/// Where a value of the body lives during the loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Src {
    /// Carried value `j` (this iteration's input).
    State(usize),
    /// Loop operand `k` read unchanged by every iteration (a capture).
    Capture(usize),
    /// A constant of the body's plan.
    Const(ValueId),
    /// Buffer `b` of the driver, written each iteration.
    Buf(usize),
}

/// One step of an iteration, in the body plan's order.
#[derive(Clone, Debug)]
enum Step {
    /// `out = table[iter]` (a `gather` of a constant integer vector at the iteration
    /// number: the exporter's per-step index).
    Index { out: usize, table: Vec<i64> },
    /// `buf = gather(src, index, axis)` with a scalar index (an index slot, or `None`: the
    /// iteration number): one row of a per-step input.
    Row {
        buf: usize,
        src: Src,
        src_value: ValueId,
        axis: usize,
        index: Option<usize>,
    },
    /// Loop kernel `kernel` of the body's plan, its outputs into `bufs`.
    Loop { kernel: usize, bufs: Vec<usize> },
    /// Contraction `kernel` of the body's plan (a per-step matmul with its weights packed
    /// once), on its prepared routine; its outputs into `bufs`.
    Contraction { kernel: usize, bufs: Vec<usize> },
}

/// How a `loop` node's body runs as one native loop (see the module docs).
#[derive(Clone, Debug)]
pub struct StepPlan {
    steps: Vec<Step>,
    /// Per value of the body: where it lives (values absent here are index arithmetic
    /// the steps do not read).
    src: HashMap<ValueId, Src>,
    /// The value each driver buffer holds (its shape comes from the value's type or, for
    /// a loop kernel's output, from binding the kernel).
    bufs: Vec<ValueId>,
    /// Where each carried and scanned output of the body lives.
    out_srcs: Vec<Src>,
    /// Scalar index slots.
    indices: usize,
    carried: usize,
    captures: usize,
}

impl StepPlan {
    /// The plan for `node` (a `loop`) whose body `body` prepared, where every kernel of the
    /// body is a step index, a row read of a capture at one, a loop kernel, a contraction
    /// with a prepared routine, a view of one of those, or index arithmetic only views read.
    pub fn new(node: &Node, body: &CpuPlan) -> Option<StepPlan> {
        if node.op != OpKind::Loop {
            return None;
        }
        let g = &body.plan.graph;
        let parts = control::loop_parts(&node.attrs, node.inputs.len(), g).ok()?;
        // With a condition operand the body's condition decides when to stop.
        if node.inputs.get(1).copied().flatten().is_some() {
            return None;
        }
        let mut src: HashMap<ValueId, Src> = HashMap::new();
        let iter = *g.inputs.first()?;
        for j in 0..parts.carried {
            src.insert(g.inputs[2 + j], Src::State(j));
        }
        for k in 0..parts.captures {
            src.insert(g.inputs[2 + parts.carried + k], Src::Capture(k));
        }
        let constants: HashMap<ValueId, &Tensor> =
            body.plan.constants.iter().map(|(v, t)| (*v, t)).collect();
        for (&v, t) in &constants {
            if t.dtype() == DType::F32 {
                src.insert(v, Src::Const(v));
            }
        }
        let mut index_of: HashMap<ValueId, usize> = HashMap::new();
        let mut steps = vec![];
        let mut bufs: Vec<ValueId> = vec![];
        // Values only shape arithmetic and views' shape operands may read.
        let mut ignored: Vec<ValueId> = vec![];
        for (kernel, k) in body.plan.kernels.iter().enumerate() {
            match k {
                Kernel::Loop(l) => {
                    if l.inputs.iter().any(|i| !src.contains_key(&i.value)) {
                        return None;
                    }
                    let mut out = vec![];
                    for &(v, _) in &l.outputs {
                        src.insert(v, Src::Buf(bufs.len()));
                        out.push(bufs.len());
                        bufs.push(v);
                    }
                    steps.push(Step::Loop { kernel, bufs: out });
                }
                Kernel::Contraction(n) => {
                    let node = &g.nodes[*n];
                    body.contractions.get(kernel)?.as_ref()?;
                    if node.inputs.iter().flatten().any(|v| !src.contains_key(v))
                        || node.outputs.iter().any(|&o| g.ty(o).dtype != DType::F32)
                    {
                        return None;
                    }
                    let mut out = vec![];
                    for &v in &node.outputs {
                        src.insert(v, Src::Buf(bufs.len()));
                        out.push(bufs.len());
                        bufs.push(v);
                    }
                    steps.push(Step::Contraction { kernel, bufs: out });
                }
                Kernel::Fallback(n) => {
                    let n = &g.nodes[*n];
                    let arg = |i: usize| n.inputs.get(i).copied().flatten();
                    let out = *n.outputs.first()?;
                    match n.op {
                        OpKind::Gather
                            if arg(1) == Some(iter)
                                && arg(0).is_some_and(|d| {
                                    constants.get(&d).is_some_and(|t| t.dtype() != DType::F32)
                                }) =>
                        {
                            let table = constants.get(&arg(0)?)?;
                            if table.rank() != 1
                                || !matches!(table.dtype(), DType::I64 | DType::I32)
                                || n.attrs.int_or("axis", 0).ok()? != 0
                            {
                                return None;
                            }
                            index_of.insert(out, index_of.len());
                            steps.push(Step::Index {
                                out: index_of[&out],
                                table: table.to_i64s(),
                            });
                        }
                        // A row of a per-step input: at a step index, or at the iteration
                        // number of a capture stacked over the steps (what
                        // `select_recurrence_form` hoists out of a step).
                        OpKind::Gather
                            if arg(1).is_some_and(|i| i == iter || index_of.contains_key(&i)) =>
                        {
                            let data = arg(0)?;
                            let s = *src.get(&data)?;
                            if !matches!(s, Src::Capture(_) | Src::Const(_))
                                || g.ty(out).dtype != DType::F32
                            {
                                return None;
                            }
                            let rank = g.ty(data).shape.rank()? as i64;
                            let axis = n.attrs.int_or("axis", 0).ok()?;
                            let axis = if axis < 0 { axis + rank } else { axis };
                            let axis = usize::try_from(axis).ok().filter(|&a| (a as i64) < rank)?;
                            let index = arg(1).filter(|&i| i != iter).map(|i| index_of[&i]);
                            src.insert(out, Src::Buf(bufs.len()));
                            steps.push(Step::Row {
                                buf: bufs.len(),
                                src: s,
                                src_value: data,
                                axis,
                                index,
                            });
                            bufs.push(out);
                        }
                        // A view: the same elements under the shape of its type.
                        OpKind::Reshape
                        | OpKind::Squeeze
                        | OpKind::Unsqueeze
                        | OpKind::Flatten
                        | OpKind::Identity
                            if arg(0).is_some_and(|x| src.contains_key(&x)) =>
                        {
                            let s = src[&arg(0)?];
                            src.insert(out, s);
                        }
                        _ if n.outputs.iter().all(|&o| g.ty(o).dtype != DType::F32) => {
                            ignored.extend(n.outputs.iter().copied());
                        }
                        _ => return None,
                    }
                }
            }
        }
        // Index arithmetic may feed only itself and views' shape operands.
        let ignored_set: std::collections::HashSet<ValueId> = ignored.into_iter().collect();
        for k in &body.plan.kernels {
            let reads: Vec<(usize, ValueId)> = match k {
                Kernel::Loop(l) => l.inputs.iter().map(|i| (0, i.value)).collect(),
                Kernel::Contraction(n) | Kernel::Fallback(n) => g.nodes[*n]
                    .inputs
                    .iter()
                    .enumerate()
                    .filter_map(|(i, v)| v.map(|v| (i, v)))
                    .collect(),
            };
            let view_shape_operand = |i: usize| {
                i > 0
                    && matches!(k, Kernel::Fallback(n) if matches!(
                        g.nodes[*n].op,
                        OpKind::Reshape | OpKind::Squeeze | OpKind::Unsqueeze
                    ))
            };
            let reads_ignored_as_data = reads
                .iter()
                .any(|&(i, v)| ignored_set.contains(&v) && !view_shape_operand(i));
            let is_ignored = match k {
                Kernel::Fallback(n) => g.nodes[*n].outputs.iter().all(|o| ignored_set.contains(o)),
                _ => false,
            };
            if reads_ignored_as_data && !is_ignored {
                return None;
            }
        }
        // Every carried and scanned output is a value the loop can read after a step.
        if g.outputs[1..].iter().any(|o| !src.contains_key(o)) {
            return None;
        }
        let out_srcs = g.outputs[1..].iter().map(|o| src[o]).collect();
        Some(StepPlan {
            steps,
            out_srcs,
            src,
            bufs,
            indices: index_of.len(),
            carried: parts.carried,
            captures: parts.captures,
        })
    }
}

/// A step bound for this loop run.
enum Bind {
    /// Nothing to bind (an index, a row read).
    None,
    /// A loop kernel.
    Loop(Bound),
    /// A contraction: each operand's source and shape (`None`: omitted), and the shape of
    /// each output.
    Contraction {
        ins: Vec<Option<(Src, Vec<usize>)>>,
        outs: Vec<Vec<usize>>,
    },
}

/// A loop kernel bound for this loop run: its row function, where each input's rows are
/// read from, and its runs of rows.
struct Bound {
    f: RowFn,
    post: Option<PostMap>,
    ins: Vec<Src>,
    strides: Vec<i64>,
    /// (first row, per-input element offsets, rows) of each run.
    runs: Vec<(usize, Vec<usize>, usize)>,
    n: usize,
    outs: Vec<usize>,
}

/// Runs the `loop` node `plan` was made for on its operands `ins`, its body's loop kernels through `runner`'s row functions.
/// `None` where this run cannot (no compiled row function, zero trips, work big enough
/// that the general path's threads pay, a shape the types do not determine): the caller
/// then runs the general path.
pub fn run(
    plan: &StepPlan,
    body: &CpuPlan,
    ins: &[Option<&Tensor>],
    runner: &dyn LoopRunner,
    threads: usize,
) -> Option<Result<Vec<Tensor>, String>> {
    let g = &body.plan.graph;
    let trips = ins.first().copied().flatten()?;
    let trips = usize::try_from(*trips.to_i64s().first()?).ok()?;
    if trips == 0 {
        return None;
    }
    let carried: Vec<&Tensor> = (0..plan.carried)
        .map(|j| ins.get(2 + j).copied().flatten())
        .collect::<Option<_>>()?;
    let captures: Vec<&Tensor> = (0..plan.captures)
        .map(|k| ins.get(2 + plan.carried + k).copied().flatten())
        .collect::<Option<_>>()?;
    if carried
        .iter()
        .chain(&captures)
        .any(|t| t.dtype() != DType::F32)
    {
        return None;
    }
    // Symbolic dims, bound from the carried values' and captures' shapes.
    let mut syms: HashMap<&str, usize> = HashMap::new();
    let body_ins = g.inputs[2..].iter().zip(carried.iter().chain(&captures));
    for (&v, t) in body_ins {
        let dims = g.ty(v).shape.dims()?;
        if dims.len() != t.rank() {
            return None;
        }
        for (d, &s) in dims.iter().zip(t.shape()) {
            if let Dim::Sym(name) = d {
                if *syms.entry(name.as_str()).or_insert(s) != s {
                    return None;
                }
            }
        }
    }
    let concrete = |v: ValueId| -> Option<Vec<usize>> {
        g.ty(v)
            .shape
            .dims()?
            .iter()
            .map(|d| match d {
                Dim::Fixed(n) => usize::try_from(*n).ok(),
                Dim::Sym(s) => syms.get(s.as_str()).copied(),
                Dim::Unknown => None,
            })
            .collect()
    };
    let constants: HashMap<ValueId, &Tensor> =
        body.plan.constants.iter().map(|(v, t)| (*v, t)).collect();
    // Shapes of every buffer and of every value read: loop kernels bind on stand-ins.
    let mut buf_shape: Vec<Option<Vec<usize>>> = vec![None; plan.bufs.len()];
    let mut bound: Vec<Bind> = vec![];
    // A value's shape: its source's, or for a view of the source, its own type's (the
    // source's element count).
    let shape_of = |s: Src, v: ValueId, buf_shape: &[Option<Vec<usize>>]| -> Option<Vec<usize>> {
        let (own, base) = match s {
            Src::State(j) => (carried[j].shape().to_vec(), g.inputs[2 + j]),
            Src::Capture(k) => (captures[k].shape().to_vec(), g.inputs[2 + plan.carried + k]),
            Src::Const(c) => (constants.get(&c)?.shape().to_vec(), c),
            Src::Buf(b) => (buf_shape[b].clone()?, plan.bufs[b]),
        };
        if base == v {
            return Some(own);
        }
        let s = concrete(v)?;
        (s.iter().product::<usize>() == own.iter().product::<usize>()).then_some(s)
    };
    let mut work = 0usize;
    for step in &plan.steps {
        match step {
            Step::Index { .. } => bound.push(Bind::None),
            Step::Row {
                buf,
                src,
                src_value,
                axis,
                ..
            } => {
                let mut s = shape_of(*src, *src_value, &buf_shape)?;
                s.remove(*axis);
                if concrete(plan.bufs[*buf]).is_some_and(|t| t != s) {
                    return None;
                }
                buf_shape[*buf] = Some(s);
                bound.push(Bind::None);
            }
            Step::Contraction { kernel, bufs } => {
                let Kernel::Contraction(node) = body.plan.kernels[*kernel] else {
                    return None;
                };
                let n = &g.nodes[node];
                let ins = n
                    .inputs
                    .iter()
                    .map(|v| match v {
                        None => Some(None),
                        Some(v) => {
                            let s = plan.src[v];
                            shape_of(s, *v, &buf_shape).map(|shape| Some((s, shape)))
                        }
                    })
                    .collect::<Option<Vec<_>>>()?;
                let outs = n
                    .outputs
                    .iter()
                    .map(|&o| concrete(o))
                    .collect::<Option<Vec<_>>>()?;
                for (&b, shape) in bufs.iter().zip(&outs) {
                    buf_shape[b] = Some(shape.clone());
                }
                bound.push(Bind::Contraction { ins, outs });
            }
            Step::Loop { kernel, bufs } => {
                let Kernel::Loop(l) = &body.plan.kernels[*kernel] else {
                    return None;
                };
                let (f, post) = runner.row_fn(*kernel)?;
                if post.is_some_and(|p| !p.isa.available() || l.outputs.len() != 1) {
                    return None;
                }
                let mut stand_ins = vec![];
                let mut srcs = vec![];
                for i in &l.inputs {
                    let s = plan.src[&i.value];
                    let shape = shape_of(s, i.value, &buf_shape)?;
                    let numel = shape.iter().product();
                    stand_ins.push(Tensor::from_vec(shape, vec![0f32; numel]));
                    srcs.push(s);
                }
                let refs: Vec<&Tensor> = stand_ins.iter().collect();
                let ls = LoopShape::bind(l, &refs).ok()?;
                for &b in bufs {
                    buf_shape[b] = Some(ls.shape.clone());
                }
                work = work.saturating_add(ls.numel().saturating_mul(work_per_element(l)));
                let mut runs = vec![];
                ls.for_row_runs(0, ls.rows, |row, offs, m| {
                    runs.push((row, offs.to_vec(), m))
                });
                let strides = ls
                    .run_strides()
                    .iter()
                    .map(|&s| i64::try_from(s).ok())
                    .collect::<Option<Vec<_>>>()?;
                bound.push(Bind::Loop(Bound {
                    f,
                    post,
                    ins: srcs,
                    strides,
                    runs,
                    n: ls.n,
                    outs: bufs.clone(),
                }));
            }
        }
    }
    // Big steps split across threads on the general path.
    if threads > 1 && work >= PAR_MIN_WORK {
        return None;
    }
    let outs = &g.outputs[1..];
    let out_shapes: Vec<Vec<usize>> = outs
        .iter()
        .map(|&o| shape_of(plan.src[&o], o, &buf_shape))
        .collect::<Option<_>>()?;
    for (j, s) in out_shapes[..plan.carried].iter().enumerate() {
        if s.as_slice() != carried[j].shape() {
            return None;
        }
    }
    let single = crate::pool::Pool::single();
    let pool = runner.pool().unwrap_or(&single);
    Some(drive(
        plan,
        body,
        pool,
        &bound,
        trips,
        &carried,
        &captures,
        &constants,
        &buf_shape,
        &out_shapes,
    ))
}

/// The iterations themselves, on buffers bound by [`run`].
#[allow(clippy::too_many_arguments)]
fn drive(
    plan: &StepPlan,
    body: &CpuPlan,
    pool: &crate::pool::Pool,
    bound: &[Bind],
    trips: usize,
    carried: &[&Tensor],
    captures: &[&Tensor],
    constants: &HashMap<ValueId, &Tensor>,
    buf_shape: &[Option<Vec<usize>>],
    out_shapes: &[Vec<usize>],
) -> Result<Vec<Tensor>, String> {
    let consts: HashMap<ValueId, &[f32]> = constants
        .iter()
        .filter_map(|(&v, t)| Some((v, t.as_slice::<f32>()?)))
        .collect();
    let f32s = |t: &Tensor| t.as_slice::<f32>().map(<[f32]>::to_vec);
    let mut state: Vec<Vec<f32>> = carried
        .iter()
        .map(|t| f32s(t).ok_or("a carried value is not f32"))
        .collect::<Result<_, _>>()?;
    let mut next: Vec<Vec<f32>> = state.clone();
    let mut bufs: Vec<Vec<f32>> = buf_shape
        .iter()
        .map(|s| vec![0f32; s.as_ref().map_or(0, |s| s.iter().product())])
        .collect();
    let scanned = &out_shapes[plan.carried..];
    let mut stacks: Vec<Vec<f32>> = scanned
        .iter()
        .map(|s| Vec::with_capacity(trips * s.iter().product::<usize>()))
        .collect();
    let capture_data: Vec<&[f32]> = captures
        .iter()
        .map(|t| t.as_slice::<f32>().unwrap_or(&[]))
        .collect();
    let mut index = vec![0i64; plan.indices];
    for it in 0..trips {
        for (step, b) in plan.steps.iter().zip(bound) {
            match step {
                Step::Index { out, table } => {
                    let len = table.len() as i64;
                    let i = it as i64;
                    if i >= len {
                        return Err(format!(
                            "iteration {it}: gather index {i} is out of range for {len} steps"
                        ));
                    }
                    index[*out] = table[it];
                }
                Step::Row {
                    buf,
                    src,
                    axis,
                    index: ix,
                    ..
                } => {
                    let (data, shape): (&[f32], &[usize]) = match *src {
                        Src::Capture(k) => (capture_data[k], captures[k].shape()),
                        Src::Const(c) => (
                            consts.get(&c).copied().ok_or("a constant went missing")?,
                            constants.get(&c).map_or(&[][..], |t| t.shape()),
                        ),
                        _ => unreachable!("rows are read from captures and constants"),
                    };
                    let dim = shape[*axis] as i64;
                    let at = ix.map_or(it as i64, |ix| index[ix]);
                    let s = if at < 0 { at + dim } else { at };
                    if !(0..dim).contains(&s) {
                        return Err(format!(
                            "iteration {it}: gather index {at} is out of range for a dim of {dim}"
                        ));
                    }
                    let inner: usize = shape[axis + 1..].iter().product();
                    let outer: usize = shape[..*axis].iter().product();
                    let out = &mut bufs[*buf];
                    for o in 0..outer {
                        let from = (o * dim as usize + s as usize) * inner;
                        out[o * inner..(o + 1) * inner].copy_from_slice(&data[from..from + inner]);
                    }
                }
                Step::Loop { .. } => {
                    let Bind::Loop(b) = b else {
                        unreachable!("loop steps are bound as loops")
                    };
                    call(b, &state, &capture_data, &consts, &mut bufs)?;
                }
                Step::Contraction {
                    kernel,
                    bufs: out_bufs,
                } => {
                    let Bind::Contraction { ins, outs } = b else {
                        unreachable!("contractions are bound as contractions")
                    };
                    // Operands: captures and constants as they are, the step's own values
                    // as tensors of their shapes (a row or a state is small).
                    let mut owned: Vec<Option<std::borrow::Cow<'_, Tensor>>> = vec![];
                    for i in ins {
                        owned.push(match i {
                            None => None,
                            Some((Src::Capture(k), shape))
                                if captures[*k].shape() == shape.as_slice() =>
                            {
                                Some(std::borrow::Cow::Borrowed(captures[*k]))
                            }
                            Some((Src::Const(c), shape))
                                if constants
                                    .get(c)
                                    .is_some_and(|t| t.shape() == shape.as_slice()) =>
                            {
                                Some(std::borrow::Cow::Borrowed(constants[c]))
                            }
                            Some((s, shape)) => {
                                let data = read(*s, &state, &capture_data, &consts, &bufs)?;
                                Some(std::borrow::Cow::Owned(Tensor::from_vec(
                                    shape.clone(),
                                    data.to_vec(),
                                )))
                            }
                        });
                    }
                    let refs: Vec<Option<&Tensor>> = owned.iter().map(|t| t.as_deref()).collect();
                    let Kernel::Contraction(n) = body.plan.kernels[*kernel] else {
                        unreachable!("contraction steps are contraction kernels")
                    };
                    let node = &body.plan.graph.nodes[n];
                    let prepared = body.contractions.get(*kernel).and_then(|p| p.as_deref());
                    let got = match prepared
                        .and_then(|p| p.run(&refs, pool, &mut super::arena::Outputs::none()))
                    {
                        Some(r) => r?,
                        None => kiln_ir::ops::eval(node.op, &node.attrs, &refs)
                            .map_err(|e| e.to_string())?,
                    };
                    drop(refs);
                    drop(owned);
                    if got.len() < out_bufs.len() {
                        return Err(format!(
                            "iteration {it}: {} gave {} outputs, expected {}",
                            node.op.name(),
                            got.len(),
                            out_bufs.len()
                        ));
                    }
                    for ((t, &ob), shape) in got.iter().zip(out_bufs).zip(outs) {
                        let data = t
                            .as_slice::<f32>()
                            .filter(|_| t.shape() == shape.as_slice())
                            .ok_or_else(|| {
                                format!(
                                    "iteration {it}: {} gave {:?}, expected f32{shape:?}",
                                    node.op.name(),
                                    t.shape()
                                )
                            })?;
                        bufs[ob].copy_from_slice(data);
                    }
                }
            }
        }
        // Carried values for the next step, scanned rows onto their stacks.
        for (j, s) in plan.out_srcs[..plan.carried].iter().enumerate() {
            let from = read(*s, &state, &capture_data, &consts, &bufs)?;
            next[j].copy_from_slice(from);
        }
        for (k, s) in plan.out_srcs[plan.carried..].iter().enumerate() {
            let from = read(*s, &state, &capture_data, &consts, &bufs)?;
            stacks[k].extend_from_slice(from);
        }
        std::mem::swap(&mut state, &mut next);
    }
    let mut res: Vec<Tensor> = state
        .into_iter()
        .zip(out_shapes)
        .map(|(v, s)| Tensor::from_vec(s.clone(), v))
        .collect();
    for (v, s) in stacks.into_iter().zip(scanned) {
        let mut shape = vec![trips];
        shape.extend(s);
        res.push(Tensor::from_vec(shape, v));
    }
    Ok(res)
}

/// The elements of a value at `s`.
fn read<'a>(
    s: Src,
    state: &'a [Vec<f32>],
    captures: &[&'a [f32]],
    consts: &HashMap<ValueId, &'a [f32]>,
    bufs: &'a [Vec<f32>],
) -> Result<&'a [f32], String> {
    Ok(match s {
        Src::State(j) => &state[j],
        Src::Capture(k) => captures[k],
        Src::Const(c) => consts.get(&c).copied().ok_or("a constant went missing")?,
        Src::Buf(b) => &bufs[b],
    })
}

/// One call of a bound loop kernel's row function per run of rows.
fn call(
    b: &Bound,
    state: &[Vec<f32>],
    captures: &[&[f32]],
    consts: &HashMap<ValueId, &[f32]>,
    bufs: &mut [Vec<f32>],
) -> Result<(), String> {
    let mut in_base: smallvec::SmallVec<[*const f32; 8]> = smallvec::SmallVec::new();
    for &s in &b.ins {
        in_base.push(read(s, state, captures, consts, bufs)?.as_ptr());
    }
    let out_base: smallvec::SmallVec<[*mut f32; 4]> =
        b.outs.iter().map(|&o| bufs[o].as_mut_ptr()).collect();
    let mut in_ptrs = in_base.clone();
    let mut out_ptrs = out_base.clone();
    for (row, offs, m) in &b.runs {
        for ((p, &base), &o) in in_ptrs.iter_mut().zip(&in_base).zip(offs) {
            // SAFETY: `bind` checked on inputs of these very shapes that each run's rows lie
            // inside them.
            *p = unsafe { base.add(o) };
        }
        for (p, &base) in out_ptrs.iter_mut().zip(&out_base) {
            // SAFETY: row + m <= rows, and the buffer holds rows · n elements.
            *p = unsafe { base.add(row * b.n) };
        }
        // SAFETY: the pointers cover `m` rows of `n` elements per `bind`; outputs are the
        // kernel's own buffers, which none of its inputs is (a kernel never reads its
        // outputs).
        unsafe {
            (b.f)(
                in_ptrs.as_ptr(),
                out_ptrs.as_ptr(),
                b.n as i64,
                *m as i64,
                b.strides.as_ptr(),
            )
        };
        if let Some(p) = b.post {
            // SAFETY: the call above wrote these m·n values of the only output.
            let ys = unsafe { std::slice::from_raw_parts_mut(out_ptrs[0], m * b.n) };
            let done = vmath::map(p.func, p.isa, ys);
            debug_assert!(done, "the isa was checked when binding");
        }
    }
    Ok(())
}
