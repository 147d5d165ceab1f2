//! Snapshots and the journal's tail, end to end: journal processes, Keel
//! nodes (redis-server with the module + `keel-sidecar node`) and
//! `keel-sidecar snapshot` cycles in private redis-servers, with the store
//! a local directory or S3 (`moto_server` on loopback).
//!
//! What each test proves:
//! - a published snapshot lets the journal trim, and a node that joins
//!   afterwards is rebuilt from the snapshot + the tail with every key
//!   (several databases, TTLs, several types); a second cycle builds on the
//!   first; the primary never forks (`latest_fork_usec` stays 0);
//! - a damaged snapshot (flipped byte, cut short, wrong digest) fails
//!   verification: never published, its objects deleted, the journal not
//!   trimmed past the snapshot that stays current;
//! - the same through the S3 API.

use std::path::Path;
use std::process::Command;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;

use keel_tests::KeelCluster;
use keel_tests::KeelNode;
use keel_tests::Resp;
use keel_tests::Server;
use keel_tests::bin;
use keel_tests::free_port;

static SERIAL: Mutex<()> = Mutex::new(());

const LEASE_MS: u64 = 1000;

/// Runs one `keel-sidecar snapshot` command; (success, stdout, stderr).
fn snapshot_cmd(c: &KeelCluster, store: &str, extra: &[&str], env: &[(&str, String)]) -> (bool, String, String) {
    let work = c.journal.dir.path().join("snapshotter");
    let mut cmd = Command::new(bin("keel-sidecar"));
    cmd.args(["snapshot", "--journal", &c.journal.endpoints(), "--stream", "shard-1", "--store", store, "--work-dir"])
        .arg(&work)
        .args(c.journal.sidecar_tls_args("snapshotter"))
        .args(["--cycle-timeout-ms", "120000"])
        .args(extra)
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run keel-sidecar snapshot");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).trim().to_string(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn snapshot_once(c: &KeelCluster, store: &str, env: &[(&str, String)]) -> u64 {
    let (ok, out, err) = snapshot_cmd(c, store, &["--once"], env);
    assert!(ok, "snapshot cycle failed: {err}");
    out.parse().unwrap_or_else(|_| panic!("snapshot --once printed {out:?}; stderr: {err}"))
}

fn published(c: &KeelCluster, store: &str, env: &[(&str, String)]) -> Option<serde_json::Value> {
    let (ok, out, _) = snapshot_cmd(c, store, &["--show"], env);
    ok.then(|| serde_json::from_str(&out).expect("meta is JSON"))
}

/// Writes `n` keys of several kinds, from `from`, in databases 0 and 3.
fn write_keys(addr: &str, from: usize, n: usize) {
    let mut r = Resp::connect(addr);
    for i in from..from + n {
        let v = format!("value-{i}-{}", "x".repeat(i % 200));
        assert_eq!(r.cmd(&["SET", &format!("k:{i}"), &v]), "+OK");
        if i % 5 == 0 {
            r.cmd(&["HSET", &format!("h:{i}"), "f", &v]);
            r.cmd(&["RPUSH", &format!("l:{i}"), "a", "b", &v]);
            r.cmd(&["SET", &format!("ttl:{i}"), &v, "EX", "100000"]);
        }
    }
    assert_eq!(r.cmd(&["SELECT", "3"]), "+OK");
    for i in from..from + n / 10 {
        assert_eq!(r.cmd(&["SET", &format!("db3:{i}"), &i.to_string()]), "+OK");
    }
}

fn digest(addr: &str) -> String {
    Resp::connect(addr).cmd(&["DEBUG", "DIGEST"])
}

/// Waits until `replica` has the same dataset as `primary` (DEBUG DIGEST).
fn wait_same_data(primary: &str, replica: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let (p, r) = (digest(primary), digest(replica));
        if p == r {
            return;
        }
        assert!(Instant::now() < deadline, "replica {replica} never reached the primary's data (digest {r} vs {p})");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn first_seq(c: &KeelCluster) -> u64 {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(c.journal.client().stream_info("shard-1")).expect("stream info").first_seq
}

fn objects(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(dir.join("shard-1"))
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    out.sort();
    out
}

fn rebuilt_from_snapshots(c: &mut KeelCluster, store: &str, env: &[(&str, String)]) {
    let primary = c.nodes[0].addr();
    write_keys(&primary, 0, 400);
    let s1 = snapshot_once(c, store, env);
    assert!(s1 > 1);
    assert_eq!(first_seq(c), s1, "the journal keeps only the snapshot's own record and after");
    let meta = published(c, store, env).expect("a snapshot is published");
    assert_eq!(meta["seq"], s1);
    assert_eq!(meta["engine"], "redis");
    assert!(meta["rdb_bytes"].as_u64().unwrap() > 10_000);
    write_keys(&primary, 400, 200);
    // A second cycle starts from the first snapshot, not from the (trimmed) start.
    let s2 = snapshot_once(c, store, env);
    assert!(s2 > s1, "{s2} > {s1}");
    assert_eq!(first_seq(c), s2);
    // INFO keel shows it on the primary (its sidecar reads it every second).
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.nodes[0].info_field("keel", "keel_snapshot_seq") != Some(s2.to_string()) {
        assert!(Instant::now() < deadline, "INFO keel never showed snapshot {s2}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let since: u64 = c.nodes[0].info_field("keel", "keel_snapshot_bytes_since").unwrap().parse().unwrap();
    write_keys(&primary, 600, 100);
    let grown: u64 = c.nodes[0].info_field("keel", "keel_snapshot_bytes_since").unwrap().parse().unwrap();
    assert!(grown > since + 5_000, "bytes since the snapshot grow with writes ({since} -> {grown})");
    // A node that joins now can only be rebuilt from the snapshot + tail.
    let root = c.journal.dir.path().to_path_buf();
    let mut n = KeelNode::new("late", Server::Redis, &root, &c.journal.endpoints(), LEASE_MS);
    n.store = store.to_string();
    n.start_redis();
    n.start_sidecar();
    c.nodes.push(n);
    c.wait_replica_synced(c.nodes.len() - 1, Duration::from_secs(60));
    let late = c.nodes.last().unwrap().addr();
    wait_same_data(&primary, &late, Duration::from_secs(60));
    let mut r = Resp::connect(&late);
    assert_eq!(r.cmd(&["GET", "k:399"]), format!("value-399-{}", "x".repeat(399 % 200)));
    assert_eq!(r.cmd(&["SELECT", "3"]), "+OK");
    assert_eq!(r.cmd(&["GET", "db3:605"]), "605");
    let log = std::fs::read_to_string(c.nodes.last().unwrap().dir.join("sidecar.log")).unwrap();
    assert!(log.contains("from the published snapshot"), "the late node was not rebuilt from the snapshot:\n{log}");
    // The primary never forked: not for snapshots, not for the replicas' syncs.
    assert_eq!(c.nodes[0].info_field("stats", "latest_fork_usec").as_deref(), Some("0"));
    assert_eq!(c.nodes[0].info_field("stats", "total_forks").as_deref(), Some("0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_published_snapshot_trims_the_journal_and_rebuilds_a_new_node() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = KeelCluster::start(Server::Redis, 3, 2, LEASE_MS).await;
    let store = c.nodes[0].store.clone();
    tokio::task::block_in_place(|| {
        rebuilt_from_snapshots(&mut c, &store, &[]);
        // The replica that followed all along has the same data too.
        wait_same_data(&c.nodes[0].addr(), &c.nodes[1].addr(), Duration::from_secs(30));
        // Only the current and the previous snapshot are kept.
        let objs = objects(Path::new(&store));
        assert_eq!(objs.len(), 4, "{objs:?}");
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_snapshot_is_never_published_nor_trimmed_to() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = KeelCluster::start(Server::Redis, 1, 1, LEASE_MS).await;
    let store = c.nodes[0].store.clone();
    tokio::task::block_in_place(|| {
        write_keys(&c.nodes[0].addr(), 0, 300);
        let s1 = snapshot_once(&c, &store, &[]);
        let before = objects(Path::new(&store));
        for (fault, why) in [
            ("corrupt-rdb", "sha256"),
            ("truncate-rdb", "bytes"),
            ("wrong-digest", "DEBUG DIGEST"),
        ] {
            write_keys(&c.nodes[0].addr(), 1000, 50);
            let (ok, _, err) = snapshot_cmd(&c, &store, &["--once", "--fault", fault], &[]);
            assert!(!ok, "{fault}: a damaged snapshot was published");
            assert!(err.contains("failed verification") && err.contains(why), "{fault}: {err}");
            assert_eq!(published(&c, &store, &[]).unwrap()["seq"], s1, "{fault}: the previous snapshot stays current");
            assert_eq!(first_seq(&c), s1, "{fault}: nothing trimmed past the current snapshot");
            assert_eq!(objects(Path::new(&store)), before, "{fault}: the damaged snapshot's objects are deleted");
        }
        // And a sound cycle still publishes.
        assert!(snapshot_once(&c, &store, &[]) > s1);
    });
}

/// S3 through moto_server on a loopback port, with a bucket of its own.
struct Moto {
    child: std::process::Child,
    env: Vec<(&'static str, String)>,
}

impl Moto {
    fn start() -> Moto {
        let port = free_port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server is not installed: pip install 'moto[server]' (scripts/test does)");
        let endpoint = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let created = Command::new("curl")
                .args(["-sf", "-X", "PUT", &format!("{endpoint}/keel-snapshots")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if created {
                break;
            }
            assert!(Instant::now() < deadline, "moto_server did not start on {endpoint}");
            std::thread::sleep(Duration::from_millis(100));
        }
        let env = vec![
            ("AWS_ENDPOINT", endpoint),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_ACCESS_KEY_ID", "keel".into()),
            ("AWS_SECRET_ACCESS_KEY", "keel".into()),
            ("AWS_REGION", "us-east-1".into()),
        ];
        Moto { child, env }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_in_s3_rebuild_a_new_node() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let moto = tokio::task::block_in_place(Moto::start);
    // The nodes read the store with the same AWS_* settings.
    for (k, v) in &moto.env {
        // SAFETY: set before any node process is spawned; the test's own
        // threads do not read these variables.
        unsafe { std::env::set_var(k, v) };
    }
    let store = "s3://keel-snapshots/deployment-1".to_string();
    let mut c = KeelCluster::start(Server::Redis, 1, 1, LEASE_MS).await;
    tokio::task::block_in_place(|| rebuilt_from_snapshots(&mut c, &store, &moto.env));
    for (k, _) in &moto.env {
        // SAFETY: as above.
        unsafe { std::env::remove_var(k) };
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_killed_whole_comes_back_from_its_snapshot_and_tail() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = KeelCluster::start(Server::Redis, 3, 2, LEASE_MS).await;
    let store = c.nodes[0].store.clone();
    let before = tokio::task::block_in_place(|| {
        write_keys(&c.nodes[0].addr(), 0, 300);
        let s = snapshot_once(&c, &store, &[]);
        assert_eq!(first_seq(&c), s);
        // Acknowledged after the snapshot: only the journal's tail has these.
        write_keys(&c.nodes[0].addr(), 300, 100);
        digest(&c.nodes[0].addr())
    });
    // kill -9 of every process: Redis keeps nothing (no persistence).
    for n in c.nodes.iter_mut() {
        n.kill_sidecar();
        n.kill_redis();
    }
    c.journal.kill_and_restart_all().await;
    for n in c.nodes.iter_mut() {
        n.start_redis();
        n.start_sidecar();
    }
    tokio::task::block_in_place(|| {
        let p = c.wait_new_primary(None, Duration::from_secs(60));
        c.wait_writable(p, Duration::from_secs(30));
        let other = 1 - p;
        c.wait_replica_synced(other, Duration::from_secs(60));
        // Every acknowledged write, on both nodes (the probe write rewrote
        // a key with its same value).
        assert_eq!(digest(&c.nodes[p].addr()), before, "the new primary lost or changed data");
        wait_same_data(&c.nodes[p].addr(), &c.nodes[other].addr(), Duration::from_secs(30));
        for n in &c.nodes {
            assert_eq!(n.info_field("stats", "total_forks").as_deref(), Some("0"), "{} forked", n.name);
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshotters_racing_publish_one_after_the_other() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = KeelCluster::start(Server::Redis, 1, 1, LEASE_MS).await;
    let store = c.nodes[0].store.clone();
    tokio::task::block_in_place(|| {
        write_keys(&c.nodes[0].addr(), 0, 300);
        let s0 = snapshot_once(&c, &store, &[]);
        write_keys(&c.nodes[0].addr(), 300, 300);
        // Two cycles at once, each from its own work dir: both succeed (the
        // loser starts again from the winner's snapshot) or find nothing new.
        let run = |name: &str| {
            let mut cmd = Command::new(bin("keel-sidecar"));
            cmd.args(["snapshot", "--once", "--journal", &c.journal.endpoints(), "--store", &store, "--work-dir"])
                .arg(c.journal.dir.path().join(name))
                .args(c.journal.sidecar_tls_args(name))
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            cmd.spawn().unwrap()
        };
        let (a, b) = (run("race-a"), run("race-b"));
        for child in [a, b] {
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success(), "a racing cycle failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let now = published(&c, &store, &[]).unwrap()["seq"].as_u64().unwrap();
        assert!(now > s0);
        assert_eq!(first_seq(&c), now);
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_journal_holds_writes_until_a_snapshot_trims_it() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // The smallest quota the journal takes (one largest append), and no
    // scheduled snapshotter: the stream fills up.
    let journal = keel_tests::JournalCluster::start_with(1, &["--stream-quota-bytes", &(8u64 << 20).to_string()]).await;
    let mut c = KeelCluster::start_on(journal, Server::Redis, 1, LEASE_MS);
    let store = c.nodes[0].store.clone();
    tokio::task::block_in_place(|| {
        let addr = c.nodes[0].addr();
        let value = "f".repeat(100_000);
        let mut r = Resp::connect(&addr);
        let mut acked = Vec::new();
        let mut refused = None;
        for i in 0..200 {
            let reply = r.cmd(&["SET", &format!("full:{i}"), &value]);
            if reply == "+OK" {
                acked.push(i);
            } else {
                refused = Some(reply);
                break;
            }
        }
        let refused = refused.expect("an 8 MiB stream never filled with 20 MB of writes");
        assert!(refused.contains("KEEL_UNCONFIRMED"), "a write into a full journal: {refused}");
        // The sidecar waits for room: it neither exits nor gives up the lease.
        assert!(c.nodes[0].sidecar.as_mut().unwrap().try_wait().unwrap().is_none(), "the sidecar exited on a full stream");
        let log = std::fs::read_to_string(c.nodes[0].dir.join("sidecar.log")).unwrap();
        assert!(log.contains("the journal stream is full"), "{log}");
        assert_eq!(c.nodes[0].role(), "primary");
        // A snapshot makes room; held and new writes go through.
        snapshot_once(&c, &store, &[]);
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut r = Resp::connect(&addr);
        while r.cmd(&["SET", "after-room", "1"]) != "+OK" {
            assert!(Instant::now() < deadline, "writes never resumed after the trim");
        }
        for i in &acked {
            assert_eq!(r.cmd(&["STRLEN", &format!("full:{i}")]), ":100000", "acknowledged full:{i} is missing");
        }
        // The unconfirmed write landed once there was room (its outcome was
        // unknown to the client, never lost by the deployment).
        let last = acked.len();
        assert_eq!(r.cmd(&["STRLEN", &format!("full:{last}")]), ":100000");
    });
}
