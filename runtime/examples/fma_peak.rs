//! The single-core f32 FMA peak of this machine, per vector ISA
//! ([`kiln_runtime::native::gemm::fma_peak_gflops`]). The GEMM's "% of peak" (`gemm_bench`)
//! is measured against this, not against a data-sheet figure.
//!
//! `cargo run --release -p kiln-runtime --example fma_peak`

use kiln_runtime::native::gemm::{fma_peak_gflops, Isa};

fn main() {
    for isa in [Isa::Avx512, Isa::Avx2] {
        match fma_peak_gflops(isa) {
            Some(g) => println!(
                "{:<7} {g:.1} GFLOP/s on one core",
                format!("{}:", isa.name())
            ),
            None => println!("{:<7} not on this CPU", format!("{}:", isa.name())),
        }
    }
}
