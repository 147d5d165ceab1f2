//! Adopting a running Redis and leaving Keel, end to end, through the
//! commands a user runs (`scripts/cluster adopt`, `scripts/cluster leave`):
//! a stock redis-server (no module) serving a dataset loaded from its RDB
//! (`KEEL_ADOPT_KEYS` keys of 1 KB: 1,000,000 by default, about 1 GB), with
//! an ACL user and a client writing through it all, becomes a Keel
//! deployment (journal processes, redis-servers with the module, sidecars);
//! then the deployment goes back to one plain redis-server.
//!
//! Checked: every write the client saw acknowledged (by the running Redis
//! or by Keel) is on Keel's primary, and then on the plain Redis; the
//! dataset is whole; the ACL user keeps its password and its key pattern;
//! the old server is gone. The client's longest wait between two
//! acknowledged writes (the switch's write unavailability) is printed,
//! never asserted.

use std::path::Path;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use keel_tests::JournalCluster;
use keel_tests::KeelNode;
use keel_tests::Resp;
use keel_tests::Server;
use keel_tests::bin;

/// Value size of the generated dataset.
const VALUE_BYTES: u64 = 1000;
const REPLICAS: u16 = 1;
/// The longest one `scripts/cluster` command may take here.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(900);

/// A base port whose whole block `scripts/cluster` takes is free: node i on
/// P+i, discovery P+20000+i, metrics P+20100+i; journal node j on JP+j-1,
/// its metrics JP+20000+j-1. P and JP come from below the range the tests'
/// `free_port` hands out, and their +20000 ports from below the kernel's
/// ephemeral range.
fn free_block(from: u16, span: u16, width: u16) -> u16 {
    let start = from + (std::process::id() as u16 % (span / width)) * width;
    for k in 0..span / width {
        let p = from + (start - from + k * width) % span;
        let ports = (0..width).flat_map(|i| [p + i, p + 20_000 + i, p + 20_100 + i]);
        if ports.into_iter().all(|q| std::net::TcpListener::bind(("127.0.0.1", q)).is_ok()) {
            return p;
        }
    }
    panic!("no free block of ports from {from}");
}

fn script(args: &[&str], dir: &Path) {
    let bin_dir = bin("keel-sidecar").parent().unwrap().to_path_buf();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let log = dir.with_extension("script.log");
    let out = std::fs::File::create(&log).unwrap();
    let mut child = Command::new(root.join("scripts/cluster"))
        .args(args)
        .env("KEEL_USE_BIN_DIR", &bin_dir)
        .env("KEEL_NO_BUILD", "1")
        .env("KEEL_PROFILE", "debug")
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("scripts/cluster");
    // Bounded: a script that hangs fails the test instead of the run.
    let deadline = Instant::now() + SCRIPT_TIMEOUT;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("scripts/cluster {} did not end within {SCRIPT_TIMEOUT:?} (logs in {})", args.join(" "), dir.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = child.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    eprintln!("scripts/cluster {}:\n{text}", args.join(" "));
    assert!(status.success(), "scripts/cluster {} failed (logs in {})", args.join(" "), dir.display());
}

/// Stops everything the test started, whatever happened.
struct Cleanup {
    /// A deployment `scripts/cluster` started, if any.
    dir: Option<PathBuf>,
    pids: Vec<PathBuf>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(dir) = &self.dir {
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
            let _ = Command::new(root.join("scripts/cluster")).args(["stop", "--dir", &dir.to_string_lossy()]).output();
        }
        for p in &self.pids {
            if let Ok(pid) = std::fs::read_to_string(p) {
                keel_tests::signal(pid.trim().parse().unwrap_or(0), "KILL");
            }
        }
    }
}

fn wait_ping(addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(mut c) = Resp::try_connect(addr, Duration::from_secs(5)) {
            if c.try_cmd(&["PING"]).is_ok_and(|r| r == "+PONG") {
                return;
            }
        }
        assert!(Instant::now() < deadline, "{addr} never answered PING");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A stock redis-server (no module) on `port`, its files in `dir`.
fn stock_redis(port: u16, dir: &Path) -> PathBuf {
    let pid = dir.join("redis.pid");
    let status = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--daemonize", "yes", "--enable-debug-command", "local"])
        .args(["--save", "", "--dbfilename", "dump.rdb"])
        .arg("--dir")
        .arg(dir)
        .arg("--pidfile")
        .arg(&pid)
        .arg("--logfile")
        .arg(dir.join("redis.log"))
        .status()
        .expect("redis-server");
    assert!(status.success());
    wait_ping(&format!("127.0.0.1:{port}"));
    pid
}

/// The master discovery names, if any endpoint answers.
fn discover(sentinels: &[String]) -> Option<String> {
    for s in sentinels {
        if let Ok(mut c) = Resp::try_connect(s, Duration::from_millis(500)) {
            if let Ok(r) = c.try_full(&["SENTINEL", "get-master-addr-by-name", "keel"]) {
                let parts: Vec<&str> = r.trim_matches(|c| c == '[' || c == ']').split(", ").collect();
                if parts.len() == 2 {
                    return Some(format!("{}:{}", parts[0], parts[1]));
                }
            }
        }
    }
    None
}

/// A client writing `w:<n>` = n, one at a time, to the running Redis, then
/// to whatever discovery names once that refuses; returns every write
/// acknowledged and when.
fn writer(first: String, sentinels: Vec<String>, stop: Arc<AtomicBool>) -> Vec<(u64, Instant)> {
    let mut acks = Vec::new();
    let mut target = first;
    let mut conn: Option<Resp> = None;
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        if conn.is_none() {
            conn = Resp::try_connect(&target, Duration::from_secs(2)).ok();
        }
        let ok = match conn.as_mut() {
            Some(c) => {
                n += 1;
                let key = format!("w:{n}");
                matches!(c.try_cmd(&["SET", &key, &n.to_string()]), Ok(r) if r == "+OK")
            }
            None => false,
        };
        if ok {
            acks.push((n, Instant::now()));
            // About a thousand writes a second: a steady client, not a load
            // test (the replicas catch up on what it wrote meanwhile).
            std::thread::sleep(Duration::from_millis(1));
        } else {
            conn = None;
            if let Some(m) = discover(&sentinels) {
                target = m;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    acks
}

/// Checks every acknowledged `w:<n>` holds n on the server at `addr`.
fn check_acked(addr: &str, acks: &[(u64, Instant)]) {
    let mut c = Resp::connect(addr);
    for chunk in acks.chunks(1000) {
        let keys: Vec<String> = chunk.iter().map(|(n, _)| format!("w:{n}")).collect();
        let mut args = vec!["MGET"];
        args.extend(keys.iter().map(String::as_str));
        let got = c.full(&args);
        let want = format!("[{}]", chunk.iter().map(|(n, _)| n.to_string()).collect::<Vec<_>>().join(", "));
        assert_eq!(got, want, "an acknowledged write is missing on {addr}");
    }
}

fn dbsize(addr: &str) -> u64 {
    Resp::connect(addr).cmd(&["DBSIZE"]).trim_start_matches(':').parse().unwrap()
}

fn env_value(dir: &Path, name: &str) -> String {
    let env = std::fs::read_to_string(dir.join("endpoints.env")).expect("endpoints.env");
    env.lines().find_map(|l| l.strip_prefix(&format!("{name}="))).unwrap_or_default().to_string()
}

#[test]
fn a_running_redis_is_adopted_under_writes_and_left_again() {
    let keys: u64 = std::env::var("KEEL_ADOPT_KEYS").ok().and_then(|k| k.parse().ok()).unwrap_or(1_000_000);
    let work = tempfile::tempdir().unwrap();
    let (stock_dir, dir, out) = (work.path().join("stock"), work.path().join("keel"), work.path().join("plain"));
    std::fs::create_dir_all(&stock_dir).unwrap();
    let port = free_block(10_000, 2_000, 8);
    let jbase = free_block(12_000, 400, 4);
    let stock_port = keel_tests::free_port();
    let plain_port = keel_tests::free_port();
    let stock = format!("127.0.0.1:{stock_port}");
    let mut cleanup = Cleanup { dir: Some(dir.clone()), pids: vec![stock_dir.join("redis.pid"), out.join("redis.pid")] };

    // The running Redis: its dataset from its RDB, an ACL user.
    stock_redis(stock_port, &stock_dir);
    let mut c = Resp::connect(&stock);
    let t = Instant::now();
    assert_eq!(c.cmd(&["DEBUG", "POPULATE", &keys.to_string(), "key", &VALUE_BYTES.to_string()]), "+OK");
    assert_eq!(c.cmd(&["SAVE"]), "+OK");
    let _ = c.try_cmd(&["SHUTDOWN", "NOSAVE"]);
    drop(c);
    let deadline = Instant::now() + Duration::from_secs(30);
    while Resp::try_connect(&stock, Duration::from_secs(1)).is_ok() {
        assert!(Instant::now() < deadline, "the running Redis did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = stock_redis(stock_port, &stock_dir);
    cleanup.pids[0] = pid;
    let mut c = Resp::connect(&stock);
    assert_eq!(dbsize(&stock), keys, "the running Redis loaded its RDB");
    let memory = c.full(&["INFO", "memory"]);
    let used = memory.lines().find_map(|l| l.strip_prefix("used_memory_human:")).unwrap_or("?").trim().to_string();
    eprintln!("the running Redis holds {keys} keys of {VALUE_BYTES} bytes, {used} (made and reloaded from its RDB in {:?})", t.elapsed());
    assert_eq!(c.cmd(&["ACL", "SETUSER", "app", "on", ">app-password", "~app:*", "+@all"]), "+OK");
    assert_eq!(c.cmd(&["SET", "app:before", "1"]), "+OK");

    // A client writing through it all.
    let sentinels: Vec<String> = (0..=REPLICAS).map(|i| format!("127.0.0.1:{}", port + 20_000 + i)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let w = {
        let (stock, sentinels, stop) = (stock.clone(), sentinels.clone(), stop.clone());
        std::thread::spawn(move || writer(stock, sentinels, stop))
    };
    let t = Instant::now();
    let d = dir.to_string_lossy().to_string();
    script(
        &["adopt", "--redis", &stock, "--dir", &d, "--port", &port.to_string(), "--journal-base-port", &jbase.to_string(), "--replicas", &REPLICAS.to_string()],
        &dir,
    );
    eprintln!("scripts/cluster adopt took {:?}", t.elapsed());
    let primary = env_value(&dir, "KEEL_PRIMARY");
    assert_ne!(primary, stock);
    // Writes go on through Keel for a while.
    let acked_on_keel = || {
        let c = Resp::try_connect(&primary, Duration::from_secs(2));
        c.map(|mut c| c.cmd(&["DBSIZE"])).unwrap_or_default()
    };
    let before = acked_on_keel();
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked_on_keel() == before {
        assert!(Instant::now() < deadline, "the client never wrote through Keel");
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::SeqCst);
    let acks = w.join().unwrap();
    let gap = acks.windows(2).map(|p| p[1].1 - p[0].1).max().unwrap_or_default();
    eprintln!("{} writes acknowledged; the longest wait between two (the switch): {gap:?}", acks.len());

    // Nothing lost, the dataset whole, the user kept, the old server gone.
    check_acked(&primary, &acks);
    let total = dbsize(&primary);
    assert!(total >= keys + 1 + acks.len() as u64, "{total} keys on Keel's primary");
    let mut app = Resp::connect(&primary);
    assert_eq!(app.cmd(&["AUTH", "app", "app-password"]), "+OK");
    assert_eq!(app.cmd(&["GET", "app:before"]), "1");
    assert_eq!(app.cmd(&["SET", "app:after", "2"]), "+OK", "the adopted user writes through Keel");
    assert!(app.cmd(&["SET", "other", "1"]).starts_with("-NOPERM"), "and keeps its key pattern");
    assert!(Resp::try_connect(&stock, Duration::from_secs(1)).is_err(), "the running Redis was shut down after the switch");
    for r in env_value(&dir, "KEEL_REPLICAS").split(',').filter(|r| !r.is_empty()) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while dbsize(r) != total + 1 {
            assert!(Instant::now() < deadline, "replica {r} never caught up");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let total = dbsize(&primary);

    // Leaving: one plain redis-server with the data and the users.
    let o = out.to_string_lossy().to_string();
    script(&["leave", "--dir", &d, "--out", &o, "--port", &plain_port.to_string()], &dir);
    let plain = format!("127.0.0.1:{plain_port}");
    assert_eq!(dbsize(&plain), total, "every key is on the plain Redis");
    check_acked(&plain, &acks);
    let mut c = Resp::connect(&plain);
    assert_eq!(c.full(&["MODULE", "LIST"]), "[]", "no module");
    assert!(!c.full(&["ACL", "USERS"]).contains("keel"), "Keel's control user is gone");
    assert_eq!(c.cmd(&["AUTH", "app", "app-password"]), "+OK");
    assert_eq!(c.cmd(&["GET", "app:after"]), "2");
    assert!(c.cmd(&["GET", "w:1"]).starts_with("-NOPERM"), "the user keeps its key pattern");
    drop(cleanup);
}

/// An adopter that dies after it fenced the running Redis (here: the fence
/// is made by hand, then the adopter is killed) leaves the nodes out of
/// elections; `keel-sidecar adopt --finish-fenced` refuses while the
/// running Redis can still take writes, and once it is fenced hands the
/// primary role to a caught-up node, with every write on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adoption_that_died_after_its_fence_is_finished() {
    let journal = JournalCluster::start(1).await;
    let root = journal.dir.path().to_path_buf();
    let stock_dir = root.join("stock");
    std::fs::create_dir_all(&stock_dir).unwrap();
    let stock_port = keel_tests::free_port();
    let stock = format!("127.0.0.1:{stock_port}");
    let cleanup = Cleanup { dir: None, pids: vec![stock_redis(stock_port, &stock_dir)] };
    let mut c = Resp::connect(&stock);
    for i in 0..100 {
        assert_eq!(c.cmd(&["SET", &format!("k:{i}"), &i.to_string()]), "+OK");
    }
    let work = root.join("adopt");
    let adopt_args = |extra: &[&str]| {
        let mut cmd = Command::new(bin("keel-sidecar"));
        cmd.args(["adopt", "--redis", &stock, "--journal", &journal.endpoints(), "--store"]);
        cmd.arg(root.join("snapshots")).arg("--work-dir").arg(&work).arg("--switch-file").arg(root.join("never"));
        cmd.args(journal.sidecar_tls_args("adopter")).args(extra);
        cmd
    };
    let mut adopter = adopt_args(&[]).stderr(std::process::Stdio::null()).spawn().unwrap();
    let mut node = KeelNode::new("node-0", Server::Redis, &root, &journal.endpoints(), 1000);
    node.start_redis();
    node.start_sidecar();
    // The node is fed the running Redis's data and its later writes.
    assert_eq!(c.cmd(&["SET", "late", "1"]), "+OK");
    let deadline = Instant::now() + Duration::from_secs(60);
    while Resp::try_connect(&node.addr(), Duration::from_secs(1)).map(|mut r| r.cmd(&["GET", "late"])).unwrap_or_default() != "1" {
        assert!(Instant::now() < deadline, "the node was never fed the running Redis's writes");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Not fenced yet: finishing is refused, nothing moves.
    let out = adopt_args(&["--finish-fenced"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("is not fenced"), "{err}");
    // The adopter dies right after fencing the running Redis.
    assert_eq!(c.cmd(&["CONFIG", "SET", "replica-serve-stale-data", "no"]), "+OK");
    assert_eq!(c.cmd(&["REPLICAOF", "127.0.0.1", &stock_port.to_string()]), "+OK");
    adopter.kill().unwrap();
    adopter.wait().unwrap();
    // Well past the adopter's lease, the node still does not lead.
    let lapsed = Instant::now() + Duration::from_millis(3000);
    while Instant::now() < lapsed {
        assert_eq!(node.role(), "replica", "a node led while the adoption's record stood");
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = adopt_args(&["--finish-fenced"]).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    assert!(text.contains(&format!("the primary is now {}", node.addr())), "{text}");
    let mut p = Resp::connect(&node.addr());
    let deadline = Instant::now() + Duration::from_secs(20);
    while p.cmd(&["SET", "after", "1"]) != "+OK" {
        assert!(Instant::now() < deadline, "the node never took writes");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(p.cmd(&["GET", "k:99"]), "99");
    assert_eq!(p.cmd(&["GET", "late"]), "1");
    assert!(Resp::try_connect(&stock, Duration::from_secs(1)).is_err(), "the running Redis was shut down");
    drop(cleanup);
}
