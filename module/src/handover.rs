//! Graceful handover, the module's side: a client's `FAILOVER [TO host
//! port] [TIMEOUT ms]`, or `SHUTDOWN` of a primary, asks this node's
//! sidecar to hand the primary role over to a caught-up replica without
//! waiting for the lease to lapse. The sidecar does the handover
//! (sidecar/src/handover.rs); this file only keeps the request and the
//! clients that wait on it. Pure: the clients are a type parameter, and
//! nothing here talks to Redis.
//!
//! Life cycle of one request (`Phase`):
//! ```text
//!   Idle ──FAILOVER / SHUTDOWN──► Requested ──ACCEPT──► Accepted ──PAUSE──► Paused
//!    ▲          (the FAILOVER client waits)  │ REFUSE,          │ FAILOVER ABORT │
//!    │                                       │ expiry           │                │ FINISH
//!    └───────────────────────────────────────┴──────────────────┴────────────────┘
//! ```
//! - `Requested`: the sidecar polls `KEEL.HANDOVER GET`; it checks the
//!   request against the deployment (a `TO` target must be one of its
//!   replicas) and answers `ACCEPT` (the FAILOVER client gets `+OK`, as
//!   Redis answers once it has validated a FAILOVER) or `REFUSE why` (the
//!   client gets the error). A request the sidecar does not take up within
//!   `ACCEPT_TIMEOUT_MS` expires with an error saying so.
//! - `Accepted`: `FAILOVER ABORT` may still cancel it (writes were never
//!   paused); the sidecar's `PAUSE` then fails and it stays primary.
//! - `Paused`: the gate refuses every data command (gate.rs) while the held
//!   writes become durable and the lease passes to the successor; `FINISH`
//!   ends it with the outcome (shown by `INFO keel`).
//!
//! Invariants:
//! - at most one request at a time; every waiting client is answered
//!   exactly once (`Answer`), whatever ends the request;
//! - a `SHUTDOWN` waiter is let go (to shut down) when the request ends in
//!   any way, or after `SHUTDOWN_HANDOVER_WAIT_MS` (the caller's timer):
//!   a primary always exits, with or without a successor.

/// How long a FAILOVER client waits for the sidecar to take the request up
/// (it polls every few ms while it leads).
pub const ACCEPT_TIMEOUT_MS: u64 = 2_000;
/// How long `SHUTDOWN` of a primary waits for its handover before it shuts
/// down anyway.
pub const SHUTDOWN_HANDOVER_WAIT_MS: u64 = 3_000;
/// The handover's own bound when FAILOVER gives no TIMEOUT: past it, the
/// sidecar gives up and the node stays (or becomes again) the primary.
pub const DEFAULT_TIMEOUT_MS: u64 = 2_000;
/// Longest TIMEOUT accepted.
pub const MAX_TIMEOUT_MS: u64 = 60_000;
/// Longest `TO host:port` kept.
pub const MAX_TARGET_BYTES: usize = 256;

/// Why the primary hands over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Failover,
    Shutdown,
}

impl Reason {
    pub fn name(self) -> &'static str {
        match self {
            Reason::Failover => "failover",
            Reason::Shutdown => "shutdown",
        }
    }
}

/// What a client asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `host:port` of the replica to hand over to; `None`: the sidecar picks.
    pub to: Option<String>,
    pub timeout_ms: u64,
    pub reason: Reason,
}

/// A parsed `FAILOVER`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failover {
    Start(Request),
    Abort,
}

pub const SYNTAX: &str = "ERR syntax error";
pub const FORCE_UNSUPPORTED: &str = "ERR Keel: FAILOVER FORCE is not supported: a Keel primary hands over only to a replica \
     that applied every journaled write (the journal refuses any other); leave FORCE out";

/// Parses `FAILOVER [TO host port] [TIMEOUT ms] [FORCE]` / `FAILOVER ABORT`
/// (`args`: name first), with Redis's own errors where Redis has them.
pub fn parse_failover<A: AsRef<[u8]>>(args: &[A]) -> Result<Failover, String> {
    let arg = |i: usize| args[i].as_ref();
    let is = |i: usize, w: &str| arg(i).eq_ignore_ascii_case(w.as_bytes());
    if args.len() == 2 && is(1, "abort") {
        return Ok(Failover::Abort);
    }
    let (mut to, mut timeout_ms, mut force) = (None, None, false);
    let mut i = 1;
    while i < args.len() {
        if is(i, "timeout") && i + 1 < args.len() && timeout_ms.is_none() {
            let t = std::str::from_utf8(arg(i + 1)).ok().and_then(|t| t.parse::<i64>().ok());
            let t = t.ok_or("ERR value is not an integer or out of range")?;
            if t <= 0 {
                return Err("ERR FAILOVER timeout must be greater than 0".into());
            }
            timeout_ms = Some((t as u64).min(MAX_TIMEOUT_MS));
            i += 2;
        } else if is(i, "to") && i + 2 < args.len() && to.is_none() {
            let port = std::str::from_utf8(arg(i + 2)).ok().and_then(|p| p.parse::<u16>().ok()).filter(|p| *p > 0);
            let port = port.ok_or("ERR value is not an integer or out of range")?;
            let host = String::from_utf8_lossy(arg(i + 1)).into_owned();
            if host.is_empty() || host.len() > MAX_TARGET_BYTES || host.contains(char::is_whitespace) {
                return Err(SYNTAX.into());
            }
            to = Some(format!("{host}:{port}"));
            i += 3;
        } else if is(i, "force") && !force {
            force = true;
            i += 1;
        } else {
            return Err(SYNTAX.into());
        }
    }
    if force {
        if to.is_none() || timeout_ms.is_none() {
            return Err("ERR FAILOVER with force option requires both a timeout and target HOST and IP.".into());
        }
        return Err(FORCE_UNSUPPORTED.into());
    }
    Ok(Failover::Start(Request { to, timeout_ms: timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS), reason: Reason::Failover }))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    Idle,
    /// Waiting for the sidecar to take it up, since this monotonic ms.
    Requested(Request, u64),
    Accepted(Request),
    Paused(Request),
}

/// What to tell a waiting client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer<C> {
    /// The FAILOVER client: `+OK`.
    Ok(C),
    /// The FAILOVER client: this error.
    Error(C, String),
    /// A SHUTDOWN client: run its SHUTDOWN now (these arguments).
    Shutdown(C, Vec<Vec<u8>>),
}

/// The request and the clients waiting on it.
#[derive(Debug)]
pub struct Handover<C> {
    phase: Phase,
    /// The FAILOVER client waiting for the sidecar's answer.
    failover_client: Option<C>,
    /// SHUTDOWN clients, with their arguments.
    shutdowns: Vec<(C, Vec<Vec<u8>>)>,
    /// How the last request ended (for INFO).
    last: String,
}

impl<C: Copy + PartialEq> Default for Handover<C> {
    fn default() -> Self {
        Handover { phase: Phase::Idle, failover_client: None, shutdowns: Vec::new(), last: String::new() }
    }
}

impl<C: Copy + PartialEq> Handover<C> {
    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    pub fn last_outcome(&self) -> &str {
        &self.last
    }

    /// The phase as one word (INFO keel).
    pub fn phase_name(&self) -> &'static str {
        match self.phase {
            Phase::Idle => "none",
            Phase::Requested(..) => "requested",
            Phase::Accepted(_) => "accepted",
            Phase::Paused(_) => "paused",
        }
    }

    /// Ends a request the sidecar did not take up in time.
    fn expire(&mut self, now_ms: u64, out: &mut Vec<Answer<C>>) {
        if let Phase::Requested(_, since) = self.phase {
            if now_ms >= since + ACCEPT_TIMEOUT_MS {
                let why = format!(
                    "ERR Keel: this node's sidecar did not take up the handover within {ACCEPT_TIMEOUT_MS} ms; \
                     is keel-sidecar running beside this redis-server?"
                );
                self.end(&why, None, out);
            }
        }
    }

    /// A FAILOVER (`client` waits for the sidecar's answer) or a SHUTDOWN
    /// (`client` waits for the handover, then shuts down with `shutdown`).
    /// A SHUTDOWN joins a request already under way; a FAILOVER is refused.
    pub fn request(&mut self, req: Request, client: C, shutdown: Option<Vec<Vec<u8>>>, now_ms: u64) -> Result<Vec<Answer<C>>, String> {
        let mut out = Vec::new();
        self.expire(now_ms, &mut out);
        match (&self.phase, shutdown) {
            (Phase::Idle, None) => {
                self.phase = Phase::Requested(req, now_ms);
                self.failover_client = Some(client);
            }
            (Phase::Idle, Some(args)) => {
                self.phase = Phase::Requested(req, now_ms);
                self.shutdowns.push((client, args));
            }
            (_, Some(args)) => self.shutdowns.push((client, args)),
            (_, None) => return Err("ERR FAILOVER already in progress.".into()),
        }
        Ok(out)
    }

    /// `KEEL.HANDOVER GET`: the request the sidecar is to take up, if any.
    pub fn pending(&mut self, now_ms: u64) -> (Option<Request>, Vec<Answer<C>>) {
        let mut out = Vec::new();
        self.expire(now_ms, &mut out);
        match &self.phase {
            Phase::Requested(r, _) => (Some(r.clone()), out),
            _ => (None, out),
        }
    }

    /// `KEEL.HANDOVER ACCEPT`: the sidecar starts the handover.
    pub fn accept(&mut self) -> Result<Vec<Answer<C>>, String> {
        let Phase::Requested(r, _) = &self.phase else {
            return Err("ERR no handover is waiting to be accepted (it expired, or FAILOVER ABORT ended it)".into());
        };
        self.phase = Phase::Accepted(r.clone());
        Ok(self.failover_client.take().map(Answer::Ok).into_iter().collect())
    }

    /// `KEEL.HANDOVER PAUSE`: writes stop here (the caller pauses the gate).
    pub fn pause(&mut self) -> Result<(), String> {
        match &self.phase {
            Phase::Accepted(r) => {
                self.phase = Phase::Paused(r.clone());
                Ok(())
            }
            Phase::Idle => Err("ERR the handover was aborted (FAILOVER ABORT) or has ended; writes were not paused".into()),
            _ => Err("ERR the handover is not accepted; writes were not paused".into()),
        }
    }

    /// `KEEL.HANDOVER REFUSE why` / `FINISH outcome`, or the node's role
    /// changed: the request ends; everyone waiting is answered.
    pub fn finish(&mut self, outcome: &str, refusal: Option<&str>) -> Vec<Answer<C>> {
        let mut out = Vec::new();
        self.end(outcome, refusal, &mut out);
        out
    }

    fn end(&mut self, outcome: &str, refusal: Option<&str>, out: &mut Vec<Answer<C>>) {
        if let Some(c) = self.failover_client.take() {
            out.push(Answer::Error(c, refusal.unwrap_or(outcome).to_string()));
        }
        out.extend(self.shutdowns.drain(..).map(|(c, args)| Answer::Shutdown(c, args)));
        if self.phase != Phase::Idle {
            self.last = outcome.to_string();
        }
        self.phase = Phase::Idle;
    }

    /// `FAILOVER ABORT`: cancels a request whose writes are not paused.
    /// The answers are due whatever the result (a request that expired
    /// meanwhile answers its client).
    pub fn abort(&mut self, now_ms: u64) -> (Result<(), String>, Vec<Answer<C>>) {
        let mut out = Vec::new();
        self.expire(now_ms, &mut out);
        let r = match self.phase {
            Phase::Idle => Err("ERR No failover in progress.".into()),
            Phase::Paused(_) => Err("ERR Keel: the handover already paused writes and ends within its timeout; \
                 it cannot be aborted now"
                .into()),
            _ => {
                self.end("aborted by FAILOVER ABORT", Some("ERR FAILOVER aborted (FAILOVER ABORT)"), &mut out);
                Ok(())
            }
        };
        (r, out)
    }

    /// A waiting client's timer fired: it is forgotten. Returns what is to
    /// be answered: the FAILOVER client's error (its request ends, and a
    /// SHUTDOWN that joined it goes ahead), or a SHUTDOWN's go-ahead; empty
    /// if it was no longer waiting.
    pub fn timed_out(&mut self, c: C, now_ms: u64) -> Vec<Answer<C>> {
        let mut out = Vec::new();
        if self.failover_client == Some(c) {
            let due = self.requested_since().map(|s| s + ACCEPT_TIMEOUT_MS).unwrap_or(0);
            self.expire(now_ms.max(due), &mut out);
        } else if let Some(i) = self.shutdowns.iter().position(|(x, _)| *x == c) {
            let (c, args) = self.shutdowns.remove(i);
            out.push(Answer::Shutdown(c, args));
        }
        out
    }

    fn requested_since(&self) -> Option<u64> {
        match self.phase {
            Phase::Requested(_, since) => Some(since),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Failover, String> {
        parse_failover(&s.split_whitespace().collect::<Vec<_>>())
    }

    fn req(to: Option<&str>, timeout_ms: u64) -> Failover {
        Failover::Start(Request { to: to.map(String::from), timeout_ms, reason: Reason::Failover })
    }

    #[test]
    fn failover_arguments_as_redis_parses_them() {
        assert_eq!(p("FAILOVER"), Ok(req(None, DEFAULT_TIMEOUT_MS)));
        assert_eq!(p("failover to 127.0.0.1 6380"), Ok(req(Some("127.0.0.1:6380"), DEFAULT_TIMEOUT_MS)));
        assert_eq!(p("failover TIMEOUT 500 TO h 1"), Ok(req(Some("h:1"), 500)));
        assert_eq!(p("failover abort"), Ok(Failover::Abort));
        assert_eq!(p("failover timeout 0"), Err("ERR FAILOVER timeout must be greater than 0".into()));
        assert_eq!(p("failover timeout x"), Err("ERR value is not an integer or out of range".into()));
        assert_eq!(p("failover to h 0"), Err("ERR value is not an integer or out of range".into()));
        assert_eq!(p("failover to h"), Err(SYNTAX.into()));
        assert_eq!(p("failover abort now"), Err(SYNTAX.into()));
        assert_eq!(p("failover to h 1 to h 2"), Err(SYNTAX.into()));
        assert_eq!(p("failover force").unwrap_err(), "ERR FAILOVER with force option requires both a timeout and target HOST and IP.");
        assert_eq!(p("failover to h 1 timeout 5 force"), Err(FORCE_UNSUPPORTED.into()));
        assert_eq!(p("failover timeout 99999999"), Ok(req(None, MAX_TIMEOUT_MS)));
    }

    fn r() -> Request {
        Request { to: None, timeout_ms: 100, reason: Reason::Failover }
    }

    #[test]
    fn a_failover_is_answered_once_the_sidecar_accepts_or_refuses() {
        let mut h = Handover::<u32>::default();
        assert!(h.request(r(), 1, None, 0).unwrap().is_empty());
        assert_eq!(h.request(r(), 2, None, 1), Err("ERR FAILOVER already in progress.".into()));
        assert_eq!(h.pending(5).0, Some(r()));
        assert_eq!(h.accept(), Ok(vec![Answer::Ok(1)]));
        assert_eq!(h.pending(6).0, None, "taken up once");
        assert!(h.pause().is_ok());
        assert_eq!(h.abort(7).0.unwrap_err(), "ERR Keel: the handover already paused writes and ends within its timeout; it cannot be aborted now");
        assert!(h.finish("handed over to h:1", None).is_empty());
        assert_eq!(h.last_outcome(), "handed over to h:1");
        assert_eq!(h.phase(), &Phase::Idle);

        h.request(r(), 3, None, 10).unwrap();
        assert_eq!(h.finish("refused", Some("ERR no replica")), vec![Answer::Error(3, "ERR no replica".into())]);
        assert_eq!(h.abort(11), (Err("ERR No failover in progress.".into()), vec![]));
    }

    #[test]
    fn a_request_nobody_takes_up_expires() {
        let mut h = Handover::<u32>::default();
        h.request(r(), 1, None, 0).unwrap();
        let (none, out) = h.pending(ACCEPT_TIMEOUT_MS);
        assert_eq!(none, None);
        assert!(matches!(&out[..], [Answer::Error(1, e)] if e.contains("did not take up")));
        // The client's own timer may fire first: answered once, the same way.
        h.request(r(), 2, None, 10_000).unwrap();
        assert!(matches!(&h.timed_out(2, 10_001)[..], [Answer::Error(2, _)]));
        assert!(h.timed_out(2, 10_002).is_empty());
        assert_eq!(h.phase(), &Phase::Idle);
    }

    #[test]
    fn shutdowns_always_go_ahead() {
        let mut h = Handover::<u32>::default();
        let sd = Request { reason: Reason::Shutdown, ..r() };
        h.request(sd.clone(), 1, Some(vec![b"SHUTDOWN".to_vec()]), 0).unwrap();
        h.request(sd, 2, Some(vec![b"SHUTDOWN".to_vec(), b"NOSAVE".to_vec()]), 0).unwrap();
        assert_eq!(h.accept(), Ok(vec![]));
        assert_eq!(h.timed_out(1, 5), vec![Answer::Shutdown(1, vec![b"SHUTDOWN".to_vec()])]);
        assert_eq!(h.finish("no successor", None), vec![Answer::Shutdown(2, vec![b"SHUTDOWN".to_vec(), b"NOSAVE".to_vec()])]);
        // An aborted FAILOVER lets a SHUTDOWN that joined it go ahead too.
        h.request(r(), 3, None, 0).unwrap();
        h.request(Request { reason: Reason::Shutdown, ..r() }, 4, Some(vec![]), 0).unwrap();
        let (r, out) = h.abort(1);
        assert!(r.is_ok());
        assert_eq!(out.len(), 2);
        assert!(out.contains(&Answer::Shutdown(4, vec![])));
    }

    proptest::proptest! {
        /// Any sequence of events: every client is answered at most once,
        /// and one that waits is answered by the time the request ends.
        #[test]
        fn every_waiter_is_answered_exactly_once(ops in proptest::collection::vec(0u8..8, 0..60)) {
            let mut h = Handover::<u32>::default();
            let mut answered = std::collections::HashMap::<u32, u32>::new();
            let mut waiting = std::collections::HashSet::<u32>::new();
            let mut next = 0u32;
            let mut now = 0u64;
            fn note(out: Vec<Answer<u32>>, waiting: &mut std::collections::HashSet<u32>, answered: &mut std::collections::HashMap<u32, u32>) {
                for a in out {
                    let c = match a { Answer::Ok(c) | Answer::Error(c, _) | Answer::Shutdown(c, _) => c };
                    *answered.entry(c).or_default() += 1;
                    waiting.remove(&c);
                }
            }
            for op in ops {
                now += 300;
                match op {
                    0 => { next += 1; if h.request(r(), next, None, now).map(|o| note(o, &mut waiting, &mut answered)).is_ok() { waiting.insert(next); } }
                    1 => { next += 1; let o = h.request(r(), next, Some(vec![]), now).unwrap(); note(o, &mut waiting, &mut answered); waiting.insert(next); }
                    2 => { let o = h.pending(now).1; note(o, &mut waiting, &mut answered); }
                    3 => { if let Ok(o) = h.accept() { note(o, &mut waiting, &mut answered); } }
                    4 => { let _ = h.pause(); }
                    5 => { let o = h.finish("done", None); note(o, &mut waiting, &mut answered); }
                    6 => { let o = h.abort(now).1; note(o, &mut waiting, &mut answered); }
                    _ => { if let Some(&c) = waiting.iter().next() { let o = h.timed_out(c, now); note(o, &mut waiting, &mut answered); } }
                }
                proptest::prop_assert!(answered.values().all(|n| *n == 1));
                if h.phase() == &Phase::Idle {
                    proptest::prop_assert!(waiting.is_empty(), "waiting {:?} with no request", waiting);
                }
            }
        }
    }
}
