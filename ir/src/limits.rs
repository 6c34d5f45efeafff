//! The memory limit: the most bytes one tensor whose size comes from untrusted data (a
//! shape tensor, a range's bounds, a user's `--dim`) may take. Every such allocation is
//! checked here first, so a hostile 80-byte model or a typo in a size is an error naming
//! the node, op and shape instead of an abort in the allocator.
//!
//! One process-wide limit (the CLI's `--max-memory` sets it), by default half of the
//! machine's RAM or of the address-space limit (`ulimit -v`), whichever is smaller; and
//! a tighter per-thread budget for a scope ([`with_budget`]), which constant folding uses
//! so that it evaluates only what is small and leaves large generated tensors lazy.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Used when the machine's RAM cannot be read (not Linux): 16 GiB.
const FALLBACK_RAM_BYTES: usize = 16 << 30;

/// The default limit is RAM (or the address-space limit) divided by this.
const DEFAULT_FRACTION: usize = 2;

/// 0 means "not set yet": the default is computed on first use.
static MAX_BYTES: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// A tighter limit for the current scope on this thread (`usize::MAX`: none).
    static SCOPED: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// Sets the process-wide limit in bytes (0 restores the default).
pub fn set_max_memory(bytes: usize) {
    MAX_BYTES.store(bytes, Ordering::Relaxed);
}

/// The limit in force on this thread: the process-wide one, or a scope's tighter budget.
pub fn max_memory() -> usize {
    // The default is read from /proc once: reading it per call (every expand, every
    // interpreter allocation) cost tens of microseconds each, most of a small kernel's time.
    static DEFAULT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let global = match MAX_BYTES.load(Ordering::Relaxed) {
        0 => *DEFAULT.get_or_init(default_max_memory),
        b => b,
    };
    global.min(SCOPED.with(Cell::get))
}

/// The default limit: half of the physical RAM or of `ulimit -v`, whichever is smaller.
pub fn default_max_memory() -> usize {
    let ram = read_meminfo_total().unwrap_or(FALLBACK_RAM_BYTES);
    let as_limit = read_address_space_limit().unwrap_or(usize::MAX);
    ram.min(as_limit) / DEFAULT_FRACTION
}

/// Runs `f` with the limit on this thread lowered to `bytes` (nested scopes keep the
/// smallest). Constant folding evaluates under a small budget this way.
pub fn with_budget<R>(bytes: usize, f: impl FnOnce() -> R) -> R {
    struct Restore(usize);
    impl Drop for Restore {
        fn drop(&mut self) {
            SCOPED.with(|s| s.set(self.0));
        }
    }
    let old = SCOPED.with(|s| s.replace(s.get().min(bytes)));
    let _restore = Restore(old);
    f()
}

/// Checks that `elems` elements of `elem_bytes` bytes each (a tensor of `shape`, for the
/// message) fit the limit; the error says how much was asked for and what the limit is.
pub fn check(elems: usize, elem_bytes: usize, shape: &[usize]) -> Result<(), String> {
    let limit = max_memory();
    match elems.checked_mul(elem_bytes) {
        Some(b) if b <= limit => Ok(()),
        Some(b) => Err(format!(
            "shape {shape:?} needs {}, over the memory limit of {} (--max-memory raises it)",
            human_bytes(b),
            human_bytes(limit)
        )),
        None => Err(format!("shape {shape:?} overflows the address space")),
    }
}

/// True if `bytes` fit the limit (for callers that fall back rather than fail).
pub fn fits(bytes: usize) -> bool {
    bytes <= max_memory()
}

/// `1.9 GB`, `512 KB`, `12 B`: decimal units, three significant digits.
pub fn human_bytes(b: usize) -> String {
    const UNITS: [&str; 6] = ["B", "KB", "MB", "GB", "TB", "PB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < UNITS.len() {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Parses `512M`, `8G`, `1.5GB`, `1000000` (bytes; K/M/G/T are powers of 1024, as
/// `ulimit` and `free` count).
pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let t = t
        .strip_suffix(['B', 'b'])
        .filter(|r| r.ends_with(|c: char| c.is_ascii_alphabetic()))
        .unwrap_or(t);
    let (num, mult) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M') => (&t[..t.len() - 1], 1 << 20),
        Some('G') => (&t[..t.len() - 1], 1 << 30),
        Some('T') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a size (e.g. 512M, 8G)"))?;
    let bytes = v * mult as f64;
    if !(bytes.is_finite() && bytes >= 1.0 && bytes < usize::MAX as f64) {
        return Err(format!("`{s}` is not a usable size"));
    }
    Ok(bytes as usize)
}

/// `MemTotal` from `/proc/meminfo`, in bytes.
fn read_meminfo_total() -> Option<usize> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

/// The soft `Max address space` limit from `/proc/self/limits` (`ulimit -v`), in bytes.
fn read_address_space_limit() -> Option<usize> {
    let s = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = s.lines().find(|l| l.starts_with("Max address space"))?;
    let soft = line["Max address space".len()..]
        .split_whitespace()
        .next()?;
    soft.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_bytes_reads_units() {
        assert_eq!(parse_bytes("1000").unwrap(), 1000);
        assert_eq!(parse_bytes("512M").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("8G").unwrap(), 8 << 30);
        assert_eq!(parse_bytes("2gb").unwrap(), 2 << 30);
        assert_eq!(parse_bytes("1.5K").unwrap(), 1536);
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("0").is_err());
        assert!(parse_bytes("-5G").is_err());
    }

    #[test]
    fn budget_scope_lowers_and_restores_the_limit() {
        let before = max_memory();
        with_budget(1000, || {
            assert_eq!(max_memory(), before.min(1000));
            assert!(check(250, 4, &[250]).is_ok());
            let e = check(251, 4, &[251]).unwrap_err();
            assert!(e.contains("[251]") && e.contains("1.0 KB"), "{e}");
            with_budget(1 << 40, || assert_eq!(max_memory(), before.min(1000)));
        });
        assert_eq!(max_memory(), before);
    }

    #[test]
    fn overflowing_sizes_are_errors() {
        assert!(check(usize::MAX, 2, &[usize::MAX, 2]).is_err());
        assert!(default_max_memory() > 0);
    }
}
