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

pub use keel_proto::journal::ErrorKind;

/// The prefix prost keeps in `ErrorKind::as_str_name`.
const KIND_PREFIX: &str = "ERROR_KIND_";

/// The `keel-error` word of a kind (proto/journal.proto says how it is
/// derived): `UnknownStream` is "unknown-stream".
pub fn word(kind: ErrorKind) -> String {
    let name = kind.as_str_name();
    name.strip_prefix(KIND_PREFIX).unwrap_or(name).to_ascii_lowercase().replace('_', "-")
}

/// The kind a `keel-error` word names, if this client knows it.
pub fn kind_of(word: &str) -> Option<ErrorKind> {
    if word.is_empty() || !word.bytes().all(|b| b.is_ascii_lowercase() || b == b'-') {
        return None;
    }
    ErrorKind::from_str_name(&format!("{KIND_PREFIX}{}", word.to_ascii_uppercase().replace('-', "_")))
        .filter(|k| *k != ErrorKind::Unspecified)
}

/// Why the journal refused a request (nothing was applied): the kinds of
/// proto/journal.proto that are refusals.
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
    /// The rejection of a kind; `None` for the kinds that are not refusals
    /// (fenced, outcome unknown, not leader). Exhaustive: a kind added to
    /// the proto does not compile until it is placed here.
    pub fn of_kind(kind: ErrorKind) -> Option<Rejection> {
        Some(match kind {
            ErrorKind::Unspecified | ErrorKind::Fenced | ErrorKind::OutcomeUnknown | ErrorKind::NotLeader => return None,
            ErrorKind::Invalid => Rejection::Invalid,
            ErrorKind::UnknownStream => Rejection::UnknownStream,
            ErrorKind::Trimmed => Rejection::Trimmed,
            ErrorKind::Overloaded => Rejection::Overloaded,
            ErrorKind::StreamFull => Rejection::StreamFull,
            ErrorKind::CasFailed => Rejection::CasFailed,
            ErrorKind::LeaseHeld => Rejection::LeaseHeld,
            ErrorKind::NotCaughtUp => Rejection::NotCaughtUp,
            ErrorKind::SeqMismatch => Rejection::SeqMismatch,
            ErrorKind::Membership => Rejection::Membership,
            ErrorKind::NotAllowed => Rejection::NotAllowed,
        })
    }

    /// The proto kind, for every variant but `Other`.
    pub fn kind(&self) -> Option<ErrorKind> {
        Some(match self {
            Rejection::Invalid => ErrorKind::Invalid,
            Rejection::UnknownStream => ErrorKind::UnknownStream,
            Rejection::Trimmed => ErrorKind::Trimmed,
            Rejection::Overloaded => ErrorKind::Overloaded,
            Rejection::StreamFull => ErrorKind::StreamFull,
            Rejection::CasFailed => ErrorKind::CasFailed,
            Rejection::LeaseHeld => ErrorKind::LeaseHeld,
            Rejection::NotCaughtUp => ErrorKind::NotCaughtUp,
            Rejection::SeqMismatch => ErrorKind::SeqMismatch,
            Rejection::Membership => ErrorKind::Membership,
            Rejection::NotAllowed => ErrorKind::NotAllowed,
            Rejection::Other(_) => return None,
        })
    }

    /// The rejection a wire word names (`Other` for words this client does
    /// not know).
    pub fn from_word(w: &str) -> Rejection {
        kind_of(w).and_then(Rejection::of_kind).unwrap_or_else(|| Rejection::Other(w.to_string()))
    }

    /// The wire word.
    pub fn as_str(&self) -> std::borrow::Cow<'_, str> {
        match (self, self.kind()) {
            (_, Some(k)) => word(k).into(),
            (Rejection::Other(w), None) => w.as_str().into(),
            (_, None) => unreachable!("only Other has no kind"),
        }
    }
}

impl JournalError {
    pub fn from_status(status: &Status) -> JournalError {
        let w = status.metadata().get(ERROR_KEY).and_then(|v| v.to_str().ok()).unwrap_or("");
        let message = status.message().to_string();
        match kind_of(w) {
            Some(ErrorKind::Fenced) => JournalError::Fenced {
                leader: status
                    .metadata()
                    .get(STREAM_LEADER_KEY)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string(),
                message,
            },
            Some(ErrorKind::OutcomeUnknown) => JournalError::OutcomeUnknown(message),
            Some(ErrorKind::NotLeader) => JournalError::Unavailable(message),
            Some(k) => match Rejection::of_kind(k) {
                Some(kind) => JournalError::Rejected { kind, message },
                None => JournalError::Rejected { kind: Rejection::Other(w.to_string()), message },
            },
            None if w.is_empty() => JournalError::Rejected { kind: Rejection::Other(format!("{:?}", status.code())), message },
            None => JournalError::Rejected { kind: Rejection::Other(w.to_string()), message },
        }
    }

    /// The `keel-error` word (or gRPC code) of a failure.
    pub fn kind(&self) -> std::borrow::Cow<'_, str> {
        match self {
            JournalError::Fenced { .. } => word(ErrorKind::Fenced).into(),
            JournalError::OutcomeUnknown(_) => word(ErrorKind::OutcomeUnknown).into(),
            JournalError::Unavailable(_) => "unavailable".into(),
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

    /// Every kind of the proto, by its number.
    fn all_kinds() -> Vec<ErrorKind> {
        (0..64).filter_map(|n| ErrorKind::try_from(n).ok()).collect()
    }

    #[test]
    fn every_kind_has_one_word_and_back() {
        let kinds = all_kinds();
        assert!(kinds.len() >= 15, "the proto's kinds: {kinds:?}");
        let mut words = std::collections::HashSet::new();
        for k in kinds {
            let w = word(k);
            assert!(words.insert(w.clone()), "two kinds share {w}");
            if k == ErrorKind::Unspecified {
                assert_eq!(kind_of(&w), None);
                continue;
            }
            assert_eq!(kind_of(&w), Some(k), "{w}");
            if let Some(r) = Rejection::of_kind(k) {
                assert_eq!(r.kind(), Some(k));
                assert_eq!(Rejection::from_word(&w), r);
                assert_eq!(r.as_str(), w);
            }
        }
    }

    #[test]
    fn the_words_on_the_wire_are_the_documented_ones() {
        // Servers and clients of other versions send and read these words.
        assert_eq!(word(ErrorKind::UnknownStream), "unknown-stream");
        assert_eq!(word(ErrorKind::OutcomeUnknown), "outcome-unknown");
        assert_eq!(word(ErrorKind::NotLeader), "not-leader");
        assert_eq!(word(ErrorKind::NotAllowed), "not-allowed");
        assert_eq!(word(ErrorKind::SeqMismatch), "seq-mismatch");
    }

    #[test]
    fn unknown_words_are_kept_not_guessed() {
        for w in ["from-the-future", "", "UNKNOWN-STREAM", "unknown_stream", "error-kind-invalid", "unspecified"] {
            assert_eq!(kind_of(w), None, "{w}");
        }
        assert_eq!(Rejection::from_word("from-the-future"), Rejection::Other("from-the-future".into()));
        assert_eq!(Rejection::Other("io".into()).as_str(), "io");
        let mut status = Status::unavailable("x");
        status.metadata_mut().insert(ERROR_KEY, "from-the-future".parse().unwrap());
        assert_eq!(JournalError::from_status(&status).rejection(), Some(&Rejection::Other("from-the-future".into())));
    }
}
