//! Fuzz target text_parse: the text-form parser must never panic or overflow the stack,
//! and whatever it accepts must print and re-parse to the same text.
#![no_main]
use kiln_ir::text::{parse, print};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(src) = std::str::from_utf8(data) else {
        return;
    };
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
