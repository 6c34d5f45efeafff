//! The rewrite rules, one family per file, and the named guards they use. Each rule is one
//! `rw!` line under a comment stating its identity. Guards read the e-class analysis
//! (types, constants, facts); none of them looks at more than a rule's own variables and
//! the matched class. No blanket commutativity or associativity: where an operand order
//! matters, both orders are separate rules.

pub mod algebra;
pub mod epilogue;
pub mod norm;

use super::analysis::{Data, KEGraph, KilnAnalysis};
use super::lang::Kn;
use egg::{Id, Rewrite, Subst, Var};
use kiln_ir::Dim;

/// A rewrite rule over kiln's e-graph.
pub type Rule = Rewrite<Kn, KilnAnalysis>;

/// Every rule of every family.
pub fn all() -> Vec<Rule> {
    let mut r = algebra::rules();
    r.extend(norm::rules());
    r.extend(epilogue::rules());
    r
}

/// A guard: a condition on a match.
pub trait Guard: Fn(&mut KEGraph, Id, &Subst) -> bool {}
impl<F: Fn(&mut KEGraph, Id, &Subst) -> bool> Guard for F {}

fn var(s: &str) -> Var {
    s.parse().expect("rule variables are written `?name`")
}

fn on(v: &str, f: impl Fn(&Data) -> bool) -> impl Guard {
    let v = var(v);
    move |eg: &mut KEGraph, _: Id, s: &Subst| f(&eg[s[v]].data)
}

fn dims(d: &Data) -> Option<&[Dim]> {
    d.ty().and_then(|t| t.shape.dims())
}

/// `v` is a constant.
pub fn is_const(v: &str) -> impl Guard {
    on(v, |d| d.konst().is_some())
}

/// `v` is mean-free along its last axis.
pub fn is_mean_free(v: &str) -> impl Guard {
    on(v, |d| d.mean_free)
}

/// `v` is not (known to be) mean-free along its last axis.
pub fn not_mean_free(v: &str) -> impl Guard {
    on(v, |d| !d.mean_free)
}

/// Every element of `v` is ≥ 0.
pub fn is_nonneg(v: &str) -> impl Guard {
    on(v, |d| d.nonneg)
}

fn all_equal(d: &Data, x: f64) -> bool {
    d.konst()
        .is_some_and(|k| k.dtype().is_float() && k.to_f64s().iter().all(|&e| e == x))
}

/// `v` is a constant of ones.
pub fn is_ones(v: &str) -> impl Guard {
    on(v, |d| all_equal(d, 1.0))
}

/// `v` is not a constant of ones.
pub fn not_ones(v: &str) -> impl Guard {
    on(v, |d| !all_equal(d, 1.0))
}

/// `v` is a constant of zeros.
pub fn is_zeros(v: &str) -> impl Guard {
    on(v, |d| all_equal(d, 0.0))
}

/// `v` has rank `r`.
pub fn rank_is(v: &str, r: usize) -> impl Guard {
    on(v, move |d| dims(d).is_some_and(|ds| ds.len() == r))
}

/// `v` is a float tensor (the rules' constant folding is for floats).
pub fn is_float(v: &str) -> impl Guard {
    on(v, |d| d.ty().is_some_and(|t| t.dtype.is_float()))
}

/// The attribute set `a` normalises (or applies an activation along) the last axis of `x`.
pub fn is_last_axis(a: &str, x: &str) -> impl Guard {
    let (a, x) = (var(a), var(x));
    move |eg: &mut KEGraph, _: Id, s: &Subst| {
        let rank = dims(&eg[s[x]].data).map(|d| d.len() as i64);
        let axis = eg[s[a]]
            .data
            .attrs
            .as_ref()
            .and_then(|at| at.int_or("axis", -1).ok());
        matches!((rank, axis), (Some(r), Some(ax)) if ax == -1 || ax == r - 1)
    }
}

/// The attribute set `a` has string attribute `key` equal to `val` (absent reads as
/// `default`).
pub fn attr_is(a: &str, key: &'static str, default: &'static str, val: &'static str) -> impl Guard {
    on(a, move |d| {
        d.attrs
            .as_ref()
            .and_then(|at| at.string_or(key, default.into()).ok())
            .is_some_and(|s| s == val)
    })
}

/// `v` has the same (known-rank) shape as the matched class.
pub fn same_shape_as_root(v: &str) -> impl Guard {
    let v = var(v);
    move |eg: &mut KEGraph, root: Id, s: &Subst| {
        let a = eg[s[v]].data.ty().map(|t| t.shape.clone());
        let b = eg[root].data.ty().map(|t| t.shape.clone());
        matches!((a, b), (Some(a), Some(b)) if a.rank().is_some() && a == b)
    }
}

/// `v` broadcasts into the matched class's shape without enlarging it (a bias or a
/// residual of the result).
pub fn fits_root(v: &str) -> impl Guard {
    let v = var(v);
    move |eg: &mut KEGraph, root: Id, s: &Subst| {
        let (Some(b), Some(r)) = (dims(&eg[s[v]].data), dims(&eg[root].data)) else {
            return false;
        };
        b.len() <= r.len()
            && b.iter()
                .rev()
                .zip(r.iter().rev())
                .all(|(x, y)| x == y || *x == Dim::Fixed(1))
    }
}

/// The product `x·w` (w a matrix) has exactly the matched class's shape, so a `linear`
/// over x and w can stand for the class.
pub fn linear_is_root(x: &str, w: &str) -> impl Guard {
    let (x, w) = (var(x), var(w));
    move |eg: &mut KEGraph, root: Id, s: &Subst| {
        let (Some(xd), Some(wd), Some(r)) = (
            dims(&eg[s[x]].data),
            dims(&eg[s[w]].data),
            dims(&eg[root].data),
        ) else {
            return false;
        };
        let (Some((_, lead)), [_, n]) = (xd.split_last(), wd) else {
            return false;
        };
        let mut want = lead.to_vec();
        want.push(n.clone());
        want == r
    }
}

/// A `gemm` attribute set computing plain `a·b + c` (alpha = beta = 1, no transA), with
/// transB as given.
pub fn gemm_plain(a: &str, trans_b: i64) -> impl Guard {
    on(a, move |d| {
        d.attrs.as_ref().is_some_and(|at| {
            at.float_or("alpha", 1.0).ok() == Some(1.0)
                && at.float_or("beta", 1.0).ok() == Some(1.0)
                && at.int_or("transA", 0).ok() == Some(0)
                && at.int_or("transB", 0).ok() == Some(trans_b)
        })
    })
}

/// A batch_norm attribute set in inference mode.
pub fn bn_inference(a: &str) -> impl Guard {
    on(a, |d| {
        d.attrs
            .as_ref()
            .is_some_and(|at| at.int_or("training_mode", 0).ok() == Some(0))
    })
}
