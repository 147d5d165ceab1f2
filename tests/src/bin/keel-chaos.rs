//! `keel-chaos`: runs the fault-injection harness (`keel_tests::chaos`)
//! against a full Keel deployment in a network lab and prints a one-screen
//! summary; exits 1 on any anomaly, 2 when the run could not be made.

use std::path::PathBuf;
use std::process::ExitCode;

use keel_tests::chaos;

fn usage() -> ! {
    eprintln!("usage: keel-chaos --profile short|long [--dir DIR] [--seed N] [--episodes N] [--server BINARY]");
    std::process::exit(2)
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (mut profile, mut dir, mut seed, mut episodes, mut server) = ("short".to_string(), None, None, None, None);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--profile" => profile = val(),
            "--dir" => dir = Some(PathBuf::from(val())),
            "--seed" => seed = Some(val().parse::<u64>().unwrap_or_else(|_| usage())),
            "--episodes" => episodes = Some(val().parse::<usize>().unwrap_or_else(|_| usage())),
            "--server" => server = Some(PathBuf::from(val())),
            _ => usage(),
        }
    }
    let seed = seed.unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(1));
    let dir = dir.unwrap_or_else(|| PathBuf::from(format!(".keel/chaos/{profile}-{seed}")));
    let mut cfg = match profile.as_str() {
        "short" => chaos::Config::short(dir.clone(), seed),
        "long" => chaos::Config::long(dir.clone(), seed),
        _ => usage(),
    };
    if let Some(n) = episodes {
        cfg.episodes = n;
    }
    if let Some(server) = server {
        cfg.server = server;
    }
    eprintln!(
        "[chaos] profile {profile}, seed {seed}, {} episodes, server {}; histories and logs in {}",
        cfg.episodes,
        cfg.server.display(),
        dir.display()
    );
    match chaos::run(&cfg) {
        Ok(summary) => {
            print!("{summary}");
            let _ = std::fs::write(dir.join("summary.txt"), summary.to_string());
            if summary.ok() { ExitCode::SUCCESS } else { ExitCode::from(1) }
        }
        Err(e) => {
            eprintln!("keel-chaos: the run could not be made: {e}");
            ExitCode::from(2)
        }
    }
}
