//! Hand-written CPU kernels shared by kiln's CPU backends: contractions (GEMM with fused
//! epilogues, the exact 8-bit integer GEMM, patch and general convs, conv_transpose, 8-bit convs) and, one op family per
//! file, the native routines of ops the loop kernels do not take (reductions, norms, slices
//! and pads, scatters, casts, quantisation); the JIT calls into these for the ops it does not
//! generate itself.

pub mod attention;
pub mod cast;
pub mod conv;
pub mod conv_gemm;
pub mod conv_general;
pub mod conv_integer;
pub mod conv_transpose;
pub mod gemm;
pub mod gemm_i8;
pub mod index;
pub mod layout;
pub mod linear_attention;
pub mod norm;
pub mod pool;
pub mod quant;
pub mod reduce;
pub mod resize;
pub mod vmath;
