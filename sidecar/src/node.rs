//! A Keel node: the role loop of one sidecar beside one redis-server.
//!
//! ```text
//!   start ──► stream new, or led by this node? ──yes──► lead (primary.rs)
//!                  │ no                                   │ fenced / Redis lost
//!                  ▼                                      │ its history
//!             follow: Redis is REPLICAOF the feeder ◄─────┘
//!             (feeder.rs); every poll: caught up and
//!             the lease lapsed (+ backoff)? ──► take the lease ──► lead
//! ```
//!
//! Invariants:
//! - Redis is only made a replica when the journal holds a stream (a new
//!   node on an empty journal keeps its data: that becomes the base);
//! - the lease is only taken by a node whose Redis applied every record
//!   (checked here, and by the journal);
//! - the lease is only renewed while the local Redis answers (primary.rs):
//!   a dead or paused Redis lets it lapse, so a replica takes over;
//! - every node registers its addresses in the stream's metadata
//!   (`members`), which discovery answers from.
//!
//! A record no node can read (stall.rs). The election rule: a node stands
//! for election (takes the lease, or leads again under its own lease) only
//! when its feed is not stalled and its Redis applied every record up to
//! the stream's last seq (`Candidate::step`). A feed that stalled at record
//! `n` has applied at most `n - 1`, and nothing after `n` can be fed, so a
//! stalled node never leads, whatever else the counts say; the journal's
//! own check (`caught_up_seq`) only sees what the node claims. A node that
//! meets the record while leading (`Stop::Stalled`, when it reads the tail)
//! or finds that another writer appended under its lease
//! (`Stop::Overtaken`) fences its Redis (`KEEL.FENCED`: held writes fail,
//! nothing more is served as primary) and follows; it is logged once, and
//! the node keeps running, reporting the stall (`KEEL.STALLED`, `INFO
//! keel`). With every node stalled the stream has no primary until an
//! operator acts; that is said in every node's log and `INFO keel`.
//!
//! Engines (engine.rs): a node whose server is refused the stream's base or
//! records is stalled as above. A node whose engine writes an RDB the
//! stream's latest writer cannot load (a Valkey 9.1 replica of a Redis 7.0
//! primary) stands only when handed the primary by name (a live handover
//! record naming it: `FAILOVER TO`), or when every other live member's
//! engine loads its RDB (`engine::may_stand`; the members are read only
//! when the writer alone does not decide).

use std::sync::Arc;
use std::time::Duration;
use std::time::SystemTime;

use keel_journal_client::client::JournalClient;
use keel_journal_client::client::JournalError;
use tokio::net::TcpListener;
use crate::link::RedisAddr;
use tokio::sync::watch;

use crate::auth::Credentials;
use crate::feeder::Feeder;
use crate::handover;
use crate::handover::HANDOVER_META_KEY;
use crate::handover::HandoverRecord;
use crate::lease::Candidate;
use crate::lease::Step;
use crate::lease::StreamView;
use crate::primary;
use crate::primary::PrimaryConfig;
use crate::primary::Stop;
use crate::redis::info_field;
use crate::redis::Conn;
use crate::resp::Reply;
use crate::sentinel;
use crate::sentinel::Addr;
use crate::sentinel::SentinelPeer;
use crate::sentinel::View;

/// Every bound of a node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub primary: PrimaryConfig,
    /// Where the feeder listens for the local Redis (port 0: any free one).
    pub feed_listen: String,
    /// The Sentinel-compatible discovery endpoint, if any.
    pub sentinel_listen: Option<String>,
    /// How that endpoint serves: TLS or not, password or not.
    pub sentinel_access: sentinel::Access,
    pub master_name: String,
    /// How often a follower looks at the lease and its Redis.
    pub poll_ms: u64,
    /// Where published snapshots are read from (full resyncs after a trim).
    pub store: Option<crate::snapshot::SnapshotStore>,
    /// Where to serve Prometheus metrics (metrics.rs), if anywhere.
    pub metrics: Option<std::net::SocketAddr>,
    /// Serve them over TLS with this (else plain HTTP).
    pub metrics_tls: Option<crate::metrics::MetricsTls>,
}

impl NodeConfig {
    pub fn validate(&self) -> Result<(), String> {
        self.primary.validate()?;
        if self.poll_ms == 0 || self.poll_ms > self.primary.lease_ms {
            return Err(format!("--poll-ms {} must be 1..=lease_ms", self.poll_ms));
        }
        if self.master_name.is_empty() || self.master_name.contains(char::is_whitespace) {
            return Err(format!("--master-name {:?} must be one word", self.master_name));
        }
        Ok(())
    }
}

/// Metadata key listing the nodes of a stream.
pub const MEMBERS_KEY: &str = "members";

/// One node as registered: uuid, Redis address, discovery address, and
/// when it last said it is alive (journal-independent wall clock, ms).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub uuid: String,
    pub redis: String,
    pub sentinel: String,
    pub seen_unix_ms: u64,
    /// Its server's engine (`redis/7.0.15`, engine.rs), empty when not
    /// known yet (or written by a release that did not say).
    pub engine: String,
}

/// How often a node refreshes its entry, and after how long without a
/// refresh discovery stops listing it (a node that is gone for good).
pub const MEMBER_REFRESH_MS: u64 = 5_000;
pub const MEMBER_STALE_MS: u64 = 4 * MEMBER_REFRESH_MS;

/// `uuid redis sentinel seen_unix_ms [engine]` per line ("-" for no
/// discovery endpoint; an older release reads the first four words only);
/// junk lines are skipped.
pub fn parse_members(b: &[u8]) -> Vec<Member> {
    String::from_utf8_lossy(b)
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let (u, r, s) = (w.next()?, w.next()?, w.next()?);
            let seen_unix_ms = w.next().and_then(|t| t.parse().ok()).unwrap_or(0);
            let engine = w.next().unwrap_or_default().to_string();
            Some(Member { uuid: u.into(), redis: r.into(), sentinel: if s == "-" { String::new() } else { s.into() }, seen_unix_ms, engine })
        })
        .collect()
}

pub fn render_members(ms: &[Member]) -> Vec<u8> {
    ms.iter()
        .map(|m| {
            let engine = if m.engine.is_empty() { String::new() } else { format!(" {}", m.engine) };
            format!("{} {} {} {}{engine}\n", m.uuid, m.redis, if m.sentinel.is_empty() { "-" } else { &m.sentinel }, m.seen_unix_ms)
        })
        .collect::<String>()
        .into_bytes()
}

fn now_unix_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Runs the node until a fatal error.
pub async fn run(cfg: NodeConfig) -> Stop {
    let me = match primary::node_uuid(&cfg.primary.state_dir) {
        Ok(u) => u,
        Err(e) => return Stop::Fatal(format!("state dir {}: {e}", cfg.primary.state_dir.display())),
    };
    let journal = match JournalClient::from_list(&cfg.primary.journal, &cfg.primary.journal_tls) {
        Ok(j) => Arc::new(j),
        Err(e) => return Stop::Fatal(e.to_string()),
    };
    let listener = match TcpListener::bind(&cfg.feed_listen).await {
        Ok(l) => l,
        Err(e) => return Stop::Fatal(format!("feed listener {}: {e}", cfg.feed_listen)),
    };
    let feed_port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    tracing::info!(uuid = %me, stream = %cfg.primary.stream, feed_port, "node starting");
    let me_member = Member {
        uuid: me.clone(),
        redis: cfg.primary.announce.clone(),
        sentinel: cfg.sentinel_listen.clone().unwrap_or_default(),
        seen_unix_ms: 0,
        engine: String::new(),
    };
    let feeder = Feeder::new(journal.clone(), cfg.primary.stream.clone(), me.clone(), cfg.store.clone());
    tokio::spawn(keep_registered(journal.clone(), cfg.primary.stream.clone(), me_member.clone(), feeder.engine_handle()));
    if let Some(addr) = &cfg.sentinel_listen {
        let listener = match TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) => return Stop::Fatal(format!("discovery endpoint {addr}: {e}")),
        };
        let (tx, rx) = watch::channel(View { master_name: cfg.master_name.clone(), ..View::default() });
        tokio::spawn(sentinel::serve_with(listener, rx, cfg.sentinel_access.clone()));
        tokio::spawn(keep_view(journal.clone(), cfg.primary.stream.clone(), me_member, cfg.master_name.clone(), cfg.poll_ms, tx));
    }
    if let Some(addr) = cfg.metrics {
        let scheme = if cfg.metrics_tls.is_some() { "https" } else { "http" };
        match keel_journal_client::metrics::serve(addr, crate::metrics::render(), cfg.metrics_tls.clone().map(|t| t.0)).await {
            Ok(bound) => tracing::info!(url = %format!("{scheme}://{bound}/metrics"), "serving Prometheus metrics"),
            Err(e) => return Stop::Fatal(format!("metrics listener {addr}: {e}")),
        }
        tokio::spawn(crate::metrics::refresh_from_redis(cfg.primary.redis.clone(), cfg.primary.control.clone(), cfg.primary.lease_ms));
    }
    tokio::spawn(report_snapshots(
        journal.clone(),
        cfg.primary.stream.clone(),
        cfg.primary.redis.clone(),
        cfg.primary.control.clone(),
        cfg.primary.lease_ms,
    ));
    let mut quiet = Quiet::default();
    // A handover abandoned after its release: take the lease back at once.
    let mut retake = false;
    loop {
        let info = match journal.stream_info(&cfg.primary.stream).await {
            Ok(i) => Some(i),
            Err(JournalError::Rejected { kind: keel_journal_client::errors::Rejection::UnknownStream, .. }) => None,
            Err(e) => {
                quiet.warn("journal unavailable", &e.to_string());
                tokio::time::sleep(Duration::from_millis(cfg.primary.retry_pause_ms)).await;
                continue;
            }
        };
        let view = info.as_ref().map(|i| (i.leader_uuid.as_str(), i.last_seq));
        let retaking = std::mem::take(&mut retake) && view.is_some_and(|(leader, _)| leader.is_empty() || leader == me);
        if retaking || leads_at_start(&me, view, feeder.stalled().is_some()) {
            let led = tokio::select! {
                stop = primary::lead(&cfg.primary, &journal, &me) => stop,
                never = refuse_feed_connections(&listener) => match never {},
            };
            match led {
                Stop::Fatal(m) => return Stop::Fatal(m),
                Stop::Retry(m) => {
                    quiet.warn("leading interrupted", &m);
                    tokio::time::sleep(Duration::from_millis(cfg.primary.retry_pause_ms)).await;
                    continue;
                }
                Stop::Fenced(m) => tracing::warn!(why = %m, "fenced; following the new leader"),
                Stop::HandedOver(m) => tracing::info!(outcome = %m, "handed over; following the new primary"),
                Stop::HandoverAbandoned(m) => {
                    tracing::warn!(why = %m, "handover abandoned; taking the lease back");
                    retake = true;
                    continue;
                }
                Stop::LostHistory(m) => tracing::warn!(why = %m, "rebuilding the local Redis from the journal"),
                Stop::Overtaken(m) => {
                    tracing::error!(why = %m, "another process appended to the stream under this node's lease; stepped down (writes fenced), following");
                    fence_local(&cfg, &m).await;
                }
                Stop::Stalled { seq, reason } => {
                    // Logged once by the feeder, which stops at it too.
                    let why = feeder.stalled_on(seq, &reason);
                    fence_local(&cfg, &why).await;
                }
            }
        }
        match follow(&cfg, &journal, &feeder, &listener, feed_port, &me).await {
            Ok(()) => {
                quiet.clear();
                crate::metrics::get().became_primary.inc();
                tracing::info!("took the lease; leading")
            }
            Err(Stop::Fatal(m)) => return Stop::Fatal(m),
            Err(e) => {
                quiet.warn("following interrupted", &e.to_string());
                tokio::time::sleep(Duration::from_millis(cfg.primary.retry_pause_ms)).await;
            }
        }
    }
}

/// While this node leads, its feed listener (bound for the node's life)
/// is not served: a connection to it is answered `-NOMASTERLINK` (a Redis
/// retries later) and closed, rather than left unanswered in the listen
/// backlog. Never returns.
async fn refuse_feed_connections(listener: &TcpListener) -> std::convert::Infallible {
    loop {
        match listener.accept().await {
            Ok((sock, _)) => {
                let _ = sock.try_write(b"-NOMASTERLINK Keel: this node is the primary; its replica feed serves only while it follows\r\n");
            }
            Err(e) => {
                tracing::warn!(error = %e, "feed listener");
                tokio::time::sleep(crate::feeder::ACCEPT_RETRY_PAUSE).await;
            }
        }
    }
}

/// Whether this node leads without an election: on a new stream, or one
/// it leads already (a restarted sidecar under its own lease); `stream`:
/// (leader uuid, last seq), None for a stream that does not exist yet.
/// Never while its feed is stalled, not even under its own lease.
fn leads_at_start(me: &str, stream: Option<(&str, u64)>, stalled: bool) -> bool {
    if stalled {
        return false;
    }
    match stream {
        None => true,
        Some((leader, last_seq)) => leader == me || (last_seq == 0 && leader.is_empty()),
    }
}

/// Tells the local Redis it is not the primary (`KEEL.FENCED`: held writes
/// fail, nothing is served as primary); best effort: the follow loop makes
/// it a replica next anyway.
async fn fence_local(cfg: &NodeConfig, why: &str) {
    let p = &cfg.primary;
    if let Err(e) = redis_command(&p.redis, &p.control, &[b"KEEL.FENCED", why.as_bytes()], p.lease_ms).await {
        tracing::warn!(error = %e, "could not fence the local Redis; it becomes a replica next");
    }
}

/// Logs a repeated interruption (a Redis that stays down) once, not at
/// every retry.
#[derive(Default)]
struct Quiet {
    last: String,
}

impl Quiet {
    fn warn(&mut self, what: &str, why: &str) {
        let w = format!("{what}: {why}");
        if w != self.last {
            tracing::warn!(why, "{what} (retrying quietly)");
            self.last = w;
        }
    }

    fn clear(&mut self) {
        self.last.clear();
    }
}

/// `INFO server replication` of the local Redis (its engine, for
/// engine.rs, and its replication state), within `timeout_ms`.
pub async fn redis_info(redis: &RedisAddr, creds: &Credentials, timeout_ms: u64) -> Result<String, Stop> {
    redis_info_section(redis, creds, "server replication", timeout_ms).await
}

/// `INFO <section>` of the local Redis, within `timeout_ms`.
pub async fn redis_info_section(redis: &RedisAddr, creds: &Credentials, section: &str, timeout_ms: u64) -> Result<String, Stop> {
    crate::redis::within(redis, timeout_ms, async {
        let mut c = Conn::connect(redis, creds).await?;
        c.info(section).await
    })
    .await
    .map_err(Stop::Retry)
}

/// Sends one command to the local Redis on a fresh connection and reads
/// its reply, within `timeout_ms`.
async fn redis_command(redis: &RedisAddr, creds: &Credentials, args: &[&[u8]], timeout_ms: u64) -> Result<Reply, Stop> {
    crate::redis::within(redis, timeout_ms, async { Conn::connect(redis, creds).await?.request(args).await }).await.map_err(Stop::Retry)
}

/// Feeds the local Redis as a replica until this node takes the lease.
async fn follow(
    cfg: &NodeConfig,
    journal: &Arc<JournalClient>,
    feeder: &Feeder,
    listener: &TcpListener,
    feed_port: u16,
    me: &str,
) -> Result<(), Stop> {
    let p = &cfg.primary;
    let port = feed_port.to_string();
    let (stop_tx, stop_rx) = watch::channel(false);
    let candidate = Candidate {
        me: me.to_string(),
        lease_ms: p.lease_ms,
        // 0..lease/4, fixed per node.
        backoff_ms: u64::from_str_radix(&me[..4], 16).unwrap_or(0) % (p.lease_ms / 4).max(1),
        poll_ms: cfg.poll_ms,
    };
    let elect = async {
        let mut logged = "";
        // Why the engine rule last held this node back (logged once).
        let mut held_back = String::new();
        // Whether the module may show a stall (told at the first poll).
        let mut told_stall = true;
        // Whether this Redis was given the feed's password (at every
        // follow: a Redis restarted meanwhile has lost it).
        let mut told_token = false;
        loop {
            // Keep Redis a replica of the feeder.
            let info = redis_info(&p.redis, &p.control, p.lease_ms).await?;
            // Read at every poll: the server may have been restarted on
            // another engine (a rolling upgrade) while this sidecar ran.
            feeder.set_local_engine(crate::engine::Engine::from_info(&info));
            let feeding = info_field(&info, "role") == Some("slave")
                && info_field(&info, "master_host") == Some("127.0.0.1")
                && info_field(&info, "master_port") == Some(port.as_str());
            if !feeding || !told_token {
                // The feed's password first (feeder.rs), then the link.
                let r = redis_command(&p.redis, &p.control, &[b"CONFIG", b"SET", b"masterauth", feeder.token().as_bytes()], p.lease_ms).await?;
                if let Reply::Error(e) = r {
                    return Err(Stop::Retry(format!("Redis refused CONFIG SET masterauth: -{e}")));
                }
                told_token = true;
            }
            if !feeding {
                let r = redis_command(&p.redis, &p.control, &[b"REPLICAOF", b"127.0.0.1", port.as_bytes()], p.lease_ms).await?;
                tracing::info!(reply = ?r, feed_port, "the local Redis now replicates from the journal");
            }
            let view = match journal.stream_info(&p.stream).await {
                Ok(i) => StreamView { leader: i.leader_uuid, deadline_unix_ms: i.lease_deadline_unix_ms, last_seq: i.last_seq },
                Err(e) => {
                    tracing::warn!(error = %e, "journal unavailable");
                    tokio::time::sleep(Duration::from_millis(cfg.poll_ms)).await;
                    continue;
                }
            };
            // A primary handing over (handover.rs): poll fast while its
            // record is live, and leave the lease to the successor it names.
            let now = now_unix_ms();
            let record = match journal.get_meta(&p.stream, HANDOVER_META_KEY).await {
                Ok(Some(b)) => HandoverRecord::decode(&b).filter(|r| r.live(now) && r.from != me),
                _ => None,
            };
            if let Some(r) = record.as_ref().filter(|r| r.poll_fast(&view.leader, now)) {
                handover::poll_fast_until(r.until_unix_ms);
            }
            let pause_ms = handover::poll_pause_ms(cfg.poll_ms, now);
            let progress = *feeder.progress.borrow();
            if feeding {
                let end = feeder.history.lock().unwrap().end().unwrap_or(0).to_string();
                let args: [&[u8]; 4] = [b"KEEL.FOLLOWING", view.leader.as_bytes(), p.stream.as_bytes(), end.as_bytes()];
                if let Err(e) = redis_command(&p.redis, &p.control, &args, p.lease_ms).await {
                    tracing::debug!(error = %e, "KEEL.FOLLOWING");
                }
            }
            let stall = feeder.stalled();
            if stall.is_some() || told_stall {
                // Told at every poll while stalled: a Redis restarted
                // meanwhile learns it again.
                let (seq, reason) = stall.as_ref().map(|s| (s.seq.to_string(), s.reason.as_str())).unwrap_or(("0".into(), ""));
                let args: [&[u8]; 3] = [b"KEEL.STALLED", seq.as_bytes(), reason.as_bytes()];
                match redis_command(&p.redis, &p.control, &args, p.lease_ms).await {
                    Ok(_) => told_stall = stall.is_some(),
                    Err(e) => tracing::debug!(error = %e, "KEEL.STALLED"),
                }
            }
            let applied: u64 = info_field(&info, "slave_repl_offset").and_then(|o| o.parse().ok()).unwrap_or(0);
            let link_up = info_field(&info, "master_link_status") == Some("up");
            // Caught up: Redis applied every byte fed, or every whole
            // command of them, the rest being the unfinished last command
            // of a writer that died (no client was answered for it; the
            // next leader voids it, after checking it is unfinished).
            let applied_all = applied == progress.fed_offset || applied == progress.whole_offset;
            let mut applied_seq = if feeding && link_up && progress.fed_seq > 0 && applied_all { progress.fed_seq } else { 0 };
            if feeder.history.lock().unwrap().base().is_none() && view.last_seq > 0 {
                // A stream whose first base RDB was never completed (its
                // writer died mid-way): nothing was ever acknowledged on it,
                // so there is nothing to catch up on; a new leader voids it
                // and journals its own base.
                let _ = feeder.refresh().await;
                if feeder.history.lock().unwrap().base().is_none() {
                    applied_seq = view.last_seq;
                }
            }
            let mut step = match record.as_ref().filter(|r| r.keeps_out(me, now) && (view.leader.is_empty() || r.adopting())) {
                Some(r) if r.adopting() => Step::Wait {
                    ms: pause_ms,
                    why: "the stream is being adopted from a running Redis, its primary until the switch (scripts/cluster adopt)",
                },
                Some(_) => Step::Wait { ms: pause_ms, why: "the primary handed over to another node" },
                None => candidate.step(&view, applied_seq, stall.is_some(), now_unix_ms()),
            };
            let named = record.as_ref().is_some_and(|r| r.names(me, now));
            if matches!(step, Step::Take { .. }) && !named {
                if let Err(why) = may_stand(journal, &p.stream, feeder, me).await {
                    if why != held_back {
                        tracing::warn!(%why, "not standing for election");
                        held_back = why;
                    }
                    step = Step::Wait { ms: pause_ms, why: "this node's engine is newer than the stream's writer's" };
                }
            }
            match step {
                Step::Wait { ms, why } => {
                    if why != logged {
                        tracing::info!(why, leader = %view.leader, last_seq = view.last_seq, applied_seq, "following");
                        logged = why;
                    }
                    tokio::time::sleep(Duration::from_millis(ms.min(pause_ms).max(1))).await;
                }
                Step::Take { caught_up_seq } => match journal.take_lease(&p.stream, me, caught_up_seq, p.lease_ms).await {
                    Ok(l) => {
                        tracing::info!(old_leader = %view.leader, last_seq = l.last_seq, "took the lease");
                        return Ok(());
                    }
                    Err(e @ JournalError::Rejected { .. }) => {
                        tracing::info!(reason = %e, "lease not taken");
                        tokio::time::sleep(Duration::from_millis(cfg.poll_ms)).await;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "take-lease failed");
                        tokio::time::sleep(Duration::from_millis(cfg.poll_ms)).await;
                    }
                },
            }
        }
    };
    let r = tokio::select! {
        r = elect => r,
        _ = feeder.serve(listener, stop_rx) => Err(Stop::Retry("feeder stopped".into())),
    };
    let _ = stop_tx.send(true);
    r
}

/// Whether this node may stand for election by itself, as far as engines
/// go (engine.rs `may_stand`): the stream's writer is the last record the
/// feeder read (the node is caught up when this is asked); the members are
/// read only when the writer alone does not let it stand.
async fn may_stand(journal: &JournalClient, stream: &str, feeder: &Feeder, me: &str) -> Result<(), String> {
    let local = feeder.local_engine();
    let writer = feeder.history.lock().unwrap().last_writer().copied();
    if crate::engine::may_stand(local.as_ref(), writer.as_ref(), None).is_ok() {
        return Ok(());
    }
    let members = journal.get_meta(stream, MEMBERS_KEY).await.map_err(|e| format!("reading the stream's members: {e}"))?;
    let now = now_unix_ms();
    let others: Vec<Option<crate::engine::Engine>> = members
        .as_deref()
        .map(parse_members)
        .unwrap_or_default()
        .iter()
        .filter(|m| m.uuid != me && now.saturating_sub(m.seen_unix_ms) < MEMBER_STALE_MS)
        .map(|m| crate::engine::Engine::from_tag(&m.engine))
        .collect();
    crate::engine::may_stand(local.as_ref(), writer.as_ref(), Some(&others))
}

/// How often the published snapshot is read and told to the local Redis.
const SNAPSHOT_REPORT_MS: u64 = 1_000;

/// Tells the local Redis the stream's published snapshot (`INFO keel`).
async fn report_snapshots(journal: Arc<JournalClient>, stream: String, redis: RedisAddr, creds: Credentials, timeout_ms: u64) {
    loop {
        if let Ok(Some(b)) = journal.get_meta(&stream, crate::snapshot::SNAPSHOT_META_KEY).await {
            match crate::snapshot::SnapshotMeta::decode(&b) {
                Ok(m) => {
                    // Told every time: a Redis restarted empty learns it again.
                    let (seq, offset, created) = (m.seq.to_string(), m.offset.to_string(), m.created_unix_ms.to_string());
                    let args: [&[u8]; 4] = [b"KEEL.SNAPSHOT", seq.as_bytes(), offset.as_bytes(), created.as_bytes()];
                    if let Err(e) = redis_command(&redis, &creds, &args, timeout_ms).await {
                        tracing::debug!(error = %e, "KEEL.SNAPSHOT");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "the published snapshot's meta"),
            }
        }
        tokio::time::sleep(Duration::from_millis(SNAPSHOT_REPORT_MS)).await;
    }
}

/// Keeps this node listed in the stream's `members` metadata.
/// The entry names the local server's engine (`engine`, as the feeder last
/// read it), which the snapshotter checks before publishing.
pub async fn keep_registered(journal: Arc<JournalClient>, stream: String, mut me: Member, engine: crate::feeder::EngineHandle) {
    loop {
        me.engine = engine.lock().unwrap().as_ref().map(|e| e.tag()).unwrap_or_default();
        let registered = async {
            let old = journal.get_meta(&stream, MEMBERS_KEY).await.map_err(|e| e.to_string())?;
            let mut members = old.as_deref().map(parse_members).unwrap_or_default();
            let first = !members.iter().any(|m| m.uuid == me.uuid);
            members.retain(|m| m.uuid != me.uuid);
            members.push(Member { seen_unix_ms: now_unix_ms(), ..me.clone() });
            journal.cas_meta(&stream, MEMBERS_KEY, old, render_members(&members)).await.map_err(|e| e.to_string())?;
            if first {
                tracing::info!(members = members.len(), "registered in the stream's members");
            }
            Ok::<bool, String>(true)
        };
        let pause = match registered.await {
            Ok(_) => MEMBER_REFRESH_MS,
            Err(e) => {
                tracing::debug!(error = %e, "not registered yet");
                500
            }
        };
        // Sooner when the server's engine changes (restarted on another).
        let until = tokio::time::Instant::now() + Duration::from_millis(pause);
        while tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(ENGINE_RECHECK_MS)).await;
            if engine.lock().unwrap().as_ref().map(|e| e.tag()).unwrap_or_default() != me.engine {
                break;
            }
        }
    }
}

/// How often the member entry looks for a change of the server's engine.
const ENGINE_RECHECK_MS: u64 = 250;

fn addr_of(s: &str) -> Option<Addr> {
    let (host, port) = s.rsplit_once(':')?;
    Some(Addr { host: host.to_string(), port: port.parse().ok()? })
}

/// A node's run id for discovery: its uuid's hex digits, padded to 40.
fn run_id(uuid: &str) -> String {
    let hex: String = uuid.chars().filter(|c| c.is_ascii_hexdigit()).collect();
    format!("{hex:0<40}")
}

/// What discovery answers, from the journal's view of the stream: the
/// leader is the primary while its lease is live (during an election there
/// is none, and clients retry); every other member is a replica.
/// Members not refreshed for `MEMBER_STALE_MS` (before `now_unix_ms`) are
/// left out, except the leader.
pub fn view_of(members: &[Member], leader: &str, lease_live: bool, me: &Member, master_name: &str, epoch: u64, now_unix_ms: u64) -> View {
    let peer = |m: &Member| addr_of(&m.sentinel).map(|addr| SentinelPeer { addr, run_id: run_id(&m.uuid) });
    let live = |m: &&Member| m.uuid == leader || m.seen_unix_ms + MEMBER_STALE_MS >= now_unix_ms;
    View {
        master_name: master_name.to_string(),
        master: if lease_live { members.iter().find(|m| m.uuid == leader).and_then(|m| addr_of(&m.redis)) } else { None },
        replicas: members.iter().filter(live).filter(|m| m.uuid != leader).filter_map(|m| addr_of(&m.redis)).collect(),
        sentinels: members.iter().filter(live).filter_map(peer).collect(),
        me: peer(me),
        epoch,
    }
}

/// Refreshes the discovery view from the journal every `poll_ms`.
async fn keep_view(journal: Arc<JournalClient>, stream: String, me: Member, master_name: String, poll_ms: u64, tx: watch::Sender<View>) {
    let mut last_leader = String::new();
    let mut epoch = 0u64;
    loop {
        let info = journal.stream_info(&stream).await;
        let members = journal.get_meta(&stream, MEMBERS_KEY).await;
        if let (Ok(info), Ok(members)) = (info, members) {
            let members = members.as_deref().map(parse_members).unwrap_or_default();
            if info.leader_uuid != last_leader {
                last_leader = info.leader_uuid.clone();
                epoch += 1;
            }
            let live = !info.leader_uuid.is_empty() && info.lease_deadline_unix_ms > now_unix_ms();
            let view = view_of(&members, &info.leader_uuid, live, &me, &master_name, epoch, now_unix_ms());
            tx.send_if_modified(|v| {
                let changed = *v != view;
                if changed {
                    *v = view;
                }
                changed
            });
        }
        tokio::time::sleep(Duration::from_millis(handover::poll_pause_ms(poll_ms, now_unix_ms()))).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stalled_node_never_leads_without_an_election() {
        assert!(leads_at_start("me", None, false), "a new stream");
        assert!(leads_at_start("me", Some(("", 0)), false), "an empty stream nobody leads");
        assert!(leads_at_start("me", Some(("me", 40)), false), "its own lease");
        assert!(!leads_at_start("me", Some(("", 3)), false), "a stream with records: an election");
        assert!(!leads_at_start("me", Some(("other", 40)), false));
        for stream in [None, Some(("", 0)), Some(("me", 40)), Some(("other", 40))] {
            assert!(!leads_at_start("me", stream, true), "stalled, {stream:?}");
        }
    }

    #[test]
    fn members_round_trip_and_junk_lines_are_skipped() {
        let ms = vec![
            Member { uuid: "a".into(), redis: "127.0.0.1:6379".into(), sentinel: "127.0.0.1:26379".into(), seen_unix_ms: 7, engine: "redis/7.0.15".into() },
            Member { uuid: "b".into(), redis: "127.0.0.1:6380".into(), sentinel: String::new(), seen_unix_ms: 0, engine: String::new() },
        ];
        assert_eq!(parse_members(&render_members(&ms)), ms);
        assert_eq!(parse_members(b"junk\n\xff\xfe\na r s\n").len(), 1);
        // An older release's entry (no engine) reads with none.
        assert_eq!(parse_members(b"a r s 5\n")[0].engine, "");
    }

    proptest::proptest! {
        /// The `members` metadata of any bytes (another process may write
        /// it): members of one word each, never a panic; what is rendered
        /// parses back.
        #[test]
        fn members_of_any_bytes(b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let ms = parse_members(&b);
            for m in &ms {
                proptest::prop_assert!(!m.uuid.is_empty() && !m.uuid.contains(char::is_whitespace));
                proptest::prop_assert!(!m.redis.is_empty() && !m.redis.contains(char::is_whitespace));
            }
            proptest::prop_assert_eq!(parse_members(&render_members(&ms)), ms);
        }
    }

    #[test]
    fn discovery_names_the_leader_only_while_its_lease_is_live() {
        let m = |u: &str, r: &str, s: &str| Member { uuid: u.into(), redis: r.into(), sentinel: s.into(), seen_unix_ms: 1_000_000, engine: String::new() };
        let mut ms = vec![m("a", "127.0.0.1:1", "127.0.0.1:11"), m("b", "127.0.0.1:2", "127.0.0.1:12"), m("c", "127.0.0.1:3", "")];
        let now = 1_000_000 + MEMBER_STALE_MS;
        let v = view_of(&ms, "b", true, &ms[0], "keel", 3, now);
        assert_eq!(v.master, Some(Addr { host: "127.0.0.1".into(), port: 2 }));
        assert_eq!(v.replicas.iter().map(|a| a.port).collect::<Vec<_>>(), vec![1, 3]);
        assert_eq!(v.sentinels.len(), 2, "a member without an endpoint is no sentinel");
        assert_eq!(v.me.as_ref().unwrap().addr.port, 11);
        assert_eq!(v.me.as_ref().unwrap().run_id.len(), 40);
        assert_eq!(view_of(&ms, "b", false, &ms[0], "keel", 3, now).master, None);
        assert_eq!(view_of(&ms, "zzz", true, &ms[0], "keel", 3, now).master, None, "a leader that never registered");
        // A member gone for good drops out; the leader never does.
        let later = now + 1;
        assert!(view_of(&ms, "b", true, &ms[0], "keel", 3, later).replicas.is_empty());
        assert_eq!(view_of(&ms, "b", true, &ms[0], "keel", 3, later).master.map(|a| a.port), Some(2));
        ms[2].seen_unix_ms = later;
        assert_eq!(view_of(&ms, "b", true, &ms[0], "keel", 3, later).replicas.len(), 1);
    }
}
