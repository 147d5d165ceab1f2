//! Introspection as a client would see it without Keel.
//!
//! Keel's wrappers are commands of their own, so some of Redis's reports
//! would show them: `INFO commandstats` and `INFO latencystats` count
//! `keel.*` calls (the sidecar's control commands, every wrapped command),
//! and `ACL GETUSER` / `ACL LIST` show the grant rules every user gets
//! (`+keel.w +keel.r …`, acl.rs), which the user never set. The filter
//! hands these commands (`view_of`) to `KEEL.VIEW`, which runs them for the
//! client (as its ACL user) and passes each string of the reply through
//! `edit` before relaying it. Nothing else is changed: what Redis counted
//! for the client's own commands (the commands a wrapper runs, counted
//! under their own names) stays as Redis reports it.
//!
//! What no reply edit can reach (MONITOR's and SLOWLOG's address for a
//! wrapped command, `CLIENT LIST`'s `cmd=`, ACL LOG's `context`) is listed
//! in docs/compatibility.md with the module API's reason. Pure: no Redis.

use crate::commands;

/// An introspection command whose reply `KEEL.VIEW` edits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// `INFO` naming a section that counts commands (commandstats,
    /// latencystats, all, everything): `keel.*` lines are dropped.
    Info,
    /// `ACL GETUSER` / `ACL LIST`: the wrappers' grant rules are dropped.
    AclUsers,
    /// `CLIENT LIST`, `ACL LOG`: a client's `cmd=keel.…` (Redis's last
    /// command of that client, the wrapper) becomes the command the wrapper
    /// ran for it (`LastCommands`).
    Clients,
}

/// Each client's last command that a wrapper ran, as Redis names commands
/// (`set`, `config|get`): what `CLIENT LIST` would show without Keel. One
/// entry per connected client (forgotten when it leaves), so its size is
/// bounded by the server's `maxclients`.
#[derive(Debug, Default, Clone)]
pub struct LastCommands {
    by_client: std::collections::HashMap<u64, String>,
}

impl LastCommands {
    /// A wrapper ran `name` (full name, lower-cased) for client `id`.
    pub fn ran(&mut self, id: u64, name: &str) {
        match self.by_client.get_mut(&id) {
            Some(last) if last == name => {}
            Some(last) => {
                last.clear();
                last.push_str(name);
            }
            None => {
                self.by_client.insert(id, name.to_string());
            }
        }
    }

    pub fn left(&mut self, id: u64) {
        self.by_client.remove(&id);
    }

    pub fn get(&self, id: u64) -> Option<&str> {
        self.by_client.get(&id).map(|s| s.as_str())
    }

    pub fn len(&self) -> usize {
        self.by_client.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_client.is_empty()
    }
}

/// INFO sections that list commands by name.
const COMMAND_SECTIONS: &[&str] = &["commandstats", "latencystats", "all", "everything"];

/// Prefixes of INFO lines that are a `keel.*` command's.
const KEEL_INFO_LINES: &[&str] = &["cmdstat_keel.", "latency_percentiles_usec_keel."];

/// Whether a command (name lower-cased; `args` as sent, name first) is one
/// `KEEL.VIEW` runs and edits.
pub fn view_of(name: &[u8], args: &[&[u8]]) -> Option<View> {
    match name {
        b"info" => args[1..]
            .iter()
            .any(|a| COMMAND_SECTIONS.iter().any(|s| a.eq_ignore_ascii_case(s.as_bytes())))
            .then_some(View::Info),
        b"acl" => {
            let sub = args.get(1)?;
            if sub.eq_ignore_ascii_case(b"log") {
                return Some(View::Clients);
            }
            (sub.eq_ignore_ascii_case(b"getuser") || sub.eq_ignore_ascii_case(b"list")).then_some(View::AclUsers)
        }
        // Only LIST: the module runs it for the client, and CLIENT's other
        // subcommands act on the connection that sends them.
        b"client" => (args.len() >= 2 && args[1].eq_ignore_ascii_case(b"list")).then_some(View::Clients),
        _ => None,
    }
}

/// One string of the reply, edited; `None` when it is left as it is.
/// `last` gives a client's last wrapped command (`View::Clients`).
pub fn edit<'a>(view: View, text: &[u8], last: impl Fn(u64) -> Option<&'a str>) -> Option<Vec<u8>> {
    match view {
        View::Info => drop_keel_lines(text),
        View::AclUsers => drop_grants(text),
        View::Clients => unwrap_client_commands(text, last),
    }
}

/// A client list (lines of `id=… … cmd=…` fields) with each `cmd=keel.…`
/// replaced by the command the wrapper ran for that client, where known.
fn unwrap_client_commands<'a>(text: &[u8], last: impl Fn(u64) -> Option<&'a str>) -> Option<Vec<u8>> {
    const WRAPPED: &[u8] = b" cmd=keel.";
    if !text.windows(WRAPPED.len()).any(|w| w == WRAPPED) {
        return None;
    }
    let mut out = Vec::with_capacity(text.len());
    for line in text.split_inclusive(|&b| b == b'\n') {
        let id = line
            .strip_prefix(b"id=")
            .and_then(|r| r.split(|&b| b == b' ').next())
            .and_then(|v| std::str::from_utf8(v).ok()?.parse::<u64>().ok());
        let name = id.and_then(&last);
        let mut first = true;
        for field in line.split(|&b| b == b' ') {
            if !first {
                out.push(b' ');
            }
            first = false;
            match (field.strip_prefix(b"cmd=keel."), name) {
                (Some(_), Some(name)) => {
                    out.extend_from_slice(b"cmd=");
                    out.extend_from_slice(name.as_bytes());
                    // The field may end the line.
                    let end = field.iter().position(|&b| b == b'\r' || b == b'\n').unwrap_or(field.len());
                    out.extend_from_slice(&field[end..]);
                }
                _ => out.extend_from_slice(field),
            }
        }
    }
    Some(out)
}

/// An INFO text without the lines of `keel.*` commands.
fn drop_keel_lines(text: &[u8]) -> Option<Vec<u8>> {
    let is_keel = |line: &[u8]| KEEL_INFO_LINES.iter().any(|p| line.starts_with(p.as_bytes()));
    if !text.split(|&b| b == b'\n').any(is_keel) {
        return None;
    }
    let mut out = Vec::with_capacity(text.len());
    // Lines keep their own ends ("\r\n"); the last may have none.
    for line in text.split_inclusive(|&b| b == b'\n') {
        if !is_keel(line) {
            out.extend_from_slice(line);
        }
    }
    Some(out)
}

/// An ACL text (a rule list, or a whole `ACL LIST` line) without the
/// wrappers' grant rules. Only a whole space-separated word equal to a
/// grant rule goes: key patterns (`~…`, `%R~…`), channels (`&…`) and
/// passwords (`>…`, `#…`) never start with `+`.
fn drop_grants(text: &[u8]) -> Option<Vec<u8>> {
    let is_grant = |word: &[u8]| {
        word.first() == Some(&b'+') && commands::client_wrappers().any(|w| word[1..].eq_ignore_ascii_case(w.as_bytes()))
    };
    if !text.split(|&b| b == b' ').any(is_grant) {
        return None;
    }
    let kept: Vec<&[u8]> = text.split(|&b| b == b' ').filter(|w| !is_grant(w)).collect();
    Some(kept.join(&b' '))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn edit_(view: View, text: &[u8]) -> Option<Vec<u8>> {
        edit(view, text, |_| None)
    }

    fn view(cmd: &str) -> Option<View> {
        let args: Vec<&[u8]> = cmd.split(' ').map(|a| a.as_bytes()).collect();
        view_of(&args[0].to_ascii_lowercase(), &args)
    }

    #[test]
    fn only_commands_that_name_keel_are_viewed() {
        assert_eq!(view("INFO commandstats"), Some(View::Info));
        assert_eq!(view("info server LatencyStats"), Some(View::Info));
        assert_eq!(view("INFO everything"), Some(View::Info));
        assert_eq!(view("INFO ALL"), Some(View::Info));
        assert_eq!(view("INFO"), None, "the default sections count no command");
        assert_eq!(view("INFO keel"), None);
        assert_eq!(view("ACL GETUSER alice"), Some(View::AclUsers));
        assert_eq!(view("acl list"), Some(View::AclUsers));
        assert_eq!(view("ACL SETUSER alice on"), None);
        assert_eq!(view("ACL LOG"), Some(View::Clients));
        assert_eq!(view("CLIENT LIST"), Some(View::Clients));
        assert_eq!(view("client list TYPE normal"), Some(View::Clients));
        assert_eq!(view("CLIENT INFO"), None, "about the connection itself: run natively");
        assert_eq!(view("CLIENT KILL ID 1"), None);
        assert_eq!(view("CLIENT"), None);
        assert_eq!(view("ACL"), None);
        assert_eq!(view("GET commandstats"), None);
    }

    #[test]
    fn info_loses_keel_lines_only() {
        let info = "# Commandstats\r\ncmdstat_set:calls=1,usec=19\r\ncmdstat_keel.w:calls=4,usec=603\r\ncmdstat_keel.lease:calls=8\r\ncmdstat_get:calls=1\r\n";
        assert_eq!(
            String::from_utf8(edit_(View::Info, info.as_bytes()).unwrap()).unwrap(),
            "# Commandstats\r\ncmdstat_set:calls=1,usec=19\r\ncmdstat_get:calls=1\r\n"
        );
        let lat = "# Latencystats\r\nlatency_percentiles_usec_keel.w:p50=1.003\r\nlatency_percentiles_usec_set:p50=1.003";
        assert_eq!(
            String::from_utf8(edit_(View::Info, lat.as_bytes()).unwrap()).unwrap(),
            "# Latencystats\r\nlatency_percentiles_usec_set:p50=1.003"
        );
        assert_eq!(edit_(View::Info, b"# Commandstats\r\ncmdstat_set:calls=1\r\n"), None, "nothing to drop");
        assert_eq!(edit_(View::Info, b"# Keyspace\r\ndb0:keys=1,cmdstat_keel.w=1\r\n"), None, "only whole lines");
    }

    #[test]
    fn acl_texts_lose_the_grants_only() {
        let getuser = "-@all +keel.nolease +keel.tw +keel.r +keel.t +keel.b +keel.br +get +keel.tb +keel.w +keel.guard +keel.view";
        assert_eq!(String::from_utf8(edit_(View::AclUsers, getuser.as_bytes()).unwrap()).unwrap(), "-@all +get");
        let line = "user alice on #30c9 ~* resetchannels -@all +keel.w +get +keel.r";
        assert_eq!(
            String::from_utf8(edit_(View::AclUsers, line.as_bytes()).unwrap()).unwrap(),
            "user alice on #30c9 ~* resetchannels -@all +get"
        );
        for same in ["user default on nopass ~* &* +@all", "~+keel.w", "&+keel.w", "+keel.wx", "-keel.w", ""] {
            assert_eq!(edit_(View::AclUsers, same.as_bytes()), None, "{same}");
        }
    }

    #[test]
    fn client_lists_show_the_commands_wrappers_ran() {
        let mut last = LastCommands::default();
        last.ran(7, "set");
        last.ran(7, "incr");
        last.ran(9, "client|list");
        let list = "id=7 addr=127.0.0.1:1 name= cmd=keel.w user=default\nid=8 addr=x cmd=keel.lease user=keel-sidecar\nid=9 addr=y cmd=keel.view\n";
        let out = edit(View::Clients, list.as_bytes(), |id| last.get(id)).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "id=7 addr=127.0.0.1:1 name= cmd=incr user=default\nid=8 addr=x cmd=keel.lease user=keel-sidecar\nid=9 addr=y cmd=client|list\n"
        );
        // ACL LOG's client-info: one line, no line end.
        let info = "id=7 addr=127.0.0.1:1 fd=11 cmd=keel.w user=alice redir=-1 resp=2";
        assert_eq!(
            String::from_utf8(edit(View::Clients, info.as_bytes(), |id| last.get(id)).unwrap()).unwrap(),
            "id=7 addr=127.0.0.1:1 fd=11 cmd=incr user=alice redir=-1 resp=2"
        );
        assert_eq!(edit(View::Clients, b"id=7 cmd=get user=default\n", |id| last.get(id)), None);
        assert_eq!(edit(View::Clients, b"username", |id| last.get(id)), None);
        last.left(7);
        assert_eq!(last.get(7), None);
        assert_eq!(last.len(), 1);
    }

    proptest! {
        /// Dropping grants removes exactly the grant words, keeping every
        /// other word in order.
        #[test]
        fn grants_drop_and_nothing_else(words in proptest::collection::vec(
            prop_oneof![
                Just("+keel.w".to_string()), Just("+KEEL.R".to_string()), Just("+get".to_string()),
                Just("~*".to_string()), Just("-@all".to_string()), "[a-z+~&#>-]{0,6}",
            ], 0..12)) {
            let text = words.join(" ");
            let out = edit_(View::AclUsers, text.as_bytes()).unwrap_or_else(|| text.clone().into_bytes());
            let grant = |w: &str| w.starts_with('+') && commands::client_wrappers().any(|g| w[1..].eq_ignore_ascii_case(g));
            let kept: Vec<&str> = words.iter().map(|w| w.as_str()).filter(|w| !grant(w)).collect();
            prop_assert_eq!(String::from_utf8(out).unwrap(), kept.join(" "));
        }
    }
}
