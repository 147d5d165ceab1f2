//! Membership changes of the journal: which changes are allowed, decided
//! without I/O (the Raft leader runs them through openraft's membership
//! API, server.rs).
//!
//! Life cycle of a node: `AddNode` makes it a learner (openraft replicates
//! the log, or a snapshot, to it) and, once it has caught up, a voter;
//! `RemoveNode` takes it out of the voters and out of the cluster. A node
//! removed while it is the Raft leader first hands leadership to a voter
//! that stays.
//!
//! Invariants (checked by `check`, property-tested below):
//! - a change never leaves the journal without a voter;
//! - a change is refused unless, counting only the voters the leader has
//!   heard from within `ANSWERED_WITHIN`, both the current voters and the
//!   voters after the change hold a majority (joint consensus commits only
//!   with both), so a change cannot strand the journal without a quorum;
//! - at most `MAX_VOTERS` voters.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::time::Duration;

use crate::types::NodeId;

/// Most voters a journal may have (each is a copy of every record and a
/// vote on every commit; 7 tolerates 3 failures).
pub const MAX_VOTERS: usize = 7;
/// A voter the Raft leader heard from within this long counts as answering.
pub const ANSWERED_WITHIN: Duration = Duration::from_secs(2);

/// A requested change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Add(NodeId),
    Remove(NodeId),
}

/// What the leader should do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Nothing: the node already is (or already is not) a voter.
    Nothing,
    /// Propose these voters.
    Voters(BTreeSet<NodeId>),
    /// This node is the leader and is to be removed: hand leadership to
    /// `to` first, then the new leader removes it.
    HandOver { to: NodeId },
}

fn majority(n: usize) -> usize {
    n / 2 + 1
}

/// Decides `change` for a journal whose voters are the keys of `answering`
/// (whether the leader heard from each within `ANSWERED_WITHIN`; the leader
/// itself counts as answering), led by `leader`.
pub fn check(answering: &BTreeMap<NodeId, bool>, leader: NodeId, change: Change) -> Result<Plan, String> {
    let voters: BTreeSet<NodeId> = answering.keys().copied().collect();
    let up = |set: &BTreeSet<NodeId>| set.iter().filter(|id| **id == leader || answering.get(id).copied().unwrap_or(true)).count();
    let list = |set: &BTreeSet<NodeId>| set.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",");
    let new = match change {
        Change::Add(id) if voters.contains(&id) => return Ok(Plan::Nothing),
        Change::Remove(id) if !voters.contains(&id) => return Ok(Plan::Nothing),
        Change::Add(id) => {
            if voters.len() >= MAX_VOTERS {
                return Err(format!("the journal already has {} voters ({}), the most it may have is {MAX_VOTERS}; remove one first", voters.len(), list(&voters)));
            }
            let mut v = voters.clone();
            v.insert(id);
            v
        }
        Change::Remove(id) => {
            if voters.len() == 1 {
                return Err(format!("node {id} is the journal's only voter; add another node before removing it"));
            }
            let mut v = voters.clone();
            v.remove(&id);
            v
        }
    };
    let (now_up, new_up) = (up(&voters), up(&new));
    if now_up < majority(voters.len()) {
        return Err(format!(
            "only {now_up} of the journal's {} voters ({}) answer, fewer than a majority: no change can commit; bring a node back first",
            voters.len(),
            list(&voters)
        ));
    }
    if new_up < majority(new.len()) {
        return Err(format!(
            "after this change {new_up} of {} voters ({}) would answer, fewer than the {} a quorum needs; bring the silent nodes back (or remove them) first",
            new.len(),
            list(&new),
            majority(new.len())
        ));
    }
    if change == Change::Remove(leader) {
        // The voter that stays and answers, the lowest id for a fixed choice.
        let to = new
            .iter()
            .copied()
            .find(|id| answering.get(id).copied().unwrap_or(false))
            .ok_or_else(|| format!("no other voter answers to take over from the leader {leader}"))?;
        return Ok(Plan::HandOver { to });
    }
    Ok(Plan::Voters(new))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn voters(v: &[(NodeId, bool)]) -> BTreeMap<NodeId, bool> {
        v.iter().copied().collect()
    }

    #[test]
    fn replacing_a_node_of_three() {
        let all = voters(&[(1, true), (2, true), (3, true)]);
        assert_eq!(check(&all, 1, Change::Add(4)), Ok(Plan::Voters([1, 2, 3, 4].into())));
        assert_eq!(check(&all, 1, Change::Remove(3)), Ok(Plan::Voters([1, 2].into())));
        assert_eq!(check(&all, 1, Change::Remove(1)), Ok(Plan::HandOver { to: 2 }));
        assert_eq!(check(&all, 1, Change::Add(2)), Ok(Plan::Nothing));
        assert_eq!(check(&all, 1, Change::Remove(9)), Ok(Plan::Nothing));
    }

    #[test]
    fn a_dead_node_can_be_removed_but_not_joined_by_a_second_silence() {
        let one_dead = voters(&[(1, true), (2, true), (3, false)]);
        assert_eq!(check(&one_dead, 1, Change::Remove(3)), Ok(Plan::Voters([1, 2].into())));
        // 4 voters with 2 answering (the new one counts: it caught up) is 3 of 4.
        assert_eq!(check(&one_dead, 1, Change::Add(4)), Ok(Plan::Voters([1, 2, 3, 4].into())));
        // Removing a live node would leave 1 of 2.
        let e = check(&one_dead, 1, Change::Remove(2)).unwrap_err();
        assert!(e.contains("1 of 2 voters (1,3) would answer"), "{e}");
        let two_dead = voters(&[(1, true), (2, false), (3, false)]);
        let e = check(&two_dead, 1, Change::Remove(3)).unwrap_err();
        assert!(e.contains("only 1 of the journal's 3 voters"), "{e}");
    }

    #[test]
    fn limits() {
        let e = check(&voters(&[(1, true)]), 1, Change::Remove(1)).unwrap_err();
        assert!(e.contains("only voter"), "{e}");
        let seven: BTreeMap<NodeId, bool> = (1..=7).map(|i| (i, true)).collect();
        assert!(check(&seven, 1, Change::Add(8)).unwrap_err().contains("most it may have is 7"));
        // The leader hands over to a voter that answers.
        let e = check(&voters(&[(1, true), (2, false), (3, true), (4, true)]), 1, Change::Remove(1));
        assert_eq!(e, Ok(Plan::HandOver { to: 3 }));
        // Removing the leader of {1, 2, 3} with 2 silent would leave 1 of 2.
        assert!(check(&voters(&[(1, true), (2, false), (3, true)]), 1, Change::Remove(1)).is_err());
    }

    proptest! {
        /// Whatever the plan, the voters it proposes are not empty, at most
        /// MAX_VOTERS, and hold an answering majority, as do the voters
        /// before it; a hand-over goes to an answering voter that stays.
        #[test]
        fn a_plan_always_keeps_a_quorum(
            states in proptest::collection::btree_map(1u64..10, any::<bool>(), 1..9),
            leader_pick in 0usize..9,
            add in any::<bool>(),
            target in 1u64..12,
        ) {
            let mut states = states;
            let leader = *states.keys().nth(leader_pick % states.len()).unwrap();
            states.insert(leader, true);
            let change = if add { Change::Add(target) } else { Change::Remove(target) };
            let answering = |id: &NodeId| states.get(id).copied().unwrap_or(true);
            let majority_up = |set: &BTreeSet<NodeId>| set.iter().filter(|i| answering(i)).count() >= set.len() / 2 + 1;
            let before: BTreeSet<NodeId> = states.keys().copied().collect();
            match check(&states, leader, change) {
                Ok(Plan::Voters(v)) => {
                    prop_assert!(!v.is_empty() && v.len() <= MAX_VOTERS);
                    prop_assert!(majority_up(&v) && majority_up(&before));
                    prop_assert_ne!(change, Change::Remove(leader));
                }
                Ok(Plan::HandOver { to }) => {
                    prop_assert_eq!(change, Change::Remove(leader));
                    prop_assert!(to != leader && states[&to]);
                }
                Ok(Plan::Nothing) => {
                    let already = match change {
                        Change::Add(id) => before.contains(&id),
                        Change::Remove(id) => !before.contains(&id),
                    };
                    prop_assert!(already);
                }
                Err(e) => prop_assert!(!e.is_empty()),
            }
        }
    }
}
