//! `order-ingest backfill --from <date>`: republishes everything Magento changed since a date,
//! through the same poll rounds, normalisation and enrichment as the live service.
//!
//! It keeps no checkpoint of its own and never touches the live poll's: event ids are
//! deterministic, so whatever the backfill republishes that consumers already have is dropped
//! by them as a duplicate, and a backfill stopped halfway is simply run again. Progress is a
//! bar on a terminal and a log line per round everywhere else (e.g. in a Kubernetes Job).

use std::sync::Arc;
use std::time::Duration;

use crate::poll::{self, Checkpoint, Entity, RoundSpec};

/// `backfill` arguments.
#[derive(Clone, Debug, clap::Args)]
pub struct BackfillArgs {
    /// Republish what changed at or after this UTC time (`2026-01-31` or `2026-01-31T08:00:00Z`).
    #[arg(long = "from", value_parser = parse_from)]
    pub from_ms: i64,
    /// What to republish, comma separated.
    #[arg(long = "entities", default_value = "orders,customers", value_delimiter = ',')]
    pub entities: Vec<Entity>,
    /// Only these store view ids, comma separated [default: every configured store].
    #[arg(long = "store", value_delimiter = ',')]
    pub stores: Vec<i64>,
}

/// Parses a UTC date or date-time.
pub fn parse_from(text: &str) -> Result<i64, String> {
    let text = text.trim().trim_end_matches('Z');
    let full = if text.len() == 10 { format!("{text} 00:00:00") } else { text.replace('T', " ") };
    crate::normalize::parse_magento_time(&full)
        .ok_or_else(|| format!("{text:?}: expected YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ (UTC)"))
}

/// What a backfill did.
#[derive(Debug, Default, PartialEq)]
pub struct Summary {
    pub published: usize,
    pub skipped_invalid: usize,
    pub failed_scopes: Vec<String>,
}

/// Runs the backfill over every (entity, store) scope until done or `stop`.
pub async fn run<S: poll::EntitySearch, P: crate::push::Publisher>(
    search: &S,
    publisher: &P,
    stores: &crate::normalize::Stores,
    args: &BackfillArgs,
    page_size: usize,
    stop: &tokio_util::sync::CancellationToken,
) -> Summary {
    let mut store_ids: Vec<(i64, String)> = stores
        .0
        .iter()
        .filter(|(id, _)| args.stores.is_empty() || args.stores.contains(id))
        .map(|(id, (code, _))| (*id, code.clone()))
        .collect();
    store_ids.sort();
    let mut summary = Summary::default();
    let bars = indicatif::MultiProgress::new();
    let style =
        indicatif::ProgressStyle::with_template("{prefix:>22} [{bar:40}] {pos}/{len} ({per_sec}, eta {eta}) {msg}")
            .expect("valid template")
            .progress_chars("=> ");
    for entity in &args.entities {
        for (store_id, code) in &store_ids {
            let scope = format!("{}/{code}", entity.as_str());
            let bar = bars.add(indicatif::ProgressBar::new(0).with_style(style.clone()).with_prefix(scope.clone()));
            let spec =
                RoundSpec { entity: *entity, store_id: *store_id, overlap: Duration::ZERO, page_size, max_pages: 10 };
            let mut checkpoint = Checkpoint::starting_at(args.from_ms);
            let mut done_before = 0;
            let mut total_seen = None;
            loop {
                let mut report = |done: usize, total: usize| {
                    let total = *total_seen.get_or_insert(total);
                    bar.set_length(total.max(done_before + done) as u64);
                    bar.set_position((done_before + done) as u64);
                };
                let (round, error) = tokio::select! {
                    // A stop requested before the round starts wins.
                    biased;
                    _ = stop.cancelled() => {
                        bar.abandon_with_message("interrupted");
                        summary.failed_scopes.push(format!("{scope}: interrupted"));
                        return summary;
                    }
                    r = poll::poll_once(search, publisher, stores, &spec, &checkpoint, &mut report) => r,
                };
                done_before += round.published + round.skipped_invalid;
                summary.published += round.published;
                summary.skipped_invalid += round.skipped_invalid;
                checkpoint = round.checkpoint;
                tracing::info!(scope = %scope, published = done_before, total = total_seen.unwrap_or_default(), "backfill progress");
                if let Some(error) = error {
                    bar.abandon_with_message(format!("failed: {error}"));
                    tracing::error!(scope = %scope, error = %error, "backfill stopped; run it again to resume");
                    summary.failed_scopes.push(format!("{scope}: {error}"));
                    break;
                }
                if !round.more {
                    bar.finish_with_message("done");
                    break;
                }
            }
        }
    }
    summary
}

/// The CLI entry: the service's publisher and Magento client, a throwaway admin port.
pub async fn main(mut config: crate::Config, args: BackfillArgs) -> anyhow::Result<()> {
    crate::no_idle_linger(&mut config.common.kafka)?;
    let topics = vec![
        config.common.topics.spec(&config.common.topics.commerce),
        config.common.topics.spec(&config.common.topics.inventory),
        config.common.topics.spec(&config.erased_topic).compacted(),
    ];
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let Some(service) = elo_service::Service::start("order-ingest-backfill", &config.common, admin, topics).await?
    else {
        return Ok(());
    };
    // An erased person's orders are not republished by a backfill.
    let Some((erased, follower)) = crate::load_erasures(&service, &config).await else {
        service.finish().await;
        return Ok(());
    };
    let source = Arc::new(crate::magento_source(&config, "magento-backfill")?);
    let publisher = crate::shared_publisher(&service, &config, source.clone(), erased, false);
    let started = std::time::Instant::now();
    let summary = run(
        &*source,
        &publisher,
        &config.magento_stores,
        &args,
        config.poll_page_size.clamp(1, 300),
        &service.shutdown,
    )
    .await;
    service.shutdown.cancel();
    let _ = follower.await;
    service.finish().await;
    let seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "backfill: {} published, {} invalid skipped, {:.1} s ({:.0}/s)",
        summary.published,
        summary.skipped_invalid,
        seconds,
        summary.published as f64 / seconds.max(0.001)
    );
    anyhow::ensure!(summary.failed_scopes.is_empty(), "backfill incomplete: {}", summary.failed_scopes.join("; "));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_parse_as_utc() {
        assert_eq!(parse_from("1970-01-02"), Ok(86_400_000));
        assert_eq!(parse_from("1970-01-01T00:01:00Z"), Ok(60_000));
        assert!(parse_from("yesterday").is_err());
    }

    #[tokio::test]
    async fn a_backfill_republishes_every_scope_from_the_date_and_can_be_interrupted() {
        let generator = sandbox::magento::generator::GeneratorConfig {
            spacing_ms: 1_000,
            transition_rate: 0.0,
            ..Default::default()
        };
        let mut magento = sandbox::magento::Magento::new(Default::default(), generator);
        magento.generate(120);
        crate::poll::tests::one_store(&mut magento);
        let from =
            magento.orders[&41]["updated_at"].as_str().map(crate::normalize::parse_magento_time).unwrap().unwrap();
        let expected = magento
            .orders
            .values()
            .filter(|o| crate::normalize::parse_magento_time(o["updated_at"].as_str().unwrap()).unwrap() >= from)
            .count();
        let search = crate::poll::tests::Sandbox::new(std::sync::Arc::new(std::sync::Mutex::new(magento)));
        let recorder = crate::enrich::tests::Recorder::default();
        let stores = crate::normalize::Stores([(1, ("default".to_owned(), 1))].into_iter().collect());
        let args = BackfillArgs { from_ms: from, entities: vec![Entity::Orders], stores: vec![] };
        let stop = tokio_util::sync::CancellationToken::new();
        let summary = run(&search, &recorder, &stores, &args, 7, &stop).await;
        assert_eq!(summary.published, expected, "every order changed since the date, once");
        assert!(summary.failed_scopes.is_empty());
        let events = recorder.events.lock().unwrap().clone();
        assert!(events.iter().all(|e| e.source_version.updated_at >= from));
        stop.cancel();
        let interrupted = run(&search, &recorder, &stores, &args, 7, &stop).await;
        assert_eq!(interrupted.failed_scopes, ["orders/default: interrupted"]);
    }
}
