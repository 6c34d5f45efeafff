//! Scalars in the text form: how each element type prints (so that it re-parses bitwise
//! exact) and how a numeric literal converts to it, with range checks.

use crate::{DType, Elem};
use half::{bf16, f16};
use std::fmt::Write;

/// A scalar literal as written, before it meets the type it must become.
#[derive(Clone, Debug)]
pub(crate) enum Lit<'a> {
    /// Decimal digits (maybe with fraction/exponent), and a leading `-`.
    Num { neg: bool, text: &'a str },
    /// `inf` or `-inf`.
    Inf { neg: bool },
    /// `nan`, `-nan` or `nan(0xBITS)`.
    Nan { neg: bool, bits: Option<u64> },
    /// `true` or `false`.
    Bool(bool),
}

impl Lit<'_> {
    /// True for literals that only a float type can hold.
    pub(crate) fn is_float(&self) -> bool {
        match self {
            Lit::Num { text, .. } => text.contains(['.', 'e', 'E']),
            Lit::Inf { .. } | Lit::Nan { .. } => true,
            Lit::Bool(_) => false,
        }
    }
}

/// An element type the text form can print and parse.
pub(crate) trait TextElem: Elem {
    /// Appends the literal for `self`.
    fn write(self, out: &mut String);
    /// Converts a literal, or says why it does not fit.
    fn from_lit(lit: &Lit) -> Result<Self, String>;
}

/// An integer literal as i128, checked against u64's range.
fn int_of(lit: &Lit, dtype: DType) -> Result<i128, String> {
    match lit {
        Lit::Num { neg, text } if !lit.is_float() => {
            let m: u64 = text
                .parse()
                .map_err(|_| format!("`{text}` is out of range for {dtype}"))?;
            Ok(if *neg { -(m as i128) } else { m as i128 })
        }
        Lit::Bool(_) => Err(format!("expected an integer for {dtype}, found a bool")),
        _ => Err(format!("expected an integer for {dtype}, found a float")),
    }
}

macro_rules! int_elem {
    ($($t:ty),*) => {$(
        impl TextElem for $t {
            fn write(self, out: &mut String) {
                let _ = write!(out, "{self}");
            }
            fn from_lit(lit: &Lit) -> Result<Self, String> {
                let v = int_of(lit, <$t as Elem>::DTYPE)?;
                <$t>::try_from(v).map_err(|_| {
                    format!("{v} is out of range for {}", <$t as Elem>::DTYPE)
                })
            }
        }
    )*};
}
int_elem!(i8, i16, i32, i64, u8, u16, u32, u64);

impl TextElem for bool {
    fn write(self, out: &mut String) {
        out.push_str(if self { "true" } else { "false" });
    }
    fn from_lit(lit: &Lit) -> Result<Self, String> {
        match lit {
            Lit::Bool(b) => Ok(*b),
            _ => Err("expected `true` or `false` for bool".into()),
        }
    }
}

/// The bit layout facts of one float type that printing and parsing need.
struct FloatBits {
    /// The type's default NaN (`nan`).
    canon: u64,
    /// +infinity.
    inf: u64,
    /// The sign bit.
    sign: u64,
    /// All bits set (the largest bit pattern).
    max: u64,
    /// Hex digits in a bit pattern.
    width: usize,
}

impl FloatBits {
    fn of<B: Into<u64>>(canon: B, inf: B, bytes: usize) -> FloatBits {
        let bits = 8 * bytes as u32;
        FloatBits {
            canon: canon.into(),
            inf: inf.into(),
            sign: 1 << (bits - 1),
            max: u64::MAX >> (64 - bits),
            width: 2 * bytes,
        }
    }

    /// Writes the float with bit pattern `bits`; `finite` writes it when it is finite.
    fn write(&self, out: &mut String, bits: u64, finite: impl FnOnce(&mut String)) {
        let abs = bits & !self.sign;
        let neg = bits & self.sign != 0;
        if abs > self.inf {
            // NaN: the default one by name, any other by its bits.
            if bits == self.canon {
                out.push_str("nan");
            } else if bits == self.canon | self.sign {
                out.push_str("-nan");
            } else {
                let _ = write!(out, "nan(0x{bits:0w$x})", w = self.width);
            }
        } else if abs == self.inf {
            out.push_str(if neg { "-inf" } else { "inf" });
        } else {
            finite(out);
        }
    }

    /// A literal's bit pattern; `from_text` parses a finite literal (None if out of range).
    fn parse(
        &self,
        lit: &Lit,
        dtype: DType,
        from_text: impl FnOnce(&str) -> Option<u64>,
    ) -> Result<u64, String> {
        let (neg, bits) = match lit {
            Lit::Num { neg, text } => (
                *neg,
                from_text(text).ok_or_else(|| format!("`{text}` is out of range for {dtype}"))?,
            ),
            Lit::Inf { neg } => (*neg, self.inf),
            Lit::Nan { neg, bits: None } => (*neg, self.canon),
            Lit::Nan { neg, bits: Some(b) } => {
                if *b > self.max {
                    return Err(format!("NaN bits 0x{b:x} do not fit in {dtype}"));
                }
                (*neg, *b)
            }
            Lit::Bool(_) => return Err(format!("expected a number for {dtype}, found a bool")),
        };
        Ok(if neg { bits ^ self.sign } else { bits })
    }
}

macro_rules! float_elem {
    ($t:ty, $bits:ty, $via:ty, $to:expr, $from:expr) => {
        impl TextElem for $t {
            fn write(self, out: &mut String) {
                let layout = FloatBits::of(
                    <$t>::NAN.to_bits(),
                    <$t>::INFINITY.to_bits(),
                    std::mem::size_of::<$bits>(),
                );
                layout.write(out, self.to_bits().into(), |out| {
                    let via: $via = $to(self);
                    let _ = write!(out, "{via:?}");
                })
            }
            fn from_lit(lit: &Lit) -> Result<Self, String> {
                let layout = FloatBits::of(
                    <$t>::NAN.to_bits(),
                    <$t>::INFINITY.to_bits(),
                    std::mem::size_of::<$bits>(),
                );
                let bits = layout.parse(lit, <$t as Elem>::DTYPE, |text| {
                    let via: $via = text.parse().ok()?;
                    let v: $t = $from(via);
                    (!v.is_infinite()).then(|| v.to_bits().into())
                })?;
                // `parse` keeps the bits within the type's width.
                Ok(<$t>::from_bits(bits as $bits))
            }
        }
    };
}
float_elem!(f32, u32, f32, |x| x, |x| x);
float_elem!(f64, u64, f64, |x| x, |x| x);
// Every f16 and bf16 value is exactly an f32, so they print and parse through f32.
float_elem!(f16, u16, f32, f16::to_f32, f16::from_f32);
float_elem!(bf16, u16, f32, bf16::to_f32, bf16::from_f32);

/// Runs `$body` with `$T` the element type of `$dt`.
macro_rules! by_dtype {
    ($dt:expr, $T:ident => $body:expr) => {{
        #[allow(unused_imports)]
        use half::{bf16, f16};
        match $dt {
            DType::F32 => {
                type $T = f32;
                $body
            }
            DType::F64 => {
                type $T = f64;
                $body
            }
            DType::F16 => {
                type $T = f16;
                $body
            }
            DType::BF16 => {
                type $T = bf16;
                $body
            }
            DType::I8 => {
                type $T = i8;
                $body
            }
            DType::I16 => {
                type $T = i16;
                $body
            }
            DType::I32 => {
                type $T = i32;
                $body
            }
            DType::I64 => {
                type $T = i64;
                $body
            }
            DType::U8 => {
                type $T = u8;
                $body
            }
            DType::U16 => {
                type $T = u16;
                $body
            }
            DType::U32 => {
                type $T = u32;
                $body
            }
            DType::U64 => {
                type $T = u64;
                $body
            }
            DType::Bool => {
                type $T = bool;
                $body
            }
        }
    }};
}
pub(crate) use by_dtype;

#[cfg(test)]
mod tests {
    use super::*;

    fn show<T: TextElem>(x: T) -> String {
        let mut s = String::new();
        x.write(&mut s);
        s
    }

    fn num(text: &str) -> Lit<'_> {
        Lit::Num { neg: false, text }
    }

    #[test]
    fn floats_print_so_they_reparse_as_floats() {
        assert_eq!(show(1.0f32), "1.0");
        assert_eq!(show(-0.0f32), "-0.0");
        assert_eq!(show(1e-5f32), "1e-5");
        assert_eq!(show(f32::NEG_INFINITY), "-inf");
        assert_eq!(show(f32::NAN), "nan");
        assert_eq!(show(f32::from_bits(0x7fc00001)), "nan(0x7fc00001)");
        assert_eq!(show(f16::from_f32(0.5)), "0.5");
        assert_eq!(show(f16::NAN), "nan");
    }

    #[test]
    fn out_of_range_literals_are_errors() {
        assert!(i8::from_lit(&num("128"))
            .unwrap_err()
            .contains("out of range"));
        assert_eq!(
            i8::from_lit(&Lit::Num {
                neg: true,
                text: "128"
            }),
            Ok(-128)
        );
        assert!(u64::from_lit(&num("18446744073709551616")).is_err());
        assert!(f32::from_lit(&num("1e39")).is_err());
        assert!(f16::from_lit(&num("70000")).is_err());
        assert!(i32::from_lit(&num("1.5")).is_err());
        assert!(f16::from_lit(&Lit::Nan {
            neg: false,
            bits: Some(0x1_0000)
        })
        .is_err());
    }
}
