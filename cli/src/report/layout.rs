//! A layered (Sugiyama-style) layout of a [`View`], drawn as inline SVG: layers by longest
//! path from the sources, dummy points where an edge spans several layers, a few
//! barycenter sweeps to reduce crossings, then x positions pulled toward neighbours while
//! boxes keep their order and spacing. No Graphviz needed; good enough to read a model.

use super::view::{Kind, View};
use std::fmt::Write;

const BOX_H: f64 = 34.0;
const LAYER_GAP: f64 = 62.0;
const H_GAP: f64 = 18.0;
const DUMMY_W: f64 = 8.0;
const CHAR_W: f64 = 6.2;
const MAX_CHARS: usize = 34;
const MARGIN: f64 = 20.0;

struct Item {
    /// Index into `View::nodes`, or None for a dummy point.
    node: Option<usize>,
    width: f64,
    x: f64,
}

fn truncate(s: &str) -> String {
    if s.chars().count() <= MAX_CHARS {
        s.to_string()
    } else {
        let t: String = s.chars().take(MAX_CHARS - 1).collect();
        format!("{t}…")
    }
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Orders each layer by the mean position of its neighbours in `layers[from]`.
fn sweep(layers: &mut [Vec<usize>], adj: &[Vec<usize>], pos: &mut [f64], down: bool) {
    let n = layers.len();
    let order: Vec<usize> = if down {
        (1..n).collect()
    } else {
        (0..n.saturating_sub(1)).rev().collect()
    };
    for l in order {
        let mut keyed: Vec<(f64, usize)> = layers[l]
            .iter()
            .map(|&it| {
                let ns = &adj[it];
                let k = if ns.is_empty() {
                    pos[it]
                } else {
                    ns.iter().map(|&m| pos[m]).sum::<f64>() / ns.len() as f64
                };
                (k, it)
            })
            .collect();
        keyed.sort_by(|a, b| a.0.total_cmp(&b.0));
        layers[l] = keyed.into_iter().map(|(_, it)| it).collect();
        for (i, &it) in layers[l].iter().enumerate() {
            pos[it] = i as f64;
        }
    }
}

/// Lays out `v` and returns an `<svg>` element.
pub fn svg(v: &View, id: &str) -> String {
    let n = v.nodes.len();
    // Layers: longest path from a source (edges go forward in index order).
    let mut layer = vec![0usize; n];
    let mut preds: Vec<Vec<usize>> = vec![vec![]; n];
    for &(a, b) in &v.edges {
        if a < n && b < n && a < b {
            preds[b].push(a);
        }
    }
    // Invariant (View): edges go forward in index order, so one pass settles every layer.
    for b in 0..n {
        layer[b] = preds[b].iter().map(|&a| layer[a] + 1).max().unwrap_or(0);
    }
    // Sources that are not graph inputs (ops on constants only) sit just above their
    // first user rather than at the top, far from it.
    let mut succ_min: Vec<Option<usize>> = vec![None; n];
    for b in (0..n).rev() {
        for &a in &preds[b] {
            let l = layer[b];
            succ_min[a] = Some(succ_min[a].map_or(l, |m| m.min(l)));
        }
    }
    for i in 0..n {
        if preds[i].is_empty() && v.nodes[i].kind != Kind::Input {
            if let Some(m) = succ_min[i] {
                layer[i] = m.saturating_sub(1);
            }
        }
    }
    // Outputs sit on the last layer.
    let depth = layer.iter().copied().max().unwrap_or(0);
    for (i, node) in v.nodes.iter().enumerate() {
        if node.kind == Kind::Output {
            layer[i] = depth.max(1);
        }
    }
    let depth = layer.iter().copied().max().unwrap_or(0);
    // Items: real nodes then dummies; chains of items per edge.
    let mut items: Vec<Item> = (0..n)
        .map(|i| {
            let chars = v.nodes[i]
                .title
                .chars()
                .count()
                .max(v.nodes[i].sub.chars().count())
                .min(MAX_CHARS);
            Item {
                node: Some(i),
                width: chars as f64 * CHAR_W + 14.0,
                x: 0.0,
            }
        })
        .collect();
    let mut item_layer = layer.clone();
    let mut chains: Vec<(usize, Vec<usize>)> = vec![];
    let mut up: Vec<Vec<usize>> = vec![vec![]; n];
    let mut down: Vec<Vec<usize>> = vec![vec![]; n];
    for &(a, b) in &v.edges {
        if a >= n || b >= n || layer[a] >= layer[b] {
            continue;
        }
        let mut chain = vec![a];
        for l in layer[a] + 1..layer[b] {
            items.push(Item {
                node: None,
                width: DUMMY_W,
                x: 0.0,
            });
            item_layer.push(l);
            up.push(vec![]);
            down.push(vec![]);
            chain.push(items.len() - 1);
        }
        chain.push(b);
        for w in chain.windows(2) {
            down[w[0]].push(w[1]);
            up[w[1]].push(w[0]);
        }
        chains.push((a, chain));
    }
    let mut layers: Vec<Vec<usize>> = vec![vec![]; depth + 1];
    for (it, &l) in item_layer.iter().enumerate() {
        layers[l].push(it);
    }
    let mut pos = vec![0.0; items.len()];
    for ls in &layers {
        for (i, &it) in ls.iter().enumerate() {
            pos[it] = i as f64;
        }
    }
    for _ in 0..4 {
        sweep(&mut layers, &up, &mut pos, true);
        sweep(&mut layers, &down, &mut pos, false);
    }
    sweep(&mut layers, &up, &mut pos, true);
    // x: pack each layer left to right, then pull toward neighbours keeping order.
    for ls in &layers {
        let mut x = 0.0;
        for &it in ls {
            items[it].x = x + items[it].width / 2.0;
            x += items[it].width + H_GAP;
        }
    }
    for round in 0..8 {
        let down_pass = round % 2 == 0;
        let order: Vec<usize> = if down_pass {
            (0..layers.len()).collect()
        } else {
            (0..layers.len()).rev().collect()
        };
        for l in order {
            let nb = if down_pass { &up } else { &down };
            let want: Vec<f64> = layers[l]
                .iter()
                .map(|&it| {
                    let ns = &nb[it];
                    if ns.is_empty() {
                        items[it].x
                    } else {
                        ns.iter().map(|&m| items[m].x).sum::<f64>() / ns.len() as f64
                    }
                })
                .collect();
            place(&mut items, &layers[l], &want);
        }
    }
    // Shift everything to start at the margin.
    let min_x = items
        .iter()
        .map(|it| it.x - it.width / 2.0)
        .fold(f64::INFINITY, f64::min);
    let shift = if min_x.is_finite() {
        MARGIN - min_x
    } else {
        0.0
    };
    for it in &mut items {
        it.x += shift;
    }
    let width = items
        .iter()
        .map(|it| it.x + it.width / 2.0)
        .fold(0.0, f64::max)
        + MARGIN;
    let y_of = |l: usize| MARGIN + l as f64 * (BOX_H + LAYER_GAP);
    let height = y_of(depth) + BOX_H + MARGIN;

    let mut s = String::new();
    let _ = writeln!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" id=\"{id}\" class=\"graph\" width=\"{width:.0}\" height=\"{height:.0}\" viewBox=\"0 0 {width:.0} {height:.0}\">\
         <defs><marker id=\"{id}-arrow\" viewBox=\"0 0 10 10\" refX=\"10\" refY=\"5\" markerWidth=\"7\" markerHeight=\"7\" orient=\"auto-start-reverse\">\
         <path d=\"M0,0 L10,5 L0,10 z\" fill=\"#6b7785\"/></marker></defs>"
    );
    // Edges first, under the boxes.
    s.push_str("<g class=\"edges\">\n");
    for (_, chain) in &chains {
        let pts: Vec<(f64, f64)> = chain
            .iter()
            .enumerate()
            .map(|(k, &it)| {
                let y = y_of(item_layer[it]);
                let y = if k == 0 {
                    y + BOX_H
                } else if k == chain.len() - 1 {
                    y
                } else {
                    y + BOX_H / 2.0
                };
                (items[it].x, y)
            })
            .collect();
        let mut d = format!("M{:.1},{:.1}", pts[0].0, pts[0].1);
        for w in pts.windows(2) {
            let ((x0, y0), (x1, y1)) = (w[0], w[1]);
            let my = (y0 + y1) / 2.0;
            let _ = write!(d, " C{x0:.1},{my:.1} {x1:.1},{my:.1} {x1:.1},{y1:.1}");
        }
        let _ = writeln!(
            s,
            "<path d=\"{d}\" fill=\"none\" stroke=\"#8a96a3\" stroke-width=\"1.2\" marker-end=\"url(#{id}-arrow)\"/>"
        );
    }
    s.push_str("</g>\n<g class=\"nodes\">\n");
    for it in items.iter().filter(|it| it.node.is_some()) {
        let Some(i) = it.node else { continue };
        let node = &v.nodes[i];
        let (fill, stroke) = match node.kind {
            Kind::Input => ("#dcf2dc", "#4c9a4c"),
            Kind::Output => ("#dce7fa", "#4a72b8"),
            Kind::Fused => ("#ffe3b8", "#d08a1e"),
            Kind::Op => ("#f1f4f8", "#9aa6b2"),
            Kind::Shape => ("#ece6f7", "#8a74b8"),
        };
        let x0 = it.x - it.width / 2.0;
        let y0 = y_of(layer[i]);
        let _ = writeln!(
            s,
            "<g class=\"node{}\"><title>{}</title><rect x=\"{x0:.1}\" y=\"{y0:.1}\" width=\"{:.1}\" height=\"{BOX_H}\" rx=\"5\" fill=\"{fill}\" stroke=\"{stroke}\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" class=\"t\">{}</text><text x=\"{:.1}\" y=\"{:.1}\" class=\"s\">{}</text></g>",
            if node.kind == Kind::Shape { " shape" } else { "" },
            xml(&node.detail),
            it.width,
            it.x,
            y0 + 14.0,
            xml(&truncate(&node.title)),
            it.x,
            y0 + 27.0,
            xml(&truncate(&node.sub)),
        );
    }
    s.push_str("</g>\n</svg>\n");
    s
}

/// Moves the items of one layer toward `want` (their desired centres) keeping their order
/// and at least `H_GAP` between boxes: a forward pass pushes right, a backward pass pushes
/// left, and each item ends at the mean of the two.
fn place(items: &mut [Item], layer: &[usize], want: &[f64]) {
    let k = layer.len();
    if k == 0 {
        return;
    }
    let mut right = vec![0.0; k];
    for j in 0..k {
        let w = want[j];
        right[j] = if j == 0 {
            w
        } else {
            let prev = layer[j - 1];
            let min = right[j - 1] + items[prev].width / 2.0 + H_GAP + items[layer[j]].width / 2.0;
            w.max(min)
        };
    }
    let mut left = vec![0.0; k];
    for j in (0..k).rev() {
        let w = want[j];
        left[j] = if j == k - 1 {
            w
        } else {
            let next = layer[j + 1];
            let max = left[j + 1] - items[next].width / 2.0 - H_GAP - items[layer[j]].width / 2.0;
            w.min(max)
        };
    }
    // The mean of two order-preserving, gap-respecting placements respects both.
    for j in 0..k {
        items[layer[j]].x = (left[j] + right[j]) / 2.0;
    }
}
