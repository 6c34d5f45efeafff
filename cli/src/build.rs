//! `kiln build`: compile a model ahead of time into a shared library with a C ABI (and,
//! optionally, its C header) through the LLVM backend.

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use std::path::PathBuf;

/// Where the weights go.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum WeightsArg {
    /// In the library's read-only data.
    Embed,
    /// In a side file `<library stem>.weights`, memory-mapped when a context is created.
    File,
}

#[derive(Args)]
pub struct BuildArgs {
    /// An ONNX file or a text-form `.kir` file.
    model: PathBuf,
    /// The shared library to write (e.g. libmodel.so).
    #[arg(short, long)]
    output: PathBuf,
    /// Also write the C header here.
    #[arg(long)]
    header: Option<PathBuf>,
    /// Embed the weights or keep them in a side file.
    #[arg(long, value_enum, default_value_t = WeightsArg::Embed)]
    weights: WeightsArg,
    /// LLVM CPU to compile for: native, x86-64-v3, znver3, ...
    #[arg(long, default_value = "native")]
    target_cpu: String,
    /// Also write the optimised LLVM IR next to the library (`.ll`).
    #[arg(long)]
    emit_ir: bool,
    /// Optimisation level of the graph: 0 as imported, 1 the default pass pipeline.
    #[arg(long, value_name = "LEVEL", default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    opt: u8,
}

pub fn build(args: &BuildArgs) -> Result<()> {
    let t0 = std::time::Instant::now();
    let model = kiln::Model::load(&args.model)?;
    let line = crate::progress::Line::start("building");
    let g = model
        .optimised_with_progress(
            &kiln::Options {
                opt_level: args.opt,
                ..Default::default()
            },
            Some(line.callback()),
        )
        .context("optimising the graph (run with --opt 0 to skip)")?;
    line.set("codegen (LLVM, O3) and link");
    let opts = kiln_llvm::BuildOptions {
        target_cpu: args.target_cpu.clone(),
        weights: match args.weights {
            WeightsArg::Embed => kiln_llvm::WeightsMode::Embed,
            WeightsArg::File => kiln_llvm::WeightsMode::File,
        },
        header: args.header.clone(),
        runtime: None,
        emit_ir: args.emit_ir,
    };
    let r = kiln_llvm::build_library(&g, &args.output, &opts)
        .with_context(|| format!("building {}", args.output.display()))?;
    line.finish();
    println!(
        "wrote {} ({} kernels, {} compiled loop kernels; cpu {}; codegen+O3 {:.2} s, link {:.2} s, total {:.2} s)",
        r.library.display(),
        r.kernels,
        r.loop_kernels,
        r.cpu,
        r.codegen_s,
        r.link_s,
        t0.elapsed().as_secs_f64()
    );
    if let Some(w) = &r.weights_file {
        println!("wrote {} (pass its path to kiln_create)", w.display());
    }
    if let Some(h) = &args.header {
        println!("wrote {}", h.display());
    }
    Ok(())
}
