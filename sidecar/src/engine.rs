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
        let mut parts = version.split('.').map(|p| p.parse::<u32>().ok());
        let version = (parts.next()??, parts.next().flatten().unwrap_or(0), parts.next().flatten().unwrap_or(0));
        Some(Engine { name: name.into(), version })
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
        Engine::from_info(&format!("{}_version:{v}\n", name))
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
        let own = self.rdb_version();
        let ok = match self.name.as_str() {
            "valkey" if own >= VALKEY_OWN_RDB => rdb <= VALKEY_READS_REDIS_UP_TO || (VALKEY_OWN_RDB..=own).contains(&rdb),
            _ => rdb <= own && rdb < VALKEY_OWN_RDB,
        };
        if ok {
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
        let e = pick_builder(&servers, Some(80), &[r70.clone()]).unwrap_err();
        assert!(e.contains("redis/7.0.15") && e.contains("RDB version 80") && e.contains("--redis-server"), "{e}");
        // One server, every node on it: that one.
        assert_eq!(pick_builder(&[r70.clone()], None, &[r70.clone(), r70.clone()]), Ok(0));
        assert!(pick_builder(&[v9.clone()], None, &[r70.clone()]).is_err());
        // No member known: the newest server.
        assert_eq!(pick_builder(&servers, None, &[]), Ok(0));
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

        #[test]
        fn from_info_never_panics(s in ".{0,120}") {
            let _ = Engine::from_info(&s);
        }
    }
}
