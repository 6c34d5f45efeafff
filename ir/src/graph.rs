//! The SSA tensor graph: values with types, nodes in topological order, and a builder.
//!
//! Invariants (checked by [`crate::verify`]): every value is defined exactly once, by a
//! graph input or by one node output; nodes are in topological order; value names are
//! unique. Constants are `constant` nodes whose `value` attribute holds the tensor.

use crate::{Attr, Attrs, DType, OpKind, Shape, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// Index of a value in [`Graph::values`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ValueId(pub u32);

impl ValueId {
    /// The index as usize.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// The static type of a value: dtype and (possibly symbolic) shape.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TensorType {
    /// Element type.
    pub dtype: DType,
    /// Shape, possibly symbolic or unknown.
    pub shape: Shape,
}

impl TensorType {
    /// A type from a dtype and a shape.
    pub fn new(dtype: DType, shape: Shape) -> TensorType {
        TensorType { dtype, shape }
    }

    /// A type of unknown shape.
    pub fn unknown_shape(dtype: DType) -> TensorType {
        TensorType {
            dtype,
            shape: Shape::unknown(),
        }
    }
}

impl std::fmt::Display for TensorType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}", self.dtype, self.shape)
    }
}

/// An SSA value.
#[derive(Clone, Debug, PartialEq)]
pub struct Value {
    /// Unique name (the ONNX tensor name where it came from ONNX).
    pub name: String,
    /// Static type.
    pub ty: TensorType,
}

/// One operation.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    /// What it computes.
    pub op: OpKind,
    /// Static parameters.
    pub attrs: Attrs,
    /// Operands; `None` is an omitted optional input (ONNX's empty name).
    pub inputs: Vec<Option<ValueId>>,
    /// Results, each defined here.
    pub outputs: Vec<ValueId>,
    /// Where it came from (the ONNX node name), for tracing and error messages. May be empty.
    pub name: String,
}

/// A function-like graph: typed inputs, nodes, outputs.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    /// The graph's name (`@name` in the text form).
    pub name: String,
    /// Every value, indexed by [`ValueId`].
    pub values: Vec<Value>,
    /// Nodes in topological order.
    pub nodes: Vec<Node>,
    /// Graph inputs, in order.
    pub inputs: Vec<ValueId>,
    /// Graph outputs, in order.
    pub outputs: Vec<ValueId>,
    /// Notes carried with the graph, printed and parsed by the text form
    /// (`func @g(...) -> (...) attributes {key = "value"} { ... }`): e.g. `approx_report`,
    /// the approximation report of a graph that approximate rewrites produced. Empty for most
    /// graphs; passes do not read it.
    pub metadata: BTreeMap<String, String>,
}

impl Graph {
    /// An empty graph.
    pub fn new(name: &str) -> Graph {
        Graph {
            name: name.to_string(),
            ..Graph::default()
        }
    }

    /// The value behind an id.
    pub fn value(&self, id: ValueId) -> &Value {
        &self.values[id.index()]
    }

    /// The type of a value.
    pub fn ty(&self, id: ValueId) -> &TensorType {
        &self.values[id.index()].ty
    }

    /// Adds a value (its name must not be in use: the verifier checks) and returns it.
    pub fn add_value(&mut self, name: &str, ty: TensorType) -> ValueId {
        let id = ValueId(self.values.len() as u32);
        self.values.push(Value {
            name: name.to_string(),
            ty,
        });
        id
    }

    /// Adds a graph input.
    pub fn add_input(&mut self, name: &str, ty: TensorType) -> ValueId {
        let id = self.add_value(name, ty);
        self.inputs.push(id);
        id
    }

    /// Appends a node whose outputs get the given names and types.
    pub fn add_node(
        &mut self,
        op: OpKind,
        attrs: Attrs,
        inputs: Vec<Option<ValueId>>,
        outputs: Vec<(String, TensorType)>,
        name: &str,
    ) -> Vec<ValueId> {
        let outs: Vec<ValueId> = outputs
            .into_iter()
            .map(|(n, t)| self.add_value(&n, t))
            .collect();
        self.nodes.push(Node {
            op,
            attrs,
            inputs,
            outputs: outs.clone(),
            name: name.to_string(),
        });
        outs
    }

    /// Appends a `constant` node holding `t` and returns its value.
    pub fn add_constant(&mut self, name: &str, t: Tensor) -> ValueId {
        let ty = TensorType::new(t.dtype(), Shape::fixed(t.shape()));
        // Shared, so the plan's copy of the constant is not a copy of its elements.
        let attrs = Attrs::new().with("value", Attr::Tensor(Arc::new(t.into_shared())));
        self.add_node(
            OpKind::Constant,
            attrs,
            vec![],
            vec![(name.to_string(), ty)],
            "",
        )[0]
    }

    /// Map from each value to the node index that defines it (graph inputs are absent).
    pub fn producers(&self) -> HashMap<ValueId, usize> {
        let mut m = HashMap::new();
        for (i, n) in self.nodes.iter().enumerate() {
            for &o in &n.outputs {
                m.insert(o, i);
            }
        }
        m
    }

    /// The tensor held by a value if a `constant` node defines it.
    pub fn constant_value(&self, id: ValueId) -> Option<Arc<Tensor>> {
        self.nodes
            .iter()
            .find(|n| n.op == OpKind::Constant && n.outputs.first() == Some(&id))
            .and_then(|n| n.attrs.tensor("value").ok().flatten())
    }

    /// Count of nodes per op, sorted by count (descending) then name.
    pub fn op_histogram(&self) -> Vec<(OpKind, usize)> {
        let mut m: HashMap<OpKind, usize> = HashMap::new();
        for n in &self.nodes {
            *m.entry(n.op).or_default() += 1;
        }
        let mut v: Vec<_> = m.into_iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.name().cmp(b.0.name())));
        v
    }
}

/// Structural equality: the same inputs, nodes and outputs, with values matched by their
/// position of definition rather than by their ids (so a reparsed graph compares equal).
impl PartialEq for Graph {
    fn eq(&self, other: &Graph) -> bool {
        if self.name != other.name
            || self.metadata != other.metadata
            || self.inputs.len() != other.inputs.len()
            || self.nodes.len() != other.nodes.len()
            || self.outputs.len() != other.outputs.len()
        {
            return false;
        }
        let mut map: HashMap<ValueId, ValueId> = HashMap::new();
        let same_value = |a: ValueId, b: ValueId, map: &mut HashMap<ValueId, ValueId>| {
            map.insert(a, b);
            self.value(a) == other.value(b)
        };
        for (&a, &b) in self.inputs.iter().zip(&other.inputs) {
            if !same_value(a, b, &mut map) {
                return false;
            }
        }
        for (na, nb) in self.nodes.iter().zip(&other.nodes) {
            if na.op != nb.op
                || na.name != nb.name
                || na.attrs != nb.attrs
                || na.inputs.len() != nb.inputs.len()
                || na.outputs.len() != nb.outputs.len()
            {
                return false;
            }
            for (ia, ib) in na.inputs.iter().zip(&nb.inputs) {
                match (ia, ib) {
                    (None, None) => {}
                    (Some(a), Some(b)) if map.get(a) == Some(b) => {}
                    _ => return false,
                }
            }
            for (&a, &b) in na.outputs.iter().zip(&nb.outputs) {
                if !same_value(a, b, &mut map) {
                    return false;
                }
            }
        }
        self.outputs
            .iter()
            .zip(&other.outputs)
            .all(|(a, b)| map.get(a) == Some(b))
    }
}
