//! What a person sees of a graph: one box per computing node (constants are hidden and
//! folded into their users' labels), one box per graph input and output, and edges
//! between them. Both the DOT text (`--dot`) and the HTML report's SVG draw this view.
//! [`collapse_shape_arithmetic`] folds each connected chain of shape arithmetic (shape,
//! gather, unsqueeze, concat, range... on small integer tensors) into one box.

use kiln_ir::{Graph, OpKind, ValueId};
use std::collections::HashMap;
use std::fmt::Write;

/// The attribute canonicalisation sets on fused ops (see `kiln_passes::canon::FUSED_FROM`).
pub const FUSED_FROM: &str = kiln_passes::canon::FUSED_FROM;

/// What kind of box a node is drawn as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A graph input.
    Input,
    /// A graph output.
    Output,
    /// An ordinary op.
    Op,
    /// An op that absorbed others (has `fused_from`).
    Fused,
    /// A collapsed chain of shape arithmetic.
    Shape,
}

/// One box.
#[derive(Clone, Debug)]
pub struct VNode {
    /// First line: the op (or the input/output name).
    pub title: String,
    /// Second line: the output type, and folded constants.
    pub sub: String,
    /// Shown on hover: node name, folded constants, what it absorbed.
    pub detail: String,
    /// Box style.
    pub kind: Kind,
    /// Whether the node computes shape arithmetic (an integer tensor of rank ≤ 1).
    pub shape_math: bool,
}

/// A graph as boxes and edges (`from` index, `to` index). Invariant: edges go from a lower
/// to a higher index (nodes are in topological order).
#[derive(Clone, Debug, Default)]
pub struct View {
    /// The boxes.
    pub nodes: Vec<VNode>,
    /// The edges.
    pub edges: Vec<(usize, usize)>,
}

/// A short description of a constant operand: its value if small, else its type.
fn describe_const(g: &Graph, v: ValueId) -> String {
    let name = &g.value(v).name;
    match g.constant_value(v) {
        Some(t) if t.len() <= 4 => {
            let vals: Vec<String> = if t.dtype().is_float() {
                t.to_f64s().iter().map(|x| format!("{x:.4}")).collect()
            } else {
                t.to_i64s().iter().map(|x| x.to_string()).collect()
            };
            if t.shape().is_empty() {
                vals.join("")
            } else {
                format!("[{}]", vals.join(","))
            }
        }
        _ => {
            let ty = g.ty(v).to_string();
            if name.len() > 24 {
                ty
            } else {
                format!("{name}: {ty}")
            }
        }
    }
}

/// The view of `g`.
pub fn view(g: &Graph) -> View {
    let mut out = View::default();
    let mut at: HashMap<ValueId, usize> = HashMap::new();
    for &i in &g.inputs {
        at.insert(i, out.nodes.len());
        out.nodes.push(VNode {
            title: g.value(i).name.clone(),
            sub: g.ty(i).to_string(),
            detail: format!("input %{}: {}", g.value(i).name, g.ty(i)),
            kind: Kind::Input,
            shape_math: false,
        });
    }
    for n in &g.nodes {
        if n.op == OpKind::Constant {
            continue;
        }
        let me = out.nodes.len();
        let mut consts = vec![];
        for &v in n.inputs.iter().flatten() {
            if g.constant_value(v).is_some() && !at.contains_key(&v) {
                consts.push(describe_const(g, v));
            } else if let Some(&from) = at.get(&v) {
                if !out.edges.contains(&(from, me)) {
                    out.edges.push((from, me));
                }
            }
        }
        let fused = n.attrs.strings(FUSED_FROM).ok().flatten();
        let ty = n
            .outputs
            .first()
            .map(|&o| g.ty(o).to_string())
            .unwrap_or_default();
        let mut detail = String::new();
        let _ = write!(
            detail,
            "{} {}",
            n.op.name(),
            if n.name.is_empty() {
                "(unnamed)"
            } else {
                &n.name
            }
        );
        for &o in &n.outputs {
            let _ = write!(detail, "\n-> %{}: {}", g.value(o).name, g.ty(o));
        }
        if !consts.is_empty() {
            let _ = write!(detail, "\nconstants: {}", consts.join("; "));
        }
        if let Some(f) = &fused {
            let _ = write!(
                detail,
                "\nfused from {} nodes:\n  {}",
                f.len(),
                f.join("\n  ")
            );
        }
        let mut sub = ty;
        if !consts.is_empty() {
            let _ = write!(sub, " · {}", consts.join(", "));
        }
        for &o in &n.outputs {
            at.insert(o, me);
        }
        out.nodes.push(VNode {
            title: match &fused {
                Some(f) => format!("{} ({} fused)", n.op.name(), f.len()),
                None => n.op.name().to_string(),
            },
            sub,
            detail,
            kind: if fused.is_some() {
                Kind::Fused
            } else {
                Kind::Op
            },
            shape_math: fused.is_none() && is_shape_math(g, n),
        });
    }
    for &o in &g.outputs {
        let me = out.nodes.len();
        out.nodes.push(VNode {
            title: g.value(o).name.clone(),
            sub: g.ty(o).to_string(),
            detail: format!("output %{}: {}", g.value(o).name, g.ty(o)),
            kind: Kind::Output,
            shape_math: false,
        });
        if let Some(&from) = at.get(&o) {
            out.edges.push((from, me));
        }
    }
    out
}

/// Whether `n` is shape arithmetic: a shape query, or an index/arithmetic/movement op
/// whose every output is an integer tensor of rank 0 or 1.
fn is_shape_math(g: &Graph, n: &kiln_ir::Node) -> bool {
    use OpKind::*;
    if n.op == Shape || n.op == Size {
        return true;
    }
    let small_int = |o: &ValueId| {
        let ty = g.ty(*o);
        matches!(ty.dtype, kiln_ir::DType::I64 | kiln_ir::DType::I32)
            && ty.shape.rank().is_some_and(|r| r <= 1)
    };
    matches!(
        n.op,
        Gather
            | Unsqueeze
            | Squeeze
            | Concat
            | Range
            | Cast
            | Slice
            | Add
            | Sub
            | Mul
            | Div
            | Equal
            | Where
            | Reshape
            | Expand
            | ConstantOfShape
            | Neg
            | Max
            | Min
            | ReduceProd
            | Floor
            | Ceil
            | Mod
            | Identity
    ) && !n.outputs.is_empty()
        && n.outputs.iter().all(small_int)
}

/// `v` with each connected group of shape-arithmetic boxes (see [`VNode::shape_math`])
/// replaced by one [`Kind::Shape`] box listing its members, or `None` when no group has two
/// or more boxes. A group whose merging would close a cycle is left as it is.
pub fn collapse_shape_arithmetic(v: &View) -> Option<View> {
    let n = v.nodes.len();
    // Groups by consumer: each box that is not shape arithmetic takes the shape-arithmetic
    // boxes that feed it (through shape arithmetic only) and no earlier consumer took.
    let mut preds: Vec<Vec<usize>> = vec![vec![]; n];
    for &(a, b) in &v.edges {
        preds[b].push(a);
    }
    let mut group: Vec<usize> = (0..n).collect();
    let mut taken = vec![false; n];
    for c in (0..n).filter(|&c| !v.nodes[c].shape_math) {
        let mut stack: Vec<usize> = preds[c]
            .iter()
            .copied()
            .filter(|&p| v.nodes[p].shape_math)
            .collect();
        let mut members = vec![];
        while let Some(x) = stack.pop() {
            if taken[x] {
                continue;
            }
            taken[x] = true;
            members.push(x);
            stack.extend(preds[x].iter().copied().filter(|&p| v.nodes[p].shape_math));
        }
        if let Some(&root) = members.iter().min() {
            for &m in &members {
                group[m] = root;
            }
        }
    }
    let mut size = vec![0usize; n];
    for &r in &group {
        size[r] += 1;
    }
    // A singleton stays a plain box.
    for i in 0..n {
        if size[group[i]] < 2 || !v.nodes[i].shape_math {
            group[i] = i;
        }
    }
    // Reject groups whose merging closes a cycle: a path leaving the group and coming back.
    let mut succ: Vec<Vec<usize>> = vec![vec![]; n];
    for &(a, b) in &v.edges {
        succ[a].push(b);
    }
    let roots: Vec<usize> = (0..n)
        .filter(|&r| group[r] == r && size[r] >= 2 && v.nodes[r].shape_math)
        .collect();
    for &r in &roots {
        // Nodes reachable from the group through at least one outside node.
        let mut seen = vec![false; n];
        let mut stack: Vec<usize> = (0..n)
            .filter(|&i| group[i] == r)
            .flat_map(|i| succ[i].iter().copied())
            .filter(|&j| group[j] != r)
            .collect();
        let mut cycle = false;
        while let Some(x) = stack.pop() {
            if seen[x] {
                continue;
            }
            seen[x] = true;
            for &y in &succ[x] {
                if group[y] == r {
                    cycle = true;
                } else {
                    stack.push(y);
                }
            }
        }
        if cycle {
            for (i, g) in group.iter_mut().enumerate() {
                if *g == r {
                    *g = i;
                }
            }
        }
    }
    if (0..n).all(|i| group[i] == i) {
        return None;
    }
    // New boxes in topological order: Kahn's algorithm over the group graph.
    let reps: Vec<usize> = (0..n).filter(|&i| group[i] == i).collect();
    let rep_of = |i: usize| group[i];
    let mut indeg: HashMap<usize, usize> = reps.iter().map(|&r| (r, 0)).collect();
    let mut gedges: Vec<(usize, usize)> = vec![];
    for &(a, b) in &v.edges {
        let (ra, rb) = (rep_of(a), rep_of(b));
        if ra != rb && !gedges.contains(&(ra, rb)) {
            gedges.push((ra, rb));
            *indeg.entry(rb).or_default() += 1;
        }
    }
    let mut order = vec![];
    let mut ready: Vec<usize> = reps.iter().copied().filter(|r| indeg[r] == 0).collect();
    ready.sort_unstable_by(|a, b| b.cmp(a));
    while let Some(r) = ready.pop() {
        order.push(r);
        for &(a, b) in &gedges {
            if a == r {
                let d = indeg
                    .get_mut(&b)
                    .expect("every endpoint is a representative");
                *d -= 1;
                if *d == 0 {
                    ready.push(b);
                    ready.sort_unstable_by(|a, b| b.cmp(a));
                }
            }
        }
    }
    if order.len() != reps.len() {
        return None;
    }
    let index: HashMap<usize, usize> = order.iter().enumerate().map(|(k, &r)| (r, k)).collect();
    let mut out = View::default();
    for &r in &order {
        let members: Vec<usize> = (0..n).filter(|&i| group[i] == r).collect();
        if members.len() == 1 {
            out.nodes.push(v.nodes[r].clone());
            continue;
        }
        out.nodes.push(VNode {
            title: format!("shape arithmetic ({} ops)", members.len()),
            sub: "click to expand".into(),
            detail: format!(
                "{} shape-arithmetic ops collapsed (click to show every box):\n  {}",
                members.len(),
                members
                    .iter()
                    .map(|&i| v.nodes[i].detail.lines().next().unwrap_or(""))
                    .collect::<Vec<_>>()
                    .join("\n  ")
            ),
            kind: Kind::Shape,
            shape_math: true,
        });
    }
    for &(a, b) in &gedges {
        out.edges.push((index[&a], index[&b]));
    }
    Some(out)
}

fn dot_escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Graphviz DOT text of `g` (constants folded into their users' labels).
pub fn to_dot(g: &Graph) -> String {
    let v = view(g);
    let mut s = String::new();
    let _ = writeln!(s, "digraph \"{}\" {{", dot_escape(&g.name));
    let _ = writeln!(
        s,
        "  rankdir=TB;\n  node [shape=box, style=\"rounded,filled\", fontname=\"Helvetica\", fontsize=10, fillcolor=\"#eef2f7\"];"
    );
    for (i, n) in v.nodes.iter().enumerate() {
        let fill = match n.kind {
            Kind::Input => "#d8f0d8",
            Kind::Output => "#d8e4f8",
            Kind::Fused => "#ffe0b0",
            Kind::Op => "#eef2f7",
            Kind::Shape => "#ece6f7",
        };
        let _ = writeln!(
            s,
            "  n{i} [label=\"{}\\n{}\", tooltip=\"{}\", fillcolor=\"{fill}\"];",
            dot_escape(&n.title),
            dot_escape(&n.sub),
            dot_escape(&n.detail)
        );
    }
    for (a, b) in &v.edges {
        let _ = writeln!(s, "  n{a} -> n{b};");
    }
    s.push_str("}\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::{Attrs, DType, Shape, TensorType};

    fn ty(dt: DType, dims: &[usize]) -> TensorType {
        TensorType::new(dt, Shape::fixed(dims))
    }

    /// `y = reshape(x, concat(unsqueeze(gather(shape(x), 0)), [-1]))`.
    fn reshape_by_shape_math() -> Graph {
        let mut g = Graph::new("g");
        let x = g.add_input("x", ty(DType::F32, &[2, 3, 4]));
        let op = |g: &mut Graph, op: OpKind, ins: Vec<ValueId>, name: &str, t: TensorType| {
            g.add_node(
                op,
                Attrs::new(),
                ins.into_iter().map(Some).collect(),
                vec![(name.into(), t)],
                name,
            )[0]
        };
        let s = op(&mut g, OpKind::Shape, vec![x], "s", ty(DType::I64, &[3]));
        let zero = g.add_constant("zero", kiln_ir::Tensor::scalar(0i64));
        let b = op(
            &mut g,
            OpKind::Gather,
            vec![s, zero],
            "b",
            ty(DType::I64, &[]),
        );
        let axes = g.add_constant("axes", kiln_ir::Tensor::from_vec(vec![1], vec![0i64]));
        let u = op(
            &mut g,
            OpKind::Unsqueeze,
            vec![b, axes],
            "u",
            ty(DType::I64, &[1]),
        );
        let m1 = g.add_constant("m1", kiln_ir::Tensor::from_vec(vec![1], vec![-1i64]));
        let c = op(
            &mut g,
            OpKind::Concat,
            vec![u, m1],
            "c",
            ty(DType::I64, &[2]),
        );
        let y = op(
            &mut g,
            OpKind::Reshape,
            vec![x, c],
            "y",
            ty(DType::F32, &[2, 12]),
        );
        g.outputs = vec![y];
        g
    }

    #[test]
    fn a_shape_chain_becomes_one_box_and_edges_stay_forward() {
        let v = view(&reshape_by_shape_math());
        // x, shape, gather, unsqueeze, concat, reshape, y.
        assert_eq!(v.nodes.len(), 7);
        let c = collapse_shape_arithmetic(&v).expect("a chain of four");
        assert_eq!(c.nodes.len(), 4, "x, shape arithmetic, reshape, y");
        let shape: Vec<&VNode> = c.nodes.iter().filter(|n| n.kind == Kind::Shape).collect();
        assert_eq!(shape.len(), 1);
        assert!(shape[0].title.contains("4 ops"), "{}", shape[0].title);
        assert!(c.edges.iter().all(|&(a, b)| a < b), "{:?}", c.edges);
        assert_eq!(
            c.edges.len(),
            4,
            "x→shape, x→reshape, shape→reshape, reshape→y: {:?}",
            c.edges
        );
    }

    #[test]
    fn nothing_to_collapse_gives_none() {
        let mut g = Graph::new("g");
        let x = g.add_input("x", ty(DType::F32, &[2]));
        let y = g.add_node(
            OpKind::Relu,
            Attrs::new(),
            vec![Some(x)],
            vec![("y".into(), ty(DType::F32, &[2]))],
            "",
        )[0];
        g.outputs = vec![y];
        assert!(collapse_shape_arithmetic(&view(&g)).is_none());
    }
}
