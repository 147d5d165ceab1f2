//! The snapshotter: builds, verifies and publishes snapshots of a stream off
//! the primary's box, so the journal can trim (snapshot.rs says what a
//! snapshot is). The primary never forks for it.
//!
//! One cycle:
//! 1. read the published snapshot P (if any) and the stream's last seq T;
//! 2. build: a private redis-server (unix socket only, no module) starts
//!    from P's RDB (checked against P's SHA-256) as a replica of a feeder of
//!    our own (feeder.rs, the same code that feeds Keel replicas), which
//!    feeds it the journal up to the first whole-command cut at or after T
//!    and checksums the live stream bytes it feeds; once the private server
//!    applied them: `DEBUG DIGEST`, then `SAVE` there;
//! 3. upload the RDB and its metadata to the store;
//! 4. verify: download it again, check its SHA-256, restore it into a
//!    second private server whose `DEBUG DIGEST` must match, and recompute
//!    the stream checksum from the journal records independently;
//! 5. publish: compare-and-set its meta over P's in the stream's metadata;
//! 6. trim the journal before it, and delete snapshots older than P.
//! A failure at any step leaves P published and the journal untrimmed; the
//! objects of a snapshot that was not published are deleted.
//!
//! Cycles run when due (`due`: untrimmed journal bytes over `every_bytes`)
//! or on demand (`keel-sidecar snapshot --once`). Two snapshotters racing
//! are safe: the publication is a compare-and-set.

use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;
use std::time::SystemTime;

use keel_journal_client::client::JournalClient;
use keel_journal_client::client::JournalError;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::feeder::Feeder;
use crate::history::History;
use crate::link::RedisAddr;
use crate::redis::info_field;
use crate::redis::Conn;
use crate::record::Kind;
use crate::record::Record;
use crate::resp::Reply;
use crate::snapshot::SNAPSHOT_META_KEY;
use crate::snapshot::SnapshotMeta;
use crate::snapshot::SnapshotStore;
use crate::snapshot::StreamSum;
use crate::snapshot::file_sha256;
use crate::snapshot::object_key;
use crate::snapshot::rdb_version;

/// How often a cycle in progress looks at the private server.
const WATCH_MS: u64 = 20;
/// How long a private server may take to answer its first PING.
const PRIVATE_START_MS: u64 = 30_000;
/// Cycles started again when another snapshotter published meanwhile.
const RACE_ATTEMPTS: usize = 3;
/// The smallest `every_bytes`: a cycle costs a private server's start.
pub const MIN_EVERY_BYTES: u64 = 64 << 10;

/// Every bound of a snapshotter.
#[derive(Debug, Clone)]
pub struct SnapshotterConfig {
    pub journal: String,
    /// TLS to the journal (or explicitly none).
    pub journal_tls: keel_journal_client::tls::JournalTls,
    pub stream: String,
    pub store: String,
    /// The redis-server (or valkey-server) binaries the private servers may
    /// run: each cycle builds with the newest every live node loads
    /// (engine.rs, `pick_builder`).
    pub servers: Vec<PathBuf>,
    /// Where private servers keep their files, and the snapshotter its id.
    pub work_dir: PathBuf,
    /// Untrimmed journal bytes that make a new snapshot due.
    pub every_bytes: u64,
    pub poll_ms: u64,
    /// Longest one cycle may take before it is abandoned.
    pub cycle_timeout_ms: u64,
    /// A fault injected between upload and verification (tests only).
    pub fault: Option<Fault>,
}

/// Faults the tests inject to prove verification catches them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// One byte of the uploaded RDB flipped.
    CorruptRdb,
    /// The uploaded RDB cut short.
    TruncateRdb,
    /// The meta records another dataset digest than the RDB holds.
    WrongDigest,
}

impl std::str::FromStr for Fault {
    type Err = String;
    fn from_str(s: &str) -> Result<Fault, String> {
        match s {
            "corrupt-rdb" => Ok(Fault::CorruptRdb),
            "truncate-rdb" => Ok(Fault::TruncateRdb),
            "wrong-digest" => Ok(Fault::WrongDigest),
            _ => Err(format!("unknown fault {s:?} (corrupt-rdb, truncate-rdb, wrong-digest)")),
        }
    }
}

impl SnapshotterConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.every_bytes < MIN_EVERY_BYTES {
            return Err(format!("--every-bytes {} must be at least {MIN_EVERY_BYTES}", self.every_bytes));
        }
        if self.poll_ms == 0 || self.poll_ms > 60_000 {
            return Err(format!("--poll-ms {} must be 1..=60000", self.poll_ms));
        }
        if self.cycle_timeout_ms < 1_000 {
            return Err(format!("--cycle-timeout-ms {} must be at least 1000", self.cycle_timeout_ms));
        }
        if self.stream.is_empty() {
            return Err("--stream must not be empty".into());
        }
        if self.servers.is_empty() {
            return Err("give at least one --redis-server".into());
        }
        Ok(())
    }
}

/// The engine of a server binary, from its `--version`.
fn engine_of(bin: &Path) -> Result<crate::engine::Engine, String> {
    let out = std::process::Command::new(bin).arg("--version").output().map_err(|e| format!("--redis-server {}: {e}", bin.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    crate::engine::Engine::from_version_output(&text)
        .ok_or_else(|| format!("--redis-server {}: its --version ({:?}) names no engine Keel knows", bin.display(), text.lines().next().unwrap_or("")))
}

/// Whether a snapshot is due: the journal holds `untrimmed_bytes` and
/// records past the published snapshot's.
pub fn due(untrimmed_bytes: u64, every_bytes: u64, quota_bytes: u64, last_seq: u64, published_seq: Option<u64>) -> bool {
    last_seq > published_seq.unwrap_or(0) && untrimmed_bytes >= threshold(every_bytes, quota_bytes)
}

/// The untrimmed bytes at which a cycle starts: `every_bytes`, but never
/// more than half the journal's quota for the stream (`quota_bytes`, 0 when
/// the journal does not say), so a cycle starts while the stream still has
/// room for the writes made during it. A threshold at or over the quota
/// would never be reached: the journal refuses appends first.
pub fn threshold(every_bytes: u64, quota_bytes: u64) -> u64 {
    if quota_bytes == 0 { every_bytes } else { every_bytes.min(quota_bytes / 2) }
}

/// The journal records to trim once `published` is: every one before it
/// (its own record stays, so the stream's last record is always readable).
pub fn trim_upto(published_seq: u64, first_seq: u64) -> Option<u64> {
    let upto = published_seq.saturating_sub(1);
    (upto >= first_seq).then_some(upto)
}

/// Whether an object of the store may be deleted: snapshots older than the
/// previous one (`keep_from`, the oldest kept seq) go; newer ones may be a
/// cycle in progress elsewhere.
pub fn prunable(key: &str, stream: &str, keep_from: u64) -> bool {
    let Some(name) = key.strip_prefix(stream).and_then(|k| k.strip_prefix('/')) else { return false };
    let seq: Option<u64> = name.split('-').next().and_then(|s| s.parse().ok());
    seq.is_some_and(|s| s < keep_from)
}

#[derive(Debug)]
pub enum Cycle {
    Published(SnapshotMeta),
    /// No record since the published snapshot.
    NothingNew(Option<SnapshotMeta>),
}

pub struct Snapshotter {
    cfg: SnapshotterConfig,
    journal: Arc<JournalClient>,
    store: SnapshotStore,
    me: String,
    /// The engine of each of `cfg.servers`, read once by the first build
    /// (`servers`): showing or fetching a snapshot runs no server.
    engines: std::sync::OnceLock<Result<Vec<crate::engine::Engine>, String>>,
    /// Whether the threshold was said to be capped by the quota (once).
    warned_threshold: std::sync::atomic::AtomicBool,
}

fn now_unix_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Snapshotter {
    pub fn new(cfg: SnapshotterConfig) -> Result<Snapshotter, String> {
        cfg.validate()?;
        let journal = Arc::new(JournalClient::from_list(&cfg.journal, &cfg.journal_tls).map_err(|e| e.to_string())?);
        let store = SnapshotStore::open(&cfg.store)?;
        let me = crate::primary::node_uuid(&cfg.work_dir).map_err(|e| format!("work dir {}: {e}", cfg.work_dir.display()))?;
        Ok(Snapshotter { cfg, journal, store, me, engines: Default::default(), warned_threshold: Default::default() })
    }

    pub fn store(&self) -> &SnapshotStore {
        &self.store
    }

    async fn published(&self) -> Result<(Option<Vec<u8>>, Option<SnapshotMeta>), String> {
        match self.journal.get_meta(&self.cfg.stream, SNAPSHOT_META_KEY).await {
            Ok(Some(b)) => {
                let m = SnapshotMeta::decode(&b)?;
                Ok((Some(b), Some(m)))
            }
            Ok(None) => Ok((None, None)),
            Err(e) => Err(format!("reading the published snapshot: {e}")),
        }
    }

    /// The published snapshot, if any.
    pub async fn show(&self) -> Result<Option<SnapshotMeta>, String> {
        Ok(self.published().await?.1)
    }

    /// Copies the published snapshot's RDB to `dest`, checked against its
    /// meta (size and SHA-256); returns the meta.
    pub async fn fetch(&self, dest: &Path) -> Result<SnapshotMeta, String> {
        let meta = self.show().await?.ok_or("no snapshot is published")?;
        let (sum, n) = self.store.download(&meta.key, dest).await?;
        if sum != meta.rdb_sha256 || n != meta.rdb_bytes {
            let _ = tokio::fs::remove_file(dest).await;
            return Err(format!("the stored snapshot {} is {n} bytes with sha256 {sum}; its meta says {} bytes, {}", meta.key, meta.rdb_bytes, meta.rdb_sha256));
        }
        Ok(meta)
    }

    /// Runs cycles when due, for ever; errors are logged and retried.
    pub async fn run(&self) -> ! {
        loop {
            match self.due_now().await {
                Ok(true) => match self.cycle().await {
                    Ok(Cycle::Published(m)) => tracing::info!(seq = m.seq, offset = m.offset, bytes = m.rdb_bytes, "snapshot published"),
                    Ok(Cycle::NothingNew(_)) => {}
                    Err(e) => tracing::warn!(error = %e, "snapshot cycle failed; the published snapshot stays current"),
                },
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "could not tell whether a snapshot is due"),
            }
            tokio::time::sleep(Duration::from_millis(self.cfg.poll_ms)).await;
        }
    }

    async fn due_now(&self) -> Result<bool, String> {
        let info = match self.journal.stream_info(&self.cfg.stream).await {
            Ok(i) => i,
            Err(JournalError::Rejected { kind: keel_journal_client::errors::Rejection::UnknownStream, .. }) => return Ok(false),
            Err(e) => return Err(e.to_string()),
        };
        let published = self.published().await?.1;
        // A trim that did not happen after a publication is retried here.
        if let Some(p) = &published {
            self.trim(p).await;
        }
        let at = threshold(self.cfg.every_bytes, info.quota_bytes);
        if at < self.cfg.every_bytes && !self.warned_threshold.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::warn!(
                every_bytes = self.cfg.every_bytes,
                quota_bytes = info.quota_bytes,
                threshold = at,
                "--every-bytes is over half the journal's quota for this stream; cycles start at half the quota"
            );
        }
        Ok(due(info.bytes, self.cfg.every_bytes, info.quota_bytes, info.last_seq, published.map(|p| p.seq)))
    }

    /// One whole cycle (bounded by `cycle_timeout_ms`).
    pub async fn cycle(&self) -> Result<Cycle, String> {
        let limit = Duration::from_millis(self.cfg.cycle_timeout_ms);
        match tokio::time::timeout(limit, self.cycle_inner()).await {
            Ok(r) => r,
            Err(_) => Err(format!("the snapshot cycle took over {} ms (--cycle-timeout-ms)", self.cfg.cycle_timeout_ms)),
        }
    }

    async fn cycle_inner(&self) -> Result<Cycle, String> {
        // Another snapshotter may publish while this one builds (a cycle on
        // demand beside the scheduled one): then this cycle is refused
        // (the tail it read was trimmed, or its compare-and-set fails), and
        // it starts again from the new snapshot.
        let mut published = self.published().await?;
        for attempt in 1..=RACE_ATTEMPTS {
            let before = published.1.as_ref().map(|p| p.seq);
            match self.cycle_once(published).await {
                Ok(c) => return Ok(c),
                Err(e) => {
                    let Ok(now) = self.published().await else { return Err(e) };
                    let after = now.1.as_ref().map(|p| p.seq);
                    if after == before || attempt == RACE_ATTEMPTS {
                        return Err(e);
                    }
                    tracing::info!(error = %e, published = ?after, "another snapshot was published during this cycle; starting again from it");
                    published = now;
                }
            }
        }
        unreachable!("the last attempt returns")
    }

    /// One attempt, from the published snapshot `(its raw meta, its meta)`.
    async fn cycle_once(&self, (prev_raw, prev): (Option<Vec<u8>>, Option<SnapshotMeta>)) -> Result<Cycle, String> {
        let t0 = Instant::now();
        let info = self.journal.stream_info(&self.cfg.stream).await.map_err(|e| format!("stream {}: {e}", self.cfg.stream))?;
        let target = info.last_seq;
        if target <= prev.as_ref().map(|p| p.seq).unwrap_or(0) {
            return Ok(Cycle::NothingNew(prev));
        }
        let (server, engine) = self.builder(prev.as_ref()).await?;
        let id = uuid::Uuid::new_v4().simple().to_string();
        let build_dir = self.cfg.work_dir.join(format!("build-{id}"));
        let built = self.build(server, engine, prev.as_ref(), target, &build_dir, &id).await;
        let _ = tokio::fs::remove_dir_all(&build_dir).await;
        let mut meta = built?;
        let built_ms = t0.elapsed().as_millis();
        if let Some(f) = self.cfg.fault {
            self.inject(f, &mut meta).await?;
        }
        let verify_dir = self.cfg.work_dir.join(format!("verify-{id}"));
        let verified = self.verify(server, &meta, prev.as_ref(), &verify_dir).await;
        let _ = tokio::fs::remove_dir_all(&verify_dir).await;
        if let Err(e) = verified {
            self.discard(&meta).await;
            return Err(format!("snapshot at record {} failed verification, not published: {e}", meta.seq));
        }
        if let Err(e) = self.every_node_loads(&meta).await {
            self.discard(&meta).await;
            return Err(format!("snapshot at record {} not published: {e}", meta.seq));
        }
        match self.journal.cas_meta(&self.cfg.stream, SNAPSHOT_META_KEY, prev_raw.clone(), meta.encode()).await {
            Ok(()) => {}
            Err(e) => {
                // An outcome-unknown may have landed: only objects that are
                // surely not published are deleted.
                match self.published().await {
                    Ok((_, Some(now))) if now == meta => tracing::info!("the publication landed despite: {e}"),
                    Ok(_) => {
                        self.discard(&meta).await;
                        return Err(format!("publishing the snapshot at record {}: {e}", meta.seq));
                    }
                    Err(e2) => return Err(format!("publishing the snapshot at record {}: {e}; then {e2} (its objects are kept)", meta.seq)),
                }
            }
        }
        tracing::info!(
            seq = meta.seq,
            offset = meta.offset,
            rdb_bytes = meta.rdb_bytes,
            build_ms = built_ms as u64,
            cycle_ms = t0.elapsed().as_millis() as u64,
            "snapshot verified and published"
        );
        self.trim(&meta).await;
        if let Some(p) = &prev {
            self.prune(p.seq).await;
        }
        Ok(Cycle::Published(meta))
    }

    /// Damages an uploaded snapshot the way `fault` says.
    async fn inject(&self, fault: Fault, meta: &mut SnapshotMeta) -> Result<(), String> {
        tracing::warn!(?fault, key = %meta.key, "injecting a fault into the uploaded snapshot");
        let tmp = self.cfg.work_dir.join("fault.rdb");
        self.store.download(&meta.key, &tmp).await?;
        let mut b = tokio::fs::read(&tmp).await.map_err(|e| e.to_string())?;
        match fault {
            Fault::CorruptRdb => {
                let mid = b.len() / 2;
                b[mid] ^= 0x20;
            }
            Fault::TruncateRdb => b.truncate(b.len() / 2),
            Fault::WrongDigest => {
                meta.digest = "0".repeat(40);
                self.store.put_small(&meta.meta_key(), meta.encode()).await?;
            }
        }
        tokio::fs::write(&tmp, &b).await.map_err(|e| e.to_string())?;
        self.store.upload_file(&meta.key, &tmp).await?;
        let _ = tokio::fs::remove_file(&tmp).await;
        Ok(())
    }

    async fn discard(&self, meta: &SnapshotMeta) {
        for k in [meta.key.clone(), meta.meta_key()] {
            if let Err(e) = self.store.delete(&k).await {
                tracing::warn!(error = %e, "could not delete an unpublished snapshot object");
            }
        }
    }

    async fn trim(&self, published: &SnapshotMeta) {
        let first = match self.journal.stream_info(&self.cfg.stream).await {
            Ok(i) => i.first_seq,
            Err(e) => return tracing::warn!(error = %e, "stream info before a trim"),
        };
        if let Some(upto) = trim_upto(published.seq, first) {
            match self.journal.trim(&self.cfg.stream, upto).await {
                Ok(first) => tracing::info!(upto, first_seq = first, "trimmed the journal before the published snapshot"),
                Err(e) => tracing::warn!(error = %e, upto, "trim failed; retried at the next check"),
            }
        }
    }

    async fn prune(&self, keep_from: u64) {
        let keys = match self.store.list(&self.cfg.stream).await {
            Ok(k) => k,
            Err(e) => return tracing::warn!(error = %e, "listing old snapshots"),
        };
        for k in keys.iter().filter(|k| prunable(k, &self.cfg.stream, keep_from)) {
            if let Err(e) = self.store.delete(k).await {
                tracing::warn!(error = %e, "deleting an old snapshot");
            }
        }
    }

    /// The engine of each server binary it may build with (their
    /// `--version`, read once); an error names a binary that is no server
    /// Keel knows. Building needs it: call it at start to refuse a bad
    /// `--redis-server` at once.
    pub fn servers(&self) -> Result<&[crate::engine::Engine], String> {
        let engines = self.engines.get_or_init(|| self.cfg.servers.iter().map(|b| engine_of(b)).collect());
        engines.as_deref().map_err(String::clone)
    }

    /// The server this cycle builds with (`pick_builder`), from the live
    /// members' engines.
    async fn builder(&self, prev: Option<&SnapshotMeta>) -> Result<(&Path, &crate::engine::Engine), String> {
        let members = self.journal.get_meta(&self.cfg.stream, crate::node::MEMBERS_KEY).await.map_err(|e| format!("reading the stream's members: {e}"))?;
        let members = members.as_deref().map(crate::node::parse_members).unwrap_or_default();
        let now = now_unix_ms();
        let engines: Vec<crate::engine::Engine> = members
            .iter()
            .filter(|m| now.saturating_sub(m.seen_unix_ms) < crate::node::MEMBER_STALE_MS)
            .filter_map(|m| crate::engine::Engine::from_tag(&m.engine))
            .collect();
        let servers = self.servers()?;
        let i = crate::engine::pick_builder(servers, prev.map(|p| p.rdb_version), &engines)?;
        Ok((&self.cfg.servers[i], &servers[i]))
    }

    async fn build(&self, server: &Path, engine: &crate::engine::Engine, prev: Option<&SnapshotMeta>, target: u64, dir: &Path, id: &str) -> Result<SnapshotMeta, String> {
        tokio::fs::create_dir_all(dir).await.map_err(|e| format!("{}: {e}", dir.display()))?;
        let rdb = dir.join("dump.rdb");
        if let Some(p) = prev {
            let (sum, n) = self.store.download(&p.key, &rdb).await?;
            if sum != p.rdb_sha256 || n != p.rdb_bytes {
                return Err(format!(
                    "the published snapshot {} does not match its meta (sha256 {sum}, {n} bytes; expected {}, {} bytes)",
                    p.key, p.rdb_sha256, p.rdb_bytes
                ));
            }
        }
        let mut feeder = Feeder::new(self.journal.clone(), self.cfg.stream.clone(), self.me.clone(), Some(self.store.clone()));
        feeder.until_seq = Some(target);
        // The private server replays the records as a replica would: one
        // whose writer's RDB it cannot load is refused (engine.rs).
        feeder.set_local_engine(Some(engine.clone()));
        feeder.tap = Some(Mutex::new(StreamSum::after(prev.map(|p| p.stream_sha256.as_str()), prev.map(|p| p.offset))));
        let feeder = Arc::new(feeder);
        let listener = TcpListener::bind("127.0.0.1:0").await.map_err(|e| format!("feed listener: {e}"))?;
        let feed_port = listener.local_addr().map_err(|e| e.to_string())?.port();
        let (stop_tx, stop_rx) = watch::channel(false);
        let serving = {
            let f = feeder.clone();
            tokio::spawn(async move { f.serve(&listener, stop_rx).await })
        };
        let result = async {
            let redis = PrivateRedis::start(server, dir, Some((feed_port, feeder.token()))).await?;
            // Wait until the private server applied every byte fed, and
            // the feed stopped at its cut.
            let mut progress = feeder.progress.subscribe();
            let fed = loop {
                if let Some(r) = feeder.refused() {
                    return Err(format!(
                        "the snapshotter's {} cannot replay record {} of {}: {}; give it a server of the records' writer too \
                         (--redis-server, repeated)",
                        engine.tag(),
                        r.seq,
                        self.cfg.stream,
                        r.reason
                    ));
                }
                if let Some(st) = feeder.stalled() {
                    // The same record stalls every replica: no snapshot
                    // can be built past it (stall.rs).
                    return Err(format!(
                        "no snapshot can be built past record {} of {}: {} ({})",
                        st.seq,
                        self.cfg.stream,
                        st.reason,
                        crate::stall::advice(&self.cfg.stream, st.seq)
                    ));
                }
                let p = *progress.borrow_and_update();
                if p.fed_seq >= target && p.whole_offset == p.fed_offset {
                    let info = redis.info("replication").await?;
                    let applied: Option<u64> = info_field(&info, "master_repl_offset").and_then(|o| o.parse().ok());
                    if info_field(&info, "master_link_status") == Some("up") && applied == Some(p.fed_offset) {
                        break p;
                    }
                }
                let _ = tokio::time::timeout(Duration::from_millis(WATCH_MS), progress.changed()).await;
            };
            let digest = redis.digest().await?;
            match redis.cmd(&["SAVE"]).await? {
                Reply::Status(s) if s == "OK" => {}
                other => return Err(format!("SAVE in the private server answered {other:?}")),
            }
            let server = redis.info("server").await?;
            let (engine, engine_version) = match info_field(&server, "valkey_version") {
                Some(v) => ("valkey".to_string(), v.to_string()),
                None => ("redis".to_string(), info_field(&server, "redis_version").unwrap_or("unknown").to_string()),
            };
            drop(redis);
            Ok::<_, String>((fed, digest, engine, engine_version))
        }
        .await;
        let _ = stop_tx.send(true);
        let _ = serving.await;
        let (fed, digest, engine, engine_version) = result?;
        let stream_sha256 = {
            let tap = feeder.tap.as_ref().expect("set above").lock().unwrap();
            tap.check()?;
            tap.hex()
        };
        let (origin_replid, origin_offset) = {
            let h = feeder.history.lock().unwrap();
            let b = h.base().ok_or("the feeder has no base")?;
            (b.replid.clone(), b.offset)
        };
        let at = crate::record::read_one(&self.journal, &self.cfg.stream, fed.fed_seq).await.map_err(|e| format!("reading record {}: {e}", fed.fed_seq))?;
        let (rdb_sha256, rdb_bytes) = file_sha256(&rdb).await?;
        let mut head = [0u8; 9];
        tokio::fs::File::open(&rdb).await.map_err(|e| e.to_string())?.read_exact(&mut head).await.map_err(|e| format!("{}: {e}", rdb.display()))?;
        let key = object_key(&self.cfg.stream, fed.fed_seq, id);
        let meta = SnapshotMeta {
            format: crate::snapshot::SNAPSHOT_META_FORMAT,
            stream: self.cfg.stream.clone(),
            seq: fed.fed_seq,
            offset: fed.fed_offset,
            replid: at.replid,
            origin_replid,
            origin_offset,
            engine,
            engine_version,
            rdb_version: rdb_version(&head)?,
            rdb_bytes,
            rdb_sha256,
            digest,
            stream_sha256,
            created_unix_ms: now_unix_ms(),
            key: key.clone(),
        };
        meta.check()?;
        self.store.upload_file(&key, &rdb).await?;
        self.store.put_small(&meta.meta_key(), meta.encode()).await?;
        Ok(meta)
    }

    /// Whether every live node of the stream (its member entry) runs an
    /// engine that loads this snapshot's RDB (engine.rs): during a rolling
    /// upgrade a snapshot of the newer engine waits until no older node is
    /// left, so the older nodes keep being fed and the upgrade can still be
    /// abandoned. A node that does not say its engine is not checked.
    async fn every_node_loads(&self, meta: &SnapshotMeta) -> Result<(), String> {
        let members = self.journal.get_meta(&self.cfg.stream, crate::node::MEMBERS_KEY).await.map_err(|e| format!("reading the stream's members: {e}"))?;
        let members = members.as_deref().map(crate::node::parse_members).unwrap_or_default();
        let now = now_unix_ms();
        let writer = format!("{} {}", meta.engine, meta.engine_version);
        for m in members.iter().filter(|m| now.saturating_sub(m.seen_unix_ms) < crate::node::MEMBER_STALE_MS) {
            if let Some(e) = crate::engine::Engine::from_tag(&m.engine) {
                e.can_load(meta.rdb_version, &writer).map_err(|why| format!("the node at {}: {why}", m.redis))?;
            }
        }
        Ok(())
    }

    async fn verify(&self, server: &Path, meta: &SnapshotMeta, prev: Option<&SnapshotMeta>, dir: &Path) -> Result<(), String> {
        tokio::fs::create_dir_all(dir).await.map_err(|e| format!("{}: {e}", dir.display()))?;
        let rdb = dir.join("dump.rdb");
        let (sum, n) = self.store.download(&meta.key, &rdb).await?;
        if n != meta.rdb_bytes || sum != meta.rdb_sha256 {
            return Err(format!("the stored RDB is {n} bytes with sha256 {sum}; its meta says {} bytes, {}", meta.rdb_bytes, meta.rdb_sha256));
        }
        let stored: SnapshotMeta = SnapshotMeta::decode(&self.store.get_small(&meta.meta_key(), crate::snapshot::MAX_META_BYTES).await?)?;
        if &stored != meta {
            return Err("the stored meta document differs from the one built".into());
        }
        // A replica of nobody: it keeps keys whose TTL passed (as the
        // build server did) and expires nothing while we look.
        let digest = digest_of_rdb(server, dir).await?;
        if digest != meta.digest {
            return Err(format!("the rehearsal restore's DEBUG DIGEST is {digest}, the built dataset's was {}", meta.digest));
        }
        let sum = stream_sum(&self.journal, &self.cfg.stream, prev, meta.seq).await?;
        if sum != meta.stream_sha256 {
            return Err(format!("the journal's stream checksum up to record {} is {sum}, the snapshot's {}", meta.seq, meta.stream_sha256));
        }
        Ok(())
    }
}

/// Loads `dir/dump.rdb` into a private server (a replica of nobody: it
/// expires nothing while looked at) and returns its `DEBUG DIGEST`.
pub async fn digest_of_rdb(bin: &Path, dir: &Path) -> Result<String, String> {
    let nowhere = TcpListener::bind("127.0.0.1:0").await.map_err(|e| e.to_string())?;
    let port = nowhere.local_addr().map_err(|e| e.to_string())?.port();
    let redis = PrivateRedis::start(bin, dir, Some((port, "nobody-feeds-this-server"))).await?;
    redis.digest().await
}

/// The running stream checksum up to record `upto`, recomputed from the
/// journal: the live bytes after `prev` (or after the base).
async fn stream_sum(journal: &JournalClient, stream: &str, prev: Option<&SnapshotMeta>, upto: u64) -> Result<String, String> {
    let mut h = match prev {
        Some(p) => History::from_snapshot(p),
        None => History::default(),
    };
    let mut sum = StreamSum::after(prev.map(|p| p.stream_sha256.as_str()), prev.map(|p| p.offset));
    let mut reader = journal.read(stream, h.last_seq() + 1, false);
    'read: while let Some(batch) = reader.next_batch().await.map_err(|e| format!("reading the journal: {e}"))? {
        for r in batch {
            if r.seq > upto {
                break 'read;
            }
            let rec = Record::decode(&r.payload).map_err(|e| format!("record {}: {e}", r.seq))?;
            h.observe(r.seq, &rec)?;
            if rec.kind == Kind::Stream {
                let live = h.live_end(r.seq, rec.start, rec.end);
                sum.feed_at(rec.start, &rec.payload[..(live - rec.start) as usize]);
            }
        }
    }
    sum.check()?;
    Ok(sum.hex())
}

/// A redis-server of the snapshotter's own: unix socket only, no module,
/// no persistence but an explicit `SAVE`, killed when dropped.
struct PrivateRedis {
    _child: tokio::process::Child,
    sock: PathBuf,
}

impl PrivateRedis {
    /// `replica_of`: the feed's port and password (feeder.rs), given in a
    /// config file of the server's own (mode 0600), never on its command line.
    async fn start(bin: &Path, dir: &Path, replica_of: Option<(u16, &str)>) -> Result<PrivateRedis, String> {
        let sock = dir.join("redis.sock");
        let mut cmd = tokio::process::Command::new(bin);
        if let Some((_, token)) = replica_of {
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt as _;
            let conf = dir.join("private.conf");
            let _ = std::fs::remove_file(&conf);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&conf)
                .map_err(|e| format!("{}: {e}", conf.display()))?;
            f.write_all(format!("masterauth {token}\n").as_bytes()).map_err(|e| format!("{}: {e}", conf.display()))?;
            cmd.arg(&conf);
        }
        cmd.arg("--port").arg("0");
        cmd.arg("--unixsocket").arg(&sock).arg("--unixsocketperm").arg("700");
        cmd.arg("--dir").arg(dir).arg("--dbfilename").arg("dump.rdb");
        cmd.arg("--save").arg("").arg("--appendonly").arg("no");
        cmd.arg("--enable-debug-command").arg("yes");
        cmd.arg("--logfile").arg(dir.join("redis.log"));
        if let Some((p, _)) = replica_of {
            cmd.arg("--replicaof").arg("127.0.0.1").arg(p.to_string());
        }
        cmd.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
        cmd.kill_on_drop(true);
        let child = cmd.spawn().map_err(|e| format!("starting the private {}: {e}", bin.display()))?;
        let me = PrivateRedis { _child: child, sock };
        let deadline = Instant::now() + Duration::from_millis(PRIVATE_START_MS);
        loop {
            match me.cmd(&["PING"]).await {
                Ok(Reply::Status(s)) if s == "PONG" => return Ok(me),
                _ if Instant::now() > deadline => {
                    return Err(format!("the private server in {} did not answer within {PRIVATE_START_MS} ms (see its redis.log)", dir.display()));
                }
                _ => tokio::time::sleep(Duration::from_millis(WATCH_MS)).await,
            }
        }
    }

    /// One command on a fresh connection (redis.rs; a reply is at most
    /// `redis::MAX_REPLY_BYTES`).
    async fn cmd(&self, args: &[&str]) -> Result<Reply, String> {
        let words: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        let addr = RedisAddr::Unix(self.sock.clone());
        let reply = async { Conn::open(&addr).await?.request(&words).await };
        reply.await.map_err(|e| format!("private server: {e}"))
    }

    async fn info(&self, section: &str) -> Result<String, String> {
        match self.cmd(&["INFO", section]).await? {
            Reply::Bulk(Some(b)) => Ok(String::from_utf8_lossy(&b).into_owned()),
            other => Err(format!("INFO {section} answered {other:?}")),
        }
    }

    async fn digest(&self) -> Result<String, String> {
        match self.cmd(&["DEBUG", "DIGEST"]).await? {
            Reply::Status(d) if d.len() == 40 => Ok(d),
            Reply::Bulk(Some(d)) if d.len() == 40 => Ok(String::from_utf8_lossy(&d).into_owned()),
            other => Err(format!("DEBUG DIGEST answered {other:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_is_due_by_untrimmed_bytes_and_new_records() {
        assert!(due(64 << 20, 64 << 20, 0, 10, None));
        assert!(due(64 << 20, 64 << 20, 0, 10, Some(9)));
        assert!(!due(64 << 20, 64 << 20, 0, 10, Some(10)), "nothing new");
        assert!(!due((64 << 20) - 1, 64 << 20, 0, 10, None));
    }

    #[test]
    fn a_snapshot_is_due_before_the_stream_fills_up() {
        const GIB: u64 = 1 << 30;
        // A threshold at the quota would never be reached: the journal
        // refuses appends a few KiB short of it.
        assert!(due(GIB / 2, GIB, GIB, 10, None));
        assert!(!due(GIB / 2 - 1, GIB, GIB, 10, None));
        assert_eq!(threshold(GIB, GIB), GIB / 2);
        assert_eq!(threshold(64 << 20, GIB), 64 << 20, "a threshold well under the quota stands");
        assert_eq!(threshold(GIB, 0), GIB, "a journal that does not say leaves it alone");
    }

    #[test]
    fn the_trim_keeps_the_snapshots_own_record() {
        assert_eq!(trim_upto(10, 1), Some(9));
        assert_eq!(trim_upto(10, 9), Some(9));
        assert_eq!(trim_upto(10, 10), None, "already trimmed");
        assert_eq!(trim_upto(1, 1), None);
    }

    #[test]
    fn only_snapshots_older_than_the_previous_are_pruned() {
        let k = |seq| object_key("s", seq, "x");
        assert!(prunable(&k(5), "s", 6));
        assert!(prunable(&crate::snapshot::meta_key_of(&k(5)), "s", 6));
        assert!(!prunable(&k(6), "s", 6));
        assert!(!prunable(&k(9), "s", 6), "maybe a cycle in progress");
        assert!(!prunable(&k(1), "t", 6), "another stream");
        assert!(!prunable("s/junk", "s", 6));
    }

    #[test]
    fn bad_configuration_is_refused() {
        let good = SnapshotterConfig {
            journal: "127.0.0.1:1".into(),
            journal_tls: Default::default(),
            stream: "s".into(),
            store: "/tmp/x".into(),
            servers: vec!["redis-server".into()],
            work_dir: "/tmp/y".into(),
            every_bytes: 64 << 20,
            poll_ms: 1000,
            cycle_timeout_ms: 600_000,
            fault: None,
        };
        good.validate().unwrap();
        assert_eq!("corrupt-rdb".parse::<Fault>().unwrap(), Fault::CorruptRdb);
        assert!("x".parse::<Fault>().is_err());
        assert!(SnapshotterConfig { every_bytes: 10, ..good.clone() }.validate().is_err());
        assert!(SnapshotterConfig { poll_ms: 0, ..good.clone() }.validate().is_err());
        assert!(SnapshotterConfig { cycle_timeout_ms: 1, ..good.clone() }.validate().is_err());
        assert!(SnapshotterConfig { servers: vec![], ..good.clone() }.validate().is_err());
        assert!(SnapshotterConfig { stream: "".into(), ..good }.validate().is_err());
    }
}
