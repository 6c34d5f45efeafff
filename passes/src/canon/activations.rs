//! `fuse_silu`: `x · sigmoid(x)` (either operand order) becomes `silu(x)`. SwiGLU stays
//! `silu(gate) · up`: the gating product is an ordinary `mul` that the e-graph may later
//! fuse into a `linear` epilogue.
//!
//! The sigmoid may have other users: it then stays for them (recomputing a sigmoid inside
//! `silu` is cheaper than the memory traffic the fusion saves).

use super::{run_matches, Fusion, Matcher, NewNode, Operand};
use crate::{Pass, PassError, PassStats};
use kiln_ir::{Attrs, Graph, OpKind};

/// Recognises SiLU (`x * sigmoid(x)`).
#[derive(Clone, Copy, Debug, Default)]
pub struct FuseSilu;

const NAME: &str = "fuse_silu";

impl Pass for FuseSilu {
    fn name(&self) -> &'static str {
        NAME
    }

    fn run(&self, g: &mut Graph) -> Result<PassStats, PassError> {
        run_matches(g, NAME, find)
    }
}

fn find(m: &Matcher, i: usize) -> Option<Fusion> {
    let mul = &m.g.nodes[i];
    if mul.op != OpKind::Mul {
        return None;
    }
    for (x, s) in Matcher::operands(mul)? {
        let Some((_, sig)) = m.def_op(s, OpKind::Sigmoid) else {
            continue;
        };
        if Matcher::input(sig, 0) != Some(x) {
            continue;
        }
        // The sigmoid is not claimed: two products may share it.
        return Some(Fusion {
            root: i,
            interior: vec![i],
            nodes: vec![NewNode {
                op: OpKind::Silu,
                attrs: Attrs::new(),
                inputs: vec![Some(Operand::Value(x))],
                name: "silu".into(),
            }],
            counter: "silu_fused",
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::canon::testing::*;

    #[test]
    fn x_times_sigmoid_x_becomes_silu_in_either_order() {
        let mut b = B::new();
        let x = b.input("x", &[-2, -1, 8]);
        let s = b.un(OpKind::Sigmoid, x);
        let y1 = b.bin(OpKind::Mul, x, s);
        let y2 = b.bin(OpKind::Mul, s, x);
        let g = b.finish(&[y1, y2]);
        let after = rewrite_and_compare(&FuseSilu, &g);
        assert_eq!(count(&after, OpKind::Silu), 2);
        assert_eq!(count(&after, OpKind::Sigmoid), 0);
        assert_eq!(count(&after, OpKind::Mul), 0);
    }

    #[test]
    fn swiglu_keeps_the_gating_mul_and_other_sigmoids_are_left_alone() {
        let mut b = B::new();
        let gate = b.input("gate", &[4, 8]);
        let up = b.input("up", &[4, 8]);
        let s = b.un(OpKind::Sigmoid, gate);
        let a = b.bin(OpKind::Mul, gate, s);
        let y = b.bin(OpKind::Mul, a, up);
        // sigmoid(up) * gate is not SiLU.
        let s2 = b.un(OpKind::Sigmoid, up);
        let z = b.bin(OpKind::Mul, gate, s2);
        let g = b.finish(&[y, z]);
        let after = rewrite_and_compare(&FuseSilu, &g);
        assert_eq!(count(&after, OpKind::Silu), 1);
        assert_eq!(count(&after, OpKind::Mul), 2);
        assert_eq!(count(&after, OpKind::Sigmoid), 1);
    }
}
