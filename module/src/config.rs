//! Module arguments (`--loadmodule libkeel_module.so key=value …`).

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
}

impl Default for Config {
    fn default() -> Self {
        Config { write_timeout_ms: 5_000, max_held_replies: 100_000, max_transaction_bytes: 64 << 20, sidecar: String::new(), journal: String::new() }
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
            _ => return Err(format!("keel: unknown module argument {k:?} (known: write_timeout_ms, max_held_replies, max_transaction_bytes, sidecar, journal)")),
        }
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_are_validated_by_name() {
        let ok = parse_args(&["write_timeout_ms=250".into(), "sidecar=127.0.0.1:7000".into()]).unwrap();
        assert_eq!(ok.write_timeout_ms, 250);
        for (bad, names) in [
            ("write_timeout_ms=0", "write_timeout_ms"),
            ("write_timeout_ms=x", "write_timeout_ms"),
            ("sidecar=nope", "sidecar"),
            ("bogus=1", "bogus"),
            ("novalue", "novalue"),
        ] {
            let e = parse_args(&[bad.into()]).unwrap_err();
            assert!(e.contains(names), "{bad}: {e}");
        }
    }
}
