//! The op set: one table naming every op, its text name and its family, and the dispatch
//! of shape inference and reference evaluation to the family files.
//!
//! Ops follow ONNX semantics at the newest opset (inputs where ONNX moved attributes to
//! inputs); the ONNX frontend migrates older opsets. The interpreter here *defines* each
//! op's meaning: every backend is tested against it. To add an op, see docs/add-an-op.md.

use crate::{Attrs, Dim, Tensor, TensorType};
use std::sync::Arc;

pub mod control;
pub mod elementwise;
pub mod fused;
pub mod generate;
pub mod index;
pub mod layout;
pub mod linalg;
pub mod linear_attention;
pub mod linear_scan;
pub mod loss;
mod movement;
pub mod nn;
pub mod pool;
pub mod quant;
pub mod quant_linalg;
pub mod recurrent;
pub mod reduce;
pub mod resize;
mod shared;

/// The file an op's shape rule and reference semantics live in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum Family {
    Elementwise,
    Reduce,
    Nn,
    Linalg,
    Pool,
    Layout,
    Index,
    Generate,
    Resize,
    Control,
    Fused,
    LinearAttention,
    LinearScan,
    Loss,
    Quant,
    Recurrent,
    QuantLinalg,
}

/// How many inputs an op takes: `min..=max` (trailing optional inputs may be omitted;
/// `max` is `usize::MAX` for variadic ops).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arity {
    /// Inputs that must be present.
    pub min: usize,
    /// The most inputs it takes.
    pub max: usize,
}

impl Arity {
    /// Whether `n` inputs are allowed.
    pub fn allows(self, n: usize) -> bool {
        (self.min..=self.max).contains(&n)
    }

    /// The most inputs, where that is a fixed number.
    pub fn bounded_max(self) -> Option<usize> {
        (self.max != usize::MAX).then_some(self.max)
    }
}

/// How the backend-neutral plan runs an op (`plan/src/partition.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Lowering {
    /// Fused into loop kernels (elementwise, broadcast, row softmax/norms); an instance that
    /// cannot fuse runs as a fallback.
    Loop,
    /// A GEMM-backed kernel (matmul, gemm, linear, conv, attention, einsum).
    Contraction,
    /// A native routine of the runtime (data movement, gathers, row statistics).
    Native,
    /// The reference interpreter.
    Interp,
}

/// How the cost model counts an op's arithmetic (`passes/src/cost.rs`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum CostClass {
    /// Costs nothing (constants).
    Free,
    /// Moves no data: views and shape queries.
    View,
    /// This many FLOPs per output element.
    Elem(f64),
    /// A row statistic: a few FLOPs per element of its first input.
    RowStat,
    /// A contraction: FLOPs from its operand shapes.
    Contraction,
}

/// The op table's macro: each row is `Variant = "text", "OnnxName", Family, min..=max,
/// attrs|plain, same|rule, Lowering, CostClass;`. A row without every column does not
/// compile, so an op cannot be added without its properties:
///
/// ```compile_fail
/// // Arity, attributes, shape class, lowering and cost class are missing.
/// kiln_ir::op_table! { Abs = "abs", "Abs", Elementwise; }
/// ```
///
/// ```
/// // The same row with every column.
/// kiln_ir::op_table! { Abs = "abs", "Abs", Elementwise, 1..=1, plain, same, Loop, Elem(1.0); }
/// assert_eq!(OpKind::Abs.arity().max, 1);
/// assert!(!OpKind::Abs.takes_attrs());
/// ```
///
/// Columns: the text-form name; the ONNX op type (empty for kiln-only ops); the family
/// file; how many inputs (`N` for variadic); whether it takes attributes (`attrs`) or
/// none (`plain`); whether its output has its first input's shape and dtype rule
/// (`same`: unary math, casts, clip) or its family's shape rule (`rule`); its
/// [`Lowering`]; its [`CostClass`].
#[macro_export]
macro_rules! op_table {
    ($( $variant:ident = $text:literal, $onnx:literal, $family:ident, $lo:literal ..= $hi:tt,
        $attrs:ident, $shape:ident, $lower:ident, $cost:ident $(($cn:literal))?; )*) => {
        /// Every op kiln knows. The text name is what the text form prints.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[allow(missing_docs)]
        pub enum OpKind { $($variant,)* }

        impl OpKind {
            /// Every op, in table order.
            pub const ALL: &'static [OpKind] = &[$(OpKind::$variant,)*];

            /// The text-form name (`matmul`, `reduce_sum`).
            pub fn name(self) -> &'static str {
                match self { $(OpKind::$variant => $text,)* }
            }

            /// The ONNX op type this op corresponds to (empty for kiln-only ops).
            pub fn onnx_name(self) -> &'static str {
                match self { $(OpKind::$variant => $onnx,)* }
            }

            /// The family file that implements it.
            pub fn family(self) -> $crate::ops::Family {
                match self { $(OpKind::$variant => $crate::ops::Family::$family,)* }
            }

            /// How many inputs it takes.
            pub fn arity(self) -> $crate::ops::Arity {
                match self {
                    $(OpKind::$variant => $crate::ops::Arity {
                        min: $lo,
                        max: $crate::op_table!(@max $hi),
                    },)*
                }
            }

            /// Whether it takes attributes at all (ops that take none are matched without an
            /// attribute leaf by the e-graph).
            pub fn takes_attrs(self) -> bool {
                match self { $(OpKind::$variant => $crate::op_table!(@attrs $attrs),)* }
            }

            /// Whether its output takes the first input's shape (unary math, casts, clip).
            pub fn keeps_shape(self) -> bool {
                match self { $(OpKind::$variant => $crate::op_table!(@shape $shape),)* }
            }

            /// How the plan runs it.
            pub fn lowering(self) -> $crate::ops::Lowering {
                match self { $(OpKind::$variant => $crate::ops::Lowering::$lower,)* }
            }

            /// How the cost model counts its arithmetic.
            pub fn cost_class(self) -> $crate::ops::CostClass {
                match self { $(OpKind::$variant => $crate::ops::CostClass::$cost $(($cn))?,)* }
            }

            /// The op with this text name.
            pub fn from_name(s: &str) -> Option<OpKind> {
                match s { $($text => Some(OpKind::$variant),)* _ => None }
            }

            /// The op for an ONNX op type, where they correspond one to one.
            pub fn from_onnx(s: &str) -> Option<OpKind> {
                if s.is_empty() { return None; }
                // kiln-only ops all have the empty ONNX name, rejected above.
                #[allow(unreachable_patterns)]
                match s { $($onnx => Some(OpKind::$variant),)* _ => None }
            }
        }
    };
    (@max N) => { usize::MAX };
    (@max $n:literal) => { $n };
    (@attrs attrs) => { true };
    (@attrs plain) => { false };
    (@shape same) => { true };
    (@shape rule) => { false };
}

op_table! {
    // ---- elementwise.rs: unary math and activations
    Identity = "identity", "Identity", Elementwise, 1..=1, plain, same, Loop, View;
    Abs = "abs", "Abs", Elementwise, 1..=1, plain, same, Loop, Elem(1.0);
    Neg = "neg", "Neg", Elementwise, 1..=1, plain, same, Loop, Elem(1.0);
    Sqrt = "sqrt", "Sqrt", Elementwise, 1..=1, plain, same, Loop, Elem(1.0);
    Exp = "exp", "Exp", Elementwise, 1..=1, plain, same, Loop, Elem(10.0);
    Log = "log", "Log", Elementwise, 1..=1, plain, same, Loop, Elem(10.0);
    Reciprocal = "reciprocal", "Reciprocal", Elementwise, 1..=1, plain, same, Loop, Elem(1.0);
    Floor = "floor", "Floor", Elementwise, 1..=1, plain, same, Interp, Elem(1.0);
    Ceil = "ceil", "Ceil", Elementwise, 1..=1, plain, same, Interp, Elem(1.0);
    Round = "round", "Round", Elementwise, 1..=1, plain, same, Interp, Elem(1.0);
    Sign = "sign", "Sign", Elementwise, 1..=1, plain, same, Loop, Elem(1.0);
    Sin = "sin", "Sin", Elementwise, 1..=1, plain, same, Native, Elem(10.0);
    Cos = "cos", "Cos", Elementwise, 1..=1, plain, same, Native, Elem(10.0);
    Tan = "tan", "Tan", Elementwise, 1..=1, plain, same, Interp, Elem(1.0);
    Asin = "asin", "Asin", Elementwise, 1..=1, plain, same, Interp, Elem(1.0);
    Acos = "acos", "Acos", Elementwise, 1..=1, plain, same, Interp, Elem(1.0);
    Atan = "atan", "Atan", Elementwise, 1..=1, plain, same, Interp, Elem(1.0);
    Sinh = "sinh", "Sinh", Elementwise, 1..=1, plain, same, Interp, Elem(1.0);
    Cosh = "cosh", "Cosh", Elementwise, 1..=1, plain, same, Interp, Elem(1.0);
    Asinh = "asinh", "Asinh", Elementwise, 1..=1, plain, same, Interp, Elem(1.0);
    Acosh = "acosh", "Acosh", Elementwise, 1..=1, plain, same, Interp, Elem(1.0);
    Atanh = "atanh", "Atanh", Elementwise, 1..=1, plain, same, Interp, Elem(1.0);
    Erf = "erf", "Erf", Elementwise, 1..=1, plain, same, Loop, Elem(10.0);
    Tanh = "tanh", "Tanh", Elementwise, 1..=1, plain, same, Loop, Elem(10.0);
    Sigmoid = "sigmoid", "Sigmoid", Elementwise, 1..=1, plain, same, Loop, Elem(10.0);
    Relu = "relu", "Relu", Elementwise, 1..=1, plain, same, Loop, Elem(1.0);
    LeakyRelu = "leaky_relu", "LeakyRelu", Elementwise, 1..=1, attrs, same, Loop, Elem(1.0);
    Elu = "elu", "Elu", Elementwise, 1..=1, attrs, same, Loop, Elem(10.0);
    Selu = "selu", "Selu", Elementwise, 1..=1, attrs, same, Loop, Elem(1.0);
    Celu = "celu", "Celu", Elementwise, 1..=1, attrs, same, Loop, Elem(1.0);
    Gelu = "gelu", "Gelu", Elementwise, 1..=1, attrs, same, Loop, Elem(10.0);
    Mish = "mish", "Mish", Elementwise, 1..=1, attrs, same, Loop, Elem(10.0);
    Softplus = "softplus", "Softplus", Elementwise, 1..=1, attrs, same, Loop, Elem(10.0);
    Softsign = "softsign", "Softsign", Elementwise, 1..=1, plain, same, Loop, Elem(1.0);
    HardSigmoid = "hard_sigmoid", "HardSigmoid", Elementwise, 1..=1, attrs, same, Loop, Elem(1.0);
    HardSwish = "hard_swish", "HardSwish", Elementwise, 1..=1, attrs, same, Loop, Elem(1.0);
    ThresholdedRelu = "thresholded_relu", "ThresholdedRelu", Elementwise, 1..=1, attrs, same, Native, Elem(1.0);
    Shrink = "shrink", "Shrink", Elementwise, 1..=1, attrs, same, Native, Elem(1.0);
    IsNaN = "is_nan", "IsNaN", Elementwise, 1..=1, plain, same, Native, Elem(1.0);
    IsInf = "is_inf", "IsInf", Elementwise, 1..=1, attrs, same, Native, Elem(1.0);
    Not = "not", "Not", Elementwise, 1..=1, plain, same, Native, Elem(1.0);
    BitwiseNot = "bitwise_not", "BitwiseNot", Elementwise, 1..=1, plain, same, Interp, Elem(1.0);
    Cast = "cast", "Cast", Elementwise, 1..=1, attrs, same, Native, Elem(1.0);
    CastLike = "cast_like", "CastLike", Elementwise, 2..=2, attrs, same, Interp, Elem(1.0);
    Clip = "clip", "Clip", Elementwise, 1..=3, plain, same, Loop, Elem(1.0);
    // ---- elementwise.rs: binary and variadic with broadcasting
    Add = "add", "Add", Elementwise, 2..=2, plain, rule, Loop, Elem(1.0);
    Sub = "sub", "Sub", Elementwise, 2..=2, plain, rule, Loop, Elem(1.0);
    Mul = "mul", "Mul", Elementwise, 2..=2, plain, rule, Loop, Elem(1.0);
    Div = "div", "Div", Elementwise, 2..=2, plain, rule, Loop, Elem(1.0);
    Pow = "pow", "Pow", Elementwise, 2..=2, plain, rule, Native, Elem(10.0);
    Mod = "mod", "Mod", Elementwise, 2..=2, attrs, rule, Interp, Elem(1.0);
    Max = "max", "Max", Elementwise, 1..=N, plain, rule, Loop, Elem(1.0);
    Min = "min", "Min", Elementwise, 1..=N, plain, rule, Loop, Elem(1.0);
    Sum = "sum", "Sum", Elementwise, 1..=N, plain, rule, Loop, Elem(1.0);
    Mean = "mean", "Mean", Elementwise, 1..=N, plain, rule, Loop, Elem(1.0);
    PRelu = "prelu", "PRelu", Elementwise, 2..=2, plain, rule, Loop, Elem(1.0);
    Equal = "equal", "Equal", Elementwise, 2..=2, plain, rule, Native, Elem(1.0);
    Less = "less", "Less", Elementwise, 2..=2, plain, rule, Native, Elem(1.0);
    LessOrEqual = "less_equal", "LessOrEqual", Elementwise, 2..=2, plain, rule, Native, Elem(1.0);
    Greater = "greater", "Greater", Elementwise, 2..=2, plain, rule, Native, Elem(1.0);
    GreaterOrEqual = "greater_equal", "GreaterOrEqual", Elementwise, 2..=2, plain, rule, Native, Elem(1.0);
    And = "and", "And", Elementwise, 2..=2, plain, rule, Native, Elem(1.0);
    Or = "or", "Or", Elementwise, 2..=2, plain, rule, Native, Elem(1.0);
    Xor = "xor", "Xor", Elementwise, 2..=2, plain, rule, Native, Elem(1.0);
    BitwiseAnd = "bitwise_and", "BitwiseAnd", Elementwise, 2..=2, plain, rule, Interp, Elem(1.0);
    BitwiseOr = "bitwise_or", "BitwiseOr", Elementwise, 2..=2, plain, rule, Interp, Elem(1.0);
    BitwiseXor = "bitwise_xor", "BitwiseXor", Elementwise, 2..=2, plain, rule, Interp, Elem(1.0);
    BitShift = "bit_shift", "BitShift", Elementwise, 2..=2, attrs, rule, Interp, Elem(1.0);
    Where = "where", "Where", Elementwise, 3..=3, plain, rule, Native, Elem(1.0);
    // ---- reduce.rs: reductions along axes, arg-reductions, scans
    ReduceSum = "reduce_sum", "ReduceSum", Reduce, 1..=2, attrs, rule, Native, Elem(1.0);
    ReduceMean = "reduce_mean", "ReduceMean", Reduce, 1..=2, attrs, rule, Native, Elem(1.0);
    ReduceMax = "reduce_max", "ReduceMax", Reduce, 1..=2, attrs, rule, Native, Elem(1.0);
    ReduceMin = "reduce_min", "ReduceMin", Reduce, 1..=2, attrs, rule, Native, Elem(1.0);
    ReduceProd = "reduce_prod", "ReduceProd", Reduce, 1..=2, attrs, rule, Native, Elem(1.0);
    ReduceL1 = "reduce_l1", "ReduceL1", Reduce, 1..=2, attrs, rule, Native, Elem(1.0);
    ReduceL2 = "reduce_l2", "ReduceL2", Reduce, 1..=2, attrs, rule, Native, Elem(1.0);
    ReduceLogSum = "reduce_log_sum", "ReduceLogSum", Reduce, 1..=2, attrs, rule, Native, Elem(1.0);
    ReduceLogSumExp = "reduce_log_sum_exp", "ReduceLogSumExp", Reduce, 1..=2, attrs, rule, Native, Elem(1.0);
    ReduceSumSquare = "reduce_sum_square", "ReduceSumSquare", Reduce, 1..=2, attrs, rule, Native, Elem(1.0);
    ArgMax = "arg_max", "ArgMax", Reduce, 1..=1, attrs, rule, Native, Elem(1.0);
    ArgMin = "arg_min", "ArgMin", Reduce, 1..=1, attrs, rule, Native, Elem(1.0);
    CumSum = "cumsum", "CumSum", Reduce, 2..=2, attrs, rule, Native, Elem(1.0);
    CumProd = "cumprod", "CumProd", Reduce, 2..=2, attrs, rule, Native, Elem(1.0);
    // ---- nn.rs: softmax and normalisations
    Softmax = "softmax", "Softmax", Nn, 1..=1, attrs, rule, Loop, Elem(12.0);
    LogSoftmax = "log_softmax", "LogSoftmax", Nn, 1..=1, attrs, rule, Loop, Elem(12.0);
    Hardmax = "hardmax", "Hardmax", Nn, 1..=1, attrs, rule, Native, Elem(1.0);
    LayerNorm = "layer_norm", "LayerNormalization", Nn, 2..=3, attrs, rule, Loop, Elem(8.0);
    RmsNorm = "rms_norm", "RMSNormalization", Nn, 2..=2, attrs, rule, Loop, Elem(8.0);
    BatchNorm = "batch_norm", "BatchNormalization", Nn, 5..=5, attrs, rule, Native, Elem(8.0);
    InstanceNorm = "instance_norm", "InstanceNormalization", Nn, 3..=3, attrs, rule, Native, Elem(8.0);
    GroupNorm = "group_norm", "GroupNormalization", Nn, 3..=3, attrs, rule, Native, Elem(8.0);
    LpNorm = "lp_norm", "LpNormalization", Nn, 1..=1, attrs, rule, Interp, Elem(1.0);
    MeanVarianceNorm = "mean_variance_norm", "MeanVarianceNormalization", Nn, 1..=1, attrs, rule, Interp, Elem(1.0);
    Lrn = "lrn", "LRN", Nn, 1..=1, attrs, rule, Interp, Elem(1.0);
    Dropout = "dropout", "Dropout", Nn, 1..=3, attrs, rule, Interp, Elem(1.0);
    // ---- linalg.rs: contractions
    MatMul = "matmul", "MatMul", Linalg, 2..=2, plain, rule, Contraction, Contraction;
    Gemm = "gemm", "Gemm", Linalg, 2..=3, attrs, rule, Contraction, Contraction;
    Einsum = "einsum", "Einsum", Linalg, 1..=N, attrs, rule, Contraction, Contraction;
    Conv = "conv", "Conv", Linalg, 2..=3, attrs, rule, Contraction, Contraction;
    ConvTranspose = "conv_transpose", "ConvTranspose", Linalg, 2..=3, attrs, rule, Contraction, Contraction;
    // ---- pool.rs: pooling windows
    MaxPool = "max_pool", "MaxPool", Pool, 1..=1, attrs, rule, Native, Elem(1.0);
    AveragePool = "average_pool", "AveragePool", Pool, 1..=1, attrs, rule, Native, Elem(1.0);
    LpPool = "lp_pool", "LpPool", Pool, 1..=1, attrs, rule, Interp, Elem(1.0);
    GlobalMaxPool = "global_max_pool", "GlobalMaxPool", Pool, 1..=1, attrs, rule, Native, Elem(1.0);
    GlobalAveragePool = "global_average_pool", "GlobalAveragePool", Pool, 1..=1, attrs, rule, Native, Elem(1.0);
    GlobalLpPool = "global_lp_pool", "GlobalLpPool", Pool, 1..=1, attrs, rule, Interp, Elem(1.0);
    // ---- layout.rs: shape and data movement
    Shape = "shape", "Shape", Layout, 1..=1, attrs, rule, Native, View;
    Size = "size", "Size", Layout, 1..=1, plain, rule, Interp, View;
    Reshape = "reshape", "Reshape", Layout, 2..=2, attrs, rule, Native, View;
    Flatten = "flatten", "Flatten", Layout, 1..=1, attrs, rule, Native, View;
    Squeeze = "squeeze", "Squeeze", Layout, 1..=2, attrs, rule, Native, View;
    Unsqueeze = "unsqueeze", "Unsqueeze", Layout, 2..=2, attrs, rule, Native, View;
    Transpose = "transpose", "Transpose", Layout, 1..=1, attrs, rule, Native, Elem(1.0);
    Concat = "concat", "Concat", Layout, 1..=N, attrs, rule, Native, Elem(1.0);
    Split = "split", "Split", Layout, 1..=2, attrs, rule, Native, Elem(1.0);
    Slice = "slice", "Slice", Layout, 3..=5, attrs, rule, Native, Elem(1.0);
    Expand = "expand", "Expand", Layout, 2..=2, plain, rule, Native, Elem(1.0);
    Tile = "tile", "Tile", Layout, 2..=2, plain, rule, Interp, Elem(1.0);
    Pad = "pad", "Pad", Layout, 2..=4, attrs, rule, Native, Elem(1.0);
    DepthToSpace = "depth_to_space", "DepthToSpace", Layout, 1..=1, attrs, rule, Interp, Elem(1.0);
    SpaceToDepth = "space_to_depth", "SpaceToDepth", Layout, 1..=1, attrs, rule, Interp, Elem(1.0);
    ReverseSequence = "reverse_sequence", "ReverseSequence", Layout, 2..=2, attrs, rule, Interp, Elem(1.0);
    // ---- index.rs: gathers, scatters and data-dependent selection
    Gather = "gather", "Gather", Index, 2..=2, attrs, rule, Native, Elem(1.0);
    GatherElements = "gather_elements", "GatherElements", Index, 2..=2, attrs, rule, Interp, Elem(1.0);
    GatherND = "gather_nd", "GatherND", Index, 2..=2, attrs, rule, Interp, Elem(1.0);
    ScatterElements = "scatter_elements", "ScatterElements", Index, 3..=3, attrs, rule, Interp, Elem(1.0);
    ScatterND = "scatter_nd", "ScatterND", Index, 3..=3, attrs, rule, Native, Elem(1.0);
    OneHot = "one_hot", "OneHot", Index, 3..=3, attrs, rule, Interp, Elem(1.0);
    NonZero = "non_zero", "NonZero", Index, 1..=1, plain, rule, Interp, Elem(1.0);
    Compress = "compress", "Compress", Index, 2..=2, attrs, rule, Interp, Elem(1.0);
    TopK = "top_k", "TopK", Index, 2..=2, attrs, rule, Native, Elem(1.0);
    Trilu = "trilu", "Trilu", Index, 1..=2, attrs, rule, Interp, Elem(1.0);
    // ---- generate.rs: tensors made from attributes or shapes
    Constant = "constant", "Constant", Generate, 0..=0, attrs, rule, Interp, Free;
    ConstantOfShape = "constant_of_shape", "ConstantOfShape", Generate, 1..=1, attrs, rule, Interp, Elem(1.0);
    Range = "range", "Range", Generate, 3..=3, attrs, rule, Interp, Elem(1.0);
    EyeLike = "eye_like", "EyeLike", Generate, 1..=1, attrs, rule, Interp, Elem(1.0);
    // ---- resize.rs: resampling
    Resize = "resize", "Resize", Resize, 1..=4, attrs, rule, Native, Elem(1.0);
    // ---- control.rs: control flow with subgraphs
    If = "if", "If", Control, 1..=N, attrs, rule, Interp, Elem(1.0);
    Loop = "loop", "Loop", Control, 0..=N, attrs, rule, Interp, Elem(1.0);
    Scan = "scan", "Scan", Control, 1..=N, attrs, rule, Interp, Elem(1.0);
    // ---- loss.rs: training losses
    NegativeLogLikelihoodLoss = "negative_log_likelihood_loss", "NegativeLogLikelihoodLoss", Loss, 2..=3, attrs, rule, Interp, Elem(1.0);
    SoftmaxCrossEntropyLoss = "softmax_cross_entropy_loss", "SoftmaxCrossEntropyLoss", Loss, 2..=3, attrs, rule, Interp, Elem(1.0);
    // ---- quant.rs: linear quantization
    QuantizeLinear = "quantize_linear", "QuantizeLinear", Quant, 2..=3, attrs, rule, Native, Elem(1.0);
    DequantizeLinear = "dequantize_linear", "DequantizeLinear", Quant, 2..=3, attrs, rule, Native, Elem(1.0);
    // ---- recurrent.rs: recurrent cells over a sequence (runtime/src/executor/recurrent.rs)
    Lstm = "lstm", "LSTM", Recurrent, 3..=8, attrs, rule, Native, Contraction;
    Gru = "gru", "GRU", Recurrent, 3..=6, attrs, rule, Native, Contraction;
    Rnn = "rnn", "RNN", Recurrent, 3..=6, attrs, rule, Native, Contraction;
    DynamicQuantizeLinear = "dynamic_quantize_linear", "DynamicQuantizeLinear", Quant, 1..=1, plain, rule, Native, Elem(4.0);
    // ---- quant_linalg.rs: integer contractions
    MatMulInteger = "matmul_integer", "MatMulInteger", QuantLinalg, 2..=4, plain, rule, Contraction, Contraction;
    MatMulIntegerScaled = "matmul_integer_scaled", "", QuantLinalg, 5..=6, attrs, rule, Contraction, Contraction;
    ConvInteger = "conv_integer", "ConvInteger", QuantLinalg, 2..=4, attrs, rule, Contraction, Contraction;
    QLinearMatMul = "qlinear_matmul", "QLinearMatMul", QuantLinalg, 8..=8, plain, rule, Contraction, Contraction;
    QLinearConv = "qlinear_conv", "QLinearConv", QuantLinalg, 8..=9, attrs, rule, Contraction, Contraction;
    // ---- fused.rs: kiln-only ops that canonicalisation recognises (no ONNX name)
    Silu = "silu", "", Fused, 1..=1, plain, rule, Loop, Elem(10.0);
    Rotary = "rotary", "", Fused, 3..=3, attrs, rule, Native, Elem(4.0);
    Attention = "attention", "", Fused, 3..=4, attrs, rule, Contraction, Contraction;
    Linear = "linear", "", Fused, 2..=5, attrs, rule, Contraction, Contraction;
    FusedConv = "fused_conv", "", Fused, 2..=4, attrs, rule, Contraction, Contraction;
    OnnxAttention = "onnx_attention", "Attention", Fused, 3..=7, attrs, rule, Interp, Elem(1.0);
    RotaryEmbedding = "rotary_embedding", "RotaryEmbedding", Fused, 3..=4, attrs, rule, Interp, Elem(1.0);
    InvStd = "inv_std", "", Fused, 2..=2, plain, rule, Native, RowStat;
    InvRms = "inv_rms", "", Fused, 2..=2, plain, rule, Native, RowStat;
    // ---- linear_attention.rs: linear attention and retention (kiln-only, recognised)
    LinearAttention = "linear_attention", "", LinearAttention, 3..=4, attrs, rule, Native, Contraction;
    AttentionKeyKeep = "attention_key_keep", "", LinearAttention, 1..=1, attrs, rule, Interp, Elem(1.0);
    // ---- linear_scan.rs: first-order linear recurrences (kiln-only, recognised in loops)
    LinearScan = "linear_scan", "", LinearScan, 3..=3, attrs, rule, Native, Elem(2.0);
}

impl OpKind {
    /// Whether its attributes hold subgraphs (`if`, `loop`, `scan`): such a node is never
    /// folded at compile time (a loop may run for long) and is opaque to rewrites.
    pub fn holds_graphs(self) -> bool {
        matches!(self, OpKind::If | OpKind::Loop | OpKind::Scan)
    }
}

/// What shape inference knows about a value: its type, and for small integer tensors
/// (shape arithmetic), possibly its contents as dims, which keeps symbols symbolic
/// through Shape → Gather → Concat → Reshape chains.
#[derive(Clone, Debug, PartialEq)]
pub struct Fact {
    /// Static type.
    pub ty: TensorType,
    /// Full contents, when known at compile time.
    pub konst: Option<Arc<Tensor>>,
    /// Contents of a rank-0/1 integer tensor as dims (`[B, S, 768]`), when known.
    pub dims: Option<Vec<Dim>>,
}

impl Fact {
    /// A fact carrying only a type.
    pub fn of(ty: TensorType) -> Fact {
        Fact {
            ty,
            konst: None,
            dims: None,
        }
    }

    /// The contents as dims: from `dims`, or from a small integer constant.
    pub fn value_dims(&self) -> Option<Vec<Dim>> {
        if let Some(d) = &self.dims {
            return Some(d.clone());
        }
        let k = self.konst.as_ref()?;
        if !k.dtype().is_int() || k.rank() > 1 {
            return None;
        }
        Some(
            k.to_i64s()
                .into_iter()
                .map(|x| {
                    if x >= 0 {
                        Dim::Fixed(x as u64)
                    } else {
                        Dim::Unknown
                    }
                })
                .collect(),
        )
    }
}

/// Shape inference for one node: output facts from input facts. `None` inputs are omitted
/// optional operands. An `Err` is a definite inconsistency (a message without the node
/// name: the caller adds it); when facts are missing, return unknown shapes instead.
pub fn infer(op: OpKind, attrs: &Attrs, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>, String> {
    match op.family() {
        Family::Elementwise => elementwise::infer(op, attrs, inputs),
        Family::Reduce => reduce::infer(op, attrs, inputs),
        Family::Nn => nn::infer(op, attrs, inputs),
        Family::Linalg => linalg::infer(op, attrs, inputs),
        Family::Pool => pool::infer(op, attrs, inputs),
        Family::Layout => layout::infer(op, attrs, inputs),
        Family::Index => index::infer(op, attrs, inputs),
        Family::Generate => generate::infer(op, attrs, inputs),
        Family::Resize => resize::infer(op, attrs, inputs),
        Family::Control => control::infer(op, attrs, inputs),
        Family::Fused => fused::infer(op, attrs, inputs),
        Family::LinearAttention => linear_attention::infer(op, attrs, inputs),
        Family::LinearScan => linear_scan::infer(op, attrs, inputs),
        Family::Loss => loss::infer(op, attrs, inputs),
        Family::Quant => quant::infer(op, attrs, inputs),
        Family::Recurrent => recurrent::infer(op, attrs, inputs),
        Family::QuantLinalg => quant_linalg::infer(op, attrs, inputs),
    }
}

/// Reference semantics of one node: output tensors from input tensors. This defines what
/// the op means. An `Err` names the problem (the caller adds node, op and shapes).
pub fn eval(op: OpKind, attrs: &Attrs, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
    match op.family() {
        Family::Elementwise => elementwise::eval(op, attrs, inputs),
        Family::Reduce => reduce::eval(op, attrs, inputs),
        Family::Nn => nn::eval(op, attrs, inputs),
        Family::Linalg => linalg::eval(op, attrs, inputs),
        Family::Pool => pool::eval(op, attrs, inputs),
        Family::Layout => layout::eval(op, attrs, inputs),
        Family::Index => index::eval(op, attrs, inputs),
        Family::Generate => generate::eval(op, attrs, inputs),
        Family::Resize => resize::eval(op, attrs, inputs),
        Family::Control => control::eval(op, attrs, inputs),
        Family::Fused => fused::eval(op, attrs, inputs),
        Family::LinearAttention => linear_attention::eval(op, attrs, inputs),
        Family::LinearScan => linear_scan::eval(op, attrs, inputs),
        Family::Loss => loss::eval(op, attrs, inputs),
        Family::Quant => quant::eval(op, attrs, inputs),
        Family::Recurrent => recurrent::eval(op, attrs, inputs),
        Family::QuantLinalg => quant_linalg::eval(op, attrs, inputs),
    }
}

/// The `i`-th input, required.
pub fn arg<'a, T>(inputs: &[Option<&'a T>], i: usize) -> Result<&'a T, String> {
    inputs
        .get(i)
        .copied()
        .flatten()
        .ok_or_else(|| format!("missing required input #{i}"))
}

/// The `i`-th input, optional.
pub fn opt_arg<'a, T>(inputs: &[Option<&'a T>], i: usize) -> Option<&'a T> {
    inputs.get(i).copied().flatten()
}

/// Normalises a possibly negative axis against a rank.
pub fn norm_axis(axis: i64, rank: usize) -> Result<usize, String> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if a < 0 || a >= r.max(1) && !(r == 0 && a == 0) {
        return Err(format!("axis {axis} is out of range for rank {rank}"));
    }
    Ok(a as usize)
}

/// An error for an op that reached a family that does not implement it.
pub(crate) fn not_in_family(op: OpKind) -> String {
    format!(
        "op `{}` is not implemented by its family ({:?})",
        op.name(),
        op.family()
    )
}
