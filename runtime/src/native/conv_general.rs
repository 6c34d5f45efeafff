//! Convolution of any geometry in f32 (1-D to 3-D and up, groups, depthwise, padding,
//! strides, dilations, auto_pad), for the convs the patch-embedding routine (`conv.rs`) does
//! not take: a causal depthwise conv1d (Mamba), a padded 3×3 (convnets). The input positions
//! each kernel offset reads are precomputed as runs (consecutive outputs reading consecutive
//! inputs; padding skipped), so the inner loops are plain slices. Groups of one input channel
//! and one output channel (depthwise) accumulate directly; others gather the runs into an
//! im2col block per group and multiply by the weight with the GEMM. Geometry comes from the
//! interpreter's own helper (`kiln_ir::ops::linalg::conv_geometry`); anything it rejects,
//! and other dtypes, return `None` so the interpreter runs the node and reports the error.

use super::gemm::{gemm_in, Epilogue, GemmConfig, Isa, MatMut, MatRef, Rhs};
use crate::pool::Pool;
use kiln_ir::{Node, OpKind, Tensor};

/// A run of `len` outputs from `out` reading inputs from `src` on (consecutive both ways).
#[derive(Clone, Copy, Debug)]
struct Run {
    out: usize,
    src: usize,
    len: usize,
}

/// The output of a `conv` node, or `None` where the interpreter runs it.
pub fn run(node: &Node, ins: &[Option<&Tensor>], pool: &Pool) -> Option<Tensor> {
    if node.op != OpKind::Conv {
        return None;
    }
    let x = (*ins.first()?)?;
    let w = (*ins.get(1)?)?;
    let (xv, wv) = (x.as_slice::<f32>()?, w.as_slice::<f32>()?);
    let bias = match ins.get(2).copied().flatten() {
        Some(b) => Some(b.as_slice::<f32>().filter(|b| b.len() == w.shape()[0])?),
        None => None,
    };
    let geo = kiln_ir::ops::linalg::conv_geometry(&node.attrs, x.shape(), w.shape()).ok()?;
    let (n, c) = (x.shape()[0], x.shape()[1]);
    let (m, cg) = (w.shape()[0], w.shape()[1]);
    let spatial = &x.shape()[2..];
    let in_sp: usize = spatial.iter().product();
    let p: usize = geo.out.iter().product();
    let ksize: usize = geo.kernel.iter().product();
    let mut out_shape = vec![n, m];
    out_shape.extend_from_slice(&geo.out);
    let total = n.checked_mul(m)?.checked_mul(p)?;
    let mg = m / geo.group;
    let runs = runs(&geo, spatial);
    let mut y = vec![0f32; total];
    if p > 0 {
        if cg == 1 && mg == 1 {
            depthwise(xv, wv, &runs, (n, c, in_sp, ksize, p), &mut y);
        } else {
            grouped(
                pool,
                xv,
                wv,
                &runs,
                &geo,
                (n, c, m, cg, ksize, in_sp, p),
                &mut y,
            )?;
        }
        if let Some(b) = bias {
            for (i, row) in y.chunks_exact_mut(p).enumerate() {
                let bc = b[i % m];
                row.iter_mut().for_each(|v| *v += bc);
            }
        }
    }
    Some(Tensor::from_vec(out_shape, y))
}

/// Per kernel offset (row-major over the kernel), the runs of output positions it reads.
fn runs(geo: &kiln_ir::ops::linalg::ConvGeometry, spatial: &[usize]) -> Vec<Vec<Run>> {
    let nsp = spatial.len();
    let in_st = kiln_ir::tensor::strides(spatial);
    let p: usize = geo.out.iter().product();
    let ksize: usize = geo.kernel.iter().product();
    let mut all = Vec::with_capacity(ksize);
    let mut k = vec![0usize; nsp];
    for _ in 0..ksize {
        let mut rs: Vec<Run> = vec![];
        let mut o = vec![0usize; nsp];
        for oi in 0..p {
            let mut off = Some(0usize);
            for i in 0..nsp {
                let pos = (o[i] * geo.strides[i] + k[i] * geo.dilations[i]) as i64
                    - geo.pads_begin[i] as i64;
                off = match off {
                    Some(a) if (0..spatial[i] as i64).contains(&pos) => {
                        Some(a + pos as usize * in_st[i])
                    }
                    _ => None,
                };
            }
            if let Some(s) = off {
                match rs.last_mut() {
                    Some(r) if r.out + r.len == oi && r.src + r.len == s => r.len += 1,
                    _ => rs.push(Run {
                        out: oi,
                        src: s,
                        len: 1,
                    }),
                }
            }
            for d in (0..nsp).rev() {
                o[d] += 1;
                if o[d] < geo.out[d] {
                    break;
                }
                o[d] = 0;
            }
        }
        all.push(rs);
        for d in (0..nsp).rev() {
            k[d] += 1;
            if k[d] < geo.kernel[d] {
                break;
            }
            k[d] = 0;
        }
    }
    all
}

/// One input and one output channel per group: `y[n, ch] += w[ch, k]·x[n, ch, shifted]`.
fn depthwise(
    xv: &[f32],
    wv: &[f32],
    runs: &[Vec<Run>],
    (n, c, in_sp, ksize, p): (usize, usize, usize, usize, usize),
    y: &mut [f32],
) {
    for (row, yr) in y.chunks_exact_mut(p).enumerate().take(n * c) {
        let ch = row % c;
        let xr = &xv[row * in_sp..(row + 1) * in_sp];
        for (k, rs) in runs.iter().enumerate().take(ksize) {
            let wk = wv[ch * ksize + k];
            for r in rs {
                let (d, s) = (&mut yr[r.out..r.out + r.len], &xr[r.src..r.src + r.len]);
                for (a, &b) in d.iter_mut().zip(s) {
                    *a += wk * b;
                }
            }
        }
    }
}

/// Per (image, group): the im2col block `cols[cg·ksize, p]` from the runs, then
/// `y_g[mg, p] = W_g[mg, cg·ksize] · cols` on the GEMM.
#[allow(clippy::too_many_arguments)]
fn grouped(
    pool: &Pool,
    xv: &[f32],
    wv: &[f32],
    runs: &[Vec<Run>],
    geo: &kiln_ir::ops::linalg::ConvGeometry,
    (n, c, m, cg, ksize, in_sp, p): (usize, usize, usize, usize, usize, usize, usize),
    y: &mut [f32],
) -> Option<()> {
    let mg = m / geo.group;
    let ckk = cg * ksize;
    let mut cols = vec![0f32; ckk * p];
    let cfg = GemmConfig {
        threads: pool.threads(),
        isa: Isa::Auto,
    };
    for ni in 0..n {
        for g in 0..geo.group {
            cols.fill(0.0);
            for ci in 0..cg {
                let xc = &xv[(ni * c + g * cg + ci) * in_sp..][..in_sp];
                for (k, rs) in runs.iter().enumerate() {
                    let row = &mut cols[(ci * ksize + k) * p..][..p];
                    for r in rs {
                        row[r.out..r.out + r.len].copy_from_slice(&xc[r.src..r.src + r.len]);
                    }
                }
            }
            let a = MatRef::row_major(&wv[g * mg * ckk..][..mg * ckk], mg, ckk).ok()?;
            let b = MatRef::row_major(&cols, ckk, p).ok()?;
            let yg = &mut y[(ni * m + g * mg) * p..][..mg * p];
            let cm = MatMut::row_major(yg, mg, p).ok()?;
            gemm_in(pool, a, Rhs::Plain(b), cm, &Epilogue::default(), &cfg).ok()?;
        }
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::{Attr, Attrs, ValueId};
    use kiln_reference::{compare, Tolerance};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// f32 sums of up to a few hundred products against the interpreter's.
    const TOL: Tolerance = Tolerance::ScaledByMax {
        rel: 1e-5,
        abs: 1e-6,
    };

    fn rand_t(rng: &mut StdRng, shape: Vec<usize>) -> Tensor {
        let n: usize = shape.iter().product();
        Tensor::from_vec(
            shape,
            (0..n)
                .map(|_| rng.gen_range(-1.0f32..1.0))
                .collect::<Vec<f32>>(),
        )
    }

    #[test]
    fn convs_of_any_geometry_match_the_interpreter() {
        let mut rng = StdRng::seed_from_u64(21);
        let mut native = 0;
        for case in 0..300 {
            let nsp = rng.gen_range(1..=3);
            let group = [1, 1, 2, 3][rng.gen_range(0..4)];
            let depthwise = case % 4 == 0;
            let cg = if depthwise { 1 } else { rng.gen_range(1..4) };
            let c = cg * group;
            let m = if depthwise {
                c
            } else {
                group * rng.gen_range(1..4)
            };
            let kernel: Vec<usize> = (0..nsp).map(|_| rng.gen_range(1..4)).collect();
            let spatial: Vec<usize> = (0..nsp).map(|_| rng.gen_range(1..7)).collect();
            let mut attrs = Attrs::new().with("group", Attr::Int(group as i64));
            match case % 3 {
                0 => {
                    let pads: Vec<i64> = (0..2 * nsp).map(|_| rng.gen_range(0..4)).collect();
                    let strides: Vec<i64> = (0..nsp).map(|_| rng.gen_range(1..3)).collect();
                    let dil: Vec<i64> = (0..nsp).map(|_| rng.gen_range(1..3)).collect();
                    attrs = attrs
                        .with("pads", Attr::Ints(pads))
                        .with("strides", Attr::Ints(strides))
                        .with("dilations", Attr::Ints(dil));
                }
                1 => attrs = attrs.with("auto_pad", Attr::Str("SAME_UPPER".into())),
                _ => {}
            }
            let n = rng.gen_range(1..3);
            let mut xs = vec![n, c];
            xs.extend(&spatial);
            let mut ws = vec![m, cg];
            ws.extend(&kernel);
            let x = rand_t(&mut rng, xs);
            let w = rand_t(&mut rng, ws);
            let b = rand_t(&mut rng, vec![m]);
            let nd = Node {
                op: OpKind::Conv,
                attrs,
                inputs: (0..3).map(|i| Some(ValueId(i))).collect(),
                outputs: vec![ValueId(3)],
                name: String::new(),
            };
            let with_bias = case % 2 == 0;
            let ins = [Some(&x), Some(&w), if with_bias { Some(&b) } else { None }];
            let want = kiln_ir::ops::eval(nd.op, &nd.attrs, &ins);
            let got = run(&nd, &ins, &Pool::single());
            match (got, want) {
                (Some(g), Ok(wv)) => {
                    let r = compare(&g, &wv[0], TOL);
                    assert!(r.ok, "case {case} {:?}: {r:?}", nd.attrs);
                    native += 1;
                }
                (None, Err(_)) => {}
                (g, w) => panic!("case {case}: native {g:?}, interpreter {w:?}"),
            }
        }
        assert!(native > 200, "{native}");
    }
}
