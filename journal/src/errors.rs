//! Journal errors on the wire and in the client.
//!
//! The server turns every rejection into a gRPC `Status` whose message says
//! what happened and what to do, plus the metadata key `keel-error` (one word,
//! see proto/journal.proto) so clients classify without parsing messages.
//! `JournalError::from_status` is the inverse, used by the client library.

use tonic::Status;
use tonic::metadata::MetadataValue;

use crate::types::Outcome;

pub use keel_journal_client::errors::ERROR_KEY;
pub use keel_journal_client::errors::JournalError;
pub use keel_journal_client::errors::RAFT_LEADER_KEY;
pub use keel_journal_client::errors::STREAM_LEADER_KEY;
pub use keel_journal_client::errors::from_rpc_error;
pub use keel_journal_client::errors::to_rpc_error;
#[cfg(test)]
use keel_journal_client::errors::KEEL_KEYS;

pub use keel_journal_client::errors::ErrorKind;

fn tagged(mut status: Status, kind: ErrorKind) -> Status {
    let word = keel_journal_client::errors::word(kind);
    let value = MetadataValue::try_from(word.as_str()).expect("a kind's word is lower-case ASCII and '-'");
    status.metadata_mut().insert(ERROR_KEY, value);
    status
}

fn with_meta(mut status: Status, key: &'static str, value: &str) -> Status {
    if let Ok(v) = value.parse() {
        status.metadata_mut().insert(key, v);
    }
    status
}

pub fn invalid(reason: impl Into<String>) -> Status {
    tagged(Status::invalid_argument(format!("INVALID: {}", reason.into())), ErrorKind::Invalid)
}

pub fn unknown_stream(stream: &str) -> Status {
    tagged(
        Status::not_found(format!(
            "UNKNOWN_STREAM: stream {stream:?} does not exist; create it with set-leader or take-lease"
        )),
        ErrorKind::UnknownStream,
    )
}

pub fn trimmed(stream: &str, from: u64, first: u64) -> Status {
    tagged(
        Status::out_of_range(format!(
            "TRIMMED: stream {stream:?} no longer holds seq {from}; its first retained seq is {first}; \
             restore from a snapshot first"
        )),
        ErrorKind::Trimmed,
    )
}

pub fn not_leader(leader: Option<u64>, addr: Option<String>) -> Status {
    let msg = match (&leader, &addr) {
        (Some(id), Some(a)) => format!("NOT_LEADER: this journal node is not the Raft leader; node {id} at {a} is"),
        _ => "NOT_LEADER: this journal node is not the Raft leader and knows no leader yet; retry shortly".into(),
    };
    let status = tagged(Status::unavailable(msg), ErrorKind::NotLeader);
    match addr {
        Some(a) => with_meta(status, RAFT_LEADER_KEY, &a),
        None => status,
    }
}

pub fn overloaded(limit: usize) -> Status {
    tagged(
        Status::resource_exhausted(format!(
            "OVERLOADED: {limit} writes are already queued on this journal node; nothing was applied, retry later"
        )),
        ErrorKind::Overloaded,
    )
}

/// This node cannot serve a leader-only request right now (nothing applied).
pub fn not_leader_because(why: String) -> Status {
    tagged(Status::unavailable(format!("NOT_LEADER: {why}; retry shortly")), ErrorKind::NotLeader)
}

/// The Raft leader refused an append that would take `stream` over this
/// node's `--stream-quota-bytes` (nothing was proposed).
pub fn stream_full(stream: &str, held_bytes: u64, quota_bytes: u64) -> Status {
    tagged(
        Status::resource_exhausted(format!(
            "STREAM_FULL: stream {stream} holds {held_bytes} untrimmed bytes, its quota is {quota_bytes} \
             (--stream-quota-bytes); take a snapshot so the journal can trim (scripts/cluster snapshot), or raise the quota"
        )),
        ErrorKind::StreamFull,
    )
}

/// A membership change refused (nothing changed): `why` says what to do.
pub fn membership_refused(why: impl Into<String>) -> Status {
    tagged(Status::failed_precondition(format!("MEMBERSHIP: {}", why.into())), ErrorKind::Membership)
}

/// The caller's certificate may not make this call.
pub fn not_allowed(why: impl Into<String>) -> Status {
    tagged(Status::permission_denied(format!("NOT_ALLOWED: {}", why.into())), ErrorKind::NotAllowed)
}

pub fn outcome_unknown(msg: impl Into<String>) -> Status {
    tagged(Status::unavailable(format!("OUTCOME_UNKNOWN: {}", msg.into())), ErrorKind::OutcomeUnknown)
}

/// The status for a rejection decided by the state machine.
pub fn from_outcome(outcome: Outcome) -> Status {
    match outcome {
        Outcome::Fenced { stream, leader } => with_meta(
            tagged(
                Status::failed_precondition(format!(
                    "FENCED: this writer is no longer leader of stream {stream} (leader is {})",
                    if leader.is_empty() { "nobody" } else { &leader }
                )),
                ErrorKind::Fenced,
            ),
            STREAM_LEADER_KEY,
            &leader,
        ),
        Outcome::CasFailed { actual } => tagged(
            Status::aborted(format!("CAS_FAILED: the current value is {}", if actual.is_empty() { "empty" } else { &actual })),
            ErrorKind::CasFailed,
        ),
        Outcome::LeaseHeld { leader, deadline_unix_ms } => with_meta(
            tagged(
                Status::failed_precondition(format!(
                    "LEASE_HELD: {leader} holds the lease until {deadline_unix_ms} (unix ms); retry after it expires"
                )),
                ErrorKind::LeaseHeld,
            ),
            STREAM_LEADER_KEY,
            &leader,
        ),
        Outcome::NotCaughtUp { last_seq } => tagged(
            Status::failed_precondition(format!(
                "NOT_CAUGHT_UP: the stream's last seq is {last_seq}; read up to it before taking the lease"
            )),
            ErrorKind::NotCaughtUp,
        ),
        Outcome::SeqMismatch { last_seq } => tagged(
            Status::failed_precondition(format!("SEQ_MISMATCH: the stream's last seq is {last_seq}")),
            ErrorKind::SeqMismatch,
        ),
        Outcome::UnknownStream { stream } => unknown_stream(&stream),
        Outcome::StreamFull { stream, retained_bytes, limit } => tagged(
            Status::resource_exhausted(format!(
                "STREAM_FULL: stream {stream} holds {retained_bytes} untrimmed bytes, the journal's hard cap is {limit}; \
                 take a snapshot so the journal can trim (scripts/cluster snapshot)"
            )),
            ErrorKind::StreamFull,
        ),
        Outcome::Invalid { reason } => invalid(reason),
        other => Status::internal(format!("unexpected outcome {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kind of rejection the server sends survives the trip inside a
    /// stream message: the client classifies it exactly as the unary status.
    #[test]
    fn statuses_survive_the_stream_encoding() {
        let all = [
            invalid("empty payload"),
            unknown_stream("s"),
            not_leader(Some(2), Some("127.0.0.1:7502".into())),
            not_leader(None, None),
            overloaded(10),
            stream_full("s", 10, 8),
            from_outcome(Outcome::StreamFull { stream: "s".into(), retained_bytes: 1, limit: 2 }),
            outcome_unknown("lost"),
            from_outcome(Outcome::Fenced { stream: "s".into(), leader: "u-2".into() }),
            from_outcome(Outcome::SeqMismatch { last_seq: 7 }),
            Status::internal("no keel tag"),
        ];
        for status in all {
            let back = from_rpc_error(&to_rpc_error(&status));
            assert_eq!(back.code(), status.code());
            assert_eq!(back.message(), status.message());
            for k in KEEL_KEYS {
                assert_eq!(back.metadata().get(k), status.metadata().get(k), "{k} of {status:?}");
            }
            assert_eq!(format!("{:?}", JournalError::from_status(&back)), format!("{:?}", JournalError::from_status(&status)));
        }
    }
}
