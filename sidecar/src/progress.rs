//! Progress of a long operation (a replica's full sync, a snapshot's
//! upload or download), logged at a bounded rate: a line at most every
//! `PROGRESS_EVERY`, saying bytes done of the total and the rate so far.
//! The decision (whether a line is due, what it says) is this plain struct.

use std::time::Duration;
use std::time::Instant;

/// At most one progress line per operation this often.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct Progress {
    total: Option<u64>,
    done: u64,
    started: Instant,
    last_line: Instant,
}

/// Bytes for people: B, kB, MB, GB (powers of 1000).
pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} kB", b / 1e3)
    } else {
        format!("{bytes} B")
    }
}

impl Progress {
    pub fn new(total: Option<u64>, now: Instant) -> Progress {
        Progress { total, done: 0, started: now, last_line: now }
    }

    pub fn done(&self) -> u64 {
        self.done
    }

    /// `n` more bytes are done; a progress line if one is due.
    pub fn advance(&mut self, n: u64, now: Instant) -> Option<String> {
        self.done += n;
        if now.duration_since(self.last_line) < PROGRESS_EVERY {
            return None;
        }
        self.last_line = now;
        Some(self.line(now))
    }

    /// Where it stands: "1.20 GB of 3.10 GB (38%), 45.3 MB/s".
    pub fn line(&self, now: Instant) -> String {
        let secs = now.duration_since(self.started).as_secs_f64();
        let rate = if secs > 0.0 { format!("{}/s", human((self.done as f64 / secs) as u64)) } else { "-".into() };
        match self.total {
            Some(t) if t > 0 => format!("{} of {} ({}%), {rate}", human(self.done), human(t), self.done.saturating_mul(100) / t),
            _ => format!("{}, {rate}", human(self.done)),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn lines_come_at_a_bounded_rate() {
        let t0 = Instant::now();
        let mut p = Progress::new(Some(3_100_000_000), t0);
        assert_eq!(p.advance(1_000_000_000, t0 + Duration::from_secs(1)), None);
        let line = p.advance(200_000_000, t0 + Duration::from_secs(10)).unwrap();
        assert_eq!(line, "1.20 GB of 3.10 GB (38%), 120.0 MB/s");
        assert_eq!(p.advance(1, t0 + Duration::from_secs(11)), None);
        assert!(p.advance(1, t0 + Duration::from_secs(15)).is_some());
        assert_eq!(Progress::new(None, t0).line(t0), "0 B, -");
    }

    proptest! {
        /// However the bytes arrive, lines are at least PROGRESS_EVERY apart
        /// and the count is exact.
        #[test]
        fn never_more_often_than_every(steps in proptest::collection::vec((0u64..1 << 30, 0u64..4000), 1..200)) {
            let t0 = Instant::now();
            let mut p = Progress::new(Some(1 << 40), t0);
            let (mut now, mut last, mut sum) = (t0, t0, 0u64);
            for (n, ms) in steps {
                now += Duration::from_millis(ms);
                sum += n;
                if p.advance(n, now).is_some() {
                    prop_assert!(now.duration_since(last) >= PROGRESS_EVERY);
                    last = now;
                }
            }
            prop_assert_eq!(p.done(), sum);
        }
    }
}
