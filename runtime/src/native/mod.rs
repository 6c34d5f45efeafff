//! Hand-written CPU kernels shared by kiln's CPU backends: contractions (GEMM with fused
//! epilogues, the exact 8-bit integer GEMM, patch and general convs, conv_transpose, 8-bit convs) and, one op family per
//! file, the native routines of ops the loop kernels do not take (reductions, norms, slices
//! and pads, scatters, casts, quantisation); the JIT calls into these for the ops it does not
//! generate itself.

pub mod attention;
pub mod cast;
pub mod conv;
pub mod conv_direct;
pub mod conv_gemm;
pub mod conv_general;
pub mod conv_integer;
pub mod conv_transpose;
pub mod gemm;
pub mod gemm_i8;
pub mod index;
pub mod layout;
pub mod linear_attention;
pub mod linear_scan;
pub mod norm;
pub mod permute;
pub mod pool;
pub mod quant;
pub mod reduce;
pub mod resize;
pub mod vmath;

/// A value a prepared kernel derives from its input and weight shapes (a conv's geometry),
/// kept for the last pair of shapes seen, so a run with the same shapes reuses it.
#[derive(Debug)]
pub struct LastShapes<G>(std::sync::Mutex<Option<Kept<G>>>);

/// The input shape, the weight shape and the value derived from them.
type Kept<G> = (Vec<usize>, Vec<usize>, std::sync::Arc<G>);

impl<G> Default for LastShapes<G> {
    fn default() -> Self {
        LastShapes(std::sync::Mutex::new(None))
    }
}

impl<G> LastShapes<G> {
    /// The value for shapes `x` and `w`: the kept one when the shapes are the last ones,
    /// else `make()`, kept in its place.
    pub fn get(
        &self,
        x: &[usize],
        w: &[usize],
        make: impl FnOnce() -> Result<G, String>,
    ) -> Result<std::sync::Arc<G>, String> {
        let mut last = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((lx, lw, g)) = last.as_ref() {
            if lx == x && lw == w {
                return Ok(g.clone());
            }
        }
        let g = std::sync::Arc::new(make()?);
        *last = Some((x.to_vec(), w.to_vec(), g.clone()));
        Ok(g)
    }
}
