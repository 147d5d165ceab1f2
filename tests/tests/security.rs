//! Who may steer a Keel node (module/src/control.rs, sidecar/src/auth.rs),
//! end to end with real processes:
//! - the control commands (`KEEL.ACK`, `KEEL.LEASE`…) answer `NOPERM` to
//!   every client but the node's own sidecar, the default user with
//!   `+@all` included, and change nothing; `KEEL.ACK` beyond what Redis
//!   produced is refused even to the sidecar's user;
//! - nobody but that user may change or delete it;
//! - Redis's role commands (`REPLICAOF`, `SLAVEOF`, `CLUSTER FAILOVER`,
//!   also inside MULTI and scripts; `FAILOVER` is Keel's graceful handover,
//!   refused on a replica) are refused on the primary
//!   and on a replica, and `CONFIG SET replica-read-only no` too: the
//!   deployment keeps its primary, a replica keeps refusing writes, and the
//!   sidecars' own failover still works;
//! - `CLIENT KILL` of the sidecar's links and `CLIENT PAUSE` heal;
//! - the module refuses to load without a sound secret file, and the
//!   sidecar refuses to start with one it should not trust;
//! - the secret rotates without a restart or a failover (on Redis and
//!   Valkey), an invalid new file changes nothing, and a journal node's
//!   certificate rotates without a failover.
//!
//! The tests share the machine's two cores and time-sensitive leases, so
//! they run one at a time.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use keel_tests::CONTROL_USER;
use keel_tests::KeelCluster;
use keel_tests::KeelPrimary;
use keel_tests::Resp;
use keel_tests::Server;
use keel_tests::bin;
use keel_tests::control_secret_of;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Waits until `ok` holds, at most `limit`.
fn wait_until(limit: Duration, what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ok() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn info_field(c: &mut Resp, section: &str, field: &str) -> String {
    let info = c.cmd(&["INFO", section]);
    info.lines().find_map(|l| l.strip_prefix(&format!("{field}:"))).unwrap_or_default().trim().to_string()
}

/// A client authenticated as the node's control user (the sidecar's).
fn as_control(addr: &str, dir: &std::path::Path) -> Resp {
    let mut c = Resp::connect(addr);
    assert_eq!(c.cmd(&["AUTH", CONTROL_USER, &control_secret_of(dir)]), "+OK");
    c
}

/// The default user (no password, `+@all`) sends every control command:
/// each is refused with NOPERM naming it, and nothing changes (a held write
/// stays held, the durable offset stays). The control user's `KEEL.ACK`
/// beyond Redis's offset is refused too. Nobody else may change or delete
/// the control user; other users are managed as usual; nobody unloads the
/// module. The secret is in no INFO and no log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_commands_are_only_the_sidecars() {
    let _serial = serial();
    let p = KeelPrimary::start(Server::Redis, 1, &[]).await;
    let addr = p.addr();
    let mut c = Resp::connect(&addr);
    let mut control = as_control(&addr, &p.dir);
    assert_eq!(c.cmd(&["SET", "before", "v"]), "+OK");
    // Acknowledgements of what Redis never produced: refused to the default
    // user, and to the control user itself (were either taken, every later
    // write would be answered before it is durable; the next one is held).
    let reply = c.cmd(&["KEEL.ACK", "999999999999"]);
    assert!(reply.starts_with("-NOPERM only this node's Keel sidecar"), "{reply}");
    let reply = control.cmd(&["KEEL.ACK", "999999999999"]);
    assert!(reply.starts_with("-ERR KEEL.ACK 999999999999 is beyond this Redis's replication offset"), "{reply}");
    // Hold a write: the sidecar's confirmations are refused for now.
    assert_eq!(control.cmd(&["ACL", "SETUSER", CONTROL_USER, "-keel.ack"]), "+OK");
    let writer = {
        let addr = addr.clone();
        std::thread::spawn(move || Resp::connect(&addr).cmd(&["SET", "held", "v"]))
    };
    wait_until(Duration::from_secs(10), "the write is held", || info_field(&mut c, "keel", "keel_pending_replies") == "1");
    let durable = info_field(&mut c, "keel", "keel_durable_offset");
    for cmd in [
        &["KEEL.ACK", "999999999999"][..],
        &["keel.ack", "1"],
        &["KEEL.FENCED", "test"],
        &["KEEL.LEADER", "someone", "shard-1"],
        &["KEEL.LEASE", "1"],
        &["KEEL.FOLLOWING", "someone", "shard-1", "1"],
        &["KEEL.SNAPSHOT", "1", "2", "3"],
        &["KEEL.STALLED", "4", "not a Keel record"],
    ] {
        let reply = c.cmd(cmd);
        let want = format!(
            "-NOPERM only this node's Keel sidecar (ACL user '{CONTROL_USER}') may run {}",
            cmd[0].to_ascii_uppercase()
        );
        assert_eq!(reply, want, "{cmd:?}");
    }
    assert_eq!(info_field(&mut c, "keel", "keel_pending_replies"), "1", "a refused KEEL.ACK released the write");
    assert_eq!(info_field(&mut c, "keel", "keel_durable_offset"), durable);
    assert_eq!(info_field(&mut c, "keel", "keel_role"), "primary");
    assert_eq!(info_field(&mut c, "keel", "keel_snapshot_seq"), "0");
    assert_eq!(info_field(&mut c, "keel", "keel_feed_stalled_seq"), "0");
    // The control user is the module's: no other client changes it.
    for cmd in [
        &["ACL", "SETUSER", CONTROL_USER, "nopass"][..],
        &["ACL", "SETUSER", CONTROL_USER, "+keel.ack"],
        &["acl", "setuser", CONTROL_USER, "off"],
        &["ACL", "DELUSER", "nobody", CONTROL_USER],
    ] {
        let reply = c.cmd(cmd);
        assert!(reply.starts_with(&format!("-NOPERM the ACL user '{CONTROL_USER}' belongs to this node's Keel sidecar")), "{cmd:?}: {reply}");
    }
    assert!(c.full(&["ACL", "GETUSER", CONTROL_USER]).contains("on"), "the control user was changed");
    let reply = c.cmd(&["MODULE", "UNLOAD", "keel"]);
    assert!(reply.starts_with("-ERR Keel cannot be unloaded"), "{reply}");
    assert_eq!(c.cmd(&["ACL", "SETUSER", "bob", "on", ">pw", "~*", "+@all"]), "+OK");
    assert_eq!(c.cmd(&["ACL", "DELUSER", "bob"]), ":1");
    // The sidecar may confirm again: the held write is answered.
    assert_eq!(control.cmd(&["ACL", "SETUSER", CONTROL_USER, "+keel.ack"]), "+OK");
    assert_eq!(writer.join().unwrap(), "+OK");
    assert_eq!(c.cmd(&["SET", "after", "v"]), "+OK");
    // The secret is in no INFO and no log.
    let secret = control_secret_of(&p.dir);
    let info = c.cmd(&["INFO", "everything"]);
    assert!(info.contains(&format!("keel_control_user:{CONTROL_USER}")) && info.contains("keel_control_secret_file:"), "{info}");
    assert!(!info.contains(&secret), "INFO shows the secret");
    for log in ["redis.log", "sidecar.log"] {
        let text = std::fs::read_to_string(p.dir.join(log)).unwrap();
        assert!(!text.contains(&secret), "{log} shows the secret");
    }
}

/// Role commands from clients, on the primary and on a replica, alone, in
/// MULTI and in a script: each is refused naming the Keel way; the
/// deployment keeps its primary, the replica its role and its refusal of
/// writes (`CONFIG SET replica-read-only no` is refused too); then the
/// sidecars' own failover (the primary's Redis is killed) still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn role_commands_from_clients_are_refused() {
    let _serial = serial();
    let mut c = KeelCluster::start(Server::Redis, 1, 2, 1000).await;
    let role_refused = |reply: &str, what: &str| {
        assert!(reply.starts_with("-ERR Keel decides this node's role:"), "{what}: {reply}");
    };
    for i in [0, 1] {
        let mut r = Resp::connect(&c.nodes[i].addr());
        // FAILOVER is Keel's graceful handover on a primary
        // (tests/tests/handover.rs); nothing to abort here, and a replica
        // has nothing to hand over.
        let reply = r.cmd(&["FAILOVER", "ABORT"]);
        assert_eq!(reply, "-ERR No failover in progress.", "node {i}");
        if i == 1 {
            let reply = r.cmd(&["FAILOVER"]);
            assert!(reply.starts_with("-ERR FAILOVER is not valid when server is a replica"), "{reply}");
        }
        for cmd in [
            &["REPLICAOF", "NO", "ONE"][..],
            &["REPLICAOF", "127.0.0.1", "1"],
            &["SLAVEOF", "no", "one"],
            &["slaveof", "127.0.0.1", "1"],
            &["CLUSTER", "FAILOVER", "TAKEOVER"],
        ] {
            role_refused(&r.cmd(cmd), &format!("node {i}: {cmd:?}"));
        }
        let reply = r.full(&["EVAL", "return redis.call('replicaof', 'no', 'one')", "0"]);
        assert!(reply.starts_with("-") && !reply.contains("+OK"), "node {i}: a script ran REPLICAOF: {reply}");
        assert_eq!(r.cmd(&["MULTI"]), "+OK");
        let queued = r.cmd(&["REPLICAOF", "NO", "ONE"]);
        let exec = r.full(&["EXEC"]);
        if i == 0 {
            // The module keeps the primary's transactions: refused at queue time.
            role_refused(&queued, "REPLICAOF in MULTI");
            assert!(exec.starts_with("-EXECABORT"), "{exec}");
        } else {
            // A replica's are Redis's own: refused when EXEC runs it.
            assert_eq!(queued, "+QUEUED");
            assert!(exec.starts_with("[-ERR Keel decides this node's role:"), "{exec}");
        }
    }
    let mut replica = Resp::connect(&c.nodes[1].addr());
    for cmd in [&["CONFIG", "SET", "replica-read-only", "no"][..], &["config", "set", "maxmemory", "0", "slave-read-only", "NO"]] {
        let reply = replica.cmd(cmd);
        assert!(reply.starts_with("-ERR Keel keeps replica-read-only yes"), "{cmd:?}: {reply}");
    }
    assert_eq!(replica.full(&["CONFIG", "GET", "replica-read-only"]), "[replica-read-only, yes]");
    let reply = replica.cmd(&["SET", "on-replica", "v"]);
    assert!(reply.starts_with("-READONLY"), "{reply}");
    // Nothing moved: the same primary, the replica still synced, writes work.
    assert_eq!(c.primaries(), vec![0]);
    c.wait_replica_synced(1, Duration::from_secs(10));
    c.wait_writable(0, Duration::from_secs(10));
    let mut primary = Resp::connect(&c.nodes[0].addr());
    assert_eq!(primary.cmd(&["SET", "k", "v"]), "+OK");
    // The sidecars' own role changes go through.
    c.nodes[0].kill_redis();
    let p = c.wait_new_primary(Some(0), Duration::from_secs(30));
    assert_eq!(p, 1);
    c.wait_writable(1, Duration::from_secs(30));
    assert_eq!(Resp::connect(&c.nodes[1].addr()).cmd(&["GET", "k"]), "v");
}

/// `CLIENT KILL` of the sidecar's replication link, then of every other
/// client, then `CLIENT PAUSE` of everything: each time the primary
/// acknowledges writes again by itself, within a bounded wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_kill_and_pause_heal() {
    let _serial = serial();
    let p = KeelPrimary::start(Server::Redis, 1, &[]).await;
    let mut c = Resp::connect(&p.addr());
    let killed = c.cmd(&["CLIENT", "KILL", "TYPE", "replica"]);
    assert_eq!(killed, ":1", "the sidecar's replication link");
    p.wait_writable();
    let me = c.cmd(&["CLIENT", "ID"]).trim_start_matches(':').to_string();
    let list = c.cmd(&["CLIENT", "LIST"]);
    let others: Vec<String> = list
        .lines()
        .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")).map(|s| s.to_string()))
        .filter(|id| *id != me)
        .collect();
    assert!(!others.is_empty(), "{list}");
    for id in &others {
        c.cmd(&["CLIENT", "KILL", "ID", id]);
    }
    p.wait_writable();
    assert_eq!(c.cmd(&["CLIENT", "PAUSE", "1500", "ALL"]), "+OK");
    p.wait_writable();
    assert_eq!(c.cmd(&["SET", "after-pause", "v"]), "+OK");
}

/// The module does not load without a sound control secret file: missing
/// argument, missing file, a file others may read, an empty or short
/// secret. The sidecar refuses the same files.
#[test]
fn bad_control_secret_files_are_refused() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, contents: &str, mode: u32| {
        let path = dir.path().join(name);
        std::fs::write(&path, contents).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path.display().to_string()
    };
    let good = "0123456789abcdef0123456789abcdef\n";
    let readable = file("readable", good, 0o644);
    let short = file("short", "tooshort\n", 0o600);
    let empty = file("empty", "\n", 0o600);
    let missing = dir.path().join("missing").display().to_string();
    for (arg, says) in [
        (None, "control_secret_file=<path> is required".to_string()),
        (Some(&missing), format!("{missing:?}")),
        (Some(&readable), "chmod 600".to_string()),
        (Some(&short), "it must be at least 16".to_string()),
        (Some(&empty), "is empty".to_string()),
    ] {
        let mut cmd = Command::new(Server::Redis.binary());
        cmd.args(["--port", &keel_tests::free_port().to_string(), "--save", ""])
            .arg("--dir")
            .arg(dir.path())
            .arg("--loadmodule")
            .arg(bin("libkeel_module.so"));
        if let Some(path) = arg {
            cmd.arg(format!("control_secret_file={path}"));
        }
        let out = cmd.output().unwrap();
        assert!(!out.status.success(), "redis-server loaded the module with {arg:?}");
        let log = String::from_utf8_lossy(&out.stdout);
        assert!(log.contains(&says), "{arg:?}: wanted {says:?} in {log}");
    }
    for (path, says) in [(&readable, "chmod 600"), (&short, "at least 16"), (&missing, "missing")] {
        let out = Command::new(bin("keel-sidecar"))
            .args(["node", "--journal", "127.0.0.1:1", "--state-dir"])
            .arg(dir.path().join("state"))
            .args(["--control-secret-file", path])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "the sidecar started with {path}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{path}: {err}");
    }
    let out = Command::new(bin("keel-sidecar")).args(["node", "--journal", "127.0.0.1:1", "--state-dir", "x"]).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--control-secret-file"));
}

/// A server started with `--replica-read-only no` gets `yes` from the
/// module (a replica never holds the lease), which logs that it did.
#[test]
fn replica_read_only_is_set_at_load() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let port = keel_tests::free_port();
    let mut redis = Some(keel_tests::spawn_redis(Server::Redis, port, dir.path(), &["--replica-read-only".into(), "no".into()]));
    let mut c = Resp::connect(&format!("127.0.0.1:{port}"));
    wait_until(Duration::from_secs(10), "replica-read-only is yes", || {
        c.full(&["CONFIG", "GET", "replica-read-only"]) == "[replica-read-only, yes]"
    });
    let log = std::fs::read_to_string(dir.path().join("redis.log")).unwrap();
    assert!(log.contains("replica-read-only was \"no\"; set to yes"), "{log}");
    keel_tests::kill_child(&mut redis);
}

/// Writes `dir/control.secret` anew as an operator would: a fresh secret in
/// a temporary file of mode 0600, renamed over the old one. Returns it.
fn rotate_secret_file(dir: &std::path::Path) -> String {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let secret = keel_tests::new_uuid().replace('-', "") + &keel_tests::new_uuid().replace('-', "");
    let tmp = dir.join("control.secret.new");
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).unwrap();
    writeln!(f, "{secret}").unwrap();
    drop(f);
    std::fs::rename(&tmp, dir.join("control.secret")).unwrap();
    secret
}

/// What `AUTH keel-sidecar <secret>` answers on a new connection.
fn auth_answer(addr: &str, secret: &str) -> String {
    Resp::connect(addr).cmd(&["AUTH", CONTROL_USER, secret])
}

/// Ids of the clients of `addr` authenticated as the control user that
/// have been connected for at least a second (the sidecar's lasting links;
/// its one-command connections come and go).
fn lasting_control_clients(addr: &str) -> Vec<String> {
    let list = Resp::connect(addr).cmd(&["CLIENT", "LIST"]);
    list.lines()
        .filter(|l| l.contains(&format!(" user={CONTROL_USER} ")))
        .filter(|l| l.split(' ').find_map(|f| f.strip_prefix("age=")).and_then(|a| a.parse::<u64>().ok()).unwrap_or(0) >= 1)
        .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")).map(|s| s.to_string()))
        .collect()
}

/// A steady stream of writes to a node, on one connection, until stopped.
struct Writer {
    stop: Arc<AtomicBool>,
    /// Writes acknowledged so far.
    acked: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<()>,
}

impl Writer {
    fn start(addr: String) -> Writer {
        let (stop, acked) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let (s, a) = (stop.clone(), acked.clone());
        let thread = std::thread::spawn(move || {
            let mut c = Resp::connect(&addr);
            while !s.load(Ordering::Relaxed) {
                let n = a.load(Ordering::Relaxed);
                let reply = c.cmd(&["SET", &format!("w:{}", n % 1000), &n.to_string()]);
                assert_eq!(reply, "+OK", "write {n} was not acknowledged");
                a.fetch_add(1, Ordering::Relaxed);
            }
        });
        Writer { stop, acked, thread }
    }

    /// Waits until `more` writes past now are acknowledged.
    fn wait_more(&self, more: u64) {
        let target = self.acked.load(Ordering::Relaxed) + more;
        wait_until(Duration::from_secs(10), "writes acknowledged", || self.acked.load(Ordering::Relaxed) >= target);
    }

    /// Stops; panics if a write was not acknowledged. Returns how many were.
    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("every write was acknowledged");
        self.acked.load(Ordering::Relaxed)
    }
}

/// How soon a new secret must authenticate (the module reads the file once
/// a second).
const NEW_SECRET_WITHIN: Duration = Duration::from_secs(5);

/// Rotating the control secret (docs/security.md, "Rotating it") needs no
/// restart and no failover: a primary and a replica under a steady stream
/// of writes get a new secret file (written aside, renamed over); the new
/// secret authenticates within a poll, the old one stops after the grace,
/// the sidecars' open links are never closed, every write is acknowledged
/// and the stream's leader never changes. The sidecars' links then killed
/// (`CLIENT KILL USER`, and a kill -9 of the replica's sidecar) come back
/// with the new secret, and the node still leads. Returns the cluster.
async fn rotate_the_control_secret(server: Server) -> KeelCluster {
    let mut c = KeelCluster::start(server, 3, 2, 1000).await;
    let journal = c.journal.client();
    let leader = journal.stream_info("shard-1").await.unwrap().leader_uuid;
    let addrs: Vec<String> = c.nodes.iter().map(|n| n.addr()).collect();
    // The primary's sidecar keeps links open (its control connection, the
    // replication stream); a replica's opens one per command.
    wait_until(Duration::from_secs(10), "the primary's sidecar links last a second", || !lasting_control_clients(&addrs[0]).is_empty());
    let lasting: Vec<Vec<String>> = addrs.iter().map(|a| lasting_control_clients(a)).collect();
    let olds: Vec<String> = c.nodes.iter().map(|n| control_secret_of(&n.dir)).collect();
    let grace_ms: u64 = info_field(&mut Resp::connect(&addrs[0]), "keel", "keel_control_secret_grace_ms").parse().unwrap();
    let writes = Writer::start(addrs[0].clone());
    writes.wait_more(1);

    let rotated = Instant::now();
    let news: Vec<String> = c.nodes.iter().map(|n| rotate_secret_file(&n.dir)).collect();
    for (i, a) in addrs.iter().enumerate() {
        wait_until(NEW_SECRET_WITHIN, "the new secret authenticates", || auth_answer(a, &news[i]) == "+OK");
    }
    let new_after = rotated.elapsed();
    for (i, a) in addrs.iter().enumerate() {
        assert_eq!(auth_answer(a, &olds[i]), "+OK", "the old secret works during the grace");
    }
    for (i, a) in addrs.iter().enumerate() {
        wait_until(Duration::from_millis(grace_ms) + NEW_SECRET_WITHIN, "the old secret is refused", || {
            auth_answer(a, &olds[i]).starts_with("-WRONGPASS")
        });
    }
    let old_until = rotated.elapsed();
    eprintln!("{server:?}: new secret accepted after {new_after:?}, old one refused after {old_until:?}");
    assert!(old_until >= Duration::from_millis(grace_ms), "the old secret was refused before the grace ended");
    for (i, a) in addrs.iter().enumerate() {
        let now = lasting_control_clients(a);
        assert!(lasting[i].iter().all(|id| now.contains(id)), "a sidecar link was closed: {:?} then {now:?}", lasting[i]);
        let mut r = Resp::connect(a);
        let loaded = info_field(&mut r, "keel", "keel_control_secret_loaded_unix_ms");
        assert!(!loaded.is_empty() && loaded != "0", "{loaded}");
        assert_eq!(info_field(&mut r, "keel", "keel_control_secret_retiring"), "0");
        let info = r.cmd(&["INFO", "keel"]);
        assert!(!info.contains(&news[i]) && !info.contains(&olds[i]), "a secret in INFO: {info}");
    }
    writes.wait_more(1);
    let acknowledged = writes.finish();
    eprintln!("{server:?}: {acknowledged} writes acknowledged during the rotation");
    assert_eq!(journal.stream_info("shard-1").await.unwrap().leader_uuid, leader, "no failover");
    assert_eq!(c.primaries(), vec![0]);

    // The sidecars' links killed: they come back with the new secret.
    let killed = Resp::connect(&addrs[0]).cmd(&["CLIENT", "KILL", "USER", CONTROL_USER]);
    assert!(killed.starts_with(':') && killed != ":0", "{killed}");
    c.nodes[1].kill_sidecar();
    c.nodes[1].start_sidecar();
    c.wait_writable(0, Duration::from_secs(30));
    c.wait_replica_synced(1, Duration::from_secs(30));
    assert_eq!(journal.stream_info("shard-1").await.unwrap().leader_uuid, leader, "no failover");
    assert_eq!(c.primaries(), vec![0]);
    for (i, n) in c.nodes.iter().enumerate() {
        let log = std::fs::read_to_string(n.dir.join("redis.log")).unwrap();
        assert!(log.contains("holds a new secret") && !log.contains(&news[i]) && !log.contains(&olds[i]), "{}", n.dir.display());
    }
    c
}

/// An invalid secret file (open to others, too short) changes nothing and
/// is reported once in the log and in `INFO keel`; the secret keeps
/// working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_new_secret_file_changes_nothing() {
    let _serial = serial();
    let p = KeelPrimary::start(Server::Redis, 1, &[]).await;
    let secret = control_secret_of(&p.dir);
    let file = p.dir.join("control.secret");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut c = Resp::connect(&p.addr());
    wait_until(Duration::from_secs(5), "the refusal in INFO keel", || {
        info_field(&mut c, "keel", "keel_control_secret_file_error").contains("chmod 600")
    });
    // Three reads of the file later: logged once, the secret unchanged.
    let polls = |c: &mut Resp| info_field(c, "keel", "keel_control_secret_polls").parse::<u64>().unwrap();
    let seen = polls(&mut c);
    wait_until(Duration::from_secs(10), "three more reads of the file", || polls(&mut c) >= seen + 3);
    let log = std::fs::read_to_string(p.dir.join("redis.log")).unwrap();
    assert_eq!(log.matches("chmod 600 it; the control user keeps its current secret").count(), 1, "{log}");
    assert_eq!(auth_answer(&p.addr(), &secret), "+OK");
    std::fs::write(&file, "short\n").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    wait_until(Duration::from_secs(5), "the new refusal in INFO keel", || {
        info_field(&mut c, "keel", "keel_control_secret_file_error").contains("at least 16")
    });
    assert_eq!(auth_answer(&p.addr(), &secret), "+OK");
    assert_eq!(auth_answer(&p.addr(), "short"), "-WRONGPASS invalid username-password pair or user is disabled.");
    p.wait_writable();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_secret_rotates_without_a_failover_on_valkey() {
    let _serial = serial();
    rotate_the_control_secret(Server::Valkey).await;
}

/// On Redis 7.0, then a journal node's certificate is rotated too
/// (docs/security.md, "Rotating a process's certificate"): its pair moved
/// away, `keel-journal certs` issues a new one from the same CA, the node
/// restarts with it; writes go on being acknowledged and the stream's
/// leader stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_secret_and_a_journal_certificate_rotate_without_a_failover() {
    let _serial = serial();
    let mut c = rotate_the_control_secret(Server::Redis).await;
    let journal = c.journal.client();
    let leader = journal.stream_info("shard-1").await.unwrap().leader_uuid;
    let raft_leader = c.journal.wait_leader().await;
    let i = (raft_leader + 1) % c.journal.nodes.len();
    let id = c.journal.nodes[i].id;
    let tls = c.journal.tls_dir.clone().expect("a TLS journal");
    let pem = tls.join(format!("journal-{id}.pem"));
    let before = std::fs::read(&pem).unwrap();
    let old = tls.join("old");
    std::fs::create_dir_all(&old).unwrap();
    for ext in ["pem", "key"] {
        std::fs::rename(tls.join(format!("journal-{id}.{ext}")), old.join(format!("journal-{id}.{ext}"))).unwrap();
    }
    let out = Command::new(bin("keel-journal"))
        .args(["certs", "--dir"])
        .arg(&tls)
        .args(["--journal-nodes", &c.journal.nodes.len().to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_ne!(std::fs::read(&pem).unwrap(), before, "a new certificate");
    let writes = Writer::start(c.nodes[0].addr());
    writes.wait_more(1);
    c.journal.kill(i);
    c.journal.restart(i);
    // The restarted node serves with its new certificate and catches up.
    let applied = journal.node_status(raft_leader).await.unwrap().last_applied_index;
    c.journal.wait_applied(i, applied).await;
    writes.wait_more(10);
    writes.finish();
    assert_eq!(journal.stream_info("shard-1").await.unwrap().leader_uuid, leader, "no failover");
    assert_eq!(c.primaries(), vec![0]);
    c.wait_writable(0, Duration::from_secs(10));
}

/// The replica feed serves only its own node's Redis: a stock
/// redis-server told to replicate from a replica's feed, without the feed's
/// password or with a wrong one, never links up nor gets a key; no client
/// but the control user sets a Keel node's `masterauth`; a replica whose
/// sidecar restarted (a new feed password) links up again by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_feed_takes_only_its_own_redis() {
    let _serial = serial();
    let mut c = KeelCluster::start(Server::Redis, 1, 2, 1000).await;
    let mut primary = Resp::connect(&c.nodes[0].addr());
    assert_eq!(primary.cmd(&["SET", "secret-key", "v1"]), "+OK");
    let mut replica = Resp::connect(&c.nodes[1].addr());
    wait_until(Duration::from_secs(30), "the replica has the write", || replica.cmd(&["GET", "secret-key"]) == "v1");
    let feed_port = c.nodes[1].info_field("replication", "master_port").expect("the replica's master port");

    let strays = tempfile::tempdir().unwrap();
    let mut spawned = Vec::new();
    for (name, auth) in [("none", None), ("wrong", Some("not-the-feed-password"))] {
        let dir = strays.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let port = keel_tests::free_port();
        let mut cmd = Command::new(Server::Redis.binary());
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]);
        cmd.arg("--dir").arg(&dir).arg("--logfile").arg(dir.join("redis.log"));
        cmd.args(["--replicaof", "127.0.0.1", &feed_port]);
        if let Some(a) = auth {
            cmd.args(["--masterauth", a]);
        }
        spawned.push((Some(cmd.spawn().expect("redis-server")), port, dir));
    }
    for (_, port, dir) in &spawned {
        // Its second attempt: the first one ended.
        wait_until(Duration::from_secs(30), "the stray server tried the feed twice", || {
            std::fs::read_to_string(dir.join("redis.log")).unwrap_or_default().matches("Connecting to MASTER").count() >= 2
        });
        let mut s = Resp::connect(&format!("127.0.0.1:{port}"));
        assert_eq!(info_field(&mut s, "replication", "master_link_status"), "down");
        assert_eq!(s.cmd(&["DBSIZE"]), ":0", "the stray server got the dataset");
    }
    for (child, _, _) in &mut spawned {
        keel_tests::kill_child(child);
    }

    // Nobody else sets the feed's password (or user) on a Keel node.
    for param in ["masterauth", "masteruser"] {
        let e = replica.cmd(&["CONFIG", "SET", param, "x"]);
        assert!(e.starts_with("-ERR Keel sets masterauth"), "{param}: {e}");
    }
    assert_eq!(info_field(&mut replica, "replication", "master_link_status"), "up");

    // A restarted sidecar has a new password; its Redis is told it.
    c.nodes[1].kill_sidecar();
    c.nodes[1].start_sidecar();
    assert_eq!(primary.cmd(&["SET", "secret-key", "v2"]), "+OK");
    wait_until(Duration::from_secs(30), "the replica has the write made after its sidecar restarted", || {
        replica.cmd(&["GET", "secret-key"]) == "v2"
    });
    c.wait_replica_synced(1, Duration::from_secs(30));
}
