//! Single-tensor files: ONNX `TensorProto` `.pb` files (the ONNX test-data format) and
//! numpy `.npy` files (format versions 1.0, 2.0 and 3.0, little-endian, C order).
//!
//! numpy has no bfloat16: kiln writes bf16 as `<V2` (two raw bytes, as `ml_dtypes` arrays
//! are saved) and reads `V2` back as bf16.

use crate::onnx::{proto::TensorProto, tensor_from_proto, tensor_to_proto, OnnxError};
use kiln_ir::{DType, Tensor, TensorData};
use prost::Message;
use std::path::{Path, PathBuf};

/// Reading or writing a tensor file failed.
#[derive(Debug, thiserror::Error)]
pub enum TensorIoError {
    /// The file could not be read or written.
    #[error("`{path}`: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The `.pb` bytes are not a TensorProto, or the tensor in it is malformed.
    #[error(transparent)]
    Onnx(#[from] OnnxError),
    /// The `.npy` file is malformed or uses a layout kiln does not read.
    #[error("npy: {0}")]
    Npy(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TensorIoError + '_ {
    move |source| TensorIoError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn npy(msg: impl Into<String>) -> TensorIoError {
    TensorIoError::Npy(msg.into())
}

// ---- .pb ------------------------------------------------------------------------------

/// Reads a `.pb` file holding one `TensorProto`: its name and the tensor.
pub fn read_tensor_pb(path: &Path) -> Result<(String, Tensor), TensorIoError> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    read_tensor_pb_bytes(&bytes, path.parent())
}

/// Decodes one `TensorProto`; `base_dir` resolves external data, if any.
pub fn read_tensor_pb_bytes(
    bytes: &[u8],
    base_dir: Option<&Path>,
) -> Result<(String, Tensor), TensorIoError> {
    let t = TensorProto::decode(bytes).map_err(|err| OnnxError::Decode {
        what: "TensorProto",
        err,
    })?;
    let tensor = tensor_from_proto(&t, base_dir)?;
    Ok((t.name, tensor))
}

/// Encodes a tensor as a `TensorProto` with `raw_data`.
pub fn write_tensor_pb_bytes(name: &str, t: &Tensor) -> Vec<u8> {
    tensor_to_proto(name, t).encode_to_vec()
}

/// Writes a `.pb` file holding one `TensorProto`.
pub fn write_tensor_pb(path: &Path, name: &str, t: &Tensor) -> Result<(), TensorIoError> {
    std::fs::write(path, write_tensor_pb_bytes(name, t)).map_err(io_err(path))
}

// ---- .npy -----------------------------------------------------------------------------

const MAGIC: &[u8; 6] = b"\x93NUMPY";

/// The numpy `descr` kiln writes for a dtype.
fn descr(dt: DType) -> &'static str {
    match dt {
        DType::F32 => "<f4",
        DType::F64 => "<f8",
        DType::F16 => "<f2",
        DType::BF16 => "<V2",
        DType::I8 => "|i1",
        DType::I16 => "<i2",
        DType::I32 => "<i4",
        DType::I64 => "<i8",
        DType::U8 => "|u1",
        DType::U16 => "<u2",
        DType::U32 => "<u4",
        DType::U64 => "<u8",
        DType::Bool => "|b1",
    }
}

/// The dtype of a numpy `descr`; little-endian (`<`), native (`=`) or byte-order-free
/// (`|`) only.
fn parse_descr(d: &str) -> Result<DType, TensorIoError> {
    let (order, kind) = match d.chars().next() {
        Some(c @ ('<' | '>' | '=' | '|')) => (c, &d[1..]),
        _ => ('=', d),
    };
    let dt = match kind {
        "f4" => DType::F32,
        "f8" => DType::F64,
        "f2" | "e" => DType::F16,
        "V2" => DType::BF16,
        "i1" | "b" => DType::I8,
        "i2" => DType::I16,
        "i4" => DType::I32,
        "i8" => DType::I64,
        "u1" | "B" => DType::U8,
        "u2" => DType::U16,
        "u4" => DType::U32,
        "u8" => DType::U64,
        "b1" | "?" => DType::Bool,
        _ => return Err(npy(format!("unsupported dtype descr `{d}`"))),
    };
    if order == '>' && dt.size() > 1 {
        return Err(npy(format!("big-endian data (`{d}`) is not supported")));
    }
    if order == '=' && cfg!(target_endian = "big") && dt.size() > 1 {
        return Err(npy(format!(
            "native-order data (`{d}`) on a big-endian host"
        )));
    }
    Ok(dt)
}

/// A value in the header dict.
#[derive(Debug, PartialEq)]
enum PyVal {
    Str(String),
    Bool(bool),
    Tuple(Vec<u64>),
}

/// Parses the header, a Python dict literal such as
/// `{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }`.
fn parse_header(h: &str) -> Result<Vec<(String, PyVal)>, TensorIoError> {
    let bad = |what: &str| npy(format!("malformed header ({what}): {h:?}"));
    let mut p = h.trim().chars().peekable();
    let skip_ws = |p: &mut std::iter::Peekable<std::str::Chars<'_>>| {
        while p.peek().is_some_and(|c| c.is_whitespace()) {
            p.next();
        }
    };
    let string = |p: &mut std::iter::Peekable<std::str::Chars<'_>>| -> Option<String> {
        let q = p.next().filter(|&c| c == '\'' || c == '"')?;
        let mut s = String::new();
        loop {
            match p.next()? {
                c if c == q => return Some(s),
                c => s.push(c),
            }
        }
    };
    if p.next() != Some('{') {
        return Err(bad("expected `{`"));
    }
    let mut out = vec![];
    loop {
        skip_ws(&mut p);
        if p.peek() == Some(&'}') {
            p.next();
            break;
        }
        let key = string(&mut p).ok_or_else(|| bad("expected a quoted key"))?;
        skip_ws(&mut p);
        if p.next() != Some(':') {
            return Err(bad("expected `:`"));
        }
        skip_ws(&mut p);
        let val = match p.peek() {
            Some('\'' | '"') => {
                PyVal::Str(string(&mut p).ok_or_else(|| bad("unterminated string"))?)
            }
            Some('(') => {
                p.next();
                let mut dims = vec![];
                loop {
                    skip_ws(&mut p);
                    match p.peek() {
                        Some(')') => {
                            p.next();
                            break;
                        }
                        Some(',') => {
                            p.next();
                        }
                        Some(c) if c.is_ascii_digit() => {
                            let mut n: u64 = 0;
                            while let Some(d) = p.peek().and_then(|c| c.to_digit(10)) {
                                n = n
                                    .checked_mul(10)
                                    .and_then(|n| n.checked_add(d as u64))
                                    .ok_or_else(|| bad("dimension overflows"))?;
                                p.next();
                            }
                            // Python 2 era files may write `3L`.
                            if p.peek() == Some(&'L') {
                                p.next();
                            }
                            dims.push(n);
                        }
                        _ => return Err(bad("bad shape tuple")),
                    }
                }
                PyVal::Tuple(dims)
            }
            _ => {
                let word: String =
                    std::iter::from_fn(|| p.next_if(|c| c.is_alphabetic())).collect();
                match word.as_str() {
                    "True" => PyVal::Bool(true),
                    "False" => PyVal::Bool(false),
                    _ => return Err(bad("expected a string, a tuple, True or False")),
                }
            }
        };
        out.push((key, val));
        skip_ws(&mut p);
        match p.next() {
            Some(',') => {}
            Some('}') => break,
            _ => return Err(bad("expected `,` or `}`")),
        }
    }
    skip_ws(&mut p);
    if p.next().is_some() {
        return Err(bad("text after the dict"));
    }
    Ok(out)
}

/// Reads a `.npy` file.
pub fn read_npy(path: &Path) -> Result<Tensor, TensorIoError> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    read_npy_bytes(&bytes)
}

/// Decodes the bytes of a `.npy` file.
pub fn read_npy_bytes(b: &[u8]) -> Result<Tensor, TensorIoError> {
    let (dt, dims, start) = npy_layout(b)?;
    let data = TensorData::from_le_bytes(dt, &b[start..]).map_err(npy)?;
    Tensor::new(dims, data).map_err(npy)
}

/// Decodes a `.npy` file held in shared bytes (a mapped file): the elements are used in
/// place when aligned for their type, copied once otherwise.
pub fn read_npy_shared(b: &bytes::Bytes) -> Result<Tensor, TensorIoError> {
    let (dt, dims, start) = npy_layout(b)?;
    let data = TensorData::from_le_shared(dt, &b.slice(start..)).map_err(npy)?;
    Tensor::new(dims, data).map_err(npy)
}

/// A `.npy` file's dtype, dims and where its data starts (checked to be exactly the bytes
/// the shape needs).
fn npy_layout(b: &[u8]) -> Result<(DType, Vec<usize>, usize), TensorIoError> {
    if b.len() < 10 || &b[..6] != MAGIC {
        return Err(npy("not an npy file (bad magic)"));
    }
    let (major, minor) = (b[6], b[7]);
    let (hlen, start): (usize, usize) = match major {
        1 => (u16::from_le_bytes([b[8], b[9]]) as usize, 10),
        2 | 3 => {
            let l = b.get(8..12).ok_or_else(|| npy("truncated header length"))?;
            (u32::from_le_bytes([l[0], l[1], l[2], l[3]]) as usize, 12)
        }
        _ => return Err(npy(format!("unsupported format version {major}.{minor}"))),
    };
    let end = start
        .checked_add(hlen)
        .filter(|&e| e <= b.len())
        .ok_or_else(|| npy(format!("header of {hlen} bytes is longer than the file")))?;
    let header = std::str::from_utf8(&b[start..end]).map_err(|_| npy("header is not text"))?;
    let mut descr_s = None;
    let mut fortran = None;
    let mut shape = None;
    for (k, v) in parse_header(header)? {
        match (k.as_str(), v) {
            ("descr", PyVal::Str(s)) => descr_s = Some(s),
            ("fortran_order", PyVal::Bool(f)) => fortran = Some(f),
            ("shape", PyVal::Tuple(t)) => shape = Some(t),
            (k, v) => return Err(npy(format!("unexpected header entry `{k}`: {v:?}"))),
        }
    }
    let descr_s = descr_s.ok_or_else(|| npy("header has no `descr`"))?;
    let shape = shape.ok_or_else(|| npy("header has no `shape`"))?;
    if fortran.ok_or_else(|| npy("header has no `fortran_order`"))? {
        return Err(npy(
            "fortran_order=True (column-major) arrays are not supported; save a C-order array",
        ));
    }
    let dt = parse_descr(&descr_s)?;
    let mut dims = Vec::with_capacity(shape.len());
    let mut n: usize = 1;
    for &d in &shape {
        let d = usize::try_from(d).map_err(|_| npy(format!("dimension {d} is too large")))?;
        n = n
            .checked_mul(d)
            .ok_or_else(|| npy(format!("element count of shape {shape:?} overflows")))?;
        dims.push(d);
    }
    let nbytes = n
        .checked_mul(dt.size())
        .ok_or_else(|| npy(format!("byte size of shape {shape:?} overflows")))?;
    let data = &b[end..];
    if data.len() != nbytes {
        return Err(npy(format!(
            "shape {shape:?} of {dt} needs {nbytes} data bytes, the file has {}",
            data.len()
        )));
    }
    Ok((dt, dims, end))
}

/// Encodes a tensor as `.npy` bytes (version 1.0, or 2.0 for very long headers).
pub fn write_npy_bytes(t: &Tensor) -> Vec<u8> {
    let shape = match t.shape() {
        [] => "()".to_string(),
        [d] => format!("({d},)"),
        s => format!(
            "({})",
            s.iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': {shape}, }}",
        descr(t.dtype())
    );
    // Pad with spaces so the data starts on a 64-byte boundary; end with a newline.
    let v1 = header.len() + 1 + 10 <= u16::MAX as usize;
    let prefix = if v1 { 10 } else { 12 };
    let total = (prefix + header.len() + 1).div_ceil(64) * 64;
    while prefix + header.len() + 1 < total {
        header.push(' ');
    }
    header.push('\n');
    let data = t.data().to_le_bytes();
    let mut out = Vec::with_capacity(total + data.len());
    out.extend_from_slice(MAGIC);
    if v1 {
        out.extend_from_slice(&[1, 0]);
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    } else {
        out.extend_from_slice(&[2, 0]);
        out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    }
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&data);
    out
}

/// Writes a `.npy` file.
pub fn write_npy(path: &Path, t: &Tensor) -> Result<(), TensorIoError> {
    std::fs::write(path, write_npy_bytes(t)).map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_parser_reads_numpy_dicts() {
        let h = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }   \n";
        let v = parse_header(h).unwrap();
        assert_eq!(v[0], ("descr".into(), PyVal::Str("<f4".into())));
        assert_eq!(v[1], ("fortran_order".into(), PyVal::Bool(false)));
        assert_eq!(v[2], ("shape".into(), PyVal::Tuple(vec![2, 3])));
        assert_eq!(
            parse_header("{'shape': ()}").unwrap()[0].1,
            PyVal::Tuple(vec![])
        );
        for bad in [
            "",
            "{",
            "{'a'",
            "{'a': }",
            "{'a': (1,",
            "{'a': 1}",
            "{'a': 'x' 'b'}",
            "{} x",
        ] {
            assert!(parse_header(bad).is_err(), "{bad:?}");
        }
    }
}
