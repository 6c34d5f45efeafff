//! Times one prepared f32 conv of a given geometry on each native path (the direct kernel,
//! im2col + GEMM, the depthwise loop) at 1 and 2 threads, in GFLOP/s of the conv's
//! multiply-adds, so a path's choice can be measured per geometry. ORT on the same
//! geometry: `bench/conv_geometries.sh` (one-node ONNX models, `kiln bench --compare-ort`).
//!
//! `cargo run --release -p kiln-runtime --example conv_bench -- [N C H W OC K STRIDE PAD GROUP [DIL]]...`
//! (`H = 0`: a 1-D conv over `W`); without arguments, a list of common conv-net geometries.
//! The fused activation is ReLU (`ACT=silu` or `ACT=none` for another).

use kiln_ir::{Attr, Attrs};
use kiln_runtime::native::conv_gemm::{ConvAct, ConvArgs, Geometry, PreparedConv};
use kiln_runtime::native::gemm::Activation;
use kiln_runtime::pool::Pool;
use std::time::Instant;

/// `(n, c, h, w, oc, k, stride, pad, group, dilation)`; `h == 0` is 1-D.
type Case = [usize; 10];

const DEFAULT: &[Case] = &[
    [1, 32, 160, 160, 32, 3, 1, 1, 1, 1],
    [1, 16, 160, 160, 32, 3, 2, 1, 1, 1],
    [1, 64, 80, 80, 64, 3, 1, 1, 1, 1],
    [1, 64, 40, 40, 128, 3, 2, 1, 1, 1],
    [1, 128, 20, 20, 128, 3, 1, 1, 1, 1],
    [1, 256, 10, 10, 256, 3, 1, 1, 1, 1],
    [1, 3, 320, 320, 16, 3, 2, 1, 1, 1],
    [1, 64, 256, 256, 32, 3, 1, 1, 1, 1],
    [1, 96, 56, 56, 96, 3, 1, 1, 96, 1],
    [1, 64, 80, 80, 128, 1, 1, 0, 1, 1],
    [4, 64, 0, 4096, 64, 7, 1, 3, 1, 1],
    [4, 64, 0, 1024, 64, 3, 1, 2, 1, 2],
];

fn time(f: &mut dyn FnMut()) -> f64 {
    f();
    let mut best = f64::INFINITY;
    let start = Instant::now();
    let mut runs = 0;
    while runs < 5 || (start.elapsed().as_secs_f64() < 0.5 && runs < 200) {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
        runs += 1;
    }
    best
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numbers"))
        .collect();
    let cases: Vec<Case> = if args.is_empty() {
        DEFAULT.to_vec()
    } else {
        args.chunks(10)
            .map(|c| {
                let mut k = [0, 0, 0, 0, 0, 0, 1, 0, 1, 1];
                k[..c.len()].copy_from_slice(c);
                k
            })
            .collect()
    };
    let pools = [Pool::single(), Pool::new(2).expect("pool")];
    println!(
        "{:<44} {:>8} {:>10} {:>10} {:>10} {:>10}",
        "geometry", "MFLOP", "direct 1t", "gemm 1t", "direct 2t", "gemm 2t"
    );
    for [n, c, h, w, oc, k, s, p, g, d] in cases {
        let one_d = h == 0;
        let nsp = if one_d { 1 } else { 2 };
        let attrs = Attrs::new()
            .with("group", Attr::Int(g as i64))
            .with("strides", Attr::Ints(vec![s as i64; nsp]))
            .with("dilations", Attr::Ints(vec![d as i64; nsp]))
            .with("pads", Attr::Ints(vec![p as i64; 2 * nsp]));
        let mut xs = vec![n, c];
        let mut ws = vec![oc, c / g];
        if !one_d {
            xs.push(h);
            ws.push(k);
        }
        xs.push(w);
        ws.push(k);
        let xv: Vec<f32> = (0..xs.iter().product::<usize>())
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        let wv: Vec<f32> = (0..ws.iter().product::<usize>())
            .map(|i| ((i * 104729) % 997) as f32 / 997.0 - 0.5)
            .collect();
        let bv = vec![0.1f32; oc];
        let geo = Geometry::new(&attrs, &xs, &ws).expect("geometry");
        let out: usize = geo.out_shape().iter().product();
        let mflop = 2.0 * out as f64 * (ws[1..].iter().product::<usize>()) as f64 / 1e6;
        let act = match std::env::var("ACT").as_deref() {
            Ok("silu") => ConvAct::Epilogue(Activation::Silu),
            Ok("none") => ConvAct::Epilogue(Activation::None),
            _ => ConvAct::Epilogue(Activation::Relu),
        };
        let mut y = vec![0.0f32; out];
        let mut cells = Vec::new();
        for pool in &pools {
            for direct in [true, false] {
                let pc =
                    PreparedConv::new(&attrs, act, Some((&wv, &ws)), Some(&bv)).with_direct(direct);
                if direct && !pc.uses_direct(&geo, true) {
                    cells.push("-".to_string());
                    continue;
                }
                let a = ConvArgs {
                    x: &xv,
                    w: &wv,
                    bias: Some(&bv),
                    residual: None,
                };
                let t = time(&mut || pc.run(pool, &geo, &a, &mut y).expect("run"));
                cells.push(format!("{:.0}µs {:.0}G", t * 1e6, mflop / 1e3 / t));
            }
        }
        let name = format!(
            "n{n} c{c} {}{w} oc{oc} k{k} s{s} p{p} g{g} d{d}",
            if one_d {
                String::new()
            } else {
                format!("{h}x")
            }
        );
        println!(
            "{name:<44} {mflop:>8.1} {:>10} {:>10} {:>10} {:>10}",
            cells[0], cells[1], cells[2], cells[3]
        );
    }
}
