//! The quantised fixtures in `tests/models` (made by `scripts/make_quant_models.py`: a BERT
//! quantised with onnxruntime's `quantize_dynamic`, a conv net in QDQ format, a MobileNet-like
//! stack in QOperator format) run through `kiln::Model` on the interpreter (as imported and optimised) and the JIT, and match ONNX
//! Runtime's outputs within `QUANT_MODEL_TOLERANCE`; the text form round-trips them.

use kiln::{Backend, Model, Options};
use kiln_reference::{compare, QUANT_MODEL_TOLERANCE};
use kiln_tests::{as_named, repo_root, test_data};

fn check_model(name: &str) {
    let dir = repo_root().join("tests/models").join(name);
    let model = Model::load(dir.join("model.onnx")).unwrap_or_else(|e| panic!("{name}: {e}"));
    let text = kiln_ir::text::print(model.graph());
    let reparsed = kiln_ir::text::parse(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(reparsed == *model.graph(), "{name}: parse(print(g)) != g");
    let (inputs, want) = test_data(model.graph(), &dir);
    let named = as_named(&inputs);
    for (backend, opt_level) in [
        (Backend::Interp, 0),
        (Backend::Interp, 1),
        (Backend::Jit, 1),
    ] {
        let what = format!("{name} on {backend:?} at opt {opt_level}");
        let exe = model
            .compile(&Options {
                backend,
                opt_level,
                ..Options::default()
            })
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let got = exe.run(&named).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(got.len(), want.len(), "{what}: output count");
        for (k, (g, w)) in got.iter().zip(&want).enumerate() {
            let e = compare(g, w, QUANT_MODEL_TOLERANCE);
            assert!(
                e.ok,
                "{what}: output #{k}: max abs {:e}: {:?}",
                e.max_abs, e.reason
            );
        }
    }
}

#[test]
fn bert_dynamically_quantised_matches_onnx_runtime() {
    check_model("bert_dynq");
}

#[test]
fn convnet_qdq_matches_onnx_runtime() {
    check_model("convnet_qdq");
}

#[test]
fn mobile_net_in_qoperator_form_matches_onnx_runtime() {
    check_model("mobile_qop");
}
