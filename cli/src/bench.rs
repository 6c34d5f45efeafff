//! `kiln bench`: latency of a compiled model per thread count (median and min of N runs),
//! compile time and planned memory, optionally beside ONNX Runtime on the same inputs
//! (`bench/ort_bench.py`, in rounds alternating with kiln's) and with a per-kernel profile. `--backend jit,aot` measures the
//! JIT and an ahead-of-time library (`kiln build`, loaded with dlopen) side by side.

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use kiln::{Backend, Executable, Model, Options, RunReport, Tensor};
use kiln_reference::TestData;
use rand::SeedableRng;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How results are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A table for people.
    Text,
    /// Markdown table rows (what `bench/run.sh` collects), with a header line.
    Md,
    /// Markdown rows without the header.
    MdRows,
    /// One JSON object.
    Json,
}

#[derive(clap::Args)]
pub struct BenchArgs {
    /// An ONNX file or a text-form `.kir` file.
    model: PathBuf,
    /// Thread counts to measure, comma-separated (0: one per physical core).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    threads: Vec<usize>,
    /// Timed runs per thread count.
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// Untimed runs before the timed ones.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Also run ONNX Runtime on the same inputs (needs `.venv` from scripts/setup-venv.sh).
    #[arg(long)]
    compare_ort: bool,
    /// Print time per kernel (by label and by op), summed over profiled runs.
    #[arg(long)]
    profile: bool,
    /// Size of a symbolic dim: NAME=N (default 1). Given dims mean random inputs even when
    /// the model has test data.
    #[arg(long = "dim", value_name = "NAME=N")]
    dims: Vec<String>,
    /// Which executors run the model, comma-separated: jit, interp, aot (a library built
    /// with `kiln build` into a temporary folder and loaded with dlopen).
    #[arg(long, value_delimiter = ',', default_value = "jit")]
    backend: Vec<Backend>,
    /// Optimisation level (0: as imported, 1: default pipeline).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    opt: u8,
    /// Turn passes of the default pipeline off and on, as `kiln inspect` takes them:
    /// `--passes=-linearise_attention` (comma-separated `-name`/`+name`).
    #[arg(long, default_value = "")]
    passes: String,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
    /// Also append the results, in `--format` (text means md-rows here), to FILE.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// The model's name in rows (default: the folder holding it).
    #[arg(long)]
    name: Option<String>,
    /// The Python with onnxruntime (default: .venv/bin/python of the kiln checkout).
    #[arg(long, value_name = "PATH")]
    python: Option<PathBuf>,
    #[command(flatten)]
    approx: crate::approx::ApproxArgs,
    /// Where to run: `cpu`, or `cuda` / `cuda:N` (an NVIDIA GPU through its driver; the
    /// model is compiled to PTX for the input shapes; without a driver, an error).
    #[arg(long, value_name = "DEVICE", default_value = "cpu")]
    device: kiln::Device,
}

/// One run; with `profile`, the per-kernel times and memory plan too.
fn run_once(
    exe: &Executable,
    named: &[(&str, Tensor)],
    profile: bool,
) -> Result<Option<RunReport>> {
    if profile {
        return Ok(Some(exe.run_profiled(named)?.1));
    }
    exe.run(named)?;
    Ok(None)
}

/// One (backend, thread count)'s figures.
struct Row {
    backend: Backend,
    threads: usize,
    compile_ms: f64,
    median_ms: f64,
    min_ms: f64,
    memory: kiln::MemoryPlan,
    ort: Option<OrtResult>,
}

#[derive(Clone)]
struct OrtResult {
    median_ms: f64,
    min_ms: f64,
    version: String,
}

/// The kiln checkout this binary was built from: where `bench/ort_bench.py` and `.venv` are.
fn checkout() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn bench(args: &BenchArgs) -> Result<()> {
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let loading = std::time::Instant::now();
    let model = Model::load(&args.model)?;
    let load_ms = loading.elapsed().as_secs_f64() * 1e3;
    let name = args.name.clone().unwrap_or_else(|| {
        args.model
            .parent()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| args.model.display().to_string())
    });
    let (inputs, source) = bench_inputs(args, &model)?;
    let named: Vec<(&str, Tensor)> = inputs
        .iter()
        .map(|(n, t)| (n.as_str(), t.clone()))
        .collect();
    let ort_dir = if args.compare_ort {
        Some(write_npy_inputs(&inputs)?)
    } else {
        None
    };
    let show = crate::progress::enabled();
    // With --approx: the approximate graph (chosen once, at the first thread count) is what
    // every row measures; the report gets the measured speed-up over the exact model.
    let first_opts = Options {
        threads: args.threads.first().copied().unwrap_or(1),
        opt_level: args.opt,
        passes: args.passes.clone(),
        ..Options::default()
    };
    let mut approx =
        crate::approx::apply(&args.approx, &model, &args.model, &first_opts, &args.dims)?;
    if let Some((g, report, _)) = &mut approx {
        let exact = model.compile(&first_opts)?;
        let apx = model.compile_optimised(g.clone(), &first_opts)?;
        let ordered: Vec<Tensor> = inputs.iter().map(|(_, t)| t.clone()).collect();
        report.measured_speedup = Some(crate::approx::measure_speedup(
            &exact, &apx, &ordered, args.runs,
        )?);
        if args.format == Format::Text {
            println!("{report}");
        } else {
            eprintln!("{report}");
        }
    }
    let mut rows = Vec::new();
    let mut profile: Option<Profile> = None;
    for &backend in &args.backend {
        for &threads in &args.threads {
            let bar = progress(
                show,
                0,
                format!("{name}: {backend}, compiling ({threads} threads)"),
            );
            // Every field is set today; the update keeps this compiling as Options grows.
            #[allow(clippy::needless_update)]
            let opts = Options {
                threads,
                opt_level: args.opt,
                passes: args.passes.clone(),
                backend,
                device: args.device,
                ..Options::default()
            };
            let exe = match &approx {
                Some((g, _, _)) => model.compile_optimised(g.clone(), &opts)?,
                None => model.compile(&opts)?,
            };
            bar.finish_and_clear();
            let bar = progress(
                show,
                (args.warmup + args.runs) as u64,
                format!("{name}: {backend}, {} threads", exe.threads()),
            );
            // ORT, when compared, runs in rounds between kiln's (see `ROUNDS`).
            let mut ort_server = match &ort_dir {
                Some(dir) => Some(OrtServer::start(args, exe.threads(), dir, &inputs)?),
                None => None,
            };
            let mut times = Vec::with_capacity(args.runs);
            let mut ort_times = Vec::with_capacity(args.runs);
            for _ in 0..args.warmup {
                run_once(&exe, &named, false)
                    .with_context(|| format!("running {}", args.model.display()))?;
                bar.inc(1);
            }
            let rounds = ROUNDS.min(args.runs).max(1);
            for r in 0..rounds {
                let n = args.runs * (r + 1) / rounds - args.runs * r / rounds;
                if ort_server.is_some() {
                    // Let ORT's spinning threads go to sleep, then warm the caches back up.
                    std::thread::sleep(ROUND_PAUSE);
                    for _ in 0..ROUND_WARMUP {
                        run_once(&exe, &named, false)?;
                    }
                }
                for _ in 0..n {
                    let start = Instant::now();
                    run_once(&exe, &named, false)
                        .with_context(|| format!("running {}", args.model.display()))?;
                    times.push(start.elapsed());
                    bar.inc(1);
                }
                if let Some(o) = &mut ort_server {
                    std::thread::sleep(ROUND_PAUSE);
                    ort_times.extend(o.run(n)?);
                }
            }
            bar.finish_and_clear();
            let ort = match ort_server {
                Some(o) => Some(o.finish(&mut ort_times)?),
                None => None,
            };
            let report = run_once(&exe, &named, true)?.unwrap_or_default();
            if args.profile {
                profile = Some(profile_runs(&exe, &named, args.runs, report.clone())?);
            }
            let (median_ms, min_ms) = median_min(&mut times);
            if let Some(p) = &mut profile {
                p.median_ms = median_ms;
                p.backend = backend;
            }
            rows.push(Row {
                backend,
                threads: exe.threads(),
                compile_ms: exe.compile_time().as_secs_f64() * 1e3,
                median_ms,
                min_ms,
                memory: report.memory,
                ort,
            });
        }
    }
    if let Some(dir) = ort_dir {
        let _ = std::fs::remove_dir_all(dir);
    }
    let text = match args.format {
        Format::Text => text_table(&name, args, &source, &rows),
        Format::Md => md_rows(&name, &rows, true),
        Format::MdRows => md_rows(&name, &rows, false),
        Format::Json => json(&name, args, &source, load_ms, &rows),
    };
    print!("{text}");
    if let Some(p) = profile {
        print!("{}", profile_table(&p));
    }
    if let Some(path) = &args.out {
        let body = match args.format {
            Format::Text | Format::MdRows => md_rows(&name, &rows, false),
            _ => text,
        };
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| f.write_all(body.as_bytes()))
            .with_context(|| format!("appending to {}", path.display()))?;
    }
    Ok(())
}

fn progress(show: bool, len: u64, msg: String) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = if len == 0 {
        let b = ProgressBar::new_spinner();
        b.enable_steady_tick(Duration::from_millis(100));
        b
    } else {
        let b = ProgressBar::new(len);
        if let Ok(style) = ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed}") {
            b.set_style(style.progress_chars("=> "));
        }
        b
    };
    bar.set_message(msg);
    bar
}

/// The model's `test_data_set_0` inputs when it has them (and no `--dim` asks otherwise),
/// else seeded random ones: floats in [-1, 1), integers in {0, 1}, which are valid token ids,
/// token types and mask values for any table (the model does not say how big its tables are).
const RANDOM_INT_END: i64 = 2;

fn bench_inputs(args: &BenchArgs, model: &Model) -> Result<(Vec<(String, Tensor)>, String)> {
    let ios = model.inputs();
    let dir = args
        .model
        .parent()
        .unwrap_or(Path::new("."))
        .join("test_data_set_0");
    if args.dims.is_empty() && dir.is_dir() {
        let data = TestData::load(&dir)?;
        if data.inputs.len() == ios.len() {
            let inputs = ios
                .iter()
                .zip(data.inputs)
                .map(|(io, (_, t))| (io.name.clone(), t))
                .collect();
            return Ok((inputs, format!("{}", dir.display())));
        }
    }
    let dims = crate::random::bind_dims(&args.dims, ios.iter().map(|io| &io.ty))?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let inputs = ios
        .iter()
        .map(|io| {
            let t = crate::run::random_tensor(&io.ty, &dims, RANDOM_INT_END, &mut rng)
                .with_context(|| format!("making a random value for input `{}`", io.name))?;
            Ok((io.name.clone(), t))
        })
        .collect::<Result<_>>()?;
    Ok((inputs, "random (seed 0)".into()))
}

/// Per-kernel times summed over profiled runs, and the unprofiled median run for scale.
struct Profile {
    backend: Backend,
    kernels: Vec<kiln::KernelTime>,
    runs: usize,
    threads: usize,
    median_ms: f64,
    /// The arena of the last profiled run: its block's bytes, the bytes of values written
    /// into their regions, and the bytes of all values produced (outputs included); zeros
    /// where the backend does not report them.
    arena: (usize, usize, usize),
}

/// Sums per-kernel times over `runs` profiled runs after `first`.
fn profile_runs(
    exe: &Executable,
    named: &[(&str, Tensor)],
    runs: usize,
    first: RunReport,
) -> Result<Profile> {
    let mut kernels = first.kernels;
    for k in &mut kernels {
        k.nanos = 0;
    }
    let mut arena = (0, 0, 0);
    for _ in 0..runs {
        let r = run_once(exe, named, true)?.unwrap_or_default();
        arena = (r.arena_bytes, r.in_arena_bytes, r.produced_bytes);
        for (a, k) in kernels.iter_mut().zip(r.kernels) {
            a.nanos += k.nanos;
        }
    }
    Ok(Profile {
        backend: Backend::Aot,
        kernels,
        runs,
        threads: exe.threads(),
        median_ms: 0.0,
        arena,
    })
}

fn median_min(times: &mut [Duration]) -> (f64, f64) {
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let n = times.len();
    let median = if n % 2 == 1 {
        ms(times[n / 2])
    } else {
        (ms(times[n / 2 - 1]) + ms(times[n / 2])) / 2.0
    };
    (median, ms(times[0]))
}

/// Writes the inputs as `.npy` files into a fresh temporary folder for ORT.
fn write_npy_inputs(inputs: &[(String, Tensor)]) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("kiln-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for (k, (_, t)) in inputs.iter().enumerate() {
        let path = dir.join(format!("input_{k}.npy"));
        kiln_frontend::tensor_io::write_npy(&path, t)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(dir)
}

/// Rounds the timed runs are cut into when ORT is compared: kiln runs a round, then ORT the
/// same number, and so on, so that both medians come from the same minutes of a machine whose
/// speed drifts (other tenants, turbo). One block of kiln runs followed by one of ORT runs
/// moved kiln/ORT by up to ±8% between repeats of the same build.
const ROUNDS: usize = 5;
/// Pause before each round, then [`ROUND_WARMUP`] untimed runs on each side: the other side's
/// idle threads spin for a while after it stops (kiln's for 0.3 ms, ORT's longer) and would
/// otherwise share the cores with the first timed runs. With a 20 ms pause kiln's 2-thread
/// decode step measured 0.88 ms beside ORT and 0.72 ms alone; with 150 ms, 0.73.
const ROUND_PAUSE: Duration = Duration::from_millis(150);
/// Untimed runs on each side at the start of each round.
const ROUND_WARMUP: usize = 3;

/// ONNX Runtime in a child process (`bench/ort_bench.py --serve`): one warm session that
/// times `run N` requests.
struct OrtServer {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
    version: String,
    script: PathBuf,
}

impl OrtServer {
    fn start(
        args: &BenchArgs,
        threads: usize,
        dir: &Path,
        inputs: &[(String, Tensor)],
    ) -> Result<OrtServer> {
        let python = args
            .python
            .clone()
            .unwrap_or_else(|| checkout().join(".venv/bin/python"));
        let script = checkout().join("bench/ort_bench.py");
        let mut cmd = std::process::Command::new(&python);
        cmd.arg(&script)
            .arg(&args.model)
            .args(["--threads", &threads.to_string()])
            .args(["--warmup", &args.warmup.to_string()])
            .arg("--serve")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        for (k, (name, _)) in inputs.iter().enumerate() {
            cmd.arg("--input").arg(format!(
                "{name}={}",
                dir.join(format!("input_{k}.npy")).display()
            ));
        }
        let mut child = cmd.spawn().with_context(|| {
            format!(
                "running {} (create it with scripts/setup-venv.sh, or pass --python)",
                python.display()
            )
        })?;
        let stdin = child.stdin.take().context("ORT's stdin")?;
        let stdout = std::io::BufReader::new(child.stdout.take().context("ORT's stdout")?);
        let mut server = OrtServer {
            child,
            stdin,
            stdout,
            version: String::new(),
            script,
        };
        let hello = server.read_json()?;
        server.version = hello["version"].as_str().unwrap_or("?").to_string();
        Ok(server)
    }

    /// One JSON line from the script; its stderr in the error when it has stopped.
    fn read_json(&mut self) -> Result<serde_json::Value> {
        use std::io::{BufRead, Read};
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        if line.trim().is_empty() {
            let mut err = String::new();
            if let Some(e) = self.child.stderr.as_mut() {
                let _ = e.read_to_string(&mut err);
            }
            let _ = self.child.wait();
            bail!("ONNX Runtime stopped ({}):\n{err}", self.script.display());
        }
        serde_json::from_str(&line)
            .with_context(|| format!("{} printed no JSON: {line}", self.script.display()))
    }

    /// Times `n` runs.
    fn run(&mut self, n: usize) -> Result<Vec<f64>> {
        writeln!(self.stdin, "run {n} {ROUND_WARMUP}")?;
        self.stdin.flush()?;
        let v = self.read_json()?;
        let times = v["times_ms"]
            .as_array()
            .context("ORT gave no `times_ms`")?
            .iter()
            .filter_map(|x| x.as_f64())
            .collect::<Vec<_>>();
        if times.len() != n {
            bail!("ORT timed {} runs, not {n}", times.len());
        }
        Ok(times)
    }

    /// Stops the child and summarises `times`.
    fn finish(mut self, times: &mut [f64]) -> Result<OrtResult> {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.stdin.flush();
        let _ = self.child.wait();
        let mut d: Vec<Duration> = times
            .iter()
            .map(|&ms| Duration::from_secs_f64(ms / 1e3))
            .collect();
        let (median_ms, min_ms) = median_min(&mut d);
        Ok(OrtResult {
            median_ms,
            min_ms,
            version: self.version,
        })
    }
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn text_table(name: &str, args: &BenchArgs, source: &str, rows: &[Row]) -> String {
    let mut s = format!(
        "{name}: {} runs after {} warm-up, inputs {source}\n",
        args.runs, args.warmup
    );
    if let Some(o) = rows.iter().find_map(|r| r.ort.as_ref()) {
        s += &format!("ONNX Runtime {}\n", o.version);
    }
    s += &format!(
        "{:>7} {:>7} {:>11} {:>12} {:>10} {:>11} {:>9} {:>9} {:>10} {:>10}\n",
        "backend",
        "threads",
        "compile ms",
        "median ms",
        "min ms",
        "ORT median",
        "ORT min",
        "kiln/ORT",
        "arena MiB",
        "live MiB"
    );
    for r in rows {
        let (om, on, ratio) = ort_cells(r);
        s += &format!(
            "{:>7} {:>7} {:>11.1} {:>12.3} {:>10.3} {:>11} {:>9} {:>9} {:>10.2} {:>10.2}\n",
            r.backend.to_string(),
            r.threads,
            r.compile_ms,
            r.median_ms,
            r.min_ms,
            om,
            on,
            ratio,
            mib(r.memory.arena_bytes),
            mib(r.memory.live_peak_bytes)
        );
    }
    s
}

/// ORT median, ORT min and kiln/ORT (of medians) as cells; `-` without ORT.
fn ort_cells(r: &Row) -> (String, String, String) {
    match &r.ort {
        Some(o) => (
            format!("{:.3}", o.median_ms),
            format!("{:.3}", o.min_ms),
            format!("{:.2}", r.median_ms / o.median_ms),
        ),
        None => ("-".into(), "-".into(), "-".into()),
    }
}

/// The markdown header `bench/run.sh` writes once per table.
const MD_HEADER: &str = "| model | backend | threads | kiln median ms | kiln min ms | ORT median ms | ORT min ms | kiln/ORT | compile ms | peak MiB |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n";

fn md_rows(name: &str, rows: &[Row], header: bool) -> String {
    let mut s = if header {
        MD_HEADER.to_string()
    } else {
        String::new()
    };
    for r in rows {
        let (om, on, ratio) = ort_cells(r);
        s += &format!(
            "| {name} | {} | {} | {:.3} | {:.3} | {om} | {on} | {ratio} | {:.1} | {:.2} |\n",
            r.backend,
            r.threads,
            r.median_ms,
            r.min_ms,
            r.compile_ms,
            mib(r.memory.arena_bytes)
        );
    }
    s
}

/// `load_ms`: reading and importing the model file (before any compile).
fn json(name: &str, args: &BenchArgs, source: &str, load_ms: f64, rows: &[Row]) -> String {
    let rows: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "backend": r.backend.to_string(),
                "threads": r.threads,
                "compile_ms": r.compile_ms,
                "median_ms": r.median_ms,
                "min_ms": r.min_ms,
                "arena_bytes": r.memory.arena_bytes,
                "live_peak_bytes": r.memory.live_peak_bytes,
                "ort": r.ort.as_ref().map(|o| serde_json::json!({
                    "median_ms": o.median_ms,
                    "min_ms": o.min_ms,
                    "version": o.version,
                    "ratio": r.median_ms / o.median_ms,
                })),
            })
        })
        .collect();
    let v = serde_json::json!({
        "model": name,
        "path": args.model.display().to_string(),
        "backend": args.backend.iter().map(|b| b.to_string()).collect::<Vec<_>>().join(","),
        "runs": args.runs,
        "warmup": args.warmup,
        "inputs": source,
        "load_ms": load_ms,
        "results": rows,
    });
    format!("{v}\n")
}

/// Time per kernel label and per op, largest first, with its share of the total.
fn profile_table(p: &Profile) -> String {
    let (kernels, runs) = (&p.kernels, p.runs);
    let total: u64 = kernels.iter().map(|k| k.nanos).sum();
    let mut by_label: HashMap<&str, (u64, &str)> = HashMap::new();
    let mut by_op: HashMap<String, (u64, usize)> = HashMap::new();
    for k in kernels {
        by_label.entry(&k.label).or_insert((0, k.kind)).0 += k.nanos;
        let e = by_op
            .entry(format!("{} {}", k.kind, k.op))
            .or_insert((0, 0));
        e.0 += k.nanos;
        e.1 += 1;
    }
    let pct = |n: u64| 100.0 * n as f64 / total.max(1) as f64;
    let per_run_ms = |n: u64| n as f64 / runs.max(1) as f64 / 1e6;
    let mut s = format!(
        "\nprofile ({}, {} threads): {} kernels, {:.3} ms per run in kernels (mean of {runs} \
         profiled runs; the unprofiled median run is {:.3} ms)\n",
        p.backend,
        p.threads,
        kernels.len(),
        per_run_ms(total),
        p.median_ms
    );
    let (block, in_arena, produced) = p.arena;
    if produced > 0 {
        s += &format!(
            "arena: a {:.2} MiB block; {:.2} of the {:.2} MiB of values produced per run \
             ({:.0}%, outputs included) written in place\n",
            mib(block),
            mib(in_arena),
            mib(produced),
            100.0 * in_arena as f64 / produced as f64
        );
    }
    // The interpreter's f64 ops are the slow path nothing should stay on.
    let interp: u64 = kernels
        .iter()
        .filter(|k| k.kind == "interp")
        .map(|k| k.nanos)
        .sum();
    let mut interp_ops: Vec<&str> = kernels
        .iter()
        .filter(|k| k.kind == "interp")
        .map(|k| k.op.as_str())
        .collect();
    interp_ops.sort_unstable();
    interp_ops.dedup();
    s += &format!(
        "interpreter ops: {:.1}% of kernel time{}\n",
        pct(interp),
        if interp_ops.is_empty() {
            String::new()
        } else {
            format!(" ({})", interp_ops.join(", "))
        }
    );
    let mut ops: Vec<_> = by_op.into_iter().collect();
    ops.sort_by(|a, b| b.1 .0.cmp(&a.1 .0).then(a.0.cmp(&b.0)));
    s += &format!(
        "{:<36} {:>7} {:>10} {:>7}\n",
        "kind op", "count", "ms/run", "%"
    );
    for (op, (n, count)) in &ops {
        s += &format!(
            "{:<36} {:>7} {:>10.3} {:>6.1}%\n",
            op,
            count,
            per_run_ms(*n),
            pct(*n)
        );
    }
    let mut labels: Vec<_> = by_label.into_iter().collect();
    labels.sort_by(|a, b| b.1 .0.cmp(&a.1 .0).then(a.0.cmp(b.0)));
    const TOP_KERNELS: usize = 30;
    s += &format!(
        "\ntop {} of {} kernels\n{:<60} {:>12} {:>10} {:>7}\n",
        TOP_KERNELS.min(labels.len()),
        labels.len(),
        "kernel",
        "kind",
        "ms/run",
        "%"
    );
    for (label, (n, kind)) in labels.iter().take(TOP_KERNELS) {
        let shown: String = if label.chars().count() > 60 {
            label.chars().take(57).chain("...".chars()).collect()
        } else {
            label.to_string()
        };
        s += &format!(
            "{:<60} {:>12} {:>10.3} {:>6.1}%\n",
            shown,
            kind,
            per_run_ms(*n),
            pct(*n)
        );
    }
    s
}
