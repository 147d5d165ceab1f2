//! A node's Prometheus metrics (`keel-sidecar node --metrics ADDR`, served
//! at `/metrics` by the journal crate's listener).
//!
//! What the node's Redis knows (role, lease, held replies, offsets, the
//! latest snapshot) is read from its `INFO keel` every `REFRESH`, by
//! `refresh_from_redis`; what the sidecar itself does (appends, feed
//! errors, stream leader changes) is counted where it happens, through
//! `get()` (one set per process). The decisions (what a line of INFO
//! becomes) are in `NodeView::from_info`, tested without I/O.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::OnceLock;
use std::time::Duration;
use std::time::Instant;

use keel_journal_client::metrics::gauge;
use keel_journal_client::metrics::latency_buckets;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::auth::Credentials;
use crate::link::RedisAddr;
use crate::redis::Conn;
use crate::resp::Reply;

/// How often the node's Redis is asked for its state.
pub const REFRESH: Duration = Duration::from_secs(1);
/// The roles `keel_role` reports (one is 1, the others 0).
pub const ROLES: [&str; 4] = ["primary", "replica", "primary-without-lease", "unknown"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoleLabel {
    pub role: String,
}

pub struct NodeMetrics {
    registry: Mutex<Registry>,
    role: Family<RoleLabel, Gauge>,
    is_primary: Gauge,
    lease_remaining_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    held_replies: Gauge,
    durable_offset_bytes: Gauge,
    applied_offset_bytes: Gauge,
    lag_bytes: Gauge,
    lag_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    snapshot_age_seconds: Gauge,
    snapshot_bytes_since: Gauge,
    feed_stalled: Gauge,
    redis_up: Gauge,
    /// Times the stream's leader (the primary) changed, as this node saw.
    pub leader_changes: Counter,
    /// Times this node took the lease and led.
    pub became_primary: Counter,
    /// One append of the primary's effects to the journal, until durable.
    pub append_seconds: Histogram,
    /// Replica feed connections that ended in an error.
    pub feed_errors: Counter,
    /// When the lag (bytes behind the primary) became non-zero.
    lag_since: Mutex<Option<Instant>>,
}

/// What `INFO keel` says, in the units the metrics use.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NodeView {
    pub role: String,
    pub lease_remaining_ms: u64,
    pub held_replies: u64,
    pub durable_offset: u64,
    pub applied_offset: u64,
    pub lag_bytes: u64,
    pub leader_uuid: String,
    pub snapshot_age_seconds: Option<u64>,
    pub snapshot_bytes_since: u64,
    pub feed_stalled: bool,
}

impl NodeView {
    pub fn from_info(info: &str) -> NodeView {
        let field = |name: &str| crate::redis::info_field(info, name).unwrap_or("");
        let num = |name: &str| field(name).parse::<u64>().unwrap_or(0);
        let role = match field("keel_role") {
            r if ROLES.contains(&r) => r.to_string(),
            _ => "unknown".to_string(),
        };
        NodeView {
            role,
            lease_remaining_ms: num("keel_lease_remaining_ms"),
            held_replies: num("keel_pending_replies"),
            durable_offset: num("keel_durable_offset"),
            applied_offset: num("keel_applied_offset"),
            lag_bytes: num("keel_lag_bytes"),
            leader_uuid: field("keel_leader_uuid").to_string(),
            snapshot_age_seconds: field("keel_snapshot_age_seconds").parse().ok(),
            snapshot_bytes_since: num("keel_snapshot_bytes_since"),
            feed_stalled: num("keel_feed_stalled_seq") > 0,
        }
    }
}

impl NodeMetrics {
    fn new() -> NodeMetrics {
        let m = NodeMetrics {
            registry: Mutex::new(Registry::with_prefix("keel")),
            role: Family::default(),
            is_primary: Gauge::default(),
            lease_remaining_seconds: Gauge::default(),
            held_replies: Gauge::default(),
            durable_offset_bytes: Gauge::default(),
            applied_offset_bytes: Gauge::default(),
            lag_bytes: Gauge::default(),
            lag_seconds: Gauge::default(),
            snapshot_age_seconds: Gauge::default(),
            snapshot_bytes_since: Gauge::default(),
            feed_stalled: Gauge::default(),
            redis_up: Gauge::default(),
            leader_changes: Counter::default(),
            became_primary: Counter::default(),
            append_seconds: Histogram::new(latency_buckets()),
            feed_errors: Counter::default(),
            lag_since: Mutex::new(None),
        };
        {
            let mut r = m.registry.lock().unwrap();
            r.register("role", "This node's role (1 for the current one)", m.role.clone());
            r.register("is_primary", "1 if this node is the primary holding the lease", m.is_primary.clone());
            r.register("lease_remaining_seconds", "Time left on this node's primary lease", m.lease_remaining_seconds.clone());
            r.register("held_replies", "Replies held until their writes are durable", m.held_replies.clone());
            r.register("durable_offset_bytes", "Replication offset known durable in the journal", m.durable_offset_bytes.clone());
            r.register("applied_offset_bytes", "Replication offset this node's Redis applied", m.applied_offset_bytes.clone());
            r.register("lag_bytes", "Bytes this replica is behind the journal", m.lag_bytes.clone());
            r.register("lag_seconds", "How long this replica has been behind (0: caught up)", m.lag_seconds.clone());
            r.register("snapshot_age_seconds", "Age of the latest published snapshot (-1: none)", m.snapshot_age_seconds.clone());
            r.register("snapshot_bytes_since", "Journal bytes written since the latest snapshot", m.snapshot_bytes_since.clone());
            r.register("feed_stalled", "1 if this node's feed stopped at a record it cannot read", m.feed_stalled.clone());
            r.register("redis_up", "1 if the node's Redis answered the last INFO", m.redis_up.clone());
            r.register("stream_leader_changes", "Changes of the stream's leader (the primary) this node saw", m.leader_changes.clone());
            r.register("became_primary", "Times this node took the lease and led", m.became_primary.clone());
            r.register("append_seconds", "An append of the primary's effects, until durable in the journal", m.append_seconds.clone());
            r.register("feed_errors", "Replica feed connections that ended in an error", m.feed_errors.clone());
        }
        m
    }

    /// Sets the gauges from the node's Redis (None: it did not answer).
    pub fn observe(&self, v: Option<&NodeView>, now: Instant) {
        let Some(v) = v else {
            self.redis_up.set(0);
            return;
        };
        self.redis_up.set(1);
        for r in ROLES {
            self.role.get_or_create(&RoleLabel { role: r.to_string() }).set((v.role == r) as i64);
        }
        self.is_primary.set((v.role == "primary") as i64);
        self.lease_remaining_seconds.set(v.lease_remaining_ms as f64 / 1000.0);
        self.held_replies.set(gauge(v.held_replies));
        self.durable_offset_bytes.set(gauge(v.durable_offset));
        self.applied_offset_bytes.set(gauge(v.applied_offset));
        self.lag_bytes.set(gauge(v.lag_bytes));
        let mut since = self.lag_since.lock().unwrap();
        if v.lag_bytes == 0 {
            *since = None;
        } else if since.is_none() {
            *since = Some(now);
        }
        self.lag_seconds.set(since.map(|s| now.duration_since(s).as_secs_f64()).unwrap_or(0.0));
        self.snapshot_age_seconds.set(v.snapshot_age_seconds.map(gauge).unwrap_or(-1));
        self.snapshot_bytes_since.set(gauge(v.snapshot_bytes_since));
        self.feed_stalled.set(v.feed_stalled as i64);
    }

    pub fn encode(&self) -> String {
        keel_journal_client::metrics::encode(&self.registry.lock().unwrap())
    }
}

static METRICS: OnceLock<NodeMetrics> = OnceLock::new();

/// This process's node metrics (made at first use).
pub fn get() -> &'static NodeMetrics {
    METRICS.get_or_init(NodeMetrics::new)
}

/// Reads the node's Redis every `REFRESH` into the gauges, and counts
/// changes of the stream's leader it reports.
///
/// One connection, kept while it works (so the server sees one `AUTH`, not
/// one a second), asking `KEEL.INFO`: a control command, which neither
/// MONITOR nor SLOWLOG shows. A module too old to know it is asked `INFO
/// keel` instead.
pub async fn refresh_from_redis(redis: RedisAddr, creds: Credentials, timeout_ms: u64) {
    let mut leader = String::new();
    let mut conn: Option<Conn> = None;
    let mut old_module = false;
    loop {
        let read = crate::redis::within(&redis, timeout_ms, async {
            let c = match conn.take() {
                Some(c) => c,
                None => Conn::connect(&redis, &creds).await?,
            };
            let mut c = c;
            let text = if old_module { c.info("keel").await } else { keel_info(&mut c).await };
            Ok::<_, String>((c, text))
        })
        .await;
        let view = match read {
            Ok((c, Ok(text))) => {
                conn = Some(c);
                Some(NodeView::from_info(&text))
            }
            Ok((c, Err(e))) if !old_module && e.contains("unknown command") => {
                old_module = true;
                conn = Some(c);
                None
            }
            _ => None,
        };
        if let Some(v) = &view {
            if !v.leader_uuid.is_empty() && v.leader_uuid != leader {
                if !leader.is_empty() {
                    get().leader_changes.inc();
                }
                leader = v.leader_uuid.clone();
            }
        }
        get().observe(view.as_ref(), Instant::now());
        tokio::time::sleep(REFRESH).await;
    }
}

/// `KEEL.INFO`'s text (`INFO keel`'s).
async fn keel_info(c: &mut Conn) -> Result<String, String> {
    match c.request(&[b"KEEL.INFO"]).await? {
        Reply::Bulk(Some(b)) => Ok(String::from_utf8_lossy(&b).into_owned()),
        Reply::Error(e) => Err(e),
        other => Err(format!("KEEL.INFO answered {other:?}")),
    }
}

/// TLS for the metrics listener (a newtype: the acceptor has no `Debug`).
#[derive(Clone)]
pub struct MetricsTls(pub tokio_rustls::TlsAcceptor);

impl std::fmt::Debug for MetricsTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MetricsTls(..)")
    }
}

/// The render function for the listener.
pub fn render() -> keel_journal_client::metrics::Render {
    Arc::new(|| get().encode())
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "# keel_keel\r\nkeel_role:replica\r\nkeel_lease_remaining_ms:0\r\nkeel_applied_offset:900\r\nkeel_lag_bytes:100\r\n\
        keel_leader_uuid:u-1\r\nkeel_durable_offset:1000\r\nkeel_pending_replies:3\r\nkeel_snapshot_age_seconds:42\r\n\
        keel_snapshot_bytes_since:77\r\nkeel_feed_stalled_seq:0\r\n";

    #[test]
    fn info_becomes_a_view() {
        let v = NodeView::from_info(INFO);
        assert_eq!(v.role, "replica");
        assert_eq!((v.applied_offset, v.lag_bytes, v.durable_offset, v.held_replies), (900, 100, 1000, 3));
        assert_eq!((v.snapshot_age_seconds, v.snapshot_bytes_since, v.feed_stalled), (Some(42), 77, false));
        assert_eq!(NodeView::from_info("keel_role:weird\r\n").role, "unknown");
        assert_eq!(NodeView::from_info("").snapshot_age_seconds, None);
    }

    #[test]
    fn gauges_follow_the_view() {
        let m = NodeMetrics::new();
        let t0 = Instant::now();
        let mut v = NodeView::from_info(INFO);
        m.observe(Some(&v), t0);
        m.observe(Some(&v), t0 + Duration::from_secs(3));
        let text = m.encode();
        for line in ["keel_role{role=\"replica\"} 1", "keel_role{role=\"primary\"} 0", "keel_is_primary 0", "keel_lag_seconds 3.0", "keel_held_replies 3", "keel_redis_up 1"] {
            assert!(text.lines().any(|l| l == line), "{line:?} missing from:\n{text}");
        }
        v.role = "primary".into();
        v.lag_bytes = 0;
        m.observe(Some(&v), t0 + Duration::from_secs(4));
        let text = m.encode();
        for line in ["keel_is_primary 1", "keel_lag_seconds 0.0", "keel_role{role=\"replica\"} 0"] {
            assert!(text.lines().any(|l| l == line), "{line:?} missing from:\n{text}");
        }
        m.observe(None, t0);
        assert!(m.encode().lines().any(|l| l == "keel_redis_up 0"));
    }
}
