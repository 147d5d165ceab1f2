//! Replays a held reply's RESP bytes to its client through the module reply
//! API (the bytes are checked and walked by `resp.rs`, without recursion).

use std::ffi::CString;
use std::os::raw::c_int;

use redis_module::raw;

use crate::resp;
use crate::resp::Token;

/// The RESP bytes of a call reply (in the protocol it was called with).
///
/// # Safety
/// `r` must be a live call reply.
pub unsafe fn copy(r: *mut raw::RedisModuleCallReply) -> Vec<u8> {
    let mut len = 0usize;
    let p = raw::RedisModule_CallReplyProto.unwrap()(r, &mut len);
    if p.is_null() {
        return b"-ERR keel could not read the command's reply\r\n".to_vec();
    }
    std::slice::from_raw_parts(p as *const u8, len).to_vec()
}

/// An error reply as RESP bytes (newlines would break the protocol).
pub fn error(msg: &str) -> Vec<u8> {
    let clean: String = msg.chars().map(|c| if c == '\r' || c == '\n' { ' ' } else { c }).collect();
    format!("-{clean}\r\n").into_bytes()
}

/// Writes a held reply to the client of `ctx`.
///
/// # Safety
/// `ctx` must be a live context that may reply.
pub unsafe fn send(ctx: *mut raw::RedisModuleCtx, buf: &[u8]) -> c_int {
    if let Err(e) = resp::check(buf) {
        let msg = CString::new(format!("KEEL_UNKNOWN internal error: a held reply is not valid RESP ({e})")).unwrap_or_default();
        return raw::RedisModule_ReplyWithError.unwrap()(ctx, msg.as_ptr());
    }
    let _ = resp::walk(buf, |tok| {
        emit(ctx, tok);
    });
    raw::REDISMODULE_OK as c_int
}

unsafe fn emit(ctx: *mut raw::RedisModuleCtx, tok: Token<'_>) {
    let c = |s: &[u8]| CString::new(s.to_vec()).unwrap_or_default();
    match tok {
        Token::Simple(s) => raw::RedisModule_ReplyWithSimpleString.unwrap()(ctx, c(s).as_ptr()),
        Token::Error(e) => raw::RedisModule_ReplyWithError.unwrap()(ctx, c(e).as_ptr()),
        Token::Int(i) => raw::RedisModule_ReplyWithLongLong.unwrap()(ctx, i),
        Token::Bulk(b) => raw::RedisModule_ReplyWithStringBuffer.unwrap()(ctx, b.as_ptr() as *const _, b.len()),
        Token::NullBulk | Token::Null => raw::RedisModule_ReplyWithNull.unwrap()(ctx),
        // A push cannot be a command's reply; relayed as an array if ever.
        Token::Array(n) | Token::Push(n) => raw::RedisModule_ReplyWithArray.unwrap()(ctx, n as _),
        Token::NullArray => raw::RedisModule_ReplyWithNullArray.unwrap()(ctx),
        Token::Map(n) => raw::RedisModule_ReplyWithMap.unwrap()(ctx, n as _),
        Token::Set(n) => raw::RedisModule_ReplyWithSet.unwrap()(ctx, n as _),
        Token::Attribute(n) => raw::RedisModule_ReplyWithAttribute.unwrap()(ctx, n as _),
        Token::Bool(b) => raw::RedisModule_ReplyWithBool.unwrap()(ctx, b as c_int),
        Token::Double(d) => raw::RedisModule_ReplyWithDouble.unwrap()(ctx, d),
        Token::BigNumber(n) => raw::RedisModule_ReplyWithBigNumber.unwrap()(ctx, n.as_ptr() as *const _, n.len()),
        Token::Verbatim { format, text } => {
            raw::RedisModule_ReplyWithVerbatimStringType.unwrap()(ctx, text.as_ptr() as *const _, text.len(), c(format).as_ptr())
        }
    };
}

