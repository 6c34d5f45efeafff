//! LLVM loop kernels against the reference interpreter on edge values: NaN, ±inf, -0,
//! a row length that exercises both the 8-lane loop and the scalar tail, and broadcast
//! inputs (a bias row and a per-row scalar).

use kiln_ir::{Tensor, TensorData};
use kiln_llvm::{build_library, AotLibrary, BuildOptions};
use kiln_reference::{compare, ONNX_NODE_TOLERANCE};

const SRC: &str = r#"func @edge(%x: f32[3, 37], %y: f32[3, 37], %b: f32[37], %s: f32[3, 1]) -> (f32[3, 37], f32[3, 37], f32[3, 37], f32[3, 37], f32[3, 37], f32[3, 37], f32[3, 37], f32[3, 37], f32[3, 37], f32[3, 37]) {
  %relu = relu %x
  %max = max %x, %y
  %min = min %x, %y
  %sm = softmax %x {axis = -1}
  %exp = exp %y
  %tanh = tanh %x
  %sig = sigmoid %y
  %erf = erf %y
  %bias = add %x, %b
  %t0 = mul %y, %s
  %fma = add %t0, %b
  return %relu, %max, %min, %sm, %exp, %tanh, %sig, %erf, %bias, %fma
}
"#;

fn edge_values(n: usize, seed: u32) -> Vec<f32> {
    let special = [
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        -0.0,
        0.0,
        1e30,
        -1e-30,
    ];
    (0..n)
        .map(|i| {
            let k = (i as u32).wrapping_mul(2654435761).wrapping_add(seed);
            // Every fifth element is special, cycling through all of them.
            if i % 5 == 0 {
                special[(i / 5 + seed as usize) % special.len()]
            } else {
                ((k % 2000) as f32 - 1000.0) / 137.0
            }
        })
        .collect()
}

#[test]
fn loop_kernels_match_the_interpreter_on_edge_values() {
    let g: kiln_ir::Graph = SRC.parse().expect("test graph parses");
    let tmp = tempfile::tempdir().unwrap();
    let lib = tmp.path().join("libedge.so");
    let r = build_library(&g, &lib, &BuildOptions::default()).unwrap();
    assert!(
        r.loop_kernels >= 9,
        "expected loop kernels, got {}",
        r.loop_kernels
    );
    let t = |shape: Vec<usize>, seed| {
        let n = shape.iter().product();
        Tensor::new(shape, TensorData::F32(edge_values(n, seed).into())).unwrap()
    };
    let inputs = vec![
        t(vec![3, 37], 1),
        t(vec![3, 37], 2),
        t(vec![37], 3),
        t(vec![3, 1], 4),
    ];
    let want = kiln_ir::interp::run(&g, inputs.clone()).unwrap();
    let mut aot = AotLibrary::load(&lib, None).unwrap();
    let got = aot.run(&inputs).unwrap();
    assert_eq!(got.len(), want.len());
    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
        let e = compare(a, b, ONNX_NODE_TOLERANCE);
        assert!(
            e.ok,
            "output #{i}: {:?} (max abs {:e})",
            e.reason, e.max_abs
        );
        let (a, b) = (a.as_slice::<f32>().unwrap(), b.as_slice::<f32>().unwrap());
        for (j, (x, y)) in a.iter().zip(b).enumerate() {
            assert_eq!(x.is_nan(), y.is_nan(), "output #{i}[{j}]: {x} vs {y}");
        }
    }
}
