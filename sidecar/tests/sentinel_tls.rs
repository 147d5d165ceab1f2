//! The discovery endpoint over TLS with a password, on a real socket, with
//! certificates `keel-journal certs` would make (a CA and `redis-0`): a TLS
//! client that trusts the CA is answered once it gives the password and
//! told `NOAUTH` before; a plaintext client, and a TLS client that trusts
//! another CA, get nothing; a client stalled in its handshake holds up
//! nobody and is dropped after `TLS_HANDSHAKE_TIMEOUT_MS`; a key file open
//! to others is refused at start.

use std::os::unix::fs::OpenOptionsExt as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use keel_sidecar::resp::encode_command;
use keel_sidecar::sentinel::AccessFlags;
use keel_sidecar::sentinel::Addr;
use keel_sidecar::sentinel::NOAUTH;
use keel_sidecar::sentinel::TLS_HANDSHAKE_TIMEOUT_MS;
use keel_sidecar::sentinel::View;
use keel_sidecar::sentinel::WRONGPASS;
use keel_sidecar::sentinel::serve_with;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::ServerName;
use rustls::pki_types::pem::PemObject as _;
use tokio::io::AsyncBufReadExt;
use tokio::io::AsyncRead;
use tokio::io::AsyncReadExt;
use tokio::io::AsyncWrite;
use tokio::io::AsyncWriteExt;
use tokio::io::BufReader;
use tokio::net::TcpListener;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::TlsConnector;

const PASSWORD: &str = "correct horse battery staple";
/// How long a reply may take.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Writes `dir/<name>` with mode 0600.
fn write_private(dir: &Path, name: &str, contents: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path).unwrap();
    std::io::Write::write_all(&mut f, contents.as_bytes()).unwrap();
    path
}

fn connector(ca: &Path) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

async fn tls_client(at: std::net::SocketAddr, ca: &Path) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(at).await?;
    connector(ca).connect(ServerName::try_from("localhost").unwrap(), tcp).await
}

/// One RESP2 reply, flattened: `+OK`, `-ERR ...`, `:1`, `$text`, `$nil`,
/// `[a,b]`.
async fn reply<S: AsyncRead + Unpin>(r: &mut BufReader<S>) -> String {
    let mut line = String::new();
    let n = tokio::time::timeout(REPLY_TIMEOUT, r.read_line(&mut line)).await.expect("a reply in time").expect("read");
    assert!(n > 0, "connection closed before a reply");
    let line = line.trim_end_matches("\r\n").to_string();
    let (kind, rest) = line.split_at(1);
    match kind {
        "+" | "-" | ":" => line,
        "$" if rest == "-1" => "$nil".into(),
        "$" => {
            let mut b = vec![0u8; rest.parse::<usize>().unwrap() + 2];
            r.read_exact(&mut b).await.unwrap();
            format!("${}", String::from_utf8_lossy(&b[..b.len() - 2]))
        }
        "*" if rest == "-1" => "*nil".into(),
        "*" => {
            let mut items = Vec::new();
            for _ in 0..rest.parse::<usize>().unwrap() {
                items.push(Box::pin(reply(r)).await.trim_start_matches('$').to_string());
            }
            format!("[{}]", items.join(","))
        }
        _ => panic!("not RESP2: {line:?}"),
    }
}

async fn ask<S: AsyncRead + AsyncWrite + Unpin>(c: &mut BufReader<S>, args: &[&str]) -> String {
    let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
    c.get_mut().write_all(&encode_command(&args)).await.unwrap();
    reply(c).await
}

/// Reads until the server closes; what it sent.
async fn until_closed<S: AsyncRead + Unpin>(s: &mut S, within: Duration) -> Vec<u8> {
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Err(_) => panic!("still open after {within:?}; got {:?}", String::from_utf8_lossy(&got)),
            Ok(Ok(0)) | Ok(Err(_)) => return got,
            Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_over_tls_with_a_password() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("tls");
    keel_journal_client::tls::issue(&certs, &["redis-0".into()], &[]).unwrap();
    let other_ca = dir.path().join("other");
    keel_journal_client::tls::issue(&other_ca, &[], &[]).unwrap();
    let flags = AccessFlags {
        tls_cert: Some(certs.join("redis-0.pem")),
        tls_key: Some(certs.join("redis-0.key")),
        password_file: Some(write_private(dir.path(), "sentinel.pw", &format!("{PASSWORD}\n"))),
    };

    // A key open to others is refused at start.
    std::fs::set_permissions(certs.join("redis-0.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = flags.load(true).unwrap_err();
    assert!(e.contains("chmod 600") && e.contains("redis-0.key"), "{e}");
    std::fs::set_permissions(certs.join("redis-0.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let access = flags.load(true).unwrap();
    assert_eq!(access.describe(), "TLS, password required");

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = listener.local_addr().unwrap();
    let view = View { master: Some(Addr { host: "10.0.0.1".into(), port: 6379 }), ..View::default() };
    let (_tx, rx) = watch::channel(view);
    let endpoint = tokio::spawn(serve_with(listener, rx, access));
    let ca = certs.join("ca.pem");

    // A client stalled half-way into its handshake (a TLS record header,
    // then nothing), and one that connected and said nothing.
    let mut stalled = TcpStream::connect(at).await.unwrap();
    stalled.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00]).await.unwrap();
    let mut silent = TcpStream::connect(at).await.unwrap();
    let stalled_since = Instant::now();

    // A TLS client that trusts the CA: NOAUTH until it gives the password.
    let mut c = BufReader::new(tls_client(at, &ca).await.expect("the handshake while another client stalls in its own"));
    assert_eq!(ask(&mut c, &["PING"]).await, format!("-{NOAUTH}"));
    assert_eq!(ask(&mut c, &["SENTINEL", "get-master-addr-by-name", "keel"]).await, format!("-{NOAUTH}"));
    assert_eq!(ask(&mut c, &["AUTH", "wrong"]).await, format!("-{WRONGPASS}"));
    assert_eq!(ask(&mut c, &["AUTH", "default", "wrong"]).await, format!("-{WRONGPASS}"));
    assert_eq!(ask(&mut c, &["AUTH", PASSWORD]).await, "+OK");
    assert_eq!(ask(&mut c, &["PING"]).await, "+PONG");
    assert_eq!(ask(&mut c, &["SENTINEL", "get-master-addr-by-name", "keel"]).await, "[10.0.0.1,6379]");
    let elapsed = stalled_since.elapsed();
    assert!(
        elapsed < Duration::from_millis(TLS_HANDSHAKE_TIMEOUT_MS),
        "answered in {elapsed:?}, before the stalled handshakes could time out"
    );

    // HELLO with AUTH, as clients that speak HELLO do.
    let mut h = BufReader::new(tls_client(at, &ca).await.unwrap());
    assert!(ask(&mut h, &["HELLO", "2"]).await.starts_with("-NOAUTH HELLO"));
    let hello = ask(&mut h, &["HELLO", "2", "AUTH", "default", PASSWORD]).await;
    assert!(hello.contains("mode,sentinel"), "{hello}");
    assert_eq!(ask(&mut h, &["SENTINEL", "get-master-addr-by-name", "keel"]).await, "[10.0.0.1,6379]");
    assert_eq!(ask(&mut h, &["QUIT"]).await, "+OK");

    // A plaintext client is closed without an answer.
    let mut plain = TcpStream::connect(at).await.unwrap();
    plain.write_all(&encode_command(&[b"AUTH", PASSWORD.as_bytes()])).await.unwrap();
    plain.write_all(b"PING\r\n").await.unwrap();
    let got = until_closed(&mut plain, REPLY_TIMEOUT).await;
    let text = String::from_utf8_lossy(&got);
    assert!(!text.contains("+OK") && !text.contains("PONG") && !text.contains("NOAUTH"), "{text:?}");

    // A client that trusts another CA refuses the endpoint.
    let e = tls_client(at, &other_ca.join("ca.pem")).await.expect_err("another CA's client refuses the certificate");
    assert!(e.to_string().contains("UnknownIssuer"), "{e}");

    // The stalled clients are dropped once their handshake time is up.
    let limit = Duration::from_millis(TLS_HANDSHAKE_TIMEOUT_MS) + REPLY_TIMEOUT;
    until_closed(&mut stalled, limit).await;
    until_closed(&mut silent, limit).await;
    assert!(stalled_since.elapsed() >= Duration::from_millis(TLS_HANDSHAKE_TIMEOUT_MS) - Duration::from_millis(100));

    // The first client is still served.
    assert_eq!(ask(&mut c, &["PING"]).await, "+PONG");
    endpoint.abort();
}
