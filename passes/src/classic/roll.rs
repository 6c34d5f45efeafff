//! `roll_blocks`: finds a block of nodes that the graph repeats back to back with tied
//! weights (ALBERT's shared layers, a weight-tied recurrence cell unrolled by an exporter)
//! and replaces the copies by one `loop` whose body is the block, iterated N times. Exact:
//! the body is the first copy's own nodes, so every result is the same bit for bit.
//!
//! How blocks are found: every non-constant node gets a signature (op, attributes, output
//! types, arity); a block of `p` nodes repeated `c` times is a run where the signature at
//! `i` equals the one at `i + p` (periods scanned in order of their match counts,
//! [`candidates`]). A candidate is then confirmed slot by slot, copy against previous
//! copy: each operand is either *internal* (the same node of the same copy), *carried*
//! (the previous copy's value at the same place; the first copy reads the loop's initial
//! value there) or *invariant* (the very same outer value in every copy: a tied weight, a
//! mask). Values of a copy may be read only by that copy and the next one; the last copy's
//! carried values become the loop's outputs. Constants the block reads are copied into the
//! body (so the body's contractions are prepared with their weights); other invariants are
//! captures.
//!
//! The same search, with copies allowed to read constants of their own ([`find_stacked`]),
//! finds the stacked layers `saturate_egraph` optimises once ([`crate::egraph::shared`]).

use crate::manager::FastMap;
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

/// Steps from which a recurrence unrolled over time (copies that own per-step constants)
/// rolls. A rolled step pays the body's per-run overhead (about 4 µs on an AMD EPYC: a
/// whole plan run per iteration), which made the shared 16-step rwkv_tiny and mamba_tiny
/// 1.2-1.3x slower rolled; from 64 steps on, the full-width RWKV-4 and Mamba exports of
/// `scripts/make_unrolled_models.py` ran as fast or faster rolled (`bench/unrolled.md`),
/// and the unrolled graph (compile time, code) grows with every step.
pub const MIN_STEPPED_TRIPS: usize = 32;

/// Steps from which a recurrence whose step is only elementwise math, row gathers, matmuls,
/// views and shape arithmetic ([`native_step`]) rolls: such a loop runs on the stepped
/// driver (`runtime/src/executor/stepped.rs`, no plan run per step) or lifts into a
/// `linear_scan`, and rolled it beat its unrolled form from 16 steps on (the full-width
/// Mamba and Elman RNN of `bench/unrolled.sh` at S = 16: 1.31 → 0.90 and 0.26 → 0.17 ms).
pub const MIN_NATIVE_STEP_TRIPS: usize = 16;

/// Whether every node of a step is one the stepped driver or the lifting runs natively
/// (see [`MIN_NATIVE_STEP_TRIPS`]); a `scatter_nd`, a reduction or any other op keeps the
/// step on the general path, which pays a whole plan run per step.
fn native_step(g: &Graph, block: &[usize]) -> bool {
    block.iter().all(|&ni| {
        let op = g.nodes[ni].op;
        op.family() == kiln_ir::ops::Family::Elementwise
            || matches!(
                op,
                OpKind::Gather
                    | OpKind::MatMul
                    | OpKind::Gemm
                    | OpKind::Reshape
                    | OpKind::Squeeze
                    | OpKind::Unsqueeze
                    | OpKind::Flatten
                    | OpKind::Identity
                    | OpKind::Shape
                    | OpKind::Concat
                    | OpKind::Expand
                    | OpKind::Constant
                    | OpKind::Cast
            )
    })
}

/// Rolls weight-tied repeated blocks, and recurrences unrolled over time of at least
/// `min_stepped_trips` steps, into `loop`s.
#[derive(Clone, Copy, Debug)]
pub struct RollBlocks {
    /// See [`MIN_STEPPED_TRIPS`] (the default).
    pub min_stepped_trips: usize,
    /// Only recurrences unrolled over time (the early `roll_recurrences` pass, which runs
    /// before the e-graph so that it and the passes after it see one step, not S).
    pub stepped_only: bool,
}

impl Default for RollBlocks {
    fn default() -> Self {
        RollBlocks {
            min_stepped_trips: MIN_STEPPED_TRIPS,
            stepped_only: false,
        }
    }
}

impl RollBlocks {
    /// The early pass that rolls only recurrences unrolled over time.
    pub fn recurrences() -> Self {
        RollBlocks {
            stepped_only: true,
            ..RollBlocks::default()
        }
    }
}

const NAME: &str = "roll_blocks";

impl Pass for RollBlocks {
    fn name(&self) -> &'static str {
        if self.stepped_only {
            "roll_recurrences"
        } else {
            NAME
        }
    }

    fn run(&self, g: &mut Graph) -> Result<PassStats, PassError> {
        rewrite::check_ids(g).map_err(|m| PassError::graph(NAME, m))?;
        let mut stats = PassStats::default();
        for _ in 0..MAX_ROLLS {
            let mode = Mode::Roll {
                min_stepped_trips: self.min_stepped_trips,
                stepped_only: self.stepped_only,
            };
            let Some(r) = find(g, mode) else { break };
            stats.removed += r.copies * r.body_nodes;
            stats.added += 1;
            stats.bump("loops", 1);
            stats.bump("body_nodes", r.body_nodes);
            stats.bump("trip_count", r.copies);
            stats.bump("carried", r.carried);
            let stepped = r
                .slots
                .iter()
                .flatten()
                .filter(|s| **s == Some(Slot::Param));
            let stepped = stepped.count();
            if stepped > 0 {
                stats.bump("stepped_constants", stepped);
            }
            apply(g, &r);
        }
        if stats.added > 0 {
            rewrite::remove_dead(g);
        }
        Ok(stats)
    }
}

/// What copies of a block may differ in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Nothing but the carried values, or small integer constants each copy has its own of
    /// (the per-step indices of a recurrence an exporter unrolled over time: `gather(k, t)`,
    /// `scatter_nd(out, [t], row)`); rolled into a `loop` that reads them from a stacked
    /// constant at its iteration number. A block whose copies own such constants rolls
    /// only from `min_stepped_trips` copies on.
    Roll {
        min_stepped_trips: usize,
        stepped_only: bool,
    },
    /// Also constants of any size each copy has its own of (a transformer's layers with
    /// their weights): found for `saturate_egraph` to optimise once, never rolled.
    Stacked,
}

/// A step's gather along an inner axis whose rows are shorter than this (in elements)
/// reads a copy of its tensor transposed steps-first (see [`apply`]).
const SHORT_ROW: u64 = 64;

/// Per-copy constants of at most this many elements roll (stacked, read by iteration).
pub const STEP_CONSTANT: usize = 64;

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
    /// weights when searching for stacked blocks, [`find_stacked`]; a step's index when
    /// rolling, [`Mode::Roll`]).
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
    /// Values every copy makes once, all read by one `concat` outside the blocks along an
    /// axis where they have size 1 (an exporter's `torch.stack` of a recurrence's
    /// per-step outputs): `(node, output)`, the concat node, the operand position of the
    /// first copy's value in it, and the axis. The loop returns them stacked.
    scans: Vec<Scan>,
}

/// A value the loop collects over its iterations (see [`Roll::scans`]).
#[derive(Clone, Copy, Debug)]
struct Scan {
    key: (usize, usize),
    concat: usize,
    start: usize,
    axis: usize,
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
    find(g, Mode::Stacked).map(|r| Stack {
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

/// Searches `g` for the roll that removes the most nodes; copies may read their own
/// constants ([`Slot::Param`]) as `mode` allows.
fn find(g: &Graph, mode: Mode) -> Option<Roll> {
    let seq: Vec<usize> = (0..g.nodes.len())
        .filter(|&i| g.nodes[i].op != OpKind::Constant)
        .collect();
    let n = seq.len();
    if !(2 * MIN_BODY_NODES..=MAX_SEARCH_NODES).contains(&n) {
        return None;
    }
    let sig: Vec<u64> = seq.iter().map(|&i| signature(&g.nodes[i], g)).collect();
    let cands = candidates(&sig);
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
            if let Some(mut r) = confirm(g, &producer, &users, blocks, mode) {
                // Copies before the run whose nodes the order interleaves with other
                // work (the first layer of an encoder, beside its mask computation).
                while let Some(longer) = extend_back(g, &producer, &users, &r, mode) {
                    r = longer;
                }
                let key = |r: &Roll| {
                    let norms = if mode == Mode::Stacked {
                        norm_carried(g, r)
                    } else {
                        0
                    };
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

/// The runs of `sig` (node signatures in order) worth confirming, best first: (saved nodes,
/// start, period, run length) of maximal runs where `sig[i] == sig[i + p]`, ranked by saved
/// nodes, then shorter period, then earlier start; at most MAX_CANDIDATES.
fn candidates(sig: &[u64]) -> Vec<(usize, usize, usize, usize)> {
    let n = sig.len();
    // Candidates (saved nodes, start, period, run length) from maximal runs per period.
    // A run of period `p` saves at most as many nodes as `sig[i] == sig[i + p]` holds for
    // (its matches): periods are scanned in order of their match counts, and the scan stops
    // once MAX_CANDIDATES candidates save more than any period left could. The candidates
    // kept are those a scan of every period would rank first; counting is a branch-free
    // pass the compiler vectorises, the run scan a branchy one.
    // Counted on the low 32 bits (SSE2 compares those, not 64): a collision only raises a
    // count, so it stays a bound.
    let low: Vec<u32> = sig.iter().map(|&s| s as u32).collect();
    let mut periods: Vec<(usize, usize)> = (MIN_BODY_NODES..=n / 2)
        .map(|p| (count_equal(&low[..n - p], &low[p..]), p))
        .filter(|&(m, p)| m >= p.max(MIN_SAVED_NODES))
        .collect();
    periods.sort_by(|x, y| y.0.cmp(&x.0).then(x.1.cmp(&y.1)));
    let mut cands: Vec<(usize, usize, usize, usize)> = vec![];
    // The saved counts of the candidates so far, largest first (at most MAX_CANDIDATES).
    let mut best_saved: Vec<usize> = vec![];
    for &(matches, p) in &periods {
        if best_saved.len() == MAX_CANDIDATES && best_saved[MAX_CANDIDATES - 1] > matches {
            break;
        }
        let (x, y) = (&sig[..n - p], &sig[p..]);
        let mut i = 0;
        while i < x.len() {
            i = next_match(x, y, i);
            if i == x.len() {
                break;
            }
            let a = i;
            while i < x.len() && x[i] == y[i] {
                i += 1;
            }
            let run = i - a;
            if run >= p {
                let saved = (run / p) * p;
                if saved >= MIN_SAVED_NODES {
                    cands.push((saved, a, p, run));
                    let at = best_saved.partition_point(|&s| s >= saved);
                    best_saved.insert(at, saved);
                    best_saved.truncate(MAX_CANDIDATES);
                }
            }
        }
    }
    cands.sort_by(|x, y| y.0.cmp(&x.0).then(x.2.cmp(&y.2)).then(x.1.cmp(&y.1)));
    cands.truncate(MAX_CANDIDATES);
    cands
}

/// How many `i` have `x[i] == y[i]`, in 16 lanes (vectorised: the count runs for every
/// period of [`candidates`]). A lane counts at most `len / 16` pairs, and `find` searches at
/// most MAX_SEARCH_NODES signatures, so a `u32` lane never overflows.
fn count_equal(x: &[u32], y: &[u32]) -> usize {
    const LANES: usize = 16;
    let mut acc = [0u32; LANES];
    let (xc, yc) = (x.chunks_exact(LANES), y.chunks_exact(LANES));
    let tail = xc
        .remainder()
        .iter()
        .zip(yc.remainder())
        .filter(|(a, b)| a == b)
        .count();
    for (a, b) in xc.zip(yc) {
        for l in 0..LANES {
            acc[l] += u32::from(a[l] == b[l]);
        }
    }
    tail + acc.iter().map(|&c| c as usize).sum::<usize>()
}

/// The first `i' >= i` where `x[i'] == y[i']`, or `x.len()`: the period scan of [`find`]
/// is quadratic in the nodes and mostly mismatches, so whole blocks of 16 are ruled out at
/// a time (a comparison the compiler vectorises).
fn next_match(x: &[u64], y: &[u64], mut i: usize) -> usize {
    const BLOCK: usize = 16;
    while i + BLOCK <= x.len() {
        let any = x[i..i + BLOCK]
            .iter()
            .zip(&y[i..i + BLOCK])
            .fold(false, |acc, (a, b)| acc | (a == b));
        if any {
            break;
        }
        i += BLOCK;
    }
    while i < x.len() && x[i] != y[i] {
        i += 1;
    }
    i
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
    mode: Mode,
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
    confirm(g, producer, users, blocks, mode)
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

/// Whether `a` and `b` are both defined by constants of the same type that `mode` lets
/// copies own: with [`Mode::Stacked`] any with more than one element (a scalar that
/// differs between copies is a different block there: rules match on scalar values such
/// as a GELU's constants); with [`Mode::Roll`] integer or boolean ones of at most
/// [`STEP_CONSTANT`] elements, scalars included (a float weight stacked into a loop would
/// lose its packing at compile time).
fn per_copy_constant(
    g: &Graph,
    producer: &[Option<usize>],
    a: ValueId,
    b: ValueId,
    mode: Mode,
) -> bool {
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
            let owned = match mode {
                Mode::Stacked => x.len() > 1,
                Mode::Roll { .. } => {
                    x.len() <= STEP_CONSTANT
                        && matches!(
                            x.dtype(),
                            DType::I64
                                | DType::I32
                                | DType::I16
                                | DType::I8
                                | DType::U8
                                | DType::Bool
                        )
                }
            };
            owned && x.shape() == y.shape() && x.dtype() == y.dtype() && g.ty(a) == g.ty(b)
        }
        _ => false,
    }
}

/// Checks that `blocks` are copies of one block chained by carried values, and
/// classifies the first copy's operands; copies may read their own constants as `mode`
/// allows.
fn confirm(
    g: &Graph,
    producer: &[Option<usize>],
    users: &[Vec<usize>],
    blocks: Vec<Vec<usize>>,
    mode: Mode,
) -> Option<Roll> {
    let p = blocks[0].len();
    let copies = blocks.len();
    // node index -> (copy, position in the copy)
    let mut at: FastMap<usize, (usize, usize)> = FastMap::default();
    at.reserve(copies * p);
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
                        } else if per_copy_constant(g, producer, a, b, mode) {
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
    // copy's values outside the blocks only where they are carried (loop outputs), or by
    // the one concat that collects every copy's (when rolling).
    let mut collectors: HashMap<(usize, usize), usize> = HashMap::new();
    for (k, b) in blocks.iter().enumerate() {
        for (j, &ni) in b.iter().enumerate() {
            for (o, &v) in g.nodes[ni].outputs.iter().enumerate() {
                for &u in &users[v.index()] {
                    let ku = at.get(&u).map(|&(ku, _)| ku);
                    let ok = match ku {
                        Some(ku) => ku == k || (ku == k + 1 && is_key.contains(&(j, o))),
                        None => k + 1 == copies && is_key.contains(&(j, o)),
                    };
                    if ok {
                        continue;
                    }
                    let collects = matches!(mode, Mode::Roll { .. })
                        && ku.is_none()
                        && u != usize::MAX
                        && !is_key.contains(&(j, o))
                        && g.nodes[u].op == OpKind::Concat;
                    if !collects || *collectors.entry((j, o)).or_insert(u) != u {
                        return None;
                    }
                }
            }
        }
    }
    let mut scans = vec![];
    for (&key, &c) in &collectors {
        scans.push(collected(g, &blocks, users, key, c)?);
    }
    scans.sort_by_key(|s| s.key);
    // The loop sits where the last copy ends: what reads its outputs must come later.
    let end = blocks[copies - 1].iter().copied().max().unwrap_or(0);
    if scans.iter().any(|s| s.concat < end) {
        return None;
    }
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
    if let Mode::Roll {
        min_stepped_trips,
        stepped_only,
    } = mode
    {
        let stepped = slots.iter().flatten().any(|s| *s == Some(Slot::Param));
        let min_trips = if native_step(g, &blocks[0]) {
            min_stepped_trips.min(MIN_NATIVE_STEP_TRIPS)
        } else {
            min_stepped_trips
        };
        if (stepped && copies < min_trips) || (stepped_only && !stepped) {
            return None;
        }
    }
    Some(Roll {
        blocks,
        body_nodes: p,
        copies,
        carried: keys.len(),
        slots,
        keys,
        scans,
    })
}

/// The scan of value `key` of every copy by concat node `c`: its operands hold every
/// copy's value, in order, once, and nothing else outside the blocks reads them; the
/// values have a known rank and size 1 along the concat's axis.
fn collected(
    g: &Graph,
    blocks: &[Vec<usize>],
    users: &[Vec<usize>],
    key: (usize, usize),
    c: usize,
) -> Option<Scan> {
    let (j, o) = key;
    let vals: Vec<ValueId> = blocks.iter().map(|b| g.nodes[b[j]].outputs[o]).collect();
    let ins = &g.nodes[c].inputs;
    let start = ins.iter().position(|i| *i == Some(vals[0]))?;
    if ins.len() < start + vals.len()
        || ins[start..start + vals.len()]
            .iter()
            .zip(&vals)
            .any(|(i, v)| *i != Some(*v))
        || ins
            .iter()
            .filter(|i| vals.iter().any(|v| **i == Some(*v)))
            .count()
            != vals.len()
    {
        return None;
    }
    let taken: HashSet<usize> = blocks.iter().flatten().copied().collect();
    for v in &vals {
        if users[v.index()]
            .iter()
            .any(|&u| u != c && !taken.contains(&u))
        {
            return None;
        }
    }
    let dims = g.ty(vals[0]).shape.dims()?;
    let rank = dims.len() as i64;
    let axis = g.nodes[c].attrs.get("axis").and_then(|a| match a {
        Attr::Int(x) => Some(*x),
        _ => None,
    })?;
    let axis = if axis < 0 { axis + rank } else { axis };
    if !(0..rank).contains(&axis) || dims[axis as usize] != kiln_ir::Dim::Fixed(1) {
        return None;
    }
    Some(Scan {
        key,
        concat: c,
        start,
        axis: axis as usize,
    })
}

fn scalar(d: DType) -> TensorType {
    TensorType::new(d, Shape::new(vec![]))
}

/// Replaces the copies by a `loop` node placed where the last copy ended.
fn apply(g: &mut Graph, r: &Roll) {
    let producer = rewrite::producers(g);
    let mut names = Names::new(g);
    let end = r.blocks[r.copies - 1]
        .iter()
        .copied()
        .max()
        .expect("a body has nodes");
    let step_only = step_only_nodes(g, r, end);
    let mut body = Graph::new(&format!("{}_block", g.name));
    let mut body_names: HashSet<String> = HashSet::new();
    let mut fresh = |base: &str| {
        let mut n = base.to_string();
        let mut i = 0;
        while !body_names.insert(n.clone()) {
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
    // A step's slice of an outer tensor along an inner axis with short rows (Mamba's
    // `gather(dA, t, axis=2)` over [batch, inner, S, state]) is a strided copy every
    // iteration; the tensor is transposed once before the loop so that each step's slice
    // is contiguous, and the body gathers along axis 0.
    let mut pre: Vec<Node> = vec![];
    let mut steps_first: HashMap<usize, ValueId> = HashMap::new();
    let mut transposed: HashMap<(ValueId, usize), ValueId> = HashMap::new();
    for (j, row) in r.slots.iter().enumerate().filter(|(j, _)| !step_only[*j]) {
        let n = &g.nodes[r.blocks[0][j]];
        let (Some(Some(Slot::Invariant(x))), Some(Some(Slot::Param))) = (row.first(), row.get(1))
        else {
            continue;
        };
        let x = *x;
        if n.op != OpKind::Gather
            || producer[x.index()].is_some_and(|ni| g.nodes[ni].op == OpKind::Constant)
        {
            continue;
        }
        let Some(dims) = g.ty(x).shape.dims().map(|d| d.to_vec()) else {
            continue;
        };
        let rank = dims.len() as i64;
        let axis = n.attrs.get("axis").and_then(|a| match a {
            Attr::Int(v) => Some(*v),
            _ => None,
        });
        let axis = axis.unwrap_or(0);
        let axis = if axis < 0 { axis + rank } else { axis };
        let idx_scalar = g
            .ty(n.inputs[1].expect("a gather has indices"))
            .shape
            .rank()
            == Some(0);
        if axis <= 0 || axis >= rank || !idx_scalar {
            continue;
        }
        let a = axis as usize;
        let row_len: Option<u64> = dims[a + 1..].iter().map(|d| d.fixed()).product();
        if row_len.is_none_or(|l| l >= SHORT_ROW) {
            continue;
        }
        let xt = *transposed.entry((x, a)).or_insert_with(|| {
            let perm: Vec<i64> = std::iter::once(a as i64)
                .chain((0..rank).filter(|&i| i != a as i64))
                .collect();
            let moved: Vec<kiln_ir::Dim> = perm.iter().map(|&i| dims[i as usize].clone()).collect();
            let name = names.fresh(format!("{}_steps_first", g.value(x).name));
            let ty = TensorType::new(g.ty(x).dtype, Shape::new(moved));
            let xt = g.add_value(&name, ty);
            pre.push(Node {
                op: OpKind::Transpose,
                attrs: Attrs::new().with("perm", Attr::Ints(perm)),
                inputs: vec![Some(x)],
                outputs: vec![xt],
                name: String::new(),
            });
            xt
        });
        steps_first.insert(j, xt);
    }
    // Invariants: constants are copied in, other values captured (in first-use order).
    let mut captures: Vec<ValueId> = vec![];
    let mut outer: HashMap<ValueId, ValueId> = HashMap::new();
    let mut constants: Vec<(ValueId, Arc<Tensor>)> = vec![];
    for (j, row) in r.slots.iter().enumerate().filter(|(j, _)| !step_only[*j]) {
        for (sl, s) in row.iter().enumerate() {
            let Some(s) = s else { continue };
            let s = match (sl, steps_first.get(&j)) {
                (0, Some(&xt)) => &Slot::Invariant(xt),
                _ => s,
            };
            if let Slot::Invariant(v) = *s {
                if outer.contains_key(&v) || constants.iter().any(|(c, _)| *c == v) {
                    continue;
                }
                let konst = (producer.get(v.index()).copied().flatten())
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
    // Per-copy constants (a step's indices): stacked on a new axis 0, read at the
    // iteration number. One stack per distinct sequence of values.
    let iter = body.inputs[0];
    let mut stepped: HashMap<(usize, usize), ValueId> = HashMap::new();
    let mut stacks: HashMap<Vec<ValueId>, ValueId> = HashMap::new();
    for (j, row) in r.slots.iter().enumerate().filter(|(j, _)| !step_only[*j]) {
        for (sl, s) in row.iter().enumerate() {
            if *s != Some(Slot::Param) {
                continue;
            }
            let per_copy: Vec<ValueId> = r
                .blocks
                .iter()
                .map(|b| g.nodes[b[j]].inputs[sl].expect("a classified operand is present"))
                .collect();
            if let Some(&id) = stacks.get(&per_copy) {
                stepped.insert((j, sl), id);
                continue;
            }
            let first = per_copy[0];
            let parts: Vec<Arc<Tensor>> = per_copy
                .iter()
                .map(|v| {
                    producer[v.index()]
                        .and_then(|ni| g.nodes[ni].attrs.tensor("value").ok().flatten())
                        .expect("a per-copy operand is a constant (confirm)")
                })
                .collect();
            let mut shape = vec![parts.len()];
            shape.extend_from_slice(parts[0].shape());
            let bytes: Vec<u8> = parts.iter().flat_map(|t| t.data().to_le_bytes()).collect();
            let dtype = parts[0].dtype();
            let data = kiln_ir::TensorData::from_le_bytes(dtype, &bytes)
                .expect("constants of one dtype concatenate");
            let stacked = Tensor::new(shape.clone(), data).expect("stacked shape matches its data");
            let base = g.value(first).name.clone();
            let all = body.add_node(
                OpKind::Constant,
                Attrs::new().with("value", Attr::Tensor(Arc::new(stacked))),
                vec![],
                vec![(
                    fresh(&format!("{base}_steps")),
                    TensorType::new(dtype, Shape::fixed(&shape)),
                )],
                "",
            )[0];
            let step = body.add_node(
                OpKind::Gather,
                Attrs::new().with("axis", Attr::Int(0)),
                vec![Some(all), Some(iter)],
                vec![(fresh(&base), g.ty(first).clone())],
                "",
            )[0];
            stacks.insert(per_copy, step);
            stepped.insert((j, sl), step);
        }
    }
    // Values the step-only nodes compute for the rest of the body: every copy's stays in
    // the outer graph (shape and index arithmetic there is memoised per input shapes),
    // stacked on a new axis 0 and captured; the body reads its step's slice.
    let mut inner: HashMap<(usize, usize), ValueId> = HashMap::new();
    let mut frontier: Vec<(usize, usize)> = vec![];
    for (_, row) in r.slots.iter().enumerate().filter(|(j, _)| !step_only[*j]) {
        for s in row.iter().flatten() {
            if let Slot::Internal(jj, o) = *s {
                if step_only[jj] && !frontier.contains(&(jj, o)) {
                    frontier.push((jj, o));
                }
            }
        }
    }
    for &(jj, o) in &frontier {
        let per_copy: Vec<ValueId> = r.blocks.iter().map(|b| g.nodes[b[jj]].outputs[o]).collect();
        let first = per_copy[0];
        let ty = g.ty(first).clone();
        let base = g.value(first).name.clone();
        let axes_name = names.fresh(format!("{base}_stack_axis"));
        let axes = g.add_value(&axes_name, TensorType::new(DType::I64, Shape::fixed(&[1])));
        pre.push(Node {
            op: OpKind::Constant,
            attrs: Attrs::new().with(
                "value",
                Attr::Tensor(Arc::new(Tensor::from_vec(vec![1], vec![0i64]))),
            ),
            inputs: vec![],
            outputs: vec![axes],
            name: String::new(),
        });
        let mut one_dims = vec![kiln_ir::Dim::Fixed(1)];
        let mut all_dims = vec![kiln_ir::Dim::Fixed(r.copies as u64)];
        let stacked_ty = match ty.shape.dims() {
            Some(d) => {
                one_dims.extend(d.iter().cloned());
                all_dims.extend(d.iter().cloned());
                (
                    TensorType::new(ty.dtype, Shape::new(one_dims)),
                    TensorType::new(ty.dtype, Shape::new(all_dims)),
                )
            }
            None => (
                TensorType::new(ty.dtype, Shape::unknown()),
                TensorType::new(ty.dtype, Shape::unknown()),
            ),
        };
        let mut parts = vec![];
        for (k, &v) in per_copy.iter().enumerate() {
            let name = names.fresh(format!("{base}_step{k}"));
            let u = g.add_value(&name, stacked_ty.0.clone());
            pre.push(Node {
                op: OpKind::Unsqueeze,
                attrs: Attrs::new(),
                inputs: vec![Some(v), Some(axes)],
                outputs: vec![u],
                name: String::new(),
            });
            parts.push(Some(u));
        }
        let all_name = names.fresh(format!("{base}_steps"));
        let all = g.add_value(&all_name, stacked_ty.1.clone());
        pre.push(Node {
            op: OpKind::Concat,
            attrs: Attrs::new().with("axis", Attr::Int(0)),
            inputs: parts,
            outputs: vec![all],
            name: String::new(),
        });
        let all_in = body.add_input(&fresh(&all_name), stacked_ty.1);
        captures.push(all);
        let step = body.add_node(
            OpKind::Gather,
            Attrs::new().with("axis", Attr::Int(0)),
            vec![Some(all_in), Some(iter)],
            vec![(fresh(&base), ty)],
            "",
        )[0];
        inner.insert((jj, o), step);
    }
    // The other nodes of the first copy, operands resolved by class.
    for (j, &ni) in r.blocks[0].iter().enumerate() {
        if step_only[j] {
            continue;
        }
        let n = &g.nodes[ni];
        let inputs = n
            .inputs
            .iter()
            .zip(&r.slots[j])
            .enumerate()
            .map(|(sl, (i, s))| {
                i.map(|v| match s {
                    Some(Slot::Internal(jj, o)) => inner[&(*jj, *o)],
                    Some(Slot::Carried(jj, o)) => carried_in[&(*jj, *o)],
                    Some(Slot::Invariant(_)) if sl == 0 && steps_first.contains_key(&j) => {
                        outer[&steps_first[&j]]
                    }
                    Some(Slot::Invariant(x)) => outer[x],
                    Some(Slot::Param) => stepped[&(j, sl)],
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
        let attrs = if steps_first.contains_key(&j) {
            n.attrs.clone().with("axis", Attr::Int(0))
        } else {
            n.attrs.clone()
        };
        let outs = body.add_node(n.op, attrs, inputs, outputs, &n.name);
        for (o, id) in outs.into_iter().enumerate() {
            inner.insert((j, o), id);
        }
    }
    body.outputs = std::iter::once(cond)
        .chain(r.keys.iter().map(|(k, _)| inner[k]))
        .chain(r.scans.iter().map(|s| inner[&s.key]))
        .collect();

    // The loop node: a constant trip count, no condition, initial values, captures.
    let last = r.blocks[r.copies - 1].clone();
    let trip_name = names.fresh(format!(
        "{}_trips",
        g.value(g.nodes[last[0]].outputs[0]).name
    ));
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
    let mut outputs: Vec<ValueId> = r
        .keys
        .iter()
        .map(|((j, o), _)| g.nodes[last[*j]].outputs[*o])
        .collect();
    // Scanned values: stacked on a new axis 0 by the loop, then squeezed and moved to the
    // collecting concat's axis, where they replace every copy's value.
    let mut post: Vec<Node> = vec![];
    for sc in &r.scans {
        let v0 = g.nodes[r.blocks[0][sc.key.0]].outputs[sc.key.1];
        let ty = g.ty(v0).clone();
        let dims = ty
            .shape
            .dims()
            .expect("a scanned value has a known rank")
            .to_vec();
        let base = g.value(v0).name.clone();
        let n = kiln_ir::Dim::Fixed(r.copies as u64);
        let stacked_dims: Vec<kiln_ir::Dim> = std::iter::once(n.clone())
            .chain(dims.iter().cloned())
            .collect();
        let name = names.fresh(format!("{base}_scanned"));
        let stacked = g.add_value(&name, TensorType::new(ty.dtype, Shape::new(stacked_dims)));
        outputs.push(stacked);
        let name = names.fresh(format!("{base}_scan_axis"));
        let axes = g.add_value(&name, TensorType::new(DType::I64, Shape::fixed(&[1])));
        post.push(Node {
            op: OpKind::Constant,
            attrs: Attrs::new().with(
                "value",
                Attr::Tensor(Arc::new(Tensor::from_vec(
                    vec![1],
                    vec![sc.axis as i64 + 1],
                ))),
            ),
            inputs: vec![],
            outputs: vec![axes],
            name: String::new(),
        });
        let mut squeezed_dims = vec![n.clone()];
        squeezed_dims.extend(
            dims.iter()
                .enumerate()
                .filter(|(i, _)| *i != sc.axis)
                .map(|(_, d)| d.clone()),
        );
        let name = names.fresh(format!("{base}_scan_squeezed"));
        let squeezed = g.add_value(&name, TensorType::new(ty.dtype, Shape::new(squeezed_dims)));
        post.push(Node {
            op: OpKind::Squeeze,
            attrs: Attrs::new(),
            inputs: vec![Some(stacked), Some(axes)],
            outputs: vec![squeezed],
            name: String::new(),
        });
        let mut result = squeezed;
        if sc.axis > 0 {
            let rank = dims.len();
            let perm: Vec<i64> = (1..=sc.axis as i64)
                .chain(std::iter::once(0))
                .chain(sc.axis as i64 + 1..rank as i64)
                .collect();
            let mut moved = dims.clone();
            moved[sc.axis] = n;
            let name = names.fresh(format!("{base}_scan"));
            result = g.add_value(&name, TensorType::new(ty.dtype, Shape::new(moved)));
            post.push(Node {
                op: OpKind::Transpose,
                attrs: Attrs::new().with("perm", Attr::Ints(perm)),
                inputs: vec![Some(squeezed)],
                outputs: vec![result],
                name: String::new(),
            });
        }
        let c = &mut g.nodes[sc.concat];
        let mut ins: Vec<Option<ValueId>> = c.inputs[..sc.start].to_vec();
        ins.push(Some(result));
        ins.extend_from_slice(&c.inputs[sc.start + r.copies..]);
        c.inputs = ins;
    }
    let loop_node = Node {
        op: OpKind::Loop,
        attrs: Attrs::new()
            .with("body", Attr::Graph(Arc::new(body)))
            .with("num_captures", Attr::Int(captures.len() as i64)),
        inputs,
        outputs,
        name: g.nodes[last[0]].name.clone(),
    };
    // Step-only nodes stay (their values are stacked above); the rest of every copy goes.
    let gone: HashSet<usize> = r
        .blocks
        .iter()
        .flat_map(|b| b.iter().enumerate().filter(|(j, _)| !step_only[*j]))
        .map(|(_, &ni)| ni)
        .collect();
    let old = std::mem::take(&mut g.nodes);
    let mut pending = Some((pre, trip_node, loop_node, post));
    for (i, n) in old.into_iter().enumerate() {
        if !gone.contains(&i) {
            g.nodes.push(n);
        }
        if i == end {
            if let Some((pre, t, l, post)) = pending.take() {
                g.nodes.extend(pre);
                g.nodes.push(t);
                g.nodes.push(l);
                g.nodes.extend(post);
            }
        }
    }
}

/// The value names of a graph, for making fresh ones: one set per [`apply`], which names a
/// value per step of a long recurrence (a set per name was quadratic in the steps).
struct Names(HashSet<String>);

impl Names {
    fn new(g: &Graph) -> Names {
        Names(g.values.iter().map(|v| v.name.clone()).collect())
    }

    /// `want`, or `want` with underscores appended until no value has the name; the name
    /// is then taken.
    fn fresh(&mut self, want: String) -> String {
        let mut n = want;
        while self.0.contains(&n) {
            n.push('_');
        }
        self.0.insert(n.clone());
        n
    }
}

/// Per node of `r`'s block: whether it computes integer or boolean values only from the
/// step's own constants and loop invariants (no carried value): index arithmetic such as
/// a step's scatter indices. Such nodes are left in the outer graph for every copy (where they are
/// memoised shape arithmetic) instead of recomputed in the body each iteration. A node
/// producing a carried value stays in the body (the loop returns the last copy's); none
/// is step-only where one would sit after the loop's place.
fn step_only_nodes(g: &Graph, r: &Roll, end: usize) -> Vec<bool> {
    let p = r.body_nodes;
    // Index arithmetic only: a step's slice of float data is read in the body directly
    // (stacking it outside would copy every step's data once more).
    let index_like = |j: usize| {
        g.nodes[r.blocks[0][j]]
            .outputs
            .iter()
            .all(|&v| matches!(g.ty(v).dtype, DType::I64 | DType::I32 | DType::Bool))
    };
    let keyed: HashSet<usize> = r
        .keys
        .iter()
        .map(|((j, _), _)| *j)
        .chain(r.scans.iter().map(|s| s.key.0))
        .collect();
    let mut only = vec![false; p];
    let mut reads_param = vec![false; p];
    for j in 0..p {
        let mut ok = true;
        let mut param = false;
        for s in r.slots[j].iter().flatten() {
            match *s {
                Slot::Param => param = true,
                Slot::Invariant(_) => {}
                Slot::Internal(jj, _) if only[jj] => param |= reads_param[jj],
                _ => ok = false,
            }
        }
        only[j] = ok && param && !keyed.contains(&j) && index_like(j);
        reads_param[j] = param;
    }
    let late = r
        .blocks
        .iter()
        .any(|b| b.iter().zip(&only).any(|(&ni, &o)| o && ni > end));
    if late {
        return vec![false; p];
    }
    only
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    /// [`candidates`] as a scan of every period ranks them (the bound it prunes with must
    /// not change which runs are confirmed).
    fn candidates_by_scanning_every_period(sig: &[u64]) -> Vec<(usize, usize, usize, usize)> {
        let n = sig.len();
        let mut cands = vec![];
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
                if run >= p && (run / p) * p >= MIN_SAVED_NODES {
                    cands.push(((run / p) * p, a, p, run));
                }
            }
        }
        cands.sort_by(|x, y| y.0.cmp(&x.0).then(x.2.cmp(&y.2)).then(x.1.cmp(&y.1)));
        cands.truncate(MAX_CANDIDATES);
        cands
    }

    #[test]
    fn pruned_candidates_equal_those_of_a_scan_of_every_period() {
        let mut rng = Rng::new(11);
        let mut next = |m: u64| rng.next() % m;
        for trial in 0..60 {
            // Noise with blocks repeated back to back planted in it (several periods,
            // copies and alphabets), so runs of many lengths compete.
            let alphabet = [3u64, 8, 50][trial % 3];
            let mut sig: Vec<u64> = vec![];
            while sig.len() < 400 + 20 * trial {
                if next(3) == 0 {
                    let p = 4 + next(30) as usize;
                    let block: Vec<u64> = (0..p).map(|_| next(alphabet)).collect();
                    for _ in 0..2 + next(6) {
                        sig.extend(&block);
                    }
                } else {
                    sig.extend((0..next(40)).map(|_| next(alphabet)));
                }
            }
            assert_eq!(
                candidates(&sig),
                candidates_by_scanning_every_period(&sig),
                "trial {trial}"
            );
        }
    }

    #[test]
    fn the_lane_count_of_equal_pairs_is_the_plain_count() {
        let mut rng = Rng::new(5);
        let mut next = |m: u64| (rng.next() % m) as u32;
        for len in [0usize, 1, 15, 16, 17, 33, 1000] {
            for alphabet in [1u64, 2, 9] {
                let x: Vec<u32> = (0..len).map(|_| next(alphabet)).collect();
                let y: Vec<u32> = (0..len).map(|_| next(alphabet)).collect();
                let plain = x.iter().zip(&y).filter(|(a, b)| a == b).count();
                assert_eq!(count_equal(&x, &y), plain, "len {len}, alphabet {alphabet}");
            }
        }
    }

    #[test]
    fn the_blockwise_match_scan_finds_what_a_plain_scan_finds() {
        // Signatures from a small alphabet, so matches are sparse and dense by turns.
        let mut rng = Rng::new(3);
        let mut next = |m: u64| rng.next() % m;
        for len in [0usize, 1, 15, 16, 17, 40, 300] {
            for alphabet in [2u64, 7, 1000] {
                let x: Vec<u64> = (0..len).map(|_| next(alphabet)).collect();
                let y: Vec<u64> = (0..len).map(|_| next(alphabet)).collect();
                for i in 0..=len {
                    let plain = (i..len).find(|&j| x[j] == y[j]).unwrap_or(len);
                    assert_eq!(next_match(&x, &y, i), plain, "len {len}, from {i}");
                }
            }
        }
    }

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
            let stats = RollBlocks::default().run(&mut g).unwrap();
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

    /// A recurrence unrolled over `steps` the way exporters write it: step `t` reads
    /// `x[:, t]` (`gather` with the constant `t`), updates `h = tanh(h·w + x_t)`, writes
    /// `h` into row `t` of a carried buffer with `scatter_nd` (indices built from the
    /// constant `[t]`), and every step's `h` is also collected by one `concat` of
    /// `unsqueeze`d values (a `torch.stack`). `x` has short rows, so the roll reads it
    /// transposed steps-first.
    fn unrolled(steps: usize) -> Graph {
        let (b, d) = (2usize, 4usize);
        let mut g = Graph::new("unrolled");
        let x = g.add_input("x", f32_ty(&[b, steps, d]));
        let h0 = g.add_input("h0", f32_ty(&[b, d]));
        let buf0 = g.add_input("buf", f32_ty(&[b, steps, d]));
        let mut rng = Rng::new(11);
        let w = g.add_constant("w", rng.tensor(DType::F32, &[d, d]));
        let rows = g.add_constant("rows", Tensor::from_vec(vec![b, 1], vec![0i64, 1]));
        let shape = g.add_constant("shape", Tensor::from_vec(vec![2], vec![b as i64, 1]));
        let one = g.add_constant("one", Tensor::from_vec(vec![1], vec![1i64]));
        let i64_ty = |dims: &[usize]| TensorType::new(DType::I64, Shape::fixed(dims));
        let (mut h, mut buf) = (h0, buf0);
        let mut ys = vec![];
        for t in 0..steps {
            let ti = g.add_constant(&format!("t{t}"), Tensor::scalar(t as i64));
            let tv = g.add_constant(&format!("tv{t}"), Tensor::from_vec(vec![1], vec![t as i64]));
            let axis1 = Attrs::new().with("axis", Attr::Int(1));
            let xt = node_with(
                &mut g,
                OpKind::Gather,
                axis1,
                &[x, ti],
                &format!("x{t}"),
                f32_ty(&[b, d]),
            );
            let m = node(
                &mut g,
                OpKind::MatMul,
                &[h, w],
                &format!("m{t}"),
                f32_ty(&[b, d]),
            );
            let a = node(
                &mut g,
                OpKind::Add,
                &[m, xt],
                &format!("a{t}"),
                f32_ty(&[b, d]),
            );
            h = node(
                &mut g,
                OpKind::Tanh,
                &[a],
                &format!("state{t}"),
                f32_ty(&[b, d]),
            );
            let e = node(
                &mut g,
                OpKind::Expand,
                &[tv, shape],
                &format!("e{t}"),
                i64_ty(&[b, 1]),
            );
            let axis_last = Attrs::new().with("axis", Attr::Int(-1));
            let idx = node_with(
                &mut g,
                OpKind::Concat,
                axis_last,
                &[rows, e],
                &format!("i{t}"),
                i64_ty(&[b, 2]),
            );
            buf = node(
                &mut g,
                OpKind::ScatterND,
                &[buf, idx, h],
                &format!("s{t}"),
                f32_ty(&[b, steps, d]),
            );
            ys.push(node(
                &mut g,
                OpKind::Unsqueeze,
                &[h, one],
                &format!("y{t}"),
                f32_ty(&[b, 1, d]),
            ));
        }
        let axis1 = Attrs::new().with("axis", Attr::Int(1));
        let stacked = node_with(
            &mut g,
            OpKind::Concat,
            axis1,
            &ys,
            "ys",
            f32_ty(&[b, steps, d]),
        );
        g.outputs = vec![h, buf, stacked];
        g
    }

    /// A step of row gathers, a matmul and elementwise math rolls from
    /// [`MIN_NATIVE_STEP_TRIPS`] steps on; the same step writing a buffer with `scatter_nd`
    /// (the general path's) waits for [`MIN_STEPPED_TRIPS`].
    #[test]
    fn native_steps_roll_from_fewer_steps_than_others() {
        let steps = MIN_NATIVE_STEP_TRIPS + 2;
        assert!(steps < MIN_STEPPED_TRIPS);
        let with_scatter = unrolled(steps);
        let mut g = with_scatter.clone();
        assert!(RollBlocks::recurrences().run(&mut g).unwrap().is_noop());
        // Without the buffer output the scatters are dead: the step is native.
        let mut g = with_scatter.clone();
        g.outputs.remove(1);
        rewrite::remove_dead(&mut g);
        let before = g.clone();
        let stats = RollBlocks::recurrences().run(&mut g).unwrap();
        assert_eq!(stats.counter("loops"), 1, "{stats}");
        kiln_ir::verify(&g).unwrap();
        assert_same_outputs(&before, &g);
    }

    #[test]
    fn a_recurrence_unrolled_over_time_rolls_with_per_step_indices_and_a_stacked_output() {
        for steps in [5, 9] {
            let mut g = unrolled(steps);
            kiln_ir::verify(&g).unwrap();
            let before = g.clone();
            // Below the default's step count it stays unrolled.
            assert!(RollBlocks::default().run(&mut g.clone()).unwrap().is_noop());
            let stats = RollBlocks {
                min_stepped_trips: 2,
                ..RollBlocks::default()
            }
            .run(&mut g)
            .unwrap();
            kiln_ir::verify(&g).unwrap();
            let text = kiln_ir::text::print(&g);
            assert_eq!(stats.counter("loops"), 1, "{text}");
            assert_eq!(stats.counter("trip_count"), steps, "{text}");
            assert!(stats.counter("stepped_constants") >= 1, "{stats}");
            // The per-step reads of x became one transpose, the stack one loop output.
            assert_eq!(
                ops(&g).iter().filter(|o| **o == OpKind::Transpose).count(),
                2,
                "{text}"
            );
            let ys = g
                .nodes
                .iter()
                .find(|n| g.value(n.outputs[0]).name == "ys")
                .unwrap();
            assert_eq!(
                ys.inputs.len(),
                1,
                "the stack still reads every step: {text}"
            );
            // The index arithmetic stays outside the body (memoised there), one per step.
            let l = g.nodes.iter().find(|n| n.op == OpKind::Loop).unwrap();
            let body = l.attrs.req_graph("body").unwrap();
            assert!(!body.nodes.iter().any(|n| n.op == OpKind::Expand), "{text}");
            assert_same_outputs(&before, &g);
            assert_eq!(kiln_ir::text::parse(&text).unwrap(), g);
        }
    }

    #[test]
    fn the_early_pass_rolls_recurrences_and_leaves_tied_layers() {
        let mut tied_layers = tied(6);
        let early = RollBlocks {
            min_stepped_trips: 2,
            ..RollBlocks::recurrences()
        };
        assert_eq!(early.name(), "roll_recurrences");
        assert!(early.run(&mut tied_layers).unwrap().is_noop());
        let mut g = unrolled(7);
        let before = g.clone();
        let stats = early.run(&mut g).unwrap();
        assert_eq!(stats.counter("loops"), 1, "{stats}");
        assert_same_outputs(&before, &g);
    }

    #[test]
    fn per_step_float_constants_do_not_roll() {
        // Steps that differ in a float constant are different blocks for rolling (a
        // stacked float weight would lose its packing).
        let mut g = Graph::new("float_steps");
        let x = g.add_input("x", f32_ty(&[2, 4]));
        let mut h = x;
        for t in 0..6 {
            let c = g.add_constant(
                &format!("c{t}"),
                Tensor::from_vec(vec![4], vec![t as f32; 4]),
            );
            let a = node(
                &mut g,
                OpKind::Add,
                &[h, c],
                &format!("a{t}"),
                f32_ty(&[2, 4]),
            );
            let s = node(
                &mut g,
                OpKind::Tanh,
                &[a],
                &format!("s{t}"),
                f32_ty(&[2, 4]),
            );
            let m = node(
                &mut g,
                OpKind::Mul,
                &[s, s],
                &format!("m{t}"),
                f32_ty(&[2, 4]),
            );
            h = node(
                &mut g,
                OpKind::Sub,
                &[m, h],
                &format!("h{t}"),
                f32_ty(&[2, 4]),
            );
        }
        g.outputs = vec![h];
        let stats = RollBlocks {
            min_stepped_trips: 2,
            ..RollBlocks::default()
        }
        .run(&mut g)
        .unwrap();
        assert!(stats.is_noop(), "{stats}");
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
        let stats = RollBlocks::default().run(&mut g).unwrap();
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
        RollBlocks::default().run(&mut g).unwrap();
        kiln_ir::verify(&g).unwrap();
        assert_same_outputs(&before, &g);
    }
}
