//! Metrics, end to end: a real Prometheus (Debian's `prometheus`) scrapes
//! every sidecar (HTTP) and journal node (HTTPS with the node's own
//! certificate, checked against the deployment's CA) of a deployment; the
//! primary is killed; Prometheus's HTTP API then shows the leader change
//! and the new primary.

use std::io::Read;
use std::io::Write;
use std::path::Path;
use std::process::Child;
use std::process::Command;
use std::process::Stdio;
use std::time::Duration;
use std::time::Instant;

use keel_tests::JournalCluster;
use keel_tests::KeelCluster;
use keel_tests::Resp;
use keel_tests::Server;
use keel_tests::free_port;

/// How long Prometheus may take to show a change (1 s scrapes).
const SEEN_WITHIN: Duration = Duration::from_secs(60);

struct Prometheus {
    child: Child,
    addr: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Prometheus scraping `keel` (sidecars, plain HTTP) and `keel-journal`
/// targets (HTTPS, checked against the CA `journal_ca`) every second, its
/// data in `dir`.
fn start_prometheus(dir: &Path, sidecars: &[String], journal: &[String], journal_ca: &Path) -> Prometheus {
    let list = |v: &[String]| v.iter().map(|a| format!("'{a}'")).collect::<Vec<_>>().join(", ");
    let config = format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: keel\n    static_configs:\n      - targets: [{}]\n  - job_name: keel-journal\n    scheme: https\n    tls_config:\n      ca_file: {}\n    static_configs:\n      - targets: [{}]\n",
        list(sidecars),
        journal_ca.display(),
        list(journal)
    );
    let path = dir.join("prometheus.yml");
    std::fs::write(&path, config).unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", path.display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
        .arg(format!("--web.listen-address={addr}"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("prometheus (Debian's package; scripts/lib.sh installs it)");
    let p = Prometheus { child, addr };
    let deadline = Instant::now() + Duration::from_secs(60);
    while http_get(&p.addr, "/-/ready").is_none_or(|(code, _)| code != 200) {
        assert!(Instant::now() < deadline, "prometheus not ready; log in {}", dir.join("prometheus.log").display());
        std::thread::sleep(Duration::from_millis(100));
    }
    p
}

/// GET `path` from `addr`: (status code, body).
fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let code = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Some((code, body))
}

fn percent_encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The result of instant query `q`: (labels' instance, value) per series.
fn query(p: &Prometheus, q: &str) -> Vec<(String, f64)> {
    let Some((200, body)) = http_get(&p.addr, &format!("/api/v1/query?query={}", percent_encode(q))) else { return Vec::new() };
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    v["data"]["result"]
        .as_array()
        .map(|series| {
            series
                .iter()
                .filter_map(|s| {
                    let instance = s["metric"]["instance"].as_str().unwrap_or("").to_string();
                    let value = s["value"][1].as_str()?.parse().ok()?;
                    Some((instance, value))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until `q` gives a series for which `ok` holds; returns it.
fn wait_for(p: &Prometheus, q: &str, ok: impl Fn(&(String, f64)) -> bool) -> (String, f64) {
    let deadline = Instant::now() + SEEN_WITHIN;
    loop {
        let got = query(p, q);
        if let Some(s) = got.iter().find(|s| ok(s)) {
            return s.clone();
        }
        assert!(Instant::now() < deadline, "Prometheus did not show {q} as expected within {SEEN_WITHIN:?}; last: {got:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_sees_a_failover() {
    let journal = JournalCluster::start(3).await;
    let mut c = KeelCluster::start_on(journal, Server::Redis, 2, 1000);
    let sidecars: Vec<String> = c.nodes.iter().map(|n| format!("127.0.0.1:{}", n.metrics_port)).collect();
    let journal_metrics: Vec<String> = c.journal.nodes.iter().map(|n| n.metrics.clone()).collect();
    let dir = tempfile::tempdir().unwrap();
    let ca = c.journal.tls_dir.as_ref().expect("the test journal runs TLS").join("ca.pem");
    let p = start_prometheus(dir.path(), &sidecars, &journal_metrics, &ca);

    // Some writes, so appends and commits are measured.
    let mut r = Resp::connect(&c.nodes[0].addr());
    for i in 0..20 {
        assert_eq!(r.cmd(&["SET", &format!("k{i}"), "v"]), "+OK");
    }
    wait_for(&p, "keel_is_primary == 1", |(i, _)| *i == sidecars[0]);
    wait_for(&p, "sum(up{job=\"keel-journal\"})", |(_, v)| *v == 3.0);
    wait_for(&p, "sum(keel_journal_is_leader)", |(_, v)| *v == 1.0);
    wait_for(&p, "max(keel_journal_stream_untrimmed_bytes{stream=\"shard-1\"})", |(_, v)| *v > 0.0);
    wait_for(&p, "sum(keel_journal_commit_seconds_count)", |(_, v)| *v > 0.0);
    wait_for(&p, "keel_append_seconds_count", |(i, v)| *i == sidecars[0] && *v > 0.0);
    let (_, before) = wait_for(&p, "sum(keel_stream_leader_changes_total)", |_| true);

    // The primary's Redis dies; the replica takes over.
    c.nodes[0].kill_redis();
    let new = c.wait_new_primary(Some(0), Duration::from_secs(30));
    assert_eq!(new, 1);
    wait_for(&p, "keel_is_primary == 1", |(i, _)| *i == sidecars[1]);
    wait_for(&p, "keel_redis_up", |(i, v)| *i == sidecars[0] && *v == 0.0);
    let (_, after) = wait_for(&p, "sum(keel_stream_leader_changes_total)", |(_, v)| *v > before);
    let (_, became) = wait_for(&p, "keel_became_primary_total", |(i, v)| *i == sidecars[1] && *v >= 1.0);
    println!("Prometheus saw the failover: leader changes {before} -> {after}, node 1 became primary {became} time(s)");
}
