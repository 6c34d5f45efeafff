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
mod kernels;
pub mod layout;
pub mod linalg;
pub mod loss;
mod movement;
pub mod nn;
pub mod pool;
pub mod quant;
pub mod reduce;
pub mod resize;

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
    Loss,
    Quant,
}

macro_rules! ops {
    ($( $variant:ident = $text:literal, $onnx:literal, $family:ident; )*) => {
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
            pub fn family(self) -> Family {
                match self { $(OpKind::$variant => Family::$family,)* }
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
}

ops! {
    // ---- elementwise.rs: unary math and activations
    Identity = "identity", "Identity", Elementwise;
    Abs = "abs", "Abs", Elementwise;
    Neg = "neg", "Neg", Elementwise;
    Sqrt = "sqrt", "Sqrt", Elementwise;
    Exp = "exp", "Exp", Elementwise;
    Log = "log", "Log", Elementwise;
    Reciprocal = "reciprocal", "Reciprocal", Elementwise;
    Floor = "floor", "Floor", Elementwise;
    Ceil = "ceil", "Ceil", Elementwise;
    Round = "round", "Round", Elementwise;
    Sign = "sign", "Sign", Elementwise;
    Sin = "sin", "Sin", Elementwise;
    Cos = "cos", "Cos", Elementwise;
    Tan = "tan", "Tan", Elementwise;
    Asin = "asin", "Asin", Elementwise;
    Acos = "acos", "Acos", Elementwise;
    Atan = "atan", "Atan", Elementwise;
    Sinh = "sinh", "Sinh", Elementwise;
    Cosh = "cosh", "Cosh", Elementwise;
    Asinh = "asinh", "Asinh", Elementwise;
    Acosh = "acosh", "Acosh", Elementwise;
    Atanh = "atanh", "Atanh", Elementwise;
    Erf = "erf", "Erf", Elementwise;
    Tanh = "tanh", "Tanh", Elementwise;
    Sigmoid = "sigmoid", "Sigmoid", Elementwise;
    Relu = "relu", "Relu", Elementwise;
    LeakyRelu = "leaky_relu", "LeakyRelu", Elementwise;
    Elu = "elu", "Elu", Elementwise;
    Selu = "selu", "Selu", Elementwise;
    Celu = "celu", "Celu", Elementwise;
    Gelu = "gelu", "Gelu", Elementwise;
    Mish = "mish", "Mish", Elementwise;
    Softplus = "softplus", "Softplus", Elementwise;
    Softsign = "softsign", "Softsign", Elementwise;
    HardSigmoid = "hard_sigmoid", "HardSigmoid", Elementwise;
    HardSwish = "hard_swish", "HardSwish", Elementwise;
    ThresholdedRelu = "thresholded_relu", "ThresholdedRelu", Elementwise;
    Shrink = "shrink", "Shrink", Elementwise;
    IsNaN = "is_nan", "IsNaN", Elementwise;
    IsInf = "is_inf", "IsInf", Elementwise;
    Not = "not", "Not", Elementwise;
    BitwiseNot = "bitwise_not", "BitwiseNot", Elementwise;
    Cast = "cast", "Cast", Elementwise;
    CastLike = "cast_like", "CastLike", Elementwise;
    Clip = "clip", "Clip", Elementwise;
    // ---- elementwise.rs: binary and variadic with broadcasting
    Add = "add", "Add", Elementwise;
    Sub = "sub", "Sub", Elementwise;
    Mul = "mul", "Mul", Elementwise;
    Div = "div", "Div", Elementwise;
    Pow = "pow", "Pow", Elementwise;
    Mod = "mod", "Mod", Elementwise;
    Max = "max", "Max", Elementwise;
    Min = "min", "Min", Elementwise;
    Sum = "sum", "Sum", Elementwise;
    Mean = "mean", "Mean", Elementwise;
    PRelu = "prelu", "PRelu", Elementwise;
    Equal = "equal", "Equal", Elementwise;
    Less = "less", "Less", Elementwise;
    LessOrEqual = "less_equal", "LessOrEqual", Elementwise;
    Greater = "greater", "Greater", Elementwise;
    GreaterOrEqual = "greater_equal", "GreaterOrEqual", Elementwise;
    And = "and", "And", Elementwise;
    Or = "or", "Or", Elementwise;
    Xor = "xor", "Xor", Elementwise;
    BitwiseAnd = "bitwise_and", "BitwiseAnd", Elementwise;
    BitwiseOr = "bitwise_or", "BitwiseOr", Elementwise;
    BitwiseXor = "bitwise_xor", "BitwiseXor", Elementwise;
    BitShift = "bit_shift", "BitShift", Elementwise;
    Where = "where", "Where", Elementwise;
    // ---- reduce.rs: reductions along axes, arg-reductions, scans
    ReduceSum = "reduce_sum", "ReduceSum", Reduce;
    ReduceMean = "reduce_mean", "ReduceMean", Reduce;
    ReduceMax = "reduce_max", "ReduceMax", Reduce;
    ReduceMin = "reduce_min", "ReduceMin", Reduce;
    ReduceProd = "reduce_prod", "ReduceProd", Reduce;
    ReduceL1 = "reduce_l1", "ReduceL1", Reduce;
    ReduceL2 = "reduce_l2", "ReduceL2", Reduce;
    ReduceLogSum = "reduce_log_sum", "ReduceLogSum", Reduce;
    ReduceLogSumExp = "reduce_log_sum_exp", "ReduceLogSumExp", Reduce;
    ReduceSumSquare = "reduce_sum_square", "ReduceSumSquare", Reduce;
    ArgMax = "arg_max", "ArgMax", Reduce;
    ArgMin = "arg_min", "ArgMin", Reduce;
    CumSum = "cumsum", "CumSum", Reduce;
    CumProd = "cumprod", "CumProd", Reduce;
    // ---- nn.rs: softmax and normalisations
    Softmax = "softmax", "Softmax", Nn;
    LogSoftmax = "log_softmax", "LogSoftmax", Nn;
    Hardmax = "hardmax", "Hardmax", Nn;
    LayerNorm = "layer_norm", "LayerNormalization", Nn;
    RmsNorm = "rms_norm", "RMSNormalization", Nn;
    BatchNorm = "batch_norm", "BatchNormalization", Nn;
    InstanceNorm = "instance_norm", "InstanceNormalization", Nn;
    GroupNorm = "group_norm", "GroupNormalization", Nn;
    LpNorm = "lp_norm", "LpNormalization", Nn;
    MeanVarianceNorm = "mean_variance_norm", "MeanVarianceNormalization", Nn;
    Lrn = "lrn", "LRN", Nn;
    Dropout = "dropout", "Dropout", Nn;
    // ---- linalg.rs: contractions
    MatMul = "matmul", "MatMul", Linalg;
    Gemm = "gemm", "Gemm", Linalg;
    Einsum = "einsum", "Einsum", Linalg;
    Conv = "conv", "Conv", Linalg;
    ConvTranspose = "conv_transpose", "ConvTranspose", Linalg;
    // ---- pool.rs: pooling windows
    MaxPool = "max_pool", "MaxPool", Pool;
    AveragePool = "average_pool", "AveragePool", Pool;
    LpPool = "lp_pool", "LpPool", Pool;
    GlobalMaxPool = "global_max_pool", "GlobalMaxPool", Pool;
    GlobalAveragePool = "global_average_pool", "GlobalAveragePool", Pool;
    GlobalLpPool = "global_lp_pool", "GlobalLpPool", Pool;
    // ---- layout.rs: shape and data movement
    Shape = "shape", "Shape", Layout;
    Size = "size", "Size", Layout;
    Reshape = "reshape", "Reshape", Layout;
    Flatten = "flatten", "Flatten", Layout;
    Squeeze = "squeeze", "Squeeze", Layout;
    Unsqueeze = "unsqueeze", "Unsqueeze", Layout;
    Transpose = "transpose", "Transpose", Layout;
    Concat = "concat", "Concat", Layout;
    Split = "split", "Split", Layout;
    Slice = "slice", "Slice", Layout;
    Expand = "expand", "Expand", Layout;
    Tile = "tile", "Tile", Layout;
    Pad = "pad", "Pad", Layout;
    DepthToSpace = "depth_to_space", "DepthToSpace", Layout;
    SpaceToDepth = "space_to_depth", "SpaceToDepth", Layout;
    ReverseSequence = "reverse_sequence", "ReverseSequence", Layout;
    // ---- index.rs: gathers, scatters and data-dependent selection
    Gather = "gather", "Gather", Index;
    GatherElements = "gather_elements", "GatherElements", Index;
    GatherND = "gather_nd", "GatherND", Index;
    ScatterElements = "scatter_elements", "ScatterElements", Index;
    ScatterND = "scatter_nd", "ScatterND", Index;
    OneHot = "one_hot", "OneHot", Index;
    NonZero = "non_zero", "NonZero", Index;
    Compress = "compress", "Compress", Index;
    TopK = "top_k", "TopK", Index;
    Trilu = "trilu", "Trilu", Index;
    // ---- generate.rs: tensors made from attributes or shapes
    Constant = "constant", "Constant", Generate;
    ConstantOfShape = "constant_of_shape", "ConstantOfShape", Generate;
    Range = "range", "Range", Generate;
    EyeLike = "eye_like", "EyeLike", Generate;
    // ---- resize.rs: resampling
    Resize = "resize", "Resize", Resize;
    // ---- control.rs: control flow with subgraphs
    If = "if", "If", Control;
    // ---- loss.rs: training losses
    NegativeLogLikelihoodLoss = "negative_log_likelihood_loss", "NegativeLogLikelihoodLoss", Loss;
    SoftmaxCrossEntropyLoss = "softmax_cross_entropy_loss", "SoftmaxCrossEntropyLoss", Loss;
    // ---- quant.rs: linear quantization
    QuantizeLinear = "quantize_linear", "QuantizeLinear", Quant;
    DequantizeLinear = "dequantize_linear", "DequantizeLinear", Quant;
    // ---- fused.rs: kiln-only ops that canonicalisation recognises (no ONNX name)
    Silu = "silu", "", Fused;
    Rotary = "rotary", "", Fused;
    Attention = "attention", "", Fused;
    Linear = "linear", "", Fused;
    OnnxAttention = "onnx_attention", "Attention", Fused;
    RotaryEmbedding = "rotary_embedding", "RotaryEmbedding", Fused;
    InvStd = "inv_std", "", Fused;
    InvRms = "inv_rms", "", Fused;
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
        Family::Loss => loss::infer(op, attrs, inputs),
        Family::Quant => quant::infer(op, attrs, inputs),
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
        Family::Loss => loss::eval(op, attrs, inputs),
        Family::Quant => quant::eval(op, attrs, inputs),
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
