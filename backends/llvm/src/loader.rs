//! Loading an AOT library into a Rust process (for `kiln bench --backend aot` and tests):
//! `dlopen` through `libloading`, then the library's own C ABI.

use kiln_ir::{DType, Tensor, TensorData};
use std::ffi::{c_char, c_void, CStr, CString};
use std::path::Path;

/// Why loading or running failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// dlopen or a symbol lookup failed.
    #[error("loading {path}: {msg}")]
    Dl {
        /// The library.
        path: String,
        /// The loader's message.
        msg: String,
    },
    /// A C ABI call returned an error code.
    #[error("{call} failed with status {status}: {msg}")]
    Call {
        /// The function.
        call: &'static str,
        /// The status code.
        status: i32,
        /// `kiln_last_error()`.
        msg: String,
    },
    /// The inputs do not fit the model.
    #[error("{0}")]
    Input(String),
}

type CreateFn = unsafe extern "C" fn(*const c_char, *mut *mut c_void) -> i32;
type DestroyFn = unsafe extern "C" fn(*mut c_void);
type ErrFn = unsafe extern "C" fn() -> *const c_char;
type CountFn = unsafe extern "C" fn(*const c_void) -> usize;
type NameFn = unsafe extern "C" fn(*const c_void, usize) -> *const c_char;
type DtypeFn = unsafe extern "C" fn(*const c_void, usize) -> i32;
type RankFn = unsafe extern "C" fn(*const c_void, usize) -> i64;
type ThreadsFn = unsafe extern "C" fn(*mut c_void, usize) -> i32;
type RunFn = unsafe extern "C" fn(
    *mut c_void,
    *const *const c_void,
    *const *const i64,
    *const *mut c_void,
    *const usize,
) -> i32;
type DimsFn = unsafe extern "C" fn(*const c_void, usize, *mut i64) -> i32;
type DataFn = unsafe extern "C" fn(*const c_void, usize) -> *const c_void;
type BytesFn = unsafe extern "C" fn(*const c_void, usize) -> usize;
type ProfOnFn = unsafe extern "C" fn(*mut c_void, i32) -> i32;
type ProfKernelFn = unsafe extern "C" fn(*const c_void, usize, *mut i32, *mut u64) -> i32;
type ProfLabelFn = unsafe extern "C" fn(*const c_void, usize) -> *const c_char;
type ReportFn = unsafe extern "C" fn(*const c_void) -> *const c_char;

/// One kernel's time in a profiled run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelTime {
    /// The kernel's label, as the plan names it (`kiln_profile_label`).
    pub label: String,
    /// `loop`, `contraction` or `fallback`.
    pub kind: &'static str,
    /// Wall time in nanoseconds.
    pub nanos: u64,
}

/// An input or output of a loaded model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IoDesc {
    /// The graph value's name.
    pub name: String,
    /// Its dtype.
    pub dtype: DType,
    /// Declared rank.
    pub rank: usize,
}

/// A loaded AOT library with one context.
pub struct AotLibrary {
    ctx: *mut c_void,
    destroy: DestroyFn,
    last_error: ErrFn,
    set_threads: ThreadsFn,
    run: RunFn,
    result_rank: RankFn,
    result_dims: DimsFn,
    result_data: DataFn,
    result_bytes: BytesFn,
    set_profiling: ProfOnFn,
    profile_count: CountFn,
    profile_kernel: ProfKernelFn,
    profile_label: ProfLabelFn,
    approx_report: ReportFn,
    inputs: Vec<IoDesc>,
    outputs: Vec<IoDesc>,
    // Dropped last: the function pointers above point into it.
    _lib: libloading::Library,
}

// SAFETY: a context may be used from any thread, one call at a time; `run` takes
// `&mut self`, so Rust's borrow rules give exactly that.
unsafe impl Send for AotLibrary {}

impl std::fmt::Debug for AotLibrary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AotLibrary")
            .field("inputs", &self.inputs)
            .field("outputs", &self.outputs)
            .finish()
    }
}

impl AotLibrary {
    /// Loads `path` and creates a context (`weights`: the side file, for libraries built
    /// with `--weights file`).
    pub fn load(path: &Path, weights: Option<&Path>) -> Result<AotLibrary, LoadError> {
        let dl = |msg: String| LoadError::Dl {
            path: path.display().to_string(),
            msg,
        };
        // SAFETY: loading runs the library's initialisers; a kiln library has none that
        // matter beyond the Rust runtime's, which are safe to run.
        let lib = unsafe { libloading::Library::new(path) }.map_err(|e| dl(e.to_string()))?;
        macro_rules! sym {
            ($name:literal, $ty:ty) => {{
                // SAFETY: the symbol has this signature in every kiln library (header.rs).
                let s: libloading::Symbol<$ty> =
                    unsafe { lib.get($name.as_bytes()) }.map_err(|e| dl(e.to_string()))?;
                *s
            }};
        }
        let create = sym!("kiln_create", CreateFn);
        let last_error = sym!("kiln_last_error", ErrFn);
        let weights_c = weights
            .map(|w| {
                CString::new(w.to_string_lossy().as_bytes())
                    .map_err(|_| LoadError::Input("weights path contains NUL".into()))
            })
            .transpose()?;
        let mut ctx = std::ptr::null_mut();
        // SAFETY: a valid (or null) C string and an out pointer.
        let st = unsafe {
            create(
                weights_c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
                &mut ctx,
            )
        };
        if st != 0 {
            return Err(LoadError::Call {
                call: "kiln_create",
                status: st,
                // SAFETY: the library returns a valid C string.
                msg: unsafe { CStr::from_ptr(last_error()) }
                    .to_string_lossy()
                    .into_owned(),
            });
        }
        let mut me = AotLibrary {
            ctx,
            destroy: sym!("kiln_destroy", DestroyFn),
            last_error,
            set_threads: sym!("kiln_set_threads", ThreadsFn),
            run: sym!("kiln_run", RunFn),
            result_rank: sym!("kiln_result_rank", RankFn),
            result_dims: sym!("kiln_result_dims", DimsFn),
            result_data: sym!("kiln_result_data", DataFn),
            result_bytes: sym!("kiln_result_bytes", BytesFn),
            set_profiling: sym!("kiln_set_profiling", ProfOnFn),
            profile_count: sym!("kiln_profile_count", CountFn),
            profile_kernel: sym!("kiln_profile_kernel", ProfKernelFn),
            profile_label: sym!("kiln_profile_label", ProfLabelFn),
            approx_report: sym!("kiln_approx_report", ReportFn),
            inputs: vec![],
            outputs: vec![],
            _lib: lib,
        };
        // Filled after `me` exists so that an error below still destroys the context.
        let lib = &me._lib;
        let describe = |n: CountFn, name: NameFn, dt: DtypeFn, rank: RankFn| {
            // SAFETY: `ctx` is live; indices are below the count.
            (0..unsafe { n(ctx) })
                .map(|i| unsafe {
                    let code = dt(ctx, i);
                    Ok(IoDesc {
                        name: CStr::from_ptr(name(ctx, i)).to_string_lossy().into_owned(),
                        dtype: DType::from_onnx_code(code)
                            .ok_or_else(|| LoadError::Input(format!("unknown dtype {code}")))?,
                        rank: rank(ctx, i).max(0) as usize,
                    })
                })
                .collect::<Result<Vec<_>, LoadError>>()
        };
        macro_rules! sym2 {
            ($name:literal, $ty:ty) => {{
                // SAFETY: as above.
                let s: libloading::Symbol<$ty> =
                    unsafe { lib.get($name.as_bytes()) }.map_err(|e| dl(e.to_string()))?;
                *s
            }};
        }
        let inputs = describe(
            sym2!("kiln_num_inputs", CountFn),
            sym2!("kiln_input_name", NameFn),
            sym2!("kiln_input_dtype", DtypeFn),
            sym2!("kiln_input_rank", RankFn),
        )?;
        let outputs = describe(
            sym2!("kiln_num_outputs", CountFn),
            sym2!("kiln_output_name", NameFn),
            sym2!("kiln_output_dtype", DtypeFn),
            sym2!("kiln_output_rank", RankFn),
        )?;
        me.inputs = inputs;
        me.outputs = outputs;
        Ok(me)
    }

    /// The approximation report the library was built under (`kiln_approx_report`), or
    /// `None` for an exact model.
    pub fn approx_report(&self) -> Option<String> {
        // SAFETY: `ctx` is live; the library returns null or a C string it owns.
        let p = unsafe { (self.approx_report)(self.ctx) };
        if p.is_null() {
            return None;
        }
        // SAFETY: non-null, a C string per the C ABI.
        let s = unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
        (!s.is_empty()).then_some(s)
    }

    /// The model's inputs, in order.
    pub fn inputs(&self) -> &[IoDesc] {
        &self.inputs
    }

    /// The model's outputs, in order.
    pub fn outputs(&self) -> &[IoDesc] {
        &self.outputs
    }

    fn call_err(&self, call: &'static str, status: i32) -> LoadError {
        LoadError::Call {
            call,
            status,
            // SAFETY: the library returns a valid C string.
            msg: unsafe { CStr::from_ptr((self.last_error)()) }
                .to_string_lossy()
                .into_owned(),
        }
    }

    /// Sets the loop kernels' thread count (0 = all CPUs).
    pub fn set_threads(&mut self, threads: usize) -> Result<(), LoadError> {
        // SAFETY: live context.
        let st = unsafe { (self.set_threads)(self.ctx, threads) };
        if st != 0 {
            return Err(self.call_err("kiln_set_threads", st));
        }
        Ok(())
    }

    /// Runs like [`AotLibrary::run`], also timing every kernel.
    pub fn run_profiled(
        &mut self,
        inputs: &[Tensor],
    ) -> Result<(Vec<Tensor>, Vec<KernelTime>), LoadError> {
        // SAFETY: live context.
        let st = unsafe { (self.set_profiling)(self.ctx, 1) };
        if st != 0 {
            return Err(self.call_err("kiln_set_profiling", st));
        }
        let outs = self.run(inputs);
        // SAFETY: live context; indices below the count; valid out pointers.
        let times = unsafe {
            let times = (0..(self.profile_count)(self.ctx))
                .map(|i| {
                    let (mut kind, mut nanos) = (0i32, 0u64);
                    let st = (self.profile_kernel)(self.ctx, i, &mut kind, &mut nanos);
                    if st != 0 {
                        return Err(self.call_err("kiln_profile_kernel", st));
                    }
                    let kind = match kind {
                        0 => "loop",
                        1 => "contraction",
                        3 => "interp",
                        _ => "native",
                    };
                    let p = (self.profile_label)(self.ctx, i);
                    let label = if p.is_null() {
                        format!("#{i}")
                    } else {
                        CStr::from_ptr(p).to_string_lossy().into_owned()
                    };
                    Ok(KernelTime { label, kind, nanos })
                })
                .collect::<Result<Vec<_>, _>>();
            (self.set_profiling)(self.ctx, 0);
            times
        };
        Ok((outs?, times?))
    }

    /// Runs on inputs in graph order; outputs come back in graph order.
    pub fn run(&mut self, inputs: &[Tensor]) -> Result<Vec<Tensor>, LoadError> {
        if inputs.len() != self.inputs.len() {
            return Err(LoadError::Input(format!(
                "the model takes {} inputs, got {}",
                self.inputs.len(),
                inputs.len()
            )));
        }
        let mut bytes = vec![];
        let mut dims = vec![];
        for (t, d) in inputs.iter().zip(&self.inputs) {
            if t.dtype() != d.dtype || t.rank() != d.rank {
                return Err(LoadError::Input(format!(
                    "input `{}` is {}[{} dims], got {}{:?}",
                    d.name,
                    d.dtype,
                    d.rank,
                    t.dtype(),
                    t.shape()
                )));
            }
            bytes.push(t.data().le_bytes());
            dims.push(t.shape().iter().map(|&x| x as i64).collect::<Vec<i64>>());
        }
        let in_ptrs: Vec<*const c_void> = bytes.iter().map(|b| b.as_ptr() as _).collect();
        let dim_ptrs: Vec<*const i64> = dims.iter().map(|d| d.as_ptr()).collect();
        // SAFETY: one data and one dims pointer per input, each covering its shape.
        let st = unsafe {
            (self.run)(
                self.ctx,
                in_ptrs.as_ptr(),
                dim_ptrs.as_ptr(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        if st != 0 {
            return Err(self.call_err("kiln_run", st));
        }
        let mut outs = vec![];
        for (i, d) in self.outputs.iter().enumerate() {
            // SAFETY: live context; `i` is below the output count; `dims` has room for
            // the result's rank; the data pointer covers `result_bytes` bytes.
            unsafe {
                let rank = (self.result_rank)(self.ctx, i).max(0) as usize;
                let mut shape = vec![0i64; rank];
                let st = (self.result_dims)(self.ctx, i, shape.as_mut_ptr());
                if st != 0 {
                    return Err(self.call_err("kiln_result_dims", st));
                }
                let n = (self.result_bytes)(self.ctx, i);
                let p = (self.result_data)(self.ctx, i) as *const u8;
                let data: &[u8] = if n == 0 {
                    &[]
                } else {
                    std::slice::from_raw_parts(p, n)
                };
                let data = TensorData::from_le_bytes(d.dtype, data).map_err(LoadError::Input)?;
                let shape = shape.into_iter().map(|x| x as usize).collect();
                outs.push(Tensor::new(shape, data).map_err(LoadError::Input)?);
            }
        }
        Ok(outs)
    }
}

impl Drop for AotLibrary {
    fn drop(&mut self) {
        // SAFETY: the context came from `kiln_create` and is destroyed once.
        unsafe { (self.destroy)(self.ctx) };
    }
}
