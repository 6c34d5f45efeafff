//! `eliminate_dead_code`: removes nodes whose results never reach a graph output, and
//! compacts the value table. Graph inputs stay (they are the signature). The work is
//! [`crate::rewrite::remove_dead`]; this file makes it a pass.

use crate::rewrite;
use crate::{Pass, PassError, PassStats};
use kiln_ir::Graph;

/// Dead-code elimination.
#[derive(Clone, Copy, Debug, Default)]
pub struct EliminateDeadCode;

impl Pass for EliminateDeadCode {
    fn name(&self) -> &'static str {
        "eliminate_dead_code"
    }

    fn aliases(&self) -> &'static [&'static str] {
        &["dce"]
    }

    fn run(&self, g: &mut Graph) -> Result<PassStats, PassError> {
        rewrite::check_ids(g).map_err(|m| PassError::graph(self.name(), m))?;
        let values = g.values.len();
        let removed = rewrite::remove_dead(g);
        let mut stats = PassStats {
            removed,
            ..PassStats::default()
        };
        stats.bump("values_dropped", values - g.values.len());
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use kiln_ir::{OpKind, Tensor};

    #[test]
    fn unused_constants_are_removed_and_outputs_survive() {
        let mut g = Graph::new("g");
        let x = g.add_input("x", f32_ty(&[2]));
        let _unused = g.add_input("unused", f32_ty(&[2]));
        g.add_constant("dead", Tensor::from_vec(vec![2], vec![1.0f32, 2.0]));
        let k = g.add_constant("k", Tensor::scalar(7i64));
        g.add_constant("dead2", Tensor::scalar(0u8));
        g.outputs = vec![x, k];
        let before = g.clone();
        let stats = EliminateDeadCode.run(&mut g).unwrap();
        assert_eq!(stats.removed, 2);
        assert_eq!(stats.counter("values_dropped"), 2);
        assert_eq!(ops(&g), vec![OpKind::Constant]);
        assert_eq!(g.inputs.len(), 2);
        assert_eq!(g.value(g.outputs[1]).name, "k");
        kiln_ir::verify(&g).unwrap();
        assert_same_outputs(&before, &g);
    }

    #[test]
    fn dead_chains_go_and_live_multi_output_nodes_stay() {
        let mut g = Graph::new("g");
        let x = g.add_input("x", f32_ty(&[4]));
        let a = node(&mut g, OpKind::Relu, &[x], "a", f32_ty(&[4]));
        let _b = node(&mut g, OpKind::Neg, &[a], "b", f32_ty(&[4]));
        let split = g.add_node(
            OpKind::Split,
            Default::default(),
            vec![Some(x)],
            vec![("s0".into(), f32_ty(&[2])), ("s1".into(), f32_ty(&[2]))],
            "",
        );
        g.outputs = vec![split[1]];
        let stats = EliminateDeadCode.run(&mut g).unwrap();
        assert_eq!(stats.removed, 2);
        assert_eq!(ops(&g), vec![OpKind::Split]);
        assert_eq!(
            g.nodes[0].outputs.len(),
            2,
            "a live node keeps all its outputs"
        );
        assert_eq!(g.value(g.outputs[0]).name, "s1");
    }

    #[test]
    fn dce_preserves_results_numerically() {
        let mut g = Graph::new("g");
        let x = g.add_input("x", f32_ty(&[4]));
        let a = node(&mut g, OpKind::Relu, &[x], "a", f32_ty(&[4]));
        let _b = node(&mut g, OpKind::Neg, &[a], "b", f32_ty(&[4]));
        let c = node(&mut g, OpKind::Exp, &[a], "c", f32_ty(&[4]));
        g.outputs = vec![c];
        let before = g.clone();
        EliminateDeadCode.run(&mut g).unwrap();
        assert_eq!(ops(&g), vec![OpKind::Relu, OpKind::Exp]);
        kiln_ir::verify(&g).unwrap();
        assert_same_outputs(&before, &g);
    }
}
