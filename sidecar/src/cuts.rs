//! Where the primary's replication stream may be cut into appends.
//!
//! Invariant: after every append, the journal's stream ends where a
//! replica's offset can stand: after a whole command, and not between a
//! `MULTI` and its `EXEC`. A Redis replica counts a command's bytes into
//! its offset only once the command is complete (and a transaction's only
//! at `EXEC`), so a journal that ended mid-command would leave every
//! replica's offset short of the journal's end for good: none of them
//! would ever count as caught up, and the stream could not fail over.
//! Redis writes its replication stream to a replica in buffer-block
//! pieces, so a read regularly ends mid-command; this is why the cut
//! points are tracked rather than assumed.
//!
//! `Cuts` is fed the bytes as they are read (any chunking) and keeps the
//! stream offsets of the cut points ahead of the last append, so the
//! sidecar can take "the longest prefix of what is pending that ends at a
//! cut point, within a size". It parses only RESP framing and the command
//! name, skipping bulk bodies by length, so it costs O(1) per bulk and
//! holds no stream bytes. Pure: no I/O.
//!
//! A command larger than one append can carry still has to be split; and
//! bytes that are not RESP multi-bulk (never seen from Redis) turn the
//! scanner off for the rest of the connection (`broken`), where every byte
//! counts as a cut point, as if nothing were tracked.

use std::collections::VecDeque;

/// Cut points closer together than this are kept as one (the later): the
/// queue stays short (about pending bytes / `CUT_GRAIN_BYTES`) and an
/// append's size is chosen to within this many bytes.
pub const CUT_GRAIN_BYTES: u64 = 4 << 10;
/// Longest argument count or bulk-length line accepted, in digits.
const MAX_DIGITS: u8 = 19;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before a command: `*`, or a bare newline (a keep-alive).
    Start,
    /// The argument count's digits, up to `\r`.
    ArgCount,
    /// The `\n` closing a count or length line.
    LineEnd { then: AfterLine },
    /// Before an argument: `$`.
    Bulk,
    /// A bulk length's digits, up to `\r`.
    BulkLen,
    /// A bulk's body: this many bytes left.
    Body { left: u64 },
    /// The `\r\n` after a bulk's body (`lf`: the `\r` was seen).
    BodyEnd { lf: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterLine {
    Args,
    Body,
}

#[derive(Debug)]
pub struct Cuts {
    /// Stream offset of the next byte to be fed.
    at: u64,
    state: State,
    /// The number being read (argument count or bulk length) and its digits.
    number: u64,
    digits: u8,
    args_left: u64,
    /// Index of the argument being read within its command.
    arg: u64,
    /// The command name's first bytes (upper-cased) and its full length
    /// (0 between commands).
    name: [u8; 8],
    name_len: u64,
    in_multi: bool,
    /// Cut points after the last take, ascending, all > `taken`.
    points: VecDeque<u64>,
    /// Where the last take ended (the pending bytes' start offset).
    taken: u64,
    /// The last cut point fed, exactly (not subject to the grain).
    last: u64,
    /// Why the scanner stopped tracking, if it did.
    broken: Option<String>,
}

impl Cuts {
    /// A scanner for a stream whose next byte is at `offset`, and where a
    /// command begins.
    pub fn new(offset: u64) -> Cuts {
        Cuts {
            at: offset,
            state: State::Start,
            number: 0,
            digits: 0,
            args_left: 0,
            arg: 0,
            name: [0; 8],
            name_len: 0,
            in_multi: false,
            points: VecDeque::new(),
            taken: offset,
            last: offset,
            broken: None,
        }
    }

    /// Why cut points are no longer tracked (the stream was not RESP).
    pub fn broken(&self) -> Option<&str> {
        self.broken.as_deref()
    }

    /// Takes the next bytes of the stream.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.broken.is_some() {
            self.at += bytes.len() as u64;
            self.point(self.at);
            return;
        }
        let mut i = 0usize;
        while i < bytes.len() {
            if let State::Body { left } = self.state {
                // Skip the body in one step; keep the name's first bytes.
                let n = left.min((bytes.len() - i) as u64);
                if self.arg == 0 {
                    for (k, &b) in bytes[i..i + n as usize].iter().enumerate() {
                        let pos = (self.name_len - left) as usize + k;
                        if pos < self.name.len() {
                            self.name[pos] = b.to_ascii_uppercase();
                        }
                    }
                }
                i += n as usize;
                self.at += n;
                self.state = if left == n { State::BodyEnd { lf: false } } else { State::Body { left: left - n } };
                continue;
            }
            let b = bytes[i];
            i += 1;
            self.at += 1;
            if let Err(what) = self.step(b) {
                self.broken = Some(format!("byte {} of the stream: {what}", self.at - 1));
                self.at += (bytes.len() - i) as u64;
                self.point(self.at);
                return;
            }
        }
    }

    /// One framing byte (never a body byte).
    fn step(&mut self, b: u8) -> Result<(), &'static str> {
        self.state = match (self.state, b) {
            (State::Start, b'*') => {
                (self.number, self.digits) = (0, 0);
                State::ArgCount
            }
            (State::Start, b'\n') => {
                self.command_done();
                State::Start
            }
            (State::Start, b'\r') => State::Start,
            (State::Start, _) => return Err("a command does not start with '*'"),
            (State::ArgCount | State::BulkLen, b'0'..=b'9') => {
                if self.digits == MAX_DIGITS {
                    return Err("a length has too many digits");
                }
                self.number = self.number * 10 + u64::from(b - b'0');
                self.digits += 1;
                self.state
            }
            (State::ArgCount, b'\r') if self.digits > 0 => State::LineEnd { then: AfterLine::Args },
            (State::BulkLen, b'\r') if self.digits > 0 => State::LineEnd { then: AfterLine::Body },
            (State::ArgCount | State::BulkLen, _) => return Err("a length is not a number"),
            (State::LineEnd { then: AfterLine::Args }, b'\n') => {
                (self.args_left, self.arg, self.name_len) = (self.number, 0, 0);
                if self.args_left == 0 {
                    self.command_done();
                    State::Start
                } else {
                    State::Bulk
                }
            }
            (State::LineEnd { then: AfterLine::Body }, b'\n') => {
                if self.arg == 0 {
                    self.name_len = self.number;
                }
                if self.number == 0 { State::BodyEnd { lf: false } } else { State::Body { left: self.number } }
            }
            (State::LineEnd { .. }, _) => return Err("a length line does not end with CRLF"),
            (State::Bulk, b'$') => {
                (self.number, self.digits) = (0, 0);
                State::BulkLen
            }
            (State::Bulk, _) => return Err("an argument does not start with '$'"),
            (State::BodyEnd { lf: false }, b'\r') => State::BodyEnd { lf: true },
            (State::BodyEnd { lf: true }, b'\n') => {
                self.args_left -= 1;
                self.arg += 1;
                if self.args_left == 0 {
                    self.command_done();
                    State::Start
                } else {
                    State::Bulk
                }
            }
            (State::BodyEnd { .. }, _) => return Err("a bulk is not followed by CRLF"),
            (State::Body { .. }, _) => unreachable!("bodies are skipped in feed"),
        };
        Ok(())
    }

    /// A command ended at `self.at` (a keep-alive newline or `*0` has an
    /// empty name).
    fn command_done(&mut self) {
        if self.name_len <= self.name.len() as u64 {
            match &self.name[..self.name_len as usize] {
                b"MULTI" => self.in_multi = true,
                b"EXEC" => self.in_multi = false,
                _ => {}
            }
        }
        self.name_len = 0;
        if !self.in_multi {
            self.point(self.at);
        }
    }

    fn point(&mut self, at: u64) {
        self.last = at;
        assert!(at >= self.taken, "a cut point before the last take");
        if at == self.taken {
            return;
        }
        // Keep one point per grain: a point closer than the grain to the
        // one before the last replaces the last.
        let len = self.points.len();
        if len >= 2 && at - self.points[len - 2] < CUT_GRAIN_BYTES {
            self.points[len - 1] = at;
        } else {
            self.points.push_back(at);
        }
    }

    /// How many of the pending bytes (those fed since the last take) to
    /// append now: up to the last cut point within `soft`; else up to the
    /// first cut point within `hard`; else, if at least `hard` bytes are
    /// pending, `hard` (a command too large for one append: it has to be
    /// split); else 0 (wait for the command to complete). With both limits
    /// at least `CUT_GRAIN_BYTES`, a cut point within them is never missed.
    pub fn sendable(&self, soft: u64, hard: u64) -> u64 {
        assert!(CUT_GRAIN_BYTES <= soft && soft <= hard);
        let pending = self.at - self.taken;
        let mut within_soft = None;
        for &p in &self.points {
            let n = p - self.taken;
            if n <= soft {
                within_soft = Some(n);
            } else {
                return within_soft.unwrap_or(if n <= hard { n } else { hard });
            }
        }
        match within_soft {
            Some(n) => n,
            None if pending >= hard => hard,
            None => 0,
        }
    }

    /// The first `n` pending bytes were appended.
    pub fn take(&mut self, n: u64) {
        assert!(n <= self.at - self.taken, "took more than was fed");
        self.taken += n;
        while self.points.front().is_some_and(|&p| p <= self.taken) {
            self.points.pop_front();
        }
    }

    /// The last cut point fed: where a Redis replica fed these bytes stands
    /// once it has applied every command it can (never between this and
    /// the end of what it was fed).
    pub fn last_cut(&self) -> u64 {
        self.last
    }

    /// Takes every pending byte up to the last cut point and returns that
    /// offset: for a reader that only asks `last_cut` (the queue of cut
    /// points stays empty).
    pub fn take_whole(&mut self) -> u64 {
        self.take(self.last - self.taken);
        self.last
    }

    /// Whether the pending bytes end at a cut point (all of them may go).
    #[cfg(test)]
    fn at_cut(&self) -> bool {
        self.points.back() == Some(&self.at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resp::encode_command as cmd;

    #[test]
    fn whole_commands_are_cut_points_and_partial_ones_are_not() {
        let set = cmd(&[b"SET", b"k", b"v"]);
        let mut c = Cuts::new(100);
        c.feed(&set[..5]);
        assert_eq!(c.sendable(1 << 20, 1 << 20), 0, "half a command waits");
        c.feed(&set[5..]);
        assert_eq!(c.sendable(1 << 20, 1 << 20), set.len() as u64);
        c.feed(&set[..3]);
        assert_eq!(c.sendable(1 << 20, 1 << 20), set.len() as u64, "the second, partial command stays");
        c.take(set.len() as u64);
        assert_eq!(c.sendable(1 << 20, 1 << 20), 0);
        c.feed(&set[3..]);
        assert_eq!(c.sendable(1 << 20, 1 << 20), set.len() as u64);
    }

    #[test]
    fn a_transaction_is_cut_only_after_exec() {
        let mut c = Cuts::new(0);
        let multi = cmd(&[b"multi"]);
        let set = cmd(&[b"SET", b"k", b"v"]);
        let exec = cmd(&[b"exec"]);
        c.feed(&multi);
        c.feed(&set);
        assert_eq!(c.sendable(1 << 20, 1 << 20), 0);
        c.feed(&exec);
        assert_eq!(c.sendable(1 << 20, 1 << 20), (multi.len() + set.len() + exec.len()) as u64);
        // A key named MULTI is not a transaction.
        let mut c = Cuts::new(0);
        let odd = cmd(&[b"SET", b"MULTI", b"EXEC"]);
        c.feed(&odd);
        assert!(c.at_cut());
        // Nor is a longer name that starts like one.
        let mut c = Cuts::new(0);
        c.feed(&cmd(&[b"MULTIPLY"]));
        assert!(c.at_cut());
    }

    #[test]
    fn a_command_larger_than_the_limit_is_split_at_the_limit() {
        let big = cmd(&[b"SET", b"k", &vec![b'x'; 10_000]]);
        let mut c = Cuts::new(0);
        c.feed(&big[..6_000]);
        assert_eq!(c.sendable(5_000, 5_000), 5_000);
        assert_eq!(c.sendable(5_000, 8_000), 0, "within the hard limit it waits for the command's end");
        c.take(5_000);
        c.feed(&big[6_000..]);
        assert_eq!(c.sendable(5_000, 8_000), (big.len() - 5_000) as u64);
    }

    #[test]
    fn the_limit_picks_the_last_point_within_it() {
        let set = cmd(&[b"SET", b"k", &vec![b'v'; 5_000]]);
        let mut c = Cuts::new(0);
        for _ in 0..4 {
            c.feed(&set);
        }
        let n = set.len() as u64;
        // None within the soft limit: the first one past it, within the hard.
        assert_eq!(c.sendable(CUT_GRAIN_BYTES, 1 << 20), n);
        assert_eq!(c.sendable(CUT_GRAIN_BYTES, CUT_GRAIN_BYTES), CUT_GRAIN_BYTES, "none within either: split");
        assert_eq!(c.sendable(2 * n + 10, 1 << 20), 2 * n);
        assert_eq!(c.sendable(4 * n, 1 << 20), 4 * n);
        c.take(2 * n);
        assert_eq!(c.sendable(1 << 20, 1 << 20), 2 * n);
    }

    #[test]
    fn bytes_that_are_not_resp_turn_tracking_off() {
        let mut c = Cuts::new(0);
        c.feed(b"*1\r\n$4\r\nPING\r\n");
        c.feed(b"GET k\r\n");
        assert!(c.broken().unwrap().contains("byte 14"), "{:?}", c.broken());
        assert_eq!(c.sendable(1 << 20, 1 << 20), 21, "every byte may go once broken");
    }

    /// Any chunking of any command sequence gives the cut points a
    /// whole-buffer parse gives (within the grain), and never one inside
    /// a command or a transaction.
    #[test]
    fn property_cut_points_do_not_depend_on_chunking() {
        use proptest::prelude::*;
        let arg = proptest::collection::vec(any::<u8>(), 0..3_000);
        let command = (0..6u8, proptest::collection::vec(arg, 0..4));
        proptest!(ProptestConfig::with_cases(200), |(cmds in proptest::collection::vec(command, 1..40), cuts in proptest::collection::vec(1usize..5_000, 1..20))| {
            let mut bytes = Vec::new();
            let mut safe = Vec::new();
            let mut in_multi = false;
            for (kind, args) in &cmds {
                let name: &[u8] = match kind { 0 => b"MULTI", 1 => b"EXEC", _ => b"SET" };
                let mut all: Vec<&[u8]> = vec![name];
                if *kind > 1 {
                    all.extend(args.iter().map(|a| a.as_slice()));
                }
                bytes.extend_from_slice(&cmd(&all));
                match kind { 0 => in_multi = true, 1 => in_multi = false, _ => {} }
                if !in_multi {
                    safe.push(bytes.len() as u64);
                }
            }
            let mut c = Cuts::new(0);
            // A reader that only keeps the last cut point (a replica's feeder).
            let mut w = Cuts::new(0);
            let (mut at, mut i) = (0usize, 0usize);
            while at < bytes.len() {
                let n = cuts[i % cuts.len()].min(bytes.len() - at);
                c.feed(&bytes[at..at + n]);
                w.feed(&bytes[at..at + n]);
                at += n;
                i += 1;
                let last = safe.iter().copied().filter(|&p| p <= at as u64).max().unwrap_or(0);
                prop_assert_eq!(c.last_cut(), last);
                prop_assert_eq!(w.take_whole(), last);
                prop_assert!(w.points.is_empty());
                // Whatever it offers now ends at a true cut point.
                let s = c.sendable(u64::MAX, u64::MAX);
                prop_assert!(s == 0 || safe.contains(&s), "offered {s}, safe points {safe:?}");
            }
            prop_assert!(c.broken().is_none());
            prop_assert_eq!(c.sendable(u64::MAX, u64::MAX), safe.last().copied().unwrap_or(0));
            // Taking in limited steps only ever stops at true points or at
            // the limit when no point is within it.
            let limit = 4_096u64;
            let mut taken = 0u64;
            while c.sendable(limit, limit) > 0 {
                let s = c.sendable(limit, limit);
                let next = taken + s;
                let fits = safe.iter().any(|&p| p > taken && p - taken <= limit);
                if fits {
                    prop_assert!(safe.contains(&next), "stopped at {next} inside a command");
                    prop_assert!(next + CUT_GRAIN_BYTES > *safe.iter().rfind(|&&p| p > taken && p - taken <= limit).unwrap());
                } else {
                    prop_assert_eq!(s, limit);
                }
                c.take(s);
                taken = next;
            }
        });
    }
}
