//! The [`Pass`] trait every optimisation implements, the statistics a pass reports and the
//! error it fails with. A pass's `name()` (verb_noun, `fold_constants`) is used everywhere:
//! pipeline specs, dump files, timings and error messages.

use kiln_ir::Graph;
use std::collections::BTreeMap;
use std::fmt;

/// One graph-to-graph optimisation. It must leave a graph that passes
/// [`kiln_ir::verify`] and computes the same outputs (bit for bit, unless the pass says
/// otherwise in its documentation).
pub trait Pass {
    /// The pass's name, verb_noun (`fold_constants`), as used on the command line.
    fn name(&self) -> &'static str;

    /// Other names accepted for this pass in a pipeline spec (`cse`).
    fn aliases(&self) -> &'static [&'static str] {
        &[]
    }

    /// Rewrites `g` in place.
    fn run(&self, g: &mut Graph) -> Result<PassStats, PassError>;
}

/// What a pass did. `changed`/`removed`/`added` count nodes; `counters` holds free-form,
/// pass-specific hit counts (`identity_removed`, `transposes_composed`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PassStats {
    /// Nodes rewritten in place or replaced.
    pub changed: usize,
    /// Nodes removed.
    pub removed: usize,
    /// Nodes added.
    pub added: usize,
    /// Pass-specific counters, by name.
    pub counters: BTreeMap<&'static str, usize>,
}

impl PassStats {
    /// Adds `n` to the counter `name`.
    pub fn bump(&mut self, name: &'static str, n: usize) {
        if n > 0 {
            *self.counters.entry(name).or_default() += n;
        }
    }

    /// The counter `name` (0 if never bumped).
    pub fn counter(&self, name: &str) -> usize {
        self.counters.get(name).copied().unwrap_or(0)
    }

    /// True if the pass changed nothing.
    pub fn is_noop(&self) -> bool {
        self.changed == 0 && self.removed == 0 && self.added == 0
    }

    /// Adds another pass's (or iteration's) numbers to these.
    pub fn merge(&mut self, other: PassStats) {
        self.changed += other.changed;
        self.removed += other.removed;
        self.added += other.added;
        for (k, v) in other.counters {
            self.bump(k, v);
        }
    }
}

impl fmt::Display for PassStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "changed {} removed {} added {}",
            self.changed, self.removed, self.added
        )?;
        for (k, v) in &self.counters {
            write!(f, " {k}={v}")?;
        }
        Ok(())
    }
}

/// A pass failed. Every variant names the pass; `At` also names the value or node
/// (`running pass fold_constants on %42: ...`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PassError {
    /// Failed at a particular node or value.
    #[error("running pass {pass} on {at}: {msg}")]
    At {
        /// The pass's name.
        pass: &'static str,
        /// The node or value (`%42`, a node name).
        at: String,
        /// What went wrong.
        msg: String,
    },
    /// Failed on the graph as a whole (e.g. shape inference refused it).
    #[error("running pass {pass}: {msg}")]
    Graph {
        /// The pass's name.
        pass: &'static str,
        /// What went wrong.
        msg: String,
    },
}

impl PassError {
    /// An error at a node or value.
    pub fn at(pass: &'static str, at: impl Into<String>, msg: impl fmt::Display) -> PassError {
        PassError::At {
            pass,
            at: at.into(),
            msg: msg.to_string(),
        }
    }

    /// An error on the whole graph.
    pub fn graph(pass: &'static str, msg: impl fmt::Display) -> PassError {
        PassError::Graph {
            pass,
            msg: msg.to_string(),
        }
    }

    /// The failing pass's name.
    pub fn pass(&self) -> &'static str {
        match self {
            PassError::At { pass, .. } | PassError::Graph { pass, .. } => pass,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_names_pass_and_value() {
        let e = PassError::at("fold_constants", "%42", "eval failed");
        assert_eq!(
            e.to_string(),
            "running pass fold_constants on %42: eval failed"
        );
        assert_eq!(e.pass(), "fold_constants");
    }

    #[test]
    fn stats_merge_adds_counters_and_skips_zero_bumps() {
        let mut a = PassStats::default();
        a.bump("x", 0);
        assert!(a.counters.is_empty());
        a.bump("x", 2);
        let mut b = PassStats {
            removed: 3,
            ..PassStats::default()
        };
        b.bump("x", 1);
        b.bump("y", 4);
        a.merge(b);
        assert_eq!((a.counter("x"), a.counter("y"), a.removed), (3, 4, 3));
        assert!(!a.is_noop());
        assert_eq!(a.to_string(), "changed 0 removed 3 added 0 x=3 y=4");
    }
}
