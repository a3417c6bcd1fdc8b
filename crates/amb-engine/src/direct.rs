//! Client-only mode (`amb client --tls-upstream`), the stunnel client role: each app
//! connection is carried as its own TLS connection straight to a TLS service, with no amb
//! server, through the same listeners, limits, metrics and access log as the tunnel client.
//! The service is dialed as a server route's upstreams are ([`UpstreamSet`]: lookups, several
//! addresses, passive health, TLS verified against the given CA).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use amb_metrics::{ConnectionEnd, Metrics, OpenConnection, Readiness, Side};
use amb_proto::RouteName;
use amb_spec::{diff_listeners, Balance, ListenerChange, ListenerSpec, UpstreamSetSpec};
use arc_swap::ArcSwap;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

use crate::access::Access;
use crate::client::{accept, Accepting, AppConnection, Carrier};
use crate::endpoints::Resolver;
use crate::relay::reset_tcp;
use crate::upstream_set::UpstreamSet;
use crate::{bind_tcp, EngineError, MetricsEndpoint};

/// Everything client-only mode needs.
#[derive(Clone, Debug)]
pub struct DirectSettings {
    /// The TLS service each app connection is carried to, its TLS (`tls` must be set).
    pub service: UpstreamSetSpec,
    /// Local listeners; their route names label metrics and log lines.
    pub listens: Vec<ListenerSpec>,
    /// How long one connection to the service (TCP and TLS handshake) may take.
    pub connect_timeout: Duration,
    /// App connections carried at once; more are reset at once.
    pub max_connections: usize,
    /// How long live connections may run on after a shutdown signal.
    pub drain_timeout: Duration,
    /// The DNS server the service's name is looked up at; `None`: the system's.
    pub dns_server: Option<SocketAddr>,
    /// What the client counts into.
    pub metrics: Arc<Metrics>,
    /// Where `/metrics`, `/healthz` and `/readyz` are served, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// One `info` line per app connection when it ends.
    pub access_log: bool,
    /// How often its config file is checked for a change (for the caller that follows it);
    /// `None`: only on SIGHUP.
    pub reload_check: Option<Duration>,
}

/// A bound client in client-only mode, ready to run.
pub struct DirectClient {
    listeners: Vec<(TcpListener, ListenerSpec)>,
    endpoint: MetricsEndpoint,
    settings: DirectSettings,
    redirect: (
        mpsc::UnboundedSender<Redirect>,
        mpsc::UnboundedReceiver<Redirect>,
    ),
}

/// Swaps a running client-only process's listeners and service (its config file reloaded).
#[derive(Clone)]
pub struct DirectListeners(mpsc::UnboundedSender<Redirect>);

/// A replacement of the listeners and the service, and where its outcome goes.
struct Redirect {
    listens: Vec<ListenerSpec>,
    service: UpstreamSetSpec,
    done: oneshot::Sender<Result<usize, EngineError>>,
}

impl DirectListeners {
    /// Swaps in `listens` and `service`: new listeners are bound, removed ones stop accepting
    /// (their app connections go on), one whose route changed keeps its socket; a changed
    /// service (addresses, balance, TLS files as read now) takes every listener's new
    /// connections, keeping what was known of the addresses it still lists. All or nothing:
    /// if a new listener cannot be bound, nothing changes. Returns how many listeners changed,
    /// and one more if the service did.
    pub async fn replace(
        &self,
        listens: Vec<ListenerSpec>,
        service: UpstreamSetSpec,
    ) -> Result<usize, EngineError> {
        let (done, outcome) = oneshot::channel();
        let stopped = || EngineError::Config("the client has stopped".into());
        let redirect = Redirect {
            listens,
            service,
            done,
        };
        self.0.send(redirect).map_err(|_| stopped())?;
        outcome.await.map_err(|_| stopped())?
    }
}

/// `amb check --connect` for client-only mode: one real connection to the service, TLS
/// handshake included, dialed as app connections are. `Err` says why none was made.
pub async fn probe_service(settings: &DirectSettings) -> Result<(), String> {
    let route = RouteName::default_route();
    let resolver = Resolver::new(settings.dns_server, Default::default());
    let service = UpstreamSet::on_side(
        Side::Client,
        &route,
        &settings.service,
        &resolver,
        &settings.metrics,
    );
    match service.dial(settings.connect_timeout, None).await {
        Ok(_) => Ok(()),
        Err(failure) => Err(format!("{}: {}", failure.refusal, failure.detail)),
    }
}

/// A listener's way to the service.
struct Direct {
    route: RouteName,
    service: UpstreamSet,
    connect_timeout: Duration,
}

/// Ready while the listeners accept.
#[derive(Default)]
struct Serving(AtomicBool);

impl Readiness for Serving {
    fn ready(&self) -> Result<(), String> {
        match self.0.load(Ordering::Relaxed) {
            true => Ok(()),
            false => Err("not serving: starting or shutting down".into()),
        }
    }
}

impl DirectClient {
    /// Binds the listeners. Must be called within a Tokio runtime.
    pub fn bind(settings: DirectSettings) -> Result<Self, EngineError> {
        if settings.service.tls.is_none() {
            return Err(EngineError::Config(
                "client-only mode needs TLS settings for the service".into(),
            ));
        }
        if settings.listens.is_empty() {
            return Err(EngineError::Config(
                "no --listen given: nothing to carry".into(),
            ));
        }
        let listeners = settings
            .listens
            .iter()
            .map(|spec| Ok((bind_tcp(spec.addr)?, spec.clone())))
            .collect::<Result<_, EngineError>>()?;
        Ok(DirectClient {
            listeners,
            endpoint: MetricsEndpoint::bind(settings.metrics_listen)?,
            settings,
            redirect: mpsc::unbounded_channel(),
        })
    }

    /// A handle that swaps its listeners and service while it runs.
    pub fn listeners(&self) -> DirectListeners {
        DirectListeners(self.redirect.0.clone())
    }

    /// Serves until `shutdown` resolves, then stops accepting and lets live connections finish
    /// for up to the drain timeout.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let DirectClient {
            listeners,
            endpoint,
            settings,
            redirect: (_, mut redirects),
        } = self;
        let _endpoint = endpoint.serve(&settings.metrics);
        let serving = Arc::new(Serving::default());
        settings.metrics.add_readiness(serving.clone());
        let accepting = Arc::new(Accepting::new(
            settings.max_connections,
            Duration::ZERO,
            Balance::default(),
            settings.access_log,
        ));
        let drain_timeout = settings.drain_timeout;
        let mut running = Running {
            resolver: Resolver::new(settings.dns_server, Default::default()),
            settings,
            accepting: accepting.clone(),
            listeners: Vec::new(),
        };
        for (socket, spec) in listeners {
            running.start(socket, spec);
        }
        serving.0.store(true, Ordering::Relaxed);
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                Some(Redirect { listens, service, done }) = redirects.recv() => {
                    let _ = done.send(running.redirect(listens, service));
                }
            }
        }
        serving.0.store(false, Ordering::Relaxed);
        for listener in &running.listeners {
            let _ = listener.stop.send(true);
        }
        let live = &accepting.live;
        live.close();
        info!(live_connections = live.len(), drain = ?drain_timeout, "shutting down: no new connections");
        if tokio::time::timeout(drain_timeout, live.wait())
            .await
            .is_err()
        {
            warn!(
                live_connections = live.len(),
                "drain timeout reached; closing live connections"
            );
        }
        info!("amb client stopped");
    }
}

/// A client-only process's listeners as they run.
struct Running {
    settings: DirectSettings,
    resolver: Resolver,
    accepting: Arc<Accepting>,
    listeners: Vec<RunningListener>,
}

/// One listener: what it is, where its connections go, and how it is stopped.
struct RunningListener {
    spec: ListenerSpec,
    target: Arc<ArcSwap<Direct>>,
    stop: watch::Sender<bool>,
}

impl Running {
    /// The way to the service for `route`'s connections; `previous`: the way it replaces,
    /// whose knowledge of the service's addresses it keeps.
    fn direct(&self, route: &RouteName, previous: Option<&Direct>) -> Direct {
        let settings = &self.settings;
        let service = UpstreamSet::on_side(
            Side::Client,
            route,
            &settings.service,
            &self.resolver,
            &settings.metrics,
        );
        if let Some(previous) = previous {
            service.carry_health_from(&previous.service);
        }
        Direct {
            route: route.clone(),
            service,
            connect_timeout: settings.connect_timeout,
        }
    }

    fn start(&mut self, socket: TcpListener, spec: ListenerSpec) {
        let route = &spec.route;
        if let Ok(addr) = socket.local_addr() {
            let service = &self.settings.service;
            info!(listen = %addr, %route, %service, transport = "tls-direct", "amb client listening");
        }
        let target = Arc::new(ArcSwap::from_pointee(self.direct(route, None)));
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(accept(
            socket,
            target.clone(),
            stopped,
            self.accepting.clone(),
        ));
        self.listeners.push(RunningListener { spec, target, stop });
    }

    /// Applies a replacement (see [`DirectListeners::replace`]).
    fn redirect(
        &mut self,
        listens: Vec<ListenerSpec>,
        service: UpstreamSetSpec,
    ) -> Result<usize, EngineError> {
        if service.tls.is_none() {
            return Err(EngineError::Config(
                "client-only mode needs TLS settings for the service".into(),
            ));
        }
        let running: Vec<ListenerSpec> = self.listeners.iter().map(|l| l.spec.clone()).collect();
        let changes = diff_listeners(&running, &listens);
        let mut sockets = Vec::new();
        for change in &changes {
            if let ListenerChange::Added(spec) = change {
                sockets.push(bind_tcp(spec.addr)?);
            }
        }
        let service_changed = service != self.settings.service;
        if service_changed {
            self.settings.service = service;
            info!(service = %self.settings.service, "service changed; new app connections go to it");
            for listener in &self.listeners {
                let direct = self.direct(&listener.spec.route, Some(&listener.target.load()));
                listener.target.store(Arc::new(direct));
            }
        }
        let mut sockets = sockets.into_iter();
        for change in changes.iter().cloned() {
            match change {
                ListenerChange::Added(spec) => {
                    self.start(sockets.next().expect("bound above"), spec);
                }
                ListenerChange::Removed(spec) => {
                    if let Some(i) = self.listeners.iter().position(|l| l.spec == spec) {
                        let _ = self.listeners.swap_remove(i).stop.send(true);
                        info!(listen = %spec.addr, route = %spec.route, "listener removed; its app connections go on");
                    }
                }
                ListenerChange::Changed { old, new } => {
                    if let Some(i) = self.listeners.iter().position(|l| l.spec == old) {
                        let previous = self.listeners[i].target.load_full();
                        let direct = self.direct(&new.route, Some(&previous));
                        let listener = &mut self.listeners[i];
                        listener.target.store(Arc::new(direct));
                        info!(listen = %new.addr, route = %new.route, "listener changed; new app connections follow it");
                        listener.spec = new;
                    }
                }
            }
        }
        Ok(changes.len() + usize::from(service_changed))
    }
}

impl Carrier for Direct {
    fn route(&self) -> &RouteName {
        &self.route
    }

    fn counted(&self) -> OpenConnection {
        self.service.metrics().connection()
    }

    async fn carry(&self, conn: AppConnection, accepting: &Accepting) {
        let route = &self.route;
        let (stream, lease) = match self.service.dial(self.connect_timeout, None).await {
            Ok(dialed) => dialed,
            Err(failure) => {
                let why = format_args!("{}", failure.detail);
                return conn.refuse((route, None), failure.reason(), why, accepting);
            }
        };
        let AppConnection {
            tcp,
            app,
            arrived,
            mut counted,
            ..
        } = conn;
        counted.open_timer(arrived.into_std()).observe();
        let mut app_side = Counted::new(tcp);
        let mut service = stream;
        let copied = tokio::io::copy_bidirectional_with_sizes(
            &mut app_side,
            &mut service,
            64 << 10,
            64 << 10,
        )
        .await;
        let (up, down) = (app_side.read, app_side.written);
        let end = match &copied {
            Ok(_) => ConnectionEnd::Ok,
            Err(_) => {
                // A RST to the app, as a refused or broken stream gets in tunnel mode.
                reset_tcp(app_side.inner);
                service.abort();
                ConnectionEnd::Reset
            }
        };
        let upstream = lease.upstream();
        if let Err(e) = &copied {
            warn!(%app, %route, %upstream, "connection reset: {e}");
        }
        counted.ended(end, up, down);
        Access {
            route,
            app: Some(&app),
            peer: None,
            upstream: Some(upstream),
            up,
            down,
            since: arrived,
            end,
            reason: copied.as_ref().err().map(|e| e as &dyn std::fmt::Display),
        }
        .log(accepting.access_log);
    }
}

/// The app's socket, counting the bytes read from it (up) and written to it (down).
struct Counted {
    inner: TcpStream,
    read: u64,
    written: u64,
}

impl Counted {
    fn new(inner: TcpStream) -> Self {
        Counted {
            inner,
            read: 0,
            written: 0,
        }
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        this.read += (buf.filled().len() - before) as u64;
        polled
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            this.written += n as u64;
        }
        polled
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
