//! Running a [`Program`] on a GPU through the CUDA driver API (cudarc's thin `result`
//! layer, the driver library loaded at run time). One device arena and one weight blob per
//! loaded program (weights uploaded once), one stream; a run uploads its inputs, launches
//! the steps in plan order and copies the outputs back. Host steps download what they read
//! (values the host made or holds stay cached on the host for the run) and upload what they
//! write. A program without host steps is captured into a CUDA graph on its first run and
//! replayed after (its arguments and addresses never change).

use crate::program::{shape_of, Program, Step};
use crate::CudaError;
use cudarc::driver::{result, sys};
use kiln_ir::{Tensor, TensorData, ValueId};
use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::Mutex;

fn drv<T>(what: &str, r: Result<T, result::DriverError>) -> Result<T, CudaError> {
    r.map_err(|e| CudaError::Driver {
        what: what.to_string(),
        msg: format!("{e:?}"),
    })
}

/// Whether the CUDA driver library (`libcuda`) can be loaded on this machine.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the driver library.
    unsafe { sys::is_culib_present() }
}

/// An opened GPU: its primary context.
pub struct Device {
    dev: sys::CUdevice,
    ctx: sys::CUcontext,
    ordinal: usize,
    name: String,
    sm: u32,
}

// SAFETY: a CUDA context may be made current on any thread; every use below does so first.
unsafe impl Send for Device {}
// SAFETY: as above; the driver API is thread-safe.
unsafe impl Sync for Device {}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cuda:{} ({}, sm_{})", self.ordinal, self.name, self.sm)
    }
}

impl Device {
    /// Opens GPU `ordinal`. A machine without the driver or without that GPU gets
    /// [`CudaError::NoDevice`], never a crash.
    pub fn open(ordinal: usize) -> Result<Device, CudaError> {
        if !driver_present() {
            return Err(CudaError::NoDevice(
                "no CUDA driver on this machine (libcuda.so could not be loaded); \
                 --device cuda needs an NVIDIA GPU and its driver"
                    .into(),
            ));
        }
        drv("cuInit", result::init())?;
        let count = drv("counting devices", result::device::get_count())?;
        if ordinal >= count.max(0) as usize {
            return Err(CudaError::NoDevice(format!(
                "no CUDA device {ordinal}: the driver sees {count}"
            )));
        }
        let dev = drv("cuDeviceGet", result::device::get(ordinal as i32))?;
        let attr = |a| {
            // SAFETY: `dev` is a valid device handle.
            drv("reading device attributes", unsafe {
                result::device::get_attribute(dev, a)
            })
        };
        let major = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
        let minor = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
        let name = result::device::get_name(dev).unwrap_or_else(|_| "unknown GPU".into());
        // SAFETY: `dev` is valid; the context is released in Drop.
        let ctx = drv("retaining the primary context", unsafe {
            result::primary_ctx::retain(dev)
        })?;
        let cc = (major * 10 + minor) as u32;
        // PTX for the highest supported architecture not above the device's.
        let sm = kiln_llvm::ptx::SUPPORTED_SM
            .iter()
            .copied()
            .filter(|&s| s <= cc)
            .max()
            .ok_or_else(|| {
                CudaError::NoDevice(format!(
                    "{name} is sm_{cc}; kiln's PTX needs sm_80 or newer"
                ))
            })?;
        Ok(Device {
            dev,
            ctx,
            ordinal,
            name,
            sm,
        })
    }

    /// The architecture PTX is emitted for (×10).
    pub fn sm(&self) -> u32 {
        self.sm
    }

    /// The GPU's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn bind(&self) -> Result<(), CudaError> {
        // SAFETY: the context is retained for the device's lifetime.
        drv("cuCtxSetCurrent", unsafe {
            result::ctx::set_current(self.ctx)
        })
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // SAFETY: retained in `open`.
        let _ = unsafe { result::primary_ctx::release(self.dev) };
    }
}

struct Handles {
    module: sys::CUmodule,
    functions: Vec<Option<sys::CUfunction>>,
    weights: sys::CUdeviceptr,
    arena: sys::CUdeviceptr,
    stream: sys::CUstream,
    graph: Option<sys::CUgraphExec>,
}

/// A program loaded on a device: module, weights and arena. Runs take turns.
pub struct Loaded {
    device: std::sync::Arc<Device>,
    program: Program,
    h: Mutex<Handles>,
}

// SAFETY: the raw handles are only used under the mutex, with the context made current.
unsafe impl Send for Loaded {}
// SAFETY: as above.
unsafe impl Sync for Loaded {}

/// Where a value lives.
#[derive(Clone, Copy)]
enum Home {
    Arena(usize),
    Weights(usize),
}

impl Loaded {
    /// Loads `program` on `device`: the PTX module, the weights (uploaded now) and the arena.
    pub fn new(device: std::sync::Arc<Device>, program: Program) -> Result<Loaded, CudaError> {
        device.bind()?;
        let ptx = CString::new(program.module.ptx.clone())
            .map_err(|_| CudaError::Plan("PTX holds a NUL byte".into()))?;
        // SAFETY: a NUL-terminated PTX image.
        let module = drv("loading the PTX module", unsafe {
            result::module::load_data(ptx.as_ptr() as *const c_void)
        })?;
        let mut functions = vec![];
        for s in &program.steps {
            functions.push(match s {
                Step::Loop { entry, .. }
                | Step::Gemm { entry, .. }
                | Step::Attention { entry, .. }
                | Step::Strided { entry, .. } => {
                    let n = CString::new(entry.as_str())
                        .map_err(|_| CudaError::Plan("bad entry name".into()))?;
                    // SAFETY: `module` was just loaded.
                    Some(drv(&format!("finding {entry}"), unsafe {
                        result::module::get_function(module, n)
                    })?)
                }
                _ => None,
            });
        }
        let blob = program.weight_blob();
        // SAFETY: sizes are at least 1; freed in Drop.
        let weights = drv("allocating the weights", unsafe {
            result::malloc_sync(blob.len().max(1))
        })?;
        // SAFETY: `weights` holds `blob.len()` bytes.
        drv("uploading the weights", unsafe {
            result::memcpy_htod_sync(weights, &blob)
        })?;
        // SAFETY: as above.
        let arena = drv("allocating the arena", unsafe {
            result::malloc_sync(program.memory.arena.arena_bytes.max(1))
        })?;
        let stream = drv(
            "creating a stream",
            result::stream::create(result::stream::StreamKind::NonBlocking),
        )?;
        Ok(Loaded {
            device,
            program,
            h: Mutex::new(Handles {
                module,
                functions,
                weights,
                arena,
                stream,
                graph: None,
            }),
        })
    }

    /// The program.
    pub fn program(&self) -> &Program {
        &self.program
    }

    /// Runs on `inputs` (graph input order, the shapes the program was made for).
    pub fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, CudaError> {
        let p = &self.program;
        let g = &p.plan.graph;
        let mut h = self.h.lock().unwrap_or_else(|e| e.into_inner());
        self.device.bind()?;
        let home = |v: ValueId| -> Result<Home, CudaError> {
            if let Some(&o) = p.memory.offsets.get(&v) {
                return Ok(Home::Arena(o));
            }
            p.memory
                .weights
                .iter()
                .find(|w| w.0 == v)
                .map(|w| Home::Weights(w.1))
                .ok_or_else(|| {
                    CudaError::Plan(format!("value `{}` has no device home", g.value(v).name))
                })
        };
        let addr = |h: &Handles, v: ValueId| -> Result<u64, CudaError> {
            Ok(match home(v)? {
                Home::Arena(o) => h.arena + o as u64,
                Home::Weights(o) => h.weights + o as u64,
            })
        };
        // Host copies valid for this run (inputs, constants, host-step results).
        let mut host: HashMap<ValueId, Tensor> = HashMap::new();
        let mut on_device: HashMap<ValueId, bool> = HashMap::new();
        for (&v, t) in g.inputs.iter().zip(inputs) {
            if t.shape() != shape_of(&p.plan, v)?.as_slice() || t.dtype() != g.ty(v).dtype {
                return Err(CudaError::Plan(format!(
                    "input `{}` is {} {:?}; this program was made for {}",
                    g.value(v).name,
                    t.dtype(),
                    t.shape(),
                    g.ty(v)
                )));
            }
            host.insert(v, t);
        }
        let stream = h.stream;
        let upload = |h: &Handles, v: ValueId, t: &Tensor| -> Result<(), CudaError> {
            let bytes = t.data().le_bytes();
            let dst = addr(h, v)?;
            // SAFETY: the arena slot holds the value's bytes; the host buffer lives in
            // `host` (or the plan) until the stream is synchronised at the end of the run.
            drv("uploading", unsafe {
                result::memcpy_htod_async(dst, &bytes, stream)
            })?;
            // Pageable copies are staged before returning; synchronise anyway for a
            // temporary `Cow::Owned` buffer.
            if matches!(bytes, std::borrow::Cow::Owned(_)) {
                // SAFETY: a valid stream.
                drv("synchronising", unsafe {
                    result::stream::synchronize(stream)
                })?;
            }
            Ok(())
        };
        let download = |h: &Handles, v: ValueId| -> Result<Tensor, CudaError> {
            let shape = shape_of(&p.plan, v)?;
            let dt = g.ty(v).dtype;
            let mut buf = vec![0u8; shape.iter().product::<usize>() * dt.size()];
            // SAFETY: a valid stream; `buf` holds the value's bytes.
            unsafe {
                drv("synchronising", result::stream::synchronize(stream))?;
                if !buf.is_empty() {
                    drv(
                        "downloading",
                        result::memcpy_dtoh_sync(&mut buf, addr(h, v)?),
                    )?;
                }
            }
            let data = TensorData::from_le_bytes(dt, &buf).map_err(CudaError::Plan)?;
            Tensor::new(shape, data).map_err(CudaError::Plan)
        };
        for &v in &g.inputs {
            upload(&h, v, &host[&v])?;
            on_device.insert(v, true);
        }
        let all_device = p.steps.iter().all(|s| !matches!(s, Step::Host { .. }));
        let use_graph = all_device && std::env::var_os("KILN_CUDA_NO_GRAPH").is_none();
        if use_graph && h.graph.is_some() {
            // SAFETY: the graph was captured from this program's launches on this stream.
            drv("launching the CUDA graph", unsafe {
                result::graph::launch(h.graph.unwrap_or(std::ptr::null_mut()), stream)
            })?;
        } else {
            if use_graph {
                // SAFETY: a valid stream, not capturing.
                drv("beginning capture", unsafe {
                    result::stream::begin_capture(
                        stream,
                        sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
                    )
                })?;
            }
            for (i, s) in p.steps.iter().enumerate() {
                let kerr = |msg: String| CudaError::Kernel {
                    kernel: p.plan.label(i),
                    msg,
                };
                match s {
                    Step::Empty => {}
                    Step::Copy { from, to, bytes } => {
                        self.ensure_device(&h, *from, &mut host, &mut on_device, &upload)?;
                        let (src, dst) = (addr(&h, *from)?, addr(&h, *to)?);
                        // SAFETY: both slots hold `bytes` bytes; a valid stream.
                        drv("copying on the device", unsafe {
                            result::memcpy_dtod_async(dst, src, *bytes, stream)
                        })?;
                        on_device.insert(*to, true);
                        host.remove(to);
                    }
                    Step::Loop {
                        launch,
                        args,
                        inputs,
                        outputs,
                        ..
                    } => {
                        let mut vals: Vec<u64> = vec![args.n, args.rows];
                        vals.extend(
                            &args.shape[..args.shape.len().saturating_sub(1)]
                                .iter()
                                .map(|&d| d as u64)
                                .collect::<Vec<_>>(),
                        );
                        for (v, st) in inputs.iter().zip(&args.strides) {
                            self.ensure_device(&h, *v, &mut host, &mut on_device, &upload)?;
                            vals.push(addr(&h, *v)?);
                            vals.extend(st);
                        }
                        for &o in outputs {
                            vals.push(addr(&h, o)?);
                            on_device.insert(o, true);
                            host.remove(&o);
                        }
                        let f = h.functions[i].ok_or_else(|| kerr("no function".into()))?;
                        launch_with(f, launch, &mut vals, stream).map_err(kerr)?;
                    }
                    Step::Gemm {
                        launch,
                        args,
                        operands,
                        ..
                    } => {
                        for &v in operands.iter().filter(|&&v| v != operands[2]) {
                            self.ensure_device(&h, v, &mut host, &mut on_device, &upload)?;
                        }
                        let mut vals: Vec<u64> = vec![args.m, args.n, args.k, args.nb1];
                        let a = addr(&h, operands[0])?;
                        vals.push(a);
                        vals.extend(args.a);
                        vals.push(addr(&h, operands[1])?);
                        vals.extend(args.b);
                        vals.push(addr(&h, operands[2])?);
                        vals.extend(&args.c[..3]);
                        for (v, st) in operands[3..].iter().zip(&args.extras) {
                            vals.push(addr(&h, *v)?);
                            vals.extend(st);
                        }
                        on_device.insert(operands[2], true);
                        host.remove(&operands[2]);
                        let f = h.functions[i].ok_or_else(|| kerr("no function".into()))?;
                        launch_with(f, launch, &mut vals, stream).map_err(kerr)?;
                    }
                    Step::Strided { copies, out, .. } => {
                        let f = h.functions[i].ok_or_else(|| kerr("no function".into()))?;
                        let dst = addr(&h, *out)?;
                        for (launch, a, v) in copies {
                            self.ensure_device(&h, *v, &mut host, &mut on_device, &upload)?;
                            let mut vals: Vec<u64> = vec![a.total];
                            vals.extend(a.dims);
                            vals.push(addr(&h, *v)?);
                            vals.push(a.src.0);
                            vals.extend(a.src.1);
                            vals.push(dst);
                            vals.push(a.dst.0);
                            vals.extend(a.dst.1);
                            launch_with(f, launch, &mut vals, stream).map_err(kerr)?;
                        }
                        on_device.insert(*out, true);
                        host.remove(out);
                    }
                    Step::Attention {
                        launch,
                        args,
                        operands,
                        ..
                    } => {
                        for (o, &v) in operands.iter().enumerate() {
                            if o != 3 {
                                self.ensure_device(&h, v, &mut host, &mut on_device, &upload)?;
                            }
                        }
                        let mut vals: Vec<u64> = vec![
                            args.s,
                            args.t,
                            args.d,
                            args.dv,
                            args.group,
                            args.scale.to_bits(),
                        ];
                        for (o, st) in args.strides.iter().enumerate() {
                            vals.push(addr(&h, operands[o])?);
                            vals.extend(st);
                        }
                        if let (Some(m), Some(&mv)) = (args.mask, operands.get(4)) {
                            vals.push(addr(&h, mv)?);
                            vals.extend(m);
                        }
                        on_device.insert(operands[3], true);
                        host.remove(&operands[3]);
                        let f = h.functions[i].ok_or_else(|| kerr("no function".into()))?;
                        launch_with(f, launch, &mut vals, stream).map_err(kerr)?;
                    }
                    Step::Host { node, .. } => {
                        let node = &g.nodes[*node];
                        let mut ins: Vec<Option<Tensor>> = vec![];
                        for v in &node.inputs {
                            ins.push(match v {
                                None => None,
                                Some(v) => Some(match (host.get(v), p.constant(*v)) {
                                    (Some(t), _) => t.clone(),
                                    (None, Some(t)) => t.clone(),
                                    (None, None) => {
                                        let t = download(&h, *v)?;
                                        host.insert(*v, t.clone());
                                        t
                                    }
                                }),
                            });
                        }
                        let refs: Vec<Option<&Tensor>> = ins.iter().map(|t| t.as_ref()).collect();
                        let outs = kiln_ir::ops::eval(node.op, &node.attrs, &refs).map_err(kerr)?;
                        for (&o, t) in node.outputs.iter().zip(outs) {
                            let want = shape_of(&p.plan, o)?;
                            if t.shape() != want.as_slice() || t.dtype() != g.ty(o).dtype {
                                return Err(kerr(format!(
                                    "`{}` came out {} {:?}, planned {}",
                                    g.value(o).name,
                                    t.dtype(),
                                    t.shape(),
                                    g.ty(o)
                                )));
                            }
                            on_device.insert(o, false);
                            host.insert(o, t);
                        }
                    }
                }
            }
            if use_graph {
                // SAFETY: capture was begun on this stream above.
                let graph = drv("ending capture", unsafe {
                    result::stream::end_capture(stream)
                })?;
                // SAFETY: a captured graph.
                let exec = drv("instantiating the CUDA graph", unsafe {
                    result::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0))
                })?;
                // SAFETY: the exec keeps what it needs.
                let _ = unsafe { result::graph::destroy(graph) };
                h.graph = Some(exec);
                // SAFETY: just instantiated.
                drv("launching the CUDA graph", unsafe {
                    result::graph::launch(exec, stream)
                })?;
            }
        }
        let mut outs = vec![];
        for &o in &g.outputs {
            outs.push(match (host.remove(&o), p.constant(o)) {
                (Some(t), _) if !on_device.get(&o).copied().unwrap_or(false) => t,
                (_, Some(t)) => t.clone(),
                _ => download(&h, o)?,
            });
        }
        // SAFETY: a valid stream.
        drv("synchronising", unsafe {
            result::stream::synchronize(stream)
        })?;
        Ok(outs)
    }

    fn ensure_device(
        &self,
        h: &Handles,
        v: ValueId,
        host: &mut HashMap<ValueId, Tensor>,
        on_device: &mut HashMap<ValueId, bool>,
        upload: &impl Fn(&Handles, ValueId, &Tensor) -> Result<(), CudaError>,
    ) -> Result<(), CudaError> {
        if on_device.get(&v).copied().unwrap_or(false) || self.program.constant(v).is_some() {
            return Ok(());
        }
        let t = host.get(&v).ok_or_else(|| {
            CudaError::Plan(format!(
                "value `{}` is neither on the device nor on the host",
                self.program.plan.graph.value(v).name
            ))
        })?;
        upload(h, v, t)?;
        on_device.insert(v, true);
        Ok(())
    }
}

/// Launches `f` with every parameter an 8-byte value (i64, f64 bits or a device pointer).
fn launch_with(
    f: sys::CUfunction,
    l: &kiln_llvm::ptx::geometry::Launch,
    vals: &mut [u64],
    stream: sys::CUstream,
) -> Result<(), String> {
    let mut params: Vec<*mut c_void> = vals
        .iter_mut()
        .map(|v| v as *mut u64 as *mut c_void)
        .collect();
    // SAFETY: `params` matches the entry's parameter list (built from the same layout as
    // the code generator's); the values are copied by the driver at launch.
    unsafe {
        result::launch_kernel(
            f,
            (l.grid[0], l.grid[1], l.grid[2]),
            (l.block[0], l.block[1], l.block[2]),
            l.shared,
            stream,
            &mut params,
        )
    }
    .map_err(|e| format!("launch failed: {e:?}"))
}

impl Drop for Loaded {
    fn drop(&mut self) {
        let h = self.h.get_mut().unwrap_or_else(|e| e.into_inner());
        let _ = self.device.bind();
        // SAFETY: every handle was created in `new`/`run` and is released once here.
        unsafe {
            let _ = result::stream::synchronize(h.stream);
            if let Some(g) = h.graph.take() {
                let _ = result::graph::exec_destroy(g);
            }
            let _ = result::free_sync(h.arena);
            let _ = result::free_sync(h.weights);
            let _ = result::stream::destroy(h.stream);
            let _ = result::module::unload(h.module);
        }
    }
}
