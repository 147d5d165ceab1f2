//! How the sidecar proves to its Redis that it is this node's sidecar.
//!
//! The module lets only one ACL user (`--control-user`, default
//! `keel-sidecar`) run the control commands (`KEEL.ACK`, `KEEL.LEASE`…)
//! and change Redis's role (`REPLICAOF`); it creates that user with the
//! password in the file both are given (`control_secret_file=` on the
//! `--loadmodule` line, `--control-secret-file` here). Every connection the
//! sidecar opens to its Redis authenticates first (`authenticate`).
//!
//! Rotation: the file is read again for every new connection (same checks
//! as the module's: owner-only mode, one line of at least
//! `MIN_SECRET_BYTES`), so a reconnect uses the newest secret; connections
//! already open stay as they are. Which secrets to offer is `Secrets`'s
//! decision: the file's newest valid one first, then the one Redis last
//! accepted if it differs (the module reads the file once a second, so
//! for up to a second it may not accept the new one yet). An invalid file
//! is logged once and the last valid secret is used. A refusal of every
//! secret is an error the caller retries as any failed connection. The
//! secret is never printed: `Debug` shows its length, errors name the file
//! and the user only.

use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;

use crate::redis::Conn;
use crate::resp::Reply;

/// Shortest secret accepted (the module's bound too).
pub const MIN_SECRET_BYTES: usize = 16;
/// The control user when `--control-user` is not given.
pub const DEFAULT_USER: &str = "keel-sidecar";

/// The secrets known to the sidecar, fed the file's reads and Redis's
/// answers. Pure.
#[derive(Default)]
pub struct Secrets {
    /// The file's newest valid secret.
    newest: Vec<u8>,
    /// The last secret Redis accepted (empty: none yet).
    accepted: Vec<u8>,
    /// The file's refusal logged last, while it stays invalid.
    refused: Option<String>,
}

/// What a read of the file came to, to log.
#[derive(Debug, PartialEq, Eq)]
pub enum Read {
    /// Nothing to say (the same secret, or a refusal already logged).
    Quiet,
    /// The file holds a new secret.
    Changed,
    /// The file cannot be used (log it once); the last valid secret stays.
    Refused(String),
}

impl Secrets {
    /// The file was read (`check_secret`'s answer).
    pub fn read(&mut self, read: Result<Vec<u8>, String>) -> Read {
        match read {
            Ok(s) => {
                self.refused = None;
                if s == self.newest {
                    return Read::Quiet;
                }
                self.newest = s;
                Read::Changed
            }
            Err(why) if self.refused.as_ref() == Some(&why) => Read::Quiet,
            Err(why) => {
                self.refused = Some(why.clone());
                Read::Refused(why)
            }
        }
    }

    /// The secrets to offer, in order: the newest, then the last accepted
    /// if it differs.
    pub fn to_offer(&self) -> Vec<Vec<u8>> {
        let mut v = vec![self.newest.clone()];
        if !self.accepted.is_empty() && self.accepted != self.newest {
            v.push(self.accepted.clone());
        }
        v
    }

    /// Redis accepted `secret`.
    pub fn accepted(&mut self, secret: &[u8]) {
        self.accepted = secret.to_vec();
    }
}

/// The control user and where its password is read from (shared by every
/// clone: what one connection learns, the next uses).
#[derive(Clone)]
pub struct Credentials {
    pub user: String,
    path: PathBuf,
    secrets: Arc<Mutex<Secrets>>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let len = self.secrets.lock().unwrap().newest.len();
        write!(f, "Credentials {{ user: {:?}, file: {:?}, secret: <{len} bytes, not shown> }}", self.user, self.path)
    }
}

/// Reads and checks the secret file at `path` (`check_secret`).
pub fn read_secret(path: &Path) -> Result<Vec<u8>, String> {
    CONTROL_SECRET_FILE.read(path)
}

impl Credentials {
    /// Reads the secret of `user` from the file at `path` (`check_secret`);
    /// an invalid file at start is an error.
    pub fn from_file(user: &str, path: &Path) -> Result<Credentials, String> {
        if user.is_empty() || !user.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!("--control-user {user:?} must be an ACL user name (printable, no spaces)"));
        }
        let mut secrets = Secrets::default();
        secrets.read(Ok(read_secret(path)?));
        Ok(Credentials { user: user.to_string(), path: path.to_path_buf(), secrets: Arc::new(Mutex::new(secrets)) })
    }

    /// The secrets to offer on a new connection, the file read again.
    fn to_offer(&self) -> Vec<Vec<u8>> {
        let read = read_secret(&self.path);
        let mut secrets = self.secrets.lock().unwrap();
        match secrets.read(read) {
            Read::Quiet => {}
            Read::Changed => tracing::info!(file = %self.path.display(), "the control secret file holds a new secret; new connections to Redis use it"),
            Read::Refused(why) => tracing::warn!(%why, "the control secret file cannot be used; new connections to Redis keep the last valid secret"),
        }
        secrets.to_offer()
    }

    /// `AUTH <user> <secret>`.
    fn auth_args<'a>(&'a self, secret: &'a [u8]) -> [&'a [u8]; 3] {
        [b"AUTH", self.user.as_bytes(), secret]
    }

    /// Credentials for tests of the sidecar alone.
    #[cfg(test)]
    pub fn for_tests(user: &str, secret: &[u8]) -> Credentials {
        let mut secrets = Secrets::default();
        secrets.read(Ok(secret.to_vec()));
        Credentials { user: user.into(), path: PathBuf::from("/nonexistent"), secrets: Arc::new(Mutex::new(secrets)) }
    }
}

/// `AUTH` as the control user, first on a new connection to the Redis at
/// `redis` (`redis::Conn::connect`): offers the newest secret, then the
/// last accepted one (`Secrets::to_offer`). An error says what to check.
pub async fn authenticate(c: &mut Conn, creds: &Credentials, redis: &str) -> Result<(), String> {
    let mut refused = Err(String::new());
    for secret in creds.to_offer() {
        let line = match c.request(&creds.auth_args(&secret)).await.map_err(|e| format!("{e} (during AUTH)"))? {
            Reply::Status(s) => format!("+{s}"),
            Reply::Error(e) => format!("-{e}"),
            other => format!("{other:?}"),
        };
        refused = check_auth_reply(&line, &creds.user, redis);
        if refused.is_ok() {
            creds.secrets.lock().unwrap().accepted(&secret);
            break;
        }
    }
    refused
}

/// A one-line secret kept in a file only its owner may read (the control
/// secret here, the discovery endpoint's password in sentinel.rs): how
/// such a file is read and checked, and how its errors name it (never
/// showing the secret).
pub struct SecretFile {
    /// The flag that names the file.
    pub flag: &'static str,
    /// What the file holds ("secret", "password").
    pub what: &'static str,
    /// Shortest secret accepted.
    pub min_bytes: usize,
}

/// The control secret file (`--control-secret-file`).
pub const CONTROL_SECRET_FILE: SecretFile = SecretFile { flag: "--control-secret-file", what: "secret", min_bytes: MIN_SECRET_BYTES };

impl SecretFile {
    /// The secret in a file's `contents` (one trailing newline is not
    /// part of it), if the file's `mode` lets only its owner read it;
    /// `path` names the file in errors.
    pub fn check<'c>(&self, path: &str, contents: &'c [u8], mode: u32) -> Result<&'c [u8], String> {
        let (flag, what, min) = (self.flag, self.what, self.min_bytes);
        if mode & 0o077 != 0 {
            return Err(format!("{flag} {path} is readable or writable by group or others (mode {:o}): `chmod 600 {path}`", mode & 0o777));
        }
        let s = contents.strip_suffix(b"\n").unwrap_or(contents);
        let s = s.strip_suffix(b"\r").unwrap_or(s);
        if s.is_empty() {
            let hint = if min > 1 { format!("a {what} of at least {min} bytes") } else { format!("the {what}") };
            return Err(format!("{flag} {path} is empty: write {hint} into it"));
        }
        if s.len() < min {
            return Err(format!("the {what} in {flag} {path} is {} bytes; it must be at least {min}", s.len()));
        }
        if s.iter().any(|&b| b == b'\n' || b == b'\r' || b == 0) {
            return Err(format!("the {what} in {flag} {path} must be one line"));
        }
        Ok(s)
    }

    /// Reads and checks the file at `path` (a regular file; `check`).
    pub fn read(&self, path: &Path) -> Result<Vec<u8>, String> {
        use std::os::unix::fs::PermissionsExt;
        let (flag, shown) = (self.flag, path.display().to_string());
        let meta = std::fs::metadata(path).map_err(|e| format!("{flag} {shown}: {e}"))?;
        if !meta.is_file() {
            return Err(format!("{flag} {shown} is not a regular file"));
        }
        let contents = std::fs::read(path).map_err(|e| format!("{flag} {shown}: {e}"))?;
        self.check(&shown, &contents, meta.permissions().mode()).map(<[u8]>::to_vec)
    }
}

/// The secret in a control secret file's `contents` (`SecretFile::check`).
pub fn check_secret(path: &str, contents: &[u8], mode: u32) -> Result<Vec<u8>, String> {
    CONTROL_SECRET_FILE.check(path, contents, mode).map(<[u8]>::to_vec)
}

/// What Redis answered to the sidecar's `AUTH` (its first line): `Ok`, or
/// an error that says what to check (never the secret).
pub fn check_auth_reply(line: &str, user: &str, redis: &str) -> Result<(), String> {
    if line.starts_with("+OK") {
        return Ok(());
    }
    Err(format!(
        "Redis at {redis} refused the sidecar's AUTH as ACL user '{user}' ({}): give the module (control_secret_file=, \
         control_user=) and the sidecar (--control-secret-file, --control-user) the same file and user",
        line.trim_start_matches('-')
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_files_are_checked_as_the_module_checks_them() {
        assert_eq!(check_secret("f", b"0123456789abcdef\n", 0o100600).unwrap(), b"0123456789abcdef");
        for (contents, mode, says) in [
            (&b"0123456789abcdef\n"[..], 0o644, "chmod 600"),
            (b"0123456789abcdef", 0o660, "group or others"),
            (b"\n", 0o600, "empty"),
            (b"0123456789abcde\n", 0o600, "15 bytes"),
            (b"01234567\n89abcdef01", 0o600, "one line"),
        ] {
            let e = check_secret("/run/keel/s", contents, mode).unwrap_err();
            assert!(e.contains(says) && e.contains("/run/keel/s"), "{e}");
            assert!(!e.contains("01234567"), "the secret leaked: {e}");
        }
    }

    #[test]
    fn the_secret_is_sent_in_auth_and_never_shown() {
        let c = Credentials::for_tests("keel-sidecar", b"super-secret-value-123");
        assert_eq!(
            crate::resp::encode_command(&c.auth_args(b"super-secret-value-123")),
            b"*3\r\n$4\r\nAUTH\r\n$12\r\nkeel-sidecar\r\n$22\r\nsuper-secret-value-123\r\n"
        );
        let shown = format!("{c:?}");
        assert!(!shown.contains("super-secret") && shown.contains("keel-sidecar") && shown.contains("22 bytes"), "{shown}");
    }

    #[test]
    fn the_newest_secret_is_offered_first_then_the_last_accepted() {
        let (a, b, c) = (b"aaaaaaaaaaaaaaaa".to_vec(), b"bbbbbbbbbbbbbbbb".to_vec(), b"cccccccccccccccc".to_vec());
        let mut s = Secrets::default();
        assert_eq!(s.read(Ok(a.clone())), Read::Changed);
        assert_eq!(s.to_offer(), [a.clone()], "nothing accepted yet");
        s.accepted(&a);
        assert_eq!(s.read(Ok(a.clone())), Read::Quiet);
        assert_eq!(s.to_offer(), [a.clone()]);
        // Rotated: the new one first; the old one while Redis may not know the new one.
        assert_eq!(s.read(Ok(b.clone())), Read::Changed);
        assert_eq!(s.to_offer(), [b.clone(), a.clone()]);
        s.accepted(&b);
        assert_eq!(s.to_offer(), [b.clone()]);
        // An invalid file: logged once, the last valid secret stays.
        assert_eq!(s.read(Err("mode 644".into())), Read::Refused("mode 644".into()));
        assert_eq!(s.read(Err("mode 644".into())), Read::Quiet);
        assert_eq!(s.to_offer(), [b.clone()]);
        assert_eq!(s.read(Ok(c.clone())), Read::Changed);
        assert_eq!(s.read(Err("mode 644".into())), Read::Refused("mode 644".into()), "again after a valid read");
        assert_eq!(s.to_offer(), [c, b]);
    }

    #[tokio::test]
    async fn authenticate_falls_back_to_the_accepted_secret_and_learns() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.secret");
        let write = |s: &str| {
            std::fs::write(&path, format!("{s}\n")).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        };
        write("old-secret-0123456789");
        let creds = Credentials::from_file("keel-sidecar", &path).unwrap();
        // A Redis that accepts only `ok` (the answers it would give, in order).
        async fn auth(creds: &Credentials, answers: &str) -> (Result<(), String>, String) {
            use tokio::io::AsyncReadExt;
            let (w, mut seen) = tokio::io::duplex(1 << 16);
            let r = std::io::Cursor::new(answers.as_bytes().to_vec());
            let mut c = Conn::new(Box::pin(r), Box::pin(w), "r".into(), "127.0.0.1".into());
            let res = authenticate(&mut c, creds, "r").await;
            drop(c);
            let mut sent = String::new();
            seen.read_to_string(&mut sent).await.unwrap();
            (res, sent)
        }
        let (res, sent) = auth(&creds, "+OK\r\n").await;
        assert!(res.is_ok() && sent.contains("old-secret") && !sent.contains("new-secret"), "{sent}");
        write("new-secret-0123456789");
        // The module has not read the file yet: the new one is refused, the old one works.
        let (res, sent) = auth(&creds, "-WRONGPASS invalid\r\n+OK\r\n").await;
        assert!(res.is_ok(), "{res:?}");
        assert!(sent.find("new-secret").unwrap() < sent.find("old-secret").unwrap(), "{sent}");
        // Once the new one is accepted, the old one is no longer offered.
        let (res, _) = auth(&creds, "+OK\r\n").await;
        assert!(res.is_ok());
        let (res, sent) = auth(&creds, "-WRONGPASS invalid\r\n").await;
        assert!(res.unwrap_err().contains("WRONGPASS") && !sent.contains("old-secret"), "{sent}");
    }

    #[test]
    fn a_refused_auth_says_what_to_check() {
        assert!(check_auth_reply("+OK", "u", "r").is_ok());
        let e = check_auth_reply("-WRONGPASS invalid username-password pair or user is disabled.", "keel-sidecar", "127.0.0.1:6379").unwrap_err();
        assert!(e.contains("WRONGPASS") && e.contains("'keel-sidecar'") && e.contains("--control-secret-file"), "{e}");
    }

    #[test]
    fn files_are_read_with_their_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.secret");
        std::fs::write(&path, "0123456789abcdef0123456789abcdef\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let c = Credentials::from_file("keel-sidecar", &path).unwrap();
        assert_eq!(c.to_offer(), [b"0123456789abcdef0123456789abcdef".to_vec()]);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(Credentials::from_file("keel-sidecar", &path).unwrap_err().contains("chmod 600"));
        assert!(Credentials::from_file("a b", &path).unwrap_err().contains("--control-user"));
        assert!(Credentials::from_file("u", &dir.path().join("missing")).unwrap_err().contains("missing"));
    }
}
