//! Raft transport between journal nodes over gRPC (`keel.journal.v1.Raft`).
//!
//! openraft's messages travel as MessagePack inside a `RaftMessage`. The
//! receiving side answers `Result<Response, RaftError>` encoded the same way.
//! Replication uses one long-lived bidirectional stream per follower
//! (`StreamAppend`): openraft's AppendEntries requests go out as they are made,
//! without waiting for the previous answer, and the follower's results come
//! back in order. A request unanswered for `ANSWER_WITHIN` ends the stream
//! (openraft then backs off and starts a new one); an idle stream is fine.
//! An entry-less request (the commit notice openraft sends after each entry,
//! a heartbeat) waits up to 2 ms for the next request to carry it (`Rides`).
//! Transport failures become `Unreachable` (openraft backs off and retries;
//! a stream that cannot be opened is retried no sooner than `REOPEN_INTERVAL`);
//! a remote error is reported as-is. A snapshot is sent as a run of
//! `InstallSnapshot` calls, each carrying the next `SNAPSHOT_CHUNK_BYTES` of
//! its byte stream (`SnapshotChunk`, read from the leader's record files);
//! the follower stages them on disk and installs on the last one, so neither
//! side holds more than a chunk in memory. Any failure ends the transfer and
//! openraft starts a new one (from offset 0).

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;

use futures::Stream;
use futures::StreamExt;

use keel_proto::journal::RaftMessage;
use keel_proto::journal::raft_client::RaftClient;
use openraft::alias::SnapshotOf;
use openraft::alias::VoteOf;
use openraft::errors::NetworkError;
use openraft::errors::RPCError;
use openraft::errors::ReplicationClosed;
use openraft::errors::StreamingError;
use openraft::errors::Unreachable;
use openraft::network::RPCOption;
use openraft::network::RaftNetworkFactory;
use openraft::network::v2::RaftNetworkV2;
use openraft::raft::AppendEntriesRequest;
use openraft::raft::AppendEntriesResponse;
use openraft::raft::StreamAppendResult;
use openraft::raft::SnapshotResponse;
use openraft::raft::VoteRequest;
use openraft::raft::VoteResponse;
use openraft::impls::BasicNode;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::transport::Channel;

use crate::records::SnapshotData;
use crate::tls::JournalTls;
use crate::types::LogId;
use crate::types::NodeId;
use crate::types::TypeConfig;

/// Largest Raft message (entries batch or whole snapshot) either side accepts.
pub const MAX_RAFT_MESSAGE_BYTES: usize = 1 << 30;
/// How long to wait for a TCP connection to a peer.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

pub fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, String> {
    rmp_serde::to_vec_named(v).map_err(|e| format!("encode: {e}"))
}

pub fn decode<T: DeserializeOwned>(b: &[u8]) -> Result<T, String> {
    rmp_serde::from_slice(b).map_err(|e| format!("decode: {e}"))
}

/// Bytes of a snapshot's stream per `InstallSnapshot` call.
pub const SNAPSHOT_CHUNK_BYTES: usize = 4 << 20;

/// One piece of a snapshot sent to a follower: `data` is the snapshot's
/// byte stream at `offset`; `done` marks the last piece.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct SnapshotChunk {
    pub vote: VoteOf<TypeConfig>,
    pub meta: openraft::alias::SnapshotMetaOf<TypeConfig>,
    pub offset: u64,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    pub done: bool,
}

/// The follower's answer to a chunk: `None` until the last one.
pub type SnapshotChunkReply = Result<Option<SnapshotResponse<TypeConfig>>, String>;

/// Makes one client per peer. With TLS, a node shows its peers its own
/// certificate (journal nodes' certificates serve as client certificates
/// too) and checks theirs against the deployment's CA (tls.rs).
#[derive(Clone, Default)]
pub struct Network {
    pub tls: JournalTls,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Peer {
        let mut endpoint = Channel::from_shared(format!("{}://{}", self.tls.scheme(), node.addr))
            .expect("peer address was validated at start-up")
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true);
        if let Some(tls) = self.tls.client_config() {
            endpoint = endpoint.tls_config(tls).expect("the TLS files were checked at start-up");
        }
        let client = RaftClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(MAX_RAFT_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_RAFT_MESSAGE_BYTES);
        Peer { target, client }
    }
}

pub struct Peer {
    target: NodeId,
    client: RaftClient<Channel>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Msg(String);

fn unreachable(target: NodeId, what: impl std::fmt::Display) -> RPCError<TypeConfig> {
    RPCError::Unreachable(Unreachable::new(&Msg(format!("journal node {target}: {what}"))))
}

impl Peer {
    async fn call<Req, Resp>(
        &mut self,
        which: &'static str,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, RPCError<TypeConfig>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
    {
        let data = encode(req).map_err(|e| RPCError::Network(NetworkError::new(&Msg(e))))?;
        let mut request = tonic::Request::new(RaftMessage { data: data.into() });
        request.set_timeout(timeout);
        let reply = match which {
            "vote" => self.client.vote(request).await,
            "append" => self.client.append_entries(request).await,
            "transfer-leader" => self.client.transfer_leader(request).await,
            _ => self.client.install_snapshot(request).await,
        }
        .map_err(|status| unreachable(self.target, format!("{which}: {}", status.message())))?;
        let result: Result<Resp, String> =
            decode(&reply.into_inner().data).map_err(|e| unreachable(self.target, e))?;
        result.map_err(|e| unreachable(self.target, format!("{which} failed remotely: {e}")))
    }
}

/// What one `StreamAppend` response message carries.
pub type StreamReply = Result<StreamAppendResult<TypeConfig>, String>;

type StreamAppendFuture<'s> = openraft::base::BoxFuture<
    's,
    Result<openraft::base::BoxStream<'s, Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>>, RPCError<TypeConfig>>,
>;

/// How long a request on a replication stream may wait for its answer
/// before the stream is given up (openraft's TTL for it is 3/4 of a
/// heartbeat, 37.5 ms). A follower answers after writing and fsyncing the
/// request's entries: up to `server::MAX_ENTRIES_PER_APPEND_ENTRIES` appends of up to
/// `streams::MAX_APPEND_BYTES` each can take far longer than a heartbeat on a busy
/// disk, and each give-up cost a 200 ms backoff and the resending of those
/// entries: with both followers behind, commits (a Keel primary's lease
/// renewals among them) stalled for seconds. A follower that is gone
/// stops only its own stream; the other keeps committing.
const ANSWER_WITHIN: Duration = Duration::from_secs(2);

/// The least time between two attempts to open a replication stream to a
/// peer that cannot be reached (connection refused comes back at once).
const REOPEN_INTERVAL: Duration = Duration::from_millis(100);

/// How long an entry-less AppendEntries (the leader's new commit index, a
/// heartbeat, a probe) may wait for the next request to ride along.
const RIDE_WAIT: Duration = Duration::from_millis(2);

/// Lets an entry-less request ride on the next one. openraft sends one as
/// soon as an entry commits, to tell followers the new commit index; with
/// one append at a time (the sidecar's), that doubles the messages each
/// follower handles, and the leader sends them before it answers the
/// client. Held for up to `RIDE_WAIT`, such a request is dropped when the
/// next one can say the same (`carries`), and its answer is derived from
/// that one's (`answers`); otherwise it goes out on its own.
struct Rides<S> {
    input: S,
    /// An entry-less request waiting, the positions of those it replaced,
    /// and until when it may wait.
    held: Option<(AppendEntriesRequest<TypeConfig>, Vec<Option<LogId>>, tokio::time::Instant)>,
    /// A request that came while one was held and could not carry it.
    next: Option<AppendEntriesRequest<TypeConfig>>,
    ended: bool,
    /// How long an entry-less request may wait (`RIDE_WAIT`).
    wait: Duration,
}

impl<S: Stream<Item = AppendEntriesRequest<TypeConfig>> + Unpin> Rides<S> {
    fn new(input: S, wait: Duration) -> Self {
        Rides { input, held: None, next: None, ended: false, wait }
    }

    /// The next request to send, with the log positions of the entry-less
    /// requests it carries (oldest first); `None` when the input ended.
    async fn next(&mut self) -> Option<(AppendEntriesRequest<TypeConfig>, Vec<Option<LogId>>)> {
        loop {
            let req = if let Some(r) = self.next.take() {
                r
            } else if self.ended {
                let (h, carried, _) = self.held.take()?;
                return Some((h, carried));
            } else if let Some((_, _, until)) = &self.held {
                match tokio::time::timeout_at(*until, self.input.next()).await {
                    Ok(Some(r)) => r,
                    Ok(None) => {
                        self.ended = true;
                        continue;
                    }
                    Err(_) => {
                        let (h, carried, _) = self.held.take().expect("held");
                        return Some((h, carried));
                    }
                }
            } else {
                match self.input.next().await {
                    Some(r) => r,
                    None => {
                        self.ended = true;
                        continue;
                    }
                }
            };
            match self.held.take() {
                Some((h, mut carried, until)) if carries(&h, &req) => {
                    carried.push(h.prev_log_id.clone());
                    if req.entries.is_empty() {
                        self.held = Some((req, carried, until));
                        continue;
                    }
                    return Some((req, carried));
                }
                Some((h, carried, _)) => {
                    self.next = Some(req);
                    return Some((h, carried));
                }
                None if req.entries.is_empty() => {
                    self.held = Some((req, Vec::new(), tokio::time::Instant::now() + self.wait));
                }
                None => return Some((req, Vec::new())),
            }
        }
    }
}

/// Whether `next` says all that `held`, an entry-less request, says: the
/// same leader vote and log position, and a commit index at least as new.
fn carries(held: &AppendEntriesRequest<TypeConfig>, next: &AppendEntriesRequest<TypeConfig>) -> bool {
    held.entries.is_empty()
        && held.vote == next.vote
        && held.prev_log_id == next.prev_log_id
        && next.leader_commit >= held.leader_commit
}

/// The answers to the requests a message carried (`carried`: their log
/// positions, oldest first), then the message's own `reply`. An entry-less
/// request at the same position as the carrier would have been answered
/// alike: success matching its own position, or the same refusal (then
/// only the first answer is given: a refusal ends the stream).
fn answers(reply: StreamAppendResult<TypeConfig>, carried: &[Option<LogId>]) -> Vec<StreamAppendResult<TypeConfig>> {
    match &reply {
        Ok(_) => carried.iter().map(|p| Ok(p.clone())).chain(std::iter::once(reply)).collect(),
        Err(_) => vec![reply],
    }
}

impl RaftNetworkV2<TypeConfig> for Peer {
    type SnapshotData = SnapshotData;

    fn stream_append<'s, S>(&'s mut self, input: S, option: RPCOption) -> StreamAppendFuture<'s>
    where
        S: Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
    {
        let target = self.target;
        let ttl = option.soft_ttl();
        let answer_within = ttl.max(ANSWER_WITHIN);
        // Per message sent and not answered yet, oldest first: when it was
        // sent, and the log positions of the entry-less requests it carries
        // (see `Rides`), whose answers come before its own.
        let unanswered: Arc<Mutex<VecDeque<(Instant, Vec<Option<LogId>>)>>> = Arc::default();
        let sent = unanswered.clone();
        // A request that cannot be encoded ends the stream (never skipped:
        // answers must match requests in order).
        let outbound = futures::stream::unfold(Rides::new(input, RIDE_WAIT), move |mut rides| {
            let sent = sent.clone();
            async move {
                let (req, carried) = rides.next().await?;
                match encode(&req) {
                    Ok(data) => {
                        sent.lock().expect("not poisoned").push_back((Instant::now(), carried));
                        Some((RaftMessage { data: data.into() }, rides))
                    }
                    Err(e) => {
                        tracing::error!(target_node = target, error = %e, "cannot encode AppendEntries; ending the stream");
                        None
                    }
                }
            }
        });
        let mut client = self.client.clone();
        Box::pin(async move {
            let started = tokio::time::Instant::now();
            let opened = tokio::time::timeout(ttl, client.stream_append(tonic::Request::new(outbound))).await;
            let failed = match opened {
                Ok(Ok(r)) => Ok(r.into_inner()),
                Ok(Err(status)) => Err(format!("stream_append: {}", status.message())),
                Err(_) => Err(format!("stream_append: no answer within {ttl:?}")),
            };
            let inbound = match failed {
                Ok(inbound) => inbound,
                Err(why) => {
                    // openraft starts the next stream at once when one
                    // cannot be opened (its backoff only paces requests on
                    // an open stream): against a peer that is down, that is
                    // a busy loop through the Raft core.
                    tokio::time::sleep_until(started + REOPEN_INTERVAL).await;
                    return Err(unreachable(target, why));
                }
            };
            type Item = Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>;
            let ready: VecDeque<Item> = VecDeque::new();
            let replies = futures::stream::unfold((Some(inbound), ready), move |(state, mut ready)| {
                let unanswered = unanswered.clone();
                async move {
                    if let Some(item) = ready.pop_front() {
                        return Some((item, (state, ready)));
                    }
                    let mut inbound = state?;
                    loop {
                        match tokio::time::timeout(ttl, inbound.message()).await {
                            Ok(Ok(Some(m))) => {
                                let carried = unanswered.lock().expect("not poisoned").pop_front().map(|(_, c)| c).unwrap_or_default();
                                let reply = match decode::<StreamReply>(&m.data) {
                                    Ok(Ok(r)) => r,
                                    Ok(Err(remote)) => {
                                        let e = unreachable(target, format!("stream_append failed remotely: {remote}"));
                                        return Some((Err(e), (None, ready)));
                                    }
                                    Err(e) => return Some((Err(unreachable(target, e)), (None, ready))),
                                };
                                let go_on = reply.is_ok();
                                ready.extend(answers(reply, &carried).into_iter().map(Ok));
                                let first = ready.pop_front()?;
                                return Some((first, (go_on.then_some(inbound), ready)));
                            }
                            Ok(Ok(None)) => return None,
                            Ok(Err(status)) => {
                                let e = unreachable(target, format!("stream_append: {}", status.message()));
                                return Some((Err(e), (None, ready)));
                            }
                            Err(_) => {
                                let oldest = unanswered.lock().expect("not poisoned").front().map(|(t, _)| *t);
                                if oldest.is_some_and(|t| t.elapsed() >= answer_within) {
                                    let e = unreachable(target, format!("stream_append: a request unanswered for {answer_within:?}"));
                                    return Some((Err(e), (None, ready)));
                                }
                            }
                        }
                    }
                }
            });
            Ok(Box::pin(replies) as openraft::base::BoxStream<'s, _>)
        })
    }

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call("append", &rpc, option.soft_ttl()).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call("vote", &rpc, option.soft_ttl()).await
    }

    async fn transfer_leader(
        &mut self,
        req: openraft::raft::TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<openraft::raft::TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call("transfer-leader", &req, option.soft_ttl()).await
    }

    async fn full_snapshot(
        &mut self,
        vote: VoteOf<TypeConfig>,
        snapshot: SnapshotOf<TypeConfig, SnapshotData>,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let target = self.target;
        let total = snapshot.snapshot.len();
        let mut reader = Some(snapshot.snapshot.reader());
        let mut offset = 0u64;
        let mut cancel = std::pin::pin!(cancel);
        let started = Instant::now();
        loop {
            // Read the next chunk off the runtime's thread: it may hit disk.
            let mut r = reader.take().expect("the reader is back after each chunk");
            let (r, data) = tokio::task::spawn_blocking(move || {
                use std::io::Read;
                let mut buf = Vec::with_capacity(SNAPSHOT_CHUNK_BYTES);
                let got = (&mut r).take(SNAPSHOT_CHUNK_BYTES as u64).read_to_end(&mut buf).map(|_| buf);
                (r, got)
            })
            .await
            .map_err(|e| StreamingError::Unreachable(Unreachable::new(&Msg(format!("snapshot reader: {e}")))))?;
            reader = Some(r);
            let data = data.map_err(|e| StreamingError::Unreachable(Unreachable::new(&Msg(format!("reading the snapshot to send: {e}")))))?;
            let n = data.len() as u64;
            let done = offset + n >= total;
            let chunk = SnapshotChunk { vote: vote.clone(), meta: snapshot.meta.clone(), offset, data, done };
            // A chunk may take long (the last one installs): allow each the hard TTL.
            let call = self.call::<_, Option<SnapshotResponse<TypeConfig>>>("snapshot", &chunk, option.hard_ttl());
            let reply = tokio::select! {
                closed = &mut cancel => {
                    return Err(StreamingError::Closed(closed));
                }
                r = call => r,
            };
            let reply = reply.map_err(|e| match e {
                RPCError::Unreachable(u) => StreamingError::Unreachable(u),
                other => StreamingError::Unreachable(Unreachable::new(&Msg(other.to_string()))),
            })?;
            offset += n;
            match (reply, done) {
                (Some(resp), true) => {
                    tracing::info!(target_node = target, bytes = total, secs = started.elapsed().as_secs_f64(), "snapshot sent");
                    return Ok(resp);
                }
                (None, false) => {}
                (_, _) => {
                    let e = format!("journal node {target} answered snapshot chunk at {offset} out of turn");
                    return Err(StreamingError::Unreachable(Unreachable::new(&Msg(e))));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Whatever arrives on the Raft port, decoding answers an error or a
        /// value; it never panics.
        #[test]
        fn raft_message_decoders_never_panic(junk in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode::<AppendEntriesRequest<TypeConfig>>(&junk);
            let _ = decode::<VoteRequest<TypeConfig>>(&junk);
            let _ = decode::<SnapshotChunk>(&junk);
            let _ = decode::<Result<VoteResponse<TypeConfig>, String>>(&junk);
            let _ = decode::<StreamReply>(&junk);
        }
    }

    fn log_id(index: u64) -> LogId {
        openraft::testing::log_id::<TypeConfig>(2, 1, index)
    }

    /// An AppendEntries of term 2 from node 1: after `prev`, entries up to
    /// `last` (none if `last == prev`), with commit index `commit`.
    fn req(prev: u64, last: u64, commit: u64) -> AppendEntriesRequest<TypeConfig> {
        let entries = (prev + 1..=last)
            .map(|i| <crate::types::Entry as openraft::entry::RaftEntry>::new_normal(log_id(i), crate::types::Command::Trim { stream: "s".into(), upto_seq: i, upto_bytes: None }))
            .collect();
        AppendEntriesRequest {
            vote: openraft::impls::Vote::new_committed(2, 1),
            prev_log_id: Some(log_id(prev)),
            leader_commit: Some(log_id(commit)),
            entries,
        }
    }

    #[test]
    fn a_request_carries_an_entryless_one_at_its_position_and_vote() {
        assert!(carries(&req(4, 4, 4), &req(4, 6, 4)), "a commit notice rides on the next entries");
        assert!(carries(&req(4, 4, 3), &req(4, 4, 4)), "a newer notice replaces an older one");
        assert!(!carries(&req(4, 5, 4), &req(5, 6, 5)), "a request with entries is never dropped");
        assert!(!carries(&req(4, 4, 4), &req(5, 6, 4)), "another log position");
        assert!(!carries(&req(4, 4, 4), &req(4, 6, 3)), "an older commit index");
        let mut other_vote = req(4, 6, 4);
        other_vote.vote = openraft::impls::Vote::new_committed(3, 2);
        assert!(!carries(&req(4, 4, 4), &other_vote), "another leader's term");
    }

    #[test]
    fn carried_requests_are_answered_first_and_alike() {
        let ok = answers(Ok(Some(log_id(6))), &[Some(log_id(4)), Some(log_id(4))]);
        assert_eq!(ok, vec![Ok(Some(log_id(4))), Ok(Some(log_id(4))), Ok(Some(log_id(6)))]);
        assert_eq!(answers(Ok(Some(log_id(6))), &[]), vec![Ok(Some(log_id(6)))]);
        let refused: StreamAppendResult<TypeConfig> = Err(openraft::raft::StreamAppendError::Conflict(log_id(4)));
        assert_eq!(answers(refused.clone(), &[Some(log_id(4))]), vec![refused], "a refusal ends the stream: given once");
    }

    async fn drain(input: Vec<(u64, AppendEntriesRequest<TypeConfig>)>, wait: Duration) -> Vec<(u64, u64, Vec<Option<LogId>>)> {
        // (delay before it in ms, request) -> (prev, last, carried) as sent
        let (tx, rx) = futures::channel::mpsc::unbounded();
        tokio::spawn(async move {
            for (delay, r) in input {
                tokio::time::sleep(Duration::from_millis(delay)).await;
                tx.unbounded_send(r).unwrap();
            }
        });
        let mut rides = Rides::new(rx, wait);
        let mut out = Vec::new();
        while let Some((r, carried)) = rides.next().await {
            let last = r.entries.last().map(|e| e.log_id.index).unwrap_or(r.prev_log_id.as_ref().unwrap().index);
            out.push((r.prev_log_id.unwrap().index, last, carried));
        }
        out
    }

    #[tokio::test]
    async fn entryless_requests_ride_on_the_next_one_or_go_alone_in_time() {
        // (The wait is 300 ms here.) A commit notice, then the next entries
        // within the wait: one message.
        let sent = drain(vec![(0, req(3, 4, 3)), (0, req(4, 4, 4)), (20, req(4, 6, 4))], Duration::from_millis(300)).await;
        assert_eq!(sent, vec![(3, 4, vec![]), (4, 6, vec![Some(log_id(4))])]);
        // Two notices in a row: the newer carries the older; sent at the
        // deadline, before the entries that come later.
        let sent = drain(vec![(0, req(4, 4, 3)), (0, req(4, 4, 4)), (900, req(4, 5, 4))], Duration::from_millis(300)).await;
        assert_eq!(sent, vec![(4, 4, vec![Some(log_id(4))]), (4, 5, vec![])]);
        // A request that cannot carry the held one: both go, in order.
        let sent = drain(vec![(0, req(4, 4, 4)), (0, req(2, 3, 4))], Duration::from_millis(300)).await;
        assert_eq!(sent, vec![(4, 4, vec![]), (2, 3, vec![])]);
        // The input ends with a notice held: it goes at once, not at the
        // deadline (openraft sends each heartbeat as a one-request stream).
        let t = std::time::Instant::now();
        let sent = drain(vec![(0, req(4, 4, 4))], Duration::from_secs(20)).await;
        assert_eq!(sent, vec![(4, 4, vec![])]);
        assert!(t.elapsed() < Duration::from_secs(10), "a heartbeat waited for the ride deadline");
    }

    #[test]
    fn raft_messages_round_trip() {
        let vote = VoteRequest::<TypeConfig>::new(openraft::impls::Vote::new(4, 2), None);
        let back: VoteRequest<TypeConfig> = decode(&encode(&vote).unwrap()).unwrap();
        assert_eq!(back, vote);
    }
}
