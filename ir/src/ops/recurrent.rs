//! The recurrent op family: ONNX's `LSTM`, `GRU` and `RNN` (opset 14 forms). Shape rules,
//! attribute parsing (shared with the CPU runtime's native routine through [`Spec`]) and
//! reference semantics side by side.
//!
//! Operands, as ONNX orders them: `X, W, R, B?, sequence_lens?, initial_h?` and, for `lstm`,
//! `initial_c?, P?`. With `layout = 0`, `X` is `[S, B, I]` (time-major), the states are
//! `[D, B, H]` and `Y` is `[S, D, B, H]`; `layout = 1` puts the batch first everywhere
//! (`[B, S, I]`, `[B, D, H]`, `[B, S, D, H]`). `W` is `[D, G·H, I]`, `R` is `[D, G·H, H]`,
//! `B` is `[D, 2·G·H]` (`Wb` then `Rb`), `P` is `[D, 3·H]`, with `G` gates per cell: 4 for
//! `lstm` (gate order i, o, f, c; peepholes i, o, f), 3 for `gru` (z, r, h), 1 for `rnn`.
//! `D` is 2 for `direction = "bidirectional"` (forward first), else 1.
//!
//! Outputs: `Y` (every step's hidden state), `Y_h` (the last hidden state) and, for `lstm`,
//! `Y_c` (the last cell state); any may be omitted. With `sequence_lens`, batch entry `b`
//! runs `len[b]` steps (a reverse direction starts at step `len[b] - 1`); `Y` is zero past
//! `len[b]` and the final states are those of the last step run (the initial ones for a
//! length of 0).
//!
//! `activations` (per direction: f, g, h for `lstm`; f, g for `gru`; f for `rnn`; one
//! direction's list is reused for both when a bidirectional node gives only one) default to
//! Sigmoid/Tanh/Tanh, Sigmoid/Tanh and Tanh. `activation_alpha`/`activation_beta` are
//! consumed in order by the functions that take them; missing ones take the defaults of the
//! ONNX op of the same name (LeakyRelu 0.01, HardSigmoid 0.2/0.5, Elu 1, ThresholdedRelu 1,
//! Affine and ScaledTanh 1/0 and 1/1). `clip` bounds every gate's pre-activation (after
//! biases and peepholes) to `[-clip, clip]`. `input_forget = 1` couples the LSTM forget gate
//! to the input gate (`f = 1 - i`); `linear_before_reset = 1` computes the GRU candidate as
//! `g(x·Whᵀ + Wbh + r ⊙ (h·Rhᵀ + Rbh))` instead of `g(x·Whᵀ + Wbh + (r ⊙ h)·Rhᵀ + Rbh)`.
//!
//! Like the nn family, the reference computes in f64 and rounds to the input's dtype once.

use super::movement::{checked_numel, unify};
use super::shared::{fact, from_f64s};
use super::{arg, not_in_family, opt_arg, Fact};
use crate::{Attrs, Dim, OpKind, Shape, Tensor};

/// An activation function of a recurrent cell, with its parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Act {
    /// `max(x, 0)`.
    Relu,
    /// `tanh(x)`.
    Tanh,
    /// `1 / (1 + e^-x)`.
    Sigmoid,
    /// `alpha·x + beta`.
    Affine(f32, f32),
    /// `x` if `x >= 0` else `alpha·x`.
    LeakyRelu(f32),
    /// `x` if `x > alpha` else 0.
    ThresholdedRelu(f32),
    /// `alpha·tanh(beta·x)`.
    ScaledTanh(f32, f32),
    /// `max(0, min(1, alpha·x + beta))`.
    HardSigmoid(f32, f32),
    /// `x` if `x >= 0` else `alpha·(e^x - 1)`.
    Elu(f32),
    /// `x / (1 + |x|)`.
    Softsign,
    /// `ln(1 + e^x)`.
    Softplus,
}

impl Act {
    /// The function applied in f64 (the reference's precision).
    pub fn apply(self, x: f64) -> f64 {
        match self {
            Act::Relu => {
                if x.is_nan() || x > 0.0 {
                    x
                } else {
                    0.0
                }
            }
            Act::Tanh => x.tanh(),
            Act::Sigmoid => {
                if x >= 0.0 {
                    1.0 / (1.0 + (-x).exp())
                } else {
                    let e = x.exp();
                    e / (1.0 + e)
                }
            }
            Act::Affine(a, b) => f64::from(a) * x + f64::from(b),
            Act::LeakyRelu(a) => {
                if x >= 0.0 {
                    x
                } else {
                    f64::from(a) * x
                }
            }
            Act::ThresholdedRelu(a) => {
                if x > f64::from(a) || x.is_nan() {
                    x
                } else {
                    0.0
                }
            }
            Act::ScaledTanh(a, b) => f64::from(a) * (f64::from(b) * x).tanh(),
            Act::HardSigmoid(a, b) => (f64::from(a) * x + f64::from(b)).clamp(0.0, 1.0),
            Act::Elu(a) => {
                if x >= 0.0 {
                    x
                } else {
                    f64::from(a) * x.exp_m1()
                }
            }
            Act::Softsign => x / (1.0 + x.abs()),
            Act::Softplus => {
                // ln(1 + e^x) without overflow: max(x, 0) + ln(1 + e^-|x|).
                x.max(0.0) + (-x.abs()).exp().ln_1p()
            }
        }
    }

    /// The function named `name` (ONNX's spelling, any case), taking its alpha and beta
    /// from the iterators when it has them, else the defaults.
    fn parse(
        name: &str,
        alphas: &mut impl Iterator<Item = f32>,
        betas: &mut impl Iterator<Item = f32>,
    ) -> Result<Act, String> {
        let mut a = |d: f32| alphas.next().unwrap_or(d);
        Ok(match name.to_ascii_lowercase().as_str() {
            "relu" => Act::Relu,
            "tanh" => Act::Tanh,
            "sigmoid" => Act::Sigmoid,
            "affine" => {
                let x = a(1.0);
                Act::Affine(x, betas.next().unwrap_or(0.0))
            }
            "leakyrelu" => Act::LeakyRelu(a(0.01)),
            "thresholdedrelu" => Act::ThresholdedRelu(a(1.0)),
            "scaledtanh" => {
                let x = a(1.0);
                Act::ScaledTanh(x, betas.next().unwrap_or(1.0))
            }
            "hardsigmoid" => {
                let x = a(0.2);
                Act::HardSigmoid(x, betas.next().unwrap_or(0.5))
            }
            "elu" => Act::Elu(a(1.0)),
            "softsign" => Act::Softsign,
            "softplus" => Act::Softplus,
            _ => return Err(format!("unknown activation function `{name}`")),
        })
    }
}

/// The cell kind of a recurrent op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cell {
    /// `lstm`: 4 gates (i, o, f, c), a cell state, optional peepholes.
    Lstm,
    /// `gru`: 3 gates (z, r, h).
    Gru,
    /// `rnn`: 1 gate.
    Rnn,
}

impl Cell {
    /// The cell of a recurrent op, or `None` for other ops.
    pub fn of(op: OpKind) -> Option<Cell> {
        match op {
            OpKind::Lstm => Some(Cell::Lstm),
            OpKind::Gru => Some(Cell::Gru),
            OpKind::Rnn => Some(Cell::Rnn),
            _ => None,
        }
    }

    /// Gates per cell: the factor of `H` in `W`'s and `R`'s second dim.
    pub fn gates(self) -> usize {
        match self {
            Cell::Lstm => 4,
            Cell::Gru => 3,
            Cell::Rnn => 1,
        }
    }

    /// Activation functions per direction.
    pub fn functions(self) -> usize {
        match self {
            Cell::Lstm => 3,
            Cell::Gru => 2,
            Cell::Rnn => 1,
        }
    }

    fn default_acts(self) -> &'static [Act] {
        match self {
            Cell::Lstm => &[Act::Sigmoid, Act::Tanh, Act::Tanh],
            Cell::Gru => &[Act::Sigmoid, Act::Tanh],
            Cell::Rnn => &[Act::Tanh],
        }
    }

    /// Outputs: `Y`, `Y_h` and, for `lstm`, `Y_c`.
    pub fn outputs(self) -> usize {
        if self == Cell::Lstm {
            3
        } else {
            2
        }
    }
}

/// Input positions of the recurrent ops' operands.
pub mod input {
    /// `X`.
    pub const X: usize = 0;
    /// `W`.
    pub const W: usize = 1;
    /// `R`.
    pub const R: usize = 2;
    /// `B`, optional.
    pub const B: usize = 3;
    /// `sequence_lens`, optional.
    pub const SEQ_LENS: usize = 4;
    /// `initial_h`, optional.
    pub const INITIAL_H: usize = 5;
    /// `initial_c`, optional (`lstm`).
    pub const INITIAL_C: usize = 6;
    /// `P`, optional (`lstm`).
    pub const P: usize = 7;
}

/// A recurrent node's attributes, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct Spec {
    /// The cell kind.
    pub cell: Cell,
    /// `hidden_size`, when given.
    pub hidden: Option<usize>,
    /// Per direction (forward first), whether it runs backwards in time.
    pub reverse: Vec<bool>,
    /// `cell.functions()` activations per direction, direction-major.
    pub acts: Vec<Act>,
    /// `clip`, when given.
    pub clip: Option<f32>,
    /// `layout = 1`: batch-major operands and results.
    pub batch_major: bool,
    /// `linear_before_reset` (`gru`).
    pub linear_before_reset: bool,
    /// `input_forget` (`lstm`).
    pub input_forget: bool,
}

impl Spec {
    /// Parses and checks a recurrent node's attributes.
    pub fn new(op: OpKind, attrs: &Attrs) -> Result<Spec, String> {
        let cell = Cell::of(op).ok_or_else(|| not_in_family(op))?;
        let reverse = match attrs.string_or("direction", "forward".into())?.as_str() {
            "forward" => vec![false],
            "reverse" => vec![true],
            "bidirectional" => vec![false, true],
            other => {
                return Err(format!(
                    "direction must be forward, reverse or bidirectional, got `{other}`"
                ))
            }
        };
        let hidden = match attrs.int("hidden_size")? {
            None => None,
            Some(h) if h > 0 => Some(h as usize),
            Some(h) => return Err(format!("hidden_size must be positive, got {h}")),
        };
        let nf = cell.functions();
        let dirs = reverse.len();
        let acts = match attrs.strings("activations")? {
            None => cell.default_acts().repeat(dirs),
            Some(names) => {
                let names = if names.len() == nf && dirs == 2 {
                    [names.clone(), names].concat()
                } else {
                    names
                };
                if names.len() != nf * dirs {
                    return Err(format!(
                        "`{}` with {dirs} direction(s) takes {} activations, got {}",
                        op.name(),
                        nf * dirs,
                        names.len()
                    ));
                }
                let alphas = attrs.floats_or("activation_alpha", vec![])?;
                let betas = attrs.floats_or("activation_beta", vec![])?;
                let (mut a, mut b) = (alphas.into_iter(), betas.into_iter());
                names
                    .iter()
                    .map(|n| Act::parse(n, &mut a, &mut b))
                    .collect::<Result<_, _>>()?
            }
        };
        let clip = match attrs.float("clip")? {
            Some(c) if c.is_nan() || c < 0.0 => {
                return Err(format!("clip must be a non-negative number, got {c}"))
            }
            c => c,
        };
        let batch_major = match attrs.int_or("layout", 0)? {
            0 => false,
            1 => true,
            l => return Err(format!("layout must be 0 or 1, got {l}")),
        };
        let flag = |name: &str| -> Result<bool, String> {
            match attrs.int_or(name, 0)? {
                0 => Ok(false),
                1 => Ok(true),
                v => Err(format!("{name} must be 0 or 1, got {v}")),
            }
        };
        let linear_before_reset = flag("linear_before_reset")?;
        let input_forget = flag("input_forget")?;
        if linear_before_reset && cell != Cell::Gru {
            return Err(format!(
                "linear_before_reset is a gru attribute, not `{}`'s",
                op.name()
            ));
        }
        if input_forget && cell != Cell::Lstm {
            return Err(format!(
                "input_forget is an lstm attribute, not `{}`'s",
                op.name()
            ));
        }
        Ok(Spec {
            cell,
            hidden,
            reverse,
            acts,
            clip,
            batch_major,
            linear_before_reset,
            input_forget,
        })
    }

    /// The number of directions `D`.
    pub fn dirs(&self) -> usize {
        self.reverse.len()
    }

    /// The activations of direction `d`.
    pub fn acts_of(&self, d: usize) -> &[Act] {
        let nf = self.cell.functions();
        &self.acts[d * nf..(d + 1) * nf]
    }
}

/// The sizes of one recurrent call, checked against every operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    /// Time steps `S`.
    pub seq: usize,
    /// Batch `B`.
    pub batch: usize,
    /// Input features `I`.
    pub input: usize,
    /// Hidden size `H`.
    pub hidden: usize,
    /// Directions `D`.
    pub dirs: usize,
}

impl Dims {
    /// Checks the concrete operand shapes (`None`: omitted) against each other and `spec`.
    pub fn check(spec: &Spec, shapes: &[Option<&[usize]>]) -> Result<Dims, String> {
        let get = |i: usize| shapes.get(i).copied().flatten();
        let x = get(input::X).ok_or("missing required input X")?;
        let w = get(input::W).ok_or("missing required input W")?;
        let r = get(input::R).ok_or("missing required input R")?;
        if x.len() != 3 {
            return Err(format!("X must have rank 3, got {x:?}"));
        }
        let (seq, batch, inp) = if spec.batch_major {
            (x[1], x[0], x[2])
        } else {
            (x[0], x[1], x[2])
        };
        let dirs = spec.dirs();
        let g = spec.cell.gates();
        if r.len() != 3 {
            return Err(format!("R must be [{dirs}, {g}·H, H], got {r:?}"));
        }
        let hidden = spec.hidden.unwrap_or(r[2]);
        let gh = g * hidden;
        let want = |name: &str, got: &[usize], want: &[usize]| {
            if got == want {
                Ok(())
            } else {
                Err(format!(
                    "{name} must be {want:?} (D = {dirs}, H = {hidden}, I = {inp}), got {got:?}"
                ))
            }
        };
        want("W", w, &[dirs, gh, inp])?;
        want("R", r, &[dirs, gh, hidden])?;
        if let Some(b) = get(input::B) {
            want("B", b, &[dirs, 2 * gh])?;
        }
        if let Some(l) = get(input::SEQ_LENS) {
            want("sequence_lens", l, &[batch])?;
        }
        let state = if spec.batch_major {
            [batch, dirs, hidden]
        } else {
            [dirs, batch, hidden]
        };
        if let Some(h) = get(input::INITIAL_H) {
            want("initial_h", h, &state)?;
        }
        if spec.cell == Cell::Lstm {
            if let Some(c) = get(input::INITIAL_C) {
                want("initial_c", c, &state)?;
            }
            if let Some(p) = get(input::P) {
                want("P", p, &[dirs, 3 * hidden])?;
            }
        } else if shapes.len() > input::INITIAL_C
            && shapes[input::INITIAL_C..].iter().any(Option::is_some)
        {
            return Err("only lstm takes initial_c and P".into());
        }
        Ok(Dims {
            seq,
            batch,
            input: inp,
            hidden,
            dirs,
        })
    }

    /// `Y`'s shape.
    pub fn y_shape(&self, batch_major: bool) -> Vec<usize> {
        if batch_major {
            vec![self.batch, self.seq, self.dirs, self.hidden]
        } else {
            vec![self.seq, self.dirs, self.batch, self.hidden]
        }
    }

    /// The shape of `Y_h`, `Y_c` and the initial states.
    pub fn state_shape(&self, batch_major: bool) -> Vec<usize> {
        if batch_major {
            vec![self.batch, self.dirs, self.hidden]
        } else {
            vec![self.dirs, self.batch, self.hidden]
        }
    }
}

/// `sequence_lens` as step counts, checked to lie in `0..=seq` (all `seq` when absent).
pub fn seq_lens(lens: Option<&Tensor>, d: &Dims) -> Result<Vec<usize>, String> {
    let Some(t) = lens else {
        return Ok(vec![d.seq; d.batch]);
    };
    if !t.dtype().is_int() {
        return Err(format!(
            "sequence_lens must be an integer tensor, got {}",
            t.dtype()
        ));
    }
    t.to_i64s()
        .into_iter()
        .enumerate()
        .map(|(b, l)| {
            usize::try_from(l)
                .ok()
                .filter(|&l| l <= d.seq)
                .ok_or_else(|| {
                    format!(
                        "sequence_lens[{b}] = {l} is outside 0..={} (X's sequence length)",
                        d.seq
                    )
                })
        })
        .collect()
}

/// Shape rule of the recurrent ops.
pub fn infer(op: OpKind, attrs: &Attrs, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>, String> {
    let spec = Spec::new(op, attrs)?;
    let x = arg(inputs, input::X)?;
    let (w, r) = (arg(inputs, input::W)?, arg(inputs, input::R)?);
    let dtype = x.ty.dtype;
    if !dtype.is_float() {
        return Err(format!("`{}` needs a float X, got {dtype}", op.name()));
    }
    for (name, f) in [("W", Some(w)), ("R", Some(r))].into_iter().chain([
        ("B", opt_arg(inputs, input::B)),
        ("initial_h", opt_arg(inputs, input::INITIAL_H)),
        ("initial_c", opt_arg(inputs, input::INITIAL_C)),
        ("P", opt_arg(inputs, input::P)),
    ]) {
        if let Some(f) = f {
            if f.ty.dtype != dtype {
                return Err(format!(
                    "{name} is {} but X is {dtype}: they must match",
                    f.ty.dtype
                ));
            }
        }
    }
    if let Some(l) = opt_arg(inputs, input::SEQ_LENS) {
        if !l.ty.dtype.is_int() {
            return Err(format!(
                "sequence_lens must be an integer tensor, got {}",
                l.ty.dtype
            ));
        }
    }
    if spec.cell != Cell::Lstm
        && (opt_arg(inputs, input::INITIAL_C).is_some() || opt_arg(inputs, input::P).is_some())
    {
        return Err("only lstm takes initial_c and P".into());
    }
    let dirs = spec.dirs() as u64;
    let g = spec.cell.gates() as u64;
    let ranked = |name: &str, f: &Fact, rank: usize| -> Result<Option<Vec<Dim>>, String> {
        match f.ty.shape.dims() {
            None => Ok(None),
            Some(d) if d.len() == rank => Ok(Some(d.to_vec())),
            Some(d) => Err(format!("{name} must have rank {rank}, got {}", d.len())),
        }
    };
    let ctx = |name: &'static str| move |m: String| format!("{name}: {m}");
    // Sizes, unified from every operand that knows them.
    let (mut seq, mut batch, mut inp) = (Dim::Unknown, Dim::Unknown, Dim::Unknown);
    if let Some(xd) = ranked("X", x, 3)? {
        let (s, b) = if spec.batch_major { (1, 0) } else { (0, 1) };
        (seq, batch, inp) = (xd[s].clone(), xd[b].clone(), xd[2].clone());
    }
    let inp = inp;
    let mut hidden = match spec.hidden {
        Some(h) => Dim::Fixed(h as u64),
        None => Dim::Unknown,
    };
    let mut gh = Dim::Unknown;
    let check_dirs = |name: &str, d: &Dim| -> Result<(), String> {
        match d.fixed() {
            Some(n) if n != dirs => Err(format!(
                "{name} has {n} directions in dim 0 but direction gives {dirs}"
            )),
            _ => Ok(()),
        }
    };
    if let Some(rd) = ranked("R", r, 3)? {
        check_dirs("R", &rd[0])?;
        hidden = unify(&hidden, &rd[2]).map_err(ctx("R's hidden size"))?;
        gh = rd[1].clone();
    }
    if let Some(wd) = ranked("W", w, 3)? {
        check_dirs("W", &wd[0])?;
        gh = unify(&gh, &wd[1]).map_err(ctx("W and R's gate rows"))?;
        unify(&inp, &wd[2]).map_err(ctx("W's input size vs X"))?;
    }
    if let (Some(n), Some(h)) = (gh.fixed(), hidden.fixed()) {
        if n != g * h {
            return Err(format!(
                "W and R have {n} gate rows but `{}` needs {g}·hidden_size = {}",
                op.name(),
                g * h
            ));
        }
    } else if let (Some(n), None) = (gh.fixed(), hidden.fixed()) {
        if n % g != 0 {
            return Err(format!(
                "W and R have {n} gate rows, not a multiple of `{}`'s {g} gates",
                op.name()
            ));
        }
        hidden = Dim::Fixed(n / g);
    }
    if let Some(b) = opt_arg(inputs, input::B) {
        if let Some(bd) = ranked("B", b, 2)? {
            check_dirs("B", &bd[0])?;
            if let (Some(n), Some(h)) = (bd[1].fixed(), hidden.fixed()) {
                if n != 2 * g * h {
                    return Err(format!("B must have {} columns, got {n}", 2 * g * h));
                }
            }
        }
    }
    if let Some(l) = opt_arg(inputs, input::SEQ_LENS) {
        if let Some(ld) = ranked("sequence_lens", l, 1)? {
            batch = unify(&batch, &ld[0]).map_err(ctx("sequence_lens vs X's batch"))?;
        }
    }
    for (name, i) in [
        ("initial_h", input::INITIAL_H),
        ("initial_c", input::INITIAL_C),
    ] {
        let Some(f) = opt_arg(inputs, i) else {
            continue;
        };
        if let Some(sd) = ranked(name, f, 3)? {
            let (b, d) = if spec.batch_major { (0, 1) } else { (1, 0) };
            check_dirs(name, &sd[d])?;
            batch = unify(&batch, &sd[b]).map_err(|m| format!("{name}'s batch: {m}"))?;
            hidden = unify(&hidden, &sd[2]).map_err(|m| format!("{name}'s hidden size: {m}"))?;
        }
    }
    if let Some(p) = opt_arg(inputs, input::P) {
        if let Some(pd) = ranked("P", p, 2)? {
            check_dirs("P", &pd[0])?;
            if let (Some(n), Some(h)) = (pd[1].fixed(), hidden.fixed()) {
                if n != 3 * h {
                    return Err(format!("P must have {} columns, got {n}", 3 * h));
                }
            }
        }
    }
    let d = Dim::Fixed(dirs);
    let (y, state) = if spec.batch_major {
        (
            vec![batch.clone(), seq, d.clone(), hidden.clone()],
            vec![batch, d, hidden],
        )
    } else {
        (
            vec![seq, d.clone(), batch.clone(), hidden.clone()],
            vec![d, batch, hidden],
        )
    };
    let mut out = vec![
        fact(dtype, Shape::new(y)),
        fact(dtype, Shape::new(state.clone())),
    ];
    if spec.cell == Cell::Lstm {
        out.push(fact(dtype, Shape::new(state)));
    }
    Ok(out)
}

/// Reference semantics of the recurrent ops: per direction, per batch entry, per step, in
/// f64.
pub fn eval(op: OpKind, attrs: &Attrs, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
    let spec = Spec::new(op, attrs)?;
    let x = arg(inputs, input::X)?;
    let dt = x.dtype();
    if !dt.is_float() {
        return Err(format!("`{}` needs a float X, got {dt}", op.name()));
    }
    for i in [
        input::W,
        input::R,
        input::B,
        input::INITIAL_H,
        input::INITIAL_C,
        input::P,
    ] {
        if let Some(t) = opt_arg(inputs, i) {
            if t.dtype() != dt {
                return Err(format!(
                    "input #{i} is {} but X is {dt}: they must match",
                    t.dtype()
                ));
            }
        }
    }
    let shapes: Vec<Option<&[usize]>> = inputs.iter().map(|t| t.map(Tensor::shape)).collect();
    let d = Dims::check(&spec, &shapes)?;
    checked_numel(&d.y_shape(spec.batch_major))?;
    checked_numel(&[d.dirs, spec.cell.gates() * d.hidden, d.input.max(d.hidden)])?;
    let lens = seq_lens(opt_arg(inputs, input::SEQ_LENS), &d)?;
    let vals = |i: usize| opt_arg(inputs, i).map(Tensor::to_f64s);
    let (xv, w, r) = (x.to_f64s(), arg(inputs, input::W)?.to_f64s(), {
        arg(inputs, input::R)?.to_f64s()
    });
    let (bias, h0, c0, p) = (
        vals(input::B),
        vals(input::INITIAL_H),
        vals(input::INITIAL_C),
        vals(input::P),
    );
    let (s_n, b_n, i_n, h_n, dirs) = (d.seq, d.batch, d.input, d.hidden, d.dirs);
    let g_n = spec.cell.gates();
    let gh = g_n * h_n;
    let bm = spec.batch_major;
    let x_at = |t: usize, b: usize| -> usize {
        if bm {
            (b * s_n + t) * i_n
        } else {
            (t * b_n + b) * i_n
        }
    };
    let state_at = |dir: usize, b: usize| -> usize {
        if bm {
            (b * dirs + dir) * h_n
        } else {
            (dir * b_n + b) * h_n
        }
    };
    let y_at = |t: usize, dir: usize, b: usize| -> usize {
        if bm {
            ((b * s_n + t) * dirs + dir) * h_n
        } else {
            ((t * dirs + dir) * b_n + b) * h_n
        }
    };
    let mut y = vec![0.0; s_n * dirs * b_n * h_n];
    let mut yh = vec![0.0; dirs * b_n * h_n];
    let mut yc = vec![0.0; dirs * b_n * h_n];
    let clip = |v: f64| match spec.clip {
        Some(c) => v.clamp(-f64::from(c), f64::from(c)),
        None => v,
    };
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(p, q)| p * q).sum::<f64>();
    for dir in 0..dirs {
        let wd = &w[dir * gh * i_n..(dir + 1) * gh * i_n];
        let rd = &r[dir * gh * h_n..(dir + 1) * gh * h_n];
        let zero = vec![0.0; 2 * gh];
        let bd = bias
            .as_ref()
            .map_or(&zero[..], |b| &b[dir * 2 * gh..(dir + 1) * 2 * gh]);
        let (wb, rb) = bd.split_at(gh);
        let pzero = vec![0.0; 3 * h_n];
        let pd = p
            .as_ref()
            .map_or(&pzero[..], |p| &p[dir * 3 * h_n..(dir + 1) * 3 * h_n]);
        let acts = spec.acts_of(dir);
        for b in 0..b_n {
            let at = state_at(dir, b);
            let mut h = h0
                .as_ref()
                .map_or(vec![0.0; h_n], |v| v[at..at + h_n].to_vec());
            let mut c = c0
                .as_ref()
                .map_or(vec![0.0; h_n], |v| v[at..at + h_n].to_vec());
            let len = lens[b];
            for s in 0..len {
                let t = if spec.reverse[dir] { len - 1 - s } else { s };
                let xt = &xv[x_at(t, b)..x_at(t, b) + i_n];
                // Row `k` of the gates: x·W[k] + Wb[k] and h·R[k] + Rb[k].
                let xw = |k: usize| dot(xt, &wd[k * i_n..(k + 1) * i_n]) + wb[k];
                let hr = |hv: &[f64], k: usize| dot(hv, &rd[k * h_n..(k + 1) * h_n]) + rb[k];
                let next: Vec<f64> = match spec.cell {
                    Cell::Lstm => {
                        let (f, g, hact) = (acts[0], acts[1], acts[2]);
                        let mut nc = vec![0.0; h_n];
                        let mut nh = vec![0.0; h_n];
                        for j in 0..h_n {
                            let pre = |gate: usize| xw(gate * h_n + j) + hr(&h, gate * h_n + j);
                            let i = f.apply(clip(pre(0) + pd[j] * c[j]));
                            let fg = if spec.input_forget {
                                1.0 - i
                            } else {
                                f.apply(clip(pre(2) + pd[2 * h_n + j] * c[j]))
                            };
                            let cand = g.apply(clip(pre(3)));
                            nc[j] = fg * c[j] + i * cand;
                            let o = f.apply(clip(pre(1) + pd[h_n + j] * nc[j]));
                            nh[j] = o * hact.apply(nc[j]);
                        }
                        c = nc;
                        nh
                    }
                    Cell::Gru => {
                        let (f, g) = (acts[0], acts[1]);
                        let z: Vec<f64> =
                            (0..h_n).map(|j| f.apply(clip(xw(j) + hr(&h, j)))).collect();
                        let rg: Vec<f64> = (0..h_n)
                            .map(|j| f.apply(clip(xw(h_n + j) + hr(&h, h_n + j))))
                            .collect();
                        let rh: Vec<f64> = rg.iter().zip(&h).map(|(a, b)| a * b).collect();
                        (0..h_n)
                            .map(|j| {
                                let k = 2 * h_n + j;
                                let pre = if spec.linear_before_reset {
                                    xw(k) + rg[j] * hr(&h, k)
                                } else {
                                    xw(k) + hr(&rh, k)
                                };
                                let cand = g.apply(clip(pre));
                                (1.0 - z[j]) * cand + z[j] * h[j]
                            })
                            .collect()
                    }
                    Cell::Rnn => (0..h_n)
                        .map(|j| acts[0].apply(clip(xw(j) + hr(&h, j))))
                        .collect(),
                };
                h = next;
                let yo = y_at(t, dir, b);
                y[yo..yo + h_n].copy_from_slice(&h);
            }
            yh[at..at + h_n].copy_from_slice(&h);
            yc[at..at + h_n].copy_from_slice(&c);
        }
    }
    let mut out = vec![
        from_f64s(dt, d.y_shape(bm), y)?,
        from_f64s(dt, d.state_shape(bm), yh)?,
    ];
    if spec.cell == Cell::Lstm {
        out.push(from_f64s(dt, d.state_shape(bm), yc)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Attr, DType, TensorType};

    fn t(shape: &[usize], v: Vec<f32>) -> Tensor {
        Tensor::from_vec(shape.to_vec(), v)
    }

    fn run(op: OpKind, attrs: &Attrs, ins: &[Option<&Tensor>]) -> Vec<Tensor> {
        super::eval(op, attrs, ins).unwrap()
    }

    /// A one-unit RNN with identity activation is a running sum: checked by hand.
    #[test]
    fn rnn_affine_cell_is_a_running_sum_with_sequence_lens() {
        let attrs = Attrs::new()
            .with("activations", Attr::Strs(vec!["Affine".into()]))
            .with("activation_alpha", Attr::Floats(vec![1.0]))
            .with("activation_beta", Attr::Floats(vec![0.0]))
            .with("hidden_size", Attr::Int(1));
        // X [S=3, B=2, I=1], W = [[[1]]], R = [[[1]]]: h_t = x_t + h_{t-1}.
        let x = t(&[3, 2, 1], vec![1.0, 10.0, 2.0, 20.0, 3.0, 30.0]);
        let w = t(&[1, 1, 1], vec![1.0]);
        let r = t(&[1, 1, 1], vec![1.0]);
        let lens = Tensor::from_vec(vec![2], vec![3i32, 2]);
        let h0 = t(&[1, 2, 1], vec![100.0, 0.5]);
        let out = run(
            OpKind::Rnn,
            &attrs,
            &[Some(&x), Some(&w), Some(&r), None, Some(&lens), Some(&h0)],
        );
        assert_eq!(out[0].shape(), &[3, 1, 2, 1]);
        assert_eq!(out[0].to_f64s(), vec![101.0, 10.5, 103.0, 30.5, 106.0, 0.0]);
        assert_eq!(out[1].to_f64s(), vec![106.0, 30.5]);
        // Reverse: batch 1 starts at its own last step (t = 1).
        let rev = attrs.clone().with("direction", Attr::Str("reverse".into()));
        let out = run(
            OpKind::Rnn,
            &rev,
            &[Some(&x), Some(&w), Some(&r), None, Some(&lens), Some(&h0)],
        );
        assert_eq!(out[0].to_f64s(), vec![106.0, 30.5, 105.0, 20.5, 103.0, 0.0]);
        assert_eq!(out[1].to_f64s(), vec![106.0, 30.5]);
    }

    /// LSTM with one unit, checked against the equations evaluated by hand in f64.
    #[test]
    fn lstm_one_step_matches_the_equations_with_peepholes() {
        let (x, wi, wo, wf, wc) = (0.5f32, 0.1f32, 0.2f32, 0.3f32, 0.4f32);
        let (h0, c0) = (0.25f32, -0.5f32);
        let (ri, ro, rf, rc) = (0.5f32, -0.5f32, 0.25f32, 1.0f32);
        let (pi, po, pf) = (0.1f32, 0.2f32, 0.3f32);
        let xt = t(&[1, 1, 1], vec![x]);
        let w = t(&[1, 4, 1], vec![wi, wo, wf, wc]);
        let r = t(&[1, 4, 1], vec![ri, ro, rf, rc]);
        let h = t(&[1, 1, 1], vec![h0]);
        let c = t(&[1, 1, 1], vec![c0]);
        let p = t(&[1, 3], vec![pi, po, pf]);
        let out = run(
            OpKind::Lstm,
            &Attrs::new(),
            &[
                Some(&xt),
                Some(&w),
                Some(&r),
                None,
                None,
                Some(&h),
                Some(&c),
                Some(&p),
            ],
        );
        let f = |v: f32| f64::from(v);
        let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
        let i = sig(f(x) * f(wi) + f(h0) * f(ri) + f(pi) * f(c0));
        let fg = sig(f(x) * f(wf) + f(h0) * f(rf) + f(pf) * f(c0));
        let cand = (f(x) * f(wc) + f(h0) * f(rc)).tanh();
        let nc = fg * f(c0) + i * cand;
        let o = sig(f(x) * f(wo) + f(h0) * f(ro) + f(po) * nc);
        let nh = o * nc.tanh();
        assert!((out[1].to_f64s()[0] - nh).abs() < 1e-6);
        assert!((out[2].to_f64s()[0] - nc).abs() < 1e-6);
        assert_eq!(out[0].to_f64s(), out[1].to_f64s());
    }

    #[test]
    fn gru_linear_before_reset_differs_only_through_the_reset_gate() {
        // With R_h = 0 both forms agree; with R_h ≠ 0 and a bias they differ.
        let x = t(&[1, 1, 1], vec![0.7]);
        let w = t(&[1, 3, 1], vec![0.1, 0.2, 0.3]);
        let r0 = t(&[1, 3, 1], vec![0.4, 0.5, 0.0]);
        let r1 = t(&[1, 3, 1], vec![0.4, 0.5, 0.6]);
        let b = t(&[1, 6], vec![0.0, 0.0, 0.0, 0.0, 0.0, 0.9]);
        let h = t(&[1, 1, 1], vec![0.3]);
        let lbr = Attrs::new().with("linear_before_reset", Attr::Int(1));
        let go = |a: &Attrs, r: &Tensor| {
            run(
                OpKind::Gru,
                a,
                &[Some(&x), Some(&w), Some(r), Some(&b), None, Some(&h)],
            )[1]
            .to_f64s()[0]
        };
        let rgate = 1.0 / (1.0 + (-(0.7f64 * 0.2 + 0.3 * 0.5)).exp());
        let z = 1.0 / (1.0 + (-(0.7f64 * 0.1 + 0.3 * 0.4)).exp());
        let plain = ((0.7f64 * 0.3) + rgate * 0.3 * 0.6 + 0.9).tanh();
        let before = ((0.7f64 * 0.3) + rgate * (0.3 * 0.6 + 0.9)).tanh();
        assert!((go(&Attrs::new(), &r1) - ((1.0 - z) * plain + z * 0.3)).abs() < 1e-6);
        assert!((go(&lbr, &r1) - ((1.0 - z) * before + z * 0.3)).abs() < 1e-6);
        assert!((go(&lbr, &r0) - go(&Attrs::new(), &r0)).abs() > 1e-3);
    }

    #[test]
    fn bad_shapes_and_attributes_are_clear_errors() {
        let x = t(&[2, 1, 3], vec![0.0; 6]);
        let w = t(&[1, 8, 3], vec![0.0; 24]);
        let r3 = t(&[1, 8, 3], vec![0.0; 24]);
        let e = super::eval(
            OpKind::Lstm,
            &Attrs::new(),
            &[Some(&x), Some(&w), Some(&r3)],
        )
        .unwrap_err();
        assert!(e.contains("W must be [1, 12, 3]"), "{e}");
        let r = t(&[1, 8, 2], vec![0.0; 16]);
        let e =
            super::eval(OpKind::Gru, &Attrs::new(), &[Some(&x), Some(&w), Some(&r)]).unwrap_err();
        assert!(e.contains("W must be [1, 6, 3]"), "{e}");
        let bad = Attrs::new().with("direction", Attr::Str("sideways".into()));
        let e = Spec::new(OpKind::Rnn, &bad).unwrap_err();
        assert!(e.contains("sideways"), "{e}");
        let bad = Attrs::new().with("activations", Attr::Strs(vec!["Cube".into()]));
        assert!(Spec::new(OpKind::Rnn, &bad).unwrap_err().contains("Cube"));
        let lens = Tensor::from_vec(vec![1], vec![5i32]);
        let w = t(&[1, 4, 3], vec![0.0; 12]);
        let r = t(&[1, 4, 1], vec![0.0; 4]);
        let e = super::eval(
            OpKind::Lstm,
            &Attrs::new(),
            &[Some(&x), Some(&w), Some(&r), None, Some(&lens)],
        )
        .unwrap_err();
        assert!(e.contains("sequence_lens[0] = 5"), "{e}");
    }

    #[test]
    fn shape_rule_keeps_symbols_and_follows_layout() {
        let f = |dims: Vec<Dim>| Fact::of(TensorType::new(DType::F32, Shape::new(dims)));
        let sym = |s: &str| Dim::Sym(s.into());
        let x = f(vec![sym("batch"), sym("seq"), Dim::Fixed(5)]);
        let w = f(vec![Dim::Fixed(2), Dim::Fixed(12), Dim::Fixed(5)]);
        let r = f(vec![Dim::Fixed(2), Dim::Fixed(12), Dim::Fixed(4)]);
        let attrs = Attrs::new()
            .with("layout", Attr::Int(1))
            .with("direction", Attr::Str("bidirectional".into()));
        let out = infer(OpKind::Gru, &attrs, &[Some(&x), Some(&w), Some(&r)]).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(
            out[0].ty.shape,
            Shape::new(vec![sym("batch"), sym("seq"), Dim::Fixed(2), Dim::Fixed(4)])
        );
        assert_eq!(
            out[1].ty.shape,
            Shape::new(vec![sym("batch"), Dim::Fixed(2), Dim::Fixed(4)])
        );
        // One direction's weights for a bidirectional node: an error naming W.
        let w1 = f(vec![Dim::Fixed(1), Dim::Fixed(12), Dim::Fixed(5)]);
        let e = infer(OpKind::Gru, &attrs, &[Some(&x), Some(&w1), Some(&r)]).unwrap_err();
        assert!(e.contains("W has 1 directions"), "{e}");
        let e = infer(OpKind::Lstm, &attrs, &[Some(&x), Some(&w), Some(&r)]).unwrap_err();
        assert!(e.contains("needs 4·hidden_size"), "{e}");
    }
}
