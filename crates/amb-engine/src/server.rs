//! The server ambassador: accept tunnel streams, decide, dial the upstream, relay.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use amb_metrics::{ConnectionEnd, Direction, Metrics, Readiness, Side};
use amb_pki::TlsFiles;
use amb_proto::{
    Dialer, FailedHandshake, IncomingStream, Limits, OnFailedHandshake, PeerIdentity, Refusal,
    RouteChange, RouteName, RouteTable, ServerConnection, Serving, StreamError, ALPN_H2,
    ALPN_H2_REVERSE, ALPN_QUIC, ALPN_QUIC_REVERSE,
};
use amb_quic::{QuicServer, QuicServingDialer, ResetKey};
use amb_spec::{EtcdKey, PeerSpec, UpstreamSetSpec, UpstreamSpec};
use amb_tls::{RawTls, TlsServer, TlsServingDialer};
use arc_swap::ArcSwap;
use tokio::sync::{watch, Semaphore};
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::access::Access;
use crate::client::PeerLink;
use crate::endpoints::{peer_source, EtcdTls, Origin, Resolver, UpstreamStream};
use crate::lifecycle::{serve_connection, Admission, ConnCtx};
use crate::relay::{relay, relay_io, RelayError, Relayed};
use crate::reload::{Certs, Reload};
use crate::reverse::keep_dialed;
use crate::tally::{DrainWatch, StreamEnd};
use crate::throttle::{LogThrottle, LogThrottles};
use crate::upstream::Upstream;
use crate::upstream_set::UpstreamSet;
use crate::{bind_tcp, EngineError, MetricsEndpoint};

/// Which transports the server listens with; `Both` shares one port number over TCP and UDP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerTransports {
    /// UDP only.
    Quic,
    /// TCP only.
    Tls,
    /// TCP and UDP on the same port.
    Both,
}

/// Everything the server needs.
#[derive(Clone, Debug)]
pub struct ServerSettings {
    /// Where to listen (TCP and/or UDP); `None`: nowhere (the server only dials `peers`).
    pub listen: Option<SocketAddr>,
    /// App sides to dial (reverse tunnels): each is kept connected, and serves the streams
    /// its app side opens as a listener's connections are served.
    pub peers: Vec<PeerSpec>,
    /// Transports to serve (and to dial `peers` with).
    pub transports: ServerTransports,
    /// Certificate, key and client CA.
    pub tls: TlsFiles,
    /// Routes and the allow-list.
    pub routes: RouteTable<UpstreamSetSpec>,
    /// Per-connection bounds.
    pub limits: Limits,
    /// How long an upstream dial may take.
    pub connect_timeout: Duration,
    /// Streams relayed at once across all tunnel connections; more are refused as unavailable.
    pub max_connections: usize,
    /// How often the certificate files are checked for a change; `None`: only on request.
    pub reload_check: Option<Duration>,
    /// The DNS server names and SRV records are looked up at; `None`: the system's.
    pub dns_server: Option<SocketAddr>,
    /// How `etcds://` registries (routes' upstreams, `--register`) are reached.
    pub etcd_tls: EtcdTls,
    /// Where the server registers its tunnel address while it runs, if anywhere.
    pub register: Option<Registration>,
    /// What the server counts into (and `/readyz` asks).
    pub metrics: Arc<Metrics>,
    /// Where `/metrics`, `/healthz` and `/readyz` are served while the server runs, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// One `info` line per stream when it ends.
    pub access_log: bool,
    /// Where a standard TLS client's connection (no ALPN) goes when its SNI names no route.
    pub tls_route: RouteName,
}

/// A server's entry in an etcd registry: `key` = `advertise`, under a lease renewed while the
/// server runs and deleted when it shuts down.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    /// The key (`/PREFIX/NAME`) and the cluster.
    pub key: EtcdKey,
    /// The address clients dial, `HOST:PORT`; `None`: the address the server listens on.
    pub advertise: Option<String>,
}

struct Context {
    limits: Limits,
    trust: watch::Receiver<u64>,
    slots: Arc<Semaphore>,
    throttle: LogThrottle,
    /// Refusals logged at most once a second per route and reason.
    refusals: LogThrottles<(String, &'static str)>,
    /// The routes streams are decided by; swapped whole by [`Routes::replace`].
    routes: ArcSwap<RouteTable<UpstreamSet>>,
    /// What the running routes were built from, for the next replacement's diff.
    specs: Mutex<RouteTable<UpstreamSetSpec>>,
    /// Moves after each replacement of the routes: connections check their streams.
    reconfigured: watch::Sender<u64>,
    connect_timeout: Duration,
    /// Looks up upstream names and discovered sets.
    resolver: Resolver,
    stopping: watch::Receiver<bool>,
    live: TaskTracker,
    metrics: Arc<Metrics>,
    access_log: bool,
    /// The app sides it dials (reverse tunnels), changed by [`Routes::replace_peers`].
    dial_out: Mutex<DialOut>,
}

/// A bound server, ready to run.
pub struct Server {
    ctx: Arc<Context>,
    stop: watch::Sender<bool>,
    quic: Option<QuicServer>,
    tls: Option<TlsServer>,
    local_addr: SocketAddr,
    drain_timeout: Duration,
    certs: Certs<amb_pki::rustls::ServerConfig>,
    reload: Reload,
    reload_check: Option<Duration>,
    register: Option<Registration>,
    endpoint: MetricsEndpoint,
    /// The configurations it dials app sides with, and the app sides to dial first.
    dial_out: (Certs<amb_pki::rustls::ClientConfig>, Vec<PeerSpec>),
    /// Whether it listens.
    listens: bool,
}

/// The app sides a server dials (reverse tunnels): how, and each one's stop. A stopped app
/// side is no longer dialed and its tunnel connections drain.
struct DialOut {
    transports: ServerTransports,
    /// QUIC's and TLS's configurations, kept current, and their trust generation.
    configs: [Option<watch::Receiver<Arc<amb_pki::rustls::ClientConfig>>>; 2],
    trust: watch::Receiver<u64>,
    running: HashMap<PeerSpec, watch::Sender<bool>>,
    dialers: TaskTracker,
}

impl Server {
    /// Loads certificates, then binds. Must be called within a Tokio runtime.
    pub fn bind(settings: ServerSettings) -> Result<Self, EngineError> {
        let limits = settings.limits;
        let want_tls = settings.transports != ServerTransports::Quic;
        let want_quic = settings.transports != ServerTransports::Tls;
        // Certificates first: a missing file is the likelier mistake and the clearer message.
        let listens = settings.listen.is_some();
        let alpns: Vec<&'static [u8]> = [(want_tls, ALPN_H2), (want_quic, ALPN_QUIC)]
            .into_iter()
            .filter_map(|(wanted, alpn)| (wanted && listens).then_some(alpn))
            .collect();
        let certs = Certs::load(settings.tls.clone(), amb_pki::server_config, &alpns)?
            .counted_in(&settings.metrics, Side::Server);
        let dials = !settings.peers.is_empty();
        let reverse: Vec<&'static [u8]> =
            [(want_quic, ALPN_QUIC_REVERSE), (want_tls, ALPN_H2_REVERSE)]
                .into_iter()
                .filter_map(|(wanted, alpn)| (wanted && dials).then_some(alpn))
                .collect();
        let dial_certs = Certs::load(settings.tls.clone(), amb_pki::reverse_dial_config, &reverse)?;

        let listen = settings
            .listen
            .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
        let mut local_addr = listen;
        let tls = match certs.subscribe(ALPN_H2) {
            Some(config) => {
                let listener = bind_tcp(listen)?;
                local_addr = listener.local_addr().map_err(|source| EngineError::Bind {
                    addr: listen,
                    proto: "tcp",
                    source,
                })?;
                let failed = on_failed_handshake(&settings.metrics);
                Some(TlsServer::new(
                    listener,
                    config,
                    certs.trust(),
                    limits,
                    failed,
                ))
            }
            None => None,
        };
        let quic = match certs.subscribe(ALPN_QUIC) {
            Some(config) => {
                // With both transports, UDP takes the port TCP got (which matters for port 0).
                let (udp, bound) = crate::bind_udp(local_addr)?;
                local_addr = bound;
                let failed = on_failed_handshake(&settings.metrics);
                // From the key file as it is now: a restart with the same key recognises the
                // connections of the process before.
                let key = amb_pki::load_key(&settings.tls.key)?;
                let reset = ResetKey::derive(key.secret_der());
                let trust = certs.trust();
                Some(QuicServer::new(udp, config, trust, limits, failed, &reset)?)
            }
            None => None,
        };
        let endpoint = MetricsEndpoint::bind(settings.metrics_listen)?;
        let (stop, stopping) = watch::channel(false);
        let resolver = Resolver::new(settings.dns_server, settings.etcd_tls.clone());
        let metrics = settings.metrics.clone();
        let ctx = Arc::new(Context {
            limits,
            trust: certs.trust(),
            slots: Arc::new(Semaphore::new(settings.max_connections)),
            throttle: LogThrottle::default(),
            refusals: LogThrottles::default(),
            routes: ArcSwap::from_pointee(
                settings
                    .routes
                    .map(|route, spec| UpstreamSet::new(route, spec, &resolver, &metrics)),
            ),
            resolver,
            specs: Mutex::new(settings.routes),
            reconfigured: watch::Sender::new(0),
            connect_timeout: settings.connect_timeout,
            stopping,
            live: TaskTracker::new(),
            metrics,
            access_log: settings.access_log,
            dial_out: Mutex::new(DialOut {
                transports: settings.transports,
                configs: [
                    dial_certs.subscribe(ALPN_QUIC_REVERSE),
                    dial_certs.subscribe(ALPN_H2_REVERSE),
                ],
                trust: dial_certs.trust(),
                running: HashMap::new(),
                dialers: TaskTracker::new(),
            }),
        });
        // Standard TLS clients go to the route their SNI names, if the routes have it now.
        let tls = tls.map(|server| {
            let routes = Arc::downgrade(&ctx);
            server.serving_raw(RawTls {
                default: settings.tls_route.clone(),
                exists: Arc::new(move |route| {
                    routes
                        .upgrade()
                        .is_some_and(|ctx| ctx.routes.load().upstream(route).is_some())
                }),
            })
        });
        let reporting = Arc::downgrade(&ctx);
        ctx.metrics.report_health(move |out| {
            if let Some(ctx) = reporting.upgrade() {
                for (_, set) in ctx.routes.load().iter() {
                    set.health(out);
                }
            }
        });
        ctx.metrics
            .add_readiness(Arc::new(ServerReady(ctx.stopping.clone())));
        Ok(Server {
            ctx,
            stop,
            quic,
            tls,
            local_addr,
            drain_timeout: limits.drain_timeout,
            certs,
            reload: Reload::default(),
            reload_check: settings.reload_check,
            register: settings.register,
            endpoint,
            dial_out: (dial_certs, settings.peers),
            listens,
        })
    }

    /// Replaces the routes of the running server (a reloaded config file).
    pub fn routes(&self) -> Routes {
        Routes(self.ctx.clone())
    }

    /// Reloads the certificates on request (e.g. on SIGHUP); new connections use them.
    pub fn reload(&self) -> Reload {
        self.reload.clone()
    }

    /// The bound address (TCP and UDP share it); `None` if the server does not listen.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listens.then_some(self.local_addr)
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets live streams finish for up to
    /// the drain timeout, and closes.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Server {
            ctx,
            stop,
            quic,
            tls: mut tls_server,
            local_addr,
            drain_timeout,
            certs,
            reload,
            reload_check,
            register,
            endpoint,
            dial_out,
            listens,
        } = self;
        // Served to the end of the drain: `/readyz` says the server is shutting down.
        let _endpoint = endpoint.serve(&ctx.metrics);
        for (route, upstream) in ctx.routes.load().iter() {
            info!(%route, %upstream, "route");
        }
        if listens {
            info!(
                addr = %local_addr,
                quic = quic.is_some(),
                tls = tls_server.is_some(),
                "amb server listening"
            );
        }
        let quic_serving = async {
            if let Some(server) = &quic {
                let ctx = ctx.clone();
                amb_quic::serve(
                    server,
                    ctx.stopping.clone(),
                    move |accepted, verified_under| {
                        let ctx = ctx.clone();
                        async move {
                            if let Some(conn) = accepted.into_connection().await {
                                let drains = (None, ctx.trust.clone(), verified_under);
                                serve(ctx, conn, drains, (Direction::Accepted, "")).await;
                            }
                        }
                    },
                )
                .await;
            }
        };
        let tls_serving = async {
            if let Some(server) = &mut tls_server {
                let ctx = ctx.clone();
                amb_tls::serve(server, ctx.stopping.clone(), move |conn, verified_under| {
                    let drains = (None, ctx.trust.clone(), verified_under);
                    serve(ctx.clone(), conn, drains, (Direction::Accepted, ""))
                })
                .await;
            }
        };
        let (dial_certs, peers) = dial_out;
        if let Err(e) = Routes(ctx.clone()).replace_peers(&peers) {
            error!("not dialing the app sides: {e}");
        }
        let dial_certs =
            dial_certs.keep_current(reload.clone(), reload_check, ctx.stopping.clone());
        let certs = certs.keep_current(reload, reload_check, ctx.stopping.clone());
        let stopping = async {
            shutdown.await;
            let _ = stop.send(true);
        };
        // Deregistered as the drain starts, so that clients send new connections elsewhere.
        let registered = async {
            if let Some(Registration { key, advertise }) = register {
                let tls = ctx.resolver.etcd_tls().clone();
                let advertise = advertise.unwrap_or_else(|| local_addr.to_string());
                crate::endpoints::register(key, advertise, tls, ctx.stopping.clone()).await;
            }
        };
        tokio::join!(
            quic_serving,
            tls_serving,
            certs,
            dial_certs,
            stopping,
            registered
        );

        ctx.live.close();
        let live = ctx.live.len();
        info!(live_streams = live, drain = ?drain_timeout, "shutting down: no new connections");
        let dialers = ctx.dial_out().dialers.clone();
        dialers.close();
        let drained = async {
            ctx.live.wait().await;
            dialers.wait().await;
            if let Some(tls) = &tls_server {
                tls.drained().await;
            }
            if let Some(quic) = &quic {
                quic.drained().await;
            }
        };
        if tokio::time::timeout(drain_timeout, drained).await.is_err() {
            warn!(
                live_streams = ctx.live.len(),
                "drain timeout reached; closing live streams"
            );
        }
        if let Some(quic) = &quic {
            quic.close().await;
        }
        info!("amb server stopped");
    }
}

/// One dial of a route's upstream, as `amb check --connect` reports it.
#[derive(Debug)]
pub struct UpstreamProbe {
    /// The route.
    pub route: RouteName,
    /// Its upstream as configured.
    pub upstream: String,
    /// `Err` with why the dial failed.
    pub outcome: Result<(), String>,
}

/// Dials each upstream of each route once (64 at a time, each within `timeout`) and closes
/// again. Must be called within a Tokio runtime.
pub async fn probe_upstreams(
    routes: &RouteTable<UpstreamSetSpec>,
    timeout: Duration,
    resolver: &Resolver,
) -> Vec<UpstreamProbe> {
    use futures_util::stream::{self, StreamExt};
    // A discovered set is looked up once and each target it lists dialed.
    let mut members: Vec<(&RouteName, UpstreamSpec)> = Vec::new();
    let mut failed = Vec::new();
    for (route, set) in routes.iter() {
        members.extend(set.members().iter().map(|m| (route, m.upstream.clone())));
        let Some(discovery) = set.discovery() else {
            continue;
        };
        match resolver.list(discovery).await {
            Ok(servers) => members.extend(
                (servers.iter())
                    .filter_map(|t| format!("{}:{}", t.host, t.port).parse().ok())
                    .map(|spec| (route, spec)),
            ),
            Err(why) => failed.push(UpstreamProbe {
                route: route.clone(),
                upstream: set.to_string(),
                outcome: Err(why),
            }),
        }
    }
    let probes = members.into_iter().map(|(route, spec)| async move {
        let outcome = match Upstream::new(&spec, resolver).dial(timeout).await {
            Ok(_) => Ok(()),
            Err(failure) => Err(format!("{}: {}", failure.refusal, failure.detail)),
        };
        UpstreamProbe {
            route: route.clone(),
            upstream: spec.to_string(),
            outcome,
        }
    });
    failed.extend(stream::iter(probes).buffered(64).collect::<Vec<_>>().await);
    failed
}

/// Replaces a running server's routes and allow-lists.
#[derive(Clone)]
pub struct Routes(Arc<Context>);

impl Routes {
    /// Swaps in `new` at once: streams opened from now on are decided by it; running streams
    /// it no longer admits (a route removed, a peer no longer allowed) end within the drain
    /// timeout, the others go on. An unchanged route keeps its upstream (and what its source
    /// has looked up).
    /// Logs each route added, removed or changed; returns how many changed, counting a
    /// changed server-wide allow-list as one.
    pub fn replace(&self, new: RouteTable<UpstreamSetSpec>) -> usize {
        let ctx = &self.0;
        let Ok(mut specs) = ctx.specs.lock() else {
            return 0;
        };
        let changes = specs.diff(&new);
        let running = ctx.routes.load();
        let built = new.map(|route, spec| {
            // Unchanged upstreams keep their runtime object: lookups, health, open counts.
            match running.upstream(route) {
                Some(up) if up.spec() == spec => up.clone(),
                running_set => {
                    let set = UpstreamSet::new(route, spec, &ctx.resolver, &ctx.metrics);
                    if let Some(previous) = running_set {
                        set.carry_health_from(previous);
                    }
                    set
                }
            }
        });
        for (route, change) in &changes {
            let upstream = new
                .upstream(route)
                .map(ToString::to_string)
                .unwrap_or_default();
            info!(%route, %upstream, "route {}", match change {
                RouteChange::Added => "added",
                RouteChange::Removed => "removed",
                RouteChange::Changed => "changed",
            });
        }
        let allow_changed = !specs.same_allow(&new);
        if allow_changed {
            info!("server-wide allow-list changed");
        }
        ctx.routes.store(Arc::new(built));
        *specs = new;
        ctx.reconfigured.send_modify(|generation| *generation += 1);
        changes.len() + usize::from(allow_changed)
    }
}

impl Routes {
    /// Dials `peers` (app sides) from now on: new ones are dialed, and those no longer listed
    /// stop being dialed while their tunnel connections drain. All or nothing: a peer that
    /// cannot be dialed (a discovered set, a bad name) changes nothing. Returns how many came
    /// or went.
    pub fn replace_peers(&self, peers: &[PeerSpec]) -> Result<usize, EngineError> {
        let ctx = &self.0;
        let mut out = ctx.dial_out();
        if *ctx.stopping.borrow() {
            return Ok(0);
        }
        let mut started = Vec::new();
        for peer in peers.iter().filter(|p| !out.running.contains_key(*p)) {
            started.push((peer.clone(), out.links(ctx, peer)?));
        }
        let gone: Vec<PeerSpec> = (out.running.keys())
            .filter(|p| !peers.contains(p))
            .cloned()
            .collect();
        for peer in &gone {
            if let Some(stop) = out.running.remove(peer) {
                stop.send_replace(true);
                info!(%peer, "app side no longer dialed: its tunnel connections drain");
            }
        }
        let changes = gone.len() + started.len();
        for (peer, links) in started {
            let stop = out.start(ctx, links);
            info!(%peer, transport = ?out.transports, "dialing the app side");
            out.running.insert(peer, stop);
        }
        Ok(changes)
    }
}

/// A peer's links, one per transport dialed.
type PeerLinks = (
    Option<Arc<PeerLink<QuicServingDialer>>>,
    Option<Arc<PeerLink<TlsServingDialer>>>,
);

impl DialOut {
    /// The links to `peer` over each transport dialed; errors before anything starts.
    fn links(&self, ctx: &Arc<Context>, peer: &PeerSpec) -> Result<PeerLinks, EngineError> {
        let addr = peer.addr().ok_or_else(|| {
            EngineError::Config(format!(
                "peer {peer}: a server dials one app side, not a discovered set"
            ))
        })?;
        let (limits, metrics) = (ctx.limits, &ctx.metrics);
        let source = peer_source(peer, addr, &ctx.resolver);
        let (name, label) = (addr.host(), peer.to_string());
        let [quic, tls] = &self.configs;
        let quic = match quic {
            Some(config) => {
                let dialer = QuicServingDialer::new(config.clone(), name.clone(), limits)?;
                let via = (limits, metrics);
                Some(PeerLink::new(
                    peer,
                    &label,
                    source.clone(),
                    "quic",
                    dialer,
                    via,
                ))
            }
            None => None,
        };
        let tls = match tls {
            Some(config) => {
                let dialer = TlsServingDialer::new(config.clone(), &name, limits)?;
                let via = (limits, metrics);
                Some(PeerLink::new(peer, &label, source, "tls", dialer, via))
            }
            None => None,
        };
        Ok((quic, tls))
    }

    /// Keeps tunnel connections over `links` (QUIC one, TLS two, one beside QUIC) until the
    /// server stops or the returned sender turns true (the peer was dropped); their
    /// connections then drain.
    fn start(&self, ctx: &Arc<Context>, (quic, tls): PeerLinks) -> watch::Sender<bool> {
        let (stop, stopped) = watch::channel(false);
        let (quic_count, tls_count) = match self.transports {
            ServerTransports::Quic => (1, 0),
            ServerTransports::Tls => (0, 2),
            ServerTransports::Both => (1, 1),
        };
        if let Some(link) = quic {
            self.keep(ctx, link, quic_count, &stopped);
        }
        if let Some(link) = tls {
            self.keep(ctx, link, tls_count, &stopped);
        }
        stop
    }

    /// Keeps `count` tunnel connections over `link`, each served through the lifecycle,
    /// until the server stops or `removed` turns true.
    fn keep<D>(
        &self,
        ctx: &Arc<Context>,
        link: Arc<PeerLink<D>>,
        count: usize,
        removed: &watch::Receiver<bool>,
    ) where
        D: Dialer<Tunnel: Serving + Sync>,
    {
        for slot in 0..count {
            let (ctx, trust, gone) = (ctx.clone(), self.trust.clone(), removed.clone());
            let stops = (ctx.stopping.clone(), removed.clone());
            let label: Arc<str> = link.label().into();
            let serve_dialed = move |dialed: D::Tunnel, verified_under| {
                let drains = (Some(gone.clone()), trust.clone(), verified_under);
                let (ctx, label) = (ctx.clone(), label.clone());
                dialed.serve(move |conn| async move {
                    serve(ctx, conn, drains, (Direction::Dialed, &label)).await
                })
            };
            let kept = keep_dialed(slot, link.clone(), self.trust.clone(), stops, serve_dialed);
            self.dialers.spawn(kept);
        }
    }
}

impl Context {
    fn dial_out(&self) -> std::sync::MutexGuard<'_, DialOut> {
        (self.dial_out.lock()).unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// One authenticated tunnel connection through the lifecycle, `direction` as it was made
/// (`label`: the app side dialed, as configured, for metrics; empty for accepted ones). It
/// drains when the server stops, and as its [`Drains`] say.
fn serve<C: ServerConnection>(
    ctx: Arc<Context>,
    conn: C,
    (removed, trust, verified_under): Drains,
    (direction, label): (Direction, &str),
) -> impl Future<Output = ()> + Send {
    let drain = DrainWatch {
        stop: ctx.stopping.clone(),
        trust,
        verified_under,
        reconfigured: ctx.reconfigured.subscribe(),
        removed,
    };
    let limits = ctx.limits;
    let up = ctx.metrics.tunnel_up(direction, label, C::TRANSPORT);
    // A peer the server-wide allow-list does not admit is served 403 for every stream; the
    // metrics count it as a refused handshake at once. An app side this side dialed is let go
    // instead: it would send ever more app connections to a side whose load stays nil.
    let admitted = ctx.routes.load().admits_peer(&conn.peer().identity);
    if !admitted {
        (ctx.metrics).handshake_failed(direction, C::TRANSPORT, "not_allowed");
    }
    let dialed_unadmitted = !admitted && matches!(direction, Direction::Dialed);
    if dialed_unadmitted {
        let (peer, transport) = (conn.peer(), C::TRANSPORT);
        warn!(%peer, transport, "app side not on the server-wide allow-list: closing the tunnel connection");
    }
    let served = (!dialed_unadmitted).then(|| {
        serve_connection(conn, drain, ctx.clone(), limits, move |conn, incoming| {
            handle(ctx.clone(), conn, incoming)
        })
    });
    async move {
        if let Some(served) = served {
            served.await;
        }
        drop(up);
    }
}

/// What drains a connection besides the server stopping: a dialed app side dropped from the
/// peers (`removed`), and the trust generation moving on from the one it was verified under.
type Drains = (Option<watch::Receiver<bool>>, watch::Receiver<u64>, u64);

/// Counts each failed handshake, and logs it at most once a second per transport and kind
/// (with how many were not logged).
pub(crate) fn on_failed_handshake(metrics: &Arc<Metrics>) -> OnFailedHandshake {
    let (metrics, throttles) = (metrics.clone(), LogThrottles::default());
    Arc::new(move |failed: FailedHandshake| {
        let (transport, reason) = (failed.transport, failed.kind.as_str());
        metrics.handshake_failed(Direction::Accepted, transport, reason);
        if let Some(suppressed) = throttles.allow((transport, failed.kind)) {
            warn!(peer = %failed.peer, transport, %reason, suppressed, "{}", failed.why);
        }
    })
}

/// A bound server is ready (it listens with loaded certificates) until it stops.
struct ServerReady(watch::Receiver<bool>);

impl Readiness for ServerReady {
    fn ready(&self) -> Result<(), String> {
        match *self.0.borrow() {
            true => Err("the server is shutting down".to_owned()),
            false => Ok(()),
        }
    }
}

impl Admission for Context {
    fn admits_peer(&self, peer: &PeerIdentity) -> bool {
        self.routes.load().admits_peer(peer)
    }

    fn admits(&self, peer: &PeerIdentity, route: &RouteName) -> bool {
        self.routes.load().decide(peer, route).is_ok()
    }
}

/// Answers a stream with a refusal. One the client caused counts against its refusal budget;
/// past the budget its connection closes, with no answer to send.
async fn refuse<I: IncomingStream>(conn: &ConnCtx, incoming: I, why: Refusal) -> StreamEnd {
    if !why.is_client_fault() || conn.charge(why) {
        incoming.refuse(why).await;
    }
    StreamEnd::Closed
}

/// One stream: decide, dial, answer, relay. Every refusal is one log line with the reason; a
/// stream cut off by its tunnel connection's loss is left to that connection's one line. Each
/// is counted in its route's metrics and ends with one access line.
async fn handle<I: IncomingStream>(
    ctx: Arc<Context>,
    conn: Arc<ConnCtx>,
    incoming: I,
) -> StreamEnd {
    let _live = ctx.live.token();
    let peer = incoming.peer().clone();
    let route = incoming.route().clone();
    let log = StreamLog {
        ctx: &ctx,
        peer: &peer,
        route: &route,
        arrived: tokio::time::Instant::now(),
    };
    // During a drain, streams the client opened before it learned of it are still served.
    let Ok(_slot) = ctx.slots.clone().try_acquire_owned() else {
        if let Some(suppressed) = ctx.throttle.allow() {
            warn!(%peer, %route, suppressed, "stream refused: at --max-connections");
        }
        log.refused_early(Refusal::Unavailable);
        return refuse(&conn, incoming, Refusal::Unavailable).await;
    };
    let decided = ctx.routes.load().decide(&peer.identity, &route).cloned();
    let upstream = match decided {
        Ok(upstream) => upstream,
        Err(refusal) => {
            log.refused_early(refusal);
            return refuse(&conn, incoming, refusal).await;
        }
    };
    let mut counted = upstream.metrics().connection();
    let origin = Origin {
        app: incoming.app(),
        identity: &peer.identity,
    };
    let (socket, lease) = match upstream.dial(ctx.connect_timeout, Some(&origin)).await {
        Ok(dialed) => dialed,
        Err(failure) => {
            let reason = failure.reason();
            log.warn_refused(
                route.as_str(),
                reason,
                &format_args!("{}: {}", failure.refusal, failure.detail),
            );
            counted.refused(reason);
            log.access(
                Some(&upstream),
                (0, 0),
                ConnectionEnd::Refused,
                Some(&reason),
            );
            return refuse(&conn, incoming, failure.refusal).await;
        }
    };
    counted.opened(log.arrived.elapsed());
    let upstream = lease.upstream();
    let (send, recv) = match incoming.accept().await {
        Ok(halves) => halves,
        // The client cancelled the stream or lost its connection while the server dialed:
        // its own doing, and a lost connection would otherwise log once per pending stream.
        // Counted, but no access line: a client can cancel thousands a second (rapid reset),
        // and its own side logs the app connection.
        Err(e @ (StreamError::Reset(_) | StreamError::ConnectionLost(_))) => {
            debug!(%peer, %route, %upstream, "stream lost before it opened: {e}");
            if matches!(e, StreamError::Reset(_)) {
                // Rapid reset: cancelling streams while the server dials costs the budget.
                conn.charge("stream cancelled before it opened");
            }
            counted.ended(ConnectionEnd::Reset, 0, 0);
            return StreamEnd::of(&e);
        }
        Err(e) => {
            warn!(%peer, %route, %upstream, "stream lost before it opened: {e}");
            counted.ended(ConnectionEnd::Reset, 0, 0);
            log.access(Some(upstream), (0, 0), ConnectionEnd::Reset, Some(&e));
            return StreamEnd::Closed;
        }
    };
    let Relayed { bytes, result } = match socket {
        UpstreamStream::Tcp(tcp) => relay(tcp, send, recv).await,
        UpstreamStream::Unix(unix) => relay(unix, send, recv).await,
        tls @ UpstreamStream::Tls(_) => {
            // A RST to the service unless the relay ends cleanly, as the socket relay does.
            let guard = tls.reset_unless_finished();
            let relayed = relay_io(tls, send, recv).await;
            if relayed.result.is_ok() {
                guard.finished();
            }
            relayed
        }
    };
    // The upstream is the socket: what it sent into the tunnel went down to the app.
    let (up, down) = (bytes.from_tunnel, bytes.to_tunnel);
    let (end, stream_end) = match &result {
        Ok(()) => (ConnectionEnd::Ok, StreamEnd::Closed),
        Err(e @ RelayError::Tunnel(StreamError::ConnectionLost(_))) => {
            debug!(%peer, %route, %upstream, "stream reset: {e}");
            (ConnectionEnd::Reset, StreamEnd::ConnectionLost)
        }
        Err(e) => {
            warn!(%peer, %route, %upstream, "stream reset: {e}");
            (ConnectionEnd::Reset, StreamEnd::Closed)
        }
    };
    counted.ended(end, up, down);
    let reason = result.as_ref().err().map(|e| e as &dyn std::fmt::Display);
    log.access(Some(upstream), (up, down), end, reason);
    stream_end
}

/// What a stream's log lines and refusal counts need: one small value held for the stream's
/// life (each closure holding its own references cost idle memory per stream).
struct StreamLog<'a> {
    ctx: &'a Context,
    peer: &'a Arc<amb_proto::Peer>,
    route: &'a RouteName,
    arrived: tokio::time::Instant,
}

impl StreamLog<'_> {
    /// The stream's access line.
    fn access(
        &self,
        upstream: Option<&dyn std::fmt::Display>,
        (up, down): (u64, u64),
        end: ConnectionEnd,
        reason: Option<&dyn std::fmt::Display>,
    ) {
        Access {
            route: self.route,
            app: None,
            peer: Some(self.peer),
            upstream,
            up,
            down,
            since: self.arrived,
            end,
            reason,
        }
        .log(self.ctx.access_log)
    }

    /// One line per route and reason a second: a dead upstream or a misconfigured client can
    /// cause thousands a second.
    fn warn_refused(&self, label: &str, reason: &'static str, why: &dyn std::fmt::Display) {
        if let Some(suppressed) = self.ctx.refusals.allow((label.to_owned(), reason)) {
            let (peer, route) = (self.peer, self.route);
            warn!(%peer, %route, %reason, suppressed, "stream refused: {why}");
        }
    }

    /// A refusal before the route's upstreams are reached: logged, counted, an access line.
    fn refused_early(&self, refusal: Refusal) {
        // A route the configuration lacks is not a label: the peer chose its name.
        let known = self.ctx.routes.load().upstream(self.route).is_some();
        let label = if known {
            self.route.as_str()
        } else {
            "(unknown)"
        };
        if refusal != Refusal::Unavailable {
            self.warn_refused(label, refusal.name(), &refusal);
        }
        self.ctx
            .metrics
            .refused(Side::Server, label, refusal.name());
        self.access(None, (0, 0), ConnectionEnd::Refused, Some(&refusal.name()));
    }
}
