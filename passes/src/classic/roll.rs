//! `roll_blocks`: finds a block of nodes that the graph repeats back to back with tied
//! weights (ALBERT's shared layers, a weight-tied recurrence cell unrolled by an exporter)
//! and replaces the copies by one `loop` whose body is the block, iterated N times. Exact:
//! the body is the first copy's own nodes, so every result is the same bit for bit.
//!
//! How blocks are found: every non-constant node gets a signature (op, attributes, output
//! types, arity); a block of `p` nodes repeated `c` times is a run where the signature at
//! `i` equals the one at `i + p` (one scan per period over the topological order). A
//! candidate is then confirmed slot by slot, copy against previous copy: each operand is
//! either *internal* (the same node of the same copy), *carried* (the previous copy's
//! value at the same place; the first copy reads the loop's initial value there) or
//! *invariant* (the very same outer value in every copy: a tied weight, a mask). Values of
//! a copy may be read only by that copy and the next one; the last copy's carried values
//! become the loop's outputs. Constants the block reads are copied into the body (so the
//! body's contractions are prepared with their weights); other invariants are captures.
//!
//! The same search, with copies allowed to read constants of their own ([`find_stacked`]),
//! finds the stacked layers `saturate_egraph` optimises once ([`crate::egraph::shared`]).

use crate::rewrite;
use crate::{Pass, PassError, PassStats};
use kiln_ir::{Attr, Attrs, DType, Graph, Node, OpKind, Shape, Tensor, TensorType, ValueId};
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

/// A body must have at least this many nodes to be worth a loop.
pub const MIN_BODY_NODES: usize = 4;

/// Rolling must remove at least this many nodes from the graph.
pub const MIN_SAVED_NODES: usize = 12;

/// At most this many loops are made in one run (each search is quadratic in the nodes).
const MAX_ROLLS: usize = 8;

/// At most this many candidate runs are confirmed per search (largest saving first).
const MAX_CANDIDATES: usize = 16;

/// The most node visits the confirmations of one search may take (a bound on compile
/// time for long graphs with many near-repeats, such as recurrences unrolled over time).
const MAX_CONFIRM_WORK: usize = 200_000;

/// Constants up to this many elements are compared by contents.
const SMALL_CONSTANT: usize = 4096;

/// Graphs with more non-constant nodes than this are not searched.
const MAX_SEARCH_NODES: usize = 50_000;

/// Rolls weight-tied repeated blocks into `loop`s.
#[derive(Clone, Copy, Debug, Default)]
pub struct RollBlocks;

const NAME: &str = "roll_blocks";

impl Pass for RollBlocks {
    fn name(&self) -> &'static str {
        NAME
    }

    fn run(&self, g: &mut Graph) -> Result<PassStats, PassError> {
        rewrite::check_ids(g).map_err(|m| PassError::graph(NAME, m))?;
        let mut stats = PassStats::default();
        for _ in 0..MAX_ROLLS {
            let Some(r) = find(g, false) else { break };
            stats.removed += r.copies * r.body_nodes;
            stats.added += 1;
            stats.bump("loops", 1);
            stats.bump("body_nodes", r.body_nodes);
            stats.bump("trip_count", r.copies);
            stats.bump("carried", r.carried);
            apply(g, &r);
        }
        if stats.added > 0 {
            rewrite::remove_dead(g);
        }
        Ok(stats)
    }
}

/// How an operand of a node in a copy relates to the copy before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Slot {
    /// Output `o` of node `j` of the same copy.
    Internal(usize, usize),
    /// Output `o` of node `j` of the previous copy (key of a carried value).
    Carried(usize, usize),
    /// The same outer value in every copy.
    Invariant(ValueId),
    /// A constant of the same type in every copy, its contents each copy's own (a layer's
    /// weights; only when searching for stacked blocks, [`find_stacked`]).
    Param,
}

/// A confirmed roll: node indices of each copy, the operand classes of the first copy,
/// and the carried values.
struct Roll {
    /// `copies` blocks of `body_nodes` node indices each, in order.
    blocks: Vec<Vec<usize>>,
    body_nodes: usize,
    copies: usize,
    carried: usize,
    /// Per node of a copy, per operand: its class (`None`: an omitted operand).
    slots: Vec<Vec<Option<Slot>>>,
    /// Carried keys `(node, output)` in order, with the first copy's initial value.
    keys: Vec<((usize, usize), ValueId)>,
}

fn hash_attr<H: Hasher>(a: &Attr, h: &mut H) {
    match a {
        Attr::Int(x) => (0u8, x).hash(h),
        Attr::Float(x) => (1u8, x.to_bits()).hash(h),
        Attr::Str(s) => (2u8, s).hash(h),
        Attr::Ints(v) => (3u8, v).hash(h),
        Attr::Floats(v) => (4u8, v.iter().map(|x| x.to_bits()).collect::<Vec<_>>()).hash(h),
        Attr::Strs(v) => (5u8, v).hash(h),
        Attr::Tensor(t) => {
            (6u8, t.dtype().to_string(), t.shape()).hash(h);
            t.data().le_bytes().hash(h);
        }
        Attr::Graph(sub) => (7u8, kiln_ir::text::print(sub)).hash(h),
    }
}

/// What two nodes must share to be the same node of two copies.
fn signature(n: &Node, g: &Graph) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    n.op.hash(&mut h);
    n.inputs.len().hash(&mut h);
    for i in &n.inputs {
        i.is_some().hash(&mut h);
    }
    for &o in &n.outputs {
        g.ty(o).hash(&mut h);
    }
    for (k, a) in n.attrs.0.iter().filter(|(k, _)| k.as_str() != PROVENANCE) {
        k.hash(&mut h);
        hash_attr(a, &mut h);
    }
    h.finish()
}

/// The attribute naming the exporter's nodes a fused op absorbed: it differs between
/// copies and does not change what a node computes (the body keeps the first copy's).
const PROVENANCE: &str = "fused_from";

/// Whether two nodes' attributes are equal, provenance aside.
fn same_attrs(a: &Attrs, b: &Attrs) -> bool {
    let strip = |x: &Attrs| {
        let mut x = x.clone();
        x.0.remove(PROVENANCE);
        x
    };
    if a.get(PROVENANCE).is_none() && b.get(PROVENANCE).is_none() {
        return a == b;
    }
    strip(a) == strip(b)
}

/// Copies of one block that a graph stacks back to back: the same nodes, operands and
/// types, chained by carried values, where each copy may read its own constants (a
/// transformer's layers, each with its own weights). What `saturate_egraph` optimises once
/// and replays on every copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stack {
    /// `copies` blocks of node indices each, in order; node `j` of every copy is the same
    /// node.
    pub blocks: Vec<Vec<usize>>,
    /// Values carried from one copy to the next.
    pub carried: usize,
}

/// The longest stack of blocks in `g` whose copies differ at most in the contents of
/// non-scalar constants they read (`None` if there is none worth sharing). Where a stack
/// can be cut in several places, the cut whose carried values no normalisation produces
/// is preferred (a norm folds into the linears that read it, which then sit in the same
/// copy).
pub fn find_stacked(g: &Graph) -> Option<Stack> {
    find(g, true).map(|r| Stack {
        blocks: r.blocks,
        carried: r.carried,
    })
}

/// Whether node `ni` is a normalisation (a cut right after one is a poor block boundary).
fn is_norm(g: &Graph, ni: usize) -> bool {
    matches!(
        g.nodes[ni].op,
        OpKind::LayerNorm
            | OpKind::RmsNorm
            | OpKind::BatchNorm
            | OpKind::InstanceNorm
            | OpKind::GroupNorm
    )
}

/// How many of `r`'s carried values a normalisation produces.
fn norm_carried(g: &Graph, r: &Roll) -> usize {
    r.keys
        .iter()
        .filter(|((j, _), _)| is_norm(g, r.blocks[0][*j]))
        .count()
}

/// Searches `g` for the roll that removes the most nodes; with `params`, copies may read
/// their own constants ([`Slot::Param`]).
fn find(g: &Graph, params: bool) -> Option<Roll> {
    let seq: Vec<usize> = (0..g.nodes.len())
        .filter(|&i| g.nodes[i].op != OpKind::Constant)
        .collect();
    let n = seq.len();
    if !(2 * MIN_BODY_NODES..=MAX_SEARCH_NODES).contains(&n) {
        return None;
    }
    let sig: Vec<u64> = seq.iter().map(|&i| signature(&g.nodes[i], g)).collect();
    // Candidates (saved nodes, start, period, run length) from maximal runs per period.
    let mut cands: Vec<(usize, usize, usize, usize)> = vec![];
    for p in MIN_BODY_NODES..=n / 2 {
        let mut i = 0;
        while i + p < n {
            if sig[i] != sig[i + p] {
                i += 1;
                continue;
            }
            let a = i;
            while i + p < n && sig[i] == sig[i + p] {
                i += 1;
            }
            let run = i - a;
            if run >= p {
                let saved = (run / p) * p;
                if saved >= MIN_SAVED_NODES {
                    cands.push((saved, a, p, run));
                }
            }
        }
    }
    cands.sort_by(|x, y| y.0.cmp(&x.0).then(x.2.cmp(&y.2)).then(x.1.cmp(&y.1)));
    let producer = rewrite::producers(g);
    let users = users_of(g);
    let mut work = 0usize;
    for &(_, a, p, run) in cands.iter().take(MAX_CANDIDATES) {
        // Every alignment of the block in the run (a run may start mid-block): the one
        // with the most copies, then the fewest carried values, is the block's own.
        let mut best: Option<Roll> = None;
        for shift in 0..p.min(run) {
            let copies = (run - shift) / p + 1;
            if copies < 2 || (copies - 1) * p < MIN_SAVED_NODES {
                continue;
            }
            work += copies * p;
            if work > MAX_CONFIRM_WORK {
                return best;
            }
            let start = a + shift;
            let blocks: Vec<Vec<usize>> = (0..copies)
                .map(|k| seq[start + k * p..start + (k + 1) * p].to_vec())
                .collect();
            if let Some(mut r) = confirm(g, &producer, &users, blocks, params) {
                // Copies before the run whose nodes the order interleaves with other
                // work (the first layer of an encoder, beside its mask computation).
                while let Some(longer) = extend_back(g, &producer, &users, &r, params) {
                    r = longer;
                }
                let key = |r: &Roll| {
                    let norms = if params { norm_carried(g, r) } else { 0 };
                    (
                        r.copies,
                        std::cmp::Reverse(r.carried),
                        std::cmp::Reverse(norms),
                    )
                };
                let better = best.as_ref().is_none_or(|b| key(&r) > key(b));
                if better {
                    best = Some(r);
                }
            }
        }
        if best.is_some() {
            return best;
        }
    }
    None
}

/// Per value: the nodes that read it (`usize::MAX` for a graph output).
pub(crate) fn users_of(g: &Graph) -> Vec<Vec<usize>> {
    let mut u = vec![vec![]; g.values.len()];
    for (i, n) in g.nodes.iter().enumerate() {
        for &v in n.inputs.iter().flatten() {
            u[v.index()].push(i);
        }
    }
    for &o in &g.outputs {
        u[o.index()].push(usize::MAX);
    }
    u
}

/// The copy before `r`'s first one, found by following the first copy's carried and
/// internal operands back, wherever the order put its nodes; `r` with it prepended if
/// it is a copy too.
fn extend_back(
    g: &Graph,
    producer: &[Option<usize>],
    users: &[Vec<usize>],
    r: &Roll,
    params: bool,
) -> Option<Roll> {
    let first = &r.blocks[0];
    let mut prev: Vec<Option<usize>> = vec![None; r.body_nodes];
    // Seeds: the values the first copy reads in carried slots come from the copy before.
    let set = |prev: &mut Vec<Option<usize>>, j: usize, o: usize, v: ValueId| -> Option<()> {
        let ni = producer.get(v.index()).copied().flatten()?;
        if g.nodes[ni].outputs.get(o) != Some(&v) {
            return None;
        }
        match prev[j] {
            None => prev[j] = Some(ni),
            Some(x) if x == ni => {}
            Some(_) => return None,
        }
        Some(())
    };
    for (j, row) in r.slots.iter().enumerate() {
        for (sl, class) in row.iter().enumerate() {
            if let Some(Slot::Carried(jj, o)) = class {
                let v = g.nodes[first[j]].inputs[sl]?;
                set(&mut prev, *jj, *o, v)?;
            }
        }
    }
    // Then what those nodes read in internal slots, until nothing new is found.
    loop {
        let mut grew = false;
        for j in 0..r.body_nodes {
            let Some(x) = prev[j] else { continue };
            for (sl, class) in r.slots[j].iter().enumerate() {
                if let Some(Slot::Internal(jj, o)) = class {
                    let v = g.nodes[x].inputs.get(sl).copied().flatten()?;
                    let known = prev[*jj].is_some();
                    set(&mut prev, *jj, *o, v)?;
                    grew |= !known;
                }
            }
        }
        if !grew {
            break;
        }
    }
    let prev: Vec<usize> = prev.into_iter().collect::<Option<_>>()?;
    let taken: HashSet<usize> = r.blocks.iter().flatten().copied().collect();
    let distinct: HashSet<usize> = prev.iter().copied().collect();
    if distinct.len() != prev.len() || prev.iter().any(|ni| taken.contains(ni)) {
        return None;
    }
    if prev
        .iter()
        .zip(first)
        .any(|(&a, &b)| signature(&g.nodes[a], g) != signature(&g.nodes[b], g))
    {
        return None;
    }
    let mut blocks = vec![prev];
    blocks.extend(r.blocks.iter().cloned());
    confirm(g, producer, users, blocks, params)
}

/// Whether `a` and `b` are both defined by constants holding equal tensors.
fn same_constant(g: &Graph, producer: &[Option<usize>], a: ValueId, b: ValueId) -> bool {
    let konst = |v: ValueId| {
        producer
            .get(v.index())
            .copied()
            .flatten()
            .filter(|&ni| g.nodes[ni].op == OpKind::Constant)
            .and_then(|ni| g.nodes[ni].attrs.tensor("value").ok().flatten())
    };
    match (konst(a), konst(b)) {
        // Large ones only by identity: comparing two layers' weights element by element
        // on every alignment would cost more than the pass is worth (`fold_constants` and
        // CSE have merged equal constants by then).
        (Some(x), Some(y)) => {
            Arc::ptr_eq(&x, &y) || (x.len() <= SMALL_CONSTANT && x.shape() == y.shape() && x == y)
        }
        _ => false,
    }
}

/// Whether `a` and `b` are both defined by constants of the same type with more than one
/// element (a scalar that differs between copies is a different block: rules match on
/// scalar values such as a GELU's constants).
fn per_copy_constant(g: &Graph, producer: &[Option<usize>], a: ValueId, b: ValueId) -> bool {
    let konst = |v: ValueId| {
        producer
            .get(v.index())
            .copied()
            .flatten()
            .filter(|&ni| g.nodes[ni].op == OpKind::Constant)
            .and_then(|ni| g.nodes[ni].attrs.tensor("value").ok().flatten())
    };
    match (konst(a), konst(b)) {
        (Some(x), Some(y)) => {
            x.len() > 1 && x.shape() == y.shape() && x.dtype() == y.dtype() && g.ty(a) == g.ty(b)
        }
        _ => false,
    }
}

/// Checks that `blocks` are copies of one block chained by carried values, and
/// classifies the first copy's operands; with `params`, copies may read their own
/// constants.
fn confirm(
    g: &Graph,
    producer: &[Option<usize>],
    users: &[Vec<usize>],
    blocks: Vec<Vec<usize>>,
    params: bool,
) -> Option<Roll> {
    let p = blocks[0].len();
    let copies = blocks.len();
    // node index -> (copy, position in the copy)
    let mut at: HashMap<usize, (usize, usize)> = HashMap::new();
    for (k, b) in blocks.iter().enumerate() {
        for (j, &ni) in b.iter().enumerate() {
            at.insert(ni, (k, j));
        }
    }
    // Where a value comes from: (copy, node, output) inside the blocks.
    let place = |v: ValueId| -> Option<(usize, usize, usize)> {
        let ni = producer.get(v.index()).copied().flatten()?;
        let &(k, j) = at.get(&ni)?;
        let o = g.nodes[ni].outputs.iter().position(|&x| x == v)?;
        Some((k, j, o))
    };
    let mut slots: Vec<Vec<Option<Slot>>> = blocks[0]
        .iter()
        .map(|&ni| vec![None; g.nodes[ni].inputs.len()])
        .collect();
    let mut inits: HashMap<(usize, usize), ValueId> = HashMap::new();
    for k in 1..copies {
        for j in 0..p {
            let (na, nb) = (&g.nodes[blocks[k - 1][j]], &g.nodes[blocks[k][j]]);
            if na.op != nb.op
                || !same_attrs(&na.attrs, &nb.attrs)
                || na.inputs.len() != nb.inputs.len()
            {
                return None;
            }
            for (s, (ia, ib)) in na.inputs.iter().zip(&nb.inputs).enumerate() {
                let (a, b) = match (ia, ib) {
                    (None, None) => continue,
                    (Some(a), Some(b)) => (*a, *b),
                    _ => return None,
                };
                let class = match place(b) {
                    Some((kb, jb, ob)) if kb == k => {
                        // Internal: the previous copy reads its own node at the same place.
                        if place(a) != Some((k - 1, jb, ob)) {
                            return None;
                        }
                        Slot::Internal(jb, ob)
                    }
                    Some((kb, jb, ob)) if kb + 1 == k => {
                        // Carried: the previous copy reads the one before it, or (the
                        // first copy) an outer value, the same for every reader.
                        if k >= 2 {
                            if place(a) != Some((k - 2, jb, ob)) {
                                return None;
                            }
                        } else {
                            if place(a).is_some() {
                                return None;
                            }
                            if *inits.entry((jb, ob)).or_insert(a) != a {
                                return None;
                            }
                        }
                        Slot::Carried(jb, ob)
                    }
                    Some(_) => return None,
                    None => {
                        // The same value, or two constants with the same contents (the
                        // body copies the first).
                        if a == b || same_constant(g, producer, a, b) {
                            Slot::Invariant(a)
                        } else if params && per_copy_constant(g, producer, a, b) {
                            Slot::Param
                        } else {
                            return None;
                        }
                    }
                };
                let is_konst = |v: ValueId| {
                    producer[v.index()].is_some_and(|ni| g.nodes[ni].op == OpKind::Constant)
                };
                match (slots[j][s], class) {
                    (None, _) => slots[j][s] = Some(class),
                    (Some(prev), _) if prev == class => {}
                    // Two copies sharing a constant and a third with its own: a parameter.
                    (Some(Slot::Invariant(c)), Slot::Param) if is_konst(c) => {
                        slots[j][s] = Some(Slot::Param)
                    }
                    (Some(Slot::Param), Slot::Invariant(c)) if is_konst(c) => {}
                    _ => return None,
                }
            }
        }
    }
    let mut keys: Vec<((usize, usize), ValueId)> = inits.into_iter().collect();
    keys.sort_by_key(|(k, _)| *k);
    let is_key: HashSet<(usize, usize)> = keys.iter().map(|(k, _)| *k).collect();
    // Readers: a copy's values are read by that copy and the next one only; the last
    // copy's values outside the blocks only where they are carried (loop outputs).
    for (k, b) in blocks.iter().enumerate() {
        for (j, &ni) in b.iter().enumerate() {
            for (o, &v) in g.nodes[ni].outputs.iter().enumerate() {
                for &u in &users[v.index()] {
                    let ku = at.get(&u).map(|&(ku, _)| ku);
                    let ok = match ku {
                        Some(ku) => ku == k || (ku == k + 1 && is_key.contains(&(j, o))),
                        None => k + 1 == copies && is_key.contains(&(j, o)),
                    };
                    if !ok {
                        return None;
                    }
                }
            }
        }
    }
    // The loop sits where the last copy ends: what reads its outputs must come later.
    let end = blocks[copies - 1].iter().copied().max().unwrap_or(0);
    for ((j, o), _) in &keys {
        let v = g.nodes[blocks[copies - 1][*j]].outputs[*o];
        if users[v.index()]
            .iter()
            .any(|u| !at.contains_key(u) && *u != usize::MAX && *u < end)
        {
            return None;
        }
    }
    // A carried value keeps its type from one copy to the next.
    for ((j, o), init) in &keys {
        for b in &blocks {
            if g.ty(g.nodes[b[*j]].outputs[*o]) != g.ty(*init) {
                return None;
            }
        }
    }
    if keys.is_empty() {
        return None;
    }
    Some(Roll {
        blocks,
        body_nodes: p,
        copies,
        carried: keys.len(),
        slots,
        keys,
    })
}

fn scalar(d: DType) -> TensorType {
    TensorType::new(d, Shape::new(vec![]))
}

/// Replaces the copies by a `loop` node placed where the last copy ended.
fn apply(g: &mut Graph, r: &Roll) {
    let producer = rewrite::producers(g);
    let mut body = Graph::new(&format!("{}_block", g.name));
    let mut names: HashSet<String> = HashSet::new();
    let mut fresh = |base: &str| {
        let mut n = base.to_string();
        let mut i = 0;
        while !names.insert(n.clone()) {
            i += 1;
            n = format!("{base}_{i}");
        }
        n
    };
    body.add_input(&fresh("iter"), scalar(DType::I64));
    let cond = body.add_input(&fresh("cond"), scalar(DType::Bool));
    let mut carried_in: HashMap<(usize, usize), ValueId> = HashMap::new();
    for (key, init) in &r.keys {
        let name = fresh(&format!("{}_in", g.value(*init).name));
        carried_in.insert(*key, body.add_input(&name, g.ty(*init).clone()));
    }
    // Invariants: constants are copied in, other values captured (in first-use order).
    let mut captures: Vec<ValueId> = vec![];
    let mut outer: HashMap<ValueId, ValueId> = HashMap::new();
    let mut constants: Vec<(ValueId, Arc<Tensor>)> = vec![];
    for row in &r.slots {
        for s in row.iter().flatten() {
            if let Slot::Invariant(v) = *s {
                if outer.contains_key(&v) || constants.iter().any(|(c, _)| *c == v) {
                    continue;
                }
                let konst = producer[v.index()]
                    .filter(|&ni| g.nodes[ni].op == OpKind::Constant)
                    .and_then(|ni| g.nodes[ni].attrs.tensor("value").ok().flatten());
                match konst {
                    Some(t) => constants.push((v, t)),
                    None => {
                        let name = fresh(&g.value(v).name);
                        outer.insert(v, body.add_input(&name, g.ty(v).clone()));
                        captures.push(v);
                    }
                }
            }
        }
    }
    for (v, t) in &constants {
        let name = fresh(&g.value(*v).name);
        let ty = g.ty(*v).clone();
        let id = body.add_node(
            OpKind::Constant,
            Attrs::new().with("value", Attr::Tensor(t.clone())),
            vec![],
            vec![(name, ty)],
            "",
        )[0];
        outer.insert(*v, id);
    }
    // The first copy's nodes, operands resolved by class.
    let mut inner: HashMap<(usize, usize), ValueId> = HashMap::new();
    for (j, &ni) in r.blocks[0].iter().enumerate() {
        let n = &g.nodes[ni];
        let inputs = n
            .inputs
            .iter()
            .zip(&r.slots[j])
            .map(|(i, s)| {
                i.map(|v| match s {
                    Some(Slot::Internal(jj, o)) => inner[&(*jj, *o)],
                    Some(Slot::Carried(jj, o)) => carried_in[&(*jj, *o)],
                    Some(Slot::Invariant(x)) => outer[x],
                    // Not made by `find(g, false)`, the only search that rolls.
                    Some(Slot::Param) => outer.get(&v).copied().unwrap_or(v),
                    // An operand no later copy constrains cannot occur: every slot of
                    // the first copy is classified against the second.
                    None => outer.get(&v).copied().unwrap_or(v),
                })
            })
            .collect();
        let outputs = n
            .outputs
            .iter()
            .map(|&o| (fresh(&g.value(o).name), g.ty(o).clone()))
            .collect();
        let outs = body.add_node(n.op, n.attrs.clone(), inputs, outputs, &n.name);
        for (o, id) in outs.into_iter().enumerate() {
            inner.insert((j, o), id);
        }
    }
    body.outputs = std::iter::once(cond)
        .chain(r.keys.iter().map(|(k, _)| inner[k]))
        .collect();

    // The loop node: a constant trip count, no condition, initial values, captures.
    let last = r.blocks[r.copies - 1].clone();
    let mut trip_name = format!("{}_trips", g.value(g.nodes[last[0]].outputs[0]).name);
    {
        let taken: HashSet<&str> = g.values.iter().map(|v| v.name.as_str()).collect();
        while taken.contains(trip_name.as_str()) {
            trip_name.push('_');
        }
    }
    let trip_ty = scalar(DType::I64);
    let trips = g.add_value(&trip_name, trip_ty);
    let trip_node = Node {
        op: OpKind::Constant,
        attrs: Attrs::new().with(
            "value",
            Attr::Tensor(Arc::new(Tensor::scalar(r.copies as i64))),
        ),
        inputs: vec![],
        outputs: vec![trips],
        name: String::new(),
    };
    let mut inputs: Vec<Option<ValueId>> = vec![Some(trips), None];
    inputs.extend(r.keys.iter().map(|(_, init)| Some(*init)));
    inputs.extend(captures.iter().map(|&v| Some(v)));
    let outputs: Vec<ValueId> = r
        .keys
        .iter()
        .map(|((j, o), _)| g.nodes[last[*j]].outputs[*o])
        .collect();
    let loop_node = Node {
        op: OpKind::Loop,
        attrs: Attrs::new()
            .with("body", Attr::Graph(Arc::new(body)))
            .with("num_captures", Attr::Int(captures.len() as i64)),
        inputs,
        outputs,
        name: g.nodes[last[0]].name.clone(),
    };
    let gone: HashSet<usize> = r.blocks.iter().flatten().copied().collect();
    let end = last.iter().copied().max().expect("a body has nodes");
    let old = std::mem::take(&mut g.nodes);
    let mut pending = Some((trip_node, loop_node));
    for (i, n) in old.into_iter().enumerate() {
        if !gone.contains(&i) {
            g.nodes.push(n);
        }
        if i == end {
            if let Some((t, l)) = pending.take() {
                g.nodes.push(t);
                g.nodes.push(l);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    /// `layers` copies of `x -> tanh(x·w + b) + x`, all reading the same `w` and `b`.
    fn tied(layers: usize) -> Graph {
        let mut g = Graph::new("tied");
        let x = g.add_input("x", f32_ty(&[2, 4]));
        let mut rng = Rng::new(7);
        let w = g.add_constant("w", rng.tensor(DType::F32, &[4, 4]));
        let b = g.add_constant("b", rng.tensor(DType::F32, &[4]));
        let mut h = x;
        for l in 0..layers {
            let m = node(
                &mut g,
                OpKind::MatMul,
                &[h, w],
                &format!("m{l}"),
                f32_ty(&[2, 4]),
            );
            let a = node(
                &mut g,
                OpKind::Add,
                &[m, b],
                &format!("a{l}"),
                f32_ty(&[2, 4]),
            );
            let t = node(
                &mut g,
                OpKind::Tanh,
                &[a],
                &format!("t{l}"),
                f32_ty(&[2, 4]),
            );
            let s = node(
                &mut g,
                OpKind::Mul,
                &[t, t],
                &format!("s{l}"),
                f32_ty(&[2, 4]),
            );
            h = node(
                &mut g,
                OpKind::Add,
                &[s, h],
                &format!("h{l}"),
                f32_ty(&[2, 4]),
            );
        }
        let y = node(&mut g, OpKind::Relu, &[h], "y", f32_ty(&[2, 4]));
        g.outputs = vec![y];
        g
    }

    #[test]
    fn weight_tied_layers_roll_into_one_loop_with_the_same_outputs() {
        for layers in [4, 7] {
            let mut g = tied(layers);
            let before = g.clone();
            let stats = RollBlocks.run(&mut g).unwrap();
            kiln_ir::verify(&g).unwrap();
            assert_eq!(stats.counter("loops"), 1, "{}", kiln_ir::text::print(&g));
            assert_eq!(stats.counter("trip_count"), layers);
            assert_eq!(stats.counter("body_nodes"), 5);
            let l = g.nodes.iter().find(|n| n.op == OpKind::Loop).unwrap();
            let body = l.attrs.req_graph("body").unwrap();
            assert_eq!(
                body.nodes
                    .iter()
                    .filter(|n| n.op != OpKind::Constant)
                    .count(),
                5
            );
            assert_same_outputs(&before, &g);
            // And the text form round-trips.
            let text = kiln_ir::text::print(&g);
            assert_eq!(kiln_ir::text::parse(&text).unwrap(), g);
        }
    }

    #[test]
    fn layers_with_their_own_weights_do_not_roll() {
        let mut g = Graph::new("untied");
        let x = g.add_input("x", f32_ty(&[2, 4]));
        let mut rng = Rng::new(3);
        let mut h = x;
        for l in 0..4 {
            let w = g.add_constant(&format!("w{l}"), rng.tensor(DType::F32, &[4, 4]));
            let m = node(
                &mut g,
                OpKind::MatMul,
                &[h, w],
                &format!("m{l}"),
                f32_ty(&[2, 4]),
            );
            let t = node(
                &mut g,
                OpKind::Tanh,
                &[m],
                &format!("t{l}"),
                f32_ty(&[2, 4]),
            );
            let s = node(
                &mut g,
                OpKind::Mul,
                &[t, t],
                &format!("s{l}"),
                f32_ty(&[2, 4]),
            );
            h = node(
                &mut g,
                OpKind::Add,
                &[s, h],
                &format!("h{l}"),
                f32_ty(&[2, 4]),
            );
        }
        g.outputs = vec![h];
        let stats = RollBlocks.run(&mut g).unwrap();
        assert!(stats.is_noop(), "{stats}");
    }

    #[test]
    fn a_value_read_after_the_loop_from_a_middle_copy_blocks_the_roll_there() {
        let mut g = tied(4);
        // Also return the second layer's output: layers 0-1 cannot be in the loop with
        // 2-3 as one chain, but rolling must stay exact whatever it picks.
        let h1 = g
            .values
            .iter()
            .position(|v| v.name == "h1")
            .map(|i| ValueId(i as u32))
            .unwrap();
        g.outputs.push(h1);
        let before = g.clone();
        RollBlocks.run(&mut g).unwrap();
        kiln_ir::verify(&g).unwrap();
        assert_same_outputs(&before, &g);
    }
}
