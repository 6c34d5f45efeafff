//! The e-graph language: one e-node per IR op output, mirroring [`OpKind`], plus leaves for
//! graph inputs, constants, attribute sets and omitted optional inputs, and a few
//! e-graph-only helpers that exist only to be constant-folded (new weights such as
//! `diag(γ)·W` are written with them in rule right-hand sides).
//!
//! Shape of an op e-node: its children are the op's inputs (omitted optional inputs are the
//! `none` leaf, padded to [`canonical_arity`]) followed, for ops that take attributes
//! ([`takes_attrs`]), by one attribute leaf. So rules read `(matmul ?x ?w)` and
//! `(layer_norm ?x ?g ?b ?a)`, where `?a` binds the attribute set and can be reused on the
//! right-hand side. Output `k > 0` of a multi-output op is the op name with a suffix
//! (`layer_norm.1`); outputs of one node share children, so conversion back rebuilds one node.

use egg::{Id, Language};
use kiln_ir::{Attr, Attrs, Graph, OpKind, Tensor};
use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

/// A constant tensor as an e-graph leaf: compared bitwise, hashed once.
#[derive(Clone, Debug)]
pub struct ConstKey {
    hash: u64,
    /// The tensor.
    pub tensor: Arc<Tensor>,
}

impl ConstKey {
    /// Wraps a tensor, hashing its dtype, shape and a sample of its bytes
    /// ([`hash_sampled`]; equality compares every element where the hashes agree).
    pub fn new(tensor: Arc<Tensor>) -> ConstKey {
        let mut h = Fnv::default();
        tensor.dtype().name().hash(&mut h);
        tensor.shape().hash(&mut h);
        hash_sampled(&tensor, &mut h);
        ConstKey {
            hash: h.finish(),
            tensor,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        self.tensor.data().to_le_bytes()
    }
}

impl PartialEq for ConstKey {
    fn eq(&self, o: &ConstKey) -> bool {
        self.hash == o.hash
            && (Arc::ptr_eq(&self.tensor, &o.tensor) || self.tensor.as_ref() == o.tensor.as_ref())
    }
}
impl Eq for ConstKey {}
impl Hash for ConstKey {
    fn hash<H: Hasher>(&self, h: &mut H) {
        h.write_u64(self.hash)
    }
}
impl PartialOrd for ConstKey {
    fn partial_cmp(&self, o: &ConstKey) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for ConstKey {
    fn cmp(&self, o: &ConstKey) -> Ordering {
        if self == o {
            return Ordering::Equal;
        }
        self.hash
            .cmp(&o.hash)
            .then_with(|| self.tensor.dtype().name().cmp(o.tensor.dtype().name()))
            .then_with(|| self.tensor.shape().cmp(o.tensor.shape()))
            .then_with(|| self.bytes().cmp(&o.bytes()))
    }
}

/// Tensors up to this many elements are hashed whole; larger ones by a sample.
pub const HASH_WHOLE_ELEMS: usize = 256;

/// Hashes the bytes of `t`'s elements: all of them up to [`HASH_WHOLE_ELEMS`], else the
/// first and last 32 and 192 spread evenly between. Equal tensors hash equal; a hash
/// is only a bucket, so a table keyed by it still compares contents. (Hashing every
/// byte of every weight cost a stacked 12-layer BERT-base 0.2 s per pass that did it.)
pub fn hash_sampled<H: Hasher>(t: &Tensor, h: &mut H) {
    let bytes = t.data().le_bytes();
    let n = t.len();
    n.hash(h);
    if n <= HASH_WHOLE_ELEMS || n == 0 {
        h.write(&bytes);
        return;
    }
    let size = bytes.len() / n;
    let elem = |i: usize| &bytes[i * size..(i + 1) * size];
    h.write(&bytes[..32 * size]);
    h.write(&bytes[(n - 32) * size..]);
    let step = (n - 64) / 192;
    for k in 0..192 {
        h.write(elem(32 + k * step.max(1)));
    }
}

/// FNV-1a over 8-byte words: fast enough to hash every weight of a model once.
struct Fnv(u64);
impl Default for Fnv {
    fn default() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}
impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let w = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
            self.0 = (self.0 ^ w).wrapping_mul(0x100_0000_01b3).rotate_left(5);
        }
        for &b in chunks.remainder() {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
}

/// A subgraph attribute, compared by identity.
#[derive(Clone, Debug)]
pub struct GraphKey(pub Arc<Graph>);
impl PartialEq for GraphKey {
    fn eq(&self, o: &GraphKey) -> bool {
        Arc::ptr_eq(&self.0, &o.0)
    }
}
impl Eq for GraphKey {}
impl Hash for GraphKey {
    fn hash<H: Hasher>(&self, h: &mut H) {
        (Arc::as_ptr(&self.0) as usize).hash(h)
    }
}
impl PartialOrd for GraphKey {
    fn partial_cmp(&self, o: &GraphKey) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for GraphKey {
    fn cmp(&self, o: &GraphKey) -> Ordering {
        (Arc::as_ptr(&self.0) as usize).cmp(&(Arc::as_ptr(&o.0) as usize))
    }
}

/// One attribute value in hashable form (floats by their bits).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[allow(missing_docs)]
pub enum AttrVal {
    Int(i64),
    Float(u32),
    Str(String),
    Ints(Vec<i64>),
    Floats(Vec<u32>),
    Strs(Vec<String>),
    Tensor(ConstKey),
    Graph(GraphKey),
}

/// A node's attributes in hashable form, sorted by name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct AttrKey(pub Vec<(String, AttrVal)>);

impl AttrKey {
    /// The hashable form of `attrs`.
    pub fn new(attrs: &Attrs) -> AttrKey {
        AttrKey(
            attrs
                .0
                .iter()
                .map(|(k, v)| {
                    let v = match v {
                        Attr::Int(i) => AttrVal::Int(*i),
                        Attr::Float(f) => AttrVal::Float(f.to_bits()),
                        Attr::Str(s) => AttrVal::Str(s.clone()),
                        Attr::Ints(v) => AttrVal::Ints(v.clone()),
                        Attr::Floats(v) => AttrVal::Floats(v.iter().map(|f| f.to_bits()).collect()),
                        Attr::Strs(v) => AttrVal::Strs(v.clone()),
                        Attr::Tensor(t) => AttrVal::Tensor(ConstKey::new(t.clone())),
                        Attr::Graph(g) => AttrVal::Graph(GraphKey(g.clone())),
                    };
                    (k.clone(), v)
                })
                .collect(),
        )
    }

    /// Back to IR attributes.
    pub fn to_attrs(&self) -> Attrs {
        let mut a = Attrs::new();
        for (k, v) in &self.0 {
            let v = match v {
                AttrVal::Int(i) => Attr::Int(*i),
                AttrVal::Float(b) => Attr::Float(f32::from_bits(*b)),
                AttrVal::Str(s) => Attr::Str(s.clone()),
                AttrVal::Ints(v) => Attr::Ints(v.clone()),
                AttrVal::Floats(v) => Attr::Floats(v.iter().map(|b| f32::from_bits(*b)).collect()),
                AttrVal::Strs(v) => Attr::Strs(v.clone()),
                AttrVal::Tensor(t) => Attr::Tensor(t.tensor.clone()),
                AttrVal::Graph(g) => Attr::Graph(g.0.clone()),
            };
            a.set(k, v);
        }
        a
    }

    /// Parses the rule syntax `{}` / `{activation=relu,axis=-1,epsilon=1e-5}`: integers,
    /// floats (with `.` or `e`) and bare strings.
    pub fn parse(s: &str) -> Option<AttrKey> {
        let body = s.strip_prefix('{')?.strip_suffix('}')?;
        let mut a = Attrs::new();
        for item in body.split(',').filter(|i| !i.is_empty()) {
            let (k, v) = item.split_once('=')?;
            let attr = if let Ok(i) = v.parse::<i64>() {
                Attr::Int(i)
            } else if v.contains(['.', 'e']) && v.parse::<f32>().is_ok() {
                Attr::Float(v.parse().ok()?)
            } else {
                Attr::Str(v.to_string())
            };
            a.set(k, attr);
        }
        Some(AttrKey::new(&a))
    }
}

impl fmt::Display for AttrKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("{")?;
        for (i, (k, v)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            match v {
                AttrVal::Int(x) => write!(f, "{k}={x}")?,
                AttrVal::Float(b) => write!(f, "{k}={:?}", f32::from_bits(*b))?,
                AttrVal::Str(s) => write!(f, "{k}={s}")?,
                _ => write!(f, "{k}=..")?,
            }
        }
        f.write_str("}")
    }
}

/// E-graph-only operations. They never reach the IR: rules use them to state new
/// constants (folded by the analysis when their operands are constants), and the cost
/// model gives them infinite cost so extraction always takes the folded constant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Helper {
    /// `scale_rows g w`: `diag(g)·w`, g of shape `[K]`, w of shape `[.., K, N]`.
    ScaleRows,
    /// `row_times b w`: `b·w`, the row vector `[K]` times the matrix `[K, N]`, giving `[N]`.
    RowTimes,
    /// `centre w`: `w` minus its mean along the last axis.
    Centre,
    /// `ones_like x`: a tensor of ones of x's shape and dtype.
    OnesLike,
    /// `zeros_like x`: a tensor of zeros of x's shape and dtype.
    ZerosLike,
    /// `bn_scale s v eps`: `s / sqrt(v + eps)` (BatchNormalization's per-channel factor);
    /// the third child is the batch_norm attribute leaf.
    BnScale,
    /// `bn_shift b m k`: `b - m·k`.
    BnShift,
    /// `scale_out w k`: w scaled along its output channels (axis 0 for conv weights
    /// `[Cout, ...]`, the last axis for matmul weights `[K, N]`, chosen by rank ≥ 3).
    ScaleOut,
    /// `t w`: the transpose of a matrix.
    T,
    /// `last_axis`: the i64 tensor `[-1]` (an axes operand).
    LastAxis,
    /// `eps_like a x`: the scalar `epsilon` of attribute set `a`, in x's dtype.
    EpsLike,
}

impl Helper {
    const ALL: [(Helper, &'static str, usize); 11] = [
        (Helper::T, "t", 1),
        (Helper::LastAxis, "last_axis", 0),
        (Helper::EpsLike, "eps_like", 2),
        (Helper::ScaleRows, "scale_rows", 2),
        (Helper::RowTimes, "row_times", 2),
        (Helper::Centre, "centre", 1),
        (Helper::OnesLike, "ones_like", 1),
        (Helper::ZerosLike, "zeros_like", 1),
        (Helper::BnScale, "bn_scale", 3),
        (Helper::BnShift, "bn_shift", 3),
        (Helper::ScaleOut, "scale_out", 2),
    ];

    /// Its rule-syntax name.
    pub fn name(self) -> &'static str {
        Helper::ALL
            .iter()
            .find(|h| h.0 == self)
            .map_or("?", |h| h.1)
    }

    fn parse(s: &str, arity: usize) -> Option<Helper> {
        Helper::ALL
            .iter()
            .find(|h| h.1 == s && h.2 == arity)
            .map(|h| h.0)
    }
}

/// One e-node.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kn {
    /// Output `out` of an IR op; children are inputs then (if [`takes_attrs`]) attributes.
    Op {
        /// The op.
        op: OpKind,
        /// Which output of the op this e-node stands for.
        out: u8,
        /// Inputs (holes for omitted ones), then the attribute leaf.
        args: Vec<Id>,
    },
    /// The graph input with this index.
    Input(u32),
    /// A constant tensor.
    Const(ConstKey),
    /// An attribute set (only ever a child of an op e-node).
    Attrs(AttrKey),
    /// An omitted optional input.
    Hole,
    /// An IR node the e-graph does not look inside (re-emitted verbatim): its index in the
    /// original graph, the output it stands for, and its inputs (holes for omitted ones).
    Opaque(u32, u8, Vec<Id>),
    /// An e-graph-only helper (always constant-folded).
    Helper(Helper, Vec<Id>),
}

/// What must agree for two e-nodes to possibly match (children aside).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum KnDisc {
    /// An op output.
    Op(OpKind, u8),
    /// A leaf: the whole leaf.
    Leaf(Kn),
    /// A helper.
    Helper(Helper),
    /// An opaque node's output.
    Opaque(u32, u8),
}

impl Language for Kn {
    type Discriminant = KnDisc;

    fn discriminant(&self) -> KnDisc {
        match self {
            Kn::Op { op, out, .. } => KnDisc::Op(*op, *out),
            Kn::Helper(h, _) => KnDisc::Helper(*h),
            Kn::Opaque(n, o, _) => KnDisc::Opaque(*n, *o),
            leaf => KnDisc::Leaf(leaf.clone()),
        }
    }

    fn matches(&self, other: &Kn) -> bool {
        match (self, other) {
            (
                Kn::Op { op, out, args },
                Kn::Op {
                    op: o2,
                    out: u2,
                    args: a2,
                },
            ) => op == o2 && out == u2 && args.len() == a2.len(),
            (Kn::Helper(h, a), Kn::Helper(h2, a2)) => h == h2 && a.len() == a2.len(),
            (Kn::Opaque(n, o, a), Kn::Opaque(n2, o2, a2)) => {
                n == n2 && o == o2 && a.len() == a2.len()
            }
            (a, b) => a == b,
        }
    }

    fn children(&self) -> &[Id] {
        match self {
            Kn::Op { args, .. } | Kn::Helper(_, args) | Kn::Opaque(_, _, args) => args,
            _ => &[],
        }
    }

    fn children_mut(&mut self) -> &mut [Id] {
        match self {
            Kn::Op { args, .. } | Kn::Helper(_, args) | Kn::Opaque(_, _, args) => args,
            _ => &mut [],
        }
    }
}

impl fmt::Display for Kn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Kn::Op { op, out: 0, .. } => f.write_str(op.name()),
            Kn::Op { op, out, .. } => write!(f, "{}.{out}", op.name()),
            Kn::Input(i) => write!(f, "in{i}"),
            Kn::Const(k) => write!(f, "const{:?}#{:x}", k.tensor.shape(), k.hash & 0xffff),
            Kn::Attrs(a) => write!(f, "{a}"),
            Kn::Hole => f.write_str("none"),
            Kn::Opaque(n, o, _) => write!(f, "opaque{n}.{o}"),
            Kn::Helper(h, _) => f.write_str(h.name()),
        }
    }
}

/// Why an s-expression operator did not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseKnError(pub String);

impl egg::FromOp for Kn {
    type Error = ParseKnError;

    fn from_op(s: &str, children: Vec<Id>) -> Result<Kn, ParseKnError> {
        let err = || {
            ParseKnError(format!(
                "unknown operator `{s}` with {} children",
                children.len()
            ))
        };
        if s == "none" && children.is_empty() {
            return Ok(Kn::Hole);
        }
        if s.starts_with('{') {
            return AttrKey::parse(s)
                .filter(|_| children.is_empty())
                .map(Kn::Attrs)
                .ok_or_else(err);
        }
        if let Some(h) = Helper::parse(s, children.len()) {
            return Ok(Kn::Helper(h, children));
        }
        let (name, out) = match s.split_once('.') {
            Some((n, o)) => (n, o.parse::<u8>().map_err(|_| err())?),
            None => (s, 0),
        };
        let op = OpKind::from_name(name).ok_or_else(err)?;
        let want = canonical_arity(op).map(|n| n + takes_attrs(op) as usize);
        if want.is_some_and(|n| n != children.len()) {
            return Err(ParseKnError(format!(
                "`{s}` takes {} children (inputs, then attributes), got {}",
                want.unwrap_or(0),
                children.len()
            )));
        }
        Ok(Kn::Op {
            op,
            out,
            args: children,
        })
    }
}

/// Ops whose e-nodes carry no attribute leaf: they have no attributes in kiln's IR.
/// A node of one of these ops that nevertheless has attributes is kept opaque.
pub fn takes_attrs(op: OpKind) -> bool {
    op.takes_attrs()
}

/// The number of inputs an op's e-node always has (trailing omitted optional inputs
/// padded with holes), for ops with optional inputs that rules match on; `None` where the
/// node's own input count is kept (variadic and other ops).
pub fn canonical_arity(op: OpKind) -> Option<usize> {
    op.arity().bounded_max()
}
