//! `decode_step`: turns an optimised causal linear-attention or retention model into its
//! one-token recurrent step (`kiln build --decode-step`, `Options::decode_step`). The
//! sequence dim becomes 1, and every causal `linear_attention` becomes its exact one-step
//! update, with its state added to the signature:
//!
//! ```text
//! S' = γ ⊙ S + kᵀ v            (state.<i>.S in, state_out.<i>.S out: [B, H, D, Dv])
//! z' = γ ⊙ z + kᵀ              (normalised form only: state.<i>.z / state_out.<i>.z, [B, H, D, 1])
//! y  = q S'  [/ (q z' + eps)]
//! ```
//!
//! `γ = exp(log_decay)` per head for retention, 1 otherwise; `i` numbers the ops in graph
//! order; zeros are the start. Written with ordinary ops (`transpose`, `matmul`, `mul`,
//! `add`, `div`), so every backend runs it and the interpreter defines it: O(1) per token
//! instead of O(n). Where the graph reads positions as `range(0, S, 1)` (a learned or
//! sinusoidal position table gathered by it, rotary tables), the range starts at a new
//! scalar `position: i64[]` input instead (the 0-based index of the token), so the step
//! computes what the full graph computes at that row.
//!
//! Refused, with an error naming the node: no causal `linear_attention`; a non-causal one
//! (it needs the keys that come later); a sequence length that is fixed rather than
//! symbolic; ops that mix positions other than through `linear_attention` (softmax
//! `attention` needs a key cache, `cumsum`, `trilu`, convolutions, recurrences, loops, the
//! approximate linearisation's key-padding check); a `range` whose length depends on the
//! sequence but that is not `range(0, S, 1)`. Whatever this list misses is caught by
//! [`check_against_prefix`], which runs the full graph once on seeded inputs of length
//! `n` and the step graph `n` times, and refuses when any row differs.

use crate::classic::{
    EliminateCommonSubexpressions, EliminateDeadCode, FoldConstants, SimplifyOps,
};
use crate::rewrite::Namer;
use crate::Pass;
use kiln_ir::{Attr, Attrs, DType, Dim, Graph, Node, OpKind, Shape, Tensor, TensorType, ValueId};

/// The graph metadata key a decode-step graph carries (its description).
pub const DECODE_STEP_METADATA: &str = "decode_step";

/// The name of the position input (a scalar `i64`, the 0-based index of the token).
pub const POSITION_INPUT: &str = "position";

/// Prefix of the state inputs: `state.<i>.S`, `state.<i>.z`.
pub const STATE_IN_PREFIX: &str = "state.";

/// Prefix of the state outputs: `state_out.<i>.S`, `state_out.<i>.z`.
pub const STATE_OUT_PREFIX: &str = "state_out.";

/// Sequence length of [`check_against_prefix`]'s run (the steps the step graph takes).
pub const CHECK_STEPS: usize = 6;

/// [`check_against_prefix`]'s tolerance: the largest difference between a step's output
/// and the full graph's row, relative to the largest magnitude of that output (the
/// recurrent sums and the quadratic ones differ by reassociation only).
pub const CHECK_RTOL: f64 = 1e-3;

/// Why a model has no decode step.
#[derive(Debug, thiserror::Error)]
pub enum DecodeStepError {
    /// The graph has no causal `linear_attention` op.
    #[error(
        "--decode-step needs a causal linear-attention or retention model: the optimised graph \
         has no `linear_attention` op (linearise_attention recognises linear attention and \
         retention in their quadratic form; softmax attention needs a key cache, not a state)"
    )]
    NoLinearAttention,
    /// A node that the step cannot express.
    #[error("--decode-step: node `{node}` ({op}): {why}")]
    Unsupported {
        /// The node's name or its first output's name.
        node: String,
        /// Its op.
        op: String,
        /// Why.
        why: String,
    },
    /// The sequence dim could not be bound to 1.
    #[error("--decode-step: {0}")]
    Sequence(String),
    /// Shape inference or the verifier failed on the step graph (a bug).
    #[error("--decode-step: the step graph is malformed: {0}")]
    Malformed(String),
    /// The step graph's outputs differ from the full graph's rows.
    #[error(
        "--decode-step: the step graph does not reproduce the full model row by row \
         ({0}); the model depends on other positions in a way the step cannot carry"
    )]
    Mismatch(String),
}

/// One `linear_attention` op's state.
#[derive(Clone, Debug, PartialEq)]
pub struct StateInfo {
    /// The op's output value in the optimised graph.
    pub op: String,
    /// `(input name, output name, dims)` of each state tensor (`S`, then `z`).
    pub tensors: Vec<(String, String, Vec<Dim>)>,
    /// Decayed per head (retention).
    pub decay: bool,
}

/// What [`decode_step`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct DecodeStepReport {
    /// The symbolic sequence dim that became 1.
    pub seq: String,
    /// One entry per `linear_attention` op, in graph order.
    pub states: Vec<StateInfo>,
    /// Whether the step takes a `position` input.
    pub position: bool,
}

impl std::fmt::Display for DecodeStepReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "decode step: one token per run (`{}` = 1){}; {} recurrent state(s), zeros at the start:",
            self.seq,
            if self.position {
                ", `position: i64[]` the token's 0-based index"
            } else {
                ""
            },
            self.states.iter().map(|s| s.tensors.len()).sum::<usize>()
        )?;
        for s in &self.states {
            for (i, o, d) in &s.tensors {
                writeln!(
                    f,
                    "  %{i} -> %{o}: f32{} ({}{})",
                    Shape::new(d.clone()),
                    s.op,
                    if s.decay { ", decayed" } else { "" }
                )?;
            }
        }
        Ok(())
    }
}

fn node_label(g: &Graph, n: &Node) -> String {
    if !n.name.is_empty() {
        return n.name.clone();
    }
    n.outputs
        .first()
        .map(|&o| g.value(o).name.clone())
        .unwrap_or_default()
}

fn unsupported(g: &Graph, n: &Node, why: impl Into<String>) -> DecodeStepError {
    DecodeStepError::Unsupported {
        node: node_label(g, n),
        op: n.op.name().to_string(),
        why: why.into(),
    }
}

/// Ops whose result at one position reads other positions (other than `linear_attention`).
fn mixes_positions(op: OpKind) -> Option<&'static str> {
    Some(match op {
        OpKind::Attention | OpKind::OnnxAttention => {
            "softmax attention needs a key/value cache, not a fixed-size state"
        }
        OpKind::CumSum | OpKind::CumProd => "a running sum over positions",
        OpKind::Trilu => "a triangular mask left over the positions",
        OpKind::Conv
        | OpKind::ConvTranspose
        | OpKind::FusedConv
        | OpKind::ConvInteger
        | OpKind::QLinearConv => "a convolution may run over the positions",
        OpKind::Scan | OpKind::Loop | OpKind::If => "control flow is not followed",
        OpKind::Lstm | OpKind::Gru | OpKind::Rnn => "a recurrence over the positions",
        OpKind::ReverseSequence => "reverses the positions",
        OpKind::AttentionKeyKeep => {
            "the approximate linearisation's keys are stabilised over every position"
        }
        _ => return None,
    })
}

fn scalar_const(g: &Graph, v: Option<ValueId>) -> Option<f64> {
    let t = g.constant_value(v?)?;
    (t.len() == 1).then(|| t.to_f64s()[0])
}

/// Rewrites the optimised graph `g` into its decode step (see the module docs).
pub fn decode_step(g: &mut Graph) -> Result<DecodeStepReport, DecodeStepError> {
    // Which dim is the sequence: the query length of the linear-attention ops.
    let mut seq: Option<String> = None;
    let mut any = false;
    for n in &g.nodes {
        if let Some(why) = mixes_positions(n.op) {
            return Err(unsupported(g, n, why));
        }
        if n.op != OpKind::LinearAttention {
            continue;
        }
        any = true;
        let a = kiln_ir::ops::linear_attention::LinearAttentionAttrs::of(&n.attrs)
            .map_err(|e| unsupported(g, n, e))?;
        if !a.causal {
            return Err(unsupported(
                g,
                n,
                "non-causal linear attention reads the keys that come later",
            ));
        }
        let q = n.inputs[0].ok_or_else(|| unsupported(g, n, "no query"))?;
        let s = match g.ty(q).shape.dims().and_then(|d| d.get(2)) {
            Some(Dim::Sym(s)) => s.clone(),
            Some(Dim::Fixed(k)) => {
                return Err(DecodeStepError::Sequence(format!(
                    "the sequence length of `{}` is fixed at {k}: export the model with a \
                     symbolic sequence length",
                    node_label(g, n)
                )))
            }
            _ => {
                return Err(unsupported(
                    g,
                    n,
                    "the query's sequence length is not a named dim",
                ))
            }
        };
        match &seq {
            None => seq = Some(s),
            Some(p) if *p == s => {}
            Some(p) => {
                return Err(DecodeStepError::Sequence(format!(
                    "linear_attention ops run over different sequence dims `{p}` and `{s}`"
                )))
            }
        }
    }
    if !any {
        return Err(DecodeStepError::NoLinearAttention);
    }
    let seq = seq.unwrap_or_default();
    let sym = Dim::Sym(seq.clone());
    if !g
        .inputs
        .iter()
        .any(|&i| g.ty(i).shape.dims().is_some_and(|d| d.contains(&sym)))
    {
        return Err(DecodeStepError::Sequence(format!(
            "no graph input has the sequence dim `{seq}`"
        )));
    }
    let mut namer = Namer::new(g);
    for name in [POSITION_INPUT] {
        if g.values.iter().any(|v| v.name == name) {
            return Err(DecodeStepError::Sequence(format!(
                "the model already has a value named `{name}`"
            )));
        }
    }
    // Positions: `range(0, S, 1)` starts at `position` instead.
    let mut position: Option<ValueId> = None;
    let mut inserts: Vec<(usize, Node)> = vec![];
    for idx in 0..g.nodes.len() {
        let n = &g.nodes[idx];
        if n.op != OpKind::Range {
            continue;
        }
        let out = n.outputs[0];
        match g.ty(out).shape.dims() {
            Some([Dim::Fixed(_)]) => continue,
            Some([d]) if *d == sym => {}
            _ => {
                return Err(unsupported(
                    g,
                    n,
                    format!("a range whose length is not the sequence `{seq}` nor fixed"),
                ))
            }
        }
        if scalar_const(g, n.inputs[0]) != Some(0.0) || scalar_const(g, n.inputs[2]) != Some(1.0) {
            return Err(unsupported(
                g,
                n,
                "positions other than range(0, S, 1) are not followed",
            ));
        }
        let (Some(start), Some(limit)) = (n.inputs[0], n.inputs[1]) else {
            return Err(unsupported(g, n, "missing operands"));
        };
        let dt = g.ty(start).dtype;
        let label = node_label(g, n);
        let pos = *position.get_or_insert_with(|| {
            g.add_input(
                POSITION_INPUT,
                TensorType::new(DType::I64, Shape::new(vec![])),
            )
        });
        let p = if dt == DType::I64 {
            pos
        } else {
            let v = namer.add_value(g, "position_cast", TensorType::new(dt, Shape::new(vec![])));
            inserts.push((
                idx,
                Node {
                    op: OpKind::Cast,
                    attrs: Attrs::new().with("to", Attr::Str(dt.to_string())),
                    inputs: vec![Some(pos)],
                    outputs: vec![v],
                    name: label.clone(),
                },
            ));
            v
        };
        let end = namer.add_value(g, "position_end", g.ty(limit).clone());
        inserts.push((
            idx,
            Node {
                op: OpKind::Add,
                attrs: Attrs::new(),
                inputs: vec![Some(limit), Some(p)],
                outputs: vec![end],
                name: label,
            },
        ));
        let n = &mut g.nodes[idx];
        n.inputs[0] = Some(p);
        n.inputs[1] = Some(end);
    }
    crate::rewrite::insert_nodes(g, inserts);
    // Bind the sequence to 1 everywhere.
    for v in &mut g.values {
        if let Some(d) = v.ty.shape.dims() {
            if d.contains(&sym) {
                let nd = d
                    .iter()
                    .map(|x| if *x == sym { Dim::Fixed(1) } else { x.clone() })
                    .collect();
                v.ty.shape = Shape::new(nd);
            }
        }
    }
    kiln_ir::infer_types(g).map_err(|e| DecodeStepError::Malformed(e.to_string()))?;
    // Each causal linear_attention becomes its one-step update.
    let old = std::mem::take(&mut g.nodes);
    let mut states = vec![];
    for n in old {
        if n.op != OpKind::LinearAttention {
            g.nodes.push(n);
            continue;
        }
        let info = step_of(g, &mut namer, &n, states.len())?;
        states.push(info);
    }
    kiln_ir::infer_types(g).map_err(|e| DecodeStepError::Malformed(e.to_string()))?;
    let passes: [Box<dyn Pass>; 5] = [
        Box::new(FoldConstants::default()),
        Box::new(SimplifyOps),
        Box::new(EliminateCommonSubexpressions),
        Box::new(EliminateDeadCode),
        Box::new(SimplifyOps),
    ];
    for p in passes {
        p.run(g)
            .map_err(|e| DecodeStepError::Malformed(e.to_string()))?;
    }
    kiln_ir::verify(g).map_err(|e| DecodeStepError::Malformed(e.to_string()))?;
    let report = DecodeStepReport {
        seq,
        states,
        position: position.is_some(),
    };
    g.metadata
        .insert(DECODE_STEP_METADATA.into(), report.to_string());
    Ok(report)
}

/// Appends a node `op(attrs)(inputs) -> output` to a graph; returns the output.
type PushNode<'a> = dyn FnMut(&mut Graph, OpKind, Attrs, Vec<ValueId>, ValueId) -> ValueId + 'a;

/// Appends the one-step update of `n` (a causal `linear_attention` of a graph whose
/// sequence is 1) to `g`, its state the `index`-th.
fn step_of(
    g: &mut Graph,
    namer: &mut Namer,
    n: &Node,
    index: usize,
) -> Result<StateInfo, DecodeStepError> {
    let a = kiln_ir::ops::linear_attention::LinearAttentionAttrs::of(&n.attrs)
        .map_err(|e| unsupported(g, n, e))?;
    let operand = |k: usize| n.inputs.get(k).copied().flatten();
    let (Some(q), Some(k), Some(v)) = (operand(0), operand(1), operand(2)) else {
        return Err(unsupported(g, n, "missing q, k or v"));
    };
    let ld = operand(3);
    let out = n.outputs[0];
    let dtype = g.ty(q).dtype;
    let dims = |g: &Graph, x: ValueId| -> Result<Vec<Dim>, DecodeStepError> {
        match g.ty(x).shape.dims() {
            Some(d) if d.len() == 4 => Ok(d.to_vec()),
            _ => Err(unsupported(g, n, "operands must be 4-D [B, H, S, D]")),
        }
    };
    let (qd, vd) = (dims(g, q)?, dims(g, v)?);
    if qd[2].fixed() != Some(1) {
        return Err(unsupported(
            g,
            n,
            format!("the step's query length is {}, not 1", qd[2]),
        ));
    }
    let (b, h, d, dv) = (qd[0].clone(), qd[1].clone(), qd[3].clone(), vd[3].clone());
    let label = node_label(g, n);
    let ty = |dims: Vec<Dim>| TensorType::new(dtype, Shape::new(dims));
    let mut push = |g: &mut Graph, op: OpKind, attrs: Attrs, ins: Vec<ValueId>, o: ValueId| {
        g.nodes.push(Node {
            op,
            attrs,
            inputs: ins.into_iter().map(Some).collect(),
            outputs: vec![o],
            name: format!("{label}/decode_step"),
        });
        o
    };
    let base = format!("{}_step", g.value(out).name);
    let kt_v = namer.add_value(
        g,
        &format!("{base}_kt"),
        ty(vec![b.clone(), h.clone(), d.clone(), Dim::Fixed(1)]),
    );
    let kt = push(
        g,
        OpKind::Transpose,
        Attrs::new().with("perm", Attr::Ints(vec![0, 1, 3, 2])),
        vec![k],
        kt_v,
    );
    let sd = vec![b.clone(), h.clone(), d.clone(), dv.clone()];
    let kv_v = namer.add_value(g, &format!("{base}_kv"), ty(sd.clone()));
    let kv = push(g, OpKind::MatMul, Attrs::new(), vec![kt, v], kv_v);
    // γ per head as [H, 1, 1].
    let gamma = match ld {
        None => None,
        Some(ld) => {
            let e_v = namer.add_value(g, &format!("{base}_gamma"), ty(vec![h.clone()]));
            let e = push(g, OpKind::Exp, Attrs::new(), vec![ld], e_v);
            let shape = g.add_constant(
                &namer.fresh(&format!("{base}_gamma_shape")),
                Tensor::from_vec(vec![3], vec![-1i64, 1, 1]),
            );
            let r_v = namer.add_value(
                g,
                &format!("{base}_gamma3"),
                ty(vec![h.clone(), Dim::Fixed(1), Dim::Fixed(1)]),
            );
            Some(push(g, OpKind::Reshape, Attrs::new(), vec![e, shape], r_v))
        }
    };
    let mut tensors = vec![];
    let mut state = |g: &mut Graph,
                     push: &mut PushNode,
                     which: &str,
                     sdims: Vec<Dim>,
                     add: ValueId|
     -> Result<ValueId, DecodeStepError> {
        let (iname, oname) = (
            format!("{STATE_IN_PREFIX}{index}.{which}"),
            format!("{STATE_OUT_PREFIX}{index}.{which}"),
        );
        if g.values.iter().any(|v| v.name == iname || v.name == oname) {
            return Err(DecodeStepError::Sequence(format!(
                "the model already has a value named `{iname}` or `{oname}`"
            )));
        }
        let s_in = g.add_input(&iname, ty(sdims.clone()));
        let mut prev = s_in;
        if let Some(gm) = gamma {
            let d_v = namer.add_value(g, &format!("{base}_{which}_decayed"), ty(sdims.clone()));
            prev = push(g, OpKind::Mul, Attrs::new(), vec![s_in, gm], d_v);
        }
        let s_out = g.add_value(&oname, ty(sdims.clone()));
        push(g, OpKind::Add, Attrs::new(), vec![prev, add], s_out);
        g.outputs.push(s_out);
        tensors.push((iname, oname, sdims));
        Ok(s_out)
    };
    let s_new = state(g, &mut push, "S", sd, kv)?;
    let row = vec![b.clone(), h.clone(), Dim::Fixed(1)];
    if !a.normalize {
        push(g, OpKind::MatMul, Attrs::new(), vec![q, s_new], out);
    } else {
        let z_new = state(
            g,
            &mut push,
            "z",
            vec![b.clone(), h.clone(), d.clone(), Dim::Fixed(1)],
            kt,
        )?;
        let mut yd = row.clone();
        yd.push(dv);
        let num_v = namer.add_value(g, &format!("{base}_num"), ty(yd));
        let num = push(g, OpKind::MatMul, Attrs::new(), vec![q, s_new], num_v);
        let mut dd = row.clone();
        dd.push(Dim::Fixed(1));
        let den_v = namer.add_value(g, &format!("{base}_den"), ty(dd.clone()));
        let den = push(g, OpKind::MatMul, Attrs::new(), vec![q, z_new], den_v);
        let eps = g.add_constant(
            &namer.fresh(&format!("{base}_eps")),
            Tensor::new(
                vec![],
                kiln_ir::TensorData::from_f64s(dtype, std::iter::once(a.epsilon)),
            )
            .map_err(|e| unsupported(g, n, e.to_string()))?,
        );
        let dene_v = namer.add_value(g, &format!("{base}_den_eps"), ty(dd));
        let dene = push(g, OpKind::Add, Attrs::new(), vec![den, eps], dene_v);
        push(g, OpKind::Div, Attrs::new(), vec![num, dene], out);
    }
    Ok(StateInfo {
        op: format!("%{}", g.value(out).name),
        tensors,
        decay: gamma.is_some(),
    })
}

/// A small seeded generator for [`check_against_prefix`]'s inputs.
struct Lcg(u64);

impl Lcg {
    fn unit(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Seeded inputs of one token for the step graph's non-state inputs (other symbolic dims
/// 1): floats in (-1, 1), integers in {0, 1, 2} (token ids, masks), bools true.
fn token_input(ty: &TensorType, rng: &mut Lcg) -> Result<Tensor, String> {
    let dims: Vec<usize> = ty
        .shape
        .dims()
        .ok_or("an input of unknown rank")?
        .iter()
        .map(|d| d.fixed().map_or(1, |x| x as usize))
        .collect();
    let n: usize = dims.iter().product();
    let vals: Vec<f64> = (0..n)
        .map(|_| {
            let u = rng.unit();
            if ty.dtype.is_float() {
                2.0 * u - 1.0
            } else if ty.dtype == DType::Bool {
                1.0
            } else {
                (u * 3.0).floor()
            }
        })
        .collect();
    Tensor::new(
        dims,
        kiln_ir::TensorData::from_f64s(ty.dtype, vals.into_iter()),
    )
    .map_err(|e| e.to_string())
}

/// The axis of `seq` in a value's declared dims.
fn seq_axis(ty: &TensorType, seq: &str) -> Option<usize> {
    ty.shape
        .dims()?
        .iter()
        .position(|d| *d == Dim::Sym(seq.to_string()))
}

/// Runs `full` (the optimised graph `decode_step` started from) once on seeded inputs of
/// [`CHECK_STEPS`] positions, and `step` that many times (states carried, `position`
/// counting), and compares each step's outputs with the full graph's row; refuses when any
/// differs by more than [`CHECK_RTOL`] or is NaN where the row is not. Returns the largest
/// relative difference.
pub fn check_against_prefix(
    full: &Graph,
    step: &Graph,
    report: &DecodeStepReport,
) -> Result<f64, DecodeStepError> {
    let mismatch = DecodeStepError::Mismatch;
    let mut rng = Lcg(0x6b69_6c6e_6465_636f);
    let n = CHECK_STEPS;
    let is_state = |name: &str| name.starts_with(STATE_IN_PREFIX);
    // Per-step inputs, by full-graph input.
    let mut per_step: Vec<Vec<Tensor>> = vec![];
    for &i in &full.inputs {
        let v = full.value(i);
        let mut ty = v.ty.clone();
        let axis = seq_axis(&ty, &report.seq);
        if let (Some(a), Some(d)) = (axis, ty.shape.dims()) {
            let mut d = d.to_vec();
            d[a] = Dim::Fixed(1);
            ty.shape = Shape::new(d);
        }
        let mut steps = vec![token_input(&ty, &mut rng).map_err(mismatch)?];
        for _ in 1..n {
            let next = match axis {
                None => steps[0].clone(),
                Some(_) => token_input(&ty, &mut rng).map_err(mismatch)?,
            };
            steps.push(next);
        }
        per_step.push(steps);
    }
    let full_inputs: Vec<Tensor> = full
        .inputs
        .iter()
        .zip(&per_step)
        .map(|(&i, steps)| match seq_axis(full.ty(i), &report.seq) {
            None => Ok(steps[0].clone()),
            Some(a) => {
                let attrs = Attrs::new().with("axis", Attr::Int(a as i64));
                let ins: Vec<Option<&Tensor>> = steps.iter().map(Some).collect();
                kiln_ir::ops::eval(OpKind::Concat, &attrs, &ins).map(|mut v| v.remove(0))
            }
        })
        .collect::<Result<_, String>>()
        .map_err(mismatch)?;
    let want = kiln_ir::run(full, full_inputs)
        .map_err(|e| mismatch(format!("running the full graph: {e}")))?;
    let by_step: Vec<Vec<&Tensor>> = (0..n)
        .map(|t| per_step.iter().map(|s| &s[t]).collect())
        .collect();
    let mut states: Vec<Tensor> = vec![];
    let mut worst = 0.0f64;
    for (t, tokens) in by_step.iter().enumerate() {
        let mut ins = vec![];
        let mut si = 0;
        for &i in &step.inputs {
            let v = step.value(i);
            if v.name == POSITION_INPUT {
                ins.push(Tensor::scalar(t as i64));
            } else if is_state(&v.name) {
                if t == 0 {
                    let ty = &v.ty;
                    let dims: Vec<usize> = ty
                        .shape
                        .dims()
                        .unwrap_or(&[])
                        .iter()
                        .map(|d| d.fixed().map_or(1, |x| x as usize))
                        .collect();
                    ins.push(Tensor::zeros(ty.dtype, dims));
                } else {
                    ins.push(states[si].clone());
                }
                si += 1;
            } else {
                let k = full
                    .inputs
                    .iter()
                    .position(|&f| full.value(f).name == v.name)
                    .ok_or_else(|| mismatch(format!("input `{}` is new", v.name)))?;
                ins.push(tokens[k].clone());
            }
        }
        let got =
            kiln_ir::run(step, ins).map_err(|e| mismatch(format!("running the step: {e}")))?;
        let nouts = full.outputs.len();
        states = got[nouts..].to_vec();
        for (o, (&fo, w)) in full.outputs.iter().zip(&want).enumerate() {
            let name = &full.value(fo).name;
            let row = match seq_axis(full.ty(fo), &report.seq) {
                Some(a) => {
                    let i64s = |x: i64| Tensor::from_vec(vec![1], vec![x]);
                    let (s, e, ax) = (i64s(t as i64), i64s(t as i64 + 1), i64s(a as i64));
                    kiln_ir::ops::eval(
                        OpKind::Slice,
                        &Attrs::new(),
                        &[Some(w), Some(&s), Some(&e), Some(&ax)],
                    )
                    .map(|mut v| v.remove(0))
                    .map_err(mismatch)?
                }
                // An output without the sequence is compared after the last token.
                None if t + 1 < n => continue,
                None => w.clone(),
            };
            let (gv, wv) = (got[o].to_f64s(), row.to_f64s());
            if gv.len() != wv.len() {
                return Err(mismatch(format!(
                    "output `{name}` has {} elements per step, the row {}",
                    gv.len(),
                    wv.len()
                )));
            }
            let scale = w
                .to_f64s()
                .iter()
                .filter(|x| x.is_finite())
                .fold(0.0f64, |a, x| a.max(x.abs()))
                .max(1e-30);
            for (x, y) in gv.iter().zip(&wv) {
                let e = if y.is_finite() {
                    (x - y).abs() / scale
                } else if x.is_nan() == y.is_nan() && (y.is_nan() || x == y) {
                    0.0
                } else {
                    f64::INFINITY
                };
                let e = if e.is_nan() { f64::INFINITY } else { e };
                worst = worst.max(e);
                if e > CHECK_RTOL {
                    return Err(mismatch(format!(
                        "output `{name}` at position {t}: {x} vs {y} (relative {e:.1e}, \
                         tolerance {CHECK_RTOL:.0e})"
                    )));
                }
            }
        }
    }
    Ok(worst)
}

#[cfg(test)]
mod tests;
