//! How the sidecar proves to its Redis that it is this node's sidecar.
//!
//! The module lets only one ACL user (`--control-user`, default
//! `keel-sidecar`) run the control commands (`KEEL.ACK`, `KEEL.LEASE`…)
//! and change Redis's role (`REPLICAOF`); it creates that user with the
//! password in the file both are given (`control_secret_file=` on the
//! `--loadmodule` line, `--control-secret-file` here). Every connection the
//! sidecar opens to its Redis sends `AUTH <user> <secret>` first
//! (`Credentials::auth_command`, checked by `check_auth_reply`). The secret
//! is read once at start (same checks as the module's: owner-only mode, one
//! line of at least `MIN_SECRET_BYTES`) and never printed: `Debug` shows
//! its length, errors name the file and the user only.

use std::path::Path;

use crate::resp::encode_command;

/// Shortest secret accepted (the module's bound too).
pub const MIN_SECRET_BYTES: usize = 16;
/// The control user when `--control-user` is not given.
pub const DEFAULT_USER: &str = "keel-sidecar";

/// The control user and its password.
#[derive(Clone)]
pub struct Credentials {
    pub user: String,
    secret: Vec<u8>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials {{ user: {:?}, secret: <{} bytes, not shown> }}", self.user, self.secret.len())
    }
}

impl Credentials {
    /// Reads the secret of `user` from the file at `path` (`check_secret`).
    pub fn from_file(user: &str, path: &Path) -> Result<Credentials, String> {
        use std::os::unix::fs::PermissionsExt;
        if user.is_empty() || !user.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!("--control-user {user:?} must be an ACL user name (printable, no spaces)"));
        }
        let shown = path.display().to_string();
        let meta = std::fs::metadata(path).map_err(|e| format!("--control-secret-file {shown}: {e}"))?;
        if !meta.is_file() {
            return Err(format!("--control-secret-file {shown} is not a regular file"));
        }
        let contents = std::fs::read(path).map_err(|e| format!("--control-secret-file {shown}: {e}"))?;
        let secret = check_secret(&shown, &contents, meta.permissions().mode())?;
        Ok(Credentials { user: user.to_string(), secret })
    }

    /// `AUTH <user> <secret>`, encoded.
    pub fn auth_command(&self) -> Vec<u8> {
        encode_command(&[b"AUTH", self.user.as_bytes(), &self.secret])
    }

    /// Credentials for tests of the sidecar alone.
    #[cfg(test)]
    pub fn for_tests(user: &str, secret: &[u8]) -> Credentials {
        Credentials { user: user.into(), secret: secret.to_vec() }
    }
}

/// The secret in a file's `contents` (one trailing newline is not part of
/// it), if the file's `mode` lets only its owner read it.
pub fn check_secret(path: &str, contents: &[u8], mode: u32) -> Result<Vec<u8>, String> {
    if mode & 0o077 != 0 {
        return Err(format!(
            "--control-secret-file {path} is readable or writable by group or others (mode {:o}); chmod 600 it",
            mode & 0o777
        ));
    }
    let s = contents.strip_suffix(b"\n").unwrap_or(contents);
    let s = s.strip_suffix(b"\r").unwrap_or(s);
    if s.is_empty() {
        return Err(format!("--control-secret-file {path} is empty; write a secret of at least {MIN_SECRET_BYTES} bytes into it"));
    }
    if s.len() < MIN_SECRET_BYTES {
        return Err(format!("the secret in --control-secret-file {path} is {} bytes; it must be at least {MIN_SECRET_BYTES}", s.len()));
    }
    if s.iter().any(|&b| b == b'\n' || b == b'\r' || b == 0) {
        return Err(format!("the secret in --control-secret-file {path} must be one line"));
    }
    Ok(s.to_vec())
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
        assert_eq!(c.auth_command(), b"*3\r\n$4\r\nAUTH\r\n$12\r\nkeel-sidecar\r\n$22\r\nsuper-secret-value-123\r\n");
        let shown = format!("{c:?}");
        assert!(!shown.contains("super-secret") && shown.contains("keel-sidecar"), "{shown}");
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
        assert_eq!(c.secret, b"0123456789abcdef0123456789abcdef");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(Credentials::from_file("keel-sidecar", &path).unwrap_err().contains("chmod 600"));
        assert!(Credentials::from_file("a b", &path).unwrap_err().contains("--control-user"));
        assert!(Credentials::from_file("u", &dir.path().join("missing")).unwrap_err().contains("missing"));
    }
}
