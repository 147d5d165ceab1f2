//! Graceful handover over Redis: a client's `FAILOVER` and a primary's
//! `SHUTDOWN` (both handed here by `KEEL.GUARD`), and `KEEL.HANDOVER`, the
//! sidecar's side. The request's life cycle and its rules are
//! handover.rs's; this room blocks and answers the waiting clients and
//! moves the gate (gate.rs).
//!
//! `KEEL.HANDOVER` (control user only, like every `KEEL.*` the sidecar sends):
//! - `GET`: the request to take up: nil, or `<to> <reason> <timeout_ms>`
//!   in one bulk string (`to` is `*` when the sidecar picks the successor);
//! - `ACCEPT` / `REFUSE <why>`: the FAILOVER client gets `+OK` / the error;
//! - `PAUSE`: data commands stop (replies already held are still released
//!   by `KEEL.ACK`); answers `master_repl_offset`, the offset the journal
//!   must reach before the lease may pass on;
//! - `FINISH <outcome> [<successor>]`: the request ends (a successor: the
//!   gate keeps refusing, naming the hand-over; none: the pause lasts
//!   until the sidecar leads again, `KEEL.LEADER`). SHUTDOWN clients go ahead.
//!
//! A `SHUTDOWN` that waits runs as `SHUTDOWN <its arguments> NOW` once it may
//! go: `RM_Call` cannot block (NOW skips the wait for lagging replicas, of
//! which a Keel primary has only its sidecar, whose durability is the
//! journal's).

use crate::events;
use crate::gate::HandoverGate;
use crate::handover;
use crate::handover::Answer;
use crate::handover::Failover;
use crate::handover::Reason;
use crate::handover::Request;
use crate::redis;
use crate::redis::Arg;
use crate::redis::Args;
use crate::redis::Blocked;
use crate::redis::BlockedReply;
use crate::redis::Ctx;
use crate::redis::Status;
use crate::state::state;

/// What a client blocked on the handover is answered with.
pub enum Outcome {
    Ok,
    Error(String),
    /// Run this SHUTDOWN now.
    Shutdown(Vec<Vec<u8>>),
}

impl BlockedReply for Outcome {
    fn reply(ctx: Ctx, answer: Option<&Outcome>) -> Status {
        match answer {
            None => ctx.reply_error("KEEL_UNKNOWN internal error: no answer"),
            Some(Outcome::Ok) => ctx.reply_ok(),
            Some(Outcome::Error(e)) => ctx.reply_error(e),
            Some(Outcome::Shutdown(args)) => shutdown_now(ctx, args),
        }
    }

    fn timed_out(ctx: Ctx, bc: Blocked) -> Status {
        // As in hold.rs: the module unblocks a timed-out client itself and
        // answers from here (the reply callback is then skipped).
        let answers = state().handover.timed_out(bc, redis::monotonic_ms());
        let mut mine = None;
        for a in answers {
            match a {
                Answer::Error(c, e) if c == bc => mine = Some(Outcome::Error(e)),
                Answer::Shutdown(c, args) if c == bc => mine = Some(Outcome::Shutdown(args)),
                other => answer(other),
            }
        }
        redis::unblock::<Outcome>(bc, None);
        match mine {
            Some(Outcome::Shutdown(args)) => {
                ctx.log_warning("keel: no handover within the SHUTDOWN wait; shutting down without one");
                shutdown_now(ctx, &args)
            }
            Some(Outcome::Error(e)) => ctx.reply_error(&e),
            _ => ctx.reply_error("ERR Keel: the handover ended while this client waited"),
        }
    }

    fn disconnected(_bc: Blocked) {}
}

fn answer(a: Answer<Blocked>) {
    match a {
        Answer::Ok(c) => redis::unblock(c, Some(Outcome::Ok)),
        Answer::Error(c, e) => redis::unblock(c, Some(Outcome::Error(e))),
        Answer::Shutdown(c, args) => redis::unblock(c, Some(Outcome::Shutdown(args))),
    }
}

fn answer_all(answers: Vec<Answer<Blocked>>) {
    answers.into_iter().for_each(answer);
}

/// `SHUTDOWN args…` at once, without a handover (a busy script holds the
/// event loop).
pub fn shutdown_now_for(ctx: Ctx, args: &[&[u8]]) -> Status {
    shutdown_now(ctx, args)
}

/// Runs `SHUTDOWN args… NOW`; answers only if the server did not exit.
fn shutdown_now<A: AsRef<[u8]>>(ctx: Ctx, args: &[A]) -> Status {
    let mut argv: Vec<&[u8]> = args.iter().skip(1).map(|a| a.as_ref()).collect();
    if !argv.iter().any(|a| a.eq_ignore_ascii_case(b"now")) {
        argv.push(b"NOW");
    }
    let strs = Args::new(ctx, &argv);
    match ctx.call(c"SHUTDOWN", c"vE", &strs) {
        Some(reply) => ctx.reply_call_reply(reply.get()),
        None => ctx.reply_error("ERR SHUTDOWN could not be run"),
    }
}

/// `FAILOVER …` from a client (`args`: name first), at top level.
pub fn failover(ctx: Ctx, args: &[Arg]) -> Status {
    let bytes: Vec<&[u8]> = args.iter().map(|a| a.bytes()).collect();
    let now = redis::monotonic_ms();
    let req = match handover::parse_failover(&bytes) {
        Err(e) => return ctx.reply_error(&e),
        Ok(Failover::Abort) => {
            let (r, answers) = state().handover.abort(now);
            answer_all(answers);
            return match r {
                Ok(()) => {
                    ctx.log_notice("keel: FAILOVER ABORT: the handover request was withdrawn");
                    ctx.reply_ok()
                }
                Err(e) => ctx.reply_error(&e),
            };
        }
        Ok(Failover::Start(req)) => req,
    };
    if let Some(refusal) = not_a_primary(now) {
        return ctx.reply_error(refusal);
    }
    let bc = ctx.block::<Outcome>(handover::ACCEPT_TIMEOUT_MS as i64);
    let r = state().handover.request(req.clone(), bc, None, now);
    match r {
        Ok(answers) => {
            answer_all(answers);
            ctx.log_notice(&format!(
                "keel: FAILOVER requested (to {}); waiting for the sidecar to take it up",
                req.to.as_deref().unwrap_or("the most caught-up replica")
            ));
        }
        Err(e) => redis::unblock(bc, Some(Outcome::Error(e))),
    }
    redis::OK
}

/// Why this node has nothing to hand over, if so.
fn not_a_primary(now_ms: u64) -> Option<&'static str> {
    let st = state();
    if st.gate.is_replica() {
        return Some(
            "ERR FAILOVER is not valid when server is a replica. (Keel: this node follows the journal; send FAILOVER to \
             the primary, which discovery names)",
        );
    }
    if st.gate.lease_remaining_ms(now_ms) == 0 {
        return Some("ERR Keel: this node does not hold the primary lease, so it has nothing to hand over");
    }
    None
}

/// `SHUTDOWN …` of a primary: hands over first, waiting at most
/// `SHUTDOWN_HANDOVER_WAIT_MS`, then shuts down.
pub fn shutdown(ctx: Ctx, args: &[Arg]) -> Status {
    let owned: Vec<Vec<u8>> = args.iter().map(|a| a.bytes().to_vec()).collect();
    let now = redis::monotonic_ms();
    if not_a_primary(now).is_some() {
        return shutdown_now(ctx, &owned);
    }
    let bc = ctx.block::<Outcome>(handover::SHUTDOWN_HANDOVER_WAIT_MS as i64);
    let req = Request { to: None, timeout_ms: handover::SHUTDOWN_HANDOVER_WAIT_MS, reason: Reason::Shutdown };
    let r = state().handover.request(req, bc, Some(owned), now);
    match r {
        Ok(answers) => answer_all(answers),
        Err(e) => redis::unblock(bc, Some(Outcome::Error(e))),
    }
    ctx.log_notice(&format!(
        "keel: SHUTDOWN of the primary: handing over first (at most {} ms)",
        handover::SHUTDOWN_HANDOVER_WAIT_MS
    ));
    redis::OK
}

/// This node's Redis changed role, or its sidecar leads again: a request
/// still open ends (SHUTDOWN clients go ahead).
pub fn end_request(why: &str) {
    let answers = state().handover.finish(why, Some(&format!("ERR Keel: the handover ended: {why}")));
    answer_all(answers);
}

/// `KEEL.HANDOVER GET|ACCEPT|REFUSE why|PAUSE|FINISH outcome [successor]`.
pub fn keel_handover(ctx: Ctx, argv: &[Arg]) -> Status {
    if let Some(r) = crate::control_commands::refuse_unless_control(ctx, "keel.handover") {
        return r;
    }
    if argv.len() < 2 {
        return ctx.wrong_arity();
    }
    let sub = argv[1].bytes().to_ascii_lowercase();
    let text = |i: usize| argv.get(i).map(|a| crate::control::info_line(a.bytes(), crate::control_commands::MAX_STALL_REASON_BYTES));
    let now = redis::monotonic_ms();
    match (sub.as_slice(), argv.len()) {
        (b"get", 2) => {
            let (req, answers) = state().handover.pending(now);
            answer_all(answers);
            match req {
                None => ctx.reply_null(),
                Some(r) => {
                    let line = format!("{} {} {}", r.to.as_deref().unwrap_or("*"), r.reason.name(), r.timeout_ms);
                    ctx.reply_bulk(line.as_bytes())
                }
            }
        }
        (b"accept", 2) => {
            let r = state().handover.accept();
            match r {
                Ok(answers) => {
                    answer_all(answers);
                    ctx.reply_ok()
                }
                Err(e) => ctx.reply_error(&e),
            }
        }
        (b"refuse", 3) => {
            let why = text(2).unwrap_or_default();
            let answers = state().handover.finish(&format!("refused: {why}"), Some(&format!("ERR {why}")));
            answer_all(answers);
            ctx.reply_ok()
        }
        (b"pause", 2) => {
            let r = {
                let mut st = state();
                st.handover.pause().and_then(|()| st.gate.handover(HandoverGate::Paused).map_err(String::from))
            };
            match r {
                // Every write admitted so far was propagated: the offset covers it.
                Ok(()) => ctx.reply_integer(events::repl_offset() as i64),
                Err(e) => ctx.reply_error(&e),
            }
        }
        (b"finish", 3 | 4) => {
            let outcome = text(2).unwrap_or_default();
            if argv.len() == 4 {
                let _ = state().gate.handover(HandoverGate::HandedOver);
            }
            let answers = state().handover.finish(&outcome, Some(&format!("ERR Keel: {outcome}")));
            answer_all(answers);
            ctx.reply_ok()
        }
        _ => ctx.reply_error("ERR KEEL.HANDOVER GET | ACCEPT | REFUSE <why> | PAUSE | FINISH <outcome> [<successor>]"),
    }
}
