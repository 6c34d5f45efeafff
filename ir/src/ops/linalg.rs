//! The linalg op family: contractions (matmul, gemm, einsum) and convolutions (conv,
//! conv_transpose). Shape rules and reference semantics side by side. All dense products
//! run through `shared::matmul_acc` (conv via im2col, conv_transpose via col2im).

use super::shared::{bcast_offsets, checked_numel, fact, for_each_index, matmul_acc, Window};
use super::{arg, not_in_family, opt_arg, Fact};
use crate::shape::broadcast;
use crate::tensor::strides;
use crate::{Attrs, DType, Dim, OpKind, Shape, Tensor, TensorData};
use std::num::Wrapping;
use std::ops::{Add, Mul};

/// Shape rule of the linalg ops.
pub fn infer(op: OpKind, attrs: &Attrs, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>, String> {
    let a = arg(inputs, 0)?;
    let dtype = a.ty.dtype;
    let shape = match op {
        OpKind::MatMul => matmul_shape(&a.ty.shape, &arg(inputs, 1)?.ty.shape)?,
        OpKind::Gemm => {
            let b = arg(inputs, 1)?;
            let (Some(ad), Some(bd)) = (a.ty.shape.dims(), b.ty.shape.dims()) else {
                return Ok(vec![fact(dtype, Shape::unknown_of_rank(2))]);
            };
            if ad.len() != 2 || bd.len() != 2 {
                return Err("gemm operands must be 2-D".into());
            }
            let ta = attrs.int_or("transA", 0)? != 0;
            let tb = attrs.int_or("transB", 0)? != 0;
            let (m, ka) = if ta {
                (&ad[1], &ad[0])
            } else {
                (&ad[0], &ad[1])
            };
            let (kb, n) = if tb {
                (&bd[1], &bd[0])
            } else {
                (&bd[0], &bd[1])
            };
            check_same(ka, kb)?;
            Shape::new(vec![m.clone(), n.clone()])
        }
        OpKind::Einsum => {
            let eq = attrs
                .string("equation")?
                .ok_or("missing attribute `equation`")?;
            let shapes: Vec<Option<&[Dim]>> = inputs
                .iter()
                .map(|f| f.and_then(|f| f.ty.shape.dims()))
                .collect();
            let ranks: Option<Vec<usize>> = shapes.iter().map(|s| s.map(|d| d.len())).collect();
            match ranks {
                None => Shape::unknown(),
                Some(ranks) => {
                    let e = Einsum::parse(&eq, &ranks)?;
                    let mut out = Vec::new();
                    for &l in &e.output {
                        let mut d = Dim::Fixed(1);
                        for (t, labels) in e.inputs.iter().enumerate() {
                            for (ax, &ll) in labels.iter().enumerate() {
                                if ll == l {
                                    let s =
                                        shapes[t].map(|s| s[ax].clone()).unwrap_or(Dim::Unknown);
                                    if d == Dim::Fixed(1) {
                                        d = s;
                                    }
                                }
                            }
                        }
                        out.push(d);
                    }
                    Shape::new(out)
                }
            }
        }
        OpKind::Conv | OpKind::ConvTranspose => conv_shape(op, attrs, a, arg(inputs, 1)?)?,
        _ => return Err(not_in_family(op)),
    };
    Ok(vec![fact(dtype, shape)])
}

fn check_same(a: &Dim, b: &Dim) -> Result<(), String> {
    match (a, b) {
        (Dim::Fixed(x), Dim::Fixed(y)) if x != y => {
            Err(format!("contraction sizes differ: {x} and {y}"))
        }
        _ => Ok(()),
    }
}

/// numpy matmul shapes: 1-D operands gain then lose a unit dim; batch dims broadcast.
fn matmul_shape(a: &Shape, b: &Shape) -> Result<Shape, String> {
    let (Some(ad), Some(bd)) = (a.dims(), b.dims()) else {
        return Ok(Shape::unknown());
    };
    if ad.is_empty() || bd.is_empty() {
        return Err("matmul operands must have rank >= 1".into());
    }
    let mut ad = ad.to_vec();
    let mut bd = bd.to_vec();
    let (a1, b1) = (ad.len() == 1, bd.len() == 1);
    if a1 {
        ad.insert(0, Dim::Fixed(1));
    }
    if b1 {
        bd.push(Dim::Fixed(1));
    }
    let (m, k) = (ad[ad.len() - 2].clone(), ad[ad.len() - 1].clone());
    let (k2, n) = (bd[bd.len() - 2].clone(), bd[bd.len() - 1].clone());
    check_same(&k, &k2)?;
    let batch = broadcast(
        &Shape::new(ad[..ad.len() - 2].to_vec()),
        &Shape::new(bd[..bd.len() - 2].to_vec()),
    )?;
    let mut out = batch.0.unwrap_or_default();
    if !a1 {
        out.push(m);
    }
    if !b1 {
        out.push(n);
    }
    Ok(Shape::new(out))
}

fn conv_shape(op: OpKind, attrs: &Attrs, x: &Fact, w: &Fact) -> Result<Shape, String> {
    let (Some(xd), Some(wd)) = (x.ty.shape.dims(), w.ty.shape.dims()) else {
        let r = x.ty.shape.rank().or(w.ty.shape.rank());
        return Ok(r.map(Shape::unknown_of_rank).unwrap_or_else(Shape::unknown));
    };
    if xd.len() < 3 || wd.len() != xd.len() {
        return Err(format!(
            "conv input rank {} and weight rank {} do not fit",
            xd.len(),
            wd.len()
        ));
    }
    let n = xd.len() - 2;
    let group = attrs.int_or("group", 1)?.max(1) as u64;
    let kernel: Option<Vec<usize>> = wd[2..]
        .iter()
        .map(|d| d.fixed().map(|v| v as usize))
        .collect();
    let channels = if op == OpKind::Conv {
        wd[0].clone()
    } else {
        match wd[1].fixed() {
            Some(v) => Dim::Fixed(v * group),
            None => Dim::Unknown,
        }
    };
    let mut out = vec![xd[0].clone(), channels];
    let win = match kernel {
        Some(k) => Window::from_attrs(attrs, n, Some(k)).ok(),
        None if attrs.ints("kernel_shape")?.is_some() => Window::from_attrs(attrs, n, None).ok(),
        None => None,
    };
    for i in 0..n {
        let d = match (&win, xd[2 + i].fixed()) {
            (Some(win), Some(inp)) if op == OpKind::Conv => {
                let mut win = Window {
                    pads: win.pads.clone(),
                    auto_pad: win.auto_pad.clone(),
                    kernel: win.kernel.clone(),
                    strides: win.strides.clone(),
                    dilations: win.dilations.clone(),
                };
                Dim::Fixed(win.resolve_axis(i, inp as usize, false)? as u64)
            }
            (Some(win), Some(inp)) => match transpose_axis(attrs, win, i, n, inp as usize) {
                Ok((o, _)) => Dim::Fixed(o as u64),
                Err(_) => Dim::Unknown,
            },
            _ => Dim::Unknown,
        };
        out.push(d);
    }
    Ok(Shape::new(out))
}

/// Reference semantics of the linalg ops.
pub fn eval(op: OpKind, attrs: &Attrs, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
    let a = arg(inputs, 0)?;
    let out = match op {
        OpKind::MatMul => matmul(a, arg(inputs, 1)?)?,
        OpKind::Gemm => gemm(attrs, a, arg(inputs, 1)?, opt_arg(inputs, 2))?,
        OpKind::Einsum => {
            let eq = attrs
                .string("equation")?
                .ok_or("missing attribute `equation`")?;
            let ts: Vec<&Tensor> = inputs
                .iter()
                .map(|t| t.ok_or("missing operand"))
                .collect::<Result<_, _>>()?;
            einsum(&eq, &ts)?
        }
        OpKind::Conv => conv(attrs, a, arg(inputs, 1)?, opt_arg(inputs, 2))?,
        OpKind::ConvTranspose => conv_transpose(attrs, a, arg(inputs, 1)?, opt_arg(inputs, 2))?,
        _ => return Err(not_in_family(op)),
    };
    Ok(vec![out])
}

/// The buffers the dense kernels compute on: f32 natively, f64 for the other floats'
/// wide case, wrapping i64 for integers. f16/bf16 compute in f32 and round back.
enum Buf {
    F32(Vec<f32>),
    F64(Vec<f64>),
    I64(Vec<Wrapping<i64>>),
}

impl Buf {
    fn of(t: &Tensor) -> Result<Buf, String> {
        Ok(match t.data() {
            TensorData::F32(v) => Buf::F32(v.to_vec()),
            TensorData::F64(v) => Buf::F64(v.to_vec()),
            TensorData::F16(_) | TensorData::BF16(_) => {
                Buf::F32(t.to_f64s().into_iter().map(|x| x as f32).collect())
            }
            TensorData::Bool(_) => return Err("linear algebra on bool tensors".into()),
            _ => Buf::I64(t.to_i64s().into_iter().map(Wrapping).collect()),
        })
    }
    fn into_tensor(self, dtype: DType, shape: Vec<usize>) -> Result<Tensor, String> {
        let data = match self {
            Buf::F32(v) if dtype == DType::F32 => TensorData::F32(v.into()),
            Buf::F32(v) => TensorData::from_f64s(dtype, v.into_iter().map(|x| x as f64)),
            Buf::F64(v) => TensorData::from_f64s(dtype, v.into_iter()),
            Buf::I64(v) => TensorData::from_i64s(dtype, v.into_iter().map(|x| x.0)),
        };
        Tensor::new(shape, data)
    }
}

/// Runs `$body` with `$a`/`$b` bound to same-typed slices of two [`Buf`]s and `$T` their
/// element type.
macro_rules! with_bufs {
    ($x:expr, $y:expr, |$a:ident, $b:ident| $body:expr) => {
        match ($x, $y) {
            (Buf::F32($a), Buf::F32($b)) => Buf::F32($body),
            (Buf::F64($a), Buf::F64($b)) => Buf::F64($body),
            (Buf::I64($a), Buf::I64($b)) => Buf::I64($body),
            _ => return Err("operands have different dtypes".into()),
        }
    };
}

fn same_dtype(a: &Tensor, b: &Tensor) -> Result<(), String> {
    if a.dtype() != b.dtype() {
        return Err(format!(
            "operands have different dtypes {} and {}",
            a.dtype(),
            b.dtype()
        ));
    }
    Ok(())
}

/// Batched matmul: `a` is (batch_a, m, k), `b` is (batch_b, k, n); `ia`, `ib` give each
/// output batch's operand matrix index.
fn batched<T>(a: &[T], b: &[T], ia: &[usize], ib: &[usize], m: usize, k: usize, n: usize) -> Vec<T>
where
    T: Copy + Default + Mul<Output = T> + Add<Output = T>,
{
    let mut c = vec![T::default(); ia.len() * m * n];
    if m * n == 0 {
        return c;
    }
    for (bi, c_mat) in c.chunks_exact_mut(m * n).enumerate() {
        let (oa, ob) = (ia[bi] * m * k, ib[bi] * k * n);
        matmul_acc(&a[oa..oa + m * k], &b[ob..ob + k * n], c_mat, m, k, n);
    }
    c
}

fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor, String> {
    same_dtype(a, b)?;
    if a.rank() == 0 || b.rank() == 0 {
        return Err("matmul operands must have rank >= 1".into());
    }
    let mut ash = a.shape().to_vec();
    let mut bsh = b.shape().to_vec();
    let (a1, b1) = (ash.len() == 1, bsh.len() == 1);
    if a1 {
        ash.insert(0, 1);
    }
    if b1 {
        bsh.push(1);
    }
    let (m, k) = (ash[ash.len() - 2], ash[ash.len() - 1]);
    let (k2, n) = (bsh[bsh.len() - 2], bsh[bsh.len() - 1]);
    if k != k2 {
        return Err(format!("matmul contraction sizes differ: {k} and {k2}"));
    }
    let (ab, bb) = (&ash[..ash.len() - 2], &bsh[..bsh.len() - 2]);
    let batch = crate::shape::broadcast_concrete(ab, bb)
        .ok_or_else(|| format!("cannot broadcast batch dims {ab:?} and {bb:?}"))?;
    let (ia, ib) = (bcast_offsets(&batch, ab), bcast_offsets(&batch, bb));
    let mut out = batch.clone();
    if !a1 {
        out.push(m);
    }
    if !b1 {
        out.push(n);
    }
    checked_numel(&out)?;
    let buf = with_bufs!(Buf::of(a)?, Buf::of(b)?, |x, y| batched(
        &x, &y, &ia, &ib, m, k, n
    ));
    buf.into_tensor(a.dtype(), out)
}

/// Copies a row-major `r×c` matrix into its transpose.
fn transpose2<T: Copy>(v: &[T], r: usize, c: usize) -> Vec<T> {
    let mut o = Vec::with_capacity(v.len());
    for j in 0..c {
        for i in 0..r {
            o.push(v[i * c + j]);
        }
    }
    o
}

fn gemm(attrs: &Attrs, a: &Tensor, b: &Tensor, c: Option<&Tensor>) -> Result<Tensor, String> {
    same_dtype(a, b)?;
    if a.rank() != 2 || b.rank() != 2 {
        return Err("gemm operands must be 2-D".into());
    }
    let alpha = attrs.float_or("alpha", 1.0)? as f64;
    let beta = attrs.float_or("beta", 1.0)? as f64;
    let ta = attrs.int_or("transA", 0)? != 0;
    let tb = attrs.int_or("transB", 0)? != 0;
    let (ar, ac) = (a.shape()[0], a.shape()[1]);
    let (br, bc) = (b.shape()[0], b.shape()[1]);
    let (m, k) = if ta { (ac, ar) } else { (ar, ac) };
    let (k2, n) = if tb { (bc, br) } else { (br, bc) };
    if k != k2 {
        return Err(format!("gemm contraction sizes differ: {k} and {k2}"));
    }
    fn prep<T: Copy>(v: Vec<T>, t: bool, r: usize, c: usize) -> Vec<T> {
        if t {
            transpose2(&v, r, c)
        } else {
            v
        }
    }
    let prod = with_bufs!(Buf::of(a)?, Buf::of(b)?, |x, y| {
        let (x, y) = (prep(x, ta, ar, ac), prep(y, tb, br, bc));
        batched(&x, &y, &[0], &[0], m, k, n)
    });
    // Scale and add C in f64: alpha and beta are f32 attributes anyway.
    let mut y: Vec<f64> = match prod {
        Buf::F32(v) => v.into_iter().map(|x| x as f64).collect(),
        Buf::F64(v) => v,
        Buf::I64(v) => v.into_iter().map(|x| x.0 as f64).collect(),
    };
    for v in &mut y {
        *v *= alpha;
    }
    if let Some(c) = c {
        let cs = c.shape();
        if crate::shape::broadcast_concrete(cs, &[m, n]).as_deref() != Some(&[m, n][..]) {
            return Err(format!(
                "gemm C of shape {cs:?} does not broadcast to [{m}, {n}]"
            ));
        }
        let cv = c.to_f64s();
        for (v, o) in y.iter_mut().zip(bcast_offsets(&[m, n], cs)) {
            *v += beta * cv[o];
        }
    }
    let t = Tensor::new(vec![m, n], TensorData::from_f64s(a.dtype(), y.into_iter()))?;
    Ok(t)
}

/// A parsed einsum equation: per input, the label of each axis; and the output labels.
/// Ellipsis dims get labels 0..e (shared, right-aligned across inputs); letters get
/// their byte value, which is above any ellipsis label.
struct Einsum {
    inputs: Vec<Vec<u32>>,
    output: Vec<u32>,
}

impl Einsum {
    fn parse(eq: &str, ranks: &[usize]) -> Result<Einsum, String> {
        let eq: String = eq.chars().filter(|c| !c.is_whitespace()).collect();
        let (lhs, rhs) = match eq.split_once("->") {
            Some((l, r)) => (l, Some(r)),
            None => (eq.as_str(), None),
        };
        let terms: Vec<&str> = lhs.split(',').collect();
        if terms.len() != ranks.len() {
            return Err(format!(
                "einsum equation has {} operands but {} were given",
                terms.len(),
                ranks.len()
            ));
        }
        let letters = |s: &str| -> Result<(Vec<u32>, bool), String> {
            let has = s.contains("...");
            let s2 = s.replacen("...", "", 1);
            if s2.contains('.') {
                return Err(format!("bad ellipsis in einsum term `{s}`"));
            }
            let mut v = Vec::new();
            for ch in s2.chars() {
                if !ch.is_ascii_alphabetic() {
                    return Err(format!("bad einsum label `{ch}`"));
                }
                v.push(ch as u32 + 1000);
            }
            Ok((v, has))
        };
        let mut ell = 0usize;
        let mut parsed = Vec::new();
        for (t, &r) in terms.iter().zip(ranks) {
            let (v, has) = letters(t)?;
            if v.len() > r || (!has && v.len() != r) {
                return Err(format!("einsum term `{t}` does not fit rank {r}"));
            }
            let e = r - v.len();
            ell = ell.max(e);
            parsed.push((t.to_string(), v, has, e));
        }
        let mut inputs = Vec::new();
        for (t, v, has, e) in &parsed {
            if !has {
                inputs.push(v.clone());
                continue;
            }
            let pos = t.find("...").unwrap_or(0);
            let before = t[..pos].chars().filter(|c| c.is_ascii_alphabetic()).count();
            let mut labels = v[..before].to_vec();
            labels.extend((ell - e..ell).map(|i| i as u32));
            labels.extend_from_slice(&v[before..]);
            inputs.push(labels);
        }
        let output = match rhs {
            Some(r) => {
                let (v, has) = letters(r)?;
                if has {
                    let pos = r.find("...").unwrap_or(0);
                    let before = r[..pos].chars().filter(|c| c.is_ascii_alphabetic()).count();
                    let mut o = v[..before].to_vec();
                    o.extend((0..ell).map(|i| i as u32));
                    o.extend_from_slice(&v[before..]);
                    o
                } else {
                    v
                }
            }
            None => {
                let mut o: Vec<u32> = (0..ell as u32).collect();
                let mut counts = std::collections::BTreeMap::new();
                for v in &parsed {
                    for &l in &v.1 {
                        *counts.entry(l).or_insert(0) += 1;
                    }
                }
                o.extend(counts.into_iter().filter(|&(_, c)| c == 1).map(|(l, _)| l));
                o
            }
        };
        for l in &output {
            if !inputs.iter().any(|i| i.contains(l)) {
                return Err("einsum output label does not appear in any input".into());
            }
        }
        Ok(Einsum { inputs, output })
    }
}

/// Einsum by a generic index loop over every label, in f64 (integers exact to 2^53).
fn einsum(eq: &str, ts: &[&Tensor]) -> Result<Tensor, String> {
    let dtype = ts.first().ok_or("einsum needs an operand")?.dtype();
    let ranks: Vec<usize> = ts.iter().map(|t| t.rank()).collect();
    let e = Einsum::parse(eq, &ranks)?;
    // All labels: output ones first, then the summed ones.
    let mut labels = e.output.clone();
    for i in &e.inputs {
        for l in i {
            if !labels.contains(l) {
                labels.push(*l);
            }
        }
    }
    let mut size = vec![1usize; labels.len()];
    for (t, ls) in ts.iter().zip(&e.inputs) {
        for (ax, l) in ls.iter().enumerate() {
            let li = labels.iter().position(|x| x == l).unwrap_or(0);
            let d = t.shape()[ax];
            if d != 1 {
                if size[li] != 1 && size[li] != d {
                    return Err(format!("einsum label sizes conflict: {} and {d}", size[li]));
                }
                size[li] = d;
            }
        }
    }
    // Per operand, the stride of each label (summed over repeated labels: diagonals).
    let mut st = Vec::new();
    for (t, ls) in ts.iter().zip(&e.inputs) {
        let s = strides(t.shape());
        let mut v = vec![0usize; labels.len()];
        for (ax, l) in ls.iter().enumerate() {
            if t.shape()[ax] != 1 {
                let li = labels.iter().position(|x| x == l).unwrap_or(0);
                v[li] += s[ax];
            }
        }
        st.push(v);
    }
    let out_shape: Vec<usize> = size[..e.output.len()].to_vec();
    let ost = strides(&out_shape);
    let vals: Vec<Vec<f64>> = ts.iter().map(|t| t.to_f64s()).collect();
    let mut out = vec![0.0f64; checked_numel(&out_shape)?];
    checked_numel(&size)?;
    for_each_index(&size, |idx| {
        let mut p = 1.0;
        for (v, s) in vals.iter().zip(&st) {
            let off: usize = idx.iter().zip(s).map(|(i, s)| i * s).sum();
            p *= v[off];
        }
        let o: usize = idx.iter().zip(&ost).map(|(i, s)| i * s).sum();
        out[o] += p;
    });
    Tensor::new(out_shape, TensorData::from_f64s(dtype, out.into_iter()))
}

/// Weights, checks and geometry shared by conv and conv_transpose.
struct ConvGeom {
    n: usize,
    c: usize,
    group: usize,
    spatial: Vec<usize>,
    win: Window,
}

fn conv_geom(attrs: &Attrs, x: &Tensor, w: &Tensor) -> Result<ConvGeom, String> {
    same_dtype(x, w)?;
    if x.rank() < 3 || w.rank() != x.rank() {
        return Err(format!(
            "conv input rank {} and weight rank {} do not fit",
            x.rank(),
            w.rank()
        ));
    }
    let group = attrs.int_or("group", 1)?;
    let group = usize::try_from(group)
        .ok()
        .filter(|&g| g > 0)
        .ok_or_else(|| format!("bad group {group}"))?;
    let nsp = x.rank() - 2;
    let win = Window::from_attrs(attrs, nsp, Some(w.shape()[2..].to_vec()))?;
    if win.kernel != w.shape()[2..] {
        return Err(format!(
            "kernel_shape {:?} disagrees with weights {:?}",
            win.kernel,
            w.shape()
        ));
    }
    Ok(ConvGeom {
        n: x.shape()[0],
        c: x.shape()[1],
        group,
        spatial: x.shape()[2..].to_vec(),
        win,
    })
}

/// A conv's geometry as the interpreter resolves it (auto_pad applied), for native conv
/// routines that must read the attributes exactly as the reference does.
#[derive(Clone, Debug, PartialEq)]
pub struct ConvGeometry {
    /// Groups.
    pub group: usize,
    /// Kernel size per spatial axis.
    pub kernel: Vec<usize>,
    /// Stride per spatial axis.
    pub strides: Vec<usize>,
    /// Dilation per spatial axis.
    pub dilations: Vec<usize>,
    /// Leading pad per spatial axis.
    pub pads_begin: Vec<usize>,
    /// Output size per spatial axis.
    pub out: Vec<usize>,
}

/// The geometry of `conv(x, w)` from its attributes and operand shapes, with the checks
/// of the reference (channels against groups, kernel against weights).
pub fn conv_geometry(attrs: &Attrs, x: &[usize], w: &[usize]) -> Result<ConvGeometry, String> {
    if x.len() < 3 || w.len() != x.len() {
        return Err(format!("conv input {x:?} and weight {w:?} do not fit"));
    }
    let group = attrs.int_or("group", 1)?;
    let group = usize::try_from(group)
        .ok()
        .filter(|&g| g > 0)
        .ok_or_else(|| format!("bad group {group}"))?;
    let nsp = x.len() - 2;
    let mut win = Window::from_attrs(attrs, nsp, Some(w[2..].to_vec()))?;
    if win.kernel != w[2..] || x[1] != w[1] * group || !w[0].is_multiple_of(group) {
        return Err(format!(
            "conv input {x:?}, weight {w:?}, group {group} disagree"
        ));
    }
    let out = win.resolve(&x[2..], false)?;
    Ok(ConvGeometry {
        group,
        pads_begin: win.pads[..nsp].to_vec(),
        kernel: win.kernel,
        strides: win.strides,
        dilations: win.dilations,
        out,
    })
}

/// A conv_transpose's geometry as the interpreter resolves it (auto_pad, output_padding
/// and output_shape applied), for native routines that must read the attributes exactly
/// as the reference does.
#[derive(Clone, Debug, PartialEq)]
pub struct ConvTransposeGeometry {
    /// Groups.
    pub group: usize,
    /// Kernel size per spatial axis.
    pub kernel: Vec<usize>,
    /// Stride per spatial axis.
    pub strides: Vec<usize>,
    /// Dilation per spatial axis.
    pub dilations: Vec<usize>,
    /// Per spatial axis, the output position of input 0 at kernel offset 0 is `-begin`
    /// (`i·stride + k·dilation − begin`; negative where output_shape asks for more than the
    /// full size under SAME padding).
    pub begins: Vec<i64>,
    /// Output size per spatial axis.
    pub out: Vec<usize>,
}

/// The geometry of `conv_transpose(x, w)` from its attributes and operand shapes, with the
/// checks of the reference (weights `[C, M/group, k...]`, channels against groups).
pub fn conv_transpose_geometry(
    attrs: &Attrs,
    x: &[usize],
    w: &[usize],
) -> Result<ConvTransposeGeometry, String> {
    if x.len() < 3 || w.len() != x.len() {
        return Err(format!(
            "conv_transpose input {x:?} and weight {w:?} do not fit"
        ));
    }
    let group = attrs.int_or("group", 1)?;
    let group = usize::try_from(group)
        .ok()
        .filter(|&g| g > 0)
        .ok_or_else(|| format!("bad group {group}"))?;
    let nsp = x.len() - 2;
    let win = Window::from_attrs(attrs, nsp, Some(w[2..].to_vec()))?;
    if win.kernel != w[2..] || w[0] != x[1] || !x[1].is_multiple_of(group) {
        return Err(format!(
            "conv_transpose input {x:?}, weight {w:?}, group {group} disagree"
        ));
    }
    let (out, begins) = transpose_geometry(attrs, &win, &x[2..])?;
    checked_numel(&out)?;
    Ok(ConvTransposeGeometry {
        group,
        kernel: win.kernel,
        strides: win.strides,
        dilations: win.dilations,
        begins,
        out,
    })
}

fn conv(attrs: &Attrs, x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor, String> {
    let mut g = conv_geom(attrs, x, w)?;
    let m = w.shape()[0];
    let cg = w.shape()[1];
    if g.c != cg * g.group || !m.is_multiple_of(g.group) {
        return Err(format!(
            "conv channels: input {} vs weights {:?} with group {}",
            g.c,
            w.shape(),
            g.group
        ));
    }
    let out_sp = g.win.resolve(&g.spatial, false)?;
    let mg = m / g.group;
    let kernel = g.win.kernel.clone();
    let ksize: usize = kernel.iter().product();
    let p: usize = checked_numel(&out_sp)?;
    let in_sp: usize = g.spatial.iter().product();
    let mut out_shape = vec![g.n, m];
    out_shape.extend_from_slice(&out_sp);
    checked_numel(&out_shape)?;
    checked_numel(&[cg, ksize, p])?;
    // For each kernel offset, the input offset each output position reads (None = pad).
    let nsp = g.spatial.len();
    let in_st = strides(&g.spatial);
    let mut src: Vec<Vec<Option<usize>>> = Vec::with_capacity(ksize);
    for_each_index(&kernel, |k| {
        let mut v = Vec::with_capacity(p);
        for_each_index(&out_sp, |o| {
            let mut off = 0usize;
            let mut ok = true;
            for i in 0..nsp {
                let pos = (o[i] * g.win.strides[i] + k[i] * g.win.dilations[i]) as i64
                    - g.win.pads[i] as i64;
                if pos < 0 || pos >= g.spatial[i] as i64 {
                    ok = false;
                    break;
                }
                off += pos as usize * in_st[i];
            }
            v.push(if ok { Some(off) } else { None });
        });
        src.push(v);
    });
    if ksize == 0 {
        src.clear();
    }
    fn run<T>(
        xv: &[T],
        wv: &[T],
        g: &ConvGeom,
        src: &[Vec<Option<usize>>],
        (m, mg, cg, ksize, p, in_sp): (usize, usize, usize, usize, usize, usize),
    ) -> Vec<T>
    where
        T: Copy + Default + Mul<Output = T> + Add<Output = T>,
    {
        let mut out = vec![T::default(); g.n * m * p];
        let mut cols = vec![T::default(); cg * ksize * p];
        for n in 0..g.n {
            for gi in 0..g.group {
                for c in 0..cg {
                    let xc = &xv[(n * g.c + gi * cg + c) * in_sp..][..in_sp];
                    for (ki, s) in src.iter().enumerate() {
                        let row = &mut cols[(c * ksize + ki) * p..][..p];
                        for (r, o) in row.iter_mut().zip(s) {
                            *r = match o {
                                Some(o) => xc[*o],
                                None => T::default(),
                            };
                        }
                    }
                }
                let wg = &wv[gi * mg * cg * ksize..][..mg * cg * ksize];
                let og = &mut out[(n * m + gi * mg) * p..][..mg * p];
                matmul_acc(wg, &cols, og, mg, cg * ksize, p);
            }
        }
        out
    }
    let dims = (m, mg, cg, ksize, p, in_sp);
    let mut buf = with_bufs!(Buf::of(x)?, Buf::of(w)?, |xv, wv| run(
        &xv, &wv, &g, &src, dims
    ));
    if let Some(b) = bias {
        if b.len() != m {
            return Err(format!("conv bias has {} elements, expected {m}", b.len()));
        }
        add_channel_bias(&mut buf, b, m, p)?;
    }
    g.win.pads.clear();
    buf.into_tensor(x.dtype(), out_shape)
}

/// Adds `b[c]` to every element of channel `c` of an (N, C, P) buffer.
fn add_channel_bias(buf: &mut Buf, b: &Tensor, m: usize, p: usize) -> Result<(), String> {
    fn go<T: Copy + Add<Output = T>>(v: &mut [T], b: &[T], m: usize, p: usize) {
        if p == 0 {
            return;
        }
        for (i, chunk) in v.chunks_exact_mut(p).enumerate() {
            let bc = b[i % m];
            for x in chunk {
                *x = *x + bc;
            }
        }
    }
    match (buf, Buf::of(b)?) {
        (Buf::F32(v), Buf::F32(bv)) => go(v, &bv, m, p),
        (Buf::F64(v), Buf::F64(bv)) => go(v, &bv, m, p),
        (Buf::I64(v), Buf::I64(bv)) => go(v, &bv, m, p),
        _ => return Err("bias has another dtype".into()),
    }
    Ok(())
}

fn transpose_geometry(
    attrs: &Attrs,
    win: &Window,
    spatial: &[usize],
) -> Result<(Vec<usize>, Vec<i64>), String> {
    let n = spatial.len();
    let mut outs = Vec::new();
    let mut begins = Vec::new();
    for (i, &inp) in spatial.iter().enumerate() {
        let (o, b) = transpose_axis(attrs, win, i, n, inp)?;
        outs.push(o);
        begins.push(b);
    }
    Ok((outs, begins))
}

fn transpose_axis(
    attrs: &Attrs,
    win: &Window,
    i: usize,
    n: usize,
    inp: usize,
) -> Result<(usize, i64), String> {
    let op = attrs.ints("output_padding")?.unwrap_or_default();
    let outpad = *op.get(i).unwrap_or(&0);
    let oshape =
        attrs
            .ints("output_shape")?
            .map(|v| if v.len() == n + 2 { v[2..].to_vec() } else { v });
    let (s, span) = (win.strides[i] as i64, win.span(i) as i64);
    let full = s
        .saturating_mul(inp as i64 - 1)
        .saturating_add(outpad)
        .saturating_add(span);
    let same = matches!(win.auto_pad.as_str(), "SAME_UPPER" | "SAME_LOWER");
    let (out, begin) = if same && attrs.ints("pads")?.is_none() {
        let out = match &oshape {
            Some(v) => *v.get(i).ok_or("output_shape too short")?,
            None => (inp as i64).saturating_mul(s),
        };
        let total = full.saturating_sub(out);
        let begin = if win.auto_pad == "SAME_UPPER" {
            total.div_euclid(2)
        } else {
            total - total.div_euclid(2)
        };
        (out, begin)
    } else {
        let (b, e) = (win.pads[i] as i64, win.pads[n + i] as i64);
        let out = match &oshape {
            Some(v) => *v.get(i).ok_or("output_shape too short")?,
            None => full.saturating_sub(b).saturating_sub(e),
        };
        (out, b)
    };
    if out < 0 {
        return Err(format!("conv_transpose output size {out} is negative"));
    }
    Ok((out as usize, begin))
}

fn conv_transpose(
    attrs: &Attrs,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor, String> {
    let g = conv_geom(attrs, x, w)?;
    if w.shape()[0] != g.c || g.c % g.group != 0 {
        return Err(format!(
            "conv_transpose channels: input {} vs weights {:?}",
            g.c,
            w.shape()
        ));
    }
    let cg = g.c / g.group;
    let mg = w.shape()[1];
    let m = mg * g.group;
    let (out_sp, begins) = transpose_geometry(attrs, &g.win, &g.spatial)?;
    let kernel = g.win.kernel.clone();
    let ksize: usize = kernel.iter().product();
    let in_sp: usize = g.spatial.iter().product();
    let p: usize = checked_numel(&out_sp)?;
    let mut out_shape = vec![g.n, m];
    out_shape.extend_from_slice(&out_sp);
    checked_numel(&out_shape)?;
    checked_numel(&[mg, ksize, in_sp])?;
    // For each (kernel offset, input position), the output offset it lands on.
    let nsp = g.spatial.len();
    let out_st = strides(&out_sp);
    let mut dst: Vec<Vec<Option<usize>>> = Vec::with_capacity(ksize);
    for_each_index(&kernel, |k| {
        let mut v = Vec::with_capacity(in_sp);
        for_each_index(&g.spatial, |ii| {
            let mut off = 0usize;
            let mut ok = true;
            for a in 0..nsp {
                let fwd = ii[a]
                    .saturating_mul(g.win.strides[a])
                    .saturating_add(k[a].saturating_mul(g.win.dilations[a]));
                let pos = i64::try_from(fwd)
                    .unwrap_or(i64::MAX)
                    .saturating_sub(begins[a]);
                if pos < 0 || pos >= out_sp[a] as i64 {
                    ok = false;
                    break;
                }
                off += pos as usize * out_st[a];
            }
            v.push(if ok { Some(off) } else { None });
        });
        dst.push(v);
    });
    fn run<T>(
        xv: &[T],
        wv: &[T],
        g: &ConvGeom,
        dst: &[Vec<Option<usize>>],
        (m, mg, cg, ksize, p, in_sp): (usize, usize, usize, usize, usize, usize),
    ) -> Vec<T>
    where
        T: Copy + Default + Mul<Output = T> + Add<Output = T>,
    {
        let mut out = vec![T::default(); g.n * m * p];
        let rows = mg * ksize;
        for n in 0..g.n {
            for gi in 0..g.group {
                // cols[(mg·k) × in] = W_gᵀ[(mg·k) × cg] · X_g[cg × in]
                let wg = &wv[gi * cg * rows..][..cg * rows];
                let wt = transpose2(wg, cg, rows);
                let xg = &xv[(n * g.c + gi * cg) * in_sp..][..cg * in_sp];
                let mut cols = vec![T::default(); rows * in_sp];
                matmul_acc(&wt, xg, &mut cols, rows, cg, in_sp);
                for mo in 0..mg {
                    let oc = &mut out[(n * m + gi * mg + mo) * p..][..p];
                    for (ki, d) in dst.iter().enumerate() {
                        let row = &cols[(mo * ksize + ki) * in_sp..][..in_sp];
                        for (v, o) in row.iter().zip(d) {
                            if let Some(o) = o {
                                oc[*o] = oc[*o] + *v;
                            }
                        }
                    }
                }
            }
        }
        out
    }
    let dims = (m, mg, cg, ksize, p, in_sp);
    let mut buf = with_bufs!(Buf::of(x)?, Buf::of(w)?, |xv, wv| run(
        &xv, &wv, &g, &dst, dims
    ));
    if let Some(b) = bias {
        if b.len() != m {
            return Err(format!(
                "conv_transpose bias has {} elements, expected {m}",
                b.len()
            ));
        }
        add_channel_bias(&mut buf, b, m, p)?;
    }
    buf.into_tensor(x.dtype(), out_shape)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Attr, TensorType};
    use proptest::prelude::*;

    fn t32(shape: &[usize], v: Vec<f32>) -> Tensor {
        Tensor::from_vec(shape.to_vec(), v)
    }
    fn iota(shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        t32(shape, (0..n).map(|i| i as f32).collect())
    }
    fn run(op: OpKind, attrs: Attrs, ins: &[Option<&Tensor>]) -> Result<Tensor, String> {
        eval(op, &attrs, ins).map(|mut v| v.remove(0))
    }

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                for l in 0..k {
                    c[i * n + j] += a[i * k + l] * b[l * n + j];
                }
            }
        }
        c
    }

    #[test]
    fn matmul_broadcasts_batches_and_handles_vectors() {
        let a = iota(&[2, 2, 3]);
        let b = iota(&[3, 2]);
        let r = run(OpKind::MatMul, Attrs::new(), &[Some(&a), Some(&b)]).unwrap();
        assert_eq!(r.shape(), &[2, 2, 2]);
        // numpy: np.arange(12).reshape(2,2,3) @ np.arange(6).reshape(3,2)
        assert_eq!(
            r.as_slice::<f32>().unwrap(),
            &[10.0, 13.0, 28.0, 40.0, 46.0, 67.0, 64.0, 94.0]
        );
        let v = iota(&[3]);
        let r = run(OpKind::MatMul, Attrs::new(), &[Some(&v), Some(&b)]).unwrap();
        assert_eq!(r.shape(), &[2]);
        assert_eq!(r.as_slice::<f32>().unwrap(), &[10.0, 13.0]);
        let r = run(OpKind::MatMul, Attrs::new(), &[Some(&a), Some(&v)]).unwrap();
        assert_eq!(r.shape(), &[2, 2]);
        assert_eq!(r.as_slice::<f32>().unwrap(), &[5.0, 14.0, 23.0, 32.0]);
        assert!(run(OpKind::MatMul, Attrs::new(), &[Some(&a), Some(&a)]).is_err());
    }

    #[test]
    fn matmul_infer_keeps_symbolic_batch_dims() {
        let a = Fact::of(TensorType::new(
            DType::F32,
            Shape::new(vec!["B".into(), "S".into(), Dim::Fixed(768)]),
        ));
        let b = Fact::of(TensorType::new(DType::F32, Shape::fixed(&[768, 3072])));
        let r = infer(OpKind::MatMul, &Attrs::new(), &[Some(&a), Some(&b)]).unwrap();
        assert_eq!(r[0].ty.shape.to_string(), "[B, S, 3072]");
        let bad = Fact::of(TensorType::new(DType::F32, Shape::fixed(&[700, 3])));
        assert!(infer(OpKind::MatMul, &Attrs::new(), &[Some(&a), Some(&bad)]).is_err());
    }

    #[test]
    fn matmul_of_integers_wraps() {
        let a = Tensor::from_vec(vec![1, 2], vec![100i8, 100]);
        let b = Tensor::from_vec(vec![2, 1], vec![2i8, 1]);
        let r = run(OpKind::MatMul, Attrs::new(), &[Some(&a), Some(&b)]).unwrap();
        assert_eq!(r.as_slice::<i8>().unwrap(), &[300i32 as i8]);
    }

    #[test]
    fn gemm_transposes_scales_and_broadcasts_c() {
        let a = iota(&[3, 2]); // transA -> 2x3
        let b = iota(&[3, 2]);
        let c = t32(&[2], vec![1.0, -1.0]);
        let attrs = Attrs::new()
            .with("transA", Attr::Int(1))
            .with("alpha", Attr::Float(0.5))
            .with("beta", Attr::Float(2.0));
        let r = run(OpKind::Gemm, attrs, &[Some(&a), Some(&b), Some(&c)]).unwrap();
        // numpy: 0.5 * A.T @ B + 2 * c
        assert_eq!(r.as_slice::<f32>().unwrap(), &[12.0, 11.0, 15.0, 15.5]);
    }

    #[test]
    fn einsum_handles_traces_transposes_ellipsis_and_implicit_output() {
        let a = iota(&[3, 3]);
        let eq = |s: &str| Attrs::new().with("equation", Attr::Str(s.into()));
        let tr = run(OpKind::Einsum, eq("ii"), &[Some(&a)]).unwrap();
        assert_eq!(tr.shape(), &[] as &[usize]);
        assert_eq!(tr.as_slice::<f32>().unwrap(), &[12.0]);
        let t = run(OpKind::Einsum, eq("ij->ji"), &[Some(&a)]).unwrap();
        assert_eq!(t.as_slice::<f32>().unwrap()[1], 3.0);
        let x = iota(&[2, 2, 3]);
        let y = iota(&[2, 3, 2]);
        let bm = run(
            OpKind::Einsum,
            eq("...ij,...jk->...ik"),
            &[Some(&x), Some(&y)],
        )
        .unwrap();
        let mm = run(OpKind::MatMul, Attrs::new(), &[Some(&x), Some(&y)]).unwrap();
        assert_eq!(bm, mm);
        let imp = run(OpKind::Einsum, eq("ij,jk"), &[Some(&a), Some(&a)]).unwrap();
        let mm = run(OpKind::MatMul, Attrs::new(), &[Some(&a), Some(&a)]).unwrap();
        assert_eq!(imp, mm);
    }

    #[test]
    fn conv_with_padding_stride_and_groups() {
        // numpy-computed: 1x1x4x4 arange input, 3x3 ones kernel, pads 1, strides 2.
        let x = iota(&[1, 1, 4, 4]);
        let w = t32(&[1, 1, 3, 3], vec![1.0; 9]);
        let attrs = Attrs::new()
            .with("pads", Attr::Ints(vec![1, 1, 1, 1]))
            .with("strides", Attr::Ints(vec![2, 2]));
        let r = run(OpKind::Conv, attrs, &[Some(&x), Some(&w), None]).unwrap();
        assert_eq!(r.shape(), &[1, 1, 2, 2]);
        assert_eq!(r.as_slice::<f32>().unwrap(), &[10.0, 24.0, 51.0, 90.0]);
        // Depthwise with bias: each channel scaled by its own 1x1 weight.
        let x = iota(&[1, 2, 1, 2]);
        let w = t32(&[2, 1, 1, 1], vec![2.0, 3.0]);
        let b = t32(&[2], vec![1.0, -1.0]);
        let g = Attrs::new().with("group", Attr::Int(2));
        let r = run(OpKind::Conv, g, &[Some(&x), Some(&w), Some(&b)]).unwrap();
        assert_eq!(r.as_slice::<f32>().unwrap(), &[1.0, 3.0, 5.0, 8.0]);
    }

    #[test]
    fn conv_auto_pad_same_upper_keeps_size() {
        let x = iota(&[1, 1, 5]);
        let w = t32(&[1, 1, 2], vec![1.0, 1.0]);
        let attrs = Attrs::new().with("auto_pad", Attr::Str("SAME_UPPER".into()));
        let r = run(OpKind::Conv, attrs, &[Some(&x), Some(&w), None]).unwrap();
        assert_eq!(r.as_slice::<f32>().unwrap(), &[1.0, 3.0, 5.0, 7.0, 4.0]);
    }

    #[test]
    fn conv_transpose_matches_onnx_example() {
        // ONNX test_convtranspose_1d: x=[[[0,1,2]]], W ones 1x2x3 -> y shape 1x2x5
        let x = iota(&[1, 1, 3]);
        let w = t32(&[1, 2, 3], vec![1.0; 6]);
        let r = run(
            OpKind::ConvTranspose,
            Attrs::new(),
            &[Some(&x), Some(&w), None],
        )
        .unwrap();
        assert_eq!(r.shape(), &[1, 2, 5]);
        assert_eq!(
            r.as_slice::<f32>().unwrap(),
            &[0.0, 1.0, 3.0, 3.0, 2.0, 0.0, 1.0, 3.0, 3.0, 2.0]
        );
        let attrs = Attrs::new()
            .with("strides", Attr::Ints(vec![2]))
            .with("output_padding", Attr::Ints(vec![1]));
        let r = run(OpKind::ConvTranspose, attrs, &[Some(&x), Some(&w), None]).unwrap();
        assert_eq!(r.shape(), &[1, 2, 8]);
        assert_eq!(
            &r.as_slice::<f32>().unwrap()[..8],
            &[0.0, 0.0, 1.0, 1.0, 3.0, 2.0, 2.0, 0.0]
        );
    }

    #[test]
    fn conv_infer_computes_spatial_sizes() {
        let x = Fact::of(TensorType::new(
            DType::F32,
            Shape::new(vec![
                "N".into(),
                Dim::Fixed(3),
                Dim::Fixed(224),
                Dim::Fixed(224),
            ]),
        ));
        let w = Fact::of(TensorType::new(DType::F32, Shape::fixed(&[64, 3, 7, 7])));
        let attrs = Attrs::new()
            .with("pads", Attr::Ints(vec![3, 3, 3, 3]))
            .with("strides", Attr::Ints(vec![2, 2]));
        let r = infer(OpKind::Conv, &attrs, &[Some(&x), Some(&w)]).unwrap();
        assert_eq!(r[0].ty.shape.to_string(), "[N, 64, 112, 112]");
    }

    #[test]
    fn matmul_128x768x3072_is_fast_enough() {
        let a = t32(
            &[128, 768],
            (0..128 * 768).map(|i| (i % 7) as f32).collect(),
        );
        let b = t32(
            &[768, 3072],
            (0..768 * 3072).map(|i| (i % 5) as f32).collect(),
        );
        let start = std::time::Instant::now();
        let r = run(OpKind::MatMul, Attrs::new(), &[Some(&a), Some(&b)]).unwrap();
        assert_eq!(r.shape(), &[128, 3072]);
        assert!(start.elapsed().as_secs() < 20, "took {:?}", start.elapsed());
    }

    proptest! {
        #[test]
        fn matmul_matches_naive_triple_loop(
            m in 1usize..6, k in 1usize..7, n in 1usize..6, batch in 1usize..3,
            seed in proptest::collection::vec(-4i32..5, 64),
        ) {
            let av: Vec<f32> = (0..batch * m * k).map(|i| seed[i % 64] as f32).collect();
            let bv: Vec<f32> = (0..k * n).map(|i| seed[(i * 3 + 1) % 64] as f32).collect();
            let a = t32(&[batch, m, k], av.clone());
            let b = t32(&[k, n], bv.clone());
            let r = run(OpKind::MatMul, Attrs::new(), &[Some(&a), Some(&b)]).unwrap();
            let mut want = Vec::new();
            for bi in 0..batch {
                want.extend(naive(&av[bi * m * k..(bi + 1) * m * k], &bv, m, k, n));
            }
            prop_assert_eq!(r.shape(), &[batch, m, n]);
            prop_assert_eq!(r.as_slice::<f32>().unwrap(), &want[..]);
        }
    }
}
