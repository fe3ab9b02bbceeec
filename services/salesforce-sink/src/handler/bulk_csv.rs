//! The Bulk API 2.0 CSV side of `bulk.rs`: rows spooled to a temporary file per job, the
//! upload made from the spool as it is sent, and results CSVs read as they arrive.
//!
//! A chunk's rows are staged in memory, then written to the job files at once: a write that
//! fails (disk full) is cut back off the files and only that chunk's records fail. Each upload
//! reads the file with its own position (`read_at`), so a re-sent upload is whole.

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use elo_kafka::HandlerError;
use serde_json::Value;

/// What is kept in memory of a row spooled for a job.
#[derive(Debug)]
pub(super) struct RowInfo {
    /// The spool line that is uploaded (of several for one external id: the newest data).
    pub(super) line: u32,
    /// When the row's data was true (customer rows: the customer version and enrichment
    /// rank), to pick the line.
    pub(super) rank: (i64, u8),
    /// Batch indices of the records it belongs to.
    pub(super) owners: Vec<u32>,
}

/// A row staged for the spool: external id, owners, rank (its line is in the staged bytes).
type StagedRow = (Box<str>, Vec<u32>, (i64, u8));

/// One job's rows: an object upserted by an external-id field, rows spooled to a file as
/// JSON lines `[ext, [[column, cell], ...]]`.
pub(super) struct Spool {
    pub(super) object: String,
    pub(super) ext_field: String,
    pub(super) file: Option<Arc<std::fs::File>>,
    /// Bytes of the file holding whole rows.
    pub(super) len: u64,
    pub(super) columns: Vec<String>,
    pub(super) column_at: HashMap<String, usize>,
    pub(super) rows: HashMap<Box<str>, RowInfo>,
    pub(super) lines: u32,
    /// The chunk being spooled: its lines and rows, not yet in the file.
    staged: Vec<u8>,
    staged_rows: Vec<StagedRow>,
    /// Tests: writes past this many bytes fail as on a full disk (after writing up to it).
    #[cfg(test)]
    pub(super) full_at: Option<u64>,
}

impl Spool {
    pub(super) fn new() -> Self {
        Self {
            object: String::new(),
            ext_field: String::new(),
            file: None,
            len: 0,
            columns: Vec::new(),
            column_at: HashMap::new(),
            rows: HashMap::new(),
            lines: 0,
            staged: Vec::new(),
            staged_rows: Vec::new(),
            #[cfg(test)]
            full_at: None,
        }
    }

    pub(super) fn column(&mut self, name: &str) -> usize {
        if let Some(at) = self.column_at.get(name) {
            return *at;
        }
        self.columns.push(name.to_owned());
        self.column_at.insert(name.to_owned(), self.columns.len() - 1);
        self.columns.len() - 1
    }

    /// Stages one row of the chunk being spooled; the same external id again (an account in
    /// two chunks) is one row, sent with the newest data.
    pub(super) fn add(&mut self, ext: String, cells: Vec<(usize, String)>, owners: &BTreeSet<usize>, rank: (i64, u8)) {
        serde_json::to_writer(&mut self.staged, &(&ext, &cells)).expect("rows serialize");
        self.staged.push(b'\n');
        self.staged_rows.push((ext.into_boxed_str(), owners.iter().map(|i| *i as u32).collect(), rank));
    }

    /// Bytes staged.
    pub(super) fn staged_bytes(&self) -> usize {
        self.staged.len()
    }

    /// Writes the staged rows after the file's whole rows (in `dir`); on failure the file is
    /// cut back to its whole rows, and the staged rows stay staged (see [`Spool::commit`],
    /// [`Spool::discard`]).
    pub(super) fn write_staged(&mut self, dir: Option<&Path>) -> std::io::Result<()> {
        if self.staged.is_empty() {
            return Ok(());
        }
        let file = match &self.file {
            Some(f) => f.clone(),
            None => {
                let f = match dir {
                    Some(dir) => tempfile::tempfile_in(dir)?,
                    None => tempfile::tempfile()?,
                };
                self.file.insert(Arc::new(f)).clone()
            }
        };
        let result = self.write_at(&file);
        if result.is_err() {
            let _ = file.set_len(self.len);
        }
        result
    }

    #[cfg(not(test))]
    fn write_at(&self, file: &std::fs::File) -> std::io::Result<()> {
        file.write_all_at(&self.staged, self.len)
    }

    #[cfg(test)]
    fn write_at(&self, file: &std::fs::File) -> std::io::Result<()> {
        let room = self.full_at.map_or(usize::MAX, |at| at.saturating_sub(self.len) as usize);
        file.write_all_at(&self.staged[..self.staged.len().min(room)], self.len)?;
        if room < self.staged.len() {
            return Err(std::io::Error::new(std::io::ErrorKind::StorageFull, "no space left on device"));
        }
        Ok(())
    }

    /// The staged rows, written, become the job's.
    pub(super) fn commit(&mut self) {
        self.len += self.staged.len() as u64;
        self.staged = Vec::new();
        for (ext, owners, rank) in std::mem::take(&mut self.staged_rows) {
            let line = self.lines;
            self.lines += 1;
            match self.rows.get_mut(&ext) {
                Some(row) => {
                    if rank >= row.rank {
                        (row.line, row.rank) = (line, rank);
                    }
                    row.owners.extend(owners);
                    row.owners.sort_unstable();
                    row.owners.dedup();
                }
                None => {
                    self.rows.insert(ext, RowInfo { line, rank, owners });
                }
            }
        }
    }

    /// Drops the staged rows (and whatever of them reached the file).
    pub(super) fn discard(&mut self) {
        if let Some(file) = &self.file {
            let _ = file.set_len(self.len);
        }
        self.staged = Vec::new();
        self.staged_rows = Vec::new();
    }

    /// The upload: a CSV made from the spool as it is sent, of the rows some of whose
    /// records have not failed.
    pub(super) fn upload(&self, failed: &HashMap<usize, (HandlerError, bool)>) -> Option<UploadPlan> {
        let file = self.file.as_ref()?;
        let mut keep = vec![false; self.lines as usize];
        let mut rows = 0;
        for row in self.rows.values() {
            if row.owners.iter().any(|i| !failed.contains_key(&(*i as usize))) {
                keep[row.line as usize] = true;
                rows += 1;
            }
        }
        if rows == 0 {
            return None;
        }
        // The external id first, the other columns by name.
        let mut names: Vec<(usize, &str)> = self
            .columns
            .iter()
            .enumerate()
            .filter(|(_, c)| **c != self.ext_field)
            .map(|(i, c)| (i, c.as_str()))
            .collect();
        names.sort_by(|a, b| a.1.cmp(b.1));
        let mut position = vec![usize::MAX; self.columns.len()];
        let mut header = vec![quote(&self.ext_field)];
        for (n, (i, name)) in names.iter().enumerate() {
            position[*i] = n + 1;
            header.push(quote(name));
        }
        let header = format!("{}\n", header.join(","));
        Some(UploadPlan { file: file.clone(), len: self.len, keep, position, header, rows })
    }
}

/// A job's upload, made anew for each try.
pub(super) struct UploadPlan {
    pub(super) file: Arc<std::fs::File>,
    /// Bytes of whole rows (a later chunk's failed write is not read).
    pub(super) len: u64,
    pub(super) keep: Vec<bool>,
    /// Spool column → CSV column.
    pub(super) position: Vec<usize>,
    pub(super) header: String,
    pub(super) rows: usize,
}

impl UploadPlan {
    pub(super) fn body(&self) -> std::io::Result<reqwest::Body> {
        Ok(reqwest::Body::wrap_stream(futures::stream::iter(self.rows()?)))
    }

    /// The CSV from the spool's start, read with a position of its own.
    pub(super) fn rows(&self) -> std::io::Result<CsvRows> {
        let at = At { file: self.file.clone(), pos: 0, end: self.len };
        Ok(CsvRows {
            reader: BufReader::new(at),
            keep: self.keep.clone(),
            position: self.position.clone(),
            width: self.position.iter().filter(|p| **p != usize::MAX).count() + 1,
            header: Some(self.header.clone().into_bytes()),
            line: 0,
            done: false,
        })
    }
}

/// A reader of a shared file with its own position (`pread`): readers never move each other.
pub(super) struct At {
    file: Arc<std::fs::File>,
    pos: u64,
    end: u64,
}

impl Read for At {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let room = (self.end.saturating_sub(self.pos)).min(buf.len() as u64) as usize;
        if room == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..room], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// The CSV of a spool, about [`UPLOAD_PIECE`] bytes at a time.
pub(super) struct CsvRows {
    pub(super) reader: BufReader<At>,
    pub(super) keep: Vec<bool>,
    pub(super) position: Vec<usize>,
    pub(super) width: usize,
    pub(super) header: Option<Vec<u8>>,
    pub(super) line: usize,
    pub(super) done: bool,
}

pub(super) const UPLOAD_PIECE: usize = 64 << 10;

impl Iterator for CsvRows {
    type Item = std::io::Result<Vec<u8>>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(header) = self.header.take() {
            return Some(Ok(header));
        }
        if self.done {
            return None;
        }
        let mut out = Vec::with_capacity(UPLOAD_PIECE + 1024);
        let mut text = String::new();
        while out.len() < UPLOAD_PIECE {
            text.clear();
            match self.reader.read_line(&mut text) {
                Ok(0) => {
                    self.done = true;
                    break;
                }
                Ok(_) => {}
                Err(e) => return Some(Err(e)),
            }
            let line = self.line;
            self.line += 1;
            if !self.keep.get(line).copied().unwrap_or(false) {
                continue;
            }
            let (ext, cells): (String, Vec<(usize, String)>) = match serde_json::from_str(&text) {
                Ok(row) => row,
                Err(e) => return Some(Err(std::io::Error::other(e))),
            };
            let mut row = vec![String::new(); self.width];
            row[0] = ext;
            for (column, value) in cells {
                if let Some(at) = self.position.get(column).filter(|p| **p != usize::MAX) {
                    row[*at] = value;
                }
            }
            let row: Vec<String> = row.iter().map(|c| quote(c)).collect();
            out.extend_from_slice(row.join(",").as_bytes());
            out.push(b'\n');
        }
        if out.is_empty() && self.done { None } else { Some(Ok(out)) }
    }
}

/// Decodes a percent-encoded path segment.
pub(super) fn decode(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(b) = segment.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A JSON value as a Bulk CSV cell (`#N/A` clears a field, an empty cell leaves it alone).
pub(super) fn cell(value: &Value) -> String {
    match value {
        Value::Null => "#N/A".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub(super) fn quote(text: &str) -> String {
    format!("\"{}\"", text.replace('"', "\"\""))
}

/// Splits Bulk 2.0's `sf__Error` (`CODE:message:fields --`) into code, message and fields.
pub(super) fn row_error(text: &str) -> (String, String, Vec<String>) {
    let text = text.trim_end_matches(" --").trim_end_matches("--");
    let (code, rest) = text.split_once(':').unwrap_or((text, ""));
    let (message, fields) = rest.rsplit_once(':').unwrap_or((rest, ""));
    let fields = fields.split(',').map(str::trim).filter(|f| !f.is_empty()).map(str::to_owned).collect();
    (code.trim().to_owned(), message.trim().to_owned(), fields)
}

/// RFC 4180 CSV (quoted cells, doubled quotes, LF or CRLF) read as it arrives, in pieces
/// that may split a cell or a UTF-8 character anywhere.
#[derive(Default)]
pub(super) struct CsvReader {
    pub(super) row: Vec<String>,
    pub(super) cell: Vec<u8>,
    pub(super) quoted: bool,
    /// A quote inside a quoted cell: a doubled quote or the cell's end, per the next byte.
    pub(super) quote_seen: bool,
    /// A `\r` ended the row: a `\n` right after it is part of the same line end.
    pub(super) after_cr: bool,
    pub(super) any: bool,
}

impl CsvReader {
    pub(super) fn end_cell(&mut self) {
        let cell = std::mem::take(&mut self.cell);
        self.row.push(String::from_utf8(cell).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()));
    }

    pub(super) fn feed(&mut self, bytes: &[u8], each: &mut impl FnMut(Vec<String>)) {
        for &b in bytes {
            if self.after_cr {
                self.after_cr = false;
                if b == b'\n' {
                    continue;
                }
            }
            if self.quote_seen {
                self.quote_seen = false;
                if b == b'"' {
                    self.cell.push(b'"');
                    continue;
                }
                self.quoted = false;
            }
            self.any = true;
            if self.quoted {
                if b == b'"' {
                    self.quote_seen = true;
                } else {
                    self.cell.push(b);
                }
            } else if b == b'"' && self.cell.is_empty() {
                self.quoted = true;
            } else if b == b',' {
                self.end_cell();
            } else if b == b'\n' || b == b'\r' {
                self.after_cr = b == b'\r';
                self.end_cell();
                each(std::mem::take(&mut self.row));
                self.any = false;
            } else {
                self.cell.push(b);
            }
        }
    }

    pub(super) fn finish(mut self, each: &mut impl FnMut(Vec<String>)) {
        if self.any {
            self.end_cell();
            each(std::mem::take(&mut self.row));
        }
    }
}

/// Two columns of a results CSV, row by row (a job's results hold every column it was
/// sent), as the CSV arrives: `each(key, value)`.
pub(super) struct ResultPairs<F: FnMut(String, String)> {
    pub(super) csv: CsvReader,
    pub(super) names: (String, String),
    pub(super) columns: Option<(Option<usize>, Option<usize>)>,
    pub(super) each: F,
}

impl<F: FnMut(String, String)> ResultPairs<F> {
    pub(super) fn new(key: &str, value: &str, each: F) -> Self {
        Self { csv: CsvReader::default(), names: (key.to_owned(), value.to_owned()), columns: None, each }
    }

    pub(super) fn row(
        columns: &mut Option<(Option<usize>, Option<usize>)>,
        names: &(String, String),
        each: &mut F,
        mut row: Vec<String>,
    ) {
        match *columns {
            None => {
                let at = |name: &str| row.iter().position(|c| c == name);
                *columns = Some((at(&names.0), at(&names.1)));
            }
            Some((k, v)) => {
                let mut take =
                    |i: Option<usize>| i.and_then(|i| row.get_mut(i)).map(std::mem::take).unwrap_or_default();
                let key = take(k);
                each(key, take(v));
            }
        }
    }

    pub(super) fn feed(&mut self, bytes: &[u8]) {
        let (columns, names, each) = (&mut self.columns, &self.names, &mut self.each);
        self.csv.feed(bytes, &mut |row| Self::row(columns, names, each, row));
    }

    pub(super) fn finish(self) {
        let Self { csv, names, mut columns, mut each } = self;
        csv.finish(&mut |row| Self::row(&mut columns, &names, &mut each, row));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `csv` one byte at a time (a piece may end anywhere, even inside a character).
    fn result_pairs(csv: &str, key: &str, value: &str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut pairs = ResultPairs::new(key, value, |k, v| out.push((k, v)));
        for b in csv.as_bytes() {
            pairs.feed(std::slice::from_ref(b));
        }
        pairs.finish();
        out
    }

    #[test]
    fn bulk_errors_and_cells_read_like_salesforce_writes_them() {
        let (code, message, fields) =
            row_error("REQUIRED_FIELD_MISSING:Required fields are missing: [LastName]:LastName --");
        assert_eq!(code, "REQUIRED_FIELD_MISSING");
        assert_eq!(message, "Required fields are missing: [LastName]");
        assert_eq!(fields, vec!["LastName"]);
        assert_eq!(decode("c%3A42"), "c:42");
        assert_eq!(cell(&Value::Null), "#N/A");
        let rows = result_pairs("\"sf__Id\",\"Elo_Id__c\"\n\"001\",\"c:1, \"\"x\"\"\"\n", "Elo_Id__c", "sf__Id");
        assert_eq!(rows, vec![("c:1, \"x\"".to_owned(), "001".to_owned())]);
        let csv = "\"sf__Id\",\"Elo_Id__c\"\r\n\"001\",\"c:1 São\"\r\n\"002\",c:2";
        assert_eq!(
            result_pairs(csv, "Elo_Id__c", "sf__Id"),
            vec![("c:1 São".into(), "001".into()), ("c:2".into(), "002".into())]
        );
    }

    /// The upload is made from the spool: one row per external id with the newest customer
    /// data, cells under the right columns, rows whose records all failed left out.
    #[test]
    fn a_spooled_job_uploads_one_row_per_external_id_with_the_newest_data() {
        let mut spool = Spool::new();
        spool.ext_field = "Elo_Id__c".into();
        let (name, city) = (spool.column("Name"), spool.column("BillingCity"));
        let owners = |i: &[usize]| i.iter().copied().collect::<BTreeSet<usize>>();
        spool.add("c:1".into(), vec![(name, "New \"Ana\"".into()), (city, "Rio".into())], &owners(&[0]), (20, 0));
        spool.add("c:2".into(), vec![(name, "Bo".into())], &owners(&[1]), (5, 0));
        // The same account again with older data (an older order later in the batch).
        spool.add("c:1".into(), vec![(name, "Old".into())], &owners(&[2]), (10, 0));
        spool.add("c:3".into(), vec![(city, "Natal".into())], &owners(&[3]), (5, 0));
        let failed: HashMap<usize, (HandlerError, bool)> =
            [(3, (HandlerError::permanent("X", "x"), false))].into_iter().collect();
        spool.write_staged(None).unwrap();
        spool.commit();
        let plan = spool.upload(&failed).unwrap();
        let csv: Vec<u8> = plan.rows().unwrap().flat_map(Result::unwrap).collect();
        assert_eq!(
            String::from_utf8(csv).unwrap(),
            "\"Elo_Id__c\",\"BillingCity\",\"Name\"\n\"c:1\",\"Rio\",\"New \"\"Ana\"\"\"\n\"c:2\",\"\",\"Bo\"\n"
        );
        assert_eq!(plan.rows, 2);
        assert_eq!(spool.rows["c:1"].owners, vec![0, 2]);
        // Made anew for a second try.
        assert_eq!(plan.rows().unwrap().count(), plan.rows().unwrap().count());
    }

    /// Each upload reads the spool from its start on its own: a retry made while an earlier
    /// try's body is still read (a re-sent upload) gets every row, not what is left.
    #[test]
    fn every_upload_reads_the_spool_from_its_start() {
        let mut spool = Spool::new();
        spool.ext_field = "Elo_Id__c".into();
        let name = spool.column("Name");
        let owners: BTreeSet<usize> = [0].into();
        for n in 0..5_000 {
            spool.add(format!("c:{n}"), vec![(name, format!("Name {n}"))], &owners, (1, 0));
        }
        spool.write_staged(None).unwrap();
        spool.commit();
        let plan = spool.upload(&HashMap::new()).unwrap();
        let whole: Vec<u8> = plan.rows().unwrap().flat_map(Result::unwrap).collect();
        let mut first = plan.rows().unwrap();
        let mut second = plan.rows().unwrap();
        let _ = (first.next(), first.next());
        let again: Vec<u8> = second.by_ref().flat_map(Result::unwrap).collect();
        assert_eq!(again.len(), whole.len(), "the second upload is whole");
        let rest: usize = first.map(|p| p.unwrap().len()).sum();
        assert!(rest > 0, "the first is not cut short by the second");
    }

    /// A chunk whose rows do not fit the disk leaves nothing behind: the rows spooled before
    /// and after it upload whole, and only its rows are missing.
    #[test]
    fn a_chunk_that_does_not_fit_the_disk_spoils_nothing_else() {
        let mut spool = Spool::new();
        spool.ext_field = "Elo_Id__c".into();
        let name = spool.column("Name");
        let chunk = |spool: &mut Spool, from: usize, to: usize| {
            for n in from..to {
                spool.add(format!("c:{n}"), vec![(name, format!("Name {n}"))], &[n].into(), (1, 0));
            }
        };
        chunk(&mut spool, 0, 10);
        spool.write_staged(None).unwrap();
        spool.commit();
        // The disk fills up halfway through the second chunk.
        spool.full_at = Some(spool.len + 200);
        chunk(&mut spool, 10, 30);
        let error = spool.write_staged(None).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::StorageFull);
        spool.discard();
        spool.full_at = None;
        chunk(&mut spool, 30, 35);
        spool.write_staged(None).unwrap();
        spool.commit();
        let plan = spool.upload(&HashMap::new()).unwrap();
        let csv: Vec<u8> = plan.rows().unwrap().flat_map(Result::unwrap).collect();
        let csv = String::from_utf8(csv).unwrap();
        let ids: Vec<&str> = csv.lines().skip(1).map(|l| l.split(',').next().unwrap()).collect();
        let want: Vec<String> = (0..10).chain(30..35).map(|n| format!("\"c:{n}\"")).collect();
        assert_eq!(ids, want);
        assert_eq!(plan.rows, 15);
    }
}
