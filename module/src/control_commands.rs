//! The commands this node's sidecar sends (`KEEL.ACK`, `KEEL.FENCED`,
//! `KEEL.LEADER`, `KEEL.LEASE`, `KEEL.FOLLOWING`, `KEEL.SNAPSHOT`,
//! `KEEL.STALLED`, `KEEL.INFO`), refused to anyone but the control user (control.rs),
//! and `KEEL.NOLEASE`, the refusal the filter gives a data command while
//! this node may not serve. `KEEL.ACK` is the last step of the write path:
//! the journal holds the stream up to an offset, and the held replies it
//! covers are released (`hold.rs`).

use crate::control;
use crate::events;
use crate::gate;
use crate::gate::Decision;
use crate::grants;
use crate::handover::Phase;
use crate::handover_commands;
use crate::hold;
use crate::redis::Arg;
use crate::redis::Ctx;
use crate::redis::Status;
use crate::state::state;

/// Longest stall reason kept for `INFO keel`.
pub const MAX_STALL_REASON_BYTES: usize = 256;

/// Answers `NOPERM` to a control command from anyone but this node's
/// sidecar (control.rs); `None` lets the command run.
pub(crate) fn refuse_unless_control(ctx: Ctx, command: &str) -> Option<Status> {
    if grants::caller_is_control(ctx) {
        return None;
    }
    let user = state().cfg.control_user.clone();
    Some(ctx.reply_error(&control::not_control(command, &user)))
}

fn non_negative(a: &Arg) -> Option<u64> {
    a.to_i64().filter(|v| *v >= 0).map(|v| v as u64)
}

/// `KEEL.ACK <offset>`: the journal holds the replication stream up to offset.
pub fn keel_ack(ctx: Ctx, argv: &[Arg]) -> Status {
    if let Some(r) = refuse_unless_control(ctx, "keel.ack") {
        return r;
    }
    if argv.len() != 2 {
        return ctx.wrong_arity();
    }
    let Some(off) = non_negative(&argv[1]) else {
        return ctx.reply_error("ERR offset must be a non-negative integer");
    };
    // The journal cannot hold what this Redis never produced: such an
    // ack would release replies before their writes are durable.
    if off > state().produced_offset {
        let produced = events::repl_offset();
        if off > produced {
            return ctx.reply_error(&format!(
                "ERR KEEL.ACK {off} is beyond this Redis's replication offset {produced}; nothing was acknowledged"
            ));
        }
        let mut st = state();
        st.produced_offset = st.produced_offset.max(produced);
    }
    let released = {
        let mut st = state();
        st.hazards.durable(off);
        st.clients.durable(off)
    };
    let n = released.len();
    hold::release(released);
    ctx.reply_integer(n as i64)
}

/// `KEEL.LEADER <uuid> <stream>`: the sidecar holds the journal stream's
/// lease as this node (reported in INFO).
pub fn keel_leader(ctx: Ctx, argv: &[Arg]) -> Status {
    if let Some(r) = refuse_unless_control(ctx, "keel.leader") {
        return r;
    }
    if argv.len() != 3 {
        return ctx.wrong_arity();
    }
    let mut st = state();
    st.leader_uuid = String::from_utf8_lossy(argv[1].bytes()).into_owned();
    st.stream = String::from_utf8_lossy(argv[2].bytes()).into_owned();
    // A new leading round: a handover the sidecar had started was
    // abandoned (it took its lease back), so nothing stays paused.
    st.gate.leading();
    let abandoned = matches!(st.handover.phase(), Phase::Accepted(_) | Phase::Paused(_));
    drop(st);
    if abandoned {
        handover_commands::end_request("abandoned: this node leads again");
    }
    ctx.reply_ok()
}

/// `KEEL.FENCED <reason>`: the journal refused this node; fail every held write.
pub fn keel_fenced(ctx: Ctx, argv: &[Arg]) -> Status {
    if let Some(r) = refuse_unless_control(ctx, "keel.fenced") {
        return r;
    }
    let reason = argv.get(1).map(|a| String::from_utf8_lossy(a.bytes()).into_owned()).unwrap_or_default();
    state().gate.fence();
    hold::fail_everything_held(
        &reason,
        &format!("KEEL_FENCED this node lost the primary role before the write was durable ({reason}); it may or may not survive"),
    );
    ctx.reply_ok()
}

/// `KEEL.LEASE <until_ms>`: the sidecar renewed the stream lease; this node
/// may serve until `until_ms` on the machine's monotonic clock.
pub fn keel_lease(ctx: Ctx, argv: &[Arg]) -> Status {
    if let Some(r) = refuse_unless_control(ctx, "keel.lease") {
        return r;
    }
    if argv.len() != 2 {
        return ctx.wrong_arity();
    }
    let Some(until) = non_negative(&argv[1]) else {
        return ctx.reply_error("ERR lease deadline must be a non-negative integer (monotonic ms)");
    };
    let r = state().gate.lease(until);
    match r {
        Ok(()) => {
            let remaining = state().gate.lease_remaining_ms(crate::redis::monotonic_ms());
            ctx.reply_integer(remaining as i64)
        }
        Err(e) => ctx.reply_error(e),
    }
}

/// `KEEL.FOLLOWING <leader uuid> <stream> <journal offset>`: a replica's
/// sidecar reports whom it follows and how far the journal reaches.
pub fn keel_following(ctx: Ctx, argv: &[Arg]) -> Status {
    if let Some(r) = refuse_unless_control(ctx, "keel.following") {
        return r;
    }
    if argv.len() != 4 {
        return ctx.wrong_arity();
    }
    let Some(off) = non_negative(&argv[3]) else {
        return ctx.reply_error("ERR offset must be a non-negative integer");
    };
    let mut st = state();
    if !st.gate.is_replica() {
        drop(st);
        return ctx.reply_error("ERR this node is not a replica");
    }
    st.leader_uuid = String::from_utf8_lossy(argv[1].bytes()).into_owned();
    st.stream = String::from_utf8_lossy(argv[2].bytes()).into_owned();
    st.journal_offset = off;
    drop(st);
    ctx.reply_ok()
}

/// `KEEL.SNAPSHOT <seq> <offset> <created unix ms>`: the sidecar reports the
/// stream's published snapshot, for `INFO keel`.
pub fn keel_snapshot(ctx: Ctx, argv: &[Arg]) -> Status {
    if let Some(r) = refuse_unless_control(ctx, "keel.snapshot") {
        return r;
    }
    if argv.len() != 4 {
        return ctx.wrong_arity();
    }
    let mut v = [0u64; 3];
    for (i, slot) in v.iter_mut().enumerate() {
        let Some(n) = non_negative(&argv[i + 1]) else {
            return ctx.reply_error("ERR seq, offset and time must be non-negative integers");
        };
        *slot = n;
    }
    state().snapshot = (v[0], v[1], v[2]);
    ctx.reply_ok()
}

/// `KEEL.STALLED <seq> [<reason>]`: the sidecar's feed stopped at journal
/// record `seq`, which it cannot read (seq 0: it is fine again); shown by
/// `INFO keel`. Accepted in any role: a primary's sidecar that meets such a
/// record steps down and reports it too.
pub fn keel_stalled(ctx: Ctx, argv: &[Arg]) -> Status {
    if let Some(r) = refuse_unless_control(ctx, "keel.stalled") {
        return r;
    }
    if !(2..=3).contains(&argv.len()) {
        return ctx.wrong_arity();
    }
    let Some(seq) = non_negative(&argv[1]) else {
        return ctx.reply_error("ERR seq must be a non-negative integer");
    };
    let reason = if seq > 0 && argv.len() == 3 { control::info_line(argv[2].bytes(), MAX_STALL_REASON_BYTES) } else { String::new() };
    state().stalled = (seq, reason);
    ctx.reply_ok()
}

/// `KEEL.NOLEASE cmd…`: a data command this node must not serve now. As
/// Redis does with a command it rejects, a client inside MULTI has its
/// transaction flagged (EXEC will abort it), and a refused EXEC discards it:
/// a transaction never runs with a command missing.
pub fn keel_nolease(ctx: Ctx, argv: &[Arg]) -> Status {
    let id = ctx.client_id();
    let mut st = state();
    if st.txs.in_multi(id) {
        let exec = argv.len() > 1 && argv[1].bytes().eq_ignore_ascii_case(b"exec");
        if exec {
            st.txs.discard(id);
        } else {
            st.txs.queue_error(id);
        }
    }
    let why = match st.gate.decide(crate::redis::monotonic_ms()) {
        Decision::Refuse(why) => why,
        _ => gate::LAPSED,
    };
    drop(st);
    ctx.reply_error(why)
}

/// `KEEL.INFO`: `INFO keel`'s text, for the sidecar's metrics (a control
/// command: its polling shows in neither MONITOR nor SLOWLOG).
pub fn keel_info(ctx: Ctx, argv: &[Arg]) -> Status {
    if let Some(r) = refuse_unless_control(ctx, "keel.info") {
        return r;
    }
    if argv.len() != 1 {
        return ctx.wrong_arity();
    }
    ctx.reply_bulk(crate::info::text().as_bytes())
}
