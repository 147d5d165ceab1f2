//! Bad input on every listener, with real processes: the journal's gRPC
//! port, the sidecar's discovery endpoint, the sidecar's replica feed, and
//! the module's commands. Generated inputs (proptest, a bounded number of
//! cases each) of arbitrary bytes, arbitrary RESP and arbitrary arguments;
//! for every one:
//! - no panic, no crash, no hang: every read has a deadline, and each input
//!   gets an answer (an error) or a closed connection within it;
//! - nothing lost: what was acknowledged before the barrage is still there
//!   afterwards (a journal record, a Redis key), and the listener still does
//!   its job (a new append, `SENTINEL get-master-addr-by-name`, a write that
//!   reaches the replica through the feed, the same replies as stock Redis).
//!
//! Per listener:
//! 1. journal: bytes that are not gRPC (junk, HTTP/1, a cut HTTP/2 preface,
//!    junk frames) are closed; gRPC calls of every method with arbitrary
//!    bytes as the message are answered; well-formed calls with odd fields
//!    (stream names empty, over the limit, unknown; wrong writer uuids; seqs
//!    up to u64::MAX; records empty or over the limit) are answered, and
//!    refused where they name the kept stream with a wrong writer;
//! 2. discovery: arbitrary bytes, RESP arrays, inline lines and malformed
//!    RESP get whole RESP2 replies and a close;
//! 3. replica feed: arbitrary bytes, handshake commands and PSYNCs with
//!    junk ids and offsets get status or error lines and a close, never a
//!    sync: the replica being fed keeps the feed;
//! 4. module: data commands with arbitrary arguments, alone and in MULTI,
//!    get the reply a stock redis-server gives to the same commands (an
//!    error where it errs); the module's commands with anything as
//!    arguments from the default user answer, the sidecar's `NOPERM`, and
//!    none runs a role or control command it is handed; the node stays the
//!    primary.
//!
//! The tests start deployments of their own and share two cores with the
//! rest of the suite, so they run one at a time.

use std::io::BufRead;
use std::io::Read;
use std::io::Write;
use std::net::Shutdown;
use std::net::TcpStream;
use std::path::Path;
use std::process::Child;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;

use keel_tests::JournalCluster;
use keel_tests::KeelCluster;
use keel_tests::KeelPrimary;
use keel_tests::control_secret_of;
use keel_tests::Server;
use keel_tests::free_port;
use keel_tests::new_uuid;
use keel_tests::read_all;
use proptest::prelude::*;
use proptest::test_runner::Config;
use proptest::test_runner::TestRunner;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// How long one input may take to be answered or closed.
const ANSWER_WITHIN: Duration = Duration::from_secs(15);

/// A proptest runner for `cases` inputs against live processes: no
/// regression files, and little shrinking (each try costs round trips).
fn runner(cases: u32) -> TestRunner {
    TestRunner::new(Config { cases, failure_persistence: None, max_shrink_iters: 24, ..Config::default() })
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..max)
}

/// Fails if a process has exited.
fn assert_running(child: &mut Option<Child>, what: &str, log: &Path) {
    let c = child.as_mut().unwrap_or_else(|| panic!("{what} is not running"));
    if let Ok(Some(status)) = c.try_wait() {
        panic!("{what} exited ({status}); see {}", log.display());
    }
}

/// Fails if a log shows a Rust panic or a Redis crash report.
fn assert_no_panic(log: &Path) {
    let text = String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default()).into_owned();
    for sign in ["panicked at", "REDIS BUG REPORT", "crashed by signal", "Guru Meditation"] {
        assert!(!text.contains(sign), "{} shows {sign:?}", log.display());
    }
}

/// What became of a connection after the input: what the server sent, and
/// whether it closed (EOF or reset) before `ANSWER_WITHIN`.
struct Outcome {
    received: Vec<u8>,
    closed: bool,
}

/// Connects, sends `input` (a server that closes early may refuse the
/// rest), closes the sending side, and reads until the server closes, for
/// at most `ANSWER_WITHIN`.
fn send_and_close(addr: &str, input: &[u8]) -> Outcome {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    s.set_write_timeout(Some(ANSWER_WITHIN)).unwrap();
    let _ = s.write_all(input);
    let _ = s.shutdown(Shutdown::Write);
    let deadline = Instant::now() + ANSWER_WITHIN;
    let mut received = Vec::new();
    let mut chunk = [0u8; 16 << 10];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => return Outcome { received, closed: true },
            Ok(n) => received.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return Outcome { received, closed: true },
        }
        if Instant::now() > deadline {
            return Outcome { received, closed: false };
        }
    }
}

fn show(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(&b[..b.len().min(100)]).into_owned();
    if b.len() > 100 { format!("{s}… ({} bytes)", b.len()) } else { s }
}

// ---------------------------------------------------------------------------
// RESP

/// A RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reply {
    Simple(Vec<u8>),
    Error(Vec<u8>),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

impl Reply {
    fn is_error(&self) -> bool {
        matches!(self, Reply::Error(_))
    }

    fn error_text(&self) -> String {
        match self {
            Reply::Error(e) => String::from_utf8_lossy(e).into_owned(),
            _ => String::new(),
        }
    }

    /// The reply with every error, nested ones too, reduced to its kind:
    /// error texts of a command run through the module may be worded by a
    /// different layer of Redis than a stock server's.
    fn errors_as_kinds(&self) -> Reply {
        match self {
            Reply::Error(_) => Reply::Error(b"E".to_vec()),
            Reply::Array(Some(items)) => Reply::Array(Some(items.iter().map(Reply::errors_as_kinds).collect())),
            other => other.clone(),
        }
    }
}

/// One reply at the front of `b`: `Ok(Some((reply, used)))`, `Ok(None)` if
/// incomplete, `Err` if it is not RESP2.
fn parse_reply(b: &[u8]) -> Result<Option<(Reply, usize)>, String> {
    let Some(&kind) = b.first() else { return Ok(None) };
    let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else { return Ok(None) };
    let head = &b[1..eol];
    let mut at = eol + 2;
    let num = || -> Result<i64, String> {
        std::str::from_utf8(head).ok().and_then(|s| s.parse().ok()).ok_or_else(|| format!("bad length {:?}", show(head)))
    };
    let r = match kind {
        b'+' => Reply::Simple(head.to_vec()),
        b'-' => Reply::Error(head.to_vec()),
        b':' => Reply::Int(num()?),
        b'$' => match num()? {
            n if n < 0 => Reply::Bulk(None),
            n => {
                let n = n as usize;
                if b.len() < at + n + 2 {
                    return Ok(None);
                }
                if &b[at + n..at + n + 2] != b"\r\n" {
                    return Err("bulk not followed by CRLF".into());
                }
                let v = b[at..at + n].to_vec();
                at += n + 2;
                Reply::Bulk(Some(v))
            }
        },
        b'*' => match num()? {
            n if n < 0 => Reply::Array(None),
            n => {
                let mut items = Vec::new();
                for _ in 0..n {
                    let Some((item, used)) = parse_reply(&b[at..])? else { return Ok(None) };
                    items.push(item);
                    at += used;
                }
                Reply::Array(Some(items))
            }
        },
        other => return Err(format!("not a RESP2 reply type: {:?}", other as char)),
    };
    Ok(Some((r, at)))
}

/// Every reply in `b`, which must hold whole RESP2 replies only.
fn parse_all(mut b: &[u8]) -> Result<Vec<Reply>, String> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let Some((r, used)) = parse_reply(b)? else { return Err(format!("a truncated reply: {:?}", show(b))) };
        out.push(r);
        b = &b[used..];
    }
    Ok(out)
}

fn encode(args: &[Vec<u8>]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn words(w: &[&str]) -> Vec<Vec<u8>> {
    w.iter().map(|s| s.as_bytes().to_vec()).collect()
}

/// A RESP2 connection with binary arguments; every read has a deadline.
struct Conn {
    r: std::io::BufReader<TcpStream>,
    addr: String,
}

impl Conn {
    fn connect(addr: &str) -> Conn {
        let s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(ANSWER_WITHIN)).unwrap();
        Conn { r: std::io::BufReader::new(s), addr: addr.into() }
    }

    fn call(&mut self, args: &[Vec<u8>]) -> Reply {
        self.r.get_mut().write_all(&encode(args)).unwrap_or_else(|e| panic!("sending to {}: {e}", self.addr));
        self.read().unwrap_or_else(|e| panic!("{} gave no reply to {:?} within {ANSWER_WITHIN:?}: {e}", self.addr, show_args(args)))
    }

    fn read(&mut self) -> std::io::Result<Reply> {
        let mut line = Vec::new();
        if self.r.read_until(b'\n', &mut line)? == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed"));
        }
        let Some(head) = line.strip_suffix(b"\r\n") else {
            return Err(std::io::Error::other(format!("a reply line without CRLF: {:?}", show(&line))));
        };
        let (kind, rest) = (head.first().copied().unwrap_or(b'?'), head.get(1..).unwrap_or_default());
        let num = || -> std::io::Result<i64> {
            std::str::from_utf8(rest).ok().and_then(|s| s.parse().ok()).ok_or_else(|| std::io::Error::other(format!("bad number {:?}", show(rest))))
        };
        Ok(match kind {
            b'+' => Reply::Simple(rest.to_vec()),
            b'-' => Reply::Error(rest.to_vec()),
            b':' => Reply::Int(num()?),
            b'$' => match num()? {
                n if n < 0 => Reply::Bulk(None),
                n => {
                    let mut body = vec![0u8; n as usize + 2];
                    self.r.read_exact(&mut body)?;
                    body.truncate(n as usize);
                    Reply::Bulk(Some(body))
                }
            },
            b'*' => match num()? {
                n if n < 0 => Reply::Array(None),
                n => Reply::Array(Some((0..n).map(|_| self.read()).collect::<std::io::Result<_>>()?)),
            },
            other => return Err(std::io::Error::other(format!("not a RESP2 reply type: {:?}", other as char))),
        })
    }
}

fn show_args(args: &[Vec<u8>]) -> Vec<String> {
    args.iter().take(8).map(|a| show(a)).collect()
}

// ---------------------------------------------------------------------------
// 1. The journal's gRPC port

/// The gRPC methods of both services (`proto/journal.proto`), and paths
/// that name none.
const GRPC_PATHS: &[&str] = &[
    "/keel.journal.v1.Journal/Append",
    "/keel.journal.v1.Journal/AppendStream",
    "/keel.journal.v1.Journal/SetLeader",
    "/keel.journal.v1.Journal/TakeLease",
    "/keel.journal.v1.Journal/RenewLease",
    "/keel.journal.v1.Journal/Read",
    "/keel.journal.v1.Journal/Trim",
    "/keel.journal.v1.Journal/GetMeta",
    "/keel.journal.v1.Journal/CasMeta",
    "/keel.journal.v1.Journal/StreamInfo",
    "/keel.journal.v1.Journal/Status",
    "/keel.journal.v1.Raft/Vote",
    "/keel.journal.v1.Raft/AppendEntries",
    "/keel.journal.v1.Raft/InstallSnapshot",
    "/keel.journal.v1.Raft/StreamAppend",
    "/keel.journal.v1.Journal/NoSuchMethod",
    "/no.such.Service/Append",
    "/",
];

/// Sends and receives message bodies as they are: a gRPC call whose
/// protobuf body is arbitrary bytes.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let n = bytes::Buf::remaining(src);
        Ok(Some(bytes::Buf::copy_to_bytes(src, n).to_vec()))
    }
}

/// One gRPC call of `path` with `body` as its message (a one-message
/// stream for the streaming methods) over plain HTTP/2; returns once the
/// first answer (a message, an error, or the connection refused or closed)
/// is in. `Err` only when nothing came in time.
async fn raw_grpc(addr: &str, path: &str, body: Vec<u8>) -> Result<String, String> {
    let call = async {
        let channel = match tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await {
            Ok(c) => c,
            Err(e) => return format!("connection refused or closed: {e}"),
        };
        let mut grpc = tonic::client::Grpc::new(channel);
        if let Err(e) = grpc.ready().await {
            return format!("connection closed: {e}");
        }
        let path: tonic::codegen::http::uri::PathAndQuery = path.parse().unwrap();
        let mut req = tonic::Request::new(futures::stream::iter(vec![body]));
        req.set_timeout(Duration::from_secs(5));
        match grpc.streaming(req, path, RawCodec).await {
            Err(status) => format!("error {:?}: {}", status.code(), status.message()),
            Ok(resp) => match resp.into_inner().message().await {
                Ok(m) => format!("a message of {} bytes", m.map_or(0, |m| m.len())),
                Err(status) => format!("error {:?}: {}", status.code(), status.message()),
            },
        }
    };
    tokio::time::timeout(ANSWER_WITHIN, call).await.map_err(|_| format!("no answer to {path} within {ANSWER_WITHIN:?}"))
}

/// Inputs that are not gRPC: junk, HTTP/1, a cut HTTP/2 preface, and a
/// whole preface followed by junk frames.
fn not_grpc() -> impl Strategy<Value = Vec<u8>> {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    prop_oneof![
        bytes(600),
        (1..PREFACE.len()).prop_map(|n| PREFACE[..n].to_vec()),
        bytes(600).prop_map(|junk| [PREFACE, &junk].concat()),
        // A frame header (length, type, flags, stream id) of any values.
        (any::<[u8; 9]>(), bytes(64)).prop_map(|(head, body)| [PREFACE, &head, &body].concat()),
        // A SETTINGS frame, then junk.
        bytes(200).prop_map(|junk| [PREFACE, &[0, 0, 0, 4, 0, 0, 0, 0, 0], &junk].concat()),
        Just(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        Just(b"*1\r\n$4\r\nPING\r\n".to_vec()),
    ]
}

/// Stream names: empty, over the 256-byte limit, odd characters, and
/// names of streams that do not exist.
fn stream_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[a-z]{257,300}",
        "\\PC{1,12}",
        "[\\x00-\\x1f/\\\\ .]{1,8}",
        "[a-z0-9-]{1,20}",
    ]
}

/// Leader uuids: the stream's leader never; other uuids, junk, empty.
fn wrong_uuid() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
        "\\PC{0,40}",
        "[0-9a-f-]{36}",
    ]
}

fn seq() -> impl Strategy<Value = u64> {
    prop_oneof![Just(0), Just(u64::MAX), Just(u64::MAX - 1), Just(1u64 << 63), 0u64..10, any::<u64>()]
}

fn records() -> impl Strategy<Value = Vec<Vec<u8>>> {
    prop_oneof![
        Just(Vec::new()),
        Just(vec![Vec::new()]),
        proptest::collection::vec(bytes(40), 1..4),
        // One record over the 1 MiB record limit.
        Just(vec![vec![7u8; (1 << 20) + 1]]),
    ]
}

/// A well-formed call with field values of any kind. Calls on `KEPT`, the
/// stream whose record must survive, are the ones its leader would refuse
/// or that change nothing; other streams may be created or trimmed.
#[derive(Debug, Clone)]
enum Call {
    Append { stream: Option<String>, leader: String, records: Vec<Vec<u8>>, expect: Option<u64> },
    SetLeader { stream: Option<String>, new: String, expected_old: String },
    TakeLease { stream: Option<String>, candidate: String, caught_up: u64, lease_ms: u64 },
    RenewLease { stream: Option<String>, uuid: String },
    Read { stream: Option<String>, from: u64 },
    Trim { stream: String, upto: u64 },
    GetMeta { stream: Option<String>, key: String },
    CasMeta { stream: String, key: String, expected: Option<Vec<u8>>, value: Vec<u8> },
    StreamInfo { stream: Option<String> },
}

const KEPT: &str = "bad-input-kept";

fn call() -> impl Strategy<Value = Call> {
    // None: the kept stream.
    let on = || prop_oneof![1 => Just(None), 2 => stream_name().prop_map(Some)];
    let key = prop_oneof![Just(String::new()), "[a-z]{257,270}", "\\PC{1,10}"];
    prop_oneof![
        (on(), wrong_uuid(), records(), proptest::option::of(seq()))
            .prop_map(|(stream, leader, records, expect)| Call::Append { stream, leader, records, expect }),
        (on(), wrong_uuid(), wrong_uuid()).prop_map(|(stream, new, expected_old)| Call::SetLeader { stream, new, expected_old }),
        (on(), wrong_uuid(), seq(), prop_oneof![Just(0u64), Just(u64::MAX), 1u64..100_000])
            .prop_map(|(stream, candidate, caught_up, lease_ms)| Call::TakeLease { stream, candidate, caught_up, lease_ms }),
        (on(), wrong_uuid()).prop_map(|(stream, uuid)| Call::RenewLease { stream, uuid }),
        (on(), seq()).prop_map(|(stream, from)| Call::Read { stream, from }),
        (stream_name(), seq()).prop_map(|(stream, upto)| Call::Trim { stream, upto }),
        (on(), key.clone()).prop_map(|(stream, key)| Call::GetMeta { stream, key }),
        (stream_name(), key, proptest::option::of(bytes(16)), prop_oneof![bytes(16), Just(vec![1u8; (64 << 10) + 1])])
            .prop_map(|(stream, key, expected, value)| Call::CasMeta { stream, key, expected, value }),
        on().prop_map(|stream| Call::StreamInfo { stream }),
    ]
}

/// Runs `c` through the harness's client; `Err` when no answer came in time.
async fn run_call(client: &keel_journal::client::JournalClient, c: &Call) -> Result<String, String> {
    let kept = |s: &Option<String>| s.clone().unwrap_or_else(|| KEPT.to_string());
    let fut = async {
        let r: Result<String, keel_journal::client::JournalError> = match c {
            Call::Append { stream, leader, records, expect } => {
                client.append(&kept(stream), leader, records.clone(), *expect).await.map(|s| format!("appended at {s}"))
            }
            Call::SetLeader { stream, new, expected_old } => client.set_leader(&kept(stream), new, expected_old).await,
            Call::TakeLease { stream, candidate, caught_up, lease_ms } => {
                // On the kept stream only as a candidate that is not caught up.
                let caught_up = if stream.is_none() { 0 } else { *caught_up };
                client.take_lease(&kept(stream), candidate, caught_up, *lease_ms).await.map(|l| format!("{l:?}"))
            }
            Call::RenewLease { stream, uuid } => client.renew_lease(&kept(stream), uuid).await.map(|l| format!("{l:?}")),
            Call::Read { stream, from } => {
                let mut reader = client.read(&kept(stream), *from, false);
                reader.next_batch().await.map(|b| format!("{} records", b.map_or(0, |b| b.len())))
            }
            Call::Trim { stream, upto } => client.trim(stream, *upto).await.map(|f| format!("first seq {f}")),
            Call::GetMeta { stream, key } => client.get_meta(&kept(stream), key).await.map(|v| format!("{v:?}")),
            Call::CasMeta { stream, key, expected, value } => {
                client.cas_meta(stream, key, expected.clone(), value.clone()).await.map(|_| "set".into())
            }
            Call::StreamInfo { stream } => client.stream_info(&kept(stream)).await.map(|i| format!("{i:?}")),
        };
        r.map_err(|e| format!("{}: {e}", e.kind()))
    };
    match tokio::time::timeout(Duration::from_secs(40), fut).await {
        Ok(Ok(ok)) => Ok(format!("ok: {ok}")),
        Ok(Err(e)) => Ok(format!("refused: {e}")),
        Err(_) => Err(format!("{c:?}: no answer within 40 s")),
    }
}

/// The journal must refuse these calls (they name the kept stream with a
/// wrong writer, or are invalid wherever they go).
fn must_be_refused(c: &Call) -> bool {
    match c {
        Call::Append { stream: None, .. } | Call::RenewLease { stream: None, .. } | Call::TakeLease { stream: None, .. } => true,
        Call::SetLeader { stream: None, .. } => true,
        Call::Append { records, .. } => records.is_empty() || records.iter().any(|r| r.is_empty() || r.len() > 1 << 20),
        _ => false,
    }
}

fn journal_alive(cluster: &mut JournalCluster) {
    for i in 0..cluster.nodes.len() {
        let (log, what) = (cluster.nodes[i].log.clone(), format!("journal node {}", cluster.nodes[i].id));
        assert_running(&mut cluster.nodes[i].child, &what, &log);
        assert_no_panic(&log);
    }
}

#[test]
fn the_journal_port_survives_bad_input() {
    let _serial = serial();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut cluster = rt.block_on(JournalCluster::start(3));
    let client = cluster.client();
    let leader = new_uuid();
    let record = b"acknowledged before the barrage".to_vec();
    let kept_seq = rt.block_on(async {
        client.set_leader(KEPT, &leader, "").await.expect("set-leader");
        client.append(KEPT, &leader, vec![record.clone()], None).await.expect("append")
    });
    let addrs: Vec<String> = cluster.nodes.iter().map(|n| n.addr.clone()).collect();
    // A leader is elected by two nodes; the third may still be starting.
    for a in &addrs {
        wait_until(Duration::from_secs(30), &format!("journal node {a} listens"), || TcpStream::connect(a).is_ok());
    }
    let started = Instant::now();

    // Bytes that are not gRPC: an error or a close, never a wait.
    runner(300)
        .run(&(not_grpc(), 0..addrs.len()), |(input, node)| {
            let out = send_and_close(&addrs[node], &input);
            prop_assert!(out.closed, "node {node} kept the connection open after {:?} (sent back {:?})", show(&input), show(&out.received));
            Ok(())
        })
        .unwrap();
    journal_alive(&mut cluster);

    // gRPC calls whose message is arbitrary bytes, on every method.
    let answered_by_grpc = std::cell::Cell::new(0);
    runner(300)
        .run(&(proptest::sample::select(GRPC_PATHS), bytes(300), 0..addrs.len()), |(path, body, node)| {
            let answer = rt.block_on(raw_grpc(&addrs[node], path, body.clone()));
            prop_assert!(answer.is_ok(), "{path} with {} bytes on node {node}: {answer:?}", body.len());
            if answer.is_ok_and(|a| !a.starts_with("connection ")) {
                answered_by_grpc.set(answered_by_grpc.get() + 1);
            }
            Ok(())
        })
        .unwrap();
    journal_alive(&mut cluster);
    eprintln!("journal: {} raw gRPC calls answered by the gRPC layer", answered_by_grpc.get());

    // Well-formed calls with field values of any kind.
    let (refused, accepted) = (std::cell::Cell::new(0), std::cell::Cell::new(0));
    runner(600)
        .run(&call(), |c| {
            let answer = rt.block_on(run_call(&client, &c)).map_err(TestCaseError::fail)?;
            let count = if answer.starts_with("refused: ") { &refused } else { &accepted };
            count.set(count.get() + 1);
            if must_be_refused(&c) {
                prop_assert!(answer.starts_with("refused: "), "{c:?} was not refused: {answer}");
            }
            Ok(())
        })
        .unwrap();
    journal_alive(&mut cluster);
    eprintln!("journal: {} calls refused, {} accepted", refused.get(), accepted.get());

    // Over the limits: an append over MAX_APPEND_BYTES, a message over the
    // server's decoding limit, and the last seq a u64 can hold.
    rt.block_on(async {
        let nine_mib = vec![vec![1u8; 1 << 20]; 9];
        let r = client.append(KEPT, &leader, nine_mib, None).await;
        assert!(matches!(&r, Err(e) if e.rejection() == Some(&keel_journal::client::Rejection::Invalid)), "an append of 9 MiB: {r:?}");
        let huge = vec![vec![2u8; 1 << 20]; 17];
        let r = client.append(KEPT, &leader, huge, None).await;
        assert!(r.is_err(), "an append of 17 MiB: {r:?}");
        let r = client.append(KEPT, &leader, vec![b"x".to_vec()], Some(u64::MAX)).await;
        assert!(r.is_err(), "an append expecting last seq u64::MAX: {r:?}");
    });
    journal_alive(&mut cluster);

    // Nothing lost, and the stream still takes its leader's appends.
    let (all, next) = rt.block_on(async {
        let all = read_all(&client, KEPT).await;
        let next = client.append(KEPT, &leader, vec![b"after the barrage".to_vec()], None).await;
        (all, next)
    });
    assert_eq!(all, vec![(kept_seq, record)], "the stream holds exactly the record acknowledged before");
    assert_eq!(next.expect("an append after the barrage"), kept_seq + 1);
    eprintln!("journal: bad input answered for {:?}", started.elapsed());
}

// ---------------------------------------------------------------------------
// 2. The discovery endpoint and 3. the replica feed

/// Arguments of any kind, some of them words the endpoints know.
fn arg() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => bytes(24),
        2 => proptest::sample::select(&[
            "SENTINEL", "get-master-addr-by-name", "keel", "masters", "master", "replicas", "slaves", "sentinels",
            "myid", "failover", "reset", "set", "PING", "INFO", "ROLE", "HELLO", "AUTH", "CLIENT", "SETNAME",
            "SETINFO", "QUIT", "REPLCONF", "PSYNC", "SYNC", "listening-port", "capa", "eof", "psync2", "ack",
            "?", "-1", "0", "1", "99999999999999999999999", "-99999999999",
        ][..]).prop_map(|w| w.as_bytes().to_vec()),
        1 => Just(vec![b'x'; 70_000]),
    ]
}

fn command(names: &'static [&'static str]) -> impl Strategy<Value = Vec<Vec<u8>>> {
    (prop_oneof![4 => proptest::sample::select(names).prop_map(|n| n.as_bytes().to_vec()), 1 => bytes(12)], proptest::collection::vec(arg(), 0..6))
        .prop_map(|(name, rest)| [vec![name], rest].concat())
}

/// Malformed RESP: lengths of any sign and size, nesting, cut requests.
fn bad_resp() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        any::<i64>().prop_map(|n| format!("*{n}\r\n").into_bytes()),
        (any::<i64>(), bytes(20)).prop_map(|(n, b)| [format!("*1\r\n${n}\r\n").into_bytes(), b].concat()),
        Just(b"*1\r\n$536870913\r\nx\r\n".to_vec()),
        Just(b"*2147483648\r\n".to_vec()),
        Just(b"*-5\r\n$-1\r\n".to_vec()),
        (1usize..2000).prop_map(|depth| b"*1\r\n".repeat(depth)),
        proptest::collection::vec(proptest::sample::select(&["*", "$", "\r\n", "\n", "-1", "3", "\"", "'", "PING"][..]), 0..40)
            .prop_map(|parts| parts.concat().into_bytes()),
        // A line with no end, longer than any request limit.
        Just(vec![b'a'; (1 << 20) + 10]),
    ]
}

/// An inline request (a line, as telnet sends it).
fn inline() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(prop_oneof!["[ -~]{0,12}".prop_map(String::into_bytes), bytes(8)], 0..6)
        .prop_map(|ws| [ws.join(&b' '), b"\r\n".to_vec()].concat())
}

const SENTINEL_NAMES: &[&str] = &["SENTINEL", "PING", "INFO", "ROLE", "HELLO", "AUTH", "CLIENT", "QUIT", "SUBSCRIBE"];
const FEED_NAMES: &[&str] = &["PING", "REPLCONF", "AUTH", "PSYNC", "SYNC", "INFO", "QUIT"];

fn cluster_alive(c: &mut KeelCluster) {
    for n in &mut c.nodes {
        let (redis_log, sidecar_log) = (n.dir.join("redis.log"), n.dir.join("sidecar.log"));
        assert_running(&mut n.redis, &format!("{} redis-server", n.name), &redis_log);
        assert_running(&mut n.sidecar, &format!("{} sidecar", n.name), &sidecar_log);
        assert_no_panic(&redis_log);
        assert_no_panic(&sidecar_log);
    }
}

/// `SENTINEL get-master-addr-by-name keel` at `addr`.
fn master_addr(addr: &str) -> Reply {
    Conn::connect(addr).call(&words(&["SENTINEL", "get-master-addr-by-name", "keel"]))
}

/// Waits until `ok` holds, at most `limit`.
fn wait_until(limit: Duration, what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ok() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_discovery_endpoint_survives_bad_input() {
    let _serial = serial();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut c = rt.block_on(KeelCluster::start(Server::Redis, 1, 2, 1000));
    let primary = Reply::Array(Some(vec![Reply::Bulk(Some(b"127.0.0.1".to_vec())), Reply::Bulk(Some(c.nodes[0].port.to_string().into_bytes()))]));
    let endpoints: Vec<String> = c.nodes.iter().map(|n| n.sentinel_addr()).collect();
    for e in &endpoints {
        wait_until(Duration::from_secs(30), "discovery names the primary", || master_addr(e) == primary);
    }
    let started = Instant::now();
    let input = prop_oneof![
        3 => bytes(2000),
        3 => proptest::collection::vec(command(SENTINEL_NAMES), 1..5).prop_map(|cs| cs.iter().flat_map(|c| encode(c)).collect::<Vec<u8>>()),
        2 => inline(),
        2 => bad_resp(),
    ];
    runner(1500)
        .run(&(input, 0..endpoints.len()), |(input, i)| {
            let out = send_and_close(&endpoints[i], &input);
            prop_assert!(out.closed, "the endpoint kept the connection open after {:?} (sent back {:?})", show(&input), show(&out.received));
            let replies = parse_all(&out.received).map_err(|e| TestCaseError::fail(format!("after {:?}: {e}", show(&input))))?;
            // The close after a malformed request comes with its reason.
            if let Some(last) = replies.last().filter(|r| r.error_text().contains("Protocol error")) {
                prop_assert!(last.error_text().starts_with("ERR Protocol error: "), "{last:?}");
            }
            Ok(())
        })
        .unwrap();
    cluster_alive(&mut c);
    for e in &endpoints {
        assert_eq!(master_addr(e), primary, "{e} after the barrage");
    }
    eprintln!("discovery: bad input answered for {:?}", started.elapsed());
}

/// The feed port a sidecar logged at start (`node starting … feed_port=N`).
fn logged_feed_port(log: &Path) -> u16 {
    let raw = String::from_utf8_lossy(&std::fs::read(log).unwrap()).into_owned();
    // Without the terminal colour codes (ESC [ … m).
    let mut text = String::new();
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            chars.by_ref().find(|&c| c == 'm');
        } else {
            text.push(c);
        }
    }
    let at = text.find("feed_port=").unwrap_or_else(|| panic!("no feed_port in {}", log.display()));
    text[at + "feed_port=".len()..].chars().take_while(char::is_ascii_digit).collect::<String>().parse().expect("a port")
}

/// Where node `i`'s Redis replicates from (the sidecar's feed).
fn feed_addr(c: &KeelCluster, i: usize) -> String {
    let port = c.nodes[i].info_field("replication", "master_port").expect("the replica answers INFO");
    format!("127.0.0.1:{port}")
}

#[test]
fn the_replica_feed_survives_bad_input() {
    let _serial = serial();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut c = rt.block_on(KeelCluster::start(Server::Redis, 1, 2, 1000));
    let feed = feed_addr(&c, 1);
    let mut primary = Conn::connect(&c.nodes[0].addr());
    let mut replica = Conn::connect(&c.nodes[1].addr());
    assert_eq!(primary.call(&words(&["SET", "kept", "before"])), Reply::Simple(b"OK".to_vec()));
    wait_until(Duration::from_secs(30), "the replica has the write", || {
        replica.call(&words(&["GET", "kept"])) == Reply::Bulk(Some(b"before".to_vec()))
    });
    let started = Instant::now();
    let psync = (
        prop_oneof![Just("?".to_string()), "[0-9a-f]{40}", "\\PC{0,50}"],
        prop_oneof![Just("-1".to_string()), any::<i64>().prop_map(|n| n.to_string()), "\\PC{0,24}", Just("99999999999999999999999".into())],
    )
        .prop_map(|(id, off)| encode(&[b"PSYNC".to_vec(), id.into_bytes(), off.into_bytes()]));
    let handshake = proptest::collection::vec(
        prop_oneof![
            Just(words(&["PING"])),
            Just(words(&["REPLCONF", "listening-port", "1"])),
            Just(words(&["REPLCONF", "capa", "eof", "capa", "psync2"])),
        ],
        0..3,
    )
    .prop_map(|cs| cs.iter().flat_map(|c| encode(c)).collect::<Vec<u8>>());
    let input = prop_oneof![
        3 => bytes(2000),
        3 => proptest::collection::vec(command(FEED_NAMES), 1..5).prop_map(|cs| cs.iter().flat_map(|c| encode(c)).collect::<Vec<u8>>()),
        3 => (handshake, psync).prop_map(|(h, p)| [h, p].concat()),
        1 => inline(),
        2 => bad_resp(),
    ];
    runner(1000)
        .run(&input, |input| {
            let out = send_and_close(&feed, &input);
            prop_assert!(out.closed, "the feed kept the connection open after {:?} (sent back {:?})", show(&input), show(&out.received));
            // Status and error lines only: the replica being fed keeps
            // the feed, so no PSYNC here gets an RDB or a stream.
            for line in out.received.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                prop_assert!(line.ends_with(b"\r") && matches!(line[0], b'+' | b'-'), "a line {:?} after {:?}", show(line), show(&input));
                prop_assert!(!line.starts_with(b"+FULLRESYNC") && !line.starts_with(b"+CONTINUE"), "{:?} after {:?}", show(line), show(&input));
            }
            Ok(())
        })
        .unwrap();
    // The primary's feed port (bound for the node's life, served only
    // while it follows): answered and closed, not left waiting.
    let primary_feed = format!("127.0.0.1:{}", logged_feed_port(&c.nodes[0].dir.join("sidecar.log")));
    for input in [encode(&words(&["PSYNC", "?", "-1"])), b"garbage".to_vec(), Vec::new()] {
        let out = send_and_close(&primary_feed, &input);
        assert!(out.closed, "the primary's feed kept the connection open after {:?}", show(&input));
        assert!(out.received.is_empty() || out.received.starts_with(b"-NOMASTERLINK "), "{:?}", show(&out.received));
    }
    // A well-formed PSYNC without the feed's password: refused.
    let out = send_and_close(&feed, &encode(&words(&["PSYNC", "?", "-1"])));
    assert!(out.closed && out.received.starts_with(b"-NOAUTH "), "{:?}", show(&out.received));
    // With it (the replica's masterauth, which only the control user may
    // read or set), a PSYNC while the replica is fed: told to retry later.
    let mut control = Conn::connect(&c.nodes[1].addr());
    let secret = control_secret_of(&c.nodes[1].dir);
    assert_eq!(control.call(&words(&["AUTH", "keel-sidecar", &secret])), Reply::Simple(b"OK".to_vec()));
    let Reply::Array(Some(kv)) = control.call(&words(&["CONFIG", "GET", "masterauth"])) else { panic!("CONFIG GET masterauth") };
    let Some(Reply::Bulk(Some(token))) = kv.get(1) else { panic!("no masterauth: {kv:?}") };
    let token = String::from_utf8(token.clone()).unwrap();
    let out = send_and_close(&feed, &[encode(&words(&["AUTH", &token])), encode(&words(&["PSYNC", "?", "-1"]))].concat());
    assert!(out.closed && out.received.starts_with(b"+OK\r\n-NOMASTERLINK "), "{:?}", show(&out.received));
    cluster_alive(&mut c);
    // The real replica kept its link and still gets the primary's writes.
    assert_eq!(c.nodes[1].info_field("replication", "master_link_status").as_deref(), Some("up"));
    assert_eq!(feed_addr(&c, 1), feed, "the replica still replicates from its feed");
    assert_eq!(primary.call(&words(&["SET", "kept", "after"])), Reply::Simple(b"OK".to_vec()));
    wait_until(Duration::from_secs(30), "the replica has the write made after the barrage", || {
        replica.call(&words(&["GET", "kept"])) == Reply::Bulk(Some(b"after".to_vec()))
    });
    eprintln!("replica feed: bad input answered for {:?}", started.elapsed());
}

// ---------------------------------------------------------------------------
// 4. The module's commands

/// The sidecar's commands: `NOPERM` to everyone else.
const CONTROL: &[&str] = &["KEEL.ACK", "KEEL.FENCED", "KEEL.LEADER", "KEEL.LEASE", "KEEL.FOLLOWING", "KEEL.SNAPSHOT", "KEEL.STALLED"];
/// The module's other commands (the filter's wrappers).
const WRAPPERS: &[&str] = &["KEEL.W", "KEEL.R", "KEEL.T", "KEEL.TW", "KEEL.TB", "KEEL.B", "KEEL.BR", "KEEL.NOLEASE", "KEEL.COUNTEDERROR", "KEEL.GUARD"];
/// Data commands whose replies are the same on two servers given the same
/// commands (no randomness, no clock, no hash order).
const DATA: &[&str] = &[
    "SET", "GET", "APPEND", "STRLEN", "GETRANGE", "SETRANGE", "INCR", "INCRBY", "DECR", "DECRBY", "INCRBYFLOAT", "MSET",
    "MGET", "SETNX", "GETSET", "GETDEL", "DEL", "EXISTS", "TYPE", "LPUSH", "RPUSH", "LPOP", "RPOP", "LRANGE", "LLEN",
    "LINDEX", "LSET", "LREM", "LINSERT", "LMOVE", "HSET", "HGET", "HDEL", "HLEN", "HINCRBY", "HEXISTS", "SADD", "SREM",
    "SCARD", "SISMEMBER", "SMOVE", "ZADD", "ZRANGE", "ZSCORE", "ZCARD", "ZINCRBY", "ZREM", "ZRANK", "RENAME", "COPY",
    "SETBIT", "GETBIT", "BITCOUNT", "PFADD", "PFCOUNT", "ECHO", "PING", "PERSIST", "WATCH", "UNWATCH",
];
/// Commands that change a server's role or its Keel wiring when run.
const GUARDED: &[&[&str]] = &[
    &["REPLICAOF", "127.0.0.1", "1"],
    &["SLAVEOF", "127.0.0.1", "1"],
    &["FAILOVER"],
    &["CONFIG", "SET", "replica-read-only", "no"],
    &["MODULE", "UNLOAD", "keel"],
    &["ACL", "SETUSER", "keel-sidecar", "off"],
    &["ACL", "DELUSER", "keel-sidecar"],
];

const TRANSACTION: &[&[&str]] = &[&["MULTI"], &["EXEC"], &["DISCARD"], &["WATCH", "{w}k0"], &["UNWATCH"]];
/// Blocking pops that wait 10 ms at most, or have a bad timeout.
const BLOCKING: &[&[&str]] = &[
    &["BLPOP", "{w}k0", "0.01"],
    &["BRPOP", "{w}k1", "{w}k0", "0.01"],
    &["BZPOPMIN", "{w}k0", "0.01"],
    &["BLMOVE", "{w}k0", "{w}k1", "LEFT", "RIGHT", "0.01"],
    &["XREAD", "BLOCK", "10", "STREAMS", "{w}k3", "$"],
    &["BLPOP", "{w}k0", "-1"],
    &["BLPOP", "{w}k0", "nan"],
];

/// An argument for a command on keys of namespace `ns`.
fn data_arg(ns: &'static str) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => (0..4u8).prop_map(move |i| format!("{ns}k{i}").into_bytes()),
        2 => proptest::sample::select(&[
            "-1", "0", "1", "2", "3", "10", "-10", "3.5", "inf", "-inf", "+inf", "nan", "99999999999999999999", "(1", "[a", "-",
            "+", "NX", "XX", "GT", "LT", "CH", "INCR", "WITHSCORES", "LIMIT", "COUNT", "BEFORE", "AFTER", "LEFT", "RIGHT", "REV",
            "BYSCORE", "BYLEX", "KEEPTTL", "GET", "REPLACE",
        ][..]).prop_map(|w| w.as_bytes().to_vec()),
        2 => bytes(16),
        1 => Just(Vec::new()),
        1 => proptest::collection::vec(any::<u8>(), 1000..3000),
    ]
}

/// A data command on namespace `ns`: a known name in any case, or junk.
fn data_command(ns: &'static str) -> impl Strategy<Value = Vec<Vec<u8>>> {
    let name = prop_oneof![
        8 => (proptest::sample::select(DATA), any::<bool>()).prop_map(|(n, low)| if low { n.to_ascii_lowercase().into_bytes() } else { n.as_bytes().to_vec() }),
        1 => bytes(10),
    ];
    (name, proptest::collection::vec(data_arg(ns), 0..7)).prop_map(|(n, rest)| [vec![n], rest].concat())
}

/// One step against the Keel primary (and, for `Data` and `Multi`, the
/// same against a stock Redis).
#[derive(Clone)]
enum Step {
    Data(Vec<Vec<u8>>),
    /// MULTI, commands, then EXEC (true) or DISCARD.
    Multi(Vec<Vec<Vec<u8>>>, bool),
    /// A module command with arguments of any kind (Keel only).
    Keel(Vec<Vec<u8>>),
}

impl std::fmt::Debug for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Data(c) => write!(f, "Data{:?}", show_args(c)),
            Step::Multi(cs, exec) => write!(f, "Multi{:?}, exec: {exec}", cs.iter().map(|c| show_args(c)).collect::<Vec<_>>()),
            Step::Keel(c) => write!(f, "Keel{:?}", show_args(c)),
        }
    }
}

/// What a module command may be given: a data command (namespace `{w}`,
/// apart from the compared one), a control command, a transaction command,
/// a blocking pop that waits a little, a role command, or junk.
fn keel_step() -> impl Strategy<Value = Step> {
    let inner = prop_oneof![
        3 => data_command("{w}"),
        2 => (proptest::sample::select(CONTROL), proptest::collection::vec(data_arg("{w}"), 0..4))
            .prop_map(|(n, rest)| [vec![n.as_bytes().to_vec()], rest].concat()),
        1 => proptest::sample::select(TRANSACTION).prop_map(|w| words(w)),
        1 => proptest::sample::select(BLOCKING).prop_map(|w| words(w)),
        1 => proptest::sample::select(GUARDED).prop_map(|g| words(g)),
        1 => proptest::collection::vec(bytes(20), 0..5),
        1 => (proptest::sample::select(WRAPPERS), data_command("{w}")).prop_map(|(w, c)| [vec![w.as_bytes().to_vec()], c].concat()),
    ];
    (proptest::sample::select([CONTROL, WRAPPERS].concat()), inner, any::<bool>())
        .prop_map(|(n, rest, low)| {
            let n = if low { n.to_ascii_lowercase() } else { n.to_string() };
            Step::Keel([vec![n.into_bytes()], rest].concat())
        })
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => data_command("{f}").prop_map(Step::Data),
        2 => (proptest::collection::vec(data_command("{f}"), 0..5), any::<bool>()).prop_map(|(cs, exec)| Step::Multi(cs, exec)),
        4 => keel_step(),
    ]
}

/// The same server without the module, for comparison.
struct Stock {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Stock {
    fn start(server: Server) -> Stock {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = std::process::Command::new(server.binary())
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .arg("--logfile")
            .arg(dir.path().join("redis.log"))
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        let addr = format!("127.0.0.1:{port}");
        wait_until(Duration::from_secs(10), "the stock server accepts connections", || TcpStream::connect(&addr).is_ok());
        Stock { child, addr, _dir: dir }
    }
}

impl Drop for Stock {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Keel's reply to a data command must be stock Redis's, or an error both
/// give (their texts may differ), or one of Keel's own (`KEEL_…`).
fn same_as_stock(cmd: &[Vec<u8>], keel: &Reply, stock: &Reply) -> Result<(), TestCaseError> {
    if keel.is_error() && keel.error_text().starts_with("KEEL_") {
        return Ok(());
    }
    prop_assert_eq!(keel.errors_as_kinds(), stock.errors_as_kinds(), "{:?}: Keel {:?}, stock Redis {:?}", show_args(cmd), keel, stock);
    Ok(())
}

/// The first element of `ROLE`'s reply.
fn role(c: &mut Conn) -> String {
    match c.call(&words(&["ROLE"])) {
        Reply::Array(Some(items)) => match items.first() {
            Some(Reply::Bulk(Some(r))) => String::from_utf8_lossy(r).into_owned(),
            other => format!("{other:?}"),
        },
        other => format!("{other:?}"),
    }
}

fn is_control(name: &[u8]) -> bool {
    CONTROL.iter().any(|c| c.as_bytes().eq_ignore_ascii_case(name))
}

fn is_guarded(args: &[Vec<u8>]) -> bool {
    GUARDED.iter().any(|g| g.len() == args.len() && g.iter().zip(args).all(|(a, b)| a.as_bytes().eq_ignore_ascii_case(b)))
}

#[test]
fn the_module_commands_survive_bad_arguments() {
    module_commands(Server::Redis);
}

/// Valkey tells the filter which client sent a command (Redis 7.0 does
/// not): the module's transactions take another path there.
#[test]
fn the_module_commands_survive_bad_arguments_on_valkey() {
    module_commands(Server::Valkey);
}

/// Valkey 9 mishandles GETDEL and GETSET of a key of another type inside a
/// module's call (the call's reply cut short, and `WRONGTYPE` sent to the
/// client besides: two replies to one command). Through Keel each answers
/// `WRONGTYPE` once, alone, in and out of a transaction, on both servers,
/// and changes nothing.
#[test]
fn getdel_and_getset_of_another_type_answer_once() {
    let _serial = serial();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    for server in [Server::Redis, Server::Valkey] {
        let p = rt.block_on(KeelPrimary::start(server, 1, &[]));
        let mut c = Conn::connect(&p.addr());
        assert_eq!(c.call(&words(&["RPUSH", "a-list", "x"])), Reply::Int(1));
        let wrong = Reply::Error(b"WRONGTYPE Operation against a key holding the wrong kind of value".to_vec());
        for cmd in [&["GETDEL", "a-list"][..], &["GETSET", "a-list", "v"], &["getdel", "a-list"]] {
            assert_eq!(c.call(&words(cmd)), wrong, "{server:?} {cmd:?}");
            assert_eq!(c.call(&words(&["PING"])), Reply::Simple(b"PONG".to_vec()), "{server:?}: a second reply after {cmd:?}");
        }
        assert_eq!(c.call(&words(&["MULTI"])), Reply::Simple(b"OK".to_vec()));
        assert_eq!(c.call(&words(&["GETDEL", "a-list"])), Reply::Simple(b"QUEUED".to_vec()));
        assert_eq!(c.call(&words(&["GETSET", "a-list", "v"])), Reply::Simple(b"QUEUED".to_vec()));
        assert_eq!(c.call(&words(&["EXEC"])), Reply::Array(Some(vec![wrong.clone(), wrong.clone()])), "{server:?}");
        assert_eq!(c.call(&words(&["PING"])), Reply::Simple(b"PONG".to_vec()));
        assert_eq!(c.call(&words(&["LRANGE", "a-list", "0", "-1"])), Reply::Array(Some(vec![Reply::Bulk(Some(b"x".to_vec()))])));
        // Of a string or no key: as always.
        assert_eq!(c.call(&words(&["SET", "a-string", "1"])), Reply::Simple(b"OK".to_vec()));
        assert_eq!(c.call(&words(&["GETSET", "a-string", "2"])), Reply::Bulk(Some(b"1".to_vec())));
        assert_eq!(c.call(&words(&["GETDEL", "a-string"])), Reply::Bulk(Some(b"2".to_vec())));
        assert_eq!(c.call(&words(&["GETDEL", "a-string"])), Reply::Bulk(None));
    }
}

fn module_commands(server: Server) {
    let _serial = serial();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut p = rt.block_on(KeelPrimary::start(server, 1, &[]));
    let stock = Stock::start(server);
    let addr = p.addr();
    let kept = format!("value-{}", new_uuid()).into_bytes();
    assert_eq!(Conn::connect(&addr).call(&[b"SET".to_vec(), b"bad-input:kept".to_vec(), kept.clone()]), Reply::Simple(b"OK".to_vec()));
    let started = Instant::now();
    // Every wrapper refuses every role or control-user command it is handed.
    let mut c = Conn::connect(&addr);
    for w in WRAPPERS.iter().filter(|w| **w != "KEEL.COUNTEDERROR" && **w != "KEEL.NOLEASE") {
        for g in GUARDED {
            let cmd = [vec![w.as_bytes().to_vec()], words(g)].concat();
            let r = c.call(&cmd);
            assert!(r.is_error(), "{:?} from the default user: {r:?}", show_args(&cmd));
        }
    }
    assert_eq!(role(&mut c), "master");
    // WAIT where the module runs it for the client: with another client's
    // transaction open (Redis 7.0 routes every command through the module
    // then), and inside MULTI. An answer, and the server stays up.
    let mut open = Conn::connect(&addr);
    assert_eq!(open.call(&words(&["MULTI"])), Reply::Simple(b"OK".to_vec()));
    let _ = c.call(&words(&["WAIT", "5", "100"]));
    for cmd in [&["MULTI"][..], &["WAIT", "5", "100"], &["EXEC"]] {
        let _ = c.call(&words(cmd));
    }
    let _ = open.call(&words(&["DISCARD"]));
    assert_eq!(role(&mut c), "master");
    runner(3000)
        .run(&proptest::collection::vec(step(), 1..10), |steps| {
            // Data on one connection per server, module commands on another
            // (they may leave it inside a transaction of the module's), in
            // database 1: any argument may be a key, and what the module
            // commands do is not done on the stock server.
            let (mut data, mut other, mut reference) = (Conn::connect(&addr), Conn::connect(&addr), Conn::connect(&stock.addr));
            prop_assert_eq!(other.call(&words(&["SELECT", "1"])), Reply::Simple(b"OK".to_vec()));
            for s in &steps {
                match s {
                    Step::Data(cmd) => {
                        let (k, r) = (data.call(cmd), reference.call(cmd));
                        same_as_stock(cmd, &k, &r)?;
                    }
                    Step::Multi(cmds, exec) => {
                        let multi = words(&["MULTI"]);
                        same_as_stock(&multi, &data.call(&multi), &reference.call(&multi))?;
                        for cmd in cmds {
                            same_as_stock(cmd, &data.call(cmd), &reference.call(cmd))?;
                        }
                        let end = words(&[if *exec { "EXEC" } else { "DISCARD" }]);
                        same_as_stock(&end, &data.call(&end), &reference.call(&end))?;
                    }
                    Step::Keel(cmd) => {
                        let r = other.call(cmd);
                        if is_control(&cmd[0]) {
                            prop_assert!(r.error_text().starts_with("NOPERM"), "{:?} from the default user: {r:?}", show_args(cmd));
                        }
                        // Run through a wrapper, a control or role command
                        // is refused too.
                        // (KEEL.COUNTEDERROR runs nothing; a command the
                        // module queues in a transaction answers later.)
                        let inner = &cmd[1..];
                        let runs = !cmd[0].eq_ignore_ascii_case(b"keel.countederror") && r != Reply::Simple(b"QUEUED".to_vec());
                        if runs && !inner.is_empty() && (is_control(&inner[0]) || is_guarded(inner)) {
                            prop_assert!(r.is_error(), "{:?} from the default user: {r:?}", show_args(cmd));
                        }
                    }
                }
            }
            // The key acknowledged before is still there, and the node is
            // still the primary.
            let mut c = Conn::connect(&addr);
            let got = c.call(&[b"GET".to_vec(), b"bad-input:kept".to_vec()]);
            prop_assert_eq!(got, Reply::Bulk(Some(kept.clone())), "after {:?}", steps);
            prop_assert_eq!(role(&mut c), "master", "after {:?}", steps);
            Ok(())
        })
        .unwrap();
    eprintln!("module ({server:?}): generated steps answered after {:?}", started.elapsed());
    // Many arguments at once.
    let mut c = Conn::connect(&addr);
    for name in CONTROL.iter().chain(WRAPPERS) {
        // A wrapper runs the command it is given: MGET, or a pop that
        // waits 10 ms.
        let blocking = ["KEEL.B", "KEEL.BR"].contains(name);
        let mut cmd = vec![name.as_bytes().to_vec(), if blocking { b"BLPOP".to_vec() } else { b"MGET".to_vec() }];
        cmd.extend((0..20_000).map(|i| format!("{{w}}{i}").into_bytes()));
        if blocking {
            cmd.push(b"0.01".to_vec());
        }
        let r = c.call(&cmd);
        if is_control(name.as_bytes()) {
            assert!(r.error_text().starts_with("NOPERM"), "{name} with 20000 arguments: {r:?}");
        }
    }
    let mut mset = vec![b"MSET".to_vec()];
    mset.extend((0..20_000).flat_map(|i| [format!("{{f}}m{i}").into_bytes(), vec![b'v'; i % 7]]));
    assert_eq!(c.call(&mset), Reply::Simple(b"OK".to_vec()));
    let log = p.dir.join("redis.log");
    assert_running(&mut p.redis, "the primary's redis-server", &log);
    assert_running(&mut p.sidecar, "the primary's sidecar", &p.dir.join("sidecar.log"));
    assert_no_panic(&log);
    assert_no_panic(&p.dir.join("sidecar.log"));
    assert_eq!(Conn::connect(&addr).call(&[b"GET".to_vec(), b"bad-input:kept".to_vec()]), Reply::Bulk(Some(kept)));
    assert_eq!(Conn::connect(&addr).call(&words(&["SET", "after", "1"])), Reply::Simple(b"OK".to_vec()), "a write is still acknowledged");
    eprintln!("module ({server:?}): bad arguments answered for {:?}", started.elapsed());
}

