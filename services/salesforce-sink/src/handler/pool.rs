//! Composite Graph requests shared by the partitions' batches (adaptive batching).
//!
//! Each partition hands its batches over one at a time, so on a busy stream every partition's
//! batch is small and one request per batch would spend a call on a few orders. Instead the
//! graphs of the batches in flight board one "train" that departs as one request when every
//! partition that rode within the last second (and is not on a train still out) has boarded,
//! when its nodes reach Salesforce's 500 (a batch whose graphs do not all fit fills the train
//! and rides on in the next one, so backlog requests leave full), or at the latest
//! `ELO_SALESFORCE_GRAPH_LINGER` after its first graph boarded. After a
//! quiet spell nobody is expected and the first graph leaves at once (a lone order pays no
//! linger). On a busy stream the partitions' batches thus go out together, and the runtime's
//! busy linger (`ELO_SALESFORCE_BUSY_LINGER`, applied before a busy partition's batch is
//! taken, so records arriving meanwhile are in it) sets how full the requests are.
//!
//! Any rider of a train departs it when it is due (not only the first), so a batch cancelled
//! while waiting cannot strand the others; a rider whose train was lost (its departing batch
//! cancelled mid-call) gets a transient failure and the runtime retries its records.

use std::collections::{BTreeSet, HashMap};
use std::ops::Range;
use std::sync::Mutex;
use std::time::Duration;

use elo_kafka::HandlerError;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Sink, Verdict};
use crate::graph::{self, GraphPlan, MAX_GRAPHS, MAX_NODES};

type Verdicts = Vec<(usize, Verdict)>;

struct Rider {
    graphs: Range<usize>,
    reply: oneshot::Sender<Verdicts>,
}

/// A batch's place on one train.
struct Seat {
    id: u64,
    due: Instant,
    /// The train may leave now (full, or every partition expected has boarded).
    ready: bool,
    rx: oneshot::Receiver<Verdicts>,
}

struct Train {
    id: u64,
    due: Instant,
    partitions: BTreeSet<i32>,
    graphs: Vec<GraphPlan>,
    nodes: usize,
    riders: Vec<Rider>,
}

#[derive(Default)]
struct State {
    boarding: Option<Train>,
    /// When each partition last left on a train: those within [`EXPECT_WITHIN`] are waited for.
    recent: HashMap<i32, Instant>,
    /// Partitions whose batch is on a train that has not come back: not waited for.
    in_flight: HashMap<i32, usize>,
    next_id: u64,
}

/// A partition that rode this recently is expected on the next train.
const EXPECT_WITHIN: Duration = Duration::from_secs(1);

impl State {
    fn departs(&mut self, train: &Train, now: Instant) {
        for p in &train.partitions {
            self.recent.insert(*p, now);
            *self.in_flight.entry(*p).or_default() += 1;
        }
        self.recent.retain(|_, t| now.duration_since(*t) <= EXPECT_WITHIN);
    }

    /// Every partition expected has boarded `train`.
    fn complete(&self, train: &Train, now: Instant) -> bool {
        self.recent.iter().all(|(p, t)| {
            now.duration_since(*t) > EXPECT_WITHIN
                || train.partitions.contains(p)
                || self.in_flight.get(p).is_some_and(|n| *n > 0)
        })
    }
}

/// Marks a departed train's partitions back (also when the departing batch is cancelled).
struct Landing<'a> {
    pool: &'a Pool,
    partitions: BTreeSet<i32>,
}

impl Drop for Landing<'_> {
    fn drop(&mut self) {
        let mut state = self.pool.state.lock().expect("pool lock");
        for p in &self.partitions {
            if let Some(n) = state.in_flight.get_mut(p) {
                *n = n.saturating_sub(1);
            }
        }
    }
}

/// The shared departures (see the module docs).
pub(super) struct Pool {
    state: Mutex<State>,
    linger: Duration,
    /// The service's stop signal: a graph waiting for company leaves at once when it fires.
    pub(super) stop: CancellationToken,
}

impl Pool {
    /// `linger`: the longest a graph waits for company (zero: every batch sends its own).
    pub(super) fn new(linger: Duration) -> Self {
        Self { state: Mutex::default(), linger, stop: CancellationToken::new() }
    }

    /// Boards `graphs` of `partition`: as many as fit the boarding train (500 nodes, 75
    /// graphs); when more are left, that train is full and leaves, and the rest board the
    /// next one (a backlog's chunks are most of a request each: sending a train as it is
    /// when a chunk does not fit would leave it a third empty). Returns the seats (the last
    /// one on the train still boarding) and the full trains this boarding sends off.
    fn board(&self, partition: i32, graphs: Vec<GraphPlan>) -> (Vec<Seat>, Vec<Train>) {
        let mut state = self.state.lock().expect("pool lock");
        let now = Instant::now();
        let (mut seats, mut full) = (Vec::new(), Vec::new());
        let mut graphs = graphs.into_iter().peekable();
        while graphs.peek().is_some() {
            if state.boarding.is_none() {
                let id = state.next_id;
                state.next_id += 1;
                state.boarding = Some(Train {
                    id,
                    due: now + self.linger,
                    partitions: BTreeSet::new(),
                    graphs: Vec::new(),
                    nodes: 0,
                    riders: Vec::new(),
                });
            }
            let mut train = state.boarding.take().expect("a train is boarding");
            let first = train.graphs.len();
            while let Some(g) = graphs.peek() {
                let fits = train.nodes + g.nodes() <= MAX_NODES && train.graphs.len() < MAX_GRAPHS;
                // An empty train takes any graph (the builder keeps graphs within 500 nodes).
                if !fits && !train.graphs.is_empty() {
                    break;
                }
                let mut g = graphs.next().expect("peeked");
                train.nodes += g.nodes();
                g.rename(format!("g{}", train.graphs.len()));
                train.graphs.push(g);
            }
            if train.graphs.len() > first {
                let (reply, rx) = oneshot::channel();
                train.partitions.insert(partition);
                train.riders.push(Rider { graphs: first..train.graphs.len(), reply });
                seats.push(Seat { id: train.id, due: train.due, ready: false, rx });
            }
            if graphs.peek().is_some() {
                state.departs(&train, now);
                full.push(train);
            } else {
                let ready = train.nodes >= MAX_NODES || state.complete(&train, now);
                if let Some(seat) = seats.last_mut().filter(|s| s.id == train.id) {
                    seat.ready = ready;
                }
                state.boarding = Some(train);
            }
        }
        (seats, full)
    }

    /// Takes train `id` if it is still boarding.
    fn take(&self, id: u64) -> Option<Train> {
        let mut state = self.state.lock().expect("pool lock");
        if state.boarding.as_ref().is_some_and(|t| t.id == id) {
            let train = state.boarding.take()?;
            state.departs(&train, Instant::now());
            return Some(train);
        }
        None
    }
}

impl Sink {
    /// Sends `graphs` with whatever other batches send meanwhile; their records' verdicts.
    pub(super) async fn ride(&self, partition: i32, graphs: Vec<GraphPlan>) -> Verdicts {
        if graphs.is_empty() {
            return Vec::new();
        }
        if self.pool.linger.is_zero() {
            let mut out = Vec::new();
            for request in graph::pack(graphs) {
                out.extend(self.send(&request).await);
            }
            return out;
        }
        let records: Vec<usize> = graphs.iter().flat_map(|g| g.records.iter().copied()).collect();
        let (seats, full) = self.pool.board(partition, graphs);
        let leave_full = futures::future::join_all(full.into_iter().map(|train| self.depart(train)));
        let riding = futures::future::join_all(seats.into_iter().map(|seat| async move {
            let Seat { id, due, ready, mut rx } = seat;
            if !ready {
                tokio::select! {
                    result = &mut rx => return result.ok(),
                    _ = tokio::time::sleep_until(due) => {}
                    // Stopping: nobody else is coming, and the drain should not wait.
                    _ = self.pool.stop.cancelled() => {}
                }
            }
            if let Some(train) = self.pool.take(id) {
                self.depart(train).await;
            }
            rx.await.ok()
        }));
        let (_, seats) = tokio::join!(leave_full, riding);
        let mut out = Vec::with_capacity(records.len());
        for verdicts in seats {
            match verdicts {
                Some(verdicts) => out.extend(verdicts),
                None => {
                    // Lost with its train: this batch's records are failed transiently (the
                    // runtime retries them; verdicts already given stand).
                    let error =
                        HandlerError::transient("graph_pool", "the request carrying these records was abandoned");
                    let given: BTreeSet<usize> = out.iter().map(|(i, _)| *i).collect();
                    out.extend(
                        records.iter().filter(|i| !given.contains(i)).map(|i| (*i, Verdict::failed(error.clone()))),
                    );
                    return out;
                }
            }
        }
        out
    }

    /// Sends a train (one request unless its riders took it past the limits) and hands each
    /// rider its verdicts.
    async fn depart(&self, train: Train) {
        let _landing = Landing { pool: &self.pool, partitions: train.partitions.clone() };
        let requests = graph::pack(train.graphs);
        let sent = futures::future::join_all(requests.iter().map(|r| self.send_graphs(r))).await;
        let mut by_graph: HashMap<String, Verdicts> = HashMap::new();
        for (request, results) in requests.iter().zip(sent) {
            for (g, verdicts) in request.iter().zip(results) {
                by_graph.insert(g.graph_id.clone(), verdicts);
            }
        }
        for rider in train.riders {
            let verdicts = rider.graphs.flat_map(|n| by_graph.remove(&format!("g{n}")).unwrap_or_default()).collect();
            let _ = rider.reply.send(verdicts);
        }
    }
}
