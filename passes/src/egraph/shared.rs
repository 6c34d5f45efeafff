//! One saturation shared by the copies of a stacked block (a transformer's layers: the same
//! nodes, each layer with its own weights). The copies are found by
//! [`crate::classic::roll::find_stacked`]; the first copy is cut out as a graph of its
//! own and saturated, and its result is replayed on every other copy with that copy's own
//! constants. The rest of the graph (embeddings, masks, head) is saturated on its own,
//! recursively (it may hold another stack). Compile time then grows with the number of
//! distinct blocks, not of layers.
//!
//! Replay. The extracted block reads constants of two kinds: the copy's own (a weight) and
//! derived ones that the e-graph folded from them (`diag(γ)·W`). A derived constant is
//! replayed by its derivation (the e-nodes of its class, down to the copy's constants),
//! evaluated by the same analysis code on the other copy's constants, so it is the same
//! tensor a saturation of that copy would fold. Guards read facts about constants (all
//! ones, all zeros, non-negative, mean-free along the last axis) and the e-graph merges
//! equal constants; a copy whose constants (original or derived) differ from the first
//! copy's in any of those facts, or in which constants are equal to which, is not replayed
//! but saturated on its own. What this does not check: facts of derived constants that a
//! guard read but extraction did not keep.

use super::analysis::{self, KEGraph, KilnAnalysis};
use super::lang::{ConstKey, Kn};
use super::{saturate, saturate_keep, EgraphError, EgraphReport, Limits, Saturated};
use crate::classic::roll::{find_stacked, users_of};
use crate::cost::CostModel;
use egg::{Id, Language, Rewrite};
use kiln_ir::{Attr, Graph, Node, OpKind, Tensor, ValueId};
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

/// Stacks nested in the rest of a graph are shared up to this depth.
const MAX_DEPTH: usize = 4;

/// Constants up to this many elements that several parts hold equal are kept once.
const SMALL_CONSTANT: usize = 64;

/// Derivations of one derived constant visit at most this many e-classes.
const MAX_DERIVATION_CLASSES: usize = 10_000;

/// What the sharing did, for `kiln inspect`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sharing {
    /// One entry per stack, outermost first.
    pub stacks: Vec<StackReport>,
    /// Nodes of the rest of the graph, saturated on their own.
    pub rest_nodes: usize,
}

/// One stack of copies.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StackReport {
    /// Copies of the block.
    pub copies: usize,
    /// Nodes of one copy (constants included) before saturation.
    pub block_nodes: usize,
    /// Values carried from a copy to the next.
    pub carried: usize,
    /// Copies that got the first copy's result replayed (the first not counted).
    pub replayed: usize,
    /// Copies saturated on their own, and why.
    pub alone: Vec<(usize, String)>,
    /// Derived constants recomputed per replayed copy.
    pub derived: usize,
}

impl fmt::Display for Sharing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for s in &self.stacks {
            writeln!(
                f,
                "shared: {} copies of a {}-node block ({} carried): saturated once, replayed on {} \
                 ({} derived constants each), {} saturated alone",
                s.copies,
                s.block_nodes,
                s.carried,
                s.replayed,
                s.derived,
                s.alone.len()
            )?;
            for (k, why) in &s.alone {
                writeln!(f, "  copy {k} saturated alone: {why}")?;
            }
        }
        writeln!(f, "shared: rest of the graph {} nodes", self.rest_nodes)
    }
}

/// A piece of the graph cut out as a graph of its own.
struct Part {
    graph: Graph,
    /// The outer value behind each input of `graph`.
    inputs: Vec<ValueId>,
    /// The outer value behind each output of `graph`.
    outputs: Vec<ValueId>,
    /// The constants `graph` holds, in order (their nodes come first in `graph`).
    konsts: Vec<Arc<Tensor>>,
}

/// Cuts `nodes` (in order) out of `g`: constants they read are copied in, other values
/// they read become inputs, the outputs at positions `exported` (node `j`'s output `o`)
/// become outputs.
fn cut(
    g: &Graph,
    nodes: &[usize],
    producer: &[Option<usize>],
    exported: &[(usize, usize)],
) -> Part {
    let inside: HashSet<usize> = nodes.iter().copied().collect();
    let mut pg = Graph::new(&format!("{}_block", g.name));
    let mut map: HashMap<ValueId, ValueId> = HashMap::new();
    let mut inputs = vec![];
    let mut konsts = vec![];
    // Constants first, then inputs, in first-use order.
    for &ni in nodes {
        for &v in g.nodes[ni].inputs.iter().flatten() {
            if map.contains_key(&v) {
                continue;
            }
            let p = producer[v.index()];
            if p.is_some_and(|p| inside.contains(&p)) {
                continue;
            }
            let konst = p
                .filter(|&p| g.nodes[p].op == OpKind::Constant)
                .and_then(|p| g.nodes[p].attrs.tensor("value").ok().flatten());
            if let Some(t) = konst {
                let n = &g.nodes[p.expect("a constant has a producer")];
                let id = pg.add_node(
                    OpKind::Constant,
                    n.attrs.clone(),
                    vec![],
                    vec![(g.value(v).name.clone(), g.ty(v).clone())],
                    &n.name,
                )[0];
                map.insert(v, id);
                konsts.push(t);
            }
        }
    }
    for &ni in nodes {
        for &v in g.nodes[ni].inputs.iter().flatten() {
            if map.contains_key(&v) || producer[v.index()].is_some_and(|p| inside.contains(&p)) {
                continue;
            }
            map.insert(v, pg.add_input(&g.value(v).name, g.ty(v).clone()));
            inputs.push(v);
        }
    }
    for &ni in nodes {
        let n = &g.nodes[ni];
        let ins = n.inputs.iter().map(|i| i.map(|v| map[&v])).collect();
        let outs = n
            .outputs
            .iter()
            .map(|&o| (g.value(o).name.clone(), g.ty(o).clone()))
            .collect();
        let ids = pg.add_node(n.op, n.attrs.clone(), ins, outs, &n.name);
        for (&o, id) in n.outputs.iter().zip(ids) {
            map.insert(o, id);
        }
    }
    let outputs: Vec<ValueId> = exported
        .iter()
        .map(|&(j, o)| g.nodes[nodes[j]].outputs[o])
        .collect();
    pg.outputs = outputs.iter().map(|o| map[o]).collect();
    Part {
        graph: pg,
        inputs,
        outputs,
        konsts,
    }
}

/// The facts guards read about a constant: all ones, all zeros, non-negative, mean-free
/// (as the analysis and the guards compute them).
fn facts(t: &Arc<Tensor>) -> (bool, bool, bool, bool) {
    let dt = t.dtype();
    let (nonneg, mean_free) = analysis::sign_and_mean_facts(t);
    if !dt.is_float() {
        return (false, false, nonneg, mean_free);
    }
    let all = |x: f64| match t.as_slice::<f32>() {
        Some(v) => v.iter().all(|&e| e as f64 == x),
        None => t.to_f64s().iter().all(|&e| e == x),
    };
    (all(1.0), all(0.0), nonneg, mean_free)
}

/// How a derived constant is computed from the block's own constants.
enum Derivation {
    /// The block's constant at this position.
    Konst(usize),
    /// An e-node (children replaced by these derivations).
    Node(Kn, Vec<Derivation>),
}

/// The derivation of class `c` of `eg` from the constants whose classes `orig` names.
fn derive(
    eg: &KEGraph,
    c: Id,
    orig: &HashMap<Id, usize>,
    visiting: &mut HashSet<Id>,
    budget: &mut usize,
) -> Option<Derivation> {
    let c = eg.find(c);
    if let Some(&i) = orig.get(&c) {
        return Some(Derivation::Konst(i));
    }
    if *budget == 0 || !visiting.insert(c) {
        return None;
    }
    *budget -= 1;
    let mut found = None;
    // A class a derived constant reads for its type only (`eps_like`'s `x`): an input of
    // the block, or what it is computed from (every copy has the same types).
    let konst = eg[c].data.konst().is_some();
    let mut nodes: Vec<&Kn> = eg[c].nodes.iter().collect();
    nodes.sort_by_key(|n| !matches!(n, Kn::Input(_)));
    for n in nodes {
        match n {
            Kn::Const(_) => continue,
            Kn::Input(_) if konst => continue,
            Kn::Attrs(_) | Kn::Hole | Kn::Input(_) => {
                found = Some(Derivation::Node(n.clone(), vec![]));
                break;
            }
            Kn::Helper(..) | Kn::Op { .. } | Kn::Opaque(..) => {
                let kids: Option<Vec<Derivation>> = n
                    .children()
                    .iter()
                    .map(|&ch| derive(eg, ch, orig, visiting, budget))
                    .collect();
                if let Some(kids) = kids {
                    found = Some(Derivation::Node(n.clone(), kids));
                    break;
                }
            }
        }
    }
    visiting.remove(&c);
    found
}

/// Adds a derivation to `eg` over `konsts`; its class.
fn build(eg: &mut KEGraph, d: &Derivation, konsts: &[Arc<Tensor>]) -> Id {
    match d {
        Derivation::Konst(i) => eg.add(Kn::Const(ConstKey::new(konsts[*i].clone()))),
        Derivation::Node(n, kids) => {
            let ids: Vec<Id> = kids.iter().map(|k| build(eg, k, konsts)).collect();
            let mut it = ids.into_iter();
            let node = n
                .clone()
                .map_children(|_| it.next().expect("one id per child"));
            eg.add(node)
        }
    }
}

/// Evaluates a derivation on `konsts` with the analysis's own folding (`analysis` gives
/// the types of the block's inputs and opaque nodes).
fn evaluate(
    d: &Derivation,
    konsts: &[Arc<Tensor>],
    analysis: &KilnAnalysis,
) -> Option<Arc<Tensor>> {
    let mut eg = KEGraph::new(analysis.clone());
    let root = build(&mut eg, d, konsts);
    eg.rebuild();
    eg[root].data.konst().cloned()
}

/// The first copy's saturated result, ready to replay on the others.
struct Template {
    /// The saturated block (or the block itself when saturation found nothing cheaper).
    graph: Graph,
    /// Per constant node of `graph` (by node index): where its tensor comes from.
    sources: Vec<(usize, Source)>,
    /// Class of each of the block's own constants (positions that share a class hold
    /// equal tensors in the first copy).
    konst_class: Vec<Id>,
    /// Facts of the block's own constants in the first copy.
    konst_facts: Vec<(bool, bool, bool, bool)>,
    derived: usize,
    /// The first copy's analysis (types of inputs and opaque nodes).
    analysis: KilnAnalysis,
}

enum Source {
    Konst(usize),
    Derived(Derivation, (bool, bool, bool, bool)),
}

fn template(part: &Part, sat: Option<Saturated>) -> Result<Template, String> {
    let konst_facts: Vec<_> = part.konsts.iter().map(facts).collect();
    let Some(sat) = sat else {
        // Unchanged: every constant is the block's own, in order.
        let sources = part
            .graph
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.op == OpKind::Constant)
            .enumerate()
            .map(|(k, (i, _))| (i, Source::Konst(k)))
            .collect();
        let mut classes: Vec<Id> = vec![];
        let mut seen: HashMap<ConstKey, Id> = HashMap::new();
        for t in &part.konsts {
            let n = seen.len();
            classes.push(*seen.entry(ConstKey::new(t.clone())).or_insert(Id::from(n)));
        }
        return Ok(Template {
            graph: part.graph.clone(),
            sources,
            konst_class: classes,
            konst_facts,
            derived: 0,
            analysis: KilnAnalysis::default(),
        });
    };
    let eg = &sat.egraph;
    // The block's constant nodes come first, one per constant, in `konsts` order.
    let konst_class: Vec<Id> = (0..part.konsts.len())
        .map(|k| {
            let v = part.graph.nodes[k].outputs[0];
            sat.origins.value_class[v.index()]
                .map(|c| eg.find(c))
                .ok_or_else(|| format!("constant {k} has no class"))
        })
        .collect::<Result<_, _>>()?;
    let mut orig: HashMap<Id, usize> = HashMap::new();
    for (k, &c) in konst_class.iter().enumerate() {
        orig.entry(c).or_insert(k);
    }
    // Classes whose extracted node is a constant leaf, by contents.
    let mut leaf_class: HashMap<ConstKey, Id> = HashMap::new();
    for (&c, &i) in &sat.extraction.choice {
        if let Kn::Const(k) = &eg[c].nodes[i] {
            leaf_class.insert(k.clone(), eg.find(c));
        }
    }
    let mut sources = vec![];
    let mut derived = 0;
    for (i, n) in sat.graph.nodes.iter().enumerate() {
        if n.op != OpKind::Constant {
            continue;
        }
        let t = n
            .attrs
            .tensor("value")
            .ok()
            .flatten()
            .ok_or("a constant without a value")?;
        let c = *leaf_class
            .get(&ConstKey::new(t.clone()))
            .ok_or("a constant the extraction did not choose")?;
        if let Some(&k) = orig.get(&c) {
            sources.push((i, Source::Konst(k)));
            continue;
        }
        let mut budget = MAX_DERIVATION_CLASSES;
        let d = derive(eg, c, &orig, &mut HashSet::new(), &mut budget)
            .ok_or_else(|| format!("no derivation of constant `{}`", n.name))?;
        sources.push((i, Source::Derived(d, facts(&t))));
        derived += 1;
    }
    Ok(Template {
        graph: sat.graph,
        sources,
        konst_class,
        konst_facts,
        derived,
        analysis: eg.analysis.clone(),
    })
}

/// The template's graph with copy `part`'s constants, or why it cannot be replayed there.
fn replay(t: &Template, part: &Part) -> Result<Graph, String> {
    if part.konsts.len() != t.konst_class.len() {
        return Err("a different number of constants".into());
    }
    let keys: Vec<ConstKey> = part
        .konsts
        .iter()
        .map(|k| ConstKey::new(k.clone()))
        .collect();
    for i in 0..keys.len() {
        if facts(&part.konsts[i]) != t.konst_facts[i] {
            return Err(format!(
                "constant {i} differs in facts (ones, zeros, sign, mean)"
            ));
        }
        for j in 0..i {
            if (keys[i] == keys[j]) != (t.konst_class[i] == t.konst_class[j]) {
                return Err(format!("constants {j} and {i} differ in equality"));
            }
        }
    }
    let mut g = t.graph.clone();
    for (ni, src) in &t.sources {
        let tensor = match src {
            Source::Konst(k) => part.konsts[*k].clone(),
            Source::Derived(d, want) => {
                let got = evaluate(d, &part.konsts, &t.analysis).ok_or_else(|| {
                    format!("derived constant `{}` did not fold", g.nodes[*ni].name)
                })?;
                if facts(&got) != *want {
                    return Err(format!(
                        "derived constant `{}` differs in facts",
                        g.nodes[*ni].name
                    ));
                }
                got
            }
        };
        g.nodes[*ni].attrs.set("value", Attr::Tensor(tensor));
    }
    Ok(g)
}

/// Whether a saturation found a cheaper graph (the pass keeps the graph otherwise).
pub(crate) fn improved(r: &EgraphReport) -> bool {
    r.cost_after < r.cost_before * (1.0 - 1e-9)
}

/// Saturates `g` sharing one saturation between the copies of its longest stacked block
/// (None when `g` has no such stack). The report sums the parts.
/// With `replay` off every copy is saturated on its own (the per-layer optimisation
/// replaying must equal).
pub fn saturate_shared(
    g: &Graph,
    rules: &[Rewrite<Kn, KilnAnalysis>],
    limits: &Limits,
    cm: &CostModel,
    replay: bool,
) -> Result<Option<(Graph, EgraphReport)>, EgraphError> {
    saturate_depth(g, rules, limits, cm, replay, 0)
}

fn saturate_depth(
    g: &Graph,
    rules: &[Rewrite<Kn, KilnAnalysis>],
    limits: &Limits,
    cm: &CostModel,
    replay_on: bool,
    depth: usize,
) -> Result<Option<(Graph, EgraphReport)>, EgraphError> {
    if depth >= MAX_DEPTH {
        return Ok(None);
    }
    let Some(stack) = find_stacked(g) else {
        return Ok(None);
    };
    let producer = crate::rewrite::producers(g);
    let users = users_of(g);
    // What any copy's values are read outside that copy: every copy exports it.
    let mut exported: Vec<(usize, usize)> = vec![];
    for b in &stack.blocks {
        let inside: HashSet<usize> = b.iter().copied().collect();
        for (j, &ni) in b.iter().enumerate() {
            for (o, &v) in g.nodes[ni].outputs.iter().enumerate() {
                if users[v.index()].iter().any(|u| !inside.contains(u))
                    && !exported.contains(&(j, o))
                {
                    exported.push((j, o));
                }
            }
        }
    }
    exported.sort_unstable();
    let parts: Vec<Part> = stack
        .blocks
        .iter()
        .map(|b| cut(g, b, &producer, &exported))
        .collect();
    let copies = parts.len();
    // Every copy's outputs are what the next one reads, and only the last copy's are read
    // by the rest; check the cut agrees with the stack.
    let in_block: HashMap<usize, usize> = stack
        .blocks
        .iter()
        .enumerate()
        .flat_map(|(k, b)| b.iter().map(move |&ni| (ni, k)))
        .collect();
    for k in 0..copies {
        if parts[k].inputs.len() != parts[0].inputs.len()
            || parts[k]
                .inputs
                .iter()
                .zip(&parts[0].inputs)
                .any(|(&a, &b)| g.ty(a) != g.ty(b))
        {
            return Ok(None);
        }
        for &v in &parts[k].inputs {
            if let Some(kp) = producer[v.index()].and_then(|p| in_block.get(&p)) {
                if *kp + 1 != k {
                    return Ok(None);
                }
            }
        }
    }

    // The rest: every other node; the last copy's outputs become inputs, and what the
    // copies read from it becomes outputs.
    let mut rest = Graph::new(&g.name);
    let mut rmap: HashMap<ValueId, ValueId> = HashMap::new();
    for &i in &g.inputs {
        rmap.insert(i, rest.add_input(&g.value(i).name, g.ty(i).clone()));
    }
    let last = &parts[copies - 1];
    for &o in &last.outputs {
        rmap.insert(o, rest.add_input(&g.value(o).name, g.ty(o).clone()));
    }
    for (ni, n) in g.nodes.iter().enumerate() {
        if in_block.contains_key(&ni) {
            continue;
        }
        let mut ins = vec![];
        for i in &n.inputs {
            match i {
                None => ins.push(None),
                Some(v) => match rmap.get(v) {
                    Some(&x) => ins.push(Some(x)),
                    // Read from a copy other than the last: not a stack after all.
                    None => return Ok(None),
                },
            }
        }
        let outs = n
            .outputs
            .iter()
            .map(|&o| (g.value(o).name.clone(), g.ty(o).clone()))
            .collect();
        let ids = rest.add_node(n.op, n.attrs.clone(), ins, outs, &n.name);
        for (&o, id) in n.outputs.iter().zip(ids) {
            rmap.insert(o, id);
        }
    }
    let n_out = g.outputs.len();
    rest.outputs = g.outputs.iter().map(|o| rmap[o]).collect();
    let mut feeds: Vec<ValueId> = vec![];
    for p in &parts {
        for &v in &p.inputs {
            let from_block = producer[v.index()].is_some_and(|q| in_block.contains_key(&q));
            if !from_block && !feeds.contains(&v) {
                feeds.push(v);
            }
        }
    }
    for v in &feeds {
        rest.outputs.push(rmap[v]);
    }
    // The copies' own constants stay with them.
    crate::rewrite::remove_dead(&mut rest);

    // Saturate the rest (recursively sharing) and the first copy.
    // The rest and the first copy are independent e-graphs: the rest saturates on a second
    // thread while this one saturates the first copy and replays it.
    let rest_nodes = rest.nodes.len();
    let saturate_rest = || match saturate_depth(&rest, rules, limits, cm, replay_on, depth + 1) {
        Ok(Some(r)) => Ok(r),
        Ok(None) => saturate(&rest, rules, limits, cm),
        Err(e) => Err(e),
    };
    let (rest_result, first_result) = std::thread::scope(|s| {
        let rest_job = s.spawn(saturate_rest);
        let first = saturate_keep(&parts[0].graph, rules, limits, cm);
        let rest = rest_job
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        (rest, first)
    });
    let (rest_out, rest_report) = rest_result?;
    let rest_changed = improved(&rest_report)
        || rest_report
            .sharing
            .as_ref()
            .is_some_and(|s| !s.stacks.is_empty());
    let rest_g = if rest_changed { rest_out } else { rest };
    let first = first_result?;
    let first_changed = improved(&first.report);
    // Costs count what is kept: a part whose saturation found nothing cheaper stays as it
    // was (so the pass's verdict on the whole adds up the parts' verdicts).
    let mut report = kept(&first.report, first_changed);
    let first_cost = (report.cost_before, report.cost_after);
    // A first copy whose result cannot be replayed (a constant without a derivation):
    // the graph is saturated whole instead.
    let Ok(tpl) = template(&parts[0], first_changed.then_some(first)) else {
        return Ok(None);
    };
    let mut st = StackReport {
        copies,
        block_nodes: parts[0].graph.nodes.len(),
        carried: stack.carried,
        derived: tpl.derived,
        ..StackReport::default()
    };
    let mut block_graphs: Vec<Graph> = vec![tpl.graph.clone()];
    for (k, p) in parts.iter().enumerate().skip(1) {
        let replayed = if replay_on {
            replay(&tpl, p)
        } else {
            Err("replay turned off".to_string())
        };
        match replayed {
            Ok(bg) => {
                st.replayed += 1;
                block_graphs.push(bg);
            }
            Err(why) => {
                let (alone, r) = saturate(&p.graph, rules, limits, cm)?;
                let keep = improved(&r);
                add_report(&mut report, &kept(&r, keep));
                st.alone.push((k, why));
                block_graphs.push(if keep { alone } else { p.graph.clone() });
            }
        }
    }

    // Stitch: the rest's nodes that do not depend on the last copy, the copies in order,
    // then the rest's remaining nodes.
    let mut out = Graph::new(&g.name);
    let mut names: HashSet<String> = HashSet::new();
    let mut vmap: HashMap<ValueId, ValueId> = HashMap::new(); // rest_g value -> out
    for (k, &i) in g.inputs.iter().enumerate() {
        let v = out.add_input(&g.value(i).name, g.ty(i).clone());
        names.insert(g.value(i).name.clone());
        vmap.insert(rest_g.inputs[k], v);
    }
    let placeholders: HashSet<ValueId> = rest_g.inputs[g.inputs.len()..].iter().copied().collect();
    let mut late_vals = placeholders.clone();
    let mut late_nodes = vec![];
    let mut early_nodes = vec![];
    for (i, n) in rest_g.nodes.iter().enumerate() {
        if n.inputs.iter().flatten().any(|v| late_vals.contains(v)) {
            late_vals.extend(n.outputs.iter().copied());
            late_nodes.push(i);
        } else {
            early_nodes.push(i);
        }
    }
    // Small constants equal between parts are emitted once (as saturating the graph whole
    // would have merged them).
    let mut smalls: HashMap<ConstKey, ValueId> = HashMap::new();
    let mut copy_node = |out: &mut Graph,
                         names: &mut HashSet<String>,
                         vmap: &mut HashMap<ValueId, ValueId>,
                         src: &Graph,
                         n: &Node,
                         rename: &dyn Fn(&str) -> String,
                         rename_node: &dyn Fn(&str) -> String| {
        if n.op == OpKind::Constant {
            if let (Ok(Some(t)), [o]) = (n.attrs.tensor("value"), n.outputs.as_slice()) {
                if t.len() <= SMALL_CONSTANT {
                    let key = ConstKey::new(t);
                    if let Some(&v) = smalls.get(&key) {
                        if out.ty(v) == src.ty(*o) {
                            vmap.insert(*o, v);
                            return;
                        }
                    }
                    let v = out.add_node(
                        OpKind::Constant,
                        n.attrs.clone(),
                        vec![],
                        vec![(
                            fresh(names, &rename(&src.value(*o).name)),
                            src.ty(*o).clone(),
                        )],
                        &rename_node(&n.name),
                    )[0];
                    smalls.insert(key, v);
                    vmap.insert(*o, v);
                    return;
                }
            }
        }
        let ins = n.inputs.iter().map(|i| i.map(|v| vmap[&v])).collect();
        let outs = n
            .outputs
            .iter()
            .map(|&o| (fresh(names, &rename(&src.value(o).name)), src.ty(o).clone()))
            .collect();
        let mut attrs = n.attrs.clone();
        if let Ok(Some(from)) = n.attrs.strings(super::convert::FUSED_FROM) {
            attrs.set(
                super::convert::FUSED_FROM,
                Attr::Strs(from.iter().map(|s| rename_node(s)).collect()),
            );
        }
        let ids = out.add_node(n.op, attrs, ins, outs, &rename_node(&n.name));
        for (&o, id) in n.outputs.iter().zip(ids) {
            vmap.insert(o, id);
        }
    };
    let same = |s: &str| s.to_string();
    for &i in &early_nodes {
        copy_node(
            &mut out,
            &mut names,
            &mut vmap,
            &rest_g,
            &rest_g.nodes[i],
            &same,
            &same,
        );
    }
    // Outer value (of g) -> value of `out`, for what the copies read and produce.
    let mut outer: HashMap<ValueId, ValueId> = HashMap::new();
    for (j, v) in feeds.iter().enumerate() {
        let rv = rest_g.outputs[n_out + j];
        // What the copies read must not come to depend on them (extraction may pick
        // another member of its class): else the graph is saturated whole.
        let Some(&x) = vmap.get(&rv) else {
            return Ok(None);
        };
        outer.insert(*v, x);
    }
    for (k, (p, bg)) in parts.iter().zip(&block_graphs).enumerate() {
        // Names: the first copy's value and node names become this copy's own.
        let (vnames, nnames) = if k == 0 || st.alone.iter().any(|(a, _)| *a == k) {
            (HashMap::new(), HashMap::new())
        } else {
            name_maps(g, &stack.blocks[0], &stack.blocks[k], &parts[0], p)
        };
        let rename = |s: &str| vnames.get(s).cloned().unwrap_or_else(|| s.to_string());
        let rename_node = |s: &str| nnames.get(s).cloned().unwrap_or_else(|| s.to_string());
        let mut bmap: HashMap<ValueId, ValueId> = HashMap::new();
        for (&bi, &v) in bg.inputs.iter().zip(&p.inputs) {
            let Some(&x) = outer.get(&v) else {
                return Ok(None);
            };
            bmap.insert(bi, x);
        }
        for n in &bg.nodes {
            copy_node(
                &mut out,
                &mut names,
                &mut bmap,
                bg,
                n,
                &rename,
                &rename_node,
            );
        }
        for (&bo, &v) in bg.outputs.iter().zip(&p.outputs) {
            outer.insert(v, bmap[&bo]);
        }
    }
    for (&ph, &v) in rest_g.inputs[g.inputs.len()..].iter().zip(&last.outputs) {
        vmap.insert(ph, outer[&v]);
    }
    for &i in &late_nodes {
        copy_node(
            &mut out,
            &mut names,
            &mut vmap,
            &rest_g,
            &rest_g.nodes[i],
            &same,
            &same,
        );
    }
    for (k, &o) in rest_g.outputs[..n_out].iter().enumerate() {
        let v = vmap[&o];
        let want = &g.value(g.outputs[k]).name;
        if &out.value(v).name == want {
            out.outputs.push(v);
        } else {
            let name = fresh(&mut names, want);
            let id = out.add_node(
                OpKind::Identity,
                kiln_ir::Attrs::new(),
                vec![Some(v)],
                vec![(name, g.ty(g.outputs[k]).clone())],
                "",
            )[0];
            out.outputs.push(id);
        }
    }

    add_report(&mut report, &kept(&rest_report, rest_changed));
    report.nodes_before = g.nodes.len();
    report.nodes_after = out.nodes.len();
    // The replayed copies cost what the first does.
    report.cost_before += (st.replayed as f64) * first_cost.0;
    report.cost_after += (st.replayed as f64) * first_cost.1;
    let mut sharing = rest_report.sharing.clone().unwrap_or_default();
    sharing.stacks.insert(0, st);
    if rest_report.sharing.is_none() {
        sharing.rest_nodes = rest_nodes;
    }
    report.sharing = Some(sharing);
    Ok(Some((out, report)))
}

/// A name not in `names` (`base`, else `base_1`, ...), taken.
fn fresh(names: &mut HashSet<String>, base: &str) -> String {
    let mut n = base.to_string();
    let mut i = 0;
    while names.contains(&n) {
        i += 1;
        n = format!("{base}_{i}");
    }
    names.insert(n.clone());
    n
}

/// The first copy's value and node names mapped to copy `k`'s (by position).
fn name_maps(
    g: &Graph,
    b0: &[usize],
    bk: &[usize],
    p0: &Part,
    pk: &Part,
) -> (HashMap<String, String>, HashMap<String, String>) {
    let mut v = HashMap::new();
    let mut n = HashMap::new();
    for (&a, &b) in b0.iter().zip(bk) {
        let (na, nb) = (&g.nodes[a], &g.nodes[b]);
        n.insert(na.name.clone(), nb.name.clone());
        for (&x, &y) in na.outputs.iter().zip(&nb.outputs) {
            v.insert(g.value(x).name.clone(), g.value(y).name.clone());
        }
    }
    for (a, b) in p0.graph.nodes.iter().zip(&pk.graph.nodes) {
        if a.op == OpKind::Constant && b.op == OpKind::Constant {
            n.insert(a.name.clone(), b.name.clone());
            v.insert(
                p0.graph.value(a.outputs[0]).name.clone(),
                pk.graph.value(b.outputs[0]).name.clone(),
            );
        }
    }
    (v, n)
}

/// `r`, its cost after set to its cost before where the part is not `keep`.
fn kept(r: &EgraphReport, keep: bool) -> EgraphReport {
    let mut r = r.clone();
    if !keep {
        r.cost_after = r.cost_before;
    }
    r
}

/// Adds another part's numbers to a report.
fn add_report(r: &mut EgraphReport, o: &EgraphReport) {
    r.iterations = r.iterations.max(o.iterations);
    r.enodes += o.enodes;
    r.eclasses += o.eclasses;
    if r.stop_reason != o.stop_reason && !o.stop_reason.is_empty() {
        r.stop_reason = format!("{}; {}", r.stop_reason, o.stop_reason);
    }
    r.saturate_time += o.saturate_time;
    r.extract_time += o.extract_time;
    for (k, v) in &o.hits {
        *r.hits.entry(k.clone()).or_default() += v;
    }
    r.cost_before += o.cost_before;
    r.cost_after += o.cost_after;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use crate::Pass;
    use kiln_ir::{Attrs, DType};

    /// `layers` pre-norm residual blocks `x + relu(LN(x; γ, β)·W + b)`, each with its own
    /// weights; `ones_at` gives that layer a γ of ones, `extra_at` an extra op.
    fn stacked(layers: usize, ones_at: Option<usize>, extra_at: Option<usize>) -> Graph {
        let mut g = Graph::new("stacked");
        let x = g.add_input("x", f32_ty(&[3, 8]));
        let mut rng = Rng::new(11);
        let mut h = x;
        for l in 0..layers {
            let gamma = if ones_at == Some(l) {
                Tensor::from_vec(vec![8], vec![1.0f32; 8])
            } else {
                rng.tensor(DType::F32, &[8])
            };
            let gm = g.add_constant(&format!("gamma{l}"), gamma);
            let bt = g.add_constant(&format!("beta{l}"), rng.tensor(DType::F32, &[8]));
            let w = g.add_constant(&format!("w{l}"), rng.tensor(DType::F32, &[8, 8]));
            let b = g.add_constant(&format!("b{l}"), rng.tensor(DType::F32, &[8]));
            let n = g.add_node(
                OpKind::LayerNorm,
                Attrs::new().with("axis", Attr::Int(-1)),
                vec![Some(h), Some(gm), Some(bt)],
                vec![(format!("n{l}"), f32_ty(&[3, 8]))],
                &format!("ln{l}"),
            )[0];
            let m = node(
                &mut g,
                OpKind::MatMul,
                &[n, w],
                &format!("m{l}"),
                f32_ty(&[3, 8]),
            );
            let a = node(
                &mut g,
                OpKind::Add,
                &[m, b],
                &format!("a{l}"),
                f32_ty(&[3, 8]),
            );
            let mut r = node(
                &mut g,
                OpKind::Relu,
                &[a],
                &format!("r{l}"),
                f32_ty(&[3, 8]),
            );
            if extra_at == Some(l) {
                r = node(
                    &mut g,
                    OpKind::Tanh,
                    &[r],
                    &format!("t{l}"),
                    f32_ty(&[3, 8]),
                );
            }
            h = node(
                &mut g,
                OpKind::Add,
                &[r, h],
                &format!("h{l}"),
                f32_ty(&[3, 8]),
            );
        }
        let y = node(&mut g, OpKind::Sigmoid, &[h], "y", f32_ty(&[3, 8]));
        g.outputs = vec![y];
        g
    }

    /// The graph after the e-graph pass, shared or whole, and the pass's report.
    /// The graph after the e-graph pass (saturated whole, per copy, or shared and
    /// replayed), and the pass's report.
    fn run_mode(g: &Graph, share: bool, replay: bool) -> (Graph, EgraphReport) {
        let pass = super::super::SaturateEgraph {
            share,
            replay,
            ..Default::default()
        };
        let mut out = g.clone();
        pass.run(&mut out).unwrap();
        kiln_ir::verify(&out).unwrap();
        (out, pass.last_report().unwrap())
    }

    fn run(g: &Graph, share: bool) -> (Graph, EgraphReport) {
        run_mode(g, share, true)
    }

    #[test]
    fn stacked_layers_saturate_once_and_equal_the_whole_graph_saturated() {
        let g = stacked(6, None, None);
        let (whole, _) = run(&g, false);
        let (shared, report) = run(&g, true);
        let s = report.sharing.expect("the six layers are shared");
        assert_eq!(s.stacks.len(), 1, "{s}");
        assert_eq!(s.stacks[0].copies, 6, "{s}");
        assert_eq!(s.stacks[0].replayed, 5, "{s}");
        assert!(s.stacks[0].derived > 0, "γ folds into W: {s}");
        assert!(s.stacks[0].alone.is_empty(), "{s}");
        assert_eq!(
            ops(&shared),
            ops(&whole),
            "{}\n{}",
            kiln_ir::text::print(&whole),
            kiln_ir::text::print(&shared)
        );
        assert_same_outputs(&whole, &shared);
        // Names stay unique and per layer: the text form round-trips.
        let text = kiln_ir::text::print(&shared);
        assert_eq!(kiln_ir::text::parse(&text).unwrap(), shared);
        assert!(text.contains("fused_from = [\"ln5\"]"), "{text}");
        // And every copy saturated on its own gives the same graph's outputs.
        let (per_copy, r) = run_mode(&g, true, false);
        assert_eq!(r.sharing.unwrap().stacks[0].alone.len(), 5);
        assert_eq!(ops(&per_copy), ops(&shared));
        assert_same_outputs(&per_copy, &shared);
    }

    #[test]
    fn a_layer_whose_constants_differ_in_facts_is_saturated_alone() {
        let g = stacked(5, Some(3), None);
        let (whole, _) = run(&g, false);
        let (shared, report) = run(&g, true);
        let s = report.sharing.expect("shared");
        assert_eq!(s.stacks[0].copies, 5, "{s}");
        assert_eq!(s.stacks[0].replayed, 3, "{s}");
        assert_eq!(s.stacks[0].alone.len(), 1, "{s}");
        assert_eq!(s.stacks[0].alone[0].0, 3, "{s}");
        assert_same_outputs(&whole, &shared);
        assert_same_outputs(&g, &g);
    }

    #[test]
    fn a_layer_with_another_structure_is_not_a_copy() {
        let g = stacked(5, None, Some(2));
        let (whole, _) = run(&g, false);
        let (shared, report) = run(&g, true);
        if let Some(s) = &report.sharing {
            for st in &s.stacks {
                assert!(st.copies < 5, "{s}");
            }
        }
        assert_same_outputs(&whole, &shared);
    }
}
