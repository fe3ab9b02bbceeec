//! Sweep cursors kept in the ledger, one entry per partition (`cursor:<name>`, the value in
//! `seen_at_ms`): a restart or a failover resumes where the partition's last sweep stopped,
//! rather than a fixed time back (missing what changed while no replica swept) or from
//! scratch. A replica reads the earliest cursor of the partitions it holds (findings are
//! idempotent, so reading a stretch twice is harmless; a held partition without a cursor yet
//! counts as the first pass's default, one interval back) and moves only those it still holds.

use crate::ledger::{self, Entry};
use crate::store::{CommandSink, Ledger};

/// The `kind` of a cursor entry.
pub const CURSOR: &str = "cursor";

/// The Salesforce `LastModifiedDate` pass's cursor (Unix ms).
pub const SALESFORCE_MODIFIED: &str = "salesforce-modified";

/// The same for Salesforce Accounts.
pub const SALESFORCE_ACCOUNTS_MODIFIED: &str = "salesforce-accounts-modified";

/// The ledger key of cursor `name`.
pub fn cursor_key(name: &str) -> String {
    ledger::key(CURSOR, name)
}

/// The earliest cursor of the held partitions' entries (`None`: the partition has none yet,
/// and counts as `first`, where a first pass starts).
pub fn earliest(entries: impl IntoIterator<Item = Option<Entry>>, first: i64) -> i64 {
    entries.into_iter().map(|e| e.filter(|e| e.kind == CURSOR).map_or(first, |e| e.seen_at_ms)).min().unwrap_or(first)
}

/// Cursor `name` of the partitions held here (see [`earliest`]).
pub fn get<C: CommandSink>(ledger: &Ledger<C>, name: &str, first: i64) -> i64 {
    let key = cursor_key(name);
    earliest(ledger.partitions().into_iter().map(|p| ledger.store.get(p, &key)), first)
}

/// Moves cursor `name` to `value` on those of `partitions` still held (the store refuses a
/// partition released meanwhile). Returns the first failure, after trying every partition.
pub async fn set<C: CommandSink>(
    ledger: &Ledger<C>,
    partitions: &[i32],
    name: &str,
    value: i64,
) -> Result<(), elo_kafka::Error> {
    let key = cursor_key(name);
    let mut result = Ok(());
    for &partition in partitions {
        let lock = ledger.lock(partition);
        let _guard = lock.lock().await;
        if !ledger.partitions().contains(&partition) {
            continue; // released: the new owner moves it
        }
        let entry =
            Entry { kind: CURSOR.to_owned(), entity_id: name.to_owned(), seen_at_ms: value, ..Entry::default() };
        if let Err(error) = ledger.store.put(partition, &key, entry).await
            && result.is_ok()
        {
            result = Err(error);
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_earliest_cursor_of_the_held_partitions_is_read() {
        let at = |ms: i64| Some(Entry { kind: CURSOR.into(), seen_at_ms: ms, ..Entry::default() });
        assert_eq!(earliest([at(300), at(200)], 250), 200);
        assert_eq!(earliest([at(300), None, at(200)], 100), 100, "a partition never swept: one interval back");
        assert_eq!(earliest([None, None], 100), 100, "no partition swept yet");
        let order = Some(Entry { kind: "order".into(), seen_at_ms: 5, ..Entry::default() });
        assert_eq!(earliest([order, at(9)], 50), 9, "only cursor entries");
        assert!(Entry { kind: CURSOR.into(), ..Entry::default() }.is_mark(), "no command or figure for it");
    }
}
