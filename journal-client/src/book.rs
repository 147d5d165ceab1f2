//! The journal nodes a client knows (its address book), decided without
//! I/O: the client library (client.rs) keeps one and follows the journal's
//! membership through it, so a client started with any reachable member
//! keeps working while nodes are added, removed and replaced.
//!
//! - Slots are indices callers hold while they retry; a slot keeps its
//!   address until a newer membership no longer lists it and its room is
//!   needed for an address that one lists (at most `MAX_ENDPOINTS`).
//! - Sources: the membership in a node's `Status` answer (the newest by its
//!   log index wins: a removed node may still tell an old one), and the
//!   leader address a `not-leader` answer names.
//! - Before any membership is learned every slot is tried; after, only the
//!   slots the newest membership lists (and hinted leaders).

/// Most journal addresses a client keeps.
pub const MAX_ENDPOINTS: usize = 16;

#[derive(Debug, Clone)]
pub struct Book {
    slots: Vec<String>,
    /// Per slot: tried in rotation.
    live: Vec<bool>,
    /// Log index of the newest membership learned (None: none yet).
    index: Option<u64>,
}

impl Book {
    /// `configured` must be non-empty (the caller checks); duplicates and
    /// addresses past `MAX_ENDPOINTS` are dropped.
    pub fn new(configured: &[String]) -> Book {
        let mut slots: Vec<String> = Vec::new();
        for e in configured {
            if !slots.contains(e) && slots.len() < MAX_ENDPOINTS {
                slots.push(e.clone());
            }
        }
        let live = vec![true; slots.len()];
        Book { slots, live, index: None }
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn addr(&self, i: usize) -> &str {
        &self.slots[i]
    }

    /// The slots tried in rotation.
    pub fn live(&self) -> Vec<usize> {
        (0..self.slots.len()).filter(|i| self.live[*i]).collect()
    }

    /// Learns the membership `members` (addresses) stored at log `index`.
    /// Returns the slots whose address changed (their connections must be
    /// dropped). Older or empty memberships change nothing.
    pub fn learn(&mut self, index: u64, members: &[String]) -> Vec<usize> {
        if members.is_empty() || self.index.is_some_and(|known| index <= known) {
            return Vec::new();
        }
        self.index = Some(index);
        let mut changed = Vec::new();
        for m in members.iter().take(MAX_ENDPOINTS) {
            if self.slots.contains(m) {
                continue;
            }
            if self.slots.len() < MAX_ENDPOINTS {
                self.slots.push(m.clone());
                self.live.push(true);
            } else if let Some(free) = (0..self.slots.len()).find(|s| !members.contains(&self.slots[*s])) {
                self.slots[free] = m.clone();
                changed.push(free);
            }
        }
        for s in 0..self.slots.len() {
            self.live[s] = members.contains(&self.slots[s]);
        }
        changed
    }

    /// The slot of the leader a `not-leader` answer named, added if new
    /// (None: no room for it). Returns the slot and whether its address
    /// changed.
    pub fn hint(&mut self, addr: &str) -> Option<(usize, bool)> {
        if let Some(i) = self.slots.iter().position(|s| s == addr) {
            self.live[i] = true;
            return Some((i, false));
        }
        if self.slots.len() < MAX_ENDPOINTS {
            self.slots.push(addr.to_string());
            self.live.push(true);
            return Some((self.slots.len() - 1, false));
        }
        let free = (0..self.slots.len()).find(|s| !self.live[*s])?;
        self.slots[free] = addr.to_string();
        self.live[free] = true;
        Some((free, true))
    }

    /// The live slot after `i` in rotation (`i` itself if it is the only
    /// one; the first live slot if `i` is not live).
    pub fn next(&self, i: usize) -> usize {
        let live = self.live();
        match live.iter().position(|s| *s > i) {
            Some(p) => live[p],
            None => live.first().copied().unwrap_or(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn addrs(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_replacement_is_followed() {
        let mut b = Book::new(&addrs(&["a:1", "b:1", "c:1"]));
        assert_eq!(b.live(), [0, 1, 2]);
        // d joins, then c leaves.
        assert!(b.learn(5, &addrs(&["a:1", "b:1", "c:1", "d:1"])).is_empty());
        assert_eq!(b.live(), [0, 1, 2, 3]);
        b.learn(9, &addrs(&["a:1", "b:1", "d:1"]));
        assert_eq!(b.live(), [0, 1, 3]);
        assert_eq!(b.next(1), 3);
        assert_eq!(b.next(3), 0);
        assert_eq!(b.next(2), 3, "from a slot that left, the next live one");
        // A removed node still answering with its old membership is ignored.
        b.learn(5, &addrs(&["a:1", "b:1", "c:1", "d:1"]));
        assert_eq!(b.live(), [0, 1, 3]);
        // A hint names a leader not seen yet.
        assert_eq!(b.hint("e:1"), Some((4, false)));
        assert_eq!(b.addr(4), "e:1");
    }

    #[test]
    fn slots_are_bounded_and_reused() {
        let mut b = Book::new(&addrs(&["a:1"]));
        let many: Vec<String> = (0..MAX_ENDPOINTS + 4).map(|i| format!("n{i}:1")).collect();
        b.learn(1, &many[..MAX_ENDPOINTS]);
        assert_eq!(b.len(), MAX_ENDPOINTS);
        // "a:1" (slot 0) is not a member any more: its room is reused.
        let changed = b.learn(2, &many[4..4 + MAX_ENDPOINTS]);
        assert_eq!(b.len(), MAX_ENDPOINTS);
        assert!(!changed.is_empty());
        for m in &many[4..4 + MAX_ENDPOINTS] {
            assert!(b.live().iter().any(|s| b.addr(*s) == m), "{m} is live");
        }
    }

    proptest! {
        /// Whatever is learned and hinted, in any order: at most
        /// MAX_ENDPOINTS slots, never two slots with one address, at least
        /// one live slot, and after a newest membership every member that
        /// fits has a live slot.
        #[test]
        fn the_book_stays_sound(
            steps in proptest::collection::vec((0u64..20, proptest::collection::vec(0u8..24, 0..10), any::<bool>()), 1..30)
        ) {
            let mut b = Book::new(&addrs(&["n0:1"]));
            let mut newest: Option<(u64, Vec<String>)> = None;
            for (index, ids, is_hint) in steps {
                let members: Vec<String> = ids.iter().map(|i| format!("n{i}:1")).collect();
                if is_hint {
                    if let Some(m) = members.first() {
                        if let Some((s, _)) = b.hint(m) { prop_assert_eq!(b.addr(s), m.as_str()); }
                    }
                } else {
                    b.learn(index, &members);
                    let mut dedup = members.clone();
                    dedup.sort();
                    dedup.dedup();
                    if !members.is_empty() && newest.as_ref().is_none_or(|(i, _)| index > *i) {
                        newest = Some((index, dedup));
                    }
                    if let Some((i, m)) = &newest {
                        if *i == index && m.len() <= MAX_ENDPOINTS {
                            for a in m {
                                prop_assert!(b.live().iter().any(|s| b.addr(*s) == a));
                            }
                        }
                    }
                }
                prop_assert!(b.len() <= MAX_ENDPOINTS);
                let mut seen = std::collections::BTreeSet::new();
                for s in 0..b.len() { prop_assert!(seen.insert(b.addr(s).to_string())); }
                prop_assert!(!b.live().is_empty());
            }
        }
    }
}
