//! Blocking pops over Redis: the FFI side of `waiters.rs` (see there for the
//! life cycle). A blocking command first runs without blocking; with data,
//! its reply is held like any write's. Without, the client is blocked by the
//! module (`RM_BlockClient`, the command's own timeout) and waits on its
//! keys; a write notification on one schedules a retry on a zero-delay
//! timer, in waiting order. A pop that got data is held until durable; it
//! has a timer of `write_timeout_ms` so the journal being away cannot hang
//! it. The client leaving while it waits cancels the wait (nothing is popped
//! for a gone client).

use std::ffi::CString;
use std::os::raw::c_int;
use std::os::raw::c_void;

use redis_module::raw;

use crate::ffi::Answer;
use crate::ffi::Blocked;
use crate::ffi::acl_refusal;
use crate::ffi::call;
use crate::ffi::command_keys;
use crate::ffi::free_strings;
use crate::ffi::read_must_wait;
use crate::ffi::reply_text;
use crate::ffi::state;
use crate::ffi::string_bytes;
use crate::ffi::strings;
use crate::ffi::unblock;
use crate::reply;
use crate::waiters::WaiterId;
use crate::waiters::parse_stream_id;
use crate::waiters::source_keys;
use crate::waiters::xreadgroup_streams;
use crate::waiters::timeout_ms;
pub use crate::waiters::blocks;

/// A client waiting for its blocking command to find data.
pub struct Waiter {
    /// The command, as it is retried (XREAD's `$` already resolved).
    pub argv: Vec<Vec<u8>>,
    pub write: bool,
    /// The client speaks RESP3 (retries run outside its context).
    pub resp3: bool,
    /// What the command answers when it times out (its null, in the
    /// client's protocol).
    pub null_reply: Vec<u8>,
}

/// Whether any key the command pops from holds its type (list, sorted set
/// or stream).
unsafe fn any_source_ready(ctx: *mut raw::RedisModuleCtx, argv: &[Vec<u8>]) -> bool {
    let name = argv[0].to_ascii_lowercase();
    let want = match name.as_slice() {
        b"bzpopmin" | b"bzpopmax" | b"bzmpop" => raw::REDISMODULE_KEYTYPE_ZSET,
        b"xread" | b"xreadgroup" => raw::REDISMODULE_KEYTYPE_STREAM,
        _ => raw::REDISMODULE_KEYTYPE_LIST,
    } as c_int;
    source_keys(argv).iter().any(|k| {
        let s = raw::RedisModule_CreateString.unwrap()(ctx, k.as_ptr() as *const _, k.len());
        let key = raw::RedisModule_OpenKey.unwrap()(ctx, s, raw::REDISMODULE_READ as c_int) as *mut raw::RedisModuleKey;
        let ty = raw::RedisModule_KeyType.unwrap()(key);
        raw::RedisModule_CloseKey.unwrap()(key);
        raw::RedisModule_FreeString.unwrap()(ctx, s);
        ty == want
    })
}

/// Whether XREADGROUP answers at once, with entries or an error, rather
/// than waiting; found out without running it, so that a client that waits
/// and is then served (or refused: its group was destroyed) counts one call
/// in INFO commandstats, as in Redis. Redis 7.0's rule (t_stream.c): a
/// stream read with an id other than `>` is served from the consumer's
/// history; with `>`, when the stream's last entry is after the group's
/// last delivered id. A missing key, stream or group makes it an error.
/// The group's last delivered id comes from `XINFO GROUPS` (no module API
/// reads it), the last entry from the module stream API.
unsafe fn xreadgroup_answers_now(ctx: *mut raw::RedisModuleCtx, argv: &[Vec<u8>]) -> bool {
    let Some((group, streams)) = xreadgroup_streams(argv) else { return true };
    for (key, id) in streams {
        if id != b">" {
            return true;
        }
        let Some(delivered) = group_last_delivered(ctx, &key, &group) else { return true };
        if last_entry_id(ctx, &key).is_some_and(|last| last > delivered) {
            return true;
        }
    }
    false
}

/// The last delivered id of `group` on stream `key` (`None`: no such key,
/// stream or group).
unsafe fn group_last_delivered(ctx: *mut raw::RedisModuleCtx, key: &[u8], group: &[u8]) -> Option<(u64, u64)> {
    let q: [&[u8]; 3] = [b"XINFO", b"GROUPS", key];
    let strs = strings(ctx, &q);
    let r = call(ctx, c"XINFO", c"v", &strs[1..]);
    free_strings(ctx, strs);
    if r.is_null() {
        return None;
    }
    let mut found = None;
    if raw::RedisModule_CallReplyType.unwrap()(r) == raw::REDISMODULE_REPLY_ARRAY as c_int {
        for g in 0..raw::RedisModule_CallReplyLength.unwrap()(r) {
            // RESP2: each group is a flat array of field, value pairs.
            let fields = raw::RedisModule_CallReplyArrayElement.unwrap()(r, g);
            let n = raw::RedisModule_CallReplyLength.unwrap()(fields);
            let (mut name, mut delivered) = (None, None);
            for f in (0..n.saturating_sub(1)).step_by(2) {
                let v = raw::RedisModule_CallReplyArrayElement.unwrap()(fields, f + 1);
                match reply_text(raw::RedisModule_CallReplyArrayElement.unwrap()(fields, f)).as_deref() {
                    Some(b"name") => name = reply_text(v),
                    Some(b"last-delivered-id") => delivered = reply_text(v),
                    _ => {}
                }
            }
            if name.as_deref() == Some(group) {
                found = delivered.as_deref().and_then(parse_stream_id);
                break;
            }
        }
    }
    raw::RedisModule_FreeCallReply.unwrap()(r);
    found
}

/// The id of the last entry of stream `key` (`None`: not a stream, or empty).
unsafe fn last_entry_id(ctx: *mut raw::RedisModuleCtx, key: &[u8]) -> Option<(u64, u64)> {
    let s = raw::RedisModule_CreateString.unwrap()(ctx, key.as_ptr() as *const _, key.len());
    let k = raw::RedisModule_OpenKey.unwrap()(ctx, s, raw::REDISMODULE_READ as c_int) as *mut raw::RedisModuleKey;
    let mut last = None;
    if raw::RedisModule_KeyType.unwrap()(k) == raw::REDISMODULE_KEYTYPE_STREAM as c_int
        && raw::RedisModule_StreamIteratorStart.unwrap()(
            k,
            raw::REDISMODULE_STREAM_ITERATOR_REVERSE as c_int,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        ) == raw::REDISMODULE_OK as c_int
    {
        let mut id = raw::RedisModuleStreamID { ms: 0, seq: 0 };
        let mut fields: std::os::raw::c_long = 0;
        if raw::RedisModule_StreamIteratorNextID.unwrap()(k, &mut id, &mut fields) == raw::REDISMODULE_OK as c_int {
            last = Some((id.ms, id.seq));
        }
        raw::RedisModule_StreamIteratorStop.unwrap()(k);
    }
    raw::RedisModule_CloseKey.unwrap()(k);
    raw::RedisModule_FreeString.unwrap()(ctx, s);
    last
}

/// Runs `argv` without blocking: `Err(null reply)` if it found nothing,
/// `Ok(reply)` otherwise. `as_client`: in the client's command (its ACL
/// user is checked); retries run from a timer, which has no user: the
/// same command already passed the check when it first ran.
/// `resp3` (retries only): the waiting client speaks RESP3.
unsafe fn try_once(
    ctx: *mut raw::RedisModuleCtx,
    argv: &[Vec<u8>],
    write: bool,
    as_client: bool,
    resp3: bool,
) -> Result<Vec<u8>, Vec<u8>> {
    let strs = strings(ctx, argv);
    let cmd = CString::new(argv[0].clone()).unwrap_or_default();
    let fmt = match (write, as_client, resp3) {
        (true, true, _) => c"v!0ECM",
        (true, false, false) => c"v!EM",
        (true, false, true) => c"v!3EM",
        (false, true, _) => c"v0EC",
        (false, false, false) => c"vE",
        (false, false, true) => c"v3E",
    };
    let r = call(ctx, &cmd, fmt, &strs[1..]);
    if r.is_null() {
        free_strings(ctx, strs);
        return Ok(reply::error("ERR command could not be run"));
    }
    let refusal = acl_refusal(ctx, r, &strs);
    free_strings(ctx, strs);
    if let Some(e) = refusal {
        raw::RedisModule_FreeCallReply.unwrap()(r);
        return Ok(reply::error(&e));
    }
    let empty = raw::RedisModule_CallReplyType.unwrap()(r) == raw::REDISMODULE_REPLY_NULL as c_int;
    let bytes = reply::copy(r);
    raw::RedisModule_FreeCallReply.unwrap()(r);
    if empty { Err(bytes) } else { Ok(bytes) }
}

/// XREAD's `$` means "entries after the last one now": fixed to that id
/// before waiting, since the command is retried later.
unsafe fn resolve_dollar(ctx: *mut raw::RedisModuleCtx, mut argv: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    if !argv[0].eq_ignore_ascii_case(b"xread") {
        return argv;
    }
    let Some(s) = argv.iter().position(|a| a.eq_ignore_ascii_case(b"streams")) else { return argv };
    let n = (argv.len() - s - 1) / 2;
    for i in 0..n {
        if argv[s + 1 + n + i] != b"$" {
            continue;
        }
        let (ms, seq) = last_entry_id(ctx, &argv[s + 1 + i]).unwrap_or((0, 0));
        argv[s + 1 + n + i] = format!("{ms}-{seq}").into_bytes();
    }
    argv
}

/// `KEEL.B CMD args…` (and blocking commands routed through KEEL.T).
pub unsafe fn blocking_pop(ctx: *mut raw::RedisModuleCtx, args: &[*mut raw::RedisModuleString]) -> c_int {
    let argv: Vec<Vec<u8>> = args.iter().map(|a| string_bytes(*a).to_vec()).collect();
    let name = argv[0].to_ascii_lowercase();
    let write = state().is_write(&name, argv.get(1).map(|a| a.as_slice()));
    let flags = raw::RedisModule_GetContextFlags.unwrap()(ctx) as u32;
    if flags & (raw::REDISMODULE_CTX_FLAGS_MULTI | raw::REDISMODULE_CTX_FLAGS_LUA) != 0 {
        // In a script blocking commands never block (as in Redis).
        return crate::ffi::run_and_hold(ctx, args, write);
    }
    {
        let st = state();
        if st.gate.is_fenced() {
            return crate::ffi::reply_error(ctx, "KEEL_FENCED this node is no longer the primary; it serves nothing");
        }
        if st.clients.held_count() + st.clients.waiting_count() >= st.cfg.max_held_replies {
            return crate::ffi::reply_error(ctx, "KEEL_BUSY too many replies are awaiting durability; nothing was done, retry");
        }
    }
    let argv = resolve_dollar(ctx, argv);
    let resp3 = flags & raw::REDISMODULE_CTX_FLAGS_RESP3 != 0;
    let first = if name == b"xreadgroup" && !xreadgroup_answers_now(ctx, &argv) {
        // It would wait: checked as the client's user, not run.
        if let Err(e) = crate::ffi::acl_check_queued(ctx, args) {
            return crate::ffi::reply_error(ctx, &e);
        }
        Err(if resp3 { b"_\r\n".to_vec() } else { b"*-1\r\n".to_vec() })
    } else {
        try_once(ctx, &argv, write, true, false)
    };
    match first {
        Ok(bytes) => {
            // It found data (or failed): held like a write, or a read of
            // data not durable yet.
            if write {
                state().hazards.write(command_keys(args).unwrap_or_default());
            } else if !read_must_wait(&name, args) {
                return reply::send(ctx, &bytes);
            }
            crate::ffi::block_with(ctx, bytes)
        }
        Err(null_reply) => {
            let keys = source_keys(&argv);
            let db = raw::RedisModule_GetSelectedDb.unwrap()(ctx);
            let timeout = timeout_ms(&name, &argv);
            let bc = raw::RedisModule_BlockClient.unwrap()(
                ctx,
                Some(crate::ffi::on_unblock),
                Some(crate::ffi::on_timeout),
                Some(crate::ffi::free_answer),
                timeout,
            );
            raw::RedisModule_SetDisconnectCallback.unwrap()(bc, Some(on_disconnect));
            state().clients.wait(Blocked(bc), Waiter { argv, write, resp3, null_reply }, db, keys);
            raw::REDISMODULE_OK as c_int
        }
    }
}

/// A key was written (from the keyspace notification, state locked by the
/// caller): wake its waiters soon.
pub unsafe fn key_written(ctx: *mut raw::RedisModuleCtx, st: &mut crate::ffi::State, db: i32, key: &[u8]) {
    if st.clients.key_written(db, key) {
        schedule_retry(ctx, st);
    }
}

/// A whole database changed (flush, swap; `None`: all of them).
pub unsafe fn db_changed(ctx: *mut raw::RedisModuleCtx, st: &mut crate::ffi::State, db: Option<i32>) {
    if st.clients.db_changed(db) {
        schedule_retry(ctx, st);
    }
}

unsafe fn schedule_retry(ctx: *mut raw::RedisModuleCtx, st: &mut crate::ffi::State) {
    if !st.retry_scheduled {
        st.retry_scheduled = true;
        raw::RedisModule_CreateTimer.unwrap()(ctx, 0, Some(retry), std::ptr::null_mut());
    }
}

/// Retries the waiters of ready keys, oldest first.
extern "C" fn retry(ctx: *mut raw::RedisModuleCtx, _data: *mut c_void) {
    unsafe {
        let ids = {
            let mut st = state();
            st.retry_scheduled = false;
            st.clients.take_ready()
        };
        for id in ids {
            let (bc, argv, write, resp3, db) = {
                let st = state();
                let Some((bc, w, db)) = st.clients.waiting(id) else { continue };
                (bc, w.argv.clone(), w.write, w.resp3, db)
            };
            raw::RedisModule_SelectDb.unwrap()(ctx, db);
            // No waited key holds the right type (it was deleted, or set to
            // another type): Redis keeps such a client waiting too.
            if !any_source_ready(ctx, &argv) {
                if argv[0].eq_ignore_ascii_case(b"xreadgroup") {
                    // A consumer group vanished with its stream: Redis
                    // answers such a waiter with an error.
                    state().clients.stop_waiting(bc);
                    unblock(bc, Answer::Error("UNBLOCKED the stream key no longer exists".into()));
                }
                continue;
            }
            if argv[0].eq_ignore_ascii_case(b"xreadgroup") && !xreadgroup_answers_now(ctx, &argv) {
                continue;
            }
            let Ok(bytes) = try_once(ctx, &argv, write, false, resp3) else { continue };
            let strs = strings(ctx, &argv);
            let name = argv[0].to_ascii_lowercase();
            let hold = write || read_must_wait(&name, &strs);
            if write {
                state().hazards.write(command_keys(&strs).unwrap_or_default());
            }
            free_strings(ctx, strs);
            if !hold {
                state().clients.stop_waiting(bc);
                unblock(bc, Answer::Reply(bytes));
                continue;
            }
            // The pop is done: its reply may wait for the journal only so long.
            let (id, ms) = {
                let mut st = state();
                (st.clients.popped(bc, Answer::Reply(bytes)), st.cfg.write_timeout_ms)
            };
            raw::RedisModule_CreateTimer.unwrap()(ctx, ms, Some(popped_timeout), id as usize as *mut c_void);
        }
    }
}

/// A popped reply still not durable after `write_timeout_ms`.
extern "C" fn popped_timeout(_ctx: *mut raw::RedisModuleCtx, data: *mut c_void) {
    let id = data as usize as WaiterId;
    let bc = {
        let mut st = state();
        let Some(bc) = st.clients.popped_timed_out(id) else { return };
        st.timed_out_total += 1;
        bc
    };
    unblock(bc, Answer::Error(crate::ffi::unconfirmed_message()));
}

/// The client left while waiting: stop waiting (nothing will be popped).
extern "C" fn on_disconnect(_ctx: *mut raw::RedisModuleCtx, bc: *mut raw::RedisModuleBlockedClient) {
    let waited = state().clients.stop_waiting(Blocked(bc)).is_some();
    if waited {
        unsafe {
            raw::RedisModule_UnblockClient.unwrap()(bc, std::ptr::null_mut());
        }
    }
}
