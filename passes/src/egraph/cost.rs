//! The cost model: each e-node's estimated time on a [`Target`], from the FLOPs it does,
//! the bytes it reads and writes, and a fixed per-kernel overhead. Fusion pays because a
//! fused op is one kernel and its epilogue never writes the intermediate to memory.
//! Symbolic dims count as [`CostModel::sym_dim`]; what is unknown gets a middling guess.

use super::analysis::{Data, KEGraph};
use super::lang::Kn;
use crate::target::Target;
use egg::Id;
use kiln_ir::{Dim, OpKind};

/// Turns e-nodes into estimated seconds.
#[derive(Clone, Debug)]
pub struct CostModel {
    /// The machine.
    pub target: Target,
    /// The size assumed for a symbolic or unknown dim.
    pub sym_dim: u64,
}

impl Default for CostModel {
    fn default() -> CostModel {
        CostModel {
            target: Target::default(),
            sym_dim: 16,
        }
    }
}

/// Elements assumed for a value whose rank is unknown.
const UNKNOWN_NUMEL: f64 = 4096.0;

impl CostModel {
    /// A cost model for a target.
    pub fn new(target: Target) -> CostModel {
        CostModel {
            target,
            sym_dim: 16,
        }
    }

    fn dims(&self, d: &Data) -> Option<Vec<f64>> {
        let ty = d.ty()?;
        Some(
            ty.shape
                .dims()?
                .iter()
                .map(|d| match d {
                    Dim::Fixed(n) => *n as f64,
                    _ => self.sym_dim as f64,
                })
                .collect(),
        )
    }

    fn numel(&self, d: &Data) -> f64 {
        self.dims(d).map_or(UNKNOWN_NUMEL, |v| v.iter().product())
    }

    fn bytes(&self, d: &Data) -> f64 {
        let size = d.ty().map_or(4, |t| t.dtype.size()) as f64;
        self.numel(d) * size
    }

    /// Estimated seconds for computing `node`, a member of `class` (children excluded).
    /// Helpers cost infinity: they must be folded away.
    pub fn node_cost(&self, eg: &KEGraph, class: Id, node: &Kn) -> f64 {
        let oh = self.target.kernel_overhead;
        let (op, out, args) = match node {
            Kn::Input(_) | Kn::Const(_) | Kn::Attrs(_) | Kn::Hole => return 0.0,
            Kn::Helper(..) => return f64::INFINITY,
            Kn::Opaque(..) => {
                return self
                    .target
                    .kernel_time(0.0, 2.0 * self.bytes(&eg[class].data))
            }
            Kn::Op { op, out, args } => (*op, *out, args),
        };
        if out > 0 {
            // The node's cost is carried by its output 0.
            return 0.0;
        }
        use OpKind::*;
        let me = &eg[class].data;
        let n_out = self.numel(me);
        let ins: Vec<&Data> = args
            .iter()
            .map(|&a| &eg[a].data)
            .filter(|d| d.fact.is_some())
            .collect();
        let moved: f64 = ins.iter().map(|d| self.bytes(d)).sum::<f64>() + self.bytes(me);
        let k_of = |i: usize| {
            ins.get(i)
                .and_then(|d| self.dims(d))
                .and_then(|v| v.last().copied())
                .unwrap_or(self.sym_dim as f64)
        };
        let flops = match op {
            Reshape | Squeeze | Unsqueeze | Flatten | Identity | Shape | Size => return 0.1 * oh,
            MatMul | Gemm => 2.0 * n_out * k_of(0),
            Conv | ConvTranspose => {
                let w = ins.get(1).map_or(1.0, |d| self.numel(d));
                let cout = ins
                    .get(1)
                    .and_then(|d| self.dims(d))
                    .and_then(|v| v.first().copied())
                    .unwrap_or(1.0);
                2.0 * n_out * w / cout.max(1.0)
            }
            Exp | Log | Tanh | Erf | Sigmoid | Gelu | Sin | Cos | Pow | Softplus | Mish => {
                10.0 * n_out
            }
            LayerNorm | RmsNorm | BatchNorm | InstanceNorm | GroupNorm => 8.0 * n_out,
            Softmax | LogSoftmax => 12.0 * n_out,
            Linear => 2.0 * n_out * k_of(0) + 4.0 * n_out,
            Attention => {
                let q = ins.first().and_then(|d| self.dims(d)).unwrap_or_default();
                let k = ins.get(1).and_then(|d| self.dims(d)).unwrap_or_default();
                let sk = k
                    .get(k.len().wrapping_sub(2))
                    .copied()
                    .unwrap_or(self.sym_dim as f64);
                4.0 * q.iter().product::<f64>() * sk
            }
            _ => 2.0 * n_out,
        };
        self.target.kernel_time(flops, moved)
    }
}
