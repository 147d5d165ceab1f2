//! Replies: replays a held reply's RESP bytes to its client through the
//! module reply API (the bytes are checked and walked by `resp.rs`, without
//! recursion), and sends an error INFO errorstats already counted without
//! counting it again (`KEEL.COUNTEDERROR`).

use crate::redis::Arg;
use crate::redis::Args;
use crate::redis::Ctx;
use crate::redis::OK;
use crate::redis::ReplyKind;
use crate::redis::Status;
use crate::resp;
use crate::resp::Token;

/// An error reply as RESP bytes (newlines would break the protocol).
pub fn error(msg: &str) -> Vec<u8> {
    let clean: String = msg.chars().map(|c| if c == '\r' || c == '\n' { ' ' } else { c }).collect();
    format!("-{clean}\r\n").into_bytes()
}

/// Writes a held reply to the client of `ctx`.
pub fn send(ctx: Ctx, buf: &[u8]) -> Status {
    if let Err(e) = resp::check(buf) {
        return ctx.reply_error_bytes(format!("KEEL_UNKNOWN internal error: a held reply is not valid RESP ({e})").as_bytes());
    }
    let _ = resp::walk(buf, |tok| {
        emit(ctx, tok);
    });
    OK
}

/// Writes a reply to the client of `ctx` with each string (simple, bulk,
/// verbatim) passed through `edit` (`None`: kept as it is).
pub fn send_edited(ctx: Ctx, buf: &[u8], edit: impl Fn(&[u8]) -> Option<Vec<u8>>) -> Status {
    if let Err(e) = resp::check(buf) {
        return ctx.reply_error_bytes(format!("KEEL_UNKNOWN internal error: a reply is not valid RESP ({e})").as_bytes());
    }
    let _ = resp::walk(buf, |tok| {
        let edited = match tok {
            Token::Simple(s) => edit(s).filter(|e| !e.contains(&b'\n') && !e.contains(&b'\r')),
            Token::Bulk(b) => edit(b),
            Token::Verbatim { text, .. } => edit(text),
            _ => None,
        };
        match (tok, edited) {
            (Token::Simple(_), Some(e)) => {
                let _ = ctx.reply_simple(&e);
            }
            (Token::Bulk(_), Some(e)) => {
                let _ = ctx.reply_bulk(&e);
            }
            (Token::Verbatim { format, .. }, Some(e)) => {
                let _ = ctx.reply_verbatim(&e, format);
            }
            (tok, _) => emit(ctx, tok),
        }
    });
    OK
}

fn emit(ctx: Ctx, tok: Token<'_>) {
    match tok {
        Token::Simple(s) => ctx.reply_simple(s),
        Token::Error(e) => ctx.reply_error_bytes(e),
        Token::Int(i) => ctx.reply_integer(i),
        Token::Bulk(b) => ctx.reply_bulk(b),
        Token::NullBulk | Token::Null => ctx.reply_null(),
        // A push cannot be a command's reply; relayed as an array if ever.
        Token::Array(n) | Token::Push(n) => ctx.reply_array(n as i64),
        Token::NullArray => ctx.reply_null_array(),
        Token::Map(n) => ctx.reply_map(n as i64),
        Token::Set(n) => ctx.reply_set(n as i64),
        Token::Attribute(n) => ctx.reply_attribute(n as i64),
        Token::Bool(b) => ctx.reply_bool(b),
        Token::Double(d) => ctx.reply_double(d),
        Token::BigNumber(n) => ctx.reply_big_number(n),
        Token::Verbatim { format, text } => ctx.reply_verbatim(text, format),
    };
}

/// Replies the error `text` without INFO errorstats counting it: as an
/// element of a call reply, which carries no deferred errors of its own
/// (`RM_ReplyWithCallReply` counts only a whole reply's).
pub fn counted_error(ctx: Ctx, text: &[u8]) -> Status {
    let strs = Args::new(ctx, &[text]);
    let r = ctx.call(c"KEEL.COUNTEDERROR", c"v", &strs);
    drop(strs);
    if let Some(r) = r {
        let ok = r.get().elem(0).is_some_and(|e| e.kind() == ReplyKind::Error && ctx.reply_call_reply(e) == OK);
        if ok {
            return OK;
        }
    }
    send(ctx, &error(&String::from_utf8_lossy(text)))
}

/// `KEEL.COUNTEDERROR <text>`: a one-element array holding the error
/// `text` (for `counted_error`).
pub fn keel_countederror(ctx: Ctx, args: &[Arg]) -> Status {
    if args.len() != 2 {
        return ctx.wrong_arity();
    }
    // Newlines would break the protocol; a NUL would end the C string.
    let clean: Vec<u8> = args[1].bytes().iter().map(|&b| if matches!(b, b'\r' | b'\n' | 0) { b' ' } else { b }).collect();
    ctx.reply_array(1);
    ctx.reply_error_bytes(&clean)
}
