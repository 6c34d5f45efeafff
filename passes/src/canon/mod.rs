//! Canonicalisation: recognising what ONNX exporters decompose (GELU, layer and RMS norms,
//! SiLU, rotary embeddings, scaled-dot-product attention) and replacing each decomposition
//! by the one first-class op that backends implement fast. One file per pattern family;
//! this module holds the shared matching helpers ([`Matcher`]) and the one place that
//! applies a match to the graph ([`Fusion`], [`apply_fusions`]).
//!
//! A pattern is matched structurally on the graph: producers of values, constant values
//! (from constant nodes or inference facts), and shape facts. Every guard is checked:
//! constants have the exact values (within f32 rounding), reductions run over the last
//! axis, and interior values have no users outside the pattern (so nothing is computed
//! twice). A match replaces the pattern's root value; the interior nodes then die.
//!
//! These rewrites change rounding (the fused op computes in one step what the decomposed
//! graph rounds at every step), so unlike the classic passes they are not bit-exact; the
//! tests compare within [`CANON_TOLERANCE`].

pub mod activations;
pub mod attention;
pub mod conv;
pub mod gelu;
pub mod gemm;
pub mod linear_attention;
pub mod norms;
pub mod quant;
pub mod rotary;

pub use activations::FuseSilu;
pub use attention::FuseAttention;
pub use conv::FuseConvEpilogue;
pub use gelu::FuseGelu;
pub use gemm::UnflattenGemm;
pub use linear_attention::LineariseAttention;
pub use norms::FuseNorms;
pub use quant::FuseQuantEpilogue;
pub use rotary::FuseRotary;

use crate::rewrite::{self, Namer, Subst};
use crate::{PassError, PassStats};
use kiln_ir::ops::Fact;
use kiln_ir::{Attrs, Dim, Graph, Node, OpKind, Tensor, TensorType, ValueId};
use std::collections::HashSet;
use std::sync::Arc;

/// Relative tolerance the canonicalisation tests allow between a decomposed graph and
/// its fused form (f32 graphs; the fused ops compute in f64 and round once).
pub const CANON_TOLERANCE: f64 = 1e-4;

/// Relative tolerance when comparing a graph constant with the value a pattern needs
/// (`0.044715`, `sqrt(2)`): exporters store them as f32.
const CONST_RTOL: f64 = 1e-6;

/// Read-only view of a graph for matching: producers, users and inference facts (inferred
/// on the first question: most passes find no candidate in most graphs).
pub(crate) struct Matcher<'g> {
    pub g: &'g Graph,
    prod: Vec<Option<usize>>,
    users: Vec<Vec<usize>>,
    outputs: HashSet<ValueId>,
    facts: std::cell::OnceCell<Vec<Fact>>,
}

impl<'g> Matcher<'g> {
    /// Indexes `g`; fails if its ids are broken.
    pub fn new(g: &'g Graph, pass: &'static str) -> Result<Matcher<'g>, PassError> {
        rewrite::check_ids(g).map_err(|m| PassError::graph(pass, m))?;
        let mut users = vec![vec![]; g.values.len()];
        for (i, n) in g.nodes.iter().enumerate() {
            for v in n.inputs.iter().flatten() {
                users[v.index()].push(i);
            }
        }
        Ok(Matcher {
            g,
            prod: rewrite::producers(g),
            users,
            outputs: g.outputs.iter().copied().collect(),
            facts: std::cell::OnceCell::new(),
        })
    }

    /// The node defining `v` and its index, if a node does.
    pub fn def(&self, v: ValueId) -> Option<(usize, &'g Node)> {
        let i = self.prod.get(v.index()).copied().flatten()?;
        Some((i, &self.g.nodes[i]))
    }

    /// The node defining `v` if it is a one-output `op`.
    pub fn def_op(&self, v: ValueId, op: OpKind) -> Option<(usize, &'g Node)> {
        self.def(v)
            .filter(|(_, n)| n.op == op && n.outputs.len() == 1)
    }

    /// Input `k` of a node, if present.
    pub fn input(n: &Node, k: usize) -> Option<ValueId> {
        n.inputs.get(k).copied().flatten()
    }

    /// The two operands of a binary node, in both orders (for commutative ops).
    pub fn operands(n: &Node) -> Option<[(ValueId, ValueId); 2]> {
        if n.inputs.len() != 2 {
            return None;
        }
        let (a, b) = (Self::input(n, 0)?, Self::input(n, 1)?);
        Some([(a, b), (b, a)])
    }

    /// The node indices using `v`.
    pub fn users(&self, v: ValueId) -> &[usize] {
        self.users.get(v.index()).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The one node using `v`, if `v` has exactly one use and is not a graph output.
    pub fn sole_user(&self, v: ValueId) -> Option<(usize, &'g Node)> {
        match self.users(v) {
            [u] if !self.outputs.contains(&v) => Some((*u, &self.g.nodes[*u])),
            _ => None,
        }
    }

    /// What inference knows about `v`.
    pub fn fact(&self, v: ValueId) -> &Fact {
        // The pass manager verified the graph, so inference succeeds; were it to fail, the
        // declared types are what is known.
        let facts = self.facts.get_or_init(|| {
            kiln_ir::infer::facts(self.g).unwrap_or_else(|_| {
                self.g
                    .values
                    .iter()
                    .map(|v| Fact::of(v.ty.clone()))
                    .collect()
            })
        });
        &facts[v.index()]
    }

    /// The dims of `v`, if its rank is known.
    pub fn dims(&self, v: ValueId) -> Option<&[Dim]> {
        self.fact(v).ty.shape.dims()
    }

    /// `v`'s contents, when known at compile time.
    pub fn konst(&self, v: ValueId) -> Option<Arc<Tensor>> {
        self.fact(v)
            .konst
            .clone()
            .or_else(|| self.g.constant_value(v))
    }

    /// `v` as a single float, when it is a one-element constant.
    pub fn scalar(&self, v: ValueId) -> Option<f64> {
        let k = self.konst(v)?;
        (k.len() == 1 && k.dtype().is_float()).then(|| k.to_f64s()[0])
    }

    /// True if `v` is a one-element constant equal to `want` (within f32 rounding).
    pub fn is_scalar(&self, v: ValueId, want: f64) -> bool {
        self.scalar(v)
            .is_some_and(|x| (x - want).abs() <= CONST_RTOL * want.abs().max(1e-30))
    }

    /// `v` as integers, when it is an integer constant.
    pub fn ints(&self, v: ValueId) -> Option<Vec<i64>> {
        let k = self.konst(v)?;
        k.dtype().is_int().then(|| k.to_i64s())
    }

    /// True if `axes` (an axes input) names exactly the last axis of a rank-`rank` tensor.
    pub fn is_last_axis(&self, axes: Option<ValueId>, rank: usize) -> bool {
        let Some(a) = axes.and_then(|a| self.ints(a)) else {
            return false;
        };
        rank > 0 && (a == [-1] || a == [rank as i64 - 1])
    }

    /// True if every node in `interior` but `root` has all its outputs used only by nodes
    /// in `interior` (and none is a graph output), so replacing `root` kills them all.
    pub fn closed(&self, root: usize, interior: &[usize]) -> bool {
        interior.iter().filter(|&&i| i != root).all(|&i| {
            self.g.nodes[i].outputs.iter().all(|o| {
                !self.outputs.contains(o)
                    && self
                        .users(*o)
                        .iter()
                        .all(|u| *u == root || interior.contains(u))
            })
        })
    }
}

/// Two dims that are known to be equal (the same size, or the same symbol).
pub(crate) fn same_dim(a: &Dim, b: &Dim) -> bool {
    a == b && *a != Dim::Unknown
}

/// An operand of a node a fusion creates.
#[derive(Clone, Debug)]
pub(crate) enum Operand {
    /// An existing value.
    Value(ValueId),
    /// The output of an earlier node of the same fusion.
    New(usize),
    /// A new constant.
    Const(Tensor),
}

/// A node a fusion creates (one output).
#[derive(Clone, Debug)]
pub(crate) struct NewNode {
    pub op: OpKind,
    pub attrs: Attrs,
    pub inputs: Vec<Option<Operand>>,
    /// Base for the output's name.
    pub name: String,
}

/// One match: new nodes to insert before `root`, the last of which replaces the root's
/// first output. `interior` lists the nodes the match consumes (for overlap checks).
#[derive(Clone, Debug)]
pub(crate) struct Fusion {
    pub root: usize,
    pub interior: Vec<usize>,
    pub nodes: Vec<NewNode>,
    /// The counter bumped in the pass statistics (`gelu_fused`).
    pub counter: &'static str,
}

/// Applies non-overlapping fusions (earlier roots win), then removes the dead interior.
pub(crate) fn apply_fusions(
    g: &mut Graph,
    mut fusions: Vec<Fusion>,
    pass: &'static str,
) -> Result<PassStats, PassError> {
    let mut stats = PassStats::default();
    if fusions.is_empty() {
        return Ok(stats);
    }
    fusions.sort_by_key(|f| f.root);
    let mut claimed: HashSet<usize> = HashSet::new();
    let mut namer = Namer::new(g);
    let mut subst = Subst::new(g);
    let mut inserts: Vec<(usize, Node)> = vec![];
    // Per applied fusion: its root, the existing values its new nodes read, and the range
    // of `inserts` it made (for the `fused_from` provenance attribute).
    let mut applied: Vec<(usize, Vec<ValueId>, std::ops::Range<usize>)> = vec![];
    for f in fusions {
        if f.interior.iter().any(|i| claimed.contains(i)) || f.nodes.is_empty() {
            continue;
        }
        claimed.extend(f.interior.iter().copied());
        let root_out = g.nodes[f.root].outputs[0];
        let root_name = g.value(root_out).name.clone();
        let first_insert = inserts.len();
        let reads: Vec<ValueId> = f
            .nodes
            .iter()
            .flat_map(|n| n.inputs.iter())
            .filter_map(|o| match o {
                Some(Operand::Value(v)) => Some(*v),
                _ => None,
            })
            .collect();
        let mut made: Vec<ValueId> = vec![];
        let last = f.nodes.len() - 1;
        for (k, nn) in f.nodes.into_iter().enumerate() {
            let mut ins = vec![];
            let mut facts: Vec<Option<Fact>> = vec![];
            for op in nn.inputs {
                let v = match op {
                    None => None,
                    Some(Operand::Value(v)) => Some(v),
                    Some(Operand::New(j)) => Some(*made.get(j).ok_or_else(|| {
                        PassError::at(pass, format!("%{root_name}"), "fusion refers ahead")
                    })?),
                    Some(Operand::Const(t)) => {
                        let name = namer.fresh(&format!("{root_name}_{}_c", nn.name));
                        let ty = TensorType::new(t.dtype(), kiln_ir::Shape::fixed(t.shape()));
                        let c = g.add_value(&name, ty);
                        let attrs = Attrs::new().with("value", kiln_ir::Attr::Tensor(Arc::new(t)));
                        inserts.push((f.root, node(OpKind::Constant, attrs, vec![], c)));
                        stats.added += 1;
                        Some(c)
                    }
                };
                facts.push(v.map(|v| value_fact(g, v)));
                ins.push(v);
            }
            let fact_refs: Vec<Option<&Fact>> = facts.iter().map(Option::as_ref).collect();
            let inferred = kiln_ir::ops::infer(nn.op, &nn.attrs, &fact_refs)
                .map_err(|m| PassError::at(pass, format!("%{root_name}"), m))?;
            let mut ty = inferred
                .into_iter()
                .next()
                .map(|f| f.ty)
                .ok_or_else(|| PassError::at(pass, format!("%{root_name}"), "no output"))?;
            if k == last {
                ty = kiln_ir::infer::refine(g.ty(root_out), &ty)
                    .map_err(|m| PassError::at(pass, format!("%{root_name}"), m))?;
            }
            let out = namer.add_value(g, &format!("{root_name}_{}", nn.name), ty);
            inserts.push((f.root, node(nn.op, nn.attrs, ins, out)));
            made.push(out);
            stats.added += 1;
        }
        let Some(&new_root) = made.last() else {
            continue;
        };
        subst.replace(root_out, new_root);
        applied.push((f.root, reads, first_insert..inserts.len()));
        stats.changed += 1;
        stats.bump(f.counter, 1);
    }
    record_provenance(g, &applied, &mut inserts);
    rewrite::insert_nodes(g, inserts);
    subst.apply(g);
    stats.removed = rewrite::remove_dead(g);
    Ok(stats)
}

/// The attribute naming, on a fused op, the original (ONNX) nodes it absorbed:
/// `Attr::Strs` of their `Node::name`s, in graph order, including names an absorbed fused
/// node already carried. `kiln inspect` prints it; the e-graph uses the same name.
pub const FUSED_FROM: &str = "fused_from";

/// Ops a fusion creates that carry [`FUSED_FROM`] (helpers like transposes do not).
fn is_fused_op(op: OpKind) -> bool {
    use OpKind::*;
    matches!(
        op,
        Attention
            | LayerNorm
            | RmsNorm
            | Gelu
            | Silu
            | Rotary
            | Linear
            | LinearAttention
            | MatMulIntegerScaled
            | FusedConv
    )
}

/// Sets [`FUSED_FROM`] on the fused nodes of each applied fusion: the names of the nodes
/// that die because of it. Those are found before any surgery: a node dies if no graph
/// output reaches it once each fusion root's first output is read from the fusion's
/// inputs instead; a dead node belongs to every fusion whose root reaches it through dead
/// nodes. Constants are left out (they are parameters, not computation).
fn record_provenance(
    g: &Graph,
    applied: &[(usize, Vec<ValueId>, std::ops::Range<usize>)],
    inserts: &mut [(usize, Node)],
) {
    let prod = rewrite::producers(g);
    let producer = |v: ValueId| prod.get(v.index()).copied().flatten();
    let mut cut: std::collections::HashMap<ValueId, &[ValueId]> = Default::default();
    for (root, reads, _) in applied {
        cut.insert(g.nodes[*root].outputs[0], reads);
    }
    // Liveness after the rewrite, computed on the graph before it.
    let mut live = vec![false; g.nodes.len()];
    let mut seen_vals: HashSet<ValueId> = HashSet::new();
    let mut stack: Vec<ValueId> = g.outputs.clone();
    while let Some(v) = stack.pop() {
        if !seen_vals.insert(v) {
            continue;
        }
        if let Some(reads) = cut.get(&v) {
            stack.extend(reads.iter().copied());
            continue;
        }
        if let Some(p) = producer(v) {
            if !live[p] {
                live[p] = true;
                stack.extend(g.nodes[p].inputs.iter().flatten().copied());
            }
        }
    }
    for (root, _, range) in applied {
        let mut names: Vec<(usize, String)> = vec![];
        let mut seen = vec![false; g.nodes.len()];
        let mut todo = vec![*root];
        while let Some(i) = todo.pop() {
            if i >= seen.len() || seen[i] || live[i] {
                continue;
            }
            seen[i] = true;
            let n = &g.nodes[i];
            if n.op != OpKind::Constant {
                if let Ok(Some(prev)) = n.attrs.strings(FUSED_FROM) {
                    names.extend(prev.into_iter().map(|s| (i, s)));
                } else if !n.name.is_empty() {
                    names.push((i, n.name.clone()));
                }
            }
            todo.extend(n.inputs.iter().flatten().filter_map(|&v| producer(v)));
        }
        names.sort_by_key(|(i, _)| *i);
        let mut list: Vec<String> = vec![];
        for (_, s) in names {
            if !list.contains(&s) {
                list.push(s);
            }
        }
        let made = &mut inserts[range.clone()];
        let any_fused = made.iter().any(|(_, n)| is_fused_op(n.op));
        let last = made.len().saturating_sub(1);
        for (k, (_, n)) in made.iter_mut().enumerate() {
            if is_fused_op(n.op) || (!any_fused && k == last) {
                n.attrs.set(FUSED_FROM, kiln_ir::Attr::Strs(list.clone()));
            }
        }
    }
}

fn node(op: OpKind, attrs: Attrs, inputs: Vec<Option<ValueId>>, out: ValueId) -> Node {
    Node {
        op,
        attrs,
        inputs,
        outputs: vec![out],
        name: String::new(),
    }
}

/// A fact for a value from its declared type (and contents when a constant defines it).
fn value_fact(g: &Graph, v: ValueId) -> Fact {
    let mut f = Fact::of(g.ty(v).clone());
    f.konst = g.constant_value(v);
    f
}

/// Runs `find` over every node and applies what it found.
pub(crate) fn run_matches(
    g: &mut Graph,
    pass: &'static str,
    find: impl Fn(&Matcher, usize) -> Option<Fusion>,
) -> Result<PassStats, PassError> {
    let fusions = {
        let m = Matcher::new(g, pass)?;
        (0..g.nodes.len())
            .filter_map(|i| find(&m, i))
            .collect::<Vec<_>>()
    };
    apply_fusions(g, fusions, pass)
}

#[cfg(test)]
pub(crate) mod testing;

#[cfg(test)]
mod tests {
    use super::testing::B;
    use super::*;
    use crate::Pass;

    fn fused_from(g: &Graph, op: OpKind) -> Vec<String> {
        let n = g.nodes.iter().find(|n| n.op == op).expect("a fused node");
        n.attrs.strings(FUSED_FROM).unwrap().unwrap_or_default()
    }

    #[test]
    fn fused_ops_name_the_original_nodes_that_died_with_them() {
        // gelu(x) * sigmoid(gelu(x)): the tanh gelu, then silu over its result.
        let mut b = B::new();
        let x = b.input("x", &[2, 8]);
        let half = b.f(0.5);
        let one = b.f(1.0);
        let c = b.f(0.044715);
        let k = b.f((2.0f64 / std::f64::consts::PI).sqrt() as f32);
        let three = b.f(3.0);
        let x3 = b.bin(OpKind::Pow, x, three);
        let cx3 = b.bin(OpKind::Mul, c, x3);
        let inner = b.bin(OpKind::Add, x, cx3);
        let scaled = b.bin(OpKind::Mul, k, inner);
        let t = b.un(OpKind::Tanh, scaled);
        let t1 = b.bin(OpKind::Add, one, t);
        let hx = b.bin(OpKind::Mul, half, x);
        let gelu = b.bin(OpKind::Mul, hx, t1);
        let s = b.un(OpKind::Sigmoid, gelu);
        let y = b.bin(OpKind::Mul, gelu, s);
        let mut g = b.finish(&[y]);
        for (i, n) in g.nodes.iter_mut().enumerate() {
            n.name = format!("/{:?}_{i}", n.op);
        }
        FuseGelu.run(&mut g).unwrap();
        let gelu_from = fused_from(&g, OpKind::Gelu);
        assert_eq!(
            gelu_from,
            vec![
                "/Pow_5", "/Mul_6", "/Add_7", "/Mul_8", "/Tanh_9", "/Add_10", "/Mul_11", "/Mul_12"
            ],
            "constants are not listed"
        );
        // The sigmoid is not in silu's match but dies with it; the gelu it reads lives.
        FuseSilu.run(&mut g).unwrap();
        assert_eq!(fused_from(&g, OpKind::Silu), vec!["/Sigmoid_13", "/Mul_14"]);
    }
}
