//! 2-D convolution whose kernel equals its stride with no padding, dilation 1 and one group
//! (a ViT patch embedding): each output pixel reads a disjoint patch, so im2col is a plain
//! rearrangement, and per image `Y[OC, P] = W[OC, C·kh·kw] · cols[C·kh·kw, P] + bias` is one
//! GEMM whose epilogue adds the bias (as a residual broadcast along the rows). Other convs
//! stay with the interpreter.

use super::gemm::{gemm_in, Epilogue, GemmConfig, Isa, MatMut, MatRef, Rhs};
use crate::pool::Pool;

/// Shapes of a patch convolution: x `[N, C, H, W]`, weight `[OC, C, kh, kw]`, stride
/// `(kh, kw)`; output `[N, OC, H / kh, W / kw]` (floored).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PatchConv {
    /// `[N, C, H, W]`.
    pub x: [usize; 4],
    /// Output channels.
    pub oc: usize,
    /// Kernel (= stride) height and width.
    pub k: [usize; 2],
}

impl PatchConv {
    /// Output shape `[N, OC, OH, OW]`.
    pub fn out_shape(&self) -> [usize; 4] {
        let [n, _, h, w] = self.x;
        [n, self.oc, h / self.k[0], w / self.k[1]]
    }
}

/// Runs the convolution into `out` (dense `[N, OC, OH, OW]`).
pub fn patch_conv(
    pool: &Pool,
    p: &PatchConv,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
) -> Result<(), String> {
    let [n, c, h, wd] = p.x;
    let [kh, kw] = p.k;
    let [_, oc, oh, ow] = p.out_shape();
    let ckk = c * kh * kw;
    let pix = oh * ow;
    if x.len() != n * c * h * wd || w.len() != oc * ckk || out.len() != n * oc * pix {
        return Err(format!(
            "conv: {} / {} / {} values for x {:?}, weight [{oc}, {c}, {kh}, {kw}], output {:?}",
            x.len(),
            w.len(),
            out.len(),
            p.x,
            p.out_shape()
        ));
    }
    if bias.is_some_and(|b| b.len() != oc) {
        return Err(format!("conv bias must have {oc} values"));
    }
    let a = MatRef::row_major(w, oc, ckk).map_err(|e| e.to_string())?;
    let residual = match bias {
        // Row stride 1, column stride 0: element (o, p) is bias[o].
        Some(b) => Some(MatRef::new(b, oc, pix, 1, 0).map_err(|e| e.to_string())?),
        None => None,
    };
    let ep = Epilogue {
        residual,
        ..Epilogue::default()
    };
    let cfg = GemmConfig {
        threads: pool.threads(),
        isa: Isa::Auto,
    };
    let mut cols = vec![0.0f32; ckk * pix];
    for (ni, y) in out.chunks_exact_mut(oc * pix).enumerate() {
        let img = &x[ni * c * h * wd..][..c * h * wd];
        // cols[(ci, r, s), (py, px)] = x[ci, py·kh + r, px·kw + s].
        // A copy of the input, serial: small next to the GEMM.
        for crow in 0..c * kh {
            let (ci, r) = (crow / kh, crow % kh);
            for py in 0..oh {
                let src = &img[(ci * h + py * kh + r) * wd..][..ow * kw];
                for s in 0..kw {
                    let row = (crow * kw + s) * pix + py * ow;
                    for (px, d) in cols[row..row + ow].iter_mut().enumerate() {
                        *d = src[px * kw + s];
                    }
                }
            }
        }
        let b = MatRef::row_major(&cols, ckk, pix).map_err(|e| e.to_string())?;
        let c = MatMut::row_major(y, oc, pix).map_err(|e| e.to_string())?;
        gemm_in(pool, a, Rhs::Plain(b), c, &ep, &cfg).map_err(|e| e.to_string())?;
    }
    Ok(())
}
