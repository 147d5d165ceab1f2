//! The primary's sidecar: attaches to its Redis as a replica (PSYNC), appends
//! the replication stream to the journal as the stream's leader, and tells
//! the module (`KEEL.ACK`) how far the journal holds it.
//!
//! Life cycle of one leading round (`lead`): connect the control
//! connection (Redis must answer before the lease is taken) → take the
//! lease → read the journal's tail (`Tail`) and make the stream one this
//! Redis can continue (void an unfinished base or last command, journal a
//! new base) → attach the replication link (`PSYNC`, redis.rs) → `run`:
//! the leading loop, whose decisions are leader.rs's (`Leader`) and whose
//! I/O is here: read the link, append to the journal, renew the lease,
//! send `KEEL.*` on the control connection. The round ends with a `Stop`
//! that node.rs acts on.
//!
//! Invariants:
//! - the journal holds the stream contiguously: each record starts at the
//!   previous record's end offset (checked before every append with
//!   `expect_last_seq`), so no byte is journaled twice or skipped; a
//!   restart resumes with `PSYNC <replid> <end+1>` from the last record,
//!   with no full sync (no fork);
//! - `KEEL.ACK o` is sent only after the append covering `o` succeeded (the
//!   journal fsync'd it on a quorum); group commit, the merge wait, retries
//!   and the lease cadence are leader.rs's;
//! - each append ends where a replica's offset can stand: after a whole
//!   command, outside MULTI/EXEC (`Cuts`, cuts.rs), so a journal whose
//!   writer died is always one a replica can be caught up on (a command
//!   larger than `leader::MAX_APPEND_PAYLOAD_BYTES` is the one exception);
//! - `FENCED` from the journal: the module is told (`KEEL.FENCED`), every
//!   held write fails, and the node goes back to following (node.rs);
//! - the renewal in flight is a task aborted when the loop ends, so no
//!   renewal outlives this node's leading;
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

use crate::auth::Credentials;
use crate::clock::monotonic_ms;
use crate::clock::monotonic_us;
use crate::cuts::Cuts;
use crate::engine::Engine;
use crate::engine::Writer;
use crate::handover;
use crate::handover::Handing;
use crate::leader::Action;
use crate::leader::AfterAppend;
use crate::leader::AppendOutcome;
use crate::leader::Event;
use crate::leader::Leader;
use crate::leader::Limits;
use crate::link::RedisAddr;
use crate::record::Kind;
use crate::record::MAX_PAYLOAD_BYTES;
use crate::record::ReadOneError;
use crate::record::Record;
use crate::redis::Conn;
use crate::redis::WriteHalf;
use crate::redis::info_field;
use crate::resp::Reply;

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
    /// How long a handover's record stands before writes pause, so every
    /// replica has read it (its poll period and a margin: handover.rs).
    pub handover_notice_ms: u64,
}

/// Shortest and longest lease accepted.
pub const MIN_LEASE_MS: u64 = 100;
pub const MAX_LEASE_MS: u64 = 60_000;
/// The drift margin is at most this fraction (1/n) of the lease.
pub const MAX_DRIFT_MARGIN_FRACTION: u64 = 4;
/// Longest merge wait accepted.
pub const MAX_MERGE_WAIT_US: u64 = 100_000;

impl PrimaryConfig {
    pub fn validate(&self) -> Result<(), String> {
        crate::link::client_address(&self.redis, Some(&self.announce))?;
        if self.stream.is_empty() {
            return Err("--stream must not be empty".into());
        }
        if !(MIN_LEASE_MS..=MAX_LEASE_MS).contains(&self.lease_ms) {
            return Err(format!("--lease-ms {} must be {MIN_LEASE_MS}..={MAX_LEASE_MS}", self.lease_ms));
        }
        if self.drift_margin_ms * MAX_DRIFT_MARGIN_FRACTION > self.lease_ms {
            return Err(format!("--drift-margin-ms {} must be at most 1/{MAX_DRIFT_MARGIN_FRACTION} of --lease-ms", self.drift_margin_ms));
        }
        if self.merge_wait_us > MAX_MERGE_WAIT_US {
            return Err(format!("--merge-wait-us {} must be at most {MAX_MERGE_WAIT_US}", self.merge_wait_us));
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
    /// A graceful handover passed the lease to another node (handover.rs):
    /// this node follows.
    #[error("handed over: {0}")]
    HandedOver(String),
    /// A handover was given up after writes paused: this node takes its
    /// lease back at once and leads again (which lifts the pause).
    #[error("handover abandoned: {0}")]
    HandoverAbandoned(String),
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

/// Stream bytes read from the replication link at once.
const READ_CHUNK_BYTES: usize = 256 << 10;
/// How often a promotion (`REPLICAOF NO ONE`) is checked for its answer.
const REPLICAOF_POLL: Duration = Duration::from_millis(2);

/// An RDB with no key: the base of a new history whose Redis is empty.
/// Version 9 (every supported server reads it); a zero checksum means
/// "not computed" to the loader.
const EMPTY_RDB: &[u8] = b"REDIS0009\xff\0\0\0\0\0\0\0\0";

/// Where the journaled history ends: the stream's last record `seq`, and
/// the offset the stream bytes end at.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Tail {
    seq: u64,
    end: u64,
    base: Base,
}

/// What the stream's last record says of the history's base.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Base {
    /// A whole base (and any stream after it): a history to continue.
    Whole,
    /// The stream ends inside a base RDB whose writer died (no write can
    /// have been acknowledged on such a stream): void it, give a new one.
    Incomplete,
    /// The last record voids a base: the stream holds no history yet.
    Voided,
}

/// The replid of a record that voids a base (it names no history).
const VOID_BASE_REPLID: &str = "0000000000000000000000000000000000000000";

/// Where the journaled history ends, given the stream's last seq (as the
/// lease reported it); `None` for an empty stream.
async fn journal_tail(journal: &JournalClient, stream: &str, last_seq: u64) -> Result<Option<Tail>, Stop> {
    if last_seq == 0 {
        return Ok(None);
    }
    let rec = read_record(journal, stream, last_seq).await?;
    Ok(Some(tail_of(last_seq, &rec)))
}

/// The tail a last record `seq` makes.
fn tail_of(seq: u64, rec: &Record) -> Tail {
    match rec.kind {
        Kind::Rdb => Tail { seq, end: rec.end, base: Base::Incomplete },
        // Nothing after an abort: the stream holds no history yet.
        Kind::RdbAbort => Tail { seq, end: rec.end, base: Base::Voided },
        // The stream was cut back to the void's start.
        Kind::StreamVoid => Tail { seq, end: rec.start, base: Base::Whole },
        _ => Tail { seq, end: rec.end, base: Base::Whole },
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
/// single replies (`KEEL.*`, `REPLICAOF`), counted so the lease renewal can
/// tell whether Redis still answers. An error reply is kept (`refused`):
/// a refused `KEEL.ACK` would leave the writes it covers held until their
/// timeout, so the leading loop restarts on one and says it again. A
/// connection that ends counts as refused too.
pub struct Control {
    w: WriteHalf,
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

/// The replies of a control connection, fed one by one. Pure: counts them
/// and keeps the first error (with its reply number, 1-based, its text
/// capped at `MAX_REFUSAL_BYTES`).
#[derive(Debug, Default)]
struct ControlReplies {
    answered: u64,
    refused: Option<String>,
}

impl ControlReplies {
    /// Takes a reply; returns true when it is the first error.
    fn reply(&mut self, reply: &Reply) -> bool {
        self.answered += 1;
        match reply {
            Reply::Error(e) if self.refused.is_none() => {
                let mut text = e.clone();
                if text.len() > MAX_REFUSAL_BYTES {
                    let mut cut = MAX_REFUSAL_BYTES;
                    while !text.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    text.truncate(cut);
                }
                self.refused = Some(format!("reply {}: {text}", self.answered));
                true
            }
            _ => false,
        }
    }

    /// The connection ended (closed, or a reply that is not RESP).
    fn ended(&mut self, why: &str) -> bool {
        if self.refused.is_some() {
            return false;
        }
        self.refused = Some(format!("the control connection ended after {} replies: {why}", self.answered));
        true
    }
}

impl Control {
    pub async fn connect(redis: &RedisAddr, creds: &Credentials) -> Result<(Control, String), Stop> {
        let mut conn = Conn::connect(redis, creds).await.map_err(Stop::Retry)?;
        // INFO first, read whole, before replies are only counted: its
        // replication state, and its engine (stamped on every record).
        let info = conn.info("server replication").await.map_err(Stop::Retry)?;
        let (mut r, w) = conn.split();
        let replies = Arc::new(SharedReplies::default());
        let shared = replies.clone();
        tokio::spawn(async move {
            loop {
                let reply = r.reply().await;
                let mut seen = shared.seen.lock().unwrap();
                let found = match &reply {
                    Ok(reply) => seen.reply(reply),
                    Err(e) => seen.ended(e),
                };
                if found {
                    let why = seen.refused.clone().unwrap_or_default();
                    drop(seen);
                    tracing::error!(%why, "Redis refused a command on the control connection");
                    shared.refused.notify_one();
                }
                if reply.is_err() {
                    return;
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
        self.w.send(args).await.map_err(Stop::Retry)
    }

    /// Whether every command sent so far was answered.
    pub fn all_answered(&self) -> bool {
        self.answered_through(self.sent)
    }

    /// Whether the first `n` commands sent were answered (replies come in
    /// order). Under load some `KEEL.ACK` is always in flight, so liveness
    /// is judged by one command's reply, not by all of them.
    pub fn answered_through(&self, n: u64) -> bool {
        self.answered() >= n
    }

    /// How many commands Redis answered so far.
    pub fn answered(&self) -> u64 {
        self.replies.seen.lock().unwrap().answered
    }

    /// How many commands were sent so far.
    pub fn sent(&self) -> u64 {
        self.sent
    }
}


/// One leading round: the lease, a stream this Redis can continue, the
/// replication link, then the leading loop (`run`).
async fn lead_inner(cfg: &PrimaryConfig, journal: &Arc<JournalClient>, me: &str) -> Result<Never, Stop> {
    // Redis must answer before the lease is taken: a dead or paused Redis
    // must let it lapse.
    let (mut ctl, mut info) = control(cfg).await?;
    // The engine every record of this round names (engine.rs): it cannot
    // change without a restart of the server, which ends the round.
    let writer = Engine::from_info(&info).as_ref().and_then(Writer::of);
    if writer.is_none() {
        tracing::warn!("INFO server names no engine this sidecar knows; this round's records name no writer (replicas check nothing)");
    }
    let sent_at = monotonic_ms();
    let lease = match journal.take_lease(&cfg.stream, me, last_seq_of(journal, &cfg.stream).await?, cfg.lease_ms).await {
        Ok(l) => l,
        Err(JournalError::Fenced { message, .. }) => return Err(Stop::Fenced(message)),
        Err(e @ JournalError::Rejected { .. }) => return Err(Stop::Fenced(format!("could not take the lease back: {e}"))),
        Err(e) => return Err(retry(e)),
    };
    // Holding the lease, nobody else appends: its last seq is the tail.
    let tail = journal_tail(journal, &cfg.stream, lease.last_seq).await?;
    let mut last_seq = tail.as_ref().map(|t| t.seq).unwrap_or(0);
    // This round's appends all go over one long-lived stream to the
    // journal leader (opened at the first append).
    let mut session = AppendSession::new(journal.clone());
    // The history to continue, if the stream holds one.
    let mut tail = match tail {
        Some(Tail { seq, base: Base::Incomplete, .. }) => {
            // Its writer died mid-way: void it; this node's Redis gives the base.
            let void = Record { kind: Kind::RdbAbort, replid: VOID_BASE_REPLID.into(), start: 0, end: 0, payload: Vec::new(), writer };
            last_seq = append_record(&mut session, &cfg.stream, me, &void, seq, cfg.retry_pause_ms).await?;
            tracing::warn!(record = last_seq, "voided an unfinished base RDB; journaling a new one");
            None
        }
        Some(Tail { base: Base::Voided, .. }) => None,
        whole => whole,
    };

    let promoted = info_field(&info, "role") == Some("slave");
    if promoted {
        (ctl, info) = promote(cfg, ctl).await?;
    }
    let redis_replid = info_field(&info, "master_replid").unwrap_or("").to_string();
    let redis_offset: u64 = info_field(&info, "master_repl_offset").and_then(|o| o.parse().ok()).unwrap_or(0);
    if let Some(Tail { seq, end, .. }) = &mut tail {
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
            let void = Record { kind: Kind::StreamVoid, replid: redis_replid.clone(), start: redis_offset, end: *end, payload: Vec::new(), writer };
            last_seq = append_record(&mut session, &cfg.stream, me, &void, *seq, cfg.retry_pause_ms).await?;
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
            let rdb = Record { kind: Kind::Rdb, replid: redis_replid.clone(), start: redis_offset, end: redis_offset, payload: EMPTY_RDB.to_vec(), writer };
            last_seq = append_record(&mut session, &cfg.stream, me, &rdb, last_seq, cfg.retry_pause_ms).await?;
            let end = Record { kind: Kind::RdbEnd, replid: redis_replid.clone(), start: redis_offset, end: redis_offset, payload: Vec::new(), writer };
            last_seq = append_record(&mut session, &cfg.stream, me, &end, last_seq, cfg.retry_pause_ms).await?;
            tracing::info!(record = last_seq, replid = %redis_replid, offset = redis_offset, "a new history from an empty base; the local Redis syncs it from the journal");
            return Err(Stop::LostHistory("the new history's base is in the journal; the local Redis loads it as a replica, then leads".into()));
        }
        tracing::warn!("a new history whose base is the local Redis's data: Redis forks once to give it");
    }
    let (link, replid, offset) = attach(cfg, tail.as_ref().map(|t| t.end), &redis_replid).await?;
    let (link, last_seq) = match link {
        Link::Continue(link) => (link, last_seq),
        Link::FullSync(mut link) => {
            let last_seq = journal_base_rdb(cfg, &mut session, me, &mut link, &replid, offset, last_seq, writer).await?;
            (link, last_seq)
        }
    };

    run(cfg, journal, me, Attached { ctl, link, replid, offset, last_seq, session, lease_sent_at_ms: sent_at, writer }).await
}

/// Promotes the local Redis, a replica fed from the journal, without a
/// fork or a sync (`REPLICAOF NO ONE`, within the lease); returns a new
/// control connection and `INFO server replication` after it.
async fn promote(cfg: &PrimaryConfig, mut ctl: Control) -> Result<(Control, String), Stop> {
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
        tokio::time::sleep(REPLICAOF_POLL).await;
    }
    tracing::info!("promoted the local Redis (REPLICAOF NO ONE)");
    control(cfg).await
}

/// The replication link after `PSYNC`.
enum Link {
    /// Redis continues the journaled history: the stream follows.
    Continue(Conn),
    /// Redis gives a base RDB (a new history): the RDB follows, then the
    /// stream.
    FullSync(Conn),
}

/// Attaches to the local Redis as its replica: `PSYNC` from the journal's
/// end `end` if it holds a history (Redis's own id `redis_replid`: after a
/// promotion it is new, and continues the journaled bytes, its previous id
/// kept as replid2), else a full sync. Returns the link, the stream's
/// replid and the offset the stream continues from. A Redis that cannot
/// continue the journaled history is `Stop::LostHistory`.
async fn attach(cfg: &PrimaryConfig, end: Option<u64>, redis_replid: &str) -> Result<(Link, String, u64), Stop> {
    let mut link = Conn::connect(&cfg.redis, &cfg.control).await.map_err(Stop::Retry)?;
    if let Reply::Error(e) = link.request(&[b"PING"]).await.map_err(Stop::Retry)? {
        return Err(Stop::Fatal(format!("Redis refused the replication link: -{e}")));
    }
    link.request(&[b"REPLCONF", b"capa", b"psync2"]).await.map_err(Stop::Retry)?;
    // Redis names its replica by `local_ip` instead of asking the kernel
    // on every ROLE/INFO (the module reads ROLE once per turn with writes).
    let local_ip = link.local_ip().to_string();
    link.request(&[b"REPLCONF", b"ip-address", local_ip.as_bytes()]).await.map_err(Stop::Retry)?;
    match end {
        Some(end) => link.send(&[b"PSYNC", redis_replid.as_bytes(), (end + 1).to_string().as_bytes()]).await,
        None => link.send(&[b"PSYNC", b"?", b"-1"]).await,
    }
    .map_err(Stop::Retry)?;
    let answer = match link.reply().await.map_err(Stop::Retry)? {
        Reply::Status(s) => format!("+{s}"),
        Reply::Error(e) => format!("-{e}"),
        other => format!("{other:?}"),
    };
    if let Some(rest) = answer.strip_prefix("+CONTINUE") {
        let end = end.expect("CONTINUE only after a PSYNC with history");
        let replid = rest.trim();
        let replid = if replid.is_empty() { redis_replid.to_string() } else { replid.to_string() };
        tracing::info!(%replid, offset = end, "attached to the replication stream (no full sync)");
        Ok((Link::Continue(link), replid, end))
    } else if answer.starts_with("+FULLRESYNC ") {
        let (replid, offset) = crate::redis::full_resync(&answer[1..]).ok_or_else(|| retry(format!("bad FULLRESYNC {answer:?}")))?;
        if end.is_some() {
            return Err(Stop::LostHistory(format!(
                "Redis at {} cannot continue the journaled history (it answered a full resync, replid {replid})",
                cfg.redis
            )));
        }
        Ok((Link::FullSync(link), replid, offset))
    } else {
        Err(Stop::Fatal(format!("unexpected PSYNC answer from Redis: {answer:?}")))
    }
}

/// What the leading loop starts from: Redis attached as a replica at
/// `offset` (stream id `replid`), the journal holding everything before it
/// through record `last_seq`, and the lease taken at `lease_sent_at_ms`.
struct Attached {
    ctl: Control,
    /// The replication link, past the `PSYNC` answer (and any base RDB).
    link: Conn,
    replid: String,
    offset: u64,
    last_seq: u64,
    session: AppendSession,
    lease_sent_at_ms: u64,
    /// The engine the records name.
    writer: Option<Writer>,
}

/// The leading loop's I/O (its decisions are leader.rs's): waits on the
/// replication link, the append in flight, the renewal in flight, the
/// leader's timer and the control connection's refusals; feeds what came
/// to the `Leader` and performs what it answers.
async fn run(cfg: &PrimaryConfig, journal: &Arc<JournalClient>, me: &str, a: Attached) -> Result<Never, Stop> {
    let Attached { mut ctl, link, replid, offset, last_seq, session, lease_sent_at_ms, writer } = a;
    let (mut r, mut w) = link.split();
    // This node leads the stream; everything journaled so far is durable.
    ctl.send(&[b"KEEL.LEADER", me.as_bytes(), cfg.stream.as_bytes()]).await?;
    let limits = Limits {
        lease_ms: cfg.lease_ms,
        drift_margin_ms: cfg.drift_margin_ms,
        max_buffered_bytes: cfg.max_buffered_bytes,
        merge_wait_us: cfg.merge_wait_us,
        replconf_ack_ms: cfg.replconf_ack_ms,
        retry_pause_ms: cfg.retry_pause_ms,
    };
    let (mut leader, mut step) = Leader::start(limits, replid, writer, offset, last_seq, lease_sent_at_ms, ctl.sent(), monotonic_us());
    // The session travels with the append in flight and comes back with it.
    let mut session = Some(session);
    let mut appending: Option<tokio::task::JoinHandle<(AppendSession, AppendOutcome)>> = None;
    let mut append_started = Instant::now();
    let mut renewing: Option<AbortOnDrop<Result<(), JournalError>>> = None;
    let mut answered = 0u64;
    let mut buf = vec![0u8; READ_CHUNK_BYTES];
    // Graceful handover (handover.rs): requests polled from the module and
    // the outcomes of its steps arrive here.
    let (hv_tx, mut hv_rx) = tokio::sync::mpsc::unbounded_channel::<handover::Event>();
    let _requests = AbortOnDrop(tokio::spawn(handover::watch_requests(cfg.clone(), journal.clone(), me.to_string(), hv_tx.clone())));
    let mut handing: Option<Handing> = None;
    let mut paused_at = Instant::now();
    loop {
        for action in std::mem::take(&mut step.actions) {
            match action {
                Action::Append { records, expect_last_seq, attempt } => {
                    if attempt == 1 {
                        append_started = Instant::now();
                    }
                    let s = session.take().expect("the session is back whenever no append is in flight");
                    let (stream, me) = (cfg.stream.clone(), me.to_string());
                    appending = Some(tokio::spawn(async move {
                        let mut s = s;
                        let outcome = append_once(&mut s, &stream, &me, &records, expect_last_seq).await;
                        (s, outcome)
                    }));
                }
                Action::StartRenewal => {
                    // Renewed off the loop: a slow journal (the client
                    // retries for seconds) must not hold up confirmations.
                    let (journal, stream, me) = (journal.clone(), cfg.stream.clone(), me.to_string());
                    renewing = Some(AbortOnDrop(tokio::spawn(async move { journal.renew_lease(&stream, &me).await.map(|_| ()) })));
                }
                Action::Ack(o) => ctl.send(&[b"KEEL.ACK", o.to_string().as_bytes()]).await?,
                Action::Lease(until) => ctl.send(&[b"KEEL.LEASE", until.to_string().as_bytes()]).await?,
                Action::Fenced(why) => fence(&mut ctl, &why).await,
                Action::ReplconfAck(o) => w.send(&[b"REPLCONF", b"ACK", o.to_string().as_bytes()]).await.map_err(Stop::Retry)?,
                Action::Stop(stop) => return Err(stop),
            }
        }
        assert_eq!(ctl.sent(), leader.control_sent(), "the control connection carries what the leader decided, no more");
        // The handover's own step, once the leader's actions went out.
        if let Some(h) = handing.as_mut() {
            let next = h.tick(leader.acked(), monotonic_ms());
            let (stop, done) = handover_step(cfg, journal, &hv_tx, &mut paused_at, h, next).await;
            if let Some(stop) = stop {
                return Err(stop);
            }
            if done {
                handing = None;
            }
        }
        // The leader always asks for a wake-up while it leads.
        let wake_us = match handing.as_ref().and_then(|h| h.wake_at_ms()) {
            Some(ms) => Some(step.wake_at_us.map_or(ms * 1_000, |t| t.min(ms * 1_000))),
            None => step.wake_at_us,
        };
        let wake = wake_us.map(|t| tokio::time::Instant::now() + Duration::from_micros(t.saturating_sub(monotonic_us())));
        let came = tokio::select! {
            n = r.read(&mut buf), if step.read => Came::Read(n),
            done = async { appending.as_mut().unwrap().await }, if appending.is_some() => Came::Appended(Box::new(done)),
            done = async { (&mut renewing.as_mut().unwrap().0).await }, if renewing.is_some() => Came::Renewed(done),
            _ = tokio::time::sleep_until(wake.unwrap_or_else(tokio::time::Instant::now)), if wake.is_some() => Came::Timer,
            why = ctl.refusal() => Came::Refused(why),
            Some(ev) = hv_rx.recv() => Came::Handover(ev),
        };
        let event = match came {
            Came::Read(Ok(0)) => Event::LinkClosed("Redis closed the replication link".into()),
            Came::Read(Ok(n)) => Event::Bytes(&buf[..n]),
            Came::Read(Err(e)) => Event::LinkClosed(e.to_string()),
            Came::Appended(done) => {
                appending = None;
                let (back, outcome) = (*done).map_err(|e| Stop::Fatal(format!("append task failed: {e}")))?;
                session = Some(back);
                if let AppendOutcome::Confirmed { .. } = outcome {
                    crate::metrics::get().append_seconds.observe(append_started.elapsed().as_secs_f64());
                }
                Event::Appended(outcome)
            }
            Came::Renewed(done) => {
                renewing = None;
                match done {
                    Ok(Ok(())) => Event::RenewalDone,
                    Ok(Err(JournalError::Fenced { message, .. })) => Event::RenewalFenced(message),
                    Ok(Err(e)) => Event::RenewalFailed(e.to_string()),
                    Err(e) => Event::RenewalFailed(format!("the renewal task failed: {e}")),
                }
            }
            Came::Timer => Event::Timer,
            Came::Handover(ev) => {
                let now_ms = monotonic_ms();
                let next = match (ev, handing.as_mut()) {
                    (handover::Event::Request(plan), None) => {
                        let (h, first) = Handing::start(plan, me, cfg.handover_notice_ms, handover::now_unix_ms());
                        if let handover::Action::Announce(r) = &first {
                            handover::poll_fast_until(r.until_unix_ms);
                        }
                        handing = Some(h);
                        Some(first)
                    }
                    (handover::Event::Request(plan), Some(_)) => {
                        tracing::warn!(?plan, "a handover request while one is under way; ignored");
                        None
                    }
                    (handover::Event::Announced(r), Some(h)) => h.announced(r, now_ms),
                    (handover::Event::Paused(r), Some(h)) => h.paused(r, now_ms),
                    (ev, None) => {
                        tracing::debug!(?ev, "a handover step's outcome after it ended");
                        None
                    }
                };
                if let Some(h) = handing.as_mut() {
                    let (stop, done) = handover_step(cfg, journal, &hv_tx, &mut paused_at, h, next).await;
                    if let Some(stop) = stop {
                        return Err(stop);
                    }
                    if done {
                        handing = None;
                    }
                }
                Event::Timer
            }
            // A refused KEEL.* (an ACL change, say).
            Came::Refused(why) => Event::ControlRefused(why),
        };
        let now = monotonic_us();
        let mut actions = Vec::new();
        if ctl.answered() != answered {
            answered = ctl.answered();
            actions = leader.handle(Event::ControlAnswered(answered), now).actions;
        }
        step = leader.handle(event, now);
        actions.append(&mut step.actions);
        step.actions = actions;
    }
}

/// What woke the leading loop up.
enum Came {
    Read(std::io::Result<usize>),
    Appended(Box<Result<(AppendSession, AppendOutcome), tokio::task::JoinError>>),
    Renewed(Result<Result<(), JournalError>, tokio::task::JoinError>),
    Timer,
    Refused(String),
    Handover(handover::Event),
}

/// Carries out one of the handover's actions (handover.rs): its I/O runs
/// in a task whose outcome comes back as an event, except the release,
/// which ends the round. Returns the round's end, if any, and whether the
/// handover is over.
async fn handover_step(
    cfg: &PrimaryConfig,
    journal: &Arc<JournalClient>,
    tx: &tokio::sync::mpsc::UnboundedSender<handover::Event>,
    paused_at: &mut Instant,
    h: &Handing,
    action: Option<handover::Action>,
) -> (Option<Stop>, bool) {
    match action {
        None => (None, false),
        Some(handover::Action::Announce(record)) => {
            let (journal, stream, tx) = (journal.clone(), cfg.stream.clone(), tx.clone());
            tokio::spawn(async move {
                let r = handover::announce(&journal, &stream, &record).await;
                let _ = tx.send(handover::Event::Announced(r));
            });
            (None, false)
        }
        Some(handover::Action::Pause) => {
            let (cfg2, tx) = (cfg.clone(), tx.clone());
            *paused_at = Instant::now();
            tokio::spawn(async move {
                let r = handover::pause(&cfg2).await;
                let _ = tx.send(handover::Event::Paused(r));
            });
            (None, false)
        }
        Some(handover::Action::Release) => (Some(handover::release(cfg, journal, h.me(), &h.plan, *paused_at).await), true),
        Some(handover::Action::GiveUp(why)) => {
            tracing::warn!(%why, "handover given up; still the primary");
            handover::finish(cfg, &format!("given up: {why}"), None).await;
            (None, true)
        }
        Some(handover::Action::Abandon(why)) => {
            handover::finish(cfg, &format!("abandoned: {why}"), None).await;
            (Some(Stop::HandoverAbandoned(why)), true)
        }
    }
}

/// A spawned task that ends when this is dropped.
pub(crate) struct AbortOnDrop<T>(pub(crate) tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A control connection and `INFO server replication`, within the lease.
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
/// or an `RdbAbort`), its records naming `writer`; returns the last seq.
#[allow(clippy::too_many_arguments)]
async fn journal_base_rdb(
    cfg: &PrimaryConfig,
    session: &mut AppendSession,
    me: &str,
    link: &mut Conn,
    replid: &str,
    offset: u64,
    after_seq: u64,
    writer: Option<Writer>,
) -> Result<u64, Stop> {
    let header = link.bulk_header().await.map_err(Stop::Retry)?;
    let len: usize = header
        .strip_prefix('$')
        .and_then(|l| l.parse().ok())
        .ok_or_else(|| Stop::Fatal(format!("unexpected RDB header {header:?} (diskless EOF-marked sync is not supported)")))?;
    let mut left = len;
    let mut last_seq = after_seq;
    while left > 0 {
        let n = left.min(MAX_PAYLOAD_BYTES);
        let mut chunk = vec![0u8; n];
        link.read_exact(&mut chunk).await.map_err(Stop::Retry)?;
        left -= n;
        let rec = Record { kind: Kind::Rdb, replid: replid.into(), start: offset, end: offset, payload: chunk, writer };
        last_seq = append_record(session, &cfg.stream, me, &rec, last_seq, cfg.retry_pause_ms).await?;
    }
    let end = Record { kind: Kind::RdbEnd, replid: replid.into(), start: offset, end: offset, payload: Vec::new(), writer };
    let seq = append_record(session, &cfg.stream, me, &end, last_seq, cfg.retry_pause_ms).await?;
    tracing::info!(%replid, offset, rdb_bytes = len, "journaled the base RDB of a new history");
    Ok(seq)
}

/// Appends `rec` as record `after_seq + 1`; see `append_records`.
async fn append_record(session: &mut AppendSession, stream: &str, me: &str, rec: &Record, after_seq: u64, retry_pause_ms: u64) -> Result<u64, Stop> {
    append_records(session, stream, me, std::slice::from_ref(rec), after_seq, retry_pause_ms).await
}

/// Appends `recs` (contiguous, at least one) in one append, as records
/// `after_seq + 1..`, sending it again through unknown outcomes and a full
/// stream (`AppendOutcome::next` decides, as in the leading loop); returns
/// the last seq. For the appends before the leading loop (bases, voids).
pub(crate) async fn append_records(session: &mut AppendSession, stream: &str, me: &str, recs: &[Record], after_seq: u64, retry_pause_ms: u64) -> Result<u64, Stop> {
    assert!(!recs.is_empty(), "an append carries a record");
    let all: Vec<Vec<u8>> = recs.iter().map(Record::encode).collect();
    let mut full_since: Option<Instant> = None;
    loop {
        let outcome = append_once(session, stream, me, &all, after_seq).await;
        match &outcome {
            AppendOutcome::Unknown(e) => tracing::warn!(error = %e, "append not confirmed; retrying"),
            AppendOutcome::StreamFull(e) => {
                full_since.get_or_insert_with(|| {
                    tracing::warn!(error = %e, "the journal stream is full: appends wait for a snapshot to trim it");
                    Instant::now()
                });
            }
            _ => {}
        }
        match outcome.next(retry_pause_ms) {
            AfterAppend::Done { last_seq } => {
                if let Some(t) = full_since {
                    tracing::info!(waited_ms = t.elapsed().as_millis() as u64, "the journal stream has room again");
                }
                return Ok(last_seq);
            }
            AfterAppend::RetryAfterMs(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
            AfterAppend::Stop(stop) => return Err(stop),
        }
    }
}

/// One attempt to append `records` (encoded, at least one) as the records
/// after `after_seq`. A `SeqMismatch` is resolved here: an earlier attempt
/// whose outcome was unknown may have landed, and one append lands whole or
/// not at all, so its first record (replid, offsets and bytes) tells.
async fn append_once(session: &mut AppendSession, stream: &str, me: &str, records: &[Vec<u8>], after_seq: u64) -> AppendOutcome {
    use keel_journal_client::errors::Rejection;
    match session.append(stream, me, records.to_vec(), Some(after_seq)).await {
        Ok(seq) => AppendOutcome::Confirmed { last_seq: seq },
        Err(JournalError::Fenced { message, .. }) => AppendOutcome::Fenced(message),
        Err(e @ JournalError::Rejected { .. }) if e.rejection() == Some(&Rejection::SeqMismatch) => {
            let mut reader = session.client().read(stream, after_seq + 1, false);
            let landed = match reader.next_batch().await {
                Ok(Some(batch)) => batch.first().is_some_and(|r| r.payload.as_ref() == records[0].as_slice()),
                _ => false,
            };
            if landed {
                AppendOutcome::Confirmed { last_seq: after_seq + records.len() as u64 }
            } else {
                AppendOutcome::Overtaken(format!("stream {stream} moved past seq {after_seq} without this node: {e}"))
            }
        }
        Err(e @ (JournalError::OutcomeUnknown(_) | JournalError::Unavailable(_))) => AppendOutcome::Unknown(e.to_string()),
        Err(e @ JournalError::Rejected { .. }) if e.rejection() == Some(&Rejection::StreamFull) => AppendOutcome::StreamFull(e.to_string()),
        Err(e) => AppendOutcome::Refused(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_says_where_the_history_ends_and_whether_it_has_a_base() {
        let rec = |kind, start, end| Record { kind, replid: "a".repeat(40), start, end, payload: Vec::new(), writer: None };
        assert_eq!(tail_of(9, &rec(Kind::Stream, 100, 150)), Tail { seq: 9, end: 150, base: Base::Whole });
        assert_eq!(tail_of(9, &rec(Kind::RdbEnd, 100, 100)), Tail { seq: 9, end: 100, base: Base::Whole });
        assert_eq!(tail_of(9, &rec(Kind::StreamVoid, 120, 150)), Tail { seq: 9, end: 120, base: Base::Whole }, "cut back to the void's start");
        assert_eq!(tail_of(9, &rec(Kind::Rdb, 100, 100)).base, Base::Incomplete);
        assert_eq!(tail_of(9, &rec(Kind::RdbAbort, 0, 0)).base, Base::Voided);
        assert_eq!(VOID_BASE_REPLID.len(), 40);
    }

    #[test]
    fn control_replies_are_counted_and_the_first_error_kept() {
        let mut r = ControlReplies::default();
        assert!(!r.reply(&Reply::Status("OK".into())));
        assert!(!r.reply(&Reply::Int(1)));
        assert!(r.reply(&Reply::Error("NOPERM this user has no permissions to run the 'keel.ack' command".into())));
        assert_eq!(r.answered, 3);
        assert_eq!(r.refused.as_deref(), Some("reply 3: NOPERM this user has no permissions to run the 'keel.ack' command"));
        assert!(!r.reply(&Reply::Error("ERR later".into())), "only the first error is reported");
        assert!(!r.ended("closed"), "nor an end after it");
        assert_eq!(r.answered, 4);
        assert!(r.refused.as_deref().unwrap().starts_with("reply 3:"));
        // A huge error keeps a bounded text, cut on a character boundary.
        let mut r = ControlReplies::default();
        assert!(r.reply(&Reply::Error("é".repeat(MAX_REFUSAL_BYTES))));
        assert!(r.refused.as_ref().unwrap().len() <= MAX_REFUSAL_BYTES + 16);
        // An end is a refusal when nothing was refused before.
        let mut r = ControlReplies::default();
        r.reply(&Reply::Status("OK".into()));
        assert!(r.ended("Redis at x closed the connection"));
        assert_eq!(r.refused.as_deref(), Some("the control connection ended after 1 replies: Redis at x closed the connection"));
    }
}
