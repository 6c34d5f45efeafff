//! Helpers for the pass tests: small graph construction shortcuts, deterministic random
//! inputs, and the bit-for-bit "same outputs before and after" check.

use kiln_ir::{Attrs, DType, Dim, Graph, OpKind, Shape, Tensor, TensorData, TensorType, ValueId};

/// An f32 type of a static shape.
pub fn f32_ty(dims: &[usize]) -> TensorType {
    TensorType::new(DType::F32, Shape::fixed(dims))
}

/// Appends a one-output node without attributes, with a declared type.
pub fn node(g: &mut Graph, op: OpKind, ins: &[ValueId], name: &str, ty: TensorType) -> ValueId {
    node_with(g, op, Attrs::new(), ins, name, ty)
}

/// Appends a one-output node with attributes and a declared type.
pub fn node_with(
    g: &mut Graph,
    op: OpKind,
    attrs: Attrs,
    ins: &[ValueId],
    name: &str,
    ty: TensorType,
) -> ValueId {
    g.add_node(
        op,
        attrs,
        ins.iter().map(|&i| Some(i)).collect(),
        vec![(name.to_string(), ty)],
        "",
    )[0]
}

/// A small deterministic generator (xorshift64*), so tests need no extra dependency.
pub struct Rng(u64);

impl Rng {
    /// Seeded generator.
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// Next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A random tensor: floats in [-4, 4), ints in [-8, 8) (unsigned [0, 16)), bools.
    pub fn tensor(&mut self, dtype: DType, shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        let data = if dtype == DType::Bool {
            TensorData::Bool((0..n).map(|_| self.next() & 1 == 1).collect())
        } else if dtype.is_float() {
            let xs: Vec<f64> = (0..n)
                .map(|_| (self.next() >> 11) as f64 / (1u64 << 53) as f64 * 8.0 - 4.0)
                .collect();
            TensorData::from_f64s(dtype, xs.into_iter())
        } else {
            let off = if dtype.is_signed_int() { 8 } else { 0 };
            let xs: Vec<i64> = (0..n).map(|_| (self.next() % 16) as i64 - off).collect();
            TensorData::from_i64s(dtype, xs.into_iter())
        };
        Tensor::new(shape.to_vec(), data).expect("element count matches shape")
    }
}

/// Random inputs for `g`, binding every symbolic or unknown dim to 3.
pub fn random_inputs(g: &Graph, seed: u64) -> Vec<Tensor> {
    let mut rng = Rng::new(seed);
    g.inputs
        .iter()
        .map(|&i| {
            let ty = g.ty(i);
            let dims: Vec<usize> = ty
                .shape
                .dims()
                .expect("test inputs have a known rank")
                .iter()
                .map(|d| match d {
                    Dim::Fixed(n) => *n as usize,
                    _ => 3,
                })
                .collect();
            rng.tensor(ty.dtype, &dims)
        })
        .collect()
}

/// Runs both graphs on the same random inputs and asserts bit-identical outputs.
pub fn assert_same_outputs(before: &Graph, after: &Graph) {
    for seed in 1..=3 {
        let ins = random_inputs(before, seed);
        let a = kiln_ir::run(before, ins.clone()).expect("original graph runs");
        let b = kiln_ir::run(after, ins).expect("optimised graph runs");
        assert_eq!(a.len(), b.len(), "output count");
        for (k, (x, y)) in a.iter().zip(&b).enumerate() {
            assert_eq!(x, y, "output #{k} differs (seed {seed})");
        }
    }
}

/// The ops of a graph's nodes, in order.
pub fn ops(g: &Graph) -> Vec<OpKind> {
    g.nodes.iter().map(|n| n.op).collect()
}
