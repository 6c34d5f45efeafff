//! Seeded random inputs (`kiln run --random-inputs`, `kiln bench`): binding `--dim NAME=N`
//! to the model's symbolic dims (a name the model does not have is an error), checking each
//! input's size against the memory limit before anything is allocated, and drawing integer
//! inputs within the rows of every table they index, as read from the graph.

use anyhow::{bail, Result};
use kiln_ir::{DType, Dim, Graph, OpKind, TensorType, ValueId};
use std::collections::{BTreeSet, HashMap};

/// Integer inputs that index no table are drawn from `[0, DEFAULT_INT_END)`.
pub const DEFAULT_INT_END: i64 = 10;

/// Inputs that reach a gather's indices only through arithmetic are drawn from
/// `[0, COMPUTED_INDEX_END)`: 0/1 values, whose sums and running sums stay within the
/// length of the axis they run along.
pub const COMPUTED_INDEX_END: i64 = 2;

/// Parses `--dim NAME=N` specs and checks every name is a symbolic dim of one of `inputs`.
/// A name given twice is an error too.
pub fn bind_dims<'a>(
    specs: &[String],
    inputs: impl IntoIterator<Item = &'a TensorType>,
) -> Result<HashMap<String, usize>> {
    let known: BTreeSet<String> = inputs
        .into_iter()
        .filter_map(|ty| ty.shape.dims())
        .flatten()
        .filter_map(|d| match d {
            Dim::Sym(s) => Some(s.clone()),
            _ => None,
        })
        .collect();
    let mut dims = HashMap::new();
    for s in specs {
        let Some((n, v)) = s.split_once('=') else {
            bail!("--dim `{s}` should be NAME=N");
        };
        let Ok(v) = v.trim().parse::<usize>() else {
            bail!("--dim `{s}`: `{v}` is not a size");
        };
        if !known.contains(n) {
            let list = if known.is_empty() {
                "it has none".to_string()
            } else {
                format!(
                    "its dims are {}",
                    known.iter().cloned().collect::<Vec<_>>().join(", ")
                )
            };
            bail!("--dim `{s}`: the model's inputs have no symbolic dim `{n}`; {list}");
        }
        if dims.insert(n.to_string(), v).is_some() {
            bail!("--dim `{n}` is given twice");
        }
    }
    Ok(dims)
}

/// Sizes for the model's symbolic dims from the `bench_inputs` of an `export.json` beside
/// it (the shared models have one), for when no `--dim` is given: dims that the model
/// relates but does not say how (a KV model's `total_seq` is `past_seq + 1`) then agree.
pub fn dims_from_export_json<'a>(
    model: &std::path::Path,
    inputs: impl IntoIterator<Item = (&'a str, &'a TensorType)>,
) -> HashMap<String, usize> {
    let bench = model
        .parent()
        .map(|d| d.join("export.json"))
        .and_then(|p| std::fs::read_to_string(p).ok())
        .map(|s| crate::inspect::bench_inputs(&s))
        .unwrap_or_default();
    let mut dims = HashMap::new();
    for (name, ty) in inputs {
        let (Some(sizes), Some(ds)) = (bench.get(name), ty.shape.dims()) else {
            continue;
        };
        if sizes.len() != ds.len() {
            continue;
        }
        for (d, &n) in ds.iter().zip(sizes) {
            if let (Dim::Sym(s), Ok(n)) = (d, usize::try_from(n)) {
                dims.entry(s.clone()).or_insert(n);
            }
        }
    }
    dims
}

/// The concrete shape of an input under `dims` (unbound dims are 1), checked for overflow
/// and against the memory limit so that `--dim batch=1099511627776` is an error, not an
/// abort in the allocator.
/// The caller names the input in the error's context.
pub fn input_shape(ty: &TensorType, dims: &HashMap<String, usize>) -> Result<Vec<usize>> {
    let Some(ds) = ty.shape.dims() else {
        bail!("its rank is unknown");
    };
    let shape: Vec<usize> = ds
        .iter()
        .map(|d| match d {
            Dim::Fixed(n) => *n as usize,
            Dim::Sym(s) => dims.get(s).copied().unwrap_or(1),
            Dim::Unknown => 1,
        })
        .collect();
    let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    let Some(n) = n else {
        bail!("shape {shape:?} of {ty} overflows");
    };
    // f64 values are drawn per element before conversion: at least 8 bytes each.
    let elem = ty.dtype.size().max(std::mem::size_of::<f64>());
    kiln_ir::limits::check(n, elem, &shape).map_err(anyhow::Error::msg)?;
    Ok(shape)
}

/// For each integer graph input that (through casts, reshapes and the like) is the index
/// operand of a `gather`, the exclusive upper bound of valid indices: the smallest
/// number of rows along the gathered axis of any table it indexes. An input that reaches
/// an index only through arithmetic (an attention mask's cumulative sum plus an offset
/// becomes OPT's positions) is bounded by [`COMPUTED_INDEX_END`] instead. Inputs that
/// index no table with a known size are absent.
pub fn index_bounds(g: &Graph) -> HashMap<String, i64> {
    let mut users: HashMap<ValueId, Vec<(usize, usize)>> = HashMap::new();
    for (ni, n) in g.nodes.iter().enumerate() {
        for (k, v) in n.inputs.iter().enumerate() {
            if let Some(v) = v {
                users.entry(*v).or_default().push((ni, k));
            }
        }
    }
    let mut bounds = HashMap::new();
    for &i in &g.inputs {
        if !is_index_dtype(g.ty(i).dtype) {
            continue;
        }
        let mut bound: Option<i64> = None;
        // (value, reached through arithmetic)
        let mut stack = vec![(i, false)];
        let mut seen = BTreeSet::new();
        while let Some((v, computed)) = stack.pop() {
            if !seen.insert((v, computed)) {
                continue;
            }
            for &(ni, k) in users.get(&v).map(Vec::as_slice).unwrap_or(&[]) {
                let n = &g.nodes[ni];
                match n.op {
                    OpKind::Gather if k == 1 => {
                        let end = if computed {
                            Some(COMPUTED_INDEX_END)
                        } else {
                            gathered_rows(g, n)
                        };
                        if let Some(end) = end {
                            bound = Some(bound.map_or(end, |b| b.min(end)));
                        }
                    }
                    // Arithmetic: the index is computed from the value.
                    OpKind::CumSum
                    | OpKind::Add
                    | OpKind::Sub
                    | OpKind::Mul
                    | OpKind::Neg
                    | OpKind::Min
                    | OpKind::Max
                    | OpKind::Where => {
                        stack.extend(n.outputs.iter().map(|&o| (o, true)));
                    }
                    // The value's elements reach the output unchanged (or only moved).
                    OpKind::Cast
                    | OpKind::Identity
                    | OpKind::Reshape
                    | OpKind::Unsqueeze
                    | OpKind::Squeeze
                    | OpKind::Flatten
                    | OpKind::Transpose
                    | OpKind::Expand
                    | OpKind::Tile
                    | OpKind::Concat
                    | OpKind::Slice
                        if k == 0 || n.op == OpKind::Concat =>
                    {
                        stack.extend(n.outputs.iter().map(|&o| (o, computed)));
                    }
                    _ => {}
                }
            }
        }
        if let Some(b) = bound {
            bounds.insert(g.value(i).name.clone(), b);
        }
    }
    bounds
}

/// Rows along a gather's axis of its table, when the table's shape says.
fn gathered_rows(g: &Graph, n: &kiln_ir::Node) -> Option<i64> {
    let table = n.inputs.first().copied().flatten()?;
    let dims = g.ty(table).shape.dims()?;
    let axis = n.attrs.int_or("axis", 0).ok()?;
    let axis = if axis < 0 {
        axis + dims.len() as i64
    } else {
        axis
    };
    match dims.get(usize::try_from(axis).ok()?)? {
        Dim::Fixed(r) if *r > 0 => i64::try_from(*r).ok(),
        _ => None,
    }
}

fn is_index_dtype(dt: DType) -> bool {
    dt.is_int()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::{GraphBuilder, Shape, Tensor};
    use std::sync::Arc;

    fn ids_graph() -> Graph {
        // ids: i64[batch, seq] → cast → gather(table[2, 4], ·)
        let mut b = GraphBuilder::new("g");
        let ids = b.input(
            "ids",
            TensorType::new(
                DType::I64,
                Shape::new(vec![Dim::Sym("batch".into()), Dim::Sym("seq".into())]),
            ),
        );
        let other = b.input("n", TensorType::new(DType::I64, Shape::fixed(&[1])));
        let table = b
            .node(
                OpKind::Constant,
                kiln_ir::Attrs::new().with(
                    "value",
                    kiln_ir::Attr::Tensor(Arc::new(Tensor::from_vec(vec![2, 4], vec![0f32; 8]))),
                ),
                vec![],
                vec![("table".into(), None)],
                "table",
            )
            .unwrap()[0];
        let c = b
            .node(
                OpKind::Cast,
                kiln_ir::Attrs::new().with("to", kiln_ir::Attr::Str("i32".into())),
                vec![Some(ids)],
                vec![("c".into(), None)],
                "cast",
            )
            .unwrap()[0];
        let e = b
            .node(
                OpKind::Gather,
                kiln_ir::Attrs::new(),
                vec![Some(table), Some(c)],
                vec![("e".into(), None)],
                "embed",
            )
            .unwrap()[0];
        b.finish(vec![e, other])
    }

    #[test]
    fn ids_feeding_a_gather_are_bounded_by_its_rows() {
        let g = ids_graph();
        let b = index_bounds(&g);
        assert_eq!(b.get("ids"), Some(&2));
        assert_eq!(b.get("n"), None);
    }

    #[test]
    fn unknown_and_repeated_dims_are_errors() {
        let g = ids_graph();
        let tys = || g.inputs.iter().map(|&i| g.ty(i));
        let d = bind_dims(&["batch=3".into()], tys()).unwrap();
        assert_eq!(d.get("batch"), Some(&3));
        let e = bind_dims(&["nosuch=4".into()], tys())
            .unwrap_err()
            .to_string();
        assert!(e.contains("nosuch") && e.contains("batch, seq"), "{e}");
        assert!(bind_dims(&["batch=1".into(), "batch=2".into()], tys()).is_err());
        assert!(bind_dims(&["batch=-1".into()], tys()).is_err());
    }

    #[test]
    fn huge_dims_are_errors_before_allocation() {
        let g = ids_graph();
        let ty = g.ty(g.inputs[0]);
        let mut dims = HashMap::new();
        dims.insert("batch".to_string(), 1usize << 40);
        let e = input_shape(ty, &dims).unwrap_err().to_string();
        assert!(
            e.contains("memory limit") && e.contains("1099511627776"),
            "{e}"
        );
        dims.insert("seq".to_string(), 1usize << 40);
        dims.insert("batch".to_string(), 1usize << 40);
        let e = input_shape(ty, &dims).unwrap_err().to_string();
        assert!(e.contains("overflows"), "{e}");
        dims.insert("batch".to_string(), 2);
        dims.insert("seq".to_string(), 3);
        assert_eq!(input_shape(ty, &dims).unwrap(), vec![2, 3]);
    }
}
