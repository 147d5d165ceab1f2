//! `keel-sidecar handover`: asks the deployment's primary (found through
//! the discovery endpoints) to hand over (`FAILOVER [TO host port]`), and
//! measures what a client sees meanwhile: a probe writes one key over and
//! over, following discovery as a Sentinel client does, and the write
//! unavailability is the time from the last write the old primary
//! acknowledged to the first the new one did (it includes one write's
//! round trip). With a CA (`--tls-ca`), every connection is TLS, as the
//! clients of a `--tls` deployment connect.

use std::time::Duration;
use std::time::Instant;

use keel_sidecar::resp::Reply;
use keel_sidecar::resp::encode_command;
use keel_sidecar::resp::parse_command;
use keel_sidecar::resp::parse_reply;
use tokio::io::AsyncReadExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// How long one request to a node may take before the probe moves on.
const REQUEST_TIMEOUT_MS: u64 = 1_000;
/// How long the whole handover may take, seen from here.
pub const MAX_WAIT_MS: u64 = 15_000;

/// A connection's byte stream: TCP, or TLS over it.
trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

/// How to reach the deployment's Redis nodes and discovery endpoints.
#[derive(Clone)]
pub struct Access {
    pub password: Option<String>,
    /// TLS trusting the deployment's CA, if the deployment serves TLS.
    pub tls: Option<tokio_rustls::TlsConnector>,
}

struct Client {
    sock: Box<dyn Stream>,
    buf: Vec<u8>,
}

impl Client {
    async fn connect(addr: &str, access: &Access) -> Result<Client, String> {
        let connected = async {
            let tcp = TcpStream::connect(addr).await.map_err(|e| format!("{addr}: {e}"))?;
            tcp.set_nodelay(true).ok();
            let sock: Box<dyn Stream> = match &access.tls {
                None => Box::new(tcp),
                Some(tls) => {
                    let host = addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr).trim_matches(|c| c == '[' || c == ']');
                    let name = rustls::pki_types::ServerName::try_from(host.to_string()).map_err(|e| format!("{addr}: {e}"))?;
                    Box::new(tls.connect(name, tcp).await.map_err(|e| format!("{addr}: TLS: {e}"))?)
                }
            };
            Ok::<_, String>(sock)
        };
        let sock = tokio::time::timeout(Duration::from_millis(REQUEST_TIMEOUT_MS), connected).await.map_err(|_| format!("{addr}: connect timed out"))??;
        let mut c = Client { sock, buf: Vec::new() };
        if let Some(p) = access.password.as_deref() {
            if let Reply::Error(e) = c.request(&[b"AUTH", p.as_bytes()]).await? {
                return Err(format!("{addr}: AUTH: {e}"));
            }
        }
        Ok(c)
    }

    async fn send(&mut self, args: &[&[u8]]) -> Result<(), String> {
        self.sock.write_all(&encode_command(args)).await.map_err(|e| e.to_string())
    }

    async fn fill(&mut self) -> Result<(), String> {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_millis(REQUEST_TIMEOUT_MS), self.sock.read(&mut chunk))
            .await
            .map_err(|_| "no answer in time".to_string())?
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed".into());
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    /// One request with a non-aggregate reply.
    async fn request(&mut self, args: &[&[u8]]) -> Result<Reply, String> {
        self.send(args).await?;
        loop {
            if let Some((r, used)) = parse_reply(&self.buf).map_err(|e| format!("{e:?}"))? {
                self.buf.drain(..used);
                return Ok(r);
            }
            self.fill().await?;
        }
    }

    /// One request whose reply is an array of bulk strings (or a null one).
    async fn request_array(&mut self, args: &[&[u8]]) -> Result<Option<Vec<Vec<u8>>>, String> {
        self.send(args).await?;
        loop {
            if self.buf.starts_with(b"*-1\r\n") {
                self.buf.drain(..5);
                return Ok(None);
            }
            if self.buf.starts_with(b"-") {
                if let Some((Reply::Error(e), used)) = parse_reply(&self.buf).map_err(|e| format!("{e:?}"))? {
                    self.buf.drain(..used);
                    return Err(e);
                }
            }
            if let Some((v, used)) = parse_command(&self.buf).map_err(|e| format!("{e:?}"))? {
                self.buf.drain(..used);
                return Ok(Some(v));
            }
            self.fill().await?;
        }
    }
}

/// The primary's address, as the first discovery endpoint that knows it says.
async fn primary_of(sentinels: &[String], master_name: &str, access: &Access) -> Option<String> {
    for s in sentinels {
        let Ok(mut c) = Client::connect(s, access).await else { continue };
        if let Ok(Some(v)) = c.request_array(&[b"SENTINEL", b"get-master-addr-by-name", master_name.as_bytes()]).await {
            if v.len() == 2 {
                return Some(format!("{}:{}", String::from_utf8_lossy(&v[0]), String::from_utf8_lossy(&v[1])));
            }
        }
    }
    None
}

/// One acknowledged probe write: by whom, and when (since the start).
#[derive(Debug, Clone)]
struct Ack {
    node: String,
    at: Duration,
}

pub struct Args {
    pub sentinels: Vec<String>,
    pub master_name: String,
    pub to: Option<String>,
    pub access: Access,
    pub probe_key: String,
}

/// Runs the handover; prints what happened; the error says what to do.
pub async fn run(a: Args) -> Result<(), String> {
    let access = &a.access;
    let old = primary_of(&a.sentinels, &a.master_name, access)
        .await
        .ok_or_else(|| format!("no discovery endpoint of {} names a primary; is the deployment up?", a.sentinels.join(",")))?;
    let start = Instant::now();
    // The probe: follows discovery, writes until the new primary acknowledged one.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Ack>();
    let (sentinels, master, key, access2) = (a.sentinels.clone(), a.master_name.clone(), a.probe_key.clone(), a.access.clone());
    let probe = tokio::spawn(async move {
        let mut n = 0u64;
        let mut conn: Option<(String, Client)> = None;
        let mut errors = 0u64;
        loop {
            if conn.is_none() {
                match primary_of(&sentinels, &master, &access2).await {
                    Some(addr) => match Client::connect(&addr, &access2).await {
                        Ok(c) => conn = Some((addr, c)),
                        Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
                    },
                    None => tokio::time::sleep(Duration::from_millis(1)).await,
                }
                continue;
            }
            let (addr, c) = conn.as_mut().expect("connected");
            n += 1;
            match c.request(&[b"SET", key.as_bytes(), n.to_string().as_bytes()]).await {
                Ok(Reply::Status(_)) => {
                    if tx.send(Ack { node: addr.clone(), at: start.elapsed() }).is_err() {
                        return errors;
                    }
                }
                _ => {
                    errors += 1;
                    conn = None;
                }
            }
        }
    });
    let first = tokio::time::timeout(Duration::from_millis(MAX_WAIT_MS), rx.recv()).await.ok().flatten();
    let Some(mut last_old) = first.filter(|a| a.node == old) else {
        probe.abort();
        return Err(format!("the probe could not write to the primary {old}"));
    };
    let mut c = Client::connect(&old, access).await?;
    let mut args: Vec<&[u8]> = vec![b"FAILOVER"];
    let to_parts: Vec<String> = a.to.as_deref().map(|t| t.rsplitn(2, ':').map(String::from).collect()).unwrap_or_default();
    if let [port, host] = &to_parts[..] {
        args.extend([&b"TO"[..], host.as_bytes(), port.as_bytes()]);
    } else if let Some(t) = &a.to {
        probe.abort();
        return Err(format!("--to {t}: give HOST:PORT"));
    }
    let asked_at = start.elapsed();
    match c.request(&args).await? {
        Reply::Status(_) => {}
        Reply::Error(e) => {
            probe.abort();
            return Err(format!("{old} refused the handover: {e}"));
        }
        other => return Err(format!("unexpected answer to FAILOVER: {other:?}")),
    }
    let mut acked_old = 0u64;
    let new = loop {
        match tokio::time::timeout(Duration::from_millis(MAX_WAIT_MS), rx.recv()).await {
            Ok(Some(ack)) if ack.node == old => {
                last_old = ack;
                acked_old += 1;
            }
            Ok(Some(ack)) => break ack,
            _ => {
                probe.abort();
                let info = Client::connect(&old, access).await.ok();
                let last = match info {
                    Some(mut c) => match c.request(&[b"INFO", b"keel"]).await {
                        Ok(Reply::Bulk(Some(b))) => String::from_utf8_lossy(&b)
                            .lines()
                            .find_map(|l| l.strip_prefix("keel_handover_last:").map(String::from))
                            .unwrap_or_default(),
                        _ => String::new(),
                    },
                    None => String::new(),
                };
                return Err(format!("no other node acknowledged a write within {MAX_WAIT_MS} ms; the old primary says: {last}"));
            }
        }
    };
    probe.abort();
    let gap = new.at.saturating_sub(last_old.at);
    println!("handed over: {old} -> {}", new.node);
    println!(
        "write unavailability: {:.1} ms (from the old primary's last acknowledged probe write to the new primary's first; \
         FAILOVER sent {:.1} ms after the start, {acked_old} writes acknowledged by the old primary after it)",
        gap.as_secs_f64() * 1000.0,
        asked_at.as_secs_f64() * 1000.0
    );
    println!("unavailability_ms={:.1}", gap.as_secs_f64() * 1000.0);
    Ok(())
}
