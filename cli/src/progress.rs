//! The progress line: a compile or build phase that lasts longer than [`SHOW_AFTER`]
//! shows one line on stderr (`kiln: optimising 3/14 fuse_norms … 1.2 s`, then `codegen`),
//! redrawn in place and erased when the work ends. Only on a terminal: nothing is printed
//! when stderr is a file or a pipe, or with `--quiet`.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long work runs before its progress line appears.
pub const SHOW_AFTER: Duration = Duration::from_millis(500);
/// How often the line is redrawn.
const REDRAW: Duration = Duration::from_millis(100);

static QUIET: AtomicBool = AtomicBool::new(false);

/// Applies `--quiet` for the whole process.
pub fn set_quiet(q: bool) {
    QUIET.store(q, Ordering::Relaxed);
}

/// Whether progress lines are drawn: stderr is a terminal and `--quiet` is off.
pub fn enabled() -> bool {
    !QUIET.load(Ordering::Relaxed) && std::io::stderr().is_terminal()
}

struct State {
    phase: String,
    done: bool,
}

/// A progress line for one piece of work; dropping it (or [`Line::finish`]) erases it.
pub struct Line {
    shared: Arc<(Mutex<State>, Condvar)>,
    drawer: Option<JoinHandle<()>>,
}

impl Line {
    /// Starts a line about `what` (drawn on stderr only when [`enabled`]).
    pub fn start(what: &str) -> Line {
        if enabled() {
            Line::start_on(what, Box::new(std::io::stderr()), SHOW_AFTER)
        } else {
            Line::hidden()
        }
    }

    /// A line that never draws.
    pub fn hidden() -> Line {
        Line {
            shared: Arc::new((
                Mutex::new(State {
                    phase: String::new(),
                    done: false,
                }),
                Condvar::new(),
            )),
            drawer: None,
        }
    }

    /// Starts a line drawn on `out` once `delay` has passed.
    pub fn start_on(what: &str, mut out: Box<dyn Write + Send>, delay: Duration) -> Line {
        let shared = Arc::new((
            Mutex::new(State {
                phase: String::new(),
                done: false,
            }),
            Condvar::new(),
        ));
        let s = shared.clone();
        let what = what.to_string();
        let drawer = std::thread::spawn(move || {
            let start = Instant::now();
            let (lock, cv) = &*s;
            let mut drawn = false;
            let mut st = lock.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if st.done {
                    break;
                }
                let elapsed = start.elapsed();
                let wait = if elapsed < delay {
                    delay - elapsed
                } else {
                    REDRAW
                };
                st = cv
                    .wait_timeout(st, wait)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
                if st.done {
                    break;
                }
                if start.elapsed() >= delay {
                    let line = format!(
                        "kiln: {what}: {} {:.1} s",
                        st.phase,
                        start.elapsed().as_secs_f64()
                    );
                    // A failed write (stderr closed) just stops the drawing.
                    if write!(out, "\r\x1b[2K{line}")
                        .and_then(|()| out.flush())
                        .is_err()
                    {
                        return;
                    }
                    drawn = true;
                }
            }
            if drawn {
                let _ = write!(out, "\r\x1b[2K").and_then(|()| out.flush());
            }
        });
        Line {
            shared,
            drawer: Some(drawer),
        }
    }

    /// Says which phase runs now (`optimising 3/14 fuse_norms`, `codegen`).
    pub fn set(&self, phase: impl Into<String>) {
        let mut st = self.shared.0.lock().unwrap_or_else(|e| e.into_inner());
        st.phase = phase.into();
    }

    /// A callback for [`kiln::Model::compile_with_progress`] that updates this line.
    pub fn callback(&self) -> kiln::Progress {
        let s = self.shared.clone();
        Arc::new(move |p: kiln::Phase| {
            let text = match p {
                kiln::Phase::Pass { index, total, name } => {
                    format!("optimising {index}/{total} {name}")
                }
                kiln::Phase::Codegen { backend } => format!("codegen ({backend})"),
            };
            s.0.lock().unwrap_or_else(|e| e.into_inner()).phase = text;
        })
    }

    /// Erases the line (if it was drawn) and stops drawing.
    pub fn finish(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(h) = self.drawer.take() {
            {
                let mut st = self.shared.0.lock().unwrap_or_else(|e| e.into_inner());
                st.done = true;
            }
            self.shared.1.notify_all();
            let _ = h.join();
        }
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer the test can read back.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn short_work_draws_nothing() {
        let c = Capture::default();
        let line = Line::start_on("compiling", Box::new(c.clone()), Duration::from_secs(5));
        line.set("optimising 1/3 fold_constants");
        line.finish();
        assert!(c.0.lock().unwrap().is_empty());
    }

    #[test]
    fn long_work_draws_each_phase_then_erases_the_line() {
        let c = Capture::default();
        let line = Line::start_on("compiling", Box::new(c.clone()), Duration::from_millis(10));
        let cb = line.callback();
        cb(kiln::Phase::Pass {
            index: 2,
            total: 5,
            name: "cse",
        });
        std::thread::sleep(Duration::from_millis(250));
        cb(kiln::Phase::Codegen {
            backend: kiln::Backend::Jit,
        });
        std::thread::sleep(Duration::from_millis(250));
        line.finish();
        let text = String::from_utf8(c.0.lock().unwrap().clone()).unwrap();
        assert!(
            text.contains("kiln: compiling: optimising 2/5 cse"),
            "{text:?}"
        );
        assert!(text.contains("codegen (jit)"), "{text:?}");
        assert!(text.ends_with("\r\x1b[2K"), "{text:?}");
        assert!(!text.contains('\n'), "one line, redrawn in place: {text:?}");
    }
}
