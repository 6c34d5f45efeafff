//! `stack_row_scatters`: a chain of `scatter_nd`s that writes every row of a buffer along
//! one axis, one row per node (what `out[:, t] = h` in a loop over `t` exports to: ONNX has
//! no slice assignment), becomes one `concat` of the rows. Exact: each element of the result
//! is the very update element the last write of its row stored, and the buffer's initial
//! contents are all overwritten.
//!
//! The rows are proved from the index arithmetic, never sampled: every integer value the
//! indices derive from gets an affine form over its own element coordinates ([`Form`]),
//! built from `range`, constants, reshapes that only add or drop unit dims, `expand` and a
//! last-axis `concat`, with sizes taken from the inferred types (symbolic dims compare by
//! name). A `scatter_nd(data, idx, upd)` writes row `t` of axis `a` when `idx[.., j]` is the
//! coordinate `i_j` over a dim equal to `data`'s dim `j` for every `j != a`, `idx[.., a]` is
//! the constant `t`, and `upd` is `data`'s shape with dim `a` set to 1.
//!
//! The recurrence roll ([`super::RollBlocks`]) then sees the per-step rows collected by one
//! `concat`, as it sees a `torch.stack`, and returns them stacked from its loop instead of
//! carrying the whole buffer through every iteration.

use crate::rewrite;
use crate::{Pass, PassError, PassStats};
use kiln_ir::{Attr, Attrs, DType, Dim, Graph, Node, OpKind, ValueId};
use std::collections::HashMap;

/// Chains shorter than this are left alone (one scatter is already one write).
const MIN_CHAIN: usize = 2;

/// How deep the index arithmetic behind a scatter is followed.
const MAX_DEPTH: usize = 24;

/// Rewrites full-coverage chains of row scatters into concats.
#[derive(Clone, Copy, Debug, Default)]
pub struct StackRowScatters;

impl Pass for StackRowScatters {
    fn name(&self) -> &'static str {
        "stack_row_scatters"
    }

    fn run(&self, g: &mut Graph) -> Result<PassStats, PassError> {
        let mut stats = PassStats::default();
        // A value a subgraph captures by name has uses `use_counts` does not see.
        if g.nodes.iter().any(|n| n.op.holds_graphs()) {
            return Ok(stats);
        }
        let rewrites = find_chains(g);
        if rewrites.is_empty() {
            return Ok(stats);
        }
        let mut rows = 0;
        for c in &rewrites {
            let last = *c.nodes.last().expect("a chain has nodes");
            let out = g.nodes[last].outputs[0];
            rows += c.nodes.len();
            g.nodes[last] = Node {
                op: OpKind::Concat,
                attrs: Attrs::new().with("axis", Attr::Int(c.axis as i64)),
                inputs: c.rows.iter().map(|&v| Some(v)).collect(),
                outputs: vec![out],
                name: g.nodes[last].name.clone(),
            };
            stats.changed += 1;
        }
        // The chain's earlier scatters and their index arithmetic are dead now.
        stats.removed = rewrite::remove_dead(g);
        stats.bump("chains_stacked", rewrites.len());
        stats.bump("rows_stacked", rows);
        Ok(stats)
    }
}

/// One chain to rewrite: its scatter nodes in order, the axis, and the update of each row
/// in row order.
struct Chain {
    nodes: Vec<usize>,
    axis: usize,
    rows: Vec<ValueId>,
}

/// Every maximal chain of row scatters (each feeding only the next) whose rows are each
/// of its axis's rows exactly once.
fn find_chains(g: &Graph) -> Vec<Chain> {
    let producer = rewrite::producers(g);
    let uses = rewrite::use_counts(g);
    let mut forms = Forms {
        g,
        producer: &producer,
        memo: HashMap::new(),
    };
    // Per scatter node: (axis, row).
    let row_of: HashMap<usize, (usize, u64)> = g
        .nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| n.op == OpKind::ScatterND)
        .filter_map(|(i, _)| forms.row_write(i).map(|w| (i, w)))
        .collect();
    // Per value: the row scatter that writes into it (reads it as its data).
    let scatter_into: HashMap<ValueId, usize> = row_of
        .keys()
        .filter_map(|&j| Some((g.nodes[j].inputs[0]?, j)))
        .collect();
    // The scatter that reads node i's output as its data, where it is the only reader.
    let next = |i: usize| -> Option<usize> {
        let out = g.nodes[i].outputs[0];
        if uses[out.index()] != 1 || g.outputs.contains(&out) {
            return None;
        }
        scatter_into.get(&out).copied()
    };
    let mut has_prev = vec![false; g.nodes.len()];
    let mut links = HashMap::new();
    let mut starts: Vec<usize> = row_of.keys().copied().collect();
    starts.sort_unstable();
    for &i in &starts {
        if let Some(j) = next(i) {
            if row_of[&i].0 == row_of[&j].0 {
                has_prev[j] = true;
                links.insert(i, j);
            }
        }
    }
    let mut chains = vec![];
    for &s in starts.iter().filter(|&&s| !has_prev[s]) {
        let mut nodes = vec![s];
        while let Some(&j) = links.get(nodes.last().expect("non-empty")) {
            nodes.push(j);
        }
        let axis = row_of[&s].0;
        let data = g.ty(g.nodes[s].outputs[0]);
        let Some(size) = data
            .shape
            .dims()
            .and_then(|d| d.get(axis))
            .and_then(Dim::fixed)
        else {
            continue;
        };
        if nodes.len() < MIN_CHAIN || nodes.len() as u64 != size {
            continue;
        }
        let mut by_row: Vec<Option<ValueId>> = vec![None; nodes.len()];
        let mut ok = true;
        for &n in &nodes {
            let (_, t) = row_of[&n];
            match (by_row.get_mut(t as usize), g.nodes[n].inputs[2]) {
                (Some(slot @ None), Some(upd)) => *slot = Some(upd),
                _ => ok = false,
            }
        }
        if ok {
            chains.push(Chain {
                nodes,
                axis,
                rows: by_row.into_iter().flatten().collect(),
            });
        }
    }
    chains
}

/// What an integer value holds, as a function of its element coordinates `i`:
/// `Affine(c, k)` is `c + Σ k[d]·i[d]` over the value's dims; `Coords(v)` is a value whose
/// last axis lists coordinates, entry `e` being the affine form `v[e]` over the other dims.
#[derive(Clone, Debug, PartialEq)]
enum Form {
    Affine(i64, Vec<i64>),
    Coords(Vec<(i64, Vec<i64>)>),
}

/// The forms of a graph's integer values, computed on demand.
struct Forms<'g> {
    g: &'g Graph,
    producer: &'g [Option<usize>],
    memo: HashMap<ValueId, Option<Form>>,
}

impl Forms<'_> {
    /// The dims of `v`'s type, where its rank is known.
    fn dims(&self, v: ValueId) -> Option<&[Dim]> {
        self.g.ty(v).shape.dims()
    }

    /// `(axis, row)` where scatter node `i` writes exactly one whole row along one axis.
    fn row_write(&mut self, i: usize) -> Option<(usize, u64)> {
        let n = &self.g.nodes[i];
        let reduction = n.attrs.string_or("reduction", "none".into()).ok()?;
        if reduction != "none" || n.inputs.len() != 3 {
            return None;
        }
        let (data, idx, upd) = (n.inputs[0]?, n.inputs[1]?, n.inputs[2]?);
        let (dd, id, ud) = (
            self.dims(data)?.to_vec(),
            self.dims(idx)?.to_vec(),
            self.dims(upd)?.to_vec(),
        );
        let Some(Form::Coords(coords)) = self.form(idx, 0) else {
            return None;
        };
        let r = coords.len();
        // One index dim per indexed data dim, and a last dim listing the r coordinates.
        if id.len() != r + 1 || id[r].fixed() != Some(r as u64) || r > dd.len() {
            return None;
        }
        let known = |d: &Dim| !matches!(d, Dim::Unknown);
        let unit = |j: usize| (0..r).map(|d| i64::from(d == j)).collect::<Vec<_>>();
        let mut row = None;
        for (j, (c, k)) in coords.iter().enumerate() {
            let covers = *c == 0 && *k == unit(j) && dd[j] == id[j] && known(&dd[j]);
            let constant = k.iter().all(|&x| x == 0);
            let trivially = constant && *c == 0 && dd[j].fixed() == Some(1);
            if covers || trivially {
                continue;
            }
            // The one axis written at a constant row: its index dim has size 1.
            if !constant || row.is_some() || id[j].fixed() != Some(1) {
                return None;
            }
            let size = dd[j].fixed()?;
            let t = u64::try_from(*c).ok().filter(|&t| t < size)?;
            row = Some((j, t));
        }
        let (a, t) = row?;
        // The update is the row: data's shape with dim `a` set to 1.
        let mut want = dd.clone();
        want[a] = Dim::Fixed(1);
        (ud == want && dd.iter().all(known)).then_some((a, t))
    }

    /// The form of value `v` (`None`: not derived from what this pass follows).
    fn form(&mut self, v: ValueId, depth: usize) -> Option<Form> {
        if let Some(f) = self.memo.get(&v) {
            return f.clone();
        }
        let f = if depth > MAX_DEPTH {
            None
        } else {
            self.compute(v, depth + 1)
        };
        self.memo.insert(v, f.clone());
        f
    }

    fn compute(&mut self, v: ValueId, depth: usize) -> Option<Form> {
        let g = self.g;
        let ty = g.ty(v);
        if !matches!(ty.dtype, DType::I64 | DType::I32) {
            return None;
        }
        let out = self.dims(v)?.to_vec();
        let n = &g.nodes[self.producer[v.index()]?];
        let input = |k: usize| n.inputs.get(k).copied().flatten();
        let zeros = vec![0; out.len()];
        match n.op {
            OpKind::Constant => {
                let t = g.constant_value(v)?;
                let xs = t.to_i64s();
                let first = *xs.first()?;
                if xs.iter().all(|&x| x == first) {
                    return Some(Form::Affine(first, zeros));
                }
                // A 1-D arithmetic progression.
                let step = xs.get(1)? - first;
                let progression = xs.iter().enumerate().all(|(i, &x)| {
                    Some(x)
                        == (i as i64)
                            .checked_mul(step)
                            .and_then(|d| d.checked_add(first))
                });
                (out.len() == 1 && progression).then(|| Form::Affine(first, vec![step]))
            }
            OpKind::Range => {
                let scalar = |k: usize| -> Option<i64> {
                    let t = g.constant_value(input(k)?)?;
                    (t.len() == 1).then(|| t.to_i64s()[0])
                };
                let (start, delta) = (scalar(0)?, scalar(2)?);
                (out.len() == 1).then(|| Form::Affine(start, vec![delta]))
            }
            OpKind::Cast => {
                let x = input(0)?;
                matches!(g.ty(x).dtype, DType::I64 | DType::I32)
                    .then(|| self.form(x, depth))
                    .flatten()
            }
            OpKind::Reshape | OpKind::Unsqueeze | OpKind::Squeeze | OpKind::Flatten => {
                let x = input(0)?;
                let inn = self.dims(x)?.to_vec();
                let Form::Affine(c, k) = self.form(x, depth)? else {
                    return None;
                };
                // Only unit dims come or go: the other dims keep their order and coefficients.
                let non_unit = |d: &[Dim]| -> Vec<usize> {
                    (0..d.len()).filter(|&i| d[i].fixed() != Some(1)).collect()
                };
                let (a, b) = (non_unit(&inn), non_unit(&out));
                if a.len() != b.len() || a.iter().zip(&b).any(|(&i, &j)| inn[i] != out[j]) {
                    return None;
                }
                let mut kk = zeros;
                for (&i, &j) in a.iter().zip(&b) {
                    kk[j] = k[i];
                }
                Some(Form::Affine(c, kk))
            }
            OpKind::Expand => {
                let x = input(0)?;
                let inn = self.dims(x)?.to_vec();
                let Form::Affine(c, k) = self.form(x, depth)? else {
                    return None;
                };
                if inn.len() > out.len() {
                    return None;
                }
                let lead = out.len() - inn.len();
                let mut kk = zeros;
                for (i, d) in inn.iter().enumerate() {
                    if d.fixed() == Some(1) {
                        continue;
                    }
                    if *d != out[lead + i] {
                        return None;
                    }
                    kk[lead + i] = k[i];
                }
                Some(Form::Affine(c, kk))
            }
            OpKind::Concat => {
                let rank = out.len() as i64;
                let axis = n.attrs.int("axis").ok()??;
                if axis != -1 && axis != rank - 1 {
                    return None;
                }
                let mut coords = vec![];
                for x in n.inputs.iter() {
                    let x = (*x)?;
                    let d = self.dims(x)?.to_vec();
                    if d.len() != out.len() || d[..d.len() - 1] != out[..out.len() - 1] {
                        return None;
                    }
                    match self.form(x, depth)? {
                        Form::Affine(c, mut k) if d.last()?.fixed() == Some(1) => {
                            k.pop();
                            coords.push((c, k));
                        }
                        Form::Coords(cs) => coords.extend(cs),
                        Form::Affine(..) => return None,
                    }
                }
                Some(Form::Coords(coords))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use kiln_ir::{Shape, Tensor, TensorType};

    fn i64_ty(dims: &[Dim]) -> TensorType {
        TensorType::new(DType::I64, Shape::new(dims.to_vec()))
    }

    fn sym(s: &str) -> Dim {
        Dim::Sym(s.into())
    }

    /// `out[:, t] = h_t` for `t` in `order`, the way torch exports it: indices
    /// `concat(unsqueeze(reshape(range(0, B), [-1, 1])), unsqueeze(expand([t], [B, 1])))`,
    /// updates reshaped to `[B, 1, D]`, the buffer `[B, steps, D]` with a symbolic batch.
    fn torch_rows(order: &[i64], steps: usize) -> Graph {
        let d = 3usize;
        let mut g = Graph::new("rows");
        let fdims = |s: usize| vec![sym("b"), Dim::Fixed(s as u64), Dim::Fixed(d as u64)];
        let f32_sym = |dims: Vec<Dim>| TensorType::new(DType::F32, Shape::new(dims));
        let x = g.add_input("x", f32_sym(fdims(steps)));
        let buf0 = g.add_input("buf", f32_sym(fdims(steps)));
        let zero = g.add_constant("zero", Tensor::scalar(0i64));
        let one = g.add_constant("one", Tensor::scalar(1i64));
        let shp = node(
            &mut g,
            OpKind::Shape,
            &[buf0],
            "shp",
            i64_ty(&[Dim::Fixed(3)]),
        );
        let b = node_with(
            &mut g,
            OpKind::Gather,
            Attrs::new().with("axis", Attr::Int(0)),
            &[shp, zero],
            "b",
            i64_ty(&[]),
        );
        let range = node(
            &mut g,
            OpKind::Range,
            &[zero, b, one],
            "r",
            i64_ty(&[sym("b")]),
        );
        let col = g.add_constant("col", Tensor::from_vec(vec![2], vec![-1i64, 1]));
        let bcol = node(
            &mut g,
            OpKind::Reshape,
            &[range, col],
            "rc",
            i64_ty(&[sym("b"), Dim::Fixed(1)]),
        );
        let last = g.add_constant("last", Tensor::from_vec(vec![1], vec![-1i64]));
        let bi = node(
            &mut g,
            OpKind::Unsqueeze,
            &[bcol, last],
            "bi",
            i64_ty(&[sym("b"), Dim::Fixed(1), Dim::Fixed(1)]),
        );
        let bshape = node(
            &mut g,
            OpKind::Shape,
            &[bcol],
            "bs",
            i64_ty(&[Dim::Fixed(2)]),
        );
        let mut buf = buf0;
        for &t in order {
            let tv = g.add_constant(&format!("t{t}"), Tensor::from_vec(vec![1], vec![t]));
            let ts = g.add_constant(&format!("ts{t}"), Tensor::scalar(t));
            let e = node(
                &mut g,
                OpKind::Expand,
                &[tv, bshape],
                &format!("e{t}"),
                i64_ty(&[sym("b"), Dim::Fixed(1)]),
            );
            let eu = node(
                &mut g,
                OpKind::Unsqueeze,
                &[e, last],
                &format!("eu{t}"),
                i64_ty(&[sym("b"), Dim::Fixed(1), Dim::Fixed(1)]),
            );
            let idx = node_with(
                &mut g,
                OpKind::Concat,
                Attrs::new().with("axis", Attr::Int(-1)),
                &[bi, eu],
                &format!("i{t}"),
                i64_ty(&[sym("b"), Dim::Fixed(1), Dim::Fixed(2)]),
            );
            let row = node_with(
                &mut g,
                OpKind::Gather,
                Attrs::new().with("axis", Attr::Int(1)),
                &[x, ts],
                &format!("x{t}"),
                f32_sym(vec![sym("b"), Dim::Fixed(d as u64)]),
            );
            let h = node(
                &mut g,
                OpKind::Tanh,
                &[row],
                &format!("h{t}"),
                f32_sym(vec![sym("b"), Dim::Fixed(d as u64)]),
            );
            let rshape = g.add_constant(
                &format!("rs{t}"),
                Tensor::from_vec(vec![3], vec![-1i64, 1, d as i64]),
            );
            let upd = node(
                &mut g,
                OpKind::Reshape,
                &[h, rshape],
                &format!("u{t}"),
                f32_sym(fdims(1)),
            );
            buf = node(
                &mut g,
                OpKind::ScatterND,
                &[buf, idx, upd],
                &format!("s{t}"),
                f32_sym(fdims(steps)),
            );
        }
        g.outputs = vec![buf];
        g
    }

    fn run_on_batches(g: &Graph) -> Vec<Vec<Tensor>> {
        let mut rng = Rng::new(3);
        [1usize, 3]
            .iter()
            .map(|&b| {
                let ins: Vec<Tensor> = g
                    .inputs
                    .iter()
                    .map(|&v| {
                        let mut s: Vec<usize> = g
                            .ty(v)
                            .shape
                            .dims()
                            .unwrap()
                            .iter()
                            .map(|d| d.fixed().unwrap_or(0) as usize)
                            .collect();
                        s[0] = b;
                        rng.tensor(DType::F32, &s)
                    })
                    .collect();
                kiln_ir::run(g, ins).unwrap()
            })
            .collect()
    }

    #[test]
    fn rows_written_in_any_order_become_one_concat() {
        for order in [vec![0i64, 1, 2, 3], vec![2, 0, 3, 1]] {
            let mut g = torch_rows(&order, 4);
            kiln_ir::verify(&g).unwrap();
            let before = g.clone();
            let stats = StackRowScatters.run(&mut g).unwrap();
            assert_eq!(stats.counter("chains_stacked"), 1, "{order:?}");
            assert_eq!(stats.counter("rows_stacked"), 4);
            assert!(ops(&g).contains(&OpKind::Concat));
            assert!(!ops(&g).contains(&OpKind::ScatterND));
            kiln_ir::verify(&g).unwrap();
            // Bit for bit, at two batch sizes (the batch is symbolic).
            assert_eq!(run_on_batches(&before), run_on_batches(&g), "{order:?}");
        }
    }

    #[test]
    fn partial_repeated_or_read_chains_are_left_alone() {
        // A row missing: the buffer's initial contents survive there.
        let mut g = torch_rows(&[0, 1, 2], 4);
        assert!(StackRowScatters.run(&mut g).unwrap().is_noop());
        // A row written twice (and another never).
        let mut g = torch_rows(&[0, 1, 1, 3], 4);
        assert!(StackRowScatters.run(&mut g).unwrap().is_noop());
        // A middle state read by something else.
        let mut g = torch_rows(&[0, 1, 2, 3], 4);
        let mid = g
            .nodes
            .iter()
            .filter(|n| n.op == OpKind::ScatterND)
            .nth(1)
            .unwrap()
            .outputs[0];
        g.outputs.push(mid);
        assert!(StackRowScatters.run(&mut g).unwrap().is_noop());
    }

    #[test]
    fn indices_that_are_not_a_whole_row_are_left_alone() {
        // The batch coordinate is `expand([0], [B, 1])` instead of `range(0, B)`: every
        // write lands in batch row 0 only.
        let mut g = torch_rows(&[0, 1, 2, 3], 4);
        let r = g.nodes.iter().position(|n| n.op == OpKind::Range).unwrap();
        let zeros = g.add_constant("zeros", Tensor::from_vec(vec![1], vec![0i64]));
        let b = g.nodes[r].inputs[1].unwrap();
        let pos = g
            .nodes
            .iter()
            .position(|n| n.outputs == vec![zeros])
            .unwrap();
        let c = g.nodes.remove(pos);
        g.nodes.insert(0, c);
        // The target shape [b]: unsqueeze(b, [0]).
        let bv = g.add_value("bv", i64_ty(&[Dim::Fixed(1)]));
        let axes0 = g.add_constant("axes0", Tensor::from_vec(vec![1], vec![0i64]));
        let pos = g
            .nodes
            .iter()
            .position(|n| n.outputs == vec![axes0])
            .unwrap();
        let c = g.nodes.remove(pos);
        g.nodes.insert(0, c);
        let unsq = Node {
            op: OpKind::Unsqueeze,
            attrs: Attrs::new(),
            inputs: vec![Some(b), Some(axes0)],
            outputs: vec![bv],
            name: "bv".into(),
        };
        let r = g.nodes.iter().position(|n| n.op == OpKind::Range).unwrap();
        let out = g.nodes[r].outputs[0];
        g.nodes[r] = Node {
            op: OpKind::Expand,
            attrs: Attrs::new(),
            inputs: vec![Some(zeros), Some(bv)],
            outputs: vec![out],
            name: "e0".into(),
        };
        g.nodes.insert(r, unsq);
        kiln_ir::verify(&g).unwrap();
        let before = g.clone();
        assert!(StackRowScatters.run(&mut g).unwrap().is_noop());
        assert_eq!(run_on_batches(&before), run_on_batches(&g));
    }
}
