//! Builds Composite Graph requests from a batch: one graph per customer key (the account,
//! its contact, then each order and its items, by reference), so one account's records are
//! written by one transaction and never race for its lock (`UNABLE_TO_LOCK_ROW`); graphs are
//! packed into requests of at most 500 nodes and 75 graphs (Salesforce's limits), so a busy
//! stream costs about one call per 500 nodes and a lone order goes out in one call.
//!
//! Orders follow the lifecycle Salesforce allows: every write puts the order in `Draft`
//! (inserted as Draft; an activated order goes back to Draft, which unlocks its items), the
//! items are upserted, and orders whose Magento status activates them are activated again in
//! the same graph.

use std::collections::BTreeMap;

use elo_events::{CommerceEvent, Customer, Order, OrderItem};
use serde_json::{Map, Value, json};

use crate::mapping::{AccountMode, Context, Resolved, Source};

/// Salesforce's Composite Graph limits.
pub const MAX_NODES: usize = 500;
pub const MAX_GRAPHS: usize = 75;

/// Org ids the builder needs (found or created at startup).
#[derive(Clone, Debug, Default)]
pub struct OrgIds {
    pub standard_pricebook: String,
    /// Magento store id → Pricebook2 id.
    pub pricebooks: BTreeMap<i32, String>,
    /// The person account record type (Person mode only).
    pub person_record_type: Option<String>,
}

/// Who a graph node belongs to, to blame the right record when it fails.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Owner {
    /// The account/contact nodes: these records of the graph (that customer's) depend on them.
    Customer(Vec<usize>),
    /// A node of the record at this batch index.
    Record(usize),
}

/// One graph of a request.
#[derive(Clone, Debug)]
pub struct GraphPlan {
    pub graph_id: String,
    /// referenceId → owner.
    pub owners: BTreeMap<String, Owner>,
    /// Batch indices applied by this graph.
    pub records: Vec<usize>,
    /// Record → the reference suffix of its customer's nodes (`a<n>`, `c<n>`): a graph may
    /// hold several customers (see [`Builder::graphs`]).
    pub customers: BTreeMap<usize, String>,
    pub body: Value,
}

impl GraphPlan {
    /// Nodes in this graph.
    pub fn nodes(&self) -> usize {
        self.body["compositeRequest"].as_array().map_or(0, Vec::len)
    }

    /// Renames the graph (graph ids must be unique within a request).
    pub fn rename(&mut self, id: String) {
        self.body["graphId"] = Value::String(id.clone());
        self.graph_id = id;
    }
}

/// A record to write, after staleness checks.
#[derive(Clone, Copy)]
pub struct Work<'a> {
    pub index: usize,
    pub event: &'a CommerceEvent,
    /// Whether its customer data may be written (not older than what Salesforce has).
    pub write_customer: bool,
    /// The digest of the customer data Salesforce holds for its key, when the sink confirmed
    /// it (and its Account): customer nodes with the same digest are left out.
    pub held_digest: Option<u64>,
}

/// `work` cut into slices of about `records` records, never splitting one customer key
/// across slices (its graph picks the newest customer data among its records, and a later
/// slice must not write older customer data over it). Slices bound what is built at once.
pub fn slices<'a>(work: &[Work<'a>], records: usize) -> Vec<Vec<Work<'a>>> {
    let mut groups: Vec<Vec<Work<'a>>> = Vec::new();
    let mut by_key: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for w in work {
        let at = *by_key.entry(w.event.customer_key.as_str()).or_insert_with(|| {
            groups.push(Vec::new());
            groups.len() - 1
        });
        groups[at].push(*w);
    }
    let mut out: Vec<Vec<Work<'a>>> = Vec::new();
    for group in groups {
        match out.last_mut() {
            Some(last) if last.len() + group.len() <= records.max(1) => last.extend(group),
            _ => out.push(group),
        }
    }
    out
}

/// When the event's customer data was true: an order carries the customer as at placement
/// (a later status change does not make its names newer), a customer event as of its update.
pub fn customer_version(e: &CommerceEvent) -> i64 {
    e.order.as_ref().map_or(e.source_version.updated_at, |o| o.created_at)
}

/// Percent-encodes one path segment (external ids carry `:`).
pub fn segment(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// External ids of the objects Elo writes.
pub fn order_key(order: &Order) -> String {
    format!("o:{}", order.entity_id)
}
pub fn item_key(item: &OrderItem) -> String {
    format!("oi:{}", item.item_id)
}
pub fn entry_key(store: Option<i32>, sku: &str) -> String {
    match store {
        Some(store) => format!("pbe:s{store}:{sku}"),
        None => format!("pbe:std:{sku}"),
    }
}

/// The lines Salesforce sells: top-level lines and bundle children (a configurable's child
/// repeats its parent's SKU and carries no price, so it is not sold twice).
pub fn sellable(order: &Order) -> Vec<&OrderItem> {
    let kind = |id: i64| order.items.iter().find(|i| i.item_id == id).map(|i| i.product_type.as_str());
    order.items.iter().filter(|i| i.parent_item_id.is_none_or(|p| kind(p) == Some("bundle"))).collect()
}

fn fields(table: &BTreeMap<String, Source>, ctx: &Context<'_>) -> Map<String, Value> {
    table.iter().filter_map(|(field, source)| source.value(ctx).map(|v| (field.clone(), v))).collect()
}

fn node(method: &str, url: String, reference: &str, body: Map<String, Value>) -> Value {
    json!({"method": method, "url": url, "referenceId": reference, "body": Value::Object(body)})
}

/// Builds the graphs for one batch.
pub struct Builder<'a> {
    pub mapping: &'a Resolved,
    pub org: &'a OrgIds,
    pub version: &'a str,
}

impl Builder<'_> {
    fn url(&self, rest: &str) -> String {
        format!("/services/data/{}{rest}", self.version)
    }

    /// A digest of the customer data `event` would write (its Account and Contact nodes).
    /// Kept in the changelog, so the same in every build: FNV-1a (64 bits) of the nodes'
    /// JSON, not std's `DefaultHasher` (whose algorithm may change between Rust releases).
    pub fn customer_digest(&self, event: &CommerceEvent) -> u64 {
        let Some(customer) = &event.customer else { return 0 };
        let nodes = Value::Array(self.customer_nodes(&event.customer_key, "", event, customer));
        let digest = nodes
            .to_string()
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3));
        digest.max(1)
    }

    /// Account (and Contact) nodes for a customer, referenced `a<tag>` and `c<tag>`.
    fn customer_nodes(&self, key: &str, tag: &str, event: &CommerceEvent, customer: &Customer) -> Vec<Value> {
        let m = self.mapping;
        let ctx = Context { event, customer: Some(customer), order: None, item: None };
        let mut account = fields(&m.account, &ctx);
        if m.mode == AccountMode::Person
            && let Some(rt) = &self.org.person_record_type
        {
            account.insert("RecordTypeId".into(), json!(rt));
        }
        let mut nodes = vec![node(
            "PATCH",
            self.url(&format!("/sobjects/Account/{}/{}", m.ids.account, segment(key))),
            &format!("a{tag}"),
            account,
        )];
        if m.mode == AccountMode::Business {
            let mut contact = fields(&m.contact, &ctx);
            contact.insert("Account".into(), json!({ m.ids.account.clone(): key }));
            nodes.push(node(
                "PATCH",
                self.url(&format!("/sobjects/Contact/{}/{}", m.ids.contact, segment(key))),
                &format!("c{tag}"),
                contact,
            ));
        }
        nodes
    }

    /// Nodes of one order version (owner: its record).
    fn order_nodes(&self, index: usize, event: &CommerceEvent, order: &Order) -> Vec<Value> {
        let m = self.mapping;
        let ctx = Context { event, customer: event.customer.as_ref(), order: Some(order), item: None };
        let okey = order_key(order);
        let oref = format!("o{index}");
        let mut header = fields(&m.order, &ctx);
        header.insert("Account".into(), json!({ m.ids.account.clone(): event.customer_key }));
        header.insert("Status".into(), json!("Draft"));
        if let Some(book) = self.org.pricebooks.get(&event.store.store_id) {
            header.insert("Pricebook2Id".into(), json!(book));
        }
        let mut nodes = vec![node(
            "PATCH",
            self.url(&format!("/sobjects/Order/{}/{}", m.ids.order, segment(&okey))),
            &oref,
            header,
        )];
        for (n, item) in sellable(order).into_iter().enumerate() {
            let ctx = Context { item: Some(item), ..ctx };
            let mut line = fields(&m.order_item, &ctx);
            line.insert("Order".into(), json!({ m.ids.order.clone(): okey }));
            line.insert(
                "PricebookEntry".into(),
                json!({ m.ids.pricebook_entry.clone(): entry_key(Some(event.store.store_id), &item.sku) }),
            );
            let url = self.url(&format!("/sobjects/OrderItem/{}/{}", m.ids.order_item, segment(&item_key(item))));
            nodes.push(node("PATCH", url, &format!("i{index}_{n}"), line));
        }
        if m.activate_on.contains(&order.status) && !order.items.is_empty() {
            let mut status = Map::new();
            status.insert("Status".into(), json!("Activated"));
            nodes.push(node(
                "PATCH",
                self.url(&format!("/sobjects/Order/@{{{oref}.id}}")),
                &format!("x{index}"),
                status,
            ));
        }
        nodes
    }

    /// Graphs for `work` (one customer key per graph, split when a key needs more than 500
    /// nodes, or one record per graph when `per_record`: the retry of a graph that failed
    /// transiently, so one unlucky write no longer rolls back a customer's whole history),
    /// packed into requests within the limits.
    pub fn build(&self, work: &[Work<'_>], per_record: bool) -> Vec<Vec<GraphPlan>> {
        pack(self.graphs(work, per_record, 0))
    }

    /// The graphs for `work`: one per customer key (split past 500 nodes; one per record when
    /// `per_record`). With `merge_nodes` > 0, consecutive customers share a graph while it
    /// stays within that many nodes: a busy stream of small orders is then not held to 75
    /// customers per request by Salesforce's graph limit, at the price of a failure rolling
    /// back the few customers sharing the graph (they are resent at once, one record per graph).
    pub fn graphs(&self, work: &[Work<'_>], per_record: bool, merge_nodes: usize) -> Vec<GraphPlan> {
        let mut groups: Vec<(&str, Vec<&Work<'_>>)> = Vec::new();
        let mut by_key: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
        for w in work {
            let at = *by_key.entry(w.event.customer_key.as_str()).or_insert_with(|| {
                groups.push((&w.event.customer_key, Vec::new()));
                groups.len() - 1
            });
            groups[at].1.push(w);
        }
        let mut parts: Vec<Part> = Vec::new();
        for (key, members) in groups {
            let tag = members.first().map_or(0, |w| w.index).to_string();
            // The newest customer data in the group that may be written.
            let customer = members
                .iter()
                .filter(|w| w.write_customer)
                .filter_map(|w| w.event.customer.as_ref().map(|c| (w.event, c)))
                .max_by_key(|(e, _)| (customer_version(e), crate::handler::enrichment_rank(e)));
            // Salesforce already holds exactly this customer data: only the orders are written.
            let held = members.iter().find_map(|w| w.held_digest);
            let left_out = customer.is_some_and(|(e, _)| held.is_some_and(|d| d == self.customer_digest(e)));
            let head =
                customer.filter(|_| !left_out).map(|(e, c)| self.customer_nodes(key, &tag, e, c)).unwrap_or_default();
            if customer.is_some() {
                let result = if left_out { "left_out" } else { "written" };
                crate::metrics::CUSTOMER_HEADS.with_label_values(&[result]).inc();
            }
            let mut current = Part::new(head.clone());
            for w in &members {
                let mine = match &w.event.order {
                    Some(order) => self.order_nodes(w.index, w.event, order),
                    None => Vec::new(),
                };
                if (per_record || current.nodes.len() + mine.len() > MAX_NODES) && !current.records.is_empty() {
                    parts.push(std::mem::replace(&mut current, Part::new(head.clone())).customer(&tag));
                }
                for n in &mine {
                    current
                        .owners
                        .insert(n["referenceId"].as_str().unwrap_or_default().to_owned(), Owner::Record(w.index));
                }
                current.records.push(w.index);
                current.nodes.extend(mine);
            }
            parts.push(current.customer(&tag));
        }
        let mut graphs: Vec<GraphPlan> = Vec::new();
        let mut merged: Option<Part> = None;
        for part in parts {
            merged = match merged {
                Some(mut m)
                    if !per_record && !part.nodes.is_empty() && m.nodes.len() + part.nodes.len() <= merge_nodes =>
                {
                    m.absorb(part);
                    Some(m)
                }
                Some(m) => {
                    graphs.push(m.finish(graphs.len()));
                    Some(part)
                }
                None => Some(part),
            };
        }
        if let Some(m) = merged {
            graphs.push(m.finish(graphs.len()));
        }
        graphs
    }
}

/// A graph being built: its nodes, their owners, its records and their customers' tags.
struct Part {
    owners: BTreeMap<String, Owner>,
    records: Vec<usize>,
    customers: BTreeMap<usize, String>,
    nodes: Vec<Value>,
}

impl Part {
    fn new(head: Vec<Value>) -> Self {
        Self { owners: BTreeMap::new(), records: Vec::new(), customers: BTreeMap::new(), nodes: head }
    }

    /// Owns the nodes not owned by a record (the customer's) for this part's records.
    fn customer(mut self, tag: &str) -> Self {
        for n in &self.nodes {
            let reference = n["referenceId"].as_str().unwrap_or_default().to_owned();
            self.owners.entry(reference).or_insert_with(|| Owner::Customer(self.records.clone()));
        }
        for r in &self.records {
            self.customers.insert(*r, tag.to_owned());
        }
        self
    }

    fn absorb(&mut self, other: Part) {
        self.owners.extend(other.owners);
        self.records.extend(other.records);
        self.customers.extend(other.customers);
        self.nodes.extend(other.nodes);
    }

    fn finish(self, n: usize) -> GraphPlan {
        let graph_id = format!("g{n}");
        let body = json!({"graphId": graph_id, "compositeRequest": self.nodes});
        GraphPlan { graph_id, owners: self.owners, records: self.records, customers: self.customers, body }
    }
}

/// Packs graphs into requests within Salesforce's limits (500 nodes, 75 graphs); a graph
/// with nothing to write (e.g. an erasure) goes alone and costs no call.
pub fn pack(graphs: Vec<GraphPlan>) -> Vec<Vec<GraphPlan>> {
    let mut requests: Vec<Vec<GraphPlan>> = Vec::new();
    let mut size = 0;
    for graph in graphs {
        let n = graph.nodes();
        if n == 0 {
            requests.push(vec![graph]);
            continue;
        }
        match requests.last_mut() {
            Some(last) if size + n <= MAX_NODES && last.len() < MAX_GRAPHS && !is_empty(last) => {
                last.push(graph);
                size += n;
            }
            _ => {
                requests.push(vec![graph]);
                size = n;
            }
        }
    }
    requests
}

fn is_empty(request: &[GraphPlan]) -> bool {
    request.iter().all(|g| g.body["compositeRequest"].as_array().is_none_or(Vec::is_empty))
}

/// The request body for a set of graphs.
pub fn request_body(graphs: &[GraphPlan]) -> Value {
    json!({"graphs": graphs.iter().map(|g| g.body.clone()).collect::<Vec<_>>()})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::Mapping;

    fn org() -> OrgIds {
        OrgIds { standard_pricebook: "01s1".into(), pricebooks: [(1, "01s2".into())].into(), person_record_type: None }
    }

    fn event(n: u64, key: &str, status: &str) -> CommerceEvent {
        let mut e = elo_events::sample::order_placed(n);
        e.customer_key = key.into();
        e.store.store_id = 1;
        if let Some(o) = e.order.as_mut() {
            o.status = status.into();
        }
        e
    }

    /// The digest is kept in the changelog, so it must come out the same from every build:
    /// std's `DefaultHasher` is not promised to stay the same between Rust releases.
    #[test]
    fn the_customer_digest_is_the_same_in_every_build() {
        let mapping = Mapping::default().resolve().unwrap();
        let org = org();
        let b = Builder { mapping: &mapping, org: &org, version: "v66.0" };
        assert_eq!(b.customer_digest(&event(1, "c:1", "pending")), 2_596_269_640_960_887_441);
    }

    #[test]
    fn one_graph_per_customer_with_parents_first() {
        let mapping = Mapping::default().resolve().unwrap();
        let org = org();
        let b = Builder { mapping: &mapping, org: &org, version: "v66.0" };
        let events = [event(1, "c:1", "pending"), event(2, "c:2", "processing"), event(3, "c:1", "pending")];
        let work: Vec<Work<'_>> = events
            .iter()
            .enumerate()
            .map(|(i, e)| Work { index: i, event: e, write_customer: true, held_digest: None })
            .collect();
        let requests = b.build(&work, false);
        assert_eq!(requests.len(), 1, "three small orders fit one call");
        let graphs = &requests[0];
        assert_eq!(graphs.len(), 2);
        assert_eq!(graphs[0].records, vec![0, 2]);
        let refs: Vec<&str> = graphs[0].body["compositeRequest"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["referenceId"].as_str().unwrap())
            .collect();
        assert_eq!(&refs[..3], &["a0", "c0", "o0"], "account, contact, then the order");
        assert_eq!(graphs[0].owners["a0"], Owner::Customer(vec![0, 2]));
        assert_eq!(graphs[0].owners["o2"], Owner::Record(2));
        // Processing activates, after the items.
        let last = graphs[1].body["compositeRequest"].as_array().unwrap().last().unwrap().clone();
        assert_eq!(last["referenceId"], "x1");
        assert_eq!(last["url"], "/services/data/v66.0/sobjects/Order/@{o1.id}");
    }

    #[test]
    fn requests_stay_within_500_nodes_and_75_graphs() {
        let mapping = Mapping::default().resolve().unwrap();
        let org = org();
        let b = Builder { mapping: &mapping, org: &org, version: "v66.0" };
        let events: Vec<CommerceEvent> = (0..400).map(|n| event(n, &format!("c:{n}"), "pending")).collect();
        let work: Vec<Work<'_>> = events
            .iter()
            .enumerate()
            .map(|(i, e)| Work { index: i, event: e, write_customer: true, held_digest: None })
            .collect();
        let requests = b.build(&work, false);
        for r in &requests {
            let nodes: usize = r.iter().map(|g| g.body["compositeRequest"].as_array().unwrap().len()).sum();
            assert!(nodes <= MAX_NODES && r.len() <= MAX_GRAPHS, "{nodes} nodes, {} graphs", r.len());
        }
        let applied: usize = requests.iter().flatten().map(|g| g.records.len()).sum();
        assert_eq!(applied, 400);
        assert!(requests.len() <= 400 / 75 + 1, "{} calls", requests.len());
    }

    #[test]
    fn external_ids_are_encoded() {
        assert_eq!(segment("c:42"), "c%3A42");
        assert_eq!(segment("g:ab_c"), "g%3Aab_c");
    }
}
