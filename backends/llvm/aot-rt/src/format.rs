//! The serialized model inside an AOT library: the optimised graph in kiln's text form with
//! large constant payloads cut out, and its partitioned plan's kernel list
//! ([`kiln_plan::serial`], written once at build time so loading partitions nothing): the
//! "meta"; and those payloads in a separate, aligned weights blob (embedded in .rodata or
//! in a side file). Shared by the builder (kiln-llvm)
//! and the run-time half (this crate), so both sides read and write one format.

use kiln_ir::{Attr, DType, Graph, OpKind, Tensor, TensorData};
use kiln_plan::{LoopKernel, Plan};
use std::sync::Arc;

/// First bytes of the meta section.
pub const META_MAGIC: &[u8; 8] = b"KILNAOT2";
/// First bytes of a weights blob (embedded or side file).
pub const WEIGHTS_MAGIC: &[u8; 8] = b"KILNWTS1";
/// Every weight payload starts at a multiple of this (and the blob header is this long).
pub const WEIGHTS_ALIGN: usize = 64;
/// Constants with fewer payload bytes than this stay inline in the text form.
pub const INLINE_BYTES: usize = 256;

/// Where one cut-out constant lives in the weights blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeightEntry {
    /// Index of the `constant` node in the graph's node list.
    pub node: usize,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
    /// Byte offset in the blob (from its start, header included).
    pub offset: usize,
    /// Payload length in bytes.
    pub nbytes: usize,
}

/// The decoded meta section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Meta {
    /// The graph in text form, large constants replaced by empty placeholders.
    pub text: String,
    /// The cut-out constants.
    pub weights: Vec<WeightEntry>,
    /// The plan's kernel list ([`kiln_plan::serial::encode`]); empty until
    /// [`Meta::set_plan`].
    pub plan: Vec<u8>,
    /// Identifies the weights blob this meta was built with (also in the blob's header).
    pub weights_id: u64,
    /// Total length of the weights blob, header included.
    pub weights_len: usize,
    /// The approximation report the model was built under (`kiln build --approx`);
    /// empty for an exact model. `kiln_approx_report` returns it.
    pub approx_report: String,
}

/// Splits the large constants out of `g`: returns the meta (text with placeholders) and
/// the weights blob. `weights_id` tags both so a mismatched side file is caught.
pub fn split(g: &Graph, weights_id: u64) -> (Meta, Vec<u8>) {
    let mut stripped = g.clone();
    let mut blob = Vec::with_capacity(WEIGHTS_ALIGN);
    blob.extend_from_slice(WEIGHTS_MAGIC);
    blob.extend_from_slice(&weights_id.to_le_bytes());
    blob.resize(WEIGHTS_ALIGN, 0);
    let mut weights = vec![];
    for (i, node) in stripped.nodes.iter_mut().enumerate() {
        if node.op != OpKind::Constant {
            continue;
        }
        let Some(Attr::Tensor(t)) = node.attrs.get("value") else {
            continue;
        };
        let bytes = t.data().to_le_bytes();
        if bytes.len() < INLINE_BYTES {
            continue;
        }
        let offset = blob.len();
        weights.push(WeightEntry {
            node: i,
            dtype: t.dtype(),
            shape: t.shape().to_vec(),
            offset,
            nbytes: bytes.len(),
        });
        blob.extend_from_slice(&bytes);
        blob.resize(blob.len().div_ceil(WEIGHTS_ALIGN) * WEIGHTS_ALIGN, 0);
        let placeholder = Tensor::new(vec![0], TensorData::zeros(t.dtype(), 0))
            .expect("an empty tensor of shape [0] is always valid");
        node.attrs.set("value", Attr::Tensor(Arc::new(placeholder)));
    }
    let meta = Meta {
        text: kiln_ir::text::print(&stripped),
        weights,
        plan: vec![],
        weights_id,
        weights_len: blob.len(),
        approx_report: String::new(),
    };
    (meta, blob)
}

/// Parses the meta's text and puts the weights back from `blob`: used in place where
/// aligned (every entry starts on [`WEIGHTS_ALIGN`] in the blob), so the graph's weights
/// are the library's `.rodata` or the mapped side file, not a copy.
pub fn restore(meta: &Meta, blob: &bytes::Bytes) -> Result<Graph, String> {
    if blob.len() != meta.weights_len
        || blob.len() < 16
        || &blob[..8] != WEIGHTS_MAGIC
        || blob[8..16] != meta.weights_id.to_le_bytes()
    {
        return Err(format!(
            "the weights ({} bytes) are not the ones this library was built with \
             ({} bytes, id {:016x})",
            blob.len(),
            meta.weights_len,
            meta.weights_id
        ));
    }
    let mut g = kiln_ir::text::parse(&meta.text).map_err(|e| format!("model graph: {e}"))?;
    for w in &meta.weights {
        let node = g
            .nodes
            .get_mut(w.node)
            .filter(|n| n.op == OpKind::Constant)
            .ok_or_else(|| format!("weight entry names node #{}, not a constant", w.node))?;
        let end = w
            .offset
            .checked_add(w.nbytes)
            .filter(|&end| end <= blob.len())
            .ok_or_else(|| format!("weight of node #{} lies outside the blob", w.node))?;
        let bytes = blob.slice(w.offset..end);
        let data = TensorData::from_le_shared(w.dtype, &bytes)?;
        let t = Tensor::new(w.shape.clone(), data)?;
        node.attrs.set("value", Attr::Tensor(Arc::new(t)));
    }
    Ok(g)
}

/// Restores the graph ([`restore`]) and the plan built with it: the serialised kernels,
/// checked against the graph ([`Plan::from_kernels`]), not a new partitioning.
pub fn restore_plan(meta: &Meta, blob: &bytes::Bytes) -> Result<Plan, String> {
    let graph = restore(meta, blob)?;
    let kernels = kiln_plan::serial::decode(&meta.plan).map_err(|e| format!("model plan: {e}"))?;
    Plan::from_kernels(graph, kernels).map_err(|e| format!("model plan: {e}"))
}

/// Little-endian writer helpers.
fn put_u64(out: &mut Vec<u8>, x: u64) {
    out.extend_from_slice(&x.to_le_bytes());
}

impl Meta {
    /// Records the plan `kiln_create` will run (partitioned from the restored graph).
    pub fn set_plan(&mut self, plan: &Plan) {
        self.plan = kiln_plan::serial::encode(plan);
    }

    /// Encodes the meta section.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = META_MAGIC.to_vec();
        put_u64(&mut out, self.weights_id);
        put_u64(&mut out, self.weights_len as u64);
        put_u64(&mut out, self.text.len() as u64);
        out.extend_from_slice(self.text.as_bytes());
        put_u64(&mut out, self.weights.len() as u64);
        for w in &self.weights {
            put_u64(&mut out, w.node as u64);
            put_u64(&mut out, w.dtype.onnx_code() as u64);
            put_u64(&mut out, w.shape.len() as u64);
            for &d in &w.shape {
                put_u64(&mut out, d as u64);
            }
            put_u64(&mut out, w.offset as u64);
            put_u64(&mut out, w.nbytes as u64);
        }
        put_u64(&mut out, self.plan.len() as u64);
        out.extend_from_slice(&self.plan);
        put_u64(&mut out, self.approx_report.len() as u64);
        out.extend_from_slice(self.approx_report.as_bytes());
        out
    }

    /// Decodes a meta section.
    pub fn decode(bytes: &[u8]) -> Result<Meta, String> {
        let mut r = Reader { bytes, at: 0 };
        if r.take(8)? != META_MAGIC {
            return Err("not a kiln AOT model (bad magic)".into());
        }
        let weights_id = r.u64()?;
        let weights_len = r.usize()?;
        let text_len = r.usize()?;
        let text = std::str::from_utf8(r.take(text_len)?)
            .map_err(|e| format!("model text is not UTF-8: {e}"))?
            .to_string();
        let count = r.usize()?;
        let mut weights = vec![];
        for _ in 0..count {
            let node = r.usize()?;
            let code = r.u64()?;
            let dtype = i32::try_from(code)
                .ok()
                .and_then(DType::from_onnx_code)
                .ok_or_else(|| format!("weight of node #{node}: unknown dtype code {code}"))?;
            let rank = r.usize()?;
            let shape = (0..rank).map(|_| r.usize()).collect::<Result<_, _>>()?;
            let offset = r.usize()?;
            let nbytes = r.usize()?;
            weights.push(WeightEntry {
                node,
                dtype,
                shape,
                offset,
                nbytes,
            });
        }
        let plan_len = r.usize()?;
        let plan = r.take(plan_len)?.to_vec();
        let report_len = r.usize()?;
        let approx_report = std::str::from_utf8(r.take(report_len)?)
            .map_err(|e| format!("approximation report is not UTF-8: {e}"))?
            .to_string();
        Ok(Meta {
            approx_report,
            text,
            weights,
            plan,
            weights_id,
            weights_len,
        })
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or("model meta is truncated")?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u64(&mut self) -> Result<u64, String> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
    fn usize(&mut self) -> Result<usize, String> {
        usize::try_from(self.u64()?).map_err(|_| "model meta value overflows usize".to_string())
    }
}

/// A stable fingerprint of a loop kernel (FNV-1a of its debug form), checked at create
/// time so that compiled code never runs on a kernel it was not compiled for.
pub fn kernel_fingerprint(k: &LoopKernel) -> u64 {
    let s = format!("{k:?}");
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: &str = "func @f(%x: f32[2, 80]) -> (f32[2, 80]) {\n  %w = constant {value = dense<f32[1]> [0.0]} : f32[80]\n  %y = add %x, %w : f32[2, 80]\n  return %y\n}\n";

    fn graph() -> Graph {
        let mut g: Graph = SRC.parse().unwrap();
        let w: Vec<f32> = (0..80).map(|i| i as f32 * 0.5 - 3.0).collect();
        g.nodes[0].attrs.set(
            "value",
            Attr::Tensor(Arc::new(Tensor::from_vec(vec![80], w))),
        );
        g
    }

    #[test]
    fn split_encode_decode_restore_round_trips() {
        let g = graph();
        let (mut meta, blob) = split(&g, 42);
        meta.set_plan(&kiln_plan::partition(&g).unwrap());
        assert_eq!(meta.weights.len(), 1, "the 320-byte constant is cut out");
        assert!(!meta.text.contains("-3.0"), "payload left in the text");
        let back = Meta::decode(&meta.encode()).unwrap();
        assert_eq!(back, meta);
        let blob = bytes::Bytes::from(blob);
        let g2 = restore(&back, &blob).unwrap();
        assert!(g2 == g, "restored graph differs");
        // The weight is used in place: the blob's bytes, not a copy.
        let w = g2
            .nodes
            .iter()
            .find_map(|n| {
                n.attrs
                    .tensor("value")
                    .ok()
                    .flatten()
                    .filter(|t| t.len() > 8)
            })
            .expect("the restored weight");
        assert_eq!(w.data().storage(), kiln_ir::Storage::Mapped);
        let at = w.data().le_bytes().as_ptr() as usize - blob.as_ptr() as usize;
        assert_eq!(at, meta.weights[0].offset);
        let plan = restore_plan(&back, &blob).unwrap();
        assert_eq!(plan.kernels, kiln_plan::partition(&g).unwrap().kernels);
    }

    #[test]
    fn mismatched_or_truncated_data_is_an_error() {
        let (meta, blob) = split(&graph(), 42);
        let (_, other) = split(&graph(), 43);
        let (blob, other) = (bytes::Bytes::from(blob), bytes::Bytes::from(other));
        assert!(restore(&meta, &other).unwrap_err().contains("not the ones"));
        assert!(restore(&meta, &blob.slice(..blob.len() - 1)).is_err());
        let enc = meta.encode();
        assert!(Meta::decode(&enc[..enc.len() - 3]).is_err());
        assert!(Meta::decode(b"KILNAOT0").is_err());
        assert!(
            Meta::decode(b"KILNAOT1").is_err(),
            "a library of the older format"
        );
    }
}
