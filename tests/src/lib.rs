//! Test harness for Keel's integration tests: starts real `keel-journal`
//! processes on loopback ports in a temporary directory, and kills, pauses
//! and restarts them. Nothing here is mocked.
//!
//! Binaries are found in `KEEL_BIN_DIR` if set, else next to the test
//! executable's target directory (`target/<profile>/`); `scripts/test` builds
//! them before running the tests.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Child;
use std::process::Command;
use std::process::Stdio;
use std::time::Duration;
use std::time::Instant;

use keel_journal::client::ClientConfig;
use keel_journal::client::JournalClient;

/// How long a cluster may take to elect its first leader.
pub const LEADER_TIMEOUT: Duration = Duration::from_secs(20);

/// Path of a Keel binary.
pub fn bin(name: &str) -> PathBuf {
    if let Ok(dir) = std::env::var("KEEL_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    // target/<profile>/deps/<test-exe> -> target/<profile>/<name>
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let path = dir.join(name);
    assert!(path.exists(), "{} not found: build it first (cargo build --bins) or set KEEL_BIN_DIR", path.display());
    path
}

/// A free loopback port (bound then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status().map(|s| s.success());
    assert!(matches!(ok, Ok(true)), "kill -{sig} {pid} failed");
}

pub struct JournalNode {
    pub id: u64,
    pub addr: String,
    pub data: PathBuf,
    pub log: PathBuf,
    pub child: Option<Child>,
}

/// A journal cluster of real processes.
pub struct JournalCluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<JournalNode>,
    peers: String,
    extra_args: Vec<String>,
}

impl JournalCluster {
    /// Starts `n` nodes and waits for a Raft leader.
    pub async fn start(n: usize) -> JournalCluster {
        JournalCluster::start_with(n, &[]).await
    }

    /// Like `start`, passing `args` to every `keel-journal serve`.
    pub async fn start_with(n: usize, args: &[&str]) -> JournalCluster {
        let dir = tempfile::Builder::new().prefix("keel-journal-test").tempdir().unwrap();
        let nodes: Vec<JournalNode> = (1..=n as u64)
            .map(|id| JournalNode {
                id,
                addr: format!("127.0.0.1:{}", free_port()),
                data: dir.path().join(format!("node{id}")),
                log: dir.path().join(format!("node{id}.log")),
                child: None,
            })
            .collect();
        let peers = nodes.iter().map(|n| format!("{}={}", n.id, n.addr)).collect::<Vec<_>>().join(",");
        let extra_args = args.iter().map(|a| a.to_string()).collect();
        let mut c = JournalCluster { dir, nodes, peers, extra_args };
        for i in 0..n {
            c.spawn(i);
        }
        c.wait_leader().await;
        c
    }

    fn spawn(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        assert!(node.child.is_none(), "node {} already running", node.id);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&node.log).unwrap();
        let child = Command::new(bin("keel-journal"))
            .args(["serve", "--node-id", &node.id.to_string(), "--listen", &node.addr])
            .arg("--data")
            .arg(&node.data)
            .args(["--peers", &self.peers])
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn keel-journal");
        node.child = Some(child);
    }

    pub fn endpoints(&self) -> String {
        self.nodes.iter().map(|n| n.addr.clone()).collect::<Vec<_>>().join(",")
    }

    pub fn client(&self) -> JournalClient {
        let cfg = ClientConfig { retry_for: Duration::from_secs(20), ..Default::default() };
        JournalClient::new(self.nodes.iter().map(|n| n.addr.clone()).collect(), cfg).unwrap()
    }

    /// A client that talks to node `i` only.
    pub fn client_of(&self, i: usize) -> JournalClient {
        JournalClient::new(vec![self.nodes[i].addr.clone()], ClientConfig::default()).unwrap()
    }

    pub fn pid(&self, i: usize) -> u32 {
        self.nodes[i].child.as_ref().expect("node running").id()
    }

    /// kill -9 node `i`.
    pub fn kill(&mut self, i: usize) {
        let mut child = self.nodes[i].child.take().expect("node running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    pub fn restart(&mut self, i: usize) {
        self.spawn(i);
    }

    /// Index of the node that is Raft leader, waiting for one.
    pub async fn wait_leader(&self) -> usize {
        let client = self.client();
        let deadline = Instant::now() + LEADER_TIMEOUT;
        loop {
            for (i, n) in self.nodes.iter().enumerate() {
                if n.child.is_none() {
                    continue;
                }
                if let Ok(s) = client.node_status(i).await {
                    if s.raft_leader_id == Some(n.id) {
                        return i;
                    }
                }
            }
            assert!(Instant::now() < deadline, "no journal leader within {LEADER_TIMEOUT:?}; logs in {}", self.dir.path().display());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until node `i` has applied at least `index`.
    pub async fn wait_applied(&self, i: usize, index: u64) {
        let client = self.client();
        let deadline = Instant::now() + LEADER_TIMEOUT;
        loop {
            if let Ok(s) = client.node_status(i).await {
                if s.last_applied_index >= index {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "node {i} did not apply index {index}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for JournalCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Keep the logs and data of a failed test for post-mortem.
            self.dir.disable_cleanup(true);
            eprintln!("journal cluster kept in {}", self.dir.path().display());
        }
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// Reads a whole stream (no follow) and returns (seq, payload) pairs.
pub async fn read_all(client: &JournalClient, stream: &str) -> Vec<(u64, Vec<u8>)> {
    let mut reader = client.read(stream, 0, false);
    let mut out = Vec::new();
    while let Some(batch) = reader.next_batch().await.expect("read") {
        out.extend(batch.into_iter().map(|r| (r.seq, r.payload.to_vec())));
    }
    out
}

pub fn new_uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}
