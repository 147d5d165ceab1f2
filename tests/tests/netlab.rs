//! The network lab (keel_tests::netlab), with real namespaces, a real bridge
//! and real nftables rules: hosts reach each other until partitioned or
//! isolated, new connections across a partition time out, an established
//! one stalls and resumes after heal, and nothing outlives the lab.
//!
//! Servers and clients are small python3 programs started inside the hosts
//! with `Lab::command`. The machine must be able to hold a lab (root, iproute2,
//! nftables): if it cannot, every test fails with the reason.

use std::io::BufRead;
use std::io::BufReader;
use std::io::Write;
use std::net::Ipv4Addr;
use std::net::SocketAddr;
use std::net::TcpStream;
use std::process::Child;
use std::process::ChildStdin;
use std::process::Command;
use std::process::Stdio;
use std::time::Duration;
use std::time::Instant;

use keel_tests::netlab::Lab;

/// The port of the echo server in every host (ports are per namespace).
const ECHO_PORT: u16 = 7000;
/// How long a connection attempt may take before it counts as timed out.
const CONNECT_TIMEOUT_SECS: f64 = 1.5;
/// How long after heal a stalled connection may take to deliver (TCP
/// retransmission backs off exponentially while the partition lasts).
const RESUME_TIMEOUT: Duration = Duration::from_secs(20);

/// Accepts connections on ECHO_PORT and echoes lines; prints "ready" once listening.
const ECHO_SERVER: &str = r#"
import socket, sys, threading
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(64)
print("ready", flush=True)
def echo(c):
    with c:
        for line in c.makefile("rb"):
            c.sendall(line)
while True:
    c, _ = s.accept()
    threading.Thread(target=echo, args=(c,), daemon=True).start()
"#;

/// Connects to argv[1]:argv[2] within argv[3] seconds, sends a line and
/// prints "ok" if it comes back, else "timeout", "refused" or the error.
const PROBE: &str = r#"
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    s.sendall(b"ping\n")
    print("ok" if s.makefile("rb").readline() == b"ping\n" else "bad reply")
except TimeoutError:
    print("timeout")
except ConnectionRefusedError:
    print("refused")
except OSError as e:
    print("error", e)
"#;

/// Holds one connection to argv[1]:argv[2]; reads commands from stdin:
/// "send X" sends the line X, "recv" prints "got X" for the next line
/// received within one second, else "timeout".
const CLIENT: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
s.settimeout(1.0)
print("connected", flush=True)
buf = b""
for cmd in sys.stdin:
    cmd = cmd.split()
    if cmd[0] == "send":
        s.sendall(cmd[1].encode() + b"\n")
        print("sent", flush=True)
        continue
    try:
        while b"\n" not in buf:
            data = s.recv(100)
            if not data:
                raise EOFError
            buf += data
        line, buf = buf.split(b"\n", 1)
        print("got", line.decode(), flush=True)
    except TimeoutError:
        print("timeout", flush=True)
    except EOFError:
        print("closed", flush=True)
"#;

/// A lab, or a failure saying why this machine cannot hold one.
fn new_lab(hosts: &[&str]) -> Lab {
    if let Err(e) = Lab::available() {
        panic!("network lab unavailable: {e}");
    }
    Lab::new(hosts).expect("Lab::new")
}

/// A process inside a host, killed when dropped; its stdout read line by line.
struct Proc {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<std::process::ChildStdout>,
}

impl Proc {
    fn python(lab: &Lab, host: &str, script: &str, args: &[&str]) -> Proc {
        let mut child = lab
            .command(host, "python3")
            .arg("-c")
            .arg(script)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn python3");
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Proc { child, stdin, stdout }
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("read stdout");
        line.trim_end().to_string()
    }

    /// Sends a command line and returns the reply line.
    fn ask(&mut self, cmd: &str) -> String {
        writeln!(self.stdin.as_mut().unwrap(), "{cmd}").expect("write stdin");
        self.line()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts an echo server in each host, waiting until each listens.
fn echo_servers(lab: &Lab, hosts: &[&str]) -> Vec<Proc> {
    hosts
        .iter()
        .map(|h| {
            let mut p = Proc::python(lab, h, ECHO_SERVER, &[&ECHO_PORT.to_string()]);
            assert_eq!(p.line(), "ready", "echo server in {h} did not start");
            p
        })
        .collect()
}

/// Runs every probe (from host, to host or address, expected outcome) at
/// once and checks all outcomes, reporting every mismatch together.
fn expect(lab: &Lab, probes: &[(&str, &str, &str)]) {
    let outcomes: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = probes
            .iter()
            .map(|&(from, to, _)| {
                let addr = to.parse::<Ipv4Addr>().unwrap_or_else(|_| lab.ip(to)).to_string();
                s.spawn(move || {
                    let out = lab
                        .command(from, "python3")
                        .args(["-c", PROBE, &addr, &ECHO_PORT.to_string(), &CONNECT_TIMEOUT_SECS.to_string()])
                        .output()
                        .expect("run probe");
                    format!("{}{}", String::from_utf8_lossy(&out.stdout).trim(), String::from_utf8_lossy(&out.stderr).trim())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let wrong: Vec<String> = probes
        .iter()
        .zip(&outcomes)
        .filter(|((_, _, want), got)| got.as_str() != *want)
        .map(|((from, to, want), got)| format!("{from} -> {to}: expected {want}, got {got}"))
        .collect();
    assert!(wrong.is_empty(), "unexpected reachability:\n{}", wrong.join("\n"));
}

/// Connects from the test process (root namespace) to every host's server.
fn root_reaches(lab: &Lab, hosts: &[&str]) {
    for h in hosts {
        let addr = SocketAddr::from((lab.ip(h), ECHO_PORT));
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap_or_else(|e| panic!("root namespace cannot reach {h} at {addr}: {e}"));
    }
}

/// Names of the namespaces (`ip netns list`) or root-namespace links (`ip -o link show`).
fn names(what: &str) -> Vec<String> {
    let args: &[&str] = if what == "netns" { &["netns", "list"] } else { &["-o", "link", "show"] };
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let name = |l: &str| match what {
        "netns" => l.split_whitespace().next().map(String::from),
        _ => l.split(": ").nth(1).and_then(|n| n.split('@').next()).map(String::from),
    };
    text.lines().filter_map(name).collect()
}

/// The namespaces and links that belong to the lab with this prefix.
fn lab_names(prefix: &str) -> (Vec<String>, Vec<String>) {
    let ns = names("netns").into_iter().filter(|n| n.starts_with(&format!("{prefix}-"))).collect();
    let links = names("link")
        .into_iter()
        .filter(|n| n.strip_prefix(prefix).is_some_and(|rest| rest == "b" || rest.strip_prefix('v').is_some_and(|i| i.parse::<u32>().is_ok())))
        .collect();
    (ns, links)
}

#[test]
fn lab_is_available() {
    if let Err(e) = Lab::available() {
        panic!("network lab unavailable: {e}");
    }
}

#[test]
fn partition_isolate_and_heal() {
    let lab = new_lab(&["a", "b", "c"]);
    let _servers = echo_servers(&lab, &["a", "b", "c"]);

    expect(&lab, &[("b", "a", "ok"), ("c", "a", "ok"), ("a", "b", "ok"), ("a", "c", "ok"), ("a", "127.0.0.1", "ok")]);

    lab.partition(&["a"], &["b"]).unwrap();
    expect(&lab, &[("b", "a", "timeout"), ("a", "b", "timeout"), ("c", "a", "ok"), ("c", "b", "ok"), ("a", "c", "ok"), ("b", "c", "ok")]);
    root_reaches(&lab, &["a", "b", "c"]);

    lab.heal().unwrap();
    expect(&lab, &[("b", "a", "ok"), ("a", "b", "ok")]);

    lab.isolate("c").unwrap();
    expect(&lab, &[
        ("c", "a", "timeout"),
        ("c", "b", "timeout"),
        ("a", "c", "timeout"),
        ("b", "c", "timeout"),
        ("a", "b", "ok"),
        ("c", "127.0.0.1", "ok"),
    ]);
    root_reaches(&lab, &["c"]);

    lab.heal().unwrap();
    expect(&lab, &[("c", "a", "ok"), ("b", "c", "ok")]);
}

#[test]
fn partitions_add_up_and_reject_a_host_on_both_sides() {
    let lab = new_lab(&["a", "b", "c"]);
    let _servers = echo_servers(&lab, &["a", "b", "c"]);
    lab.partition(&["a"], &["b"]).unwrap();
    lab.partition(&["a"], &["c"]).unwrap();
    lab.partition(&["a"], &["b"]).unwrap(); // again: no error, no change
    expect(&lab, &[("b", "a", "timeout"), ("c", "a", "timeout"), ("b", "c", "ok")]);
    let err = lab.partition(&["a", "b"], &["b"]).unwrap_err();
    assert!(err.to_string().contains("host b is on both sides"), "{err}");
}

#[test]
fn established_connection_stalls_during_partition_and_resumes_after_heal() {
    let lab = new_lab(&["a", "b"]);
    let _servers = echo_servers(&lab, &["a"]);
    let mut client = Proc::python(&lab, "b", CLIENT, &[&lab.ip("a").to_string(), &ECHO_PORT.to_string()]);
    assert_eq!(client.line(), "connected");
    assert_eq!(client.ask("send 1"), "sent");
    assert_eq!(client.ask("recv"), "got 1");

    lab.partition(&["b"], &["a"]).unwrap();
    assert_eq!(client.ask("send 2"), "sent");
    assert_eq!(client.ask("recv"), "timeout", "data crossed the partition");
    assert_eq!(client.ask("recv"), "timeout", "data crossed the partition");

    lab.heal().unwrap();
    let healed = Instant::now();
    loop {
        match client.ask("recv").as_str() {
            "got 2" => break,
            "timeout" => assert!(healed.elapsed() < RESUME_TIMEOUT, "the connection did not resume within {RESUME_TIMEOUT:?} of heal"),
            other => panic!("connection broke instead of stalling: {other}"),
        }
    }
    eprintln!("stalled connection resumed {:?} after heal", healed.elapsed());
    assert_eq!(client.ask("send 3"), "sent");
    assert_eq!(client.ask("recv"), "got 3");
}

#[test]
fn dropping_the_lab_removes_namespaces_and_links() {
    let lab = new_lab(&["x", "y"]);
    let prefix = lab.prefix().to_string();
    let (ns, links) = lab_names(&prefix);
    assert_eq!(ns.len(), 2, "namespaces of a live lab: {ns:?}");
    assert_eq!(links.len(), 3, "bridge and two veths of a live lab: {links:?}");
    drop(lab);
    assert_eq!(lab_names(&prefix), (vec![], vec![]), "left behind by a dropped lab");
}

#[test]
fn labs_of_dead_processes_are_removed_and_live_labs_kept() {
    let mut exited = Command::new("true").spawn().expect("spawn true");
    exited.wait().unwrap();
    let dead = format!("kl{}-0", exited.id());
    let run = |args: &[&str]| assert!(Command::new("ip").args(args).status().unwrap().success(), "ip {args:?}");
    run(&["netns", "add", &format!("{dead}-x")]);
    run(&["link", "add", &format!("{dead}b"), "type", "bridge"]);

    let live = new_lab(&["a"]);
    let lab = Lab::new(&["a"]).unwrap();
    assert_eq!(lab_names(&dead), (vec![], vec![]), "a dead process's lab was kept");
    assert_eq!(lab_names(live.prefix()).0.len(), 1, "a live lab was removed");
    assert_ne!(live.prefix(), lab.prefix());
    assert_ne!(live.ip("a"), lab.ip("a"), "two labs share a subnet");
}
