//! Snapshots of a stream's dataset, kept in an object store, so the journal
//! need only hold the tail of the history.
//!
//! A snapshot is an RDB built off the primary's box (snapshotter.rs) that
//! stands at a journal record `seq` and replication offset `offset`: loading
//! it and then feeding every stream byte after `offset` (records `seq + 1`…)
//! gives the journal's dataset. Its `SnapshotMeta` says where it stands and
//! how to check it (the RDB's SHA-256, the dataset's `DEBUG DIGEST`, a
//! running SHA-256 of the stream bytes up to `offset`).
//!
//! Life cycle of one snapshot:
//!   built (private server, SAVE) → uploaded (`<stream>/<seq>-<id>.rdb` and
//!   its `.json`) → verified (rehearsal restore reproduces every checksum) →
//!   published (its meta compare-and-set into the stream's metadata key
//!   `SNAPSHOT_META_KEY`) → the journal trims before it → superseded by a
//!   newer one and deleted.
//! Invariant: only a verified snapshot is ever published, and the journal
//! never trims records a published snapshot does not cover. An object that
//! is not (or no longer) published is never used.
//!
//! The store is the `object_store` crate: a local directory by default, S3
//! (`s3://bucket/prefix`, credentials and endpoint from the usual `AWS_*`
//! variables) by configuration. Transfers stream in bounded chunks.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::ObjectStore;
use object_store::WriteMultipart;
use object_store::path::Path as ObjPath;
use serde::Deserialize;
use serde::Serialize;
use sha2::Digest;
use sha2::Sha256;
use tokio::io::AsyncReadExt;
use tokio::io::AsyncWriteExt;

/// The stream metadata key holding the published snapshot's `SnapshotMeta`.
pub const SNAPSHOT_META_KEY: &str = "snapshot";
/// Bytes per part of an upload, and per read of a file being uploaded.
pub const UPLOAD_PART_BYTES: usize = 8 << 20;
/// Parts of one upload in flight at once (bounds an upload's memory).
pub const UPLOAD_PARTS_IN_FLIGHT: usize = 2;
/// Bytes read at once from a file being hashed.
const HASH_CHUNK_BYTES: usize = 1 << 20;
/// Largest serialized `SnapshotMeta` (the journal's meta value limit is 64 KiB).
pub const MAX_META_BYTES: usize = 16 << 10;

/// The format of `SnapshotMeta` this release writes, and the newest it
/// reads. A meta without the field was written before it existed: format 1.
pub const SNAPSHOT_META_FORMAT: u32 = 1;

fn first_format() -> u32 {
    1
}

/// Where a snapshot stands and how to check it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    /// `SNAPSHOT_META_FORMAT` of the release that wrote it.
    #[serde(default = "first_format")]
    pub format: u32,
    pub stream: String,
    /// The last journal record the snapshot covers.
    pub seq: u64,
    /// The replication offset it stands at (after a whole command).
    pub offset: u64,
    /// The producer whose bytes end at `offset` (its replication id).
    pub replid: String,
    /// The history's first base (replication id and offset): a feeder's
    /// replication id derives from it, so it stays the same across snapshots.
    pub origin_replid: String,
    pub origin_offset: u64,
    /// The engine that saved it (`redis` or `valkey`) and its version.
    pub engine: String,
    pub engine_version: String,
    pub rdb_version: u32,
    pub rdb_bytes: u64,
    /// SHA-256 of the RDB file, hex.
    pub rdb_sha256: String,
    /// `DEBUG DIGEST` of the dataset it holds.
    pub digest: String,
    /// Running checksum of the stream bytes up to `offset`:
    /// SHA-256(previous snapshot's `stream_sha256` ‖ the live stream bytes
    /// after the previous snapshot's offset), hex; the first snapshot chains
    /// from the empty string and the bytes after the base.
    pub stream_sha256: String,
    pub created_unix_ms: u64,
    /// The RDB object's key in the store.
    pub key: String,
}

impl SnapshotMeta {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a snapshot meta always serializes")
    }

    pub fn decode(b: &[u8]) -> Result<SnapshotMeta, String> {
        if b.len() > MAX_META_BYTES {
            return Err(format!("snapshot meta is {} bytes; the limit is {MAX_META_BYTES}", b.len()));
        }
        let m: SnapshotMeta = serde_json::from_slice(b).map_err(|e| format!("snapshot meta is unreadable: {e}"))?;
        m.check()?;
        Ok(m)
    }

    /// The shape every meta must have.
    pub fn check(&self) -> Result<(), String> {
        if self.format == 0 || self.format > SNAPSHOT_META_FORMAT {
            return Err(format!(
                "snapshot meta format {} is not one this keel-sidecar reads (1 to {SNAPSHOT_META_FORMAT}): it was written by \
                 a newer release; upgrade this node's sidecar",
                self.format
            ));
        }
        let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|c| c.is_ascii_hexdigit());
        if !hex(&self.rdb_sha256, 64) || !hex(&self.stream_sha256, 64) {
            return Err("snapshot meta: checksums must be 64 hex characters".into());
        }
        if !hex(&self.replid, 40) || !hex(&self.origin_replid, 40) {
            return Err("snapshot meta: replication ids must be 40 hex characters".into());
        }
        if self.seq == 0 || self.offset < self.origin_offset {
            return Err(format!("snapshot meta: seq {} / offset {} out of range", self.seq, self.offset));
        }
        if self.key.is_empty() || self.key.contains("..") {
            return Err(format!("snapshot meta: bad object key {:?}", self.key));
        }
        Ok(())
    }

    /// Where its metadata document lives, beside the RDB.
    pub fn meta_key(&self) -> String {
        meta_key_of(&self.key)
    }
}

/// The object key of a new snapshot's RDB.
pub fn object_key(stream: &str, seq: u64, id: &str) -> String {
    format!("{stream}/{seq:020}-{id}.rdb")
}

pub fn meta_key_of(rdb_key: &str) -> String {
    format!("{}.json", rdb_key.strip_suffix(".rdb").unwrap_or(rdb_key))
}

/// The RDB format version from a file's first bytes (`REDIS0010` → 10;
/// Valkey 9 writes `VALKEY080` and up).
pub fn rdb_version(head: &[u8]) -> Result<u32, String> {
    let digits = if head.starts_with(b"REDIS") && head.len() >= 9 {
        &head[5..9]
    } else if head.starts_with(b"VALKEY") && head.len() >= 9 {
        &head[6..9]
    } else {
        return Err("not an RDB file (no REDIS/VALKEY magic)".into());
    };
    std::str::from_utf8(digits).ok().and_then(|d| d.parse().ok()).ok_or_else(|| "RDB version is not a number".into())
}

/// The running stream checksum (see `SnapshotMeta::stream_sha256`), fed
/// bytes by their stream offset: bytes it already has are skipped (a feed
/// that resent them), a gap makes it unusable.
#[derive(Clone)]
pub struct StreamSum {
    h: Sha256,
    /// The offset of the next byte to take (None: the first bytes fed).
    at: Option<u64>,
    gap: Option<(u64, u64)>,
}

impl StreamSum {
    pub fn after(previous: Option<&str>, at: Option<u64>) -> StreamSum {
        let mut h = Sha256::new();
        h.update(previous.unwrap_or("").as_bytes());
        StreamSum { h, at, gap: None }
    }

    pub fn feed_at(&mut self, start: u64, bytes: &[u8]) {
        let at = *self.at.get_or_insert(start);
        if start > at {
            self.gap.get_or_insert((at, start));
            return;
        }
        let skip = (at - start).min(bytes.len() as u64) as usize;
        self.h.update(&bytes[skip..]);
        self.at = Some(at.max(start + bytes.len() as u64));
    }

    pub fn check(&self) -> Result<(), String> {
        match self.gap {
            Some((at, start)) => Err(format!("stream checksum: bytes {at}..{start} were never seen")),
            None => Ok(()),
        }
    }

    pub fn hex(&self) -> String {
        hex(&self.h.clone().finalize())
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// SHA-256 of a file, hex, and its length; read in bounded chunks.
pub async fn file_sha256(path: &Path) -> Result<(String, u64), String> {
    let mut f = tokio::fs::File::open(path).await.map_err(|e| format!("open {}: {e}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; HASH_CHUNK_BYTES];
    let mut n_total = 0u64;
    loop {
        let n = f.read(&mut buf).await.map_err(|e| format!("read {}: {e}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        n_total += n as u64;
    }
    Ok((hex(&h.finalize()), n_total))
}

/// The snapshot store.
#[derive(Clone)]
pub struct SnapshotStore {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    /// How it was configured, for messages.
    pub spec: String,
}

impl std::fmt::Debug for SnapshotStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SnapshotStore({})", self.spec)
    }
}

fn store_err(what: &str, key: &str, e: impl std::fmt::Display) -> String {
    format!("snapshot store: {what} {key}: {e}")
}

impl SnapshotStore {
    /// `s3://bucket[/prefix]` (endpoint and credentials from `AWS_*`
    /// variables) or a local directory (created if missing).
    pub fn open(spec: &str) -> Result<SnapshotStore, String> {
        if let Some(rest) = spec.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(format!("--store {spec:?}: no bucket name"));
            }
            let s3 = object_store::aws::AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .build()
                .map_err(|e| format!("--store {spec:?}: {e}"))?;
            return Ok(SnapshotStore { store: Arc::new(s3), prefix: prefix.trim_matches('/').to_string(), spec: spec.into() });
        }
        if spec.contains("://") {
            return Err(format!("--store {spec:?}: only s3:// URLs and local directories are supported"));
        }
        let dir = spec.strip_prefix("file:").unwrap_or(spec);
        if dir.is_empty() {
            return Err("--store is empty".into());
        }
        std::fs::create_dir_all(dir).map_err(|e| format!("--store {dir}: {e}"))?;
        let fs = object_store::local::LocalFileSystem::new_with_prefix(dir).map_err(|e| format!("--store {dir}: {e}"))?;
        Ok(SnapshotStore { store: Arc::new(fs), prefix: String::new(), spec: spec.into() })
    }

    fn path(&self, key: &str) -> ObjPath {
        if self.prefix.is_empty() { ObjPath::from(key) } else { ObjPath::from(format!("{}/{key}", self.prefix)) }
    }

    /// Uploads a file in parts (memory: `UPLOAD_PARTS_IN_FLIGHT` parts).
    pub async fn upload_file(&self, key: &str, file: &Path) -> Result<u64, String> {
        let upload = self.store.put_multipart(&self.path(key)).await.map_err(|e| store_err("start upload of", key, e))?;
        let mut w = WriteMultipart::new_with_chunk_size(upload, UPLOAD_PART_BYTES);
        let mut f = tokio::fs::File::open(file).await.map_err(|e| format!("open {}: {e}", file.display()))?;
        let mut buf = vec![0u8; UPLOAD_PART_BYTES];
        let mut total = 0u64;
        let size = tokio::fs::metadata(file).await.ok().map(|m| m.len());
        let mut progress = crate::progress::Progress::new(size, std::time::Instant::now());
        loop {
            let n = match f.read(&mut buf).await {
                Ok(n) => n,
                Err(e) => {
                    let _ = w.abort().await;
                    return Err(format!("read {}: {e}", file.display()));
                }
            };
            if n == 0 {
                break;
            }
            if let Err(e) = w.wait_for_capacity(UPLOAD_PARTS_IN_FLIGHT).await {
                let _ = w.abort().await;
                return Err(store_err("upload", key, e));
            }
            w.write(&buf[..n]);
            total += n as u64;
            if let Some(line) = progress.advance(n as u64, std::time::Instant::now()) {
                tracing::info!(%key, progress = %line, "uploading a snapshot");
            }
        }
        w.finish().await.map_err(|e| store_err("finish upload of", key, e))?;
        Ok(total)
    }

    pub async fn put_small(&self, key: &str, bytes: Vec<u8>) -> Result<(), String> {
        self.store.put(&self.path(key), bytes.into()).await.map(|_| ()).map_err(|e| store_err("put", key, e))
    }

    pub async fn get_small(&self, key: &str, limit: usize) -> Result<Vec<u8>, String> {
        let r = self.store.get(&self.path(key)).await.map_err(|e| store_err("get", key, e))?;
        if r.meta.size as usize > limit {
            return Err(store_err("get", key, format!("{} bytes is over the {limit}-byte limit", r.meta.size)));
        }
        Ok(r.bytes().await.map_err(|e| store_err("get", key, e))?.to_vec())
    }

    /// The object's size and its bytes, as a stream of chunks.
    pub async fn stream(&self, key: &str) -> Result<(u64, BoxStream<'static, Result<Bytes, String>>), String> {
        let r = self.store.get(&self.path(key)).await.map_err(|e| store_err("get", key, e))?;
        let size = r.meta.size;
        let k = key.to_string();
        Ok((size, r.into_stream().map(move |c| c.map_err(|e| store_err("read", &k, e))).boxed()))
    }

    /// Downloads an object into `dest`; returns its SHA-256 (hex) and length.
    pub async fn download(&self, key: &str, dest: &Path) -> Result<(String, u64), String> {
        let (size, mut chunks) = self.stream(key).await?;
        let mut f = tokio::fs::File::create(dest).await.map_err(|e| format!("create {}: {e}", dest.display()))?;
        let mut h = Sha256::new();
        let mut n = 0u64;
        let mut progress = crate::progress::Progress::new(Some(size), std::time::Instant::now());
        while let Some(c) = chunks.next().await {
            let c = c?;
            h.update(&c);
            n += c.len() as u64;
            if let Some(line) = progress.advance(c.len() as u64, std::time::Instant::now()) {
                tracing::info!(%key, progress = %line, "downloading a snapshot");
            }
            f.write_all(&c).await.map_err(|e| format!("write {}: {e}", dest.display()))?;
        }
        f.sync_all().await.map_err(|e| format!("sync {}: {e}", dest.display()))?;
        Ok((hex(&h.finalize()), n))
    }

    pub async fn delete(&self, key: &str) -> Result<(), String> {
        match self.store.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(store_err("delete", key, e)),
        }
    }

    /// Keys of the objects under `<stream>/`, sorted.
    pub async fn list(&self, stream: &str) -> Result<Vec<String>, String> {
        let prefix = self.path(stream);
        let mut out = Vec::new();
        let mut l = self.store.list(Some(&prefix));
        while let Some(m) = l.next().await {
            let m = m.map_err(|e| store_err("list", stream, e))?;
            let full = m.location.to_string();
            let key = if self.prefix.is_empty() { full } else { full.strip_prefix(&format!("{}/", self.prefix)).unwrap_or(&full).to_string() };
            out.push(key);
        }
        out.sort();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> SnapshotMeta {
        SnapshotMeta {
            format: SNAPSHOT_META_FORMAT,
            stream: "shard-1".into(),
            seq: 42,
            offset: 1000,
            replid: "a".repeat(40),
            origin_replid: "b".repeat(40),
            origin_offset: 1,
            engine: "redis".into(),
            engine_version: "7.0.15".into(),
            rdb_version: 10,
            rdb_bytes: 123,
            rdb_sha256: "c".repeat(64),
            digest: "d".repeat(40),
            stream_sha256: "e".repeat(64),
            created_unix_ms: 1,
            key: object_key("shard-1", 42, "x"),
        }
    }

    #[test]
    fn meta_round_trips_and_bad_ones_are_refused() {
        let m = meta();
        assert_eq!(SnapshotMeta::decode(&m.encode()).unwrap(), m);
        assert_eq!(m.meta_key(), "shard-1/00000000000000000042-x.json");
        for bad in [
            SnapshotMeta { rdb_sha256: "zz".into(), ..meta() },
            SnapshotMeta { replid: "short".into(), ..meta() },
            SnapshotMeta { seq: 0, ..meta() },
            SnapshotMeta { offset: 0, ..meta() },
            SnapshotMeta { key: "../etc".into(), ..meta() },
        ] {
            assert!(SnapshotMeta::decode(&bad.encode()).is_err(), "{bad:?}");
        }
        assert!(SnapshotMeta::decode(b"{not json").unwrap_err().contains("unreadable"));
        assert!(SnapshotMeta::decode(&vec![b' '; MAX_META_BYTES + 1]).unwrap_err().contains("limit"));
    }

    /// A meta as the first format wrote it (kept from a real run, before
    /// metas named their format) still reads, as format 1; a newer format
    /// is refused with what to do.
    #[test]
    fn older_metas_read_and_newer_ones_are_refused() {
        let kept = include_bytes!("../../tests/fixtures/format-1/snapshot-meta.json");
        let m = SnapshotMeta::decode(kept).unwrap();
        assert_eq!((m.format, m.seq, m.offset, m.rdb_version), (1, 1432, 181611, 10));
        assert_eq!(m.engine_version, "7.0.15");
        let newer = SnapshotMeta { format: SNAPSHOT_META_FORMAT + 1, ..meta() };
        let e = SnapshotMeta::decode(&newer.encode()).unwrap_err();
        assert!(e.contains("newer release") && e.contains("upgrade"), "{e}");
        assert!(SnapshotMeta::decode(&SnapshotMeta { format: 0, ..meta() }.encode()).is_err());
    }

    #[test]
    fn rdb_versions_are_read_from_the_magic() {
        assert_eq!(rdb_version(b"REDIS0010\xfa").unwrap(), 10);
        assert_eq!(rdb_version(b"VALKEY080").unwrap(), 80);
        assert!(rdb_version(b"HELLO").is_err());
        assert!(rdb_version(b"REDISxxxx").is_err());
    }

    #[test]
    fn the_stream_sum_chains_and_takes_each_byte_once() {
        let mut a = StreamSum::after(None, None);
        a.feed_at(10, b"abc");
        let mut b = StreamSum::after(None, Some(10));
        b.feed_at(10, b"ab");
        b.feed_at(11, b"bc");
        b.feed_at(10, b"a");
        assert_eq!(a.hex(), b.hex(), "how bytes are split or resent does not matter");
        let mut c = StreamSum::after(Some(&a.hex()), Some(13));
        c.feed_at(13, b"d");
        assert_ne!(c.hex(), a.hex());
        assert_eq!(a.hex().len(), 64);
        c.check().unwrap();
        c.feed_at(20, b"x");
        assert!(c.check().unwrap_err().contains("14..20"));
    }

    #[tokio::test]
    async fn a_local_store_round_trips_files_in_parts() {
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::open(dir.path().join("store").to_str().unwrap()).unwrap();
        let src = dir.path().join("src");
        let body: Vec<u8> = (0..(UPLOAD_PART_BYTES * 2 + 17)).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&src, &body).unwrap();
        assert_eq!(store.upload_file("s/1.rdb", &src).await.unwrap(), body.len() as u64);
        let dst = dir.path().join("dst");
        let (sum, n) = store.download("s/1.rdb", &dst).await.unwrap();
        assert_eq!(n, body.len() as u64);
        assert_eq!(sum, file_sha256(&src).await.unwrap().0);
        assert_eq!(std::fs::read(&dst).unwrap(), body);
        store.put_small("s/1.json", b"{}".to_vec()).await.unwrap();
        assert_eq!(store.list("s").await.unwrap(), vec!["s/1.json".to_string(), "s/1.rdb".to_string()]);
        store.delete("s/1.rdb").await.unwrap();
        store.delete("s/1.rdb").await.unwrap();
        assert!(store.download("s/1.rdb", &dst).await.is_err());
        assert!(SnapshotStore::open("gs://x").is_err());
        assert!(SnapshotStore::open("s3:///x").is_err());
    }
}
