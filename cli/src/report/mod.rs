//! The `kiln inspect --html` report: one self-contained HTML file (inline CSS, SVG and a short
//! script that scrolls each panel to its first input and expands collapsed shape arithmetic
//! on click; nothing from the network) with a summary, the per-pass table, the e-graph
//! statistics, the fused-op provenance list, and the graph before and after optimisation side
//! by side.

pub mod layout;
pub mod view;

use std::fmt::Write;

/// Everything the report shows, already computed by `kiln inspect`.
pub struct Report<'a> {
    /// The model's path as given.
    pub model: String,
    /// One line on the cost model (target, bound dims).
    pub cost_note: String,
    /// The per-pass table: a header row, then one row per pass.
    pub table: Vec<Vec<String>>,
    /// The e-graph statistics, as preformatted text (or why there are none).
    pub egraph: String,
    /// Fused ops: (op, output value, absorbed ONNX node names).
    pub fused: Vec<(String, String, Vec<String>)>,
    /// Activation densities and the approximation report (empty without
    /// `--calibration` / `--approx`), as preformatted text.
    pub approx: String,
    /// The graph as imported.
    pub before: &'a kiln_ir::Graph,
    /// The graph after the pipeline.
    pub after: &'a kiln_ir::Graph,
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const CSS: &str = "
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:18px;color:#1d2733;background:#fafbfc}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:22px 0 8px;border-bottom:1px solid #dde3ea;padding-bottom:4px}
.note{color:#5b6875;font-size:13px}
table{border-collapse:collapse;font-size:12.5px;background:#fff}
th,td{border:1px solid #dde3ea;padding:3px 8px;text-align:right;white-space:nowrap}
th{background:#eef2f7} td:nth-child(2),th:nth-child(2),td:last-child,th:last-child{text-align:left}
td:last-child{white-space:normal;max-width:520px;font-family:ui-monospace,Menlo,monospace;font-size:11.5px}
pre{background:#fff;border:1px solid #dde3ea;padding:8px;font-size:12px;overflow:auto;max-height:300px;white-space:pre-wrap}
details{margin:3px 0;font-size:13px} summary{cursor:pointer} summary code{background:#ffe3b8;padding:0 4px;border-radius:3px}
details ol{margin:4px 0 6px;font-family:ui-monospace,Menlo,monospace;font-size:11.5px;columns:2}
.graphs{display:flex;gap:12px;align-items:flex-start}
.panel{flex:1;min-width:0}
.scroll{overflow:auto;height:78vh;border:1px solid #c9d2dc;background:#fff}
svg.graph text{font-family:ui-monospace,Menlo,Consolas,monospace;text-anchor:middle}
svg.graph text.t{font-size:11.5px;font-weight:600;fill:#1d2733} svg.graph text.s{font-size:10px;fill:#4f5b67}
svg.graph g.node:hover rect{stroke-width:2.5} svg.graph g.node.shape{cursor:pointer}
.legend span{display:inline-block;padding:1px 8px;margin-right:6px;border-radius:4px;font-size:12px;border:1px solid #9aa6b2}
";

/// The HTML page.
pub fn html(r: &Report) -> String {
    let before = view::view(r.before);
    let after = view::view(r.after);
    let mut s = String::new();
    let _ = write!(
        s,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>kiln inspect: {}</title><style>{CSS}</style></head><body>\n",
        esc(&r.model)
    );
    let _ = writeln!(s, "<h1>kiln inspect: {}</h1>", esc(&r.model));
    let _ = writeln!(
        s,
        "<p class=\"note\">{} nodes ({} shown) before, {} nodes ({} shown) after; constants are hidden and folded into their users' labels. {}</p>",
        r.before.nodes.len(),
        before.nodes.len(),
        r.after.nodes.len(),
        after.nodes.len(),
        esc(&r.cost_note)
    );
    s.push_str("<h2>Passes</h2>\n<table>\n");
    for (k, row) in r.table.iter().enumerate() {
        let cell = if k == 0 { "th" } else { "td" };
        s.push_str("<tr>");
        for c in row {
            let _ = write!(s, "<{cell}>{}</{cell}>", esc(c));
        }
        s.push_str("</tr>\n");
    }
    s.push_str("</table>\n<h2>E-graph</h2>\n");
    let _ = writeln!(s, "<pre>{}</pre>", esc(&r.egraph));
    if !r.approx.is_empty() {
        let _ = writeln!(s, "<h2>Approximation and activation density</h2>");
        let _ = writeln!(s, "<pre>{}</pre>", esc(&r.approx));
    }
    let _ = writeln!(s, "<h2>Fused ops ({})</h2>", r.fused.len());
    if r.fused.is_empty() {
        s.push_str("<p class=\"note\">No fused op in the optimised graph.</p>\n");
    }
    for (op, out, from) in &r.fused {
        let _ = write!(
            s,
            "<details><summary><code>{}</code> %{} absorbed {} nodes</summary><ol>",
            esc(op),
            esc(out),
            from.len()
        );
        for f in from {
            let _ = write!(s, "<li>{}</li>", esc(f));
        }
        s.push_str("</ol></details>\n");
    }
    s.push_str(
        "<h2>Graphs</h2>\n<p class=\"legend\"><span style=\"background:#dcf2dc\">input</span><span style=\"background:#f1f4f8\">op</span>\
         <span style=\"background:#ffe3b8\">fused op</span><span style=\"background:#dce7fa\">output</span><span style=\"background:#ece6f7\">shape arithmetic (click)</span>\
         <span class=\"note\" style=\"border:none\">hover a box for its name, constants and what it absorbed; each panel scrolls</span></p>\n",
    );
    s.push_str("<div class=\"graphs\">\n");
    for (title, v, id) in [("Before", &before, "before"), ("After", &after, "after")] {
        // Shape arithmetic collapsed into boxes that expand (the full graph) on click.
        match view::collapse_shape_arithmetic(v) {
            Some(c) => {
                let _ = writeln!(
                    s,
                    "<div class=\"panel\"><h3>{title} ({} boxes, {} with shape arithmetic collapsed; \
                     <a href=\"#\" class=\"toggle\">expand all</a>)</h3>\
                     <div class=\"scroll collapsed\">{}</div><div class=\"scroll full\" hidden>{}</div></div>",
                    v.nodes.len(),
                    c.nodes.len(),
                    layout::svg(&c, &format!("{id}-c")),
                    layout::svg(v, id)
                );
            }
            None => {
                let _ = writeln!(
                    s,
                    "<div class=\"panel\"><h3>{title} ({} boxes)</h3><div class=\"scroll\">{}</div></div>",
                    v.nodes.len(),
                    layout::svg(v, id)
                );
            }
        }
    }
    // Start each panel scrolled to its first graph input (layouts are wider than a panel).
    s.push_str(
        "</div>\n<script>for(const d of document.querySelectorAll('.scroll')){const r=d.querySelector('g.node rect');\
         if(r){const b=r.getBBox();d.scrollLeft=Math.max(0,b.x+b.width/2-d.clientWidth/3);}}\
         function flip(p){const c=p.querySelector('.collapsed'),f=p.querySelector('.full'),t=p.querySelector('.toggle');\
         const show=f.hidden;f.hidden=!show;c.hidden=show;t.textContent=show?'collapse shape arithmetic':'expand all';}\
         for(const p of document.querySelectorAll('.panel')){const t=p.querySelector('.toggle');if(!t)continue;\
         t.addEventListener('click',e=>{e.preventDefault();flip(p);});\
         for(const g of p.querySelectorAll('g.node.shape'))g.addEventListener('click',()=>flip(p));}</script>\n</body></html>\n",
    );
    s
}
