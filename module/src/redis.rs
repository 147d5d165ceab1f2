//! The only place that touches the Redis module API (`RM_*`): safe functions
//! over it, and the `extern "C"` entry points Redis calls, each of which
//! turns its raw pointers into the handles below and calls a safe function
//! of the room that owns the mechanism at once.
//!
//! Handles and why they are sound:
//! - `Ctx`: a context Redis passed to the running callback. Made only by
//!   the entry points here (and `Ctx::of` from the redis-module crate's
//!   live `Context`), never stored: the module runs on Redis's main thread,
//!   and a handle lives no longer than the callback that received it.
//!   `Ctx::detached()` is the null context, for the calls that accept it.
//! - `Arg`: a module string (`RedisModuleString*`) that outlives every
//!   borrow of it: a command's arguments (alive for the command), or the
//!   strings of an `Args` (freed when it drops). Not `Copy`: its bytes
//!   borrow from it.
//! - `CallReply`: an `RM_Call` reply, freed when it drops; `ReplyRef`
//!   borrows it (or an element of it).
//! - `Blocked`: a blocked-client handle, valid until `unblock` (Redis frees
//!   it after that, in the unblock or timeout path).
//!
//! Lock discipline: `call` asserts the module's state lock is not held
//! (`state.rs`): the command it runs may notify keyspace events or run
//! other clients' filters, which lock the state themselves.

use std::cell::Cell;
use std::ffi::CStr;
use std::ffi::CString;
use std::marker::PhantomData;
use std::os::raw::c_char;
use std::os::raw::c_int;
use std::os::raw::c_void;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;

use redis_module::Context;
use redis_module::raw;

use crate::state::lock_held;

pub const OK: c_int = raw::REDISMODULE_OK as c_int;

/// What a command callback returns to Redis.
pub type Status = c_int;

/// Every API function the module uses exists in Redis 7.0 and Valkey: the
/// pointers are filled in before the module's `init` runs.
macro_rules! api {
    ($name:ident) => {
        raw::$name.expect(concat!(stringify!($name), " is missing from the server's module API"))
    };
}

/// `s` as a C string for Redis. A NUL in it (client bytes quoted in an
/// error, such as an unknown command's name sent inside MULTI) is written
/// `\0`: it must neither cut the text nor fail the conversion, which
/// would abort the server.
/// The machine's monotonic clock in milliseconds (CLOCK_MONOTONIC, the
/// clock the sidecar stamps lease deadlines with, so both read one clock).
pub fn monotonic_ms() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec for the call's duration;
    // CLOCK_MONOTONIC always exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC) failed");
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

pub fn cstr(s: &str) -> CString {
    CString::new(s.replace('\0', "\\0")).expect("every NUL was replaced")
}

/// A command name for `RM_Call` (empty if it holds a NUL: no such command).
pub fn command_name(name: &[u8]) -> CString {
    CString::new(name).unwrap_or_default()
}

// ---------------------------------------------------------------- strings

/// A module string that outlives the borrow (see the top of the file).
#[repr(transparent)]
pub struct Arg(*mut raw::RedisModuleString);

impl Arg {
    pub fn bytes(&self) -> &[u8] {
        let mut len = 0usize;
        // SAFETY: `self.0` is a live module string for as long as `self` is
        // borrowed (type invariant); StringPtrLen returns its buffer and
        // length, which stay valid while the string is not modified.
        unsafe {
            let p = api!(RedisModule_StringPtrLen)(self.0, &mut len);
            std::slice::from_raw_parts(p as *const u8, len)
        }
    }

    /// The string as a signed 64-bit integer, if it is one.
    pub fn to_i64(&self) -> Option<i64> {
        let mut v: i64 = 0;
        // SAFETY: a live module string and a valid out-pointer.
        let rc = unsafe { api!(RedisModule_StringToLongLong)(self.0, &mut v) };
        (rc == OK).then_some(v)
    }
}

/// Module strings made by the module (freed on drop).
pub struct Args {
    ctx: Ctx,
    strs: Vec<Arg>,
}

impl Args {
    pub fn new<A: AsRef<[u8]>>(ctx: Ctx, argv: &[A]) -> Args {
        let strs = argv
            .iter()
            .map(|a| {
                let a = a.as_ref();
                // SAFETY: a valid buffer of `len` bytes, copied by Redis.
                Arg(unsafe { api!(RedisModule_CreateString)(ctx.0, a.as_ptr() as *const c_char, a.len()) })
            })
            .collect();
        Args { ctx, strs }
    }
}

impl std::ops::Deref for Args {
    type Target = [Arg];
    fn deref(&self) -> &[Arg] {
        &self.strs
    }
}

impl Drop for Args {
    fn drop(&mut self) {
        for s in &self.strs {
            // SAFETY: each string was created by `Args::new` with this
            // context and is freed once, here; no borrow of it outlives
            // `self`.
            unsafe { api!(RedisModule_FreeString)(self.ctx.0, s.0) };
        }
    }
}

/// A new module string handed over to Redis (it frees it).
fn new_string_for_redis(s: &[u8]) -> *mut raw::RedisModuleString {
    // SAFETY: a valid buffer; the null context makes a string that is not
    // freed automatically: its new owner frees it.
    unsafe { api!(RedisModule_CreateString)(std::ptr::null_mut(), s.as_ptr() as *const c_char, s.len()) }
}

// ---------------------------------------------------------------- replies of RM_Call

/// The type of a call reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyKind {
    Error,
    Array,
    Integer,
    Null,
    Other,
}

/// An `RM_Call` reply, freed on drop.
pub struct CallReply(*mut raw::RedisModuleCallReply);

impl Drop for CallReply {
    fn drop(&mut self) {
        // SAFETY: a non-null reply from RM_Call, freed once (its elements
        // are borrowed `ReplyRef`s, which cannot outlive it).
        unsafe { api!(RedisModule_FreeCallReply)(self.0) };
    }
}

impl CallReply {
    pub fn get(&self) -> ReplyRef<'_> {
        ReplyRef(self.0, PhantomData)
    }
}

/// A call reply or one of its elements, borrowed.
#[derive(Clone, Copy)]
pub struct ReplyRef<'a>(*mut raw::RedisModuleCallReply, PhantomData<&'a CallReply>);

/// `self.0` is a non-null reply (or element of one) that lives at least as
/// long as `'a` (the type invariant every method's SAFETY note relies on).
impl<'a> ReplyRef<'a> {
    pub fn kind(self) -> ReplyKind {
        let t = unsafe { api!(RedisModule_CallReplyType)(self.0) };
        match t as isize {
            raw::REDISMODULE_REPLY_ERROR => ReplyKind::Error,
            raw::REDISMODULE_REPLY_ARRAY => ReplyKind::Array,
            raw::REDISMODULE_REPLY_INTEGER => ReplyKind::Integer,
            raw::REDISMODULE_REPLY_NULL => ReplyKind::Null,
            _ => ReplyKind::Other,
        }
    }

    /// Elements of an array (0 for other types).
    pub fn len(self) -> usize {
        // SAFETY: a live reply (type invariant of ReplyRef).
        unsafe { api!(RedisModule_CallReplyLength)(self.0) }
    }

    pub fn elem(self, i: usize) -> Option<ReplyRef<'a>> {
        // SAFETY: a live reply; an index out of range gives null, checked.
        let e = unsafe { api!(RedisModule_CallReplyArrayElement)(self.0, i) };
        (!e.is_null()).then_some(ReplyRef(e, PhantomData))
    }

    pub fn integer(self) -> i64 {
        // SAFETY: a live reply (type invariant of ReplyRef).
        unsafe { api!(RedisModule_CallReplyInteger)(self.0) }
    }

    /// The text of a string or error reply (`None` for other types).
    pub fn text(self) -> Option<Vec<u8>> {
        let mut len = 0usize;
        // SAFETY: the pointer, when not null, is `len` bytes owned by the reply.
        unsafe {
            let p = api!(RedisModule_CallReplyStringPtr)(self.0, &mut len);
            (!p.is_null()).then(|| std::slice::from_raw_parts(p as *const u8, len).to_vec())
        }
    }

    /// `text` lower-cased, empty for other types.
    pub fn lower_text(self) -> Vec<u8> {
        self.text().unwrap_or_default().to_ascii_lowercase()
    }

    /// The reply's RESP bytes (in the protocol it was called with).
    pub fn proto(self) -> Vec<u8> {
        let mut len = 0usize;
        // SAFETY: the pointer, when not null, is `len` bytes owned by the reply.
        unsafe {
            let p = api!(RedisModule_CallReplyProto)(self.0, &mut len);
            if p.is_null() {
                return b"-ERR keel could not read the command's reply\r\n".to_vec();
            }
            std::slice::from_raw_parts(p as *const u8, len).to_vec()
        }
    }
}

// ---------------------------------------------------------------- RM_Call

thread_local! {
    /// The next filtered command is the module's own `call` (main thread).
    static SKIP_NEXT_FILTER: Cell<bool> = const { Cell::new(false) };
    /// How many of the module's own calls are running (a script they run,
    /// or clients served while that script is busy, are filtered inside).
    static CALL_DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// Whether one of the module's own `call`s is running.
pub fn in_module_call() -> bool {
    CALL_DEPTH.with(|d| d.get()) > 0
}

/// Whether the server is Valkey (set at load): see `wrong_type_get`.
static VALKEY: AtomicBool = AtomicBool::new(false);

/// The commands Valkey (9.x) mishandles inside `RM_Call` on a key of
/// another type: they defer their reply, and on that error path return
/// before committing it, so the call's reply is cut short and the calling
/// client itself is sent `WRONGTYPE` besides the module's answer (two
/// replies to one command: the client's replies go out of step).
/// Each with its number of arguments (name excluded).
const VALKEY_DEFERRED_GETS: &[(&[u8], usize)] = &[(b"getdel", 1), (b"getset", 2)];

fn assert_unlocked() {
    // The called command may notify keyspace events or run filters, which
    // lock the state: held here, that would deadlock the server.
    assert!(!lock_held(), "RM_Call with the module's state locked: the command's callbacks would deadlock on it");
}

impl Ctx {
    /// `RM_Call` with an argument vector (`fmt` starts with `v`), unfiltered.
    pub fn call(self, cmd: &CStr, fmt: &CStr, args: &[Arg]) -> Option<CallReply> {
        if let Some(r) = self.wrong_type_get(cmd, fmt, args) {
            return r;
        }
        self.call_unchecked(cmd, fmt, args)
    }

    fn call_unchecked(self, cmd: &CStr, fmt: &CStr, args: &[Arg]) -> Option<CallReply> {
        assert_unlocked();
        assert!(fmt.to_bytes().first() == Some(&b'v'), "call takes an argument vector");
        SKIP_NEXT_FILTER.with(|s| s.set(true));
        CALL_DEPTH.with(|d| d.set(d.get() + 1));
        // SAFETY: a live context, NUL-terminated name and format; `v` reads
        // `args.len()` string pointers from `args`, each live (`Arg`).
        let reply = unsafe { api!(RedisModule_Call)(self.0, cmd.as_ptr(), fmt.as_ptr(), args.as_ptr(), args.len()) };
        CALL_DEPTH.with(|d| d.set(d.get() - 1));
        // Cleared even when the call failed before reaching the filter.
        SKIP_NEXT_FILTER.with(|s| s.set(false));
        (!reply.is_null()).then_some(CallReply(reply))
    }

    /// `RM_Call` of an admin command with byte-string arguments, unfiltered.
    pub fn call_bytes(self, cmd: &CStr, args: &[&[u8]]) -> Option<CallReply> {
        let strs = Args::new(self, args);
        self.call(cmd, c"v", &strs)
    }

    /// `RM_Call` of a command without arguments, through the filter (which
    /// routes such commands untouched).
    pub fn call_no_args(self, cmd: &CStr) -> Option<CallReply> {
        assert_unlocked();
        // SAFETY: a live context, NUL-terminated name and empty format.
        let reply = unsafe { api!(RedisModule_Call)(self.0, cmd.as_ptr(), c"".as_ptr()) };
        (!reply.is_null()).then_some(CallReply(reply))
    }

    /// For `VALKEY_DEFERRED_GETS` on Valkey, when the key exists and is not
    /// a string (and the user may run the command: else the server refuses
    /// it before it runs, as usual): `GET` of the key is called instead,
    /// which answers the same `WRONGTYPE` error and changes nothing. None:
    /// call the command itself.
    fn wrong_type_get(self, cmd: &CStr, fmt: &CStr, args: &[Arg]) -> Option<Option<CallReply>> {
        if !VALKEY.load(Ordering::Relaxed) {
            return None;
        }
        let name = cmd.to_bytes();
        if !VALKEY_DEFERRED_GETS.iter().any(|&(n, arity)| name.eq_ignore_ascii_case(n) && args.len() == arity) {
            return None;
        }
        let ty = self.key_type_quietly(&args[0])?;
        if ty == raw::REDISMODULE_KEYTYPE_EMPTY as c_int || ty == raw::REDISMODULE_KEYTYPE_STRING as c_int {
            return None;
        }
        let checked = fmt.to_bytes().contains(&b'C');
        if checked {
            let mut argv: Vec<&[u8]> = vec![name];
            argv.extend(args.iter().map(|a| a.bytes()));
            if !self.acl_allows(&Args::new(self, &argv)) {
                return None;
            }
        }
        let get_fmt = CString::new(fmt.to_bytes().iter().copied().filter(|&b| b != b'C').collect::<Vec<u8>>()).unwrap_or_default();
        Some(self.call_unchecked(c"GET", &get_fmt, &args[..1]))
    }

    /// The type of a key, without touching it (no LRU, expiry, stats or
    /// notification); `None` when it cannot be opened.
    fn key_type_quietly(self, key: &Arg) -> Option<c_int> {
        let mode = (raw::REDISMODULE_READ
            | raw::REDISMODULE_OPEN_KEY_NOTOUCH
            | raw::REDISMODULE_OPEN_KEY_NOEXPIRE
            | raw::REDISMODULE_OPEN_KEY_NOSTATS
            | raw::REDISMODULE_OPEN_KEY_NONOTIFY) as c_int;
        // SAFETY: a live context and string; the key is closed before return.
        unsafe {
            let k = api!(RedisModule_OpenKey)(self.0, key.0, mode);
            if k.is_null() {
                return None;
            }
            let ty = api!(RedisModule_KeyType)(k);
            api!(RedisModule_CloseKey)(k);
            Some(ty)
        }
    }
}

/// Notes whether the server is Valkey (at load).
pub fn set_valkey(valkey: bool) {
    VALKEY.store(valkey, Ordering::Relaxed);
}

// ---------------------------------------------------------------- the context

/// A context Redis passed to the running callback (see the top of the file).
#[derive(Clone, Copy)]
pub struct Ctx(*mut raw::RedisModuleCtx);

/// Context flags (`RM_GetContextFlags`).
pub const FLAG_MULTI: u32 = raw::REDISMODULE_CTX_FLAGS_MULTI;
pub const FLAG_LUA: u32 = raw::REDISMODULE_CTX_FLAGS_LUA;
pub const FLAG_RESP3: u32 = raw::REDISMODULE_CTX_FLAGS_RESP3;
pub const FLAG_REPLICA: u32 = raw::REDISMODULE_CTX_FLAGS_SLAVE;

/// Key types (`RM_KeyType`).
pub const KEYTYPE_LIST: c_int = raw::REDISMODULE_KEYTYPE_LIST as c_int;
pub const KEYTYPE_ZSET: c_int = raw::REDISMODULE_KEYTYPE_ZSET as c_int;
pub const KEYTYPE_STREAM: c_int = raw::REDISMODULE_KEYTYPE_STREAM as c_int;

impl Ctx {
    /// The redis-module crate's context of the running callback.
    pub fn of(ctx: &Context) -> Ctx {
        Ctx(ctx.ctx)
    }

    /// The null context, for the calls that accept it.
    pub fn detached() -> Ctx {
        Ctx(std::ptr::null_mut())
    }

    pub fn flags(self) -> u32 {
        // SAFETY: a live (or null: allowed) context.
        unsafe { api!(RedisModule_GetContextFlags)(self.0) as u32 }
    }

    /// Inside MULTI or a script (Redis filters script calls too).
    pub fn in_multi_or_script(self) -> bool {
        self.flags() & (FLAG_MULTI | FLAG_LUA) != 0
    }

    pub fn client_id(self) -> u64 {
        // SAFETY: a live context.
        unsafe { api!(RedisModule_GetClientId)(self.0) }
    }

    pub fn selected_db(self) -> i32 {
        // SAFETY: a live context.
        unsafe { api!(RedisModule_GetSelectedDb)(self.0) }
    }

    /// Selects `db` for the context's client; false if out of range.
    pub fn select_db(self, db: i32) -> bool {
        // SAFETY: a live context.
        unsafe { api!(RedisModule_SelectDb)(self.0, db) == OK }
    }

    pub fn log_warning(self, msg: &str) {
        Context::new(self.0).log_warning(msg);
    }

    pub fn log_notice(self, msg: &str) {
        Context::new(self.0).log_notice(msg);
    }

    /// The name of the calling client's ACL user (`None`: no user).
    pub fn current_user(self) -> Option<Vec<u8>> {
        // SAFETY: a live context; the returned string is freed here.
        unsafe {
            let name = api!(RedisModule_GetCurrentUserName)(self.0);
            if name.is_null() {
                return None;
            }
            let bytes = Arg(name).bytes().to_vec();
            api!(RedisModule_FreeString)(self.0, name);
            Some(bytes)
        }
    }

    /// Whether the client's user may run `args` (name first); true when the
    /// context has no user.
    pub fn acl_allows(self, args: &[Arg]) -> bool {
        // SAFETY: a live context; the name string and the user are freed
        // here; ACLCheckCommandPermissions reads `args.len()` live strings.
        unsafe {
            let name = api!(RedisModule_GetCurrentUserName)(self.0);
            if name.is_null() {
                return true;
            }
            let user = api!(RedisModule_GetModuleUserFromUserName)(name);
            api!(RedisModule_FreeString)(self.0, name);
            if user.is_null() {
                return true;
            }
            let mut argv: Vec<*mut raw::RedisModuleString> = args.iter().map(|a| a.0).collect();
            let allowed = api!(RedisModule_ACLCheckCommandPermissions)(user, argv.as_mut_ptr(), argv.len() as c_int) == OK;
            api!(RedisModule_FreeModuleUser)(user);
            allowed
        }
    }

    /// The type of `key` in the selected database.
    pub fn key_type(self, key: &[u8]) -> c_int {
        let s = Args::new(self, &[key]);
        // SAFETY: a live context and string; KeyType and CloseKey accept the
        // null key OpenKey gives for a missing one.
        unsafe {
            let k = api!(RedisModule_OpenKey)(self.0, s[0].0, raw::REDISMODULE_READ as c_int);
            let ty = api!(RedisModule_KeyType)(k);
            api!(RedisModule_CloseKey)(k);
            ty
        }
    }

    pub fn key_exists(self, key: &[u8]) -> bool {
        let s = Args::new(self, &[key]);
        // SAFETY: a live context and string.
        unsafe { api!(RedisModule_KeyExists)(self.0, s[0].0) != 0 }
    }

    /// The id of the last entry of stream `key` (`None`: not a stream, or empty).
    pub fn last_stream_entry(self, key: &[u8]) -> Option<(u64, u64)> {
        let s = Args::new(self, &[key]);
        // SAFETY: a live context and string; the iterator is stopped and the
        // key closed before return; NextID writes into valid out-pointers.
        unsafe {
            let k = api!(RedisModule_OpenKey)(self.0, s[0].0, raw::REDISMODULE_READ as c_int);
            let mut last = None;
            if api!(RedisModule_KeyType)(k) == KEYTYPE_STREAM
                && api!(RedisModule_StreamIteratorStart)(
                    k,
                    raw::REDISMODULE_STREAM_ITERATOR_REVERSE as c_int,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                ) == OK
            {
                let mut id = raw::RedisModuleStreamID { ms: 0, seq: 0 };
                let mut fields: std::os::raw::c_long = 0;
                if api!(RedisModule_StreamIteratorNextID)(k, &mut id, &mut fields) == OK {
                    last = Some((id.ms, id.seq));
                }
                api!(RedisModule_StreamIteratorStop)(k);
            }
            api!(RedisModule_CloseKey)(k);
            last
        }
    }

    /// A section of `INFO` (`None`: the server gives none).
    pub fn server_info(self, section: &CStr) -> Option<ServerInfo> {
        // SAFETY: a live (or null: allowed) context, a NUL-terminated name.
        let p = unsafe { api!(RedisModule_GetServerInfo)(self.0, section.as_ptr()) };
        (!p.is_null()).then_some(ServerInfo { ctx: self, data: p })
    }

    /// Runs `T::fire(job)` after `ms` milliseconds.
    pub fn timer<T: TimerJob>(self, ms: i64, job: T) {
        let data = Box::into_raw(Box::new(job)) as *mut c_void;
        // SAFETY: a live context; `timer_entry::<T>` takes the box back,
        // once, when the timer fires (module timers are never stopped here).
        unsafe { api!(RedisModule_CreateTimer)(self.0, ms, Some(timer_entry::<T>), data) };
    }
}

/// An `INFO` section, freed on drop.
pub struct ServerInfo {
    ctx: Ctx,
    data: *mut raw::RedisModuleServerInfoData,
}

impl ServerInfo {
    /// A field's text, if present.
    pub fn field(&self, name: &CStr) -> Option<Vec<u8>> {
        // SAFETY: live info data; the returned C string belongs to it.
        unsafe {
            let v = api!(RedisModule_ServerInfoGetFieldC)(self.data, name.as_ptr());
            (!v.is_null()).then(|| CStr::from_ptr(v).to_bytes().to_vec())
        }
    }

    /// A field as an unsigned number (`None`: missing or not a number).
    pub fn unsigned(&self, name: &CStr) -> Option<u64> {
        let mut err: c_int = 0;
        // SAFETY: live info data and a valid out-pointer.
        let v = unsafe { api!(RedisModule_ServerInfoGetFieldUnsigned)(self.data, name.as_ptr(), &mut err) };
        (err == 0).then_some(v)
    }
}

impl Drop for ServerInfo {
    fn drop(&mut self) {
        // SAFETY: freed once, with the context it was got with.
        unsafe { api!(RedisModule_FreeServerInfo)(self.ctx.0, self.data) };
    }
}

/// Work a timer does when it fires.
pub trait TimerJob: Sized + 'static {
    fn fire(self, ctx: Ctx);
}

extern "C" fn timer_entry<T: TimerJob>(ctx: *mut raw::RedisModuleCtx, data: *mut c_void) {
    // SAFETY: `data` is the box `Ctx::timer::<T>` leaked, and each timer
    // fires once.
    let job = unsafe { Box::from_raw(data as *mut T) };
    job.fire(Ctx(ctx));
}

// ---------------------------------------------------------------- replying

/// Replying: `self.0` is the live context of the command (or unblocked
/// client) being answered.
impl Ctx {
    pub fn reply_error(self, msg: &str) -> Status {
        let m = cstr(msg);
        // SAFETY: the live context being answered; a NUL-terminated C string.
        unsafe { api!(RedisModule_ReplyWithError)(self.0, m.as_ptr()) }
    }

    /// An error whose bytes are sent as they are (empty if they hold a NUL).
    pub fn reply_error_bytes(self, e: &[u8]) -> Status {
        let e = CString::new(e).unwrap_or_default();
        // SAFETY: the live context being answered; a NUL-terminated C string.
        unsafe { api!(RedisModule_ReplyWithError)(self.0, e.as_ptr()) }
    }

    pub fn reply_simple(self, s: &[u8]) -> Status {
        let s = CString::new(s).unwrap_or_default();
        // SAFETY: the live context being answered; a NUL-terminated C string.
        unsafe { api!(RedisModule_ReplyWithSimpleString)(self.0, s.as_ptr()) }
    }

    pub fn reply_ok(self) -> Status {
        self.reply_simple(b"OK")
    }

    pub fn reply_integer(self, v: i64) -> Status {
        // SAFETY: the live context being answered.
        unsafe { api!(RedisModule_ReplyWithLongLong)(self.0, v) }
    }

    pub fn reply_bulk(self, b: &[u8]) -> Status {
        // SAFETY: the live context being answered; a buffer of `len` bytes, copied.
        unsafe { api!(RedisModule_ReplyWithStringBuffer)(self.0, b.as_ptr() as *const c_char, b.len()) }
    }

    pub fn reply_null(self) -> Status {
        // SAFETY: the live context being answered.
        unsafe { api!(RedisModule_ReplyWithNull)(self.0) }
    }

    pub fn reply_null_array(self) -> Status {
        // SAFETY: the live context being answered.
        unsafe { api!(RedisModule_ReplyWithNullArray)(self.0) }
    }

    pub fn reply_array(self, n: i64) -> Status {
        // SAFETY: the live context being answered; the caller sends `n` elements next.
        unsafe { api!(RedisModule_ReplyWithArray)(self.0, n as _) }
    }

    pub fn reply_map(self, n: i64) -> Status {
        // SAFETY: the live context being answered; the caller sends `n` pairs next.
        unsafe { api!(RedisModule_ReplyWithMap)(self.0, n as _) }
    }

    pub fn reply_set(self, n: i64) -> Status {
        // SAFETY: the live context being answered; the caller sends `n` elements next.
        unsafe { api!(RedisModule_ReplyWithSet)(self.0, n as _) }
    }

    pub fn reply_attribute(self, n: i64) -> Status {
        // SAFETY: the live context being answered; the caller sends `n` pairs next.
        unsafe { api!(RedisModule_ReplyWithAttribute)(self.0, n as _) }
    }

    pub fn reply_bool(self, b: bool) -> Status {
        // SAFETY: the live context being answered.
        unsafe { api!(RedisModule_ReplyWithBool)(self.0, b as c_int) }
    }

    pub fn reply_double(self, d: f64) -> Status {
        // SAFETY: the live context being answered.
        unsafe { api!(RedisModule_ReplyWithDouble)(self.0, d) }
    }

    pub fn reply_big_number(self, n: &[u8]) -> Status {
        // SAFETY: the live context being answered; a buffer of `len` bytes, copied.
        unsafe { api!(RedisModule_ReplyWithBigNumber)(self.0, n.as_ptr() as *const c_char, n.len()) }
    }

    pub fn reply_verbatim(self, text: &[u8], format: &[u8]) -> Status {
        let f = CString::new(format).unwrap_or_default();
        // SAFETY: the live context being answered; a buffer of `len` bytes and a NUL-terminated format.
        unsafe { api!(RedisModule_ReplyWithVerbatimStringType)(self.0, text.as_ptr() as *const c_char, text.len(), f.as_ptr()) }
    }

    /// Relays a call reply (or an element of one) as it is.
    pub fn reply_call_reply(self, r: ReplyRef<'_>) -> Status {
        // SAFETY: the live context being answered; `r` borrows a live reply.
        unsafe { api!(RedisModule_ReplyWithCallReply)(self.0, r.0) }
    }

    pub fn wrong_arity(self) -> Status {
        // SAFETY: the live context being answered.
        unsafe { api!(RedisModule_WrongArity)(self.0) }
    }
}

// ---------------------------------------------------------------- command keys

const ENOENT: i32 = 2;
const EINVAL: i32 = 22;

/// What `RM_GetCommandKeys` says about a command.
#[derive(Debug, PartialEq, Eq)]
pub enum CommandKeys {
    Keys(Vec<Vec<u8>>),
    /// A known command without key arguments.
    NoKeys,
    UnknownCommand,
    WrongArity,
    /// Any other failure.
    Unknown,
}

/// The key arguments of `args` (name first), as Redis finds them.
pub fn command_keys(args: &[Arg]) -> CommandKeys {
    extern "C" {
        fn __errno_location() -> *mut c_int;
    }
    let mut num: c_int = 0;
    let mut argv: Vec<*mut raw::RedisModuleString> = args.iter().map(|a| a.0).collect();
    // SAFETY: errno is this thread's; GetCommandKeys reads `argv.len()` live
    // strings and returns `num` positions (freed here) or null with errno.
    unsafe {
        *__errno_location() = 0;
        let pos = api!(RedisModule_GetCommandKeys)(std::ptr::null_mut(), argv.as_mut_ptr(), argv.len() as c_int, &mut num);
        if pos.is_null() {
            return match *__errno_location() {
                0 => CommandKeys::NoKeys,
                ENOENT => CommandKeys::UnknownCommand,
                EINVAL => CommandKeys::WrongArity,
                _ => CommandKeys::Unknown,
            };
        }
        let keys = (0..num as usize)
            .filter_map(|i| {
                let p = *pos.add(i) as usize;
                args.get(p).map(|a| a.bytes().to_vec())
            })
            .collect();
        api!(RedisModule_Free)(pos as *mut c_void);
        CommandKeys::Keys(keys)
    }
}

/// The key arguments of a command (`None`: unknown command or bad arity).
pub fn keys_of(args: &[Arg]) -> Option<Vec<Vec<u8>>> {
    match command_keys(args) {
        CommandKeys::Keys(k) => Some(k),
        CommandKeys::NoKeys => Some(Vec::new()),
        _ => None,
    }
}

// ---------------------------------------------------------------- blocked clients

/// A blocked client (see the top of the file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Blocked(*mut raw::RedisModuleBlockedClient);

// SAFETY: a handle only used on Redis's main thread; it sits in the state
// behind the module's mutex, which needs `Send`.
unsafe impl Send for Blocked {}

/// What a blocked client is answered with, and how: the private data
/// handed to `unblock`.
pub trait BlockedReply: Sized + Send + 'static {
    /// Answers the unblocked client (`None`: unblocked without data).
    fn reply(ctx: Ctx, answer: Option<&Self>) -> Status;
    /// The client's timeout fired (`bc`: its handle, to unblock it).
    fn timed_out(ctx: Ctx, bc: Blocked) -> Status;
    /// The client left while blocked (only for `block_until_disconnect`).
    fn disconnected(bc: Blocked);
}

impl Ctx {
    /// Blocks the calling client until `unblock` or `timeout_ms` (0: none).
    pub fn block<T: BlockedReply>(self, timeout_ms: i64) -> Blocked {
        // SAFETY: a live context of a command; the callbacks match T.
        let bc = unsafe {
            api!(RedisModule_BlockClient)(self.0, Some(on_unblock::<T>), Some(on_timeout::<T>), Some(free_answer::<T>), timeout_ms)
        };
        Blocked(bc)
    }

    /// `block`, and `T::disconnected` is told if the client leaves.
    pub fn block_until_disconnect<T: BlockedReply>(self, timeout_ms: i64) -> Blocked {
        let bc = self.block::<T>(timeout_ms);
        // SAFETY: a handle just made by BlockClient.
        unsafe { api!(RedisModule_SetDisconnectCallback)(bc.0, Some(on_disconnect::<T>)) };
        bc
    }
}

/// Unblocks a client with `answer` (its `reply` sends it; `None`: none).
/// The handle is not used again after this.
pub fn unblock<T: BlockedReply>(bc: Blocked, answer: Option<T>) {
    let data = answer.map(|a| Box::into_raw(Box::new(a)) as *mut c_void).unwrap_or(std::ptr::null_mut());
    // SAFETY: a handle of a still blocked client (the state forgets it as it
    // is unblocked); `free_answer::<T>` takes the box back.
    unsafe { api!(RedisModule_UnblockClient)(bc.0, data) };
}

extern "C" fn on_unblock<T: BlockedReply>(ctx: *mut raw::RedisModuleCtx, _argv: *mut *mut raw::RedisModuleString, _argc: c_int) -> c_int {
    // SAFETY: the private data is null or the `Box<T>` `unblock::<T>` made,
    // freed only after this callback (free_answer).
    let answer = unsafe { (api!(RedisModule_GetBlockedClientPrivateData)(ctx) as *const T).as_ref() };
    T::reply(Ctx(ctx), answer)
}

extern "C" fn on_timeout<T: BlockedReply>(ctx: *mut raw::RedisModuleCtx, _argv: *mut *mut raw::RedisModuleString, _argc: c_int) -> c_int {
    // SAFETY: the timeout callback's context belongs to the blocked client.
    let bc = unsafe { api!(RedisModule_GetBlockedClientHandle)(ctx) };
    T::timed_out(Ctx(ctx), Blocked(bc))
}

extern "C" fn free_answer<T: BlockedReply>(_ctx: *mut raw::RedisModuleCtx, privdata: *mut c_void) {
    if !privdata.is_null() {
        // SAFETY: the `Box<T>` `unblock::<T>` made, freed once.
        drop(unsafe { Box::from_raw(privdata as *mut T) });
    }
}

extern "C" fn on_disconnect<T: BlockedReply>(_ctx: *mut raw::RedisModuleCtx, bc: *mut raw::RedisModuleBlockedClient) {
    T::disconnected(Blocked(bc));
}

// ---------------------------------------------------------------- the command filter

/// The command a filter callback sees.
pub struct Filtered(*mut raw::RedisModuleCommandFilterCtx);

impl Filtered {
    pub fn len(&self) -> usize {
        // SAFETY: the live filter context of this callback.
        unsafe { api!(RedisModule_CommandFilterArgsCount)(self.0).max(0) as usize }
    }

    /// The arguments, name first (borrowed: the filter cannot change them
    /// while they are read).
    pub fn args(&self) -> FilterArgs<'_> {
        let args = (0..self.len())
            // SAFETY: `i` is in range; the string lives as long as the
            // filter context, which outlives the borrow of `self`.
            .map(|i| Arg(unsafe { api!(RedisModule_CommandFilterArgGet)(self.0, i as c_int) }))
            .collect();
        FilterArgs { args, _filter: PhantomData }
    }

    /// The id of the client that sent the command, where the server tells
    /// (Redis 7.2+, Valkey); Redis 7.0 does not.
    pub fn client_id(&self) -> Option<u64> {
        // SAFETY: the API pointer is read on the main thread after the load
        // filled it in (absent on Redis 7.0); called with the live filter
        // context of this callback.
        let get = unsafe { raw::RedisModule_CommandFilterGetClientId };
        get.map(|f| unsafe { f(self.0) })
    }

    /// Inserts `arg` at position `pos` (0: before the name).
    pub fn insert(&mut self, pos: usize, arg: &[u8]) {
        let s = new_string_for_redis(arg);
        // SAFETY: the live filter context; Redis takes ownership of `s`.
        unsafe { api!(RedisModule_CommandFilterArgInsert)(self.0, pos as c_int, s) };
    }
}

/// A filtered command's arguments, borrowed from its filter context.
pub struct FilterArgs<'a> {
    args: Vec<Arg>,
    _filter: PhantomData<&'a Filtered>,
}

impl std::ops::Deref for FilterArgs<'_> {
    type Target = [Arg];
    fn deref(&self) -> &[Arg] {
        &self.args
    }
}

extern "C" fn filter_entry(fctx: *mut raw::RedisModuleCommandFilterCtx) {
    if SKIP_NEXT_FILTER.with(|s| s.replace(false)) {
        return;
    }
    crate::filter::filter(&mut Filtered(fctx));
}

// ---------------------------------------------------------------- commands and events

extern "C" fn command_entry(ctx: *mut raw::RedisModuleCtx, argv: *mut *mut raw::RedisModuleString, argc: c_int) -> c_int {
    // SAFETY: Redis passes `argc` live strings, the command name first, for
    // the duration of the command; `Arg` is a transparent pointer.
    let args = unsafe { std::slice::from_raw_parts(argv as *const Arg, argc.max(0) as usize) };
    crate::register::dispatch(Ctx(ctx), args)
}

impl Ctx {
    /// Registers a `keel.*` command (served by `register::dispatch`).
    pub fn create_command(self, name: &str, flags: &str) -> bool {
        let (n, f) = (cstr(name), cstr(flags));
        // SAFETY: a live context at load; NUL-terminated name and flags.
        unsafe { api!(RedisModule_CreateCommand)(self.0, n.as_ptr(), Some(command_entry), f.as_ptr(), 0, 0, 0) == OK }
    }

    /// Registers the command filter (`filter::filter`). Not NOSELF: while a
    /// script run by the module is busy, Redis serves other clients from
    /// inside that call, and their MULTI/WATCH must still reach the module.
    /// The module's own calls skip the filter through `call`.
    pub fn register_filter(self) -> bool {
        // SAFETY: a live context at load.
        !unsafe { api!(RedisModule_RegisterCommandFilter)(self.0, Some(filter_entry), 0) }.is_null()
    }

    /// Subscribes to every server event `events.rs` handles.
    pub fn subscribe_events(self) -> Result<(), &'static str> {
        type EventFn = unsafe extern "C" fn(*mut raw::RedisModuleCtx, raw::RedisModuleEvent, u64, *mut c_void);
        let events: [(u64, EventFn, &str); 5] = [
            (raw::REDISMODULE_EVENT_EVENTLOOP, on_event_loop, "the event loop"),
            (raw::REDISMODULE_EVENT_FLUSHDB, on_flush, "flushes"),
            (raw::REDISMODULE_EVENT_SWAPDB, on_swapdb, "SWAPDB"),
            (raw::REDISMODULE_EVENT_CLIENT_CHANGE, on_client, "client changes"),
            (raw::REDISMODULE_EVENT_REPLICATION_ROLE_CHANGED, on_role_changed, "role changes"),
        ];
        for (id, f, what) in events {
            let event = raw::RedisModuleEvent { id, dataver: 1 };
            // SAFETY: a live context at load; callbacks of the right type.
            if unsafe { api!(RedisModule_SubscribeToServerEvent)(self.0, event, Some(f)) } != OK {
                return Err(what);
            }
        }
        // SAFETY: as above.
        if unsafe { api!(RedisModule_SubscribeToKeyspaceEvents)(self.0, raw::REDISMODULE_NOTIFY_ALL as c_int, Some(on_keyspace)) } != OK {
            return Err("keyspace events");
        }
        Ok(())
    }
}

extern "C" fn on_event_loop(ctx: *mut raw::RedisModuleCtx, _eid: raw::RedisModuleEvent, subevent: u64, _data: *mut c_void) {
    // Only BEFORE_SLEEP.
    if subevent == 0 {
        crate::events::before_sleep(Ctx(ctx));
    }
}

extern "C" fn on_flush(ctx: *mut raw::RedisModuleCtx, _eid: raw::RedisModuleEvent, subevent: u64, data: *mut c_void) {
    if subevent != raw::REDISMODULE_SUBEVENT_FLUSHDB_START || data.is_null() {
        return;
    }
    // SAFETY: a FLUSHDB event's data is a RedisModuleFlushInfo.
    let info = unsafe { &*(data as *const raw::RedisModuleFlushInfo) };
    crate::events::flush_starts(Ctx(ctx), if info.dbnum < 0 { None } else { Some(info.dbnum) });
}

extern "C" fn on_swapdb(ctx: *mut raw::RedisModuleCtx, _eid: raw::RedisModuleEvent, _subevent: u64, data: *mut c_void) {
    if data.is_null() {
        return;
    }
    // SAFETY: a SWAPDB event's data is a RedisModuleSwapDbInfo.
    let info = unsafe { &*(data as *const raw::RedisModuleSwapDbInfo) };
    crate::events::swapped(Ctx(ctx), info.dbnum_first, info.dbnum_second);
}

extern "C" fn on_client(_ctx: *mut raw::RedisModuleCtx, _eid: raw::RedisModuleEvent, subevent: u64, data: *mut c_void) {
    if subevent != raw::REDISMODULE_SUBEVENT_CLIENT_CHANGE_DISCONNECTED || data.is_null() {
        return;
    }
    // SAFETY: a CLIENT_CHANGE event's data is a RedisModuleClientInfo.
    let info = unsafe { &*(data as *const raw::RedisModuleClientInfo) };
    crate::events::client_left(info.id);
}

extern "C" fn on_role_changed(_ctx: *mut raw::RedisModuleCtx, _eid: raw::RedisModuleEvent, subevent: u64, _data: *mut c_void) {
    crate::events::role_changed(subevent == raw::REDISMODULE_EVENT_REPLROLECHANGED_NOW_REPLICA);
}

extern "C" fn on_keyspace(ctx: *mut raw::RedisModuleCtx, _type: c_int, _event: *const c_char, key: *mut raw::RedisModuleString) -> c_int {
    // SAFETY: the notified key's name, live during the notification.
    let key = unsafe { &*(std::ptr::addr_of!(key) as *const Arg) };
    crate::events::key_written(Ctx(ctx), key.bytes());
    OK
}
