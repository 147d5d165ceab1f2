//! `INFO keel`: the node's role and lease, how far the journal reaches, what
//! is held, the control user's secret, the snapshot and the feed. The same
//! fields answer `KEEL.INFO`, which this node's sidecar reads for its
//! metrics: a control command, so neither MONITOR nor SLOWLOG shows the
//! sidecar's polling (an `INFO keel` would be shown every time).

use redis_module::InfoContext;
use redis_module::RedisResult;
use redis_module_macros::info_command_handler;

use crate::control;
use crate::control_commands::MAX_STALL_REASON_BYTES;
use crate::events;
use crate::grants::unix_ms;
use crate::secret;
use crate::state::state;

/// The section's name (INFO prints `# keel_keel`, fields `keel_<name>`).
pub const SECTION: &str = "keel";

#[info_command_handler]
fn info(ctx: &InfoContext, _for_crash_report: bool) -> RedisResult<()> {
    let mut b = ctx.builder().add_section(SECTION);
    for (name, value) in fields() {
        b = b.field(name, value)?;
    }
    b.build_section()?.build_info()?;
    Ok(())
}

/// `INFO keel`'s text, as `INFO keel` prints it (`KEEL.INFO`'s reply):
/// Redis names the section and each field after the module.
pub fn text() -> String {
    let mut out = format!("# {SECTION}_{SECTION}\r\n");
    for (name, value) in fields() {
        out.push_str(SECTION);
        out.push('_');
        out.push_str(name);
        out.push(':');
        out.push_str(&value);
        out.push_str("\r\n");
    }
    out
}

/// The section's fields, in order.
fn fields() -> Vec<(&'static str, String)> {
    let applied = events::repl_offset();
    let st = state();
    let now = crate::redis::monotonic_ms();
    let remaining = st.gate.lease_remaining_ms(now);
    let deadline_unix_ms = if remaining == 0 { 0 } else { unix_ms() + remaining };
    // A primary lags by what it applied and the journal does not hold yet;
    // a replica by what the journal holds and it has not applied.
    let (snap_seq, snap_offset, snap_created) = st.snapshot;
    let snap_age_s = if snap_seq == 0 { 0 } else { unix_ms().saturating_sub(snap_created) / 1000 };
    let (durable, lag) = if st.gate.is_replica() {
        (st.journal_offset, st.journal_offset.saturating_sub(applied))
    } else {
        (st.clients.durable_offset(), applied.saturating_sub(st.clients.durable_offset()))
    };
    vec![
        ("role", st.gate.role_name(now).to_string()),
        ("lease_remaining_ms", remaining.to_string()),
        ("lease_deadline_unix_ms", deadline_unix_ms.to_string()),
        ("applied_offset", applied.to_string()),
        ("lag_bytes", lag.to_string()),
        ("leader_uuid", st.leader_uuid.clone()),
        ("stream", st.stream.clone()),
        ("durable_offset", durable.to_string()),
        ("pending_replies", st.clients.held_count().to_string()),
        ("open_transactions", st.txs.open_count().to_string()),
        ("blocked_waiting", st.clients.waiting_count().to_string()),
        ("released_total", st.released_total.to_string()),
        ("timed_out_total", st.timed_out_total.to_string()),
        ("sidecar", st.cfg.sidecar.clone()),
        ("journal_endpoints", st.cfg.journal.clone()),
        ("control_user", st.cfg.control_user.clone()),
        ("control_secret_file", st.cfg.control_secret_file.clone()),
        ("control_secret_loaded_unix_ms", st.secret_loaded_unix_ms.to_string()),
        ("control_secret_retiring", st.secret.retiring().to_string()),
        ("control_secret_grace_ms", secret::SECRET_GRACE_MS.to_string()),
        ("control_secret_polls", st.secret_polls.to_string()),
        ("control_secret_file_error", control::info_line(st.secret.refused().unwrap_or_default().as_bytes(), MAX_STALL_REASON_BYTES)),
        ("write_timeout_ms", st.cfg.write_timeout_ms.to_string()),
        ("snapshot_seq", snap_seq.to_string()),
        ("snapshot_age_seconds", snap_age_s.to_string()),
        ("snapshot_bytes_since", if snap_seq == 0 { applied } else { applied.saturating_sub(snap_offset) }.to_string()),
        ("feed_stalled_seq", st.stalled.0.to_string()),
        ("feed_stalled_reason", st.stalled.1.clone()),
        ("handover", st.handover.phase_name().to_string()),
        ("handover_last", st.handover.last_outcome().to_string()),
    ]
}
