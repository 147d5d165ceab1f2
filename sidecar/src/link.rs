//! How the sidecar reaches its local Redis: `host:port` over TCP, or
//! `unix:/path` over Redis's unix socket (`unixsocket` in its config), so
//! a Redis that serves clients over TLS only (`port 0`, `tls-port`) keeps
//! a plaintext link to its own sidecar that nothing off the box can
//! reach. Every connection authenticates as the control user first
//! (auth.rs), whatever it runs over.
//!
//! The address Redis is reached at is not always the one clients use:
//! `--announce host:port` names the latter (discovery hands it out); it
//! defaults to a TCP `--redis` and is required with a unix socket.

use std::path::PathBuf;
use std::pin::Pin;

use tokio::io::AsyncRead;
use tokio::io::AsyncWrite;

/// Where the local Redis listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisAddr {
    Tcp(String),
    Unix(PathBuf),
}

/// The `unix:` prefix of a socket address.
pub const UNIX_PREFIX: &str = "unix:";

impl RedisAddr {
    /// `host:port` or `unix:/absolute/path`.
    pub fn parse(s: &str) -> Result<RedisAddr, String> {
        if let Some(p) = s.strip_prefix(UNIX_PREFIX) {
            if !p.starts_with('/') {
                return Err(format!("--redis {s:?}: a unix socket needs an absolute path (unix:/path/to/redis.sock)"));
            }
            return Ok(RedisAddr::Unix(PathBuf::from(p)));
        }
        match s.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => Ok(RedisAddr::Tcp(s.to_string())),
            _ => Err(format!("--redis {s:?} must be host:port or unix:/path/to/redis.sock")),
        }
    }
}

/// The address clients reach this node's Redis at: `announce`, else a
/// TCP `redis`; a unix socket needs `announce`.
pub fn client_address(redis: &RedisAddr, announce: Option<&str>) -> Result<String, String> {
    match (announce, redis) {
        (Some(a), _) => match RedisAddr::parse(a) {
            Ok(RedisAddr::Tcp(a)) => Ok(a),
            _ => Err(format!("--announce {a:?} must be host:port (the address clients reach this node's Redis at)")),
        },
        (None, RedisAddr::Tcp(a)) => Ok(a.clone()),
        (None, RedisAddr::Unix(p)) => Err(format!(
            "--redis unix:{} needs --announce host:port: the address clients reach this node's Redis at (e.g. its tls-port)",
            p.display()
        )),
    }
}

pub type Reader = Pin<Box<dyn AsyncRead + Send + Unpin>>;
pub type Writer = Pin<Box<dyn AsyncWrite + Send + Unpin>>;

/// A connection to the local Redis, split, and the local IP address Redis
/// sees it from (127.0.0.1 over a unix socket).
pub async fn connect(addr: &RedisAddr) -> std::io::Result<(Reader, Writer, String)> {
    match addr {
        RedisAddr::Tcp(a) => {
            let s = tokio::net::TcpStream::connect(a).await?;
            s.set_nodelay(true)?;
            let ip = s.local_addr()?.ip().to_string();
            let (r, w) = s.into_split();
            Ok((Box::pin(r), Box::pin(w), ip))
        }
        RedisAddr::Unix(p) => {
            let s = tokio::net::UnixStream::connect(p).await?;
            let (r, w) = s.into_split();
            Ok((Box::pin(r), Box::pin(w), "127.0.0.1".to_string()))
        }
    }
}

impl std::fmt::Display for RedisAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RedisAddr::Tcp(a) => f.write_str(a),
            RedisAddr::Unix(p) => write!(f, "{UNIX_PREFIX}{}", p.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_or_say_what_to_give() {
        assert_eq!(RedisAddr::parse("127.0.0.1:6379"), Ok(RedisAddr::Tcp("127.0.0.1:6379".into())));
        assert_eq!(RedisAddr::parse("[::1]:6379"), Ok(RedisAddr::Tcp("[::1]:6379".into())));
        assert_eq!(RedisAddr::parse("unix:/run/redis.sock"), Ok(RedisAddr::Unix("/run/redis.sock".into())));
        for bad in ["", "6379", "host", ":6379", "h:0", "h:70000", "unix:", "unix:rel.sock"] {
            let e = RedisAddr::parse(bad).unwrap_err();
            assert!(e.contains("--redis"), "{bad}: {e}");
        }
        assert_eq!(RedisAddr::parse("unix:/a/b").unwrap().to_string(), "unix:/a/b");
    }

    #[test]
    fn clients_get_the_announced_address() {
        let tcp = RedisAddr::Tcp("127.0.0.1:6379".into());
        let unix = RedisAddr::Unix("/s".into());
        assert_eq!(client_address(&tcp, None).unwrap(), "127.0.0.1:6379");
        assert_eq!(client_address(&tcp, Some("10.0.0.1:6380")).unwrap(), "10.0.0.1:6380");
        assert_eq!(client_address(&unix, Some("127.0.0.1:16379")).unwrap(), "127.0.0.1:16379");
        assert!(client_address(&unix, None).unwrap_err().contains("--announce"));
        assert!(client_address(&tcp, Some("unix:/x")).unwrap_err().contains("--announce"));
    }
}
