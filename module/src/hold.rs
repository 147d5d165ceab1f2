//! Holding replies: the invariant of Keel's primary is that **no reply to a
//! write leaves before the replication offset covering that write is
//! durable in the journal** (the decisions are `holds.rs`'s and
//! `clients.rs`'s; this room blocks and unblocks the clients).
//!
//! Life cycle of a held reply: a wrapper (`wrappers.rs`, `blocking.rs`) ran
//! the client's command and `block_with` blocks the client with the reply
//! kept → `events::before_sleep` gives the turn's replies their target
//! offset → `KEEL.ACK` (`control_commands.rs`) reports durability and
//! `release` unblocks them, and Redis calls `Answer::reply` to send the
//! kept reply. Otherwise the write timeout fires (`Answer::timed_out`:
//! the outcome is unknown), or the node is fenced or changes role
//! (`fail_everything_held`): an error, never a success.

use crate::clients::TimedOut;
use crate::redis;
use crate::redis::Blocked;
use crate::redis::BlockedReply;
use crate::redis::Ctx;
use crate::redis::Status;
use crate::reply;
use crate::state::Answer;
use crate::state::state;

impl BlockedReply for Answer {
    /// Replies to a client unblocked with an `Answer`.
    fn reply(ctx: Ctx, answer: Option<&Answer>) -> Status {
        match answer {
            None => ctx.reply_error("KEEL_UNKNOWN internal error: no answer"),
            Some(Answer::Reply(v)) => reply::send(ctx, v),
            Some(Answer::Error(e)) => ctx.reply_error(e),
            Some(Answer::CountedError(text)) => reply::counted_error(ctx, text),
        }
    }

    fn timed_out(ctx: Ctx, bc: Blocked) -> Status {
        // Redis frees a timed-out module-blocked client only once the module
        // unblocks it; its reply callback is then skipped.
        let timed_out = state().clients.timed_out(bc);
        if let TimedOut::Waiting(waiter) = timed_out {
            // A blocking pop that found nothing in its time.
            redis::unblock::<Answer>(bc, None);
            return reply::send(ctx, &waiter.null_reply);
        }
        // Held (its answer dropped), or answered otherwise already.
        state().timed_out_total += 1;
        redis::unblock::<Answer>(bc, None);
        ctx.reply_error(&unconfirmed_message())
    }

    /// A waiting pop's client left: stop waiting (nothing will be popped).
    fn disconnected(bc: Blocked) {
        let waited = state().clients.stop_waiting(bc).is_some();
        if waited {
            redis::unblock::<Answer>(bc, None);
        }
    }
}

/// Unblocks a client with `answer`.
pub fn unblock(bc: Blocked, answer: Answer) {
    redis::unblock(bc, Some(answer));
}

/// Blocks the calling client with `value` as its reply, held until the end
/// of this turn is durable.
pub fn block_with(ctx: Ctx, value: Vec<u8>) -> Status {
    block_with_answer(ctx, Answer::Reply(value))
}

pub fn block_with_answer(ctx: Ctx, answer: Answer) -> Status {
    let timeout = state().cfg.write_timeout_ms;
    let bc = ctx.block::<Answer>(timeout);
    state().clients.hold(bc, answer);
    redis::OK
}

pub fn unconfirmed_message() -> String {
    let ms = state().cfg.write_timeout_ms;
    format!(
        "KEEL_UNCONFIRMED the journal did not confirm within {ms} ms the write this reply depends on; \
         that write is applied in memory and may or may not be durable"
    )
}

/// Sends the kept replies of durable clients; but a node whose lease lapsed
/// (or that handed it over) acknowledges nothing (another node may lead by
/// now): its clients learn that the outcome is unknown. A handover's pause
/// does not stop it (`Gate::confirms`).
pub fn release(clients: Vec<(Blocked, Answer)>) {
    let serving = {
        let mut st = state();
        st.released_total += clients.len() as u64;
        st.gate.confirms(crate::redis::monotonic_ms())
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

/// This node can no longer confirm anything it holds: every held reply and
/// waiting pop gets `message` (pops are told `why`), and pending hazards go.
pub fn fail_everything_held(why: &str, message: &str) {
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
