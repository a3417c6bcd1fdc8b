//! Command-line parsing and wiring: each subcommand turns flags into engine settings.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use amb_engine::endpoints::{EtcdTls, Resolver};
use amb_engine::{
    AcceptSettings, Client, ClientSettings, ClientTransport, DirectClient, DirectSettings,
    Registration, Server, ServerSettings, ServerTransports,
};
use amb_metrics::Metrics;
use amb_pki::{Finding, InitOptions, LeafRole, Severity, TlsFiles};
use amb_proto::{AllowList, Limits, RouteName, RouteTable, San};
use amb_spec::{
    docker_links, Balance, DockerLink, EtcdKey, HealthCheck, HealthCheckKind, HostPort,
    ListenerSpec, PeerList, PeerSpec, RedisAuth, RouteSpec, Secret, UpstreamSetSpec, UpstreamTls,
};
use anyhow::{bail, Context as _};
use std::collections::BTreeMap;

use amb_config::{self as config, ClientFile, ConfigFile, ListenerFile, RouteDefaults, ServerFile};

use crate::reconfigure::{self, keep_current};
use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

/// mTLS ambassador tunnel pair: apps talk plaintext to localhost, amb carries each connection
/// over one warm QUIC or TLS 1.3 tunnel to the server, which forwards it to the real service.
#[derive(Parser, Debug)]
#[command(name = "amb", version)]
pub struct Args {
    /// Log line format.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "AMB_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
    /// Worker threads for client and server. 1 runs everything on one thread. Default: 1 on
    /// machines with at most two CPUs, where the ambassador shares them with the app and the
    /// upstream and a second worker costs more in cross-thread wake-ups than it adds (see
    /// BENCHMARKS.md); else one per CPU.
    #[arg(long, global = true, env = "AMB_THREADS")]
    pub threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

/// How log lines are written (level filter: `RUST_LOG`, default `info`).
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Make or extend a development PKI.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Run the server ambassador: accept tunnels and forward streams to upstreams.
    Server(Box<ServerArgs>),
    /// Run the client ambassador: listen locally and carry connections through the tunnel.
    Client(Box<ClientArgs>),
    /// Check a config file (or the flags of `amb check server|client ...`) and the certificate
    /// files it names without starting anything: one line per problem, exit 1 on any error.
    Check(CheckArgs),
    /// Run what a config file holds: its [server] and [client] parts, in one process.
    Run {
        /// The config file (TOML).
        #[arg(long, value_name = "FILE", env = "AMB_CONFIG")]
        config: PathBuf,
    },
    /// Print a completion script for SHELL to stdout (e.g. `amb completions bash >
    /// /etc/bash_completion.d/amb`).
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) to stdout (e.g. `amb man > /usr/local/share/man/man1/amb.1`).
    Man,
}

#[derive(Subcommand, Debug)]
enum CertsCommand {
    /// Write a private CA and server and client certificates (ECDSA P-256) into DIR.
    Init {
        /// Directory to write into.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// Extra DNS name or IP the server certificate is valid for (besides localhost, 127.0.0.1).
        #[arg(long = "server-name", value_name = "NAME")]
        server_names: Vec<String>,
        /// Client identity name (DNS SAN NAME and URI SAN spiffe://amb/NAME); default `client`.
        #[arg(long = "client-name", value_name = "NAME")]
        client_names: Vec<String>,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Issue another leaf from the CA in DIR, written as DIR/NAME.pem and DIR/NAME.key.
    Issue {
        /// Directory holding ca.pem and ca.key.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// Issue a server certificate valid for NAME.
        #[arg(
            long,
            value_name = "NAME",
            conflicts_with = "client",
            required_unless_present = "client"
        )]
        server: Option<String>,
        /// Issue a client certificate for identity NAME.
        #[arg(long, value_name = "NAME")]
        client: Option<String>,
        /// Additional SAN: dns:X, uri:Y or ip:Z.
        #[arg(long = "san", value_name = "SAN")]
        sans: Vec<San>,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: i64,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
}

/// What `amb check` checks.
#[derive(clap::Args, Debug)]
struct CheckArgs {
    /// The config file (TOML): each part it holds.
    #[arg(long, value_name = "FILE", env = "AMB_CONFIG")]
    config: Option<PathBuf>,
    /// Also dial each configured peer once (a real handshake, reporting what the peer
    /// presented) and each route's upstream.
    #[arg(long, global = true, env = "AMB_CHECK_CONNECT")]
    connect: bool,
    #[command(subcommand)]
    part: Option<CheckPart>,
}

/// One part, configured by the flags (and `--config`) its own command takes.
#[derive(Subcommand, Debug)]
enum CheckPart {
    /// What `amb server` with these flags would run.
    Server(Box<ServerArgs>),
    /// What `amb client` with these flags would run.
    Client(Box<ClientArgs>),
}

/// The settings of one part, resolved as its command resolves them.
enum PartSettings {
    Server(ServerSettings),
    Client(ClientSettings),
    /// Client-only mode (`tls-upstream`): its files are read and checked as it resolves.
    Direct(DirectSettings),
}

/// Certificate flags shared by client and server.
#[derive(clap::Args, Clone, Debug)]
struct CertArgs {
    /// Directory with ca.pem and <role>.pem/.key (role: server or client).
    #[arg(long, default_value = "certs", env = "AMB_CERTS_DIR")]
    certs_dir: PathBuf,
    /// Certificate chain (PEM); overrides the certs directory.
    #[arg(long, env = "AMB_CERT")]
    cert: Option<PathBuf>,
    /// Private key (PEM, mode 0600).
    #[arg(long, env = "AMB_KEY")]
    key: Option<PathBuf>,
    /// CA certificate(s) the peer must chain to (PEM).
    #[arg(long, env = "AMB_CA")]
    ca: Option<PathBuf>,
    /// How often the certificate files (and a --config file) are checked for changes,
    /// which are then loaded (as on SIGHUP); 0s checks only on SIGHUP.
    #[arg(long, value_parser = parse_duration, default_value = "10s", env = "AMB_RELOAD_CHECK")]
    reload_check: Duration,
}

impl CertArgs {
    /// The files and the reload period: flags (or variables) given, else the file's values,
    /// else the defaults.
    fn resolve(
        &self,
        given: &Given<'_>,
        role: &str,
        file: FileCerts,
    ) -> anyhow::Result<(TlsFiles, Option<Duration>)> {
        let certs_dir = given.pick("certs_dir", self.certs_dir.clone(), file.certs_dir);
        let one = |id: &str, flag: &Option<PathBuf>, file: Option<PathBuf>| {
            given.pick(id, flag.clone(), file.map(Some))
        };
        let files = match (
            one("cert", &self.cert, file.cert),
            one("key", &self.key, file.key),
            one("ca", &self.ca, file.ca),
        ) {
            (Some(cert), Some(key), Some(ca)) => TlsFiles { cert, key, ca },
            (None, None, None) => TlsFiles::in_dir(&certs_dir, role),
            _ => bail!(
                "give --cert, --key and --ca together (or none, for the files in --certs-dir)"
            ),
        };
        let reload_check = given.pick("reload_check", self.reload_check, file.reload_check);
        Ok((files, Some(reload_check).filter(|d| !d.is_zero())))
    }
}

/// The certificate keys of a config file's part.
#[derive(Default)]
struct FileCerts {
    certs_dir: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    ca: Option<PathBuf>,
    reload_check: Option<Duration>,
}

/// The bounds of a config file's part.
#[derive(Default)]
struct FileLimits {
    idle_timeout: Option<Duration>,
    handshake_timeout: Option<Duration>,
    max_streams: Option<u32>,
    drain_timeout: Option<Duration>,
    max_connections: Option<usize>,
}

/// The certificate keys and bounds of a config file's part: the [server] and [client] parts
/// spell them alike, in types of their own.
macro_rules! certs_and_limits {
    ($file:expr) => {
        (
            FileCerts {
                certs_dir: $file.certs_dir,
                cert: $file.cert,
                key: $file.key,
                ca: $file.ca,
                reload_check: $file.reload_check.map(|d| d.get()),
            },
            FileLimits {
                idle_timeout: $file.idle_timeout.map(|d| d.get()),
                handshake_timeout: $file.handshake_timeout.map(|d| d.get()),
                max_streams: $file.max_streams,
                drain_timeout: $file.drain_timeout.map(|d| d.get()),
                max_connections: $file.max_connections,
            },
        )
    };
}

/// Picks each setting: a flag or variable that was given, else the config file's value, else
/// the flag's default.
struct Given<'a>(Option<&'a ArgMatches>);

impl Given<'_> {
    fn pick<T>(&self, id: &str, flag: T, file: Option<T>) -> T {
        match file {
            Some(value) if !self.given(id) => value,
            _ => flag,
        }
    }

    /// Whether the flag `id` was given on the command line or as its variable.
    fn given(&self, id: &str) -> bool {
        self.0
            .and_then(|m| m.value_source(id))
            .is_some_and(|source| source != ValueSource::DefaultValue)
    }
}

/// What client and server show of themselves.
#[derive(clap::Args, Clone, Debug)]
struct ObserveArgs {
    /// Serve Prometheus metrics (/metrics), /healthz and /readyz over plain HTTP at ADDR:PORT,
    /// e.g. 127.0.0.1:9090 (bind loopback or a Pod-internal address: it has no TLS).
    #[arg(long, value_name = "ADDR:PORT", env = "AMB_METRICS")]
    metrics: Option<SocketAddr>,
    /// One info line per app connection when it ends (route, peer, upstream, bytes each way,
    /// duration, how it ended), under the log target amb::access: on or off.
    #[arg(long, value_enum, default_value = "on", env = "AMB_ACCESS_LOG")]
    access_log: Switch,
}

/// On or off.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Switch {
    On,
    Off,
}

impl ObserveArgs {
    /// The metrics address and whether the access log is on: flags (or variables) given, else
    /// the file's values, else the defaults. Every part of a process counts into one `Metrics`.
    fn resolve(
        &self,
        given: &Given<'_>,
        file_metrics: Option<SocketAddr>,
        file_access_log: Option<config::Switch>,
    ) -> (Option<SocketAddr>, bool) {
        let metrics = given.pick("metrics", self.metrics, file_metrics.map(Some));
        let file_access_log = file_access_log.map(|s| match s {
            config::Switch::On => Switch::On,
            config::Switch::Off => Switch::Off,
        });
        let access_log = given.pick("access_log", self.access_log, file_access_log);
        (metrics, access_log == Switch::On)
    }
}

/// The metrics every part of this process counts into.
pub(crate) fn process_metrics() -> Arc<Metrics> {
    static METRICS: std::sync::OnceLock<Arc<Metrics>> = std::sync::OnceLock::new();
    METRICS
        .get_or_init(|| Metrics::new(env!("CARGO_PKG_VERSION")))
        .clone()
}

/// Bounds shared by client and server.
#[derive(clap::Args, Clone, Debug)]
struct LimitArgs {
    /// A tunnel connection silent this long (keep-alives included) is dropped, e.g. 30s.
    #[arg(long, value_parser = parse_duration, default_value = "30s", env = "AMB_IDLE_TIMEOUT")]
    idle_timeout: Duration,
    /// Handshake deadline for tunnel connections.
    #[arg(long, value_parser = parse_duration, default_value = "10s", env = "AMB_HANDSHAKE_TIMEOUT")]
    handshake_timeout: Duration,
    /// Concurrent streams per tunnel connection.
    #[arg(long, default_value_t = 32_768, env = "AMB_MAX_STREAMS")]
    max_streams: u32,
    /// After SIGINT/SIGTERM, how long live connections may finish; also how long a server's
    /// tunnel connection drained by a change of the trusted CAs may run on.
    #[arg(long, value_parser = parse_duration, default_value = "10s", env = "AMB_DRAIN_TIMEOUT")]
    drain_timeout: Duration,
    /// Connections carried at once (client: app connections; server: streams); more are
    /// refused at once.
    #[arg(long, default_value_t = 50_000, env = "AMB_MAX_CONNECTIONS")]
    max_connections: usize,
}

impl LimitArgs {
    /// The bounds and the connection cap: flags (or variables) given, else the file's values,
    /// else the defaults.
    fn resolve(&self, given: &Given<'_>, file: FileLimits) -> (Limits, usize) {
        let limits = Limits {
            max_streams_per_connection: given.pick(
                "max_streams",
                self.max_streams,
                file.max_streams,
            ),
            handshake_timeout: given.pick(
                "handshake_timeout",
                self.handshake_timeout,
                file.handshake_timeout,
            ),
            drain_timeout: given.pick("drain_timeout", self.drain_timeout, file.drain_timeout),
            idle_timeout: given.pick("idle_timeout", self.idle_timeout, file.idle_timeout),
            ..Limits::default()
        };
        let max_connections = given.pick(
            "max_connections",
            self.max_connections,
            file.max_connections,
        );
        (limits, max_connections)
    }
}

/// How an `etcds://` registry is reached.
#[derive(clap::Args, Clone, Debug)]
struct EtcdArgs {
    /// The CA an etcds:// registry's certificate must chain to (default: the system's roots).
    #[arg(long, value_name = "FILE", env = "AMB_ETCD_CA")]
    etcd_ca: Option<PathBuf>,
    /// A client certificate for an etcds:// registry that checks clients (with --etcd-key).
    #[arg(
        long,
        value_name = "FILE",
        env = "AMB_ETCD_CERT",
        requires = "etcd_key"
    )]
    etcd_cert: Option<PathBuf>,
    /// The key of --etcd-cert (mode 0600).
    #[arg(
        long,
        value_name = "FILE",
        env = "AMB_ETCD_KEY",
        requires = "etcd_cert"
    )]
    etcd_key: Option<PathBuf>,
}

impl EtcdArgs {
    /// The flags over a config file's `etcd-ca`, `etcd-cert`, `etcd-key`.
    fn resolve(self, given: &Given<'_>, file: [Option<PathBuf>; 3]) -> EtcdTls {
        let [ca, cert, key] = file;
        EtcdTls {
            ca: given.pick("etcd_ca", self.etcd_ca, ca.map(Some)),
            cert: given.pick("etcd_cert", self.etcd_cert, cert.map(Some)),
            key: given.pick("etcd_key", self.etcd_key, key.map(Some)),
        }
    }
}

#[derive(clap::Args, Clone, Debug)]
struct ServerArgs {
    /// Config file (TOML) whose [server] part sets what no flag or variable sets.
    #[arg(long, value_name = "FILE", env = "AMB_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on (TCP for TLS, UDP for QUIC). With --peer, the server listens
    /// only if this is given.
    #[arg(long, default_value = "0.0.0.0:7443", env = "AMB_LISTEN")]
    listen: std::net::SocketAddr,
    /// Reverse tunnel: dial the app side's `amb client --accept` at HOST:PORT and serve the
    /// streams it opens (for a service nothing may connect to: behind NAT, egress only).
    /// Repeatable, or several separated by commas; each is kept connected.
    #[arg(long, value_name = "HOST:PORT", env = "AMB_SERVER_PEER")]
    peer: Vec<PeerList>,
    /// Upstream(s) of the route named `default`: HOST:PORT, or unix:PATH for a service on this
    /// host (no TCP handshake per connection); several separated by commas, each optionally
    /// followed by ` weight=N`. A name is looked up every 5 s, not per connection.
    #[arg(long, value_name = "UPSTREAM[,UPSTREAM...]", env = "AMB_UPSTREAM")]
    upstream: Option<UpstreamSetSpec>,
    /// A named route: NAME=UPSTREAM[,UPSTREAM...], each HOST:PORT or unix:PATH (repeatable).
    #[arg(long = "route", value_name = "NAME=UPSTREAMS", env = "AMB_ROUTE")]
    routes: Vec<RouteSpec>,
    /// The route a standard TLS client (no ALPN: redis-cli --tls, stunnel) is served when its
    /// SNI names no route; it presents a client certificate as a tunnel client does.
    #[arg(
        long,
        value_name = "ROUTE",
        default_value = "default",
        env = "AMB_TLS_ROUTE"
    )]
    tls_route: RouteName,
    /// How a route of several upstreams spreads new connections over those up: least-conn
    /// (the less loaded of two picked by weight), round-robin (by weight), or failover (the
    /// first up, in the order given). A route's own `balance` in --config wins.
    #[arg(
        long,
        value_name = "MODE",
        default_value = "least-conn",
        env = "AMB_BALANCE"
    )]
    balance: Balance,
    /// Check each upstream actively: tcp (a connection is accepted), redis (PING answered
    /// +PONG) or redis-master (and ROLE answered master: a route over a primary and its replicas
    /// follows a promotion). An upstream failing its check gets no new connections. A route's
    /// own `health-check` in --config wins.
    #[arg(long, value_name = "KIND", env = "AMB_HEALTH_CHECK")]
    health_check: Option<HealthCheckKind>,
    /// How often --health-check runs; each check must be answered within it.
    #[arg(long, value_name = "D", value_parser = parse_duration, default_value = "2s", env = "AMB_HEALTH_INTERVAL")]
    health_interval: Duration,
    /// Transports to serve.
    #[arg(long, value_enum, default_value = "both", env = "AMB_TRANSPORT")]
    transport: ServerTransportArg,
    /// Only peers with one of these SANs may open streams: dns:X, uri:Y or ip:Z (exact match).
    #[arg(
        long = "allow",
        value_name = "SAN",
        env = "AMB_ALLOW",
        value_delimiter = ','
    )]
    allow: Vec<San>,
    /// A route per Docker-links variable: REDIS_PORT_6379_TCP=tcp://172.17.0.2:6379 gives
    /// route `redis` to that address.
    #[arg(long, env = "AMB_FROM_ENV")]
    from_env: bool,
    /// Upstream connect timeout.
    #[arg(long, value_parser = parse_duration, default_value = "5s", env = "AMB_CONNECT_TIMEOUT")]
    connect_timeout: Duration,
    /// The DNS server upstream names and SRV records are looked up at (default: the system's).
    #[arg(long, value_name = "ADDR:PORT", env = "AMB_DNS_SERVER")]
    dns_server: Option<SocketAddr>,
    /// Register the tunnel address in etcd while running: etcd://HOST:PORT[,...]/PREFIX/NAME
    /// (etcds:// for TLS), under a 10 s lease renewed while the server runs.
    #[arg(long, value_name = "URL", env = "AMB_REGISTER")]
    register: Option<EtcdKey>,
    /// The address --register writes, HOST:PORT (default: --listen, unless it is 0.0.0.0).
    #[arg(long, value_name = "HOST:PORT", env = "AMB_ADVERTISE")]
    advertise: Option<String>,
    #[command(flatten)]
    etcd: EtcdArgs,
    #[command(flatten)]
    certs: CertArgs,
    #[command(flatten)]
    limits: LimitArgs,
    #[command(flatten)]
    observe: ObserveArgs,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ServerTransportArg {
    Quic,
    Tls,
    Both,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ClientTransportArg {
    /// QUIC where it works, else TLS (UDP blocked, or a server serving TLS only); new app
    /// connections move back to QUIC once it works.
    Auto,
    /// QUIC over UDP only.
    Quic,
    /// HTTP/2 over TLS 1.3 over TCP only.
    Tls,
}

#[derive(clap::Args, Clone, Debug)]
struct ClientArgs {
    /// Config file (TOML) whose [client] part sets what no flag or variable sets.
    #[arg(long, value_name = "FILE", env = "AMB_CONFIG")]
    config: Option<PathBuf>,
    /// The server ambassador, HOST:PORT; HOST is also the name its certificate must match.
    /// Or a discovered set: srv:NAME (SRV records) or etcd://HOST:PORT[,...]/PREFIX (the
    /// servers registered there). Repeatable, or several separated by commas: new app
    /// connections are spread over the peers with a tunnel connection up (--peer-balance), and
    /// go to the others at once when one is lost or draining.
    #[arg(long, value_name = "HOST:PORT", env = "AMB_PEER")]
    peer: Vec<PeerList>,
    /// Client-only mode (the stunnel client role): carry each app connection as its own TLS
    /// connection straight to this TLS service, HOST:PORT (several separated by commas), with
    /// no amb server. Its certificate must chain to --ca and name --server-name (default:
    /// HOST); --cert and --key, together, present a client certificate.
    #[arg(
        long,
        value_name = "HOST:PORT",
        env = "AMB_TLS_UPSTREAM",
        conflicts_with = "peer"
    )]
    tls_upstream: Option<UpstreamSetSpec>,
    /// How new app connections are spread over several peers: least-conn (the one carrying
    /// the fewest), round-robin, or failover (the first up, in the order given: a standby).
    #[arg(
        long,
        value_name = "MODE",
        default_value = "least-conn",
        env = "AMB_PEER_BALANCE"
    )]
    peer_balance: Balance,
    /// Reverse tunnels: take the tunnel connections of service-side ambassadors (`amb server
    /// --peer`) at ADDR:PORT (TCP for TLS, UDP for QUIC) and carry the listeners without a peer
    /// of their own over them. Needs --allow.
    #[arg(
        long,
        value_name = "ADDR:PORT",
        env = "AMB_ACCEPT",
        conflicts_with = "tls_upstream"
    )]
    accept: Option<SocketAddr>,
    /// With --accept: the service-side identities taken in, dns:X, uri:Y or ip:Z (exact
    /// match); any other certificate of the CA is turned away.
    #[arg(
        long = "allow",
        value_name = "SAN",
        env = "AMB_ACCEPT_ALLOW",
        value_delimiter = ',',
        requires = "accept"
    )]
    allow: Vec<San>,
    /// Local listener: [ADDR:]PORT[=ROUTE]; a bare PORT binds 127.0.0.1 (repeatable).
    #[arg(
        long = "listen",
        value_name = "[ADDR:]PORT[=ROUTE]",
        env = "AMB_LISTEN",
        value_delimiter = ','
    )]
    listens: Vec<ListenerSpec>,
    /// A listener per Docker-links variable: REDIS_PORT_6379_TCP=tcp://big-server:7443 listens
    /// on port 6379 for route `redis` through peer big-server:7443.
    #[arg(long, env = "AMB_FROM_ENV")]
    from_env: bool,
    /// The address --from-env listeners bind.
    #[arg(long, default_value = "127.0.0.1", env = "AMB_LISTEN_ADDR")]
    listen_addr: std::net::IpAddr,
    /// Tunnel transport.
    #[arg(long, value_enum, default_value = "auto", env = "AMB_TRANSPORT")]
    transport: ClientTransportArg,
    /// Name the server certificate must be valid for (default: HOST of --peer, or each SRV
    /// record's target).
    #[arg(long, env = "AMB_SERVER_NAME")]
    server_name: Option<String>,
    /// The DNS server peer names and SRV records are looked up at (default: the system's).
    #[arg(long, value_name = "ADDR:PORT", env = "AMB_DNS_SERVER")]
    dns_server: Option<SocketAddr>,
    #[command(flatten)]
    etcd: EtcdArgs,
    /// Tunnel connections kept warm (default: 1 for QUIC, 2 for TLS).
    #[arg(long, env = "AMB_CONNECTIONS")]
    connections: Option<usize>,
    /// How long an app connection waits for a tunnel before it is reset.
    #[arg(long, value_parser = parse_duration, default_value = "5s", env = "AMB_TUNNEL_WAIT")]
    tunnel_wait: Duration,
    #[command(flatten)]
    certs: CertArgs,
    #[command(flatten)]
    limits: LimitArgs,
    #[command(flatten)]
    observe: ObserveArgs,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration ({e}); write e.g. 500ms, 10s, 2m, 1m30s"))
}

/// Parses the command line, keeping where each value came from (flag, variable or default),
/// which decides whether a config file's value is taken.
pub fn parse() -> (Args, ArgMatches) {
    let matches = Args::command().get_matches();
    match Args::from_arg_matches(&matches) {
        Ok(args) => (args, matches),
        Err(e) => e.exit(),
    }
}

/// Sets up `tracing`: `RUST_LOG` filters (default `info`), stderr output, batched (see
/// [`BatchedStderr`]). Keep the returned guard until exit: its drop writes what is held.
pub fn init_tracing(format: LogFormat) -> LogGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let out = BatchedStderr::start();
    let writer = out.clone();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(move || writer.clone())
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    LogGuard(out)
}

/// Log lines held in memory and written to stderr in one `write` every [`Self::EVERY`], or at
/// once when [`Self::FULL`] have piled up. A `write` per line cost 9% of new connections per
/// second once every connection had an access line, and a writer thread woken per line cost
/// more (BENCHMARKS.md); this costs a wake-up of its flusher ten times a second.
#[derive(Clone, Default)]
struct BatchedStderr {
    held: Arc<std::sync::Mutex<Vec<u8>>>,
    /// No flusher thread could start: each line goes out at once.
    at_once: bool,
}

impl BatchedStderr {
    const EVERY: Duration = Duration::from_millis(100);
    const FULL: usize = 32 << 10;

    fn start() -> Self {
        let out = BatchedStderr::default();
        let flusher = out.clone();
        let spawned = std::thread::Builder::new()
            .name("amb-log".into())
            .spawn(move || loop {
                std::thread::sleep(Self::EVERY);
                flusher.flush_held();
            });
        if spawned.is_err() {
            eprintln!("amb: no thread to write logs in batches: each line is written at once");
            return BatchedStderr {
                at_once: true,
                ..out
            };
        }
        out
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        (self.held.lock()).unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn flush_held(&self) {
        let mut held = self.held();
        if !held.is_empty() {
            use std::io::Write;
            let _ = std::io::stderr().write_all(&held);
            held.clear();
        }
    }
}

impl std::io::Write for BatchedStderr {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let mut held = self.held();
        held.extend_from_slice(line);
        if self.at_once || held.len() >= Self::FULL {
            std::io::stderr().write_all(&held)?;
            held.clear();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Writes the log lines still held when dropped (at exit).
pub struct LogGuard(BatchedStderr);

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.0.flush_held();
    }
}

/// Runs the chosen subcommand.
pub fn run(args: Args, matches: &ArgMatches) -> anyhow::Result<()> {
    match args.command {
        Command::Certs(certs) => run_certs(certs),
        Command::Server(server) => {
            let part = matches.subcommand_matches("server").cloned();
            let settings = server_settings(*server.clone(), &Given(part.as_ref()))?;
            let config = server.config.clone().map(|path| {
                let build = move || server_settings(*server.clone(), &Given(part.as_ref()));
                (path, server_reload(&settings, build))
            });
            runtime(args.threads)?.block_on(run_server(settings, config))
        }
        Command::Client(client)
            if client.tls_upstream.is_some()
                || client_part(client.config.as_deref())?
                    .tls_upstream
                    .is_some() =>
        {
            let part = matches.subcommand_matches("client").cloned();
            let settings = direct_settings(*client.clone(), &Given(part.as_ref()))?;
            let config = client.config.clone().map(|path| {
                let build = move || {
                    direct_settings(*client.clone(), &Given(part.as_ref())).map(direct_part)
                };
                let build: DirectBuilder = Box::new(build);
                (path, build)
            });
            runtime(args.threads)?.block_on(run_direct(settings, config))
        }
        Command::Client(client) => {
            let part = matches.subcommand_matches("client").cloned();
            let settings = client_settings(*client.clone(), &Given(part.as_ref()))?;
            let config = client.config.clone().map(|path| {
                let build = move || client_settings(*client.clone(), &Given(part.as_ref()));
                (path, client_reload(&settings, build))
            });
            runtime(args.threads)?.block_on(run_client(settings, config))
        }
        Command::Check(check_args) => check(check_args, matches),
        Command::Run { config } => {
            let file = ConfigFile::load(&config)?;
            let path = config.display().to_string();
            let server = match file.server {
                Some(_) => Some(server_settings(part_args("server", &path)?, &Given(None))?),
                None => None,
            };
            let direct = file
                .client
                .as_ref()
                .is_some_and(|c| c.tls_upstream.is_some());
            let (mut client, mut direct) = match file.client {
                None => (None, None),
                Some(_) if direct => {
                    let settings = direct_settings(part_args("client", &path)?, &Given(None))?;
                    (None, Some(settings))
                }
                Some(_) => {
                    let settings = client_settings(part_args("client", &path)?, &Given(None))?;
                    (Some(settings), None)
                }
            };
            // One process, one set of metrics: an address both parts name is served once.
            if let Some(s) = &server {
                let client_listen = client.as_mut().map(|c| &mut c.metrics_listen);
                let direct_listen = direct.as_mut().map(|d| &mut d.metrics_listen);
                for listen in client_listen.into_iter().chain(direct_listen) {
                    if s.metrics_listen.is_some() && s.metrics_listen == *listen {
                        *listen = None;
                    }
                }
            }
            if server.is_none() && client.is_none() && direct.is_none() {
                bail!("{path}: neither a [server] nor a [client] part: nothing to run");
            }
            let server_build = server.as_ref().map(|running| {
                let path = path.clone();
                let build = move || server_settings(part_args("server", &path)?, &Given(None));
                server_reload(running, build)
            });
            let client_build = client.as_ref().map(|running| {
                let path = path.clone();
                let build = move || client_settings(part_args("client", &path)?, &Given(None));
                client_reload(running, build)
            });
            runtime(args.threads)?.block_on(async {
                let server = async {
                    match server.zip(server_build) {
                        Some((settings, build)) => {
                            run_server(settings, Some((config.clone(), build))).await
                        }
                        None => Ok(()),
                    }
                };
                let client = async {
                    match client.zip(client_build) {
                        Some((settings, build)) => {
                            run_client(settings, Some((config.clone(), build))).await
                        }
                        None => Ok(()),
                    }
                };
                let direct = async {
                    match direct {
                        Some(settings) => {
                            let path = path.clone();
                            let build: DirectBuilder = Box::new(move || {
                                let args = part_args("client", &path)?;
                                direct_settings(args, &Given(None)).map(direct_part)
                            });
                            run_direct(settings, Some((config.clone(), build))).await
                        }
                        None => Ok(()),
                    }
                };
                tokio::try_join!(server, client, direct).map(drop)
            })
        }
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Args::command(), "amb", &mut std::io::stdout());
            Ok(())
        }
        Command::Man => clap_mangen::Man::new(Args::command())
            .render(&mut std::io::stdout())
            .context("writing the man page"),
    }
}

fn runtime(threads: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    // Every carried connection costs descriptors on both sides: use all the system allows.
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::warn!("could not raise the open-file limit: {e}");
    }
    let mut builder = match threads {
        Some(0) => bail!("--threads must be at least 1"),
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None if small_machine() => tokio::runtime::Builder::new_current_thread(),
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    builder
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Whether this machine has at most two CPUs for us.
fn small_machine() -> bool {
    std::thread::available_parallelism().map_or(true, |n| n.get() <= 2)
}

fn run_certs(cmd: CertsCommand) -> anyhow::Result<()> {
    let written = match cmd {
        CertsCommand::Init {
            dir,
            server_names,
            client_names,
            force,
        } => amb_pki::init_dev_pki(&InitOptions {
            dir,
            server_names,
            client_names,
            force,
        })?,
        CertsCommand::Issue {
            dir,
            server,
            client,
            sans,
            days,
            force,
        } => {
            let (role, name) = match (server, client) {
                (Some(name), None) => (LeafRole::Server, name),
                (None, Some(name)) => (LeafRole::Client, name),
                _ => bail!("give exactly one of --server NAME or --client NAME"),
            };
            amb_pki::issue_leaf_in_dir(&dir, role, &name, &sans, days, force)?
        }
    };
    for path in written {
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// `amb check`: the file as `amb run` would read it, then each part's certificate files as a
/// handshake would verify them. Findings go to stdout, one line each.
/// `amb check`: the parts a config file holds, or the one its subcommand's flags describe.
fn check(args: CheckArgs, matches: &ArgMatches) -> anyhow::Result<()> {
    let flags = matches.subcommand_matches("check");
    let given = |part: &str| Given(flags.and_then(|m| m.subcommand_matches(part)));
    let config_flag =
        flags.and_then(|m| m.value_source("config")) == Some(ValueSource::CommandLine);
    if args.part.is_some() && config_flag {
        bail!(
            "--config goes after `server` or `client` there (amb check client --config FILE ...)"
        );
    }
    let (what, parts) = match args.part {
        Some(CheckPart::Server(server)) => (
            "amb server".to_owned(),
            vec![(
                "server",
                server_settings(*server, &given("server")).map(PartSettings::Server),
            )],
        ),
        Some(CheckPart::Client(client)) => {
            let direct = client.tls_upstream.is_some()
                || client_part(client.config.as_deref())
                    .is_ok_and(|file| file.tls_upstream.is_some());
            let settings = if direct {
                direct_settings(*client, &given("client")).map(PartSettings::Direct)
            } else {
                client_settings(*client, &given("client")).map(PartSettings::Client)
            };
            ("amb client".to_owned(), vec![("client", settings)])
        }
        None => {
            let Some(config) = args.config else {
                bail!("give --config FILE, or `amb check server|client` with that command's flags");
            };
            let file = ConfigFile::load(&config)?;
            let path = config.display().to_string();
            let mut parts = Vec::new();
            if file.server.is_some() {
                let settings = server_settings(part_args("server", &path)?, &Given(None));
                parts.push(("server", settings.map(PartSettings::Server)));
            }
            if let Some(client) = &file.client {
                let settings = if client.tls_upstream.is_some() {
                    direct_settings(part_args("client", &path)?, &Given(None))
                        .map(PartSettings::Direct)
                } else {
                    client_settings(part_args("client", &path)?, &Given(None))
                        .map(PartSettings::Client)
                };
                parts.push(("client", settings));
            }
            if parts.is_empty() {
                bail!("{path}: neither a [server] nor a [client] part: nothing to check");
            }
            (path, parts)
        }
    };
    let mut findings = Vec::new();
    let mut settings = Vec::new();
    for (part, resolved) in parts {
        match resolved {
            Ok(resolved) => settings.push(resolved),
            Err(e) => findings.push(Finding {
                severity: Severity::Error,
                message: format!("[{part}]: {e:#}"),
            }),
        }
    }
    let client = settings.iter().find_map(|part| match part {
        PartSettings::Client(c) => Some(c),
        _ => None,
    });
    for part in &settings {
        match part {
            PartSettings::Server(s) => {
                let names = names_clients_use(s, client, &this_host_name());
                findings.extend(amb_pki::check_files(&s.tls, LeafRole::Server, &names));
            }
            PartSettings::Client(c) => {
                findings.extend(amb_pki::check_files(&c.tls, LeafRole::Client, &[]))
            }
            // Its CA, and its certificate and key when it has them, were read and checked as
            // its settings resolved (against the service's CA, not amb's).
            PartSettings::Direct(_) => {}
        }
    }
    let files_ok = findings.iter().all(|f| f.severity != Severity::Error);
    if args.connect && files_ok {
        let runtime = runtime(None)?;
        for part in &settings {
            findings.extend(runtime.block_on(connect(part))?);
        }
    }
    for finding in &findings {
        println!("{finding}");
    }
    let errors = findings
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .count();
    if errors > 0 {
        bail!("{what}: {errors} error(s)");
    }
    println!("ok: {what} ({} warning(s))", findings.len());
    Ok(())
}

/// The names clients will dial this server by, where the configuration says them: the host it
/// advertises in a registry, and the hosts of the same file's client peers that point at it
/// (loopback, its listen address or `this_host`, on its listen port); a client's pinned
/// `--server-name` stands for the host it is given for.
fn names_clients_use(
    server: &ServerSettings,
    client: Option<&ClientSettings>,
    this_host: &str,
) -> Vec<String> {
    let advertised = (server.register.as_ref())
        .and_then(|r| r.advertise.as_deref())
        .and_then(HostPort::parse);
    let mut names: Vec<String> = advertised.map(|a| a.host()).into_iter().collect();
    if let (Some(client), Some(listen)) = (client, server.listen) {
        let points_here = |peer: &HostPort| {
            peer.port() == listen.port()
                && match peer {
                    HostPort::Addr(a) => a.ip().is_loopback() || a.ip() == listen.ip(),
                    HostPort::Name { host, .. } => {
                        host == "localhost" || host.eq_ignore_ascii_case(this_host)
                    }
                }
        };
        let peers = (client.peers.iter()).chain(client.listens.iter().flat_map(|l| &l.peers));
        for peer in peers.filter_map(PeerSpec::addr).filter(|p| points_here(p)) {
            names.push(client.server_name.clone().unwrap_or_else(|| peer.host()));
        }
    }
    names.sort();
    names.dedup();
    names
}

/// This machine's host name, as clients on it may dial it.
fn this_host_name() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

/// `amb check --connect` for one part: a client's peers, each dialed once (what answered is
/// printed); a server's upstreams, each dialed once. Returns a finding per failure.
async fn connect(part: &PartSettings) -> anyhow::Result<Vec<Finding>> {
    let failed = |message: String| Finding {
        severity: Severity::Error,
        message,
    };
    let mut findings = Vec::new();
    match part {
        PartSettings::Client(settings) => {
            for probe in amb_engine::probe_peers(settings).await? {
                let (peer, transport) = (&probe.peer, probe.transport);
                match probe.outcome {
                    Ok((addr, presented)) => {
                        let presented = presented
                            .as_ref()
                            .map(amb_pki::describe_certificate)
                            .unwrap_or_else(|| "no certificate".to_owned());
                        println!("ok: peer {peer} ({transport}) at {addr}: handshake passed; presented {presented}");
                    }
                    Err(why) => findings.push(failed(format!(
                        "peer {peer} ({transport}): no handshake passed: {why}"
                    ))),
                }
            }
        }
        PartSettings::Direct(settings) => {
            let service = &settings.service;
            match amb_engine::probe_service(settings).await {
                Ok(()) => println!("ok: tls-upstream {service}: handshake passed"),
                Err(why) => findings.push(failed(format!(
                    "tls-upstream {service}: no handshake passed: {why}"
                ))),
            }
        }
        PartSettings::Server(settings) => {
            let resolver = Resolver::new(settings.dns_server, settings.etcd_tls.clone());
            let probes =
                amb_engine::probe_upstreams(&settings.routes, settings.connect_timeout, &resolver);
            for probe in probes.await {
                let (route, upstream) = (&probe.route, &probe.upstream);
                match probe.outcome {
                    Ok(()) => {
                        println!("ok: route {route}: upstream {upstream} accepted a connection")
                    }
                    Err(why) => findings.push(failed(format!(
                        "route {route}: upstream {upstream} did not accept a connection: {why}"
                    ))),
                }
            }
        }
    }
    Ok(findings)
}

/// The arguments of `amb SUBCOMMAND --config FILE` with nothing else given, for `amb run`: the
/// file's values win, the flags' defaults fill in the rest. `AMB_*` variables are not read:
/// they name one part's settings (`AMB_LISTEN` is a server's ADDR:PORT and a client's PORT),
/// and the file describes both.
fn part_args<T: FromArgMatches>(subcommand: &str, config: &str) -> anyhow::Result<T> {
    let command = Args::command().mut_subcommand(subcommand, |part| {
        part.mut_args(|arg| arg.env(None::<&str>))
    });
    let matches = command.try_get_matches_from(["amb", subcommand, "--config", config])?;
    let part = matches
        .subcommand_matches(subcommand)
        .with_context(|| format!("amb {subcommand}: no arguments"))?;
    Ok(T::from_arg_matches(part)?)
}

/// The server's settings: its flags and variables over its config file's [server] part.
fn server_settings(args: ServerArgs, given: &Given<'_>) -> anyhow::Result<ServerSettings> {
    let file = match &args.config {
        Some(path) => ConfigFile::load(path)?
            .server
            .with_context(|| format!("{}: no [server] part", path.display()))?,
        None => ServerFile::default(),
    };
    // The file's routes, then the flags': a flag's route replaces the file's of that name
    // (keeping its allow-list, if it has one).
    let health = given
        .pick(
            "health_check",
            args.health_check,
            file.health_check.map(|k| Some(k.0)),
        )
        .map(|kind| HealthCheck {
            kind,
            interval: given.pick(
                "health_interval",
                args.health_interval,
                file.health_interval.map(|d| d.get()),
            ),
        });
    let defaults = RouteDefaults {
        balance: given.pick("balance", args.balance, file.balance.map(|b| b.0)),
        health,
    };
    let spread = |mut set: UpstreamSetSpec| {
        set.balance = defaults.balance;
        set.health = defaults.health;
        set
    };
    let mut routes = BTreeMap::new();
    let mut restricted = Vec::new();
    if let Some(upstream) = file.upstream {
        routes.insert(RouteName::default_route(), spread(upstream.0));
    }
    for route in file.routes {
        let mut set = route.upstream_set(&defaults).map_err(anyhow::Error::msg)?;
        let name = route.name.into_inner().0;
        if let Some(auth) = &route.redis_auth {
            set.redis_auth = Some(redis_auth(&name, auth.get_ref())?);
        }
        if let Some(tls) = &route.upstream_tls {
            let what = format!("route {name}: upstream-tls");
            set.tls = Some(upstream_tls(&what, &set, tls.get_ref())?);
        }
        if let Some(allow) = &route.allow {
            restricted.push((name.clone(), config::allow_list(allow)?));
        }
        routes.insert(name, set);
    }
    let mut from_flags = BTreeMap::new();
    if let Some(upstream) = args.upstream {
        from_flags.insert(RouteName::default_route(), spread(upstream));
    }
    for RouteSpec { name, upstream } in args.routes {
        if from_flags.insert(name.clone(), spread(upstream)).is_some() {
            bail!("route {name} is given twice (note: --upstream is the route named `default`)");
        }
    }
    if args.from_env {
        for link in docker_links_from_env()? {
            let upstream = link.addr.to_string().parse().map_err(anyhow::Error::msg)?;
            if from_flags
                .insert(link.route.clone(), spread(upstream))
                .is_some()
            {
                bail!(
                    "--from-env: {link}: route {} is also given by a flag or another variable",
                    link.route
                );
            }
        }
    }
    routes.extend(from_flags);
    if routes.is_empty() {
        bail!("no upstream: give --upstream HOST:PORT or --route NAME=HOST:PORT (or routes in --config)");
    }
    let file_allow = file.allow.map(|list| {
        let entries = list.into_inner().into_iter();
        entries.map(|san| san.0).collect()
    });
    let allow = given.pick("allow", args.allow, file_allow);
    let allow = if allow.is_empty() {
        None
    } else {
        Some(AllowList::new(allow)?)
    };
    let mut table = RouteTable::new(routes, allow);
    for (name, allow) in restricted {
        table.restrict(&name, allow);
    }
    let file_transport = file.transport.map(|t| match t {
        config::ServerTransport::Quic => ServerTransportArg::Quic,
        config::ServerTransport::Tls => ServerTransportArg::Tls,
        config::ServerTransport::Both => ServerTransportArg::Both,
    });
    let file_listen = file.listen.as_ref().map(|l| l.0);
    let listen = given.pick("listen", args.listen, file_listen);
    let file_peers: Vec<PeerSpec> = file.peers.iter().flatten().map(|p| p.0.clone()).collect();
    let flag_peers = args.peer.into_iter().flat_map(|list| list.0).collect();
    let peers: Vec<PeerSpec> = given.pick(
        "peer",
        flag_peers,
        Some(file_peers).filter(|p| !p.is_empty()),
    );
    if let Some(set) = peers.iter().find(|p| p.addr().is_none()) {
        bail!("--peer {set}: a server dials app sides at HOST:PORT, not a discovered set");
    }
    // Dialing out, the server listens only where told to.
    let listens = peers.is_empty() || given.given("listen") || file_listen.is_some();
    let register = given.pick("register", args.register, file.register.map(|r| Some(r.0)));
    let advertise = given.pick("advertise", args.advertise, file.advertise.map(Some));
    let register = match (register, advertise) {
        (None, _) => None,
        (Some(key), Some(advertise)) => {
            if HostPort::parse(&advertise).is_none() {
                bail!("--advertise {advertise:?} is not HOST:PORT (the address clients dial)");
            }
            Some(Registration {
                key,
                advertise: Some(advertise),
            })
        }
        (Some(_), None) if listen.ip().is_unspecified() => {
            bail!("--register needs --advertise HOST:PORT: --listen {listen} says no address clients could dial")
        }
        (Some(key), None) => Some(Registration {
            key,
            advertise: None,
        }),
    };
    let (certs, limits) = certs_and_limits!(file);
    let (metrics_listen, access_log) =
        args.observe
            .resolve(given, file.metrics.map(|a| a.0), file.access_log);
    let (tls, reload_check) = args.certs.resolve(given, "server", certs)?;
    let (limits, max_connections) = args.limits.resolve(given, limits);
    Ok(ServerSettings {
        listen: listens.then_some(listen),
        peers,
        transports: match given.pick("transport", args.transport, file_transport) {
            ServerTransportArg::Quic => ServerTransports::Quic,
            ServerTransportArg::Tls => ServerTransports::Tls,
            ServerTransportArg::Both => ServerTransports::Both,
        },
        tls,
        reload_check,
        routes: table,
        limits,
        connect_timeout: given.pick(
            "connect_timeout",
            args.connect_timeout,
            file.connect_timeout.map(|d| d.get()),
        ),
        max_connections,
        dns_server: given.pick(
            "dns_server",
            args.dns_server,
            file.dns_server.map(|a| Some(a.0)),
        ),
        etcd_tls: args
            .etcd
            .resolve(given, [file.etcd_ca, file.etcd_cert, file.etcd_key]),
        register,
        metrics: process_metrics(),
        metrics_listen,
        access_log,
        tls_route: given.pick("tls_route", args.tls_route, file.tls_route.map(|r| r.0)),
    })
}

/// This process's Docker-links variables (`--from-env`); an error lists each malformed one.
fn docker_links_from_env() -> anyhow::Result<Vec<DockerLink>> {
    let vars = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)));
    let links = docker_links(vars).map_err(|errors| {
        let lines: Vec<String> = errors.iter().map(|e| format!("  {e}")).collect();
        anyhow::anyhow!(
            "--from-env: malformed Docker-links variables:\n{}",
            lines.join("\n")
        )
    })?;
    if links.is_empty() {
        bail!("--from-env: no Docker-links variable (ALIAS_PORT_6379_TCP=tcp://HOST:PORT) is set");
    }
    Ok(links)
}

/// A route's `redis-auth`, its password read now (each reload reads it again).
fn redis_auth(route: &RouteName, auth: &config::RedisAuthFile) -> anyhow::Result<RedisAuth> {
    let password = match auth.password_source().map_err(anyhow::Error::msg)? {
        config::PasswordSource::File(path) => amb_pki::read_secret(path)
            .with_context(|| format!("route {route}: redis-auth password-file"))?,
        config::PasswordSource::Env(name) => std::env::var(name).with_context(|| {
            format!("route {route}: redis-auth password-env: {name} is not set (or not UTF-8)")
        })?,
    };
    Ok(RedisAuth {
        user: auth.user.clone(),
        password: Secret::new(password),
    })
}

/// Client-only mode's settings (`--tls-upstream`).
fn direct_settings(args: ClientArgs, given: &Given<'_>) -> anyhow::Result<DirectSettings> {
    let file = client_part(args.config.as_deref())?;
    let listens = listeners(given, args.listens, &file)?;
    if listens.iter().any(|l| !l.peers.is_empty()) || !file.peer_list().is_empty() {
        bail!("tls-upstream carries app connections straight to the TLS service: give no peer");
    }
    let file_service = file.tls_upstream.clone().map(|s| Some(s.0));
    let mut service = given
        .pick("tls_upstream", args.tls_upstream, file_service)
        .context("client-only mode needs --tls-upstream")?;
    let (certs, limits) = certs_and_limits!(file);
    let (limits, max_connections) = args.limits.resolve(given, limits);
    let (metrics_listen, access_log) =
        args.observe
            .resolve(given, file.metrics.map(|a| a.0), file.access_log);
    // The CA from --ca or the certs directory; a client certificate only when both --cert and
    // --key say so (a TLS service need not ask for one).
    let certs_dir = given.pick("certs_dir", args.certs.certs_dir, certs.certs_dir);
    let tls = config::UpstreamTlsFile {
        ca: args
            .certs
            .ca
            .or(certs.ca)
            .unwrap_or_else(|| certs_dir.join("ca.pem")),
        server_name: given.pick("server_name", args.server_name, file.server_name.map(Some)),
        cert: args.certs.cert.or(certs.cert),
        key: args.certs.key.or(certs.key),
    };
    service.tls = Some(upstream_tls("--tls-upstream", &service, &tls)?);
    Ok(DirectSettings {
        service,
        listens,
        connect_timeout: limits.handshake_timeout,
        max_connections,
        drain_timeout: limits.drain_timeout,
        dns_server: given.pick(
            "dns_server",
            args.dns_server,
            file.dns_server.map(|a| Some(a.0)),
        ),
        metrics: process_metrics(),
        metrics_listen,
        access_log,
        reload_check: Some(given.pick("reload_check", args.certs.reload_check, certs.reload_check))
            .filter(|d| !d.is_zero()),
    })
}

/// TLS to a service (a route's `upstream-tls`, or `--tls-upstream`), its files read and
/// checked now (each reload reads them again); `what` names the setting in errors.
fn upstream_tls(
    what: &str,
    set: &UpstreamSetSpec,
    file: &config::UpstreamTlsFile,
) -> anyhow::Result<UpstreamTls> {
    let context = || what.to_owned();
    let identity = file
        .identity()
        .map_err(anyhow::Error::msg)
        .with_context(context)?;
    let files = amb_pki::ServiceTlsFiles {
        ca: file.ca.clone(),
        identity: identity.map(|(cert, key)| (cert.to_owned(), key.to_owned())),
    };
    // Every upstream must have a name to verify, before anything is bound.
    let connector = amb_engine::TlsConnector::new(&files, file.server_name.as_deref())
        .map_err(anyhow::Error::msg)
        .with_context(context)?;
    for member in set.members() {
        connector
            .name_for(&member.upstream)
            .map_err(anyhow::Error::msg)
            .with_context(context)?;
    }
    Ok(UpstreamTls {
        digest: files.digest().with_context(context)?,
        ca: files.ca,
        server_name: file.server_name.clone(),
        identity: files.identity,
    })
}

/// Builds a server's routes and the app sides it dials again from its config file.
type RouteBuilder = Box<dyn Fn() -> anyhow::Result<reconfigure::ServerPart> + Send + Sync>;

/// What a reload of a server's file swaps in.
fn server_part(settings: ServerSettings) -> reconfigure::ServerPart {
    (settings.routes, settings.peers)
}
/// Builds a client's listeners, default peers and accept allow-list again from its config file.
type ListenerBuilder = Box<dyn Fn() -> anyhow::Result<reconfigure::ListenersPart> + Send + Sync>;

/// What a reload of a client's file swaps in.
fn listeners_part(settings: ClientSettings) -> reconfigure::ListenersPart {
    let allow = settings.accept.map(|accept| accept.allow);
    (settings.listens, settings.peers, allow)
}

/// A reloaded setting's key and its value, as compared between loads.
type Setting = (&'static str, String);

/// The keys shared by both parts that a reload does not apply: they take effect at a restart.
fn restart_only_common(
    tls: &TlsFiles,
    limits: &Limits,
    (max_connections, reload_check): (usize, Option<Duration>),
    (dns_server, metrics_listen, access_log): (Option<SocketAddr>, Option<SocketAddr>, bool),
) -> Vec<Setting> {
    vec![
        ("cert", format!("{:?}", tls.cert)),
        ("key", format!("{:?}", tls.key)),
        ("ca", format!("{:?}", tls.ca)),
        ("max-streams", limits.max_streams_per_connection.to_string()),
        (
            "handshake-timeout",
            format!("{:?}", limits.handshake_timeout),
        ),
        ("idle-timeout", format!("{:?}", limits.idle_timeout)),
        ("drain-timeout", format!("{:?}", limits.drain_timeout)),
        ("max-connections", max_connections.to_string()),
        ("reload-check", format!("{reload_check:?}")),
        ("dns-server", format!("{dns_server:?}")),
        ("metrics", format!("{metrics_listen:?}")),
        ("access-log", access_log.to_string()),
    ]
}

/// A server's settings that a reload does not apply.
fn restart_only_server(s: &ServerSettings) -> Vec<Setting> {
    let mut settings = vec![
        ("listen", format!("{:?}", s.listen)),
        ("transport", format!("{:?}", s.transports)),
        ("connect-timeout", format!("{:?}", s.connect_timeout)),
        ("register", format!("{:?}", s.register)),
        ("tls-route", s.tls_route.to_string()),
    ];
    let (limits, counts) = (&s.limits, (s.max_connections, s.reload_check));
    let observe = (s.dns_server, s.metrics_listen, s.access_log);
    settings.extend(restart_only_common(&s.tls, limits, counts, observe));
    settings
}

/// A client's settings that a reload does not apply.
fn restart_only_client(c: &ClientSettings) -> Vec<Setting> {
    let mut settings = vec![
        ("peer-balance", format!("{:?}", c.peer_balance)),
        ("server-name", format!("{:?}", c.server_name)),
        ("transport", format!("{:?}", c.transport)),
        ("connections", c.connections.to_string()),
        ("tunnel-wait", format!("{:?}", c.tunnel_wait)),
        ("accept", format!("{:?}", c.accept.as_ref().map(|a| a.addr))),
    ];
    let (limits, counts) = (&c.limits, (c.max_connections, c.reload_check));
    let observe = (c.dns_server, c.metrics_listen, c.access_log);
    settings.extend(restart_only_common(&c.tls, limits, counts, observe));
    settings
}

/// Warns, once per reload, of the keys the reloaded file changed that only a restart applies
/// (the running process keeps its values for them).
fn warn_restart_only(part: &str, running: &[Setting], reloaded: &[Setting]) {
    let changed: Vec<&str> = (running.iter().zip(reloaded))
        .filter(|(old, new)| old != new)
        .map(|(old, _)| old.0)
        .collect();
    if !changed.is_empty() {
        let keys = changed.join(", ");
        tracing::warn!(
            part,
            keys,
            "changed in the config file; a reload does not apply them, a restart does"
        );
    }
}

/// A server's routes and peers built again from its file, warning of what only a restart
/// applies.
fn server_reload(
    running: &ServerSettings,
    build: impl Fn() -> anyhow::Result<ServerSettings> + Send + Sync + 'static,
) -> RouteBuilder {
    let running = restart_only_server(running);
    Box::new(move || {
        let settings = build()?;
        warn_restart_only("server", &running, &restart_only_server(&settings));
        Ok(server_part(settings))
    })
}

/// A client's listeners built again from its file, warning of what only a restart applies.
fn client_reload(
    running: &ClientSettings,
    build: impl Fn() -> anyhow::Result<ClientSettings> + Send + Sync + 'static,
) -> ListenerBuilder {
    let running = restart_only_client(running);
    Box::new(move || {
        let settings = build()?;
        warn_restart_only("client", &running, &restart_only_client(&settings));
        Ok(listeners_part(settings))
    })
}

/// Runs a server; with `config` (its file, and how to build routes from it) the routes follow
/// the file.
async fn run_server(
    settings: ServerSettings,
    config: Option<(PathBuf, RouteBuilder)>,
) -> anyhow::Result<()> {
    let check_every = settings.reload_check;
    let server = Server::bind(settings)?;
    let config =
        config.map(|(path, build)| reconfigure::server_routes(path, build, server.routes()));
    keep_current(server.reload(), config, check_every);
    server.run(shutdown_signal()).await;
    Ok(())
}

/// The client's settings: its flags and variables over its config file's [client] part.
/// The config file's `[client]` part (empty without a file).
fn client_part(config: Option<&Path>) -> anyhow::Result<ClientFile> {
    Ok(match config {
        Some(path) => ConfigFile::load(path)?
            .client
            .with_context(|| format!("{}: no [client] part", path.display()))?,
        None => ClientFile::default(),
    })
}

/// The listeners: the flags' (or variables'), else the file's.
fn listeners(
    given: &Given<'_>,
    flags: Vec<ListenerSpec>,
    file: &ClientFile,
) -> anyhow::Result<Vec<ListenerSpec>> {
    let file_listens = file
        .listeners
        .iter()
        .map(ListenerFile::spec)
        .collect::<Result<Vec<_>, _>>()
        .map_err(anyhow::Error::msg)?;
    Ok(given.pick(
        "listens",
        flags,
        Some(file_listens).filter(|l| !l.is_empty()),
    ))
}

fn client_settings(args: ClientArgs, given: &Given<'_>) -> anyhow::Result<ClientSettings> {
    let file = client_part(args.config.as_deref())?;
    let file_transport = file.transport.map(|t| match t {
        config::ClientTransport::Quic => ClientTransportArg::Quic,
        config::ClientTransport::Tls => ClientTransportArg::Tls,
        config::ClientTransport::Auto => ClientTransportArg::Auto,
    });
    let transport = match given.pick("transport", args.transport, file_transport) {
        ClientTransportArg::Quic => ClientTransport::Quic,
        ClientTransportArg::Tls => ClientTransport::Tls,
        ClientTransportArg::Auto => ClientTransport::Auto,
    };
    let mut listens = listeners(given, args.listens, &file)?;
    if args.from_env {
        for link in docker_links_from_env()? {
            let peer = link.addr.to_string().parse().map_err(anyhow::Error::msg)?;
            listens.push(ListenerSpec {
                addr: SocketAddr::new(args.listen_addr, link.port),
                route: link.route,
                peers: vec![peer],
            });
        }
    }
    let file_peers = Some(file.peer_list()).filter(|p| !p.is_empty());
    let flag_peers = args.peer.into_iter().flat_map(|list| list.0).collect();
    let peers = given.pick("peer", flag_peers, file_peers);
    let accept = given.pick(
        "accept",
        args.accept,
        file.accept.as_ref().map(|a| Some(a.0)),
    );
    if peers.is_empty() && accept.is_none() && listens.iter().any(|l| l.peers.is_empty()) {
        bail!("no peer: give --peer HOST:PORT, or --accept ADDR:PORT for service-side ambassadors to connect to (or `peer` / `accept` in the [client] part of --config)");
    }
    let file_allow = file.allow.as_ref().map(|list| {
        let entries = list.get_ref().iter();
        entries.map(|san| san.0.clone()).collect()
    });
    let allow = AllowList::new(given.pick("allow", args.allow, file_allow))?;
    let accept = accept.map(|addr| AcceptSettings { addr, allow });
    if let Some(accept) = &accept {
        accept.validate()?;
    }
    let peer_balance = given.pick(
        "peer_balance",
        args.peer_balance,
        file.peer_balance.map(|b| b.0),
    );
    let (certs, limits) = certs_and_limits!(file);
    let (metrics_listen, access_log) =
        args.observe
            .resolve(given, file.metrics.map(|a| a.0), file.access_log);
    let (tls, reload_check) = args.certs.resolve(given, "client", certs)?;
    let (limits, max_connections) = args.limits.resolve(given, limits);
    let connections = given.pick("connections", args.connections, file.connections.map(Some));
    Ok(ClientSettings {
        peers,
        peer_balance,
        server_name: given.pick("server_name", args.server_name, file.server_name.map(Some)),
        transport,
        tls,
        reload_check,
        listens,
        limits,
        connections: connections.unwrap_or(match transport {
            ClientTransport::Quic | ClientTransport::Auto => 1,
            ClientTransport::Tls => 2,
        }),
        tunnel_wait: given.pick(
            "tunnel_wait",
            args.tunnel_wait,
            file.tunnel_wait.map(|d| d.get()),
        ),
        max_connections,
        dns_server: given.pick(
            "dns_server",
            args.dns_server,
            file.dns_server.map(|a| Some(a.0)),
        ),
        etcd_tls: args
            .etcd
            .resolve(given, [file.etcd_ca, file.etcd_cert, file.etcd_key]),
        metrics: process_metrics(),
        metrics_listen,
        access_log,
        accept,
    })
}

/// Runs a client; with `config` (its file, and how to build listeners from it) the listeners
/// follow the file.
async fn run_client(
    settings: ClientSettings,
    config: Option<(PathBuf, ListenerBuilder)>,
) -> anyhow::Result<()> {
    let check_every = settings.reload_check;
    let client = Client::bind(settings)?;
    let config =
        config.map(|(path, build)| reconfigure::client_part(path, build, client.listeners()));
    keep_current(client.reload(), config, check_every);
    client.run(shutdown_signal()).await;
    Ok(())
}

/// Runs a client in client-only mode until SIGINT or SIGTERM; with `config`, its listeners
/// and service follow the file.
async fn run_direct(
    settings: DirectSettings,
    config: Option<(PathBuf, DirectBuilder)>,
) -> anyhow::Result<()> {
    let check_every = settings.reload_check;
    let client = DirectClient::bind(settings)?;
    let config =
        config.map(|(path, build)| reconfigure::client_part(path, build, client.listeners()));
    keep_current(amb_engine::Reload::default(), config, check_every);
    client.run(shutdown_signal()).await;
    Ok(())
}

/// Builds a client-only process's listeners and service again from its config file.
type DirectBuilder = Box<dyn Fn() -> anyhow::Result<reconfigure::DirectPart> + Send + Sync>;

/// What a reload of a client-only file swaps in.
fn direct_part(settings: DirectSettings) -> reconfigure::DirectPart {
    (settings.listens, settings.service)
}

/// Resolves at the first SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("signal received: draining");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("10").is_err() && parse_duration("s").is_err());
    }
}
