//! Mutual TLS on the journal's gRPC port: every connection to a journal
//! node, from a peer node (Raft) or from a client (sidecar, snapshotter,
//! `ctl`, `bench`), is TLS (rustls) in which both sides show a certificate
//! issued by the deployment's CA. A caller without one is refused in the
//! handshake, before the node reads any request from it.
//!
//! Who holds what (PEM files in one directory, all mode 0600; `issue` makes
//! them, `keel-journal certs` is its command):
//! - `ca.pem`: the deployment's CA certificate, given to every process as the
//!   only root it trusts. `ca.key` signs certificates; no running process
//!   needs it (keep it offline once the certificates are made).
//! - `journal-<id>.pem/.key`: journal node `<id>`: its server certificate
//!   (name `keel-journal`, which every client checks, plus `localhost` and
//!   127.0.0.1) and the client certificate it shows its peers.
//! - `redis-<id>.pem/.key`: a node's Redis-facing servers (its redis-server's
//!   `tls-port` and its sidecar's discovery endpoint): server and client use
//!   for `localhost`, 127.0.0.1, ::1 and the `--san` extras, but not for
//!   `keel-journal`, so it can neither serve the journal nor pass
//!   `PeerCheck`.
//! - any other name (`node-0`, `snapshotter`, `ctl`): a client-only
//!   certificate (extended key usage clientAuth), so it cannot pose as a
//!   journal node to other clients.
//!
//! Clients check the server against `JOURNAL_SERVER_NAME`, not the address
//! they dial: a node's certificate need not list every address a client
//! may use for it. The Raft service (peer traffic) further takes only
//! callers whose certificate is a journal node's (`PeerCheck`): a client's
//! certificate cannot vote or replicate.
//!
//! Life cycle of a process's TLS settings: command-line flags (`TlsFlags`)
//! are resolved without I/O into a `TlsChoice` (three files, or explicitly
//! insecure, or an error saying what to give); `JournalTls::load` reads and
//! checks the files (readable, key not readable by others, certificate
//! issued by the CA and in date) and is handed to the server
//! (`server_config`) and to every channel it or a client opens
//! (`client_config`).

use std::collections::BTreeSet;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::ServerCertVerifier as _;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::ServerName;
use rustls::pki_types::UnixTime;
use rustls::pki_types::pem::PemObject as _;
use tonic::transport::Certificate;
use tonic::transport::ClientTlsConfig;
use tonic::transport::Identity;
use tonic::transport::ServerTlsConfig;

/// The name every journal node's certificate carries and every client
/// verifies.
pub const JOURNAL_SERVER_NAME: &str = "keel-journal";
/// How long a TLS handshake may take before the node drops the connection.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Validity of a CA `issue` makes.
pub const CA_VALIDITY_DAYS: i64 = 3650;
/// Validity of a node's or client's certificate `issue` makes.
pub const CERT_VALIDITY_DAYS: i64 = 825;
/// Prefix of the names whose certificates serve the journal.
pub const JOURNAL_NODE_PREFIX: &str = "journal-";
/// Prefix of the names whose certificates serve Redis clients (a node's
/// redis-server `tls-port` and its discovery endpoint), not the journal.
pub const REDIS_SERVER_PREFIX: &str = "redis-";
/// The certificate name of the journal's administrator (`keel-journal
/// ctl`): it alone, besides journal nodes, may change the membership.
pub const ADMIN_CERT_NAME: &str = "ctl";
/// The name an administrator's certificate carries (and is verified for);
/// no server of Keel's is verified under it.
pub const JOURNAL_ADMIN_NAME: &str = "keel-journal-admin";

/// The three files of one process's TLS identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsPaths {
    /// The deployment's CA certificate (the only trusted root).
    pub ca: PathBuf,
    /// This process's certificate.
    pub cert: PathBuf,
    /// This process's private key (mode 0600).
    pub key: PathBuf,
}

impl TlsPaths {
    /// The files for `name` in a directory made by `issue`:
    /// `dir/ca.pem`, `dir/<name>.pem`, `dir/<name>.key`.
    pub fn in_dir(dir: &Path, name: &str) -> TlsPaths {
        TlsPaths { ca: dir.join("ca.pem"), cert: dir.join(format!("{name}.pem")), key: dir.join(format!("{name}.key")) }
    }
}

/// TLS settings as given on a command line.
#[derive(Debug, Clone, Default)]
pub struct TlsFlags {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// A directory made by `issue`, read for the process's own name.
    pub dir: Option<PathBuf>,
    /// Explicitly no TLS.
    pub insecure: bool,
}

/// What a process runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsChoice {
    /// Plaintext gRPC: anyone who reaches the port is served.
    Insecure,
    Files(TlsPaths),
}

impl TlsFlags {
    /// Decides from the flags alone. `name` picks the certificate in `dir`
    /// (empty: this program takes no directory);
    /// `prefix` is how this program spells its flags (`--` or
    /// `--journal-`), for the error messages.
    pub fn resolve(&self, name: &str, prefix: &str) -> Result<TlsChoice, String> {
        let files = [("ca", &self.ca), ("cert", &self.cert), ("key", &self.key)];
        let given: Vec<&str> = files.iter().filter(|(_, v)| v.is_some()).map(|(n, _)| *n).collect();
        if self.insecure {
            if !given.is_empty() || self.dir.is_some() {
                return Err(format!(
                    "{prefix}insecure contradicts the TLS files given ({prefix}ca/{prefix}cert/{prefix}key/{prefix}tls-dir): give one or the other"
                ));
            }
            return Ok(TlsChoice::Insecure);
        }
        match (given.len(), &self.dir) {
            (3, None) => Ok(TlsChoice::Files(TlsPaths {
                ca: self.ca.clone().unwrap(),
                cert: self.cert.clone().unwrap(),
                key: self.key.clone().unwrap(),
            })),
            (0, Some(_)) if name.is_empty() => Err(format!("{prefix}tls-dir needs a certificate name: give {prefix}ca, {prefix}cert and {prefix}key")),
            (0, Some(dir)) => Ok(TlsChoice::Files(TlsPaths::in_dir(dir, name))),
            (0, None) => Err(format!(
                "the journal is served over mutual TLS: give {prefix}ca, {prefix}cert and {prefix}key{}, or {prefix}insecure to \
                 go without (then anyone who can reach a journal port can append, e.g. under a stolen leader uuid)",
                if name.is_empty() {
                    " (as `keel-journal certs` makes them)".to_string()
                } else {
                    format!(" (or {prefix}tls-dir DIR holding ca.pem, {name}.pem and {name}.key, as `keel-journal certs` makes them)")
                }
            )),
            (_, Some(_)) => Err(format!("give {prefix}tls-dir or {prefix}ca/{prefix}cert/{prefix}key, not both")),
            (_, None) => {
                let missing: Vec<String> =
                    files.iter().filter(|(_, v)| v.is_none()).map(|(n, _)| format!("{prefix}{n}")).collect();
                Err(format!("TLS needs {prefix}ca, {prefix}cert and {prefix}key together; missing: {}", missing.join(", ")))
            }
        }
    }
}

/// A private key file must be readable by its owner only.
pub fn check_key_mode(path: &Path, mode: u32) -> Result<(), String> {
    if mode & 0o077 != 0 {
        return Err(format!(
            "the private key {} is open to group or others (mode {:o}): `chmod 600 {}`",
            path.display(),
            mode & 0o777,
            path.display()
        ));
    }
    Ok(())
}

/// A process's loaded TLS identity (or its explicit absence).
#[derive(Clone, Default)]
pub enum JournalTls {
    /// Plaintext (`--insecure`); also `ClientConfig`'s default, which a TLS
    /// node refuses.
    #[default]
    Off,
    On(Arc<Loaded>),
}

pub struct Loaded {
    paths: Option<TlsPaths>,
    ca: Certificate,
    /// The CA certificates, parsed.
    roots: Vec<CertificateDer<'static>>,
    /// None: a client that checks the server but shows no certificate
    /// (`JournalTls::anonymous`, for probes and tests).
    identity: Option<Identity>,
}

impl std::fmt::Debug for JournalTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

fn read(what: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))
}

fn certs_of(what: &str, path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{what} {} is not PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{what} {} holds no CERTIFICATE", path.display()));
    }
    Ok(certs)
}

impl JournalTls {
    /// Resolves `choice`: reads the files and checks them (each readable,
    /// the key open to its owner only, the certificate issued by the CA,
    /// in date, and matching the key).
    pub fn load(choice: &TlsChoice) -> Result<JournalTls, String> {
        let paths = match choice {
            TlsChoice::Insecure => return Ok(JournalTls::Off),
            TlsChoice::Files(p) => p,
        };
        let ca_pem = read("the CA certificate", &paths.ca)?;
        let cert_pem = read("the certificate", &paths.cert)?;
        let meta = std::fs::metadata(&paths.key).map_err(|e| format!("cannot read the private key {}: {e}", paths.key.display()))?;
        check_key_mode(&paths.key, meta.permissions().mode())?;
        let key_pem = read("the private key", &paths.key)?;

        let roots = certs_of("the CA certificate", &paths.ca, &ca_pem)?;
        let chain = certs_of("the certificate", &paths.cert, &cert_pem)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|e| format!("the private key {} is not a PEM private key: {e}", paths.key.display()))?;
        let mut store = rustls::RootCertStore::empty();
        for r in roots.clone() {
            store.add(r).map_err(|e| format!("the CA certificate {} is not usable: {e}", paths.ca.display()))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider.clone())
            .build()
            .map_err(|e| format!("the CA certificate {}: {e}", paths.ca.display()))?;
        verifier.verify_client_cert(&chain[0], &chain[1..], UnixTime::now()).map_err(|e| {
            format!(
                "the certificate {} is not a client certificate of the CA {} ({e}): peers would refuse it",
                paths.cert.display(),
                paths.ca.display()
            )
        })?;
        let signing = provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| format!("the private key {} is not usable: {e}", paths.key.display()))?;
        rustls::sign::CertifiedKey::new(chain, signing)
            .keys_match()
            .map_err(|e| format!("the private key {} does not belong to the certificate {} ({e})", paths.key.display(), paths.cert.display()))?;

        Ok(JournalTls::On(Arc::new(Loaded {
            paths: Some(paths.clone()),
            ca: Certificate::from_pem(ca_pem),
            roots,
            identity: Some(Identity::from_pem(cert_pem, key_pem)),
        })))
    }

    /// A client that trusts `ca` but shows no certificate of its own: what
    /// an outsider who knows the CA looks like (journal nodes refuse it).
    pub fn anonymous(ca: &Path) -> Result<JournalTls, String> {
        let ca_pem = read("the CA certificate", ca)?;
        let roots = certs_of("the CA certificate", ca, &ca_pem)?;
        Ok(JournalTls::On(Arc::new(Loaded { paths: None, ca: Certificate::from_pem(ca_pem), roots, identity: None })))
    }

    pub fn is_on(&self) -> bool {
        matches!(self, JournalTls::On(_))
    }

    /// `https` with TLS, else `http`.
    pub fn scheme(&self) -> &'static str {
        if self.is_on() { "https" } else { "http" }
    }

    /// For a channel to a journal node.
    pub fn client_config(&self) -> Option<ClientTlsConfig> {
        let JournalTls::On(l) = self else { return None };
        let mut c = ClientTlsConfig::new().ca_certificate(l.ca.clone()).domain_name(JOURNAL_SERVER_NAME).timeout(HANDSHAKE_TIMEOUT);
        if let Some(id) = &l.identity {
            c = c.identity(id.clone());
        }
        Some(c)
    }

    /// For a journal node's listener: its own certificate, and client
    /// certificates required and checked against the CA.
    pub fn server_config(&self) -> Option<ServerTlsConfig> {
        let JournalTls::On(l) = self else { return None };
        let id = l.identity.clone()?;
        Some(ServerTlsConfig::new().identity(id).client_ca_root(l.ca.clone()).timeout(HANDSHAKE_TIMEOUT))
    }

    /// Checks that the certificate can serve the journal: issued by the CA
    /// for `JOURNAL_SERVER_NAME` with server use (a client-only certificate
    /// cannot).
    pub fn check_serves(&self) -> Result<(), String> {
        let JournalTls::On(l) = self else { return Ok(()) };
        let paths = l.paths.as_ref().ok_or("a journal node needs its own certificate")?;
        let ca = certs_of("the CA certificate", &paths.ca, &read("the CA certificate", &paths.ca)?)?;
        let chain = certs_of("the certificate", &paths.cert, &read("the certificate", &paths.cert)?)?;
        let mut store = rustls::RootCertStore::empty();
        for r in ca {
            store.add(r).map_err(|e| format!("the CA certificate {} is not usable: {e}", paths.ca.display()))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider)
            .build()
            .map_err(|e| format!("the CA certificate {}: {e}", paths.ca.display()))?;
        let name = ServerName::try_from(JOURNAL_SERVER_NAME).expect("a valid DNS name");
        verifier.verify_server_cert(&chain[0], &chain[1..], &name, &[], UnixTime::now()).map_err(|e| {
            format!(
                "the certificate {} cannot serve the journal ({e}): a journal node needs a certificate for {JOURNAL_SERVER_NAME:?} \
                 with server use, as `keel-journal certs` makes for {JOURNAL_NODE_PREFIX}<id>",
                paths.cert.display()
            )
        })?;
        Ok(())
    }

    /// The Raft service's check of its callers; None without TLS.
    pub fn peer_check(&self) -> Result<Option<PeerCheck>, String> {
        let JournalTls::On(l) = self else { return Ok(None) };
        Ok(Some(PeerCheck { verifier: server_verifier(&l.roots)?, accepted: Default::default(), name: JOURNAL_SERVER_NAME, what: "a journal node's" }))
    }

    /// Admits callers whose certificate is the administrator's
    /// (`ADMIN_CERT_NAME`, issued by `issue` for `JOURNAL_ADMIN_NAME`).
    pub fn admin_check(&self) -> Result<Option<PeerCheck>, String> {
        let JournalTls::On(l) = self else { return Ok(None) };
        Ok(Some(PeerCheck { verifier: server_verifier(&l.roots)?, accepted: Default::default(), name: JOURNAL_ADMIN_NAME, what: "the journal administrator's" }))
    }

    /// A TLS acceptor showing this process's own certificate (None: no
    /// TLS, or no certificate of its own), for its other endpoints.
    pub fn own_acceptor(&self, what: &str) -> Option<Result<tokio_rustls::TlsAcceptor, String>> {
        let JournalTls::On(l) = self else { return None };
        let p = l.paths.as_ref()?;
        Some(server_acceptor(what, &p.cert, &p.key))
    }

    /// One phrase for logs.
    pub fn describe(&self) -> String {
        match self {
            JournalTls::Off => "plaintext (no TLS)".into(),
            JournalTls::On(l) => match &l.paths {
                Some(p) => format!("mutual TLS as {} (CA {})", p.cert.display(), p.ca.display()),
                None => "TLS without a client certificate".into(),
            },
        }
    }
}

fn server_verifier(roots: &[CertificateDer<'static>]) -> Result<Arc<rustls::client::WebPkiServerVerifier>, String> {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).map_err(|e| format!("a CA certificate is not usable: {e}"))?;
    }
    rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(store), Arc::new(rustls::crypto::ring::default_provider()))
        .build()
        .map_err(|e| format!("the CA certificates: {e}"))
}

/// Certificates a `PeerCheck` remembers as accepted (a deployment has a
/// handful of journal nodes); past this it forgets them all and checks
/// again.
pub const MAX_ACCEPTED_PEER_CERTS: usize = 64;

/// A TLS acceptor for an endpoint other than the journal's gRPC port (a
/// metrics listener, a discovery endpoint): shows the certificate chain in
/// `cert` with the private key in `key` (both PEM; the key readable by its
/// owner only, as `issue` writes it) and asks clients for no certificate.
/// `what` names the endpoint in errors ("the discovery endpoint").
pub fn server_acceptor(what: &str, cert: &Path, key: &Path) -> Result<tokio_rustls::TlsAcceptor, String> {
    use rustls::pki_types::PrivateKeyDer;
    use rustls::pki_types::pem::PemObject as _;
    use std::os::unix::fs::PermissionsExt as _;
    let read = |part: &str, path: &Path| std::fs::read(path).map_err(|e| format!("cannot read {what}'s {part} {}: {e}", path.display()));
    let cert_pem = read("certificate", cert)?;
    let meta = std::fs::metadata(key).map_err(|e| format!("cannot read {what}'s private key {}: {e}", key.display()))?;
    check_key_mode(key, meta.permissions().mode())?;
    let key_pem = read("private key", key)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the certificate {} is not PEM: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("the certificate {} holds no CERTIFICATE", cert.display()));
    }
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| format!("the private key {} is not a PEM private key: {e}", key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS versions: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| {
            format!(
                "the private key {} does not fit the certificate {} ({e}): give the pair `keel-journal certs` made together",
                key.display(),
                cert.display()
            )
        })?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// A TLS client that trusts the deployment's CA at `ca` and shows no
/// certificate: what a Redis client of a `--tls` deployment is (its Redis
/// nodes and discovery endpoints serve certificates of that CA).
pub fn client_connector(ca: &Path) -> Result<tokio_rustls::TlsConnector, String> {
    let ca_pem = read("the CA certificate", ca)?;
    let mut store = rustls::RootCertStore::empty();
    for c in certs_of("the CA certificate", ca, &ca_pem)? {
        store.add(c).map_err(|e| format!("the CA certificate {}: {e}", ca.display()))?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS versions: {e}"))?
        .with_root_certificates(store)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// Admits a caller only if the certificate it showed in the handshake is
/// of the CA, for `name` (`JOURNAL_SERVER_NAME`: a journal node, the only
/// callers of the Raft service; `JOURNAL_ADMIN_NAME`: the administrator),
/// with server use. Certificates once accepted are remembered (by their
/// bytes), so a heartbeat costs no signature check.
pub struct PeerCheck {
    verifier: Arc<rustls::client::WebPkiServerVerifier>,
    accepted: std::sync::Mutex<std::collections::HashSet<Vec<u8>>>,
    name: &'static str,
    what: &'static str,
}

impl PeerCheck {
    pub fn check(&self, chain: Option<&[CertificateDer<'static>]>) -> Result<(), String> {
        let Some((leaf, rest)) = chain.and_then(|c| c.split_first()) else {
            return Err("the caller showed no certificate".into());
        };
        if self.accepted.lock().unwrap().contains(leaf.as_ref()) {
            return Ok(());
        }
        let name = ServerName::try_from(self.name).expect("a valid DNS name");
        self.verifier
            .verify_server_cert(leaf, rest, &name, &[], UnixTime::now())
            .map_err(|e| format!("the caller's certificate is not {} ({e})", self.what))?;
        let mut accepted = self.accepted.lock().unwrap();
        if accepted.len() >= MAX_ACCEPTED_PEER_CERTS {
            accepted.clear();
        }
        accepted.insert(leaf.as_ref().to_vec());
        Ok(())
    }
}

/// What a certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A journal node: serves (as `JOURNAL_SERVER_NAME`) and calls its peers.
    JournalNode,
    /// A node's Redis-facing servers (redis-server's `tls-port`, the
    /// discovery endpoint): serves as localhost and the `--san` extras,
    /// never as `JOURNAL_SERVER_NAME`; client use too (Redis replication).
    RedisServer,
    /// The administrator (`ADMIN_CERT_NAME`): a client that may also
    /// change the journal's membership.
    Admin,
    /// A client only.
    Client,
}

impl Role {
    pub fn of(name: &str) -> Role {
        if name.starts_with(JOURNAL_NODE_PREFIX) {
            Role::JournalNode
        } else if name.starts_with(REDIS_SERVER_PREFIX) {
            Role::RedisServer
        } else if name == ADMIN_CERT_NAME {
            Role::Admin
        } else {
            Role::Client
        }
    }

    /// The names (DNS or IP) its certificate is for; `extra` is `--san`.
    pub fn sans(self, extra: &[String]) -> Vec<String> {
        let local = ["localhost", "127.0.0.1", "::1"].map(String::from);
        match self {
            Role::JournalNode => [JOURNAL_SERVER_NAME.to_string()].into_iter().chain(local).chain(extra.iter().cloned()).collect(),
            Role::RedisServer => local.into_iter().chain(extra.iter().cloned()).collect(),
            Role::Admin => vec![JOURNAL_ADMIN_NAME.to_string()],
            Role::Client => Vec::new(),
        }
    }
}

/// Which certificates `issue` must make, given the files already in the
/// directory (`present`: file names). A pair already there is kept (so a
/// restart reuses it); half a pair is an error, as is a CA key without its
/// certificate or the reverse.
pub fn plan(present: &BTreeSet<String>, names: &[String]) -> Result<(bool, Vec<String>), String> {
    for n in names {
        let ok = !n.is_empty()
            && n != "ca"
            && n.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !ok {
            return Err(format!("certificate name {n:?}: use a-z, 0-9, - and _ (and not \"ca\")"));
        }
    }
    let pair = |n: &str| (present.contains(&format!("{n}.pem")), present.contains(&format!("{n}.key")));
    let new_ca = match pair("ca") {
        (true, true) => false,
        (false, false) => true,
        _ => return Err("the directory holds only one of ca.pem and ca.key: restore the other, or start a new directory".into()),
    };
    let mut todo = Vec::new();
    let mut seen = BTreeSet::new();
    for n in names {
        if !seen.insert(n.clone()) {
            continue;
        }
        match pair(n) {
            (true, true) if !new_ca => {}
            (false, false) => todo.push(n.clone()),
            (true, true) => return Err(format!("{n}.pem exists but ca.pem does not: it belongs to another CA")),
            _ => return Err(format!("the directory holds only one of {n}.pem and {n}.key: remove it to issue a new pair")),
        }
    }
    Ok((new_ca, todo))
}

fn write_private(path: &Path, content: &str) -> Result<(), String> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    f.write_all(content.as_bytes()).and_then(|()| f.sync_all()).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn validity(days: i64) -> (time::OffsetDateTime, time::OffsetDateTime) {
    let now = time::OffsetDateTime::now_utc();
    // An hour back for clocks a little behind the issuer's.
    (now - time::Duration::hours(1), now + time::Duration::days(days))
}

/// Makes (or completes) a deployment's certificate directory: the CA if it
/// is not there, then a certificate and key for every name that has none
/// (`Role::of` the name decides its use). Journal nodes' certificates name
/// `JOURNAL_SERVER_NAME`, localhost, 127.0.0.1, ::1 and `extra_sans`
/// (DNS names or IP addresses); Redis servers' the same but
/// `JOURNAL_SERVER_NAME`. Every file is mode 0600, and the
/// directory 0700 when it makes it. Returns the names issued.
pub fn issue(dir: &Path, names: &[String], extra_sans: &[String]) -> Result<Vec<String>, String> {
    use rcgen::BasicConstraints;
    use rcgen::CertificateParams;
    use rcgen::DnType;
    use rcgen::ExtendedKeyUsagePurpose;
    use rcgen::IsCa;
    use rcgen::Issuer;
    use rcgen::KeyPair;
    use rcgen::KeyUsagePurpose;

    if !dir.exists() {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let present: BTreeSet<String> = std::fs::read_dir(dir)
        .map_err(|e| format!("cannot list {}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    let (new_ca, todo) = plan(&present, names)?;
    let rcgen_err = |what: &str, e: rcgen::Error| format!("{what}: {e}");

    let ca_key_path = dir.join("ca.key");
    let ca_cert_path = dir.join("ca.pem");
    let issuer = if new_ca {
        let key = KeyPair::generate().map_err(|e| rcgen_err("generating the CA key", e))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        // Each CA its own name: a certificate of another deployment's CA
        // is then refused as of an unknown issuer, not a bad signature.
        let born = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        params.distinguished_name.push(DnType::CommonName, format!("keel deployment CA {}.{:09}", born.as_secs(), born.subsec_nanos()));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        (params.not_before, params.not_after) = validity(CA_VALIDITY_DAYS);
        let cert = params.self_signed(&key).map_err(|e| rcgen_err("signing the CA certificate", e))?;
        write_private(&ca_key_path, &key.serialize_pem())?;
        write_private(&ca_cert_path, &cert.pem())?;
        Issuer::new(params, key)
    } else {
        let key_pem = std::fs::read_to_string(&ca_key_path).map_err(|e| format!("cannot read {}: {e}", ca_key_path.display()))?;
        let cert_pem = std::fs::read_to_string(&ca_cert_path).map_err(|e| format!("cannot read {}: {e}", ca_cert_path.display()))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| format!("{}: {e}", ca_key_path.display()))?;
        Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| format!("{}: {e}", ca_cert_path.display()))?
    };

    for name in &todo {
        let role = Role::of(name);
        let sans = role.sans(extra_sans);
        let mut params = CertificateParams::new(sans).map_err(|e| rcgen_err(&format!("names of {name}"), e))?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name.as_str());
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match role {
            // The administrator's "server use" only lets `admin_check`
            // verify it by name; nothing verifies a server under its name.
            Role::JournalNode | Role::RedisServer | Role::Admin => {
                vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth]
            }
            Role::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
        };
        (params.not_before, params.not_after) = validity(CERT_VALIDITY_DAYS);
        let key = KeyPair::generate().map_err(|e| rcgen_err(&format!("generating the key of {name}"), e))?;
        let cert = params.signed_by(&key, &issuer).map_err(|e| rcgen_err(&format!("signing the certificate of {name}"), e))?;
        write_private(&dir.join(format!("{name}.key")), &key.serialize_pem())?;
        write_private(&dir.join(format!("{name}.pem")), &cert.pem())?;
    }
    Ok(todo)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(ca: bool, cert: bool, key: bool, dir: bool, insecure: bool) -> TlsFlags {
        let p = |on: bool, s: &str| on.then(|| PathBuf::from(s));
        TlsFlags { ca: p(ca, "/c/ca.pem"), cert: p(cert, "/c/x.pem"), key: p(key, "/c/x.key"), dir: p(dir, "/d"), insecure }
    }

    #[test]
    fn resolve_every_combination() {
        for bits in 0..32u32 {
            let b = |i: u32| bits & (1 << i) != 0;
            let f = flags(b(0), b(1), b(2), b(3), b(4));
            let n_files = (0..3).filter(|&i| b(i)).count();
            let got = f.resolve("journal-1", "--");
            let want_ok = match (b(4), n_files, b(3)) {
                (true, 0, false) => Some(TlsChoice::Insecure),
                (true, _, _) => None,
                (false, 3, false) => Some(TlsChoice::Files(TlsPaths {
                    ca: "/c/ca.pem".into(),
                    cert: "/c/x.pem".into(),
                    key: "/c/x.key".into(),
                })),
                (false, 0, true) => Some(TlsChoice::Files(TlsPaths::in_dir(Path::new("/d"), "journal-1"))),
                _ => None,
            };
            match (got, want_ok) {
                (Ok(g), Some(w)) => assert_eq!(g, w, "flags {bits:05b}"),
                (Err(e), None) => assert!(e.contains("--"), "flags {bits:05b}: {e}"),
                (g, w) => panic!("flags {bits:05b}: got {g:?}, want {w:?}"),
            }
        }
    }

    #[test]
    fn resolve_errors_say_what_to_give() {
        let e = flags(false, false, false, false, false).resolve("ctl", "--journal-").unwrap_err();
        assert!(e.contains("--journal-ca") && e.contains("--journal-insecure") && e.contains("ctl.pem"), "{e}");
        let e = flags(true, false, true, false, false).resolve("ctl", "--").unwrap_err();
        assert!(e.contains("missing: --cert"), "{e}");
        assert_eq!(TlsPaths::in_dir(Path::new("/d"), "ctl").key, PathBuf::from("/d/ctl.key"));
    }

    #[test]
    fn key_mode() {
        assert!(check_key_mode(Path::new("k"), 0o100600).is_ok());
        assert!(check_key_mode(Path::new("k"), 0o100400).is_ok());
        for bad in [0o100640, 0o100604, 0o100644, 0o100660, 0o100601] {
            let e = check_key_mode(Path::new("k"), bad).unwrap_err();
            assert!(e.contains("chmod 600 k"), "{e}");
        }
    }

    fn set(files: &[&str]) -> BTreeSet<String> {
        files.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn plan_keeps_pairs_and_refuses_halves() {
        let names = vec!["journal-1".to_string(), "ctl".to_string(), "ctl".to_string()];
        assert_eq!(plan(&set(&[]), &names).unwrap(), (true, vec!["journal-1".into(), "ctl".into()]));
        let all = set(&["ca.pem", "ca.key", "journal-1.pem", "journal-1.key"]);
        assert_eq!(plan(&all, &names).unwrap(), (false, vec!["ctl".into()]));
        assert!(plan(&set(&["ca.pem"]), &names).unwrap_err().contains("ca.key"));
        assert!(plan(&set(&["ca.pem", "ca.key", "ctl.key"]), &names).unwrap_err().contains("ctl.pem"));
        assert!(plan(&set(&["ctl.pem", "ctl.key"]), &names).unwrap_err().contains("another CA"));
        assert!(plan(&set(&[]), &["Bad/Name".into()]).is_err());
        assert!(plan(&set(&[]), &["ca".into()]).is_err());
    }

    #[test]
    fn roles_by_name() {
        assert_eq!(Role::of("journal-3"), Role::JournalNode);
        assert_eq!(Role::of("node-0"), Role::Client);
        assert_eq!(Role::of("ctl"), Role::Admin);
        assert_eq!(Role::of("snapshotter"), Role::Client);
        assert_eq!(Role::of("redis-0"), Role::RedisServer);
        let extra = ["redis.example".to_string()];
        assert_eq!(Role::of("redis-0").sans(&extra), ["localhost", "127.0.0.1", "::1", "redis.example"]);
        assert_eq!(Role::of("journal-1").sans(&extra), [JOURNAL_SERVER_NAME, "localhost", "127.0.0.1", "::1", "redis.example"]);
        assert!(Role::of("node-0").sans(&extra).is_empty());
        assert!(!Role::RedisServer.sans(&extra).iter().any(|n| n == JOURNAL_SERVER_NAME));
        assert_eq!(Role::Admin.sans(&extra), [JOURNAL_ADMIN_NAME]);
    }

    /// A Redis server's certificate serves Redis clients, never the journal:
    /// a journal node refuses to start with it and refuses it as a peer.
    #[test]
    fn a_redis_server_certificate_cannot_serve_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        issue(dir.path(), &["journal-1".into(), "redis-0".into()], &[]).unwrap();
        let load = |name: &str| JournalTls::load(&TlsChoice::Files(TlsPaths::in_dir(dir.path(), name))).unwrap();
        let (journal, redis) = (load("journal-1"), load("redis-0"));
        journal.check_serves().expect("a journal node's certificate serves the journal");
        let e = redis.check_serves().unwrap_err();
        assert!(e.contains("cannot serve the journal") && e.contains(JOURNAL_NODE_PREFIX), "{e}");

        let chain = |name: &str| certs_of("cert", Path::new(name), &std::fs::read(dir.path().join(format!("{name}.pem"))).unwrap()).unwrap();
        let check = journal.peer_check().unwrap().unwrap();
        check.check(Some(&chain("journal-1"))).expect("a journal node is a peer");
        let e = check.check(Some(&chain("redis-0"))).unwrap_err();
        assert!(e.contains("not a journal node's"), "{e}");

        // It does serve as localhost, with server use.
        let verifier = server_verifier(&certs_of("ca", Path::new("ca"), &std::fs::read(dir.path().join("ca.pem")).unwrap()).unwrap()).unwrap();
        let redis_chain = chain("redis-0");
        for name in ["localhost", "127.0.0.1", "::1"] {
            let name = ServerName::try_from(name).unwrap();
            verifier.verify_server_cert(&redis_chain[0], &redis_chain[1..], &name, &[], UnixTime::now()).unwrap();
        }
    }

    /// Only the administrator's certificate passes the admin check, and it
    /// is neither a journal node's nor a server a client would accept.
    #[test]
    fn only_the_admin_certificate_may_change_membership() {
        let dir = tempfile::tempdir().unwrap();
        issue(dir.path(), &["journal-1".into(), "ctl".into(), "node-0".into(), "redis-node-0".into()], &[]).unwrap();
        let load = |name: &str| JournalTls::load(&TlsChoice::Files(TlsPaths::in_dir(dir.path(), name))).unwrap();
        let journal = load("journal-1");
        let chain = |name: &str| certs_of("cert", Path::new(name), &std::fs::read(dir.path().join(format!("{name}.pem"))).unwrap()).unwrap();
        let admin = journal.admin_check().unwrap().unwrap();
        admin.check(Some(&chain("ctl"))).expect("ctl is the administrator");
        for other in ["journal-1", "node-0", "redis-node-0"] {
            let e = admin.check(Some(&chain(other))).unwrap_err();
            assert!(e.contains("not the journal administrator's"), "{other}: {e}");
        }
        assert!(admin.check(None).is_err());
        let peers = journal.peer_check().unwrap().unwrap();
        assert!(peers.check(Some(&chain("ctl"))).unwrap_err().contains("not a journal node's"));
        assert!(load("ctl").check_serves().is_err(), "the administrator cannot serve the journal");
    }
}
