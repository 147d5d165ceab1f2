//! `keel-sidecar`: `node` runs a Keel node beside a redis-server (replica,
//! candidate, primary); `snapshot` builds, verifies and publishes snapshots
//! so the journal can trim; `decode` prints a journaled stream as commands;
//! `handover` moves the primary role to a replica and measures the pause.

mod handover_cli;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use clap::Subcommand;
use keel_journal_client::client::JournalClient;
use keel_journal_client::tls::JournalTls;
use keel_journal_client::tls::TlsFlags;
use keel_sidecar::primary::PrimaryConfig;
use keel_sidecar::node::NodeConfig;
use keel_sidecar::record::Kind;
use keel_sidecar::record::Record;
use keel_sidecar::resp::parse_command;
use keel_sidecar::sentinel::AccessFlags;
use keel_sidecar::snapshotter::Cycle;
use keel_sidecar::snapshotter::Snapshotter;
use keel_sidecar::snapshotter::SnapshotterConfig;

#[derive(Parser)]
#[command(name = "keel-sidecar", about = "Keel's sidecar: runs a Keel node beside a redis-server")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Hand the primary role over to a caught-up replica now (FAILOVER [TO
    /// host port] to the primary, found through discovery), while a probe
    /// writes and measures the write unavailability clients see.
    Handover {
        /// Comma-separated discovery endpoints (host:port).
        #[arg(long, env = "KEEL_SENTINELS")]
        sentinels: String,
        #[arg(long, default_value = "keel")]
        master_name: String,
        /// The replica to hand over to (its Redis host:port); default: the
        /// first caught-up replica.
        #[arg(long)]
        to: Option<String>,
        /// A file holding the clients' password (default user), if any.
        #[arg(long)]
        password_file: Option<PathBuf>,
        /// The deployment's CA certificate (PEM): connect over TLS, as the
        /// clients of a `--tls` deployment do.
        #[arg(long)]
        tls_ca: Option<PathBuf>,
        /// The key the probe writes (its last value stays).
        #[arg(long, default_value = "keel:handover:probe")]
        probe_key: String,
    },
    /// Run a Keel node beside a redis-server: follow the journal stream as a
    /// replica, take the lease when the primary's lapses, then lead.
    #[command(alias = "primary")]
    Node {
        /// The local redis-server (with the keel module loaded): host:port,
        /// or unix:/path of its unix socket (e.g. when it serves clients
        /// over TLS only).
        #[arg(long, default_value = "127.0.0.1:6379")]
        redis: String,
        /// The address clients reach this node's Redis at, handed out by
        /// discovery (default: --redis; required with a unix socket).
        #[arg(long)]
        announce: Option<String>,
        #[command(flatten)]
        stream: StreamArgs,
        /// Where this node keeps its identity.
        #[arg(long)]
        state_dir: PathBuf,
        #[arg(long, default_value_t = 1000)]
        lease_ms: u64,
        #[arg(long, default_value_t = 100)]
        drift_margin_ms: u64,
        /// How often a replica checks the lease and its Redis.
        #[arg(long, default_value_t = 200)]
        poll_ms: u64,
        #[arg(long, default_value_t = 64 << 20)]
        max_buffered_bytes: usize,
        /// After a confirmation, how long the next append may wait for the
        /// clients just answered to send their next writes (0: never wait).
        /// Off by default: it helps closed-loop load (measured in
        /// docs/benchmarks.md) and delays writes that no answer triggered.
        #[arg(long, default_value_t = 0)]
        merge_wait_us: u64,
        #[arg(long, default_value_t = 1000)]
        replconf_ack_ms: u64,
        #[arg(long, default_value_t = 100)]
        retry_pause_ms: u64,
        /// Where the local Redis connects to be fed from the journal when
        /// this node is a replica (port 0: any free port).
        #[arg(long, default_value = "127.0.0.1:0")]
        feed_listen: String,
        /// Serve a Sentinel-compatible discovery endpoint here.
        #[arg(long)]
        sentinel: Option<String>,
        /// Serve the discovery endpoint over TLS with this certificate chain
        /// (PEM; e.g. redis-<id>.pem from `keel-journal certs`). Clients
        /// need only the CA. Give --sentinel-tls-key with it.
        #[arg(long)]
        sentinel_tls_cert: Option<PathBuf>,
        /// The private key of --sentinel-tls-cert (PEM, mode 0600).
        #[arg(long)]
        sentinel_tls_key: Option<PathBuf>,
        /// A file holding the password discovery clients must give (AUTH)
        /// first: one line, mode 0600. Never give it on a command line.
        #[arg(long)]
        sentinel_password_file: Option<PathBuf>,
        /// The master name discovery answers for.
        #[arg(long, default_value = "keel")]
        master_name: String,
        /// Serve Prometheus metrics at http://ADDR/metrics (e.g.
        /// 127.0.0.1:9102): role, lease, held replies, offsets and lag,
        /// append latency, the latest snapshot (docs/operations.md).
        #[arg(long)]
        metrics: Option<std::net::SocketAddr>,
        /// Serve the metrics over TLS with this certificate chain (PEM; e.g.
        /// redis-<id>.pem from `keel-journal certs`); give
        /// --metrics-tls-key with it. Prometheus then needs the CA.
        #[arg(long)]
        metrics_tls_cert: Option<PathBuf>,
        /// The private key of --metrics-tls-cert (PEM, mode 0600).
        #[arg(long)]
        metrics_tls_key: Option<PathBuf>,
        /// The snapshot store (a directory, or s3://bucket/prefix): full
        /// resyncs after the journal was trimmed start from its snapshots.
        #[arg(long, env = "KEEL_STORE")]
        store: Option<String>,
        /// The ACL user the module lets run the control commands
        /// (its `control_user=`).
        #[arg(long, default_value = keel_sidecar::auth::DEFAULT_USER)]
        control_user: String,
        /// The file holding that user's password (mode 0600; the module's
        /// `control_secret_file=`). Never give the secret on a command line.
        #[arg(long)]
        control_secret_file: PathBuf,
    },
    /// Build, verify and publish snapshots of a stream in private
    /// redis-servers (never on the primary), then trim the journal before
    /// them. Runs a cycle whenever the journal's untrimmed bytes reach
    /// --every-bytes; with --once, runs one cycle now and prints its seq.
    Snapshot {
        #[command(flatten)]
        stream: StreamArgs,
        /// A directory, or s3://bucket/prefix (AWS_* variables give the
        /// endpoint and credentials).
        #[arg(long, env = "KEEL_STORE")]
        store: String,
        /// A server binary the private servers may run; repeat it to give
        /// several engines (e.g. during a rolling upgrade): each snapshot is
        /// built by the newest every live node loads.
        #[arg(long, default_value = "redis-server", action = clap::ArgAction::Append)]
        redis_server: Vec<PathBuf>,
        #[arg(long)]
        work_dir: PathBuf,
        /// Untrimmed journal bytes that start a cycle (capped at half the
        /// journal's quota for the stream, which it reports).
        #[arg(long, default_value_t = 64 << 20)]
        every_bytes: u64,
        #[arg(long, default_value_t = 1000)]
        poll_ms: u64,
        #[arg(long, default_value_t = 600_000)]
        cycle_timeout_ms: u64,
        /// Run one cycle now, print the published snapshot's seq, exit.
        #[arg(long)]
        once: bool,
        /// Print the published snapshot's meta (JSON) and exit.
        #[arg(long, conflicts_with = "once")]
        show: bool,
        /// Copy the published snapshot's RDB to this file (checked against
        /// its meta) and exit.
        #[arg(long, conflicts_with_all = ["once", "show"])]
        fetch: Option<PathBuf>,
        /// Damage the snapshot after upload (tests of the verification).
        #[arg(long, hide = true)]
        fault: Option<keel_sidecar::snapshotter::Fault>,
    },
    /// Adopt a running Redis (no module) into a new stream: its dataset
    /// becomes the stream's first snapshot, its replication stream is
    /// journaled while Keel nodes catch up, and when --switch-file appears
    /// its writes pause, the journal takes them all, it turns read-only and
    /// a caught-up Keel node takes the primary role (docs/adopt.md).
    /// Prints what happened at the switch and exits.
    Adopt(AdoptArgs),
    /// Print a journaled stream: one line per command (or RDB chunk).
    Decode {
        #[command(flatten)]
        stream: StreamArgs,
    },
}

/// `keel-sidecar adopt`'s arguments.
#[derive(clap::Args)]
struct AdoptArgs {
    /// The running Redis: host:port.
    #[arg(long)]
    redis: String,
    /// A user of it allowed PSYNC, INFO, CLIENT, CONFIG, REPLICAOF and
    /// SHUTDOWN (default: the default user, no password).
    #[arg(long)]
    redis_user: Option<String>,
    /// The file holding that user's password (mode 0600).
    #[arg(long)]
    redis_password_file: Option<PathBuf>,
    #[command(flatten)]
    stream: StreamArgs,
    /// The deployment's snapshot store (a directory or s3://bucket/prefix).
    #[arg(long, env = "KEEL_STORE")]
    store: String,
    /// The server binary of the private server the dataset is checked in.
    #[arg(long, default_value = "redis-server")]
    redis_server: PathBuf,
    /// This adoption's files (its identity, the dataset while it is
    /// published, the stream spooled meanwhile).
    #[arg(long)]
    work_dir: PathBuf,
    /// The switch starts once this file exists.
    #[arg(long)]
    switch_file: PathBuf,
    #[arg(long, default_value_t = 1000)]
    lease_ms: u64,
    /// Longest the running Redis's writes stay paused at the switch.
    #[arg(long, default_value_t = 10_000)]
    pause_ms: u64,
    #[arg(long, default_value_t = 4 << 30)]
    max_spool_bytes: u64,
    #[arg(long, default_value_t = 64 << 20)]
    max_buffered_bytes: usize,
    #[arg(long, default_value_t = 100)]
    retry_pause_ms: u64,
    /// Leave the running Redis up, read-only, after the switch.
    #[arg(long)]
    keep_old: bool,
    /// Only finish the switch of an adoption (same --work-dir) whose process
    /// died after it made the running Redis read-only: release the lease to
    /// a caught-up node. Refused unless the running Redis is read-only.
    #[arg(long)]
    finish_fenced: bool,
}

impl AdoptArgs {
    /// The configuration, and whether only the fenced switch is finished.
    fn into_config(self) -> Result<(keel_sidecar::adopt::AdoptConfig, bool), String> {
        let cfg = keel_sidecar::adopt::AdoptConfig {
            redis: keel_sidecar::link::RedisAddr::parse(&self.redis)?,
            announce: self.redis,
            redis_user: self.redis_user,
            redis_password_file: self.redis_password_file,
            journal: self.stream.journal,
            journal_tls: self.stream.journal_tls.load().map_err(|e| format!("bad journal TLS configuration: {e}"))?,
            stream: self.stream.stream,
            store: self.store,
            redis_server: self.redis_server,
            work_dir: self.work_dir,
            switch_file: self.switch_file,
            lease_ms: self.lease_ms,
            pause_ms: self.pause_ms,
            max_spool_bytes: self.max_spool_bytes,
            max_buffered_bytes: self.max_buffered_bytes,
            retry_pause_ms: self.retry_pause_ms,
            keep_old: self.keep_old,
        };
        cfg.validate()?;
        Ok((cfg, self.finish_fenced))
    }
}

/// The journal and the stream a subcommand works on.
#[derive(clap::Args)]
struct StreamArgs {
    /// Comma-separated journal endpoints.
    #[arg(long, env = "KEEL_JOURNAL")]
    journal: String,
    #[command(flatten)]
    journal_tls: JournalTlsArgs,
    #[arg(long, default_value = "shard-1")]
    stream: String,
}

impl StreamArgs {
    /// (journal endpoints, its TLS, stream), or exit code 2 with why.
    fn load(self) -> Result<(String, JournalTls, String), ExitCode> {
        let tls = load_journal_tls(self.journal_tls)?;
        Ok((self.journal, tls, self.stream))
    }
}

/// TLS to the journal: the deployment's CA and this process's own
/// certificate (`keel-journal certs` makes them).
#[derive(clap::Args)]
struct JournalTlsArgs {
    /// The deployment's CA certificate (PEM).
    #[arg(long, env = "KEEL_JOURNAL_CA")]
    journal_ca: Option<PathBuf>,
    /// This process's certificate (PEM), issued by that CA.
    #[arg(long, env = "KEEL_JOURNAL_CERT")]
    journal_cert: Option<PathBuf>,
    /// This process's private key (PEM, mode 0600).
    #[arg(long, env = "KEEL_JOURNAL_KEY")]
    journal_key: Option<PathBuf>,
    /// Talk to a journal that runs without TLS (`keel-journal serve --insecure`).
    #[arg(long)]
    journal_insecure: bool,
}

impl JournalTlsArgs {
    fn load(self) -> Result<JournalTls, String> {
        let flags = TlsFlags { ca: self.journal_ca, cert: self.journal_cert, key: self.journal_key, dir: None, insecure: self.journal_insecure };
        JournalTls::load(&flags.resolve("", "--journal-")?)
    }
}

/// Loads the journal TLS settings, or ends the process with exit code 2.
fn load_journal_tls(args: JournalTlsArgs) -> Result<JournalTls, ExitCode> {
    args.load().map_err(|e| {
        eprintln!("keel-sidecar: bad journal TLS configuration: {e}");
        ExitCode::from(2)
    })
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    match Cli::parse().cmd {
        Cmd::Node {
            redis,
            announce,
            stream,
            state_dir,
            lease_ms,
            drift_margin_ms,
            poll_ms,
            max_buffered_bytes,
            merge_wait_us,
            replconf_ack_ms,
            retry_pause_ms,
            feed_listen,
            sentinel,
            sentinel_tls_cert,
            sentinel_tls_key,
            sentinel_password_file,
            master_name,
            metrics,
            metrics_tls_cert,
            metrics_tls_key,
            store,
            control_user,
            control_secret_file,
        } => {
            let access = AccessFlags { tls_cert: sentinel_tls_cert, tls_key: sentinel_tls_key, password_file: sentinel_password_file };
            let sentinel_access = match access.load(sentinel.is_some()) {
                Ok(a) => a,
                Err(e) => {
                    eprintln!("keel-sidecar: bad discovery endpoint configuration: {e}");
                    return ExitCode::from(2);
                }
            };
            let control = match keel_sidecar::auth::Credentials::from_file(&control_user, &control_secret_file) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("keel-sidecar: bad configuration: {e}");
                    return ExitCode::from(2);
                }
            };
            let (journal, journal_tls, stream) = match stream.load() {
                Ok(t) => t,
                Err(code) => return code,
            };
            let addr = keel_sidecar::link::RedisAddr::parse(&redis);
            let announce = addr.as_ref().map_err(|e| e.clone()).and_then(|a| keel_sidecar::link::client_address(a, announce.as_deref()));
            let (redis, announce) = match (addr, announce) {
                (Ok(r), Ok(a)) => (r, a),
                (Err(e), _) | (_, Err(e)) => {
                    eprintln!("keel-sidecar: bad configuration: {e}");
                    return ExitCode::from(2);
                }
            };
            let primary = PrimaryConfig {
                handover_notice_ms: poll_ms + keel_sidecar::handover::NOTICE_MARGIN_MS,
                redis,
                announce,
                control,
                journal,
                journal_tls,
                stream,
                state_dir,
                lease_ms,
                drift_margin_ms,
                max_buffered_bytes,
                merge_wait_us,
                replconf_ack_ms,
                retry_pause_ms,
            };
            let store = match store.as_deref().map(keel_sidecar::snapshot::SnapshotStore::open).transpose() {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("keel-sidecar: bad configuration: {e}");
                    return ExitCode::from(2);
                }
            };
            let metrics_tls = match (&metrics_tls_cert, &metrics_tls_key) {
                (None, None) => None,
                (Some(c), Some(k)) => match keel_journal_client::tls::server_acceptor("the metrics listener", c, k) {
                    Ok(a) => Some(keel_sidecar::metrics::MetricsTls(a)),
                    Err(e) => {
                        eprintln!("keel-sidecar: bad metrics TLS configuration: {e}");
                        return ExitCode::from(2);
                    }
                },
                _ => {
                    eprintln!("keel-sidecar: give --metrics-tls-cert and --metrics-tls-key together");
                    return ExitCode::from(2);
                }
            };
            if metrics.is_none() && metrics_tls.is_some() {
                eprintln!("keel-sidecar: --metrics-tls-cert needs --metrics");
                return ExitCode::from(2);
            }
            let cfg = NodeConfig { primary, feed_listen, sentinel_listen: sentinel, sentinel_access, master_name, poll_ms, store, metrics, metrics_tls };
            if let Err(e) = cfg.validate() {
                eprintln!("keel-sidecar: bad configuration: {e}");
                return ExitCode::from(2);
            }
            let stop = rt.block_on(keel_sidecar::node::run(cfg));
            eprintln!("keel-sidecar: {stop}");
            ExitCode::from(1)
        }
        Cmd::Snapshot { stream, store, redis_server, work_dir, every_bytes, poll_ms, cycle_timeout_ms, once, show, fetch, fault } => {
            let (journal, journal_tls, stream) = match stream.load() {
                Ok(t) => t,
                Err(code) => return code,
            };
            let cfg = SnapshotterConfig { journal, journal_tls, stream, store, servers: redis_server, work_dir, every_bytes, poll_ms, cycle_timeout_ms, fault };
            let s = match Snapshotter::new(cfg) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("keel-sidecar: bad configuration: {e}");
                    return ExitCode::from(2);
                }
            };
            if let Some(dest) = fetch {
                return match rt.block_on(s.fetch(&dest)) {
                    Ok(m) => {
                        eprintln!("keel-sidecar: snapshot at record {} ({} bytes) copied to {}", m.seq, m.rdb_bytes, dest.display());
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("keel-sidecar: {e}");
                        ExitCode::from(1)
                    }
                };
            }
            if show {
                return match rt.block_on(s.show()) {
                    Ok(Some(m)) => {
                        println!("{}", String::from_utf8_lossy(&m.encode()));
                        ExitCode::SUCCESS
                    }
                    Ok(None) => {
                        eprintln!("keel-sidecar: no snapshot is published");
                        ExitCode::from(1)
                    }
                    Err(e) => {
                        eprintln!("keel-sidecar: {e}");
                        ExitCode::from(1)
                    }
                };
            }
            // Building runs the servers: a binary that is none is refused now.
            if let Err(e) = s.servers() {
                eprintln!("keel-sidecar: bad configuration: {e}");
                return ExitCode::from(2);
            }
            if once {
                return match rt.block_on(s.cycle()) {
                    Ok(Cycle::Published(m)) => {
                        println!("{}", m.seq);
                        ExitCode::SUCCESS
                    }
                    Ok(Cycle::NothingNew(m)) => {
                        eprintln!("keel-sidecar: no record since the published snapshot");
                        println!("{}", m.map(|m| m.seq).unwrap_or(0));
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("keel-sidecar: {e}");
                        ExitCode::from(1)
                    }
                };
            }
            rt.block_on(s.run())
        }
        Cmd::Handover { sentinels, master_name, to, password_file, tls_ca, probe_key } => {
            let password = match password_file.map(std::fs::read_to_string).transpose() {
                Ok(p) => p.map(|p| p.trim_end().to_string()),
                Err(e) => {
                    eprintln!("keel-sidecar: --password-file: {e}");
                    return ExitCode::from(2);
                }
            };
            let tls = match tls_ca.as_deref().map(keel_journal_client::tls::client_connector).transpose() {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("keel-sidecar: --tls-ca: {e}");
                    return ExitCode::from(2);
                }
            };
            let sentinels = sentinels.split(',').filter(|s| !s.is_empty()).map(String::from).collect();
            let access = handover_cli::Access { password, tls };
            match rt.block_on(handover_cli::run(handover_cli::Args { sentinels, master_name, to, access, probe_key })) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("keel-sidecar handover: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Cmd::Adopt(args) => {
            let (cfg, finish_fenced) = match args.into_config() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("keel-sidecar: bad configuration: {e}");
                    return ExitCode::from(2);
                }
            };
            let run = async {
                if finish_fenced { keel_sidecar::adopt::finish_fenced(cfg).await } else { keel_sidecar::adopt::run(cfg).await }
            };
            match rt.block_on(run) {
                Ok(outcome) => {
                    println!("{outcome}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("keel-sidecar adopt: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Cmd::Decode { stream } => match stream.load() {
            Err(code) => code,
            Ok((journal, tls, stream)) => match rt.block_on(decode(&journal, &tls, &stream)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("keel-sidecar: {e}");
                    ExitCode::from(1)
                }
            },
        },
    }
}

async fn decode(journal: &str, tls: &JournalTls, stream: &str) -> anyhow::Result<()> {
    let client = JournalClient::from_list(journal, tls)?;
    let mut reader = client.read(stream, 0, false);
    // Stream bytes not yet parsed into a command, and their offset.
    let mut carry: Vec<u8> = Vec::new();
    let mut carry_at = 0u64;
    // The commands of a transaction not yet closed by EXEC, and where its
    // MULTI starts: a void may still take them back.
    let mut held: Vec<String> = Vec::new();
    let mut held_from: Option<u64> = None;
    let mut expect: Option<u64> = None;
    while let Some(batch) = reader.next_batch().await? {
        for r in batch {
            let rec = Record::decode(&r.payload).map_err(|e| anyhow::anyhow!("record {}: {e}", r.seq))?;
            match rec.kind {
                Kind::Rdb => println!("#rdb\t{}\t{}\t{} bytes", rec.replid, rec.start, rec.payload.len()),
                Kind::RdbAbort => println!("#rdb-abort\t{}\t{}", rec.replid, rec.start),
                Kind::RdbEnd => {
                    println!("#rdb-end\t{}\t{}", rec.replid, rec.start);
                    expect = Some(rec.end);
                    carry_at = rec.end;
                }
                Kind::StreamVoid => {
                    // Voided: the unfinished command in `carry`, or the
                    // unfinished transaction from its MULTI on.
                    let unfinished = held_from.unwrap_or(carry_at);
                    anyhow::ensure!(
                        expect == Some(rec.end) && rec.start == unfinished,
                        "record {}: a void of offsets {}..{} does not take back the unfinished command at {unfinished} of a stream ending at {expect:?}",
                        r.seq,
                        rec.start,
                        rec.end
                    );
                    (held, held_from) = (Vec::new(), None);
                    carry.clear();
                    carry_at = rec.start;
                    println!("#void\t{}\t{}\t{}", rec.replid, rec.start, rec.end);
                    expect = Some(rec.start);
                }
                Kind::Stream => {
                    if let Some(e) = expect {
                        anyhow::ensure!(e == rec.start, "gap or overlap: record {} starts at {} but {e} was expected", r.seq, rec.start);
                    }
                    expect = Some(rec.end);
                    carry.extend_from_slice(&rec.payload);
                    while let Some((args, used)) = parse_command(&carry)? {
                        let words: Vec<String> = args.iter().map(|a| String::from_utf8_lossy(a).into_owned()).collect();
                        let name = words.first().map(|w| w.to_ascii_uppercase()).unwrap_or_default();
                        if name == "MULTI" {
                            held_from = Some(carry_at);
                        }
                        let line = words.join(" ");
                        if held_from.is_some() {
                            held.push(line);
                        } else {
                            println!("{line}");
                        }
                        if name == "EXEC" {
                            held.drain(..).for_each(|l| println!("{l}"));
                            held_from = None;
                        }
                        carry.drain(..used);
                        carry_at += used as u64;
                    }
                }
            }
        }
    }
    // A transaction still open at the end is printed too: it is in the journal.
    held.drain(..).for_each(|l| println!("{l}"));
    Ok(())
}
