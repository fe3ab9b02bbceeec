//! The flow diagram page: an inline SVG of the six steps, rendered with the current figures
//! and kept current by a small inline script that fetches `/api/flow` every few seconds (no
//! external scripts or styles).

use std::fmt::Write;

use super::{FlowSnapshot, FlowStep, Health};
use crate::report::render::{STYLE, escape};

const BOX_W: u32 = 170;
const GAP: u32 = 40;
const BOX_H: u32 = 150;

fn health_text(h: Health) -> &'static str {
    match h {
        Health::Ready => "ready",
        Health::NotReady => "not ready",
        Health::Unreachable => "unreachable",
    }
}

fn step_svg(i: usize, s: &FlowStep) -> String {
    let x = 10 + (BOX_W + GAP) * i as u32;
    let id = escape(&s.id);
    let count = s.count.map_or_else(|| "–".to_owned(), |c| c.to_string());
    let backlog = s.backlog.map_or_else(|| "–".to_owned(), |b| b.to_string());
    let cx = x + BOX_W / 2;
    let mut g = format!(
        r#"<g id="step-{id}" class="step {}" data-step="{id}"><rect x="{x}" y="10" width="{BOX_W}" height="{BOX_H}" rx="10"/>"#,
        match s.health {
            Health::Ready => "ready",
            Health::NotReady => "not-ready",
            Health::Unreachable => "unreachable",
        }
    );
    let _ = write!(
        g,
        r#"<text x="{cx}" y="36" class="title">{}</text><text x="{cx}" y="54" class="service">{}</text><text x="{cx}" y="88" class="count" id="count-{id}">{count}</text><text x="{cx}" y="106" class="label">{}</text><text x="{cx}" y="128" id="backlog-{id}">backlog {backlog}</text><text x="{cx}" y="148" id="health-{id}">{}</text></g>"#,
        escape(&s.title),
        escape(&s.service),
        escape(&s.count_label),
        health_text(s.health)
    );
    g
}

/// The whole page, with `snapshot` as its first state.
pub fn html(snapshot: &FlowSnapshot, refresh_ms: u32) -> String {
    let width = (BOX_W + GAP) * snapshot.steps.len() as u32 + 10;
    let mut svg = format!(
        r##"<svg id="flow" role="img" aria-label="Elo workflow" width="{width}" height="{}" viewBox="0 0 {width} {}" xmlns="http://www.w3.org/2000/svg"><defs><marker id="arrow" markerWidth="10" markerHeight="10" refX="8" refY="5" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#57606a"/></marker></defs>"##,
        BOX_H + 20,
        BOX_H + 20
    );
    for i in 1..snapshot.steps.len() {
        let x1 = 10 + (BOX_W + GAP) * i as u32 - GAP;
        let y = 10 + BOX_H / 2;
        let _ = write!(
            svg,
            r##"<line x1="{x1}" y1="{y}" x2="{}" y2="{y}" stroke="#57606a" stroke-width="2" marker-end="url(#arrow)"/>"##,
            x1 + GAP - 4
        );
    }
    for (i, s) in snapshot.steps.iter().enumerate() {
        svg.push_str(&step_svg(i, s));
    }
    svg.push_str("</svg>");
    let mut details = String::from("<table id=\"details\"><tr><th>step</th><th>figure</th><th>value</th></tr>");
    for s in &snapshot.steps {
        for (k, v) in &s.details {
            let _ =
                write!(details, "<tr><td>{}</td><td>{}</td><td class=\"n\">{v}</td></tr>", escape(&s.title), escape(k));
        }
    }
    details.push_str("</table>");
    let initial = serde_json::to_string(snapshot).expect("snapshot serialises").replace("</", "<\\/");
    format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Elo live flow</title><link rel="icon" href="data:,"><meta name="viewport" content="width=device-width,initial-scale=1"><style>{STYLE}
.step rect{{fill:#fff;stroke-width:3}}.step.ready rect{{stroke:#1a7f37}}.step.not-ready rect{{stroke:#cf222e}}.step.unreachable rect{{stroke:#8c959f;stroke-dasharray:6 4}}
.step text{{text-anchor:middle}}.step .title{{font-weight:700;font-size:15px}}.step .service,.step .label{{fill:#57606a;font-size:12px}}.step .count{{font-size:26px;font-weight:700}}</style></head>
<body><h1>Elo live flow</h1><p>Counts since each service started; backlog = records its consumer group has not committed; health = its readiness. Updated <span id="as-of">{}</span>, every {}&nbsp;s (<span id="refreshes">0</span> updates). <a href="/report">Today's report</a></p>
{svg}<h2>Details</h2>{details}
<script>
"use strict";
const REFRESH = {refresh_ms};
function show(snapshot) {{
  for (const s of snapshot.steps) {{
    const g = document.getElementById("step-" + s.id);
    if (!g) continue;
    g.setAttribute("class", "step " + s.health.replace("_", "-"));
    document.getElementById("count-" + s.id).textContent = s.count === null ? "\u2013" : String(s.count);
    document.getElementById("backlog-" + s.id).textContent = "backlog " + (s.backlog === null ? "\u2013" : String(s.backlog));
    document.getElementById("health-" + s.id).textContent = s.health.replace("_", " ");
  }}
  const rows = ["<tr><th>step</th><th>figure</th><th>value</th></tr>"];
  for (const s of snapshot.steps) for (const [k, v] of Object.entries(s.details)) {{
    const cell = (t) => {{ const td = document.createElement("td"); td.textContent = t; return td.outerHTML; }};
    rows.push("<tr>" + cell(s.title) + cell(k) + "<td class=\"n\">" + Number(v) + "</td></tr>");
  }}
  document.getElementById("details").innerHTML = rows.join("");
  document.getElementById("as-of").textContent = new Date(snapshot.as_of_ms).toISOString();
}}
async function refresh() {{
  try {{
    const r = await fetch("/api/flow", {{ cache: "no-store" }});
    if (r.ok) {{
      show(await r.json());
      const n = document.getElementById("refreshes");
      n.textContent = String(Number(n.textContent) + 1);
    }}
  }} catch (e) {{ /* the reconciler restarting: keep the last figures */ }}
}}
show({initial});
setInterval(refresh, REFRESH);
</script></body></html>
"#,
        escape(&crate::dlq::cli::format_ms(snapshot.as_of_ms)),
        refresh_ms / 1000,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::{snapshot, tests::observed};
    use crate::status::LedgerStatus;

    #[test]
    fn the_page_draws_six_steps_with_their_figures_and_refreshes_itself() {
        let s = snapshot(&observed(), &LedgerStatus::default(), "commerce.events", 1_796_083_200_000);
        let page = html(&s, 3000);
        for id in ["order", "inventory", "salesforce", "rdstation", "repair", "report"] {
            assert!(page.contains(&format!("id=\"step-{id}\"")), "{id}");
        }
        assert!(page.contains(r#"id="count-order">120<"#));
        assert!(page.contains(r#"id="backlog-salesforce">backlog 7<"#));
        assert!(page.contains(r#"<g id="step-salesforce" class="step not-ready""#));
        assert!(page.contains(r#"id="count-rdstation">–<"#), "unknown shows a dash");
        assert_eq!(page.matches("marker-end").count(), 5, "five arrows between six steps");
        assert!(page.contains("fetch(\"/api/flow\"") && page.contains("const REFRESH = 3000;"));
        assert!(!page.contains("<script src"), "no external scripts");
    }
}
