//! The primary's sidecar: attaches to its Redis as a replica (PSYNC), appends
//! the replication stream to the journal as the stream's leader, and tells
//! the module (`KEEL.ACK`) how far the journal holds it.
//!
//! Invariants:
//! - the journal holds the stream contiguously: each record starts at the
//!   previous record's end offset (checked before every append), so no byte
//!   is journaled twice or skipped; a restart resumes with `PSYNC <replid>
//!   <end+1>` from the last record, with no full sync (no fork);
//! - `KEEL.ACK o` is sent only after the append covering `o` succeeded (the
//!   journal fsync'd it on a quorum);
//! - each append ends where a replica's offset can stand: after a whole
//!   command, outside MULTI/EXEC (`Cuts`, cuts.rs), so a journal whose
//!   writer died is always one a replica can be caught up on (a command
//!   larger than `MAX_APPEND_PAYLOAD_BYTES` is the one exception);
//! - one append in flight at a time; bytes arriving meanwhile form the next
//!   append (group commit), read from the link when the append returns
//!   (or after 20 ms in flight). An append whose outcome is unknown is
//!   retried with `expect_last_seq`, so it lands exactly once;
//! - after a confirmation the next append may wait (at most
//!   `merge_wait_us`) until about as many bytes are pending as the clients
//!   just answered and those already waiting wrote last time: clients
//!   answered together write again together, and their writes join the
//!   waiting ones in one record instead of alternating in two half-size
//!   groups (`Merge`, pure, in this file);
//! - `FENCED` from the journal: the module is told (`KEEL.FENCED`), every
//!   held write fails, and the node goes back to following (node.rs);
//! - the lease is renewed every `lease_ms / 3` only while Redis answers
//!   (lease.rs), one renewal at a time, off the loop (confirmations go on
//!   while it is out; it is aborted when the loop ends, so no renewal
//!   outlives this node's leading); each renewal's deadline goes to the
//!   module (`KEEL.LEASE`),
//!   which serves nothing past it;
//! - a Redis that lost its history (restarted empty, or behind the journal)
//!   is never attached with a full sync over the journal: the node turns it
//!   into a replica fed from the journal instead (`Stop::LostHistory`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use keel_journal_client::client::AppendSession;
use keel_journal_client::client::JournalClient;
use keel_journal_client::client::JournalError;
use tokio::io::AsyncBufReadExt;
use tokio::io::AsyncReadExt;
use tokio::io::AsyncWriteExt;
use tokio::io::BufReader;
use crate::link::Reader as OwnedReadHalf;
use crate::link::Writer as OwnedWriteHalf;
use crate::link::RedisAddr;

use crate::cuts::Cuts;
use crate::lease::Renewal;
use crate::record::Kind;
use crate::record::MAX_PAYLOAD_BYTES;
use crate::record::ReadOneError;
use crate::record::Record;
use crate::auth::Credentials;
use crate::resp::encode_command;

/// Every bound of the primary sidecar.
#[derive(Debug, Clone)]
pub struct PrimaryConfig {
    /// Where the local Redis listens (TCP or unix socket: link.rs).
    pub redis: RedisAddr,
    /// The address clients reach this node's Redis at (discovery hands it
    /// out): `--announce`, else a TCP `--redis`.
    pub announce: String,
    /// The ACL user and secret every connection to Redis authenticates
    /// with (auth.rs).
    pub control: Credentials,
    pub journal: String,
    /// TLS to the journal (or explicitly none).
    pub journal_tls: keel_journal_client::tls::JournalTls,
    pub stream: String,
    pub state_dir: PathBuf,
    pub lease_ms: u64,
    /// Taken off the lease this node believes in, for clock-rate drift.
    pub drift_margin_ms: u64,
    /// Stream bytes read ahead of the journal before reading pauses.
    pub max_buffered_bytes: usize,
    /// Longest wait for answered clients' next writes before an append.
    pub merge_wait_us: u64,
    /// How often the replica link reports its offset to Redis.
    pub replconf_ack_ms: u64,
    /// Pause before retrying an unavailable journal or a lost Redis link.
    pub retry_pause_ms: u64,
}

impl PrimaryConfig {
    pub fn validate(&self) -> Result<(), String> {
        crate::link::client_address(&self.redis, Some(&self.announce))?;
        if self.stream.is_empty() {
            return Err("--stream must not be empty".into());
        }
        if !(100..=60_000).contains(&self.lease_ms) {
            return Err(format!("--lease-ms {} must be 100..=60000", self.lease_ms));
        }
        if self.drift_margin_ms * 4 > self.lease_ms {
            return Err(format!("--drift-margin-ms {} must be at most a quarter of --lease-ms", self.drift_margin_ms));
        }
        if self.merge_wait_us > 100_000 {
            return Err(format!("--merge-wait-us {} must be at most 100000", self.merge_wait_us));
        }
        if self.max_buffered_bytes < MAX_PAYLOAD_BYTES {
            return Err(format!("--max-buffered-bytes must be at least {MAX_PAYLOAD_BYTES}"));
        }
        Ok(())
    }
}

/// Why the sidecar stopped.
#[derive(Debug, thiserror::Error)]
pub enum Stop {
    #[error("FENCED: {0}")]
    Fenced(String),
    /// The local Redis cannot continue the journaled history; it must be
    /// rebuilt from the journal as a replica.
    #[error("the local Redis lost its history: {0}")]
    LostHistory(String),
    /// Another process appended to the stream under this node's lease
    /// (the journal took its append): this node steps down (its writes are
    /// fenced) and follows.
    #[error("OVERTAKEN: {0}")]
    Overtaken(String),
    /// Record `seq` of the stream is not a Keel record: nobody can lead on
    /// from it (stall.rs); this node follows, stalled.
    #[error("record {seq} cannot be read: {reason}")]
    Stalled { seq: u64, reason: String },
    #[error("{0}")]
    Fatal(String),
    /// Worth retrying from the journal's state (lost link, unavailable journal).
    #[error("{0}")]
    Retry(String),
}

fn retry(e: impl std::fmt::Display) -> Stop {
    Stop::Retry(e.to_string())
}

/// This node's identity as a stream leader; kept across restarts so a
/// restarted sidecar still holds its own lease.
pub fn node_uuid(state_dir: &std::path::Path) -> std::io::Result<String> {
    std::fs::create_dir_all(state_dir)?;
    let path = state_dir.join("node.uuid");
    match std::fs::read_to_string(&path) {
        Ok(s) if uuid::Uuid::parse_str(s.trim()).is_ok() => Ok(s.trim().to_string()),
        Ok(s) => Err(std::io::Error::other(format!("{} holds {s:?}, not a uuid", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = uuid::Uuid::new_v4().to_string();
            let tmp = state_dir.join("node.uuid.tmp");
            std::fs::write(&tmp, &id)?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            Ok(id)
        }
        Err(e) => Err(e),
    }
}

/// How often an append refused for lack of room (`stream-full`) is tried
/// again.
const STREAM_FULL_RETRY_MS: u64 = 100;

/// An RDB with no key: the base of a new history whose Redis is empty.
/// Version 9 (every supported server reads it); a zero checksum means
/// "not computed" to the loader.
const EMPTY_RDB: &[u8] = b"REDIS0009\xff\0\0\0\0\0\0\0\0";

/// `journal_tail`'s replid when the stream ends inside a base RDB whose
/// writer died (no write can have been acknowledged on such a stream).
const INCOMPLETE_BASE: &str = "incomplete-base";
/// `journal_tail`'s replid when the stream's last record voids a base.
const NO_BASE: &str = "no-base";

/// Where the journaled history ends, given the stream's last seq (as the
/// lease reported it): (seq, replid, end offset).
async fn journal_tail(journal: &JournalClient, stream: &str, last_seq: u64) -> Result<Option<(u64, String, u64)>, Stop> {
    if last_seq == 0 {
        return Ok(None);
    }
    let rec = read_record(journal, stream, last_seq).await?;
    match rec.kind {
        Kind::Rdb => Ok(Some((last_seq, INCOMPLETE_BASE.into(), rec.end))),
        // Nothing after an abort: the stream holds no history yet.
        Kind::RdbAbort => Ok(Some((last_seq, NO_BASE.into(), rec.end))),
        // The stream was cut back to the void's start.
        Kind::StreamVoid => Ok(Some((last_seq, rec.replid, rec.start))),
        _ => Ok(Some((last_seq, rec.replid, rec.end))),
    }
}

/// Whether the journal's stream bytes from offset `from` to its end `end`
/// (the last record being `last_seq`) hold no whole command outside a
/// transaction: only the unfinished last command of a writer that died.
/// Reads back from the last record to the one holding `from`, then scans
/// forward (RESP framing only).
async fn unfinished_tail(journal: &JournalClient, stream: &str, last_seq: u64, from: u64, end: u64) -> Result<bool, Stop> {
    let mut first = last_seq;
    loop {
        let rec = read_record(journal, stream, first).await?;
        match rec.kind {
            Kind::Stream if rec.start <= from => break,
            Kind::Stream if first > 1 => first -= 1,
            // The stream continues at `rec.start` after these.
            Kind::RdbEnd | Kind::StreamVoid if rec.start == from => {
                first += 1;
                break;
            }
            _ => return Ok(false),
        }
    }
    let mut cuts = Cuts::new(from);
    let mut reader = journal.read(stream, first, false);
    let mut at = from;
    while at < end {
        let Some(batch) = reader.next_batch().await.map_err(retry)? else { break };
        for r in batch.into_iter().take_while(|r| r.seq <= last_seq) {
            let rec = Record::decode(&r.payload).map_err(|e| Stop::Stalled { seq: r.seq, reason: e.to_string() })?;
            if rec.kind != Kind::Stream || rec.start > at || rec.end < at {
                return Ok(false);
            }
            cuts.feed(&rec.payload[(at - rec.start) as usize..]);
            at = rec.end;
            if cuts.take_whole() != from || cuts.broken().is_some() {
                return Ok(false);
            }
        }
    }
    Ok(at == end)
}

/// Record `seq` of `stream`, decoded.
async fn read_record(journal: &JournalClient, stream: &str, seq: u64) -> Result<Record, Stop> {
    crate::record::read_one(journal, stream, seq).await.map_err(|e| match e {
        ReadOneError::Journal(e) => retry(e),
        ReadOneError::Gone => retry(format!("record {seq} of {stream} is not readable")),
        ReadOneError::Undecodable(reason) => Stop::Stalled { seq, reason },
    })
}

/// Reads one `\r\n`-terminated line (Redis may send bare `\n` keep-alives
/// before a full-sync payload; they are skipped).
async fn read_line(r: &mut BufReader<OwnedReadHalf>) -> Result<String, Stop> {
    loop {
        let mut line = String::new();
        let n = r.read_line(&mut line).await.map_err(retry)?;
        if n == 0 {
            return Err(retry("Redis closed the replication link"));
        }
        let line = line.trim_end().to_string();
        if !line.is_empty() {
            return Ok(line);
        }
    }
}

async fn command(w: &mut OwnedWriteHalf, args: &[&[u8]]) -> Result<(), Stop> {
    w.write_all(&encode_command(args)).await.map_err(retry)
}

/// `AUTH` as the control user, first on every connection to Redis.
async fn authenticate(r: &mut BufReader<OwnedReadHalf>, w: &mut OwnedWriteHalf, creds: &Credentials, redis: &RedisAddr) -> Result<(), Stop> {
    crate::auth::authenticate(r, w, creds, &redis.to_string()).await.map_err(Stop::Retry)
}

/// Leads the stream from the local Redis until fenced, the Redis lost its
/// history, or an error. The caller holds the lease (taken for `me`).
pub async fn lead(cfg: &PrimaryConfig, journal: &Arc<JournalClient>, me: &str) -> Stop {
    match lead_inner(cfg, journal, me).await {
        Ok(never) => match never {},
        Err(stop) => stop,
    }
}

enum Never {}

/// A control connection to the local Redis: commands whose replies are
/// single lines (`KEEL.*`, `REPLICAOF`), counted so the lease renewal can
/// tell whether Redis still answers. An error reply is kept (`refused`):
/// a refused `KEEL.ACK` would leave the writes it covers held until their
/// timeout, so the leading loop restarts on one and says it again.
pub struct Control {
    w: OwnedWriteHalf,
    sent: u64,
    replies: Arc<SharedReplies>,
}

/// What Redis answered on a control connection, kept by its reader task,
/// and a wakeup for the first error.
#[derive(Default)]
struct SharedReplies {
    seen: std::sync::Mutex<ControlReplies>,
    refused: tokio::sync::Notify,
}

/// Longest error text kept from a control reply.
const MAX_REFUSAL_BYTES: usize = 512;

/// The replies of a control connection, fed as they arrive in arbitrary
/// pieces. Pure: counts complete lines and keeps the first error line
/// (with its reply number, 1-based). Memory stays bounded whatever comes.
#[derive(Debug, Default)]
struct ControlReplies {
    answered: u64,
    /// The start of the line being read, if it is an error (capped).
    partial: Vec<u8>,
    /// Whether the line being read began with `-`.
    in_error: bool,
    /// Whether a line has begun and not ended yet.
    in_line: bool,
    refused: Option<String>,
}

impl ControlReplies {
    /// Takes some bytes; returns true when this call found the first error.
    fn feed(&mut self, bytes: &[u8]) -> bool {
        let mut found = false;
        for &b in bytes {
            if !self.in_line {
                self.in_line = true;
                self.in_error = b == b'-';
            }
            if b == b'\n' {
                self.answered += 1;
                if self.in_error && self.refused.is_none() {
                    let text = String::from_utf8_lossy(&self.partial[1..]).trim_end().to_string();
                    self.refused = Some(format!("reply {}: {text}", self.answered));
                    found = true;
                }
                self.partial.clear();
                self.in_error = false;
                self.in_line = false;
            } else if self.in_error && self.partial.len() < MAX_REFUSAL_BYTES {
                self.partial.push(b);
            }
        }
        found
    }
}

impl Control {
    pub async fn connect(redis: &RedisAddr, creds: &Credentials) -> Result<(Control, String), Stop> {
        let (ctl_r, mut w, _) = crate::link::connect(redis).await.map_err(|e| retry(format!("connect {redis}: {e}")))?;
        let mut r = BufReader::new(ctl_r);
        authenticate(&mut r, &mut w, creds, redis).await?;
        // INFO replication first, read whole, before replies are only counted.
        command(&mut w, &[b"INFO", b"replication"]).await?;
        let header = read_line(&mut r).await?;
        let len: usize = header.strip_prefix('$').and_then(|l| l.parse().ok()).ok_or_else(|| retry(format!("INFO answered {header:?}")))?;
        let mut body = vec![0u8; len + 2];
        r.read_exact(&mut body).await.map_err(retry)?;
        let info = String::from_utf8_lossy(&body[..len]).into_owned();
        let replies = Arc::new(SharedReplies::default());
        let shared = replies.clone();
        tokio::spawn(async move {
            let mut r = r;
            let mut sink = vec![0u8; 4096];
            while let Ok(n) = r.read(&mut sink).await {
                if n == 0 {
                    break;
                }
                let mut seen = shared.seen.lock().unwrap();
                if seen.feed(&sink[..n]) {
                    let why = seen.refused.clone().unwrap_or_default();
                    drop(seen);
                    tracing::error!(%why, "Redis refused a command on the control connection");
                    shared.refused.notify_one();
                }
            }
        });
        Ok((Control { w, sent: 0, replies }, info))
    }

    /// The first error Redis answered on this connection, if any.
    pub fn refused(&self) -> Option<String> {
        self.replies.seen.lock().unwrap().refused.clone()
    }

    /// Resolves once Redis answered an error on this connection.
    async fn refusal(&self) -> String {
        loop {
            if let Some(why) = self.refused() {
                return why;
            }
            self.replies.refused.notified().await;
        }
    }

    pub async fn send(&mut self, args: &[&[u8]]) -> Result<(), Stop> {
        self.sent += 1;
        command(&mut self.w, args).await
    }

    /// Whether every command sent so far was answered.
    pub fn all_answered(&self) -> bool {
        self.answered_through(self.sent)
    }

    /// Whether the first `n` commands sent were answered (replies come in
    /// order). Under load some `KEEL.ACK` is always in flight, so liveness
    /// is judged by one command's reply, not by all of them.
    pub fn answered_through(&self, n: u64) -> bool {
        self.replies.seen.lock().unwrap().answered >= n
    }

    /// How many commands were sent so far.
    pub fn sent(&self) -> u64 {
        self.sent
    }
}

/// A field of an `INFO` answer.
pub fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines().find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':'))).map(|v| v.trim())
}

/// The machine's monotonic clock in milliseconds (CLOCK_MONOTONIC: the
/// module reads lease deadlines on the same clock).
pub fn monotonic_ms() -> u64 {
    #[repr(C)]
    struct Timespec {
        tv_sec: i64,
        tv_nsec: i64,
    }
    extern "C" {
        fn clock_gettime(clk: i32, ts: *mut Timespec) -> i32;
    }
    let mut ts = Timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid out-pointer; clock 1 is CLOCK_MONOTONIC on Linux.
    let rc = unsafe { clock_gettime(1, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC) failed");
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

async fn lead_inner(cfg: &PrimaryConfig, journal: &Arc<JournalClient>, me: &str) -> Result<Never, Stop> {
    let mut renewal = Renewal::new(cfg.lease_ms, cfg.drift_margin_ms);
    // Redis must answer before the lease is taken: a dead or paused Redis
    // must let it lapse.
    let (mut ctl, mut info) = control(cfg).await?;
    let sent_at = monotonic_ms();
    let lease = match journal.take_lease(&cfg.stream, me, last_seq_of(journal, &cfg.stream).await?, cfg.lease_ms).await {
        Ok(l) => l,
        Err(JournalError::Fenced { message, .. }) => return Err(Stop::Fenced(message)),
        Err(e @ JournalError::Rejected { .. }) => return Err(Stop::Fenced(format!("could not take the lease back: {e}"))),
        Err(e) => return Err(retry(e)),
    };
    // Holding the lease, nobody else appends: its last seq is the tail.
    let mut tail = journal_tail(journal, &cfg.stream, lease.last_seq).await?;
    let mut last_seq = tail.as_ref().map(|t| t.0).unwrap_or(0);
    // This round's appends all go over one long-lived stream to the
    // journal leader (opened at the first append).
    let mut session = AppendSession::new(journal.clone());
    if let Some((seq, id, _)) = &tail {
        if id == INCOMPLETE_BASE || id == NO_BASE {
            if id == INCOMPLETE_BASE {
                // Its writer died mid-way: void it; this node's Redis gives the base.
                let void = Record { kind: Kind::RdbAbort, replid: "0".repeat(40), start: 0, end: 0, payload: Vec::new() };
                last_seq = append_record(&mut session, &cfg.stream, me, &void, *seq, cfg.retry_pause_ms).await?.0;
                tracing::warn!(record = last_seq, "voided an unfinished base RDB; journaling a new one");
            }
            tail = None;
        }
    }

    let promoted = info_field(&info, "role") == Some("slave");
    if promoted {
        // A replica fed from the journal, promoted without a fork or a sync.
        ctl.send(&[b"REPLICAOF", b"NO", b"ONE"]).await?;
        let t = Instant::now();
        loop {
            // An error reply counts as answered too: look at it first.
            if let Some(why) = ctl.refused() {
                return Err(retry(format!("Redis refused REPLICAOF NO ONE ({why})")));
            }
            if ctl.all_answered() {
                break;
            }
            if t.elapsed() > Duration::from_millis(cfg.lease_ms) {
                return Err(retry("Redis did not answer REPLICAOF NO ONE"));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tracing::info!("promoted the local Redis (REPLICAOF NO ONE)");
        (ctl, info) = control(cfg).await?;
    }
    let redis_replid = info_field(&info, "master_replid").unwrap_or("").to_string();
    let redis_offset: u64 = info_field(&info, "master_repl_offset").and_then(|o| o.parse().ok()).unwrap_or(0);
    if let Some((seq, _, end)) = &mut tail {
        if redis_offset < *end {
            // Only a replica just promoted can be behind for this reason
            // (the election let it in with every whole command applied); a
            // primary's Redis that restarted with less is not read back for.
            if !(promoted && unfinished_tail(journal, &cfg.stream, *seq, redis_offset, *end).await?) {
                return Err(Stop::LostHistory(format!(
                    "Redis at {} is at offset {redis_offset}, behind the journal's {end}",
                    cfg.redis
                )));
            }
            // The journal ends with an unfinished command (or transaction)
            // of a writer that died: no client was answered for it, and no
            // Redis could apply it. Void it; this Redis continues from here.
            let void = Record { kind: Kind::StreamVoid, replid: redis_replid.clone(), start: redis_offset, end: *end, payload: Vec::new() };
            last_seq = append_record(&mut session, &cfg.stream, me, &void, *seq, cfg.retry_pause_ms).await?.0;
            tracing::warn!(record = last_seq, from = redis_offset, to = *end, "voided the unfinished last command of the previous writer");
            (*seq, *end) = (last_seq, redis_offset);
        }
    }

    if tail.is_none() && !promoted {
        // A new history. Its base is the local Redis's data; when that is
        // empty, the base is an empty RDB journaled here, and Redis syncs
        // it from the journal like any replica (then is promoted): Redis
        // would fork to give it (a full sync), and a Keel primary never
        // forks. A Redis that already holds data still gives its own.
        let keyspace = crate::node::redis_info_section(&cfg.redis, &cfg.control, "keyspace", cfg.lease_ms).await?;
        if !keyspace.lines().any(|l| l.starts_with("db")) {
            let rdb = Record { kind: Kind::Rdb, replid: redis_replid.clone(), start: redis_offset, end: redis_offset, payload: EMPTY_RDB.to_vec() };
            last_seq = append_record(&mut session, &cfg.stream, me, &rdb, last_seq, cfg.retry_pause_ms).await?.0;
            let end = Record { kind: Kind::RdbEnd, replid: redis_replid.clone(), start: redis_offset, end: redis_offset, payload: Vec::new() };
            last_seq = append_record(&mut session, &cfg.stream, me, &end, last_seq, cfg.retry_pause_ms).await?.0;
            tracing::info!(record = last_seq, replid = %redis_replid, offset = redis_offset, "a new history from an empty base; the local Redis syncs it from the journal");
            return Err(Stop::LostHistory("the new history's base is in the journal; the local Redis loads it as a replica, then leads".into()));
        }
        tracing::warn!("a new history whose base is the local Redis's data: Redis forks once to give it");
    }
    // Redis names its replica by `local_ip` instead of asking the kernel
    // on every ROLE/INFO (the module reads ROLE once per turn with writes).
    let (r, mut w, local_ip) = crate::link::connect(&cfg.redis).await.map_err(|e| retry(format!("connect {}: {e}", cfg.redis)))?;
    let mut r = BufReader::with_capacity(1 << 20, r);
    authenticate(&mut r, &mut w, &cfg.control, &cfg.redis).await?;
    command(&mut w, &[b"PING"]).await?;
    let pong = read_line(&mut r).await?;
    if pong.starts_with('-') {
        return Err(Stop::Fatal(format!("Redis refused the replication link: {pong}")));
    }
    command(&mut w, &[b"REPLCONF", b"capa", b"psync2"]).await?;
    read_line(&mut r).await?;
    command(&mut w, &[b"REPLCONF", b"ip-address", local_ip.as_bytes()]).await?;
    read_line(&mut r).await?;
    match &tail {
        // Redis's own id: after a promotion it is new, and continues the
        // journaled bytes (its previous id is kept as replid2).
        Some((_, _, end)) => command(&mut w, &[b"PSYNC", redis_replid.as_bytes(), (end + 1).to_string().as_bytes()]).await?,
        None => command(&mut w, &[b"PSYNC", b"?", b"-1"]).await?,
    }
    let answer = read_line(&mut r).await?;
    let (replid, mut offset) = if let Some(rest) = answer.strip_prefix("+CONTINUE") {
        let end = tail.as_ref().map(|t| t.2).expect("CONTINUE only after a PSYNC with history");
        let replid = rest.trim();
        let replid = if replid.is_empty() { redis_replid.clone() } else { replid.to_string() };
        tracing::info!(%replid, offset = end, "attached to the replication stream (no full sync)");
        (replid, end)
    } else if let Some(rest) = answer.strip_prefix("+FULLRESYNC ") {
        let mut parts = rest.split_whitespace();
        let replid = parts.next().unwrap_or("").to_string();
        let offset: u64 = parts.next().and_then(|o| o.parse().ok()).ok_or_else(|| retry(format!("bad FULLRESYNC {answer:?}")))?;
        if tail.is_some() {
            return Err(Stop::LostHistory(format!(
                "Redis at {} cannot continue the journaled history (it answered a full resync, replid {replid})",
                cfg.redis
            )));
        }
        last_seq = journal_base_rdb(cfg, &mut session, me, &mut r, &replid, offset, last_seq).await?;
        (replid, offset)
    } else {
        return Err(Stop::Fatal(format!("unexpected PSYNC answer from Redis: {answer:?}")));
    };

    // This node leads the stream; everything journaled so far is durable.
    ctl.send(&[b"KEEL.LEADER", me.as_bytes(), cfg.stream.as_bytes()]).await?;
    let mut lease_until = renewal.renewed(sent_at, monotonic_ms());
    ctl.send(&[b"KEEL.LEASE", lease_until.to_string().as_bytes()]).await?;
    let mut lease_notice = ctl.sent();
    ctl.send(&[b"KEEL.ACK", offset.to_string().as_bytes()]).await?;

    let mut pending: Vec<u8> = Vec::new();
    let mut inflight: Option<tokio::task::JoinHandle<(AppendSession, Result<(u64, u64), Stop>)>> = None;
    // The session travels with the append in flight and comes back with it.
    let mut session = Some(session);
    let mut renew = tokio::time::interval(Duration::from_millis(renewal.period_ms()));
    let mut replconf = tokio::time::interval(Duration::from_millis(cfg.replconf_ack_ms));
    let mut buf = vec![0u8; 256 << 10];
    let mut durable = offset;
    let mut merge = Merge::new(Duration::from_micros(cfg.merge_wait_us));
    let mut inflight_since = Instant::now();
    let mut sent_bytes = 0usize;
    // A lease renewal out: (its send time, the call).
    let mut renewing: Option<(u64, AbortOnDrop<Result<(), JournalError>>)> = None;
    // Appends end only where a replica's offset can stand (cuts.rs).
    let mut cuts = Cuts::new(offset);
    let most_per_append = (MAX_APPEND_PAYLOAD_BYTES.min(cfg.max_buffered_bytes)) as u64;
    loop {
        let sendable = if inflight.is_none() { cuts.sendable(MAX_PAYLOAD_BYTES as u64, most_per_append) as usize } else { 0 };
        if sendable > 0 && merge.may_send(sendable, Instant::now()) {
            sent_bytes = sendable;
            let mut recs = Vec::with_capacity(sendable.div_ceil(MAX_PAYLOAD_BYTES));
            let mut left = sendable;
            while left > 0 {
                let n = left.min(MAX_PAYLOAD_BYTES);
                let payload: Vec<u8> = pending.drain(..n).collect();
                recs.push(Record { kind: Kind::Stream, replid: replid.clone(), start: offset, end: offset + n as u64, payload });
                offset += n as u64;
                left -= n;
            }
            cuts.take(sendable as u64);
            inflight_since = Instant::now();
            inflight = Some(tokio::spawn(append_exactly_once(
                session.take().expect("the session is back whenever no append is in flight"),
                cfg.stream.clone(),
                me.to_string(),
                recs,
                last_seq,
                cfg.retry_pause_ms,
            )));
        }
        // While an append is in flight, Redis's bytes wait in the socket and
        // are read in one go when it returns: one read per append instead of
        // one wakeup per event-loop turn of Redis. An append that takes long
        // (journal trouble) does not let Redis's replica buffer grow: reading
        // resumes after `READ_DURING_APPEND_AFTER`.
        let append_young = inflight.is_some() && inflight_since.elapsed() < READ_DURING_APPEND_AFTER;
        let can_read = pending.len() < cfg.max_buffered_bytes && !append_young;
        tokio::select! {
            n = r.read(&mut buf), if can_read => {
                let n = n.map_err(retry)?;
                if n == 0 {
                    return Err(retry("Redis closed the replication link"));
                }
                pending.extend_from_slice(&buf[..n]);
                let was_broken = cuts.broken().is_some();
                cuts.feed(&buf[..n]);
                if let (false, Some(why)) = (was_broken, cuts.broken()) {
                    tracing::error!(%why, "the replication stream is not RESP as expected; appends may now end mid-command");
                }
            }
            done = async { inflight.as_mut().unwrap().await }, if inflight.is_some() => {
                inflight = None;
                let (back, done) = done.map_err(|e| Stop::Fatal(format!("append task failed: {e}")))?;
                session = Some(back);
                let (seq, end) = match done {
                    Ok(v) => v,
                    Err(Stop::Fenced(message)) => {
                        fence(&mut ctl, &message).await;
                        return Err(Stop::Fenced(message));
                    }
                    Err(Stop::Overtaken(message)) => {
                        fence(&mut ctl, &message).await;
                        return Err(Stop::Overtaken(message));
                    }
                    Err(e) => return Err(e),
                };
                last_seq = seq;
                debug_assert!(end >= durable, "durable offset went back");
                durable = end;
                if monotonic_ms() >= lease_until {
                    // The module's lease lapsed (this process was paused, or
                    // renewals were slow): a confirmation now could only
                    // answer KEEL_UNCONFIRMED. A renewal decides first.
                    if ctl.answered_through(lease_notice) {
                        renewal.redis_answered();
                    }
                    if renewing.is_none() && renewal.may_renew(monotonic_ms()) {
                        renewing = Some(start_renewal(journal, &cfg.stream, me));
                    }
                    if let Some((sent_at, mut task)) = renewing.take() {
                        let done = (&mut task.0).await;
                        if let Some((until, notice)) = renewal_done(done, sent_at, &mut renewal, &mut ctl).await? {
                            (lease_until, lease_notice) = (until, notice);
                        }
                    }
                }
                ctl.send(&[b"KEEL.ACK", durable.to_string().as_bytes()]).await?;
                merge.confirmed(sent_bytes, pending.len(), Instant::now());
            }
            _ = tokio::time::sleep_until(merge.deadline().into()), if sendable > 0 && merge.waiting() => {}
            _ = tokio::time::sleep_until((inflight_since + READ_DURING_APPEND_AFTER).into()), if append_young => {}
            _ = renew.tick() => {
                if ctl.answered_through(lease_notice) {
                    renewal.redis_answered();
                }
                if renewing.is_some() {
                    continue; // the previous renewal is still out
                }
                if !renewal.may_renew(monotonic_ms()) {
                    tracing::warn!("the local Redis does not answer; letting the lease lapse");
                    continue;
                }
                // Renewed off the loop: a slow journal (the client retries
                // for seconds) must not hold up confirmations meanwhile.
                renewing = Some(start_renewal(journal, &cfg.stream, me));
            }
            done = async { (&mut renewing.as_mut().unwrap().1.0).await }, if renewing.is_some() => {
                let (sent_at, _) = renewing.take().expect("selected only when renewing");
                if let Some((until, notice)) = renewal_done(done, sent_at, &mut renewal, &mut ctl).await? {
                    (lease_until, lease_notice) = (until, notice);
                }
            }
            _ = replconf.tick() => {
                command(&mut w, &[b"REPLCONF", b"ACK", durable.to_string().as_bytes()]).await?;
            }
            // A refused KEEL.* (an ACL change, say): what it said is said
            // again on a new connection by the next leading round.
            why = ctl.refusal() => {
                return Err(retry(format!("Redis refused a command on the control connection ({why})")));
            }
        }
    }
}

/// A lease renewal, sent now: (its send time, the call).
fn start_renewal(journal: &Arc<JournalClient>, stream: &str, me: &str) -> (u64, AbortOnDrop<Result<(), JournalError>>) {
    let (journal, stream, me) = (journal.clone(), stream.to_string(), me.to_string());
    (monotonic_ms(), AbortOnDrop(tokio::spawn(async move { journal.renew_lease(&stream, &me).await.map(|_| ()) })))
}

/// A renewal sent at `sent_at` finished: on success its deadline goes to
/// the module and (deadline, that notice's number) is returned; FENCED
/// fences the module and stops; other failures are logged (the lease
/// lapses if they go on).
async fn renewal_done(
    done: Result<Result<(), JournalError>, tokio::task::JoinError>,
    sent_at: u64,
    renewal: &mut Renewal,
    ctl: &mut Control,
) -> Result<Option<(u64, u64)>, Stop> {
    match done {
        Ok(Ok(())) => {
            let until = renewal.renewed(sent_at, monotonic_ms());
            ctl.send(&[b"KEEL.LEASE", until.to_string().as_bytes()]).await?;
            Ok(Some((until, ctl.sent())))
        }
        Ok(Err(JournalError::Fenced { message, .. })) => {
            fence(ctl, &message).await;
            Err(Stop::Fenced(message))
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "lease renewal failed");
            Ok(None)
        }
        Err(e) => {
            tracing::warn!(error = %e, "lease renewal task failed");
            Ok(None)
        }
    }
}

/// A task that does not outlive its handle.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Most records (of at most `MAX_PAYLOAD_BYTES`) in one append.
const MAX_RECORDS_PER_APPEND: usize = 14;
/// Most stream bytes one append carries: a command up to this size is
/// journaled whole.
const MAX_APPEND_PAYLOAD_BYTES: usize = MAX_RECORDS_PER_APPEND * MAX_PAYLOAD_BYTES;
// With each record's header (well under 1 KiB), it fits the journal's
// limit for one append.
const _: () = assert!(MAX_APPEND_PAYLOAD_BYTES + MAX_RECORDS_PER_APPEND * 1024 <= keel_journal_client::limits::MAX_APPEND_BYTES);

/// How long an append may be in flight before the replication link is
/// read again meanwhile.
const READ_DURING_APPEND_AFTER: Duration = Duration::from_millis(20);

/// Most confirmations sent on without waiting after waits that ran out.
const MERGE_MAX_BACKOFF: u32 = 64;

/// When the next append may leave after a confirmation (see the module
/// doc). Pure: fed sizes and times, it answers whether to send.
///
/// A wait that runs out (the answered clients did not write again in time:
/// the load is not a closed loop) makes the next confirmations skip waiting,
/// 1, 2, 4… up to `MERGE_MAX_BACKOFF` of them; a wait that fills resets
/// that. So a load that never comes back pays the wait about once per 64
/// appends, and a closed loop pays it only until its groups have merged.
#[derive(Debug)]
struct Merge {
    max_wait: Duration,
    /// Until when, and for how many pending bytes, the next append waits.
    wait: Option<(Instant, usize)>,
    /// Confirmations left to send on without waiting.
    skip: u32,
    /// What `skip` becomes after the next wait that runs out (0: 1).
    backoff: u32,
}

impl Merge {
    fn new(max_wait: Duration) -> Merge {
        Merge { max_wait, wait: None, skip: 0, backoff: 0 }
    }

    /// An append of `confirmed_bytes` was confirmed while `pending_bytes`
    /// were waiting.
    fn confirmed(&mut self, confirmed_bytes: usize, pending_bytes: usize, now: Instant) {
        if self.max_wait.is_zero() {
            return;
        }
        if self.skip > 0 {
            self.skip -= 1;
            return;
        }
        // Writes rarely come back byte for byte: 90% of last time is enough.
        let target = ((confirmed_bytes + pending_bytes) * 9 / 10).min(MAX_PAYLOAD_BYTES);
        self.wait = Some((now + self.max_wait, target));
    }

    /// Whether an append of the `pending_bytes` may leave now.
    fn may_send(&mut self, pending_bytes: usize, now: Instant) -> bool {
        let Some((until, target)) = self.wait else { return true };
        if pending_bytes >= target {
            self.backoff = 0;
        } else if now >= until {
            self.backoff = (self.backoff * 2).clamp(1, MERGE_MAX_BACKOFF);
            self.skip = self.backoff;
        } else {
            return false;
        }
        self.wait = None;
        true
    }

    fn waiting(&self) -> bool {
        self.wait.is_some()
    }

    /// When the current wait ends (now if none).
    fn deadline(&self) -> Instant {
        self.wait.map(|(until, _)| until).unwrap_or_else(Instant::now)
    }
}

/// A control connection and `INFO replication`, within the lease.
async fn control(cfg: &PrimaryConfig) -> Result<(Control, String), Stop> {
    match tokio::time::timeout(Duration::from_millis(cfg.lease_ms), Control::connect(&cfg.redis, &cfg.control)).await {
        Ok(r) => r,
        Err(_) => Err(retry(format!("Redis at {} did not answer within {} ms", cfg.redis, cfg.lease_ms))),
    }
}

async fn last_seq_of(journal: &JournalClient, stream: &str) -> Result<u64, Stop> {
    match journal.stream_info(stream).await {
        Ok(i) => Ok(i.last_seq),
        Err(JournalError::Rejected { kind: keel_journal_client::errors::Rejection::UnknownStream, .. }) => Ok(0),
        Err(e) => Err(retry(e)),
    }
}

/// Tells the module it lost the primary role; best effort.
async fn fence(ctl: &mut Control, why: &str) {
    let _ = ctl.send(&[b"KEEL.FENCED", why.as_bytes()]).await;
}

/// Journals the base RDB of a fresh history after record `after_seq` (0,
/// or an `RdbAbort`); returns the last seq.
async fn journal_base_rdb(
    cfg: &PrimaryConfig,
    session: &mut AppendSession,
    me: &str,
    r: &mut BufReader<OwnedReadHalf>,
    replid: &str,
    offset: u64,
    after_seq: u64,
) -> Result<u64, Stop> {
    let header = read_line(r).await?;
    let len: usize = header
        .strip_prefix('$')
        .and_then(|l| l.parse().ok())
        .ok_or_else(|| Stop::Fatal(format!("unexpected RDB header {header:?} (diskless EOF-marked sync is not supported)")))?;
    let mut left = len;
    let mut last_seq = after_seq;
    while left > 0 {
        let n = left.min(MAX_PAYLOAD_BYTES);
        let mut chunk = vec![0u8; n];
        r.read_exact(&mut chunk).await.map_err(retry)?;
        left -= n;
        let rec = Record { kind: Kind::Rdb, replid: replid.into(), start: offset, end: offset, payload: chunk };
        last_seq = append_record(session, &cfg.stream, me, &rec, last_seq, cfg.retry_pause_ms).await?.0;
    }
    let end = Record { kind: Kind::RdbEnd, replid: replid.into(), start: offset, end: offset, payload: Vec::new() };
    let (seq, _) = append_record(session, &cfg.stream, me, &end, last_seq, cfg.retry_pause_ms).await?;
    tracing::info!(%replid, offset, rdb_bytes = len, "journaled the base RDB of a new history");
    Ok(seq)
}

/// `append_record` as a task of its own: it takes the session and gives it
/// back with the result.
async fn append_exactly_once(
    mut session: AppendSession,
    stream: String,
    me: String,
    recs: Vec<Record>,
    after_seq: u64,
    retry_pause_ms: u64,
) -> (AppendSession, Result<(u64, u64), Stop>) {
    let t0 = Instant::now();
    let result = append_records(&mut session, &stream, &me, &recs, after_seq, retry_pause_ms).await;
    if result.is_ok() {
        crate::metrics::get().append_seconds.observe(t0.elapsed().as_secs_f64());
    }
    (session, result)
}

/// Appends `rec` as record `after_seq + 1`; see `append_records`.
async fn append_record(
    session: &mut AppendSession,
    stream: &str,
    me: &str,
    rec: &Record,
    after_seq: u64,
    retry_pause_ms: u64,
) -> Result<(u64, u64), Stop> {
    append_records(session, stream, me, std::slice::from_ref(rec), after_seq, retry_pause_ms).await
}

/// Appends `recs` (contiguous, at least one) in one append, as records
/// `after_seq + 1..`, retrying through unknown outcomes; returns (last seq,
/// end offset).
async fn append_records(
    session: &mut AppendSession,
    stream: &str,
    me: &str,
    recs: &[Record],
    after_seq: u64,
    retry_pause_ms: u64,
) -> Result<(u64, u64), Stop> {
    let last = recs.last().expect("an append carries a record");
    let all: Vec<Vec<u8>> = recs.iter().map(Record::encode).collect();
    let bytes = &all[0];
    let mut full_since: Option<Instant> = None;
    loop {
        match session.append(stream, me, all.clone(), Some(after_seq)).await {
            Ok(seq) => {
                if let Some(t) = full_since {
                    tracing::info!(waited_ms = t.elapsed().as_millis() as u64, "the journal stream has room again");
                }
                return Ok((seq, last.end));
            }
            Err(JournalError::Fenced { message, .. }) => return Err(Stop::Fenced(message)),
            Err(e @ JournalError::Rejected { .. }) if e.rejection() == Some(&keel_journal_client::errors::Rejection::SeqMismatch) => {
                // An earlier attempt whose outcome was unknown may have landed.
                let mut reader = session.client().read(stream, after_seq + 1, false);
                let landed = match reader.next_batch().await {
                    Ok(Some(batch)) => batch.first().map(|r| r.payload.as_ref() == bytes.as_slice()).unwrap_or(false),
                    _ => false,
                };
                // One append lands whole or not at all: its first record
                // (replid, offsets and bytes) tells.
                if landed {
                    return Ok((after_seq + recs.len() as u64, last.end));
                }
                return Err(Stop::Overtaken(format!("stream {stream} moved past seq {after_seq} without this node: {e}")));
            }
            Err(e @ (JournalError::OutcomeUnknown(_) | JournalError::Unavailable(_))) => {
                tracing::warn!(error = %e, "append not confirmed; retrying");
                tokio::time::sleep(Duration::from_millis(retry_pause_ms)).await;
            }
            Err(e @ JournalError::Rejected { .. }) if e.rejection() == Some(&keel_journal_client::errors::Rejection::StreamFull) => {
                // Back-pressure, not a failure: nothing was appended, and the
                // snapshotter's next trim makes room. Writes stay held (the
                // module answers those past its write timeout as unconfirmed);
                // the lease is renewed meanwhile.
                full_since.get_or_insert_with(|| {
                    tracing::warn!(error = %e, "the journal stream is full: appends wait for a snapshot to trim it");
                    Instant::now()
                });
                tokio::time::sleep(Duration::from_millis(STREAM_FULL_RETRY_MS)).await;
            }
            Err(e) => return Err(Stop::Fatal(format!("append refused: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn control_replies_are_counted_and_the_first_error_kept() {
        let mut r = ControlReplies::default();
        assert!(!r.feed(b"+OK\r\n+O"));
        assert_eq!((r.answered, r.refused.as_deref()), (1, None));
        assert!(!r.feed(b"K\r\n-NOPERM this user has no "));
        assert_eq!(r.answered, 2, "an unfinished line is not a reply yet");
        assert!(r.feed(b"permissions to run the 'keel.ack' command\r\n+OK\r\n"));
        assert_eq!(r.answered, 4);
        assert_eq!(r.refused.as_deref(), Some("reply 3: NOPERM this user has no permissions to run the 'keel.ack' command"));
        assert!(!r.feed(b"-ERR later\r\n"), "only the first error is reported");
        assert_eq!(r.refused.as_deref().map(|s| s.starts_with("reply 3:")), Some(true));
        // A '-' inside a line is not an error.
        let mut r = ControlReplies::default();
        r.feed(b"+a-b\r\n:-1\r\n");
        assert_eq!((r.answered, r.refused), (2, None));
    }

    proptest! {
        /// However the replies are cut into reads, the count and the first
        /// error are the same, and a huge error line keeps a bounded text.
        #[test]
        fn control_replies_do_not_depend_on_how_reads_split(
            lines in prop::collection::vec((any::<bool>(), prop::collection::vec(32u8..127, 0..700)), 0..20),
            cuts in prop::collection::vec(1usize..64, 1..40),
        ) {
            let mut bytes = Vec::new();
            for (err, text) in &lines {
                let text: Vec<u8> = text.iter().copied().filter(|b| *b != b'-').collect();
                bytes.push(if *err { b'-' } else { b'+' });
                bytes.extend_from_slice(&text);
                bytes.extend_from_slice(b"\r\n");
            }
            let mut whole = ControlReplies::default();
            whole.feed(&bytes);
            let mut pieces = ControlReplies::default();
            let (mut at, mut i) = (0, 0);
            while at < bytes.len() {
                let n = cuts[i % cuts.len()].min(bytes.len() - at);
                pieces.feed(&bytes[at..at + n]);
                at += n;
                i += 1;
            }
            prop_assert_eq!(whole.answered, lines.len() as u64);
            prop_assert_eq!(pieces.answered, whole.answered);
            prop_assert_eq!(&pieces.refused, &whole.refused);
            let first = lines.iter().position(|(err, _)| *err);
            prop_assert_eq!(whole.refused.is_some(), first.is_some());
            if let Some(why) = &whole.refused {
                let prefix = format!("reply {}: ", first.unwrap() + 1);
                prop_assert!(why.starts_with(&prefix), "{why:?} does not start with {prefix:?}");
                prop_assert!(why.len() <= MAX_REFUSAL_BYTES + 16);
            }
        }
    }

    #[test]
    fn a_lone_client_is_never_held_back() {
        let t0 = Instant::now();
        let mut m = Merge::new(Duration::from_micros(500));
        assert!(m.may_send(50, t0));
        m.confirmed(50, 0, t0);
        // Its next write is as large as the last one: it leaves at once.
        assert!(m.may_send(50, t0 + Duration::from_micros(30)));
    }

    #[test]
    fn answered_clients_join_the_waiting_ones() {
        let t0 = Instant::now();
        let mut m = Merge::new(Duration::from_micros(500));
        // 25 writes confirmed while 25 others (1250 bytes) waited.
        m.confirmed(1250, 1250, t0);
        assert!(!m.may_send(1250, t0), "the waiting group alone does not leave");
        assert!(!m.may_send(2000, t0 + Duration::from_micros(100)));
        assert!(m.may_send(2250, t0 + Duration::from_micros(200)), "most of both groups leave together");
        assert!(!m.waiting());
    }

    #[test]
    fn the_wait_is_bounded() {
        let t0 = Instant::now();
        let mut m = Merge::new(Duration::from_micros(500));
        m.confirmed(5000, 0, t0);
        assert!(!m.may_send(10, t0 + Duration::from_micros(499)));
        assert_eq!(m.deadline(), t0 + Duration::from_micros(500));
        assert!(m.may_send(10, t0 + Duration::from_micros(500)));
    }

    #[test]
    fn waits_that_run_out_back_off_and_a_filled_one_resets() {
        let t0 = Instant::now();
        let ms = Duration::from_millis(1);
        let mut m = Merge::new(ms);
        let mut waits = 0;
        // 200 confirmations whose clients never come back: the wait runs out
        // after 1, 2, 4 … 64 confirmations sent on at once.
        for i in 0..200u32 {
            let now = t0 + ms * (i * 3);
            m.confirmed(1000, 0, now);
            if m.waiting() {
                waits += 1;
                assert!(!m.may_send(10, now));
                assert!(m.may_send(10, now + ms));
            } else {
                assert!(m.may_send(10, now));
            }
        }
        assert_eq!(waits, 9, "waits at confirmations 0, 2, 5, 10, 19, 36, 69, 134, 199: {m:?}");
        // Once the skips are used up, a wait that fills resets the back-off.
        let mut now = t0 + ms * 1000;
        while !m.waiting() {
            m.confirmed(1000, 0, now);
            now += ms;
        }
        assert!(m.may_send(900, now));
        m.confirmed(1000, 0, now);
        assert!(m.waiting(), "no skip after a wait that filled");
    }

    #[test]
    fn zero_wait_never_holds_back() {
        let t0 = Instant::now();
        let mut m = Merge::new(Duration::ZERO);
        m.confirmed(5000, 5000, t0);
        assert!(!m.waiting());
        assert!(m.may_send(1, t0));
    }

    #[test]
    fn the_target_never_exceeds_one_record() {
        let t0 = Instant::now();
        let mut m = Merge::new(Duration::from_micros(500));
        m.confirmed(MAX_PAYLOAD_BYTES, MAX_PAYLOAD_BYTES, t0);
        assert!(m.may_send(MAX_PAYLOAD_BYTES, t0));
    }
}
