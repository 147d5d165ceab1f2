//! The durable primary, end to end: redis-server (and valkey-server) with the
//! keel module, the primary sidecar and a real journal.

use std::time::Duration;
use std::time::Instant;

use keel_tests::KeelPrimary;
use keel_tests::Resp;
use keel_tests::Server;
use keel_tests::bin;

fn has(cmds: &[Vec<String>], want: &[&str]) -> bool {
    cmds.iter().any(|c| c.len() == want.len() && c.iter().zip(want).all(|(a, b)| a.eq_ignore_ascii_case(b)))
}

async fn acknowledged_writes_are_journaled(server: Server) {
    let p = KeelPrimary::start(server, 1, &["write_timeout_ms=3000"]).await;
    let mut c = Resp::connect(&p.addr());
    assert_eq!(c.cmd(&["SET", "k1", "v1"]), "+OK");
    assert_eq!(c.cmd(&["INCR", "n"]), ":1");
    assert_eq!(c.cmd(&["SELECT", "3"]), "+OK");
    assert_eq!(c.cmd(&["RPUSH", "list", "a", "b"]), ":2");
    assert_eq!(c.cmd(&["EVAL", "redis.call('set', KEYS[1], 'from-lua') return 7", "1", "k2"]), ":7");
    // Errors and reads are relayed unchanged.
    assert!(c.cmd(&["INCR", "list"]).starts_with("-WRONGTYPE"), "error replies keep their text");
    assert_eq!(c.cmd(&["GET", "k2"]), "from-lua");
    // RESP3 clients get RESP3 replies for held writes too.
    let mut c3 = Resp::connect(&p.addr());
    c3.hello3();
    assert_eq!(c3.cmd(&["SET", "k3", "v3"]), "+OK");
    // RESP3-only reply types survive holding: a write answering a double.
    assert_eq!(c3.cmd(&["INCRBYFLOAT", "f", "1.5"]), "1.5");

    // Every acknowledged write is in the journal, with its database.
    let cmds = p.journaled_commands();
    for want in [
        &["set", "k1", "v1"][..],
        &["incr", "n"],
        &["select", "3"],
        &["rpush", "list", "a", "b"],
        &["set", "k2", "from-lua"],
        &["set", "k3", "v3"],
    ] {
        assert!(has(&cmds, want), "{want:?} missing from the journal: {cmds:?}");
    }
    let info = c.cmd(&["INFO", "keel"]);
    assert!(info.contains("keel_role:primary"), "{info}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_acknowledged_writes_are_journaled() {
    acknowledged_writes_are_journaled(Server::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valkey_acknowledged_writes_are_journaled() {
    acknowledged_writes_are_journaled(Server::Valkey).await;
}

/// With the sidecar gone, a write waits for the named timeout and gets an
/// error, never an OK; a restarted sidecar resumes without a full sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_wait_then_fail_without_the_journal_and_resume_without_full_sync() {
    let mut p = KeelPrimary::start(Server::Redis, 1, &["write_timeout_ms=700"]).await;
    let mut c = Resp::connect(&p.addr());
    let full_syncs = |c: &mut Resp| {
        let info = c.cmd(&["INFO", "stats"]);
        info.lines().find_map(|l| l.strip_prefix("sync_full:")).unwrap().trim().parse::<u64>().unwrap()
    };
    let before = full_syncs(&mut c);
    p.kill_sidecar();
    let t = Instant::now();
    let reply = c.cmd(&["SET", "during-outage", "x"]);
    assert!(reply.starts_with("-KEEL_UNCONFIRMED"), "{reply}");
    assert!(t.elapsed() >= Duration::from_millis(600), "answered before the timeout");
    p.start_sidecar();
    p.wait_writable();
    assert_eq!(c.cmd(&["SET", "after", "y"]), "+OK");
    assert_eq!(full_syncs(&mut c), before, "the sidecar restart caused a full sync (fork)");
    assert!(has(&p.journaled_commands(), &["set", "after", "y"]));
}

/// A read of a key whose write is not durable yet waits for it; reads of
/// other keys do not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_of_pending_writes_wait_for_durability() {
    let p = KeelPrimary::start(Server::Redis, 1, &["write_timeout_ms=5000"]).await;
    let mut c = Resp::connect(&p.addr());
    assert_eq!(c.cmd(&["SET", "k", "old"]), "+OK");
    let sidecar = p.sidecar.as_ref().unwrap().id();
    keel_tests::signal(sidecar, "STOP");
    let addr = p.addr();
    let writer = std::thread::spawn(move || Resp::connect(&addr).cmd(&["SET", "k", "new"]));
    std::thread::sleep(Duration::from_millis(300));
    // Not durable: the read of k is held; a read of another key is not.
    let addr = p.addr();
    let reader = std::thread::spawn(move || {
        let t = Instant::now();
        (Resp::connect(&addr).cmd(&["GET", "k"]), t.elapsed())
    });
    let t = Instant::now();
    assert_eq!(c.cmd(&["GET", "other"]), "(nil)");
    assert!(t.elapsed() < Duration::from_millis(500), "an unrelated read waited");
    std::thread::sleep(Duration::from_millis(700));
    assert!(!reader.is_finished(), "the read of a non-durable write answered");
    keel_tests::signal(sidecar, "CONT");
    let (value, waited) = reader.join().unwrap();
    assert_eq!(value, "new");
    assert!(waited >= Duration::from_millis(700));
    assert_eq!(writer.join().unwrap(), "+OK");
}

/// Another writer takes the stream: the sidecar is fenced, held writes get
/// an error and the node refuses writes (it turns into a replica).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_primary_refuses_writes() {
    let p = KeelPrimary::start(Server::Redis, 1, &["write_timeout_ms=3000"]).await;
    let journal = p.journal.client();
    let info = journal.stream_info("shard-1").await.unwrap();
    journal.set_leader("shard-1", &keel_tests::new_uuid(), &info.leader_uuid).await.unwrap();
    let mut c = Resp::connect(&p.addr());
    let reply = c.cmd(&["SET", "late", "1"]);
    assert!(reply.starts_with("-KEEL_FENCED"), "{reply}");
    let reply = c.cmd(&["SET", "later", "1"]);
    assert!(reply.starts_with("-READONLY"), "{reply}");
    assert!(!p.journaled_commands().iter().any(|c| c.contains(&"late".to_string())));
}

#[test]
fn bad_module_arguments_fail_the_load_with_their_name() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(Server::Redis.binary())
        .args(["--port", &keel_tests::free_port().to_string(), "--save", ""])
        .arg("--dir")
        .arg(dir.path())
        .arg("--loadmodule")
        .arg(bin("libkeel_module.so"))
        .arg("write_timeout_ms=zero")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let log = String::from_utf8_lossy(&out.stdout);
    assert!(log.contains("write_timeout_ms"), "{log}");
}

/// kill -9 of the primary redis-server (and, in the same instant, its
/// sidecar, so nothing in flight is journaled afterwards) at a random moment
/// while a client writes numbered keys: every acknowledged key is in the
/// journal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_primary_loses_no_acknowledged_write() {
    let rounds = if std::env::var("KEEL_LONG").is_ok() { 20 } else { 3 };
    let mut p = KeelPrimary::start(Server::Redis, 3, &["write_timeout_ms=3000"]).await;
    for round in 0..rounds {
        if round > 0 {
            // A new history per round: fresh redis, fresh stream.
            p.kill_sidecar();
            p.port = keel_tests::free_port();
            p.start_redis();
            std::fs::remove_dir_all(p.dir.join("sidecar")).ok();
            p.stream = format!("round-{round}");
            p.start_sidecar();
            p.wait_writable();
        }
        let addr = p.addr();
        let writer = std::thread::spawn(move || {
            let mut c = Resp::connect(&addr);
            let mut acked = Vec::new();
            for i in 0.. {
                match c.try_cmd(&["SET", &format!("key:{i}"), &i.to_string()]) {
                    Ok(r) if r == "+OK" => acked.push(i),
                    Ok(r) => panic!("unexpected reply {r}"),
                    Err(_) => break,
                }
            }
            acked
        });
        let wait_ms = 200 + (std::process::id() as u64 * 7919 + round * 104_729) % 600;
        std::thread::sleep(Duration::from_millis(wait_ms));
        p.kill_sidecar();
        p.kill_redis();
        let acked = writer.join().unwrap();
        assert!(!acked.is_empty(), "round {round}: no write was acknowledged");
        let cmds = p.journaled_commands();
        let journaled: std::collections::HashSet<String> =
            cmds.iter().filter(|c| c.len() == 3 && c[0].eq_ignore_ascii_case("set")).map(|c| c[1].clone()).collect();
        for i in &acked {
            assert!(journaled.contains(&format!("key:{i}")), "round {round}: acknowledged key:{i} is not in the journal");
        }
        eprintln!("round {round}: {} writes acknowledged, all journaled", acked.len());
    }
}

/// With `--merge-wait-us`, appends wait for answered clients' next writes:
/// concurrent writers still get every write acknowledged and journaled, in
/// each writer's order, and so does a lone writer afterwards (whose writes
/// no longer come back in groups).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merged_appends_keep_every_acknowledged_write() {
    let p = KeelPrimary::start_with(Server::Redis, 3, &[], &["--merge-wait-us", "2000"]).await;
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let addr = p.addr();
            std::thread::spawn(move || {
                let mut c = Resp::connect(&addr);
                for i in 0..300 {
                    assert_eq!(c.cmd(&["SET", &format!("w{w}:{i}"), &i.to_string()]), "+OK");
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let mut lone = Resp::connect(&p.addr());
    for i in 0..200 {
        assert_eq!(lone.cmd(&["INCR", "lone"]), format!(":{}", i + 1));
    }
    let cmds = p.journaled_commands();
    for w in 0..8 {
        let seen: Vec<String> = cmds
            .iter()
            .filter(|c| c.len() == 3 && c[0].eq_ignore_ascii_case("set") && c[1].starts_with(&format!("w{w}:")))
            .map(|c| c[2].clone())
            .collect();
        let want: Vec<String> = (0..300).map(|i| i.to_string()).collect();
        assert_eq!(seen, want, "writer {w}'s writes, in the journal");
    }
    assert_eq!(cmds.iter().filter(|c| c.first().map(|n| n.eq_ignore_ascii_case("incr")).unwrap_or(false)).count(), 200);
}

/// MULTI/EXEC is kept by the module: queued commands run atomically at EXEC,
/// WATCH works, queueing errors abort, and the EXEC reply is held until the
/// transaction's effects are durable (sidecar paused: no reply).
async fn transactions_are_held_until_durable(server: Server) {
    let p = KeelPrimary::start(server, 1, &["write_timeout_ms=5000"]).await;
    let mut c = Resp::connect(&p.addr());
    assert_eq!(c.full(&["MULTI"]), "+OK");
    if server == Server::Valkey {
        // Valkey flags MULTI no_multi: refused, and the EXEC aborts.
        assert_eq!(c.full(&["MULTI"]), "-ERR Command 'multi' not allowed inside a transaction");
        assert!(c.full(&["EXEC"]).starts_with("-EXECABORT"));
        assert_eq!(c.full(&["MULTI"]), "+OK");
    } else {
        assert_eq!(c.full(&["MULTI"]), "-ERR MULTI calls can not be nested");
    }
    assert_eq!(c.full(&["SET", "t", "1"]), "+QUEUED");
    assert_eq!(c.full(&["INCR", "t"]), "+QUEUED");
    assert_eq!(c.full(&["GET", "t"]), "+QUEUED");
    assert_eq!(c.full(&["EXEC"]), "[+OK, :2, 2]");
    assert_eq!(c.full(&["EXEC"]), "-ERR EXEC without MULTI");

    // A queueing error discards the transaction.
    assert_eq!(c.full(&["MULTI"]), "+OK");
    assert_eq!(c.full(&["SET", "never", "1"]), "+QUEUED");
    assert!(c.full(&["NOSUCHCOMMAND", "x"]).starts_with("-ERR unknown command"));
    assert!(c.full(&["SET", "x"]).starts_with("-ERR wrong number of arguments"));
    assert!(c.full(&["EXEC"]).starts_with("-EXECABORT"));
    assert_eq!(c.full(&["GET", "never"]), "(nil)");

    // WATCH: a touched key fails the EXEC; an untouched one does not.
    let mut other = Resp::connect(&p.addr());
    assert_eq!(c.full(&["WATCH", "w"]), "+OK");
    assert_eq!(other.full(&["SET", "w", "changed"]), "+OK");
    assert_eq!(c.full(&["MULTI"]), "+OK");
    assert_eq!(c.full(&["SET", "q", "1"]), "+QUEUED");
    assert_eq!(c.full(&["EXEC"]), "(nil array)");
    assert_eq!(c.full(&["GET", "q"]), "(nil)");
    assert_eq!(c.full(&["WATCH", "w"]), "+OK");
    assert_eq!(c.full(&["MULTI"]), "+OK");
    assert_eq!(c.full(&["SET", "q", "2"]), "+QUEUED");
    assert_eq!(c.full(&["EXEC"]), "[+OK]");
    // SELECT inside a transaction changes the client's database.
    assert_eq!(c.full(&["MULTI"]), "+OK");
    assert_eq!(c.full(&["SELECT", "2"]), "+QUEUED");
    assert_eq!(c.full(&["SET", "in2", "x"]), "+QUEUED");
    assert_eq!(c.full(&["EXEC"]), "[+OK, +OK]");
    assert_eq!(c.full(&["GET", "in2"]), "x");
    assert_eq!(c.full(&["SELECT", "0"]), "+OK");

    // A blocking pop inside a transaction does not block, and its effect
    // is replicated (found: the module ran it without propagation).
    assert_eq!(c.full(&["MULTI"]), "+OK");
    assert_eq!(c.full(&["RPUSH", "bq", "x"]), "+QUEUED");
    assert_eq!(c.full(&["BLPOP", "bq", "0"]), "+QUEUED");
    assert_eq!(c.full(&["BLPOP", "bq", "0"]), "+QUEUED");
    assert_eq!(c.full(&["EXEC"]), "[:1, [bq, x], (nil array)]");

    // Other clients are served while a transaction is open.
    assert_eq!(c.full(&["MULTI"]), "+OK");
    assert_eq!(other.full(&["SET", "o", "1"]), "+OK");
    assert_eq!(other.full(&["GET", "o"]), "1");
    assert_eq!(c.full(&["DISCARD"]), "+OK");

    // The EXEC reply waits for the journal.
    let sidecar = p.sidecar.as_ref().unwrap().id();
    keel_tests::signal(sidecar, "STOP");
    let addr = p.addr();
    let held = std::thread::spawn(move || {
        let mut c = Resp::connect(&addr);
        assert_eq!(c.full(&["MULTI"]), "+OK");
        assert_eq!(c.full(&["RPUSH", "held", "a"]), "+QUEUED");
        assert_eq!(c.full(&["RPUSH", "held", "b"]), "+QUEUED");
        let t = Instant::now();
        (c.full(&["EXEC"]), t.elapsed())
    });
    std::thread::sleep(Duration::from_millis(800));
    assert!(!held.is_finished(), "EXEC answered before its writes were durable");
    keel_tests::signal(sidecar, "CONT");
    let (reply, waited) = held.join().unwrap();
    assert_eq!(reply, "[:1, :2]");
    assert!(waited >= Duration::from_millis(700), "{waited:?}");

    // The journal has the transaction, wrapped as Redis replicates it.
    let cmds = p.journaled_commands();
    let is = |c: &Vec<String>, want: &[&str]| has(std::slice::from_ref(c), want);
    let pos = cmds
        .iter()
        .position(|c| is(c, &["rpush", "held", "a"]))
        .unwrap_or_else(|| panic!("transaction not journaled: {cmds:?}"));
    assert!(is(&cmds[pos - 1], &["multi"]), "{cmds:?}");
    assert!(is(&cmds[pos + 1], &["rpush", "held", "b"]), "{cmds:?}");
    assert!(is(&cmds[pos + 2], &["exec"]), "{cmds:?}");
    assert!(!cmds.iter().any(|c| c.contains(&"never".to_string())));
    let push = cmds.iter().position(|c| is(c, &["rpush", "bq", "x"])).expect("push journaled");
    assert!(
        cmds[push + 1..].iter().any(|c| c[0].to_ascii_lowercase().contains("pop") && c.get(1).map(String::as_str) == Some("bq")),
        "the pop inside EXEC is not journaled: {cmds:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_transactions_are_held_until_durable() {
    transactions_are_held_until_durable(Server::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valkey_transactions_are_held_until_durable() {
    transactions_are_held_until_durable(Server::Valkey).await;
}

/// Blocking pops are kept by the module: a waiting BLPOP is woken by a push,
/// and its reply (like the push's) leaves only once the pop is durable; the
/// command's own timeout, a client leaving while it waits, XREADGROUP BLOCK
/// and RESP3 replies behave as in Redis.
async fn blocking_pops_are_held_until_durable(server: Server) {
    let p = KeelPrimary::start(server, 1, &["write_timeout_ms=5000"]).await;
    let addr = p.addr();
    let spawn = |args: Vec<&'static str>| {
        let addr = addr.clone();
        std::thread::spawn(move || {
            let t = Instant::now();
            (Resp::connect(&addr).full(&args), t.elapsed())
        })
    };
    let waiter = spawn(vec!["BLPOP", "q", "0"]);
    std::thread::sleep(Duration::from_millis(300));
    assert!(!waiter.is_finished(), "BLPOP on an empty list answered");
    let sidecar = p.sidecar.as_ref().unwrap().id();
    keel_tests::signal(sidecar, "STOP");
    let pusher = spawn(vec!["RPUSH", "q", "a"]);
    std::thread::sleep(Duration::from_millis(800));
    assert!(!waiter.is_finished(), "the pop answered before it was durable");
    assert!(!pusher.is_finished(), "the push answered before it was durable");
    keel_tests::signal(sidecar, "CONT");
    assert_eq!(waiter.join().unwrap().0, "[q, a]");
    assert_eq!(pusher.join().unwrap().0, ":1");

    // The pop is journaled after the push.
    let cmds = p.journaled_commands();
    let push = cmds.iter().position(|c| has(std::slice::from_ref(c), &["rpush", "q", "a"])).expect("push journaled");
    assert!(
        cmds[push + 1..].iter().any(|c| c[0].to_ascii_lowercase().contains("pop") && c.get(1).map(String::as_str) == Some("q")),
        "pop not journaled: {cmds:?}"
    );

    // The command's own timeout answers its null.
    let (reply, waited) = spawn(vec!["BLPOP", "nothere", "0.5"]).join().unwrap();
    assert_eq!(reply, "(nil array)");
    assert!(waited >= Duration::from_millis(450), "{waited:?}");

    // A client that leaves while waiting pops nothing.
    {
        let mut gone = Resp::connect(&p.addr());
        use std::io::Write;
        let s = std::net::TcpStream::connect(p.addr()).unwrap();
        (&s).write_all(b"*3\r\n$5\r\nBLPOP\r\n$2\r\nq2\r\n$1\r\n0\r\n").unwrap();
        std::thread::sleep(Duration::from_millis(200));
        drop(s);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(gone.full(&["RPUSH", "q2", "x"]), ":1");
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(gone.full(&["LLEN", "q2"]), ":1", "a departed client's BLPOP popped");
    }

    // Waiters are served in the order they came.
    let first = spawn(vec!["BLPOP", "fifo", "5"]);
    std::thread::sleep(Duration::from_millis(200));
    let second = spawn(vec!["BLPOP", "fifo", "5"]);
    std::thread::sleep(Duration::from_millis(200));
    let mut c = Resp::connect(&p.addr());
    assert_eq!(c.full(&["RPUSH", "fifo", "1", "2"]), ":2");
    assert_eq!(first.join().unwrap().0, "[fifo, 1]");
    assert_eq!(second.join().unwrap().0, "[fifo, 2]");

    // XREADGROUP BLOCK: woken by XADD; it counts one call in
    // commandstats, as in Redis (whether it had to wait is found out
    // without running it).
    assert_eq!(c.full(&["XGROUP", "CREATE", "st", "g", "$", "MKSTREAM"]), "+OK");
    assert_eq!(c.full(&["CONFIG", "RESETSTAT"]), "+OK");
    let reader = spawn(vec!["XREADGROUP", "GROUP", "g", "c1", "BLOCK", "5000", "STREAMS", "st", ">"]);
    std::thread::sleep(Duration::from_millis(300));
    assert!(!reader.is_finished());
    c.full(&["XADD", "st", "1-1", "f", "v"]);
    assert_eq!(reader.join().unwrap().0, "[[st, [[1-1, [f, v]]]]]");
    let stats = |c: &mut Resp| {
        let info = c.full(&["INFO", "commandstats"]);
        info.lines().find(|l| l.starts_with("cmdstat_xreadgroup:")).map(str::to_string).unwrap_or_default()
    };
    assert!(stats(&mut c).contains("calls=1,"), "{}", stats(&mut c));
    // Data there already: answered at once, one more call.
    c.full(&["XADD", "st", "1-2", "f", "w"]);
    assert_eq!(spawn(vec!["XREADGROUP", "GROUP", "g", "c1", "BLOCK", "5000", "STREAMS", "st", ">"]).join().unwrap().0, "[[st, [[1-2, [f, w]]]]]");
    // A waiting reader whose group is destroyed gets NOGROUP: one failed call.
    let reader = spawn(vec!["XREADGROUP", "GROUP", "g", "c1", "BLOCK", "5000", "STREAMS", "st", ">"]);
    std::thread::sleep(Duration::from_millis(300));
    assert!(!reader.is_finished());
    assert_eq!(c.full(&["XGROUP", "DESTROY", "st", "g"]), ":1");
    assert!(reader.join().unwrap().0.starts_with("-NOGROUP"));
    let s = stats(&mut c);
    assert!(s.contains("calls=3,") && s.contains("failed_calls=1"), "{s}");
    // A user who may not read the key is refused at once, not made to wait.
    assert_eq!(c.full(&["XGROUP", "CREATE", "st", "g", "$"]), "+OK");
    assert_eq!(c.full(&["ACL", "SETUSER", "eve", "on", ">pw", "~e*", "+xreadgroup"]), "+OK");
    let mut eve = Resp::connect(&p.addr());
    assert_eq!(eve.cmd(&["AUTH", "eve", "pw"]), "+OK");
    let t = Instant::now();
    let refused = eve.full(&["XREADGROUP", "GROUP", "g", "c1", "BLOCK", "3000", "STREAMS", "st", ">"]);
    assert!(refused.starts_with("-NOPERM"), "{refused}");
    assert!(t.elapsed() < Duration::from_millis(1500), "the refusal waited {:?}", t.elapsed());

    // RESP3: the score is a double, as Redis answers it.
    let addr = p.addr();
    let z = std::thread::spawn(move || {
        let mut c3 = Resp::connect(&addr);
        c3.hello3();
        c3.full(&["BZPOPMIN", "z", "5"])
    });
    std::thread::sleep(Duration::from_millis(300));
    c.full(&["ZADD", "z", "1.5", "m"]);
    assert_eq!(z.join().unwrap(), "[z, m, ,1.5]");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_blocking_pops_are_held_until_durable() {
    blocking_pops_are_held_until_durable(Server::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valkey_blocking_pops_are_held_until_durable() {
    blocking_pops_are_held_until_durable(Server::Valkey).await;
}

/// Found by Redis's Tcl suite: a script returning a table that contains
/// itself gives a reply nested ~8000 deep; holding it must not overflow the
/// stack (it crashed the server). Also: a key a script writes without
/// declaring it is a read hazard like any other, and INFO names the leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_replies_undeclared_script_keys_and_info() {
    let p = KeelPrimary::start(Server::Redis, 1, &["write_timeout_ms=5000"]).await;

    let sidecar = p.sidecar.as_ref().unwrap().id();
    keel_tests::signal(sidecar, "STOP");
    let addr = p.addr();
    let writer = std::thread::spawn(move || {
        Resp::connect(&addr).full(&["EVAL", "redis.call('set', 'undeclared', 'v') return 1", "1", "declared"])
    });
    std::thread::sleep(Duration::from_millis(300));
    let addr = p.addr();
    let reader = std::thread::spawn(move || Resp::connect(&addr).full(&["GET", "undeclared"]));
    std::thread::sleep(Duration::from_millis(700));
    assert!(!reader.is_finished(), "a read of a script's undeclared, non-durable write answered");
    keel_tests::signal(sidecar, "CONT");
    assert_eq!(writer.join().unwrap(), ":1");
    assert_eq!(reader.join().unwrap(), "v");

    let mut raw = std::io::BufReader::new(std::net::TcpStream::connect(p.addr()).unwrap());
    {
        use std::io::BufRead;
        use std::io::Write;
        let script = "local a = {}; local b = {a}; a[1] = b; return a";
        write!(raw.get_mut(), "*3\r\n$4\r\nEVAL\r\n${}\r\n{}\r\n$1\r\n0\r\n", script.len(), script).unwrap();
        let mut depth = 0;
        loop {
            let mut line = String::new();
            assert!(raw.read_line(&mut line).unwrap() > 0, "connection closed after {depth} levels");
            if line.starts_with('-') {
                assert!(line.contains("reached lua stack limit"), "{line}");
                break;
            }
            assert_eq!(line, "*1\r\n");
            depth += 1;
        }
        assert!(depth > 1000, "{depth}");
    }
    let mut c = Resp::connect(&p.addr());
    assert_eq!(c.full(&["PING"]), "+PONG", "the server survived");
    let full = c.full(&["INFO", "keel"]);
    let uuid = full.lines().find_map(|l| l.strip_prefix("keel_leader_uuid:")).unwrap_or("").trim().to_string();
    assert!(uuid::Uuid::parse_str(&uuid).is_ok(), "{full}");
    assert!(full.contains("keel_stream:shard-1"), "{full}");
}

/// A command refused inside MULTI because the lease lapsed is a queue-time
/// error: once the lease is back, EXEC aborts the transaction instead of
/// running it with the command missing (found by reading the chaos
/// harness's transaction path; this test failed before the fix).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_missing_a_refused_command_never_runs() {
    let p = KeelPrimary::start(Server::Redis, 1, &["write_timeout_ms=3000"]).await;
    let mut c = Resp::connect(&p.addr());
    assert_eq!(c.cmd(&["MULTI"]), "+OK");
    assert_eq!(c.cmd(&["RPUSH", "tx", "a"]), "+QUEUED");
    // No renewals: the module's lease lapses.
    let sidecar = p.sidecar.as_ref().unwrap().id();
    keel_tests::signal(sidecar, "STOP");
    let t = Instant::now();
    let refused = loop {
        let r = c.cmd(&["RPUSH", "tx", "b"]);
        if r != "+QUEUED" {
            break r;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "the lease never lapsed");
        std::thread::sleep(Duration::from_millis(100));
    };
    keel_tests::signal(sidecar, "CONT");
    assert!(refused.starts_with("-READONLY"), "{refused}");
    // The lease comes back with the next renewal.
    let mut probe = Resp::connect(&p.addr());
    let t = Instant::now();
    while probe.cmd(&["GET", "probe"]).starts_with("-READONLY") {
        assert!(t.elapsed() < Duration::from_secs(10), "the lease never came back");
        std::thread::sleep(Duration::from_millis(50));
    }
    let exec = c.cmd(&["EXEC"]);
    assert!(exec.starts_with("-EXECABORT"), "EXEC ran a transaction missing a command: {exec}");
    assert_eq!(probe.cmd(&["LLEN", "tx"]), ":0");
}

/// ACL users keep working behind the rewrite to KEEL.W: users from the ACL
/// file (granted at load and after ACL LOAD) and from ACL SETUSER may write
/// what their rules allow, durably; what their rules refuse gets Redis's
/// own NOPERM text, is not run and is not journaled; inside MULTI it is
/// refused at queue time and the EXEC aborts.
async fn acl_users_write_what_their_rules_allow(server: Server) {
    let acl_dir = tempfile::tempdir().unwrap();
    let aclfile = acl_dir.path().join("users.acl");
    std::fs::write(
        &aclfile,
        "user default on nopass ~* &* +@all\nuser carol on >pw ~c* +set +get +multi +exec\n",
    )
    .unwrap();
    let aclfile_arg = aclfile.to_string_lossy().into_owned();
    // Arguments after the module's are the server's own directives.
    let p = KeelPrimary::start(
        server,
        1,
        &["write_timeout_ms=5000", "--aclfile", &aclfile_arg],
    )
    .await;
    // Redis 7.0 and Valkey word their refusals differently; each gets its own.
    let (no_key, no_hset) = match server {
        Server::Redis => (
            "-NOPERM this user has no permissions to access one of the keys used as arguments",
            "-NOPERM this user has no permissions to run the 'hset' command",
        ),
        Server::Valkey => (
            "-NOPERM No permissions to access a key",
            "-NOPERM User carol has no permissions to run the 'hset' command",
        ),
    };
    let user = |name: &str| {
        let mut c = Resp::connect(&p.addr());
        assert_eq!(c.cmd(&["AUTH", name, "pw"]), "+OK");
        c
    };
    // A user from the ACL file, granted when the module loaded.
    let mut carol = user("carol");
    assert_eq!(carol.cmd(&["SET", "c1", "v"]), "+OK");
    assert_eq!(carol.cmd(&["SET", "x1", "v"]), no_key);
    assert_eq!(carol.cmd(&["HSET", "c2", "f", "v"]), no_hset);
    assert_eq!(carol.cmd(&["MULTI"]), "+OK");
    assert_eq!(carol.cmd(&["SET", "c3", "v"]), "+QUEUED");
    assert_eq!(carol.cmd(&["SET", "x3", "v"]), no_key);
    assert!(carol.cmd(&["EXEC"]).starts_with("-EXECABORT"));
    // A user made with ACL SETUSER, and one from ACL LOAD.
    let mut admin = Resp::connect(&p.addr());
    assert_eq!(
        admin.cmd(&["ACL", "SETUSER", "bob", "on", ">pw", "~b*", "+incr"]),
        "+OK"
    );
    assert_eq!(user("bob").cmd(&["INCR", "b1"]), ":1");
    assert_eq!(user("bob").cmd(&["INCR", "c1"]), no_key);
    std::fs::write(
        &aclfile,
        "user default on nopass ~* &* +@all\nuser carol on >pw ~c* +set +get +multi +exec\nuser dave on >pw ~d* +rpush\n",
    )
    .unwrap();
    assert_eq!(admin.cmd(&["ACL", "LOAD"]), "+OK");
    assert_eq!(user("dave").cmd(&["RPUSH", "d1", "a"]), ":1");
    let cmds = p.journaled_commands();
    for want in [
        &["set", "c1", "v"][..],
        &["incr", "b1"],
        &["rpush", "d1", "a"],
    ] {
        assert!(
            has(&cmds, want),
            "{want:?} missing from the journal: {cmds:?}"
        );
    }
    for refused in ["x1", "c2", "c3", "x3"] {
        assert!(
            !cmds.iter().any(|c| c.iter().any(|a| a == refused)),
            "{refused} was journaled: {cmds:?}"
        );
    }
    assert_eq!(admin.cmd(&["EXISTS", "x1", "c2", "c3", "x3"]), ":0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_acl_users_write_what_their_rules_allow() {
    acl_users_write_what_their_rules_allow(Server::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valkey_acl_users_write_what_their_rules_allow() {
    acl_users_write_what_their_rules_allow(Server::Valkey).await;
}

/// Sends `SET key v` from its own connection and returns once the module
/// holds its reply; the thread answers (reply, time it took).
fn held_write(addr: &str, key: &str) -> std::thread::JoinHandle<(String, Duration)> {
    let writer = {
        let (addr, key) = (addr.to_string(), key.to_string());
        std::thread::spawn(move || {
            let t = Instant::now();
            let reply = Resp::connect(&addr).cmd(&["SET", &key, "v"]);
            (reply, t.elapsed())
        })
    };
    let mut c = Resp::connect(addr);
    let t = Instant::now();
    while !c.cmd(&["INFO", "keel"]).contains("keel_pending_replies:1") {
        assert!(t.elapsed() < Duration::from_secs(10), "the write was never held");
        std::thread::sleep(Duration::from_millis(5));
    }
    writer
}

/// A confirmation that reaches Redis while a script runs too long (Redis
/// answers most commands `-BUSY` then) is not lost: the write it covers is
/// acknowledged when the script ends, not failed at the write timeout.
async fn a_confirmation_during_a_busy_script_is_not_lost(server: Server) {
    let p = KeelPrimary::start(server, 1, &[]).await;
    let addr = p.addr();
    let mut c = Resp::connect(&addr);
    assert_eq!(c.cmd(&["CONFIG", "SET", "lua-time-limit", "10"]), "+OK");
    // Hold the confirmation back: the sidecar is stopped (well within its
    // lease) while the write runs.
    let sidecar = p.sidecar.as_ref().expect("sidecar running").id();
    keel_tests::signal(sidecar, "STOP");
    let writer = held_write(&addr, "during-busy");
    // A script busy for 1.5 s; the sidecar resumes during it, appends the
    // write and sends its KEEL.ACK while Redis is busy.
    let script = {
        let addr = addr.clone();
        std::thread::spawn(move || {
            let busy = "local s = redis.call('TIME') \
                        while true do local n = redis.call('TIME') \
                        if (n[1] - s[1]) * 1000000 + (n[2] - s[2]) > 1500000 then break end end \
                        return 'done'";
            Resp::connect(&addr).cmd(&["EVAL", busy, "0"])
        })
    };
    std::thread::sleep(Duration::from_millis(150));
    keel_tests::signal(sidecar, "CONT");
    assert_eq!(script.join().unwrap(), "done", "the script's reply");
    let (reply, took) = writer.join().unwrap();
    assert_eq!(reply, "+OK", "the write's reply (after {took:?})");
    assert!(took < Duration::from_millis(4500), "the write waited {took:?}: its confirmation was lost");
}

/// Redis refuses the sidecar's `KEEL.ACK` (an ACL change denies it) while a
/// write is held; once it is allowed again the write is answered, well
/// before the write timeout: the refusal was noticed and the confirmation
/// said again, not lost. (Only the control user itself may change its
/// rules: the test authenticates as it, with the node's secret.)
async fn a_refused_confirmation_is_said_again(server: Server) {
    let p = KeelPrimary::start(server, 1, &[]).await;
    let addr = p.addr();
    let mut c = Resp::connect(&addr);
    let secret = keel_tests::control_secret_of(&p.dir);
    assert_eq!(c.cmd(&["AUTH", keel_tests::CONTROL_USER, &secret]), "+OK");
    assert_eq!(c.cmd(&["SET", "before", "v"]), "+OK");
    assert_eq!(c.cmd(&["ACL", "SETUSER", keel_tests::CONTROL_USER, "-keel.ack"]), "+OK");
    let writer = held_write(&addr, "during-deny");
    // Long enough for the sidecar to append the write and be refused.
    std::thread::sleep(Duration::from_millis(400));
    assert!(c.cmd(&["INFO", "keel"]).contains("keel_pending_replies:1"), "the write was answered while KEEL.ACK was denied");
    assert_eq!(c.cmd(&["ACL", "SETUSER", keel_tests::CONTROL_USER, "+keel.ack"]), "+OK");
    let (reply, took) = writer.join().unwrap();
    // KEEL_UNCONFIRMED (at the write timeout) would mean the
    // refused confirmation was never said again.
    assert_eq!(reply, "+OK", "the write's reply (after {took:?})");
    assert_eq!(c.cmd(&["GET", "during-deny"]), "v");
    assert_eq!(c.cmd(&["SET", "after", "v"]), "+OK");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_refused_confirmation_is_said_again() {
    a_refused_confirmation_is_said_again(Server::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valkey_a_refused_confirmation_is_said_again() {
    a_refused_confirmation_is_said_again(Server::Valkey).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_confirmation_during_a_busy_script_is_not_lost() {
    a_confirmation_during_a_busy_script_is_not_lost(Server::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valkey_a_confirmation_during_a_busy_script_is_not_lost() {
    a_confirmation_during_a_busy_script_is_not_lost(Server::Valkey).await;
}

/// A script's error counts once in INFO errorstats, as in Redis: an error
/// raised by a failed `redis.call` was counted when that command failed
/// (Redis leaves the script's reply out), while an error the script makes
/// itself is counted as the reply. A write refused by a read-only script is
/// counted against the write itself.
async fn script_errors_count_once(server: Server) {
    let p = KeelPrimary::start(server, 1, &["write_timeout_ms=5000"]).await;
    let mut c = Resp::connect(&p.addr());
    let field = |c: &mut Resp, section: &str, name: &str| {
        let info = c.full(&["INFO", section]);
        info.lines().find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':'))).unwrap_or("").trim().to_string()
    };
    assert_eq!(c.cmd(&["CONFIG", "RESETSTAT"]), "+OK");
    assert!(c.cmd(&["EVAL", "return redis.call('select', 99)", "0"]).starts_with("-ERR DB index is out of range"));
    assert_eq!(field(&mut c, "errorstats", "errorstat_ERR"), "count=1");
    assert_eq!(field(&mut c, "stats", "total_error_replies"), "1");
    assert_eq!(c.cmd(&["SET", "keel:str", "abc"]), "+OK");
    assert!(c.cmd(&["EVAL", "return redis.pcall('incr', KEYS[1])", "1", "keel:str"]).starts_with("-ERR value is not an integer"));
    assert_eq!(field(&mut c, "errorstats", "errorstat_ERR"), "count=2");
    assert!(c.cmd(&["EVAL", "return redis.error_reply('MY_CODE made here')", "0"]).starts_with("-MY_CODE made here"));
    assert_eq!(field(&mut c, "errorstats", "errorstat_MY_CODE"), "count=1");
    assert_eq!(field(&mut c, "stats", "total_error_replies"), "3");
    assert!(c.cmd(&["EVAL_RO", "return redis.call('set', KEYS[1], 'y')", "1", "keel:x"]).starts_with("-ERR Write commands are not allowed from read-only scripts"));
    assert_eq!(field(&mut c, "stats", "total_error_replies"), "4");
    let set = field(&mut c, "commandstats", "cmdstat_set");
    assert!(set.contains("rejected_calls=1"), "{set}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_script_errors_count_once() {
    script_errors_count_once(Server::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valkey_script_errors_count_once() {
    script_errors_count_once(Server::Valkey).await;
}
