//! The server side: accept TCP without waiting on handshakes, verify the client in TLS, and hand
//! each connection to the engine's lifecycle; read each CONNECT, drain by GOAWAY.

use std::future::{poll_fn, Future};
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;

use amb_proto::{
    Close, Closer, ConnectionEnd, DrainCause, FailedHandshake, HandshakeFailure, IncomingStream,
    Limits, OnFailedHandshake, OpenFailure, OpeningStream, Peer, PeerIdentity, Refusal, ResetCode,
    RouteName, ServerConnection, StreamError,
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
use tracing::warn;

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
    /// The trust generation of the configuration (drains the connections verified under an earlier one).
    trust: watch::Receiver<u64>,
    limits: Limits,
    connections: TaskTracker,
    failed: OnFailedHandshake,
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
        }
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
pub async fn serve<H, F>(server: &mut TlsServer, mut stop: watch::Receiver<bool>, handler: H)
where
    H: Fn(TlsConnection, u64) -> F + Clone + Send + Sync + 'static,
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
        // The generation before the configuration: one that moves in between drains the
        // connection for nothing, never lets it keep an old trust.
        let verified_under = *server.trust.borrow();
        let acceptor = TlsAcceptor::from(server.tls.borrow().clone());
        let (limits, handler, failed) = (server.limits, handler.clone(), server.failed.clone());
        server.connections.spawn(async move {
            tune_tcp(&tcp);
            let timeout = limits.handshake_timeout;
            let handshake = tokio::time::timeout(timeout, handshake(acceptor, tcp, limits));
            let (conn, flusher, identity) = match handshake.await {
                Ok(Ok(done)) => done,
                Ok(Err((kind, why))) => {
                    return failed(FailedHandshake {
                        peer: addr,
                        transport: "tls",
                        kind,
                        why,
                    })
                }
                Err(_) => {
                    return failed(FailedHandshake {
                        peer: addr,
                        transport: "tls",
                        kind: HandshakeFailure::Timeout,
                        why: format!("handshake timed out after {timeout:?}"),
                    })
                }
            };
            let peer = Arc::new(Peer { identity, addr });
            let lingerer = flusher.lingerer();
            let kill = Arc::new(Notify::new());
            let serving = handler(TlsConnection { conn, peer, kill }, verified_under);
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
) -> Result<(Connection, Flusher<TlsStream<TcpStream>>, PeerIdentity), (HandshakeFailure, String)> {
    let tls = acceptor
        .accept(tcp)
        .await
        .map_err(|e| (crate::tls_failure(&e), format!("TLS handshake failed: {e}")))?;
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
        .map_err(|e| {
            let why = format!("HTTP/2 handshake failed: {e}");
            (HandshakeFailure::Other, why)
        })?;
    Ok((conn, flusher, identity))
}

/// One verified TLS tunnel connection (HTTP/2), driven by the engine's lifecycle.
pub struct TlsConnection {
    conn: Connection,
    peer: Arc<Peer>,
    /// Wakes [`ServerConnection::next`] to close the connection (h2's is driven there).
    kill: Arc<Notify>,
}

impl ServerConnection for TlsConnection {
    type Opening = TlsOpening;
    const TRANSPORT: &'static str = "tls";

    fn peer(&self) -> &Arc<Peer> {
        &self.peer
    }

    async fn next(&mut self) -> Result<TlsOpening, ConnectionEnd> {
        let next = loop {
            tokio::select! {
                next = self.conn.accept() => break next,
                () = self.kill.notified() => {
                    self.conn.abrupt_shutdown(h2::Reason::ENHANCE_YOUR_CALM);
                }
            }
        };
        match next {
            Some(Ok((request, respond))) => Ok(TlsOpening {
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
    fn drain(&mut self, _cause: DrainCause) -> Option<impl Future<Output = ()> + Send + 'static> {
        self.conn.graceful_shutdown();
        None::<std::future::Ready<()>>
    }

    fn closer(&self) -> Closer {
        let kill = self.kill.clone();
        Arc::new(move |_why: Close| kill.notify_one())
    }
}

/// A CONNECT stream the client opened, its request not read yet.
pub struct TlsOpening {
    request: http::Request<RecvStream>,
    respond: SendResponse<Bytes>,
    peer: Arc<Peer>,
}

impl OpeningStream for TlsOpening {
    type Incoming = TlsIncoming;

    async fn open(self) -> Result<TlsIncoming, OpenFailure> {
        let TlsOpening {
            request,
            mut respond,
            peer,
        } = self;
        let (parts, body) = request.into_parts();
        let route = (parts.method == Method::CONNECT)
            .then(|| {
                parts
                    .uri
                    .authority()
                    .map(|a| a.as_str().parse::<RouteName>())
            })
            .flatten();
        match route {
            Some(Ok(route)) => Ok(TlsIncoming {
                respond,
                body,
                route,
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

/// An HTTP/2 CONNECT stream waiting for the engine's decision.
pub struct TlsIncoming {
    respond: SendResponse<Bytes>,
    body: RecvStream,
    route: RouteName,
    peer: Arc<Peer>,
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
        &self.peer
    }

    async fn accept(mut self) -> Result<(H2Send, H2Recv), StreamError> {
        match self.respond.send_response(response(200), false) {
            Ok(send) => Ok((H2Send::new(send, None), H2Recv::Body(self.body))),
            Err(e) => {
                // h2 reports only a misuse here; the stream's state says why it is gone (reset
                // by the client, which the engine charges, or its connection lost).
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
        let mut answer = response(why.http_status());
        // The precise refusal, as QUIC's status byte: 503 stands for two.
        answer.headers_mut().insert(
            amb_proto::REFUSAL_HEADER,
            http::HeaderValue::from(u16::from(why.status_byte())),
        );
        let _ = self.respond.send_response(answer, true);
    }
}
