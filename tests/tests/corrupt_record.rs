//! A record no node can read (issue 16): another process appends a record
//! that is not a Keel record to the stream, under the leader's uuid (the
//! journal has no access control yet: `keel-journal ctl append --leader`
//! is the test-only way to write one). Then, end to end:
//! - the replica's feed stalls at it: `INFO keel` shows the record's seq and
//!   why, its sidecar logs it once (not at every retry);
//! - the primary's sidecar finds the stream moved past it: its Redis is
//!   fenced (the write in flight gets an error, not a hang) and it follows,
//!   stalled too; its process keeps running;
//! - no node takes the lease while stalled: the deployment has no primary,
//!   and says why on every node.

use std::io::Write;
use std::process::Command;
use std::process::Stdio;
use std::time::Duration;
use std::time::Instant;

use keel_tests::KeelCluster;
use keel_tests::Resp;
use keel_tests::Server;
use keel_tests::bin;

const LEASE_MS: u64 = 1000;
const STREAM: &str = "shard-1";
/// What a sidecar logs, once, when its feed stalls.
const STALL_LINE: &str = "the feed stalled at a record it cannot read";
/// What the primary's sidecar logs, once, when it steps down.
const OVERTAKEN_LINE: &str = "another process appended to the stream under this node's lease";

fn until(what: &str, limit: Duration, f: &mut dyn FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn count_in_log(c: &KeelCluster, i: usize, line: &str) -> usize {
    std::fs::read_to_string(c.nodes[i].dir.join("sidecar.log")).unwrap_or_default().matches(line).count()
}

/// Appends `payload` as one record under `leader`; returns its seq.
fn append_raw(journal: &keel_tests::JournalCluster, leader: &str, payload: &[u8]) -> u64 {
    let mut child = Command::new(bin("keel-journal"))
        .args(["ctl", "--endpoints", &journal.endpoints()])
        .args(journal.ctl_tls_args())
        .args(["append", STREAM, "--leader", leader])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn keel-journal ctl");
    child.stdin.take().unwrap().write_all(payload).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "ctl append failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().parse().expect("ctl append prints the seq")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_record_stalls_every_feed_visibly_and_no_node_leads_past_it() {
    let mut c = KeelCluster::start(Server::Redis, 1, 2, LEASE_MS).await;
    let (primary, replica) = (c.nodes[0].addr(), c.nodes[1].addr());
    let mut p = Resp::try_connect(&primary, Duration::from_secs(10)).unwrap();
    for i in 0..20 {
        assert_eq!(p.cmd(&["SET", &format!("k{i}"), &i.to_string()]), "+OK");
    }
    let get = |addr: &str, k: &str| Resp::try_connect(addr, Duration::from_secs(2)).and_then(|mut r| r.try_cmd(&["GET", k])).unwrap_or_default();
    until("the replica to apply the writes", Duration::from_secs(20), &mut || get(&replica, "k19") == "19");
    for i in 0..2 {
        assert_eq!(c.nodes[i].info_field("keel", "keel_feed_stalled_seq").as_deref(), Some("0"), "node {i} stalled before");
    }
    let leader = c.nodes[0].info_field("keel", "keel_leader_uuid").expect("the primary answers INFO");
    assert!(!leader.is_empty());

    let bad = append_raw(&c.journal, &leader, b"6bytes");

    // The replica's feed stalls at it and says why.
    until("the replica to report the stall", Duration::from_secs(20), &mut || {
        c.nodes[1].info_field("keel", "keel_feed_stalled_seq") == Some(bad.to_string())
    });
    let reason = c.nodes[1].info_field("keel", "keel_feed_stalled_reason").unwrap();
    assert!(reason.contains("shorter than its 62-byte header"), "reason: {reason:?}");

    // The primary meets it with its next write: the write fails (not a
    // hang), the node is fenced and follows, stalled as well.
    let t = Instant::now();
    let answer = p.try_cmd(&["SET", "after", "1"]).expect("an answer within the client's timeout");
    assert!(answer.starts_with('-'), "a write after the corrupt record was acknowledged: {answer}");
    assert!(t.elapsed() < Duration::from_secs(8), "the write took {:?}", t.elapsed());
    until("the old primary to report the stall", Duration::from_secs(20), &mut || {
        c.nodes[0].info_field("keel", "keel_feed_stalled_seq") == Some(bad.to_string())
    });
    let refused = Resp::try_connect(&primary, Duration::from_secs(5)).unwrap().try_cmd(&["SET", "again", "1"]).unwrap();
    assert!(refused.starts_with('-'), "the old primary took a write: {refused}");

    // Once: while both stay stalled for many of the sidecars' polls and
    // the feeders' rechecks (each poll tells the module again: its count of
    // KEEL.STALLED calls is the clock), nothing is logged again and no
    // node takes the lease.
    until("the replica's sidecar to log the stall", Duration::from_secs(10), &mut || count_in_log(&c, 1, STALL_LINE) >= 1);
    let told = |i: usize| -> u64 {
        let calls = c.nodes[i].control_info_field("commandstats", "cmdstat_keel.stalled").unwrap_or_default();
        calls.strip_prefix("calls=").and_then(|v| v.split(',').next()).and_then(|v| v.parse().ok()).unwrap_or(0)
    };
    let from = [told(0), told(1)];
    until("the sidecars to poll for a while", Duration::from_secs(60), &mut || {
        for i in 0..2 {
            assert_eq!(c.nodes[i].info_field("keel", "keel_feed_stalled_seq"), Some(bad.to_string()), "node {i} unstalled");
            let role = c.nodes[i].role();
            assert!(role != "primary", "node {i} leads past a record it cannot read");
        }
        // 20 polls of 200 ms: several of the feeders' 1 s rechecks.
        told(0) >= from[0] + 20 && told(1) >= from[1] + 20
    });
    for i in 0..2 {
        assert_eq!(count_in_log(&c, i, STALL_LINE), 1, "node {i} logged the stall more than once (or never)");
    }
    assert_eq!(count_in_log(&c, 0, OVERTAKEN_LINE), 1, "the old primary's step-down was not logged once");
    let journal = c.journal.client();
    let info = journal.stream_info(STREAM).await.unwrap();
    assert_eq!(info.last_seq, bad, "something was appended past the corrupt record");
    assert_eq!(info.leader_uuid, leader, "a node took the lease while stalled");
    assert!(c.nodes[1].info_field("keel", "keel_leader_uuid").is_some());

    // The data before it is still served for reads; the processes run.
    assert_eq!(get(&replica, "k19"), "19");
    let refused = Resp::try_connect(&replica, Duration::from_secs(5)).unwrap().try_cmd(&["SET", "x", "1"]).unwrap();
    assert!(refused.starts_with("-READONLY"), "{refused}");
    if std::env::var("KEEL_TEST_SHOW_LOGS").is_ok() {
        for n in &c.nodes {
            eprintln!("==== {}\n{}", n.name, std::fs::read_to_string(n.dir.join("sidecar.log")).unwrap_or_default());
        }
    }
    for n in &mut c.nodes {
        let sidecar = n.sidecar.as_mut().unwrap();
        assert!(sidecar.try_wait().unwrap().is_none(), "{}'s sidecar exited; log in {}", n.name, n.dir.display());
    }
}
