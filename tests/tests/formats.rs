//! Keel's own upgrades: a newer journal and sidecar read everything an
//! older one wrote. `tests/fixtures/format-1/` keeps what the first format
//! wrote, made once by `write_the_format_1_fixture` (ignored: run it only
//! to make a new format's fixture, never to replace an old one):
//! - `journal-node.tar`: the data directory of a single-node journal (Raft
//!   log, state with a Raft snapshot, record segments, a trimmed stream
//!   with metadata), killed with kill -9;
//! - `snapshot-meta.json`: a snapshot's metadata from a real run (read by
//!   the sidecar's unit tests).
//! The test starts today's keel-journal on a copy of that directory and
//! reads every record back, decoded by today's sidecar, and appends after
//! them; and a directory marked with a newer format is refused at start.

use std::path::Path;
use std::process::Command;

use keel_sidecar::record::Kind;
use keel_sidecar::record::Record;
use keel_tests::JournalCluster;
use keel_tests::read_all;

const S: &str = "shard-1";
const LEADER: &str = "6b1f3c52-3f2e-4f7a-9a57-0d7d7b2f8c11";
const FIXTURE: &str = "fixtures/format-1/journal-node.tar";
/// The address the kept node had (its membership names it, and clients
/// follow the membership): outside the kernel's ephemeral ports and the
/// range the harness hands out.
const FIXTURE_ADDR: &str = "127.0.0.1:19877";
/// Records appended, and how many a trim dropped from the front.
const RECORDS: u64 = 60;
const TRIMMED: u64 = 10;
const REPLID: &str = "41390675dfa51c8bc0a5f2b20d2729bc98e2ec3c";

fn fixture() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(FIXTURE)
}

/// The record appended as `seq` (1-based): the base RDB in two chunks and
/// its end, then stream bytes (SETs), with a void and a new base midway.
fn expected(seq: u64) -> Record {
    let set = |i: u64| format!("*3\r\n$3\r\nSET\r\n${}\r\nk{i}\r\n$2\r\nv{}\r\n", format!("k{i}").len(), i % 10).into_bytes();
    // Offsets of the stream: each SET's bytes follow the previous ones.
    let offset_before = |seq: u64| (4..seq).map(|i| set(i).len() as u64).sum::<u64>();
    let r = |kind, start, end, payload: Vec<u8>| Record { kind, replid: REPLID.into(), start, end, payload, writer: None };
    match seq {
        1 => r(Kind::Rdb, 0, 0, b"REDIS0010\xfa\x09redis-ver\x067.0.15".to_vec()),
        2 => r(Kind::Rdb, 0, 0, b"\xff\x00\x01\x02\x03\x04\x05\x06\x07".to_vec()),
        3 => r(Kind::RdbEnd, 0, 0, Vec::new()),
        40 => {
            let at = offset_before(40);
            r(Kind::StreamVoid, at, at, Vec::new())
        }
        seq => {
            let start = offset_before(seq);
            let payload = set(seq);
            r(Kind::Stream, start, start + payload.len() as u64, payload)
        }
    }
}

/// Makes `tests/fixtures/format-1/journal-node.tar` with this release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "makes a format's fixture once; kept fixtures are never rewritten"]
async fn write_the_format_1_fixture() {
    let mut c = JournalCluster::start_with(1, &["--snapshot-every-entries", "20", "--keep-log-entries", "5"]).await;
    c.kill(0);
    std::fs::remove_dir_all(&c.nodes[0].data).unwrap();
    c.move_node(0, FIXTURE_ADDR);
    c.restart(0);
    c.wait_leader().await;
    let client = c.client();
    client.set_leader(S, LEADER, "").await.unwrap();
    for seq in 1..=RECORDS {
        assert_eq!(client.append(S, LEADER, vec![expected(seq).encode()], Some(seq - 1)).await.unwrap(), seq);
        if seq == 50 {
            let meta = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/format-1/snapshot-meta.json")).unwrap();
            client.cas_meta(S, "snapshot", None, meta).await.unwrap();
            assert_eq!(client.trim(S, TRIMMED).await.unwrap(), TRIMMED + 1);
        }
    }
    c.kill(0);
    let data = c.nodes[0].data.clone();
    // The first format's releases wrote no FORMAT file.
    std::fs::remove_file(data.join(keel_journal::format::FILE)).unwrap();
    let status = Command::new("tar").arg("-cf").arg(fixture()).arg("-C").arg(&data).arg(".").status().unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_written_by_format_1_reads_and_continues() {
    let mut c = JournalCluster::start(1).await;
    c.kill(0);
    let data = c.nodes[0].data.clone();
    std::fs::remove_dir_all(&data).unwrap();
    std::fs::create_dir_all(&data).unwrap();
    let status = Command::new("tar").arg("-xf").arg(fixture()).arg("-C").arg(&data).status().unwrap();
    assert!(status.success(), "unpacking {}", fixture().display());
    assert!(!data.join(keel_journal::format::FILE).exists(), "the first format had no FORMAT file");
    assert!(
        std::net::TcpListener::bind(FIXTURE_ADDR).is_ok(),
        "{FIXTURE_ADDR}, the kept node's address, is taken: free it for this test"
    );
    c.move_node(0, FIXTURE_ADDR);
    c.restart(0);
    c.wait_leader().await;
    let client = c.client();

    let info = client.stream_info(S).await.unwrap();
    assert_eq!((info.first_seq, info.last_seq), (TRIMMED + 1, RECORDS));
    assert_eq!(info.leader_uuid, LEADER);
    let got = read_all(&client, S).await;
    assert_eq!(got.len() as u64, RECORDS - TRIMMED);
    for (seq, payload) in got {
        assert_eq!(Record::decode(&payload).unwrap(), expected(seq), "record {seq}");
    }
    let meta = client.get_meta(S, "snapshot").await.unwrap().expect("the snapshot meta is kept");
    let meta = keel_sidecar::snapshot::SnapshotMeta::decode(&meta).unwrap();
    assert_eq!((meta.format, meta.seq), (1, 1432));

    // The stream goes on where it was; the directory now names its format.
    let next = expected(RECORDS + 1).encode();
    assert_eq!(client.append(S, LEADER, vec![next], Some(RECORDS)).await.unwrap(), RECORDS + 1);
    assert_eq!(
        keel_journal::format::parse(&std::fs::read_to_string(data.join(keel_journal::format::FILE)).unwrap()),
        Ok(keel_journal::format::DATA_FORMAT)
    );

    // A directory marked with a newer format is refused at start, with the
    // reason, and left as it was.
    c.kill(0);
    std::fs::write(data.join(keel_journal::format::FILE), keel_journal::format::text(keel_journal::format::DATA_FORMAT + 1)).unwrap();
    let out = Command::new(keel_tests::bin("keel-journal"))
        .args(["serve", "--node-id", "1", "--listen", "127.0.0.1:1", "--peers", "1=127.0.0.1:1", "--insecure", "--data"])
        .arg(&data)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a newer format was opened: {err}");
    assert!(err.contains("newer keel-journal"), "{err}");
}
