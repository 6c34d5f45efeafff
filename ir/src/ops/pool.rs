//! The pool op family: windowed max/average/lp pooling over the spatial axes of an
//! (N, C, ...) tensor, with pads, strides, dilations, ceil_mode and auto_pad, and the
//! global variants. Shape rules and reference semantics side by side.

use super::shared::{checked_numel, fact, for_each_index, Window};
use super::{arg, not_in_family, Fact};
use crate::tensor::strides;
use crate::{Attrs, DType, Dim, OpKind, Shape, Tensor, TensorData};

fn is_global(op: OpKind) -> bool {
    matches!(
        op,
        OpKind::GlobalMaxPool | OpKind::GlobalAveragePool | OpKind::GlobalLpPool
    )
}

/// Shape rule of the pool ops.
pub fn infer(op: OpKind, attrs: &Attrs, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>, String> {
    if !matches!(
        op,
        OpKind::MaxPool
            | OpKind::AveragePool
            | OpKind::LpPool
            | OpKind::GlobalMaxPool
            | OpKind::GlobalAveragePool
            | OpKind::GlobalLpPool
    ) {
        return Err(not_in_family(op));
    }
    let x = arg(inputs, 0)?;
    let shape = match x.ty.shape.dims() {
        None => Shape::unknown(),
        Some(d) if d.len() < 3 => {
            return Err(format!(
                "pooling needs an (N, C, ...) input, got rank {}",
                d.len()
            ))
        }
        Some(d) => {
            let n = d.len() - 2;
            let mut out = d[..2].to_vec();
            if is_global(op) {
                out.resize(d.len(), Dim::Fixed(1));
            } else {
                let mut win = Window::from_attrs(attrs, n, None)?;
                let ceil = attrs.int_or("ceil_mode", 0)? != 0;
                for i in 0..n {
                    out.push(match d[2 + i].fixed() {
                        Some(inp) => Dim::Fixed(win.resolve_axis(i, inp as usize, ceil)? as u64),
                        None => Dim::Unknown,
                    });
                }
            }
            Shape::new(out)
        }
    };
    let mut outs = vec![fact(x.ty.dtype, shape.clone())];
    if op == OpKind::MaxPool {
        outs.push(fact(DType::I64, shape));
    }
    Ok(outs)
}

/// A windowed pool's geometry as the interpreter resolves it (auto_pad and ceil_mode
/// applied), for native pool routines that must read the attributes exactly as the
/// reference does. Global pools have the whole spatial extent as their window.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolGeometry {
    /// Window size per spatial axis.
    pub kernel: Vec<usize>,
    /// Stride per spatial axis.
    pub strides: Vec<usize>,
    /// Dilation per spatial axis.
    pub dilations: Vec<usize>,
    /// Begin pads then end pads.
    pub pads: Vec<usize>,
    /// Output size per spatial axis.
    pub out: Vec<usize>,
    /// `count_include_pad` (average pool).
    pub count_include_pad: bool,
}

/// The geometry of pool `op` on an input of shape `x` (rank >= 3).
pub fn pool_geometry(op: OpKind, attrs: &Attrs, x: &[usize]) -> Result<PoolGeometry, String> {
    if x.len() < 3 {
        return Err(format!(
            "pooling needs an (N, C, ...) input, got rank {}",
            x.len()
        ));
    }
    let nsp = x.len() - 2;
    let spatial = &x[2..];
    let mut win = if is_global(op) {
        Window {
            kernel: spatial.to_vec(),
            strides: vec![1; nsp],
            dilations: vec![1; nsp],
            pads: vec![0; 2 * nsp],
            auto_pad: "NOTSET".into(),
        }
    } else {
        Window::from_attrs(attrs, nsp, None)?
    };
    let ceil = attrs.int_or("ceil_mode", 0)? != 0;
    let out = win.resolve(spatial, ceil)?;
    Ok(PoolGeometry {
        kernel: win.kernel,
        strides: win.strides,
        dilations: win.dilations,
        pads: win.pads,
        out,
        count_include_pad: attrs.int_or("count_include_pad", 0)? != 0,
    })
}

/// One input position a window reads along an axis: a real element or a pad.
#[derive(Clone, Copy)]
enum Tap {
    In(usize),
    Pad,
}

/// Reference semantics of the pool ops.
pub fn eval(op: OpKind, attrs: &Attrs, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
    let x = arg(inputs, 0)?;
    let shape = x.shape().to_vec();
    if shape.len() < 3 {
        return Err(format!(
            "pooling needs an (N, C, ...) input, got rank {}",
            shape.len()
        ));
    }
    if x.dtype() == DType::Bool {
        return Err("pooling does not take bool".into());
    }
    let nsp = shape.len() - 2;
    let spatial = shape[2..].to_vec();
    let mut win = if is_global(op) {
        Window {
            kernel: spatial.clone(),
            strides: vec![1; nsp],
            dilations: vec![1; nsp],
            pads: vec![0; 2 * nsp],
            auto_pad: "NOTSET".into(),
        }
    } else {
        Window::from_attrs(attrs, nsp, None)?
    };
    let ceil = attrs.int_or("ceil_mode", 0)? != 0;
    let out_sp = win.resolve(&spatial, ceil)?;
    let include_pad = attrs.int_or("count_include_pad", 0)? != 0;
    let p = attrs.int_or("p", 2)? as f64;
    let col_major = attrs.int_or("storage_order", 0)? != 0;
    // Per axis and output index, the positions its window reads.
    let mut taps: Vec<Vec<Vec<Tap>>> = Vec::with_capacity(nsp);
    for a in 0..nsp {
        let extent = spatial[a]
            .saturating_add(win.pads[a])
            .saturating_add(win.pads[nsp + a]);
        let mut per = Vec::with_capacity(out_sp[a]);
        for o in 0..out_sp[a] {
            let mut t = Vec::new();
            for k in 0..win.kernel[a] {
                // Positions grow with k: stop at the first past the padded extent.
                let pos = (o * win.strides[a]).saturating_add(k.saturating_mul(win.dilations[a]));
                if pos >= extent {
                    break;
                }
                t.push(match pos.checked_sub(win.pads[a]) {
                    Some(r) if r < spatial[a] => Tap::In(r),
                    _ => Tap::Pad,
                });
            }
            per.push(t);
        }
        taps.push(per);
    }
    let (n, c) = (shape[0], shape[1]);
    let sp: usize = spatial.iter().product();
    let osp = checked_numel(&out_sp)?;
    let in_st = strides(&spatial);
    // Column-major strides for storage_order = 1 indices.
    let mut cm_st = vec![1usize; nsp];
    for a in 1..nsp {
        cm_st[a] = cm_st[a - 1] * spatial[a - 1];
    }
    let v = x.to_f64s();
    let mut y = Vec::with_capacity(n * c * osp);
    let mut idx_out = Vec::new();
    let is_max = matches!(op, OpKind::MaxPool | OpKind::GlobalMaxPool);
    let is_lp = matches!(op, OpKind::LpPool | OpKind::GlobalLpPool);
    for plane in 0..n * c {
        let xv = &v[plane * sp..(plane + 1) * sp];
        for_each_index(&out_sp, |o| {
            let lists: Vec<&Vec<Tap>> = (0..nsp).map(|a| &taps[a][o[a]]).collect();
            let lens: Vec<usize> = lists.iter().map(|l| l.len()).collect();
            let (mut best, mut best_at) = (f64::NEG_INFINITY, None::<usize>);
            let (mut sum, mut count) = (0.0f64, 0usize);
            for_each_index(&lens, |k| {
                let mut off = 0usize;
                let mut cm = 0usize;
                let mut pad = false;
                for a in 0..nsp {
                    match lists[a][k[a]] {
                        Tap::In(r) => {
                            off += r * in_st[a];
                            cm += r * cm_st[a];
                        }
                        Tap::Pad => pad = true,
                    }
                }
                if pad {
                    if include_pad {
                        count += 1;
                    }
                    return;
                }
                let e = xv[off];
                count += 1;
                if is_max {
                    if e > best || best_at.is_none() {
                        best = e;
                        best_at = Some(if col_major { cm } else { off });
                    }
                } else if is_lp {
                    sum += e.abs().powf(p);
                } else {
                    sum += e;
                }
            });
            if is_max {
                y.push(best);
                idx_out.push((plane * sp + best_at.unwrap_or(0)) as i64);
            } else if is_lp {
                y.push(sum.powf(1.0 / p));
            } else {
                y.push(if count == 0 {
                    f64::NAN
                } else {
                    sum / count as f64
                });
            }
        });
    }
    let mut out_shape = vec![n, c];
    out_shape.extend_from_slice(&out_sp);
    let mut outs = vec![Tensor::new(
        out_shape.clone(),
        TensorData::from_f64s(x.dtype(), y.into_iter()),
    )?];
    if op == OpKind::MaxPool {
        outs.push(Tensor::new(out_shape, TensorData::I64(idx_out.into()))?);
    }
    Ok(outs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Attr, TensorType};

    fn iota(shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        Tensor::from_vec(shape.to_vec(), (0..n).map(|i| i as f32).collect())
    }
    fn k(v: &[i64]) -> Attrs {
        Attrs::new().with("kernel_shape", Attr::Ints(v.to_vec()))
    }

    #[test]
    fn max_pool_with_indices_and_strides() {
        let x = iota(&[1, 1, 4, 4]);
        let a = k(&[2, 2]).with("strides", Attr::Ints(vec![2, 2]));
        let r = eval(OpKind::MaxPool, &a, &[Some(&x)]).unwrap();
        assert_eq!(r[0].shape(), &[1, 1, 2, 2]);
        assert_eq!(r[0].as_slice::<f32>().unwrap(), &[5.0, 7.0, 13.0, 15.0]);
        assert_eq!(r[1].to_i64s(), vec![5, 7, 13, 15]);
        let cm = a.with("storage_order", Attr::Int(1));
        let r = eval(OpKind::MaxPool, &cm, &[Some(&x)]).unwrap();
        // column-major: h + w * H
        assert_eq!(r[1].to_i64s(), vec![5, 13, 7, 15]);
    }

    #[test]
    fn max_pool_ceil_mode_keeps_partial_window() {
        let x = iota(&[1, 1, 5]);
        let a = k(&[2])
            .with("strides", Attr::Ints(vec![2]))
            .with("ceil_mode", Attr::Int(1));
        let r = eval(OpKind::MaxPool, &a, &[Some(&x)]).unwrap();
        assert_eq!(r[0].as_slice::<f32>().unwrap(), &[1.0, 3.0, 4.0]);
    }

    #[test]
    fn average_pool_counts_pads_only_when_asked() {
        let x = iota(&[1, 1, 3]);
        let a = k(&[3]).with("pads", Attr::Ints(vec![1, 1]));
        let r = eval(OpKind::AveragePool, &a, &[Some(&x)]).unwrap();
        assert_eq!(r[0].as_slice::<f32>().unwrap(), &[0.5, 1.0, 1.5]);
        let inc = a.with("count_include_pad", Attr::Int(1));
        let r = eval(OpKind::AveragePool, &inc, &[Some(&x)]).unwrap();
        assert_eq!(r[0].as_slice::<f32>().unwrap(), &[1.0 / 3.0, 1.0, 1.0]);
    }

    #[test]
    fn global_and_lp_pools() {
        let x = iota(&[1, 2, 2]);
        let r = eval(OpKind::GlobalAveragePool, &Attrs::new(), &[Some(&x)]).unwrap();
        assert_eq!(r[0].shape(), &[1, 2, 1]);
        assert_eq!(r[0].as_slice::<f32>().unwrap(), &[0.5, 2.5]);
        let r = eval(OpKind::GlobalMaxPool, &Attrs::new(), &[Some(&x)]).unwrap();
        assert_eq!(r[0].as_slice::<f32>().unwrap(), &[1.0, 3.0]);
        let r = eval(OpKind::GlobalLpPool, &Attrs::new(), &[Some(&x)]).unwrap();
        // sqrt(0+1), sqrt(4+9)
        assert_eq!(r[0].as_slice::<f32>().unwrap(), &[1.0, 13f32.sqrt()]);
    }

    #[test]
    fn infer_pool_shapes_with_same_padding() {
        let f = Fact::of(TensorType::new(
            DType::F32,
            Shape::new(vec!["N".into(), Dim::Fixed(8), Dim::Fixed(7), "W".into()]),
        ));
        let a = k(&[3, 3])
            .with("strides", Attr::Ints(vec![2, 2]))
            .with("auto_pad", Attr::Str("SAME_UPPER".into()));
        let r = infer(OpKind::MaxPool, &a, &[Some(&f)]).unwrap();
        assert_eq!(r[0].ty.shape.to_string(), "[N, 8, 4, ?]");
        assert_eq!(r[1].ty.dtype, DType::I64);
    }
}
