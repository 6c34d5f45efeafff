//! `Executable::run` hands the JIT the caller's tensors without copying them: no kernel may
//! write into them (a `scatter_nd` into an input that dies there is written in place when
//! the input is owned), and an output that is an input, or a view of one, must come back
//! as a tensor of its own. Each graph runs twice (the second run replays the memo and the
//! arena layout) and is compared with the interpreter.

use kiln::{Backend, Model, Options, Tensor};

/// Graphs whose outputs are, or could be built in, their inputs' buffers.
const GRAPHS: [(&str, &str); 4] = [
    (
        "scatter_nd into an input",
        "func @f(%x: f32[4, 3], %i: i64[1, 1], %u: f32[1, 3]) -> f32[4, 3] {
  %y = scatter_nd %x, %i, %u
  return %y
}
",
    ),
    (
        "reshape of an input",
        "func @f(%x: f32[4, 3]) -> f32[12] {
  %s = constant {value = dense<i64[1]> [12]}
  %y = reshape %x, %s
  return %y
}
",
    ),
    (
        "an input returned",
        "func @f(%x: f32[4, 3]) -> (f32[4, 3], f32[4, 3]) {
  %y = relu %x
  return %x, %y
}
",
    ),
    (
        "exp of an input, a post-mapped loop kernel",
        "func @f(%x: f32[4, 3]) -> f32[4, 3] {
  %y = exp %x
  return %y
}
",
    ),
];

fn inputs_for(g: &kiln_ir::Graph) -> Vec<(String, Tensor)> {
    g.inputs
        .iter()
        .map(|&v| {
            let name = g.value(v).name.clone();
            let t = match name.as_str() {
                "i" => Tensor::from_vec(vec![1, 1], vec![2i64]),
                "u" => Tensor::from_vec(vec![1, 3], vec![7.0f32, 8.0, 9.0]),
                _ => Tensor::from_vec(vec![4, 3], (0..12).map(|k| k as f32 - 5.5).collect()),
            };
            (name, t)
        })
        .collect()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.as_slice::<f32>()
        .expect("f32")
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

#[test]
fn the_jit_reads_the_callers_inputs_and_never_writes_or_returns_them() {
    for (what, text) in GRAPHS {
        let g: kiln_ir::Graph = text.parse().expect("test graph parses");
        let named = inputs_for(&g);
        let args: Vec<(&str, Tensor)> =
            named.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
        let before: Vec<Vec<u32>> = args
            .iter()
            .filter(|(_, t)| t.dtype() == kiln_ir::DType::F32)
            .map(|(_, t)| bits(t))
            .collect();
        let model = Model::from_graph(g);
        let want = model
            .compile(&Options {
                backend: Backend::Interp,
                ..Options::default()
            })
            .unwrap()
            .run(&args)
            .unwrap();
        let exe = model.compile(&Options::default()).unwrap();
        assert_eq!(exe.backend(), Backend::Jit);
        for round in 0..2 {
            let got = exe.run(&args).unwrap();
            assert_eq!(got.len(), want.len(), "{what}");
            for (k, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g.shape(), w.shape(), "{what}: output {k}");
                assert_eq!(bits(g), bits(w), "{what}: output {k}, run {round}");
                for (name, x) in &args {
                    if let (Some(a), Some(b)) = (g.as_slice::<f32>(), x.as_slice::<f32>()) {
                        assert_ne!(
                            a.as_ptr(),
                            b.as_ptr(),
                            "{what}: output {k} is input `{name}`'s own buffer"
                        );
                    }
                }
            }
            let after: Vec<Vec<u32>> = args
                .iter()
                .filter(|(_, t)| t.dtype() == kiln_ir::DType::F32)
                .map(|(_, t)| bits(t))
                .collect();
            assert_eq!(after, before, "{what}: run {round} wrote into an input");
        }
    }
}
