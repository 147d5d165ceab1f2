//! Who may steer a Keel node: the control commands and the role commands.
//!
//! Invariant: only this node's sidecar changes what the module believes
//! (durable offset, lease, fence, leader) and what role Redis plays. Any
//! other client, whatever its ACL rules (the default user has `+@all`), is
//! refused:
//! - the sidecar authenticates as a dedicated ACL user (`control_user`,
//!   default `keel-sidecar`) whose password is read from a file
//!   (`control_secret_file`, mode 0600, checked by `check_secret`); the module
//!   (re)creates that user before the event loop sleeps, at load and after
//!   `ACL LOAD`, and reads the file again every second to rotate the secret
//!   without a restart (`secret.rs`);
//! - `KEEL.ACK`, `KEEL.FENCED`, `KEEL.LEADER`, `KEEL.LEASE`,
//!   `KEEL.FOLLOWING`, `KEEL.SNAPSHOT`, `KEEL.STALLED`, `KEEL.HANDOVER` answer
//!   `NOPERM` to any other user;
//! - the command filter rewrites what `guard` names into `KEEL.GUARD <the
//!   command>`, which runs it (unfiltered) only for the control user where
//!   `Guard::allows` says so, and otherwise answers `refusal`: role changes
//!   (`REPLICAOF`, `SLAVEOF`, `CLUSTER FAILOVER`…; `FAILOVER` at top level
//!   is a graceful handover instead, handover_commands.rs), changes of
//!   the control user itself (`ACL SETUSER`/`DELUSER` naming it), and
//!   `CONFIG SET replica-read-only no` (a replica must refuse writes: it
//!   does not hold the lease, so nothing it took would be journaled),
//!   `CONFIG SET masterauth`/`masteruser` (and Valkey's `primaryauth`/
//!   `primaryuser`: the password a replica shows its sidecar's feed, which
//!   the sidecar sets; anyone else's would cut the replica off its feed),
//!   and `MODULE UNLOAD keel` (writes would be answered before durable).
//! The filter runs before MULTI queues a command and for a script's calls
//! too, so neither bypasses it (`KEEL.GUARD` is `deny-script`).

/// Shortest secret accepted.
pub const MIN_SECRET_BYTES: usize = 16;
/// Longest control user name accepted.
pub const MAX_USER_BYTES: usize = 128;
/// The control user when `control_user=` is not given.
pub const DEFAULT_USER: &str = "keel-sidecar";

/// The control secret: never printed (`Debug` shows its length only).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret(<{} bytes, not shown>)", self.0.len())
    }
}

/// Checks the contents and permission bits of the secret file at `path`:
/// one trailing newline is not part of the secret; the rest must be at
/// least `MIN_SECRET_BYTES` long, and the file readable by its owner only.
pub fn check_secret(path: &str, contents: &[u8], mode: u32) -> Result<Secret, String> {
    if mode & 0o077 != 0 {
        return Err(format!(
            "keel: control_secret_file {path:?} is readable or writable by group or others (mode {:o}); chmod 600 it",
            mode & 0o777
        ));
    }
    let s = contents.strip_suffix(b"\n").unwrap_or(contents);
    let s = s.strip_suffix(b"\r").unwrap_or(s);
    if s.is_empty() {
        return Err(format!("keel: control_secret_file {path:?} is empty; write a secret of at least {MIN_SECRET_BYTES} bytes into it"));
    }
    if s.len() < MIN_SECRET_BYTES {
        return Err(format!(
            "keel: the secret in control_secret_file {path:?} is {} bytes; it must be at least {MIN_SECRET_BYTES} (e.g. `head -c 32 /dev/urandom | xxd -p -c 64`)",
            s.len()
        ));
    }
    if s.iter().any(|&b| b == b'\n' || b == b'\r' || b == 0) {
        return Err(format!("keel: the secret in control_secret_file {path:?} must be one line"));
    }
    Ok(Secret(s.to_vec()))
}

/// Reads and checks the secret file (`check_secret`).
pub fn read_secret(path: &str) -> Result<Secret, String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| format!("keel: control_secret_file {path:?}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("keel: control_secret_file {path:?} is not a regular file"));
    }
    let contents = std::fs::read(path).map_err(|e| format!("keel: control_secret_file {path:?}: {e}"))?;
    check_secret(path, &contents, meta.permissions().mode())
}

/// Whether `name` can be an ACL user name given as one argument.
pub fn valid_user(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_USER_BYTES
        && name.bytes().all(|b| b.is_ascii_graphic())
        && !name.starts_with(['>', '<', '~', '&', '+', '-', '%', '#', '!'])
}

/// The control commands: only the control user may run them.
pub const CONTROL_COMMANDS: &[&str] = &["keel.ack", "keel.fenced", "keel.leader", "keel.lease", "keel.following", "keel.snapshot", "keel.stalled", "keel.handover"];

/// Text a control command hands to `INFO keel` (`KEEL.STALLED`'s reason),
/// as one line: control characters become spaces, at most `max` bytes
/// (cut on a char boundary).
pub fn info_line(b: &[u8], max: usize) -> String {
    let mut s: String = String::from_utf8_lossy(b).chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// The answer to a control command from any other user.
pub fn not_control(command: &str, control_user: &str) -> String {
    format!(
        "NOPERM only this node's Keel sidecar (ACL user '{control_user}') may run {}",
        command.to_ascii_uppercase()
    )
}

/// A command the filter hands to `KEEL.GUARD`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guard {
    /// Changes Redis's role (REPLICAOF, CLUSTER FAILOVER…).
    Role,
    /// `FAILOVER`: a graceful handover (handover.rs), never Redis's own;
    /// only sent alone, at top level.
    Handover,
    /// Changes or deletes the control user.
    ControlUser,
    /// Lets a replica take writes (`CONFIG SET replica-read-only no`).
    ReadOnlyConfig,
    /// `MODULE UNLOAD keel`: writes would be answered before durable.
    Unload,
    /// Sets the password a replica shows its sidecar's feed.
    FeedLink,
}

impl Guard {
    /// Whether the command runs for this caller.
    pub fn allows(self, caller_is_control: bool) -> bool {
        match self {
            Guard::Role | Guard::ControlUser | Guard::FeedLink => caller_is_control,
            Guard::ReadOnlyConfig | Guard::Unload | Guard::Handover => false,
        }
    }
}

/// What `KEEL.GUARD` must do with a command (arguments as sent, name
/// first), if anything.
pub fn guard<A: AsRef<[u8]>>(args: &[A], control_user: &[u8]) -> Option<Guard> {
    let arg = |i: usize| args.get(i).map(|a| a.as_ref());
    let is = |i: usize, w: &str| arg(i).is_some_and(|a| a.eq_ignore_ascii_case(w.as_bytes()));
    let name = arg(0)?;
    if name.eq_ignore_ascii_case(b"failover") {
        return Some(Guard::Handover);
    }
    if ["replicaof", "slaveof"].iter().any(|n| name.eq_ignore_ascii_case(n.as_bytes())) {
        return Some(Guard::Role);
    }
    if name.eq_ignore_ascii_case(b"cluster") && ["failover", "replicate", "reset"].iter().any(|s| is(1, s)) {
        return Some(Guard::Role);
    }
    if name.eq_ignore_ascii_case(b"acl") {
        // User names are case-sensitive.
        if is(1, "setuser") && arg(2) == Some(control_user) {
            return Some(Guard::ControlUser);
        }
        if is(1, "deluser") && args.iter().skip(2).any(|a| a.as_ref() == control_user) {
            return Some(Guard::ControlUser);
        }
        return None;
    }
    if name.eq_ignore_ascii_case(b"module") && is(1, "unload") && is(2, "keel") {
        return Some(Guard::Unload);
    }
    if name.eq_ignore_ascii_case(b"config") && is(1, "set") {
        let pairs = args.get(2..).unwrap_or_default().chunks(2);
        for pair in pairs {
            let [param, value] = pair else { break };
            let param = param.as_ref();
            let read_only = param.eq_ignore_ascii_case(b"replica-read-only") || param.eq_ignore_ascii_case(b"slave-read-only");
            if read_only && !value.as_ref().eq_ignore_ascii_case(b"yes") {
                return Some(Guard::ReadOnlyConfig);
            }
            if FEED_LINK_CONFIGS.iter().any(|c| param.eq_ignore_ascii_case(c.as_bytes())) {
                return Some(Guard::FeedLink);
            }
        }
    }
    None
}

/// The settings with which a replica authenticates to its master: here,
/// its sidecar's feed.
pub const FEED_LINK_CONFIGS: &[&str] = &["masterauth", "masteruser", "primaryauth", "primaryuser"];

/// The error a refused guarded command gets (`name`: its name as sent).
pub fn refusal(g: Guard, name: &[u8], control_user: &str) -> String {
    let name = String::from_utf8_lossy(name).to_ascii_uppercase();
    match g {
        Guard::Role => format!(
            "ERR Keel decides this node's role: {name} is refused (send FAILOVER [TO host port] to the primary \
             to hand over gracefully)"
        ),
        Guard::Handover => "ERR Keel: send FAILOVER by itself, to the primary: not inside MULTI, a script or one of \
             Keel's wrappers"
            .into(),
        Guard::ControlUser => format!(
            "NOPERM the ACL user '{control_user}' belongs to this node's Keel sidecar: the module sets it from \
             control_secret_file; write the new secret into that file (the module applies it within a second; no restart)"
        ),
        Guard::ReadOnlyConfig => "ERR Keel keeps replica-read-only yes: a replica does not hold the lease, and a write \
             it took would never be journaled"
            .into(),
        Guard::FeedLink => "ERR Keel sets masterauth/masteruser itself: the node's sidecar gives its Redis the password \
             of its replica feed"
            .into(),
        Guard::Unload => "ERR Keel cannot be unloaded from a running node: its writes would be answered before they \
             are durable; restart redis-server without the module instead"
            .into(),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::Strategy as _;

    use super::*;

    const U: &[u8] = b"keel-sidecar";

    #[test]
    fn info_lines_are_one_bounded_line() {
        assert_eq!(info_line(b"record is 6 bytes", 64), "record is 6 bytes");
        assert_eq!(info_line(b"a\r\nb\tc", 64), "a  b c");
        assert_eq!(info_line(b"\xff!", 64), "\u{fffd}!");
        let long = "\u{e9}".repeat(100);
        let cut = info_line(long.as_bytes(), 51);
        assert_eq!(cut.len(), 50, "cut on a char boundary");
        assert!(cut.chars().all(|c| c == '\u{e9}'));
        assert_eq!(info_line(b"", 0), "");
    }

    fn g(args: &[&str]) -> Option<Guard> {
        guard(&args.iter().map(|a| a.as_bytes()).collect::<Vec<_>>(), U)
    }

    #[test]
    fn role_commands_are_guarded_in_any_case() {
        for args in [
            &["REPLICAOF", "NO", "ONE"][..],
            &["replicaof", "127.0.0.1", "6379"],
            &["SlaveOf", "no", "one"],
            &["CLUSTER", "FAILOVER"],
            &["cluster", "failover", "TAKEOVER"],
            &["cluster", "replicate", "abc"],
            &["cluster", "RESET", "hard"],
            &["replicaof"],
        ] {
            assert_eq!(g(args), Some(Guard::Role), "{args:?}");
        }
        for args in [&["FAILOVER"][..], &["failover", "TO", "h", "1", "FORCE"], &["failover", "abort"]] {
            assert_eq!(g(args), Some(Guard::Handover), "{args:?}");
            assert!(!Guard::Handover.allows(true), "never Redis's own FAILOVER, not even for the sidecar");
        }
        for args in [&["cluster", "info"][..], &["role"], &["set", "replicaof", "x"], &["info", "replication"], &[]] {
            assert_eq!(g(args), None, "{args:?}");
        }
    }

    #[test]
    fn only_the_control_user_is_guarded_among_acl_commands() {
        assert_eq!(g(&["ACL", "SETUSER", "keel-sidecar", "reset"]), Some(Guard::ControlUser));
        assert_eq!(g(&["acl", "setuser", "keel-sidecar"]), Some(Guard::ControlUser));
        assert_eq!(g(&["acl", "deluser", "bob", "keel-sidecar"]), Some(Guard::ControlUser));
        assert_eq!(g(&["acl", "DelUser", "keel-sidecar"]), Some(Guard::ControlUser));
        // Other users, other subcommands, and names that only look alike.
        for args in [
            &["acl", "setuser", "bob", "on"][..],
            &["acl", "setuser", "KEEL-SIDECAR", "on"],
            &["acl", "deluser", "bob"],
            &["acl", "getuser", "keel-sidecar"],
            &["acl", "list"],
            &["acl", "setuser", "bob", "keel-sidecar"],
            &["acl"],
        ] {
            assert_eq!(g(args), None, "{args:?}");
        }
        assert_eq!(guard(&[&b"acl"[..], b"setuser", b"ops"], b"ops"), Some(Guard::ControlUser));
    }

    #[test]
    fn the_feed_s_password_is_the_sidecar_s_to_set() {
        for args in [
            &["CONFIG", "SET", "masterauth", "x"][..],
            &["config", "set", "maxmemory", "0", "MasterUser", "bob"],
            &["config", "set", "primaryauth", "x"],
            &["config", "set", "primaryuser", "x"],
        ] {
            assert_eq!(g(args), Some(Guard::FeedLink), "{args:?}");
        }
        assert_eq!(g(&["config", "get", "masterauth"]), None);
        assert!(Guard::FeedLink.allows(true) && !Guard::FeedLink.allows(false));
        assert!(refusal(Guard::FeedLink, b"config", "keel-sidecar").contains("masterauth"));
    }

    #[test]
    fn replica_read_only_may_only_be_set_to_yes() {
        for args in [
            &["CONFIG", "SET", "replica-read-only", "no"][..],
            &["config", "set", "Slave-Read-Only", "NO"],
            &["config", "set", "maxmemory", "0", "replica-read-only", "no"],
            &["config", "set", "replica-read-only", "0"],
            &["config", "set", "replica-read-only", "false"],
        ] {
            assert_eq!(g(args), Some(Guard::ReadOnlyConfig), "{args:?}");
        }
        for args in [
            &["config", "set", "replica-read-only", "yes"][..],
            &["config", "set", "replica-read-only", "YES", "maxmemory", "0"],
            &["config", "get", "replica-read-only"],
            &["config", "set", "maxmemory", "replica-read-only"],
            &["config", "set", "replica-read-only"],
            &["config", "set", "replica-serve-stale-data", "no"],
        ] {
            assert_eq!(g(args), None, "{args:?}");
        }
    }

    #[test]
    fn the_module_is_never_unloaded() {
        assert_eq!(g(&["MODULE", "UNLOAD", "keel"]), Some(Guard::Unload));
        assert_eq!(g(&["module", "unload", "KEEL"]), Some(Guard::Unload));
        assert_eq!(g(&["module", "unload", "other"]), None);
        assert_eq!(g(&["module", "list"]), None);
        assert!(!Guard::Unload.allows(true));
    }

    #[test]
    fn only_the_control_user_passes_and_never_for_read_only() {
        assert!(Guard::Role.allows(true) && !Guard::Role.allows(false));
        assert!(Guard::ControlUser.allows(true) && !Guard::ControlUser.allows(false));
        assert!(!Guard::ReadOnlyConfig.allows(true) && !Guard::ReadOnlyConfig.allows(false));
        let r = refusal(Guard::Role, b"replicaof", "keel-sidecar");
        assert!(r.starts_with("ERR Keel decides this node's role: REPLICAOF is refused"), "{r}");
        assert!(refusal(Guard::ControlUser, b"acl", "ops").contains("'ops'"));
        assert_eq!(
            not_control("keel.ack", "keel-sidecar"),
            "NOPERM only this node's Keel sidecar (ACL user 'keel-sidecar') may run KEEL.ACK"
        );
    }

    #[test]
    fn secret_files_are_checked() {
        let good = b"0123456789abcdef0123\n";
        assert_eq!(check_secret("f", good, 0o100600).unwrap().bytes(), b"0123456789abcdef0123");
        assert_eq!(check_secret("f", b"0123456789abcdef\r\n", 0o400).unwrap().bytes(), b"0123456789abcdef");
        for (contents, mode, says) in [
            (&good[..], 0o644, "group or others"),
            (good, 0o640, "chmod 600"),
            (good, 0o602, "group or others"),
            (b"", 0o600, "empty"),
            (b"\n", 0o600, "empty"),
            (b"short\n", 0o600, "at least 16"),
            (b"0123456789abcde", 0o600, "15 bytes"),
            (b"0123456789\nabcdef0123", 0o600, "one line"),
        ] {
            let e = check_secret("/etc/keel/secret", contents, mode).unwrap_err();
            assert!(e.contains(says) && e.contains("/etc/keel/secret"), "{contents:?} {mode:o}: {e}");
            assert!(!e.contains("0123456789"), "the secret leaked into the error: {e}");
        }
        assert_eq!(format!("{:?}", check_secret("f", good, 0o600).unwrap()), "Secret(<20 bytes, not shown>)");
    }

    #[test]
    fn user_names_are_one_acl_word() {
        assert!(valid_user("keel-sidecar") && valid_user("ops_1"));
        for bad in ["", "a b", "a\tb", "a\nb", ">pw", "+@all", "~k", "é", &"x".repeat(MAX_USER_BYTES + 1)] {
            assert!(!valid_user(bad), "{bad:?}");
        }
    }

    proptest::proptest! {
        /// Any arguments (a client's command as sent): a decision, never a
        /// panic; a guarded command is always one of the listed names.
        #[test]
        fn guard_decides_on_any_arguments(
            args in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::sample::select(&["replicaof", "SLAVEOF", "failover", "cluster", "acl", "config", "module",
                        "set", "setuser", "deluser", "keel-sidecar", "unload", "keel", "replica-read-only", "no", "yes"][..])
                        .prop_map(|w| w.as_bytes().to_vec()),
                    proptest::collection::vec(proptest::prelude::any::<u8>(), 0..12),
                ],
                0..8,
            ),
        ) {
            if let Some(g) = guard(&args, U) {
                let name = args[0].to_ascii_lowercase();
                proptest::prop_assert!(
                    [&b"replicaof"[..], b"slaveof", b"failover", b"cluster", b"acl", b"config", b"module"].contains(&name.as_slice()),
                    "{g:?} for {args:?}"
                );
                proptest::prop_assert!(!refusal(g, &args[0], "keel-sidecar").contains('\n'));
            }
        }

        /// `KEEL.STALLED`'s reason of any bytes: one line of at most `max` bytes.
        #[test]
        fn info_line_is_one_bounded_line(b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200), max in 0usize..100) {
            let l = info_line(&b, max);
            proptest::prop_assert!(l.len() <= max);
            proptest::prop_assert!(!l.chars().any(|c| c.is_control()));
        }

        /// A secret file of any contents and mode: a secret of the file's
        /// one line, or an error that does not show the contents.
        #[test]
        fn check_secret_never_shows_the_contents(contents in "[a-zA-Z0-9]{0,40}\n?", mode in 0u32..0o1000) {
            match check_secret("/s", contents.as_bytes(), mode) {
                Ok(s) => proptest::prop_assert_eq!(s.bytes(), contents.trim_end().as_bytes()),
                Err(e) => proptest::prop_assert!(contents.trim_end().len() < 4 || !e.contains(contents.trim_end()), "{e}"),
            }
        }
    }

    #[test]
    fn a_missing_file_is_named() {
        let e = read_secret("/nonexistent/keel.secret").unwrap_err();
        assert!(e.contains("/nonexistent/keel.secret"), "{e}");
    }
}
