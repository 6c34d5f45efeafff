//! kiln-aot-rt: the run-time half of a kiln AOT library, linked into it as a static
//! library. It implements the library's C ABI (`kiln_*`, documented in the generated
//! header): a context parses the embedded graph and the plan serialised at build time (it
//! partitions nothing), checks the kernel table the LLVM object carries against the plan, binds the weights (embedded or a side file,
//! memory-mapped) and runs the plan with the compiled loop kernels. No panic crosses the
//! C boundary: every entry point catches unwinding and reports it as an error code.

pub mod format;
pub mod runner;

use format::Meta;
use kiln_ir::{DType, Dim, Tensor, TensorData};
use kiln_plan::{Kernel, Plan};
use kiln_runtime::executor::CpuPlan;
use runner::{AotRunner, RowFn};
use std::borrow::Cow;
use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Status codes of the C ABI (mirrored in the generated header).
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Success.
    Ok = 0,
    /// A null pointer, an index out of range, a bad shape or dtype.
    InvalidArgument = 1,
    /// The weights side file could not be opened or read.
    Io = 2,
    /// The embedded model is damaged or does not match the compiled kernels.
    Model = 3,
    /// Running the model failed.
    Run = 4,
    /// A caller-provided output buffer is too small (results stay in the context).
    OutputSize = 5,
    /// An internal error (a caught panic).
    Internal = 6,
}

/// What the generated object hands to [`kiln_rt_create`]: everything the build embedded.
#[repr(C)]
pub struct ModelDesc {
    /// The encoded [`Meta`].
    pub meta: *const u8,
    /// Its length.
    pub meta_len: u64,
    /// The embedded weights blob, or null when the weights live in a side file.
    pub weights: *const u8,
    /// Its length (0 when external).
    pub weights_len: u64,
    /// One row function per plan kernel (null for non-loop kernels).
    pub kernels: *const Option<RowFn>,
    /// The fingerprint of each loop kernel the functions were compiled from (0 otherwise).
    pub hashes: *const u64,
    /// Number of plan kernels.
    pub kernel_count: u64,
}

/// One graph input or output as the C ABI describes it.
struct IoInfo {
    name: CString,
    dtype: DType,
    /// -1 for a dim bound at run time.
    dims: Vec<i64>,
}

/// A model instance: the plan, its compiled kernels and the last run's outputs.
pub struct Context {
    plan: CpuPlan,
    runner: AotRunner,
    inputs: Vec<IoInfo>,
    outputs: Vec<IoInfo>,
    /// The last run's outputs.
    last: Vec<Tensor>,
    /// Their little-endian encodings where that is not their own memory (big-endian targets
    /// only; on little-endian ones the outputs are handed out and copied without one).
    last_encoded: Vec<Vec<u8>>,
    /// Whether runs time every kernel.
    profile: bool,
    /// Per-kernel (kind, nanoseconds, label) of the last profiled run; kind 0 loop,
    /// 1 contraction, 2 native routine, 3 interpreter op.
    times: Vec<(i32, u64, CString)>,
    /// The approximation report the library was built under (empty when exact).
    approx_report: CString,
}

impl Context {
    /// The little-endian bytes of the last run's output `i`.
    fn result_bytes(&self, i: usize) -> Option<&[u8]> {
        let t = self.last.get(i)?;
        match t.data().le_bytes() {
            Cow::Borrowed(b) => Some(b),
            Cow::Owned(_) => self.last_encoded.get(i).map(Vec::as_slice),
        }
    }
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(msg: &str) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// Runs `f` with panics caught; an `Err` sets the thread's error message.
fn guard(f: impl FnOnce() -> Result<(), (Status, String)>) -> i32 {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => Status::Ok as i32,
        Ok(Err((s, msg))) => {
            set_error(&msg);
            s as i32
        }
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_error(&format!("internal error: {msg}"));
            Status::Internal as i32
        }
    }
}

fn io_info(plan: &Plan, ids: &[kiln_ir::ValueId]) -> Vec<IoInfo> {
    ids.iter()
        .map(|&id| {
            let v = plan.graph.value(id);
            IoInfo {
                name: CString::new(v.name.replace('\0', " ")).unwrap_or_default(),
                dtype: v.ty.dtype,
                dims: v
                    .ty
                    .shape
                    .dims()
                    .map(|d| {
                        d.iter()
                            .map(|d| match d {
                                Dim::Fixed(n) => i64::try_from(*n).unwrap_or(-1),
                                _ => -1,
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
            }
        })
        .collect()
}

/// Builds a context from the embedded description (`weights_path` for side-file weights).
///
/// # Safety
/// `desc` must point to a valid [`ModelDesc`] whose pointers cover their lengths.
unsafe fn create(
    desc: &ModelDesc,
    weights_path: Option<&str>,
) -> Result<Context, (Status, String)> {
    let model = |m: String| (Status::Model, m);
    // SAFETY: per this function's contract.
    let meta_bytes = unsafe { std::slice::from_raw_parts(desc.meta, desc.meta_len as usize) };
    let meta = Meta::decode(meta_bytes).map_err(model)?;
    let plan = match (weights_path, desc.weights.is_null()) {
        (Some(p), _) => {
            let f = std::fs::File::open(p)
                .map_err(|e| (Status::Io, format!("opening weights `{p}`: {e}")))?;
            // SAFETY: the file is mapped read-only and the weights are used in place for
            // the context's life: as with every mmap-based loader, the side file must not be
            // truncated or modified while a context made from it exists.
            let map = unsafe { memmap2::Mmap::map(&f) }
                .map_err(|e| (Status::Io, format!("mapping weights `{p}`: {e}")))?;
            format::restore_plan(&meta, &bytes::Bytes::from_owner(map)).map_err(model)?
        }
        (None, false) => {
            // SAFETY: per this function's contract, `desc.weights` is the library's own
            // `.rodata`, which stays mapped while the library is loaded, and so while any
            // context runs its code: the weights are used in place.
            let blob: &'static [u8] =
                unsafe { std::slice::from_raw_parts(desc.weights, desc.weights_len as usize) };
            format::restore_plan(&meta, &bytes::Bytes::from_static(blob)).map_err(model)?
        }
        (None, true) => {
            return Err((
                Status::InvalidArgument,
                "this library keeps its weights in a side file: pass its path to kiln_create"
                    .into(),
            ))
        }
    };
    let count = desc.kernel_count as usize;
    if plan.kernels.len() != count {
        return Err(model(format!(
            "the plan has {} kernels but the library was compiled for {count}",
            plan.kernels.len()
        )));
    }
    // SAFETY: per this function's contract, both tables hold `count` entries.
    let fns = unsafe { std::slice::from_raw_parts(desc.kernels, count) }.to_vec();
    let hashes = unsafe { std::slice::from_raw_parts(desc.hashes, count) };
    for (i, k) in plan.kernels.iter().enumerate() {
        let ok = match k {
            Kernel::Loop(l) => fns[i].is_some() && hashes[i] == format::kernel_fingerprint(l),
            _ => fns[i].is_none(),
        };
        if !ok {
            return Err(model(format!(
                "kernel #{i} ({}) does not match the compiled kernel table",
                plan.label(i)
            )));
        }
    }
    let inputs = io_info(&plan, &plan.graph.inputs);
    let outputs = io_info(&plan, &plan.graph.outputs);
    let plan = CpuPlan::new(plan);
    let runner = AotRunner::new(fns, 0)
        .map_err(|e| (Status::Internal, format!("starting the thread pool: {e}")))?;
    Ok(Context {
        runner,
        plan,
        inputs,
        outputs,
        last: vec![],
        last_encoded: vec![],
        profile: false,
        times: vec![],
        // A NUL inside the report (it is kiln's own text) would only cut it short.
        approx_report: CString::new(meta.approx_report.replace('\0', " ")).unwrap_or_default(),
    })
}

/// Creates a context (called by the library's generated `kiln_create`).
///
/// # Safety
/// `desc` must be the library's own descriptor; `weights_path` null or a C string; `out`
/// a valid pointer.
#[no_mangle]
pub unsafe extern "C" fn kiln_rt_create(
    desc: *const ModelDesc,
    weights_path: *const c_char,
    out: *mut *mut Context,
) -> i32 {
    guard(|| {
        if desc.is_null() || out.is_null() {
            return Err((Status::InvalidArgument, "kiln_create: null pointer".into()));
        }
        // SAFETY: non-null, per the contract.
        unsafe { *out = std::ptr::null_mut() };
        let path = if weights_path.is_null() {
            None
        } else {
            // SAFETY: a C string per the contract.
            Some(
                unsafe { CStr::from_ptr(weights_path) }
                    .to_str()
                    .map_err(|_| (Status::InvalidArgument, "weights path is not UTF-8".into()))?,
            )
        };
        // SAFETY: per the contract.
        let ctx = unsafe { create(&*desc, path)? };
        // SAFETY: non-null, per the contract.
        unsafe { *out = Box::into_raw(Box::new(ctx)) };
        Ok(())
    })
}

/// Destroys a context (null is ignored).
///
/// # Safety
/// `ctx` must come from `kiln_create` and not be used afterwards.
#[no_mangle]
pub unsafe extern "C" fn kiln_destroy(ctx: *mut Context) {
    if !ctx.is_null() {
        let _ = catch_unwind(AssertUnwindSafe(|| {
            // SAFETY: per the contract.
            drop(unsafe { Box::from_raw(ctx) })
        }));
    }
}

/// The message of the last failed call on this thread ("" if none); valid until the
/// next failing call on the same thread.
#[no_mangle]
pub extern "C" fn kiln_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// # Safety
/// `ctx` must be a live context or null.
unsafe fn ctx_ref<'a>(ctx: *const Context) -> Option<&'a Context> {
    // SAFETY: per the contract.
    unsafe { ctx.as_ref() }
}

/// Number of graph inputs (0 for a null context).
///
/// # Safety
/// `ctx` must be a live context or null.
#[no_mangle]
pub unsafe extern "C" fn kiln_num_inputs(ctx: *const Context) -> usize {
    unsafe { ctx_ref(ctx) }.map_or(0, |c| c.inputs.len())
}

/// Number of graph outputs (0 for a null context).
///
/// # Safety
/// `ctx` must be a live context or null.
#[no_mangle]
pub unsafe extern "C" fn kiln_num_outputs(ctx: *const Context) -> usize {
    unsafe { ctx_ref(ctx) }.map_or(0, |c| c.outputs.len())
}

/// # Safety
/// `ctx` must be a live context or null.
unsafe fn io<'a>(ctx: *const Context, output: bool, i: usize) -> Option<&'a IoInfo> {
    let c = unsafe { ctx_ref(ctx) }?;
    if output {
        c.outputs.get(i)
    } else {
        c.inputs.get(i)
    }
}

/// Name of input `i` (null when out of range); owned by the context.
///
/// # Safety
/// `ctx` must be a live context or null.
#[no_mangle]
pub unsafe extern "C" fn kiln_input_name(ctx: *const Context, i: usize) -> *const c_char {
    unsafe { io(ctx, false, i) }.map_or(std::ptr::null(), |x| x.name.as_ptr())
}

/// Name of output `i` (null when out of range); owned by the context.
///
/// # Safety
/// `ctx` must be a live context or null.
#[no_mangle]
pub unsafe extern "C" fn kiln_output_name(ctx: *const Context, i: usize) -> *const c_char {
    unsafe { io(ctx, true, i) }.map_or(std::ptr::null(), |x| x.name.as_ptr())
}

/// ONNX dtype code of input `i` (-1 when out of range).
///
/// # Safety
/// `ctx` must be a live context or null.
#[no_mangle]
pub unsafe extern "C" fn kiln_input_dtype(ctx: *const Context, i: usize) -> i32 {
    unsafe { io(ctx, false, i) }.map_or(-1, |x| x.dtype.onnx_code())
}

/// ONNX dtype code of output `i` (-1 when out of range).
///
/// # Safety
/// `ctx` must be a live context or null.
#[no_mangle]
pub unsafe extern "C" fn kiln_output_dtype(ctx: *const Context, i: usize) -> i32 {
    unsafe { io(ctx, true, i) }.map_or(-1, |x| x.dtype.onnx_code())
}

/// Declared rank of input `i` (-1 when out of range).
///
/// # Safety
/// `ctx` must be a live context or null.
#[no_mangle]
pub unsafe extern "C" fn kiln_input_rank(ctx: *const Context, i: usize) -> i64 {
    unsafe { io(ctx, false, i) }.map_or(-1, |x| x.dims.len() as i64)
}

/// Declared rank of output `i` (-1 when out of range).
///
/// # Safety
/// `ctx` must be a live context or null.
#[no_mangle]
pub unsafe extern "C" fn kiln_output_rank(ctx: *const Context, i: usize) -> i64 {
    unsafe { io(ctx, true, i) }.map_or(-1, |x| x.dims.len() as i64)
}

/// Declared dim `axis` of input `i`: its size, or -1 when bound at run time or out of range.
///
/// # Safety
/// `ctx` must be a live context or null.
#[no_mangle]
pub unsafe extern "C" fn kiln_input_dim(ctx: *const Context, i: usize, axis: usize) -> i64 {
    unsafe { io(ctx, false, i) }
        .and_then(|x| x.dims.get(axis).copied())
        .unwrap_or(-1)
}

/// Declared dim `axis` of output `i`: its size, or -1 when bound at run time or out of range.
///
/// # Safety
/// `ctx` must be a live context or null.
#[no_mangle]
pub unsafe extern "C" fn kiln_output_dim(ctx: *const Context, i: usize, axis: usize) -> i64 {
    unsafe { io(ctx, true, i) }
        .and_then(|x| x.dims.get(axis).copied())
        .unwrap_or(-1)
}

/// Sets how many threads kernels use (0 = one per physical core). Not to be called while
/// the same context is running.
///
/// # Safety
/// `ctx` must be a live context or null.
#[no_mangle]
pub unsafe extern "C" fn kiln_set_threads(ctx: *mut Context, threads: usize) -> i32 {
    guard(|| {
        // SAFETY: per the contract.
        let c = unsafe { ctx.as_mut() }.ok_or((
            Status::InvalidArgument,
            "kiln_set_threads: null context".into(),
        ))?;
        c.runner
            .set_threads(threads)
            .map_err(|e| (Status::Internal, format!("kiln_set_threads: {e}")))
    })
}

/// Runs the model. `inputs[i]` points to input `i`'s elements (row-major, its dtype);
/// `input_dims[i]` to its `rank` dims, or null when the declared shape is fully fixed
/// (`input_dims` itself may be null when every input is fixed). `outputs` may be null
/// (results stay in the context: see `kiln_output_data`); otherwise `outputs[i]` receives
/// output `i` and `output_bytes[i]` is its capacity.
///
/// # Safety
/// Pointers must be valid for the sizes the shapes imply.
#[no_mangle]
pub unsafe extern "C" fn kiln_run(
    ctx: *mut Context,
    inputs: *const *const c_void,
    input_dims: *const *const i64,
    outputs: *const *mut c_void,
    output_bytes: *const usize,
) -> i32 {
    guard(|| {
        let bad = |m: String| (Status::InvalidArgument, m);
        // SAFETY: per the contract.
        let c = unsafe { ctx.as_mut() }.ok_or_else(|| bad("kiln_run: null context".into()))?;
        c.last.clear();
        c.last_encoded.clear();
        if inputs.is_null() && !c.inputs.is_empty() {
            return Err(bad("kiln_run: null inputs".into()));
        }
        let mut tensors = vec![];
        for (i, info) in c.inputs.iter().enumerate() {
            // SAFETY: `inputs` holds one pointer per input.
            let p = unsafe { *inputs.add(i) };
            let dp = if input_dims.is_null() {
                std::ptr::null()
            } else {
                // SAFETY: `input_dims` holds one pointer per input.
                unsafe { *input_dims.add(i) }
            };
            let name = info.name.to_string_lossy();
            let shape: Vec<usize> = if dp.is_null() {
                info.dims
                    .iter()
                    .map(|&d| usize::try_from(d))
                    .collect::<Result<_, _>>()
                    .map_err(|_| {
                        bad(format!("input `{name}` has run-time dims: pass input_dims"))
                    })?
            } else {
                // SAFETY: `rank` dims per the contract.
                unsafe { std::slice::from_raw_parts(dp, info.dims.len()) }
                    .iter()
                    .map(|&d| usize::try_from(d))
                    .collect::<Result<_, _>>()
                    .map_err(|_| bad(format!("input `{name}` has a negative dim")))?
            };
            let n = shape
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .and_then(|n| n.checked_mul(info.dtype.size()))
                .ok_or_else(|| bad(format!("input `{name}`: shape {shape:?} overflows")))?;
            if p.is_null() && n > 0 {
                return Err(bad(format!("input `{name}` is null")));
            }
            let bytes: &[u8] = if n == 0 {
                &[]
            } else {
                // SAFETY: the caller provides `n` bytes for this shape and dtype.
                unsafe { std::slice::from_raw_parts(p as *const u8, n) }
            };
            let data = TensorData::from_le_bytes(info.dtype, bytes).map_err(bad)?;
            tensors.push(Tensor::new(shape, data).map_err(bad)?);
        }
        c.times.clear();
        let mut report = kiln_runtime::executor::RunReport::default();
        let outs = c
            .plan
            .run_with(tensors, &c.runner, c.profile.then_some(&mut report))
            .map_err(|e| (Status::Run, e.to_string()))?;
        c.times = report
            .kernels
            .iter()
            .map(|k| {
                let kind = match k.kind {
                    "loop" => 0,
                    "contraction" => 1,
                    "interp" => 3,
                    _ => 2,
                };
                let label = CString::new(k.label.replace('\0', " ")).unwrap_or_default();
                (kind, k.nanos, label)
            })
            .collect();
        c.last = outs;
        if cfg!(target_endian = "big") {
            c.last_encoded = c.last.iter().map(|t| t.data().to_le_bytes()).collect();
        }
        if outputs.is_null() {
            return Ok(());
        }
        if output_bytes.is_null() {
            return Err(bad("kiln_run: outputs given without output_bytes".into()));
        }
        for i in 0..c.last.len() {
            let b = c.result_bytes(i).unwrap_or_default();
            // SAFETY: one pointer and one capacity per output.
            let (p, cap) = unsafe { (*outputs.add(i), *output_bytes.add(i)) };
            if b.len() > cap || (p.is_null() && !b.is_empty()) {
                return Err((
                    Status::OutputSize,
                    format!(
                        "output `{}` needs {} bytes (shape {:?}); the buffer has {cap}",
                        c.outputs[i].name.to_string_lossy(),
                        b.len(),
                        c.last[i].shape()
                    ),
                ));
            }
            if !b.is_empty() {
                // SAFETY: `p` has room for `cap >= b.len()` bytes.
                unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), p as *mut u8, b.len()) };
            }
        }
        Ok(())
    })
}

/// Rank of output `i` from the last successful run (-1 when none or out of range).
///
/// # Safety
/// `ctx` must be a live context or null.
#[no_mangle]
pub unsafe extern "C" fn kiln_result_rank(ctx: *const Context, i: usize) -> i64 {
    unsafe { ctx_ref(ctx) }
        .and_then(|c| c.last.get(i))
        .map_or(-1, |t| t.shape().len() as i64)
}

/// Writes the last run's shape of output `i` into `dims` (room for its rank).
///
/// # Safety
/// `ctx` must be a live context or null; `dims` must have room for the rank.
#[no_mangle]
pub unsafe extern "C" fn kiln_result_dims(ctx: *const Context, i: usize, dims: *mut i64) -> i32 {
    guard(|| {
        let t = unsafe { ctx_ref(ctx) }
            .and_then(|c| c.last.get(i))
            .ok_or((Status::InvalidArgument, format!("no result #{i}")))?;
        if dims.is_null() {
            return Err((Status::InvalidArgument, "null dims".into()));
        }
        for (a, &d) in t.shape().iter().enumerate() {
            // SAFETY: room for the rank per the contract.
            unsafe { *dims.add(a) = d as i64 };
        }
        Ok(())
    })
}

/// The last run's data of output `i` (null when none); valid until the next run or destroy.
///
/// # Safety
/// `ctx` must be a live context or null.
#[no_mangle]
pub unsafe extern "C" fn kiln_result_data(ctx: *const Context, i: usize) -> *const c_void {
    unsafe { ctx_ref(ctx) }
        .and_then(|c| c.result_bytes(i))
        .map_or(std::ptr::null(), |b| b.as_ptr() as *const c_void)
}

/// Byte length of the last run's output `i` (0 when none).
///
/// # Safety
/// `ctx` must be a live context or null.
#[no_mangle]
pub unsafe extern "C" fn kiln_result_bytes(ctx: *const Context, i: usize) -> usize {
    unsafe { ctx_ref(ctx) }
        .and_then(|c| c.result_bytes(i))
        .map_or(0, |b| b.len())
}

/// Turns per-kernel timing of later runs on (nonzero) or off.
///
/// # Safety
/// `ctx` must be a live context or null.
#[no_mangle]
pub unsafe extern "C" fn kiln_set_profiling(ctx: *mut Context, on: i32) -> i32 {
    guard(|| {
        // SAFETY: per the contract.
        let c = unsafe { ctx.as_mut() }.ok_or((
            Status::InvalidArgument,
            "kiln_set_profiling: null context".into(),
        ))?;
        c.profile = on != 0;
        Ok(())
    })
}

/// Number of kernels timed in the last profiled run (0 when profiling is off).
///
/// # Safety
/// `ctx` must be a live context or null.
#[no_mangle]
pub unsafe extern "C" fn kiln_profile_count(ctx: *const Context) -> usize {
    unsafe { ctx_ref(ctx) }.map_or(0, |c| c.times.len())
}

/// Kernel `i` of the last profiled run: its kind (0 loop, 1 contraction, 2 native routine, 3 interpreter op) and
/// wall time in nanoseconds.
///
/// # Safety
/// `ctx` must be a live context or null; `kind` and `nanos` valid pointers.
#[no_mangle]
pub unsafe extern "C" fn kiln_profile_kernel(
    ctx: *const Context,
    i: usize,
    kind: *mut i32,
    nanos: *mut u64,
) -> i32 {
    guard(|| {
        let &(k, n, _) = unsafe { ctx_ref(ctx) }
            .and_then(|c| c.times.get(i))
            .ok_or((Status::InvalidArgument, format!("no profiled kernel #{i}")))?;
        if kind.is_null() || nanos.is_null() {
            return Err((Status::InvalidArgument, "null output pointer".into()));
        }
        // SAFETY: non-null per the check, valid per the contract.
        unsafe {
            *kind = k;
            *nanos = n;
        }
        Ok(())
    })
}

/// The label of kernel `i` of the last profiled run (the ONNX node name, or the values a
/// fused loop writes), or null when there is none. Valid until the next run.
///
/// # Safety
/// `ctx` must be a live context or null.
#[no_mangle]
pub unsafe extern "C" fn kiln_profile_label(ctx: *const Context, i: usize) -> *const c_char {
    unsafe { ctx_ref(ctx) }
        .and_then(|c| c.times.get(i))
        .map_or(std::ptr::null(), |(_, _, l)| l.as_ptr())
}

/// The approximation report the library was built under (`kiln build --approx`: sites,
/// rewrites, parameters, the error measured on the calibration and held-out sets), or ""
/// for an exact model; null for a null context. Owned by the context.
///
/// # Safety
/// `ctx` must be a live context or null.
#[no_mangle]
pub unsafe extern "C" fn kiln_approx_report(ctx: *const Context) -> *const c_char {
    unsafe { ctx_ref(ctx) }.map_or(std::ptr::null(), |c| c.approx_report.as_ptr())
}
