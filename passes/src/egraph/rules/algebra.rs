//! The algebraic basics the other families build on: identities that remove work, the
//! constant-only reassociation that lets folded biases meet, per-feature scales moving
//! into weights, and `gemm` seen as `matmul` + `add`.

use super::*;
use egg::rewrite as rw;

/// The algebra family.
pub fn rules() -> Vec<Rule> {
    vec![
        // relu(x) = x where x ≥ 0
        rw!("relu-of-nonneg"; "(relu ?x)" => "?x" if is_nonneg("?x")),
        // x + 0 = x (when the zeros do not broadcast x larger)
        rw!("add-zeros"; "(add ?x ?z)" => "?x" if is_zeros("?z") if same_shape_as_root("?x")),
        // x · 1 = x (when the ones do not broadcast x larger)
        rw!("mul-ones"; "(mul ?x ?o)" => "?x" if is_ones("?o") if same_shape_as_root("?x")),
        // −(−x) = x
        rw!("neg-neg"; "(neg (neg ?x))" => "?x"),
        // (y + c1) + c2 = y + (c1 + c2), constants only: c1 + c2 folds
        rw!("add-consts-reassoc"; "(add (add ?y ?c1) ?c2)" => "(add ?y (add ?c1 ?c2))" if is_const("?c1") if is_const("?c2")),
        // (x ⊙ s)·W = x·(diag(s)·W), s a per-feature constant vector
        rw!("scale-into-weight"; "(matmul (mul ?x ?s) ?w)" => "(matmul ?x (scale_rows ?s ?w))" if is_const("?s") if rank_is("?s", 1) if is_const("?w") if rank_is("?w", 2) if is_float("?w")),
        // (s ⊙ x)·W = x·(diag(s)·W)
        rw!("scale-into-weight-left"; "(matmul (mul ?s ?x) ?w)" => "(matmul ?x (scale_rows ?s ?w))" if is_const("?s") if rank_is("?s", 1) if is_const("?w") if rank_is("?w", 2) if is_float("?w")),
        // x · sigmoid(x) = silu(x)
        rw!("silu-from-sigmoid"; "(mul ?x (sigmoid ?x))" => "(silu ?x)"),
        // sigmoid(x) · x = silu(x)
        rw!("silu-from-sigmoid-left"; "(mul (sigmoid ?x) ?x)" => "(silu ?x)"),
        // gemm(a, b, c) = a·b + c (alpha = beta = 1, no transposes)
        rw!("gemm-as-matmul"; "(gemm ?a ?b ?c ?g)" => "(add (matmul ?a ?b) ?c)" if gemm_plain("?g", 0) if is_const("?c")),
        // gemm(a, b, c; transB) = a·bᵀ + c, bᵀ folded
        rw!("gemm-transb-as-matmul"; "(gemm ?a ?b ?c ?g)" => "(add (matmul ?a (t ?b)) ?c)" if gemm_plain("?g", 1) if is_const("?b") if is_const("?c") if is_float("?b")),
        // gemm(a, b) = a·b
        rw!("gemm-nobias-as-matmul"; "(gemm ?a ?b none ?g)" => "(matmul ?a ?b)" if gemm_plain("?g", 0)),
        // gemm(a, b; transB) = a·bᵀ, bᵀ folded
        rw!("gemm-nobias-transb-as-matmul"; "(gemm ?a ?b none ?g)" => "(matmul ?a (t ?b))" if gemm_plain("?g", 1) if is_const("?b") if is_float("?b")),
    ]
}
