//! Raft transport between journal nodes over gRPC (`keel.journal.v1.Raft`).
//!
//! openraft's messages travel as MessagePack inside a `RaftMessage`. The
//! receiving side answers `Result<Response, RaftError>` encoded the same way.
//! Replication uses one long-lived bidirectional stream per follower
//! (`StreamAppend`): openraft's AppendEntries requests go out as they are made,
//! without waiting for the previous answer, and the follower's results come
//! back in order. A request unanswered for the RPC's soft TTL ends the stream
//! (openraft then backs off and starts a new one); an idle stream is fine.
//! Transport failures become `Unreachable` (openraft backs off and retries);
//! a remote error is reported as-is. Snapshots are sent whole in one message,
//! bounded by `MAX_RAFT_MESSAGE_BYTES`.

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

/// The snapshot as sent to a follower.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct SnapshotMessage {
    pub vote: VoteOf<TypeConfig>,
    pub meta: openraft::alias::SnapshotMetaOf<TypeConfig>,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

/// Makes one client per peer.
#[derive(Clone, Default)]
pub struct Network;

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Peer {
        let endpoint = Channel::from_shared(format!("http://{}", node.addr))
            .expect("peer address was validated at start-up")
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true);
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

impl RaftNetworkV2<TypeConfig> for Peer {
    type SnapshotData = Vec<u8>;

    fn stream_append<'s, S>(&'s mut self, input: S, option: RPCOption) -> StreamAppendFuture<'s>
    where
        S: Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
    {
        let target = self.target;
        let ttl = option.soft_ttl();
        // Send times of the requests not answered yet, oldest first.
        let unanswered: Arc<Mutex<VecDeque<Instant>>> = Arc::default();
        let sent = unanswered.clone();
        // An request that cannot be encoded ends the stream (never skipped:
        // answers must match requests in order).
        let outbound = futures::stream::unfold(input, move |mut input| {
            let sent = sent.clone();
            async move {
                let req = input.next().await?;
                match encode(&req) {
                    Ok(data) => {
                        sent.lock().expect("not poisoned").push_back(Instant::now());
                        Some((RaftMessage { data: data.into() }, input))
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
            let inbound = match tokio::time::timeout(ttl, client.stream_append(tonic::Request::new(outbound))).await {
                Ok(Ok(r)) => r.into_inner(),
                Ok(Err(status)) => return Err(unreachable(target, format!("stream_append: {}", status.message()))),
                Err(_) => return Err(unreachable(target, format!("stream_append: no answer within {ttl:?}"))),
            };
            let replies = futures::stream::unfold(Some(inbound), move |state| {
                let unanswered = unanswered.clone();
                async move {
                    let mut inbound = state?;
                    loop {
                        match tokio::time::timeout(ttl, inbound.message()).await {
                            Ok(Ok(Some(m))) => {
                                unanswered.lock().expect("not poisoned").pop_front();
                                let item = match decode::<StreamReply>(&m.data) {
                                    Ok(Ok(r)) => Ok(r),
                                    Ok(Err(remote)) => Err(unreachable(target, format!("stream_append failed remotely: {remote}"))),
                                    Err(e) => Err(unreachable(target, e)),
                                };
                                let go_on = matches!(item, Ok(Ok(_)));
                                return Some((item, go_on.then_some(inbound)));
                            }
                            Ok(Ok(None)) => return None,
                            Ok(Err(status)) => {
                                return Some((Err(unreachable(target, format!("stream_append: {}", status.message()))), None));
                            }
                            Err(_) => {
                                let oldest = unanswered.lock().expect("not poisoned").front().copied();
                                if oldest.is_some_and(|t| t.elapsed() >= ttl) {
                                    let e = unreachable(target, format!("stream_append: a request unanswered for {ttl:?}"));
                                    return Some((Err(e), None));
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

    async fn full_snapshot(
        &mut self,
        vote: VoteOf<TypeConfig>,
        snapshot: SnapshotOf<TypeConfig, Vec<u8>>,
        _cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let msg = SnapshotMessage { vote, meta: snapshot.meta, data: snapshot.snapshot };
        // A snapshot can be large: allow it the hard TTL, not the soft one.
        self.call("snapshot", &msg, option.hard_ttl()).await.map_err(|e| match e {
            RPCError::Unreachable(u) => StreamingError::Unreachable(u),
            other => StreamingError::Unreachable(Unreachable::new(&Msg(other.to_string()))),
        })
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
            let _ = decode::<SnapshotMessage>(&junk);
            let _ = decode::<Result<VoteResponse<TypeConfig>, String>>(&junk);
            let _ = decode::<StreamReply>(&junk);
        }
    }

    #[test]
    fn raft_messages_round_trip() {
        let vote = VoteRequest::<TypeConfig>::new(openraft::impls::Vote::new(4, 2), None);
        let back: VoteRequest<TypeConfig> = decode(&encode(&vote).unwrap()).unwrap();
        assert_eq!(back, vote);
    }
}
