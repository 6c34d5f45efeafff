//! `centre_mean_invariant`: where EVERY reader of a value ignores a per-row shift along
//! the last axis, the constant weights producing it are centred, so the value becomes
//! mean-free (and the e-graph's `ln-to-rms-mean-free` can then turn the layer norms that
//! read it into RMS norms: the Pre-LN ⇔ Pre-RMSNorm equivalence).
//!
//! A value is *shift-invariant* when it is not a graph output, has readers, and each
//! reader is a last-axis `layer_norm` (its input 0), or an `add`/`sub` of the same shape
//! whose result is itself shift-invariant (a residual stream whose every reader is a
//! layer norm or another such sum). Computed in reverse topological order.
//! A shift-invariant value made by `x·W` or `x·W + c` (W `[K, N]` and c `[N]` constants)
//! may then take `centre(W)`, `centre(c)` (rows minus their means): each output row moves
//! by its own mean, which no reader sees. Every rewrite is exact up to f32 rounding.

use crate::{Pass, PassError, PassStats};
use kiln_ir::{Graph, OpKind, Tensor, TensorData, ValueId};
use std::collections::HashMap;
use std::sync::Arc;

/// Centres the weights of linears whose every consumer is mean-invariant.
#[derive(Clone, Copy, Debug, Default)]
pub struct CentreMeanInvariant;

/// Which values ignore a per-row shift along their last axis (see the module docs).
pub fn shift_invariant(g: &Graph) -> Vec<bool> {
    let mut uses: Vec<Vec<(usize, usize)>> = vec![vec![]; g.values.len()];
    for (ni, n) in g.nodes.iter().enumerate() {
        for (k, v) in n.inputs.iter().enumerate() {
            if let Some(u) = v.and_then(|v| uses.get_mut(v.index())) {
                u.push((ni, k));
            }
        }
    }
    let mut si = vec![false; g.values.len()];
    let is_output = |v: ValueId| g.outputs.contains(&v);
    for n in g.nodes.iter().rev() {
        for &v in &n.outputs {
            if is_output(v) || uses[v.index()].is_empty() {
                continue;
            }
            let ok = uses[v.index()].iter().all(|&(ni, k)| {
                let r = &g.nodes[ni];
                match r.op {
                    OpKind::LayerNorm => k == 0 && last_axis(g, r, v),
                    OpKind::Add | OpKind::Sub => r.outputs.first().is_some_and(|&o| {
                        si[o.index()] && {
                            let (a, b) = (&g.ty(v).shape, &g.ty(o).shape);
                            a.rank().is_some() && a == b
                        }
                    }),
                    _ => false,
                }
            });
            si[v.index()] = ok;
        }
    }
    si
}

fn last_axis(g: &Graph, n: &kiln_ir::Node, x: ValueId) -> bool {
    let rank = g.ty(x).shape.rank().map(|r| r as i64);
    let axis = n.attrs.int_or("axis", -1).ok();
    matches!((rank, axis), (Some(r), Some(a)) if a == -1 || a == r - 1)
}

/// `t` minus the mean of each row along its last axis (floats only).
fn centred(t: &Tensor) -> Option<Tensor> {
    let n = *t.shape().last()?;
    if !t.dtype().is_float() || n < 2 {
        return None;
    }
    // f32 (every weight so far): read in place, each element rounded once as below.
    if let Some(s) = t.as_slice::<f32>() {
        let out = crate::dense::centre_rows(s, n);
        return Some(Tensor::from_vec(t.shape().to_vec(), out));
    }
    let mut v = t.to_f64s();
    for row in v.chunks_mut(n) {
        let m = row.iter().sum::<f64>() / n as f64;
        row.iter_mut().for_each(|x| *x -= m);
    }
    Tensor::new(
        t.shape().to_vec(),
        TensorData::from_f64s(t.dtype(), v.into_iter()),
    )
    .ok()
}

/// Replaces input `k` of node `ni` with a new constant (inserted first, so the order
/// stays topological).
fn swap_constant(g: &mut Graph, ni: usize, k: usize, t: Tensor) {
    let old = g.nodes[ni].inputs[k];
    let base = old.map_or("w".to_string(), |v| g.value(v).name.clone()) + ".centred";
    let mut name = base.clone();
    let mut i = 1;
    while g.values.iter().any(|v| v.name == name) {
        i += 1;
        name = format!("{base}{i}");
    }
    let v = g.add_constant(&name, t);
    if let Some(node) = g.nodes.pop() {
        g.nodes.insert(0, node);
    }
    g.nodes[ni + 1].inputs[k] = Some(v);
}

impl Pass for CentreMeanInvariant {
    fn name(&self) -> &'static str {
        "centre_mean_invariant"
    }

    fn run(&self, g: &mut Graph) -> Result<PassStats, PassError> {
        crate::rewrite::check_ids(g).map_err(|m| PassError::graph(self.name(), m))?;
        let si = shift_invariant(g);
        let mut stats = PassStats::default();
        // (node index, input index, centred tensor), found first, applied after.
        let mut edits: Vec<(usize, usize, Tensor)> = vec![];
        let producers = g.producers();
        let konst = |v: Option<ValueId>| v.and_then(|v| g.constant_value(v));
        let matrix = |t: &Arc<Tensor>| t.shape().len() == 2;
        let mut readers: HashMap<ValueId, usize> = HashMap::new();
        for n in &g.nodes {
            for v in n.inputs.iter().flatten() {
                *readers.entry(*v).or_default() += 1;
            }
        }
        for (ni, n) in g.nodes.iter().enumerate() {
            let Some(&out) = n.outputs.first() else {
                continue;
            };
            if !si[out.index()] {
                continue;
            }
            match n.op {
                OpKind::MatMul => {
                    if let Some(w) = konst(n.inputs.get(1).copied().flatten())
                        .filter(matrix)
                        .and_then(|w| centred(&w))
                    {
                        edits.push((ni, 1, w));
                    }
                }
                OpKind::Add => {
                    // x·W + c or c + x·W, the product read only here.
                    for (m, c) in [(0, 1), (1, 0)] {
                        let (Some(mv), Some(cv)) = (
                            n.inputs.get(m).copied().flatten(),
                            konst(n.inputs.get(c).copied().flatten()),
                        ) else {
                            continue;
                        };
                        let Some(&pi) = producers.get(&mv) else {
                            continue;
                        };
                        let p = &g.nodes[pi];
                        let w = konst(p.inputs.get(1).copied().flatten()).filter(matrix);
                        let private = readers.get(&mv) == Some(&1) && !g.outputs.contains(&mv);
                        if p.op != OpKind::MatMul || !private || cv.shape().len() != 1 {
                            continue;
                        }
                        // A shift-invariant product has its W centred by its own arm
                        // (not computed twice: these are the model's largest weights).
                        let w = match (si[mv.index()], w) {
                            (true, Some(_)) => None,
                            (false, Some(w)) => match centred(&w) {
                                Some(w) => Some(w),
                                None => continue,
                            },
                            (_, None) => continue,
                        };
                        if let Some(cc) = centred(&cv) {
                            if let Some(w) = w {
                                edits.push((pi, 1, w));
                            }
                            edits.push((ni, c, cc));
                            break;
                        }
                    }
                }
                _ => {}
            }
        }
        // Each new constant goes first, moving every node one place down.
        let n_edits = edits.len();
        for (shift, (ni, k, t)) in edits.into_iter().enumerate() {
            swap_constant(g, ni + shift, k, t);
        }
        stats.changed = n_edits;
        stats.added = n_edits;
        stats.bump("weights_centred", n_edits);
        Ok(stats)
    }
}
