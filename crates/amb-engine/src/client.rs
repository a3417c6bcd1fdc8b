//! The client ambassador: local listeners, a supervised pool of warm tunnel connections, and a
//! stream per app connection.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use amb_metrics::{
    ConnectionEnd, Direction, Metrics, OpenConnection, OpenTimer, Readiness, RouteMetrics, Side,
    TunnelUp,
};
use amb_pki::{CertificateDer, TlsFiles};
use amb_proto::{
    AllowList, AppAddrs, Dialer, Limits, ResetCode, Retirement, RouteName, StreamError, StreamRecv,
    StreamSend, Tunnel, ALPN_H2, ALPN_QUIC,
};
use amb_quic::QuicDialer;
use amb_spec::{
    diff_listeners, Balance, Discovery, HostPort, ListenerChange, ListenerSpec, PeerSpec,
};
use amb_tls::TlsDialer;
use arc_swap::ArcSwap;
use futures_util::future::{join_all, select_all};
use rand::Rng;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::access::Access;
use crate::endpoints::{
    discover, peer_source, Balancer, DialError, Discovered, Endpoint, EtcdTls, Located, Resolver,
    Role, LOOKUP_LIMIT,
};
use crate::relay::{relay_keeping, reset_tcp, FirstFlight, RelayError, Relayed, Unanswered};
use crate::reload::{Certs, Reload};
use crate::reverse::{AcceptSettings, AppSide, AppSideListeners};
use crate::tally::{StreamEnd, StreamTally};
use crate::throttle::{LogThrottle, LogThrottles};
use crate::upstream_set::{pick, srv_weight, Candidate};
use crate::{bind_tcp, EngineError, MetricsEndpoint};

/// The tunnel transport a client uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientTransport {
    /// QUIC over UDP.
    Quic,
    /// HTTP/2 over TLS 1.3 over TCP.
    Tls,
    /// QUIC where it works, else TLS: both are kept dialed (TLS with one connection), new
    /// app connections go over QUIC while it has a tunnel connection up, else over TLS.
    Auto,
}

impl ClientTransport {
    /// The ALPNs its tunnel connections speak.
    fn alpns(self) -> &'static [&'static [u8]] {
        match self {
            ClientTransport::Quic => &[ALPN_QUIC],
            ClientTransport::Tls => &[ALPN_H2],
            ClientTransport::Auto => &[ALPN_QUIC, ALPN_H2],
        }
    }
}

/// Everything the client needs.
#[derive(Clone, Debug)]
pub struct ClientSettings {
    /// The servers of every listener without peers of its own.
    pub peers: Vec<PeerSpec>,
    /// How new app connections are spread over a listener's peers.
    pub peer_balance: Balance,
    /// The name every server's certificate must be valid for; `None`: each peer's host.
    pub server_name: Option<String>,
    /// Which transport to use.
    pub transport: ClientTransport,
    /// Certificate, key and server CA.
    pub tls: TlsFiles,
    /// Local listeners.
    pub listens: Vec<ListenerSpec>,
    /// Per-connection bounds.
    pub limits: Limits,
    /// Tunnel connections kept warm.
    pub connections: usize,
    /// How long an app connection waits for a tunnel before it is reset.
    pub tunnel_wait: Duration,
    /// App connections carried at once; more are reset at once.
    pub max_connections: usize,
    /// How often the certificate files are checked for a change; `None`: only on request.
    pub reload_check: Option<Duration>,
    /// The DNS server peer names and SRV records are looked up at; `None`: the system's.
    pub dns_server: Option<SocketAddr>,
    /// How an `etcds://` registry of peers is reached.
    pub etcd_tls: EtcdTls,
    /// What the client counts into (and `/readyz` asks).
    pub metrics: Arc<Metrics>,
    /// Where `/metrics`, `/healthz` and `/readyz` are served while the client runs, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// One `info` line per app connection when it ends.
    pub access_log: bool,
    /// Where service-side ambassadors connect in (reverse tunnels), if anywhere: listeners
    /// without peers of their own carry over their tunnel connections.
    pub accept: Option<AcceptSettings>,
}

/// A bound client, ready to run.
pub struct Client {
    endpoint: MetricsEndpoint,
    listeners: Vec<Listener>,
    links: Vec<Link>,
    settings: ClientSettings,
    certs: Certs<amb_pki::rustls::ClientConfig>,
    makes: LinkMaker,
    reload: Reload,
    relisten: (
        mpsc::UnboundedSender<Relisten>,
        mpsc::UnboundedReceiver<Relisten>,
    ),
    /// Where service-side ambassadors connect in, if anywhere.
    app_side: Option<(Arc<AppSide>, AppSideListeners)>,
}

/// A bound listener, as configured (its peers filled in; their links are in [`Client`]'s
/// `links`).
struct Listener {
    socket: TcpListener,
    spec: ListenerSpec,
}

/// Makes the link to a peer, as the client's settings say.
struct LinkMaker {
    transport: ClientTransport,
    server_name: Option<String>,
    /// The configuration of each ALPN the transport speaks (QUIC's first).
    tls: Vec<watch::Receiver<Arc<amb_pki::rustls::ClientConfig>>>,
    limits: Limits,
    resolver: Resolver,
    metrics: Arc<Metrics>,
}

impl LinkMaker {
    fn transport_name(&self) -> &'static str {
        match self.transport {
            ClientTransport::Quic => "quic",
            ClientTransport::Tls => "tls",
            ClientTransport::Auto => "auto",
        }
    }

    /// The link to one server (a discovered set's peers are made one by one, as they come);
    /// `label`: the peer as configured (a discovered server's set), for metrics.
    fn make(&self, peer: &PeerSpec, label: &str) -> Result<Link, EngineError> {
        let addr = peer.addr().ok_or_else(|| {
            EngineError::Config(format!("peer {peer} is a discovered set, not one server"))
        })?;
        let server_name = self.server_name.clone().unwrap_or_else(|| addr.host());
        let limits = self.limits;
        let source = peer_source(peer, addr, &self.resolver);
        let (first, last) = (self.tls[0].clone(), self.tls[self.tls.len() - 1].clone());
        let quic = |tls| -> Result<_, EngineError> {
            let dialer = QuicDialer::new(tls, server_name.clone(), limits)?;
            let metrics = (self.limits, &self.metrics);
            Ok(PeerLink::new(
                peer,
                label,
                source.clone(),
                "quic",
                dialer,
                metrics,
            ))
        };
        let tls = |tls| -> Result<_, EngineError> {
            let dialer = TlsDialer::new(tls, &server_name, limits)?;
            let metrics = (self.limits, &self.metrics);
            Ok(PeerLink::new(
                peer,
                label,
                source.clone(),
                "tls",
                dialer,
                metrics,
            ))
        };
        Ok(match self.transport {
            ClientTransport::Quic => Link::Quic(quic(first)?),
            ClientTransport::Tls => Link::Tls(tls(first)?),
            ClientTransport::Auto => Link::Auto(Arc::new(AutoLink {
                quic: {
                    let quic = quic(first)?;
                    quic.covered.store(true, Ordering::Relaxed);
                    quic
                },
                tls: tls(last)?,
                over_tls: AtomicBool::new(false),
            })),
        })
    }
}

/// A discovered server, as a peer: verified against its own host name.
fn located_peer(server: &Located) -> Option<PeerSpec> {
    HostPort::parse(&format!("{}:{}", server.host, server.port)).map(PeerSpec::at)
}

/// Each listener with its peers: its own, else the client's. An error names a listener that
/// has neither, unless the client `accepts` service-side ambassadors (which carry it).
fn with_peers(
    listens: Vec<ListenerSpec>,
    peers: &[PeerSpec],
    accepts: bool,
) -> Result<Vec<ListenerSpec>, EngineError> {
    if listens.is_empty() {
        return Err(EngineError::Config(
            "no --listen given: nothing to carry".into(),
        ));
    }
    if accepts && !peers.is_empty() {
        return Err(EngineError::Config(
            "--peer and --accept together: the listeners without a peer of their own would all \
             go to the peers, none over the service sides accepted; give one of them (a listener \
             in the config file may name its own peer)"
                .into(),
        ));
    }
    listens
        .into_iter()
        .map(|mut spec| {
            if spec.peers.is_empty() {
                spec.peers = peers.to_vec();
            }
            match spec.peers.is_empty() && !accepts {
                false => Ok(spec),
                true => Err(EngineError::Config(format!(
                    "listener {} has no peer: give --peer HOST:PORT (or `peer` in the config file)",
                    spec.addr
                ))),
            }
        })
        .collect()
}

/// What a client (or a probe of its peers) starts from: its listeners with their peers filled
/// in, its certificates loaded, and how it makes links to peers.
fn prepare(
    settings: &ClientSettings,
) -> Result<
    (
        Vec<ListenerSpec>,
        Certs<amb_pki::rustls::ClientConfig>,
        LinkMaker,
    ),
    EngineError,
> {
    let listens = with_peers(
        settings.listens.clone(),
        &settings.peers,
        settings.accept.is_some(),
    )?;
    let alpns = settings.transport.alpns();
    let certs = Certs::load(settings.tls.clone(), amb_pki::client_config, alpns)?;
    let makes = LinkMaker {
        transport: settings.transport,
        server_name: settings.server_name.clone(),
        tls: alpns
            .iter()
            .map(|alpn| certs.subscribe(alpn).expect("loaded for this ALPN"))
            .collect(),
        limits: settings.limits,
        resolver: Resolver::new(settings.dns_server, settings.etcd_tls.clone()),
        metrics: settings.metrics.clone(),
    };
    Ok((listens, certs, makes))
}

impl Client {
    /// Loads certificates, then binds the listeners. Must be called within a Tokio runtime.
    pub fn bind(settings: ClientSettings) -> Result<Self, EngineError> {
        let (listens, certs, makes) = prepare(&settings)?;
        let certs = certs.counted_in(&settings.metrics, Side::Client);
        let app_side = match &settings.accept {
            Some(accept) => {
                let transports = match settings.transport {
                    ClientTransport::Quic => (true, false),
                    ClientTransport::Tls => (false, true),
                    ClientTransport::Auto => (true, true),
                };
                let (limits, metrics) = (settings.limits, &settings.metrics);
                Some(AppSide::bind(
                    accept,
                    transports,
                    &settings.tls,
                    limits,
                    metrics,
                )?)
            }
            None => None,
        };
        let mut links: Vec<Link> = Vec::new();
        let mut listeners = Vec::new();
        for spec in listens {
            for peer in &spec.peers {
                let discovered = peer.discovery().is_some();
                if !discovered && !links.iter().any(|l| l.peer() == peer) {
                    links.push(makes.make(peer, &peer.to_string())?);
                }
            }
            listeners.push(Listener {
                socket: bind_tcp(spec.addr)?,
                spec,
            });
        }
        Ok(Client {
            endpoint: MetricsEndpoint::bind(settings.metrics_listen)?,
            listeners,
            links,
            settings,
            certs,
            makes,
            reload: Reload::default(),
            relisten: mpsc::unbounded_channel(),
            app_side,
        })
    }

    /// Reloads the certificates on request (e.g. on SIGHUP); tunnel connections dialed from
    /// then on use them.
    pub fn reload(&self) -> Reload {
        self.reload.clone()
    }

    /// Replaces the listeners of the running client (a reloaded config file).
    pub fn listeners(&self) -> Listeners {
        Listeners(self.relisten.0.clone())
    }

    /// The bound listener addresses, in `--listen` order.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| l.socket.local_addr().ok())
            .collect()
    }

    /// Serves until `shutdown` resolves, then stops accepting and lets live connections finish
    /// for up to the drain timeout.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Client {
            endpoint,
            listeners,
            links,
            settings,
            certs,
            makes,
            reload,
            relisten: (_, relisten),
            app_side,
        } = self;
        // Served to the end of the drain: `/readyz` says the client is shutting down.
        let _endpoint = endpoint.serve(&settings.metrics);
        let (stop_tx, stop) = watch::channel(false);
        // Every ALPN's configuration changes at once: the first tells a reload.
        let watch = (makes.tls[0].clone(), certs.trust());
        let (side, accepting) = match app_side {
            Some((side, listeners)) => {
                let reloads = (reload.clone(), settings.reload_check);
                (
                    Some(side.clone()),
                    Some(listeners.run(side, reloads, stop.clone())),
                )
            }
            None => (None, None),
        };
        let accepting = async {
            if let Some(accepting) = accepting {
                accepting.await;
            }
        };
        let certs = certs.keep_current(reload, settings.reload_check, stop);
        let serving = async move {
            let carriers = (links, side);
            run(
                carriers, watch, listeners, makes, settings, relisten, shutdown,
            )
            .await;
            let _ = stop_tx.send(true);
        };
        tokio::join!(certs, serving, accepting);
        info!("amb client stopped");
    }
}

/// One handshake with a configured peer, as `amb check --connect` reports it.
#[derive(Debug)]
pub struct PeerProbe {
    /// The peer as configured.
    pub peer: String,
    /// The transport dialed.
    pub transport: &'static str,
    /// The address that answered and the certificate it presented, or why none did.
    pub outcome: Result<(String, Option<CertificateDer<'static>>), String>,
}

/// Dials each peer `settings` name once, with its certificates, transport and server names,
/// and closes again; binds nothing. A handshake passed means the peer's certificate verified
/// and the peer accepted this client's. Must be called within a Tokio runtime.
pub async fn probe_peers(settings: &ClientSettings) -> Result<Vec<PeerProbe>, EngineError> {
    // The certificates stay loaded while the probes run: the links' dialers watch them.
    let (listens, _certs, makes) = prepare(settings)?;
    let transport = makes.transport_name();
    // A discovered set is looked up once here and each server it lists probed.
    let mut peers: Vec<PeerSpec> = Vec::new();
    let mut probes = Vec::new();
    for peer in listens.iter().flat_map(|l| &l.peers) {
        let found = match peer.discovery() {
            None => vec![peer.clone()],
            Some(discovery) => match makes.resolver.list(discovery).await {
                Ok(servers) => servers.iter().filter_map(located_peer).collect(),
                Err(why) => {
                    probes.push(PeerProbe {
                        peer: peer.to_string(),
                        transport,
                        outcome: Err(why),
                    });
                    continue;
                }
            },
        };
        for peer in found {
            if !peers.contains(&peer) {
                peers.push(peer);
            }
        }
    }
    let links = peers
        .iter()
        .map(|peer| makes.make(peer, &peer.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    probes.extend(
        join_all(links.iter().map(|link| async move {
            PeerProbe {
                peer: link.name().to_owned(),
                transport: link.transport(),
                outcome: link.probe().await,
            }
        }))
        .await,
    );
    Ok(probes)
}

/// Replaces a running client's listeners.
#[derive(Clone)]
pub struct Listeners(mpsc::UnboundedSender<Relisten>);

/// A replacement of the listeners, and where its outcome goes.
struct Relisten {
    listens: Vec<ListenerSpec>,
    peers: Vec<PeerSpec>,
    accept_allow: Option<AllowList>,
    done: oneshot::Sender<Result<usize, EngineError>>,
}

impl Listeners {
    /// Swaps in `listens` (`peers` serving those without their own): new listeners are
    /// bound, removed ones stop accepting (their app connections go on), and one whose route
    /// or peer changed keeps its socket and sends new connections to the new target. All or
    /// nothing: if a new listener cannot be bound, nothing changes. A peer no listener uses
    /// any more is let go once its app connections end (within the drain timeout). Logs each
    /// listener added, removed or changed; returns how many. `accept_allow`: a client that
    /// accepts service-side ambassadors takes their new allow-list (see `--allow`).
    pub async fn replace(
        &self,
        listens: Vec<ListenerSpec>,
        peers: Vec<PeerSpec>,
        accept_allow: Option<AllowList>,
    ) -> Result<usize, EngineError> {
        let (done, outcome) = oneshot::channel();
        let stopped = || EngineError::Config("the client has stopped".into());
        self.0
            .send(Relisten {
                listens,
                peers,
                accept_allow,
                done,
            })
            .map_err(|_| stopped())?;
        outcome.await.map_err(|_| stopped())?
    }
}

/// A tunnel connection in the pool, with the app connections it carries.
pub(crate) struct Pooled<T> {
    pub(crate) tunnel: T,
    pub(crate) carried: StreamTally,
    /// The server drains it: a loss from now on is the end of that drain, logged per app
    /// connection since no line for the connection follows.
    pub(crate) draining: AtomicBool,
    /// Counts it as up while it lives.
    pub(crate) _up: TunnelUp,
    /// Who is at the other end, for the logs of the app connections it carries, where the
    /// pool's name does not say (a service side that dialed in); `None`: the pool's name.
    pub(crate) peer: Option<String>,
}

/// The live tunnel connections, each tagged with its pool slot.
type Live<T> = watch::Sender<Vec<(usize, Arc<Pooled<T>>)>>;

pub(crate) struct Pool<T> {
    pub(crate) live: Live<T>,
    next: AtomicUsize,
    /// New app connections go to the connection carrying the fewest (the service-side
    /// ambassadors connected to an app side); else in turn.
    least_loaded: bool,
}

impl<T> Pool<T> {
    /// An empty pool.
    pub(crate) fn new(least_loaded: bool) -> Self {
        Pool {
            live: watch::Sender::new(Vec::new()),
            next: AtomicUsize::new(0),
            least_loaded,
        }
    }
}

impl<T: Tunnel> Pool<T> {
    /// Takes `pooled` out of the pool: no new app connection goes to it.
    pub(crate) fn remove(&self, pooled: &Arc<Pooled<T>>) {
        self.live
            .send_modify(|v| v.retain(|(_, p)| !Arc::ptr_eq(p, pooled)));
    }

    /// Takes `pooled` out of the pool and lets the app connections on it finish there (a loss
    /// from now on is logged per app connection); returns how many there are.
    pub(crate) fn let_go(&self, pooled: &Arc<Pooled<T>>) -> usize {
        self.remove(pooled);
        pooled.draining.store(true, Ordering::Relaxed);
        pooled.carried.cut_off()
    }

    /// A live tunnel other than those in `failed` (streams just failed to open on them), round
    /// robin; waits up to `wait` for one to come up.
    async fn get(&self, wait: Duration, failed: &[Arc<Pooled<T>>]) -> Option<Arc<Pooled<T>>> {
        let usable = |(_, t): &(usize, Arc<Pooled<T>>)| !failed.iter().any(|f| Arc::ptr_eq(f, t));
        let mut rx = self.live.subscribe();
        let live = tokio::time::timeout(wait, rx.wait_for(|v| v.iter().any(usable)))
            .await
            .ok()?
            .ok()?;
        let count = live.iter().filter(|e| usable(e)).count();
        let i = self.next.fetch_add(1, Ordering::Relaxed) % count;
        if self.least_loaded {
            // From a turning start, so that equally loaded connections take turns.
            let from_i = live
                .iter()
                .filter(|e| usable(e))
                .cycle()
                .skip(i)
                .take(count);
            return from_i
                .min_by_key(|(_, t)| t.carried.running())
                .map(|(_, t)| t.clone());
        }
        live.iter()
            .filter(|e| usable(e))
            .nth(i)
            .map(|(_, t)| t.clone())
    }

    /// App connections on its least loaded connection in service; `None` if none is up.
    pub(crate) fn least_load(&self) -> Option<usize> {
        let live = self.live.borrow();
        live.iter().map(|(_, p)| p.carried.running()).min()
    }

    /// App connections on its connections in service; `None` if none is up.
    pub(crate) fn live_load(&self) -> Option<usize> {
        let live = self.live.borrow();
        (!live.is_empty()).then(|| live.iter().map(|(_, p)| p.carried.running()).sum())
    }

    /// Resolves once a connection is in service.
    pub(crate) async fn wait_live(&self) {
        let mut live = self.live.subscribe();
        let _ = live.wait_for(|v| !v.is_empty()).await;
    }

    /// Closes every connection in it.
    pub(crate) async fn close(&self) {
        let tunnels = self.live.send_replace(Vec::new());
        join_all(tunnels.iter().map(|(_, pooled)| pooled.tunnel.close())).await;
    }
}

/// The tunnel connections to one peer over one transport: the dialer, the balancer over the
/// peer's addresses, and the pool of warm connections.
pub(crate) struct PeerLink<D: Dialer> {
    peer: PeerSpec,
    /// The peer, for logs.
    name: String,
    /// The peer as configured (a discovered server's set), for metrics.
    label: String,
    pub(crate) transport: &'static str,
    /// Another transport carries while this one cannot connect (auto's QUIC): its failed
    /// dials are debug lines.
    covered: AtomicBool,
    dialer: D,
    balancer: Balancer,
    pool: Pool<D::Tunnel>,
    limits: Limits,
    metrics: Arc<Metrics>,
}

impl<D: Dialer> PeerLink<D> {
    /// The link to `peer` (`label` for metrics) over `transport`, dialed by `dialer` at the
    /// addresses `source` gives.
    pub(crate) fn new(
        peer: &PeerSpec,
        label: &str,
        source: Arc<crate::endpoints::Source>,
        transport: &'static str,
        dialer: D,
        (limits, metrics): (Limits, &Arc<Metrics>),
    ) -> Arc<Self> {
        Arc::new(PeerLink {
            peer: peer.clone(),
            name: peer.to_string(),
            label: label.to_owned(),
            transport,
            covered: AtomicBool::new(false),
            dialer,
            balancer: Balancer::new(source),
            pool: Pool::new(false),
            limits,
            metrics: metrics.clone(),
        })
    }

    /// The peer, for logs.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// The peer as configured, for metrics.
    pub(crate) fn label(&self) -> &str {
        &self.label
    }

    /// Dials a tunnel connection: the peer's addresses come from its source, in this dial's
    /// turn, raced after Happy Eyeballs within the handshake timeout.
    pub(crate) async fn dial(&self) -> Result<D::Tunnel, DialError<String>> {
        self.dial_at().await.map(|(tunnel, _)| tunnel)
    }

    /// [`dial`](Self::dial), also saying which address answered.
    async fn dial_at(&self) -> Result<(D::Tunnel, Endpoint), DialError<String>> {
        let (peer, transport, dialer) = (&self.name, self.transport, &self.dialer);
        let waiting = AtomicBool::new(false);
        let limit = Some(self.limits.handshake_timeout);
        let failed = |e: D::Error| {
            if let Some(kind) = D::handshake_failure(&e) {
                let metrics = &self.metrics;
                metrics.handshake_failed(Direction::Dialed, transport, kind.as_str());
            }
            e.to_string()
        };
        let won = self
            .balancer
            .dial(limit, &waiting, |endpoint| async move {
                match endpoint {
                    Endpoint::Tcp(addr) => dialer.dial(addr).await.map_err(failed),
                    Endpoint::Unix(_) => Err("a peer is reached over the network".to_owned()),
                }
            })
            .await?;
        if !won.passed_over.is_empty() {
            let others = &won.passed_over;
            warn!(%peer, transport, addr = %won.addr, "dialed a later address of the peer; passed over {others}");
        }
        Ok((won.value, won.addr))
    }
}

impl<D: Dialer<Tunnel: Tunnel>> PeerLink<D> {
    /// Closes every pooled connection (at shutdown, after the drain).
    async fn close(&self) {
        self.pool.close().await;
    }

    /// Once its supervisors stopped: closes every pooled connection when the app connections
    /// on it have ended, or at `drain_timeout`.
    async fn retire(&self, drain_timeout: Duration) {
        let tunnels = self.pool.live.borrow().clone();
        let carried = join_all(tunnels.iter().map(|(_, pooled)| pooled.carried.settled()));
        let _ = tokio::time::timeout(drain_timeout, carried).await;
        self.close().await;
    }
}

impl<D: Dialer<Tunnel: Tunnel>> PeerLink<D> {
    /// App connections on its tunnel connections in service; `None` if none is up.
    fn live_load(&self) -> Option<usize> {
        self.pool.live_load()
    }

    /// Resolves once a tunnel connection to the peer is in service.
    async fn wait_live(&self) {
        self.pool.wait_live().await;
    }

    /// One tunnel connection, dialed and closed again: what answered and what it presented
    /// (read by `presented`).
    async fn probe(
        &self,
        presented: impl Fn(&D::Tunnel) -> Option<CertificateDer<'static>>,
    ) -> Result<(String, Option<CertificateDer<'static>>), String> {
        let (tunnel, addr) = self.dial_at().await.map_err(|e| e.to_string())?;
        let presented = presented(&tunnel);
        tunnel.close().await;
        Ok((addr.to_string(), presented))
    }

    /// Keeps `count` tunnel connections up until `stop`.
    fn supervise(
        self: &Arc<Self>,
        count: usize,
        certs: &CertsWatch,
        stop: &watch::Receiver<bool>,
        tasks: &TaskTracker,
    ) {
        for slot in 0..count {
            let (certs, stop) = (certs.clone(), stop.clone());
            tasks.spawn(supervise(slot, self.clone(), certs, stop));
        }
    }
}

/// Transport `auto`'s link to a peer: QUIC and TLS both kept dialed; new app connections go
/// over QUIC while it has a tunnel connection up, else over TLS, else over the first of the
/// two to get one. QUIC's supervisors keep redialing (backing off) while TLS carries.
struct AutoLink {
    quic: Arc<PeerLink<QuicDialer>>,
    tls: Arc<PeerLink<TlsDialer>>,
    /// New app connections went over TLS last: a change is logged.
    over_tls: AtomicBool,
}

impl AutoLink {
    /// Whether a new app connection goes over TLS: QUIC has no tunnel connection up and TLS
    /// has, or (neither has) TLS gets one first within `wait`. `None`: neither within `wait`.
    async fn over_tls(&self, wait: Duration) -> Option<bool> {
        let over_tls = match (self.quic.live_load(), self.tls.live_load()) {
            (Some(_), _) => false,
            (None, Some(_)) => true,
            (None, None) => tokio::time::timeout(wait, async {
                tokio::select! {
                    biased;
                    () = self.quic.wait_live() => false,
                    () = self.tls.wait_live() => true,
                }
            })
            .await
            .ok()?,
        };
        if self.over_tls.swap(over_tls, Ordering::Relaxed) != over_tls {
            let peer = &self.quic.name;
            match over_tls {
                true => {
                    info!(%peer, transport = "tls", "carrying new app connections over TLS: no QUIC tunnel connection is up (UDP blocked, or the server serves TLS only); QUIC is still dialed")
                }
                false => {
                    info!(%peer, transport = "quic", "carrying new app connections over QUIC again")
                }
            }
        }
        Some(over_tls)
    }
}

/// A peer's link, whatever its transport: what listeners hold, so that they can route to
/// several peers and transports. Dispatch is once per app connection.
#[derive(Clone)]
enum Link {
    Quic(Arc<PeerLink<QuicDialer>>),
    Tls(Arc<PeerLink<TlsDialer>>),
    Auto(Arc<AutoLink>),
}

/// Calls `$body` with the link's typed [`PeerLink`] bound to `$link`; for an [`AutoLink`],
/// `$auto_body` with it bound to `$auto`.
macro_rules! with_link {
    ($self:expr, $link:ident => $body:expr, $auto:ident => $auto_body:expr) => {
        match $self {
            Link::Quic($link) => $body,
            Link::Tls($link) => $body,
            Link::Auto($auto) => $auto_body,
        }
    };
}

impl Link {
    fn peer(&self) -> &PeerSpec {
        with_link!(self, link => &link.peer, auto => &auto.quic.peer)
    }

    fn name(&self) -> &str {
        with_link!(self, link => &link.name, auto => &auto.quic.name)
    }

    fn transport(&self) -> &'static str {
        with_link!(self, link => link.transport, _auto => "auto")
    }

    /// Keeps `count` tunnel connections up until `stop` (an auto link's TLS, one).
    fn supervise(
        &self,
        count: usize,
        certs: &CertsWatch,
        stop: &watch::Receiver<bool>,
        tasks: &TaskTracker,
    ) {
        with_link!(self, link => link.supervise(count, certs, stop, tasks), auto => {
            auto.quic.supervise(count, certs, stop, tasks);
            auto.tls.supervise(1, certs, stop, tasks);
        })
    }

    /// Carries the app connection in `conn` over a pooled tunnel connection; with `hand_back`,
    /// may leave it there untouched (see [`carry`]).
    async fn carry(
        &self,
        conn: &mut Option<AppConnection>,
        route: &RouteName,
        (wait, hand_back): (Duration, bool),
        accepting: &Accepting,
    ) {
        with_link!(self, link => carry(conn, route, (&link.name, &link.pool), (wait, hand_back), accepting).await, auto => {
            let started = Instant::now();
            let rest = |started: Instant| wait.saturating_sub(started.elapsed());
            match auto.over_tls(wait).await {
                Some(false) => carry(conn, route, (&auto.quic.name, &auto.quic.pool), (rest(started), hand_back), accepting).await,
                Some(true) => carry(conn, route, (&auto.tls.name, &auto.tls.pool), (rest(started), hand_back), accepting).await,
                // Neither came up: QUIC's carry, given no time left, refuses it (or hands it back).
                None => carry(conn, route, (&auto.quic.name, &auto.quic.pool), (Duration::ZERO, hand_back), accepting).await,
            }
        })
    }

    async fn close(&self) {
        with_link!(self, link => link.close().await, auto => {
            tokio::join!(auto.quic.close(), auto.tls.close());
        })
    }

    /// One tunnel connection, dialed and closed again: what answered and what it presented
    /// (an auto link's over QUIC, else over TLS).
    async fn probe(&self) -> Result<(String, Option<CertificateDer<'static>>), String> {
        with_link!(self, link => link.probe(|t| t.peer_certificate()).await, auto => {
            match auto.quic.probe(|t| t.peer_certificate()).await {
                Ok(found) => Ok(found),
                Err(quic) => auto.tls.probe(|t| t.peer_certificate()).await
                    .map_err(|tls| format!("QUIC: {quic}; TLS: {tls}")),
            }
        })
    }

    /// App connections on its tunnel connections in service; `None` if none is up.
    fn live_load(&self) -> Option<usize> {
        with_link!(self, link => link.live_load(), auto => auto.quic.live_load().or_else(|| auto.tls.live_load()))
    }

    /// Resolves once a tunnel connection to the peer is in service.
    async fn wait_live(&self) {
        with_link!(self, link => link.wait_live().await, auto => {
            tokio::select! {
                () = auto.quic.wait_live() => {}
                () = auto.tls.wait_live() => {}
            }
        })
    }

    /// Lets the peer go (see [`PeerLink::retire`]).
    async fn retire(self, drain_timeout: Duration) {
        with_link!(self, link => link.retire(drain_timeout).await, auto => {
            tokio::join!(auto.quic.retire(drain_timeout), auto.tls.retire(drain_timeout));
        })
    }
}

/// Keeps one pool slot connected: dial, serve until lost, back off, dial again. When the
/// certificates are reloaded, a connection made with them replaces the slot's before it leaves
/// the pool (its app connections finish on it). If that dial fails, the slot keeps the old one,
/// unless the trusted CAs changed: a connection verified under CAs no longer trusted leaves.
async fn supervise<D: Dialer<Tunnel: Tunnel>>(
    slot: usize,
    link: Arc<PeerLink<D>>,
    (mut certs, mut trust): CertsWatch,
    mut stop: watch::Receiver<bool>,
) {
    let (peer, transport, pool) = (&link.name, link.transport, &link.pool);
    const FIRST_BACKOFF: Duration = Duration::from_millis(100);
    const MAX_BACKOFF: Duration = Duration::from_secs(2);
    let mut backoff = FIRST_BACKOFF;
    let pooled = |tunnel| {
        Arc::new(Pooled {
            tunnel,
            carried: StreamTally::default(),
            draining: AtomicBool::new(false),
            _up: link
                .metrics
                .tunnel_up(Direction::Dialed, &link.label, transport),
            peer: None,
        })
    };
    // One future per connection, kept across reloads: QUIC's reads the drain notice, which
    // must not be cut off half read.
    let retirement = |pooled: &Arc<Pooled<D::Tunnel>>| {
        let pooled = pooled.clone();
        Box::pin(async move { pooled.tunnel.retired().await })
    };
    'dial: loop {
        certs.borrow_and_update();
        // The trust generation before the configuration the dial takes, as the server does.
        let mut verified_under = *trust.borrow_and_update();
        let dialed = tokio::select! {
            d = link.dial() => d,
            _ = stop.wait_for(|s| *s) => return,
        };
        let mut current = match dialed {
            Ok(tunnel) => pooled(tunnel),
            Err(e) => {
                if link.covered.load(Ordering::Relaxed) {
                    debug!(%peer, transport, slot, "tunnel connect failed: {e}; retrying in {backoff:?}");
                } else {
                    warn!(%peer, transport, slot, "tunnel connect failed: {e}; retrying in {backoff:?}");
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        backoff = FIRST_BACKOFF;
        info!(%peer, transport, slot, "tunnel connection up");
        pool.live.send_modify(|v| v.push((slot, current.clone())));
        let mut retired = retirement(&current);
        let retired = loop {
            tokio::select! {
                r = &mut retired => break r,
                Ok(()) = certs.changed() => {}
                Ok(()) = trust.changed() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let generation = *trust.borrow_and_update();
            certs.borrow_and_update();
            let renewed = tokio::select! {
                d = link.dial() => d,
                r = &mut retired => break r,
                _ = stop.wait_for(|s| *s) => return,
            };
            match renewed {
                Ok(tunnel) => {
                    let old = std::mem::replace(&mut current, pooled(tunnel));
                    pool.live.send_modify(|v| v.push((slot, current.clone())));
                    retired = retirement(&current);
                    verified_under = generation;
                    let app_connections = pool.let_go(&old);
                    info!(%peer, transport, slot, app_connections, "tunnel connection renewed with the reloaded certificates; the old one's app connections finish on it");
                }
                Err(e) if generation != verified_under => {
                    let app_connections = pool.let_go(&current);
                    warn!(%peer, transport, slot, app_connections, "tunnel connect with the reloaded certificates failed: {e}; the connection verified under the CAs trusted before leaves the pool (its app connections finish on it); reconnecting");
                    continue 'dial;
                }
                Err(e) => {
                    warn!(%peer, transport, slot, "tunnel connect with the reloaded certificates failed: {e}; keeping the connection made with the ones before")
                }
            }
        };
        // One line for the connection, however many app connections it carried.
        match retired {
            Retirement::Draining => {
                let app_connections = pool.let_go(&current);
                info!(%peer, transport, slot, app_connections, "{retired}: its app connections finish on it, new ones go to the next; reconnecting")
            }
            Retirement::Lost(_) => {
                pool.remove(&current);
                let app_connections_reset = current.carried.cut_off_once_settled().await;
                warn!(%peer, transport, slot, app_connections_reset, "{retired}; reconnecting")
            }
        }
    }
}

/// A client stream's receiving half that times the server's answer to the open: the first
/// read completes with it.
struct Answered<R> {
    recv: R,
    timer: Option<OpenTimer>,
}

impl<R: StreamRecv> Answered<R> {
    /// After a read: anything but a lost connection is the server's answer.
    fn answered<T>(&mut self, received: &Result<T, StreamError>) {
        if matches!(received, Err(StreamError::ConnectionLost(_))) {
            return;
        }
        if let Some(timer) = self.timer.take() {
            timer.observe();
        }
    }
}

impl<R: StreamRecv> StreamRecv for Answered<R> {
    async fn recv(&mut self) -> Result<Option<bytes::Bytes>, StreamError> {
        let received = self.recv.recv().await;
        self.answered(&received);
        received
    }

    async fn recv_batch(
        &mut self,
        batch: &mut Vec<bytes::Bytes>,
        max: usize,
    ) -> Result<bool, StreamError> {
        let received = self.recv.recv_batch(batch, max).await;
        self.answered(&received);
        received
    }

    fn stop(&mut self, code: amb_proto::ResetCode) {
        self.recv.stop(code)
    }
}

/// The client's configuration and trust generation, as the reloader keeps them.
type CertsWatch = (
    watch::Receiver<Arc<amb_pki::rustls::ClientConfig>>,
    watch::Receiver<u64>,
);

/// Where a listener's new connections go: the route they ask for, over its peers' links.
struct Target {
    route: RouteName,
    choices: Vec<Choice>,
    /// With no choices: the service-side ambassadors connected in carry its connections.
    accepted: Option<Arc<AppSide>>,
    /// The route's counters.
    metrics: RouteMetrics,
}

/// An app connection on its way: its socket, where and when it came from, its count.
pub(crate) struct AppConnection {
    pub(crate) tcp: TcpStream,
    pub(crate) app: SocketAddr,
    pub(crate) arrived: Instant,
    pub(crate) counted: OpenConnection,
    /// What it sent on a stream whose tunnel connection was lost unanswered, to send again.
    pub(crate) first: Option<Box<FirstFlight>>,
}

impl AppConnection {
    /// Refuses it (resets the app's socket) for `reason` (`why`, to log), after trying `peer`
    /// if any: a warning (at most one a second per route and reason), counted, one access line.
    pub(crate) fn refuse(
        mut self,
        (route, peer): (&RouteName, Option<&str>),
        reason: &'static str,
        why: std::fmt::Arguments<'_>,
        accepting: &Accepting,
    ) {
        let app = self.app;
        if let Some(suppressed) = accepting.refusals.allow((route.to_string(), reason)) {
            let peer = peer.map(tracing::field::display);
            warn!(%app, %route, peer, %reason, suppressed, "{why}; resetting the app connection");
        }
        self.counted.refused(reason);
        Access {
            route,
            app: Some(&self.app),
            peer: peer.as_ref().map(|p| p as &dyn std::fmt::Display),
            upstream: None,
            up: 0,
            down: 0,
            since: self.arrived,
            end: ConnectionEnd::Refused,
            reason: Some(&reason),
        }
        .log(accepting.access_log);
        reset_tcp(self.tcp);
    }
}

/// One peer a listener's connections may take, and its standing among the others.
#[derive(Clone)]
struct Choice {
    link: Link,
    /// Lower first (SRV); 0 for listed peers.
    priority: u16,
    weight: u32,
}

impl Choice {
    fn listed(link: Link) -> Self {
        Choice {
            link,
            priority: 0,
            weight: 1,
        }
    }
}

impl Target {
    /// The link (its index) a new app connection goes over, of those with a tunnel connection
    /// up now (not lost, not draining), as `balance` picks among the lowest priority that has
    /// one: least-conn, fewest app connections per weight; failover, the first in order;
    /// round-robin, in turn by weight. `None` if none has one up.
    fn pick_live(&self, balance: Balance, turn: usize) -> Option<usize> {
        let candidates: Vec<Candidate> = self
            .choices
            .iter()
            .map(|choice| {
                let load = choice.link.live_load();
                Candidate {
                    weight: choice.weight,
                    priority: choice.priority,
                    open: load.unwrap_or(0),
                    eligible: load.is_some(),
                }
            })
            .collect();
        pick(balance, &candidates, turn, |n| {
            rand::rng().random_range(0..n)
        })
    }

    /// Carries one app connection: over a peer with a tunnel connection up now, at once; if
    /// none has one, over the first to get one, within the tunnel wait. A peer whose tunnel is
    /// lost under the connection (before any of its bytes were read) hands it to the next.
    /// The nested futures share the one `conn` (held here, lent down): each level holding its
    /// own copy cost idle memory per connection.
    async fn carry(&self, conn: AppConnection, accepting: &Accepting) {
        let (route, wait) = (&self.route, accepting.tunnel_wait);
        let mut conn = Some(conn);
        match &self.choices[..] {
            [] if self.accepted.is_some() => {
                if let Some(side) = &self.accepted {
                    side.carry(&mut conn, route, accepting).await;
                }
                return;
            }
            [] => {
                let why = format_args!("no peer discovered yet");
                if let Some(conn) = conn {
                    conn.refuse((route, None), "no_peer", why, accepting);
                }
                return;
            }
            [one] => {
                one.link
                    .carry(&mut conn, route, (wait, false), accepting)
                    .await;
                return;
            }
            _ => {}
        }
        let deadline = tokio::time::Instant::now() + wait;
        let turn = accepting.turn.fetch_add(1, Ordering::Relaxed);
        let mut untried = self.clone_choices();
        while !untried.choices.is_empty() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let index = match untried.pick_live(accepting.peer_balance, turn) {
                Some(i) => i,
                None => {
                    let links = untried.choices.iter().map(|c| Box::pin(c.link.wait_live()));
                    match tokio::time::timeout(left, select_all(links)).await {
                        Ok((_, i, _)) => i,
                        Err(_) => break,
                    }
                }
            };
            let link = untried.choices.remove(index).link;
            let hand_back = !untried.choices.is_empty();
            link.carry(&mut conn, route, (left, hand_back), accepting)
                .await;
            if conn.is_none() {
                return;
            }
        }
        let why = format_args!(
            "no tunnel connection to any peer ({}) within {wait:?}",
            self.peers()
        );
        if let Some(conn) = conn {
            conn.refuse((route, None), "no_tunnel", why, accepting);
        }
    }

    fn clone_choices(&self) -> Target {
        Target {
            route: self.route.clone(),
            choices: self.choices.clone(),
            accepted: self.accepted.clone(),
            metrics: self.metrics.clone(),
        }
    }

    /// Whether a new app connection would find a tunnel connection up now; else why not.
    fn ready(&self) -> Result<(), String> {
        if let Some(side) = self
            .choices
            .is_empty()
            .then_some(())
            .and(self.accepted.as_ref())
        {
            return match side.live_load() {
                Some(_) => Ok(()),
                None => Err(format!(
                    "route {}: no service-side ambassador connected",
                    self.route
                )),
            };
        }
        match self.choices.iter().any(|c| c.link.live_load().is_some()) {
            true => Ok(()),
            false if self.choices.is_empty() => {
                Err(format!("route {}: no peer discovered yet", self.route))
            }
            false => Err(format!(
                "route {}: no tunnel connection up to {}",
                self.route,
                self.peers()
            )),
        }
    }

    /// The peers, for the log.
    fn peers(&self) -> String {
        let names: Vec<&str> = self.choices.iter().map(|c| c.link.name()).collect();
        names.join(",")
    }
}

/// What every listener's accept loop shares.
pub(crate) struct Accepting {
    pub(crate) live: TaskTracker,
    slots: Arc<Semaphore>,
    throttle: LogThrottle,
    tunnel_wait: Duration,
    max_connections: usize,
    peer_balance: Balance,
    /// Round-robin's position over peers.
    turn: AtomicUsize,
    pub(crate) access_log: bool,
    /// Refusals logged at most once a second per route and reason.
    pub(crate) refusals: LogThrottles<(String, &'static str)>,
}

impl Accepting {
    /// For listeners that carry up to `max_connections` app connections at once, waiting up
    /// to `tunnel_wait` for a tunnel and spreading them over peers as `peer_balance` says.
    pub(crate) fn new(
        max_connections: usize,
        tunnel_wait: Duration,
        peer_balance: Balance,
        access_log: bool,
    ) -> Self {
        Accepting {
            live: TaskTracker::new(),
            slots: Arc::new(Semaphore::new(max_connections)),
            throttle: LogThrottle::default(),
            tunnel_wait,
            max_connections,
            peer_balance,
            turn: AtomicUsize::new(0),
            access_log,
            refusals: LogThrottles::default(),
        }
    }
}

/// A link in service, and what stops its supervisors.
struct RunningLink {
    link: Link,
    stop: watch::Sender<bool>,
}

/// A listener in service: what it was configured as, where its connections go, and what stops
/// its accept loop.
struct RunningListener {
    spec: ListenerSpec,
    target: Arc<ArcSwap<Target>>,
    stop: watch::Sender<bool>,
}

/// A discovered set of peers in service: its source, and the servers its latest answer lists.
struct RunningDiscovery {
    discovery: Discovery,
    found: watch::Receiver<Discovered>,
    /// Each server (in the answer's order) and the choice of its link: a change is merged in,
    /// server by server, so a registry of a thousand costs per change only what changed.
    servers: Vec<(Located, Choice)>,
}

/// The links, discoveries and listeners in service, changed by a [`Relisten`] or a
/// discovered set's change.
struct Running {
    /// By peer: a discovered set of a thousand servers is looked up per change, not scanned.
    links: HashMap<PeerSpec, RunningLink>,
    discoveries: Vec<RunningDiscovery>,
    listeners: Vec<RunningListener>,
    accepting: Arc<Accepting>,
    makes: LinkMaker,
    certs: CertsWatch,
    connections: usize,
    drain_timeout: Duration,
    supervisors: TaskTracker,
    ready: Arc<ClientReady>,
    /// The service-side ambassadors connected in, if the client accepts them.
    app_side: Option<Arc<AppSide>>,
}

/// A client's `/readyz`: ready while it serves and each listener can reach one of its peers
/// (a tunnel connection is up).
#[derive(Default)]
struct ClientReady {
    listeners: std::sync::Mutex<Vec<Arc<ArcSwap<Target>>>>,
    serving: AtomicBool,
}

impl ClientReady {
    fn listeners(&self) -> std::sync::MutexGuard<'_, Vec<Arc<ArcSwap<Target>>>> {
        self.listeners
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Readiness for ClientReady {
    fn ready(&self) -> Result<(), String> {
        if !self.serving.load(Ordering::Relaxed) {
            return Err("the client is starting or shutting down".to_owned());
        }
        self.listeners().iter().try_for_each(|t| t.load().ready())
    }
}

impl Running {
    fn start_link(&mut self, link: Link) {
        let (stop, stopped) = watch::channel(false);
        link.supervise(self.connections, &self.certs, &stopped, &self.supervisors);
        self.links
            .insert(link.peer().clone(), RunningLink { link, stop });
    }

    /// Starts following the discovered sets among `spec`'s peers that are not followed yet.
    fn start_discoveries(&mut self, spec: &ListenerSpec) {
        for discovery in spec.peers.iter().filter_map(PeerSpec::discovery) {
            if self.discovery(discovery).is_none() {
                let found = discover(discovery, Role::Peer, &self.makes.resolver);
                self.discoveries.push(RunningDiscovery {
                    discovery: discovery.clone(),
                    found,
                    servers: Vec::new(),
                });
            }
        }
    }

    fn discovery(&self, discovery: &Discovery) -> Option<&RunningDiscovery> {
        self.discoveries.iter().find(|d| d.discovery == *discovery)
    }

    /// Waits (up to a lookup's limit) until each discovered set has its first answer, so
    /// that the first app connections find its peers.
    async fn first_answers(&self) {
        let answers = self.discoveries.iter().map(|d| {
            let mut found = d.found.clone();
            async move {
                let _ = found.wait_for(Option::is_some).await;
            }
        });
        let _ = tokio::time::timeout(LOOKUP_LIMIT, join_all(answers)).await;
    }

    /// The choices of `spec`'s peers, all started: its listed peers and the servers its
    /// discovered sets list now.
    fn choices_for(&self, spec: &ListenerSpec) -> Vec<Choice> {
        let mut choices = Vec::new();
        for peer in &spec.peers {
            match peer.discovery().and_then(|d| self.discovery(d)) {
                Some(found) => choices.extend(found.servers.iter().map(|(_, c)| c.clone())),
                None => choices.extend(self.link_to(peer).cloned().map(Choice::listed)),
            }
        }
        choices
    }

    /// Where `spec`'s new connections go now.
    fn target(&self, spec: &ListenerSpec) -> Target {
        Target {
            route: spec.route.clone(),
            choices: self.choices_for(spec),
            accepted: spec
                .peers
                .is_empty()
                .then(|| self.app_side.clone())
                .flatten(),
            metrics: self.makes.metrics.route(Side::Client, spec.route.as_str()),
        }
    }

    fn start_listener(&mut self, socket: TcpListener, spec: ListenerSpec) {
        let (stop, stopped) = watch::channel(false);
        let target = self.target(&spec);
        if let Ok(addr) = socket.local_addr() {
            let mut peers: Vec<String> = spec.peers.iter().map(ToString::to_string).collect();
            if let Some(side) = &target.accepted {
                peers.push(format!("accepted on {}", side.name()));
            }
            let (route, peer, transport) =
                (&spec.route, peers.join(","), self.makes.transport_name());
            info!(listen = %addr, %route, %peer, transport, "amb client listening");
        }
        let target = Arc::new(ArcSwap::from_pointee(target));
        tokio::spawn(accept(
            socket,
            target.clone(),
            stopped,
            self.accepting.clone(),
        ));
        self.ready.listeners().push(target.clone());
        self.listeners.push(RunningListener { spec, target, stop });
    }

    fn link_to(&self, peer: &PeerSpec) -> Option<&Link> {
        self.links.get(peer).map(|l| &l.link)
    }

    /// Applies a replacement of the listeners (see [`Listeners::replace`]).
    fn relisten(
        &mut self,
        listens: Vec<ListenerSpec>,
        peers: &[PeerSpec],
    ) -> Result<usize, EngineError> {
        let listens = with_peers(listens, peers, self.app_side.is_some())?;
        let running: Vec<ListenerSpec> = self.listeners.iter().map(|l| l.spec.clone()).collect();
        let changes = diff_listeners(&running, &listens);
        // Everything that can fail first: the links to new peers, the new sockets.
        let mut new_links: Vec<Link> = Vec::new();
        let mut sockets = Vec::new();
        for change in &changes {
            let spec = match change {
                ListenerChange::Added(spec) => {
                    sockets.push(bind_tcp(spec.addr)?);
                    spec
                }
                ListenerChange::Changed { new, .. } => new,
                ListenerChange::Removed(_) => continue,
            };
            for peer in spec.peers.iter().filter(|p| p.discovery().is_none()) {
                if self.link_to(peer).is_none() && !new_links.iter().any(|l| l.peer() == peer) {
                    new_links.push(self.makes.make(peer, &peer.to_string())?);
                }
            }
        }
        for link in new_links {
            info!(peer = %link.name(), transport = link.transport(), "new peer: connecting");
            self.start_link(link);
        }
        let mut sockets = sockets.into_iter();
        for change in &changes {
            match change {
                ListenerChange::Added(spec) => {
                    self.start_discoveries(spec);
                    let socket = sockets.next().expect("bound above");
                    self.start_listener(socket, spec.clone());
                }
                ListenerChange::Removed(spec) => {
                    if let Some(i) = self.listeners.iter().position(|l| l.spec == *spec) {
                        let gone = self.listeners.swap_remove(i);
                        let _ = gone.stop.send(true);
                        (self.ready.listeners()).retain(|t| !Arc::ptr_eq(t, &gone.target));
                        info!(listen = %spec.addr, route = %spec.route, "listener removed; its app connections go on");
                    }
                }
                ListenerChange::Changed { old, new } => {
                    self.start_discoveries(new);
                    let target = self.target(new);
                    if let Some(running) = self.listeners.iter_mut().find(|l| l.spec == *old) {
                        info!(listen = %new.addr, route = %new.route, peer = %target.peers(), "listener changed; new app connections follow it");
                        running.target.store(Arc::new(target));
                        running.spec = new.clone();
                    }
                }
            }
        }
        // A newly followed set's servers are linked once it answers.
        self.retire_unused(self.drain_timeout);
        Ok(changes.len())
    }

    /// Takes in what the discovered sets answered since last time: links to the servers they
    /// list now, the listeners that use them retargeted at once (new app connections follow);
    /// servers no set lists any more are let go once their app connections end.
    fn rediscover(&mut self) {
        let Some(went) = self.take_answers() else {
            return;
        };
        for listener in &self.listeners {
            if listener.spec.peers.iter().any(|p| p.discovery().is_some()) {
                listener.target.store(Arc::new(self.target(&listener.spec)));
            }
        }
        // A server that left a set keeps its app connections until they end.
        for peer in went {
            self.retire_if_unused(&peer, Duration::MAX);
        }
    }

    /// Takes each discovered set's new answer, if any: servers that came get a link (started
    /// unless one to them runs already), servers still listed keep theirs. `None` if nothing
    /// changed; else the peers of the servers that went.
    fn take_answers(&mut self) -> Option<Vec<PeerSpec>> {
        let mut went = Vec::new();
        let mut changed = false;
        for i in 0..self.discoveries.len() {
            let found = &mut self.discoveries[i].found;
            if !found.has_changed().unwrap_or(false) {
                continue;
            }
            let Some(Ok(answer)) = found.borrow_and_update().clone() else {
                continue;
            };
            changed = true;
            // Both lists are sorted: one walk pairs what stays and finds what came and went.
            let before = std::mem::take(&mut self.discoveries[i].servers);
            let mut before = before.into_iter().peekable();
            let mut now = Vec::with_capacity(answer.len());
            for server in answer.iter() {
                while let Some((gone, choice)) = before.next_if(|(old, _)| old < server) {
                    went.push((gone, choice.link.peer().clone()));
                }
                match before.next_if(|(old, _)| old == server) {
                    Some(kept) => now.push(kept),
                    None => {
                        let label = self.discoveries[i].discovery.to_string();
                        now.extend(self.choose(server, &label).map(|c| (server.clone(), c)))
                    }
                }
            }
            went.extend(before.map(|(gone, choice)| (gone, choice.link.peer().clone())));
            self.discoveries[i].servers = now;
        }
        changed.then(|| went.into_iter().map(|(_, peer)| peer).collect())
    }

    /// The choice of a discovered server's link, the link started unless it runs already.
    fn choose(&mut self, server: &Located, label: &str) -> Option<Choice> {
        let peer = located_peer(server)?;
        let link = match self.link_to(&peer) {
            Some(link) => link.clone(),
            None => match self.makes.make(&peer, label) {
                Ok(link) => {
                    info!(peer = %link.name(), transport = link.transport(), "discovered peer: connecting");
                    self.start_link(link.clone());
                    link
                }
                Err(e) => {
                    warn!(%peer, "discovered peer left out: {e}");
                    return None;
                }
            },
        };
        Some(Choice {
            link,
            priority: server.priority,
            weight: srv_weight(server.weight),
        })
    }

    /// Lets `peer`'s link go unless a listener or a discovered set still uses it.
    fn retire_if_unused(&mut self, peer: &PeerSpec, drain: Duration) {
        let listed = self.listeners.iter().any(|l| l.spec.peers.contains(peer));
        let discovered =
            (self.discoveries.iter()).any(|d| d.servers.iter().any(|(_, c)| c.link.peer() == peer));
        if !listed && !discovered {
            self.retire(peer, drain);
        }
    }

    /// Resolves when a discovered set has a new answer.
    fn next_discovery(&self) -> impl Future<Output = ()> + 'static {
        let watches: Vec<watch::Receiver<Discovered>> =
            self.discoveries.iter().map(|d| d.found.clone()).collect();
        async move {
            if watches.is_empty() {
                return std::future::pending().await;
            }
            let changes = watches.into_iter().map(|mut found| {
                Box::pin(async move {
                    if found.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                })
            });
            select_all(changes).await;
        }
    }

    /// Stops the links and discoveries no listener uses: no more dials; their tunnel
    /// connections close once the app connections on them end, or at `drain`.
    fn retire_unused(&mut self, drain: Duration) {
        let listeners = &self.listeners;
        let in_use = |peer: &PeerSpec| listeners.iter().any(|l| l.spec.peers.contains(peer));
        self.discoveries.retain(|d| {
            listeners.iter().any(|l| {
                l.spec
                    .peers
                    .iter()
                    .any(|p| p.discovery() == Some(&d.discovery))
            })
        });
        let discovered: HashSet<&PeerSpec> = (self.discoveries.iter())
            .flat_map(|d| d.servers.iter().map(|(_, c)| c.link.peer()))
            .collect();
        let unused: Vec<PeerSpec> = (self.links.keys())
            .filter(|peer| !discovered.contains(peer) && !in_use(peer))
            .cloned()
            .collect();
        for peer in unused {
            self.retire(&peer, drain);
        }
    }

    /// Stops `peer`'s link: no more dials; its tunnel connections close once the app
    /// connections on them end, or at `drain`.
    fn retire(&mut self, peer: &PeerSpec, drain: Duration) {
        if let Some(RunningLink { link, stop }) = self.links.remove(peer) {
            let _ = stop.send(true);
            info!(peer = %link.name(), transport = link.transport(), "peer no longer used: letting it go once its app connections end");
            tokio::spawn(link.retire(drain));
        }
    }

    /// Stops every accept loop and supervisor.
    fn stop(&self) {
        for listener in &self.listeners {
            let _ = listener.stop.send(true);
        }
        for link in self.links.values() {
            let _ = link.stop.send(true);
        }
    }
}

/// Where a listener's app connections go: over tunnel connections ([`Target`]), or each
/// straight to a TLS service ([`crate::direct`]).
pub(crate) trait Carrier: Send + Sync + 'static {
    /// The route its connections are counted and logged under.
    fn route(&self) -> &RouteName;
    /// Counts a new app connection open.
    fn counted(&self) -> OpenConnection;
    /// Carries one app connection to its end.
    fn carry(&self, conn: AppConnection, accepting: &Accepting) -> impl Future<Output = ()> + Send;
}

impl Carrier for Target {
    fn route(&self) -> &RouteName {
        &self.route
    }

    fn counted(&self) -> OpenConnection {
        self.metrics.connection()
    }

    fn carry(&self, conn: AppConnection, accepting: &Accepting) -> impl Future<Output = ()> + Send {
        Target::carry(self, conn, accepting)
    }
}

/// One listener's accept loop, until `stop`.
pub(crate) async fn accept<C: Carrier>(
    listener: TcpListener,
    target: Arc<ArcSwap<C>>,
    mut stop: watch::Receiver<bool>,
    shared: Arc<Accepting>,
) {
    let max = shared.max_connections;
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => return,
        };
        match accepted {
            Ok((tcp, app)) => {
                let arrived = Instant::now();
                let target = target.load_full();
                let conn = AppConnection {
                    tcp,
                    app,
                    arrived,
                    counted: target.counted(),
                    first: None,
                };
                let Ok(slot) = shared.slots.clone().try_acquire_owned() else {
                    let why = format_args!("at --max-connections {max}");
                    conn.refuse((target.route(), None), "unavailable", why, &shared);
                    continue;
                };
                let accepting = shared.clone();
                shared.live.spawn(async move {
                    target.carry(conn, &accepting).await;
                    drop(slot);
                });
            }
            Err(e) => {
                // Typically out of descriptors: log at a limited rate and back off instead of
                // spinning on an accept that keeps failing.
                if let Some(suppressed) = shared.throttle.allow() {
                    warn!(listen = ?listener.local_addr().ok(), suppressed, "accept failed: {e}");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Runs the listeners over the `links` to peers and the service sides connected to `app_side`.
async fn run(
    (links, app_side): (Vec<Link>, Option<Arc<AppSide>>),
    certs: CertsWatch,
    listeners: Vec<Listener>,
    makes: LinkMaker,
    settings: ClientSettings,
    mut relisten: mpsc::UnboundedReceiver<Relisten>,
    shutdown: impl Future<Output = ()>,
) {
    let accepting = Arc::new(Accepting::new(
        settings.max_connections,
        settings.tunnel_wait,
        settings.peer_balance,
        settings.access_log,
    ));
    let mut running = Running {
        links: HashMap::new(),
        discoveries: Vec::new(),
        listeners: Vec::new(),
        accepting: accepting.clone(),
        makes,
        certs,
        connections: settings.connections.max(1),
        drain_timeout: settings.limits.drain_timeout,
        supervisors: TaskTracker::new(),
        ready: Arc::default(),
        app_side,
    };
    settings.metrics.add_readiness(running.ready.clone());
    for link in &links {
        running.start_link(link.clone());
    }
    for listener in &listeners {
        running.start_discoveries(&listener.spec);
    }
    running.first_answers().await;
    running.take_answers();
    for Listener { socket, spec } in listeners {
        running.start_listener(socket, spec);
    }
    running.ready.serving.store(true, Ordering::Relaxed);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(Relisten { listens, peers, accept_allow, done }) = relisten.recv() => {
                let reallowed = match (&running.app_side, accept_allow) {
                    (Some(side), Some(allow)) => side.reallow(allow),
                    _ => Ok(()),
                };
                let _ = done.send(reallowed.and_then(|()| running.relisten(listens, &peers)));
            }
            () = running.next_discovery() => running.rediscover(),
        }
    }
    running.ready.serving.store(false, Ordering::Relaxed);
    running.stop();
    if let Some(side) = &running.app_side {
        side.stop_accepting();
    }
    let live = &accepting.live;
    live.close();
    info!(live_connections = live.len(), drain = ?settings.limits.drain_timeout, "shutting down: no new connections");
    if tokio::time::timeout(settings.limits.drain_timeout, live.wait())
        .await
        .is_err()
    {
        warn!(
            live_connections = live.len(),
            "drain timeout reached; closing live connections"
        );
    }
    running.supervisors.close();
    join_all(running.links.values().map(|l| l.link.close())).await;
    if let Some(side) = &running.app_side {
        side.close().await;
    }
}

/// Carries one app connection: take a warm tunnel, open a stream, relay.
///
/// With `hand_back` (other peers could take it), a connection whose tunnel was lost before
/// any of its bytes were read is handed back at once when no other tunnel to this peer is up,
/// rather than waiting for a redial here. So is one whose stream was sent on a tunnel
/// connection that was then lost unanswered with nothing heard on it since (the server died):
/// what the app sent goes again on the next stream (a transport that cannot tell a dead server
/// from a lost answer never sends a stream again).
pub(crate) async fn carry<T: Tunnel>(
    slot: &mut Option<AppConnection>,
    route: &RouteName,
    (peer, pool): (&str, &Pool<T>),
    (wait, hand_back): (Duration, bool),
    accepting: &Accepting,
) {
    let Some((app, destination)) = slot.as_ref().map(|conn| (conn.app, conn.tcp.local_addr()))
    else {
        return;
    };
    // What the server's PROXY header tells an upstream, where its route sends one.
    let origin = AppAddrs {
        source: app,
        destination: destination.unwrap_or(app),
    };
    let refuse = |slot: &mut Option<AppConnection>, reason, why: std::fmt::Arguments<'_>| {
        if let Some(conn) = slot.take() {
            conn.refuse((route, Some(peer)), reason, why, accepting);
        }
    };
    let deadline = tokio::time::Instant::now() + wait;
    let mut failed = Vec::new();
    loop {
        let (pooled, send, recv, heard) = loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let give_back = hand_back && !failed.is_empty();
            let wait_here = if give_back { Duration::ZERO } else { left };
            let Some(pooled) = pool.get(wait_here, &failed).await else {
                if give_back {
                    debug!(%app, %route, %peer, "tunnel connection lost; handing the app connection to another peer");
                    return;
                }
                return refuse(
                    slot,
                    "no_tunnel",
                    format_args!("no tunnel connection within {wait:?}"),
                );
            };
            // Taken before the stream goes out: unchanged at a loss, nothing came back.
            let heard = pooled.tunnel.heard();
            let opened = tokio::time::timeout(left, pooled.tunnel.open(route, origin)).await;
            // What an earlier, unanswered stream of this app connection sent, again: whole or
            // not at all (a stream dropped half-sent would end in a FIN, passing a cut request
            // on as a whole one).
            let opened = match (opened, slot.as_ref().and_then(|c| c.first.as_deref())) {
                (Ok(Ok((mut send, recv))), Some(first)) => match first.resend(&mut send).await {
                    Ok(()) => Ok(Ok((send, recv))),
                    Err(e) => {
                        send.reset(ResetCode::CANCEL);
                        Ok(Err(e))
                    }
                },
                (opened, _) => opened,
            };
            match opened {
                Ok(Ok((send, recv))) => break (pooled, send, recv, heard),
                // The tunnel died under us and no app byte was read yet (or only bytes kept to
                // send again): take another, or the one the supervisor dials next, within the
                // same wait.
                Ok(Err(StreamError::ConnectionLost(e))) => {
                    debug!(%app, %route, %peer, "stream open failed: tunnel connection lost: {e}; trying another");
                    failed.push(pooled);
                }
                Ok(Err(e)) => {
                    let reason = match e {
                        StreamError::Refused(refusal) => refusal.name(),
                        _ => "stream_failed",
                    };
                    return refuse(slot, reason, format_args!("stream open failed: {e}"));
                }
                Err(_) => {
                    let why = format_args!("stream open failed: no stream credit within {wait:?} (server at its --max-streams)");
                    return refuse(slot, "no_stream_credit", why);
                }
            }
        };
        // Tunnel connections found dead are not held while this one carries the app.
        failed = Vec::new();
        let peer = pooled.peer.as_deref().unwrap_or(peer);
        let Some(AppConnection {
            tcp,
            app,
            arrived,
            mut counted,
            first,
        }) = slot.take()
        else {
            return;
        };
        // Sent again on this stream: counted as the app's bytes that went up.
        let resent = first.as_ref().map_or(0, |f| f.len() as u64);
        if first.is_some() {
            // Carried again: a normal close is a FIN once more (see the hand-back below).
            let _ = socket2::SockRef::from(&tcp).set_linger(None);
        }
        // On Linux the socket inherited TCP_NODELAY from its listener (`bind_tcp`).
        #[cfg(not(target_os = "linux"))]
        let _ = tcp.set_nodelay(true);
        let running = pooled.carried.start();
        // The server answers the open on the stream's first read (with the first reply, or
        // before); timed from the app connection's arrival.
        let recv = Answered {
            recv,
            timer: Some(counted.open_timer(arrived.into_std())),
        };
        // Kept until the server answers, where the transport can tell a dead server.
        let first = first.or_else(|| heard.map(|_| Box::default()));
        let unheard = |_: &RelayError| heard.is_some() && pooled.tunnel.heard() == heard;
        let Relayed { bytes, result } = match relay_keeping(tcp, send, recv, first, unheard).await {
            Ok(relayed) => relayed,
            Err(Unanswered { socket, flight, .. }) => {
                running.ended(StreamEnd::Closed);
                let kept = flight.len();
                debug!(%app, %route, %peer, kept, "tunnel connection lost before the server answered; carrying the app connection again");
                // Its bytes were read from the kernel: if it is dropped while it waits (the
                // client shutting down), the app must see a reset, not a clean end.
                let _ = socket2::SockRef::from(&socket).set_linger(Some(Duration::ZERO));
                *slot = Some(AppConnection {
                    tcp: socket,
                    app,
                    arrived,
                    counted,
                    first: Some(flight),
                });
                failed.push(pooled);
                continue;
            }
        };
        let (end, stream_end) = match &result {
            Ok(()) => (ConnectionEnd::Ok, StreamEnd::Closed),
            Err(RelayError::Tunnel(StreamError::Refused(refusal))) => {
                let reason = refusal.name();
                if let Some(suppressed) = accepting.refusals.allow((route.to_string(), reason)) {
                    warn!(%app, %route, %peer, %reason, suppressed, "stream refused: {refusal}; resetting the app connection");
                }
                counted.refused(reason);
                (ConnectionEnd::Refused, StreamEnd::Closed)
            }
            Err(e @ RelayError::Tunnel(StreamError::ConnectionLost(_))) => {
                if pooled.draining.load(Ordering::Relaxed) {
                    warn!(%app, %route, %peer, "connection reset: {e} (the server's drain ended)");
                } else {
                    // Counted in the one line that logs the tunnel connection's loss.
                    debug!(%app, %route, %peer, "connection reset: {e}");
                }
                (ConnectionEnd::Reset, StreamEnd::ConnectionLost)
            }
            Err(e) => {
                warn!(%app, %route, %peer, "connection reset: {e}");
                (ConnectionEnd::Reset, StreamEnd::Closed)
            }
        };
        running.ended(stream_end);
        // The app is the socket: what it sent into the tunnel went up.
        let (up, down) = (bytes.to_tunnel + resent, bytes.from_tunnel);
        counted.ended(end, up, down);
        Access {
            route,
            app: Some(&app),
            peer: Some(&peer),
            upstream: None,
            up,
            down,
            since: arrived,
            end,
            reason: result.as_ref().err().map(|e| e as &dyn std::fmt::Display),
        }
        .log(accepting.access_log);
        return;
    }
}
