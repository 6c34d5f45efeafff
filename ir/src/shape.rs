//! Symbolic shapes: a dimension is a known size, a named symbol (`B`, `S`) or unknown,
//! and the broadcasting rule that shape inference checks.

use std::fmt;

/// One dimension of a tensor type.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Dim {
    /// A size known at compile time.
    Fixed(u64),
    /// A size bound at run time, named; equal names are equal sizes.
    Sym(String),
    /// A size nothing is known about (printed `?`).
    Unknown,
}

impl Dim {
    /// The size, if it is known.
    pub fn fixed(&self) -> Option<u64> {
        match self {
            Dim::Fixed(n) => Some(*n),
            _ => None,
        }
    }
}

impl From<u64> for Dim {
    fn from(n: u64) -> Dim {
        Dim::Fixed(n)
    }
}

impl From<&str> for Dim {
    fn from(s: &str) -> Dim {
        Dim::Sym(s.to_string())
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Sym(s) => f.write_str(s),
            Dim::Unknown => f.write_str("?"),
        }
    }
}

/// A shape: `None` when even the rank is unknown (printed `[*]`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Shape(pub Option<Vec<Dim>>);

impl Shape {
    /// A shape of known rank.
    pub fn new(dims: Vec<Dim>) -> Shape {
        Shape(Some(dims))
    }

    /// A fully static shape.
    pub fn fixed(dims: &[usize]) -> Shape {
        Shape(Some(dims.iter().map(|&d| Dim::Fixed(d as u64)).collect()))
    }

    /// A shape of unknown rank.
    pub fn unknown() -> Shape {
        Shape(None)
    }

    /// A shape of known rank whose every dim is unknown.
    pub fn unknown_of_rank(rank: usize) -> Shape {
        Shape(Some(vec![Dim::Unknown; rank]))
    }

    /// The dims, if the rank is known.
    pub fn dims(&self) -> Option<&[Dim]> {
        self.0.as_deref()
    }

    /// The rank, if known.
    pub fn rank(&self) -> Option<usize> {
        self.0.as_ref().map(|d| d.len())
    }

    /// The concrete sizes, if every dim is known.
    pub fn concrete(&self) -> Option<Vec<usize>> {
        self.0
            .as_ref()?
            .iter()
            .map(|d| d.fixed().map(|n| n as usize))
            .collect()
    }

    /// True if a run-time shape fits this (possibly symbolic) shape.
    pub fn admits(&self, concrete: &[usize]) -> bool {
        match &self.0 {
            None => true,
            Some(dims) => {
                dims.len() == concrete.len()
                    && dims.iter().zip(concrete).all(|(d, &c)| match d {
                        Dim::Fixed(n) => *n as usize == c,
                        _ => true,
                    })
            }
        }
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            None => f.write_str("[*]"),
            Some(dims) => {
                f.write_str("[")?;
                for (i, d) in dims.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{d}")?;
                }
                f.write_str("]")
            }
        }
    }
}

/// Numpy-style multidirectional broadcasting of two symbolic shapes.
///
/// Returns `Err` with a message when two known sizes conflict.
pub fn broadcast(a: &Shape, b: &Shape) -> Result<Shape, String> {
    let (Some(a), Some(b)) = (a.dims(), b.dims()) else {
        return Ok(Shape::unknown());
    };
    let rank = a.len().max(b.len());
    let mut out = Vec::with_capacity(rank);
    for i in 0..rank {
        let da = if i + a.len() >= rank {
            &a[i + a.len() - rank]
        } else {
            &Dim::Fixed(1)
        };
        let db = if i + b.len() >= rank {
            &b[i + b.len() - rank]
        } else {
            &Dim::Fixed(1)
        };
        out.push(broadcast_dim(da, db).ok_or_else(|| {
            format!(
                "cannot broadcast {} with {}",
                Shape::new(a.to_vec()),
                Shape::new(b.to_vec())
            )
        })?);
    }
    Ok(Shape::new(out))
}

fn broadcast_dim(a: &Dim, b: &Dim) -> Option<Dim> {
    Some(match (a, b) {
        (Dim::Fixed(1), d) | (d, Dim::Fixed(1)) => d.clone(),
        (Dim::Fixed(x), Dim::Fixed(y)) if x == y => Dim::Fixed(*x),
        (Dim::Fixed(_), Dim::Fixed(_)) => return None,
        (Dim::Sym(x), Dim::Sym(y)) if x == y => Dim::Sym(x.clone()),
        // A symbol against a known size > 1: the symbol must equal it at run time.
        (Dim::Fixed(n), _) | (_, Dim::Fixed(n)) => Dim::Fixed(*n),
        _ => Dim::Unknown,
    })
}

/// Broadcasting of concrete shapes, as the interpreter uses it.
pub fn broadcast_concrete(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let rank = a.len().max(b.len());
    let mut out = Vec::with_capacity(rank);
    for i in 0..rank {
        let da = if i + a.len() >= rank {
            a[i + a.len() - rank]
        } else {
            1
        };
        let db = if i + b.len() >= rank {
            b[i + b.len() - rank]
        } else {
            1
        };
        out.push(match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return None,
        });
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_keeps_symbols_and_rejects_conflicts() {
        let a = Shape::new(vec!["B".into(), Dim::Fixed(1), Dim::Fixed(4)]);
        let b = Shape::new(vec![Dim::Fixed(3), Dim::Fixed(4)]);
        assert_eq!(broadcast(&a, &b).unwrap().to_string(), "[B, 3, 4]");
        let c = Shape::fixed(&[5]);
        assert!(broadcast(&a, &c).unwrap_err().contains("cannot broadcast"));
        assert_eq!(broadcast_concrete(&[2, 1], &[3]), Some(vec![2, 3]));
        assert_eq!(broadcast_concrete(&[2], &[3]), None);
    }
}
