//! RWKV-4 and Mamba with the recurrence unrolled over time as the TorchScript exporter writes
//! it (`tests/models/unrolled/{rwkv,mamba}`, made by `scripts/make_unrolled_models.py --tiny`:
//! hidden 32, sequence 40, 2 layers, symbolic batch; reference outputs from ONNX Runtime at
//! batch 2): the default pipeline on the JIT matches the stored outputs, and matches the
//! interpreter running the graph as imported at batch 1 and 3 on other token ids; the
//! recurrences run rolled into loops (`roll_blocks`), and Mamba's loops, whose only carried
//! value is the linear state `h = a ⊙ h + b`, run as one `linear_scan` per layer with the
//! rest of the step lifted over the sequence (`select_recurrence_form`). RWKV's state
//! carries a running maximum, not a linear recurrence: its loops stay.

use kiln::{Backend, Executable, Model, Options, Tensor};
use kiln_tests::{as_named, assert_outputs_match, check_graph_on_test_data, repo_root, test_data};
use std::path::PathBuf;

const MODELS: [&str; 2] = ["rwkv", "mamba"];

/// The models' fixed sequence length, width and vocabulary (`--tiny` in the script).
const SEQ: usize = 40;
const HIDDEN: usize = 32;
const VOCAB: u64 = 128;

fn dir(name: &str) -> PathBuf {
    repo_root().join("tests/models/unrolled").join(name)
}

fn compile(model: &Model, opt_level: u8, backend: Backend) -> Executable {
    model
        .compile(&Options {
            opt_level,
            backend,
            threads: 2,
            ..Options::default()
        })
        .unwrap_or_else(|e| panic!("{backend} at opt {opt_level}: {e}"))
}

fn load(name: &str) -> Model {
    Model::load(dir(name).join("model.onnx")).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Seeded token ids `[batch, SEQ]` in `0..VOCAB`.
fn token_ids(batch: usize, seed: u64) -> Tensor {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let ids: Vec<i64> = (0..batch * SEQ)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) % VOCAB) as i64
        })
        .collect();
    Tensor::from_vec(vec![batch, SEQ], ids)
}

#[test]
fn the_imported_graph_matches_the_stored_outputs_on_the_interpreter() {
    for name in MODELS {
        let model = load(name);
        check_graph_on_test_data(model.graph(), &dir(name));
    }
}

#[test]
fn the_default_pipeline_on_the_jit_matches_the_stored_outputs() {
    for name in MODELS {
        let jit = compile(&load(name), 1, Backend::Jit);
        // The recurrence runs rolled: one loop per layer, the steps its iterations; or,
        // for Mamba, one scan per layer.
        let count = |op| jit.graph().nodes.iter().filter(|n| n.op == op).count();
        let (loops, scans) = (
            count(kiln_ir::OpKind::Loop),
            count(kiln_ir::OpKind::LinearScan),
        );
        let want = if name == "mamba" { (0, 2) } else { (2, 0) };
        assert_eq!(
            (loops, scans),
            want,
            "{name}: (loops, linear scans): roll_blocks rolls each layer's recurrence, \
             select_recurrence_form turns linear ones into scans"
        );
        let (inputs, want) = test_data(jit.graph(), &dir(name));
        let got = jit
            .run(&as_named(&inputs))
            .unwrap_or_else(|e| panic!("{name} on the JIT: {e}"));
        assert_outputs_match(&format!("{name} jit vs onnxruntime"), &got, &want);
    }
}

#[test]
fn the_jit_matches_the_unoptimised_interpreter_at_batch_1_and_3() {
    for name in MODELS {
        let model = load(name);
        let jit = compile(&model, 1, Backend::Jit);
        let interp = compile(&model, 0, Backend::Interp);
        for (batch, seed) in [(1, 7), (3, 11), (3, 12)] {
            let ins = [("input_ids", token_ids(batch, seed))];
            let got = jit.run(&ins).unwrap_or_else(|e| panic!("{name} jit: {e}"));
            let want = interp
                .run(&ins)
                .unwrap_or_else(|e| panic!("{name} interp: {e}"));
            assert_eq!(
                got[0].shape(),
                [batch, SEQ, HIDDEN].as_slice(),
                "{name} batch {batch}"
            );
            assert_outputs_match(&format!("{name} batch {batch} seed {seed}"), &got, &want);
        }
    }
}

/// RWKV's loops (a step of gathered rows, elementwise kernels over the carried state and
/// one row returned per step, after `stack_row_scatters` made the exporter's `out[:, t] =`
/// a scan output) run as one native loop each (`kind` `stepped` in the profile), and give
/// what the interpreter gives on the graph as imported, at batch 1 and 3.
#[test]
fn rwkv_loops_run_as_native_stepped_loops() {
    let model = load("rwkv");
    let jit = compile(&model, 1, Backend::Jit);
    let interp = compile(&model, 0, Backend::Interp);
    for (batch, seed) in [(1, 3), (3, 5)] {
        let ins = [("input_ids", token_ids(batch, seed))];
        let (got, report) = jit.run_profiled(&ins).unwrap();
        let stepped = report
            .kernels
            .iter()
            .filter(|k| k.kind == "stepped")
            .count();
        assert_eq!(
            stepped, 2,
            "one stepped loop per layer: {:?}",
            report.kernels
        );
        let want = interp.run(&ins).unwrap();
        assert_outputs_match(&format!("rwkv stepped batch {batch}"), &got, &want);
    }
}
