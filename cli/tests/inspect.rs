//! End-to-end tests of `kiln inspect`, `kiln compare` and `kiln run --opt` on the tiny
//! shared models.

use std::path::PathBuf;
use std::process::{Command, Output};

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .expect("running kiln")
}

fn models() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/models"))
}

fn tiny(name: &str) -> String {
    models()
        .join("tiny")
        .join(name)
        .join("model.onnx")
        .display()
        .to_string()
}

fn tiny_models() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(models().join("tiny"))
        .expect("the shared tiny models")
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("model.onnx").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    assert!(v.len() >= 5, "{v:?}");
    v
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn inspect_prints_the_pass_table_and_fused_ops_named_after_onnx_nodes() {
    let o = kiln(&["inspect", &tiny("llama_tiny")]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    for col in ["pass", "nodes", "MFLOP", "est µs", "op changes"] {
        assert!(t.contains(col), "column {col}: {t}");
    }
    // One row per pass, with the op-histogram change it made.
    assert!(t.contains("fuse_norms"), "{t}");
    assert!(t.contains("+5 rms_norm"), "{t}");
    assert!(t.contains("fuse_attention"), "{t}");
    // Provenance names the exporter's node names, through two fusions: `fuse_silu` makes
    // silu(x) of Sigmoid and Mul, and the e-graph folds it into the gate projection's linear.
    let line = t
        .lines()
        .find(|l| l.trim_start().starts_with("linear ") && l.contains("/mlp/gate_proj/MatMul"))
        .unwrap_or_else(|| panic!("the gate projection's linear: {t}"));
    assert!(
        line.contains("/mlp/act_fn/Sigmoid") && line.contains("/mlp/act_fn/Mul"),
        "{line}"
    );
    let attn = t
        .lines()
        .find(|l| l.trim_start().starts_with("attention "))
        .unwrap_or_else(|| panic!("a fused attention: {t}"));
    assert!(attn.contains("/self_attn/Softmax"), "{attn}");
    assert!(t.contains("e-graph"), "{t}");
}

#[test]
fn inspect_passes_spec_and_stop_after_limit_what_runs() {
    let o = kiln(&[
        "inspect",
        &tiny("llama_tiny"),
        "--passes=-fuse_attention",
        "--stop-after",
        "5",
    ]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    assert!(
        t.contains("skipped: ") && t.contains("fuse_attention"),
        "{t}"
    );
    assert!(!t.contains(" 6  "), "no sixth pass: {t}");
    assert!(!t.contains("attention %"), "{t}");
    let o = kiln(&["inspect", &tiny("llama_tiny"), "--passes=-no_such_pass"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("no_such_pass"), "{}", text(&o));
}

#[test]
fn inspect_html_is_one_file_with_two_svg_graphs_and_no_network() {
    let dir = tempfile::tempdir().unwrap();
    let html = dir.path().join("report.html");
    let dot = dir.path().join("g.dot");
    let dumps = dir.path().join("dumps");
    let o = kiln(&[
        "inspect",
        &tiny("llama_tiny"),
        "--html",
        html.to_str().unwrap(),
        &format!("--dot={}", dot.display()),
        "--dump-dir",
        dumps.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let page = std::fs::read_to_string(&html).unwrap();
    // Before and after, each collapsed (shape arithmetic in one box per chain) and full.
    assert_eq!(
        page.matches("<svg").count(),
        4,
        "before and after, collapsed and full"
    );
    assert!(page.contains("class=\"node shape\"") && page.contains("shape arithmetic ("));
    assert!(
        page.contains("class=\"scroll full\" hidden"),
        "the full graph starts hidden"
    );
    assert!(!page.contains("http://") || !page.contains("src=\"http"));
    assert!(
        !page.contains("<script src") && !page.contains("<link"),
        "no network"
    );
    assert!(page.contains("rms_norm") && page.contains("/mlp/act_fn/Sigmoid"));
    let dot = std::fs::read_to_string(&dot).unwrap();
    assert!(dot.starts_with("digraph") && dot.contains("->") && dot.contains("attention"));
    // Dumps are numbered by pass position; the position moves as passes are
    // added, so look the fuse_norms dump up by name.
    let names: Vec<String> = std::fs::read_dir(&dumps)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().any(|n| n.ends_with(".fuse_norms.after.kir")),
        "{names:?}"
    );
}

#[test]
fn run_opt_1_matches_the_test_data_of_every_tiny_model() {
    for m in tiny_models() {
        let dir = models().join("tiny").join(&m);
        let o = kiln(&[
            "run",
            &tiny(&m),
            "--opt",
            "1",
            "--test-data",
            dir.join("test_data_set_0").to_str().unwrap(),
        ]);
        assert_eq!(o.status.code(), Some(0), "{m}: {}", text(&o));
    }
}

#[test]
fn compare_prints_errors_below_tolerance() {
    for m in ["llama_tiny", "gpt2_tiny", "bert_tiny"] {
        let o = kiln(&["compare", &tiny(m), "--random-inputs-seed", "7"]);
        let t = text(&o);
        assert_eq!(o.status.code(), Some(0), "{m}: {t}");
        assert!(t.contains("max abs err") && !t.contains("MISMATCH"), "{t}");
        let row = t
            .lines()
            .find(|l| l.ends_with(" ok"))
            .unwrap_or_else(|| panic!("{m}: {t}"));
        let errs: Vec<f64> = row
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        // Relative error is per element (large where outputs are near zero); the
        // absolute error against outputs of order 1 is what the tolerance bounds.
        assert!(errs.len() == 2 && errs[0] < 1e-4, "{m}: {row}");
    }
}

/// The first of `chromium`, `chromium-browser`, `google-chrome` on PATH.
fn chromium() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .flat_map(|b| std::env::split_paths(&path).map(move |d| d.join(b)))
        .find(|p| p.is_file())
}

/// Loads the report in headless Chromium with a probe script appended: each panel starts
/// collapsed, a click on a shape-arithmetic box shows the full graph, the toggle link
/// collapses it again. Skips (with a message) where no Chromium is installed, as in CI;
/// run by hand after `apt-get install chromium`.
#[test]
fn inspect_html_expands_shape_arithmetic_in_headless_chromium() {
    let Some(chrome) = chromium() else {
        eprintln!("skipping: no chromium on PATH (apt-get install chromium to run this check)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let html = dir.path().join("report.html");
    let o = kiln(&[
        "inspect",
        &tiny("llama_tiny"),
        "--html",
        html.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let probe = r#"<script>
const out=[];
for(const p of document.querySelectorAll('.panel')){
  const c=p.querySelector('.collapsed'),f=p.querySelector('.full');
  if(!c){out.push('none');continue;}
  const s=[c.hidden,f.hidden];
  p.querySelector('g.node.shape').dispatchEvent(new MouseEvent('click',{bubbles:true}));
  const e=[c.hidden,f.hidden];
  p.querySelector('.toggle').dispatchEvent(new MouseEvent('click',{bubbles:true,cancelable:true}));
  out.push(JSON.stringify([s,e,[c.hidden,f.hidden]]));
}
const pre=document.createElement('pre');pre.id='probe';pre.textContent=out.join(';');document.body.appendChild(pre);
</script>"#;
    let page = std::fs::read_to_string(&html).unwrap() + probe;
    std::fs::write(&html, page).unwrap();
    let o = std::process::Command::new(chrome)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=3000",
            "--dump-dom",
        ])
        .arg(format!("file://{}", html.display()))
        .output()
        .expect("running chromium");
    let dom = String::from_utf8_lossy(&o.stdout);
    let got = dom
        .split("<pre id=\"probe\">")
        .nth(1)
        .and_then(|r| r.split("</pre>").next())
        .unwrap_or_else(|| panic!("no probe output: {dom}"));
    let want = "[[false,true],[true,false],[false,true]]";
    assert_eq!(
        got,
        format!("{want};{want}"),
        "collapsed, expanded on click, collapsed again"
    );
}
