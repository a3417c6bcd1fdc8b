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
async fn unanswered(conn: &quinn::Connection) -> Duration {
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
}

impl QuicDialer {
    /// A dialer expecting a server certificate valid for `server_name`. `tls` must offer the
    /// [`amb_proto::ALPN_QUIC`] ALPN; each dial takes the configuration it holds at the time.
    pub fn new(
        tls: watch::Receiver<Arc<rustls::ClientConfig>>,
        server_name: String,
        limits: Limits,
    ) -> Result<Self, QuicError> {
        let dialer = QuicDialer {
            tls,
            server_name,
            limits,
        };
        dialer.config()?;
        Ok(dialer)
    }

    /// quinn's client configuration: the newest TLS configuration with amb's transport settings.
    fn config(&self) -> Result<ClientConfig, QuicError> {
        let tls = self.tls.borrow().clone();
        let crypto = QuicClientConfig::try_from(tls).map_err(|e| QuicError::Tls(e.to_string()))?;
        let mut config = ClientConfig::new(Arc::new(crypto));
        config.transport_config(transport_config(&self.limits, false));
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
        let rejected = |why: String| QuicError::Rejected { why };
        let welcome = async {
            let mut uni = conn.accept_uni().await.map_err(|e| e.to_string())?;
            uni.read_to_end(16).await.map_err(|e| e.to_string())
        };
        match tokio::time::timeout(self.limits.handshake_timeout, welcome).await {
            Ok(Ok(bytes)) if bytes == crate::WELCOME => {}
            Ok(Ok(other)) => return Err(rejected(format!("unexpected welcome {other:?}"))),
            Ok(Err(why)) => return Err(rejected(why)),
            Err(_) => return Err(rejected("no welcome from the server in time".into())),
        }
        // A server of version 2 tells the app's connection in each stream's header.
        let tells_app = conn
            .handshake_data()
            .and_then(|data| data.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
            .and_then(|data| data.protocol)
            .is_some_and(|alpn| alpn == amb_proto::ALPN_QUIC_2);
        Ok(QuicTunnel {
            conn,
            endpoint,
            tells_app,
        })
    }
}

/// One QUIC connection to the server.
///
/// It owns its endpoint: a fresh UDP socket per connection, so a redial also rebinds.
pub struct QuicTunnel {
    conn: quinn::Connection,
    endpoint: Endpoint,
    /// The server speaks version 2 (ALPN `amb/2`): stream headers carry the app's connection.
    tells_app: bool,
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
                self.conn.close(VarInt::from_u32(0), b"no answer from the server");
                Retirement::Lost(format!("no answer from the server for {silent:.1?}"))
            }
        }
    }

    async fn close(&self) {
        self.conn
            .close(VarInt::from_u32(0), b"client shutting down");
        crate::flush_close(&self.endpoint).await;
    }
}
