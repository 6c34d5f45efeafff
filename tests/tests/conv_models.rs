//! The conv-net fixtures in `tests/models` (made by `scripts/make_conv_models.py`: a
//! YOLOv8-n-like backbone slice with unfused BatchNorm, SiLU, C2f, SPPF and a nearest
//! Resize; a 1-D conv byte classifier with a dilated and a depthwise conv; a U-Net-style
//! decoder with ConvTranspose, skip Concat and a bilinear Resize) run through
//! `kiln::Model` on the interpreter (as imported and optimised) and the JIT, and match ONNX
//! Runtime's outputs within `MODEL_TOLERANCE`; the text form round-trips them.

use kiln::{Backend, Model, Options};
use kiln_tests::{as_named, assert_outputs_match, repo_root, test_data};

fn check_model(name: &str) {
    let dir = repo_root().join("tests/models").join(name);
    let model = Model::load(dir.join("model.onnx")).unwrap_or_else(|e| panic!("{name}: {e}"));
    let text = kiln_ir::text::print(model.graph());
    let reparsed = kiln_ir::text::parse(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(reparsed == *model.graph(), "{name}: parse(print(g)) != g");
    let (inputs, want) = test_data(model.graph(), &dir);
    let named = as_named(&inputs);
    for (backend, opt_level, threads) in [
        (Backend::Interp, 0, 1),
        (Backend::Interp, 1, 1),
        (Backend::Jit, 1, 1),
        (Backend::Jit, 1, 2),
    ] {
        let what = format!("{name} on {backend:?} at opt {opt_level}, {threads} threads");
        let exe = model
            .compile(&Options {
                backend,
                opt_level,
                threads,
                ..Options::default()
            })
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let got = exe.run(&named).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_outputs_match(&what, &got, &want);
    }
}

#[test]
fn yolo_slice_matches_onnx_runtime() {
    check_model("yolo_slice");
}

#[test]
fn conv1d_classifier_matches_onnx_runtime() {
    check_model("conv1d_cls");
}

#[test]
fn unet_decoder_matches_onnx_runtime() {
    check_model("unet_dec");
}
