//! A Redis Sentinel-compatible discovery endpoint. Each Keel node's sidecar
//! serves one, so that an unmodified Sentinel-aware client (redis-py's
//! `redis.sentinel.Sentinel`, or any client that asks `SENTINEL
//! get-master-addr-by-name`) finds the current primary and follows failovers.
//!
//! Contract:
//! - every answer comes from the latest [`View`], which the node refreshes
//!   from the journal's metadata; the endpoint holds no other state and
//!   talks to nobody: no ping, no hello, no vote;
//! - read-only: no command changes the view or anything else;
//! - failover is decided by the journal lease (the node holding the lease is
//!   the primary), not by Sentinel: the commands through which Sentinels
//!   vote, or an operator forces or reconfigures a failover
//!   (`IS-MASTER-DOWN-BY-ADDR`, `FAILOVER`, `SET`, `MONITOR`, ...), answer an
//!   error saying so;
//! - while the primary is unknown (`View::master` is `None`, during an
//!   election) the master is reported down (flags `s_down,o_down,master`,
//!   address `?:0`) and `get-master-addr-by-name` answers a null array, so
//!   clients retry instead of connecting to a stale address;
//! - replies have the shape of Redis Sentinel 7.0's RESP2 replies; what the
//!   view does not know (ping and refresh ages, replication offsets, the
//!   redis-servers' run ids) is reported as a freshly refreshed Sentinel
//!   would: ages 0, offsets 0, run id "";
//! - no pub/sub: `SUBSCRIBE` is an unknown command, so clients follow a
//!   failover by asking again when they (re)connect, as redis-py does, not
//!   through `+switch-master` messages.
//!
//! Who is served (`Access`, set at start from `keel-sidecar node`'s flags):
//! - over TLS when the node has a certificate for it (a `redis-<id>` one from
//!   `keel-journal certs`): the server shows it, clients show none and need
//!   only the deployment's CA; the handshake runs in the connection's own
//!   task and must end within [`TLS_HANDSHAKE_TIMEOUT_MS`], so a client that
//!   stalls in it holds up nobody else; a plaintext client of a TLS endpoint
//!   fails the handshake and is closed;
//! - with a password (as Redis's `requirepass`): until a connection gives it
//!   (`AUTH <password>`, `AUTH default <password>`, or `HELLO 2 AUTH
//!   default <password>`), every command but `AUTH`, `HELLO` and `QUIT` is
//!   answered `-NOAUTH Authentication required.`, and a wrong one
//!   `-WRONGPASS ...`, as Redis answers. The password is the connection's
//!   [`Session`] state, decided without I/O. Without a password every
//!   command is answered, and `AUTH` as Redis answers it when none is set.
//!
//! Life cycle of a connection: bytes are appended to the connection's
//! [`Session`]; every complete request at its front (RESP multibulk, or an
//! inline line as redis-cli and telnet send) is answered in order, and the
//! replies of one read go out in one write. A malformed request, or one
//! longer than [`MAX_REQUEST_BYTES`], is answered `-ERR Protocol error: ...`
//! and the connection is closed after that reply, as after `QUIT`. Each
//! connection is its own task, so a slow or stalled client only stalls
//! itself; dropping the [`serve`] future ends every connection it accepted.

use std::fmt::Write as _;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncRead;
use tokio::io::AsyncReadExt;
use tokio::io::AsyncWrite;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
#[cfg(test)]
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::resp::RespError;
use crate::resp::parse_command;

/// The master name a [`View`] reports unless the caller configures another.
pub const DEFAULT_MASTER_NAME: &str = "keel";
/// Longest request (one command, multibulk or inline) accepted; a client
/// sending more without completing a request is answered an error and closed.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;
/// Connections served at once; beyond, a new client is told
/// `-ERR max number of clients reached` and closed, as Redis does.
pub const MAX_CONNECTIONS: usize = 1024;
/// Bytes read from a socket at a time.
const READ_CHUNK_BYTES: usize = 16 << 10;
/// After its last reply, a closing connection keeps reading (and dropping)
/// what the client still sends for this long, so that the reply is not lost
/// to a TCP reset caused by unread input.
const CLOSE_LINGER_MS: u64 = 500;
/// Pause after a failed `accept` (e.g. out of file descriptors).
const ACCEPT_RETRY_PAUSE_MS: u64 = 100;
/// How long a client of a TLS endpoint may take to complete its handshake
/// before its connection is dropped.
pub const TLS_HANDSHAKE_TIMEOUT_MS: u64 = 5_000;

/// Redis's answer to a command from a client that has not authenticated.
pub const NOAUTH: &str = "NOAUTH Authentication required.";
/// Redis's answer to a wrong password (or a user other than `default`).
pub const WRONGPASS: &str = "WRONGPASS invalid username-password pair or user is disabled.";
/// Redis's answer to `HELLO` without `AUTH` from a client that has not
/// authenticated.
const NOAUTH_HELLO: &str = "NOAUTH HELLO must be called with the client already authenticated, otherwise the \
                            HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and \
                            select the RESP protocol version at the same time";

/// The Redis version whose Sentinel replies this endpoint reproduces.
pub const REPORTED_REDIS_VERSION: &str = "7.0.15";
/// Reported as `down-after-milliseconds` (Sentinel's default): Keel detects
/// a dead primary by its journal lease expiring, not by pings.
const REPORTED_DOWN_AFTER_MS: u64 = 30_000;
/// Reported as `failover-timeout` (Sentinel's default).
const REPORTED_FAILOVER_TIMEOUT_MS: u64 = 180_000;
/// Reported as `parallel-syncs` (Sentinel's default).
const REPORTED_PARALLEL_SYNCS: u64 = 1;
/// Reported as every replica's `slave-priority` (Redis's default).
const REPORTED_REPLICA_PRIORITY: u64 = 100;

/// A host and port, as clients should dial it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addr {
    pub host: String,
    pub port: u16,
}

impl Addr {
    /// Sentinel's name for a replica or sentinel: `host:port`, with an IPv6
    /// host in brackets.
    fn instance_name(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// A node's sentinel endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentinelPeer {
    pub addr: Addr,
    /// 40 hex characters, as Sentinel's run ids.
    pub run_id: String,
}

/// What the endpoint reports: the node refreshes it from the journal's
/// metadata and publishes it through a `watch` channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    /// The name clients ask for (`master_for("keel")`).
    pub master_name: String,
    /// The current primary's redis-server address; `None` while unknown
    /// (during an election).
    pub master: Option<Addr>,
    /// The replicas' redis-server addresses.
    pub replicas: Vec<Addr>,
    /// Every node's sentinel endpoint, this one included.
    pub sentinels: Vec<SentinelPeer>,
    /// This endpoint (left out of the `SENTINEL sentinels` answer).
    pub me: Option<SentinelPeer>,
    /// Failover counter (Sentinel's config-epoch): bumped on each leader change.
    pub epoch: u64,
}

impl Default for View {
    fn default() -> View {
        View {
            master_name: DEFAULT_MASTER_NAME.to_string(),
            master: None,
            replicas: Vec::new(),
            sentinels: Vec::new(),
            me: None,
            epoch: 0,
        }
    }
}

impl View {
    fn is_master(&self, name: &[u8]) -> bool {
        name == self.master_name.as_bytes()
    }

    /// The sentinels other than this endpoint.
    fn other_sentinels(&self) -> impl Iterator<Item = &SentinelPeer> {
        self.sentinels.iter().filter(|p| self.me.as_ref().is_none_or(|me| me.run_id != p.run_id && me.addr != p.addr))
    }

    /// Votes needed among the nodes: a majority, like the journal's.
    fn quorum(&self) -> usize {
        self.sentinels.len() / 2 + 1
    }
}

// ---------------------------------------------------------------------------
// Replies (RESP2)

fn simple(out: &mut Vec<u8>, s: &str) {
    out.push(b'+');
    out.extend_from_slice(s.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// `msg` starts with the error code (`ERR ...`); CR and LF become spaces so
/// that client-supplied text cannot break the framing.
fn error(out: &mut Vec<u8>, msg: &str) {
    out.push(b'-');
    out.extend(msg.bytes().map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }));
    out.extend_from_slice(b"\r\n");
}

fn bulk(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(format!("${}\r\n", b.len()).as_bytes());
    out.extend_from_slice(b);
    out.extend_from_slice(b"\r\n");
}

fn integer(out: &mut Vec<u8>, n: i64) {
    out.extend_from_slice(format!(":{n}\r\n").as_bytes());
}

fn array(out: &mut Vec<u8>, len: usize) {
    out.extend_from_slice(format!("*{len}\r\n").as_bytes());
}

fn null_array(out: &mut Vec<u8>) {
    out.extend_from_slice(b"*-1\r\n");
}

/// A Sentinel instance: a flat array of field and value bulk strings.
fn instance(out: &mut Vec<u8>, fields: &[(&str, String)]) {
    array(out, fields.len() * 2);
    for (k, v) in fields {
        bulk(out, k.as_bytes());
        bulk(out, v.as_bytes());
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn lower(b: &[u8]) -> String {
    text(b).to_ascii_lowercase()
}

/// At most `n` characters of `s`.
fn clip(s: &str, n: usize) -> &str {
    s.char_indices().nth(n).map_or(s, |(i, _)| &s[..i])
}

fn wrong_arity(out: &mut Vec<u8>, fullname: &str) {
    error(out, &format!("ERR wrong number of arguments for '{fullname}' command"));
}

fn unknown_subcommand(out: &mut Vec<u8>, command: &str, sub: &[u8]) {
    error(out, &format!("ERR unknown subcommand '{}'. Try {command} HELP.", clip(&text(sub), 128)));
}

fn no_such_master(out: &mut Vec<u8>) {
    error(out, "ERR No such master with that name");
}

// ---------------------------------------------------------------------------
// Commands

/// The RESP2 reply to one command (`args[0]` is its name, in any case),
/// answered from `view` alone. An empty command has no reply (Redis ignores
/// it), so the result is empty.
pub fn answer(view: &View, args: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    let Some(name) = args.first() else { return out };
    match lower(name).as_str() {
        "ping" => ping(&mut out, args),
        "sentinel" => sentinel(&mut out, view, args),
        "info" => info(&mut out, view, args),
        "role" if args.len() == 1 => {
            array(&mut out, 2);
            bulk(&mut out, b"sentinel");
            array(&mut out, 1);
            bulk(&mut out, view.master_name.as_bytes());
        }
        "role" => wrong_arity(&mut out, "role"),
        "hello" => match hello_request(args).and_then(|creds| creds.map_or(Ok(()), check_auth)) {
            Ok(()) => hello_reply(&mut out),
            Err(e) => error(&mut out, &e),
        },
        "auth" => match check_auth(&args[1..]) {
            Ok(()) => simple(&mut out, "OK"),
            Err(e) => error(&mut out, &e),
        },
        "client" => client(&mut out, args),
        "quit" => simple(&mut out, "OK"),
        _ => unknown_command(&mut out, args),
    }
    out
}

fn ping(out: &mut Vec<u8>, args: &[Vec<u8>]) {
    match args {
        [_] => simple(out, "PONG"),
        [_, msg] => bulk(out, msg),
        _ => wrong_arity(out, "ping"),
    }
}

fn unknown_command(out: &mut Vec<u8>, args: &[Vec<u8>]) {
    let mut rest = String::new();
    for a in &args[1..] {
        let room = 128usize.saturating_sub(rest.chars().count());
        if room == 0 {
            break;
        }
        let _ = write!(rest, "'{}' ", clip(&text(a), room));
    }
    error(out, &format!("ERR unknown command '{}', with args beginning with: {rest}", clip(&text(&args[0]), 128)));
}

/// `AUTH` as Redis answers it when no password is configured: the `default`
/// user has none, so `AUTH default <anything>` succeeds.
fn check_auth(args: &[Vec<u8>]) -> Result<(), String> {
    match args {
        [_password] => Err("ERR AUTH <password> called without any password configured for the default user. \
                            Are you sure your configuration is correct?"
            .into()),
        [user, _password] if user.as_slice() == b"default" => Ok(()),
        [_, _] => Err(WRONGPASS.into()),
        _ => Err("ERR wrong number of arguments for 'auth' command".into()),
    }
}

/// `AUTH` when a password is set: `AUTH <password>` or `AUTH default
/// <password>` (the only user).
fn check_password(password: &Password, args: &[Vec<u8>]) -> Result<(), String> {
    let right = match args {
        [given] => password.matches(given),
        [user, given] => user.as_slice() == b"default" && password.matches(given),
        _ => return Err("ERR wrong number of arguments for 'auth' command".into()),
    };
    if right { Ok(()) } else { Err(WRONGPASS.into()) }
}

/// Redis's rule for client names and library names: printable, no spaces.
fn valid_client_name(name: &[u8]) -> bool {
    name.iter().all(|&c| (b'!'..=b'~').contains(&c))
}

/// `HELLO [2 [AUTH user pass] [SETNAME name]]` (RESP2 only), checked as
/// Redis checks it before authenticating: the `AUTH` credentials it carries
/// (user and password), if any, or the error to answer.
fn hello_request(args: &[Vec<u8>]) -> Result<Option<&[Vec<u8>]>, String> {
    if let Some(v) = args.get(1) {
        match text(v).parse::<i64>() {
            Ok(2) => {}
            Ok(_) => return Err("NOPROTO unsupported protocol version".into()),
            Err(_) => return Err("ERR Protocol version is not an integer or out of range".into()),
        }
    }
    let mut creds = None;
    let mut j = 2;
    while j < args.len() {
        let more = args.len() - 1 - j;
        match lower(&args[j]).as_str() {
            "auth" if more >= 2 => {
                creds = Some(&args[j + 1..j + 3]);
                j += 3;
            }
            "setname" if more >= 1 => {
                if !valid_client_name(&args[j + 1]) {
                    return Err("ERR Client names cannot contain spaces, newlines or special characters.".into());
                }
                j += 2;
            }
            _ => return Err(format!("ERR Syntax error in HELLO option '{}'", clip(&text(&args[j]), 128))),
        }
    }
    Ok(creds)
}

/// The answer to an accepted `HELLO`.
fn hello_reply(out: &mut Vec<u8>) {
    // Sentinel's HELLO has no `role`; `id` is a client id, which this
    // endpoint does not assign.
    array(out, 12);
    for (k, v) in [("server", "redis"), ("version", REPORTED_REDIS_VERSION)] {
        bulk(out, k.as_bytes());
        bulk(out, v.as_bytes());
    }
    bulk(out, b"proto");
    integer(out, 2);
    bulk(out, b"id");
    integer(out, 0);
    bulk(out, b"mode");
    bulk(out, b"sentinel");
    bulk(out, b"modules");
    array(out, 0);
}

/// `CLIENT SETNAME` and `CLIENT SETINFO` (sent by clients on connect) are
/// accepted; nothing is kept.
fn client(out: &mut Vec<u8>, args: &[Vec<u8>]) {
    let Some(sub) = args.get(1) else { return wrong_arity(out, "client") };
    match (lower(sub).as_str(), args.len()) {
        ("setname", 3) if valid_client_name(&args[2]) => simple(out, "OK"),
        ("setname", 3) => error(out, "ERR Client names cannot contain spaces, newlines or special characters."),
        ("setname", _) => wrong_arity(out, "client|setname"),
        ("setinfo", 4) => match lower(&args[2]).as_str() {
            "lib-name" | "lib-ver" if valid_client_name(&args[3]) => simple(out, "OK"),
            attr @ ("lib-name" | "lib-ver") => {
                error(out, &format!("ERR {attr} cannot contain spaces, newlines or special characters."))
            }
            _ => error(out, &format!("ERR Unrecognized option '{}'", clip(&text(&args[2]), 128))),
        },
        ("setinfo", _) => wrong_arity(out, "client|setinfo"),
        _ => unknown_subcommand(out, "CLIENT", sub),
    }
}

/// `SENTINEL <subcommand> ...`.
fn sentinel(out: &mut Vec<u8>, view: &View, args: &[Vec<u8>]) {
    let Some(sub) = args.get(1) else { return wrong_arity(out, "sentinel") };
    let sub_lower = lower(sub);
    let arity = match sub_lower.as_str() {
        "masters" | "myid" | "help" => Some(2),
        "master" | "replicas" | "slaves" | "sentinels" | "get-master-addr-by-name" => Some(3),
        _ => None,
    };
    if arity.is_some_and(|n| n != args.len()) {
        return wrong_arity(out, &format!("sentinel|{sub_lower}"));
    }
    match sub_lower.as_str() {
        "masters" => {
            array(out, 1);
            instance(out, &master_fields(view));
        }
        "master" | "replicas" | "slaves" | "sentinels" if !view.is_master(&args[2]) => no_such_master(out),
        "master" => instance(out, &master_fields(view)),
        "replicas" | "slaves" => {
            array(out, view.replicas.len());
            for r in &view.replicas {
                instance(out, &replica_fields(view, r));
            }
        }
        "sentinels" => {
            let others: Vec<&SentinelPeer> = view.other_sentinels().collect();
            array(out, others.len());
            for p in others {
                instance(out, &sentinel_fields(p));
            }
        }
        "get-master-addr-by-name" => match &view.master {
            Some(m) if view.is_master(&args[2]) => {
                array(out, 2);
                bulk(out, m.host.as_bytes());
                bulk(out, m.port.to_string().as_bytes());
            }
            _ => null_array(out),
        },
        "myid" => match &view.me {
            Some(me) => bulk(out, me.run_id.as_bytes()),
            None => error(out, "ERR this endpoint has no sentinel id yet: the node has not published its view"),
        },
        "help" => {
            let help = [
                "SENTINEL <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
                "GET-MASTER-ADDR-BY-NAME <master-name>",
                "    Return the ip and port number of the master with that name.",
                "MASTER <master-name>",
                "    Show the state and info of the specified master.",
                "MASTERS",
                "    Show a list of monitored masters and their state.",
                "MYID",
                "    Return the ID of the Sentinel instance.",
                "REPLICAS <master-name>",
                "    Show a list of replicas for this master and their state.",
                "SENTINELS <master-name>",
                "    Show a list of Sentinel instances for this master and their state.",
                "Keel decides failover through its journal lease: this endpoint only reports it.",
            ];
            array(out, help.len());
            for line in help {
                simple(out, line);
            }
        }
        "is-master-down-by-addr"
        | "failover"
        | "set"
        | "monitor"
        | "remove"
        | "reset"
        | "flushconfig"
        | "ckquorum"
        | "config"
        | "simulate-failure"
        | "debug"
        | "info-cache"
        | "pending-scripts" => error(
            out,
            &format!(
                "ERR SENTINEL {} is not supported: Keel decides failover through the journal lease (the node \
                 holding the lease is the primary); this endpoint only reports the current primary",
                sub_lower.to_ascii_uppercase()
            ),
        ),
        _ => unknown_subcommand(out, "SENTINEL", sub),
    }
}

/// The fields every instance reply starts with, in Sentinel's order: who
/// the instance is, then the state of Sentinel's link to it (Keel keeps no
/// such link: zeros, as for a fresh one).
fn instance_head(name: String, ip: String, port: u16, runid: String, flags: &str) -> Vec<(&'static str, String)> {
    let zero = || "0".to_string();
    vec![
        ("name", name),
        ("ip", ip),
        ("port", port.to_string()),
        ("runid", runid),
        ("flags", flags.to_string()),
        ("link-pending-commands", zero()),
        ("link-refcount", "1".to_string()),
        ("last-ping-sent", zero()),
        ("last-ok-ping-reply", zero()),
        ("last-ping-reply", zero()),
    ]
}

fn master_fields(view: &View) -> Vec<(&'static str, String)> {
    let zero = || "0".to_string();
    let (ip, port, down) = match &view.master {
        Some(m) => (m.host.clone(), m.port, false),
        None => ("?".to_string(), 0, true),
    };
    let flags = if down { "s_down,o_down,master" } else { "master" };
    let mut f = instance_head(view.master_name.clone(), ip, port, String::new(), flags);
    if down {
        f.push(("s-down-time", zero()));
        f.push(("o-down-time", zero()));
    }
    f.extend([
        ("down-after-milliseconds", REPORTED_DOWN_AFTER_MS.to_string()),
        ("info-refresh", zero()),
        ("role-reported", "master".to_string()),
        ("role-reported-time", zero()),
        ("config-epoch", view.epoch.to_string()),
        ("num-slaves", view.replicas.len().to_string()),
        ("num-other-sentinels", view.other_sentinels().count().to_string()),
        ("quorum", view.quorum().to_string()),
        ("failover-timeout", REPORTED_FAILOVER_TIMEOUT_MS.to_string()),
        ("parallel-syncs", REPORTED_PARALLEL_SYNCS.to_string()),
    ]);
    f
}

fn replica_fields(view: &View, r: &Addr) -> Vec<(&'static str, String)> {
    let zero = || "0".to_string();
    let (master_host, master_port, link) = match &view.master {
        Some(m) => (m.host.clone(), m.port, "ok"),
        None => ("?".to_string(), 0, "err"),
    };
    let mut f = instance_head(r.instance_name(), r.host.clone(), r.port, String::new(), "slave");
    f.extend([
        ("down-after-milliseconds", REPORTED_DOWN_AFTER_MS.to_string()),
        ("info-refresh", zero()),
        ("role-reported", "slave".to_string()),
        ("role-reported-time", zero()),
        ("master-link-down-time", zero()),
        ("master-link-status", link.to_string()),
        ("master-host", master_host),
        ("master-port", master_port.to_string()),
        ("slave-priority", REPORTED_REPLICA_PRIORITY.to_string()),
        ("slave-repl-offset", zero()),
        ("replica-announced", "1".to_string()),
    ]);
    f
}

fn sentinel_fields(p: &SentinelPeer) -> Vec<(&'static str, String)> {
    let zero = || "0".to_string();
    let mut f = instance_head(p.addr.instance_name(), p.addr.host.clone(), p.addr.port, p.run_id.clone(), "sentinel");
    f.extend([
        ("down-after-milliseconds", REPORTED_DOWN_AFTER_MS.to_string()),
        ("last-hello-message", zero()),
        ("voted-leader", "?".to_string()),
        ("voted-leader-epoch", zero()),
    ]);
    f
}

/// `INFO [section ...]`: the `server` and `sentinel` sections (the others
/// Sentinel has, `clients`, `cpu` and `stats`, are not tracked and come back
/// empty, as an unknown section does).
fn info(out: &mut Vec<u8>, view: &View, args: &[Vec<u8>]) {
    let sections: Vec<String> = args[1..].iter().map(|a| lower(a)).collect();
    let all = sections.is_empty() || sections.iter().any(|s| matches!(s.as_str(), "default" | "all" | "everything"));
    let wants = |name: &str| all || sections.iter().any(|s| s == name);
    let mut s = String::new();
    if wants("server") {
        let (run_id, port) = view.me.as_ref().map_or(("", 0), |me| (me.run_id.as_str(), me.addr.port));
        let _ = write!(
            s,
            "# Server\r\nredis_version:{REPORTED_REDIS_VERSION}\r\nredis_mode:sentinel\r\nkeel_version:{}\r\n\
             run_id:{run_id}\r\ntcp_port:{port}\r\n",
            env!("CARGO_PKG_VERSION"),
        );
    }
    if wants("sentinel") {
        if !s.is_empty() {
            s.push_str("\r\n");
        }
        let (status, host, port) = match &view.master {
            Some(m) => ("ok", m.host.as_str(), m.port),
            None => ("odown", "?", 0),
        };
        let _ = write!(
            s,
            "# Sentinel\r\nsentinel_masters:1\r\nsentinel_tilt:0\r\nsentinel_tilt_since_seconds:-1\r\n\
             sentinel_running_scripts:0\r\nsentinel_scripts_queue_length:0\r\nsentinel_simulate_failure_flags:0\r\n\
             master0:name={},status={status},address={host}:{port},slaves={},sentinels={}\r\n",
            view.master_name,
            view.replicas.len(),
            view.other_sentinels().count() + 1,
        );
    }
    bulk(out, s.as_bytes());
}

// ---------------------------------------------------------------------------
// Requests

/// Why a connection's input cannot be answered; the connection is closed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
enum RequestError {
    #[error("Protocol error: {0}")]
    Malformed(#[from] RespError),
    #[error("Protocol error: unbalanced quotes in request")]
    UnbalancedQuotes,
    #[error("Protocol error: request longer than {MAX_REQUEST_BYTES} bytes (MAX_REQUEST_BYTES)")]
    TooLarge,
}

/// A request's arguments and the bytes it took, or `None` while incomplete.
type Parsed = Option<(Vec<Vec<u8>>, usize)>;

/// One request at the front of `b`: `Ok(Some((args, consumed)))`, or
/// `Ok(None)` while it is incomplete. A buffer starting with `*` holds a
/// multibulk request, anything else an inline one (a line, as Redis reads it).
fn next_request(b: &[u8]) -> Result<Parsed, RequestError> {
    if b.is_empty() {
        return Ok(None);
    }
    let parsed = if b[0] == b'*' { parse_command(b)? } else { inline_request(b)? };
    match parsed {
        Some((_, used)) if used > MAX_REQUEST_BYTES => Err(RequestError::TooLarge),
        None if b.len() > MAX_REQUEST_BYTES => Err(RequestError::TooLarge),
        parsed => Ok(parsed),
    }
}

fn inline_request(b: &[u8]) -> Result<Parsed, RequestError> {
    let window = &b[..b.len().min(MAX_REQUEST_BYTES + 1)];
    let Some(nl) = window.iter().position(|&c| c == b'\n') else { return Ok(None) };
    let line = b[..nl].strip_suffix(b"\r").unwrap_or(&b[..nl]);
    Ok(Some((split_inline(line)?, nl + 1)))
}

/// Blanks between inline arguments (C's `isspace`).
fn is_blank(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// Splits an inline request into arguments as Redis does: blanks separate
/// arguments; `"..."` quotes with `\n \r \t \b \a \xHH` and `\<c>` escapes;
/// `'...'` quotes with only `\'`; a closing quote must end its argument.
fn split_inline(line: &[u8]) -> Result<Vec<Vec<u8>>, RequestError> {
    #[derive(PartialEq)]
    enum Quote {
        None,
        Double,
        Single,
    }
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let ends_arg = |i: usize| i + 1 >= line.len() || is_blank(line[i + 1]);
    let mut args = Vec::new();
    let mut i = 0;
    loop {
        while i < line.len() && is_blank(line[i]) {
            i += 1;
        }
        if i >= line.len() {
            return Ok(args);
        }
        let mut arg = Vec::new();
        let mut quote = Quote::None;
        loop {
            let c = line.get(i).copied();
            match (&quote, c) {
                (Quote::Double | Quote::Single, None) => return Err(RequestError::UnbalancedQuotes),
                (Quote::None, None) => break,
                (Quote::Double, Some(b'\\')) if i + 1 < line.len() => {
                    let (x, h, l) = (line[i + 1], line.get(i + 2).copied(), line.get(i + 3).copied());
                    match (x, h.and_then(hex), l.and_then(hex)) {
                        (b'x', Some(h), Some(l)) => {
                            arg.push(h * 16 + l);
                            i += 3;
                        }
                        _ => {
                            arg.push(match x {
                                b'n' => b'\n',
                                b'r' => b'\r',
                                b't' => b'\t',
                                b'b' => 0x08,
                                b'a' => 0x07,
                                other => other,
                            });
                            i += 1;
                        }
                    }
                }
                (Quote::Double, Some(b'"')) | (Quote::Single, Some(b'\'')) => {
                    if !ends_arg(i) {
                        return Err(RequestError::UnbalancedQuotes);
                    }
                    i += 1;
                    break;
                }
                (Quote::Single, Some(b'\\')) if line.get(i + 1) == Some(&b'\'') => {
                    arg.push(b'\'');
                    i += 1;
                }
                (Quote::Double | Quote::Single, Some(c)) => arg.push(c),
                (Quote::None, Some(b' ' | b'\n' | b'\r' | b'\t')) => {
                    i += 1;
                    break;
                }
                (Quote::None, Some(b'"')) => quote = Quote::Double,
                (Quote::None, Some(b'\'')) => quote = Quote::Single,
                (Quote::None, Some(c)) => arg.push(c),
            }
            i += 1;
        }
        args.push(arg);
    }
}

/// The password clients must give before anything else is answered (as
/// Redis's `requirepass`). Never shown: `Debug` prints its length only.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(Arc<[u8]>);

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Password(<{} bytes, not shown>)", self.0.len())
    }
}

/// The discovery endpoint's password file.
const PASSWORD_FILE: crate::auth::SecretFile = crate::auth::SecretFile { flag: "--sentinel-password-file", what: "password", min_bytes: 1 };

impl Password {
    /// The password in a file's `contents` (one trailing newline is not
    /// part of it), if the file's `mode` lets only its owner read it;
    /// `path` names the file in errors, which never show the password.
    pub fn parse(path: &Path, contents: &[u8], mode: u32) -> Result<Password, String> {
        PASSWORD_FILE.check(&path.display().to_string(), contents, mode).map(|s| Password(s.into()))
    }

    /// Reads the password from the file at `path` (see [`Password::parse`]).
    pub fn from_file(path: &Path) -> Result<Password, String> {
        PASSWORD_FILE.read(path).map(|s| Password(s.into()))
    }

    /// Whether `given` is the password; the time taken depends on the
    /// length of `given` only, not on where it first differs.
    fn matches(&self, given: &[u8]) -> bool {
        let mut diff = self.0.len() ^ given.len();
        for (i, &b) in given.iter().enumerate() {
            diff |= usize::from(b ^ self.0.get(i).copied().unwrap_or(!b));
        }
        diff == 0
    }
}

/// One connection: its input not answered yet, and whether it has given
/// the password (when one is set).
#[derive(Debug, Default)]
struct Session {
    pending: Vec<u8>,
    /// The password this connection must give first; `None`: none is asked.
    password: Option<Password>,
    /// It gave the password. Once true it stays so: a later wrong `AUTH` is
    /// answered `WRONGPASS` and changes nothing, as in Redis.
    authenticated: bool,
}

/// What a [`Session`] produced from the bytes received so far.
#[derive(Debug, Default, PartialEq, Eq)]
struct Answered {
    replies: Vec<u8>,
    /// Close the connection after writing `replies` (QUIT, or a bad request).
    close: bool,
}

impl Session {
    fn new(password: Option<Password>) -> Session {
        Session { password, ..Session::default() }
    }

    /// The reply to one command: [`answer`]'s, once the connection is
    /// admitted.
    fn answer(&mut self, view: &View, args: &[Vec<u8>]) -> Vec<u8> {
        let Some(password) = &self.password else { return answer(view, args) };
        let mut out = Vec::new();
        match lower(&args[0]).as_str() {
            "auth" => match check_password(password, &args[1..]) {
                Ok(()) => {
                    self.authenticated = true;
                    simple(&mut out, "OK");
                }
                Err(e) => error(&mut out, &e),
            },
            "hello" => match hello_request(args) {
                Err(e) => error(&mut out, &e),
                Ok(creds) => {
                    if let Some(creds) = creds {
                        match check_password(password, creds) {
                            Ok(()) => self.authenticated = true,
                            Err(e) => {
                                error(&mut out, &e);
                                return out;
                            }
                        }
                    }
                    if self.authenticated { hello_reply(&mut out) } else { error(&mut out, NOAUTH_HELLO) }
                }
            },
            "quit" => return answer(view, args),
            _ if self.authenticated => return answer(view, args),
            _ => error(&mut out, NOAUTH),
        }
        out
    }

    /// Takes `bytes` just read and answers every request now complete.
    fn received(&mut self, view: &View, bytes: &[u8]) -> Answered {
        self.pending.extend_from_slice(bytes);
        let mut done = Answered::default();
        let mut at = 0;
        loop {
            match next_request(&self.pending[at..]) {
                Ok(Some((args, used))) => {
                    assert!(used > 0 && at + used <= self.pending.len(), "a request consumes input");
                    at += used;
                    if args.is_empty() {
                        continue;
                    }
                    let reply = self.answer(view, &args);
                    done.replies.extend(reply);
                    if args[0].eq_ignore_ascii_case(b"quit") {
                        done.close = true;
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    error(&mut done.replies, &format!("ERR {e}"));
                    done.close = true;
                    break;
                }
            }
        }
        self.pending.drain(..at);
        assert!(done.close || self.pending.len() <= MAX_REQUEST_BYTES, "pending input is bounded");
        done
    }
}

// ---------------------------------------------------------------------------
// I/O

/// Who the endpoint serves and how: over TLS or plaintext, with or without
/// a password. The default is plaintext without a password.
#[derive(Clone, Default)]
pub struct Access {
    /// Serve over TLS, showing this acceptor's certificate (clients show none).
    pub tls: Option<TlsAcceptor>,
    /// Clients must give this password first.
    pub password: Option<Password>,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.describe())
    }
}

impl Access {
    /// One phrase for logs.
    pub fn describe(&self) -> &'static str {
        match (self.tls.is_some(), self.password.is_some()) {
            (false, false) => "plaintext, no password",
            (false, true) => "plaintext, password required",
            (true, false) => "TLS, no password",
            (true, true) => "TLS, password required",
        }
    }
}

/// The endpoint's `keel-sidecar node` flags: `--sentinel-tls-cert`,
/// `--sentinel-tls-key` and `--sentinel-password-file`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessFlags {
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub password_file: Option<PathBuf>,
}

impl AccessFlags {
    /// Checks the flags against each other, reading nothing: both TLS files
    /// or neither, and none of them without an endpoint (`serving`: whether
    /// `--sentinel` is given).
    pub fn check(&self, serving: bool) -> Result<(), String> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => {
                return Err("--sentinel-tls-cert needs --sentinel-tls-key (the certificate's private key, PEM, mode 0600)".into());
            }
            (None, Some(_)) => {
                return Err("--sentinel-tls-key needs --sentinel-tls-cert (the certificate chain, PEM, e.g. redis-<id>.pem \
                            from `keel-journal certs`)"
                    .into());
            }
            _ => {}
        }
        if !serving && (self.tls_cert.is_some() || self.password_file.is_some()) {
            return Err("--sentinel-tls-cert, --sentinel-tls-key and --sentinel-password-file configure the discovery \
                        endpoint: give --sentinel ADDR too, or drop them"
                .into());
        }
        Ok(())
    }

    /// [`AccessFlags::check`], then reads and checks the files
    /// ([`tls_acceptor`], [`Password::from_file`]).
    pub fn load(&self, serving: bool) -> Result<Access, String> {
        self.check(serving)?;
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(tls_acceptor(cert, key)?),
            _ => None,
        };
        let password = self.password_file.as_deref().map(Password::from_file).transpose()?;
        Ok(Access { tls, password })
    }
}

/// A TLS acceptor that shows the certificate chain in `cert` with the
/// private key in `key` (both PEM; the key readable by its owner only, as
/// `keel-journal certs` writes it) and asks clients for no certificate.
pub fn tls_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, String> {
    keel_journal_client::tls::server_acceptor("the discovery endpoint", cert, key)
}

/// Serves RESP clients on `listener` in plaintext, without a password, until
/// this future is dropped: [`serve_with`] and [`Access::default`].
pub async fn serve(listener: TcpListener, view: watch::Receiver<View>) {
    serve_with(listener, view, Access::default()).await
}

/// Serves RESP clients on `listener` as `access` says until this future is
/// dropped (which also ends the connections it accepted); each command is
/// answered from the latest view in `view`.
pub async fn serve_with(listener: TcpListener, view: watch::Receiver<View>, access: Access) {
    tracing::info!(addr = ?listener.local_addr().ok(), access = access.describe(), "sentinel endpoint: serving");
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    if conns.len() >= MAX_CONNECTIONS {
                        // A TLS client could not read a plaintext error.
                        if access.tls.is_none() {
                            let _ = stream.try_write(b"-ERR max number of clients reached\r\n");
                        }
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    let view = view.clone();
                    let access = access.clone();
                    conns.spawn(async move {
                        let session = Session::new(access.password);
                        let ended = match access.tls {
                            None => connection(stream, view, session).await,
                            Some(tls) => match handshake(&tls, stream).await {
                                Ok(stream) => connection(stream, view, session).await,
                                Err(e) => Err(e),
                            },
                        };
                        if let Err(e) = ended {
                            tracing::debug!(%peer, error = %e, "sentinel endpoint: connection ended");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "sentinel endpoint: accept failed; retrying");
                    tokio::time::sleep(Duration::from_millis(ACCEPT_RETRY_PAUSE_MS)).await;
                }
            },
            Some(ended) = conns.join_next(), if !conns.is_empty() => {
                if let Err(e) = ended {
                    if e.is_panic() {
                        tracing::error!(error = %e, "sentinel endpoint: a connection task panicked");
                    }
                }
            }
        }
    }
}

/// The server side of a TLS handshake, within [`TLS_HANDSHAKE_TIMEOUT_MS`].
async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    tls: &TlsAcceptor,
    stream: S,
) -> std::io::Result<tokio_rustls::server::TlsStream<S>> {
    match tokio::time::timeout(Duration::from_millis(TLS_HANDSHAKE_TIMEOUT_MS), tls.accept(stream)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(std::io::Error::new(e.kind(), format!("TLS handshake failed: {e}"))),
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("TLS handshake not done within {TLS_HANDSHAKE_TIMEOUT_MS} ms (TLS_HANDSHAKE_TIMEOUT_MS)"),
        )),
    }
}

async fn connection<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    view: watch::Receiver<View>,
    mut session: Session,
) -> std::io::Result<()> {
    let mut chunk = vec![0u8; READ_CHUNK_BYTES];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        let done = session.received(&view.borrow(), &chunk[..n]);
        stream.write_all(&done.replies).await?;
        if done.close {
            stream.shutdown().await?;
            let drain = async {
                while let Ok(n) = stream.read(&mut chunk).await {
                    if n == 0 {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_millis(CLOSE_LINGER_MS), drain).await;
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;
    use crate::resp::encode_command;

    /// A RESP2 reply, decoded.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Frame {
        Simple(String),
        Error(String),
        Int(i64),
        Bulk(Option<Vec<u8>>),
        Array(Option<Vec<Frame>>),
    }

    fn crlf_line(b: &[u8]) -> Option<(&[u8], usize)> {
        let i = b.windows(2).position(|w| w == b"\r\n")?;
        Some((&b[..i], i + 2))
    }

    /// One frame at the front of `b`: `Some((frame, consumed))`, `None` if
    /// incomplete. Panics on anything that is not RESP2.
    fn read_frame(b: &[u8]) -> Option<(Frame, usize)> {
        let (&kind, _) = b.split_first()?;
        let (line, mut at) = crlf_line(&b[1..])?;
        at += 1;
        let line = std::str::from_utf8(line).expect("header is UTF-8");
        let frame = match kind {
            b'+' => Frame::Simple(line.to_string()),
            b'-' => Frame::Error(line.to_string()),
            b':' => Frame::Int(line.parse().expect("integer")),
            b'$' => {
                let n: i64 = line.parse().expect("bulk length");
                if n < 0 {
                    Frame::Bulk(None)
                } else {
                    let n = n as usize;
                    if b.len() < at + n + 2 {
                        return None;
                    }
                    assert_eq!(&b[at + n..at + n + 2], b"\r\n", "bulk ends with CRLF");
                    let v = b[at..at + n].to_vec();
                    at += n + 2;
                    Frame::Bulk(Some(v))
                }
            }
            b'*' => {
                let n: i64 = line.parse().expect("array length");
                if n < 0 {
                    Frame::Array(None)
                } else {
                    let mut items = Vec::new();
                    for _ in 0..n {
                        let (f, used) = read_frame(&b[at..])?;
                        items.push(f);
                        at += used;
                    }
                    Frame::Array(Some(items))
                }
            }
            other => panic!("not a RESP2 type byte: {other:?} in {:?}", String::from_utf8_lossy(b)),
        };
        Some((frame, at))
    }

    fn frames(mut b: &[u8]) -> Vec<Frame> {
        let mut out = Vec::new();
        while !b.is_empty() {
            let (f, used) = read_frame(b).unwrap_or_else(|| panic!("truncated reply {:?}", String::from_utf8_lossy(b)));
            out.push(f);
            b = &b[used..];
        }
        out
    }

    fn one(b: &[u8]) -> Frame {
        let mut f = frames(b);
        assert_eq!(f.len(), 1, "exactly one reply in {:?}", String::from_utf8_lossy(b));
        f.pop().unwrap()
    }

    fn bulk_text(f: &Frame) -> String {
        match f {
            Frame::Bulk(Some(b)) => String::from_utf8(b.clone()).unwrap(),
            other => panic!("not a bulk string: {other:?}"),
        }
    }

    fn array_of(f: Frame) -> Vec<Frame> {
        match f {
            Frame::Array(Some(items)) => items,
            other => panic!("not an array: {other:?}"),
        }
    }

    /// A Sentinel instance's fields, in order.
    fn fields(f: Frame) -> Vec<(String, String)> {
        let items = array_of(f);
        assert_eq!(items.len() % 2, 0, "field/value pairs");
        items.chunks(2).map(|kv| (bulk_text(&kv[0]), bulk_text(&kv[1]))).collect()
    }

    fn as_map(fields: &[(String, String)]) -> HashMap<&str, &str> {
        fields.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
    }

    fn err(f: Frame) -> String {
        match f {
            Frame::Error(e) => e,
            other => panic!("not an error: {other:?}"),
        }
    }

    fn cmd(words: &[&str]) -> Vec<Vec<u8>> {
        words.iter().map(|w| w.as_bytes().to_vec()).collect()
    }

    fn ask(view: &View, words: &[&str]) -> Frame {
        one(&answer(view, &cmd(words)))
    }

    fn addr(host: &str, port: u16) -> Addr {
        Addr { host: host.into(), port }
    }

    fn peer(host: &str, port: u16, c: char) -> SentinelPeer {
        SentinelPeer { addr: addr(host, port), run_id: c.to_string().repeat(40) }
    }

    fn view() -> View {
        let me = peer("10.0.0.1", 26379, 'a');
        View {
            master: Some(addr("10.0.0.1", 6379)),
            replicas: vec![addr("10.0.0.2", 6379), addr("10.0.0.3", 6380)],
            sentinels: vec![me.clone(), peer("10.0.0.2", 26379, 'b'), peer("10.0.0.3", 26379, 'c')],
            me: Some(me),
            epoch: 7,
            ..View::default()
        }
    }

    /// The fields redis-py converts with `int()` (SENTINEL_STATE_TYPES).
    const INT_FIELDS: &[&str] = &[
        "config-epoch",
        "down-after-milliseconds",
        "failover-timeout",
        "info-refresh",
        "last-hello-message",
        "last-ok-ping-reply",
        "last-ping-reply",
        "last-ping-sent",
        "master-link-down-time",
        "master-port",
        "num-other-sentinels",
        "num-slaves",
        "o-down-time",
        "parallel-syncs",
        "port",
        "quorum",
        "role-reported-time",
        "s-down-time",
        "slave-priority",
        "slave-repl-offset",
        "voted-leader-epoch",
    ];

    fn assert_ints(f: &[(String, String)]) {
        for (k, v) in f {
            if INT_FIELDS.contains(&k.as_str()) {
                assert!(v.parse::<i128>().is_ok(), "{k} = {v:?} is not an integer");
            }
        }
    }

    fn keys(f: &[(String, String)]) -> Vec<&str> {
        f.iter().map(|(k, _)| k.as_str()).collect()
    }

    #[test]
    fn default_view_is_named_keel_and_unknown() {
        let v = View::default();
        assert_eq!(v.master_name, "keel");
        assert_eq!(v.master, None);
    }

    #[test]
    fn ping() {
        let v = view();
        assert_eq!(ask(&v, &["PING"]), Frame::Simple("PONG".into()));
        assert_eq!(ask(&v, &["ping", "hi"]), Frame::Bulk(Some(b"hi".to_vec())));
        assert_eq!(err(ask(&v, &["ping", "a", "b"])), "ERR wrong number of arguments for 'ping' command");
    }

    #[test]
    fn get_master_addr_by_name() {
        let mut v = view();
        let reply = array_of(ask(&v, &["SENTINEL", "get-master-addr-by-name", "keel"]));
        assert_eq!(reply.iter().map(bulk_text).collect::<Vec<_>>(), ["10.0.0.1", "6379"]);
        assert_eq!(ask(&v, &["sentinel", "GET-MASTER-ADDR-BY-NAME", "nosuch"]), Frame::Array(None));
        assert_eq!(
            ask(&v, &["sentinel", "get-master-addr-by-name", "KEEL"]),
            Frame::Array(None),
            "names are case-sensitive"
        );
        assert!(err(ask(&v, &["sentinel", "get-master-addr-by-name"])).contains("'sentinel|get-master-addr-by-name'"));
        v.master = None;
        assert_eq!(ask(&v, &["SENTINEL", "get-master-addr-by-name", "keel"]), Frame::Array(None));
        v.master_name = "orders".into();
        v.master = Some(addr("::1", 7000));
        let reply = array_of(ask(&v, &["SENTINEL", "get-master-addr-by-name", "orders"]));
        assert_eq!(reply.iter().map(bulk_text).collect::<Vec<_>>(), ["::1", "7000"]);
    }

    #[test]
    fn masters_and_master() {
        let v = view();
        let masters = array_of(ask(&v, &["SENTINEL", "MASTERS"]));
        assert_eq!(masters.len(), 1);
        let f = fields(masters[0].clone());
        assert_eq!(
            keys(&f),
            [
                "name",
                "ip",
                "port",
                "runid",
                "flags",
                "link-pending-commands",
                "link-refcount",
                "last-ping-sent",
                "last-ok-ping-reply",
                "last-ping-reply",
                "down-after-milliseconds",
                "info-refresh",
                "role-reported",
                "role-reported-time",
                "config-epoch",
                "num-slaves",
                "num-other-sentinels",
                "quorum",
                "failover-timeout",
                "parallel-syncs",
            ]
        );
        assert_ints(&f);
        let m = as_map(&f);
        assert_eq!(m["name"], "keel");
        assert_eq!((m["ip"], m["port"]), ("10.0.0.1", "6379"));
        assert_eq!(m["flags"], "master");
        assert_eq!(m["role-reported"], "master");
        assert_eq!(m["config-epoch"], "7");
        assert_eq!(m["num-slaves"], "2");
        assert_eq!(m["num-other-sentinels"], "2");
        assert_eq!(m["quorum"], "2");
        assert_eq!(fields(ask(&v, &["sentinel", "master", "keel"])), f, "MASTER answers what MASTERS lists");
        assert_eq!(err(ask(&v, &["sentinel", "master", "nosuch"])), "ERR No such master with that name");
        assert_eq!(
            err(ask(&v, &["sentinel", "masters", "x"])),
            "ERR wrong number of arguments for 'sentinel|masters' command"
        );
    }

    #[test]
    fn master_unknown_is_reported_down() {
        let v = View { master: None, ..view() };
        let f = fields(array_of(ask(&v, &["SENTINEL", "MASTERS"])).remove(0));
        assert_ints(&f);
        let m = as_map(&f);
        let flags: Vec<&str> = m["flags"].split(',').collect();
        for flag in ["master", "s_down", "o_down"] {
            assert!(flags.contains(&flag), "{flag} in {flags:?}");
        }
        assert_eq!((m["ip"], m["port"]), ("?", "0"));
        assert!(m.contains_key("s-down-time") && m.contains_key("o-down-time"));
        let replica = fields(array_of(ask(&v, &["SENTINEL", "replicas", "keel"])).remove(0));
        let replica = as_map(&replica);
        assert_eq!(replica["master-link-status"], "err");
        assert_eq!((replica["master-host"], replica["master-port"]), ("?", "0"));
        let info = bulk_text(&ask(&v, &["INFO", "sentinel"]));
        assert!(info.contains("master0:name=keel,status=odown,address=?:0,slaves=2,sentinels=3\r\n"), "{info}");
    }

    #[test]
    fn replicas_and_slaves() {
        let v = view();
        let replicas = array_of(ask(&v, &["SENTINEL", "replicas", "keel"]));
        assert_eq!(ask(&v, &["SENTINEL", "SLAVES", "keel"]), Frame::Array(Some(replicas.clone())));
        assert_eq!(replicas.len(), 2);
        let f = fields(replicas[1].clone());
        assert_ints(&f);
        assert_eq!(
            keys(&f)[..5],
            ["name", "ip", "port", "runid", "flags"],
            "Sentinel's leading fields in Sentinel's order"
        );
        let m = as_map(&f);
        assert_eq!(m["name"], "10.0.0.3:6380");
        assert_eq!((m["ip"], m["port"]), ("10.0.0.3", "6380"));
        assert_eq!(m["flags"], "slave");
        assert_eq!(m["role-reported"], "slave");
        assert_eq!(m["master-link-status"], "ok");
        assert_eq!((m["master-host"], m["master-port"]), ("10.0.0.1", "6379"));
        assert_eq!(m["slave-priority"], "100");
        assert_eq!(err(ask(&v, &["SENTINEL", "replicas", "nosuch"])), "ERR No such master with that name");
        let v6 = View { replicas: vec![addr("fe80::1", 6379)], ..view() };
        let f = fields(array_of(ask(&v6, &["SENTINEL", "replicas", "keel"])).remove(0));
        assert_eq!(as_map(&f)["name"], "[fe80::1]:6379");
        let none = View { replicas: vec![], ..view() };
        assert_eq!(ask(&none, &["SENTINEL", "replicas", "keel"]), Frame::Array(Some(vec![])));
    }

    #[test]
    fn sentinels_leave_out_me() {
        let v = view();
        let others: Vec<_> = array_of(ask(&v, &["SENTINEL", "sentinels", "keel"])).into_iter().map(fields).collect();
        assert_eq!(others.len(), 2);
        for f in &others {
            assert_ints(f);
            assert_eq!(keys(f)[..5], ["name", "ip", "port", "runid", "flags"]);
        }
        let m = as_map(&others[0]);
        assert_eq!(m["name"], "10.0.0.2:26379");
        assert_eq!(m["runid"], "b".repeat(40));
        assert_eq!(m["flags"], "sentinel");
        assert_eq!(as_map(&others[1])["runid"], "c".repeat(40));
        let anonymous = View { me: None, ..view() };
        assert_eq!(array_of(ask(&anonymous, &["SENTINEL", "sentinels", "keel"])).len(), 3);
        assert_eq!(err(ask(&v, &["SENTINEL", "sentinels", "nosuch"])), "ERR No such master with that name");
    }

    #[test]
    fn myid() {
        assert_eq!(bulk_text(&ask(&view(), &["SENTINEL", "MYID"])), "a".repeat(40));
        assert!(err(ask(&View::default(), &["SENTINEL", "myid"])).starts_with("ERR "));
    }

    #[test]
    fn failover_commands_are_refused_with_the_reason() {
        let v = view();
        for words in [
            &["SENTINEL", "is-master-down-by-addr", "10.0.0.1", "6379", "7", "*"][..],
            &["SENTINEL", "failover", "keel"],
            &["SENTINEL", "set", "keel", "quorum", "1"],
            &["SENTINEL", "monitor", "x", "10.0.0.9", "6379", "2"],
            &["SENTINEL", "remove", "keel"],
            &["SENTINEL", "reset", "*"],
        ] {
            let e = err(ask(&v, words));
            assert!(e.starts_with("ERR SENTINEL "), "{e}");
            assert!(e.contains("journal lease") && e.contains("not supported"), "{e}");
        }
        assert_eq!(err(ask(&v, &["SENTINEL", "bogus"])), "ERR unknown subcommand 'bogus'. Try SENTINEL HELP.");
        assert_eq!(err(ask(&v, &["SENTINEL"])), "ERR wrong number of arguments for 'sentinel' command");
        assert!(matches!(ask(&v, &["SENTINEL", "help"]), Frame::Array(Some(lines)) if !lines.is_empty()));
    }

    #[test]
    fn info_sections() {
        let v = view();
        let all = bulk_text(&ask(&v, &["INFO"]));
        assert!(all.starts_with("# Server\r\n"), "{all}");
        assert!(all.contains("redis_mode:sentinel\r\n"), "{all}");
        assert!(all.contains(&format!("run_id:{}\r\n", "a".repeat(40))), "{all}");
        assert!(all.contains("tcp_port:26379\r\n"), "{all}");
        assert!(all.contains("\r\n\r\n# Sentinel\r\nsentinel_masters:1\r\n"), "{all}");
        assert!(all.contains("master0:name=keel,status=ok,address=10.0.0.1:6379,slaves=2,sentinels=3\r\n"), "{all}");
        assert_eq!(bulk_text(&ask(&v, &["info", "ALL"])), all);
        let sentinel = bulk_text(&ask(&v, &["INFO", "Sentinel"]));
        assert!(sentinel.starts_with("# Sentinel\r\n") && !sentinel.contains("# Server"), "{sentinel}");
        let server = bulk_text(&ask(&v, &["INFO", "server"]));
        assert!(server.starts_with("# Server\r\n") && !server.contains("# Sentinel"), "{server}");
        assert_eq!(bulk_text(&ask(&v, &["INFO", "keyspace"])), "");
        for line in all.split("\r\n").filter(|l| !l.is_empty() && !l.starts_with('#')) {
            assert!(line.contains(':'), "INFO line {line:?} is key:value");
        }
    }

    #[test]
    fn role_hello_client_auth_quit() {
        let v = View { master_name: "orders".into(), ..view() };
        assert_eq!(
            ask(&v, &["ROLE"]),
            Frame::Array(Some(vec![
                Frame::Bulk(Some(b"sentinel".to_vec())),
                Frame::Array(Some(vec![Frame::Bulk(Some(b"orders".to_vec()))])),
            ]))
        );
        assert!(err(ask(&v, &["HELLO", "3"])).starts_with("NOPROTO"));
        assert!(err(ask(&v, &["HELLO", "x"])).starts_with("ERR Protocol version"));
        for words in [&["HELLO"][..], &["hello", "2"], &["HELLO", "2", "SETNAME", "app", "AUTH", "default", "pw"]] {
            let items = array_of(ask(&v, words));
            let pairs: HashMap<String, Frame> = items.chunks(2).map(|kv| (bulk_text(&kv[0]), kv[1].clone())).collect();
            assert_eq!(pairs["proto"], Frame::Int(2));
            assert_eq!(pairs["mode"], Frame::Bulk(Some(b"sentinel".to_vec())));
            assert_eq!(pairs["modules"], Frame::Array(Some(vec![])));
        }
        assert!(err(ask(&v, &["HELLO", "2", "AUTH", "bob", "pw"])).starts_with("WRONGPASS"));
        assert!(err(ask(&v, &["HELLO", "2", "FOO"])).starts_with("ERR Syntax error in HELLO option"));
        assert_eq!(ask(&v, &["CLIENT", "SETNAME", "app"]), Frame::Simple("OK".into()));
        assert!(err(ask(&v, &["CLIENT", "SETNAME", "a b"])).starts_with("ERR Client names"));
        assert_eq!(ask(&v, &["client", "setinfo", "LIB-NAME", "redis-py"]), Frame::Simple("OK".into()));
        assert_eq!(ask(&v, &["CLIENT", "SETINFO", "lib-ver", "5.3.1"]), Frame::Simple("OK".into()));
        assert!(err(ask(&v, &["CLIENT", "SETINFO", "color", "x"])).starts_with("ERR Unrecognized option"));
        assert!(err(ask(&v, &["CLIENT", "KILL", "x"])).starts_with("ERR unknown subcommand 'KILL'. Try CLIENT HELP."));
        assert!(err(ask(&v, &["AUTH", "pw"])).contains("without any password configured"));
        assert_eq!(ask(&v, &["AUTH", "default", "pw"]), Frame::Simple("OK".into()));
        assert_eq!(ask(&v, &["QUIT"]), Frame::Simple("OK".into()));
        assert_eq!(answer(&v, &[]), b"");
    }

    #[test]
    fn unknown_commands() {
        let v = view();
        assert_eq!(err(ask(&v, &["COMMAND"])), "ERR unknown command 'COMMAND', with args beginning with: ");
        assert_eq!(err(ask(&v, &["set", "k", "v"])), "ERR unknown command 'set', with args beginning with: 'k' 'v' ");
        let e = err(one(&answer(&v, &[b"x\r\ny".to_vec(), b"a\nb".to_vec()])));
        assert!(!e.contains('\r') && !e.contains('\n'), "{e:?}");
        let long = "z".repeat(1000);
        let e = err(ask(&v, &[long.as_str(), long.as_str(), long.as_str()]));
        assert!(e.len() < 400, "arguments are clipped: {} bytes", e.len());
    }

    #[test]
    fn inline_splitting() {
        let split = |s: &str| split_inline(s.as_bytes());
        assert_eq!(split("  SENTINEL   masters "), Ok(cmd(&["SENTINEL", "masters"])));
        assert_eq!(split(""), Ok(vec![]));
        assert_eq!(split(r#"set "a b" 'c d'"#), Ok(cmd(&["set", "a b", "c d"])));
        assert_eq!(split(r#""\x41\n\t\"q" 'it\'s' """#), Ok(cmd(&["A\n\t\"q", "it's", ""])));
        assert_eq!(split(r#""\xZZ""#), Ok(cmd(&["xZZ"])));
        assert_eq!(split(r#"a"b c"d"#), Err(RequestError::UnbalancedQuotes));
        assert_eq!(split(r#"a"b c" d"#), Ok(cmd(&["ab c", "d"])));
        assert_eq!(split(r#""open"#), Err(RequestError::UnbalancedQuotes));
        assert_eq!(split("'open"), Err(RequestError::UnbalancedQuotes));
        assert_eq!(split(r#""a"b"#), Err(RequestError::UnbalancedQuotes));
        assert_eq!(split(r#""trailing\"#), Err(RequestError::UnbalancedQuotes));
    }

    fn session(view: &View, input: &[u8]) -> (Vec<Frame>, bool) {
        let done = Session::default().received(view, input);
        (frames(&done.replies), done.close)
    }

    #[test]
    fn pipelined_multibulk_and_inline() {
        let v = view();
        let mut input = encode_command(&[b"PING"]);
        input.extend_from_slice(b"sentinel get-master-addr-by-name keel\r\n\r\nPING hello\n");
        input.extend_from_slice(&encode_command(&[b"SENTINEL", b"myid"]));
        input.extend_from_slice(b"*0\r\n");
        let (replies, close) = session(&v, &input);
        assert!(!close);
        assert_eq!(replies.len(), 4, "{replies:?}");
        assert_eq!(replies[0], Frame::Simple("PONG".into()));
        assert_eq!(array_of(replies[1].clone()).iter().map(bulk_text).collect::<Vec<_>>(), ["10.0.0.1", "6379"]);
        assert_eq!(replies[2], Frame::Bulk(Some(b"hello".to_vec())));
        assert_eq!(bulk_text(&replies[3]), "a".repeat(40));
    }

    #[test]
    fn partial_requests_wait_for_more_bytes() {
        let v = view();
        let whole = [encode_command(&[b"SENTINEL", b"masters"]), b"PING\r\n".to_vec()].concat();
        let expected = Session::default().received(&v, &whole);
        for cut in 0..whole.len() {
            let mut s = Session::default();
            let mut replies = s.received(&v, &whole[..cut]).replies;
            replies.extend(s.received(&v, &whole[cut..]).replies);
            assert_eq!(replies, expected.replies, "cut at {cut}");
        }
    }

    #[test]
    fn quit_and_garbage_close_the_connection() {
        let v = view();
        let (replies, close) = session(&v, b"PING\r\nQUIT\r\nPING\r\n");
        assert_eq!(replies, [Frame::Simple("PONG".into()), Frame::Simple("OK".into())]);
        assert!(close);
        for garbage in [&b"*x\r\n"[..], b"*1\r\n+PING\r\n", b"*1\r\n$4\r\nPINGxx", b"*-1\r\n", b"\"unbalanced\r\n"] {
            let (replies, close) = session(&v, garbage);
            assert!(close, "{garbage:?}");
            assert!(err(replies.last().unwrap().clone()).starts_with("ERR Protocol error: "), "{garbage:?}");
        }
    }

    #[test]
    fn requests_are_capped() {
        let v = view();
        let mut s = Session::default();
        let a = s.received(&v, &vec![b'a'; MAX_REQUEST_BYTES]);
        assert_eq!(a, Answered::default(), "an incomplete inline request up to the cap waits");
        let (replies, close) = session(&v, &vec![b'a'; MAX_REQUEST_BYTES + 1]);
        assert!(close);
        assert!(err(replies[0].clone()).contains("MAX_REQUEST_BYTES"));
        let big = encode_command(&[b"PING", &vec![b'x'; MAX_REQUEST_BYTES]]);
        let (replies, close) = session(&v, &big[..MAX_REQUEST_BYTES + 1]);
        assert!(close && err(replies[0].clone()).contains("MAX_REQUEST_BYTES"), "incomplete multibulk over the cap");
        let (replies, close) = session(&v, &big);
        assert!(close && err(replies[0].clone()).contains("MAX_REQUEST_BYTES"), "complete multibulk over the cap");
        let fits = encode_command(&[b"PING", &vec![b'x'; MAX_REQUEST_BYTES - 32]]);
        assert!(fits.len() <= MAX_REQUEST_BYTES);
        let (replies, close) = session(&v, &fits);
        assert!(!close && matches!(&replies[..], [Frame::Bulk(Some(b))] if b.len() == MAX_REQUEST_BYTES - 32));
    }

    const PW: &str = "s3cret pass";

    fn password() -> Password {
        Password::parse(Path::new("/run/keel/sentinel.pw"), format!("{PW}\n").as_bytes(), 0o100600).unwrap()
    }

    fn locked() -> Session {
        Session::new(Some(password()))
    }

    fn ask_as(s: &mut Session, view: &View, words: &[&str]) -> Frame {
        one(&s.answer(view, &cmd(words)))
    }

    #[test]
    fn password_files_are_checked() {
        let path = Path::new("/run/keel/sentinel.pw");
        for (contents, want) in [(&b"pw\n"[..], &b"pw"[..]), (b"pw", b"pw"), (b"pw\r\n", b"pw"), (b"two words\n", b"two words")] {
            assert_eq!(&*Password::parse(path, contents, 0o100600).unwrap().0, want, "{contents:?}");
        }
        assert!(Password::parse(path, b"pw", 0o100400).is_ok());
        for (contents, mode, says) in [
            (&b"hunter2\n"[..], 0o100644, "chmod 600 /run/keel/sentinel.pw"),
            (b"hunter2", 0o100640, "group or others"),
            (b"hunter2", 0o100604, "group or others"),
            (b"\n", 0o100600, "empty"),
            (b"", 0o100600, "empty"),
            (b"hunter2\nhunter3", 0o100600, "one line"),
            (b"hunter2\n\n", 0o100600, "one line"),
            (b"hun\0ter2", 0o100600, "one line"),
        ] {
            let e = Password::parse(path, contents, mode).unwrap_err();
            assert!(e.contains(says) && e.contains("--sentinel-password-file /run/keel/sentinel.pw"), "{e}");
            assert!(!e.contains("hunter"), "the password leaked: {e}");
        }
        assert_eq!(format!("{:?}", password()), "Password(<11 bytes, not shown>)");
        assert_eq!(format!("{:?}", Session::new(Some(password()))).matches(PW).count(), 0);
    }

    #[test]
    fn password_matching() {
        let p = password();
        assert!(p.matches(PW.as_bytes()));
        for wrong in ["", "s", "s3cret pas", "s3cret passs", "S3cret pass", "s3cret pasS", "s3cret pass\n"] {
            assert!(!p.matches(wrong.as_bytes()), "{wrong:?}");
        }
    }

    #[test]
    fn without_a_password_sessions_answer_as_answer_does() {
        let v = view();
        let mut s = Session::default();
        for words in [&["PING"][..], &["AUTH", "pw"], &["AUTH", "default", "x"], &["HELLO", "2", "AUTH", "default", "x"]] {
            assert_eq!(s.answer(&v, &cmd(words)), answer(&v, &cmd(words)), "{words:?}");
        }
    }

    #[test]
    fn with_a_password_nothing_is_answered_before_auth() {
        let v = view();
        let mut s = locked();
        for words in [
            &["PING"][..],
            &["SENTINEL", "get-master-addr-by-name", "keel"],
            &["SENTINEL", "masters"],
            &["INFO"],
            &["ROLE"],
            &["CLIENT", "SETINFO", "LIB-NAME", "redis-py"],
            &["NOSUCH", "x"],
        ] {
            assert_eq!(err(ask_as(&mut s, &v, words)), NOAUTH, "{words:?}");
        }
        assert!(err(ask_as(&mut s, &v, &["HELLO"])).starts_with("NOAUTH HELLO must be called"));
        assert!(err(ask_as(&mut s, &v, &["HELLO", "2", "SETNAME", "app"])).starts_with("NOAUTH HELLO"));
        assert!(err(ask_as(&mut s, &v, &["HELLO", "3", "AUTH", "default", PW])).starts_with("NOPROTO"));
        assert_eq!(err(ask_as(&mut s, &v, &["HELLO", "2", "AUTH", "default", "nope"])), WRONGPASS);
        assert_eq!(err(ask_as(&mut s, &v, &["AUTH", "nope"])), WRONGPASS);
        assert_eq!(err(ask_as(&mut s, &v, &["AUTH", "default", "nope"])), WRONGPASS);
        assert_eq!(err(ask_as(&mut s, &v, &["AUTH", "bob", PW])), WRONGPASS, "only the default user");
        assert_eq!(err(ask_as(&mut s, &v, &["AUTH", "DEFAULT", PW])), WRONGPASS, "user names are case-sensitive");
        assert!(err(ask_as(&mut s, &v, &["AUTH"])).starts_with("ERR wrong number of arguments for 'auth'"));
        assert!(err(ask_as(&mut s, &v, &["AUTH", "a", "b", "c"])).starts_with("ERR wrong number of arguments"));
        assert_eq!(err(ask_as(&mut s, &v, &["PING"])), NOAUTH, "failed attempts admit nobody");
        assert!(!s.authenticated);
        let (replies, close) = {
            let done = locked().received(&v, b"QUIT\r\n");
            (frames(&done.replies), done.close)
        };
        assert_eq!((replies, close), (vec![Frame::Simple("OK".into())], true), "QUIT needs no password");
    }

    #[test]
    fn every_way_to_give_the_password_admits() {
        let v = view();
        for words in [&["AUTH", PW][..], &["auth", "default", PW], &["HELLO", "2", "AUTH", "default", PW], &[
            "hello", "2", "SETNAME", "app", "auth", "default", PW,
        ]] {
            let mut s = locked();
            let first = ask_as(&mut s, &v, words);
            if words[0].eq_ignore_ascii_case("hello") {
                assert_eq!(first, ask(&v, &["HELLO", "2"]), "{words:?}");
            } else {
                assert_eq!(first, Frame::Simple("OK".into()), "{words:?}");
            }
            assert!(s.authenticated);
            assert_eq!(ask_as(&mut s, &v, &["PING"]), Frame::Simple("PONG".into()), "{words:?}");
            assert_eq!(
                ask_as(&mut s, &v, &["SENTINEL", "get-master-addr-by-name", "keel"]),
                ask(&v, &["SENTINEL", "get-master-addr-by-name", "keel"])
            );
            assert_eq!(ask_as(&mut s, &v, &["HELLO"]), ask(&v, &["HELLO"]), "HELLO without AUTH once admitted");
            assert_eq!(err(ask_as(&mut s, &v, &["AUTH", "nope"])), WRONGPASS);
            assert_eq!(ask_as(&mut s, &v, &["PING"]), Frame::Simple("PONG".into()), "a later wrong AUTH changes nothing");
        }
    }

    #[test]
    fn a_pipeline_is_answered_in_order_around_auth() {
        let v = view();
        let mut input = b"PING\r\n".to_vec();
        input.extend(encode_command(&[b"AUTH", PW.as_bytes()]));
        input.extend_from_slice(b"PING\r\n");
        let done = locked().received(&v, &input);
        assert!(!done.close);
        assert_eq!(
            frames(&done.replies),
            [Frame::Error(NOAUTH.into()), Frame::Simple("OK".into()), Frame::Simple("PONG".into())]
        );
    }

    #[test]
    fn access_flags() {
        let p = |s: &str| Some(PathBuf::from(s));
        let f = |cert: bool, key: bool, pw: bool| AccessFlags {
            tls_cert: if cert { p("/t/redis-0.pem") } else { None },
            tls_key: if key { p("/t/redis-0.key") } else { None },
            password_file: if pw { p("/t/pw") } else { None },
        };
        for bits in 0..8u32 {
            let (cert, key, pw) = (bits & 1 != 0, bits & 2 != 0, bits & 4 != 0);
            let flags = f(cert, key, pw);
            assert_eq!(flags.check(true).is_ok(), cert == key, "{flags:?}");
            assert_eq!(flags.check(false).is_ok(), !cert && !key && !pw, "{flags:?}");
        }
        assert!(f(true, false, false).check(true).unwrap_err().contains("needs --sentinel-tls-key"));
        assert!(f(false, true, false).check(true).unwrap_err().contains("needs --sentinel-tls-cert"));
        assert!(f(false, false, true).check(false).unwrap_err().contains("give --sentinel ADDR"));
        assert_eq!(AccessFlags::default().load(false).unwrap().describe(), "plaintext, no password");
        let e = f(true, true, false).load(true).unwrap_err();
        assert!(e.contains("cannot read the discovery endpoint's certificate /t/redis-0.pem"), "{e}");
    }

    /// Inline-safe words and arbitrary binary arguments for generated commands.
    fn command() -> impl Strategy<Value = (Vec<Vec<u8>>, bool)> {
        let name = prop_oneof![
            Just(cmd(&["PING"])),
            Just(cmd(&["SENTINEL", "masters"])),
            Just(cmd(&["SENTINEL", "master", "keel"])),
            Just(cmd(&["SENTINEL", "replicas", "keel"])),
            Just(cmd(&["SENTINEL", "sentinels", "keel"])),
            Just(cmd(&["SENTINEL", "get-master-addr-by-name", "keel"])),
            Just(cmd(&["SENTINEL", "myid"])),
            Just(cmd(&["SENTINEL", "failover", "keel"])),
            Just(cmd(&["INFO"])),
            Just(cmd(&["ROLE"])),
            Just(cmd(&["CLIENT", "SETINFO", "LIB-NAME", "redis-py"])),
            "[a-zA-Z]{1,8}"
                .prop_filter("QUIT closes", |w| !w.eq_ignore_ascii_case("quit"))
                .prop_map(|w| vec![w.into_bytes()]),
        ];
        let word = "[a-zA-Z0-9_:.-]{1,12}".prop_map(String::into_bytes);
        (name, prop::collection::vec(word, 0..3), prop::collection::vec(any::<u8>(), 0..16), any::<u8>()).prop_map(
            |(mut args, words, binary, how)| {
                args.extend(words);
                let inline = how % 3 == 0;
                if !inline && how % 2 == 0 {
                    args.push(binary);
                }
                (args, inline)
            },
        )
    }

    fn arbitrary_view() -> impl Strategy<Value = View> {
        let host = "[a-z0-9.:]{0,15}";
        let a = (host, any::<u16>()).prop_map(|(host, port)| Addr { host, port });
        let p = (a.clone(), "[0-9a-f]{40}").prop_map(|(addr, run_id)| SentinelPeer { addr, run_id });
        (
            "[a-z]{0,6}",
            prop::option::of(a.clone()),
            prop::collection::vec(a, 0..4),
            prop::collection::vec(p.clone(), 0..4),
            prop::option::of(p),
            any::<u64>(),
        )
            .prop_map(|(master_name, master, replicas, sentinels, me, epoch)| View {
                master_name,
                master,
                replicas,
                sentinels,
                me,
                epoch,
            })
    }

    /// Splits `input` at the given fractions, as reads would.
    fn chunks(input: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
        let mut at: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
        at.sort_unstable();
        let mut out = Vec::new();
        let mut prev = 0;
        for c in at.into_iter().chain([input.len()]) {
            out.push(input[prev..c].to_vec());
            prev = c;
        }
        out
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(
            junk in prop::collection::vec(any::<u8>(), 0..300),
            cuts in prop::collection::vec(any::<usize>(), 0..5),
        ) {
            let v = view();
            let mut s = Session::default();
            for chunk in chunks(&junk, &cuts) {
                let done = s.received(&v, &chunk);
                frames(&done.replies);
                if done.close {
                    return Ok(());
                }
            }
            prop_assert_eq!(next_request(&s.pending), Ok(None), "what is left is an incomplete request");
        }

        #[test]
        fn resp_shaped_junk_never_panics(
            parts in prop::collection::vec(
                prop_oneof![
                    Just(b"*".to_vec()), Just(b"$".to_vec()), Just(b"\r\n".to_vec()), Just(b"\n".to_vec()),
                    Just(b"\"".to_vec()), Just(b"'".to_vec()), Just(b"\\x4".to_vec()), Just(b"-1".to_vec()),
                    "[0-9]{1,3}".prop_map(String::into_bytes), "[A-Za-z ]{1,5}".prop_map(String::into_bytes),
                ],
                0..40,
            ),
        ) {
            let junk = parts.concat();
            let done = Session::default().received(&view(), &junk);
            frames(&done.replies);
        }

        #[test]
        fn every_pipelined_request_is_answered_in_order(
            commands in prop::collection::vec(command(), 1..12),
            cuts in prop::collection::vec(any::<usize>(), 0..6),
            v in arbitrary_view(),
        ) {
            let mut input = Vec::new();
            let mut expected = Vec::new();
            for (args, inline) in &commands {
                if *inline {
                    let line: Vec<&[u8]> = args.iter().map(|a| a.as_slice()).collect();
                    input.extend(line.join(&b' '));
                    input.extend_from_slice(b"\r\n");
                } else {
                    let refs: Vec<&[u8]> = args.iter().map(|a| a.as_slice()).collect();
                    input.extend(encode_command(&refs));
                }
                expected.extend(answer(&v, args));
            }
            let mut s = Session::default();
            let mut replies = Vec::new();
            for chunk in chunks(&input, &cuts) {
                let done = s.received(&v, &chunk);
                prop_assert!(!done.close);
                replies.extend(done.replies);
            }
            prop_assert!(s.pending.is_empty());
            prop_assert_eq!(frames(&replies).len(), commands.len());
            prop_assert_eq!(replies, expected);
        }

        /// With a password, a connection is answered exactly as without
        /// one from the first right `AUTH` on, and `NOAUTH` before it.
        #[test]
        fn the_password_gate(
            steps in prop::collection::vec(
                prop_oneof![
                    command().prop_map(|(args, _)| args),
                    Just(cmd(&["AUTH", PW])),
                    Just(cmd(&["AUTH", "default", PW])),
                    Just(cmd(&["HELLO", "2", "AUTH", "default", PW])),
                    Just(cmd(&["AUTH", "default", "wrong"])),
                    Just(cmd(&["AUTH", "wrong"])),
                    "[ -~]{0,12}".prop_map(|w| vec![b"AUTH".to_vec(), w.into_bytes()]),
                ],
                1..16,
            ),
            v in arbitrary_view(),
        ) {
            let mut s = locked();
            let mut admitted = false;
            for args in &steps {
                let name = lower(&args[0]);
                let reply = s.answer(&v, args);
                let right = match (name.as_str(), &args[1..]) {
                    ("auth", [pw]) | ("auth", [_, pw]) => pw.as_slice() == PW.as_bytes() && (args.len() == 2 || args[1] == b"default"),
                    ("hello", [_, _, user, pw]) => user == b"default" && pw.as_slice() == PW.as_bytes(),
                    _ => false,
                };
                admitted |= right;
                prop_assert_eq!(s.authenticated, admitted);
                match name.as_str() {
                    "auth" if right => prop_assert_eq!(one(&reply), Frame::Simple("OK".into())),
                    "auth" => prop_assert!(err(one(&reply)).starts_with("WRONGPASS") || err(one(&reply)).starts_with("ERR wrong number")),
                    "hello" => {}
                    _ if admitted => prop_assert_eq!(&reply, &answer(&v, args)),
                    _ => prop_assert_eq!(one(&reply), Frame::Error(NOAUTH.into())),
                }
            }
        }

        #[test]
        fn every_answer_is_one_well_formed_reply(
            v in arbitrary_view(),
            (args, _) in command(),
            other_name in "[a-z]{0,6}",
            ask_for_view_name in any::<bool>(),
        ) {
            let mut args = args;
            if args.len() == 3 && args[0] == b"SENTINEL" {
                args[2] = if ask_for_view_name { v.master_name.clone() } else { other_name }.into_bytes();
            }
            let f = one(&answer(&v, &args));
            let sub = args.get(1).map(|s| lower(s)).unwrap_or_default();
            if args[0] == b"SENTINEL" && matches!(&f, Frame::Array(Some(_))) {
                let instances = match sub.as_str() {
                    "master" => vec![f],
                    "masters" | "replicas" | "sentinels" => array_of(f),
                    _ => vec![],
                };
                for i in instances {
                    assert_ints(&fields(i));
                }
            }
        }
    }

    // -----------------------------------------------------------------------
    // serve, over real sockets

    async fn start(v: View) -> (std::net::SocketAddr, watch::Sender<View>, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = listener.local_addr().unwrap();
        let (tx, rx) = watch::channel(v);
        (at, tx, tokio::spawn(serve(listener, rx)))
    }

    /// Reads until `n` replies have arrived, with a deadline.
    async fn read_replies(stream: &mut TcpStream, n: usize) -> Vec<Frame> {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let mut got = Vec::new();
            let mut at = 0;
            while let Some((f, used)) = read_frame(&buf[at..]) {
                got.push(f);
                at += used;
            }
            if got.len() >= n {
                return got;
            }
            let read = tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await.expect("replies in time");
            match read {
                Ok(0) => panic!("connection closed after {got:?}"),
                Ok(k) => buf.extend_from_slice(&chunk[..k]),
                Err(e) => panic!("read failed after {got:?}: {e}"),
            }
        }
    }

    async fn assert_closed(stream: &mut TcpStream) {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest)).await;
        assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "connection closed, got {read:?} {rest:?}");
    }

    fn addr_reply(f: &Frame) -> Vec<String> {
        array_of(f.clone()).iter().map(bulk_text).collect()
    }

    #[tokio::test]
    async fn serve_answers_pipelines_and_follows_the_view() {
        let (at, tx, task) = start(view()).await;
        let mut c = TcpStream::connect(at).await.unwrap();
        let mut input = b"PING\r\nSENTINEL get-master-addr-by-name keel\r\n".to_vec();
        input.extend(encode_command(&[b"SENTINEL", b"masters"]));
        c.write_all(&input).await.unwrap();
        let replies = read_replies(&mut c, 3).await;
        assert_eq!(replies[0], Frame::Simple("PONG".into()));
        assert_eq!(addr_reply(&replies[1]), ["10.0.0.1", "6379"]);
        tx.send_modify(|v| {
            v.master = Some(addr("10.0.0.2", 6379));
            v.epoch += 1;
        });
        c.write_all(b"SENTINEL get-master-addr-by-name keel\r\n").await.unwrap();
        assert_eq!(addr_reply(&read_replies(&mut c, 1).await[0]), ["10.0.0.2", "6379"]);
        c.write_all(b"QUIT\r\n").await.unwrap();
        assert_eq!(read_replies(&mut c, 1).await, [Frame::Simple("OK".into())]);
        assert_closed(&mut c).await;
        task.abort();
    }

    #[tokio::test]
    async fn serve_closes_after_garbage_and_oversized_requests() {
        let (at, _tx, task) = start(view()).await;
        let mut c = TcpStream::connect(at).await.unwrap();
        c.write_all(b"PING\r\n*1\r\n+x\r\nPING\r\n").await.unwrap();
        let replies = read_replies(&mut c, 2).await;
        assert_eq!(replies[0], Frame::Simple("PONG".into()));
        assert!(err(replies[1].clone()).starts_with("ERR Protocol error: "));
        assert_closed(&mut c).await;

        let (mut r, mut w) = TcpStream::connect(at).await.unwrap().into_split();
        let writer = tokio::spawn(async move {
            let block = vec![b'a'; 64 << 10];
            for _ in 0..(MAX_REQUEST_BYTES / block.len() + 4) {
                if w.write_all(&block).await.is_err() {
                    break;
                }
            }
            w
        });
        let mut got = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), r.read_to_end(&mut got)).await;
        assert!(matches!(read, Ok(Ok(_))), "closed cleanly after the reply: {read:?}");
        let replies = frames(&got);
        assert_eq!(replies.len(), 1);
        assert!(err(replies[0].clone()).contains("MAX_REQUEST_BYTES"));
        drop(writer.await.unwrap());
        task.abort();
    }

    #[tokio::test]
    async fn a_stalled_client_does_not_block_others() {
        let (at, _tx, task) = start(view()).await;
        let mut stalled = TcpStream::connect(at).await.unwrap();
        stalled.write_all(b"*2\r\n$8\r\nSENTINEL\r\n$100\r\npartial").await.unwrap();
        let mut silent = TcpStream::connect(at).await.unwrap();
        for _ in 0..3 {
            let mut c = TcpStream::connect(at).await.unwrap();
            c.write_all(b"PING\r\n").await.unwrap();
            assert_eq!(read_replies(&mut c, 1).await, [Frame::Simple("PONG".into())]);
        }
        silent.write_all(b"PING\r\n").await.unwrap();
        assert_eq!(read_replies(&mut silent, 1).await, [Frame::Simple("PONG".into())]);
        task.abort();
    }

    #[tokio::test]
    async fn dropping_serve_ends_its_connections() {
        let (at, _tx, task) = start(view()).await;
        let mut c = TcpStream::connect(at).await.unwrap();
        c.write_all(b"PING\r\n").await.unwrap();
        assert_eq!(read_replies(&mut c, 1).await, [Frame::Simple("PONG".into())]);
        task.abort();
        let _ = task.await;
        assert_closed(&mut c).await;
        assert!(TcpStream::connect(at).await.is_err(), "the listener is closed");
    }
}
