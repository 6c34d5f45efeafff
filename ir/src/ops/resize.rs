//! The resize op family (resize): resampling by nearest, (n-)linear or cubic
//! interpolation, with ONNX's coordinate transformation modes. Shape rule and reference
//! semantics side by side.
//!
//! Inputs are `x, roi?, scales?, sizes?`; exactly one of scales and sizes is given (an
//! empty tensor counts as absent). Linear and cubic interpolation are separable, so they
//! run one axis at a time in f64; nearest is an index map and works for every dtype.

use super::movement::{checked_numel, const_ints, fact, norm_axes, strides, take_or, to_size};
use super::{arg, not_in_family, opt_arg, Fact};
use crate::{Attrs, Dim, OpKind, Shape, Tensor, TensorData};

/// Shape rule of the resize op.
pub fn infer(op: OpKind, attrs: &Attrs, inputs: &[Option<&Fact>]) -> Result<Vec<Fact>, String> {
    if op != OpKind::Resize {
        return Err(not_in_family(op));
    }
    let x = arg(inputs, 0)?;
    let dt = x.ty.dtype;
    let Some(d) = x.ty.shape.dims() else {
        return Ok(vec![fact(dt, Shape::unknown())]);
    };
    let rank = d.len();
    let present =
        |i: usize| opt_arg(inputs, i).filter(|f| f.ty.shape.dims() != Some(&[Dim::Fixed(0)]));
    let axes = axes_attr(attrs, rank)?;
    let mut out = d.to_vec();
    if let Some(s) = present(3) {
        match const_ints(s) {
            Some(sizes) => {
                let known: Option<Vec<usize>> =
                    d.iter().map(|d| d.fixed().map(|n| n as usize)).collect();
                match known {
                    Some(in_shape) => {
                        let (o, _) = sizes_and_scales(&in_shape, &axes, &sizes, attrs)?;
                        return Ok(vec![fact(dt, Shape::fixed(&o))]);
                    }
                    None if policy(attrs)? == "stretch" => {
                        if sizes.len() != axes.len() {
                            return Err(format!("{} sizes for {} axes", sizes.len(), axes.len()));
                        }
                        for (&a, &n) in axes.iter().zip(&sizes) {
                            out[a] = Dim::Fixed(to_size(n, "sizes")? as u64);
                        }
                    }
                    None => {
                        for &a in &axes {
                            out[a] = Dim::Unknown;
                        }
                    }
                }
            }
            None => {
                for &a in &axes {
                    out[a] = Dim::Unknown;
                }
            }
        }
    } else if let Some(s) = present(2) {
        match s.konst.as_ref().map(|k| k.to_f64s()) {
            Some(scales) => {
                if scales.len() != axes.len() {
                    return Err(format!("{} scales for {} axes", scales.len(), axes.len()));
                }
                for (&a, &sc) in axes.iter().zip(&scales) {
                    out[a] = match &d[a] {
                        Dim::Fixed(n) => Dim::Fixed(scaled(*n as usize, sc)? as u64),
                        other if sc == 1.0 => other.clone(),
                        _ => Dim::Unknown,
                    };
                }
            }
            None => {
                for &a in &axes {
                    out[a] = Dim::Unknown;
                }
            }
        }
    } else {
        return Err("resize needs scales or sizes".into());
    }
    Ok(vec![fact(dt, Shape::new(out))])
}

/// What `resize` computes, resolved from its attributes and inputs: the output shape, per
/// axis the source coordinate of every output coordinate (None: extrapolate), the mode
/// and the extrapolation value.
struct Plan {
    out: Vec<usize>,
    coords: Vec<Vec<Option<f64>>>,
    mode: String,
    extrap: f64,
}

fn plan(attrs: &Attrs, inputs: &[Option<&Tensor>]) -> Result<Plan, String> {
    let x = arg(inputs, 0)?;
    let shape = x.shape();
    let rank = x.rank();
    let present = |i: usize| opt_arg(inputs, i).filter(|t| !t.is_empty());
    let axes = axes_attr(attrs, rank)?;
    if attrs.int_or("antialias", 0)? != 0 {
        return Err("resize with antialias = 1 is not supported".into());
    }
    let (out, scales) = match (present(2), present(3)) {
        (Some(_), Some(_)) => return Err("resize takes scales or sizes, not both".into()),
        (None, Some(s)) => {
            sizes_and_scales(shape, &axes, &super::movement::ints(s, "sizes")?, attrs)?
        }
        (Some(s), None) => {
            let sc = s.to_f64s();
            if sc.len() != axes.len() {
                return Err(format!("{} scales for {} axes", sc.len(), axes.len()));
            }
            let mut full = vec![1.0; rank];
            let mut out = shape.to_vec();
            for (&a, &v) in axes.iter().zip(&sc) {
                full[a] = v;
                out[a] = scaled(shape[a], v)?;
            }
            (out, full)
        }
        (None, None) => return Err("resize needs scales or sizes".into()),
    };
    checked_numel(&out)?;
    let ctm = attrs.string_or("coordinate_transformation_mode", "half_pixel".into())?;
    let mut roi = vec![(0.0, 1.0); rank];
    if ctm == "tf_crop_and_resize" {
        let r = present(1).ok_or("tf_crop_and_resize needs roi")?.to_f64s();
        let ax: Vec<usize> = if r.len() == 2 * rank {
            (0..rank).collect()
        } else {
            axes.clone()
        };
        if r.len() != 2 * ax.len() {
            return Err(format!("roi has {} values for {} axes", r.len(), ax.len()));
        }
        for (i, &a) in ax.iter().enumerate() {
            roi[a] = (r[i], r[i + ax.len()]);
        }
    }
    let extrap = attrs.float_or("extrapolation_value", 0.0)? as f64;
    let mode = attrs.string_or("mode", "nearest".into())?;
    // Source coordinate of every output coordinate, per axis (None: extrapolate).
    let mut coords: Vec<Vec<Option<f64>>> = Vec::with_capacity(rank);
    for a in 0..rank {
        let mut v = Vec::with_capacity(out[a]);
        for i in 0..out[a] {
            v.push(source_coord(&ctm, i, shape[a], out[a], scales[a], roi[a])?);
        }
        coords.push(v);
    }
    Ok(Plan {
        out,
        coords,
        mode,
        extrap,
    })
}

/// A nearest-mode resize's source index along every axis for each output index (None:
/// the extrapolation value), with the output shape and that value: what a native routine
/// needs to gather exactly as the reference does. `Ok(None)` for the other modes.
#[allow(clippy::type_complexity)]
pub fn nearest_picks(
    attrs: &Attrs,
    inputs: &[Option<&Tensor>],
) -> Result<Option<(Vec<usize>, Vec<Vec<Option<usize>>>, f64)>, String> {
    let p = plan(attrs, inputs)?;
    if p.mode != "nearest" {
        return Ok(None);
    }
    let shape = arg(inputs, 0)?.shape();
    Ok(Some((p.out.clone(), picks(attrs, &p, shape)?, p.extrap)))
}

/// Per-axis interpolation taps of a linear or cubic resize.
pub type AxisTaps = Vec<Option<Vec<(usize, f64)>>>;

/// A linear- or cubic-mode resize's interpolation taps along every axis for each output
/// index (input index and weight per tap, None: the extrapolation value), with the output
/// shape and that value: what a native routine needs to interpolate exactly as the
/// reference does (one axis after another, axis 0 first). `Ok(None)` for nearest mode.
#[allow(clippy::type_complexity)]
pub fn interp_taps(
    attrs: &Attrs,
    inputs: &[Option<&Tensor>],
) -> Result<Option<(Vec<usize>, Vec<AxisTaps>, f64)>, String> {
    let p = plan(attrs, inputs)?;
    let cubic = match p.mode.as_str() {
        "linear" => false,
        "cubic" => true,
        _ => return Ok(None),
    };
    let shape = arg(inputs, 0)?.shape();
    let a_coef = attrs.float_or("cubic_coeff_a", -0.75)? as f64;
    let exclude = attrs.int_or("exclude_outside", 0)? != 0;
    let taps = p
        .coords
        .iter()
        .enumerate()
        .map(|(a, cs)| {
            cs.iter()
                .map(|c| c.map(|c| weights(c, shape[a], cubic, a_coef, exclude)))
                .collect()
        })
        .collect();
    Ok(Some((p.out, taps, p.extrap)))
}

fn picks(attrs: &Attrs, p: &Plan, shape: &[usize]) -> Result<Vec<Vec<Option<usize>>>, String> {
    let nm = attrs.string_or("nearest_mode", "round_prefer_floor".into())?;
    let mut pick: Vec<Vec<Option<usize>>> = Vec::with_capacity(shape.len());
    for (a, cs) in p.coords.iter().enumerate() {
        let mut v = Vec::with_capacity(p.out[a]);
        for c in cs {
            v.push(match c {
                None => None,
                Some(c) => Some(nearest(*c, &nm, shape[a])?),
            });
        }
        pick.push(v);
    }
    Ok(pick)
}

/// Reference semantics of the resize op.
pub fn eval(op: OpKind, attrs: &Attrs, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
    if op != OpKind::Resize {
        return Err(not_in_family(op));
    }
    let x = arg(inputs, 0)?;
    let shape = x.shape();
    let rank = x.rank();
    let p = plan(attrs, inputs)?;
    let (out, coords, mode, extrap) = (p.out.clone(), &p.coords, p.mode.as_str(), p.extrap);
    match mode {
        "nearest" => {
            let pick = picks(attrs, &p, shape)?;
            let st = strides(shape);
            let mut map = Vec::with_capacity(out.iter().product());
            super::movement::for_each_index(&out, |ix| {
                let mut off = Some(0);
                for a in 0..rank {
                    off = match (off, pick[a][ix[a]]) {
                        (Some(o), Some(p)) => Some(o + p * st[a]),
                        _ => None,
                    };
                }
                map.push(off);
                Ok(())
            })?;
            let fill = TensorData::from_f64s(x.dtype(), std::iter::once(extrap));
            Ok(vec![Tensor::new(out, take_or(x.data(), &map, &fill)?)?])
        }
        "linear" | "cubic" => {
            let cubic = mode == "cubic";
            let a_coef = attrs.float_or("cubic_coeff_a", -0.75)? as f64;
            let exclude = attrs.int_or("exclude_outside", 0)? != 0;
            let mut data = x.to_f64s();
            let mut cur = shape.to_vec();
            for a in 0..rank {
                let taps: Vec<Option<Vec<(usize, f64)>>> = coords[a]
                    .iter()
                    .map(|c| c.map(|c| weights(c, shape[a], cubic, a_coef, exclude)))
                    .collect();
                data = resample_axis(&data, &cur, a, &taps, extrap);
                cur[a] = out[a];
            }
            Ok(vec![Tensor::new(
                out,
                TensorData::from_f64s(x.dtype(), data.into_iter()),
            )?])
        }
        m => Err(format!("unknown resize mode `{m}`")),
    }
}

fn axes_attr(attrs: &Attrs, rank: usize) -> Result<Vec<usize>, String> {
    match attrs.ints("axes")? {
        Some(a) => norm_axes(&a, rank),
        None => Ok((0..rank).collect()),
    }
}

fn policy(attrs: &Attrs) -> Result<String, String> {
    attrs.string_or("keep_aspect_ratio_policy", "stretch".into())
}

/// `floor(n * scale)`, checked.
fn scaled(n: usize, scale: f64) -> Result<usize, String> {
    if !(scale.is_finite() && scale > 0.0) {
        return Err(format!("scale {scale} must be positive"));
    }
    let v = (n as f64 * scale).floor();
    if v > super::movement::MAX_ELEMS as f64 {
        return Err(format!("scaled size {v} is too large"));
    }
    Ok(v as usize)
}

/// The output shape and per-axis scales from the `sizes` input and the aspect policy.
fn sizes_and_scales(
    shape: &[usize],
    axes: &[usize],
    sizes: &[i64],
    attrs: &Attrs,
) -> Result<(Vec<usize>, Vec<f64>), String> {
    if sizes.len() != axes.len() {
        return Err(format!("{} sizes for {} axes", sizes.len(), axes.len()));
    }
    let mut out = shape.to_vec();
    let mut scales = vec![1.0; shape.len()];
    for (&a, &n) in axes.iter().zip(sizes) {
        out[a] = to_size(n, "sizes")?;
        scales[a] = out[a] as f64 / shape[a] as f64;
    }
    let p = policy(attrs)?;
    if p != "stretch" {
        let it = axes.iter().map(|&a| scales[a]);
        let s = match p.as_str() {
            "not_larger" => it.fold(f64::INFINITY, f64::min),
            "not_smaller" => it.fold(f64::NEG_INFINITY, f64::max),
            _ => return Err(format!("unknown keep_aspect_ratio_policy `{p}`")),
        };
        for &a in axes {
            scales[a] = s;
            let v = (s * shape[a] as f64 + 0.5).floor();
            if !(v.is_finite() && v <= super::movement::MAX_ELEMS as f64) {
                return Err(format!("resized size {v} is too large"));
            }
            out[a] = v as usize;
        }
    }
    Ok((out, scales))
}

/// The input coordinate output coordinate `x` maps to; `None` when tf_crop_and_resize
/// falls outside the input.
fn source_coord(
    mode: &str,
    x: usize,
    n_in: usize,
    n_out: usize,
    scale: f64,
    roi: (f64, f64),
) -> Result<Option<f64>, String> {
    let x = x as f64;
    let n = n_in as f64;
    let out_w = scale * n;
    Ok(Some(match mode {
        "half_pixel" => (x + 0.5) / scale - 0.5,
        "half_pixel_symmetric" => {
            let adjustment = n_out as f64 / out_w;
            let offset = n / 2.0 * (1.0 - adjustment);
            offset + (x + 0.5) / scale - 0.5
        }
        "pytorch_half_pixel" => {
            if out_w == 1.0 {
                -0.5
            } else {
                (x + 0.5) / scale - 0.5
            }
        }
        "align_corners" => {
            if out_w == 1.0 {
                0.0
            } else {
                x * (n - 1.0) / (out_w - 1.0)
            }
        }
        "asymmetric" => x / scale,
        "tf_crop_and_resize" => {
            let (s, e) = roi;
            let c = if out_w == 1.0 {
                (e - s) * (n - 1.0) / 2.0
            } else {
                x * (e - s) * (n - 1.0) / (out_w - 1.0)
            } + s * (n - 1.0);
            if c < 0.0 || c > n - 1.0 {
                return Ok(None);
            }
            c
        }
        m => return Err(format!("unknown coordinate_transformation_mode `{m}`")),
    }))
}

/// The nearest input index to coordinate `c` under `mode`, clamped to the axis.
fn nearest(c: f64, mode: &str, n: usize) -> Result<usize, String> {
    let f = c.floor();
    let r = c - f;
    let i = if r == 0.0 {
        f
    } else {
        match mode {
            "round_prefer_floor" => {
                if r <= 0.5 {
                    f
                } else {
                    f + 1.0
                }
            }
            "round_prefer_ceil" => {
                if r < 0.5 {
                    f
                } else {
                    f + 1.0
                }
            }
            "floor" => f,
            "ceil" => f + 1.0,
            m => return Err(format!("unknown nearest_mode `{m}`")),
        }
    };
    Ok(i.clamp(0.0, n.saturating_sub(1) as f64) as usize)
}

/// Interpolation taps (input index, weight) for coordinate `c` on an axis of `n`.
fn weights(c: f64, n: usize, cubic: bool, a: f64, exclude_outside: bool) -> Vec<(usize, f64)> {
    let f = c.floor();
    // The left neighbour with the ratio in (0, 1].
    let (left, t) = if c == f {
        (f as i64 - 1, 1.0)
    } else {
        (f as i64, c - f)
    };
    let (first, coeffs): (i64, Vec<f64>) = if cubic {
        let u = 1.0 - t;
        (
            left - 1,
            vec![
                ((a * (t + 1.0) - 5.0 * a) * (t + 1.0) + 8.0 * a) * (t + 1.0) - 4.0 * a,
                ((a + 2.0) * t - (a + 3.0)) * t * t + 1.0,
                ((a + 2.0) * u - (a + 3.0)) * u * u + 1.0,
                ((a * (u + 1.0) - 5.0 * a) * (u + 1.0) + 8.0 * a) * (u + 1.0) - 4.0 * a,
            ],
        )
    } else {
        (left, vec![1.0 - t, t])
    };
    let last = n.saturating_sub(1) as i64;
    let mut taps: Vec<(i64, f64)> = coeffs
        .into_iter()
        .enumerate()
        .map(|(k, w)| (first + k as i64, w))
        .collect();
    if exclude_outside {
        for tap in taps.iter_mut() {
            if tap.0 < 0 || tap.0 > last {
                tap.1 = 0.0;
            }
        }
        let s: f64 = taps.iter().map(|t| t.1).sum();
        if s != 0.0 {
            for tap in taps.iter_mut() {
                tap.1 /= s;
            }
        }
    }
    taps.into_iter()
        .map(|(i, w)| (i.clamp(0, last) as usize, w))
        .collect()
}

/// Resamples `data` (of shape `shape`) along `axis` with per-output-coordinate taps.
fn resample_axis(
    data: &[f64],
    shape: &[usize],
    axis: usize,
    taps: &[Option<Vec<(usize, f64)>>],
    extrap: f64,
) -> Vec<f64> {
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    let n = shape[axis];
    let mut out = Vec::with_capacity(outer * taps.len() * inner);
    for o in 0..outer {
        for t in taps {
            for i in 0..inner {
                out.push(match t {
                    None => extrap,
                    Some(ws) => ws
                        .iter()
                        .map(|&(j, w)| {
                            w * data.get((o * n + j) * inner + i).copied().unwrap_or(0.0)
                        })
                        .sum(),
                });
            }
        }
    }
    out
}
