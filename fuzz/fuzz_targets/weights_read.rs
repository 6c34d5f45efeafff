//! Fuzz target weights_read: arbitrary bytes as a safetensors weights file (what a `.kir`
//! model's `file("w.safetensors", "name")` reads). Whatever reads must write back and read
//! again to the same tensors.
#![no_main]
use kiln_frontend::weights::{read_safetensors, write_safetensors};
use kiln_frontend::Bytes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(ts) = read_safetensors(&Bytes::copy_from_slice(data)) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("w.safetensors");
    let refs: Vec<(String, &kiln_ir::Tensor)> = ts.iter().map(|(n, t)| (n.clone(), t)).collect();
    write_safetensors(&path, &refs).expect("writing what was read");
    let back = read_safetensors(&Bytes::from(std::fs::read(&path).expect("reading back")))
        .expect("re-reading written safetensors");
    assert_eq!(back, ts);
});
