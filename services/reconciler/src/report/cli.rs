//! `reconciler report --date YYYY-MM-DD`: writes the day's report as files.

use std::path::PathBuf;
use std::sync::Arc;

use elo_events::EventCodec;
use elo_service::CommonArgs;

use super::collect::ReportSources;
use super::render::{self, Format};
use crate::ops::OpsArgs;
use crate::status::LedgerStatus;

#[derive(Clone, Debug, clap::Args)]
pub struct ReportArgs {
    /// The day (UTC) [default: today].
    #[arg(long)]
    pub date: Option<String>,
    /// Formats to write (repeatable) [default: html, json and csv].
    #[arg(long, value_enum)]
    pub format: Vec<Format>,
    /// Directory for `elo-report-<date>.<ext>`; `-` writes one format to stdout.
    #[arg(long, default_value = ".")]
    pub out: PathBuf,
}

/// The running reconciler's ledger figures, if one of this deployment (same commerce topic)
/// answers on the reports listener; zeros otherwise (the Kafka figures do not depend on it).
async fn live_status(ops: &OpsArgs, commerce_topic: &str) -> LedgerStatus {
    let url = format!("http://{}/api/status", ops.http_listen);
    let client = reqwest::Client::builder().timeout(std::time::Duration::from_secs(2)).build();
    let answer = match client {
        Ok(c) => c.get(&url).send().await.ok(),
        Err(_) => None,
    };
    let ours = |r: &reqwest::Response| {
        r.headers().get(crate::http::TOPIC_HEADER).and_then(|v| v.to_str().ok()) == Some(commerce_topic)
    };
    match answer {
        Some(r) if r.status().is_success() && ours(&r) => r.json().await.unwrap_or_default(),
        Some(r) if r.status().is_success() => {
            eprintln!(
                "the reconciler at {url} reads another commerce topic than {commerce_topic}: its ledger figures are not used (zeros shown)"
            );
            LedgerStatus::default()
        }
        _ => {
            eprintln!(
                "no reconciler answers at {url}: ledger figures (repairs, escalations, overdue) are shown as zeros"
            );
            LedgerStatus::default()
        }
    }
}

pub async fn run(common: &CommonArgs, ops: &OpsArgs, args: ReportArgs) -> anyhow::Result<()> {
    let date = args.date.unwrap_or_else(|| elo_events::time::date_of_ms(crate::ops::now_ms()));
    let formats = if args.format.is_empty() { vec![Format::Html, Format::Json, Format::Csv] } else { args.format };
    let codec = Arc::new(EventCodec::new(&common.registry.config()?)?);
    let sources = ReportSources::new(common, ops, codec)?;
    let report = sources.daily(&date, &live_status(ops, &common.topics.commerce).await).await?;
    if args.out.as_os_str() == "-" {
        anyhow::ensure!(formats.len() == 1, "--out - writes one format: pass exactly one --format");
        print!("{}", render::render(&report, formats[0]));
        return Ok(());
    }
    std::fs::create_dir_all(&args.out)?;
    for format in formats {
        let path = args.out.join(format!("elo-report-{date}.{}", format.extension()));
        std::fs::write(&path, render::render(&report, format))?;
        println!("{}", path.display());
    }
    Ok(())
}
