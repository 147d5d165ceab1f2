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
//! - one append in flight at a time; bytes arriving meanwhile form the next
//!   record (group commit). An append whose outcome is unknown is retried
//!   with `expect_last_seq`, so it lands exactly once;
//! - `FENCED` from the journal: the module is told (`KEEL.FENCED`), every
//!   held write fails, and the sidecar stops.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use keel_journal::client::JournalClient;
use keel_journal::client::JournalError;
use tokio::io::AsyncBufReadExt;
use tokio::io::AsyncReadExt;
use tokio::io::AsyncWriteExt;
use tokio::io::BufReader;
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::tcp::OwnedWriteHalf;

use crate::record::Kind;
use crate::record::MAX_PAYLOAD_BYTES;
use crate::record::Record;
use crate::resp::encode_command;

/// Every bound of the primary sidecar.
#[derive(Debug, Clone)]
pub struct PrimaryConfig {
    pub redis: String,
    pub journal: String,
    pub stream: String,
    pub state_dir: PathBuf,
    pub lease_ms: u64,
    /// Stream bytes read ahead of the journal before reading pauses.
    pub max_buffered_bytes: usize,
    /// How often the replica link reports its offset to Redis.
    pub replconf_ack_ms: u64,
    /// Pause before retrying an unavailable journal or a lost Redis link.
    pub retry_pause_ms: u64,
}

impl PrimaryConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !self.redis.contains(':') {
            return Err(format!("--redis {:?} must be host:port", self.redis));
        }
        if self.stream.is_empty() {
            return Err("--stream must not be empty".into());
        }
        if !(100..=60_000).contains(&self.lease_ms) {
            return Err(format!("--lease-ms {} must be 100..=60000", self.lease_ms));
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

/// Runs until fenced or a fatal error; reconnects after retryable ones.
pub async fn run(cfg: PrimaryConfig) -> Stop {
    let me = match node_uuid(&cfg.state_dir) {
        Ok(u) => u,
        Err(e) => return Stop::Fatal(format!("state dir {}: {e}", cfg.state_dir.display())),
    };
    let journal = match JournalClient::from_list(&cfg.journal) {
        Ok(j) => Arc::new(j),
        Err(e) => return Stop::Fatal(e.to_string()),
    };
    tracing::info!(uuid = %me, stream = %cfg.stream, "primary sidecar starting");
    loop {
        match run_once(&cfg, &journal, &me).await {
            Stop::Retry(why) => {
                tracing::warn!(%why, "reconnecting");
                tokio::time::sleep(Duration::from_millis(cfg.retry_pause_ms)).await;
            }
            stop => return stop,
        }
    }
}

/// Where the journaled history ends, given the stream's last seq (as the
/// lease reported it): (seq, replid, end offset).
async fn journal_tail(journal: &JournalClient, stream: &str, last_seq: u64) -> Result<Option<(u64, String, u64)>, Stop> {
    if last_seq == 0 {
        return Ok(None);
    }
    let mut reader = journal.read(stream, last_seq, false);
    let batch = reader.next_batch().await.map_err(retry)?.unwrap_or_default();
    let rec = batch.into_iter().find(|r| r.seq == last_seq).ok_or_else(|| retry("last record not readable yet"))?;
    let rec = Record::decode(&rec.payload)
        .map_err(|e| Stop::Fatal(format!("stream {stream} record {last_seq} is not a Keel record: {e}")))?;
    if rec.kind == Kind::Rdb {
        return Err(Stop::Fatal(format!(
            "stream {stream} ends inside a base RDB (record {last_seq}); it cannot be resumed"
        )));
    }
    Ok(Some((last_seq, rec.replid, rec.end)))
}

async fn take_lease(cfg: &PrimaryConfig, journal: &JournalClient, me: &str) -> Result<u64, Stop> {
    let deadline = Instant::now() + Duration::from_millis(cfg.lease_ms * 5 + 5_000);
    loop {
        let last_seq = match journal.stream_info(&cfg.stream).await {
            Ok(i) => i.last_seq,
            Err(JournalError::Rejected { kind, .. }) if kind == "unknown-stream" => 0,
            Err(e) => return Err(retry(e)),
        };
        match journal.take_lease(&cfg.stream, me, last_seq, cfg.lease_ms).await {
            Ok(l) => {
                tracing::info!(deadline_unix_ms = l.deadline_unix_ms, last_seq = l.last_seq, "lease taken");
                return Ok(l.last_seq);
            }
            Err(e @ JournalError::Rejected { .. }) if e.kind() == "lease-held" || e.kind() == "not-caught-up" => {
                if Instant::now() > deadline {
                    return Err(Stop::Fatal(format!("could not take the lease of {}: {e}", cfg.stream)));
                }
                tracing::info!(reason = %e, "waiting for the lease");
                tokio::time::sleep(Duration::from_millis(cfg.lease_ms / 4)).await;
            }
            Err(e) => return Err(retry(e)),
        }
    }
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

async fn run_once(cfg: &PrimaryConfig, journal: &Arc<JournalClient>, me: &str) -> Stop {
    match run_once_inner(cfg, journal, me).await {
        Ok(never) => match never {},
        Err(stop) => stop,
    }
}

enum Never {}

async fn run_once_inner(cfg: &PrimaryConfig, journal: &Arc<JournalClient>, me: &str) -> Result<Never, Stop> {
    // Holding the lease, nobody else appends: its last seq is the tail.
    let last_seq = take_lease(cfg, journal, me).await?;
    let tail = journal_tail(journal, &cfg.stream, last_seq).await?;
    let mut last_seq = tail.as_ref().map(|t| t.0).unwrap_or(0);

    let repl = TcpStream::connect(&cfg.redis).await.map_err(|e| retry(format!("connect {}: {e}", cfg.redis)))?;
    repl.set_nodelay(true).map_err(retry)?;
    let (r, mut w) = repl.into_split();
    let mut r = BufReader::with_capacity(1 << 20, r);
    command(&mut w, &[b"PING"]).await?;
    let pong = read_line(&mut r).await?;
    if pong.starts_with('-') {
        return Err(Stop::Fatal(format!("Redis refused the replication link: {pong}")));
    }
    command(&mut w, &[b"REPLCONF", b"capa", b"psync2"]).await?;
    read_line(&mut r).await?;
    match &tail {
        Some((_, replid, end)) => {
            command(&mut w, &[b"PSYNC", replid.as_bytes(), (end + 1).to_string().as_bytes()]).await?
        }
        None => command(&mut w, &[b"PSYNC", b"?", b"-1"]).await?,
    }
    let answer = read_line(&mut r).await?;
    let (replid, mut offset) = if let Some(rest) = answer.strip_prefix("+CONTINUE") {
        let (old_replid, end) = tail.clone().map(|t| (t.1, t.2)).expect("CONTINUE only after a PSYNC with history");
        let replid = rest.trim();
        let replid = if replid.is_empty() { old_replid } else { replid.to_string() };
        tracing::info!(%replid, offset = end, "resumed the replication stream (no full sync)");
        (replid, end)
    } else if let Some(rest) = answer.strip_prefix("+FULLRESYNC ") {
        let mut parts = rest.split_whitespace();
        let replid = parts.next().unwrap_or("").to_string();
        let offset: u64 = parts.next().and_then(|o| o.parse().ok()).ok_or_else(|| retry(format!("bad FULLRESYNC {answer:?}")))?;
        if tail.is_some() {
            return Err(Stop::Fatal(format!(
                "Redis at {} cannot continue the journaled history (it answered a full resync, replid {replid}); \
                 it lost its replication history. Refusing to overwrite the journal.",
                cfg.redis
            )));
        }
        last_seq = journal_base_rdb(cfg, journal, me, &mut r, &replid, offset).await?;
        (replid, offset)
    } else {
        return Err(Stop::Fatal(format!("unexpected PSYNC answer from Redis: {answer:?}")));
    };

    let ctl = TcpStream::connect(&cfg.redis).await.map_err(retry)?;
    ctl.set_nodelay(true).map_err(retry)?;
    let (ctl_r, mut ctl_w) = ctl.into_split();
    // Replies to KEEL.ACK are read and dropped so the socket never fills.
    tokio::spawn(async move {
        let mut ctl_r = ctl_r;
        let mut sink = vec![0u8; 4096];
        while matches!(ctl_r.read(&mut sink).await, Ok(n) if n > 0) {}
    });
    // This node leads the stream; everything journaled so far is durable.
    command(&mut ctl_w, &[b"KEEL.LEADER", me.as_bytes(), cfg.stream.as_bytes()]).await?;
    command(&mut ctl_w, &[b"KEEL.ACK", offset.to_string().as_bytes()]).await?;

    let mut pending: Vec<u8> = Vec::new();
    let mut inflight: Option<tokio::task::JoinHandle<Result<(u64, u64), Stop>>> = None;
    let mut renew = tokio::time::interval(Duration::from_millis(cfg.lease_ms / 3));
    let mut replconf = tokio::time::interval(Duration::from_millis(cfg.replconf_ack_ms));
    let mut buf = vec![0u8; 256 << 10];
    let mut durable = offset;
    loop {
        if inflight.is_none() && !pending.is_empty() {
            let take = pending.len().min(MAX_PAYLOAD_BYTES);
            let payload: Vec<u8> = pending.drain(..take).collect();
            let rec = Record { kind: Kind::Stream, replid: replid.clone(), start: offset, end: offset + take as u64, payload };
            offset = rec.end;
            inflight = Some(tokio::spawn(append_exactly_once(
                journal.clone(),
                cfg.stream.clone(),
                me.to_string(),
                rec,
                last_seq,
                cfg.retry_pause_ms,
            )));
        }
        let can_read = pending.len() < cfg.max_buffered_bytes;
        tokio::select! {
            n = r.read(&mut buf), if can_read => {
                let n = n.map_err(retry)?;
                if n == 0 {
                    return Err(retry("Redis closed the replication link"));
                }
                pending.extend_from_slice(&buf[..n]);
            }
            done = async { inflight.as_mut().unwrap().await }, if inflight.is_some() => {
                inflight = None;
                let (seq, end) = match done.map_err(|e| Stop::Fatal(format!("append task failed: {e}")))? {
                    Ok(v) => v,
                    Err(Stop::Fenced(message)) => {
                        fence(&mut ctl_w, &message).await;
                        return Err(Stop::Fenced(message));
                    }
                    Err(e) => return Err(e),
                };
                last_seq = seq;
                debug_assert!(end >= durable, "durable offset went back");
                durable = end;
                command(&mut ctl_w, &[b"KEEL.ACK", durable.to_string().as_bytes()]).await?;
            }
            _ = renew.tick() => {
                match journal.renew_lease(&cfg.stream, me).await {
                    Ok(_) => {}
                    Err(JournalError::Fenced { message, .. }) => {
                        fence(&mut ctl_w, &message).await;
                        return Err(Stop::Fenced(message));
                    }
                    Err(e) => tracing::warn!(error = %e, "lease renewal failed"),
                }
            }
            _ = replconf.tick() => {
                command(&mut w, &[b"REPLCONF", b"ACK", durable.to_string().as_bytes()]).await?;
            }
        }
    }
}

/// Tells the module it lost the primary role; best effort.
async fn fence(ctl_w: &mut OwnedWriteHalf, why: &str) {
    let _ = ctl_w.write_all(&encode_command(&[b"KEEL.FENCED", why.as_bytes()])).await;
}

/// Journals the base RDB of a fresh history; returns the last seq.
async fn journal_base_rdb(
    cfg: &PrimaryConfig,
    journal: &Arc<JournalClient>,
    me: &str,
    r: &mut BufReader<OwnedReadHalf>,
    replid: &str,
    offset: u64,
) -> Result<u64, Stop> {
    let header = read_line(r).await?;
    let len: usize = header
        .strip_prefix('$')
        .and_then(|l| l.parse().ok())
        .ok_or_else(|| Stop::Fatal(format!("unexpected RDB header {header:?} (diskless EOF-marked sync is not supported)")))?;
    let mut left = len;
    let mut last_seq = 0;
    while left > 0 {
        let n = left.min(MAX_PAYLOAD_BYTES);
        let mut chunk = vec![0u8; n];
        r.read_exact(&mut chunk).await.map_err(retry)?;
        left -= n;
        let rec = Record { kind: Kind::Rdb, replid: replid.into(), start: offset, end: offset, payload: chunk };
        last_seq = append_exactly_once(journal.clone(), cfg.stream.clone(), me.into(), rec, last_seq, cfg.retry_pause_ms)
            .await?
            .0;
    }
    let end = Record { kind: Kind::RdbEnd, replid: replid.into(), start: offset, end: offset, payload: Vec::new() };
    let (seq, _) = append_exactly_once(journal.clone(), cfg.stream.clone(), me.into(), end, last_seq, cfg.retry_pause_ms).await?;
    tracing::info!(%replid, offset, rdb_bytes = len, "journaled the base RDB of a new history");
    Ok(seq)
}

/// Appends `rec` as record `after_seq + 1`, retrying through unknown
/// outcomes; returns (seq, end offset).
async fn append_exactly_once(
    journal: Arc<JournalClient>,
    stream: String,
    me: String,
    rec: Record,
    after_seq: u64,
    retry_pause_ms: u64,
) -> Result<(u64, u64), Stop> {
    let bytes = rec.encode();
    loop {
        match journal.append(&stream, &me, vec![bytes.clone()], Some(after_seq)).await {
            Ok(seq) => return Ok((seq, rec.end)),
            Err(JournalError::Fenced { message, .. }) => return Err(Stop::Fenced(message)),
            Err(e @ JournalError::Rejected { .. }) if e.kind() == "seq-mismatch" => {
                // An earlier attempt whose outcome was unknown may have landed.
                let mut reader = journal.read(&stream, after_seq + 1, false);
                let landed = match reader.next_batch().await {
                    Ok(Some(batch)) => batch.first().map(|r| r.payload.as_ref() == bytes.as_slice()).unwrap_or(false),
                    _ => false,
                };
                if landed {
                    return Ok((after_seq + 1, rec.end));
                }
                return Err(Stop::Fatal(format!("stream {stream} moved past seq {after_seq} without this node: {e}")));
            }
            Err(e @ (JournalError::OutcomeUnknown(_) | JournalError::Unavailable(_))) => {
                tracing::warn!(error = %e, "append not confirmed; retrying");
                tokio::time::sleep(Duration::from_millis(retry_pause_ms)).await;
            }
            Err(e) => return Err(Stop::Fatal(format!("append refused: {e}"))),
        }
    }
}
