//! Operation histories of fault-injection runs, in the style of Jepsen/Elle:
//! one JSON object per line, written as operations happen, read back by the
//! checkers in `checker`.
//!
//! A record is `{"process": u64, "kind": "invoke"|"ok"|"fail"|"info", "f": F,
//! "value": V, "time_ns": u64, "node": "...", "error": "..."?}` where `f`/`value` are
//! - `"txn"`: a list-append transaction (MULTI / RPUSH / LRANGE / EXEC), `value`
//!   a list of micro-ops `["append", key, int]` and `["r", key, null | [int...]]`;
//! - `"write"` (SET), `"read"` (GET), `"incr"` (INCR) on a register, `value`
//!   `[key, null | int]`.
//!
//! Invariants the format relies on:
//! - Every operation is an `invoke` record followed later, on the same
//!   process, by exactly one completion. A process has at most one operation
//!   in flight; after an `info` a harness should continue under a new process
//!   id, as Jepsen does.
//! - `ok`: the operation took effect and `value` holds what it returned;
//!   `fail`: it certainly did not take effect; `info`: unknown (timeout,
//!   connection lost, `KEEL_UNCONFIRMED`): it may take effect at any time
//!   after its invocation, or never.
//! - File order is real-time order: the invocation is recorded before the
//!   request is sent and the completion after the reply arrives. The checkers
//!   use line order, not `time_ns`, to decide which operations overlap.
//! - Appended elements are unique per key, so a read reveals which appends
//!   it observed and in what order.
//!
//! `HistoryWriter` hands each record's line to the file (one `write_all`, no
//! user-space buffering) before returning, so at most one line is held in
//! memory and a crash of the harness loses no record it had written.
//! `read_history` rejects any malformed line with its
//! line number and never panics.

use std::fs::File;
use std::fs::OpenOptions;
use std::io;
use std::io::BufRead;
use std::io::BufReader;
use std::io::Read;
use std::io::Write;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Instant;
use std::time::SystemTime;

use serde_json::json;
use serde_json::Value as Json;

/// A Redis key.
pub type Key = String;
/// A list element or register value.
pub type Elem = i64;

/// Longest line the writer produces and the reader accepts.
pub const MAX_LINE_BYTES: usize = 64 << 20;
/// Capacity of the writer's line buffer kept between records; a longer line
/// is serialized, written, and its buffer released.
pub const RETAINED_LINE_BUFFER_BYTES: usize = 64 << 10;

/// What a record says about its operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Invoke,
    /// Took effect; the value holds what it returned.
    Ok,
    /// Certainly did not take effect.
    Fail,
    /// Outcome unknown: may take effect at any time after its invocation.
    Info,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Invoke => "invoke",
            Kind::Ok => "ok",
            Kind::Fail => "fail",
            Kind::Info => "info",
        }
    }

    fn parse(s: &str) -> Option<Kind> {
        Some(match s {
            "invoke" => Kind::Invoke,
            "ok" => Kind::Ok,
            "fail" => Kind::Fail,
            "info" => Kind::Info,
            _ => return None,
        })
    }
}

/// One step of a list-append transaction.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum MicroOp {
    /// `RPUSH key value`.
    Append { key: Key, value: Elem },
    /// `LRANGE key 0 -1`: `None` until the reply is known.
    Read { key: Key, value: Option<Vec<Elem>> },
}

impl MicroOp {
    pub fn append(key: impl Into<Key>, value: Elem) -> MicroOp {
        MicroOp::Append { key: key.into(), value }
    }

    pub fn read(key: impl Into<Key>, value: Option<Vec<Elem>>) -> MicroOp {
        MicroOp::Read { key: key.into(), value }
    }

    pub fn key(&self) -> &str {
        match self {
            MicroOp::Append { key, .. } | MicroOp::Read { key, .. } => key,
        }
    }

    fn to_json(&self) -> Json {
        match self {
            MicroOp::Append { key, value } => json!(["append", key, value]),
            MicroOp::Read { key, value } => json!(["r", key, value]),
        }
    }

    fn from_json(v: &Json) -> Result<MicroOp, String> {
        let parts = match v.as_array() {
            Some(p) if p.len() == 3 => p,
            _ => return Err(format!("micro-op must be [\"append\"|\"r\", key, value], got {}", short(v))),
        };
        let key = as_key(&parts[1])?;
        match parts[0].as_str() {
            Some("append") => Ok(MicroOp::Append { key, value: as_elem(&parts[2], "appended element")? }),
            Some("r") => Ok(MicroOp::Read { key, value: as_opt_list(&parts[2])? }),
            _ => Err(format!("micro-op must start with \"append\" or \"r\", got {}", short(&parts[0]))),
        }
    }
}

/// What an operation does (`f`) and its argument or result (`value`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Action {
    /// `f: "txn"`: MULTI, the micro-ops in order, EXEC.
    Txn(Vec<MicroOp>),
    /// `f: "write"`: SET key value.
    Write { key: Key, value: Elem },
    /// `f: "read"`: GET key; `None` is nil (or, on an invocation, not yet known).
    Read { key: Key, value: Option<Elem> },
    /// `f: "incr"`: INCR key; `value` is the new value, `None` until known.
    Incr { key: Key, value: Option<Elem> },
}

impl Action {
    pub fn write(key: impl Into<Key>, value: Elem) -> Action {
        Action::Write { key: key.into(), value }
    }

    pub fn read(key: impl Into<Key>, value: Option<Elem>) -> Action {
        Action::Read { key: key.into(), value }
    }

    pub fn incr(key: impl Into<Key>, value: Option<Elem>) -> Action {
        Action::Incr { key: key.into(), value }
    }

    /// The `f` field.
    pub fn f(&self) -> &'static str {
        match self {
            Action::Txn(_) => "txn",
            Action::Write { .. } => "write",
            Action::Read { .. } => "read",
            Action::Incr { .. } => "incr",
        }
    }

    /// The register key, for `write`, `read` and `incr`.
    pub fn register_key(&self) -> Option<&str> {
        match self {
            Action::Txn(_) => None,
            Action::Write { key, .. } | Action::Read { key, .. } | Action::Incr { key, .. } => Some(key),
        }
    }

    fn value_json(&self) -> Json {
        match self {
            Action::Txn(mops) => Json::Array(mops.iter().map(MicroOp::to_json).collect()),
            Action::Write { key, value } => json!([key, value]),
            Action::Read { key, value } | Action::Incr { key, value } => json!([key, value]),
        }
    }

    fn from_json(f: &str, v: &Json) -> Result<Action, String> {
        if f == "txn" {
            let mops = v
                .as_array()
                .ok_or_else(|| format!("\"value\" of a txn must be a list of micro-ops, got {}", short(v)))?;
            return Ok(Action::Txn(mops.iter().map(MicroOp::from_json).collect::<Result<_, _>>()?));
        }
        let parts = match v.as_array() {
            Some(p) if p.len() == 2 => p,
            _ => return Err(format!("\"value\" of f {f:?} must be [key, value], got {}", short(v))),
        };
        let key = as_key(&parts[0])?;
        match f {
            "write" => Ok(Action::Write { key, value: as_elem(&parts[1], "written value")? }),
            "read" => Ok(Action::Read { key, value: as_opt_elem(&parts[1])? }),
            "incr" => Ok(Action::Incr { key, value: as_opt_elem(&parts[1])? }),
            _ => Err(format!("\"f\" must be one of txn|write|read|incr, got {f:?}")),
        }
    }
}

/// One history record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    /// The client that ran the operation; one operation in flight at a time.
    pub process: u64,
    pub kind: Kind,
    pub action: Action,
    /// When the record was made, in nanoseconds (see `HistoryWriter::record`).
    pub time_ns: u64,
    /// The node the client talked to ("" if none).
    pub node: String,
    /// Why a `fail` or `info` ended as it did.
    pub error: Option<String>,
}

impl Op {
    /// An invocation at time 0 on no particular node.
    pub fn invoke(process: u64, action: Action) -> Op {
        Op { process, kind: Kind::Invoke, action, time_ns: 0, node: String::new(), error: None }
    }

    /// The completion of this invocation: same process and node.
    pub fn complete(&self, kind: Kind, action: Action) -> Op {
        Op { process: self.process, kind, action, time_ns: self.time_ns, node: self.node.clone(), error: None }
    }

    pub fn with_node(mut self, node: impl Into<String>) -> Op {
        self.node = node.into();
        self
    }

    pub fn with_error(mut self, error: impl Into<String>) -> Op {
        self.error = Some(error.into());
        self
    }

    pub fn to_json(&self) -> Json {
        let mut m = serde_json::Map::new();
        m.insert("process".into(), json!(self.process));
        m.insert("kind".into(), json!(self.kind.as_str()));
        m.insert("f".into(), json!(self.action.f()));
        m.insert("value".into(), self.action.value_json());
        m.insert("time_ns".into(), json!(self.time_ns));
        m.insert("node".into(), json!(self.node));
        if let Some(e) = &self.error {
            m.insert("error".into(), json!(e));
        }
        Json::Object(m)
    }

    /// Parses one record; the error says which field is wrong.
    pub fn from_json(v: &Json) -> Result<Op, String> {
        let obj = v.as_object().ok_or_else(|| format!("a record must be a JSON object, got {}", short(v)))?;
        for k in obj.keys() {
            if !["process", "kind", "f", "value", "time_ns", "node", "error"].contains(&k.as_str()) {
                return Err(format!("unknown field {k:?}"));
            }
        }
        let field = |name: &str| obj.get(name).ok_or_else(|| format!("missing field {name:?}"));
        let process = field("process")?
            .as_u64()
            .ok_or_else(|| format!("\"process\" must be a non-negative integer, got {}", short(&obj["process"])))?;
        let kind_v = field("kind")?;
        let kind = kind_v
            .as_str()
            .and_then(Kind::parse)
            .ok_or_else(|| format!("\"kind\" must be one of invoke|ok|fail|info, got {}", short(kind_v)))?;
        let f_v = field("f")?;
        let f = f_v.as_str().ok_or_else(|| format!("\"f\" must be a string, got {}", short(f_v)))?;
        let action = Action::from_json(f, field("value")?)?;
        let time_ns = field("time_ns")?
            .as_u64()
            .ok_or_else(|| format!("\"time_ns\" must be a non-negative integer, got {}", short(&obj["time_ns"])))?;
        let node_v = field("node")?;
        let node =
            node_v.as_str().ok_or_else(|| format!("\"node\" must be a string, got {}", short(node_v)))?.to_string();
        let error = match obj.get("error") {
            None | Some(Json::Null) => None,
            Some(Json::String(s)) => Some(s.clone()),
            Some(other) => return Err(format!("\"error\" must be a string, got {}", short(other))),
        };
        Ok(Op { process, kind, action, time_ns, node, error })
    }
}

impl serde::Serialize for Op {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(s)
    }
}

impl<'de> serde::Deserialize<'de> for Op {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Op, D::Error> {
        let v = Json::deserialize(d)?;
        Op::from_json(&v).map_err(serde::de::Error::custom)
    }
}

fn short(v: &Json) -> String {
    let s = v.to_string();
    if s.len() <= 60 {
        return s;
    }
    let mut end = 57;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

fn as_key(v: &Json) -> Result<Key, String> {
    v.as_str().map(str::to_string).ok_or_else(|| format!("a key must be a string, got {}", short(v)))
}

fn as_elem(v: &Json, what: &str) -> Result<Elem, String> {
    v.as_i64().ok_or_else(|| format!("{what} must be an integer in i64 range, got {}", short(v)))
}

fn as_opt_elem(v: &Json) -> Result<Option<Elem>, String> {
    if v.is_null() {
        return Ok(None);
    }
    as_elem(v, "register value").map(Some)
}

fn as_opt_list(v: &Json) -> Result<Option<Vec<Elem>>, String> {
    match v {
        Json::Null => Ok(None),
        Json::Array(xs) => xs.iter().map(|x| as_elem(x, "list element")).collect::<Result<_, _>>().map(Some),
        _ => Err(format!("a read must be null or a list of integers, got {}", short(v))),
    }
}

/// Why a history could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("cannot read history {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("history line {line} is malformed: {reason} (fix the harness that wrote it, or drop the line)")]
    Malformed { line: usize, reason: String },
}

/// Reads a history file written by `HistoryWriter`.
pub fn read_history(path: impl AsRef<Path>) -> Result<Vec<Op>, HistoryError> {
    let path = path.as_ref();
    let file = File::open(path).map_err(|source| HistoryError::Io { path: path.to_path_buf(), source })?;
    parse_reader(BufReader::new(file)).map_err(|e| match e {
        HistoryError::Io { source, .. } => HistoryError::Io { path: path.to_path_buf(), source },
        other => other,
    })
}

/// Parses history bytes: one record per line, each line terminated by `\n`
/// (the last one may lack it). Blank lines are malformed, so record `i` is
/// always line `i + 1`.
pub fn parse_history(bytes: &[u8]) -> Result<Vec<Op>, HistoryError> {
    parse_reader(bytes)
}

fn parse_reader(mut r: impl BufRead) -> Result<Vec<Op>, HistoryError> {
    let mut ops = Vec::new();
    let mut buf = Vec::new();
    for line in 1.. {
        buf.clear();
        let n = (&mut r)
            .take(MAX_LINE_BYTES as u64 + 1)
            .read_until(b'\n', &mut buf)
            .map_err(|source| HistoryError::Io { path: PathBuf::new(), source })?;
        if n == 0 {
            break;
        }
        let malformed = |reason: String| HistoryError::Malformed { line, reason };
        if buf.last() == Some(&b'\n') {
            buf.pop();
        } else if buf.len() > MAX_LINE_BYTES {
            return Err(malformed(format!("longer than {MAX_LINE_BYTES} bytes")));
        }
        let text = std::str::from_utf8(&buf).map_err(|e| malformed(format!("not UTF-8: {e}")))?;
        if text.trim().is_empty() {
            return Err(malformed("blank line".into()));
        }
        let v: Json = serde_json::from_str(text).map_err(|e| malformed(format!("not JSON: {e}")))?;
        ops.push(Op::from_json(&v).map_err(malformed)?);
    }
    Ok(ops)
}

/// Appends records to a history file, one line per record, each written
/// with a single `write` as soon as it is recorded. Shared by all client
/// threads of a run; the order of calls is the order of lines.
pub struct HistoryWriter {
    path: PathBuf,
    started: Instant,
    started_unix_ns: u64,
    inner: Mutex<WriterInner>,
}

struct WriterInner {
    file: File,
    line: Vec<u8>,
}

impl HistoryWriter {
    /// Opens `path` for appending, creating it if needed.
    pub fn create(path: impl AsRef<Path>) -> io::Result<HistoryWriter> {
        let path = path.as_ref().to_path_buf();
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let started_unix_ns =
            SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
        Ok(HistoryWriter {
            path,
            started: Instant::now(),
            started_unix_ns,
            inner: Mutex::new(WriterInner { file, line: Vec::with_capacity(4096) }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `op` as it is.
    pub fn append(&self, op: &Op) -> io::Result<()> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        Self::write_line(&mut inner, op)
    }

    /// Stamps `op.time_ns` (wall clock at open plus monotonic time since)
    /// and writes it; stamping under the lock keeps `time_ns` in line order.
    /// Returns the record as written.
    pub fn record(&self, mut op: Op) -> io::Result<Op> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        op.time_ns = self.started_unix_ns.saturating_add(self.started.elapsed().as_nanos() as u64);
        Self::write_line(&mut inner, &op)?;
        Ok(op)
    }

    /// fsyncs the file.
    pub fn sync(&self) -> io::Result<()> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.file.sync_data()
    }

    fn write_line(inner: &mut WriterInner, op: &Op) -> io::Result<()> {
        inner.line.clear();
        serde_json::to_writer(&mut inner.line, &op.to_json())?;
        let too_long = inner.line.len() > MAX_LINE_BYTES;
        inner.line.push(b'\n');
        let result = if too_long {
            Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "history record of {} bytes exceeds MAX_LINE_BYTES ({MAX_LINE_BYTES}); not written",
                    inner.line.len()
                ),
            ))
        } else {
            inner.file.write_all(&inner.line)
        };
        if inner.line.capacity() > RETAINED_LINE_BUFFER_BYTES {
            inner.line = Vec::with_capacity(4096);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_key() -> impl Strategy<Value = Key> {
        prop_oneof![Just("k".to_string()), "[a-z0-9:]{0,8}", any::<String>()]
    }

    fn arb_action() -> impl Strategy<Value = Action> {
        let mop = prop_oneof![
            (arb_key(), any::<i64>()).prop_map(|(k, v)| MicroOp::append(k, v)),
            (arb_key(), proptest::option::of(proptest::collection::vec(any::<i64>(), 0..5)))
                .prop_map(|(k, v)| MicroOp::read(k, v)),
        ];
        prop_oneof![
            proptest::collection::vec(mop, 0..5).prop_map(Action::Txn),
            (arb_key(), any::<i64>()).prop_map(|(k, v)| Action::write(k, v)),
            (arb_key(), any::<Option<i64>>()).prop_map(|(k, v)| Action::read(k, v)),
            (arb_key(), any::<Option<i64>>()).prop_map(|(k, v)| Action::incr(k, v)),
        ]
    }

    fn arb_op() -> impl Strategy<Value = Op> {
        let kind = prop_oneof![Just(Kind::Invoke), Just(Kind::Ok), Just(Kind::Fail), Just(Kind::Info)];
        (any::<u64>(), kind, arb_action(), any::<u64>(), any::<String>(), any::<Option<String>>()).prop_map(
            |(process, kind, action, time_ns, node, error)| Op { process, kind, action, time_ns, node, error },
        )
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_history(&bytes);
        }

        #[test]
        fn json_like_garbage_never_panics(s in "[\\[\\]{}\",:0-9a-z \\n-]{0,200}") {
            let _ = parse_history(s.as_bytes());
        }

        #[test]
        fn written_histories_round_trip(ops in proptest::collection::vec(arb_op(), 0..20)) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("history.jsonl");
            let w = HistoryWriter::create(&path).unwrap();
            for op in &ops {
                w.append(op).unwrap();
            }
            prop_assert_eq!(read_history(&path).unwrap(), ops);
        }
    }

    #[test]
    fn record_stamps_increasing_times() {
        let dir = tempfile::tempdir().unwrap();
        let w = HistoryWriter::create(dir.path().join("h.jsonl")).unwrap();
        let a = w.record(Op::invoke(1, Action::write("k", 1))).unwrap();
        let b = w.record(a.complete(Kind::Ok, Action::write("k", 1))).unwrap();
        assert!(a.time_ns > 0 && b.time_ns >= a.time_ns);
        assert_eq!(read_history(w.path()).unwrap(), vec![a, b]);
    }

    #[test]
    fn format_is_jepsen_like() {
        let op = Op::invoke(3, Action::Txn(vec![MicroOp::append("x", 1), MicroOp::read("x", None)])).with_node("n1");
        assert_eq!(
            op.to_json().to_string(),
            r#"{"f":"txn","kind":"invoke","node":"n1","process":3,"time_ns":0,"value":[["append","x",1],["r","x",null]]}"#
        );
    }

    #[test]
    fn malformed_lines_name_their_line() {
        let good = Op::invoke(1, Action::read("k", None)).to_json().to_string();
        let cases: [(&str, &str); 8] = [
            ("{", "not JSON"),
            ("[]", "JSON object"),
            (r#"{"process":1,"kind":"done","f":"read","value":["k",null],"time_ns":0,"node":""}"#, "\"kind\""),
            (r#"{"process":-1,"kind":"ok","f":"read","value":["k",null],"time_ns":0,"node":""}"#, "\"process\""),
            (r#"{"process":1,"kind":"ok","f":"cas","value":["k",null],"time_ns":0,"node":""}"#, "\"f\""),
            (
                r#"{"process":1,"kind":"ok","f":"txn","value":[["append","k",null]],"time_ns":0,"node":""}"#,
                "appended element",
            ),
            (r#"{"process":1,"kind":"ok","f":"read","value":["k",null],"node":""}"#, "time_ns"),
            ("", "blank line"),
        ];
        for (bad, needle) in cases {
            let text = format!("{good}\n{bad}\n{good}\n");
            let err = parse_history(text.as_bytes()).unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, HistoryError::Malformed { line: 2, .. }), "{bad}: {msg}");
            assert!(msg.contains("line 2") && msg.contains(needle), "{bad}: {msg}");
        }
        let err = parse_history(&[b'{', 0xff, b'}']).unwrap_err();
        assert!(err.to_string().contains("line 1") && err.to_string().contains("UTF-8"), "{err}");
    }

    #[test]
    fn missing_file_names_the_path() {
        let err = read_history("/nonexistent/keel-history.jsonl").unwrap_err();
        assert!(err.to_string().contains("/nonexistent/keel-history.jsonl"), "{err}");
    }
}
