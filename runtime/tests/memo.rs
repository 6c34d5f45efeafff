//! Memoised shape arithmetic ([`kiln_plan::memo`]) as the CPU executor uses it: runs borrow
//! static values recorded for the same input shapes, revalidate data-dependent shapes, and
//! always match the interpreter.

use kiln_ir::Tensor;
use kiln_runtime::executor::{CpuPlan, ReferenceRunner, RunReport};

/// `%y` is reshaped by shape arithmetic on `%x`; `%z`'s shape depends on the data in
/// `%n`, so a memo entry keyed by input shapes must still be validated by `shape %z`.
const SRC: &str = "func @f(%x: f32[B, 4], %n: i64[2]) -> (f32[?, ?], i64[2], f32[?, ?]) {
  %s = shape %x
  %k0 = constant {value = dense<i64[1]> [0]} : i64[1]
  %b = gather %s, %k0 {axis = 0}
  %m1 = constant {value = dense<i64[1]> [-1]} : i64[1]
  %t = concat %m1, %b {axis = 0}
  %y = reshape %x, %t : f32[?, ?]
  %z = reshape %x, %n : f32[?, ?]
  %sz = shape %z
  %w = reshape %z, %sz : f32[?, ?]
  return %y, %sz, %w
}
";

fn run_both(plan: &CpuPlan, g: &kiln_ir::Graph, x: &Tensor, n: &Tensor) -> RunReport {
    let ins = vec![x.clone(), n.clone()];
    let mut rep = RunReport::default();
    let got = plan
        .run_with(ins.clone(), &ReferenceRunner, Some(&mut rep))
        .expect("plan runs");
    let want = kiln_ir::interp::run(g, ins).expect("interpreter runs");
    assert_eq!(got, want, "x {:?} n {:?}", x.shape(), n.to_i64s());
    rep
}

fn memo_hits(rep: &RunReport) -> usize {
    rep.kernels.iter().filter(|k| k.kind == "memo").count()
}

#[test]
fn memoised_shape_arithmetic_matches_the_interpreter_and_revalidates() {
    let g = kiln_ir::text::parse(SRC).expect("parses");
    let plan = CpuPlan::partition(&g).expect("partitions");
    let x = |b: usize| Tensor::from_vec(vec![b, 4], (0..b * 4).map(|i| i as f32).collect());
    let n = |a: i64, b: i64| Tensor::from_vec(vec![2], vec![a, b]);
    // First run records; the second, same shapes and data, borrows every static value.
    let first = run_both(&plan, &g, &x(2), &n(4, 2));
    assert_eq!(memo_hits(&first), 0);
    let second = run_both(&plan, &g, &x(2), &n(4, 2));
    let statics = plan.static_kernels();
    assert_eq!(statics, 4, "shape, gather, concat, shape");
    assert_eq!(memo_hits(&second), statics);
    // Same input shapes, different data in %n: `shape %z` must not come from the memo.
    let third = run_both(&plan, &g, &x(2), &n(2, 4));
    assert!(memo_hits(&third) < statics);
    // A new batch size is a new key; the old entries stay usable.
    run_both(&plan, &g, &x(3), &n(6, 2));
    run_both(&plan, &g, &x(3), &n(6, 2));
    run_both(&plan, &g, &x(2), &n(2, 4));
    // A failing run (bad reshape) reports the error and stores nothing wrong.
    assert!(plan.run(vec![x(2), n(3, 3)], &ReferenceRunner).is_err());
    run_both(&plan, &g, &x(2), &n(8, 1));
}

/// A rotary-style table: positions from `range` over a shape, scaled by a constant in a
/// fused loop, then `cos`; only the last product reads data.
const TABLE: &str = "func @f(%x: f32[S, 4]) -> (f32[S, 4]) {
  %s = shape %x
  %z = constant {value = dense<i64[]> [0]} : i64[]
  %one = constant {value = dense<i64[]> [1]} : i64[]
  %n = gather %s, %z {axis = 0}
  %r = range %z, %n, %one
  %rf = cast %r {to = \"f32\"}
  %k = constant {value = dense<f32[]> [0.25]} : f32[]
  %a = mul %rf, %k
  %c = cos %a
  %ax = constant {value = dense<i64[1]> [1]} : i64[1]
  %c2 = unsqueeze %c, %ax
  %y = mul %x, %c2
  return %y
}
";

#[test]
fn loops_and_cos_over_static_values_are_memoised() {
    let g = kiln_ir::text::parse(TABLE).expect("parses");
    let plan = CpuPlan::partition(&g).expect("partitions");
    let x = |s: usize| Tensor::from_vec(vec![s, 4], (0..s * 4).map(|i| i as f32).collect());
    let run = |s: usize| {
        let ins = vec![x(s)];
        let mut rep = RunReport::default();
        let got = plan
            .run_with(ins.clone(), &ReferenceRunner, Some(&mut rep))
            .expect("plan runs");
        assert_eq!(
            got,
            kiln_ir::interp::run(&g, ins).expect("interpreter runs")
        );
        rep
    };
    let memo_ops = |rep: &RunReport| -> Vec<String> {
        rep.kernels
            .iter()
            .filter(|k| k.kind == "memo")
            .map(|k| k.op.clone())
            .collect()
    };
    assert!(memo_ops(&run(3)).is_empty());
    let second = memo_ops(&run(3));
    assert!(second.iter().any(|o| o == "cos"), "{second:?}");
    assert!(second.iter().any(|o| o == "loop"), "{second:?}");
    // The data product is never memoised; a new length computes a fresh table.
    assert!(!second.iter().any(|o| o == "mul"), "{second:?}");
    assert!(memo_ops(&run(5)).is_empty());
    run(5);
    run(3);
}
