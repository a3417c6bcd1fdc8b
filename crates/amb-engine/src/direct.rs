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
use amb_spec::{Balance, ListenerSpec, UpstreamSetSpec};
use arc_swap::ArcSwap;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
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
}

/// A bound client in client-only mode, ready to run.
pub struct DirectClient {
    listeners: Vec<(TcpListener, ListenerSpec)>,
    endpoint: MetricsEndpoint,
    settings: DirectSettings,
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
        })
    }

    /// Serves until `shutdown` resolves, then stops accepting and lets live connections finish
    /// for up to the drain timeout.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let DirectClient {
            listeners,
            endpoint,
            settings,
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
        let resolver = Resolver::new(settings.dns_server, Default::default());
        let (stop, stopped) = watch::channel(false);
        for (socket, spec) in listeners {
            let route = spec.route.clone();
            let service = UpstreamSet::on_side(
                Side::Client,
                &route,
                &settings.service,
                &resolver,
                &settings.metrics,
            );
            if let Ok(addr) = socket.local_addr() {
                let service = &settings.service;
                info!(listen = %addr, %route, %service, transport = "tls-direct", "amb client listening");
            }
            let direct = Direct {
                route,
                service,
                connect_timeout: settings.connect_timeout,
            };
            let target = Arc::new(ArcSwap::from_pointee(direct));
            tokio::spawn(accept(socket, target, stopped.clone(), accepting.clone()));
        }
        serving.0.store(true, Ordering::Relaxed);
        shutdown.await;
        serving.0.store(false, Ordering::Relaxed);
        let _ = stop.send(true);
        let live = &accepting.live;
        live.close();
        info!(live_connections = live.len(), drain = ?settings.drain_timeout, "shutting down: no new connections");
        if tokio::time::timeout(settings.drain_timeout, live.wait())
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
