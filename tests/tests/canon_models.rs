//! Every tiny shared model, after the default pipeline's canonicalisation (the e-graph, which
//! later fuses some of these ops into `linear` epilogues, is turned off here), has its
//! attention, norms and activations recognised as first-class ops, and still matches its
//! PyTorch reference outputs within `MODEL_TOLERANCE`.
//!
//! `KILN_CANON_DUMP=1` prints each optimised graph in the text form.

use kiln_ir::{Graph, OpKind};

/// How many of each recognised op a model should have after the pipeline.
#[derive(Debug, PartialEq, Eq)]
struct Counts {
    attention: usize,
    layer_norm: usize,
    rms_norm: usize,
    gelu: usize,
    silu: usize,
    rotary: usize,
}

fn counts(g: &Graph) -> Counts {
    let n = |op| g.nodes.iter().filter(|x| x.op == op).count();
    Counts {
        attention: n(OpKind::Attention),
        layer_norm: n(OpKind::LayerNorm),
        rms_norm: n(OpKind::RmsNorm),
        gelu: n(OpKind::Gelu),
        silu: n(OpKind::Silu),
        rotary: n(OpKind::Rotary),
    }
}

fn check(name: &str, want: Counts) {
    let dir = kiln_tests::shared_models().join("tiny").join(name);
    let mut g = kiln_frontend::onnx::load_model(&dir.join("model.onnx"))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let mut pm = kiln_passes::default_pipeline();
    pm.configure("-saturate_egraph").expect("a known pass");
    let report = pm.run(&mut g).unwrap_or_else(|e| panic!("{name}: {e}"));
    if std::env::var_os("KILN_CANON_DUMP").is_some() {
        println!("{report}\n{}", kiln_ir::text::print(&g));
    }
    assert_eq!(counts(&g), want, "{name}:\n{report}");
    kiln_tests::check_graph_on_test_data(&g, &dir);
}

macro_rules! canon_tests {
    ($($test:ident: $name:literal => $a:expr, $ln:expr, $rms:expr, $gelu:expr, $silu:expr, $rot:expr;)*) => {$(
        #[test]
        fn $test() {
            check($name, Counts { attention: $a, layer_norm: $ln, rms_norm: $rms, gelu: $gelu, silu: $silu, rotary: $rot });
        }
    )*};
}

canon_tests! {
    // model: attention, layer_norm, rms_norm, gelu, silu, rotary
    bert_tiny_is_canonicalised: "bert_tiny" => 2, 5, 0, 2, 0, 0;
    gpt2_tiny_is_canonicalised: "gpt2_tiny" => 2, 5, 0, 2, 0, 0;
    gpt2_tiny_kv_is_canonicalised: "gpt2_tiny_kv" => 2, 5, 0, 2, 0, 0;
    llama_tiny_is_canonicalised: "llama_tiny" => 2, 0, 5, 0, 2, 4;
    llama_tiny_kv_is_canonicalised: "llama_tiny_kv" => 2, 0, 5, 0, 2, 4;
    opt_tiny_is_canonicalised: "opt_tiny" => 2, 5, 0, 0, 0, 0;
    vit_tiny_is_canonicalised: "vit_tiny" => 2, 5, 0, 2, 0, 0;
}
