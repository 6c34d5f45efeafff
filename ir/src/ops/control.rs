//! The control op family (if, loop, scan): ops whose attributes hold subgraphs. Shape
//! rules and reference semantics side by side; the iteration drivers of `loop` and `scan`
//! are shared with the CPU runtime, which runs a compiled body where the interpreter runs
//! the body graph.
//!
//! Subgraphs are closed: every outer value a body reads is an explicit operand of its
//! node (a *capture*), passed after the op's own operands, and the body takes it as an
//! input in the same position. The `num_captures` attribute (absent: 0) says how many
//! trailing operands are captures.
//!
//! - `if(cond, captures...) {then_branch, else_branch}`: each branch is a graph whose inputs
//!   are the captures, in order; the op's outputs are the chosen branch's outputs.
//! - `loop(max_trip?, cond?, carried..., captures...) {body}` (ONNX `Loop`): `body` takes
//!   `(iter: i64[], cond: bool[], carried..., captures...)` and returns
//!   `(cond, carried..., scanned...)`. It runs while `cond` holds and `iter < max_trip`
//!   (an omitted trip count or condition does not limit); the outputs are the final
//!   carried values, then each scanned value of every iteration stacked on a new axis 0.
//! - `scan(state..., scanned..., captures...) {body}` (ONNX `Scan`, opset 9 on):
//!   `num_scan_inputs` of the operands are sliced along `scan_input_axes` (one step per
//!   slice, last-to-first where `scan_input_directions` is 1); `body` takes
//!   `(state..., slices..., captures...)` and returns `(state..., scan outputs...)`; the
//!   outputs are the final state, then the scan outputs stacked along `scan_output_axes`
//!   (in reverse step order where `scan_output_directions` is 1).

use super::movement::{gathered, int_scalar, transpose_map};
use super::{arg, not_in_family, opt_arg, Fact};
use crate::{Attrs, DType, Dim, Graph, OpKind, Shape, Tensor, TensorData, TensorType};

/// Shape rule of the control ops.
pub fn infer(op: OpKind, attrs: &Attrs, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>, String> {
    match op {
        OpKind::If => {
            let cond = arg(inputs, 0)?;
            let then_g = attrs.req_graph("then_branch")?;
            let else_g = attrs.req_graph("else_branch")?;
            let then_t = body_types(&then_g)?;
            let else_t = body_types(&else_g)?;
            if then_t.len() != else_t.len() {
                return Err(format!(
                    "then_branch has {} outputs, else_branch {}",
                    then_t.len(),
                    else_t.len()
                ));
            }
            // A constant condition picks its branch's types exactly.
            if let Some(c) = cond.konst.as_ref().and_then(|k| truth(k).ok()) {
                let t = if c { then_t } else { else_t };
                return Ok(t.into_iter().map(Fact::of).collect());
            }
            then_t
                .into_iter()
                .zip(else_t)
                .map(|(a, b)| {
                    if a.dtype != b.dtype {
                        return Err(format!("branches give {} and {}", a.dtype, b.dtype));
                    }
                    Ok(Fact::of(TensorType::new(a.dtype, join(&a.shape, &b.shape))))
                })
                .collect()
        }
        OpKind::Loop => infer_loop(attrs, inputs),
        OpKind::Scan => infer_scan(attrs, inputs),
        _ => Err(not_in_family(op)),
    }
}

/// Reference semantics of the control ops.
pub fn eval(op: OpKind, attrs: &Attrs, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
    match op {
        OpKind::If => {
            let cond = truth(arg(inputs, 0)?)?;
            let g = attrs.req_graph(if cond { "then_branch" } else { "else_branch" })?;
            let mut captures = Vec::with_capacity(inputs.len().saturating_sub(1));
            for (i, t) in inputs.iter().enumerate().skip(1) {
                captures.push(
                    (*t).ok_or_else(|| format!("capture #{i} is missing"))?
                        .clone(),
                );
            }
            crate::interp::run(&g, captures)
                .map_err(|e| format!("in {} branch: {e}", if cond { "then" } else { "else" }))
        }
        OpKind::Loop | OpKind::Scan => {
            let body = attrs.req_graph("body")?;
            let mut run =
                |ins: Vec<Tensor>| crate::interp::run(&body, ins).map_err(|e| e.to_string());
            if op == OpKind::Loop {
                run_loop(attrs, inputs, &body, &mut run)
            } else {
                run_scan(attrs, inputs, &body, &mut run)
            }
        }
        _ => Err(not_in_family(op)),
    }
}

/// The value of a one-element condition.
fn truth(t: &Tensor) -> Result<bool, String> {
    match t.to_f64s().as_slice() {
        [x] => Ok(*x != 0.0),
        v => Err(format!(
            "the condition must be one element, has {}",
            v.len()
        )),
    }
}

/// A subgraph's output types: inferred where inference succeeds, else as declared.
fn body_types(g: &Graph) -> Result<Vec<TensorType>, String> {
    let facts = crate::infer::facts(g).ok();
    g.outputs
        .iter()
        .map(|o| {
            let inferred = facts.as_ref().and_then(|f| f.get(o.index())).map(|f| &f.ty);
            let declared = g.values.get(o.index()).map(|v| &v.ty);
            inferred
                .or(declared)
                .cloned()
                .ok_or_else(|| format!("subgraph `{}` has an undefined output", g.name))
        })
        .collect()
}

/// The shape both of two shapes fit: equal dims kept, differing ones unknown.
fn join(a: &Shape, b: &Shape) -> Shape {
    match (a.dims(), b.dims()) {
        (Some(x), Some(y)) if x.len() == y.len() => Shape::new(
            x.iter()
                .zip(y)
                .map(|(p, q)| if p == q { p.clone() } else { Dim::Unknown })
                .collect(),
        ),
        _ => Shape::unknown(),
    }
}

/// `shape` with `d` inserted at `axis` (normalised against the new rank).
fn insert_dim(shape: &Shape, axis: i64, d: Dim) -> Result<Shape, String> {
    let Some(dims) = shape.dims() else {
        return Ok(Shape::unknown());
    };
    let r = dims.len() as i64 + 1;
    let a = if axis < 0 { axis + r } else { axis };
    if !(0..r).contains(&a) {
        return Err(format!(
            "scan output axis {axis} is out of range for rank {r}"
        ));
    }
    let mut v = dims.to_vec();
    v.insert(a as usize, d);
    Ok(Shape::new(v))
}

/// How many trailing operands are captures (`num_captures`, absent: 0).
fn num_captures(attrs: &Attrs) -> Result<usize, String> {
    let k = attrs.int_or("num_captures", 0)?;
    usize::try_from(k).map_err(|_| format!("num_captures is {k}, must be at least 0"))
}

/// The operand layout of a `loop` node, checked against its body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoopParts {
    /// Carried values.
    pub carried: usize,
    /// Captured outer values.
    pub captures: usize,
    /// Values the body returns per iteration that are stacked into outputs.
    pub scanned: usize,
}

/// Checks the arities of a `loop` node with `n_inputs` operands against its body.
pub fn loop_parts(attrs: &Attrs, n_inputs: usize, body: &Graph) -> Result<LoopParts, String> {
    let k = num_captures(attrs)?;
    if n_inputs < 2 + k {
        return Err(format!(
            "loop takes a trip count and a condition (`_` where omitted), the carried values \
             and {k} captures; it has {n_inputs} operands"
        ));
    }
    let n = n_inputs - 2 - k;
    if body.inputs.len() != n_inputs {
        return Err(format!(
            "body `@{}` takes {} inputs, but the loop passes {n_inputs} (iteration number, \
             condition, {n} carried values, {k} captures)",
            body.name,
            body.inputs.len()
        ));
    }
    if body.outputs.len() < 1 + n {
        return Err(format!(
            "body `@{}` returns {} values; it must return the condition and the {n} carried \
             values first",
            body.name,
            body.outputs.len()
        ));
    }
    Ok(LoopParts {
        carried: n,
        captures: k,
        scanned: body.outputs.len() - 1 - n,
    })
}

/// The operand layout of a `scan` node, checked against its body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScanParts {
    /// State values.
    pub state: usize,
    /// Scanned inputs.
    pub scanned: usize,
    /// Captured outer values.
    pub captures: usize,
    /// Scan outputs.
    pub outputs: usize,
    /// Per scanned input: the axis it is sliced along (possibly negative).
    pub in_axes: Vec<i64>,
    /// Per scanned input: whether it is read last-to-first.
    pub in_reverse: Vec<bool>,
    /// Per scan output: the axis it is stacked along (possibly negative).
    pub out_axes: Vec<i64>,
    /// Per scan output: whether it is stacked last-to-first.
    pub out_reverse: Vec<bool>,
}

/// Checks the arities and axis attributes of a `scan` node against its body.
pub fn scan_parts(attrs: &Attrs, n_inputs: usize, body: &Graph) -> Result<ScanParts, String> {
    let k = num_captures(attrs)?;
    let m = attrs.req_int("num_scan_inputs")?;
    let m = usize::try_from(m)
        .ok()
        .filter(|&m| m >= 1)
        .ok_or_else(|| format!("num_scan_inputs is {m}, must be at least 1"))?;
    if n_inputs < m + k {
        return Err(format!(
            "scan has {n_inputs} operands, fewer than its {m} scanned inputs and {k} captures"
        ));
    }
    let n = n_inputs - m - k;
    if body.inputs.len() != n_inputs {
        return Err(format!(
            "body `@{}` takes {} inputs, but the scan passes {n_inputs} ({n} state values, \
             {m} slices, {k} captures)",
            body.name,
            body.inputs.len()
        ));
    }
    if body.outputs.len() < n {
        return Err(format!(
            "body `@{}` returns {} values, fewer than the {n} state values",
            body.name,
            body.outputs.len()
        ));
    }
    let s = body.outputs.len() - n;
    let list = |name: &str, len: usize| -> Result<Vec<i64>, String> {
        let v = attrs.ints_or(name, vec![0; len])?;
        if v.len() != len {
            return Err(format!("{name} has {} entries, expected {len}", v.len()));
        }
        Ok(v)
    };
    let dirs = |name: &str, len: usize| -> Result<Vec<bool>, String> {
        list(name, len)?
            .into_iter()
            .map(|d| match d {
                0 => Ok(false),
                1 => Ok(true),
                _ => Err(format!("{name} holds {d}; a direction is 0 or 1")),
            })
            .collect()
    };
    Ok(ScanParts {
        state: n,
        scanned: m,
        captures: k,
        outputs: s,
        in_axes: list("scan_input_axes", m)?,
        in_reverse: dirs("scan_input_directions", m)?,
        out_axes: list("scan_output_axes", s)?,
        out_reverse: dirs("scan_output_directions", s)?,
    })
}

/// Checks that a body input is declared with the dtype the node passes it.
fn check_body_input(body: &Graph, i: usize, what: &str, got: DType) -> Result<(), String> {
    let want = body.ty(body.inputs[i]).dtype;
    if want != got {
        return Err(format!(
            "body input #{i} ({what}) is declared {want}, but the node passes {got}"
        ));
    }
    Ok(())
}

/// The final types of carried values: what enters, joined with what the body returns.
fn carried_facts(
    inputs: &[Option<&Fact>],
    first: usize,
    body: &Graph,
    body_first_in: usize,
    outs: &[TensorType],
    n: usize,
) -> Result<Vec<Fact>, String> {
    (0..n)
        .map(|i| {
            let init = arg(inputs, first + i)?;
            check_body_input(body, body_first_in + i, "a carried value", init.ty.dtype)?;
            let out = &outs[i];
            if out.dtype != init.ty.dtype {
                return Err(format!(
                    "carried value #{i} enters as {} but the body returns {}",
                    init.ty, out
                ));
            }
            Ok(Fact::of(TensorType::new(
                out.dtype,
                join(&init.ty.shape, &out.shape),
            )))
        })
        .collect()
}

fn infer_loop(attrs: &Attrs, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>, String> {
    let body = attrs.req_graph("body")?;
    let p = loop_parts(attrs, inputs.len(), &body)?;
    let outs = body_types(&body)?;
    if let Some(m) = opt_arg(inputs, 0) {
        if !m.ty.dtype.is_int() {
            return Err(format!("the trip count must be an integer, is {}", m.ty));
        }
    }
    if let Some(c) = opt_arg(inputs, 1) {
        if c.ty.dtype != DType::Bool {
            return Err(format!("the condition must be bool, is {}", c.ty));
        }
    }
    check_body_input(&body, 0, "the iteration number", DType::I64)?;
    check_body_input(&body, 1, "the condition", DType::Bool)?;
    if outs[0].dtype != DType::Bool {
        return Err(format!(
            "the body's first result is the condition and must be bool, is {}",
            outs[0]
        ));
    }
    for c in 0..p.captures {
        let i = inputs.len() - p.captures + c;
        check_body_input(&body, i, "a capture", arg(inputs, i)?.ty.dtype)?;
    }
    let mut res = carried_facts(inputs, 2, &body, 2, &outs[1..], p.carried)?;
    // A constant trip count without a condition fixes the number of iterations.
    let trips = match (
        opt_arg(inputs, 0).and_then(|m| m.konst.as_ref()),
        opt_arg(inputs, 1),
    ) {
        (Some(k), None) => int_scalar(k, "the trip count")
            .map(|m| Dim::Fixed(m.max(0) as u64))
            .unwrap_or(Dim::Unknown),
        _ => Dim::Unknown,
    };
    for t in &outs[1 + p.carried..] {
        res.push(Fact::of(TensorType::new(
            t.dtype,
            insert_dim(&t.shape, 0, trips.clone())?,
        )));
    }
    Ok(res)
}

fn infer_scan(attrs: &Attrs, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>, String> {
    let body = attrs.req_graph("body")?;
    let p = scan_parts(attrs, inputs.len(), &body)?;
    let outs = body_types(&body)?;
    let mut res = carried_facts(inputs, 0, &body, 0, &outs, p.state)?;
    // The sequence length: the scanned axis of every scanned input, which must agree.
    let mut steps = Dim::Unknown;
    for j in 0..p.scanned {
        let x = arg(inputs, p.state + j)?;
        check_body_input(&body, p.state + j, "a slice", x.ty.dtype)?;
        if let Some(dims) = x.ty.shape.dims() {
            let a = super::movement::axis(p.in_axes[j], dims.len())
                .map_err(|e| format!("scanned input #{j}: {e}"))?;
            steps = super::movement::unify(&steps, &dims[a])
                .map_err(|e| format!("scanned inputs disagree on the sequence length: {e}"))?;
        }
    }
    for c in 0..p.captures {
        let i = inputs.len() - p.captures + c;
        check_body_input(&body, i, "a capture", arg(inputs, i)?.ty.dtype)?;
    }
    for (j, t) in outs[p.state..].iter().enumerate() {
        res.push(Fact::of(TensorType::new(
            t.dtype,
            insert_dim(&t.shape, p.out_axes[j], steps.clone())?,
        )));
    }
    Ok(res)
}

/// Runs a body once on its inputs: the interpreter in kiln-ir, a compiled plan in the
/// CPU runtime.
pub type RunBody<'a> = dyn FnMut(Vec<Tensor>) -> Result<Vec<Tensor>, String> + 'a;

/// The same tensor with its elements shared by every clone, so that passing a capture
/// to each iteration copies nothing.
/// Captures as every iteration's body sees them: views of the operands' memory, no copy
/// (a loop over a large tensor would otherwise copy it once per call). The operands are
/// borrowed for the whole call, so the views stay valid while it runs; [`detach`] copies
/// any result that still views one.
struct Captures<'a> {
    views: Vec<Tensor>,
    ranges: Vec<(usize, usize)>,
    _borrowed: std::marker::PhantomData<&'a Tensor>,
}

impl<'a> Captures<'a> {
    fn new(ts: impl Iterator<Item = Result<&'a Tensor, String>>) -> Result<Self, String> {
        let (mut views, mut ranges) = (vec![], vec![]);
        for t in ts {
            let t = t?;
            // SAFETY: `t` is borrowed for `'a`, which outlives this value and the loop
            // call that uses it; results are detached before the call returns.
            let data = unsafe { t.data().view() };
            ranges.push(t.data().byte_range());
            views.push(
                Tensor::new(t.shape().to_vec(), data).expect("the shape is the tensor's own"),
            );
        }
        Ok(Captures {
            views,
            ranges,
            _borrowed: std::marker::PhantomData,
        })
    }

    /// `ts` with every tensor that shares memory with a capture replaced by a copy.
    fn detach(&self, ts: Vec<Tensor>) -> Vec<Tensor> {
        ts.into_iter()
            .map(|t| {
                let (a, n) = t.data().byte_range();
                let aliased = n > 0
                    && self
                        .ranges
                        .iter()
                        .any(|&(b, m)| m > 0 && a < b + m && b < a + n);
                if aliased {
                    Tensor::new(t.shape().to_vec(), t.data().deep_copy())
                        .expect("the shape is the tensor's own")
                } else {
                    t
                }
            })
            .collect()
    }
}

/// An empty stack of `ty`s: no iteration ran. Dims the type does not know are 0.
fn empty_stack(ty: &TensorType, axis: i64) -> Result<Tensor, String> {
    let shape = insert_dim(&ty.shape, axis, Dim::Fixed(0))?;
    let dims: Vec<usize> = match shape.dims() {
        Some(d) => d
            .iter()
            .map(|d| match d {
                Dim::Fixed(n) => *n as usize,
                _ => 0,
            })
            .collect(),
        None => vec![0],
    };
    Ok(Tensor::zeros(ty.dtype, dims))
}

/// `parts` (equal shapes and dtypes) stacked along a new axis `axis`.
pub fn stack(parts: &[Tensor], axis: i64) -> Result<Tensor, String> {
    let first = parts.first().ok_or("nothing to stack")?;
    for (i, p) in parts.iter().enumerate() {
        if p.shape() != first.shape() || p.dtype() != first.dtype() {
            return Err(format!(
                "step {i} gives {}{:?} but step 0 gave {}{:?}; stacked values must agree",
                p.dtype(),
                p.shape(),
                first.dtype(),
                first.shape()
            ));
        }
    }
    let r = first.rank() as i64 + 1;
    let a = if axis < 0 { axis + r } else { axis };
    if !(0..r).contains(&a) {
        return Err(format!("stack axis {axis} is out of range for rank {r}"));
    }
    let mut bytes = Vec::with_capacity(parts.len() * first.len() * first.dtype().size());
    for p in parts {
        bytes.extend_from_slice(&p.data().le_bytes());
    }
    let mut shape = vec![parts.len()];
    shape.extend_from_slice(first.shape());
    let stacked = Tensor::new(
        shape.clone(),
        TensorData::from_le_bytes(first.dtype(), &bytes)?,
    )?;
    if a == 0 {
        return Ok(stacked);
    }
    // Move the new leading axis to `a`.
    let a = a as usize;
    let mut perm: Vec<usize> = (1..shape.len()).collect();
    perm.insert(a, 0);
    let (map, out_shape) = transpose_map(&shape, &perm);
    gathered(&stacked, out_shape, &map)
}

/// The slices of `x` along `axis`, in order.
pub fn unstack(x: &Tensor, axis: usize) -> Result<Vec<Tensor>, String> {
    let shape = x.shape();
    if axis >= shape.len() {
        return Err(format!(
            "axis {axis} is out of range for rank {}",
            shape.len()
        ));
    }
    let t = shape[axis];
    let mut perm: Vec<usize> = (0..shape.len()).collect();
    perm.remove(axis);
    perm.insert(0, axis);
    let (map, moved) = transpose_map(shape, &perm);
    let per = map.len().checked_div(t).unwrap_or(0);
    (0..t)
        .map(|i| gathered(x, moved[1..].to_vec(), &map[i * per..(i + 1) * per]))
        .collect()
}

/// Runs a `loop` node: iterates `run_body` (see the module docs for the semantics).
pub fn run_loop(
    attrs: &Attrs,
    inputs: &[Option<&Tensor>],
    body: &Graph,
    run_body: &mut RunBody<'_>,
) -> Result<Vec<Tensor>, String> {
    let p = loop_parts(attrs, inputs.len(), body)?;
    let max = opt_arg(inputs, 0)
        .map(|t| int_scalar(t, "the trip count"))
        .transpose()?;
    let has_cond = opt_arg(inputs, 1).is_some();
    if max.is_none() && !has_cond {
        return Err("a loop with neither a trip count nor a condition never ends".into());
    }
    let mut cond = match opt_arg(inputs, 1) {
        Some(c) => truth(c)?,
        None => true,
    };
    let mut carried: Vec<Tensor> = (0..p.carried)
        .map(|i| arg(inputs, 2 + i).cloned())
        .collect::<Result<_, _>>()?;
    let captures =
        Captures::new((0..p.captures).map(|c| arg(inputs, inputs.len() - p.captures + c)))?;
    let mut scans: Vec<Vec<Tensor>> = vec![Vec::new(); p.scanned];
    let mut i: i64 = 0;
    while cond && max.is_none_or(|m| i < m) {
        let mut ins = Vec::with_capacity(inputs.len());
        ins.push(Tensor::scalar(i));
        ins.push(Tensor::scalar(cond));
        ins.append(&mut carried);
        ins.extend(captures.views.iter().cloned());
        let mut outs = run_body(ins).map_err(|e| format!("iteration {i}: {e}"))?;
        if outs.len() != 1 + p.carried + p.scanned {
            return Err(format!(
                "iteration {i}: the body returned {} values, expected {}",
                outs.len(),
                1 + p.carried + p.scanned
            ));
        }
        let scanned = outs.split_off(1 + p.carried);
        carried = outs.split_off(1);
        // Without a condition operand the body's condition is ignored (ONNX).
        if has_cond {
            cond = truth(&outs[0]).map_err(|e| format!("iteration {i}: {e}"))?;
        }
        for (s, t) in scans.iter_mut().zip(scanned) {
            s.push(t);
        }
        i += 1;
    }
    let mut res = captures.detach(carried);
    for (j, s) in scans.iter().enumerate() {
        res.push(if s.is_empty() {
            empty_stack(body.ty(body.outputs[1 + p.carried + j]), 0)?
        } else {
            stack(s, 0).map_err(|e| format!("scanned value #{j}: {e}"))?
        });
    }
    Ok(res)
}

/// Runs a `scan` node: iterates `run_body` over the slices (see the module docs).
pub fn run_scan(
    attrs: &Attrs,
    inputs: &[Option<&Tensor>],
    body: &Graph,
    run_body: &mut RunBody<'_>,
) -> Result<Vec<Tensor>, String> {
    let p = scan_parts(attrs, inputs.len(), body)?;
    let mut state: Vec<Tensor> = (0..p.state)
        .map(|i| arg(inputs, i).cloned())
        .collect::<Result<_, _>>()?;
    let mut slices: Vec<Vec<Tensor>> = Vec::with_capacity(p.scanned);
    let mut steps: Option<usize> = None;
    for j in 0..p.scanned {
        let x = arg(inputs, p.state + j)?;
        let a = super::movement::axis(p.in_axes[j], x.rank())
            .map_err(|e| format!("scanned input #{j}: {e}"))?;
        let t = x.shape()[a];
        if steps.is_some_and(|s| s != t) {
            return Err(format!(
                "scanned input #{j} has {t} steps along axis {a}, the first has {}",
                steps.unwrap_or(0)
            ));
        }
        steps = Some(t);
        let mut s = unstack(x, a)?;
        if p.in_reverse[j] {
            s.reverse();
        }
        slices.push(s);
    }
    let steps = steps.unwrap_or(0);
    let captures =
        Captures::new((0..p.captures).map(|c| arg(inputs, inputs.len() - p.captures + c)))?;
    let mut outs_per_step: Vec<Vec<Tensor>> = vec![Vec::with_capacity(steps); p.outputs];
    for t in 0..steps {
        let mut ins = Vec::with_capacity(inputs.len());
        ins.append(&mut state);
        ins.extend(slices.iter().map(|s| s[t].clone()));
        ins.extend(captures.views.iter().cloned());
        let mut outs = run_body(ins).map_err(|e| format!("step {t}: {e}"))?;
        if outs.len() != p.state + p.outputs {
            return Err(format!(
                "step {t}: the body returned {} values, expected {}",
                outs.len(),
                p.state + p.outputs
            ));
        }
        let scanned = outs.split_off(p.state);
        state = outs;
        for (s, v) in outs_per_step.iter_mut().zip(scanned) {
            s.push(v);
        }
    }
    let mut res = captures.detach(state);
    for (j, mut s) in outs_per_step.into_iter().enumerate() {
        if p.out_reverse[j] {
            s.reverse();
        }
        res.push(if s.is_empty() {
            empty_stack(body.ty(body.outputs[p.state + j]), p.out_axes[j])?
        } else {
            stack(&s, p.out_axes[j]).map_err(|e| format!("scan output #{j}: {e}"))?
        });
    }
    Ok(res)
}
