//! The server side: accept TCP without waiting on handshakes, verify the client in TLS, and hand
//! each CONNECT stream to the engine.

use std::future::{poll_fn, Future};
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;

use amb_proto::{
    DrainCause, DrainWatch, IncomingStream, Limits, Peer, PeerIdentity, Refusal, RefusalBudget,
    ResetCode, RouteName, StreamEnd, StreamError, StreamTally,
};
use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use http::{Method, Response, StatusCode};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::coalesce::{coalesce, Coalesce, Flusher};
use crate::stream::{h2_error, H2Recv, H2Send};
use crate::{tune_tcp, CONNECTION_WINDOW, LINGER, MAX_FRAME, SEND_BUFFER, STREAM_WINDOW};

/// A TLS listener for tunnel connections.
pub struct TlsServer {
    /// Closed when the drain starts, so clients redial elsewhere instead of waiting in its
    /// backlog.
    listener: Option<TcpListener>,
    /// The newest configuration, for each new handshake.
    tls: watch::Receiver<Arc<rustls::ServerConfig>>,
    /// The trust generation of the configuration (see [`amb_proto::DrainWatch`]).
    trust: watch::Receiver<u64>,
    limits: Limits,
    connections: TaskTracker,
}

impl TlsServer {
    /// Serves on an already bound listener; `tls` must offer [`amb_proto::ALPN_H2`] and require
    /// client certificates. Each handshake takes the configuration `tls` holds at the time;
    /// when `trust` moves (after `tls`), the connections verified before drain.
    pub fn new(
        listener: TcpListener,
        tls: watch::Receiver<Arc<rustls::ServerConfig>>,
        trust: watch::Receiver<u64>,
        limits: Limits,
    ) -> Self {
        TlsServer {
            listener: Some(listener),
            tls,
            trust,
            limits,
            connections: TaskTracker::new(),
        }
    }

    /// After `serve` returned: resolves once every connection has finished its streams, sent
    /// GOAWAY and flushed, so no answer in flight is cut off.
    pub async fn drained(&self) {
        self.connections.close();
        self.connections.wait().await;
    }
}

/// Accepts connections until `stop` turns true, then closes the listener; calls `handler` for
/// each CONNECT stream in a task of its own. Each handshake runs in its own task under the
/// handshake timeout.
pub async fn serve<H, F>(server: &mut TlsServer, mut stop: watch::Receiver<bool>, handler: H)
where
    H: Fn(TlsIncoming) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = StreamEnd> + Send + 'static,
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
        // The generation before the configuration: one that moves in between drains the
        // connection for nothing, never lets it keep an old trust.
        let verified_under = *server.trust.borrow();
        let acceptor = TlsAcceptor::from(server.tls.borrow().clone());
        let (limits, handler) = (server.limits, handler.clone());
        let drain = DrainWatch {
            stop: stop.clone(),
            trust: server.trust.clone(),
            verified_under,
        };
        server.connections.spawn(async move {
            tune_tcp(&tcp);
            let timeout = limits.handshake_timeout;
            let handshake = tokio::time::timeout(timeout, handshake(acceptor, tcp, limits));
            let (conn, flusher, identity) = match handshake.await {
                Ok(Ok(done)) => done,
                Ok(Err(why)) => return warn!(peer = %addr, transport = "tls", "{why}"),
                Err(_) => {
                    return warn!(peer = %addr, transport = "tls", "handshake timed out after {timeout:?}")
                }
            };
            let peer = Arc::new(Peer { identity, addr });
            let lingerer = flusher.lingerer();
            let serving = serve_connection(conn, peer, drain, limits, handler);
            flusher.run(pin!(serving)).await;
            lingerer.linger(LINGER).await;
        });
    }
}

type Connection = h2::server::Connection<Coalesce<TlsStream<TcpStream>>, Bytes>;

/// The TLS and HTTP/2 handshakes of one connection; the client's identity from its certificate.
async fn handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    limits: Limits,
) -> Result<(Connection, Flusher<TlsStream<TcpStream>>, PeerIdentity), String> {
    let tls = acceptor
        .accept(tcp)
        .await
        .map_err(|e| format!("TLS handshake failed: {e}"))?;
    let identity = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(amb_pki::peer_identity)
        .unwrap_or_default();
    let (io, flusher) = coalesce(tls);
    let conn = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(SEND_BUFFER)
        .max_concurrent_streams(limits.max_streams_per_connection)
        .handshake::<_, Bytes>(io)
        .await
        .map_err(|e| format!("HTTP/2 handshake failed: {e}"))?;
    Ok((conn, flusher, identity))
}

/// Accepts the streams of one authenticated connection until it ends, each handled in a task
/// of its own.
async fn serve_connection<H, F>(
    mut conn: Connection,
    peer: Arc<Peer>,
    mut drain: DrainWatch,
    limits: Limits,
    handler: H,
) where
    H: Fn(TlsIncoming) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = StreamEnd> + Send + 'static,
{
    let ctx = Arc::new(ConnCtx {
        peer: peer.clone(),
        streams: StreamTally::default(),
        budget: RefusalBudget::new(),
        kill: Notify::new(),
        closing: AtomicBool::new(false),
    });
    // However the loop below ends, streams still pending must not charge the budget.
    let _closing = CloseOnDrop(ctx.clone());
    debug!(%peer, transport = "tls", "tunnel connection up");
    let mut draining = false;
    let mut killed = false;
    let end = loop {
        let next = tokio::select! {
            next = conn.accept() => next,
            _ = ctx.kill.notified(), if !killed => {
                killed = true;
                conn.abrupt_shutdown(h2::Reason::ENHANCE_YOUR_CALM);
                continue;
            }
            cause = drain.asked(), if !draining => {
                // No new streams; live ones finish, then the connection closes.
                draining = true;
                if cause == DrainCause::TrustChanged {
                    info!(%peer, transport = "tls", "the trusted CAs changed: draining the connection, so the client connects and is verified again");
                    tokio::spawn(cut_off_after(ctx.clone(), limits.drain_timeout));
                }
                conn.graceful_shutdown();
                continue;
            }
        };
        let (request, respond) = match next {
            Some(Ok(r)) => r,
            // This side's HTTP/2 layer ended it: the peer broke the protocol or its
            // limits (e.g. rapid reset: streams cancelled before they are accepted).
            // A kill for the refusal budget was logged when it was decided.
            Some(Err(e)) if !killed && !e.is_remote() && !e.is_io() => {
                return warn!(%peer, transport = "tls", "closing tunnel connection: {e}")
            }
            Some(Err(e)) => break e.to_string(),
            // h2 ends quietly on the client's FIN too, even one that cut streams off.
            None => break "closed by the client".to_owned(),
        };
        let (handler, ctx) = (handler.clone(), ctx.clone());
        tokio::spawn(async move {
            let (parts, body) = request.into_parts();
            let route = (parts.method == Method::CONNECT)
                .then(|| {
                    parts
                        .uri
                        .authority()
                        .map(|a| a.as_str().parse::<RouteName>())
                })
                .flatten();
            let incoming = TlsIncoming {
                respond,
                body,
                route: RouteName::default_route(),
                ctx: ctx.clone(),
            };
            match route {
                Some(Ok(route)) => {
                    let running = ctx.streams.start();
                    running.ended(handler(TlsIncoming { route, ..incoming }).await);
                }
                other => {
                    warn!(peer = %incoming.ctx.peer, transport = "tls", "bad stream open: {} {:?}: {}", parts.method, parts.uri,
                            match other { Some(Err(e)) => e.to_string(), _ => "not a CONNECT with an authority".into() });
                    incoming.refuse(Refusal::BadRequest).await;
                }
            }
        });
    };
    // One line for the connection, however many streams it cut off.
    match ctx.streams.cut_off_once_settled().await {
        cut_off if cut_off > 0 && !killed => {
            warn!(%peer, transport = "tls", streams_cut_off = cut_off, "tunnel connection lost: {end}")
        }
        _ => debug!(%peer, transport = "tls", "tunnel connection ended: {end}"),
    }
}

/// Closes a connection drained by a change of the trusted CAs if it is still open `after`,
/// streams and all: its client may ignore the drain, and was verified under the old CAs.
async fn cut_off_after(ctx: Arc<ConnCtx>, after: std::time::Duration) {
    tokio::time::sleep(after).await;
    ctx.close(format_args!(
        "still open {after:?} after the trusted CAs changed"
    ));
}

/// Marks a connection as closing when its task ends.
struct CloseOnDrop(Arc<ConnCtx>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.closing.store(true, Ordering::Relaxed);
    }
}

/// What the streams of one tunnel connection share.
struct ConnCtx {
    peer: Arc<Peer>,
    streams: StreamTally,
    budget: RefusalBudget,
    /// Wakes the connection task to close the connection.
    kill: Notify,
    /// The connection is closing or closed: its streams' failures are no longer the client's.
    closing: AtomicBool,
}

impl ConnCtx {
    /// Spends one unit of the [`RefusalBudget`]; a client past it loses the connection (logged
    /// once, however many streams fail afterwards).
    fn charge(&self, why: impl std::fmt::Display) {
        if self.closing.load(Ordering::Relaxed) || self.budget.spend() {
            return;
        }
        self.close(format_args!("too many refused streams (last: {why})"));
    }

    /// Closes the connection, streams and all, with one warning saying why (none if it is
    /// closing already).
    fn close(&self, why: std::fmt::Arguments<'_>) {
        if !self.closing.swap(true, Ordering::Relaxed) {
            warn!(peer = %self.peer, transport = "tls", "closing tunnel connection: {why}");
            self.kill.notify_one();
        }
    }
}

/// An HTTP/2 CONNECT stream waiting for the engine's decision.
pub struct TlsIncoming {
    respond: SendResponse<Bytes>,
    body: RecvStream,
    route: RouteName,
    ctx: Arc<ConnCtx>,
}

fn response(status: u16) -> Response<()> {
    let mut response = Response::new(());
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    response
}

impl IncomingStream for TlsIncoming {
    type Send = H2Send;
    type Recv = H2Recv;

    fn route(&self) -> &RouteName {
        &self.route
    }

    fn peer(&self) -> &Arc<Peer> {
        &self.ctx.peer
    }

    async fn accept(mut self) -> Result<(H2Send, H2Recv), StreamError> {
        match self.respond.send_response(response(200), false) {
            Ok(send) => Ok((H2Send::new(send, None), H2Recv::Body(self.body))),
            Err(e) => {
                // Cancelled while the server dialed: rapid reset costs the client its budget.
                self.ctx.charge("stream cancelled before it opened");
                // h2 reports only a misuse here; the stream's state says why it is gone (reset
                // by the client, or its connection lost).
                let gone = poll_fn(|cx| Poll::Ready(self.respond.poll_reset(cx))).await;
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

    async fn refuse(mut self, why: Refusal) {
        let _ = self
            .respond
            .send_response(response(why.http_status()), true);
        if why.is_client_fault() {
            self.ctx.charge(why);
        }
    }
}
