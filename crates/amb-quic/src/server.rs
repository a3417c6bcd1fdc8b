//! The server side: accept connections without blocking on handshakes, and hand each verified
//! connection to the engine's lifecycle; read each stream's open header, announce a drain.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use amb_proto::header::MAX_HEADER_LEN;
use amb_proto::status::STATUS_OPEN;
use amb_proto::{
    decode_open_header, open_header_needs, AppAddrs, Close, Closer, ConnectionEnd, DrainCause,
    FailedHandshake, HandshakeFailure, IncomingStream, Limits, OnFailedHandshake, OpenFailure,
    OpeningStream, Peer, Refusal, ResetCode, RouteName, ServerConnection, StreamError,
};
use quinn::crypto::rustls::QuicServerConfig;
use quinn::{Endpoint, VarInt};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::stream::{write_error, QuicRecv, QuicSend};
use crate::QuicTunnel;
use crate::{transport_config, tune_udp, QuicError};

/// A QUIC listener for tunnel connections.
pub struct QuicServer {
    endpoint: Endpoint,
    /// The newest configuration, handed to the endpoint when it changes.
    tls: watch::Receiver<Arc<rustls::ServerConfig>>,
    /// The trust generation of the configuration (drains the connections verified under an earlier one).
    trust: watch::Receiver<u64>,
    /// The configuration the endpoint started with, and the trust generation it carries.
    first: (Arc<quinn::ServerConfig>, u64),
    limits: Limits,
    /// One task per connection; each ends when its connection closes.
    connections: TaskTracker,
    /// Told of each failed handshake.
    failed: OnFailedHandshake,
    /// Which streams its connections take from their peers.
    role: crate::Role,
}

impl QuicServer {
    /// Serves on an already bound UDP socket; `tls` must offer [`amb_proto::ALPN_QUIC`] and
    /// require client certificates. Each handshake takes the configuration `tls` holds at the
    /// time; when `trust` moves (after `tls`), the connections verified before drain. Stateless
    /// resets are made with `reset`.
    pub fn new(
        socket: std::net::UdpSocket,
        tls: watch::Receiver<Arc<rustls::ServerConfig>>,
        trust: watch::Receiver<u64>,
        limits: Limits,
        failed: OnFailedHandshake,
        reset: &crate::ResetKey,
    ) -> Result<Self, QuicError> {
        Self::with_role(
            socket,
            tls,
            trust,
            limits,
            failed,
            reset,
            crate::Role::SERVER,
        )
    }

    /// A listener for reverse tunnel connections (the app side): as [`Self::new`], but `tls`
    /// offers [`amb_proto::ALPN_QUIC_REVERSE`], and this side opens the streams on the
    /// connections it accepts ([`QuicAccepted::into_tunnel`]).
    pub fn reverse(
        socket: std::net::UdpSocket,
        tls: watch::Receiver<Arc<rustls::ServerConfig>>,
        trust: watch::Receiver<u64>,
        limits: Limits,
        failed: OnFailedHandshake,
        reset: &crate::ResetKey,
    ) -> Result<Self, QuicError> {
        Self::with_role(
            socket,
            tls,
            trust,
            limits,
            failed,
            reset,
            crate::Role::OPENER,
        )
    }

    fn with_role(
        socket: std::net::UdpSocket,
        tls: watch::Receiver<Arc<rustls::ServerConfig>>,
        trust: watch::Receiver<u64>,
        limits: Limits,
        failed: OnFailedHandshake,
        reset: &crate::ResetKey,
        role: crate::Role,
    ) -> Result<Self, QuicError> {
        let addr = socket.local_addr().map_err(|source| QuicError::Socket {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            source,
        })?;
        // The generation before the configuration, as in `serve`.
        let generation = *trust.borrow();
        let config = server_config(tls.borrow().clone(), &limits, role)?;
        tune_udp(&socket);
        let endpoint = Endpoint::new(
            crate::endpoint_config(Some(reset)),
            Some(config.clone()),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|source| QuicError::Socket { addr, source })?;
        Ok(QuicServer {
            endpoint,
            tls,
            trust,
            first: (Arc::new(config), generation),
            limits,
            connections: TaskTracker::new(),
            failed,
            role,
        })
    }

    /// After `serve` returned: resolves once every connection has drained (see [`serve`]) and
    /// closed.
    pub async fn drained(&self) {
        self.connections.close();
        self.connections.wait().await;
    }

    /// Closes every connection at once (after the engine's drain deadline), telling each client.
    pub async fn close(&self) {
        self.endpoint
            .close(VarInt::from_u32(0), b"server shutting down");
        crate::flush_close(&self.endpoint).await;
    }
}

/// quinn's server configuration: `tls` with amb's transport settings.
fn server_config(
    tls: Arc<rustls::ServerConfig>,
    limits: &Limits,
    role: crate::Role,
) -> Result<quinn::ServerConfig, QuicError> {
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| QuicError::Tls(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport_config(limits, role));
    Ok(config)
}

/// Accepts connections until `stop` turns true. Each handshake runs in a task of its own, so a
/// slow one never blocks the accept loop; each verified connection is handed to `handler`
/// there, with the trust generation it was verified under, to be welcomed or turned away.
pub async fn serve<H, F>(server: &QuicServer, mut stop: watch::Receiver<bool>, handler: H)
where
    H: Fn(QuicAccepted, u64) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let (mut tls, mut trust) = (server.tls.clone(), server.trust.clone());
    // The configuration each connection is accepted with, and the trust generation it carries.
    // Accepted with it explicitly: quinn would take the one the endpoint had when the client's
    // first packet came, which may be older than the generation the connection is labelled
    // with, and let a client of a CA no longer trusted escape the drain. The generation moves
    // only after the configuration carrying it is out, so it is read before the configuration
    // (one that moves in between drains connections for nothing, never lets them keep an old
    // trust), and taken as it moves while the loop has the newest configuration.
    let (mut config, mut verified_under) = server.first.clone();
    let mut configured = true;
    loop {
        let incoming = tokio::select! {
            // New certificates are taken before more connections are accepted.
            biased;
            _ = stop.wait_for(|s| *s) => {
                // Draining: the socket stays for the live connections, and new ones are turned
                // away at once, so a client redials elsewhere (or again) without a timeout.
                let endpoint = server.endpoint.clone();
                tokio::spawn(async move {
                    while let Some(incoming) = endpoint.accept().await {
                        incoming.refuse();
                    }
                });
                return;
            }
            Ok(()) = tls.changed() => {
                let generation = *trust.borrow_and_update();
                match server_config(tls.borrow_and_update().clone(), &server.limits, server.role) {
                    Ok(new) => {
                        server.endpoint.set_server_config(Some(new.clone()));
                        config = Arc::new(new);
                        verified_under = generation;
                        configured = true;
                    }
                    Err(e) => {
                        configured = false;
                        warn!(transport = "quic", "new certificates not taken: {e}");
                    }
                }
                continue;
            }
            Ok(()) = trust.changed() => {
                let generation = *trust.borrow_and_update();
                if configured && !tls.has_changed().unwrap_or(true) {
                    verified_under = generation;
                }
                continue;
            }
            incoming = server.endpoint.accept() => incoming,
        };
        let Some(incoming) = incoming else { return };
        let (handler, limits, config) = (handler.clone(), server.limits, config.clone());
        let failed = server.failed.clone();
        server.connections.spawn(async move {
            let addr = incoming.remote_address();
            let handshake = async { incoming.accept_with(config)?.await };
            let failure = |kind, why| FailedHandshake {
                peer: addr,
                transport: "quic",
                kind,
                why,
            };
            let conn = match tokio::time::timeout(limits.handshake_timeout, handshake).await {
                Ok(Ok(conn)) => conn,
                Ok(Err(e)) => {
                    let kind = crate::quic_failure(&e);
                    return failed(failure(kind, format!("handshake failed: {e}")));
                }
                Err(_) => {
                    let why = format!("handshake timed out after {:?}", limits.handshake_timeout);
                    return failed(failure(HandshakeFailure::Timeout, why));
                }
            };
            let peer = Arc::new(Peer {
                identity: peer_identity(&conn),
                addr,
            });
            handler(QuicAccepted { conn, peer }, verified_under).await;
        });
    }
}

/// The identity in the certificate the peer of `conn` presented (and that verified).
pub(crate) fn peer_identity(conn: &quinn::Connection) -> amb_proto::PeerIdentity {
    conn.peer_identity()
        .and_then(|id| {
            id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .and_then(|chain| chain.first().map(amb_pki::peer_identity))
        .unwrap_or_default()
}

/// A verified connection a listener accepted, not welcomed yet.
pub struct QuicAccepted {
    conn: quinn::Connection,
    peer: Arc<Peer>,
}

impl QuicAccepted {
    /// Who the peer is.
    pub fn peer(&self) -> &Arc<Peer> {
        &self.peer
    }

    /// Welcomes the peer, which opens the streams: a forward tunnel's server side. `None` if
    /// the connection was lost first (logged).
    pub async fn into_connection(self) -> Option<QuicConnection> {
        self.welcome().await?;
        Some(QuicConnection {
            conn: self.conn,
            peer: self.peer,
            watch_liveness: false,
        })
    }

    /// Welcomes the peer, a service side that dialed in; this side opens the streams: a
    /// reverse tunnel's app side. `None` if the connection was lost first (logged).
    pub async fn into_tunnel(self) -> Option<(QuicTunnel, Arc<Peer>)> {
        self.welcome().await?;
        let tunnel = QuicTunnel {
            conn: self.conn,
            endpoint: None,
            tells_app: true,
        };
        Some((tunnel, self.peer))
    }

    /// Closes the connection unwelcomed, telling the peer `why`.
    pub fn turn_away(self, why: &str) {
        self.conn
            .close(VarInt::from_u32(ResetCode::REFUSED.0), why.as_bytes());
    }

    async fn welcome(&self) -> Option<()> {
        match notify(&self.conn, &crate::WELCOME).await {
            Ok(_) => Some(()),
            Err(e) => {
                let peer = &self.peer;
                warn!(%peer, transport = "quic", "tunnel connection lost before welcome: {e}");
                None
            }
        }
    }
}

/// One verified QUIC tunnel connection, driven by the engine's lifecycle.
pub struct QuicConnection {
    conn: quinn::Connection,
    peer: Arc<Peer>,
    /// Dialed by this side: it tells a peer gone silent (see [`crate::LIVENESS_DEADLINE`]).
    watch_liveness: bool,
}

impl QuicConnection {
    /// A connection the service side dialed and the app side welcomed.
    pub(crate) fn dialed(conn: quinn::Connection, peer: Arc<Peer>) -> Self {
        QuicConnection {
            conn,
            peer,
            watch_liveness: true,
        }
    }
}

impl ServerConnection for QuicConnection {
    type Opening = QuicOpening;
    const TRANSPORT: &'static str = "quic";

    fn peer(&self) -> &Arc<Peer> {
        &self.peer
    }

    async fn next(&mut self) -> Result<QuicOpening, ConnectionEnd> {
        let silent = async {
            match self.watch_liveness {
                true => crate::client::unanswered(&self.conn).await,
                false => std::future::pending().await,
            }
        };
        let accepted = tokio::select! {
            accepted = self.conn.accept_bi() => accepted,
            silent = silent => {
                self.conn.close(VarInt::from_u32(0), b"no answer from the peer");
                return Err(ConnectionEnd {
                    why: format!("no answer from the peer for {silent:.1?}"),
                    peer_broke_protocol: false,
                    closed_here: false,
                });
            }
        };
        match accepted {
            Ok((send, recv)) => Ok(QuicOpening {
                send,
                recv,
                peer: self.peer.clone(),
            }),
            Err(e) => Err(ConnectionEnd {
                why: e.to_string(),
                peer_broke_protocol: false,
                closed_here: e == quinn::ConnectionError::LocallyClosed,
            }),
        }
    }

    /// QUIC has no GOAWAY: a notice on a stream of its own, acknowledged, then a round trip
    /// for the streams the client opened just before it.
    fn drain(&mut self, _cause: DrainCause) -> Option<impl Future<Output = ()> + Send + 'static> {
        let (conn, peer) = (self.conn.clone(), self.peer.clone());
        Some(async move {
            let notice = async {
                let uni = notify(&conn, crate::DRAIN_NOTICE).await?;
                uni.stopped().await.map_err(|e| e.to_string())?;
                tokio::time::sleep(conn.rtt()).await;
                Ok::<_, String>(())
            };
            if let Err(e) = notice.await {
                debug!(%peer, transport = "quic", "drain notice not delivered: {e}");
            }
        })
    }

    fn closer(&self) -> Closer {
        let conn = self.conn.clone();
        Arc::new(move |why| {
            let (code, reason) = match why {
                Close::TooManyRefusals => (ResetCode::REFUSED.0, "too many refused streams"),
                Close::DrainTimedOut(cause) => (ResetCode::REFUSED.0, cause.reason()),
                Close::Drained(cause) => (0, cause.reason()),
            };
            conn.close(VarInt::from_u32(code), reason.as_bytes());
        })
    }
}

/// Tells the client something on a unidirectional stream of its own: [`crate::WELCOME`] once
/// it is accepted, [`crate::DRAIN_NOTICE`] when the server starts to shut down.
async fn notify(conn: &quinn::Connection, message: &[u8]) -> Result<quinn::SendStream, String> {
    let mut uni = conn.open_uni().await.map_err(|e| e.to_string())?;
    uni.write_all(message).await.map_err(|e| e.to_string())?;
    uni.finish().map_err(|e| e.to_string())?;
    Ok(uni)
}

/// A stream the client opened, its header not read yet.
pub struct QuicOpening {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    peer: Arc<Peer>,
}

impl OpeningStream for QuicOpening {
    type Incoming = QuicIncoming;

    /// Reads the open header: at most [`MAX_HEADER_LEN`] bytes, and never past it, so app bytes
    /// stay in the stream for the relay.
    async fn open(self) -> Result<QuicIncoming, OpenFailure> {
        let QuicOpening {
            mut send,
            mut recv,
            peer,
        } = self;
        let mut buf = [0u8; MAX_HEADER_LEN];
        let mut have = 0;
        let mut want = 2;
        loop {
            let read = recv.read_exact(&mut buf[have..want]).await;
            if let Err(e) = read {
                send.reset(VarInt::from_u32(ResetCode::PROTOCOL.0)).ok();
                // The client ended or reset the stream before its header (a lost connection is
                // not the client's doing).
                return Err(match e {
                    quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(lost)) => {
                        OpenFailure {
                            error: StreamError::ConnectionLost(lost.to_string()),
                            client_fault: false,
                        }
                    }
                    e => OpenFailure {
                        error: StreamError::Protocol(format!(
                            "stream cancelled before its header: {e}"
                        )),
                        client_fault: true,
                    },
                });
            }
            have = want;
            match decode_open_header(&buf[..have]) {
                Ok(Some(header)) => {
                    return Ok(QuicIncoming {
                        send,
                        recv,
                        route: header.route,
                        app: header.app,
                        peer,
                    });
                }
                Ok(None) => want = open_header_needs(&buf[..have]),
                Err(e) => {
                    send_refusal(&mut send, &mut recv, Refusal::BadRequest).await;
                    return Err(OpenFailure {
                        error: StreamError::Protocol(e.to_string()),
                        client_fault: true,
                    });
                }
            }
        }
    }
}

/// A QUIC stream whose header has been read, waiting for the engine's decision.
pub struct QuicIncoming {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    route: RouteName,
    app: Option<AppAddrs>,
    peer: Arc<Peer>,
}

impl IncomingStream for QuicIncoming {
    type Send = QuicSend;
    type Recv = QuicRecv;

    fn route(&self) -> &RouteName {
        &self.route
    }

    fn app(&self) -> Option<AppAddrs> {
        self.app
    }

    fn peer(&self) -> &Arc<Peer> {
        &self.peer
    }

    async fn accept(mut self) -> Result<(QuicSend, QuicRecv), StreamError> {
        // Stopped by the client while the server dialed: a reset, which the engine charges.
        self.send
            .write_chunk(bytes::Bytes::from_static(&[STATUS_OPEN]))
            .await
            .map_err(write_error)?;
        Ok((
            QuicSend(self.send),
            QuicRecv {
                stream: self.recv,
                awaiting_status: false,
            },
        ))
    }

    async fn refuse(mut self, why: Refusal) {
        send_refusal(&mut self.send, &mut self.recv, why).await;
    }
}

/// Answers a stream with a refusal status byte, ends it, and stops reading the client's bytes.
async fn send_refusal(send: &mut quinn::SendStream, recv: &mut quinn::RecvStream, why: Refusal) {
    let status = bytes::Bytes::copy_from_slice(&[why.status_byte()]);
    let _ = send.write_chunk(status).await;
    let _ = send.finish();
    let _ = recv.stop(VarInt::from_u32(ResetCode::REFUSED.0));
}
