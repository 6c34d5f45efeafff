//! Sharing one e-graph saturation between stacked layers (`saturate_egraph` saturates the
//! first copy of a block and replays the result on the others, each with its own weights)
//! must give what saturating every copy on its own gives: on every shared model, the
//! default pipeline and the same pipeline with replaying off produce outputs equal bit for
//! bit on the JIT, and models whose layers are copies do share.

use kiln::{Backend, Model, Options};
use kiln_passes::egraph::SaturateEgraph;
use kiln_passes::{Pass, PassManager};
use kiln_tests::{as_named, model_dir, shared_models, test_data};

/// The shared models kiln's tests run (every folder with a model and test data).
fn shared() -> Vec<String> {
    let mut v = vec![];
    for group in ["tiny", "bench"] {
        let Ok(rd) = std::fs::read_dir(shared_models().join(group)) else {
            continue;
        };
        for e in rd.flatten() {
            if e.path().join("model.onnx").is_file() && e.path().join("test_data_set_0").is_dir() {
                v.push(format!("{group}/{}", e.file_name().to_string_lossy()));
            }
        }
    }
    v.sort();
    v
}

/// `m`'s graph through the default pipeline, its e-graph pass replaying the first copy's
/// saturation or saturating every copy; the pass's counter of replayed copies.
fn optimise(m: &Model, replay: bool) -> (kiln_ir::Graph, usize) {
    let passes: Vec<Box<dyn Pass>> = kiln_passes::default_passes()
        .into_iter()
        .map(|p| {
            if p.name() == "saturate_egraph" {
                let mut e = SaturateEgraph::new(kiln_passes::target::Target::host());
                e.replay = replay;
                Box::new(e) as Box<dyn Pass>
            } else {
                p
            }
        })
        .collect();
    let mut g = m.graph().clone();
    let report = PassManager::new(passes).run(&mut g).unwrap();
    let copies = report
        .passes
        .iter()
        .map(|p| p.stats.counter("replayed_copies"))
        .sum();
    (g, copies)
}

/// Bit-for-bit equality, NaN never equal.
fn same(a: &[kiln_ir::Tensor], b: &[kiln_ir::Tensor]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.shape() == y.shape()
                && x.dtype() == y.dtype()
                && x.to_f64s()
                    .iter()
                    .zip(y.to_f64s())
                    .all(|(p, q)| p.to_bits() == q.to_bits() && !p.is_nan())
        })
}

/// Runs `name` through both pipelines on the JIT; returns the copies replayed.
fn replayed_equals_per_copy(name: &str) -> usize {
    let dir = model_dir(name);
    let m = Model::load(dir.join("model.onnx")).unwrap_or_else(|e| panic!("{name}: {e}"));
    let opts = Options {
        backend: Backend::Jit,
        threads: 2,
        opt_level: 0,
        ..Options::default()
    };
    let (gs, copies) = optimise(&m, true);
    let (gw, _) = optimise(&m, false);
    let a = Model::from_graph(gs).compile(&opts).unwrap();
    let b = Model::from_graph(gw).compile(&opts).unwrap();
    let (inputs, _) = test_data(a.graph(), &dir);
    let ya = a.run(&as_named(&inputs)).unwrap();
    let yb = b.run(&as_named(&inputs)).unwrap();
    assert!(
        same(&ya, &yb),
        "{name}: replayed and per-copy saturation give different outputs"
    );
    copies
}

#[test]
fn sharing_the_saturation_of_stacked_layers_never_changes_a_shared_model_result() {
    let models = shared();
    if models.is_empty() {
        eprintln!("SKIPPED: no shared models");
        return;
    }
    let mut sharing = vec![];
    for name in &models {
        if replayed_equals_per_copy(name) > 0 {
            sharing.push(name.clone());
        }
    }
    // Where the layers are copies (in bert_tiny and llama_tiny the first layer reads shape
    // values the second computes itself, so they differ).
    for want in ["tiny/gpt2_tiny", "bench/vit_s16_6l"] {
        if models.iter().any(|m| m == want) {
            assert!(sharing.iter().any(|m| m == want), "{want}: {sharing:?}");
        }
    }
}
