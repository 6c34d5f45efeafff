//! The loop-kernel IR: a fused chain of f32 elementwise, broadcast and last-axis reduction
//! ops, written as one loop nest (outer rows × a contiguous inner row of length `n`).

use kiln_ir::{Dim, ValueId};

/// Index of an expression in [`LoopKernel::exprs`].
pub type ExprId = usize;

/// Unary scalar ops.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UnOp {
    /// `-x`.
    Neg,
    /// `|x|`.
    Abs,
    /// `sqrt(x)`.
    Sqrt,
    /// `1 / x`.
    Recip,
    /// `x > 0 ? x : 0` (so NaN gives 0, as in the interpreter).
    Relu,
    /// `x` when finite, else 0 (softmax's shift).
    FiniteOrZero,
    /// `e^x` (transcendental).
    Exp,
    /// `ln x` (transcendental).
    Log,
    /// `tanh x` (transcendental).
    Tanh,
    /// `erf x` (transcendental).
    Erf,
    /// `1 / (1 + e^-x)` (transcendental).
    Sigmoid,
    /// `gelu(x) = 0.5·x·(1 + erf(x/√2))` (transcendental: one op so that its negative tail,
    /// where `1 + erf` cancels, is computed as `0.5·x·erfc(-x/√2)`; see `crate::vmath`).
    Gelu,
    /// `softplus(x) = ln(1 + e^x)` (transcendental: one op so that a kernel whose output it
    /// is can hand it to wider vector code; see `crate::vmath::softplus`).
    Softplus,
}

impl UnOp {
    /// Whether the op is computed by a library routine rather than inline arithmetic.
    pub fn is_transcendental(self) -> bool {
        matches!(
            self,
            UnOp::Exp
                | UnOp::Log
                | UnOp::Tanh
                | UnOp::Erf
                | UnOp::Sigmoid
                | UnOp::Gelu
                | UnOp::Softplus
        )
    }

    /// The scalar meaning, computed in f64 and rounded (the transcendentals' definition).
    pub fn apply(self, x: f32) -> f32 {
        let d = x as f64;
        match self {
            UnOp::Neg => -x,
            UnOp::Abs => x.abs(),
            UnOp::Sqrt => x.sqrt(),
            UnOp::Recip => 1.0 / x,
            UnOp::Relu => {
                if x > 0.0 {
                    x
                } else {
                    0.0
                }
            }
            UnOp::FiniteOrZero => {
                if x.is_finite() {
                    x
                } else {
                    0.0
                }
            }
            UnOp::Exp => d.exp() as f32,
            UnOp::Log => d.ln() as f32,
            UnOp::Tanh => d.tanh() as f32,
            UnOp::Erf => erf_f64(d) as f32,
            UnOp::Sigmoid => {
                if d >= 0.0 {
                    (1.0 / (1.0 + (-d).exp())) as f32
                } else {
                    let e = d.exp();
                    (e / (1.0 + e)) as f32
                }
            }
            UnOp::Gelu => gelu_f64(d) as f32,
            UnOp::Softplus => softplus_f64(d) as f32,
        }
    }
}

/// `ln(1 + e^x)` in f64 without overflow: `max(x, 0) + ln(1 + e^-|x|)`.
pub fn softplus_f64(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

/// erf in f64 to well below f32 resolution: the Maclaurin series near 0 and the
/// continued fraction of erfc further out (the same split the interpreter uses).
pub fn erf_f64(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    let a = x.abs();
    let r = if a < 2.0 {
        let x2 = a * a;
        let (mut term, mut sum, mut n) = (a, a, 0.0f64);
        loop {
            n += 1.0;
            term *= -x2 / n;
            let t = term / (2.0 * n + 1.0);
            sum += t;
            if t.abs() <= 1e-17 * sum.abs() || n > 100.0 {
                break;
            }
        }
        sum * std::f64::consts::FRAC_2_SQRT_PI
    } else if a < 6.0 {
        let mut k = a;
        for i in (1..80).rev() {
            k = a + (i as f64 / 2.0) / k;
        }
        1.0 - (-a * a).exp() / std::f64::consts::PI.sqrt() / k
    } else {
        1.0
    };
    r.copysign(x)
}

/// `erfc(a)` for `a >= 2` by its continued fraction (no cancellation: the far tail keeps its
/// relative precision).
fn erfc_tail_f64(a: f64) -> f64 {
    let mut k = a;
    for i in (1..80).rev() {
        k = a + (i as f64 / 2.0) / k;
    }
    (-a * a).exp() / std::f64::consts::PI.sqrt() / k
}

/// `gelu(x) = 0.5·x·(1 + erf(x/√2))` in f64, as `0.5·x·erfc(|x|/√2)` where `x/√2 <= -2` so
/// that the negative tail keeps its relative precision.
pub fn gelu_f64(x: f64) -> f64 {
    let z = x / std::f64::consts::SQRT_2;
    if z <= -2.0 {
        0.5 * x * erfc_tail_f64(-z)
    } else {
        0.5 * x * (1.0 + erf_f64(z))
    }
}

/// Binary scalar ops.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BinOp {
    /// `a + b`.
    Add,
    /// `a - b`.
    Sub,
    /// `a * b`.
    Mul,
    /// `a / b`.
    Div,
    /// Maximum, NaN-propagating.
    Max,
    /// Minimum, NaN-propagating.
    Min,
    /// `a < b ? b : a`: a lower clamp that keeps a NaN `a` and ignores a NaN bound `b`
    /// (Clip's meaning, as in ONNX Runtime).
    ClampBelow,
    /// `a > b ? b : a`: the upper clamp, with the same NaN rules.
    ClampAbove,
}

impl BinOp {
    /// The scalar meaning.
    pub fn apply(self, a: f32, b: f32) -> f32 {
        match self {
            BinOp::Add => a + b,
            BinOp::Sub => a - b,
            BinOp::Mul => a * b,
            BinOp::Div => a / b,
            BinOp::Max | BinOp::Min if a.is_nan() || b.is_nan() => f32::NAN,
            BinOp::Max => a.max(b),
            BinOp::Min => a.min(b),
            BinOp::ClampBelow => {
                if a < b {
                    b
                } else {
                    a
                }
            }
            BinOp::ClampAbove => {
                if a > b {
                    b
                } else {
                    a
                }
            }
        }
    }
}

/// Reductions along the inner row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RedOp {
    /// Sum (starting from 0).
    Sum,
    /// Maximum by `x > acc` (starting from -inf): NaN elements are skipped, as in the
    /// interpreter's softmax.
    Max,
}

/// One scalar expression, evaluated at each inner index `j` of a row.
#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    /// Element `j` of input `i`'s row (or its one element when the input is broadcast along
    /// the inner axis).
    Load(usize),
    /// A constant.
    Const(f32),
    /// The row length `n`, as f32.
    RowLen,
    /// The result of reduction `k` for this row (only in expressions that run after it).
    Reduced(usize),
    /// A unary op.
    Un(UnOp, ExprId),
    /// A binary op.
    Bin(BinOp, ExprId, ExprId),
}

/// How an input is read along the inner axis.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InnerAccess {
    /// Element `j` at offset `j` (the input's last dim is the row length).
    Contiguous,
    /// One element per row (the input's last dim is 1 or absent).
    Broadcast,
}

/// An input of a loop kernel.
#[derive(Clone, Debug, PartialEq)]
pub struct LoopInput {
    /// The graph value read.
    pub value: ValueId,
    /// Its inner-axis access.
    pub inner: InnerAccess,
}

/// A reduction over the row of one expression.
#[derive(Clone, Debug, PartialEq)]
pub struct Reduction {
    /// The combining op.
    pub op: RedOp,
    /// What is reduced (may use earlier reductions).
    pub arg: ExprId,
}

/// A fused elementwise/broadcast/row-reduction kernel. Every output has the kernel's
/// domain shape `shape` (the broadcast of all inputs); it runs as, for each outer row:
/// each reduction in order (one pass over the row each), then one pass storing outputs.
#[derive(Clone, Debug, PartialEq)]
pub struct LoopKernel {
    /// The domain shape (static; symbolic dims are bound from the inputs at run time).
    pub shape: Vec<Dim>,
    /// Inputs, each broadcast to the domain.
    pub inputs: Vec<LoopInput>,
    /// Expressions in dependency order (operands before users).
    pub exprs: Vec<Expr>,
    /// Row reductions, in order; reduction `k` may use `Reduced(k')` for `k' < k`.
    pub reductions: Vec<Reduction>,
    /// Stored results: graph value and the expression it holds.
    pub outputs: Vec<(ValueId, ExprId)>,
}

impl LoopKernel {
    /// An empty kernel over `shape`.
    pub fn new(shape: Vec<Dim>) -> LoopKernel {
        LoopKernel {
            shape,
            inputs: vec![],
            exprs: vec![],
            reductions: vec![],
            outputs: vec![],
        }
    }

    /// Appends an expression, reusing an identical one.
    pub fn push(&mut self, e: Expr) -> ExprId {
        if let Some(i) = self.exprs.iter().position(|x| *x == e) {
            return i;
        }
        self.exprs.push(e);
        self.exprs.len() - 1
    }

    /// `Load` of `value` (adding the input on first use).
    pub fn load(&mut self, value: ValueId, inner: InnerAccess) -> ExprId {
        let i = match self.inputs.iter().position(|x| x.value == value) {
            Some(i) => i,
            None => {
                self.inputs.push(LoopInput { value, inner });
                self.inputs.len() - 1
            }
        };
        self.push(Expr::Load(i))
    }

    /// A unary op.
    pub fn un(&mut self, op: UnOp, a: ExprId) -> ExprId {
        self.push(Expr::Un(op, a))
    }

    /// A binary op.
    pub fn bin(&mut self, op: BinOp, a: ExprId, b: ExprId) -> ExprId {
        self.push(Expr::Bin(op, a, b))
    }

    /// A constant.
    pub fn konst(&mut self, c: f32) -> ExprId {
        self.push(Expr::Const(c))
    }

    /// Adds a reduction and returns the expression reading its result.
    pub fn reduce(&mut self, op: RedOp, arg: ExprId) -> ExprId {
        self.reductions.push(Reduction { op, arg });
        let k = self.reductions.len() - 1;
        self.push(Expr::Reduced(k))
    }

    /// Which expressions `roots` need (operands included), as a mask over `exprs`.
    pub fn needed(&self, roots: &[ExprId]) -> Vec<bool> {
        let mut need = vec![false; self.exprs.len()];
        for &r in roots {
            if r < need.len() {
                need[r] = true;
            }
        }
        for i in (0..self.exprs.len()).rev() {
            if !need[i] {
                continue;
            }
            match self.exprs[i] {
                Expr::Un(_, a) => need[a] = true,
                Expr::Bin(_, a, b) => {
                    need[a] = true;
                    need[b] = true;
                }
                _ => {}
            }
        }
        need
    }
}
