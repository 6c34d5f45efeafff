//! Weights files of the text form: the `file("w.safetensors", "name")` and `file("w.npy")`
//! tensors a `.kir` model names. They are memory-mapped and used in place where aligned
//! (copied once otherwise), like ONNX external data, and under the same path rule:
//! relative, never leaving the model's folder. Also writes a safetensors file for
//! `kiln convert --weights`.

use crate::onnx::{map_file, safe_location};
use bytes::Bytes;
use kiln_ir::text::ExternalRef;
use kiln_ir::{Attr, Graph, OpKind};
use kiln_ir::{DType, Tensor, TensorData};
use safetensors::{Dtype, SafeTensors, View};
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Constants with more elements than this go to the weights file; smaller ones (shape
/// arithmetic, scalars) stay readable in the text.
pub const INLINE_MAX_ELEMS: usize = 16;

/// The safetensors dtype of a kiln dtype.
fn st_dtype(d: DType) -> Dtype {
    match d {
        DType::F32 => Dtype::F32,
        DType::F64 => Dtype::F64,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
        DType::I8 => Dtype::I8,
        DType::I16 => Dtype::I16,
        DType::I32 => Dtype::I32,
        DType::I64 => Dtype::I64,
        DType::U8 => Dtype::U8,
        DType::U16 => Dtype::U16,
        DType::U32 => Dtype::U32,
        DType::U64 => Dtype::U64,
        DType::Bool => Dtype::BOOL,
    }
}

/// The kiln dtype of a safetensors dtype, if kiln has it.
fn kiln_dtype(d: Dtype) -> Option<DType> {
    DType::ALL.into_iter().find(|&k| st_dtype(k) == d)
}

/// Reads the weights files a `.kir` model in `base_dir` names. Each file is mapped once.
pub struct WeightsReader {
    base_dir: Option<PathBuf>,
    files: HashMap<String, Bytes>,
}

impl WeightsReader {
    /// A reader resolving names in `base_dir` (the model's folder); `None` for a model
    /// given as bytes, which then may name no weights file.
    pub fn new(base_dir: Option<&Path>) -> WeightsReader {
        WeightsReader {
            base_dir: base_dir.map(Path::to_path_buf),
            files: HashMap::new(),
        }
    }

    fn file(&mut self, name: &str) -> Result<Bytes, String> {
        if let Some(b) = self.files.get(name) {
            return Ok(b.clone());
        }
        safe_location(name).map_err(|m| format!("weights file `{name}`: {m}"))?;
        let base = self.base_dir.as_ref().ok_or_else(|| {
            format!("weights file `{name}`: the model was given as bytes, without a folder to find it in")
        })?;
        let bytes = map_file(&base.join(name)).map_err(|e| format!("weights file: {e}"))?;
        self.files.insert(name.to_string(), bytes.clone());
        Ok(bytes)
    }

    /// The tensor `r` names, checked against the dtype and shape the text declares.
    pub fn read(
        &mut self,
        r: &ExternalRef,
        dtype: DType,
        shape: &[usize],
    ) -> Result<Tensor, String> {
        let bytes = self.file(&r.file)?;
        let t = match &r.key {
            Some(key) => {
                safetensors_tensor(&bytes, key).map_err(|m| format!("`{}`: {m}", r.file))?
            }
            None => {
                if !r.file.ends_with(".npy") {
                    return Err(format!(
                        "`{}`: name the tensor, as in file(\"{}\", \"name\") (only an .npy file holds one unnamed tensor)",
                        r.file, r.file
                    ));
                }
                crate::tensor_io::read_npy_shared(&bytes)
                    .map_err(|e| format!("`{}`: {e}", r.file))?
            }
        };
        if t.dtype() != dtype || t.shape() != shape {
            let what = r
                .key
                .as_deref()
                .map(|k| format!(" tensor `{k}`"))
                .unwrap_or_default();
            return Err(format!(
                "`{}`{what} is {}{:?}, the text declares {dtype}{shape:?}",
                r.file,
                t.dtype(),
                t.shape()
            ));
        }
        Ok(t)
    }
}

/// Tensor `key` of a safetensors file, its elements used in place when aligned.
fn safetensors_tensor(bytes: &Bytes, key: &str) -> Result<Tensor, String> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| format!("not a valid safetensors file: {e}"))?;
    let view = st.tensor(key).map_err(|_| {
        let mut names = st.names();
        names.sort_unstable();
        let shown: Vec<&str> = names.iter().take(8).copied().collect();
        format!(
            "no tensor `{key}` (it has {}: {}{})",
            names.len(),
            shown.join(", "),
            if names.len() > shown.len() {
                ", ..."
            } else {
                ""
            }
        )
    })?;
    let dtype = kiln_dtype(view.dtype()).ok_or_else(|| {
        format!(
            "tensor `{key}` has dtype {:?}, which kiln does not have",
            view.dtype()
        )
    })?;
    let data = view.data();
    // The view borrows `bytes`: find its range to slice the shared mapping.
    let start = (data.as_ptr() as usize)
        .checked_sub(bytes.as_ptr() as usize)
        .filter(|&s| s + data.len() <= bytes.len())
        .ok_or_else(|| format!("tensor `{key}`: its data is not inside the file"))?;
    let shared = bytes.slice(start..start + data.len());
    let elems =
        TensorData::from_le_shared(dtype, &shared).map_err(|m| format!("tensor `{key}`: {m}"))?;
    Tensor::new(view.shape().to_vec(), elems).map_err(|m| format!("tensor `{key}`: {m}"))
}

/// Every tensor of a safetensors file (held in `bytes`), sorted by name: what a fuzz
/// target and the tests read untrusted files with.
pub fn read_safetensors(bytes: &Bytes) -> Result<Vec<(String, Tensor)>, String> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| format!("not a valid safetensors file: {e}"))?;
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort_unstable();
    names
        .into_iter()
        .map(|n| safetensors_tensor(bytes, &n).map(|t| (n, t)))
        .collect()
}

/// A tensor as safetensors writes it.
struct Entry<'a>(&'a Tensor);

impl View for Entry<'_> {
    fn dtype(&self) -> Dtype {
        st_dtype(self.0.dtype())
    }
    fn shape(&self) -> &[usize] {
        self.0.shape()
    }
    fn data(&self) -> Cow<'_, [u8]> {
        self.0.data().le_bytes()
    }
    fn data_len(&self) -> usize {
        self.0.len() * self.0.dtype().size()
    }
}

/// Writes `tensors` (name, tensor) as a safetensors file.
pub fn write_safetensors(path: &Path, tensors: &[(String, &Tensor)]) -> Result<(), String> {
    let entries = tensors.iter().map(|(n, t)| (n.as_str(), Entry(t)));
    safetensors::serialize_to_file(entries, None, path)
        .map_err(|e| format!("writing {}: {e}", path.display()))
}

/// The text with every constant larger than [`INLINE_MAX_ELEMS`] named in `file`, and
/// those tensors by key. A constant's key is its value's name; a tensor shared by several
/// constants is stored once.
pub fn externalised(g: &Graph, file: &str) -> (String, Vec<(String, Arc<Tensor>)>) {
    let mut names: HashMap<*const Tensor, String> = HashMap::new();
    collect_names(g, &mut names);
    let mut keys: HashMap<*const Tensor, String> = HashMap::new();
    let mut used: HashSet<String> = HashSet::new();
    let mut stored: Vec<(String, Arc<Tensor>)> = vec![];
    let mut all: HashMap<*const Tensor, Arc<Tensor>> = HashMap::new();
    collect_tensors(g, &mut all);
    let text = kiln_ir::text::print_with(g, &mut |t: &Tensor| {
        if t.len() <= INLINE_MAX_ELEMS {
            return None;
        }
        let p = t as *const Tensor;
        let key = keys.entry(p).or_insert_with(|| {
            let base = names.get(&p).cloned().unwrap_or_else(|| "tensor".into());
            let mut key = base.clone();
            let mut n = 1;
            while !used.insert(key.clone()) {
                key = format!("{base}.{n}");
                n += 1;
            }
            let arc = all.get(&p).cloned().unwrap_or_else(|| Arc::new(t.clone()));
            stored.push((key.clone(), arc));
            key
        });
        Some(kiln_ir::text::ExternalRef {
            file: file.to_string(),
            key: Some(key.clone()),
        })
    });
    (text, stored)
}

/// Each constant's tensor → the name of the value it defines (top-level graph first).
fn collect_names(g: &Graph, out: &mut HashMap<*const Tensor, String>) {
    for n in &g.nodes {
        for a in n.attrs.0.values() {
            match a {
                Attr::Tensor(t) if n.op == OpKind::Constant => {
                    if let Some(&o) = n.outputs.first() {
                        out.entry(Arc::as_ptr(t))
                            .or_insert_with(|| g.value(o).name.clone());
                    }
                }
                Attr::Graph(sub) => collect_names(sub, out),
                _ => {}
            }
        }
    }
}

/// Every tensor attribute's `Arc`, so the weights file is written without copies.
fn collect_tensors(g: &Graph, out: &mut HashMap<*const Tensor, Arc<Tensor>>) {
    for n in &g.nodes {
        for a in n.attrs.0.values() {
            match a {
                Attr::Tensor(t) => {
                    out.entry(Arc::as_ptr(t)).or_insert_with(|| t.clone());
                }
                Attr::Graph(sub) => collect_tensors(sub, out),
                _ => {}
            }
        }
    }
}
