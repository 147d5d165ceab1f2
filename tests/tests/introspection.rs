//! Redis's own introspection on a Keel primary shows a client's commands as
//! the client sent them and none of Keel's traffic (the wrappers, the
//! sidecar's control commands, the module's reading of the replication
//! offset): MONITOR, SLOWLOG, INFO commandstats, ACL GETUSER/LIST/LOG,
//! CLIENT LIST. On Redis
//! 7.0 and Valkey 9.1. What the module API cannot give (the address of a
//! wrapped command in MONITOR and SLOWLOG, transaction commands in MONITOR)
//! is in docs/compatibility.md.

use std::io::BufRead;
use std::io::Write;
use std::time::Duration;

use keel_tests::KeelPrimary;
use keel_tests::Resp;
use keel_tests::Server;

/// The commands a MONITOR client printed (the part after the `[db addr] `
/// prefix) until the line of `ECHO <marker>`, which is left out.
fn monitor_until(r: &mut std::io::BufReader<std::net::TcpStream>, marker: &str) -> Vec<String> {
    let end = format!("\"ECHO\" \"{marker}\"");
    let mut out = Vec::new();
    loop {
        let mut line = String::new();
        let n = r.read_line(&mut line).expect("MONITOR printed nothing for 30 s");
        assert!(n > 0, "the MONITOR connection closed");
        let line = line.trim_end();
        let cmd = line.split_once("] ").map(|(_, c)| c.to_string()).unwrap_or_else(|| panic!("not a MONITOR line: {line}"));
        if cmd == end {
            return out;
        }
        out.push(cmd);
    }
}

async fn introspection_shows_the_clients_commands(server: Server) {
    let p = KeelPrimary::start(server, 1, &["write_timeout_ms=5000"]).await;
    let mut c = Resp::connect(&p.addr());

    // MONITOR: one line per command, as sent.
    let s = std::net::TcpStream::connect(p.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = std::io::BufReader::new(s);
    w.write_all(b"MONITOR\r\n").unwrap();
    let mut ok = String::new();
    r.read_line(&mut ok).unwrap();
    assert_eq!(ok.trim_end(), "+OK");
    assert_eq!(c.cmd(&["ECHO", "start"]), "start");
    monitor_until(&mut r, "start");
    assert_eq!(c.cmd(&["SET", "mk", "1"]), "+OK");
    assert_eq!(c.cmd(&["GET", "mk"]), "1");
    assert_eq!(c.cmd(&["incr", "mk"]), ":2");
    assert!(c.cmd(&["LPUSH", "mk", "x"]).starts_with("-WRONGTYPE"));
    assert_eq!(c.cmd(&["EVAL", "return redis.call('set', KEYS[1], 'v')", "1", "ek"]), "+OK");
    assert_eq!(c.full(&["BLPOP", "empty-list", "0.05"]), "(nil array)");
    assert_eq!(c.cmd(&["MULTI"]), "+OK");
    assert_eq!(c.cmd(&["SET", "tx", "1"]), "+QUEUED");
    assert_eq!(c.full(&["EXEC"]), "[+OK]");
    assert_eq!(c.cmd(&["ECHO", "end"]), "end");
    let seen = monitor_until(&mut r, "end");
    // Other clients connecting meanwhile (a sidecar reconnecting) show
    // their AUTH; nothing else of theirs may show.
    let seen: Vec<String> = seen.into_iter().filter(|l| !l.starts_with("\"AUTH\"")).collect();
    let want = [
        r#""SET" "mk" "1""#,
        r#""GET" "mk""#,
        r#""incr" "mk""#,
        r#""LPUSH" "mk" "x""#,
        r#""EVAL" "return redis.call('set', KEYS[1], 'v')" "1" "ek""#,
        r#""set" "ek" "v""#,
        r#""BLPOP" "empty-list" "0.05""#,
        // MULTI and EXEC are kept by the module: not shown (see the doc).
        r#""SET" "tx" "1""#,
    ];
    assert_eq!(seen, want, "MONITOR printed other lines than one per client command");
    drop((w, r));

    // SLOWLOG: the client's command, not a wrapper; no internal calls.
    assert_eq!(c.cmd(&["CONFIG", "SET", "slowlog-log-slower-than", "0"]), "+OK");
    assert_eq!(c.cmd(&["SLOWLOG", "RESET"]), "+OK");
    assert_eq!(c.cmd(&["SET", "sk", "slow"]), "+OK");
    assert_eq!(c.cmd(&["CONFIG", "SET", "slowlog-log-slower-than", "10000"]), "+OK");
    let log = c.full(&["SLOWLOG", "GET", "1000"]);
    assert!(log.contains("[SET, sk, slow]"), "SLOWLOG lacks the client's SET: {log}");
    for internal in ["KEEL.", "[ROLE]", "[INFO, keel]"] {
        assert!(!log.to_ascii_uppercase().contains(internal), "SLOWLOG shows {internal}: {log}");
    }

    // INFO commandstats: the client's commands, counted once, and no
    // module command.
    assert_eq!(c.cmd(&["CONFIG", "RESETSTAT"]), "+OK");
    for i in 0..5 {
        assert_eq!(c.cmd(&["SET", &format!("cs{i}"), "v"]), "+OK");
    }
    let stats = c.full(&["INFO", "commandstats"]);
    let calls = |name: &str| {
        stats.lines().find_map(|l| l.strip_prefix(&format!("cmdstat_{name}:calls="))).and_then(|v| v.split(',').next()).map(|v| v.to_string())
    };
    assert_eq!(calls("set").as_deref(), Some("5"), "{stats}");
    assert!(!stats.contains("cmdstat_keel") && !stats.contains("cmdstat_role"), "{stats}");
    let everything = c.full(&["INFO", "everything"]);
    assert!(everything.contains("cmdstat_set:") && !everything.contains("cmdstat_keel"), "{everything}");

    // ACL: a user reads back the rules it was given, and they work.
    assert_eq!(c.cmd(&["ACL", "SETUSER", "alice", "on", ">pw", "~*", "+get", "+set"]), "+OK");
    let user = c.full(&["ACL", "GETUSER", "alice"]);
    assert!(user.contains("-@all +get +set") || user.contains("-@all +set +get"), "{user}");
    assert!(!user.contains("keel"), "{user}");
    let list = c.full(&["ACL", "LIST"]);
    assert!(list.contains("user alice on") && !list.contains("+keel"), "{list}");
    let mut alice = Resp::connect(&p.addr());
    assert_eq!(alice.cmd(&["AUTH", "alice", "pw"]), "+OK");
    assert_eq!(alice.cmd(&["SET", "ak", "1"]), "+OK");
    assert!(alice.cmd(&["DEL", "ak"]).starts_with("-NOPERM"));
    // ACL LOG's and CLIENT LIST's `cmd=`: the command, not the wrapper.
    let log = c.full(&["ACL", "LOG", "1"]);
    assert!(log.contains("cmd=del user=alice"), "{log}");
    let mut writer = Resp::connect(&p.addr());
    assert_eq!(writer.cmd(&["CLIENT", "SETNAME", "writer"]), "+OK");
    assert_eq!(writer.cmd(&["SET", "wk", "1"]), "+OK");
    let clients = c.full(&["CLIENT", "LIST"]);
    let line = clients.lines().find(|l| l.contains(" name=writer ")).unwrap_or_else(|| panic!("{clients}"));
    assert!(line.contains(" cmd=set "), "{line}");
    let me = clients.lines().find(|l| l.contains(" cmd=client|list ")).map(|_| ());
    assert!(me.is_some() && !clients.contains("cmd=keel.w") && !clients.contains("cmd=keel.view"), "{clients}");
    // The control user reads Redis's own report (the module's commands).
    let control = keel_tests::control_secret_of(&p.dir);
    let mut op = Resp::connect(&p.addr());
    assert_eq!(op.cmd(&["AUTH", keel_tests::CONTROL_USER, &control]), "+OK");
    assert!(op.full(&["ACL", "GETUSER", "alice"]).contains("+keel.w"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_introspection_shows_the_clients_commands() {
    introspection_shows_the_clients_commands(Server::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valkey_introspection_shows_the_clients_commands() {
    introspection_shows_the_clients_commands(Server::Valkey).await;
}
