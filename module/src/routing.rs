//! Routing: what the command filter does with each command a client sends.
//!
//! Redis calls the filter before it looks a command up; the filter may put
//! one of the module's wrappers in front of it (`SET k v` becomes `KEEL.W SET
//! k v`), and the wrapper then runs the command for the client. The rules,
//! in the order they are tried (the first that applies wins):
//!
//! 1. a command `control::guard` names (REPLICAOF, `ACL SETUSER <control
//!    user>`, `CONFIG SET replica-read-only no`…): `KEEL.GUARD`, for every
//!    client, inside MULTI and scripts too;
//!    1b. outside the module's own calls and MULTI, introspection that
//!    would show the module's commands (`INFO commandstats`, `ACL
//!    GETUSER`…, `view.rs`): `KEEL.VIEW`, on every node;
//! 2. outside the module's own calls, the gate (`gate.rs`): a replica serves
//!    everything natively; a primary without a valid lease refuses data
//!    commands (`KEEL.NOLEASE`); `SHUTDOWN` of a primary that serves, outside
//!    MULTI, goes to `KEEL.GUARD` too (it hands over first);
//! 3. MULTI/EXEC/DISCARD/WATCH/UNWATCH, and every command of a client inside
//!    MULTI: `KEEL.T` (`KEEL.TW` for a write, `KEEL.TB` for what Redis serves
//!    during a busy script), kept by `transactions.rs`;
//! 4. inside the module's own calls (a script's commands, clients served
//!    during a busy script): nothing more;
//! 5. a blocking pop: `KEEL.B` (`KEEL.BR` for XREAD);
//! 6. a read-only script: `KEEL.T` (its refused writes stay themselves);
//! 7. a write (flagged `write`/`may_replicate`, or a script): `KEEL.W`;
//! 8. a read of a key with a pending write, or a keyless read of the
//!    dataset while any write is pending: `KEEL.R`;
//! 9. anything else: untouched.
//!
//! Besides the route, a command may ask for bookkeeping (`Routing`): `ACL
//! SETUSER` gets the wrappers' grant rules appended, `ACL LOAD` has them
//! granted again before the next sleep, `RESET` ends the client's
//! transaction. Pure: the filter (`filter.rs`) gathers the inputs, calls
//! `route` and applies the result.

use crate::acl;
use crate::commands;
use crate::commands::CommandTable;
use crate::control;
use crate::gate::Decision;
use crate::gate::Gate;
use crate::hazards::Hazards;
use crate::transactions::Sender;
use crate::transactions::Transactions;
use crate::view;
use crate::waiters;

/// Command names longer than this are no command of Redis's: left alone.
pub const MAX_NAME_BYTES: usize = 64;

/// Commands that act on the connection itself (the module's own too): they
/// always run natively, even for a client inside MULTI when the server
/// cannot tell the filter which client sent a command (Redis 7.0; see
/// `maybe_in_multi`).
const CONNECTION_COMMANDS: &[&str] = &[
    "auth", "hello", "client", "reset", "quit", "subscribe", "psubscribe", "ssubscribe", "unsubscribe",
    "punsubscribe", "sunsubscribe", "monitor", "sync", "psync", "replconf", "readonly", "readwrite", "asking",
];
/// Commands that may block the calling client whatever their arguments,
/// other than the blocking pops: never run by `RM_Call` for a client.
const NOT_RUN_FOR_CLIENTS: &[&str] = &["wait", "waitaof"];
/// Scripts that may not write (run through the module, see rule 6).
const READ_ONLY_SCRIPTS: &[&str] = &["eval_ro", "evalsha_ro", "fcall_ro"];
/// Routed commands served during a busy script (KEEL.TB, `deny-script`).
pub const BUSY_SAFE: &[&str] = &["multi", "exec", "discard", "watch", "unwatch", "shutdown"];
/// Commands the module always handles itself (transactions).
pub const TRANSACTION_COMMANDS: &[&str] = &["multi", "exec", "discard", "watch", "unwatch"];
/// Script and function calls: their effects replicate, so their replies are
/// held (added to the command table's writes).
pub const SCRIPT_CALLS: &[&str] = &["eval", "evalsha", "fcall"];
/// Reads without key arguments that still show the dataset: held while any
/// write is pending.
const KEYLESS_READS: &[&str] = &["keys", "scan", "dbsize", "randomkey"];
/// Role changes, users, configuration, modules: the names `control::guard`
/// may refuse.
const GUARDED_NAMES: &[&str] = &["replicaof", "slaveof", "failover", "cluster", "acl", "config", "module"];

fn listed(list: &[&str], name: &[u8]) -> bool {
    list.iter().any(|n| n.as_bytes() == name)
}

/// Whether a (lower-cased) command is a transaction command.
pub fn is_transaction_command(name: &[u8]) -> bool {
    listed(TRANSACTION_COMMANDS, name)
}

/// Whether a (lower-cased) command is served during a busy script.
pub fn is_busy_safe(name: &[u8]) -> bool {
    listed(BUSY_SAFE, name)
}

/// Whether the module refuses to run a (lower-cased) command for a client
/// with `RM_Call`: it acts on the connection, or may block it (see
/// `wrappers::refuse_guarded`).
pub fn never_run_for_clients(name: &[u8]) -> bool {
    listed(CONNECTION_COMMANDS, name) || commands::is_keel(name) || listed(NOT_RUN_FOR_CLIENTS, name)
}

fn is_connection_command(name: &[u8]) -> bool {
    listed(CONNECTION_COMMANDS, name) || commands::is_keel(name)
}

/// Which transaction wrapper a routed command gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxWrapper {
    /// `KEEL.T`.
    Plain,
    /// `KEEL.TW`: a write keeps its `write` flag, so read-only scripts and
    /// OOM refuse it as they would the command itself.
    Write,
    /// `KEEL.TB`: MULTI, EXEC, DISCARD, WATCH, UNWATCH, SHUTDOWN pass a busy
    /// script as in Redis (EXEC to answer EXECABORT then).
    BusySafe,
}

/// What the filter does with a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Redis runs it as sent.
    PassThrough,
    /// `KEEL.GUARD`: runs only for whom `control::guard` allows.
    Guard,
    /// `KEEL.VIEW`: introspection whose reply is edited (view.rs).
    View,
    /// `KEEL.NOLEASE`: a data command this node must not serve now.
    NoLease,
    /// `KEEL.T…`: a transaction command, or a command of a client inside
    /// MULTI. `exec`: it is an EXEC (for `Transactions::routed`).
    Transaction { wrapper: TxWrapper, exec: bool },
    /// `KEEL.B` (`KEEL.BR` for XREAD): a blocking pop.
    Blocking { xread: bool },
    /// `KEEL.T`: a read-only script.
    ReadOnlyScript,
    /// `KEEL.W`: a write; its reply is held until durable.
    Write,
    /// `KEEL.R`: a read of data not durable yet; its reply is held.
    HeldRead,
}

impl Route {
    /// The wrapper put in front of the command (`None`: untouched).
    pub fn prefix(self) -> Option<&'static str> {
        Some(match self {
            Route::PassThrough => return None,
            Route::Guard => "KEEL.GUARD",
            Route::View => "KEEL.VIEW",
            Route::NoLease => "KEEL.NOLEASE",
            Route::Transaction { wrapper: TxWrapper::Plain, .. } | Route::ReadOnlyScript => "KEEL.T",
            Route::Transaction { wrapper: TxWrapper::Write, .. } => "KEEL.TW",
            Route::Transaction { wrapper: TxWrapper::BusySafe, .. } => "KEEL.TB",
            Route::Blocking { xread: true } => "KEEL.BR",
            Route::Blocking { xread: false } => "KEEL.B",
            Route::Write => "KEEL.W",
            Route::HeldRead => "KEEL.R",
        })
    }
}

/// Bookkeeping a command asks for besides its route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AclEffect {
    #[default]
    None,
    /// `ACL SETUSER <user> …`: the wrappers' grant rules are appended, so
    /// the user keeps them whatever its rules say (acl.rs).
    AppendGrants,
    /// `ACL LOAD` replaced the users: grant the wrappers before the next
    /// sleep.
    UsersReloaded,
}

/// The filter's decision for one command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Routing {
    pub route: Route,
    pub acl: AclEffect,
    /// `RESET`: the client's MULTI and WATCHes end.
    pub ends_transaction: bool,
}

impl Routing {
    fn just(route: Route) -> Routing {
        Routing { route, acl: AclEffect::None, ends_transaction: false }
    }
}

/// Who sent the command.
#[derive(Debug, Clone, Copy)]
pub struct Client {
    /// Its id, where the server tells (Redis 7.2+, Valkey; not 7.0).
    pub id: Option<u64>,
    /// The command comes from inside one of the module's own `RM_Call`s (a
    /// script the module runs, or a client served during a busy script).
    pub in_module_call: bool,
}

impl Client {
    pub fn sender(self) -> Sender {
        self.id.map(Sender::Known).unwrap_or(Sender::Unknown)
    }
}

/// What the module knows that routing depends on.
pub struct World<'a> {
    pub table: &'a CommandTable,
    pub gate: &'a Gate,
    /// The monotonic clock, for the lease.
    pub now_ms: u64,
    pub txs: &'a Transactions,
    pub hazards: &'a Hazards,
    pub control_user: &'a [u8],
}

/// Routes a command: `args` as sent, name first; `keys` gives the
/// command's key arguments (`None`: unknown command or bad arity), asked
/// only when a read may have to wait.
pub fn route(args: &[&[u8]], client: Client, world: &World, keys: impl FnOnce() -> Option<Vec<Vec<u8>>>) -> Routing {
    let Some(&sent_name) = args.first() else { return Routing::just(Route::PassThrough) };
    if sent_name.len() > MAX_NAME_BYTES {
        return Routing::just(Route::PassThrough);
    }
    // Lower-cased on the stack: the filter runs for every command.
    let mut name_buf = [0u8; MAX_NAME_BYTES];
    let name = &mut name_buf[..sent_name.len()];
    name.copy_from_slice(sent_name);
    name.make_ascii_lowercase();
    let name: &[u8] = name;
    let sub = args.get(1).copied();
    // 1. Guarded commands.
    if listed(GUARDED_NAMES, name) && control::guard(args, world.control_user).is_some() {
        return Routing::just(Route::Guard);
    }
    let acl = if acl::is_setuser(name, sub, args.len()) {
        AclEffect::AppendGrants
    } else if acl::is_load(name, sub) {
        AclEffect::UsersReloaded
    } else {
        AclEffect::None
    };
    let with = |route: Route| Routing { route, acl, ends_transaction: false };
    let table = world.table;
    // 1b. Introspection that would show Keel's own commands, on every
    // node; inside MULTI it is queued as any command.
    if !client.in_module_call && view::view_of(name, args).is_some() && !maybe_in_multi(client, world, name, sub) {
        return with(Route::View);
    }
    // 2. The gate.
    if !client.in_module_call {
        match world.gate.decide(world.now_ms) {
            // A replica: Redis serves reads and refuses writes itself; the
            // master link's commands apply untouched.
            Decision::Native => return with(Route::PassThrough),
            Decision::Serve => {}
            Decision::Refuse(_) => {
                let data = table.is_write(name, sub)
                    || table.is_read(name, sub)
                    || (is_transaction_command(name) && name != b"discard" && name != b"unwatch");
                if data {
                    return with(Route::NoLease);
                }
            }
        }
    }
    // 2b. SHUTDOWN of a primary holding its lease hands over first
    //     (handover_commands.rs), unless sent inside MULTI.
    if name == b"shutdown"
        && !client.in_module_call
        && world.gate.decide(world.now_ms) == Decision::Serve
        && !maybe_in_multi(client, world, name, sub)
        && !args[1..].iter().any(|a| a.eq_ignore_ascii_case(b"abort"))
    {
        return with(Route::Guard);
    }
    // 3. Transactions.
    let tx_command = is_transaction_command(name);
    if tx_command || (!is_connection_command(name) && maybe_in_multi(client, world, name, sub)) {
        let wrapper = if !tx_command && table.is_write(name, sub) {
            TxWrapper::Write
        } else if is_busy_safe(name) {
            TxWrapper::BusySafe
        } else {
            TxWrapper::Plain
        };
        return with(Route::Transaction { wrapper, exec: name == b"exec" });
    }
    // 4. Inside the module's own call: only transactions need routing.
    if client.in_module_call {
        return with(Route::PassThrough);
    }
    let ends_transaction = name == b"reset";
    let with = |route: Route| Routing { route, acl, ends_transaction };
    // 5-7.
    if waiters::blocks(name, args[1..].iter().copied()) {
        return with(Route::Blocking { xread: name == b"xread" });
    }
    if listed(READ_ONLY_SCRIPTS, name) {
        // Run by the module (KEEL.T), so the script's own commands pass the
        // filter untouched: a write refused by a read-only script is then
        // refused as itself, as Redis counts it, not as KEEL.W.
        return with(Route::ReadOnlyScript);
    }
    if table.is_write(name, sub) {
        return with(Route::Write);
    }
    // 8. A read: held only if it touches data that is not durable yet; the
    // module's own commands are never rewritten.
    if commands::is_keel(name) {
        return with(Route::PassThrough);
    }
    if read_must_wait(world.hazards, name, keys) {
        return with(Route::HeldRead);
    }
    with(Route::PassThrough)
}

/// Whether the sender may be inside MULTI. Without the client's id (Redis
/// 7.0), every command is routed through the module while any client has a
/// transaction open: correct, slower, and only then; except the commands
/// Redis serves during a busy script (SCRIPT KILL…), which must reach Redis
/// itself to work (SHUTDOWN is routed: it is refused inside MULTI).
fn maybe_in_multi(client: Client, world: &World, name: &[u8], sub: Option<&[u8]>) -> bool {
    if !world.txs.any_open() {
        return false;
    }
    match client.id {
        Some(id) => world.txs.in_multi(id),
        None => name == b"shutdown" || !world.table.allows_busy(name, sub),
    }
}

/// Whether a read (name lower-cased) must wait for pending writes of its
/// keys; `keys` is asked only when some write is pending.
pub fn read_must_wait(hazards: &Hazards, name: &[u8], keys: impl FnOnce() -> Option<Vec<Vec<u8>>>) -> bool {
    if hazards.is_empty() {
        return false;
    }
    match keys() {
        Some(keys) if keys.is_empty() => listed(KEYLESS_READS, name),
        Some(keys) => {
            let refs: Vec<&[u8]> = keys.iter().map(|k| k.as_slice()).collect();
            hazards.must_wait(&refs)
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONTROL: &[u8] = b"keel-sidecar";

    struct Fixture {
        table: CommandTable,
        gate: Gate,
        txs: Transactions,
        hazards: Hazards,
    }

    impl Fixture {
        /// A primary with a valid lease, nothing pending, no transaction.
        fn new() -> Fixture {
            let mut table = CommandTable::default();
            for w in ["set", "del", "lpush", "blpop", "xreadgroup", "eval", "evalsha", "fcall", "config|set", "flushall"] {
                table.writes.insert(w.as_bytes().to_vec());
            }
            for r in ["get", "mget", "keys", "scan", "dbsize", "xread", "eval_ro", "config|get", "lrange"] {
                table.reads.insert(r.as_bytes().to_vec());
            }
            for b in ["script|kill", "function|kill", "shutdown", "auth", "hello", "client"] {
                table.allow_busy.insert(b.as_bytes().to_vec());
            }
            let mut gate = Gate::new(false);
            gate.lease(1_000).unwrap();
            Fixture { table, gate, txs: Transactions::default(), hazards: Hazards::default() }
        }

        fn route_as(&self, client: Client, cmd: &str, keys: Option<&[&str]>) -> Routing {
            let words: Vec<&[u8]> = cmd.split(' ').map(|w| w.as_bytes()).collect();
            let world = World {
                table: &self.table,
                gate: &self.gate,
                now_ms: 10,
                txs: &self.txs,
                hazards: &self.hazards,
                control_user: CONTROL,
            };
            route(&words, client, &world, || keys.map(|ks| ks.iter().map(|k| k.as_bytes().to_vec()).collect()))
        }

        fn route(&self, cmd: &str, keys: Option<&[&str]>) -> Route {
            self.route_as(CLIENT, cmd, keys).route
        }
    }

    const CLIENT: Client = Client { id: Some(7), in_module_call: false };
    const OLD_REDIS: Client = Client { id: None, in_module_call: false };
    const IN_CALL: Client = Client { id: Some(7), in_module_call: true };

    fn tx(wrapper: TxWrapper) -> Route {
        Route::Transaction { wrapper, exec: false }
    }

    #[test]
    fn writes_are_wrapped_and_plain_reads_pass() {
        let f = Fixture::new();
        assert_eq!(f.route("SET k v", Some(&["k"])), Route::Write);
        assert_eq!(f.route("set k v", Some(&["k"])), Route::Write);
        assert_eq!(f.route("CONFIG SET maxmemory 1", Some(&[])), Route::Write);
        assert_eq!(f.route("CONFIG GET maxmemory", Some(&[])), Route::PassThrough);
        assert_eq!(f.route("GET k", Some(&["k"])), Route::PassThrough);
        assert_eq!(f.route("PING", Some(&[])), Route::PassThrough);
        assert_eq!(Route::Write.prefix(), Some("KEEL.W"));
        assert_eq!(Route::PassThrough.prefix(), None);
    }

    #[test]
    fn reads_of_pending_keys_are_held() {
        let mut f = Fixture::new();
        f.hazards.write(vec![b"k".to_vec()]);
        assert_eq!(f.route("GET k", Some(&["k"])), Route::HeldRead);
        assert_eq!(f.route("MGET a k", Some(&["a", "k"])), Route::HeldRead);
        assert_eq!(f.route("GET other", Some(&["other"])), Route::PassThrough);
        // Unknown command or bad arity: Redis answers the error itself.
        assert_eq!(f.route("GET", None), Route::PassThrough);
        assert_eq!(Route::HeldRead.prefix(), Some("KEEL.R"));
    }

    #[test]
    fn keyless_reads_of_the_dataset_wait_for_any_pending_write() {
        let mut f = Fixture::new();
        assert_eq!(f.route("KEYS *", Some(&[])), Route::PassThrough, "nothing pending");
        f.hazards.write(vec![b"k".to_vec()]);
        for read in ["KEYS *", "SCAN 0", "DBSIZE", "RANDOMKEY"] {
            assert_eq!(f.route(read, Some(&[])), Route::HeldRead, "{read}");
        }
        assert_eq!(f.route("PING", Some(&[])), Route::PassThrough);
        assert_eq!(f.route("TIME", Some(&[])), Route::PassThrough);
    }

    #[test]
    fn a_keyless_write_makes_every_read_wait() {
        let mut f = Fixture::new();
        f.hazards.write(Vec::new());
        assert_eq!(f.route("GET anything", Some(&["anything"])), Route::HeldRead);
    }

    #[test]
    fn the_keys_are_asked_only_when_a_write_is_pending() {
        let f = Fixture::new();
        let words: [&[u8]; 2] = [b"GET", b"k"];
        let world = World { table: &f.table, gate: &f.gate, now_ms: 10, txs: &f.txs, hazards: &f.hazards, control_user: CONTROL };
        let r = route(&words, CLIENT, &world, || panic!("keys asked with nothing pending"));
        assert_eq!(r.route, Route::PassThrough);
    }

    #[test]
    fn transaction_commands_always_go_to_the_module() {
        let f = Fixture::new();
        assert_eq!(f.route("MULTI", None), tx(TxWrapper::BusySafe));
        assert_eq!(f.route("WATCH k", None), tx(TxWrapper::BusySafe));
        assert_eq!(f.route("UNWATCH", None), tx(TxWrapper::BusySafe));
        assert_eq!(f.route("DISCARD", None), tx(TxWrapper::BusySafe));
        assert_eq!(f.route("exec", None), Route::Transaction { wrapper: TxWrapper::BusySafe, exec: true });
        // Inside the module's own calls too (a script's MULTI is refused there).
        assert_eq!(f.route_as(IN_CALL, "MULTI", None).route, tx(TxWrapper::BusySafe));
        assert_eq!(tx(TxWrapper::BusySafe).prefix(), Some("KEEL.TB"));
        assert_eq!(tx(TxWrapper::Write).prefix(), Some("KEEL.TW"));
        assert_eq!(tx(TxWrapper::Plain).prefix(), Some("KEEL.T"));
    }

    #[test]
    fn every_command_of_a_client_inside_multi_is_queued_by_the_module() {
        let mut f = Fixture::new();
        f.txs.multi(7);
        assert_eq!(f.route("SET k v", Some(&["k"])), tx(TxWrapper::Write));
        assert_eq!(f.route("GET k", Some(&["k"])), tx(TxWrapper::Plain));
        assert_eq!(f.route("SHUTDOWN", None), tx(TxWrapper::BusySafe), "refused inside MULTI, served when busy");
        assert_eq!(f.route("BLPOP l 0", Some(&["l"])), tx(TxWrapper::Write));
        assert_eq!(f.route("EVAL_RO x 0", Some(&[])), tx(TxWrapper::Plain));
        // Commands on the connection itself stay native.
        for c in ["AUTH a b", "HELLO 3", "CLIENT ID", "RESET", "SUBSCRIBE c", "KEEL.ACK 1"] {
            assert_eq!(f.route(c, None), Route::PassThrough, "{c}");
        }
        // Another client is not inside MULTI.
        let other = Client { id: Some(8), in_module_call: false };
        assert_eq!(f.route_as(other, "SET k v", Some(&["k"])).route, Route::Write);
    }

    #[test]
    fn without_the_senders_id_every_command_is_routed_while_a_transaction_is_open() {
        let mut f = Fixture::new();
        assert_eq!(f.route_as(OLD_REDIS, "SET k v", Some(&["k"])).route, Route::Write);
        f.txs.multi(3);
        assert_eq!(f.route_as(OLD_REDIS, "SET k v", Some(&["k"])).route, tx(TxWrapper::Write));
        assert_eq!(f.route_as(OLD_REDIS, "GET k", Some(&["k"])).route, tx(TxWrapper::Plain));
        // What Redis serves during a busy script must reach Redis itself…
        assert_eq!(f.route_as(OLD_REDIS, "SCRIPT KILL", None).route, Route::PassThrough);
        // …but SHUTDOWN is refused inside MULTI.
        assert_eq!(f.route_as(OLD_REDIS, "SHUTDOWN", None).route, tx(TxWrapper::BusySafe));
        assert_eq!(f.route_as(OLD_REDIS, "AUTH u p", None).route, Route::PassThrough);
        assert_eq!(Client { id: None, in_module_call: false }.sender(), Sender::Unknown);
        assert_eq!(CLIENT.sender(), Sender::Known(7));
    }

    #[test]
    fn scripts_are_writes_and_read_only_scripts_run_through_the_module() {
        let f = Fixture::new();
        assert_eq!(f.route("EVAL x 0", Some(&[])), Route::Write);
        assert_eq!(f.route("EVALSHA abc 0", Some(&[])), Route::Write);
        assert_eq!(f.route("FCALL f 0", Some(&[])), Route::Write);
        for s in ["EVAL_RO x 0", "EVALSHA_RO abc 0", "FCALL_RO f 0"] {
            assert_eq!(f.route(s, Some(&[])), Route::ReadOnlyScript, "{s}");
        }
        assert_eq!(Route::ReadOnlyScript.prefix(), Some("KEEL.T"));
    }

    #[test]
    fn blocking_pops_are_kept_by_the_module() {
        let f = Fixture::new();
        assert_eq!(f.route("BLPOP l 0", Some(&["l"])), Route::Blocking { xread: false });
        assert_eq!(f.route("XREAD BLOCK 0 STREAMS s $", Some(&["s"])), Route::Blocking { xread: true });
        assert_eq!(f.route("XREAD STREAMS s 0", Some(&["s"])), Route::PassThrough, "no BLOCK: a plain read");
        assert_eq!(Route::Blocking { xread: true }.prefix(), Some("KEEL.BR"));
        assert_eq!(Route::Blocking { xread: false }.prefix(), Some("KEEL.B"));
    }

    #[test]
    fn inside_the_modules_own_calls_only_transactions_are_routed() {
        let mut f = Fixture::new();
        f.hazards.write(vec![b"k".to_vec()]);
        assert_eq!(f.route_as(IN_CALL, "SET k v", Some(&["k"])).route, Route::PassThrough);
        assert_eq!(f.route_as(IN_CALL, "GET k", Some(&["k"])).route, Route::PassThrough);
        assert_eq!(f.route_as(IN_CALL, "BLPOP l 0", Some(&["l"])).route, Route::PassThrough);
        // The gate is not asked there: the caller was let through already.
        f.gate.fence();
        assert_eq!(f.route_as(IN_CALL, "SET k v", Some(&["k"])).route, Route::PassThrough);
    }

    #[test]
    fn wait_and_waitaof_are_left_to_redis_and_never_run_for_a_client() {
        let f = Fixture::new();
        assert_eq!(f.route("WAIT 1 0", Some(&[])), Route::PassThrough);
        assert_eq!(f.route("WAITAOF 1 0 0", Some(&[])), Route::PassThrough);
        for n in ["wait", "waitaof", "subscribe", "keel.w", "keel.guard", "monitor"] {
            assert!(never_run_for_clients(n.as_bytes()), "{n}");
        }
        assert!(!never_run_for_clients(b"set"));
    }

    #[test]
    fn the_modules_own_commands_are_never_rewritten() {
        let mut f = Fixture::new();
        f.hazards.write(Vec::new());
        for c in ["KEEL.ACK 5", "KEEL.W SET k v", "KEEL.R GET k", "KEEL.LEASE 9", "KEEL.COUNTEDERROR x"] {
            assert_eq!(f.route(c, Some(&[])), Route::PassThrough, "{c}");
        }
    }

    #[test]
    fn a_primary_without_a_valid_lease_refuses_data_commands() {
        let mut f = Fixture::new();
        f.gate = Gate::new(false);
        for c in ["SET k v", "GET k", "MULTI", "EXEC", "WATCH k", "CONFIG SET maxmemory 1"] {
            assert_eq!(f.route(c, Some(&["k"])), Route::NoLease, "{c}");
        }
        // Not data: they run (DISCARD and UNWATCH only end a client's state).
        for c in ["PING", "DISCARD", "UNWATCH", "CLIENT ID", "KEEL.LEASE 5", "INFO keel"] {
            assert_ne!(f.route(c, None), Route::NoLease, "{c}");
        }
        assert_eq!(f.route("DISCARD", None), tx(TxWrapper::BusySafe));
        let mut f = Fixture::new();
        f.gate.fence();
        assert_eq!(f.route("SET k v", Some(&["k"])), Route::NoLease);
        assert_eq!(Route::NoLease.prefix(), Some("KEEL.NOLEASE"));
    }

    #[test]
    fn a_lease_that_lapsed_refuses_too() {
        let mut f = Fixture::new();
        f.gate = Gate::new(false);
        f.gate.lease(5).unwrap();
        assert_eq!(f.route("GET k", Some(&["k"])), Route::NoLease, "now_ms 10 is past the lease");
    }

    #[test]
    fn a_replica_serves_everything_natively() {
        let mut f = Fixture::new();
        f.gate = Gate::new(true);
        f.txs.multi(7);
        f.hazards.write(Vec::new());
        for c in ["SET k v", "GET k", "MULTI", "EXEC", "BLPOP l 0", "EVAL_RO x 0"] {
            assert_eq!(f.route(c, Some(&["k"])), Route::PassThrough, "{c}");
        }
        // The guard still applies.
        assert_eq!(f.route("REPLICAOF NO ONE", None), Route::Guard);
    }

    #[test]
    fn guarded_commands_go_to_keel_guard_for_everyone() {
        let f = Fixture::new();
        for c in ["REPLICAOF h 1", "slaveof no one", "FAILOVER", "CLUSTER FAILOVER", "ACL SETUSER keel-sidecar on", "ACL DELUSER x keel-sidecar", "CONFIG SET replica-read-only no", "CONFIG SET masterauth x", "MODULE UNLOAD keel"] {
            assert_eq!(f.route(c, None), Route::Guard, "{c}");
            assert_eq!(f.route_as(IN_CALL, c, None).route, Route::Guard, "{c} inside a call");
        }
        assert_eq!(f.route("CONFIG SET replica-read-only yes", None), Route::Write);
        assert_eq!(f.route("CLUSTER INFO", None), Route::PassThrough);
        assert_eq!(Route::Guard.prefix(), Some("KEEL.GUARD"));
    }

    #[test]
    fn acl_setuser_keeps_the_wrappers_and_acl_load_grants_them_again() {
        let f = Fixture::new();
        let r = f.route_as(CLIENT, "ACL SETUSER alice on", None);
        assert_eq!(r.acl, AclEffect::AppendGrants);
        assert_eq!(f.route_as(CLIENT, "acl setuser", None).acl, AclEffect::None, "no user name");
        assert_eq!(f.route_as(CLIENT, "ACL LOAD", None).acl, AclEffect::UsersReloaded);
        assert_eq!(f.route_as(IN_CALL, "ACL LOAD", None).acl, AclEffect::UsersReloaded);
        assert_eq!(f.route_as(CLIENT, "ACL SETUSER keel-sidecar off", None), Routing::just(Route::Guard), "guarded: no grants");
        assert_eq!(f.route_as(CLIENT, "ACL LIST", None).acl, AclEffect::None);
    }

    #[test]
    fn reset_ends_the_clients_transaction() {
        let f = Fixture::new();
        let r = f.route_as(CLIENT, "RESET", None);
        assert_eq!(r, Routing { route: Route::PassThrough, acl: AclEffect::None, ends_transaction: true });
        assert!(!f.route_as(IN_CALL, "RESET", None).ends_transaction);
        assert!(!f.route_as(CLIENT, "SET k v", Some(&["k"])).ends_transaction);
    }

    #[test]
    fn every_prefix_is_a_client_wrapper_of_keel_commands() {
        let routes = [
            Route::Guard,
            Route::NoLease,
            tx(TxWrapper::Plain),
            tx(TxWrapper::Write),
            tx(TxWrapper::BusySafe),
            Route::Blocking { xread: false },
            Route::Blocking { xread: true },
            Route::ReadOnlyScript,
            Route::Write,
            Route::HeldRead,
        ];
        for r in routes {
            let p = r.prefix().unwrap().to_ascii_lowercase();
            assert!(commands::client_wrappers().any(|w| w == p), "{p} is not a client wrapper");
        }
    }

    #[test]
    fn odd_names_are_left_alone() {
        let f = Fixture::new();
        assert_eq!(f.route_as(CLIENT, "", None).route, Route::PassThrough);
        let long = "s".repeat(MAX_NAME_BYTES + 1);
        assert_eq!(f.route(&long, None), Route::PassThrough);
        let empty: [&[u8]; 0] = [];
        let world = World { table: &f.table, gate: &f.gate, now_ms: 10, txs: &f.txs, hazards: &f.hazards, control_user: CONTROL };
        assert_eq!(route(&empty, CLIENT, &world, || None).route, Route::PassThrough);
    }
}
