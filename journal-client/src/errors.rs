//! Journal errors as clients see them: the wire words (the `keel-error`
//! metadata key and the others a status may carry; proto/journal.proto),
//! `JournalError` (what the client library returns), and the encoding of a
//! status inside a stream message. The server's constructors of each
//! rejection are keel-journal's (`errors.rs` there).

use tonic::Status;

pub const ERROR_KEY: &str = "keel-error";
pub const STREAM_LEADER_KEY: &str = "keel-stream-leader";
pub const RAFT_LEADER_KEY: &str = "keel-raft-leader";

/// The keel-* metadata keys a status may carry.
pub const KEEL_KEYS: [&str; 3] = [ERROR_KEY, STREAM_LEADER_KEY, RAFT_LEADER_KEY];

/// A status as it travels inside a stream message (`AppendStream`): its
/// code, message and keel-* metadata.
pub fn to_rpc_error(status: &Status) -> keel_proto::journal::RpcError {
    let metadata = KEEL_KEYS
        .iter()
        .filter_map(|k| status.metadata().get(*k).and_then(|v| v.to_str().ok()).map(|v| (k.to_string(), v.to_string())))
        .collect();
    keel_proto::journal::RpcError { code: status.code() as i32, message: status.message().to_string(), metadata }
}

/// The inverse of `to_rpc_error`: the status the unary call would have
/// returned. Unknown codes and metadata keys other than keel-* are dropped.
pub fn from_rpc_error(e: &keel_proto::journal::RpcError) -> Status {
    let mut status = Status::new(tonic::Code::from_i32(e.code), e.message.clone());
    for k in KEEL_KEYS {
        if let Some(v) = e.metadata.get(k).and_then(|v| v.parse().ok()) {
            status.metadata_mut().insert(k, v);
        }
    }
    status
}

/// A journal call's failure, as the client library reports it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JournalError {
    /// The writer is not the stream's leader: stop writing.
    #[error("{message}")]
    Fenced { leader: String, message: String },
    /// The request may or may not have been applied.
    #[error("{0}")]
    OutcomeUnknown(String),
    /// No node could be reached or none is leader (nothing was applied).
    #[error("{0}")]
    Unavailable(String),
    #[error("{message}")]
    Rejected { kind: Rejection, message: String },
}

/// Why the journal refused a request (nothing was applied), by the
/// `keel-error` word the server sends (proto/journal.proto lists them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    Invalid,
    UnknownStream,
    Trimmed,
    Overloaded,
    StreamFull,
    CasFailed,
    LeaseHeld,
    NotCaughtUp,
    SeqMismatch,
    Membership,
    NotAllowed,
    /// A word this client does not know (a newer server), or the gRPC code
    /// of a status without one, or a local failure ("io").
    Other(String),
}

impl Rejection {
    /// Every word with a variant, and the variant.
    const WORDS: [(&'static str, Rejection); 11] = [
        ("invalid", Rejection::Invalid),
        ("unknown-stream", Rejection::UnknownStream),
        ("trimmed", Rejection::Trimmed),
        ("overloaded", Rejection::Overloaded),
        ("stream-full", Rejection::StreamFull),
        ("cas-failed", Rejection::CasFailed),
        ("lease-held", Rejection::LeaseHeld),
        ("not-caught-up", Rejection::NotCaughtUp),
        ("seq-mismatch", Rejection::SeqMismatch),
        ("membership", Rejection::Membership),
        ("not-allowed", Rejection::NotAllowed),
    ];

    pub fn from_word(word: &str) -> Rejection {
        Rejection::WORDS.iter().find(|(w, _)| *w == word).map(|(_, r)| r.clone()).unwrap_or_else(|| Rejection::Other(word.to_string()))
    }

    /// The wire word.
    pub fn as_str(&self) -> &str {
        match self {
            Rejection::Other(w) => w,
            known => Rejection::WORDS.iter().find(|(_, r)| r == known).map(|(w, _)| *w).expect("every variant has a word"),
        }
    }
}

impl JournalError {
    pub fn from_status(status: &Status) -> JournalError {
        let word = status.metadata().get(ERROR_KEY).and_then(|v| v.to_str().ok()).unwrap_or("");
        let message = status.message().to_string();
        match word {
            "fenced" => JournalError::Fenced {
                leader: status
                    .metadata()
                    .get(STREAM_LEADER_KEY)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string(),
                message,
            },
            "outcome-unknown" => JournalError::OutcomeUnknown(message),
            "not-leader" => JournalError::Unavailable(message),
            "" => JournalError::Rejected { kind: Rejection::Other(format!("{:?}", status.code())), message },
            w => JournalError::Rejected { kind: Rejection::from_word(w), message },
        }
    }

    /// The `keel-error` word (or gRPC code) of a rejection.
    pub fn kind(&self) -> &str {
        match self {
            JournalError::Fenced { .. } => "fenced",
            JournalError::OutcomeUnknown(_) => "outcome-unknown",
            JournalError::Unavailable(_) => "unavailable",
            JournalError::Rejected { kind, .. } => kind.as_str(),
        }
    }

    /// Why it was refused, if it was a refusal.
    pub fn rejection(&self) -> Option<&Rejection> {
        match self {
            JournalError::Rejected { kind, .. } => Some(kind),
            _ => None,
        }
    }

    pub fn is_fenced(&self) -> bool {
        matches!(self, JournalError::Fenced { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_word_round_trips() {
        for (w, r) in Rejection::WORDS {
            assert_eq!(Rejection::from_word(w), r);
            assert_eq!(r.as_str(), w);
        }
        assert_eq!(Rejection::from_word("from-the-future"), Rejection::Other("from-the-future".into()));
        assert_eq!(Rejection::Other("io".into()).as_str(), "io");
    }
}
