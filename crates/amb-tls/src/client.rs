//! The client side: mTLS connections carrying HTTP/2, one CONNECT stream per app connection.

use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use amb_proto::{AppAddrs, Dialer, Limits, Retirement, RouteName, StreamError, Tunnel};
use bytes::Bytes;
use h2::client::SendRequest;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::{oneshot, watch, Semaphore};
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;
use tracing::debug;

use crate::coalesce::coalesce;
use crate::server::{h2_server, identity_of, AnyTls, TlsConnection};
use crate::stream::{h2_error, H2Recv, H2Send};
use crate::{tune_tcp, TlsError, CONNECTION_WINDOW, LINGER, MAX_FRAME, SEND_BUFFER, STREAM_WINDOW};

/// Dials TLS tunnel connections to one server, at the addresses the engine picks.
pub struct TlsDialer {
    /// The newest configuration, for each new dial.
    tls: watch::Receiver<Arc<rustls::ClientConfig>>,
    server_name: ServerName<'static>,
    limits: Limits,
}

impl TlsDialer {
    /// A dialer expecting a server certificate valid for `server_name`. `tls` must offer the
    /// [`amb_proto::ALPN_H2`] ALPN; each dial takes the configuration it holds at the time.
    pub fn new(
        tls: watch::Receiver<Arc<rustls::ClientConfig>>,
        server_name: &str,
        limits: Limits,
    ) -> Result<Self, TlsError> {
        let server_name = ServerName::try_from(server_name.to_owned())
            .map_err(|_| TlsError::ServerName(server_name.to_owned()))?;
        Ok(TlsDialer {
            tls,
            server_name,
            limits,
        })
    }

    async fn connect(&self, addr: SocketAddr) -> Result<TlsTunnel, TlsError> {
        let tls = tls_connect(&self.tls, &self.server_name, addr).await?;
        let peer_certificate = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .map(|leaf| leaf.clone().into_owned());
        start_h2(
            tokio_rustls::TlsStream::Client(tls),
            addr,
            self.limits,
            peer_certificate,
        )
        .await
    }
}

/// TCP connect and TLS handshake with `addr`, with the configuration `tls` holds now.
async fn tls_connect(
    tls: &watch::Receiver<Arc<rustls::ClientConfig>>,
    server_name: &ServerName<'static>,
    addr: SocketAddr,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, TlsError> {
    let tcp = TcpStream::connect(addr).await.map_err(TlsError::Connect)?;
    tune_tcp(&tcp);
    let connector = TlsConnector::from(tls.borrow().clone());
    connector
        .connect(server_name.clone(), tcp)
        .await
        .map_err(TlsError::Handshake)
}

/// Starts HTTP/2 as its client over a verified TLS connection to `addr` (dialed, or accepted
/// by a reverse tunnel's app side): this side opens the streams. Done once a PING is
/// answered, which proves the peer took the connection.
pub(crate) async fn start_h2(
    tls: AnyTls,
    addr: SocketAddr,
    limits: Limits,
    peer_certificate: Option<rustls::pki_types::CertificateDer<'static>>,
) -> Result<TlsTunnel, TlsError> {
    let (io, flusher) = coalesce(tls);
    let (send_request, mut connection) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(SEND_BUFFER)
        .max_concurrent_streams(0)
        .handshake::<_, Bytes>(io)
        .await
        .map_err(TlsError::H2)?;
    // In TLS 1.3 the client finishes its handshake before the server has checked the client
    // certificate. A PING answered proves the peer took the connection (a dialing client's
    // certificate accepted; an accepting app side's HTTP/2 peer up); a rejection arrives as a
    // TLS alert instead, and is reported as this dial's failure.
    let mut ping = connection.ping_pong().ok_or_else(|| TlsError::Rejected {
        why: "HTTP/2 ping unavailable".into(),
    })?;
    let lingerer = flusher.lingerer();
    let mut connection = flusher.run(connection);
    tokio::select! {
        pong = ping.ping(h2::Ping::opaque()) => pong.map(drop),
        closed = &mut connection => closed.and_then(|()| Err(h2::Error::from(h2::Reason::NO_ERROR))),
    }
    .map_err(|e| TlsError::Rejected { why: e.to_string() })?;

    // The server's limit, from the SETTINGS that came before the PING's answer.
    let slots = send_request
        .current_max_send_streams()
        .min(Semaphore::MAX_PERMITS);
    let (retired_tx, retired_rx) = watch::channel(None);
    let (release_probe, tunnel_dropped) = oneshot::channel();
    let goaway_probe = send_request.clone();
    let task = tokio::spawn(async move {
        let keepalive = async {
            loop {
                tokio::time::sleep(limits.keep_alive_interval()).await;
                match tokio::time::timeout(limits.idle_timeout, ping.ping(h2::Ping::opaque())).await
                {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return format!("keep-alive failed: {e}"),
                    Err(_) => {
                        return format!("no keep-alive answer within {:?}", limits.idle_timeout)
                    }
                }
            }
        };
        let connection =
            drive_watching_for_goaway(connection, goaway_probe, tunnel_dropped, &retired_tx);
        let reason = tokio::select! {
            r = connection => match r {
                Ok(()) => {
                    lingerer.linger(LINGER).await;
                    "closed by the peer".to_owned()
                }
                Err(e) => e.to_string(),
            },
            why = keepalive => why,
        };
        debug!(peer = %addr, transport = "tls", "tunnel connection ended: {reason}");
        retired_tx.send_modify(|retired| {
            retired.get_or_insert(Retirement::Lost(reason));
        });
    });
    Ok(TlsTunnel {
        slots: Arc::new(Semaphore::new(slots)),
        handles: Mutex::new(Some(Handles {
            send_request,
            release_probe,
            task,
        })),
        retired: retired_rx,
        peer_certificate,
    })
}

impl Dialer for TlsDialer {
    type Tunnel = TlsTunnel;
    type Error = TlsError;

    /// TCP, TLS and HTTP/2 handshakes, then a PING answered; the caller bounds the time.
    async fn dial(&self, addr: SocketAddr) -> Result<TlsTunnel, TlsError> {
        self.connect(addr).await
    }

    fn handshake_failure(error: &TlsError) -> Option<amb_proto::HandshakeFailure> {
        error.handshake_failure()
    }
}

/// Drives an h2 client connection to its end, and reports [`Retirement::Draining`] the moment
/// the server's GOAWAY arrives, so no new stream is opened on it while its live streams finish.
///
/// h2 tells of a GOAWAY only through a handle's readiness to open a stream, so `probe` is asked
/// after each turn of the connection. It counts as a user of the connection, which closes once
/// idle only when no handle is left: the probe is let go when the tunnel is dropped.
async fn drive_watching_for_goaway(
    connection: impl Future<Output = Result<(), h2::Error>>,
    probe: SendRequest<Bytes>,
    mut tunnel_dropped: oneshot::Receiver<()>,
    retired: &watch::Sender<Option<Retirement>>,
) -> Result<(), h2::Error> {
    let mut connection = pin!(connection);
    let mut probe = Some(probe);
    poll_fn(|cx| {
        if probe.is_some() && Pin::new(&mut tunnel_dropped).poll(cx).is_ready() {
            probe = None;
        }
        let done = connection.as_mut().poll(cx);
        if let Some(Poll::Ready(result)) = probe.as_mut().map(|p| p.poll_ready(cx)) {
            // NO_ERROR is a drain; any other GOAWAY ends the connection, reported as lost.
            let draining = |e: &h2::Error| {
                e.is_go_away() && e.is_remote() && e.reason() == Some(h2::Reason::NO_ERROR)
            };
            if matches!(&result, Err(e) if draining(e)) {
                retired.send_replace(Some(Retirement::Draining));
            }
            if result.is_err() {
                probe = None;
            }
        }
        done
    })
    .await
}

/// One mTLS + HTTP/2 connection to the server.
pub struct TlsTunnel {
    /// The server's concurrent-stream limit. A stream is handed to h2 only with a slot: h2
    /// would queue it otherwise, and a stream given up in its queue still goes out later
    /// (HEADERS then a reset), making the server dial for nothing.
    slots: Arc<Semaphore>,
    /// Taken by [`Tunnel::close`]: no new streams from then on.
    handles: Mutex<Option<Handles>>,
    retired: watch::Receiver<Option<Retirement>>,
    peer_certificate: Option<rustls::pki_types::CertificateDer<'static>>,
}

impl TlsTunnel {
    /// The certificate the server presented (and that verified).
    pub fn peer_certificate(&self) -> Option<rustls::pki_types::CertificateDer<'static>> {
        self.peer_certificate.clone()
    }
}

/// What keeps the connection open for new streams.
struct Handles {
    send_request: SendRequest<Bytes>,
    /// Dropped with the tunnel: tells the connection task to let go of its GOAWAY probe.
    release_probe: oneshot::Sender<()>,
    /// The connection task: it ends once the socket is closed.
    task: JoinHandle<()>,
}

impl Tunnel for TlsTunnel {
    type Send = H2Send;
    type Recv = H2Recv;

    async fn open(
        &self,
        route: &RouteName,
        app: AppAddrs,
    ) -> Result<(H2Send, H2Recv), StreamError> {
        // At the server's limit, wait for a stream to end; the caller bounds the wait by
        // `--tunnel-wait`, and giving up here leaves nothing behind.
        let slot = tokio::select! {
            slot = self.slots.clone().acquire_owned() => slot.map_err(|_| StreamError::ConnectionLost("closed by this client".into()))?,
            why = self.retired() => return Err(StreamError::ConnectionLost(why.to_string())),
        };
        let send_request = self.handles.lock().map_or(None, |handles| {
            handles.as_ref().map(|h| h.send_request.clone())
        });
        let Some(send_request) = send_request else {
            return Err(StreamError::ConnectionLost("closed by this client".into()));
        };
        let mut sender = send_request.ready().await.map_err(h2_error)?;
        let uri = http::Uri::builder()
            .authority(route.as_str())
            .build()
            .map_err(|e| StreamError::Protocol(format!("route {route} as authority: {e}")))?;
        // A server of before version 2 ignores these headers.
        let request = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(uri)
            .header(amb_proto::APP_SOURCE_HEADER, app.source.to_string())
            .header(
                amb_proto::APP_DESTINATION_HEADER,
                app.destination.to_string(),
            )
            .body(())
            .map_err(|e| StreamError::Protocol(e.to_string()))?;
        let (response, send) = sender.send_request(request, false).map_err(h2_error)?;
        Ok((H2Send::new(send, Some(slot)), H2Recv::Pending(response)))
    }

    async fn retired(&self) -> Retirement {
        let mut retired = self.retired.clone();
        let why = match retired.wait_for(Option::is_some).await {
            Ok(why) => why.clone(),
            Err(_) => None,
        };
        why.unwrap_or_else(|| Retirement::Lost("connection task ended".to_owned()))
    }

    async fn close(&self) {
        let handles = self
            .handles
            .lock()
            .map_or(None, |mut handles| handles.take());
        let Some(Handles {
            send_request,
            release_probe,
            task,
        }) = handles
        else {
            return;
        };
        // With no handle left and its streams done, h2 writes out what they queued, then a
        // GOAWAY, and closes the socket (TLS close_notify and FIN). Bounded: streams still live
        // after the drain, or a server gone silent, would hold it open.
        drop((send_request, release_probe));
        let _ = tokio::time::timeout(LINGER + Duration::from_millis(500), task).await;
    }
}

/// Dials reverse tunnel connections from the service side to an app side, which then sends
/// the CONNECTs: ALPN [`amb_proto::ALPN_H2_REVERSE`], the configuration presenting the service
/// side's certificate and checking the app side's as a client's; this side is HTTP/2's server.
pub struct TlsServingDialer(TlsDialer);

impl TlsServingDialer {
    /// A dialer sending `server_name` (the app side's host) as SNI; each dial takes the
    /// configuration `tls` holds at the time.
    pub fn new(
        tls: watch::Receiver<Arc<rustls::ClientConfig>>,
        server_name: &str,
        limits: Limits,
    ) -> Result<Self, TlsError> {
        TlsDialer::new(tls, server_name, limits).map(Self)
    }
}

impl Dialer for TlsServingDialer {
    type Tunnel = TlsDialed;
    type Error = TlsError;

    /// TCP, TLS and HTTP/2 handshakes: done once the app side's preface came, which it sends
    /// only once it took this side's certificate; the caller bounds the time.
    async fn dial(&self, addr: SocketAddr) -> Result<TlsDialed, TlsError> {
        let TlsDialer {
            tls,
            server_name,
            limits,
        } = &self.0;
        let tls = tls_connect(tls, server_name, addr).await?;
        let identity = identity_of(tls.get_ref().1);
        // The app side checks this side's certificate and identity before it starts HTTP/2.
        let (conn, flusher) = h2_server(tokio_rustls::TlsStream::Client(tls), *limits)
            .await
            .map_err(|e| TlsError::Rejected {
                why: format!("{e} (is this side's identity on the app side's --allow list?)"),
            })?;
        let peer = Arc::new(amb_proto::Peer { identity, addr });
        Ok(TlsDialed {
            conn: TlsConnection::dialed(conn, peer, *limits),
            flusher,
        })
    }

    fn handshake_failure(error: &TlsError) -> Option<amb_proto::HandshakeFailure> {
        error.handshake_failure()
    }
}

/// A reverse tunnel connection the service side dialed, ready to serve the app side's streams.
pub struct TlsDialed {
    conn: TlsConnection,
    flusher: crate::coalesce::Flusher<AnyTls>,
}

impl amb_proto::Serving for TlsDialed {
    type Connection = TlsConnection;

    async fn serve<F>(self, serve: impl FnOnce(TlsConnection) -> F + Send)
    where
        F: Future<Output = ()> + Send,
    {
        let lingerer = self.flusher.lingerer();
        self.flusher.run(pin!(serve(self.conn))).await;
        lingerer.linger(LINGER).await;
    }
}
