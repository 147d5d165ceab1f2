//! A replica's feeder: the sidecar speaks the master side of Redis
//! replication to its local redis-server (`REPLICAOF 127.0.0.1 <feed
//! port>`), with the journal as the only source of bytes.
//!
//! Life cycle of one Redis connection:
//! 1. handshake: `PING`, `AUTH`, `REPLCONF …`, then `PSYNC <replid>
//!    <offset>` (`handshake_step` decides each answer). The feed is
//!    authenticated: each feeder makes a random token at start, the node
//!    gives it to its Redis as `masterauth` (`CONFIG SET`, as the control
//!    user, before `REPLICAOF`), and a connection must `AUTH` with it
//!    before `REPLCONF` or `PSYNC` (any user name; `masteruser` may be
//!    set), else it is answered `-NOAUTH`/`-WRONGPASS` and closed: only
//!    the node's own Redis is fed the dataset. Every connection's handshake is answered at once and must reach its
//!    `PSYNC` within `HANDSHAKE_TIMEOUT_MS`; malformed input gets `-ERR
//!    Protocol error` and is closed; one connection is fed at a time, and a
//!    `PSYNC` while one is fed gets `-NOMASTERLINK` (retry later), so no
//!    stray connection holds up or displaces the local Redis's feed;
//! 2. `History::psync` decides: a full resync (the base RDB, sent in the
//!    EOF-marked format, then every stream record) or a continuation from
//!    the Redis's own offset; until the journal has a base, Redis waits;
//! 3. streaming: journal records are read with `follow` and their bytes
//!    written unchanged, so the replica's offsets are the primary's; each
//!    record is checked against `History` first (contiguous offsets), a
//!    record that breaks the shape ends the connection, never reaches Redis;
//! 4. it ends when Redis leaves, when the node stops following (promotion),
//!    or on a journal error; Redis reconnects by itself and resyncs.
//!    A `StreamVoid` record that voids bytes this Redis was already sent
//!    (the unfinished last command of a writer that died, which Redis holds
//!    unapplied) ends it too: Redis drops what it had not applied and
//!    continues from its own offset, where the next writer's bytes start.
//!    Voided bytes of records read after their void are never sent.
//!
//! A full resync after a snapshot was published (snapshot.rs) sends that
//! snapshot's RDB, streamed from the store, then records after it: the
//! journal may have trimmed everything before.
//!
//! A record that does not decode, or that `History` refuses, stalls the
//! feed at it (stall.rs): it is logged once, never sent, not read again;
//! the connection stays up with everything before it fed, and a Redis
//! (re)connecting meanwhile waits for its PSYNC answer until a published
//! snapshot covers the record.
//!
//! A record whose writer's engine (record.rs, engine.rs) writes an RDB the
//! local server cannot load is refused the same way as a base it cannot
//! load: the feed stops before it (everything before it is fed), the node
//! does not stand for election, and `INFO keel` says why and what to do.
//! The connection stays up; every `STALL_RECHECK_MS` the refusal is looked
//! at again against the local engine (which the node reads at every poll),
//! and the feed goes on from that record once the server loads it. The
//! check costs a comparison per record (`WriterCheck` keeps the last writer
//! that passed; `engine_generation` says when the local engine changed).
//!
//! Progress (`fed_seq`, `fed_offset`, and `whole_offset`: where the bytes
//! fed end after their last whole command outside a transaction) is
//! published for the election: a replica may only take the lease once its
//! Redis applied everything it can.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;

use keel_journal_client::client::JournalClient;
use tokio::io::AsyncReadExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::cuts::Cuts;
use crate::engine::Engine;
use crate::engine::Writer;
use crate::engine::WriterCheck;
use crate::history::History;
use crate::history::Psync;
use crate::record::Kind;
use crate::record::Record;
use crate::resp::parse_command;
use crate::snapshot::SNAPSHOT_META_KEY;
use crate::snapshot::SnapshotMeta;
use crate::snapshot::SnapshotStore;
use crate::snapshot::StreamSum;
use crate::snapshot::hex;
use crate::stall::STALL_RECHECK_MS;
use crate::stall::Stall;
use crate::stall::Stalled;
use sha2::Digest;
use sha2::Sha256;

/// Largest handshake command accepted from Redis.
const MAX_HANDSHAKE_BYTES: usize = 64 << 10;
/// How long a connection may take from connecting to its `PSYNC` (Redis
/// sends its handshake at once); past it, it is closed.
const HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
/// Connections in their handshake at once; beyond, a new one is refused.
const MAX_HANDSHAKES: usize = 64;
/// Stream bytes kept while Redis loads the base RDB; beyond, the journal
/// is not read until Redis is ready.
const MAX_HELD_BYTES: usize = 64 << 20;
/// How often a Redis waiting for a base RDB is re-checked.
const BASE_WAIT_MS: u64 = 200;
/// Bytes read from a Redis replica connection at once.
const READ_CHUNK_BYTES: usize = 16 << 10;
/// Pause after a failed `accept` on a feed listener (out of descriptors,
/// say) before accepting again.
pub const ACCEPT_RETRY_PAUSE: Duration = Duration::from_millis(100);

/// How far the local Redis has been fed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    pub fed_seq: u64,
    pub fed_offset: u64,
    /// The last offset up to `fed_offset` after a whole command outside a
    /// transaction: the most a Redis fed these bytes can have applied.
    pub whole_offset: u64,
}

/// The local server's engine as the node last read it, shared.
pub type EngineHandle = Arc<Mutex<Option<Engine>>>;

pub struct Feeder {
    pub journal: Arc<JournalClient>,
    pub stream: String,
    pub me: String,
    pub history: Mutex<History>,
    pub progress: watch::Sender<Progress>,
    /// Where published snapshots are (None: the journal is never trimmed).
    pub store: Option<SnapshotStore>,
    /// Stop feeding at the first whole-command cut at or after this record
    /// (the snapshotter's target); None: follow for ever.
    pub until_seq: Option<u64>,
    /// Checksums the live stream bytes fed (the snapshotter's).
    pub tap: Option<Mutex<StreamSum>>,
    /// A record this feeder cannot feed (stall.rs).
    stall: Mutex<Stall>,
    /// The local server's engine, as its last `INFO server` said (None: not
    /// known yet, nothing is checked).
    local_engine: EngineHandle,
    /// Counts the changes of `local_engine` (the per-record check's cache
    /// holds only within one).
    engine_generation: AtomicU64,
    /// A base, or a record's writer, the local server cannot load
    /// (engine.rs): the node does not consume the stream and does not
    /// stand for election, as if stalled, until a later check passes.
    refusal: Mutex<Option<Stalled>>,
    /// The password a connection must `AUTH` with (random per feeder).
    token: String,
}

impl Feeder {
    pub fn new(journal: Arc<JournalClient>, stream: String, me: String, store: Option<SnapshotStore>) -> Feeder {
        Feeder {
            journal,
            stream,
            me,
            history: Mutex::new(History::default()),
            progress: watch::channel(Progress::default()).0,
            store,
            until_seq: None,
            tap: None,
            stall: Mutex::new(Stall::default()),
            local_engine: EngineHandle::default(),
            engine_generation: AtomicU64::new(0),
            refusal: Mutex::new(None),
            token: format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple()),
        }
    }

    /// The password the fed Redis must `AUTH` with (its `masterauth`).
    pub fn token(&self) -> &str {
        &self.token
    }

    /// A refusal for the local server's engine alone (a base or a record's
    /// writer it cannot load), if any.
    pub fn refused(&self) -> Option<Stalled> {
        self.refusal.lock().unwrap().clone()
    }

    /// Where the feed stopped on a record it cannot feed, or on a base the
    /// local server cannot load, if it did.
    pub fn stalled(&self) -> Option<Stalled> {
        self.stall.lock().unwrap().at().cloned().or_else(|| self.refused())
    }

    /// The local server's engine (from its `INFO server`).
    pub fn set_local_engine(&self, engine: Option<Engine>) {
        let mut local = self.local_engine.lock().unwrap();
        if *local != engine {
            *local = engine;
            self.engine_generation.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// The local server's engine as last read.
    pub fn local_engine(&self) -> Option<Engine> {
        self.local_engine.lock().unwrap().clone()
    }

    /// The local server's engine as last read, shared (the member entry).
    pub fn engine_handle(&self) -> EngineHandle {
        self.local_engine.clone()
    }

    /// Whether the local server loads the base at `seq`, an RDB of version
    /// `rdb` written by `writer`; a refusal is kept (and logged once) until a
    /// check passes.
    fn check_base(&self, seq: u64, rdb: u32, writer: &str) -> Result<(), String> {
        let Some(local) = self.local_engine.lock().unwrap().clone() else { return Ok(()) };
        self.keep_refusal(seq, local.can_load(rdb, writer), "the local server cannot load the stream's base; not fed")
    }

    /// Whether the local server may be fed record `seq`, which `writer`
    /// wrote (engine.rs `WriterCheck::check`); kept like `check_base`'s.
    fn check_writer(&self, seq: u64, writer: &Writer) -> Result<(), String> {
        let local = self.local_engine.lock().unwrap();
        let Some(local) = local.as_ref() else { return Ok(()) };
        let checked = WriterCheck::check(local, seq, writer);
        self.keep_refusal(seq, checked, "the local server cannot load what this record's writer writes; not fed from it on")
    }

    /// Keeps the outcome of a check: a refusal stands (logged once per
    /// reason) until a check passes.
    fn keep_refusal(&self, seq: u64, checked: Result<(), String>, what: &str) -> Result<(), String> {
        let mut refusal = self.refusal.lock().unwrap();
        match checked {
            Ok(()) => {
                if let Some(r) = refusal.take() {
                    tracing::info!(stream = %self.stream, seq, was = %r.reason, "the local server loads what the stream holds now; fed again");
                }
                Ok(())
            }
            Err(reason) => {
                let reason = crate::stall::one_line(&reason);
                if refusal.as_ref().map(|r| &r.reason) != Some(&reason) {
                    tracing::error!(stream = %self.stream, seq, reason = %reason, "{what}");
                }
                *refusal = Some(Stalled { seq, reason: reason.clone() });
                Err(reason)
            }
        }
    }

    /// Record `seq` cannot be fed, for `reason`: the feed stops at it. Logged
    /// once per stall (at error level, with what to do). Returns the error
    /// text for the caller.
    pub fn stalled_on(&self, seq: u64, reason: &str) -> String {
        if self.stall.lock().unwrap().met(seq, reason) {
            tracing::error!(stream = %self.stream, seq, reason, what_to_do = %crate::stall::advice(&self.stream, seq), "the feed stalled at a record it cannot read");
        }
        format!("the feed stalled at record {seq} of {}: {reason}", self.stream)
    }

    /// A stall the history has reached (the next record to read is the
    /// stalled one or past it), unless a published snapshot `snap` covers
    /// it: then the history starts over from that snapshot.
    fn stall_stands(&self, snap: Option<&SnapshotMeta>) -> Option<String> {
        let at = self.stall.lock().unwrap().at().cloned()?;
        if let Some(s) = snap {
            if self.store.is_some() && self.stall.lock().unwrap().covered_by(s.seq) {
                tracing::info!(stream = %self.stream, stalled_seq = at.seq, snapshot_seq = s.seq, "a published snapshot covers the record the feed stalled at; feeding again from it");
                *self.history.lock().unwrap() = History::from_snapshot(s);
                return None;
            }
        }
        if self.history.lock().unwrap().last_seq() + 1 < at.seq {
            // Not there yet (the stall was met by the primary's side): read
            // up to it; meeting it again is not news.
            return None;
        }
        Some(format!("the feed stalled at record {} of {}: {}", at.seq, self.stream, at.reason))
    }

    /// The published snapshot, if any.
    pub async fn published_snapshot(&self) -> Result<Option<SnapshotMeta>, String> {
        match self.journal.get_meta(&self.stream, SNAPSHOT_META_KEY).await {
            Ok(Some(b)) => SnapshotMeta::decode(&b).map(Some),
            Ok(None) => Ok(None),
            Err(e) if e.rejection() == Some(&keel_journal_client::errors::Rejection::UnknownStream) => Ok(None),
            Err(e) => Err(format!("reading the published snapshot: {e}")),
        }
    }

    /// Reads the journal's new records into `History` (no follow), and
    /// the published snapshot. A history that has read nothing yet, or
    /// whose next records were trimmed, starts over from the snapshot.
    pub async fn refresh(&self) -> Result<(), String> {
        let snap = self.published_snapshot().await?;
        if let Some(e) = self.stall_stands(snap.as_ref()) {
            return Err(e);
        }
        if let Some(s) = &snap {
            let mut h = self.history.lock().unwrap();
            if h.last_seq() == 0 {
                *h = History::from_snapshot(s);
            }
        }
        let mut restarted = false;
        'read: loop {
            let from = self.history.lock().unwrap().last_seq() + 1;
            let mut reader = self.journal.read(&self.stream, from, false);
            loop {
                match reader.next_batch().await {
                    Ok(Some(batch)) => {
                        let mut h = self.history.lock().unwrap();
                        for r in batch {
                            let rec = Record::decode(&r.payload).map_err(|e| self.stalled_on(r.seq, &e.to_string()))?;
                            h.observe(r.seq, &rec).map_err(|e| self.stalled_on(r.seq, &e))?;
                        }
                    }
                    Ok(None) => break 'read,
                    Err(e) if e.rejection() == Some(&keel_journal_client::errors::Rejection::UnknownStream) => return Ok(()),
                    Err(e) if e.rejection() == Some(&keel_journal_client::errors::Rejection::Trimmed) && !restarted => {
                        // Trimmed past what this history read: a newer
                        // snapshot covers it.
                        let Some(s) = self.published_snapshot().await? else {
                            return Err(format!("reading the journal: {e} (and no snapshot is published)"));
                        };
                        tracing::info!(seq = s.seq, "the journal was trimmed past this feeder's history; restarting it from the published snapshot");
                        *self.history.lock().unwrap() = History::from_snapshot(&s);
                        restarted = true;
                        continue 'read;
                    }
                    Err(e) => return Err(format!("reading the journal: {e}")),
                }
            }
        }
        if let Some(s) = &snap {
            if self.store.is_some() {
                self.history.lock().unwrap().set_floor(s)?;
            }
        }
        Ok(())
    }

    /// Serves the local Redis's replication connections until `stop` turns
    /// true. Every connection gets its handshake answered at once, in its
    /// own future, within `HANDSHAKE_TIMEOUT_MS`; one at a time is fed
    /// (there is one local Redis). A `PSYNC` while a feed runs is answered
    /// `-NOMASTERLINK` (Redis retries it later) and closed, so a stray or
    /// malformed connection neither waits unanswered nor displaces the
    /// Redis being fed. Errors of one connection are logged; the next one
    /// starts over.
    pub async fn serve(&self, listener: &TcpListener, mut stop: watch::Receiver<bool>) {
        let mut handshakes = futures::stream::FuturesUnordered::new();
        let mut feeding: Option<std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + '_>>> = None;
        loop {
            if *stop.borrow() {
                return;
            }
            tokio::select! {
                a = listener.accept() => match a {
                    Ok((sock, peer)) => {
                        let _ = sock.set_nodelay(true);
                        if handshakes.len() >= MAX_HANDSHAKES {
                            tracing::debug!(%peer, "replica feed: too many handshakes at once; connection refused");
                            let _ = sock.try_write(b"-ERR max number of clients reached\r\n");
                            continue;
                        }
                        let token = self.token.as_bytes();
                        handshakes.push(async move {
                            match tokio::time::timeout(Duration::from_millis(HANDSHAKE_TIMEOUT_MS), handshake(sock, token)).await {
                                Ok(h) => h,
                                Err(_) => Err(format!("no PSYNC within {HANDSHAKE_TIMEOUT_MS} ms (HANDSHAKE_TIMEOUT_MS)")),
                            }
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "feed listener");
                        tokio::time::sleep(ACCEPT_RETRY_PAUSE).await;
                    }
                },
                Some(h) = futures::StreamExt::next(&mut handshakes), if !handshakes.is_empty() => match h {
                    Ok(h) if feeding.is_none() => feeding = Some(Box::pin(self.feed(h))),
                    Ok(h) => {
                        tracing::info!(replid = %h.replid, offset = h.offset, "replica feed: a PSYNC while another connection is fed; told to retry later");
                        let _ = h.w.try_write(b"-NOMASTERLINK Keel: this feed already serves a replica connection; retry later\r\n");
                    }
                    Err(e) => tracing::debug!(error = %e, "replica feed: handshake failed; connection closed"),
                },
                r = async { match feeding.as_mut() { Some(f) => f.await, None => std::future::pending().await } } => {
                    feeding = None;
                    if let Err(e) = r {
                        crate::metrics::get().feed_errors.inc();
                        tracing::warn!(error = %e, "replica feed connection ended");
                    }
                }
                _ = stop.changed() => return,
            }
        }
    }

    async fn feed(&self, h: Handshake) -> Result<(), String> {
        let Handshake { mut r, mut w, replid, offset } = h;
        let mut chunk = vec![0u8; READ_CHUNK_BYTES];
        let plan = loop {
            if let Err(e) = self.refresh().await {
                if self.stalled().is_none() {
                    return Err(e);
                }
                // Stalled: Redis waits for its answer; the stall is looked
                // at again every STALL_RECHECK_MS (the snapshot that covers
                // it). Redis leaving meanwhile ends this quietly.
                tokio::select! {
                    n = r.read(&mut chunk) => {
                        if n.map_err(|e| e.to_string())? == 0 {
                            return Ok(());
                        }
                    }
                    _ = tokio::time::sleep(Duration::from_millis(STALL_RECHECK_MS)) => {}
                }
                continue;
            }
            let plan = self.history.lock().unwrap().psync(&self.me, &replid, offset);
            if plan != Psync::NotReady {
                break plan;
            }
            tokio::time::sleep(Duration::from_millis(BASE_WAIT_MS)).await;
        };
        let feed_id = self.history.lock().unwrap().feed_id(&self.me).expect("a base exists");
        let mut waiting_ack = false;
        let (mut seq, mut skip_to, mut in_rdb, mark, mut cuts) = match plan {
            Psync::Full { offset: base, first_seq, snapshot: Some(snap) } => {
                self.check_base(snap.seq, snap.rdb_version, &format!("{} {}", snap.engine, snap.engine_version))?;
                let store = self.store.as_ref().ok_or("a snapshot is published but this feeder has no --store")?;
                let (size, mut chunks) = store.stream(&snap.key).await?;
                if size != snap.rdb_bytes {
                    return Err(format!("snapshot {} is {size} bytes in the store, {} in its meta", snap.key, snap.rdb_bytes));
                }
                tracing::info!(%replid, offset, base, seq = snap.seq, key = %snap.key, "full resync of the local Redis from the published snapshot");
                w.write_all(format!("+FULLRESYNC {feed_id} {base}\r\n${size}\r\n").as_bytes()).await.map_err(|e| e.to_string())?;
                // The last chunk is held back until the whole object
                // matched its checksum: Redis never loads a damaged one.
                let mut sum = Sha256::new();
                let mut sent = 0u64;
                let mut last: Option<bytes::Bytes> = None;
                let mut progress = crate::progress::Progress::new(Some(size), std::time::Instant::now());
                while let Some(c) = futures::StreamExt::next(&mut chunks).await {
                    let c = c?;
                    sum.update(&c);
                    sent += c.len() as u64;
                    if let Some(line) = progress.advance(c.len() as u64, std::time::Instant::now()) {
                        tracing::info!(key = %snap.key, progress = %line, "full resync of the local Redis from the snapshot");
                    }
                    if let Some(prev) = last.replace(c) {
                        w.write_all(&prev).await.map_err(|e| format!("writing to Redis: {e}"))?;
                    }
                }
                let got = hex(&sum.finalize());
                if sent != size || got != snap.rdb_sha256 {
                    return Err(format!(
                        "snapshot {} read back as {sent} bytes with sha256 {got}, not {size} bytes with {}: not sent to Redis",
                        snap.key, snap.rdb_sha256
                    ));
                }
                if let Some(c) = last {
                    w.write_all(&c).await.map_err(|e| format!("writing to Redis: {e}"))?;
                }
                waiting_ack = true;
                self.progress.send_modify(|p| {
                    p.fed_seq = snap.seq;
                    p.fed_offset = base;
                    p.whole_offset = base;
                });
                (first_seq, base, false, String::new(), Cuts::new(base))
            }
            Psync::Full { offset: base, first_seq, snapshot: None } => {
                tracing::info!(%replid, offset, base, "full resync of the local Redis from the journal's base RDB");
                let mark: String = format!("{}{}", uuid::Uuid::new_v4().simple(), &uuid::Uuid::new_v4().simple().to_string()[..8]);
                w.write_all(format!("+FULLRESYNC {feed_id} {base}\r\n$EOF:{mark}\r\n").as_bytes()).await.map_err(|e| e.to_string())?;
                (first_seq, 0, true, mark, Cuts::new(base))
            }
            Psync::Continue { from_seq, from_offset } => {
                tracing::info!(%replid, offset = from_offset, "the local Redis continues from its own offset");
                w.write_all(format!("+CONTINUE {feed_id}\r\n").as_bytes()).await.map_err(|e| e.to_string())?;
                let caught_up = self.history.lock().unwrap().end() == Some(from_offset);
                self.progress.send_modify(|p| {
                    p.fed_offset = from_offset;
                    p.whole_offset = from_offset;
                    if caught_up {
                        p.fed_seq = from_seq - 1;
                    }
                });
                // Redis's own offset is after a whole command.
                (from_seq, from_offset, false, String::new(), Cuts::new(from_offset))
            }
            Psync::NotReady => unreachable!(),
        };
        let mut reader = self.journal.read(&self.stream, seq, true);
        // After the base RDB, Redis loads it and sends its first ACK; only
        // then does it read stream bytes as commands (bytes sent earlier
        // would be taken for the end of the RDB). They wait here.
        let mut held: Option<Vec<u8>> = None;
        // With `until_seq`: the feed stopped at a whole-command cut.
        let mut reached = false;
        // The feed stalled at a record it cannot feed (stall.rs).
        let mut stalled = false;
        // The journal's base RDB was checked against the local engine.
        let mut base_checked = false;
        // Records whose writer the local server loads (engine.rs), and the
        // record refused for its writer, if any: the feed waits before it.
        let mut writers = WriterCheck::default();
        let mut refused: Option<(u64, Writer)> = None;
        loop {
            tokio::select! {
                batch = reader.next_batch(), if !reached && !stalled && refused.is_none() && held.as_ref().is_none_or(|h| h.len() < MAX_HELD_BYTES) => {
                    let batch = batch.map_err(|e| format!("reading the journal: {e}"))?.ok_or("the journal ended a followed read")?;
                    let mut out: Vec<u8> = held.take().unwrap_or_default();
                    let mut fed = None;
                    for rec in batch {
                        // What came before a record that cannot be fed is
                        // still fed; the feed stops at that record.
                        let decoded = match Record::decode(&rec.payload) {
                            Ok(d) => d,
                            Err(e) => {
                                self.stalled_on(rec.seq, &e.to_string());
                                stalled = true;
                                break;
                            }
                        };
                        // Its writer's engine, checked before anything of it is
                        // used (a comparison unless the writer or the local
                        // engine changed).
                        let generation = self.engine_generation.load(Ordering::Acquire);
                        if !writers.cached(generation, decoded.writer.as_ref()) {
                            let w = decoded.writer.expect("a record that names no writer is never checked");
                            if self.check_writer(rec.seq, &w).is_err() {
                                refused = Some((rec.seq, w));
                                break;
                            }
                            writers.passed(generation, w);
                        }
                        // Where this record's live bytes end (a void may follow it).
                        let live_end = {
                            let mut h = self.history.lock().unwrap();
                            if let Err(e) = h.observe(rec.seq, &decoded) {
                                drop(h);
                                self.stalled_on(rec.seq, &e);
                                stalled = true;
                                break;
                            }
                            h.live_end(rec.seq, decoded.start, decoded.end)
                        };
                        seq = rec.seq;
                        match decoded.kind {
                            Kind::Rdb if in_rdb => {
                                if !base_checked {
                                    // The base's first bytes name its RDB version.
                                    base_checked = true;
                                    if let Ok(v) = crate::snapshot::rdb_version(&decoded.payload) {
                                        self.check_base(rec.seq, v, "this stream's primary")?;
                                    }
                                }
                                out.extend_from_slice(&decoded.payload);
                            }
                            Kind::RdbEnd if in_rdb => {
                                out.extend_from_slice(mark.as_bytes());
                                w.write_all(&out).await.map_err(|e| format!("writing to Redis: {e}"))?;
                                out.clear();
                                in_rdb = false;
                                waiting_ack = true;
                                skip_to = decoded.start;
                                cuts = Cuts::new(decoded.start);
                                fed = Some((seq, decoded.start));
                            }
                            Kind::Rdb | Kind::RdbEnd | Kind::RdbAbort => {}
                            Kind::Stream => {
                                if live_end <= skip_to {
                                    continue;
                                }
                                let from = skip_to.saturating_sub(decoded.start) as usize;
                                let bytes = &decoded.payload[from..(live_end - decoded.start) as usize];
                                if let Some(t) = &self.tap {
                                    t.lock().unwrap().feed_at(decoded.start + from as u64, bytes);
                                }
                                out.extend_from_slice(bytes);
                                cuts.feed(bytes);
                                skip_to = live_end;
                                fed = Some((seq, live_end));
                                if self.until_seq.is_some_and(|u| seq >= u) && cuts.last_cut() == live_end {
                                    // The snapshotter's target: stop at this cut.
                                    break;
                                }
                            }
                            // Never inside the base: History refuses a void before it.
                            Kind::StreamVoid => {
                                if skip_to > decoded.start {
                                    return Err(format!(
                                        "record {seq} voids stream bytes {}..{} this Redis was sent (an unfinished command of a writer that died); it resyncs from its own offset",
                                        decoded.start, decoded.end
                                    ));
                                }
                                fed = Some((seq, skip_to));
                            }
                        }
                    }
                    if waiting_ack {
                        held = Some(out);
                    } else if !out.is_empty() {
                        w.write_all(&out).await.map_err(|e| format!("writing to Redis: {e}"))?;
                    }
                    if let Some((s, o)) = fed {
                        let whole = cuts.take_whole();
                        self.progress.send_modify(|p| {
                            p.fed_seq = s;
                            p.fed_offset = o;
                            p.whole_offset = whole;
                        });
                        reached = self.until_seq.is_some_and(|u| s >= u) && whole == o;
                    }
                }
                _ = tokio::time::sleep(Duration::from_millis(STALL_RECHECK_MS)), if refused.is_some() => {
                    // The local server may run another engine by now.
                    let (at, w) = refused.expect("guarded");
                    let generation = self.engine_generation.load(Ordering::Acquire);
                    if self.check_writer(at, &w).is_ok() {
                        writers.passed(generation, w);
                        refused = None;
                        // The records from the refused one are read again.
                        reader = self.journal.read(&self.stream, at, true);
                    }
                }
                _ = tokio::time::sleep(Duration::from_millis(STALL_RECHECK_MS)), if stalled => {
                    // A snapshot that covers the stalled record: Redis
                    // resyncs (the history starts over from it).
                    let snap = self.published_snapshot().await?;
                    if self.stall_stands(snap.as_ref()).is_none() {
                        return Ok(());
                    }
                }
                n = r.read(&mut chunk) => {
                    // REPLCONF ACKs: Redis's own offset is read with INFO
                    // when it matters; these are only drained.
                    let n = n.map_err(|e| e.to_string())?;
                    if n == 0 {
                        return Err("Redis closed the replication link".into());
                    }
                    if waiting_ack {
                        waiting_ack = false;
                        let out = held.take().unwrap_or_default();
                        if !out.is_empty() {
                            w.write_all(&out).await.map_err(|e| format!("writing to Redis: {e}"))?;
                        }
                    }
                }
            }
        }
    }
}

/// A connection that completed the replication handshake with `PSYNC
/// replid offset` (offset -1 when it is not a number, as Redis sends for a
/// full sync).
struct Handshake {
    r: tokio::net::tcp::OwnedReadHalf,
    w: tokio::net::tcp::OwnedWriteHalf,
    replid: String,
    offset: i64,
}

/// What to do with one command of a replication handshake.
#[derive(Debug, PartialEq, Eq)]
pub enum HandshakeStep {
    /// Answer this and read on.
    Reply(Vec<u8>),
    /// Answer this and close the connection.
    Close(Vec<u8>),
    /// The handshake is done: feed from `PSYNC replid offset` (offset -1
    /// when it is not a number, as Redis sends for a full sync).
    Psync { replid: String, offset: i64 },
}

/// The answer to one handshake command `args`, given whether the
/// connection has authenticated (`authed`, set here) and the feeder's
/// `token`. `PING` is answered before `AUTH` (Redis sends it first);
/// `REPLCONF` and `PSYNC` need it; a wrong password closes the connection.
pub fn handshake_step(args: &[Vec<u8>], authed: &mut bool, token: &[u8]) -> HandshakeStep {
    let name = args.first().map(|a| a.to_ascii_lowercase()).unwrap_or_default();
    match (name.as_slice(), args.len()) {
        (b"ping", _) => HandshakeStep::Reply(b"+PONG\r\n".to_vec()),
        (b"auth", 2 | 3) => {
            if same_secret(args[args.len() - 1].as_slice(), token) {
                *authed = true;
                HandshakeStep::Reply(b"+OK\r\n".to_vec())
            } else {
                *authed = false;
                HandshakeStep::Close(b"-WRONGPASS invalid username-password pair or user is disabled.\r\n".to_vec())
            }
        }
        (b"auth", _) => HandshakeStep::Reply(b"-ERR wrong number of arguments for 'auth' command\r\n".to_vec()),
        (b"replconf" | b"psync", _) if !*authed => HandshakeStep::Close(
            b"-NOAUTH Authentication required: the Keel feeder feeds only its node's Redis (masterauth, set by the sidecar)\r\n".to_vec(),
        ),
        (b"replconf", _) => HandshakeStep::Reply(b"+OK\r\n".to_vec()),
        (b"psync", 3) => HandshakeStep::Psync {
            replid: String::from_utf8_lossy(&args[1]).into_owned(),
            offset: std::str::from_utf8(&args[2]).ok().and_then(|s| s.parse().ok()).unwrap_or(-1),
        },
        _ => {
            let shown: String = String::from_utf8_lossy(&name).chars().take(64).collect();
            HandshakeStep::Reply(format!("-ERR the Keel feeder serves only the replication handshake, not {shown:?}\r\n").into_bytes())
        }
    }
}

/// Compares a password with the token without stopping at the first
/// difference.
fn same_secret(given: &[u8], token: &[u8]) -> bool {
    given.len() == token.len() && given.iter().zip(token).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

/// Answers a connection's handshake (`handshake_step`) up to its `PSYNC`.
/// Malformed RESP or a command over `MAX_HANDSHAKE_BYTES` is answered
/// `-ERR Protocol error: …` and the connection is closed.
async fn handshake(sock: TcpStream, token: &[u8]) -> Result<Handshake, String> {
    let (mut r, mut w) = sock.into_split();
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; READ_CHUNK_BYTES];
    let mut authed = false;
    loop {
        let parsed = match parse_command(&buf) {
            Ok(p) => p,
            Err(e) => {
                let _ = w.write_all(format!("-ERR Protocol error: {e}\r\n").as_bytes()).await;
                return Err(format!("malformed RESP: {e}"));
            }
        };
        let Some((args, used)) = parsed else {
            if buf.len() > MAX_HANDSHAKE_BYTES {
                let _ = w.write_all(format!("-ERR Protocol error: handshake command over {MAX_HANDSHAKE_BYTES} bytes (MAX_HANDSHAKE_BYTES)\r\n").as_bytes()).await;
                return Err("handshake command too large".into());
            }
            let n = r.read(&mut chunk).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("the connection closed during the handshake".into());
            }
            buf.extend_from_slice(&chunk[..n]);
            continue;
        };
        buf.drain(..used);
        match handshake_step(&args, &mut authed, token) {
            HandshakeStep::Reply(a) => w.write_all(&a).await.map_err(|e| e.to_string())?,
            HandshakeStep::Close(a) => {
                let _ = w.write_all(&a).await;
                return Err(String::from_utf8_lossy(a.trim_ascii_end()).into_owned());
            }
            HandshakeStep::Psync { replid, offset } => return Ok(Handshake { r, w, replid, offset }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(ws: &[&str]) -> Vec<Vec<u8>> {
        ws.iter().map(|w| w.as_bytes().to_vec()).collect()
    }

    #[test]
    fn redis_s_own_handshake_is_fed_after_auth() {
        let mut authed = false;
        let t = b"secret-token";
        let mut step = |ws: &[&str]| handshake_step(&words(ws), &mut authed, t);
        assert_eq!(step(&["PING"]), HandshakeStep::Reply(b"+PONG\r\n".to_vec()));
        assert_eq!(step(&["AUTH", "secret-token"]), HandshakeStep::Reply(b"+OK\r\n".to_vec()));
        assert_eq!(step(&["REPLCONF", "listening-port", "6380"]), HandshakeStep::Reply(b"+OK\r\n".to_vec()));
        assert_eq!(step(&["psync", "abc", "42"]), HandshakeStep::Psync { replid: "abc".into(), offset: 42 });
        let mut authed = false;
        assert_eq!(handshake_step(&words(&["AUTH", "some-user", "secret-token"]), &mut authed, t), HandshakeStep::Reply(b"+OK\r\n".to_vec()));
        assert!(authed, "masteruser + masterauth");
    }

    #[test]
    fn no_token_no_feed() {
        let t = b"secret-token";
        for first in [&["REPLCONF", "capa", "psync2"][..], &["PSYNC", "?", "-1"]] {
            let mut authed = false;
            let HandshakeStep::Close(a) = handshake_step(&words(first), &mut authed, t) else { panic!("{first:?} without AUTH") };
            assert!(a.starts_with(b"-NOAUTH"));
        }
        for wrong in [&["AUTH", "secret-tokeN"][..], &["AUTH", "u", "x"], &["AUTH", ""], &["AUTH", "secret-token-longer"]] {
            let mut authed = false;
            let HandshakeStep::Close(a) = handshake_step(&words(wrong), &mut authed, t) else { panic!("{wrong:?}") };
            assert!(a.starts_with(b"-WRONGPASS") && !authed);
        }
        let mut authed = false;
        assert!(matches!(handshake_step(&words(&["AUTH"]), &mut authed, t), HandshakeStep::Reply(a) if a.starts_with(b"-ERR wrong number")));
        assert!(matches!(handshake_step(&words(&["GET", "k"]), &mut authed, t), HandshakeStep::Reply(a) if a.starts_with(b"-ERR the Keel feeder")));
    }

    proptest::proptest! {
        /// Whatever a connection sends, it reaches a PSYNC only after an
        /// AUTH with the token, and every answer is one RESP error or status.
        #[test]
        fn only_the_token_opens_the_feed(cmds in proptest::collection::vec(
            proptest::collection::vec(proptest::prop_oneof![
                proptest::strategy::Just(b"AUTH".to_vec()), proptest::strategy::Just(b"PSYNC".to_vec()),
                proptest::strategy::Just(b"REPLCONF".to_vec()), proptest::strategy::Just(b"tok".to_vec()),
                proptest::collection::vec(proptest::num::u8::ANY, 0..8)], 0..4), 0..12)) {
            let mut authed = false;
            let mut ever_token = false;
            for c in &cmds {
                if c.first().is_some_and(|n| n.eq_ignore_ascii_case(b"auth")) && c.last().is_some_and(|l| l == b"tok") && (c.len() == 2 || c.len() == 3) {
                    ever_token = true;
                }
                match handshake_step(c, &mut authed, b"tok") {
                    HandshakeStep::Psync { .. } => { proptest::prop_assert!(authed && ever_token); break; }
                    HandshakeStep::Close(a) => { proptest::prop_assert!(a.starts_with(b"-")); break; }
                    HandshakeStep::Reply(a) => proptest::prop_assert!(a.ends_with(b"\r\n") && (a[0] == b'+' || a[0] == b'-')),
                }
            }
        }
    }
}
