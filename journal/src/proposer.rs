//! Where writes enter the Raft log: validation, admission against the
//! stream's quota, the proposal queue, and group commit (queued commands
//! leave as one Raft entry per batch, at most `MAX_BATCHES_IN_FLIGHT`
//! entries awaiting commit). Every command gets its own outcome: the
//! applied result, `not-leader` when openraft says it was not appended
//! anywhere, or `outcome-unknown` (timeout, leader change, stopping).
//!
//! Writes: stamped by service.rs with this node's clock when they depend on
//! time (only the Raft leader's stamp is ever proposed: a follower answers
//! `not-leader` before stamping), validated and proposed here, and answered
//! only after openraft reports the entry committed (fsync'd on a quorum) and
//! applied. A proposal whose fate is not known (timeout, entry discarded by a
//! leader change, node shutting down) is answered `outcome-unknown`, never as
//! success or as a clean failure.
//!
//! Admission: an append that would take its stream's untrimmed bytes (plus
//! appends admitted and not yet answered) over `--stream-quota-bytes` is
//! refused `stream-full` before it is proposed (`streams::admit_append`).
//! Only the Raft leader proposes, so its flag is the one that counts; `apply`
//! keeps a fixed last-resort cap, the same on every node.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use openraft::errors::ClientWriteError;
use openraft::async_runtime::WatchReceiver;
use tokio::sync::mpsc;
use tokio::sync::oneshot;
use tonic::Status;

use crate::errors;
use crate::state_machine::StateMachineStore;
use crate::streams::admit_append;
use crate::streams::validate;
use crate::types::Command;
use crate::types::NodeId;
use crate::types::Outcome;
use crate::types::Raft;


/// Commands waiting to be proposed; past this, writes are refused at once.
pub(crate) const MAX_QUEUED_PROPOSALS: usize = 16_384;
/// Most commands in one Raft entry.
const MAX_BATCH_COMMANDS: usize = 512;
/// Most payload bytes in one Raft entry (a single larger command goes alone).
const MAX_BATCH_BYTES: usize = 4 << 20;
/// Raft entries proposed but not yet applied; while all are in flight, new
/// commands queue up and leave together as the next batch.
const MAX_BATCHES_IN_FLIGHT: usize = 2;

pub(crate) struct Proposal {
    cmd: Command,
    reply: oneshot::Sender<Result<Outcome, Status>>,
}

fn payload_bytes(cmd: &Command) -> usize {
    match cmd {
        Command::Append { records, .. } => records.iter().map(|r| r.len()).sum(),
        Command::CasMeta { value, .. } => value.len(),
        _ => 0,
    }
}

/// Where commands enter: validation, admission control, the proposal queue.
#[derive(Clone)]
pub(crate) struct Submitter {
    pub(crate) proposals: mpsc::Sender<Proposal>,
    pub(crate) write_timeout_ms: u64,
    pub(crate) sm: StateMachineStore,
    pub(crate) raft: Raft,
    pub(crate) node_id: NodeId,
    pub(crate) stream_quota_bytes: u64,
    /// Payload bytes of appends admitted per stream and not answered yet:
    /// they count against the quota until their outcome is known (by then
    /// the applied state holds them, or they failed).
    pub(crate) in_flight: Arc<std::sync::Mutex<BTreeMap<String, u64>>>,
}

/// Releases an admitted append's bytes from `Submitter::in_flight`.
struct Admitted {
    in_flight: Arc<std::sync::Mutex<BTreeMap<String, u64>>>,
    stream: String,
    bytes: u64,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut m = self.in_flight.lock().unwrap();
        if let Some(n) = m.get_mut(&self.stream) {
            *n -= self.bytes;
            if *n == 0 {
                m.remove(&self.stream);
            }
        }
    }
}

impl Submitter {
    /// Admits an append against the stream's quota. Only the Raft leader
    /// decides: elsewhere the proposal is answered `not-leader` anyway. An
    /// unknown stream is left to `apply` (`unknown-stream`).
    fn admit(&self, cmd: &Command) -> Result<Option<Admitted>, Status> {
        let Command::Append { stream, records, .. } = cmd else { return Ok(None) };
        if self.raft.metrics().borrow_watched().current_leader != Some(self.node_id) {
            return Ok(None);
        }
        let add: u64 = records.iter().map(|r| r.len() as u64).sum();
        let Some(retained) = self.sm.with_streams(|s| s.streams.get(stream).map(|st| st.retained_bytes)) else {
            return Ok(None);
        };
        let mut in_flight = self.in_flight.lock().unwrap();
        let pending = in_flight.get(stream).copied().unwrap_or(0);
        admit_append(retained, pending, add, self.stream_quota_bytes)
            .map_err(|held| errors::stream_full(stream, held, self.stream_quota_bytes))?;
        *in_flight.entry(stream.clone()).or_default() += add;
        Ok(Some(Admitted { in_flight: self.in_flight.clone(), stream: stream.clone(), bytes: add }))
    }

    /// Queues `cmd` for proposal now (so commands submitted one after
    /// another are proposed in that order) and returns what waits for its
    /// outcome: committed within `write_timeout_ms`, or `outcome-unknown`.
    pub(crate) fn submit(
        &self,
        cmd: Command,
    ) -> Result<impl std::future::Future<Output = Result<Outcome, Status>> + Send + 'static, Status> {
        validate(&cmd).map_err(errors::invalid)?;
        let admitted = self.admit(&cmd)?;
        let what = cmd.to_string();
        let write_timeout_ms = self.write_timeout_ms;
        let (tx, rx) = oneshot::channel();
        self.proposals.try_send(Proposal { cmd, reply: tx }).map_err(|_| errors::overloaded(MAX_QUEUED_PROPOSALS))?;
        Ok(async move {
            let result = match tokio::time::timeout(Duration::from_millis(write_timeout_ms), rx).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err(errors::outcome_unknown(format!("{what}: the proposal was dropped; it may or may not be applied"))),
                Err(_) => Err(errors::outcome_unknown(format!(
                    "{what} was proposed but not committed within {write_timeout_ms} ms; it may or may not be applied"
                ))),
            };
            drop(admitted);
            result
        })
    }
}

/// Group commit: proposes queued commands as one Raft entry per batch, in
/// arrival order (submission is sequential, so a client's pipelined commands
/// keep their order), with at most `MAX_BATCHES_IN_FLIGHT` entries awaiting
/// commit. Each command gets its own outcome.
pub(crate) async fn run_proposer(raft: Raft, mut queue: mpsc::Receiver<Proposal>, metrics: Arc<crate::metrics::JournalMetrics>) {
    let window = Arc::new(tokio::sync::Semaphore::new(MAX_BATCHES_IN_FLIGHT));
    while let Some(first) = queue.recv().await {
        let Ok(permit) = window.clone().acquire_owned().await else { return };
        let mut bytes = payload_bytes(&first.cmd);
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH_COMMANDS && bytes < MAX_BATCH_BYTES {
            match queue.try_recv() {
                Ok(p) => {
                    bytes += payload_bytes(&p.cmd);
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        let (mut cmds, replies): (Vec<Command>, Vec<_>) = batch.into_iter().map(|p| (p.cmd, p.reply)).unzip();
        let cmd = if cmds.len() == 1 { cmds.pop().unwrap() } else { Command::Batch(cmds) };
        let (responder, done) = openraft::impls::ProgressResponder::complete_only();
        if let Err(fatal) = raft.client_write_ff(cmd, Some(responder)).await {
            for r in replies {
                let _ = r.send(Err(errors::outcome_unknown(format!("the journal node is stopping: {fatal}"))));
            }
            continue;
        }
        let (t0, commit_seconds) = (std::time::Instant::now(), metrics.commit_seconds.clone());
        tokio::spawn(async move {
            let result = done.await;
            drop(permit);
            if matches!(result, Ok(Ok(_))) {
                commit_seconds.observe(t0.elapsed().as_secs_f64());
            }
            deliver(result, replies);
        });
    }
}

/// `not-leader`, naming the leader openraft pointed to.
pub(crate) fn redirect(f: &openraft::errors::ForwardToLeader<crate::types::TypeConfig>) -> Status {
    errors::not_leader(f.leader_id, f.leader_node.as_ref().map(|n| n.addr.clone()))
}

/// Hands each waiting client its outcome.
fn deliver<E: std::fmt::Display>(
    result: Result<openraft::raft::ClientWriteResult<crate::types::TypeConfig>, E>,
    replies: Vec<oneshot::Sender<Result<Outcome, Status>>>,
) {
    let n = replies.len();
    let every = |status: Status| (0..n).map(|_| Err(status.clone())).collect::<Vec<_>>();
    let unknown = |e: String| every(errors::outcome_unknown(format!("{e}; it may or may not be applied")));
    let outcomes: Vec<Result<Outcome, Status>> = match result {
        Ok(Ok(resp)) => match resp.data {
            Outcome::Batch(outs) if n > 1 => {
                assert_eq!(outs.len(), n, "one outcome per batched command");
                outs.into_iter().map(Ok).collect()
            }
            single => vec![Ok(single)],
        },
        // Not appended anywhere: safe for the client to retry elsewhere.
        Ok(Err(ClientWriteError::ForwardToLeader(f))) => every(redirect(&f)),
        Ok(Err(e)) => unknown(e.to_string()),
        Err(e) => unknown(e.to_string()),
    };
    for (reply, outcome) in replies.into_iter().zip(outcomes) {
        let _ = reply.send(outcome);
    }
}
