//! Reverse tunnels: the service side dials out to the app side, which opens the streams. The
//! roles stay where they were (the app side asks for routes, the service side serves them);
//! only the direction of the tunnel connection turns. The service side's connections run
//! through the server's one lifecycle; the app side's go into pools its listeners carry over.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use amb_metrics::{Direction, Metrics};
use amb_pki::TlsFiles;
use amb_proto::{
    AllowList, Dialer, Limits, Peer, Retirement, RouteName, Serving, Tunnel, ALPN_H2_REVERSE,
    ALPN_QUIC_REVERSE,
};
use amb_quic::{QuicServer, QuicTunnel, ResetKey};
use amb_tls::{TlsServer, TlsTunnel};
use arc_swap::ArcSwap;
use rand::Rng;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::client::{carry, Accepting, AppConnection, PeerLink, Pool, Pooled};
use crate::reload::{Certs, Reload};
use crate::tally::StreamTally;
use crate::throttle::LogThrottles;
use crate::{bind_tcp, bind_udp, EngineError};

/// The first wait after a failed dial; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// The longest wait between dials of a peer that does not answer.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// A tunnel connection that lasted this long was a success: the back-off starts over.
const STEADY: Duration = Duration::from_secs(5);

/// Keeps one tunnel connection from the service side to an app side: dial, hand it to `serve`
/// (the lifecycle, until it ends: lost, drained, or at shutdown), dial again, until either of
/// `stops` turns true (the server stops; the peer is dropped). Failed dials, and connections
/// that end within [`STEADY`] (an app side turning this one away after its handshake), back
/// off, capped, with jitter, so service sides restarted together do not dial in step.
/// `serve` gets the trust generation read before the dial's configuration.
pub(crate) async fn keep_dialed<D, S, F>(
    slot: usize,
    link: Arc<PeerLink<D>>,
    trust: watch::Receiver<u64>,
    (mut stop, mut removed): (watch::Receiver<bool>, watch::Receiver<bool>),
    serve: S,
) where
    D: Dialer<Tunnel: Serving>,
    S: Fn(D::Tunnel, u64) -> F,
    F: Future<Output = ()>,
{
    let (peer, transport) = (link.name(), link.transport);
    let mut backoff = FIRST_BACKOFF;
    loop {
        let stopped = async {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => {}
                _ = removed.wait_for(|r| *r) => {}
            }
        };
        let verified_under = *trust.borrow();
        let dialed = tokio::select! {
            d = link.dial() => d,
            () = stopped => return,
        };
        let wait = jittered(backoff);
        match dialed {
            Ok(tunnel) => {
                info!(%peer, transport, slot, direction = "dialed", "tunnel connection up");
                let up = tokio::time::Instant::now();
                // Ends when the connection does; at shutdown, once it drained.
                serve(tunnel, verified_under).await;
                if *stop.borrow() || *removed.borrow() {
                    return;
                }
                if up.elapsed() >= STEADY {
                    backoff = FIRST_BACKOFF;
                    info!(%peer, transport, slot, "tunnel connection ended; redialing");
                    continue;
                }
                warn!(%peer, transport, slot, "tunnel connection ended after {:?}; redialing in {wait:?}", up.elapsed());
            }
            Err(e) => {
                warn!(%peer, transport, slot, "tunnel connect failed: {e}; retrying in {wait:?}");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => return,
            _ = removed.wait_for(|r| *r) => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// `backoff` give or take a quarter.
fn jittered(backoff: Duration) -> Duration {
    backoff.mul_f64(rand::rng().random_range(0.75..1.25))
}

/// The app side of reverse tunnels: where service-side ambassadors connect, who may, and the
/// tunnel connections they opened, which the listeners without peers of their own carry over.
pub(crate) struct AppSide {
    /// The address it takes them on, for logs.
    name: String,
    quic: Pool<QuicTunnel>,
    tls: Pool<TlsTunnel>,
    /// Swapped whole by [`AppSide::reallow`]; `reallowed` then moves, and every connection
    /// held is checked against the new list.
    allow: ArcSwap<AllowList>,
    reallowed: watch::Sender<u64>,
    metrics: Arc<Metrics>,
    /// Turned-away dialers, logged at most once a second per transport.
    turned_away: LogThrottles<&'static str>,
    /// How long a revoked connection's app connections may run on.
    drain_timeout: Duration,
    /// How long a service side's HTTP/2 (or QUIC welcome) may take to start once verified.
    handshake_timeout: Duration,
    /// Turns true when the client stops taking service sides in (its shutdown began).
    stop_accepting: watch::Sender<bool>,
    /// Turns true when the client closes the tunnel connections: none is held from then on.
    closing: watch::Sender<bool>,
}

/// An [`AppSide`]'s bound sockets and configurations, ready to accept.
pub(crate) struct AppSideListeners {
    quic: Option<QuicServer>,
    tls: Option<TlsServer>,
    certs: Certs<amb_pki::rustls::ServerConfig>,
}

/// What an app side is configured with.
#[derive(Clone, Debug)]
pub struct AcceptSettings {
    /// Where service-side ambassadors connect (TCP for TLS, UDP for QUIC, one port).
    pub addr: SocketAddr,
    /// The service-side identities taken in; must not be empty.
    pub allow: AllowList,
}

impl AcceptSettings {
    /// Refuses an empty allow-list: any certificate of the CA could otherwise receive the
    /// apps' data.
    pub fn validate(&self) -> Result<(), EngineError> {
        require_allow(&self.allow, &format!("--accept {}", self.addr))
    }
}

/// Refuses an empty allow-list for `what` (an `--accept`, or its reloaded file).
fn require_allow(allow: &AllowList, what: &str) -> Result<(), EngineError> {
    if allow.is_empty() {
        return Err(EngineError::Config(format!(
            "{what} needs --allow: the service-side identities (e.g. dns:redis-host or \
             uri:spiffe://amb/redis-host) whose ambassadors may connect; without a list, any \
             certificate of the CA could receive the apps' data"
        )));
    }
    Ok(())
}

/// Warns of allow-list entries every certificate `amb certs` issues carries (`localhost` and
/// the loopback addresses): any server certificate of the CA would be taken in.
fn warn_of_shared_names(allow: &AllowList) {
    for shared in ["dns:localhost", "ip:127.0.0.1", "ip:::1"] {
        let Ok(san) = shared.parse() else { continue };
        if allow.permits(&amb_proto::PeerIdentity { sans: vec![san] }) {
            warn!(entry = shared, "--allow lists a name every certificate of `amb certs` carries: any server certificate of the CA may connect as a service side; list its own name");
        }
    }
}

impl AppSide {
    /// Loads the configurations and binds (`quic` and/or `tls`). Refuses an empty allow-list:
    /// any certificate of the CA could otherwise receive the apps' data.
    pub(crate) fn bind(
        settings: &AcceptSettings,
        (quic, tls): (bool, bool),
        files: &TlsFiles,
        limits: Limits,
        metrics: &Arc<Metrics>,
    ) -> Result<(Arc<AppSide>, AppSideListeners), EngineError> {
        settings.validate()?;
        warn_of_shared_names(&settings.allow);
        let alpns: Vec<&'static [u8]> = [(quic, ALPN_QUIC_REVERSE), (tls, ALPN_H2_REVERSE)]
            .into_iter()
            .filter_map(|(wanted, alpn)| wanted.then_some(alpn))
            .collect();
        let certs = Certs::load(files.clone(), amb_pki::reverse_accept_config, &alpns)?;
        let mut addr = settings.addr;
        let failed = || crate::server::on_failed_handshake(metrics);
        let tls = match certs.subscribe(ALPN_H2_REVERSE) {
            Some(config) => {
                let listener = bind_tcp(addr)?;
                addr = listener.local_addr().map_err(|source| EngineError::Bind {
                    addr,
                    proto: "tcp",
                    source,
                })?;
                Some(TlsServer::new(
                    listener,
                    config,
                    certs.trust(),
                    limits,
                    failed(),
                ))
            }
            None => None,
        };
        let quic = match certs.subscribe(ALPN_QUIC_REVERSE) {
            Some(config) => {
                let (udp, bound) = bind_udp(addr)?;
                addr = bound;
                let reset = ResetKey::derive(amb_pki::load_key(&files.key)?.secret_der());
                let trust = certs.trust();
                Some(QuicServer::reverse(
                    udp,
                    config,
                    trust,
                    limits,
                    failed(),
                    &reset,
                )?)
            }
            None => None,
        };
        let side = Arc::new(AppSide {
            name: addr.to_string(),
            quic: Pool::new(true),
            tls: Pool::new(true),
            allow: ArcSwap::from_pointee(settings.allow.clone()),
            reallowed: watch::Sender::new(0),
            metrics: metrics.clone(),
            turned_away: LogThrottles::default(),
            drain_timeout: limits.drain_timeout,
            handshake_timeout: limits.handshake_timeout,
            stop_accepting: watch::Sender::new(false),
            closing: watch::Sender::new(false),
        });
        Ok((side, AppSideListeners { quic, tls, certs }))
    }

    /// Where service-side ambassadors connect.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// App connections on the tunnel connections in service; `None` if none is up.
    pub(crate) fn live_load(&self) -> Option<usize> {
        match (self.quic.live_load(), self.tls.live_load()) {
            (None, None) => None,
            (quic, tls) => Some(quic.unwrap_or(0) + tls.unwrap_or(0)),
        }
    }

    /// Carries one app connection over the least loaded tunnel connection of the service
    /// sides connected (QUIC's on a tie), then the other transport's if that one is lost under
    /// the open; refuses it at once if none is connected.
    pub(crate) async fn carry(
        &self,
        conn: &mut Option<AppConnection>,
        route: &RouteName,
        accepting: &Accepting,
    ) {
        let name = self.name.as_str();
        let (quic, tls) = (self.quic.least_load(), self.tls.least_load());
        let quic_first = match (quic, tls) {
            (Some(q), Some(t)) => q <= t,
            (q, _) => q.is_some(),
        };
        let (first, second) = match quic_first {
            true => (Either::Quic, Either::Tls),
            false => (Either::Tls, Either::Quic),
        };
        for transport in [first, second] {
            // A connection lost under the open hands the app connection back.
            let wait = (Duration::ZERO, true);
            match transport {
                Either::Quic if conn.is_some() && quic.is_some() => {
                    carry(conn, route, (name, &self.quic), wait, accepting).await
                }
                Either::Tls if conn.is_some() && tls.is_some() => {
                    carry(conn, route, (name, &self.tls), wait, accepting).await
                }
                _ => {}
            }
        }
        if let Some(conn) = conn.take() {
            let why = format_args!("no service-side ambassador connected on {name}");
            conn.refuse((route, None), "no_ambassador", why, accepting);
        }
    }

    /// Takes no more service sides in (the client's shutdown began).
    pub(crate) fn stop_accepting(&self) {
        self.stop_accepting.send_replace(true);
    }

    /// Closes every tunnel connection (at shutdown, after the drain), those draining or let
    /// go too; later ones are closed as they come.
    pub(crate) async fn close(&self) {
        self.stop_accepting();
        self.closing.send_replace(true);
        tokio::join!(self.quic.close(), self.tls.close());
    }

    /// Resolves once [`close`](Self::close) was called.
    async fn closed(&self) {
        let _ = self.closing.subscribe().wait_for(|closing| *closing).await;
    }

    /// Swaps in a new allow-list (a reloaded config file): service sides it no longer admits
    /// take no new app connections, and their tunnel connections close once the app
    /// connections on them end (or at the drain timeout), as a revoked client's do on a server.
    pub(crate) fn reallow(&self, allow: AllowList) -> Result<(), EngineError> {
        require_allow(&allow, &format!("the reloaded --accept {}", self.name))?;
        if **self.allow.load() != allow {
            warn_of_shared_names(&allow);
            self.allow.store(Arc::new(allow));
            info!(accept = %self.name, "allow-list of service-side ambassadors changed");
            self.reallowed.send_modify(|generation| *generation += 1);
        }
        Ok(())
    }

    /// Takes a verified service side in if the allow-list admits it: `turn_away` otherwise.
    fn admits(&self, peer: &Peer, transport: &'static str) -> bool {
        if self.allow.load().permits(&peer.identity) {
            return true;
        }
        (self.metrics).handshake_failed(Direction::Accepted, transport, "not_allowed");
        if let Some(suppressed) = self.turned_away.allow(transport) {
            warn!(%peer, transport, suppressed, "service-side ambassador turned away: not on the allow-list");
        }
        false
    }

    /// Holds one service side's tunnel connection in `pool` until it is lost, drained,
    /// revoked by a new allow-list or verified under CAs no longer trusted (it then takes no
    /// new app connections, and is closed once those on it end), or the client closes.
    /// `reallowed`: subscribed before the service side was admitted, so that no change of the
    /// allow-list since goes unseen.
    async fn hold<T: Tunnel>(
        &self,
        pool: &Pool<T>,
        (tunnel, peer): (T, Arc<Peer>),
        transport: &'static str,
        (mut trust, verified_under): (watch::Receiver<u64>, u64),
        mut reallowed: watch::Receiver<u64>,
    ) {
        let pooled = Arc::new(Pooled {
            tunnel,
            carried: StreamTally::default(),
            draining: AtomicBool::new(false),
            _up: (self.metrics).tunnel_up(Direction::Accepted, "", transport),
            peer: Some(peer.to_string()),
        });
        pool.live.send_modify(|v| v.push((0, pooled.clone())));
        // After the push: either `close` sees it in the pool, or this sees `closing`.
        if *self.closing.borrow() {
            pool.remove(&pooled);
            return pooled.tunnel.close().await;
        }
        info!(%peer, transport, direction = "accepted", "service-side ambassador connected");
        let trust_moved = async move {
            let _ = trust
                .wait_for(|generation| *generation != verified_under)
                .await;
        };
        let revoked = async {
            loop {
                if !self.allow.load().permits(&peer.identity) {
                    return;
                }
                if reallowed.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        let why = tokio::select! {
            retired = pooled.tunnel.retired() => Ok(retired),
            () = trust_moved => Err("trusted CAs changed"),
            () = revoked => Err("no longer on the allow-list"),
            () = self.closed() => Err("closing"),
        };
        let retired = match why {
            Ok(retired) => retired,
            Err("closing") => return pooled.tunnel.close().await,
            Err(why) => {
                let app_connections = pool.let_go(&pooled);
                info!(%peer, transport, app_connections, "{why}: the service side's tunnel connection takes no new app connections and closes once they end");
                return self
                    .close_once_settled(&pooled, Some(self.drain_timeout))
                    .await;
            }
        };
        match retired {
            Retirement::Draining => {
                let app_connections = pool.let_go(&pooled);
                info!(%peer, transport, app_connections, "{retired}: its app connections finish on it, new ones go to the others");
                // The service side closes it once they end; this side at its own exit.
                self.close_once_settled(&pooled, None).await;
            }
            Retirement::Lost(_) if *self.closing.borrow() => {
                debug!(%peer, transport, "service-side ambassador's tunnel connection closed: {retired}");
            }
            Retirement::Lost(_) => {
                pool.remove(&pooled);
                let app_connections_reset = pooled.carried.cut_off_once_settled().await;
                warn!(%peer, transport, app_connections_reset, "service-side ambassador lost: {retired}");
            }
        }
    }
}

impl AppSide {
    /// Closes `pooled` once the app connections on it end (or after `limit`), or at once when
    /// the client closes.
    async fn close_once_settled<T: Tunnel>(&self, pooled: &Pooled<T>, limit: Option<Duration>) {
        let settled = async {
            match limit {
                Some(limit) => drop(tokio::time::timeout(limit, pooled.carried.settled()).await),
                None => pooled.carried.settled().await,
            }
        };
        tokio::select! {
            () = settled => {}
            () = self.closed() => {}
        }
        pooled.tunnel.close().await;
    }
}

/// One of the two transports.
#[derive(Clone, Copy)]
enum Either {
    Quic,
    Tls,
}

impl AppSideListeners {
    /// Accepts service-side ambassadors into `side` until it stops accepting, keeping the
    /// configurations current until `stop`; then waits (within the drain timeout) for their
    /// tunnel connections to be closed (by [`AppSide::close`]).
    pub(crate) async fn run(
        mut self,
        side: Arc<AppSide>,
        (reload, reload_check): (Reload, Option<Duration>),
        stop: watch::Receiver<bool>,
    ) {
        let trust = self.certs.trust();
        let accepting = side.stop_accepting.subscribe();
        let limit = side.handshake_timeout;
        info!(accept = %side.name, quic = self.quic.is_some(), tls = self.tls.is_some(), "amb client accepting service-side ambassadors");
        let quic = async {
            let Some(server) = &self.quic else { return };
            let (side, trust) = (side.clone(), trust.clone());
            amb_quic::serve(
                server,
                accepting.clone(),
                move |accepted, verified_under| {
                    let (side, trust) = (side.clone(), (trust.clone(), verified_under));
                    async move {
                        let reallowed = side.reallowed.subscribe();
                        if !side.admits(accepted.peer(), "quic") {
                            return accepted.turn_away("not on the app side's allow-list");
                        }
                        let welcomed = tokio::time::timeout(limit, accepted.into_tunnel()).await;
                        if let Ok(Some(tunnel)) = welcomed {
                            side.hold(&side.quic, tunnel, "quic", trust, reallowed)
                                .await;
                        }
                    }
                },
            )
            .await;
        };
        let tls = async {
            let Some(server) = &mut self.tls else { return };
            let (side, trust) = (side.clone(), trust.clone());
            amb_tls::serve_reverse(server, accepting.clone(), move |accepted, verified_under| {
                let (side, trust) = (side.clone(), (trust.clone(), verified_under));
                async move {
                    let reallowed = side.reallowed.subscribe();
                    if !side.admits(accepted.peer(), "tls") {
                        return accepted.turn_away().await;
                    }
                    let peer = accepted.peer().clone();
                    match tokio::time::timeout(limit, accepted.into_tunnel()).await {
                        Ok(Ok(tunnel)) => side.hold(&side.tls, tunnel, "tls", trust, reallowed).await,
                        Ok(Err(e)) => warn!(%peer, transport = "tls", "service-side ambassador's HTTP/2 did not start: {e}"),
                        Err(_) => warn!(%peer, transport = "tls", "service-side ambassador's HTTP/2 did not start within {limit:?}"),
                    }
                }
            })
            .await;
        };
        let certs = self.certs.keep_current(reload, reload_check, stop.clone());
        tokio::join!(quic, tls, certs);
        let drained = async {
            if let Some(server) = &self.tls {
                server.drained().await;
            }
            if let Some(server) = &self.quic {
                server.drained().await;
            }
        };
        let _ = tokio::time::timeout(side.drain_timeout, drained).await;
        if let Some(server) = &self.quic {
            server.close().await;
        }
    }
}
