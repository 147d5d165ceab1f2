//! ACL users, on the Redis side (the rules are `acl.rs`'s and
//! `control.rs`'s): every user is granted the wrappers a client's command
//! becomes (`grant_wrappers`, before the event loop sleeps after the load
//! and after `ACL LOAD`); a refusal `RM_Call` reports is answered with
//! Redis's own text (`acl_refusal`); the control user is (re)created with
//! its secrets (`ensure_control_user`), and its passwords follow the
//! secret file (`PollSecret`, every `SECRET_POLL_MS`; secret.rs).

use crate::acl;
use crate::control;
use crate::redis::Arg;
use crate::redis::CallReply;
use crate::redis::Ctx;
use crate::redis::FLAG_LUA;
use crate::redis::ReplyKind;
use crate::redis::TimerJob;
use crate::redis::command_name;
use crate::secret;
use crate::state::state;

/// Allows every ACL user the wrapper commands a client's commands become
/// (acl.rs); a user allowed them already is left untouched.
pub fn grant_wrappers(ctx: Ctx) {
    let Some(users) = ctx.call_bytes(c"ACL", &[b"USERS"]) else { return };
    let users = users.get();
    let names: Vec<Vec<u8>> = (0..users.len()).filter_map(|i| users.elem(i).and_then(|u| u.text())).collect();
    for user in names {
        let mut missing: Vec<String> = Vec::new();
        for (w, rule) in acl::client_wrappers().zip(acl::grant_rules()) {
            let Some(r) = ctx.call_bytes(c"ACL", &[b"DRYRUN", &user, w.as_bytes()]) else { continue };
            // DRYRUN answers +OK, or a bulk string saying what is refused.
            if r.get().text().as_deref() != Some(b"OK") {
                missing.push(rule);
            }
        }
        if missing.is_empty() {
            continue;
        }
        let mut args: Vec<&[u8]> = vec![b"SETUSER", &user];
        args.extend(missing.iter().map(|m| m.as_bytes()));
        // Best effort, as before: the error is not acted on.
        let _ = run_acl(ctx, &args);
    }
}

/// Redis's own error text when `reply` is `RM_Call`'s report that the
/// client's user may not run the command `args` (acl.rs).
pub fn acl_refusal(ctx: Ctx, reply: &CallReply, args: &[Arg]) -> Option<String> {
    let reply = reply.get();
    if reply.kind() != ReplyKind::Error {
        return None;
    }
    let text = reply.text()?;
    let caller = if ctx.flags() & FLAG_LUA != 0 { acl::Caller::Script } else { acl::Caller::Client };
    acl::native_refusal(&text, caller, || {
        let name = args[0].bytes().to_ascii_lowercase();
        let sub = args.get(1).map(|a| a.bytes());
        acl::full_name(&name, sub, state().table.containers.contains(&name))
    })
}

/// Whether the client's user may run `args`, checked as Redis checks a
/// command queued inside MULTI; the refusal's text otherwise.
pub fn acl_check_queued(ctx: Ctx, args: &[Arg]) -> Result<(), String> {
    if ctx.acl_allows(args) {
        return Ok(());
    }
    // The server's own text for this refusal: the same check as the user,
    // done by RM_Call (refused before anything runs; it logs in ACL LOG).
    let cmd = command_name(args[0].bytes());
    let text = ctx
        .call(&cmd, c"v0EC", &args[1..])
        .and_then(|reply| acl_refusal(ctx, &reply, args).or_else(|| reply.get().text().map(|t| String::from_utf8_lossy(&t).into_owned())));
    Err(text.unwrap_or_else(|| "NOPERM this user has no permissions to run this command".into()))
}

/// Whether the calling client is authenticated as the control user.
pub fn caller_is_control(ctx: Ctx) -> bool {
    let Some(name) = ctx.current_user() else { return false };
    name == state().cfg.control_user.as_bytes()
}

/// (Re)creates the control user with its secrets (the current one, and
/// those still retiring: secret.rs): at load, and after `ACL LOAD`
/// replaced the users. Its rules are the module's alone (`control::guard`
/// refuses changes from clients).
pub fn ensure_control_user(ctx: Ctx) {
    let user = state().cfg.control_user.clone();
    let mut passwords: Vec<Vec<u8>> = state().secret.passwords().map(|s| [b">", s.bytes()].concat()).collect();
    let mut args: Vec<&[u8]> = vec![b"SETUSER", user.as_bytes(), b"reset", b"on"];
    args.extend(passwords.iter().map(|p| p.as_slice()));
    args.extend([&b"~*"[..], b"&*", b"+@all"]);
    let r = run_acl(ctx, &args);
    drop(args);
    passwords.iter_mut().for_each(|p| p.fill(0));
    if let Err(why) = r {
        ctx.log_warning(&format!("keel: could not create the control user '{user}' ({why}); the sidecar cannot authenticate"));
    }
}

/// `ACL <args>`, unfiltered; the error's text if it failed.
fn run_acl(ctx: Ctx, args: &[&[u8]]) -> Result<(), String> {
    let Some(r) = ctx.call_bytes(c"ACL", args) else { return Err(String::new()) };
    let r = r.get();
    if r.kind() == ReplyKind::Error {
        return Err(String::from_utf8_lossy(&r.text().unwrap_or_default()).into_owned());
    }
    Ok(())
}

/// Applies `changes` to the control user's passwords (`ACL SETUSER
/// <user> >new` / `<old`): the rules and the open connections stay.
fn change_control_passwords(ctx: Ctx, changes: Vec<secret::Change>) {
    let user = state().cfg.control_user.clone();
    for change in changes {
        let (mut rule, what) = match &change {
            secret::Change::Add(s) => ([b">", s.bytes()].concat(), "add the new secret to"),
            secret::Change::Remove(s) => ([b"<", s.bytes()].concat(), "remove a replaced secret from"),
        };
        let r = run_acl(ctx, &[b"SETUSER", user.as_bytes(), &rule]);
        rule.fill(0);
        if let Err(why) = r {
            ctx.log_warning(&format!(
                "keel: could not {what} the control user '{user}' ({why}); `ACL LOAD` or a restart sets it again"
            ));
        }
    }
}

/// Every `SECRET_POLL_MS`: reads control_secret_file again and applies a
/// new secret, or retires replaced ones whose grace ended (secret.rs).
pub struct PollSecret;

impl TimerJob for PollSecret {
    fn fire(self, ctx: Ctx) {
        let path = state().cfg.control_secret_file.clone();
        let read = control::read_secret(&path);
        let now = crate::redis::monotonic_ms();
        let seen = {
            let mut st = state();
            st.secret_polls += 1;
            st.secret.seen(read, now)
        };
        let mut changes = Vec::new();
        match seen {
            secret::Seen::Unchanged | secret::Seen::RefusedAgain => {}
            secret::Seen::Refused(why) => ctx.log_warning(&format!(
                "{why}; the control user keeps its current secret (checked again every {} ms)",
                secret::SECRET_POLL_MS
            )),
            secret::Seen::Rotated(c) => {
                state().secret_loaded_unix_ms = unix_ms();
                ctx.log_notice(&format!(
                    "keel: control_secret_file {path:?} holds a new secret: the control user accepts it now, and the \
                     one it replaces for {} ms more",
                    secret::SECRET_GRACE_MS
                ));
                changes = c;
            }
        }
        let expired = state().secret.expire(now);
        changes.extend(expired);
        change_control_passwords(ctx, changes);
        ctx.timer(secret::SECRET_POLL_MS as i64, PollSecret);
    }
}

/// Wall-clock time in Unix ms (0 if the clock is before 1970).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
