//! Norm into linear: fold a norm's affine γ, β into the following matmul; fold inference
//! batch_norm into the preceding conv or matmul; turn layer_norm into rms_norm where its
//! input is mean-free; centre a linear's output weights under a mean-invariant consumer
//! (with the previous rule, the Pre-LN ⇔ Pre-RMSNorm equivalence); move an rms_norm's
//! per-row 1/rms (1/σ for layer_norm, whose centring folds into W's columns) past the
//! matmul into the `linear` epilogue's row_scale.
//! New weights are helper expressions the analysis folds exactly.

use super::*;
use egg::rewrite as rw;

/// The norm family.
pub fn rules() -> Vec<Rule> {
    vec![
        // LN(x; γ, β)·W = LN(x; 1, 0)·(diag(γ)·W) + β·W
        rw!("ln-affine-into-matmul"; "(matmul (layer_norm ?x ?g ?b ?a) ?w)" => "(add (matmul (layer_norm ?x (ones_like ?g) none ?a) (scale_rows ?g ?w)) (row_times ?b ?w))" if is_const("?g") if is_const("?b") if rank_is("?g", 1) if is_const("?w") if rank_is("?w", 2) if is_float("?w") if is_last_axis("?a", "?x")),
        // LN(x; γ)·W = LN(x; 1)·(diag(γ)·W)
        rw!("ln-scale-into-matmul"; "(matmul (layer_norm ?x ?g none ?a) ?w)" => "(matmul (layer_norm ?x (ones_like ?g) none ?a) (scale_rows ?g ?w))" if is_const("?g") if not_ones("?g") if rank_is("?g", 1) if is_const("?w") if rank_is("?w", 2) if is_float("?w") if is_last_axis("?a", "?x")),
        // RMSNorm(x; γ)·W = RMSNorm(x; 1)·(diag(γ)·W)
        rw!("rms-scale-into-matmul"; "(matmul (rms_norm ?x ?g ?a) ?w)" => "(matmul (rms_norm ?x (ones_like ?g) ?a) (scale_rows ?g ?w))" if is_const("?g") if not_ones("?g") if rank_is("?g", 1) if is_const("?w") if rank_is("?w", 2) if is_float("?w") if is_last_axis("?a", "?x")),
        // BN(conv(x, W)) = conv(x, W·k, β − μ·k), k = s/√(σ²+ε)
        rw!("bn-into-conv"; "(batch_norm (conv ?x ?w none ?c) ?s ?bb ?m ?v ?a)" => "(conv ?x (scale_out ?w (bn_scale ?s ?v ?a)) (bn_shift ?bb ?m (bn_scale ?s ?v ?a)) ?c)" if bn_inference("?a") if is_const("?w") if is_const("?s") if is_const("?bb") if is_const("?m") if is_const("?v") if is_float("?w")),
        // BN(conv(x, W, b)) = conv(x, W·k, β − (μ − b)·k)
        rw!("bn-into-conv-bias"; "(batch_norm (conv ?x ?w ?b ?c) ?s ?bb ?m ?v ?a)" => "(conv ?x (scale_out ?w (bn_scale ?s ?v ?a)) (bn_shift ?bb (sub ?m ?b) (bn_scale ?s ?v ?a)) ?c)" if bn_inference("?a") if is_const("?w") if is_const("?b") if is_const("?s") if is_const("?bb") if is_const("?m") if is_const("?v") if is_float("?w")),
        // BN(x·W) = x·(W·k) + (β − μ·k), x of shape [N, C]
        rw!("bn-into-matmul"; "(batch_norm (matmul ?x ?w) ?s ?bb ?m ?v ?a)" => "(add (matmul ?x (scale_out ?w (bn_scale ?s ?v ?a))) (bn_shift ?bb ?m (bn_scale ?s ?v ?a)))" if bn_inference("?a") if rank_is("?x", 2) if is_const("?w") if rank_is("?w", 2) if is_const("?s") if is_const("?bb") if is_const("?m") if is_const("?v") if is_float("?w")),
        // LN(x; γ, β) = RMSNorm(x; γ) + β where x is mean-free along the normalised axis
        rw!("ln-to-rms-mean-free"; "(layer_norm ?x ?g ?b ?a)" => "(add (rms_norm ?x ?g ?a) ?b)" if is_mean_free("?x") if is_const("?b") if is_last_axis("?a", "?x")),
        // LN(x; γ) = RMSNorm(x; γ) where x is mean-free along the normalised axis
        rw!("ln-nobias-to-rms-mean-free"; "(layer_norm ?x ?g none ?a)" => "(rms_norm ?x ?g ?a)" if is_mean_free("?x") if is_last_axis("?a", "?x")),
        // LN(y·W) = LN(y·centre(W)): LN ignores a per-row shift, and centring W's rows shifts each output row by its mean
        rw!("centre-weights-under-ln"; "(layer_norm (matmul ?y ?w) ?g ?b ?a)" => "(layer_norm (matmul ?y (centre ?w)) ?g ?b ?a)" if is_const("?w") if rank_is("?w", 2) if not_mean_free("?w") if is_float("?w") if is_last_axis("?a", "?w")),
        // LN(y·W + c) = LN(y·centre(W) + centre(c))
        rw!("centre-linear-under-ln"; "(layer_norm (add (matmul ?y ?w) ?c) ?g ?b ?a)" => "(layer_norm (add (matmul ?y (centre ?w)) (centre ?c)) ?g ?b ?a)" if is_const("?w") if rank_is("?w", 2) if is_const("?c") if rank_is("?c", 1) if not_mean_free("?w") if is_float("?w") if is_last_axis("?a", "?w")),
        // RMSNorm(x; 1)·W = diag(1/rms(x))·(x·W): the per-row scale moves into the linear's epilogue
        rw!("rms-scale-into-epilogue"; "(matmul (rms_norm ?x ?g ?a) ?w)" => "(linear ?x ?w none (inv_rms ?x (eps_like ?a ?x)) none {activation=none})" if is_ones("?g") if rank_is("?w", 2) if is_last_axis("?a", "?x")),
        // LN(x; 1)·W = diag(1/σ(x))·(x·(P·W)), P = I − 11ᵀ/K: centring x's rows equals centring W's columns, so the per-row 1/σ moves into the linear's epilogue
        rw!("ln-scale-into-epilogue"; "(matmul (layer_norm ?x ?g none ?a) ?w)" => "(linear ?x (t (centre (t ?w))) none (inv_std ?x (eps_like ?a ?x)) none {activation=none})" if is_ones("?g") if is_const("?w") if rank_is("?w", 2) if is_float("?w") if is_last_axis("?a", "?x")),
    ]
}
