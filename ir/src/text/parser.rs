//! The text form's parser: a recursive-descent reader over the lexer's tokens that builds
//! a [`Graph`], resolving value names per function scope, taking declared types verbatim
//! and inferring omitted ones. Every error carries the line and column of its token.

use super::elem::{by_dtype, Lit, TextElem};
use super::lexer::{Lexer, Tok, Token};
use super::ParseError;
use crate::infer::fold_small_constants;
use crate::ops::{self, Fact};
use crate::{Attr, Attrs, DType, Dim, Graph, OpKind, Shape, Tensor, TensorType, ValueId};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// How deeply `func`s may nest inside attributes (If branches within If branches).
pub const MAX_NESTING: usize = 32;

pub(crate) fn parse_graph<'r>(
    src: &str,
    resolve: Option<&'r mut super::Resolve<'r>>,
) -> Result<Graph, ParseError> {
    let mut p = Parser {
        src,
        lex: Lexer::new(src),
        peeked: None,
        resolve,
    };
    let g = p.func(0)?;
    let t = p.bump()?;
    if t.tok != Tok::Eof {
        return Err(p.err(
            t.pos,
            format!(
                "expected end of input after the function, found {}",
                t.tok.describe()
            ),
        ));
    }
    Ok(g)
}

struct Parser<'a, 'r> {
    src: &'a str,
    lex: Lexer<'a>,
    peeked: Option<Token<'a>>,
    resolve: Option<&'r mut super::Resolve<'r>>,
}

/// One function's names and what inference knows about its values.
#[derive(Default)]
struct Scope {
    graph: Graph,
    names: HashMap<String, ValueId>,
    facts: Vec<Fact>,
}

impl Scope {
    fn define(&mut self, name: &str, ty: TensorType, fact: Fact) -> Option<ValueId> {
        if self.names.contains_key(name) {
            return None;
        }
        let id = self.graph.add_value(name, ty);
        self.names.insert(name.to_string(), id);
        self.facts.push(fact);
        Some(id)
    }
}

impl<'a, 'r> Parser<'a, 'r> {
    fn err(&self, pos: usize, msg: String) -> ParseError {
        ParseError::at(self.src, pos, msg)
    }

    fn peek(&mut self) -> Result<&Token<'a>, ParseError> {
        if self.peeked.is_none() {
            self.peeked = Some(self.lex.next_token()?);
        }
        Ok(self.peeked.as_ref().expect("just peeked"))
    }

    fn peek_tok(&mut self) -> Result<&Tok<'a>, ParseError> {
        Ok(&self.peek()?.tok)
    }

    fn bump(&mut self) -> Result<Token<'a>, ParseError> {
        match self.peeked.take() {
            Some(t) => Ok(t),
            None => self.lex.next_token(),
        }
    }

    /// Consumes the token if it is the punctuation `c`.
    fn eat(&mut self, c: char) -> Result<bool, ParseError> {
        if *self.peek_tok()? == Tok::Punct(c) {
            self.bump()?;
            return Ok(true);
        }
        Ok(false)
    }

    fn eat_ident(&mut self, word: &str) -> Result<bool, ParseError> {
        if *self.peek_tok()? == Tok::Ident(word) {
            self.bump()?;
            return Ok(true);
        }
        Ok(false)
    }

    /// An error at the next token: "expected {what}, found ...".
    fn expected<T>(&mut self, what: &str) -> Result<T, ParseError> {
        let t = self.peek()?.clone();
        Err(self.err(
            t.pos,
            format!("expected {what}, found {}", t.tok.describe()),
        ))
    }

    fn expect(&mut self, c: char) -> Result<usize, ParseError> {
        let pos = self.peek()?.pos;
        if !self.eat(c)? {
            return self.expected(&format!("`{c}`"));
        }
        Ok(pos)
    }

    /// `func @name(%x: type, ...) -> (type, ...) { statements; return %v, ... }`
    fn func(&mut self, depth: usize) -> Result<Graph, ParseError> {
        let start = self.peek()?.pos;
        if !self.eat_ident("func")? {
            return self.expected("`func`");
        }
        if depth > MAX_NESTING {
            return Err(self.err(
                start,
                format!("functions nest too deeply (the limit is {MAX_NESTING})"),
            ));
        }
        let t = self.bump()?;
        let Tok::Global(name) = t.tok else {
            return Err(self.err(
                t.pos,
                format!(
                    "expected the function name `@name`, found {}",
                    t.tok.describe()
                ),
            ));
        };
        let mut scope = Scope {
            graph: Graph::new(&name),
            ..Scope::default()
        };
        self.expect('(')?;
        if !self.eat(')')? {
            loop {
                let t = self.bump()?;
                let Tok::Value(name) = t.tok else {
                    return Err(self.err(
                        t.pos,
                        format!("expected an input `%name`, found {}", t.tok.describe()),
                    ));
                };
                self.expect(':')?;
                let ty = self.tensor_type()?;
                let id = scope
                    .define(&name, ty.clone(), Fact::of(ty))
                    .ok_or_else(|| self.err(t.pos, format!("`%{name}` is defined twice")))?;
                scope.graph.inputs.push(id);
                if self.eat(')')? {
                    break;
                }
                if !self.eat(',')? {
                    return self.expected("`,` or `)`");
                }
            }
        }
        // The result types, checked against the returned values once they are known.
        let mut result_types: Option<Vec<(usize, TensorType)>> = None;
        if *self.peek_tok()? == Tok::Arrow {
            self.bump()?;
            let mut tys = vec![];
            if self.eat('(')? {
                if !self.eat(')')? {
                    loop {
                        let pos = self.peek()?.pos;
                        tys.push((pos, self.tensor_type()?));
                        if self.eat(')')? {
                            break;
                        }
                        if !self.eat(',')? {
                            return self.expected("`,` or `)`");
                        }
                    }
                }
            } else {
                let pos = self.peek()?.pos;
                tys.push((pos, self.tensor_type()?));
            }
            result_types = Some(tys);
        }
        // Graph metadata: `attributes {key = "value", ...}`, string values only.
        if self.eat_ident("attributes")? {
            let pos = self.peek()?.pos;
            for (k, v) in self.attrs(depth)?.0 {
                match v {
                    Attr::Str(v) => {
                        scope.graph.metadata.insert(k, v);
                    }
                    _ => {
                        return Err(
                            self.err(pos, format!("function attribute `{k}` must be a string"))
                        )
                    }
                }
            }
        }
        self.expect('{')?;
        loop {
            if *self.peek_tok()? == Tok::Ident("return") {
                let ret_pos = self.bump()?.pos;
                let mut outs = vec![];
                if matches!(self.peek_tok()?, Tok::Value(_)) {
                    loop {
                        outs.push(self.use_value(&scope)?);
                        if !self.eat(',')? {
                            break;
                        }
                    }
                }
                if !self.eat('}')? {
                    return self.expected("`}` after `return`");
                }
                if let Some(tys) = result_types {
                    if tys.len() != outs.len() {
                        return Err(self.err(
                            ret_pos,
                            format!(
                                "the function declares {} results but returns {}",
                                tys.len(),
                                outs.len()
                            ),
                        ));
                    }
                    for ((pos, ty), &o) in tys.iter().zip(&outs) {
                        let actual = scope.graph.ty(o);
                        if actual != ty {
                            let mut a = String::new();
                            let mut d = String::new();
                            super::printer::tensor_type(&mut a, actual);
                            super::printer::tensor_type(&mut d, ty);
                            return Err(self.err(
                                *pos,
                                format!(
                                    "declared result type {d} but `%{}` is {a}",
                                    scope.graph.value(o).name
                                ),
                            ));
                        }
                    }
                }
                scope.graph.outputs = outs;
                return Ok(scope.graph);
            }
            self.statement(&mut scope, depth)?;
        }
    }

    /// A use of a value: `%name`, which must be defined already.
    fn use_value(&mut self, scope: &Scope) -> Result<ValueId, ParseError> {
        let t = self.bump()?;
        match t.tok {
            Tok::Value(name) => scope
                .names
                .get(name.as_ref())
                .copied()
                .ok_or_else(|| self.err(t.pos, format!("use of undefined value `%{name}`"))),
            other => Err(self.err(
                t.pos,
                format!("expected a value `%name`, found {}", other.describe()),
            )),
        }
    }

    /// True if the tokens ahead read `%a, %b, ... =`: the next statement's results, not
    /// inputs of the current node.
    fn starts_statement(&mut self) -> bool {
        let mut look = self.lex.clone();
        loop {
            match look.next_token().map(|t| t.tok) {
                Ok(Tok::Punct('=')) => return true,
                Ok(Tok::Punct(',')) => {}
                _ => return false,
            }
            if !matches!(look.next_token().map(|t| t.tok), Ok(Tok::Value(_))) {
                return false;
            }
        }
    }

    /// `%a, %b = op %x, _, %y {attrs} : type, type loc("name")`, or `op ...` without results.
    fn statement(&mut self, scope: &mut Scope, depth: usize) -> Result<(), ParseError> {
        let mut outs: Vec<(usize, String)> = vec![];
        if matches!(self.peek_tok()?, Tok::Value(_)) {
            loop {
                let t = self.bump()?;
                let Tok::Value(name) = t.tok else {
                    return Err(self.err(
                        t.pos,
                        format!("expected a result `%name`, found {}", t.tok.describe()),
                    ));
                };
                outs.push((t.pos, name.into_owned()));
                if !self.eat(',')? {
                    break;
                }
            }
            if !self.eat('=')? {
                let last = &outs[outs.len() - 1].1;
                let mut shown = String::new();
                super::printer::sigil_name(&mut shown, '%', last);
                return self.expected(&format!("`=` after `{shown}`"));
            }
        }
        let t = self.bump()?;
        let op_pos = t.pos;
        let op = match t.tok {
            Tok::Ident(word) => OpKind::from_name(word).ok_or_else(|| {
                let hint = closest_op(word)
                    .map(|s| format!("; did you mean `{s}`?"))
                    .unwrap_or_default();
                self.err(t.pos, format!("unknown op `{word}`{hint}"))
            })?,
            other => {
                return Err(self.err(
                    t.pos,
                    format!("expected an op name, found {}", other.describe()),
                ))
            }
        };
        let mut inputs = vec![];
        let has_inputs = match self.peek_tok()? {
            Tok::Ident("_") => true,
            Tok::Value(_) => !self.starts_statement(),
            _ => false,
        };
        if has_inputs {
            loop {
                if self.eat_ident("_")? {
                    inputs.push(None);
                } else {
                    inputs.push(Some(self.use_value(scope)?));
                }
                if !self.eat(',')? {
                    break;
                }
            }
        }
        let attrs = if *self.peek_tok()? == Tok::Punct('{') {
            self.attrs(depth)?
        } else {
            Attrs::new()
        };
        let mut types = None;
        if *self.peek_tok()? == Tok::Punct(':') {
            let colon = self.bump()?.pos;
            let mut tys = vec![self.tensor_type()?];
            while self.eat(',')? {
                tys.push(self.tensor_type()?);
            }
            if tys.len() != outs.len() {
                return Err(self.err(
                    colon,
                    format!(
                        "the node has {} results but {} types",
                        outs.len(),
                        tys.len()
                    ),
                ));
            }
            types = Some(tys);
        }
        let mut loc = String::new();
        if self.eat_ident("loc")? {
            self.expect('(')?;
            let t = self.bump()?;
            let Tok::Str(s) = t.tok else {
                return Err(self.err(
                    t.pos,
                    format!(
                        "expected a string in `loc(...)`, found {}",
                        t.tok.describe()
                    ),
                ));
            };
            loc = s.into_owned();
            self.expect(')')?;
        }
        let facts: Vec<Fact> = match types {
            Some(tys) => tys
                .into_iter()
                .map(|ty| declared_fact(op, &attrs, ty))
                .collect(),
            None if outs.is_empty() => vec![],
            None => {
                let ins: Vec<Option<&Fact>> = inputs
                    .iter()
                    .map(|i: &Option<ValueId>| i.map(|i| &scope.facts[i.index()]))
                    .collect();
                let why = |m: String| {
                    self.err(
                        op_pos,
                        format!(
                            "cannot infer the result types of `{}`: {m} (write them after `:`)",
                            op.name()
                        ),
                    )
                };
                let mut out = ops::infer(op, &attrs, &ins).map_err(why)?;
                if out.len() < outs.len() {
                    return Err(why(format!(
                        "the op gives {} results but the node names {}",
                        out.len(),
                        outs.len()
                    )));
                }
                out.truncate(outs.len());
                fold_small_constants(op, &attrs, &ins, &mut out);
                for f in &mut out {
                    if f.dims.is_none() {
                        f.dims = f.value_dims();
                    }
                }
                out
            }
        };
        let mut out_ids = Vec::with_capacity(outs.len());
        for ((pos, name), fact) in outs.into_iter().zip(facts) {
            let id = scope.define(&name, fact.ty.clone(), fact).ok_or_else(|| {
                let mut shown = String::new();
                super::printer::sigil_name(&mut shown, '%', &name);
                self.err(pos, format!("`{shown}` is defined twice"))
            })?;
            out_ids.push(id);
        }
        scope.graph.nodes.push(crate::Node {
            op,
            attrs,
            inputs,
            outputs: out_ids,
            name: loc,
        });
        Ok(())
    }

    /// `f32[B, 16]`, `f32[]`, `f32[*]`.
    fn tensor_type(&mut self) -> Result<TensorType, ParseError> {
        let dtype = self.dtype()?;
        self.expect('[')?;
        if self.eat('*')? {
            self.expect(']')?;
            return Ok(TensorType::new(dtype, Shape::unknown()));
        }
        let mut dims = vec![];
        if !self.eat(']')? {
            loop {
                let t = self.bump()?;
                dims.push(match t.tok {
                    Tok::Num(s) => Dim::Fixed(self.u64_of(t.pos, s)?),
                    Tok::Ident(s) => Dim::Sym(s.to_string()),
                    Tok::Str(s) => Dim::Sym(s.into_owned()),
                    Tok::Punct('?') => Dim::Unknown,
                    other => {
                        return Err(self.err(
                            t.pos,
                            format!(
                                "expected a dim (a size, a symbol or `?`), found {}",
                                other.describe()
                            ),
                        ))
                    }
                });
                if self.eat(']')? {
                    break;
                }
                if !self.eat(',')? {
                    return self.expected("`,` or `]`");
                }
            }
        }
        Ok(TensorType::new(dtype, Shape::new(dims)))
    }

    fn dtype(&mut self) -> Result<DType, ParseError> {
        let t = self.bump()?;
        match t.tok {
            Tok::Ident(s) => s.parse().map_err(|m: String| self.err(t.pos, m)),
            other => Err(self.err(
                t.pos,
                format!(
                    "expected a dtype (f32, i64, ...), found {}",
                    other.describe()
                ),
            )),
        }
    }

    fn u64_of(&self, pos: usize, s: &str) -> Result<u64, ParseError> {
        if s.contains(['.', 'e', 'E']) {
            return Err(self.err(pos, format!("expected an integer, found `{s}`")));
        }
        s.parse()
            .map_err(|_| self.err(pos, format!("`{s}` is too large")))
    }

    /// `{name = value, ...}`
    fn attrs(&mut self, depth: usize) -> Result<Attrs, ParseError> {
        self.expect('{')?;
        let mut map = BTreeMap::new();
        if self.eat('}')? {
            return Ok(Attrs(map));
        }
        loop {
            let t = self.bump()?;
            let name = match t.tok {
                Tok::Ident(s) => s.to_string(),
                Tok::Str(s) => s.into_owned(),
                other => {
                    return Err(self.err(
                        t.pos,
                        format!("expected an attribute name, found {}", other.describe()),
                    ))
                }
            };
            if map.contains_key(&name) {
                return Err(self.err(t.pos, format!("attribute `{name}` is given twice")));
            }
            if !self.eat('=')? {
                return self.expected(&format!("`=` after attribute `{name}`"));
            }
            let v = self.attr_value(depth)?;
            map.insert(name, v);
            if self.eat('}')? {
                return Ok(Attrs(map));
            }
            if !self.eat(',')? {
                return self.expected("`,` or `}`");
            }
        }
    }

    fn attr_value(&mut self, depth: usize) -> Result<Attr, ParseError> {
        let t = self.peek()?.clone();
        match t.tok {
            Tok::Str(s) => {
                self.bump()?;
                Ok(Attr::Str(s.into_owned()))
            }
            Tok::Ident("func") => Ok(Attr::Graph(Arc::new(self.func(depth + 1)?))),
            Tok::Ident("dense") => Ok(Attr::Tensor(Arc::new(self.tensor()?))),
            Tok::Ident(kind @ ("ints" | "floats" | "strings")) => {
                self.bump()?;
                self.list(Some(kind))
            }
            Tok::Punct('[') => self.list(None),
            _ => {
                let (pos, lit) = self.lit()?;
                if lit.is_float() {
                    Ok(Attr::Float(
                        f32::from_lit(&lit).map_err(|m| self.err(pos, m))?,
                    ))
                } else {
                    Ok(Attr::Int(
                        i64::from_lit(&lit).map_err(|m| self.err(pos, m))?,
                    ))
                }
            }
        }
    }

    /// `[1, 2]`, `[1.5]`, `["a"]`, or typed: `ints[...]`, `floats[...]`, `strings[...]`.
    fn list(&mut self, kind: Option<&str>) -> Result<Attr, ParseError> {
        let open = self.expect('[')?;
        if kind == Some("strings") || matches!(self.peek_tok()?, Tok::Str(_)) {
            let mut v = vec![];
            if !self.eat(']')? {
                loop {
                    let t = self.bump()?;
                    let Tok::Str(s) = t.tok else {
                        return Err(self.err(
                            t.pos,
                            format!("expected a string, found {}", t.tok.describe()),
                        ));
                    };
                    v.push(s.into_owned());
                    if self.eat(']')? {
                        break;
                    }
                    if !self.eat(',')? {
                        return self.expected("`,` or `]`");
                    }
                }
            }
            if kind.is_some_and(|k| k != "strings") {
                return Err(self.err(
                    open,
                    format!("a list of strings is not {}", kind.unwrap_or("")),
                ));
            }
            return Ok(Attr::Strs(v));
        }
        let mut lits = vec![];
        if !self.eat(']')? {
            loop {
                lits.push(self.lit()?);
                if self.eat(']')? {
                    break;
                }
                if !self.eat(',')? {
                    return self.expected("`,` or `]`");
                }
            }
        }
        let floats = match kind {
            Some("ints") => false,
            Some(_) => true,
            None if lits.is_empty() => {
                return Err(self.err(
                    open,
                    "an empty list needs its kind: `ints[]`, `floats[]` or `strings[]`".into(),
                ))
            }
            None => lits.iter().any(|(_, l)| l.is_float()),
        };
        if floats {
            let v = lits
                .iter()
                .map(|(pos, l)| f32::from_lit(l).map_err(|m| self.err(*pos, m)))
                .collect::<Result<_, _>>()?;
            Ok(Attr::Floats(v))
        } else {
            let v = lits
                .iter()
                .map(|(pos, l)| i64::from_lit(l).map_err(|m| self.err(*pos, m)))
                .collect::<Result<_, _>>()?;
            Ok(Attr::Ints(v))
        }
    }

    /// A scalar literal: `-`? (number | `inf` | `nan` | `nan(0x...)`), `true`, `false`.
    fn lit(&mut self) -> Result<(usize, Lit<'a>), ParseError> {
        let first = self.bump()?;
        let pos = first.pos;
        let (neg, t) = if first.tok == Tok::Punct('-') {
            (true, self.bump()?)
        } else {
            (false, first)
        };
        let lit = match t.tok {
            Tok::Num(text) => Lit::Num { neg, text },
            Tok::Ident("inf") => Lit::Inf { neg },
            Tok::Ident("nan") => {
                let mut bits = None;
                if self.eat('(')? {
                    let h = self.bump()?;
                    let Tok::Hex(digits) = h.tok else {
                        return Err(self.err(
                            h.pos,
                            format!("expected NaN bits `0x...`, found {}", h.tok.describe()),
                        ));
                    };
                    let b = u64::from_str_radix(digits, 16).map_err(|_| {
                        self.err(h.pos, "NaN bits must be 1 to 16 hex digits".into())
                    })?;
                    bits = Some(b);
                    self.expect(')')?;
                }
                Lit::Nan { neg, bits }
            }
            Tok::Ident("true") if !neg => Lit::Bool(true),
            Tok::Ident("false") if !neg => Lit::Bool(false),
            other => {
                return Err(self.err(
                    t.pos,
                    format!("expected a value, found {}", other.describe()),
                ))
            }
        };
        Ok((pos, lit))
    }

    /// `dense<f32[2, 2]> [1.0, 2.0, 3.0, 4.0]` or `dense<f32[2, 2]> 0x<little-endian hex>`.
    fn tensor(&mut self) -> Result<Tensor, ParseError> {
        let start = self.bump()?.pos;
        self.expect('<')?;
        let dtype = self.dtype()?;
        self.expect('[')?;
        let mut shape = vec![];
        if !self.eat(']')? {
            loop {
                let t = self.bump()?;
                let Tok::Num(s) = t.tok else {
                    return Err(self.err(
                        t.pos,
                        format!(
                            "expected a size (a constant's shape is fixed), found {}",
                            t.tok.describe()
                        ),
                    ));
                };
                let n = self.u64_of(t.pos, s)?;
                shape.push(
                    usize::try_from(n)
                        .map_err(|_| self.err(t.pos, format!("`{s}` is too large")))?,
                );
                if self.eat(']')? {
                    break;
                }
                if !self.eat(',')? {
                    return self.expected("`,` or `]`");
                }
            }
        }
        self.expect('>')?;
        let numel = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| self.err(start, "the tensor has too many elements".into()))?;
        let t = self.peek()?.clone();
        let data = match t.tok {
            Tok::Hex(digits) => {
                self.bump()?;
                let want = numel
                    .checked_mul(dtype.size())
                    .and_then(|b| b.checked_mul(2))
                    .ok_or_else(|| self.err(start, "the tensor has too many elements".into()))?;
                if digits.len() != want {
                    return Err(self.err(
                        t.pos,
                        format!(
                            "expected {want} hex digits for {numel} {dtype} elements, found {}",
                            digits.len()
                        ),
                    ));
                }
                let bytes = unhex(digits.as_bytes());
                crate::TensorData::from_le_bytes(dtype, &bytes).map_err(|m| self.err(t.pos, m))?
            }
            Tok::Punct('[') => {
                self.bump()?;
                by_dtype!(dtype, T => <T as crate::Elem>::wrap(self.elems::<T>(numel, t.pos)?))
            }
            Tok::Ident("file") => {
                self.bump()?;
                let r = self.external_ref()?;
                let Some(resolve) = self.resolve.as_mut() else {
                    return Err(self.err(
                        t.pos,
                        format!(
                            "the tensor is in `{}`, but this parse reads no files (load the \
                             model from its file to read its weights)",
                            r.file
                        ),
                    ));
                };
                let got = resolve(&r, dtype, &shape).map_err(|m| self.err(t.pos, m))?;
                if got.dtype() != dtype || got.shape() != shape.as_slice() {
                    return Err(self.err(
                        t.pos,
                        format!(
                            "`{}` holds {}{:?}, the text declares {dtype}{shape:?}",
                            r.file,
                            got.dtype(),
                            got.shape()
                        ),
                    ));
                }
                return Ok(got);
            }
            other => {
                return Err(self.err(
                    t.pos,
                    format!(
                        "expected the elements `[...]`, `0x...` or `file(...)`, found {}",
                        other.describe()
                    ),
                ))
            }
        };
        Tensor::new(shape, data).map_err(|m| self.err(start, m))
    }

    /// `("file")` or `("file", "tensor name")` after `file`.
    fn external_ref(&mut self) -> Result<super::ExternalRef, ParseError> {
        self.expect('(')?;
        let t = self.bump()?;
        let Tok::Str(file) = t.tok else {
            return Err(self.err(
                t.pos,
                format!(
                    "expected the file name as a string, found {}",
                    t.tok.describe()
                ),
            ));
        };
        let mut key = None;
        if self.eat(',')? {
            let k = self.bump()?;
            let Tok::Str(name) = k.tok else {
                return Err(self.err(
                    k.pos,
                    format!(
                        "expected the tensor's name as a string, found {}",
                        k.tok.describe()
                    ),
                ));
            };
            key = Some(name.into_owned());
        }
        self.expect(')')?;
        Ok(super::ExternalRef {
            file: file.into_owned(),
            key,
        })
    }

    /// `n` elements and the closing `]` (the `[` is consumed).
    fn elems<T: TextElem>(&mut self, n: usize, open: usize) -> Result<Vec<T>, ParseError> {
        let mut v = Vec::with_capacity(n.min(1024));
        if !self.eat(']')? {
            loop {
                let (pos, lit) = self.lit()?;
                if v.len() == n {
                    return Err(self.err(pos, format!("too many elements: the shape holds {n}")));
                }
                v.push(T::from_lit(&lit).map_err(|m| self.err(pos, m))?);
                if self.eat(']')? {
                    break;
                }
                if !self.eat(',')? {
                    return self.expected("`,` or `]`");
                }
            }
        }
        if v.len() != n {
            return Err(self.err(
                open,
                format!("the shape holds {n} elements but {} are given", v.len()),
            ));
        }
        Ok(v)
    }
}

/// The fact for a result whose type the text declares: the type verbatim, and for a
/// `constant` whose tensor matches it, the contents (so later inference can fold them).
fn declared_fact(op: OpKind, attrs: &Attrs, ty: TensorType) -> Fact {
    let mut f = Fact::of(ty);
    if op == OpKind::Constant {
        if let Ok(Some(t)) = attrs.tensor("value") {
            if t.dtype() == f.ty.dtype && Shape::fixed(t.shape()) == f.ty.shape {
                f.konst = Some(t);
                f.dims = f.value_dims();
            }
        }
    }
    f
}

/// Decodes hex digits (already checked to be hex and of even length) into bytes.
fn unhex(digits: &[u8]) -> Vec<u8> {
    fn nibble(c: u8) -> u8 {
        match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            b'A'..=b'F' => c - b'A' + 10,
            _ => 0,
        }
    }
    digits
        .chunks_exact(2)
        .map(|p| nibble(p[0]) << 4 | nibble(p[1]))
        .collect()
}

/// The op name closest to `word`, if one is close enough to be a likely typo.
fn closest_op(word: &str) -> Option<&'static str> {
    if word.len() > 40 {
        return None;
    }
    let word = word.to_ascii_lowercase();
    let (best, d) = OpKind::ALL
        .iter()
        .map(|op| (op.name(), edit_distance(&word, op.name())))
        .min_by_key(|&(_, d)| d)?;
    (d <= (word.len() / 3).max(1)).then_some(best)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}
