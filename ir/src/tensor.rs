//! Concrete tensors: a shape and a typed, row-major element buffer. This is what the
//! interpreter computes on and what constants in the graph hold.

pub use crate::buf::{Buf, Storage};
use crate::DType;
use half::{bf16, f16};
use std::fmt;

/// A typed element buffer, one variant per [`DType`]; the elements live in a [`Buf`]
/// (owned, memory-mapped or an arena region).
#[derive(Clone, Debug)]
#[allow(missing_docs)]
pub enum TensorData {
    F32(Buf<f32>),
    F64(Buf<f64>),
    F16(Buf<f16>),
    BF16(Buf<bf16>),
    I8(Buf<i8>),
    I16(Buf<i16>),
    I32(Buf<i32>),
    I64(Buf<i64>),
    U8(Buf<u8>),
    U16(Buf<u16>),
    U32(Buf<u32>),
    U64(Buf<u64>),
    Bool(Buf<bool>),
}

/// Runs `$body` with `$v` bound to the typed `Vec` inside a [`TensorData`], so that one
/// generic body serves every dtype. `$T` names the element type in the body.
///
/// ```
/// use kiln_ir::{dispatch, TensorData};
/// let d = TensorData::I32(vec![1, 2, 3].into());
/// let n = dispatch!(&d, v, T => v.len());
/// assert_eq!(n, 3);
/// ```
#[macro_export]
macro_rules! dispatch {
    ($data:expr, $v:ident, $T:ident => $body:expr) => {{
        #[allow(unused_imports)]
        use $crate::half::{bf16, f16};
        match $data {
            $crate::TensorData::F32($v) => {
                #[allow(dead_code)]
                type $T = f32;
                $body
            }
            $crate::TensorData::F64($v) => {
                #[allow(dead_code)]
                type $T = f64;
                $body
            }
            $crate::TensorData::F16($v) => {
                #[allow(dead_code)]
                type $T = f16;
                $body
            }
            $crate::TensorData::BF16($v) => {
                #[allow(dead_code)]
                type $T = bf16;
                $body
            }
            $crate::TensorData::I8($v) => {
                #[allow(dead_code)]
                type $T = i8;
                $body
            }
            $crate::TensorData::I16($v) => {
                #[allow(dead_code)]
                type $T = i16;
                $body
            }
            $crate::TensorData::I32($v) => {
                #[allow(dead_code)]
                type $T = i32;
                $body
            }
            $crate::TensorData::I64($v) => {
                #[allow(dead_code)]
                type $T = i64;
                $body
            }
            $crate::TensorData::U8($v) => {
                #[allow(dead_code)]
                type $T = u8;
                $body
            }
            $crate::TensorData::U16($v) => {
                #[allow(dead_code)]
                type $T = u16;
                $body
            }
            $crate::TensorData::U32($v) => {
                #[allow(dead_code)]
                type $T = u32;
                $body
            }
            $crate::TensorData::U64($v) => {
                #[allow(dead_code)]
                type $T = u64;
                $body
            }
            $crate::TensorData::Bool($v) => {
                #[allow(dead_code)]
                type $T = bool;
                $body
            }
        }
    }};
}

/// A scalar element type that a [`TensorData`] can hold.
pub trait Elem:
    Copy + Default + PartialEq + PartialOrd + fmt::Debug + Send + Sync + 'static
{
    /// The dtype of this element type.
    const DTYPE: DType;
    /// Wraps a vector in the matching [`TensorData`] variant.
    fn wrap(v: Vec<Self>) -> TensorData {
        Self::wrap_buf(v.into())
    }
    /// Wraps a buffer in the matching [`TensorData`] variant.
    fn wrap_buf(v: Buf<Self>) -> TensorData;
    /// Borrows the vector if `d` holds this element type.
    fn unwrap(d: &TensorData) -> Option<&Buf<Self>>;
    /// Borrows the vector mutably if `d` holds this element type.
    fn unwrap_mut(d: &mut TensorData) -> Option<&mut Buf<Self>>;
    /// Converts to f64 (bool is 0 or 1).
    fn to_f64(self) -> f64;
    /// Converts from f64 with Rust `as` semantics (saturating for ints, NaN to 0).
    fn from_f64(x: f64) -> Self;
    /// Converts to i64 exactly for integers, truncating for floats.
    fn to_i64(self) -> i64;
    /// Converts from i64 with wrapping for narrower integers.
    fn from_i64(x: i64) -> Self;
    /// Writes the element's little-endian bytes into `out` (exactly `size()` bytes).
    fn write_le(self, out: &mut [u8]);
    /// Reads one element from exactly `size()` little-endian bytes.
    fn read_le(b: &[u8]) -> Self;
}

macro_rules! impl_elem_num {
    ($t:ty, $variant:ident, $dt:ident, float = $is_float:expr) => {
        impl Elem for $t {
            const DTYPE: DType = DType::$dt;
            fn wrap_buf(v: Buf<Self>) -> TensorData {
                TensorData::$variant(v)
            }
            fn unwrap(d: &TensorData) -> Option<&Buf<Self>> {
                match d {
                    TensorData::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn unwrap_mut(d: &mut TensorData) -> Option<&mut Buf<Self>> {
                match d {
                    TensorData::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn from_f64(x: f64) -> Self {
                x as $t
            }
            fn to_i64(self) -> i64 {
                self as i64
            }
            fn from_i64(x: i64) -> Self {
                x as $t
            }
            fn write_le(self, out: &mut [u8]) {
                out.copy_from_slice(&self.to_le_bytes());
            }
            fn read_le(b: &[u8]) -> Self {
                <$t>::from_le_bytes(b.try_into().expect("element byte width"))
            }
        }
    };
}
impl_elem_num!(f32, F32, F32, float = true);
impl_elem_num!(f64, F64, F64, float = true);
impl_elem_num!(i8, I8, I8, float = false);
impl_elem_num!(i16, I16, I16, float = false);
impl_elem_num!(i32, I32, I32, float = false);
impl_elem_num!(i64, I64, I64, float = false);
impl_elem_num!(u8, U8, U8, float = false);
impl_elem_num!(u16, U16, U16, float = false);
impl_elem_num!(u32, U32, U32, float = false);
impl_elem_num!(u64, U64, U64, float = false);

macro_rules! impl_elem_half {
    ($t:ty, $variant:ident) => {
        impl Elem for $t {
            const DTYPE: DType = DType::$variant;
            fn wrap_buf(v: Buf<Self>) -> TensorData {
                TensorData::$variant(v)
            }
            fn unwrap(d: &TensorData) -> Option<&Buf<Self>> {
                match d {
                    TensorData::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn unwrap_mut(d: &mut TensorData) -> Option<&mut Buf<Self>> {
                match d {
                    TensorData::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn to_f64(self) -> f64 {
                self.to_f64()
            }
            fn from_f64(x: f64) -> Self {
                <$t>::from_f64(x)
            }
            fn to_i64(self) -> i64 {
                self.to_f64() as i64
            }
            fn from_i64(x: i64) -> Self {
                <$t>::from_f64(x as f64)
            }
            fn write_le(self, out: &mut [u8]) {
                out.copy_from_slice(&self.to_le_bytes());
            }
            fn read_le(b: &[u8]) -> Self {
                <$t>::from_le_bytes(b.try_into().expect("element byte width"))
            }
        }
    };
}
impl_elem_half!(f16, F16);
impl_elem_half!(bf16, BF16);

impl Elem for bool {
    const DTYPE: DType = DType::Bool;
    fn wrap_buf(v: Buf<Self>) -> TensorData {
        TensorData::Bool(v)
    }
    fn unwrap(d: &TensorData) -> Option<&Buf<Self>> {
        match d {
            TensorData::Bool(v) => Some(v),
            _ => None,
        }
    }
    fn unwrap_mut(d: &mut TensorData) -> Option<&mut Buf<Self>> {
        match d {
            TensorData::Bool(v) => Some(v),
            _ => None,
        }
    }
    fn to_f64(self) -> f64 {
        self as u8 as f64
    }
    fn from_f64(x: f64) -> Self {
        x != 0.0
    }
    fn to_i64(self) -> i64 {
        self as i64
    }
    fn from_i64(x: i64) -> Self {
        x != 0
    }
    fn write_le(self, out: &mut [u8]) {
        out[0] = self as u8;
    }
    fn read_le(b: &[u8]) -> Self {
        b[0] != 0
    }
}

impl TensorData {
    /// The dtype of the elements.
    pub fn dtype(&self) -> DType {
        dispatch!(self, _v, T => <T as Elem>::DTYPE)
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        dispatch!(self, v, T => v.len())
    }

    /// True if there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `n` zero (false) elements of `dtype`.
    pub fn zeros(dtype: DType, n: usize) -> TensorData {
        Self::filled(dtype, n, 0.0)
    }

    /// `n` elements of `dtype`, each `x` converted.
    pub fn filled(dtype: DType, n: usize, x: f64) -> TensorData {
        fn mk<T: Elem>(n: usize, x: f64) -> TensorData {
            T::wrap(vec![T::from_f64(x); n])
        }
        match dtype {
            DType::F32 => mk::<f32>(n, x),
            DType::F64 => mk::<f64>(n, x),
            DType::F16 => mk::<f16>(n, x),
            DType::BF16 => mk::<bf16>(n, x),
            DType::I8 => mk::<i8>(n, x),
            DType::I16 => mk::<i16>(n, x),
            DType::I32 => mk::<i32>(n, x),
            DType::I64 => mk::<i64>(n, x),
            DType::U8 => mk::<u8>(n, x),
            DType::U16 => mk::<u16>(n, x),
            DType::U32 => mk::<u32>(n, x),
            DType::U64 => mk::<u64>(n, x),
            DType::Bool => mk::<bool>(n, x),
        }
    }

    /// Builds a buffer of `dtype` from f64 values (with `as` conversion).
    pub fn from_f64s(dtype: DType, xs: impl Iterator<Item = f64>) -> TensorData {
        fn mk<T: Elem>(xs: impl Iterator<Item = f64>) -> TensorData {
            T::wrap(xs.map(T::from_f64).collect())
        }
        match dtype {
            DType::F32 => mk::<f32>(xs),
            DType::F64 => mk::<f64>(xs),
            DType::F16 => mk::<f16>(xs),
            DType::BF16 => mk::<bf16>(xs),
            DType::I8 => mk::<i8>(xs),
            DType::I16 => mk::<i16>(xs),
            DType::I32 => mk::<i32>(xs),
            DType::I64 => mk::<i64>(xs),
            DType::U8 => mk::<u8>(xs),
            DType::U16 => mk::<u16>(xs),
            DType::U32 => mk::<u32>(xs),
            DType::U64 => mk::<u64>(xs),
            DType::Bool => mk::<bool>(xs),
        }
    }

    /// Builds a buffer of `dtype` from i64 values (wrapping for narrower ints).
    pub fn from_i64s(dtype: DType, xs: impl Iterator<Item = i64>) -> TensorData {
        fn mk<T: Elem>(xs: impl Iterator<Item = i64>) -> TensorData {
            T::wrap(xs.map(T::from_i64).collect())
        }
        match dtype {
            DType::F32 => mk::<f32>(xs),
            DType::F64 => mk::<f64>(xs),
            DType::F16 => mk::<f16>(xs),
            DType::BF16 => mk::<bf16>(xs),
            DType::I8 => mk::<i8>(xs),
            DType::I16 => mk::<i16>(xs),
            DType::I32 => mk::<i32>(xs),
            DType::I64 => mk::<i64>(xs),
            DType::U8 => mk::<u8>(xs),
            DType::U16 => mk::<u16>(xs),
            DType::U32 => mk::<u32>(xs),
            DType::U64 => mk::<u64>(xs),
            DType::Bool => mk::<bool>(xs),
        }
    }

    /// Decodes little-endian bytes. Errors if the byte count is not a multiple of the
    /// element size.
    pub fn from_le_bytes(dtype: DType, bytes: &[u8]) -> Result<TensorData, String> {
        let size = dtype.size();
        if !bytes.len().is_multiple_of(size) {
            return Err(format!(
                "{} bytes is not a whole number of {dtype} elements",
                bytes.len()
            ));
        }
        fn mk<T: Elem>(bytes: &[u8], size: usize) -> TensorData {
            // On a little-endian target an element's encoding is its memory: one copy (element
            // by element, 512 KiB of an AOT decode step's kv cache took ~90 µs). Not for bool,
            // whose bytes must be checked to be 0 or 1.
            #[cfg(target_endian = "little")]
            if T::DTYPE != DType::Bool {
                let n = bytes.len() / size;
                let mut v: Vec<T> = Vec::with_capacity(n);
                // SAFETY: `v` has room for `n` elements, `bytes` holds `n·size` bytes (the
                // caller checked the length is a multiple), and every bit pattern is a valid
                // value of the non-bool element types (machine numbers, `half`'s
                // repr(transparent) u16 wrappers), so the `n` elements are initialised.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        bytes.as_ptr(),
                        v.as_mut_ptr().cast::<u8>(),
                        n * size,
                    );
                    v.set_len(n);
                }
                return T::wrap(v);
            }
            T::wrap(bytes.chunks_exact(size).map(T::read_le).collect())
        }
        Ok(match dtype {
            DType::F32 => mk::<f32>(bytes, size),
            DType::F64 => mk::<f64>(bytes, size),
            DType::F16 => mk::<f16>(bytes, size),
            DType::BF16 => mk::<bf16>(bytes, size),
            DType::I8 => mk::<i8>(bytes, size),
            DType::I16 => mk::<i16>(bytes, size),
            DType::I32 => mk::<i32>(bytes, size),
            DType::I64 => mk::<i64>(bytes, size),
            DType::U8 => mk::<u8>(bytes, size),
            DType::U16 => mk::<u16>(bytes, size),
            DType::U32 => mk::<u32>(bytes, size),
            DType::U64 => mk::<u64>(bytes, size),
            DType::Bool => mk::<bool>(bytes, size),
        })
    }

    /// The elements encoded little-endian in `bytes`, for weights: used in place where the
    /// target is little-endian, the dtype is not bool and `bytes` is aligned for it (a
    /// memory-mapped model file: no copy, its pages shared with the page cache), else
    /// decoded once into a buffer that clones share ([`TensorData::into_shared`]). Errors
    /// as [`TensorData::from_le_bytes`].
    pub fn from_le_shared(dtype: DType, bytes: &bytes::Bytes) -> Result<TensorData, String> {
        match Self::mapped_le(dtype, bytes) {
            Some(d) => Ok(d),
            None => Ok(Self::from_le_bytes(dtype, bytes)?.into_shared()),
        }
    }

    /// [`TensorData::from_le_shared`]'s in-place case; `None` where the layout does not
    /// allow it.
    fn mapped_le(dtype: DType, bytes: &bytes::Bytes) -> Option<TensorData> {
        fn mk<T: Elem>(bytes: &bytes::Bytes) -> Option<TensorData> {
            let size = size_of::<T>();
            let ptr = bytes.as_ptr();
            if T::DTYPE == DType::Bool
                || cfg!(not(target_endian = "little"))
                || !bytes.len().is_multiple_of(size)
                || !(ptr as usize).is_multiple_of(align_of::<T>())
            {
                return None;
            }
            let owner: crate::buf::Owner = std::sync::Arc::new(bytes.clone());
            // SAFETY: `Bytes` never moves or changes its memory while a handle to it lives,
            // and the clone in `owner` is one; the pointer is aligned (checked), the length
            // is whole elements (checked), every bit pattern is a valid non-bool element
            // (machine numbers, `half`'s repr(transparent) u16 wrappers), and on a
            // little-endian target the encoding is the memory.
            let buf = unsafe { Buf::mapped(owner, ptr.cast::<T>(), bytes.len() / size) };
            Some(T::wrap_buf(buf))
        }
        match dtype {
            DType::F32 => mk::<f32>(bytes),
            DType::F64 => mk::<f64>(bytes),
            DType::F16 => mk::<f16>(bytes),
            DType::BF16 => mk::<bf16>(bytes),
            DType::I8 => mk::<i8>(bytes),
            DType::I16 => mk::<i16>(bytes),
            DType::I32 => mk::<i32>(bytes),
            DType::I64 => mk::<i64>(bytes),
            DType::U8 => mk::<u8>(bytes),
            DType::U16 => mk::<u16>(bytes),
            DType::U32 => mk::<u32>(bytes),
            DType::U64 => mk::<u64>(bytes),
            DType::Bool => None,
        }
    }

    /// The same elements, made read-only and shared by every clone (an owned `Vec` moves
    /// into an `Arc`, no copy): for weights, which a graph, its plan and its constants all
    /// hold. Shared and mapped elements stay as they are; a region is copied.
    pub fn into_shared(self) -> TensorData {
        dispatch!(self, v, T => match v.storage() {
            Storage::Mapped | Storage::Shared => <T as Elem>::wrap_buf(v),
            Storage::Owned | Storage::Region | Storage::Pooled => {
                <T as Elem>::wrap_buf(Buf::shared(std::sync::Arc::new(v.into_vec())))
            }
        })
    }

    /// A read-only view of these elements that copies nothing (a clone shares it).
    ///
    /// # Safety
    /// `self`'s elements must stay valid and unchanged for as long as the view or anything
    /// cloned from it lives.
    pub unsafe fn view(&self) -> TensorData {
        let owner: crate::buf::Owner = std::sync::Arc::new(());
        dispatch!(self, v, T => {
            let s = v.as_slice();
            // SAFETY: the caller keeps `self` alive and unchanged while the view lives.
            <T as Elem>::wrap_buf(unsafe { Buf::mapped(owner, s.as_ptr(), s.len()) })
        })
    }

    /// The bytes the elements occupy: `(address, length)`.
    pub fn byte_range(&self) -> (usize, usize) {
        dispatch!(self, v, T => (v.as_slice().as_ptr() as usize, std::mem::size_of_val(v.as_slice())))
    }

    /// An owned copy of the elements (never shared with `self`).
    pub fn deep_copy(&self) -> TensorData {
        dispatch!(self, v, T => <T as Elem>::wrap(v.as_slice().to_vec()))
    }

    /// Where the elements live (see [`Storage`]).
    pub fn storage(&self) -> Storage {
        dispatch!(self, v, T => v.storage())
    }

    /// Little-endian bytes of all elements: the buffer's own memory on a little-endian
    /// target (no copy), an encoded copy elsewhere.
    pub fn le_bytes(&self) -> std::borrow::Cow<'_, [u8]> {
        dispatch!(self, v, T => {
            let v: &[T] = &v[..];
            #[cfg(target_endian = "little")]
            {
                // SAFETY: every element type is plain data without padding (machine numbers,
                // `half`'s repr(transparent) u16 wrappers, bool's single 0/1 byte), so its
                // bytes are initialised and are its little-endian encoding here.
                std::borrow::Cow::Borrowed(unsafe {
                    std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), size_of_val(v))
                })
            }
            #[cfg(not(target_endian = "little"))]
            {
                let size = <T as Elem>::DTYPE.size();
                let mut out = vec![0u8; v.len() * size];
                for (c, &x) in out.chunks_exact_mut(size).zip(v.iter()) {
                    x.write_le(c);
                }
                std::borrow::Cow::Owned(out)
            }
        })
    }

    /// Little-endian bytes of all elements, copied (one `memcpy` on a little-endian target:
    /// pushing element by element took 177 µs for 1 MiB of f32).
    pub fn to_le_bytes(&self) -> Vec<u8> {
        self.le_bytes().into_owned()
    }

    /// All elements converted to f64.
    pub fn to_f64s(&self) -> Vec<f64> {
        dispatch!(self, v, T => v.iter().map(|&x| Elem::to_f64(x)).collect())
    }

    /// All elements converted to i64 (floats truncate).
    pub fn to_i64s(&self) -> Vec<i64> {
        dispatch!(self, v, T => v.iter().map(|&x| Elem::to_i64(x)).collect())
    }
}

/// A concrete tensor: row-major data of a known shape.
#[derive(Clone, Debug)]
pub struct Tensor {
    shape: Vec<usize>,
    data: TensorData,
}

/// Bitwise equality, so NaNs with the same bits compare equal (needed for round-trips).
impl PartialEq for Tensor {
    fn eq(&self, other: &Tensor) -> bool {
        self.shape == other.shape
            && self.dtype() == other.dtype()
            && self.data.to_le_bytes() == other.data.to_le_bytes()
    }
}

impl Tensor {
    /// Makes a tensor; errors if the element count does not match the shape.
    pub fn new(shape: Vec<usize>, data: TensorData) -> Result<Tensor, String> {
        let n = numel(&shape);
        if n != data.len() {
            return Err(format!(
                "shape {shape:?} needs {n} elements but the data has {}",
                data.len()
            ));
        }
        Ok(Tensor { shape, data })
    }

    /// Makes a tensor from a typed vector; panics if the element count is wrong, so use
    /// it only where the count is computed from the shape.
    pub fn from_vec<T: Elem>(shape: Vec<usize>, v: Vec<T>) -> Tensor {
        assert_eq!(numel(&shape), v.len(), "Tensor::from_vec: element count");
        Tensor {
            shape,
            data: T::wrap(v),
        }
    }

    /// Makes a tensor from a typed buffer; panics if the element count is wrong, so use
    /// it only where the count is computed from the shape.
    pub fn from_buf<T: Elem>(shape: Vec<usize>, b: Buf<T>) -> Tensor {
        assert_eq!(numel(&shape), b.len(), "Tensor::from_buf: element count");
        Tensor {
            shape,
            data: T::wrap_buf(b),
        }
    }

    /// A rank-0 tensor.
    pub fn scalar<T: Elem>(x: T) -> Tensor {
        Tensor {
            shape: vec![],
            data: T::wrap(vec![x]),
        }
    }

    /// A tensor of zeros.
    pub fn zeros(dtype: DType, shape: Vec<usize>) -> Tensor {
        let n = numel(&shape);
        Tensor {
            shape,
            data: TensorData::zeros(dtype, n),
        }
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The rank.
    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// The element count.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// True if the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }

    /// The typed buffer.
    pub fn data(&self) -> &TensorData {
        &self.data
    }

    /// Takes the typed buffer.
    pub fn into_data(self) -> TensorData {
        self.data
    }

    /// The elements as a typed slice, if the dtype matches.
    pub fn as_slice<T: Elem>(&self) -> Option<&[T]> {
        T::unwrap(&self.data).map(|v| v.as_slice())
    }

    /// The elements as a mutable slice if the dtype is `T`: mapped or shared elements are
    /// copied into an owned `Vec` first (see [`Buf::as_mut_slice`]), so writing never
    /// changes another tensor.
    pub fn as_mut_slice<T: Elem>(&mut self) -> Option<&mut [T]> {
        T::unwrap_mut(&mut self.data).map(|v| v.as_mut_slice())
    }

    /// The same tensor with its elements shared by every clone ([`TensorData::into_shared`]:
    /// no copy): what a constant node holds, so evaluating it or folding it never copies a
    /// weight.
    pub fn into_shared(self) -> Tensor {
        Tensor {
            shape: self.shape,
            data: self.data.into_shared(),
        }
    }

    /// The same data with a new shape of equal element count.
    pub fn reshaped(self, shape: Vec<usize>) -> Result<Tensor, String> {
        Tensor::new(shape, self.data)
    }

    /// Converts elements to `dtype` (ONNX Cast semantics: floats to ints truncate toward
    /// zero, anything to bool is `x != 0`).
    pub fn cast(&self, dtype: DType) -> Tensor {
        if dtype == self.dtype() {
            return self.clone();
        }
        let data = if self.dtype().is_float() || dtype.is_float() {
            TensorData::from_f64s(dtype, self.data.to_f64s().into_iter())
        } else if dtype == DType::Bool {
            TensorData::Bool(self.data.to_i64s().into_iter().map(|x| x != 0).collect())
        } else if matches!(self.data, TensorData::U64(_)) {
            // u64 above i64::MAX must not go through i64's sign.
            let v = u64::unwrap(&self.data).expect("u64");
            TensorData::from_i64s(dtype, v.iter().map(|&x| x as i64))
        } else {
            TensorData::from_i64s(dtype, self.data.to_i64s().into_iter())
        };
        Tensor {
            shape: self.shape.clone(),
            data,
        }
    }

    /// All elements as f64.
    pub fn to_f64s(&self) -> Vec<f64> {
        self.data.to_f64s()
    }

    /// All elements as i64 (floats truncate).
    pub fn to_i64s(&self) -> Vec<i64> {
        self.data.to_i64s()
    }
}

/// The element count of a shape.
pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Row-major strides (in elements) of a shape.
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cast_truncates_floats_and_maps_nonzero_to_true() {
        let t = Tensor::from_vec(vec![3], vec![-1.7f32, 0.0, 2.9]);
        assert_eq!(t.cast(DType::I64).to_i64s(), vec![-1, 0, 2]);
        assert_eq!(
            t.cast(DType::Bool).as_slice::<bool>().unwrap(),
            &[true, false, true]
        );
    }

    #[test]
    fn le_bytes_round_trip_every_dtype() {
        for dt in DType::ALL {
            let d = TensorData::from_f64s(dt, [0.0, 1.0, 2.0].into_iter());
            let back = TensorData::from_le_bytes(dt, &d.to_le_bytes()).unwrap();
            assert_eq!(back.to_f64s(), d.to_f64s(), "{dt}");
        }
        assert!(TensorData::from_le_bytes(DType::F32, &[0; 5]).is_err());
    }

    #[test]
    fn le_bytes_are_the_little_endian_encoding() {
        let d = TensorData::F32(vec![1.0, -2.5].into());
        assert_eq!(d.le_bytes().as_ref(), &[0, 0, 0x80, 0x3f, 0, 0, 0x20, 0xc0]);
        #[cfg(target_endian = "little")]
        assert!(matches!(d.le_bytes(), std::borrow::Cow::Borrowed(_)));
        let back = TensorData::from_le_bytes(DType::I16, &[0x01, 0x02, 0xff, 0xff]).unwrap();
        assert_eq!(back.to_i64s(), vec![0x0201, -1]);
        // Bool bytes other than 0 and 1 are read as true, never reinterpreted.
        let b = TensorData::from_le_bytes(DType::Bool, &[0, 1, 7]).unwrap();
        assert_eq!(b.to_i64s(), vec![0, 1, 1]);
    }
}
