//! The `kiln` command-line tool: show, convert, run, benchmark, inspect, compare and build models.
//!
//! Exit codes: 0 ok, 1 user error (bad file, bad arguments, unsupported model),
//! 2 output mismatch against reference data.

mod approx;
mod bench;
mod build;
mod compare;
mod convert;
mod info;
mod inspect;
mod limits;
mod progress;
mod random;
mod report;
mod run;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// kiln: a neural-network graph compiler.
#[derive(Parser)]
#[command(name = "kiln", version, about)]
struct Cli {
    /// The most memory one tensor sized by the model's data or your `--dim`s may take,
    /// e.g. 512M or 8G (default: half of the RAM or of `ulimit -v`, whichever is smaller).
    #[arg(long, global = true, value_name = "SIZE")]
    max_memory: Option<String>,
    /// No progress line on stderr (it is shown only on a terminal, for phases longer than
    /// half a second).
    #[arg(short, long, global = true)]
    quiet: bool,
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
        /// Put the weights (constants of more than 16 elements) in this safetensors file,
        /// which must be in the output's folder; the text names each tensor in it.
        #[arg(long, value_name = "FILE")]
        weights: Option<PathBuf>,
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
    limits::exit_quietly_on_closed_stdout();
    let cli = Cli::parse();
    progress::set_quiet(cli.quiet);
    if let Err(e) = limits::set_max_memory(cli.max_memory.as_deref()) {
        eprintln!("error: {e:#}");
        return ExitCode::from(1);
    }
    let result = match cli.command {
        Command::Info { model } => info::info(&model).map(|()| ExitCode::SUCCESS),
        Command::Convert {
            model,
            output,
            weights,
        } => convert::convert(&model, &output, weights.as_deref()).map(|()| ExitCode::SUCCESS),
        Command::Run(args) => run::run(&args),
        Command::Bench(args) => bench::bench(&args).map(|()| ExitCode::SUCCESS),
        Command::Inspect(args) => inspect::inspect(&args).map(|()| ExitCode::SUCCESS),
        Command::Compare(args) => compare::compare_cmd(&args),
        Command::Build(args) => build::build(&args).map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", error_text(&e));
            ExitCode::from(1)
        }
    }
}

/// The error and its causes on one line, as `{:#}` prints them, but leaving out a cause
/// whose text its parent already shows (`cannot read x: No such device` once, not twice).
fn error_text(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let c = cause.to_string();
        if text.is_empty() {
            text = c;
        } else if !text.contains(&c) {
            text = format!("{text}: {c}");
        }
    }
    text
}
