//! What a journal stream holds, as a replica's feeder needs to know it:
//! where the base RDB is, which replication offsets the stream covers, and
//! which byte histories a Redis asking for a partial resync may share with
//! it.
//!
//! The stream is: the base RDB (records `Rdb`… then `RdbEnd` at offset X;
//! chunks of an unfinished base are voided by an `RdbAbort` before the next),
//! then `Stream` records covering `[X, end)` contiguously. Each producer (a
//! primary's tenure) stamps its own replication id; offsets continue across
//! tenures.
//!
//! The partial-resync rule (`psync`), protecting the invariant that a
//! replica's data is exactly the journal's data up to its offset:
//! a Redis at offset `L` with replication id `R` may continue without a
//! full sync only if `X <= L <= end` and its bytes up to `L` are known to
//! be the journal's: either `R` is this feeder's own id (it got every byte
//! from a journal with this base), or `R` is a producer whose journaled
//! tenure covers `L` (its earlier bytes came from the journal as a replica,
//! the rest it produced and the journal kept). An old primary whose last
//! writes never reached the journal asks with an offset past its tenure,
//! and gets a full sync that discards them.
//!
//! Memory is bounded: one entry per producer tenure (capped), one offset
//! checkpoint every `CHECKPOINT_EVERY` records, and one entry per void
//! (at most one per change of writer).
//!
//! Snapshots (snapshot.rs): once a verified snapshot standing at record `S`
//! and offset `O` is published, the journal may trim records before it. It
//! becomes the history's *floor*: a full resync sends the snapshot's RDB and
//! then records from `S + 1`; a partial resync must ask for an offset at or
//! past `O`, and never reads a record before `S + 1`. A history can also
//! start from a snapshot (`from_snapshot`) instead of the journaled base.

use std::collections::VecDeque;

use crate::engine::Writer;
use crate::record::Kind;
use crate::record::Record;
use crate::snapshot::SnapshotMeta;

/// Records between two offset checkpoints.
pub const CHECKPOINT_EVERY: u64 = 256;
/// Producer tenures remembered (the oldest are forgotten; a Redis from
/// such an old tenure gets a full sync).
pub const MAX_TENURES: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Base {
    pub replid: String,
    pub offset: u64,
    /// Seq of the first RDB record and of the `RdbEnd` record.
    pub first_seq: u64,
    pub end_seq: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Tenure {
    replid: String,
    start: u64,
    end: u64,
}

/// Where a resync starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Psync {
    /// `+FULLRESYNC <feed id> <base offset>`, then the base RDB from
    /// `base.first_seq`, then every stream record after `base.end_seq`;
    /// or, with `snapshot`, that snapshot's RDB and then records from
    /// `first_seq` (its seq + 1).
    Full { offset: u64, first_seq: u64, snapshot: Option<Box<SnapshotMeta>> },
    /// `+CONTINUE <feed id>`; read from `from_seq` and send bytes after
    /// offset `from_offset`.
    Continue { from_seq: u64, from_offset: u64 },
    /// The journal has no complete base RDB yet: wait, then ask again.
    NotReady,
}

#[derive(Debug, Default, Clone)]
pub struct History {
    base: Option<Base>,
    rdb_first_seq: Option<u64>,
    /// Last record observed and the offset the stream reaches.
    last_seq: u64,
    end: Option<u64>,
    tenures: VecDeque<Tenure>,
    /// (seq, start offset) of every CHECKPOINT_EVERY-th stream record.
    checkpoints: Vec<(u64, u64)>,
    /// Seq of the first stream record.
    first_stream_seq: Option<u64>,
    /// (seq of a `StreamVoid` record, the offset the stream was cut back to).
    voids: Vec<(u64, u64)>,
    /// The latest published snapshot this history reached.
    floor: Option<SnapshotMeta>,
    /// The engine that wrote the last record observed (None: not named,
    /// or nothing observed since the history started from a snapshot).
    last_writer: Option<Writer>,
}

impl History {
    /// A history that starts at a published snapshot: records after
    /// `snap.seq` are observed next.
    pub fn from_snapshot(snap: &SnapshotMeta) -> History {
        History {
            base: Some(Base {
                replid: snap.origin_replid.clone(),
                offset: snap.origin_offset,
                first_seq: snap.seq + 1,
                end_seq: snap.seq,
            }),
            rdb_first_seq: None,
            last_seq: snap.seq,
            end: Some(snap.offset),
            tenures: VecDeque::from([Tenure { replid: snap.replid.clone(), start: snap.offset, end: snap.offset }]),
            checkpoints: Vec::new(),
            first_stream_seq: None,
            voids: Vec::new(),
            floor: Some(snap.clone()),
            last_writer: None,
        }
    }

    /// Takes a newly published snapshot as the floor. Ignored (false) when
    /// this history has not read that far yet or already has a later one;
    /// an error when it contradicts what was read.
    pub fn set_floor(&mut self, snap: &SnapshotMeta) -> Result<bool, String> {
        if snap.seq > self.last_seq || self.floor.as_ref().is_some_and(|f| f.seq >= snap.seq) {
            return Ok(false);
        }
        let (Some(base), Some(end)) = (self.base.as_ref(), self.end) else {
            return Ok(false);
        };
        if snap.origin_replid != base.replid || snap.origin_offset != base.offset {
            return Err(format!(
                "snapshot at record {} belongs to a history based at {}:{}, not this one ({}:{})",
                snap.seq, snap.origin_replid, snap.origin_offset, base.replid, base.offset
            ));
        }
        if snap.offset > end || snap.offset < base.offset || snap.seq < base.end_seq {
            return Err(format!("snapshot at record {} offset {} lies outside the history read ({}..{end})", snap.seq, snap.offset, base.offset));
        }
        self.floor = Some(snap.clone());
        Ok(true)
    }

    pub fn floor(&self) -> Option<&SnapshotMeta> {
        self.floor.as_ref()
    }

    /// The producer whose bytes the stream ends with.
    pub fn last_producer(&self) -> Option<&str> {
        self.tenures.back().map(|t| t.replid.as_str())
    }

    pub fn base(&self) -> Option<&Base> {
        self.base.as_ref()
    }

    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// The offset the journal reaches (None before the base is complete).
    pub fn end(&self) -> Option<u64> {
        self.end
    }

    /// Learns record `seq` (records must come in order; already seen ones
    /// are ignored). A record that breaks the stream's shape is an error:
    /// the feeder must not pass it to Redis.
    pub fn observe(&mut self, seq: u64, rec: &Record) -> Result<(), String> {
        if seq <= self.last_seq {
            return Ok(());
        }
        if seq != self.last_seq + 1 && self.last_seq != 0 {
            return Err(format!("record {seq} follows record {}: a gap", self.last_seq));
        }
        match rec.kind {
            Kind::Rdb => {
                if self.base.is_some() {
                    return Err(format!("record {seq}: a second base RDB after the stream started"));
                }
                self.rdb_first_seq.get_or_insert(seq);
            }
            Kind::RdbAbort => {
                if self.base.is_some() {
                    return Err(format!("record {seq}: a base RDB abort after the base was complete"));
                }
                self.rdb_first_seq = None;
            }
            Kind::RdbEnd => {
                if self.base.is_some() {
                    return Err(format!("record {seq}: a second base RDB end"));
                }
                let first_seq = self.rdb_first_seq.unwrap_or(seq);
                self.base = Some(Base { replid: rec.replid.clone(), offset: rec.start, first_seq, end_seq: seq });
                self.end = Some(rec.start);
            }
            Kind::Stream => {
                let Some(end) = self.end else {
                    return Err(format!("record {seq}: stream bytes before a complete base RDB (was the journal trimmed without a snapshot?)"));
                };
                if rec.start != end {
                    return Err(format!("record {seq} starts at offset {} but the stream reached {end}: a gap or an overlap", rec.start));
                }
                self.first_stream_seq.get_or_insert(seq);
                if (seq - self.first_stream_seq.unwrap()).is_multiple_of(CHECKPOINT_EVERY) {
                    self.checkpoints.push((seq, rec.start));
                }
                match self.tenures.back_mut() {
                    Some(t) if t.replid == rec.replid && t.end == rec.start => t.end = rec.end,
                    _ => {
                        self.tenures.push_back(Tenure { replid: rec.replid.clone(), start: rec.start, end: rec.end });
                        if self.tenures.len() > MAX_TENURES {
                            self.tenures.pop_front();
                        }
                    }
                }
                self.end = Some(rec.end);
            }
            Kind::StreamVoid => {
                let (Some(base), Some(end)) = (self.base.as_ref(), self.end) else {
                    return Err(format!("record {seq}: a stream void before a complete base RDB"));
                };
                if rec.end != end {
                    return Err(format!("record {seq} voids bytes up to offset {} but the stream reached {end}", rec.end));
                }
                // Only the last writer's bytes can be void: every earlier
                // tenure ended where the next one could continue.
                let first = self.tenures.back().map(|t| t.start).unwrap_or(base.offset);
                if rec.start < first {
                    return Err(format!(
                        "record {seq} voids bytes from offset {}, before the last writer's first byte at {first}",
                        rec.start
                    ));
                }
                if rec.start < end {
                    if let Some(t) = self.tenures.back_mut() {
                        t.end = rec.start;
                        if t.start == t.end {
                            self.tenures.pop_back();
                        }
                    }
                    // Checkpoints stay sorted by offset for `psync`.
                    self.checkpoints.retain(|&(_, start)| start <= rec.start);
                    self.voids.push((seq, rec.start));
                    self.end = Some(rec.start);
                }
            }
        }
        self.last_seq = seq;
        self.last_writer = rec.writer;
        Ok(())
    }

    /// The engine that wrote the last record observed: the stream's
    /// current writer, for the election rule (engine.rs `may_stand`).
    pub fn last_writer(&self) -> Option<&Writer> {
        self.last_writer.as_ref()
    }

    /// Where the live bytes of stream record `seq` (offsets `[start, end)`)
    /// end: `end`, unless a void journaled after it cut the stream back.
    pub fn live_end(&self, seq: u64, start: u64, end: u64) -> u64 {
        let cut = self.voids.iter().filter(|&&(v, _)| v > seq).map(|&(_, at)| at).fold(end, u64::min);
        cut.max(start)
    }

    /// This feeder's replication id for a stream with this base: the base's
    /// id mixed with the node's uuid, so it differs per node and per base.
    pub fn feed_id(&self, node_uuid: &str) -> Option<String> {
        let base = self.base.as_ref()?;
        let salt: Vec<u8> = node_uuid.bytes().filter(|c| c.is_ascii_hexdigit()).chain(format!("{:08x}", base.offset as u32).bytes()).collect();
        let hex = |c: u8| (c as char).to_digit(16).unwrap_or(0) as u8;
        let id: String = base
            .replid
            .bytes()
            .enumerate()
            .map(|(i, c)| {
                let v = hex(c) ^ salt.get(i % salt.len().max(1)).copied().map(hex).unwrap_or(0);
                char::from_digit(v as u32, 16).unwrap()
            })
            .collect();
        Some(id)
    }

    /// Decides how a Redis that sent `PSYNC replid offset` resyncs.
    pub fn psync(&self, node_uuid: &str, replid: &str, psync_offset: i64) -> Psync {
        let (Some(base), Some(end)) = (self.base.as_ref(), self.end) else {
            return Psync::NotReady;
        };
        let (full, floor_offset, floor_next) = match &self.floor {
            Some(f) => (Psync::Full { offset: f.offset, first_seq: f.seq + 1, snapshot: Some(Box::new(f.clone())) }, f.offset, f.seq + 1),
            None => (Psync::Full { offset: base.offset, first_seq: base.first_seq, snapshot: None }, base.offset, 0),
        };
        // Redis asks for the byte after the last one it has.
        let Some(have) = u64::try_from(psync_offset).ok().and_then(|p| p.checked_sub(1)) else {
            return full;
        };
        if have < floor_offset || have > end {
            return full;
        }
        let ours = self.feed_id(node_uuid).as_deref() == Some(replid);
        let produced = self.tenures.iter().any(|t| t.replid == replid && t.start <= have && have <= t.end);
        if !(ours || produced) {
            return full;
        }
        if have == end {
            return Psync::Continue { from_seq: self.last_seq + 1, from_offset: have };
        }
        // The latest checkpoint at or before `have`; the stream's first
        // record when there is none.
        let from_seq = match self.checkpoints.partition_point(|&(_, start)| start <= have) {
            0 => base.end_seq + 1,
            i => self.checkpoints[i - 1].0,
        };
        // Records before the floor may be trimmed; the floor's next record
        // starts at its offset, at or before `have`.
        Psync::Continue { from_seq: from_seq.max(floor_next), from_offset: have }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
    const ME: &str = "0f3c2a64-5b0e-4c1e-9b9b-2b1f4f0d9a11";

    fn rec(kind: Kind, replid: &str, start: u64, len: u64) -> Record {
        let end = if kind == Kind::Stream { start + len } else { start };
        Record { kind, replid: replid.into(), start, end, payload: vec![b'x'; len as usize], writer: None }
    }

    /// Base at offset 100 (records 1-2), then A: 100..400 in 3 records,
    /// then B: 400..500 in 1 record.
    fn sample() -> History {
        let mut h = History::default();
        h.observe(1, &rec(Kind::Rdb, A, 100, 10)).unwrap();
        h.observe(2, &rec(Kind::RdbEnd, A, 100, 0)).unwrap();
        h.observe(3, &rec(Kind::Stream, A, 100, 100)).unwrap();
        h.observe(4, &rec(Kind::Stream, A, 200, 100)).unwrap();
        h.observe(5, &rec(Kind::Stream, A, 300, 100)).unwrap();
        h.observe(6, &rec(Kind::Stream, B, 400, 100)).unwrap();
        h
    }

    #[test]
    fn shape_errors_are_refused() {
        let mut h = History::default();
        assert!(h.observe(1, &rec(Kind::Stream, A, 0, 5)).unwrap_err().contains("before a complete base"));
        let mut h = sample();
        assert!(h.observe(7, &rec(Kind::Stream, B, 499, 5)).unwrap_err().contains("gap or an overlap"));
        assert!(h.observe(9, &rec(Kind::Stream, B, 500, 5)).unwrap_err().contains("gap"));
        assert!(h.observe(7, &rec(Kind::Rdb, B, 500, 5)).is_err());
        // Already seen records are ignored.
        h.observe(3, &rec(Kind::Stream, A, 100, 100)).unwrap();
        assert_eq!(h.end(), Some(500));
    }

    #[test]
    fn an_aborted_base_is_skipped() {
        let mut h = History::default();
        h.observe(1, &rec(Kind::Rdb, A, 0, 10)).unwrap();
        h.observe(2, &rec(Kind::Rdb, A, 0, 10)).unwrap();
        assert_eq!(h.psync(ME, "?", -1), Psync::NotReady);
        h.observe(3, &rec(Kind::RdbAbort, A, 0, 0)).unwrap();
        h.observe(4, &rec(Kind::Rdb, B, 50, 10)).unwrap();
        h.observe(5, &rec(Kind::RdbEnd, B, 50, 0)).unwrap();
        assert_eq!(h.psync(ME, "?", -1), Psync::Full { offset: 50, first_seq: 4, snapshot: None });
        assert!(h.observe(6, &rec(Kind::RdbAbort, B, 50, 0)).is_err(), "a complete base cannot be voided");
    }

    #[test]
    fn no_base_means_wait() {
        let mut h = History::default();
        assert_eq!(h.psync(ME, "?", -1), Psync::NotReady);
        h.observe(1, &rec(Kind::Rdb, A, 0, 10)).unwrap();
        assert_eq!(h.psync(ME, "?", -1), Psync::NotReady);
        h.observe(2, &rec(Kind::RdbEnd, A, 0, 0)).unwrap();
        assert_eq!(h.psync(ME, "?", -1), Psync::Full { offset: 0, first_seq: 1, snapshot: None });
    }

    #[test]
    fn partial_resync_only_for_bytes_known_to_be_the_journals() {
        let h = sample();
        let feed = h.feed_id(ME).unwrap();
        assert_ne!(feed, A);
        assert_ne!(Some(feed.clone()), h.feed_id("1f3c2a64-5b0e-4c1e-9b9b-2b1f4f0d9a11"));
        let full = Psync::Full { offset: 100, first_seq: 1, snapshot: None };
        // A fresh Redis.
        assert_eq!(h.psync(ME, "?", -1), full);
        // Fed by us: anywhere in the stream.
        assert_eq!(h.psync(ME, &feed, 151), Psync::Continue { from_seq: 3, from_offset: 150 });
        assert_eq!(h.psync(ME, &feed, 501), Psync::Continue { from_seq: 7, from_offset: 500 });
        assert_eq!(h.psync(ME, &feed, 502), full, "ahead of the journal");
        assert_eq!(h.psync(ME, &feed, 100), full, "before the base");
        // A's primary: its tenure is 100..400.
        assert_eq!(h.psync(ME, A, 401), Psync::Continue { from_seq: 3, from_offset: 400 });
        assert_eq!(h.psync(ME, A, 451), full, "A's bytes past 400 never reached the journal");
        // B's primary, from its tenure only.
        assert_eq!(h.psync(ME, B, 451), Psync::Continue { from_seq: 3, from_offset: 450 });
        assert_eq!(h.psync(ME, B, 301), full);
        // Someone else's id.
        assert_eq!(h.psync(ME, "cccccccccccccccccccccccccccccccccccccccc", 201), full);
    }

    #[test]
    fn a_void_cuts_the_stream_back_for_the_next_writer() {
        let mut h = sample();
        // B died with 400..500 holding an unfinished command from 430 on.
        h.observe(7, &rec(Kind::StreamVoid, A, 430, 0)).unwrap_err();
        let void = Record { kind: Kind::StreamVoid, replid: A.into(), start: 430, end: 500, payload: Vec::new(), writer: None };
        h.observe(7, &void).unwrap();
        assert_eq!(h.end(), Some(430));
        assert_eq!(h.live_end(6, 400, 500), 430, "B's record is cut back");
        assert_eq!(h.live_end(5, 300, 400), 400, "an earlier record is untouched");
        assert_eq!(h.live_end(8, 430, 480), 480, "a later record is untouched");
        // The next writer (A again, under a new id) continues at 430.
        let c = "cccccccccccccccccccccccccccccccccccccccc";
        assert!(h.observe(8, &rec(Kind::Stream, c, 500, 10)).unwrap_err().contains("gap or an overlap"));
        h.observe(8, &rec(Kind::Stream, c, 430, 50)).unwrap();
        assert_eq!(h.end(), Some(480));
        let full = Psync::Full { offset: 100, first_seq: 1, snapshot: None };
        // B's primary has bytes up to 430 in common with the journal, not beyond.
        assert_eq!(h.psync(ME, B, 431), Psync::Continue { from_seq: 3, from_offset: 430 });
        assert_eq!(h.psync(ME, B, 451), full);
        assert_eq!(h.psync(ME, c, 481), Psync::Continue { from_seq: 9, from_offset: 480 });
        let feed = h.feed_id(ME).unwrap();
        assert_eq!(h.psync(ME, &feed, 431), Psync::Continue { from_seq: 3, from_offset: 430 });
    }

    #[test]
    fn a_void_must_end_at_the_stream_end_within_the_last_writer() {
        let void = |start, end| Record { kind: Kind::StreamVoid, replid: A.into(), start, end, payload: Vec::new(), writer: None };
        let mut h = sample();
        assert!(h.observe(7, &void(450, 490)).unwrap_err().contains("stream reached 500"));
        assert!(h.observe(7, &void(399, 500)).unwrap_err().contains("before the last writer's first byte at 400"));
        // A void of nothing changes nothing.
        h.observe(7, &void(500, 500)).unwrap();
        assert_eq!(h.end(), Some(500));
        assert_eq!(h.live_end(6, 400, 500), 500);
        // A void of the last writer's every byte forgets its tenure.
        h.observe(8, &void(400, 500)).unwrap();
        assert_eq!(h.end(), Some(400));
        assert_eq!(h.psync(ME, B, 401), Psync::Full { offset: 100, first_seq: 1, snapshot: None });
        let mut empty = History::default();
        assert!(empty.observe(1, &void(0, 0)).unwrap_err().contains("before a complete base"));
    }

    fn snap(seq: u64, offset: u64, replid: &str) -> SnapshotMeta {
        SnapshotMeta {
            format: 1,
            stream: "s".into(),
            seq,
            offset,
            replid: replid.into(),
            origin_replid: A.into(),
            origin_offset: 100,
            engine: "redis".into(),
            engine_version: "7.0.15".into(),
            rdb_version: 10,
            rdb_bytes: 1,
            rdb_sha256: "0".repeat(64),
            digest: "0".repeat(40),
            stream_sha256: "0".repeat(64),
            created_unix_ms: 0,
            key: format!("s/{seq}.rdb"),
        }
    }

    #[test]
    fn a_floor_moves_full_resyncs_to_the_snapshot_and_bounds_partial_ones() {
        let mut h = sample();
        let feed = h.feed_id(ME).unwrap();
        // Record 4 ends at 300.
        assert!(h.set_floor(&snap(4, 300, A)).unwrap());
        let full = Psync::Full { offset: 300, first_seq: 5, snapshot: Some(Box::new(snap(4, 300, A))) };
        assert_eq!(h.psync(ME, "?", -1), full);
        assert_eq!(h.psync(ME, &feed, 151), full, "bytes before the floor may be trimmed");
        assert_eq!(h.psync(ME, &feed, 351), Psync::Continue { from_seq: 5, from_offset: 350 });
        assert_eq!(h.psync(ME, B, 451), Psync::Continue { from_seq: 5, from_offset: 450 });
        // An older floor, or one past what was read, is ignored.
        assert!(!h.set_floor(&snap(3, 200, A)).unwrap());
        assert!(!h.set_floor(&snap(9, 600, B)).unwrap());
        // One from another history, or outside the bytes read, is an error.
        assert!(h.set_floor(&SnapshotMeta { origin_offset: 7, ..snap(5, 400, A) }).is_err());
        assert!(h.set_floor(&snap(5, 900, A)).is_err());
    }

    #[test]
    fn a_history_from_a_snapshot_continues_its_feeds_and_producers() {
        let whole = sample();
        let feed = whole.feed_id(ME).unwrap();
        let mut h = History::from_snapshot(&snap(5, 400, A));
        assert_eq!(h.feed_id(ME).unwrap(), feed, "the feed id survives snapshots");
        assert_eq!(h.end(), Some(400));
        h.observe(6, &rec(Kind::Stream, B, 400, 100)).unwrap();
        assert!(h.observe(8, &rec(Kind::Stream, B, 500, 1)).is_err(), "a gap");
        assert_eq!(h.psync(ME, &feed, 451), Psync::Continue { from_seq: 6, from_offset: 450 });
        assert_eq!(h.psync(ME, B, 501), Psync::Continue { from_seq: 7, from_offset: 500 });
        assert_eq!(h.psync(ME, A, 401), Psync::Continue { from_seq: 6, from_offset: 400 });
        assert!(matches!(h.psync(ME, A, 301), Psync::Full { offset: 400, first_seq: 6, snapshot: Some(_) }));
        assert_eq!(h.last_producer(), Some(B));
    }

    #[test]
    fn the_last_record_names_the_stream_s_writer() {
        let r70 = Writer::new("redis", [7, 0, 15], 10);
        let v9 = Writer::new("valkey", [9, 1, 0], 80);
        let mut h = sample();
        assert_eq!(h.last_writer(), None, "records that name no writer");
        h.observe(7, &Record { writer: r70, ..rec(Kind::Stream, B, 500, 10) }).unwrap();
        assert_eq!(h.last_writer(), r70.as_ref());
        h.observe(8, &Record { writer: v9, ..rec(Kind::Stream, B, 510, 10) }).unwrap();
        assert_eq!(h.last_writer(), v9.as_ref());
        assert!(h.observe(10, &Record { writer: r70, ..rec(Kind::Stream, B, 520, 10) }).is_err());
        assert_eq!(h.last_writer(), v9.as_ref(), "a refused record is not the writer");
        h.observe(8, &Record { writer: r70, ..rec(Kind::Stream, B, 510, 10) }).unwrap();
        assert_eq!(h.last_writer(), v9.as_ref(), "a record seen already changes nothing");
        assert_eq!(History::from_snapshot(&snap(8, 520, B)).last_writer(), None, "a snapshot's engine is not the stream's writer");
    }

    #[test]
    fn checkpoints_bound_the_rescan() {
        let mut h = History::default();
        h.observe(1, &rec(Kind::RdbEnd, A, 0, 0)).unwrap();
        for i in 0..1000u64 {
            h.observe(i + 2, &rec(Kind::Stream, A, i * 10, 10)).unwrap();
        }
        let feed = h.feed_id(ME).unwrap();
        match h.psync(ME, &feed, 9_001) {
            Psync::Continue { from_seq, from_offset } => {
                assert_eq!(from_offset, 9_000);
                // Record 902 covers 9000..9010; the checkpoint is at most
                // CHECKPOINT_EVERY records before it.
                assert!(from_seq <= 902 && 902 - from_seq < CHECKPOINT_EVERY, "{from_seq}");
            }
            other => panic!("{other:?}"),
        }
        assert!(h.checkpoints.len() as u64 <= 1000 / CHECKPOINT_EVERY + 1);
    }

    proptest::proptest! {
        /// `PSYNC <replid> <offset>` of any values (what a connection to
        /// the feed port may send): a full resync from the base, or a
        /// continuation exactly where that Redis stands, only for an id
        /// the journal knows and an offset within what it holds.
        #[test]
        fn psync_of_any_id_and_offset(
            replid in proptest::prop_oneof![
                proptest::strategy::Just(A.to_string()),
                proptest::strategy::Just(B.to_string()),
                proptest::strategy::Just("?".to_string()),
                "\\PC{0,50}",
            ],
            offset in proptest::prop_oneof![proptest::prelude::any::<i64>(), 0i64..700, proptest::strategy::Just(i64::MIN)],
        ) {
            let h = sample();
            match h.psync(ME, &replid, offset) {
                Psync::Full { offset: 100, first_seq: 1, snapshot: None } => {}
                Psync::Continue { from_seq, from_offset } => {
                    proptest::prop_assert!(replid == A || replid == B, "{replid:?}");
                    proptest::prop_assert_eq!(from_offset as i64, offset - 1);
                    proptest::prop_assert!((100..=500).contains(&from_offset), "{from_offset}");
                    proptest::prop_assert!((3..=7).contains(&from_seq), "{from_seq}");
                }
                other => proptest::prop_assert!(false, "{other:?} for {replid:?} {offset}"),
            }
        }
    }
}
