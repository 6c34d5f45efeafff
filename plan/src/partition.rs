//! The partitioner: splits an (optimised) graph into kernels. Single-consumer chains of f32
//! elementwise ops and last-axis row ops (softmax, layer_norm, rms_norm) with one domain
//! shape are fused greedily into loop kernels; contractions and everything else run one
//! node at a time.

use crate::loop_ir::{BinOp, Expr, ExprId, InnerAccess, LoopKernel, RedOp, UnOp};
use kiln_ir::ops::Lowering;
use kiln_ir::{DType, Dim, Graph, Node, OpKind, Tensor, ValueId};
use std::collections::{HashMap, HashSet};

/// One unit of execution.
#[derive(Clone, Debug, PartialEq)]
pub enum Kernel {
    /// A fused elementwise/broadcast/row-reduction loop nest.
    Loop(LoopKernel),
    /// A contraction (matmul, gemm, linear, conv, attention, einsum, matmul_integer): node
    /// index. A backend
    /// runs it through a routine of its own where one applies, else the interpreter's op.
    Contraction(usize),
    /// Anything else: node index, run by the interpreter's `ops::eval`.
    Fallback(usize),
}

/// A partitioned graph: kernels in execution order and the evaluated constants. Pure data,
/// the same for every backend: a backend prepares it for its target (the CPU runtime packs
/// contraction weights, a GPU backend uploads them) and AOT libraries carry it serialised
/// ([`crate::serial`]) instead of partitioning again at load.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The graph the kernels index into.
    pub graph: Graph,
    /// Kernels in a valid execution order.
    pub kernels: Vec<Kernel>,
    /// Values defined by `constant` nodes, evaluated once.
    pub constants: Vec<(ValueId, Tensor)>,
}

impl Plan {
    /// A plan from a graph and kernels made earlier (by [`partition`], here or at build
    /// time): evaluates the constants and checks that every node runs exactly once, in an
    /// order where each value is defined before it is read.
    pub fn from_kernels(graph: Graph, kernels: Vec<Kernel>) -> Result<Plan, String> {
        let constants = constants(&graph)?;
        let mut defined = vec![false; graph.values.len()];
        for &v in &graph.inputs {
            defined[v.index()] = true;
        }
        for (v, _) in &constants {
            defined[v.index()] = true;
        }
        let mut node_seen = vec![false; graph.nodes.len()];
        for (ki, k) in kernels.iter().enumerate() {
            let (reads, writes): (Vec<ValueId>, Vec<ValueId>) = match k {
                Kernel::Loop(l) => (
                    l.inputs.iter().map(|i| i.value).collect(),
                    l.outputs.iter().map(|o| o.0).collect(),
                ),
                Kernel::Contraction(n) | Kernel::Fallback(n) => {
                    let node = graph
                        .nodes
                        .get(*n)
                        .ok_or_else(|| format!("kernel #{ki} names node #{n}, out of range"))?;
                    if std::mem::replace(&mut node_seen[*n], true) {
                        return Err(format!("kernel #{ki}: node #{n} runs twice"));
                    }
                    (
                        node.inputs.iter().flatten().copied().collect(),
                        node.outputs.clone(),
                    )
                }
            };
            for v in reads.iter().chain(&writes) {
                if v.index() >= graph.values.len() {
                    return Err(format!(
                        "kernel #{ki} names value #{}, out of range",
                        v.index()
                    ));
                }
            }
            if let Some(v) = reads.iter().find(|v| !defined[v.index()]) {
                return Err(format!(
                    "kernel #{ki} reads `{}` before it is defined",
                    graph.value(*v).name
                ));
            }
            for v in writes {
                defined[v.index()] = true;
            }
        }
        if let Some(v) = graph.outputs.iter().find(|v| !defined[v.index()]) {
            return Err(format!(
                "graph output `{}` is never computed",
                graph.value(*v).name
            ));
        }
        Ok(Plan {
            graph,
            kernels,
            constants,
        })
    }

    /// A short label for kernel `i` (for errors, profiles and dumps).
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
}

/// The values of the graph's `constant` nodes, evaluated.
fn constants(g: &Graph) -> Result<Vec<(ValueId, Tensor)>, String> {
    let mut constants = vec![];
    for node in g.nodes.iter().filter(|n| n.op == OpKind::Constant) {
        let mut outs = kiln_ir::ops::eval(node.op, &node.attrs, &[])?;
        outs.truncate(node.outputs.len());
        constants.extend(node.outputs.iter().copied().zip(outs));
    }
    Ok(constants)
}

/// Whether an op is a contraction (a GEMM-backed kernel).
pub fn is_contraction(op: OpKind) -> bool {
    op.lowering() == Lowering::Contraction
}

/// The static dims of a value when its rank and last dim are known. Unknown outer dims
/// are bound at run time by broadcasting the kernel's inputs.
fn known_dims(g: &Graph, v: ValueId) -> Option<Vec<Dim>> {
    let d = g.ty(v).shape.dims()?;
    if matches!(d.last(), Some(Dim::Unknown)) {
        return None;
    }
    Some(d.to_vec())
}

/// How an input of static shape `dims` is read in a loop over `domain`, or `None` when
/// it does not statically broadcast to it. Unknown outer dims are checked at run time.
pub fn inner_access(dims: &[Dim], domain: &[Dim]) -> Option<InnerAccess> {
    if dims.len() > domain.len() || matches!(dims.last(), Some(Dim::Unknown)) {
        return None;
    }
    let off = domain.len() - dims.len();
    for (i, d) in dims.iter().enumerate() {
        let dd = &domain[off + i];
        let unknown = matches!(d, Dim::Unknown) || matches!(dd, Dim::Unknown);
        if i + 1 < dims.len() && unknown {
            continue;
        }
        if d != dd && *d != Dim::Fixed(1) {
            return None;
        }
    }
    match (dims.last(), domain.last()) {
        (None, _) => Some(InnerAccess::Broadcast),
        // Rows of one value: the input's row is the domain's, read as contiguous so that
        // the run can fold such rows together (`LoopShape::bind`).
        (Some(Dim::Fixed(1)), Some(Dim::Fixed(1))) => Some(InnerAccess::Contiguous),
        (Some(Dim::Fixed(1)), _) => Some(InnerAccess::Broadcast),
        (Some(_), _) => Some(InnerAccess::Contiguous),
    }
}

/// Whether the op (with these attributes) has a loop-kernel lowering.
fn lowerable(node: &Node, rank: usize) -> bool {
    use OpKind::*;
    let last_axis = |default: i64| {
        let a = node.attrs.int_or("axis", default).unwrap_or(i64::MIN);
        rank >= 1 && (a == rank as i64 - 1 || a == -1)
    };
    // The op table says which ops lower to loop kernels; these guards are the attribute
    // values the lowering below handles.
    node.op.lowering() == Lowering::Loop
        && match node.op {
            Gelu => matches!(
                node.attrs
                    .string_or("approximate", "none".into())
                    .as_deref(),
                Ok("none") | Ok("tanh")
            ),
            Softmax | LogSoftmax => last_axis(-1),
            Celu => node.attrs.float_or("alpha", 1.0).is_ok_and(|a| a > 0.0),
            LayerNorm => node.outputs.len() == 1 && last_axis(-1),
            RmsNorm => last_axis(-1),
            // Variadic in ONNX; the lowering is binary.
            Max | Min => node.inputs.len() == 2,
            // Variadic: a chain of adds (and a scale for the mean).
            Sum | Mean => node.inputs.iter().all(Option::is_some),
            _ => true,
        }
}

/// The domain of a fusable node (its output dims), or `None` when it cannot be fused.
fn fusable(g: &Graph, node: &Node) -> Option<Vec<Dim>> {
    if node.outputs.len() != 1 || g.ty(node.outputs[0]).dtype != DType::F32 {
        return None;
    }
    let dom = known_dims(g, node.outputs[0])?;
    if !lowerable(node, dom.len()) {
        return None;
    }
    for (k, i) in node.inputs.iter().enumerate() {
        match i {
            Some(v) => {
                if g.ty(*v).dtype != DType::F32 {
                    return None;
                }
                inner_access(&known_dims(g, *v)?, &dom)?;
            }
            // Only layer_norm's bias (and rms_norm's ignored one) and clip's bounds may be
            // omitted.
            None if k == 2 || node.op == OpKind::Clip => {}
            None => return None,
        }
    }
    match node.op {
        // Clip's bounds are scalars (one element), broadcast to every row.
        OpKind::Clip => {
            let scalar = |v: &ValueId| {
                g.ty(*v)
                    .shape
                    .dims()
                    .is_some_and(|d| d.iter().all(|d| *d == Dim::Fixed(1)))
            };
            if !node.inputs.iter().skip(1).flatten().all(scalar) {
                return None;
            }
        }
        // `x < 0 ? slope·x : x` as `max(x, 0) + slope·min(x, 0)` is exact only for finite
        // slopes (an infinite or NaN slope times 0 is NaN): the slope must be a constant
        // with finite values. PRelu's slope broadcasts to x, never the other way.
        OpKind::PRelu => {
            let slope = node.inputs.get(1).copied().flatten()?;
            let finite = constant_value(g, slope)
                .and_then(|t| t.as_slice::<f32>().map(|v| v.iter().all(|x| x.is_finite())));
            if finite != Some(true) || known_dims(g, node.inputs[0]?)? != dom {
                return None;
            }
        }
        _ => {}
    }
    Some(dom)
}

/// The value of `v` when a `constant` node defines it.
fn constant_value(g: &Graph, v: ValueId) -> Option<Tensor> {
    let node = g
        .nodes
        .iter()
        .find(|n| n.op == OpKind::Constant && n.outputs.contains(&v))?;
    let at = node.outputs.iter().position(|&o| o == v)?;
    kiln_ir::ops::eval(node.op, &node.attrs, &[])
        .ok()?
        .into_iter()
        .nth(at)
}

/// Partitions `g` into kernels. Constant nodes are evaluated here.
pub fn partition(g: &Graph) -> Result<Plan, String> {
    let n = g.nodes.len();
    let mut consumers: Vec<Vec<usize>> = vec![vec![]; g.values.len()];
    for (i, node) in g.nodes.iter().enumerate() {
        for v in node.inputs.iter().flatten() {
            if !consumers[v.index()].contains(&i) {
                consumers[v.index()].push(i);
            }
        }
    }
    let producers = g.producers();
    let mut group_of: Vec<Option<usize>> = vec![None; n];
    let mut groups: Vec<(Vec<usize>, Vec<Dim>)> = vec![];
    for (i, node) in g.nodes.iter().enumerate() {
        let Some(dom) = fusable(g, node) else {
            continue;
        };
        let mut merge: Vec<usize> = vec![];
        for v in node.inputs.iter().flatten() {
            let Some(gid) = producers.get(v).and_then(|&p| group_of[p]) else {
                continue;
            };
            if merge.contains(&gid) || groups[gid].1 != dom {
                continue;
            }
            // With unknown dims an inner value may be smaller than the domain (it is
            // broadcast), so only the last node's result may leave the group.
            let partly_unknown = dom.iter().any(|d| matches!(d, Dim::Unknown));
            if partly_unknown
                && groups[gid]
                    .0
                    .iter()
                    .any(|&m| g.nodes[m].outputs.iter().any(|o| g.outputs.contains(o)))
            {
                continue;
            }
            // Every value the group lets out must be read only by this node (graph
            // outputs aside), so no outside node sits between the group and this node.
            let sealed = groups[gid].0.iter().all(|&m| {
                g.nodes[m].outputs.iter().all(|o| {
                    consumers[o.index()]
                        .iter()
                        .all(|&c| c == i || group_of[c] == Some(gid))
                })
            });
            if sealed {
                merge.push(gid);
            }
        }
        let gid = match merge.first() {
            Some(&first) => {
                for &other in &merge[1..] {
                    let nodes = std::mem::take(&mut groups[other].0);
                    for &m in &nodes {
                        group_of[m] = Some(first);
                    }
                    groups[first].0.extend(nodes);
                }
                groups[first].0.push(i);
                groups[first].0.sort_unstable();
                first
            }
            None => {
                groups.push((vec![i], dom));
                groups.len() - 1
            }
        };
        group_of[i] = Some(gid);
    }

    let outputs: HashSet<ValueId> = g.outputs.iter().copied().collect();
    let mut kernels = vec![];
    for (i, node) in g.nodes.iter().enumerate() {
        if let Some(gid) = group_of[i] {
            let (members, dom) = &groups[gid];
            if members.last() == Some(&i) {
                kernels.push(Kernel::Loop(build_loop(
                    g, members, dom, &consumers, &group_of, &outputs,
                )?));
            }
        } else if node.op == OpKind::Constant {
            // Evaluated once into `Plan::constants`.
        } else if is_contraction(node.op) {
            kernels.push(Kernel::Contraction(i));
        } else {
            kernels.push(Kernel::Fallback(i));
        }
    }
    Ok(Plan {
        graph: g.clone(),
        kernels,
        constants: constants(g)?,
    })
}

/// Lowers one group of nodes into a loop kernel.
fn build_loop(
    g: &Graph,
    members: &[usize],
    dom: &[Dim],
    consumers: &[Vec<usize>],
    group_of: &[Option<usize>],
    outputs: &HashSet<ValueId>,
) -> Result<LoopKernel, String> {
    let mut k = LoopKernel::new(dom.to_vec());
    let mut env: HashMap<ValueId, ExprId> = HashMap::new();
    let gid = members.first().and_then(|&m| group_of[m]);
    for &m in members {
        let node = &g.nodes[m];
        let mut ins: Vec<Option<ExprId>> = vec![];
        for i in &node.inputs {
            ins.push(match i {
                None => None,
                Some(v) => Some(match env.get(v) {
                    Some(&e) => e,
                    None => {
                        let dims = known_dims(g, *v).ok_or("input shape is not known")?;
                        let acc = inner_access(&dims, dom).ok_or("input does not broadcast")?;
                        k.load(*v, acc)
                    }
                }),
            });
        }
        let y = lower(&mut k, node, &ins)?;
        let out = node.outputs[0];
        env.insert(out, y);
        let escapes = outputs.contains(&out)
            || consumers[out.index()]
                .iter()
                .any(|&c| group_of[c] != gid || gid.is_none());
        if escapes {
            k.outputs.push((out, y));
        }
    }
    Ok(k)
}

/// Lowers one node's arithmetic given its operand expressions.
fn lower(k: &mut LoopKernel, node: &Node, ins: &[Option<ExprId>]) -> Result<ExprId, String> {
    use OpKind::*;
    let arg = |i: usize| -> Result<ExprId, String> {
        ins.get(i)
            .copied()
            .flatten()
            .ok_or_else(|| format!("missing input #{i}"))
    };
    let x = arg(0)?;
    let un = |op| -> Result<Option<UnOp>, String> { Ok(Some(op)) };
    let unary = match node.op {
        Neg => un(UnOp::Neg)?,
        Abs => un(UnOp::Abs)?,
        Sqrt => un(UnOp::Sqrt)?,
        Reciprocal => un(UnOp::Recip)?,
        Relu => un(UnOp::Relu)?,
        Exp => un(UnOp::Exp)?,
        Log => un(UnOp::Log)?,
        Tanh => un(UnOp::Tanh)?,
        Erf => un(UnOp::Erf)?,
        Sigmoid => un(UnOp::Sigmoid)?,
        Softplus => un(UnOp::Softplus)?,
        _ => None,
    };
    if let Some(op) = unary {
        return Ok(k.un(op, x));
    }
    let binary = match node.op {
        Add => Some(BinOp::Add),
        Sub => Some(BinOp::Sub),
        Mul => Some(BinOp::Mul),
        Div => Some(BinOp::Div),
        Max => Some(BinOp::Max),
        Min => Some(BinOp::Min),
        _ => None,
    };
    if let Some(op) = binary {
        let b = arg(1)?;
        return Ok(k.bin(op, x, b));
    }
    Ok(match node.op {
        Identity => x,
        // elu(x) = max(x, 0) + alpha·(exp(min(x, 0)) − 1): NaN and ±Inf as in the
        // interpreter's `x < 0 ? alpha·expm1(x) : x` (the feature map of linear attention).
        Elu => {
            let alpha = k.konst(node.attrs.float_or("alpha", 1.0)?);
            let zero = k.konst(0.0);
            let one = k.konst(1.0);
            let pos = k.bin(BinOp::Max, x, zero);
            let neg = k.bin(BinOp::Min, x, zero);
            let e = k.un(UnOp::Exp, neg);
            let em1 = k.bin(BinOp::Sub, e, one);
            let t = k.bin(BinOp::Mul, alpha, em1);
            k.bin(BinOp::Add, pos, t)
        }
        Silu => {
            let s = k.un(UnOp::Sigmoid, x);
            k.bin(BinOp::Mul, x, s)
        }
        // gelu with `approximate = "tanh"` as `x·sigmoid(2√(2/π)·(x + 0.044715·x³))`, equal to
        // `0.5·x·(1 + tanh(..))` without its cancellation for negative x; the erf form is one
        // op (`crate::vmath::gelu_erf`, accurate in the negative tail).
        Gelu => {
            if node.attrs.string_or("approximate", "none".into())? == "tanh" {
                let c = k.konst(crate::vmath::GELU_TANH_2C);
                let a = k.konst(crate::vmath::GELU_TANH_A);
                let x2 = k.bin(BinOp::Mul, x, x);
                let x3 = k.bin(BinOp::Mul, x2, x);
                let ax3 = k.bin(BinOp::Mul, a, x3);
                let inner = k.bin(BinOp::Add, x, ax3);
                let z = k.bin(BinOp::Mul, c, inner);
                let s = k.un(UnOp::Sigmoid, z);
                k.bin(BinOp::Mul, x, s)
            } else {
                k.un(UnOp::Gelu, x)
            }
        }
        Softmax | LogSoftmax => {
            let m = k.reduce(RedOp::Max, x);
            let shift = k.un(UnOp::FiniteOrZero, m);
            let d = k.bin(BinOp::Sub, x, shift);
            let e = k.un(UnOp::Exp, d);
            let s = k.reduce(RedOp::Sum, e);
            if node.op == Softmax {
                k.bin(BinOp::Div, e, s)
            } else {
                let l = k.un(UnOp::Log, s);
                k.bin(BinOp::Sub, d, l)
            }
        }
        LeakyRelu | PRelu => {
            // x < 0 ? a·x : x, as max(x, 0) + a·min(x, 0) (finite a: see `fusable`).
            let a = match node.op {
                LeakyRelu => k.konst(node.attrs.float_or("alpha", 0.01)?),
                _ => arg(1)?,
            };
            let zero = k.konst(0.0);
            let pos = k.bin(BinOp::Max, x, zero);
            let neg = k.bin(BinOp::Min, x, zero);
            let t = k.bin(BinOp::Mul, a, neg);
            k.bin(BinOp::Add, pos, t)
        }
        Selu => {
            // gamma·(max(x, 0) + alpha·(exp(min(x, 0)) − 1)).
            let alpha = k.konst(node.attrs.float_or("alpha", 1.673_263_2)?);
            let gamma = k.konst(node.attrs.float_or("gamma", 1.050_701)?);
            let zero = k.konst(0.0);
            let one = k.konst(1.0);
            let pos = k.bin(BinOp::Max, x, zero);
            let neg = k.bin(BinOp::Min, x, zero);
            let e = k.un(UnOp::Exp, neg);
            let em1 = k.bin(BinOp::Sub, e, one);
            let t = k.bin(BinOp::Mul, alpha, em1);
            let s = k.bin(BinOp::Add, pos, t);
            k.bin(BinOp::Mul, gamma, s)
        }
        Celu => {
            // max(x, 0) + min(0, alpha·(exp(x/alpha) − 1)), which for alpha > 0 (see
            // `lowerable`) is max(x, 0) + alpha·(exp(min(x, 0)/alpha) − 1): exp never sees
            // a large positive argument.
            let alpha = k.konst(node.attrs.float_or("alpha", 1.0)?);
            let zero = k.konst(0.0);
            let one = k.konst(1.0);
            let pos = k.bin(BinOp::Max, x, zero);
            let neg = k.bin(BinOp::Min, x, zero);
            let xa = k.bin(BinOp::Div, neg, alpha);
            let e = k.un(UnOp::Exp, xa);
            let em1 = k.bin(BinOp::Sub, e, one);
            let t = k.bin(BinOp::Mul, alpha, em1);
            k.bin(BinOp::Add, pos, t)
        }
        Mish => {
            let sp = k.un(UnOp::Softplus, x);
            let t = k.un(UnOp::Tanh, sp);
            k.bin(BinOp::Mul, x, t)
        }
        Softsign => {
            let one = k.konst(1.0);
            let a = k.un(UnOp::Abs, x);
            let d = k.bin(BinOp::Add, one, a);
            k.bin(BinOp::Div, x, d)
        }
        HardSigmoid | HardSwish => {
            // clamp(alpha·x + beta, 0, 1), times x for hard_swish (alpha 1/6, beta 1/2).
            let (alpha, beta) = match node.op {
                HardSigmoid => (
                    node.attrs.float_or("alpha", 0.2)?,
                    node.attrs.float_or("beta", 0.5)?,
                ),
                _ => (1.0 / 6.0, 0.5),
            };
            let (alpha, beta) = (k.konst(alpha), k.konst(beta));
            let zero = k.konst(0.0);
            let one = k.konst(1.0);
            let ax = k.bin(BinOp::Mul, alpha, x);
            let v = k.bin(BinOp::Add, ax, beta);
            let lo = k.bin(BinOp::Max, v, zero);
            let h = k.bin(BinOp::Min, lo, one);
            match node.op {
                HardSigmoid => h,
                _ => k.bin(BinOp::Mul, x, h),
            }
        }
        Clip => {
            // The interpreter's comparisons: a NaN x stays NaN, a NaN bound is ignored.
            let mut y = x;
            if let Some(lo) = ins.get(1).copied().flatten() {
                y = k.bin(BinOp::ClampBelow, y, lo);
            }
            if let Some(hi) = ins.get(2).copied().flatten() {
                y = k.bin(BinOp::ClampAbove, y, hi);
            }
            y
        }
        Sign => {
            // clamp(x·2^126·2^126, −1, 1): ±1 for every nonzero x (the smallest subnormal
            // scales to 2^103), ±0 kept, NaN kept.
            let big = k.konst(2f32.powi(126));
            let one = k.konst(1.0);
            let m1 = k.konst(-1.0);
            let a = k.bin(BinOp::Mul, x, big);
            let b = k.bin(BinOp::Mul, a, big);
            let lo = k.bin(BinOp::Max, b, m1);
            k.bin(BinOp::Min, lo, one)
        }
        Sum | Mean => {
            let mut y = x;
            for i in 1..ins.len() {
                y = k.bin(BinOp::Add, y, arg(i)?);
            }
            if node.op == Mean {
                let n = k.konst(ins.len() as f32);
                y = k.bin(BinOp::Div, y, n);
            }
            y
        }
        LayerNorm | RmsNorm => {
            let eps = k.konst(node.attrs.float_or("epsilon", 1e-5)?);
            let n = k.push(Expr::RowLen);
            let d = if node.op == LayerNorm {
                let s = k.reduce(RedOp::Sum, x);
                let mean = k.bin(BinOp::Div, s, n);
                k.bin(BinOp::Sub, x, mean)
            } else {
                x
            };
            let d2 = k.bin(BinOp::Mul, d, d);
            let ss = k.reduce(RedOp::Sum, d2);
            let var = k.bin(BinOp::Div, ss, n);
            let ve = k.bin(BinOp::Add, var, eps);
            let sd = k.un(UnOp::Sqrt, ve);
            let inv = k.un(UnOp::Recip, sd);
            let y = k.bin(BinOp::Mul, d, inv);
            let y = k.bin(BinOp::Mul, y, arg(1)?);
            match (node.op, ins.get(2).copied().flatten()) {
                (LayerNorm, Some(b)) => k.bin(BinOp::Add, y, b),
                _ => y,
            }
        }
        op => return Err(format!("no loop lowering for `{}`", op.name())),
    })
}
