//! Raft transport between journal nodes over gRPC (`keel.journal.v1.Raft`).
//!
//! openraft's messages travel as MessagePack inside a `RaftMessage`. The
//! receiving side answers `Result<Response, RaftError>` encoded the same way.
//! Transport failures become `Unreachable` (openraft backs off and retries);
//! a remote error is reported as-is. Snapshots are sent whole in one message,
//! bounded by `MAX_RAFT_MESSAGE_BYTES`.

use std::future::Future;
use std::time::Duration;

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

impl RaftNetworkV2<TypeConfig> for Peer {
    type SnapshotData = Vec<u8>;

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
        }
    }

    #[test]
    fn raft_messages_round_trip() {
        let vote = VoteRequest::<TypeConfig>::new(openraft::impls::Vote::new(4, 2), None);
        let back: VoteRequest<TypeConfig> = decode(&encode(&vote).unwrap()).unwrap();
        assert_eq!(back, vote);
    }
}
