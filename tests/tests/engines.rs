//! Upgrade protection: a node whose server cannot load what the stream's
//! engine wrote (a Redis 7.0 replica behind a Valkey 9.1 primary, whose
//! RDB is version 80) is refused cleanly: it is not fed, says why in `INFO
//! keel`, keeps running, and never stands for election. The base (a
//! snapshot or the journal's base RDB) is checked, and so is every record,
//! which names its writer's engine.

use std::time::Duration;
use std::time::Instant;

use keel_tests::KeelCluster;
use keel_tests::Resp;
use keel_tests::Server;
use keel_tests::bin;

const LEASE_MS: u64 = 1000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_7_replica_behind_a_valkey_primary_is_refused_cleanly() {
    let mut c = KeelCluster::start(Server::Valkey, 1, 3, LEASE_MS).await;
    let mut p = Resp::connect(&c.nodes[0].addr());
    for i in 0..50 {
        assert_eq!(p.cmd(&["SET", &format!("k{i}"), "v"]), "+OK");
    }
    // A snapshot made by Valkey (RDB version 80) becomes the stream's base.
    let work = c.journal.dir.path().join("snapshotter");
    let out = std::process::Command::new(bin("keel-sidecar"))
        .args(["snapshot", "--once", "--journal", &c.journal.endpoints(), "--stream", "shard-1", "--store", &c.nodes[0].store])
        .arg("--work-dir")
        .arg(&work)
        .arg("--redis-server")
        .arg(Server::Valkey.binary())
        .args(c.journal.sidecar_tls_args("snapshotter"))
        .output()
        .unwrap();
    assert!(out.status.success(), "snapshot: {}", String::from_utf8_lossy(&out.stderr));
    // Node 2 goes back to Redis 7.0 (the wrong way round for an upgrade):
    // a fresh server, its Valkey dump left behind.
    c.nodes[2].kill_redis();
    for e in std::fs::read_dir(&c.nodes[2].dir).unwrap().flatten() {
        if e.path().extension().is_some_and(|x| x == "rdb") {
            std::fs::remove_file(e.path()).unwrap();
        }
    }
    c.nodes[2].server = Server::Redis;
    c.nodes[2].start_redis();
    let deadline = Instant::now() + Duration::from_secs(30);
    let reason = loop {
        let r = c.nodes[2].info_field("keel", "keel_feed_stalled_reason").unwrap_or_default();
        if r.contains("cannot load RDB version") {
            break r;
        }
        assert!(Instant::now() < deadline, "node 2 (Redis 7.0) never said it cannot load the stream's base; last: {r:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(reason.contains("redis 7.0") && reason.contains("RDB version 80"), "{reason}");
    assert_eq!(c.nodes[2].info_field("server", "redis_version").as_deref().map(|v| v.starts_with("7.0")), Some(true));
    assert_ne!(c.nodes[2].info_field("replication", "master_link_status").as_deref(), Some("up"), "node 2 was fed");

    // The primary goes: the Valkey replica takes over, never node 2.
    c.nodes[0].kill_sidecar();
    c.nodes[0].kill_redis();
    let np = c.wait_new_primary(Some(0), Duration::from_secs(20));
    assert_eq!(np, 1, "the Redis 7.0 node was elected");
    let mut p = Resp::connect(&c.nodes[1].addr());
    assert_eq!(p.cmd(&["GET", "k49"]), "v");
    assert_eq!(p.cmd(&["SET", "after", "1"]), "+OK");
    // Node 2 still runs, still refused, and still no primary.
    assert_ne!(c.nodes[2].role(), "primary");
    assert!(c.nodes[2].info_field("keel", "keel_feed_stalled_reason").unwrap_or_default().contains("cannot load"));
}

/// A writer that writes `u:N` to whichever node is primary, one write at
/// a time, and keeps the N whose write was acknowledged.
fn writer(addrs: Vec<String>, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) -> std::thread::JoinHandle<Vec<u64>> {
    std::thread::spawn(move || {
        let mut acked = Vec::new();
        let mut n = 0u64;
        let mut conn: Option<Resp> = None;
        let mut at = 0usize;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            if conn.is_none() {
                at = (at + 1) % addrs.len();
                conn = Resp::try_connect(&addrs[at], Duration::from_secs(2)).ok();
                if conn.is_none() {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
            }
            n += 1;
            match conn.as_mut().unwrap().try_cmd(&["SET", &format!("u:{n}"), "1"]) {
                Ok(r) if r == "+OK" => acked.push(n),
                // Not the primary (or not now): try the next node.
                _ => {
                    conn = None;
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        acked
    })
}

/// Waits (30 s at most) until node `i` says it is refused the records of a
/// writer whose RDB its server cannot load; returns the reason.
fn wait_refused(c: &KeelCluster, i: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = c.nodes[i].info_field("keel", "keel_feed_stalled_reason").unwrap_or_default();
        if r.contains("cannot load RDB version") && r.contains("which wrote record") {
            return r;
        }
        assert!(Instant::now() < deadline, "node {i} was never refused a record; last reason: {r:?}; logs in {}", c.nodes[i].dir.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Writes `key` on primary `p` and waits (30 s at most) until replica `i`
/// has it and says no refusal: it is fed again.
fn wait_fed(c: &KeelCluster, i: usize, p: usize, key: &str) {
    assert_eq!(Resp::connect(&c.nodes[p].addr()).cmd(&["SET", key, "1"]), "+OK");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut replica = Resp::connect(&c.nodes[i].addr());
    loop {
        let reason = c.nodes[i].info_field("keel", "keel_feed_stalled_reason").unwrap_or_default();
        if reason.is_empty() && replica.cmd(&["GET", key]) == "1" {
            return;
        }
        assert!(Instant::now() < deadline, "node {i} was not fed {key} (reason: {reason:?}); logs in {}", c.nodes[i].dir.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Restarts node `i`'s server on `server`, keeping its data directory.
fn restart_on(c: &mut KeelCluster, i: usize, server: Server) {
    c.nodes[i].kill_redis();
    c.nodes[i].server = server;
    c.nodes[i].start_redis();
}

/// A deployment on Redis 7.0 rolls to Valkey 9.1 under a writing client:
/// replicas first (each loads the Redis-written stream), then the primary
/// hands over to an upgraded replica and is upgraded last. No acknowledged
/// write is lost, and the last primary runs Valkey.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_upgrade_from_redis_to_valkey_loses_nothing() {
    let mut c = KeelCluster::start(Server::Redis, 1, 3, LEASE_MS).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let w = writer(c.nodes.iter().map(|n| n.addr()).collect(), stop.clone());
    std::thread::sleep(Duration::from_millis(500));
    for i in [2, 1] {
        restart_on(&mut c, i, Server::Valkey);
        c.wait_replica_synced(i, Duration::from_secs(30));
        let v = c.nodes[i].info_field("server", "valkey_version").unwrap_or_default();
        assert!(v.starts_with('9'), "node {i} runs {v:?}");
        assert_eq!(c.nodes[i].info_field("keel", "keel_feed_stalled_reason").unwrap_or_default(), "");
    }
    // The primary hands over to an upgraded replica, then is upgraded.
    let mut p = Resp::connect(&c.nodes[0].addr());
    let to = c.nodes[1].addr();
    let (host, port) = to.rsplit_once(':').unwrap();
    assert_eq!(p.cmd(&["FAILOVER", "TO", host, port]), "+OK");
    assert_eq!(c.wait_new_primary(Some(0), Duration::from_secs(20)), 1);
    // The old primary, still on Redis 7.0, is refused the records Valkey
    // writes (the writer keeps writing) until it is upgraded too.
    let reason = wait_refused(&c, 0);
    assert!(reason.contains("redis 7.0") && reason.contains("valkey 9"), "{reason}");
    restart_on(&mut c, 0, Server::Valkey);
    c.wait_replica_synced(0, Duration::from_secs(30));
    wait_fed(&c, 0, 1, "upgraded-0");
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acked = w.join().unwrap();
    assert!(acked.len() > 20, "the writer was not acknowledged enough to judge: {}", acked.len());
    let mut p = Resp::connect(&c.nodes[1].addr());
    for n in &acked {
        assert_eq!(p.cmd(&["EXISTS", &format!("u:{n}")]), ":1", "acknowledged write u:{n} was lost");
    }
    assert!(c.nodes[1].info_field("server", "valkey_version").is_some());
    assert_eq!(c.primaries(), vec![1]);
}

/// During a rolling upgrade a snapshot of the newer engine is not
/// published while a node that cannot load it is a member: the older nodes
/// keep being fed, and the upgrade can still be abandoned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_no_member_can_load_is_not_published() {
    let c = KeelCluster::start(Server::Redis, 1, 2, LEASE_MS).await;
    let mut p = Resp::connect(&c.nodes[0].addr());
    assert_eq!(p.cmd(&["SET", "k", "v"]), "+OK");
    // Every member has said its engine.
    let journal = c.journal.client();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let members = journal.get_meta("shard-1", "members").await.unwrap().unwrap_or_default();
        let text = String::from_utf8_lossy(&members).to_string();
        if text.lines().count() == 2 && text.lines().all(|l| l.contains("redis/7.0")) {
            break;
        }
        assert!(Instant::now() < deadline, "members never named their engine: {text:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let work = c.journal.dir.path().join("snapshotter");
    let run = |servers: &[Server]| {
        let mut cmd = std::process::Command::new(bin("keel-sidecar"));
        cmd.args(["snapshot", "--once", "--journal", &c.journal.endpoints(), "--stream", "shard-1", "--store", &c.nodes[0].store]);
        cmd.arg("--work-dir").arg(&work);
        for s in servers {
            cmd.arg("--redis-server").arg(s.binary());
        }
        cmd.args(c.journal.sidecar_tls_args("snapshotter")).output().unwrap()
    };
    let out = run(&[Server::Valkey]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a Valkey 9 snapshot was published to Redis 7.0 nodes");
    assert!(err.contains("writes an RDB every node (redis/7.0.15, redis/7.0.15) loads"), "{err}");
    assert_eq!(journal.get_meta("shard-1", "snapshot").await.unwrap(), None);
    // Given both engines, the snapshotter builds with the one every node
    // loads (the oldest), and publishes.
    let out = run(&[Server::Valkey, Server::Redis]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let meta = journal.get_meta("shard-1", "snapshot").await.unwrap().expect("published");
    let meta = String::from_utf8_lossy(&meta).to_string();
    assert!(meta.contains(r#""engine":"redis""#) && meta.contains(r#""rdb_version":10"#), "{meta}");
}

/// Only the per-record check can refuse here: the journal holds no
/// snapshot and its base is Redis 7.0's, which every node loads. A Redis
/// 7.0 deployment hands its primary to a replica upgraded to Valkey 9.1;
/// the nodes still on Redis 7.0 are refused from the first record Valkey
/// wrote (the reason names it), keep running, are never elected, and the
/// old primary is fed again once upgraded and then takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_7_replicas_are_refused_the_records_a_valkey_primary_writes() {
    let mut c = KeelCluster::start(Server::Redis, 1, 3, LEASE_MS).await;
    let mut p = Resp::connect(&c.nodes[0].addr());
    for i in 0..20 {
        assert_eq!(p.cmd(&["SET", &format!("k{i}"), "v"]), "+OK");
    }
    // Node 1 is upgraded and handed the primary by name: the one way a
    // newer engine leads while older nodes are live.
    restart_on(&mut c, 1, Server::Valkey);
    c.wait_replica_synced(1, Duration::from_secs(30));
    wait_fed(&c, 1, 0, "before");
    let to = c.nodes[1].addr();
    let (host, port) = to.rsplit_once(':').unwrap();
    assert_eq!(p.cmd(&["FAILOVER", "TO", host, port]), "+OK");
    assert_eq!(c.wait_new_primary(Some(0), Duration::from_secs(20)), 1);
    let mut p = Resp::connect(&c.nodes[1].addr());
    assert_eq!(p.cmd(&["SET", "by-valkey", "1"]), "+OK");

    // Nodes 0 (the old primary) and 2 still run Redis 7.0.
    for i in [0, 2] {
        let reason = wait_refused(&c, i);
        assert!(reason.contains("redis 7.0.15 here") && reason.contains("RDB version 80") && reason.contains("valkey 9"), "{reason}");
        assert!(reason.contains("upgrade this server"), "says what to do: {reason}");
        // Everything Redis wrote was fed; nothing Valkey wrote was.
        let mut r = Resp::connect(&c.nodes[i].addr());
        assert_eq!(r.cmd(&["GET", "before"]), "1", "node {i}");
        assert_eq!(r.cmd(&["GET", "by-valkey"]), "(nil)", "node {i} was fed a record Valkey wrote");
        assert_eq!(r.cmd(&["PING"]), "+PONG", "node {i}'s server keeps running");
    }
    assert_eq!(c.journal.client().get_meta("shard-1", "snapshot").await.unwrap(), None, "no snapshot: the base check alone refuses nothing");
    for i in [0, 2] {
        assert!(matches!(c.nodes[i].sidecar.as_mut().unwrap().try_wait(), Ok(None)), "node {i}'s sidecar exited");
        assert_eq!(c.nodes[i].role(), "replica");
    }

    // Node 0 is upgraded: fed again from where it stopped.
    restart_on(&mut c, 0, Server::Valkey);
    wait_fed(&c, 0, 1, "after-upgrade");
    assert_eq!(Resp::connect(&c.nodes[0].addr()).cmd(&["GET", "by-valkey"]), "1");

    // The Valkey primary goes: node 0 takes over, never node 2.
    c.nodes[1].kill_sidecar();
    c.nodes[1].kill_redis();
    assert_eq!(c.wait_new_primary(Some(1), Duration::from_secs(20)), 0, "the Redis 7.0 node was elected");
    let mut p = Resp::connect(&c.nodes[0].addr());
    assert_eq!(p.cmd(&["GET", "after-upgrade"]), "1");
    assert_eq!(p.cmd(&["SET", "after-failover", "1"]), "+OK");
    // Node 2 still runs, still refused, and is no primary.
    assert!(matches!(c.nodes[2].sidecar.as_mut().unwrap().try_wait(), Ok(None)), "node 2's sidecar exited");
    assert_eq!(c.nodes[2].role(), "replica");
    assert!(wait_refused(&c, 2).contains("valkey 9"));
    assert_eq!(c.primaries(), vec![0]);
}

/// The election rule: a replica upgraded to Valkey 9.1 in a Redis 7.0
/// deployment does not take over by itself when the primary's server dies
/// (leading, it would strand the Redis 7.0 node); the old primary leads
/// again once its server is back, and the Valkey replica becomes primary
/// when handed it by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_engine_is_not_elected_by_itself_only_handed_the_primary() {
    let mut c = KeelCluster::start(Server::Redis, 1, 2, LEASE_MS).await;
    restart_on(&mut c, 1, Server::Valkey);
    wait_fed(&c, 1, 0, "before");
    c.nodes[0].kill_redis();
    // Node 1 is caught up and the lease lapses: it says why it stays out.
    let log = c.nodes[1].dir.join("sidecar.log");
    let deadline = Instant::now() + Duration::from_secs(30);
    let line = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(l) = text.lines().find(|l| l.contains("not standing for election")) {
            break l.to_string();
        }
        assert!(Instant::now() < deadline, "node 1 never held back (was it elected? primaries: {:?}); log {}", c.primaries(), log.display());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(line.contains("valkey 9.1") && line.contains("redis 7.0.15") && line.contains("FAILOVER TO"), "{line}");
    assert_eq!(c.nodes[1].role(), "replica");
    assert!(c.primaries().is_empty());
    // The old primary's server comes back: it leads again.
    c.nodes[0].start_redis();
    assert_eq!(c.wait_new_primary(None, Duration::from_secs(30)), 0);
    let mut p = Resp::connect(&c.nodes[0].addr());
    assert_eq!(p.cmd(&["GET", "before"]), "1");
    // Handed the primary by name, the Valkey node takes it.
    wait_fed(&c, 1, 0, "handed");
    let to = c.nodes[1].addr();
    let (host, port) = to.rsplit_once(':').unwrap();
    assert_eq!(p.cmd(&["FAILOVER", "TO", host, port]), "+OK");
    assert_eq!(c.wait_new_primary(Some(0), Duration::from_secs(20)), 1);
    assert_eq!(Resp::connect(&c.nodes[1].addr()).cmd(&["SET", "by-valkey", "1"]), "+OK");
}
