//! What a person sees of a graph: one box per computing node (constants are hidden and
//! folded into their users' labels), one box per graph input and output, and edges
//! between them. Both the DOT text (`--dot`) and the HTML report's SVG draw this view.

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
        });
    }
    for &o in &g.outputs {
        let me = out.nodes.len();
        out.nodes.push(VNode {
            title: g.value(o).name.clone(),
            sub: g.ty(o).to_string(),
            detail: format!("output %{}: {}", g.value(o).name, g.ty(o)),
            kind: Kind::Output,
        });
        if let Some(&from) = at.get(&o) {
            out.edges.push((from, me));
        }
    }
    out
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
