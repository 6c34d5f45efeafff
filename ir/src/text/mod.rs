//! The text form (kiln's DSL): a printer and a parser that round-trip.
//!
//! ```text
//! func @mlp(%x: f32[B, 16], %w: f32[16, 4]) -> f32[B, 4] {
//!   %0 = matmul %x, %w : f32[B, 4]
//!   %1 = relu %0 : f32[B, 4]
//!   return %1
//! }
//! ```
//! TODO(text form helper): printer + parser with line:column diagnostics.
