//! An owned copy of a command's reply. A `RedisModuleCallReply` must not
//! outlive the command context that made it (freeing it later touches that
//! context), so a held reply is copied into this tree at once and written to
//! the client, in the client's own protocol, when it is released.

use std::os::raw::c_int;

use redis_module::raw;

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Simple(Vec<u8>),
    Bulk(Vec<u8>),
    Error(Vec<u8>),
    Int(i64),
    Array(Vec<Value>),
    NullBulk,
    NullArray,
    Map(Vec<(Value, Value)>),
    Set(Vec<Value>),
    Bool(bool),
    Double(f64),
    BigNumber(Vec<u8>),
    Verbatim { format: Vec<u8>, text: Vec<u8> },
}

unsafe fn bytes<'a>(p: *const std::os::raw::c_char, len: usize) -> &'a [u8] {
    if p.is_null() {
        return &[];
    }
    std::slice::from_raw_parts(p as *const u8, len)
}

impl Value {
    /// Copies a call reply (which the caller still frees).
    ///
    /// # Safety
    /// `r` must be a live call reply.
    pub unsafe fn copy(r: *mut raw::RedisModuleCallReply) -> Value {
        let mut len = 0usize;
        let proto = raw::RedisModule_CallReplyProto.unwrap()(r, &mut len);
        let first = bytes(proto, len).first().copied().unwrap_or(b'$');
        let ty = raw::RedisModule_CallReplyType.unwrap()(r) as isize;
        let n = raw::RedisModule_CallReplyLength.unwrap()(r);
        match ty {
            raw::REDISMODULE_REPLY_STRING => {
                let p = raw::RedisModule_CallReplyStringPtr.unwrap()(r, &mut len);
                let s = bytes(p, len).to_vec();
                if first == b'+' {
                    Value::Simple(s)
                } else {
                    Value::Bulk(s)
                }
            }
            raw::REDISMODULE_REPLY_ERROR => {
                let p = raw::RedisModule_CallReplyStringPtr.unwrap()(r, &mut len);
                Value::Error(bytes(p, len).to_vec())
            }
            raw::REDISMODULE_REPLY_INTEGER => Value::Int(raw::RedisModule_CallReplyInteger.unwrap()(r)),
            raw::REDISMODULE_REPLY_ARRAY => Value::Array(
                (0..n).map(|i| Value::copy(raw::RedisModule_CallReplyArrayElement.unwrap()(r, i))).collect(),
            ),
            raw::REDISMODULE_REPLY_NULL => {
                if first == b'*' {
                    Value::NullArray
                } else {
                    Value::NullBulk
                }
            }
            raw::REDISMODULE_REPLY_MAP => Value::Map(
                (0..n)
                    .map(|i| {
                        let mut k = std::ptr::null_mut();
                        let mut v = std::ptr::null_mut();
                        raw::RedisModule_CallReplyMapElement.unwrap()(r, i, &mut k, &mut v);
                        (Value::copy(k), Value::copy(v))
                    })
                    .collect(),
            ),
            raw::REDISMODULE_REPLY_SET => {
                Value::Set((0..n).map(|i| Value::copy(raw::RedisModule_CallReplySetElement.unwrap()(r, i))).collect())
            }
            raw::REDISMODULE_REPLY_BOOL => Value::Bool(raw::RedisModule_CallReplyBool.unwrap()(r) != 0),
            raw::REDISMODULE_REPLY_DOUBLE => Value::Double(raw::RedisModule_CallReplyDouble.unwrap()(r)),
            raw::REDISMODULE_REPLY_BIG_NUMBER => {
                let p = raw::RedisModule_CallReplyBigNumber.unwrap()(r, &mut len);
                Value::BigNumber(bytes(p, len).to_vec())
            }
            raw::REDISMODULE_REPLY_VERBATIM_STRING => {
                let mut fmt = std::ptr::null();
                let p = raw::RedisModule_CallReplyVerbatim.unwrap()(r, &mut len, &mut fmt);
                let format = if fmt.is_null() { b"txt".to_vec() } else { bytes(fmt, 3).to_vec() };
                Value::Verbatim { format, text: bytes(p, len).to_vec() }
            }
            _ => Value::Error(format!("ERR keel cannot relay a reply of type {ty}").into_bytes()),
        }
    }

    /// Writes this value to the client of `ctx`.
    ///
    /// # Safety
    /// `ctx` must be a live context that may reply.
    pub unsafe fn reply(&self, ctx: *mut raw::RedisModuleCtx) -> c_int {
        match self {
            Value::Simple(s) => {
                let c = std::ffi::CString::new(s.clone()).unwrap_or_default();
                raw::RedisModule_ReplyWithSimpleString.unwrap()(ctx, c.as_ptr())
            }
            Value::Bulk(s) => raw::RedisModule_ReplyWithStringBuffer.unwrap()(ctx, s.as_ptr() as *const _, s.len()),
            Value::Error(e) => {
                let c = std::ffi::CString::new(e.clone()).unwrap_or_default();
                raw::RedisModule_ReplyWithError.unwrap()(ctx, c.as_ptr())
            }
            Value::Int(i) => raw::RedisModule_ReplyWithLongLong.unwrap()(ctx, *i),
            Value::Array(items) => {
                raw::RedisModule_ReplyWithArray.unwrap()(ctx, items.len() as _);
                for v in items {
                    v.reply(ctx);
                }
                raw::REDISMODULE_OK as c_int
            }
            Value::NullBulk => raw::RedisModule_ReplyWithNull.unwrap()(ctx),
            Value::NullArray => raw::RedisModule_ReplyWithNullArray.unwrap()(ctx),
            Value::Map(pairs) => {
                raw::RedisModule_ReplyWithMap.unwrap()(ctx, pairs.len() as _);
                for (k, v) in pairs {
                    k.reply(ctx);
                    v.reply(ctx);
                }
                raw::REDISMODULE_OK as c_int
            }
            Value::Set(items) => {
                raw::RedisModule_ReplyWithSet.unwrap()(ctx, items.len() as _);
                for v in items {
                    v.reply(ctx);
                }
                raw::REDISMODULE_OK as c_int
            }
            Value::Bool(b) => raw::RedisModule_ReplyWithBool.unwrap()(ctx, *b as c_int),
            Value::Double(d) => raw::RedisModule_ReplyWithDouble.unwrap()(ctx, *d),
            Value::BigNumber(n) => raw::RedisModule_ReplyWithBigNumber.unwrap()(ctx, n.as_ptr() as *const _, n.len()),
            Value::Verbatim { format, text } => {
                let f = std::ffi::CString::new(format.clone()).unwrap_or_default();
                raw::RedisModule_ReplyWithVerbatimStringType.unwrap()(ctx, text.as_ptr() as *const _, text.len(), f.as_ptr())
            }
        }
    }
}
