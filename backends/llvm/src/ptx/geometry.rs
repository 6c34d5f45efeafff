//! Host-side facts of the PTX kernels, computed without a device: launch geometry, the
//! argument values of loop and GEMM kernels for concrete shapes, and the device memory plan
//! (one arena laid out by kiln-plan's memory planner, weights in a separate blob).

use super::copy::{COPY_RANK, COPY_THREADS};
use super::gemm::{Activation, Epilogue, THREADS_XY, TILE_M, TILE_N};
use kiln_ir::{Node, OpKind, ValueId};
use kiln_plan::memory::{self, Interval, MemoryPlan};
use kiln_plan::{InnerAccess, Kernel, LoopKernel, Plan};
use std::collections::HashMap;

/// Threads per block of a loop kernel, at most.
pub const LOOP_THREADS: u32 = 256;
/// Alignment of every weight in the weight blob (what the widest vector load needs).
pub const WEIGHT_ALIGN: usize = 256;
/// The largest grid `z` (batch) dimension CUDA allows.
pub const MAX_GRID_Z: u64 = 65_535;

/// How one kernel is launched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    /// Blocks along x, y, z.
    pub grid: [u32; 3],
    /// Threads per block along x, y, z.
    pub block: [u32; 3],
    /// Dynamic shared memory per block, bytes.
    pub shared: u32,
}

/// The launch of a loop kernel with rows of `n` elements: `tid.x` strides over a row with
/// a warp multiple of threads (up to [`LOOP_THREADS`]); a kernel without reductions packs
/// several short rows into one block along `tid.y`, one with reductions takes one row
/// per block (its shared-memory tree spans the block).
pub fn loop_launch(n: usize, rows: usize, reductions: bool) -> Launch {
    let tx = (n.max(1).div_ceil(32) * 32).min(LOOP_THREADS as usize) as u32;
    let ty = if reductions {
        1
    } else {
        (LOOP_THREADS / tx).min(rows.max(1).min(u32::MAX as usize) as u32)
    };
    let gx = rows.div_ceil(ty as usize).min(u32::MAX as usize) as u32;
    Launch {
        grid: [gx, 1, 1],
        block: [tx, ty, 1],
        shared: 0,
    }
}

/// The launch of a GEMM: one 64×64 tile of C per block, the batch along z.
pub fn gemm_launch(a: &GemmArgs) -> Launch {
    Launch {
        grid: [
            (a.n as usize).div_ceil(TILE_N as usize) as u32,
            (a.m as usize).div_ceil(TILE_M as usize) as u32,
            a.batch as u32,
        ],
        block: [THREADS_XY, THREADS_XY, 1],
        shared: 0,
    }
}

/// The most keys the attention kernel holds in shared memory (48 KiB of scores, the
/// dynamic shared memory every sm_80+ GPU grants without opting in).
pub const ATTENTION_MAX_KEYS: u64 = 12 * 1024;

/// The scalar arguments of the attention kernel for concrete shapes.
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionArgs {
    /// Batch, query heads, query rows, keys.
    pub b: u64,
    /// Query heads.
    pub hq: u64,
    /// Query rows.
    pub s: u64,
    /// Keys.
    pub t: u64,
    /// Head dim of q and k.
    pub d: u64,
    /// Head dim of v (and the output).
    pub dv: u64,
    /// Query heads per kv head.
    pub group: u64,
    /// The score scale.
    pub scale: f64,
    /// q, k, v, out: batch, head and row strides (element stride 1 along d).
    pub strides: [[u64; 3]; 4],
    /// The mask's strides over `[b, h, i, j]` (0 where broadcast), when it has one.
    pub mask: Option<[u64; 4]>,
}

/// The launch of the attention kernel: a block per (query row, head, batch).
pub fn attention_launch(a: &AttentionArgs) -> Launch {
    Launch {
        grid: [a.s as u32, a.hq as u32, a.b as u32],
        block: [super::attention::ATTENTION_THREADS, 1, 1],
        shared: (a.t * 4) as u32,
    }
}

/// Whether an `attention` node can run as the GPU kernel: f32 operands, a float mask or
/// none; returns `(causal, has mask)`.
pub fn attention_variant(node: &Node, mask_float: bool) -> Option<(bool, bool)> {
    if node.op != OpKind::Attention {
        return None;
    }
    let causal = node.attrs.int_or("causal", 0).ok()? == 1;
    let mask = node.inputs.get(3).is_some_and(|m| m.is_some());
    if mask && !mask_float {
        return None;
    }
    Some((causal, mask))
}

/// The attention kernel's arguments for q, k, v (and mask) shapes, or why it cannot run.
pub fn attention_args(node: &Node, ins: &[Option<&[usize]>]) -> Result<AttentionArgs, String> {
    let get = |i: usize| -> Result<&[usize], String> {
        ins.get(i)
            .copied()
            .flatten()
            .ok_or_else(|| format!("missing input #{i}"))
    };
    let seq_major = match node.attrs.string("layout")?.as_deref() {
        None | Some("bhsd") => false,
        Some("bshd") => true,
        Some(o) => return Err(format!("attention layout {o:?}")),
    };
    // Head-major dims and [batch, head, row] strides of a 4-D tensor in either layout.
    let dims = |sh: &[usize]| -> Result<([u64; 4], [u64; 3]), String> {
        let [a, x, y, d] = <[usize; 4]>::try_from(sh)
            .map_err(|_| format!("attention operand {sh:?} is not 4-D"))?;
        let (a, x, y, d) = (a as u64, x as u64, y as u64, d as u64);
        Ok(if seq_major {
            ([a, y, x, d], [x * y * d, d, y * d])
        } else {
            ([a, x, y, d], [x * y * d, y * d, d])
        })
    };
    let (q, qs) = dims(get(0)?)?;
    let (k, ks) = dims(get(1)?)?;
    let (v, vs) = dims(get(2)?)?;
    let [b, hq, s, d] = q;
    let [_, hkv, t, _] = k;
    if k[0] != b || k[3] != d || v[0] != b || v[1] != hkv || v[2] != t || hkv == 0 || hq % hkv != 0
    {
        return Err(format!("attention shapes q {q:?}, k {k:?}, v {v:?}"));
    }
    if t > ATTENTION_MAX_KEYS {
        return Err(format!("{t} keys exceed the kernel's {ATTENTION_MAX_KEYS}"));
    }
    let dv = v[3];
    let (_, os) = dims(&if seq_major {
        [b as usize, s as usize, hq as usize, dv as usize]
    } else {
        [b as usize, hq as usize, s as usize, dv as usize]
    })?;
    let mask = match ins.get(3).copied().flatten() {
        None => None,
        Some(m) => {
            let st = broadcast_strides(m, &[b as usize, hq as usize, s as usize, t as usize])?;
            Some([st[0], st[1], st[2], st[3]])
        }
    };
    let scale = match node.attrs.float("scale")? {
        Some(x) => x as f64,
        None => 1.0 / (d as f64).sqrt(),
    };
    Ok(AttentionArgs {
        b,
        hq,
        s,
        t,
        d,
        dv,
        group: hq / hkv,
        scale,
        strides: [qs, ks, vs, os],
        mask,
    })
}

/// The scalar arguments of a loop kernel for one set of input shapes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoopArgs {
    /// The concrete domain (every output's shape).
    pub shape: Vec<usize>,
    /// Row length.
    pub n: u64,
    /// Rows.
    pub rows: u64,
    /// Per input, its element stride along each outer domain dim (0 where broadcast).
    pub strides: Vec<Vec<u64>>,
}

impl LoopArgs {
    /// Binds `k` to its inputs' shapes (in kernel input order), checking broadcasts.
    pub fn bind(k: &LoopKernel, inputs: &[&[usize]]) -> Result<LoopArgs, String> {
        if inputs.len() != k.inputs.len() {
            return Err(format!(
                "loop kernel takes {} inputs, got {}",
                k.inputs.len(),
                inputs.len()
            ));
        }
        let rank = k.shape.len();
        let mut shape: Vec<usize> = k
            .shape
            .iter()
            .map(|d| d.fixed().map_or(1, |f| f as usize))
            .collect();
        let mut seen = vec![false; rank];
        for s in inputs {
            if s.len() > rank {
                return Err(format!("input {s:?} has rank above {rank}"));
            }
            let off = rank - s.len();
            for (i, &d) in s.iter().enumerate() {
                let cur = &mut shape[off + i];
                if d != 1 {
                    if seen[off + i] && *cur != d
                        || k.shape[off + i].fixed().is_some_and(|f| f as usize != d)
                    {
                        return Err(format!("input {s:?} does not broadcast to {:?}", k.shape));
                    }
                    *cur = d;
                    seen[off + i] = true;
                }
            }
        }
        let n = shape.last().copied().unwrap_or(1);
        let rows: usize = shape[..rank.saturating_sub(1)].iter().product();
        let mut strides = vec![];
        for (s, spec) in inputs.iter().zip(&k.inputs) {
            let last = s.last().copied().unwrap_or(1);
            let ok = match spec.inner {
                InnerAccess::Contiguous => !s.is_empty() && last == n,
                InnerAccess::Broadcast => last == 1,
            };
            if !ok {
                return Err(format!(
                    "input {s:?} cannot be read {:?} along a row of {n}",
                    spec.inner
                ));
            }
            let off = rank - s.len();
            let mut st = vec![0u64; rank.saturating_sub(1)];
            let mut acc = 1u64;
            for i in (0..s.len()).rev() {
                if off + i + 1 < rank && s[i] != 1 {
                    st[off + i] = acc;
                }
                acc *= s[i] as u64;
            }
            strides.push(st);
        }
        Ok(LoopArgs {
            shape,
            n: n as u64,
            rows: rows as u64,
            strides,
        })
    }
}

/// Strides of one GEMM operand: two batch levels, then its two index strides.
pub type Strides = [u64; 4];

/// The scalar arguments of a GEMM for concrete shapes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GemmArgs {
    /// Rows of C (batch dims folded in where the strides allow).
    pub m: u64,
    /// Columns of C.
    pub n: u64,
    /// The contraction length.
    pub k: u64,
    /// Batches (grid z).
    pub batch: u64,
    /// The inner batch level's size (`z1 = z % nb1`).
    pub nb1: u64,
    /// A: batch strides, m stride, k stride.
    pub a: Strides,
    /// B: batch strides, k stride, n stride.
    pub b: Strides,
    /// C: batch strides, m stride (n stride 1).
    pub c: Strides,
    /// Epilogue operands present (scale, bias, residual order): batch, m, n strides.
    pub extras: Vec<Strides>,
}

/// Row-major strides of `shape`.
fn contiguous(shape: &[usize]) -> Vec<u64> {
    let mut st = vec![0u64; shape.len()];
    let mut acc = 1u64;
    for i in (0..shape.len()).rev() {
        st[i] = acc;
        acc *= shape[i] as u64;
    }
    st
}

/// Strides of `shape` read broadcast to `out` (right-aligned; 0 where broadcast).
fn broadcast_strides(shape: &[usize], out: &[usize]) -> Result<Vec<u64>, String> {
    if shape.len() > out.len() {
        return Err(format!("{shape:?} does not broadcast to {out:?}"));
    }
    let off = out.len() - shape.len();
    let cs = contiguous(shape);
    let mut st = vec![0u64; out.len()];
    for (i, &d) in shape.iter().enumerate() {
        if d == out[off + i] && d != 1 {
            st[off + i] = cs[i];
        } else if d != 1 {
            return Err(format!("{shape:?} does not broadcast to {out:?}"));
        }
    }
    Ok(st)
}

/// The epilogue a contraction node fuses, or `None` when the GPU has no GEMM for it
/// (it then runs on the host).
pub fn gemm_epilogue(node: &Node) -> Option<Epilogue> {
    let has = |i: usize| node.inputs.get(i).is_some_and(|v| v.is_some());
    match node.op {
        OpKind::MatMul => Some(Epilogue::default()),
        OpKind::Gemm => Some(Epilogue {
            alpha: node.attrs.float_or("alpha", 1.0).ok()?,
            beta: node.attrs.float_or("beta", 1.0).ok()?,
            bias: has(2),
            ..Epilogue::default()
        }),
        OpKind::Linear => Some(Epilogue {
            scale: has(3),
            bias: has(2),
            residual: has(4),
            act: Activation::parse(&node.attrs.string_or("activation", "none".into()).ok()?)?,
            ..Epilogue::default()
        }),
        _ => None,
    }
}

/// The GEMM arguments of contraction `node` for its input shapes (`None` for an absent
/// optional input) and output shape.
pub fn gemm_args(node: &Node, ins: &[Option<&[usize]>], out: &[usize]) -> Result<GemmArgs, String> {
    let get = |i: usize| -> Result<&[usize], String> {
        ins.get(i)
            .copied()
            .flatten()
            .ok_or_else(|| format!("missing input #{i}"))
    };
    let r = out.len();
    if r < 2 && node.op != OpKind::Linear {
        return Err(format!("a GEMM output of rank {r}"));
    }
    // The output's leading index space: every dim but the last (N); the last of them is M
    // for matmul/gemm. Per operand, a stride for each of those dims plus its k and n strides.
    let lead = &out[..r.saturating_sub(1)];
    let n = *out.last().ok_or("a GEMM output of rank 0")? as u64;
    let (k, a_lead, a_k, b_lead, b_k, b_n): (u64, Vec<u64>, u64, Vec<u64>, u64, u64) = match node.op
    {
        OpKind::MatMul => {
            let (a, b) = (get(0)?, get(1)?);
            if a.len() < 2 || b.len() < 2 {
                return Err("matmul with a 1-D operand".into());
            }
            let k = a[a.len() - 1];
            if b[b.len() - 2] != k {
                return Err(format!("matmul {a:?} × {b:?}"));
            }
            let mut ab = out.to_vec();
            ab[r - 1] = k;
            let sa = broadcast_strides(a, &ab)?;
            let mut bb = out.to_vec();
            bb[r - 2] = k;
            let sb = broadcast_strides(b, &bb)?;
            let mut bl = sb[..r - 1].to_vec();
            bl[r - 2] = 0;
            (
                k as u64,
                sa[..r - 1].to_vec(),
                sa[r - 1],
                bl,
                sb[r - 2],
                sb[r - 1],
            )
        }
        OpKind::Gemm => {
            let (a, b) = (get(0)?, get(1)?);
            if a.len() != 2 || b.len() != 2 || r != 2 {
                return Err("gemm operands must be 2-D".into());
            }
            let ta = node.attrs.int_or("transA", 0)? != 0;
            let tb = node.attrs.int_or("transB", 0)? != 0;
            let (k, a_m, a_k) = if ta {
                (a[0], 1, a[1] as u64)
            } else {
                (a[1], a[1] as u64, 1)
            };
            let (kb, b_k, b_n) = if tb {
                (b[1], 1, b[1] as u64)
            } else {
                (b[0], b[1] as u64, 1)
            };
            if k != kb {
                return Err(format!("gemm {a:?} × {b:?}"));
            }
            (k as u64, vec![a_m], a_k, vec![0], b_k, b_n)
        }
        OpKind::Linear => {
            let (x, w) = (get(0)?, get(1)?);
            if w.len() != 2 || x.is_empty() {
                return Err(format!("linear {x:?} × {w:?}"));
            }
            let k = w[0];
            let sx = contiguous(x);
            (
                k as u64,
                sx[..x.len() - 1].to_vec(),
                1,
                vec![0; lead.len()],
                w[1] as u64,
                1,
            )
        }
        op => return Err(format!("no GPU GEMM for `{}`", op.name())),
    };
    let c_lead: Vec<u64> = contiguous(out)[..lead.len()].to_vec();
    // Epilogue operands in parameter order.
    let extra_idx: &[usize] = match node.op {
        OpKind::Gemm => &[2],
        OpKind::Linear => &[3, 2, 4],
        _ => &[],
    };
    let mut extras = vec![];
    for &i in extra_idx {
        if let Some(s) = ins.get(i).copied().flatten() {
            extras.push(broadcast_strides(s, out)?);
        }
    }
    // Merge the leading dims: drop size-1 dims, fuse neighbours whose strides nest for every
    // operand; the last remaining dim is M, the ones before it (at most two) the batch.
    let mut dims: Vec<(u64, Vec<u64>)> = vec![];
    for (d, &size) in lead.iter().enumerate() {
        let mut st = vec![a_lead[d], b_lead[d], c_lead[d]];
        st.extend(extras.iter().map(|e| e[d]));
        dims.push((size as u64, st));
    }
    // Linear/gemm and a 2-D output: a single M dim exists; for an empty lead, M = 1.
    if dims.is_empty() {
        dims.push((1, vec![0; 3 + extras.len()]));
    }
    let m_dim = dims.pop().ok_or("no M dim")?;
    let mut merged: Vec<(u64, Vec<u64>)> = vec![m_dim];
    while let Some((size, st)) = dims.pop() {
        if size == 1 {
            continue;
        }
        let inner = merged.first_mut().ok_or("no M dim")?;
        let nests = st.iter().zip(&inner.1).all(|(&o, &i)| o == i * inner.0);
        if nests {
            inner.0 *= size;
        } else {
            merged.insert(0, (size, st));
        }
    }
    if merged.len() > 3 {
        return Err(format!(
            "batch dims of {out:?} do not merge into two levels for the GPU GEMM"
        ));
    }
    let (m, ms) = merged.pop().ok_or("no M dim")?;
    let (nb1, s1) = merged.pop().unwrap_or((1, vec![0; ms.len()]));
    let (nb0, s0) = merged.pop().unwrap_or((1, vec![0; ms.len()]));
    let batch = nb0 * nb1;
    if batch > MAX_GRID_Z {
        return Err(format!(
            "{batch} GEMM batches exceed the grid's {MAX_GRID_Z}"
        ));
    }
    let op = |i: usize, x: u64, y: u64| [s0[i], s1[i], x, y];
    let extras_out = extras
        .iter()
        .enumerate()
        .map(|(e, st)| op(3 + e, ms[3 + e], st[r - 1]))
        .collect();
    Ok(GemmArgs {
        m,
        n,
        k,
        batch,
        nb1,
        a: op(0, ms[0], a_k),
        b: op(1, b_k, b_n),
        c: op(2, ms[2], 1),
        extras: extras_out,
    })
}

/// One strided copy: the copy domain and both sides' offsets and strides, padded to
/// [`COPY_RANK`] dims.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopyArgs {
    /// Elements copied.
    pub total: u64,
    /// The copy domain.
    pub dims: [u64; COPY_RANK],
    /// Source element offset and strides.
    pub src: (u64, [u64; COPY_RANK]),
    /// Destination element offset and strides.
    pub dst: (u64, [u64; COPY_RANK]),
}

fn pad(v: &[u64], fill: u64) -> Result<[u64; COPY_RANK], String> {
    if v.len() > COPY_RANK {
        return Err(format!(
            "rank {} above the copy kernel's {COPY_RANK}",
            v.len()
        ));
    }
    let mut out = [fill; COPY_RANK];
    out[COPY_RANK - v.len()..].copy_from_slice(v);
    Ok(out)
}

fn copy(dims: &[usize], src: (u64, Vec<u64>), dst: (u64, Vec<u64>)) -> Result<CopyArgs, String> {
    let d: Vec<u64> = dims.iter().map(|&x| x as u64).collect();
    Ok(CopyArgs {
        total: d.iter().product(),
        dims: pad(&d, 1)?,
        src: (src.0, pad(&src.1, 0)?),
        dst: (dst.0, pad(&dst.1, 0)?),
    })
}

/// The launch of one strided copy (a grid-stride loop; at most 2^16 blocks).
pub fn copy_launch(a: &CopyArgs) -> Launch {
    let blocks = a.total.div_ceil(COPY_THREADS as u64).clamp(1, 1 << 16);
    Launch {
        grid: [blocks as u32, 1, 1],
        block: [COPY_THREADS, 1, 1],
        shared: 0,
    }
}

/// Ops the strided copy kernel runs.
pub const COPY_OPS: &[OpKind] = &[OpKind::Transpose, OpKind::Expand, OpKind::Concat];

/// The copies that compute a `transpose`, `expand` or `concat` node: `(input index, copy)`.
pub fn copy_plan(
    node: &Node,
    ins: &[Option<&[usize]>],
    out: &[usize],
) -> Result<Vec<(usize, CopyArgs)>, String> {
    let get = |i: usize| -> Result<&[usize], String> {
        ins.get(i)
            .copied()
            .flatten()
            .ok_or_else(|| format!("missing input #{i}"))
    };
    let dst = contiguous(out);
    match node.op {
        OpKind::Transpose => {
            let x = get(0)?;
            let r = x.len();
            let perm: Vec<usize> = match node.attrs.ints("perm")? {
                Some(p) => p.iter().map(|&i| i as usize).collect(),
                None => (0..r).rev().collect(),
            };
            if perm.len() != r || perm.iter().any(|&p| p >= r) {
                return Err(format!("transpose perm {perm:?} of rank {r}"));
            }
            let xs = contiguous(x);
            let src: Vec<u64> = perm.iter().map(|&p| xs[p]).collect();
            Ok(vec![(0, copy(out, (0, src), (0, dst))?)])
        }
        OpKind::Expand => {
            let src = broadcast_strides(get(0)?, out)?;
            Ok(vec![(0, copy(out, (0, src), (0, dst))?)])
        }
        OpKind::Concat => {
            let r = out.len() as i64;
            let axis = node.attrs.int_or("axis", 0)?;
            let axis = if axis < 0 { axis + r } else { axis };
            if !(0..r).contains(&axis) {
                return Err(format!("concat axis {axis} of rank {r}"));
            }
            let axis = axis as usize;
            let mut at = 0u64;
            let mut copies = vec![];
            for i in 0..node.inputs.len() {
                let x = get(i)?;
                if x.len() != out.len() {
                    return Err(format!("concat input {x:?} into {out:?}"));
                }
                if x.iter().product::<usize>() > 0 {
                    copies.push((
                        i,
                        copy(x, (0, contiguous(x)), (at * dst[axis], dst.clone()))?,
                    ));
                }
                at += x[axis] as u64;
            }
            Ok(copies)
        }
        op => Err(format!("no GPU copy for `{}`", op.name())),
    }
}

/// Where every intermediate value and every weight lives on the device for one set of
/// input shapes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DeviceMemory {
    /// The arena: graph inputs and every value a kernel produces.
    pub arena: MemoryPlan,
    /// Arena byte offset of each value in it.
    pub offsets: HashMap<ValueId, usize>,
    /// Weight blob offsets (plan constants), each [`WEIGHT_ALIGN`]-aligned: (value, offset, bytes).
    pub weights: Vec<(ValueId, usize, usize)>,
    /// The weight blob's size.
    pub weight_bytes: usize,
}

/// Lays out `plan` on the device: weights (the plan's constants) in one blob, graph inputs
/// and kernel outputs in one arena by value liveness (kernel order; graph outputs live to
/// the end). `bytes(v)` gives a value's size for this shape set.
pub fn device_memory(
    plan: &Plan,
    bytes: impl Fn(ValueId) -> Result<usize, String>,
) -> Result<DeviceMemory, String> {
    let g = &plan.graph;
    let mut weights = vec![];
    let mut at = 0usize;
    for (v, t) in &plan.constants {
        let nb = t.len() * t.dtype().size();
        weights.push((*v, at, nb));
        at += nb.div_ceil(WEIGHT_ALIGN) * WEIGHT_ALIGN;
    }
    let last = plan.kernels.len().saturating_sub(1);
    let mut start: HashMap<ValueId, usize> = HashMap::new();
    let mut end: HashMap<ValueId, usize> = HashMap::new();
    let mut order: Vec<ValueId> = vec![];
    for &v in &g.inputs {
        start.insert(v, 0);
        end.insert(v, 0);
        order.push(v);
    }
    for (i, k) in plan.kernels.iter().enumerate() {
        let (reads, writes): (Vec<ValueId>, Vec<ValueId>) = match k {
            Kernel::Loop(l) => (
                l.inputs.iter().map(|x| x.value).collect(),
                l.outputs.iter().map(|o| o.0).collect(),
            ),
            Kernel::Contraction(n) | Kernel::Fallback(n) => (
                g.nodes[*n].inputs.iter().flatten().copied().collect(),
                g.nodes[*n].outputs.clone(),
            ),
        };
        for v in reads {
            if let Some(e) = end.get_mut(&v) {
                *e = (*e).max(i);
            }
        }
        for v in writes {
            start.insert(v, i);
            end.insert(v, i);
            order.push(v);
        }
    }
    for v in &g.outputs {
        if let Some(e) = end.get_mut(v) {
            *e = last.max(*e);
        }
    }
    let mut intervals = vec![];
    for v in order {
        intervals.push(Interval {
            value: v,
            bytes: bytes(v)?,
            start: start[&v],
            end: end[&v],
        });
    }
    let arena = memory::plan(&intervals);
    let offsets = arena
        .values
        .iter()
        .map(|p| (p.interval.value, p.offset))
        .collect();
    Ok(DeviceMemory {
        arena,
        offsets,
        weights,
        weight_bytes: at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::{Attr, Attrs, Tensor, ValueId};
    use rand::{Rng, SeedableRng};

    fn node(op: OpKind, attrs: Attrs, inputs: usize, present: &[bool]) -> Node {
        Node {
            op,
            attrs,
            name: String::new(),
            inputs: (0..inputs)
                .map(|i| {
                    present
                        .get(i)
                        .copied()
                        .unwrap_or(true)
                        .then_some(ValueId(i as u32))
                })
                .collect(),
            outputs: vec![ValueId(99)],
        }
    }

    fn random(shape: &[usize], rng: &mut rand::rngs::StdRng) -> Tensor {
        let n = shape.iter().product();
        Tensor::from_vec(
            shape.to_vec(),
            (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect(),
        )
    }

    /// What the GEMM kernel computes from `args`, on flat host buffers (no activation).
    fn emulate(a: &GemmArgs, ops: &[&[f32]], ep: &Epilogue, out_len: usize) -> Vec<f32> {
        let mut c = vec![f32::NAN; out_len];
        for z in 0..a.batch {
            let (z0, z1) = (z / a.nb1, z % a.nb1);
            let base = |s: &Strides| (z0 * s[0] + z1 * s[1]) as usize;
            for m in 0..a.m {
                for n in 0..a.n {
                    let mut acc = 0.0f32;
                    for k in 0..a.k {
                        let x = ops[0][base(&a.a) + (m * a.a[2] + k * a.a[3]) as usize];
                        let y = ops[1][base(&a.b) + (k * a.b[2] + n * a.b[3]) as usize];
                        acc += x * y;
                    }
                    let mut v = acc * ep.alpha;
                    let mut e = 0;
                    let at = |s: &Strides, e: &mut usize| {
                        *e += 1;
                        ops[2 + *e][base(s) + (m * s[2] + n * s[3]) as usize]
                    };
                    if ep.scale {
                        v *= at(&a.extras[e], &mut e);
                    }
                    if ep.bias {
                        v += ep.beta * at(&a.extras[e], &mut e);
                    }
                    if ep.residual {
                        v += at(&a.extras[e], &mut e);
                    }
                    c[base(&a.c) + (m * a.c[2] + n) as usize] = v;
                }
            }
        }
        c
    }

    fn check(n: &Node, shapes: &[Option<Vec<usize>>], seed: u64) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let ts: Vec<Option<Tensor>> = shapes
            .iter()
            .map(|s| s.as_ref().map(|s| random(s, &mut rng)))
            .collect();
        let refs: Vec<Option<&Tensor>> = ts.iter().map(|t| t.as_ref()).collect();
        let want = kiln_ir::ops::eval(n.op, &n.attrs, &refs).expect("reference")[0].clone();
        let ins: Vec<Option<&[usize]>> = shapes.iter().map(|s| s.as_deref()).collect();
        let args = gemm_args(n, &ins, want.shape()).unwrap_or_else(|e| panic!("{shapes:?}: {e}"));
        let ep = gemm_epilogue(n).expect("a GEMM op");
        // Operand order as the kernel takes them: A, B, then scale, bias, residual.
        let order: &[usize] = match n.op {
            OpKind::Gemm => &[0, 1, 2],
            OpKind::Linear => &[0, 1, 3, 2, 4],
            _ => &[0, 1],
        };
        let bufs: Vec<Vec<f32>> = order
            .iter()
            .filter_map(|&i| ts.get(i).cloned().flatten())
            .map(|t| t.as_slice::<f32>().expect("f32").to_vec())
            .collect();
        let mut refs: Vec<&[f32]> = bufs.iter().map(|b| b.as_slice()).collect();
        refs.insert(2, &[]); // C's slot, unused by `emulate`
        let got = emulate(&args, &refs, &ep, want.len());
        let w = want.as_slice::<f32>().expect("f32");
        for (i, (g, w)) in got.iter().zip(w).enumerate() {
            assert!(
                (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                "{:?} {shapes:?} at {i}: {g} vs {w} ({args:?})",
                n.op
            );
        }
        assert!(args.batch <= MAX_GRID_Z);
    }

    #[test]
    fn gemm_arguments_compute_matmul_with_batches_and_broadcasts() {
        let mm = node(OpKind::MatMul, Attrs::new(), 2, &[]);
        let cases: &[(&[usize], &[usize])] = &[
            (&[5, 7], &[7, 3]),
            (&[2, 5, 7], &[7, 3]),          // batch folds into M
            (&[2, 3, 5, 7], &[2, 3, 7, 4]), // [B,H] batches merge into one level
            (&[2, 3, 5, 7], &[3, 7, 4]),    // B broadcast over the outer batch
            (&[1, 3, 5, 7], &[2, 1, 7, 4]), // both broadcast: two levels
            (&[5, 7], &[4, 7, 2]),          // A broadcast over B's batch
        ];
        for (i, (a, b)) in cases.iter().enumerate() {
            check(&mm, &[Some(a.to_vec()), Some(b.to_vec())], i as u64);
        }
    }

    #[test]
    fn gemm_arguments_compute_gemm_and_linear_epilogues() {
        for (ta, tb) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
            let attrs = Attrs::new()
                .with("transA", Attr::Int(ta))
                .with("transB", Attr::Int(tb))
                .with("alpha", Attr::Float(0.5))
                .with("beta", Attr::Float(2.0));
            let n = node(OpKind::Gemm, attrs, 3, &[]);
            let a = if ta == 1 { vec![7, 5] } else { vec![5, 7] };
            let b = if tb == 1 { vec![3, 7] } else { vec![7, 3] };
            check(&n, &[Some(a.clone()), Some(b.clone()), Some(vec![3])], 10);
            check(&n, &[Some(a), Some(b), Some(vec![5, 1])], 11);
        }
        let lin = node(OpKind::Linear, Attrs::new(), 5, &[]);
        check(
            &lin,
            &[
                Some(vec![2, 4, 6]),
                Some(vec![6, 3]),
                Some(vec![3]),
                Some(vec![2, 4, 1]),
                Some(vec![2, 4, 3]),
            ],
            12,
        );
        let lin = node(
            OpKind::Linear,
            Attrs::new(),
            5,
            &[true, true, true, false, true],
        );
        check(
            &lin,
            &[
                Some(vec![3, 6]),
                Some(vec![6, 5]),
                Some(vec![5]),
                None,
                Some(vec![1, 5]),
            ],
            13,
        );
        // A residual broadcast over the batch cannot fold into M: the batch stays on z.
        check(
            &lin,
            &[
                Some(vec![2, 4, 6]),
                Some(vec![6, 5]),
                Some(vec![5]),
                None,
                Some(vec![4, 5]),
            ],
            14,
        );
    }

    #[test]
    fn loop_launch_covers_every_row_with_whole_warps() {
        for (n, rows, red) in [
            (1, 1, false),
            (16, 1000, false),
            (16, 7, true),
            (768, 128, true),
            (3000, 5, false),
            (64, 3, false),
        ] {
            let l = loop_launch(n, rows, red);
            assert_eq!(l.block[0] % 32, 0, "{n}");
            assert!(l.block[0] <= LOOP_THREADS && l.block[0] * l.block[1] <= LOOP_THREADS);
            assert!(l.block[0] as usize >= n.min(LOOP_THREADS as usize));
            if red {
                assert_eq!(l.block[1], 1, "a reducing block holds one row");
            }
            let covered = l.grid[0] as usize * l.block[1] as usize;
            assert!(
                covered >= rows && covered < rows + l.block[1] as usize,
                "{n} {rows}: {l:?}"
            );
        }
    }

    #[test]
    fn loop_arguments_broadcast_inputs_by_stride() {
        use kiln_ir::Dim;
        use kiln_plan::LoopKernel;
        let mut k = LoopKernel::new(vec![Dim::Fixed(2), Dim::Unknown, Dim::Fixed(4)]);
        let a = k.load(ValueId(0), InnerAccess::Contiguous);
        let b = k.load(ValueId(1), InnerAccess::Contiguous);
        let c = k.load(ValueId(2), InnerAccess::Broadcast);
        let s = k.bin(kiln_plan::BinOp::Add, a, b);
        let y = k.bin(kiln_plan::BinOp::Mul, s, c);
        k.outputs.push((ValueId(3), y));
        let args = LoopArgs::bind(&k, &[&[2, 3, 4], &[4], &[3, 1]]).expect("binds");
        assert_eq!(args.shape, vec![2, 3, 4]);
        assert_eq!((args.n, args.rows), (4, 6));
        assert_eq!(args.strides, vec![vec![12, 4], vec![0, 0], vec![0, 1]]);
        assert!(LoopArgs::bind(&k, &[&[2, 3, 4], &[5], &[3, 1]]).is_err());
        assert!(
            LoopArgs::bind(&k, &[&[3, 3, 4], &[4], &[3, 1]]).is_err(),
            "fixed dim 2"
        );
    }

    #[test]
    fn device_memory_keeps_live_values_apart_and_weights_aligned() {
        use kiln_ir::{DType, Graph, Shape, TensorType};
        let f32s = |d: &[usize]| TensorType::new(DType::F32, Shape::fixed(d));
        let mut g = Graph::new("m");
        let x = g.add_input("x", f32s(&[4, 8]));
        let w = g.add_constant("w", Tensor::from_vec(vec![8, 8], vec![0.5f32; 64]));
        let b = g.add_constant("b", Tensor::from_vec(vec![8], vec![0.1f32; 8]));
        let op = |g: &mut Graph, op, ins: &[ValueId], name: &str| {
            let ins = ins.iter().map(|&v| Some(v)).collect();
            g.add_node(
                op,
                Attrs::new(),
                ins,
                vec![(name.to_string(), f32s(&[4, 8]))],
                "",
            )[0]
        };
        let h = op(&mut g, OpKind::MatMul, &[x, w], "h");
        let h = op(&mut g, OpKind::Relu, &[h], "r");
        let y = op(&mut g, OpKind::MatMul, &[h, w], "y0");
        let y = op(&mut g, OpKind::Add, &[y, b], "y");
        g.outputs.push(y);
        let plan = kiln_plan::partition(&g).expect("plan");
        let mem = device_memory(&plan, |v| {
            Ok(g.ty(v)
                .shape
                .concrete()
                .ok_or("shape")?
                .iter()
                .product::<usize>()
                * 4)
        })
        .expect("memory");
        assert_eq!(mem.weights.len(), 2);
        for &(_, off, nb) in &mem.weights {
            assert_eq!(off % WEIGHT_ALIGN, 0);
            assert!(off + nb <= mem.weight_bytes);
        }
        let vals = &mem.arena.values;
        for (i, p) in vals.iter().enumerate() {
            assert!(p.offset + p.interval.bytes <= mem.arena.arena_bytes);
            for q in &vals[i + 1..] {
                let live = p.interval.start <= q.interval.end && q.interval.start <= p.interval.end;
                let apart = p.offset + p.interval.bytes <= q.offset
                    || q.offset + q.interval.bytes <= p.offset;
                assert!(!live || apart, "{p:?} and {q:?} overlap");
            }
        }
        assert!(mem.offsets.contains_key(&x) && mem.offsets.contains_key(&y));
    }

    /// What the attention kernel computes from `a`, on flat buffers q, k, v (and mask).
    fn emulate_attention(
        a: &AttentionArgs,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        m: Option<&[f32]>,
        causal: bool,
        out_len: usize,
    ) -> Vec<f32> {
        let mut out = vec![f32::NAN; out_len];
        let [qs, ks, vs, os] = a.strides;
        for b in 0..a.b {
            for h in 0..a.hq {
                let kh = h / a.group;
                for i in 0..a.s {
                    let qrow = (b * qs[0] + h * qs[1] + i * qs[2]) as usize;
                    let pos = a.t as i64 - a.s as i64 + i as i64;
                    let mut sc: Vec<f32> = (0..a.t)
                        .map(|j| {
                            let krow = (b * ks[0] + kh * ks[1] + j * ks[2]) as usize;
                            let mut x: f32 =
                                (0..a.d as usize).map(|d| q[qrow + d] * k[krow + d]).sum();
                            x *= a.scale as f32;
                            if let (Some(m), Some(st)) = (m, a.mask) {
                                x += m[(b * st[0] + h * st[1] + i * st[2] + j * st[3]) as usize];
                            }
                            if causal && j as i64 > pos {
                                x = f32::NEG_INFINITY;
                            }
                            x
                        })
                        .collect();
                    let mx = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let shift = if mx.is_finite() { mx } else { 0.0 };
                    sc.iter_mut().for_each(|x| *x = (*x - shift).exp());
                    let sum: f32 = sc.iter().sum();
                    let orow = (b * os[0] + h * os[1] + i * os[2]) as usize;
                    for d in 0..a.dv {
                        let o: f32 = (0..a.t)
                            .map(|j| {
                                sc[j as usize]
                                    * v[(b * vs[0] + kh * vs[1] + j * vs[2] + d) as usize]
                            })
                            .sum();
                        out[orow + d as usize] = o / sum;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn attention_arguments_compute_attention_in_both_layouts_with_gqa_masks_and_causality() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for (layout, causal, mask) in [
            ("bhsd", false, false),
            ("bhsd", true, true),
            ("bshd", true, false),
            ("bshd", false, true),
        ] {
            let (b, hq, hkv, s, t, d) = (2, 4, 2, 3, 5, 8);
            let shape = |h: usize, rows: usize| -> Vec<usize> {
                if layout == "bshd" {
                    vec![b, rows, h, d]
                } else {
                    vec![b, h, rows, d]
                }
            };
            let q = random(&shape(hq, s), &mut rng);
            let k = random(&shape(hkv, t), &mut rng);
            let v = random(&shape(hkv, t), &mut rng);
            let m = random(&[1, hq, 1, t], &mut rng);
            let attrs = Attrs::new()
                .with("layout", Attr::Str(layout.into()))
                .with("causal", Attr::Int(causal as i64));
            let n = node(OpKind::Attention, attrs, if mask { 4 } else { 3 }, &[]);
            let mut ins = vec![Some(&q), Some(&k), Some(&v)];
            if mask {
                ins.push(Some(&m));
            }
            let want = kiln_ir::ops::eval(n.op, &n.attrs, &ins).expect("reference")[0].clone();
            let shapes: Vec<Option<&[usize]>> = ins.iter().map(|t| t.map(|t| t.shape())).collect();
            let a = attention_args(&n, &shapes).expect("args");
            assert_eq!(attention_variant(&n, true), Some((causal, mask)));
            let f = |t: &Tensor| t.as_slice::<f32>().expect("f32").to_vec();
            let got = emulate_attention(
                &a,
                &f(&q),
                &f(&k),
                &f(&v),
                mask.then(|| f(&m)).as_deref(),
                causal,
                want.len(),
            );
            for (i, (g, w)) in got.iter().zip(f(&want)).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                    "{layout} causal={causal} mask={mask} at {i}: {g} vs {w}"
                );
            }
            let l = attention_launch(&a);
            assert_eq!(
                (l.grid, l.shared),
                ([s as u32, hq as u32, b as u32], 4 * t as u32)
            );
        }
    }

    fn emulate_copies(copies: &[(usize, CopyArgs)], srcs: &[Vec<f32>], out_len: usize) -> Vec<f32> {
        let mut out = vec![f32::NAN; out_len];
        for (i, c) in copies {
            for idx in 0..c.total {
                let (mut so, mut d, mut rest) = (c.src.0, c.dst.0, idx);
                for k in (0..COPY_RANK).rev() {
                    let ik = rest % c.dims[k];
                    rest /= c.dims[k];
                    so += ik * c.src.1[k];
                    d += ik * c.dst.1[k];
                }
                out[d as usize] = srcs[*i][so as usize];
            }
        }
        out
    }

    #[test]
    fn copy_plans_compute_transpose_expand_and_concat() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        // (op, attributes, input shapes, expand's target shape)
        type Case = (OpKind, Attrs, Vec<Vec<usize>>, Option<Vec<i64>>);
        let cases: Vec<Case> = vec![
            (
                OpKind::Transpose,
                Attrs::new().with("perm", Attr::Ints(vec![0, 2, 1, 3])),
                vec![vec![2, 3, 4, 5]],
                None,
            ),
            (OpKind::Transpose, Attrs::new(), vec![vec![3, 4, 5]], None),
            (
                OpKind::Expand,
                Attrs::new(),
                vec![vec![3, 1, 5]],
                Some(vec![2, 3, 4, 5]),
            ),
            (
                OpKind::Concat,
                Attrs::new().with("axis", Attr::Int(-2)),
                vec![vec![2, 3, 4], vec![2, 1, 4], vec![2, 0, 4]],
                None,
            ),
            (
                OpKind::Concat,
                Attrs::new().with("axis", Attr::Int(0)),
                vec![vec![1, 3], vec![2, 3]],
                None,
            ),
        ];
        for (op, attrs, shapes, expand_to) in cases {
            let ts: Vec<Tensor> = shapes.iter().map(|s| random(s, &mut rng)).collect();
            let shape_t = expand_to.map(|v| Tensor::from_vec(vec![v.len()], v));
            let mut refs: Vec<Option<&Tensor>> = ts.iter().map(Some).collect();
            if let Some(t) = &shape_t {
                refs.push(Some(t));
            }
            let n = node(op, attrs, refs.len(), &[]);
            let want = kiln_ir::ops::eval(op, &n.attrs, &refs).expect("reference")[0].clone();
            let ins: Vec<Option<&[usize]>> = refs.iter().map(|t| t.map(|t| t.shape())).collect();
            let copies =
                copy_plan(&n, &ins, want.shape()).unwrap_or_else(|e| panic!("{op:?}: {e}"));
            let srcs: Vec<Vec<f32>> = ts
                .iter()
                .map(|t| t.as_slice::<f32>().expect("f32").to_vec())
                .collect();
            let got = emulate_copies(&copies, &srcs, want.len());
            assert_eq!(
                got,
                want.as_slice::<f32>().expect("f32"),
                "{op:?} {shapes:?}"
            );
            for (_, c) in &copies {
                let l = copy_launch(c);
                assert!(l.grid[0] as u64 * COPY_THREADS as u64 >= c.total.min(1 << 24));
            }
        }
    }
}
