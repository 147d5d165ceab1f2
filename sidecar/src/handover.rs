//! Graceful handover: the primary passes its lease to a caught-up replica
//! at once, instead of letting it lapse.
//!
//! Invariant: no acknowledged write is lost, and at most one node serves:
//! the old primary stops taking data commands (`KEEL.HANDOVER PAUSE`)
//! before anything else moves, its held writes become durable and are
//! answered (`KEEL.ACK` up to the offset the pause answered), and only then
//! does it release the lease (`set-leader` from itself to nobody, a
//! compare-and-set in the journal). A successor then takes the lease the
//! ordinary way (`take-lease`, which the journal grants only to a node that
//! applied every record), so no other check is needed for safety; what is
//! here picks *who* and makes it fast.
//!
//! Life cycle (`Handing`, fed by the leading loop in primary.rs):
//! ```text
//!  request (FAILOVER / SHUTDOWN, polled from the module: `watch_requests`)
//!   → choose the successor (`choose`: a live replica, or the `TO` one) and
//!     ACCEPT / REFUSE it in the module
//!   → Announcing: the `handover` record into the stream's metadata (from,
//!     to or any, until); replicas read it at every poll and, while it is
//!     live, poll every `HANDOVER_POLL_MS` instead of `poll_ms`, and only
//!     the named one stands for election
//!   → Noticing: `notice_ms` (one replica poll and a margin) so every
//!     replica saw it; writes still flow meanwhile
//!   → Pausing → Draining: data commands stop; appends continue until the
//!     journal holds the pause's offset and its KEEL.ACK went out
//!   → release (`finish_handover`): set-leader me → nobody, then watch the
//!     stream: another node took the lease → `Stop::HandedOver` (the node
//!     follows); nobody within the record's deadline → `Stop::HandoverAbandoned`
//!     (the node takes its lease back at once: it is caught up by
//!     construction, and leads again).
//! ```
//! Before the pause, any failure just ends the request (the node keeps
//! leading, nothing was paused); after it, the bound is the request's
//! timeout: past it the round stops and the node leads again.

use crate::node::Member;
use crate::node::MEMBER_STALE_MS;

/// The stream metadata key of the current handover record.
pub const HANDOVER_META_KEY: &str = "handover";
/// How often replicas poll the journal while a handover record is live,
/// and the old primary polls for its successor.
pub const HANDOVER_POLL_MS: u64 = 5;
/// How often the primary's sidecar asks its module for a request.
pub const REQUEST_POLL_MS: u64 = 20;
/// Added to a replica's poll period before writes pause, so every replica
/// has read the record and polls fast by then.
pub const NOTICE_MARGIN_MS: u64 = 50;
/// How long after its release the old primary waits for a successor
/// (beyond the request's timeout it never waits).
pub const TAKEOVER_WAIT_MS: u64 = 1_000;

/// The successor an adoption's record names (adopt.rs): nobody stands for
/// election while it stands, whatever the lease.
pub const ADOPTING: &str = "adopting";

/// The record a handing-over primary leaves in the stream's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandoverRecord {
    /// The uuid of the primary handing over.
    pub from: String,
    /// The uuid of the successor; `None`: any caught-up replica.
    pub to: Option<String>,
    /// Wall-clock deadline (Unix ms) after which it means nothing.
    pub until_unix_ms: u64,
}

impl HandoverRecord {
    pub fn encode(&self) -> Vec<u8> {
        format!("{} {} {}\n", self.from, self.to.as_deref().unwrap_or("*"), self.until_unix_ms).into_bytes()
    }

    /// `None` for anything that is not a record (another process may write
    /// the key).
    pub fn decode(b: &[u8]) -> Option<HandoverRecord> {
        let s = std::str::from_utf8(b).ok()?;
        let mut w = s.split_whitespace();
        let (from, to, until) = (w.next()?, w.next()?, w.next()?.parse().ok()?);
        if w.next().is_some() {
            return None;
        }
        Some(HandoverRecord { from: from.into(), to: (to != "*").then(|| to.to_string()), until_unix_ms: until })
    }

    pub fn live(&self, now_unix_ms: u64) -> bool {
        now_unix_ms < self.until_unix_ms
    }

    /// Whether a replica `me` that sees the stream led by `leader` should
    /// poll fast: the record is live and comes from the leader (or the
    /// lease was just released).
    pub fn poll_fast(&self, leader: &str, now_unix_ms: u64) -> bool {
        self.live(now_unix_ms) && !self.adopting() && (leader == self.from || leader.is_empty())
    }

    /// Whether it is an adoption's record (adopt.rs): the stream's primary
    /// is a running Redis outside Keel until its switch.
    pub fn adopting(&self) -> bool {
        self.to.as_deref() == Some(ADOPTING)
    }

    /// Whether the record hands the primary to `me` by name, now.
    pub fn names(&self, me: &str, now_unix_ms: u64) -> bool {
        self.live(now_unix_ms) && self.to.as_deref() == Some(me)
    }

    /// Whether the record keeps `me` from standing for election now: it is
    /// live and names another successor.
    pub fn keeps_out(&self, me: &str, now_unix_ms: u64) -> bool {
        self.live(now_unix_ms) && self.to.as_deref().is_some_and(|to| to != me)
    }
}

/// Who takes over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Successor {
    /// `None`: any caught-up replica (the journal lets the first one in).
    pub uuid: Option<String>,
    /// For messages: its address, or the live replicas' addresses.
    pub describe: String,
}

/// Chooses the successor among the registered `members` (this node is
/// `me`, its Redis at `my_addr`): the `to` one (its Redis `host:port`) if given, else any live
/// replica. Refuses, with what to do, when there is none or `to` is not a
/// live replica of this deployment.
pub fn choose(members: &[Member], me: &str, my_addr: &str, to: Option<&str>, now_unix_ms: u64) -> Result<Successor, String> {
    let live = |m: &&Member| m.uuid != me && m.seen_unix_ms + MEMBER_STALE_MS >= now_unix_ms;
    let replicas: Vec<&Member> = members.iter().filter(live).collect();
    let names = || {
        let v: Vec<&str> = members.iter().filter(|m| m.uuid != me).map(|m| m.redis.as_str()).collect();
        if v.is_empty() { "none registered".to_string() } else { v.join(", ") }
    };
    match to {
        Some(to) => {
            if to == my_addr || members.iter().any(|m| m.uuid == me && m.redis == to) {
                return Err(format!("FAILOVER target {to} is this node, the primary; name one of its replicas ({})", names()));
            }
            match members.iter().find(|m| m.redis == to && m.uuid != me) {
                None => Err(format!("FAILOVER target {to} is not a replica of this Keel deployment (its replicas: {})", names())),
                Some(m) if !replicas.iter().any(|r| r.uuid == m.uuid) => Err(format!(
                    "FAILOVER target {to} has not been heard from for {} s (a replica refreshes its entry every few seconds); \
                     is its keel-sidecar running?",
                    now_unix_ms.saturating_sub(m.seen_unix_ms) / 1000
                )),
                Some(m) => Ok(Successor { uuid: Some(m.uuid.clone()), describe: m.redis.clone() }),
            }
        }
        None if replicas.is_empty() => Err(format!(
            "no replica of this Keel deployment is alive to hand over to (registered: {}); start one, or stop this \
             primary and let the lease lapse",
            names()
        )),
        None => Ok(Successor {
            uuid: None,
            describe: format!("the first caught-up of {}", replicas.iter().map(|m| m.redis.as_str()).collect::<Vec<_>>().join(", ")),
        }),
    }
}

/// A request the leading loop is to carry out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub successor: Successor,
    /// The bound from the pause until the lease is released.
    pub timeout_ms: u64,
    /// `failover` or `shutdown`, for logs.
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    Announcing,
    Noticing { until_ms: u64 },
    Pausing,
    Draining { target: u64, deadline_ms: u64 },
    Drained,
}

/// What the runner is to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Write the record (`HANDOVER_META_KEY`), answer `Handing::announced`.
    Announce(HandoverRecord),
    /// `KEEL.HANDOVER PAUSE`, answer `Handing::paused`.
    Pause,
    /// The journal holds everything the pause covers: release the lease.
    Release,
    /// Nothing was paused: end the request, keep leading.
    GiveUp(String),
    /// Writes were paused: stop this leading round (the next one lifts it).
    Abandon(String),
}

/// One handover in the leading loop (all times monotonic ms).
#[derive(Debug)]
pub struct Handing {
    pub plan: Plan,
    me: String,
    notice_ms: u64,
    phase: Phase,
}

impl Handing {
    /// Starts: the record first, live until the notice, the pause's bound
    /// and the wait for a successor have all passed.
    pub fn start(plan: Plan, me: &str, notice_ms: u64, now_unix_ms: u64) -> (Handing, Action) {
        let until_unix_ms = now_unix_ms + notice_ms + plan.timeout_ms + TAKEOVER_WAIT_MS;
        let record = HandoverRecord { from: me.to_string(), to: plan.successor.uuid.clone(), until_unix_ms };
        (Handing { plan, me: me.to_string(), notice_ms, phase: Phase::Announcing }, Action::Announce(record))
    }

    pub fn announced(&mut self, r: Result<(), String>, now_ms: u64) -> Option<Action> {
        assert_eq!(self.phase, Phase::Announcing, "announced once, first");
        match r {
            Ok(()) => {
                self.phase = Phase::Noticing { until_ms: now_ms + self.notice_ms };
                None
            }
            Err(e) => Some(Action::GiveUp(format!("could not write the handover record: {e}"))),
        }
    }

    /// `KEEL.HANDOVER PAUSE` answered the offset writes stopped at.
    pub fn paused(&mut self, r: Result<u64, String>, now_ms: u64) -> Option<Action> {
        assert_eq!(self.phase, Phase::Pausing, "paused once, after the notice");
        match r {
            Ok(target) => {
                self.phase = Phase::Draining { target, deadline_ms: now_ms + self.plan.timeout_ms };
                None
            }
            // Never paused (FAILOVER ABORT came first, or Redis refused).
            Err(e) => Some(Action::GiveUp(format!("writes were not paused: {e}"))),
        }
    }

    /// Time passed, or the appends moved: `acked` is the last KEEL.ACK sent.
    pub fn tick(&mut self, acked: u64, now_ms: u64) -> Option<Action> {
        match self.phase {
            Phase::Noticing { until_ms } if now_ms >= until_ms => {
                self.phase = Phase::Pausing;
                Some(Action::Pause)
            }
            Phase::Draining { target, .. } if acked >= target => {
                self.phase = Phase::Drained;
                Some(Action::Release)
            }
            Phase::Draining { target, deadline_ms } if now_ms >= deadline_ms => {
                self.phase = Phase::Drained;
                Some(Action::Abandon(format!(
                    "the journal did not hold the paused writes (offset {target}, acknowledged {acked}) within {} ms",
                    self.plan.timeout_ms
                )))
            }
            _ => None,
        }
    }

    /// When to be ticked next, if time alone can move it.
    pub fn wake_at_ms(&self) -> Option<u64> {
        match self.phase {
            Phase::Noticing { until_ms } => Some(until_ms),
            Phase::Draining { deadline_ms, .. } => Some(deadline_ms),
            _ => None,
        }
    }

    pub fn me(&self) -> &str {
        &self.me
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(uuid: &str, redis: &str, seen: u64) -> Member {
        Member { uuid: uuid.into(), redis: redis.into(), sentinel: String::new(), seen_unix_ms: seen, engine: String::new() }
    }

    #[test]
    fn an_adoptions_record_keeps_every_node_out_and_nobody_polling_fast() {
        let r = HandoverRecord { from: "adopter".into(), to: Some(ADOPTING.into()), until_unix_ms: u64::MAX };
        assert_eq!(HandoverRecord::decode(&r.encode()), Some(r.clone()), "it round-trips");
        assert!(r.adopting());
        assert!(r.keeps_out("any-node", 1) && r.keeps_out("another", u64::MAX - 1));
        assert!(!r.poll_fast("adopter", 1), "nodes poll at their own pace during an adoption");
        let plain = HandoverRecord { from: "a".into(), to: None, until_unix_ms: 100 };
        assert!(!plain.adopting());
    }

    #[test]
    fn records_round_trip_and_junk_is_no_record() {
        let r = HandoverRecord { from: "a".into(), to: Some("b".into()), until_unix_ms: 7 };
        assert_eq!(HandoverRecord::decode(&r.encode()), Some(r));
        let any = HandoverRecord { from: "a".into(), to: None, until_unix_ms: 9 };
        assert_eq!(HandoverRecord::decode(&any.encode()), Some(any));
        for junk in [&b""[..], b"a b", b"a b c", b"a b 1 2", b"\xff b 1"] {
            assert_eq!(HandoverRecord::decode(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn a_live_record_speeds_replicas_up_and_keeps_the_others_out() {
        let r = HandoverRecord { from: "old".into(), to: Some("b".into()), until_unix_ms: 100 };
        assert!(r.poll_fast("old", 99) && r.poll_fast("", 99));
        assert!(!r.poll_fast("b", 99), "the successor leads: back to normal");
        assert!(!r.poll_fast("old", 100), "expired");
        assert!(r.keeps_out("c", 99) && !r.keeps_out("b", 99) && !r.keeps_out("c", 100));
        assert!(r.names("b", 99) && !r.names("c", 99) && !r.names("b", 100));
        let any = HandoverRecord { to: None, ..r };
        assert!(!any.keeps_out("c", 99));
    }

    #[test]
    fn the_successor_is_a_live_replica_of_this_deployment() {
        let now = 1_000_000;
        let ms = vec![m("me", "h:1", now), m("b", "h:2", now - 1000), m("c", "h:3", now - MEMBER_STALE_MS - 1)];
        let s = choose(&ms, "me", "h:1", None, now).unwrap();
        assert_eq!(s.uuid, None);
        assert!(s.describe.contains("h:2") && !s.describe.contains("h:3"), "{}", s.describe);
        assert_eq!(choose(&ms, "me", "h:1", Some("h:2"), now).unwrap().uuid.as_deref(), Some("b"));
        let e = choose(&ms, "me", "h:1", Some("h:9"), now).unwrap_err();
        assert!(e.contains("not a replica of this Keel deployment") && e.contains("h:2, h:3"), "{e}");
        assert!(choose(&ms, "me", "h:1", Some("h:1"), now).unwrap_err().contains("is this node"));
        assert!(choose(&ms, "me", "h:1", Some("h:3"), now).unwrap_err().contains("has not been heard from"));
        let alone = vec![m("me", "h:1", now)];
        assert!(choose(&alone, "me", "h:1", None, now).unwrap_err().contains("no replica"));
        assert!(choose(&[], "me", "h:1", None, now).unwrap_err().contains("none registered"));
    }

    fn plan() -> Plan {
        Plan { successor: Successor { uuid: None, describe: "any".into() }, timeout_ms: 500, reason: "failover".into() }
    }

    #[test]
    fn announce_notice_pause_drain_release() {
        let (mut h, a) = Handing::start(plan(), "me", 250, 1_000);
        assert_eq!(a, Action::Announce(HandoverRecord { from: "me".into(), to: None, until_unix_ms: 1_000 + 250 + 500 + TAKEOVER_WAIT_MS }));
        assert_eq!(h.tick(0, 10), None, "nothing before the record is written");
        assert_eq!(h.announced(Ok(()), 10), None);
        assert_eq!(h.wake_at_ms(), Some(260));
        assert_eq!(h.tick(0, 259), None, "writes flow during the notice");
        assert_eq!(h.tick(0, 260), Some(Action::Pause));
        assert_eq!(h.tick(0, 261), None);
        assert_eq!(h.paused(Ok(900), 270), None);
        assert_eq!(h.tick(899, 280), None, "not all held writes are acknowledged");
        assert_eq!(h.tick(900, 281), Some(Action::Release));
        assert_eq!(h.tick(900, 10_000), None, "released once");
    }

    #[test]
    fn failures_before_the_pause_give_up_and_after_it_abandon() {
        let (mut h, _) = Handing::start(plan(), "me", 250, 0);
        assert!(matches!(h.announced(Err("journal down".into()), 1), Some(Action::GiveUp(_))));
        let (mut h, _) = Handing::start(plan(), "me", 250, 0);
        h.announced(Ok(()), 0);
        assert_eq!(h.tick(0, 250), Some(Action::Pause));
        assert!(matches!(h.paused(Err("aborted".into()), 251), Some(Action::GiveUp(_))));
        let (mut h, _) = Handing::start(plan(), "me", 250, 0);
        h.announced(Ok(()), 0);
        h.tick(0, 250);
        h.paused(Ok(100), 250);
        assert_eq!(h.wake_at_ms(), Some(750));
        assert_eq!(h.tick(50, 749), None);
        assert!(matches!(h.tick(50, 750), Some(Action::Abandon(_))));
    }
}

// ---------------------------------------------------------------- I/O

/// Until when (Unix ms) this node polls the journal every
/// `HANDOVER_POLL_MS`: set by the primary handing over and by a replica
/// that read a live record; read by the discovery view's refresh (node.rs).
/// One node per process.
static POLL_FAST_UNTIL_UNIX_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub fn poll_fast_until(unix_ms: u64) {
    POLL_FAST_UNTIL_UNIX_MS.fetch_max(unix_ms, std::sync::atomic::Ordering::Relaxed);
}

/// How long to wait before the next poll of `poll_ms`.
pub fn poll_pause_ms(poll_ms: u64, now_unix_ms: u64) -> u64 {
    if now_unix_ms < POLL_FAST_UNTIL_UNIX_MS.load(std::sync::atomic::Ordering::Relaxed) {
        poll_ms.min(HANDOVER_POLL_MS)
    } else {
        poll_ms
    }
}

pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

use std::sync::Arc;

use keel_journal_client::client::JournalClient;

use crate::primary::PrimaryConfig;
use crate::primary::Stop;
use crate::redis::Conn;
use crate::resp::Reply;

/// One command to the local Redis on a fresh connection, within the lease.
pub async fn module_command(cfg: &PrimaryConfig, args: &[&[u8]]) -> Result<Reply, String> {
    crate::redis::within(&cfg.redis, cfg.lease_ms, async { Conn::connect(&cfg.redis, &cfg.control).await?.request(args).await }).await
}

/// A request taken up from the module, or a step's outcome.
#[derive(Debug)]
pub enum Event {
    Request(Plan),
    Announced(Result<(), String>),
    Paused(Result<u64, String>),
}

/// While this node leads: asks the module for a FAILOVER/SHUTDOWN request
/// every `REQUEST_POLL_MS`, checks it against the deployment's members,
/// and accepts it (then hands the plan to the leading loop) or refuses it.
pub async fn watch_requests(cfg: PrimaryConfig, journal: Arc<JournalClient>, me: String, tx: tokio::sync::mpsc::UnboundedSender<Event>) {
    let mut conn: Option<Conn> = None;
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(REQUEST_POLL_MS)).await;
        if conn.is_none() {
            match crate::redis::within(&cfg.redis, cfg.lease_ms, Conn::connect(&cfg.redis, &cfg.control)).await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    tracing::debug!(error = %e, "handover requests: no connection to Redis");
                    continue;
                }
            }
        }
        let c = conn.as_mut().expect("connected");
        let got = crate::redis::within(&cfg.redis, cfg.lease_ms, c.request(&[b"KEEL.HANDOVER", b"GET"])).await;
        let line = match got {
            Ok(Reply::Bulk(Some(b))) => String::from_utf8_lossy(&b).into_owned(),
            Ok(Reply::Bulk(None)) => continue,
            Ok(other) => {
                tracing::debug!(reply = ?other, "KEEL.HANDOVER GET");
                continue;
            }
            Err(e) => {
                tracing::debug!(error = %e, "KEEL.HANDOVER GET");
                conn = None;
                continue;
            }
        };
        let mut w = line.split_whitespace();
        let (to, reason, timeout_ms) = (w.next().unwrap_or("*"), w.next().unwrap_or("failover").to_string(), w.next().and_then(|t| t.parse().ok()).unwrap_or(2_000));
        let to = (to != "*").then_some(to);
        let members = journal.get_meta(&cfg.stream, crate::node::MEMBERS_KEY).await.map(|m| m.as_deref().map(crate::node::parse_members).unwrap_or_default());
        let chosen = match members {
            Ok(members) => choose(&members, &me, &cfg.announce, to, now_unix_ms()),
            Err(e) => Err(format!("the journal did not list this deployment's nodes ({e}); try again")),
        };
        let reply = match &chosen {
            Ok(s) => {
                tracing::info!(reason, successor = %s.describe, timeout_ms, "handover requested; handing over");
                c.request(&[b"KEEL.HANDOVER", b"ACCEPT"]).await
            }
            Err(why) => {
                tracing::warn!(reason, %why, "handover refused");
                c.request(&[b"KEEL.HANDOVER", b"REFUSE", why.as_bytes()]).await
            }
        };
        match (reply, chosen) {
            (Ok(Reply::Status(_)), Ok(successor)) => {
                let sent = tx.send(Event::Request(Plan { successor, timeout_ms, reason }));
                if sent.is_err() {
                    return; // the leading round ended
                }
            }
            (Ok(Reply::Error(e)), _) => tracing::info!(error = %e, "the handover request ended before it was taken up"),
            (Err(e), _) => {
                tracing::warn!(error = %e, "KEEL.HANDOVER ACCEPT/REFUSE");
                conn = None;
            }
            _ => {}
        }
    }
}

/// Writes the handover record (compare-and-set over whatever is there).
pub async fn announce(journal: &JournalClient, stream: &str, record: &HandoverRecord) -> Result<(), String> {
    let old = journal.get_meta(stream, HANDOVER_META_KEY).await.map_err(|e| e.to_string())?;
    journal.cas_meta(stream, HANDOVER_META_KEY, old, record.encode()).await.map_err(|e| e.to_string())
}

/// `KEEL.HANDOVER PAUSE`: the replication offset writes stopped at.
pub async fn pause(cfg: &PrimaryConfig) -> Result<u64, String> {
    match module_command(cfg, &[b"KEEL.HANDOVER", b"PAUSE"]).await? {
        Reply::Int(o) if o >= 0 => Ok(o as u64),
        Reply::Error(e) => Err(e),
        other => Err(format!("unexpected answer {other:?}")),
    }
}

/// Ends the module's request with `outcome` (`successor`: handed over).
pub async fn finish(cfg: &PrimaryConfig, outcome: &str, successor: Option<&str>) {
    let mut args: Vec<&[u8]> = vec![b"KEEL.HANDOVER", b"FINISH", outcome.as_bytes()];
    if let Some(s) = successor {
        args.push(s.as_bytes());
    }
    if let Err(e) = module_command(cfg, &args).await {
        tracing::warn!(error = %e, "could not tell the module how the handover ended");
    }
}

/// Writes are paused and durable: releases the lease and waits for a
/// successor to take it. `paused_at`: when writes stopped.
pub async fn release(cfg: &PrimaryConfig, journal: &JournalClient, me: &str, plan: &Plan, paused_at: std::time::Instant) -> Stop {
    match journal.set_leader(&cfg.stream, "", me).await {
        Ok(_) => tracing::info!(after_pause_ms = paused_at.elapsed().as_millis() as u64, "released the lease to the successor"),
        Err(e) => tracing::warn!(error = %e, "releasing the lease: no clear answer; looking at the stream"),
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(TAKEOVER_WAIT_MS);
    loop {
        match journal.stream_info(&cfg.stream).await {
            Ok(i) if i.leader_uuid == me => {
                let why = "the journal kept this node as the stream's leader; the handover is abandoned".to_string();
                finish(cfg, &why, None).await;
                return Stop::HandoverAbandoned(why);
            }
            Ok(i) if !i.leader_uuid.is_empty() => {
                let members = journal.get_meta(&cfg.stream, crate::node::MEMBERS_KEY).await.ok().flatten();
                let members = members.as_deref().map(crate::node::parse_members).unwrap_or_default();
                let addr = members.iter().find(|m| m.uuid == i.leader_uuid).map(|m| m.redis.clone()).unwrap_or_else(|| i.leader_uuid.clone());
                let paused_ms = paused_at.elapsed().as_millis() as u64;
                let outcome = format!("handed over to {addr} ({}; writes paused {paused_ms} ms until it took the lease)", plan.reason);
                tracing::info!(successor = %addr, paused_ms, "handed the primary role over");
                finish(cfg, &outcome, Some(&addr)).await;
                return Stop::HandedOver(outcome);
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "stream info during the handover"),
        }
        if std::time::Instant::now() >= deadline {
            let why = format!("no replica took the released lease within {TAKEOVER_WAIT_MS} ms (none caught up?); this node takes it back");
            finish(cfg, &why, None).await;
            return Stop::HandoverAbandoned(why);
        }
        tokio::time::sleep(std::time::Duration::from_millis(HANDOVER_POLL_MS)).await;
    }
}
