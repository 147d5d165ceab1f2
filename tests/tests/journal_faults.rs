//! Losing the journal's Raft leader, end to end: real `keel-journal`
//! processes, kill -9 and a full disk (a small tmpfs under a node's data
//! directory), with writes going on.
//!
//! What a user must see: a node whose disk fills exits with
//! `EXIT_STORAGE_FAILED` and one `STORAGE_FAILED` line naming its data
//! directory and the cause (never a member that answers and serves
//! nothing); starting it on a disk still full fails the same way, promptly;
//! once there is room it rejoins and catches up; meanwhile its peers elect
//! a new Raft leader well within a Keel primary's lease, so the primary
//! keeps its lease (no Keel failover).
//!
//! The full-disk tests mount tmpfs, so they need root (CI runs the tests as
//! root). The tests are time-sensitive and share two cores: one at a time.

use std::path::Path;
use std::path::PathBuf;
use std::process::Command;
use std::process::ExitStatus;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;

use keel_journal::client::JournalClient;
use keel_journal::client::JournalError;
use keel_journal::server::EXIT_STORAGE_FAILED;
use keel_tests::JournalCluster;
use keel_tests::KeelCluster;
use keel_tests::Roles;
use keel_tests::Writer;
use keel_tests::Server;
use keel_tests::new_uuid;

static SERIAL: Mutex<()> = Mutex::new(());

const S: &str = "shard-1";
/// Payload of each write: large, so a small disk fills in a few hundred.
const WRITE_BYTES: usize = 100_000;
/// Size of the tmpfs under every node's data directory.
const ROOMY_MB: u64 = 1024;
/// Room left on the Raft leader's tmpfs before the writes start.
const LEFT_MB: u64 = 16;

/// tmpfs mounts, unmounted (lazily: a node may still hold files) on drop.
#[derive(Default)]
struct Tmpfs {
    dirs: Vec<PathBuf>,
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("run a command");
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

impl Tmpfs {
    fn mount(&mut self, dir: &Path, size_mb: u64) {
        std::fs::create_dir_all(dir).unwrap();
        run(Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size_mb}m"), "tmpfs"]).arg(dir));
        self.dirs.push(dir.to_path_buf());
    }

    /// Changes the size limit of the tmpfs at `dir` (not below its use).
    fn resize(dir: &Path, size_mb: u64) {
        run(Command::new("mount").args(["-o", &format!("remount,size={size_mb}m")]).arg(dir));
    }

    /// MiB in use on the filesystem at `dir`.
    fn used_mb(dir: &Path) -> u64 {
        let out = Command::new("df").args(["-B1M", "--output=used"]).arg(dir).output().unwrap();
        String::from_utf8_lossy(&out.stdout).lines().nth(1).and_then(|l| l.trim().parse().ok()).expect("df output")
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        for d in &self.dirs {
            let _ = Command::new("umount").arg("-l").arg(d).status();
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// (term, leader id) as node `i` sees them, if it answers.
async fn view(client: &JournalClient, i: usize) -> Option<(u64, Option<u64>, u64)> {
    client.node_status(i).await.ok().map(|s| (s.term, s.raft_leader_id, s.node_id))
}

/// Waits until a node other than `old` is Raft leader; returns its index
/// and how long it took from `since`.
async fn new_leader(c: &JournalCluster, old: usize, since: Instant, limit: Duration) -> (usize, Duration) {
    let client = c.client();
    loop {
        for i in (0..c.nodes.len()).filter(|&i| i != old) {
            if let Some((_, Some(leader), id)) = view(&client, i).await {
                if leader == id {
                    return (i, since.elapsed());
                }
            }
        }
        assert!(since.elapsed() < limit, "no new Raft leader within {limit:?}; logs in {}", c.dir.path().display());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until node `i`'s process exits; returns how it exited.
async fn wait_exit(c: &mut JournalCluster, i: usize, limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = c.nodes[i].child.as_mut().expect("node running").try_wait().unwrap() {
            c.nodes[i].child = None;
            return status;
        }
        assert!(Instant::now() < deadline, "node {} did not exit within {limit:?}; logs in {}", c.nodes[i].id, c.dir.path().display());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Asserts node `i` exited for lack of room, and said so in one line.
fn assert_stopped_for_lack_of_room(c: &JournalCluster, i: usize, status: ExitStatus) {
    let log = std::fs::read_to_string(&c.nodes[i].log).unwrap();
    assert_eq!(status.code(), Some(i32::from(EXIT_STORAGE_FAILED)), "node {} exited {status}; its log:\n{log}", c.nodes[i].id);
    let line = log.lines().filter(|l| l.contains("STORAGE_FAILED")).last().expect("a STORAGE_FAILED line");
    assert!(line.contains("No space left on device"), "{line}");
    assert!(line.contains(&c.nodes[i].data.display().to_string()), "the line names the data directory: {line}");
}

/// A full disk on the Raft leader, journal only: the node exits 74 with a
/// clear line, the others elect a leader and take writes, a start on the
/// still-full disk exits 74 promptly, and after the disk grows the node
/// rejoins and applies everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_the_node_and_it_rejoins_once_there_is_room() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut fs = Tmpfs::default();
    let mut c = JournalCluster::start_with_setup(3, &[], |c| {
        for n in &c.nodes {
            fs.mount(&n.data, ROOMY_MB);
        }
    })
    .await;
    let leader = c.wait_leader().await;
    let data = c.nodes[leader].data.clone();
    Tmpfs::resize(&data, Tmpfs::used_mb(&data) + LEFT_MB);
    let client = c.client();
    let me = new_uuid();
    client.set_leader(S, &me, "").await.unwrap();

    // Write until the leader's disk is full and it stops.
    let payload = vec![b'x'; WRITE_BYTES];
    let deadline = Instant::now() + Duration::from_secs(60);
    let stopped_at = loop {
        match client.append(S, &me, vec![payload.clone()], None).await {
            Ok(_) | Err(JournalError::OutcomeUnknown(_)) | Err(JournalError::Unavailable(_)) => {}
            Err(e) => panic!("append failed: {e}"),
        }
        if let Some(status) = c.nodes[leader].child.as_mut().unwrap().try_wait().unwrap() {
            c.nodes[leader].child = None;
            break (status, Instant::now());
        }
        assert!(Instant::now() < deadline, "the leader never stopped on its full disk; logs in {}", c.dir.path().display());
    };
    assert_stopped_for_lack_of_room(&c, leader, stopped_at.0);
    // (The writes above block while there is no leader: the time to a new
    // one is measured in the Keel tests, whose writer runs apart.)
    let (next, _) = new_leader(&c, leader, stopped_at.1, Duration::from_secs(20)).await;
    for _ in 0..5 {
        client.append(S, &me, vec![payload.clone()], None).await.expect("the others take writes");
    }

    // Started on the still-full disk, it fails the same way, promptly.
    c.restart(leader);
    let status = wait_exit(&mut c, leader, Duration::from_secs(30)).await;
    assert_stopped_for_lack_of_room(&c, leader, status);

    // With room, it rejoins and catches up; its status shows the room.
    Tmpfs::resize(&data, ROOMY_MB);
    c.restart(leader);
    let last = client.node_status(next).await.unwrap().last_log_index;
    c.wait_applied(leader, last).await;
    let free = client.node_status(leader).await.unwrap().data_free_bytes.expect("free bytes in status");
    assert!(free > (ROOMY_MB - LEFT_MB - 64) << 20, "status shows {free} bytes free on a roomy disk");
}

/// How the journal loses its Raft leader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// kill -9 of the leader's process.
    Kill,
    /// The leader's data directory fills up (it exits 74).
    FullDisk,
}

/// A Keel primary's lease (the sidecar default), in the tests' deployment.
const LEASE_MS: u64 = 1000;

/// A Keel primary (with a replica that would take over if its lease
/// lapsed) writes 100 KB values through a 3-node journal while the
/// journal loses its Raft leader to `fault`. The journal elects a new
/// leader well within the lease: the primary never loses its lease, the
/// stream's leader uuid is unchanged, writes resume. Prints the time to a
/// new Raft leader and the longest write stall a client saw.
async fn lose_the_journal_leader_under_a_keel_primary(fault: Fault) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut fs = Tmpfs::default();
    let journal = JournalCluster::start_with_setup(3, &[], |c| {
        if fault == Fault::FullDisk {
            for n in &c.nodes {
                fs.mount(&n.data, ROOMY_MB);
            }
        }
    })
    .await;
    let mut c = KeelCluster::start_on(journal, Server::Redis, 2, LEASE_MS);
    let client = c.journal.client();
    let uuid = client.stream_info(S).await.unwrap().leader_uuid;
    assert!(!uuid.is_empty());
    let leader = c.journal.wait_leader().await;
    let data = c.journal.nodes[leader].data.clone();
    if fault == Fault::FullDisk {
        Tmpfs::resize(&data, Tmpfs::used_mb(&data) + LEFT_MB);
    }

    let roles = Roles::watch(&c);
    let writer = Writer::start(c.nodes[0].addr(), WRITE_BYTES, Some(64));
    writer.wait_count(20, Duration::from_secs(30));
    let lost_at = match fault {
        Fault::Kill => {
            c.journal.kill(leader);
            Instant::now()
        }
        Fault::FullDisk => {
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                if let Some(status) = c.journal.nodes[leader].child.as_mut().unwrap().try_wait().unwrap() {
                    c.journal.nodes[leader].child = None;
                    assert_stopped_for_lack_of_room(&c.journal, leader, status);
                    break Instant::now();
                }
                assert!(Instant::now() < deadline, "the leader never stopped on its full disk; logs in {}", c.journal.dir.path().display());
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    };
    let (next, to_new_leader) = new_leader(&c.journal, leader, lost_at, Duration::from_secs(20)).await;
    // Writes resume through the new leader.
    let before = writer.count();
    writer.wait_count(before + 20, Duration::from_secs(30));
    let stall = writer.stop().longest_gap;
    let odd = roles.stop();
    println!(
        "{fault:?}: journal node {} lost; node {} Raft leader after {} ms; longest write stall {} ms (lease {LEASE_MS} ms)",
        c.journal.nodes[leader].id,
        c.journal.nodes[next].id,
        to_new_leader.as_millis(),
        stall.as_millis()
    );
    assert!(odd.is_empty(), "a Keel node changed role (a failover or a lapsed lease): {odd:?}");
    assert_eq!(client.stream_info(S).await.unwrap().leader_uuid, uuid, "the stream changed leader");
    assert_eq!(c.primaries(), vec![0]);
    assert!(
        to_new_leader < Duration::from_millis(LEASE_MS),
        "the journal took {to_new_leader:?} to elect a leader, longer than a Keel lease"
    );

    if fault == Fault::FullDisk {
        // Started on the still-full disk, it fails the same way, promptly.
        c.journal.restart(leader);
        let status = wait_exit(&mut c.journal, leader, Duration::from_secs(30)).await;
        assert_stopped_for_lack_of_room(&c.journal, leader, status);
        // With room, it rejoins and catches up.
        Tmpfs::resize(&data, ROOMY_MB);
        c.journal.restart(leader);
        let last = client.node_status(next).await.unwrap().last_log_index;
        c.journal.wait_applied(leader, last).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_journal_leader_costs_no_keel_failover() {
    lose_the_journal_leader_under_a_keel_primary(Fault::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_leader_with_a_full_disk_costs_no_keel_failover() {
    lose_the_journal_leader_under_a_keel_primary(Fault::FullDisk).await;
}
