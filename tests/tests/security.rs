//! Who may steer a Keel node (module/src/control.rs, sidecar/src/auth.rs),
//! end to end with real processes:
//! - the control commands (`KEEL.ACK`, `KEEL.LEASE`…) answer `NOPERM` to
//!   every client but the node's own sidecar, the default user with
//!   `+@all` included, and change nothing; `KEEL.ACK` beyond what Redis
//!   produced is refused even to the sidecar's user;
//! - nobody but that user may change or delete it;
//! - Redis's role commands (`FAILOVER`, `REPLICAOF`, `SLAVEOF`, `CLUSTER
//!   FAILOVER`, also inside MULTI and scripts) are refused on the primary
//!   and on a replica, and `CONFIG SET replica-read-only no` too: the
//!   deployment keeps its primary, a replica keeps refusing writes, and the
//!   sidecars' own failover still works;
//! - `CLIENT KILL` of the sidecar's links and `CLIENT PAUSE` heal;
//! - the module refuses to load without a sound secret file, and the
//!   sidecar refuses to start with one it should not trust.
//!
//! The tests share the machine's two cores and time-sensitive leases, so
//! they run one at a time.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::sync::Mutex;
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
        for cmd in [
            &["FAILOVER"][..],
            &["FAILOVER", "ABORT"],
            &["REPLICAOF", "NO", "ONE"],
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
