//! Fuzz target npy_read: arbitrary bytes as a `.npy` file and as a `.pb` TensorProto.
//! Whatever reads must write back and read again to the same tensor, and the in-place
//! reader (`.kir` weights, memory-mapped) must agree with the copying one.
#![no_main]
use kiln_frontend::tensor_io::{
    read_npy_bytes, read_npy_shared, read_tensor_pb_bytes, write_npy_bytes,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let shared = read_npy_shared(&kiln_frontend::Bytes::copy_from_slice(data));
    assert_eq!(shared.is_ok(), read_npy_bytes(data).is_ok());
    if let Ok(t) = read_npy_bytes(data) {
        assert_eq!(shared.ok(), Some(t.clone()));
        let back = read_npy_bytes(&write_npy_bytes(&t)).expect("re-reading written npy");
        assert_eq!(back, t);
    }
    let _ = read_tensor_pb_bytes(data, None);
});
