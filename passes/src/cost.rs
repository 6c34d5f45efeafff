//! The one cost model of the optimiser: per op, the FLOPs it does and the bytes it reads
//! and writes ([`CostModel::op_cost`], from the op table's cost class and, for
//! contractions, their operand shapes), turned into seconds on a [`Target`] (a roofline
//! plus a per-kernel overhead). Its users only say what the operands look like: `kiln
//! inspect` measures IR nodes ([`CostModel::node_cost`],
//! [`CostModel::graph_cost`]) and the e-graph extraction measures e-nodes
//! (`crate::egraph::cost`). Symbolic dims take bound sizes, else
//! [`CostModel::default_dim`]. It is deliberately rough: its job is to rank graphs (fused
//! vs decomposed), not to predict wall time.

use crate::target::Target;
use kiln_ir::ops::CostClass;
use kiln_ir::{DType, Dim, Graph, Node, OpKind, TensorType};
use std::collections::HashMap;
use std::ops::AddAssign;

/// The estimated work of one node or a whole graph.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Cost {
    /// Arithmetic operations (a multiply-add counts 2).
    pub flops: f64,
    /// Bytes read plus bytes written.
    pub bytes: f64,
    /// Estimated seconds on the target.
    pub time: f64,
    /// Kernels launched (constants launch none).
    pub kernels: usize,
}

impl AddAssign for Cost {
    fn add_assign(&mut self, o: Cost) {
        self.flops += o.flops;
        self.bytes += o.bytes;
        self.time += o.time;
        self.kernels += o.kernels;
    }
}

/// One operand or result as the cost model sees it: its dims as numbers (`None` when the
/// rank is unknown) and its element size.
#[derive(Clone, Debug, PartialEq)]
pub struct Operand {
    /// Sizes, symbolic dims already bound.
    pub dims: Option<Vec<f64>>,
    /// Bytes per element.
    pub elem_bytes: f64,
}

impl Operand {
    /// Elements ([`UNKNOWN_NUMEL`] when the rank is unknown).
    pub fn numel(&self) -> f64 {
        self.dims
            .as_ref()
            .map_or(UNKNOWN_NUMEL, |v| v.iter().product())
    }

    /// Bytes of the whole tensor.
    pub fn bytes(&self) -> f64 {
        self.numel() * self.elem_bytes
    }

    fn last(&self) -> Option<f64> {
        self.dims.as_ref().and_then(|v| v.last().copied())
    }
}

/// Estimates costs on a target with symbolic dims bound to sizes.
#[derive(Clone, Debug)]
pub struct CostModel {
    /// The machine.
    pub target: Target,
    /// Sizes of symbolic dims (`batch` = 1, `seq` = 128); missing symbols and unknown
    /// dims count as [`CostModel::default_dim`].
    pub dims: HashMap<String, u64>,
    /// The size of a dim nothing binds.
    pub default_dim: u64,
}

impl Default for CostModel {
    fn default() -> CostModel {
        CostModel::new(Target::default())
    }
}

/// Elements assumed for a value whose rank is unknown.
pub const UNKNOWN_NUMEL: f64 = 4096.0;

/// The size the e-graph pass assumes for an unbound symbolic dim: big enough that a
/// per-row saving outweighs a per-kernel one on a sequence, as on real inputs.
pub const EXTRACTION_DEFAULT_DIM: u64 = 16;

impl CostModel {
    /// A cost model for `target`, every symbolic dim 1.
    pub fn new(target: Target) -> CostModel {
        CostModel {
            target,
            dims: HashMap::new(),
            default_dim: 1,
        }
    }

    /// Binds symbolic dim `name` to `size`.
    pub fn bind(mut self, name: &str, size: u64) -> CostModel {
        self.dims.insert(name.to_string(), size);
        self
    }

    /// Sets the size of dims nothing binds.
    pub fn with_default_dim(mut self, size: u64) -> CostModel {
        self.default_dim = size;
        self
    }

    /// The dims of a type as numbers, if its rank is known.
    pub fn sizes(&self, ty: &TensorType) -> Option<Vec<f64>> {
        Some(
            ty.shape
                .dims()?
                .iter()
                .map(|d| match d {
                    Dim::Fixed(n) => *n as f64,
                    Dim::Sym(s) => self.dims.get(s).copied().unwrap_or(self.default_dim) as f64,
                    Dim::Unknown => self.default_dim as f64,
                })
                .collect(),
        )
    }

    /// A typed value as an operand.
    pub fn operand(&self, ty: &TensorType) -> Operand {
        Operand {
            dims: self.sizes(ty),
            elem_bytes: ty.dtype.size() as f64,
        }
    }

    /// A value of unknown type: rank unknown, f32-sized elements.
    pub fn unknown_operand(&self) -> Operand {
        Operand {
            dims: None,
            elem_bytes: DType::F32.size() as f64,
        }
    }

    /// Seconds for a kernel the model knows nothing about except what it writes (an
    /// opaque node): it is assumed to read as much as it writes and compute nothing.
    pub fn opaque_cost(&self, outs: &[Operand]) -> Cost {
        let bytes = 2.0 * outs.iter().map(Operand::bytes).sum::<f64>();
        Cost {
            flops: 0.0,
            bytes,
            time: self.target.kernel_time(0.0, bytes),
            kernels: 1,
        }
    }

    /// THE per-op estimate: the cost of one `op` reading `ins` (present inputs only)
    /// and writing `outs`.
    pub fn op_cost(&self, op: OpKind, ins: &[Operand], outs: &[Operand]) -> Cost {
        use OpKind::*;
        let n_out: f64 = outs.iter().map(Operand::numel).sum();
        let mut bytes: f64 = ins.iter().chain(outs).map(Operand::bytes).sum();
        // A centred statistic is two passes over its input (the mean, then the centred
        // squares): what makes an RMS norm cheaper than a layer norm.
        if matches!(op, LayerNorm | InvStd) {
            bytes += ins.first().map_or(0.0, Operand::bytes);
        }
        let last_of = |i: usize| ins.get(i).and_then(Operand::last).unwrap_or(1.0);
        let oh = self.target.kernel_overhead;
        // The op table's cost class says how to count; contractions count from shapes.
        let flops = match op.cost_class() {
            CostClass::Free => return Cost::default(),
            // Views and shape queries: no data moves.
            CostClass::View => {
                return Cost {
                    time: 0.1 * oh,
                    kernels: 1,
                    ..Cost::default()
                }
            }
            CostClass::Elem(per) => per * n_out,
            // A row statistic reads every element (mean, centred squares) and writes one per row.
            CostClass::RowStat => 4.0 * ins.first().map_or(n_out, Operand::numel),
            CostClass::Contraction => match op {
                MatMul | Gemm | MatMulInteger | MatMulIntegerScaled | QLinearMatMul => {
                    2.0 * n_out * last_of(0)
                }
                // The product, then one FLOP per element for each epilogue operand present
                // (bias, row scale, residual); the activation runs on values in registers
                // and is not counted, so folding an op into the epilogue never adds FLOPs.
                Linear => 2.0 * n_out * last_of(0) + ins.len().saturating_sub(2) as f64 * n_out,
                Conv | ConvTranspose | ConvInteger | QLinearConv => {
                    let w = ins.get(1).map_or(1.0, Operand::numel);
                    let cout = ins
                        .get(1)
                        .and_then(|o| o.dims.as_ref())
                        .and_then(|v| v.first().copied())
                        .unwrap_or(1.0);
                    2.0 * n_out * w / cout.max(1.0)
                }
                Attention => {
                    // q: [.., Sq, D], k: [.., Sk, D]: QK^T, softmax, PV.
                    let q = ins.first().and_then(|o| o.dims.clone()).unwrap_or_default();
                    let k = ins.get(1).and_then(|o| o.dims.clone()).unwrap_or_default();
                    let sk = k.len().checked_sub(2).and_then(|i| k.get(i).copied());
                    let sq = q.len().checked_sub(2).and_then(|i| q.get(i).copied());
                    let qn: f64 = q.iter().product();
                    // The softmax's ~12 FLOPs per score, for every (batch, head) pair.
                    let pairs: f64 = q.iter().rev().skip(2).product();
                    4.0 * qn * sk.unwrap_or(1.0)
                        + 12.0 * pairs * sq.unwrap_or(1.0) * sk.unwrap_or(1.0)
                }
                // Recurrent cells: per time step and batch entry, x·Wᵀ and h·Rᵀ of every
                // direction. Y is `[S, D, B, H]` (either layout) and R `[D, G·H, H]`; with Y
                // omitted, outs[0] is Y_h and this counts one step (a lower bound).
                Lstm | Gru | Rnn => {
                    let r = ins.get(2).and_then(|o| o.dims.clone()).unwrap_or_default();
                    let dh = r.first().copied().unwrap_or(1.0) * r.last().copied().unwrap_or(1.0);
                    let steps = outs.first().map_or(0.0, Operand::numel) / dh.max(1.0);
                    let weights = ins.get(1).map_or(0.0, Operand::numel)
                        + ins.get(2).map_or(0.0, Operand::numel);
                    2.0 * steps * weights
                }
                LinearAttention => {
                    // q: [B, H, S, D], v: [.., Dv]: the chunked form at a typical chunk of
                    // 64 (intra-chunk half block, state read and update per row).
                    let q = ins.first().and_then(|o| o.dims.clone()).unwrap_or_default();
                    let rows: f64 = q.iter().rev().skip(1).product();
                    let d = q.last().copied().unwrap_or(1.0);
                    let dv = last_of(2);
                    2.0 * rows * (65.0 * (d + dv) / 2.0 + 2.0 * d * dv)
                }
                // Einsum: at least one FLOP per output element (its contraction size is in
                // its equation).
                _ => n_out,
            },
        };
        Cost {
            flops,
            bytes,
            time: self.target.kernel_time(flops, bytes),
            kernels: 1,
        }
    }

    /// The cost of one node of `g`.
    pub fn node_cost(&self, g: &Graph, n: &Node) -> Cost {
        let ins: Vec<Operand> = n
            .inputs
            .iter()
            .flatten()
            .map(|&v| self.operand(g.ty(v)))
            .collect();
        let outs: Vec<Operand> = n.outputs.iter().map(|&v| self.operand(g.ty(v))).collect();
        // A loop with a constant trip count (as `roll_blocks` makes) costs its body that
        // many times.
        if n.op == OpKind::Loop {
            let trips = n
                .inputs
                .first()
                .copied()
                .flatten()
                .and_then(|m| g.constant_value(m))
                .and_then(|t| t.to_i64s().first().copied());
            if let (Some(trips), Ok(Some(body))) = (trips, n.attrs.graph("body")) {
                let mut c = self.graph_cost(&body);
                let k = trips.max(0) as f64;
                c.flops *= k;
                c.bytes *= k;
                c.time *= k;
                c.kernels *= trips.max(0) as usize;
                return c;
            }
        }
        self.op_cost(n.op, &ins, &outs)
    }

    /// The cost of the whole graph: the sum over its nodes (subgraphs not counted).
    pub fn graph_cost(&self, g: &Graph) -> Cost {
        let mut c = Cost::default();
        for n in &g.nodes {
            c += self.node_cost(g, n);
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::{DType, Shape, Tensor};

    #[test]
    fn matmul_flops_use_bound_symbols_and_constants_are_free() {
        let mut g = Graph::new("g");
        let ty = |d: Vec<Dim>| TensorType::new(DType::F32, Shape::new(d));
        let x = g.add_input("x", ty(vec![Dim::Sym("S".into()), Dim::Fixed(64)]));
        let w = g.add_constant("w", Tensor::from_vec(vec![64, 32], vec![0f32; 64 * 32]));
        let y = g.add_node(
            OpKind::MatMul,
            Default::default(),
            vec![Some(x), Some(w)],
            vec![("y".into(), ty(vec![Dim::Sym("S".into()), Dim::Fixed(32)]))],
            "mm",
        )[0];
        g.outputs = vec![y];
        let one = CostModel::default().graph_cost(&g);
        assert_eq!(one.flops, 2.0 * 32.0 * 64.0);
        assert_eq!(one.kernels, 1, "the constant launches nothing");
        let many = CostModel::default().bind("S", 128).graph_cost(&g);
        assert_eq!(many.flops, 128.0 * one.flops);
        assert_eq!(
            many.bytes,
            4.0 * (128.0 * 64.0 + 64.0 * 32.0 + 128.0 * 32.0)
        );
        assert!(many.time > one.time && one.time >= Target::default().kernel_overhead);
    }

    #[test]
    fn recurrent_flops_are_both_projections_of_every_step() {
        // A bidirectional LSTM, S = 5, B = 3, I = 4, H = 6: W [2, 24, 4], R [2, 24, 6].
        let f = |d: &[usize]| {
            CostModel::default().operand(&TensorType::new(DType::F32, Shape::fixed(d)))
        };
        let ins = [f(&[5, 3, 4]), f(&[2, 24, 4]), f(&[2, 24, 6])];
        let outs = [f(&[5, 2, 3, 6]), f(&[2, 3, 6]), f(&[2, 3, 6])];
        let c = CostModel::default().op_cost(OpKind::Lstm, &ins, &outs);
        assert_eq!(
            c.flops,
            2.0 * 5.0 * 3.0 * (2.0 * 24.0 * 4.0 + 2.0 * 24.0 * 6.0)
        );
    }
}
