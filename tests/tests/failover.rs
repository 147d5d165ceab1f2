//! Replicas, lease-based failover and fencing, end to end: journal
//! processes, redis-servers with the module and `keel-sidecar node`s.
//!
//! Every test runs writers that write numbered keys to every node at once
//! and log what each node acknowledged, then checks:
//! - no acknowledged write is lost: each is on the final primary and in
//!   the journal;
//! - no two nodes acknowledged writes in overlapping periods: ordered by
//!   the time the client received them, acknowledgements come in one run
//!   per tenure (A…A B…B), never interleaved.
//!
//! The tests share the machine's two cores and time-sensitive leases, so
//! they run one at a time.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use keel_tests::KeelCluster;
use keel_tests::Resp;
use keel_tests::Server;
use keel_tests::journaled_commands;
use keel_tests::writers::Ack;
use keel_tests::writers::PyClient;
use keel_tests::writers::Writers;
use keel_tests::writers::check_acks;

static SERIAL: Mutex<()> = Mutex::new(());

const LEASE_MS: u64 = 1000;
/// A writer's pause after a refused write.
const REFUSED_PAUSE: Duration = Duration::from_millis(5);

/// redis-py kept working: it wrote through the primary of the end, and
/// nothing it was told is written is lost.
fn check_py(c: &KeelCluster, py: PyClient) {
    let report = py.check(c);
    let p = c.wait_new_primary(None, Duration::from_secs(10));
    assert!(
        report.acked.iter().any(|a| a.1 == c.nodes[p].port),
        "redis-py never wrote through the final primary (node {p}); {} acks, {} errors",
        report.acked.len(),
        report.errors.len()
    );
}

/// The time from `since` until node `node` acknowledges a write.
fn time_to_first_ack(acks: &[Ack], node: usize, since: Instant) -> Option<Duration> {
    acks.iter().find(|a| a.node == node && a.at > since).map(|a| a.at - since)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_serves_reads_refuses_writes_and_catches_up_by_itself() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = KeelCluster::start(Server::Redis, 1, 2, LEASE_MS).await;
    let mut p = Resp::connect(&c.nodes[0].addr());
    for i in 0..50 {
        assert_eq!(p.cmd(&["SET", &format!("k{i}"), &i.to_string()]), "+OK");
    }
    assert_eq!(p.cmd(&["RPUSH", "l", "a", "b"]), ":2");
    let until = |f: &dyn Fn() -> bool| {
        let t = Instant::now();
        while !f() {
            assert!(t.elapsed() < Duration::from_secs(20), "timed out");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let get = |addr: &str, k: &str| Resp::try_connect(addr, Duration::from_secs(2)).and_then(|mut r| r.try_cmd(&["GET", k])).unwrap_or_default();
    let replica = c.nodes[1].addr();
    until(&|| get(&replica, "k49") == "49");
    let mut r = Resp::connect(&replica);
    assert_eq!(r.cmd(&["LLEN", "l"]), ":2");
    assert_eq!(r.cmd(&["LINDEX", "l", "1"]), "b");
    let refused = r.cmd(&["SET", "x", "1"]);
    assert!(refused.starts_with("-READONLY"), "{refused}");
    assert_eq!(c.nodes[1].info_field("keel", "keel_role").as_deref(), Some("replica"));

    // kill -9 the replica's Redis; restarted empty, it is rebuilt from the
    // journal (never from the primary) and follows new writes.
    c.nodes[1].kill_redis();
    assert_eq!(p.cmd(&["SET", "while-down", "1"]), "+OK");
    c.nodes[1].start_redis();
    c.wait_replica_synced(1, Duration::from_secs(20));
    until(&|| get(&replica, "while-down") == "1");
    assert_eq!(get(&replica, "k7"), "7");

    // kill -9 the replica's sidecar: Redis keeps its data; the restarted
    // sidecar continues it from its own offset.
    c.nodes[1].kill_sidecar();
    assert_eq!(p.cmd(&["SET", "sidecar-down", "1"]), "+OK");
    c.nodes[1].start_sidecar();
    until(&|| get(&replica, "sidecar-down") == "1");
    let log = std::fs::read_to_string(c.nodes[1].dir.join("sidecar.log")).unwrap();
    assert!(log.contains("continues from its own offset"), "the restarted sidecar made a full resync:\n{log}");
    // The primary never served a replica, nor forked: no full sync on it at
    // all (its sidecar attached by continuation: a new history's empty base
    // came from the journal).
    assert_eq!(c.nodes[0].info_field("stats", "sync_full").as_deref(), Some("0"));
    assert_eq!(c.nodes[0].info_field("stats", "total_forks").as_deref(), Some("0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_primary_redis_fails_over_to_a_replica() {
    kill_9_of_the_primary_fails_over(Server::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_primary_valkey_fails_over_to_a_replica() {
    kill_9_of_the_primary_fails_over(Server::Valkey).await;
}

async fn kill_9_of_the_primary_fails_over(server: Server) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = KeelCluster::start(server, 1, 3, LEASE_MS).await;
    let w = Writers::start(&c, REFUSED_PAUSE);
    let py = PyClient::start(&c, 6.0, Duration::from_millis(50));
    std::thread::sleep(Duration::from_millis(1500));
    let killed_at = Instant::now();
    c.nodes[0].kill_redis();
    let np = c.wait_new_primary(Some(0), Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(1000));
    let acks = w.finish();
    let failover = time_to_first_ack(&acks, np, killed_at).expect("the new primary acknowledged nothing");
    eprintln!("failover ({server:?}): kill -9 of the primary server -> node {np} acknowledged a write after {failover:?}");
    let (runs, _) = check_acks(&c, &acks);
    check_py(&c, py);
    assert_eq!(runs.iter().map(|r| r.0).collect::<Vec<_>>(), vec![0, np], "{runs:?}");
    // Promoted without a fork: its sidecar attached with PSYNC continuation.
    assert_eq!(c.nodes[np].info_field("stats", "sync_full").as_deref(), Some("0"), "the promotion made a full sync");
    // The old node, restarted empty, rejoins as a replica.
    c.nodes[0].start_redis();
    c.wait_replica_synced(0, Duration::from_secs(20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_primary_is_replaced_and_acknowledges_nothing_after_it_wakes() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = KeelCluster::start(Server::Redis, 1, 2, LEASE_MS).await;
    let w = Writers::start(&c, REFUSED_PAUSE);
    let py = PyClient::start(&c, 8.0, Duration::from_millis(50));
    std::thread::sleep(Duration::from_millis(1000));
    let pid = c.nodes[0].redis_pid();
    keel_tests::signal(pid, "STOP");
    let stopped_at = Instant::now();
    let np = c.wait_new_primary(Some(0), Duration::from_secs(10));
    assert_eq!(np, 1);
    std::thread::sleep(Duration::from_millis(3 * LEASE_MS).saturating_sub(stopped_at.elapsed()));
    keel_tests::signal(pid, "CONT");
    let woke_at = Instant::now();
    c.wait_replica_synced(0, Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(500));
    let acks = w.finish();
    eprintln!(
        "failover: SIGSTOP of the primary -> node 1 acknowledged a write after {:?}",
        time_to_first_ack(&acks, 1, stopped_at).expect("node 1 acknowledged nothing")
    );
    let late: Vec<&Ack> = acks.iter().filter(|a| a.node == 0 && a.at > woke_at).collect();
    assert!(late.is_empty(), "the old primary acknowledged writes after it woke up: {late:?}");
    check_acks(&c, &acks);
    check_py(&c, py);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_primary_sidecar_hands_over_and_the_node_rejoins() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = KeelCluster::start(Server::Redis, 1, 2, LEASE_MS).await;
    let w = Writers::start(&c, REFUSED_PAUSE);
    let py = PyClient::start(&c, 6.0, Duration::from_millis(50));
    std::thread::sleep(Duration::from_millis(1000));
    let killed_at = Instant::now();
    c.nodes[0].kill_sidecar();
    let np = c.wait_new_primary(Some(0), Duration::from_secs(10));
    eprintln!("failover: kill -9 of the primary's sidecar -> node {np} is primary after {:?}", killed_at.elapsed());
    c.nodes[0].start_sidecar();
    c.wait_replica_synced(0, Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(500));
    let acks = w.finish();
    check_acks(&c, &acks);
    check_py(&c, py);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_one_journal_node_during_writes_loses_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = KeelCluster::start(Server::Redis, 3, 2, LEASE_MS).await;
    let w = Writers::start(&c, REFUSED_PAUSE);
    let py = PyClient::start(&c, 6.0, Duration::from_millis(50));
    std::thread::sleep(Duration::from_millis(1000));
    let leader = c.journal.wait_leader().await;
    c.journal.kill(leader);
    std::thread::sleep(Duration::from_millis(4000));
    let acks = w.finish();
    let after = acks.iter().filter(|a| a.at > acks[0].at + Duration::from_millis(3500)).count();
    assert!(after > 0, "no write was acknowledged after the journal leader died");
    let mut per_node: BTreeMap<usize, usize> = BTreeMap::new();
    for a in &acks {
        *per_node.entry(a.node).or_default() += 1;
    }
    eprintln!("acknowledged per node across the loss of journal node {leader}: {per_node:?}");
    check_acks(&c, &acks);
    check_py(&c, py);
}

/// A replica that has not applied everything cannot win the election: with
/// one replica paused (its Redis lags) and the primary killed, the other
/// replica takes over, never the lagging one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_replica_cannot_take_the_lease() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = KeelCluster::start(Server::Redis, 1, 3, LEASE_MS).await;
    let lagging = c.nodes[1].redis_pid();
    keel_tests::signal(lagging, "STOP");
    let mut p = Resp::connect(&c.nodes[0].addr());
    for i in 0..20 {
        assert_eq!(p.cmd(&["SET", &format!("k{i}"), "1"]), "+OK");
    }
    c.nodes[0].kill_redis();
    let np = c.wait_new_primary(Some(0), Duration::from_secs(10));
    assert_eq!(np, 2, "the lagging replica was elected");
    // Even long after the lease lapsed and with the primary gone, the
    // lagging node stays a follower until it has caught up.
    keel_tests::signal(lagging, "CONT");
    c.wait_replica_synced(1, Duration::from_secs(20));
    assert_eq!(c.primaries(), vec![2]);
    let mut r = Resp::connect(&c.nodes[1].addr());
    let t = Instant::now();
    while r.cmd(&["GET", "k19"]) != "1" {
        assert!(t.elapsed() < Duration::from_secs(10), "the lagging replica never caught up");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The first primary died while journaling its base RDB: the stream ends
/// inside an unfinished base, on which nothing was ever acknowledged. A
/// node takes over once the lease lapses, voids it (`RdbAbort`) and
/// journals its own base, instead of waiting forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfinished_base_rdb_is_voided_by_the_next_leader() {
    use keel_sidecar::record::Kind;
    use keel_sidecar::record::Record;
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let journal = keel_tests::JournalCluster::start(1).await;
    let client = journal.client();
    let dead = keel_tests::new_uuid();
    client.set_leader("shard-1", &dead, "").await.unwrap();
    let chunk = Record { kind: Kind::Rdb, replid: "a".repeat(40), start: 0, end: 0, payload: b"REDIS0010-half-an-rdb".to_vec(), writer: None };
    client.append("shard-1", &dead, vec![chunk.encode()], Some(0)).await.unwrap();
    let c = KeelCluster::start_on(journal, Server::Redis, 2, LEASE_MS);
    let mut r = Resp::connect(&c.nodes[0].addr());
    assert_eq!(r.cmd(&["SET", "after", "1"]), "+OK");
    let decoded = std::process::Command::new(keel_tests::bin("keel-sidecar"))
        .args(["decode", "--journal", &c.journal.endpoints(), "--stream", "shard-1"])
        .args(c.journal.sidecar_tls_args("decode"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&decoded.stdout);
    assert!(decoded.status.success(), "decode failed: {}", String::from_utf8_lossy(&decoded.stderr));
    assert!(text.contains("#rdb-abort"), "{text}");
    assert!(text.contains("#rdb-end"), "{text}");
    // The replica is built from the new base.
    c.wait_replica_synced(1, Duration::from_secs(20));
    let mut rr = Resp::connect(&c.nodes[1].addr());
    let t = Instant::now();
    while rr.cmd(&["GET", "after"]) != "1" {
        assert!(t.elapsed() < Duration::from_secs(10), "the replica never got the write");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A journal whose writer died is one a replica can be caught up on: every
/// append ends after a whole command, outside MULTI/EXEC. Redis writes its
/// replication stream to the sidecar in buffer blocks, so with large values
/// a read ends mid-command almost every time; when such a read was
/// journaled as it came and the primary died just then, the journal ended
/// mid-command, no replica's offset could ever reach its end, and no
/// replica took the lease (seen once with small values in CI).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_large_values_are_journaled_still_fails_over() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = KeelCluster::start(Server::Redis, 1, 2, LEASE_MS).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (addr, flag) = (c.nodes[0].addr(), stop.clone());
    // Values of 40 KB to 1.2 MB, alone or two in a transaction; every
    // acknowledged key is kept with its length.
    let writer = std::thread::spawn(move || {
        let mut acked: Vec<(String, usize)> = Vec::new();
        let Ok(mut r) = Resp::try_connect(&addr, Duration::from_secs(10)) else { return acked };
        let mut n = 0usize;
        while !flag.load(Ordering::Relaxed) {
            n += 1;
            let len = 40_000 + (n * 97_003) % 1_160_000;
            let value = "v".repeat(len);
            let key = format!("big:{n}");
            if n % 3 == 0 {
                let other = format!("big:{n}:tx");
                let queued = [r.try_cmd(&["MULTI"]), r.try_cmd(&["SET", &key, &value]), r.try_cmd(&["SET", &other, &value[..len / 2]])];
                if queued.iter().any(|q| q.is_err()) {
                    return acked;
                }
                match r.try_full(&["EXEC"]) {
                    Ok(l) if l == "[+OK, +OK]" => {
                        acked.push((key, len));
                        acked.push((other, len / 2));
                    }
                    _ => return acked,
                }
            } else {
                match r.try_cmd(&["SET", &key, &value]) {
                    Ok(l) if l == "+OK" => acked.push((key, len)),
                    _ => return acked,
                }
            }
        }
        acked
    });
    std::thread::sleep(Duration::from_millis(2500));
    c.nodes[0].kill_redis();
    let np = c.wait_new_primary(Some(0), Duration::from_secs(10));
    stop.store(true, Ordering::Relaxed);
    let acked = writer.join().unwrap();
    assert!(acked.len() >= 3, "too few large writes acknowledged before the kill: {}", acked.len());
    let mut r = Resp::connect(&c.nodes[np].addr());
    for (key, len) in &acked {
        assert_eq!(r.cmd(&["STRLEN", key]), format!(":{len}"), "acknowledged {key} is not whole on the new primary");
    }
    eprintln!("{} large writes acknowledged before the kill; node {np} took over with all of them", acked.len());
}

/// The primary died with the journal ending inside an unfinished
/// transaction (a whole SET after MULTI, then half of the next command):
/// bytes no replica can apply and no client was answered for. This is what
/// a command too large for one append leaves when its writer dies between
/// the appends. A replica takes over anyway: it is caught up on every whole
/// command, and as the next leader it voids the unfinished tail
/// (`StreamVoid`). The other replica, which was sent those bytes, resyncs
/// past them and follows the new leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfinished_last_command_is_voided_by_the_next_leader() {
    use keel_sidecar::record::Kind;
    use keel_sidecar::record::Record;
    use keel_sidecar::resp::encode_command;
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = KeelCluster::start(Server::Redis, 1, 3, LEASE_MS).await;
    let mut r = Resp::connect(&c.nodes[0].addr());
    for i in 0..50 {
        assert_eq!(r.cmd(&["SET", &format!("k{i}"), &i.to_string()]), "+OK");
    }
    for n in [1, 2] {
        let mut rr = Resp::connect(&c.nodes[n].addr());
        let t = Instant::now();
        while rr.cmd(&["GET", "k49"]) != "49" {
            assert!(t.elapsed() < Duration::from_secs(10), "node {n} never got the writes");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    c.nodes[0].kill_sidecar();
    c.nodes[0].kill_redis();
    // As the dead primary's sidecar would have: its lease is still live.
    let client = c.journal.client();
    let info = client.stream_info("shard-1").await.unwrap();
    let last = keel_tests::read_all(&client, "shard-1").await.pop().unwrap();
    let last = Record::decode(&last.1).unwrap();
    assert_eq!(last.kind, Kind::Stream);
    let mut tail = encode_command(&[b"MULTI"]);
    tail.extend_from_slice(&encode_command(&[b"SET", b"tx:1", b"a"]));
    tail.extend_from_slice(&encode_command(&[b"SET", b"tx:2", b"b"])[..12]);
    let cut = Record { kind: Kind::Stream, replid: last.replid.clone(), start: last.end, end: last.end + tail.len() as u64, payload: tail, writer: last.writer };
    client
        .append("shard-1", &info.leader_uuid, vec![cut.encode()], Some(info.last_seq))
        .await
        .expect("the dead primary's lease still covers this append");
    let np = c.wait_new_primary(Some(0), Duration::from_secs(10));
    let mut p = Resp::connect(&c.nodes[np].addr());
    for i in 0..50 {
        assert_eq!(p.cmd(&["GET", &format!("k{i}")]), i.to_string());
    }
    assert_eq!(p.cmd(&["EXISTS", "tx:1"]), ":0", "the unfinished transaction was applied");
    assert_eq!(p.cmd(&["SET", "after", "1"]), "+OK");
    let other = if np == 1 { 2 } else { 1 };
    let mut o = Resp::connect(&c.nodes[other].addr());
    let t = Instant::now();
    while o.cmd(&["GET", "after"]) != "1" {
        assert!(t.elapsed() < Duration::from_secs(15), "the other replica never followed the new leader");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(o.cmd(&["EXISTS", "tx:1"]), ":0");
    assert_eq!(o.cmd(&["GET", "k49"]), "49");
    let log = std::fs::read_to_string(c.nodes[other].dir.join("sidecar.log")).unwrap();
    assert!(log.contains("voids stream bytes"), "the other replica's feeder did not resync past the void:\n{log}");
    let log = std::fs::read_to_string(c.nodes[np].dir.join("sidecar.log")).unwrap();
    assert!(log.contains("voided the unfinished last command"), "{log}");
    // The dead node comes back as a replica and is rebuilt from the journal,
    // reading the voided bytes before the void that takes them back.
    c.nodes[0].start_redis();
    c.nodes[0].start_sidecar();
    c.wait_replica_synced(0, Duration::from_secs(20));
    let mut z = Resp::connect(&c.nodes[0].addr());
    let t = Instant::now();
    while z.cmd(&["GET", "after"]) != "1" {
        assert!(t.elapsed() < Duration::from_secs(15), "the restarted node never caught up");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(z.cmd(&["EXISTS", "tx:1"]), ":0");
    assert_eq!(z.cmd(&["GET", "k49"]), "49");
    let decoded = std::process::Command::new(keel_tests::bin("keel-sidecar"))
        .args(["decode", "--journal", &c.journal.endpoints(), "--stream", "shard-1"])
        .args(c.journal.sidecar_tls_args("decode"))
        .output()
        .unwrap();
    assert!(decoded.status.success(), "decode failed: {}", String::from_utf8_lossy(&decoded.stderr));
    let text = String::from_utf8_lossy(&decoded.stdout);
    assert!(text.contains("#void\t"), "{text}");
    let commands = journaled_commands(&c.journal, "shard-1");
    assert!(commands.iter().any(|w| w == &["SET", "after", "1"]), "{commands:?}");
    assert!(!commands.iter().any(|w| w.iter().any(|a| a == "tx:1")), "the voided transaction is decoded: {commands:?}");
}

/// The real case behind `StreamVoid`: a command too large for one append
/// (a 40 MB SET, several 7 MiB appends) whose primary dies, sidecar and
/// Redis, between its appends. A replica takes over; the value is whole
/// or absent (it was never acknowledged), and every acknowledged write is
/// there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_killed_between_the_appends_of_a_huge_command_fails_over() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = KeelCluster::start(Server::Redis, 1, 2, LEASE_MS).await;
    let mut r = Resp::connect(&c.nodes[0].addr());
    for i in 0..20 {
        assert_eq!(r.cmd(&["SET", &format!("small:{i}"), "v"]), "+OK");
    }
    let client = c.journal.client();
    let before = client.stream_info("shard-1").await.unwrap().last_seq;
    let len = 40 << 20;
    let addr = c.nodes[0].addr();
    let writer = std::thread::spawn(move || {
        let value = "x".repeat(len);
        Resp::try_connect(&addr, Duration::from_secs(5)).and_then(|mut w| w.try_cmd(&["SET", "huge", &value])).ok()
    });
    // Kill once the first of the command's appends is in (14 records of
    // 512 KiB each), before the last.
    let t = Instant::now();
    loop {
        let seq = client.stream_info("shard-1").await.unwrap().last_seq;
        if seq >= before + 14 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "the huge command was never journaled (last seq {seq})");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    c.nodes[0].kill_sidecar();
    c.nodes[0].kill_redis();
    let acked = writer.join().unwrap();
    assert_ne!(acked.as_deref(), Some("+OK"), "the huge write was acknowledged before it was whole in the journal");
    let np = c.wait_new_primary(Some(0), Duration::from_secs(15));
    let mut p = Resp::connect(&c.nodes[np].addr());
    for i in 0..20 {
        assert_eq!(p.cmd(&["GET", &format!("small:{i}")]), "v");
    }
    let strlen = p.cmd(&["STRLEN", "huge"]);
    assert!(strlen == ":0" || strlen == format!(":{len}"), "the huge value is torn: {strlen}");
    let log = std::fs::read_to_string(c.nodes[np].dir.join("sidecar.log")).unwrap();
    eprintln!(
        "huge value on the new primary: {strlen}; tail voided: {}",
        log.contains("voided the unfinished last command")
    );
}
