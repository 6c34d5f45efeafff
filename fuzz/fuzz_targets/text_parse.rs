//! Fuzz target text_parse: the text-form parser must never panic or overflow the stack,
//! and whatever it accepts must print and re-parse to the same text. `file(...)` weights
//! are read by a resolver that makes a tensor of the declared type, and must round-trip
//! through `print_with`.
#![no_main]
use kiln_ir::text::{parse, parse_with, print, print_with, ExternalRef};
use kiln_ir::{DType, Tensor};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(src) = std::str::from_utf8(data) else {
        return;
    };
    with_weights(src);
    let Ok(g) = parse(src) else {
        return;
    };
    let text = print(&g);
    let back = match parse(&text) {
        Ok(b) => b,
        Err(e) => panic!("printed graph does not re-parse:\n{e}\n{text}"),
    };
    // Text equality also covers NaN float attributes, which `Attr`'s IEEE equality does not.
    assert_eq!(print(&back), text);
});

/// A zero tensor of the declared type, unless it is too large to make.
fn resolve(_: &ExternalRef, dtype: DType, shape: &[usize]) -> Result<Tensor, String> {
    match shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) {
        Some(n) if n <= 1 << 16 => Ok(Tensor::zeros(dtype, shape.to_vec())),
        _ => Err("too large".into()),
    }
}

/// The same input through the weights-reading parser: every tensor printed as a file
/// reference must read back to an equal graph.
fn with_weights(src: &str) {
    let Ok(g) = parse_with(src, &mut resolve) else {
        return;
    };
    let mut n = 0;
    let text = print_with(&g, &mut |_| {
        n += 1;
        Some(ExternalRef { file: "w.safetensors".into(), key: Some(format!("t{n}")) })
    });
    if let Err(e) = parse_with(&text, &mut resolve) {
        panic!("printed graph with file references does not re-parse:\n{e}\n{text}");
    }
}
