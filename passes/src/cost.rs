//! A static cost estimate of an IR graph: per node, the FLOPs it does and the bytes it
//! reads and writes, from the value types in the graph (symbolic dims bound to given
//! sizes, else 1), turned into seconds on a [`Target`] (a roofline plus a per-kernel
//! overhead). `kiln inspect` shows it after every pass; it is deliberately rough: its job
//! is to rank graphs (fused vs decomposed), not to predict wall time.

use crate::target::Target;
use kiln_ir::{Dim, Graph, Node, OpKind, TensorType};
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
const UNKNOWN_NUMEL: f64 = 1024.0;

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

    fn numel(&self, ty: &TensorType) -> f64 {
        self.sizes(ty).map_or(UNKNOWN_NUMEL, |v| v.iter().product())
    }

    fn bytes(&self, ty: &TensorType) -> f64 {
        self.numel(ty) * ty.dtype.size() as f64
    }

    /// The cost of one node of `g`.
    pub fn node_cost(&self, g: &Graph, n: &Node) -> Cost {
        use OpKind::*;
        let ins: Vec<&TensorType> = n.inputs.iter().flatten().map(|&v| g.ty(v)).collect();
        let outs: Vec<&TensorType> = n.outputs.iter().map(|&v| g.ty(v)).collect();
        let n_out: f64 = outs.iter().map(|t| self.numel(t)).sum();
        let bytes: f64 = ins.iter().chain(&outs).map(|t| self.bytes(t)).sum();
        let last_of = |i: usize| {
            ins.get(i)
                .and_then(|t| self.sizes(t))
                .and_then(|v| v.last().copied())
                .unwrap_or(1.0)
        };
        let oh = self.target.kernel_overhead;
        let flops = match n.op {
            Constant => return Cost::default(),
            // Views and shape queries: no data moves.
            Reshape | Squeeze | Unsqueeze | Flatten | Identity | Shape | Size => {
                return Cost {
                    time: 0.1 * oh,
                    kernels: 1,
                    ..Cost::default()
                }
            }
            MatMul | Gemm => 2.0 * n_out * last_of(0),
            Linear => 2.0 * n_out * last_of(0) + 2.0 * n_out,
            Conv | ConvTranspose => {
                let w = ins.get(1).map_or(1.0, |t| self.numel(t));
                let cout = ins
                    .get(1)
                    .and_then(|t| self.sizes(t))
                    .and_then(|v| v.first().copied())
                    .unwrap_or(1.0);
                2.0 * n_out * w / cout.max(1.0)
            }
            Exp | Log | Tanh | Erf | Sigmoid | Gelu | Silu | Sin | Cos | Pow | Softplus | Mish => {
                10.0 * n_out
            }
            LayerNorm | RmsNorm | BatchNorm | InstanceNorm | GroupNorm => 8.0 * n_out,
            Softmax | LogSoftmax => 12.0 * n_out,
            Rotary => 4.0 * n_out,
            Attention => {
                // q: [.., Sq, D], k: [.., Sk, D]: QK^T, softmax, PV.
                let q = ins.first().and_then(|t| self.sizes(t)).unwrap_or_default();
                let k = ins.get(1).and_then(|t| self.sizes(t)).unwrap_or_default();
                let sk = k.len().checked_sub(2).and_then(|i| k.get(i).copied());
                let sq = q.len().checked_sub(2).and_then(|i| q.get(i).copied());
                let qn: f64 = q.iter().product();
                4.0 * qn * sk.unwrap_or(1.0) + 12.0 * sq.unwrap_or(1.0) * sk.unwrap_or(1.0)
            }
            _ => n_out,
        };
        Cost {
            flops,
            bytes,
            time: self.target.kernel_time(flops, bytes),
            kernels: 1,
        }
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
}
