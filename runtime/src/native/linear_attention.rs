//! The CPU kernel of `linear_attention` (f32): linear attention and retention in their
//! recurrent, chunked form, O(n·d·dv) per head instead of the exported graph's O(n²·d).
//!
//! Per head (heads spread over the pool), with `C` the op's `chunk` (0, or a sequence no
//! longer than it: one block, the parallel form):
//!
//! - causal: for each block of rows `t0..t1`, row `i` gets the intra-block part
//!   `Σ_{t0≤j≤i} γ^(i−j) (q_i·k_j) v_j` plus `γ^(i−t0+1) q_i·S`, where the state
//!   `S = Σ_{j<t0} γ^(t0−1−j) k_jᵀ v_j` (`d × dv`) and the normaliser `z` (the same sum of
//!   `k_j`) are then advanced over the block: `S ← γ^L S + Σ_j γ^(t1−1−j) k_jᵀ v_j`. Every
//!   decay factor is a power `γ^m` with `0 ≤ m ≤ C`, from a table of `exp(m · log γ)` in
//!   f64: nothing is ever `exp` of a positive number, so no length overflows;
//! - non-causal: `S = Σ_j k_jᵀ v_j` and `z = Σ_j k_j` once, then `y_i = q_i·S` per row.
//!
//! Non-finite inputs give what the quadratic graph gives: its masked weights are exact
//! zeros that still multiply the masked scores and values, so a non-finite `k_j` (or `q_i`)
//! makes every earlier row `NaN` and a non-finite `v_j[c]` column `c` of every earlier row
//! (`Inf · 0`). The recurrence never sees those products; [`poison`] applies them after.
//!
//! The loops are plain slices that LLVM vectorises; [`run`] instantiates them for
//! AVX-512 and AVX2+FMA when the CPU has them (fused multiply-adds), else portable.

use crate::pool::{Pool, SharedMut};
#[cfg(test)]
use kiln_ir::OpKind;
use kiln_ir::Tensor;

/// The checked attributes and shapes of one call.
#[derive(Clone, Copy, Debug)]
struct Spec {
    s: usize,
    d: usize,
    dv: usize,
    causal: bool,
    normalize: bool,
    eps: f32,
    chunk: usize,
}

/// `linear_attention(q, k, v, log_decay?)` for f32 tensors, written into `out` when it
/// holds a region for the result; `None` (the interpreter then runs it and reports what
/// is wrong) for other dtypes or inconsistent shapes.
pub fn run(
    attrs: &kiln_ir::Attrs,
    ins: &[Option<&Tensor>],
    pool: &Pool,
    out: &mut crate::executor::arena::Outputs,
) -> Option<Tensor> {
    let a = kiln_ir::ops::linear_attention::LinearAttentionAttrs::of(attrs).ok()?;
    let (q, k, v) = ((*ins.first()?)?, (*ins.get(1)?)?, (*ins.get(2)?)?);
    let (qs, ks, vs) = (
        q.as_slice::<f32>()?,
        k.as_slice::<f32>()?,
        v.as_slice::<f32>()?,
    );
    let [b, h, s, d] = <[usize; 4]>::try_from(q.shape()).ok()?;
    let dv = *v.shape().last()?;
    if k.shape() != q.shape() || v.shape() != [b, h, s, dv] {
        return None;
    }
    let log_decay: Option<Vec<f64>> = match ins.get(3).copied().flatten() {
        None => None,
        Some(t) if a.causal && t.shape() == [h] => {
            Some(t.as_slice::<f32>()?.iter().map(|&x| f64::from(x)).collect())
        }
        Some(_) => return None,
    };
    let spec = Spec {
        s,
        d,
        dv,
        causal: a.causal,
        normalize: a.normalize,
        eps: a.epsilon as f32,
        chunk: a.chunk,
    };
    let n = b * h * s * dv;
    let mut region = out.region::<f32>(0, n);
    let mut owned: Vec<f32> = vec![];
    let dst: &mut [f32] = match region.as_mut() {
        Some(r) => &mut r[..n],
        None => {
            owned = vec![0.0; n];
            &mut owned
        }
    };
    let ptr = SharedMut::new(dst.as_mut_ptr());
    let isa = Isa::detect();
    let one = |bh: usize| {
        let lg = log_decay.as_ref().map(|l| l[bh % h]);
        let (qh, kh) = (&qs[bh * s * d..][..s * d], &ks[bh * s * d..][..s * d]);
        let vh = &vs[bh * s * dv..][..s * dv];
        // SAFETY: head `bh` writes only its own `s · dv` slice of the output.
        let yh = unsafe { std::slice::from_raw_parts_mut(ptr.get().add(bh * s * dv), s * dv) };
        isa.head(&spec, lg, qh, kh, vh, yh);
        poison(&spec, qh, kh, vh, yh);
    };
    if pool.threads() > 1 && b * h > 1 {
        pool.parallel_for(b * h, one);
    } else {
        (0..b * h).for_each(one);
    }
    let shape = vec![b, h, s, dv];
    Some(match region {
        Some(r) => Tensor::from_buf(shape, r),
        None => Tensor::from_vec(shape, owned),
    })
}

/// The instruction sets the loops are compiled for.
#[derive(Clone, Copy, Debug)]
enum Isa {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

impl Isa {
    fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("fma") {
                return Isa::Avx512;
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }

    fn head(self, sp: &Spec, lg: Option<f64>, q: &[f32], k: &[f32], v: &[f32], y: &mut [f32]) {
        match self {
            // SAFETY: the features were detected at run time.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { head_avx512(sp, lg, q, k, v, y) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { head_avx2(sp, lg, q, k, v, y) },
            Isa::Portable => head::<false>(sp, lg, q, k, v, y),
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn head_avx512(sp: &Spec, lg: Option<f64>, q: &[f32], k: &[f32], v: &[f32], y: &mut [f32]) {
    head::<true>(sp, lg, q, k, v, y)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn head_avx2(sp: &Spec, lg: Option<f64>, q: &[f32], k: &[f32], v: &[f32], y: &mut [f32]) {
    head::<true>(sp, lg, q, k, v, y)
}

/// `acc += a · x`, element by element (fused where the target has FMA).
#[inline(always)]
fn axpy<const FMA: bool>(acc: &mut [f32], a: f32, x: &[f32]) {
    for (o, &xv) in acc.iter_mut().zip(x) {
        *o = if FMA { a.mul_add(xv, *o) } else { *o + a * xv };
    }
}

/// One head: `q`, `k` `[s, d]`, `v` `[s, dv]` into `y` `[s, dv]`.
#[inline(always)]
fn head<const FMA: bool>(
    sp: &Spec,
    lg: Option<f64>,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    y: &mut [f32],
) {
    let Spec { s, d, dv, .. } = *sp;
    let mut state = vec![0.0f32; d * dv];
    let mut z = vec![0.0f32; d];
    let finish = |row: &mut [f32], den: f32| {
        if sp.normalize {
            let r = den + sp.eps;
            row.iter_mut().for_each(|x| *x /= r);
        }
    };
    if !sp.causal {
        for j in 0..s {
            let (kj, vj) = (&k[j * d..][..d], &v[j * dv..][..dv]);
            for x in 0..d {
                axpy::<FMA>(&mut state[x * dv..][..dv], kj[x], vj);
            }
            axpy::<FMA>(&mut z, 1.0, kj);
        }
        for i in 0..s {
            let qi = &q[i * d..][..d];
            let row = &mut y[i * dv..][..dv];
            row.fill(0.0);
            let mut den = 0.0f32;
            for x in 0..d {
                axpy::<FMA>(row, qi[x], &state[x * dv..][..dv]);
                den += qi[x] * z[x];
            }
            finish(row, den);
        }
        return;
    }
    let c = if sp.chunk == 0 || sp.chunk >= s {
        s.max(1)
    } else {
        sp.chunk
    };
    // γ^m for m = 0..=c, in f64 then rounded: powers of γ ≤ 1 only.
    let pow: Vec<f32> = (0..=c)
        .map(|m| lg.map_or(1.0, |l| (m as f64 * l).exp() as f32))
        .collect();
    // kᵀ of the block, [d, c]: the scores of a row are axpys over it.
    let mut kt = vec![0.0f32; d * c];
    let mut sc = vec![0.0f32; c];
    let mut inter = vec![0.0f32; dv];
    let mut t0 = 0;
    while t0 < s {
        let len = c.min(s - t0);
        for jj in 0..len {
            for x in 0..d {
                kt[x * c + jj] = k[(t0 + jj) * d + x];
            }
        }
        for ii in 0..len {
            let i = t0 + ii;
            let qi = &q[i * d..][..d];
            let scores = &mut sc[..=ii];
            scores.fill(0.0);
            for x in 0..d {
                axpy::<FMA>(scores, qi[x], &kt[x * c..][..=ii]);
            }
            if lg.is_some() {
                for (jj, sj) in scores.iter_mut().enumerate() {
                    *sj *= pow[ii - jj];
                }
            }
            let row = &mut y[i * dv..][..dv];
            row.fill(0.0);
            let mut den = 0.0f32;
            for (jj, &sj) in scores.iter().enumerate() {
                axpy::<FMA>(row, sj, &v[(t0 + jj) * dv..][..dv]);
                den += sj;
            }
            if t0 > 0 {
                inter.fill(0.0);
                let mut zq = 0.0f32;
                for x in 0..d {
                    axpy::<FMA>(&mut inter, qi[x], &state[x * dv..][..dv]);
                    zq += qi[x] * z[x];
                }
                let g = pow[ii + 1];
                axpy::<FMA>(row, g, &inter);
                den += g * zq;
            }
            finish(row, den);
        }
        // Advance the state over the block.
        if lg.is_some() {
            let g = pow[len];
            state.iter_mut().for_each(|x| *x *= g);
            z.iter_mut().for_each(|x| *x *= g);
        }
        for jj in 0..len {
            let w = pow[len - 1 - jj];
            let (kj, vj) = (&k[(t0 + jj) * d..][..d], &v[(t0 + jj) * dv..][..dv]);
            for x in 0..d {
                axpy::<FMA>(&mut state[x * dv..][..dv], w * kj[x], vj);
            }
            axpy::<FMA>(&mut z, w, kj);
        }
        t0 += len;
    }
}

/// The `NaN`s of the quadratic graph's masked products (see the module docs), for a
/// causal head: row `i` is `NaN` when a later `k_j` is non-finite, or when `q_i` is and a
/// later key exists; column `c` of row `i` is `NaN` when a later `v_j[c]` is non-finite.
/// One scan of the inputs when they are all finite.
fn poison(sp: &Spec, q: &[f32], k: &[f32], v: &[f32], y: &mut [f32]) {
    let Spec { s, d, dv, .. } = *sp;
    if !sp.causal
        || (q.iter().all(|x| x.is_finite())
            && k.iter().all(|x| x.is_finite())
            && v.iter().all(|x| x.is_finite()))
    {
        return;
    }
    // Walk rows from the last: what lies after row i is known when we reach it.
    let mut k_after = false;
    let mut v_after = vec![false; dv];
    for i in (0..s).rev() {
        let row = &mut y[i * dv..][..dv];
        let later = i + 1 < s;
        let q_bad = q[i * d..][..d].iter().any(|x| !x.is_finite());
        if k_after || (q_bad && later) {
            row.fill(f32::NAN);
        } else {
            for (o, &bad) in row.iter_mut().zip(&v_after) {
                if bad {
                    *o = f32::NAN;
                }
            }
        }
        k_after |= k[i * d..][..d].iter().any(|x| !x.is_finite());
        for (b, x) in v_after.iter_mut().zip(&v[i * dv..][..dv]) {
            *b |= !x.is_finite();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::{Attr, Attrs};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// Relative tolerance (to the largest magnitude of the reference output) between the
    /// f32 chunked kernel and the f64 quadratic reference.
    const LINATTN_RTOL: f64 = 2e-4;

    fn rand_t(rng: &mut StdRng, shape: &[usize], positive: bool) -> Tensor {
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                let x: f32 = rng.gen_range(-1.0..1.0);
                if positive {
                    x + 1.05
                } else {
                    x
                }
            })
            .collect();
        Tensor::from_vec(shape.to_vec(), v)
    }

    fn check(attrs: &Attrs, ins: &[Option<&Tensor>], threads: usize, what: &str) {
        let pool = Pool::new(threads).unwrap();
        let got = run(
            attrs,
            ins,
            &pool,
            &mut crate::executor::arena::Outputs::none(),
        )
        .expect("fast path");
        let want = kiln_ir::ops::eval(OpKind::LinearAttention, attrs, ins)
            .unwrap()
            .remove(0);
        assert_eq!(got.shape(), want.shape(), "{what}");
        let (g, w) = (got.to_f64s(), want.to_f64s());
        let scale = w
            .iter()
            .filter(|x| x.is_finite())
            .fold(1e-6f64, |m, x| m.max(x.abs()));
        for (e, (a, b)) in g.iter().zip(&w).enumerate() {
            if b.is_finite() {
                assert!(
                    (a - b).abs() <= LINATTN_RTOL * scale,
                    "{what}: element {e}: {a} vs {b}"
                );
            } else {
                assert!(!a.is_finite(), "{what}: element {e}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn chunked_kernel_matches_the_quadratic_reference() {
        let mut rng = StdRng::seed_from_u64(17);
        for &(b, h, s, d, dv, chunk) in &[
            (1, 1, 1, 4, 4, 16),
            (3, 2, 7, 5, 3, 4),
            (1, 3, 65, 8, 8, 16),
            (3, 2, 65, 16, 16, 0),
            (1, 2, 200, 16, 8, 32),
            (2, 1, 33, 3, 7, 1),
        ] {
            let q = rand_t(&mut rng, &[b, h, s, d], true);
            let k = rand_t(&mut rng, &[b, h, s, d], true);
            let v = rand_t(&mut rng, &[b, h, s, dv], false);
            let ld = Tensor::from_vec(
                vec![h],
                (0..h).map(|x| -0.5 / (x + 1) as f32).collect::<Vec<f32>>(),
            );
            for (causal, norm, decay) in [
                (1, 1, false),
                (1, 0, false),
                (0, 1, false),
                (0, 0, false),
                (1, 0, true),
                (1, 1, true),
            ] {
                let attrs = Attrs::new()
                    .with("causal", Attr::Int(causal))
                    .with("normalize", Attr::Int(norm))
                    .with("epsilon", Attr::Float(1e-6))
                    .with("chunk", Attr::Int(chunk));
                let mut ins = vec![Some(&q), Some(&k), Some(&v)];
                if decay {
                    ins.push(Some(&ld));
                }
                for threads in [1, 2] {
                    let what =
                        format!("[{b},{h},{s},{d}]x{dv} chunk {chunk} causal {causal} norm {norm} decay {decay} t{threads}");
                    check(&attrs, &ins, threads, &what);
                }
            }
        }
    }

    #[test]
    fn non_finite_inputs_propagate_as_in_the_quadratic_form() {
        let mut rng = StdRng::seed_from_u64(5);
        let (b, h, s, d) = (1, 2, 23, 4);
        for case in 0..24 {
            let mut t = [
                rand_t(&mut rng, &[b, h, s, d], true),
                rand_t(&mut rng, &[b, h, s, d], true),
                rand_t(&mut rng, &[b, h, s, d], false),
            ];
            let which = case % 3;
            let mut vals = t[which].as_slice::<f32>().unwrap().to_vec();
            let at = rng.gen_range(0..vals.len());
            vals[at] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][case / 3 % 3];
            t[which] = Tensor::from_vec(vec![b, h, s, d], vals);
            let ld = Tensor::from_vec(vec![h], vec![-0.1f32, -0.01]);
            for (causal, norm, decay) in [(1, 1, false), (0, 1, false), (1, 0, true)] {
                let attrs = Attrs::new()
                    .with("causal", Attr::Int(causal))
                    .with("normalize", Attr::Int(norm))
                    .with("epsilon", Attr::Float(1e-6))
                    .with("chunk", Attr::Int(8));
                let mut ins = vec![Some(&t[0]), Some(&t[1]), Some(&t[2])];
                if decay {
                    ins.push(Some(&ld));
                }
                check(
                    &attrs,
                    &ins,
                    1,
                    &format!("case {case} input {which} causal {causal}"),
                );
            }
        }
    }

    #[test]
    fn retention_stays_finite_where_the_exported_decay_overflows() {
        // exp((i − j) · log γ) above the diagonal overflows f32 once (j − i)·|log γ| > 88.7:
        // at γ = 0.9 that is 842 positions. The kernel only forms powers γ^m, m ≥ 0.
        let (s, d) = (2048, 4);
        let mut rng = StdRng::seed_from_u64(3);
        let q = rand_t(&mut rng, &[1, 1, s, d], true);
        let k = rand_t(&mut rng, &[1, 1, s, d], true);
        let v = rand_t(&mut rng, &[1, 1, s, d], false);
        let lg = 0.9f32.ln();
        assert!(
            ((s - 1) as f32 * -lg).exp().is_infinite(),
            "the naive form overflows"
        );
        let ld = Tensor::from_vec(vec![1], vec![lg]);
        let attrs = Attrs::new().with("chunk", Attr::Int(64));
        let pool = Pool::single();
        let y = run(
            &attrs,
            &[Some(&q), Some(&k), Some(&v), Some(&ld)],
            &pool,
            &mut crate::executor::arena::Outputs::none(),
        )
        .unwrap();
        assert!(y.to_f64s().iter().all(|x| x.is_finite()));
        // The last row against its direct sum (f64), which only needs j near i.
        let (qv, kv, vv) = (q.to_f64s(), k.to_f64s(), v.to_f64s());
        let i = s - 1;
        for c in 0..d {
            let want: f64 = (0..=i)
                .map(|j| {
                    let sc: f64 = (0..d).map(|x| qv[i * d + x] * kv[j * d + x]).sum();
                    sc * ((i - j) as f64 * f64::from(lg)).exp() * vv[j * d + c]
                })
                .sum();
            let got = y.to_f64s()[i * d + c];
            assert!(
                (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                "{got} vs {want}"
            );
        }
    }
}
