//! The pass manager: runs a pipeline of passes over a graph, verifying the graph after
//! every pass that changed it (a structural fingerprint tells; a failure names the pass
//! that broke it), timing each pass, turning passes
//! on and off from a spec (`"-fold_constants,-cse"`), stopping after pass N to bisect a
//! bad optimisation, and dumping the graph before and after each pass into a directory
//! (`03.fold_constants.before.kir`). It returns a [`PipelineReport`] a CLI prints as a
//! table.

use crate::{Pass, PassError, PassStats};
use kiln_ir::{Graph, VerifyError};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Why a pipeline run (or its configuration) failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ManagerError {
    /// A pass spec names a pass the pipeline does not have.
    #[error("unknown pass `{name}` in pass spec; valid passes: {}", valid.join(", "))]
    UnknownPass {
        /// The name given.
        name: String,
        /// Every valid name (and alias), in pipeline order.
        valid: Vec<&'static str>,
    },
    /// A pass spec item is malformed.
    #[error("bad pass spec item `{item}`: expected `-name` (off), `+name` or `name` (on)")]
    BadSpec {
        /// The item.
        item: String,
    },
    /// The graph given to the pipeline does not verify (no pass is to blame).
    #[error("the input graph does not verify: {0}")]
    InvalidInput(VerifyError),
    /// A pass returned an error.
    #[error("pass #{index} failed: {source}")]
    Pass {
        /// 1-based position among the passes that ran.
        index: usize,
        /// The pass's error (it names the pass).
        source: PassError,
    },
    /// A pass left a graph that does not verify: a bug in that pass.
    #[error("the graph does not verify after pass #{index} {pass} (a bug in {pass}): {source}")]
    Verify {
        /// 1-based position among the passes that ran.
        index: usize,
        /// The pass's name.
        pass: &'static str,
        /// What the verifier found.
        source: VerifyError,
    },
    /// A dump file could not be written.
    #[error("writing dump {}: {msg}", path.display())]
    Dump {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        msg: String,
    },
}

/// What one pass did in a pipeline run.
#[derive(Clone, Debug, PartialEq)]
pub struct PassReport {
    /// 1-based position among the passes that ran (the `NN` of dump files and the `N`
    /// of [`PassManager::stop_after`]).
    pub index: usize,
    /// The pass's name.
    pub name: &'static str,
    /// Wall time of the pass itself (not verification or dumping).
    pub time: Duration,
    /// Node count before the pass.
    pub nodes_before: usize,
    /// Node count after the pass.
    pub nodes_after: usize,
    /// The pass's own statistics.
    pub stats: PassStats,
}

/// What a pipeline run did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PipelineReport {
    /// The passes that ran, in order.
    pub passes: Vec<PassReport>,
    /// Passes that did not run (turned off, or after the stop point), in order.
    pub skipped: Vec<&'static str>,
    /// Set when the run stopped early because of [`PassManager::stop_after`].
    pub stopped_after: Option<usize>,
}

impl PipelineReport {
    /// Total time spent in passes.
    pub fn total_time(&self) -> Duration {
        self.passes.iter().map(|p| p.time).sum()
    }
}

/// A table: one line per pass with index, name, time, node counts and stats.
impl fmt::Display for PipelineReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let w = self
            .passes
            .iter()
            .map(|p| p.name.len())
            .max()
            .unwrap_or(4)
            .max(4);
        writeln!(
            f,
            "{:>3}  {:<w$}  {:>10}  {:>15}  stats",
            "#", "pass", "time", "nodes"
        )?;
        for p in &self.passes {
            writeln!(
                f,
                "{:>3}  {:<w$}  {:>10}  {:>15}  {}",
                p.index,
                p.name,
                format!("{:.3}ms", p.time.as_secs_f64() * 1e3),
                format!("{} -> {}", p.nodes_before, p.nodes_after),
                p.stats
            )?;
        }
        write!(
            f,
            "{:>3}  {:<w$}  {:>10}",
            "",
            "total",
            format!("{:.3}ms", self.total_time().as_secs_f64() * 1e3)
        )?;
        if let Some(n) = self.stopped_after {
            write!(f, "\n(stopped after pass #{n})")?;
        }
        if !self.skipped.is_empty() {
            write!(f, "\n(skipped: {})", self.skipped.join(", "))?;
        }
        Ok(())
    }
}

struct Entry {
    pass: Box<dyn Pass>,
    enabled: bool,
}

/// Runs a list of passes. See the module documentation.
pub struct PassManager {
    entries: Vec<Entry>,
    stop_after: Option<usize>,
    dump_dir: Option<PathBuf>,
    verify: bool,
    progress: Option<Progress>,
}

/// Called before each pass runs with its 1-based index among the passes that run, how
/// many will run, and its name (a CLI draws a progress line from it).
pub type Progress = Box<dyn Fn(usize, usize, &'static str) + Send + Sync>;

impl Default for PassManager {
    fn default() -> PassManager {
        PassManager::new(vec![])
    }
}

impl PassManager {
    /// A manager running `passes` in order, all enabled, verifying after each.
    pub fn new(passes: Vec<Box<dyn Pass>>) -> PassManager {
        PassManager {
            entries: passes
                .into_iter()
                .map(|pass| Entry {
                    pass,
                    enabled: true,
                })
                .collect(),
            stop_after: None,
            dump_dir: None,
            verify: true,
            progress: None,
        }
    }

    /// Calls `f` before each pass runs (see [`Progress`]).
    pub fn on_pass(&mut self, f: Progress) -> &mut PassManager {
        self.progress = Some(f);
        self
    }

    /// Appends a pass.
    pub fn add(&mut self, pass: Box<dyn Pass>) -> &mut PassManager {
        self.entries.push(Entry {
            pass,
            enabled: true,
        });
        self
    }

    /// The names of the passes in the pipeline, in order (repeats included).
    pub fn pass_names(&self) -> Vec<&'static str> {
        self.entries.iter().map(|e| e.pass.name()).collect()
    }

    /// The names of the passes that will run, in order.
    pub fn enabled_names(&self) -> Vec<&'static str> {
        self.entries
            .iter()
            .filter(|e| e.enabled)
            .map(|e| e.pass.name())
            .collect()
    }

    /// Turns passes on and off from a comma-separated spec: `-name` turns every pass of
    /// that name (or alias) off, `+name` or `name` turns it on. Items apply in order.
    /// An unknown name is an error listing the valid ones; nothing is changed then.
    pub fn configure(&mut self, spec: &str) -> Result<&mut PassManager, ManagerError> {
        let mut enabled: Vec<bool> = self.entries.iter().map(|e| e.enabled).collect();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (on, name) = if let Some(rest) = item.strip_prefix('-') {
                (false, rest.trim())
            } else if let Some(rest) = item.strip_prefix('+') {
                (true, rest.trim())
            } else {
                (true, item)
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(ManagerError::BadSpec {
                    item: item.to_string(),
                });
            }
            let mut found = false;
            for (e, en) in self.entries.iter().zip(enabled.iter_mut()) {
                if e.pass.name() == name || e.pass.aliases().contains(&name) {
                    *en = on;
                    found = true;
                }
            }
            if !found {
                return Err(ManagerError::UnknownPass {
                    name: name.to_string(),
                    valid: self.valid_names(),
                });
            }
        }
        for (e, en) in self.entries.iter_mut().zip(enabled) {
            e.enabled = en;
        }
        Ok(self)
    }

    fn valid_names(&self) -> Vec<&'static str> {
        let mut v: Vec<&'static str> = vec![];
        for e in &self.entries {
            for n in std::iter::once(e.pass.name()).chain(e.pass.aliases().iter().copied()) {
                if !v.contains(&n) {
                    v.push(n);
                }
            }
        }
        v
    }

    /// Runs only the first `n` enabled passes (`None`: all), to bisect a bad
    /// optimisation: the pass that breaks things is the smallest `n` that shows it.
    pub fn stop_after(&mut self, n: Option<usize>) -> &mut PassManager {
        self.stop_after = n;
        self
    }

    /// Dumps the graph before and after every pass into `dir` (created if needed), as
    /// `NN.<pass>.before.kir` and `NN.<pass>.after.kir`.
    pub fn dump_to(&mut self, dir: Option<PathBuf>) -> &mut PassManager {
        self.dump_dir = dir;
        self
    }

    /// Whether to verify the graph before the first pass and after each (default on).
    pub fn verify_each(&mut self, on: bool) -> &mut PassManager {
        self.verify = on;
        self
    }

    /// Runs the pipeline over `g`, in place.
    pub fn run(&self, g: &mut Graph) -> Result<PipelineReport, ManagerError> {
        let mut checked = 0;
        if self.verify {
            kiln_ir::verify_and_infer(g).map_err(ManagerError::InvalidInput)?;
            checked = fingerprint(g);
        }
        if let Some(dir) = &self.dump_dir {
            std::fs::create_dir_all(dir).map_err(|e| ManagerError::Dump {
                path: dir.clone(),
                msg: e.to_string(),
            })?;
        }
        let mut report = PipelineReport::default();
        let total = self
            .entries
            .iter()
            .filter(|e| e.enabled)
            .count()
            .min(self.stop_after.unwrap_or(usize::MAX));
        for e in &self.entries {
            let name = e.pass.name();
            let index = report.passes.len() + 1;
            if !e.enabled {
                report.skipped.push(name);
                continue;
            }
            if self.stop_after.is_some_and(|n| index > n) {
                report.stopped_after = self.stop_after;
                report.skipped.push(name);
                continue;
            }
            if let Some(f) = &self.progress {
                f(index, total, name);
            }
            self.dump(g, index, name, "before", None)?;
            let nodes_before = g.nodes.len();
            let start = Instant::now();
            let stats = e
                .pass
                .run(g)
                .map_err(|source| ManagerError::Pass { index, source })?;
            let time = start.elapsed();
            // A graph the pass left exactly as it was verified and typed after the pass
            // before (or on entry): checking it again would find the same.
            let unchanged = self.verify && fingerprint(g) == checked;
            // Types only ever refine: what a pass made known (folded shape arithmetic,
            // merged shape reads) reaches every value, so later passes and the cost model
            // see it (one shape inference both checks the graph and writes its types).
            let verified = if self.verify && !unchanged {
                kiln_ir::verify_and_infer(g)
            } else {
                if !unchanged {
                    let _ = kiln_ir::infer_types(g);
                }
                Ok(())
            };
            if self.verify && !unchanged && verified.is_ok() {
                checked = fingerprint(g);
            }
            // A broken graph's dump starts with what the verifier found.
            let note = verified.as_ref().err().map(|e| format!("; {e}\n"));
            self.dump(g, index, name, "after", note.as_deref())?;
            verified.map_err(|source| ManagerError::Verify {
                index,
                pass: name,
                source,
            })?;
            report.passes.push(PassReport {
                index,
                name,
                time,
                nodes_before,
                nodes_after: g.nodes.len(),
                stats,
            });
        }
        Ok(report)
    }

    fn dump(
        &self,
        g: &Graph,
        index: usize,
        pass: &str,
        when: &str,
        note: Option<&str>,
    ) -> Result<(), ManagerError> {
        let Some(dir) = &self.dump_dir else {
            return Ok(());
        };
        let path = dump_path(dir, index, pass, when);
        let text = format!("{}{}", note.unwrap_or(""), dump_text(g));
        std::fs::write(&path, text).map_err(|e| ManagerError::Dump {
            path,
            msg: e.to_string(),
        })
    }
}

fn dump_path(dir: &Path, index: usize, pass: &str, when: &str) -> PathBuf {
    dir.join(format!("{index:02}.{pass}.{when}.kir"))
}

/// The graph in the form dumps use: kiln's text form (what `.kir` files hold, so a dump
/// parses back with `kiln_ir::text::parse`).
fn dump_text(g: &Graph) -> String {
    kiln_ir::text::print(g)
}

/// A multiply-rotate hasher (the fingerprint runs after every pass over every node, and
/// `roll_blocks` maps every node of its candidate copies; they need speed, not resistance to
/// chosen inputs).
#[derive(Default)]
pub(crate) struct FastHasher(u64);

/// A `HashMap` keyed through [`FastHasher`].
pub(crate) type FastMap<K, V> =
    std::collections::HashMap<K, V, std::hash::BuildHasherDefault<FastHasher>>;

impl FastHasher {
    fn add(&mut self, x: u64) {
        self.0 = (self.0.rotate_left(5) ^ x).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

impl std::hash::Hasher for FastHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes(c.try_into().expect("8 bytes")));
        }
        let mut tail = [0u8; 8];
        tail[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
        self.add(u64::from_le_bytes(tail) ^ (bytes.len() as u64) << 56);
    }

    fn write_u64(&mut self, x: u64) {
        self.add(x);
    }

    fn write_u32(&mut self, x: u32) {
        self.add(u64::from(x));
    }

    fn write_usize(&mut self, x: usize) {
        self.add(x as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// A structural fingerprint of a graph: names, types, nodes (op, operands, results,
/// attributes) and metadata. Tensors and subgraphs held in attributes count by address: a
/// pass never writes into a shared constant, it makes a new one.
fn fingerprint(g: &Graph) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = FastHasher(0);
    (&g.name, &g.inputs, &g.outputs, &g.metadata).hash(&mut h);
    g.values.len().hash(&mut h);
    for v in &g.values {
        (&v.name, &v.ty).hash(&mut h);
    }
    g.nodes.len().hash(&mut h);
    for n in &g.nodes {
        (n.op, &n.name, &n.inputs, &n.outputs).hash(&mut h);
        for (k, a) in &n.attrs.0 {
            k.hash(&mut h);
            match a {
                kiln_ir::Attr::Int(x) => x.hash(&mut h),
                kiln_ir::Attr::Float(x) => x.to_bits().hash(&mut h),
                kiln_ir::Attr::Str(x) => x.hash(&mut h),
                kiln_ir::Attr::Ints(x) => x.hash(&mut h),
                kiln_ir::Attr::Floats(x) => x.iter().for_each(|f| f.to_bits().hash(&mut h)),
                kiln_ir::Attr::Strs(x) => x.hash(&mut h),
                kiln_ir::Attr::Tensor(t) => std::sync::Arc::as_ptr(t).hash(&mut h),
                kiln_ir::Attr::Graph(b) => std::sync::Arc::as_ptr(b).hash(&mut h),
            }
        }
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classic::{EliminateCommonSubexpressions, EliminateDeadCode};
    use kiln_ir::{Tensor, ValueId};

    /// A pass that records nothing and changes nothing.
    struct Nop(&'static str);
    impl Pass for Nop {
        fn name(&self) -> &'static str {
            self.0
        }
        fn run(&self, _g: &mut Graph) -> Result<PassStats, PassError> {
            Ok(PassStats::default())
        }
    }

    /// A pass that breaks the graph (an output that nothing defines).
    struct Breaker;
    impl Pass for Breaker {
        fn name(&self) -> &'static str {
            "break_graph"
        }
        fn run(&self, g: &mut Graph) -> Result<PassStats, PassError> {
            g.outputs.push(ValueId(999));
            Ok(PassStats::default())
        }
    }

    /// A pass that fails.
    struct Failer;
    impl Pass for Failer {
        fn name(&self) -> &'static str {
            "fail_always"
        }
        fn run(&self, _g: &mut Graph) -> Result<PassStats, PassError> {
            Err(PassError::at("fail_always", "%k", "no"))
        }
    }

    fn graph() -> Graph {
        let mut g = Graph::new("g");
        let a = g.add_constant("a", Tensor::scalar(1i64));
        g.add_constant("b", Tensor::scalar(1i64));
        g.add_constant("dead", Tensor::scalar(5i64));
        g.outputs = vec![a];
        g
    }

    #[test]
    fn the_fingerprint_sees_every_kind_of_edit_a_pass_makes() {
        let g = graph();
        assert_eq!(fingerprint(&g), fingerprint(&g.clone()));
        type Edit = Box<dyn Fn(&mut Graph)>;
        let edits: Vec<(&str, Edit)> = vec![
            (
                "an attribute",
                Box::new(|g| g.nodes[0].attrs.set("axis", kiln_ir::Attr::Int(1))),
            ),
            (
                "a constant",
                Box::new(|g| {
                    g.nodes[0].attrs.set(
                        "value",
                        kiln_ir::Attr::Tensor(std::sync::Arc::new(Tensor::scalar(1i64))),
                    )
                }),
            ),
            ("an operand", Box::new(|g| g.nodes[1].inputs.push(None))),
            (
                "a type",
                Box::new(|g| {
                    g.values[0].ty = kiln_ir::TensorType::unknown_shape(kiln_ir::DType::I64)
                }),
            ),
            ("an output", Box::new(|g| g.outputs.push(ValueId(1)))),
            ("a node's name", Box::new(|g| g.nodes[2].name = "x".into())),
            ("the node order", Box::new(|g| g.nodes.swap(0, 1))),
        ];
        for (what, edit) in edits {
            let mut h = g.clone();
            edit(&mut h);
            assert_ne!(fingerprint(&g), fingerprint(&h), "{what}");
        }
    }

    fn classic() -> PassManager {
        PassManager::new(vec![
            Box::new(EliminateCommonSubexpressions),
            Box::new(EliminateDeadCode),
        ])
    }

    #[test]
    fn runs_passes_in_order_and_reports_node_counts() {
        let mut g = graph();
        let report = classic().run(&mut g).unwrap();
        let rows: Vec<_> = report
            .passes
            .iter()
            .map(|p| (p.index, p.name, p.nodes_before, p.nodes_after))
            .collect();
        assert_eq!(
            rows,
            vec![
                (1, "eliminate_common_subexpressions", 3, 1),
                (2, "eliminate_dead_code", 1, 1),
            ]
        );
        assert_eq!(report.passes[0].stats.counter("constants_merged"), 1);
        let table = report.to_string();
        assert!(table.contains("eliminate_dead_code"), "{table}");
        assert!(table.contains("3 -> 1"), "{table}");
    }

    #[test]
    fn spec_turns_passes_off_by_name_or_alias() {
        let mut pm = classic();
        pm.configure("-dce, -eliminate_common_subexpressions")
            .unwrap();
        assert!(pm.enabled_names().is_empty());
        pm.configure("+dce").unwrap();
        assert_eq!(pm.enabled_names(), vec!["eliminate_dead_code"]);
        let mut g = graph();
        let report = pm.run(&mut g).unwrap();
        assert_eq!(report.skipped, vec!["eliminate_common_subexpressions"]);
        assert_eq!(report.passes.len(), 1);
        assert_eq!(report.passes[0].index, 1);
    }

    #[test]
    fn unknown_pass_in_spec_lists_valid_names_and_changes_nothing() {
        let mut pm = classic();
        let e = pm.configure("-dce,-fuse_norms").err().unwrap();
        assert_eq!(
            e.to_string(),
            "unknown pass `fuse_norms` in pass spec; valid passes: eliminate_common_subexpressions, cse, \
             eliminate_dead_code, dce"
        );
        assert_eq!(pm.enabled_names().len(), 2, "a failed spec changes nothing");
        for bad in ["-", "é", "-a b", "+x;y"] {
            assert!(
                matches!(pm.configure(bad).err(), Some(ManagerError::BadSpec { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn verifier_failure_names_the_pass() {
        let mut pm = PassManager::new(vec![Box::new(Nop("first")), Box::new(Breaker)]);
        let e = pm.run(&mut graph()).unwrap_err();
        assert!(
            matches!(
                e,
                ManagerError::Verify {
                    index: 2,
                    pass: "break_graph",
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("after pass #2 break_graph"), "{e}");
        // Bisecting: stopping after the first pass hides the bug.
        pm.stop_after(Some(1));
        let report = pm.run(&mut graph()).unwrap();
        assert_eq!(report.stopped_after, Some(1));
        assert_eq!(report.skipped, vec!["break_graph"]);
        // With verification off, the broken graph is returned as is.
        pm.stop_after(None).verify_each(false);
        let mut g = graph();
        pm.run(&mut g).unwrap();
        assert_eq!(g.outputs.last(), Some(&ValueId(999)));
    }

    #[test]
    fn pass_errors_keep_their_context() {
        let pm = PassManager::new(vec![Box::new(Failer)]);
        let e = pm.run(&mut graph()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "pass #1 failed: running pass fail_always on %k: no"
        );
    }

    #[test]
    fn an_invalid_input_graph_is_reported_before_any_pass() {
        let mut g = graph();
        g.outputs.push(ValueId(77));
        let e = classic().run(&mut g).unwrap_err();
        assert!(matches!(e, ManagerError::InvalidInput(_)), "{e}");
    }

    #[test]
    fn dumps_before_and_after_each_pass() {
        let dir = std::env::temp_dir().join(format!("kiln-passes-dump-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut pm = classic();
        pm.dump_to(Some(dir.clone()));
        pm.run(&mut graph()).unwrap();
        let mut files: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        files.sort();
        assert_eq!(
            files,
            vec![
                "01.eliminate_common_subexpressions.after.kir",
                "01.eliminate_common_subexpressions.before.kir",
                "02.eliminate_dead_code.after.kir",
                "02.eliminate_dead_code.before.kir",
            ]
        );
        let before = std::fs::read_to_string(dir.join(&files[1])).unwrap();
        let after = std::fs::read_to_string(dir.join(&files[0])).unwrap();
        assert!(
            before.contains("%dead") && !after.contains("%dead"),
            "{before}"
        );
        // Dumps are the text form: they parse back to the graph they show.
        let back = kiln_ir::text::parse(&after).unwrap();
        assert_eq!(back.nodes.len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_broken_graph_dump_starts_with_the_verifier_error() {
        let dir = std::env::temp_dir().join(format!("kiln-passes-broken-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut pm = PassManager::new(vec![Box::new(Breaker)]);
        pm.dump_to(Some(dir.clone()));
        assert!(pm.run(&mut graph()).is_err());
        let after = std::fs::read_to_string(dir.join("01.break_graph.after.kir")).unwrap();
        assert!(
            after.starts_with("; verifier: at return: graph output id 999 is never defined\n"),
            "{after}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
