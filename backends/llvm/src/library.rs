//! Building the shared library: serialize the model, partition it once (the plan travels
//! in the library, so loading partitions nothing), lower the loop kernels to one LLVM module (plus the kernel table, the model
//! descriptor and `kiln_create`), run `default<O2>`, emit the object, put the model data
//! in .rodata with an assembler `.incbin`, and link everything with `kiln-aot-rt`.

use crate::{codegen, header, BuildError};

/// The LLVM pass pipeline run on the module.
const OPT_PIPELINE: &str = "default<O2>";
use inkwell::context::Context;
use inkwell::module::Linkage;
use inkwell::passes::PassBuilderOptions;
use inkwell::targets::{
    CodeModel, FileType, InitializationConfig, RelocMode, Target, TargetMachine,
};
use inkwell::values::BasicValueEnum;
use inkwell::OptimizationLevel;
use kiln_aot_rt::format;
use kiln_ir::Graph;
use kiln_plan::{partition, Kernel};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// Where the weights go.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WeightsMode {
    /// In the library's .rodata.
    #[default]
    Embed,
    /// In a side file next to the library (`<lib stem>.weights`), memory-mapped by
    /// `kiln_create`.
    File,
}

/// How to build.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    /// LLVM CPU name (`native`, `x86-64-v3`, `znver3`, ...).
    pub target_cpu: String,
    /// Embedded or side-file weights.
    pub weights: WeightsMode,
    /// Also write the C header here.
    pub header: Option<PathBuf>,
    /// The runtime static library; found with [`find_runtime`] when `None`.
    pub runtime: Option<PathBuf>,
    /// Keep the LLVM IR (after the O2 pipeline) next to the library as `<lib>.ll`.
    pub emit_ir: bool,
    /// The approximation report the graph was made under, recorded in the library
    /// (`kiln_approx_report`); `None` for an exact model.
    pub approx_report: Option<String>,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            target_cpu: "native".into(),
            weights: WeightsMode::Embed,
            header: None,
            runtime: None,
            emit_ir: false,
            approx_report: None,
        }
    }
}

/// What a build produced.
#[derive(Clone, Debug)]
pub struct BuildReport {
    /// The shared library.
    pub library: PathBuf,
    /// The weights side file, in [`WeightsMode::File`].
    pub weights_file: Option<PathBuf>,
    /// Plan kernels, and how many of them are compiled loop kernels.
    pub kernels: usize,
    /// Loop kernels compiled to native code.
    pub loop_kernels: usize,
    /// The CPU and features compiled for.
    pub cpu: String,
    /// The feature string.
    pub features: String,
    /// Seconds spent in code generation + O2 + object emission, and in linking.
    pub codegen_s: f64,
    /// Seconds spent linking (assembler included).
    pub link_s: f64,
}

/// x86-64 CPU names LLVM 19 accepts for 64-bit code (`llc -mcpu=help`, 32-bit-only CPUs
/// left out). LLVM aborts the process on a CPU it cannot compile 64-bit code for, so the
/// name is checked here first.
const X86_64_CPUS: &[&str] = &[
    "alderlake",
    "amdfam10",
    "arrowlake",
    "arrowlake-s",
    "athlon-fx",
    "athlon64",
    "athlon64-sse3",
    "atom",
    "barcelona",
    "bdver1",
    "bdver2",
    "bdver3",
    "bdver4",
    "bonnell",
    "broadwell",
    "btver1",
    "btver2",
    "cannonlake",
    "cascadelake",
    "clearwaterforest",
    "cooperlake",
    "core-avx-i",
    "core-avx2",
    "core2",
    "corei7",
    "corei7-avx",
    "emeraldrapids",
    "generic",
    "goldmont",
    "goldmont-plus",
    "gracemont",
    "grandridge",
    "graniterapids",
    "graniterapids-d",
    "haswell",
    "icelake-client",
    "icelake-server",
    "ivybridge",
    "k8",
    "k8-sse3",
    "knl",
    "knm",
    "lunarlake",
    "meteorlake",
    "nehalem",
    "nocona",
    "opteron",
    "opteron-sse3",
    "pantherlake",
    "penryn",
    "raptorlake",
    "rocketlake",
    "sandybridge",
    "sapphirerapids",
    "sierraforest",
    "silvermont",
    "skx",
    "skylake",
    "skylake-avx512",
    "slm",
    "tigerlake",
    "tremont",
    "westmere",
    "x86-64",
    "x86-64-v2",
    "x86-64-v3",
    "x86-64-v4",
    "znver1",
    "znver2",
    "znver3",
    "znver4",
    "znver5",
];

/// The runtime static library's file name.
const RUNTIME_NAME: &str = "libkiln_aot_rt.a";

/// Finds `libkiln_aot_rt.a`: `$KILN_AOT_RT`, else next to the running executable (or its
/// parent, for test binaries in `deps/`), else in the cargo profile directory this crate
/// was built in. Cargo builds it with every build of this crate (a dependency with a
/// `staticlib` crate type).
pub fn find_runtime() -> Result<PathBuf, BuildError> {
    if let Some(p) = std::env::var_os("KILN_AOT_RT") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(BuildError::Runtime(format!(
                "KILN_AOT_RT={} does not exist",
                p.display()
            )))
        };
    }
    let mut dirs = vec![];
    if let Ok(exe) = std::env::current_exe() {
        for d in exe.ancestors().skip(1).take(2) {
            dirs.push(d.to_path_buf());
        }
    }
    // OUT_DIR is target/<profile>/build/kiln-llvm-<hash>/out.
    if let Some(d) = Path::new(env!("OUT_DIR")).ancestors().nth(3) {
        dirs.push(d.to_path_buf());
    }
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    for d in &dirs {
        let exact = d.join(RUNTIME_NAME);
        let mut cands = vec![exact];
        if let Ok(rd) = std::fs::read_dir(d.join("deps")) {
            for ent in rd.flatten() {
                let name = ent.file_name().to_string_lossy().to_string();
                if name.starts_with("libkiln_aot_rt-") && name.ends_with(".a") {
                    cands.push(ent.path());
                }
            }
        }
        for c in cands {
            if let Ok(t) = std::fs::metadata(&c).and_then(|m| m.modified()) {
                if best.as_ref().is_none_or(|(bt, _)| t > *bt) {
                    best = Some((t, c));
                }
            }
        }
        if best.is_some() {
            break;
        }
    }
    best.map(|(_, p)| p).ok_or_else(|| {
        BuildError::Runtime(format!(
            "{RUNTIME_NAME} not found (looked in {}); build it with \
             `cargo build -p kiln-aot-rt` (same profile) or set KILN_AOT_RT",
            dirs.iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })
}

/// The symbols the library exports (everything else is hidden by a version script).
pub const EXPORTS: &[&str] = &[
    "kiln_create",
    "kiln_destroy",
    "kiln_last_error",
    "kiln_num_inputs",
    "kiln_num_outputs",
    "kiln_input_name",
    "kiln_output_name",
    "kiln_input_dtype",
    "kiln_output_dtype",
    "kiln_input_rank",
    "kiln_output_rank",
    "kiln_input_dim",
    "kiln_output_dim",
    "kiln_set_threads",
    "kiln_run",
    "kiln_result_rank",
    "kiln_result_dims",
    "kiln_result_data",
    "kiln_result_bytes",
    "kiln_set_profiling",
    "kiln_profile_count",
    "kiln_profile_kernel",
    "kiln_profile_label",
    "kiln_approx_report",
];

fn io_err(what: &str) -> impl Fn(std::io::Error) -> BuildError + '_ {
    move |e| BuildError::Io(format!("{what}: {e}"))
}

fn run_tool(cmd: &mut Command, what: &str) -> Result<(), BuildError> {
    let out = cmd
        .output()
        .map_err(|e| BuildError::Io(format!("running {what} ({cmd:?}): {e}")))?;
    if !out.status.success() {
        return Err(BuildError::Io(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}

/// Builds `out` (a `.so`) from `g` (typically after the default pass pipeline).
pub fn build_library(
    g: &Graph,
    out: &Path,
    opts: &BuildOptions,
) -> Result<BuildReport, BuildError> {
    let runtime = match &opts.runtime {
        Some(p) => p.clone(),
        None => find_runtime()?,
    };
    let t0 = Instant::now();
    let weights_id = {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        t ^ ((std::process::id() as u64) << 32) ^ 0x6b69_6c6e
    };
    let (mut meta, blob) = format::split(g, weights_id);
    meta.approx_report = opts.approx_report.clone().unwrap_or_default();
    let blob = bytes::Bytes::from(blob);
    // Partition the graph as `kiln_create` will see it (after the text round trip) and
    // record the plan in the library: the kernel table below is compiled from it.
    let graph = format::restore(&meta, &blob).map_err(BuildError::Model)?;
    let plan = partition(&graph).map_err(|e| BuildError::Model(format!("partitioning: {e}")))?;
    meta.set_plan(&plan);

    Target::initialize_native(&InitializationConfig::default()).map_err(BuildError::Llvm)?;
    let triple = TargetMachine::get_default_triple();
    let target = Target::from_triple(&triple).map_err(|e| BuildError::Llvm(e.to_string()))?;
    let (cpu, features) = if opts.target_cpu == "native" {
        (
            TargetMachine::get_host_cpu_name().to_string(),
            TargetMachine::get_host_cpu_features().to_string(),
        )
    } else {
        let x86_64 = triple.as_str().to_string_lossy().starts_with("x86_64");
        if x86_64 && !X86_64_CPUS.contains(&opts.target_cpu.as_str()) {
            return Err(BuildError::Llvm(format!(
                "unknown target CPU `{}`; use native or one of: {}",
                opts.target_cpu,
                X86_64_CPUS.join(", ")
            )));
        }
        (opts.target_cpu.clone(), String::new())
    };
    let tm = target
        .create_target_machine(
            &triple,
            &cpu,
            &features,
            OptimizationLevel::Aggressive,
            RelocMode::PIC,
            CodeModel::Default,
        )
        .ok_or_else(|| BuildError::Llvm(format!("no target machine for CPU `{cpu}`")))?;
    let cx = Context::create();
    let module = cx.create_module("kiln_aot");
    module.set_triple(&triple);
    module.set_data_layout(&tm.get_target_data().get_data_layout());
    let ptr = cx.ptr_type(inkwell::AddressSpace::default());
    let i64t = cx.i64_type();
    let cpu_attr = cx.create_string_attribute("target-cpu", &cpu);
    let feat_attr = cx.create_string_attribute("target-features", &features);
    let mut fn_ptrs = vec![];
    let mut hashes = vec![];
    let mut loop_kernels = 0;
    for (i, k) in plan.kernels.iter().enumerate() {
        match k {
            Kernel::Loop(l) => {
                let f =
                    codegen::define(&cx, &module, l, &format!("kiln_loop_{i}")).map_err(|msg| {
                        BuildError::Codegen {
                            kernel: plan.label(i),
                            msg,
                        }
                    })?;
                f.add_attribute(inkwell::attributes::AttributeLoc::Function, cpu_attr);
                if !features.is_empty() {
                    f.add_attribute(inkwell::attributes::AttributeLoc::Function, feat_attr);
                }
                fn_ptrs.push(f.as_global_value().as_pointer_value());
                hashes.push(i64t.const_int(format::kernel_fingerprint(l), false));
                loop_kernels += 1;
            }
            _ => {
                fn_ptrs.push(ptr.const_null());
                hashes.push(i64t.const_zero());
            }
        }
    }
    let count = plan.kernels.len() as u32;
    let table = module.add_global(ptr.array_type(count), None, "kiln_aot_kernels");
    table.set_linkage(Linkage::Private);
    table.set_constant(true);
    table.set_initializer(&ptr.const_array(&fn_ptrs));
    let htab = module.add_global(i64t.array_type(count), None, "kiln_aot_hashes");
    htab.set_linkage(Linkage::Private);
    htab.set_constant(true);
    htab.set_initializer(&i64t.const_array(&hashes));
    // The data symbols come from the assembler object (hidden, resolved at link time).
    let extern_sym = |name: &str| {
        let gv = module.add_global(cx.i8_type(), None, name);
        gv.set_linkage(Linkage::External);
        gv.set_visibility(inkwell::GlobalVisibility::Hidden);
        gv.as_pointer_value()
    };
    let meta_bytes = meta.encode();
    let meta_ptr = extern_sym("kiln_aot_meta");
    let (w_ptr, w_len) = match opts.weights {
        WeightsMode::Embed => (extern_sym("kiln_aot_weights"), blob.len() as u64),
        WeightsMode::File => (ptr.const_null(), 0),
    };
    let desc_ty = cx.struct_type(
        &[
            ptr.into(),
            i64t.into(),
            ptr.into(),
            i64t.into(),
            ptr.into(),
            ptr.into(),
            i64t.into(),
        ],
        false,
    );
    let fields: [BasicValueEnum; 7] = [
        meta_ptr.into(),
        i64t.const_int(meta_bytes.len() as u64, false).into(),
        w_ptr.into(),
        i64t.const_int(w_len, false).into(),
        table.as_pointer_value().into(),
        htab.as_pointer_value().into(),
        i64t.const_int(count as u64, false).into(),
    ];
    let desc = module.add_global(desc_ty, None, "kiln_aot_desc");
    desc.set_linkage(Linkage::Private);
    desc.set_constant(true);
    desc.set_initializer(&desc_ty.const_named_struct(&fields));
    // int kiln_create(const char *weights_path, kiln_ctx **out)
    let i32t = cx.i32_type();
    let rt_create = module.add_function(
        "kiln_rt_create",
        i32t.fn_type(&[ptr.into(), ptr.into(), ptr.into()], false),
        Some(Linkage::External),
    );
    let create = module.add_function(
        "kiln_create",
        i32t.fn_type(&[ptr.into(), ptr.into()], false),
        Some(Linkage::External),
    );
    {
        let b = cx.create_builder();
        b.position_at_end(cx.append_basic_block(create, "entry"));
        let p0 = create.get_nth_param(0).expect("declared with 2 params");
        let p1 = create.get_nth_param(1).expect("declared with 2 params");
        let r = b
            .build_call(
                rt_create,
                &[desc.as_pointer_value().into(), p0.into(), p1.into()],
                "",
            )
            .map_err(|e| BuildError::Llvm(e.to_string()))?
            .try_as_basic_value()
            .basic()
            .ok_or_else(|| BuildError::Llvm("kiln_rt_create returns nothing".into()))?;
        b.build_return(Some(&r))
            .map_err(|e| BuildError::Llvm(e.to_string()))?;
    }
    module
        .verify()
        .map_err(|e| BuildError::Llvm(format!("module verification: {e}")))?;
    // O2, not O3: the kernels are vectorised by hand, and O3's non-trivial loop unswitching
    // copied each kernel's row loops once per loop-invariant guard of the run loop (the
    // unrolled RWKV export at S = 16: 2.7x the IR and the build time, no faster kernels).
    module
        .run_passes(OPT_PIPELINE, &tm, PassBuilderOptions::create())
        .map_err(|e| BuildError::Llvm(format!("{OPT_PIPELINE}: {e}")))?;

    let tmp = tempfile::tempdir().map_err(io_err("temporary directory"))?;
    let obj = tmp.path().join("kernels.o");
    tm.write_to_file(&module, FileType::Object, &obj)
        .map_err(|e| BuildError::Llvm(format!("emitting the object: {e}")))?;
    if opts.emit_ir {
        let ll = out.with_extension("ll");
        module
            .print_to_file(&ll)
            .map_err(|e| BuildError::Io(format!("writing {}: {e}", ll.display())))?;
    }
    let codegen_s = t0.elapsed().as_secs_f64();

    let t1 = Instant::now();
    let meta_path = tmp.path().join("meta.bin");
    std::fs::write(&meta_path, &meta_bytes).map_err(io_err("writing the model meta"))?;
    let mut asm = String::new();
    let mut section = |sym: &str, file: &Path| {
        asm += &format!(
            "  .section .rodata.{sym},\"a\",@progbits\n  .balign {}\n  .globl {sym}\n  \
             .hidden {sym}\n{sym}:\n  .incbin \"{}\"\n",
            format::WEIGHTS_ALIGN,
            file.display()
        );
    };
    section("kiln_aot_meta", &meta_path);
    let weights_file = match opts.weights {
        WeightsMode::Embed => {
            let wp = tmp.path().join("weights.bin");
            std::fs::write(&wp, &blob).map_err(io_err("writing the weights"))?;
            section("kiln_aot_weights", &wp);
            None
        }
        WeightsMode::File => {
            let wp = out.with_extension("weights");
            std::fs::write(&wp, &blob)
                .map_err(|e| BuildError::Io(format!("writing {}: {e}", wp.display())))?;
            Some(wp)
        }
    };
    asm += "  .section .note.GNU-stack,\"\",@progbits\n";
    let asm_path = tmp.path().join("data.S");
    std::fs::write(&asm_path, asm).map_err(io_err("writing the data assembly"))?;
    let data_obj = tmp.path().join("data.o");
    run_tool(
        Command::new("cc")
            .arg("-c")
            .arg(&asm_path)
            .arg("-o")
            .arg(&data_obj),
        "assembling the model data",
    )?;
    let map = tmp.path().join("exports.map");
    let syms: String = EXPORTS.iter().map(|s| format!("{s}; ")).collect();
    std::fs::write(&map, format!("{{ global: {syms}local: *; }};\n"))
        .map_err(io_err("writing the version script"))?;
    // `-static-libgcc` pulls the unwinder (Rust's std refers to it) in statically, so
    // the library needs only libc, libm and libpthread at run time.
    run_tool(
        Command::new("cc")
            .arg("-shared")
            .arg("-o")
            .arg(out)
            .arg(&obj)
            .arg(&data_obj)
            .arg(&runtime)
            .arg(format!("-Wl,--version-script={}", map.display()))
            .args([
                "-Wl,--gc-sections",
                "-Wl,-Bsymbolic",
                "-Wl,-z,noexecstack",
                "-Wl,--as-needed",
                "-static-libgcc",
                "-lpthread",
                "-lm",
                "-lc",
            ]),
        "linking the library",
    )?;
    let link_s = t1.elapsed().as_secs_f64();
    if let Some(h) = &opts.header {
        let guard = h
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_else(|| "model".into());
        std::fs::write(h, header::generate(&graph, &guard, opts.weights))
            .map_err(|e| BuildError::Io(format!("writing {}: {e}", h.display())))?;
    }
    Ok(BuildReport {
        library: out.to_path_buf(),
        weights_file,
        kernels: plan.kernels.len(),
        loop_kernels,
        cpu,
        features,
        codegen_s,
        link_s,
    })
}
