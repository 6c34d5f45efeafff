//! The serialised kernel list of a [`Plan`]: what `kiln build` writes into an AOT library so
//! that loading it runs [`Plan::from_kernels`] (constants and a consistency check) instead of
//! partitioning again. The graph itself travels in kiln's text form beside it.
//!
//! Format: the magic `KILNPLN1`, then little-endian `u64` counts and tags. Decoding never
//! panics and never allocates more than the input's length allows: a damaged library gets an
//! error naming what is wrong.

use crate::loop_ir::{BinOp, Expr, InnerAccess, LoopInput, LoopKernel, RedOp, Reduction, UnOp};
use crate::partition::{Kernel, Plan};
use kiln_ir::{Dim, ValueId};

/// First bytes of a serialised kernel list.
pub const PLAN_MAGIC: &[u8; 8] = b"KILNPLN1";

// Append only: a library records the index.
const UN_OPS: [UnOp; 13] = [
    UnOp::Neg,
    UnOp::Abs,
    UnOp::Sqrt,
    UnOp::Recip,
    UnOp::Relu,
    UnOp::FiniteOrZero,
    UnOp::Exp,
    UnOp::Log,
    UnOp::Tanh,
    UnOp::Erf,
    UnOp::Sigmoid,
    UnOp::Gelu,
    UnOp::Softplus,
];
const BIN_OPS: [BinOp; 8] = [
    BinOp::Add,
    BinOp::Sub,
    BinOp::Mul,
    BinOp::Div,
    BinOp::Max,
    BinOp::Min,
    BinOp::ClampBelow,
    BinOp::ClampAbove,
];
const RED_OPS: [RedOp; 2] = [RedOp::Sum, RedOp::Max];

/// Encodes a plan's kernels (not its graph or constants).
pub fn encode(plan: &Plan) -> Vec<u8> {
    let mut w = Writer(PLAN_MAGIC.to_vec());
    w.u64(plan.kernels.len() as u64);
    for k in &plan.kernels {
        match k {
            Kernel::Loop(l) => {
                w.u64(0);
                loop_kernel(&mut w, l);
            }
            Kernel::Contraction(n) => {
                w.u64(1);
                w.u64(*n as u64);
            }
            Kernel::Fallback(n) => {
                w.u64(2);
                w.u64(*n as u64);
            }
        }
    }
    w.0
}

/// Decodes a kernel list written by [`encode`].
pub fn decode(bytes: &[u8]) -> Result<Vec<Kernel>, String> {
    let mut r = Reader { bytes, at: 0 };
    if r.take(8)? != PLAN_MAGIC {
        return Err("not a kiln plan (bad magic)".into());
    }
    let n = r.count(9)?;
    let mut kernels = Vec::with_capacity(n);
    for i in 0..n {
        let k = match r.u64()? {
            0 => Kernel::Loop(read_loop(&mut r).map_err(|e| format!("kernel #{i}: {e}"))?),
            1 => Kernel::Contraction(r.usize()?),
            2 => Kernel::Fallback(r.usize()?),
            t => return Err(format!("kernel #{i}: unknown kind {t}")),
        };
        kernels.push(k);
    }
    if r.at != bytes.len() {
        return Err(format!("{} stray bytes after the plan", bytes.len() - r.at));
    }
    Ok(kernels)
}

fn loop_kernel(w: &mut Writer, l: &LoopKernel) {
    w.u64(l.shape.len() as u64);
    for d in &l.shape {
        match d {
            Dim::Fixed(n) => {
                w.u64(0);
                w.u64(*n);
            }
            Dim::Sym(s) => {
                w.u64(1);
                w.u64(s.len() as u64);
                w.0.extend_from_slice(s.as_bytes());
            }
            Dim::Unknown => w.u64(2),
        }
    }
    w.u64(l.inputs.len() as u64);
    for i in &l.inputs {
        w.u64(i.value.0 as u64);
        w.u64(match i.inner {
            InnerAccess::Contiguous => 0,
            InnerAccess::Broadcast => 1,
        });
    }
    w.u64(l.exprs.len() as u64);
    for e in &l.exprs {
        match e {
            Expr::Load(i) => {
                w.u64(0);
                w.u64(*i as u64);
            }
            Expr::Const(c) => {
                w.u64(1);
                w.u64(c.to_bits() as u64);
            }
            Expr::RowLen => w.u64(2),
            Expr::Reduced(k) => {
                w.u64(3);
                w.u64(*k as u64);
            }
            Expr::Un(op, a) => {
                w.u64(4);
                w.u64(index_of(&UN_OPS, op));
                w.u64(*a as u64);
            }
            Expr::Bin(op, a, b) => {
                w.u64(5);
                w.u64(index_of(&BIN_OPS, op));
                w.u64(*a as u64);
                w.u64(*b as u64);
            }
        }
    }
    w.u64(l.reductions.len() as u64);
    for r in &l.reductions {
        w.u64(index_of(&RED_OPS, &r.op));
        w.u64(r.arg as u64);
    }
    w.u64(l.outputs.len() as u64);
    for (v, e) in &l.outputs {
        w.u64(v.0 as u64);
        w.u64(*e as u64);
    }
}

fn read_loop(r: &mut Reader) -> Result<LoopKernel, String> {
    let rank = r.count(8)?;
    let mut shape = Vec::with_capacity(rank);
    for _ in 0..rank {
        shape.push(match r.u64()? {
            0 => Dim::Fixed(r.u64()?),
            1 => {
                let len = r.count(1)?;
                let s = std::str::from_utf8(r.take(len)?)
                    .map_err(|_| "a symbolic dim's name is not UTF-8")?;
                Dim::Sym(s.to_string())
            }
            2 => Dim::Unknown,
            t => return Err(format!("unknown dim tag {t}")),
        });
    }
    let mut l = LoopKernel::new(shape);
    for _ in 0..r.count(16)? {
        let value = ValueId(r.u32()?);
        let inner = match r.u64()? {
            0 => InnerAccess::Contiguous,
            1 => InnerAccess::Broadcast,
            t => return Err(format!("unknown inner access {t}")),
        };
        l.inputs.push(LoopInput { value, inner });
    }
    let n_exprs = r.count(8)?;
    // Operands precede their users, so every reference is checked against what exists.
    let expr = |r: &mut Reader, before: usize| -> Result<usize, String> {
        let e = r.usize()?;
        (e < before)
            .then_some(e)
            .ok_or_else(|| format!("expression refers to #{e}, not defined before #{before}"))
    };
    for i in 0..n_exprs {
        let e = match r.u64()? {
            0 => {
                let k = r.usize()?;
                if k >= l.inputs.len() {
                    return Err(format!("load of input #{k} of {}", l.inputs.len()));
                }
                Expr::Load(k)
            }
            1 => Expr::Const(f32::from_bits(r.u32()?)),
            2 => Expr::RowLen,
            3 => Expr::Reduced(r.usize()?),
            4 => {
                let op = *pick(&UN_OPS, r.u64()?)?;
                Expr::Un(op, expr(r, i)?)
            }
            5 => {
                let op = *pick(&BIN_OPS, r.u64()?)?;
                let a = expr(r, i)?;
                Expr::Bin(op, a, expr(r, i)?)
            }
            t => return Err(format!("unknown expression tag {t}")),
        };
        l.exprs.push(e);
    }
    for _ in 0..r.count(16)? {
        let op = *pick(&RED_OPS, r.u64()?)?;
        let arg = expr(r, n_exprs)?;
        l.reductions.push(Reduction { op, arg });
    }
    if let Some(Expr::Reduced(k)) = l
        .exprs
        .iter()
        .find(|e| matches!(e, Expr::Reduced(k) if *k >= l.reductions.len()))
    {
        return Err(format!(
            "reference to reduction #{k} of {}",
            l.reductions.len()
        ));
    }
    for _ in 0..r.count(16)? {
        let v = ValueId(r.u32()?);
        l.outputs.push((v, expr(r, n_exprs)?));
    }
    Ok(l)
}

fn index_of<T: PartialEq>(table: &[T], x: &T) -> u64 {
    table
        .iter()
        .position(|t| t == x)
        .expect("every op is in its table") as u64
}

fn pick<T>(table: &[T], i: u64) -> Result<&T, String> {
    usize::try_from(i)
        .ok()
        .and_then(|i| table.get(i))
        .ok_or_else(|| format!("unknown op code {i}"))
}

struct Writer(Vec<u8>);

impl Writer {
    fn u64(&mut self, x: u64) {
        self.0.extend_from_slice(&x.to_le_bytes());
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or("the plan is truncated")?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u64(&mut self) -> Result<u64, String> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
    fn usize(&mut self) -> Result<usize, String> {
        usize::try_from(self.u64()?).map_err(|_| "a plan value overflows usize".to_string())
    }
    fn u32(&mut self) -> Result<u32, String> {
        u32::try_from(self.u64()?).map_err(|_| "a plan value overflows u32".to_string())
    }
    /// A count of items that each take at least `min_bytes`: larger than what is left is
    /// an error, so a damaged count cannot ask for a huge allocation.
    fn count(&mut self, min_bytes: usize) -> Result<usize, String> {
        let n = self.usize()?;
        if n.saturating_mul(min_bytes) > self.bytes.len() - self.at {
            return Err(format!("a count of {n} exceeds the bytes left"));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::partition::partition;

    const SRC: &str = "func @f(%x: f32[B, 8], %w: f32[8, 8]) -> (f32[B, 8]) {
  %b = constant {value = dense<f32[8]> [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]} : f32[8]
  %m = matmul %x, %w
  %a = add %m, %b
  %g = gelu %a
  %s = softmax %g {axis = -1}
  %t = transpose %s {perm = [1, 0]}
  %y = transpose %t {perm = [1, 0]}
  return %y
}
";

    #[test]
    fn a_partitioned_plan_round_trips() {
        let g = kiln_ir::text::parse(SRC).expect("parses");
        let plan = partition(&g).expect("partitions");
        assert!(plan.kernels.iter().any(|k| matches!(k, Kernel::Loop(_))));
        let bytes = encode(&plan);
        let kernels = decode(&bytes).expect("decodes");
        assert_eq!(kernels, plan.kernels);
        let again = Plan::from_kernels(g, kernels).expect("consistent");
        assert_eq!(again.constants, plan.constants);
    }

    #[test]
    fn damaged_bytes_are_errors_not_panics() {
        let g = kiln_ir::text::parse(SRC).expect("parses");
        let bytes = encode(&partition(&g).expect("partitions"));
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut]).is_err(), "truncated at {cut}");
        }
        // Flip every byte in turn: decoding must return (Ok or Err), never panic, and a
        // plan that decodes must still pass or fail `from_kernels` cleanly.
        for i in 8..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x5a;
            if let Ok(k) = decode(&b) {
                let _ = Plan::from_kernels(g.clone(), k);
            }
        }
        let mut huge = PLAN_MAGIC.to_vec();
        huge.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode(&huge).unwrap_err().contains("exceeds"));
    }

    #[test]
    fn from_kernels_rejects_inconsistent_lists() {
        let g = kiln_ir::text::parse(SRC).expect("parses");
        let plan = partition(&g).expect("partitions");
        let mut reversed = plan.kernels.clone();
        reversed.reverse();
        assert!(Plan::from_kernels(g.clone(), reversed)
            .unwrap_err()
            .contains("before it is defined"));
        let mut twice = plan.kernels.clone();
        let dup = twice
            .iter()
            .find(|k| !matches!(k, Kernel::Loop(_)))
            .cloned()
            .expect("a node kernel");
        twice.push(dup);
        assert!(Plan::from_kernels(g.clone(), twice)
            .unwrap_err()
            .contains("twice"));
        assert!(Plan::from_kernels(g, vec![])
            .unwrap_err()
            .contains("never computed"));
    }
}
