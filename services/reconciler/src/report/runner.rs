//! One report at a time, whoever asks.
//!
//! A report reads a day of several topics. The work runs in a task of its own that holds the
//! only build slot until the read has really ended (a request that goes away, a reload or a
//! client timeout, does not free it), and every request for the same day waits on that one
//! result. A request for another day while one is being built is told to come back. Finished
//! past days are kept for a few minutes (a replay can still change their "needs a person").

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::DailyReport;
use crate::status::LedgerStatus;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What builds a day's report: Kafka in production, a fake in tests.
pub trait DailySource: Send + Sync + 'static {
    fn build(&self, date: String, status: LedgerStatus) -> BoxFuture<'_, anyhow::Result<DailyReport>>;
}

impl DailySource for super::collect::ReportSources {
    fn build(&self, date: String, status: LedgerStatus) -> BoxFuture<'_, anyhow::Result<DailyReport>> {
        Box::pin(async move { self.daily(&date, &status).await })
    }
}

/// How long finished past days are served from memory.
const PAST_TTL: Duration = Duration::from_secs(300);
/// At most this many past days are kept.
const PAST_MAX: usize = 31;

type Done = Option<Result<Arc<DailyReport>, String>>;

/// What a request gets.
#[derive(Debug)]
pub enum Answer {
    Ready(Box<DailyReport>),
    /// Another day's report is being built.
    Busy(String),
    /// Still being built after the request's wait; it keeps going, ask again.
    Building,
    Failed(String),
}

pub struct ReportRunner {
    source: Arc<dyn DailySource>,
    running: Mutex<Option<(String, watch::Receiver<Done>)>>,
    past: Mutex<HashMap<String, (Instant, Arc<DailyReport>)>>,
    wait: Duration,
}

/// Frees the build slot when the build task ends, however it ends.
struct Slot(Arc<ReportRunner>);

impl Drop for Slot {
    fn drop(&mut self) {
        *self.0.running.lock().expect("report slot") = None;
    }
}

impl ReportRunner {
    /// `wait`: how long a request waits for a report before being told to ask again.
    pub fn new(source: Arc<dyn DailySource>, wait: Duration) -> Arc<Self> {
        Arc::new(Self { source, running: Mutex::new(None), past: Mutex::new(HashMap::new()), wait })
    }

    /// The report of `date`; `today` decides whether it may be cached.
    pub async fn get(self: &Arc<Self>, date: &str, today: &str, status: &LedgerStatus) -> Answer {
        let past_day = date < today;
        if past_day && let Some(report) = self.cached(date) {
            return Answer::Ready(Box::new(with_ledger(&report, status)));
        }
        let mut rx = {
            let mut running = self.running.lock().expect("report slot");
            match running.as_ref() {
                Some((d, rx)) if d == date => rx.clone(),
                Some((d, _)) => return Answer::Busy(d.clone()),
                None => {
                    let (tx, rx) = watch::channel(None);
                    *running = Some((date.to_owned(), rx.clone()));
                    let slot = Slot(self.clone());
                    let (date, status) = (date.to_owned(), status.clone());
                    tokio::spawn(async move {
                        let runner = slot.0.clone();
                        let result = runner.source.build(date.clone(), status).await;
                        let result = result.map(Arc::new).map_err(|e| format!("{e:#}"));
                        if let (true, Ok(report)) = (past_day, &result) {
                            runner.remember(&date, report.clone());
                        }
                        drop(slot);
                        tx.send_replace(Some(result));
                    });
                    rx
                }
            }
        };
        match tokio::time::timeout(self.wait, rx.wait_for(Option::is_some)).await {
            Ok(Ok(done)) => match done.as_ref().expect("waited for it") {
                Ok(report) => Answer::Ready(Box::new(with_ledger(report, status))),
                Err(error) => Answer::Failed(error.clone()),
            },
            Ok(Err(_)) => Answer::Failed("the report task ended without a result".into()),
            Err(_) => Answer::Building,
        }
    }

    fn cached(&self, date: &str) -> Option<Arc<DailyReport>> {
        let past = self.past.lock().expect("report cache");
        past.get(date).filter(|(at, _)| at.elapsed() < PAST_TTL).map(|(_, r)| r.clone())
    }

    fn remember(&self, date: &str, report: Arc<DailyReport>) {
        let mut past = self.past.lock().expect("report cache");
        past.retain(|_, (at, _)| at.elapsed() < PAST_TTL);
        if past.len() >= PAST_MAX
            && let Some(oldest) = past.iter().min_by_key(|(_, (at, _))| *at).map(|(d, _)| d.clone())
        {
            past.remove(&oldest);
        }
        past.insert(date.to_owned(), (Instant::now(), report));
    }
}

fn with_ledger(report: &DailyReport, status: &LedgerStatus) -> DailyReport {
    let mut report = report.clone();
    report.apply_ledger(status);
    report
}
