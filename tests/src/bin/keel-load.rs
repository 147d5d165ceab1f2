//! `keel-load`: an open-loop load generator for Redis-protocol servers.
//! N clients (one connection each) send commands on a fixed schedule that
//! adds up to `--rate` per second; an operation sent late because the
//! previous reply was late is measured from the time it was *due*, so a
//! server stall shows in full (no coordinated omission); one sent on time is
//! measured from its send (the timer's granularity is the client's). Prints one JSON line: operations, errors, achieved rate, and
//! latency percentiles and maximum in microseconds.
//!
//! `--cmd get` reads random keys `key:<n>` (n < --keys), as redis-benchmark
//! `-r` writes them; `--cmd set` writes them with `--value-bytes` values.
//!
//! `--rate 0` runs closed-loop instead: each client sends its next
//! operation as soon as the previous one is answered, for `--seconds`.
//! `--waitaof` (with `--cmd set`) follows every write's reply with
//! `WAITAOF 1 1 0` on the same connection, and an operation counts as done
//! when that answers that the write is fsync'd locally and on one replica
//! (the promise plain Redis/Valkey can give for a write; an answer short of
//! it counts as an error). Latency is then write + WAITAOF.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;

use clap::Parser;
use hdrhistogram::Histogram;

#[derive(Parser, Debug, Clone)]
#[command(name = "keel-load", about = "Open-loop load at a fixed rate, latency from each operation's due time")]
struct Args {
    #[arg(long, default_value = "127.0.0.1:6379")]
    addr: String,
    #[arg(long, default_value_t = 50)]
    clients: usize,
    /// Operations per second, all clients together (0: closed loop, each
    /// client as fast as it is answered).
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    #[arg(long, default_value_t = 1_000_000)]
    keys: u64,
    #[arg(long, default_value = "get")]
    cmd: String,
    #[arg(long, default_value_t = 100)]
    value_bytes: usize,
    /// After each write's reply, WAITAOF 1 1 0 (local fsync and one
    /// replica's) before the operation counts as done.
    #[arg(long)]
    waitaof: bool,
}

/// A tiny xorshift generator: random keys without a dependency.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if args.clients == 0 || args.seconds == 0 || !matches!(args.cmd.as_str(), "get" | "set") {
        eprintln!("keel-load: --clients and --seconds must be positive and --cmd get or set");
        return std::process::ExitCode::from(2);
    }
    if args.waitaof && args.cmd != "set" {
        eprintln!("keel-load: --waitaof follows writes: use it with --cmd set");
        return std::process::ExitCode::from(2);
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("tokio");
    match rt.block_on(run(args)) {
        Ok(line) => {
            println!("{line}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("keel-load: {e}");
            std::process::ExitCode::from(1)
        }
    }
}

/// `WAITAOF 1 1 0`: Ok once the server says the connection's last write is
/// fsync'd locally and on at least one replica; an error otherwise.
async fn waitaof(con: &mut redis::aio::MultiplexedConnection) -> redis::RedisResult<()> {
    let (local, replicas): (i64, i64) = redis::cmd("WAITAOF").arg(1).arg(1).arg(0).query_async(con).await?;
    if local >= 1 && replicas >= 1 {
        Ok(())
    } else {
        Err(redis::RedisError::from((redis::ErrorKind::ResponseError, "WAITAOF answered short", format!("{local} local, {replicas} replicas"))))
    }
}

async fn run(args: Args) -> Result<String, String> {
    let client = redis::Client::open(format!("redis://{}/", args.addr)).map_err(|e| e.to_string())?;
    let hist = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")));
    let errors = Arc::new(Mutex::new(0u64));
    // Closed loop (rate 0): no schedule, each operation timed from its send.
    let period = if args.rate == 0 { Duration::ZERO } else { Duration::from_nanos(1_000_000_000 * args.clients as u64 / args.rate) };
    let start = Instant::now() + Duration::from_millis(200);
    let end = start + Duration::from_secs(args.seconds);
    let value = "v".repeat(args.value_bytes);
    let mut tasks = Vec::new();
    for i in 0..args.clients {
        let mut con = client.get_multiplexed_async_connection().await.map_err(|e| format!("connect {}: {e}", args.addr))?;
        let (hist, errors, args, value) = (hist.clone(), errors.clone(), args.clone(), value.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (i as u64 + 1).wrapping_mul(0x2545_f491_4f6c_dd1d));
            let mut due = start + period.mul_f64(i as f64 / args.clients as f64);
            let mut local = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
            let mut errs = 0u64;
            if args.rate == 0 {
                tokio::time::sleep_until(start.into()).await; // all clients begin together
            }
            while due < end && Instant::now() < end {
                // Behind schedule (the previous reply came after this one was
                // due): latency counts from the due time, so a server stall
                // shows in full. On time: from when the timer woke us, so the
                // timer's own granularity is not counted against the server.
                let from = if args.rate == 0 {
                    Instant::now()
                } else if Instant::now() < due {
                    tokio::time::sleep_until(due.into()).await;
                    Instant::now()
                } else {
                    due
                };
                let key = format!("key:{:012}", rng.below(args.keys));
                let r = if args.cmd == "get" {
                    redis::cmd("GET").arg(&key).query_async::<Option<Vec<u8>>>(&mut con).await.map(|_| ())
                } else {
                    match redis::cmd("SET").arg(&key).arg(&value).query_async::<()>(&mut con).await {
                        Ok(()) if args.waitaof => waitaof(&mut con).await,
                        other => other,
                    }
                };
                let us = from.elapsed().as_micros() as u64;
                match r {
                    Ok(()) => local.saturating_record(us.max(1)),
                    Err(_) => errs += 1,
                }
                due += period;
                if args.rate == 0 {
                    due = start; // closed loop: only the end time bounds it
                }
            }
            hist.lock().unwrap().add(&local).expect("same bounds");
            *errors.lock().unwrap() += errs;
        }));
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())?;
    }
    let h = hist.lock().unwrap();
    let secs = args.seconds as f64;
    Ok(format!(
        "{{\"cmd\":\"{}{}\",\"clients\":{},\"rate\":{},\"ops\":{},\"errors\":{},\"achieved_per_s\":{:.0},\"p50_us\":{},\"p99_us\":{},\"p999_us\":{},\"max_us\":{}}}",
        args.cmd,
        if args.waitaof { "+waitaof" } else { "" },
        args.clients,
        args.rate,
        h.len(),
        *errors.lock().unwrap(),
        h.len() as f64 / secs,
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.99),
        h.value_at_quantile(0.999),
        h.max()
    ))
}
