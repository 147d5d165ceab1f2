//! Blocking pops (BLPOP, BLMOVE, BZPOPMIN, XREADGROUP … BLOCK, …) waiting
//! for data, kept by the module.
//!
//! Why: a blocking pop run by Redis itself answers the moment it pops, before
//! the pop is durable. The module instead tries the pop without blocking;
//! if nothing is there, the client is blocked by the module and waits here
//! on its keys. A write notification on a waited key marks it ready; right
//! after (a zero-delay timer, so the pop's effects are propagated before the
//! turn's replication offset is read) the waiters of ready keys retry their
//! pop in the order they started waiting. A pop that gets data becomes an
//! ordinary held reply (`holds.rs`): it leaves once the pop is durable.
//!
//! Life cycle: `add` → (`ready` → `take_ready` → retry) … → `remove` when it
//! popped, timed out, was fenced or its client left.
//!
//! Pure bookkeeping; the FFI layer runs the pops.

use std::collections::BTreeSet;
use std::collections::HashMap;
use std::collections::HashSet;

pub type WaiterId = u64;
pub type Db = i32;

#[derive(Debug)]
pub struct Waiters<T> {
    next_id: WaiterId,
    waiting: HashMap<WaiterId, (T, Db, Vec<Vec<u8>>)>,
    by_key: HashMap<(Db, Vec<u8>), BTreeSet<WaiterId>>,
    /// Keys written since the last retry (their waiters retry in id order,
    /// so the set's order does not matter).
    ready: HashSet<(Db, Vec<u8>)>,
}

impl<T> Default for Waiters<T> {
    fn default() -> Self {
        Waiters { next_id: 1, waiting: HashMap::new(), by_key: HashMap::new(), ready: HashSet::new() }
    }
}

impl<T> Waiters<T> {
    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    /// A client starts waiting on `keys` of `db`; ids grow, so they give
    /// the order clients started waiting in.
    pub fn add(&mut self, waiter: T, db: Db, keys: Vec<Vec<u8>>) -> WaiterId {
        let id = self.next_id;
        self.next_id += 1;
        for k in &keys {
            self.by_key.entry((db, k.clone())).or_default().insert(id);
        }
        self.waiting.insert(id, (waiter, db, keys));
        id
    }

    pub fn db_of(&self, id: WaiterId) -> Option<Db> {
        self.waiting.get(&id).map(|(_, db, _)| *db)
    }

    pub fn get(&self, id: WaiterId) -> Option<&T> {
        self.waiting.get(&id).map(|(w, _, _)| w)
    }

    /// Stops a waiter (it popped, timed out, or its client left).
    pub fn remove(&mut self, id: WaiterId) -> Option<T> {
        let (w, db, keys) = self.waiting.remove(&id)?;
        for k in keys {
            let key = (db, k);
            if let Some(set) = self.by_key.get_mut(&key) {
                set.remove(&id);
                if set.is_empty() {
                    self.by_key.remove(&key);
                }
            }
        }
        Some(w)
    }

    /// A key was written; true if someone waits on it (a retry is due).
    pub fn ready(&mut self, db: Db, key: &[u8]) -> bool {
        let k = (db, key.to_vec());
        if !self.by_key.contains_key(&k) {
            return false;
        }
        self.ready.insert(k);
        true
    }

    /// Every waited key of `db` (all databases: `None`) is ready (FLUSHDB,
    /// FLUSHALL, SWAPDB change keys without a notification per key).
    pub fn ready_db(&mut self, db: Option<Db>) -> bool {
        let keys: Vec<(Db, Vec<u8>)> = self.by_key.keys().filter(|(d, _)| db.is_none_or(|want| *d == want)).cloned().collect();
        let any = !keys.is_empty();
        self.ready.extend(keys);
        any
    }

    /// The waiters of every key marked ready, oldest first, each once.
    pub fn take_ready(&mut self) -> Vec<WaiterId> {
        let mut ids = BTreeSet::new();
        for k in self.ready.drain() {
            if let Some(set) = self.by_key.get(&k) {
                ids.extend(set.iter().copied());
            }
        }
        ids.into_iter().collect()
    }

    /// Every waiter (to fail them all when fenced).
    pub fn drain(&mut self) -> Vec<T> {
        self.by_key.clear();
        self.ready.clear();
        self.waiting.drain().map(|(_, (w, _, _))| w).collect()
    }
}

/// Commands that block when they find no data.
pub const BLOCKING: &[&str] = &["blpop", "brpop", "brpoplpush", "blmove", "blmpop", "bzpopmin", "bzpopmax", "bzmpop"];

/// Whether a command blocks: the list/zset pops always, XREAD/XREADGROUP
/// with a BLOCK option.
/// `args` is only read for XREAD/XREADGROUP (the filter passes them lazily,
/// so other commands cost no allocation).
pub fn blocks<'a>(name: &[u8], args: impl IntoIterator<Item = &'a [u8]>) -> bool {
    if BLOCKING.iter().any(|b| b.as_bytes() == name) {
        return true;
    }
    (name == b"xread" || name == b"xreadgroup") && args.into_iter().any(|a| a.eq_ignore_ascii_case(b"block"))
}

/// The keys a blocking command pops from (not BLMOVE's destination).
pub fn source_keys(argv: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let name = argv[0].to_ascii_lowercase();
    match name.as_slice() {
        b"brpoplpush" | b"blmove" => argv.get(1).cloned().into_iter().collect(),
        b"blmpop" | b"bzmpop" => {
            let n: usize = argv.get(2).and_then(|a| String::from_utf8_lossy(a).parse().ok()).unwrap_or(0);
            argv.iter().skip(3).take(n).cloned().collect()
        }
        b"xread" | b"xreadgroup" => match argv.iter().position(|a| a.eq_ignore_ascii_case(b"streams")) {
            Some(s) => {
                let n = (argv.len() - s - 1) / 2;
                argv[s + 1..s + 1 + n].to_vec()
            }
            None => Vec::new(),
        },
        _ => argv[1..argv.len().saturating_sub(1)].to_vec(),
    }
}

/// XREADGROUP's group name and its (key, id) pairs, parsed as Redis 7.0
/// parses them (options in any order); `None` for a command Redis refuses
/// with a syntax error (it is run, and answers that error itself).
pub fn xreadgroup_streams(argv: &[Vec<u8>]) -> Option<(Vec<u8>, Vec<(Vec<u8>, Vec<u8>)>)> {
    let is = |a: &[u8], w: &[u8]| a.eq_ignore_ascii_case(w);
    let (mut i, mut group) = (1usize, None);
    let streams = loop {
        let a = argv.get(i)?;
        let more = argv.len() - i - 1;
        if (is(a, b"block") || is(a, b"count")) && more >= 1 {
            i += 2;
        } else if is(a, b"group") && more >= 2 {
            group = Some(argv[i + 1].clone());
            i += 3;
        } else if is(a, b"noack") {
            i += 1;
        } else if is(a, b"streams") && more >= 1 {
            break &argv[i + 1..];
        } else {
            return None;
        }
    };
    if streams.len() % 2 != 0 {
        return None;
    }
    let n = streams.len() / 2;
    Some((group?, (0..n).map(|j| (streams[j].clone(), streams[n + j].clone())).collect()))
}

/// A stream entry id as XINFO prints it (`ms-seq`), or `ms` alone.
pub fn parse_stream_id(s: &[u8]) -> Option<(u64, u64)> {
    let s = std::str::from_utf8(s).ok()?;
    match s.split_once('-') {
        Some((ms, seq)) => Some((ms.parse().ok()?, seq.parse().ok()?)),
        None => Some((s.parse().ok()?, 0)),
    }
}

/// The command's own timeout in ms (0: forever).
pub fn timeout_ms(name: &[u8], argv: &[Vec<u8>]) -> i64 {
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let secs = |b: &[u8]| -> i64 {
        let s: f64 = text(b).parse().unwrap_or(0.0);
        if s <= 0.0 { 0 } else { ((s * 1000.0).ceil() as i64).max(1) }
    };
    match name {
        b"blmpop" | b"bzmpop" => argv.get(1).map(|a| secs(a)).unwrap_or(0),
        b"xread" | b"xreadgroup" => {
            let i = argv.iter().position(|a| a.eq_ignore_ascii_case(b"block"));
            i.and_then(|i| argv.get(i + 1)).and_then(|a| text(a).parse::<i64>().ok()).unwrap_or(0).max(0)
        }
        _ => argv.last().map(|a| secs(a)).unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<Vec<u8>> {
        s.split(' ').map(|w| w.as_bytes().to_vec()).collect()
    }

    #[test]
    fn xreadgroup_streams_are_parsed_as_redis_does() {
        let pairs = |v: &[(&str, &str)]| v.iter().map(|(k, i)| (k.as_bytes().to_vec(), i.as_bytes().to_vec())).collect::<Vec<_>>();
        assert_eq!(
            xreadgroup_streams(&words("XREADGROUP GROUP g c COUNT 3 BLOCK 0 NOACK STREAMS s1 s2 > 0")),
            Some((b"g".to_vec(), pairs(&[("s1", ">"), ("s2", "0")])))
        );
        // Options in any order, and names that look like options.
        assert_eq!(
            xreadgroup_streams(&words("XREADGROUP BLOCK 10 GROUP streams block STREAMS streams >")),
            Some((b"streams".to_vec(), pairs(&[("streams", ">")])))
        );
        for bad in ["XREADGROUP GROUP g c STREAMS s1 s2 >", "XREADGROUP STREAMS s >", "XREADGROUP GROUP g c BOGUS STREAMS s >", "XREADGROUP GROUP g", "XREADGROUP GROUP g c STREAMS"] {
            assert_eq!(xreadgroup_streams(&words(bad)), None, "{bad}");
        }
    }

    #[test]
    fn stream_ids_parse() {
        assert_eq!(parse_stream_id(b"1700000000000-5"), Some((1_700_000_000_000, 5)));
        assert_eq!(parse_stream_id(b"7"), Some((7, 0)));
        assert_eq!(parse_stream_id(b"0-0"), Some((0, 0)));
        for bad in ["", "-", "1-", "a-1", "1-2-3", ">"] {
            assert_eq!(parse_stream_id(bad.as_bytes()), None, "{bad}");
        }
    }

    fn k(s: &str) -> Vec<u8> {
        s.as_bytes().to_vec()
    }

    #[test]
    fn ready_keys_wake_their_waiters_oldest_first() {
        let mut w = Waiters::default();
        let a = w.add("a", 0, vec![k("l1"), k("l2")]);
        let b = w.add("b", 0, vec![k("l2")]);
        let c = w.add("c", 1, vec![k("l2")]);
        assert!(!w.ready(0, b"other"));
        assert!(w.ready(0, b"l2"));
        assert!(w.ready(0, b"l1"));
        assert_eq!(w.take_ready(), vec![a, b], "each once, in waiting order; db 1 not woken");
        assert!(w.take_ready().is_empty());
        assert_eq!(w.remove(a), Some("a"));
        assert!(w.ready(0, b"l2"));
        assert!(!w.ready(0, b"l1"), "nobody waits on l1 any more");
        assert_eq!(w.take_ready(), vec![b]);
        assert_eq!(w.remove(a), None);
        assert_eq!(w.get(c), Some(&"c"));
        assert!(w.ready_db(Some(1)));
        assert_eq!(w.take_ready(), vec![c]);
        assert!(!w.ready_db(Some(7)));
        assert!(w.ready_db(None));
        assert_eq!(w.take_ready(), vec![b, c]);
        assert_eq!(w.len(), 2);
    }

    fn argv(s: &str) -> Vec<Vec<u8>> {
        s.split(' ').map(k).collect()
    }

    #[test]
    fn commands_name_their_source_keys_and_timeouts() {
        assert_eq!(source_keys(&argv("BLPOP a b 0")), vec![k("a"), k("b")]);
        assert_eq!(source_keys(&argv("blmove src dst LEFT RIGHT 1.5")), vec![k("src")]);
        assert_eq!(source_keys(&argv("BLMPOP 0 2 a b LEFT COUNT 3")), vec![k("a"), k("b")]);
        assert_eq!(source_keys(&argv("XREADGROUP GROUP g c BLOCK 10 STREAMS s1 s2 > >")), vec![k("s1"), k("s2")]);
        assert_eq!(timeout_ms(b"blpop", &argv("BLPOP a 0")), 0);
        assert_eq!(timeout_ms(b"blpop", &argv("BLPOP a 0.0001")), 1);
        assert_eq!(timeout_ms(b"blmove", &argv("BLMOVE a b LEFT LEFT 1.5")), 1500);
        assert_eq!(timeout_ms(b"bzmpop", &argv("BZMPOP 2 1 z MIN")), 2000);
        assert_eq!(timeout_ms(b"xread", &argv("XREAD BLOCK 250 STREAMS s $")), 250);
        assert!(blocks(b"xread", [b"BLOCK".as_slice(), b"0"]));
        assert!(!blocks(b"xread", [b"STREAMS".as_slice(), b"s", b"0"]));
        assert!(blocks(b"brpop", []));
    }

    #[test]
    fn removed_waiters_are_not_woken_and_drain_empties() {
        let mut w = Waiters::default();
        let a = w.add(1, 0, vec![k("x")]);
        w.ready(0, b"x");
        w.remove(a);
        assert!(w.take_ready().is_empty());
        w.add(2, 0, vec![k("x")]);
        w.add(3, 0, vec![k("y")]);
        let mut all = w.drain();
        all.sort();
        assert_eq!(all, vec![2, 3]);
        assert!(w.is_empty());
        assert!(!w.ready(0, b"x"));
    }
}
