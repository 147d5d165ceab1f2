//! The FFI layer: command filter, `KEEL.W`, `KEEL.ACK`, `KEEL.FENCED`, the
//! beforeSleep hook and `INFO keel`. Every decision is `Holds`'s.

use std::collections::HashSet;
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

use crate::config::Config;
use crate::config::parse_args;
use crate::hazards::Hazards;
use crate::holds::Holds;
use crate::reply::Value;

/// A blocked client, by its Redis handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Blocked(*mut raw::RedisModuleBlockedClient);
// Only touched on Redis's main thread, under the module lock.
unsafe impl Send for Blocked {}

struct State {
    cfg: Config,
    holds: Holds<Blocked>,
    hazards: Hazards,
    /// Command names (and `container|sub`) whose replies are held.
    writes: HashSet<Vec<u8>>,
    fenced: bool,
    released_total: u64,
    timed_out_total: u64,
}

static STATE: OnceLock<Mutex<State>> = OnceLock::new();

fn state() -> std::sync::MutexGuard<'static, State> {
    STATE.get().expect("keel module initialised").lock().unwrap()
}

/// What an unblocked client is answered with.
enum Answer {
    Reply(Value),
    Error(String),
}

fn cstr(s: &str) -> CString {
    CString::new(s).expect("no NUL in module strings")
}

unsafe fn string_bytes<'a>(s: *const raw::RedisModuleString) -> &'a [u8] {
    let mut len = 0usize;
    let p = raw::RedisModule_StringPtrLen.unwrap()(s, &mut len);
    std::slice::from_raw_parts(p as *const u8, len)
}

/// Commands run natively even though they write: they block, or are handled
/// elsewhere (open work, see the file's doc).
const NEVER_WRAPPED: &[&str] = &[
    "multi", "exec", "discard", "watch", "unwatch", "blpop", "brpop", "blmove", "brpoplpush", "blmpop", "bzpopmin",
    "bzpopmax", "bzmpop", "xread", "xreadgroup", "wait", "keel.w", "keel.r", "keel.ack", "keel.fenced",
];
/// Script and function calls: their effects replicate, so their replies are held.
const SCRIPT_CALLS: &[&str] = &["eval", "evalsha", "fcall"];

/// Reads `COMMAND` once at load: every command flagged `write` (and
/// subcommands, as `container|sub`) gets its reply held.
fn load_write_commands(ctx: *mut raw::RedisModuleCtx) -> HashSet<Vec<u8>> {
    let mut out: HashSet<Vec<u8>> = SCRIPT_CALLS.iter().map(|s| s.as_bytes().to_vec()).collect();
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
    for n in NEVER_WRAPPED {
        out.remove(n.as_bytes());
    }
    out
}

unsafe fn reply_str(r: *mut raw::RedisModuleCallReply) -> Vec<u8> {
    let mut len = 0usize;
    let p = raw::RedisModule_CallReplyStringPtr.unwrap()(r, &mut len);
    if p.is_null() {
        return Vec::new();
    }
    std::slice::from_raw_parts(p as *const u8, len).to_ascii_lowercase()
}

unsafe fn collect_command(cmd: *mut raw::RedisModuleCallReply, parent: Option<&[u8]>, out: &mut HashSet<Vec<u8>>) {
    if cmd.is_null() || raw::RedisModule_CallReplyLength.unwrap()(cmd) < 3 {
        return;
    }
    let name = reply_str(raw::RedisModule_CallReplyArrayElement.unwrap()(cmd, 0));
    let flags = raw::RedisModule_CallReplyArrayElement.unwrap()(cmd, 2);
    let mut is_write = false;
    for j in 0..raw::RedisModule_CallReplyLength.unwrap()(flags) {
        let f = reply_str(raw::RedisModule_CallReplyArrayElement.unwrap()(flags, j));
        if f == b"write" || f == b"may_replicate" {
            is_write = true;
        }
    }
    // Subcommand names come as "container|sub" already.
    let _ = parent;
    if is_write {
        out.insert(name.clone());
    }
    // Element 9 (Redis 7): subcommands.
    if raw::RedisModule_CallReplyLength.unwrap()(cmd) > 9 {
        let subs = raw::RedisModule_CallReplyArrayElement.unwrap()(cmd, 9);
        for k in 0..raw::RedisModule_CallReplyLength.unwrap()(subs) {
            collect_command(raw::RedisModule_CallReplyArrayElement.unwrap()(subs, k), Some(&name), out);
        }
    }
}

/// Command filter: prefixes write commands with `KEEL.W`.
extern "C" fn filter(fctx: *mut raw::RedisModuleCommandFilterCtx) {
    unsafe {
        let argc = raw::RedisModule_CommandFilterArgsCount.unwrap()(fctx);
        if argc < 1 {
            return;
        }
        let name = string_bytes(raw::RedisModule_CommandFilterArgGet.unwrap()(fctx, 0));
        let mut lower = [0u8; 64];
        if name.len() > lower.len() {
            return;
        }
        for (i, b) in name.iter().enumerate() {
            lower[i] = b.to_ascii_lowercase();
        }
        let name = &lower[..name.len()];
        let wrap = {
            let st = state();
            if st.writes.contains(name) {
                true
            } else if argc > 1 {
                let sub = string_bytes(raw::RedisModule_CommandFilterArgGet.unwrap()(fctx, 1));
                let mut full = name.to_vec();
                full.push(b'|');
                full.extend(sub.iter().map(|b| b.to_ascii_lowercase()));
                st.writes.contains(&full)
            } else {
                false
            }
        };
        if wrap {
            let w = raw::RedisModule_CreateString.unwrap()(std::ptr::null_mut(), c"KEEL.W".as_ptr(), 6);
            raw::RedisModule_CommandFilterArgInsert.unwrap()(fctx, 0, w);
            return;
        }
        // A read: held only if it touches data that is not durable yet.
        // Commands that must run natively (blocking pops, MULTI…) are never
        // rewritten.
        if state().hazards.is_empty() || NEVER_WRAPPED.iter().any(|n| n.as_bytes() == name) {
            return;
        }
        let argv: Vec<*mut raw::RedisModuleString> =
            (0..argc).map(|i| raw::RedisModule_CommandFilterArgGet.unwrap()(fctx, i)).collect();
        let wait = match command_keys(&argv) {
            Some(keys) if keys.is_empty() => KEYLESS_READS.iter().any(|r| r.as_bytes() == name),
            Some(keys) => {
                let refs: Vec<&[u8]> = keys.iter().map(|k| k.as_slice()).collect();
                state().hazards.must_wait(&refs)
            }
            None => false,
        };
        if wait {
            let r = raw::RedisModule_CreateString.unwrap()(std::ptr::null_mut(), c"KEEL.R".as_ptr(), 6);
            raw::RedisModule_CommandFilterArgInsert.unwrap()(fctx, 0, r);
        }
    }
}

/// Reads without key arguments that still show the dataset: held while any
/// write is pending.
const KEYLESS_READS: &[&str] = &["keys", "scan", "dbsize", "randomkey"];

/// The key arguments of a command (`None`: unknown command or bad arity).
unsafe fn command_keys(argv: &[*mut raw::RedisModuleString]) -> Option<Vec<Vec<u8>>> {
    let mut num: c_int = 0;
    let mut argv = argv.to_vec();
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
extern "C" fn on_unblock(ctx: *mut raw::RedisModuleCtx, _argv: *mut *mut raw::RedisModuleString, _argc: c_int) -> c_int {
    unsafe {
        let answer = raw::RedisModule_GetBlockedClientPrivateData.unwrap()(ctx) as *mut Answer;
        if answer.is_null() {
            return raw::RedisModule_ReplyWithError.unwrap()(ctx, c"KEEL_UNKNOWN internal error: no answer".as_ptr());
        }
        match &*answer {
            Answer::Reply(v) => v.reply(ctx),
            Answer::Error(e) => {
                let e = cstr(e);
                raw::RedisModule_ReplyWithError.unwrap()(ctx, e.as_ptr())
            }
        }
    }
}

extern "C" fn on_timeout(ctx: *mut raw::RedisModuleCtx, _argv: *mut *mut raw::RedisModuleString, _argc: c_int) -> c_int {
    unsafe {
        let bc = raw::RedisModule_GetBlockedClientHandle.unwrap()(ctx);
        let ms = {
            let mut st = state();
            st.holds.remove(&Blocked(bc));
            st.timed_out_total += 1;
            st.cfg.write_timeout_ms
        };
        forget(Blocked(bc));
        // Redis frees a timed-out module-blocked client only once the module
        // unblocks it; its reply callback is then skipped.
        raw::RedisModule_UnblockClient.unwrap()(bc, std::ptr::null_mut());
        let msg = cstr(&format!(
            "KEEL_UNCONFIRMED the journal did not confirm within {ms} ms the write this reply depends on; \
             that write is applied in memory and may or may not be durable"
        ));
        raw::RedisModule_ReplyWithError.unwrap()(ctx, msg.as_ptr())
    }
}

extern "C" fn free_answer(_ctx: *mut raw::RedisModuleCtx, privdata: *mut c_void) {
    if privdata.is_null() {
        return;
    }
    unsafe {
        drop(Box::from_raw(privdata as *mut Answer));
    }
}

fn unblock(bc: Blocked, answer: Answer) {
    unsafe {
        raw::RedisModule_UnblockClient.unwrap()(bc.0, Box::into_raw(Box::new(answer)) as *mut c_void);
    }
}

/// `KEEL.W CMD args…`: runs CMD for the calling client and holds its reply.
extern "C" fn keel_w(ctx: *mut raw::RedisModuleCtx, argv: *mut *mut raw::RedisModuleString, argc: c_int) -> c_int {
    run_and_hold(ctx, argv, argc, true)
}

/// `KEEL.R CMD args…`: a read of data not yet durable; runs now, its reply
/// is held until the end of this turn is durable.
extern "C" fn keel_r(ctx: *mut raw::RedisModuleCtx, argv: *mut *mut raw::RedisModuleString, argc: c_int) -> c_int {
    run_and_hold(ctx, argv, argc, false)
}

fn run_and_hold(ctx: *mut raw::RedisModuleCtx, argv: *mut *mut raw::RedisModuleString, argc: c_int, write: bool) -> c_int {
    unsafe {
        if argc < 2 {
            return raw::RedisModule_WrongArity.unwrap()(ctx);
        }
        let flags = raw::RedisModule_GetContextFlags.unwrap()(ctx) as u32;
        let in_multi_or_script =
            flags & (raw::REDISMODULE_CTX_FLAGS_MULTI | raw::REDISMODULE_CTX_FLAGS_LUA) != 0;
        {
            let st = state();
            if st.fenced {
                return raw::RedisModule_ReplyWithError.unwrap()(
                    ctx,
                    c"KEEL_FENCED this node is no longer the primary; it serves nothing".as_ptr(),
                );
            }
            if !in_multi_or_script && st.holds.len() >= st.cfg.max_held_replies {
                return raw::RedisModule_ReplyWithError.unwrap()(
                    ctx,
                    c"KEEL_BUSY too many replies are awaiting durability; nothing was done, retry".as_ptr(),
                );
            }
        }
        let cmd = string_bytes(*argv.add(1));
        let cmd = CString::new(cmd).unwrap_or_default();
        // v: argv vector; !: replicate; 0: the client's protocol; E: errors as
        // replies; C: ACL checks as the client's user; M: refuse on OOM.
        let fmt = if write { c"v!0ECM" } else { c"v0EC" };
        let reply = raw::RedisModule_Call.unwrap()(ctx, cmd.as_ptr(), fmt.as_ptr(), argv.add(2), (argc - 2) as usize);
        if reply.is_null() {
            return raw::RedisModule_ReplyWithError.unwrap()(ctx, c"ERR command could not be run".as_ptr());
        }
        if in_multi_or_script {
            // Cannot block here (open work: MULTI is not yet held).
            let r = raw::RedisModule_ReplyWithCallReply.unwrap()(ctx, reply);
            raw::RedisModule_FreeCallReply.unwrap()(reply);
            return r;
        }
        if write {
            let args = std::slice::from_raw_parts(argv.add(1), (argc - 1) as usize);
            let keys = command_keys(args).unwrap_or_default();
            state().hazards.write(keys);
        }
        let timeout = state().cfg.write_timeout_ms;
        let bc = raw::RedisModule_BlockClient.unwrap()(ctx, Some(on_unblock), Some(on_timeout), Some(free_answer), timeout);
        // Keep a copy of the reply until the client is released.
        let answer = Box::into_raw(Box::new(Answer::Reply(Value::copy(reply))));
        raw::RedisModule_FreeCallReply.unwrap()(reply);
        PENDING_ANSWERS.with(|p| p.borrow_mut().push((Blocked(bc), answer)));
        state().holds.hold(Blocked(bc));
        raw::REDISMODULE_OK as c_int
    }
}

thread_local! {
    /// Replies of held clients, by blocked-client handle (main thread only).
    static PENDING_ANSWERS: std::cell::RefCell<Vec<(Blocked, *mut Answer)>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn take_answer(bc: Blocked) -> Option<Box<Answer>> {
    PENDING_ANSWERS.with(|p| {
        let mut p = p.borrow_mut();
        let i = p.iter().position(|(b, _)| *b == bc)?;
        let (_, a) = p.swap_remove(i);
        Some(unsafe { Box::from_raw(a) })
    })
}

/// Sends the kept replies of durable clients.
fn release(clients: Vec<Blocked>) {
    state().released_total += clients.len() as u64;
    for bc in clients {
        match take_answer(bc) {
            Some(a) => unblock(bc, *a),
            None => unblock(bc, Answer::Error("KEEL_UNKNOWN internal error: reply lost".into())),
        }
    }
}

/// Drops the kept reply of a client answered otherwise (timeout, fencing).
fn forget(bc: Blocked) {
    drop(take_answer(bc));
}

/// `KEEL.ACK <offset>`: the journal holds the replication stream up to offset.
extern "C" fn keel_ack(ctx: *mut raw::RedisModuleCtx, argv: *mut *mut raw::RedisModuleString, argc: c_int) -> c_int {
    unsafe {
        if argc != 2 {
            return raw::RedisModule_WrongArity.unwrap()(ctx);
        }
        let mut off: i64 = 0;
        if raw::RedisModule_StringToLongLong.unwrap()(*argv.add(1), &mut off) != raw::REDISMODULE_OK as c_int || off < 0 {
            return raw::RedisModule_ReplyWithError.unwrap()(ctx, c"ERR offset must be a non-negative integer".as_ptr());
        }
        state().hazards.durable(off as u64);
        let released = state().holds.durable(off as u64);
        let n = released.len();
        release(released);
        raw::RedisModule_ReplyWithLongLong.unwrap()(ctx, n as i64)
    }
}

/// `KEEL.FENCED <reason>`: the journal refused this node; fail every held write.
extern "C" fn keel_fenced(ctx: *mut raw::RedisModuleCtx, argv: *mut *mut raw::RedisModuleString, argc: c_int) -> c_int {
    unsafe {
        let reason = if argc > 1 { String::from_utf8_lossy(string_bytes(*argv.add(1))).into_owned() } else { String::new() };
        let failed = {
            let mut st = state();
            st.fenced = true;
            st.hazards.clear();
            st.holds.fail_all()
        };
        for bc in failed {
            forget(bc);
            unblock(bc, Answer::Error(format!("KEEL_FENCED this node lost the primary role before the write was durable ({reason}); it may or may not survive")));
        }
        raw::RedisModule_ReplyWithSimpleString.unwrap()(ctx, c"OK".as_ptr())
    }
}

/// beforeSleep: the turn's effects are propagated; fix their target offset.
extern "C" fn on_event_loop(ctx: *mut raw::RedisModuleCtx, _eid: raw::RedisModuleEvent, subevent: u64, _data: *mut c_void) {
    if subevent != 0 {
        return; // only BEFORE_SLEEP
    }
    if !state().holds.turn_has_writes() {
        return;
    }
    let offset = unsafe { master_repl_offset(ctx) };
    if offset != u64::MAX {
        state().hazards.end_turn(offset);
    }
    let released = state().holds.end_turn(offset);
    release(released);
}

/// The replication offset covering everything propagated so far, or
/// `u64::MAX` when Redis keeps no replication backlog (no sidecar has ever
/// attached, or it left long ago): then writes are in no stream, and their
/// replies must wait (and time out) rather than be released.
unsafe fn master_repl_offset(ctx: *mut raw::RedisModuleCtx) -> u64 {
    let info = raw::RedisModule_GetServerInfo.unwrap()(ctx, c"replication".as_ptr());
    let mut err: c_int = 0;
    let active = raw::RedisModule_ServerInfoGetFieldUnsigned.unwrap()(info, c"repl_backlog_active".as_ptr(), &mut err);
    let v = raw::RedisModule_ServerInfoGetFieldUnsigned.unwrap()(info, c"master_repl_offset".as_ptr(), &mut err);
    raw::RedisModule_FreeServerInfo.unwrap()(ctx, info);
    if active == 0 || err != 0 {
        u64::MAX
    } else {
        v
    }
}

#[info_command_handler]
fn info(ctx: &InfoContext, _for_crash_report: bool) -> RedisResult<()> {
    let st = state();
    ctx.builder()
        .add_section("keel")
        .field("role", if st.fenced { "fenced" } else { "primary" })?
        .field("durable_offset", st.holds.durable_offset().to_string())?
        .field("pending_replies", st.holds.len().to_string())?
        .field("released_total", st.released_total.to_string())?
        .field("timed_out_total", st.timed_out_total.to_string())?
        .field("sidecar", st.cfg.sidecar.clone())?
        .field("journal_endpoints", st.cfg.journal.clone())?
        .field("write_timeout_ms", st.cfg.write_timeout_ms.to_string())?
        .build_section()?
        .build_info()?;
    Ok(())
}

fn init(ctx: &Context, args: &[RedisString]) -> Status {
    let args: Vec<String> = args.iter().map(|a| a.to_string_lossy()).collect();
    let cfg = match parse_args(&args) {
        Ok(c) => c,
        Err(e) => {
            ctx.log_warning(&e);
            return Status::Err;
        }
    };
    let raw_ctx = ctx.ctx;
    let writes = load_write_commands(raw_ctx);
    ctx.log_notice(&format!("keel: holding replies of {} write commands; {cfg:?}", writes.len()));
    let _ = STATE.set(Mutex::new(State {
        cfg,
        holds: Holds::default(),
        hazards: Hazards::default(),
        writes,
        fenced: false,
        released_total: 0,
        timed_out_total: 0,
    }));
    unsafe {
        let ok = raw::REDISMODULE_OK as c_int;
        type CmdFn = unsafe extern "C" fn(*mut raw::RedisModuleCtx, *mut *mut raw::RedisModuleString, c_int) -> c_int;
        let commands: [(&str, CmdFn, &str); 4] = [
            ("keel.w", keel_w, "write deny-oom"),
            ("keel.r", keel_r, "readonly"),
            ("keel.ack", keel_ack, "admin fast no-monitor"),
            ("keel.fenced", keel_fenced, "admin no-monitor"),
        ];
        for (name, f, flags) in commands {
            let (n, fl) = (cstr(name), cstr(flags));
            if raw::RedisModule_CreateCommand.unwrap()(raw_ctx, n.as_ptr(), Some(f), fl.as_ptr(), 0, 0, 0) != ok {
                ctx.log_warning(&format!("keel: cannot register {name}"));
                return Status::Err;
            }
        }
        raw::RedisModule_RegisterCommandFilter.unwrap()(raw_ctx, Some(filter), raw::REDISMODULE_CMDFILTER_NOSELF as c_int);
        let event = raw::RedisModuleEvent { id: raw::REDISMODULE_EVENT_EVENTLOOP as u64, dataver: 1 };
        if raw::RedisModule_SubscribeToServerEvent.unwrap()(raw_ctx, event, Some(on_event_loop)) != ok {
            ctx.log_warning("keel: cannot subscribe to the event loop");
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
