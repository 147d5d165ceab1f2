//! Writers for tests of a role change: one per node, each writing
//! numbered keys to its own node whatever its role, logging what that node
//! acknowledged; and the check every such test ends with (`check_acks`).

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::Duration;
use std::time::Instant;

use crate::KeelCluster;
use crate::Resp;
use crate::journaled_commands;

/// A write node `node` acknowledged (`key` is `w<node>:<n>`, value `n`).
#[derive(Debug, Clone)]
pub struct Ack {
    pub key: String,
    pub node: usize,
    pub at: Instant,
}

/// One writer per node, each writing `w<node>:<n>` keys to its node only,
/// whatever its role; acknowledged ones are logged.
pub struct Writers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Vec<Ack>>>,
}

impl Writers {
    /// Starts the writers; a refused write is followed by `refused_pause`.
    pub fn start(c: &KeelCluster, refused_pause: Duration) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = c
            .nodes
            .iter()
            .enumerate()
            .map(|(node, n)| {
                let (addr, stop) = (n.addr(), stop.clone());
                std::thread::spawn(move || {
                    let mut acks = Vec::new();
                    let mut conn: Option<Resp> = None;
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let key = format!("w{node}:{n}");
                        if conn.is_none() {
                            conn = Resp::try_connect(&addr, Duration::from_secs(2)).ok();
                        }
                        let Some(c) = conn.as_mut() else {
                            std::thread::sleep(Duration::from_millis(20));
                            continue;
                        };
                        match c.try_cmd(&["SET", &key, &n.to_string()]) {
                            Ok(r) if r == "+OK" => acks.push(Ack { key, node, at: Instant::now() }),
                            Ok(_) => std::thread::sleep(refused_pause),
                            Err(_) => conn = None,
                        }
                    }
                    acks
                })
            })
            .collect();
        Writers { stop, threads }
    }

    /// Stops the writers; every acknowledgement, in time order.
    pub fn finish(self) -> Vec<Ack> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all: Vec<Ack> = self.threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
        all.sort_by_key(|a| a.at);
        all
    }
}

/// The checks every scenario ends with: no acknowledged write is lost (on
/// the final primary, and in the journal) and acknowledgements come in one
/// run per tenure, never interleaved. Returns the runs (node, count) in
/// time order and the final primary.
pub fn check_acks(c: &KeelCluster, acks: &[Ack]) -> (Vec<(usize, usize)>, usize) {
    assert!(!acks.is_empty(), "no write was acknowledged at all");
    let p = c.wait_new_primary(None, Duration::from_secs(10));
    // Acknowledgements by time: one run per tenure.
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for a in acks {
        match runs.last_mut() {
            Some((n, k)) if *n == a.node => *k += 1,
            _ => runs.push((a.node, 1)),
        }
    }
    let mut seen = std::collections::HashSet::new();
    for (n, _) in &runs {
        assert!(seen.insert(*n), "node {n} acknowledged writes in two separate periods, interleaved with another node: {runs:?}");
    }
    // Nothing acknowledged is lost: on the primary, and in the journal.
    let mut r = Resp::connect(&c.nodes[p].addr());
    for a in acks {
        let want = a.key.split(':').nth(1).unwrap();
        assert_eq!(r.cmd(&["GET", &a.key]), want, "acknowledged {} (by node {}) is not on the primary", a.key, a.node);
    }
    let journaled: std::collections::HashSet<String> = journaled_commands(&c.journal, "shard-1")
        .into_iter()
        .filter(|cmd| cmd.len() == 3 && cmd[0].eq_ignore_ascii_case("set"))
        .map(|cmd| cmd[1].clone())
        .collect();
    for a in acks {
        assert!(journaled.contains(&a.key), "acknowledged {} is not in the journal", a.key);
    }
    (runs, p)
}
