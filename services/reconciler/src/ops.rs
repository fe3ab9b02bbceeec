//! Settings of the operator side: the HTTP listener (reports, flow diagram) and where the
//! other services' admin endpoints and consumer groups are. Defaults match `make run`.

use std::net::SocketAddr;

use crate::dlq::cli::DlqTopicsArgs;

/// The services of the workflow, in order.
pub const SERVICES: [&str; 4] = ["order-ingest", "salesforce-sink", "rdstation-sink", "reconciler"];

#[derive(Clone, Debug, clap::Args)]
pub struct OpsArgs {
    /// Address of the reports and flow-diagram listener (`/report`, `/flow`, `/api/flow`).
    #[arg(long = "http-listen", env = "ELO_RECONCILER_HTTP_LISTEN", default_value = "127.0.0.1:9180")]
    pub http_listen: SocketAddr,
    /// Keep running without the reports listener when its address is taken (several
    /// reconcilers on one host); any other start-up error of the listener stops the service.
    /// `reconciler_http_listener_up` says whether it serves.
    #[arg(long = "http-optional", env = "ELO_RECONCILER_HTTP_OPTIONAL")]
    pub http_optional: bool,
    /// Admin base URL of each service (`/health/readyz`, `/metrics`), `name=url`, comma-separated.
    #[arg(
        long = "service-admin",
        env = "ELO_RECONCILER_SERVICE_ADMIN",
        value_delimiter = ',',
        default_value = "order-ingest=http://127.0.0.1:9101,salesforce-sink=http://127.0.0.1:9102,rdstation-sink=http://127.0.0.1:9103,reconciler=http://127.0.0.1:9104",
        value_parser = parse_pair
    )]
    pub service_admin: Vec<(String, String)>,
    /// Consumer group of each consuming service (for its backlog), `name=group`, comma-separated.
    /// The reconciler's own group is added from its settings.
    #[arg(
        long = "service-groups",
        env = "ELO_RECONCILER_SERVICE_GROUPS",
        value_delimiter = ',',
        default_value = "order-ingest=elo-order-ingest-commands,salesforce-sink=elo-salesforce-sink,rdstation-sink=elo-rdstation-sink",
        value_parser = parse_pair
    )]
    pub service_groups: Vec<(String, String)>,
    #[command(flatten)]
    pub dlq: DlqTopicsArgs,
    /// Compacted topic where `dlq replay` records what it replayed, so a rerun continues where
    /// it stopped (also read by the report). `--checkpoint-topic` is the same setting.
    #[arg(
        long = "replay-checkpoints",
        visible_alias = "checkpoint-topic",
        global = true,
        env = "ELO_RECONCILER_REPLAY_CHECKPOINTS",
        default_value = "reconciler.replay.checkpoints"
    )]
    pub replay_checkpoints: String,
}

impl OpsArgs {
    pub fn admin_url(&self, service: &str) -> Option<&str> {
        self.service_admin.iter().find(|(s, _)| s == service).map(|(_, u)| u.trim_end_matches('/'))
    }

    pub fn group(&self, service: &str) -> Option<&str> {
        self.service_groups.iter().find(|(s, _)| s == service).map(|(_, g)| g.as_str())
    }
}

/// Milliseconds since the Unix epoch (the clock the reports, the flow and the DLQ tools share).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// `name=value`.
pub fn parse_pair(text: &str) -> Result<(String, String), String> {
    let (k, v) = text.split_once('=').ok_or_else(|| format!("expected name=value, got {text:?}"))?;
    let (k, v) = (k.trim(), v.trim());
    if k.is_empty() || v.is_empty() {
        return Err(format!("expected name=value, got {text:?}"));
    }
    Ok((k.to_owned(), v.to_owned()))
}

/// Sums the samples of a Prometheus text metric whose line contains every `labels` part.
pub fn metric_sum(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else { continue };
        if !(rest.starts_with('{') || rest.starts_with(' ')) || !labels.iter().all(|l| rest.contains(l)) {
            continue;
        }
        if let Some(v) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        ops: OpsArgs,
    }

    #[test]
    fn defaults_match_make_run() {
        let cli = Cli::parse_from(["x"]);
        assert_eq!(cli.ops.http_listen.to_string(), "127.0.0.1:9180");
        assert_eq!(cli.ops.admin_url("order-ingest"), Some("http://127.0.0.1:9101"));
        assert_eq!(cli.ops.admin_url("reconciler"), Some("http://127.0.0.1:9104"));
        assert_eq!(cli.ops.group("salesforce-sink"), Some("elo-salesforce-sink"));
        assert_eq!(cli.ops.dlq.dlq_topics.len(), 4);
        let cli = Cli::parse_from(["x", "--service-admin", "order-ingest=http://h:1/"]);
        assert_eq!(cli.ops.admin_url("order-ingest"), Some("http://h:1"));
        assert!(parse_pair("novalue=").is_err() && parse_pair("x").is_err());
    }

    #[test]
    fn metric_sums_match_name_and_labels_exactly() {
        let text = "# HELP x\nelo_consumer_records_total{topic=\"a\",outcome=\"applied\"} 3\n\
elo_consumer_records_total{topic=\"b\",outcome=\"applied\"} 4\n\
elo_consumer_records_total{topic=\"b\",outcome=\"dead_lettered\"} 1\n\
elo_consumer_records_total_other 9\nplain 2.5\n";
        assert_eq!(metric_sum(text, "elo_consumer_records_total", &["outcome=\"applied\""]), Some(7.0));
        assert_eq!(metric_sum(text, "elo_consumer_records_total", &[]), Some(8.0));
        assert_eq!(metric_sum(text, "plain", &[]), Some(2.5));
        assert_eq!(metric_sum(text, "missing", &[]), None);
    }
}
