//! Fuzz target onnx_decode: arbitrary bytes through the whole ONNX importer (decode,
//! lowering, migration, shape inference). Any panic, overflow or hang is a bug; errors
//! are fine.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = kiln_frontend::load_model_bytes(kiln_frontend::Bytes::copy_from_slice(data), None);
});
