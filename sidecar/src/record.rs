//! The journal record of a primary's replication stream.
//!
//! A record carries raw bytes of Redis's replication stream with their exact
//! place in it: replication id and the offset range `[start, end)`. Records
//! of one history are contiguous (each starts where the previous ended), so
//! a byte is never journaled twice nor skipped, and a reader can feed the
//! bytes to a Redis replica unchanged.
//!
//! Layout (little-endian): version u8 (=1) | kind u8 | replid [40] |
//! start u64 | end u64 | payload_len u32 | payload.
//! Kinds: `Stream` (payload = stream bytes, `end - start == payload_len`),
//! `Rdb` (a chunk of the base RDB the history starts from; start = end =
//! the offset the RDB stands at), `RdbEnd` (the base RDB is complete),
//! `RdbAbort` (the `Rdb` chunks since the last `RdbEnd`/`RdbAbort` are void:
//! their writer died before the base was complete, and the next leader
//! starts a new one), `StreamVoid` (the stream bytes `[start, end)` of the
//! records before it are void: `end` was the stream's end, and the bytes
//! from `start` were an unfinished command or transaction of a writer that
//! died; the stream continues at `start`; no payload).

use keel_journal_client::client::JournalClient;
use keel_journal_client::client::JournalError;

pub const VERSION: u8 = 1;
const HEADER_BYTES: usize = 1 + 1 + 40 + 8 + 8 + 4;
/// Largest payload one record carries (the journal's record limit is 1 MiB).
pub const MAX_PAYLOAD_BYTES: usize = 512 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Stream = 1,
    Rdb = 2,
    RdbEnd = 3,
    RdbAbort = 4,
    StreamVoid = 5,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub kind: Kind,
    /// Redis replication id (40 hex characters).
    pub replid: String,
    pub start: u64,
    pub end: u64,
    pub payload: Vec<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record is {0} bytes, shorter than its {HEADER_BYTES}-byte header")]
    Short(usize),
    #[error("record version {0} is not {VERSION}, the one this keel-sidecar reads: a newer release wrote it (upgrade this sidecar) or it is not a Keel record")]
    Version(u8),
    #[error("record kind {0} is unknown")]
    Kind(u8),
    #[error("replication id is not 40 hex characters")]
    ReplId,
    #[error("payload length {declared} does not match the {actual} bytes present")]
    Length { declared: usize, actual: usize },
    #[error("offset range {start}..{end} does not fit a {kind:?} record of {len} bytes")]
    Range { kind: Kind, start: u64, end: u64, len: usize },
}

impl Record {
    pub fn encode(&self) -> Vec<u8> {
        assert_eq!(self.replid.len(), 40, "a replid is 40 hex characters");
        let mut out = Vec::with_capacity(HEADER_BYTES + self.payload.len());
        out.push(VERSION);
        out.push(self.kind as u8);
        out.extend_from_slice(self.replid.as_bytes());
        out.extend_from_slice(&self.start.to_le_bytes());
        out.extend_from_slice(&self.end.to_le_bytes());
        out.extend_from_slice(&(self.payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.payload);
        out
    }

    pub fn decode(b: &[u8]) -> Result<Record, DecodeError> {
        if b.len() < HEADER_BYTES {
            return Err(DecodeError::Short(b.len()));
        }
        if b[0] != VERSION {
            return Err(DecodeError::Version(b[0]));
        }
        let kind = match b[1] {
            1 => Kind::Stream,
            2 => Kind::Rdb,
            3 => Kind::RdbEnd,
            4 => Kind::RdbAbort,
            5 => Kind::StreamVoid,
            k => return Err(DecodeError::Kind(k)),
        };
        let replid = &b[2..42];
        if !replid.iter().all(|c| c.is_ascii_hexdigit()) {
            return Err(DecodeError::ReplId);
        }
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
        let (start, end) = (u64_at(42), u64_at(50));
        let declared = u32::from_le_bytes(b[58..62].try_into().unwrap()) as usize;
        let payload = &b[HEADER_BYTES..];
        if declared != payload.len() {
            return Err(DecodeError::Length { declared, actual: payload.len() });
        }
        let fits = match kind {
            Kind::Stream => end.checked_sub(start) == Some(declared as u64),
            Kind::Rdb | Kind::RdbEnd | Kind::RdbAbort => start == end,
            Kind::StreamVoid => start <= end && declared == 0,
        };
        if !fits {
            return Err(DecodeError::Range { kind, start, end, len: declared });
        }
        Ok(Record {
            kind,
            replid: String::from_utf8(replid.to_vec()).expect("hex is ASCII"),
            start,
            end,
            payload: payload.to_vec(),
        })
    }
}

/// Why `read_one` found no record.
#[derive(Debug)]
pub enum ReadOneError {
    /// The journal did not answer (or refused the read).
    Journal(JournalError),
    /// The record is not in the stream (trimmed, or not written yet).
    Gone,
    /// The record is there but is not a Keel record (the decoder's reason).
    Undecodable(String),
}

impl std::fmt::Display for ReadOneError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadOneError::Journal(e) => write!(f, "{e}"),
            ReadOneError::Gone => write!(f, "the record is not in the stream"),
            ReadOneError::Undecodable(e) => write!(f, "not a Keel record: {e}"),
        }
    }
}

/// Reads and decodes record `seq` of `stream`.
pub async fn read_one(journal: &JournalClient, stream: &str, seq: u64) -> Result<Record, ReadOneError> {
    let mut reader = journal.read(stream, seq, false);
    let batch = reader.next_batch().await.map_err(ReadOneError::Journal)?.unwrap_or_default();
    let r = batch.into_iter().find(|r| r.seq == seq).ok_or(ReadOneError::Gone)?;
    Record::decode(&r.payload).map_err(|e| ReadOneError::Undecodable(e.to_string()))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef01234567";

    #[test]
    fn round_trip_and_clear_errors() {
        let r = Record { kind: Kind::Stream, replid: ID.into(), start: 100, end: 103, payload: b"abc".to_vec() };
        assert_eq!(Record::decode(&r.encode()).unwrap(), r);
        let mut bad = r.encode();
        bad[0] = 9;
        assert_eq!(Record::decode(&bad), Err(DecodeError::Version(9)));
        let mut bad = r.encode();
        bad.pop();
        assert!(matches!(Record::decode(&bad), Err(DecodeError::Length { .. })));
        let wrong_range = Record { end: 200, ..r.clone() };
        assert!(matches!(Record::decode(&wrong_range.encode()), Err(DecodeError::Range { .. })));
        assert_eq!(Record::decode(b"short"), Err(DecodeError::Short(5)));
        let void = Record { kind: Kind::StreamVoid, replid: ID.into(), start: 90, end: 103, payload: Vec::new() };
        assert_eq!(Record::decode(&void.encode()).unwrap(), void);
        let backwards = Record { start: 104, ..void.clone() };
        assert!(matches!(Record::decode(&backwards.encode()), Err(DecodeError::Range { .. })));
        let with_payload = Record { payload: b"x".to_vec(), ..void };
        assert!(matches!(Record::decode(&with_payload.encode()), Err(DecodeError::Range { .. })));
    }

    proptest! {
        #[test]
        fn decode_never_panics(junk in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Record::decode(&junk);
        }

        #[test]
        fn stream_records_round_trip(start in 0u64..1 << 50, payload in proptest::collection::vec(any::<u8>(), 0..300)) {
            let r = Record { kind: Kind::Stream, replid: ID.into(), start, end: start + payload.len() as u64, payload };
            prop_assert_eq!(Record::decode(&r.encode()).unwrap(), r);
        }
    }
}
