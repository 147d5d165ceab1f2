//! The journal, end to end: real `keel-journal` processes over gRPC with real
//! fsync; faults are kill -9, SIGSTOP/SIGCONT and torn files on disk.

use std::process::Command;
use std::time::Duration;

use keel_journal::client::AppendSession;
use keel_journal::client::JournalClient;
use keel_journal::client::JournalError;
use keel_journal::client::Rejection;
use keel_tests::JournalCluster;
use keel_tests::bin;
use keel_tests::new_uuid;
use keel_tests::rss_bytes;
use keel_tests::dir_bytes;
use keel_tests::read_all;

const S: &str = "shard-1";

/// Appends one record as the only writer, retrying through leader changes.
/// An outcome-unknown attempt is retried with `expect_last_seq`; a
/// `seq-mismatch` then tells whether the earlier attempt landed.
async fn append_acked(client: &JournalClient, leader: &str, payload: &[u8], last_seq: &mut u64) -> u64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match client.append(S, leader, vec![payload.to_vec()], Some(*last_seq)).await {
            Ok(seq) => {
                assert_eq!(seq, *last_seq + 1);
                *last_seq = seq;
                return seq;
            }
            Err(JournalError::Rejected { kind: Rejection::SeqMismatch, .. }) => {
                // The earlier unknown attempt was applied: check it is ours.
                let info = client.stream_info(S).await.expect("stream info");
                assert_eq!(info.last_seq, *last_seq + 1, "someone else appended");
                *last_seq += 1;
                return *last_seq;
            }
            Err(e @ (JournalError::OutcomeUnknown(_) | JournalError::Unavailable(_))) => {
                assert!(std::time::Instant::now() < deadline, "append never succeeded: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("append failed: {e}"),
        }
    }
}

/// Appends `{prefix}{i}` for every `i` in `range`, as the only writer.
async fn append_numbered(client: &JournalClient, leader: &str, prefix: &str, range: std::ops::Range<u32>, last_seq: &mut u64) {
    for i in range {
        append_acked(client, leader, format!("{prefix}{i}").as_bytes(), last_seq).await;
    }
}

fn ctl(c: &JournalCluster, args: &[&str], stdin: &[u8]) -> (i32, String, String) {
    use std::io::Write;
    let mut child = Command::new(bin("keel-journal"))
        .args(["ctl", "--endpoints", &c.endpoints()])
        .args(c.ctl_tls_args())
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_replicate_and_any_node_answers() {
    let c = JournalCluster::start(3).await;
    let client = c.client();
    let a = new_uuid();
    assert_eq!(client.set_leader(S, &a, "").await.unwrap(), "");
    let mut last = 0;
    append_numbered(&client, &a, "r", 0..50, &mut last).await;
    // Whichever node a client tries first, it is led to the Raft leader and
    // reads every acknowledged record (reads are linearizable).
    for i in 0..3 {
        let mut eps: Vec<String> = c.nodes.iter().map(|n| n.addr.clone()).collect();
        eps.rotate_left(i);
        let from_i = JournalClient::new(eps, c.client_config()).unwrap();
        let got = read_all(&from_i, S).await;
        assert_eq!(got.len(), 50 + i, "starting at node {i}");
        assert_eq!(got[7], (8, b"r7".to_vec()));
        assert_eq!(from_i.append(S, &a, vec![format!("via-{i}").into_bytes()], None).await.unwrap(), 51 + i as u64);
    }
    // Every node applied every entry (replication reached all three).
    let leader = c.wait_leader().await;
    let last = c.client_of(leader).node_status(0).await.unwrap().last_log_index;
    for i in 0..3 {
        c.wait_applied(i, last).await;
    }
    // A client that knows only a follower is told where the leader is (the
    // not-leader answer names it), follows, and appends there once.
    let follower = (leader + 1) % 3;
    let only_follower = c.client_of(follower);
    assert_eq!(only_follower.append(S, &a, vec![b"via-follower".to_vec()], None).await.unwrap(), 54);
    assert_eq!(client.stream_info(S).await.unwrap().last_seq, 54);
    // And it knows the whole journal now (any reachable member is enough).
    let mut known = only_follower.endpoints();
    known.sort();
    let mut all: Vec<String> = c.nodes.iter().map(|n| n.addr.clone()).collect();
    all.sort();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while known != all {
        assert!(std::time::Instant::now() < deadline, "the client learned {known:?}, not {all:?}");
        only_follower.learn_members().await;
        known = only_follower.endpoints();
        known.sort();
    }
}

/// Appends over one `AppendStream` answer exactly as unary appends do: in
/// order, a refusal (fenced, seq-mismatch, invalid) leaves the stream usable,
/// a session that starts at a follower is led to the leader, and a session
/// whose leader died answers outcome-unknown or lands, never twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_appends_answer_like_unary_ones() {
    let mut c = JournalCluster::start(3).await;
    let leader = c.wait_leader().await;
    let (a, b) = (new_uuid(), new_uuid());
    c.client().set_leader(S, &a, "").await.unwrap();
    // Starts at a follower: redirected to the leader, nothing applied twice.
    let follower = (leader + 1) % 3;
    let mut eps: Vec<String> = c.nodes.iter().map(|n| n.addr.clone()).collect();
    eps.rotate_left(follower);
    let mut s = AppendSession::new(std::sync::Arc::new(JournalClient::new(eps, c.client_config()).unwrap()));
    for i in 1..=20u64 {
        assert_eq!(s.append(S, &a, vec![format!("s{i}").into_bytes()], Some(i - 1)).await.unwrap(), i);
    }
    // Refusals come back on the same stream, which goes on.
    match s.append(S, &b, vec![b"not the leader".to_vec()], None).await {
        Err(JournalError::Fenced { leader, .. }) => assert_eq!(leader, a),
        other => panic!("expected FENCED, got {other:?}"),
    }
    match s.append(S, &a, vec![b"stale".to_vec()], Some(3)).await {
        Err(e) => assert_eq!(e.kind(), "seq-mismatch", "{e}"),
        other => panic!("expected seq-mismatch, got {other:?}"),
    }
    match s.append(S, &a, vec![Vec::new()], None).await {
        Err(e) => assert_eq!(e.kind(), "invalid", "{e}"),
        other => panic!("expected invalid, got {other:?}"),
    }
    assert_eq!(s.append(S, &a, vec![b"s21".to_vec()], Some(20)).await.unwrap(), 21);
    // Several records in one append: the seq of the last.
    assert_eq!(s.append(S, &a, vec![b"s22".to_vec(), b"s23".to_vec()], None).await.unwrap(), 23);
    let got = read_all(&c.client(), S).await;
    let want: Vec<(u64, Vec<u8>)> = (1..=23u64).map(|i| (i, format!("s{i}").into_bytes())).collect();
    assert_eq!(got, want);
    assert!(s.streams(), "the appends went over AppendStream");
    // The leader dies: the session's next appends fail as unknown or
    // unavailable until a new leader answers, then land exactly once each.
    c.kill(leader);
    let mut last = 23u64;
    for i in 24..=30u64 {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            match s.append(S, &a, vec![format!("s{i}").into_bytes()], Some(last)).await {
                Ok(seq) => {
                    assert_eq!(seq, last + 1);
                    last = seq;
                    break;
                }
                Err(e) if e.rejection() == Some(&Rejection::SeqMismatch) => {
                    // An attempt whose outcome was unknown landed.
                    last += 1;
                    break;
                }
                Err(e @ (JournalError::OutcomeUnknown(_) | JournalError::Unavailable(_))) => {
                    assert!(std::time::Instant::now() < deadline, "no new leader took the append: {e}");
                }
                Err(e) => panic!("append failed: {e}"),
            }
        }
    }
    let got = read_all(&c.client(), S).await;
    let want: Vec<(u64, Vec<u8>)> = (1..=30u64).map(|i| (i, format!("s{i}").into_bytes())).collect();
    assert_eq!(got, want, "every streamed append landed once, in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_and_compare_and_set() {
    let c = JournalCluster::start(3).await;
    let client = c.client();
    let (a, b) = (new_uuid(), new_uuid());
    client.set_leader(S, &a, "").await.unwrap();
    assert_eq!(client.append(S, &a, vec![b"x".to_vec()], None).await.unwrap(), 1);

    // A writer that is not the leader is fenced, and told who is.
    match client.append(S, &b, vec![b"y".to_vec()], None).await {
        Err(JournalError::Fenced { leader, message }) => {
            assert_eq!(leader, a);
            assert!(message.contains("FENCED"), "{message}");
        }
        other => panic!("expected FENCED, got {other:?}"),
    }
    // CAS with the wrong expectation fails and reports the actual leader.
    match client.set_leader(S, &b, &b).await {
        Err(JournalError::Rejected { kind, message }) => {
            assert_eq!(kind, Rejection::CasFailed);
            assert!(message.contains(&a), "{message}");
        }
        other => panic!("expected CAS failure, got {other:?}"),
    }
    assert_eq!(client.set_leader(S, &b, &a).await.unwrap(), a);
    assert!(client.append(S, &a, vec![b"z".to_vec()], None).await.unwrap_err().is_fenced());
    assert_eq!(client.append(S, &b, vec![b"w".to_vec()], None).await.unwrap(), 2);

    // The CLI: exit 3 on FENCED with the reason on stderr, 0 on success.
    let (code, _, err) = ctl(&c, &["append", S, "--leader", &a], b"late");
    assert_eq!(code, 3, "stderr: {err}");
    assert!(err.contains("FENCED"), "{err}");
    let (code, out, err) = ctl(&c, &["append", S, "--leader", &b], b"cli");
    assert_eq!(code, 0, "stderr: {err}");
    assert_eq!(out.trim(), "3");
    let (code, out, _) = ctl(&c, &["read", S, "--from", "2"], b"");
    assert_eq!(code, 0);
    assert_eq!(out, "2\tw\n3\tcli\n");
    let got = read_all(&client, S).await;
    assert_eq!(got.iter().map(|(_, p)| p.clone()).collect::<Vec<_>>(), vec![b"x".to_vec(), b"w".to_vec(), b"cli".to_vec()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_expiry_and_takeover() {
    let c = JournalCluster::start(3).await;
    let client = c.client();
    let (a, b) = (new_uuid(), new_uuid());
    let l = client.take_lease(S, &a, 0, 800).await.unwrap();
    assert_eq!(l.leader_uuid, a);
    client.append(S, &a, vec![b"1".to_vec(), b"2".to_vec()], None).await.unwrap();

    // While A's lease is live, B cannot take it, caught up or not.
    let e = client.take_lease(S, &b, 2, 800).await.unwrap_err();
    assert_eq!(e.kind(), "lease-held", "{e}");
    // Renewal moves the deadline forward.
    let r = client.renew_lease(S, &a).await.unwrap();
    assert!(r.deadline_unix_ms >= l.deadline_unix_ms);

    tokio::time::sleep(Duration::from_millis(1000)).await;
    // Expired, but a lagging candidate still cannot win.
    let e = client.take_lease(S, &b, 1, 800).await.unwrap_err();
    assert_eq!(e.kind(), "not-caught-up", "{e}");
    let won = client.take_lease(S, &b, 2, 800).await.unwrap();
    assert_eq!((won.leader_uuid.as_str(), won.last_seq), (b.as_str(), 2));

    // A is fenced for appends and renewals.
    assert!(client.append(S, &a, vec![b"a".to_vec()], None).await.unwrap_err().is_fenced());
    assert!(client.renew_lease(S, &a).await.unwrap_err().is_fenced());
    assert_eq!(client.append(S, &b, vec![b"b".to_vec()], None).await.unwrap(), 3);
}

/// A lease holder paused (SIGSTOP) across its lease expiry resumes after a
/// take-over: none of its appends lands after the take-over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_stale_leader_is_fenced_after_resume() {
    let c = JournalCluster::start(3).await;
    let client = c.client();
    let (a, b) = (new_uuid(), new_uuid());
    client.take_lease(S, &a, 0, 500).await.unwrap();

    // A's writer: a separate process appending "A" in a loop until refused.
    let script = format!(
        "while true; do echo -n A | '{}' ctl --endpoints '{}' {} append {S} --leader {a} >/dev/null || exit $?; done",
        bin("keel-journal").display(),
        c.endpoints(),
        c.ctl_tls_args().join(" ")
    );
    let mut writer = Command::new("setsid").args(["bash", "-c", &script]).spawn().unwrap();
    let pgid = writer.id();
    // Wait for some of A's appends.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while client.stream_info(S).await.unwrap().last_seq < 5 {
        assert!(std::time::Instant::now() < deadline, "writer made no progress");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Pause the whole writer (shell and any in-flight ctl) past the lease.
    let group = format!("-{pgid}");
    assert!(Command::new("kill").args(["-STOP", "--", &group]).status().unwrap().success());
    tokio::time::sleep(Duration::from_millis(800)).await;
    let caught_up = client.stream_info(S).await.unwrap().last_seq;
    let won = client.take_lease(S, &b, caught_up, 5000).await.unwrap();
    assert_eq!(won.leader_uuid, b);
    let takeover_seq = won.last_seq;
    client.append(S, &b, vec![b"B".to_vec()], None).await.unwrap();

    assert!(Command::new("kill").args(["-CONT", "--", &group]).status().unwrap().success());
    let status = tokio::task::spawn_blocking(move || writer.wait().unwrap()).await.unwrap();
    assert_eq!(status.code(), Some(3), "the resumed stale writer must exit FENCED");

    let records = read_all(&client, S).await;
    for (seq, p) in &records {
        if *seq > takeover_seq {
            assert_eq!(p, b"B", "record {seq} after the take-over came from the fenced leader");
        }
    }
    assert_eq!(records.last().unwrap().1, b"B");
}

/// kill -9 of any node (the leader first) during appends loses no
/// acknowledged record, and appends keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_any_node_keeps_appends_and_loses_nothing() {
    let mut c = JournalCluster::start(3).await;
    let client = c.client();
    let a = new_uuid();
    client.set_leader(S, &a, "").await.unwrap();
    let mut last = 0;
    let mut acked = Vec::new();
    let mut n = 0u32;
    let mut write = |count: u32| {
        let v: Vec<Vec<u8>> = (n..n + count).map(|i| format!("rec-{i}").into_bytes()).collect();
        n += count;
        v
    };
    for victim_is_leader in [true, false] {
        for p in write(30) {
            append_acked(&client, &a, &p, &mut last).await;
            acked.push(p);
        }
        let leader = c.wait_leader().await;
        let victim = if victim_is_leader { leader } else { (leader + 1) % 3 };
        c.kill(victim);
        // Appends continue on the two survivors.
        for p in write(30) {
            append_acked(&client, &a, &p, &mut last).await;
            acked.push(p);
        }
        c.restart(victim);
    }
    let got: Vec<Vec<u8>> = read_all(&client, S).await.into_iter().map(|(_, p)| p).collect();
    assert_eq!(got, acked, "the stream must hold exactly the acknowledged records, in order");
}

/// kill -9 of all three nodes, then restart: every acknowledged record is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_of_all_nodes_recovers_everything() {
    let mut c = JournalCluster::start(3).await;
    let a = new_uuid();
    c.client().set_leader(S, &a, "").await.unwrap();
    let mut last = 0;
    // Several rounds: write, kill -9 every node right after the last
    // acknowledgement, restart, and read everything back. (The last write
    // before the kill is the one a lazily persisted commit index can lose.)
    for round in 0..3u64 {
        let client = c.client();
        for i in 0..30u64 {
            append_acked(&client, &a, format!("v{}", round * 30 + i).as_bytes(), &mut last).await;
        }
        let prev = if round == 0 { None } else { Some(format!("snap-{}", round - 1).into_bytes()) };
        client.cas_meta(S, "snapshot", prev, format!("snap-{round}").into_bytes()).await.unwrap();
        drop(client);
        c.kill_and_restart_all().await;
        let client = c.client();
        let got = read_all(&client, S).await;
        assert_eq!(got.len() as u64, (round + 1) * 30, "round {round}");
        assert!(got.iter().enumerate().all(|(i, (seq, p))| *seq == i as u64 + 1 && *p == format!("v{i}").into_bytes()));
        assert_eq!(client.get_meta(S, "snapshot").await.unwrap().unwrap(), format!("snap-{round}").into_bytes());
    }
    // Leadership survived too: the old leader can keep appending, others cannot.
    let client = c.client();
    assert_eq!(client.append(S, &a, vec![b"after".to_vec()], None).await.unwrap(), 91);
    assert!(client.append(S, &new_uuid(), vec![b"x".to_vec()], None).await.unwrap_err().is_fenced());
}

/// A torn write at the end of one node's log (a crash mid-write) is repaired
/// on restart, and that node catches up with the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_tail_on_one_node_is_repaired() {
    let mut c = JournalCluster::start(3).await;
    let client = c.client();
    let a = new_uuid();
    client.set_leader(S, &a, "").await.unwrap();
    let mut last = 0;
    append_numbered(&client, &a, "t", 0..40, &mut last).await;
    let leader = c.wait_leader().await;
    let victim = (leader + 1) % 3;
    c.kill(victim);
    // Tear the newest WAL file as a crash mid-write does: the last record
    // is cut short. (A zero-filled tail is covered by the log store's unit
    // tests; a damaged record with non-zero bytes is refused at start.)
    let newest = newest_file(&c.nodes[victim].data.join("raft-log"));
    let len = std::fs::metadata(&newest).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&newest).unwrap();
    f.set_len(len.saturating_sub(7)).unwrap();
    drop(f);
    append_numbered(&client, &a, "t", 40..60, &mut last).await;
    c.restart(victim);
    // The repaired node catches up on every entry...
    let status = c.client_of(leader).node_status(0).await.unwrap();
    c.wait_applied(victim, status.last_log_index).await;
    // ...and can serve them: make it leader by stopping the current one.
    c.kill(leader);
    let new_leader = c.wait_leader().await;
    let got = read_all(&c.client(), S).await;
    assert_eq!(got.len(), 60, "new leader is node index {new_leader}");
    assert!(got.iter().enumerate().all(|(i, (_, p))| *p == format!("t{i}").into_bytes()));
}

/// With frequent snapshots and no log kept behind them, a node whose disk was
/// replaced (data wiped) rebuilds from a snapshot sent by the leader, and a
/// restart of every node recovers from snapshot plus log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_rebuild_a_wiped_node_and_survive_restart() {
    let mut c = JournalCluster::start_with(3, &["--snapshot-every-entries", "10", "--keep-log-entries", "0"]).await;
    let client = c.client();
    let a = new_uuid();
    client.set_leader(S, &a, "").await.unwrap();
    let mut last = 0;
    append_numbered(&client, &a, "s", 0..20, &mut last).await;
    let leader = c.wait_leader().await;
    let lagging = (leader + 1) % 3;
    c.kill(lagging);
    append_numbered(&client, &a, "s", 20..80, &mut last).await;
    client.trim(S, 30).await.unwrap();
    std::fs::remove_dir_all(&c.nodes[lagging].data).unwrap();
    assert!(
        c.nodes[leader].data.join("state/snapshot.bin").exists(),
        "the leader wrote no snapshot file"
    );
    c.restart(lagging);
    let status = c.client_of(leader).node_status(0).await.unwrap();
    c.wait_applied(lagging, status.last_log_index).await;
    let log = std::fs::read_to_string(&c.nodes[lagging].log).unwrap();
    assert!(log.contains("snapshot installed"), "the wiped node caught up without a snapshot");
    c.kill_and_restart_all().await;
    let client = c.client();
    let got = read_all(&client, S).await;
    assert_eq!(got.first().map(|r| r.0), Some(31));
    assert_eq!(got.len(), 50);
    assert!(got.iter().all(|(seq, p)| *p == format!("s{}", seq - 1).into_bytes()));
    assert_eq!(client.append(S, &a, vec![b"after".to_vec()], None).await.unwrap(), 81);
}

fn newest_file(dir: &std::path::Path) -> std::path::PathBuf {
    let mut files: Vec<_> = walk(dir).into_iter().filter(|p| std::fs::metadata(p).map(|m| m.len() > 0).unwrap_or(false)).collect();
    files.sort_by_key(|p| (std::fs::metadata(p).unwrap().modified().unwrap(), p.clone()));
    files.pop().unwrap_or_else(|| panic!("no WAL file in {}", dir.display()))
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Bad input gets a clear status and the node keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_errors() {
    let c = JournalCluster::start(1).await;
    let client = c.client();
    let a = new_uuid();

    let mut reader = client.read("no-such-stream", 0, false);
    let e = reader.next_batch().await.unwrap_err();
    assert_eq!(e.kind(), "unknown-stream", "{e}");
    assert!(e.to_string().contains("no-such-stream"));

    let e = client.append("no-such-stream", &a, vec![b"x".to_vec()], None).await.unwrap_err();
    assert_eq!(e.kind(), "unknown-stream", "{e}");

    let e = client.set_leader(S, "not-a-uuid", "").await.unwrap_err();
    assert_eq!(e.kind(), "invalid", "{e}");
    assert!(e.to_string().contains("not a uuid"), "{e}");

    client.set_leader(S, &a, "").await.unwrap();
    let e = client.append(S, &a, vec![Vec::new()], None).await.unwrap_err();
    assert_eq!(e.kind(), "invalid", "{e}");
    let e = client.append(S, &a, vec![], None).await.unwrap_err();
    assert_eq!(e.kind(), "invalid", "{e}");
    let big = vec![0u8; keel_journal::streams::MAX_RECORD_BYTES + 1];
    let e = client.append(S, &a, vec![big], None).await.unwrap_err();
    assert_eq!(e.kind(), "invalid", "{e}");
    assert!(e.to_string().contains("limit"), "{e}");
    let e = client.take_lease(S, &a, 0, 0).await.unwrap_err();
    assert_eq!(e.kind(), "invalid", "{e}");
    let e = client.trim(S, 5).await.unwrap_err();
    assert_eq!(e.kind(), "invalid", "{e}");

    // Nothing was lost or added by the rejected calls; the node still works.
    assert_eq!(client.append(S, &a, vec![b"ok".to_vec()], None).await.unwrap(), 1);
    client.trim(S, 1).await.unwrap();
    let e = client.read(S, 1, false).next_batch().await.unwrap_err();
    assert_eq!(e.kind(), "trimmed", "{e}");

    // A malformed frame on the Raft port is refused without harm.
    // (It takes a journal node's certificate: a client's is refused.)
    let raft_port = |tls: keel_journal::tls::JournalTls| {
        let endpoint = tonic::transport::Channel::from_shared(format!("https://{}", c.nodes[0].addr))
            .unwrap()
            .tls_config(tls.client_config().expect("a TLS cluster"))
            .unwrap();
        async move { keel_proto::journal::raft_client::RaftClient::new(endpoint.connect().await.unwrap()) }
    };
    let mut as_client = raft_port(c.tls()).await;
    let status = as_client.append_entries(keel_proto::journal::RaftMessage { data: vec![0xc1].into() }).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status}");
    assert!(status.message().contains("only journal nodes"), "{status}");
    let node_cert = keel_journal::tls::TlsPaths::in_dir(c.tls_dir.as_ref().unwrap(), "journal-1");
    let as_node = keel_journal::tls::JournalTls::load(&keel_journal::tls::TlsChoice::Files(node_cert)).unwrap();
    let mut raw = raft_port(as_node).await;
    let status = raw.append_entries(keel_proto::journal::RaftMessage { data: vec![0xc1, 0xff, 0x00].into() }).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(client.append(S, &a, vec![b"still".to_vec()], None).await.unwrap(), 2);
    // On a replication stream it ends that stream, unanswered.
    let junk = futures::stream::iter(vec![keel_proto::journal::RaftMessage { data: vec![0xc1, 0xff, 0x00].into() }]);
    let mut replies = raw.stream_append(junk).await.unwrap().into_inner();
    assert_eq!(replies.message().await.unwrap(), None);
    assert_eq!(client.append(S, &a, vec![b"and still".to_vec()], None).await.unwrap(), 3);

    // Bad configuration is refused at start with a message naming the problem.
    let out = Command::new(bin("keel-journal"))
        .args(["serve", "--node-id", "4", "--listen", "127.0.0.1:1", "--data", "/tmp/x", "--peers", "1=127.0.0.1:2"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not list this node"), "{:?}", out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_read_tails_new_records() {
    let c = JournalCluster::start(1).await;
    let client = c.client();
    let a = new_uuid();
    client.set_leader(S, &a, "").await.unwrap();
    client.append(S, &a, vec![b"1".to_vec()], None).await.unwrap();
    let tail_client = c.client();
    let tail = tokio::spawn(async move {
        let mut r = tail_client.read(S, 1, true);
        let mut seen = Vec::new();
        while seen.len() < 3 {
            for rec in r.next_batch().await.unwrap().unwrap() {
                seen.push(rec.payload.to_vec());
            }
        }
        seen
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    client.append(S, &a, vec![b"2".to_vec(), b"3".to_vec()], None).await.unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(10), tail).await.expect("tail returned").unwrap();
    assert_eq!(seen, vec![b"1".to_vec(), b"2".to_vec(), b"3".to_vec()]);
}

/// A stream's quota is admission control at the Raft leader: an append that
/// would take the stream over `--stream-quota-bytes` is refused stream-full
/// with what to do, nothing is applied, and appends are accepted again once
/// a trim made room. A bad quota is refused at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_quota_refuses_appends_until_a_trim() {
    /// The smallest quota the journal accepts: one largest append.
    const QUOTA: usize = keel_journal::streams::MAX_APPEND_BYTES;
    const RECORD: usize = QUOTA / 4;
    let quota = QUOTA.to_string();
    let c = JournalCluster::start_with(1, &["--stream-quota-bytes", &quota]).await;
    let client = c.client();
    let a = new_uuid();
    client.set_leader(S, &a, "").await.unwrap();
    let record = |b: u8| vec![vec![b; RECORD / 2], vec![b; RECORD / 2]];
    for i in 1..=4u8 {
        assert_eq!(client.append(S, &a, record(i), None).await.unwrap(), u64::from(i) * 2);
    }
    let e = client.append(S, &a, vec![b"one byte too many".to_vec()], None).await.unwrap_err();
    assert_eq!(e.kind(), "stream-full", "{e}");
    let msg = e.to_string();
    assert!(msg.contains(&format!("stream {S} holds {QUOTA} untrimmed bytes, its quota is {QUOTA}")), "{msg}");
    assert!(msg.contains("--stream-quota-bytes") && msg.contains("snapshot"), "{msg}");
    // Streamed appends are refused alike.
    let mut session = AppendSession::new(std::sync::Arc::new(c.client()));
    let e = session.append(S, &a, vec![b"x".to_vec()], None).await.unwrap_err();
    assert_eq!(e.kind(), "stream-full", "{e}");
    let info = client.stream_info(S).await.unwrap();
    assert_eq!((info.last_seq, info.bytes), (8, QUOTA as u64), "nothing of the refused appends was applied");

    // A trim makes room for exactly what it dropped.
    assert_eq!(client.trim(S, 2).await.unwrap(), 3);
    assert_eq!(client.append(S, &a, record(5), None).await.unwrap(), 10);
    assert_eq!(session.append(S, &a, vec![b"x".to_vec()], None).await.unwrap_err().kind(), "stream-full");
    let got = read_all(&client, S).await;
    assert_eq!(got.first().map(|r| r.0), Some(3));
    assert_eq!(got.last().map(|r| (r.0, r.1[0])), Some((10, 5)));

    // A quota below one largest append is refused at start, naming the flag.
    let out = Command::new(bin("keel-journal"))
        .args(["serve", "--node-id", "1", "--listen", "127.0.0.1:1", "--data", "/tmp/x", "--peers", "1=127.0.0.1:1"])
        .args(["--stream-quota-bytes", "1000"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--stream-quota-bytes 1000 is out of range"), "{:?}", out);
}

/// Most resident memory (VmRSS) a journal node may use in
/// `records_live_on_disk_and_memory_stays_bounded`, whatever its streams hold.
const MAX_JOURNAL_RSS_BYTES: u64 = 256 << 20;

/// A journal node's resident memory, from /proc.
/// Samples every running node's RSS, keeping the largest per node.
fn sample_rss(c: &JournalCluster, max: &mut [u64]) {
    for (i, n) in c.nodes.iter().enumerate() {
        if let Some(child) = &n.child {
            let rss = rss_bytes(child.id());
            max[i] = max[i].max(rss);
            assert!(
                rss <= MAX_JOURNAL_RSS_BYTES,
                "journal node {} uses {} MiB resident, over the {} MiB bound",
                n.id,
                rss >> 20,
                MAX_JOURNAL_RSS_BYTES >> 20
            );
        }
    }
}

/// The payload of record `seq` in that test: distinct per record.
fn big_record(seq: u64, len: usize) -> Vec<u8> {
    let mut v = vec![(seq % 251) as u8; len];
    v[..8].copy_from_slice(&seq.to_le_bytes());
    v
}

/// Record payloads live on disk: a 3-node journal holding ~300 MB of
/// untrimmed records stays under a named RSS bound on every node; after a
/// trim, a node whose disk was wiped catches up from a snapshot streamed in
/// chunks (still under the bound), and serves the same records as leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_live_on_disk_and_memory_stays_bounded() {
    const RECORD_BYTES: usize = 512 << 10;
    const RECORDS: u64 = 600;
    const TRIM_TO: u64 = 300;
    let mut c = JournalCluster::start_with(3, &["--snapshot-every-entries", "100", "--keep-log-entries", "200"]).await;
    let client = c.client();
    let a = new_uuid();
    client.set_leader(S, &a, "").await.unwrap();
    let mut max_rss = vec![0u64; 3];
    let started = std::time::Instant::now();
    let mut session = AppendSession::new(std::sync::Arc::new(c.client()));
    for seq in 1..=RECORDS {
        assert_eq!(session.append(S, &a, vec![big_record(seq, RECORD_BYTES)], Some(seq - 1)).await.unwrap(), seq);
        if seq % 25 == 0 {
            sample_rss(&c, &mut max_rss);
        }
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "appended {} MiB in {secs:.1}s ({:.1} MiB/s); max RSS per node (MiB): {:?}",
        (RECORDS as usize * RECORD_BYTES) >> 20,
        (RECORDS as usize * RECORD_BYTES) as f64 / secs / (1 << 20) as f64,
        max_rss.iter().map(|r| r >> 20).collect::<Vec<_>>()
    );
    let info = client.stream_info(S).await.unwrap();
    assert_eq!((info.last_seq, info.bytes), (RECORDS, RECORDS * RECORD_BYTES as u64));

    assert_eq!(client.trim(S, TRIM_TO).await.unwrap(), TRIM_TO + 1);
    assert_eq!(client.stream_info(S).await.unwrap().bytes, (RECORDS - TRIM_TO) * RECORD_BYTES as u64);
    // A follower loses its disk. Meanwhile more appends: a snapshot after
    // the trim is built and the log it would need is purged.
    let leader = c.wait_leader().await;
    let wiped = (leader + 1) % 3;
    c.kill(wiped);
    std::fs::remove_dir_all(&c.nodes[wiped].data).unwrap();
    const MORE: u64 = 400;
    let mut last = RECORDS;
    for seq in RECORDS + 1..=RECORDS + MORE {
        // Retried through outcome-unknown: the disk may be slow to sync here.
        assert_eq!(append_acked(&client, &a, &big_record(seq, 1024), &mut last).await, seq);
    }
    let last_seq = RECORDS + MORE;
    // It comes back empty and catches up by snapshot.
    c.restart(wiped);
    let target = c.client_of(leader).node_status(0).await.unwrap().last_log_index;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        sample_rss(&c, &mut max_rss);
        if c.client_of(wiped).node_status(0).await.is_ok_and(|s| s.last_applied_index >= target) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the wiped node did not catch up within 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = std::fs::read_to_string(&c.nodes[wiped].log).unwrap();
    assert!(log.contains("snapshot installed"), "the wiped node caught up without a snapshot");

    // Make the wiped node leader: restart it with shorter election timeouts
    // than the others, then stop the leader.
    c.kill(wiped);
    let peers = c.nodes.iter().map(|n| format!("{}={}", n.id, n.addr)).collect::<Vec<_>>().join(",");
    let node = &c.nodes[wiped];
    let out = std::fs::OpenOptions::new().append(true).open(&node.log).unwrap();
    let child = Command::new(bin("keel-journal"))
        .args(["serve", "--node-id", &node.id.to_string(), "--listen", &node.addr, "--peers", &peers])
        .arg("--data")
        .arg(&node.data)
        .arg("--tls-dir")
        .arg(c.tls_dir.as_ref().unwrap())
        .args(["--snapshot-every-entries", "100", "--keep-log-entries", "200"])
        .args(["--heartbeat-ms", "50", "--election-min-ms", "150", "--election-max-ms", "200"])
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    c.nodes[wiped].child = Some(child);
    c.wait_applied(wiped, target).await;
    // Stop the leader; should another node win, bring the stopped one back
    // and stop the winner, until the rebuilt node leads.
    // Elections are a coin toss between the two survivors.
    const REBUILT_LEADER_ROUNDS: usize = 30;
    let mut down = leader;
    c.kill(down);
    for round in 0.. {
        let l = c.wait_leader().await;
        if l == wiped {
            break;
        }
        assert!(round < REBUILT_LEADER_ROUNDS, "the rebuilt node never became leader");
        c.restart(down);
        let index = c.client_of(l).node_status(0).await.unwrap().last_log_index;
        // Both survivors hold the whole log before the leader goes, so
        // either may win the next election (a node behind cannot).
        c.wait_applied(down, index).await;
        c.wait_applied(wiped, index).await;
        c.kill(l);
        down = l;
    }

    let from_wiped = c.client_of(wiped);
    let mut reader = from_wiped.read(S, 0, false);
    let mut next = TRIM_TO + 1;
    while let Some(batch) = reader.next_batch().await.unwrap() {
        for r in batch {
            assert_eq!(r.seq, next);
            let len = if r.seq <= RECORDS { RECORD_BYTES } else { 1024 };
            assert!(r.payload[..] == big_record(r.seq, len)[..], "record {} differs on the rebuilt node", r.seq);
            next += 1;
        }
        sample_rss(&c, &mut max_rss);
    }
    assert_eq!(next, last_seq + 1, "the rebuilt node serves every retained record");
    eprintln!("max RSS per node (MiB) after catch-up and reads: {:?}", max_rss.iter().map(|r| r >> 20).collect::<Vec<_>>());
}

/// Large entries (1 MiB appends) reach `--snapshot-every-bytes` long before
/// the entry count of openraft's own policy: Raft snapshots are built by
/// bytes, so the Raft log is purged and trimmed record segments deleted, and
/// each node's data directory stays bounded while many times its size is
/// written (and trimmed as a snapshotter would).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_by_bytes_keep_the_disk_bounded() {
    const RECORD_BYTES: usize = 1 << 20;
    const RECORDS: u64 = 400;
    const EVERY_BYTES: u64 = 32 << 20;
    // The Raft log since a snapshot (EVERY_BYTES) plus the entries kept
    // behind it (20), the untrimmed tail (< 16 records) and two whole record
    // segments (they are deleted whole, 64 MiB each), with room to spare.
    const DISK_BOUND: u64 = EVERY_BYTES + (20 + 16) * RECORD_BYTES as u64 + 2 * keel_journal::records::SEGMENT_BYTES + (48 << 20);
    let c = JournalCluster::start_with(3, &["--snapshot-every-bytes", &EVERY_BYTES.to_string(), "--keep-log-entries", "20"]).await;
    let client = c.client();
    let a = new_uuid();
    client.set_leader(S, &a, "").await.unwrap();
    let mut session = AppendSession::new(std::sync::Arc::new(c.client()));
    let mut max_disk = 0u64;
    for seq in 1..=RECORDS {
        assert_eq!(session.append(S, &a, vec![big_record(seq, RECORD_BYTES)], Some(seq - 1)).await.unwrap(), seq);
        if seq % 8 == 0 {
            client.trim(S, seq - 8).await.unwrap();
            for n in &c.nodes {
                max_disk = max_disk.max(dir_bytes(&n.data));
            }
        }
    }
    eprintln!("wrote {} MiB; largest journal data directory {} MiB (bound {} MiB)", RECORDS, max_disk >> 20, DISK_BOUND >> 20);
    assert!(max_disk <= DISK_BOUND, "a journal data directory reached {} MiB, over {} MiB", max_disk >> 20, DISK_BOUND >> 20);
    for n in &c.nodes {
        let log = std::fs::read_to_string(&n.log).unwrap();
        assert!(log.contains("enough record bytes since the last"), "node {} never built a snapshot by bytes", n.id);
    }
    // The records kept are all there.
    let kept = read_all(&client, S).await;
    assert_eq!(kept.first().map(|r| r.0), Some(RECORDS - 7));
    assert_eq!(kept.last().map(|r| r.0), Some(RECORDS));
}
