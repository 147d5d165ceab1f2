//! The Raft state machine of the journal: applies committed entries to
//! `Streams` (the pure decision logic in `streams.rs`) and their effects to
//! the record store (`records.rs`), answers readers, and keeps snapshots.
//!
//! Memory: the applied state holds each stream's metadata only; record
//! payloads live in the record store's files, with a sparse index in memory.
//!
//! Durability: what is durable is the Raft log (raft-log, fsync'd) plus the
//! latest snapshot. Records are written to the record store at apply time
//! without fsync. Building a snapshot fsyncs the record files, then writes
//! `snapshot.bin` (openraft's meta, the streams' state, the name of the record
//! store directory, and each stream's `End`: exactly how far its files are
//! covered) to a temporary file, fsyncs it, renames it over `snapshot.bin` and
//! fsyncs the directory, before openraft is told it exists (and may purge the
//! log it covers). Only then are segments that hold nothing past the
//! snapshot's first seqs deleted. On start, the record store is cut back to
//! the snapshot's ends (a torn or extra tail is dropped), every frame below
//! is verified, and openraft re-applies committed entries after the snapshot.
//! With no snapshot, the record store starts empty and the whole log is
//! re-applied.
//!
//! Snapshot transfer (bounded memory): a snapshot's data is a byte stream
//! (`records::SnapshotData`: a header with the streams' state, then every
//! retained record frame) read from the record files, never assembled in
//! memory. The leader sends it in chunks of `network::SNAPSHOT_CHUNK_BYTES`;
//! the follower appends them to a staging file (`stage_chunk`) and, on the
//! last one, openraft's `install_full_snapshot` installs it: the frames are
//! verified and imported into a new record store directory, `snapshot.bin`
//! is switched to name it (atomically, by rename), and the old one is removed.
//!
//! Readers follow the applied index through a `watch` channel: a tailing
//! `Read` wakes when an entry is applied instead of polling.

use std::io;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::RwLock;

use futures::Stream;
use futures::TryStreamExt;
use openraft::EntryPayload;
use openraft::OptionalSend;
use openraft::RaftSnapshotBuilder;
use openraft::alias::LogIdOf;
use openraft::alias::SnapshotMetaOf;
use openraft::alias::SnapshotOf;
use openraft::alias::StoredMembershipOf;
use openraft::storage::EntryResponder;
use openraft::storage::RaftStateMachine;
use serde::Deserialize;
use serde::Serialize;
use tokio::sync::watch;

use std::collections::BTreeMap;

use crate::records;
use crate::records::End;
use crate::records::Expect;
use crate::records::RecordStore;
use crate::records::SnapshotData;
use crate::streams::Effect;
use crate::streams::Streams;
use crate::types::Outcome;
use crate::types::TypeConfig;

type Meta = SnapshotMetaOf<TypeConfig>;

const SNAPSHOT_FILE: &str = "snapshot.bin";
/// Where a snapshot being received is staged.
const STAGING_FILE: &str = "incoming.snap";
const RECORDS_PREFIX: &str = "records-";

/// What `snapshot.bin` holds.
#[derive(Clone, Serialize, Deserialize)]
struct SnapshotFile {
    meta: Meta,
    streams: Streams,
    /// The record store directory (in the state directory) this covers.
    records_dir: String,
    /// Per stream id, how far its record files are covered.
    ends: BTreeMap<u64, End>,
}

impl SnapshotFile {
    fn expects(&self) -> BTreeMap<u64, Expect> {
        expects(&self.streams, &self.ends)
    }
}

fn expect_of(s: &crate::streams::Stream, end: Option<End>) -> Expect {
    Expect {
        first_seq: s.first_seq,
        last_seq: s.last_seq,
        appended_bytes: s.appended_bytes,
        retained_bytes: s.retained_bytes,
        end,
    }
}

fn expects(streams: &Streams, ends: &BTreeMap<u64, End>) -> BTreeMap<u64, Expect> {
    streams.streams.values().map(|s| (s.id, expect_of(s, ends.get(&s.id).copied()))).collect()
}

struct Applied {
    last_applied: Option<LogIdOf<TypeConfig>>,
    membership: StoredMembershipOf<TypeConfig>,
    streams: Streams,
    records: RecordStore,
    records_dir: String,
}

struct Inner {
    dir: PathBuf,
    state: RwLock<Applied>,
    /// The latest snapshot, as on disk.
    snapshot: std::sync::Mutex<Option<SnapshotFile>>,
    /// Held while a snapshot is built or installed (one at a time).
    snapshot_io: tokio::sync::Mutex<()>,
    /// A snapshot being received: its meta and the bytes staged so far.
    staging: std::sync::Mutex<Option<(Meta, u64)>>,
    /// Names each completely received snapshot file apart.
    received: std::sync::atomic::AtomicU64,
    /// Record bytes applied since the state the latest snapshot build
    /// took: what a new snapshot would let the Raft log and the record
    /// store drop (server.rs triggers one past `--snapshot-every-bytes`).
    bytes_since_snapshot: std::sync::atomic::AtomicU64,
    /// Bumped after every applied batch; readers wait on it.
    applied_tx: watch::Sender<u64>,
}

/// The journal's state machine; cheap to clone, all clones share state.
#[derive(Clone)]
pub struct StateMachineStore {
    inner: Arc<Inner>,
}

/// `e`, saying what was being done in which directory (the line a node
/// logs when a storage error stops it names the place).
fn failed_in(doing: &str, dir: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{doing} in {}: {e}", dir.display()))
}

fn invalid_data(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

fn blocking<T: Send + 'static>(f: impl FnOnce() -> io::Result<T> + Send + 'static) -> impl std::future::Future<Output = io::Result<T>> {
    async move { tokio::task::spawn_blocking(f).await.map_err(io::Error::other)? }
}

/// Removes entries of `dir` left by earlier runs: record store directories
/// other than `keep`, and a staging file.
fn remove_leftovers(dir: &Path, keep: &str) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(RECORDS_PREFIX) && name != keep {
            tracing::info!(dir = %entry.path().display(), "removing a record store no snapshot names");
            std::fs::remove_dir_all(entry.path())?;
        } else if name.starts_with(STAGING_FILE) || name.ends_with(".tmp") {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

impl StateMachineStore {
    /// Opens the state machine kept in `dir`, loading its snapshot if any.
    pub fn open(dir: &Path) -> io::Result<StateMachineStore> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(SNAPSHOT_FILE);
        let snapshot: Option<SnapshotFile> = match std::fs::read(&path) {
            Ok(bytes) => Some(rmp_serde::from_slice(&bytes).map_err(|e| {
                invalid_data(format!(
                    "snapshot {} is unreadable ({e}); if it was written by an older journal, wipe this node's data directory and it re-syncs from its peers",
                    path.display()
                ))
            })?),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let applied = match &snapshot {
            Some(file) => {
                remove_leftovers(dir, &file.records_dir)?;
                let records = RecordStore::open(&dir.join(&file.records_dir), &file.expects())?;
                Applied {
                    last_applied: file.meta.last_log_id.clone(),
                    membership: file.meta.last_membership.clone(),
                    streams: file.streams.clone(),
                    records,
                    records_dir: file.records_dir.clone(),
                }
            }
            None => {
                let records_dir = format!("{RECORDS_PREFIX}0");
                remove_leftovers(dir, "")?;
                Applied {
                    last_applied: None,
                    membership: Default::default(),
                    streams: Streams::default(),
                    records: RecordStore::create(&dir.join(&records_dir))?,
                    records_dir,
                }
            }
        };
        let index = applied.last_applied.as_ref().map(|l| l.index + 1).unwrap_or(0);
        let (applied_tx, _) = watch::channel(index);
        Ok(StateMachineStore {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                state: RwLock::new(applied),
                snapshot: std::sync::Mutex::new(snapshot),
                snapshot_io: tokio::sync::Mutex::new(()),
                staging: std::sync::Mutex::new(None),
                received: std::sync::atomic::AtomicU64::new(0),
                bytes_since_snapshot: std::sync::atomic::AtomicU64::new(0),
                applied_tx,
            }),
        })
    }

    /// Runs `f` on the applied streams (a consistent view, read-locked).
    pub fn with_streams<T>(&self, f: impl FnOnce(&Streams) -> T) -> T {
        f(&self.inner.state.read().unwrap().streams)
    }

    /// Runs `f` on the applied streams and their record store (read-locked).
    pub fn with_records<T>(&self, f: impl FnOnce(&Streams, &RecordStore) -> T) -> T {
        let st = self.inner.state.read().unwrap();
        f(&st.streams, &st.records)
    }

    /// A receiver that changes whenever entries are applied.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.applied_tx.subscribe()
    }

    /// Index of the last applied log entry.
    /// Record bytes applied since the last snapshot build began.
    pub fn bytes_since_snapshot(&self) -> u64 {
        self.inner.bytes_since_snapshot.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn last_applied_index(&self) -> Option<u64> {
        self.inner.state.read().unwrap().last_applied.as_ref().map(|l| l.index)
    }

    fn persist_snapshot(dir: &Path, file: &SnapshotFile) -> io::Result<()> {
        let bytes = rmp_serde::to_vec(file).map_err(invalid_data)?;
        let tmp = dir.join(format!("{SNAPSHOT_FILE}.tmp"));
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, dir.join(SNAPSHOT_FILE))?;
        std::fs::File::open(dir)?.sync_all()?;
        Ok(())
    }

    /// The byte stream of `file`'s snapshot, read from the record store.
    fn data_of(file: &SnapshotFile, records: &RecordStore) -> io::Result<SnapshotData> {
        let header = rmp_serde::to_vec(&file.streams).map_err(invalid_data)?;
        let mut frames = Vec::new();
        for s in file.streams.streams.values().filter(|s| s.first_seq <= s.last_seq) {
            frames.extend(records.slices(s.id, s.first_seq, s.last_seq)?);
        }
        Ok(SnapshotData::build(&header, frames))
    }

    /// Adds one chunk of a snapshot a leader is sending, at `offset` of its
    /// byte stream; a chunk at offset 0 starts over. On the last chunk
    /// (`done`), returns the staged snapshot for `install_full_snapshot`.
    pub async fn stage_chunk(&self, meta: &Meta, offset: u64, data: Vec<u8>, done: bool) -> io::Result<Option<SnapshotData>> {
        let path = self.inner.dir.join(STAGING_FILE);
        {
            let staging = self.inner.staging.lock().unwrap();
            match &*staging {
                _ if offset == 0 => {}
                Some((m, len)) if m == meta && *len == offset => {}
                other => {
                    return Err(io::Error::other(format!(
                        "snapshot chunk at offset {offset} does not follow what was received ({:?}); the sender must start over",
                        other.as_ref().map(|(m, len)| (m.last_log_id.clone(), *len))
                    )))
                }
            }
        }
        let n = data.len() as u64;
        let p = path.clone();
        blocking(move || records::stage_chunk(&p, offset, &data)).await?;
        let mut staging = self.inner.staging.lock().unwrap();
        if done {
            *staging = None;
            // Out of the way of the next transfer, which may start (and
            // truncate the staging file) while this one is installed.
            let n = self.inner.received.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let received = self.inner.dir.join(format!("{STAGING_FILE}.{n}"));
            std::fs::rename(&path, &received)?;
            return SnapshotData::from_file(received).map(Some);
        }
        *staging = Some((meta.clone(), offset + n));
        Ok(None)
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> Result<SnapshotOf<TypeConfig, SnapshotData>, io::Error> {
        let _one_at_a_time = self.inner.snapshot_io.lock().await;
        let (file, files, dirs) = {
            let mut st = self.inner.state.write().unwrap();
            // Under the state lock: bytes applied from here on count
            // towards the next snapshot.
            self.inner.bytes_since_snapshot.store(0, std::sync::atomic::Ordering::Relaxed);
            let (files, dirs, ends) = st.records.to_sync();
            let meta = Meta { last_log_id: st.last_applied.clone(), last_membership: st.membership.clone() };
            (SnapshotFile { meta, streams: st.streams.clone(), records_dir: st.records_dir.clone(), ends }, files, dirs)
        };
        let dir = self.inner.dir.clone();
        let f = file.clone();
        blocking(move || {
            for file in files {
                file.sync_data()?;
            }
            for d in dirs {
                std::fs::File::open(d)?.sync_all()?;
            }
            StateMachineStore::persist_snapshot(&dir, &f)
        })
        .await
        .map_err(|e| failed_in("writing a snapshot", &self.inner.dir, e))?;
        let data = {
            let mut st = self.inner.state.write().unwrap();
            for s in file.streams.streams.values() {
                st.records.release(s.id, s.first_seq)?;
            }
            StateMachineStore::data_of(&file, &st.records)?
        };
        tracing::info!(last_log_id = ?file.meta.last_log_id, streams = file.streams.streams.len(), bytes = data.len(), "snapshot built");
        let meta = file.meta.clone();
        *self.inner.snapshot.lock().unwrap() = Some(file);
        Ok(SnapshotOf::<TypeConfig, SnapshotData> { meta, snapshot: data })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogIdOf<TypeConfig>>, StoredMembershipOf<TypeConfig>), io::Error> {
        let st = self.inner.state.read().unwrap();
        Ok((st.last_applied.clone(), st.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend {
        let mut last_index = None;
        while let Some((entry, responder)) = entries.try_next().await? {
            let outcome = {
                let mut guard = self.inner.state.write().unwrap();
                let st = &mut *guard;
                assert!(st.last_applied.as_ref() < Some(&entry.log_id), "applied an entry twice or out of order");
                st.last_applied = Some(entry.log_id.clone());
                match &entry.payload {
                    EntryPayload::Blank => Outcome::None,
                    EntryPayload::Normal(cmd) => {
                        let mut effects = Vec::new();
                        let outcome = st.streams.apply_with(cmd, &mut effects);
                        for effect in effects {
                            if let Effect::Append { id, first_seq, cum_before, records } = effect {
                                let bytes: usize = records.iter().map(|r| r.len()).sum();
                                self.inner.bytes_since_snapshot.fetch_add(bytes as u64, std::sync::atomic::Ordering::Relaxed);
                                st.records.append(id, first_seq, cum_before, records).map_err(|e| {
                                    let e = failed_in("writing records to the record store", &self.inner.dir.join(&st.records_dir), e);
                                    tracing::error!(error = %e, log_id = %entry.log_id, "cannot write records to the record store");
                                    e
                                })?;
                            }
                        }
                        outcome
                    }
                    EntryPayload::Membership(m) => {
                        st.membership = StoredMembershipOf::<TypeConfig>::new(Some(entry.log_id.clone()), m.clone());
                        Outcome::None
                    }
                }
            };
            last_index = Some(entry.log_id.index);
            if let Some(responder) = responder {
                responder.send(outcome);
            }
        }
        if let Some(i) = last_index {
            self.inner.applied_tx.send_replace(i + 1);
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(&mut self, meta: &Meta, snapshot: SnapshotData) -> Result<(), io::Error> {
        let _one_at_a_time = self.inner.snapshot_io.lock().await;
        let dir = self.inner.dir.clone();
        let old_dir = self.inner.state.read().unwrap().records_dir.clone();
        let generation: u64 = old_dir.strip_prefix(RECORDS_PREFIX).and_then(|g| g.parse().ok()).unwrap_or(0);
        let new_dir = format!("{RECORDS_PREFIX}{}", generation + 1);
        let m = meta.clone();
        let (file, records) = blocking(move || {
            let mut r = snapshot.reader();
            let header = records::read_header(&mut r)?;
            let streams: Streams = rmp_serde::from_slice(&header).map_err(|e| invalid_data(format!("snapshot header: {e}")))?;
            let root = dir.join(&new_dir);
            if root.exists() {
                std::fs::remove_dir_all(&root)?;
            }
            // Frames come in the order of `streams` (by name), as `data_of` sends them.
            let order: Vec<(u64, Expect)> = streams.streams.values().map(|s| (s.id, expect_of(s, None))).collect();
            let mut records = records::import(&root, &mut r, &order)?;
            let ends = records.sync()?;
            let file = SnapshotFile { meta: m, streams, records_dir: new_dir, ends };
            StateMachineStore::persist_snapshot(&dir, &file)?;
            if let Some(staged) = &snapshot.staged {
                std::fs::remove_file(staged)?;
            }
            Ok((file, records))
        })
        .await
        .map_err(|e| failed_in("installing a snapshot", &self.inner.dir, e))?;
        let old = {
            let mut st = self.inner.state.write().unwrap();
            st.streams = file.streams.clone();
            st.last_applied = meta.last_log_id.clone();
            st.membership = meta.last_membership.clone();
            st.records_dir = file.records_dir.clone();
            std::mem::replace(&mut st.records, records)
        };
        drop(old);
        let old_root = self.inner.dir.join(&old_dir);
        blocking(move || if old_root.exists() { std::fs::remove_dir_all(old_root) } else { Ok(()) }).await?;
        *self.inner.snapshot.lock().unwrap() = Some(file);
        tracing::info!(last_log_id = ?meta.last_log_id, "snapshot installed");
        let index = meta.last_log_id.as_ref().map(|l| l.index + 1).unwrap_or(0);
        self.inner.applied_tx.send_replace(index);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<SnapshotOf<TypeConfig, SnapshotData>>, io::Error> {
        let Some(file) = self.inner.snapshot.lock().unwrap().clone() else { return Ok(None) };
        let data = {
            let st = self.inner.state.read().unwrap();
            StateMachineStore::data_of(&file, &st.records)?
        };
        Ok(Some(SnapshotOf::<TypeConfig, SnapshotData> { meta: file.meta, snapshot: data }))
    }
}
