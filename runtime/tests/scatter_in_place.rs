//! `scatter_nd` written into its data operand when the executor holds that operand's last
//! use (a recurrence writing one row per step into a carried buffer): the results equal the
//! interpreter's, and a data operand that is read again later, or that is a graph output,
//! is left unchanged.

use kiln_ir::Tensor;
use kiln_runtime::executor::{CpuPlan, ReferenceRunner};

/// `%y` dies at the first scatter (written in place); `%z` is read again after its scatter
/// (copied) and returned; `%x` is an input returned as it came.
const SRC: &str = "func @f(%x: f32[4, 3], %i: i64[2, 1], %u: f32[2, 3]) -> (f32[4, 3], f32[4, 3], f32[4, 3], f32[4, 3]) {
  %y = add %x, %x : f32[4, 3]
  %s = scatter_nd %y, %i, %u : f32[4, 3]
  %z = mul %x, %x : f32[4, 3]
  %t = scatter_nd %z, %i, %u {reduction = \"add\"} : f32[4, 3]
  %w = sub %z, %t : f32[4, 3]
  return %s, %w, %x, %z
}
";

/// A loop writing row `t` of a captured `[5, 3]` table into a carried buffer at step `t`.
const LOOP: &str = "func @g(%buf: f32[5, 3], %rows: f32[5, 3]) -> (f32[5, 3]) {
  %trips = constant {value = dense<i64[]> [5]} : i64[]
  %out = loop %trips, _, %buf, %rows {body = func @step(%iter: i64[], %cond: bool[], %b: f32[5, 3], %r: f32[5, 3]) {
    %ax = constant {value = dense<i64[1]> [0]} : i64[1]
    %i1 = unsqueeze %iter, %ax : i64[1]
    %i2 = unsqueeze %i1, %ax : i64[1, 1]
    %row = gather %r, %iter {axis = 0} : f32[3]
    %upd = unsqueeze %row, %ax : f32[1, 3]
    %b2 = scatter_nd %b, %i2, %upd : f32[5, 3]
    return %cond, %b2
  }, num_captures = 1} : f32[5, 3]
  return %out
}
";

fn t(shape: &[usize], seed: u32) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::from_vec(
        shape.to_vec(),
        (0..n)
            .map(|k| (((k as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 100.0 - 5.0)
            .collect::<Vec<f32>>(),
    )
}

#[test]
fn scatters_into_dying_operands_match_the_interpreter_and_spare_live_ones() {
    let g = kiln_ir::text::parse(SRC).expect("parses");
    let plan = CpuPlan::partition(&g).expect("partitions");
    let idx = Tensor::from_vec(vec![2, 1], vec![3i64, -4]);
    for seed in 0..3 {
        let x = t(&[4, 3], seed);
        let ins = vec![x.clone(), idx.clone(), t(&[2, 3], seed + 7)];
        for _ in 0..2 {
            let got = plan.run(ins.clone(), &ReferenceRunner).expect("runs");
            let want = kiln_ir::interp::run(&g, ins.clone()).expect("interpreter runs");
            assert_eq!(got, want, "seed {seed}");
            assert_eq!(got[2], x, "the input comes back unchanged");
        }
    }
}

#[test]
fn a_loop_scattering_rows_into_its_carried_buffer_matches_the_interpreter() {
    let g = kiln_ir::text::parse(LOOP).expect("parses");
    let plan = CpuPlan::partition(&g).expect("partitions");
    let (buf, rows) = (t(&[5, 3], 1), t(&[5, 3], 2));
    let ins = vec![buf.clone(), rows.clone()];
    let got = plan.run(ins.clone(), &ReferenceRunner).expect("runs");
    let want = kiln_ir::interp::run(&g, ins).expect("interpreter runs");
    assert_eq!(got, want);
    assert_eq!(got[0], rows, "every row written");
    // Run again: the first run's in-place writes reached nothing the plan keeps.
    let again = plan
        .run(vec![buf, rows.clone()], &ReferenceRunner)
        .expect("runs");
    assert_eq!(again[0], rows);
}
