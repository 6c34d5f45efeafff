//! The text form's lexer: turns source into tokens that borrow from it, each with its byte
//! offset so errors can point at it. Quoted strings allocate only when they hold escapes.

use super::ParseError;
use std::borrow::Cow;

/// One token.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Tok<'a> {
    /// `%name` or `%"name"`.
    Value(Cow<'a, str>),
    /// `@name` or `@"name"`.
    Global(Cow<'a, str>),
    /// `[A-Za-z_][A-Za-z0-9_]*`: keywords, op names, dtypes, symbols, attribute names.
    Ident(&'a str),
    /// An unsigned decimal number, possibly with a fraction and an exponent.
    Num(&'a str),
    /// The digits after `0x`.
    Hex(&'a str),
    /// A quoted string, unescaped.
    Str(Cow<'a, str>),
    /// One of `( ) [ ] { } < > , : = - ? *`.
    Punct(char),
    /// `->`.
    Arrow,
    /// The end of the input.
    Eof,
}

impl Tok<'_> {
    /// How the token reads in a message ("found `...`").
    pub(crate) fn describe(&self) -> String {
        fn cut(s: &str) -> String {
            if s.chars().count() > 24 {
                format!("{}...", s.chars().take(24).collect::<String>())
            } else {
                s.to_string()
            }
        }
        match self {
            Tok::Value(n) => format!("`%{}`", cut(n)),
            Tok::Global(n) => format!("`@{}`", cut(n)),
            Tok::Ident(s) => format!("`{}`", cut(s)),
            Tok::Num(s) => format!("`{}`", cut(s)),
            Tok::Hex(s) => format!("`0x{}`", cut(s)),
            Tok::Str(s) => format!("string \"{}\"", cut(s)),
            Tok::Punct(c) => format!("`{c}`"),
            Tok::Arrow => "`->`".to_string(),
            Tok::Eof => "end of input".to_string(),
        }
    }
}

/// A token and the byte offset where it starts.
#[derive(Clone, Debug)]
pub(crate) struct Token<'a> {
    pub tok: Tok<'a>,
    pub pos: usize,
}

/// A cursor over the source; cheap to clone for lookahead.
#[derive(Clone)]
pub(crate) struct Lexer<'a> {
    src: &'a str,
    pos: usize,
}

/// Characters allowed in an unquoted `%name` or `@name`.
pub(crate) fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '/' | '-')
}

/// True if `s` can be written unquoted after `%` or `@`. A trailing `:` would be read as
/// the type separator, so such names are quoted.
pub(crate) fn is_bare_name(s: &str) -> bool {
    !s.is_empty() && s.chars().all(is_name_char) && !s.ends_with(':')
}

/// True if `s` is an identifier.
pub(crate) fn is_ident(s: &str) -> bool {
    let mut cs = s.chars();
    matches!(cs.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && cs.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl<'a> Lexer<'a> {
    pub(crate) fn new(src: &'a str) -> Lexer<'a> {
        Lexer { src, pos: 0 }
    }

    fn err(&self, pos: usize, msg: String) -> ParseError {
        ParseError::at(self.src, pos, msg)
    }

    fn skip_trivia(&mut self) {
        let b = self.src.as_bytes();
        while self.pos < b.len() {
            match b[self.pos] {
                b' ' | b'\t' | b'\n' | b'\r' => self.pos += 1,
                b'/' if b.get(self.pos + 1) == Some(&b'/') => {
                    while self.pos < b.len() && b[self.pos] != b'\n' {
                        self.pos += 1;
                    }
                }
                _ => break,
            }
        }
    }

    /// The next token.
    pub(crate) fn next_token(&mut self) -> Result<Token<'a>, ParseError> {
        self.skip_trivia();
        let start = self.pos;
        let bytes = self.src.as_bytes();
        let Some(&b) = bytes.get(start) else {
            return Ok(Token {
                tok: Tok::Eof,
                pos: start,
            });
        };
        let tok = match b {
            b'%' | b'@' => {
                self.pos += 1;
                let name = self.name(start, b as char)?;
                if b == b'%' {
                    Tok::Value(name)
                } else {
                    Tok::Global(name)
                }
            }
            b'"' => {
                self.pos += 1;
                Tok::Str(self.string(start)?)
            }
            b'0' if matches!(bytes.get(start + 1), Some(b'x' | b'X')) => {
                self.pos += 2;
                let digits = self.take_while(|c| c.is_ascii_hexdigit());
                Tok::Hex(digits)
            }
            b'0'..=b'9' => Tok::Num(self.number()),
            b'-' if bytes.get(start + 1) == Some(&b'>') => {
                self.pos += 2;
                Tok::Arrow
            }
            b'(' | b')' | b'[' | b']' | b'{' | b'}' | b'<' | b'>' | b',' | b':' | b'=' | b'-'
            | b'?' | b'*' => {
                self.pos += 1;
                Tok::Punct(b as char)
            }
            c if c.is_ascii_alphabetic() || c == b'_' => {
                Tok::Ident(self.take_while(|c| c.is_ascii_alphanumeric() || c == b'_'))
            }
            _ => {
                let c = self.src[start..].chars().next().unwrap_or('?');
                return Err(self.err(start, format!("unexpected character {c:?}")));
            }
        };
        Ok(Token { tok, pos: start })
    }

    fn take_while(&mut self, f: impl Fn(u8) -> bool) -> &'a str {
        let start = self.pos;
        let b = self.src.as_bytes();
        while self.pos < b.len() && f(b[self.pos]) {
            self.pos += 1;
        }
        &self.src[start..self.pos]
    }

    /// `[0-9]+ (. [0-9]+)? ([eE] [+-]? [0-9]+)?`
    fn number(&mut self) -> &'a str {
        let start = self.pos;
        let b = self.src.as_bytes();
        self.take_while(|c| c.is_ascii_digit());
        if b.get(self.pos) == Some(&b'.') && b.get(self.pos + 1).is_some_and(u8::is_ascii_digit) {
            self.pos += 1;
            self.take_while(|c| c.is_ascii_digit());
        }
        if matches!(b.get(self.pos), Some(b'e' | b'E')) {
            let mut p = self.pos + 1;
            if matches!(b.get(p), Some(b'+' | b'-')) {
                p += 1;
            }
            if b.get(p).is_some_and(u8::is_ascii_digit) {
                self.pos = p;
                self.take_while(|c| c.is_ascii_digit());
            }
        }
        &self.src[start..self.pos]
    }

    /// The name after `%` or `@`: bare or quoted.
    fn name(&mut self, start: usize, sigil: char) -> Result<Cow<'a, str>, ParseError> {
        if self.src.as_bytes().get(self.pos) == Some(&b'"') {
            self.pos += 1;
            return self.string(start);
        }
        let s = self.take_while(|c| is_name_char(c as char));
        // A trailing `:` belongs to the type annotation (`%x: f32[4]`).
        let trimmed = s.trim_end_matches(':');
        self.pos -= s.len() - trimmed.len();
        if trimmed.is_empty() {
            return Err(self.err(start, format!("expected a name after `{sigil}`")));
        }
        Ok(Cow::Borrowed(trimmed))
    }

    /// A string after its opening quote, up to and including the closing quote.
    fn string(&mut self, start: usize) -> Result<Cow<'a, str>, ParseError> {
        let body = self.pos;
        let rest = &self.src[body..];
        // Fast path: no escapes.
        match rest.find(['"', '\\']) {
            None => return Err(self.err(start, "unterminated string".into())),
            Some(i) if rest.as_bytes()[i] == b'"' => {
                self.pos = body + i + 1;
                return Ok(Cow::Borrowed(&rest[..i]));
            }
            Some(_) => {}
        }
        let mut out = String::new();
        let mut chars = rest.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    self.pos = body + i + 1;
                    return Ok(Cow::Owned(out));
                }
                '\\' => {
                    let esc_pos = body + i;
                    let Some((_, e)) = chars.next() else { break };
                    out.push(match e {
                        '"' => '"',
                        '\\' => '\\',
                        'n' => '\n',
                        't' => '\t',
                        'r' => '\r',
                        '0' => '\0',
                        'u' => {
                            let bad = || self.err(esc_pos, "bad `\\u{...}` escape".into());
                            if chars.next().map(|x| x.1) != Some('{') {
                                return Err(bad());
                            }
                            let mut v: u32 = 0;
                            let mut n = 0;
                            loop {
                                match chars.next().map(|x| x.1) {
                                    Some('}') if n > 0 => break,
                                    Some(h) if n < 6 && h.is_ascii_hexdigit() => {
                                        v = v * 16 + h.to_digit(16).unwrap_or(0);
                                        n += 1;
                                    }
                                    _ => return Err(bad()),
                                }
                            }
                            char::from_u32(v).ok_or_else(bad)?
                        }
                        other => {
                            return Err(
                                self.err(esc_pos, format!("unknown escape `\\{other}` in string"))
                            )
                        }
                    });
                }
                c => out.push(c),
            }
        }
        Err(self.err(start, "unterminated string".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(s: &str) -> Vec<Tok<'_>> {
        let mut l = Lexer::new(s);
        let mut v = vec![];
        loop {
            let t = l.next_token().unwrap();
            if t.tok == Tok::Eof {
                return v;
            }
            v.push(t.tok);
        }
    }

    #[test]
    fn trailing_colon_is_not_part_of_a_name() {
        assert_eq!(
            toks("%onnx::x: f32"),
            vec![
                Tok::Value("onnx::x".into()),
                Tok::Punct(':'),
                Tok::Ident("f32")
            ]
        );
    }

    #[test]
    fn numbers_hex_and_escaped_strings() {
        assert_eq!(
            toks(r#"-1.5e-3 0xAb "a\"\u{1F600}" -> // x"#),
            vec![
                Tok::Punct('-'),
                Tok::Num("1.5e-3"),
                Tok::Hex("Ab"),
                Tok::Str("a\"\u{1F600}".into()),
                Tok::Arrow
            ]
        );
    }
}
