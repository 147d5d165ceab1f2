//! Which RDB files a node's server can load: the upgrade protection of a
//! deployment whose nodes run different engines (Redis 7.0 and Valkey 9.1,
//! say, during a rolling upgrade).
//!
//! A replica is fed a base (a published snapshot, or the stream's base RDB)
//! before the stream. A server handed an RDB it cannot load fails its
//! sync over and over, so the feeder checks first (`Engine::can_load`) and
//! refuses instead: the node does not consume the stream and never stands
//! for election while refused (as with a stalled feed), and `INFO keel`
//! says why (`feed_stalled_reason`). Upgrading goes replicas first: a
//! newer engine loads an older one's RDB; the reverse is refused.
//!
//! Every journal record names its writer (`Writer`: the leading node's
//! engine, its version and the RDB version it writes; record.rs), and the
//! same rule applies per record: a server is fed a record only if it loads
//! its writer's RDB (`WriterCheck`, which caches the last writer that
//! passed, so the check costs a comparison per record). A Redis 7.0 replica
//! behind a Valkey 9.1 primary stops before the first record Valkey wrote,
//! whatever the base; the refusal lifts once its server runs an engine that
//! loads it.
//!
//! Elections (`may_stand`): a node whose engine writes an RDB the stream's
//! latest writer cannot load (a Valkey 9.1 replica in a Redis 7.0
//! deployment) does not stand for election by itself: leading, it would
//! strand every node still on the older engine (they refuse its records).
//! It stands only when no other live member runs such an engine, or when
//! the primary is handed to it by name (`FAILOVER TO`, handover.rs) -- the
//! operator's step of a rolling upgrade, replicas first.
//!
//! RDB versions by engine (from their sources' `RDB_VERSION`): Redis 7.0
//! writes 10, 7.2 writes 11, 7.4 and later 12; Valkey 7.2 and 8 write 11,
//! Valkey 9 writes 80 (its own numbering, magic `VALKEY`). Valkey loads
//! Redis's up to 11 and its own from 80 up to its version's; Redis never
//! loads Valkey's 80 and up. Pure.

/// A server's engine, from its `INFO server`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Engine {
    /// `redis` or `valkey`.
    pub name: String,
    /// major, minor, patch.
    pub version: (u32, u32, u32),
}

/// First RDB version of Valkey's own numbering.
const VALKEY_OWN_RDB: u32 = 80;
/// The newest RDB version Valkey loads from Redis.
const VALKEY_READS_REDIS_UP_TO: u32 = 11;

impl Engine {
    /// From an `INFO server` text (other sections may be in it too).
    pub fn from_info(info: &str) -> Option<Engine> {
        let field = |name: &str| info.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':')).map(str::trim);
        let (name, version) = match field("valkey_version") {
            Some(v) => ("valkey", v),
            None => ("redis", field("redis_version")?),
        };
        Some(Engine { name: name.into(), version: parse_version(version)? })
    }

    /// The engine as a member record names it: `redis/7.0.15`.
    pub fn tag(&self) -> String {
        let (a, b, c) = self.version;
        format!("{}/{a}.{b}.{c}", self.name)
    }

    /// `tag`'s text read back.
    pub fn from_tag(tag: &str) -> Option<Engine> {
        let (name, v) = tag.split_once('/')?;
        if name != "redis" && name != "valkey" {
            return None;
        }
        Some(Engine { name: name.into(), version: parse_version(v)? })
    }

    /// From a server binary's `--version` line: `Redis server v=7.0.15 …`,
    /// `Valkey server v=9.1.2 …`.
    pub fn from_version_output(out: &str) -> Option<Engine> {
        let name = out.split_whitespace().next()?.to_ascii_lowercase();
        let v = out.split_whitespace().find_map(|w| w.strip_prefix("v="))?;
        Engine::from_tag(&format!("{name}/{v}"))
    }

    /// The RDB version this engine writes.
    pub fn rdb_version(&self) -> u32 {
        let (major, minor, _) = self.version;
        match self.name.as_str() {
            "valkey" if major >= 9 => VALKEY_OWN_RDB,
            "valkey" => 11,
            _ if (major, minor) >= (7, 4) => 12,
            _ if (major, minor) >= (7, 2) => 11,
            _ if major >= 7 => 10,
            _ => 9,
        }
    }

    /// Whether this engine loads an RDB file of version `rdb` (written by
    /// `writer`, for the reason's text); the refusal says what to do.
    pub fn can_load(&self, rdb: u32, writer: &str) -> Result<(), String> {
        if loads(&self.name, self.rdb_version(), rdb) {
            return Ok(());
        }
        let (a, b, c) = self.version;
        Err(format!(
            "{} {a}.{b}.{c} here cannot load RDB version {rdb} (from {writer}): not fed, never elected; upgrade this \
             server (replicas first, the primary last)",
            self.name
        ))
    }
}

/// `major[.minor[.patch]]` (a missing or unreadable minor or patch is 0).
fn parse_version(v: &str) -> Option<(u32, u32, u32)> {
    let mut parts = v.trim().split('.').map(|p| p.parse::<u32>().ok());
    Some((parts.next()??, parts.next().flatten().unwrap_or(0), parts.next().flatten().unwrap_or(0)))
}

/// Which of the snapshotter's `servers` builds the next snapshot: the
/// newest whose RDB every live member (`members`) loads and which loads
/// the previous snapshot (RDB version `prev_rdb`). During a rolling upgrade
/// that is the oldest engine's server, until every node runs the new one,
/// so the upgrade can still be abandoned. `None` and its reason when no
/// server fits.
pub fn pick_builder(servers: &[Engine], prev_rdb: Option<u32>, members: &[Engine]) -> Result<usize, String> {
    let fits = |s: &Engine| {
        prev_rdb.is_none_or(|r| s.can_load(r, "the previous snapshot").is_ok()) && members.iter().all(|m| m.can_load(s.rdb_version(), "").is_ok())
    };
    servers
        .iter()
        .enumerate()
        .filter(|(_, s)| fits(s))
        .max_by_key(|(i, s)| (s.rdb_version(), std::cmp::Reverse(*i)))
        .map(|(i, _)| i)
        .ok_or_else(|| {
            let names: Vec<String> = servers.iter().map(Engine::tag).collect();
            let nodes: Vec<String> = members.iter().map(Engine::tag).collect();
            format!(
                "none of the snapshotter's servers ({}) writes an RDB every node ({}) loads{}: give it the oldest node's \
                 server too (--redis-server, repeated)",
                names.join(", "),
                nodes.join(", "),
                prev_rdb.map(|r| format!(" and loads the previous snapshot (RDB version {r})")).unwrap_or_default()
            )
        })
}

/// Whether an engine named `name` that writes RDB version `own` loads an
/// RDB of version `rdb`: the one rule behind `can_load` and `may_stand`.
fn loads(name: &str, own: u32, rdb: u32) -> bool {
    match name {
        "valkey" if own >= VALKEY_OWN_RDB => rdb <= VALKEY_READS_REDIS_UP_TO || (VALKEY_OWN_RDB..=own).contains(&rdb),
        _ => rdb <= own && rdb < VALKEY_OWN_RDB,
    }
}

/// Longest engine name a `Writer` carries (`valkey` is 6 bytes).
pub const MAX_ENGINE_NAME_BYTES: usize = 15;

/// The engine that wrote a record, as the record carries it (record.rs):
/// its name, version, and the RDB version it writes. The RDB version is
/// carried, not looked up, so a reader knows it even for a release newer
/// than its own table. Fixed size and `Copy`: the feeder compares it per
/// record without allocating.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Writer {
    name: [u8; MAX_ENGINE_NAME_BYTES],
    name_len: u8,
    /// major, minor, patch.
    pub version: [u16; 3],
    pub rdb_version: u16,
}

impl Writer {
    /// `None` unless `name` is 1..=`MAX_ENGINE_NAME_BYTES` bytes of
    /// lowercase ASCII letters and digits.
    pub fn new(name: &str, version: [u16; 3], rdb_version: u16) -> Option<Writer> {
        let b = name.as_bytes();
        if b.is_empty() || b.len() > MAX_ENGINE_NAME_BYTES || !b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()) {
            return None;
        }
        let mut w = Writer { name: [0; MAX_ENGINE_NAME_BYTES], name_len: b.len() as u8, version, rdb_version };
        w.name[..b.len()].copy_from_slice(b);
        Some(w)
    }

    /// The tag a server running `engine` stamps on the records it writes
    /// (version parts past `u16::MAX`, which no release has, are capped).
    pub fn of(engine: &Engine) -> Option<Writer> {
        let (a, b, c) = engine.version;
        let cap = |v: u32| u16::try_from(v).unwrap_or(u16::MAX);
        Writer::new(&engine.name, [cap(a), cap(b), cap(c)], cap(engine.rdb_version()))
    }

    pub fn name(&self) -> &str {
        std::str::from_utf8(&self.name[..self.name_len as usize]).expect("checked ASCII in Writer::new")
    }
}

/// `valkey 9.1.0`, as reasons name it.
impl std::fmt::Display for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [a, b, c] = self.version;
        write!(f, "{} {a}.{b}.{c}", self.name())
    }
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Writer({self}, RDB {})", self.rdb_version)
    }
}

/// The feeder's per-record check, with its cache: the last writer that
/// passed under the local engine as it was then (`generation` counts the
/// local engine's changes). Plain state; the feeder asks `cached` for every
/// record and only on a miss runs `Engine::can_load` and says `passed`.
#[derive(Debug, Default, Clone)]
pub struct WriterCheck {
    passed: Option<(u64, Writer)>,
}

impl WriterCheck {
    /// Whether a record `writer` wrote is known to load under the local
    /// engine of `generation` (no writer named: nothing to check).
    pub fn cached(&self, generation: u64, writer: Option<&Writer>) -> bool {
        match writer {
            None => true,
            Some(w) => self.passed == Some((generation, *w)),
        }
    }

    /// The local engine of `generation` loads what `writer` writes.
    pub fn passed(&mut self, generation: u64, writer: Writer) {
        self.passed = Some((generation, writer));
    }

    /// Whether `local` may be fed a record `writer` wrote (at record
    /// `seq`, for the reason's text); the refusal says what to do.
    pub fn check(local: &Engine, seq: u64, writer: &Writer) -> Result<(), String> {
        local.can_load(u32::from(writer.rdb_version), &format!("{writer}, which wrote record {seq}"))
    }
}

/// Whether a node whose server runs `local` may stand for election by
/// itself (not handed the primary by name) on a stream whose latest records
/// `writer` wrote (`None`: not known, as for records of the first format),
/// the other live members running `others` (an entry is `None` for a member
/// that has not said; `others` is `None` when not read: the writer alone
/// decides). It may when the writer loads its RDB (its records will feed
/// every node like the writer), or else when every other live member's
/// engine loads it (no node is stranded); otherwise the reason. A local
/// engine not known yet is not held back.
pub fn may_stand(local: Option<&Engine>, writer: Option<&Writer>, others: Option<&[Option<Engine>]>) -> Result<(), String> {
    let Some(local) = local else { return Ok(()) };
    let own = local.rdb_version();
    if writer.is_some_and(|w| loads(w.name(), u32::from(w.rdb_version), own)) {
        return Ok(());
    }
    if others.is_some_and(|others| others.iter().all(|o| o.as_ref().is_some_and(|o| loads(&o.name, o.rdb_version(), own)))) {
        return Ok(());
    }
    let (a, b, c) = local.version;
    let writer = writer.map_or("an engine not named".to_string(), |w| w.to_string());
    Err(format!(
        "{} {a}.{b}.{c} here writes RDB version {own}, which {writer} (the stream's writer) or another live node cannot load: \
         this node leads only when handed the primary (FAILOVER TO it), or once every node runs an engine that loads it",
        local.name
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn redis(v: &str) -> Engine {
        Engine::from_info(&format!("# Server\r\nredis_version:{v}\r\nredis_mode:standalone\r\n")).unwrap()
    }

    fn valkey(v: &str) -> Engine {
        Engine::from_info(&format!("# Server\r\nredis_version:7.2.4\r\nserver_name:valkey\r\nvalkey_version:{v}\r\n")).unwrap()
    }

    #[test]
    fn engines_are_read_from_info() {
        assert_eq!(redis("7.0.15"), Engine { name: "redis".into(), version: (7, 0, 15) });
        assert_eq!(valkey("9.1.0"), Engine { name: "valkey".into(), version: (9, 1, 0) });
        assert_eq!(Engine::from_info("# Server\r\nredis_version:8.0\r\n").unwrap().version, (8, 0, 0));
        assert_eq!(Engine::from_info("# Replication\r\nrole:master\r\n"), None);
        assert_eq!(Engine::from_info("redis_version:x.y\r\n"), None);
    }

    #[test]
    fn tags_round_trip() {
        for e in [redis("7.0.15"), valkey("9.1.2")] {
            assert_eq!(Engine::from_tag(&e.tag()), Some(e.clone()), "{}", e.tag());
        }
        assert_eq!(redis("7.0.15").tag(), "redis/7.0.15");
        for junk in ["", "redis", "keydb/6.0.0", "redis/x", "/7.0.0"] {
            assert_eq!(Engine::from_tag(junk), None, "{junk}");
        }
    }

    #[test]
    fn upgrades_load_and_downgrades_are_refused() {
        let (r70, r72, r74, v8, v9) = (redis("7.0.15"), redis("7.2.4"), redis("7.4.1"), valkey("8.0.2"), valkey("9.1.0"));
        assert_eq!([r70.rdb_version(), r72.rdb_version(), r74.rdb_version(), v8.rdb_version(), v9.rdb_version()], [10, 11, 12, 11, 80]);
        // Replicas first: the newer engine loads the older one's base.
        assert!(v9.can_load(r70.rdb_version(), "redis 7.0.15").is_ok());
        assert!(v9.can_load(r72.rdb_version(), "x").is_ok());
        assert!(r74.can_load(r70.rdb_version(), "x").is_ok());
        assert!(v9.can_load(v9.rdb_version(), "x").is_ok());
        // The reverse is refused, with the reason.
        let e = r70.can_load(v9.rdb_version(), "valkey 9.1.0").unwrap_err();
        assert!(e.contains("redis 7.0.15") && e.contains("RDB version 80") && e.contains("valkey 9.1.0"), "{e}");
        assert!(crate::stall::one_line(&e) == e, "fits INFO keel whole: {e}");
        assert!(r70.can_load(r72.rdb_version(), "x").is_err());
        assert!(v8.can_load(v9.rdb_version(), "x").is_err());
        assert!(v9.can_load(r74.rdb_version(), "x").is_err(), "Redis 7.4's RDB 12 is not Valkey's");
    }

    #[test]
    fn version_lines_name_the_engine() {
        assert_eq!(Engine::from_version_output("Redis server v=7.0.15 sha=00000000:0 malloc=jemalloc-5.3.0 bits=64"), Some(redis("7.0.15")));
        assert_eq!(Engine::from_version_output("Valkey server v=9.1.2 sha=00000000:1 malloc=libc bits=64"), Some(valkey("9.1.2")));
        assert_eq!(Engine::from_version_output("KeyDB server v=6.3.4"), None);
        assert_eq!(Engine::from_version_output(""), None);
    }

    #[test]
    fn snapshots_are_built_by_the_newest_server_every_node_loads() {
        let (r70, v9) = (redis("7.0.15"), valkey("9.1.2"));
        let servers = [v9.clone(), r70.clone()];
        // Mid-upgrade: a Redis 7.0 node is left, so Redis 7.0 builds.
        assert_eq!(pick_builder(&servers, Some(10), &[r70.clone(), v9.clone()]), Ok(1));
        // Every node upgraded: Valkey builds (it loads Redis's last snapshot).
        assert_eq!(pick_builder(&servers, Some(10), &[v9.clone(), v9.clone()]), Ok(0));
        // Back to Redis 7.0 after Valkey's snapshots: nothing fits, with why.
        let e = pick_builder(&servers, Some(80), std::slice::from_ref(&r70)).unwrap_err();
        assert!(e.contains("redis/7.0.15") && e.contains("RDB version 80") && e.contains("--redis-server"), "{e}");
        // One server, every node on it: that one.
        assert_eq!(pick_builder(std::slice::from_ref(&r70), None, &[r70.clone(), r70.clone()]), Ok(0));
        assert!(pick_builder(std::slice::from_ref(&v9), None, std::slice::from_ref(&r70)).is_err());
        // No member known: the newest server.
        assert_eq!(pick_builder(&servers, None, &[]), Ok(0));
    }

    #[test]
    fn writers_name_the_engine_its_version_and_rdb() {
        let w = Writer::of(&redis("7.0.15")).unwrap();
        assert_eq!((w.name(), w.version, w.rdb_version), ("redis", [7, 0, 15], 10));
        assert_eq!(w.to_string(), "redis 7.0.15");
        assert_eq!(Writer::of(&valkey("9.1.0")).unwrap().rdb_version, 80);
        assert_eq!(Writer::new("valkey", [9, 1, 0], 80), Writer::of(&valkey("9.1.0")));
        for bad in ["", "Redis", "red is", "a-b", "sixteen-letters!", "abcdefghijklmnop"] {
            assert_eq!(Writer::new(bad, [1, 0, 0], 9), None, "{bad:?}");
        }
        assert!(Writer::new(&"x".repeat(MAX_ENGINE_NAME_BYTES), [1, 0, 0], 9).is_some());
        let huge = Engine { name: "redis".into(), version: (70_000, 0, 1) };
        assert_eq!(Writer::of(&huge).unwrap().version, [u16::MAX, 0, 1], "capped, not wrapped");
    }

    #[test]
    fn a_record_is_fed_only_to_a_server_that_loads_its_writers_rdb() {
        let (r70, v9) = (redis("7.0.15"), valkey("9.1.0"));
        let (by_r70, by_v9) = (Writer::of(&r70).unwrap(), Writer::of(&v9).unwrap());
        assert!(WriterCheck::check(&v9, 7, &by_r70).is_ok(), "replicas first: Valkey follows a Redis primary");
        assert!(WriterCheck::check(&r70, 7, &by_r70).is_ok());
        let e = WriterCheck::check(&r70, 57, &by_v9).unwrap_err();
        assert!(e.contains("redis 7.0.15 here") && e.contains("RDB version 80") && e.contains("valkey 9.1.0, which wrote record 57"), "{e}");
        assert!(e.contains("upgrade this server"), "says what to do: {e}");
        assert!(crate::stall::one_line(&e) == e, "fits INFO keel whole: {e}");
        // An engine this release does not know is judged by the RDB version it states.
        let future = Writer::new("keeldb", [1, 0, 0], 10).unwrap();
        assert!(WriterCheck::check(&r70, 1, &future).is_ok());
        assert!(WriterCheck::check(&r70, 1, &Writer::new("keeldb", [1, 0, 0], 99).unwrap()).is_err());
    }

    #[test]
    fn the_check_is_cached_per_writer_and_local_engine() {
        let (by_r70, by_v9) = (Writer::of(&redis("7.0.15")).unwrap(), Writer::of(&valkey("9.1.0")).unwrap());
        let mut c = WriterCheck::default();
        assert!(c.cached(0, None), "a record of the first format names no writer");
        assert!(!c.cached(0, Some(&by_r70)));
        c.passed(0, by_r70);
        assert!(c.cached(0, Some(&by_r70)));
        assert!(!c.cached(0, Some(&by_v9)), "another writer is checked");
        assert!(!c.cached(1, Some(&by_r70)), "so is the same one once the local engine changed");
        c.passed(1, by_v9);
        assert!(c.cached(1, Some(&by_v9)) && !c.cached(1, Some(&by_r70)), "one writer kept: the last");
    }

    #[test]
    fn a_newer_engine_stands_only_where_nobody_is_stranded() {
        let (r70, r74, v9) = (redis("7.0.15"), redis("7.4.1"), valkey("9.1.0"));
        let by = |e: &Engine| Writer::of(e).unwrap();
        // The upgraded replica of a Redis 7.0 deployment does not stand…
        let e = may_stand(Some(&v9), Some(&by(&r70)), Some(&[Some(r70.clone())])).unwrap_err();
        assert!(e.contains("valkey 9.1.0 here") && e.contains("redis 7.0.15") && e.contains("FAILOVER TO"), "{e}");
        assert!(may_stand(Some(&v9), Some(&by(&r70)), Some(&[Some(v9.clone()), Some(r70.clone())])).is_err());
        assert!(may_stand(Some(&v9), Some(&by(&r70)), Some(&[Some(v9.clone()), None])).is_err(), "a member that has not said counts as older");
        // …unless every other live node loads its RDB (the old primary is gone).
        assert!(may_stand(Some(&v9), Some(&by(&r70)), Some(&[Some(v9.clone())])).is_ok());
        assert!(may_stand(Some(&v9), Some(&by(&r70)), Some(&[])).is_ok());
        // An older or equal engine always stands behind a newer writer (it is refused its records anyway, if it cannot load them).
        assert!(may_stand(Some(&r70), Some(&by(&v9)), Some(&[Some(r70.clone())])).is_ok());
        assert!(may_stand(Some(&v9), Some(&by(&v9)), Some(&[Some(r70.clone())])).is_ok());
        assert!(may_stand(Some(&r74), Some(&by(&r70)), Some(&[Some(r70.clone())])).is_err(), "Redis 7.4's RDB 12 is new to 7.0 too");
        // Members not read: the writer alone decides.
        assert!(may_stand(Some(&v9), Some(&by(&r70)), None).is_err());
        assert!(may_stand(Some(&v9), None, None).is_err());
        assert!(may_stand(Some(&r70), Some(&by(&r70)), None).is_ok());
        // Nothing known: not held back; a writer not named: the members decide.
        assert!(may_stand(None, Some(&by(&r70)), Some(&[Some(r70.clone())])).is_ok());
        assert!(may_stand(Some(&v9), None, Some(&[Some(r70.clone())])).is_err());
        assert!(may_stand(Some(&r70), None, Some(&[Some(r70.clone()), Some(v9.clone())])).is_ok());
    }

    proptest! {
        /// An engine always loads what it writes itself, and what any
        /// engine loads it never refuses for a smaller version of the same
        /// numbering.
        #[test]
        fn an_engine_loads_its_own(name in prop_oneof![Just("redis"), Just("valkey")], major in 6u32..12, minor in 0u32..6) {
            let e = Engine { name: name.into(), version: (major, minor, 0) };
            prop_assert!(e.can_load(e.rdb_version(), "itself").is_ok());
            prop_assert!(e.can_load(9, "an old redis").is_ok());
        }

        /// Whoever may stand behind a writer writes records every node
        /// on the writer's engine is fed; a node always stands behind its
        /// own engine's records.
        #[test]
        fn who_stands_strands_nobody_on_the_writers_engine(
            (ln, lmaj, lmin) in (prop_oneof![Just("redis"), Just("valkey")], 6u32..11, 0u32..6),
            (wn, wmaj, wmin) in (prop_oneof![Just("redis"), Just("valkey")], 6u32..11, 0u32..6),
        ) {
            let local = Engine { name: ln.into(), version: (lmaj, lmin, 0) };
            let writer = Engine { name: wn.into(), version: (wmaj, wmin, 0) };
            if may_stand(Some(&local), Some(&Writer::of(&writer).unwrap()), Some(&[Some(writer.clone())])).is_ok() {
                prop_assert!(WriterCheck::check(&writer, 1, &Writer::of(&local).unwrap()).is_ok(), "{local:?} stood behind {writer:?}");
            }
            prop_assert!(may_stand(Some(&local), Some(&Writer::of(&local).unwrap()), None).is_ok());
        }

        #[test]
        fn from_info_never_panics(s in ".{0,120}") {
            let _ = Engine::from_info(&s);
        }
    }
}
