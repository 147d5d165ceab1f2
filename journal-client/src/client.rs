//! The journal client library: talks to any journal node and hides which one
//! is the Raft leader.
//!
//! Retry rules (what makes retries safe):
//! - `not-leader` answers and refused connections mean the request was never
//!   proposed: retry at the hinted leader, else the next endpoint, until
//!   `retry_for` runs out (then `Unavailable`).
//! - A write whose request may have reached a node but got no answer
//!   (timeout, connection lost) is `OutcomeUnknown`, never retried here: the
//!   caller decides (an append can retry with `expect_last_seq`).
//! - Reads are retried on any transport failure and resume where they were.
//! - A failed TLS handshake (tls.rs) means the node read nothing: it is
//!   treated like a refused connection. TLS 1.3 tells a client that its
//!   certificate was refused only in answer to its first request, so the
//!   first write over a channel that never answered is preceded by a
//!   `Status` call, and a refusal there leaves the write unsent.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use keel_proto::journal as pb;
use keel_proto::journal::journal_client::JournalClient as RawClient;
use tonic::Code;
use tonic::Status;
use tonic::transport::Channel;

pub use crate::errors::JournalError;
pub use crate::errors::Rejection;
use crate::errors::ERROR_KEY;
use crate::errors::RAFT_LEADER_KEY;
pub use crate::tls::JournalTls;

/// Client bounds.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Per-request deadline.
    pub request_timeout: Duration,
    /// TCP connect timeout per attempt.
    pub connect_timeout: Duration,
    /// How long to keep looking for a leader before `Unavailable`.
    pub retry_for: Duration,
    /// Pause between rounds over all endpoints.
    pub retry_pause: Duration,
    /// TLS identity for every channel (tls.rs); `Off` (the default) is
    /// refused by a node that serves TLS.
    pub tls: JournalTls,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_millis(500),
            retry_for: Duration::from_secs(10),
            retry_pause: Duration::from_millis(50),
            tls: JournalTls::Off,
        }
    }
}

/// A request with a deadline.
fn timed<T>(msg: T, timeout: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(timeout);
    r
}

/// Largest message the client sends or accepts.
const MAX_MESSAGE_BYTES: usize = 64 << 20;

pub struct JournalClient {
    cfg: ClientConfig,
    /// Slot (book.rs) of the node to try first (the last leader seen).
    preferred: Mutex<usize>,
    shared: Arc<Shared>,
    /// Whether `warm` has run.
    warmed: AtomicBool,
    /// When the membership was last asked for (`refresh`).
    asked_members: Mutex<Instant>,
}

/// What background calls update too.
struct Shared {
    /// The journal's nodes as this client knows them.
    book: Mutex<crate::book::Book>,
    /// Per slot of the book.
    channels: Mutex<Vec<Option<Channel>>>,
    /// Per slot: a call was answered over its channel. Until then a write
    /// is preceded by a `Status` call (see `run`).
    answered: Vec<AtomicBool>,
    /// How channels are made (TLS, connect timeout).
    cfg: ClientConfig,
}

impl Shared {
    /// The gRPC client of slot `i` (its channel made at first use).
    fn raw(&self, i: usize) -> RawClient<Channel> {
        let addr = self.book.lock().unwrap().addr(i).to_string();
        let mut chans = self.channels.lock().unwrap();
        let ch = chans[i].get_or_insert_with(|| {
            // Addresses learned from the journal were not checked in `new`:
            // one that is not a URI gets a channel that never connects.
            let mut endpoint = Channel::from_shared(format!("{}://{}", self.cfg.tls.scheme(), addr))
                .unwrap_or_else(|_| Channel::from_static("http://invalid.invalid:1"))
                .connect_timeout(self.cfg.connect_timeout)
                .tcp_nodelay(true);
            if let Some(tls) = self.cfg.tls.client_config() {
                endpoint = endpoint.tls_config(tls).expect("validated in new");
            }
            endpoint.connect_lazy()
        });
        RawClient::new(ch.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES).max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// Every `MEMBERSHIP_REFRESH` while the client exists, asks the nodes it
    /// knows (one after another until one answers) for the membership: a
    /// client whose only call is a long-lived read (a replica's feed) makes
    /// no calls that would, and must know the new nodes before the old
    /// ones are gone.
    async fn keep_learning(shared: std::sync::Weak<Shared>) {
        loop {
            tokio::time::sleep(MEMBERSHIP_REFRESH).await;
            let Some(s) = shared.upgrade() else { return };
            let live = s.book.lock().unwrap().live();
            for i in live {
                let mut raw = s.raw(i);
                if let Ok(st) = raw.status(timed(pb::StatusRequest {}, s.cfg.request_timeout)).await {
                    s.learn(&st.into_inner());
                    break;
                }
            }
        }
    }

    /// Learns the membership in a node's `Status` answer.
    fn learn(&self, s: &pb::StatusResponse) {
        let members: Vec<String> = s.members.iter().map(|m| m.addr.clone()).collect();
        let changed = self.book.lock().unwrap().learn(s.membership_index, &members);
        self.forget(&changed);
    }

    /// Drops the connections of slots whose address changed.
    fn forget(&self, slots: &[usize]) {
        let mut chans = self.channels.lock().unwrap();
        for s in slots {
            chans[*s] = None;
            self.answered[*s].store(false, Ordering::Relaxed);
        }
    }
}

/// How often a client asks a node for the journal's membership (so a client
/// follows nodes being replaced without a restart).
pub const MEMBERSHIP_REFRESH: Duration = Duration::from_secs(5);

/// Whether a failed call can be retried without risk of applying it twice.
enum Failure {
    /// Not proposed anywhere: retry, preferably at this endpoint.
    Redirect(Option<String>),
    /// Transport failure; `sent` says the request may have been delivered.
    Transport { sent: bool, message: String },
    /// A definite answer.
    Final(JournalError),
}

/// Whether a transport failure came before any connection was made (so
/// nothing was sent): refused, unreachable, or the connect timed out. Read
/// from the typed I/O errors among the status's sources, not its text.
fn never_connected(status: &Status) -> bool {
    use std::io::ErrorKind as K;
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(e) = src {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if matches!(io.kind(), K::ConnectionRefused | K::AddrNotAvailable | K::NetworkUnreachable | K::HostUnreachable | K::TimedOut) {
                return true;
            }
        }
        src = e.source();
    }
    false
}

fn classify(status: &Status) -> Failure {
    let kind = status.metadata().get(ERROR_KEY).and_then(|v| v.to_str().ok()).map(crate::errors::kind_of);
    match kind {
        Some(Some(crate::errors::ErrorKind::NotLeader)) => Failure::Redirect(
            status.metadata().get(RAFT_LEADER_KEY).and_then(|v| v.to_str().ok()).map(str::to_string),
        ),
        Some(_) => Failure::Final(JournalError::from_status(status)),
        None => {
            let mut chain = format!("{status}");
            let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
            while let Some(e) = src {
                chain.push_str(&format!(": {e}"));
                src = e.source();
            }
            let refused = never_connected(status);
            // A failed TLS handshake: the node reads no request before the
            // handshake completes, so nothing was applied. Under TLS 1.3 a
            // client learns its certificate was refused only from the
            // alert that answers its first request.
            if tls_refusal(&chain) {
                return Failure::Transport {
                    sent: false,
                    message: format!("TLS handshake failed: {chain} (the node and this client must each show a certificate of the deployment's CA)"),
                };
            }
            // A plaintext client reads a TLS node's alert as a malformed
            // HTTP/2 frame, which no journal node sends: nothing was read.
            if chain.contains("frame with invalid size") && chain.contains("GoAway") {
                return Failure::Transport {
                    sent: false,
                    message: format!(
                        "the node did not answer in HTTP/2 ({chain}); it serves TLS: give this client the deployment's certificates"
                    ),
                };
            }
            match status.code() {
                Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded | Code::Internal => {
                    Failure::Transport { sent: !refused, message: chain }
                }
                _ => Failure::Final(JournalError::from_status(status)),
            }
        }
    }
}

/// Whether a transport error's text is a TLS handshake failure (rustls's
/// words: a refused or missing certificate, an alert, a timed-out
/// handshake).
fn tls_refusal(chain: &str) -> bool {
    ["received fatal alert", "invalid peer certificate", "peer sent no certificates", "HandshakeTimeout", "handshake timed out"]
        .iter()
        .any(|w| chain.contains(w))
}

impl JournalClient {
    /// `endpoints` are `host:port` of journal nodes (any subset works).
    pub fn new(endpoints: Vec<String>, cfg: ClientConfig) -> Result<JournalClient, JournalError> {
        if endpoints.is_empty() {
            return Err(JournalError::Unavailable("no journal endpoints given".into()));
        }
        let bad = |message: String| JournalError::Rejected { kind: crate::errors::Rejection::Invalid, message };
        for e in &endpoints {
            let endpoint = Channel::from_shared(format!("{}://{e}", cfg.tls.scheme())).map_err(|err| bad(format!("bad endpoint {e:?}: {err}")))?;
            if let Some(tls) = cfg.tls.client_config() {
                endpoint.tls_config(tls).map_err(|err| bad(format!("TLS settings for {e:?}: {err}")))?;
            }
        }
        let n = crate::book::MAX_ENDPOINTS;
        Ok(JournalClient {
            cfg: cfg.clone(),
            preferred: Mutex::new(0),
            shared: Arc::new(Shared {
                book: Mutex::new(crate::book::Book::new(&endpoints)),
                channels: Mutex::new(vec![None; n]),
                answered: (0..n).map(|_| AtomicBool::new(false)).collect(),
                cfg: cfg.clone(),
            }),
            warmed: AtomicBool::new(false),
            asked_members: Mutex::new(Instant::now()),
        })
    }

    /// Parses a comma-separated endpoint list.
    pub fn from_list(list: &str, tls: &JournalTls) -> Result<JournalClient, JournalError> {
        let endpoints = list.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect();
        JournalClient::new(endpoints, ClientConfig { tls: tls.clone(), ..ClientConfig::default() })
    }

    /// The journal nodes this client tries (the newest membership it has
    /// seen, else the endpoints it was given).
    pub fn endpoints(&self) -> Vec<String> {
        let book = self.shared.book.lock().unwrap();
        book.live().into_iter().map(|i| book.addr(i).to_string()).collect()
    }

    /// Address of slot `i`.
    fn endpoint(&self, i: usize) -> String {
        self.shared.book.lock().unwrap().addr(i).to_string()
    }

    fn raw(&self, i: usize) -> RawClient<Channel> {
        self.shared.raw(i)
    }

    /// At the first call: connects to every endpoint in the background (a
    /// `Status` call each), so that when the Raft leader is lost the client
    /// moves to another node over a connection already open, with no TLS
    /// handshake in the way (measured: a handshake per client at that
    /// moment, in a debug build on a busy 2-core box, doubled the write
    /// stall after losing the journal's leader, past a Keel lease).
    fn warm(&self) {
        if self.warmed.swap(true, Ordering::Relaxed) {
            self.refresh(false);
            return;
        }
        let live = self.shared.book.lock().unwrap().live();
        for i in live {
            self.ask(i);
        }
        tokio::spawn(Shared::keep_learning(Arc::downgrade(&self.shared)));
    }

    /// A `Status` call to slot `i` in the background: marks the slot
    /// answered and learns the membership.
    fn ask(&self, i: usize) {
        let (mut raw, shared, timeout) = (self.raw(i), self.shared.clone(), self.cfg.request_timeout);
        tokio::spawn(async move {
            if let Ok(s) = raw.status(timed(pb::StatusRequest {}, timeout)).await {
                shared.answered[i].store(true, Ordering::Relaxed);
                shared.learn(&s.into_inner());
            }
        });
    }

    /// Asks the preferred node for the membership, at most every
    /// `MEMBERSHIP_REFRESH` (`now`: at once, and every live node).
    fn refresh(&self, now: bool) {
        {
            let mut asked = self.asked_members.lock().unwrap();
            if !now && asked.elapsed() < MEMBERSHIP_REFRESH {
                return;
            }
            *asked = Instant::now();
        }
        if now {
            let live = self.shared.book.lock().unwrap().live();
            for i in live {
                self.ask(i);
            }
        } else {
            self.ask(*self.preferred.lock().unwrap());
        }
    }

    /// Runs `call` against nodes until one answers definitely. `idempotent`
    /// calls are retried after transport failures too.
    async fn run<T, F, Fut>(&self, what: &str, idempotent: bool, mut call: F) -> Result<T, JournalError>
    where
        F: FnMut(RawClient<Channel>, Duration) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        self.warm();
        let mut at = Attempts::new(self);
        loop {
            let i = at.i;
            // A node that refuses this client's certificate (TLS 1.3) says
            // so only after the client sent its first request, by closing
            // the connection: a write sent first would come back "outcome
            // unknown". So the first call over a channel that never
            // answered is a `Status`, whose failure leaves the write unsent.
            if !idempotent && !self.shared.answered[i].load(Ordering::Relaxed) {
                match self.raw(i).status(timed(pb::StatusRequest {}, self.cfg.request_timeout)).await {
                    Ok(s) => {
                        self.shared.answered[i].store(true, Ordering::Relaxed);
                        self.shared.learn(&s.into_inner());
                    }
                    Err(status) => {
                        let failure = match classify(&status) {
                            Failure::Transport { message, .. } => {
                                Failure::Transport { sent: false, message: self.connect_hint(format!("before sending {what}: {message}")) }
                            }
                            other => other,
                        };
                        at.not_applied(self, failure, &status)?;
                        at.pause_or_give_up(self, what).await?;
                        continue;
                    }
                }
            }
            match call(self.raw(i), self.cfg.request_timeout).await {
                Ok(v) => {
                    *self.preferred.lock().unwrap() = i;
                    self.shared.answered[i].store(true, Ordering::Relaxed);
                    return Ok(v);
                }
                Err(status) => match classify(&status) {
                    Failure::Transport { sent: true, message } if !idempotent => {
                        return Err(JournalError::OutcomeUnknown(format!(
                            "OUTCOME_UNKNOWN: {what} sent to {} got no answer ({message}); it may or may not be applied",
                            self.endpoint(i)
                        )));
                    }
                    failure => at.not_applied(self, failure, &status)?,
                },
            }
            at.pause_or_give_up(self, what).await?;
        }
    }

    /// Appends `records`; returns the seq of the last one.
    pub async fn append(
        &self,
        stream: &str,
        leader_uuid: &str,
        records: Vec<Vec<u8>>,
        expect_last_seq: Option<u64>,
    ) -> Result<u64, JournalError> {
        self.append_unary(append_request(stream, leader_uuid, records, expect_last_seq)).await
    }

    /// One unary `Append` of `req` (also `AppendSession`'s fallback).
    async fn append_unary(&self, req: pb::AppendRequest) -> Result<u64, JournalError> {
        self.run("append", false, |mut c, t| {
            let r = timed(req.clone(), t);
            async move { c.append(r).await.map(|r| r.into_inner().last_seq) }
        })
        .await
    }

    /// Opens an `AppendStream` to endpoint `i`.
    async fn open_append_stream(&self, i: usize) -> Result<OpenAppendStream, Status> {
        self.warm();
        let (tx, rx) = tokio::sync::mpsc::channel(APPEND_STREAM_BUFFER);
        let mut raw = self.raw(i);
        let opened = tokio::time::timeout(self.cfg.request_timeout, raw.append_stream(tokio_stream::wrappers::ReceiverStream::new(rx)))
            .await
            .map_err(|_| Status::unavailable(format!("tcp connect error: no answer within {:?}", self.cfg.request_timeout)))??;
        Ok(OpenAppendStream { endpoint: i, tx, replies: opened.into_inner() })
    }

    /// `message` of a failed first call, with what a closed connection
    /// there may mean.
    fn connect_hint(&self, message: String) -> String {
        if message.contains("TLS") || message.contains("serves TLS") || !(message.contains("closed") || message.contains("reset") || message.contains("broken pipe")) {
            return message;
        }
        if self.cfg.tls.is_on() {
            format!("{message} (a journal node closes the connection of a client whose certificate it refuses: check this one is of the deployment's CA)")
        } else {
            format!("{message} (a journal node that serves TLS closes plaintext connections: give this client the deployment's certificates)")
        }
    }

    /// Compare-and-set of the stream leader; returns the old leader.
    pub async fn set_leader(&self, stream: &str, new: &str, expected_old: &str) -> Result<String, JournalError> {
        let req = pb::SetLeaderRequest { stream: stream.into(), new_uuid: new.into(), expected_old: expected_old.into() };
        self.run("set-leader", false, |mut c, t| {
            let r = timed(req.clone(), t);
            async move { c.set_leader(r).await.map(|r| r.into_inner().old_uuid) }
        })
        .await
    }

    pub async fn take_lease(
        &self,
        stream: &str,
        candidate: &str,
        caught_up_seq: u64,
        lease_ms: u64,
    ) -> Result<pb::LeaseResponse, JournalError> {
        let req = pb::TakeLeaseRequest {
            stream: stream.into(),
            candidate_uuid: candidate.into(),
            caught_up_seq,
            lease_ms,
        };
        self.run("take-lease", false, |mut c, t| {
            let r = timed(req.clone(), t);
            async move { c.take_lease(r).await.map(|r| r.into_inner()) }
        })
        .await
    }

    pub async fn renew_lease(&self, stream: &str, uuid: &str) -> Result<pb::LeaseResponse, JournalError> {
        let req = pb::RenewLeaseRequest { stream: stream.into(), uuid: uuid.into() };
        // Renewing twice is harmless: retry like a read.
        self.run("renew-lease", true, |mut c, t| {
            let r = timed(req.clone(), t);
            async move { c.renew_lease(r).await.map(|r| r.into_inner()) }
        })
        .await
    }

    pub async fn trim(&self, stream: &str, upto_seq: u64) -> Result<u64, JournalError> {
        let req = pb::TrimRequest { stream: stream.into(), upto_seq };
        self.run("trim", true, |mut c, t| {
            let r = timed(req.clone(), t);
            async move { c.trim(r).await.map(|r| r.into_inner().first_seq) }
        })
        .await
    }

    pub async fn get_meta(&self, stream: &str, key: &str) -> Result<Option<Vec<u8>>, JournalError> {
        let req = pb::GetMetaRequest { stream: stream.into(), key: key.into() };
        self.run("get-meta", true, |mut c, t| {
            let r = timed(req.clone(), t);
            async move {
                c.get_meta(r).await.map(|r| {
                    let r = r.into_inner();
                    r.found.then(|| r.value.to_vec())
                })
            }
        })
        .await
    }

    pub async fn cas_meta(
        &self,
        stream: &str,
        key: &str,
        expected: Option<Vec<u8>>,
        value: Vec<u8>,
    ) -> Result<(), JournalError> {
        let req = pb::CasMetaRequest {
            stream: stream.into(),
            key: key.into(),
            expected: expected.map(Into::into),
            value: value.into(),
        };
        self.run("cas-meta", false, |mut c, t| {
            let r = timed(req.clone(), t);
            async move { c.cas_meta(r).await.map(|_| ()) }
        })
        .await
    }

    pub async fn stream_info(&self, stream: &str) -> Result<pb::StreamInfoResponse, JournalError> {
        let req = pb::StreamInfoRequest { stream: stream.into() };
        self.run("stream-info", true, |mut c, t| {
            let r = timed(req.clone(), t);
            async move { c.stream_info(r).await.map(|r| r.into_inner()) }
        })
        .await
    }

    /// Status of the node at `addr` (one of `endpoints()`).
    pub async fn status_of(&self, addr: &str) -> Result<pb::StatusResponse, JournalError> {
        let i = self.shared.book.lock().unwrap().hint(addr).map(|(i, changed)| {
            if changed {
                self.shared.forget(&[i]);
            }
            i
        });
        let Some(i) = i else { return Err(JournalError::Unavailable(format!("{addr}: this client knows too many journal nodes"))) };
        self.node_status(i).await
    }

    /// Status of one node, by its slot: the endpoints given to `new` are
    /// slots 0, 1, … in order (duplicates dropped).
    pub async fn node_status(&self, i: usize) -> Result<pb::StatusResponse, JournalError> {
        let addr = self.endpoint(i);
        let r = timed(pb::StatusRequest {}, self.cfg.request_timeout);
        match self.raw(i).status(r).await {
            Ok(s) => {
                let s = s.into_inner();
                self.shared.learn(&s);
                Ok(s)
            }
            Err(s) => Err(match classify(&s) {
                Failure::Final(e) => e,
                _ => JournalError::Unavailable(format!("{addr}: {}", s.message())),
            }),
        }
    }

    /// Learns the journal's current membership from every node it knows
    /// (waits for their answers).
    pub async fn learn_members(&self) {
        let live = self.shared.book.lock().unwrap().live();
        let asks = live.into_iter().map(|i| {
            let mut raw = self.raw(i);
            let r = timed(pb::StatusRequest {}, self.cfg.request_timeout);
            async move { raw.status(r).await.ok().map(|s| s.into_inner()) }
        });
        for s in futures::future::join_all(asks).await.into_iter().flatten() {
            self.shared.learn(&s);
        }
    }

    /// The members as the Raft leader sees them.
    pub async fn members(&self) -> Result<pb::MembersResponse, JournalError> {
        self.run("members", true, |mut c, t| async move { c.members(timed(pb::MembersRequest {}, t)).await.map(|r| r.into_inner()) })
            .await
    }

    /// Adds node `id` at `addr`: a learner until caught up, then a voter.
    /// Waits up to `server::CATCH_UP_TIMEOUT` (and a little more) for it.
    pub async fn add_node(&self, id: u64, addr: &str) -> Result<pb::MembersResponse, JournalError> {
        let req = pb::AddNodeRequest { node_id: id, addr: addr.into() };
        let wait = crate::limits::CATCH_UP_TIMEOUT + Duration::from_secs(30);
        let out = self
            .run("add-node", true, |mut c, _t| {
                let r = timed(req.clone(), wait);
                async move { c.add_node(r).await.map(|r| r.into_inner()) }
            })
            .await;
        self.refresh(true);
        out
    }

    /// Removes node `id` (refused if that would leave no quorum).
    pub async fn remove_node(&self, id: u64) -> Result<pb::MembersResponse, JournalError> {
        let req = pb::RemoveNodeRequest { node_id: id };
        let out = self
            .run("remove-node", true, |mut c, t| {
                let r = timed(req.clone(), t);
                async move { c.remove_node(r).await.map(|r| r.into_inner()) }
            })
            .await;
        self.refresh(true);
        out
    }

    /// Reads `stream` from `from_seq` (0 = the first retained record); with
    /// `follow`, keeps tailing new records.
    pub fn read(&self, stream: &str, from_seq: u64, follow: bool) -> Reader<'_> {
        Reader { client: self, stream: stream.into(), next_seq: from_seq, follow, current: None, done: false }
    }
}

/// A resumable reader over a stream; survives node failures.
pub struct Reader<'a> {
    client: &'a JournalClient,
    stream: String,
    next_seq: u64,
    follow: bool,
    current: Option<tonic::Streaming<pb::ReadResponse>>,
    done: bool,
}

impl Reader<'_> {
    /// The next batch of records; `None` at the end (only without `follow`).
    pub async fn next_batch(&mut self) -> Result<Option<Vec<pb::Record>>, JournalError> {
        loop {
            if self.done {
                return Ok(None);
            }
            if self.current.is_none() {
                let req = pb::ReadRequest { stream: self.stream.clone(), from_seq: self.next_seq, follow: self.follow };
                let s = self
                    .client
                    .run("read", true, |mut c, _t| {
                        let r = req.clone();
                        async move { c.read(r).await.map(|r| r.into_inner()) }
                    })
                    .await?;
                self.current = Some(s);
            }
            match self.current.as_mut().unwrap().message().await {
                Ok(Some(batch)) => {
                    // A resumed read may start from a lagging node; drop anything already seen.
                    let records: Vec<_> = batch.records.into_iter().filter(|r| r.seq >= self.next_seq).collect();
                    if let (Some(first), Some(last)) = (records.first(), records.last()) {
                        // A gap would skip records a replica must apply: refuse
                        // the batch (cheap, so checked in release builds too).
                        // From seq 0 means from the first retained record.
                        if (self.next_seq != 0 && first.seq != self.next_seq) || records.windows(2).any(|w| w[1].seq != w[0].seq + 1) {
                            self.current = None;
                            return Err(JournalError::Unavailable(format!(
                                "the journal sent stream {} records {}..={} with a gap after seq {}; nothing was taken from them",
                                self.stream,
                                first.seq,
                                last.seq,
                                self.next_seq.saturating_sub(1)
                            )));
                        }
                        self.next_seq = last.seq + 1;
                        return Ok(Some(records));
                    }
                }
                Ok(None) => {
                    self.current = None;
                    if !self.follow {
                        self.done = true;
                    }
                }
                Err(status) => {
                    self.current = None;
                    if let Failure::Final(e) = classify(&status) {
                        return Err(e);
                    }
                    tokio::time::sleep(self.client.cfg.retry_pause).await;
                }
            }
        }
    }

    /// Seq of the next record this reader will return.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }
}

/// Requests an open append stream buffers before `send` waits.
const APPEND_STREAM_BUFFER: usize = 16;

struct OpenAppendStream {
    endpoint: usize,
    tx: tokio::sync::mpsc::Sender<pb::AppendRequest>,
    replies: tonic::Streaming<pb::AppendStreamReply>,
}

/// One writer's appends over a long-lived `AppendStream` to the leader: the
/// same answers as `JournalClient::append`, without a new HTTP/2 request
/// (headers both ways) per append. One append at a time (`&mut self`).
///
/// The retry rules are `JournalClient`'s: `not-leader` moves the stream to
/// the hinted leader (nothing was proposed); a stream that breaks or stays
/// silent past the request timeout after a request went out makes that
/// append `OutcomeUnknown`, and the next append opens a new stream. A node
/// without `AppendStream` (an older journal) is answered with unary appends
/// from then on.
pub struct AppendSession {
    client: std::sync::Arc<JournalClient>,
    open: Option<OpenAppendStream>,
    unary: bool,
}

impl AppendSession {
    pub fn new(client: std::sync::Arc<JournalClient>) -> AppendSession {
        AppendSession { client, open: None, unary: false }
    }

    pub fn client(&self) -> &std::sync::Arc<JournalClient> {
        &self.client
    }

    /// False once a node answered that it has no `AppendStream` (the
    /// session then appends with unary calls).
    pub fn streams(&self) -> bool {
        !self.unary
    }

    /// Appends `records`; returns the seq of the last one.
    pub async fn append(
        &mut self,
        stream: &str,
        leader_uuid: &str,
        records: Vec<Vec<u8>>,
        expect_last_seq: Option<u64>,
    ) -> Result<u64, JournalError> {
        let req = append_request(stream, leader_uuid, records, expect_last_seq);
        let client = self.client.clone();
        let mut at = Attempts::new(&client);
        loop {
            if self.unary {
                return client.append_unary(req).await;
            }
            let mut open = match self.open.take() {
                Some(o) => o,
                None => match client.open_append_stream(at.i).await {
                    Ok(o) => o,
                    Err(status) if status.code() == Code::Unimplemented => {
                        self.unary = true;
                        continue;
                    }
                    Err(status) => {
                        // Nothing was sent on a stream that did not open.
                        at.not_applied(&client, classify(&status), &status)?;
                        at.pause_or_give_up(&client, "append").await?;
                        continue;
                    }
                },
            };
            let i = open.endpoint;
            at.i = i;
            if open.tx.send(req.clone()).await.is_err() {
                // The stream's sender is gone: the request was not sent;
                // after a pause a new stream to the same node takes it.
                at.last = format!("{}: the append stream closed", client.endpoint(i));
                at.pause_or_give_up(&client, "append").await?;
                tokio::time::sleep(client.cfg.retry_pause).await;
                continue;
            }
            let unknown = |why: String| {
                JournalError::OutcomeUnknown(format!(
                    "OUTCOME_UNKNOWN: append sent to {} got no answer ({why}); it may or may not be applied",
                    client.endpoint(i)
                ))
            };
            let reply = match tokio::time::timeout(client.cfg.request_timeout, open.replies.message()).await {
                Err(_) => return Err(unknown(format!("no reply within {:?}", client.cfg.request_timeout))),
                Ok(Err(status)) if status.code() == Code::Unimplemented => {
                    self.unary = true;
                    continue;
                }
                Ok(Err(status)) => return Err(unknown(status.to_string())),
                Ok(Ok(None)) => return Err(unknown("the append stream ended".into())),
                Ok(Ok(Some(reply))) => reply,
            };
            match reply.result {
                Some(pb::append_stream_reply::Result::LastSeq(seq)) => {
                    *client.preferred.lock().unwrap() = i;
                    self.open = Some(open);
                    return Ok(seq);
                }
                Some(pb::append_stream_reply::Result::Error(e)) => {
                    let status = crate::errors::from_rpc_error(&e);
                    match classify(&status) {
                        Failure::Redirect(hint) => {
                            // Not proposed: this node is not the leader.
                            at.moved(&client, hint, status.message());
                            at.pause_or_give_up(&client, "append").await?;
                        }
                        Failure::Final(e) => {
                            self.open = Some(open);
                            return Err(e);
                        }
                        Failure::Transport { message, .. } => return Err(unknown(message)),
                    }
                }
                None => return Err(unknown("a reply without a result".into())),
            }
        }
    }
}

fn append_request(stream: &str, leader_uuid: &str, records: Vec<Vec<u8>>, expect_last_seq: Option<u64>) -> pb::AppendRequest {
    pb::AppendRequest {
        stream: stream.into(),
        leader_uuid: leader_uuid.into(),
        records: records.into_iter().map(Into::into).collect(),
        expect_last_seq,
    }
}

/// Where a call that was not applied goes next, and when to give up:
/// `not-leader` hints are followed, other failures move on to the next
/// endpoint, and after a round over all of them the caller pauses, until
/// `retry_for` has passed (`Unavailable`).
struct Attempts {
    /// The endpoint to try.
    i: usize,
    tried_in_round: usize,
    deadline: Instant,
    /// The last failure, for the final error.
    last: String,
}

impl Attempts {
    fn new(client: &JournalClient) -> Attempts {
        Attempts {
            i: {
                let p = *client.preferred.lock().unwrap();
                let book = client.shared.book.lock().unwrap();
                if book.live().contains(&p) { p } else { book.next(p) }
            },
            tried_in_round: 0,
            deadline: Instant::now() + client.cfg.retry_for,
            last: String::new(),
        }
    }

    /// The call at `i` was not applied (`why`); `hint`: the leader's address.
    fn moved(&mut self, client: &JournalClient, hint: Option<String>, why: &str) {
        self.last = format!("{}: {why}", client.endpoint(self.i));
        let mut book = client.shared.book.lock().unwrap();
        match hint.and_then(|h| book.hint(&h)) {
            Some((j, changed)) if j != self.i => {
                drop(book);
                if changed {
                    client.shared.forget(&[j]);
                }
                self.i = j;
            }
            _ => {
                self.i = book.next(self.i);
                self.tried_in_round += 1;
            }
        }
    }

    /// A call that was not applied failed with `status`: a definite answer
    /// is returned as the error; otherwise the next endpoint is chosen.
    fn not_applied(&mut self, client: &JournalClient, failure: Failure, status: &Status) -> Result<(), JournalError> {
        match failure {
            Failure::Final(e) => return Err(e),
            Failure::Redirect(hint) => self.moved(client, hint, status.message()),
            Failure::Transport { message, .. } => self.moved(client, None, &message),
        }
        Ok(())
    }

    /// Gives up past the deadline; pauses after each round over all nodes.
    async fn pause_or_give_up(&mut self, client: &JournalClient, what: &str) -> Result<(), JournalError> {
        if Instant::now() >= self.deadline {
            return Err(JournalError::Unavailable(format!(
                "UNAVAILABLE: {what}: no journal node accepted it within {} ms (last: {})",
                client.cfg.retry_for.as_millis(),
                self.last
            )));
        }
        let live = client.shared.book.lock().unwrap().live().len();
        if self.tried_in_round >= live {
            self.tried_in_round = 0;
            // No node took it: perhaps the nodes were replaced.
            client.refresh(true);
            tokio::time::sleep(client.cfg.retry_pause).await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A call to a port with a bound socket that does not listen is refused
    /// by the kernel: classified as never sent (safe to retry anywhere),
    /// from the typed I/O error, whatever the message says.
    #[tokio::test]
    async fn a_refused_connection_is_known_unsent() {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let port = socket.local_addr().unwrap().port();
        let channel = Channel::from_shared(format!("http://127.0.0.1:{port}")).unwrap().connect_lazy();
        let status = RawClient::new(channel).status(pb::StatusRequest {}).await.expect_err("nothing listens there");
        assert!(never_connected(&status), "{status:?}");
        match classify(&status) {
            Failure::Transport { sent, message } => assert!(!sent, "{message}"),
            _ => panic!("not a transport failure: {status:?}"),
        }
        // A status without a transport source (a server's own error) is not.
        assert!(!never_connected(&Status::unavailable("Connection refused")));
        drop(socket);
    }

    #[test]
    fn tls_refusals_are_recognised() {
        for chain in [
            "transport error: received fatal alert: CertificateRequired",
            "invalid peer certificate: UnknownIssuer",
            "received fatal alert: UnknownCA",
        ] {
            assert!(tls_refusal(chain), "{chain}");
        }
        for chain in ["tcp connect error: Connection refused", "h2 protocol error: stream reset", "operation was canceled: connection closed"] {
            assert!(!tls_refusal(chain), "{chain}");
        }
    }
}
