//! Loading the module: reads its arguments and what `COMMAND` says about
//! every command, sets up the state, registers the `keel.*` commands (the
//! names and flags are `commands::KEEL_COMMANDS`'s; `dispatch` maps each
//! to the room that serves it), the command filter, the secret timer and
//! the server events.

use redis_module::Context;
use redis_module::RedisString;
use redis_module::Status as LoadStatus;
use redis_module::redis_module;

use crate::clients::HeldClients;
use crate::commands::CommandTable;
use crate::commands::KEEL_COMMANDS;
use crate::config::parse_args;
use crate::control_commands;
use crate::gate::Gate;
use crate::grants;
use crate::handover_commands;
use crate::hazards::Hazards;
use crate::redis;
use crate::redis::Arg;
use crate::redis::Ctx;
use crate::redis::ReplyRef;
use crate::redis::Status;
use crate::reply;
use crate::routing;
use crate::secret;
use crate::secret::Rotation;
use crate::state;
use crate::state::State;
use crate::transactions::Transactions;
use crate::wrappers;

type Handler = fn(Ctx, &[Arg]) -> Status;

/// Serves one of `KEEL_COMMANDS` (`args`: its name first).
pub fn dispatch(ctx: Ctx, args: &[Arg]) -> Status {
    // Redis runs a command only under a registered name, and `init`
    // checked that each has a handler.
    let name = args.first().map(|a| a.bytes().to_ascii_lowercase()).unwrap_or_default();
    let serve = handler(&name).unwrap_or_else(|| {
        panic!("no handler for {}: KEEL_COMMANDS and handler() disagree", String::from_utf8_lossy(&name))
    });
    serve(ctx, args)
}

/// The function serving each of `KEEL_COMMANDS` (lower-cased name).
fn handler(name: &[u8]) -> Option<Handler> {
    Some(match name {
        b"keel.w" => wrappers::keel_w,
        b"keel.r" => wrappers::keel_r,
        b"keel.t" | b"keel.tw" | b"keel.tb" => wrappers::keel_t,
        b"keel.b" | b"keel.br" => wrappers::keel_b,
        b"keel.guard" => wrappers::keel_guard,
        b"keel.view" => wrappers::keel_view,
        b"keel.ack" => control_commands::keel_ack,
        b"keel.fenced" => control_commands::keel_fenced,
        b"keel.leader" => control_commands::keel_leader,
        b"keel.lease" => control_commands::keel_lease,
        b"keel.nolease" => control_commands::keel_nolease,
        b"keel.following" => control_commands::keel_following,
        b"keel.snapshot" => control_commands::keel_snapshot,
        b"keel.stalled" => control_commands::keel_stalled,
        b"keel.info" => control_commands::keel_info,
        b"keel.handover" => handover_commands::keel_handover,
        b"keel.countederror" => reply::keel_countederror,
        _ => return None,
    })
}

fn load_command_table(ctx: Ctx) -> CommandTable {
    let mut out = CommandTable {
        writes: routing::SCRIPT_CALLS.iter().map(|s| s.as_bytes().to_vec()).collect(),
        ..CommandTable::default()
    };
    let Some(reply) = ctx.call_no_args(c"COMMAND") else { return out };
    let reply = reply.get();
    for i in 0..reply.len() {
        if let Some(cmd) = reply.elem(i) {
            collect_command(cmd, &mut out);
        }
    }
    out
}

/// One command of `COMMAND`'s reply, and its subcommands (whose names come
/// as `container|sub` already).
fn collect_command(cmd: ReplyRef<'_>, out: &mut CommandTable) {
    if cmd.len() < 3 {
        return;
    }
    let (Some(name), Some(arity), Some(flags)) = (cmd.elem(0), cmd.elem(1), cmd.elem(2)) else { return };
    let name = name.lower_text();
    out.arity.insert(name.clone(), arity.integer());
    let mut is_write = false;
    for j in 0..flags.len() {
        let f = flags.elem(j).map(|f| f.lower_text()).unwrap_or_default();
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
    if is_write {
        out.writes.insert(name.clone());
    }
    // Element 9 (Redis 7): subcommands.
    if cmd.len() > 9 {
        let Some(subs) = cmd.elem(9) else { return };
        if subs.len() > 0 {
            out.containers.insert(name.clone());
        }
        for k in 0..subs.len() {
            if let Some(sub) = subs.elem(k) {
                collect_command(sub, out);
            }
        }
    }
}

fn init(context: &Context, args: &[RedisString]) -> LoadStatus {
    let ctx = Ctx::of(context);
    let args: Vec<String> = args.iter().map(|a| a.to_string_lossy()).collect();
    let cfg = match parse_args(&args).and_then(|mut c| c.load_secret().map(|()| c)) {
        Ok(c) => c,
        Err(e) => {
            ctx.log_warning(&e);
            return LoadStatus::Err;
        }
    };
    let table = load_command_table(ctx);
    let replica = Ctx::detached().flags() & redis::FLAG_REPLICA != 0;
    ctx.log_notice(&format!("keel: holding replies of {} write commands; {cfg:?}", table.writes.len()));
    let secret = Rotation::new(cfg.control_secret.clone());
    if let Some(info) = ctx.server_info(c"server") {
        redis::set_valkey(info.field(c"valkey_version").is_some());
    }
    state::init(State {
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
        secret_loaded_unix_ms: grants::unix_ms(),
        secret_polls: 0,
        last_commands: Default::default(),
        handover: Default::default(),
    });
    for c in KEEL_COMMANDS {
        assert!(handler(c.name.as_bytes()).is_some(), "{} has no handler", c.name);
        if !ctx.create_command(c.name, c.flags) {
            ctx.log_warning(&format!("keel: cannot register {}", c.name));
            return LoadStatus::Err;
        }
    }
    ctx.register_filter();
    ctx.timer(secret::SECRET_POLL_MS as i64, grants::PollSecret);
    if let Err(what) = ctx.subscribe_events() {
        ctx.log_warning(&format!("keel: cannot subscribe to {what}"));
        return LoadStatus::Err;
    }
    LoadStatus::Ok
}

redis_module! {
    name: "keel",
    version: 1,
    allocator: (redis_module::alloc::RedisAlloc, redis_module::alloc::RedisAlloc),
    data_types: [],
    init: init,
    commands: [],
}
