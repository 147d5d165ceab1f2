//! A journal node: one openraft member serving the `Journal` API to clients
//! and the `Raft` transport to its peers, on one gRPC port.
//!
//! This file starts a node and keeps it honest: it opens the stores, starts
//! openraft, the proposer and both services, and runs the background tasks
//! (recovery after a restart, snapshots by bytes, first initialisation,
//! `--join`, metrics). The rooms of a node, along the write path:
//! - service.rs: the `Journal` API (checks, leader-only stamps, reads after
//!   `linearize`, membership changes);
//! - proposer.rs: admission and group commit into openraft;
//! - network.rs / raft_service.rs: the Raft transport, sending / receiving;
//! - raft_log_store.rs: the Raft log on disk (raft-log);
//! - state_machine.rs, streams.rs, records.rs: applying committed entries
//!   (`streams::apply` is pure), the records on disk, snapshots;
//! - membership.rs: the pure rules for membership changes.
//!
//! Storage failures: a node that cannot write its data directory (a full
//! disk, an I/O error in the Raft log, the record store or a snapshot) must
//! not linger as a member that answers on its port and serves nothing.
//! openraft stops its core on any storage error; `serve` watches for that
//! (`core_stopped`) and returns a `StorageFailure` naming the data directory,
//! the failed write and the free bytes left, and the process exits with
//! `EXIT_STORAGE_FAILED` (74). The same happens when the stores cannot be
//! opened at start-up (e.g. on a disk that is still full). The node keeps no
//! state a restart would not rebuild from its disk and its peers, so a
//! supervisor (scripts/cluster runs each node in a restart loop) restarts it;
//! once the disk has room it rejoins and catches up. Its peers elect a new
//! Raft leader meanwhile (see the election defaults in keel-journal serve).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use std::time::SystemTime;

use futures::Stream;
use keel_proto::journal::journal_server::JournalServer;
use keel_proto::journal::raft_server::RaftServer;
use openraft::impls::BasicNode;
use openraft::async_runtime::WatchReceiver;
use tokio::sync::mpsc;
use tokio::sync::watch;

use crate::proposer::MAX_QUEUED_PROPOSALS;
use crate::proposer::Submitter;
use crate::proposer::run_proposer;
use crate::raft_service::RaftTransport;
use crate::service::Node;
pub use crate::service::CATCH_UP_TIMEOUT;
use crate::raft_log_store::LogStore;
use crate::network::MAX_RAFT_MESSAGE_BYTES;
use crate::network::Network;
use crate::state_machine::StateMachineStore;
use crate::streams::MAX_APPEND_BYTES;
use crate::streams::MAX_RETAINED_BYTES_PER_STREAM;
use crate::types::NodeId;
use crate::types::Raft;
use crate::tls::JournalTls;

/// Every bound and duration of a journal node.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub node_id: NodeId,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// All members, this node included: id -> host:port.
    pub peers: BTreeMap<NodeId, String>,
    pub heartbeat_ms: u64,
    pub election_min_ms: u64,
    pub election_max_ms: u64,
    /// Group-commit window: how long the log waits for more writes before
    /// an fsync. 0 syncs as soon as anything is queued.
    pub flush_wait_us: u64,
    /// Build a Raft snapshot after this many entries.
    pub snapshot_every_entries: u64,
    /// … or after this many record bytes were applied, whichever comes
    /// first: the Raft log and trimmed record segments are dropped only at
    /// a snapshot, so this bounds a node's disk when entries are large.
    pub snapshot_every_bytes: u64,
    /// Log entries kept behind the latest snapshot (for lagging followers).
    pub keep_log_entries: u64,
    /// How long a write may wait for commit before it is `outcome-unknown`.
    pub write_timeout_ms: u64,
    /// Records per `Read` response message.
    pub read_batch_records: usize,
    /// Bytes per `Read` response message.
    pub read_batch_bytes: usize,
    /// Untrimmed bytes a stream may hold before this node, as Raft leader,
    /// refuses appends to it (`stream-full`).
    pub stream_quota_bytes: u64,
    /// Mutual TLS for clients and peers (tls.rs), or explicitly none.
    pub tls: JournalTls,
    /// `--join`: endpoints of a running journal this (empty) node asks to
    /// be added to, instead of forming a journal with `peers`.
    pub join: Option<Vec<String>>,
    /// `--metrics`: where to serve Prometheus metrics (`GET /metrics`).
    pub metrics: Option<SocketAddr>,
}

/// Exit code of `keel-journal serve` when the node stopped because its
/// storage failed (sysexits' EX_IOERR): restart it once the disk has room.
pub const EXIT_STORAGE_FAILED: u8 = 74;

/// The node stopped because it could not write (or open) its data: the
/// error `serve` returns, mapped to `EXIT_STORAGE_FAILED`.
#[derive(Debug, Clone)]
pub struct StorageFailure {
    pub data_dir: PathBuf,
    /// What failed, as the storage layer reported it (names the file or
    /// directory and the OS error).
    pub cause: String,
    /// Free bytes on the data directory's filesystem when it failed.
    pub free_bytes: Option<u64>,
}

impl StorageFailure {
    fn new(data_dir: &std::path::Path, cause: impl std::fmt::Display) -> StorageFailure {
        StorageFailure { data_dir: data_dir.to_path_buf(), cause: cause.to_string(), free_bytes: free_bytes(data_dir) }
    }
}

impl std::fmt::Display for StorageFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let free = self.free_bytes.map(|b| b.to_string()).unwrap_or_else(|| "unknown".into());
        write!(
            f,
            "STORAGE_FAILED: this journal node cannot use its data directory {}: {} ({free} bytes free there); \
             it stops (exit code {EXIT_STORAGE_FAILED}) so its peers go on without it: free space or fix the disk, \
             then restart it and it catches up from its peers",
            self.data_dir.display(),
            self.cause
        )
    }
}

impl std::error::Error for StorageFailure {}

/// Bytes free to an unprivileged writer on the filesystem holding `path`.
pub fn free_bytes(path: &std::path::Path) -> Option<u64> {
    fs2::available_space(path).ok()
}

/// `--heartbeat-ms` unless given.
pub const DEFAULT_HEARTBEAT_MS: u64 = 50;
/// `--election-min-ms` / `--election-max-ms` unless given.
///
/// Budget: a Keel primary renews its lease (1000 ms by default) every third
/// of it and keeps it while a renewal sent within the lease less a 100 ms
/// drift margin lands, so after the journal's leader dies right after a
/// renewal, a new leader must commit the next one within ~550 ms. openraft
/// refuses votes while a follower's leader lease (`election_timeout_max`
/// since it last heard the leader) runs, so a new leader takes between
/// `election_max` and about twice that (a candidate that fired early is
/// refused once and fires again): 200–400 ms here. With the earlier
/// 500–1000 ms it took 0.6–2 s and the primary lost its lease; with 200–400
/// ms, 650–750 ms were measured (lapsed).
///
/// Spurious elections: measured on a 2-core box, three debug-build nodes,
/// two busy-loop CPU hogs, 32–64 streamed clients of 1 KB or 100 KB
/// appends: the term never moved past the first election.
pub const DEFAULT_ELECTION_MIN_MS: u64 = 100;
pub const DEFAULT_ELECTION_MAX_MS: u64 = 200;

/// `--snapshot-every-bytes` unless given.
pub const DEFAULT_SNAPSHOT_EVERY_BYTES: u64 = 256 << 20;
/// How often a node checks whether a snapshot is due by bytes.
const SNAPSHOT_CHECK_INTERVAL: Duration = Duration::from_millis(500);

/// `--stream-quota-bytes` unless given.
pub const DEFAULT_STREAM_QUOTA_BYTES: u64 = 1 << 30;

impl ServeConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !self.peers.contains_key(&self.node_id) {
            return Err(format!("--peers does not list this node's id {}", self.node_id));
        }
        for (id, addr) in &self.peers {
            if addr.parse::<SocketAddr>().is_err() && !addr.contains(':') {
                return Err(format!("peer {id} address {addr:?} is not host:port"));
            }
        }
        if self.heartbeat_ms == 0 || self.heartbeat_ms * 2 > self.election_min_ms {
            return Err(format!(
                "heartbeat_ms ({}) must be > 0 and at most half of election_min_ms ({})",
                self.heartbeat_ms, self.election_min_ms
            ));
        }
        if self.election_min_ms >= self.election_max_ms {
            return Err("election_min_ms must be below election_max_ms".into());
        }
        if self.write_timeout_ms < self.election_max_ms {
            return Err("write_timeout_ms must be at least election_max_ms".into());
        }
        if self.snapshot_every_entries == 0 {
            return Err("snapshot_every_entries must be positive".into());
        }
        if self.snapshot_every_bytes < MAX_APPEND_BYTES as u64 {
            return Err(format!("--snapshot-every-bytes must be at least one largest append ({MAX_APPEND_BYTES})"));
        }
        if self.flush_wait_us > MAX_FLUSH_WAIT_US {
            return Err(format!("flush_wait_us {} is above {MAX_FLUSH_WAIT_US}", self.flush_wait_us));
        }
        if self.read_batch_records == 0 || self.read_batch_bytes == 0 {
            return Err("read batch bounds must be positive".into());
        }
        if self.stream_quota_bytes < MAX_APPEND_BYTES as u64 || self.stream_quota_bytes > MAX_RETAINED_BYTES_PER_STREAM {
            return Err(format!(
                "--stream-quota-bytes {} is out of range {MAX_APPEND_BYTES}..={MAX_RETAINED_BYTES_PER_STREAM} \
                 (at least one largest append, at most the journal's hard cap per stream)",
                self.stream_quota_bytes
            ));
        }
        Ok(())
    }
}

/// Raft entries per AppendEntries message. Each entry is one batch of
/// commands (`MAX_BATCH_BYTES`, or one larger append up to
/// `MAX_APPEND_BYTES`), so this bounds what one message holds in memory.
const MAX_ENTRIES_PER_APPEND_ENTRIES: u64 = 8;

/// Longest group-commit window accepted.
pub const MAX_FLUSH_WAIT_US: u64 = 10_000;

/// Parses `1=127.0.0.1:7001,2=…`.
pub fn parse_peers(s: &str) -> Result<BTreeMap<NodeId, String>, String> {
    let mut out = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part.split_once('=').ok_or_else(|| format!("peer {part:?} is not ID=HOST:PORT"))?;
        let id: NodeId = id.trim().parse().map_err(|_| format!("peer id {id:?} is not a number"))?;
        if out.insert(id, addr.trim().to_string()).is_some() {
            return Err(format!("peer id {id} is listed twice"));
        }
    }
    if out.is_empty() {
        return Err("--peers lists no node".into());
    }
    Ok(out)
}

pub(crate) fn now_unix_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).expect("clock after 1970").as_millis() as u64
}

/// Runs a journal node until the process is stopped (Ok) or its Raft core
/// stops: on a storage error the error is a `StorageFailure`.
pub async fn serve(cfg: ServeConfig) -> anyhow::Result<()> {
    cfg.validate().map_err(anyhow::Error::msg)?;
    let storage = |e: std::io::Error| StorageFailure::new(&cfg.data_dir, e);
    std::fs::create_dir_all(&cfg.data_dir)
        .map_err(|e| storage(std::io::Error::new(e.kind(), format!("creating {}: {e}", cfg.data_dir.display()))))?;
    let metrics = Arc::new(crate::metrics::JournalMetrics::new());
    // Before anything is opened: data of a newer release is refused whole.
    match crate::format::ensure(&cfg.data_dir) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => return Err(anyhow::Error::msg(e.to_string())),
        Err(e) => return Err(storage(e).into()),
    }
    let log_store = LogStore::open(&cfg.data_dir.join("raft-log"), Duration::from_micros(cfg.flush_wait_us))
        .map_err(storage)?
        .with_sync_histogram(metrics.log_sync_seconds.clone());
    let sm = StateMachineStore::open(&cfg.data_dir.join("state")).map_err(storage)?;

    let raft_config = openraft::Config {
        cluster_name: "keel-journal".into(),
        heartbeat_interval: cfg.heartbeat_ms,
        election_timeout_min: cfg.election_min_ms,
        election_timeout_max: cfg.election_max_ms,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(cfg.snapshot_every_entries),
        max_in_snapshot_log_to_keep: cfg.keep_log_entries,
        install_snapshot_timeout: 30_000,
        max_payload_entries: MAX_ENTRIES_PER_APPEND_ENTRIES,
        // A follower whose data directory was wiped (the documented cure
        // for a damaged log) comes back with less log than the leader saw:
        // without this the leader's core panics, and now that a stopped
        // core ends the process, the leader would exit.
        allow_log_reversion: Some(true),
        // A restarted leader stands for election like any node, never
        // resumes leadership on its own. Resuming is unsafe here, as
        // openraft documents: the state machine does not fsync what it
        // applies and the commit index is persisted lazily, so a leader
        // back from a crash may hold a state machine, or even a log, shorter
        // than what was acknowledged (a quorum of followers can commit an
        // entry before the leader's own flush). Resumed, it served reads
        // that missed acknowledged records (the rare stale read of
        // `restart_of_all_nodes_recovers_everything`) and would have given
        // a new entry the log id of a lost one. An election only elects a
        // node whose log holds every committed entry.
        enable_leader_restore: Some(false),
        ..Default::default()
    }
    .validate()?;
    let raft = match Raft::new(cfg.node_id, Arc::new(raft_config), Network { tls: cfg.tls.clone() }, log_store, sm.clone()).await {
        Ok(r) => r,
        Err(openraft::errors::Fatal::StorageError(e)) => return Err(StorageFailure::new(&cfg.data_dir, e).into()),
        Err(e) => return Err(e.into()),
    };

    let (proposals, queue) = mpsc::channel(MAX_QUEUED_PROPOSALS);
    tokio::spawn(run_proposer(raft.clone(), queue, metrics.clone()));
    let proposals = Submitter {
        proposals,
        write_timeout_ms: cfg.write_timeout_ms,
        sm: sm.clone(),
        raft: raft.clone(),
        node_id: cfg.node_id,
        stream_quota_bytes: cfg.stream_quota_bytes,
        in_flight: Arc::default(),
    };
    let (recovered_tx, recovered) = watch::channel(false);
    tokio::spawn(recover(raft.clone(), recovered_tx));
    let changers = match (cfg.tls.peer_check(), cfg.tls.admin_check()) {
        (Ok(Some(p)), Ok(Some(a))) => Some([Arc::new(p), Arc::new(a)]),
        (Ok(None), Ok(None)) => None,
        (Err(e), _) | (_, Err(e)) => return Err(anyhow::anyhow!(e)),
        _ => unreachable!("both checks come from the same TLS settings"),
    };
    let node = Arc::new(Node { cfg: cfg.clone(), raft: raft.clone(), sm, proposals, recovered, changers });
    let journal = JournalServer::from_arc(node.clone())
        .max_decoding_message_size(MAX_APPEND_BYTES * 2)
        .max_encoding_message_size(MAX_APPEND_BYTES * 2);
    let peers = cfg.tls.peer_check().map_err(anyhow::Error::msg)?.map(Arc::new);
    let raft_svc = RaftServer::new(RaftTransport { raft: raft.clone(), sm: node.sm.clone(), peers })
        .max_decoding_message_size(MAX_RAFT_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_RAFT_MESSAGE_BYTES);

    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = cfg.tls.server_config() {
        builder = builder.tls_config(tls).map_err(|e| anyhow::anyhow!("TLS: {e}"))?;
    }
    let listener = tokio::net::TcpListener::bind(cfg.listen).await.map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", cfg.listen))?;
    tracing::info!(node_id = cfg.node_id, listen = %cfg.listen, peers = ?cfg.peers, tls = %cfg.tls.describe(), "journal node started");
    if !cfg.tls.is_on() {
        tracing::warn!(listen = %cfg.listen, "INSECURE: this journal node runs without TLS (--insecure): anyone who can reach its port can append, take leases and read every stream");
    }

    tokio::spawn(log_state_changes(raft.clone(), metrics.clone()));
    if let Some(addr) = cfg.metrics {
        // Over TLS with the node's own certificate, unless it runs without.
        let tls = cfg.tls.own_acceptor("the metrics listener").transpose().map_err(anyhow::Error::msg)?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let bound = crate::metrics::serve(addr, render_metrics(raft.clone(), node.sm.clone(), cfg.clone(), metrics.clone()), tls)
            .await
            .map_err(|e| anyhow::anyhow!("cannot serve metrics on {addr}: {e}"))?;
        tracing::info!(url = %format!("{scheme}://{bound}/metrics"), "serving Prometheus metrics");
    }
    tokio::spawn(snapshot_by_bytes(raft.clone(), node.sm.clone(), cfg.snapshot_every_bytes));
    if cfg.join.is_none() {
        tokio::spawn(initialize_when_pristine(raft.clone(), cfg.peers.clone()));
    }
    // Resolves only if the journal refused to add this `--join` node.
    let refused = {
        let cfg = cfg.clone();
        async move {
            match &cfg.join {
                Some(endpoints) => join(endpoints.clone(), &cfg).await,
                None => std::future::pending().await,
            }
        }
    };

    let server = builder
        .add_service(journal)
        .add_service(raft_svc)
        .serve_with_incoming_shutdown(incoming(listener), async {
            let _ = tokio::signal::ctrl_c().await;
        });
    tokio::select! {
        served = server => {
            served?;
            raft.shutdown().await.ok();
            Ok(())
        }
        why = refused => {
            raft.shutdown().await.ok();
            Err(anyhow::anyhow!(why))
        }
        // Not a graceful stop: open streams would hold it up, and nothing
        // here is left to save.
        fatal = core_stopped(raft.clone()) => match fatal {
            openraft::errors::Fatal::StorageError(e) => Err(StorageFailure::new(&cfg.data_dir, e).into()),
            other => Err(anyhow::anyhow!("the Raft core stopped ({other}); this node exits so a supervisor restarts it")),
        },
    }
}

/// Resolves once openraft's core has stopped on its own (a storage error or
/// a panic), with the reason.
async fn core_stopped(raft: Raft) -> openraft::errors::Fatal<crate::types::TypeConfig> {
    let mut rx = raft.metrics();
    loop {
        if let Err(fatal) = &rx.borrow_watched().running_state {
            return fatal.clone();
        }
        if rx.changed().await.is_err() {
            return openraft::errors::Fatal::Stopped;
        }
    }
}

/// Accepted connections, with Nagle's algorithm off (replies are small and
/// latency-bound).
fn incoming(listener: tokio::net::TcpListener) -> impl Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(listener, |listener| async move {
        let conn = listener.accept().await.and_then(|(s, _)| s.set_nodelay(true).map(|()| s));
        Some((conn, listener))
    })
}

/// After a restart the persisted commit index may lag what was acknowledged
/// (it is synced lazily), and a node that was leader resumes as leader at
/// once. Until the cluster commit covers this node's whole durable log and
/// the state machine applied it, reads could miss acknowledged writes, so
/// `linearize` waits for this.
async fn recover(raft: Raft, done: watch::Sender<bool>) {
    loop {
        match raft.wait_for_recovery(Some(Duration::from_secs(1))).await {
            Ok(_) => {
                tracing::info!("recovered: the state machine covers the durable log");
                let _ = done.send(true);
                return;
            }
            Err(openraft::metrics::WaitError::Timeout(..)) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "stopped waiting for recovery");
                return;
            }
        }
    }
}

/// Builds a Raft snapshot whenever `every_bytes` of records were applied
/// since the last one (openraft's own policy counts entries only).
async fn snapshot_by_bytes(raft: Raft, sm: StateMachineStore, every_bytes: u64) {
    let mut tick = tokio::time::interval(SNAPSHOT_CHECK_INTERVAL);
    loop {
        tick.tick().await;
        if sm.bytes_since_snapshot() < every_bytes {
            continue;
        }
        tracing::info!(bytes = sm.bytes_since_snapshot(), every_bytes, "building a snapshot: enough record bytes since the last");
        if raft.trigger().snapshot().await.is_err() {
            return; // the core stopped
        }
        // The build resets the count when it starts; until then, do not ask again.
        let waited = tokio::time::Instant::now();
        while sm.bytes_since_snapshot() >= every_bytes && waited.elapsed() < Duration::from_secs(60) {
            tick.tick().await;
        }
    }
}

/// Every member proposes the same initial membership; openraft accepts it on
/// a pristine node and refuses it once the node has any log, so this is safe
/// on every start.
async fn initialize_when_pristine(raft: Raft, peers: BTreeMap<NodeId, String>) {
    match raft.is_initialized().await {
        Ok(true) => return,
        Ok(false) => {}
        Err(e) => {
            tracing::error!(error = %e, "cannot read raft state");
            return;
        }
    }
    let members: BTreeMap<NodeId, BasicNode> =
        peers.into_iter().map(|(id, addr)| (id, BasicNode { addr })).collect();
    match raft.initialize(members).await {
        Ok(()) => tracing::info!("initialized the journal membership"),
        Err(e) => tracing::info!(error = %e, "membership not initialized here (another member did, or will)"),
    }
}

/// One log line per change of role or Raft leader.
async fn log_state_changes(raft: Raft, metrics: Arc<crate::metrics::JournalMetrics>) {
    let mut rx = raft.metrics();
    let mut last = None;
    let mut last_leader = None;
    loop {
        let now = {
            let m = rx.borrow_watched();
            (m.state, m.current_leader, m.current_term)
        };
        if last != Some(now) {
            tracing::info!(state = ?now.0, leader = ?now.1, term = now.2, "raft state");
            last = Some(now);
        }
        if now.1.is_some() && now.1 != last_leader {
            if last_leader.is_some() {
                metrics.leader_changes.inc();
            }
            last_leader = now.1;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// What `/metrics` shows, read from openraft and the state machine at each
/// scrape.
fn render_metrics(raft: Raft, sm: StateMachineStore, cfg: ServeConfig, metrics: Arc<crate::metrics::JournalMetrics>) -> crate::metrics::Render {
    Arc::new(move || {
        let m = raft.metrics().borrow_watched().clone();
        let membership = m.membership_config.membership();
        metrics.refresh(&crate::metrics::JournalView {
            term: m.current_term,
            is_leader: m.current_leader == Some(cfg.node_id),
            has_leader: m.current_leader.is_some(),
            last_log_index: m.last_log_index.unwrap_or(0),
            applied_index: m.last_applied.as_ref().map(|l| l.index).unwrap_or(0),
            voters: membership.voter_ids().count(),
            learners: membership.learner_ids().count(),
            streams: sm.with_streams(|s| s.streams.iter().map(|(name, st)| (name.clone(), st.retained_bytes)).collect()),
            stream_quota_bytes: cfg.stream_quota_bytes,
            data_free_bytes: free_bytes(&cfg.data_dir),
        });
        metrics.encode()
    })
}

/// A node started with `--join`: asks the journal at `endpoints` to add it
/// (as a learner until caught up, then a voter), retrying while no leader
/// answers. Never resolves once joined; resolves with the reason if the
/// journal refuses (the node then exits).
async fn join(endpoints: Vec<String>, cfg: &ServeConfig) -> String {
    let addr = cfg.peers.get(&cfg.node_id).cloned().unwrap_or_else(|| cfg.listen.to_string());
    let client = match crate::client::JournalClient::new(
        endpoints.clone(),
        crate::client::ClientConfig {
            tls: cfg.tls.clone(),
            request_timeout: CATCH_UP_TIMEOUT,
            retry_for: JOIN_RETRY_FOR,
            ..Default::default()
        },
    ) {
        Ok(c) => c,
        Err(e) => return format!("cannot join the journal at {endpoints:?}: {e}"),
    };
    tracing::info!(node_id = cfg.node_id, %addr, ?endpoints, "joining the journal");
    loop {
        match client.add_node(cfg.node_id, &addr).await {
            Ok(members) => {
                tracing::info!(node_id = cfg.node_id, members = members.members.len(), "joined the journal as a voter");
                return std::future::pending().await;
            }
            Err(e @ crate::client::JournalError::Rejected { .. }) => {
                return format!("the journal at {endpoints:?} refused to add node {} at {addr}: {e}", cfg.node_id);
            }
            Err(e) => {
                tracing::warn!(error = %e, "joining the journal: retrying");
                tokio::time::sleep(JOIN_RETRY_PAUSE).await;
            }
        }
    }
}

/// A `--join` node retries while the journal is unreachable for this long
/// per attempt, pausing `JOIN_RETRY_PAUSE` between attempts.
const JOIN_RETRY_FOR: Duration = Duration::from_secs(60);
const JOIN_RETRY_PAUSE: Duration = Duration::from_secs(1);
