//! Runs the ONNX backend node suite and enforces the allowlist: every test named in
//! `tests/conformance/allowlist.txt` must pass. `KILN_BLESS=1` rewrites the allowlist with
//! the tests that pass today.

use kiln_tests::conformance::{counts, report, run_all, Outcome};

#[test]
fn onnx_node_suite_allowlist_passes() {
    let Some(dir) = kiln_tests::onnx_node_tests() else {
        if std::env::var_os("CI").is_some() {
            panic!("the ONNX node tests are missing: .ci/run should have installed onnx==1.22.0 into .venv");
        }
        eprintln!(
            "SKIPPED: ONNX node tests not found (create .venv with onnx==1.22.0, see README)"
        );
        return;
    };
    let results = run_all(&dir).expect("reading the node test folder");
    let (p, f, u) = counts(&results);
    let root = kiln_tests::repo_root();
    let report_path = root.join("target/onnx-conformance.txt");
    let _ = std::fs::create_dir_all(root.join("target"));
    let _ = std::fs::write(&report_path, report(&results));
    eprintln!(
        "ONNX node conformance over {} tests: {p} passed, {f} failed, {u} unsupported (report: {})",
        results.len(),
        report_path.display()
    );

    let allow_path = root.join("tests/conformance/allowlist.txt");
    if std::env::var_os("KILN_BLESS").is_some() {
        let mut s =
            String::from("# ONNX node tests that must pass (regenerate with KILN_BLESS=1).\n");
        for r in results.iter().filter(|r| r.outcome == Outcome::Passed) {
            s.push_str(&r.name);
            s.push('\n');
        }
        std::fs::write(&allow_path, s).expect("writing the allowlist");
        return;
    }
    let allow =
        std::fs::read_to_string(&allow_path).expect("reading tests/conformance/allowlist.txt");
    let mut regressions = Vec::new();
    for name in allow
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        match results.iter().find(|r| r.name == name) {
            Some(r) if r.outcome == Outcome::Passed => {}
            Some(r) => regressions.push(format!("{name}: {:?}", r.outcome)),
            None => regressions.push(format!("{name}: not found in {}", dir.display())),
        }
    }
    assert!(
        regressions.is_empty(),
        "allowlisted node tests regressed:\n{}",
        regressions.join("\n")
    );
}
