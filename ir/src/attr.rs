//! Node attributes: the static parameters of an op (`axis = 1`, `perm = [0, 2, 1]`),
//! kept as an ordered dictionary with typed accessors whose errors name the attribute.

use crate::{Graph, Tensor};
use std::collections::BTreeMap;
use std::sync::Arc;

/// One attribute value. Equality is bitwise for floats (NaN equals the same NaN), like
/// [`Tensor`]'s, so that text round-trips compare equal.
#[derive(Clone, Debug)]
#[allow(missing_docs)]
pub enum Attr {
    Int(i64),
    Float(f32),
    Str(String),
    Ints(Vec<i64>),
    Floats(Vec<f32>),
    Strs(Vec<String>),
    Tensor(Arc<Tensor>),
    Graph(Arc<Graph>),
}

impl PartialEq for Attr {
    fn eq(&self, other: &Attr) -> bool {
        match (self, other) {
            (Attr::Int(a), Attr::Int(b)) => a == b,
            (Attr::Float(a), Attr::Float(b)) => a.to_bits() == b.to_bits(),
            (Attr::Str(a), Attr::Str(b)) => a == b,
            (Attr::Ints(a), Attr::Ints(b)) => a == b,
            (Attr::Floats(a), Attr::Floats(b)) => {
                a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
            }
            (Attr::Strs(a), Attr::Strs(b)) => a == b,
            (Attr::Tensor(a), Attr::Tensor(b)) => a == b,
            (Attr::Graph(a), Attr::Graph(b)) => a == b,
            _ => false,
        }
    }
}

impl Attr {
    /// The kind of value, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Attr::Int(_) => "int",
            Attr::Float(_) => "float",
            Attr::Str(_) => "string",
            Attr::Ints(_) => "ints",
            Attr::Floats(_) => "floats",
            Attr::Strs(_) => "strings",
            Attr::Tensor(_) => "tensor",
            Attr::Graph(_) => "graph",
        }
    }
}

/// The attributes of a node, sorted by name so printing is deterministic.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Attrs(pub BTreeMap<String, Attr>);

macro_rules! getter {
    ($get:ident, $or:ident, $variant:ident, $t:ty, $desc:literal) => {
        #[doc = concat!("The ", $desc, " attribute `name`, if present; an error if it has another kind.")]
        pub fn $get(&self, name: &str) -> Result<Option<$t>, String> {
            match self.0.get(name) {
                None => Ok(None),
                Some(Attr::$variant(v)) => Ok(Some(v.clone())),
                Some(other) => Err(format!(
                    "attribute `{name}` should be {} but is {}",
                    $desc,
                    other.kind()
                )),
            }
        }
        #[doc = concat!("The ", $desc, " attribute `name`, or `default` if absent.")]
        pub fn $or(&self, name: &str, default: $t) -> Result<$t, String> {
            Ok(self.$get(name)?.unwrap_or(default))
        }
    };
}

impl Attrs {
    /// No attributes.
    pub fn new() -> Attrs {
        Attrs::default()
    }

    /// Adds or replaces an attribute, builder style.
    pub fn with(mut self, name: &str, value: Attr) -> Attrs {
        self.0.insert(name.to_string(), value);
        self
    }

    /// Adds or replaces an attribute.
    pub fn set(&mut self, name: &str, value: Attr) {
        self.0.insert(name.to_string(), value);
    }

    /// The raw attribute.
    pub fn get(&self, name: &str) -> Option<&Attr> {
        self.0.get(name)
    }

    /// True if there are no attributes.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    getter!(int, int_or, Int, i64, "int");
    getter!(float, float_or, Float, f32, "float");
    getter!(string, string_or, Str, String, "string");
    getter!(ints, ints_or, Ints, Vec<i64>, "ints");
    getter!(floats, floats_or, Floats, Vec<f32>, "floats");
    getter!(strings, strings_or, Strs, Vec<String>, "strings");
    getter!(tensor, tensor_or, Tensor, Arc<Tensor>, "tensor");
    getter!(graph, graph_or, Graph, Arc<Graph>, "graph");

    /// A required int attribute.
    pub fn req_int(&self, name: &str) -> Result<i64, String> {
        self.int(name)?
            .ok_or_else(|| format!("missing attribute `{name}`"))
    }

    /// A required ints attribute.
    pub fn req_ints(&self, name: &str) -> Result<Vec<i64>, String> {
        self.ints(name)?
            .ok_or_else(|| format!("missing attribute `{name}`"))
    }

    /// A required tensor attribute.
    pub fn req_tensor(&self, name: &str) -> Result<Arc<Tensor>, String> {
        self.tensor(name)?
            .ok_or_else(|| format!("missing attribute `{name}`"))
    }

    /// A required graph attribute.
    pub fn req_graph(&self, name: &str) -> Result<Arc<Graph>, String> {
        self.graph(name)?
            .ok_or_else(|| format!("missing attribute `{name}`"))
    }
}
