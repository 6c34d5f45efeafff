//! `select_recurrence_form`: a `loop` whose carried values are first-order linear
//! recurrences (`h = a ⊙ h_prev + b`, with `a` and `b` independent of every carried value:
//! Mamba's selective scan, a decayed state) runs as one `linear_scan` op over every step,
//! and the rest of its body runs once over all steps instead of once per step.
//!
//! The body is *lifted* over the steps: each body value becomes an outer value with a
//! leading step axis (`Step`), an outer value that is the same at every step (`Inv`), or a
//! small integer constant known per step (`Folded`: the iteration number and the index
//! arithmetic on it). Every op the lifting knows gets its rule (elementwise broadcasting,
//! batched matmul, axes shifted by one, gathers at per-step indices becoming slices of the
//! stacked operand); a body with any other op, a loop condition, a dynamic trip count or a
//! carried value that is not such a recurrence keeps its loop.
//!
//! The form is chosen by cost ([`scan_form_costs`]): the per-step loop is kept when the
//! lifted values would take more than [`MAX_MATERIALISED_BYTES`]; otherwise the scan runs
//! sequentially (the state's elements split over the threads) or chunked over time (when
//! the state is too small to split and threads would idle). The sequential form is
//! bit-equal to the loop: each step rounds the product and then the sum, as the loop's
//! `mul` and `add` did. The lifted ops compute what the body computed, with batched
//! matmuls that may sum in another order (exact up to rounding).

use crate::rewrite::{self, Namer, Subst};
use crate::target::Target;
use crate::{Pass, PassError, PassStats};
use kiln_ir::ops::{Fact, Family};
use kiln_ir::{Attr, Attrs, DType, Dim, Graph, Node, OpKind, Shape, Tensor, TensorType, ValueId};
use std::collections::HashMap;
use std::sync::Arc;

/// The most bytes the lifted form may add (every step's values of the body, materialised;
/// symbolic dims counted as 1); a loop needing more keeps its per-step form.
pub const MAX_MATERIALISED_BYTES: f64 = 512.0 * 1024.0 * 1024.0;
/// The most elements a `Folded` per-step constant may hold over all steps.
const FOLD_LIMIT: usize = 1 << 16;
/// Bytes one step of one state element moves in the scan: `a` and `b` read, `h` written.
const SCAN_BYTES_PER_ELEMENT_STEP: f64 = 12.0;

/// The pass: see the module docs.
#[derive(Clone, Debug)]
pub struct SelectRecurrenceForm {
    target: Target,
}

impl SelectRecurrenceForm {
    /// The pass, choosing forms for `target`.
    pub fn new(target: Target) -> Self {
        SelectRecurrenceForm { target }
    }
}

impl Default for SelectRecurrenceForm {
    fn default() -> Self {
        SelectRecurrenceForm::new(Target::host())
    }
}

impl Pass for SelectRecurrenceForm {
    fn name(&self) -> &'static str {
        "select_recurrence_form"
    }

    fn run(&self, g: &mut Graph) -> Result<PassStats, PassError> {
        let mut stats = PassStats::default();
        let mut start = 0;
        while let Some(i) = (start..g.nodes.len()).find(|&i| g.nodes[i].op == OpKind::Loop) {
            let mut work = g.clone();
            match lift_loop(&mut work, i, &self.target) {
                Ok(done) => {
                    *g = work;
                    stats.changed += 1;
                    stats.added += done.added;
                    stats.bump("loops_lifted", 1);
                    stats.bump("linear_scans", done.scans);
                    stats.bump("chunked_scans", done.chunked);
                    start = i + done.added;
                }
                Err(why) => {
                    stats.bump(why.counter(), 1);
                    // A loop kept per step still runs the part of its step that no carried
                    // value reaches once over every step, where that part has a matmul.
                    let mut work = g.clone();
                    match hoist_step_part(&mut work, i) {
                        Ok(h) => {
                            *g = work;
                            stats.changed += 1;
                            stats.added += h.added;
                            stats.bump("values_hoisted", h.values);
                            start = i + h.added + 1;
                        }
                        Err(_) => start = i + 1,
                    }
                }
            }
        }
        if stats.changed > 0 {
            stats.removed += rewrite::remove_dead(g);
        }
        Ok(stats)
    }
}

/// Why a loop keeps its per-step form (each a pass counter).
#[derive(Debug)]
enum Keep {
    /// Trip count not a constant, a condition, or a body returning another condition.
    NotCounted,
    /// A carried value that is not `a ⊙ h + b` with `a`, `b` free of carried values.
    NotLinear,
    /// An op (or an operand pattern) the lifting has no rule for.
    NoRule,
    /// The lifted values would exceed [`MAX_MATERIALISED_BYTES`].
    Memory,
}

impl Keep {
    fn counter(&self) -> &'static str {
        match self {
            Keep::NotCounted => "kept_not_counted",
            Keep::NotLinear => "kept_not_linear",
            Keep::NoRule => "kept_no_rule",
            Keep::Memory => "kept_memory",
        }
    }
}

/// What one lifted loop became.
struct Done {
    added: usize,
    scans: usize,
    chunked: usize,
}

/// A body value, lifted.
#[derive(Clone, Debug)]
enum Lifted {
    /// The same outer value at every step.
    Inv(ValueId),
    /// An outer value `[S, ..]`: step `t` is slice `t`.
    Step(ValueId),
    /// An i64 constant `[S, ..]`: step `t` is slice `t`.
    Folded(Arc<Tensor>),
}

/// The estimated time of one evaluation form of a `linear_scan` of `steps` steps over a
/// state of `state` elements, on a target (what `kiln inspect` prints).
#[derive(Clone, Debug, PartialEq)]
pub struct ScanFormCost {
    /// `sequential`, `chunked C=..` or `parallel scan`.
    pub form: String,
    /// The op's `chunk` attribute for this form (`None`: a form the CPU kernel does not run).
    pub chunk: Option<usize>,
    /// Threads it keeps busy.
    pub threads: usize,
    /// Estimated seconds.
    pub time: f64,
}

/// The forms of a scan and their estimated times: memory-bound, a fork/join per phase.
/// The parallel (Hillis–Steele) scan is listed for comparison: its `log2 S` passes over
/// every step cost more than the chunked form at any thread count on a CPU, so the kernel
/// does not run it.
pub fn scan_form_costs(target: &Target, steps: usize, state: usize) -> Vec<ScanFormCost> {
    let cores = target.cores.max(1) as usize;
    let work = steps as f64 * state as f64 * SCAN_BYTES_PER_ELEMENT_STEP;
    // p threads share the bandwidth: each core gets bandwidth / cores.
    let time = |bytes: f64, p: usize| bytes * cores as f64 / (target.mem_bandwidth * p as f64);
    let fork = |p: usize| if p > 1 { target.kernel_overhead } else { 0.0 };
    let mut out = vec![];
    let p = cores
        .min(state / kiln_ir::ops::linear_scan::MIN_ELEMS_PER_THREAD)
        .max(1);
    out.push(ScanFormCost {
        form: "sequential".into(),
        chunk: Some(0),
        threads: p,
        time: target.kernel_overhead + time(work, p) + fork(p),
    });
    if cores > 1 && steps >= 2 * cores {
        let c = steps.div_ceil(cores);
        let blocks = steps.div_ceil(c);
        let carry = blocks as f64 * state as f64 * 16.0;
        out.push(ScanFormCost {
            form: format!("chunked C={c}"),
            chunk: Some(c),
            threads: blocks.min(cores),
            time: target.kernel_overhead
                + 2.0 * time(work, blocks.min(cores))
                + time(carry, 1)
                + 2.0 * fork(blocks.min(cores)),
        });
    }
    if steps > 1 {
        let passes = (steps as f64).log2().ceil();
        out.push(ScanFormCost {
            form: "parallel scan (not run on a CPU)".into(),
            chunk: None,
            threads: cores,
            time: passes * (time(work * 4.0 / 3.0, cores) + fork(cores)),
        });
    }
    out
}

/// The `chunk` of the cheapest form the CPU kernel runs (0: sequential).
pub fn choose_chunk(target: &Target, steps: usize, state: usize) -> usize {
    scan_form_costs(target, steps, state)
        .into_iter()
        .filter_map(|f| f.chunk.map(|c| (c, f.time)))
        .fold(
            (0, f64::INFINITY),
            |best, (c, t)| if t < best.1 { (c, t) } else { best },
        )
        .0
}

/// Elements of a type with symbolic dims counted as 1.
fn elems(ty: &TensorType) -> f64 {
    ty.shape.dims().map_or(1.0, |d| {
        d.iter().map(|d| d.fixed().unwrap_or(1) as f64).product()
    })
}

fn i64_tensor(shape: Vec<usize>, v: Vec<i64>) -> Tensor {
    Tensor::from_vec(shape, v)
}

/// A `loop` node with a constant trip count and no condition operand: the node, its body,
/// its number of captures `k` and carried values `m`, and the trip count.
struct Counted {
    node: Node,
    body: Arc<Graph>,
    k: usize,
    m: usize,
    trips: usize,
}

/// The loop at node `li` of `g` as a [`Counted`] one, or why it is not.
fn counted_loop(g: &Graph, li: usize) -> Result<Counted, Keep> {
    let node = g.nodes[li].clone();
    let body = node
        .attrs
        .graph("body")
        .ok()
        .flatten()
        .ok_or(Keep::NoRule)?;
    let k = node
        .attrs
        .int_or("num_captures", 0)
        .map_err(|_| Keep::NoRule)? as usize;
    let m = node
        .inputs
        .len()
        .checked_sub(2 + k)
        .ok_or(Keep::NotCounted)?;
    let trips = node.inputs[0]
        .and_then(|t| g.constant_value(t))
        .filter(|t| t.len() == 1 && t.dtype() == DType::I64)
        .map(|t| t.to_i64s()[0])
        .ok_or(Keep::NotCounted)?;
    if trips < 1 || node.inputs[1].is_some() || body.inputs.len() != 2 + m + k {
        return Err(Keep::NotCounted);
    }
    Ok(Counted {
        node,
        body,
        k,
        m,
        trips: trips as usize,
    })
}

/// Rewrites the loop at node `li` of `g` into its lifted form, or says why not.
fn lift_loop(g: &mut Graph, li: usize, target: &Target) -> Result<Done, Keep> {
    // A constant trip count, no condition, a body that passes the condition through.
    let Counted {
        node,
        body,
        m,
        trips: s,
        ..
    } = counted_loop(g, li)?;
    if body.outputs.first() != body.inputs.get(1)
        || node.outputs.len() + 1 != body.outputs.len()
        || body.outputs.len() < 1 + m
        || m == 0
    {
        return Err(Keep::NotCounted);
    }
    let producer = rewrite::producers(&body);
    // Each carried value: h_out = add(mul(a, h_in), b), in any operand order.
    let mut recs = vec![];
    for j in 0..m {
        let h_in = body.inputs[2 + j];
        let out = body.outputs[1 + j];
        let add = producer[out.index()]
            .map(|p| &body.nodes[p])
            .filter(|n| n.op == OpKind::Add && n.inputs.len() == 2)
            .ok_or(Keep::NotLinear)?;
        let operands: Vec<ValueId> = add.inputs.iter().flatten().copied().collect();
        let rec = operands.iter().enumerate().find_map(|(side, &x)| {
            let mul = producer[x.index()].map(|p| &body.nodes[p])?;
            if mul.op != OpKind::Mul || mul.inputs.len() != 2 {
                return None;
            }
            let ins: Vec<ValueId> = mul.inputs.iter().flatten().copied().collect();
            let a = match ins[..] {
                [p, q] if p == h_in && q != h_in => q,
                [p, q] if q == h_in && p != h_in => p,
                _ => return None,
            };
            Some((a, operands[1 - side]))
        });
        let (a, b) = rec.ok_or(Keep::NotLinear)?;
        recs.push((a, b, out));
    }
    let mut l = Lifter::new(g, &body, s, m, &node);
    for &(a, b, out) in &recs {
        let j = l.scans.len();
        let h0 = l.loop_inputs[2 + j].ok_or(Keep::NotLinear)?;
        let state_ty = l.g.ty(h0).clone();
        let la = l.lift(a)?;
        let lb = l.lift(b)?;
        let a_full = l.full_steps(la, h0, &state_ty)?;
        let b_full = l.full_steps(lb, h0, &state_ty)?;
        let state = elems(&state_ty) as usize;
        let chunk = choose_chunk(target, s, state);
        let attrs = Attrs::new().with("chunk", Attr::Int(chunk as i64));
        let base = l.body.value(out).name.clone();
        let outs = l.emit(
            OpKind::LinearScan,
            attrs,
            vec![Some(a_full), Some(b_full), Some(h0)],
            &[&format!("{base}_steps"), &format!("{base}_last")],
        )?;
        l.memo.insert(out, Lifted::Step(outs[0]));
        l.scans.push((outs[0], outs[1], chunk));
    }
    let mut results = vec![];
    for &(_, last, _) in &l.scans {
        results.push(last);
    }
    for q in 0..body.outputs.len() - 1 - m {
        let v = body.outputs[1 + m + q];
        let lifted = l.lift(v)?;
        results.push(l.as_steps(lifted, v)?);
    }
    let bytes: f64 = l
        .nodes
        .iter()
        .filter(|n| n.op != OpKind::Constant)
        .flat_map(|n| n.outputs.iter())
        .map(|&o| elems(l.g.ty(o)) * l.g.ty(o).dtype.size() as f64)
        .sum();
    if bytes > MAX_MATERIALISED_BYTES {
        return Err(Keep::Memory);
    }
    let chunked = l.scans.iter().filter(|x| x.2 > 0).count();
    let scans = l.scans.len();
    let nodes = std::mem::take(&mut l.nodes);
    let added = nodes.len();
    rewrite::insert_nodes(g, nodes.into_iter().map(|n| (li, n)).collect());
    g.nodes.remove(li + added);
    let mut sub = Subst::new(g);
    for (&old, new) in node.outputs.iter().zip(results) {
        sub.replace(old, new);
    }
    sub.apply(g);
    Ok(Done {
        added,
        scans,
        chunked,
    })
}

/// What [`hoist_step_part`] did to one loop.
struct Hoisted {
    values: usize,
    added: usize,
}

/// For a loop that keeps its per-step form: the body values that no carried value reaches,
/// that a contraction computes and that the recurrence reads (an RNN cell's input
/// projection `x_t·W_ih + b`) are lifted over every step (one batched matmul instead of a
/// matrix-vector product per step), and the body reads step `t`'s slice of the result,
/// `gather(steps, iter)`. Exact up to the batched matmul's order of summation.
fn hoist_step_part(g: &mut Graph, li: usize) -> Result<Hoisted, Keep> {
    let Counted {
        node,
        body,
        k,
        m,
        trips,
    } = counted_loop(g, li)?;
    // Values a carried value reaches, and values (reached by none) a contraction computes.
    let mut dep = vec![false; body.values.len()];
    let mut heavy = vec![false; body.values.len()];
    for j in 0..m {
        dep[body.inputs[2 + j].index()] = true;
    }
    for n in &body.nodes {
        let d = n.inputs.iter().flatten().any(|v| dep[v.index()]);
        let h = matches!(
            n.op,
            OpKind::MatMul | OpKind::Gemm | OpKind::Linear | OpKind::Einsum
        ) || n.inputs.iter().flatten().any(|v| heavy[v.index()]);
        for o in &n.outputs {
            dep[o.index()] = d;
            heavy[o.index()] = h && !d;
        }
    }
    // Those the recurrence or the body's results read.
    let mut frontier: Vec<ValueId> = vec![];
    let reads = body
        .nodes
        .iter()
        .filter(|n| n.outputs.iter().any(|o| dep[o.index()]))
        .flat_map(|n| n.inputs.iter().flatten().copied())
        .chain(body.outputs[1..].iter().copied());
    for v in reads {
        if heavy[v.index()] && !frontier.contains(&v) {
            frontier.push(v);
        }
    }
    if frontier.is_empty() {
        return Err(Keep::NoRule);
    }
    let mut l = Lifter::new(g, &body, trips, m, &node);
    let mut stacked = vec![];
    for &v in &frontier {
        let lifted = l.lift(v)?;
        stacked.push(l.as_steps(lifted, v)?);
    }
    let nodes = std::mem::take(&mut l.nodes);
    drop(l);
    let bytes: f64 = nodes
        .iter()
        .filter(|n| n.op != OpKind::Constant)
        .flat_map(|n| n.outputs.iter())
        .map(|&o| elems(g.ty(o)) * g.ty(o).dtype.size() as f64)
        .sum();
    if bytes > MAX_MATERIALISED_BYTES {
        return Err(Keep::Memory);
    }
    // The body reads each hoisted value as step `iter` of a new capture.
    let mut b = (*body).clone();
    let iter = b.inputs[0];
    let mut namer = Namer::new(&b);
    let mut pairs = vec![];
    let mut step_reads = vec![];
    for (&v, &st) in frontier.iter().zip(&stacked) {
        let base = b.value(v).name.clone();
        let cap = namer.add_value(&mut b, &format!("{base}_steps"), g.ty(st).clone());
        b.inputs.push(cap);
        let row_ty = b.ty(v).clone();
        let row = namer.add_value(&mut b, &format!("{base}_step"), row_ty);
        step_reads.push((
            0,
            Node {
                op: OpKind::Gather,
                attrs: Attrs::new().with("axis", Attr::Int(0)),
                inputs: vec![Some(cap), Some(iter)],
                outputs: vec![row],
                name: format!("{}/hoisted_step", node.name),
            },
        ));
        pairs.push((v, row));
    }
    let mut sub = Subst::new(&b);
    for (v, row) in pairs {
        sub.replace(v, row);
    }
    sub.apply(&mut b);
    rewrite::insert_nodes(&mut b, step_reads);
    rewrite::remove_dead(&mut b);
    let mut looped = node;
    looped.inputs.extend(stacked.iter().map(|&v| Some(v)));
    looped
        .attrs
        .set("num_captures", Attr::Int((k + frontier.len()) as i64));
    looped.attrs.set("body", Attr::Graph(Arc::new(b)));
    g.nodes[li] = looped;
    let added = nodes.len();
    rewrite::insert_nodes(g, nodes.into_iter().map(|n| (li, n)).collect());
    Ok(Hoisted {
        values: frontier.len(),
        added,
    })
}

/// The state of one lifting: the outer graph it adds to and what each body value became.
struct Lifter<'a> {
    g: &'a mut Graph,
    body: &'a Graph,
    producer: Vec<Option<usize>>,
    s: usize,
    m: usize,
    loop_inputs: Vec<Option<ValueId>>,
    memo: HashMap<ValueId, Lifted>,
    nodes: Vec<Node>,
    namer: Namer,
    konst: HashMap<ValueId, Arc<Tensor>>,
    /// Per carried value: every step's state, the last state, the chosen chunk.
    scans: Vec<(ValueId, ValueId, usize)>,
    /// Per carried value: the state each step starts from (`[h0, h_0 .. h_{S-2}]`).
    shifted: HashMap<usize, ValueId>,
    label: String,
}

impl<'a> Lifter<'a> {
    /// A lifting of `body`, the body of loop `node` (`s` steps, `m` carried values), into `g`.
    fn new(g: &'a mut Graph, body: &'a Graph, s: usize, m: usize, node: &Node) -> Lifter<'a> {
        let konst = g
            .nodes
            .iter()
            .filter(|n| n.op == OpKind::Constant)
            .filter_map(|n| Some((*n.outputs.first()?, n.attrs.tensor("value").ok()??)))
            .collect();
        Lifter {
            namer: Namer::new(g),
            g,
            body,
            producer: rewrite::producers(body),
            s,
            m,
            loop_inputs: node.inputs.clone(),
            memo: HashMap::new(),
            nodes: vec![],
            konst,
            scans: vec![],
            shifted: HashMap::new(),
            label: node.name.clone(),
        }
    }
}

impl Lifter<'_> {
    /// Adds an outer node; its output types come from the op's shape rule.
    fn emit(
        &mut self,
        op: OpKind,
        attrs: Attrs,
        inputs: Vec<Option<ValueId>>,
        names: &[&str],
    ) -> Result<Vec<ValueId>, Keep> {
        let facts: Vec<Option<Fact>> = inputs
            .iter()
            .map(|i| {
                i.map(|v| {
                    let mut f = Fact::of(self.g.ty(v).clone());
                    f.konst = self.konst.get(&v).cloned();
                    f.dims = f.value_dims();
                    f
                })
            })
            .collect();
        let refs: Vec<Option<&Fact>> = facts.iter().map(Option::as_ref).collect();
        let out = kiln_ir::ops::infer(op, &attrs, &refs).map_err(|_| Keep::NoRule)?;
        if out.len() < names.len() {
            return Err(Keep::NoRule);
        }
        let outputs: Vec<ValueId> = out
            .into_iter()
            .zip(names)
            .map(|(f, n)| self.namer.add_value(self.g, n, f.ty))
            .collect();
        self.nodes.push(Node {
            op,
            attrs,
            inputs,
            outputs: outputs.clone(),
            name: format!("{}/lifted_{}", self.label, op.name()),
        });
        Ok(outputs)
    }

    fn one(
        &mut self,
        op: OpKind,
        attrs: Attrs,
        inputs: Vec<Option<ValueId>>,
        name: &str,
    ) -> Result<ValueId, Keep> {
        Ok(self.emit(op, attrs, inputs, &[name])?[0])
    }

    /// An outer constant.
    fn constant(&mut self, t: Tensor, name: &str) -> ValueId {
        let t = Arc::new(t.into_shared());
        let ty = TensorType::new(t.dtype(), Shape::fixed(t.shape()));
        let v = self.namer.add_value(self.g, name, ty);
        self.nodes.push(Node {
            op: OpKind::Constant,
            attrs: Attrs::new().with("value", Attr::Tensor(t.clone())),
            inputs: vec![],
            outputs: vec![v],
            name: String::new(),
        });
        self.konst.insert(v, t);
        v
    }

    fn ints(&mut self, v: &[i64], name: &str) -> ValueId {
        self.constant(i64_tensor(vec![v.len()], v.to_vec()), name)
    }

    /// The per-step rank of body value `v`.
    fn rank(&self, v: ValueId) -> Result<usize, Keep> {
        self.body.ty(v).shape.rank().ok_or(Keep::NoRule)
    }

    /// A lifted value as an outer value, and whether it has the step axis.
    fn materialise(&mut self, l: Lifted, name: &str) -> (ValueId, bool) {
        match l {
            Lifted::Inv(v) => (v, false),
            Lifted::Step(v) => (v, true),
            Lifted::Folded(t) => (self.constant(t.as_ref().clone(), name), true),
        }
    }

    /// `[S, *state]` from a lifted `a` or `b` that broadcasts to the state.
    fn full_steps(&mut self, l: Lifted, h0: ValueId, state: &TensorType) -> Result<ValueId, Keep> {
        let state_rank = state.shape.rank().ok_or(Keep::NoRule)?;
        let (v, stepped) = self.materialise(l, "scan_operand");
        let want: Option<Vec<Dim>> = state.shape.dims().map(|d| {
            std::iter::once(Dim::Fixed(self.s as u64))
                .chain(d.iter().cloned())
                .collect()
        });
        let have = self.g.ty(v).shape.dims().map(<[Dim]>::to_vec);
        if stepped
            && have.is_some()
            && have == want
            && !want.iter().flatten().any(|d| *d == Dim::Unknown)
        {
            return Ok(v);
        }
        let rank = self.g.ty(v).shape.rank().ok_or(Keep::NoRule)?;
        let per_step = if stepped { rank - 1 } else { rank };
        if per_step > state_rank {
            return Err(Keep::NotLinear);
        }
        // Stepped operands of a lower rank get their missing axes after the step axis.
        let v = if stepped && per_step < state_rank {
            let axes: Vec<i64> = (1..=(state_rank - per_step) as i64).collect();
            let axes = self.ints(&axes, "scan_axes");
            self.one(
                OpKind::Unsqueeze,
                Attrs::new(),
                vec![Some(v), Some(axes)],
                "scan_operand",
            )?
        } else {
            v
        };
        self.expand_over_steps(v, h0, "scan_operand")
    }

    /// `v` broadcast to `[S, *shape(like)]`.
    fn expand_over_steps(
        &mut self,
        v: ValueId,
        like: ValueId,
        name: &str,
    ) -> Result<ValueId, Keep> {
        let shape = self.one(OpKind::Shape, Attrs::new(), vec![Some(like)], "shape")?;
        let steps = self.ints(&[self.s as i64], "scan_steps");
        let full = self.one(
            OpKind::Concat,
            Attrs::new().with("axis", Attr::Int(0)),
            vec![Some(steps), Some(shape)],
            "shape",
        )?;
        self.one(
            OpKind::Expand,
            Attrs::new(),
            vec![Some(v), Some(full)],
            name,
        )
    }

    /// A scan output `[S, ..]` from its lifted value.
    fn as_steps(&mut self, l: Lifted, v: ValueId) -> Result<ValueId, Keep> {
        let name = format!("{}_scanned", self.body.value(v).name);
        match l {
            Lifted::Inv(x) => {
                let zero = self.ints(&[0], "axis0");
                let x1 = self.one(
                    OpKind::Unsqueeze,
                    Attrs::new(),
                    vec![Some(x), Some(zero)],
                    &name,
                )?;
                self.expand_over_steps(x1, x, &name)
            }
            other => Ok(self.materialise(other, &name).0),
        }
    }

    /// The states each step starts from for carried value `j`.
    fn shifted(&mut self, j: usize) -> Result<ValueId, Keep> {
        if let Some(&v) = self.shifted.get(&j) {
            return Ok(v);
        }
        let (h, _, _) = *self.scans.get(j).ok_or(Keep::NotLinear)?;
        let h0 = self.loop_inputs[2 + j].ok_or(Keep::NotLinear)?;
        let zero = self.ints(&[0], "axis0");
        let first = self.one(
            OpKind::Unsqueeze,
            Attrs::new(),
            vec![Some(h0), Some(zero)],
            "h_first",
        )?;
        let v = if self.s > 1 {
            let end = self.ints(&[self.s as i64 - 1], "prev_end");
            let start = self.ints(&[0], "prev_start");
            let prev = self.one(
                OpKind::Slice,
                Attrs::new(),
                vec![Some(h), Some(start), Some(end), Some(zero)],
                "h_prev",
            )?;
            self.one(
                OpKind::Concat,
                Attrs::new().with("axis", Attr::Int(0)),
                vec![Some(first), Some(prev)],
                "h_prev",
            )?
        } else {
            first
        };
        self.shifted.insert(j, v);
        Ok(v)
    }

    /// Lifts body value `v` (memoised).
    fn lift(&mut self, v: ValueId) -> Result<Lifted, Keep> {
        if let Some(l) = self.memo.get(&v) {
            return Ok(l.clone());
        }
        let l = match self.body.inputs.iter().position(|&i| i == v) {
            Some(0) => Lifted::Folded(Arc::new(i64_tensor(
                vec![self.s],
                (0..self.s as i64).collect(),
            ))),
            Some(1) => return Err(Keep::NotCounted),
            Some(p) if p < 2 + self.m => Lifted::Step(self.shifted(p - 2)?),
            Some(p) => Lifted::Inv(self.loop_inputs[p].ok_or(Keep::NoRule)?),
            None => {
                let ni = self.producer[v.index()].ok_or(Keep::NoRule)?;
                let lifted = self.lift_node(ni)?;
                let outs = self.body.nodes[ni].outputs.clone();
                for (o, l) in outs.into_iter().zip(lifted) {
                    self.memo.insert(o, l);
                }
                return self.memo.get(&v).cloned().ok_or(Keep::NoRule);
            }
        };
        self.memo.insert(v, l.clone());
        Ok(l)
    }

    /// Lifts every output of body node `ni`.
    fn lift_node(&mut self, ni: usize) -> Result<Vec<Lifted>, Keep> {
        let n = self.body.nodes[ni].clone();
        if n.op == OpKind::Constant {
            let t = n.attrs.tensor("value").ok().flatten().ok_or(Keep::NoRule)?;
            let name = self.body.value(n.outputs[0]).name.clone();
            return Ok(vec![Lifted::Inv(self.constant(t.as_ref().clone(), &name))]);
        }
        if n.op.holds_graphs() {
            return Err(Keep::NoRule);
        }
        let mut ins = vec![];
        for i in &n.inputs {
            ins.push(match i {
                Some(v) => Some(self.lift(*v)?),
                None => None,
            });
        }
        let names: Vec<String> = n
            .outputs
            .iter()
            .map(|&o| self.body.value(o).name.clone())
            .collect();
        let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
        // Every operand the same at every step: the node runs once, outside.
        if ins.iter().flatten().all(|l| matches!(l, Lifted::Inv(_))) {
            let inv = ins
                .iter()
                .map(|l| {
                    l.as_ref().map(|l| match l {
                        Lifted::Inv(x) => *x,
                        _ => unreachable!("checked above"),
                    })
                })
                .collect();
            let outs = self.emit(n.op, n.attrs.clone(), inv, &name_refs)?;
            return Ok(outs.into_iter().map(Lifted::Inv).collect());
        }
        // Integer arithmetic on per-step constants: evaluated per step at compile time.
        if let Some(f) = self.fold(&n, &ins) {
            return Ok(f);
        }
        if let Some(r) = self.gather_at_step(&n, &ins)? {
            return Ok(vec![r]);
        }
        let mut vals = vec![];
        for (k, l) in ins.iter().enumerate() {
            vals.push(
                l.clone()
                    .map(|l| self.materialise(l, &format!("{}_{k}", names[0]))),
            );
        }
        let stepped = |k: usize| vals.get(k).copied().flatten().is_some_and(|(_, s)| s);
        let input = |k: usize| vals.get(k).copied().flatten().map(|(v, _)| v);
        let shift = |a: i64| if a >= 0 { a + 1 } else { a };
        let all_inputs: Vec<Option<ValueId>> = (0..n.inputs.len()).map(input).collect();
        let only_first_stepped = (1..vals.len()).all(|k| !stepped(k));
        let rank0 = self.rank(n.inputs[0].ok_or(Keep::NoRule)?)? as i64;
        let norm = |a: i64| if a < 0 { a + rank0 } else { a };
        use OpKind::*;
        let (op, attrs, inputs) = match n.op {
            op if (op.family() == Family::Elementwise || op == Silu) && op.keeps_shape() => {
                if !only_first_stepped {
                    return Err(Keep::NoRule);
                }
                (op, n.attrs.clone(), all_inputs)
            }
            op if op.family() == Family::Elementwise || op == MatMul => {
                // Broadcasting aligns from the right: stepped operands of a lower per-step
                // rank get unit axes after the step axis.
                let ranks: Vec<usize> = n
                    .inputs
                    .iter()
                    .map(|i| i.map_or(Ok(0), |i| self.rank(i)))
                    .collect::<Result<_, _>>()?;
                if op == MatMul && ranks.iter().any(|&r| r < 2) {
                    return Err(Keep::NoRule);
                }
                let top = *ranks.iter().max().unwrap_or(&0);
                let mut inputs = vec![];
                for (k, &r) in ranks.iter().enumerate() {
                    let x = input(k);
                    inputs.push(match x {
                        Some(x) if stepped(k) && r < top => {
                            let axes: Vec<i64> = (1..=(top - r) as i64).collect();
                            let axes = self.ints(&axes, "axes");
                            Some(self.one(
                                Unsqueeze,
                                Attrs::new(),
                                vec![Some(x), Some(axes)],
                                &names[0],
                            )?)
                        }
                        other => other,
                    });
                }
                (op, n.attrs.clone(), inputs)
            }
            Unsqueeze | Squeeze | ReduceSum | ReduceMean | ReduceMax | ReduceMin | ReduceProd
            | ReduceSumSquare | ReduceL1 | ReduceL2 | ReduceLogSumExp => {
                if !only_first_stepped {
                    return Err(Keep::NoRule);
                }
                let axes = match n.inputs.get(1).copied().flatten() {
                    Some(_) => {
                        let t = self.konst_of(input(1)).ok_or(Keep::NoRule)?;
                        Some(t.to_i64s().into_iter().map(shift).collect::<Vec<_>>())
                    }
                    None if matches!(n.op, Unsqueeze | Squeeze) => None,
                    None if n.attrs.int_or("noop_with_empty_axes", 0).ok() == Some(0) => {
                        Some((1..=rank0).collect())
                    }
                    None => return Err(Keep::NoRule),
                };
                if n.op == Squeeze && axes.is_none() {
                    return Err(Keep::NoRule);
                }
                let mut inputs = vec![input(0)];
                if let Some(a) = axes {
                    inputs.push(Some(self.ints(&a, "axes")));
                }
                (n.op, n.attrs.clone(), inputs)
            }
            // A scalar index into an axis of size 1 (`h @ c[:, None]` then `[..., 0]`): a
            // squeeze, which moves no data.
            Gather
                if stepped(0)
                    && !stepped(1)
                    && self.konst_of(input(1)).is_some_and(|t| t.rank() == 0)
                    && self.unit_axis(n.inputs[0], n.attrs.int_or("axis", 0).unwrap_or(0)) =>
            {
                let axis = norm(n.attrs.int_or("axis", 0).unwrap_or(0)) + 1;
                let axes = self.ints(&[axis], "axes");
                (Squeeze, Attrs::new(), vec![input(0), Some(axes)])
            }
            Transpose => {
                let perm = match n.attrs.ints("perm").ok().flatten() {
                    Some(p) => p,
                    None => (0..rank0).rev().collect(),
                };
                let perm: Vec<i64> = std::iter::once(0)
                    .chain(perm.iter().map(|&p| norm(p) + 1))
                    .collect();
                let mut attrs = n.attrs.clone();
                attrs.set("perm", Attr::Ints(perm));
                (Transpose, attrs, vec![input(0)])
            }
            Softmax | LogSoftmax | Gather | Split | Concat | Flatten
                if n.op != Concat || (0..vals.len()).all(stepped) =>
            {
                if n.op == Gather && stepped(1) || n.op == Split && !only_first_stepped {
                    return Err(Keep::NoRule);
                }
                let default = if matches!(n.op, Softmax | LogSoftmax) {
                    -1
                } else if n.op == Flatten {
                    1
                } else {
                    0
                };
                let axis = n.attrs.int_or("axis", default).map_err(|_| Keep::NoRule)?;
                if n.op == Flatten && norm(axis) == 0 {
                    return Err(Keep::NoRule);
                }
                let axis = if n.op == Flatten {
                    norm(axis) + 1
                } else {
                    shift(axis)
                };
                let mut attrs = n.attrs.clone();
                attrs.set("axis", Attr::Int(axis));
                (n.op, attrs, all_inputs)
            }
            Reshape => {
                if stepped(1) || n.attrs.int_or("allowzero", 0).ok() != Some(0) {
                    return Err(Keep::NoRule);
                }
                let zero = self.ints(&[0], "keep_steps");
                let shape = self.one(
                    Concat,
                    Attrs::new().with("axis", Attr::Int(0)),
                    vec![Some(zero), input(1)],
                    "shape",
                )?;
                (Reshape, n.attrs.clone(), vec![input(0), Some(shape)])
            }
            Slice => {
                if !only_first_stepped {
                    return Err(Keep::NoRule);
                }
                let starts = self.konst_of(input(1)).ok_or(Keep::NoRule)?;
                let axes: Vec<i64> = match input(3) {
                    Some(a) => self
                        .konst_of(Some(a))
                        .ok_or(Keep::NoRule)?
                        .to_i64s()
                        .into_iter()
                        .map(shift)
                        .collect(),
                    None => (1..=starts.len() as i64).collect(),
                };
                let axes = self.ints(&axes, "axes");
                (
                    Slice,
                    n.attrs.clone(),
                    vec![input(0), input(1), input(2), Some(axes), input(4)],
                )
            }
            Shape if n.attrs.is_empty() => {
                // The per-step shape: the stacked shape without its first entry.
                let full = self.one(Shape, Attrs::new(), vec![input(0)], &names[0])?;
                let (one, big, zero) = (
                    self.ints(&[1], "start"),
                    self.ints(&[i64::MAX], "end"),
                    self.ints(&[0], "axis0"),
                );
                let v = self.one(
                    Slice,
                    Attrs::new(),
                    vec![Some(full), Some(one), Some(big), Some(zero)],
                    &names[0],
                )?;
                return Ok(vec![Lifted::Inv(v)]);
            }
            _ => return Err(Keep::NoRule),
        };
        let outs = self.emit(op, attrs, inputs, &name_refs)?;
        Ok(outs.into_iter().map(Lifted::Step).collect())
    }

    /// Whether body value `v` has size 1 along `axis`.
    fn unit_axis(&self, v: Option<ValueId>, axis: i64) -> bool {
        let Some(d) = v.and_then(|v| self.body.ty(v).shape.dims().map(<[Dim]>::to_vec)) else {
            return false;
        };
        let a = if axis < 0 {
            axis + d.len() as i64
        } else {
            axis
        };
        usize::try_from(a)
            .ok()
            .and_then(|a| d.get(a))
            .is_some_and(|d| d.fixed() == Some(1))
    }

    /// The constant behind an outer value, if it is one.
    fn konst_of(&self, v: Option<ValueId>) -> Option<Arc<Tensor>> {
        self.konst.get(&v?).cloned()
    }

    /// Evaluates a node per step at compile time when every operand is a constant (at
    /// least one per-step) and the results stay small integers.
    fn fold(&mut self, n: &Node, ins: &[Option<Lifted>]) -> Option<Vec<Lifted>> {
        let mut per_step: Vec<Option<Vec<Tensor>>> = vec![];
        for l in ins {
            per_step.push(match l {
                None => None,
                Some(Lifted::Folded(t)) => {
                    let inner: Vec<usize> = t.shape()[1..].to_vec();
                    let size: usize = inner.iter().product();
                    let all = t.to_i64s();
                    Some(
                        (0..self.s)
                            .map(|k| {
                                i64_tensor(inner.clone(), all[k * size..(k + 1) * size].to_vec())
                            })
                            .collect(),
                    )
                }
                Some(Lifted::Inv(v)) => {
                    // The same tensor at every step: one copy (indexed below).
                    let c = self.konst.get(v).filter(|c| c.len() <= FOLD_LIMIT)?;
                    Some(vec![c.as_ref().clone()])
                }
                Some(Lifted::Step(_)) => return None,
            });
        }
        let mut outs: Vec<Vec<i64>> = vec![vec![]; n.outputs.len()];
        let mut shapes: Vec<Vec<usize>> = vec![vec![]; n.outputs.len()];
        for t in 0..self.s {
            let args: Vec<Option<&Tensor>> = per_step
                .iter()
                .map(|p| p.as_ref().map(|v| &v[t.min(v.len() - 1)]))
                .collect();
            let r = kiln_ir::ops::eval(n.op, &n.attrs, &args).ok()?;
            for (k, x) in r.iter().enumerate().take(n.outputs.len()) {
                if x.dtype() != DType::I64 || (t > 0 && shapes[k] != x.shape()) {
                    return None;
                }
                shapes[k] = x.shape().to_vec();
                outs[k].extend(x.to_i64s());
                if outs[k].len() > FOLD_LIMIT {
                    return None;
                }
            }
        }
        Some(
            outs.into_iter()
                .zip(shapes)
                .map(|(v, sh)| {
                    let shape = std::iter::once(self.s).chain(sh).collect();
                    Lifted::Folded(Arc::new(i64_tensor(shape, v)))
                })
                .collect(),
        )
    }

    /// `gather(x, i_t)` with `x` the same at every step and `i_t` per step: a slice of `x`
    /// when the indices run `k, k+1, ..`, else one gather of every step's indices.
    fn gather_at_step(&mut self, n: &Node, ins: &[Option<Lifted>]) -> Result<Option<Lifted>, Keep> {
        let (Some(Some(Lifted::Inv(x))), Some(Some(idx))) = (ins.first(), ins.get(1)) else {
            return Ok(None);
        };
        if n.op != OpKind::Gather || matches!(idx, Lifted::Inv(_)) {
            return Ok(None);
        }
        let x = *x;
        let dims = self
            .g
            .ty(x)
            .shape
            .dims()
            .map(<[Dim]>::to_vec)
            .ok_or(Keep::NoRule)?;
        let rank = dims.len() as i64;
        let axis = n.attrs.int_or("axis", 0).map_err(|_| Keep::NoRule)?;
        let axis = if axis < 0 { axis + rank } else { axis };
        if !(0..rank).contains(&axis) {
            return Err(Keep::NoRule);
        }
        let len = dims[axis as usize].fixed();
        if let (Lifted::Folded(t), 0, Some(len)) = (idx, axis, len) {
            let v: Vec<i64> = t
                .to_i64s()
                .into_iter()
                .map(|i| if i < 0 { i + len as i64 } else { i })
                .collect();
            if t.rank() == 1
                && v.windows(2).all(|w| w[1] == w[0] + 1)
                && v[0] >= 0
                && v[v.len() - 1] < len as i64
            {
                if v[0] == 0 && v.len() as u64 == len {
                    return Ok(Some(Lifted::Step(x)));
                }
                let (st, en, ax) = (
                    self.ints(&[v[0]], "start"),
                    self.ints(&[v[0] + v.len() as i64], "end"),
                    self.ints(&[0], "axis0"),
                );
                let name = format!("{}_steps", self.body.value(n.outputs[0]).name);
                let s = self.one(
                    OpKind::Slice,
                    Attrs::new(),
                    vec![Some(x), Some(st), Some(en), Some(ax)],
                    &name,
                )?;
                return Ok(Some(Lifted::Step(s)));
            }
        }
        let (i, _) = self.materialise(idx.clone(), "step_indices");
        let irank = self.g.ty(i).shape.rank().ok_or(Keep::NoRule)?;
        let name = format!("{}_steps", self.body.value(n.outputs[0]).name);
        let out = self.one(
            OpKind::Gather,
            n.attrs.clone(),
            vec![Some(x), Some(i)],
            &name,
        )?;
        if axis == 0 {
            return Ok(Some(Lifted::Step(out)));
        }
        // The steps sit at `axis`: move them to the front.
        let out_rank = rank as usize - 1 + irank;
        let a = axis as usize;
        let perm: Vec<i64> = std::iter::once(a)
            .chain((0..out_rank).filter(|&d| d != a))
            .map(|d| d as i64)
            .collect();
        let t = self.one(
            OpKind::Transpose,
            Attrs::new().with("perm", Attr::Ints(perm)),
            vec![Some(out)],
            &name,
        )?;
        Ok(Some(Lifted::Step(t)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{assert_same_outputs, f32_ty, node, node_with, ops, Rng};
    use crate::PassManager;

    const S: usize = 40;
    const B: usize = 2;
    const D: usize = 6;

    fn scalar(d: DType) -> TensorType {
        TensorType::new(d, Shape::new(vec![]))
    }

    /// A loop over `S` steps carrying `h: [B, D]`, capturing `x: [S + 1, B, D]` and a
    /// constant `c: [D]`. Per step: `x_t = x[t + 1]` (an index chain on the iteration
    /// number), `a = sigmoid(x_t)`, `b = x_t · exp(c)` (`exp(c)` the same every step),
    /// then `h_out = b + a · h` when `linear` (else `max(h, x_t)`). Scanned: the row sums
    /// of `h_in · h_out` (it reads the state the step starts from), `h_outᵀ` and `-c`.
    fn looped(linear: bool) -> Graph {
        let mut body = Graph::new("step");
        let iter = body.add_input("iter", scalar(DType::I64));
        let cond = body.add_input("cond", scalar(DType::Bool));
        let h_in = body.add_input("h_in", f32_ty(&[B, D]));
        let x = body.add_input("x", f32_ty(&[S + 1, B, D]));
        let c = body.add_input("c", f32_ty(&[D]));
        let steps = body.add_constant("steps", Tensor::from_vec(vec![S], (1..=S as i64).collect()));
        let idx = node(
            &mut body,
            OpKind::Gather,
            &[steps, iter],
            "idx",
            scalar(DType::I64),
        );
        let xt = node(&mut body, OpKind::Gather, &[x, idx], "xt", f32_ty(&[B, D]));
        let h_out = if linear {
            let a = node(&mut body, OpKind::Sigmoid, &[xt], "a", f32_ty(&[B, D]));
            let ec = node(&mut body, OpKind::Exp, &[c], "ec", f32_ty(&[D]));
            let b = node(&mut body, OpKind::Mul, &[xt, ec], "b", f32_ty(&[B, D]));
            let m = node(&mut body, OpKind::Mul, &[h_in, a], "m", f32_ty(&[B, D]));
            node(&mut body, OpKind::Add, &[b, m], "h_out", f32_ty(&[B, D]))
        } else {
            node(
                &mut body,
                OpKind::Max,
                &[h_in, xt],
                "h_out",
                f32_ty(&[B, D]),
            )
        };
        let p = node(&mut body, OpKind::Mul, &[h_in, h_out], "p", f32_ty(&[B, D]));
        let axes = body.add_constant("axes", Tensor::from_vec(vec![1], vec![-1i64]));
        let y1 = node(
            &mut body,
            OpKind::ReduceSum,
            &[p, axes],
            "y1",
            f32_ty(&[B, 1]),
        );
        let perm = Attrs::new().with("perm", Attr::Ints(vec![1, 0]));
        let y2 = node_with(
            &mut body,
            OpKind::Transpose,
            perm,
            &[h_out],
            "y2",
            f32_ty(&[D, B]),
        );
        // The same at every step: broadcast over the steps.
        let y3 = node(&mut body, OpKind::Neg, &[c], "y3", f32_ty(&[D]));
        body.outputs = vec![cond, h_out, y1, y2, y3];

        let mut g = Graph::new("looped");
        let h0 = g.add_input("h0", f32_ty(&[B, D]));
        let x = g.add_input("x", f32_ty(&[S + 1, B, D]));
        let c = g.add_constant("c", Rng::new(3).tensor(DType::F32, &[D]));
        let trips = g.add_constant("trips", Tensor::scalar(S as i64));
        let attrs = Attrs::new()
            .with("body", Attr::Graph(Arc::new(body)))
            .with("num_captures", Attr::Int(2));
        let outs = g.add_node(
            OpKind::Loop,
            attrs,
            vec![Some(trips), None, Some(h0), Some(x), Some(c)],
            vec![
                ("h".into(), f32_ty(&[B, D])),
                ("y1s".into(), f32_ty(&[S, B, 1])),
                ("y2s".into(), f32_ty(&[S, D, B])),
                ("y3s".into(), f32_ty(&[S, D])),
            ],
            "scan_loop",
        );
        g.outputs = outs;
        g
    }

    fn run_pass(g: &mut Graph) -> PassStats {
        let stats = SelectRecurrenceForm::new(Target::zen3_2c()).run(g).unwrap();
        kiln_ir::verify(g).unwrap();
        stats
    }

    #[test]
    fn a_linear_recurrence_loop_becomes_one_scan_with_the_same_outputs() {
        let before = looped(true);
        let mut after = before.clone();
        let stats = run_pass(&mut after);
        assert_eq!(stats.counter("loops_lifted"), 1, "{stats}");
        let o = ops(&after);
        assert!(!o.contains(&OpKind::Loop), "{o:?}");
        assert_eq!(o.iter().filter(|&&k| k == OpKind::LinearScan).count(), 1);
        // x[t + 1] over every step is a slice of x, not a gather.
        assert!(
            o.contains(&OpKind::Slice) && !o.contains(&OpKind::Gather),
            "{o:?}"
        );
        assert_same_outputs(&before, &after);
    }

    #[test]
    fn a_carried_value_that_is_not_linear_keeps_the_loop() {
        let before = looped(false);
        let mut after = before.clone();
        let stats = run_pass(&mut after);
        assert_eq!(stats.counter("kept_not_linear"), 1, "{stats}");
        assert!(ops(&after).contains(&OpKind::Loop));
        assert_same_outputs(&before, &after);
    }

    /// An RNN step: `h_out = tanh(x_t·W_x + h_in·W_h)` over `S` steps, `x_t = x[t + 1]`,
    /// `W_x` captured, `W_h` held by the body; every step's state scanned.
    fn rnn_looped() -> Graph {
        let mut body = Graph::new("rnn_step");
        let iter = body.add_input("iter", scalar(DType::I64));
        let cond = body.add_input("cond", scalar(DType::Bool));
        let h_in = body.add_input("h_in", f32_ty(&[B, D]));
        let x = body.add_input("x", f32_ty(&[S + 1, B, D]));
        let wx = body.add_input("wx", f32_ty(&[D, D]));
        let steps = body.add_constant("steps", Tensor::from_vec(vec![S], (1..=S as i64).collect()));
        let wh = body.add_constant("wh", Rng::new(8).tensor(DType::F32, &[D, D]));
        let idx = node(
            &mut body,
            OpKind::Gather,
            &[steps, iter],
            "idx",
            scalar(DType::I64),
        );
        let xt = node(&mut body, OpKind::Gather, &[x, idx], "xt", f32_ty(&[B, D]));
        let px = node(&mut body, OpKind::MatMul, &[xt, wx], "px", f32_ty(&[B, D]));
        let ph = node(
            &mut body,
            OpKind::MatMul,
            &[h_in, wh],
            "ph",
            f32_ty(&[B, D]),
        );
        let a = node(&mut body, OpKind::Add, &[px, ph], "a", f32_ty(&[B, D]));
        let h_out = node(&mut body, OpKind::Tanh, &[a], "h_out", f32_ty(&[B, D]));
        body.outputs = vec![cond, h_out, h_out];
        let mut g = Graph::new("rnn_looped");
        let h0 = g.add_input("h0", f32_ty(&[B, D]));
        let x = g.add_input("x", f32_ty(&[S + 1, B, D]));
        let wx = g.add_constant("wx", Rng::new(9).tensor(DType::F32, &[D, D]));
        let trips = g.add_constant("trips", Tensor::scalar(S as i64));
        let attrs = Attrs::new()
            .with("body", Attr::Graph(Arc::new(body)))
            .with("num_captures", Attr::Int(2));
        g.outputs = g.add_node(
            OpKind::Loop,
            attrs,
            vec![Some(trips), None, Some(h0), Some(x), Some(wx)],
            vec![
                ("h".into(), f32_ty(&[B, D])),
                ("hs".into(), f32_ty(&[S, B, D])),
            ],
            "rnn",
        );
        g
    }

    #[test]
    fn a_kept_loop_runs_its_step_input_projection_once_over_every_step() {
        let before = rnn_looped();
        let mut after = before.clone();
        let stats = run_pass(&mut after);
        assert_eq!(stats.counter("kept_not_linear"), 1, "{stats}");
        assert_eq!(stats.counter("values_hoisted"), 1, "{stats}");
        let li = after
            .nodes
            .iter()
            .position(|n| n.op == OpKind::Loop)
            .unwrap();
        // x_t·W_x left the body: one matmul over every step outside, h·W_h inside.
        assert!(
            ops(&after)[..li].contains(&OpKind::MatMul),
            "{:?}",
            ops(&after)
        );
        let body = after.nodes[li].attrs.graph("body").unwrap().unwrap();
        assert_eq!(
            ops(&body).iter().filter(|&&k| k == OpKind::MatMul).count(),
            1
        );
        assert_eq!(after.nodes[li].attrs.int("num_captures").unwrap(), Some(3));
        // The interpreter's batched matmul sums each row as the per-step one did.
        assert_same_outputs(&before, &after);
        // A loop without a matmul on its step inputs is left as it was.
        let before = looped(false);
        let mut after = before.clone();
        let stats = run_pass(&mut after);
        assert_eq!(stats.counter("values_hoisted"), 0, "{stats}");
    }

    #[test]
    fn a_loop_with_a_condition_or_a_dynamic_trip_count_is_kept() {
        let mut g = looped(true);
        let t = g.add_input("t", scalar(DType::I64));
        let li = g.nodes.iter().position(|n| n.op == OpKind::Loop).unwrap();
        g.nodes[li].inputs[0] = Some(t);
        let stats = run_pass(&mut g);
        assert_eq!(stats.counter("kept_not_counted"), 1, "{stats}");
        let mut g = looped(true);
        let c = g.add_input("go", scalar(DType::Bool));
        let li = g.nodes.iter().position(|n| n.op == OpKind::Loop).unwrap();
        g.nodes[li].inputs[1] = Some(c);
        let stats = run_pass(&mut g);
        assert_eq!(stats.counter("kept_not_counted"), 1, "{stats}");
    }

    #[test]
    fn the_chunked_form_is_chosen_only_where_threads_would_idle() {
        let mut t = Target::zen3_2c();
        t.cores = 16;
        // A small state on many cores: one thread would run the sequential form.
        assert!(choose_chunk(&t, 4096, 256) > 0);
        // A state large enough to split over every core: sequential.
        assert_eq!(choose_chunk(&t, 4096, 16 * 8192), 0);
        // Two cores: the chunked form's second pass costs what the second thread gains.
        assert_eq!(choose_chunk(&Target::zen3_2c(), 4096, 256), 0);
        // Too few steps to split.
        assert_eq!(choose_chunk(&t, 8, 16), 0);
        let costs = scan_form_costs(&t, 4096, 256);
        assert!(costs
            .iter()
            .any(|c| c.form.starts_with("parallel scan") && c.chunk.is_none()));
    }

    /// An unrolled selective scan as an exporter writes it (`S` copies of the step), rolled
    /// by `roll_recurrences` and then lifted: the default order of the two passes.
    #[test]
    fn an_unrolled_scan_rolls_then_lifts_into_one_linear_scan() {
        let mut g = Graph::new("unrolled_scan");
        let x = g.add_input("x", f32_ty(&[B, S, D]));
        let h0 = g.add_input("h0", f32_ty(&[B, D]));
        let mut rng = Rng::new(5);
        let w = g.add_constant("w", rng.tensor(DType::F32, &[D, 3]));
        let one = g.add_constant("one", Tensor::from_vec(vec![1], vec![1i64]));
        let mut h = h0;
        let mut ys = vec![];
        for t in 0..S {
            let ti = g.add_constant(&format!("t{t}"), Tensor::scalar(t as i64));
            let axis1 = Attrs::new().with("axis", Attr::Int(1));
            let xt = node_with(
                &mut g,
                OpKind::Gather,
                axis1,
                &[x, ti],
                &format!("x{t}"),
                f32_ty(&[B, D]),
            );
            let a = node(
                &mut g,
                OpKind::Sigmoid,
                &[xt],
                &format!("a{t}"),
                f32_ty(&[B, D]),
            );
            let m = node(
                &mut g,
                OpKind::Mul,
                &[a, h],
                &format!("m{t}"),
                f32_ty(&[B, D]),
            );
            h = node(
                &mut g,
                OpKind::Add,
                &[m, xt],
                &format!("state{t}"),
                f32_ty(&[B, D]),
            );
            let y = node(
                &mut g,
                OpKind::MatMul,
                &[h, w],
                &format!("y{t}"),
                f32_ty(&[B, 3]),
            );
            ys.push(node(
                &mut g,
                OpKind::Unsqueeze,
                &[y, one],
                &format!("u{t}"),
                f32_ty(&[B, 1, 3]),
            ));
        }
        let axis1 = Attrs::new().with("axis", Attr::Int(1));
        let stacked = node_with(&mut g, OpKind::Concat, axis1, &ys, "ys", f32_ty(&[B, S, 3]));
        g.outputs = vec![h, stacked];
        let before = g.clone();
        let pm = PassManager::new(vec![
            Box::new(crate::classic::RollBlocks::recurrences()),
            Box::new(SelectRecurrenceForm::new(Target::zen3_2c())),
        ]);
        pm.run(&mut g).unwrap();
        let o = ops(&g);
        assert!(!o.contains(&OpKind::Loop), "{o:?}");
        assert_eq!(
            o.iter().filter(|&&k| k == OpKind::LinearScan).count(),
            1,
            "{o:?}"
        );
        assert!(g.nodes.len() < 40, "{} nodes", g.nodes.len());
        assert_same_outputs(&before, &g);
    }
}
