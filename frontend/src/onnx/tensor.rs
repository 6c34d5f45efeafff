//! ONNX `TensorProto` to and from kiln [`Tensor`]s: every kiln dtype, from `raw_data`,
//! the typed repeated fields, or external data files (memory-mapped, confined to the
//! model's folder). Sizes are checked before anything is allocated.

use super::proto::{TensorProto, DATA_LOCATION_EXTERNAL};
use super::OnnxError;
use half::{bf16, f16};
use kiln_ir::{DType, Tensor, TensorData};
use std::path::{Component, Path};

fn err(t: &TensorProto, msg: impl Into<String>) -> OnnxError {
    OnnxError::Tensor {
        tensor: t.name.clone(),
        msg: msg.into(),
    }
}

/// The name ONNX gives a data type code, for messages.
pub(crate) fn onnx_type_name(code: i32) -> &'static str {
    match code {
        0 => "UNDEFINED",
        8 => "STRING",
        14 => "COMPLEX64",
        15 => "COMPLEX128",
        17..=20 => "FLOAT8",
        21 | 22 | 25 | 26 => "sub-byte integer",
        23 => "FLOAT4E2M1",
        24 => "FLOAT8E8M0",
        _ => "unknown",
    }
}

/// The kiln dtype of an ONNX data type code, or an error naming `what()` and the code.
pub(crate) fn dtype_of(code: i32, what: impl FnOnce() -> String) -> Result<DType, OnnxError> {
    DType::from_onnx_code(code).ok_or_else(|| OnnxError::UnsupportedDtype { what: what(), code })
}

/// The shape of a tensor proto, checked: no negative dims, no overflowing element count.
/// Returns the shape and the element count.
pub(crate) fn checked_shape(dims: &[i64]) -> Result<(Vec<usize>, usize), String> {
    let mut shape = Vec::with_capacity(dims.len());
    let mut n: usize = 1;
    for &d in dims {
        let u = usize::try_from(d).map_err(|_| format!("negative dimension {d} in {dims:?}"))?;
        n = n
            .checked_mul(u)
            .ok_or_else(|| format!("element count of shape {dims:?} overflows"))?;
        shape.push(u);
    }
    Ok((shape, n))
}

/// Converts a tensor proto. `base_dir` is the folder external data is relative to.
pub fn tensor_from_proto(t: &TensorProto, base_dir: Option<&Path>) -> Result<Tensor, OnnxError> {
    let dtype = dtype_of(t.data_type, || format!("tensor `{}`", t.name))?;
    let (shape, n) = checked_shape(&t.dims).map_err(|m| err(t, m))?;
    if t.segment.is_some() {
        return Err(err(t, "segmented tensors are not supported"));
    }
    let nbytes = n
        .checked_mul(dtype.size())
        .ok_or_else(|| err(t, format!("byte size of shape {:?} overflows", t.dims)))?;
    let data = if t.data_location == DATA_LOCATION_EXTERNAL {
        let bytes = read_external(t, base_dir, nbytes)?;
        from_bytes(t, dtype, &bytes, nbytes)?
    } else if !t.raw_data.is_empty() || nbytes == 0 && typed_len(t) == 0 {
        from_bytes(t, dtype, &t.raw_data, nbytes)?
    } else {
        from_typed(t, dtype, n)?
    };
    // A copied weight is shared from here on: the graph, its plan and their clones hold
    // one copy, not one each.
    Tensor::new(shape, data.into_shared()).map_err(|m| err(t, m))
}

/// The elements in `bytes`: used in place (in the memory-mapped file) where the layout
/// allows ([`TensorData::from_le_shared`]: aligned, little-endian, not bool), else copied
/// once into a buffer its clones share.
fn from_bytes(
    t: &TensorProto,
    dtype: DType,
    bytes: &bytes::Bytes,
    nbytes: usize,
) -> Result<TensorData, OnnxError> {
    if bytes.len() != nbytes {
        return Err(err(
            t,
            format!(
                "shape {:?} of {dtype} needs {nbytes} bytes but the data has {}",
                t.dims,
                bytes.len()
            ),
        ));
    }
    TensorData::from_le_shared(dtype, bytes).map_err(|m| err(t, m))
}

fn typed_len(t: &TensorProto) -> usize {
    t.float_data.len()
        + t.int32_data.len()
        + t.int64_data.len()
        + t.double_data.len()
        + t.uint64_data.len()
        + t.string_data.len()
}

/// Reads the typed repeated field that ONNX uses for `dtype`.
fn from_typed(t: &TensorProto, dtype: DType, n: usize) -> Result<TensorData, OnnxError> {
    let (field, len) = match dtype {
        DType::F32 => ("float_data", t.float_data.len()),
        DType::F64 => ("double_data", t.double_data.len()),
        DType::I64 => ("int64_data", t.int64_data.len()),
        DType::U32 | DType::U64 => ("uint64_data", t.uint64_data.len()),
        _ => ("int32_data", t.int32_data.len()),
    };
    if len != n {
        return Err(err(
            t,
            format!(
                "shape {:?} needs {n} elements but {field} has {len}",
                t.dims
            ),
        ));
    }
    let i32s = || t.int32_data.iter();
    Ok(match dtype {
        DType::F32 => TensorData::F32(t.float_data.clone().into()),
        DType::F64 => TensorData::F64(t.double_data.clone().into()),
        DType::I64 => TensorData::I64(t.int64_data.clone().into()),
        DType::U64 => TensorData::U64(t.uint64_data.clone().into()),
        DType::U32 => TensorData::U32(t.uint64_data.iter().map(|&x| x as u32).collect()),
        DType::I32 => TensorData::I32(t.int32_data.clone().into()),
        DType::I16 => TensorData::I16(i32s().map(|&x| x as i16).collect()),
        DType::I8 => TensorData::I8(i32s().map(|&x| x as i8).collect()),
        DType::U16 => TensorData::U16(i32s().map(|&x| x as u16).collect()),
        DType::U8 => TensorData::U8(i32s().map(|&x| x as u8).collect()),
        DType::Bool => TensorData::Bool(i32s().map(|&x| x != 0).collect()),
        // Half types are stored as their 16-bit patterns.
        DType::F16 => TensorData::F16(i32s().map(|&x| f16::from_bits(x as u16)).collect()),
        DType::BF16 => TensorData::BF16(i32s().map(|&x| bf16::from_bits(x as u16)).collect()),
    })
}

/// Checks an external data location: relative, and never leaving the model's folder.
pub(crate) fn safe_location(location: &str) -> Result<(), &'static str> {
    let p = Path::new(location);
    if location.is_empty() {
        return Err("the location is empty");
    }
    for c in p.components() {
        match c {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => return Err("the location escapes the model's folder"),
            Component::RootDir | Component::Prefix(_) => {
                return Err("the location must be relative to the model's folder")
            }
        }
    }
    Ok(())
}

/// Reads `length` bytes at `offset` of the external file (default: the tensor's size).
fn read_external(
    t: &TensorProto,
    base_dir: Option<&Path>,
    nbytes: usize,
) -> Result<bytes::Bytes, OnnxError> {
    let mut location = None;
    let mut offset = 0usize;
    let mut length = None;
    let e = |path: &str, msg: String| OnnxError::ExternalData {
        tensor: t.name.clone(),
        path: path.to_string(),
        msg,
    };
    for kv in &t.external_data {
        let num = |v: &str| v.trim().parse::<usize>();
        match kv.key.as_str() {
            "location" => location = Some(kv.value.as_str()),
            "offset" => {
                offset = num(&kv.value).map_err(|_| e("", format!("bad offset `{}`", kv.value)))?
            }
            "length" => {
                length =
                    Some(num(&kv.value).map_err(|_| e("", format!("bad length `{}`", kv.value)))?)
            }
            _ => {}
        }
    }
    let location = location.ok_or_else(|| e("", "no `location` key".into()))?;
    safe_location(location).map_err(|m| e(location, m.into()))?;
    let base = base_dir.ok_or_else(|| {
        e(
            location,
            "the model was loaded from bytes without a folder to resolve it in".into(),
        )
    })?;
    let path = base.join(location);
    let file = super::map_file(&path).map_err(|er| e(location, er.to_string()))?;
    let length = length.unwrap_or(nbytes);
    let end = offset
        .checked_add(length)
        .filter(|&end| end <= file.len())
        .ok_or_else(|| {
            e(
                location,
                format!(
                    "bytes {offset}..+{length} are outside the file ({} bytes)",
                    file.len()
                ),
            )
        })?;
    Ok(file.slice(offset..end))
}

/// Converts a tensor to a proto with `raw_data` (how onnx itself writes initializers).
pub fn tensor_to_proto(name: &str, t: &Tensor) -> TensorProto {
    TensorProto {
        dims: t.shape().iter().map(|&d| d as i64).collect(),
        data_type: t.dtype().onnx_code(),
        name: name.to_string(),
        raw_data: t.data().to_le_bytes().into(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_outside_the_folder_are_rejected() {
        assert!(safe_location("weights.bin").is_ok());
        assert!(safe_location("./sub/weights.bin").is_ok());
        assert!(safe_location("../weights.bin").is_err());
        assert!(safe_location("sub/../../x").is_err());
        assert!(safe_location("/etc/passwd").is_err());
        assert!(safe_location("").is_err());
    }

    #[test]
    fn typed_fields_decode_half_types_from_bit_patterns() {
        let t = TensorProto {
            dims: vec![2],
            data_type: DType::F16.onnx_code(),
            int32_data: vec![0x3c00, 0xc000],
            ..Default::default()
        };
        let x = tensor_from_proto(&t, None).unwrap();
        assert_eq!(x.to_f64s(), vec![1.0, -2.0]);
    }
}
