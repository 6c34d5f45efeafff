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

use super::partition::{Kernel, Plan};
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
pub(crate) struct Statics {
    pub slot: Vec<Option<usize>>,
    pub count: usize,
}

/// One memoised set of static values.
#[derive(Debug)]
pub(crate) struct Entry {
    /// Per static slot: the kernel's outputs.
    pub outs: Vec<Vec<Tensor>>,
    /// Per static slot: the input shape a `shape`/`size` kernel saw (else empty, unused).
    pub seen: Vec<Vec<usize>>,
}

/// Memo entries with their keys (the graph inputs' shapes).
type Entries = Vec<(Vec<Vec<usize>>, Arc<Entry>)>;

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
pub(crate) fn reads_shape_only(op: OpKind) -> bool {
    matches!(op, OpKind::Shape | OpKind::Size)
}

impl ShapeMemo {
    /// The plan's static kernels (computed on first use).
    pub(crate) fn statics(&self, plan: &Plan) -> &Statics {
        self.statics.get_or_init(|| analyse(plan))
    }

    /// The entry recorded for these graph-input shapes, if any.
    pub(crate) fn lookup(&self, key: &[Vec<usize>]) -> Option<Arc<Entry>> {
        let e = self.entries.lock().ok()?;
        e.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
    }

    /// Records an entry for these graph-input shapes, replacing any with the same key.
    pub(crate) fn store(&self, key: Vec<Vec<usize>>, entry: Entry) {
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

#[cfg(test)]
mod tests {
    use crate::kernel::{partition, ReferenceRunner, RunReport};
    use kiln_ir::Tensor;

    /// `%y` is reshaped by shape arithmetic on `%x`; `%z`'s shape depends on the data in
    /// `%n`, so a memo entry keyed by input shapes must still be validated by `shape %z`.
    const SRC: &str = "func @f(%x: f32[B, 4], %n: i64[2]) -> (f32[?, ?], i64[2], f32[?, ?]) {
  %s = shape %x
  %k0 = constant {value = dense<i64[1]> [0]} : i64[1]
  %b = gather %s, %k0 {axis = 0}
  %m1 = constant {value = dense<i64[1]> [-1]} : i64[1]
  %t = concat %m1, %b {axis = 0}
  %y = reshape %x, %t : f32[?, ?]
  %z = reshape %x, %n : f32[?, ?]
  %sz = shape %z
  %w = reshape %z, %sz : f32[?, ?]
  return %y, %sz, %w
}
";

    fn run_both(
        plan: &crate::kernel::Plan,
        g: &kiln_ir::Graph,
        x: &Tensor,
        n: &Tensor,
    ) -> RunReport {
        let ins = vec![x.clone(), n.clone()];
        let mut rep = RunReport::default();
        let got = plan
            .run_with(ins.clone(), &ReferenceRunner, Some(&mut rep))
            .expect("plan runs");
        let want = kiln_ir::interp::run(g, ins).expect("interpreter runs");
        assert_eq!(got, want, "x {:?} n {:?}", x.shape(), n.to_i64s());
        rep
    }

    fn memo_hits(rep: &RunReport) -> usize {
        rep.kernels.iter().filter(|k| k.kind == "memo").count()
    }

    #[test]
    fn memoised_shape_arithmetic_matches_the_interpreter_and_revalidates() {
        let g = kiln_ir::text::parse(SRC).expect("parses");
        let plan = partition(&g).expect("partitions");
        let x = |b: usize| Tensor::from_vec(vec![b, 4], (0..b * 4).map(|i| i as f32).collect());
        let n = |a: i64, b: i64| Tensor::from_vec(vec![2], vec![a, b]);
        // First run records; the second, same shapes and data, borrows every static value.
        let first = run_both(&plan, &g, &x(2), &n(4, 2));
        assert_eq!(memo_hits(&first), 0);
        let second = run_both(&plan, &g, &x(2), &n(4, 2));
        let statics = plan.memo.statics(&plan).count;
        assert_eq!(statics, 4, "shape, gather, concat, shape");
        assert_eq!(memo_hits(&second), statics);
        // Same input shapes, different data in %n: `shape %z` must not come from the memo.
        let third = run_both(&plan, &g, &x(2), &n(2, 4));
        assert!(memo_hits(&third) < statics);
        // A new batch size is a new key; the old entries stay usable.
        run_both(&plan, &g, &x(3), &n(6, 2));
        run_both(&plan, &g, &x(3), &n(6, 2));
        run_both(&plan, &g, &x(2), &n(2, 4));
        // A failing run (bad reshape) reports the error and stores nothing wrong.
        assert!(plan.run(vec![x(2), n(3, 3)], &ReferenceRunner).is_err());
        run_both(&plan, &g, &x(2), &n(8, 1));
    }

    /// A rotary-style table: positions from `range` over a shape, scaled by a constant in a
    /// fused loop, then `cos`; only the last product reads data.
    const TABLE: &str = "func @f(%x: f32[S, 4]) -> (f32[S, 4]) {
  %s = shape %x
  %z = constant {value = dense<i64[]> [0]} : i64[]
  %one = constant {value = dense<i64[]> [1]} : i64[]
  %n = gather %s, %z {axis = 0}
  %r = range %z, %n, %one
  %rf = cast %r {to = \"f32\"}
  %k = constant {value = dense<f32[]> [0.25]} : f32[]
  %a = mul %rf, %k
  %c = cos %a
  %ax = constant {value = dense<i64[1]> [1]} : i64[1]
  %c2 = unsqueeze %c, %ax
  %y = mul %x, %c2
  return %y
}
";

    #[test]
    fn loops_and_cos_over_static_values_are_memoised() {
        let g = kiln_ir::text::parse(TABLE).expect("parses");
        let plan = partition(&g).expect("partitions");
        let x = |s: usize| Tensor::from_vec(vec![s, 4], (0..s * 4).map(|i| i as f32).collect());
        let run = |s: usize| {
            let ins = vec![x(s)];
            let mut rep = RunReport::default();
            let got = plan
                .run_with(ins.clone(), &ReferenceRunner, Some(&mut rep))
                .expect("plan runs");
            assert_eq!(
                got,
                kiln_ir::interp::run(&g, ins).expect("interpreter runs")
            );
            rep
        };
        let memo_ops = |rep: &RunReport| -> Vec<String> {
            rep.kernels
                .iter()
                .filter(|k| k.kind == "memo")
                .map(|k| k.op.clone())
                .collect()
        };
        assert!(memo_ops(&run(3)).is_empty());
        let second = memo_ops(&run(3));
        assert!(second.iter().any(|o| o == "cos"), "{second:?}");
        assert!(second.iter().any(|o| o == "loop"), "{second:?}");
        // The data product is never memoised; a new length computes a fresh table.
        assert!(!second.iter().any(|o| o == "mul"), "{second:?}");
        assert!(memo_ops(&run(5)).is_empty());
        run(5);
        run(3);
    }
}
