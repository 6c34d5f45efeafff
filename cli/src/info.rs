//! `kiln info`: what a model takes and gives, what it is made of, and how big it is, and the
//! approximation report a `.kir` written from an approximate graph carries; for a library
//! `kiln build` made (`.so`), its inputs, outputs and approximation report.

use kiln_ir::OpKind;
use std::path::Path;

pub fn info(path: &Path) -> anyhow::Result<()> {
    if path.extension().is_some_and(|e| e == "so") {
        return library_info(path);
    }
    let model = kiln::Model::load(path)?;
    let g = model.graph();
    println!("model: {} (graph @{})", path.display(), g.name);
    if let Some(opsets) = kiln_frontend::onnx::opsets_of(path) {
        let list: Vec<String> = opsets
            .iter()
            .map(|(d, v)| format!("{}={v}", if d.is_empty() { "ai.onnx" } else { d }))
            .collect();
        println!("opsets: {}", list.join(", "));
    }
    println!("inputs:");
    for &i in &g.inputs {
        println!("  %{}: {}", g.value(i).name, g.ty(i));
    }
    println!("outputs:");
    for &o in &g.outputs {
        println!("  %{}: {}", g.value(o).name, g.ty(o));
    }
    let (mut params, mut bytes, mut mapped) = (0usize, 0usize, 0usize);
    for n in g.nodes.iter().filter(|n| n.op == OpKind::Constant) {
        if let Ok(Some(t)) = n.attrs.tensor("value") {
            params += t.len();
            bytes += t.len() * t.dtype().size();
            if t.data().storage() == kiln_ir::Storage::Mapped {
                mapped += t.len() * t.dtype().size();
            }
        }
    }
    println!("parameters: {params} ({:.2} MB)", bytes as f64 / 1e6);
    println!(
        "  in the mapped file, no copy: {:.2} MB; copied once (unaligned in the file): {:.2} MB",
        mapped as f64 / 1e6,
        (bytes - mapped) as f64 / 1e6
    );
    println!("nodes: {}", g.nodes.len());
    println!("ops:");
    for (op, count) in g.op_histogram() {
        println!("  {:<24} {count}", op.name());
    }
    if let Some(r) = kiln::approx::recorded_report(g) {
        println!("approximate: the graph was made by approximate rewrites:\n{r}");
    }
    Ok(())
}

/// `kiln info libmodel.so`: loads the library (its weights side file when one lies beside
/// it) and prints what its C ABI says.
fn library_info(path: &Path) -> anyhow::Result<()> {
    use anyhow::Context;
    let side = path.with_extension("weights");
    let weights = side.is_file().then_some(side.as_path());
    let lib = kiln_llvm::AotLibrary::load(path, weights)
        .with_context(|| format!("loading {}", path.display()))?;
    println!("library: {}", path.display());
    for (what, ios) in [("inputs", lib.inputs()), ("outputs", lib.outputs())] {
        println!("{what}:");
        for io in ios {
            println!("  %{}: {} (rank {})", io.name, io.dtype, io.rank);
        }
    }
    // A decode-step library (`kiln build --decode-step`) is known by its state names.
    let states = lib
        .inputs()
        .iter()
        .filter(|io| {
            io.name
                .starts_with(kiln_passes::decode_step::STATE_IN_PREFIX)
        })
        .count();
    if states > 0 {
        let pos = lib
            .inputs()
            .iter()
            .any(|io| io.name == kiln_passes::decode_step::POSITION_INPUT);
        println!(
            "decode step: one token per run; {states} recurrent state input(s) `state.<i>.*`, \
             returned updated as `state_out.<i>.*` (zeros at the start){}",
            if pos {
                "; `position` is the token's 0-based index"
            } else {
                ""
            }
        );
    }
    match lib.approx_report() {
        Some(r) => println!("built with approximate rewrites:\n{r}"),
        None => println!("exact: built without approximate rewrites"),
    }
    Ok(())
}
