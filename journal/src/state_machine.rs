//! The Raft state machine of the journal: applies committed entries to
//! `Streams` (the pure decision logic in `streams.rs`), answers readers, and
//! keeps snapshots on disk.
//!
//! Durability: the state itself lives in memory; what is durable is the Raft
//! log (raft-log, fsync'd) plus the latest snapshot file. A snapshot is written
//! to a temporary file, fsync'd, renamed over `snapshot.bin` and the directory
//! fsync'd before openraft is told it exists, so openraft purges log entries
//! only once the snapshot covering them is on disk. On start the snapshot is
//! loaded and openraft re-applies committed entries after it.
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

use crate::streams::Streams;
use crate::types::Outcome;
use crate::types::TypeConfig;

type Meta = SnapshotMetaOf<TypeConfig>;

const SNAPSHOT_FILE: &str = "snapshot.bin";

/// What `snapshot.bin` holds.
#[derive(Serialize, Deserialize)]
struct SnapshotFile {
    meta: Meta,
    #[serde(with = "serde_bytes")]
    data: Vec<u8>,
}

struct Applied {
    last_applied: Option<LogIdOf<TypeConfig>>,
    membership: StoredMembershipOf<TypeConfig>,
    streams: Streams,
}

struct Inner {
    dir: PathBuf,
    state: RwLock<Applied>,
    /// The latest snapshot (meta and encoded `Streams`), as on disk.
    snapshot: std::sync::Mutex<Option<(Meta, Vec<u8>)>>,
    /// Bumped after every applied batch; readers wait on it.
    applied_tx: watch::Sender<u64>,
}

/// The journal's state machine; cheap to clone, all clones share state.
#[derive(Clone)]
pub struct StateMachineStore {
    inner: Arc<Inner>,
}

fn invalid_data(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

impl StateMachineStore {
    /// Opens the state machine kept in `dir`, loading its snapshot if any.
    pub fn open(dir: &Path) -> io::Result<StateMachineStore> {
        std::fs::create_dir_all(dir)?;
        let mut applied = Applied { last_applied: None, membership: Default::default(), streams: Streams::default() };
        let mut snapshot = None;
        let path = dir.join(SNAPSHOT_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => {
                let file: SnapshotFile = rmp_serde::from_slice(&bytes)
                    .map_err(|e| invalid_data(format!("snapshot {} is unreadable: {e}", path.display())))?;
                applied.streams = rmp_serde::from_slice(&file.data)
                    .map_err(|e| invalid_data(format!("snapshot {} holds bad state: {e}", path.display())))?;
                applied.last_applied = file.meta.last_log_id.clone();
                applied.membership = file.meta.last_membership.clone();
                snapshot = Some((file.meta, file.data));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let index = applied.last_applied.as_ref().map(|l| l.index + 1).unwrap_or(0);
        let (applied_tx, _) = watch::channel(index);
        Ok(StateMachineStore {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                state: RwLock::new(applied),
                snapshot: std::sync::Mutex::new(snapshot),
                applied_tx,
            }),
        })
    }

    /// Runs `f` on the applied streams (a consistent view, read-locked).
    pub fn with_streams<T>(&self, f: impl FnOnce(&Streams) -> T) -> T {
        f(&self.inner.state.read().unwrap().streams)
    }

    /// A receiver that changes whenever entries are applied.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.applied_tx.subscribe()
    }

    /// Index of the last applied log entry.
    pub fn last_applied_index(&self) -> Option<u64> {
        self.inner.state.read().unwrap().last_applied.as_ref().map(|l| l.index)
    }

    fn persist_snapshot(&self, meta: &Meta, data: &[u8]) -> io::Result<()> {
        let file = SnapshotFile { meta: meta.clone(), data: data.to_vec() };
        let bytes = rmp_serde::to_vec(&file).map_err(invalid_data)?;
        let tmp = self.inner.dir.join(format!("{SNAPSHOT_FILE}.tmp"));
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, self.inner.dir.join(SNAPSHOT_FILE))?;
        std::fs::File::open(&self.inner.dir)?.sync_all()?;
        Ok(())
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    type SnapshotData = Vec<u8>;

    async fn build_snapshot(&mut self) -> Result<SnapshotOf<TypeConfig, Vec<u8>>, io::Error> {
        let (meta, data) = {
            let st = self.inner.state.read().unwrap();
            let data = rmp_serde::to_vec(&st.streams).map_err(invalid_data)?;
            let meta = Meta { last_log_id: st.last_applied.clone(), last_membership: st.membership.clone() };
            (meta, data)
        };
        let this = self.clone();
        let (m, d) = (meta.clone(), data.clone());
        tokio::task::spawn_blocking(move || this.persist_snapshot(&m, &d)).await.map_err(io::Error::other)??;
        tracing::info!(last_log_id = ?meta.last_log_id, bytes = data.len(), "snapshot built");
        *self.inner.snapshot.lock().unwrap() = Some((meta.clone(), data.clone()));
        Ok(SnapshotOf::<TypeConfig, Vec<u8>> { meta, snapshot: data })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotData = Vec<u8>;
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
                let mut st = self.inner.state.write().unwrap();
                debug_assert!(st.last_applied.as_ref() < Some(&entry.log_id), "applied an entry twice or out of order");
                st.last_applied = Some(entry.log_id.clone());
                match &entry.payload {
                    EntryPayload::Blank => Outcome::None,
                    EntryPayload::Normal(cmd) => st.streams.apply(cmd),
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

    async fn install_snapshot(&mut self, meta: &Meta, snapshot: Vec<u8>) -> Result<(), io::Error> {
        let streams: Streams = rmp_serde::from_slice(&snapshot).map_err(invalid_data)?;
        let this = self.clone();
        let (m, d) = (meta.clone(), snapshot.clone());
        tokio::task::spawn_blocking(move || this.persist_snapshot(&m, &d)).await.map_err(io::Error::other)??;
        {
            let mut st = self.inner.state.write().unwrap();
            st.streams = streams;
            st.last_applied = meta.last_log_id.clone();
            st.membership = meta.last_membership.clone();
        }
        *self.inner.snapshot.lock().unwrap() = Some((meta.clone(), snapshot));
        tracing::info!(last_log_id = ?meta.last_log_id, "snapshot installed");
        let index = meta.last_log_id.as_ref().map(|l| l.index + 1).unwrap_or(0);
        self.inner.applied_tx.send_replace(index);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<SnapshotOf<TypeConfig, Vec<u8>>>, io::Error> {
        Ok(self
            .inner
            .snapshot
            .lock()
            .unwrap()
            .as_ref()
            .map(|(meta, data)| SnapshotOf::<TypeConfig, Vec<u8>> { meta: meta.clone(), snapshot: data.clone() }))
    }
}
