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

/// An unmodified redis-py Sentinel client (a Python process) writing
/// `py:<n>` = n through discovery for a while, reporting each write's
/// outcome and, for an acknowledged one, the primary's port.
pub struct PyClient {
    child: std::process::Child,
}

const PY_CLIENT: &str = r#"
import sys, time
from redis.sentinel import Sentinel
from redis.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError, TimeoutError, ReadOnlyError
sentinels = [(a.split(':')[0], int(a.split(':')[1])) for a in sys.argv[1].split(',')]
s = Sentinel(sentinels, socket_timeout=1.0)
if sys.argv[4] == 'retry':
    # redis-py's own retries, as an application configures them: on a lost
    # connection, a timeout, -READONLY (a Sentinel client then asks for the
    # master again), up to about 4 s in all.
    m = s.master_for('keel', socket_timeout=1.0, retry=Retry(ExponentialBackoff(cap=0.1, base=0.005), 40),
                     retry_on_error=[ConnectionError, TimeoutError, ReadOnlyError])
else:
    m = s.master_for('keel', socket_timeout=1.0)
end = time.time() + float(sys.argv[2])
pause = float(sys.argv[3])
i = 0
while time.time() < end:
    i += 1
    try:
        m.set('py:%d' % i, i)
        print('ok py:%d %d' % (i, m.connection_pool.get_master_address()[1]), flush=True)
    except Exception as e:
        print('err py:%d %s' % (i, type(e).__name__), flush=True)
        time.sleep(pause)
"#;

/// What the redis-py client saw: acknowledged writes (key, the
/// acknowledging primary's port) and the errors it met.
pub struct PyReport {
    pub acked: Vec<(String, u16)>,
    pub errors: Vec<String>,
}

impl PyClient {
    /// Writes for `secs` through the cluster's discovery endpoints,
    /// pausing `pause` after an error.
    pub fn start(c: &KeelCluster, secs: f64, pause: Duration) -> PyClient {
        PyClient::spawn(c, secs, pause, "plain")
    }

    /// The same, with redis-py's retries configured (`Retry` on lost
    /// connections, timeouts and `-READONLY`), as an application would.
    pub fn start_retrying(c: &KeelCluster, secs: f64) -> PyClient {
        PyClient::spawn(c, secs, Duration::ZERO, "retry")
    }

    fn spawn(c: &KeelCluster, secs: f64, pause: Duration, mode: &str) -> PyClient {
        let sentinels: Vec<String> = c.nodes.iter().map(|n| n.sentinel_addr()).collect();
        let child = std::process::Command::new("python3")
            .args(["-c", PY_CLIENT, &sentinels.join(","), &secs.to_string(), &pause.as_secs_f64().to_string(), mode])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("python3 with redis-py (scripts/test installs it)");
        PyClient { child }
    }

    /// Waits for the client to finish, then checks every write it was told
    /// is written is on the final primary.
    pub fn check(self, c: &KeelCluster) -> PyReport {
        let out = self.child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "redis-py client failed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
        let acked: Vec<(String, u16)> = stdout
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                (w.next()? == "ok").then_some(())?;
                Some((w.next()?.to_string(), w.next()?.parse().ok()?))
            })
            .collect();
        let errors: Vec<String> = stdout.lines().filter(|l| l.starts_with("err")).map(String::from).collect();
        let p = c.wait_new_primary(None, Duration::from_secs(10));
        let mut r = Resp::connect(&c.nodes[p].addr());
        for (key, _) in &acked {
            assert_eq!(r.cmd(&["GET", key]), key.trim_start_matches("py:"), "{key} acknowledged to redis-py but lost");
        }
        eprintln!("redis-py through discovery: {} writes acknowledged, {} errors {:?}", acked.len(), errors.len(), errors);
        PyReport { acked, errors }
    }
}
