//! `simplify_ops`: peephole removal of ops that do nothing, and composition of layout ops
//! that cancel or chain. Every rewrite here is exact (the result is bit-identical):
//!
//! - `identity(x)` → `x`
//! - `cast(x, to = dtype(x))`, `cast_like(x, y)` with `dtype(x) = dtype(y)` → `x`
//! - `transpose(x, perm = [0, 1, .., n-1])` → `x`
//! - `transpose(transpose(x, p), q)` → `transpose(x, p∘q)`, with `(p∘q)[i] = p[q[i]]`
//! - `reshape(x, s)` → `x` when the declared result type equals `x`'s type and both are
//!   fully known (fixed sizes, or the same symbols, which are equal by definition)
//! - `reshape(reshape(x, s1), s2)` → `reshape(x, s2)` when `s2` is a constant without
//!   `0` entries (a `0` copies a dim of the *intermediate* shape) or `allowzero = 1`
//!
//! A value that is a graph output and would be replaced by a graph input or another
//! output is left alone (removing the op would only bring back an `identity`).

use crate::rewrite::{self, Subst};
use crate::{Pass, PassError, PassStats};
use kiln_ir::{Attr, DType, Dim, Graph, OpKind, ValueId};

/// Peephole simplification of no-op and chained layout ops.
#[derive(Clone, Copy, Debug, Default)]
pub struct SimplifyOps;

const NAME: &str = "simplify_ops";

/// Passes over the graph until nothing changes, at most this many times.
const MAX_ROUNDS: usize = 8;

impl Pass for SimplifyOps {
    fn name(&self) -> &'static str {
        NAME
    }

    fn run(&self, g: &mut Graph) -> Result<PassStats, PassError> {
        rewrite::check_ids(g).map_err(|m| PassError::graph(NAME, m))?;
        let mut stats = PassStats::default();
        for _ in 0..MAX_ROUNDS {
            let round = simplify_round(g)?;
            if round.is_noop() {
                break;
            }
            stats.merge(round);
        }
        Ok(stats)
    }
}

/// One forward walk. Nodes are rewritten in place or their result is replaced by an
/// operand; dead producers are removed at the end.
fn simplify_round(g: &mut Graph) -> Result<PassStats, PassError> {
    let mut stats = PassStats::default();
    let producers = rewrite::producers(g);
    let mut subst = Subst::new(g);
    for i in 0..g.nodes.len() {
        subst.rewrite_inputs(&mut g.nodes[i]);
        let op = g.nodes[i].op;
        let Some(&out) = g.nodes[i].outputs.first() else {
            continue;
        };
        let x = g.nodes[i].inputs.first().copied().flatten();
        let forward = match (op, x) {
            (OpKind::Identity, Some(x)) => Some((x, "identity_removed")),
            (OpKind::Cast, Some(x)) => {
                let to = g.nodes[i]
                    .attrs
                    .string("to")
                    .map_err(|m| PassError::at(NAME, label(g, out), m))?;
                let to: Option<DType> = to.and_then(|s| s.parse().ok());
                (to == Some(g.ty(x).dtype)).then_some((x, "cast_removed"))
            }
            (OpKind::CastLike, Some(x)) => {
                let like = g.nodes[i].inputs.get(1).copied().flatten();
                like.filter(|&l| g.ty(l).dtype == g.ty(x).dtype)
                    .map(|_| (x, "cast_removed"))
            }
            (OpKind::Transpose, Some(x)) => {
                let (x, perm) = compose_transposes(g, &producers, i, x, &mut stats)
                    .map_err(|m| PassError::at(NAME, label(g, out), m))?;
                let identity =
                    perm.is_some_and(|p| p.iter().enumerate().all(|(k, &d)| d == k as i64));
                identity.then_some((x, "transpose_removed"))
            }
            (OpKind::Reshape, Some(x)) => {
                let x = compose_reshapes(g, &producers, i, x, &mut stats)
                    .map_err(|m| PassError::at(NAME, label(g, out), m))?;
                same_known_type(g, x, out).then_some((x, "reshape_removed"))
            }
            _ => None,
        };
        if let Some((x, counter)) = forward {
            let to = subst.resolve(x);
            if g.nodes[i].outputs.len() == 1 && !rewrite::replacement_needs_identity(g, out, to) {
                subst.replace(out, to);
                stats.changed += 1;
                stats.bump(counter, 1);
            }
        }
    }
    subst.apply(g);
    stats.removed = rewrite::remove_dead(g);
    Ok(stats)
}

/// How errors name a node: by its first result.
fn label(g: &Graph, out: ValueId) -> String {
    format!("%{}", g.value(out).name)
}

/// A transpose's permutation: its `perm`, or the reversal of `rank` dims by default.
fn perm_of(g: &Graph, node: usize, rank: Option<usize>) -> Result<Option<Vec<i64>>, String> {
    Ok(match g.nodes[node].attrs.ints("perm")? {
        Some(p) => Some(p),
        None => rank.map(|r| (0..r as i64).rev().collect()),
    })
}

fn is_permutation(p: &[i64]) -> bool {
    let mut seen = vec![false; p.len()];
    p.iter().all(|&d| {
        usize::try_from(d)
            .ok()
            .and_then(|d| seen.get_mut(d))
            .is_some_and(|s| !std::mem::replace(s, true))
    })
}

/// Folds `transpose(transpose(y, p), q)` at node `i` into `transpose(y, p∘q)` in place.
/// Returns the node's (possibly new) operand and its permutation, if known.
fn compose_transposes(
    g: &mut Graph,
    producers: &[Option<usize>],
    i: usize,
    x: ValueId,
    stats: &mut PassStats,
) -> Result<(ValueId, Option<Vec<i64>>), String> {
    let q = perm_of(g, i, g.ty(x).shape.rank())?;
    let inner = producers.get(x.index()).copied().flatten();
    let (Some(q), Some(j)) = (q.clone(), inner) else {
        return Ok((x, q));
    };
    if g.nodes[j].op != OpKind::Transpose {
        return Ok((x, Some(q)));
    }
    let Some(y) = g.nodes[j].inputs.first().copied().flatten() else {
        return Ok((x, Some(q)));
    };
    let Some(p) = perm_of(g, j, g.ty(y).shape.rank())? else {
        return Ok((x, Some(q)));
    };
    if p.len() != q.len() || !is_permutation(&p) || !is_permutation(&q) {
        return Ok((x, Some(q)));
    }
    // Checked above: every entry of q indexes p.
    let composed: Vec<i64> = q.iter().map(|&k| p[k as usize]).collect();
    let node = &mut g.nodes[i];
    node.inputs[0] = Some(y);
    node.attrs.set("perm", Attr::Ints(composed.clone()));
    stats.changed += 1;
    stats.bump("transposes_composed", 1);
    Ok((y, Some(composed)))
}

/// Folds `reshape(reshape(y, s1), s2)` at node `i` into `reshape(y, s2)` in place when
/// that is exact. Returns the node's (possibly new) data operand.
fn compose_reshapes(
    g: &mut Graph,
    producers: &[Option<usize>],
    i: usize,
    x: ValueId,
    stats: &mut PassStats,
) -> Result<ValueId, String> {
    let Some(j) = producers.get(x.index()).copied().flatten() else {
        return Ok(x);
    };
    if g.nodes[j].op != OpKind::Reshape {
        return Ok(x);
    }
    let Some(y) = g.nodes[j].inputs.first().copied().flatten() else {
        return Ok(x);
    };
    let Some(target) = g.nodes[i].inputs.get(1).copied().flatten() else {
        return Ok(x);
    };
    let Some(shape) = g.constant_value(target) else {
        return Ok(x);
    };
    let allowzero = g.nodes[i].attrs.int_or("allowzero", 0)? != 0;
    if !allowzero && shape.to_i64s().contains(&0) {
        return Ok(x);
    }
    g.nodes[i].inputs[0] = Some(y);
    stats.changed += 1;
    stats.bump("reshapes_composed", 1);
    Ok(y)
}

/// True if both values have the same fully known type (no unknown dims).
fn same_known_type(g: &Graph, a: ValueId, b: ValueId) -> bool {
    let (ta, tb) = (g.ty(a), g.ty(b));
    ta == tb
        && ta
            .shape
            .dims()
            .is_some_and(|d| d.iter().all(|d| !matches!(d, Dim::Unknown)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use kiln_ir::{Attrs, Shape, Tensor, TensorType};

    fn simplify(g: &mut Graph) -> PassStats {
        SimplifyOps.run(g).unwrap()
    }

    fn transpose(g: &mut Graph, x: ValueId, perm: &[i64], name: &str, dims: &[usize]) -> ValueId {
        let attrs = Attrs::new().with("perm", Attr::Ints(perm.to_vec()));
        node_with(g, OpKind::Transpose, attrs, &[x], name, f32_ty(dims))
    }

    #[test]
    fn identity_chain_is_removed_and_output_name_kept() {
        let mut g = Graph::new("g");
        let x = g.add_input("x", f32_ty(&[2]));
        let r = node(&mut g, OpKind::Relu, &[x], "r", f32_ty(&[2]));
        let i1 = node(&mut g, OpKind::Identity, &[r], "i1", f32_ty(&[2]));
        let i2 = node(&mut g, OpKind::Identity, &[i1], "out", f32_ty(&[2]));
        g.outputs = vec![i2];
        let stats = simplify(&mut g);
        assert_eq!(stats.counter("identity_removed"), 2);
        assert_eq!(ops(&g), vec![OpKind::Relu]);
        assert_eq!(g.value(g.outputs[0]).name, "out");
        assert_eq!(g.outputs[0], g.nodes[0].outputs[0]);
    }

    #[test]
    fn identity_from_input_to_output_stays() {
        let mut g = Graph::new("g");
        let x = g.add_input("x", f32_ty(&[2]));
        let y = node(&mut g, OpKind::Identity, &[x], "y", f32_ty(&[2]));
        g.outputs = vec![y];
        let before = g.clone();
        assert!(simplify(&mut g).is_noop());
        assert_eq!(g, before);
    }

    #[test]
    fn cast_to_same_dtype_is_removed_other_casts_stay() {
        let mut g = Graph::new("g");
        let x = g.add_input("x", f32_ty(&[2]));
        let cast = |to: &str| Attrs::new().with("to", Attr::Str(to.into()));
        let same = node_with(
            &mut g,
            OpKind::Cast,
            cast("f32"),
            &[x],
            "same",
            f32_ty(&[2]),
        );
        let r = node(&mut g, OpKind::Relu, &[same], "r", f32_ty(&[2]));
        let i64_ty = TensorType::new(DType::I64, Shape::fixed(&[2]));
        let other = node_with(&mut g, OpKind::Cast, cast("i64"), &[r], "other", i64_ty);
        g.outputs = vec![other];
        let stats = simplify(&mut g);
        assert_eq!(stats.counter("cast_removed"), 1);
        assert_eq!(ops(&g), vec![OpKind::Relu, OpKind::Cast]);
        assert_eq!(g.nodes[0].inputs, vec![Some(x)]);
    }

    #[test]
    fn cast_with_malformed_to_attribute_is_an_error_naming_the_value() {
        let mut g = Graph::new("g");
        let x = g.add_input("x", f32_ty(&[2]));
        let attrs = Attrs::new().with("to", Attr::Int(1));
        let c = node_with(&mut g, OpKind::Cast, attrs, &[x], "c", f32_ty(&[2]));
        g.outputs = vec![c];
        let e = SimplifyOps.run(&mut g).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("running pass simplify_ops on %c: "),
            "{e}"
        );
    }

    #[test]
    fn transposes_compose_and_cancel() {
        let mut g = Graph::new("g");
        let x = g.add_input("x", f32_ty(&[2, 3, 4]));
        let t1 = transpose(&mut g, x, &[1, 2, 0], "t1", &[3, 4, 2]);
        let t2 = transpose(&mut g, t1, &[2, 0, 1], "t2", &[2, 3, 4]);
        let r = node(&mut g, OpKind::Relu, &[t2], "r", f32_ty(&[2, 3, 4]));
        let t3 = transpose(&mut g, r, &[0, 2, 1], "t3", &[2, 4, 3]);
        let t4 = transpose(&mut g, t3, &[2, 0, 1], "out", &[3, 2, 4]);
        g.outputs = vec![t4];
        let stats = simplify(&mut g);
        assert_eq!(stats.counter("transposes_composed"), 2);
        assert_eq!(stats.counter("transpose_removed"), 1);
        assert_eq!(ops(&g), vec![OpKind::Relu, OpKind::Transpose]);
        assert_eq!(g.nodes[0].inputs, vec![Some(x)]);
        // t4(t3(r)): out[i] = t3[q[i]] = r[p[q[i]]] with p = [0,2,1], q = [2,0,1].
        assert_eq!(g.nodes[1].attrs.ints("perm").unwrap(), Some(vec![1, 0, 2]));
        assert_eq!(g.value(g.outputs[0]).name, "out");
    }

    #[test]
    fn default_perm_transposes_cancel_and_identity_perm_is_removed() {
        let mut g = Graph::new("g");
        let x = g.add_input("x", f32_ty(&[2, 3]));
        let t1 = node(&mut g, OpKind::Transpose, &[x], "t1", f32_ty(&[3, 2]));
        let t2 = node(&mut g, OpKind::Transpose, &[t1], "t2", f32_ty(&[2, 3]));
        let r = node(&mut g, OpKind::Relu, &[t2], "r", f32_ty(&[2, 3]));
        let t3 = transpose(&mut g, r, &[0, 1], "t3", &[2, 3]);
        let e = node(&mut g, OpKind::Exp, &[t3], "e", f32_ty(&[2, 3]));
        g.outputs = vec![e];
        simplify(&mut g);
        assert_eq!(ops(&g), vec![OpKind::Relu, OpKind::Exp]);
        assert_eq!(g.nodes[0].inputs, vec![Some(x)]);
    }

    fn shape_const(g: &mut Graph, name: &str, s: &[i64]) -> ValueId {
        g.add_constant(name, Tensor::from_vec(vec![s.len()], s.to_vec()))
    }

    #[test]
    fn reshape_to_same_shape_is_removed_including_symbolic() {
        let mut g = Graph::new("g");
        let ty = TensorType::new(
            DType::F32,
            Shape::new(vec![Dim::Sym("B".into()), Dim::Fixed(4)]),
        );
        let x = g.add_input("x", ty.clone());
        let s = shape_const(&mut g, "s", &[-1, 4]);
        let r = node(&mut g, OpKind::Reshape, &[x, s], "r", ty.clone());
        let e = node(&mut g, OpKind::Exp, &[r], "e", ty);
        g.outputs = vec![e];
        let stats = simplify(&mut g);
        assert_eq!(stats.counter("reshape_removed"), 1);
        assert_eq!(ops(&g), vec![OpKind::Exp]);
    }

    #[test]
    fn reshape_with_unknown_dims_is_kept() {
        let mut g = Graph::new("g");
        let ty = TensorType::new(DType::F32, Shape::new(vec![Dim::Unknown, Dim::Fixed(4)]));
        let x = g.add_input("x", ty.clone());
        let s = shape_const(&mut g, "s", &[-1, 4]);
        let r = node(&mut g, OpKind::Reshape, &[x, s], "r", ty);
        g.outputs = vec![r];
        assert!(simplify(&mut g).is_noop());
        assert_eq!(ops(&g), vec![OpKind::Constant, OpKind::Reshape]);
    }

    #[test]
    fn reshape_chains_compose_unless_the_outer_copies_dims() {
        let mut g = Graph::new("g");
        let x = g.add_input("x", f32_ty(&[2, 3, 4]));
        let s1 = shape_const(&mut g, "s1", &[6, 4]);
        let s2 = shape_const(&mut g, "s2", &[2, -1]);
        let s3 = shape_const(&mut g, "s3", &[0, 3, 4]);
        let r1 = node(&mut g, OpKind::Reshape, &[x, s1], "r1", f32_ty(&[6, 4]));
        let r2 = node(&mut g, OpKind::Reshape, &[r1, s2], "r2", f32_ty(&[2, 12]));
        let r3 = node(&mut g, OpKind::Reshape, &[r1, s3], "r3", f32_ty(&[6, 3, 4]));
        g.outputs = vec![r2, r3];
        let stats = simplify(&mut g);
        assert_eq!(stats.counter("reshapes_composed"), 1);
        let r2_node = g
            .nodes
            .iter()
            .find(|n| g.value(n.outputs[0]).name == "r2")
            .unwrap();
        assert_eq!(r2_node.inputs[0], Some(x));
        let r3_node = g
            .nodes
            .iter()
            .find(|n| g.value(n.outputs[0]).name == "r3")
            .unwrap();
        assert_eq!(g.value(r3_node.inputs[0].unwrap()).name, "r1");
    }

    #[test]
    fn reshape_back_to_input_shape_collapses_entirely() {
        let mut g = Graph::new("g");
        let x = g.add_input("x", f32_ty(&[2, 3]));
        let s1 = shape_const(&mut g, "s1", &[6]);
        let s2 = shape_const(&mut g, "s2", &[2, 3]);
        let r1 = node(&mut g, OpKind::Reshape, &[x, s1], "r1", f32_ty(&[6]));
        let r2 = node(&mut g, OpKind::Reshape, &[r1, s2], "r2", f32_ty(&[2, 3]));
        let e = node(&mut g, OpKind::Exp, &[r2], "e", f32_ty(&[2, 3]));
        g.outputs = vec![e];
        simplify(&mut g);
        assert_eq!(ops(&g), vec![OpKind::Exp]);
        assert_eq!(g.nodes[0].inputs, vec![Some(x)]);
    }

    #[test]
    fn simplifications_preserve_results_numerically() {
        let mut g = Graph::new("g");
        let x = g.add_input("x", f32_ty(&[2, 3, 4]));
        let i = node(&mut g, OpKind::Identity, &[x], "i", f32_ty(&[2, 3, 4]));
        let cast = Attrs::new().with("to", Attr::Str("f32".into()));
        let c = node_with(&mut g, OpKind::Cast, cast, &[i], "c", f32_ty(&[2, 3, 4]));
        let t1 = transpose(&mut g, c, &[1, 2, 0], "t1", &[3, 4, 2]);
        let t2 = transpose(&mut g, t1, &[0, 2, 1], "t2", &[3, 2, 4]);
        let s1 = shape_const(&mut g, "s1", &[6, 4]);
        let s2 = shape_const(&mut g, "s2", &[4, -1]);
        let r1 = node(&mut g, OpKind::Reshape, &[t2, s1], "r1", f32_ty(&[6, 4]));
        let r2 = node(&mut g, OpKind::Reshape, &[r1, s2], "r2", f32_ty(&[4, 6]));
        let out = node(&mut g, OpKind::Relu, &[r2], "out", f32_ty(&[4, 6]));
        g.outputs = vec![out];
        let before = g.clone();
        simplify(&mut g);
        assert_eq!(
            ops(&g),
            vec![
                OpKind::Transpose,
                OpKind::Constant,
                OpKind::Reshape,
                OpKind::Relu
            ]
        );
        kiln_ir::verify(&g).unwrap();
        assert_same_outputs(&before, &g);
    }
}
