//! Running a client's command with `RM_Call` as the client would have (its
//! ACL user, database and protocol; replicated for a write) and holding its
//! reply until durable (`hold.rs`): what `KEEL.W`, `KEEL.R`, a routed
//! `KEEL.T` and a blocking pop that found data have in common.

use std::ffi::CStr;

use crate::grants;
use crate::hold;
use crate::redis::Arg;
use crate::redis::CallReply;
use crate::redis::Ctx;
use crate::redis::ReplyKind;
use crate::redis::ServerInfo;
use crate::redis::Status;
use crate::redis::command_name;
use crate::redis::keys_of;
use crate::routing;
use crate::state::Answer;
use crate::state::state;

/// Whether a read must wait for pending writes of its keys.
pub fn read_must_wait(name: &[u8], args: &[Arg]) -> bool {
    routing::read_must_wait(&state().hazards, name, || keys_of(args))
}

/// Runs `args` (command first) for the calling client and holds its reply
/// (`write`: its keys become read hazards until durable).
pub fn run_and_hold(ctx: Ctx, args: &[Arg], write: bool) -> Status {
    let in_multi_or_script = ctx.in_multi_or_script();
    {
        let st = state();
        if st.gate.is_fenced() {
            return ctx.reply_error("KEEL_FENCED this node is no longer the primary; it serves nothing");
        }
        if !in_multi_or_script && st.clients.held_count() >= st.cfg.max_held_replies {
            return ctx.reply_error("KEEL_BUSY too many replies are awaiting durability; nothing was done, retry");
        }
    }
    let cmd = command_name(args[0].bytes());
    // v: argv vector; !: replicate; 0: the client's protocol; E: errors as
    // replies; C: ACL checks as the client's user; M: refuse on OOM.
    let fmt = if write { c"v!0ECM" } else { c"v0EC" };
    let (reply, counted) = call_for_client(ctx, &cmd, fmt, args, !in_multi_or_script);
    let Some(reply) = reply else { return ctx.reply_error("ERR command could not be run") };
    if let Some(e) = grants::acl_refusal(ctx, &reply, args) {
        // Refused before it ran: nothing to hold.
        return ctx.reply_error(&e);
    }
    if in_multi_or_script {
        // A script's reply is held at the level of the script's caller.
        return ctx.reply_call_reply(reply.get());
    }
    if write {
        let keys = keys_of(args).unwrap_or_default();
        state().hazards.write(keys);
    }
    // Keep a copy of the reply until the client is released.
    let value = reply.get().proto();
    drop(reply);
    match counted {
        Some(text) => hold::block_with_answer(ctx, Answer::CountedError(text)),
        None => hold::block_with(ctx, value),
    }
}

/// Scripts, whose error reply Redis may leave out of INFO errorstats.
const SCRIPT_COMMANDS: &[&[u8]] = &[b"eval", b"evalsha", b"eval_ro", b"evalsha_ro", b"fcall", b"fcall_ro"];

/// `call` of the client's command `args` (name first); for a script whose
/// reply goes straight to its client (`to_client`), also the error reply's
/// text if INFO errorstats already counted it (`already_counted`).
pub fn call_for_client(ctx: Ctx, cmd: &CStr, fmt: &CStr, args: &[Arg], to_client: bool) -> (Option<CallReply>, Option<Vec<u8>>) {
    let name = args[0].bytes();
    let script = to_client && SCRIPT_COMMANDS.iter().any(|s| name.eq_ignore_ascii_case(s));
    let before = if script { ctx.server_info(c"errorstats") } else { None };
    let reply = ctx.call(cmd, fmt, &args[1..]);
    let counted = before.and_then(|before| already_counted(ctx, reply.as_ref(), before));
    (reply, counted)
}

/// A script's error reply that Redis would not count again: one raised by
/// a failed `redis.call` (or a `redis.pcall` error returned), which was
/// counted when that command failed (`ERR_REPLY_FLAG_NO_STATS_UPDATE`).
/// Redis 7.0 defers a module client's errors whatever that flag, so a held
/// reply would count it a second time. Told by INFO errorstats: an error
/// under the reply's own name counted during the call. (A script that
/// returns its own error with the name of one it caught is counted once,
/// not twice.)
fn already_counted(ctx: Ctx, reply: Option<&CallReply>, before: ServerInfo) -> Option<Vec<u8>> {
    let reply = reply?.get();
    if reply.kind() != ReplyKind::Error {
        return None;
    }
    let text = reply.text().unwrap_or_default();
    let field = std::ffi::CString::new([b"errorstat_", crate::resp::error_code(&text)].concat()).unwrap_or_default();
    let count = |data: &ServerInfo| data.field(&field).map(|v| crate::resp::errorstat_count(&v)).unwrap_or(0);
    let after = ctx.server_info(c"errorstats")?;
    (count(&after) > count(&before)).then_some(text)
}
