//! The record store: every stream's record payloads on disk, so a node's
//! memory does not grow with what the streams hold.
//!
//! Layout: one directory per stream (named by the stream's id, assigned in
//! `streams.rs`), holding segment files `<first seq, 20 digits>.seg`. A
//! segment starts with a header (magic, then the stream's cumulative payload
//! bytes before its first record) followed by frames:
//!
//! ```text
//! payload len: u32 LE | crc32(seq LE ++ payload): u32 LE | seq: u64 LE | payload
//! ```
//!
//! A new segment is started once the current one reaches `SEGMENT_BYTES`.
//! In memory each segment keeps a sparse index (one point every
//! `INDEX_EVERY_BYTES` of file), so a stream costs about
//! `retained bytes / INDEX_EVERY_BYTES * 24` bytes of memory plus one open
//! file per segment.
//!
//! Life cycle and durability: `apply` appends frames without fsync; the Raft
//! log is the truth for those. Every `WRITEBACK_BYTES` written to a segment,
//! the kernel is asked to start writing them out (without waiting), so
//! written-but-unsynced data never piles up: a pile of gigabytes made each
//! fsync of the Raft log (ext4 orders it after other files' data) and the
//! next snapshot's `sync` take seconds, long enough for a Keel primary's
//! lease renewals to miss their deadline. When a Raft snapshot is built, `sync` fsyncs
//! every written segment and directory and reports each stream's `End`
//! (last segment and its valid length), which the snapshot records. On open,
//! `open` cuts everything past that end (a torn or extra tail that openraft
//! re-applies from its log) and verifies every frame below it: a damaged
//! frame there is an error naming the file and offset, never skipped. A trim
//! only moves a stream's first seq; whole segments are deleted (`release`)
//! once a persisted snapshot no longer needs them.
//!
//! Snapshots travel as one byte stream (`SnapshotData`): a header naming the
//! streams' state, then each stream's frames, exactly as stored. A snapshot
//! built here is a list of byte ranges of open segment files (never copied in
//! memory); one received from a leader is a staging file. `import` rebuilds a
//! store from such a stream, verifying every frame.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::io::Read;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;
use serde::Serialize;

use crate::streams::MAX_RECORD_BYTES;
use crate::types::Payload;

/// A segment is closed once it holds this many bytes.
pub const SEGMENT_BYTES: u64 = 64 << 20;
/// One sparse-index point per this many bytes of segment.
pub const INDEX_EVERY_BYTES: u64 = 1 << 20;
/// Bytes written to a segment after which the kernel is told to start
/// writing them to disk (`start_writeback`).
pub const WRITEBACK_BYTES: u64 = 4 << 20;
/// Bytes before a frame's payload.
pub const FRAME_HEADER_BYTES: u64 = 16;
/// Bytes before a segment's first frame.
pub const SEGMENT_HEADER_BYTES: u64 = 16;
const SEGMENT_MAGIC: &[u8; 8] = b"KEELSEG1";
const SNAPSHOT_MAGIC: &[u8; 8] = b"KEELSNP1";
/// Largest encoded snapshot header (the streams' state without records).
pub const MAX_SNAPSHOT_HEADER_BYTES: u32 = 256 << 20;
/// Bytes a snapshot reader or importer buffers at once.
pub const COPY_BUFFER_BYTES: usize = 1 << 20;

fn bad(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

fn crc(seq: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&seq.to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// One frame's header, decoded.
#[derive(Debug, Clone, Copy)]
struct FrameHeader {
    len: u64,
    crc: u32,
    seq: u64,
}

fn encode_header(seq: u64, payload: &[u8]) -> [u8; FRAME_HEADER_BYTES as usize] {
    let mut h = [0u8; FRAME_HEADER_BYTES as usize];
    h[0..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    h[4..8].copy_from_slice(&crc(seq, payload).to_le_bytes());
    h[8..16].copy_from_slice(&seq.to_le_bytes());
    h
}

fn decode_header(h: &[u8; FRAME_HEADER_BYTES as usize]) -> FrameHeader {
    FrameHeader {
        len: u64::from(u32::from_le_bytes(h[0..4].try_into().unwrap())),
        crc: u32::from_le_bytes(h[4..8].try_into().unwrap()),
        seq: u64::from_le_bytes(h[8..16].try_into().unwrap()),
    }
}

/// Where a stream's durable records end: its last segment and the length of
/// that segment covered by a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct End {
    pub segment: u64,
    pub len: u64,
}

/// What `open` checks each stream's files against (from the snapshot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expect {
    pub first_seq: u64,
    pub last_seq: u64,
    /// Cumulative payload bytes of seqs `1..=last_seq`.
    pub appended_bytes: u64,
    /// Payload bytes of seqs `first_seq..=last_seq`.
    pub retained_bytes: u64,
    pub end: Option<End>,
}

#[derive(Debug, Clone, Copy)]
struct IndexPoint {
    seq: u64,
    offset: u64,
    /// Cumulative payload bytes of the stream before `seq`.
    cum_before: u64,
}

struct Segment {
    path: PathBuf,
    file: Arc<File>,
    first_seq: u64,
    /// One past the last seq in the file.
    next_seq: u64,
    len: u64,
    /// Cumulative payload bytes of the stream after the last frame.
    cum_end: u64,
    index: Vec<IndexPoint>,
    /// Written since the last `sync`.
    dirty: bool,
    /// Bytes below this offset were handed to `start_writeback`.
    written_back: u64,
}

impl Segment {
    fn create(dir: &Path, first_seq: u64, cum_before: u64) -> io::Result<Segment> {
        let path = dir.join(format!("{first_seq:020}.seg"));
        let file = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&path)?;
        let mut header = [0u8; SEGMENT_HEADER_BYTES as usize];
        header[0..8].copy_from_slice(SEGMENT_MAGIC);
        header[8..16].copy_from_slice(&cum_before.to_le_bytes());
        file.write_all_at(&header, 0)?;
        Ok(Segment::empty(path, file, first_seq, cum_before, true))
    }

    /// A segment holding no frame yet (past its header).
    fn empty(path: PathBuf, file: std::fs::File, first_seq: u64, cum_before: u64, dirty: bool) -> Segment {
        Segment {
            path,
            file: Arc::new(file),
            first_seq,
            next_seq: first_seq,
            len: SEGMENT_HEADER_BYTES,
            cum_end: cum_before,
            index: vec![IndexPoint { seq: first_seq, offset: SEGMENT_HEADER_BYTES, cum_before }],
            dirty,
            written_back: 0,
        }
    }

    /// Opens an existing segment, cuts it to `limit` bytes if given, and
    /// verifies every frame (crc, seqs following on from `first_seq`).
    fn open(path: PathBuf, first_seq: u64, limit: Option<u64>) -> io::Result<Segment> {
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&path)?;
        let at = |off: u64, what: &str| bad(format!("record segment {} is damaged at offset {off}: {what}", path.display()));
        let mut len = file.metadata()?.len();
        if let Some(limit) = limit {
            if len < limit {
                return Err(at(len, &format!("it is {len} bytes but a snapshot covers {limit}")));
            }
            if len > limit {
                tracing::info!(segment = %path.display(), from = len, to = limit, "cutting a record segment back to its snapshot's end");
                file.set_len(limit)?;
                file.sync_data()?;
                len = limit;
            }
        }
        let mut header = [0u8; SEGMENT_HEADER_BYTES as usize];
        if len < SEGMENT_HEADER_BYTES {
            return Err(at(0, "shorter than its header"));
        }
        file.read_exact_at(&mut header, 0)?;
        if &header[0..8] != SEGMENT_MAGIC {
            return Err(at(0, "bad magic"));
        }
        let cum_before = u64::from_le_bytes(header[8..16].try_into().unwrap());
        let mut seg = Segment::empty(path.clone(), file, first_seq, cum_before, false);
        let mut reader = std::io::BufReader::with_capacity(COPY_BUFFER_BYTES, FileReader::new(seg.file.clone(), SEGMENT_HEADER_BYTES, len));
        let mut payload = Vec::new();
        while seg.len < len {
            let off = seg.len;
            let mut h = [0u8; FRAME_HEADER_BYTES as usize];
            if len - off < FRAME_HEADER_BYTES {
                return Err(at(off, "a frame header is cut short"));
            }
            reader.read_exact(&mut h)?;
            let h = decode_header(&h);
            if h.len == 0 || h.len > MAX_RECORD_BYTES as u64 || off + FRAME_HEADER_BYTES + h.len > len {
                return Err(at(off, &format!("a frame claims {} payload bytes", h.len)));
            }
            if h.seq != seg.next_seq {
                return Err(at(off, &format!("frame holds seq {}, expected {}", h.seq, seg.next_seq)));
            }
            payload.resize(h.len as usize, 0);
            reader.read_exact(&mut payload)?;
            if crc(h.seq, &payload) != h.crc {
                return Err(at(off, &format!("checksum mismatch in seq {}", h.seq)));
            }
            seg.note_frame(h.seq, off, h.len);
        }
        Ok(seg)
    }

    fn note_frame(&mut self, seq: u64, offset: u64, payload_len: u64) {
        assert_eq!(seq, self.next_seq, "frames of a segment are noted in seq order");
        let last = self.index.last().expect("a segment's index starts with its first frame");
        if offset - last.offset >= INDEX_EVERY_BYTES {
            self.index.push(IndexPoint { seq, offset, cum_before: self.cum_end });
        }
        self.next_seq = seq + 1;
        self.len = offset + FRAME_HEADER_BYTES + payload_len;
        self.cum_end += payload_len;
    }

    /// The offset of frame `seq` and the cumulative bytes before it.
    fn locate(&self, seq: u64) -> io::Result<(u64, u64)> {
        assert!(seq >= self.first_seq && seq < self.next_seq, "seq {seq} not in segment {}", self.path.display());
        let i = self.index.partition_point(|p| p.seq <= seq) - 1;
        let IndexPoint { seq: mut at, mut offset, mut cum_before } = self.index[i];
        let mut h = [0u8; FRAME_HEADER_BYTES as usize];
        while at < seq {
            self.file.read_exact_at(&mut h, offset)?;
            let fh = decode_header(&h);
            if fh.seq != at {
                return Err(bad(format!("record segment {} is damaged at offset {offset}: expected seq {at}", self.path.display())));
            }
            offset += FRAME_HEADER_BYTES + fh.len;
            cum_before += fh.len;
            at += 1;
        }
        Ok((offset, cum_before))
    }
}

/// Reads a byte range of a shared file (positioned reads: the file may be
/// appended to meanwhile).
pub struct FileReader {
    file: Arc<File>,
    pos: u64,
    end: u64,
}

impl FileReader {
    pub fn new(file: Arc<File>, start: u64, end: u64) -> FileReader {
        FileReader { file, pos: start, end }
    }
}

impl Read for FileReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = buf.len().min((self.end - self.pos) as usize);
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "a record file is shorter than expected"));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

#[derive(Default)]
struct StreamFiles {
    segments: BTreeMap<u64, Segment>,
    /// Segments or files created since the last `sync`: the directory
    /// needs an fsync.
    dir_dirty: bool,
}

/// All streams' record files under one directory.
pub struct RecordStore {
    root: PathBuf,
    streams: BTreeMap<u64, StreamFiles>,
}

fn stream_dir(root: &Path, id: u64) -> PathBuf {
    root.join(format!("{id:016x}"))
}

/// Asks the kernel to start writing `len` bytes of `file` at `offset` to
/// disk, without waiting for it (durability still comes from `sync`). A
/// hint: where it is not available or fails, the data is written later as
/// before.
fn start_writeback(file: &File, offset: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: the descriptor is open for the call's duration (borrowed
        // `file`); sync_file_range reads no memory of ours.
        let r = unsafe { libc::sync_file_range(file.as_raw_fd(), offset as libc::off64_t, len as libc::off64_t, libc::SYNC_FILE_RANGE_WRITE) };
        if r != 0 {
            tracing::debug!(error = %io::Error::last_os_error(), "sync_file_range");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len);
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl RecordStore {
    /// An empty store in `root` (which must not exist or be empty).
    pub fn create(root: &Path) -> io::Result<RecordStore> {
        std::fs::create_dir_all(root)?;
        if std::fs::read_dir(root)?.next().is_some() {
            return Err(io::Error::other(format!("{} is not empty", root.display())));
        }
        Ok(RecordStore { root: root.to_path_buf(), streams: BTreeMap::new() })
    }

    /// Opens the store in `root` as a snapshot left it: streams in `expect`
    /// are cut back to their `End` and verified; anything else is removed.
    pub fn open(root: &Path, expect: &BTreeMap<u64, Expect>) -> io::Result<RecordStore> {
        std::fs::create_dir_all(root)?;
        let mut store = RecordStore { root: root.to_path_buf(), streams: BTreeMap::new() };
        for entry in std::fs::read_dir(root)? {
            let path = entry?.path();
            let id = path.file_name().and_then(|n| n.to_str()).and_then(|n| u64::from_str_radix(n, 16).ok());
            if id.is_none_or(|id| !expect.contains_key(&id)) {
                tracing::info!(dir = %path.display(), "removing record files no snapshot covers");
                std::fs::remove_dir_all(&path)?;
            }
        }
        for (&id, e) in expect {
            store.streams.insert(id, open_stream(&stream_dir(root, id), id, e)?);
        }
        Ok(store)
    }

    fn files(&mut self, id: u64) -> io::Result<&mut StreamFiles> {
        if !self.streams.contains_key(&id) {
            std::fs::create_dir_all(stream_dir(&self.root, id))?;
            self.streams.insert(id, StreamFiles { segments: BTreeMap::new(), dir_dirty: true });
        }
        Ok(self.streams.get_mut(&id).unwrap())
    }

    /// Appends `records` as seqs `first_seq..`; `cum_before` is the stream's
    /// cumulative payload bytes before them (as the state machine knows it).
    pub fn append(&mut self, id: u64, first_seq: u64, cum_before: u64, records: &[Payload]) -> io::Result<()> {
        let dir = stream_dir(&self.root, id);
        let files = self.files(id)?;
        if let Some(last) = files.segments.values().next_back() {
            if last.next_seq != first_seq || last.cum_end != cum_before {
                return Err(io::Error::other(format!(
                    "record store of stream {id} is out of step: it ends before seq {} ({} bytes), the append starts at {first_seq} ({cum_before} bytes)",
                    last.next_seq, last.cum_end
                )));
            }
        }
        let mut buf = Vec::with_capacity(records.iter().map(|r| r.len() + FRAME_HEADER_BYTES as usize).sum::<usize>().min(COPY_BUFFER_BYTES * 8));
        let mut seq = first_seq;
        let mut rest = records;
        while !rest.is_empty() {
            let roll = files.segments.values().next_back().is_none_or(|s| s.len >= SEGMENT_BYTES);
            if roll {
                let cum = files.segments.values().next_back().map(|s| s.cum_end).unwrap_or(cum_before);
                let seg = Segment::create(&dir, seq, cum)?;
                files.segments.insert(seq, seg);
                files.dir_dirty = true;
            }
            let seg = files.segments.values_mut().next_back().unwrap();
            buf.clear();
            let start = seg.len;
            let mut offset = start;
            let mut n = 0;
            for r in rest {
                if offset >= SEGMENT_BYTES {
                    break;
                }
                buf.extend_from_slice(&encode_header(seq, r));
                buf.extend_from_slice(r);
                seg.note_frame(seq, offset, r.len() as u64);
                offset = seg.len;
                seq += 1;
                n += 1;
            }
            seg.file.write_all_at(&buf, start)?;
            seg.dirty = true;
            if seg.len - seg.written_back >= WRITEBACK_BYTES {
                start_writeback(&seg.file, seg.written_back, seg.len - seg.written_back);
                seg.written_back = seg.len;
            }
            rest = &rest[n..];
        }
        Ok(())
    }

    fn segment_of(&self, id: u64, seq: u64) -> io::Result<&Segment> {
        let files = self.streams.get(&id).ok_or_else(|| io::Error::other(format!("stream {id} has no record files")))?;
        files
            .segments
            .range(..=seq)
            .next_back()
            .map(|(_, s)| s)
            .filter(|s| seq < s.next_seq)
            .ok_or_else(|| io::Error::other(format!("stream {id} has no record file holding seq {seq}")))
    }

    /// Cumulative payload bytes of seqs `1..=seq`.
    pub fn bytes_through(&self, id: u64, seq: u64) -> io::Result<u64> {
        let seg = self.segment_of(id, seq)?;
        let (offset, cum_before) = seg.locate(seq)?;
        let mut h = [0u8; FRAME_HEADER_BYTES as usize];
        seg.file.read_exact_at(&mut h, offset)?;
        Ok(cum_before + decode_header(&h).len)
    }

    /// Records `from..=upto`, at most `max_records` and `max_bytes` of
    /// payload (at least one when any).
    pub fn read(&self, id: u64, from: u64, upto: u64, max_records: usize, max_bytes: usize) -> io::Result<Vec<(u64, Payload)>> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let mut seq = from;
        while seq <= upto && out.len() < max_records {
            let seg = self.segment_of(id, seq)?;
            let (mut offset, _) = seg.locate(seq)?;
            while seq <= upto && seq < seg.next_seq && out.len() < max_records {
                let mut h = [0u8; FRAME_HEADER_BYTES as usize];
                seg.file.read_exact_at(&mut h, offset)?;
                let fh = decode_header(&h);
                if !out.is_empty() && bytes + fh.len as usize > max_bytes {
                    return Ok(out);
                }
                let mut payload = vec![0u8; fh.len as usize];
                seg.file.read_exact_at(&mut payload, offset + FRAME_HEADER_BYTES)?;
                if fh.seq != seq || crc(seq, &payload) != fh.crc {
                    return Err(bad(format!("record segment {} is damaged at offset {offset} (seq {seq})", seg.path.display())));
                }
                bytes += payload.len();
                out.push((seq, Payload::from(payload)));
                offset += FRAME_HEADER_BYTES + fh.len;
                seq += 1;
            }
        }
        Ok(out)
    }

    /// Fsyncs every segment written since the last call and every new
    /// directory entry; returns each stream's `End` (absent for a stream
    /// without files).
    pub fn sync(&mut self) -> io::Result<BTreeMap<u64, End>> {
        let mut ends = BTreeMap::new();
        let mut root_dirty = false;
        for (&id, files) in &mut self.streams {
            for seg in files.segments.values_mut().filter(|s| s.dirty) {
                seg.file.sync_data()?;
                seg.dirty = false;
            }
            if files.dir_dirty {
                fsync_dir(&stream_dir(&self.root, id))?;
                files.dir_dirty = false;
                root_dirty = true;
            }
            if let Some(last) = files.segments.values().next_back() {
                ends.insert(id, End { segment: last.first_seq, len: last.len });
            }
        }
        if root_dirty {
            fsync_dir(&self.root)?;
        }
        Ok(ends)
    }

    /// What must be fsync'd to make the store durable as of now: the files
    /// (cloned handles, so the fsync can run without the caller's lock), the
    /// directories, and each stream's `End`. Marks everything clean.
    pub fn to_sync(&mut self) -> (Vec<Arc<File>>, Vec<PathBuf>, BTreeMap<u64, End>) {
        let (mut files_out, mut dirs, mut ends) = (Vec::new(), Vec::new(), BTreeMap::new());
        for (&id, files) in &mut self.streams {
            for seg in files.segments.values_mut().filter(|s| s.dirty) {
                files_out.push(seg.file.clone());
                seg.dirty = false;
            }
            if files.dir_dirty {
                dirs.push(stream_dir(&self.root, id));
                files.dir_dirty = false;
            }
            if let Some(last) = files.segments.values().next_back() {
                ends.insert(id, End { segment: last.first_seq, len: last.len });
            }
        }
        if !dirs.is_empty() {
            dirs.push(self.root.clone());
        }
        (files_out, dirs, ends)
    }

    /// Deletes the segments of stream `id` that hold only seqs below
    /// `first_seq` (a persisted snapshot no longer needs them).
    pub fn release(&mut self, id: u64, first_seq: u64) -> io::Result<()> {
        let Some(files) = self.streams.get_mut(&id) else { return Ok(()) };
        let gone: Vec<u64> = files.segments.values().filter(|s| s.next_seq <= first_seq).map(|s| s.first_seq).collect();
        for first in gone {
            let seg = files.segments.remove(&first).unwrap();
            std::fs::remove_file(&seg.path)?;
            tracing::debug!(segment = %seg.path.display(), "deleted a trimmed record segment");
            files.dir_dirty = true;
        }
        Ok(())
    }

    /// The bytes of frames `first..=last` of stream `id`, as ranges of open
    /// files (valid even if the files are deleted later).
    pub fn slices(&self, id: u64, first: u64, last: u64) -> io::Result<Vec<Part>> {
        let mut parts = Vec::new();
        let mut seq = first;
        while seq <= last {
            let seg = self.segment_of(id, seq)?;
            let (start, _) = seg.locate(seq)?;
            let end = if last + 1 >= seg.next_seq { seg.len } else { seg.locate(last + 1)?.0 };
            parts.push(Part::File { file: seg.file.clone(), start, end });
            seq = seg.next_seq.min(last + 1);
        }
        Ok(parts)
    }

    /// Segments and index points held in memory (for bounds checks).
    pub fn index_points(&self) -> usize {
        self.streams.values().flat_map(|f| f.segments.values()).map(|s| s.index.len()).sum()
    }
}

fn open_stream(dir: &Path, id: u64, e: &Expect) -> io::Result<StreamFiles> {
    std::fs::create_dir_all(dir)?;
    let mut names = BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let first = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".seg"))
            .and_then(|n| n.parse::<u64>().ok());
        match first {
            Some(first) => {
                names.insert(first, path);
            }
            None => return Err(io::Error::other(format!("unexpected file {} among record segments", path.display()))),
        }
    }
    let mut files = StreamFiles::default();
    let holds_records = e.first_seq <= e.last_seq;
    let end = match e.end {
        Some(end) => end,
        None if holds_records => {
            return Err(io::Error::other(format!("stream {id}: the snapshot names records but no record file end")));
        }
        None => End { segment: 0, len: 0 },
    };
    let last_next = names.range(..=end.segment).next_back().map(|(&f, _)| f);
    for (first, path) in names {
        if e.end.is_none() || first > end.segment {
            std::fs::remove_file(&path)?;
            files.dir_dirty = true;
            continue;
        }
        let limit = (first == end.segment).then_some(end.len);
        let seg = Segment::open(path, first, limit)?;
        if seg.next_seq <= e.first_seq && Some(first) != last_next {
            // Trimmed before the snapshot; the delete did not happen.
            std::fs::remove_file(&seg.path)?;
            files.dir_dirty = true;
            continue;
        }
        if let Some(prev) = files.segments.values().next_back() {
            if prev.next_seq != seg.first_seq || prev.cum_end != seg.index[0].cum_before {
                return Err(bad(format!("record segment {} does not follow on from {}", seg.path.display(), prev.path.display())));
            }
        }
        files.segments.insert(first, seg);
    }
    if holds_records {
        let (first, last) = (files.segments.values().next(), files.segments.values().next_back());
        match (first, last) {
            (Some(f), Some(l)) if f.first_seq <= e.first_seq && l.next_seq == e.last_seq + 1 && l.cum_end == e.appended_bytes => {}
            _ => {
                return Err(bad(format!(
                    "the record files in {} do not hold seqs {}..={} ({} bytes in all) as the snapshot says",
                    dir.display(),
                    e.first_seq,
                    e.last_seq,
                    e.appended_bytes
                )))
            }
        }
    } else if let Some(seg) = files.segments.values().next_back() {
        // Every record trimmed; the files left are only the last segment.
        if seg.next_seq != e.last_seq + 1 {
            return Err(bad(format!("record segment {} ends before seq {}, expected {}", seg.path.display(), seg.next_seq, e.last_seq + 1)));
        }
    }
    Ok(files)
}

/// A piece of a snapshot's byte stream.
#[derive(Clone)]
pub enum Part {
    Bytes(Arc<Vec<u8>>),
    File { file: Arc<File>, start: u64, end: u64 },
}

impl std::fmt::Debug for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Part::Bytes(b) => write!(f, "Bytes({})", b.len()),
            Part::File { start, end, .. } => write!(f, "File({start}..{end})"),
        }
    }
}

/// A snapshot's bytes, as a sequence of parts read in order; never held
/// whole in memory. `staged` is the file it was received into, if any
/// (removed once installed).
#[derive(Debug, Clone)]
pub struct SnapshotData {
    pub parts: Vec<Part>,
    pub staged: Option<PathBuf>,
}

impl SnapshotData {
    pub fn len(&self) -> u64 {
        self.parts.iter().map(|p| match p {
            Part::Bytes(b) => b.len() as u64,
            Part::File { start, end, .. } => end - start,
        }).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn reader(&self) -> SnapshotReader {
        SnapshotReader { parts: self.parts.clone().into(), current: None }
    }

    /// A snapshot's stream: `header` (encoded), then the given frames.
    pub fn build(header: &[u8], frames: Vec<Part>) -> SnapshotData {
        let mut first = Vec::with_capacity(12 + header.len());
        first.extend_from_slice(SNAPSHOT_MAGIC);
        first.extend_from_slice(&(header.len() as u32).to_le_bytes());
        first.extend_from_slice(header);
        let mut parts = vec![Part::Bytes(Arc::new(first))];
        parts.extend(frames);
        SnapshotData { parts, staged: None }
    }

    /// A snapshot received into `path`.
    pub fn from_file(path: PathBuf) -> io::Result<SnapshotData> {
        let file = File::open(&path)?;
        let end = file.metadata()?.len();
        Ok(SnapshotData { parts: vec![Part::File { file: Arc::new(file), start: 0, end }], staged: Some(path) })
    }
}

/// Reads a `SnapshotData`'s bytes in order.
pub struct SnapshotReader {
    parts: std::collections::VecDeque<Part>,
    current: Option<Box<dyn Read + Send>>,
}

impl Read for SnapshotReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if let Some(r) = &mut self.current {
                let n = r.read(buf)?;
                if n > 0 || buf.is_empty() {
                    return Ok(n);
                }
                self.current = None;
            }
            match self.parts.pop_front() {
                None => return Ok(0),
                Some(Part::Bytes(b)) => self.current = Some(Box::new(io::Cursor::new(ArcBytes(b)))),
                Some(Part::File { file, start, end }) => self.current = Some(Box::new(FileReader::new(file, start, end))),
            }
        }
    }
}

struct ArcBytes(Arc<Vec<u8>>);

impl AsRef<[u8]> for ArcBytes {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// Reads a snapshot stream's header.
pub fn read_header<R: Read>(r: &mut R) -> io::Result<Vec<u8>> {
    let mut magic = [0u8; 12];
    r.read_exact(&mut magic).map_err(|e| bad(format!("snapshot stream too short: {e}")))?;
    if &magic[0..8] != SNAPSHOT_MAGIC {
        return Err(bad("not a journal snapshot stream (bad magic)"));
    }
    let len = u32::from_le_bytes(magic[8..12].try_into().unwrap());
    if len > MAX_SNAPSHOT_HEADER_BYTES {
        return Err(bad(format!("snapshot header of {len} bytes exceeds {MAX_SNAPSHOT_HEADER_BYTES}")));
    }
    let mut header = vec![0u8; len as usize];
    r.read_exact(&mut header)?;
    Ok(header)
}

/// Builds a new store in `root` from frames read from `r`: for each
/// `(id, expect)` in order, exactly seqs `first_seq..=last_seq`, each
/// verified; then `r` must be at its end. The store is fsync'd.
pub fn import<R: Read>(root: &Path, r: &mut R, streams: &[(u64, Expect)]) -> io::Result<RecordStore> {
    let mut store = RecordStore::create(root)?;
    let mut batch: Vec<Payload> = Vec::new();
    for &(id, e) in streams {
        if e.first_seq > e.last_seq {
            continue;
        }
        let base = e.appended_bytes.checked_sub(e.retained_bytes).ok_or_else(|| bad(format!("stream {id} retains more than it appended")))?;
        let mut cum = base;
        let mut batch_bytes = 0u64;
        let mut seq = e.first_seq;
        while seq <= e.last_seq {
            let mut h = [0u8; FRAME_HEADER_BYTES as usize];
            r.read_exact(&mut h).map_err(|err| bad(format!("snapshot stream ends inside stream {id} before seq {seq}: {err}")))?;
            let fh = decode_header(&h);
            if fh.seq != seq || fh.len == 0 || fh.len > MAX_RECORD_BYTES as u64 {
                return Err(bad(format!("snapshot stream: stream {id} frame for seq {seq} is damaged (seq {}, {} bytes)", fh.seq, fh.len)));
            }
            let mut payload = vec![0u8; fh.len as usize];
            r.read_exact(&mut payload)?;
            if crc(seq, &payload) != fh.crc {
                return Err(bad(format!("snapshot stream: stream {id} seq {seq} fails its checksum")));
            }
            batch_bytes += fh.len;
            batch.push(Payload::from(payload));
            seq += 1;
            if batch_bytes >= COPY_BUFFER_BYTES as u64 || seq > e.last_seq {
                store.append(id, seq - batch.len() as u64, cum, &batch)?;
                cum += batch_bytes;
                batch.clear();
                batch_bytes = 0;
            }
        }
        if cum != e.appended_bytes {
            return Err(bad(format!("snapshot stream: stream {id} holds {} bytes, its state says {}", cum - base, e.retained_bytes)));
        }
    }
    let mut rest = [0u8; 1];
    if r.read(&mut rest)? != 0 {
        return Err(bad("snapshot stream has bytes after its last record"));
    }
    store.sync()?;
    Ok(store)
}

/// Writes `data` at the end of the staging file `path` (created when
/// `offset` is 0); the file must be exactly `offset` bytes long before.
pub fn stage_chunk(path: &Path, offset: u64, data: &[u8]) -> io::Result<()> {
    let mut f = if offset == 0 {
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(path)?
    } else {
        std::fs::OpenOptions::new().append(true).open(path)?
    };
    let len = f.metadata()?.len();
    if len != offset {
        return Err(io::Error::other(format!(
            "snapshot chunk at offset {offset} does not follow the {len} bytes received; the sender must start over"
        )));
    }
    f.write_all(data)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn rec(n: usize, fill: u8) -> Payload {
        Payload::from(vec![fill; n])
    }

    /// A reference model: every stream's records in memory.
    #[derive(Default, Clone, Debug)]
    struct Model {
        recs: Vec<Payload>,
        first_seq: u64,
    }

    impl Model {
        fn expect(&self, end: Option<End>) -> Expect {
            Expect {
                first_seq: self.first_seq,
                last_seq: self.recs.len() as u64,
                appended_bytes: self.recs.iter().map(|r| r.len() as u64).sum(),
                retained_bytes: self.recs[(self.first_seq as usize - 1).min(self.recs.len())..].iter().map(|r| r.len() as u64).sum(),
                end,
            }
        }
    }

    fn check(store: &RecordStore, m: &Model) {
        let last = m.recs.len() as u64;
        if m.first_seq <= last {
            let got = store.read(7, m.first_seq, last, usize::MAX, usize::MAX).unwrap();
            let want: Vec<(u64, Payload)> = (m.first_seq..=last).map(|s| (s, m.recs[s as usize - 1].clone())).collect();
            assert_eq!(got, want);
            for s in m.first_seq..=last {
                let through: u64 = m.recs[..s as usize].iter().map(|r| r.len() as u64).sum();
                assert_eq!(store.bytes_through(7, s).unwrap(), through, "seq {s}");
            }
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Append(Vec<usize>),
        Trim(u64),
        /// Snapshot: sync, release trimmed segments, reopen from the ends.
        Reopen,
        /// Appends after the last snapshot, then a crash: reopen cuts them.
        Crash(Vec<usize>),
    }

    fn op() -> impl Strategy<Value = Op> {
        let sizes = proptest::collection::vec(prop_oneof![1usize..64, 200_000usize..400_000], 1..6);
        prop_oneof![
            4 => sizes.clone().prop_map(Op::Append),
            1 => (0u64..40).prop_map(Op::Trim),
            1 => Just(Op::Reopen),
            1 => sizes.prop_map(Op::Crash),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
        /// Random appends, trims, snapshots and crashes: the store always
        /// reads back what the model holds, and reopening from a snapshot's
        /// ends gives back exactly the snapshot's records.
        #[test]
        fn store_round_trips_appends_trims_and_reopens(ops in proptest::collection::vec(op(), 1..30)) {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().join("records");
            let mut store = RecordStore::create(&root).unwrap();
            let mut m = Model { first_seq: 1, ..Default::default() };
            let mut fill = 0u8;
            let mut append = |store: &mut RecordStore, m: &mut Model, sizes: &[usize]| {
                let recs: Vec<Payload> = sizes.iter().map(|&n| { fill = fill.wrapping_add(1); rec(n, fill) }).collect();
                let cum: u64 = m.recs.iter().map(|r| r.len() as u64).sum();
                store.append(7, m.recs.len() as u64 + 1, cum, &recs).unwrap();
                m.recs.extend(recs);
            };
            for op in ops {
                match op {
                    Op::Append(sizes) => append(&mut store, &mut m, &sizes),
                    Op::Trim(upto) => m.first_seq = m.first_seq.max((upto + 1).min(m.recs.len() as u64 + 1)),
                    Op::Reopen | Op::Crash(_) => {
                        let ends = store.sync().unwrap();
                        store.release(7, m.first_seq).unwrap();
                        let snap = m.clone();
                        let snap_end = ends.get(&7).copied();
                        if let Op::Crash(sizes) = &op {
                            append(&mut store, &mut m, sizes);
                        }
                        drop(store);
                        let mut expect = BTreeMap::new();
                        expect.insert(7, snap.expect(snap_end));
                        store = RecordStore::open(&root, &expect).unwrap();
                        m = snap;
                    }
                }
                check(&store, &m);
            }
            // The store's snapshot stream imports into an identical store.
            let last = m.recs.len() as u64;
            let frames = if m.first_seq <= last { store.slices(7, m.first_seq, last).unwrap() } else { vec![] };
            let data = SnapshotData::build(b"h", frames);
            let mut r = data.reader();
            prop_assert_eq!(read_header(&mut r).unwrap(), b"h".to_vec());
            let copy = import(&dir.path().join("copy"), &mut r, &[(7, m.expect(None))]).unwrap();
            check(&copy, &m);
        }
    }

    /// A segment cut mid-frame past the snapshot's end is repaired on open
    /// (the tail is cut, data up to the end intact); a damaged frame below
    /// the end is an error naming the file and offset.
    #[test]
    fn torn_tail_is_cut_and_damage_below_the_end_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("records");
        let mut store = RecordStore::create(&root).unwrap();
        let recs: Vec<Payload> = (0..10).map(|i| rec(1000, i)).collect();
        store.append(7, 1, 0, &recs).unwrap();
        let ends = store.sync().unwrap();
        let more: Vec<Payload> = (10..15).map(|i| rec(1000, i)).collect();
        store.append(7, 11, 10_000, &more).unwrap();
        drop(store);
        let seg = root.join(format!("{:016x}", 7)).join(format!("{:020}.seg", 1));
        let len = std::fs::metadata(&seg).unwrap().len();
        // Torn in the middle of the 13th frame.
        std::fs::OpenOptions::new().write(true).open(&seg).unwrap().set_len(len - 2500).unwrap();
        let expect = BTreeMap::from([(7, Expect { first_seq: 1, last_seq: 10, appended_bytes: 10_000, retained_bytes: 10_000, end: ends.get(&7).copied() })]);
        let store = RecordStore::open(&root, &expect).unwrap();
        assert_eq!(store.read(7, 1, 10, 100, usize::MAX).unwrap(), recs.iter().cloned().enumerate().map(|(i, r)| (i as u64 + 1, r)).collect::<Vec<_>>());
        drop(store);
        // Flip a payload byte of seq 4: refused, naming the file and offset.
        let offset = SEGMENT_HEADER_BYTES + 3 * (FRAME_HEADER_BYTES + 1000);
        let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
        f.write_all_at(&[0xee], offset + FRAME_HEADER_BYTES + 10).unwrap();
        let err = RecordStore::open(&root, &expect).err().expect("damage below the snapshot's end is refused");
        let msg = err.to_string();
        assert!(msg.contains(&seg.display().to_string()) && msg.contains(&format!("offset {offset}")), "{msg}");
    }
}
