//! kiln's own softmax-attention fixture (`tests/models/attention/mha_causal`, written by
//! `scripts/make_attention_models.py`: one pre-LN attention block with an additive causal
//! bias built from the runtime sequence length, heads of width 64): the optimiser fuses it
//! into one `attention` op, and the interpreter (as imported and optimised) and the JIT
//! match ONNX Runtime's outputs.

use kiln::{Backend, Model, Options};
use kiln_ir::OpKind;
use kiln_tests::{as_named, assert_outputs_match, repo_root, test_data};

#[test]
fn causal_softmax_attention_block_fuses_and_matches_onnx_runtime() {
    let dir = repo_root().join("tests/models/attention/mha_causal");
    let model = Model::load(dir.join("model.onnx")).expect("loads");
    let opt = model.optimised(&Options::default()).expect("optimises");
    let attention = opt
        .nodes
        .iter()
        .filter(|n| n.op == OpKind::Attention)
        .count();
    assert_eq!(attention, 1, "the block's attention is fused into one op");
    let (inputs, want) = test_data(model.graph(), &dir);
    let named = as_named(&inputs);
    for (backend, opt_level) in [
        (Backend::Interp, 0),
        (Backend::Interp, 1),
        (Backend::Jit, 1),
    ] {
        let what = format!("mha_causal on {backend:?} at opt {opt_level}");
        let exe = model
            .compile(&Options {
                backend,
                opt_level,
                ..Options::default()
            })
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let got = exe.run(&named).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_outputs_match(&what, &got, &want);
    }
}
