//! openraft's log storage on top of `raft-log` (a chunked WAL with a CRC per
//! record and batched `sync_data`). This file only adapts types; all
//! persistence, checksums and group commit are raft-log's.
//!
//! Durability invariant: openraft is told an append is flushed (`IOFlushed`)
//! only from raft-log's flush callback of a `flush(sync = true)`, i.e. after
//! the entries are fsync'd. raft-log's flush worker batches the syncs of
//! concurrent appends, which is the journal's group commit. Votes are synced
//! before `save_vote` returns; truncations before `truncate_after` returns.
//!
//! Torn tails: raft-log (chunked-wal `truncate_incomplete_record`, on by
//! default) cuts an incomplete last record, or a zero-filled tail, when it
//! opens the log. A damaged record with non-zero bytes is refused with an
//! error naming the chunk and offset: that is corruption, not a torn write,
//! and the node must not silently drop it (wipe the node's data directory
//! and it re-syncs from its peers).
//!
//! Errors: every I/O error leaving this adapter names the log's directory,
//! so the one line a node logs when its core stops says where it failed.
//!
//! Encoding: log ids, votes and entries are MessagePack, each framed by a
//! u32 length inside raft-log's own checksummed record.

use std::fmt::Debug;
use std::io;
use std::io::Read;
use std::io::Write;
use std::ops::Bound;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::Arc;
use std::sync::Mutex;

use openraft::LogState;
use openraft::RaftLogReader;
use openraft::storage::IOFlushed;
use openraft::storage::RaftLogStorage;
use raft_log::RaftLog;
use raft_log::api::raft_log_writer::RaftLogWriter;
use raft_log::codeq::Decode;
use raft_log::codeq::Encode;
use serde::Serialize;
use serde::de::DeserializeOwned;
use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::oneshot;

use crate::types::Entry;
use crate::types::LogId;
use crate::types::TypeConfig;
use crate::types::Vote;

/// Bytes of recent entries raft-log keeps in memory (its default, 1 GB,
/// would hold every record of a full stream twice over). raft-log evicts
/// only entries of closed WAL chunks, so its cache holds up to this plus one
/// `WAL_CHUNK_BYTES` chunk.
pub const LOG_CACHE_BYTES: usize = 16 << 20;
/// Size at which raft-log closes a WAL file and starts the next; purged
/// entries free disk (and cache) a whole chunk at a time.
pub const WAL_CHUNK_BYTES: usize = 16 << 20;
/// Entries raft-log keeps in memory at most.
pub const LOG_CACHE_ENTRIES: usize = 4096;

/// Largest encoded log id, vote or entry the decoder accepts.
const MAX_FRAME_BYTES: u32 = 256 << 20;

fn bad_data(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

fn write_frame<W: Write>(mut w: W, bytes: &[u8]) -> io::Result<usize> {
    w.write_all(&(bytes.len() as u32).to_le_bytes())?;
    w.write_all(bytes)?;
    Ok(4 + bytes.len())
}

fn read_frame<R: Read>(mut r: R) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len);
    if len > MAX_FRAME_BYTES {
        return Err(bad_data(format!("frame of {len} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")));
    }
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf)?;
    Ok(buf)
}

/// A value stored in raft-log as a length-framed MessagePack document.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Framed<T>(pub T);

impl<T: Serialize> Encode for Framed<T> {
    fn encode<W: Write>(&self, w: W) -> io::Result<usize> {
        write_frame(w, &rmp_serde::to_vec(&self.0).map_err(bad_data)?)
    }
}

impl<T: DeserializeOwned> Decode for Framed<T> {
    fn decode<R: Read>(r: R) -> io::Result<Self> {
        rmp_serde::from_slice(&read_frame(r)?).map(Framed).map_err(bad_data)
    }
}

/// An entry, kept encoded so raft-log's cache can size it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedEntry(pub Vec<u8>);

impl Encode for EncodedEntry {
    fn encode<W: Write>(&self, w: W) -> io::Result<usize> {
        write_frame(w, &self.0)
    }
}

impl Decode for EncodedEntry {
    fn decode<R: Read>(r: R) -> io::Result<Self> {
        read_frame(r).map(EncodedEntry)
    }
}

/// `e`, saying it happened in the Raft log in `dir`.
fn in_log(dir: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("writing the Raft log in {}: {e}", dir.display()))
}

/// Who is waiting for a flush.
pub enum Flushed {
    /// openraft, for appended entries (of the log in this directory),
    /// and when the append was written (observed into the histogram once
    /// synced).
    Raft(IOFlushed<TypeConfig>, Arc<Path>, Option<(std::time::Instant, Histogram)>),
    /// An async caller of this adapter (vote, truncate).
    Waiter(oneshot::Sender<io::Result<()>>),
}

impl raft_log::Callback for Flushed {
    fn send(self, res: Result<(), io::Error>) {
        match self {
            Flushed::Raft(cb, dir, timed) => {
                if let (Some((t0, h)), true) = (timed, res.is_ok()) {
                    h.observe(t0.elapsed().as_secs_f64());
                }
                cb.io_completed(res.map_err(|e| in_log(&dir, e)))
            }
            Flushed::Waiter(tx) => {
                let _ = tx.send(res);
            }
        }
    }
}

impl Debug for Flushed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Flushed::Raft(..) => "Flushed::Raft",
            Flushed::Waiter(_) => "Flushed::Waiter",
        })
    }
}

/// raft-log's type parameters for the journal.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JournalLogTypes;

impl raft_log::Types for JournalLogTypes {
    type LogId = Framed<LogId>;
    type LogPayload = EncodedEntry;
    type Vote = Framed<Vote>;
    type UserData = Framed<()>;
    type Callback = Flushed;

    fn log_index(log_id: &Self::LogId) -> u64 {
        log_id.0.index
    }

    fn payload_size(payload: &Self::LogPayload) -> u64 {
        payload.0.len() as u64
    }
}

/// The journal's Raft log; clones share one raft-log instance.
#[derive(Clone)]
pub struct LogStore {
    log: Arc<Mutex<RaftLog<JournalLogTypes>>>,
    dir: Arc<Path>,
    /// Where appends' write-to-fsync times go (metrics.rs), if anywhere.
    sync_seconds: Option<Histogram>,
}

fn to_range<RB: RangeBounds<u64>>(range: &RB) -> (u64, u64) {
    let start = match range.start_bound() {
        Bound::Included(s) => *s,
        Bound::Excluded(s) => s + 1,
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(e) => e + 1,
        Bound::Excluded(e) => *e,
        Bound::Unbounded => u64::MAX,
    };
    (start, end)
}

impl LogStore {
    /// Opens (or creates) the log in `dir`, repairing a torn tail.
    /// `flush_wait` is how long raft-log's flush worker waits for more writes
    /// before starting a sync (the group-commit window).
    pub fn open(dir: &Path, flush_wait: std::time::Duration) -> io::Result<LogStore> {
        std::fs::create_dir_all(dir)?;
        let dir_str = dir.to_str().ok_or_else(|| bad_data(format!("{} is not UTF-8", dir.display())))?;
        let mut config = raft_log::Config::new(dir_str);
        config.wal.flush_batch_wait = Some(flush_wait);
        config.log_cache_capacity = Some(LOG_CACHE_BYTES);
        config.wal.chunk_max_size = Some(WAL_CHUNK_BYTES);
        config.log_cache_max_items = Some(LOG_CACHE_ENTRIES);
        let log = RaftLog::open(Arc::new(config))
            .map_err(|e| io::Error::new(e.kind(), format!("opening the Raft log in {}: {e}", dir.display())))?;
        Ok(LogStore { log: Arc::new(Mutex::new(log)), dir: Arc::from(dir), sync_seconds: None })
    }

    /// Observes each append's write-to-fsync time into `h`.
    pub fn with_sync_histogram(mut self, h: Histogram) -> LogStore {
        self.sync_seconds = Some(h);
        self
    }

    /// `e`, naming this log's directory.
    fn ctx(&self, e: io::Error) -> io::Error {
        in_log(&self.dir, e)
    }

    /// Asks raft-log to fsync everything written so far and waits for it.
    async fn sync(&self) -> io::Result<()> {
        let (tx, rx) = oneshot::channel();
        self.log.lock().unwrap().flush(true, Some(Flushed::Waiter(tx))).map_err(|e| self.ctx(e))?;
        rx.await.map_err(|_| io::Error::other("raft-log dropped a flush request"))?.map_err(|e| self.ctx(e))
    }

    fn read_entries(&self, start: u64, end: u64) -> io::Result<Vec<Entry>> {
        let log = self.log.lock().unwrap();
        log.read(start, end)
            .map(|r| {
                let (_, payload) = r?;
                rmp_serde::from_slice::<Entry>(&payload.0).map_err(bad_data)
            })
            .collect()
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let (start, end) = to_range(&range);
        self.read_entries(start, end)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Ok(self.log.lock().unwrap().log_state().vote().map(|v| v.0.clone()))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let log = self.log.lock().unwrap();
        let st = log.log_state();
        let purged = st.purged().map(|l| l.0.clone());
        let last = st.last().map(|l| l.0.clone()).or_else(|| purged.clone());
        Ok(LogState { last_purged_log_id: purged, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        self.log.lock().unwrap().save_vote(Framed(vote.clone())).map_err(|e| self.ctx(e))?;
        self.sync().await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        // Synced with the next append's flush; losing it only means
        // re-applying a little more after a crash.
        if let Some(c) = committed {
            self.log.lock().unwrap().commit(Framed(c)).map_err(|e| self.ctx(e))?;
        }
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(self.log.lock().unwrap().log_state().committed().map(|c| c.0.clone()))
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> Result<(), io::Error>
    where I: IntoIterator<Item = Entry> + Send {
        let mut batch = Vec::new();
        for e in entries {
            let bytes = rmp_serde::to_vec(&e).map_err(bad_data)?;
            batch.push((Framed(e.log_id.clone()), EncodedEntry(bytes)));
        }
        let mut log = self.log.lock().unwrap();
        log.append(batch).map_err(|e| self.ctx(e))?;
        // The callback fires from raft-log's flush worker once synced.
        let timed = self.sync_seconds.clone().map(|h| (std::time::Instant::now(), h));
        log.flush(true, Some(Flushed::Raft(callback, self.dir.clone(), timed))).map_err(|e| self.ctx(e))?;
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.map(|l| l.index + 1).unwrap_or(0);
        {
            let mut log = self.log.lock().unwrap();
            // Nothing at or after `from`: nothing to remove (raft-log refuses
            // to truncate past its last entry).
            match log.log_state().last() {
                Some(last) if last.0.index >= from => {}
                _ => return Ok(()),
            }
            log.truncate(from).map_err(|e| self.ctx(e))?;
        }
        self.sync().await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        // Purged entries are already in a snapshot on disk; a purge lost in a
        // crash only leaves entries that are purged again later.
        let mut log = self.log.lock().unwrap();
        log.purge(Framed(log_id)).map_err(|e| self.ctx(e))?;
        log.flush(false, None).map_err(|e| self.ctx(e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Seek;

    use openraft::entry::RaftEntry;
    use openraft::testing::log::StoreBuilder;
    use openraft::testing::log::Suite;

    use super::*;
    use crate::state_machine::StateMachineStore;
    use crate::types::Command;

    const TEST_FLUSH_WAIT: std::time::Duration = std::time::Duration::from_micros(100);

    struct Builder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for Builder {
        async fn build(
            &self,
        ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), openraft::StorageError<TypeConfig>> {
            let dir = tempfile::tempdir().unwrap();
            let log = LogStore::open(&dir.path().join("log"), TEST_FLUSH_WAIT).unwrap();
            let sm = StateMachineStore::open(&dir.path().join("sm")).unwrap();
            Ok((dir, log, sm))
        }
    }

    /// openraft's own storage test suite, against raft-log and our state machine.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn openraft_storage_suite() {
        Suite::test_all(Builder).await.unwrap();
    }

    fn log_id(term: u64, index: u64) -> LogId {
        openraft::testing::log_id::<TypeConfig>(term, 1, index)
    }

    fn entry(term: u64, index: u64) -> Entry {
        Entry::new_normal(
            log_id(term, index),
            Command::Trim { stream: format!("s{index}"), upto_seq: index, upto_bytes: None },
        )
    }

    async fn append(store: &mut LogStore, entries: Vec<Entry>) {
        use openraft::type_config::TypeConfigExt;
        let (tx, rx) = TypeConfig::oneshot();
        store.append(entries, IOFlushed::signal(tx)).await.unwrap();
        rx.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn reopen_recovers_vote_committed_and_entries() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = LogStore::open(dir.path(), TEST_FLUSH_WAIT).unwrap();
            s.save_vote(&Vote::new(3, 2)).await.unwrap();
            append(&mut s, (1..=5).map(|i| entry(3, i)).collect()).await;
            s.save_committed(Some(log_id(3, 4))).await.unwrap();
            append(&mut s, vec![entry(3, 6)]).await;
        }
        let mut s = LogStore::open(dir.path(), TEST_FLUSH_WAIT).unwrap();
        assert_eq!(s.read_vote().await.unwrap(), Some(Vote::new(3, 2)));
        assert_eq!(s.read_committed().await.unwrap(), Some(log_id(3, 4)));
        let got = s.try_get_log_entries(1..7).await.unwrap();
        assert_eq!(got.iter().map(|e| e.index()).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(got[2], entry(3, 3));
    }

    fn newest_chunk(dir: &Path) -> std::path::PathBuf {
        let mut files: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.is_file()).collect();
        files.sort();
        files.pop().expect("a WAL chunk")
    }

    async fn torn_tail(tear: impl FnOnce(&mut std::fs::File, u64)) {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = LogStore::open(dir.path(), TEST_FLUSH_WAIT).unwrap();
            append(&mut s, (1..=10).map(|i| entry(1, i)).collect()).await;
        }
        let chunk = newest_chunk(dir.path());
        let mut f = std::fs::OpenOptions::new().read(true).write(true).open(&chunk).unwrap();
        let len = f.metadata().unwrap().len();
        tear(&mut f, len);
        drop(f);
        let mut s = LogStore::open(dir.path(), TEST_FLUSH_WAIT).expect("a torn tail is repaired on open");
        let got = s.try_get_log_entries(1..100).await.unwrap();
        // At most the torn record is lost; what remains is a gap-free prefix.
        assert!(got.len() >= 9, "lost more than the torn record: {} left", got.len());
        assert!(got.iter().enumerate().all(|(i, e)| e.index() == i as u64 + 1));
        // And the log takes new appends after the repair.
        let next = got.len() as u64 + 1;
        append(&mut s, vec![entry(2, next)]).await;
        assert_eq!(s.try_get_log_entries(next..next + 1).await.unwrap(), vec![entry(2, next)]);
    }

    #[tokio::test]
    async fn truncated_last_record_is_repaired() {
        torn_tail(|f, len| f.set_len(len - 5).unwrap()).await;
    }

    #[tokio::test]
    async fn zero_filled_tail_is_repaired() {
        torn_tail(|f, len| {
            f.seek(io::SeekFrom::Start(len)).unwrap();
            f.write_all(&[0u8; 512]).unwrap();
        })
        .await;
    }

    #[test]
    fn decoders_reject_bad_frames_without_panicking() {
        assert!(Framed::<LogId>::decode(&[][..]).is_err());
        assert!(Framed::<LogId>::decode(&[0xff, 0xff, 0xff, 0xff][..]).is_err());
        assert!(Framed::<LogId>::decode(&[3, 0, 0, 0, 0xc1, 0xc1, 0xc1][..]).is_err());
        assert!(EncodedEntry::decode(&[9, 0, 0, 0, 1][..]).is_err());
    }

    proptest::proptest! {
        #[test]
        fn framed_round_trips_and_never_panics_on_garbage(term in 0u64..1000, index in 0u64..1_000_000, junk in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let id = log_id(term, index);
            let mut buf = Vec::new();
            Framed(id.clone()).encode(&mut buf).unwrap();
            proptest::prop_assert_eq!(Framed::<LogId>::decode(&buf[..]).unwrap().0, id);
            let _ = Framed::<LogId>::decode(&junk[..]);
            let _ = Framed::<Vote>::decode(&junk[..]);
            let _ = EncodedEntry::decode(&junk[..]);
        }
    }
}
