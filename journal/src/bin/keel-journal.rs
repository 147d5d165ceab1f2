//! `keel-journal`: run a journal node (`serve`), operate a cluster (`ctl`),
//! make its certificates (`certs`), measure it (`bench`, `fsync-probe`).

use std::io::Read as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use clap::Parser;
use clap::Subcommand;
use keel_journal::client::AppendSession;
use keel_journal::client::JournalClient;
use keel_journal::client::JournalError;
use keel_journal::server::EXIT_STORAGE_FAILED;
use keel_journal::server::ServeConfig;
use keel_journal::server::StorageFailure;
use keel_journal::server::parse_peers;
use keel_journal::server::serve;
use keel_journal::tls::JOURNAL_NODE_PREFIX;
use keel_journal::tls::JournalTls;
use keel_journal::tls::TlsFlags;

/// A faster allocator for a process that allocates per request.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "keel-journal", about = "Keel's fenced, quorum-durable journal")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one journal node.
    #[command(after_help = "Exit status: 0 after Ctrl-C; 2 on a bad configuration; \
74 when the node stopped because it cannot write or open its data directory (disk full, \
I/O error in the Raft log, record store or a snapshot): one STORAGE_FAILED line on stderr \
names the directory and the cause; free space and restart it (a supervisor should); \
1 on any other failure.")]
    Serve(ServeArgs),
    /// Operate on a running journal cluster.
    Ctl {
        /// Comma-separated host:port of journal nodes.
        #[arg(long, env = "KEEL_JOURNAL")]
        endpoints: String,
        #[command(flatten)]
        tls: TlsArgs,
        #[command(subcommand)]
        op: CtlOp,
    },
    /// Measure append throughput and latency.
    Bench {
        #[arg(long, env = "KEEL_JOURNAL")]
        endpoints: String,
        #[command(flatten)]
        tls: TlsArgs,
        #[arg(long, default_value_t = 1)]
        clients: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, default_value_t = 100)]
        payload_bytes: usize,
        #[arg(long, default_value = "bench")]
        stream: String,
        /// Each client appends over its own AppendStream (as the sidecar
        /// does) instead of one unary call per append.
        #[arg(long)]
        streamed: bool,
        /// Also renew the stream's lease every this many ms (as a Keel
        /// primary does, alongside its appends) and report the renewals'
        /// latency (0: no renewals).
        #[arg(long, default_value_t = 0)]
        renew_every_ms: u64,
    },
    /// Make a deployment's CA and certificates in DIR (or add the missing
    /// ones: existing pairs are kept, new ones are signed by DIR's CA).
    #[command(after_help = "Writes DIR/ca.pem and ca.key (the CA), and NAME.pem and NAME.key for \
journal-1..journal-N (journal nodes: server and client use, for the name keel-journal, localhost, \
127.0.0.1, ::1 and every --san) and every --clients name: redis-* names serve a node's Redis \
clients (its redis-server tls-port and discovery endpoint; server and client use, for localhost, \
127.0.0.1, ::1 and every --san, not keel-journal), any other name has client use only. Every file \
is mode 0600. Give each process its own pair and ca.pem; ca.key only signs.")]
    Certs {
        #[arg(long)]
        dir: PathBuf,
        /// Journal nodes: certificates journal-1..journal-N.
        #[arg(long, default_value_t = 0)]
        journal_nodes: u64,
        /// Comma-separated names (e.g. node-0,node-1,snapshotter,ctl,redis-0):
        /// redis-* serve Redis clients, the others are clients.
        #[arg(long, value_delimiter = ',')]
        clients: Vec<String>,
        /// More names or IP addresses for the journal nodes' and redis-*
        /// certificates.
        #[arg(long)]
        san: Vec<String>,
    },
    /// Measure this disk's fdatasync latency (4 KiB writes) in DIR.
    FsyncProbe {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 2000)]
        count: usize,
    },
}

/// TLS to the journal (see `keel-journal certs`).
#[derive(clap::Args)]
struct TlsArgs {
    /// The deployment's CA certificate (PEM).
    #[arg(long, env = "KEEL_JOURNAL_CA")]
    ca: Option<PathBuf>,
    /// This process's certificate (PEM), issued by the CA.
    #[arg(long, env = "KEEL_JOURNAL_CERT")]
    cert: Option<PathBuf>,
    /// This process's private key (PEM, mode 0600).
    #[arg(long, env = "KEEL_JOURNAL_KEY")]
    key: Option<PathBuf>,
    /// A directory made by `keel-journal certs` (e.g. a deployment's DIR/tls):
    /// ca.pem and this process's pair (journal-<id> for serve, ctl otherwise).
    #[arg(long, env = "KEEL_JOURNAL_TLS_DIR")]
    tls_dir: Option<PathBuf>,
    /// No TLS: plaintext gRPC that anyone who reaches the port may use.
    #[arg(long)]
    insecure: bool,
}

impl TlsArgs {
    /// The loaded identity for certificate `name`, or a message for exit 2.
    fn load(self, name: &str) -> Result<JournalTls, String> {
        let flags = TlsFlags { ca: self.ca, cert: self.cert, key: self.key, dir: self.tls_dir, insecure: self.insecure };
        JournalTls::load(&flags.resolve(name, "--")?)
    }
}

#[derive(clap::Args)]
struct ServeArgs {
    #[arg(long)]
    node_id: u64,
    /// Address to listen on (clients and peers).
    #[arg(long)]
    listen: std::net::SocketAddr,
    /// Directory for the Raft log and snapshots.
    #[arg(long)]
    data: PathBuf,
    /// All members of a new journal: 1=HOST:PORT,2=HOST:PORT,… (one entry =
    /// single-node journal). Read at the first start only; afterwards the
    /// membership is the journal's own (ctl add-node / remove-node).
    #[arg(long, required_unless_present = "join")]
    peers: Option<String>,
    /// Join a running journal instead (HOST:PORT,… of any of its nodes):
    /// this empty node asks to be added, catches up as a learner, then
    /// becomes a voter. Its address is --announce, else --listen.
    #[arg(long, conflicts_with = "peers")]
    join: Option<String>,
    /// The address peers and clients reach this node at (default: --listen).
    #[arg(long)]
    announce: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9101).
    #[arg(long)]
    metrics: Option<std::net::SocketAddr>,
    /// How often the Raft leader tells followers it is alive.
    #[arg(long, default_value_t = keel_journal::server::DEFAULT_HEARTBEAT_MS)]
    heartbeat_ms: u64,
    /// A follower that hears no leader for a random time between the
    /// election bounds calls an election. Together they bound how long the
    /// journal has no leader after losing one; it must stay well inside a
    /// Keel primary's lease (1000 ms by default), or losing the journal's
    /// leader costs a Keel failover.
    #[arg(long, default_value_t = keel_journal::server::DEFAULT_ELECTION_MIN_MS)]
    election_min_ms: u64,
    #[arg(long, default_value_t = keel_journal::server::DEFAULT_ELECTION_MAX_MS)]
    election_max_ms: u64,
    /// Async worker threads (1 = a single-threaded runtime).
    #[arg(long, default_value_t = 1)]
    worker_threads: usize,
    /// Group-commit window before each fsync, in microseconds.
    #[arg(long, default_value_t = 0)]
    flush_wait_us: u64,
    #[arg(long, default_value_t = 50_000)]
    snapshot_every_entries: u64,
    /// … or after this many record bytes, whichever comes first (bounds
    /// the disk a node's Raft log and trimmed records take).
    #[arg(long, default_value_t = keel_journal::server::DEFAULT_SNAPSHOT_EVERY_BYTES)]
    snapshot_every_bytes: u64,
    /// Log entries kept behind the latest snapshot.
    #[arg(long, default_value_t = 1_000)]
    keep_log_entries: u64,
    #[arg(long, default_value_t = 5_000)]
    write_timeout_ms: u64,
    #[arg(long, default_value_t = 1024)]
    read_batch_records: usize,
    #[arg(long, default_value_t = 1 << 20)]
    read_batch_bytes: usize,
    /// Untrimmed bytes a stream may hold before appends to it are refused
    /// (stream-full) until a snapshot lets the journal trim it.
    #[arg(long, default_value_t = keel_journal::server::DEFAULT_STREAM_QUOTA_BYTES)]
    stream_quota_bytes: u64,
    #[command(flatten)]
    tls: TlsArgs,
}

#[derive(Subcommand)]
enum CtlOp {
    /// Show every node's Raft state.
    Status,
    /// The members as the Raft leader sees them: id, address, role, how
    /// many log entries behind the leader, when last heard.
    Members,
    /// Add a node (started empty with `serve --join`, or with --peers of
    /// itself only): it catches up as a learner, then becomes a voter.
    /// Returns once it is a voter.
    AddNode { node_id: u64, addr: String },
    /// Remove a node (the Raft leader hands over first). Refused when it
    /// would leave the journal without a quorum. Stop its process after.
    RemoveNode { node_id: u64 },
    /// Compare-and-set the stream leader (creates the stream).
    SetLeader {
        stream: String,
        new: String,
        /// The leader expected now; omit for "no leader".
        #[arg(long, default_value = "")]
        expect: String,
    },
    /// Append stdin as one record.
    Append {
        stream: String,
        #[arg(long)]
        leader: String,
        #[arg(long)]
        expect_last_seq: Option<u64>,
    },
    /// Print records (seq, then payload) from SEQ on.
    Read {
        stream: String,
        #[arg(long, default_value_t = 0)]
        from: u64,
        #[arg(long)]
        follow: bool,
        /// Print payloads as hex instead of raw bytes.
        #[arg(long)]
        hex: bool,
    },
    TakeLease {
        stream: String,
        candidate: String,
        #[arg(long)]
        caught_up_seq: u64,
        #[arg(long, default_value_t = 1000)]
        lease_ms: u64,
    },
    RenewLease {
        stream: String,
        uuid: String,
    },
    Trim {
        stream: String,
        upto: u64,
    },
    StreamInfo {
        stream: String,
    },
    GetMeta {
        stream: String,
        key: String,
    },
    CasMeta {
        stream: String,
        key: String,
        value: String,
        #[arg(long)]
        expect: Option<String>,
    },
}

/// Exit codes of `ctl`.
const EXIT_FAILED: u8 = 1;
const EXIT_FENCED: u8 = 3;
const EXIT_OUTCOME_UNKNOWN: u8 = 4;
const EXIT_UNAVAILABLE: u8 = 5;

fn exit_for(e: &JournalError) -> ExitCode {
    eprintln!("keel-journal: {e}");
    ExitCode::from(match e {
        JournalError::Fenced { .. } => EXIT_FENCED,
        JournalError::OutcomeUnknown(_) => EXIT_OUTCOME_UNKNOWN,
        JournalError::Unavailable(_) => EXIT_UNAVAILABLE,
        JournalError::Rejected { .. } => EXIT_FAILED,
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // One async thread unless asked otherwise: measured on 2 cores with three
    // co-located nodes, a single thread per process avoids most cross-thread
    // wake-ups (3-node, 64 clients: 19.5k -> 32k appends/s). raft-log syncs
    // on its own thread either way.
    let threads = match &cli.cmd {
        Cmd::Serve(a) => a.worker_threads,
        _ => 1,
    };
    let rt = match threads {
        0 | 1 => tokio::runtime::Builder::new_current_thread().enable_all().build(),
        n => tokio::runtime::Builder::new_multi_thread().worker_threads(n).enable_all().build(),
    }
    .expect("tokio runtime");
    match cli.cmd {
        Cmd::Serve(a) => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        // raft-log logs every payload-cache eviction at info:
                        // one line per append under load.
                        .unwrap_or_else(|_| "info,openraft=warn,raft_log=warn".into()),
                )
                .with_writer(std::io::stderr)
                .init();
            let me = a.announce.clone().unwrap_or_else(|| a.listen.to_string());
            let peers = match &a.peers {
                Some(list) => match parse_peers(list) {
                    Ok(p) => p,
                    Err(e) => {
                        eprintln!("keel-journal: bad --peers: {e}");
                        return ExitCode::from(2);
                    }
                },
                None => [(a.node_id, me)].into(),
            };
            let join = a.join.as_ref().map(|j| j.split(',').map(str::trim).filter(|e| !e.is_empty()).map(String::from).collect::<Vec<_>>());
            if join.as_ref().is_some_and(|j| j.is_empty()) {
                eprintln!("keel-journal: --join names no endpoint");
                return ExitCode::from(2);
            }
            let mut cfg = ServeConfig {
                tls: JournalTls::Off,
                node_id: a.node_id,
                listen: a.listen,
                data_dir: a.data,
                peers,
                heartbeat_ms: a.heartbeat_ms,
                election_min_ms: a.election_min_ms,
                election_max_ms: a.election_max_ms,
                flush_wait_us: a.flush_wait_us,
                snapshot_every_entries: a.snapshot_every_entries,
                snapshot_every_bytes: a.snapshot_every_bytes,
                keep_log_entries: a.keep_log_entries,
                write_timeout_ms: a.write_timeout_ms,
                read_batch_records: a.read_batch_records,
                read_batch_bytes: a.read_batch_bytes,
                stream_quota_bytes: a.stream_quota_bytes,
                join,
                metrics: a.metrics,
            };
            if let Err(e) = cfg.validate() {
                eprintln!("keel-journal: bad configuration: {e}");
                return ExitCode::from(2);
            }
            cfg.tls = match a.tls.load(&format!("{JOURNAL_NODE_PREFIX}{}", a.node_id)).and_then(|t| t.check_serves().map(|()| t)) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("keel-journal: bad TLS configuration: {e}");
                    return ExitCode::from(2);
                }
            };
            let served = rt.block_on(serve(cfg));
            // Tasks still blocked on a failed disk must not hold up the exit.
            rt.shutdown_timeout(Duration::from_secs(1));
            match served {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => match e.downcast_ref::<StorageFailure>() {
                    Some(failure) => {
                        tracing::error!(data_dir = %failure.data_dir.display(), "{failure}");
                        ExitCode::from(EXIT_STORAGE_FAILED)
                    }
                    None => {
                        eprintln!("keel-journal: {e:#}");
                        ExitCode::from(EXIT_FAILED)
                    }
                },
            }
        }
        Cmd::Ctl { endpoints, tls, op } => {
            let tls = match tls.load("ctl") {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("keel-journal: bad TLS configuration: {e}");
                    return ExitCode::from(2);
                }
            };
            let client = match JournalClient::from_list(&endpoints, &tls) {
                Ok(c) => c,
                Err(e) => return exit_for(&e),
            };
            match rt.block_on(ctl(&client, op)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => exit_for(&e),
            }
        }
        Cmd::Bench { endpoints, tls, clients, seconds, payload_bytes, stream, streamed, renew_every_ms } => {
            let tls = match tls.load("ctl") {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("keel-journal: bad TLS configuration: {e}");
                    return ExitCode::from(2);
                }
            };
            let client = match JournalClient::from_list(&endpoints, &tls) {
                Ok(c) => c,
                Err(e) => return exit_for(&e),
            };
            match rt.block_on(bench(Arc::new(client), clients, seconds, payload_bytes, &stream, streamed, renew_every_ms)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => exit_for(&e),
            }
        }
        Cmd::Certs { dir, journal_nodes, clients, san } => {
            let mut names: Vec<String> = (1..=journal_nodes).map(|i| format!("{JOURNAL_NODE_PREFIX}{i}")).collect();
            names.extend(clients.into_iter().filter(|c| !c.is_empty()));
            match keel_journal::tls::issue(&dir, &names, &san) {
                Ok(made) => {
                    for n in &made {
                        println!("issued {}", dir.join(format!("{n}.pem")).display());
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("keel-journal: certs in {}: {e}", dir.display());
                    ExitCode::from(EXIT_FAILED)
                }
            }
        }
        Cmd::FsyncProbe { dir, count } => match fsync_probe(&dir, count) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("keel-journal: fsync probe in {}: {e}", dir.display());
                ExitCode::from(EXIT_FAILED)
            }
        },
    }
}

fn print_members(m: &keel_proto::journal::MembersResponse) {
    println!("id\taddress\trole\tbehind\theard_ms_ago\tleader");
    for n in &m.members {
        println!(
            "{}\t{}\t{}\t{}\t{}\t{}",
            n.node_id,
            n.addr,
            n.role,
            n.behind,
            n.millis_since_heard.map(|t| t.to_string()).unwrap_or_else(|| "never".into()),
            if n.node_id == m.leader_id { "leader" } else { "" }
        );
    }
}

async fn ctl(client: &JournalClient, op: CtlOp) -> Result<(), JournalError> {
    match op {
        CtlOp::Status => {
            let mut any = false;
            client.learn_members().await;
            for ep in client.endpoints() {
                match client.status_of(&ep).await {
                    Ok(s) => {
                        any = true;
                        println!(
                            "{ep}\tnode={}\tstate={}\tterm={}\tleader={}\tlast_log={}\tapplied={}\tdata_free_bytes={}\tstreams={}",
                            s.node_id,
                            s.state,
                            s.term,
                            s.raft_leader_id.map(|l| l.to_string()).unwrap_or_else(|| "-".into()),
                            s.last_log_index,
                            s.last_applied_index,
                            s.data_free_bytes.map(|b| b.to_string()).unwrap_or_else(|| "unknown".into()),
                            s.streams.join(",")
                        );
                    }
                    Err(e) => println!("{ep}\tdown\t{e}"),
                }
            }
            if !any {
                return Err(JournalError::Unavailable("UNAVAILABLE: no journal node answered".into()));
            }
        }
        CtlOp::Members => print_members(&client.members().await?),
        CtlOp::AddNode { node_id, addr } => print_members(&client.add_node(node_id, &addr).await?),
        CtlOp::RemoveNode { node_id } => print_members(&client.remove_node(node_id).await?),
        CtlOp::SetLeader { stream, new, expect } => {
            let old = client.set_leader(&stream, &new, &expect).await?;
            println!("{old}");
        }
        CtlOp::Append { stream, leader, expect_last_seq } => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .map_err(|e| JournalError::Rejected { kind: keel_journal::client::Rejection::Other("io".into()), message: format!("reading stdin: {e}") })?;
            let seq = client.append(&stream, &leader, vec![buf], expect_last_seq).await?;
            println!("{seq}");
        }
        CtlOp::Read { stream, from, follow, hex } => {
            let mut reader = client.read(&stream, from, follow);
            let mut out = std::io::stdout().lock();
            while let Some(batch) = reader.next_batch().await? {
                for r in batch {
                    let payload = if hex {
                        r.payload.iter().map(|b| format!("{b:02x}")).collect::<String>()
                    } else {
                        String::from_utf8_lossy(&r.payload).into_owned()
                    };
                    let _ = writeln!(out, "{}\t{}", r.seq, payload);
                }
                let _ = out.flush();
            }
        }
        CtlOp::TakeLease { stream, candidate, caught_up_seq, lease_ms } => {
            let l = client.take_lease(&stream, &candidate, caught_up_seq, lease_ms).await?;
            println!("leader={}\tdeadline_unix_ms={}\tlast_seq={}", l.leader_uuid, l.deadline_unix_ms, l.last_seq);
        }
        CtlOp::RenewLease { stream, uuid } => {
            let l = client.renew_lease(&stream, &uuid).await?;
            println!("leader={}\tdeadline_unix_ms={}\tlast_seq={}", l.leader_uuid, l.deadline_unix_ms, l.last_seq);
        }
        CtlOp::Trim { stream, upto } => {
            println!("first_seq={}", client.trim(&stream, upto).await?);
        }
        CtlOp::StreamInfo { stream } => {
            let s = client.stream_info(&stream).await?;
            println!(
                "leader={}\tlease_deadline_unix_ms={}\tfirst_seq={}\tlast_seq={}\tbytes={}",
                s.leader_uuid, s.lease_deadline_unix_ms, s.first_seq, s.last_seq, s.bytes
            );
        }
        CtlOp::GetMeta { stream, key } => match client.get_meta(&stream, &key).await? {
            Some(v) => println!("{}", String::from_utf8_lossy(&v)),
            None => {
                return Err(JournalError::Rejected {
                    kind: keel_journal::client::Rejection::Other("not-found".into()),
                    message: format!("meta key {key:?} is not set on stream {stream:?}"),
                })
            }
        },
        CtlOp::CasMeta { stream, key, value, expect } => {
            client.cas_meta(&stream, &key, expect.map(String::into_bytes), value.into_bytes()).await?;
        }
    }
    Ok(())
}

async fn bench(
    client: Arc<JournalClient>,
    clients: usize,
    seconds: u64,
    payload_bytes: usize,
    stream: &str,
    streamed: bool,
    renew_every_ms: u64,
) -> Result<(), JournalError> {
    // Become the stream's leader, whoever held it before.
    let me = uuid::Uuid::new_v4().to_string();
    let current = match client.stream_info(stream).await {
        Ok(info) => info.leader_uuid,
        Err(JournalError::Rejected { kind: keel_journal::client::Rejection::UnknownStream, .. }) => String::new(),
        Err(e) => return Err(e),
    };
    client.set_leader(stream, &me, &current).await?;

    let stop_at = Instant::now() + Duration::from_secs(seconds);
    let payload = vec![b'k'; payload_bytes];
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (client, me, payload, stream) = (client.clone(), me.clone(), payload.clone(), stream.to_string());
        tasks.push(tokio::spawn(async move {
            let mut hist = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
            let mut errors = 0u64;
            let mut session = streamed.then(|| AppendSession::new(client.clone()));
            while Instant::now() < stop_at {
                let t = Instant::now();
                let appended = match session.as_mut() {
                    Some(s) => s.append(&stream, &me, vec![payload.clone()], None).await,
                    None => client.append(&stream, &me, vec![payload.clone()], None).await,
                };
                match appended {
                    Ok(_) => hist.record(t.elapsed().as_micros().max(1) as u64).expect("in bounds"),
                    Err(e) if e.is_fenced() => return Err(e),
                    Err(_) => errors += 1,
                }
            }
            Ok((hist, errors))
        }));
    }
    let renewals = (renew_every_ms > 0).then(|| {
        let (client, me, stream) = (client.clone(), me.clone(), stream.to_string());
        tokio::spawn(async move {
            let mut hist = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
            let mut tick = tokio::time::interval(Duration::from_millis(renew_every_ms));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while Instant::now() < stop_at {
                tick.tick().await;
                let t = Instant::now();
                client.renew_lease(&stream, &me).await?;
                hist.record(t.elapsed().as_micros().max(1) as u64).expect("in bounds");
            }
            Ok::<_, JournalError>(hist)
        })
    });
    let started = Instant::now();
    let mut all = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
    let mut errors = 0;
    for t in tasks {
        let (h, e) = t.await.expect("bench task")?;
        all.add(&h).expect("same bounds");
        errors += e;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "clients={clients} streamed={streamed} payload_bytes={payload_bytes} seconds={secs:.1} appends={} errors={errors} appends_per_sec={:.0} p50_ms={:.3} p99_ms={:.3} p999_ms={:.3}",
        all.len(),
        all.len() as f64 / secs,
        all.value_at_quantile(0.5) as f64 / 1000.0,
        all.value_at_quantile(0.99) as f64 / 1000.0,
        all.value_at_quantile(0.999) as f64 / 1000.0,
    );
    if let Some(r) = renewals {
        let h = r.await.expect("renewal task")?;
        println!(
            "renewals={} renew_p50_ms={:.3} renew_p99_ms={:.3} renew_max_ms={:.3}",
            h.len(),
            h.value_at_quantile(0.5) as f64 / 1000.0,
            h.value_at_quantile(0.99) as f64 / 1000.0,
            h.max() as f64 / 1000.0,
        );
    }
    Ok(())
}

fn fsync_probe(dir: &std::path::Path, count: usize) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join("fsync-probe.tmp");
    let mut f = std::fs::OpenOptions::new().create(true).truncate(true).write(true).open(&path)?;
    let block = vec![7u8; 4096];
    let mut hist = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
    for _ in 0..count {
        f.write_all(&block)?;
        let t = Instant::now();
        f.sync_data()?;
        hist.record(t.elapsed().as_micros().max(1) as u64).expect("in bounds");
    }
    drop(f);
    std::fs::remove_file(&path)?;
    println!(
        "fdatasync count={count} p50_us={} p99_us={}",
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.99)
    );
    Ok(())
}
