//! Contraction kernels: a `Kernel::Contraction` node compiled into a [`Prepared`] routine
//! (constant weights packed once, attributes parsed once) and run on the CPU kernels in
//! [`crate::native`]: GEMM with the fused `linear` epilogue for matmul / gemm / linear,
//! flash attention for `attention`, im2col + GEMM for convolutions, GEMM + col2im for
//! `conv_transpose`, the exact 8-bit GEMM ([`crate::native::gemm_i8`]) for
//! `matmul_integer`, `qlinear_matmul`, `conv_integer` and `qlinear_conv`; also the constant
//! weights of the recurrent ops' native routine (those nodes are `Fallback` kernels).
//! Anything these do not cover (other dtypes, layouts, attributes) returns `None` from
//! [`Prepared::run`] and the executor runs the interpreter's op instead, so an unsupported
//! case is slow, never wrong.

use super::arena::Outputs;
use crate::native::attention::{self, Attention, Mask};
use crate::native::conv::{pack_weight, patch_conv, PatchConv};
use crate::native::conv_gemm::{ConvAct, ConvArgs, PreparedConv};
use crate::native::conv_transpose::PreparedConvTranspose;
use crate::native::gemm::{
    gemm_in, sparse, Activation, Epilogue, GemmConfig, Isa, MatMut, MatRef, PackedB, Rhs,
};
use crate::native::gemm_i8::{self, Bytes, IsaI8, PackedB8};
use crate::pool::{Pool, SharedMut};
use kiln_ir::{Attrs, DType, Graph, OpKind, Tensor, TensorData, ValueId};
use std::borrow::Cow;
use std::collections::HashMap;

/// A contraction node compiled for the CPU.
#[derive(Debug)]
pub enum Prepared {
    /// `matmul(a, b)`; `b` packed when it is a constant 2-D f32 matrix.
    MatMul {
        /// The packed constant right operand.
        packed: Option<PackedB>,
        /// A is made by a sparsifying op (ReLU, shrink): skip its zeros when the measured
        /// density is low ([`crate::native::gemm::sparse`]).
        sparse_input: bool,
    },
    /// `linear(x, w, bias?, row_scale?, residual?)`.
    Linear {
        /// The epilogue activation.
        act: Activation,
        /// The packed constant weight.
        packed: Option<PackedB>,
        /// As for `MatMul`.
        sparse_input: bool,
    },
    /// ONNX `Gemm`: `alpha·op(A)·op(B) + beta·C`.
    Gemm {
        /// Factor on the product.
        alpha: f32,
        /// Factor on C.
        beta: f32,
        /// Transpose A.
        trans_a: bool,
        /// Transpose B.
        trans_b: bool,
        /// `op(B)` packed when B is a constant.
        packed: Option<PackedB>,
    },
    /// kiln `attention`.
    Attention {
        /// `scale` attribute (default 1/√D, resolved at run time).
        scale: Option<f32>,
        /// `causal` attribute.
        causal: bool,
        /// `layout = "bshd"`: sequence-major q, k, v and output.
        seq_major: bool,
    },
    /// `matmul_integer(a, b, a_zp?, b_zp?)` with a 2-D u8/i8 `b`: the exact integer GEMM.
    MatMulInteger {
        /// The packed constant right operand.
        packed: Option<PackedB8>,
    },
    /// `matmul_integer_scaled(a, b, a_zp?, b_zp?, scale, bias?)`: the integer GEMM storing
    /// `f32(acc)·scale + bias`.
    MatMulIntegerScaled {
        /// The packed constant right operand.
        packed: Option<PackedB8>,
    },
    /// `qlinear_matmul(a, sa, za, b, sb, zb, sy, zy)` with a 2-D `b`: the integer GEMM, then
    /// the reference's requantisation.
    QLinearMatMul {
        /// The packed constant right operand.
        packed: Option<PackedB8>,
    },
    /// `conv_integer` / `qlinear_conv` of any geometry on the integer GEMM, the weight
    /// packed once ([`crate::native::conv_integer`]).
    ConvI8(crate::native::conv_integer::PreparedConvI8),
    /// A conv whose kernel equals its stride, no padding, dilation 1, one group.
    PatchConv {
        /// The strides (the weight's kernel must equal them).
        stride: [usize; 2],
        /// The constant weight, packed as `Wᵀ[C·kh·kw, OC]`.
        packed: Option<PackedB>,
    },
    /// Any other f32 conv (and `fused_conv`: conv, activation, residual add): the weight
    /// laid out once, im2col chunks on the GEMM ([`crate::native::conv_gemm`]).
    Conv(PreparedConv),
    /// An f32 `conv_transpose` of any geometry: the transposed weight laid out once, GEMM
    /// into columns and col2im ([`crate::native::conv_transpose`]).
    ConvTranspose(PreparedConvTranspose),
    /// `lstm` / `gru` / `rnn` with constant `W` and `R`, laid out once
    /// ([`super::recurrent`]; a node without constant weights is not prepared and runs the
    /// same routine on its operands).
    Recurrent(super::recurrent::PreparedRecurrent),
}

/// Compiles contraction node `n` of `g`; `None` when no CPU routine applies (the
/// interpreter runs it). `constants` holds the values known at compile time.
pub fn prepare(g: &Graph, n: usize, constants: &HashMap<ValueId, &Tensor>) -> Option<Prepared> {
    let node = g.nodes.get(n)?;
    let input = |i: usize| node.inputs.get(i).copied().flatten();
    let mut p = prepare_op(node.op, &node.attrs, |i| {
        input(i).and_then(|v| constants.get(&v).copied())
    })?;
    if let Some(a) = input(0) {
        if sparsifying_producer(&g.nodes[..n], a) {
            p.set_sparse_input();
        }
    }
    Some(p)
}

/// Whether `v` is made (among `before`) by an op whose output is mostly zeros: `relu`, a
/// `linear` with a ReLU epilogue, `shrink` (the approximate `ffn-threshold` rewrite),
/// `thresholded_relu` with `alpha >= 0`, `where(_, _, 0)` with a constant zero (`ffn-topk`).
pub fn sparsifying_producer(before: &[kiln_ir::Node], v: ValueId) -> bool {
    let Some(p) = before.iter().rev().find(|p| p.outputs.contains(&v)) else {
        return false;
    };
    match p.op {
        OpKind::Relu | OpKind::Shrink => true,
        // `where(mask, h, 0)`: the approximate `ffn-topk` rewrite.
        OpKind::Where => p.inputs.get(2).copied().flatten().is_some_and(|z| {
            before.iter().rev().find(|c| c.outputs.contains(&z)).is_some_and(|c| {
                c.op == OpKind::Constant
                    && matches!(c.attrs.get("value"), Some(kiln_ir::Attr::Tensor(t)) if t.to_f64s().iter().all(|&x| x == 0.0))
            })
        }),
        OpKind::ThresholdedRelu => p.attrs.float_or("alpha", 1.0).is_ok_and(|a| a >= 0.0),
        OpKind::Linear => p.attrs.string_or("activation", "none".into()).as_deref() == Ok("relu"),
        _ => false,
    }
}

/// Compiles one contraction op; `constant(i)` is input `i`'s value when known at compile
/// time (weights to pack once).
pub fn prepare_op<'t>(
    op: OpKind,
    attrs: &Attrs,
    constant: impl Fn(usize) -> Option<&'t Tensor>,
) -> Option<Prepared> {
    // A constant 2-D f32 matrix, packed (transposed first when `trans`).
    let pack = |i: usize, trans: bool| -> Option<PackedB> {
        let t = constant(i)?;
        let [r, c] = <[usize; 2]>::try_from(t.shape()).ok()?;
        let data = t.as_slice::<f32>()?;
        let view = if trans {
            MatRef::new(data, c, r, 1, c).ok()?
        } else {
            MatRef::row_major(data, r, c).ok()?
        };
        PackedB::pack(view).ok()
    };
    Some(match op {
        OpKind::MatMul => Prepared::MatMul {
            packed: pack(1, false),
            sparse_input: false,
        },
        OpKind::Linear => Prepared::Linear {
            act: Activation::from_name(&attrs.string_or("activation", "none".into()).ok()?)?,
            packed: pack(1, false),
            sparse_input: false,
        },
        OpKind::Gemm => {
            let trans_b = attrs.int_or("transB", 0).ok()? != 0;
            Prepared::Gemm {
                alpha: attrs.float_or("alpha", 1.0).ok()?,
                beta: attrs.float_or("beta", 1.0).ok()?,
                trans_a: attrs.int_or("transA", 0).ok()? != 0,
                trans_b,
                packed: pack(1, trans_b),
            }
        }
        OpKind::Attention => Prepared::Attention {
            scale: attrs.float("scale").ok()?,
            causal: match attrs.int_or("causal", 0).ok()? {
                0 => false,
                1 => true,
                _ => return None,
            },
            seq_major: kiln_ir::ops::fused::attention_seq_major(attrs).ok()?,
        },
        OpKind::MatMulInteger => Prepared::MatMulInteger {
            packed: constant(1).and_then(|t| {
                let [k, n] = <[usize; 2]>::try_from(t.shape()).ok()?;
                PackedB8::pack(bytes(t)?, k, n).ok()
            }),
        },
        OpKind::MatMulIntegerScaled => Prepared::MatMulIntegerScaled {
            packed: constant(1).and_then(|t| {
                let [k, n] = <[usize; 2]>::try_from(t.shape()).ok()?;
                PackedB8::pack(bytes(t)?, k, n).ok()
            }),
        },
        OpKind::QLinearMatMul => Prepared::QLinearMatMul {
            packed: constant(3).and_then(|t| {
                let [k, n] = <[usize; 2]>::try_from(t.shape()).ok()?;
                PackedB8::pack(bytes(t)?, k, n).ok()
            }),
        },
        OpKind::ConvInteger => Prepared::ConvI8(crate::native::conv_integer::PreparedConvI8::new(
            op,
            attrs,
            constant(1),
        )?),
        OpKind::QLinearConv => Prepared::ConvI8(crate::native::conv_integer::PreparedConvI8::new(
            op,
            attrs,
            constant(3),
        )?),
        OpKind::Conv if patch_stride(attrs).is_some() => Prepared::PatchConv {
            stride: patch_stride(attrs)?,
            packed: constant(1).and_then(|t| {
                let [oc, c, kh, kw] = <[usize; 4]>::try_from(t.shape()).ok()?;
                pack_weight(t.as_slice::<f32>()?, oc, c * kh * kw).ok()
            }),
        },
        OpKind::Conv | OpKind::FusedConv => {
            let act = match op {
                OpKind::FusedConv => ConvAct::from_attrs(attrs)?,
                _ => ConvAct::Epilogue(Activation::None),
            };
            // The weight is laid out now when it (and the bias, if any) is a constant; a
            // bias that is not a constant makes the run lay it out per call.
            let w = constant(1).and_then(|t| Some((t.as_slice::<f32>()?, t.shape())));
            let bias = constant(2).and_then(|t| t.as_slice::<f32>());
            Prepared::Conv(PreparedConv::new(attrs, act, w, bias))
        }
        OpKind::Lstm | OpKind::Gru | OpKind::Rnn => Prepared::Recurrent(
            super::recurrent::PreparedRecurrent::new(op, attrs, constant(1), constant(2))?,
        ),
        OpKind::ConvTranspose => {
            let w = constant(1).and_then(|t| Some((t.as_slice::<f32>()?, t.shape())));
            Prepared::ConvTranspose(PreparedConvTranspose::new(attrs, w))
        }
        _ => return None,
    })
}

/// The strides of a conv whose attributes make it a patch convolution (the weight's kernel
/// is checked against them at run time).
fn patch_stride(attrs: &Attrs) -> Option<[usize; 2]> {
    let known = [
        "kernel_shape",
        "strides",
        "pads",
        "dilations",
        "group",
        "auto_pad",
        "fused_from",
    ];
    if attrs.0.keys().any(|k| !known.contains(&k.as_str())) {
        return None;
    }
    let ints = |name| attrs.ints(name).ok();
    let (Some(strides), Some(pads), Some(dil)) = (
        ints("strides").flatten(),
        ints("pads").map(|p| p.unwrap_or_else(|| vec![0; 4])),
        ints("dilations").map(|d| d.unwrap_or_else(|| vec![1; 2])),
    ) else {
        return None;
    };
    let pad_ok = matches!(
        attrs.string_or("auto_pad", "NOTSET".into()).as_deref(),
        Ok("NOTSET") | Ok("VALID")
    );
    let kernel_ok = match ints("kernel_shape") {
        Some(Some(k)) => k == strides,
        Some(None) => true,
        None => false,
    };
    let ok = strides.len() == 2
        && strides.iter().all(|&s| s > 0)
        && pads.iter().all(|&p| p == 0)
        && dil.iter().all(|&d| d == 1)
        && attrs.int_or("group", 1) == Ok(1)
        && pad_ok
        && kernel_ok;
    ok.then(|| [strides[0] as usize, strides[1] as usize])
}

fn f32s(t: &Tensor) -> Option<&[f32]> {
    t.as_slice::<f32>()
}

fn gemm_cfg(threads: usize) -> GemmConfig {
    GemmConfig {
        threads,
        isa: Isa::Auto,
    }
}

/// `t` broadcast (numpy rules, never enlarging `shape`) to a dense `shape`; `None` when it
/// does not fit.
fn expand(t: &Tensor, shape: &[usize]) -> Option<Vec<f32>> {
    let data = f32s(t)?;
    let ts = t.shape();
    if ts.len() > shape.len() {
        return None;
    }
    let off = shape.len() - ts.len();
    let mut strides = vec![0usize; shape.len()];
    let mut acc = 1usize;
    for (i, &d) in ts.iter().enumerate().rev() {
        let want = shape[off + i];
        if d != want && d != 1 {
            return None;
        }
        strides[off + i] = if d == 1 { 0 } else { acc };
        acc *= d;
    }
    let total: usize = shape.iter().product();
    if ts.len() == shape.len() && ts == shape {
        return Some(data.to_vec());
    }
    let mut out = Vec::with_capacity(total);
    let Some((&inner, outer_dims)) = shape.split_last() else {
        return Some(data.to_vec());
    };
    if total == 0 {
        return Some(out);
    }
    // One run of the last axis at a time: a slice copy where the operand varies along it,
    // a fill where it broadcasts (a bias broadcast over rows is one copy per row).
    let inner_stride = strides[shape.len() - 1];
    let mut idx = vec![0usize; outer_dims.len()];
    for _ in 0..total / inner {
        let base: usize = idx.iter().zip(&strides).map(|(i, s)| i * s).sum();
        if inner_stride == 0 {
            out.extend(std::iter::repeat_n(data[base], inner));
        } else {
            out.extend_from_slice(&data[base..base + inner]);
        }
        for ax in (0..outer_dims.len()).rev() {
            idx[ax] += 1;
            if idx[ax] < outer_dims[ax] {
                break;
            }
            idx[ax] = 0;
        }
    }
    Some(out)
}

/// A per-column vector `[N]` from an operand that broadcasts to `out` and varies only
/// along the last axis (`None` otherwise).
fn column_vector(t: &Tensor, out: &[usize]) -> Option<Vec<f32>> {
    let ts = t.shape();
    if ts.len() > out.len() || ts.iter().rev().skip(1).any(|&d| d != 1) {
        return None;
    }
    let n = *out.last()?;
    let last = Tensor::new(ts.last().map_or(vec![], |&d| vec![d]), t.data().clone()).ok()?;
    expand(&last, &[n])
}

/// A per-row vector `[M]` (M = product of `out`'s leading dims) from an operand whose last
/// dim is 1 that broadcasts to `out` (`None` otherwise).
fn row_vector(t: &Tensor, out: &[usize]) -> Option<Vec<f32>> {
    let ts = t.shape();
    if ts.len() > out.len() || ts.last().is_some_and(|&d| d != 1) {
        return None;
    }
    let (_, lead) = out.split_last()?;
    let lead_t = if ts.is_empty() {
        &[][..]
    } else {
        &ts[..ts.len() - 1]
    };
    if lead_t.len() > lead.len() {
        return None;
    }
    let inner = Tensor::new(lead_t.to_vec(), t.data().clone()).ok()?;
    expand(&inner, lead)
}

impl Prepared {
    /// Lets a `matmul` / `linear` skip the zeros of its left operand (no effect on other
    /// contractions).
    pub fn set_sparse_input(&mut self) {
        if let Prepared::MatMul { sparse_input, .. } | Prepared::Linear { sparse_input, .. } = self
        {
            *sparse_input = true;
        }
    }

    /// Whether the sparse-input path is enabled.
    pub fn sparse_input(&self) -> bool {
        matches!(
            self,
            Prepared::MatMul {
                sparse_input: true,
                ..
            } | Prepared::Linear {
                sparse_input: true,
                ..
            }
        )
    }

    /// Runs the node on `ins` (the node's inputs, in order), or `None` when this routine
    /// does not cover the inputs it got (the caller then runs the interpreter's op).
    /// Its output goes to its planned region in `out` where it has one.
    pub fn run(
        &self,
        ins: &[Option<&Tensor>],
        pool: &Pool,
        out: &mut Outputs,
    ) -> Option<Result<Vec<Tensor>, String>> {
        let arg = |i: usize| ins.get(i).copied().flatten();
        match self {
            Prepared::MatMulInteger { packed } => {
                return matmul_integer(ins, packed.as_ref(), pool, out).map(|r| r.map(|t| vec![t]));
            }
            Prepared::MatMulIntegerScaled { packed } => {
                return matmul_integer_scaled(ins, packed.as_ref(), pool, out)
                    .map(|r| r.map(|t| vec![t]));
            }
            Prepared::QLinearMatMul { packed } => {
                return qlinear_matmul(ins, packed.as_ref(), pool).map(|r| r.map(|t| vec![t]));
            }
            Prepared::ConvI8(p) => return p.run(ins, pool, out).map(|r| r.map(|t| vec![t])),
            // Its sequence lengths are i32.
            Prepared::Recurrent(p) => return p.run(ins, pool).map(Ok),
            _ => {}
        }
        if ins
            .iter()
            .flatten()
            .any(|t| t.dtype() != DType::F32 && t.dtype() != DType::Bool)
        {
            return None;
        }
        match self {
            Prepared::MatMul {
                packed,
                sparse_input,
            } => matmul(arg(0)?, arg(1)?, packed.as_ref(), *sparse_input, pool, out),
            Prepared::Linear {
                act,
                packed,
                sparse_input,
            } => linear(ins, *act, packed.as_ref(), *sparse_input, pool, out),
            Prepared::Gemm {
                alpha,
                beta,
                trans_a,
                trans_b,
                packed,
            } => gemm_op(
                ins,
                *alpha,
                *beta,
                *trans_a,
                *trans_b,
                packed.as_ref(),
                pool,
                out,
            ),
            Prepared::Attention {
                scale,
                causal,
                seq_major,
            } => attention_op(ins, *scale, *causal, *seq_major, pool, out),
            Prepared::PatchConv { stride, packed } => {
                conv_op(ins, *stride, packed.as_ref(), pool, out)
            }
            Prepared::Conv(pc) => general_conv(pc, ins, pool, out),
            Prepared::ConvTranspose(pc) => conv_transpose_op(pc, ins, pool, out),
            Prepared::MatMulInteger { .. }
            | Prepared::MatMulIntegerScaled { .. }
            | Prepared::QLinearMatMul { .. }
            | Prepared::ConvI8(_)
            | Prepared::Recurrent(_) => None,
        }
        .map(|r| r.map(|t| vec![t]))
    }
}

/// An 8-bit tensor's elements.
fn bytes(t: &Tensor) -> Option<Bytes<'_>> {
    match t.data() {
        TensorData::U8(_) => t.as_slice::<u8>().map(Bytes::U8),
        TensorData::I8(_) => t.as_slice::<i8>().map(Bytes::I8),
        _ => None,
    }
}

/// A zero point's values as i32 when it has `operand`'s dtype and one of the forms the
/// integer GEMM takes: one value, or one per entry of `len` (`shape` lists the shapes that
/// mean per row / per column). `None` (the interpreter runs) otherwise.
fn zero_point(
    zp: Option<&Tensor>,
    operand: &Tensor,
    len: usize,
    shapes: &[&[usize]],
) -> Option<Vec<i32>> {
    let Some(z) = zp else {
        return Some(vec![0]);
    };
    if z.dtype() != operand.dtype() {
        return None;
    }
    if z.len() != 1 && !(z.len() == len && shapes.contains(&z.shape())) {
        return None;
    }
    Some(z.to_i64s().into_iter().map(|v| v as i32).collect())
}

/// `matmul_integer(a[.., M, K], b[K, N], a_zp?, b_zp?)` as one `(rows·) × K × N` integer
/// GEMM, A's zero point per tensor or per row, B's per tensor or per column.
fn matmul_integer(
    ins: &[Option<&Tensor>],
    packed: Option<&PackedB8>,
    pool: &Pool,
    out: &mut Outputs,
) -> Option<Result<Tensor, String>> {
    let (a, m, za, zb, shape) = int_operands(ins)?;
    let packed = packed_b8(packed, ins.get(1).copied().flatten()?)?;
    let n = packed.cols();
    let mut y = out
        .region::<i32>(0, m * n)
        .unwrap_or_else(|| vec![0i32; m * n].into());
    let r = gemm_i8::matmul_integer(a, m, &za, &packed, &zb, &mut y, pool, IsaI8::Auto);
    Some(
        r.map(|()| Tensor::from_buf(shape, y))
            .map_err(|e| e.to_string()),
    )
}

/// `qlinear_matmul(a, sa, za, b, sb, zb, sy, zy)`: the integer GEMM of [`matmul_integer`]
/// (A's scale and zero point per tensor, B's per tensor or per column), then the
/// reference's requantisation `saturate(round_half_even(acc · m) + zy)` with `m = f32(f32(sa
/// · sb) / sy)` per column and the product in f64, so the bytes equal the interpreter's.
/// f32 scales only; other forms return `None` (the interpreter runs the node).
fn qlinear_matmul(
    ins: &[Option<&Tensor>],
    packed: Option<&PackedB8>,
    pool: &Pool,
) -> Option<Result<Tensor, String>> {
    let arg = |i: usize| ins.get(i).copied().flatten();
    let (a, sa, za, b, sb, zb, sy, zy) = (
        arg(0)?,
        arg(1)?,
        arg(2),
        arg(3)?,
        arg(4)?,
        arg(5),
        arg(6)?,
        arg(7),
    );
    let [_, n] = <[usize; 2]>::try_from(b.shape()).ok()?;
    let single = |t: Option<&Tensor>| t.is_none_or(|t| t.len() == 1);
    let per_col =
        |t: &Tensor| t.len() == 1 || (t.len() == n && [&[n][..], &[1, n]].contains(&t.shape()));
    let ydt = zy.map_or(a.dtype(), Tensor::dtype);
    if sa.len() != 1
        || sy.len() != 1
        || !single(za)
        || !single(zy)
        || !per_col(sb)
        || zb.is_some_and(|z| z.shape() != sb.shape() && !(z.len() == 1 && sb.len() == 1))
        || !matches!(ydt, DType::I8 | DType::U8)
    {
        return None;
    }
    let f = |t: &Tensor| {
        t.as_slice::<f32>()
            .map(|v| v.iter().map(|&x| f64::from(x)).collect::<Vec<f64>>())
    };
    let (sav, sbv, syv) = (f(sa)?, f(sb)?, f(sy)?);
    let acc = match matmul_integer(
        &[Some(a), Some(b), za, zb],
        packed,
        pool,
        &mut Outputs::none(),
    )? {
        Ok(t) => t,
        Err(e) => return Some(Err(e)),
    };
    let acc_v = acc.as_slice::<i32>()?;
    // The multiplier per column, each step rounded to f32 as in the reference.
    let mult: Vec<f64> = (0..n)
        .map(|j| {
            let sab = f64::from((sav[0] * sbv[if sbv.len() == 1 { 0 } else { j }]) as f32);
            f64::from((sab / syv[0]) as f32)
        })
        .collect();
    let z = zy.map_or(0.0, |z| z.to_f64s()[0]);
    let (lo, hi) = if ydt == DType::I8 {
        (-128.0, 127.0)
    } else {
        (0.0, 255.0)
    };
    // Row by row against the column multipliers (a loop the compiler vectorises; the
    // magic-number rounding equals `round_ties_even` wherever the clamp does not decide,
    // and NaN still becomes 0 as the reference's cast makes it).
    let mut bytes = vec![0u8; acc_v.len()];
    for (row_out, row) in bytes
        .chunks_exact_mut(n.max(1))
        .zip(acc_v.chunks_exact(n.max(1)))
    {
        for ((d, &c), &mu) in row_out.iter_mut().zip(row).zip(&mult) {
            let y = (crate::native::conv_integer::round_even(f64::from(c) * mu) + z).clamp(lo, hi);
            // An i8 result keeps its two's-complement byte.
            *d = y as i32 as u8;
        }
    }
    let shape = acc.shape().to_vec();
    Some(Ok(if ydt == DType::I8 {
        Tensor::from_vec(
            shape,
            bytes.into_iter().map(|b| b as i8).collect::<Vec<i8>>(),
        )
    } else {
        Tensor::from_vec(shape, bytes)
    }))
}

/// The prepared packing of the constant B `[K, N]` when it fits `b`, else `b` packed now.
fn packed_b8<'p>(packed: Option<&'p PackedB8>, b: &Tensor) -> Option<Cow<'p, PackedB8>> {
    let [k, n] = <[usize; 2]>::try_from(b.shape()).ok()?;
    Some(match packed.filter(|p| p.rows() == k && p.cols() == n) {
        Some(p) => Cow::Borrowed(p),
        None => Cow::Owned(PackedB8::pack(bytes(b)?, k, n).ok()?),
    })
}

/// The integer GEMM's operands as [`matmul_integer`] reads them: A's bytes, the row count,
/// the zero points, the output's shape.
type IntOperands<'t> = (Bytes<'t>, usize, Vec<i32>, Vec<i32>, Vec<usize>);

fn int_operands<'t>(ins: &[Option<&'t Tensor>]) -> Option<IntOperands<'t>> {
    let arg = |i: usize| ins.get(i).copied().flatten();
    let (a, b) = (arg(0)?, arg(1)?);
    let [k, n] = <[usize; 2]>::try_from(b.shape()).ok()?;
    if a.rank() == 0 || *a.shape().last()? != k {
        return None;
    }
    let lead = &a.shape()[..a.rank() - 1];
    let m: usize = lead.iter().product();
    let mut row_shape = lead.to_vec();
    row_shape.push(1);
    let za = if a.rank() == 2 {
        zero_point(arg(2), a, m, &[&[m], &row_shape])?
    } else {
        zero_point(arg(2), a, m, &[&row_shape])?
    };
    let zb = zero_point(arg(3), b, n, &[&[n], &[1, n]])?;
    let mut shape = lead.to_vec();
    shape.push(n);
    Some((bytes(a)?, m, za, zb, shape))
}

/// `matmul_integer_scaled`: the integer GEMM of [`matmul_integer`] storing `f32(acc)·scale
/// (+ bias)` with the scale and bias one value or one per column (`None` otherwise).
fn matmul_integer_scaled(
    ins: &[Option<&Tensor>],
    packed: Option<&PackedB8>,
    pool: &Pool,
    out: &mut Outputs,
) -> Option<Result<Tensor, String>> {
    let arg = |i: usize| ins.get(i).copied().flatten();
    let (a, m, za, zb, shape) = int_operands(ins)?;
    let packed = packed_b8(packed, arg(1)?)?;
    let n = packed.cols();
    // One value, or one per column; a vector broadcast along other axes goes to the
    // interpreter.
    let vector = |t: &Tensor| -> Option<Vec<f32>> {
        let v = t.as_slice::<f32>()?;
        let ts = t.shape();
        let fits =
            ts.len() <= shape.len() && (t.len() == 1 || (t.len() == n && ts.last() == Some(&n)));
        fits.then(|| v.to_vec())
    };
    let scale = vector(arg(4)?)?;
    let bias = match arg(5) {
        Some(t) => vector(t)?,
        None => vec![],
    };
    let fill = |y: &mut [std::mem::MaybeUninit<f32>]| {
        gemm_i8::matmul_integer_scaled(a, m, &za, &packed, &zb, &scale, &bias, y, pool, IsaI8::Auto)
    };
    // SAFETY: `matmul_integer_scaled` returns Ok only when it wrote all `m·n` values.
    let y = unsafe { out.write_f32(0, m * n, fill) };
    Some(
        y.map(|y| Tensor::from_buf(shape, y))
            .map_err(|e| e.to_string()),
    )
}

/// `x[.., K] · w[K, N]` as one `(rows·) × K` GEMM with the epilogue; `x` of rank >= 1.
#[allow(clippy::too_many_arguments)]
fn flat_gemm(
    x: &Tensor,
    w: &Tensor,
    packed: Option<&PackedB>,
    sparse_input: bool,
    ep: &Epilogue<'_>,
    out_shape: Vec<usize>,
    pool: &Pool,
    out: &mut Outputs,
) -> Option<Result<Tensor, String>> {
    let xd = f32s(x)?;
    let [k, n] = <[usize; 2]>::try_from(w.shape()).ok()?;
    let m: usize = x.shape()[..x.rank() - 1].iter().product();
    if *x.shape().last()? != k {
        return None;
    }
    if sparse_input {
        if let Some(wd) = f32s(w) {
            let (active, density) = sparse::active_columns(xd, m, k);
            let max = sparse::max_density(m);
            if max > 0.0 && density <= max {
                let fill = |y: &mut [std::mem::MaybeUninit<f32>]| {
                    sparse::sparse_gemm_in(pool, xd, m, k, wd, n, &active, y, ep)
                };
                // SAFETY: `sparse_gemm_in` returns Ok only when it wrote all `m·n` values.
                let y = unsafe { out.write_f32(0, m * n, fill) };
                return Some(
                    y.map(|y| Tensor::from_buf(out_shape, y))
                        .map_err(|e| e.to_string()),
                );
            }
        }
    }
    let packed = packed.filter(|p| p.rows() == k && p.cols() == n);
    let wd = match packed {
        Some(_) => &[][..],
        None => f32s(w)?,
    };
    // Uninitialised where fresh: the GEMM writes every element (zeroing first cost 4% of a
    // run).
    let fill = |y: &mut [std::mem::MaybeUninit<f32>]| {
        let a = MatRef::row_major(xd, m, k)?;
        let c = MatMut::uninit(y, m, n)?;
        let rhs = match packed {
            Some(p) => Rhs::Packed(p),
            None => Rhs::Plain(MatRef::row_major(wd, k, n)?),
        };
        gemm_in(pool, a, rhs, c, ep, &gemm_cfg(pool.threads()))
    };
    // SAFETY: `gemm_in` returns Ok only when it wrote all `m·n` values.
    let y = unsafe { out.write_f32(0, m * n, fill) };
    Some(
        y.map(|y| Tensor::from_buf(out_shape, y))
            .map_err(|e| e.to_string()),
    )
}

fn matmul(
    a: &Tensor,
    b: &Tensor,
    packed: Option<&PackedB>,
    sparse_input: bool,
    pool: &Pool,
    y: &mut Outputs,
) -> Option<Result<Tensor, String>> {
    if a.rank() == 0 || b.rank() < 2 {
        return None;
    }
    if b.rank() == 2 {
        let mut out = a.shape().to_vec();
        *out.last_mut()? = b.shape()[1];
        return flat_gemm(
            a,
            b,
            packed,
            sparse_input,
            &Epilogue::default(),
            out,
            pool,
            y,
        );
    }
    if a.rank() < 2 {
        return None;
    }
    batched_matmul(a, b, pool, y)
}

/// `[.., M, K] × [.., K, N]` with broadcast batch dims: one single-threaded GEMM per batch
/// entry, batch entries spread over the pool (each writes its own output block).
fn batched_matmul(
    a: &Tensor,
    b: &Tensor,
    pool: &Pool,
    out: &mut Outputs,
) -> Option<Result<Tensor, String>> {
    let (ad, bd) = (f32s(a)?, f32s(b)?);
    let (ash, bsh) = (a.shape(), b.shape());
    let (m, k) = (ash[ash.len() - 2], ash[ash.len() - 1]);
    let (k2, n) = (bsh[bsh.len() - 2], bsh[bsh.len() - 1]);
    if k != k2 {
        return None;
    }
    let (ab, bb) = (&ash[..ash.len() - 2], &bsh[..bsh.len() - 2]);
    let rank = ab.len().max(bb.len());
    let pad = |s: &[usize]| -> Vec<usize> {
        let mut v = vec![1; rank - s.len()];
        v.extend_from_slice(s);
        v
    };
    let (ap, bp) = (pad(ab), pad(bb));
    let mut batch = vec![];
    for (&x, &y) in ap.iter().zip(&bp) {
        batch.push(match (x, y) {
            _ if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return None,
        });
    }
    // Offset (in matrices) of each operand's block for a flat batch index.
    let offsets = |s: &[usize]| -> Vec<usize> {
        let total: usize = batch.iter().product();
        let mut st = vec![0usize; rank];
        let mut acc = 1;
        for ax in (0..rank).rev() {
            st[ax] = if s[ax] == 1 { 0 } else { acc };
            acc *= s[ax];
        }
        (0..total)
            .map(|mut f| {
                let mut o = 0;
                for ax in (0..rank).rev() {
                    o += (f % batch[ax]) * st[ax];
                    f /= batch[ax];
                }
                o
            })
            .collect()
    };
    let (ia, ib) = (offsets(&ap), offsets(&bp));
    let total = ia.len();
    // Every batch entry's GEMM writes its whole block.
    let mut y = out.f32s(0, total * m * n);
    if n == 1 {
        // A matrix-vector product per batch entry (a lifted recurrence's `h_t · c_t`): rows
        // of dot products, no packing.
        let out = SharedMut::new(y.as_mut_ptr());
        pool.parallel_ranges(total, |r| {
            for t in r {
                // SAFETY: batch entry `t` writes only its own `m` outputs of `y`.
                let c = unsafe { std::slice::from_raw_parts_mut(out.get().add(t * m), m) };
                let bv = &bd[ib[t] * k..][..k];
                for (i, ci) in c.iter_mut().enumerate() {
                    *ci = dot(&ad[(ia[t] * m + i) * k..][..k], bv);
                }
            }
        });
        let mut shape = batch;
        shape.extend([m, n]);
        return Some(Ok(Tensor::from_buf(shape, y)));
    }
    let out = SharedMut::new(y.as_mut_ptr());
    let single = Pool::single();
    let failed = std::sync::Mutex::new(None);
    pool.parallel_for(total, |t| {
        // SAFETY: batch entry `t` writes only its own `m·n` block of `y`, which lives until
        // `parallel_for` returns.
        let c = unsafe { std::slice::from_raw_parts_mut(out.get().add(t * m * n), m * n) };
        let r = (|| {
            let av = MatRef::row_major(&ad[ia[t] * m * k..][..m * k], m, k)?;
            let bv = MatRef::row_major(&bd[ib[t] * k * n..][..k * n], k, n)?;
            let cv = MatMut::row_major(c, m, n)?;
            gemm_in(
                &single,
                av,
                Rhs::Plain(bv),
                cv,
                &Epilogue::default(),
                &gemm_cfg(1),
            )
        })();
        if let Err(e) = r {
            *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
        }
    });
    if let Some(e) = failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Some(Err(e));
    }
    let mut shape = batch;
    shape.extend([m, n]);
    Some(Ok(Tensor::from_buf(shape, y)))
}

/// Lanes of [`dot`]'s partial sums (a vector register of f32s).
const DOT_LANES: usize = 8;

/// `Σ a_i b_i` in f32, in [`DOT_LANES`] interleaved partial sums (so it vectorises) added
/// pairwise at the end.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; DOT_LANES];
    let (ac, bc) = (a.chunks_exact(DOT_LANES), b.chunks_exact(DOT_LANES));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for l in 0..DOT_LANES {
            acc[l] += x[l] * y[l];
        }
    }
    for (l, (x, y)) in ar.iter().zip(br).enumerate() {
        acc[l] += x * y;
    }
    let mut w = DOT_LANES;
    while w > 1 {
        w /= 2;
        for l in 0..w {
            acc[l] += acc[l + w];
        }
    }
    acc[0]
}

fn linear(
    ins: &[Option<&Tensor>],
    act: Activation,
    packed: Option<&PackedB>,
    sparse_input: bool,
    pool: &Pool,
    y: &mut Outputs,
) -> Option<Result<Tensor, String>> {
    let arg = |i: usize| ins.get(i).copied().flatten();
    let (x, w) = (arg(0)?, arg(1)?);
    if x.rank() == 0 || w.rank() != 2 {
        return None;
    }
    let mut out = x.shape().to_vec();
    *out.last_mut()? = w.shape()[1];
    let scale = match arg(3) {
        Some(t) => Some(row_vector(t, &out)?),
        None => None,
    };
    // With no activation, `bias` and `residual` are both added once after the product, so
    // either slot may hold either kind: a per-column vector runs as the epilogue's bias, a
    // full tensor as its residual (the optimiser fuses a residual add into the bias slot and
    // leaves a folded LayerNorm's shift in the residual slot).
    let (bias, resid_arg) = match (arg(2), arg(4)) {
        (Some(t), None) | (None, Some(t)) if act == Activation::None => {
            match column_vector(t, &out) {
                Some(v) => (Some(v), None),
                None => (None, Some(t)),
            }
        }
        (b, r) => (
            match b {
                Some(t) => Some(column_vector(t, &out)?),
                None => None,
            },
            r,
        ),
    };
    let resid: Option<std::borrow::Cow<'_, [f32]>> = match resid_arg {
        Some(t) if t.shape() == out.as_slice() => Some(f32s(t)?.into()),
        Some(t) => Some(expand(t, &out)?.into()),
        None => None,
    };
    let (m, n): (usize, usize) = (out[..out.len() - 1].iter().product(), out[out.len() - 1]);
    let residual = match &resid {
        Some(r) => Some(MatRef::row_major(r, m, n).ok()?),
        None => None,
    };
    let ep = Epilogue {
        row_scale: scale.as_deref(),
        bias: bias.as_deref(),
        activation: act,
        residual,
    };
    flat_gemm(x, w, packed, sparse_input, &ep, out, pool, y)
}

#[allow(clippy::too_many_arguments)]
fn gemm_op(
    ins: &[Option<&Tensor>],
    alpha: f32,
    beta: f32,
    trans_a: bool,
    trans_b: bool,
    packed: Option<&PackedB>,
    pool: &Pool,
    out: &mut Outputs,
) -> Option<Result<Tensor, String>> {
    let arg = |i: usize| ins.get(i).copied().flatten();
    let (a, b) = (arg(0)?, arg(1)?);
    let [ar, ac] = <[usize; 2]>::try_from(a.shape()).ok()?;
    let [br, bc] = <[usize; 2]>::try_from(b.shape()).ok()?;
    let (m, k) = if trans_a { (ac, ar) } else { (ar, ac) };
    let (k2, n) = if trans_b { (bc, br) } else { (br, bc) };
    if k != k2 {
        return None;
    }
    let ad = f32s(a)?;
    let av = if trans_a {
        MatRef::new(ad, m, k, 1, ac).ok()?
    } else {
        MatRef::row_major(ad, m, k).ok()?
    };
    let bv = if trans_b {
        MatRef::new(f32s(b)?, k, n, 1, bc).ok()?
    } else {
        MatRef::row_major(f32s(b)?, k, n).ok()?
    };
    let rhs = match packed {
        Some(p) if p.rows() == k && p.cols() == n => Rhs::Packed(p),
        _ => Rhs::Plain(bv),
    };
    let scale = (alpha != 1.0).then(|| vec![alpha; m]);
    let (mut bias, mut resid) = (None, None);
    if let Some(c) = arg(2) {
        if let Some(v) = column_vector(c, &[m, n]) {
            bias = Some(v.into_iter().map(|x| beta * x).collect::<Vec<_>>());
        } else {
            resid = Some(
                expand(c, &[m, n])?
                    .into_iter()
                    .map(|x| beta * x)
                    .collect::<Vec<_>>(),
            );
        }
    }
    let residual = match &resid {
        Some(r) => Some(MatRef::row_major(r, m, n).ok()?),
        None => None,
    };
    let ep = Epilogue {
        row_scale: scale.as_deref(),
        bias: bias.as_deref(),
        activation: Activation::None,
        residual,
    };
    // Uninitialised where fresh: the GEMM writes every element.
    let fill = |y: &mut [std::mem::MaybeUninit<f32>]| {
        let c = MatMut::uninit(y, m, n)?;
        gemm_in(pool, av, rhs, c, &ep, &gemm_cfg(pool.threads()))
    };
    // SAFETY: `gemm_in` returns Ok only when it wrote all `m·n` values.
    let y = unsafe { out.write_f32(0, m * n, fill) };
    Some(
        y.map(|y| Tensor::from_buf(vec![m, n], y))
            .map_err(|e| e.to_string()),
    )
}

fn attention_op(
    ins: &[Option<&Tensor>],
    scale: Option<f32>,
    causal: bool,
    seq_major: bool,
    pool: &Pool,
    out: &mut Outputs,
) -> Option<Result<Tensor, String>> {
    let arg = |i: usize| ins.get(i).copied().flatten();
    let (q, k, v) = (arg(0)?, arg(1)?, arg(2)?);
    // `[B, H, S, D]` whatever the layout (sequence-major tensors hold `[B, S, H, D]`).
    let dims4 = |t: &Tensor| {
        let [a, b, c, d] = <[usize; 4]>::try_from(t.shape()).ok()?;
        Some(if seq_major {
            [a, c, b, d]
        } else {
            [a, b, c, d]
        })
    };
    let [b, hq, s, d] = dims4(q)?;
    let [bk, hkv, t, dk] = dims4(k)?;
    let [bv, hv, tv, dv] = dims4(v)?;
    if (bk, dk) != (b, d) || (bv, hv, tv) != (b, hkv, t) || hkv == 0 || hq % hkv != 0 {
        return None;
    }
    let scores = [b, hq, s, t];
    let mask_vals;
    let mask = match arg(3) {
        None => None,
        Some(m) => {
            let ms = m.shape();
            if ms.len() > 4 {
                return None;
            }
            let off = 4 - ms.len();
            let mut strides = [0usize; 4];
            let mut acc = 1;
            for (i, &dm) in ms.iter().enumerate().rev() {
                if dm != scores[off + i] && dm != 1 {
                    return None;
                }
                strides[off + i] = if dm == 1 { 0 } else { acc };
                acc *= dm;
            }
            mask_vals = match m.data() {
                TensorData::Bool(bs) => bs
                    .iter()
                    .map(|&keep| if keep { 0.0 } else { f32::NEG_INFINITY })
                    .collect(),
                _ => f32s(m)?.to_vec(),
            };
            Some(Mask {
                data: &mask_vals,
                strides,
            })
        }
    };
    let p = Attention {
        q: f32s(q)?,
        k: f32s(k)?,
        v: f32s(v)?,
        dims: [b, hq, hkv, s, t, d, dv],
        // The reference computes 1/√D in f64 and rounds the scaled score once; f32 here.
        scale: scale.unwrap_or_else(|| (1.0 / (d as f64).sqrt()) as f32),
        causal,
        mask,
        seq_major,
    };
    // Every output row is written (normalised at the end of its key loop).
    let mut y = out.f32s(0, b * hq * s * dv);
    let shape = if seq_major {
        vec![b, s, hq, dv]
    } else {
        vec![b, hq, s, dv]
    };
    Some(attention::attention(pool, &p, &mut y).map(|()| Tensor::from_buf(shape, y)))
}

fn conv_op(
    ins: &[Option<&Tensor>],
    stride: [usize; 2],
    packed: Option<&PackedB>,
    pool: &Pool,
    out: &mut Outputs,
) -> Option<Result<Tensor, String>> {
    let arg = |i: usize| ins.get(i).copied().flatten();
    let (x, w) = (arg(0)?, arg(1)?);
    let xs = <[usize; 4]>::try_from(x.shape()).ok()?;
    let [oc, c, kh, kw] = <[usize; 4]>::try_from(w.shape()).ok()?;
    if c != xs[1] || [kh, kw] != stride || xs[2] < kh || xs[3] < kw {
        return None;
    }
    let bias = match arg(2) {
        Some(b) if b.shape() == [oc] => Some(f32s(b)?),
        Some(_) => return None,
        None => None,
    };
    let p = PatchConv {
        x: xs,
        oc,
        k: [kh, kw],
    };
    let shape = p.out_shape();
    // The patch GEMM writes every element.
    let mut y = out.f32s(0, shape.iter().product());
    Some(
        patch_conv(pool, &p, f32s(x)?, f32s(w)?, packed, bias, &mut y)
            .map(|()| Tensor::from_buf(shape.to_vec(), y)),
    )
}

/// A conv (or `fused_conv`) of any geometry: `None` where the geometry or operands are
/// not the routine's (the interpreter then runs the node and reports any error).
fn general_conv(
    pc: &PreparedConv,
    ins: &[Option<&Tensor>],
    pool: &Pool,
    out: &mut Outputs,
) -> Option<Result<Tensor, String>> {
    let arg = |i: usize| ins.get(i).copied().flatten();
    let (x, w) = (arg(0)?, arg(1)?);
    let geo = pc.geometry(x.shape(), w.shape()).ok()?;
    let m = w.shape()[0];
    let bias = match arg(2) {
        Some(b) if b.shape() == [m] => Some(f32s(b)?),
        Some(_) => return None,
        None => None,
    };
    let shape = geo.out_shape().to_vec();
    // A residual of another (broadcast) shape is expanded first.
    let resid: Option<std::borrow::Cow<'_, [f32]>> = match arg(3) {
        Some(t) if t.shape() == shape.as_slice() => Some(f32s(t)?.into()),
        Some(t) => Some(expand(t, &shape)?.into()),
        None => None,
    };
    let args = ConvArgs {
        x: f32s(x)?,
        w: f32s(w)?,
        bias,
        residual: resid.as_deref(),
    };
    // The conv writes every element.
    let mut y = out.f32s(0, shape.iter().product());
    Some(
        pc.run(pool, &geo, &args, &mut y)
            .map(|()| Tensor::from_buf(shape, y)),
    )
}

/// A conv_transpose of any geometry: `None` where the geometry or operands are not the
/// routine's (the interpreter then runs the node and reports any error).
fn conv_transpose_op(
    pc: &PreparedConvTranspose,
    ins: &[Option<&Tensor>],
    pool: &Pool,
    out: &mut Outputs,
) -> Option<Result<Tensor, String>> {
    let arg = |i: usize| ins.get(i).copied().flatten();
    let (x, w) = (arg(0)?, arg(1)?);
    let geo = pc.geometry(x.shape(), w.shape()).ok()?;
    let shape = geo.out_shape().to_vec();
    let bias = match arg(2) {
        Some(b) if b.shape() == [shape[1]] => Some(f32s(b)?),
        Some(_) => return None,
        None => None,
    };
    // The routine writes every element.
    let mut y = out.f32s(0, shape.iter().product());
    Some(
        pc.run(pool, &geo, f32s(x)?, f32s(w)?, bias, &mut y)
            .map(|()| Tensor::from_buf(shape, y)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn expand_broadcasts_like_numpy() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for _ in 0..300 {
            let rank = rng.gen_range(1..5);
            let shape: Vec<usize> = (0..rank).map(|_| rng.gen_range(1..5)).collect();
            // An operand of lower or equal rank, each of its dims either the target's or 1.
            let lower = rng.gen_range(0..=rank);
            let ts: Vec<usize> = shape[rank - lower..]
                .iter()
                .map(|&d| if rng.gen_bool(0.4) { 1 } else { d })
                .collect();
            let n: usize = ts.iter().product();
            let t = Tensor::from_vec(ts.clone(), (0..n).map(|i| i as f32).collect::<Vec<_>>());
            let got = expand(&t, &shape).unwrap();
            // Reference: each output index mapped back through the broadcast.
            let total: usize = shape.iter().product();
            let want: Vec<f32> = (0..total)
                .map(|mut flat| {
                    let mut src = 0;
                    let mut mul = 1;
                    for ax in (0..rank).rev() {
                        let i = flat % shape[ax];
                        flat /= shape[ax];
                        if ax >= rank - lower {
                            let d = ts[ax - (rank - lower)];
                            src += if d == 1 { 0 } else { i * mul };
                            mul *= d;
                        }
                    }
                    src as f32
                })
                .collect();
            assert_eq!(got, want, "{ts:?} -> {shape:?}");
        }
        let t = Tensor::from_vec(vec![3], vec![1.0f32, 2.0, 3.0]);
        assert!(expand(&t, &[2, 4]).is_none());
    }

    /// Relative tolerance of a batched f32 matmul against the interpreter (f32 sums of at
    /// most a few hundred products).
    const BATCHED_RTOL: f32 = 1e-5;

    #[test]
    fn batched_matrix_vector_products_match_the_interpreter() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let pool = Pool::new(2).unwrap();
        for (ash, bsh) in [
            (vec![64, 1, 37, 16], vec![64, 1, 16, 1]),
            (vec![3, 5, 7], vec![1, 7, 1]),
            (vec![2, 1, 4, 19], vec![3, 19, 1]),
            (vec![5, 1, 3], vec![5, 3, 1]),
        ] {
            let rand_t = |rng: &mut rand::rngs::StdRng, s: &[usize]| {
                let n: usize = s.iter().product();
                Tensor::from_vec(
                    s.to_vec(),
                    (0..n)
                        .map(|_| rng.gen_range(-1.0f32..1.0))
                        .collect::<Vec<_>>(),
                )
            };
            let (a, b) = (rand_t(&mut rng, &ash), rand_t(&mut rng, &bsh));
            let got = batched_matmul(&a, &b, &pool, &mut Outputs::none())
                .unwrap()
                .unwrap();
            let want = kiln_ir::ops::eval(
                kiln_ir::OpKind::MatMul,
                &kiln_ir::Attrs::new(),
                &[Some(&a), Some(&b)],
            )
            .unwrap();
            assert_eq!(got.shape(), want[0].shape(), "{ash:?} x {bsh:?}");
            for (x, y) in got
                .as_slice::<f32>()
                .unwrap()
                .iter()
                .zip(want[0].as_slice::<f32>().unwrap())
            {
                assert!(
                    (x - y).abs() <= BATCHED_RTOL * (1.0 + y.abs()),
                    "{x} vs {y}: {ash:?} x {bsh:?}"
                );
            }
        }
    }

    fn t8(rng: &mut rand::rngs::StdRng, shape: &[usize], signed: bool) -> Tensor {
        let n: usize = shape.iter().product();
        let pick = |rng: &mut rand::rngs::StdRng| match rng.gen_range(0..5) {
            0 => 0i64,
            1 => 255,
            2 => -128,
            3 => 127,
            _ => rng.gen_range(-128..=255),
        };
        let v: Vec<i64> = (0..n).map(|_| pick(rng)).collect();
        if signed {
            Tensor::from_vec(shape.to_vec(), v.iter().map(|&x| x as i8).collect())
        } else {
            Tensor::from_vec(shape.to_vec(), v.iter().map(|&x| x as u8).collect())
        }
    }

    #[test]
    fn matmul_integer_matches_the_interpreter_exactly() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let pool = Pool::new(2).unwrap();
        for &(lead, k, n) in &[
            (&[3usize][..], 5usize, 7usize),
            (&[2, 5][..], 64, 33),
            (&[1][..], 1, 1),
            (&[4, 3][..], 130, 16),
        ] {
            for (sa, sb) in [(false, true), (true, false), (false, false), (true, true)] {
                let mut ash = lead.to_vec();
                ash.push(k);
                let m: usize = lead.iter().product();
                let a = t8(&mut rng, &ash, sa);
                let b = t8(&mut rng, &[k, n], sb);
                let mut row = lead.to_vec();
                row.push(1);
                let za_shape = if rng.gen_bool(0.5) {
                    vec![]
                } else if lead.len() == 1 {
                    vec![m]
                } else {
                    row
                };
                let za = t8(&mut rng, &za_shape, sa);
                let zb_shape = if rng.gen_bool(0.5) { vec![] } else { vec![n] };
                let zb = t8(&mut rng, &zb_shape, sb);
                let ins = [Some(&a), Some(&b), Some(&za), Some(&zb)];
                let want = kiln_ir::ops::eval(OpKind::MatMulInteger, &Attrs::new(), &ins).unwrap();
                for constant in [false, true] {
                    let p = prepare_op(OpKind::MatMulInteger, &Attrs::new(), |i| {
                        (constant && i == 1).then_some(&b)
                    })
                    .unwrap();
                    let got = p
                        .run(&ins, &pool, &mut Outputs::none())
                        .expect("the integer GEMM covers it")
                        .unwrap();
                    assert_eq!(got, want, "{ash:?}x[{k}, {n}] signed {sa}/{sb}");
                }
                // The scaled form, per tensor or per column, with and without a bias: equal
                // to the interpreter's cast, mul and add bit for bit.
                let per_col = rng.gen_bool(0.5);
                let scale = if per_col {
                    Tensor::from_vec(vec![n], (0..n).map(|j| 0.01 + j as f32 * 1e-3).collect())
                } else {
                    Tensor::scalar(0.0371f32)
                };
                let bias =
                    Tensor::from_vec(vec![n], (0..n).map(|j| j as f32 * 0.3 - 1.0).collect());
                for with_bias in [false, true] {
                    let mut sins = ins.to_vec();
                    sins.push(Some(&scale));
                    if with_bias {
                        sins.push(Some(&bias));
                    }
                    let op = OpKind::MatMulIntegerScaled;
                    let want = kiln_ir::ops::eval(op, &Attrs::new(), &sins).unwrap();
                    let p = prepare_op(op, &Attrs::new(), |i| (i == 1).then_some(&b)).unwrap();
                    let got = p
                        .run(&sins, &pool, &mut Outputs::none())
                        .expect("the scaled integer GEMM covers it")
                        .unwrap();
                    assert_eq!(got, want, "scaled {ash:?}x[{k}, {n}] {per_col} {with_bias}");
                }
            }
        }
        // A zero point of another form is left to the interpreter.
        let a = t8(&mut rng, &[2, 3], false);
        let b = t8(&mut rng, &[3, 2], true);
        let odd = t8(&mut rng, &[1, 2], false);
        let p = prepare_op(OpKind::MatMulInteger, &Attrs::new(), |_| None).unwrap();
        let ins = [Some(&a), Some(&b), Some(&odd)];
        assert!(p.run(&ins, &pool, &mut Outputs::none()).is_none());
    }

    #[test]
    fn qlinear_matmul_matches_the_interpreter_exactly() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let pool = Pool::new(2).unwrap();
        let mut checked = 0;
        for &(lead, k, n) in &[
            (&[3usize][..], 5usize, 7usize),
            (&[2, 5][..], 64, 33),
            (&[1][..], 1, 1),
            (&[4, 3][..], 130, 16),
            (&[][..], 9, 4),
        ] {
            for (sa, sb, sy) in [
                (false, true, false),
                (true, false, true),
                (false, false, false),
                (true, true, true),
            ] {
                let mut ash = lead.to_vec();
                ash.push(k);
                let a = t8(&mut rng, &ash, sa);
                let b = t8(&mut rng, &[k, n], sb);
                let za = t8(&mut rng, &[], sa);
                let col = rng.gen_bool(0.5);
                let zb_shape = if col { vec![n] } else { vec![] };
                let zb = t8(&mut rng, &zb_shape, sb);
                let a_scale = Tensor::scalar(rng.gen_range(0.001f32..0.05));
                let b_scale = if col {
                    Tensor::from_vec(
                        vec![n],
                        (0..n).map(|_| rng.gen_range(0.001f32..0.05)).collect(),
                    )
                } else {
                    Tensor::scalar(rng.gen_range(0.001f32..0.05))
                };
                // Small output scales saturate many values, large ones round many to zero.
                let y_scale = Tensor::scalar([0.0005f32, 0.01, 0.2][rng.gen_range(0..3)]);
                let zy = t8(&mut rng, &[], sy);
                let ins = [
                    Some(&a),
                    Some(&a_scale),
                    Some(&za),
                    Some(&b),
                    Some(&b_scale),
                    Some(&zb),
                    Some(&y_scale),
                    Some(&zy),
                ];
                let want = kiln_ir::ops::eval(OpKind::QLinearMatMul, &Attrs::new(), &ins).unwrap();
                for constant in [false, true] {
                    let p = prepare_op(OpKind::QLinearMatMul, &Attrs::new(), |i| {
                        (constant && i == 3).then_some(&b)
                    })
                    .unwrap();
                    let got = p
                        .run(&ins, &pool, &mut Outputs::none())
                        .expect("the integer GEMM covers it")
                        .unwrap();
                    assert_eq!(
                        got, want,
                        "{ash:?}x[{k}, {n}] signed {sa}/{sb}/{sy} per column {col}"
                    );
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 40);
        // A per-row scale of A is left to the interpreter.
        let a = t8(&mut rng, &[2, 3], false);
        let b = t8(&mut rng, &[3, 2], true);
        let rows = Tensor::from_vec(vec![2], vec![0.01f32, 0.02]);
        let (one, za, zb) = (
            Tensor::scalar(0.01f32),
            t8(&mut rng, &[], false),
            t8(&mut rng, &[], true),
        );
        let ins = [
            Some(&a),
            Some(&rows),
            Some(&za),
            Some(&b),
            Some(&one),
            Some(&zb),
            Some(&one),
        ];
        let p = prepare_op(OpKind::QLinearMatMul, &Attrs::new(), |_| None).unwrap();
        assert!(p.run(&ins, &pool, &mut Outputs::none()).is_none());
    }
}
