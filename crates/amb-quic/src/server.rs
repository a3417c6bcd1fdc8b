//! The server side: accept connections without blocking on handshakes, read each stream's
//! open header within a bound, and hand it to the engine.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use amb_proto::header::MAX_HEADER_LEN;
use amb_proto::status::STATUS_OPEN;
use amb_proto::{
    decode_open_header, DrainCause, DrainWatch, IncomingStream, Limits, Peer, Refusal,
    RefusalBudget, ResetCode, RouteName, StreamEnd, StreamError, StreamTally,
};
use quinn::crypto::rustls::QuicServerConfig;
use quinn::{Endpoint, VarInt};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::stream::{write_error, QuicRecv, QuicSend};
use crate::{transport_config, tune_udp, QuicError};

/// A QUIC listener for tunnel connections.
pub struct QuicServer {
    endpoint: Endpoint,
    /// The newest configuration, handed to the endpoint when it changes.
    tls: watch::Receiver<Arc<rustls::ServerConfig>>,
    /// The trust generation of the configuration (see [`amb_proto::DrainWatch`]).
    trust: watch::Receiver<u64>,
    /// The configuration the endpoint started with, and the trust generation it carries.
    first: (Arc<quinn::ServerConfig>, u64),
    limits: Limits,
    /// One task per connection; each ends when its connection closes.
    connections: TaskTracker,
}

impl QuicServer {
    /// Serves on an already bound UDP socket; `tls` must offer [`amb_proto::ALPN_QUIC`] and
    /// require client certificates. Each handshake takes the configuration `tls` holds at the
    /// time; when `trust` moves (after `tls`), the connections verified before drain.
    pub fn new(
        socket: std::net::UdpSocket,
        tls: watch::Receiver<Arc<rustls::ServerConfig>>,
        trust: watch::Receiver<u64>,
        limits: Limits,
    ) -> Result<Self, QuicError> {
        let addr = socket.local_addr().map_err(|source| QuicError::Socket {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            source,
        })?;
        // The generation before the configuration, as in `serve`.
        let generation = *trust.borrow();
        let config = server_config(tls.borrow().clone(), &limits)?;
        tune_udp(&socket);
        let endpoint = Endpoint::new(
            crate::endpoint_config(),
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
) -> Result<quinn::ServerConfig, QuicError> {
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| QuicError::Tls(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport_config(limits, true));
    Ok(config)
}

/// Accepts connections until `stop` turns true, calling `handler` for each stream in a task of
/// its own. Handshakes run in their own tasks, so a slow one never blocks the accept loop.
pub async fn serve<H, F>(server: &QuicServer, mut stop: watch::Receiver<bool>, handler: H)
where
    H: Fn(QuicIncoming) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = StreamEnd> + Send + 'static,
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
                match server_config(tls.borrow_and_update().clone(), &server.limits) {
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
        let mut drain_watch = DrainWatch {
            stop: stop.clone(),
            trust: server.trust.clone(),
            verified_under,
        };
        server.connections.spawn(async move {
            let addr = incoming.remote_address();
            let handshake = async { incoming.accept_with(config)?.await };
            let conn = match tokio::time::timeout(limits.handshake_timeout, handshake).await {
                Ok(Ok(conn)) => conn,
                Ok(Err(e)) => {
                    warn!(peer = %addr, transport = "quic", "handshake failed: {e}");
                    return;
                }
                Err(_) => {
                    warn!(peer = %addr, transport = "quic", "handshake timed out after {:?}", limits.handshake_timeout);
                    return;
                }
            };
            let identity = conn
                .peer_identity()
                .and_then(|id| {
                    id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                        .ok()
                })
                .and_then(|chain| chain.first().map(amb_pki::peer_identity))
                .unwrap_or_default();
            let peer = Arc::new(Peer { identity, addr });
            let ctx = Arc::new(ConnCtx {
                peer: peer.clone(),
                conn: conn.clone(),
                streams: StreamTally::default(),
                refusing: AtomicBool::new(false),
                budget: RefusalBudget::new(),
            });
            if let Err(e) = notify(&conn, &crate::WELCOME).await {
                return warn!(%peer, transport = "quic", "tunnel connection lost before welcome: {e}");
            }
            debug!(%peer, transport = "quic", "tunnel connection up");
            let mut draining = false;
            loop {
                let accepted = tokio::select! {
                    accepted = conn.accept_bi() => accepted,
                    cause = drain_watch.asked(), if !draining => {
                        draining = true;
                        if cause == DrainCause::TrustChanged {
                            info!(%peer, transport = "quic", "the trusted CAs changed: draining the connection, so the client connects and is verified again");
                            tokio::spawn(cut_off_after(ctx.clone(), limits.drain_timeout));
                        }
                        tokio::spawn(drain(ctx.clone(), cause));
                        continue;
                    }
                };
                let (send, recv) = match accepted {
                    Ok(s) => s,
                    Err(e) => return log_end(&ctx, e).await,
                };
                let (handler, ctx, peer) = (handler.clone(), ctx.clone(), peer.clone());
                tokio::spawn(async move {
                    let header = read_header(send, recv, ctx.clone());
                    match tokio::time::timeout(limits.open_timeout, header).await {
                        Ok(Ok(incoming)) if ctx.refusing.load(Ordering::Relaxed) => {
                            warn!(%peer, transport = "quic", route = %incoming.route, "stream refused: {} (opened after the drain notice)", Refusal::Unavailable);
                            incoming.refuse(Refusal::Unavailable).await;
                        }
                        Ok(Ok(incoming)) => {
                            let running = ctx.streams.start();
                            running.ended(handler(incoming).await);
                        }
                        // The connection's end is logged once, not once per pending stream.
                        Ok(Err(StreamError::ConnectionLost(e))) => {
                            debug!(%peer, transport = "quic", "stream dropped before its header: connection lost: {e}")
                        }
                        Ok(Err(e)) => warn!(%peer, transport = "quic", "bad stream open: {e}"),
                        Err(_) => {
                            warn!(%peer, transport = "quic", "stream open header not received within {:?}", limits.open_timeout)
                        }
                    }
                });
            }
        });
    }
}

/// Drains one connection: tells the client, serves the streams it opened before it knew, then
/// closes once they are done. A stream opened later (a client that ignores the notice) is
/// refused, so the drain always ends.
async fn drain(ctx: Arc<ConnCtx>, cause: DrainCause) {
    let notice = async {
        let uni = notify(&ctx.conn, crate::DRAIN_NOTICE).await?;
        // Acknowledged: the client has it. Streams it opened just before may still be on
        // their way for a round trip.
        uni.stopped().await.map_err(|e| e.to_string())?;
        tokio::time::sleep(ctx.conn.rtt()).await;
        Ok::<_, String>(())
    };
    if let Err(e) = notice.await {
        debug!(peer = %ctx.peer, transport = "quic", "drain notice not delivered: {e}");
    }
    ctx.refusing.store(true, Ordering::Relaxed);
    ctx.streams.settled().await;
    let reason: &[u8] = match cause {
        DrainCause::Stopping => b"server shutting down",
        DrainCause::TrustChanged => b"trusted CAs changed",
    };
    ctx.conn.close(VarInt::from_u32(0), reason);
}

/// Closes a connection drained by a change of the trusted CAs if it is still open `after`,
/// streams and all: its client may ignore the drain, and was verified under the old CAs.
async fn cut_off_after(ctx: Arc<ConnCtx>, after: std::time::Duration) {
    tokio::time::sleep(after).await;
    ctx.close(
        format_args!("still open {after:?} after the trusted CAs changed"),
        b"trusted CAs changed",
    );
}

/// One line for the connection's end, however many streams it cut off: a warning if it cut
/// any off and this side did not close it (a kill for the refusal budget was logged then).
async fn log_end(ctx: &ConnCtx, end: quinn::ConnectionError) {
    let peer = &ctx.peer;
    match ctx.streams.cut_off_once_settled().await {
        cut_off if cut_off > 0 && end != quinn::ConnectionError::LocallyClosed => {
            warn!(%peer, transport = "quic", streams_cut_off = cut_off, "tunnel connection lost: {end}")
        }
        _ => debug!(%peer, transport = "quic", "tunnel connection ended: {end}"),
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

/// Reads the open header: at most [`MAX_HEADER_LEN`] bytes, and never past it, so app bytes stay
/// in the stream for the relay.
async fn read_header(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    ctx: Arc<ConnCtx>,
) -> Result<QuicIncoming, StreamError> {
    let mut buf = [0u8; MAX_HEADER_LEN];
    let mut have = 0;
    let mut want = 2;
    loop {
        let read = recv.read_exact(&mut buf[have..want]).await;
        if let Err(e) = read {
            send.reset(VarInt::from_u32(amb_proto::ResetCode::PROTOCOL.0))
                .ok();
            // The client ended or reset the stream before its header (a lost connection is not
            // the client's doing).
            return Err(match e {
                quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(lost)) => {
                    StreamError::ConnectionLost(lost.to_string())
                }
                e => {
                    ctx.charge("stream cancelled before its header");
                    StreamError::Protocol(format!("reading stream header: {e}"))
                }
            });
        }
        have = want;
        match decode_open_header(&buf[..have]) {
            Ok(Some(header)) => {
                return Ok(QuicIncoming {
                    send,
                    recv,
                    route: header.route,
                    ctx,
                });
            }
            Ok(None) => want = 2 + usize::from(buf[1]),
            Err(e) => {
                send_refusal(&mut send, &mut recv, &ctx, Refusal::BadRequest).await;
                return Err(StreamError::Protocol(e.to_string()));
            }
        }
    }
}

/// What the streams of one tunnel connection share.
struct ConnCtx {
    peer: Arc<Peer>,
    conn: quinn::Connection,
    streams: StreamTally,
    /// Draining, and the client has had the notice: new streams are refused.
    refusing: AtomicBool,
    budget: RefusalBudget,
}

impl ConnCtx {
    /// Spends one unit of the [`RefusalBudget`]; a client past it loses the connection.
    /// Returns whether the connection stays.
    fn charge(&self, why: impl std::fmt::Display) -> bool {
        if self.conn.close_reason().is_some() {
            // Already closing: streams failing because of it are not the client's doing.
            return false;
        }
        if self.budget.spend() {
            return true;
        }
        self.close(
            format_args!("too many refused streams (last: {why})"),
            b"too many refused streams",
        );
        false
    }

    /// Closes the connection, streams and all, telling the client `reason`, with one warning
    /// saying why (none if it is closing already).
    fn close(&self, why: std::fmt::Arguments<'_>, reason: &[u8]) {
        if self.conn.close_reason().is_none() {
            warn!(peer = %self.peer, transport = "quic", "closing tunnel connection: {why}");
            self.conn
                .close(VarInt::from_u32(ResetCode::REFUSED.0), reason);
        }
    }
}

/// A QUIC stream whose header has been read, waiting for the engine's decision.
pub struct QuicIncoming {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    route: RouteName,
    ctx: Arc<ConnCtx>,
}

impl IncomingStream for QuicIncoming {
    type Send = QuicSend;
    type Recv = QuicRecv;

    fn route(&self) -> &RouteName {
        &self.route
    }

    fn peer(&self) -> &Arc<Peer> {
        &self.ctx.peer
    }

    async fn accept(mut self) -> Result<(QuicSend, QuicRecv), StreamError> {
        if let Err(e) = self
            .send
            .write_chunk(bytes::Bytes::from_static(&[STATUS_OPEN]))
            .await
        {
            // Cancelled while the server dialed: rapid reset costs the client its budget.
            if matches!(e, quinn::WriteError::Stopped(_)) {
                self.ctx.charge("stream cancelled before it opened");
            }
            return Err(write_error(e));
        }
        Ok((
            QuicSend(self.send),
            QuicRecv {
                stream: self.recv,
                awaiting_status: false,
            },
        ))
    }

    async fn refuse(mut self, why: Refusal) {
        send_refusal(&mut self.send, &mut self.recv, &self.ctx, why).await;
    }
}

/// Answers a stream with a refusal status byte, ends it, and stops reading the client's bytes.
/// A client that keeps causing refusals past its [`RefusalBudget`] loses the connection.
async fn send_refusal(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    ctx: &ConnCtx,
    why: Refusal,
) {
    if why.is_client_fault() && !ctx.charge(why) {
        return;
    }
    let status = bytes::Bytes::copy_from_slice(&[why.status_byte()]);
    let _ = send.write_chunk(status).await;
    let _ = send.finish();
    let _ = recv.stop(VarInt::from_u32(amb_proto::ResetCode::REFUSED.0));
}
