//! The default optimisation pipeline, as one list read top to bottom. Each line is one
//! pass and why it sits there. Names are what `--passes=-name` and dump files use.

use crate::classic::{
    EliminateCommonSubexpressions, EliminateDeadCode, FoldConstants, SimplifyOps,
};
use crate::{Pass, PassManager};

/// The passes of the default pipeline, in order.
pub fn default_passes() -> Vec<Box<dyn Pass>> {
    vec![
        // Drop identities, same-dtype casts, identity transposes and same-shape reshapes
        // that importers leave behind, so later passes see through them.
        Box::new(SimplifyOps),
        // Evaluate what does not depend on inputs, including static shape arithmetic
        // (shape -> gather -> concat on fixed dims); symbolic shapes stay symbolic.
        Box::new(FoldConstants::default()),
        // Folding turns reshape targets into constants: reshapes may now compose or vanish.
        Box::new(SimplifyOps),
        // Merge duplicate constants and computations (after folding made more of them equal).
        Box::new(EliminateCommonSubexpressions),
        // Remove whatever no longer reaches a graph output.
        Box::new(EliminateDeadCode),
    ]
}

/// A [`PassManager`] running [`default_passes`].
pub fn default_pipeline() -> PassManager {
    PassManager::new(default_passes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::{Graph, Tensor};

    #[test]
    fn default_pipeline_names_are_verb_noun_and_run_on_a_constant_graph() {
        let pm = default_pipeline();
        for n in pm.pass_names() {
            assert!(n.contains('_') && n == n.to_lowercase(), "{n}");
        }
        let mut g = Graph::new("g");
        let x = g.add_input("x", kiln_ir::TensorType::unknown_shape(kiln_ir::DType::F32));
        let a = g.add_constant("a", Tensor::scalar(2.0f32));
        let b = g.add_constant("b", Tensor::scalar(2.0f32));
        g.add_constant("dead", Tensor::scalar(3.0f32));
        g.outputs = vec![x, a];
        let _ = b;
        let report = pm.run(&mut g).unwrap();
        assert_eq!(report.passes.len(), 5);
        assert_eq!(g.nodes.len(), 1);
        assert_eq!(g.value(g.outputs[1]).name, "a");
    }
}
