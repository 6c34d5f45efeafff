//! DAG-aware extraction: pick one e-node per needed e-class so the *graph* (where a shared
//! subgraph is computed once) is cheapest. Greedy bottom-up extraction on tree costs gives
//! a start; its true DAG cost is then computed (every chosen class counted once) and a
//! local search switches single classes to other e-nodes while that lowers the DAG cost.
//! (egg's LpExtractor would be exact but needs an ILP solver; this is cheap and good.)

use super::analysis::KEGraph;
use super::cost::CostModel;
use super::lang::Kn;
use egg::{Id, Language};
use std::collections::HashMap;

/// Local-search moves tried at most (bounds extraction time on large e-graphs).
pub const MAX_MOVES: usize = 4000;

/// The chosen e-node (index into the class's `nodes`) of each class the result needs.
#[derive(Clone, Debug, Default)]
pub struct Extraction {
    /// Canonical class id → index of the chosen node in `eg[class].nodes`.
    pub choice: HashMap<Id, usize>,
    /// Estimated seconds of the extracted graph, each class counted once.
    pub dag_cost: f64,
    /// DAG cost of the greedy start, before local search.
    pub greedy_cost: f64,
}

impl Extraction {
    /// The chosen e-node of a class.
    pub fn node<'a>(&self, eg: &'a KEGraph, class: Id) -> Option<&'a Kn> {
        let c = eg.find(class);
        self.choice.get(&c).and_then(|&i| eg[c].nodes.get(i))
    }
}

/// Extracts the cheapest graph computing `roots`, with `forced` classes taking a given
/// node (tests use this to check every member of a class).
pub fn extract(
    eg: &KEGraph,
    roots: &[Id],
    cm: &CostModel,
    forced: &HashMap<Id, usize>,
) -> Result<Extraction, String> {
    // Per-node local costs, computed once.
    let mut local: HashMap<Id, Vec<f64>> = HashMap::new();
    for class in eg.classes() {
        let v = class
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| match forced.get(&class.id) {
                Some(&f) if f != i => f64::INFINITY,
                _ => cm.enode_cost(eg, class.id, n),
            })
            .collect();
        local.insert(class.id, v);
    }
    // Greedy bottom-up on tree costs, to a fixpoint.
    let mut best: HashMap<Id, (f64, usize)> = HashMap::new();
    loop {
        let mut changed = false;
        for class in eg.classes() {
            for (i, n) in class.nodes.iter().enumerate() {
                let mut c = local[&class.id][i];
                if !c.is_finite() {
                    continue;
                }
                for &ch in n.children() {
                    match best.get(&eg.find(ch)) {
                        Some(&(cc, _)) => c += cc,
                        None => {
                            c = f64::INFINITY;
                            break;
                        }
                    }
                }
                if c.is_finite() && best.get(&class.id).is_none_or(|&(b, _)| c < b) {
                    best.insert(class.id, (c, i));
                    changed = true;
                }
            }
        }
        if !changed {
            break;
        }
    }
    let mut choice: HashMap<Id, usize> = best.iter().map(|(&k, &(_, i))| (k, i)).collect();
    let roots: Vec<Id> = roots.iter().map(|&r| eg.find(r)).collect();
    let greedy_cost = dag_cost(eg, &roots, &choice, &local)
        .ok_or_else(|| "no finite-cost, acyclic extraction of the outputs".to_string())?;
    // Local search: switch one class at a time while the DAG cost drops.
    let mut cost = greedy_cost;
    let mut moves = 0;
    'rounds: for _round in 0..2 {
        let mut improved = false;
        let used = reachable(eg, &roots, &choice);
        for class in used {
            let n = eg[class].nodes.len();
            if n < 2 {
                continue;
            }
            let cur = choice[&class];
            for alt in 0..n {
                if alt == cur || !local[&class][alt].is_finite() {
                    continue;
                }
                if eg[class].nodes[alt]
                    .children()
                    .iter()
                    .any(|c| !choice.contains_key(&eg.find(*c)))
                {
                    continue;
                }
                moves += 1;
                if moves > MAX_MOVES {
                    break 'rounds;
                }
                let prev = choice.insert(class, alt);
                match dag_cost(eg, &roots, &choice, &local) {
                    Some(c) if c < cost * (1.0 - 1e-9) => {
                        cost = c;
                        improved = true;
                        break;
                    }
                    _ => {
                        if let Some(p) = prev {
                            choice.insert(class, p);
                        }
                    }
                }
            }
        }
        if !improved {
            break;
        }
    }
    let used = reachable(eg, &roots, &choice);
    choice.retain(|k, _| used.contains(k));
    Ok(Extraction {
        choice,
        dag_cost: cost,
        greedy_cost,
    })
}

/// Classes reachable from the roots through the chosen nodes.
fn reachable(eg: &KEGraph, roots: &[Id], choice: &HashMap<Id, usize>) -> Vec<Id> {
    let mut seen = std::collections::HashSet::new();
    let mut order = vec![];
    let mut stack: Vec<Id> = roots.to_vec();
    while let Some(c) = stack.pop() {
        let c = eg.find(c);
        if !seen.insert(c) {
            continue;
        }
        order.push(c);
        if let Some(&i) = choice.get(&c) {
            stack.extend(eg[c].nodes[i].children().iter().copied());
        }
    }
    order
}

/// The DAG cost of a choice (each reachable class once), or None if it has a cycle or a
/// needed class has no choice.
fn dag_cost(
    eg: &KEGraph,
    roots: &[Id],
    choice: &HashMap<Id, usize>,
    local: &HashMap<Id, Vec<f64>>,
) -> Option<f64> {
    // 0 = unvisited, 1 = on the stack, 2 = done.
    let mut state: HashMap<Id, u8> = HashMap::with_capacity(choice.len());
    let mut total = 0.0;
    let mut stack: Vec<(Id, bool)> = roots.iter().map(|&r| (r, false)).collect();
    while let Some((c, exit)) = stack.pop() {
        let c = eg.find(c);
        if exit {
            state.insert(c, 2);
            continue;
        }
        match state.get(&c) {
            Some(2) => continue,
            Some(1) => return None,
            _ => {}
        }
        let i = *choice.get(&c)?;
        total += local[&c][i];
        state.insert(c, 1);
        stack.push((c, true));
        for &ch in eg[c].nodes[i].children() {
            let ch = eg.find(ch);
            match state.get(&ch) {
                Some(1) => return None,
                Some(2) => {}
                _ => stack.push((ch, false)),
            }
        }
    }
    total.is_finite().then_some(total)
}
