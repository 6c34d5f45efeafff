//! numpy arrays to kiln tensors and back: inputs are used in place (no copy) when their
//! dtype is one kiln has and they are C-contiguous, aligned and native-endian; outputs
//! become numpy arrays that own their elements.

use crate::errors::InputError;
use kiln::{DType, Tensor};
use kiln_ir::{Buf, TensorData};
use numpy::ndarray::{ArrayD, IxDyn};
use numpy::{
    Element, PyArrayDescrMethods, PyArrayDyn, PyArrayMethods, PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::prelude::*;
use pyo3::types::PyModule;
use std::panic::{RefUnwindSafe, UnwindSafe};
use std::sync::Arc;

/// Keeps a numpy array alive while a tensor borrows its elements. Dropping it without the
/// GIL is fine: PyO3 defers the reference-count decrement until the GIL is next held.
struct ArrayOwner(#[allow(dead_code)] Py<PyUntypedArray>);

// The owner is only ever dropped, never used: nothing a panic could leave half-done.
impl UnwindSafe for ArrayOwner {}
impl RefUnwindSafe for ArrayOwner {}

/// The kiln dtype of a numpy dtype (`None` where kiln has none, or for a byte order other
/// than the machine's).
fn kiln_dtype(descr: &Bound<'_, numpy::PyArrayDescr>) -> Option<DType> {
    if descr.is_native_byteorder() == Some(false) {
        return None;
    }
    Some(match (descr.kind(), descr.itemsize()) {
        (b'f', 4) => DType::F32,
        (b'f', 8) => DType::F64,
        (b'f', 2) => DType::F16,
        (b'i', 1) => DType::I8,
        (b'i', 2) => DType::I16,
        (b'i', 4) => DType::I32,
        (b'i', 8) => DType::I64,
        (b'u', 1) => DType::U8,
        (b'u', 2) => DType::U16,
        (b'u', 4) => DType::U32,
        (b'u', 8) => DType::U64,
        (b'b', 1) => DType::Bool,
        _ => return None,
    })
}

/// The numpy name of a kiln dtype (`float32`); bfloat16 is returned as float32.
pub fn numpy_name(d: DType) -> &'static str {
    match d {
        DType::F32 | DType::BF16 => "float32",
        DType::F64 => "float64",
        DType::F16 => "float16",
        DType::I8 => "int8",
        DType::I16 => "int16",
        DType::I32 => "int32",
        DType::I64 => "int64",
        DType::U8 => "uint8",
        DType::U16 => "uint16",
        DType::U32 => "uint32",
        DType::U64 => "uint64",
        DType::Bool => "bool",
    }
}

/// A tensor that reads `arr`'s elements in place.
///
/// # Safety
/// `arr` must be C-contiguous, aligned, native-endian and hold elements of type `T`.
unsafe fn borrow<T: kiln_ir::Elem + Element>(arr: &Bound<'_, PyUntypedArray>) -> PyResult<Tensor> {
    let shape = arr.shape().to_vec();
    let len = arr.len();
    let typed = arr
        .cast::<PyArrayDyn<T>>()
        .map_err(|e| InputError::new_err(e.to_string()))?;
    // The array's data pointer: `len` elements that live as long as the array object,
    // which the owner keeps alive.
    let ptr = typed.data() as *const T;
    let owner = Arc::new(ArrayOwner(arr.clone().unbind()));
    // SAFETY: see above; kiln never writes through a mapped buffer (it copies first).
    let buf = unsafe { Buf::mapped(owner, ptr, len) };
    Ok(Tensor::from_buf(shape, buf))
}

/// Converts the value fed for input `name` into a tensor, without a copy where possible.
pub fn to_tensor(py: Python<'_>, name: &str, obj: &Bound<'_, PyAny>) -> PyResult<Tensor> {
    let np = PyModule::import(py, "numpy")?;
    let mut arr: Bound<'_, PyUntypedArray> = match obj.cast::<PyUntypedArray>() {
        Ok(a) => a.clone(),
        Err(_) => np
            .getattr("asarray")?
            .call1((obj,))?
            .cast_into::<PyUntypedArray>()
            .map_err(|e| InputError::new_err(format!("input `{name}`: {e}")))?,
    };
    let descr = arr.dtype();
    let Some(dtype) = kiln_dtype(&descr) else {
        return Err(InputError::new_err(format!(
            "input `{name}`: numpy dtype {} has no kiln dtype (kiln takes float16/32/64, \
             int8-64, uint8-64 and bool in native byte order)",
            descr.str()?
        )));
    };
    if !arr.is_c_contiguous() || !arr.is_aligned() {
        // A fresh array is C-contiguous and aligned (`ascontiguousarray` keeps an unaligned
        // but contiguous array as it is).
        let kw = pyo3::types::PyDict::new(py);
        kw.set_item("order", "C")?;
        kw.set_item("copy", true)?;
        arr = np
            .getattr("array")?
            .call((&arr,), Some(&kw))?
            .cast_into::<PyUntypedArray>()?;
    }
    // SAFETY: the dtype matched `T` above and the array is C-contiguous and aligned.
    unsafe {
        match dtype {
            DType::F32 => borrow::<f32>(&arr),
            DType::F64 => borrow::<f64>(&arr),
            DType::F16 => borrow::<half::f16>(&arr),
            DType::I8 => borrow::<i8>(&arr),
            DType::I16 => borrow::<i16>(&arr),
            DType::I32 => borrow::<i32>(&arr),
            DType::I64 => borrow::<i64>(&arr),
            DType::U8 => borrow::<u8>(&arr),
            DType::U16 => borrow::<u16>(&arr),
            DType::U32 => borrow::<u32>(&arr),
            DType::U64 => borrow::<u64>(&arr),
            // numpy's bools are bytes that should be 0 or 1, but a `.view(bool)` of other
            // bytes is not: read them as bytes and copy, so no invalid `bool` exists.
            DType::Bool => {
                let as_bytes = np
                    .getattr("ascontiguousarray")?
                    .call1((&arr, "u1"))?
                    .cast_into::<PyUntypedArray>()?;
                let bytes = borrow::<u8>(&as_bytes)?;
                let v: Vec<bool> = bytes
                    .as_slice::<u8>()
                    .unwrap_or(&[])
                    .iter()
                    .map(|&b| b != 0)
                    .collect();
                Ok(Tensor::from_vec(bytes.shape().to_vec(), v))
            }
            DType::BF16 => unreachable!("numpy has no bfloat16 kiln_dtype maps"),
        }
    }
}

fn array<'py, T: Element>(py: Python<'py>, shape: &[usize], v: Vec<T>) -> Bound<'py, PyAny> {
    // The element count matches the shape (a tensor's invariant).
    let a = ArrayD::from_shape_vec(IxDyn(shape), v).expect("tensor element count");
    PyArrayDyn::from_owned_array(py, a).into_any()
}

/// A numpy array owning a copy of (or, for an owned tensor, the very) elements of `t`.
pub fn to_numpy<'py>(py: Python<'py>, t: Tensor) -> Bound<'py, PyAny> {
    let shape = t.shape().to_vec();
    match t.into_data() {
        TensorData::F32(b) => array(py, &shape, b.into_vec()),
        TensorData::F64(b) => array(py, &shape, b.into_vec()),
        TensorData::F16(b) => array(py, &shape, b.into_vec()),
        TensorData::BF16(b) => array(
            py,
            &shape,
            b.as_slice()
                .iter()
                .map(|x| x.to_f32())
                .collect::<Vec<f32>>(),
        ),
        TensorData::I8(b) => array(py, &shape, b.into_vec()),
        TensorData::I16(b) => array(py, &shape, b.into_vec()),
        TensorData::I32(b) => array(py, &shape, b.into_vec()),
        TensorData::I64(b) => array(py, &shape, b.into_vec()),
        TensorData::U8(b) => array(py, &shape, b.into_vec()),
        TensorData::U16(b) => array(py, &shape, b.into_vec()),
        TensorData::U32(b) => array(py, &shape, b.into_vec()),
        TensorData::U64(b) => array(py, &shape, b.into_vec()),
        TensorData::Bool(b) => array(py, &shape, b.into_vec()),
    }
}
