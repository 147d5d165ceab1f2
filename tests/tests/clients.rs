//! Clients of Redis as a secured deployment serves them
//! (`scripts/cluster start --tls`): every node's Redis on a TLS port only,
//! with a password (`requirepass`); its sidecar over the Redis's unix
//! socket; its discovery endpoint over TLS with the same password. An
//! unmodified redis-py (`ssl=True`, a password, Sentinel discovery)
//! follows a failover, and loses no acknowledged write; without the
//! password or without TLS it is refused.

use std::io::BufRead;
use std::process::Command;
use std::process::Stdio;
use std::time::Duration;

use keel_tests::KeelCluster;
use keel_tests::Server;

const PASSWORD: &str = "a-password-for-the-clients";

/// Writes `tls:<i>` keys through discovery until `argv[4]` writes were
/// acknowledged by a primary other than the first, then reads every
/// acknowledged key back, then tries the primary without the password,
/// without TLS, and discovery without the password.
const PY_CLIENT: &str = r#"
import sys, time
import redis
from redis.sentinel import Sentinel
sentinels = [(a.split(':')[0], int(a.split(':')[1])) for a in sys.argv[1].split(',')]
ca, pw, after = sys.argv[2], sys.argv[3], int(sys.argv[4])
tls = dict(ssl=True, ssl_ca_certs=ca)
s = Sentinel(sentinels, socket_timeout=1.0, sentinel_kwargs=dict(socket_timeout=1.0, password=pw, **tls), password=pw, **tls)
m = s.master_for('keel', socket_timeout=1.0)
first, later, i, acked = None, 0, 0, {}
deadline = time.time() + 120
while time.time() < deadline and later < after:
    i += 1
    k = 'tls:%d' % i
    try:
        m.set(k, i)
    except Exception as e:
        print('err', k, type(e).__name__, flush=True)
        time.sleep(0.05)
        continue
    acked[k] = i
    port = s.discover_master('keel')[1]
    first = first or port
    if port != first:
        later += 1
    print('ok', k, port, flush=True)
missing = [k for k, v in acked.items() if m.get(k) != str(v).encode()]
print('missing', len(missing), ' '.join(missing[:10]), flush=True)
host, port = s.discover_master('keel')
def attempt(name, f):
    try:
        f()
        print(name, 'ok', flush=True)
    except Exception as e:
        print(name, 'refused', type(e).__name__, flush=True)
attempt('no-password', lambda: redis.Redis(host=host, port=port, socket_timeout=1.0, **tls).set('x', 1))
attempt('plaintext', lambda: redis.Redis(host=host, port=port, password=pw, socket_timeout=1.0).set('x', 1))
attempt('discovery-no-password', lambda: Sentinel(sentinels, socket_timeout=1.0, sentinel_kwargs=dict(socket_timeout=1.0, **tls)).discover_master('keel'))
print('done', later, flush=True)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_py_over_tls_with_a_password_follows_a_failover() {
    let mut c = KeelCluster::start_secure(Server::Redis, 1, 2, 1000, PASSWORD).await;
    let ca = c.nodes[0].clients.as_ref().expect("secured").ca.clone();
    let sentinels: Vec<String> = c.nodes.iter().map(|n| n.sentinel_addr()).collect();
    let mut child = Command::new("python3")
        .args(["-c", PY_CLIENT, &sentinels.join(","), &ca.display().to_string(), PASSWORD, "20"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (scripts/test installs redis-py)");
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut out: Vec<String> = Vec::new();
    // Twenty acknowledged writes, then the primary's Redis dies.
    while out.iter().filter(|l| l.starts_with("ok ")).count() < 20 {
        match lines.next() {
            Some(l) => out.push(l.unwrap()),
            None => panic!("the client ended early: {out:?}; stderr: {}", stderr_of(&mut child)),
        }
    }
    c.nodes[0].kill_redis();
    let np = c.wait_new_primary(Some(0), Duration::from_secs(30));
    out.extend(lines.map(|l| l.unwrap()));
    let status = child.wait().unwrap();
    assert!(status.success(), "redis-py failed: {}\n{out:?}", stderr_of(&mut child));
    let field = |name: &str| out.iter().find_map(|l| l.strip_prefix(&format!("{name} "))).unwrap_or_else(|| panic!("no {name:?} in {out:?}")).to_string();
    assert!(field("done").parse::<u32>().unwrap() >= 20, "writes after the failover: {out:?}");
    assert!(field("missing").starts_with("0"), "acknowledged writes missing: {}", field("missing"));
    for refused in ["no-password", "plaintext", "discovery-no-password"] {
        assert!(field(refused).starts_with("refused"), "{refused}: {}", field(refused));
    }
    // Every acknowledged key is on the new primary (read over its socket).
    let acked: Vec<(String, String)> = out
        .iter()
        .filter_map(|l| l.strip_prefix("ok "))
        .map(|l| {
            let k = l.split(' ').next().unwrap().to_string();
            let v = k.trim_start_matches("tls:").to_string();
            (k, v)
        })
        .collect();
    assert!(acked.len() >= 40, "{acked:?}");
    for (k, v) in &acked {
        assert_eq!(c.nodes[np].local_cmd(&["GET", k]).as_deref(), Some(v.as_str()), "acknowledged {k} is not on the new primary");
    }
    eprintln!("redis-py over TLS: {} writes acknowledged across the failover, {} errors", acked.len(), out.iter().filter(|l| l.starts_with("err ")).count());
}

/// `keel-sidecar handover` (what `scripts/cluster handover` runs) reaches a
/// TLS-only deployment as its clients do: TLS with the deployment's CA and
/// the password, to discovery and to the primary; without them it cannot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handover_command_speaks_tls_with_a_password() {
    let c = KeelCluster::start_secure(Server::Redis, 1, 2, 1000, PASSWORD).await;
    let security = c.nodes[0].clients.as_ref().expect("secured");
    let sentinels: Vec<String> = c.nodes.iter().map(|n| n.sentinel_addr()).collect();
    let handover = |secure: bool| {
        let mut cmd = Command::new(keel_tests::bin("keel-sidecar"));
        cmd.args(["handover", "--sentinels", &sentinels.join(",")]);
        if secure {
            cmd.arg("--tls-ca").arg(&security.ca).arg("--password-file").arg(&security.password_file);
        }
        cmd.output().unwrap()
    };
    let refused = handover(false);
    assert!(!refused.status.success(), "a handover without TLS reached the deployment");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("no discovery endpoint"), "{}", String::from_utf8_lossy(&refused.stderr));
    assert_eq!(c.primaries(), vec![0], "nothing moved");
    let out = handover(true);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let np = c.wait_new_primary(Some(0), Duration::from_secs(10));
    assert!(text.contains(&format!("handed over: {} -> {}", c.nodes[0].addr(), c.nodes[np].addr())), "{text}");
    assert!(text.contains("unavailability_ms="), "{text}");
}

fn stderr_of(child: &mut std::process::Child) -> String {
    use std::io::Read;
    let mut s = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut s);
    }
    s
}
