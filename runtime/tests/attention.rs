//! The fused attention kernel (`native::attention`) on every instruction set this CPU has
//! (AVX-512, AVX2, portable, forced one at a time) against the interpreter: causal with a kv
//! cache, bool and float masks, grouped heads, all-masked rows, NaN/Inf in q, k and v (also
//! where causal hides them), sizes off every tile (S, T, D, Dv not multiples of 4/8/16, 1),
//! head-major and sequence-major (`layout = "bshd"`) tensors, and bit-identical output for
//! 1, 2 and 5 threads.

use kiln_ir::{Attr, Attrs, OpKind, Tensor};
use kiln_reference::{compare, Tolerance};
use kiln_runtime::native::attention::{attention_with, Attention, Isa, Mask};
use kiln_runtime::pool::Pool;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// f32 kernel against the f64 interpreter: error relative to the output's scale (the same
/// bound as the contraction tests').
const ATTENTION_TOLERANCE: Tolerance = Tolerance::ScaledByMax {
    rel: 2e-5,
    abs: 1e-6,
};

/// The instruction sets to test: every one this CPU can run.
fn isas() -> Vec<Isa> {
    [Isa::Avx512, Isa::Avx2, Isa::Portable]
        .into_iter()
        .filter(|i| i.available())
        .collect()
}

fn rand_v(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
}

/// A test problem: q, k, v and an optional mask `[B or 1, 1, S or 1, T]` (bool or float).
struct Case {
    dims: [usize; 7],
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    causal: bool,
    scale: Option<f32>,
    /// (values, mask shape, bool?)
    mask: Option<(Vec<f32>, [usize; 4], bool)>,
    /// q, k, v and the output sequence-major (`[B, S, H, D]`).
    seq_major: bool,
}

impl Case {
    /// The interpreter's output.
    fn reference(&self) -> Tensor {
        let [b, hq, hkv, s, t, d, dv] = self.dims;
        let q = Tensor::from_vec(self.shape(b, hq, s, d), self.q.clone());
        let k = Tensor::from_vec(self.shape(b, hkv, t, d), self.k.clone());
        let v = Tensor::from_vec(self.shape(b, hkv, t, dv), self.v.clone());
        let mask = self.mask.as_ref().map(|(vals, shape, is_bool)| {
            if *is_bool {
                Tensor::from_vec(
                    shape.to_vec(),
                    vals.iter().map(|&x| x == 0.0).collect::<Vec<_>>(),
                )
            } else {
                Tensor::from_vec(shape.to_vec(), vals.clone())
            }
        });
        let mut attrs = Attrs::new().with("causal", Attr::Int(self.causal as i64));
        if let Some(sc) = self.scale {
            attrs.set("scale", Attr::Float(sc));
        }
        if self.seq_major {
            attrs.set("layout", Attr::Str("bshd".into()));
        }
        kiln_ir::ops::eval(
            OpKind::Attention,
            &attrs,
            &[Some(&q), Some(&k), Some(&v), mask.as_ref()],
        )
        .expect("interpreter")[0]
            .clone()
    }

    /// A `[B, H, L, W]` tensor's shape in the case's layout.
    fn shape(&self, b: usize, h: usize, l: usize, w: usize) -> Vec<usize> {
        if self.seq_major {
            vec![b, l, h, w]
        } else {
            vec![b, h, l, w]
        }
    }

    /// The kernel's output with `isa` on `threads` threads.
    fn run(&self, isa: Isa, threads: usize) -> Vec<f32> {
        let [b, hq, _, s, _, d, dv] = self.dims;
        // Bool masks reach the kernel as 0 / −inf (stored as 0 = keep in `vals`).
        let additive: Option<Vec<f32>> = self.mask.as_ref().map(|(vals, _, is_bool)| {
            if *is_bool {
                vals.iter()
                    .map(|&x| if x == 0.0 { 0.0 } else { f32::NEG_INFINITY })
                    .collect()
            } else {
                vals.clone()
            }
        });
        let mask = self.mask.as_ref().map(|(_, shape, _)| {
            let t = shape[3];
            let si = if shape[2] == 1 { 0 } else { t };
            let sb = if shape[0] == 1 { 0 } else { shape[2] * t };
            Mask {
                data: additive.as_deref().expect("mask values"),
                strides: [sb, 0, si, 1],
            }
        });
        let p = Attention {
            q: &self.q,
            k: &self.k,
            v: &self.v,
            dims: self.dims,
            scale: self.scale.unwrap_or(1.0 / (d as f32).sqrt()),
            causal: self.causal,
            mask,
            seq_major: self.seq_major,
        };
        let mut out = vec![0.0f32; b * hq * s * dv];
        attention_with(&Pool::new(threads).unwrap(), &p, &mut out, isa).expect("attention");
        out
    }

    /// Every ISA and thread count against the reference; outputs bit-identical across
    /// thread counts. Returns the reference.
    fn check(&self, what: &str) -> Tensor {
        let want = self.reference();
        let [b, hq, _, s, _, _, dv] = self.dims;
        for isa in isas() {
            let first = self.run(isa, 1);
            let got = Tensor::from_vec(self.shape(b, hq, s, dv), first.clone());
            let r = compare(&got, &want, ATTENTION_TOLERANCE);
            assert!(r.ok, "{what} {isa:?}: {r:?}");
            for threads in [2, 5] {
                let again = self.run(isa, threads);
                assert!(
                    first
                        .iter()
                        .zip(&again)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{what} {isa:?}: {threads} threads changed the bits"
                );
            }
        }
        want
    }
}

/// A size that is often 1 and often off every tile.
fn dim(rng: &mut StdRng, max: usize) -> usize {
    match rng.gen_range(0..4) {
        0 => 1,
        _ => rng.gen_range(1..=max),
    }
}

fn random_case(rng: &mut StdRng, case: usize) -> Case {
    let b = dim(rng, 2);
    let hkv = dim(rng, 3);
    let hq = hkv * [1, 2, 4][case % 3];
    let s = dim(rng, 45);
    // T > S: a kv cache (spanning several 64-key blocks); T < S: causal rows that see nothing.
    let t = if case.is_multiple_of(4) {
        dim(rng, 20)
    } else {
        s + dim(rng, 150) - 1
    };
    let d = [64, 8, 13, 1, 17, 32][case % 6];
    let dv = [d, 7, 64, 1, 33][case % 5];
    let mask = match case % 3 {
        0 => None,
        1 => Some((rand_v(rng, b * t), [b, 1, 1, t], false)),
        _ => Some((
            (0..b * s * t)
                .map(|_| if rng.gen_bool(0.8) { 0.0 } else { 1.0 })
                .collect(),
            [b, 1, s, t],
            true,
        )),
    };
    Case {
        dims: [b, hq, hkv, s, t, d, dv],
        q: rand_v(rng, b * hq * s * d),
        k: rand_v(rng, b * hkv * t * d),
        v: rand_v(rng, b * hkv * t * dv),
        causal: case % 2 == 1,
        scale: case.is_multiple_of(7).then_some(0.3),
        mask,
        seq_major: (case / 2) % 3 == 1,
    }
}

#[test]
fn every_isa_matches_the_interpreter_on_random_shapes() {
    assert!(isas().contains(&Isa::Portable));
    let mut rng = StdRng::seed_from_u64(21);
    for case in 0..90 {
        let c = random_case(&mut rng, case);
        c.check(&format!("case {case} dims {:?}", c.dims));
    }
}

#[test]
fn model_sized_heads_match_the_interpreter() {
    let mut rng = StdRng::seed_from_u64(22);
    // vit-like, bert-like, llama GQA causal, decode with a cache.
    for (s, t, hq, hkv, causal, seq_major) in [
        (197, 197, 2, 2, false, false),
        (197, 197, 3, 3, false, true),
        (128, 128, 2, 2, false, false),
        (128, 128, 2, 2, false, true),
        (128, 128, 4, 2, true, false),
        (128, 128, 4, 2, true, true),
        (1, 129, 4, 2, true, false),
        (5, 200, 2, 1, true, false),
        // Four or more groups: at two threads each thread takes whole groups.
        (197, 197, 4, 4, false, true),
        (128, 128, 8, 4, true, false),
        (1, 129, 8, 4, true, false),
    ] {
        let d = 64;
        let c = Case {
            dims: [1, hq, hkv, s, t, d, d],
            q: rand_v(&mut rng, hq * s * d),
            k: rand_v(&mut rng, hkv * t * d),
            v: rand_v(&mut rng, hkv * t * d),
            causal,
            scale: None,
            mask: None,
            seq_major,
        };
        c.check(&format!(
            "S={s} T={t} causal={causal} seq_major={seq_major}"
        ));
    }
}

#[test]
fn all_masked_rows_are_nan_on_every_isa() {
    let mut rng = StdRng::seed_from_u64(23);
    let (s, t, d) = (20, 70, 16);
    let mut keep = vec![0.0f32; s * t];
    // Row 3 sees nothing; row 17 sees only key 69 (the last block's last key).
    keep[3 * t..4 * t].fill(1.0);
    keep[17 * t..18 * t - 1].fill(1.0);
    let c = Case {
        dims: [1, 2, 2, s, t, d, d],
        q: rand_v(&mut rng, 2 * s * d),
        k: rand_v(&mut rng, 2 * t * d),
        v: rand_v(&mut rng, 2 * t * d),
        causal: false,
        scale: None,
        mask: Some((keep, [1, 1, s, t], true)),
        seq_major: false,
    };
    let want = c.check("masked rows");
    let y = want.as_slice::<f32>().unwrap();
    assert!(y[3 * d..4 * d].iter().all(|x| x.is_nan()));
    assert!(y[17 * d..18 * d].iter().all(|x| x.is_finite()));
    // Causal with S > T: the first S − T queries see no key.
    let c = Case {
        dims: [1, 1, 1, 40, 9, 8, 8],
        q: rand_v(&mut rng, 40 * 8),
        k: rand_v(&mut rng, 9 * 8),
        v: rand_v(&mut rng, 9 * 8),
        causal: true,
        scale: None,
        mask: None,
        seq_major: false,
    };
    let want = c.check("causal S > T");
    let y = want.as_slice::<f32>().unwrap();
    assert!(y[..31 * 8].iter().all(|x| x.is_nan()));
    assert!(y[31 * 8..].iter().all(|x| x.is_finite()));
}

#[test]
fn nan_and_inf_inputs_propagate_on_every_isa() {
    let mut rng = StdRng::seed_from_u64(24);
    let (s, t, d) = (140, 150, 24);
    // One kv group, and four (at two threads, whole groups per thread, each packing its own).
    for hkv in [1, 4] {
        let base = Case {
            dims: [1, 2 * hkv, hkv, s, t, d, d],
            q: rand_v(&mut rng, 2 * hkv * s * d),
            k: rand_v(&mut rng, hkv * t * d),
            v: rand_v(&mut rng, hkv * t * d),
            causal: false,
            scale: None,
            mask: None,
            seq_major: false,
        };
        let poke = |f: &dyn Fn(&mut Case), causal: bool, what: &str| {
            let mut c = Case {
                q: base.q.clone(),
                k: base.k.clone(),
                v: base.v.clone(),
                causal,
                mask: None,
                ..base
            };
            f(&mut c);
            c.check(what);
        };
        for causal in [false, true] {
            poke(&|c| c.q[5] = f32::NAN, causal, "NaN in q");
            poke(&|c| c.q[40] = f32::INFINITY, causal, "+inf in q");
            poke(&|c| c.q[70] = f32::NEG_INFINITY, causal, "-inf in q");
            poke(&|c| c.k[100 * d + 3] = f32::NAN, causal, "NaN in k");
            poke(&|c| c.k[130 * d] = f32::INFINITY, causal, "+inf in k");
            poke(&|c| c.v[20 * d + 1] = f32::NAN, causal, "NaN in v");
            poke(&|c| c.v[60 * d + 2] = f32::INFINITY, causal, "inf in v");
            // Causal hides the last keys from early queries, but 0·NaN is still NaN: the kernel
            // must not skip those key blocks.
            poke(
                &|c| c.v[149 * d] = f32::NAN,
                causal,
                "NaN in the last v row",
            );
            poke(
                &|c| c.v[((hkv - 1) * t + 149) * d] = f32::NAN,
                causal,
                "NaN in the last group's last v row",
            );
            poke(
                &|c| {
                    c.mask = Some((
                        (0..t)
                            .map(|j| if j == 77 { f32::NAN } else { 0.5 })
                            .collect(),
                        [1, 1, 1, t],
                        false,
                    ))
                },
                causal,
                "NaN in a float mask",
            );
        }
    }
}

#[test]
fn a_forced_isa_the_cpu_lacks_is_an_error_not_a_crash() {
    let (q, k) = (vec![0.5f32; 4], vec![0.25f32; 4]);
    let p = Attention {
        q: &q,
        k: &k,
        v: &k,
        dims: [1, 1, 1, 1, 1, 4, 4],
        scale: 0.5,
        causal: false,
        mask: None,
        seq_major: false,
    };
    for isa in [Isa::Avx512, Isa::Avx2, Isa::Portable, Isa::Auto] {
        let mut out = vec![0.0f32; 4];
        let r = attention_with(&Pool::single(), &p, &mut out, isa);
        assert_eq!(r.is_ok(), isa.available(), "{isa:?}: {r:?}");
        if r.is_ok() {
            // One key: the output is that key's value row.
            assert_eq!(out, vec![0.25f32; 4], "{isa:?}");
        }
    }
}

#[test]
fn empty_head_dims_do_not_panic() {
    let mut rng = StdRng::seed_from_u64(25);
    // Dv = 0: an empty output; D = 0 with an explicit scale: every score 0, a plain mean of V.
    for (d, dv) in [(8, 0), (0, 5)] {
        let (s, t) = (3, 70);
        let (q, k, v) = (
            rand_v(&mut rng, s * d),
            rand_v(&mut rng, t * d),
            rand_v(&mut rng, t * dv),
        );
        let p = Attention {
            q: &q,
            k: &k,
            v: &v,
            dims: [1, 1, 1, s, t, d, dv],
            scale: 0.5,
            causal: false,
            mask: None,
            seq_major: false,
        };
        for isa in isas() {
            let mut out = vec![0.0f32; s * dv];
            attention_with(&Pool::single(), &p, &mut out, isa).expect("attention");
            for (x, col) in out.iter().zip((0..dv).cycle()) {
                let mean = (0..t).map(|j| v[j * dv + col] as f64).sum::<f64>() / t as f64;
                assert!((*x as f64 - mean).abs() < 1e-5, "{isa:?}: {x} vs {mean}");
            }
        }
    }
}
