//! ACL users and the module's wrapper commands.
//!
//! The filter rewrites a client's command (`SET k v` becomes `KEEL.W SET k
//! v`), so Redis's own ACL check sees the wrapper, not the command. Every
//! user is therefore allowed the wrappers a client's commands can become
//! (`ACL SETUSER` gets them appended, other users get them when the module
//! loads and after `ACL LOAD`), and the wrapper runs the command with
//! `RM_Call`'s `C` flag: as the client's user, against that user's rules.
//! A refusal reported by `RM_Call` ("acl verification failed, …") is
//! answered with the text Redis itself gives (`NOPERM …`, or the script
//! form inside a script).

/// The commands a client's command can be rewritten into (listed once, in
/// `commands::KEEL_COMMANDS`).
pub use crate::commands::client_wrappers;

/// The ACL rules that allow a user the wrappers.
pub fn grant_rules() -> impl Iterator<Item = String> {
    client_wrappers().map(|w| format!("+{w}"))
}

/// Whether a (lower-cased) command and its first argument is `ACL SETUSER`
/// with a user name.
pub fn is_setuser(name: &[u8], sub: Option<&[u8]>, argc: usize) -> bool {
    name == b"acl" && argc >= 3 && sub.is_some_and(|s| s.eq_ignore_ascii_case(b"setuser"))
}

/// Whether a command replaces the users (`ACL LOAD`).
pub fn is_load(name: &[u8], sub: Option<&[u8]>) -> bool {
    name == b"acl" && sub.is_some_and(|s| s.eq_ignore_ascii_case(b"load"))
}

/// The name Redis gives a command in its messages: `set`, `config|set`.
pub fn full_name(name: &[u8], sub: Option<&[u8]>, is_container: bool) -> String {
    let mut s = String::from_utf8_lossy(name).to_ascii_lowercase();
    if let (true, Some(sub)) = (is_container, sub) {
        s.push('|');
        s.push_str(&String::from_utf8_lossy(sub).to_ascii_lowercase());
    }
    s
}

/// Who ran the refused command: a client, or a script of a client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caller {
    Client,
    Script,
}

const PREFIX: &str = "acl verification failed, ";
const CMD: &str = "can't run this command or subcommand";
const KEY: &str = "can't access at least one of the keys mentioned in the command arguments";
const CHANNEL: &str = "can't publish to the channel mentioned in the command";

/// Redis's own error text for an ACL refusal that `RM_Call` reported as
/// `error` (without the leading `-`); `None` if it is not one. `command`
/// gives the command's name (`full_name`), asked only for a refusal.
pub fn native_refusal(error: &[u8], caller: Caller, command: impl FnOnce() -> String) -> Option<String> {
    let text = std::str::from_utf8(error).ok()?;
    // Redis 7.0 puts an ERR code in front of the text; later servers may not.
    let reason = text
        .strip_prefix("ERR ")
        .unwrap_or(text)
        .strip_prefix(PREFIX)?;
    let reason = reason.strip_suffix('.').unwrap_or(reason);
    Some(match caller {
        // Inside a script Redis says "The user executing the script …".
        Caller::Script => format!("ERR The user executing the script {reason}"),
        Caller::Client => match reason {
            CMD => format!("NOPERM this user has no permissions to run the '{}' command", command()),
            KEY => "NOPERM this user has no permissions to access one of the keys used as arguments".into(),
            CHANNEL => "NOPERM this user has no permissions to access one of the channels used as arguments".into(),
            other => format!("NOPERM {other}"),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_read_as_redis_writes_them() {
        const CMD: &str = "acl verification failed, can't run this command or subcommand.";
        const KEY: &str = "acl verification failed, can't access at least one of the keys mentioned in the command arguments.";
        const CHAN: &str = "acl verification failed, can't publish to the channel mentioned in the command.";
        // (what RM_Call answered, command, caller, what Redis itself says)
        let cases = [
            ("ERR acl verification failed, can't run this command or subcommand.", "hset", Caller::Client,
             "NOPERM this user has no permissions to run the 'hset' command"),
            (CMD, "set", Caller::Client, "NOPERM this user has no permissions to run the 'set' command"),
            (CMD, "set", Caller::Script, "ERR The user executing the script can't run this command or subcommand"),
            (KEY, "set", Caller::Client, "NOPERM this user has no permissions to access one of the keys used as arguments"),
            (CHAN, "publish", Caller::Client, "NOPERM this user has no permissions to access one of the channels used as arguments"),
            ("acl verification failed, lacking the permissions for the command.", "set", Caller::Client,
             "NOPERM lacking the permissions for the command"),
        ];
        for (answer, command, caller, native) in cases {
            assert_eq!(native_refusal(answer.as_bytes(), caller, || command.to_string()).as_deref(), Some(native), "{answer}");
        }
    }

    #[test]
    fn other_errors_are_left_alone() {
        for e in [
            &b"WRONGTYPE Operation against a key holding the wrong kind of value"[..],
            b"",
            b"\xff\xfe",
            b"acl verification",
        ] {
            assert_eq!(native_refusal(e, Caller::Client, || unreachable!("the name is asked for refusals only")), None);
        }
    }

    #[test]
    fn setuser_and_load_are_recognised_in_any_case() {
        assert!(is_setuser(b"acl", Some(b"SetUser"), 3));
        assert!(!is_setuser(b"acl", Some(b"setuser"), 2));
        assert!(!is_setuser(b"acl", Some(b"getuser"), 3));
        assert!(!is_setuser(b"set", Some(b"setuser"), 3));
        assert!(is_load(b"acl", Some(b"LOAD")));
        assert!(!is_load(b"acl", None));
    }

    #[test]
    fn full_names_name_subcommands_of_containers_only() {
        assert_eq!(full_name(b"SET", Some(b"k"), false), "set");
        assert_eq!(full_name(b"CONFIG", Some(b"SET"), true), "config|set");
        assert_eq!(full_name(b"config", None, true), "config");
    }

    #[test]
    fn every_wrapper_is_granted() {
        let rules: Vec<String> = grant_rules().collect();
        assert_eq!(rules.len(), client_wrappers().count());
        assert!(
            rules.contains(&"+keel.w".to_string()) && rules.contains(&"+keel.nolease".to_string())
        );
    }
}
