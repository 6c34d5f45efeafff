//! Conversion between the IR and the e-graph. Into the e-graph: one e-node per op output,
//! constants as leaves, nodes the language cannot express (attributes on an op that has
//! none) as opaque e-nodes that keep their inputs. Back: the extracted e-nodes become IR
//! nodes in topological order, keeping the graph's inputs, outputs and output names, the
//! value and node names of whatever survived, and, on a node that replaced several
//! original ones, their names in a `fused_from` attribute (`kiln inspect` shows it).

use super::analysis::{KEGraph, KilnAnalysis};
use super::extract::Extraction;
use super::lang::{canonical_arity, takes_attrs, AttrKey, ConstKey, Kn};
use egg::{Id, Language};
use kiln_ir::{ops, Attr, Attrs, Fact, Graph, OpKind, TensorType, ValueId};
use std::collections::{HashMap, HashSet};

/// The attribute a fused node lists the original nodes it absorbed in.
pub const FUSED_FROM: &str = "fused_from";

/// What conversion back needs to know about the original graph.
#[derive(Debug)]
pub struct Origins {
    /// The original graph.
    pub graph: Graph,
    /// The e-class of each original value (None for values the e-graph does not hold).
    pub value_class: Vec<Option<Id>>,
    /// Class of each graph output.
    pub roots: Vec<Id>,
}

/// Builds the e-graph of `g` (nodes with subgraphs are opaque). Errors where an operand
/// is used before it is defined.
pub fn to_egraph(g: &Graph) -> Result<(KEGraph, Origins), String> {
    let analysis = KilnAnalysis {
        inputs: g.inputs.iter().map(|&i| g.ty(i).clone()).collect(),
        opaque: HashMap::new(),
    };
    let mut eg = KEGraph::new(analysis);
    let mut value_class: Vec<Option<Id>> = vec![None; g.values.len()];
    for (k, &i) in g.inputs.iter().enumerate() {
        value_class[i.index()] = Some(eg.add(Kn::Input(k as u32)));
    }
    let hole = eg.add(Kn::Hole);
    for (idx, node) in g.nodes.iter().enumerate() {
        if node.op == OpKind::Constant {
            if let (Ok(Some(t)), [o]) = (node.attrs.tensor("value"), node.outputs.as_slice()) {
                value_class[o.index()] = Some(eg.add(Kn::Const(ConstKey::new(t))));
                continue;
            }
        }
        let mut args = Vec::with_capacity(node.inputs.len() + 1);
        for i in &node.inputs {
            match i {
                None => args.push(hole),
                Some(v) => args.push(
                    value_class
                        .get(v.index())
                        .copied()
                        .flatten()
                        .ok_or_else(|| format!("value %{} is used before it is defined", v.0))?,
                ),
            }
        }
        // `fused_from` is provenance only (an earlier pass's fusion, e.g. `fuse_silu`): it
        // must not make an attribute-less op opaque, or no rule could match it (silu(matmul)
        // never became linear{silu}).
        // A node with a subgraph (`loop`, `scan`, `if`) is opaque: its body is closed (every
        // outer value it reads is an explicit operand), so the e-graph may rewrite around
        // it, never into it.
        let opaque = (!takes_attrs(node.op) && node.attrs.0.keys().any(|k| k != FUSED_FROM))
            || canonical_arity(node.op).is_some_and(|n| args.len() > n)
            || node.attrs.0.values().any(|a| matches!(a, Attr::Graph(_)));
        if opaque {
            for (k, &o) in node.outputs.iter().enumerate() {
                eg.analysis
                    .opaque
                    .insert((idx as u32, k as u8), g.ty(o).clone());
                value_class[o.index()] =
                    Some(eg.add(Kn::Opaque(idx as u32, k as u8, args.clone())));
            }
            continue;
        }
        if let Some(n) = canonical_arity(node.op) {
            args.resize(n, hole);
        }
        if takes_attrs(node.op) {
            args.push(eg.add(Kn::Attrs(AttrKey::new(&node.attrs))));
        }
        for (k, &o) in node.outputs.iter().enumerate() {
            let id = eg.add(Kn::Op {
                op: node.op,
                out: k as u8,
                args: args.clone(),
            });
            value_class[o.index()] = Some(id);
        }
    }
    let roots = g
        .outputs
        .iter()
        .map(|o| {
            value_class
                .get(o.index())
                .copied()
                .flatten()
                .ok_or_else(|| format!("graph output %{} is not defined", o.0))
        })
        .collect::<Result<Vec<_>, _>>()?;
    eg.rebuild();
    Ok((
        eg,
        Origins {
            graph: g.clone(),
            value_class,
            roots,
        },
    ))
}

/// Rebuilds an IR graph from an extraction.
pub fn from_egraph(eg: &KEGraph, ext: &Extraction, o: &Origins) -> Result<Graph, String> {
    let og = &o.graph;
    let find = |id: Id| eg.find(id);
    // Preferred value name and original producer of each class.
    let mut class_name: HashMap<Id, String> = HashMap::new();
    for (&out, &c) in og.outputs.iter().zip(&o.roots) {
        class_name
            .entry(find(c))
            .or_insert_with(|| og.value(out).name.clone());
    }
    for (v, c) in o.value_class.iter().enumerate() {
        if let Some(c) = c {
            class_name
                .entry(find(*c))
                .or_insert_with(|| og.values[v].name.clone());
        }
    }
    let producers = og.producers();
    // The original nodes whose first output lies in each class.
    let mut nodes_of: HashMap<Id, Vec<usize>> = HashMap::new();
    for (i, n) in og.nodes.iter().enumerate() {
        if let Some(c) = n.outputs.first().and_then(|v| o.value_class[v.index()]) {
            nodes_of.entry(find(c)).or_default().push(i);
        }
    }
    let mut opaque_groups: HashMap<u32, Vec<ValueId>> = HashMap::new();

    let mut ng = Graph::new(&og.name);
    let mut used: HashSet<String> = HashSet::new();
    for &i in &og.inputs {
        used.insert(og.value(i).name.clone());
    }
    let mut value_of: HashMap<Id, ValueId> = HashMap::new();
    for (k, &i) in og.inputs.iter().enumerate() {
        let v = ng.add_input(&og.value(i).name, og.ty(i).clone());
        if let Some(c) = eg.lookup(Kn::Input(k as u32)) {
            value_of.entry(find(c)).or_insert(v);
        }
    }
    let fresh = |used: &mut HashSet<String>, base: &str| {
        let mut name = base.to_string();
        let mut k = 1;
        while used.contains(&name) {
            name = format!("{base}_{k}");
            k += 1;
        }
        used.insert(name.clone());
        name
    };
    // Multi-output groups: (op, children) → emitted IR values.
    let mut groups: HashMap<(OpKind, Vec<Id>), Vec<ValueId>> = HashMap::new();
    let mut group_outs: HashMap<(OpKind, Vec<Id>), u8> = HashMap::new();
    for (&c, &i) in &ext.choice {
        if let Kn::Op { op, out, args } = &eg[c].nodes[i] {
            let key = (*op, args.iter().map(|&a| find(a)).collect::<Vec<_>>());
            let e = group_outs.entry(key).or_insert(0);
            *e = (*e).max(*out);
        }
    }
    let materialised: HashSet<Id> = ext.choice.keys().copied().collect();

    // Post-order over the chosen nodes.
    let mut stack: Vec<(Id, bool)> = o.roots.iter().rev().map(|&r| (find(r), false)).collect();
    let mut done: HashSet<Id> = HashSet::new();
    while let Some((c, ready)) = stack.pop() {
        if done.contains(&c) {
            continue;
        }
        let node = ext
            .node(eg, c)
            .ok_or_else(|| format!("class {c} has no extracted node"))?;
        if !ready {
            stack.push((c, true));
            for &ch in node.children().iter().rev() {
                let ch = find(ch);
                if !done.contains(&ch) {
                    stack.push((ch, false));
                }
            }
            continue;
        }
        done.insert(c);
        let input_of =
            |ch: Id, value_of: &HashMap<Id, ValueId>| -> Result<Option<ValueId>, String> {
                let ch = find(ch);
                match ext.node(eg, ch) {
                    Some(Kn::Hole) => Ok(None),
                    _ => value_of
                        .get(&ch)
                        .copied()
                        .map(Some)
                        .ok_or_else(|| format!("class {ch} has no value")),
                }
            };
        let ty_of = |c: Id| -> Result<TensorType, String> {
            eg[c]
                .data
                .ty()
                .cloned()
                .ok_or_else(|| format!("class {c} has no type"))
        };
        match node {
            Kn::Input(_) | Kn::Hole | Kn::Attrs(_) => {}
            Kn::Helper(h, _) => return Err(format!("helper `{}` was not folded", h.name())),
            Kn::Const(k) => {
                let name = fresh(
                    &mut used,
                    class_name.get(&c).map_or("const", |s| s.as_str()),
                );
                // The same tensor, shared (not copied: weights are most of a model).
                let ty = TensorType::new(k.tensor.dtype(), kiln_ir::Shape::fixed(k.tensor.shape()));
                let v = ng.add_node(
                    OpKind::Constant,
                    Attrs::new().with("value", Attr::Tensor(k.tensor.clone())),
                    vec![],
                    vec![(name, ty)],
                    "",
                )[0];
                value_of.insert(c, v);
            }
            Kn::Opaque(idx, out, args) => {
                let on = og
                    .nodes
                    .get(*idx as usize)
                    .ok_or("opaque node out of range")?;
                if !opaque_groups.contains_key(idx) {
                    let ins = args
                        .iter()
                        .map(|&a| input_of(a, &value_of))
                        .collect::<Result<Vec<_>, _>>()?;
                    let outs = on
                        .outputs
                        .iter()
                        .map(|&ov| {
                            let name = fresh(&mut used, &og.value(ov).name);
                            (name, og.ty(ov).clone())
                        })
                        .collect();
                    let vs = ng.add_node(on.op, on.attrs.clone(), ins, outs, &on.name);
                    opaque_groups.insert(*idx, vs);
                }
                let v = opaque_groups[idx]
                    .get(*out as usize)
                    .copied()
                    .ok_or("opaque output out of range")?;
                value_of.insert(c, v);
            }
            Kn::Op { op, out, args } => {
                let key = (*op, args.iter().map(|&a| find(a)).collect::<Vec<_>>());
                if !groups.contains_key(&key) {
                    let n_in = if takes_attrs(*op) {
                        args.len().saturating_sub(1)
                    } else {
                        args.len()
                    };
                    let mut attrs = if n_in < args.len() {
                        eg[args[n_in]]
                            .data
                            .attrs
                            .as_deref()
                            .cloned()
                            .unwrap_or_default()
                    } else {
                        Attrs::new()
                    };
                    let mut ins = args[..n_in]
                        .iter()
                        .map(|&a| input_of(a, &value_of))
                        .collect::<Result<Vec<_>, _>>()?;
                    while ins.last() == Some(&None) {
                        ins.pop();
                    }
                    let n_out = group_outs.get(&key).copied().unwrap_or(*out) as usize + 1;
                    // Output types: the shape rule on the inputs' facts, refined by classes.
                    let facts: Vec<Option<Fact>> = args[..n_in]
                        .iter()
                        .map(|&a| eg[find(a)].data.fact.clone())
                        .collect();
                    let fref: Vec<Option<&Fact>> = facts.iter().map(|f| f.as_ref()).collect();
                    let inferred = ops::infer(*op, &attrs, &fref).unwrap_or_default();
                    let mut outs = vec![];
                    for j in 0..n_out {
                        let cj = eg
                            .lookup(Kn::Op {
                                op: *op,
                                out: j as u8,
                                args: args.clone(),
                            })
                            .map(find);
                        let base = cj
                            .and_then(|cj| class_name.get(&cj).cloned())
                            .unwrap_or_else(|| format!("{}_{j}", op.name()));
                        let ty = match cj.and_then(|cj| eg[cj].data.ty().cloned()) {
                            Some(t) => t,
                            None => inferred
                                .get(j)
                                .map(|f| f.ty.clone())
                                .map_or_else(|| ty_of(c), Ok)?,
                        };
                        outs.push((fresh(&mut used, &base), ty));
                    }
                    // Node name and provenance.
                    let origs = nodes_of.get(&c).map_or(&[][..], |v| v.as_slice());
                    let same = origs.iter().find(|&&i| og.nodes[i].op == *op);
                    let name = same
                        .or(origs.first())
                        .map_or(String::new(), |&i| og.nodes[i].name.clone());
                    if same.is_none() && takes_attrs(*op) {
                        let absorbed = absorbed(og, &producers, o, eg, &materialised, origs);
                        if !absorbed.is_empty() {
                            attrs.set(FUSED_FROM, Attr::Strs(absorbed));
                        }
                    }
                    let vs = ng.add_node(*op, attrs, ins, outs, &name);
                    groups.insert(key.clone(), vs);
                }
                let v = groups[&key]
                    .get(*out as usize)
                    .copied()
                    .ok_or("output out of range")?;
                value_of.insert(c, v);
            }
        }
    }
    // Outputs keep their names; an identity renames where the value has another name.
    for (&out, &c) in og.outputs.iter().zip(&o.roots) {
        let c = find(c);
        let v = *value_of.get(&c).ok_or("output class has no value")?;
        let want = &og.value(out).name;
        // Same name means the same original value (a graph may return one value twice).
        if &ng.value(v).name == want {
            ng.outputs.push(v);
        } else {
            let name = fresh(&mut used, want);
            let ty = og.ty(out).clone();
            let nv = ng.add_node(
                OpKind::Identity,
                Attrs::new(),
                vec![Some(v)],
                vec![(name, ty)],
                "",
            )[0];
            ng.outputs.push(nv);
        }
    }
    Ok(ng)
}

/// Names of the original nodes a new node in class `c` absorbed: walking back from the
/// original producers of its class (`origs`) through values that the new graph no longer materialises.
fn absorbed(
    og: &Graph,
    producers: &HashMap<ValueId, usize>,
    o: &Origins,
    eg: &KEGraph,
    materialised: &HashSet<Id>,
    origs: &[usize],
) -> Vec<String> {
    let mut names = vec![];
    let mut seen = HashSet::new();
    let mut stack: Vec<usize> = origs.to_vec();
    while let Some(i) = stack.pop() {
        if !seen.insert(i) {
            continue;
        }
        let n = &og.nodes[i];
        if n.op == OpKind::Constant {
            continue;
        }
        if !n.name.is_empty() {
            names.push(n.name.clone());
        }
        // A node an earlier pass fused (e.g. `fuse_silu`) passes on the nodes it absorbed.
        if let Ok(Some(earlier)) = n.attrs.strings(FUSED_FROM) {
            names.extend(earlier.iter().cloned());
        }
        for v in n.inputs.iter().flatten() {
            let Some(vc) = o.value_class[v.index()] else {
                continue;
            };
            if materialised.contains(&eg.find(vc)) {
                continue;
            }
            if let Some(&p) = producers.get(v) {
                stack.push(p);
            }
        }
    }
    names.sort();
    names
}
