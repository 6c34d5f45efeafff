//! Graph surgery shared by every pass: replacing all uses of one value by another (keeping
//! graph-output names stable), inserting nodes, and removing dead nodes while compacting
//! the value table. Passes decide *what* to rewrite; this module is the one place that
//! knows *how* to keep ids, names and outputs consistent.
//!
//! Invariant kept by everything here: nodes stay in topological order and every value is
//! defined once. Value ids are only renumbered by [`compact_values`] (and [`remove_dead`],
//! which calls it), so a pass may hold ids across calls to the other functions.

use kiln_ir::{Attr, Graph, Node, OpKind, TensorType, ValueId};
use std::collections::{HashMap, HashSet};

/// A pending substitution of values: "every use of `from` becomes a use of `to`".
///
/// A pass walking nodes in topological order records replacements with [`Subst::replace`]
/// and resolves each node's inputs with [`Subst::rewrite_inputs`] before looking at it,
/// so it always sees the graph as if earlier replacements were applied; [`Subst::apply`]
/// then rewrites every use at once (linear time, however many replacements).
#[derive(Clone, Debug)]
pub struct Subst {
    map: Vec<ValueId>,
    count: usize,
}

impl Subst {
    /// An empty substitution for `g`'s values.
    pub fn new(g: &Graph) -> Subst {
        Subst {
            map: (0..g.values.len() as u32).map(ValueId).collect(),
            count: 0,
        }
    }

    /// Records that uses of `from` become uses of `to` (itself resolved first). A
    /// replacement that would close a cycle is ignored and returns false.
    pub fn replace(&mut self, from: ValueId, to: ValueId) -> bool {
        let to = self.resolve(to);
        if to == from || from.index() >= self.map.len() {
            return false;
        }
        self.map[from.index()] = to;
        self.count += 1;
        true
    }

    /// What `v` stands for after the replacements so far.
    pub fn resolve(&self, mut v: ValueId) -> ValueId {
        // Chains are acyclic (see `replace`), so this ends within map.len() steps.
        for _ in 0..self.map.len() {
            match self.map.get(v.index()) {
                Some(&next) if next != v => v = next,
                _ => break,
            }
        }
        v
    }

    /// How many replacements were recorded.
    pub fn len(&self) -> usize {
        self.count
    }

    /// True if no replacement was recorded.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Resolves a node's inputs; returns true if any changed.
    pub fn rewrite_inputs(&self, node: &mut Node) -> bool {
        let mut changed = false;
        for v in node.inputs.iter_mut().flatten() {
            let r = self.resolve(*v);
            if r != *v {
                *v = r;
                changed = true;
            }
        }
        changed
    }

    /// Applies the substitution to every node input and graph output; returns the number
    /// of uses rewritten. A graph output keeps its name: the replacement value takes the
    /// name over (the replaced value, now dead, gets a fresh one), or, where that is not
    /// possible (the replacement is a graph input or already another output), an
    /// `identity` node defines a value with the output's name.
    pub fn apply(self, g: &mut Graph) -> usize {
        if self.is_empty() {
            return 0;
        }
        let mut uses = 0;
        for node in &mut g.nodes {
            for v in node.inputs.iter_mut().flatten() {
                let r = self.resolve(*v);
                if r != *v {
                    *v = r;
                    uses += 1;
                }
            }
        }
        let inputs: HashSet<ValueId> = g.inputs.iter().copied().collect();
        let mut claimed: HashSet<ValueId> = g
            .outputs
            .iter()
            .copied()
            .filter(|&o| self.resolve(o) == o)
            .collect();
        let mut done: HashMap<ValueId, ValueId> = HashMap::new();
        let mut namer = Namer::new(g);
        for k in 0..g.outputs.len() {
            let o = g.outputs[k];
            if let Some(&n) = done.get(&o) {
                g.outputs[k] = n;
                continue;
            }
            let r = self.resolve(o);
            if r == o {
                continue;
            }
            uses += 1;
            let ty = merged_type(g.ty(r), g.ty(o));
            let new = if !inputs.contains(&r) && !claimed.contains(&r) {
                // `r` takes over the output's name; the dead `o` takes `r`'s.
                let (oi, ri) = (o.index(), r.index());
                let on = std::mem::take(&mut g.values[oi].name);
                g.values[oi].name = std::mem::replace(&mut g.values[ri].name, on);
                g.values[ri].ty = ty;
                r
            } else {
                let name = g.values[o.index()].name.clone();
                g.values[o.index()].name = namer.fresh(&name);
                let new = g.add_value(&name, ty.clone());
                g.nodes.push(Node {
                    op: OpKind::Identity,
                    attrs: Default::default(),
                    inputs: vec![Some(r)],
                    outputs: vec![new],
                    name: String::new(),
                });
                new
            };
            claimed.insert(new);
            done.insert(o, new);
            g.outputs[k] = new;
        }
        uses
    }
}

/// Replaces every use of `from` by `to` (node inputs and graph outputs, see
/// [`Subst::apply`]); returns the number of uses rewritten.
pub fn replace_all_uses(g: &mut Graph, from: ValueId, to: ValueId) -> usize {
    let mut s = Subst::new(g);
    s.replace(from, to);
    s.apply(g)
}

/// True if replacing `from` by `to` would need an `identity` node to keep a graph
/// output's name (so a pass removing identities must not do it).
pub fn replacement_needs_identity(g: &Graph, from: ValueId, to: ValueId) -> bool {
    g.outputs.contains(&from) && (g.inputs.contains(&to) || g.outputs.contains(&to))
}

/// The declared type to keep when `to` replaces `from`: `to`'s, refined by what `from`
/// declared where they agree.
fn merged_type(to: &TensorType, from: &TensorType) -> TensorType {
    kiln_ir::infer::refine(to, from).unwrap_or_else(|_| to.clone())
}

/// Makes value names unique against those in a graph.
#[derive(Debug, Default)]
pub struct Namer {
    used: HashSet<String>,
}

impl Namer {
    /// Knows every name in `g`.
    pub fn new(g: &Graph) -> Namer {
        Namer {
            used: g.values.iter().map(|v| v.name.clone()).collect(),
        }
    }

    /// `base` if unused, else `base_1`, `base_2`, ...; the result is then marked used.
    pub fn fresh(&mut self, base: &str) -> String {
        let mut name = base.to_string();
        let mut k = 1usize;
        while self.used.contains(&name) {
            name = format!("{base}_{k}");
            k += 1;
        }
        self.used.insert(name.clone());
        name
    }

    /// Adds a value with a unique name derived from `base`.
    pub fn add_value(&mut self, g: &mut Graph, base: &str, ty: TensorType) -> ValueId {
        let name = self.fresh(base);
        g.add_value(&name, ty)
    }
}

/// Inserts nodes, each before the node at the given index (`g.nodes.len()` appends),
/// keeping the relative order of insertions at the same index.
pub fn insert_nodes(g: &mut Graph, mut inserts: Vec<(usize, Node)>) {
    if inserts.is_empty() {
        return;
    }
    inserts.sort_by_key(|(i, _)| *i);
    let old = std::mem::take(&mut g.nodes);
    let mut ins = inserts.into_iter().peekable();
    for (i, node) in old.into_iter().enumerate() {
        while let Some((_, n)) = ins.next_if(|(at, _)| *at <= i) {
            g.nodes.push(n);
        }
        g.nodes.push(node);
    }
    g.nodes.extend(ins.map(|(_, n)| n));
}

/// Removes every node none of whose outputs reaches a graph output, then compacts the
/// value table. Graph inputs are kept even when unused (they are the signature). Values
/// that a subgraph (an `if` branch) captures by name from this graph count as used.
/// Returns the number of nodes removed.
pub fn remove_dead(g: &mut Graph) -> usize {
    let mut live = vec![false; g.values.len()];
    let mark = |live: &mut Vec<bool>, v: ValueId| {
        if let Some(l) = live.get_mut(v.index()) {
            *l = true;
        }
    };
    for &o in &g.outputs {
        mark(&mut live, o);
    }
    let mut by_name: Option<HashMap<String, ValueId>> = None;
    let mut keep = vec![false; g.nodes.len()];
    for (i, node) in g.nodes.iter().enumerate().rev() {
        if !node
            .outputs
            .iter()
            .any(|o| live.get(o.index()).copied().unwrap_or(false))
        {
            continue;
        }
        keep[i] = true;
        for &v in node.inputs.iter().flatten() {
            mark(&mut live, v);
        }
        let mut captured = HashSet::new();
        for a in node.attrs.0.values() {
            if let Attr::Graph(sub) = a {
                captured_names(sub, &mut captured);
            }
        }
        if !captured.is_empty() {
            let names = by_name.get_or_insert_with(|| {
                g.values
                    .iter()
                    .enumerate()
                    .map(|(i, v)| (v.name.clone(), ValueId(i as u32)))
                    .collect()
            });
            for n in captured {
                if let Some(&v) = names.get(&n) {
                    mark(&mut live, v);
                }
            }
        }
    }
    let before = g.nodes.len();
    let mut k = keep.into_iter();
    g.nodes.retain(|_| k.next().unwrap_or(true));
    let removed = before - g.nodes.len();
    compact_values(g);
    removed
}

/// Names a subgraph uses but does not define (values it captures from enclosing graphs).
fn captured_names(sub: &Graph, out: &mut HashSet<String>) {
    let mut defined: HashSet<ValueId> = sub.inputs.iter().copied().collect();
    let use_of = |v: ValueId, defined: &HashSet<ValueId>, out: &mut HashSet<String>| {
        if !defined.contains(&v) {
            if let Some(val) = sub.values.get(v.index()) {
                out.insert(val.name.clone());
            }
        }
    };
    for node in &sub.nodes {
        for &v in node.inputs.iter().flatten() {
            use_of(v, &defined, out);
        }
        for a in node.attrs.0.values() {
            if let Attr::Graph(inner) = a {
                captured_names(inner, out);
            }
        }
        defined.extend(node.outputs.iter().copied());
    }
    for &o in &sub.outputs {
        use_of(o, &defined, out);
    }
}

/// Drops values that nothing defines or uses and renumbers the rest densely, in their
/// old order. Returns the number of values dropped.
pub fn compact_values(g: &mut Graph) -> usize {
    let n = g.values.len();
    let mut used = vec![false; n];
    {
        let mut mark = |v: &ValueId| {
            if let Some(u) = used.get_mut(v.index()) {
                *u = true;
            }
        };
        g.inputs.iter().for_each(&mut mark);
        g.outputs.iter().for_each(&mut mark);
        for node in &g.nodes {
            node.inputs.iter().flatten().for_each(&mut mark);
            node.outputs.iter().for_each(&mut mark);
        }
    }
    if used.iter().all(|&u| u) {
        return 0;
    }
    let mut remap: Vec<Option<ValueId>> = vec![None; n];
    let mut next = 0u32;
    for (i, &u) in used.iter().enumerate() {
        if u {
            remap[i] = Some(ValueId(next));
            next += 1;
        }
    }
    // Every id below was marked used, so it has a new number; out-of-range ids (a broken
    // graph, which the verifier reports) are left as they are.
    let re = |v: &mut ValueId| {
        if let Some(Some(r)) = remap.get(v.index()) {
            *v = *r;
        }
    };
    g.inputs.iter_mut().for_each(re);
    g.outputs.iter_mut().for_each(re);
    for node in &mut g.nodes {
        node.inputs.iter_mut().flatten().for_each(re);
        node.outputs.iter_mut().for_each(re);
    }
    let mut u = used.iter();
    g.values.retain(|_| *u.next().unwrap_or(&true));
    n - g.values.len()
}

/// Checks that every value id the graph mentions is in range, so that passes can index
/// the value table freely. (The verifier checks more; passes may run without it.)
pub fn check_ids(g: &Graph) -> Result<(), String> {
    let n = g.values.len();
    let ids = g.inputs.iter().chain(&g.outputs).chain(
        g.nodes
            .iter()
            .flat_map(|nd| nd.inputs.iter().flatten().chain(&nd.outputs)),
    );
    for v in ids {
        if v.index() >= n {
            return Err(format!(
                "value id {} is out of range (the graph has {n} values)",
                v.0
            ));
        }
    }
    Ok(())
}

/// Which node defines each value (`None` for graph inputs and undefined values).
pub fn producers(g: &Graph) -> Vec<Option<usize>> {
    let mut p = vec![None; g.values.len()];
    for (i, node) in g.nodes.iter().enumerate() {
        for o in &node.outputs {
            if let Some(slot) = p.get_mut(o.index()) {
                *slot = Some(i);
            }
        }
    }
    p
}

/// How many node inputs and graph outputs use each value.
pub fn use_counts(g: &Graph) -> Vec<usize> {
    let mut c = vec![0; g.values.len()];
    let uses = g
        .nodes
        .iter()
        .flat_map(|n| n.inputs.iter().flatten())
        .chain(&g.outputs);
    for v in uses {
        if let Some(slot) = c.get_mut(v.index()) {
            *slot += 1;
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use kiln_ir::{DType, Shape, Tensor};

    #[test]
    fn replace_rewires_node_inputs() {
        let mut g = Graph::new("g");
        let x = g.add_input("x", f32_ty(&[2]));
        let y = g.add_input("y", f32_ty(&[2]));
        let a = node(&mut g, OpKind::Add, &[x, x], "a", f32_ty(&[2]));
        g.outputs = vec![a];
        assert_eq!(replace_all_uses(&mut g, x, y), 2);
        assert_eq!(g.nodes[0].inputs, vec![Some(y), Some(y)]);
    }

    #[test]
    fn replacing_a_graph_output_keeps_its_name() {
        let mut g = Graph::new("g");
        let c1 = g.add_constant("c1", Tensor::scalar(1.0f32));
        let out = g.add_constant("out", Tensor::scalar(1.0f32));
        g.outputs = vec![out];
        replace_all_uses(&mut g, out, c1);
        assert_eq!(g.outputs, vec![c1]);
        assert_eq!(g.value(c1).name, "out");
        assert_eq!(g.value(out).name, "c1");
        remove_dead(&mut g);
        assert_eq!(g.nodes.len(), 1);
        assert_eq!(g.value(g.outputs[0]).name, "out");
        kiln_ir::verify(&g).unwrap();
    }

    #[test]
    fn replacing_an_output_by_an_input_inserts_an_identity() {
        let mut g = Graph::new("g");
        let x = g.add_input("x", f32_ty(&[2]));
        let out = g.add_constant("out", Tensor::zeros(DType::F32, vec![2]));
        g.outputs = vec![out, x];
        assert!(replacement_needs_identity(&g, out, x));
        replace_all_uses(&mut g, out, x);
        remove_dead(&mut g);
        assert_eq!(g.nodes.len(), 1);
        assert_eq!(g.nodes[0].op, OpKind::Identity);
        assert_eq!(g.nodes[0].inputs, vec![Some(x)]);
        assert_eq!(g.value(g.outputs[0]).name, "out");
        assert_eq!(g.outputs[1], x);
    }

    #[test]
    fn two_outputs_merged_into_one_value_keep_both_names() {
        let mut g = Graph::new("g");
        let a = g.add_constant("a", Tensor::scalar(1i64));
        let b = g.add_constant("b", Tensor::scalar(1i64));
        g.outputs = vec![a, b, b];
        replace_all_uses(&mut g, b, a);
        let names: Vec<_> = g.outputs.iter().map(|&o| g.value(o).name.clone()).collect();
        assert_eq!(names, vec!["a", "b", "b"]);
        assert_eq!(g.outputs[1], g.outputs[2]);
        assert_eq!(g.nodes.last().unwrap().op, OpKind::Identity);
    }

    #[test]
    fn out_of_range_ids_are_reported() {
        let mut g = Graph::new("g");
        g.add_constant("a", Tensor::scalar(1i64));
        assert!(check_ids(&g).is_ok());
        g.outputs = vec![ValueId(5)];
        assert_eq!(
            check_ids(&g).unwrap_err(),
            "value id 5 is out of range (the graph has 1 values)"
        );
    }

    #[test]
    fn subst_follows_chains_and_refuses_cycles() {
        let mut g = Graph::new("g");
        let v: Vec<_> = (0..3)
            .map(|i| g.add_input(&format!("v{i}"), f32_ty(&[1])))
            .collect();
        let mut s = Subst::new(&g);
        assert!(s.replace(v[0], v[1]));
        assert!(s.replace(v[1], v[2]));
        assert_eq!(s.resolve(v[0]), v[2]);
        assert!(!s.replace(v[2], v[0]), "would close a cycle");
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn remove_dead_drops_unused_nodes_keeps_inputs_and_compacts_ids() {
        let mut g = Graph::new("g");
        let _unused_in = g.add_input("unused", f32_ty(&[1]));
        let dead = g.add_constant("dead", Tensor::scalar(2.0f32));
        let _dead2 = node(&mut g, OpKind::Neg, &[dead], "dead2", f32_ty(&[]));
        let live = g.add_constant("live", Tensor::scalar(3.0f32));
        g.outputs = vec![live];
        assert_eq!(remove_dead(&mut g), 2);
        assert_eq!(g.values.len(), 2);
        assert_eq!(g.inputs, vec![ValueId(0)]);
        assert_eq!(g.outputs, vec![ValueId(1)]);
        assert_eq!(g.value(ValueId(1)).name, "live");
        assert_eq!(g.nodes[0].outputs, vec![ValueId(1)]);
        kiln_ir::verify(&g).unwrap();
    }

    #[test]
    fn remove_dead_keeps_values_captured_by_subgraphs() {
        let mut g = Graph::new("g");
        let cond = g.add_input("cond", TensorType::new(DType::Bool, Shape::fixed(&[])));
        g.add_constant("captured", Tensor::scalar(1.0f32));
        let mut branch = Graph::new("then");
        let outer = branch.add_value("captured", f32_ty(&[]));
        branch.outputs = vec![outer];
        let attrs = kiln_ir::Attrs::new()
            .with("then_branch", Attr::Graph(branch.clone().into()))
            .with("else_branch", Attr::Graph(branch.into()));
        let out = g.add_node(
            OpKind::If,
            attrs,
            vec![Some(cond)],
            vec![("out".into(), f32_ty(&[]))],
            "",
        )[0];
        g.outputs = vec![out];
        assert_eq!(remove_dead(&mut g), 0);
        assert!(g.values.iter().any(|v| v.name == "captured"));
    }

    #[test]
    fn insert_nodes_places_each_before_its_index() {
        let mut g = Graph::new("g");
        let a = g.add_constant("a", Tensor::scalar(1i64));
        let b = g.add_constant("b", Tensor::scalar(2i64));
        let mut extra = g.nodes[0].clone();
        let c = g.add_value("c", g.ty(a).clone());
        extra.outputs = vec![c];
        let mut tail = extra.clone();
        let d = g.add_value("d", g.ty(a).clone());
        tail.outputs = vec![d];
        insert_nodes(&mut g, vec![(2, tail), (1, extra)]);
        let order: Vec<_> = g.nodes.iter().map(|n| n.outputs[0]).collect();
        assert_eq!(order, vec![a, c, b, d]);
    }
}
