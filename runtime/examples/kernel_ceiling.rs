//! How fast the AVX-512 GEMM's instruction mix can run at all: the k step of the 12 × 32
//! micro-kernel (two B vector loads, twelve A broadcasts, 24 FMAs) and of a 6 × 64
//! alternative, looped over data in L1, beside FMAs alone and FMAs with only the B loads.
//! The gap between "FMAs alone" and the kernel's mix is what no blocking or prefetching
//! can recover; `gemm_bench`'s "% of peak" is against "FMAs alone".
//!
//! `cargo run --release -p kiln-runtime --example kernel_ceiling`

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::asm;
    use std::time::Instant;

    /// Loop iterations per timing; the best of `TRIES` timings is kept.
    const ITERS: u64 = 20_000_000;
    const TRIES: usize = 5;
    /// FLOPs per iteration: 24 FMAs of 16 lanes, two FLOPs each.
    const FLOPS: f64 = 24.0 * 32.0;

    /// Best GFLOP/s of `f` over [`TRIES`] timings.
    fn time(f: unsafe fn(*const f32, u64)) -> f64 {
        let buf = vec![1.0f32; 1024];
        (0..TRIES)
            .map(|_| {
                let t = Instant::now();
                // SAFETY: AVX-512F checked by the caller; the loops read the first 300
                // bytes of `buf`.
                unsafe { f(buf.as_ptr(), ITERS) };
                FLOPS * ITERS as f64 / t.elapsed().as_secs_f64() / 1e9
            })
            .fold(0.0, f64::max)
    }

    /// Emits one `unsafe fn(p, n)` looping `n` times over the given instructions (which may
    /// read `[{p} + offset]`), with every zmm register clobbered.
    macro_rules! mix {
        ($name:ident, $($ins:expr),* $(,)?) => {
            #[target_feature(enable = "avx512f")]
            unsafe fn $name(p: *const f32, n: u64) {
                // SAFETY: reads at most 300 bytes at `p` (the caller's buffer); writes only
                // clobbered registers.
                unsafe {
                    asm!("/* {p} */", "2:", $($ins,)* "dec {n}", "jnz 2b",
                        p = in(reg) p, n = inout(reg) n => _,
                        out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _,
                        out("zmm4") _, out("zmm5") _, out("zmm6") _, out("zmm7") _,
                        out("zmm8") _, out("zmm9") _, out("zmm10") _, out("zmm11") _,
                        out("zmm12") _, out("zmm13") _, out("zmm14") _, out("zmm15") _,
                        out("zmm16") _, out("zmm17") _, out("zmm18") _, out("zmm19") _,
                        out("zmm20") _, out("zmm21") _, out("zmm22") _, out("zmm23") _,
                        out("zmm24") _, out("zmm25") _, out("zmm26") _, out("zmm27") _,
                        out("zmm28") _, out("zmm29") _, out("zmm30") _, out("zmm31") _,
                        options(nostack, readonly));
                }
            }
        };
    }

    /// Two FMAs into the accumulators of row `r` from broadcast register `b`.
    macro_rules! row2 {
        ($r0:literal, $r1:literal, $b:literal) => {
            concat!(
                "vfmadd231ps zmm",
                $r0,
                ", zmm",
                $b,
                ", zmm30\n",
                "vfmadd231ps zmm",
                $r1,
                ", zmm",
                $b,
                ", zmm31"
            )
        };
    }

    /// The 24 FMAs of a 12 × 32 tile, every row against the same zmm28.
    macro_rules! fmas24 {
        () => {
            concat!(
                row2!(0, 1, 28),
                "\n",
                row2!(2, 3, 28),
                "\n",
                row2!(4, 5, 28),
                "\n",
                row2!(6, 7, 28),
                "\n",
                row2!(8, 9, 28),
                "\n",
                row2!(10, 11, 28),
                "\n",
                row2!(12, 13, 28),
                "\n",
                row2!(14, 15, 28),
                "\n",
                row2!(16, 17, 28),
                "\n",
                row2!(18, 19, 28),
                "\n",
                row2!(20, 21, 28),
                "\n",
                row2!(22, 23, 28),
            )
        };
    }

    mix!(fma_only, fmas24!());

    mix!(
        b_loads_only,
        "vmovups zmm30, [{p}]",
        "vmovups zmm31, [{p} + 64]",
        fmas24!(),
    );

    /// One row of the 12 × 32 tile: a broadcast of A at byte offset `$off`, two FMAs.
    macro_rules! bc_row {
        ($off:literal, $r0:literal, $r1:literal) => {
            concat!(
                "vbroadcastss zmm28, dword ptr [{p} + ",
                $off,
                "]\n",
                row2!($r0, $r1, 28)
            )
        };
    }

    mix!(
        tile_12x32,
        "vmovups zmm30, [{p}]",
        "vmovups zmm31, [{p} + 64]",
        bc_row!(128, 0, 1),
        bc_row!(132, 2, 3),
        bc_row!(136, 4, 5),
        bc_row!(140, 6, 7),
        bc_row!(144, 8, 9),
        bc_row!(148, 10, 11),
        bc_row!(152, 12, 13),
        bc_row!(156, 14, 15),
        bc_row!(160, 16, 17),
        bc_row!(164, 18, 19),
        bc_row!(168, 20, 21),
        bc_row!(172, 22, 23),
    );

    /// One row of a 6 × 64 tile: a broadcast, four FMAs against B in zmm24–27.
    macro_rules! bc_row4 {
        ($off:literal, $a:literal, $b:literal, $c:literal, $d:literal) => {
            concat!(
                "vbroadcastss zmm28, dword ptr [{p} + ",
                $off,
                "]\n",
                "vfmadd231ps zmm",
                $a,
                ", zmm28, zmm24\n",
                "vfmadd231ps zmm",
                $b,
                ", zmm28, zmm25\n",
                "vfmadd231ps zmm",
                $c,
                ", zmm28, zmm26\n",
                "vfmadd231ps zmm",
                $d,
                ", zmm28, zmm27"
            )
        };
    }

    mix!(
        tile_6x64,
        "vmovups zmm24, [{p}]",
        "vmovups zmm25, [{p} + 64]",
        "vmovups zmm26, [{p} + 128]",
        "vmovups zmm27, [{p} + 192]",
        bc_row4!(256, 0, 1, 2, 3),
        bc_row4!(260, 4, 5, 6, 7),
        bc_row4!(264, 8, 9, 10, 11),
        bc_row4!(268, 12, 13, 14, 15),
        bc_row4!(272, 16, 17, 18, 19),
        bc_row4!(276, 20, 21, 22, 23),
    );

    pub fn main() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            println!("no AVX-512F on this CPU: nothing to measure");
            return;
        }
        let peak = time(fma_only);
        println!("{:<44} {peak:7.1} GFLOP/s", "24 FMAs alone (the peak)");
        type Mix = unsafe fn(*const f32, u64);
        let rows: [(&str, Mix); 3] = [
            ("24 FMAs + 2 B loads", b_loads_only),
            ("12 x 32 tile: 2 loads, 12 broadcasts (kiln)", tile_12x32),
            ("6 x 64 tile: 4 loads, 6 broadcasts", tile_6x64),
        ];
        for (name, f) in rows {
            let g = time(f);
            println!(
                "{name:<44} {g:7.1} GFLOP/s  {:5.1}% of the peak",
                100.0 * g / peak
            );
        }
    }
}

fn main() {
    #[cfg(target_arch = "x86_64")]
    x86::main();
    #[cfg(not(target_arch = "x86_64"))]
    println!("x86-64 only");
}
