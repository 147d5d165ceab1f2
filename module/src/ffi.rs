//! The FFI layer: command filter, `KEEL.W`, `KEEL.ACK`, `KEEL.FENCED`, the
//! beforeSleep hook and `INFO keel`. Every decision is `Holds`'s; who may
//! run the control and role commands is `control.rs`'s.

use std::ffi::CString;
use std::os::raw::c_int;
use std::os::raw::c_void;
use std::sync::Mutex;
use std::sync::OnceLock;

use redis_module::Context;
use redis_module::InfoContext;
use redis_module::RedisResult;
use redis_module::RedisString;
use redis_module::Status;
use redis_module::raw;
use redis_module::redis_module;
use redis_module_macros::info_command_handler;

use crate::acl;
use crate::commands::CommandTable;
use crate::commands::KEEL_COMMANDS;
use crate::commands::arity_allows;
use crate::routing;
use crate::routing::AclEffect;
use crate::routing::Route;
use crate::config::Config;
use crate::config::parse_args;
use crate::control;
use crate::gate;
use crate::gate::Decision;
use crate::gate::Gate;
use crate::hazards::Hazards;
use crate::clients::HeldClients;
use crate::clients::TimedOut;
use crate::secret;
use crate::secret::Rotation;
use crate::transactions::Exec;
use crate::transactions::Transactions;
use crate::blocking;
use crate::blocking::Waiter;
use crate::reply;

/// A blocked client, by its Redis handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Blocked(pub(crate) *mut raw::RedisModuleBlockedClient);
// Only touched on Redis's main thread, under the module lock.
unsafe impl Send for Blocked {}

pub(crate) struct State {
    pub(crate) cfg: Config,
    /// Every client the module blocked: held replies and waiting pops,
    /// one record each (clients.rs).
    pub(crate) clients: HeldClients<Blocked, Answer, Waiter>,
    pub(crate) hazards: Hazards,
    /// MULTI/EXEC and WATCH, kept by the module (see transactions.rs).
    pub(crate) txs: Transactions,
    /// What `COMMAND` says about every command (commands.rs).
    pub(crate) table: CommandTable,
    /// Role, lease and fence: whether data commands are served at all.
    pub(crate) gate: Gate,
    /// The journal stream and this node's leader uuid (from the sidecar).
    pub(crate) leader_uuid: String,
    pub(crate) stream: String,
    /// A replica: how far the journal reaches, as its sidecar last said.
    pub(crate) journal_offset: u64,
    /// The stream's published snapshot (seq, replication offset, creation
    /// time in Unix ms), as the sidecar last said; seq 0: none.
    pub(crate) snapshot: (u64, u64, u64),
    /// The record this node's feed stalled at and why, as the sidecar last
    /// said (seq 0: the feed is fine).
    pub(crate) stalled: (u64, String),
    /// A retry of waiting pops is scheduled (blocking.rs).
    pub(crate) retry_scheduled: bool,
    pub(crate) released_total: u64,
    pub(crate) timed_out_total: u64,
    /// Users may lack the wrappers (the module just loaded, or `ACL LOAD`
    /// ran): granted before the event loop sleeps (see acl.rs).
    pub(crate) acl_grant_pending: bool,
    /// Whether `replica-read-only` was checked (first beforeSleep).
    pub(crate) read_only_checked: bool,
    /// The highest `master_repl_offset` seen since the last role change:
    /// a `KEEL.ACK` up to it needs no look at INFO.
    pub(crate) produced_offset: u64,
    /// The control user's passwords over time (secret.rs).
    pub(crate) secret: Rotation,
    /// When the current control secret was read (Unix ms), for `INFO keel`.
    pub(crate) secret_loaded_unix_ms: u64,
    /// How many times the secret file was read again (`INFO keel`).
    pub(crate) secret_polls: u64,
}

static STATE: OnceLock<Mutex<State>> = OnceLock::new();

pub(crate) fn state() -> std::sync::MutexGuard<'static, State> {
    STATE.get().expect("keel module initialised").lock().unwrap()
}

/// What an unblocked client is answered with.
pub(crate) enum Answer {
    /// The reply's RESP bytes.
    Reply(Vec<u8>),
    Error(String),
    /// An error reply INFO errorstats already counted (see `counted_error`):
    /// sent without counting it again.
    CountedError(Vec<u8>),
}

/// `s` as a C string for Redis. A NUL in it (client bytes quoted in an
/// error, such as an unknown command's name sent inside MULTI) is written
/// `\0`: it must neither cut the text nor fail the conversion, which
/// would abort the server.
fn cstr(s: &str) -> CString {
    CString::new(s.replace('\0', "\\0")).expect("every NUL was replaced")
}

pub(crate) unsafe fn string_bytes<'a>(s: *const raw::RedisModuleString) -> &'a [u8] {
    let mut len = 0usize;
    let p = raw::RedisModule_StringPtrLen.unwrap()(s, &mut len);
    std::slice::from_raw_parts(p as *const u8, len)
}

const BUSY_MESSAGE: &str = "BUSY Redis is busy running a script. You can only call SCRIPT KILL, FUNCTION KILL or SHUTDOWN NOSAVE.";
fn load_command_table(ctx: *mut raw::RedisModuleCtx) -> CommandTable {
    let mut out = CommandTable {
        writes: routing::SCRIPT_CALLS.iter().map(|s| s.as_bytes().to_vec()).collect(),
        ..CommandTable::default()
    };
    unsafe {
        let reply = raw::RedisModule_Call.unwrap()(ctx, cstr("COMMAND").as_ptr(), cstr("").as_ptr());
        if reply.is_null() {
            return out;
        }
        let n = raw::RedisModule_CallReplyLength.unwrap()(reply);
        for i in 0..n {
            let cmd = raw::RedisModule_CallReplyArrayElement.unwrap()(reply, i);
            collect_command(cmd, None, &mut out);
        }
        raw::RedisModule_FreeCallReply.unwrap()(reply);
    }
    out
}

/// The text of a string or error call reply (`None` for other types).
pub(crate) unsafe fn reply_text(r: *mut raw::RedisModuleCallReply) -> Option<Vec<u8>> {
    let mut len = 0usize;
    let p = raw::RedisModule_CallReplyStringPtr.unwrap()(r, &mut len);
    (!p.is_null()).then(|| std::slice::from_raw_parts(p as *const u8, len).to_vec())
}

/// `reply_text` lower-cased, empty for other types.
unsafe fn reply_str(r: *mut raw::RedisModuleCallReply) -> Vec<u8> {
    reply_text(r).unwrap_or_default().to_ascii_lowercase()
}

unsafe fn collect_command(cmd: *mut raw::RedisModuleCallReply, parent: Option<&[u8]>, out: &mut CommandTable) {
    if cmd.is_null() || raw::RedisModule_CallReplyLength.unwrap()(cmd) < 3 {
        return;
    }
    let name = reply_str(raw::RedisModule_CallReplyArrayElement.unwrap()(cmd, 0));
    let arity = raw::RedisModule_CallReplyInteger.unwrap()(raw::RedisModule_CallReplyArrayElement.unwrap()(cmd, 1));
    out.arity.insert(name.clone(), arity);
    let flags = raw::RedisModule_CallReplyArrayElement.unwrap()(cmd, 2);
    let mut is_write = false;
    for j in 0..raw::RedisModule_CallReplyLength.unwrap()(flags) {
        let f = reply_str(raw::RedisModule_CallReplyArrayElement.unwrap()(flags, j));
        if f == b"write" || f == b"may_replicate" {
            is_write = true;
        }
        if f == b"no_multi" {
            out.no_multi.insert(name.clone());
        }
        if f == b"allow_busy" {
            out.allow_busy.insert(name.clone());
        }
        if f == b"readonly" {
            out.reads.insert(name.clone());
        }
    }
    // Subcommand names come as "container|sub" already.
    let _ = parent;
    if is_write {
        out.writes.insert(name.clone());
    }
    // Element 9 (Redis 7): subcommands.
    if raw::RedisModule_CallReplyLength.unwrap()(cmd) > 9 {
        let subs = raw::RedisModule_CallReplyArrayElement.unwrap()(cmd, 9);
        if raw::RedisModule_CallReplyLength.unwrap()(subs) > 0 {
            out.containers.insert(name.clone());
        }
        for k in 0..raw::RedisModule_CallReplyLength.unwrap()(subs) {
            collect_command(raw::RedisModule_CallReplyArrayElement.unwrap()(subs, k), Some(&name), out);
        }
    }
}

thread_local! {
    /// The next filtered command is the module's own `call` (main thread).
    static SKIP_NEXT_FILTER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// How many of the module's own calls are running (a script they run,
    /// or clients served while that script is busy, are filtered inside).
    static CALL_DEPTH: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Whether the server is Valkey (set at load): see `wrong_type_get`.
static VALKEY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The commands Valkey (9.x) mishandles inside `RM_Call` on a key of
/// another type: they defer their reply, and on that error path return
/// before committing it, so the call's reply is cut short and the calling
/// client itself is sent `WRONGTYPE` besides the module's answer (two
/// replies to one command: the client's replies go out of step).
/// Each with its number of arguments (name excluded).
const VALKEY_DEFERRED_GETS: &[(&[u8], usize)] = &[(b"getdel", 1), (b"getset", 2)];

/// For `VALKEY_DEFERRED_GETS` on Valkey, when the key exists and is not a
/// string (and the user may run the command: else the server refuses it
/// before it runs, as usual): `GET` of the key is called instead, which
/// answers the same `WRONGTYPE` error and changes nothing. None: call the
/// command itself.
unsafe fn wrong_type_get(
    ctx: *mut raw::RedisModuleCtx,
    cmd: &std::ffi::CStr,
    fmt: &std::ffi::CStr,
    args: &[*mut raw::RedisModuleString],
) -> Option<*mut raw::RedisModuleCallReply> {
    if !VALKEY.load(std::sync::atomic::Ordering::Relaxed) {
        return None;
    }
    let name = cmd.to_bytes();
    if !VALKEY_DEFERRED_GETS.iter().any(|&(n, arity)| name.eq_ignore_ascii_case(n) && args.len() == arity) {
        return None;
    }
    let mode = (raw::REDISMODULE_READ
        | raw::REDISMODULE_OPEN_KEY_NOTOUCH
        | raw::REDISMODULE_OPEN_KEY_NOEXPIRE
        | raw::REDISMODULE_OPEN_KEY_NOSTATS
        | raw::REDISMODULE_OPEN_KEY_NONOTIFY) as c_int;
    let key = raw::RedisModule_OpenKey.unwrap()(ctx, args[0], mode);
    if key.is_null() {
        return None;
    }
    let ty = raw::RedisModule_KeyType.unwrap()(key) as isize;
    raw::RedisModule_CloseKey.unwrap()(key);
    if ty == raw::REDISMODULE_KEYTYPE_EMPTY || ty == raw::REDISMODULE_KEYTYPE_STRING {
        return None;
    }
    let checked = fmt.to_bytes().contains(&b'C');
    if checked {
        let name_str = raw::RedisModule_CreateString.unwrap()(ctx, name.as_ptr() as *const _, name.len());
        let mut argv = vec![name_str];
        argv.extend_from_slice(args);
        let allowed = acl_allows(ctx, &argv);
        raw::RedisModule_FreeString.unwrap()(ctx, name_str);
        if !allowed {
            return None;
        }
    }
    let get_fmt = CString::new(fmt.to_bytes().iter().copied().filter(|&b| b != b'C').collect::<Vec<u8>>()).unwrap_or_default();
    Some(call_unchecked(ctx, c"GET", &get_fmt, &args[..1]))
}

/// `RM_Call` with an argument vector (`fmt` starts with `v`), unfiltered.
pub(crate) unsafe fn call(
    ctx: *mut raw::RedisModuleCtx,
    cmd: &std::ffi::CStr,
    fmt: &std::ffi::CStr,
    args: &[*mut raw::RedisModuleString],
) -> *mut raw::RedisModuleCallReply {
    if let Some(r) = wrong_type_get(ctx, cmd, fmt, args) {
        return r;
    }
    call_unchecked(ctx, cmd, fmt, args)
}

unsafe fn call_unchecked(
    ctx: *mut raw::RedisModuleCtx,
    cmd: &std::ffi::CStr,
    fmt: &std::ffi::CStr,
    args: &[*mut raw::RedisModuleString],
) -> *mut raw::RedisModuleCallReply {
    SKIP_NEXT_FILTER.with(|s| s.set(true));
    CALL_DEPTH.with(|d| d.set(d.get() + 1));
    let reply = raw::RedisModule_Call.unwrap()(ctx, cmd.as_ptr(), fmt.as_ptr(), args.as_ptr(), args.len());
    CALL_DEPTH.with(|d| d.set(d.get() - 1));
    // Cleared even when the call failed before reaching the filter.
    SKIP_NEXT_FILTER.with(|s| s.set(false));
    reply
}

/// Module strings of `argv` (freed with `free_strings`).
pub(crate) unsafe fn strings<A: AsRef<[u8]>>(ctx: *mut raw::RedisModuleCtx, argv: &[A]) -> Vec<*mut raw::RedisModuleString> {
    argv.iter()
        .map(|a| {
            let a = a.as_ref();
            raw::RedisModule_CreateString.unwrap()(ctx, a.as_ptr() as *const _, a.len())
        })
        .collect()
}

pub(crate) unsafe fn free_strings(ctx: *mut raw::RedisModuleCtx, strs: Vec<*mut raw::RedisModuleString>) {
    for s in strs {
        raw::RedisModule_FreeString.unwrap()(ctx, s);
    }
}

/// `RM_Call` of an admin command with byte-string arguments, unfiltered.
unsafe fn call_bytes(ctx: *mut raw::RedisModuleCtx, cmd: &std::ffi::CStr, args: &[&[u8]]) -> *mut raw::RedisModuleCallReply {
    let strs = strings(ctx, args);
    let reply = call(ctx, cmd, c"v", &strs);
    free_strings(ctx, strs);
    reply
}

/// Allows every ACL user the wrapper commands a client's commands become
/// (acl.rs); a user allowed them already is left untouched.
unsafe fn grant_wrappers(ctx: *mut raw::RedisModuleCtx) {
    let users = call_bytes(ctx, c"ACL", &[b"USERS"]);
    if users.is_null() {
        return;
    }
    let names: Vec<Vec<u8>> = (0..raw::RedisModule_CallReplyLength.unwrap()(users))
        .filter_map(|i| reply_text(raw::RedisModule_CallReplyArrayElement.unwrap()(users, i)))
        .collect();
    raw::RedisModule_FreeCallReply.unwrap()(users);
    for user in names {
        let mut missing: Vec<String> = Vec::new();
        for (w, rule) in acl::client_wrappers().zip(acl::grant_rules()) {
            let r = call_bytes(ctx, c"ACL", &[b"DRYRUN", &user, w.as_bytes()]);
            if r.is_null() {
                continue;
            }
            // DRYRUN answers +OK, or a bulk string saying what is refused.
            let ok = reply_text(r).as_deref() == Some(b"OK");
            raw::RedisModule_FreeCallReply.unwrap()(r);
            if !ok {
                missing.push(rule);
            }
        }
        if missing.is_empty() {
            continue;
        }
        let mut args: Vec<&[u8]> = vec![b"SETUSER", &user];
        args.extend(missing.iter().map(|m| m.as_bytes()));
        // Best effort, as before: the error is not acted on.
        let _ = acl(ctx, &args);
    }
}

/// Redis's own error text when `reply` is `RM_Call`'s report that the
/// client's user may not run the command `args` (acl.rs).
pub(crate) unsafe fn acl_refusal(
    ctx: *mut raw::RedisModuleCtx,
    reply: *mut raw::RedisModuleCallReply,
    args: &[*mut raw::RedisModuleString],
) -> Option<String> {
    if raw::RedisModule_CallReplyType.unwrap()(reply) != raw::REDISMODULE_REPLY_ERROR as c_int {
        return None;
    }
    let text = reply_text(reply)?;
    let caller = if raw::RedisModule_GetContextFlags.unwrap()(ctx) as u32 & raw::REDISMODULE_CTX_FLAGS_LUA != 0 {
        acl::Caller::Script
    } else {
        acl::Caller::Client
    };
    acl::native_refusal(&text, caller, || {
        let name = lower(string_bytes(args[0]));
        let sub = args.get(1).map(|a| string_bytes(*a));
        acl::full_name(&name, sub, state().table.containers.contains(&name))
    })
}

/// Whether the client's user may run `args`, checked as Redis checks a
/// command queued inside MULTI; the refusal's text otherwise.
pub(crate) unsafe fn acl_check_queued(ctx: *mut raw::RedisModuleCtx, args: &[*mut raw::RedisModuleString]) -> Result<(), String> {
    if acl_allows(ctx, args) {
        return Ok(());
    }
    // The server's own text for this refusal: the same check as the user,
    // done by RM_Call (refused before anything runs; it logs in ACL LOG).
    let cmd = CString::new(string_bytes(args[0])).unwrap_or_default();
    let reply = call(ctx, &cmd, c"v0EC", &args[1..]);
    let mut text = None;
    if !reply.is_null() {
        text = acl_refusal(ctx, reply, args).or_else(|| reply_text(reply).map(|t| String::from_utf8_lossy(&t).into_owned()));
        raw::RedisModule_FreeCallReply.unwrap()(reply);
    }
    Err(text.unwrap_or_else(|| "NOPERM this user has no permissions to run this command".into()))
}

/// Whether the client's user may run `args` (name first); true when the
/// context has no user.
unsafe fn acl_allows(ctx: *mut raw::RedisModuleCtx, args: &[*mut raw::RedisModuleString]) -> bool {
    let name = raw::RedisModule_GetCurrentUserName.unwrap()(ctx);
    if name.is_null() {
        return true;
    }
    let user = raw::RedisModule_GetModuleUserFromUserName.unwrap()(name);
    raw::RedisModule_FreeString.unwrap()(ctx, name);
    if user.is_null() {
        return true;
    }
    let mut argv = args.to_vec();
    let allowed =
        raw::RedisModule_ACLCheckCommandPermissions.unwrap()(user, argv.as_mut_ptr(), argv.len() as c_int) == raw::REDISMODULE_OK as c_int;
    raw::RedisModule_FreeModuleUser.unwrap()(user);
    allowed
}

/// Command filter: gathers what routing needs, asks `routing::route`, and
/// puts the chosen wrapper in front of the command.
extern "C" fn filter(fctx: *mut raw::RedisModuleCommandFilterCtx) {
    if SKIP_NEXT_FILTER.with(|s| s.replace(false)) {
        return;
    }
    unsafe {
        let argc = raw::RedisModule_CommandFilterArgsCount.unwrap()(fctx);
        let argv: Vec<*mut raw::RedisModuleString> =
            (0..argc).map(|i| raw::RedisModule_CommandFilterArgGet.unwrap()(fctx, i)).collect();
        let args: Vec<&[u8]> = argv.iter().map(|a| string_bytes(*a)).collect();
        let client = routing::Client { id: filter_client_id(fctx), in_module_call: CALL_DEPTH.with(|d| d.get()) > 0 };
        let mut st = state();
        let routing = {
            let st = &*st;
            let world = routing::World {
                table: &st.table,
                gate: &st.gate,
                now_ms: gate::monotonic_ms(),
                txs: &st.txs,
                hazards: &st.hazards,
                control_user: st.cfg.control_user.as_bytes(),
            };
            routing::route(&args, client, &world, || command_keys(&argv))
        };
        match routing.acl {
            AclEffect::None => {}
            AclEffect::AppendGrants => {
                // The user keeps the wrappers whatever the rules say (acl.rs).
                for (i, rule) in acl::grant_rules().enumerate() {
                    let r = raw::RedisModule_CreateString.unwrap()(std::ptr::null_mut(), rule.as_ptr() as *const _, rule.len());
                    raw::RedisModule_CommandFilterArgInsert.unwrap()(fctx, argc + i as c_int, r);
                }
            }
            AclEffect::UsersReloaded => st.acl_grant_pending = true,
        }
        if routing.ends_transaction {
            // RESET ends the client's MULTI and WATCHes.
            if let Some(id) = client.id {
                st.txs.disconnected(id);
            }
        }
        if let Route::Transaction { exec, .. } = routing.route {
            st.txs.routed(client.sender(), exec);
        }
        drop(st);
        if let Some(prefix) = routing.route.prefix() {
            let p = raw::RedisModule_CreateString.unwrap()(std::ptr::null_mut(), prefix.as_ptr() as *const _, prefix.len());
            raw::RedisModule_CommandFilterArgInsert.unwrap()(fctx, 0, p);
        }
    }
}

/// The id of the client that sent a filtered command, where the server
/// tells (Redis 7.2+, Valkey); Redis 7.0 does not.
unsafe fn filter_client_id(fctx: *mut raw::RedisModuleCommandFilterCtx) -> Option<u64> {
    raw::RedisModule_CommandFilterGetClientId.map(|f| f(fctx))
}

impl State {
    /// Whether a command (name lower-cased, first argument as sent) writes.
    pub(crate) fn is_write(&self, name: &[u8], sub: Option<&[u8]>) -> bool {
        self.table.is_write(name, sub)
    }
}

/// The key arguments of a command (`None`: unknown command or bad arity).
pub(crate) unsafe fn command_keys(argv: &[*mut raw::RedisModuleString]) -> Option<Vec<Vec<u8>>> {
    let mut num: c_int = 0;
    let mut argv = argv.to_vec();
    set_errno(0);
    let pos = raw::RedisModule_GetCommandKeys.unwrap()(std::ptr::null_mut(), argv.as_mut_ptr(), argv.len() as c_int, &mut num);
    if pos.is_null() {
        // errno 0: the command has no keys.
        return if std::io::Error::last_os_error().raw_os_error() == Some(0) { Some(Vec::new()) } else { None };
    }
    let keys = (0..num as usize)
        .filter_map(|i| {
            let p = *pos.add(i) as usize;
            argv.get(p).map(|a| string_bytes(*a).to_vec())
        })
        .collect();
    raw::RedisModule_Free.unwrap()(pos as *mut c_void);
    Some(keys)
}

/// Replies to a client unblocked with an `Answer`.
pub(crate) extern "C" fn on_unblock(ctx: *mut raw::RedisModuleCtx, _argv: *mut *mut raw::RedisModuleString, _argc: c_int) -> c_int {
    unsafe {
        let answer = raw::RedisModule_GetBlockedClientPrivateData.unwrap()(ctx) as *mut Answer;
        if answer.is_null() {
            return raw::RedisModule_ReplyWithError.unwrap()(ctx, c"KEEL_UNKNOWN internal error: no answer".as_ptr());
        }
        match &*answer {
            Answer::Reply(v) => reply::send(ctx, v),
            Answer::Error(e) => {
                let e = cstr(e);
                raw::RedisModule_ReplyWithError.unwrap()(ctx, e.as_ptr())
            }
            Answer::CountedError(text) => reply_counted_error(ctx, text),
        }
    }
}

pub(crate) extern "C" fn on_timeout(ctx: *mut raw::RedisModuleCtx, _argv: *mut *mut raw::RedisModuleString, _argc: c_int) -> c_int {
    unsafe {
        let bc = raw::RedisModule_GetBlockedClientHandle.unwrap()(ctx);
        // Redis frees a timed-out module-blocked client only once the module
        // unblocks it; its reply callback is then skipped.
        let timed_out = state().clients.timed_out(Blocked(bc));
        if let TimedOut::Waiting(waiter) = timed_out {
            // A blocking pop that found nothing in its time.
            raw::RedisModule_UnblockClient.unwrap()(bc, std::ptr::null_mut());
            return reply::send(ctx, &waiter.null_reply);
        }
        // Held (its answer dropped), or answered otherwise already.
        state().timed_out_total += 1;
        raw::RedisModule_UnblockClient.unwrap()(bc, std::ptr::null_mut());
        reply_error(ctx, &unconfirmed_message())
    }
}

pub(crate) extern "C" fn free_answer(_ctx: *mut raw::RedisModuleCtx, privdata: *mut c_void) {
    if privdata.is_null() {
        return;
    }
    unsafe {
        drop(Box::from_raw(privdata as *mut Answer));
    }
}

pub(crate) fn unblock(bc: Blocked, answer: Answer) {
    unsafe {
        raw::RedisModule_UnblockClient.unwrap()(bc.0, Box::into_raw(Box::new(answer)) as *mut c_void);
    }
}

/// `KEEL.W CMD args…`: runs CMD for the calling client and holds its reply.
extern "C" fn keel_w(ctx: *mut raw::RedisModuleCtx, argv: *mut *mut raw::RedisModuleString, argc: c_int) -> c_int {
    unsafe {
        if argc < 2 {
            return raw::RedisModule_WrongArity.unwrap()(ctx);
        }
        let args = std::slice::from_raw_parts(argv.add(1), (argc - 1) as usize);
        if let Some(refused) = refuse_guarded(ctx, args) {
            return refused;
        }
        run_and_hold(ctx, args, true)
    }
}

/// `KEEL.B CMD args…` / `KEEL.BR`: a blocking command (blocking.rs).
extern "C" fn keel_b(ctx: *mut raw::RedisModuleCtx, argv: *mut *mut raw::RedisModuleString, argc: c_int) -> c_int {
    unsafe {
        if argc < 2 {
            return raw::RedisModule_WrongArity.unwrap()(ctx);
        }
        let args = std::slice::from_raw_parts(argv.add(1), (argc - 1) as usize);
        if let Some(refused) = refuse_guarded(ctx, args) {
            return refused;
        }
        // Only what the filter hands it: another command would be run, and
        // run again at every write of its keys, its client waiting for a
        // reply that is not null, for ever when its last argument is no
        // timeout (`KEEL.B GETSET k v`).
        let name = lower(string_bytes(args[0]));
        if !blocking::blocks(&name, args[1..].iter().map(|a| string_bytes(*a))) {
            return reply_error(
                ctx,
                &format!("ERR KEEL.B runs only blocking commands (BLPOP, XREAD BLOCK…), not {}", String::from_utf8_lossy(&name).to_ascii_uppercase()),
            );
        }
        blocking::blocking_pop(ctx, args)
    }
}

/// `KEEL.R CMD args…`: a read of data not yet durable; runs now, its reply
/// is held until the end of this turn is durable.
extern "C" fn keel_r(ctx: *mut raw::RedisModuleCtx, argv: *mut *mut raw::RedisModuleString, argc: c_int) -> c_int {
    unsafe {
        if argc < 2 {
            return raw::RedisModule_WrongArity.unwrap()(ctx);
        }
        let args = std::slice::from_raw_parts(argv.add(1), (argc - 1) as usize);
        if let Some(refused) = refuse_guarded(ctx, args) {
            return refused;
        }
        run_and_hold(ctx, args, false)
    }
}

fn lower(b: &[u8]) -> Vec<u8> {
    b.to_ascii_lowercase()
}

pub(crate) fn reply_error(ctx: *mut raw::RedisModuleCtx, msg: &str) -> c_int {
    let m = cstr(msg);
    unsafe { raw::RedisModule_ReplyWithError.unwrap()(ctx, m.as_ptr()) }
}

fn reply_ok(ctx: *mut raw::RedisModuleCtx) -> c_int {
    unsafe { raw::RedisModule_ReplyWithSimpleString.unwrap()(ctx, c"OK".as_ptr()) }
}

/// `KEEL.T CMD args…` / `KEEL.TW CMD args…`: MULTI, EXEC, DISCARD, WATCH,
/// UNWATCH, and every command of a client inside MULTI (queued), or of any
/// client while a transaction is open and the server cannot say who sent a
/// command (then it runs as it would have without the module).
extern "C" fn keel_t(ctx: *mut raw::RedisModuleCtx, argv: *mut *mut raw::RedisModuleString, argc: c_int) -> c_int {
    unsafe {
        if argc < 2 {
            return raw::RedisModule_WrongArity.unwrap()(ctx);
        }
        let args = std::slice::from_raw_parts(argv.add(1), (argc - 1) as usize);
        if let Some(refused) = refuse_guarded(ctx, args) {
            return refused;
        }
        let name = lower(string_bytes(args[0]));
        if routing::is_transaction_command(&name) {
            // Answered here, not by Redis: its arity check too (a refusal
            // inside MULTI makes the EXEC abort, as in Redis).
            let arity = state().table.arity.get(&name).copied();
            if arity.is_some_and(|a| !arity_allows(a, args.len())) {
                let id = raw::RedisModule_GetClientId.unwrap()(ctx);
                {
                    let mut st = state();
                    if st.txs.in_multi(id) {
                        st.txs.queue_error(id);
                    }
                }
                return reply_error(ctx, &format!("ERR wrong number of arguments for '{}' command", String::from_utf8_lossy(&name)));
            }
        }
        let flags = raw::RedisModule_GetContextFlags.unwrap()(ctx) as u32;
        // MULTI/DISCARD/WATCH/UNWATCH/SHUTDOWN come as KEEL.TB, which Redis
        // refuses in scripts and serves during a busy script (when the
        // context says "script running", for another client); any other
        // routed command running while a script runs is that script's.
        let busy_safe = routing::is_busy_safe(&name);
        if busy_safe && name == b"exec" && flags & raw::REDISMODULE_CTX_FLAGS_LUA != 0 {
            // A script is busy: Redis's own EXEC would be refused, and the
            // transaction discarded.
            let id = raw::RedisModule_GetClientId.unwrap()(ctx);
            state().txs.ran(id);
            if state().txs.discard(id) {
                return reply_error(ctx, &format!("EXECABORT Transaction discarded because of: {BUSY_MESSAGE}"));
            }
            return reply_error(ctx, BUSY_MESSAGE);
        }
        if !busy_safe && flags & (raw::REDISMODULE_CTX_FLAGS_MULTI | raw::REDISMODULE_CTX_FLAGS_LUA) != 0 {
            // From a script (Redis filters script calls too).
            state().txs.ran(raw::RedisModule_GetClientId.unwrap()(ctx));
            if matches!(name.as_slice(), b"multi" | b"exec" | b"discard" | b"watch" | b"unwatch") {
                return reply_error(ctx, "ERR This Redis command is not allowed from script");
            }
            let write = state().is_write(&name, args.get(1).map(|a| string_bytes(*a)));
            return run_and_hold(ctx, args, write);
        }
        let id = raw::RedisModule_GetClientId.unwrap()(ctx);
        state().txs.ran(id);
        if state().txs.in_multi(id) {
            return in_multi(ctx, id, &name, args);
        }
        match name.as_slice() {
            b"multi" => {
                state().txs.multi(id);
                reply_ok(ctx)
            }
            b"exec" => reply_error(ctx, "ERR EXEC without MULTI"),
            b"discard" => reply_error(ctx, "ERR DISCARD without MULTI"),
            b"watch" => {
                if args.len() < 2 {
                    return reply_error(ctx, "ERR wrong number of arguments for 'watch' command");
                }
                let db = raw::RedisModule_GetSelectedDb.unwrap()(ctx);
                let keys: Vec<Vec<u8>> = args[1..].iter().map(|a| string_bytes(*a).to_vec()).collect();
                state().txs.watch(id, db, &keys);
                reply_ok(ctx)
            }
            b"unwatch" => {
                state().txs.unwatch(id);
                reply_ok(ctx)
            }
            b"select" => reply::send(ctx, &select(ctx, args)),
            _ => {
                // Not in a transaction: as the filter would have routed it.
                if blocking::blocks(&name, args[1..].iter().map(|a| string_bytes(*a))) {
                    return blocking::blocking_pop(ctx, args);
                }
                let write = state().is_write(&name, args.get(1).map(|a| string_bytes(*a)));
                let hazard = !write && read_must_wait(&name, args);
                if write || hazard {
                    return run_and_hold(ctx, args, write);
                }
                let cmd = CString::new(string_bytes(args[0])).unwrap_or_default();
                let (reply, counted) = call_for_client(ctx, &cmd, c"v0EC", args, true);
                if reply.is_null() {
                    return reply_error(ctx, "ERR command could not be run");
                }
                if let Some(e) = acl_refusal(ctx, reply, args) {
                    raw::RedisModule_FreeCallReply.unwrap()(reply);
                    return reply_error(ctx, &e);
                }
                if let Some(text) = counted {
                    raw::RedisModule_FreeCallReply.unwrap()(reply);
                    return reply_counted_error(ctx, &text);
                }
                let r = raw::RedisModule_ReplyWithCallReply.unwrap()(ctx, reply);
                raw::RedisModule_FreeCallReply.unwrap()(reply);
                r
            }
        }
    }
}

/// `SELECT n` run by the module for a client (inside EXEC, or routed).
/// Returns the reply as RESP bytes.
unsafe fn select(ctx: *mut raw::RedisModuleCtx, args: &[*mut raw::RedisModuleString]) -> Vec<u8> {
    if args.len() != 2 {
        return reply::error("ERR wrong number of arguments for 'select' command");
    }
    let mut db: i64 = 0;
    if raw::RedisModule_StringToLongLong.unwrap()(args[1], &mut db) != raw::REDISMODULE_OK as c_int {
        return reply::error("ERR value is not an integer or out of range");
    }
    if db < 0 || db > i32::MAX as i64 || raw::RedisModule_SelectDb.unwrap()(ctx, db as c_int) != raw::REDISMODULE_OK as c_int {
        return reply::error("ERR DB index is out of range");
    }
    b"+OK\r\n".to_vec()
}

/// Whether a read must wait for pending writes of its keys.
pub(crate) unsafe fn read_must_wait(name: &[u8], args: &[*mut raw::RedisModuleString]) -> bool {
    routing::read_must_wait(&state().hazards, name, || command_keys(args))
}

/// A command of a client inside MULTI.
unsafe fn in_multi(ctx: *mut raw::RedisModuleCtx, id: u64, name: &[u8], args: &[*mut raw::RedisModuleString]) -> c_int {
    match name {
        b"exec" => exec(ctx, id),
        b"discard" => {
            state().txs.discard(id);
            reply_ok(ctx)
        }
        // Valkey flags them `no_multi`: refused, and the EXEC aborts, as
        // there; Redis 7.0 answers an error and the transaction goes on.
        b"multi" | b"watch" if state().table.no_multi.contains(name) => {
            state().txs.queue_error(id);
            reply_error(ctx, &format!("ERR Command '{}' not allowed inside a transaction", String::from_utf8_lossy(name)))
        }
        b"multi" => reply_error(ctx, "ERR MULTI calls can not be nested"),
        b"watch" => reply_error(ctx, "ERR WATCH inside MULTI is not allowed"),
        _ => {
            let refuse = |msg: String| {
                state().txs.queue_error(id);
                reply_error(ctx, &msg)
            };
            if state().table.no_multi.contains(name) {
                return refuse("ERR Command not allowed inside a transaction".into());
            }
            if let Err(e) = check_command(args) {
                return refuse(e);
            }
            if let Err(e) = acl_check_queued(ctx, args) {
                return refuse(e);
            }
            let argv: Vec<Vec<u8>> = args.iter().map(|a| string_bytes(*a).to_vec()).collect();
            let max = state().cfg.max_transaction_bytes;
            if state().txs.queue(id, argv, max).is_err() {
                return refuse(format!(
                    "ERR the transaction exceeds max_transaction_bytes ({max}); it was discarded, EXEC will fail"
                ));
            }
            raw::RedisModule_ReplyWithSimpleString.unwrap()(ctx, c"QUEUED".as_ptr())
        }
    }
}

/// Refuses an unknown command or one with a wrong number of arguments, as
/// Redis does when it queues.
unsafe fn check_command(args: &[*mut raw::RedisModuleString]) -> Result<(), String> {
    let mut num: c_int = 0;
    let mut argv = args.to_vec();
    set_errno(0);
    let pos = raw::RedisModule_GetCommandKeys.unwrap()(std::ptr::null_mut(), argv.as_mut_ptr(), argv.len() as c_int, &mut num);
    if !pos.is_null() {
        raw::RedisModule_Free.unwrap()(pos as *mut c_void);
        return Ok(());
    }
    let name = String::from_utf8_lossy(string_bytes(args[0])).into_owned();
    match std::io::Error::last_os_error().raw_os_error() {
        Some(ENOENT) => {
            let rest: String = args[1..]
                .iter()
                .map(|a| format!("'{}' ", String::from_utf8_lossy(string_bytes(*a))))
                .collect::<String>()
                .chars()
                .take(128)
                .collect();
            Err(format!("ERR unknown command '{name}', with args beginning with: {rest}"))
        }
        Some(EINVAL) => Err(format!("ERR wrong number of arguments for '{}' command", name.to_ascii_lowercase())),
        // No keys: Redis does not check the arity for this answer.
        _ => {
            let name = name.to_ascii_lowercase().into_bytes();
            let sub = args.get(1).map(|a| [&name[..], b"|", &string_bytes(*a).to_ascii_lowercase()].concat());
            let st = state();
            let found = sub.and_then(|s| st.table.arity.get(&s).map(|a| (s, *a))).or_else(|| st.table.arity.get(&name).map(|a| (name.clone(), *a)));
            match found {
                Some((full, arity)) if !arity_allows(arity, args.len()) => {
                    Err(format!("ERR wrong number of arguments for '{}' command", String::from_utf8_lossy(&full)))
                }
                _ => Ok(()),
            }
        }
    }
}

const ENOENT: i32 = 2;
const EINVAL: i32 = 22;

fn set_errno(v: i32) {
    extern "C" {
        fn __errno_location() -> *mut c_int;
    }
    unsafe { *__errno_location() = v }
}

/// EXEC: runs the queued commands back to back (atomic: one module
/// command) and holds the reply if any of them wrote, or read data that is
/// not durable yet.
unsafe fn exec(ctx: *mut raw::RedisModuleCtx, id: u64) -> c_int {
    let decision = state().txs.exec(id);
    let cmds = match decision {
        Exec::NoMulti => return reply_error(ctx, "ERR EXEC without MULTI"),
        Exec::Aborted => return reply_error(ctx, "EXECABORT Transaction discarded because of previous errors."),
        Exec::WatchTouched => return raw::RedisModule_ReplyWithNullArray.unwrap()(ctx),
        Exec::Run(cmds) => cmds,
    };
    {
        let st = state();
        if st.gate.is_fenced() {
            return reply_error(ctx, "KEEL_FENCED this node is no longer the primary; it serves nothing");
        }
        if st.clients.held_count() >= st.cfg.max_held_replies {
            return reply_error(ctx, "KEEL_BUSY too many replies are awaiting durability; the transaction was not run, retry");
        }
    }
    let mut values = Vec::with_capacity(cmds.len());
    let mut hold = false;
    for argv in cmds {
        let strs = strings(ctx, &argv);
        let name = lower(&argv[0]);
        let value = match name.as_slice() {
            b"select" => select(ctx, &strs),
            b"unwatch" => b"+OK\r\n".to_vec(),
            _ => {
                let write = state().is_write(&name, argv.get(1).map(|a| a.as_slice()));
                if !write && !hold && read_must_wait(&name, &strs) {
                    hold = true;
                }
                let cmd = CString::new(argv[0].clone()).unwrap_or_default();
                let fmt = if write { c"v!0ECM" } else { c"v!0EC" };
                let reply = call(ctx, &cmd, fmt, &strs[1..]);
                if write {
                    hold = true;
                    state().hazards.write(command_keys(&strs).unwrap_or_default());
                }
                if reply.is_null() {
                    reply::error("ERR command could not be run")
                } else if let Some(e) = acl_refusal(ctx, reply, &strs) {
                    raw::RedisModule_FreeCallReply.unwrap()(reply);
                    reply::error(&e)
                } else {
                    let v = reply::copy(reply);
                    raw::RedisModule_FreeCallReply.unwrap()(reply);
                    v
                }
            }
        };
        values.push(value);
        free_strings(ctx, strs);
    }
    let mut value = format!("*{}\r\n", values.len()).into_bytes();
    for v in values {
        value.extend_from_slice(&v);
    }
    if !hold {
        return reply::send(ctx, &value);
    }
    block_with(ctx, value)
}

/// Blocks the calling client with `value` as its reply, held until the end
/// of this turn is durable.
pub(crate) unsafe fn block_with(ctx: *mut raw::RedisModuleCtx, value: Vec<u8>) -> c_int {
    block_with_answer(ctx, Answer::Reply(value))
}

unsafe fn block_with_answer(ctx: *mut raw::RedisModuleCtx, answer: Answer) -> c_int {
    let timeout = state().cfg.write_timeout_ms;
    let bc = raw::RedisModule_BlockClient.unwrap()(ctx, Some(on_unblock), Some(on_timeout), Some(free_answer), timeout);
    hold_answer(Blocked(bc), answer);
    raw::REDISMODULE_OK as c_int
}

fn hold_answer(bc: Blocked, answer: Answer) {
    state().clients.hold(bc, answer);
}

pub(crate) fn unconfirmed_message() -> String {
    let ms = state().cfg.write_timeout_ms;
    format!(
        "KEEL_UNCONFIRMED the journal did not confirm within {ms} ms the write this reply depends on; \
         that write is applied in memory and may or may not be durable"
    )
}

/// Runs `args` (command first) for the calling client and holds its reply
/// (`write`: its keys become read hazards until durable).
pub(crate) fn run_and_hold(ctx: *mut raw::RedisModuleCtx, args: &[*mut raw::RedisModuleString], write: bool) -> c_int {
    unsafe {
        let flags = raw::RedisModule_GetContextFlags.unwrap()(ctx) as u32;
        let in_multi_or_script =
            flags & (raw::REDISMODULE_CTX_FLAGS_MULTI | raw::REDISMODULE_CTX_FLAGS_LUA) != 0;
        {
            let st = state();
            if st.gate.is_fenced() {
                return raw::RedisModule_ReplyWithError.unwrap()(
                    ctx,
                    c"KEEL_FENCED this node is no longer the primary; it serves nothing".as_ptr(),
                );
            }
            if !in_multi_or_script && st.clients.held_count() >= st.cfg.max_held_replies {
                return raw::RedisModule_ReplyWithError.unwrap()(
                    ctx,
                    c"KEEL_BUSY too many replies are awaiting durability; nothing was done, retry".as_ptr(),
                );
            }
        }
        let cmd = CString::new(string_bytes(args[0])).unwrap_or_default();
        // v: argv vector; !: replicate; 0: the client's protocol; E: errors as
        // replies; C: ACL checks as the client's user; M: refuse on OOM.
        let fmt = if write { c"v!0ECM" } else { c"v0EC" };
        let (reply, counted) = call_for_client(ctx, &cmd, fmt, args, !in_multi_or_script);
        if reply.is_null() {
            return raw::RedisModule_ReplyWithError.unwrap()(ctx, c"ERR command could not be run".as_ptr());
        }
        if let Some(e) = acl_refusal(ctx, reply, args) {
            // Refused before it ran: nothing to hold.
            raw::RedisModule_FreeCallReply.unwrap()(reply);
            return reply_error(ctx, &e);
        }
        if in_multi_or_script {
            // A script's reply is held at the level of the script's caller.
            let r = raw::RedisModule_ReplyWithCallReply.unwrap()(ctx, reply);
            raw::RedisModule_FreeCallReply.unwrap()(reply);
            return r;
        }
        if write {
            let keys = command_keys(args).unwrap_or_default();
            state().hazards.write(keys);
        }
        // Keep a copy of the reply until the client is released.
        let value = reply::copy(reply);
        raw::RedisModule_FreeCallReply.unwrap()(reply);
        match counted {
            Some(text) => block_with_answer(ctx, Answer::CountedError(text)),
            None => block_with(ctx, value),
        }
    }
}

/// `call` of the client's command `args` (name first); for a script whose
/// reply goes straight to its client (`to_client`), also the error reply's
/// text if INFO errorstats already counted it (`counted_error`).
unsafe fn call_for_client(
    ctx: *mut raw::RedisModuleCtx,
    cmd: &std::ffi::CStr,
    fmt: &std::ffi::CStr,
    args: &[*mut raw::RedisModuleString],
    to_client: bool,
) -> (*mut raw::RedisModuleCallReply, Option<Vec<u8>>) {
    let name = string_bytes(args[0]);
    let script = to_client && SCRIPT_COMMANDS.iter().any(|s| name.eq_ignore_ascii_case(s));
    let before = if script { raw::RedisModule_GetServerInfo.unwrap()(ctx, c"errorstats".as_ptr()) } else { std::ptr::null_mut() };
    let reply = call(ctx, cmd, fmt, &args[1..]);
    let counted = if before.is_null() { None } else { counted_error(ctx, reply, before) };
    (reply, counted)
}

/// Scripts, whose error reply Redis may leave out of INFO errorstats.
const SCRIPT_COMMANDS: &[&[u8]] = &[b"eval", b"evalsha", b"eval_ro", b"evalsha_ro", b"fcall", b"fcall_ro"];

/// A script's error reply that Redis would not count again: one raised by
/// a failed `redis.call` (or a `redis.pcall` error returned), which was
/// counted when that command failed (`ERR_REPLY_FLAG_NO_STATS_UPDATE`).
/// Redis 7.0 defers a module client's errors whatever that flag, so a held
/// reply would count it a second time. Told by INFO errorstats: an error
/// under the reply's own name counted during the call. (A script that
/// returns its own error with the name of one it caught is counted once,
/// not twice.) Frees `before`.
unsafe fn counted_error(
    ctx: *mut raw::RedisModuleCtx,
    reply: *mut raw::RedisModuleCallReply,
    before: *mut raw::RedisModuleServerInfoData,
) -> Option<Vec<u8>> {
    let mut found = None;
    if !reply.is_null() && raw::RedisModule_CallReplyType.unwrap()(reply) == raw::REDISMODULE_REPLY_ERROR as c_int {
        let text = reply_text(reply).unwrap_or_default();
        let field = CString::new([b"errorstat_", crate::resp::error_code(&text)].concat()).unwrap_or_default();
        let count = |data: *mut raw::RedisModuleServerInfoData| {
            let v = raw::RedisModule_ServerInfoGetFieldC.unwrap()(data, field.as_ptr());
            if v.is_null() { 0 } else { crate::resp::errorstat_count(std::ffi::CStr::from_ptr(v).to_bytes()) }
        };
        let after = raw::RedisModule_GetServerInfo.unwrap()(ctx, c"errorstats".as_ptr());
        if !after.is_null() {
            if count(after) > count(before) {
                found = Some(text);
            }
            raw::RedisModule_FreeServerInfo.unwrap()(ctx, after);
        }
    }
    raw::RedisModule_FreeServerInfo.unwrap()(ctx, before);
    found
}

/// Replies the error `text` without INFO errorstats counting it: as an
/// element of a call reply, which carries no deferred errors of its own
/// (`RM_ReplyWithCallReply` counts only a whole reply's).
unsafe fn reply_counted_error(ctx: *mut raw::RedisModuleCtx, text: &[u8]) -> c_int {
    let strs = strings(ctx, &[text]);
    let r = call(ctx, c"KEEL.COUNTEDERROR", c"v", &strs);
    free_strings(ctx, strs);
    if !r.is_null() {
        let e = raw::RedisModule_CallReplyArrayElement.unwrap()(r, 0);
        let ok = !e.is_null()
            && raw::RedisModule_CallReplyType.unwrap()(e) == raw::REDISMODULE_REPLY_ERROR as c_int
            && raw::RedisModule_ReplyWithCallReply.unwrap()(ctx, e) == raw::REDISMODULE_OK as c_int;
        raw::RedisModule_FreeCallReply.unwrap()(r);
        if ok {
            return raw::REDISMODULE_OK as c_int;
        }
    }
    reply::send(ctx, &reply::error(&String::from_utf8_lossy(text)))
}

/// `KEEL.COUNTEDERROR <text>`: a one-element array holding the error
/// `text` (for `reply_counted_error`).
extern "C" fn keel_countederror(ctx: *mut raw::RedisModuleCtx, argv: *mut *mut raw::RedisModuleString, argc: c_int) -> c_int {
    unsafe {
        if argc != 2 {
            return raw::RedisModule_WrongArity.unwrap()(ctx);
        }
        // Newlines would break the protocol; a NUL would end the C string.
        let clean: Vec<u8> = string_bytes(*argv.add(1)).iter().map(|&b| if matches!(b, b'\r' | b'\n' | 0) { b' ' } else { b }).collect();
        let text = CString::new(clean).unwrap_or_default();
        raw::RedisModule_ReplyWithArray.unwrap()(ctx, 1);
        raw::RedisModule_ReplyWithError.unwrap()(ctx, text.as_ptr())
    }
}

/// Sends the kept replies of durable clients; but a node whose lease lapsed
/// acknowledges nothing (another node may lead by now): its clients learn
/// that the outcome is unknown.
fn release(clients: Vec<(Blocked, Answer)>) {
    let serving = {
        let mut st = state();
        st.released_total += clients.len() as u64;
        st.gate.decide(gate::monotonic_ms()) == Decision::Serve
    };
    for (bc, answer) in clients {
        if serving {
            unblock(bc, answer);
        } else {
            unblock(
                bc,
                Answer::Error(
                    "KEEL_UNCONFIRMED this node's primary lease lapsed before it could confirm the write; \
                     the write may or may not be durable"
                        .into(),
                ),
            );
        }
    }
}

/// Whether the calling client is authenticated as the control user.
unsafe fn caller_is_control(ctx: *mut raw::RedisModuleCtx) -> bool {
    let name = raw::RedisModule_GetCurrentUserName.unwrap()(ctx);
    if name.is_null() {
        return false;
    }
    let is = string_bytes(name) == state().cfg.control_user.as_bytes();
    raw::RedisModule_FreeString.unwrap()(ctx, name);
    is
}

/// Answers `NOPERM` to a control command from anyone but this node's
/// sidecar (control.rs); `None` lets the command run.
unsafe fn refuse_unless_control(ctx: *mut raw::RedisModuleCtx, command: &str) -> Option<c_int> {
    if caller_is_control(ctx) {
        return None;
    }
    let user = state().cfg.control_user.clone();
    Some(reply_error(ctx, &control::not_control(command, &user)))
}

/// `KEEL.GUARD <command…>`: what the filter took from a client because
/// `control::guard` names it. Runs it (unfiltered) where the guard allows
/// the caller, answers the refusal otherwise (`refuse_guarded`).
extern "C" fn keel_guard(ctx: *mut raw::RedisModuleCtx, argv: *mut *mut raw::RedisModuleString, argc: c_int) -> c_int {
    unsafe {
        if argc < 2 {
            return raw::RedisModule_WrongArity.unwrap()(ctx);
        }
        let args = std::slice::from_raw_parts(argv.add(1), (argc - 1) as usize);
        let bytes: Vec<&[u8]> = args.iter().map(|a| string_bytes(*a)).collect();
        let user = state().cfg.control_user.clone();
        if control::guard(&bytes, user.as_bytes()).is_none() {
            return reply_error(ctx, "ERR KEEL.GUARD runs only the commands the Keel module hands it");
        }
        if let Some(refused) = refuse_guarded(ctx, args) {
            return refused;
        }
        let cmd = CString::new(bytes[0]).unwrap_or_default();
        let reply = call(ctx, &cmd, c"vE", &args[1..]);
        if reply.is_null() {
            return reply_error(ctx, "ERR command could not be run");
        }
        let r = raw::RedisModule_ReplyWithCallReply.unwrap()(ctx, reply);
        raw::RedisModule_FreeCallReply.unwrap()(reply);
        r
    }
}

/// The refusal of a command `control::guard` names (`args`: name first),
/// unless the guard allows the caller; `None` lets it run. Every module
/// command that runs a command it is handed asks this first: the filter
/// hands such commands to `KEEL.GUARD` only, but a client (or a script) can
/// name the module's wrappers itself (`KEEL.W FAILOVER`, `KEEL.T REPLICAOF
/// …`), and the wrappers run what they are given unfiltered. A refusal
/// inside MULTI makes the EXEC abort, as Redis does with a command refused
/// at queue time.
///
/// Refused too, to everyone: the commands the filter never hands to a
/// wrapper, which act on the connection (`CONNECTION_COMMANDS`, the
/// module's own included), and `NOT_RUN_FOR_CLIENTS`. Run by `RM_Call`,
/// they would act on the server's internal client of the call instead
/// (subscribe it, make it a replica), or block it (`KEEL.B KEEL.T SET …`,
/// `KEEL.R WAIT 1 100`), which Redis answers with an assertion failure: the
/// server exits.
pub(crate) unsafe fn refuse_guarded(ctx: *mut raw::RedisModuleCtx, args: &[*mut raw::RedisModuleString]) -> Option<c_int> {
    let bytes: Vec<&[u8]> = args.iter().map(|a| string_bytes(*a)).collect();
    let user = state().cfg.control_user.clone();
    let name = lower(bytes[0]);
    let refusal = if routing::never_run_for_clients(&name) {
        format!(
            "ERR the Keel module does not run {} for a client: send it by itself, outside MULTI (on Redis 7.0, \
             while no client has a transaction open)",
            String::from_utf8_lossy(&name).to_ascii_uppercase()
        )
    } else {
        let g = control::guard(&bytes, user.as_bytes())?;
        if g.allows(caller_is_control(ctx)) {
            return None;
        }
        control::refusal(g, bytes[0], &user)
    };
    let id = raw::RedisModule_GetClientId.unwrap()(ctx);
    {
        let mut st = state();
        if st.txs.in_multi(id) {
            st.txs.queue_error(id);
        }
    }
    Some(reply_error(ctx, &refusal))
}

/// (Re)creates the control user with its secrets (the current one, and
/// those still retiring: secret.rs): at load, and after `ACL LOAD`
/// replaced the users. Its rules are the module's alone (`control::guard`
/// refuses changes from clients).
unsafe fn ensure_control_user(ctx: *mut raw::RedisModuleCtx) {
    let user = state().cfg.control_user.clone();
    let mut passwords: Vec<Vec<u8>> = state().secret.passwords().map(|s| [b">", s.bytes()].concat()).collect();
    let mut args: Vec<&[u8]> = vec![b"SETUSER", user.as_bytes(), b"reset", b"on"];
    args.extend(passwords.iter().map(|p| p.as_slice()));
    args.extend([&b"~*"[..], b"&*", b"+@all"]);
    let r = acl(ctx, &args);
    drop(args);
    passwords.iter_mut().for_each(|p| p.fill(0));
    if let Err(why) = r {
        Context::new(ctx).log_warning(&format!("keel: could not create the control user '{user}' ({why}); the sidecar cannot authenticate"));
    }
}

/// `ACL <args>`, unfiltered; the error's text if it failed.
unsafe fn acl(ctx: *mut raw::RedisModuleCtx, args: &[&[u8]]) -> Result<(), String> {
    let r = call_bytes(ctx, c"ACL", args);
    if r.is_null() {
        return Err(String::new());
    }
    let failed = raw::RedisModule_CallReplyType.unwrap()(r) == raw::REDISMODULE_REPLY_ERROR as c_int;
    let why = if failed { reply_text(r).unwrap_or_default() } else { Vec::new() };
    raw::RedisModule_FreeCallReply.unwrap()(r);
    if failed { Err(String::from_utf8_lossy(&why).into_owned()) } else { Ok(()) }
}

/// Applies `changes` to the control user's passwords (`ACL SETUSER
/// <user> >new` / `<old`): the rules and the open connections stay.
unsafe fn change_control_passwords(ctx: *mut raw::RedisModuleCtx, changes: Vec<secret::Change>) {
    let user = state().cfg.control_user.clone();
    for change in changes {
        let (mut rule, what) = match &change {
            secret::Change::Add(s) => ([b">", s.bytes()].concat(), "add the new secret to"),
            secret::Change::Remove(s) => ([b"<", s.bytes()].concat(), "remove a replaced secret from"),
        };
        let r = acl(ctx, &[b"SETUSER", user.as_bytes(), &rule]);
        rule.fill(0);
        if let Err(why) = r {
            Context::new(ctx).log_warning(&format!(
                "keel: could not {what} the control user '{user}' ({why}); `ACL LOAD` or a restart sets it again"
            ));
        }
    }
}

/// Every `SECRET_POLL_MS`: reads control_secret_file again and applies a
/// new secret, or retires replaced ones whose grace ended (secret.rs).
extern "C" fn poll_secret(ctx: *mut raw::RedisModuleCtx, _data: *mut c_void) {
    unsafe {
        let path = state().cfg.control_secret_file.clone();
        let read = control::read_secret(&path);
        let now = gate::monotonic_ms();
        let seen = {
            let mut st = state();
            st.secret_polls += 1;
            st.secret.seen(read, now)
        };
        let mut changes = Vec::new();
        match seen {
            secret::Seen::Unchanged | secret::Seen::RefusedAgain => {}
            secret::Seen::Refused(why) => Context::new(ctx).log_warning(&format!(
                "{why}; the control user keeps its current secret (checked again every {} ms)",
                secret::SECRET_POLL_MS
            )),
            secret::Seen::Rotated(c) => {
                state().secret_loaded_unix_ms = unix_ms();
                Context::new(ctx).log_notice(&format!(
                    "keel: control_secret_file {path:?} holds a new secret: the control user accepts it now, and the \
                     one it replaces for {} ms more",
                    secret::SECRET_GRACE_MS
                ));
                changes = c;
            }
        }
        changes.extend(state().secret.expire(now));
        change_control_passwords(ctx, changes);
        raw::RedisModule_CreateTimer.unwrap()(ctx, secret::SECRET_POLL_MS as i64, Some(poll_secret), std::ptr::null_mut());
    }
}

/// Wall-clock time in Unix ms (0 if the clock is before 1970).
fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A replica must refuse writes itself (it does not hold the lease): sets
/// `replica-read-only yes` if it was started with `no`.
unsafe fn ensure_replica_read_only(ctx: *mut raw::RedisModuleCtx) {
    let r = call_bytes(ctx, c"CONFIG", &[b"GET", b"replica-read-only"]);
    if r.is_null() {
        return;
    }
    let value = if raw::RedisModule_CallReplyLength.unwrap()(r) >= 2 {
        reply_str(raw::RedisModule_CallReplyArrayElement.unwrap()(r, 1))
    } else {
        Vec::new()
    };
    raw::RedisModule_FreeCallReply.unwrap()(r);
    if value == b"yes" {
        return;
    }
    let r = call_bytes(ctx, c"CONFIG", &[b"SET", b"replica-read-only", b"yes"]);
    if !r.is_null() {
        raw::RedisModule_FreeCallReply.unwrap()(r);
    }
    Context::new(ctx).log_notice(&format!(
        "keel: replica-read-only was {:?}; set to yes (a Keel replica never takes writes)",
        String::from_utf8_lossy(&value)
    ));
}

/// `KEEL.ACK <offset>`: the journal holds the replication stream up to offset.
extern "C" fn keel_ack(ctx: *mut raw::RedisModuleCtx, argv: *mut *mut raw::RedisModuleString, argc: c_int) -> c_int {
    unsafe {
        if let Some(r) = refuse_unless_control(ctx, "keel.ack") {
            return r;
        }
        if argc != 2 {
            return raw::RedisModule_WrongArity.unwrap()(ctx);
        }
        let mut off: i64 = 0;
        if raw::RedisModule_StringToLongLong.unwrap()(*argv.add(1), &mut off) != raw::REDISMODULE_OK as c_int || off < 0 {
            return raw::RedisModule_ReplyWithError.unwrap()(ctx, c"ERR offset must be a non-negative integer".as_ptr());
        }
        // The journal cannot hold what this Redis never produced: such an
        // ack would release replies before their writes are durable.
        if off as u64 > state().produced_offset {
            let produced = repl_offset();
            if off as u64 > produced {
                return reply_error(
                    ctx,
                    &format!("ERR KEEL.ACK {off} is beyond this Redis's replication offset {produced}; nothing was acknowledged"),
                );
            }
            let mut st = state();
            st.produced_offset = st.produced_offset.max(produced);
        }
        state().hazards.durable(off as u64);
        let released = state().clients.durable(off as u64);
        let n = released.len();
        release(released);
        raw::RedisModule_ReplyWithLongLong.unwrap()(ctx, n as i64)
    }
}

/// `KEEL.LEADER <uuid> <stream>`: the sidecar holds the journal stream's
/// lease as this node (reported in INFO).
extern "C" fn keel_leader(ctx: *mut raw::RedisModuleCtx, argv: *mut *mut raw::RedisModuleString, argc: c_int) -> c_int {
    unsafe {
        if let Some(r) = refuse_unless_control(ctx, "keel.leader") {
            return r;
        }
        if argc != 3 {
            return raw::RedisModule_WrongArity.unwrap()(ctx);
        }
        let mut st = state();
        st.leader_uuid = String::from_utf8_lossy(string_bytes(*argv.add(1))).into_owned();
        st.stream = String::from_utf8_lossy(string_bytes(*argv.add(2))).into_owned();
        drop(st);
        reply_ok(ctx)
    }
}

/// `KEEL.FENCED <reason>`: the journal refused this node; fail every held write.
extern "C" fn keel_fenced(ctx: *mut raw::RedisModuleCtx, argv: *mut *mut raw::RedisModuleString, argc: c_int) -> c_int {
    unsafe {
        if let Some(r) = refuse_unless_control(ctx, "keel.fenced") {
            return r;
        }
        let reason = if argc > 1 { String::from_utf8_lossy(string_bytes(*argv.add(1))).into_owned() } else { String::new() };
        state().gate.fence();
        fail_everything_held(
            &reason,
            &format!("KEEL_FENCED this node lost the primary role before the write was durable ({reason}); it may or may not survive"),
        );
        raw::RedisModule_ReplyWithSimpleString.unwrap()(ctx, c"OK".as_ptr())
    }
}

/// `KEEL.LEASE <until_ms>`: the sidecar renewed the stream lease; this node
/// may serve until `until_ms` on the machine's monotonic clock.
extern "C" fn keel_lease(ctx: *mut raw::RedisModuleCtx, argv: *mut *mut raw::RedisModuleString, argc: c_int) -> c_int {
    unsafe {
        if let Some(r) = refuse_unless_control(ctx, "keel.lease") {
            return r;
        }
        if argc != 2 {
            return raw::RedisModule_WrongArity.unwrap()(ctx);
        }
        let mut until: i64 = 0;
        if raw::RedisModule_StringToLongLong.unwrap()(*argv.add(1), &mut until) != raw::REDISMODULE_OK as c_int || until < 0 {
            return reply_error(ctx, "ERR lease deadline must be a non-negative integer (monotonic ms)");
        }
        let r = state().gate.lease(until as u64);
        match r {
            Ok(()) => raw::RedisModule_ReplyWithLongLong.unwrap()(ctx, state().gate.lease_remaining_ms(gate::monotonic_ms()) as i64),
            Err(e) => reply_error(ctx, e),
        }
    }
}

/// `KEEL.FOLLOWING <leader uuid> <stream> <journal offset>`: a replica's
/// sidecar reports whom it follows and how far the journal reaches.
extern "C" fn keel_following(ctx: *mut raw::RedisModuleCtx, argv: *mut *mut raw::RedisModuleString, argc: c_int) -> c_int {
    unsafe {
        if let Some(r) = refuse_unless_control(ctx, "keel.following") {
            return r;
        }
        if argc != 4 {
            return raw::RedisModule_WrongArity.unwrap()(ctx);
        }
        let mut off: i64 = 0;
        if raw::RedisModule_StringToLongLong.unwrap()(*argv.add(3), &mut off) != raw::REDISMODULE_OK as c_int || off < 0 {
            return reply_error(ctx, "ERR offset must be a non-negative integer");
        }
        let mut st = state();
        if !st.gate.is_replica() {
            drop(st);
            return reply_error(ctx, "ERR this node is not a replica");
        }
        st.leader_uuid = String::from_utf8_lossy(string_bytes(*argv.add(1))).into_owned();
        st.stream = String::from_utf8_lossy(string_bytes(*argv.add(2))).into_owned();
        st.journal_offset = off as u64;
        drop(st);
        reply_ok(ctx)
    }
}

/// `KEEL.SNAPSHOT <seq> <offset> <created unix ms>`: the sidecar reports the
/// stream's published snapshot, for `INFO keel`.
extern "C" fn keel_snapshot(ctx: *mut raw::RedisModuleCtx, argv: *mut *mut raw::RedisModuleString, argc: c_int) -> c_int {
    unsafe {
        if let Some(r) = refuse_unless_control(ctx, "keel.snapshot") {
            return r;
        }
        if argc != 4 {
            return raw::RedisModule_WrongArity.unwrap()(ctx);
        }
        let mut v = [0i64; 3];
        for (i, slot) in v.iter_mut().enumerate() {
            // SAFETY: argc is 4, so argv holds 1 + 3 strings.
            if raw::RedisModule_StringToLongLong.unwrap()(*argv.add(i + 1), slot) != raw::REDISMODULE_OK as c_int || *slot < 0 {
                return reply_error(ctx, "ERR seq, offset and time must be non-negative integers");
            }
        }
        state().snapshot = (v[0] as u64, v[1] as u64, v[2] as u64);
        reply_ok(ctx)
    }
}

/// Longest stall reason kept for `INFO keel`.
const MAX_STALL_REASON_BYTES: usize = 256;

/// `KEEL.STALLED <seq> [<reason>]`: the sidecar's feed stopped at journal
/// record `seq`, which it cannot read (seq 0: it is fine again); shown by
/// `INFO keel`. Accepted in any role: a primary's sidecar that meets such a
/// record steps down and reports it too.
extern "C" fn keel_stalled(ctx: *mut raw::RedisModuleCtx, argv: *mut *mut raw::RedisModuleString, argc: c_int) -> c_int {
    unsafe {
        if let Some(r) = refuse_unless_control(ctx, "keel.stalled") {
            return r;
        }
        if !(2..=3).contains(&argc) {
            return raw::RedisModule_WrongArity.unwrap()(ctx);
        }
        let mut seq: i64 = 0;
        if raw::RedisModule_StringToLongLong.unwrap()(*argv.add(1), &mut seq) != raw::REDISMODULE_OK as c_int || seq < 0 {
            return reply_error(ctx, "ERR seq must be a non-negative integer");
        }
        let reason = if seq > 0 && argc == 3 { crate::control::info_line(string_bytes(*argv.add(2)), MAX_STALL_REASON_BYTES) } else { String::new() };
        state().stalled = (seq as u64, reason);
        reply_ok(ctx)
    }
}

/// `KEEL.NOLEASE cmd…`: a data command this node must not serve now. As
/// Redis does with a command it rejects, a client inside MULTI has its
/// transaction flagged (EXEC will abort it), and a refused EXEC discards it:
/// a transaction never runs with a command missing.
extern "C" fn keel_nolease(ctx: *mut raw::RedisModuleCtx, argv: *mut *mut raw::RedisModuleString, argc: c_int) -> c_int {
    unsafe {
        let id = raw::RedisModule_GetClientId.unwrap()(ctx);
        let mut st = state();
        if st.txs.in_multi(id) {
            let exec = argc > 1 && string_bytes(*argv.add(1)).eq_ignore_ascii_case(b"exec");
            if exec {
                st.txs.discard(id);
            } else {
                st.txs.queue_error(id);
            }
        }
        let why = match st.gate.decide(gate::monotonic_ms()) {
            Decision::Refuse(why) => why,
            _ => gate::LAPSED,
        };
        drop(st);
        reply_error(ctx, why)
    }
}

/// Redis changed role (the sidecar made it a replica to resync, or
/// promoted it): whatever is held can no longer be confirmed by this node.
extern "C" fn on_role_changed(_ctx: *mut raw::RedisModuleCtx, _eid: raw::RedisModuleEvent, subevent: u64, _data: *mut c_void) {
    let replica = subevent == raw::REDISMODULE_EVENT_REPLROLECHANGED_NOW_REPLICA;
    state().gate.role_changed(replica);
    let reason = if replica { "this node became a replica" } else { "this node was promoted" };
    fail_everything_held(reason, &format!("KEEL_FENCED {reason} before the write was durable; it may or may not survive"));
    // A new tenure: its durable offset starts from the next KEEL.ACK.
    let mut st = state();
    st.clients.new_tenure();
    st.leader_uuid.clear();
    st.produced_offset = 0;
}

/// This node can no longer confirm anything it holds: every held reply and
/// waiting pop gets `message` (pops are told `why`), and pending hazards go.
fn fail_everything_held(why: &str, message: &str) {
    let failed = {
        let mut st = state();
        st.hazards.clear();
        st.clients.fail_all()
    };
    for (bc, _) in failed.waiting {
        unblock(bc, Answer::Error(format!("KEEL_FENCED this node lost the primary role ({why}); nothing was popped")));
    }
    for bc in failed.held {
        unblock(bc, Answer::Error(message.to_string()));
    }
}

/// beforeSleep: the turn's effects are propagated; fix their target offset.
extern "C" fn on_event_loop(ctx: *mut raw::RedisModuleCtx, _eid: raw::RedisModuleEvent, subevent: u64, _data: *mut c_void) {
    if subevent != 0 {
        return; // only BEFORE_SLEEP
    }
    if std::mem::take(&mut state().acl_grant_pending) {
        unsafe {
            ensure_control_user(ctx);
            grant_wrappers(ctx);
        }
    }
    if !std::mem::replace(&mut state().read_only_checked, true) {
        unsafe { ensure_replica_read_only(ctx) };
    }
    {
        let st = state();
        if !st.clients.turn_has_writes() && !st.hazards.turn_has_writes() {
            return;
        }
    }
    let offset = unsafe { master_repl_offset(ctx) };
    if offset != u64::MAX {
        let mut st = state();
        st.hazards.end_turn(offset);
        st.produced_offset = st.produced_offset.max(offset);
    }
    let released = state().clients.end_turn(offset);
    release(released);
}

/// The replication offset covering everything propagated so far, or
/// `u64::MAX` when Redis keeps no replication backlog (no sidecar has ever
/// attached, or it left long ago): then writes are in no stream, and their
/// replies must wait (and time out) rather than be released.
///
/// Read once per event-loop turn that held a write, so its cost matters:
/// `ROLE` (about a tenth of INFO's cost: no report to format and split)
/// gives the offset, and a connected replica (the sidecar) proves the
/// backlog exists; without one, INFO tells whether it does.
unsafe fn master_repl_offset(ctx: *mut raw::RedisModuleCtx) -> u64 {
    if let Some(offset) = role_offset_with_replica(ctx) {
        return offset;
    }
    match info_replication(ctx) {
        Some((true, offset)) => offset,
        _ => u64::MAX,
    }
}

/// `ROLE`'s offset, when this node is a master with a replica connected.
unsafe fn role_offset_with_replica(ctx: *mut raw::RedisModuleCtx) -> Option<u64> {
    let reply = raw::RedisModule_Call.unwrap()(ctx, c"ROLE".as_ptr(), c"".as_ptr());
    if reply.is_null() {
        return None;
    }
    let elem = |i| raw::RedisModule_CallReplyArrayElement.unwrap()(reply, i);
    let ty = |r| raw::RedisModule_CallReplyType.unwrap()(r);
    let found = (|| {
        if ty(reply) != raw::REDISMODULE_REPLY_ARRAY as c_int || raw::RedisModule_CallReplyLength.unwrap()(reply) < 3 {
            return None;
        }
        let (role, offset, replicas) = (elem(0), elem(1), elem(2));
        if reply_str(role) != b"master" || ty(offset) != raw::REDISMODULE_REPLY_INTEGER as c_int {
            return None;
        }
        if ty(replicas) != raw::REDISMODULE_REPLY_ARRAY as c_int || raw::RedisModule_CallReplyLength.unwrap()(replicas) == 0 {
            return None;
        }
        u64::try_from(raw::RedisModule_CallReplyInteger.unwrap()(offset)).ok()
    })();
    raw::RedisModule_FreeCallReply.unwrap()(reply);
    found
}

/// `master_repl_offset` as INFO reports it (0 when unknown).
unsafe fn repl_offset() -> u64 {
    info_replication(std::ptr::null_mut()).map(|(_, offset)| offset).unwrap_or(0)
}

/// From `INFO replication`: whether a replication backlog exists
/// (`repl_backlog_active`) and `master_repl_offset`; `None` when INFO does
/// not tell.
unsafe fn info_replication(ctx: *mut raw::RedisModuleCtx) -> Option<(bool, u64)> {
    let info = raw::RedisModule_GetServerInfo.unwrap()(ctx, c"replication".as_ptr());
    if info.is_null() {
        return None;
    }
    let mut err: c_int = 0;
    let active = raw::RedisModule_ServerInfoGetFieldUnsigned.unwrap()(info, c"repl_backlog_active".as_ptr(), &mut err);
    let offset = raw::RedisModule_ServerInfoGetFieldUnsigned.unwrap()(info, c"master_repl_offset".as_ptr(), &mut err);
    raw::RedisModule_FreeServerInfo.unwrap()(ctx, info);
    (err == 0).then_some((active != 0, offset))
}

/// Keyspace notifications: every write notifies; a watched key's watchers
/// will fail their EXEC.
extern "C" fn on_keyspace(ctx: *mut raw::RedisModuleCtx, _type: c_int, _event: *const std::os::raw::c_char, key: *mut raw::RedisModuleString) -> c_int {
    unsafe {
        let mut st = state();
        if !st.gate.is_fenced() && !st.gate.is_replica() {
            // Every write notifies: the key is not durable until this
            // turn's offset is (scripts' undeclared keys, expiry too).
            st.hazards.write(vec![string_bytes(key).to_vec()]);
        }
        if st.txs.any_watched() || st.clients.waiting_count() > 0 {
            let db = raw::RedisModule_GetSelectedDb.unwrap()(ctx);
            st.txs.touched(db, string_bytes(key));
            blocking::key_written(ctx, &mut st, db, string_bytes(key));
        }
    }
    raw::REDISMODULE_OK as c_int
}

/// FLUSHDB/FLUSHALL (before the flush): watched keys that exist are touched.
extern "C" fn on_flush(ctx: *mut raw::RedisModuleCtx, _eid: raw::RedisModuleEvent, subevent: u64, data: *mut c_void) {
    if subevent != raw::REDISMODULE_SUBEVENT_FLUSHDB_START as u64 || data.is_null() {
        return;
    }
    unsafe {
        let info = &*(data as *const raw::RedisModuleFlushInfo);
        let db = if info.dbnum < 0 { None } else { Some(info.dbnum) };
        blocking::db_changed(ctx, &mut state(), db);
        let watched = state().txs.watched_in(db);
        if watched.is_empty() {
            return;
        }
        let before = raw::RedisModule_GetSelectedDb.unwrap()(ctx);
        let mut existing = Vec::new();
        for (db, key) in watched {
            raw::RedisModule_SelectDb.unwrap()(ctx, db);
            let k = raw::RedisModule_CreateString.unwrap()(ctx, key.as_ptr() as *const _, key.len());
            if raw::RedisModule_KeyExists.unwrap()(ctx, k) != 0 {
                existing.push((db, key));
            }
            raw::RedisModule_FreeString.unwrap()(ctx, k);
        }
        raw::RedisModule_SelectDb.unwrap()(ctx, before);
        let mut st = state();
        for (db, key) in existing {
            st.txs.touched(db, &key);
        }
    }
}

/// SWAPDB: every watched key of both databases is touched (Redis spares
/// keys missing from both; this errs on the side of failing the EXEC).
extern "C" fn on_swapdb(ctx: *mut raw::RedisModuleCtx, _eid: raw::RedisModuleEvent, _subevent: u64, data: *mut c_void) {
    if data.is_null() {
        return;
    }
    unsafe {
        let info = &*(data as *const raw::RedisModuleSwapDbInfo);
        let mut st = state();
        blocking::db_changed(ctx, &mut st, Some(info.dbnum_first));
        blocking::db_changed(ctx, &mut st, Some(info.dbnum_second));
        for db in [info.dbnum_first, info.dbnum_second] {
            for (db, key) in st.txs.watched_in(Some(db)) {
                st.txs.touched(db, &key);
            }
        }
    }
}

/// A client left: forget its transaction and watches.
extern "C" fn on_client(_ctx: *mut raw::RedisModuleCtx, _eid: raw::RedisModuleEvent, subevent: u64, data: *mut c_void) {
    if subevent != raw::REDISMODULE_SUBEVENT_CLIENT_CHANGE_DISCONNECTED as u64 || data.is_null() {
        return;
    }
    unsafe {
        let info = &*(data as *const raw::RedisModuleClientInfo);
        state().txs.disconnected(info.id);
    }
}

#[info_command_handler]
fn info(ctx: &InfoContext, _for_crash_report: bool) -> RedisResult<()> {
    let applied = unsafe { repl_offset() };
    let st = state();
    let now = gate::monotonic_ms();
    let remaining = st.gate.lease_remaining_ms(now);
    let deadline_unix_ms = if remaining == 0 {
        0
    } else {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0) + remaining
    };
    // A primary lags by what it applied and the journal does not hold yet;
    // a replica by what the journal holds and it has not applied.
    let (snap_seq, snap_offset, snap_created) = st.snapshot;
    let snap_age_s = if snap_seq == 0 {
        0
    } else {
        let now_unix_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        now_unix_ms.saturating_sub(snap_created) / 1000
    };
    let (durable, lag) = if st.gate.is_replica() {
        (st.journal_offset, st.journal_offset.saturating_sub(applied))
    } else {
        (st.clients.durable_offset(), applied.saturating_sub(st.clients.durable_offset()))
    };
    ctx.builder()
        .add_section("keel")
        .field("role", st.gate.role_name(now))?
        .field("lease_remaining_ms", remaining.to_string())?
        .field("lease_deadline_unix_ms", deadline_unix_ms.to_string())?
        .field("applied_offset", applied.to_string())?
        .field("lag_bytes", lag.to_string())?
        .field("leader_uuid", st.leader_uuid.clone())?
        .field("stream", st.stream.clone())?
        .field("durable_offset", durable.to_string())?
        .field("pending_replies", st.clients.held_count().to_string())?
        .field("open_transactions", st.txs.open_count().to_string())?
        .field("blocked_waiting", st.clients.waiting_count().to_string())?
        .field("released_total", st.released_total.to_string())?
        .field("timed_out_total", st.timed_out_total.to_string())?
        .field("sidecar", st.cfg.sidecar.clone())?
        .field("journal_endpoints", st.cfg.journal.clone())?
        .field("control_user", st.cfg.control_user.clone())?
        .field("control_secret_file", st.cfg.control_secret_file.clone())?
        .field("control_secret_loaded_unix_ms", st.secret_loaded_unix_ms.to_string())?
        .field("control_secret_retiring", st.secret.retiring().to_string())?
        .field("control_secret_grace_ms", secret::SECRET_GRACE_MS.to_string())?
        .field("control_secret_polls", st.secret_polls.to_string())?
        .field("control_secret_file_error", control::info_line(st.secret.refused().unwrap_or_default().as_bytes(), MAX_STALL_REASON_BYTES))?
        .field("write_timeout_ms", st.cfg.write_timeout_ms.to_string())?
        .field("snapshot_seq", snap_seq.to_string())?
        .field("snapshot_age_seconds", snap_age_s.to_string())?
        .field("snapshot_bytes_since", if snap_seq == 0 { applied } else { applied.saturating_sub(snap_offset) }.to_string())?
        .field("feed_stalled_seq", st.stalled.0.to_string())?
        .field("feed_stalled_reason", st.stalled.1.clone())?
        .build_section()?
        .build_info()?;
    Ok(())
}

type CommandFn = unsafe extern "C" fn(*mut raw::RedisModuleCtx, *mut *mut raw::RedisModuleString, c_int) -> c_int;

/// The function serving each of `KEEL_COMMANDS`.
fn handler(name: &str) -> CommandFn {
    match name {
        "keel.w" => keel_w,
        "keel.r" => keel_r,
        "keel.t" | "keel.tw" | "keel.tb" => keel_t,
        "keel.b" | "keel.br" => keel_b,
        "keel.ack" => keel_ack,
        "keel.fenced" => keel_fenced,
        "keel.leader" => keel_leader,
        "keel.lease" => keel_lease,
        "keel.nolease" => keel_nolease,
        "keel.following" => keel_following,
        "keel.snapshot" => keel_snapshot,
        "keel.stalled" => keel_stalled,
        "keel.countederror" => keel_countederror,
        "keel.guard" => keel_guard,
        other => panic!("no handler for {other}: KEEL_COMMANDS and handler() disagree"),
    }
}

fn init(ctx: &Context, args: &[RedisString]) -> Status {
    let args: Vec<String> = args.iter().map(|a| a.to_string_lossy()).collect();
    let cfg = match parse_args(&args).and_then(|mut c| c.load_secret().map(|()| c)) {
        Ok(c) => c,
        Err(e) => {
            ctx.log_warning(&e);
            return Status::Err;
        }
    };
    let raw_ctx = ctx.ctx;
    let table = load_command_table(raw_ctx);
    let replica = unsafe { raw::RedisModule_GetContextFlags.unwrap()(std::ptr::null_mut()) as u32 & raw::REDISMODULE_CTX_FLAGS_SLAVE != 0 };
    ctx.log_notice(&format!("keel: holding replies of {} write commands; {cfg:?}", table.writes.len()));
    let secret = Rotation::new(cfg.control_secret.clone());
    unsafe {
        let info = raw::RedisModule_GetServerInfo.unwrap()(raw_ctx, c"server".as_ptr());
        if !info.is_null() {
            let v = raw::RedisModule_ServerInfoGetFieldC.unwrap()(info, c"valkey_version".as_ptr());
            VALKEY.store(!v.is_null(), std::sync::atomic::Ordering::Relaxed);
            raw::RedisModule_FreeServerInfo.unwrap()(raw_ctx, info);
        }
    }
    let _ = STATE.set(Mutex::new(State {
        cfg,
        clients: HeldClients::default(),
        hazards: Hazards::default(),
        txs: Transactions::default(),
        retry_scheduled: false,
        table,
        gate: Gate::new(replica),
        leader_uuid: String::new(),
        stream: String::new(),
        journal_offset: 0,
        snapshot: (0, 0, 0),
        stalled: (0, String::new()),
        released_total: 0,
        timed_out_total: 0,
        acl_grant_pending: true,
        read_only_checked: false,
        produced_offset: 0,
        secret,
        secret_loaded_unix_ms: unix_ms(),
        secret_polls: 0,
    }));
    unsafe {
        let ok = raw::REDISMODULE_OK as c_int;
        for c in KEEL_COMMANDS {
            let (name, f) = (c.name, handler(c.name));
            let (n, fl) = (cstr(name), cstr(c.flags));
            if raw::RedisModule_CreateCommand.unwrap()(raw_ctx, n.as_ptr(), Some(f), fl.as_ptr(), 0, 0, 0) != ok {
                ctx.log_warning(&format!("keel: cannot register {name}"));
                return Status::Err;
            }
        }
        // Not NOSELF: while a script run by the module is busy, Redis serves
        // other clients from inside that call, and their MULTI/WATCH must
        // still reach the module. The module's own calls skip the filter
        // through `call`.
        raw::RedisModule_RegisterCommandFilter.unwrap()(raw_ctx, Some(filter), 0);
        raw::RedisModule_CreateTimer.unwrap()(raw_ctx, secret::SECRET_POLL_MS as i64, Some(poll_secret), std::ptr::null_mut());
        type EventFn = unsafe extern "C" fn(*mut raw::RedisModuleCtx, raw::RedisModuleEvent, u64, *mut c_void);
        let events: [(u64, EventFn, &str); 5] = [
            (raw::REDISMODULE_EVENT_EVENTLOOP, on_event_loop, "the event loop"),
            (raw::REDISMODULE_EVENT_FLUSHDB, on_flush, "flushes"),
            (raw::REDISMODULE_EVENT_SWAPDB, on_swapdb, "SWAPDB"),
            (raw::REDISMODULE_EVENT_CLIENT_CHANGE, on_client, "client changes"),
            (raw::REDISMODULE_EVENT_REPLICATION_ROLE_CHANGED, on_role_changed, "role changes"),
        ];
        for (id, f, what) in events {
            let event = raw::RedisModuleEvent { id, dataver: 1 };
            if raw::RedisModule_SubscribeToServerEvent.unwrap()(raw_ctx, event, Some(f)) != ok {
                ctx.log_warning(&format!("keel: cannot subscribe to {what}"));
                return Status::Err;
            }
        }
        if raw::RedisModule_SubscribeToKeyspaceEvents.unwrap()(raw_ctx, raw::REDISMODULE_NOTIFY_ALL as c_int, Some(on_keyspace)) != ok {
            ctx.log_warning("keel: cannot subscribe to keyspace events");
            return Status::Err;
        }
    }
    Status::Ok
}

redis_module! {
    name: "keel",
    version: 1,
    allocator: (redis_module::alloc::RedisAlloc, redis_module::alloc::RedisAlloc),
    data_types: [],
    init: init,
    commands: [],
}
