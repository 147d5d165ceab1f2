//! Held replies are kept as the RESP bytes Redis produced (`RM_CallReplyProto`)
//! and replayed token by token through the module reply API when released.
//!
//! Why bytes, not a tree: a `RedisModuleCallReply` must not outlive the
//! command that made it, so a held reply is copied; a flat byte copy costs
//! one allocation, and replaying it is a loop over tokens with no recursion,
//! so a reply nested thousands deep (a Lua table that contains itself) cannot
//! overflow the stack. An aggregate header (`*3`) is emitted as such and its
//! elements follow in the stream, exactly as in RESP.
//!
//! `check` walks a buffer before anything is emitted: a reply is replayed
//! only if it is exactly one complete RESP value, so a client never gets half
//! a reply. Pure logic; the FFI layer emits the tokens.

/// One RESP2/RESP3 token. Aggregates carry their element count.
#[derive(Debug, Clone, PartialEq)]
pub enum Token<'a> {
    Simple(&'a [u8]),
    Error(&'a [u8]),
    Int(i64),
    Bulk(&'a [u8]),
    NullBulk,
    Array(usize),
    NullArray,
    Map(usize),
    Set(usize),
    Attribute(usize),
    Push(usize),
    Null,
    Bool(bool),
    Double(f64),
    BigNumber(&'a [u8]),
    Verbatim { format: &'a [u8], text: &'a [u8] },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("truncated reply")]
    Truncated,
    #[error("malformed reply at byte {0}")]
    Malformed(usize),
}

/// Longest aggregate or string a held reply may declare (Redis's own
/// proto-max-bulk-len ceiling is 512 MiB by default).
const MAX_LEN: i64 = 1 << 40;

fn line(buf: &[u8]) -> Result<(&[u8], usize), ProtoError> {
    let end = buf.windows(2).position(|w| w == b"\r\n").ok_or(ProtoError::Truncated)?;
    if end == 0 {
        // No type byte before the line's end (`\r\n…`).
        return Err(ProtoError::Malformed(0));
    }
    Ok((&buf[1..end], end + 2))
}

fn int(s: &[u8], at: usize) -> Result<i64, ProtoError> {
    std::str::from_utf8(s).ok().and_then(|s| s.parse().ok()).ok_or(ProtoError::Malformed(at))
}

fn count(s: &[u8], at: usize) -> Result<usize, ProtoError> {
    let n = int(s, at)?;
    if !(0..=MAX_LEN).contains(&n) {
        return Err(ProtoError::Malformed(at));
    }
    Ok(n as usize)
}

/// Parses the token at the start of `buf`; returns it and its length.
pub fn token(buf: &[u8]) -> Result<(Token<'_>, usize), ProtoError> {
    let kind = *buf.first().ok_or(ProtoError::Truncated)?;
    let (head, used) = line(buf)?;
    let tok = match kind {
        b'+' => Token::Simple(head),
        b'-' => Token::Error(head),
        b':' => Token::Int(int(head, 0)?),
        b'$' | b'=' => {
            if head == b"-1" && kind == b'$' {
                return Ok((Token::NullBulk, used));
            }
            let n = count(head, 0)?;
            let body = buf.get(used..used + n + 2).ok_or(ProtoError::Truncated)?;
            if &body[n..] != b"\r\n" {
                return Err(ProtoError::Malformed(used + n));
            }
            let body = &body[..n];
            let tok = if kind == b'$' {
                Token::Bulk(body)
            } else {
                if n < 4 || body[3] != b':' {
                    return Err(ProtoError::Malformed(used));
                }
                Token::Verbatim { format: &body[..3], text: &body[4..] }
            };
            return Ok((tok, used + n + 2));
        }
        b'*' if head == b"-1" => Token::NullArray,
        b'*' => Token::Array(count(head, 0)?),
        b'%' => Token::Map(count(head, 0)?),
        b'~' => Token::Set(count(head, 0)?),
        b'|' => Token::Attribute(count(head, 0)?),
        b'>' => Token::Push(count(head, 0)?),
        b'_' if head.is_empty() => Token::Null,
        b'#' if head == b"t" => Token::Bool(true),
        b'#' if head == b"f" => Token::Bool(false),
        b',' => {
            let s = std::str::from_utf8(head).map_err(|_| ProtoError::Malformed(0))?;
            let d = match s {
                "inf" => f64::INFINITY,
                "-inf" => f64::NEG_INFINITY,
                "nan" | "-nan" => f64::NAN,
                _ => s.parse().map_err(|_| ProtoError::Malformed(0))?,
            };
            Token::Double(d)
        }
        b'(' => Token::BigNumber(head),
        _ => return Err(ProtoError::Malformed(0)),
    };
    Ok((tok, used))
}

/// How many values follow a token as its elements.
pub fn children(tok: &Token<'_>) -> usize {
    match tok {
        Token::Array(n) | Token::Set(n) | Token::Push(n) => *n,
        Token::Map(n) => n * 2,
        // An attribute's pairs are followed by the value it annotates.
        Token::Attribute(n) => n * 2 + 1,
        _ => 0,
    }
}

/// Checks that `buf` holds exactly one complete RESP value; returns the
/// number of tokens. Iterative: nesting depth costs no stack.
pub fn check(buf: &[u8]) -> Result<usize, ProtoError> {
    let mut pos = 0;
    let mut owed: u64 = 1; // values still to read
    let mut tokens = 0;
    while owed > 0 {
        let (tok, used) = token(&buf[pos..]).map_err(|e| match e {
            ProtoError::Malformed(at) => ProtoError::Malformed(pos + at),
            t => t,
        })?;
        owed = owed - 1 + children(&tok) as u64;
        pos += used;
        tokens += 1;
    }
    if pos != buf.len() {
        return Err(ProtoError::Malformed(pos));
    }
    Ok(tokens)
}

/// Calls `emit` for every token of a buffer that passed `check`.
pub fn walk<'a>(mut buf: &'a [u8], mut emit: impl FnMut(Token<'a>)) -> Result<(), ProtoError> {
    while !buf.is_empty() {
        let (tok, used) = token(buf)?;
        emit(tok);
        buf = &buf[used..];
    }
    Ok(())
}

/// The name INFO errorstats counts an error reply under, by Redis's rule
/// (networking.c `afterErrorReply`): the first word when a space comes
/// within the first 32 bytes of the reply (its `-` included), else `ERR`.
/// `text` is the error without its `-`.
pub fn error_code(text: &[u8]) -> &[u8] {
    match text.iter().take(31).position(|&b| b == b' ') {
        Some(i) if i > 0 => &text[..i],
        _ => b"ERR",
    }
}

/// The count in an INFO errorstats value (`count=N`); 0 if unreadable.
pub fn errorstat_count(value: &[u8]) -> u64 {
    std::str::from_utf8(value).ok().and_then(|v| v.strip_prefix("count=")).and_then(|n| n.parse().ok()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A reply tree, for generating test buffers.
    #[derive(Debug, Clone)]
    enum V {
        Simple(String),
        Error(String),
        Int(i64),
        Bulk(Vec<u8>),
        NullBulk,
        Array(Vec<V>),
        NullArray,
        Map(Vec<(V, V)>),
        Set(Vec<V>),
        Bool(bool),
        Double(f64),
        Null,
        Verbatim(Vec<u8>),
    }

    fn encode(v: &V, out: &mut Vec<u8>) {
        match v {
            V::Simple(s) => out.extend(format!("+{s}\r\n").bytes()),
            V::Error(s) => out.extend(format!("-{s}\r\n").bytes()),
            V::Int(i) => out.extend(format!(":{i}\r\n").bytes()),
            V::Bulk(b) => {
                out.extend(format!("${}\r\n", b.len()).bytes());
                out.extend(b);
                out.extend(b"\r\n");
            }
            V::NullBulk => out.extend(b"$-1\r\n"),
            V::Array(items) | V::Set(items) => {
                let c = if matches!(v, V::Array(_)) { '*' } else { '~' };
                out.extend(format!("{c}{}\r\n", items.len()).bytes());
                items.iter().for_each(|i| encode(i, out));
            }
            V::NullArray => out.extend(b"*-1\r\n"),
            V::Map(pairs) => {
                out.extend(format!("%{}\r\n", pairs.len()).bytes());
                for (k, v) in pairs {
                    encode(k, out);
                    encode(v, out);
                }
            }
            V::Bool(b) => out.extend(if *b { b"#t\r\n" } else { b"#f\r\n" }),
            V::Double(d) => out.extend(format!(",{d}\r\n").bytes()),
            V::Null => out.extend(b"_\r\n"),
            V::Verbatim(t) => {
                out.extend(format!("={}\r\ntxt:", t.len() + 4).bytes());
                out.extend(t);
                out.extend(b"\r\n");
            }
        }
    }

    fn count_tokens(v: &V) -> usize {
        1 + match v {
            V::Array(i) | V::Set(i) => i.iter().map(count_tokens).sum(),
            V::Map(p) => p.iter().map(|(k, v)| count_tokens(k) + count_tokens(v)).sum(),
            _ => 0,
        }
    }

    fn value() -> impl Strategy<Value = V> {
        let text = "[a-zA-Z0-9 ]{0,12}";
        let leaf = prop_oneof![
            text.prop_map(V::Simple),
            text.prop_map(V::Error),
            any::<i64>().prop_map(V::Int),
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(V::Bulk),
            Just(V::NullBulk),
            Just(V::NullArray),
            any::<bool>().prop_map(V::Bool),
            (-1e9f64..1e9).prop_map(V::Double),
            Just(V::Null),
            proptest::collection::vec(any::<u8>(), 0..20).prop_map(V::Verbatim),
        ];
        leaf.prop_recursive(4, 64, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(V::Array),
                proptest::collection::vec(inner.clone(), 0..6).prop_map(V::Set),
                proptest::collection::vec((inner.clone(), inner), 0..4).prop_map(V::Map),
            ]
        })
    }

    proptest! {
        /// Every well-formed reply checks, with one token per value.
        #[test]
        fn well_formed_replies_check(v in value()) {
            let mut buf = Vec::new();
            encode(&v, &mut buf);
            prop_assert_eq!(check(&buf), Ok(count_tokens(&v)));
            let mut n = 0;
            walk(&buf, |_| n += 1).unwrap();
            prop_assert_eq!(n, count_tokens(&v));
        }

        /// Any strict prefix is refused (never half a reply), and so is
        /// trailing garbage.
        #[test]
        fn prefixes_and_trailers_are_refused(v in value(), cut in any::<prop::sample::Index>(), extra in any::<u8>()) {
            let mut buf = Vec::new();
            encode(&v, &mut buf);
            let cut = cut.index(buf.len());
            prop_assert!(check(&buf[..cut]).is_err());
            buf.push(extra);
            prop_assert!(check(&buf).is_err());
        }

        /// Arbitrary bytes never panic the parser.
        #[test]
        fn arbitrary_bytes_do_not_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = check(&bytes);
        }
    }

    #[test]
    fn deep_nesting_costs_no_stack() {
        // The reply of a Lua table that contains itself: 100k levels.
        let mut buf = b"*1\r\n".repeat(100_000);
        buf.extend(b"-ERR reached lua stack limit\r\n");
        assert_eq!(check(&buf), Ok(100_001));
    }

    #[test]
    fn tokens_decode() {
        assert_eq!(token(b"$-1\r\n").unwrap().0, Token::NullBulk);
        assert_eq!(token(b"*-1\r\n").unwrap().0, Token::NullArray);
        assert_eq!(token(b",inf\r\n").unwrap().0, Token::Double(f64::INFINITY));
        assert_eq!(token(b"=7\r\ntxt:abc\r\n").unwrap().0, Token::Verbatim { format: b"txt", text: b"abc" });
        assert_eq!(token(b"|1\r\n").map(|t| children(&t.0)), Ok(3));
        assert!(token(b"$5\r\nab\r\n").is_err());
        assert!(token(b"*-2\r\n").is_err());
        assert!(token(b"?\r\n").is_err());
    }

    #[test]
    fn errors_are_counted_under_their_first_word() {
        assert_eq!(error_code(b"OOM command not allowed"), b"OOM");
        assert_eq!(error_code(b"ERR DB index is out of range"), b"ERR");
        assert_eq!(error_code(b"MY_ERR_CODE custom msg"), b"MY_ERR_CODE");
        assert_eq!(error_code(b"NOSPACE"), b"ERR");
        assert_eq!(error_code(b""), b"ERR");
        assert_eq!(error_code(b" leading space"), b"ERR");
        // A space past the 32nd byte of the reply does not count.
        let long = [b'A'; 31];
        assert_eq!(error_code(&[&long[..], b" x"].concat()), b"ERR");
        assert_eq!(error_code(&[&long[..30], b" x"].concat()), &long[..30]);
        assert_eq!(errorstat_count(b"count=17"), 17);
        assert_eq!(errorstat_count(b"junk"), 0);
    }
}
