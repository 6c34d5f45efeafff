//! Every shared model (../shared/models/{tiny,bench}) imports, runs on the reference
//! interpreter and matches its PyTorch reference outputs within `MODEL_TOLERANCE`, before and
//! after the default optimisation pipeline; the text form round-trips each one.

use kiln::{Backend, Model, Options};
use kiln_ir::Tensor;
use kiln_tests::{check_graph_on_test_data, model_dir};
use std::path::Path;

/// Runs `model` on its `test_data_set_0` and asserts every output is within tolerance.
fn check_against_test_data(model: &Model, dir: &Path) {
    check_graph_on_test_data(model.graph(), dir);
}

fn check_model(name: &str, run_reparsed: bool) {
    let dir = model_dir(name);
    let model = Model::load(dir.join("model.onnx")).unwrap_or_else(|e| panic!("{name}: {e}"));
    check_against_test_data(&model, &dir);
    // The text form round-trips the whole model, weights included.
    let text = kiln_ir::text::print(model.graph());
    let reparsed = kiln_ir::text::parse(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(reparsed == *model.graph(), "{name}: parse(print(g)) != g");
    if run_reparsed {
        check_against_test_data(&Model::from_graph(reparsed), &dir);
    }
    // The optimised graph (canonicalisation, e-graph fusion) still matches the reference.
    let mut optimised = model.graph().clone();
    kiln_passes::default_pipeline()
        .run(&mut optimised)
        .unwrap_or_else(|e| panic!("{name}: optimising: {e}"));
    check_against_test_data(&Model::from_graph(optimised), &dir);
}

macro_rules! model_tests {
    ($($test:ident: $path:literal, $rerun:expr;)*) => {$(
        #[test]
        fn $test() {
            check_model($path, $rerun);
        }
    )*};
}

model_tests! {
    bert_tiny_matches_reference: "tiny/bert_tiny", true;
    gpt2_tiny_matches_reference: "tiny/gpt2_tiny", true;
    gpt2_tiny_kv_matches_reference: "tiny/gpt2_tiny_kv", true;
    llama_tiny_matches_reference: "tiny/llama_tiny", true;
    llama_tiny_kv_matches_reference: "tiny/llama_tiny_kv", true;
    opt_tiny_matches_reference: "tiny/opt_tiny", true;
    vit_tiny_matches_reference: "tiny/vit_tiny", true;
    bert_base_1l_matches_reference: "bench/bert_base_1l", false;
    opt_1l_matches_reference: "bench/opt_1l", false;
    llama_2l_512_matches_reference: "bench/llama_2l_512", false;
    llama_2l_512_kv_matches_reference: "bench/llama_2l_512_kv", false;
    vit_s16_6l_matches_reference: "bench/vit_s16_6l", false;
}

#[test]
fn wrong_input_dtype_and_shape_are_errors_naming_the_input() {
    let model = Model::load(model_dir("tiny/bert_tiny").join("model.onnx"))
        .unwrap()
        .compile(&Options {
            backend: Backend::Interp,
            opt_level: 0,
            ..Options::default()
        })
        .unwrap();
    let ids = Tensor::from_vec(vec![1, 16], vec![1i64; 16]);
    let bad_dtype = Tensor::from_vec(vec![1, 16], vec![1.0f32; 16]);
    let err = model
        .run(&[
            ("input_ids", bad_dtype),
            ("attention_mask", ids.clone()),
            ("token_type_ids", ids.clone()),
        ])
        .unwrap_err()
        .to_string();
    assert!(err.contains("input_ids") && err.contains("i64"), "{err}");
    let bad_rank = Tensor::from_vec(vec![16], vec![1i64; 16]);
    let err = model
        .run(&[
            ("input_ids", ids.clone()),
            ("attention_mask", bad_rank),
            ("token_type_ids", ids.clone()),
        ])
        .unwrap_err()
        .to_string();
    assert!(err.contains("attention_mask"), "{err}");
    // `batch` bound to 1 by input_ids cannot be 2 in token_type_ids.
    let other_batch = Tensor::from_vec(vec![2, 16], vec![1i64; 32]);
    let err = model
        .run(&[
            ("input_ids", ids.clone()),
            ("attention_mask", ids),
            ("token_type_ids", other_batch),
        ])
        .unwrap_err()
        .to_string();
    assert!(err.contains("token_type_ids"), "{err}");
    let err = model.run(&[]).unwrap_err().to_string();
    assert!(err.contains("missing input `input_ids`"), "{err}");
}
