//! `kiln-conformance [DIR] [--write-report FILE]`: runs the ONNX node suite and prints
//! `N passed, N failed, N unsupported`, plus one line per test with `--verbose`.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let verbose = args.iter().any(|a| a == "--verbose");
    let dir = args
        .iter()
        .find(|a| !a.starts_with("--"))
        .map(std::path::PathBuf::from)
        .or_else(kiln_tests::onnx_node_tests);
    let Some(dir) = dir else {
        eprintln!("error: no ONNX node tests found: pass DIR or set KILN_ONNX_NODE_TESTS");
        std::process::exit(1);
    };
    let results = match kiln_tests::conformance::run_all(&dir) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: reading {}: {e}", dir.display());
            std::process::exit(1);
        }
    };
    if verbose {
        print!("{}", kiln_tests::conformance::report(&results));
    }
    let (p, f, u) = kiln_tests::conformance::counts(&results);
    println!(
        "ONNX node conformance over {} tests: {p} passed, {f} failed, {u} unsupported",
        results.len()
    );
}
