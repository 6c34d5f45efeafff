//! No build step: the script exists so that `OUT_DIR` tells `find_runtime` which cargo
//! profile directory holds `libkiln_aot_rt.a`.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
}
