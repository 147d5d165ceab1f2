//! Replacing journal nodes for good, end to end: real `keel-journal`
//! processes under a Keel primary (and a replica) that keeps writing.
//!
//! What a user must see: a node started empty with `serve --join` catches
//! up as a learner and becomes a voter; removing a node, the Raft leader
//! included, keeps the journal available; the sidecars, started with the
//! first three addresses only, follow the membership (no restart, no new
//! `--journal`); no acknowledged write is lost and the Keel primary never
//! loses its lease (no failover). A change that would leave no quorum, and
//! a caller without the administrator's certificate, are refused with a
//! reason and change nothing. The tests share two cores: one at a time.

use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;

use keel_journal::client::JournalError;
use keel_journal::client::Rejection;
use keel_tests::JournalCluster;
use keel_tests::KeelCluster;
use keel_tests::Resp;
use keel_tests::Roles;
use keel_tests::Server;
use keel_tests::Writer;

static SERIAL: Mutex<()> = Mutex::new(());

/// A Keel primary's lease (the sidecar default).
const LEASE_MS: u64 = 1000;
/// Bytes per write: small, so every write can keep its own key.
const VALUE_BYTES: usize = 1000;
/// How long a new node may take to catch up and become a voter.
const JOIN_LIMIT: Duration = Duration::from_secs(60);

/// Every acknowledged key is on the primary.
fn assert_all_there(c: &KeelCluster, acked: &[String]) {
    let mut r = Resp::connect(&c.nodes[0].addr());
    let missing: Vec<&String> = acked.iter().filter(|k| r.cmd(&["EXISTS", k]) != ":1").collect();
    assert!(missing.is_empty(), "{} of {} acknowledged writes missing, e.g. {:?}", missing.len(), acked.len(), &missing[..missing.len().min(5)]);
}

/// Adds a node with `--join`, waits until it is a voter, and lets the
/// writer make progress after it; returns the new node's index.
async fn add(c: &mut KeelCluster, w: &Writer) -> usize {
    let t0 = Instant::now();
    let i = c.journal.join_new_node();
    let id = c.journal.nodes[i].id;
    c.journal.wait_voter(id, JOIN_LIMIT).await;
    println!("node {id} joined as a voter in {} ms", t0.elapsed().as_millis());
    // Every client learns a new member within MEMBERSHIP_REFRESH (a
    // replica's only call may be its feed read): operators leave that long
    // between adding a node and removing an old one (docs/operations.md).
    tokio::time::sleep(2 * keel_journal::client::MEMBERSHIP_REFRESH).await;
    let n = w.count();
    w.wait_count(n + 10, Duration::from_secs(30));
    i
}

/// Removes node index `i` (as the administrator) and stops it; the writer
/// makes progress after.
async fn remove(c: &mut KeelCluster, w: &Writer, i: usize) {
    let leader = c.journal.wait_leader().await;
    let t0 = Instant::now();
    let id = c.journal.remove_node(i).await;
    println!("node {id}{} removed in {} ms", if i == leader { " (the Raft leader)" } else { "" }, t0.elapsed().as_millis());
    let n = w.count();
    w.wait_count(n + 10, Duration::from_secs(30));
}

/// Every node of a 3-node journal is replaced in turn, the Raft leader
/// last: three new nodes join, the three first ones leave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacing_every_journal_node_under_writes_loses_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let journal = JournalCluster::start(3).await;
    let mut c = KeelCluster::start_on(journal, Server::Redis, 2, LEASE_MS);
    let roles = Roles::watch(&c);
    let w = Writer::start(c.nodes[0].addr(), VALUE_BYTES, None);
    w.wait_count(20, Duration::from_secs(30));

    let first: Vec<u64> = c.journal.nodes.iter().map(|n| n.id).collect();
    let leader_id = c.journal.nodes[c.journal.wait_leader().await].id;
    // Followers first, the Raft leader last.
    let mut order: Vec<u64> = first.iter().copied().filter(|id| *id != leader_id).collect();
    order.push(leader_id);
    for old in order {
        add(&mut c, &w).await;
        let i = c.journal.nodes.iter().position(|n| n.id == old).unwrap();
        remove(&mut c, &w, i).await;
    }
    let m = c.journal.admin_client().members().await.unwrap();
    let ids: Vec<u64> = m.members.iter().map(|n| n.node_id).collect();
    assert_eq!(ids, [4, 5, 6], "the members after replacing every node");
    assert!(m.members.iter().all(|n| n.role == "voter"));

    let written = w.stop();
    let odd = roles.stop();
    println!("replaced 3 of 3 journal nodes: {} writes acknowledged, longest write gap {} ms", written.acked.len(), written.longest_gap.as_millis());
    assert!(odd.is_empty(), "a Keel node changed role (a failover or a lapsed lease): {odd:?}");
    assert_eq!(c.primaries(), vec![0]);
    assert_all_there(&c, &written.acked);
    // The replica still follows, fed from the new journal nodes only.
    let mut p = Resp::connect(&c.nodes[0].addr());
    assert_eq!(p.cmd(&["SET", "after", "1"]), "+OK");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut r = Resp::connect(&c.nodes[1].addr());
    while r.cmd(&["EXISTS", "after"]) != ":1" {
        assert!(Instant::now() < deadline, "the replica did not get a write made after the replacement");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// 3 -> 5 -> 3 voters, then a node's disk is wiped and the node comes back
/// under a new id; and the changes that must be refused are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn growing_shrinking_and_a_wiped_node_under_writes() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Raft snapshots every 100 entries, 20 kept behind: a node that joins
    // later catches up by installing a snapshot, not from the log alone.
    let journal = JournalCluster::start_with(3, &["--snapshot-every-entries", "100", "--keep-log-entries", "20"]).await;
    let mut c = KeelCluster::start_on(journal, Server::Redis, 2, LEASE_MS);
    let roles = Roles::watch(&c);
    let w = Writer::start(c.nodes[0].addr(), VALUE_BYTES, None);
    w.wait_count(300, Duration::from_secs(60));

    // A caller without the administrator's certificate changes nothing.
    match c.journal.client().remove_node(1).await {
        Err(JournalError::Rejected { kind, message }) => {
            assert_eq!(kind, Rejection::NotAllowed, "{message}");
            assert!(message.contains("administrator"), "{message}");
        }
        other => panic!("a sidecar-grade certificate removed a node: {other:?}"),
    }

    let first_new = add(&mut c, &w).await;
    add(&mut c, &w).await;
    assert_eq!(c.journal.admin_client().members().await.unwrap().members.len(), 5);
    let log = std::fs::read_to_string(&c.journal.nodes[first_new].log).unwrap();
    assert!(log.contains("snapshot installed"), "the new node did not catch up by a snapshot; log {}", c.journal.nodes[first_new].log.display());
    // Back to three: two of the first nodes leave.
    for _ in 0..2 {
        let i = c.journal.nodes.iter().position(|n| n.id <= 3).unwrap();
        remove(&mut c, &w, i).await;
    }
    assert_eq!(c.journal.admin_client().members().await.unwrap().members.len(), 3);

    // A node's disk is lost: it is killed, removed while dead, wiped, and
    // comes back empty under a new id.
    let leader = c.journal.wait_leader().await;
    let victim = (0..c.journal.nodes.len()).find(|&i| i != leader).unwrap();
    let (old_id, data) = (c.journal.nodes[victim].id, c.journal.nodes[victim].data.clone());
    c.journal.kill(victim);
    // With one of three silent, removing a live one would leave no quorum.
    let live_other = (0..c.journal.nodes.len()).find(|&i| i != leader && i != victim).unwrap();
    let live_id = c.journal.nodes[live_other].id;
    // Once the leader has not heard from the dead node for ANSWERED_WITHIN.
    let admin = c.journal.admin_client();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = admin.members().await.unwrap();
        let silent = m.members.iter().find(|n| n.node_id == old_id).and_then(|n| n.millis_since_heard).unwrap_or(u64::MAX);
        if silent > keel_journal::membership::ANSWERED_WITHIN.as_millis() as u64 + 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the leader still hears from the killed node {old_id}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    match admin.remove_node(live_id).await {
        Err(JournalError::Rejected { kind, message }) => {
            assert_eq!(kind, Rejection::Membership, "{message}");
            assert!(message.contains("quorum"), "{message}");
        }
        other => panic!("removing node {live_id} while node {old_id} is dead would leave no quorum, yet: {other:?}"),
    }
    c.journal.remove_node(victim).await;
    std::fs::remove_dir_all(&data).unwrap();
    let new_id = old_id + 100;
    let i = c.journal.join_as(new_id);
    c.journal.wait_voter(new_id, JOIN_LIMIT).await;
    assert_eq!(c.journal.nodes[i].id, new_id);
    let n = w.count();
    w.wait_count(n + 10, Duration::from_secs(30));

    let written = w.stop();
    let odd = roles.stop();
    println!("3 -> 5 -> 3 and a wiped node re-added: {} writes acknowledged, longest write gap {} ms", written.acked.len(), written.longest_gap.as_millis());
    assert!(odd.is_empty(), "a Keel node changed role (a failover or a lapsed lease): {odd:?}");
    assert_eq!(c.primaries(), vec![0]);
    assert_all_there(&c, &written.acked);
}

/// Bad membership requests get a clear error and change nothing: node id 0,
/// an address that is not host:port, an id that is a member at another
/// address, another member's address; and a `--join` node the journal
/// refuses exits with the reason instead of lingering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_membership_requests_are_refused() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = JournalCluster::start(3).await;
    let admin = c.admin_client();
    let taken = c.nodes[1].addr.clone();
    for (id, addr, kind, words) in [
        (0, "127.0.0.1:1", Rejection::Invalid, "node id 0"),
        (9, "nonsense", Rejection::Invalid, "not host:port"),
        (2, "127.0.0.1:1", Rejection::Membership, "is a member at"),
        (9, taken.as_str(), Rejection::Membership, "one address, one node"),
    ] {
        match admin.add_node(id, addr).await {
            Err(JournalError::Rejected { kind: k, message }) => {
                assert_eq!(k, kind, "add-node {id} {addr}: {message}");
                assert!(message.contains(words), "add-node {id} {addr}: {message}");
            }
            other => panic!("add-node {id} {addr} was not refused: {other:?}"),
        }
    }
    let m = admin.members().await.unwrap();
    assert_eq!(m.members.iter().map(|n| n.node_id).collect::<Vec<_>>(), [1, 2, 3], "a refused change changed the members");
    // Removing a node that is not a member changes nothing.
    assert_eq!(admin.remove_node(42).await.unwrap().members.len(), 3);

    // A node that asks to join under a member's id (at another address)
    // is refused and exits, saying why.
    let i = c.join_as(2);
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = c.nodes[i].child.as_mut().unwrap().try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the refused --join node did not exit");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    c.nodes[i].child = None;
    assert!(!status.success());
    let log = std::fs::read_to_string(&c.nodes[i].log).unwrap();
    assert!(log.contains("refused to add node 2") && log.contains("is a member at"), "{log}");
    assert_eq!(admin.members().await.unwrap().members.len(), 3);
}
