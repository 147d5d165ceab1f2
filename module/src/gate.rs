//! Whether this node may serve data commands at all.
//!
//! Invariant: a primary serves data (reads or writes) only while it holds
//! the stream's lease, as its sidecar last renewed it, minus a drift margin
//! the sidecar already took off. Once the lease may have lapsed, another
//! node may lead the stream and take writes; serving a read here could then
//! return stale data, so nothing is served until a renewal arrives.
//!
//! Life cycle:
//! - a redis-server starts as a primary without a lease: it refuses data
//!   commands until its sidecar has taken the lease (`KEEL.LEASE`);
//! - the sidecar renews the lease and sends each new deadline, on the
//!   machine's monotonic clock, so a Redis that was paused (SIGSTOP) finds
//!   the deadline already past when it wakes up;
//! - `KEEL.FENCED`: the journal chose another leader; nothing is served;
//! - a graceful handover (handover.rs): `KEEL.HANDOVER PAUSE` stops every
//!   data command (held ones finish) while the held writes become durable
//!   and the sidecar passes the lease on; `KEEL.HANDOVER FINISH` with a
//!   successor keeps refusing, naming the hand-over; a new leading round of
//!   this node's sidecar (`KEEL.LEADER`) lifts the pause (the handover was
//!   abandoned and the node took its lease back);
//! - turning into a replica (the sidecar makes it one to resync): Redis
//!   serves reads natively and refuses writes with its own `-READONLY`;
//!   the lease and fence are forgotten, a later promotion starts without a
//!   lease again.

/// What the command filter does with a data command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// A replica: Redis serves it itself (reads; `-READONLY` for writes).
    Native,
    /// A primary with a valid lease: the usual holding rules apply.
    Serve,
    /// Refused with this error (no lease, lapsed lease, fenced).
    Refuse(&'static str),
}

pub const NO_LEASE: &str = "READONLY Keel: this node does not hold the primary lease (yet); retry against the current primary";
pub const LAPSED: &str = "READONLY Keel: this node's primary lease lapsed; retry against the current primary";
pub const FENCED: &str = "READONLY Keel: this node was fenced: another node leads the journal stream; retry against the current primary";
pub const HANDING_OVER: &str = "READONLY Keel: this node is handing the primary role over (FAILOVER or SHUTDOWN); retry against the current primary";
pub const HANDED_OVER: &str = "READONLY Keel: this node handed the primary role over to another node; retry against the current primary";

/// Where a graceful handover stands, as far as serving goes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum HandoverGate {
    #[default]
    None,
    /// Data commands stop: the held writes drain and the lease passes on.
    Paused,
    /// The lease passed to a successor.
    HandedOver,
}

#[derive(Debug, Clone, Default)]
pub struct Gate {
    replica: bool,
    fenced: bool,
    handover: HandoverGate,
    /// Monotonic milliseconds until which the lease holds.
    lease_until_ms: Option<u64>,
}

impl Gate {
    pub fn new(replica: bool) -> Gate {
        Gate { replica, ..Gate::default() }
    }

    pub fn decide(&self, now_ms: u64) -> Decision {
        if self.replica {
            return Decision::Native;
        }
        if self.fenced {
            return Decision::Refuse(FENCED);
        }
        match self.handover {
            HandoverGate::None => {}
            HandoverGate::Paused => return Decision::Refuse(HANDING_OVER),
            HandoverGate::HandedOver => return Decision::Refuse(HANDED_OVER),
        }
        match self.lease_until_ms {
            None => Decision::Refuse(NO_LEASE),
            Some(t) if now_ms >= t => Decision::Refuse(LAPSED),
            Some(_) => Decision::Serve,
        }
    }

    /// Whether a held write the journal confirmed may be answered now: the
    /// node holds its lease, and has not handed it over. Unlike serving, a
    /// handover's pause does not stop it: the writes held at the pause are
    /// confirmed and answered before the lease is released (handover.rs).
    pub fn confirms(&self, now_ms: u64) -> bool {
        !self.replica
            && !self.fenced
            && self.handover != HandoverGate::HandedOver
            && self.lease_until_ms.is_some_and(|t| now_ms < t)
    }

    /// The sidecar renewed the lease until `until_ms`. A deadline never
    /// moves back within one tenure (renewals may arrive out of order).
    pub fn lease(&mut self, until_ms: u64) -> Result<(), &'static str> {
        if self.replica {
            return Err("ERR this node is a replica; it cannot hold the lease");
        }
        if self.fenced {
            return Err("ERR this node was fenced; it must resync as a replica first");
        }
        self.lease_until_ms = Some(self.lease_until_ms.unwrap_or(0).max(until_ms));
        Ok(())
    }

    pub fn fence(&mut self) {
        self.fenced = true;
        self.lease_until_ms = None;
    }

    /// A graceful handover paused data commands, or handed the role over.
    pub fn handover(&mut self, h: HandoverGate) -> Result<(), &'static str> {
        if self.replica || self.fenced || (h == HandoverGate::Paused && self.lease_until_ms.is_none()) {
            return Err("ERR this node is not a primary holding the lease; there is nothing to hand over");
        }
        self.handover = h;
        Ok(())
    }

    /// This node's sidecar leads again (`KEEL.LEADER`): a handover it
    /// abandoned no longer pauses anything.
    pub fn leading(&mut self) {
        self.handover = HandoverGate::None;
    }

    /// Redis changed role (REPLICAOF): a new tenure starts, without lease.
    pub fn role_changed(&mut self, replica: bool) {
        *self = Gate::new(replica);
    }

    pub fn is_replica(&self) -> bool {
        self.replica
    }

    pub fn is_fenced(&self) -> bool {
        self.fenced
    }

    /// Milliseconds the lease still holds (0 when none or lapsed).
    pub fn lease_remaining_ms(&self, now_ms: u64) -> u64 {
        self.lease_until_ms.map(|t| t.saturating_sub(now_ms)).unwrap_or(0)
    }

    pub fn role_name(&self, now_ms: u64) -> &'static str {
        match self.decide(now_ms) {
            Decision::Native => "replica",
            Decision::Serve => "primary",
            Decision::Refuse(r) if r == FENCED => "fenced",
            Decision::Refuse(r) if r == HANDING_OVER => "primary-handing-over",
            Decision::Refuse(r) if r == HANDED_OVER => "handed-over",
            Decision::Refuse(_) => "primary-without-lease",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_primary_serves_only_inside_its_lease() {
        let mut g = Gate::new(false);
        assert_eq!(g.decide(0), Decision::Refuse(NO_LEASE));
        g.lease(1000).unwrap();
        assert_eq!(g.decide(999), Decision::Serve);
        assert_eq!(g.decide(1000), Decision::Refuse(LAPSED));
        // An older renewal arriving late does not shorten the lease.
        g.lease(500).unwrap();
        assert_eq!(g.decide(999), Decision::Serve);
        g.lease(2000).unwrap();
        assert_eq!(g.decide(1500), Decision::Serve);
        assert_eq!(g.lease_remaining_ms(1500), 500);
    }

    #[test]
    fn fencing_is_final_until_the_node_resyncs() {
        let mut g = Gate::new(false);
        g.lease(10_000).unwrap();
        g.fence();
        assert_eq!(g.decide(1), Decision::Refuse(FENCED));
        assert!(g.lease(20_000).is_err());
        assert_eq!(g.decide(1), Decision::Refuse(FENCED));
        g.role_changed(true);
        assert_eq!(g.decide(1), Decision::Native);
        assert!(g.lease(20_000).is_err(), "a replica holds no lease");
        g.role_changed(false);
        assert_eq!(g.decide(1), Decision::Refuse(NO_LEASE), "a promotion starts without a lease");
    }

    #[test]
    fn a_handover_pauses_until_the_role_changes_or_the_sidecar_leads_again() {
        let mut g = Gate::new(false);
        assert!(g.handover(HandoverGate::Paused).is_err(), "no lease, nothing to hand over");
        g.lease(1000).unwrap();
        g.handover(HandoverGate::Paused).unwrap();
        assert_eq!(g.decide(1), Decision::Refuse(HANDING_OVER));
        assert!(g.confirms(1), "the writes held at the pause are still answered");
        assert!(!g.confirms(1000), "but not once the lease lapsed");
        assert_eq!(g.role_name(1), "primary-handing-over");
        g.lease(2000).unwrap();
        assert_eq!(g.decide(1), Decision::Refuse(HANDING_OVER), "a renewal does not lift the pause");
        g.leading();
        assert_eq!(g.decide(1), Decision::Serve, "abandoned: the sidecar leads again");
        g.handover(HandoverGate::Paused).unwrap();
        g.handover(HandoverGate::HandedOver).unwrap();
        assert_eq!(g.decide(1), Decision::Refuse(HANDED_OVER));
        assert!(!g.confirms(1), "handed over: nothing is confirmed here any more");
        g.role_changed(true);
        assert_eq!(g.decide(1), Decision::Native);
        assert!(g.handover(HandoverGate::Paused).is_err());
        g.role_changed(false);
        g.fence();
        assert!(g.handover(HandoverGate::Paused).is_err());
    }

    #[test]
    fn every_history_of_events_keeps_the_invariant() {
        // Events: lease(t) for a few t, fence, become replica, become primary.
        #[derive(Clone, Copy, Debug)]
        enum Ev {
            Lease(u64),
            Fence,
            Replica,
            Primary,
        }
        let evs = [Ev::Lease(5), Ev::Lease(10), Ev::Fence, Ev::Replica, Ev::Primary];
        let mut histories = vec![vec![]];
        for _ in 0..5 {
            let mut next = Vec::new();
            for h in &histories {
                for e in evs {
                    let mut h2: Vec<Ev> = h.clone();
                    h2.push(e);
                    next.push(h2);
                }
            }
            histories.extend(next.clone());
            histories = histories.into_iter().filter(|h| h.len() <= 5).collect();
            histories.sort_by_key(|h| format!("{h:?}"));
            histories.dedup_by_key(|h| format!("{h:?}"));
        }
        for h in histories {
            let mut g = Gate::new(false);
            // Naive model: serving needs primary, not fenced since the last
            // role change, and a lease granted since then, later than now.
            let (mut replica, mut fenced, mut best): (bool, bool, Option<u64>) = (false, false, None);
            for e in &h {
                match *e {
                    Ev::Lease(t) => {
                        let ok = g.lease(t).is_ok();
                        assert_eq!(ok, !replica && !fenced, "{h:?}");
                        if ok {
                            best = Some(best.unwrap_or(0).max(t));
                        }
                    }
                    Ev::Fence => {
                        g.fence();
                        fenced = true;
                        best = None;
                    }
                    Ev::Replica | Ev::Primary => {
                        replica = matches!(e, Ev::Replica);
                        g.role_changed(replica);
                        fenced = false;
                        best = None;
                    }
                }
                for now in [0, 4, 5, 9, 10, 11] {
                    let serve = !replica && !fenced && best.is_some_and(|b| now < b);
                    assert_eq!(g.decide(now) == Decision::Serve, serve, "{h:?} at {now}");
                    assert_eq!(g.confirms(now), serve, "without a handover, confirming is serving: {h:?} at {now}");
                    assert_eq!(g.decide(now) == Decision::Native, replica, "{h:?} at {now}");
                }
            }
        }
    }
}
