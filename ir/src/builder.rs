//! Building a graph node by node with shape inference as you go, as importers and the
//! text parser do: each new node's output types come from its op's shape rule, refined by
//! any type the source declares.

use crate::infer::{fold_small_constants, refine_declared, InferError};
use crate::ops::{self, Fact};
use crate::{Attrs, Graph, OpKind, TensorType, ValueId};

/// A graph under construction, with the facts inference knows about each value.
#[derive(Debug, Default)]
pub struct GraphBuilder {
    graph: Graph,
    facts: Vec<Fact>,
}

impl GraphBuilder {
    /// Starts an empty graph.
    pub fn new(name: &str) -> GraphBuilder {
        GraphBuilder {
            graph: Graph::new(name),
            facts: vec![],
        }
    }

    /// The graph so far.
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// What is known about a value.
    pub fn fact(&self, id: ValueId) -> &Fact {
        &self.facts[id.index()]
    }

    /// Adds a graph input.
    pub fn input(&mut self, name: &str, ty: TensorType) -> ValueId {
        self.facts.push(Fact::of(ty.clone()));
        self.graph.add_input(name, ty)
    }

    /// Adds a node. `outputs` gives each result's name and, optionally, a declared type
    /// that refines the inferred one (they must not contradict).
    pub fn node(
        &mut self,
        op: OpKind,
        attrs: Attrs,
        inputs: Vec<Option<ValueId>>,
        outputs: Vec<(String, Option<TensorType>)>,
        name: &str,
    ) -> Result<Vec<ValueId>, InferError> {
        let ins: Vec<Option<&Fact>> = inputs
            .iter()
            .map(|i| i.map(|i| &self.facts[i.index()]))
            .collect();
        let err = |msg: String| InferError {
            node: if name.is_empty() {
                outputs
                    .first()
                    .map(|o| format!("%{}", o.0))
                    .unwrap_or_default()
            } else {
                name.to_string()
            },
            op: op.name().to_string(),
            inputs: format!(
                "({})",
                ins.iter()
                    .map(|f| f.map(|f| f.ty.to_string()).unwrap_or_else(|| "none".into()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            msg,
        };
        let mut out = ops::infer(op, &attrs, &ins).map_err(err)?;
        if out.len() < outputs.len() {
            return Err(err(format!(
                "the op gives {} outputs but the node names {}",
                out.len(),
                outputs.len()
            )));
        }
        // Trailing optional outputs the source did not name are dropped.
        out.truncate(outputs.len());
        fold_small_constants(op, &attrs, &ins, &mut out);
        let mut typed = Vec::with_capacity(outputs.len());
        for (f, (oname, declared)) in out.iter_mut().zip(&outputs) {
            if let Some(d) = declared {
                f.ty =
                    refine_declared(d, &f.ty).map_err(|m| err(format!("output `{oname}`: {m}")))?;
            }
            if f.dims.is_none() {
                f.dims = f.value_dims();
            }
            typed.push((oname.clone(), f.ty.clone()));
        }
        self.facts.extend(out);
        Ok(self.graph.add_node(op, attrs, inputs, typed, name))
    }

    /// Marks the graph outputs and returns the finished graph.
    pub fn finish(mut self, outputs: Vec<ValueId>) -> Graph {
        self.graph.outputs = outputs;
        self.graph
    }
}
