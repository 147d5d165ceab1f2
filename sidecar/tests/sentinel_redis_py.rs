//! redis-py's Sentinel support, unmodified, against Keel's sentinel endpoint:
//! `redis.sentinel.Sentinel` discovers the primary (a real redis-server) and
//! a replica (a second redis-server replicating from it), writes and reads
//! through them, gets no primary while the view has none (an election), and
//! after a failover (primary killed, replica promoted, view swapped, one
//! sentinel endpoint gone) finds the new primary and writes to it with the
//! client objects it already had. And with the endpoint served over TLS
//! with a password: redis-py's `Sentinel(..., sentinel_kwargs={"ssl": True,
//! "ssl_ca_certs": ca, "password": ...})` finds the primary, and is refused
//! without the password or with a wrong one.
//!
//! Needs `redis-server` (`KEEL_REDIS_SERVER`, else /usr/bin/redis-server) and
//! `python3` with redis-py 5 (installed with pip when missing); fails, with
//! the reason, when either is unavailable.

use std::io::BufRead;
use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;

use keel_sidecar::resp::encode_command;
use keel_sidecar::sentinel::AccessFlags;
use keel_sidecar::sentinel::Addr;
use keel_sidecar::sentinel::SentinelPeer;
use keel_sidecar::sentinel::View;
use keel_sidecar::sentinel::serve;
use keel_sidecar::sentinel::serve_with;
use tokio::io::AsyncBufReadExt;
use tokio::io::AsyncReadExt;
use tokio::io::AsyncWriteExt;
use tokio::io::BufReader;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// The redis-py versions this test is written against.
const REDIS_PY_REQUIREMENT: &str = "redis>=5,<6";
/// How long the script may take to reach its next line.
const SCRIPT_STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// Driven step by step through stdin; prints `key=value` lines.
const SCRIPT: &str = r#"
import sys, time
import redis
from redis.sentinel import Sentinel, MasterNotFoundError

sentinel = Sentinel([("127.0.0.1", int(p)) for p in sys.argv[1:]], socket_timeout=2)

def say(key, value):
    print(f"{key}={value}", flush=True)

def addr(a):
    host, port = a
    return f"{host.decode() if isinstance(host, bytes) else host}:{port}"

def step(name):
    got = sys.stdin.readline().strip()
    assert got == name, f"expected step {name!r}, got {got!r}"

def retry(f):
    for attempt in range(20):
        try:
            return f()
        except (redis.ConnectionError, redis.TimeoutError) as e:
            say("retry", repr(e))
            time.sleep(0.1)
    return f()

def eventually(f, want):
    deadline = time.time() + 10
    got = f()
    while got != want and time.time() < deadline:
        time.sleep(0.05)
        got = f()
    return got

say("redis_py", redis.__version__)
say("discover_master", addr(sentinel.discover_master("keel")))
say("discover_slaves", ",".join(addr(a) for a in sentinel.discover_slaves("keel")))
master = sentinel.master_for("keel")
say("set", master.set("a", "1"))
replica = sentinel.slave_for("keel")
say("replica_get", eventually(lambda: replica.get("a"), b"1").decode())
first = sentinel.sentinels[0]
say("get_master_addr", addr(first.sentinel_get_master_addr_by_name("keel")))
say("master_flags", first.sentinel_master("keel")["flags"])
say("sentinels", ",".join(f"{s['ip']}:{s['port']}/{s['runid']}" for s in first.sentinel_sentinels("keel")))
say("myid", first.execute_command("SENTINEL MYID").decode())
try:
    first.sentinel_failover("keel")
    say("failover", "accepted")
except redis.ResponseError as e:
    say("failover", e)
try:
    sentinel.discover_master("nosuch")
    say("unknown", "found")
except MasterNotFoundError:
    say("unknown", "MasterNotFoundError")
say("step", "ready")

step("election")
try:
    sentinel.discover_master("keel")
    say("during_election", "found")
except MasterNotFoundError:
    say("during_election", "MasterNotFoundError")
say("get_master_addr", first.sentinel_get_master_addr_by_name("keel"))
say("step", "ready")

step("failover")
say("discover_master", addr(sentinel.discover_master("keel")))
say("set", retry(lambda: master.set("b", "2")))
say("master_get", f"{master.get('a').decode()},{master.get('b').decode()}")
say("discover_slaves", ",".join(addr(a) for a in sentinel.discover_slaves("keel")))
say("replica_get", retry(lambda: replica.get("b")).decode())
say("step", "done")
"#;

/// Against one TLS endpoint with a password: argv is its port, the CA file
/// and the password file.
const TLS_SCRIPT: &str = r#"
import sys
import redis
from redis.sentinel import Sentinel, MasterNotFoundError

port, ca, password_file = int(sys.argv[1]), sys.argv[2], sys.argv[3]
password = open(password_file).read().rstrip("\n")

def say(key, value):
    print(f"{key}={value}", flush=True)

def addr(a):
    host, port = a
    return f"{host.decode() if isinstance(host, bytes) else host}:{port}"

def sentinel(**auth):
    kwargs = {"ssl": True, "ssl_ca_certs": ca, "ssl_check_hostname": True, **auth}
    return Sentinel([("localhost", port)], socket_timeout=2, sentinel_kwargs=kwargs)

def refusal(s):
    try:
        s.sentinels[0].ping()
        return "answered"
    except redis.exceptions.AuthenticationError as e:
        return f"AuthenticationError:{e}"

s = sentinel(password=password)
say("discover_master", addr(s.discover_master("keel")))
say("set", s.master_for("keel", socket_timeout=2).set("tls", "1"))
say("myid", s.sentinels[0].execute_command("SENTINEL MYID").decode())
say("no_password", refusal(sentinel()))
say("wrong_password", refusal(sentinel(password="wrong")))
try:
    sentinel().discover_master("keel")
    say("discover_without_password", "found")
except MasterNotFoundError:
    say("discover_without_password", "MasterNotFoundError")
plain = Sentinel([("localhost", port)], socket_timeout=2, sentinel_kwargs={"password": password})
try:
    plain.sentinels[0].ping()
    say("plaintext", "answered")
except (redis.ConnectionError, redis.TimeoutError) as e:
    say("plaintext", type(e).__name__)
say("step", "done")
"#;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn redis_server_binary() -> PathBuf {
    let path = PathBuf::from(std::env::var("KEEL_REDIS_SERVER").unwrap_or_else(|_| "/usr/bin/redis-server".into()));
    assert!(
        path.exists(),
        "{} not found: install redis-server (scripts/lib.sh keel_install_deps) or set KEEL_REDIS_SERVER",
        path.display()
    );
    path
}

/// A real redis-server on a loopback port, killed (and its directory
/// removed) on drop.
struct RedisServer {
    child: Option<std::process::Child>,
    port: u16,
    /// Its working directory: a replica writes the RDB of its full sync there.
    dir: PathBuf,
}

impl RedisServer {
    fn start(extra: &[&str]) -> RedisServer {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("keel-sentinel-test-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let child = Command::new(redis_server_binary())
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server on port {port} did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        RedisServer { child: Some(child), port, dir }
    }

    fn addr(&self) -> Addr {
        Addr { host: "127.0.0.1".into(), port: self.port }
    }

    /// Sends one command and returns its first reply line.
    fn command(&self, args: &[&[u8]]) -> String {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(&encode_command(args)).unwrap();
        let mut line = String::new();
        std::io::BufReader::new(s).read_line(&mut line).unwrap();
        line.trim_end().to_string()
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn redis_py_usable() -> Result<(), String> {
    let out = Command::new("python3")
        .args(["-c", "import redis, sys; sys.exit(0 if redis.__version__.split('.')[0] == '5' else 3)"])
        .output()
        .map_err(|e| format!("python3 cannot be run ({e}): install Python 3"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("redis-py 5 is not importable: {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// redis-py 5 importable by `python3`, installed with pip if needed.
fn ensure_redis_py() {
    if redis_py_usable().is_ok() {
        return;
    }
    for extra in [&[][..], &["--break-system-packages"][..]] {
        let _ = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet"])
            .args(extra)
            .arg(REDIS_PY_REQUIREMENT)
            .stdout(Stdio::null())
            .status();
        if redis_py_usable().is_ok() {
            return;
        }
    }
    if let Err(e) = redis_py_usable() {
        panic!(
            "this test needs python3 with redis-py: {e}; `python3 -m pip install '{REDIS_PY_REQUIREMENT}'` failed \
             (scripts/lib.sh keel_install_deps installs it)"
        );
    }
}

/// The redis-py script, run as a child process.
struct Script {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    stderr: Arc<Mutex<String>>,
    stderr_task: Option<tokio::task::JoinHandle<()>>,
}

impl Script {
    fn start(sentinel_ports: &[u16]) -> Script {
        Script::run(SCRIPT, &sentinel_ports.iter().map(|p| p.to_string()).collect::<Vec<_>>())
    }

    fn run(code: &str, args: &[String]) -> Script {
        let mut child = tokio::process::Command::new("python3")
            .arg("-c")
            .arg(code)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn python3");
        let stdin = child.stdin.take().unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err_pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        let stderr_task = Some(tokio::spawn(async move {
            let mut buf = Vec::new();
            let _ = err_pipe.read_to_end(&mut buf).await;
            sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf));
        }));
        Script { child, stdin, lines, stderr, stderr_task }
    }

    async fn fail(&mut self, what: String) -> ! {
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
        if let Some(t) = self.stderr_task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        panic!("{what}\n--- redis-py script stderr ---\n{}", self.stderr.lock().unwrap());
    }

    /// The value of the script's next `key=value` line, skipping `retry=` lines.
    async fn expect(&mut self, key: &str) -> String {
        loop {
            let line = match tokio::time::timeout(SCRIPT_STEP_TIMEOUT, self.lines.next_line()).await {
                Ok(Ok(Some(line))) => line,
                other => self.fail(format!("no `{key}=` line from the redis-py script: {other:?}")).await,
            };
            let Some((k, v)) = line.split_once('=') else { self.fail(format!("unexpected output {line:?}")).await };
            if k == "retry" {
                eprintln!("redis-py: {line}");
                continue;
            }
            if k != key {
                self.fail(format!("expected `{key}=`, got {line:?}")).await;
            }
            return v.to_string();
        }
    }

    async fn step(&mut self, name: &str) {
        self.stdin.write_all(format!("{name}\n").as_bytes()).await.unwrap();
        self.stdin.flush().await.unwrap();
    }
}

fn publish(views: &[watch::Sender<View>], change: impl Fn(&mut View)) {
    for tx in views {
        tx.send_modify(&change);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_py_finds_the_primary_and_follows_a_failover() {
    ensure_redis_py();
    let mut primary = RedisServer::start(&["--repl-diskless-sync-delay", "0"]);
    let replica = RedisServer::start(&["--replicaof", "127.0.0.1", &primary.port.to_string()]);

    let listeners = [TcpListener::bind("127.0.0.1:0").await.unwrap(), TcpListener::bind("127.0.0.1:0").await.unwrap()];
    let peers: Vec<SentinelPeer> = listeners
        .iter()
        .enumerate()
        .map(|(i, l)| SentinelPeer {
            addr: Addr { host: "127.0.0.1".into(), port: l.local_addr().unwrap().port() },
            run_id: format!("{:040x}", 0xabc0 + i),
        })
        .collect();
    let base = View {
        master: Some(primary.addr()),
        replicas: vec![replica.addr()],
        sentinels: peers.clone(),
        epoch: 1,
        ..View::default()
    };
    let mut views = Vec::new();
    let mut endpoints = Vec::new();
    for (listener, me) in listeners.into_iter().zip(&peers) {
        let (tx, rx) = watch::channel(View { me: Some(me.clone()), ..base.clone() });
        views.push(tx);
        endpoints.push(tokio::spawn(serve(listener, rx)));
    }

    let mut py = Script::start(&[peers[0].addr.port, peers[1].addr.port]);
    let version = py.expect("redis_py").await;
    assert!(version.starts_with("5."), "redis-py {version}");
    let primary_addr = format!("127.0.0.1:{}", primary.port);
    let replica_addr = format!("127.0.0.1:{}", replica.port);
    assert_eq!(py.expect("discover_master").await, primary_addr);
    assert_eq!(py.expect("discover_slaves").await, replica_addr);
    assert_eq!(py.expect("set").await, "True");
    assert_eq!(py.expect("replica_get").await, "1", "read from the replica");
    assert_eq!(py.expect("get_master_addr").await, primary_addr);
    assert_eq!(py.expect("master_flags").await, "master");
    let other = &peers[1];
    assert_eq!(
        py.expect("sentinels").await,
        format!("127.0.0.1:{}/{}", other.addr.port, other.run_id),
        "the other endpoint only"
    );
    assert_eq!(py.expect("myid").await, peers[0].run_id);
    let refused = py.expect("failover").await;
    assert!(refused.contains("journal lease"), "{refused}");
    assert_eq!(py.expect("unknown").await, "MasterNotFoundError");
    assert_eq!(py.expect("step").await, "ready");

    // An election: no primary known.
    publish(&views, |v| {
        v.master = None;
        v.epoch = 2;
    });
    py.step("election").await;
    assert_eq!(py.expect("during_election").await, "MasterNotFoundError");
    assert_eq!(py.expect("get_master_addr").await, "None");
    assert_eq!(py.expect("step").await, "ready");

    // The failover: the primary dies, the replica is promoted, the view
    // names it, and the first sentinel endpoint goes away too.
    primary.kill();
    assert_eq!(replica.command(&[b"REPLICAOF", b"NO", b"ONE"]), "+OK");
    publish(&views, |v| {
        v.master = Some(replica.addr());
        v.replicas.clear();
        v.epoch = 3;
    });
    endpoints[0].abort();
    let _ = (&mut endpoints[0]).await;
    py.step("failover").await;
    assert_eq!(py.expect("discover_master").await, replica_addr, "the new primary");
    assert_eq!(py.expect("set").await, "True", "the old master_for client writes to the new primary");
    assert_eq!(py.expect("master_get").await, "1,2", "the replicated write survived the failover");
    assert_eq!(py.expect("discover_slaves").await, "");
    assert_eq!(py.expect("replica_get").await, "2", "the slave_for client reads from the promoted replica");
    assert_eq!(py.expect("step").await, "done");
    let status = tokio::time::timeout(Duration::from_secs(10), py.child.wait()).await.expect("script exits").unwrap();
    if !status.success() {
        py.fail(format!("redis-py script exited with {status}")).await;
    }
    for e in endpoints {
        e.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_py_over_tls_with_a_password() {
    ensure_redis_py();
    let primary = RedisServer::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("tls");
    keel_journal_client::tls::issue(&certs, &["redis-0".into()], &[]).unwrap();
    let password_file = dir.path().join("sentinel.pw");
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&password_file).unwrap();
        f.write_all(b"redis-py over TLS\n").unwrap();
    }
    let access = AccessFlags {
        tls_cert: Some(certs.join("redis-0.pem")),
        tls_key: Some(certs.join("redis-0.key")),
        password_file: Some(password_file.clone()),
    }
    .load(true)
    .unwrap();

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let me = SentinelPeer { addr: Addr { host: "127.0.0.1".into(), port }, run_id: format!("{:040x}", 0x7150) };
    let view = View { master: Some(primary.addr()), sentinels: vec![me.clone()], me: Some(me.clone()), epoch: 1, ..View::default() };
    let (_tx, rx) = watch::channel(view);
    let endpoint = tokio::spawn(serve_with(listener, rx, access));

    let args = [port.to_string(), certs.join("ca.pem").display().to_string(), password_file.display().to_string()];
    let mut py = Script::run(TLS_SCRIPT, &args);
    assert_eq!(py.expect("discover_master").await, format!("127.0.0.1:{}", primary.port));
    assert_eq!(py.expect("set").await, "True");
    assert_eq!(py.expect("myid").await, me.run_id);
    let refused = py.expect("no_password").await;
    assert!(refused.starts_with("AuthenticationError:") && refused.contains("Authentication required"), "{refused}");
    let refused = py.expect("wrong_password").await;
    assert!(refused.starts_with("AuthenticationError:") && refused.contains("invalid username-password pair"), "{refused}");
    assert_eq!(py.expect("discover_without_password").await, "MasterNotFoundError");
    let plaintext = py.expect("plaintext").await;
    assert!(plaintext == "ConnectionError" || plaintext == "TimeoutError", "a plaintext client is refused: {plaintext}");
    assert_eq!(py.expect("step").await, "done");
    let status = tokio::time::timeout(Duration::from_secs(10), py.child.wait()).await.expect("script exits").unwrap();
    if !status.success() {
        py.fail(format!("redis-py script exited with {status}")).await;
    }
    assert_eq!(primary.command(&[b"GET", b"tls"]), "$1", "the write reached the primary redis-py found");
    endpoint.abort();
}
