//! The text form with weights files: the hand-written transformer block in
//! examples/transformer_block (block.kir naming tensors of block.safetensors) matches its
//! numpy reference on the interpreter and the JIT, and `kiln convert --weights` output of
//! a shared model loads back to the same graph and results.

use kiln::{Backend, Model, Options};
use kiln_ir::{Attr, OpKind, Storage};
use kiln_tests::{check_graph_on_test_data, check_on_test_data, model_dir, repo_root};

#[test]
fn the_hand_written_transformer_block_matches_its_reference() {
    let dir = repo_root().join("examples/transformer_block");
    let model = Model::load(dir.join("block.kir")).unwrap_or_else(|e| panic!("{e}"));
    // The weights are used in the mapped safetensors file, not copied into the graph.
    let mapped = model
        .graph()
        .nodes
        .iter()
        .filter(|n| n.op == OpKind::Constant)
        .filter(|n| matches!(n.attrs.get("value"), Some(Attr::Tensor(t)) if t.data().storage() == Storage::Mapped))
        .count();
    assert_eq!(mapped, 13, "every weight of block.safetensors is mapped");
    check_graph_on_test_data(model.graph(), &dir);
    for backend in [Backend::Jit, Backend::Interp] {
        let exe = model
            .compile(&Options {
                backend,
                ..Options::default()
            })
            .unwrap();
        check_on_test_data(exe.graph(), &dir, |named| exe.run(named));
    }
}

#[test]
fn converted_models_with_a_weights_file_load_back_equal() {
    let dir = model_dir("tiny/bert_tiny");
    if !dir.join("model.onnx").is_file() {
        eprintln!(
            "skipped: {} not found (shared models beside the repository)",
            dir.display()
        );
        return;
    }
    let original = Model::load(dir.join("model.onnx")).unwrap();
    let out = tempfile::tempdir().unwrap();
    let (kir, st) = (out.path().join("m.kir"), out.path().join("m.safetensors"));
    // What `kiln convert model.onnx -o m.kir --weights m.safetensors` does.
    let (text, tensors) = kiln_frontend::weights::externalised(original.graph(), "m.safetensors");
    let refs: Vec<(String, &kiln_ir::Tensor)> = tensors
        .iter()
        .map(|(k, t)| (k.clone(), t.as_ref()))
        .collect();
    kiln_frontend::weights::write_safetensors(&st, &refs).unwrap();
    std::fs::write(&kir, &text).unwrap();
    assert!(
        text.contains("file(\"m.safetensors\""),
        "weights are named in the text"
    );
    assert!(
        !text.contains("> 0x"),
        "no hex weights are left in the text"
    );
    let back = Model::load(&kir).unwrap();
    assert!(
        back.graph() == original.graph(),
        "convert --weights round-trips the graph"
    );
    check_graph_on_test_data(back.graph(), &dir);
}
