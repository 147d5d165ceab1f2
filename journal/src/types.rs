//! The Raft type configuration of the journal and the commands that travel
//! through the Raft log.
//!
//! Every state change of the journal (append, leader CAS, lease, trim, meta
//! CAS) is one `Command` in one Raft entry. Commands that depend on time carry
//! `stamp_unix_ms`, written by the Raft leader when it proposes the entry, so
//! every node applies the same decision; no clock is read at apply time.

use serde::Deserialize;
use serde::Serialize;

openraft::declare_raft_types!(
    /// The journal's Raft types.
    pub TypeConfig:
        D = Command,
        R = Outcome,
        Node = openraft::impls::BasicNode,
);

pub type NodeId = u64;
pub type Raft = openraft::Raft<TypeConfig, crate::state_machine::StateMachineStore>;
pub type Entry = <TypeConfig as openraft::RaftTypeConfig>::Entry;
pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
pub type Vote = openraft::alias::VoteOf<TypeConfig>;

/// One journal record's bytes.
pub type Payload = serde_bytes::ByteBuf;

/// A state change proposed through Raft.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    Append {
        stream: String,
        leader: String,
        records: Vec<Payload>,
        expect_last_seq: Option<u64>,
    },
    SetLeader {
        stream: String,
        new: String,
        expected_old: String,
        stamp_unix_ms: u64,
    },
    TakeLease {
        stream: String,
        candidate: String,
        caught_up_seq: u64,
        lease_ms: u64,
        stamp_unix_ms: u64,
    },
    RenewLease {
        stream: String,
        uuid: String,
        stamp_unix_ms: u64,
    },
    /// Drops seqs `..=upto_seq`. `upto_bytes` is the payload bytes of seqs
    /// `1..=upto_seq`, stamped by the Raft leader from its record store
    /// (`None` when nothing is to be dropped), so `apply` stays pure.
    Trim {
        stream: String,
        upto_seq: u64,
        upto_bytes: Option<u64>,
    },
    CasMeta {
        stream: String,
        key: String,
        expected: Option<Payload>,
        value: Payload,
    },
    /// Several commands from concurrent clients in one Raft entry (group
    /// commit), applied in order; never nested.
    Batch(Vec<Command>),
}

impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Append { stream, records, .. } => write!(f, "append({stream}, {} records)", records.len()),
            Command::SetLeader { stream, new, .. } => write!(f, "set_leader({stream}, {new})"),
            Command::TakeLease { stream, candidate, .. } => write!(f, "take_lease({stream}, {candidate})"),
            Command::RenewLease { stream, uuid, .. } => write!(f, "renew_lease({stream}, {uuid})"),
            Command::Trim { stream, upto_seq, .. } => write!(f, "trim({stream}, {upto_seq})"),
            Command::CasMeta { stream, key, .. } => write!(f, "cas_meta({stream}, {key})"),
            Command::Batch(cmds) => write!(f, "batch({} commands)", cmds.len()),
        }
    }
}

/// The result of applying one `Command`. Rejections are results, not
/// errors: they are decided deterministically by the state machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Outcome {
    /// For entries that carry no command (blank, membership).
    #[default]
    None,
    Appended { last_seq: u64 },
    LeaderSet { old: String },
    Lease { leader: String, deadline_unix_ms: u64, last_seq: u64 },
    Trimmed { first_seq: u64 },
    MetaSet,
    /// The writer is not the stream's leader.
    Fenced { stream: String, leader: String },
    /// A compare-and-set saw another value.
    CasFailed { actual: String },
    /// Another node holds a live lease.
    LeaseHeld { leader: String, deadline_unix_ms: u64 },
    /// The candidate has not read every record.
    NotCaughtUp { last_seq: u64 },
    /// `expect_last_seq` did not match.
    SeqMismatch { last_seq: u64 },
    UnknownStream { stream: String },
    /// The stream would pass the journal's last-resort cap on untrimmed
    /// bytes (`streams::MAX_RETAINED_BYTES_PER_STREAM`).
    StreamFull { stream: String, retained_bytes: u64, limit: u64 },
    Invalid { reason: String },
    /// One outcome per command of a `Command::Batch`, in order.
    Batch(Vec<Outcome>),
}
