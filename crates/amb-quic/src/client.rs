//! The client side: dial the server, keep the connection, open one stream per app connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use amb_proto::{
    encode_open_header, AppAddrs, Dialer, Limits, Retirement, RouteName, StreamError, Tunnel,
};
use quinn::crypto::rustls::QuicClientConfig;
use quinn::{ClientConfig, Endpoint, VarInt};
use tokio::sync::watch;

use crate::stream::{write_error, QuicRecv, QuicSend};
use crate::{transport_config, tune_udp, QuicError};

/// How long a client's tunnel connection may hear nothing from its server before it is taken
/// for lost (or six round trips, on a slower link), far inside the idle timeout: a healthy
/// server answers the client's keep-alive every [`KEEP_ALIVE`]. Over TCP the server host's
/// kernel resets the connection of a crashed server at once; over QUIC nothing answers, and
/// this is how the client learns of it. A link that drops everything this long is taken for a
/// dead server too; one that drops a share of the packets is not (see BENCHMARKS.md).
pub const LIVENESS_DEADLINE: Duration = Duration::from_secs(2);

/// The client's keep-alive: a PING after this long without sending, which the server answers.
pub(crate) const KEEP_ALIVE: Duration = Duration::from_secs(1);

/// Resolves once `conn` has received nothing for its liveness deadline (see
/// [`LIVENESS_DEADLINE`]), with how long it has been silent.
pub(crate) async fn unanswered(conn: &quinn::Connection) -> Duration {
    const LOOK_EVERY: Duration = Duration::from_millis(200);
    let mut heard = conn.stats().udp_rx.datagrams;
    let mut heard_at = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(LOOK_EVERY).await;
        let received = conn.stats().udp_rx.datagrams;
        if received != heard {
            (heard, heard_at) = (received, tokio::time::Instant::now());
        } else if heard_at.elapsed() >= LIVENESS_DEADLINE.max(conn.rtt() * 6) {
            return heard_at.elapsed();
        }
    }
}

/// Dials QUIC tunnel connections to one server, at the addresses the engine picks.
pub struct QuicDialer {
    /// The newest configuration, for each new dial.
    tls: watch::Receiver<Arc<rustls::ClientConfig>>,
    server_name: String,
    limits: Limits,
    role: crate::Role,
}

impl QuicDialer {
    /// A dialer expecting a server certificate valid for `server_name`. `tls` must offer the
    /// [`amb_proto::ALPN_QUIC`] ALPN; each dial takes the configuration it holds at the time.
    pub fn new(
        tls: watch::Receiver<Arc<rustls::ClientConfig>>,
        server_name: String,
        limits: Limits,
    ) -> Result<Self, QuicError> {
        Self::with_role(tls, server_name, limits, crate::Role::OPENER)
    }

    fn with_role(
        tls: watch::Receiver<Arc<rustls::ClientConfig>>,
        server_name: String,
        limits: Limits,
        role: crate::Role,
    ) -> Result<Self, QuicError> {
        let dialer = QuicDialer {
            tls,
            server_name,
            limits,
            role,
        };
        dialer.config()?;
        Ok(dialer)
    }

    /// Waits (within the handshake timeout) for the peer's welcome: in TLS 1.3 the dialer
    /// finishes first, and only the welcome proves the peer accepted its certificate.
    async fn welcomed(&self, conn: &quinn::Connection) -> Result<(), QuicError> {
        let rejected = |why: String| QuicError::Rejected { why };
        let welcome = async {
            let mut uni = conn.accept_uni().await.map_err(|e| e.to_string())?;
            uni.read_to_end(16).await.map_err(|e| e.to_string())
        };
        match tokio::time::timeout(self.limits.handshake_timeout, welcome).await {
            Ok(Ok(bytes)) if bytes == crate::WELCOME => Ok(()),
            Ok(Ok(other)) => Err(rejected(format!("unexpected welcome {other:?}"))),
            Ok(Err(why)) => Err(rejected(why)),
            Err(_) => Err(rejected("no welcome from the peer in time".into())),
        }
    }

    /// quinn's client configuration: the newest TLS configuration with amb's transport settings.
    fn config(&self) -> Result<ClientConfig, QuicError> {
        let tls = self.tls.borrow().clone();
        let crypto = QuicClientConfig::try_from(tls).map_err(|e| QuicError::Tls(e.to_string()))?;
        let mut config = ClientConfig::new(Arc::new(crypto));
        config.transport_config(transport_config(&self.limits, self.role));
        Ok(config)
    }

    /// A handshake with `addr`, from a fresh endpoint on a socket of its family.
    async fn handshake(
        &self,
        config: ClientConfig,
        addr: SocketAddr,
    ) -> Result<(quinn::Connection, Endpoint), QuicError> {
        let local: SocketAddr = if addr.is_ipv6() {
            "[::]:0"
        } else {
            "0.0.0.0:0"
        }
        .parse()
        .unwrap_or_else(|_| unreachable!("literal socket address"));
        let socket = std::net::UdpSocket::bind(local).map_err(|source| QuicError::Socket {
            addr: local,
            source,
        })?;
        tune_udp(&socket);
        let endpoint = Endpoint::new(
            crate::endpoint_config(None),
            None,
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|source| QuicError::Socket {
            addr: local,
            source,
        })?;
        let connecting = endpoint
            .connect_with(config, addr, &self.server_name)
            .map_err(QuicError::Connect)?;
        let conn = connecting.await.map_err(QuicError::Handshake)?;
        Ok((conn, endpoint))
    }
}

impl Dialer for QuicDialer {
    type Tunnel = QuicTunnel;
    type Error = QuicError;

    fn handshake_failure(error: &QuicError) -> Option<amb_proto::HandshakeFailure> {
        error.handshake_failure()
    }

    async fn dial(&self, addr: SocketAddr) -> Result<QuicTunnel, QuicError> {
        let config = self.config()?;
        let (conn, endpoint) = self.handshake(config, addr).await?;
        self.welcomed(&conn).await?;
        // A server of version 2 tells the app's connection in each stream's header.
        let tells_app = conn
            .handshake_data()
            .and_then(|data| data.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
            .and_then(|data| data.protocol)
            .is_some_and(|alpn| alpn == amb_proto::ALPN_QUIC_2);
        Ok(QuicTunnel {
            conn,
            endpoint: Some(endpoint),
            tells_app,
        })
    }
}

/// Dials reverse tunnel connections from the service side to an app side, which then opens
/// the streams: ALPN [`amb_proto::ALPN_QUIC_REVERSE`], the configuration presenting the
/// service side's certificate and checking the app side's as a client's.
pub struct QuicServingDialer(QuicDialer);

impl QuicServingDialer {
    /// A dialer sending `server_name` (the app side's host) as SNI; each dial takes the
    /// configuration `tls` holds at the time.
    pub fn new(
        tls: watch::Receiver<Arc<rustls::ClientConfig>>,
        server_name: String,
        limits: Limits,
    ) -> Result<Self, QuicError> {
        QuicDialer::with_role(tls, server_name, limits, crate::Role::SERVICE_DIALER).map(Self)
    }
}

impl Dialer for QuicServingDialer {
    type Tunnel = QuicDialed;
    type Error = QuicError;

    fn handshake_failure(error: &QuicError) -> Option<amb_proto::HandshakeFailure> {
        error.handshake_failure()
    }

    async fn dial(&self, addr: SocketAddr) -> Result<QuicDialed, QuicError> {
        let config = self.0.config()?;
        let (conn, endpoint) = self.0.handshake(config, addr).await?;
        self.0.welcomed(&conn).await?;
        let identity = crate::server::peer_identity(&conn);
        let peer = Arc::new(amb_proto::Peer { identity, addr });
        Ok(QuicDialed {
            conn: crate::QuicConnection::dialed(conn, peer),
            endpoint,
        })
    }
}

/// A reverse tunnel connection the service side dialed, ready to serve the app side's streams.
pub struct QuicDialed {
    conn: crate::QuicConnection,
    endpoint: Endpoint,
}

impl amb_proto::Serving for QuicDialed {
    type Connection = crate::QuicConnection;

    async fn serve<F>(self, serve: impl FnOnce(crate::QuicConnection) -> F + Send)
    where
        F: std::future::Future<Output = ()> + Send,
    {
        serve(self.conn).await;
        crate::flush_close(&self.endpoint).await;
    }
}

/// One QUIC connection to the server.
///
/// It owns its endpoint: a fresh UDP socket per connection, so a redial also rebinds.
pub struct QuicTunnel {
    pub(crate) conn: quinn::Connection,
    /// The endpoint it owns (a dialed connection's); `None` for one a listener accepted.
    pub(crate) endpoint: Option<Endpoint>,
    /// The server speaks version 2 (ALPN `amb/2`): stream headers carry the app's connection.
    pub(crate) tells_app: bool,
}

impl QuicTunnel {
    /// The certificate the server presented (and that verified).
    pub fn peer_certificate(&self) -> Option<rustls::pki_types::CertificateDer<'static>> {
        let chain = self.conn.peer_identity()?;
        let chain = chain
            .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
            .ok()?;
        chain.into_iter().next()
    }
}

impl Tunnel for QuicTunnel {
    type Send = QuicSend;
    type Recv = QuicRecv;

    async fn open(
        &self,
        route: &RouteName,
        app: AppAddrs,
    ) -> Result<(QuicSend, QuicRecv), StreamError> {
        let (mut send, recv) = self
            .conn
            .open_bi()
            .await
            .map_err(|e| StreamError::ConnectionLost(e.to_string()))?;
        let app = self.tells_app.then_some(app);
        send.write_chunk(encode_open_header(route, app))
            .await
            .map_err(write_error)?;
        Ok((
            QuicSend(send),
            QuicRecv {
                stream: recv,
                awaiting_status: true,
            },
        ))
    }

    async fn retired(&self) -> Retirement {
        // After the welcome, the only message the server sends on a stream of its own.
        let drain_notice = async {
            while let Ok(mut uni) = self.conn.accept_uni().await {
                if uni.read_to_end(16).await.ok().as_deref() == Some(crate::DRAIN_NOTICE) {
                    return;
                }
            }
            std::future::pending().await
        };
        tokio::select! {
            lost = self.conn.closed() => Retirement::Lost(lost.to_string()),
            () = drain_notice => Retirement::Draining,
            silent = unanswered(&self.conn) => {
                self.conn.close(VarInt::from_u32(0), b"no answer from the peer");
                Retirement::Lost(format!("no answer from the peer for {silent:.1?}"))
            }
        }
    }

    fn heard(&self) -> Option<u64> {
        Some(self.conn.stats().udp_rx.datagrams)
    }

    async fn close(&self) {
        self.conn.close(VarInt::from_u32(0), b"shutting down");
        match &self.endpoint {
            Some(endpoint) => crate::flush_close(endpoint).await,
            // Accepted: the listener's endpoint flushes at its own close; wait for this one.
            None => {
                let _ = tokio::time::timeout(Duration::from_millis(500), self.conn.closed()).await;
            }
        }
    }
}
