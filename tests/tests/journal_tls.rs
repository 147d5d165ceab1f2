//! Who may talk to the journal (journal/src/tls.rs), end to end with real
//! processes: every journal port is mutual TLS, so
//! - a client without a certificate (plaintext, or TLS showing none) and a
//!   client whose certificate is of another CA are refused in the
//!   handshake, with an error that says so, and nothing is appended;
//! - a plaintext connection to a journal port never gets an HTTP/2 answer;
//! - a client's certificate of the CA cannot call the Raft service (only a
//!   journal node's can);
//! - the forged append of issue 16 (`keel-journal ctl append shard-1
//!   --leader <the primary's uuid>` from anyone who reaches a port) fails,
//!   and the deployment keeps its primary;
//! - a journal node refuses to start without TLS files or `--insecure`, or
//!   with files it should not use (a client-only certificate, a key open to
//!   others, a missing file);
//! - `--insecure` still runs a plaintext journal when asked.

use std::io::Read as _;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;
use std::process::Stdio;
use std::time::Duration;

use keel_journal::client::ClientConfig;
use keel_journal::client::JournalClient;
use keel_journal::client::JournalError;
use keel_journal::tls::JournalTls;
use keel_journal::tls::TlsChoice;
use keel_journal::tls::TlsPaths;
use keel_tests::JournalCluster;
use keel_tests::KeelCluster;
use keel_tests::Resp;
use keel_tests::Server;
use keel_tests::bin;
use keel_tests::new_uuid;
use keel_tests::read_all;

const S: &str = "tls-stream";

/// A client of `c`'s nodes with identity `tls`, giving up after 2 s.
fn client_as(c: &JournalCluster, tls: JournalTls) -> JournalClient {
    let cfg = ClientConfig { retry_for: Duration::from_secs(2), tls, ..Default::default() };
    JournalClient::new(c.nodes.iter().map(|n| n.addr.clone()).collect(), cfg).unwrap()
}

/// Runs `keel-journal <args>` with `stdin`; (exit code, stdout, stderr).
fn journal_cmd(args: &[&str], stdin: &[u8]) -> (i32, String, String) {
    let mut child = Command::new(bin("keel-journal"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
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

/// Certificates of another deployment's CA, in `root/other-ca`.
fn other_ca(root: &Path) -> std::path::PathBuf {
    let dir = root.join("other-ca");
    keel_journal::tls::issue(&dir, &["intruder".into(), "journal-1".into(), "ctl".into()], &[]).unwrap();
    dir
}

/// Refused and known not to be applied, saying `says` (any case).
fn assert_refused(e: &JournalError, says: &str) {
    assert!(matches!(e, JournalError::Unavailable(_)), "refused, not applied: {e:?}");
    assert!(e.to_string().to_lowercase().contains(&says.to_lowercase()), "wanted {says:?} in: {e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_a_certificate_of_the_ca_are_refused() {
    let c = JournalCluster::start(3).await;
    let tls_dir = c.tls_dir.clone().unwrap();
    let leader = new_uuid();
    let ok = c.client();
    ok.set_leader(S, &leader, "").await.unwrap();
    assert_eq!(ok.append(S, &leader, vec![b"one".to_vec()], None).await.unwrap(), 1);

    // Plaintext: the node answers the HTTP/2 preface with a TLS alert and
    // closes; the client reads the alert as a malformed frame, or finds the
    // connection closed.
    let plain = client_as(&c, JournalTls::Off);
    let e = plain.append(S, &leader, vec![b"plain".to_vec()], None).await.unwrap_err();
    assert_refused(&e, "serves TLS");
    assert!(plain.stream_info(S).await.is_err(), "a plaintext read was answered");

    // TLS that checks the node but shows no certificate.
    let anonymous = client_as(&c, JournalTls::anonymous(&tls_dir.join("ca.pem")).unwrap());
    let e = anonymous.append(S, &leader, vec![b"anonymous".to_vec()], None).await.unwrap_err();
    assert_refused(&e, "certificate");
    assert!(anonymous.stream_info(S).await.is_err(), "a read without a certificate was answered");

    // A certificate of another CA (the client trusts both CAs, so it does
    // talk to the node; the node trusts only its own).
    let other = other_ca(c.dir.path());
    let both = c.dir.path().join("both-cas.pem");
    let mut bundle = std::fs::read(tls_dir.join("ca.pem")).unwrap();
    bundle.extend(std::fs::read(other.join("ca.pem")).unwrap());
    std::fs::write(&both, bundle).unwrap();
    let foreign = JournalTls::load(&TlsChoice::Files(TlsPaths {
        ca: both,
        cert: other.join("intruder.pem"),
        key: other.join("intruder.key"),
    }))
    .unwrap();
    let foreign = client_as(&c, foreign);
    let e = foreign.append(S, &leader, vec![b"foreign".to_vec()], None).await.unwrap_err();
    assert_refused(&e, "certificate");
    assert!(foreign.stream_info(S).await.is_err(), "a read with another CA's certificate was answered");

    // A client that trusts only the other CA refuses the nodes.
    let wrong_root = JournalTls::load(&TlsChoice::Files(TlsPaths::in_dir(&other, "intruder"))).unwrap();
    let e = client_as(&c, wrong_root).append(S, &leader, vec![b"x".to_vec()], None).await.unwrap_err();
    assert_refused(&e, "invalid peer certificate");

    // keel-journal ctl: no TLS settings is a configuration error; plaintext
    // and another CA's certificates are refused.
    let eps = c.endpoints();
    let (code, _, err) = journal_cmd(&["ctl", "--endpoints", &eps, "append", S, "--leader", &leader], b"ctl");
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--ca") && err.contains("--insecure"), "{err}");
    let (code, _, err) = journal_cmd(&["ctl", "--endpoints", &eps, "--insecure", "append", S, "--leader", &leader], b"ctl");
    assert_eq!(code, 5, "plaintext ctl: {err}");
    assert!(err.contains("serves TLS"), "{err}");
    let other_dir = other.display().to_string();
    let (code, _, err) = journal_cmd(&["ctl", "--endpoints", &eps, "--tls-dir", &other_dir, "status"], b"");
    assert_ne!(code, 0, "status with another CA's certificate: {err}");

    // A certificate of the CA that is not a journal node's cannot speak
    // the Raft service (a vote for a made-up term, here).
    let endpoint = tonic::transport::Channel::from_shared(format!("https://{}", c.nodes[0].addr))
        .unwrap()
        .tls_config(c.tls().client_config().unwrap())
        .unwrap();
    let mut raft = keel_proto::journal::raft_client::RaftClient::new(endpoint.connect().await.unwrap());
    let status = raft.vote(keel_proto::journal::RaftMessage { data: vec![0x80].into() }).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status}");

    // Nothing of theirs was appended; the deployment's own client works.
    let records = read_all(&ok, S).await;
    assert_eq!(records, vec![(1, b"one".to_vec())]);
    let tls_args = c.ctl_tls_args();
    let mut args = vec!["ctl", "--endpoints", &eps];
    args.extend(tls_args.iter().map(|a| a.as_str()));
    args.extend(["append", S, "--leader", &leader]);
    let (code, out, err) = journal_cmd(&args, b"two");
    assert_eq!((code, out.trim()), (0, "2"), "{err}");
}

/// Raw TCP: HTTP/2's preface to a TLS port gets a TLS alert (or the
/// connection closed), never an HTTP/2 SETTINGS frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_http2_to_a_journal_port_is_refused() {
    let c = JournalCluster::start(1).await;
    let mut s = std::net::TcpStream::connect(&c.nodes[0].addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00").unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    // A TLS record of type alert (21), or nothing.
    assert!(got.is_empty() || got[0] == 0x15, "a plaintext HTTP/2 client got {got:02x?}");
    // An HTTP/2 SETTINGS frame would carry type 4 at byte 3.
    assert!(got.len() < 9 || got[3] != 0x04 || got[0] == 0x15);
}

/// Issue 16's forged append: anyone who reaches a journal port runs `ctl
/// append shard-1 --leader <uuid>` with the primary's uuid. Without a
/// certificate of the deployment's CA it is refused; the primary keeps
/// serving and nothing forged reaches the journal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_forged_append_is_refused_and_the_primary_stays() {
    let c = KeelCluster::start(Server::Redis, 3, 2, 1000).await;
    let client = c.journal.client();
    let uuid = client.stream_info("shard-1").await.unwrap().leader_uuid;
    assert!(!uuid.is_empty());
    let eps = c.journal.endpoints();
    let forged = b"*3\r\n$3\r\nSET\r\n$6\r\nforged\r\n$1\r\n1\r\n";
    for extra in [vec![], vec!["--insecure"]] {
        let mut args = vec!["ctl", "--endpoints", &eps];
        args.extend(extra.iter().copied());
        args.extend(["append", "shard-1", "--leader", &uuid]);
        let (code, out, err) = journal_cmd(&args, forged);
        assert_ne!(code, 0, "the forged append {extra:?} was accepted: {out}");
        let want = if extra.is_empty() { (2, "--insecure") } else { (5, "serves TLS") };
        assert_eq!(code, want.0, "{extra:?}: {err}");
        assert!(err.contains(want.1), "{extra:?}: {err}");
    }
    // The primary still leads with the same uuid and acknowledges writes.
    assert_eq!(c.primaries(), vec![0]);
    assert_eq!(client.stream_info("shard-1").await.unwrap().leader_uuid, uuid);
    let mut r = Resp::connect(&c.nodes[0].addr());
    assert_eq!(r.cmd(&["SET", "after", "1"]), "+OK");
    assert!(!read_all(&client, "shard-1").await.iter().any(|(_, p)| p.windows(6).any(|w| w == b"forged")));
    assert_eq!(Resp::connect(&c.nodes[0].addr()).cmd(&["GET", "forged"]), "(nil)");
}

#[test]
fn a_journal_node_refuses_to_start_without_sound_tls_files() {
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("tls");
    keel_journal::tls::issue(&tls, &["journal-1".into(), "ctl".into()], &[]).unwrap();
    let data = dir.path().join("data").display().to_string();
    let serve = |extra: &[&str]| {
        let mut args = vec!["serve", "--node-id", "1", "--listen", "127.0.0.1:1", "--data", &data, "--peers", "1=127.0.0.1:1"];
        args.extend(extra);
        journal_cmd(&args, b"")
    };
    let p = |name: &str| tls.join(name).display().to_string();
    let (ca, cert, key) = (p("ca.pem"), p("journal-1.pem"), p("journal-1.key"));
    for (extra, says) in [
        (vec![], "--insecure"),
        (vec!["--ca", &ca, "--cert", &cert], "missing: --key"),
        (vec!["--ca", &ca, "--cert", &p("ctl.pem"), "--key", &p("ctl.key")], "cannot serve the journal"),
        (vec!["--ca", &ca, "--cert", &cert, "--key", &p("nope.key")], "cannot read the private key"),
        (vec!["--ca", &ca, "--cert", &cert, "--key", &p("ctl.key")], "does not belong"),
        (vec!["--insecure", "--tls-dir", &p("")], "contradicts"),
    ] {
        let (code, _, err) = serve(&extra);
        assert_eq!(code, 2, "{extra:?}: {err}");
        assert!(err.contains(says), "{extra:?}: wanted {says:?} in {err}");
    }
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, _, err) = serve(&["--tls-dir", &tls.display().to_string()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("chmod 600"), "{err}");
    // Every file `issue` made is its owner's only.
    for e in std::fs::read_dir(&tls).unwrap() {
        let e = e.unwrap();
        let mode = e.metadata().unwrap().permissions().mode() & 0o777;
        let name = e.file_name().to_string_lossy().into_owned();
        assert!(mode == 0o600 || name == "journal-1.key", "{name}: mode {mode:o}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insecure_runs_plaintext_when_asked() {
    let c = JournalCluster::start_with(3, &["--insecure"]).await;
    assert!(c.tls_dir.is_none());
    let client = client_as(&c, JournalTls::Off);
    let leader = new_uuid();
    client.set_leader(S, &leader, "").await.unwrap();
    assert_eq!(client.append(S, &leader, vec![b"p".to_vec()], None).await.unwrap(), 1);
    let log = std::fs::read_to_string(&c.nodes[0].log).unwrap();
    assert!(log.contains("INSECURE"), "an insecure node says so in its log");
}
