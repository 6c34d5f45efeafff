//! The text form's printer: writes a graph so that the parser reads back an equal graph.
//! Every output type is printed, so the parser never needs inference to read a dump.

use super::elem::TextElem;
use super::lexer::{is_bare_name, is_ident};
use crate::{dispatch, Attr, Dim, Graph, Shape, Tensor, TensorType};
use std::fmt::Write;

/// Tensors with at most this many elements print as a list of literals, larger ones as hex.
pub(crate) const MAX_LIST_ELEMS: usize = 16;

/// Decides, per constant tensor, whether it is written to a weights file instead of the
/// text; returns where it goes.
pub(crate) type Externalise<'a> = Option<&'a mut dyn FnMut(&Tensor) -> Option<super::ExternalRef>>;

pub(crate) fn print_graph(g: &Graph, mut ext: Externalise<'_>) -> String {
    let mut out = String::new();
    graph(&mut out, g, 0, &mut ext);
    out.push('\n');
    out
}

fn indent(out: &mut String, level: usize) {
    for _ in 0..level {
        out.push_str("  ");
    }
}

/// `func @name(...) -> (...) { ... }` without a trailing newline; the body is indented one
/// level deeper than `level`.
fn graph(out: &mut String, g: &Graph, level: usize, ext: &mut Externalise<'_>) {
    let name = |id: crate::ValueId| g.values.get(id.index()).map_or("", |v| v.name.as_str());
    let ty = |out: &mut String, id: crate::ValueId| match g.values.get(id.index()) {
        Some(v) => tensor_type(out, &v.ty),
        None => out.push('?'),
    };
    out.push_str("func ");
    sigil_name(out, '@', &g.name);
    out.push('(');
    for (i, &id) in g.inputs.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        sigil_name(out, '%', name(id));
        out.push_str(": ");
        ty(out, id);
    }
    out.push_str(") -> (");
    for (i, &id) in g.outputs.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        ty(out, id);
    }
    out.push(')');
    if !g.metadata.is_empty() {
        out.push_str(" attributes {");
        for (i, (k, v)) in g.metadata.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            if is_ident(k) {
                out.push_str(k);
            } else {
                string(out, k);
            }
            out.push_str(" = ");
            string(out, v);
        }
        out.push('}');
    }
    out.push_str(" {\n");
    for node in &g.nodes {
        indent(out, level + 1);
        for (i, &o) in node.outputs.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            sigil_name(out, '%', name(o));
        }
        if !node.outputs.is_empty() {
            out.push_str(" = ");
        }
        out.push_str(node.op.name());
        for (i, input) in node.inputs.iter().enumerate() {
            out.push_str(if i == 0 { " " } else { ", " });
            match input {
                Some(id) => sigil_name(out, '%', name(*id)),
                None => out.push('_'),
            }
        }
        if !node.attrs.is_empty() {
            out.push_str(" {");
            for (i, (k, v)) in node.attrs.0.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                if is_ident(k) {
                    out.push_str(k);
                } else {
                    string(out, k);
                }
                out.push_str(" = ");
                attr(out, v, level + 1, ext);
            }
            out.push('}');
        }
        for (i, &o) in node.outputs.iter().enumerate() {
            out.push_str(if i == 0 { " : " } else { ", " });
            ty(out, o);
        }
        if !node.name.is_empty() {
            out.push_str(" loc(");
            string(out, &node.name);
            out.push(')');
        }
        out.push('\n');
    }
    indent(out, level + 1);
    out.push_str("return");
    for (i, &o) in g.outputs.iter().enumerate() {
        out.push_str(if i == 0 { " " } else { ", " });
        sigil_name(out, '%', name(o));
    }
    out.push('\n');
    indent(out, level);
    out.push('}');
}

/// `%name`, `@name`, or the quoted form when the name has other characters.
pub(crate) fn sigil_name(out: &mut String, sigil: char, name: &str) {
    out.push(sigil);
    if is_bare_name(name) {
        out.push_str(name);
    } else {
        string(out, name);
    }
}

/// A quoted string with `"`, `\` and non-printable characters escaped.
pub(crate) fn string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() || (c.is_whitespace() && c != ' ') => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `f32[B, 16]`, `f32[]`, `f32[*]`.
pub(crate) fn tensor_type(out: &mut String, t: &TensorType) {
    out.push_str(t.dtype.name());
    shape(out, &t.shape);
}

fn shape(out: &mut String, s: &Shape) {
    let Some(dims) = s.dims() else {
        out.push_str("[*]");
        return;
    };
    out.push('[');
    for (i, d) in dims.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        match d {
            Dim::Fixed(n) => {
                let _ = write!(out, "{n}");
            }
            Dim::Sym(s) if is_ident(s) => out.push_str(s),
            Dim::Sym(s) => string(out, s),
            Dim::Unknown => out.push('?'),
        }
    }
    out.push(']');
}

fn list<T>(out: &mut String, kind: &str, xs: &[T], mut each: impl FnMut(&mut String, &T)) {
    if xs.is_empty() {
        out.push_str(kind);
    }
    out.push('[');
    for (i, x) in xs.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        each(out, x);
    }
    out.push(']');
}

fn attr(out: &mut String, a: &Attr, level: usize, ext: &mut Externalise<'_>) {
    match a {
        Attr::Int(i) => {
            let _ = write!(out, "{i}");
        }
        Attr::Float(x) => x.write(out),
        Attr::Str(s) => string(out, s),
        Attr::Ints(v) => list(out, "ints", v, |out, x| x.write(out)),
        Attr::Floats(v) => list(out, "floats", v, |out, x| x.write(out)),
        Attr::Strs(v) => list(out, "strings", v, |out, s| string(out, s)),
        Attr::Tensor(t) => match ext.as_mut().and_then(|f| f(t)) {
            Some(r) => external(out, t, &r),
            None => tensor(out, t),
        },
        Attr::Graph(g) => graph(out, g, level, ext),
    }
}

/// `dense<f32[2]> [1.0, 2.0]`, or `dense<f32[768, 768]> 0x...` past [`MAX_LIST_ELEMS`].
pub(crate) fn tensor(out: &mut String, t: &Tensor) {
    out.push_str("dense<");
    out.push_str(t.dtype().name());
    shape(out, &Shape::fixed(t.shape()));
    out.push_str("> ");
    if t.len() <= MAX_LIST_ELEMS {
        dispatch!(t.data(), v, T => list(out, "", v, |out, x| TextElem::write(*x, out)));
    } else {
        hex(out, &t.data().to_le_bytes());
    }
}

/// `dense<f32[768, 768]> file("weights.safetensors", "layer0.wq")`, or
/// `file("w.npy")` for a file that holds just this tensor.
fn external(out: &mut String, t: &Tensor, r: &super::ExternalRef) {
    out.push_str("dense<");
    out.push_str(t.dtype().name());
    shape(out, &Shape::fixed(t.shape()));
    out.push_str("> file(");
    string(out, &r.file);
    if let Some(k) = &r.key {
        out.push_str(", ");
        string(out, k);
    }
    out.push(')');
}

/// `0x` and two lowercase hex digits per byte, written without per-byte allocation.
fn hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut buf = vec![0u8; 2 * bytes.len()];
    for (pair, &b) in buf.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[(b >> 4) as usize];
        pair[1] = DIGITS[(b & 15) as usize];
    }
    out.reserve(2 + buf.len());
    out.push_str("0x");
    out.push_str(std::str::from_utf8(&buf).expect("hex digits are ASCII"));
}
