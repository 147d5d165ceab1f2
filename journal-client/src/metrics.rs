//! Prometheus metrics: the small HTTP listener journal nodes and sidecars
//! serve them on (`GET /metrics`, OpenMetrics text), and a journal node's
//! own metrics.
//!
//! Names follow Prometheus's conventions: a `keel_` prefix, base units
//! (`_seconds`, `_bytes`), counters end in `_total` (prometheus-client adds
//! it). Gauges that mirror state another component owns (Raft's term, a
//! stream's untrimmed bytes) are read when scraped (`refresh`), so nothing
//! keeps them in step by hand; counters and histograms are updated where
//! the event happens.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::histogram::exponential_buckets;
use prometheus_client::registry::Registry;

/// Longest a scrape may take before the listener drops it.
pub const SCRAPE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Most scrapes served at once (more wait for a slot).
pub const MAX_CONCURRENT_SCRAPES: usize = 4;

/// Latency buckets: 100 µs to ~3.3 s, doubling.
pub fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.0001, 2.0, 16)
}

/// Renders the metrics text at each scrape.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// The registry's text, OpenMetrics format (what `/metrics` answers).
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry).expect("writing to a String cannot fail");
    out
}

/// Serves `render()` at `GET /metrics` on `addr` until the process ends,
/// over TLS with `tls` (else plain HTTP); returns once listening (the bound
/// address: port 0 picks one), or why it cannot listen. Any other path is
/// 404. At most `MAX_CONCURRENT_SCRAPES` at once, each within
/// `SCRAPE_TIMEOUT`; a TLS handshake gets `crate::tls::HANDSHAKE_TIMEOUT`.
pub async fn serve(addr: SocketAddr, render: Render, tls: Option<tokio_rustls::TlsAcceptor>) -> std::io::Result<SocketAddr> {
    use axum::http::StatusCode;
    use axum::http::header;
    use axum::response::IntoResponse;

    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_SCRAPES));
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let (render, slots) = (render.clone(), slots.clone());
            async move {
                let Ok(_slot) = slots.acquire().await else {
                    return (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
                };
                match tokio::time::timeout(SCRAPE_TIMEOUT, tokio::task::spawn_blocking(move || render())).await {
                    Ok(Ok(text)) => {
                        ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text).into_response()
                    }
                    _ => (StatusCode::INTERNAL_SERVER_ERROR, "metrics unavailable").into_response(),
                }
            }
        }),
    );
    match tls {
        None => {
            tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    tracing::error!(error = %e, "the metrics listener stopped");
                }
            });
        }
        Some(acceptor) => {
            let tls = TlsListener::start(listener, acceptor);
            tokio::spawn(async move {
                if let Err(e) = axum::serve(tls, app).await {
                    tracing::error!(error = %e, "the metrics listener stopped");
                }
            });
        }
    }
    Ok(bound)
}

/// Connections whose TLS handshake completed. Each handshake runs in its
/// own task (a client that stalls in it holds up no one) under
/// `HANDSHAKE_TIMEOUT`; at most `MAX_CONCURRENT_SCRAPES` completed ones wait
/// to be served.
struct TlsListener {
    ready: tokio::sync::mpsc::Receiver<(tokio_rustls::server::TlsStream<tokio::net::TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    fn start(listener: tokio::net::TcpListener, acceptor: tokio_rustls::TlsAcceptor) -> TlsListener {
        let local = listener.local_addr().expect("a bound listener has an address");
        let (tx, ready) = tokio::sync::mpsc::channel(MAX_CONCURRENT_SCRAPES);
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::debug!(error = %e, "metrics listener accept");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let (acceptor, ready) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(crate::tls::HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(s)) => {
                            let _ = ready.send((s, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "metrics: TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "metrics: TLS handshake timed out"),
                    }
                });
                if tx.is_closed() {
                    return;
                }
            }
        });
        TlsListener { ready, local }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accepting task is gone: serve nothing more.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabel {
    pub stream: String,
}

/// A journal node's metrics.
pub struct JournalMetrics {
    registry: Mutex<Registry>,
    term: Gauge,
    is_leader: Gauge,
    has_leader: Gauge,
    pub leader_changes: Counter,
    last_log_index: Gauge,
    applied_index: Gauge,
    voters: Gauge,
    learners: Gauge,
    /// A proposal (a batch of client commands), from `client_write` to
    /// applied on this node (the Raft leader): commit latency.
    pub commit_seconds: Histogram,
    /// An append to this node's Raft log, from write to fsync'd (including
    /// the group-commit wait).
    pub log_sync_seconds: Histogram,
    stream_untrimmed_bytes: Family<StreamLabel, Gauge>,
    stream_quota_bytes: Gauge,
    data_free_bytes: Gauge,
}

/// What a journal node reports at each scrape (read from openraft and the
/// state machine by server.rs).
#[derive(Debug, Clone, Default)]
pub struct JournalView {
    pub term: u64,
    pub is_leader: bool,
    pub has_leader: bool,
    pub last_log_index: u64,
    pub applied_index: u64,
    pub voters: usize,
    pub learners: usize,
    /// (stream, untrimmed bytes).
    pub streams: Vec<(String, u64)>,
    pub stream_quota_bytes: u64,
    pub data_free_bytes: Option<u64>,
}

/// A count as a gauge's value (saturating: gauges are i64).
pub fn gauge(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Default for JournalMetrics {
    fn default() -> Self {
        JournalMetrics::new()
    }
}

impl JournalMetrics {
    pub fn new() -> JournalMetrics {
        let m = JournalMetrics {
            registry: Mutex::new(Registry::with_prefix("keel_journal")),
            term: Gauge::default(),
            is_leader: Gauge::default(),
            has_leader: Gauge::default(),
            leader_changes: Counter::default(),
            last_log_index: Gauge::default(),
            applied_index: Gauge::default(),
            voters: Gauge::default(),
            learners: Gauge::default(),
            commit_seconds: Histogram::new(latency_buckets()),
            log_sync_seconds: Histogram::new(latency_buckets()),
            stream_untrimmed_bytes: Family::default(),
            stream_quota_bytes: Gauge::default(),
            data_free_bytes: Gauge::default(),
        };
        {
            let mut r = m.registry.lock().unwrap();
            r.register("raft_term", "The Raft term this node is in", m.term.clone());
            r.register("is_leader", "1 if this node is the journal's Raft leader", m.is_leader.clone());
            r.register("has_leader", "1 if this node knows a Raft leader", m.has_leader.clone());
            r.register("leader_changes_seen", "Raft leader changes this node saw", m.leader_changes.clone());
            r.register("last_log_index", "Index of this node's last Raft log entry", m.last_log_index.clone());
            r.register("applied_index", "Index of the last entry this node applied", m.applied_index.clone());
            r.register("voters", "Voting members, as this node knows them", m.voters.clone());
            r.register("learners", "Learners (members catching up), as this node knows them", m.learners.clone());
            r.register("commit_seconds", "A proposal, from submission to applied on the Raft leader", m.commit_seconds.clone());
            r.register("log_sync_seconds", "An append to the Raft log, from write to fsync'd", m.log_sync_seconds.clone());
            r.register("stream_untrimmed_bytes", "Untrimmed record bytes per stream", m.stream_untrimmed_bytes.clone());
            r.register("stream_quota_bytes", "Untrimmed bytes a stream may hold (--stream-quota-bytes)", m.stream_quota_bytes.clone());
            r.register("data_free_bytes", "Free bytes on the data directory's filesystem", m.data_free_bytes.clone());
        }
        m
    }

    /// Sets the scraped gauges from `v`.
    pub fn refresh(&self, v: &JournalView) {
        self.term.set(gauge(v.term));
        self.is_leader.set(v.is_leader as i64);
        self.has_leader.set(v.has_leader as i64);
        self.last_log_index.set(gauge(v.last_log_index));
        self.applied_index.set(gauge(v.applied_index));
        self.voters.set(v.voters as i64);
        self.learners.set(v.learners as i64);
        self.stream_untrimmed_bytes.clear();
        for (stream, bytes) in &v.streams {
            self.stream_untrimmed_bytes.get_or_create(&StreamLabel { stream: stream.clone() }).set(gauge(*bytes));
        }
        self.stream_quota_bytes.set(gauge(v.stream_quota_bytes));
        self.data_free_bytes.set(v.data_free_bytes.map(gauge).unwrap_or(-1));
    }

    pub fn encode(&self) -> String {
        encode(&self.registry.lock().unwrap())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_units_and_values() {
        let m = JournalMetrics::new();
        m.leader_changes.inc();
        m.commit_seconds.observe(0.002);
        m.refresh(&JournalView {
            term: 7,
            is_leader: true,
            has_leader: true,
            last_log_index: 42,
            applied_index: 41,
            voters: 3,
            learners: 1,
            streams: vec![("shard-1".into(), 1234)],
            stream_quota_bytes: 1 << 30,
            data_free_bytes: None,
        });
        let text = m.encode();
        for line in [
            "keel_journal_raft_term 7",
            "keel_journal_is_leader 1",
            "keel_journal_leader_changes_seen_total 1",
            "keel_journal_stream_untrimmed_bytes{stream=\"shard-1\"} 1234",
            "keel_journal_commit_seconds_count 1",
            "keel_journal_data_free_bytes -1",
            "keel_journal_learners 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} missing from:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
        // A stream that is gone is not reported any more.
        m.refresh(&JournalView::default());
        assert!(!m.encode().contains("shard-1"));
    }

    #[tokio::test]
    async fn the_listener_serves_metrics_and_nothing_else() {
        let addr = serve("127.0.0.1:0".parse().unwrap(), Arc::new(|| "x 1\n# EOF\n".to_string()), None).await.unwrap();
        let get = |path: &'static str| async move {
            use tokio::io::AsyncReadExt;
            use tokio::io::AsyncWriteExt;
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let ok = get("/metrics").await;
        assert!(ok.starts_with("HTTP/1.1 200") && ok.contains("openmetrics-text") && ok.ends_with("x 1\n# EOF\n"), "{ok}");
        assert!(get("/other").await.starts_with("HTTP/1.1 404"));
        // Garbage gets an error, and the listener keeps serving.
        {
            use tokio::io::AsyncReadExt;
            use tokio::io::AsyncWriteExt;
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(b"\x00\x01garbage\r\n\r\n").await.unwrap();
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out).await;
            assert!(out.is_empty() || out.starts_with(b"HTTP/1.1 400"), "{}", String::from_utf8_lossy(&out));
        }
        assert!(get("/metrics").await.starts_with("HTTP/1.1 200"));
    }

    /// Over TLS: a client that trusts the deployment's CA gets the metrics;
    /// a plaintext request gets nothing; a client stalled in its handshake
    /// holds up no one.
    #[tokio::test]
    async fn the_listener_serves_over_tls() {
        use tokio::io::AsyncReadExt;
        use tokio::io::AsyncWriteExt;
        let dir = tempfile::tempdir().unwrap();
        crate::tls::issue(dir.path(), &["journal-1".into()], &[]).unwrap();
        let acceptor = crate::tls::server_acceptor("the metrics listener", &dir.path().join("journal-1.pem"), &dir.path().join("journal-1.key")).unwrap();
        let addr = serve("127.0.0.1:0".parse().unwrap(), Arc::new(|| "x 1\n# EOF\n".to_string()), Some(acceptor)).await.unwrap();
        let _stalled = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut roots = rustls::RootCertStore::empty();
        let ca = std::fs::read(dir.path().join("ca.pem")).unwrap();
        for c in rustls::pki_types::CertificateDer::pem_slice_iter(&ca) {
            roots.add(c.unwrap()).unwrap();
        }
        use rustls::pki_types::pem::PemObject as _;
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let mut s = connector.connect(name, tcp).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        let out = String::from_utf8_lossy(&out);
        assert!(out.starts_with("HTTP/1.1 200") && out.ends_with("x 1\n# EOF\n"), "{out}");
        let mut plain = tokio::net::TcpStream::connect(addr).await.unwrap();
        plain.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut got = Vec::new();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), plain.read_to_end(&mut got)).await;
        assert!(!String::from_utf8_lossy(&got).contains("x 1"), "plaintext got the metrics");
    }
}
