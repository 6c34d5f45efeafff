//! Process-wide guards the CLI sets before any command runs: the memory limit
//! (`--max-memory`) that every allocation sized by untrusted data is checked against, and
//! a quiet exit when stdout is closed (`kiln info model.onnx | head -1`).

/// Applies `--max-memory` (a size such as `512M` or `8G`; the default is half of the RAM
/// or of `ulimit -v`, whichever is smaller).
pub fn set_max_memory(spec: Option<&str>) -> anyhow::Result<()> {
    if let Some(s) = spec {
        let bytes =
            kiln_ir::limits::parse_bytes(s).map_err(|m| anyhow::anyhow!("--max-memory: {m}"))?;
        kiln_ir::limits::set_max_memory(bytes);
    }
    Ok(())
}

/// Restores the default action of SIGPIPE, so that writing to a closed pipe ends the
/// process silently, as `cat` and `grep` do, instead of `println!` panicking with "failed
/// printing to stdout: Broken pipe". (Rust ignores SIGPIPE before `main`.)
pub fn exit_quietly_on_closed_stdout() {
    // SAFETY: called at the start of `main`, before any other thread exists; setting a
    // signal's disposition to SIG_DFL installs no handler code.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
