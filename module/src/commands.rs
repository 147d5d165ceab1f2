//! Command names: the module's own `keel.*` commands, listed once, and what
//! Redis's `COMMAND` says about every other command (read once at load).
//!
//! Everything that must know a `keel.*` name reads `KEEL_COMMANDS`: their
//! registration (`register.rs`), the routing rule that never rewrites them
//! (`routing.rs`), the ACL grants of the wrappers a client's command becomes
//! (`acl.rs`), and the README's list. Pure data, no Redis.

use std::collections::HashMap;
use std::collections::HashSet;

/// What a `keel.*` command is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A client's command may be rewritten into it by the filter: every ACL
    /// user is granted it (acl.rs).
    ClientWrapper,
    /// Sent by this node's sidecar only (control.rs).
    Control,
    /// Called by the module itself (`KEEL.COUNTEDERROR`).
    Internal,
}

/// One of the module's commands.
#[derive(Debug, Clone, Copy)]
pub struct KeelCommand {
    /// Lower-cased, as registered.
    pub name: &'static str,
    /// `RM_CreateCommand` flags.
    pub flags: &'static str,
    pub kind: Kind,
}

const fn cmd(name: &'static str, flags: &'static str, kind: Kind) -> KeelCommand {
    KeelCommand { name, flags, kind }
}

/// Every `keel.*` command, in registration order (which is also the order
/// of the grant rules `ACL SETUSER` gets: users' ACL texts depend on it).
///
/// All are `no-monitor no-slowlog`: MONITOR and SLOWLOG show what a wrapper
/// runs for its client (the module's call of the client's command, as
/// sent), never the wrapper; the sidecar's control traffic shows nowhere.
pub const KEEL_COMMANDS: &[KeelCommand] = &[
    cmd("keel.w", "write no-monitor no-slowlog", Kind::ClientWrapper),
    cmd("keel.r", "readonly no-monitor no-slowlog", Kind::ClientWrapper),
    cmd("keel.t", "no-monitor no-slowlog", Kind::ClientWrapper),
    cmd("keel.tw", "write deny-oom no-monitor no-slowlog", Kind::ClientWrapper),
    cmd("keel.tb", "allow-busy allow-loading allow-stale deny-script fast no-monitor no-slowlog", Kind::ClientWrapper),
    cmd("keel.b", "write no-monitor no-slowlog", Kind::ClientWrapper),
    cmd("keel.br", "readonly no-monitor no-slowlog", Kind::ClientWrapper),
    cmd("keel.ack", "admin fast no-monitor no-slowlog allow-busy", Kind::Control),
    cmd("keel.fenced", "admin no-monitor no-slowlog allow-busy", Kind::Control),
    cmd("keel.leader", "admin no-monitor no-slowlog allow-busy", Kind::Control),
    cmd("keel.lease", "admin fast no-monitor no-slowlog allow-busy allow-loading allow-stale", Kind::Control),
    cmd("keel.nolease", "fast no-monitor no-slowlog allow-loading allow-stale", Kind::ClientWrapper),
    cmd("keel.following", "admin fast no-monitor no-slowlog allow-loading allow-stale", Kind::Control),
    cmd("keel.snapshot", "admin fast no-monitor no-slowlog allow-loading allow-stale allow-busy", Kind::Control),
    cmd("keel.stalled", "admin fast no-monitor no-slowlog allow-loading allow-stale allow-busy", Kind::Control),
    cmd("keel.handover", "admin fast no-monitor no-slowlog", Kind::Control),
    cmd("keel.info", "admin fast no-monitor no-slowlog allow-busy allow-loading allow-stale", Kind::Control),
    cmd("keel.countederror", "fast no-monitor no-slowlog allow-busy allow-loading allow-stale", Kind::Internal),
    // Not `admin`: every user is granted it (acl.rs) and gets Keel's
    // refusal; it runs the command only for the control user.
    // `allow-busy`: SHUTDOWN of a primary comes here too, and SHUTDOWN
    // NOSAVE must still end a busy script; everything else it refuses then.
    cmd("keel.guard", "no-monitor no-slowlog deny-script allow-stale allow-busy", Kind::ClientWrapper),
    // INFO (command counts) and ACL GETUSER/LIST, edited (view.rs).
    cmd("keel.view", "no-monitor no-slowlog allow-loading allow-stale", Kind::ClientWrapper),
];

/// Whether `name` (lower-cased) is one of the module's commands.
pub fn is_keel(name: &[u8]) -> bool {
    KEEL_COMMANDS.iter().any(|c| c.name.as_bytes() == name)
}

/// The commands a client's command can be rewritten into.
pub fn client_wrappers() -> impl Iterator<Item = &'static str> {
    KEEL_COMMANDS.iter().filter(|c| c.kind == Kind::ClientWrapper).map(|c| c.name)
}

/// What `COMMAND` says, read once at load (register.rs reads it).
#[derive(Debug, Default, Clone)]
pub struct CommandTable {
    /// Flagged `write` or `may_replicate` (and subcommands, as
    /// `container|sub`), and the script calls: their replies are held.
    pub writes: HashSet<Vec<u8>>,
    /// Flagged `no_multi`: refused inside MULTI.
    pub no_multi: HashSet<Vec<u8>>,
    /// Flagged `allow_busy`: served while a script runs too long.
    pub allow_busy: HashSet<Vec<u8>>,
    /// Flagged `readonly`: data reads.
    pub reads: HashSet<Vec<u8>>,
    /// Commands with subcommands (`config`, `client`…), for error texts.
    pub containers: HashSet<Vec<u8>>,
    /// Arity (negative: at least that many arguments), by name and by
    /// `container|sub`.
    pub arity: HashMap<Vec<u8>, i64>,
}

impl CommandTable {
    /// Whether a command (name lower-cased, first argument as sent) writes.
    pub fn is_write(&self, name: &[u8], sub: Option<&[u8]>) -> bool {
        in_table(&self.writes, name, sub)
    }

    /// Whether a command is a data read (flagged `readonly`).
    pub fn is_read(&self, name: &[u8], sub: Option<&[u8]>) -> bool {
        in_table(&self.reads, name, sub)
    }

    /// Whether Redis serves a command during a busy script.
    pub fn allows_busy(&self, name: &[u8], sub: Option<&[u8]>) -> bool {
        in_table(&self.allow_busy, name, sub)
    }
}

/// Longest subcommand looked up as `container|sub` (longer ones are no
/// subcommand of Redis's).
const MAX_SUBCOMMAND_BYTES: usize = 64;

/// Whether `name` or `name|sub` is in a table of command names.
fn in_table(table: &HashSet<Vec<u8>>, name: &[u8], sub: Option<&[u8]>) -> bool {
    if table.contains(name) {
        return true;
    }
    let Some(sub) = sub else { return false };
    if sub.len() > MAX_SUBCOMMAND_BYTES {
        return false;
    }
    let mut full = name.to_vec();
    full.push(b'|');
    full.extend(sub.iter().map(|b| b.to_ascii_lowercase()));
    table.contains(&full)
}

/// Whether `argc` arguments (the name included) fit a command's arity
/// (negative: at least that many).
pub fn arity_allows(arity: i64, argc: usize) -> bool {
    let argc = argc as i64;
    if arity >= 0 { argc == arity } else { argc >= -arity }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keel_names_are_unique_lower_case_and_prefixed() {
        let mut seen = HashSet::new();
        for c in KEEL_COMMANDS {
            assert!(c.name.starts_with("keel."), "{}", c.name);
            assert_eq!(c.name, c.name.to_ascii_lowercase());
            assert!(seen.insert(c.name), "{} listed twice", c.name);
        }
        assert!(is_keel(b"keel.w") && is_keel(b"keel.countederror") && !is_keel(b"set"));
    }

    #[test]
    fn client_wrappers_keep_their_grant_order() {
        let w: Vec<&str> = client_wrappers().collect();
        assert_eq!(w, ["keel.w", "keel.r", "keel.t", "keel.tw", "keel.tb", "keel.b", "keel.br", "keel.nolease", "keel.guard", "keel.view"]);
    }

    #[test]
    fn subcommands_are_looked_up_as_container_bar_sub() {
        let mut t = CommandTable::default();
        t.writes.insert(b"set".to_vec());
        t.writes.insert(b"config|set".to_vec());
        assert!(t.is_write(b"set", None));
        assert!(t.is_write(b"config", Some(b"SET")));
        assert!(!t.is_write(b"config", Some(b"get")));
        assert!(!t.is_write(b"config", None));
        assert!(!t.is_write(b"config", Some(&[b's'; 65])));
    }

    #[test]
    fn arity_is_exact_or_a_minimum() {
        assert!(arity_allows(2, 2) && !arity_allows(2, 3));
        assert!(arity_allows(-2, 2) && arity_allows(-2, 5) && !arity_allows(-2, 1));
    }
}

#[cfg(test)]
mod flag_tests {
    use super::*;

    #[test]
    fn no_keel_command_shows_in_monitor_or_slowlog() {
        for c in KEEL_COMMANDS {
            let flags: Vec<&str> = c.flags.split_whitespace().collect();
            assert!(flags.contains(&"no-monitor") && flags.contains(&"no-slowlog"), "{} is shown: {}", c.name, c.flags);
        }
    }
}
