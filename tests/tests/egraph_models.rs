//! The equality-saturation pass on every shared model: the optimised graph still matches
//! the model's PyTorch reference outputs (test_data_set_0) within `MODEL_TOLERANCE`, and
//! the e-graph on the largest bench model stays within its limits and time.

use kiln_ir::Graph;
use kiln_passes::egraph::SaturateEgraph;
use kiln_passes::Pass;
use kiln_tests::check_graph_on_test_data as check_outputs;

/// The default pipeline without the e-graph pass.
fn classic_passes(g: &mut Graph) {
    let mut pm = kiln_passes::default_pipeline();
    pm.configure("-saturate_egraph")
        .expect("the pass is in the pipeline");
    pm.run(g).expect("classic passes run");
}

/// Classic passes, then saturation; returns the optimised graph and the report.
fn optimise(name: &str) -> (Graph, Graph, String) {
    let dir = kiln_tests::shared_models().join(name);
    let mut g =
        kiln_frontend::load(dir.join("model.onnx")).unwrap_or_else(|e| panic!("{name}: {e}"));
    classic_passes(&mut g);
    let before = g.clone();
    let pass = SaturateEgraph::default();
    let stats = pass.run(&mut g).unwrap_or_else(|e| panic!("{name}: {e}"));
    kiln_ir::verify(&g).unwrap_or_else(|e| panic!("{name}: {e}"));
    let report = pass
        .last_report()
        .map(|r| r.to_string())
        .unwrap_or_default();
    println!("{name}: {stats}\n{report}");
    (before, g, report)
}

macro_rules! egraph_model_tests {
    ($($test:ident: $path:literal;)*) => {$(
        #[test]
        fn $test() {
            let (_, g, _) = optimise($path);
            check_outputs(&g, &kiln_tests::shared_models().join($path));
        }
    )*};
}

egraph_model_tests! {
    bert_tiny_still_matches_reference_after_saturation: "tiny/bert_tiny";
    gpt2_tiny_still_matches_reference_after_saturation: "tiny/gpt2_tiny";
    gpt2_tiny_kv_still_matches_reference_after_saturation: "tiny/gpt2_tiny_kv";
    llama_tiny_still_matches_reference_after_saturation: "tiny/llama_tiny";
    llama_tiny_kv_still_matches_reference_after_saturation: "tiny/llama_tiny_kv";
    opt_tiny_still_matches_reference_after_saturation: "tiny/opt_tiny";
    vit_tiny_still_matches_reference_after_saturation: "tiny/vit_tiny";
}

/// Run in release: `cargo test --release -p kiln-tests --test egraph_models -- --ignored
/// --nocapture`. Saturation on the largest bench models must stop (saturated or at a
/// limit) in under 2 s.
#[test]
#[ignore = "timing; run in release"]
fn largest_bench_models_saturate_within_two_seconds() {
    for name in ["bench/llama_2l_512", "bench/vit_s16_6l"] {
        let dir = kiln_tests::shared_models().join(name);
        let mut g = kiln_frontend::load(dir.join("model.onnx")).unwrap();
        classic_passes(&mut g);
        let pass = SaturateEgraph::default();
        pass.run(&mut g).unwrap();
        let r = pass.last_report().expect("the pass ran the e-graph");
        println!("{name}:\n{r}");
        assert!(r.saturate_time.as_secs_f64() < 2.0, "{name}: {r}");
    }
}
