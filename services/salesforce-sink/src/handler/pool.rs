//! Composite Graph requests shared by the partitions' batches (adaptive batching).
//!
//! Each partition hands its batches over one at a time, so on a busy stream every partition's
//! batch is small and one request per batch would spend a call on a few orders. Instead the
//! graphs of the batches in flight board one "train" that departs as one request when its
//! nodes reach Salesforce's 500, or when the linger (`ELO_SALESFORCE_GRAPH_LINGER`) since the
//! previous departure has passed. After a quiet spell the first graph leaves at once (a lone
//! order pays no linger); a busy stream leaves at most once per linger, in full requests.
//!
//! Any rider of a train departs it when it is due (not only the first), so a batch cancelled
//! while waiting cannot strand the others; a rider whose train was lost (its departing batch
//! cancelled mid-call) gets a transient failure and the runtime retries its records.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Mutex;
use std::time::Duration;

use elo_kafka::HandlerError;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::{Sink, Verdict};
use crate::graph::{self, GraphPlan, MAX_NODES};

type Verdicts = Vec<(usize, Verdict)>;

struct Rider {
    graphs: Range<usize>,
    reply: oneshot::Sender<Verdicts>,
}

struct Train {
    id: u64,
    due: Instant,
    graphs: Vec<GraphPlan>,
    nodes: usize,
    riders: Vec<Rider>,
}

#[derive(Default)]
struct State {
    boarding: Option<Train>,
    last_departure: Option<Instant>,
    next_id: u64,
}

/// The shared departures (see the module docs).
pub(super) struct Pool {
    state: Mutex<State>,
    linger: Duration,
}

impl Pool {
    /// `linger`: the longest a graph waits for company (zero: every batch sends its own).
    pub(super) fn new(linger: Duration) -> Self {
        Self { state: Mutex::default(), linger }
    }

    /// Boards `graphs`; returns the train's id and due time, and a train that had to leave
    /// first because these graphs would have taken it past 500 nodes.
    fn board(&self, graphs: Vec<GraphPlan>, reply: oneshot::Sender<Verdicts>) -> (u64, Instant, Option<Train>) {
        let nodes: usize = graphs.iter().map(GraphPlan::nodes).sum();
        let mut state = self.state.lock().expect("pool lock");
        let now = Instant::now();
        let mut full = None;
        if state.boarding.as_ref().is_some_and(|t| t.nodes > 0 && t.nodes + nodes > MAX_NODES) {
            full = state.boarding.take();
            state.last_departure = Some(now);
        }
        if state.boarding.is_none() {
            // Quiet (nothing left within the linger): at once; busy: one linger after the last.
            let due = match state.last_departure {
                Some(last) if now < last + self.linger => last + self.linger,
                _ => now,
            };
            let id = state.next_id;
            state.next_id += 1;
            state.boarding = Some(Train { id, due, graphs: Vec::new(), nodes: 0, riders: Vec::new() });
        }
        let train = state.boarding.as_mut().expect("a train is boarding");
        let first = train.graphs.len();
        for mut g in graphs {
            g.rename(format!("g{}", train.graphs.len()));
            train.graphs.push(g);
        }
        train.nodes += nodes;
        train.riders.push(Rider { graphs: first..train.graphs.len(), reply });
        (train.id, train.due, full)
    }

    /// Takes train `id` if it is still boarding.
    fn take(&self, id: u64) -> Option<Train> {
        let mut state = self.state.lock().expect("pool lock");
        if state.boarding.as_ref().is_some_and(|t| t.id == id) {
            state.last_departure = Some(Instant::now());
            return state.boarding.take();
        }
        None
    }
}

impl Sink {
    /// Sends `graphs` with whatever other batches send meanwhile; their records' verdicts.
    pub(super) async fn ride(&self, graphs: Vec<GraphPlan>) -> Verdicts {
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
        let (reply, mut rx) = oneshot::channel();
        let (id, due, full) = self.pool.board(graphs, reply);
        let leave_full = async {
            if let Some(train) = full {
                self.depart(train).await;
            }
        };
        let own = async {
            let full = self
                .pool
                .state
                .lock()
                .expect("pool lock")
                .boarding
                .as_ref()
                .is_some_and(|t| t.id == id && t.nodes >= MAX_NODES);
            if !full {
                tokio::select! {
                    result = &mut rx => return result.ok(),
                    _ = tokio::time::sleep_until(due) => {}
                }
            }
            if let Some(train) = self.pool.take(id) {
                self.depart(train).await;
            }
            rx.await.ok()
        };
        let ((), verdicts) = tokio::join!(leave_full, own);
        verdicts.unwrap_or_else(|| {
            let error = HandlerError::transient("graph_pool", "the request carrying these records was abandoned");
            records.into_iter().map(|i| (i, Verdict::failed(error.clone()))).collect()
        })
    }

    /// Sends a train (one request unless its riders took it past the limits) and hands each
    /// rider its verdicts.
    async fn depart(&self, train: Train) {
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
