//! The sidecar's one RESP codec. Commands: `encode_command` (everything
//! the sidecar sends a Redis) and `parse_command` (a replication stream
//! split into commands: cut points, `keel-sidecar decode`, the feeder's
//! handshake with a Redis replica). Replies: `parse_reply` (status, error,
//! integer, bulk), read by the one connection type, redis.rs.

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed RESP at byte {at}: {what}")]
pub struct RespError {
    pub at: usize,
    pub what: &'static str,
}

/// Largest argument count or bulk length accepted.
const MAX_LEN: usize = 512 << 20;

fn line(b: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let rest = &b[at..];
    let i = rest.windows(2).position(|w| w == b"\r\n")?;
    Some((&rest[..i], at + i + 2))
}

fn number(digits: &[u8], at: usize) -> Result<usize, RespError> {
    let s = std::str::from_utf8(digits).map_err(|_| RespError { at, what: "length is not ASCII" })?;
    let n: usize = s.parse().map_err(|_| RespError { at, what: "length is not a number" })?;
    if n > MAX_LEN {
        return Err(RespError { at, what: "length over the limit" });
    }
    Ok(n)
}

/// Parses one command at the start of `b`: `Ok(Some((args, consumed)))`,
/// `Ok(None)` if more bytes are needed.
pub fn parse_command(b: &[u8]) -> Result<Option<(Vec<Vec<u8>>, usize)>, RespError> {
    if b.is_empty() {
        return Ok(None);
    }
    if b[0] != b'*' {
        return Err(RespError { at: 0, what: "command does not start with '*'" });
    }
    let Some((n, mut at)) = line(b, 1) else { return Ok(None) };
    let n = number(n, 1)?;
    let mut args = Vec::with_capacity(n.min(1024));
    for _ in 0..n {
        if at >= b.len() {
            return Ok(None);
        }
        if b[at] != b'$' {
            return Err(RespError { at, what: "argument does not start with '$'" });
        }
        let Some((len, next)) = line(b, at + 1) else { return Ok(None) };
        let len = number(len, at + 1)?;
        if b.len() < next + len + 2 {
            return Ok(None);
        }
        if &b[next + len..next + len + 2] != b"\r\n" {
            return Err(RespError { at: next + len, what: "bulk not followed by CRLF" });
        }
        args.push(b[next..next + len].to_vec());
        at = next + len + 2;
    }
    Ok(Some((args, at)))
}

/// One reply of the kinds a private server's commands answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Status(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
}

/// Parses one non-aggregate reply at the start of `b`, like `parse_command`.
pub fn parse_reply(b: &[u8]) -> Result<Option<(Reply, usize)>, RespError> {
    if b.is_empty() {
        return Ok(None);
    }
    let Some((head, next)) = line(b, 1) else { return Ok(None) };
    let text = || String::from_utf8_lossy(head).into_owned();
    match b[0] {
        b'+' => Ok(Some((Reply::Status(text()), next))),
        b'-' => Ok(Some((Reply::Error(text()), next))),
        b':' => {
            let n = text().parse().map_err(|_| RespError { at: 1, what: "integer is not a number" })?;
            Ok(Some((Reply::Int(n), next)))
        }
        b'$' if head == b"-1" => Ok(Some((Reply::Bulk(None), next))),
        b'$' => {
            let len = number(head, 1)?;
            if b.len() < next + len + 2 {
                return Ok(None);
            }
            if &b[next + len..next + len + 2] != b"\r\n" {
                return Err(RespError { at: next + len, what: "bulk not followed by CRLF" });
            }
            Ok(Some((Reply::Bulk(Some(b[next..next + len].to_vec())), next + len + 2)))
        }
        _ => Err(RespError { at: 0, what: "not a status, error, integer or bulk reply" }),
    }
}

/// Encodes a command as RESP.
pub fn encode_command(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn parses_whole_and_partial_commands() {
        let c = encode_command(&[b"SET", b"k", b"v"]);
        assert_eq!(parse_command(&c).unwrap(), Some((vec![b"SET".to_vec(), b"k".to_vec(), b"v".to_vec()], c.len())));
        for cut in 0..c.len() {
            assert_eq!(parse_command(&c[..cut]).unwrap(), None, "cut at {cut}");
        }
        assert!(parse_command(b"+OK\r\n").is_err());
        assert!(parse_command(b"*1\r\n$3\r\nabcX\r\n").is_err());
        assert!(parse_command(b"*x\r\n").is_err());
    }

    proptest! {
        #[test]
        fn round_trips(args in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..20), 1..6)) {
            let refs: Vec<&[u8]> = args.iter().map(|a| a.as_slice()).collect();
            let c = encode_command(&refs);
            prop_assert_eq!(parse_command(&c).unwrap(), Some((args.clone(), c.len())));
        }

        #[test]
        fn never_panics(junk in proptest::collection::vec(any::<u8>(), 0..100)) {
            let _ = parse_command(&junk);
        }

        /// Replies of any bytes (a private server's, read by the
        /// snapshotter): parsed, incomplete or refused; what is consumed
        /// lies within the input.
        #[test]
        fn replies_never_panic(
            head in proptest::sample::select(vec!["+", "-", ":", "$", "$-1", "*", "x"]),
            junk in proptest::collection::vec(any::<u8>(), 0..60),
        ) {
            let b = [head.as_bytes(), &junk].concat();
            if let Ok(Some((_, used))) = parse_reply(&b) {
                prop_assert!(used <= b.len());
            }
            if let Ok(Some((_, used))) = parse_command(&b) {
                prop_assert!(used <= b.len());
            }
        }

        /// Lengths of any size or sign are refused or wait for more bytes,
        /// never allocate or index past the input.
        #[test]
        fn absurd_lengths_are_refused_or_incomplete(n in any::<i64>(), count in any::<i64>()) {
            let cmd = format!("*{count}\r\n${n}\r\nab\r\n");
            match parse_command(cmd.as_bytes()) {
                Ok(Some((args, _))) => prop_assert!(count == 1 && n == 2 && args == vec![b"ab".to_vec()]),
                Ok(None) | Err(_) => {}
            }
            let reply = format!("${n}\r\nab\r\n");
            match parse_reply(reply.as_bytes()) {
                Ok(Some((Reply::Bulk(b), _))) => prop_assert!(n == -1 && b.is_none() || n == 2 && b == Some(b"ab".to_vec())),
                Ok(Some(other)) => prop_assert!(false, "{other:?}"),
                Ok(None) | Err(_) => {}
            }
        }
    }
}
