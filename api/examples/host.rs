//! The host API end to end: load the example MLP, compile it for the JIT, run it on
//! `examples/mlp/x.npy`-shaped input, and print what a host can ask an executable.
//!
//! `cargo run --release -p kiln --example host [MODEL.onnx]`

fn main() -> Result<(), kiln::Error> {
    let path = std::env::args().nth(1).unwrap_or_else(|| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/mlp/model.onnx").into()
    });
    let model = kiln::Model::load(&path)?;
    let exe = model.compile(&kiln::Options::default())?;
    println!(
        "compiled {path} for the {} backend with {} thread(s) in {:.1} ms",
        exe.backend(),
        exe.threads(),
        exe.compile_time().as_secs_f64() * 1e3
    );
    for io in exe.inputs() {
        println!("  input  {io}");
    }
    for io in exe.outputs() {
        println!("  output {io}");
    }
    // The MLP takes `x: f32[batch, 16]`; run a batch of 2 rows 0.00, 0.01, ...
    let x = kiln::Tensor::from_vec(vec![2, 16], (0..32).map(|i| i as f32 / 100.0).collect());
    let outs = exe.run(&[("x", x)])?;
    for (io, t) in exe.outputs().iter().zip(&outs) {
        println!(
            "{} = {:?} {:?}",
            io.name,
            t.shape(),
            t.as_slice::<f32>().unwrap_or(&[])
        );
    }
    // A wrong input is an error naming the input and what it expects.
    let wrong = kiln::Tensor::from_vec(vec![2, 15], vec![0f32; 30]);
    if let Err(e) = exe.run(&[("x", wrong)]) {
        println!("a wrong input is an error: {e}");
    }
    Ok(())
}
