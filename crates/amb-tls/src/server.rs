//! The server side: accept TCP without waiting on handshakes, verify the client in TLS, and hand
//! each connection to the engine's lifecycle; read each CONNECT, drain by GOAWAY.

use std::future::{poll_fn, Future};
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;

use amb_proto::{
    AppAddrs, Close, Closer, ConnectionEnd, DrainCause, FailedHandshake, HandshakeFailure,
    IncomingStream, Limits, OnFailedHandshake, OpenFailure, OpeningStream, Peer, PeerIdentity,
    Refusal, ResetCode, RouteName, ServerConnection, StreamError, StreamRecv, StreamSend,
};
use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use http::{Method, Response, StatusCode};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Notify};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;
use tracing::warn;

use crate::coalesce::{coalesce, Coalesce, Flusher};
use crate::raw::{RawRecv, RawSend, RawTls};
use crate::stream::{h2_error, H2Recv, H2Send};
use crate::{
    tune_tcp, TlsError, TlsTunnel, CONNECTION_WINDOW, LINGER, MAX_FRAME, SEND_BUFFER, STREAM_WINDOW,
};

/// A TLS listener for tunnel connections.
pub struct TlsServer {
    /// Closed when the drain starts, so clients redial elsewhere instead of waiting in its
    /// backlog.
    listener: Option<TcpListener>,
    /// The newest configuration, for each new handshake.
    tls: watch::Receiver<Arc<rustls::ServerConfig>>,
    /// The trust generation of the configuration (drains the connections verified under an earlier one).
    trust: watch::Receiver<u64>,
    limits: Limits,
    connections: TaskTracker,
    failed: OnFailedHandshake,
    /// Where standard TLS clients (no ALPN) go; `None`: they are not served.
    raw: Option<RawTls>,
}

impl TlsServer {
    /// Serves on an already bound listener; `tls` must offer [`amb_proto::ALPN_H2`] and require
    /// client certificates. Each handshake takes the configuration `tls` holds at the time;
    /// when `trust` moves (after `tls`), the connections verified before drain. Each failed
    /// handshake is handed to `failed`.
    pub fn new(
        listener: TcpListener,
        tls: watch::Receiver<Arc<rustls::ServerConfig>>,
        trust: watch::Receiver<u64>,
        limits: Limits,
        failed: OnFailedHandshake,
    ) -> Self {
        TlsServer {
            listener: Some(listener),
            tls,
            trust,
            limits,
            connections: TaskTracker::new(),
            failed,
            raw: None,
        }
    }

    /// Also serves standard TLS clients, which offer no ALPN: each connection is one app
    /// connection, routed as `raw` says.
    pub fn serving_raw(mut self, raw: RawTls) -> Self {
        self.raw = Some(raw);
        self
    }

    /// After `serve` returned: resolves once every connection has finished its streams, sent
    /// GOAWAY and flushed, so no answer in flight is cut off.
    pub async fn drained(&self) {
        self.connections.close();
        self.connections.wait().await;
    }
}

/// Accepts connections until `stop` turns true, then closes the listener. Each handshake runs
/// in a task of its own under the handshake timeout; each verified connection is handed to
/// `handler` there, with the trust generation it was verified under.
pub async fn serve<H, F>(server: &mut TlsServer, stop: watch::Receiver<bool>, handler: H)
where
    H: Fn(TlsConnection, u64) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let raw = server.raw.clone();
    accept_loop(
        server,
        stop,
        move |acceptor, tcp, addr, limits, failed, verified_under| {
            let (handler, raw) = (handler.clone(), raw.clone());
            async move {
                let handshake = handshake(acceptor, tcp, limits, raw.as_ref());
                let Some(handshaken) =
                    within_handshake_timeout(handshake, addr, limits, &failed).await
                else {
                    return;
                };
                let kill = Arc::new(Notify::new());
                match handshaken {
                    Handshaken::Tunnel(conn, flusher, identity) => {
                        let peer = Arc::new(Peer { identity, addr });
                        let lingerer = flusher.lingerer();
                        let conn = TlsConnection {
                            kind: Kind::H2(conn),
                            peer,
                            kill,
                            silent: None,
                        };
                        flusher.run(pin!(handler(conn, verified_under))).await;
                        lingerer.linger(LINGER).await;
                    }
                    Handshaken::Raw(tls, identity, route) => {
                        let peer = Arc::new(Peer { identity, addr });
                        let (live, ended) = mpsc::channel(1);
                        let conn = TlsConnection {
                            kind: Kind::Raw(Box::new(RawConnection {
                                socket: crate::raw::socket_of(&tls),
                                stream: Some((tls, route)),
                                live: Some(live),
                                ended,
                                killed: watch::Sender::new(false),
                            })),
                            peer,
                            kill,
                            silent: None,
                        };
                        handler(conn, verified_under).await;
                    }
                }
            }
        },
    )
    .await
}

/// Accepts reverse tunnel connections (the app side) until `stop` turns true, as [`serve`]
/// does: each verified service side is handed to `handler`, to be taken as a tunnel
/// ([`TlsAccepted::into_tunnel`]) or turned away. The server's configuration must offer
/// [`amb_proto::ALPN_H2_REVERSE`].
pub async fn serve_reverse<H, F>(server: &mut TlsServer, stop: watch::Receiver<bool>, handler: H)
where
    H: Fn(TlsAccepted, u64) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    accept_loop(
        server,
        stop,
        move |acceptor, tcp, addr, limits, failed, verified_under| {
            let handler = handler.clone();
            async move {
                let handshake = async {
                    let tls = acceptor.accept(tcp).await.map_err(|e| {
                        (crate::tls_failure(&e), format!("TLS handshake failed: {e}"))
                    })?;
                    let identity = identity_of(tls.get_ref().1);
                    Ok(TlsAccepted {
                        tls,
                        peer: Arc::new(Peer { identity, addr }),
                        limits,
                    })
                };
                if let Some(accepted) =
                    within_handshake_timeout(handshake, addr, limits, &failed).await
                {
                    handler(accepted, verified_under).await;
                }
            }
        },
    )
    .await
}

/// The accept loop both kinds of listener share: takes TCP connections until `stop`, and runs
/// `per_connection` for each in a task of its own with the configuration and trust generation
/// of the moment.
async fn accept_loop<P, F>(
    server: &mut TlsServer,
    mut stop: watch::Receiver<bool>,
    per_connection: P,
) where
    P: Fn(TlsAcceptor, TcpStream, std::net::SocketAddr, Limits, OnFailedHandshake, u64) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let Some(listener) = server.listener.take() else {
        return;
    };
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => return,
        };
        let (tcp, addr) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors or similar: say so, and do not spin.
                warn!(transport = "tls", "accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        tune_tcp(&tcp);
        // The generation before the configuration: one that moves in between drains the
        // connection for nothing, never lets it keep an old trust.
        let verified_under = *server.trust.borrow();
        let acceptor = TlsAcceptor::from(server.tls.borrow().clone());
        let failed = server.failed.clone();
        let task = per_connection(acceptor, tcp, addr, server.limits, failed, verified_under);
        server.connections.spawn(task);
    }
}

/// Runs `handshake` within the handshake timeout; a failure is handed to `failed`.
async fn within_handshake_timeout<T>(
    handshake: impl Future<Output = Result<T, (HandshakeFailure, String)>>,
    peer: std::net::SocketAddr,
    limits: Limits,
    failed: &OnFailedHandshake,
) -> Option<T> {
    let timeout = limits.handshake_timeout;
    let (kind, why) = match tokio::time::timeout(timeout, handshake).await {
        Ok(Ok(done)) => return Some(done),
        Ok(Err(failure)) => failure,
        Err(_) => (
            HandshakeFailure::Timeout,
            format!("handshake timed out after {timeout:?}"),
        ),
    };
    failed(FailedHandshake {
        peer,
        transport: "tls",
        kind,
        why,
    });
    None
}

/// The identity in the certificate the peer presented (and that verified).
pub(crate) fn identity_of<S>(session: &rustls::ConnectionCommon<S>) -> PeerIdentity {
    session
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(amb_pki::peer_identity)
        .unwrap_or_default()
}

/// A service side's verified TLS connection to the app side, its HTTP/2 not started yet.
pub struct TlsAccepted {
    tls: TlsStream<TcpStream>,
    peer: Arc<Peer>,
    limits: Limits,
}

impl TlsAccepted {
    /// Who the peer is.
    pub fn peer(&self) -> &Arc<Peer> {
        &self.peer
    }

    /// Starts HTTP/2 as its client: the app side opens the streams. The service side, the
    /// HTTP/2 server, waits for this preface before it takes the connection for accepted.
    pub async fn into_tunnel(self) -> Result<(TlsTunnel, Arc<Peer>), TlsError> {
        let certificate = self
            .tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first().cloned());
        let io = tokio_rustls::TlsStream::Server(self.tls);
        let tunnel = crate::client::start_h2(io, self.peer.addr, self.limits, certificate).await?;
        Ok((tunnel, self.peer))
    }

    /// Closes the connection without starting HTTP/2 (TLS close_notify, then FIN): the service
    /// side's dial fails.
    pub async fn turn_away(mut self) {
        use tokio::io::AsyncWriteExt;
        let _ = tokio::time::timeout(LINGER, self.tls.shutdown()).await;
    }
}

/// Client or server TLS: a reverse tunnel's service side serves HTTP/2 over the TLS it dialed.
pub(crate) type AnyTls = tokio_rustls::TlsStream<TcpStream>;

pub(crate) type Connection = h2::server::Connection<Coalesce<AnyTls>, Bytes>;

/// A connection past its handshakes.
enum Handshaken {
    /// A tunnel connection (HTTP/2), its writes coalesced, and the client's identity.
    Tunnel(Connection, Flusher<AnyTls>, PeerIdentity),
    /// A standard TLS client's connection (no ALPN), its identity, and its route.
    Raw(TlsStream<TcpStream>, PeerIdentity, RouteName),
}

/// The TLS and HTTP/2 handshakes of one connection (TLS only for a standard TLS client, when
/// `raw` serves them); the client's identity from its certificate.
async fn handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    limits: Limits,
    raw: Option<&RawTls>,
) -> Result<Handshaken, (HandshakeFailure, String)> {
    let tls = acceptor
        .accept(tcp)
        .await
        .map_err(|e| (crate::tls_failure(&e), format!("TLS handshake failed: {e}")))?;
    let session = &tls.get_ref().1;
    let identity = identity_of(session);
    if let (None, Some(raw)) = (session.alpn_protocol(), raw) {
        let route = raw.route_for(session.server_name());
        return Ok(Handshaken::Raw(tls, identity, route));
    }
    let (conn, flusher) = h2_server(tokio_rustls::TlsStream::Server(tls), limits)
        .await
        .map_err(|e| {
            let why = format!("HTTP/2 handshake failed: {e}");
            (HandshakeFailure::Other, why)
        })?;
    Ok(Handshaken::Tunnel(conn, flusher, identity))
}

/// HTTP/2's server handshake over `tls`, its writes coalesced: done once the peer's preface
/// came.
pub(crate) async fn h2_server(
    tls: AnyTls,
    limits: Limits,
) -> Result<(Connection, Flusher<AnyTls>), h2::Error> {
    let (io, flusher) = coalesce(tls);
    let conn = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(SEND_BUFFER)
        .max_concurrent_streams(limits.max_streams_per_connection)
        .handshake::<_, Bytes>(io)
        .await?;
    Ok((conn, flusher))
}

/// One verified TLS connection, driven by the engine's lifecycle: a tunnel connection
/// (HTTP/2), or a standard TLS client's, which is one stream.
pub struct TlsConnection {
    kind: Kind,
    peer: Arc<Peer>,
    /// Wakes [`ServerConnection::next`] to close the connection (h2's is driven there).
    kill: Arc<Notify>,
    /// A dialed connection's watchdog: says why once the peer stopped answering keep-alives.
    silent: Option<watch::Receiver<Option<String>>>,
}

impl TlsConnection {
    /// A tunnel connection the service side dialed, its HTTP/2 served here. As HTTP/2's server
    /// it would send nothing on a quiet connection, so it keeps alive (a PING every
    /// [`crate::DIALED_KEEP_ALIVE`]): an app side restarted on its host answers the next one
    /// with a reset, and one gone silent is given up at the idle timeout.
    pub(crate) fn dialed(mut conn: Connection, peer: Arc<Peer>, limits: Limits) -> Self {
        let silent = conn.ping_pong().map(|ping| {
            let (tell, silent) = watch::channel(None);
            tokio::spawn(keep_alive(ping, limits, tell));
            silent
        });
        TlsConnection {
            kind: Kind::H2(conn),
            peer,
            kill: Arc::new(Notify::new()),
            silent,
        }
    }
}

/// PINGs the peer every [`crate::DIALED_KEEP_ALIVE`] until the connection is gone; tells
/// `silent` why if one is not answered within the idle timeout.
async fn keep_alive(mut ping: h2::PingPong, limits: Limits, silent: watch::Sender<Option<String>>) {
    let every = limits.keep_alive_interval().min(crate::DIALED_KEEP_ALIVE);
    loop {
        let answered = async {
            tokio::time::sleep(every).await;
            tokio::time::timeout(limits.idle_timeout, ping.ping(h2::Ping::opaque())).await
        };
        tokio::select! {
            answer = answered => match answer {
                Ok(Ok(_)) => {}
                // The connection ended: its loop tells why.
                Ok(Err(_)) => return,
                Err(_) => {
                    let why = format!("no keep-alive answer within {:?}", limits.idle_timeout);
                    silent.send_replace(Some(why));
                    return;
                }
            },
            () = silent.closed() => return,
        }
    }
}

/// Resolves with why once a dialed connection's watchdog found the peer silent; never for an
/// accepted one.
async fn went_silent(silent: &mut Option<watch::Receiver<Option<String>>>) -> String {
    if let Some(silent) = silent {
        if let Ok(why) = silent.wait_for(Option::is_some).await {
            return why.clone().unwrap_or_default();
        }
    }
    std::future::pending().await
}

// The tunnel connection, the common kind, stays inline; the rare raw one is boxed.
#[allow(clippy::large_enum_variant)]
enum Kind {
    H2(Connection),
    /// Boxed: a tunnel connection need not carry a TLS stream's room.
    Raw(Box<RawConnection>),
}

/// A standard TLS client's connection: its one stream, handed out once.
struct RawConnection {
    /// The connection's socket, to close it at once whichever half is busy.
    socket: Option<socket2::Socket>,
    stream: Option<(TlsStream<TcpStream>, RouteName)>,
    /// Cloned into the stream's halves; `ended` yields `None` once all are gone.
    live: Option<mpsc::Sender<()>>,
    ended: mpsc::Receiver<()>,
    /// Tells the stream's receiving half the connection is closed at once.
    killed: watch::Sender<bool>,
}

impl RawConnection {
    /// The stream, the first time; then waits for its end (or closes it at once on `kill`).
    async fn next(&mut self, peer: &Arc<Peer>, kill: &Notify) -> Result<TlsOpening, ConnectionEnd> {
        if let (Some((tls, route)), Some(live)) = (self.stream.take(), self.live.take()) {
            let tcp = tls.get_ref().0;
            let app = match (tcp.peer_addr(), tcp.local_addr()) {
                (Ok(source), Ok(destination)) => Some(AppAddrs {
                    source,
                    destination,
                }),
                _ => None,
            };
            return Ok(TlsOpening::Raw(TlsIncoming::Raw {
                tls: Box::new(tls),
                route,
                app,
                peer: peer.clone(),
                live,
                killed: self.killed.subscribe(),
            }));
        }
        loop {
            tokio::select! {
                _ = self.ended.recv() => break,
                () = kill.notified() => {
                    // Both halves fail at once, whichever is waiting (a reader that saw the
                    // client's end waits on nothing here).
                    self.killed.send_replace(true);
                    crate::raw::abort(&self.socket);
                    if let Some(socket) = &self.socket {
                        let _ = socket.shutdown(std::net::Shutdown::Both);
                    }
                }
            }
        }
        Err(ConnectionEnd {
            why: "closed by the client".to_owned(),
            peer_broke_protocol: false,
            closed_here: *self.killed.borrow(),
        })
    }
}

impl ServerConnection for TlsConnection {
    type Opening = TlsOpening;
    const TRANSPORT: &'static str = "tls";

    fn peer(&self) -> &Arc<Peer> {
        &self.peer
    }

    async fn next(&mut self) -> Result<TlsOpening, ConnectionEnd> {
        let conn = match &mut self.kind {
            Kind::H2(conn) => conn,
            Kind::Raw(raw) => return raw.next(&self.peer, &self.kill).await,
        };
        let next = loop {
            tokio::select! {
                next = conn.accept() => break next,
                () = self.kill.notified() => {
                    conn.abrupt_shutdown(h2::Reason::ENHANCE_YOUR_CALM);
                }
                why = went_silent(&mut self.silent) => {
                    conn.abrupt_shutdown(h2::Reason::NO_ERROR);
                    return Err(ConnectionEnd {
                        why,
                        peer_broke_protocol: false,
                        closed_here: false,
                    });
                }
            }
        };
        match next {
            Some(Ok((request, respond))) => Ok(TlsOpening::H2 {
                request,
                respond,
                peer: self.peer.clone(),
            }),
            // Ended by this side's HTTP/2 layer: the peer broke the protocol or its limits
            // (e.g. rapid reset: streams cancelled before they are accepted).
            Some(Err(e)) => Err(ConnectionEnd {
                peer_broke_protocol: !e.is_remote() && !e.is_io(),
                why: e.to_string(),
                closed_here: false,
            }),
            // h2 ends quietly on the client's FIN too, even one that cut streams off.
            None => Err(ConnectionEnd {
                why: "closed by the client".to_owned(),
                peer_broke_protocol: false,
                closed_here: false,
            }),
        }
    }

    /// A GOAWAY: h2 refuses later streams and closes once the running ones end.
    /// A standard TLS client's connection has one stream, and ends with it.
    fn drain(&mut self, _cause: DrainCause) -> Option<impl Future<Output = ()> + Send + 'static> {
        if let Kind::H2(conn) = &mut self.kind {
            conn.graceful_shutdown();
        }
        None::<std::future::Ready<()>>
    }

    fn closer(&self) -> Closer {
        let kill = self.kill.clone();
        Arc::new(move |_why: Close| kill.notify_one())
    }
}

/// A CONNECT stream the client opened, its request not read yet; or a standard TLS
/// client's connection, its route known.
pub enum TlsOpening {
    /// An HTTP/2 CONNECT.
    H2 {
        /// The request.
        request: http::Request<RecvStream>,
        /// Where its answer goes.
        respond: SendResponse<Bytes>,
        /// Who opened it.
        peer: Arc<Peer>,
    },
    /// A standard TLS client's connection.
    Raw(TlsIncoming),
}

impl OpeningStream for TlsOpening {
    type Incoming = TlsIncoming;

    async fn open(self) -> Result<TlsIncoming, OpenFailure> {
        let (request, mut respond, peer) = match self {
            TlsOpening::H2 {
                request,
                respond,
                peer,
            } => (request, respond, peer),
            TlsOpening::Raw(incoming) => return Ok(incoming),
        };
        let (parts, body) = request.into_parts();
        let route = (parts.method == Method::CONNECT)
            .then(|| {
                parts
                    .uri
                    .authority()
                    .map(|a| a.as_str().parse::<RouteName>())
            })
            .flatten();
        // The app's connection, from a client of version 2.
        let addr = |name| {
            let value = parts.headers.get(name)?.to_str().ok()?;
            value.parse::<std::net::SocketAddr>().ok()
        };
        let app = match (
            addr(amb_proto::APP_SOURCE_HEADER),
            addr(amb_proto::APP_DESTINATION_HEADER),
        ) {
            (Some(source), Some(destination)) => Some(AppAddrs {
                source,
                destination,
            }),
            _ => None,
        };
        match route {
            Some(Ok(route)) => Ok(TlsIncoming::H2 {
                respond,
                body,
                route,
                app,
                peer,
            }),
            other => {
                let why = match other {
                    Some(Err(e)) => e.to_string(),
                    _ => "not a CONNECT with an authority".into(),
                };
                let _ = respond.send_response(response(Refusal::BadRequest.http_status()), true);
                Err(OpenFailure {
                    error: StreamError::Protocol(format!(
                        "{} {:?}: {why}",
                        parts.method, parts.uri
                    )),
                    client_fault: true,
                })
            }
        }
    }
}

/// An HTTP/2 CONNECT stream, or a standard TLS client's connection, waiting for the engine's
/// decision.
pub enum TlsIncoming {
    /// An HTTP/2 CONNECT stream.
    H2 {
        /// Where its answer goes.
        respond: SendResponse<Bytes>,
        /// Its request body: the app's bytes.
        body: RecvStream,
        /// The route it asked for.
        route: RouteName,
        /// The app's connection, if the client told it.
        app: Option<AppAddrs>,
        /// Who opened it.
        peer: Arc<Peer>,
    },
    /// A standard TLS client's connection.
    Raw {
        /// The connection.
        tls: Box<TlsStream<TcpStream>>,
        /// The route its SNI named, or the server's `tls-route`.
        route: RouteName,
        /// The client's connection: it is the app.
        app: Option<AppAddrs>,
        /// Who the client is.
        peer: Arc<Peer>,
        /// Held by the stream's halves: the connection ends when they are gone.
        live: mpsc::Sender<()>,
        /// Turns true when the connection is closed at once.
        killed: watch::Receiver<bool>,
    },
}

fn response(status: u16) -> Response<()> {
    let mut response = Response::new(());
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    response
}

impl IncomingStream for TlsIncoming {
    type Send = ServerSend;
    type Recv = ServerRecv;

    fn route(&self) -> &RouteName {
        match self {
            TlsIncoming::H2 { route, .. } | TlsIncoming::Raw { route, .. } => route,
        }
    }

    fn app(&self) -> Option<AppAddrs> {
        match self {
            TlsIncoming::H2 { app, .. } | TlsIncoming::Raw { app, .. } => *app,
        }
    }

    fn peer(&self) -> &Arc<Peer> {
        match self {
            TlsIncoming::H2 { peer, .. } | TlsIncoming::Raw { peer, .. } => peer,
        }
    }

    async fn accept(self) -> Result<(ServerSend, ServerRecv), StreamError> {
        let (mut respond, body) = match self {
            TlsIncoming::H2 { respond, body, .. } => (respond, body),
            TlsIncoming::Raw {
                tls, live, killed, ..
            } => {
                let socket = crate::raw::socket_of(&tls);
                let (reader, writer) = tokio::io::split(*tls);
                let send = RawSend {
                    writer,
                    socket,
                    _live: live.clone(),
                };
                let recv = RawRecv {
                    reader,
                    buf: bytes::BytesMut::new(),
                    killed,
                    _live: live,
                };
                return Ok((ServerSend::Raw(send), ServerRecv::Raw(recv)));
            }
        };
        match respond.send_response(response(200), false) {
            Ok(send) => Ok((
                ServerSend::H2(H2Send::new(send, None)),
                ServerRecv::H2(H2Recv::Body(body)),
            )),
            Err(e) => {
                // h2 reports only a misuse here; the stream's state says why it is gone (reset
                // by the client, which the engine charges, or its connection lost).
                let gone = poll_fn(|cx| Poll::Ready(respond.poll_reset(cx))).await;
                Err(match gone {
                    Poll::Ready(Ok(reason)) => StreamError::Reset(ResetCode(reason.into())),
                    Poll::Ready(Err(why)) => h2_error(why),
                    Poll::Pending => {
                        StreamError::Protocol(format!("stream closed before it opened ({e})"))
                    }
                })
            }
        }
    }

    async fn refuse(self, why: Refusal) {
        match self {
            TlsIncoming::H2 { mut respond, .. } => {
                let mut answer = response(why.http_status());
                // The precise refusal, as QUIC's status byte: 503 stands for two.
                answer.headers_mut().insert(
                    amb_proto::REFUSAL_HEADER,
                    http::HeaderValue::from(u16::from(why.status_byte())),
                );
                let _ = respond.send_response(answer, true);
            }
            // A standard TLS client has no answer to read: its connection is reset, as a
            // tunnel client resets its app's.
            TlsIncoming::Raw { tls, .. } => {
                let _ = tls.get_ref().0.set_zero_linger();
            }
        }
    }
}

/// A server stream's sending half: HTTP/2's, or a standard TLS client's connection's.
pub enum ServerSend {
    /// An HTTP/2 CONNECT stream.
    H2(H2Send),
    /// A standard TLS client's connection.
    Raw(RawSend),
}

/// A server stream's receiving half: HTTP/2's, or a standard TLS client's connection's.
pub enum ServerRecv {
    /// An HTTP/2 CONNECT stream.
    H2(H2Recv),
    /// A standard TLS client's connection.
    Raw(RawRecv),
}

impl StreamSend for ServerSend {
    async fn send(&mut self, data: Bytes) -> Result<(), StreamError> {
        match self {
            ServerSend::H2(h2) => h2.send(data).await,
            ServerSend::Raw(raw) => raw.send(data).await,
        }
    }

    async fn finish(&mut self) -> Result<(), StreamError> {
        match self {
            ServerSend::H2(h2) => h2.finish().await,
            ServerSend::Raw(raw) => raw.finish().await,
        }
    }

    fn reset(&mut self, code: ResetCode) {
        match self {
            ServerSend::H2(h2) => h2.reset(code),
            ServerSend::Raw(raw) => raw.reset(code),
        }
    }

    async fn delivered(&mut self) {
        match self {
            ServerSend::H2(h2) => h2.delivered().await,
            ServerSend::Raw(raw) => raw.delivered().await,
        }
    }
}

impl StreamRecv for ServerRecv {
    async fn recv(&mut self) -> Result<Option<Bytes>, StreamError> {
        match self {
            ServerRecv::H2(h2) => h2.recv().await,
            ServerRecv::Raw(raw) => raw.recv().await,
        }
    }

    async fn recv_batch(
        &mut self,
        batch: &mut Vec<Bytes>,
        max: usize,
    ) -> Result<bool, StreamError> {
        match self {
            ServerRecv::H2(h2) => h2.recv_batch(batch, max).await,
            ServerRecv::Raw(raw) => raw.recv_batch(batch, max).await,
        }
    }

    fn stop(&mut self, code: ResetCode) {
        match self {
            ServerRecv::H2(h2) => h2.stop(code),
            ServerRecv::Raw(raw) => raw.stop(code),
        }
    }
}
