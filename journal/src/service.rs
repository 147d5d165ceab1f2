//! The `Journal` gRPC service of one node: each call checked (leader-only
//! calls stamp time from the Raft leader's clock alone), proposed through
//! proposer.rs or served after a ReadIndex round (`linearize`), and
//! answered with the outcome or a status of errors.rs. Membership changes
//! (add, remove, hand-over) are decided by membership.rs and carried out
//! here with openraft's membership API.
//!
//! Reads (`Read`, `GetMeta`, `StreamInfo`) are linearizable: served by the
//! Raft leader after a ReadIndex round (`linearize`), so a read sees every
//! write acknowledged before it began. Followers answer `not-leader`.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use futures::StreamExt;
use keel_proto::journal as pb;
use keel_proto::journal::journal_server::Journal;
use openraft::errors::ClientWriteError;
use openraft::impls::BasicNode;
use openraft::async_runtime::WatchReceiver;
use openraft::Instant as _;
use tokio::sync::mpsc;
use tokio::sync::watch;
use tonic::Request;
use tonic::Response;
use tonic::Status;

use crate::errors;
use crate::proposer::Submitter;
use crate::proposer::redirect;
use crate::server::ServeConfig;
use crate::server::free_bytes;
use crate::server::now_unix_ms;
use crate::state_machine::StateMachineStore;
use crate::types::Command;
use crate::types::NodeId;
use crate::types::Outcome;
use crate::types::Raft;


pub(crate) struct Node {
    pub(crate) cfg: ServeConfig,
    pub(crate) raft: Raft,
    pub(crate) sm: StateMachineStore,
    pub(crate) proposals: Submitter,
    /// Becomes true once the state machine holds everything this node's
    /// durable log may have acknowledged before a restart (see `recover`).
    pub(crate) recovered: watch::Receiver<bool>,
    /// Who may change the membership (None: no TLS, anyone): journal nodes
    /// (a node started with `--join` adds itself) and the administrator.
    pub(crate) changers: Option<[Arc<crate::tls::PeerCheck>; 2]>,
}

/// Most appends of one `AppendStream` awaiting their outcome; past this the
/// stream's next requests are read only as earlier ones are answered.
const MAX_STREAM_APPENDS_IN_FLIGHT: usize = 256;

fn append_command(r: pb::AppendRequest) -> Command {
    Command::Append {
        stream: r.stream,
        leader: r.leader_uuid,
        records: r.records.into_iter().map(|b| serde_bytes::ByteBuf::from(b.to_vec())).collect(),
        expect_last_seq: r.expect_last_seq,
    }
}

/// The reply to one streamed append: what the unary `Append` would answer.
fn append_reply(result: Result<Outcome, Status>) -> pb::AppendStreamReply {
    use pb::append_stream_reply::Result as R;
    let result = match result {
        Ok(Outcome::Appended { last_seq }) => R::LastSeq(last_seq),
        Ok(other) => R::Error(errors::to_rpc_error(&errors::from_outcome(other))),
        Err(status) => R::Error(errors::to_rpc_error(&status)),
    };
    pb::AppendStreamReply { result: Some(result) }
}

/// Serves one `AppendStream`: each request is submitted as it is read (in
/// order), and answered in order once its outcome is known; up to
/// `MAX_STREAM_APPENDS_IN_FLIGHT` wait at once. The stream ends when the
/// writer ends it (after the last answers) or goes away.
async fn serve_append_stream(
    proposals: Submitter,
    mut inbound: tonic::Streaming<pb::AppendRequest>,
    out: mpsc::Sender<Result<pb::AppendStreamReply, Status>>,
) {
    type Pending = Pin<Box<dyn std::future::Future<Output = Result<Outcome, Status>> + Send>>;
    let mut waiting: futures::stream::FuturesOrdered<Pending> = futures::stream::FuturesOrdered::new();
    let mut reading = true;
    while reading || !waiting.is_empty() {
        tokio::select! {
            biased;
            Some(result) = waiting.next(), if !waiting.is_empty() => {
                if out.send(Ok(append_reply(result))).await.is_err() {
                    return; // the writer went away
                }
            }
            m = inbound.message(), if reading && waiting.len() < MAX_STREAM_APPENDS_IN_FLIGHT => match m {
                Ok(Some(req)) => match proposals.submit(append_command(req)) {
                    Ok(outcome) => waiting.push_back(Box::pin(outcome)),
                    Err(status) => waiting.push_back(Box::pin(std::future::ready(Err(status)))),
                },
                Ok(None) => reading = false,
                Err(_) => return, // the writer's side broke: nobody to answer
            },
        }
    }
}

impl Node {
    /// Answers `not-leader` unless this node is the Raft leader, so a time
    /// stamp is only ever taken from the leader's clock.
    fn require_leader(&self) -> Result<(), Status> {
        let leader = self.raft.metrics().borrow_watched().current_leader;
        if leader == Some(self.cfg.node_id) {
            return Ok(());
        }
        Err(errors::not_leader(leader, leader.and_then(|l| self.addr_of(l))))
    }

    async fn propose(&self, cmd: Command) -> Result<Outcome, Status> {
        self.proposals.submit(cmd)?.await
    }

    /// Waits until this node, as Raft leader confirmed by a quorum, has
    /// applied everything committed before the call: a read after this sees
    /// every write acknowledged before the read began.
    async fn linearize(&self) -> Result<(), Status> {
        let timeout = Duration::from_millis(self.cfg.write_timeout_ms);
        let mut recovered = self.recovered.clone();
        if tokio::time::timeout(timeout, recovered.wait_for(|r| *r)).await.map(|r| r.is_ok()) != Ok(true) {
            return Err(errors::not_leader_because("this node is still recovering its log after a restart".into()));
        }
        match tokio::time::timeout(timeout, self.raft.ensure_linearizable(openraft::raft::ReadPolicy::ReadIndex)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(openraft::errors::RaftError::APIError(openraft::errors::LinearizableReadError::ForwardToLeader(f)))) => {
                Err(redirect(&f))
            }
            Ok(Err(e)) => Err(errors::not_leader_because(e.to_string())),
            Err(_) => Err(errors::not_leader_because(format!(
                "could not confirm leadership with a quorum within {} ms",
                self.cfg.write_timeout_ms
            ))),
        }
    }

    fn stamp(&self) -> Result<u64, Status> {
        self.require_leader()?;
        Ok(now_unix_ms())
    }
}

type ReadStream = Pin<Box<dyn Stream<Item = Result<pb::ReadResponse, Status>> + Send>>;
type AppendReplies = Pin<Box<dyn Stream<Item = Result<pb::AppendStreamReply, Status>> + Send>>;

#[tonic::async_trait]
impl Journal for Node {
    async fn append(&self, req: Request<pb::AppendRequest>) -> Result<Response<pb::AppendResponse>, Status> {
        match self.propose(append_command(req.into_inner())).await? {
            Outcome::Appended { last_seq } => Ok(Response::new(pb::AppendResponse { last_seq })),
            other => Err(errors::from_outcome(other)),
        }
    }

    type AppendStreamStream = AppendReplies;

    async fn append_stream(
        &self,
        req: Request<tonic::Streaming<pb::AppendRequest>>,
    ) -> Result<Response<AppendReplies>, Status> {
        let (out, replies) = mpsc::channel(MAX_STREAM_APPENDS_IN_FLIGHT);
        tokio::spawn(serve_append_stream(self.proposals.clone(), req.into_inner(), out));
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(replies))))
    }

    async fn set_leader(
        &self,
        req: Request<pb::SetLeaderRequest>,
    ) -> Result<Response<pb::SetLeaderResponse>, Status> {
        let r = req.into_inner();
        let cmd = Command::SetLeader {
            stream: r.stream,
            new: r.new_uuid,
            expected_old: r.expected_old,
            stamp_unix_ms: self.stamp()?,
        };
        match self.propose(cmd).await? {
            Outcome::LeaderSet { old } => Ok(Response::new(pb::SetLeaderResponse { old_uuid: old })),
            other => Err(errors::from_outcome(other)),
        }
    }

    async fn take_lease(&self, req: Request<pb::TakeLeaseRequest>) -> Result<Response<pb::LeaseResponse>, Status> {
        let r = req.into_inner();
        let cmd = Command::TakeLease {
            stream: r.stream,
            candidate: r.candidate_uuid,
            caught_up_seq: r.caught_up_seq,
            lease_ms: r.lease_ms,
            stamp_unix_ms: self.stamp()?,
        };
        lease_reply(self.propose(cmd).await?)
    }

    async fn renew_lease(&self, req: Request<pb::RenewLeaseRequest>) -> Result<Response<pb::LeaseResponse>, Status> {
        let r = req.into_inner();
        let cmd = Command::RenewLease { stream: r.stream, uuid: r.uuid, stamp_unix_ms: self.stamp()? };
        lease_reply(self.propose(cmd).await?)
    }

    type ReadStream = ReadStream;

    async fn read(&self, req: Request<pb::ReadRequest>) -> Result<Response<ReadStream>, Status> {
        let r = req.into_inner();
        self.linearize().await?;
        // Fail fast, before the stream starts, on a stream that does not exist.
        let first = self.sm.with_streams(|s| s.streams.get(&r.stream).map(|st| st.first_seq));
        let Some(first) = first else {
            return Err(errors::unknown_stream(&r.stream));
        };
        let mut next = if r.from_seq == 0 { first } else { r.from_seq };
        let (tx, rx) = mpsc::channel(READ_CHANNEL_BATCHES);
        let sm = self.sm.clone();
        let (max_records, max_bytes) = (self.cfg.read_batch_records, self.cfg.read_batch_bytes);
        tokio::spawn(async move {
            let mut applied = sm.subscribe();
            loop {
                let batch = sm.with_records(|s, records| match s.streams.get(&r.stream) {
                    None => Err(errors::unknown_stream(&r.stream)),
                    Some(st) if next < st.first_seq => Err(errors::trimmed(&r.stream, next, st.first_seq)),
                    Some(st) if next > st.last_seq => Ok(Vec::new()),
                    Some(st) => records.read(st.id, next, st.last_seq, max_records, max_bytes).map_err(|e| {
                        tracing::error!(stream = %r.stream, from_seq = next, error = %e, "cannot read records");
                        Status::internal(format!("reading {} from seq {next}: {e}", r.stream))
                    }),
                });
                match batch {
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                    Ok(records) if !records.is_empty() => {
                        next = records.last().unwrap().0 + 1;
                        let msg = pb::ReadResponse {
                            records: records
                                .into_iter()
                                .map(|(seq, p)| pb::Record { seq, payload: p.into_vec().into() })
                                .collect(),
                        };
                        if tx.send(Ok(msg)).await.is_err() {
                            return; // reader went away
                        }
                    }
                    Ok(_) if !r.follow => return,
                    Ok(_) => {
                        tokio::select! {
                            changed = applied.changed() => if changed.is_err() { return },
                            _ = tx.closed() => return,
                        }
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn trim(&self, req: Request<pb::TrimRequest>) -> Result<Response<pb::TrimResponse>, Status> {
        let r = req.into_inner();
        // Stamp the bytes the trim drops, read from this node's record store
        // once it has applied everything committed (the count for a given seq
        // never changes, so any later apply agrees).
        self.linearize().await?;
        let upto_bytes = self.sm.with_records(|s, records| match s.streams.get(&r.stream) {
            Some(st) if r.upto_seq >= st.first_seq && r.upto_seq <= st.last_seq => {
                records.bytes_through(st.id, r.upto_seq).map(Some).map_err(|e| {
                    tracing::error!(stream = %r.stream, upto_seq = r.upto_seq, error = %e, "cannot read the record store");
                    Status::internal(format!("reading {} at seq {}: {e}", r.stream, r.upto_seq))
                })
            }
            _ => Ok(None),
        })?;
        match self.propose(Command::Trim { stream: r.stream, upto_seq: r.upto_seq, upto_bytes }).await? {
            Outcome::Trimmed { first_seq } => Ok(Response::new(pb::TrimResponse { first_seq })),
            other => Err(errors::from_outcome(other)),
        }
    }

    async fn get_meta(&self, req: Request<pb::GetMetaRequest>) -> Result<Response<pb::GetMetaResponse>, Status> {
        let r = req.into_inner();
        self.linearize().await?;
        self.sm.with_streams(|s| {
            let st = s.streams.get(&r.stream).ok_or_else(|| errors::unknown_stream(&r.stream))?;
            Ok(Response::new(match st.meta.get(&r.key) {
                Some(v) => pb::GetMetaResponse { found: true, value: v.to_vec().into() },
                None => pb::GetMetaResponse { found: false, value: Default::default() },
            }))
        })
    }

    async fn cas_meta(&self, req: Request<pb::CasMetaRequest>) -> Result<Response<pb::CasMetaResponse>, Status> {
        let r = req.into_inner();
        let cmd = Command::CasMeta {
            stream: r.stream,
            key: r.key,
            expected: r.expected.map(|b| serde_bytes::ByteBuf::from(b.to_vec())),
            value: serde_bytes::ByteBuf::from(r.value.to_vec()),
        };
        match self.propose(cmd).await? {
            Outcome::MetaSet => Ok(Response::new(pb::CasMetaResponse {})),
            other => Err(errors::from_outcome(other)),
        }
    }

    async fn stream_info(
        &self,
        req: Request<pb::StreamInfoRequest>,
    ) -> Result<Response<pb::StreamInfoResponse>, Status> {
        let r = req.into_inner();
        self.linearize().await?;
        self.sm.with_streams(|s| {
            let st = s.streams.get(&r.stream).ok_or_else(|| errors::unknown_stream(&r.stream))?;
            Ok(Response::new(pb::StreamInfoResponse {
                leader_uuid: st.leader.clone(),
                lease_deadline_unix_ms: st.lease_deadline_unix_ms,
                first_seq: st.first_seq,
                last_seq: st.last_seq,
                bytes: st.retained_bytes,
                quota_bytes: self.cfg.stream_quota_bytes,
            }))
        })
    }

    async fn status(&self, _req: Request<pb::StatusRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        let m = self.raft.metrics().borrow_watched().clone();
        let leader_addr = m.current_leader.and_then(|l| self.addr_of(l)).unwrap_or_default();
        let members = m
            .membership_config
            .membership()
            .nodes()
            .map(|(id, n)| pb::Member { node_id: *id, addr: n.addr.clone() })
            .collect();
        Ok(Response::new(pb::StatusResponse {
            node_id: self.cfg.node_id,
            state: format!("{:?}", m.state),
            term: m.current_term,
            raft_leader_id: m.current_leader,
            raft_leader_addr: leader_addr,
            last_log_index: m.last_log_index.unwrap_or(0),
            last_applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
            members,
            streams: self.sm.with_streams(|s| s.streams.keys().cloned().collect()),
            data_free_bytes: free_bytes(&self.cfg.data_dir),
            membership_index: m.membership_config.log_id().as_ref().map(|l| l.index).unwrap_or(0),
        }))
    }

    async fn add_node(&self, req: Request<pb::AddNodeRequest>) -> Result<Response<pb::MembersResponse>, Status> {
        self.admit_changer(&req)?;
        let r = req.into_inner();
        self.add_node(r.node_id, r.addr).await?;
        self.members_now().map(Response::new)
    }

    async fn remove_node(&self, req: Request<pb::RemoveNodeRequest>) -> Result<Response<pb::MembersResponse>, Status> {
        self.admit_changer(&req)?;
        self.remove_node(req.into_inner().node_id).await?;
        self.members_now().map(Response::new)
    }

    async fn members(&self, _req: Request<pb::MembersRequest>) -> Result<Response<pb::MembersResponse>, Status> {
        self.members_now().map(Response::new)
    }
}

pub use keel_journal_client::limits::CATCH_UP_TIMEOUT;
/// How long a leader that is removed waits for its chosen successor to take
/// over.
const HAND_OVER_TIMEOUT: Duration = Duration::from_secs(5);

/// Membership changes (the decisions are membership.rs's).
impl Node {
    /// Address of member `id`, from the membership (a member added after
    /// this node started is not in `--peers`), else `--peers`.
    fn addr_of(&self, id: NodeId) -> Option<String> {
        let m = self.raft.metrics().borrow_watched().membership_config.clone();
        let found = m.membership().nodes().find(|(n, _)| **n == id).map(|(_, n)| n.addr.clone());
        found.or_else(|| self.cfg.peers.get(&id).cloned())
    }

    fn admit_changer<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let Some(checks) = &self.changers else { return Ok(()) };
        let chain = req.peer_certs();
        let chain = chain.as_deref().map(|c| c.as_slice());
        let mut why = Vec::new();
        for c in checks {
            match c.check(chain) {
                Ok(()) => return Ok(()),
                Err(e) => why.push(e),
            }
        }
        Err(errors::not_allowed(format!(
            "only the journal's administrator (the `{}` certificate, keel-journal ctl) or a journal node may change the membership: {}",
            crate::tls::ADMIN_CERT_NAME,
            why.join("; ")
        )))
    }

    /// Voters, and whether the leader heard from each within
    /// `ANSWERED_WITHIN`. A leader elected a moment ago has not heard from
    /// everyone yet: it waits up to `ANSWERED_WITHIN` for a first answer
    /// from each before counting a voter as silent.
    async fn answering(&self) -> BTreeMap<NodeId, bool> {
        let deadline = tokio::time::Instant::now() + crate::membership::ANSWERED_WITHIN;
        let mut rx = self.raft.metrics();
        loop {
            let m = rx.borrow_watched().clone();
            let heard = m.heartbeat.clone().unwrap_or_default();
            let mut unknown = false;
            let out: BTreeMap<NodeId, bool> = m
                .membership_config
                .membership()
                .voter_ids()
                .map(|id| {
                    if id == self.cfg.node_id {
                        return (id, true);
                    }
                    match heard.get(&id).and_then(|t| t.as_ref()) {
                        Some(t) => (id, t.elapsed() < crate::membership::ANSWERED_WITHIN),
                        None => {
                            unknown = true;
                            (id, false)
                        }
                    }
                })
                .collect();
            if !unknown || tokio::time::Instant::now() >= deadline {
                return out;
            }
            let _ = tokio::time::timeout_at(deadline, rx.changed()).await;
        }
    }

    async fn add_node(&self, id: NodeId, addr: String) -> Result<(), Status> {
        use crate::membership::Change;
        use crate::membership::Plan;
        self.require_leader()?;
        if id == 0 {
            return Err(errors::invalid("node id 0 is not a node id"));
        }
        if !addr.contains(':') || addr.len() > 255 {
            return Err(errors::invalid(format!("node address {addr:?} is not host:port")));
        }
        let known = self.raft.metrics().borrow_watched().membership_config.clone();
        if let Some((_, n)) = known.membership().nodes().find(|(n, _)| **n == id) {
            if n.addr != addr {
                return Err(errors::membership_refused(format!(
                    "node {id} is a member at {}; remove it first (remove-node {id}) or give the new node another id",
                    n.addr
                )));
            }
        }
        if let Some((other, _)) = known.membership().nodes().find(|(n, b)| **n != id && b.addr == addr) {
            return Err(errors::membership_refused(format!("node {other} is a member at {addr}; one address, one node")));
        }
        match crate::membership::check(&self.answering().await, self.cfg.node_id, Change::Add(id)).map_err(errors::membership_refused)? {
            Plan::Nothing => return Ok(()),
            Plan::Voters(_) | Plan::HandOver { .. } => {}
        }
        tracing::info!(node_id = id, %addr, "adding a journal node: first as a learner, until it has caught up");
        let t0 = std::time::Instant::now();
        match tokio::time::timeout(CATCH_UP_TIMEOUT, self.raft.add_learner(id, BasicNode { addr: addr.clone() }, true)).await {
            Err(_) => {
                return Err(errors::membership_refused(format!(
                    "node {id} at {addr} is a learner and has not caught up within {} s; run add-node again to keep waiting, or remove-node {id}",
                    CATCH_UP_TIMEOUT.as_secs()
                )));
            }
            Ok(r) => r.map_err(|e| self.change_failed(e))?,
        };
        tracing::info!(node_id = id, caught_up_ms = t0.elapsed().as_millis() as u64, "the new journal node caught up; making it a voter");
        self.change(openraft::ChangeMembers::AddVoterIds([id].into())).await?;
        tracing::info!(node_id = id, "the journal node is a voter");
        Ok(())
    }

    async fn remove_node(&self, id: NodeId) -> Result<(), Status> {
        use crate::membership::Change;
        use crate::membership::Plan;
        self.require_leader()?;
        let known = self.raft.metrics().borrow_watched().membership_config.clone();
        let is_learner = known.membership().learner_ids().any(|l| l == id);
        if is_learner {
            tracing::info!(node_id = id, "removing a learner from the journal");
            return self.change(openraft::ChangeMembers::RemoveNodes([id].into())).await;
        }
        match crate::membership::check(&self.answering().await, self.cfg.node_id, Change::Remove(id)).map_err(errors::membership_refused)? {
            Plan::Nothing => Ok(()),
            Plan::HandOver { to } => {
                tracing::info!(node_id = id, to, "this Raft leader is to be removed: handing leadership over first");
                self.raft.trigger().transfer_leader(to).await.map_err(|e| errors::not_leader_because(e.to_string()))?;
                let mut rx = self.raft.metrics();
                let moved = tokio::time::timeout(HAND_OVER_TIMEOUT, async {
                    loop {
                        let leader = rx.borrow_watched().current_leader;
                        if leader.is_some() && leader != Some(self.cfg.node_id) {
                            return leader;
                        }
                        if rx.changed().await.is_err() {
                            return None;
                        }
                    }
                })
                .await
                .ok()
                .flatten();
                // The client retries at the new leader, which removes this node.
                Err(errors::not_leader(moved, moved.and_then(|l| self.addr_of(l))))
            }
            Plan::Voters(_) => {
                tracing::info!(node_id = id, "removing a journal node");
                self.change(openraft::ChangeMembers::RemoveVoters([id].into())).await?;
                tracing::info!(node_id = id, "the journal node is removed; stop its process");
                Ok(())
            }
        }
    }

    /// Proposes `what` (removed nodes leave the cluster, not kept as
    /// learners) and waits until it is committed.
    async fn change(&self, what: openraft::ChangeMembers<NodeId, BasicNode>) -> Result<(), Status> {
        self.raft.change_membership(what, false).await.map(|_| ()).map_err(|e| self.change_failed(e))
    }

    fn change_failed(&self, e: openraft::errors::RaftError<crate::types::TypeConfig, ClientWriteError<crate::types::TypeConfig>>) -> Status {
        match e {
            openraft::errors::RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => redirect(&f),
            openraft::errors::RaftError::APIError(ClientWriteError::ChangeMembershipError(c)) => {
                errors::membership_refused(format!("{c}; retry when the change in progress has committed"))
            }
            other => errors::outcome_unknown(format!("membership change: {other}; check `keel-journal ctl members`")),
        }
    }

    /// The members as this node (which must be the Raft leader) sees them.
    fn members_now(&self) -> Result<pb::MembersResponse, Status> {
        self.require_leader()?;
        let m = self.raft.metrics().borrow_watched().clone();
        let last = m.last_log_index.unwrap_or(0);
        let matched = m.replication.clone().unwrap_or_default();
        let heard = m.heartbeat.clone().unwrap_or_default();
        let membership = m.membership_config.membership();
        let voters: std::collections::BTreeSet<NodeId> = membership.voter_ids().collect();
        let members = membership
            .nodes()
            .map(|(id, n)| {
                let (behind, since) = if *id == self.cfg.node_id {
                    (0, Some(0))
                } else {
                    let held = matched.get(id).and_then(|l| l.as_ref()).map(|l| l.index).unwrap_or(0);
                    (last.saturating_sub(held), heard.get(id).and_then(|t| t.as_ref()).map(|t| t.elapsed().as_millis() as u64))
                };
                pb::MemberState {
                    node_id: *id,
                    addr: n.addr.clone(),
                    role: if voters.contains(id) { "voter" } else { "learner" }.into(),
                    behind,
                    millis_since_heard: since,
                }
            })
            .collect();
        Ok(pb::MembersResponse { leader_id: self.cfg.node_id, members, last_log_index: last })
    }
}

/// Read responses buffered per reader before the reader must consume.
const READ_CHANNEL_BATCHES: usize = 4;

fn lease_reply(outcome: Outcome) -> Result<Response<pb::LeaseResponse>, Status> {
    match outcome {
        Outcome::Lease { leader, deadline_unix_ms, last_seq } => {
            Ok(Response::new(pb::LeaseResponse { deadline_unix_ms, leader_uuid: leader, last_seq }))
        }
        other => Err(errors::from_outcome(other)),
    }
}
