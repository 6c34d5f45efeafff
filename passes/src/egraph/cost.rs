//! E-node costs for extraction, from the optimiser's one cost model
//! ([`crate::cost::CostModel`]): an op e-node is measured as the IR node it would become
//! (its operands' types from the e-class analysis), so `kiln inspect` and extraction rank
//! graphs the same way. Fusion pays because a fused op is one kernel and its epilogue
//! never writes the intermediate to memory. Leaves are free; helpers cost infinity (they
//! must be folded away).

use super::analysis::{Data, KEGraph};
use super::lang::Kn;
use crate::cost::Operand;
use egg::Id;

pub use crate::cost::CostModel;

impl CostModel {
    /// The cost model the e-graph pass uses by default: unbound symbolic dims count as
    /// [`crate::cost::EXTRACTION_DEFAULT_DIM`].
    pub fn for_extraction(target: crate::target::Target) -> CostModel {
        CostModel::new(target).with_default_dim(crate::cost::EXTRACTION_DEFAULT_DIM)
    }

    fn data_operand(&self, d: &Data) -> Operand {
        d.ty()
            .map_or_else(|| self.unknown_operand(), |t| self.operand(t))
    }

    /// Estimated seconds for computing `node`, a member of `class` (children excluded).
    pub fn enode_cost(&self, eg: &KEGraph, class: Id, node: &Kn) -> f64 {
        let (op, out, args) = match node {
            Kn::Input(_) | Kn::Const(_) | Kn::Attrs(_) | Kn::Hole => return 0.0,
            Kn::Helper(..) => return f64::INFINITY,
            Kn::Opaque(..) => return self.opaque_cost(&[self.data_operand(&eg[class].data)]).time,
            Kn::Op { op, out, args } => (*op, *out, args),
        };
        if out > 0 {
            // The node's cost is carried by its output 0.
            return 0.0;
        }
        // Attribute leaves and holes carry no fact: they are not operands.
        let ins: Vec<Operand> = args
            .iter()
            .map(|&a| &eg[a].data)
            .filter(|d| d.fact.is_some())
            .map(|d| self.data_operand(d))
            .collect();
        let me = self.data_operand(&eg[class].data);
        self.op_cost(op, &ins, &[me]).time
    }
}
