//! A network lab for fault injection: a few network namespaces ("hosts"),
//! each with its own loopback and one IPv4 address, joined by a bridge in
//! the root namespace; partitions are firewall rules inside the hosts.
//!
//! ```text
//!  root namespace (the test process; never partitioned)
//!    bridge kl<pid>-<n>b  10.A.B.254/24
//!      ├─ veth kl<pid>-<n>v0 ══ eth0 10.A.B.1/24 + lo 127.0.0.1   namespace kl<pid>-<n>-<host0>
//!      └─ veth kl<pid>-<n>v1 ══ eth0 10.A.B.2/24 + lo 127.0.0.1   namespace kl<pid>-<n>-<host1>
//! ```
//!
//! Every name starts with the lab's prefix `kl<pid>-<n>`: the pid of the
//! owning process and a counter within it, so parallel labs never clash and
//! the leftovers of a crashed run say who owned them. The /24 is chosen per
//! lab among those the root namespace has no address or route in. Each host
//! has its own ports: processes of one host talk over 127.0.0.1, to other
//! hosts at their 10.A.B.x address; the test process reaches every host.
//!
//! Partitions: each host holds an nftables table `inet keel` whose input and
//! output hooks DROP packets from or to the addresses in its set `cut`.
//! `partition` adds addresses to the sets of both sides, `heal` empties all
//! sets. A partition is silence: new connections time out, established ones
//! stall and resume (by TCP retransmission) after `heal`. The rules live in
//! the hosts, so bridged traffic needs no br_netfilter and the root
//! namespace's firewall is never touched. nft, not iptables: one native tool
//! (Debian's `iptables` is itself a front end to nf_tables), a set makes
//! partitions add up and heal one flush, and there is no legacy/nft backend
//! to pick. If br_netfilter is loaded (`net.bridge.bridge-nf-call-iptables
//! = 1`), bridged frames also cross the root namespace's forward hook, so a
//! root firewall that drops forwarded traffic would cut the lab.
//!
//! Life cycle: `Lab::new` removes labs whose owning process is dead, then
//! builds bridge, namespaces, veths, addresses and tables; if a step fails,
//! what was built is torn down and the error names the command and carries
//! its stderr. Processes started with `Lab::command` are the caller's: kill
//! them before the lab is dropped (a process inside a deleted namespace keeps
//! it alive, unnamed and cut off). Dropping the lab deletes the veths (both
//! ends), the namespaces (with their rules) and the bridge.

use std::ffi::OsStr;
use std::io;
use std::net::Ipv4Addr;
use std::path::Path;
use std::path::PathBuf;
use std::process::Command;
use std::process::Stdio;
use std::sync::atomic::AtomicU32;
use std::sync::atomic::Ordering;

/// Linux interface names hold at most 15 bytes.
const MAX_IFNAME_BYTES: usize = 15;
/// Hosts are .1 to .253 of the lab's /24; .254 is the bridge.
const MAX_HOSTS: usize = 253;
/// Labs take their /24 among 10.64.0.0 to 10.127.255.0.
const SUBNET_FIRST_A: u32 = 64;
const SUBNET_COUNT: u32 = 64 * 256;

/// The nftables table created in every host.
const TABLE: &str = "table inet keel { \
    set cut { type ipv4_addr; }; \
    chain input { type filter hook input priority filter; policy accept; ip saddr @cut drop; }; \
    chain output { type filter hook output priority filter; policy accept; ip daddr @cut drop; }; }";

/// Counter of labs made by this process, the `<n>` of `kl<pid>-<n>`.
static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

/// A set of network namespaces ("hosts") joined by a bridge in the root
/// namespace, each with one IP.
pub struct Lab {
    prefix: String,
    bridge: String,
    hosts: Vec<Host>,
}

struct Host {
    name: String,
    netns: String,
    /// The root-namespace end of the host's veth; the other end is its eth0.
    veth: String,
    ip: Ipv4Addr,
}

impl Lab {
    /// Creates a fresh lab with a unique short prefix, after removing the
    /// labs of dead processes. Hosts get 10.A.B.1, 10.A.B.2, … in order.
    pub fn new(hosts: &[&str]) -> io::Result<Lab> {
        check_host_names(hosts)?;
        remove_stale_labs();
        let n = NEXT_LAB.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let prefix = format!("kl{pid}-{n}");
        let longest = format!("{prefix}v{}", hosts.len().saturating_sub(1));
        if longest.len() > MAX_IFNAME_BYTES {
            return Err(io::Error::other(format!("interface name {longest} is longer than {MAX_IFNAME_BYTES} bytes: use fewer hosts")));
        }
        let [a, b] = free_subnet(pid.wrapping_mul(16).wrapping_add(n))?;
        let mut lab = Lab { bridge: format!("{prefix}b"), prefix, hosts: Vec::new() };
        // From here on, dropping `lab` on an error tears down what was built.
        ip(&["link", "add", &lab.bridge, "type", "bridge"])?;
        ip(&["addr", "add", &format!("10.{a}.{b}.254/24"), "dev", &lab.bridge])?;
        ip(&["link", "set", &lab.bridge, "up"])?;
        for (i, name) in hosts.iter().enumerate() {
            lab.hosts.push(Host {
                name: name.to_string(),
                netns: format!("{}-{name}", lab.prefix),
                veth: format!("{}v{i}", lab.prefix),
                ip: Ipv4Addr::new(10, a, b, i as u8 + 1),
            });
            lab.build_host(i)?;
        }
        Ok(lab)
    }

    fn build_host(&self, i: usize) -> io::Result<()> {
        let h = &self.hosts[i];
        ip(&["netns", "add", &h.netns])?;
        ip(&["link", "add", &h.veth, "type", "veth", "peer", "name", "eth0", "netns", &h.netns])?;
        ip(&["link", "set", &h.veth, "master", &self.bridge, "up"])?;
        // IPv4 only: no IPv6 link-local address, which the partitions would not cover.
        ip(&["-n", &h.netns, "link", "set", "eth0", "addrgenmode", "none"])?;
        ip(&["-n", &h.netns, "addr", "add", &format!("{}/24", h.ip), "dev", "eth0"])?;
        ip(&["-n", &h.netns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &h.netns, "link", "set", "lo", "up"])?;
        self.nft(&h.name, TABLE)
    }

    /// The prefix every namespace (`<prefix>-<host>`) and link of the lab starts with.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The host's address. Panics on a host the lab does not have.
    pub fn ip(&self, host: &str) -> Ipv4Addr {
        self.host(host).ip
    }

    /// A Command that runs `program` inside the host's namespace (`ip netns
    /// exec`, which execs it: the child's pid is the program's).
    pub fn command(&self, host: &str, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(tool("ip"));
        cmd.args(["netns", "exec", &self.host(host).netns]).arg(program);
        cmd
    }

    /// Cuts all traffic between the two groups in both directions.
    pub fn partition(&self, a: &[&str], b: &[&str]) -> io::Result<()> {
        if let Some(both) = a.iter().find(|h| b.contains(h)) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("host {both} is on both sides of the partition")));
        }
        self.cut(a, b)?;
        self.cut(b, a)
    }

    /// Isolates one host from every other (the root namespace still reaches it).
    pub fn isolate(&self, host: &str) -> io::Result<()> {
        let others: Vec<&str> = self.hosts.iter().map(|h| h.name.as_str()).filter(|h| *h != host).collect();
        self.partition(&[host], &others)
    }

    /// Removes every partition.
    pub fn heal(&self) -> io::Result<()> {
        for h in &self.hosts {
            self.nft(&h.name, "flush set inet keel cut")?;
        }
        Ok(())
    }

    /// Whether a lab can exist on this machine; the error says what is missing.
    pub fn available() -> Result<(), String> {
        match effective_uid() {
            Some(0) => {}
            uid => return Err(format!("network labs need root (namespaces, bridges and nftables need CAP_NET_ADMIN); this process runs as uid {uid:?}")),
        }
        for (name, arg, package) in [("ip", "-V", "iproute2"), ("nft", "--version", "nftables")] {
            run(Command::new(tool(name)).arg(arg)).map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => format!("`{name}` is not installed: apt-get install {package} (scripts/lib.sh keel_install_deps does)"),
                _ => e.to_string(),
            })?;
        }
        Lab::new(&["probe"]).map(drop).map_err(|e| format!("cannot build a network lab: {e}"))
    }

    /// Makes every host of `from` drop traffic with every host of `peers`.
    fn cut(&self, from: &[&str], peers: &[&str]) -> io::Result<()> {
        if peers.is_empty() {
            return Ok(());
        }
        let ips: Vec<String> = peers.iter().map(|p| self.ip(p).to_string()).collect();
        for h in from {
            self.nft(h, &format!("add element inet keel cut {{ {} }}", ips.join(", ")))?;
        }
        Ok(())
    }

    fn nft(&self, host: &str, script: &str) -> io::Result<()> {
        run(self.command(host, tool("nft")).arg(script)).map(drop)
    }

    fn host(&self, name: &str) -> &Host {
        self.hosts.iter().find(|h| h.name == name).unwrap_or_else(|| {
            let names: Vec<&str> = self.hosts.iter().map(|h| h.name.as_str()).collect();
            panic!("lab {} has no host {name:?} (hosts: {names:?})", self.prefix)
        })
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let mut failures = Vec::new();
        let mut delete = |exists: bool, args: &[&str]| {
            if exists {
                if let Err(e) = ip(args) {
                    failures.push(e.to_string());
                }
            }
        };
        for h in &self.hosts {
            // Deleting one end of a veth deletes both.
            delete(link_exists(&h.veth), &["link", "delete", &h.veth]);
            delete(netns_exists(&h.netns), &["netns", "delete", &h.netns]);
        }
        delete(link_exists(&self.bridge), &["link", "delete", &self.bridge]);
        if !failures.is_empty() {
            eprintln!("netlab {}: cleanup left things behind:\n{}", self.prefix, failures.join("\n"));
        }
    }
}

fn check_host_names(hosts: &[&str]) -> io::Result<()> {
    let invalid = |msg: String| Err(io::Error::new(io::ErrorKind::InvalidInput, msg));
    if hosts.len() > MAX_HOSTS {
        return invalid(format!("a lab holds at most {MAX_HOSTS} hosts, not {}", hosts.len()));
    }
    for (i, h) in hosts.iter().enumerate() {
        if h.is_empty() || !h.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            return invalid(format!("host name {h:?}: use letters, digits, '_' and '-'"));
        }
        if hosts[..i].contains(h) {
            return invalid(format!("host name {h:?} appears twice"));
        }
    }
    Ok(())
}

/// Deletes the namespaces and links of labs whose owning process is gone.
/// Errors are ignored: another process may be cleaning up the same labs.
fn remove_stale_labs() {
    let stale = |name: &str| owner_pid(name).is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists());
    if let Ok(links) = ip(&["-o", "link", "show"]) {
        // "12: kl123-0v0@if2: <BROADCAST,…"
        for name in links.lines().filter_map(|l| l.split(": ").nth(1)).map(|n| n.split('@').next().unwrap_or(n)) {
            if stale(name) {
                let _ = ip(&["link", "delete", name]);
            }
        }
    }
    if let Ok(list) = ip(&["netns", "list"]) {
        // "kl123-0-a (id: 3)"
        for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
            if stale(name) {
                let _ = ip(&["netns", "delete", name]);
            }
        }
    }
}

/// The pid in a lab name `kl<pid>-…`, or None for any other name.
fn owner_pid(name: &str) -> Option<u32> {
    let (pid, _) = name.strip_prefix("kl")?.split_once('-')?;
    if pid.is_empty() || !pid.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

/// The first 10.A.B.0/24, starting from `seed`, that the root namespace has
/// no address or route in (other labs' bridges included).
fn free_subnet(seed: u32) -> io::Result<[u8; 2]> {
    let used = ip(&["-4", "route", "show", "table", "all"])? + &ip(&["-4", "-o", "addr", "show"])?;
    for k in (0..SUBNET_COUNT).map(|i| seed.wrapping_add(i) % SUBNET_COUNT) {
        let (a, b) = ((SUBNET_FIRST_A + k / 256) as u8, (k % 256) as u8);
        if !used.contains(&format!("10.{a}.{b}.")) {
            return Ok([a, b]);
        }
    }
    Err(io::Error::other("no free 10.x.y.0/24 subnet for a network lab"))
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let uids = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    uids.split_whitespace().nth(1)?.parse().ok()
}

/// A system tool, found in PATH or in the sbin directories a non-root PATH lacks.
fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

fn ip(args: &[&str]) -> io::Result<String> {
    run(Command::new(tool("ip")).args(args))
}

/// Runs a command to completion; an error names it and carries its stderr.
fn run(cmd: &mut Command) -> io::Result<String> {
    let shown = std::iter::once(cmd.get_program()).chain(cmd.get_args()).map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ");
    let out = cmd.stdin(Stdio::null()).output().map_err(|e| io::Error::new(e.kind(), format!("`{shown}` could not start: {e}")))?;
    if !out.status.success() {
        return Err(io::Error::other(format!("`{shown}` failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim())));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_reads_only_lab_names() {
        assert_eq!(owner_pid("kl123-0-a"), Some(123));
        assert_eq!(owner_pid("kl123-4v10"), Some(123));
        assert_eq!(owner_pid("kl123-0b"), Some(123));
        assert_eq!(owner_pid("klx-0"), None);
        assert_eq!(owner_pid("kl-0"), None);
        assert_eq!(owner_pid("kl+5-0"), None);
        assert_eq!(owner_pid("eth0"), None);
        assert_eq!(owner_pid("kl123"), None);
    }

    #[test]
    fn host_names_are_checked() {
        assert!(check_host_names(&["n0", "j-1", "j_2"]).is_ok());
        assert!(check_host_names(&["a", "a"]).is_err());
        assert!(check_host_names(&[""]).is_err());
        assert!(check_host_names(&["a b"]).is_err());
    }
}
