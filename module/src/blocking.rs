//! Blocking pops over Redis: the Redis side of `waiters.rs` (see there for
//! the life cycle; each client's record is `clients.rs`'s). A blocking
//! command first runs without blocking; with data, its reply is held like
//! any write's. Without, the client is blocked by the module (its command's
//! own timeout) and waits on its keys; a write notification on one
//! schedules a retry on a zero-delay timer, in waiting order. A pop that got
//! data is held until durable; it has a timer of `write_timeout_ms` so the
//! journal being away cannot hang it. The client leaving while it waits
//! cancels the wait (nothing is popped for a gone client).

use crate::grants;
use crate::hold;
use crate::redis::Arg;
use crate::redis::Args;
use crate::redis::Ctx;
use crate::redis::FLAG_RESP3;
use crate::redis::KEYTYPE_LIST;
use crate::redis::KEYTYPE_STREAM;
use crate::redis::KEYTYPE_ZSET;
use crate::redis::OK;
use crate::redis::ReplyKind;
use crate::redis::Status;
use crate::redis::TimerJob;
use crate::redis::command_name;
use crate::redis::keys_of;
use crate::reply;
use crate::state::Answer;
use crate::state::State;
use crate::state::Waiter;
use crate::state::state;
use crate::waiters::WaiterId;
use crate::waiters::parse_stream_id;
use crate::waiters::source_keys;
use crate::waiters::timeout_ms;
use crate::waiters::xreadgroup_streams;
use crate::run;
pub use crate::waiters::blocks;

/// Whether any key the command pops from holds its type (list, sorted set
/// or stream).
fn any_source_ready(ctx: Ctx, argv: &[Vec<u8>]) -> bool {
    let name = argv[0].to_ascii_lowercase();
    let want = match name.as_slice() {
        b"bzpopmin" | b"bzpopmax" | b"bzmpop" => KEYTYPE_ZSET,
        b"xread" | b"xreadgroup" => KEYTYPE_STREAM,
        _ => KEYTYPE_LIST,
    };
    source_keys(argv).iter().any(|k| ctx.key_type(k) == want)
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
fn xreadgroup_answers_now(ctx: Ctx, argv: &[Vec<u8>]) -> bool {
    let Some((group, streams)) = xreadgroup_streams(argv) else { return true };
    for (key, id) in streams {
        if id != b">" {
            return true;
        }
        let Some(delivered) = group_last_delivered(ctx, &key, &group) else { return true };
        if ctx.last_stream_entry(&key).is_some_and(|last| last > delivered) {
            return true;
        }
    }
    false
}

/// The last delivered id of `group` on stream `key` (`None`: no such key,
/// stream or group).
fn group_last_delivered(ctx: Ctx, key: &[u8], group: &[u8]) -> Option<(u64, u64)> {
    let r = ctx.call_bytes(c"XINFO", &[b"GROUPS", key])?;
    let r = r.get();
    if r.kind() != ReplyKind::Array {
        return None;
    }
    for g in 0..r.len() {
        // RESP2: each group is a flat array of field, value pairs.
        let Some(fields) = r.elem(g) else { continue };
        let n = fields.len();
        let (mut name, mut delivered) = (None, None);
        for f in (0..n.saturating_sub(1)).step_by(2) {
            let v = fields.elem(f + 1);
            match fields.elem(f).and_then(|f| f.text()).as_deref() {
                Some(b"name") => name = v.and_then(|v| v.text()),
                Some(b"last-delivered-id") => delivered = v.and_then(|v| v.text()),
                _ => {}
            }
        }
        if name.as_deref() == Some(group) {
            return delivered.as_deref().and_then(parse_stream_id);
        }
    }
    None
}

/// Runs `argv` without blocking: `Err(null reply)` if it found nothing,
/// `Ok(reply)` otherwise. `as_client`: in the client's command (its ACL
/// user is checked); retries run from a timer, which has no user: the
/// same command already passed the check when it first ran.
/// `resp3` (retries only): the waiting client speaks RESP3.
fn try_once(ctx: Ctx, argv: &[Vec<u8>], write: bool, as_client: bool, resp3: bool) -> Result<Vec<u8>, Vec<u8>> {
    let strs = Args::new(ctx, argv);
    let cmd = command_name(&argv[0]);
    let fmt = match (write, as_client, resp3) {
        (true, true, _) => c"v!0ECM",
        (true, false, false) => c"v!EM",
        (true, false, true) => c"v!3EM",
        (false, true, _) => c"v0EC",
        (false, false, false) => c"vE",
        (false, false, true) => c"v3E",
    };
    let Some(r) = ctx.call(&cmd, fmt, &strs[1..]) else {
        return Ok(reply::error("ERR command could not be run"));
    };
    if let Some(e) = grants::acl_refusal(ctx, &r, &strs) {
        return Ok(reply::error(&e));
    }
    let empty = r.get().kind() == ReplyKind::Null;
    let bytes = r.get().proto();
    if empty { Err(bytes) } else { Ok(bytes) }
}

/// XREAD's `$` means "entries after the last one now": fixed to that id
/// before waiting, since the command is retried later.
fn resolve_dollar(ctx: Ctx, mut argv: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    if !argv[0].eq_ignore_ascii_case(b"xread") {
        return argv;
    }
    let Some(s) = argv.iter().position(|a| a.eq_ignore_ascii_case(b"streams")) else { return argv };
    let n = (argv.len() - s - 1) / 2;
    for i in 0..n {
        if argv[s + 1 + n + i] != b"$" {
            continue;
        }
        let (ms, seq) = ctx.last_stream_entry(&argv[s + 1 + i]).unwrap_or((0, 0));
        argv[s + 1 + n + i] = format!("{ms}-{seq}").into_bytes();
    }
    argv
}

/// `KEEL.B CMD args…` (and blocking commands routed through KEEL.T).
pub fn blocking_pop(ctx: Ctx, args: &[Arg]) -> Status {
    let argv: Vec<Vec<u8>> = args.iter().map(|a| a.bytes().to_vec()).collect();
    let name = argv[0].to_ascii_lowercase();
    let write = state().is_write(&name, argv.get(1).map(|a| a.as_slice()));
    if ctx.in_multi_or_script() {
        // In a script blocking commands never block (as in Redis).
        return run::run_and_hold(ctx, args, write);
    }
    {
        let st = state();
        if st.gate.is_fenced() {
            return ctx.reply_error("KEEL_FENCED this node is no longer the primary; it serves nothing");
        }
        if st.clients.held_count() + st.clients.waiting_count() >= st.cfg.max_held_replies {
            return ctx.reply_error("KEEL_BUSY too many replies are awaiting durability; nothing was done, retry");
        }
    }
    let argv = resolve_dollar(ctx, argv);
    let resp3 = ctx.flags() & FLAG_RESP3 != 0;
    let first = if name == b"xreadgroup" && !xreadgroup_answers_now(ctx, &argv) {
        // It would wait: checked as the client's user, not run.
        if let Err(e) = grants::acl_check_queued(ctx, args) {
            return ctx.reply_error(&e);
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
                state().hazards.write(keys_of(args).unwrap_or_default());
            } else if !run::read_must_wait(&name, args) {
                return reply::send(ctx, &bytes);
            }
            hold::block_with(ctx, bytes)
        }
        Err(null_reply) => {
            let keys = source_keys(&argv);
            let db = ctx.selected_db();
            let timeout = timeout_ms(&name, &argv);
            let bc = ctx.block_until_disconnect::<Answer>(timeout);
            state().clients.wait(bc, Waiter { argv, write, resp3, null_reply }, db, keys);
            OK
        }
    }
}

/// A key was written (from the keyspace notification, state locked by the
/// caller): wake its waiters soon.
pub fn key_written(ctx: Ctx, st: &mut State, db: i32, key: &[u8]) {
    if st.clients.key_written(db, key) {
        schedule_retry(ctx, st);
    }
}

/// A whole database changed (flush, swap; `None`: all of them).
pub fn db_changed(ctx: Ctx, st: &mut State, db: Option<i32>) {
    if st.clients.db_changed(db) {
        schedule_retry(ctx, st);
    }
}

fn schedule_retry(ctx: Ctx, st: &mut State) {
    if !st.retry_scheduled {
        st.retry_scheduled = true;
        ctx.timer(0, Retry);
    }
}

/// Retries the waiters of ready keys, oldest first.
struct Retry;

impl TimerJob for Retry {
    fn fire(self, ctx: Ctx) {
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
            ctx.select_db(db);
            // No waited key holds the right type (it was deleted, or set to
            // another type): Redis keeps such a client waiting too.
            if !any_source_ready(ctx, &argv) {
                if argv[0].eq_ignore_ascii_case(b"xreadgroup") {
                    // A consumer group vanished with its stream: Redis
                    // answers such a waiter with an error.
                    state().clients.stop_waiting(bc);
                    hold::unblock(bc, Answer::Error("UNBLOCKED the stream key no longer exists".into()));
                }
                continue;
            }
            if argv[0].eq_ignore_ascii_case(b"xreadgroup") && !xreadgroup_answers_now(ctx, &argv) {
                continue;
            }
            let Ok(bytes) = try_once(ctx, &argv, write, false, resp3) else { continue };
            let strs = Args::new(ctx, &argv);
            let name = argv[0].to_ascii_lowercase();
            let hold = write || run::read_must_wait(&name, &strs);
            if write {
                state().hazards.write(keys_of(&strs).unwrap_or_default());
            }
            drop(strs);
            if !hold {
                state().clients.stop_waiting(bc);
                hold::unblock(bc, Answer::Reply(bytes));
                continue;
            }
            // The pop is done: its reply may wait for the journal only so long.
            let (id, ms) = {
                let mut st = state();
                (st.clients.popped(bc, Answer::Reply(bytes)), st.cfg.write_timeout_ms)
            };
            ctx.timer(ms, PoppedTimeout(id));
        }
    }
}

/// A popped reply still not durable after `write_timeout_ms`.
struct PoppedTimeout(WaiterId);

impl TimerJob for PoppedTimeout {
    fn fire(self, _ctx: Ctx) {
        let bc = {
            let mut st = state();
            let Some(bc) = st.clients.popped_timed_out(self.0) else { return };
            st.timed_out_total += 1;
            bc
        };
        hold::unblock(bc, Answer::Error(hold::unconfirmed_message()));
    }
}
