//! `kiln build`: compile a model ahead of time into a shared library with a C ABI (and,
//! optionally, its C header) through the LLVM backend; or, with `--target cuda`, into a PTX
//! module with its manifest (kernels, launch geometry, arena and weight layout) and weights.

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

/// What to compile for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TargetArg {
    /// A shared library for this CPU kind (`--target-cpu`).
    Cpu,
    /// PTX for an NVIDIA GPU (`--sm`), plus `<output stem>.json` (the manifest) and
    /// `<output stem>.weights`.
    Cuda,
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
    /// What to compile for.
    #[arg(long, value_enum, default_value_t = TargetArg::Cpu)]
    target: TargetArg,
    /// With `--target cuda`: the GPU architecture, 80 (A100) or 90 (H100/H200).
    #[arg(long, default_value_t = 80)]
    sm: u32,
    /// The size of a symbolic input dim, NAME=N (default 1): with `--target cuda` the PTX
    /// and manifest are made for these shapes; with `--approx` and no --calibration, the
    /// random calibration inputs have them.
    #[arg(long = "dim", value_name = "NAME=N")]
    dims: Vec<String>,
    /// Optimisation level of the graph: 0 as imported, 1 the default pass pipeline.
    #[arg(long, value_name = "LEVEL", default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    opt: u8,
    /// Approximate rewrites under an error budget (CPU libraries): the report is printed and
    /// recorded in the library (`kiln_approx_report` in the C ABI).
    #[command(flatten)]
    approx: crate::approx::ApproxArgs,
    /// A causal linear-attention or retention model's one-token recurrent step: each run
    /// takes one token and the state of every `linear_attention` op (`state.<i>.S`, and
    /// `state.<i>.z` when normalised; zeros at the start; `position`, the token's index,
    /// where the model reads positions) and returns the model's outputs, then the new
    /// states (`state_out.<i>.*`). O(1) per token. Checked against the full graph on
    /// seeded inputs before it is built.
    #[arg(long)]
    decode_step: bool,
}

pub fn build(args: &BuildArgs) -> Result<()> {
    let t0 = std::time::Instant::now();
    let model = kiln::Model::load(&args.model)?;
    if args.target == TargetArg::Cuda {
        if args.approx.approx.is_some() {
            anyhow::bail!(
                "--approx builds CPU libraries only so far (drop --target cuda or --approx)"
            );
        }
        if args.decode_step {
            anyhow::bail!("--decode-step builds CPU libraries only so far (drop --target cuda)");
        }
        return build_cuda(args, &model, t0);
    }
    if args.decode_step && args.approx.approx.is_some() {
        anyhow::bail!(
            "--decode-step and --approx do not combine (the approximate linearisation \
             stabilises its keys over every position)"
        );
    }
    let kopts = kiln::Options {
        opt_level: args.opt,
        decode_step: args.decode_step,
        ..Default::default()
    };
    let approx = crate::approx::apply(&args.approx, &model, &args.model, &kopts, &args.dims)?;
    let line = crate::progress::Line::start("building");
    let (g, approx_report) = match approx {
        Some((g, report, _)) => {
            println!("{report}");
            (g, Some(report.to_string()))
        }
        // A `.kir` written from an approximate graph carries its report: record it too.
        None => (
            model
                .optimised_with_progress(&kopts, Some(line.callback()))
                .map_err(|e| match e {
                    // Its message says what the step cannot express; --opt 0 does not help.
                    kiln::Error::DecodeStep(_) => anyhow::Error::new(e),
                    e => anyhow::Error::new(e)
                        .context("optimising the graph (run with --opt 0 to skip)"),
                })?,
            kiln::approx::recorded_report(model.graph()).map(str::to_string),
        ),
    };
    if let Some(r) = g
        .metadata
        .get(kiln_passes::decode_step::DECODE_STEP_METADATA)
    {
        print!("{r}");
    }
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
        approx_report,
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

/// `--target cuda`: PTX, manifest and weights for the model at the given input shapes.
fn build_cuda(args: &BuildArgs, model: &kiln::Model, t0: std::time::Instant) -> Result<()> {
    let inputs = model.inputs();
    let dims = crate::random::bind_dims(&args.dims, inputs.iter().map(|v| &v.ty))?;
    let mut defaulted = std::collections::BTreeSet::new();
    let shapes: Vec<Vec<usize>> = inputs
        .iter()
        .map(|io| {
            let d = io
                .ty
                .shape
                .dims()
                .with_context(|| format!("input `{}` has an unknown rank", io.name))?;
            Ok(d.iter()
                .map(|d| match d {
                    kiln_ir::Dim::Fixed(n) => *n as usize,
                    kiln_ir::Dim::Sym(s) => dims.get(s).copied().unwrap_or_else(|| {
                        defaulted.insert(s.clone());
                        1
                    }),
                    kiln_ir::Dim::Unknown => {
                        defaulted.insert("?".into());
                        1
                    }
                })
                .collect())
        })
        .collect::<Result<_>>()?;
    if !defaulted.is_empty() {
        println!(
            "note: symbolic dims {} set to 1 (use --dim NAME=N)",
            defaulted.into_iter().collect::<Vec<_>>().join(", ")
        );
    }
    let g = kiln_cuda::specialise(model.graph(), &shapes)?;
    let mut g = kiln::Model::from_graph(g)
        .optimised(&kiln::Options {
            opt_level: args.opt,
            ..Default::default()
        })
        .context("optimising the graph (run with --opt 0 to skip)")?;
    kiln_cuda::settle_shapes(&mut g)?;
    let plan = kiln_plan::partition(&g).map_err(anyhow::Error::msg)?;
    let program = kiln_cuda::Program::new(plan, args.sm)
        .with_context(|| format!("building {}", args.output.display()))?;
    let manifest_path = args.output.with_extension("json");
    let weights_path = args.output.with_extension("weights");
    let file_name = |p: &std::path::Path| {
        p.file_name()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default()
    };
    std::fs::write(&args.output, &program.module.ptx)
        .with_context(|| format!("writing {}", args.output.display()))?;
    let manifest = program.manifest(&file_name(&args.output), &file_name(&weights_path));
    std::fs::write(&manifest_path, serde_json::to_string_pretty(&manifest)?)
        .with_context(|| format!("writing {}", manifest_path.display()))?;
    std::fs::write(&weights_path, program.weight_blob())
        .with_context(|| format!("writing {}", weights_path.display()))?;
    let device = program
        .steps
        .iter()
        .filter(|s| {
            matches!(
                s,
                kiln_cuda::Step::Loop { .. }
                    | kiln_cuda::Step::Gemm { .. }
                    | kiln_cuda::Step::Attention { .. }
                    | kiln_cuda::Step::Strided { .. }
                    | kiln_cuda::Step::Copy { .. }
            )
        })
        .count();
    println!(
        "wrote {} (sm_{}, {} kernels: {} on the GPU, {} on the host; arena {} bytes; {:.2} s)",
        args.output.display(),
        args.sm,
        program.steps.len(),
        device,
        program
            .steps
            .iter()
            .filter(|s| matches!(s, kiln_cuda::Step::Host { .. }))
            .count(),
        program.memory.arena.arena_bytes,
        t0.elapsed().as_secs_f64()
    );
    let host = program.host_ops();
    if !host.is_empty() {
        println!(
            "host ops: {}",
            host.iter()
                .map(|(op, n)| format!("{op} ×{n}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    println!("wrote {}", manifest_path.display());
    println!("wrote {}", weights_path.display());
    Ok(())
}
