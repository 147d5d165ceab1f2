//! A journal node: one openraft member serving the `Journal` API to clients
//! and the `Raft` transport to its peers, on one gRPC port.
//!
//! Writes: validated here, stamped with this node's clock when they depend on
//! time (only the Raft leader's stamp is ever proposed: a follower answers
//! `not-leader` before stamping), proposed with `client_write`, and answered
//! only after openraft reports the entry committed (fsync'd on a quorum) and
//! applied. A proposal whose fate is not known (timeout, entry discarded by a
//! leader change, node shutting down) is answered `outcome-unknown`, never as
//! success or as a clean failure.
//!
//! Admission: an append that would take its stream's untrimmed bytes (plus
//! appends admitted and not yet answered) over `--stream-quota-bytes` is
//! refused `stream-full` before it is proposed (`streams::admit_append`).
//! Only the Raft leader proposes, so its flag is the one that counts; `apply`
//! keeps a fixed last-resort cap, the same on every node.
//!
//! Reads (`Read`, `GetMeta`, `StreamInfo`) are linearizable: served by the
//! Raft leader after a ReadIndex round (`linearize`), so a read sees every
//! write acknowledged before it began. Followers answer `not-leader`.
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
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use std::time::SystemTime;

use futures::Stream;
use futures::StreamExt;
use keel_proto::journal as pb;
use keel_proto::journal::journal_server::Journal;
use keel_proto::journal::journal_server::JournalServer;
use keel_proto::journal::raft_server::RaftServer;
use openraft::errors::ClientWriteError;
use openraft::impls::BasicNode;
use openraft::async_runtime::WatchReceiver;
use openraft::Instant as _;
use tokio::sync::mpsc;
use tokio::sync::oneshot;
use tokio::sync::watch;
use tonic::Request;
use tonic::Response;
use tonic::Status;

use crate::errors;
use crate::raft_log_store::LogStore;
use crate::network::MAX_RAFT_MESSAGE_BYTES;
use crate::network::Network;
use crate::network::SnapshotChunk;
use crate::network::SnapshotChunkReply;
use crate::records::SnapshotData;
use crate::network::decode;
use crate::network::encode;
use crate::state_machine::StateMachineStore;
use crate::streams::MAX_APPEND_BYTES;
use crate::streams::MAX_RETAINED_BYTES_PER_STREAM;
use crate::streams::admit_append;
use crate::streams::validate;
use crate::types::Command;
use crate::types::NodeId;
use crate::types::Outcome;
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

fn now_unix_ms() -> u64 {
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

struct Node {
    cfg: ServeConfig,
    raft: Raft,
    sm: StateMachineStore,
    proposals: Submitter,
    /// Becomes true once the state machine holds everything this node's
    /// durable log may have acknowledged before a restart (see `recover`).
    recovered: watch::Receiver<bool>,
    /// Who may change the membership (None: no TLS, anyone): journal nodes
    /// (a node started with `--join` adds itself) and the administrator.
    changers: Option<[Arc<crate::tls::PeerCheck>; 2]>,
}

/// Commands waiting to be proposed; past this, writes are refused at once.
const MAX_QUEUED_PROPOSALS: usize = 16_384;
/// Most commands in one Raft entry.
const MAX_BATCH_COMMANDS: usize = 512;
/// Most payload bytes in one Raft entry (a single larger command goes alone).
const MAX_BATCH_BYTES: usize = 4 << 20;
/// Raft entries proposed but not yet applied; while all are in flight, new
/// commands queue up and leave together as the next batch.
const MAX_BATCHES_IN_FLIGHT: usize = 2;

struct Proposal {
    cmd: Command,
    reply: oneshot::Sender<Result<Outcome, Status>>,
}

fn payload_bytes(cmd: &Command) -> usize {
    match cmd {
        Command::Append { records, .. } => records.iter().map(|r| r.len()).sum(),
        Command::CasMeta { value, .. } => value.len(),
        _ => 0,
    }
}

/// Where commands enter: validation, admission control, the proposal queue.
#[derive(Clone)]
struct Submitter {
    proposals: mpsc::Sender<Proposal>,
    write_timeout_ms: u64,
    sm: StateMachineStore,
    raft: Raft,
    node_id: NodeId,
    stream_quota_bytes: u64,
    /// Payload bytes of appends admitted per stream and not answered yet:
    /// they count against the quota until their outcome is known (by then
    /// the applied state holds them, or they failed).
    in_flight: Arc<std::sync::Mutex<BTreeMap<String, u64>>>,
}

/// Releases an admitted append's bytes from `Submitter::in_flight`.
struct Admitted {
    in_flight: Arc<std::sync::Mutex<BTreeMap<String, u64>>>,
    stream: String,
    bytes: u64,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut m = self.in_flight.lock().unwrap();
        if let Some(n) = m.get_mut(&self.stream) {
            *n -= self.bytes;
            if *n == 0 {
                m.remove(&self.stream);
            }
        }
    }
}

impl Submitter {
    /// Admits an append against the stream's quota. Only the Raft leader
    /// decides: elsewhere the proposal is answered `not-leader` anyway. An
    /// unknown stream is left to `apply` (`unknown-stream`).
    fn admit(&self, cmd: &Command) -> Result<Option<Admitted>, Status> {
        let Command::Append { stream, records, .. } = cmd else { return Ok(None) };
        if self.raft.metrics().borrow_watched().current_leader != Some(self.node_id) {
            return Ok(None);
        }
        let add: u64 = records.iter().map(|r| r.len() as u64).sum();
        let Some(retained) = self.sm.with_streams(|s| s.streams.get(stream).map(|st| st.retained_bytes)) else {
            return Ok(None);
        };
        let mut in_flight = self.in_flight.lock().unwrap();
        let pending = in_flight.get(stream).copied().unwrap_or(0);
        admit_append(retained, pending, add, self.stream_quota_bytes)
            .map_err(|held| errors::stream_full(stream, held, self.stream_quota_bytes))?;
        *in_flight.entry(stream.clone()).or_default() += add;
        Ok(Some(Admitted { in_flight: self.in_flight.clone(), stream: stream.clone(), bytes: add }))
    }

    /// Queues `cmd` for proposal now (so commands submitted one after
    /// another are proposed in that order) and returns what waits for its
    /// outcome: committed within `write_timeout_ms`, or `outcome-unknown`.
    fn submit(
        &self,
        cmd: Command,
    ) -> Result<impl std::future::Future<Output = Result<Outcome, Status>> + Send + 'static, Status> {
        validate(&cmd).map_err(errors::invalid)?;
        let admitted = self.admit(&cmd)?;
        let what = cmd.to_string();
        let write_timeout_ms = self.write_timeout_ms;
        let (tx, rx) = oneshot::channel();
        self.proposals.try_send(Proposal { cmd, reply: tx }).map_err(|_| errors::overloaded(MAX_QUEUED_PROPOSALS))?;
        Ok(async move {
            let result = match tokio::time::timeout(Duration::from_millis(write_timeout_ms), rx).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err(errors::outcome_unknown(format!("{what}: the proposal was dropped; it may or may not be applied"))),
                Err(_) => Err(errors::outcome_unknown(format!(
                    "{what} was proposed but not committed within {write_timeout_ms} ms; it may or may not be applied"
                ))),
            };
            drop(admitted);
            result
        })
    }
}

/// Most appends of one `AppendStream` awaiting their outcome; past this the
/// stream's next requests are read only as earlier ones are answered.
const MAX_STREAM_APPENDS_IN_FLIGHT: usize = 256;

fn append_command(r: pb::AppendRequest) -> Command {
    Command::Append {
        stream: r.stream,
        leader: r.leader_uuid,
        records: r.records.into_iter().map(|b| serde_bytes::ByteBuf::from(b.to_vec())).collect(),
        expect_last_seq: r.expect_last_seq,
    }
}

/// The reply to one streamed append: what the unary `Append` would answer.
fn append_reply(result: Result<Outcome, Status>) -> pb::AppendStreamReply {
    use pb::append_stream_reply::Result as R;
    let result = match result {
        Ok(Outcome::Appended { last_seq }) => R::LastSeq(last_seq),
        Ok(other) => R::Error(errors::to_rpc_error(&errors::from_outcome(other))),
        Err(status) => R::Error(errors::to_rpc_error(&status)),
    };
    pb::AppendStreamReply { result: Some(result) }
}

/// Serves one `AppendStream`: each request is submitted as it is read (in
/// order), and answered in order once its outcome is known; up to
/// `MAX_STREAM_APPENDS_IN_FLIGHT` wait at once. The stream ends when the
/// writer ends it (after the last answers) or goes away.
async fn serve_append_stream(
    proposals: Submitter,
    mut inbound: tonic::Streaming<pb::AppendRequest>,
    out: mpsc::Sender<Result<pb::AppendStreamReply, Status>>,
) {
    type Pending = Pin<Box<dyn std::future::Future<Output = Result<Outcome, Status>> + Send>>;
    let mut waiting: futures::stream::FuturesOrdered<Pending> = futures::stream::FuturesOrdered::new();
    let mut reading = true;
    while reading || !waiting.is_empty() {
        tokio::select! {
            biased;
            Some(result) = waiting.next(), if !waiting.is_empty() => {
                if out.send(Ok(append_reply(result))).await.is_err() {
                    return; // the writer went away
                }
            }
            m = inbound.message(), if reading && waiting.len() < MAX_STREAM_APPENDS_IN_FLIGHT => match m {
                Ok(Some(req)) => match proposals.submit(append_command(req)) {
                    Ok(outcome) => waiting.push_back(Box::pin(outcome)),
                    Err(status) => waiting.push_back(Box::pin(std::future::ready(Err(status)))),
                },
                Ok(None) => reading = false,
                Err(_) => return, // the writer's side broke: nobody to answer
            },
        }
    }
}

/// Group commit: proposes queued commands as one Raft entry per batch, in
/// arrival order (submission is sequential, so a client's pipelined commands
/// keep their order), with at most `MAX_BATCHES_IN_FLIGHT` entries awaiting
/// commit. Each command gets its own outcome.
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

async fn run_proposer(raft: Raft, mut queue: mpsc::Receiver<Proposal>, metrics: Arc<crate::metrics::JournalMetrics>) {
    let window = Arc::new(tokio::sync::Semaphore::new(MAX_BATCHES_IN_FLIGHT));
    while let Some(first) = queue.recv().await {
        let Ok(permit) = window.clone().acquire_owned().await else { return };
        let mut bytes = payload_bytes(&first.cmd);
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH_COMMANDS && bytes < MAX_BATCH_BYTES {
            match queue.try_recv() {
                Ok(p) => {
                    bytes += payload_bytes(&p.cmd);
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        let (mut cmds, replies): (Vec<Command>, Vec<_>) = batch.into_iter().map(|p| (p.cmd, p.reply)).unzip();
        let cmd = if cmds.len() == 1 { cmds.pop().unwrap() } else { Command::Batch(cmds) };
        let (responder, done) = openraft::impls::ProgressResponder::complete_only();
        if let Err(fatal) = raft.client_write_ff(cmd, Some(responder)).await {
            for r in replies {
                let _ = r.send(Err(errors::outcome_unknown(format!("the journal node is stopping: {fatal}"))));
            }
            continue;
        }
        let (t0, commit_seconds) = (std::time::Instant::now(), metrics.commit_seconds.clone());
        tokio::spawn(async move {
            let result = done.await;
            drop(permit);
            if matches!(result, Ok(Ok(_))) {
                commit_seconds.observe(t0.elapsed().as_secs_f64());
            }
            deliver(result, replies);
        });
    }
}

/// `not-leader`, naming the leader openraft pointed to.
fn redirect(f: &openraft::errors::ForwardToLeader<crate::types::TypeConfig>) -> Status {
    errors::not_leader(f.leader_id, f.leader_node.as_ref().map(|n| n.addr.clone()))
}

/// Hands each waiting client its outcome.
fn deliver<E: std::fmt::Display>(
    result: Result<openraft::raft::ClientWriteResult<crate::types::TypeConfig>, E>,
    replies: Vec<oneshot::Sender<Result<Outcome, Status>>>,
) {
    let n = replies.len();
    let every = |status: Status| (0..n).map(|_| Err(status.clone())).collect::<Vec<_>>();
    let unknown = |e: String| every(errors::outcome_unknown(format!("{e}; it may or may not be applied")));
    let outcomes: Vec<Result<Outcome, Status>> = match result {
        Ok(Ok(resp)) => match resp.data {
            Outcome::Batch(outs) if n > 1 => {
                debug_assert_eq!(outs.len(), n, "one outcome per batched command");
                outs.into_iter().map(Ok).collect()
            }
            single => vec![Ok(single)],
        },
        // Not appended anywhere: safe for the client to retry elsewhere.
        Ok(Err(ClientWriteError::ForwardToLeader(f))) => every(redirect(&f)),
        Ok(Err(e)) => unknown(e.to_string()),
        Err(e) => unknown(e.to_string()),
    };
    for (reply, outcome) in replies.into_iter().zip(outcomes) {
        let _ = reply.send(outcome);
    }
}

impl Node {
    /// Answers `not-leader` unless this node is the Raft leader, so a time
    /// stamp is only ever taken from the leader's clock.
    fn require_leader(&self) -> Result<(), Status> {
        let leader = self.raft.metrics().borrow_watched().current_leader;
        if leader == Some(self.cfg.node_id) {
            return Ok(());
        }
        Err(errors::not_leader(leader, leader.and_then(|l| self.addr_of(l))))
    }

    async fn propose(&self, cmd: Command) -> Result<Outcome, Status> {
        self.proposals.submit(cmd)?.await
    }

    /// Waits until this node, as Raft leader confirmed by a quorum, has
    /// applied everything committed before the call: a read after this sees
    /// every write acknowledged before the read began.
    async fn linearize(&self) -> Result<(), Status> {
        let timeout = Duration::from_millis(self.cfg.write_timeout_ms);
        let mut recovered = self.recovered.clone();
        if tokio::time::timeout(timeout, recovered.wait_for(|r| *r)).await.map(|r| r.is_ok()) != Ok(true) {
            return Err(errors::not_leader_because("this node is still recovering its log after a restart".into()));
        }
        match tokio::time::timeout(timeout, self.raft.ensure_linearizable(openraft::raft::ReadPolicy::ReadIndex)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(openraft::errors::RaftError::APIError(openraft::errors::LinearizableReadError::ForwardToLeader(f)))) => {
                Err(redirect(&f))
            }
            Ok(Err(e)) => Err(errors::not_leader_because(e.to_string())),
            Err(_) => Err(errors::not_leader_because(format!(
                "could not confirm leadership with a quorum within {} ms",
                self.cfg.write_timeout_ms
            ))),
        }
    }

    fn stamp(&self) -> Result<u64, Status> {
        self.require_leader()?;
        Ok(now_unix_ms())
    }
}

type ReadStream = Pin<Box<dyn Stream<Item = Result<pb::ReadResponse, Status>> + Send>>;
type AppendReplies = Pin<Box<dyn Stream<Item = Result<pb::AppendStreamReply, Status>> + Send>>;

#[tonic::async_trait]
impl Journal for Node {
    async fn append(&self, req: Request<pb::AppendRequest>) -> Result<Response<pb::AppendResponse>, Status> {
        match self.propose(append_command(req.into_inner())).await? {
            Outcome::Appended { last_seq } => Ok(Response::new(pb::AppendResponse { last_seq })),
            other => Err(errors::from_outcome(other)),
        }
    }

    type AppendStreamStream = AppendReplies;

    async fn append_stream(
        &self,
        req: Request<tonic::Streaming<pb::AppendRequest>>,
    ) -> Result<Response<AppendReplies>, Status> {
        let (out, replies) = mpsc::channel(MAX_STREAM_APPENDS_IN_FLIGHT);
        tokio::spawn(serve_append_stream(self.proposals.clone(), req.into_inner(), out));
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(replies))))
    }

    async fn set_leader(
        &self,
        req: Request<pb::SetLeaderRequest>,
    ) -> Result<Response<pb::SetLeaderResponse>, Status> {
        let r = req.into_inner();
        let cmd = Command::SetLeader {
            stream: r.stream,
            new: r.new_uuid,
            expected_old: r.expected_old,
            stamp_unix_ms: self.stamp()?,
        };
        match self.propose(cmd).await? {
            Outcome::LeaderSet { old } => Ok(Response::new(pb::SetLeaderResponse { old_uuid: old })),
            other => Err(errors::from_outcome(other)),
        }
    }

    async fn take_lease(&self, req: Request<pb::TakeLeaseRequest>) -> Result<Response<pb::LeaseResponse>, Status> {
        let r = req.into_inner();
        let cmd = Command::TakeLease {
            stream: r.stream,
            candidate: r.candidate_uuid,
            caught_up_seq: r.caught_up_seq,
            lease_ms: r.lease_ms,
            stamp_unix_ms: self.stamp()?,
        };
        lease_reply(self.propose(cmd).await?)
    }

    async fn renew_lease(&self, req: Request<pb::RenewLeaseRequest>) -> Result<Response<pb::LeaseResponse>, Status> {
        let r = req.into_inner();
        let cmd = Command::RenewLease { stream: r.stream, uuid: r.uuid, stamp_unix_ms: self.stamp()? };
        lease_reply(self.propose(cmd).await?)
    }

    type ReadStream = ReadStream;

    async fn read(&self, req: Request<pb::ReadRequest>) -> Result<Response<ReadStream>, Status> {
        let r = req.into_inner();
        self.linearize().await?;
        // Fail fast, before the stream starts, on a stream that does not exist.
        let first = self.sm.with_streams(|s| s.streams.get(&r.stream).map(|st| st.first_seq));
        let Some(first) = first else {
            return Err(errors::unknown_stream(&r.stream));
        };
        let mut next = if r.from_seq == 0 { first } else { r.from_seq };
        let (tx, rx) = mpsc::channel(READ_CHANNEL_BATCHES);
        let sm = self.sm.clone();
        let (max_records, max_bytes) = (self.cfg.read_batch_records, self.cfg.read_batch_bytes);
        tokio::spawn(async move {
            let mut applied = sm.subscribe();
            loop {
                let batch = sm.with_records(|s, records| match s.streams.get(&r.stream) {
                    None => Err(errors::unknown_stream(&r.stream)),
                    Some(st) if next < st.first_seq => Err(errors::trimmed(&r.stream, next, st.first_seq)),
                    Some(st) if next > st.last_seq => Ok(Vec::new()),
                    Some(st) => records.read(st.id, next, st.last_seq, max_records, max_bytes).map_err(|e| {
                        tracing::error!(stream = %r.stream, from_seq = next, error = %e, "cannot read records");
                        Status::internal(format!("reading {} from seq {next}: {e}", r.stream))
                    }),
                });
                match batch {
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                    Ok(records) if !records.is_empty() => {
                        next = records.last().unwrap().0 + 1;
                        let msg = pb::ReadResponse {
                            records: records
                                .into_iter()
                                .map(|(seq, p)| pb::Record { seq, payload: p.into_vec().into() })
                                .collect(),
                        };
                        if tx.send(Ok(msg)).await.is_err() {
                            return; // reader went away
                        }
                    }
                    Ok(_) if !r.follow => return,
                    Ok(_) => {
                        tokio::select! {
                            changed = applied.changed() => if changed.is_err() { return },
                            _ = tx.closed() => return,
                        }
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn trim(&self, req: Request<pb::TrimRequest>) -> Result<Response<pb::TrimResponse>, Status> {
        let r = req.into_inner();
        // Stamp the bytes the trim drops, read from this node's record store
        // once it has applied everything committed (the count for a given seq
        // never changes, so any later apply agrees).
        self.linearize().await?;
        let upto_bytes = self.sm.with_records(|s, records| match s.streams.get(&r.stream) {
            Some(st) if r.upto_seq >= st.first_seq && r.upto_seq <= st.last_seq => {
                records.bytes_through(st.id, r.upto_seq).map(Some).map_err(|e| {
                    tracing::error!(stream = %r.stream, upto_seq = r.upto_seq, error = %e, "cannot read the record store");
                    Status::internal(format!("reading {} at seq {}: {e}", r.stream, r.upto_seq))
                })
            }
            _ => Ok(None),
        })?;
        match self.propose(Command::Trim { stream: r.stream, upto_seq: r.upto_seq, upto_bytes }).await? {
            Outcome::Trimmed { first_seq } => Ok(Response::new(pb::TrimResponse { first_seq })),
            other => Err(errors::from_outcome(other)),
        }
    }

    async fn get_meta(&self, req: Request<pb::GetMetaRequest>) -> Result<Response<pb::GetMetaResponse>, Status> {
        let r = req.into_inner();
        self.linearize().await?;
        self.sm.with_streams(|s| {
            let st = s.streams.get(&r.stream).ok_or_else(|| errors::unknown_stream(&r.stream))?;
            Ok(Response::new(match st.meta.get(&r.key) {
                Some(v) => pb::GetMetaResponse { found: true, value: v.to_vec().into() },
                None => pb::GetMetaResponse { found: false, value: Default::default() },
            }))
        })
    }

    async fn cas_meta(&self, req: Request<pb::CasMetaRequest>) -> Result<Response<pb::CasMetaResponse>, Status> {
        let r = req.into_inner();
        let cmd = Command::CasMeta {
            stream: r.stream,
            key: r.key,
            expected: r.expected.map(|b| serde_bytes::ByteBuf::from(b.to_vec())),
            value: serde_bytes::ByteBuf::from(r.value.to_vec()),
        };
        match self.propose(cmd).await? {
            Outcome::MetaSet => Ok(Response::new(pb::CasMetaResponse {})),
            other => Err(errors::from_outcome(other)),
        }
    }

    async fn stream_info(
        &self,
        req: Request<pb::StreamInfoRequest>,
    ) -> Result<Response<pb::StreamInfoResponse>, Status> {
        let r = req.into_inner();
        self.linearize().await?;
        self.sm.with_streams(|s| {
            let st = s.streams.get(&r.stream).ok_or_else(|| errors::unknown_stream(&r.stream))?;
            Ok(Response::new(pb::StreamInfoResponse {
                leader_uuid: st.leader.clone(),
                lease_deadline_unix_ms: st.lease_deadline_unix_ms,
                first_seq: st.first_seq,
                last_seq: st.last_seq,
                bytes: st.retained_bytes,
                quota_bytes: self.cfg.stream_quota_bytes,
            }))
        })
    }

    async fn status(&self, _req: Request<pb::StatusRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        let m = self.raft.metrics().borrow_watched().clone();
        let leader_addr = m.current_leader.and_then(|l| self.addr_of(l)).unwrap_or_default();
        let members = m
            .membership_config
            .membership()
            .nodes()
            .map(|(id, n)| pb::Member { node_id: *id, addr: n.addr.clone() })
            .collect();
        Ok(Response::new(pb::StatusResponse {
            node_id: self.cfg.node_id,
            state: format!("{:?}", m.state),
            term: m.current_term,
            raft_leader_id: m.current_leader,
            raft_leader_addr: leader_addr,
            last_log_index: m.last_log_index.unwrap_or(0),
            last_applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
            members,
            streams: self.sm.with_streams(|s| s.streams.keys().cloned().collect()),
            data_free_bytes: free_bytes(&self.cfg.data_dir),
            membership_index: m.membership_config.log_id().as_ref().map(|l| l.index).unwrap_or(0),
        }))
    }

    async fn add_node(&self, req: Request<pb::AddNodeRequest>) -> Result<Response<pb::MembersResponse>, Status> {
        self.admit_changer(&req)?;
        let r = req.into_inner();
        self.add_node(r.node_id, r.addr).await?;
        self.members_now().map(Response::new)
    }

    async fn remove_node(&self, req: Request<pb::RemoveNodeRequest>) -> Result<Response<pb::MembersResponse>, Status> {
        self.admit_changer(&req)?;
        self.remove_node(req.into_inner().node_id).await?;
        self.members_now().map(Response::new)
    }

    async fn members(&self, _req: Request<pb::MembersRequest>) -> Result<Response<pb::MembersResponse>, Status> {
        self.members_now().map(Response::new)
    }
}

pub use keel_journal_client::limits::CATCH_UP_TIMEOUT;
/// How long a leader that is removed waits for its chosen successor to take
/// over.
const HAND_OVER_TIMEOUT: Duration = Duration::from_secs(5);

/// Membership changes (the decisions are membership.rs's).
impl Node {
    /// Address of member `id`, from the membership (a member added after
    /// this node started is not in `--peers`), else `--peers`.
    fn addr_of(&self, id: NodeId) -> Option<String> {
        let m = self.raft.metrics().borrow_watched().membership_config.clone();
        let found = m.membership().nodes().find(|(n, _)| **n == id).map(|(_, n)| n.addr.clone());
        found.or_else(|| self.cfg.peers.get(&id).cloned())
    }

    fn admit_changer<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let Some(checks) = &self.changers else { return Ok(()) };
        let chain = req.peer_certs();
        let chain = chain.as_deref().map(|c| c.as_slice());
        let mut why = Vec::new();
        for c in checks {
            match c.check(chain) {
                Ok(()) => return Ok(()),
                Err(e) => why.push(e),
            }
        }
        Err(errors::not_allowed(format!(
            "only the journal's administrator (the `{}` certificate, keel-journal ctl) or a journal node may change the membership: {}",
            crate::tls::ADMIN_CERT_NAME,
            why.join("; ")
        )))
    }

    /// Voters, and whether the leader heard from each within
    /// `ANSWERED_WITHIN`. A leader elected a moment ago has not heard from
    /// everyone yet: it waits up to `ANSWERED_WITHIN` for a first answer
    /// from each before counting a voter as silent.
    async fn answering(&self) -> BTreeMap<NodeId, bool> {
        let deadline = tokio::time::Instant::now() + crate::membership::ANSWERED_WITHIN;
        let mut rx = self.raft.metrics();
        loop {
            let m = rx.borrow_watched().clone();
            let heard = m.heartbeat.clone().unwrap_or_default();
            let mut unknown = false;
            let out: BTreeMap<NodeId, bool> = m
                .membership_config
                .membership()
                .voter_ids()
                .map(|id| {
                    if id == self.cfg.node_id {
                        return (id, true);
                    }
                    match heard.get(&id).and_then(|t| t.as_ref()) {
                        Some(t) => (id, t.elapsed() < crate::membership::ANSWERED_WITHIN),
                        None => {
                            unknown = true;
                            (id, false)
                        }
                    }
                })
                .collect();
            if !unknown || tokio::time::Instant::now() >= deadline {
                return out;
            }
            let _ = tokio::time::timeout_at(deadline, rx.changed()).await;
        }
    }

    async fn add_node(&self, id: NodeId, addr: String) -> Result<(), Status> {
        use crate::membership::Change;
        use crate::membership::Plan;
        self.require_leader()?;
        if id == 0 {
            return Err(errors::invalid("node id 0 is not a node id"));
        }
        if !addr.contains(':') || addr.len() > 255 {
            return Err(errors::invalid(format!("node address {addr:?} is not host:port")));
        }
        let known = self.raft.metrics().borrow_watched().membership_config.clone();
        if let Some((_, n)) = known.membership().nodes().find(|(n, _)| **n == id) {
            if n.addr != addr {
                return Err(errors::membership_refused(format!(
                    "node {id} is a member at {}; remove it first (remove-node {id}) or give the new node another id",
                    n.addr
                )));
            }
        }
        if let Some((other, _)) = known.membership().nodes().find(|(n, b)| **n != id && b.addr == addr) {
            return Err(errors::membership_refused(format!("node {other} is a member at {addr}; one address, one node")));
        }
        match crate::membership::check(&self.answering().await, self.cfg.node_id, Change::Add(id)).map_err(errors::membership_refused)? {
            Plan::Nothing => return Ok(()),
            Plan::Voters(_) | Plan::HandOver { .. } => {}
        }
        tracing::info!(node_id = id, %addr, "adding a journal node: first as a learner, until it has caught up");
        let t0 = std::time::Instant::now();
        match tokio::time::timeout(CATCH_UP_TIMEOUT, self.raft.add_learner(id, BasicNode { addr: addr.clone() }, true)).await {
            Err(_) => {
                return Err(errors::membership_refused(format!(
                    "node {id} at {addr} is a learner and has not caught up within {} s; run add-node again to keep waiting, or remove-node {id}",
                    CATCH_UP_TIMEOUT.as_secs()
                )));
            }
            Ok(r) => r.map_err(|e| self.change_failed(e))?,
        };
        tracing::info!(node_id = id, caught_up_ms = t0.elapsed().as_millis() as u64, "the new journal node caught up; making it a voter");
        self.change(openraft::ChangeMembers::AddVoterIds([id].into())).await?;
        tracing::info!(node_id = id, "the journal node is a voter");
        Ok(())
    }

    async fn remove_node(&self, id: NodeId) -> Result<(), Status> {
        use crate::membership::Change;
        use crate::membership::Plan;
        self.require_leader()?;
        let known = self.raft.metrics().borrow_watched().membership_config.clone();
        let is_learner = known.membership().learner_ids().any(|l| l == id);
        if is_learner {
            tracing::info!(node_id = id, "removing a learner from the journal");
            return self.change(openraft::ChangeMembers::RemoveNodes([id].into())).await;
        }
        match crate::membership::check(&self.answering().await, self.cfg.node_id, Change::Remove(id)).map_err(errors::membership_refused)? {
            Plan::Nothing => Ok(()),
            Plan::HandOver { to } => {
                tracing::info!(node_id = id, to, "this Raft leader is to be removed: handing leadership over first");
                self.raft.trigger().transfer_leader(to).await.map_err(|e| errors::not_leader_because(e.to_string()))?;
                let mut rx = self.raft.metrics();
                let moved = tokio::time::timeout(HAND_OVER_TIMEOUT, async {
                    loop {
                        let leader = rx.borrow_watched().current_leader;
                        if leader.is_some() && leader != Some(self.cfg.node_id) {
                            return leader;
                        }
                        if rx.changed().await.is_err() {
                            return None;
                        }
                    }
                })
                .await
                .ok()
                .flatten();
                // The client retries at the new leader, which removes this node.
                Err(errors::not_leader(moved, moved.and_then(|l| self.addr_of(l))))
            }
            Plan::Voters(_) => {
                tracing::info!(node_id = id, "removing a journal node");
                self.change(openraft::ChangeMembers::RemoveVoters([id].into())).await?;
                tracing::info!(node_id = id, "the journal node is removed; stop its process");
                Ok(())
            }
        }
    }

    /// Proposes `what` (removed nodes leave the cluster, not kept as
    /// learners) and waits until it is committed.
    async fn change(&self, what: openraft::ChangeMembers<NodeId, BasicNode>) -> Result<(), Status> {
        self.raft.change_membership(what, false).await.map(|_| ()).map_err(|e| self.change_failed(e))
    }

    fn change_failed(&self, e: openraft::errors::RaftError<crate::types::TypeConfig, ClientWriteError<crate::types::TypeConfig>>) -> Status {
        match e {
            openraft::errors::RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => redirect(&f),
            openraft::errors::RaftError::APIError(ClientWriteError::ChangeMembershipError(c)) => {
                errors::membership_refused(format!("{c}; retry when the change in progress has committed"))
            }
            other => errors::outcome_unknown(format!("membership change: {other}; check `keel-journal ctl members`")),
        }
    }

    /// The members as this node (which must be the Raft leader) sees them.
    fn members_now(&self) -> Result<pb::MembersResponse, Status> {
        self.require_leader()?;
        let m = self.raft.metrics().borrow_watched().clone();
        let last = m.last_log_index.unwrap_or(0);
        let matched = m.replication.clone().unwrap_or_default();
        let heard = m.heartbeat.clone().unwrap_or_default();
        let membership = m.membership_config.membership();
        let voters: std::collections::BTreeSet<NodeId> = membership.voter_ids().collect();
        let members = membership
            .nodes()
            .map(|(id, n)| {
                let (behind, since) = if *id == self.cfg.node_id {
                    (0, Some(0))
                } else {
                    let held = matched.get(id).and_then(|l| l.as_ref()).map(|l| l.index).unwrap_or(0);
                    (last.saturating_sub(held), heard.get(id).and_then(|t| t.as_ref()).map(|t| t.elapsed().as_millis() as u64))
                };
                pb::MemberState {
                    node_id: *id,
                    addr: n.addr.clone(),
                    role: if voters.contains(id) { "voter" } else { "learner" }.into(),
                    behind,
                    millis_since_heard: since,
                }
            })
            .collect();
        Ok(pb::MembersResponse { leader_id: self.cfg.node_id, members, last_log_index: last })
    }
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

/// Read responses buffered per reader before the reader must consume.
const READ_CHANNEL_BATCHES: usize = 4;

fn lease_reply(outcome: Outcome) -> Result<Response<pb::LeaseResponse>, Status> {
    match outcome {
        Outcome::Lease { leader, deadline_unix_ms, last_seq } => {
            Ok(Response::new(pb::LeaseResponse { deadline_unix_ms, leader_uuid: leader, last_seq }))
        }
        other => Err(errors::from_outcome(other)),
    }
}

/// Receives openraft's messages from peers.
struct RaftTransport {
    raft: Raft,
    sm: StateMachineStore,
    /// Who may call it (None: no TLS, anyone).
    peers: Option<Arc<crate::tls::PeerCheck>>,
}

impl RaftTransport {
    /// With TLS, only journal nodes may call the Raft service (tls.rs).
    fn admit<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let Some(peers) = &self.peers else { return Ok(()) };
        let chain = req.peer_certs();
        peers.check(chain.as_deref().map(|c| c.as_slice())).map_err(|why| {
            tracing::warn!(remote = ?req.remote_addr(), %why, "refused a Raft call");
            Status::permission_denied(format!("PERMISSION_DENIED: only journal nodes may call the Raft service: {why}"))
        })
    }
}

fn raft_reply<T: serde::Serialize>(v: &T) -> Result<Response<pb::RaftMessage>, Status> {
    let data = encode(v).map_err(Status::internal)?;
    Ok(Response::new(pb::RaftMessage { data: data.into() }))
}

#[tonic::async_trait]
impl keel_proto::journal::raft_server::Raft for RaftTransport {
    async fn vote(&self, req: Request<pb::RaftMessage>) -> Result<Response<pb::RaftMessage>, Status> {
        self.admit(&req)?;
        let rpc = decode(&req.into_inner().data).map_err(Status::invalid_argument)?;
        let res = self.raft.vote(rpc).await.map_err(|e| e.to_string());
        raft_reply(&res)
    }

    async fn transfer_leader(&self, req: Request<pb::RaftMessage>) -> Result<Response<pb::RaftMessage>, Status> {
        self.admit(&req)?;
        let rpc = decode(&req.into_inner().data).map_err(Status::invalid_argument)?;
        let res = self.raft.handle_transfer_leader(rpc).await.map_err(|e| e.to_string());
        raft_reply(&res)
    }

    async fn append_entries(&self, req: Request<pb::RaftMessage>) -> Result<Response<pb::RaftMessage>, Status> {
        self.admit(&req)?;
        let rpc = decode(&req.into_inner().data).map_err(Status::invalid_argument)?;
        let res = self.raft.append_entries(rpc).await.map_err(|e| e.to_string());
        raft_reply(&res)
    }

    type StreamAppendStream = Pin<Box<dyn Stream<Item = Result<pb::RaftMessage, Status>> + Send>>;

    async fn stream_append(
        &self,
        req: Request<tonic::Streaming<pb::RaftMessage>>,
    ) -> Result<Response<Self::StreamAppendStream>, Status> {
        self.admit(&req)?;
        // A request that does not decode, or a broken link, ends the input:
        // openraft answers what came before it and the stream ends; the
        // leader then starts a new one.
        let requests = futures::stream::unfold(req.into_inner(), |mut inbound| async move {
            let m = inbound.message().await.ok()??;
            match decode::<openraft::raft::AppendEntriesRequest<crate::types::TypeConfig>>(&m.data) {
                Ok(r) => Some((r, inbound)),
                Err(e) => {
                    tracing::warn!(error = %e, "undecodable AppendEntries on a replication stream; closing it");
                    None
                }
            }
        });
        let replies = self.raft.stream_append(requests).map(|r| {
            let reply: crate::network::StreamReply = r.map_err(|e| e.to_string());
            encode(&reply).map(|data| pb::RaftMessage { data: data.into() }).map_err(Status::internal)
        });
        Ok(Response::new(Box::pin(replies)))
    }

    async fn install_snapshot(&self, req: Request<pb::RaftMessage>) -> Result<Response<pb::RaftMessage>, Status> {
        self.admit(&req)?;
        let chunk: SnapshotChunk = decode(&req.into_inner().data).map_err(Status::invalid_argument)?;
        let reply: SnapshotChunkReply = match self.sm.stage_chunk(&chunk.meta, chunk.offset, chunk.data, chunk.done).await {
            Err(e) => {
                tracing::warn!(offset = chunk.offset, error = %e, "refused a snapshot chunk");
                Err(format!("staging snapshot chunk at {}: {e}", chunk.offset))
            }
            Ok(None) => Ok(None),
            Ok(Some(data)) => {
                let snapshot = openraft::alias::SnapshotOf::<crate::types::TypeConfig, SnapshotData> { meta: chunk.meta, snapshot: data };
                self.raft.install_full_snapshot(chunk.vote, snapshot).await.map(Some).map_err(|e| e.to_string())
            }
        };
        raft_reply(&reply)
    }
}
