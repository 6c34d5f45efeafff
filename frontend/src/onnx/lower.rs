//! Phase one of the import: ONNX graphs to IR-shaped node lists, still named by string.
//! Checks every definition and use (missing inputs, duplicates, cycles), sorts the nodes
//! topologically, turns initializers and `Constant` nodes into `constant` nodes, converts
//! attributes, migrates older opsets (see [`super::migrate`]) and computes the outer
//! values each subgraph (an `If` branch, a `Loop` or `Scan` body) captures.

use super::migrate;
use super::proto::{
    attr_type, tensor_shape_proto::dimension::Value as DimValue, type_proto, GraphProto,
    ModelProto, NodeProto, ValueInfoProto,
};
use super::tensor::{dtype_of, tensor_from_proto};
use super::{OnnxError, UnsupportedOp};
use kiln_ir::{Attr, Attrs, Dim, OpKind, Shape, TensorType};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

/// A node in IR form whose operands are value names.
#[derive(Clone, Debug)]
pub(crate) struct LNode {
    pub op: OpKind,
    pub attrs: Attrs,
    /// `None` is an omitted optional operand.
    pub inputs: Vec<Option<String>>,
    pub outputs: Vec<String>,
    /// The ONNX node name (may be empty).
    pub name: String,
    /// Graph attributes, still to be built in the scope of this node.
    pub subgraphs: Vec<(String, LGraph)>,
}

/// A graph in IR form: inputs (the top graph's real inputs, or a subgraph's captured
/// outer values), nodes in topological order, outputs.
#[derive(Clone, Debug, Default)]
pub(crate) struct LGraph {
    pub name: String,
    /// Declared inputs (top graph only).
    pub inputs: Vec<(String, TensorType)>,
    /// A loop or scan body's own inputs, with the types the model declares for them
    /// (`None`: the build derives them from the node's operands).
    pub params: Vec<(String, Option<TensorType>)>,
    /// Outer values used inside (subgraphs only); they become the IR graph's inputs.
    pub captures: Vec<String>,
    pub nodes: Vec<LNode>,
    pub outputs: Vec<String>,
    /// Types the model declares for values (value_info and graph outputs).
    pub declared: HashMap<String, TensorType>,
}

/// Import-wide state: the opset and a supply of fresh, unused value names.
pub(crate) struct Ctx<'a> {
    pub opset: i64,
    pub base_dir: Option<&'a Path>,
    used: HashSet<String>,
    counter: usize,
}

impl Ctx<'_> {
    /// A value name used nowhere in the model, derived from `base`.
    pub fn fresh(&mut self, base: &str) -> String {
        let base = if base.is_empty() { "v" } else { base };
        loop {
            let n = format!("{base}__{}", self.counter);
            self.counter += 1;
            if self.used.insert(n.clone()) {
                return n;
            }
        }
    }
}

/// `Op` for the default domain, `domain.Op` for others.
pub(crate) fn op_key(n: &NodeProto) -> String {
    if is_default_domain(&n.domain) {
        n.op_type.clone()
    } else {
        format!("{}.{}", n.domain, n.op_type)
    }
}

fn is_default_domain(d: &str) -> bool {
    d.is_empty() || d == "ai.onnx"
}

/// Calls `f` on every node of `g` and of its subgraphs.
pub(crate) fn walk_nodes<'a>(g: &'a GraphProto, f: &mut dyn FnMut(&'a NodeProto)) {
    for n in &g.node {
        f(n);
        for a in &n.attribute {
            if let Some(sg) = &a.g {
                walk_nodes(sg, f);
            }
            for sg in &a.graphs {
                walk_nodes(sg, f);
            }
        }
    }
}

fn walk_graphs<'a>(g: &'a GraphProto, f: &mut dyn FnMut(&'a GraphProto)) {
    f(g);
    for n in &g.node {
        for a in &n.attribute {
            if let Some(sg) = &a.g {
                walk_graphs(sg, f);
            }
            for sg in &a.graphs {
                walk_graphs(sg, f);
            }
        }
    }
}

/// Like [`walk_nodes`], with each node's index in its own graph's node list.
fn walk_indexed<'a>(g: &'a GraphProto, f: &mut dyn FnMut(usize, &'a NodeProto)) {
    for (i, n) in g.node.iter().enumerate() {
        f(i, n);
        for a in &n.attribute {
            if let Some(sg) = &a.g {
                walk_indexed(sg, f);
            }
            for sg in &a.graphs {
                walk_indexed(sg, f);
            }
        }
    }
}

/// Every op type kiln cannot import, with counts and first users, most used first.
pub(crate) fn unsupported_ops(g: &GraphProto) -> Vec<UnsupportedOp> {
    let mut found: Vec<UnsupportedOp> = vec![];
    let mut index: HashMap<String, usize> = HashMap::new();
    walk_indexed(g, &mut |at, n| {
        if is_default_domain(&n.domain) && OpKind::from_onnx(&n.op_type).is_some() {
            return;
        }
        let key = op_key(n);
        match index.get(&key) {
            Some(&i) => found[i].count += 1,
            None => {
                index.insert(key.clone(), found.len());
                found.push(UnsupportedOp {
                    op: key,
                    count: 1,
                    first_node: n.name.clone(),
                    first_index: at,
                    first_output: n.output.first().cloned().unwrap_or_default(),
                });
            }
        }
    });
    found.sort_by(|a, b| b.count.cmp(&a.count).then(a.op.cmp(&b.op)));
    found
}

/// Lowers a whole model.
pub(crate) fn lower_model(m: &ModelProto, base_dir: Option<&Path>) -> Result<LGraph, OnnxError> {
    let g = m.graph.as_ref().ok_or(OnnxError::NoGraph)?;
    let ops = unsupported_ops(g);
    if !ops.is_empty() {
        return Err(OnnxError::UnsupportedOps { ops });
    }
    let opset = m
        .opset_import
        .iter()
        .filter(|o| is_default_domain(&o.domain))
        .map(|o| o.version)
        .max();
    let opset = match opset {
        Some(v) if !(1..=super::NEWEST_OPSET).contains(&v) => {
            return Err(OnnxError::UnsupportedOpset {
                version: v,
                newest: super::NEWEST_OPSET,
            })
        }
        Some(v) => v,
        None if g.node.is_empty() => i64::MAX,
        None => return Err(OnnxError::NoOpset),
    };
    let mut used = HashSet::new();
    walk_graphs(g, &mut |g| {
        for n in &g.node {
            used.extend(n.input.iter().cloned());
            used.extend(n.output.iter().cloned());
        }
        used.extend(g.initializer.iter().map(|t| t.name.clone()));
        used.extend(g.input.iter().map(|v| v.name.clone()));
        used.extend(g.output.iter().map(|v| v.name.clone()));
    });
    let mut ctx = Ctx {
        opset,
        base_dir,
        used,
        counter: 0,
    };
    lower_graph(g, None, &mut ctx)
}

/// Names visible in a graph: its own definitions, then its parents'.
struct Scope<'p> {
    defs: &'p HashMap<String, Def>,
    parent: Option<&'p Scope<'p>>,
}

impl Scope<'_> {
    fn contains(&self, name: &str) -> bool {
        self.defs.contains_key(name) || self.parent.is_some_and(|p| p.contains(name))
    }
}

#[derive(Clone, Copy, Debug)]
enum Def {
    Input,
    Init,
    /// Output of the node at this index of `GraphProto::node`.
    Node(usize),
}

fn label(n: &NodeProto) -> String {
    if !n.name.is_empty() {
        n.name.clone()
    } else {
        n.output
            .iter()
            .find(|o| !o.is_empty())
            .map(|o| format!("%{o}"))
            .unwrap_or_else(|| "<unnamed>".into())
    }
}

/// Lowers one graph. `parent` is the enclosing scope for subgraphs (`None` at the top).
fn lower_graph(
    g: &GraphProto,
    parent: Option<&Scope<'_>>,
    ctx: &mut Ctx<'_>,
) -> Result<LGraph, OnnxError> {
    let top = parent.is_none();
    let mut defs: HashMap<String, Def> = HashMap::new();
    let dup = |name: &str, by: String| OnnxError::DuplicateValue {
        name: name.to_string(),
        by,
    };
    if let Some(s) = g.sparse_initializer.first() {
        let name = s
            .values
            .as_ref()
            .map(|v| v.name.clone())
            .unwrap_or_default();
        return Err(OnnxError::Tensor {
            tensor: name,
            msg: "sparse initializers are not supported".into(),
        });
    }
    for t in &g.initializer {
        if defs.insert(t.name.clone(), Def::Init).is_some() {
            return Err(dup(&t.name, "a second initializer".into()));
        }
    }
    // Graph inputs that also have an initializer are constants (a default value).
    let mut inputs = vec![];
    let mut params = vec![];
    // Named dims of the inputs: the fresh names given to unknown dims must differ.
    let input_params: HashSet<&str> = g
        .input
        .iter()
        .filter_map(|vi| match &vi.r#type.as_ref()?.value {
            Some(type_proto::Value::TensorType(t)) => t.shape.as_ref(),
            _ => None,
        })
        .flat_map(|s| &s.dim)
        .filter_map(|d| match &d.value {
            Some(DimValue::DimParam(p)) => Some(p.as_str()),
            _ => None,
        })
        .collect();
    for vi in &g.input {
        if matches!(defs.get(&vi.name), Some(Def::Init)) {
            continue;
        }
        if defs.insert(vi.name.clone(), Def::Input).is_some() {
            return Err(dup(&vi.name, "a second graph input".into()));
        }
        if !top {
            // A body's inputs shadow outer names; a declared type is a hint the build
            // checks against the operands.
            params.push((vi.name.clone(), value_type(vi)?));
            continue;
        }
        let ty = value_type_as_input(vi, &input_params)?.ok_or_else(|| OnnxError::Type {
            value: vi.name.clone(),
            msg: "graph input has no tensor type".into(),
        })?;
        inputs.push((vi.name.clone(), ty));
    }
    // Node outputs: trailing unnamed optional outputs are dropped, inner ones named.
    let mut outputs: Vec<Vec<String>> = Vec::with_capacity(g.node.len());
    for (i, n) in g.node.iter().enumerate() {
        let keep = n
            .output
            .iter()
            .rposition(|o| !o.is_empty())
            .map_or(0, |p| p + 1);
        let mut outs = Vec::with_capacity(keep);
        for o in &n.output[..keep] {
            let o = if o.is_empty() {
                ctx.fresh(&format!("{}_unused", n.op_type))
            } else {
                o.clone()
            };
            if defs.insert(o.clone(), Def::Node(i)).is_some() {
                return Err(dup(&o, format!("node `{}` ({})", label(n), n.op_type)));
            }
            outs.push(o);
        }
        outputs.push(outs);
    }

    let scope = Scope {
        defs: &defs,
        parent,
    };
    // Subgraphs first: what they capture are extra operands of their node.
    let mut subgraphs: Vec<Vec<(String, LGraph)>> = Vec::with_capacity(g.node.len());
    let mut captures_of: Vec<Vec<String>> = Vec::with_capacity(g.node.len());
    for n in &g.node {
        let node_err = |msg: String| OnnxError::Node {
            node: label(n),
            op: n.op_type.clone(),
            msg,
        };
        let mut subs = vec![];
        for a in &n.attribute {
            if super::attrs::kind(a) == attr_type::GRAPHS {
                return Err(node_err(format!(
                    "attribute `{}` holds several graphs, which kiln does not support",
                    a.name
                )));
            }
            if super::attrs::kind(a) != attr_type::GRAPH {
                continue;
            }
            if !matches!(n.op_type.as_str(), "If" | "Loop" | "Scan") {
                return Err(node_err(format!(
                    "graph attribute `{}` is only supported on If, Loop and Scan",
                    a.name
                )));
            }
            let sg = a
                .g
                .as_ref()
                .ok_or_else(|| node_err(format!("graph attribute `{}` has no graph", a.name)))?;
            let lg = lower_graph(sg, Some(&scope), ctx)?;
            subs.push((a.name.clone(), lg));
        }
        // All branches take the same captures, in the same order.
        let mut caps: Vec<String> = vec![];
        for (_, lg) in &subs {
            for c in &lg.captures {
                if !caps.contains(c) {
                    caps.push(c.clone());
                }
            }
        }
        for (_, lg) in &mut subs {
            lg.captures = caps.clone();
        }
        subgraphs.push(subs);
        captures_of.push(caps);
    }

    // Resolve every use: a definition here (a dependency), an outer value (a capture of
    // this graph), or an error.
    let mut my_captures: Vec<String> = vec![];
    let mut capture_set: HashSet<String> = HashSet::new();
    let mut deps: Vec<Vec<usize>> = vec![vec![]; g.node.len()];
    for (i, n) in g.node.iter().enumerate() {
        let uses = n
            .input
            .iter()
            .filter(|s| !s.is_empty())
            .chain(captures_of[i].iter());
        for name in uses {
            match defs.get(name) {
                Some(Def::Node(p)) => deps[i].push(*p),
                Some(_) => {}
                None if parent.is_some_and(|p| p.contains(name)) => {
                    if capture_set.insert(name.clone()) {
                        my_captures.push(name.clone());
                    }
                }
                None => {
                    return Err(OnnxError::MissingInput {
                        name: name.clone(),
                        node: label(n),
                        op: n.op_type.clone(),
                    })
                }
            }
        }
    }
    for o in &g.output {
        if !defs.contains_key(&o.name) {
            if parent.is_some_and(|p| p.contains(&o.name)) {
                if capture_set.insert(o.name.clone()) {
                    my_captures.push(o.name.clone());
                }
            } else {
                return Err(OnnxError::MissingOutput(o.name.clone()));
            }
        }
    }
    let order = topo_order(g, &deps)?;

    let mut declared = HashMap::new();
    for vi in &g.value_info {
        // Non-tensor or untyped value_info is a hint kiln cannot use: skip it.
        if let Some(t) = value_type(vi)? {
            declared.insert(vi.name.clone(), t);
        }
    }
    for vi in &g.output {
        if let Some(t) = value_type(vi)? {
            declared.insert(vi.name.clone(), t);
        }
    }

    let mut nodes = Vec::with_capacity(g.initializer.len() + g.node.len());
    for t in &g.initializer {
        let value = tensor_from_proto(t, ctx.base_dir)?;
        nodes.push(LNode {
            op: OpKind::Constant,
            attrs: Attrs::new().with("value", Attr::Tensor(Arc::new(value))),
            inputs: vec![],
            outputs: vec![t.name.clone()],
            name: String::new(),
            subgraphs: vec![],
        });
    }
    let mut subgraphs: Vec<Option<Vec<(String, LGraph)>>> =
        subgraphs.into_iter().map(Some).collect();
    for i in order {
        let n = &g.node[i];
        let subs = subgraphs[i].take().unwrap_or_default();
        let caps = std::mem::take(&mut captures_of[i]);
        let outs = std::mem::take(&mut outputs[i]);
        migrate::convert_node(n, outs, subs, caps, ctx, &mut nodes)?;
    }
    Ok(LGraph {
        name: g.name.clone(),
        inputs,
        params,
        captures: my_captures,
        nodes,
        outputs: g.output.iter().map(|o| o.name.clone()).collect(),
        declared,
    })
}

/// Kahn's algorithm, taking ready nodes in file order so sorted files keep their order.
/// On a cycle, names a node that is on it (not merely downstream of it).
fn topo_order(g: &GraphProto, deps: &[Vec<usize>]) -> Result<Vec<usize>, OnnxError> {
    let n = deps.len();
    let mut pending: Vec<usize> = deps.iter().map(|d| d.len()).collect();
    let mut users: Vec<Vec<usize>> = vec![vec![]; n];
    for (i, d) in deps.iter().enumerate() {
        for &p in d {
            users[p].push(i);
        }
    }
    let mut ready: BinaryHeap<Reverse<usize>> =
        (0..n).filter(|&i| pending[i] == 0).map(Reverse).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(Reverse(i)) = ready.pop() {
        order.push(i);
        for &u in &users[i] {
            pending[u] -= 1;
            if pending[u] == 0 {
                ready.push(Reverse(u));
            }
        }
    }
    if order.len() == n {
        return Ok(order);
    }
    // Walk back along unfinished dependencies until a node repeats: it is on a cycle.
    let mut seen = vec![false; n];
    let mut at = (0..n).find(|&i| pending[i] > 0).unwrap_or(0);
    while !seen[at] {
        seen[at] = true;
        match deps[at].iter().find(|&&p| pending[p] > 0) {
            Some(&p) => at = p,
            None => break,
        }
    }
    let node = &g.node[at];
    Err(OnnxError::Cycle {
        node: label(node),
        op: node.op_type.clone(),
    })
}

/// The tensor type a value info declares: `None` when it declares no usable tensor type
/// (no type, element type 0); an error for non-tensor kinds. A negative size (`-1`, as
/// Paddle and other exporters write "unknown") is an unknown dim, which the shape rules then
/// fill in.
pub(crate) fn value_type(vi: &ValueInfoProto) -> Result<Option<TensorType>, OnnxError> {
    declared_type(vi, None)
}

/// [`value_type`] for a graph input: a negative size or `0` (which some exporters write for
/// "unknown") becomes a fresh symbolic dim `unk_<input>_<axis>`, so that
/// it binds at run time and the shape rules can relate it to other dims. Names in `taken`
/// (the inputs' own dim params) are avoided by appending `_`.
fn value_type_as_input(
    vi: &ValueInfoProto,
    taken: &HashSet<&str>,
) -> Result<Option<TensorType>, OnnxError> {
    declared_type(vi, Some(taken))
}

fn declared_type(
    vi: &ValueInfoProto,
    input: Option<&HashSet<&str>>,
) -> Result<Option<TensorType>, OnnxError> {
    let fresh = |axis: usize| {
        let taken = input?;
        let mut name = format!("unk_{}_{axis}", vi.name);
        while taken.contains(name.as_str()) {
            name.push('_');
        }
        Some(Dim::Sym(name))
    };
    let Some(tp) = &vi.r#type else {
        return Ok(None);
    };
    let t = match &tp.value {
        Some(type_proto::Value::TensorType(t)) => t,
        None => return Ok(None),
        Some(other) => {
            let kind = match other {
                type_proto::Value::SequenceType(_) => "sequence",
                type_proto::Value::MapType(_) => "map",
                type_proto::Value::OptionalType(_) => "optional",
                _ => "sparse tensor",
            };
            return Err(OnnxError::UnsupportedType {
                value: vi.name.clone(),
                kind: kind.into(),
            });
        }
    };
    if t.elem_type == 0 {
        return Ok(None);
    }
    let dtype = dtype_of(t.elem_type, || format!("value `{}`", vi.name))?;
    let shape = match &t.shape {
        None => Shape::unknown(),
        Some(s) => {
            let mut dims = Vec::with_capacity(s.dim.len());
            for (axis, d) in s.dim.iter().enumerate() {
                dims.push(match &d.value {
                    Some(DimValue::DimValue(v)) if *v > 0 || (*v == 0 && input.is_none()) => {
                        Dim::Fixed(*v as u64)
                    }
                    Some(DimValue::DimParam(p)) if !p.is_empty() => Dim::Sym(p.clone()),
                    Some(DimValue::DimValue(_)) => fresh(axis).unwrap_or(Dim::Unknown),
                    _ => Dim::Unknown,
                });
            }
            Shape::new(dims)
        }
    };
    Ok(Some(TensorType::new(dtype, shape)))
}
