//! Epilogue fusion: a matmul with its bias, activation and residual add becomes one fused
//! `linear` = act(row_scale ⊙ (x·w) + bias) + residual, so the product never makes a round
//! trip through memory between them.

use super::*;
use egg::rewrite as rw;

/// The epilogue family.
pub fn rules() -> Vec<Rule> {
    vec![
        // x·W + b = linear(x, W, b)
        rw!("bias-into-linear"; "(add (matmul ?x ?w) ?b)" => "(linear ?x ?w ?b none none {activation=none})" if rank_is("?w", 2) if fits_root("?b") if linear_is_root("?x", "?w")),
        // b + x·W = linear(x, W, b)
        rw!("bias-into-linear-left"; "(add ?b (matmul ?x ?w))" => "(linear ?x ?w ?b none none {activation=none})" if rank_is("?w", 2) if fits_root("?b") if linear_is_root("?x", "?w")),
        // linear(x, W; row scale s) + b = linear(x, W, b; row scale s), b constant
        rw!("bias-into-scaled-linear"; "(add (linear ?x ?w none ?s none {activation=none}) ?b)" => "(linear ?x ?w ?b ?s none {activation=none})" if is_const("?b") if fits_root("?b") if linear_is_root("?x", "?w")),
        // b + linear(x, W; row scale s) = linear(x, W, b; row scale s), b constant
        rw!("bias-into-scaled-linear-left"; "(add ?b (linear ?x ?w none ?s none {activation=none}))" => "(linear ?x ?w ?b ?s none {activation=none})" if is_const("?b") if fits_root("?b") if linear_is_root("?x", "?w")),
        // x·W = linear(x, W)
        rw!("matmul-as-linear"; "(matmul ?x ?w)" => "(linear ?x ?w none none none {activation=none})" if rank_is("?w", 2) if linear_is_root("?x", "?w")),
        // relu(linear(x, W, b)) = linear(x, W, b; relu)
        rw!("relu-into-linear"; "(relu (linear ?x ?w ?b ?s none {activation=none}))" => "(linear ?x ?w ?b ?s none {activation=relu})"),
        // gelu(linear(x, W, b)) = linear(x, W, b; gelu), exact erf form
        rw!("gelu-into-linear"; "(gelu (linear ?x ?w ?b ?s none {activation=none}) ?g)" => "(linear ?x ?w ?b ?s none {activation=gelu})" if attr_is("?g", "approximate", "none", "none")),
        // gelu_tanh(linear(x, W, b)) = linear(x, W, b; gelu_tanh)
        rw!("gelu-tanh-into-linear"; "(gelu (linear ?x ?w ?b ?s none {activation=none}) ?g)" => "(linear ?x ?w ?b ?s none {activation=gelu_tanh})" if attr_is("?g", "approximate", "none", "tanh")),
        // silu(linear(x, W, b)) = linear(x, W, b; silu)
        rw!("silu-into-linear"; "(silu (linear ?x ?w ?b ?s none {activation=none}))" => "(linear ?x ?w ?b ?s none {activation=silu})"),
        // linear(x, W, b; act) + r = linear(x, W, b; act; residual r)
        rw!("residual-into-linear"; "(add (linear ?x ?w ?b ?s none ?a) ?r)" => "(linear ?x ?w ?b ?s ?r ?a)" if fits_root("?r") if linear_is_root("?x", "?w")),
        // r + linear(x, W, b; act) = linear(x, W, b; act; residual r)
        rw!("residual-into-linear-left"; "(add ?r (linear ?x ?w ?b ?s none ?a))" => "(linear ?x ?w ?b ?s ?r ?a)" if fits_root("?r") if linear_is_root("?x", "?w")),
    ]
}
