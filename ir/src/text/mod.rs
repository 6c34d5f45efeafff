//! The text form (kiln's DSL): a printer and a parser that round-trip exactly, so that
//! `parse(&print(&g)) == g` for every graph. It is what users write models in and what
//! every dump, test and error message shows.
//!
//! ```text
//! func @mlp(%x: f32[B, 16], %w: f32[16, 4]) -> (f32[B, 4]) {
//!   %0 = matmul %x, %w : f32[B, 4]
//!   %1 = relu %0 : f32[B, 4] loc("/mlp/Relu")
//!   %a, %b = split %1, %s {axis = 1} : f32[B, 2], f32[B, 2]
//!   %c = slice %x, %st, _, %ax : f32[*]
//!   %k = constant {value = dense<f32[2, 2]> [1.0, 2.0, 3.0, 4.0]} : f32[2, 2]
//!   return %0, %a
//! }
//! ```
//!
//! - Value names are `%` and `[A-Za-z0-9_.:/-]+` (not ending in `:`), or quoted: `%"a b"`.
//!   The graph name is `@name` or `@"..."`. A node's origin name is `loc("...")`.
//! - `attributes {key = "text", ...}` between the result types and the body is the graph's
//!   metadata (`Graph::metadata`, strings only), e.g. the `approx_report` of a graph made by
//!   approximate rewrites.
//! - `_` is an omitted optional input. Dims are integers, symbols (`B`, or quoted `"n+1"`)
//!   or `?`; `[*]` is a shape of unknown rank.
//! - The types after `:` are optional: when given they are taken verbatim, when omitted
//!   they are inferred with the ops' shape rules. `parse` does not verify the graph.
//! - Attributes: ints `-3`, floats `1.0 -0.0 1e-5 inf -inf nan nan(0x7fc00001)` (the last
//!   is a NaN by its bits), strings `"s"`, lists `[1, 2]` `[1.5]` `["a"]`, empty lists
//!   `ints[]` `floats[]` `strings[]`, tensors `dense<f32[2]> [1.0, 2.0]` or, past 16
//!   elements, `dense<f32[768, 768]> 0x...` (little-endian bytes in hex), and graphs as a
//!   nested `func`, which is a scope of its own (it sees none of the outer values).
//! - A tensor's elements may live in a weights file beside the model:
//!   `dense<f32[64, 64]> file("weights.safetensors", "layer0.wq")` names a tensor of a
//!   safetensors file, `dense<f32[64]> file("b.npy")` an `.npy` file. [`parse`] rejects
//!   them (it does no I/O); [`parse_with`] takes the function that reads them, and
//!   `kiln_frontend::load` reads them memory-mapped, from the model's folder only.
//!   `//` starts a comment. Statements need no separators.
//!
//! ```
//! let src = "func @f(%x: f32[B, 4]) -> (f32[B, 4]) {\n  %y = relu %x : f32[B, 4]\n  return %y\n}\n";
//! let g: kiln_ir::Graph = src.parse().unwrap();
//! assert_eq!(kiln_ir::text::print(&g), src);
//! ```

mod elem;
mod lexer;
mod parser;
mod printer;

use crate::{Graph, Tensor};
use std::fmt;
use std::str::FromStr;

pub use parser::MAX_NESTING;

/// Prints a graph in the text form. [`parse`] reads it back to an equal graph.
pub fn print(g: &Graph) -> String {
    printer::print_graph(g, None)
}

/// Prints a graph, asking `externalise` for every constant tensor whether its elements go
/// to a weights file (`Some(where)`: printed as `file(...)`; the caller writes the file)
/// or stay in the text (`None`). [`parse_with`] reads it back to an equal graph.
pub fn print_with(
    g: &Graph,
    externalise: &mut dyn FnMut(&Tensor) -> Option<ExternalRef>,
) -> String {
    printer::print_graph(g, Some(externalise))
}

/// Parses the text form into a graph. Types that the text omits are inferred; the graph
/// is not verified (see [`crate::verify`]). A tensor in a weights file (`file(...)`) is an
/// error here: use [`parse_with`].
pub fn parse(src: &str) -> Result<Graph, ParseError> {
    parser::parse_graph(src, None)
}

/// Parses the text form, reading each `file(...)` tensor with `resolve` (given where it
/// is and the dtype and shape the text declares; its error message is shown at the
/// reference).
pub fn parse_with<'r>(src: &str, resolve: &'r mut Resolve<'r>) -> Result<Graph, ParseError> {
    parser::parse_graph(src, Some(resolve))
}

/// Where a constant's elements live outside the text.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExternalRef {
    /// The file, relative to the model's folder.
    pub file: String,
    /// The tensor's name inside a safetensors file; `None` for a one-tensor file (`.npy`).
    pub key: Option<String>,
}

/// Reads the tensor an [`ExternalRef`] names, given the dtype and shape the text declares.
pub type Resolve<'a> =
    dyn FnMut(&ExternalRef, crate::DType, &[usize]) -> Result<Tensor, String> + 'a;

impl fmt::Display for Graph {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&print(self))
    }
}

impl FromStr for Graph {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Graph, ParseError> {
        parse(s)
    }
}

/// A syntax or naming error in the text form, with where it is. Its `Display` shows the
/// line with a caret under the problem, rustc-style.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ParseError {
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub column: usize,
    /// What is wrong.
    pub message: String,
    /// The text of the line (an excerpt around the column when the line is very long).
    pub source_line: String,
    /// 1-based column of the problem within `source_line`.
    pub snippet_column: usize,
}

/// Lines longer than this many characters are shown as an excerpt around the column.
const SNIPPET_CHARS: usize = 120;

impl ParseError {
    /// An error at byte offset `pos` of `src`.
    pub(crate) fn at(src: &str, pos: usize, message: String) -> ParseError {
        let pos = floor_char_boundary(src, pos.min(src.len()));
        let start = src[..pos].rfind('\n').map_or(0, |i| i + 1);
        let end = src[pos..].find('\n').map_or(src.len(), |i| pos + i);
        let line = src.as_bytes()[..start]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1;
        let text = src[start..end].trim_end_matches('\r');
        let column = src[start..pos].chars().count() + 1;
        let (source_line, snippet_column) = if text.chars().count() <= SNIPPET_CHARS {
            (text.to_string(), column)
        } else {
            let first = column.saturating_sub(SNIPPET_CHARS / 2 + 1);
            let mut s = String::from(if first > 0 { "..." } else { "" });
            s.extend(text.chars().skip(first).take(SNIPPET_CHARS));
            let snippet_column = column - first + if first > 0 { 3 } else { 0 };
            if text.chars().count() > first + SNIPPET_CHARS {
                s.push_str("...");
            }
            (s, snippet_column)
        };
        ParseError {
            line,
            column,
            message,
            source_line,
            snippet_column,
        }
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let num = self.line.to_string();
        let pad = " ".repeat(num.len());
        writeln!(f, "error: {}", self.message)?;
        writeln!(f, "{pad}--> {}:{}", self.line, self.column)?;
        writeln!(f, "{pad} |")?;
        writeln!(f, "{num} | {}", self.source_line)?;
        // Keep tabs as tabs so the caret lines up under the same characters.
        let lead: String = self
            .source_line
            .chars()
            .take(self.snippet_column.saturating_sub(1))
            .map(|c| if c == '\t' { '\t' } else { ' ' })
            .collect();
        write!(f, "{pad} | {lead}^")
    }
}
