use kiln_runtime::kernels::gemm::{
    gemm, Activation, Epilogue, GemmConfig, Isa, MatMut, MatRef, PackedB, Rhs,
};
use std::time::{Duration, Instant};
fn main() {
    let mut shapes = vec![
        (197usize, 384usize, 384usize),
        (197, 1536, 384),
        (197, 384, 1536),
        (128, 768, 768),
        (128, 3072, 768),
        (128, 768, 3072),
    ];
    if let Ok(sh) = std::env::var("SHAPES") {
        shapes = sh
            .split(',')
            .map(|t| {
                let v: Vec<usize> = t.split('x').map(|x| x.parse().unwrap()).collect();
                (v[0], v[1], v[2])
            })
            .collect();
    }
    let nb: usize = std::env::var("NB").map(|v| v.parse().unwrap()).unwrap_or(6);
    let mut tot = [0f64; 2];
    for &(m, n, k) in &shapes {
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32) * 0.01).collect();
        let bias: Vec<f32> = (0..n).map(|i| ((i * 7 % 13) as f32) * 0.01).collect();
        let pbs: Vec<PackedB> = (0..nb)
            .map(|s| {
                let b: Vec<f32> = (0..k * n)
                    .map(|i| (((i + s) * 5 % 11) as f32) * 0.01)
                    .collect();
                PackedB::pack_for(
                    MatRef::row_major(&b, k, n).unwrap(),
                    if std::env::var_os("AVX2").is_some() {
                        Isa::Avx2
                    } else {
                        Isa::Avx512
                    },
                )
                .unwrap()
            })
            .collect();
        let mut c = vec![0f32; m * n];
        let av = MatRef::row_major(&a, m, k).unwrap();
        let res: Vec<f32> = vec![0.5; m * n];
        let rv = MatRef::row_major(&res, m, n).unwrap();
        let eps: Vec<(&str, Epilogue)> = if std::env::var_os("EPS").is_some() {
            vec![
                ("plain", Epilogue::default()),
                (
                    "bias+res",
                    Epilogue {
                        bias: Some(&bias),
                        residual: Some(rv),
                        ..Default::default()
                    },
                ),
                (
                    "bias",
                    Epilogue {
                        bias: Some(&bias),
                        ..Default::default()
                    },
                ),
                (
                    "res",
                    Epilogue {
                        residual: Some(rv),
                        ..Default::default()
                    },
                ),
                (
                    "gelu",
                    Epilogue {
                        bias: Some(&bias),
                        activation: Activation::GeluErf,
                        ..Default::default()
                    },
                ),
            ]
        } else {
            vec![("plain", Epilogue::default())]
        };
        for (label, ep) in eps {
            let mut line = format!("{m:4}x{n:4}x{k:4} {label:8}:");
            for threads in [1, 2] {
                let cfg = GemmConfig {
                    threads,
                    isa: if std::env::var_os("AVX2").is_some() {
                        Isa::Avx2
                    } else {
                        Isa::Avx512
                    },
                };
                let mut best = Duration::MAX;
                let mut it = 0;
                for _ in 0..15 {
                    let reps = 6;
                    let t = Instant::now();
                    for _ in 0..reps {
                        it += 1;
                        let pb = &pbs[it % nb];
                        gemm(
                            av,
                            Rhs::Packed(pb),
                            MatMut::row_major(&mut c, m, n).unwrap(),
                            &ep,
                            &cfg,
                        )
                        .unwrap();
                    }
                    best = best.min(t.elapsed() / reps as u32);
                }
                tot[threads - 1] += best.as_secs_f64() * 1e6;
                let gf = 2.0 * (m * n * k) as f64 / best.as_secs_f64() / 1e9;
                line += &format!("  {threads}t {:8.1}us {gf:6.1}", best.as_secs_f64() * 1e6);
            }
            println!("{line}");
        }
    }
    println!("total 1t {:.0}us 2t {:.0}us", tot[0], tot[1]);
}
