//! Adopting a running Redis: a stock redis-server (no module) already
//! serving a dataset becomes the source of a new Keel stream, then hands
//! its primary role to a Keel node, with its clients' writes paused only
//! for the switch.
//!
//! Invariant: every write the running Redis acknowledged is in the journal
//! before any Keel node may take the primary role, and the running Redis
//! accepts no write after that (it is made a read-only replica of nobody
//! first), so no acknowledged write is lost and at most one primary takes
//! writes.
//!
//! Life cycle (`run`):
//! ```text
//!  take the new stream's lease (the stream must be empty)
//!   → the `handover` record says "adopting" (handover.rs): while it stands,
//!     no node stands for election, whatever the lease; discovery names the
//!     running Redis as the primary (this process's member entry)
//!   → full sync from the running Redis (`PSYNC ? -1`: it forks once, as
//!     for any new replica): its RDB is saved, loaded into a private server
//!     (`DEBUG DIGEST`: it loads, and the digest is the snapshot's), and
//!     published as the stream's first snapshot, at the record the base's
//!     `RdbEnd` gets; meanwhile the replication stream is spooled to disk
//!     (at most `max_spool_bytes`)
//!   → `RdbEnd` journaled (the base is the snapshot: no RDB bytes in the
//!     journal), then the spool, then the live stream, each append ending
//!     at a whole command (cuts.rs), as a primary's sidecar does
//!   → on the switch file: wait for a node caught up with the journal →
//!     `CLIENT PAUSE WRITE` → the journal holds the offset the pause stands
//!     at → the running Redis becomes a replica of itself with
//!     `replica-serve-stale-data no` (it never takes a write again; its
//!     clients get errors at once and rediscover) → `CLIENT UNPAUSE` →
//!     handover record "any" → the lease released → a caught-up node takes
//!     it (the ordinary, journal-checked `take-lease`) → the running Redis
//!     is shut down (unless kept).
//! ```
//! Before the fence, any failure unpauses the running Redis and the
//! adoption goes on; after it, the running Redis stays read-only and the
//! first node to catch up takes the lease (the handover record expires).
//! A process that dies between the fence and the handover record leaves
//! the nodes out of elections: `keel-sidecar adopt --finish-fenced` (same
//! work dir) checks the running Redis is fenced and finishes the switch.
//! The decisions of the switch are `Switch`'s (pure, tested); the I/O is
//! `run`'s.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use keel_journal_client::client::AppendSession;
use keel_journal_client::client::JournalClient;
use keel_journal_client::client::JournalError;
use sha2::Digest;
use sha2::Sha256;
use tokio::io::AsyncReadExt;
use tokio::io::AsyncWriteExt;

use crate::cuts::Cuts;
use crate::engine::Engine;
use crate::handover::HandoverRecord;
use crate::handover::now_unix_ms;
use crate::link::RedisAddr;
use crate::node::Member;
use crate::primary::AbortOnDrop;
use crate::record::Kind;
use crate::record::MAX_PAYLOAD_BYTES;
use crate::record::Record;
use crate::redis::Conn;
use crate::redis::info_field;
use crate::resp::Reply;
use crate::snapshot::SNAPSHOT_META_KEY;
use crate::snapshot::SnapshotMeta;
use crate::snapshot::SnapshotStore;
use crate::snapshot::StreamSum;

/// Every bound of an adoption.
#[derive(Debug, Clone)]
pub struct AdoptConfig {
    /// The running Redis (host:port).
    pub redis: RedisAddr,
    /// Its address as clients reach it (discovery names it until the switch).
    pub announce: String,
    /// A user of the running Redis allowed `PSYNC`, `INFO`, `CLIENT PAUSE`,
    /// `CONFIG SET`, `REPLICAOF` and `SHUTDOWN`, and a file holding its
    /// password (none: the default user without a password).
    pub redis_user: Option<String>,
    pub redis_password_file: Option<PathBuf>,
    pub journal: String,
    pub journal_tls: keel_journal_client::tls::JournalTls,
    pub stream: String,
    /// The deployment's snapshot store.
    pub store: String,
    /// The server binary of the private server the base is checked in.
    pub redis_server: PathBuf,
    /// This adoption's files: its identity, the base RDB, the spool.
    pub work_dir: PathBuf,
    /// Its presence starts the switch.
    pub switch_file: PathBuf,
    pub lease_ms: u64,
    /// Longest the running Redis's writes stay paused at the switch before
    /// the switch is given up (and they resume there).
    pub pause_ms: u64,
    /// Stream bytes spooled to disk while the base is published.
    pub max_spool_bytes: u64,
    /// Stream bytes read ahead of the journal before reading pauses.
    pub max_buffered_bytes: usize,
    pub retry_pause_ms: u64,
    /// Leave the running Redis up (read-only) after the switch.
    pub keep_old: bool,
}

/// The longest pause accepted: past it, clients of the running Redis time out.
pub const MAX_PAUSE_MS: u64 = 30_000;
/// How long after the lease's release a node must have taken it.
pub const TAKEOVER_MS: u64 = 10_000;
/// A node is caught up when its Redis is at most this far behind the
/// journal's end (what a turn of writes adds meanwhile).
pub const READY_SLACK_BYTES: u64 = 1 << 20;
/// How long a switch waits for a node caught up with the journal before it
/// is given up (the adoption goes on; the switch may be asked again).
pub const READY_WAIT_MS: u64 = 600_000;
/// Where a given-up switch says why (in the work dir), for the caller.
pub const SWITCH_FAILED_FILE: &str = "switch.failed";
/// How often the loop looks at the switch file and the lease.
const TICK_MS: u64 = 50;
/// How often a switch looks for a caught-up node (each look reads the
/// members and asks each node's Redis).
const READY_CHECK_MS: u64 = 250;
/// How often the running Redis is told how far this replica got.
const REPLCONF_ACK_MS: u64 = 1_000;
/// Bytes read from the running Redis at once.
const READ_CHUNK_BYTES: usize = 256 << 10;
/// Records per append.
const RECORDS_PER_APPEND: usize = 8;

impl AdoptConfig {
    pub fn validate(&self) -> Result<(), String> {
        crate::link::client_address(&self.redis, Some(&self.announce))?;
        if self.stream.is_empty() {
            return Err("--stream must not be empty".into());
        }
        if !(crate::primary::MIN_LEASE_MS..=crate::primary::MAX_LEASE_MS).contains(&self.lease_ms) {
            return Err(format!("--lease-ms {} must be {}..={}", self.lease_ms, crate::primary::MIN_LEASE_MS, crate::primary::MAX_LEASE_MS));
        }
        if !(1_000..=MAX_PAUSE_MS).contains(&self.pause_ms) {
            return Err(format!("--pause-ms {} must be 1000..={MAX_PAUSE_MS}", self.pause_ms));
        }
        if self.max_buffered_bytes < MAX_PAYLOAD_BYTES {
            return Err(format!("--max-buffered-bytes must be at least {MAX_PAYLOAD_BYTES}"));
        }
        if self.redis_user.is_some() != self.redis_password_file.is_some() {
            return Err("give --redis-user and --redis-password-file together".into());
        }
        Ok(())
    }
}

/// Where the switch stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Switch {
    /// No switch asked for yet.
    Idle,
    /// Asked at `since_ms`: waiting for a node caught up with the journal
    /// (at most `READY_WAIT_MS`).
    WaitingForNode { since_ms: u64 },
    /// Writes paused at `target` (the running Redis's offset then) since
    /// `paused_at_ms`: appending until the journal holds it.
    Draining { target: u64, paused_at_ms: u64 },
    /// The journal holds everything acknowledged: fence the running Redis.
    Fence,
    /// Given up before the fence: unpause, go on adopting.
    GiveUp(String),
}

impl Switch {
    /// The switch file appeared (or is still there).
    pub fn asked(&mut self, now_ms: u64) {
        if *self == Switch::Idle {
            *self = Switch::WaitingForNode { since_ms: now_ms };
        }
    }

    /// Whether it waits for a caught-up node (the caller looks for one, and
    /// pauses then calls `paused` when it finds one); past `READY_WAIT_MS`
    /// of waiting it gives up instead.
    pub fn node_ready(&mut self, now_ms: u64) -> bool {
        let Switch::WaitingForNode { since_ms } = *self else { return false };
        if now_ms.saturating_sub(since_ms) > READY_WAIT_MS {
            *self = Switch::GiveUp(format!("no node caught up with the journal within {READY_WAIT_MS} ms; writes never paused"));
            return false;
        }
        true
    }

    pub fn paused(&mut self, target: u64, now_ms: u64) {
        *self = Switch::Draining { target, paused_at_ms: now_ms };
    }

    /// The journal now ends at `journaled`: fence once it holds the target;
    /// give up when the pause would lapse first (half of it: the rest is
    /// for the fence and the unpause).
    pub fn journaled(&mut self, journaled: u64, now_ms: u64, pause_ms: u64) {
        if let Switch::Draining { target, paused_at_ms } = *self {
            if journaled >= target {
                *self = Switch::Fence;
            } else if now_ms.saturating_sub(paused_at_ms) > pause_ms / 2 {
                *self = Switch::GiveUp(format!(
                    "the journal reached offset {journaled}, not the paused Redis's {target}, within {} ms; writes resume there",
                    pause_ms / 2
                ));
            }
        }
    }
}

/// Whether a node whose Redis reports this `INFO replication` is caught up
/// with a journal ending at `journaled`.
pub fn caught_up(info: &str, journaled: u64) -> bool {
    let offset: Option<u64> = info_field(info, "master_repl_offset").and_then(|o| o.parse().ok());
    info_field(info, "role") == Some("slave")
        && info_field(info, "master_link_status") == Some("up")
        && offset.is_some_and(|o| o + READY_SLACK_BYTES >= journaled)
}

/// A connection to the running Redis, authenticated if configured.
async fn connect(cfg: &AdoptConfig) -> Result<Conn, String> {
    let mut c = Conn::open(&cfg.redis).await?;
    if let (Some(user), Some(file)) = (&cfg.redis_user, &cfg.redis_password_file) {
        let password = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
        match c.request(&[b"AUTH", user.as_bytes(), password.trim_end().as_bytes()]).await? {
            Reply::Status(_) => {}
            other => return Err(format!("the running Redis at {} refused AUTH as {user}: {other:?}", cfg.redis)),
        }
    }
    Ok(c)
}

/// One command to the running Redis; an error reply is an error.
async fn command(c: &mut Conn, args: &[&str]) -> Result<Reply, String> {
    let words: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
    match tokio::time::timeout(Duration::from_secs(10), c.request(&words)).await {
        Ok(Ok(Reply::Error(e))) => Err(format!("{} answered -{e}", args.join(" "))),
        Ok(r) => r,
        Err(_) => Err(format!("{} was not answered within 10 s", args.join(" "))),
    }
}

/// Adopts the running Redis; returns what happened at the switch.
pub async fn run(cfg: AdoptConfig) -> Result<String, String> {
    cfg.validate()?;
    tokio::fs::create_dir_all(&cfg.work_dir).await.map_err(|e| format!("{}: {e}", cfg.work_dir.display()))?;
    let me = crate::primary::node_uuid(&cfg.work_dir.join("id")).map_err(|e| format!("{}: {e}", cfg.work_dir.display()))?;
    let journal = Arc::new(JournalClient::from_list(&cfg.journal, &cfg.journal_tls).map_err(|e| e.to_string())?);
    let store = SnapshotStore::open(&cfg.store)?;
    match journal.stream_info(&cfg.stream).await {
        Ok(i) if i.last_seq > 0 => {
            return Err(format!(
                "stream {} already holds {} records: an adoption starts a new stream (a new deployment directory)",
                cfg.stream, i.last_seq
            ));
        }
        Ok(_) => {}
        Err(e) if e.rejection() == Some(&keel_journal_client::errors::Rejection::UnknownStream) => {}
        Err(e) => return Err(format!("stream {}: {e}", cfg.stream)),
    }
    let lease = journal.take_lease(&cfg.stream, &me, 0, cfg.lease_ms).await.map_err(|e| format!("taking the new stream's lease: {e}"))?;
    let adopting = HandoverRecord { from: me.clone(), to: Some(crate::handover::ADOPTING.into()), until_unix_ms: u64::MAX };
    crate::handover::announce(&journal, &cfg.stream, &adopting).await?;

    let mut admin = connect(&cfg).await?;
    let engine = Engine::from_info(&admin.info("server").await?);
    let engine_handle: crate::feeder::EngineHandle = Arc::new(std::sync::Mutex::new(engine.clone()));
    let member = Member { uuid: me.clone(), redis: cfg.announce.clone(), sentinel: String::new(), seen_unix_ms: 0, engine: String::new() };
    let registered = AbortOnDrop(tokio::spawn(crate::node::keep_registered(journal.clone(), cfg.stream.clone(), member, engine_handle)));

    // The full sync.
    let mut conn = connect(&cfg).await?;
    command(&mut conn, &["PING"]).await?;
    command(&mut conn, &["REPLCONF", "capa", "psync2"]).await?;
    conn.send(&[b"PSYNC", b"?", b"-1"]).await?;
    let (replid, base_offset) = match conn.reply().await? {
        Reply::Status(s) => crate::redis::full_resync(&s).ok_or_else(|| format!("the running Redis answered PSYNC with +{s}, not a full resync"))?,
        other => return Err(format!("the running Redis answered PSYNC with {other:?}, not a full resync")),
    };
    let rdb_path = cfg.work_dir.join("base.rdb");
    let t0 = Instant::now();
    let (rdb_sha256, rdb_bytes) = receive_rdb(&mut conn, &rdb_path).await?;
    tracing::info!(%replid, offset = base_offset, rdb_bytes, ms = t0.elapsed().as_millis() as u64, "received the running Redis's dataset");

    // Published as the first snapshot, the stream spooled meanwhile.
    let base_seq = lease.last_seq + 1;
    let (r, w) = conn.split();
    let mut link = Link { cfg: &cfg, journal: &journal, me: &me, r, w, lease_renewed: Instant::now(), acked: Instant::now() };
    let mut spool = Spool::create(cfg.work_dir.join("stream.spool"), cfg.max_spool_bytes).await?;
    let parts = BaseParts { stream: cfg.stream.clone(), seq: base_seq, replid: replid.clone(), offset: base_offset, engine: engine.clone(), rdb_sha256, rdb_bytes };
    let published = link.spool_while(publish_base(&store, &journal, &cfg, parts, &rdb_path), &mut spool, base_offset).await?;
    let _ = tokio::fs::remove_file(&rdb_path).await;
    tracing::info!(seq = published.seq, key = %published.key, spooled = spool.written, "published the running Redis's dataset as the stream's first snapshot");

    let mut session = AppendSession::new(journal.clone());
    // Records name the running Redis's engine, as a Keel primary's name its own.
    let writer = engine.as_ref().and_then(crate::engine::Writer::of);
    let end_rec = Record { kind: Kind::RdbEnd, replid: replid.clone(), start: base_offset, end: base_offset, payload: Vec::new(), writer };
    let last_seq = crate::primary::append_records(&mut session, &cfg.stream, &me, &[end_rec], lease.last_seq, cfg.retry_pause_ms).await.map_err(|e| e.to_string())?;
    assert_eq!(last_seq, base_seq, "under the lease, the base's record is the one the snapshot names");

    let mut tail = Tail { replid, writer, end: base_offset, last_seq, cuts: Cuts::new(base_offset), pending: Vec::new() };
    link.drain_spool(spool, &mut tail, &mut session).await?;
    tracing::info!(offset = tail.end, seq = tail.last_seq, "the spooled stream is journaled; following the running Redis live");
    let (journaled, paused_at) = link.follow_until_fence(&mut tail, &mut session, &mut admin).await?;
    drop(registered);
    finish(&cfg, &journal, &me, &mut admin, journaled, paused_at).await
}

/// The replication link from the running Redis, and the upkeep that goes
/// with reading it: the lease renewed, the running Redis told how far its
/// replica got.
struct Link<'a> {
    cfg: &'a AdoptConfig,
    journal: &'a JournalClient,
    me: &'a str,
    r: crate::redis::ReadHalf,
    w: crate::redis::WriteHalf,
    lease_renewed: Instant,
    acked: Instant,
}

/// The stream bytes that arrive while they cannot be journaled yet: a file
/// written at its end and read from its start, at most `max_bytes` ahead.
struct Spool {
    path: PathBuf,
    file: tokio::fs::File,
    max_bytes: u64,
    written: u64,
}

impl Spool {
    async fn create(path: PathBuf, max_bytes: u64) -> Result<Spool, String> {
        let file = tokio::fs::File::create(&path).await.map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Spool { path, file, max_bytes, written: 0 })
    }

    /// Appends `b`; `read`: how much was taken out so far.
    async fn write(&mut self, b: &[u8], read: u64) -> Result<(), String> {
        self.file.write_all(b).await.map_err(|e| format!("{}: {e}", self.path.display()))?;
        self.written += b.len() as u64;
        if self.written - read > self.max_bytes {
            return Err(format!(
                "the journal fell behind the running Redis's writes by over --max-spool-bytes {}; raise it",
                self.max_bytes
            ));
        }
        Ok(())
    }
}

impl Link<'_> {
    /// Reads the link; its end is an error saying `what` was under way.
    async fn read(&mut self, buf: &mut [u8], what: &str) -> Result<usize, String> {
        match self.r.read(buf).await {
            Ok(0) => Err(format!("the running Redis closed the replication link while {what}; start the adoption again in a new directory")),
            Ok(n) => Ok(n),
            Err(e) => Err(format!("the running Redis's replication link, while {what}: {e}")),
        }
    }

    /// Renews the lease when due and tells the running Redis its replica
    /// is at `offset` (once a second).
    async fn upkeep(&mut self, offset: u64) -> Result<(), String> {
        keep_lease(self.journal, self.cfg, self.me, &mut self.lease_renewed).await?;
        if self.acked.elapsed() >= Duration::from_millis(REPLCONF_ACK_MS) {
            let at = offset.to_string();
            self.w.send(&[b"REPLCONF", b"ACK", at.as_bytes()]).await?;
            self.acked = Instant::now();
        }
        Ok(())
    }

    /// Runs `work` (the base's publication), spooling the stream bytes that
    /// arrive meanwhile (`base`: the offset they start at).
    async fn spool_while<T>(&mut self, work: impl std::future::Future<Output = Result<T, String>>, spool: &mut Spool, base: u64) -> Result<T, String> {
        let mut work = std::pin::pin!(work);
        let mut buf = vec![0u8; READ_CHUNK_BYTES];
        loop {
            tokio::select! {
                n = self.read(&mut buf, "its base was published") => spool.write(&buf[..n?], 0).await?,
                done = &mut work => return done,
                _ = tokio::time::sleep(Duration::from_millis(TICK_MS)) => self.upkeep(base + spool.written).await?,
            }
        }
    }

    /// Journals the spool, still reading the link into it meanwhile (the
    /// running Redis drops a replica whose output buffer outgrows its
    /// limit), until the spool is drained; then removes it.
    async fn drain_spool(&mut self, mut spool: Spool, tail: &mut Tail, session: &mut AppendSession) -> Result<(), String> {
        let mut reader = tokio::fs::File::open(&spool.path).await.map_err(|e| format!("{}: {e}", spool.path.display()))?;
        let mut drained = 0u64;
        let (mut buf, mut link_buf) = (vec![0u8; READ_CHUNK_BYTES], vec![0u8; READ_CHUNK_BYTES]);
        loop {
            // What the link holds now (timeout polls the read once first).
            while let Ok(n) = tokio::time::timeout(Duration::ZERO, self.read(&mut link_buf, "the spool was journaled")).await {
                spool.write(&link_buf[..n?], drained).await?;
            }
            // Under steady writes the spool is never empty after a read of
            // the link: once at most a chunk is left, that rest is journaled
            // without reading the link again, and the link's next bytes
            // follow live. Before, one chunk per round.
            let last = spool.written - drained <= READ_CHUNK_BYTES as u64;
            spool.file.flush().await.map_err(|e| format!("{}: {e}", spool.path.display()))?;
            while drained < spool.written {
                let want = ((spool.written - drained) as usize).min(buf.len());
                let n = reader.read(&mut buf[..want]).await.map_err(|e| format!("{}: {e}", spool.path.display()))?;
                if n == 0 {
                    return Err(format!("{} holds less than was written to it", spool.path.display()));
                }
                drained += n as u64;
                tail.take_bytes(&buf[..n]);
                tail.flush(session, self.cfg, self.me).await?;
                if !last {
                    break;
                }
            }
            self.upkeep(tail.end).await?;
            if last {
                break;
            }
        }
        let _ = tokio::fs::remove_file(&spool.path).await;
        Ok(())
    }

    /// Journals the live stream and runs the switch (`Switch`) when the
    /// switch file appears, until the running Redis may be fenced: returns
    /// the journal's end then, and when its writes paused.
    async fn follow_until_fence(&mut self, tail: &mut Tail, session: &mut AppendSession, admin: &mut Conn) -> Result<(u64, Instant), String> {
        let cfg = self.cfg;
        let mut buf = vec![0u8; READ_CHUNK_BYTES];
        let mut switch = Switch::Idle;
        let mut paused_at = Instant::now();
        let mut waiting_logged = Instant::now() - Duration::from_secs(60);
        let mut looked_for_node: Option<Instant> = None;
        let t_start = Instant::now();
        let ms = || t_start.elapsed().as_millis() as u64;
        loop {
            let reading = tail.pending.len() < cfg.max_buffered_bytes;
            let tick = if matches!(switch, Switch::Draining { .. }) { 2 } else { TICK_MS };
            tokio::select! {
                n = self.read(&mut buf, "it was followed live"), if reading => {
                    tail.take_bytes(&buf[..n?]);
                    tail.flush(session, cfg, self.me).await?;
                }
                _ = tokio::time::sleep(Duration::from_millis(tick)) => {}
            }
            self.upkeep(tail.end).await?;
            if switch == Switch::Idle && cfg.switch_file.exists() {
                switch.asked(ms());
                tracing::info!(file = %cfg.switch_file.display(), "switch asked for; waiting for a node caught up with the journal");
            }
            let look = looked_for_node.is_none_or(|t| t.elapsed() >= Duration::from_millis(READY_CHECK_MS));
            if switch.node_ready(ms()) && look {
                looked_for_node = Some(Instant::now());
                match ready_node(self.journal, cfg, self.me, tail.end).await {
                    Some(node) => {
                        command(admin, &["CLIENT", "PAUSE", &cfg.pause_ms.to_string(), "WRITE"]).await?;
                        let info = admin.info("replication").await?;
                        let target: u64 =
                            info_field(&info, "master_repl_offset").and_then(|o| o.parse().ok()).ok_or("INFO replication has no master_repl_offset")?;
                        tracing::info!(%node, target, journaled = tail.end, "writes paused on the running Redis; journaling up to their offset");
                        switch.paused(target, ms());
                        paused_at = Instant::now();
                    }
                    None if waiting_logged.elapsed() > Duration::from_secs(5) => {
                        tracing::info!(journaled = tail.end, "no node is caught up with the journal yet");
                        waiting_logged = Instant::now();
                    }
                    None => {}
                }
            }
            switch.journaled(tail.end, ms(), cfg.pause_ms);
            match &switch {
                Switch::GiveUp(why) => {
                    tracing::warn!(%why, "switch given up; the running Redis goes on serving, and the adoption goes on");
                    command(admin, &["CLIENT", "UNPAUSE"]).await?;
                    // The caller learns it: the switch file goes, the reason stays.
                    let _ = std::fs::write(cfg.work_dir.join(SWITCH_FAILED_FILE), format!("{why}\n"));
                    let _ = std::fs::remove_file(&cfg.switch_file);
                    switch = Switch::Idle;
                }
                Switch::Fence => return Ok((tail.end, paused_at)),
                _ => {}
            }
        }
    }
}

/// The running Redis's address as host and port.
fn host_port(cfg: &AdoptConfig) -> Result<(String, String), String> {
    match cfg.redis.to_string().rsplit_once(':') {
        Some((h, p)) => Ok((h.to_string(), p.to_string())),
        None => Err(format!("the running Redis's address {} is not host:port", cfg.redis)),
    }
}

/// Whether the running Redis's `INFO replication` shows it fenced: a
/// replica of itself (at `host:port`).
pub fn fenced(info: &str, host: &str, port: &str) -> bool {
    info_field(info, "role") == Some("slave") && info_field(info, "master_host") == Some(host) && info_field(info, "master_port") == Some(port)
}

/// The switch's last steps, the journal holding every acknowledged write
/// at `journaled`: fence the running Redis, then `after_fence`.
async fn finish(cfg: &AdoptConfig, journal: &JournalClient, me: &str, admin: &mut Conn, journaled: u64, paused_at: Instant) -> Result<String, String> {
    let (host, port) = host_port(cfg)?;
    // A replica of itself never connects (it answers its own PSYNC with
    // -NOMASTERLINK) and never takes a write; with stale data refused its
    // clients get an error for every data command and rediscover.
    let fence = async {
        command(admin, &["CONFIG", "SET", "replica-serve-stale-data", "no"]).await?;
        command(admin, &["REPLICAOF", &host, &port]).await?;
        command(admin, &["CLIENT", "UNPAUSE"]).await
    };
    if let Err(e) = fence.await {
        let _ = command(admin, &["REPLICAOF", "NO", "ONE"]).await;
        let _ = command(admin, &["CLIENT", "UNPAUSE"]).await;
        return Err(format!("could not fence the running Redis ({e}); it takes writes again: run the adoption again"));
    }
    tracing::info!(journaled, "the running Redis is read-only now; releasing the lease");
    after_fence(cfg, journal, me, admin, paused_at).await
}

/// Once the running Redis is fenced (nothing is lost by letting a node
/// lead from here): the handover record naming any node replaces the
/// adoption's, so nodes may stand again; the lease is released; a
/// caught-up node takes it; this process leaves the members; the running
/// Redis is shut down unless kept. Until the record is replaced no node
/// ever stands, so that write is retried until it lands (a process that
/// died here is finished by `keel-sidecar adopt --finish-fenced`).
async fn after_fence(cfg: &AdoptConfig, journal: &JournalClient, me: &str, admin: &mut Conn, paused_at: Instant) -> Result<String, String> {
    let written_by = Instant::now() + Duration::from_millis(TAKEOVER_MS);
    loop {
        let handing = HandoverRecord { from: me.to_string(), to: None, until_unix_ms: now_unix_ms() + TAKEOVER_MS };
        match crate::handover::announce(journal, &cfg.stream, &handing).await {
            Ok(()) => break,
            Err(e) if Instant::now() < written_by => {
                tracing::warn!(error = %e, "writing the handover record; retrying");
                tokio::time::sleep(Duration::from_millis(cfg.retry_pause_ms)).await;
            }
            Err(e) => {
                return Err(format!(
                    "the running Redis is read-only, but the handover record could not be written ({e}); when the journal \
                     answers, run `keel-sidecar adopt --finish-fenced` with the same --work-dir"
                ));
            }
        }
    }
    if let Err(e) = journal.set_leader(&cfg.stream, "", me).await {
        tracing::warn!(error = %e, "releasing the lease: no clear answer; looking at the stream (it lapses anyway)");
    }
    let deadline = Instant::now() + Duration::from_millis(TAKEOVER_MS);
    let successor = loop {
        match journal.stream_info(&cfg.stream).await {
            Ok(i) if !i.leader_uuid.is_empty() && i.leader_uuid != me => break Some(i.leader_uuid),
            _ => {}
        }
        if Instant::now() >= deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(crate::handover::HANDOVER_POLL_MS)).await;
    };
    let members = journal.get_meta(&cfg.stream, crate::node::MEMBERS_KEY).await.ok().flatten();
    let mut list = members.as_deref().map(crate::node::parse_members).unwrap_or_default();
    let Some(successor) = successor else {
        return Err(format!(
            "no node took the released lease within {TAKEOVER_MS} ms; the running Redis stays read-only and the first node \
             to catch up with the journal takes the primary role (scripts/cluster status)"
        ));
    };
    let addr = list.iter().find(|m| m.uuid == successor).map(|m| m.redis.clone()).unwrap_or(successor.clone());
    let switch_ms = paused_at.elapsed().as_millis() as u64;
    // This process is no member any more.
    list.retain(|m| m.uuid != me);
    if let Err(e) = journal.cas_meta(&cfg.stream, crate::node::MEMBERS_KEY, members, crate::node::render_members(&list)).await {
        tracing::warn!(error = %e, "leaving the members list (its entry goes stale by itself)");
    }
    let old = if cfg.keep_old {
        format!("{} stays up, read-only", cfg.redis)
    } else {
        match command(admin, &["SHUTDOWN", "NOW"]).await {
            Err(e) if !e.contains("closed") && !e.contains("connection") => {
                let _ = command(admin, &["SHUTDOWN", "NOSAVE", "NOW"]).await;
                format!("{} shut down without saving ({e})", cfg.redis)
            }
            _ => format!("{} shut down", cfg.redis),
        }
    };
    Ok(format!("adopted: the primary is now {addr} (writes paused {switch_ms} ms, from the pause to its lease); {old}"))
}

/// `keel-sidecar adopt --finish-fenced`: the switch's last steps for an
/// adoption whose process died after it fenced the running Redis (the
/// nodes stay out of elections until the adoption's record is replaced).
/// Refused unless the running Redis is fenced: before that it may still
/// take writes, and a node leading then would lose them.
pub async fn finish_fenced(cfg: AdoptConfig) -> Result<String, String> {
    cfg.validate()?;
    let me = crate::primary::node_uuid(&cfg.work_dir.join("id")).map_err(|e| format!("{}: {e}", cfg.work_dir.display()))?;
    let journal = JournalClient::from_list(&cfg.journal, &cfg.journal_tls).map_err(|e| e.to_string())?;
    let record = journal.get_meta(&cfg.stream, crate::handover::HANDOVER_META_KEY).await.map_err(|e| format!("stream {}: {e}", cfg.stream))?;
    match record.as_deref().and_then(HandoverRecord::decode) {
        Some(r) if r.adopting() && r.from == me => {}
        Some(r) if r.adopting() => return Err(format!("stream {} is being adopted by another process ({}), not the one of {}", cfg.stream, r.from, cfg.work_dir.display())),
        _ => return Err(format!("stream {} is not being adopted: nothing to finish", cfg.stream)),
    }
    let mut admin = connect(&cfg).await?;
    let (host, port) = host_port(&cfg)?;
    let info = admin.info("replication").await?;
    if !fenced(&info, &host, &port) {
        return Err(format!(
            "the running Redis at {} is not fenced (not a replica of itself): it may take writes, so no node may lead yet; \
             run the adoption again instead",
            cfg.redis
        ));
    }
    after_fence(&cfg, &journal, &me, &mut admin, Instant::now()).await
}

/// Renews the lease when a third of it has passed.
async fn keep_lease(journal: &JournalClient, cfg: &AdoptConfig, me: &str, renewed: &mut Instant) -> Result<(), String> {
    if renewed.elapsed() < Duration::from_millis(cfg.lease_ms / 3) {
        return Ok(());
    }
    match journal.renew_lease(&cfg.stream, me).await {
        Ok(_) => *renewed = Instant::now(),
        Err(e @ JournalError::Fenced { .. }) => return Err(format!("the adoption lost the stream's lease: {e}")),
        Err(e) => tracing::warn!(error = %e, "lease renewal failed; retrying"),
    }
    Ok(())
}

/// A live member (not this process) whose Redis is caught up with the
/// journal's end `journaled`.
async fn ready_node(journal: &JournalClient, cfg: &AdoptConfig, me: &str, journaled: u64) -> Option<String> {
    let members = journal.get_meta(&cfg.stream, crate::node::MEMBERS_KEY).await.ok().flatten()?;
    let now = now_unix_ms();
    for m in crate::node::parse_members(&members) {
        if m.uuid == me || m.seen_unix_ms + crate::node::MEMBER_STALE_MS < now {
            continue;
        }
        let Ok(addr) = RedisAddr::parse(&m.redis) else { continue };
        let info = async { Conn::open(&addr).await?.info("replication").await };
        if let Ok(Ok(info)) = tokio::time::timeout(Duration::from_millis(500), info).await {
            if caught_up(&info, journaled) {
                return Some(m.redis);
            }
        }
    }
    None
}

/// Reads the full sync's RDB (`$<len>` then the bytes) into `path`, synced;
/// returns its SHA-256 and length.
async fn receive_rdb(link: &mut Conn, path: &std::path::Path) -> Result<(String, u64), String> {
    let header = link.bulk_header().await?;
    let len: u64 = header
        .strip_prefix('$')
        .and_then(|l| l.parse().ok())
        .ok_or_else(|| format!("unexpected RDB header {header:?} from the running Redis (an EOF-marked diskless sync was not asked for)"))?;
    let mut f = tokio::fs::File::create(path).await.map_err(|e| format!("{}: {e}", path.display()))?;
    let mut h = Sha256::new();
    let mut left = len;
    let mut buf = vec![0u8; READ_CHUNK_BYTES];
    while left > 0 {
        let n = (left as usize).min(buf.len());
        link.read_exact(&mut buf[..n]).await?;
        h.update(&buf[..n]);
        f.write_all(&buf[..n]).await.map_err(|e| format!("{}: {e}", path.display()))?;
        left -= n as u64;
    }
    f.sync_all().await.map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((crate::snapshot::hex(&h.finalize()), len))
}

/// What the base's snapshot meta is made of.
struct BaseParts {
    stream: String,
    seq: u64,
    replid: String,
    offset: u64,
    engine: Option<Engine>,
    rdb_sha256: String,
    rdb_bytes: u64,
}

/// Checks the base RDB loads (in a private server: its `DEBUG DIGEST`),
/// uploads it and publishes it as the stream's first snapshot, standing at
/// record `seq` (the base's `RdbEnd`, journaled next).
async fn publish_base(store: &SnapshotStore, journal: &JournalClient, cfg: &AdoptConfig, p: BaseParts, rdb: &std::path::Path) -> Result<SnapshotMeta, String> {
    let check_dir = cfg.work_dir.join("check");
    let _ = tokio::fs::remove_dir_all(&check_dir).await;
    tokio::fs::create_dir_all(&check_dir).await.map_err(|e| format!("{}: {e}", check_dir.display()))?;
    tokio::fs::hard_link(rdb, check_dir.join("dump.rdb")).await.map_err(|e| format!("{}: {e}", check_dir.display()))?;
    let digest = crate::snapshotter::digest_of_rdb(&cfg.redis_server, &check_dir).await;
    let _ = tokio::fs::remove_dir_all(&check_dir).await;
    let digest = digest.map_err(|e| format!("the running Redis's RDB does not load in {}: {e}", cfg.redis_server.display()))?;
    let mut head = [0u8; 9];
    tokio::fs::File::open(rdb).await.map_err(|e| e.to_string())?.read_exact(&mut head).await.map_err(|e| format!("{}: {e}", rdb.display()))?;
    let id = uuid::Uuid::new_v4().simple().to_string();
    let key = crate::snapshot::object_key(&p.stream, p.seq, &id);
    let (engine, engine_version) = match &p.engine {
        Some(e) => (e.name.clone(), format!("{}.{}.{}", e.version.0, e.version.1, e.version.2)),
        None => ("redis".into(), "unknown".into()),
    };
    let meta = SnapshotMeta {
        format: crate::snapshot::SNAPSHOT_META_FORMAT,
        stream: p.stream,
        seq: p.seq,
        offset: p.offset,
        replid: p.replid.clone(),
        origin_replid: p.replid,
        origin_offset: p.offset,
        engine,
        engine_version,
        rdb_version: crate::snapshot::rdb_version(&head)?,
        rdb_bytes: p.rdb_bytes,
        rdb_sha256: p.rdb_sha256,
        digest,
        // Nothing of the stream before the base: the chain starts here.
        stream_sha256: StreamSum::after(None, Some(p.offset)).hex(),
        created_unix_ms: now_unix_ms(),
        key: key.clone(),
    };
    meta.check()?;
    let n = store.upload_file(&key, rdb).await?;
    if n != meta.rdb_bytes {
        return Err(format!("the store took {n} bytes of the base; it is {} bytes", meta.rdb_bytes));
    }
    store.put_small(&meta.meta_key(), meta.encode()).await?;
    journal.cas_meta(&cfg.stream, SNAPSHOT_META_KEY, None, meta.encode()).await.map_err(|e| format!("publishing the base snapshot: {e}"))?;
    Ok(meta)
}

/// The journaled history's end and the stream bytes not journaled yet.
struct Tail {
    replid: String,
    writer: Option<crate::engine::Writer>,
    /// The offset the journal's stream ends at (a whole-command cut).
    end: u64,
    last_seq: u64,
    cuts: Cuts,
    /// Bytes from `end` on.
    pending: Vec<u8>,
}

impl Tail {
    fn take_bytes(&mut self, b: &[u8]) {
        self.cuts.feed(b);
        self.pending.extend_from_slice(b);
    }

    /// Appends every pending byte up to the last cut point.
    async fn flush(&mut self, session: &mut AppendSession, cfg: &AdoptConfig, me: &str) -> Result<(), String> {
        loop {
            let mut recs = Vec::new();
            let mut at = self.end;
            let mut used = 0usize;
            while recs.len() < RECORDS_PER_APPEND {
                let n = self.cuts.sendable(MAX_PAYLOAD_BYTES as u64, MAX_PAYLOAD_BYTES as u64) as usize;
                if n == 0 {
                    break;
                }
                self.cuts.take(n as u64);
                recs.push(Record { kind: Kind::Stream, replid: self.replid.clone(), start: at, end: at + n as u64, payload: self.pending[used..used + n].to_vec(), writer: self.writer });
                at += n as u64;
                used += n;
            }
            if recs.is_empty() {
                return Ok(());
            }
            self.last_seq = crate::primary::append_records(session, &cfg.stream, me, &recs, self.last_seq, cfg.retry_pause_ms).await.map_err(|e| e.to_string())?;
            self.pending.drain(..used);
            self.end = at;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_switch_pauses_once_a_node_is_ready_and_fences_once_the_journal_holds_the_pause() {
        let mut s = Switch::Idle;
        assert!(!s.node_ready(0), "nothing asked");
        s.asked(5);
        assert!(s.node_ready(6));
        s.paused(1_000, 10);
        assert!(!s.node_ready(11));
        s.journaled(900, 20, 10_000);
        assert_eq!(s, Switch::Draining { target: 1_000, paused_at_ms: 10 });
        s.journaled(1_000, 30, 10_000);
        assert_eq!(s, Switch::Fence);
        s.asked(40);
        assert_eq!(s, Switch::Fence, "asking again changes nothing");
    }

    #[test]
    fn a_switch_with_no_node_caught_up_is_given_up_before_any_pause() {
        let mut s = Switch::Idle;
        s.asked(100);
        assert!(s.node_ready(100 + READY_WAIT_MS), "it waits that long");
        assert!(!s.node_ready(101 + READY_WAIT_MS));
        assert!(matches!(&s, Switch::GiveUp(why) if why.contains("never paused")));
    }

    #[test]
    fn a_journal_that_does_not_catch_up_within_half_the_pause_gives_the_switch_up() {
        let mut s = Switch::Idle;
        s.asked(0);
        s.paused(1_000, 0);
        s.journaled(999, 5_000, 10_000);
        assert!(matches!(s, Switch::Draining { .. }), "at half the pause it still waits");
        s.journaled(999, 5_001, 10_000);
        assert!(matches!(&s, Switch::GiveUp(why) if why.contains("999") && why.contains("1000")));
    }

    #[test]
    fn the_running_redis_is_fenced_only_as_a_replica_of_itself() {
        let info = |role: &str, host: &str, port: &str| format!("role:{role}\r\nmaster_host:{host}\r\nmaster_port:{port}\r\n");
        assert!(fenced(&info("slave", "127.0.0.1", "6379"), "127.0.0.1", "6379"));
        assert!(!fenced(&info("slave", "127.0.0.1", "6380"), "127.0.0.1", "6379"), "a replica of another server");
        assert!(!fenced(&info("master", "127.0.0.1", "6379"), "127.0.0.1", "6379"));
        assert!(!fenced("role:master\r\n", "127.0.0.1", "6379"));
    }

    #[test]
    fn a_node_is_ready_when_its_redis_is_a_linked_replica_near_the_journals_end() {
        let info = |role: &str, link: &str, off: u64| format!("# Replication\r\nrole:{role}\r\nmaster_link_status:{link}\r\nmaster_repl_offset:{off}\r\n");
        assert!(caught_up(&info("slave", "up", 5_000), 5_000));
        assert!(caught_up(&info("slave", "up", 5_000), 5_000 + READY_SLACK_BYTES));
        assert!(!caught_up(&info("slave", "up", 5_000), 5_001 + READY_SLACK_BYTES), "too far behind");
        assert!(!caught_up(&info("slave", "down", 5_000), 5_000), "its link is down");
        assert!(!caught_up(&info("master", "up", 5_000), 5_000), "not a replica");
        assert!(!caught_up("role:slave\r\nmaster_link_status:up\r\n", 0), "no offset");
    }
}
