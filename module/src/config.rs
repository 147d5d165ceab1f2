//! Module arguments (`--loadmodule libkeel_module.so key=value …`).

use crate::control;
use crate::control::Secret;

/// Module arguments, validated at load.
#[derive(Debug, Clone)]
pub struct Config {
    /// How long a write may wait for durability before its client gets an
    /// error.
    pub write_timeout_ms: i64,
    /// Most replies held at once; writes beyond get an error at once.
    pub max_held_replies: usize,
    /// Most bytes of commands one MULTI may queue; beyond, the transaction
    /// is discarded with an error.
    pub max_transaction_bytes: usize,
    /// The sidecar's address (reported in INFO).
    pub sidecar: String,
    /// Journal endpoints (reported in INFO).
    pub journal: String,
    /// The ACL user the sidecar authenticates as (control.rs).
    pub control_user: String,
    /// Where the control user's password is read from (required).
    pub control_secret_file: String,
    /// That password, read by `load_secret` (never printed).
    pub control_secret: Secret,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            write_timeout_ms: 5_000,
            max_held_replies: 100_000,
            max_transaction_bytes: 64 << 20,
            sidecar: String::new(),
            journal: String::new(),
            control_user: control::DEFAULT_USER.into(),
            control_secret_file: String::new(),
            control_secret: Secret::default(),
        }
    }
}

impl Config {
    /// Reads the control secret from `control_secret_file` (checked as
    /// `control::check_secret` says).
    pub fn load_secret(&mut self) -> Result<(), String> {
        self.control_secret = control::read_secret(&self.control_secret_file)?;
        Ok(())
    }
}

/// Parses `key=value` module arguments; an unknown or bad one is an error
/// naming it.
pub fn parse_args(args: &[String]) -> Result<Config, String> {
    let mut cfg = Config::default();
    for arg in args {
        let (k, v) = arg.split_once('=').ok_or_else(|| format!("keel: argument {arg:?} is not key=value"))?;
        match k {
            "write_timeout_ms" => {
                cfg.write_timeout_ms = v
                    .parse()
                    .ok()
                    .filter(|t| (1..=600_000).contains(t))
                    .ok_or_else(|| format!("keel: write_timeout_ms={v:?} must be 1..=600000"))?
            }
            "max_held_replies" => {
                cfg.max_held_replies = v
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| format!("keel: max_held_replies={v:?} must be a positive number"))?
            }
            "max_transaction_bytes" => {
                cfg.max_transaction_bytes = v
                    .parse()
                    .ok()
                    .filter(|n| *n >= 1024)
                    .ok_or_else(|| format!("keel: max_transaction_bytes={v:?} must be a number of at least 1024"))?
            }
            "sidecar" => {
                if !v.contains(':') {
                    return Err(format!("keel: sidecar={v:?} must be host:port"));
                }
                cfg.sidecar = v.to_string();
            }
            "journal" => cfg.journal = v.to_string(),
            "control_user" => {
                if !control::valid_user(v) {
                    return Err(format!("keel: control_user={v:?} must be an ACL user name (printable, no spaces, at most {} bytes)", control::MAX_USER_BYTES));
                }
                cfg.control_user = v.to_string();
            }
            "control_secret_file" => {
                if v.is_empty() {
                    return Err("keel: control_secret_file= must name a file".into());
                }
                cfg.control_secret_file = v.to_string();
            }
            _ => return Err(format!(
                "keel: unknown module argument {k:?} (known: write_timeout_ms, max_held_replies, max_transaction_bytes, sidecar, journal, control_user, control_secret_file)"
            )),
        }
    }
    if cfg.control_secret_file.is_empty() {
        return Err(format!(
            "keel: control_secret_file=<path> is required: a file (mode 0600, one line of at least {} bytes) holding the \
             password of the ACL user the sidecar authenticates as (control_user=, default {}); give keel-sidecar the same \
             file with --control-secret-file",
            control::MIN_SECRET_BYTES,
            control::DEFAULT_USER
        ));
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_are_validated_by_name() {
        let secret = "control_secret_file=/etc/keel/secret".to_string();
        let ok = parse_args(&["write_timeout_ms=250".into(), "sidecar=127.0.0.1:7000".into(), secret.clone()]).unwrap();
        assert_eq!(ok.write_timeout_ms, 250);
        assert_eq!((ok.control_user.as_str(), ok.control_secret_file.as_str()), ("keel-sidecar", "/etc/keel/secret"));
        let ops = parse_args(&["control_user=ops".into(), secret.clone()]).unwrap();
        assert_eq!(ops.control_user, "ops");
        let missing = parse_args(&["write_timeout_ms=250".into()]).unwrap_err();
        assert!(missing.contains("control_secret_file=<path> is required"), "{missing}");
        for (bad, names) in [
            ("write_timeout_ms=0", "write_timeout_ms"),
            ("write_timeout_ms=x", "write_timeout_ms"),
            ("sidecar=nope", "sidecar"),
            ("bogus=1", "bogus"),
            ("novalue", "novalue"),
            ("control_user=a b", "control_user"),
            ("control_user=", "control_user"),
            ("control_secret_file=", "control_secret_file"),
        ] {
            let e = parse_args(&[bad.into(), secret.clone()]).unwrap_err();
            assert!(e.contains(names), "{bad}: {e}");
        }
    }
}

#[cfg(test)]
mod secret_tests {
    use super::*;

    #[test]
    fn the_secret_never_shows_in_debug() {
        let dir = std::env::temp_dir().join(format!("keel-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("secret");
        std::fs::write(&path, "do-not-print-this-secret\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let mut cfg = parse_args(&[format!("control_secret_file={}", path.display())]).unwrap();
        cfg.load_secret().unwrap();
        assert_eq!(cfg.control_secret.bytes(), b"do-not-print-this-secret");
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("do-not-print") && shown.contains("control_secret_file"), "{shown}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(cfg.load_secret().unwrap_err().contains("chmod 600"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
