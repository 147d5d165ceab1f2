//! Rotating the control secret without a restart.
//!
//! Life cycle: at load the control user gets the file's secret (`current`).
//! Every `SECRET_POLL_MS` the module reads the file again and hands what it
//! read to `Rotation::seen`:
//! - the same secret: nothing changes;
//! - a different, valid secret (the checks of `control::check_secret`): it
//!   becomes `current` and is added to the user at once; the one it replaces
//!   is *retiring*: still accepted for `SECRET_GRACE_MS`, then removed
//!   (`Rotation::expire`). Connections already authenticated are never
//!   closed (Redis 7.0 and Valkey keep a user's open connections when its
//!   passwords change), so the sidecar's links stay up, and any link it
//!   opens meanwhile with either secret is accepted;
//! - an invalid file (missing, open to others, too short, several lines):
//!   nothing changes, and the refusal is logged once (again only if it
//!   changes, or after the file was valid in between).
//!
//! Invariant: the user always accepts `current`, and a secret stops being
//! accepted only once it has been retiring for `SECRET_GRACE_MS` (or is
//! pushed out by more than `MAX_RETIRING` newer rotations within the grace).
//! Plain struct, fed the file's contents and a monotonic clock; the Redis
//! side (the timer, `ACL SETUSER`) is in grants.rs.

use crate::control::Secret;

/// How often the secret file is read again.
pub const SECRET_POLL_MS: u64 = 1_000;
/// How long a replaced secret still authenticates (a sidecar that read the
/// file just before it changed reconnects with the old one meanwhile).
pub const SECRET_GRACE_MS: u64 = 10_000;
/// Most replaced secrets accepted at once (rotations faster than the
/// grace): beyond, the oldest is removed at once.
pub const MAX_RETIRING: usize = 2;

/// A change to make to the control user's passwords.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// `ACL SETUSER <user> >secret`.
    Add(Secret),
    /// `ACL SETUSER <user> <secret`.
    Remove(Secret),
}

/// What reading the file again came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// The file holds the current secret.
    Unchanged,
    /// A new secret: make these changes (additions first).
    Rotated(Vec<Change>),
    /// The file cannot be used: log this (once); nothing changes.
    Refused(String),
    /// Refused as before: already logged.
    RefusedAgain,
}

/// The control user's passwords over time.
#[derive(Debug)]
pub struct Rotation {
    current: Secret,
    /// Replaced secrets still accepted, oldest first, with the monotonic
    /// time (ms) at which each stops being accepted.
    retiring: Vec<(Secret, u64)>,
    /// The refusal logged last, while the file stays invalid.
    refused: Option<String>,
}

impl Rotation {
    /// Starts with the secret read at load.
    pub fn new(current: Secret) -> Rotation {
        Rotation { current, retiring: Vec::new(), refused: None }
    }

    /// Every secret the user must accept now: the current one first.
    pub fn passwords(&self) -> impl Iterator<Item = &Secret> {
        std::iter::once(&self.current).chain(self.retiring.iter().map(|(s, _)| s))
    }

    /// How many replaced secrets are still accepted.
    pub fn retiring(&self) -> usize {
        self.retiring.len()
    }

    /// The file's refusal while it is invalid (for `INFO keel`).
    pub fn refused(&self) -> Option<&str> {
        self.refused.as_deref()
    }

    /// The file was read at `now_ms` (`read`: `control::read_secret`'s
    /// answer).
    pub fn seen(&mut self, read: Result<Secret, String>, now_ms: u64) -> Seen {
        let secret = match read {
            Err(why) => {
                if self.refused.as_ref() == Some(&why) {
                    return Seen::RefusedAgain;
                }
                self.refused = Some(why.clone());
                return Seen::Refused(why);
            }
            Ok(s) => s,
        };
        self.refused = None;
        if secret == self.current {
            return Seen::Unchanged;
        }
        let mut changes = vec![Change::Add(secret.clone())];
        // A secret coming back while it retires is current again, not retiring.
        self.retiring.retain(|(s, _)| *s != secret);
        let old = std::mem::replace(&mut self.current, secret);
        self.retiring.push((old, now_ms + SECRET_GRACE_MS));
        while self.retiring.len() > MAX_RETIRING {
            let (s, _) = self.retiring.remove(0);
            changes.push(Change::Remove(s));
        }
        self.check();
        Seen::Rotated(changes)
    }

    /// Retiring secrets whose grace ended by `now_ms`: remove them.
    pub fn expire(&mut self, now_ms: u64) -> Vec<Change> {
        let mut removed = Vec::new();
        self.retiring.retain(|(s, until)| {
            if *until <= now_ms {
                removed.push(Change::Remove(s.clone()));
                false
            } else {
                true
            }
        });
        self.check();
        removed
    }

    fn check(&self) {
        assert!(self.retiring.len() <= MAX_RETIRING, "more retiring secrets than MAX_RETIRING");
        assert!(self.retiring.iter().all(|(s, _)| *s != self.current), "the current secret is never retiring");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::check_secret;

    fn s(text: &str) -> Secret {
        check_secret("f", text.as_bytes(), 0o600).unwrap()
    }

    const A: &str = "aaaaaaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbbbbbb";
    const C: &str = "cccccccccccccccccccc";
    const D: &str = "dddddddddddddddddddd";

    fn held(r: &Rotation) -> Vec<Secret> {
        r.passwords().cloned().collect()
    }

    #[test]
    fn the_same_file_changes_nothing() {
        let mut r = Rotation::new(s(A));
        for t in [0, SECRET_POLL_MS, 100 * SECRET_GRACE_MS] {
            assert_eq!(r.seen(Ok(s(A)), t), Seen::Unchanged);
            assert!(r.expire(t).is_empty());
        }
        assert_eq!(held(&r), [s(A)]);
    }

    #[test]
    fn a_new_secret_works_at_once_and_the_old_one_for_the_grace() {
        let mut r = Rotation::new(s(A));
        assert_eq!(r.seen(Ok(s(B)), 1_000), Seen::Rotated(vec![Change::Add(s(B))]));
        assert_eq!(held(&r), [s(B), s(A)], "the new one first, the old one still");
        assert_eq!(r.retiring(), 1);
        assert_eq!(r.seen(Ok(s(B)), 2_000), Seen::Unchanged);
        assert!(r.expire(1_000 + SECRET_GRACE_MS - 1).is_empty());
        assert_eq!(r.expire(1_000 + SECRET_GRACE_MS), [Change::Remove(s(A))]);
        assert_eq!(held(&r), [s(B)]);
        assert!(r.expire(u64::MAX).is_empty(), "removed once");
    }

    #[test]
    fn an_invalid_file_is_reported_once_and_changes_nothing() {
        let mut r = Rotation::new(s(A));
        let bad = || Err("keel: control_secret_file \"f\" is readable … chmod 600 it".to_string());
        assert!(matches!(r.seen(bad(), 0), Seen::Refused(m) if m.contains("chmod 600")));
        for t in 1..5 {
            assert_eq!(r.seen(bad(), t * SECRET_POLL_MS), Seen::RefusedAgain);
        }
        assert!(r.refused().is_some());
        // Another reason is reported; so is the same one after a valid read.
        assert!(matches!(r.seen(Err("too short".into()), 6_000), Seen::Refused(_)));
        assert_eq!(r.seen(Ok(s(A)), 7_000), Seen::Unchanged);
        assert_eq!(r.refused(), None);
        assert!(matches!(r.seen(Err("too short".into()), 8_000), Seen::Refused(_)));
        assert_eq!(held(&r), [s(A)]);
        assert!(r.expire(u64::MAX).is_empty());
    }

    #[test]
    fn rotations_within_the_grace_keep_at_most_max_retiring() {
        let mut r = Rotation::new(s(A));
        assert_eq!(r.seen(Ok(s(B)), 0), Seen::Rotated(vec![Change::Add(s(B))]));
        assert_eq!(r.seen(Ok(s(C)), 10), Seen::Rotated(vec![Change::Add(s(C))]));
        assert_eq!(held(&r), [s(C), s(A), s(B)]);
        assert_eq!(r.seen(Ok(s(D)), 20), Seen::Rotated(vec![Change::Add(s(D)), Change::Remove(s(A))]));
        assert_eq!(held(&r), [s(D), s(B), s(C)]);
        // Each retires on its own clock.
        assert_eq!(r.expire(10 + SECRET_GRACE_MS), [Change::Remove(s(B))]);
        assert_eq!(r.expire(20 + SECRET_GRACE_MS), [Change::Remove(s(C))]);
        assert_eq!(held(&r), [s(D)]);
    }

    #[test]
    fn going_back_to_a_retiring_secret_makes_it_current() {
        let mut r = Rotation::new(s(A));
        r.seen(Ok(s(B)), 0);
        assert_eq!(r.seen(Ok(s(A)), 5), Seen::Rotated(vec![Change::Add(s(A))]));
        assert_eq!(held(&r), [s(A), s(B)]);
        assert_eq!(r.expire(5 + SECRET_GRACE_MS), [Change::Remove(s(B))]);
        assert_eq!(held(&r), [s(A)]);
    }

    proptest::proptest! {
        /// Any sequence of reads (valid or not) over time: the current
        /// secret is the last valid one read and always held; a replaced
        /// secret is held until its grace ends or MAX_RETIRING newer ones
        /// push it out; additions and removals, applied to a set, leave
        /// exactly `passwords()`.
        #[test]
        fn the_user_holds_what_passwords_says(
            steps in proptest::collection::vec((0usize..5, 0u64..(2 * SECRET_GRACE_MS)), 1..60),
        ) {
            let names = [A, B, C, D];
            let mut r = Rotation::new(s(A));
            let mut user: Vec<Secret> = vec![s(A)];
            let mut last_valid = s(A);
            let mut now = 0u64;
            for (pick, dt) in steps {
                now += dt;
                let read = if pick == 4 { Err("invalid".to_string()) } else { Ok(s(names[pick])) };
                let mut changes = match r.seen(read.clone(), now) {
                    Seen::Rotated(c) => c,
                    _ => Vec::new(),
                };
                changes.extend(r.expire(now));
                for c in changes {
                    match c {
                        Change::Add(x) => if !user.contains(&x) { user.push(x) },
                        Change::Remove(x) => user.retain(|u| *u != x),
                    }
                }
                if let Ok(x) = read {
                    last_valid = x;
                }
                let mut want: Vec<Secret> = r.passwords().cloned().collect();
                proptest::prop_assert_eq!(&want[0], &last_valid);
                want.sort_by(|a, b| a.bytes().cmp(b.bytes()));
                user.sort_by(|a, b| a.bytes().cmp(b.bytes()));
                proptest::prop_assert_eq!(&want, &user);
                proptest::prop_assert!(r.retiring() <= MAX_RETIRING);
            }
        }
    }
}
