//! The `kiln` command-line tool: show, convert, run, benchmark, inspect, compare and build models.
//!
//! Exit codes: 0 ok, 1 user error (bad file, bad arguments, unsupported model),
//! 2 output mismatch against reference data.

mod bench;
mod build;
mod compare;
mod info;
mod inspect;
mod report;
mod run;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// kiln: a neural-network graph compiler.
#[derive(Parser)]
#[command(name = "kiln", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show a model's inputs and outputs, op histogram, parameters and opsets.
    Info {
        /// An ONNX file or a text-form `.kir` file.
        model: PathBuf,
    },
    /// Write a model in kiln's text form.
    Convert {
        /// An ONNX file or a text-form `.kir` file.
        model: PathBuf,
        /// Where to write the text form.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Run a model on given inputs, or check it against an ONNX test-data folder.
    Run(run::RunArgs),
    /// Measure latency per thread count, compile time and memory; optionally beside ONNX Runtime.
    Bench(bench::BenchArgs),
    /// Optimise a model pass by pass and show what each pass did (tables, DOT, HTML).
    Inspect(inspect::InspectArgs),
    /// Run the unoptimised and optimised graphs on the same random inputs; print errors.
    Compare(compare::CompareArgs),
    /// Compile a model ahead of time into a shared library with a C ABI (LLVM).
    Build(build::BuildArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Info { model } => info::info(&model).map(|()| ExitCode::SUCCESS),
        Command::Convert { model, output } => convert(&model, &output).map(|()| ExitCode::SUCCESS),
        Command::Run(args) => run::run(&args),
        Command::Bench(args) => bench::bench(&args).map(|()| ExitCode::SUCCESS),
        Command::Inspect(args) => inspect::inspect(&args).map(|()| ExitCode::SUCCESS),
        Command::Compare(args) => compare::compare_cmd(&args),
        Command::Build(args) => build::build(&args).map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn convert(model: &std::path::Path, output: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    let m = kiln::Model::load(model)?;
    let text = kiln_ir::text::print(m.graph());
    std::fs::write(output, text).with_context(|| format!("writing {}", output.display()))?;
    println!(
        "wrote {} ({} nodes, {} bytes)",
        output.display(),
        m.graph().nodes.len(),
        std::fs::metadata(output).map(|m| m.len()).unwrap_or(0)
    );
    Ok(())
}
