//! Graceful handover, end to end (journal processes, redis-servers with
//! the module, `keel-sidecar node`s): `FAILOVER [TO host port]` and
//! `SHUTDOWN` of the primary move the role to a caught-up replica without
//! waiting for the lease to lapse.
//!
//! Under load (a writer per node, each writing to its node whatever its
//! role, and an unmodified redis-py Sentinel client following discovery),
//! every scenario checks: no acknowledged write is lost (each is on the
//! final primary and in the journal); acknowledgements of the two
//! primaries never interleave in time; the old primary says it handed over
//! (not that its lease lapsed). Times are printed, never asserted.

use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;

use keel_tests::KeelCluster;
use keel_tests::Resp;
use keel_tests::Server;
use keel_tests::writers::Ack;
use keel_tests::writers::PyClient;
use keel_tests::writers::Writers;
use keel_tests::writers::check_acks;

static SERIAL: Mutex<()> = Mutex::new(());

const LEASE_MS: u64 = 1000;
/// A writer's pause after a refused write.
const REFUSED_PAUSE: Duration = Duration::from_millis(2);
/// The redis-py client's pause after an error.
const PY_ERROR_PAUSE: Duration = Duration::from_millis(10);

/// The longest time between two acknowledgements (by any node) after `since`.
fn longest_gap(acks: &[Ack], since: Instant) -> Duration {
    acks.windows(2).filter(|w| w[0].at >= since).map(|w| w[1].at - w[0].at).max().unwrap_or_default()
}

/// The old primary's account of its last handover (`INFO keel`).
fn handover_last(c: &KeelCluster, i: usize) -> String {
    c.nodes[i].info_field("keel", "keel_handover_last").unwrap_or_default()
}

async fn failover_hands_over_under_load_and_loses_nothing(server: Server) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = KeelCluster::start(server, 1, 3, LEASE_MS).await;
    let w = Writers::start(&c, REFUSED_PAUSE);
    let py = PyClient::start(&c, 5.0, PY_ERROR_PAUSE);
    let py_retrying = PyClient::start_retrying(&c, 5.0);
    std::thread::sleep(Duration::from_millis(1500));
    let asked_at = Instant::now();
    let mut p = Resp::connect(&c.nodes[0].addr());
    assert_eq!(p.cmd(&["FAILOVER"]), "+OK");
    let np = c.wait_new_primary(Some(0), Duration::from_secs(10));
    eprintln!("handover: FAILOVER -> node {np} is primary after {:?}", asked_at.elapsed());
    c.wait_replica_synced(0, Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(1000));
    let acks = w.finish();
    eprintln!("handover: longest pause between acknowledged writes: {:?}", longest_gap(&acks, asked_at));
    let (runs, last) = check_acks(&c, &acks);
    assert_eq!(last, np);
    assert_eq!(runs.iter().map(|r| r.0).collect::<Vec<_>>(), vec![0, np], "{runs:?}");
    let said = handover_last(&c, 0);
    assert!(said.starts_with(&format!("handed over to {}", c.nodes[np].addr())), "{said}");
    // Promoted without a fork, as in any election.
    assert_eq!(c.nodes[np].info_field("stats", "sync_full").as_deref(), Some("0"));
    py.check(&c);
    // A client with redis-py's retries configured sees no error: the
    // writes held at the pause are answered, the rest are refused with
    // -READONLY and retried against the successor.
    let report = py_retrying.check(&c);
    assert!(report.errors.is_empty(), "a retrying redis-py client saw errors: {:?}", report.errors);
    assert!(!report.acked.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_failover_hands_over_under_load_and_loses_nothing() {
    failover_hands_over_under_load_and_loses_nothing(Server::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valkey_failover_hands_over_under_load_and_loses_nothing() {
    failover_hands_over_under_load_and_loses_nothing(Server::Valkey).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_to_names_the_successor_and_refuses_what_it_cannot_do() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = KeelCluster::start(Server::Redis, 1, 3, LEASE_MS).await;
    c.wait_replica_synced(1, Duration::from_secs(20));
    c.wait_replica_synced(2, Duration::from_secs(20));
    let mut p = Resp::connect(&c.nodes[0].addr());
    let mut r = Resp::connect(&c.nodes[1].addr());
    let err = r.cmd(&["FAILOVER"]);
    assert!(err.starts_with("-ERR FAILOVER is not valid when server is a replica"), "{err}");
    assert_eq!(p.cmd(&["FAILOVER", "ABORT"]), "-ERR No failover in progress.");
    let err = p.cmd(&["FAILOVER", "TO", "127.0.0.1", "1", "TIMEOUT", "100", "FORCE"]);
    assert!(err.contains("FORCE is not supported"), "{err}");
    let err = p.cmd(&["FAILOVER", "TO", "127.0.0.1", "1"]);
    assert!(err.contains("is not a replica of this Keel deployment"), "{err}");
    let err = p.cmd(&["FAILOVER", "TO", "127.0.0.1", &c.nodes[0].port.to_string()]);
    assert!(err.contains("is this node"), "{err}");
    let err = p.cmd(&["MULTI"]);
    assert_eq!(err, "+OK");
    assert!(p.cmd(&["FAILOVER"]).contains("send FAILOVER by itself"));
    assert!(p.cmd(&["EXEC"]).starts_with("-EXECABORT"));
    assert_eq!(c.nodes[0].role(), "primary", "nothing moved");

    let w = Writers::start(&c, REFUSED_PAUSE);
    std::thread::sleep(Duration::from_millis(500));
    let asked_at = Instant::now();
    assert_eq!(p.cmd(&["FAILOVER", "TO", "127.0.0.1", &c.nodes[2].port.to_string()]), "+OK");
    let np = c.wait_new_primary(Some(0), Duration::from_secs(10));
    eprintln!("handover: FAILOVER TO node 2 -> node {np} is primary after {:?}", asked_at.elapsed());
    assert_eq!(np, 2, "the named replica took over");
    c.wait_replica_synced(0, Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(500));
    let acks = w.finish();
    let (runs, _) = check_acks(&c, &acks);
    assert_eq!(runs.iter().map(|r| r.0).collect::<Vec<_>>(), vec![0, 2], "{runs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_of_the_primary_hands_over_before_it_exits() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = KeelCluster::start(Server::Redis, 1, 2, LEASE_MS).await;
    let w = Writers::start(&c, REFUSED_PAUSE);
    let py = PyClient::start(&c, 4.0, PY_ERROR_PAUSE);
    std::thread::sleep(Duration::from_millis(1000));
    let asked_at = Instant::now();
    let mut p = Resp::connect(&c.nodes[0].addr());
    // The server exits: the connection closes without a reply.
    assert!(p.try_cmd(&["SHUTDOWN", "NOSAVE"]).is_err(), "SHUTDOWN answered instead of exiting");
    let np = c.wait_new_primary(Some(0), Duration::from_secs(10));
    eprintln!("handover: SHUTDOWN NOSAVE of the primary -> node {np} is primary after {:?}", asked_at.elapsed());
    std::thread::sleep(Duration::from_millis(500));
    let acks = w.finish();
    let (runs, _) = check_acks(&c, &acks);
    assert_eq!(runs.iter().map(|r| r.0).collect::<Vec<_>>(), vec![0, np], "{runs:?}");
    // It handed over: its lease was released, not left to lapse.
    let log = std::fs::read_to_string(c.nodes[0].dir.join("sidecar.log")).unwrap();
    assert!(log.contains("handed the primary role over"), "the old primary's sidecar did not hand over:\n{log}");
    py.check(&c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handover_nobody_takes_is_abandoned_and_the_primary_leads_again() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = KeelCluster::start(Server::Redis, 1, 2, LEASE_MS).await;
    c.wait_replica_synced(1, Duration::from_secs(20));
    // The replica is still registered, but nothing of it can take a lease.
    c.nodes[1].kill_sidecar();
    let mut p = Resp::connect(&c.nodes[0].addr());
    assert_eq!(p.cmd(&["SET", "before", "1"]), "+OK");
    assert_eq!(p.cmd(&["FAILOVER"]), "+OK");
    let t = Instant::now();
    while !handover_last(&c, 0).contains("no replica took the released lease") {
        assert!(t.elapsed() < Duration::from_secs(20), "the handover did not end: {:?}", handover_last(&c, 0));
        std::thread::sleep(Duration::from_millis(20));
    }
    c.wait_writable(0, Duration::from_secs(10));
    assert_eq!(p.cmd(&["SET", "after", "1"]), "+OK");
    assert_eq!(p.cmd(&["GET", "before"]), "1");
    assert_eq!(c.primaries(), vec![0], "the old primary took its lease back");
}
