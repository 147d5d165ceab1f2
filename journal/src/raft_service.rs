//! The receiving side of the Raft transport: peers' openraft messages
//! (vote, append entries, leader transfer, snapshot chunks) arrive over
//! gRPC, are decoded (network.rs holds the codec and the sending side) and
//! handed to openraft. With TLS only journal nodes may call it.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use futures::StreamExt;
use keel_proto::journal as pb;
use tonic::Request;
use tonic::Response;
use tonic::Status;

use crate::network::SnapshotChunk;
use crate::network::SnapshotChunkReply;
use crate::records::SnapshotData;
use crate::network::decode;
use crate::network::encode;
use crate::state_machine::StateMachineStore;
use crate::types::Raft;


/// Receives openraft's messages from peers.
pub(crate) struct RaftTransport {
    pub(crate) raft: Raft,
    pub(crate) sm: StateMachineStore,
    /// Who may call it (None: no TLS, anyone).
    pub(crate) peers: Option<Arc<crate::tls::PeerCheck>>,
}

impl RaftTransport {
    /// With TLS, only journal nodes may call the Raft service (tls.rs).
    fn admit<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let Some(peers) = &self.peers else { return Ok(()) };
        let chain = req.peer_certs();
        peers.check(chain.as_deref().map(|c| c.as_slice())).map_err(|why| {
            tracing::warn!(remote = ?req.remote_addr(), %why, "refused a Raft call");
            Status::permission_denied(format!("PERMISSION_DENIED: only journal nodes may call the Raft service: {why}"))
        })
    }
}

fn raft_reply<T: serde::Serialize>(v: &T) -> Result<Response<pb::RaftMessage>, Status> {
    let data = encode(v).map_err(Status::internal)?;
    Ok(Response::new(pb::RaftMessage { data: data.into() }))
}

#[tonic::async_trait]
impl keel_proto::journal::raft_server::Raft for RaftTransport {
    async fn vote(&self, req: Request<pb::RaftMessage>) -> Result<Response<pb::RaftMessage>, Status> {
        self.admit(&req)?;
        let rpc = decode(&req.into_inner().data).map_err(Status::invalid_argument)?;
        let res = self.raft.vote(rpc).await.map_err(|e| e.to_string());
        raft_reply(&res)
    }

    async fn transfer_leader(&self, req: Request<pb::RaftMessage>) -> Result<Response<pb::RaftMessage>, Status> {
        self.admit(&req)?;
        let rpc = decode(&req.into_inner().data).map_err(Status::invalid_argument)?;
        let res = self.raft.handle_transfer_leader(rpc).await.map_err(|e| e.to_string());
        raft_reply(&res)
    }

    async fn append_entries(&self, req: Request<pb::RaftMessage>) -> Result<Response<pb::RaftMessage>, Status> {
        self.admit(&req)?;
        let rpc = decode(&req.into_inner().data).map_err(Status::invalid_argument)?;
        let res = self.raft.append_entries(rpc).await.map_err(|e| e.to_string());
        raft_reply(&res)
    }

    type StreamAppendStream = Pin<Box<dyn Stream<Item = Result<pb::RaftMessage, Status>> + Send>>;

    async fn stream_append(
        &self,
        req: Request<tonic::Streaming<pb::RaftMessage>>,
    ) -> Result<Response<Self::StreamAppendStream>, Status> {
        self.admit(&req)?;
        // A request that does not decode, or a broken link, ends the input:
        // openraft answers what came before it and the stream ends; the
        // leader then starts a new one.
        let requests = futures::stream::unfold(req.into_inner(), |mut inbound| async move {
            let m = inbound.message().await.ok()??;
            match decode::<openraft::raft::AppendEntriesRequest<crate::types::TypeConfig>>(&m.data) {
                Ok(r) => Some((r, inbound)),
                Err(e) => {
                    tracing::warn!(error = %e, "undecodable AppendEntries on a replication stream; closing it");
                    None
                }
            }
        });
        let replies = self.raft.stream_append(requests).map(|r| {
            let reply: crate::network::StreamReply = r.map_err(|e| e.to_string());
            encode(&reply).map(|data| pb::RaftMessage { data: data.into() }).map_err(Status::internal)
        });
        Ok(Response::new(Box::pin(replies)))
    }

    async fn install_snapshot(&self, req: Request<pb::RaftMessage>) -> Result<Response<pb::RaftMessage>, Status> {
        self.admit(&req)?;
        let chunk: SnapshotChunk = decode(&req.into_inner().data).map_err(Status::invalid_argument)?;
        let reply: SnapshotChunkReply = match self.sm.stage_chunk(&chunk.meta, chunk.offset, chunk.data, chunk.done).await {
            Err(e) => {
                tracing::warn!(offset = chunk.offset, error = %e, "refused a snapshot chunk");
                Err(format!("staging snapshot chunk at {}: {e}", chunk.offset))
            }
            Ok(None) => Ok(None),
            Ok(Some(data)) => {
                let snapshot = openraft::alias::SnapshotOf::<crate::types::TypeConfig, SnapshotData> { meta: chunk.meta, snapshot: data };
                self.raft.install_full_snapshot(chunk.vote, snapshot).await.map(Some).map_err(|e| e.to_string())
            }
        };
        raft_reply(&reply)
    }
}
