//! The journal record of a primary's replication stream.
//!
//! A record carries raw bytes of Redis's replication stream with their exact
//! place in it: replication id and the offset range `[start, end)`. Records
//! of one history are contiguous (each starts where the previous ended), so
//! a byte is never journaled twice nor skipped, and a reader can feed the
//! bytes to a Redis replica unchanged.
//!
//! Layout (little-endian), version 2, written since records name their
//! writer's engine:
//! ```text
//! version u8 (=2) | kind u8 | replid [40] | start u64 | end u64 |
//! writer: name_len u8 | name [name_len] | major u16 | minor u16 | patch u16 | rdb u16 |
//! payload_len u32 | payload
//! ```
//! The writer is the engine of the server whose stream the record carries
//! (engine.rs `Writer`: lowercase ASCII name of at most
//! `MAX_ENGINE_NAME_BYTES`, version, and the RDB version it writes); a
//! `name_len` of 0 names none (its four numbers are then 0), as when the
//! leader could not read its server's engine. The header is
//! `MIN_HEADER_BYTES..=MAX_HEADER_BYTES`: 71 bytes plus the name.
//! Version 1, the first format (still read; its records name no writer, so
//! the feeder checks nothing for them): the same without the writer field.
//! Kinds: `Stream` (payload = stream bytes, `end - start == payload_len`),
//! `Rdb` (a chunk of the base RDB the history starts from; start = end =
//! the offset the RDB stands at), `RdbEnd` (the base RDB is complete),
//! `RdbAbort` (the `Rdb` chunks since the last `RdbEnd`/`RdbAbort` are void:
//! their writer died before the base was complete, and the next leader
//! starts a new one), `StreamVoid` (the stream bytes `[start, end)` of the
//! records before it are void: `end` was the stream's end, and the bytes
//! from `start` were an unfinished command or transaction of a writer that
//! died; the stream continues at `start`; no payload).
//!
//! The decoder takes any bytes (another process may append to a stream):
//! it answers a record or an error that names the problem, never panics,
//! and accepts only what `encode` writes (a record re-encodes to the same
//! bytes).

use keel_journal_client::client::JournalClient;
use keel_journal_client::client::JournalError;

use crate::engine::MAX_ENGINE_NAME_BYTES;
use crate::engine::Writer;

/// The format this release writes.
pub const VERSION: u8 = 2;
/// The first format, still read.
pub const VERSION_1: u8 = 1;
/// version, kind, replid, start, end.
const FIXED_BYTES: usize = 1 + 1 + 40 + 8 + 8;
/// The writer field's numbers: major, minor, patch, RDB version.
const WRITER_NUMBERS_BYTES: usize = 4 * 2;
const PAYLOAD_LEN_BYTES: usize = 4;
/// A version 1 header.
const HEADER_BYTES_V1: usize = FIXED_BYTES + PAYLOAD_LEN_BYTES;
/// A version 2 header with no writer named, and with the longest name.
pub const MIN_HEADER_BYTES: usize = FIXED_BYTES + 1 + WRITER_NUMBERS_BYTES + PAYLOAD_LEN_BYTES;
pub const MAX_HEADER_BYTES: usize = MIN_HEADER_BYTES + MAX_ENGINE_NAME_BYTES;
// The name's length fits its byte.
const _: () = assert!(MAX_ENGINE_NAME_BYTES <= u8::MAX as usize);
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
    /// The engine of the server whose stream this is (`None`: not named,
    /// as in every record of the first format).
    pub writer: Option<Writer>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record is {len} bytes, shorter than its {header}-byte header")]
    Short { len: usize, header: usize },
    #[error("record version {0} is not one this keel-sidecar reads ({VERSION_1} to {VERSION}): a newer release wrote it (upgrade this sidecar) or it is not a Keel record")]
    Version(u8),
    #[error("record kind {0} is unknown")]
    Kind(u8),
    #[error("replication id is not 40 hex characters")]
    ReplId,
    #[error("the writer's engine is not named as a Keel record names it: {0}")]
    Writer(&'static str),
    #[error("payload length {declared} does not match the {actual} bytes present")]
    Length { declared: usize, actual: usize },
    #[error("offset range {start}..{end} does not fit a {kind:?} record of {len} bytes")]
    Range { kind: Kind, start: u64, end: u64, len: usize },
}

impl Record {
    /// The record in the current format (`VERSION`).
    pub fn encode(&self) -> Vec<u8> {
        assert_eq!(self.replid.len(), 40, "a replid is 40 hex characters");
        let name = self.writer.as_ref().map_or("", |w| w.name());
        let mut out = Vec::with_capacity(MIN_HEADER_BYTES + name.len() + self.payload.len());
        out.push(VERSION);
        out.push(self.kind as u8);
        out.extend_from_slice(self.replid.as_bytes());
        out.extend_from_slice(&self.start.to_le_bytes());
        out.extend_from_slice(&self.end.to_le_bytes());
        out.push(name.len() as u8);
        out.extend_from_slice(name.as_bytes());
        let [major, minor, patch] = self.writer.map_or([0; 3], |w| w.version);
        let rdb = self.writer.map_or(0, |w| w.rdb_version);
        for n in [major, minor, patch, rdb] {
            out.extend_from_slice(&n.to_le_bytes());
        }
        out.extend_from_slice(&(self.payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.payload);
        out
    }

    /// A record of either format (`VERSION_1` or `VERSION`).
    pub fn decode(b: &[u8]) -> Result<Record, DecodeError> {
        let short = |header: usize| DecodeError::Short { len: b.len(), header };
        if b.len() < HEADER_BYTES_V1 {
            return Err(short(HEADER_BYTES_V1));
        }
        let version = b[0];
        let min_header = match version {
            VERSION_1 => HEADER_BYTES_V1,
            VERSION => MIN_HEADER_BYTES,
            v => return Err(DecodeError::Version(v)),
        };
        if b.len() < min_header {
            return Err(short(min_header));
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
        let (writer, at) = if version == VERSION_1 { (None, FIXED_BYTES) } else { decode_writer(b)? };
        let declared = u32::from_le_bytes(b[at..at + PAYLOAD_LEN_BYTES].try_into().unwrap()) as usize;
        let payload = &b[at + PAYLOAD_LEN_BYTES..];
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
            writer,
        })
    }
}

/// The writer field of a version 2 record `b` (at least `MIN_HEADER_BYTES`
/// long), and where the payload length follows it.
fn decode_writer(b: &[u8]) -> Result<(Option<Writer>, usize), DecodeError> {
    let name_len = b[FIXED_BYTES] as usize;
    if name_len > MAX_ENGINE_NAME_BYTES {
        return Err(DecodeError::Writer("its name is longer than MAX_ENGINE_NAME_BYTES"));
    }
    let numbers_at = FIXED_BYTES + 1 + name_len;
    let at = numbers_at + WRITER_NUMBERS_BYTES;
    if b.len() < at + PAYLOAD_LEN_BYTES {
        return Err(DecodeError::Short { len: b.len(), header: at + PAYLOAD_LEN_BYTES });
    }
    let n = |i: usize| u16::from_le_bytes(b[numbers_at + 2 * i..numbers_at + 2 * i + 2].try_into().unwrap());
    let (version, rdb) = ([n(0), n(1), n(2)], n(3));
    if name_len == 0 {
        if version != [0; 3] || rdb != 0 {
            return Err(DecodeError::Writer("no name, yet a version"));
        }
        return Ok((None, at));
    }
    let name = std::str::from_utf8(&b[FIXED_BYTES + 1..numbers_at]).map_err(|_| DecodeError::Writer("its name is not ASCII"))?;
    let writer = Writer::new(name, version, rdb).ok_or(DecodeError::Writer("its name is not lowercase ASCII letters and digits"))?;
    Ok((Some(writer), at))
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
    use crate::engine::Engine;

    const ID: &str = "0123456789abcdef0123456789abcdef01234567";

    fn valkey() -> Option<Writer> {
        Writer::of(&Engine { name: "valkey".into(), version: (9, 1, 0) })
    }

    #[test]
    fn round_trip_and_clear_errors() {
        let r = Record { kind: Kind::Stream, replid: ID.into(), start: 100, end: 103, payload: b"abc".to_vec(), writer: valkey() };
        assert_eq!(r.encode().len(), MIN_HEADER_BYTES + "valkey".len() + 3);
        assert_eq!(Record::decode(&r.encode()).unwrap(), r);
        let mut bad = r.encode();
        bad[0] = 9;
        assert_eq!(Record::decode(&bad), Err(DecodeError::Version(9)));
        let e = DecodeError::Version(9).to_string();
        assert!(e.contains("upgrade this sidecar") && e.contains("1 to 2"), "says what to do: {e}");
        let mut bad = r.encode();
        bad.pop();
        assert!(matches!(Record::decode(&bad), Err(DecodeError::Length { .. })));
        let wrong_range = Record { end: 200, ..r.clone() };
        assert!(matches!(Record::decode(&wrong_range.encode()), Err(DecodeError::Range { .. })));
        assert_eq!(Record::decode(b"short"), Err(DecodeError::Short { len: 5, header: HEADER_BYTES_V1 }));
        assert_eq!(Record::decode(&r.encode()[..65]), Err(DecodeError::Short { len: 65, header: MIN_HEADER_BYTES }));
        assert_eq!(Record::decode(b""), Err(DecodeError::Short { len: 0, header: HEADER_BYTES_V1 }));
        let void = Record { kind: Kind::StreamVoid, replid: ID.into(), start: 90, end: 103, payload: Vec::new(), writer: None };
        assert_eq!(Record::decode(&void.encode()).unwrap(), void);
        assert_eq!(void.encode().len(), MIN_HEADER_BYTES);
        let backwards = Record { start: 104, ..void.clone() };
        assert!(matches!(Record::decode(&backwards.encode()), Err(DecodeError::Range { .. })));
        let with_payload = Record { payload: b"x".to_vec(), ..void };
        assert!(matches!(Record::decode(&with_payload.encode()), Err(DecodeError::Range { .. })));
    }

    #[test]
    fn the_writer_field_is_checked() {
        let r = Record { kind: Kind::RdbEnd, replid: ID.into(), start: 5, end: 5, payload: Vec::new(), writer: valkey() };
        let good = r.encode();
        let mut upper = good.clone();
        upper[FIXED_BYTES + 1] = b'V';
        assert!(matches!(Record::decode(&upper), Err(DecodeError::Writer(_))));
        let mut long = good.clone();
        long[FIXED_BYTES] = MAX_ENGINE_NAME_BYTES as u8 + 1;
        assert!(matches!(Record::decode(&long), Err(DecodeError::Writer(_))));
        let mut past_end = good.clone();
        past_end[FIXED_BYTES] = MAX_ENGINE_NAME_BYTES as u8;
        assert!(matches!(Record::decode(&past_end), Err(DecodeError::Short { .. }) | Err(DecodeError::Writer(_))));
        // No name, yet numbers: not what `encode` writes.
        let mut unnamed = Record { writer: None, ..r }.encode();
        unnamed[FIXED_BYTES + 1] = 7;
        assert_eq!(Record::decode(&unnamed), Err(DecodeError::Writer("no name, yet a version")));
    }

    #[test]
    fn first_format_records_still_read_with_no_writer() {
        // Version 1, as the first release wrote it: no writer field.
        let mut v1 = vec![VERSION_1, Kind::Stream as u8];
        v1.extend_from_slice(ID.as_bytes());
        v1.extend_from_slice(&100u64.to_le_bytes());
        v1.extend_from_slice(&103u64.to_le_bytes());
        v1.extend_from_slice(&3u32.to_le_bytes());
        v1.extend_from_slice(b"abc");
        let r = Record::decode(&v1).unwrap();
        assert_eq!(r, Record { kind: Kind::Stream, replid: ID.into(), start: 100, end: 103, payload: b"abc".to_vec(), writer: None });
        assert_eq!(r.encode()[0], VERSION, "written again in today's format");
    }

    fn writer() -> impl Strategy<Value = Option<Writer>> {
        prop_oneof![
            Just(None),
            ("[a-z0-9]{1,15}", any::<[u16; 3]>(), any::<u16>()).prop_map(|(n, v, rdb)| Writer::new(&n, v, rdb)),
        ]
    }

    fn kind() -> impl Strategy<Value = Kind> {
        prop_oneof![Just(Kind::Stream), Just(Kind::Rdb), Just(Kind::RdbEnd), Just(Kind::RdbAbort), Just(Kind::StreamVoid)]
    }

    proptest! {
        #[test]
        fn decode_never_panics(junk in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Record::decode(&junk);
        }

        /// Junk behind a valid header of either version: never a panic, and
        /// whatever decodes re-encodes to the same bytes (version 2).
        #[test]
        fn decode_never_panics_past_a_header(v in prop_oneof![Just(VERSION_1), Just(VERSION)], k in 1u8..=5, tail in proptest::collection::vec(any::<u8>(), 0..120)) {
            let mut b = vec![v, k];
            b.extend_from_slice(ID.as_bytes());
            b.extend_from_slice(&tail);
            if let Ok(r) = Record::decode(&b) {
                if v == VERSION {
                    prop_assert_eq!(r.encode(), b);
                }
            }
        }

        #[test]
        fn stream_records_round_trip(start in 0u64..1 << 50, payload in proptest::collection::vec(any::<u8>(), 0..300), writer in writer()) {
            let r = Record { kind: Kind::Stream, replid: ID.into(), start, end: start + payload.len() as u64, payload, writer };
            prop_assert_eq!(Record::decode(&r.encode()).unwrap(), r);
        }

        /// Every kind, with or without a writer; the header stays within its bounds.
        #[test]
        fn records_of_every_kind_round_trip(kind in kind(), at in 0u64..1 << 50, payload in proptest::collection::vec(any::<u8>(), 0..50), writer in writer()) {
            let (end, payload) = match kind {
                Kind::Stream => (at + payload.len() as u64, payload),
                Kind::Rdb => (at, payload),
                _ => (at, Vec::new()),
            };
            let r = Record { kind, replid: ID.into(), start: at, end, payload, writer };
            let b = r.encode();
            let header = b.len() - r.payload.len();
            prop_assert!((MIN_HEADER_BYTES..=MAX_HEADER_BYTES).contains(&header));
            prop_assert_eq!(Record::decode(&b).unwrap(), r);
        }

        /// A flipped byte or a cut anywhere in an encoded record: an error
        /// or a record, never a panic.
        #[test]
        fn damaged_records_never_panic(payload in proptest::collection::vec(any::<u8>(), 0..40), writer in writer(), at in any::<prop::sample::Index>(), x in 1u8..=255, cut in any::<prop::sample::Index>()) {
            let r = Record { kind: Kind::Stream, replid: ID.into(), start: 7, end: 7 + payload.len() as u64, payload, writer };
            let mut b = r.encode();
            let i = at.index(b.len());
            b[i] ^= x;
            let _ = Record::decode(&b);
            let _ = Record::decode(&b[..cut.index(b.len())]);
        }
    }
}
