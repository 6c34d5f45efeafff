//! Phase two of the import: a lowered graph into a [`GraphBuilder`], which runs each op's
//! shape rule as nodes are added and refines the result with the types the model
//! declares. `If` branches are built in the scope of their node, with the captured outer
//! values' current types as their inputs.

use super::lower::LGraph;
use super::OnnxError;
use kiln_ir::{Attr, Graph, GraphBuilder, TensorType, ValueId};
use std::collections::HashMap;
use std::sync::Arc;

/// Builds the top-level graph.
pub(crate) fn build_model(lg: &LGraph) -> Result<Graph, OnnxError> {
    let mut seen = std::collections::HashSet::new();
    if let Some(o) = lg.outputs.iter().find(|o| !seen.insert(o.as_str())) {
        return Err(OnnxError::DuplicateOutput(o.clone()));
    }
    build_graph(lg, &lg.inputs)
}

/// Builds a graph whose inputs are `inputs` (a subgraph's are its captures).
fn build_graph(lg: &LGraph, inputs: &[(String, TensorType)]) -> Result<Graph, OnnxError> {
    let mut b = GraphBuilder::new(&lg.name);
    let mut ids: HashMap<&str, ValueId> = HashMap::new();
    let dup = |name: &str, by: String| OnnxError::DuplicateValue {
        name: name.to_string(),
        by,
    };
    for (name, ty) in inputs {
        if ids.insert(name, b.input(name, ty.clone())).is_some() {
            return Err(dup(name, "a second graph input".into()));
        }
    }
    for n in &lg.nodes {
        let lookup = |name: &str| {
            ids.get(name)
                .copied()
                .ok_or_else(|| OnnxError::MissingInput {
                    name: name.to_string(),
                    node: n.name.clone(),
                    op: n.op.onnx_name().to_string(),
                })
        };
        let inputs: Vec<Option<ValueId>> = n
            .inputs
            .iter()
            .map(|i| i.as_deref().map(lookup).transpose())
            .collect::<Result<_, _>>()?;
        let mut attrs = n.attrs.clone();
        for (attr, sg) in &n.subgraphs {
            let caps = sg
                .captures
                .iter()
                .map(|c| Ok((c.clone(), b.fact(lookup(c)?).ty.clone())))
                .collect::<Result<Vec<_>, OnnxError>>()?;
            attrs.set(attr, Attr::Graph(Arc::new(build_graph(sg, &caps)?)));
        }
        let outs = n
            .outputs
            .iter()
            .map(|o| (o.clone(), lg.declared.get(o).cloned()))
            .collect();
        let ids_out = b.node(n.op, attrs, inputs, outs, &n.name)?;
        for (o, id) in n.outputs.iter().zip(ids_out) {
            if ids.insert(o, id).is_some() {
                return Err(dup(o, format!("node `{}` ({})", n.name, n.op.onnx_name())));
            }
        }
    }
    let outputs = lg
        .outputs
        .iter()
        .map(|o| {
            ids.get(o.as_str())
                .copied()
                .ok_or_else(|| OnnxError::MissingOutput(o.clone()))
        })
        .collect::<Result<_, _>>()?;
    Ok(b.finish(outputs))
}
