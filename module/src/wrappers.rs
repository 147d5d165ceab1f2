//! The wrappers a client's command is rewritten into (`routing.rs` picks
//! one): `KEEL.W` (a write: run, reply held), `KEEL.R` (a read of data not
//! durable yet: run, reply held), `KEEL.T`/`KEEL.TW`/`KEEL.TB` (MULTI,
//! EXEC, DISCARD, WATCH, UNWATCH and every command of a client inside
//! MULTI, kept by `transactions.rs`), `KEEL.B`/`KEEL.BR` (blocking pops,
//! `blocking.rs`) and `KEEL.GUARD` (the commands `control::guard` names).
//!
//! A wrapper runs the command with `RM_Call` as the client would have: as
//! its ACL user (`C`), in its database and protocol (`0`), replicated (`!`)
//! and refused on OOM (`M`) for a write, errors as replies (`E`). Every
//! wrapper first refuses what it must never run for a client
//! (`refuse_guarded`). The reply of a write (or of a read of pending data)
//! is then held (`hold.rs`) until its offset is durable.

use crate::blocking;
use crate::commands::arity_allows;
use crate::grants;
use crate::hold;
use crate::redis;
use crate::redis::Arg;
use crate::redis::Args;
use crate::redis::CommandKeys;
use crate::redis::Ctx;
use crate::redis::FLAG_LUA;
use crate::redis::Status;
use crate::redis::command_name;
use crate::redis::keys_of;
use crate::reply;
use crate::routing;
use crate::run;
use crate::state::state;
use crate::transactions::Exec;

const BUSY_MESSAGE: &str = "BUSY Redis is busy running a script. You can only call SCRIPT KILL, FUNCTION KILL or SHUTDOWN NOSAVE.";

fn lower(b: &[u8]) -> Vec<u8> {
    b.to_ascii_lowercase()
}

/// `KEEL.W CMD args…`: runs CMD for the calling client and holds its reply.
pub fn keel_w(ctx: Ctx, argv: &[Arg]) -> Status {
    let args = match wrapped(ctx, argv) {
        Ok(args) => args,
        Err(answered) => return answered,
    };
    run::run_and_hold(ctx, args, true)
}

/// `KEEL.R CMD args…`: a read of data not yet durable; runs now, its reply
/// is held until the end of this turn is durable.
pub fn keel_r(ctx: Ctx, argv: &[Arg]) -> Status {
    let args = match wrapped(ctx, argv) {
        Ok(args) => args,
        Err(answered) => return answered,
    };
    run::run_and_hold(ctx, args, false)
}

/// `KEEL.B CMD args…` / `KEEL.BR`: a blocking command (blocking.rs).
pub fn keel_b(ctx: Ctx, argv: &[Arg]) -> Status {
    let args = match wrapped(ctx, argv) {
        Ok(args) => args,
        Err(answered) => return answered,
    };
    // Only what the filter hands it: another command would be run, and
    // run again at every write of its keys, its client waiting for a
    // reply that is not null, for ever when its last argument is no
    // timeout (`KEEL.B GETSET k v`).
    let name = lower(args[0].bytes());
    if !blocking::blocks(&name, args[1..].iter().map(|a| a.bytes())) {
        return ctx.reply_error(&format!(
            "ERR KEEL.B runs only blocking commands (BLPOP, XREAD BLOCK…), not {}",
            String::from_utf8_lossy(&name).to_ascii_uppercase()
        ));
    }
    blocking::blocking_pop(ctx, args)
}

/// `KEEL.T CMD args…` / `KEEL.TW CMD args…`: MULTI, EXEC, DISCARD, WATCH,
/// UNWATCH, and every command of a client inside MULTI (queued), or of any
/// client while a transaction is open and the server cannot say who sent a
/// command (then it runs as it would have without the module).
pub fn keel_t(ctx: Ctx, argv: &[Arg]) -> Status {
    let args = match wrapped(ctx, argv) {
        Ok(args) => args,
        Err(answered) => return answered,
    };
    let name = lower(args[0].bytes());
    if routing::is_transaction_command(&name) {
        // Answered here, not by Redis: its arity check too (a refusal
        // inside MULTI makes the EXEC abort, as in Redis).
        let arity = state().table.arity.get(&name).copied();
        if arity.is_some_and(|a| !arity_allows(a, args.len())) {
            let id = ctx.client_id();
            {
                let mut st = state();
                if st.txs.in_multi(id) {
                    st.txs.queue_error(id);
                }
            }
            return ctx.reply_error(&format!("ERR wrong number of arguments for '{}' command", String::from_utf8_lossy(&name)));
        }
    }
    let flags = ctx.flags();
    // MULTI/DISCARD/WATCH/UNWATCH/SHUTDOWN come as KEEL.TB, which Redis
    // refuses in scripts and serves during a busy script (when the
    // context says "script running", for another client); any other
    // routed command running while a script runs is that script's.
    let busy_safe = routing::is_busy_safe(&name);
    if busy_safe && name == b"exec" && flags & FLAG_LUA != 0 {
        // A script is busy: Redis's own EXEC would be refused, and the
        // transaction discarded.
        let id = ctx.client_id();
        state().txs.ran(id);
        if state().txs.discard(id) {
            return ctx.reply_error(&format!("EXECABORT Transaction discarded because of: {BUSY_MESSAGE}"));
        }
        return ctx.reply_error(BUSY_MESSAGE);
    }
    if !busy_safe && ctx.in_multi_or_script() {
        // From a script (Redis filters script calls too).
        state().txs.ran(ctx.client_id());
        if matches!(name.as_slice(), b"multi" | b"exec" | b"discard" | b"watch" | b"unwatch") {
            return ctx.reply_error("ERR This Redis command is not allowed from script");
        }
        let write = state().is_write(&name, args.get(1).map(|a| a.bytes()));
        return run::run_and_hold(ctx, args, write);
    }
    let id = ctx.client_id();
    state().txs.ran(id);
    if state().txs.in_multi(id) {
        return in_multi(ctx, id, &name, args);
    }
    match name.as_slice() {
        b"multi" => {
            state().txs.multi(id);
            ctx.reply_ok()
        }
        b"exec" => ctx.reply_error("ERR EXEC without MULTI"),
        b"discard" => ctx.reply_error("ERR DISCARD without MULTI"),
        b"watch" => {
            if args.len() < 2 {
                return ctx.reply_error("ERR wrong number of arguments for 'watch' command");
            }
            let db = ctx.selected_db();
            let keys: Vec<Vec<u8>> = args[1..].iter().map(|a| a.bytes().to_vec()).collect();
            state().txs.watch(id, db, &keys);
            ctx.reply_ok()
        }
        b"unwatch" => {
            state().txs.unwatch(id);
            ctx.reply_ok()
        }
        b"select" => reply::send(ctx, &select(ctx, args)),
        _ => {
            // Not in a transaction: as the filter would have routed it.
            if blocking::blocks(&name, args[1..].iter().map(|a| a.bytes())) {
                return blocking::blocking_pop(ctx, args);
            }
            let write = state().is_write(&name, args.get(1).map(|a| a.bytes()));
            let hazard = !write && run::read_must_wait(&name, args);
            if write || hazard {
                return run::run_and_hold(ctx, args, write);
            }
            let cmd = command_name(args[0].bytes());
            let (reply, counted) = run::call_for_client(ctx, &cmd, c"v0EC", args, true);
            let Some(reply) = reply else { return ctx.reply_error("ERR command could not be run") };
            if let Some(e) = grants::acl_refusal(ctx, &reply, args) {
                return ctx.reply_error(&e);
            }
            if let Some(text) = counted {
                drop(reply);
                return reply::counted_error(ctx, &text);
            }
            ctx.reply_call_reply(reply.get())
        }
    }
}

/// `SELECT n` run by the module for a client (inside EXEC, or routed).
/// Returns the reply as RESP bytes.
fn select(ctx: Ctx, args: &[Arg]) -> Vec<u8> {
    if args.len() != 2 {
        return reply::error("ERR wrong number of arguments for 'select' command");
    }
    let Some(db) = args[1].to_i64() else {
        return reply::error("ERR value is not an integer or out of range");
    };
    if db < 0 || db > i32::MAX as i64 || !ctx.select_db(db as i32) {
        return reply::error("ERR DB index is out of range");
    }
    b"+OK\r\n".to_vec()
}

/// A command of a client inside MULTI.
fn in_multi(ctx: Ctx, id: u64, name: &[u8], args: &[Arg]) -> Status {
    match name {
        b"exec" => exec(ctx, id),
        b"discard" => {
            state().txs.discard(id);
            ctx.reply_ok()
        }
        // Valkey flags them `no_multi`: refused, and the EXEC aborts, as
        // there; Redis 7.0 answers an error and the transaction goes on.
        b"multi" | b"watch" if state().table.no_multi.contains(name) => {
            state().txs.queue_error(id);
            ctx.reply_error(&format!("ERR Command '{}' not allowed inside a transaction", String::from_utf8_lossy(name)))
        }
        b"multi" => ctx.reply_error("ERR MULTI calls can not be nested"),
        b"watch" => ctx.reply_error("ERR WATCH inside MULTI is not allowed"),
        _ => {
            let refuse = |msg: String| {
                state().txs.queue_error(id);
                ctx.reply_error(&msg)
            };
            if state().table.no_multi.contains(name) {
                return refuse("ERR Command not allowed inside a transaction".into());
            }
            if let Err(e) = check_command(args) {
                return refuse(e);
            }
            if let Err(e) = grants::acl_check_queued(ctx, args) {
                return refuse(e);
            }
            let argv: Vec<Vec<u8>> = args.iter().map(|a| a.bytes().to_vec()).collect();
            let max = state().cfg.max_transaction_bytes;
            let queued = state().txs.queue(id, argv, max);
            if queued.is_err() {
                return refuse(format!("ERR the transaction exceeds max_transaction_bytes ({max}); it was discarded, EXEC will fail"));
            }
            ctx.reply_simple(b"QUEUED")
        }
    }
}

/// Refuses an unknown command or one with a wrong number of arguments, as
/// Redis does when it queues.
fn check_command(args: &[Arg]) -> Result<(), String> {
    let name = String::from_utf8_lossy(args[0].bytes()).into_owned();
    match redis::command_keys(args) {
        CommandKeys::Keys(_) => Ok(()),
        CommandKeys::UnknownCommand => {
            let rest: String = args[1..]
                .iter()
                .map(|a| format!("'{}' ", String::from_utf8_lossy(a.bytes())))
                .collect::<String>()
                .chars()
                .take(128)
                .collect();
            Err(format!("ERR unknown command '{name}', with args beginning with: {rest}"))
        }
        CommandKeys::WrongArity => Err(format!("ERR wrong number of arguments for '{}' command", name.to_ascii_lowercase())),
        // No keys: Redis does not check the arity for this answer.
        CommandKeys::NoKeys | CommandKeys::Unknown => {
            let name = name.to_ascii_lowercase().into_bytes();
            let sub = args.get(1).map(|a| [&name[..], b"|", &a.bytes().to_ascii_lowercase()].concat());
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

/// EXEC: runs the queued commands back to back (atomic: one module
/// command) and holds the reply if any of them wrote, or read data that is
/// not durable yet.
fn exec(ctx: Ctx, id: u64) -> Status {
    let decision = state().txs.exec(id);
    let cmds = match decision {
        Exec::NoMulti => return ctx.reply_error("ERR EXEC without MULTI"),
        Exec::Aborted => return ctx.reply_error("EXECABORT Transaction discarded because of previous errors."),
        Exec::WatchTouched => return ctx.reply_null_array(),
        Exec::Run(cmds) => cmds,
    };
    {
        let st = state();
        if st.gate.is_fenced() {
            return ctx.reply_error("KEEL_FENCED this node is no longer the primary; it serves nothing");
        }
        if st.clients.held_count() >= st.cfg.max_held_replies {
            return ctx.reply_error("KEEL_BUSY too many replies are awaiting durability; the transaction was not run, retry");
        }
    }
    let mut values = Vec::with_capacity(cmds.len());
    let mut hold = false;
    for argv in cmds {
        let strs = Args::new(ctx, &argv);
        let name = lower(&argv[0]);
        let value = match name.as_slice() {
            b"select" => select(ctx, &strs),
            b"unwatch" => b"+OK\r\n".to_vec(),
            _ => {
                let write = state().is_write(&name, argv.get(1).map(|a| a.as_slice()));
                if !write && !hold && run::read_must_wait(&name, &strs) {
                    hold = true;
                }
                let cmd = command_name(&argv[0]);
                let fmt = if write { c"v!0ECM" } else { c"v!0EC" };
                let reply = ctx.call(&cmd, fmt, &strs[1..]);
                if write {
                    hold = true;
                    state().hazards.write(keys_of(&strs).unwrap_or_default());
                }
                match reply {
                    None => reply::error("ERR command could not be run"),
                    Some(reply) => match grants::acl_refusal(ctx, &reply, &strs) {
                        Some(e) => reply::error(&e),
                        None => reply.get().proto(),
                    },
                }
            }
        };
        values.push(value);
    }
    let mut value = format!("*{}\r\n", values.len()).into_bytes();
    for v in values {
        value.extend_from_slice(&v);
    }
    if !hold {
        return reply::send(ctx, &value);
    }
    hold::block_with(ctx, value)
}

/// `KEEL.VIEW <command…>`: an introspection command that would show the
/// module's own commands (view.rs), run for the client as its ACL user,
/// its reply relayed with them edited out.
pub fn keel_view(ctx: Ctx, argv: &[Arg]) -> Status {
    if argv.len() < 2 {
        return ctx.wrong_arity();
    }
    let bytes: Vec<&[u8]> = argv[1..].iter().map(|a| a.bytes()).collect();
    let name = lower(bytes[0]);
    let Some(view) = crate::view::view_of(&name, &bytes) else {
        return ctx.reply_error(
            "ERR KEEL.VIEW runs only the commands the Keel module hands it (INFO commandstats, ACL GETUSER/LIST/LOG, CLIENT LIST)",
        );
    };
    // CLIENT LIST is safe to run for a client (it lists, acting on no
    // connection); the other commands pass the wrappers' refusals.
    let args = if name == b"client" {
        note_command(ctx, &argv[1..]);
        &argv[1..]
    } else {
        match wrapped(ctx, argv) {
            Ok(args) => args,
            Err(answered) => return answered,
        }
    };
    let cmd = command_name(bytes[0]);
    let Some(reply) = ctx.call(&cmd, c"v0EC", &args[1..]) else {
        return ctx.reply_error("ERR command could not be run");
    };
    if let Some(e) = grants::acl_refusal(ctx, &reply, args) {
        return ctx.reply_error(&e);
    }
    let r = reply.get();
    // The control user (an operator looking into Keel) reads Redis's own
    // report, the module's commands included.
    if r.kind() == redis::ReplyKind::Error || grants::caller_is_control(ctx) {
        return ctx.reply_call_reply(r);
    }
    let proto = r.proto();
    drop(reply);
    // A copy: the reply is written without the state's lock.
    let last = if view == crate::view::View::Clients { state().last_commands.clone() } else { Default::default() };
    reply::send_edited(ctx, &proto, |s| crate::view::edit(view, s, |id| last.get(id)))
}

/// The command a wrapper (`KEEL.x CMD args…`) runs, or the answer already
/// given: a wrong arity without a command, or a refused guarded one.
fn wrapped<'a>(ctx: Ctx, argv: &'a [Arg]) -> Result<&'a [Arg], Status> {
    if argv.len() < 2 {
        return Err(ctx.wrong_arity());
    }
    let args = &argv[1..];
    match refuse_guarded(ctx, args) {
        Some(refused) => Err(refused),
        None => {
            note_command(ctx, args);
            Ok(args)
        }
    }
}

/// Notes the command a wrapper runs as its client's last (for CLIENT
/// LIST, view.rs). Not for a script's commands: Redis shows the script.
fn note_command(ctx: Ctx, args: &[Arg]) {
    if ctx.flags() & FLAG_LUA != 0 {
        return;
    }
    let name = lower(args[0].bytes());
    let sub = args.get(1).map(|a| a.bytes());
    let mut st = state();
    let full = crate::acl::full_name(&name, sub, st.table.containers.contains(&name));
    st.last_commands.ran(ctx.client_id(), &full);
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
/// wrapper, which act on the connection (the module's own included), and
/// WAIT/WAITAOF (`routing::never_run_for_clients`). Run by `RM_Call`, they
/// would act on the server's internal client of the call instead (subscribe
/// it, make it a replica), or block it (`KEEL.B KEEL.T SET …`, `KEEL.R WAIT
/// 1 100`), which Redis answers with an assertion failure: the server exits.
pub fn refuse_guarded(ctx: Ctx, args: &[Arg]) -> Option<Status> {
    let bytes: Vec<&[u8]> = args.iter().map(|a| a.bytes()).collect();
    let user = state().cfg.control_user.clone();
    let name = lower(bytes[0]);
    let refusal = if routing::never_run_for_clients(&name) {
        format!(
            "ERR the Keel module does not run {} for a client: send it by itself, outside MULTI (on Redis 7.0, \
             while no client has a transaction open)",
            String::from_utf8_lossy(&name).to_ascii_uppercase()
        )
    } else {
        let g = crate::control::guard(&bytes, user.as_bytes())?;
        if g.allows(grants::caller_is_control(ctx)) {
            return None;
        }
        crate::control::refusal(g, bytes[0], &user)
    };
    let id = ctx.client_id();
    {
        let mut st = state();
        if st.txs.in_multi(id) {
            st.txs.queue_error(id);
        }
    }
    Some(ctx.reply_error(&refusal))
}

/// `KEEL.GUARD <command…>`: what the filter took from a client because
/// `control::guard` names it. Runs it (unfiltered) where the guard allows
/// the caller, answers the refusal otherwise (`refuse_guarded`).
pub fn keel_guard(ctx: Ctx, argv: &[Arg]) -> Status {
    if argv.len() < 2 {
        return ctx.wrong_arity();
    }
    let args = &argv[1..];
    let bytes: Vec<&[u8]> = args.iter().map(|a| a.bytes()).collect();
    let user = state().cfg.control_user.clone();
    let guarded = crate::control::guard(&bytes, user.as_bytes());
    let shutdown = bytes[0].eq_ignore_ascii_case(b"shutdown");
    if guarded.is_none() && !shutdown {
        return ctx.reply_error("ERR KEEL.GUARD runs only the commands the Keel module hands it");
    }
    // Served during a busy script (`allow-busy`) for SHUTDOWN's sake only.
    let busy = ctx.flags() & FLAG_LUA != 0;
    if shutdown || guarded == Some(crate::control::Guard::Handover) {
        let in_multi = state().txs.in_multi(ctx.client_id());
        if !in_multi && !busy && !ctx.acl_allows(args) {
            let name = String::from_utf8_lossy(&lower(bytes[0])).into_owned();
            let who = ctx.current_user().map(|u| String::from_utf8_lossy(&u).into_owned()).unwrap_or_default();
            return ctx.reply_error(&format!("NOPERM User {who} has no permissions to run the '{name}' command"));
        }
        if shutdown && busy {
            // The event loop is the script's: no handover can run. As Redis.
            return crate::handover_commands::shutdown_now_for(ctx, &bytes);
        }
        if shutdown && !in_multi {
            return crate::handover_commands::shutdown(ctx, args);
        }
        if !shutdown && !in_multi {
            return crate::handover_commands::failover(ctx, args);
        }
    }
    if busy {
        return ctx.reply_error(BUSY_MESSAGE);
    }
    if let Some(refused) = refuse_guarded(ctx, args) {
        return refused;
    }
    let cmd = command_name(bytes[0]);
    match ctx.call(&cmd, c"vE", &args[1..]) {
        None => ctx.reply_error("ERR command could not be run"),
        Some(reply) => ctx.reply_call_reply(reply.get()),
    }
}
