//! `--approx`, `--max-error`, `--calibration`, `--metric` on `kiln run|bench|inspect|build`: bad
//! arguments exit 1 with a message naming the problem, a budget that cannot be met is
//! refused (exit 1), a generous one prints the report, random calibration warns loudly, and
//! `kiln inspect --calibration` prints the FFN activation density.

use std::path::PathBuf;
use std::process::{Command, Output};

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .expect("running kiln")
}

fn model(name: &str) -> String {
    dir(name).join("model.onnx").display().to_string()
}

fn dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/models/sparse")
        .join(name)
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn fails_with(args: &[&str], needle: &str) {
    let o = kiln(args);
    assert_eq!(o.status.code(), Some(1), "{args:?}: {}", text(&o));
    assert!(
        text(&o).contains(needle),
        "{args:?}: wanted `{needle}` in {}",
        text(&o)
    );
}

#[test]
fn bad_approx_arguments_are_clear_errors() {
    let m = model("swiglu_ffn");
    let calib = dir("swiglu_ffn").display().to_string();
    let base = ["run", m.as_str(), "--random-inputs"];
    let with = |extra: &[&str]| -> Vec<String> {
        base.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            with(&["--approx", "ffn-magic", "--max-error", "0.1"]),
            "unknown approximation family `ffn-magic`",
        ),
        (
            with(&["--approx", "ffn-threshold", "--max-error", "-0.1"]),
            "--max-error must be a finite number >= 0",
        ),
        (
            with(&["--approx", "ffn-threshold"]),
            "--approx needs an error budget",
        ),
        (
            with(&["--max-error", "0.1"]),
            "--max-error is given without --approx",
        ),
        (
            with(&["--approx", "ffn-threshold=1.5", "--max-error", "0.1"]),
            "bad parameter `1.5`",
        ),
        (
            with(&["--approx", "ffn-topk=0", "--max-error", "0.1"]),
            "bad parameter `0` for --approx ffn-topk",
        ),
        (
            with(&["--approx", "ffn-topk=half", "--max-error", "0.1"]),
            "bad parameter `half` for --approx ffn-topk",
        ),
        (
            with(&[
                "--approx",
                "ffn-threshold",
                "--max-error",
                "0.1",
                "--metric",
                "l3",
            ]),
            "unknown metric `l3`",
        ),
        (
            with(&[
                "--approx",
                "ffn-threshold",
                "--max-error",
                "0.1",
                "--calibration",
                &dir("relu_ffn").display().to_string(),
            ]),
            "has 2 inputs but the model takes 1",
        ),
        (
            with(&[
                "--approx",
                "ffn-threshold",
                "--max-error",
                "0.1",
                "--calibration",
                &dir("swiglu_ffn/test_data_set_0/input_0.pb")
                    .display()
                    .to_string(),
            ]),
            "not a folder",
        ),
        (
            with(&[
                "--approx",
                "ffn-threshold",
                "--max-error",
                "0.1",
                "--calibration",
                &dir("").display().to_string(),
            ]),
            "no test_data_set_*",
        ),
    ];
    for (args, needle) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        fails_with(&args, needle);
    }
    // top1 needs a logits-like output; relu_ffn's is `y`.
    let relu = dir("relu_ffn").display().to_string();
    fails_with(
        &[
            "run",
            &model("relu_ffn"),
            "--random-inputs",
            "--approx",
            "ffn-threshold",
            "--max-error",
            "0.1",
            "--metric",
            "top1",
            "--calibration",
            &relu,
        ],
        "no output is logits-like",
    );
    // The calibration folder fits: no error from it.
    let o = kiln(&[
        "run",
        &m,
        "--random-inputs",
        "--approx",
        "ffn-threshold",
        "--max-error",
        "0.5",
        "--calibration",
        &calib,
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

#[test]
fn a_tiny_budget_is_refused_with_exit_1() {
    let m = model("swiglu_ffn");
    let calib = dir("swiglu_ffn").display().to_string();
    for cmd in ["run", "bench", "inspect"] {
        let mut args = vec![cmd, m.as_str()];
        if cmd == "run" {
            args.push("--random-inputs");
        }
        if cmd == "bench" {
            args.extend(["--runs", "1", "--warmup", "0"]);
        }
        args.extend([
            "--approx",
            "ffn-threshold=0.5",
            "--max-error",
            "1e-9",
            "--calibration",
            &calib,
        ]);
        fails_with(&args, "approximation refused");
    }
}

#[test]
fn a_generous_budget_prints_the_report_and_random_calibration_warns() {
    let m = model("swiglu_ffn");
    let calib = dir("swiglu_ffn").display().to_string();
    let o = kiln(&[
        "run",
        &m,
        "--random-inputs",
        "--approx",
        "ffn-threshold=0.8",
        "--max-error",
        "0.3",
        "--calibration",
        &calib,
        "--metric",
        "rel-l2",
    ]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    for needle in [
        "ffn-threshold",
        "sparsity=0.80",
        "held out",
        "est. speed-up",
        "logits",
    ] {
        assert!(t.contains(needle), "`{needle}` missing from {t}");
    }
    assert!(!t.contains("RANDOM"), "{t}");
    let o = kiln(&[
        "bench",
        &m,
        "--runs",
        "3",
        "--warmup",
        "1",
        "--approx",
        "ffn-threshold=0.8",
        "--max-error",
        "0.3",
    ]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    assert!(t.contains("SEEDED RANDOM inputs"), "{t}");
    assert!(
        t.contains("measured") && !t.contains("n/a (kiln bench measures it)"),
        "{t}"
    );
}

#[test]
fn inspect_prints_ffn_density_and_the_report() {
    let o = kiln(&[
        "inspect",
        &model("relu_ffn"),
        "--calibration",
        &dir("relu_ffn").display().to_string(),
    ]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    assert!(t.contains("FFN activation density"), "{t}");
    // One ReLU layer, with a density strictly between 0 and 100% on these inputs.
    let line = t
        .lines()
        .find(|l| l.trim_start().starts_with('%') && l.contains("(min"))
        .unwrap_or_else(|| panic!("no density row in {t}"));
    let pct: f64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.trim_end_matches('%').parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!(pct > 0.0 && pct < 100.0, "{line}");
    let html = tempfile::tempdir().unwrap();
    let page = html.path().join("r.html");
    let o = kiln(&[
        "inspect",
        &model("swiglu_ffn"),
        "--approx",
        "ffn-threshold=0.8",
        "--max-error",
        "0.3",
        "--calibration",
        &dir("swiglu_ffn").display().to_string(),
        "--html",
        &page.display().to_string(),
    ]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    assert!(
        t.contains("ffn-threshold") && t.contains("approximate graph"),
        "{t}"
    );
    let h = std::fs::read_to_string(&page).unwrap();
    assert!(h.contains("Approximation and activation density") && h.contains("ffn-threshold"));
}

#[test]
fn a_kir_written_from_an_approximate_graph_carries_the_report() {
    let tmp = tempfile::tempdir().unwrap();
    let dump = tmp.path().join("dump");
    let o = kiln(&[
        "inspect",
        &model("swiglu_ffn"),
        "--approx",
        "ffn-threshold=0.8",
        "--max-error",
        "0.3",
        "--calibration",
        &dir("swiglu_ffn").display().to_string(),
        "--dump-dir",
        &dump.display().to_string(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let kir = dump.join("approximate.kir");
    let src = std::fs::read_to_string(&kir).unwrap();
    assert!(src.contains("attributes {approx_report = "), "{src}");
    let k = kir.display().to_string();
    for args in [vec!["info", k.as_str()], vec!["inspect", k.as_str()]] {
        let o = kiln(&args);
        let t = text(&o);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {t}");
        assert!(
            t.contains("approximate rewrites")
                && t.contains("ffn-threshold")
                && t.contains("held out"),
            "{args:?}: {t}"
        );
    }
    // The exact model says nothing about approximation.
    let o = kiln(&["info", &model("swiglu_ffn")]);
    assert!(!text(&o).contains("approximate rewrites"), "{}", text(&o));
}

#[test]
fn build_records_the_report_in_the_library() {
    let m = model("swiglu_ffn");
    let calib = dir("swiglu_ffn").display().to_string();
    let tmp = tempfile::tempdir().unwrap();
    let approx = tmp.path().join("libapprox.so").display().to_string();
    let exact = tmp.path().join("libexact.so").display().to_string();
    let o = kiln(&[
        "build",
        &m,
        "-o",
        &approx,
        "--approx",
        "ffn-threshold=0.5",
        "--max-error",
        "0.5",
        "--calibration",
        &calib,
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("ffn-threshold"), "{}", text(&o));
    let o = kiln(&["info", &approx]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("built with approximate rewrites") && t.contains("ffn-threshold"),
        "{t}"
    );
    assert!(t.contains("held out"), "{t}");
    let o = kiln(&["build", &m, "-o", &exact]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let o = kiln(&["info", &exact]);
    assert!(
        text(&o).contains("exact: built without approximate rewrites"),
        "{}",
        text(&o)
    );
    // A budget that cannot be met builds nothing.
    let refused = tmp.path().join("librefused.so");
    fails_with(
        &[
            "build",
            &m,
            "-o",
            &refused.display().to_string(),
            "--approx",
            "ffn-threshold=0.5",
            "--max-error",
            "1e-9",
            "--calibration",
            &calib,
        ],
        "approximation refused",
    );
    assert!(!refused.exists());
}

#[test]
fn softmax_attention_of_our_own_model_is_a_site_and_the_refusal_says_why() {
    // tests/models/attention/mha_causal: heads of width 64 and an additive [S, S] causal
    // bias (leading dims left out). The site is found (the mask is a causal key-padding
    // pattern); at 1K tokens and 2 heads the cost model expects the FAVOR+ form to be
    // slower, and the budget machinery says so instead of approximating for nothing.
    let m = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/models/attention/mha_causal/model.onnx")
        .display()
        .to_string();
    fails_with(
        &[
            "run",
            &m,
            "--random-inputs",
            "--dim",
            "seq=1024",
            "--dim",
            "batch=1",
            "--approx",
            "linear-attention",
            "--max-error",
            "1",
        ],
        "no candidate at the 1 sites would run faster",
    );
}
