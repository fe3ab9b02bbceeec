//! The report as HTML (self-contained: inline CSS and SVG charts, no scripts, no external
//! resources), JSON and CSV. Pure functions of a [`DailyReport`].

use std::fmt::Write;

use super::DailyReport;

/// The formats `/report` and `reconciler report` write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Html,
    Json,
    Csv,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Html => "text/html; charset=utf-8",
            Self::Json => "application/json",
            Self::Csv => "text/csv; charset=utf-8",
        }
    }

    pub fn extension(self) -> &'static str {
        match self {
            Self::Html => "html",
            Self::Json => "json",
            Self::Csv => "csv",
        }
    }
}

pub fn render(report: &DailyReport, format: Format) -> String {
    match format {
        Format::Html => html(report),
        Format::Json => serde_json::to_string_pretty(report).expect("a report always serialises"),
        Format::Csv => csv(report),
    }
}

/// Escapes text for HTML content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// One row per figure: `section,subject,metric,value`.
pub fn csv(r: &DailyReport) -> String {
    let mut rows: Vec<[String; 4]> = Vec::new();
    let mut row = |section: &str, subject: &str, metric: &str, value: String| {
        rows.push([section.into(), subject.into(), metric.into(), value]);
    };
    row("report", "", "date", r.date.clone());
    row("orders", "", "received", r.orders_received.to_string());
    row("orders", "", "order_events", r.order_events.to_string());
    row("orders", "", "customer_events", r.customer_events.to_string());
    row("orders", "", "replayed_records", r.replayed_records.to_string());
    let inv = &r.inventory;
    for (metric, value) in
        [("ok", inv.ok), ("low_stock", inv.low_stock), ("oversold", inv.oversold), ("unchecked", inv.unchecked)]
    {
        row("inventory", "", metric, value.to_string());
    }
    for (target, t) in &r.synced {
        for (metric, value) in [
            ("orders", t.orders),
            ("customers", t.customers),
            ("applied", t.applied),
            ("skipped_stale", t.skipped_stale),
            ("dead_lettered", t.dead_lettered),
        ] {
            row("synced", target, metric, value.to_string());
        }
    }
    for l in &r.latency {
        row("latency", &l.step, "count", l.count.to_string());
        for (metric, value) in [("p50_ms", l.p50_ms), ("p90_ms", l.p90_ms), ("p99_ms", l.p99_ms), ("max_ms", l.max_ms)]
        {
            row("latency", &l.step, metric, value.to_string());
        }
    }
    for f in &r.failures {
        row("failures", &format!("{}/{}/{}", f.service, f.class, f.code), "count", f.count.to_string());
    }
    for (kind, n) in &r.repairs.commands {
        row("repairs", kind, "commands", n.to_string());
    }
    for (target, n) in &r.repairs.drift_found {
        row("repairs", target, "drift_found", n.to_string());
    }
    for (target, n) in &r.repairs.repaired {
        row("repairs", target, "repaired", n.to_string());
    }
    row("needs_person", "", "dead_letters", r.needs_person.dead_letters.to_string());
    for (target, n) in &r.needs_person.escalated {
        row("needs_person", target, "escalated", n.to_string());
    }
    for (target, n) in &r.needs_person.overdue {
        row("needs_person", target, "overdue", n.to_string());
    }
    for (target, q) in &r.quota {
        row("quota", target, "used", q.used.map(|u| u.to_string()).unwrap_or_default());
        row("quota", target, "limit", q.limit.map(|u| u.to_string()).unwrap_or_default());
    }
    let mut out = String::from("section,subject,metric,value\n");
    for r in rows {
        let cells: Vec<String> = r.iter().map(|c| csv_cell(c)).collect();
        out.push_str(&cells.join(","));
        out.push('\n');
    }
    out
}

fn csv_cell(cell: &str) -> String {
    if cell.contains([',', '"', '\n', '\r']) { format!("\"{}\"", cell.replace('"', "\"\"")) } else { cell.to_owned() }
}

/// A horizontal bar chart: one bar per `(label, value)`, scaled to the largest.
pub fn bar_chart(id: &str, title: &str, bars: &[(String, u64)], unit: &str) -> String {
    const ROW: u32 = 26;
    const LABEL: u32 = 200;
    const WIDTH: u32 = 420;
    let height = ROW * bars.len().max(1) as u32 + 30;
    let max = bars.iter().map(|(_, v)| *v).max().unwrap_or(0).max(1);
    let mut svg = format!(
        r#"<figure><figcaption>{}</figcaption><svg id="{}" role="img" aria-label="{}" width="{}" height="{height}" viewBox="0 0 {} {height}" xmlns="http://www.w3.org/2000/svg">"#,
        escape(title),
        escape(id),
        escape(title),
        LABEL + WIDTH + 90,
        LABEL + WIDTH + 90
    );
    if bars.is_empty() {
        svg.push_str(r#"<text x="0" y="20" class="none">nothing this day</text>"#);
    }
    for (i, (label, value)) in bars.iter().enumerate() {
        let y = 10 + ROW * i as u32;
        let w = ((*value as f64 / max as f64) * f64::from(WIDTH)).round() as u32;
        let _ = write!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="end">{}</text><rect x="{LABEL}" y="{y}" width="{}" height="18" class="bar"><title>{}: {value}{}</title></rect><text x="{}" y="{}" class="value">{value}{}</text>"#,
            LABEL - 8,
            y + 14,
            escape(label),
            w.max(1),
            escape(label),
            escape(unit),
            LABEL + w + 6,
            y + 14,
            escape(unit)
        );
    }
    svg.push_str("</svg></figure>");
    svg
}

pub(crate) const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:2rem;color:#1b1f24;background:#fafbfc}\
h1{font-size:1.5rem}h2{font-size:1.15rem;margin-top:2rem}\
.cards{display:flex;gap:1rem;flex-wrap:wrap}.card{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:.8rem 1.2rem;min-width:9rem}\
.card b{display:block;font-size:1.6rem}table{border-collapse:collapse;background:#fff}\
td,th{border:1px solid #d0d7de;padding:.3rem .6rem;text-align:left}td.n{text-align:right}\
svg text{font-size:13px;fill:#1b1f24}svg .bar{fill:#2f81f7}svg .none{fill:#57606a}\
figure{margin:1rem 0}figcaption{font-weight:600;margin-bottom:.3rem}";

fn card(id: &str, label: &str, value: impl std::fmt::Display) -> String {
    format!(r#"<div class="card" id="{}"><b>{value}</b>{}</div>"#, escape(id), escape(label))
}

fn table(head: &[&str], rows: &[Vec<String>]) -> String {
    let mut t = String::from("<table><tr>");
    for h in head {
        let _ = write!(t, "<th>{}</th>", escape(h));
    }
    t.push_str("</tr>");
    for row in rows {
        t.push_str("<tr>");
        for (i, cell) in row.iter().enumerate() {
            let class = if i > 0 && cell.parse::<f64>().is_ok() { " class=\"n\"" } else { "" };
            let _ = write!(t, "<td{class}>{}</td>", escape(cell));
        }
        t.push_str("</tr>");
    }
    if rows.is_empty() {
        let _ = write!(t, "<tr><td colspan=\"{}\">none</td></tr>", head.len());
    }
    t.push_str("</table>");
    t
}

pub fn html(r: &DailyReport) -> String {
    let mut h = String::new();
    let date = escape(&r.date);
    let _ = write!(
        h,
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Elo daily report {date}</title><link rel="icon" href="data:,"><meta name="viewport" content="width=device-width,initial-scale=1"><style>{STYLE}</style></head><body><h1>Elo daily report — {date} (UTC)</h1><p>Generated {}. <a href="/report?date={date}&amp;format=json">JSON</a> · <a href="/report?date={date}&amp;format=csv">CSV</a> · <a href="/flow">Live flow</a></p>"#,
        escape(&crate::dlq::cli::format_ms(r.generated_at_ms))
    );
    h.push_str(r#"<h2>Orders</h2><div class="cards">"#);
    h.push_str(&card("orders-received", "orders received", r.orders_received));
    h.push_str(&card("order-events", "order events", r.order_events));
    h.push_str(&card("customer-events", "customer events", r.customer_events));
    h.push_str(&card("replayed-records", "replayed from a DLQ", r.replayed_records));
    for (target, t) in &r.synced {
        h.push_str(&card(&format!("synced-{target}"), &format!("orders synced to {target}"), t.orders));
    }
    h.push_str("</div>");

    h.push_str("<h2>Synced per target</h2>");
    let synced: Vec<(String, u64)> = r
        .synced
        .iter()
        .flat_map(|(t, f)| [(format!("{t} orders"), f.orders), (format!("{t} customers"), f.customers)])
        .collect();
    h.push_str(&bar_chart("chart-synced", "Distinct orders and customers confirmed by each target", &synced, ""));
    let rows: Vec<Vec<String>> = r
        .synced
        .iter()
        .map(|(t, f)| {
            vec![
                t.clone(),
                f.orders.to_string(),
                f.customers.to_string(),
                f.applied.to_string(),
                f.skipped_stale.to_string(),
                f.dead_lettered.to_string(),
            ]
        })
        .collect();
    h.push_str(&table(&["target", "orders", "customers", "applied", "skipped (stale)", "dead-lettered"], &rows));

    h.push_str("<h2>Inventory check</h2>");
    let i = &r.inventory;
    let inventory = [("ok", i.ok), ("low stock", i.low_stock), ("oversold", i.oversold), ("unchecked", i.unchecked)]
        .map(|(l, v)| (l.to_owned(), v));
    h.push_str(&bar_chart("chart-inventory", "Orders by inventory status", &inventory, ""));

    h.push_str("<h2>Latency per workflow step</h2>");
    let p90: Vec<(String, u64)> =
        r.latency.iter().map(|l| (format!("{} p90", l.step), l.p90_ms.max(0) as u64)).collect();
    h.push_str(&bar_chart("chart-latency", "p90 latency (ms) from the Magento change", &p90, " ms"));
    let rows: Vec<Vec<String>> = r
        .latency
        .iter()
        .map(|l| {
            vec![
                l.step.clone(),
                l.count.to_string(),
                l.p50_ms.to_string(),
                l.p90_ms.to_string(),
                l.p99_ms.to_string(),
                l.max_ms.to_string(),
            ]
        })
        .collect();
    h.push_str(&table(&["step", "samples", "p50 ms", "p90 ms", "p99 ms", "max ms"], &rows));

    h.push_str("<h2>Failures by class</h2>");
    let failures: Vec<(String, u64)> =
        r.failures.iter().map(|f| (format!("{} {} {}", f.service, f.class, f.code), f.count)).collect();
    h.push_str(&bar_chart("chart-failures", "Dead letters parked this day", &failures, ""));

    h.push_str("<h2>Automatic repairs</h2>");
    let mut rows: Vec<Vec<String>> =
        r.repairs.commands.iter().map(|(k, n)| vec![format!("{k} commands issued"), n.to_string()]).collect();
    rows.extend(
        r.repairs.drift_found.iter().map(|(t, n)| vec![format!("drift found in {t} (since start)"), n.to_string()]),
    );
    rows.extend(r.repairs.repaired.iter().map(|(t, n)| vec![format!("repaired in {t} (since start)"), n.to_string()]));
    h.push_str(&table(&["repair", "count"], &rows));

    h.push_str("<h2>Needs a person</h2><div class=\"cards\">");
    h.push_str(&card("needs-dead-letters", "dead letters not replayed", r.needs_person.dead_letters));
    h.push_str(&card("needs-escalated", "escalated by the ledger", r.needs_person.escalated.values().sum::<u64>()));
    h.push_str(&card("needs-overdue", "overdue now", r.needs_person.overdue.values().sum::<u64>()));
    h.push_str("</div>");
    if !r.needs_person.examples.is_empty() {
        h.push_str("<ul>");
        for e in &r.needs_person.examples {
            let _ = write!(h, "<li><code>{}</code></li>", escape(e));
        }
        h.push_str("</ul><p>Inspect with <code>reconciler dlq show &lt;dead letter&gt;</code>, replay with <code>reconciler dlq replay</code>.</p>");
    }

    h.push_str("<h2>API quota used</h2>");
    let rows: Vec<Vec<String>> = r
        .quota
        .iter()
        .map(|(t, q)| {
            vec![
                t.clone(),
                q.used.map_or_else(|| "unknown".into(), |u| u.to_string()),
                q.limit.map_or_else(|| "unknown".into(), |u| u.to_string()),
                q.source.clone(),
            ]
        })
        .collect();
    h.push_str(&table(&["target", "used", "limit", "source"], &rows));
    h.push_str("</body></html>\n");
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::sample_report;

    #[test]
    fn json_round_trips() {
        let r = sample_report();
        let back: DailyReport = serde_json::from_str(&render(&r, Format::Json)).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn csv_has_one_row_per_figure_and_quotes_what_needs_it() {
        let text = csv(&sample_report());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "section,subject,metric,value");
        assert!(lines.contains(&"orders,,received,3"));
        assert!(lines.contains(&"synced,salesforce,orders,2"));
        assert!(lines.contains(&"latency,salesforce,p99_ms,3000"));
        assert!(lines.contains(&"failures,salesforce-sink/permanent/DUPLICATES_DETECTED,count,2"));
        assert!(lines.contains(&"quota,salesforce,used,120"));
        assert!(lines.contains(&"quota,rdstation,used,"), "unknown is empty, not zero");
        assert!(lines.iter().all(|l| l.split(',').count() == 4));
        assert_eq!(csv_cell("a,\"b\""), "\"a,\"\"b\"\"\"");
    }

    #[test]
    fn html_is_self_contained_and_shows_every_section() {
        let page = html(&sample_report());
        for needle in [
            "<svg id=\"chart-synced\"",
            "<svg id=\"chart-latency\"",
            "<svg id=\"chart-failures\"",
            "<svg id=\"chart-inventory\"",
            "id=\"orders-received\"><b>3</b>",
            "Needs a person",
            "REFETCH_ORDER commands issued",
            "salesforce-sink.dlq/1/2 DUPLICATES_DETECTED c:42",
            "API quota used",
        ] {
            assert!(page.contains(needle), "missing {needle}");
        }
        assert!(!page.contains("<script"), "no scripts");
        assert!(!page.contains("src="), "nothing loaded from elsewhere");
    }

    #[test]
    fn bars_scale_to_the_largest_and_text_is_escaped() {
        let svg = bar_chart("c", "t<1>", &[("a&b".into(), 10), ("c".into(), 5)], "");
        assert!(svg.contains("width=\"420\" height=\"18\""));
        assert!(svg.contains("width=\"210\" height=\"18\""));
        assert!(svg.contains("a&amp;b") && svg.contains("t&lt;1&gt;"));
        assert!(bar_chart("e", "empty", &[], "").contains("nothing this day"));
    }
}
