//! Memoised shape arithmetic: kernels whose values depend only on constants and on tensor
//! *shapes* (`shape`/`size` and the gather/concat/unsqueeze/… chains, masks built from
//! `range`, rotary tables, that follow them) are computed once per set of shapes and then
//! borrowed by later runs instead of re-run as dozens of tiny interpreter calls.
//!
//! A kernel is *static* when its op is deterministic and on [`STATIC_OPS`] and every input
//! is a constant or a static kernel's output, when it is a fused loop whose inputs are all
//! constants or static outputs, or when it is `shape`/`size` (which read only their input's
//! shape). A memo entry holds every static output plus the input shape each
//! `shape`/`size` kernel saw; a run validates those shapes as it reaches them (shapes may
//! depend on data, so the graph inputs' shapes are only the lookup key), and on the first
//! mismatch computes the remaining static kernels itself and records a fresh entry.

use crate::partition::{Kernel, Plan};
use kiln_ir::{OpKind, Tensor};
use std::sync::{Arc, Mutex, OnceLock};

/// Entries kept per plan (distinct input-shape sets), oldest dropped first.
const MEMO_ENTRIES: usize = 8;

/// An entry whose static values exceed this many bytes is not kept (shape arithmetic is
/// tiny; a huge `constant_of_shape` should not be pinned in memory per input shape).
const MEMO_MAX_BYTES: usize = 64 << 20;

/// Deterministic ops that may be static. Nothing random, nothing with a subgraph.
const STATIC_OPS: &[OpKind] = &[
    OpKind::Gather,
    OpKind::Concat,
    OpKind::Unsqueeze,
    OpKind::Squeeze,
    OpKind::Reshape,
    OpKind::Flatten,
    OpKind::Identity,
    OpKind::Slice,
    OpKind::Split,
    OpKind::Transpose,
    OpKind::Expand,
    OpKind::Tile,
    OpKind::Cast,
    OpKind::CastLike,
    OpKind::Add,
    OpKind::Sub,
    OpKind::Mul,
    OpKind::Div,
    OpKind::Mod,
    OpKind::Max,
    OpKind::Min,
    OpKind::Equal,
    OpKind::Less,
    OpKind::LessOrEqual,
    OpKind::Greater,
    OpKind::GreaterOrEqual,
    OpKind::And,
    OpKind::Or,
    OpKind::Xor,
    OpKind::Not,
    OpKind::Where,
    OpKind::Range,
    OpKind::ConstantOfShape,
    OpKind::Trilu,
    OpKind::ReduceProd,
    OpKind::ReduceSum,
    OpKind::ReduceMax,
    OpKind::ReduceMin,
    OpKind::CumSum,
    // Rotary position tables (`cos`/`sin` of positions from `range` times constant
    // frequencies, as a product or a `matmul`): recomputed per run they cost 0.1 ms of a
    // llama prefill.
    OpKind::MatMul,
    OpKind::Cos,
    OpKind::Sin,
    OpKind::Neg,
];

/// Which kernels of a plan are static: `slot[k]` is kernel k's index among them.
#[derive(Clone, Debug, Default)]
pub struct Statics {
    /// Per kernel: its index among the static kernels, if it is one.
    pub slot: Vec<Option<usize>>,
    /// How many kernels are static.
    pub count: usize,
}

/// One memoised set of static values.
#[derive(Debug)]
pub struct Entry {
    /// Per static slot: the kernel's outputs.
    pub outs: Vec<Vec<Tensor>>,
    /// Per static slot: the input shape a `shape`/`size` kernel saw (else empty, unused).
    pub seen: Vec<Vec<usize>>,
}

/// The graph inputs' shapes, in order, flattened into one vector: each input's rank, then
/// its dims (one allocation per run, not one per input).
pub type ShapesKey = Vec<usize>;

/// The [`ShapesKey`] of `tensors`.
pub fn shapes_key<'a>(tensors: impl Iterator<Item = &'a Tensor> + Clone) -> ShapesKey {
    let mut key = Vec::with_capacity(tensors.clone().map(|t| 1 + t.rank()).sum());
    for t in tensors {
        key.push(t.rank());
        key.extend_from_slice(t.shape());
    }
    key
}

/// Memo entries with their keys (the graph inputs' shapes).
type Entries = Vec<(ShapesKey, Arc<Entry>)>;

/// A plan's memo of static values, keyed by the graph inputs' shapes. Cloning a plan
/// gives the clone an empty memo.
#[derive(Default)]
pub struct ShapeMemo {
    statics: OnceLock<Statics>,
    entries: Mutex<Entries>,
}

impl Clone for ShapeMemo {
    fn clone(&self) -> Self {
        ShapeMemo::default()
    }
}

impl std::fmt::Debug for ShapeMemo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.entries.lock().map(|e| e.len()).unwrap_or(0);
        write!(f, "ShapeMemo({n} entries)")
    }
}

/// Whether a node reads only its input's shape.
pub fn reads_shape_only(op: OpKind) -> bool {
    matches!(op, OpKind::Shape | OpKind::Size)
}

impl ShapeMemo {
    /// The plan's static kernels (computed on first use).
    pub fn statics(&self, plan: &Plan) -> &Statics {
        self.statics.get_or_init(|| analyse(plan))
    }

    /// The entry recorded for these graph-input shapes, if any.
    pub fn lookup(&self, key: &[usize]) -> Option<Arc<Entry>> {
        let e = self.entries.lock().ok()?;
        e.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
    }

    /// Records an entry for these graph-input shapes, replacing any with the same key.
    pub fn store(&self, key: ShapesKey, entry: Entry) {
        let bytes: usize = entry
            .outs
            .iter()
            .flatten()
            .map(|t| t.len() * t.dtype().size())
            .sum();
        if bytes > MEMO_MAX_BYTES {
            return;
        }
        if let Ok(mut e) = self.entries.lock() {
            e.retain(|(k, _)| *k != key);
            if e.len() >= MEMO_ENTRIES {
                e.remove(0);
            }
            e.push((key, Arc::new(entry)));
        }
    }
}

fn analyse(plan: &Plan) -> Statics {
    let g = &plan.graph;
    let mut is_static = vec![false; g.values.len()];
    for (v, _) in &plan.constants {
        is_static[v.index()] = true;
    }
    let mut slot = vec![None; plan.kernels.len()];
    let mut count = 0;
    for (ki, k) in plan.kernels.iter().enumerate() {
        let (ok, outputs): (bool, Vec<_>) = match k {
            Kernel::Fallback(n) | Kernel::Contraction(n) => {
                let node = &g.nodes[*n];
                let ok = if reads_shape_only(node.op) {
                    node.inputs.first().is_some_and(|i| i.is_some())
                } else {
                    STATIC_OPS.contains(&node.op)
                        && node.inputs.iter().any(|i| i.is_some())
                        && node.inputs.iter().flatten().all(|v| is_static[v.index()])
                };
                (ok, node.outputs.clone())
            }
            // A fused elementwise chain over static values (rotary tables: positions from
            // `range` times constant frequencies) is as deterministic as its ops.
            Kernel::Loop(l) => (
                !l.inputs.is_empty() && l.inputs.iter().all(|i| is_static[i.value.index()]),
                l.outputs.iter().map(|o| o.0).collect(),
            ),
        };
        if ok {
            slot[ki] = Some(count);
            count += 1;
            for o in outputs {
                is_static[o.index()] = true;
            }
        }
    }
    Statics { slot, count }
}
