//! The one connection type the sidecar talks to a Redis server with: the
//! local Redis (control commands, `INFO`, the replication link the leader
//! reads the stream from) and a snapshotter's private server. RESP is
//! encoded and parsed by resp.rs only; this file adds the socket
//! (link.rs), authentication (auth.rs) and a read buffer.
//!
//! A `Conn` keeps the bytes it read past the last reply: after a `PSYNC`
//! answer the bytes that follow are the replication stream (or a base
//! RDB), and `read`/`read_exact` hand them out before reading the socket
//! again, so nothing is lost between the handshake and the stream.
//! Redis may send bare `\n` keep-alives to a replica before a reply (while
//! it prepares a full sync); they are skipped wherever a reply or a
//! payload header is expected.
//!
//! A reply is held whole before it is returned: replies are bounded by
//! `MAX_REPLY_BYTES` (what is read this way is `INFO`, `DEBUG DIGEST`,
//! statuses); a base RDB is read as a stream (`bulk_header`, then
//! `read_exact`).

use tokio::io::AsyncReadExt;
use tokio::io::AsyncWriteExt;

use crate::auth::Credentials;
use crate::link::Reader;
use crate::link::RedisAddr;
use crate::link::Writer;
use crate::resp::Reply;
use crate::resp::encode_command;
use crate::resp::parse_reply;

/// Largest reply held whole (a bulk's header and body).
pub const MAX_REPLY_BYTES: usize = 1 << 20;
/// Bytes read from the socket at once while a reply is incomplete.
const READ_CHUNK_BYTES: usize = 16 << 10;

/// A connection to a Redis server.
pub struct Conn {
    rd: ReadHalf,
    wr: WriteHalf,
    local_ip: String,
}

/// The reading side of a `Conn`: replies and raw bytes, in order.
pub struct ReadHalf {
    r: Reader,
    /// Bytes read from the socket and not yet handed out.
    buf: Vec<u8>,
    /// Names the server in errors.
    name: String,
}

/// The writing side of a `Conn`: commands.
pub struct WriteHalf {
    w: Writer,
    name: String,
}

impl Conn {
    /// A connection over these halves; `name` says which server in errors.
    pub fn new(r: Reader, w: Writer, name: String, local_ip: String) -> Conn {
        Conn { rd: ReadHalf { r, buf: Vec::new(), name: name.clone() }, wr: WriteHalf { w, name }, local_ip }
    }

    /// Connects without authenticating (a private server).
    pub async fn open(addr: &RedisAddr) -> Result<Conn, String> {
        let (r, w, local_ip) = crate::link::connect(addr).await.map_err(|e| format!("connect {addr}: {e}"))?;
        Ok(Conn::new(r, w, format!("Redis at {addr}"), local_ip))
    }

    /// Connects to the local Redis and authenticates as the control user
    /// (auth.rs) first, as every connection to it does.
    pub async fn connect(addr: &RedisAddr, creds: &Credentials) -> Result<Conn, String> {
        let mut c = Conn::open(addr).await?;
        crate::auth::authenticate(&mut c, creds, &addr.to_string()).await?;
        Ok(c)
    }

    /// The local IP address the server sees this connection from.
    pub fn local_ip(&self) -> &str {
        &self.local_ip
    }

    pub async fn send(&mut self, args: &[&[u8]]) -> Result<(), String> {
        self.wr.send(args).await
    }

    pub async fn reply(&mut self) -> Result<Reply, String> {
        self.rd.reply().await
    }

    /// Sends a command and reads its reply.
    pub async fn request(&mut self, args: &[&[u8]]) -> Result<Reply, String> {
        self.send(args).await?;
        self.reply().await
    }

    /// `INFO section…` (space-separated section names), as text.
    pub async fn info(&mut self, section: &str) -> Result<String, String> {
        let mut args: Vec<&[u8]> = vec![b"INFO"];
        args.extend(section.split_whitespace().map(str::as_bytes));
        match self.request(&args).await? {
            Reply::Bulk(Some(b)) => Ok(String::from_utf8_lossy(&b).into_owned()),
            other => Err(format!("INFO {section} answered {other:?}")),
        }
    }

    pub async fn bulk_header(&mut self) -> Result<String, String> {
        self.rd.bulk_header().await
    }

    pub async fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        self.rd.read(out).await
    }

    pub async fn read_exact(&mut self, out: &mut [u8]) -> Result<(), String> {
        self.rd.read_exact(out).await
    }

    pub fn split(self) -> (ReadHalf, WriteHalf) {
        (self.rd, self.wr)
    }
}

/// A field of an `INFO` answer.
pub fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines().find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':'))).map(|v| v.trim())
}

/// The replication id and offset of a `FULLRESYNC <replid> <offset>`
/// status (the `PSYNC` answer of a master that sends its dataset); `None`
/// for any other status.
pub fn full_resync(status: &str) -> Option<(String, u64)> {
    let mut w = status.strip_prefix("FULLRESYNC ")?.split_whitespace();
    let replid = w.next()?.to_string();
    Some((replid, w.next()?.parse().ok()?))
}

/// `work` (a fresh connection's exchange with the server at `addr`), or an
/// error if it takes longer than `timeout_ms`.
pub async fn within<T>(addr: &RedisAddr, timeout_ms: u64, work: impl std::future::Future<Output = Result<T, String>>) -> Result<T, String> {
    match tokio::time::timeout(std::time::Duration::from_millis(timeout_ms), work).await {
        Ok(r) => r,
        Err(_) => Err(format!("Redis at {addr} did not answer within {timeout_ms} ms")),
    }
}

impl WriteHalf {
    /// Sends one command (RESP-encoded by resp.rs).
    pub async fn send(&mut self, args: &[&[u8]]) -> Result<(), String> {
        self.w.write_all(&encode_command(args)).await.map_err(|e| format!("{}: {e}", self.name))
    }
}

impl ReadHalf {
    /// Reads the next reply (status, error, integer or bulk), skipping
    /// keep-alive newlines before it.
    pub async fn reply(&mut self) -> Result<Reply, String> {
        loop {
            self.skip_keepalives();
            if let Some((reply, used)) = parse_reply(&self.buf).map_err(|e| format!("{}: {e}", self.name))? {
                self.buf.drain(..used);
                return Ok(reply);
            }
            if self.buf.len() > MAX_REPLY_BYTES {
                return Err(format!("{}: a reply over {MAX_REPLY_BYTES} bytes", self.name));
            }
            self.fill().await?;
        }
    }

    /// Reads the `$<len>` line that starts a payload read as a stream (a
    /// base RDB after `+FULLRESYNC`), skipping keep-alive newlines; returns
    /// the line without its CRLF.
    pub async fn bulk_header(&mut self) -> Result<String, String> {
        loop {
            self.skip_keepalives();
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                self.buf.drain(..i + 2);
                return Ok(line);
            }
            if self.buf.len() > MAX_REPLY_BYTES {
                return Err(format!("{}: a line over {MAX_REPLY_BYTES} bytes", self.name));
            }
            self.fill().await?;
        }
    }

    /// Raw bytes: those already read first, then the socket's. Cancel-safe
    /// (nothing changes before the socket read completes).
    pub async fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.buf.is_empty() {
            return self.r.read(out).await;
        }
        let n = out.len().min(self.buf.len());
        out[..n].copy_from_slice(&self.buf[..n]);
        self.buf.drain(..n);
        Ok(n)
    }

    pub async fn read_exact(&mut self, out: &mut [u8]) -> Result<(), String> {
        let mut at = 0;
        while at < out.len() {
            let n = self.read(&mut out[at..]).await.map_err(|e| format!("{}: {e}", self.name))?;
            if n == 0 {
                return Err(format!("{} closed the connection", self.name));
            }
            at += n;
        }
        Ok(())
    }

    fn skip_keepalives(&mut self) {
        let n = self.buf.iter().take_while(|&&b| b == b'\n').count();
        self.buf.drain(..n);
    }

    async fn fill(&mut self) -> Result<(), String> {
        let at = self.buf.len();
        self.buf.resize(at + READ_CHUNK_BYTES, 0);
        let n = self.r.read(&mut self.buf[at..]).await;
        self.buf.truncate(at + *n.as_ref().unwrap_or(&0));
        match n {
            Ok(0) => Err(format!("{} closed the connection", self.name)),
            Ok(_) => Ok(()),
            Err(e) => Err(format!("{}: {e}", self.name)),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::pin::Pin;
    use std::task::Context;
    use std::task::Poll;

    use proptest::prelude::*;
    use tokio::io::AsyncRead;
    use tokio::io::ReadBuf;

    use super::*;

    /// A reader that hands out `bytes` in pieces of the given sizes.
    pub(crate) struct Pieces {
        bytes: Vec<u8>,
        at: usize,
        cuts: Vec<usize>,
        i: usize,
    }

    impl Pieces {
        pub(crate) fn new(bytes: Vec<u8>, cuts: Vec<usize>) -> Pieces {
            Pieces { bytes, at: 0, cuts, i: 0 }
        }
    }

    impl AsyncRead for Pieces {
        fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
            let cut = self.cuts[self.i % self.cuts.len()].max(1);
            let n = cut.min(self.bytes.len() - self.at).min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.bytes[at..at + n]);
            self.at += n;
            self.i += 1;
            Poll::Ready(Ok(()))
        }
    }

    /// A connection reading `answers` in pieces; what it sends is dropped.
    pub(crate) fn conn(answers: &[u8], cuts: Vec<usize>) -> Conn {
        Conn::new(Box::pin(Pieces::new(answers.to_vec(), cuts)), Box::pin(tokio::io::sink()), "test".into(), "127.0.0.1".into())
    }

    fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
    }

    #[test]
    fn replies_then_the_stream_follow_each_other_exactly() {
        block_on(async {
            let mut c = conn(b"\n\n+FULLRESYNC abc 7\r\n\n$5\r\nREDIS*1\r\n$4\r\nPING\r\n", vec![3]);
            assert_eq!(c.reply().await.unwrap(), Reply::Status("FULLRESYNC abc 7".into()));
            assert_eq!(full_resync("FULLRESYNC abc 7"), Some(("abc".into(), 7)));
            assert_eq!(full_resync("FULLRESYNC abc"), None);
            assert_eq!(full_resync("CONTINUE abc"), None);
            assert_eq!(c.bulk_header().await.unwrap(), "$5");
            let mut rdb = [0u8; 5];
            c.read_exact(&mut rdb).await.unwrap();
            assert_eq!(&rdb, b"REDIS");
            let mut rest = Vec::new();
            let mut chunk = [0u8; 64];
            loop {
                let n = c.read(&mut chunk).await.unwrap();
                if n == 0 {
                    break;
                }
                rest.extend_from_slice(&chunk[..n]);
            }
            assert_eq!(rest, b"*1\r\n$4\r\nPING\r\n");
            assert!(c.reply().await.unwrap_err().contains("closed"));
        });
    }

    #[test]
    fn info_fields_are_found_by_whole_name() {
        let info = "# Replication\r\nrole:slave\r\nmaster_repl_offset:42\r\nmaster_replid:abc\r\n";
        assert_eq!(info_field(info, "role"), Some("slave"));
        assert_eq!(info_field(info, "master_repl_offset"), Some("42"));
        assert_eq!(info_field(info, "master_repl"), None, "a prefix of a name is not the name");
        assert_eq!(info_field(info, "master_host"), None);
    }

    #[test]
    fn an_oversized_reply_is_refused() {
        block_on(async {
            let big = format!("${}\r\n", MAX_REPLY_BYTES * 2).into_bytes();
            let mut answer = big.clone();
            answer.extend(std::iter::repeat_n(b'x', MAX_REPLY_BYTES + 10));
            let mut c = conn(&answer, vec![1 << 16]);
            assert!(c.reply().await.unwrap_err().contains("over"));
        });
    }

    proptest! {
        /// However the bytes are cut into reads, the replies and the bytes
        /// after them come out the same.
        #[test]
        fn reads_do_not_depend_on_how_the_socket_splits(
            replies in prop::collection::vec((0u8..4, prop::collection::vec(b'a'..=b'z', 0..300)), 0..12),
            tail in prop::collection::vec(any::<u8>(), 0..200),
            cuts in prop::collection::vec(1usize..64, 1..20),
        ) {
            let mut bytes = Vec::new();
            let mut want = Vec::new();
            for (kind, text) in &replies {
                let s = String::from_utf8(text.clone()).unwrap();
                let (enc, r) = match kind {
                    0 => (format!("+{s}\r\n").into_bytes(), Reply::Status(s)),
                    1 => (format!("-{s}\r\n").into_bytes(), Reply::Error(s)),
                    2 => (format!(":{}\r\n", text.len()).into_bytes(), Reply::Int(text.len() as i64)),
                    _ => ([format!("${}\r\n", text.len()).as_bytes(), text, b"\r\n"].concat(), Reply::Bulk(Some(text.clone()))),
                };
                bytes.extend_from_slice(&enc);
                want.push(r);
            }
            bytes.extend_from_slice(&tail);
            let (got, rest) = block_on(async {
                let mut c = conn(&bytes, cuts);
                let mut got = Vec::new();
                for _ in 0..want.len() {
                    got.push(c.reply().await.unwrap());
                }
                let mut rest = vec![0u8; tail.len()];
                c.read_exact(&mut rest).await.unwrap();
                (got, rest)
            });
            prop_assert_eq!(got, want);
            prop_assert_eq!(rest, tail);
        }
    }
}
