//! amb over TLS 1.3: app connections multiplexed as HTTP/2 CONNECT streams over mTLS
//! connections (the HBONE idea). The route name is the CONNECT `:authority`; the server's
//! answer is an HTTP status; later failures are `RST_STREAM` with an [`amb_proto::ResetCode`].

mod client;
mod coalesce;
mod raw;
mod server;
mod stream;

pub use client::{TlsDialed, TlsDialer, TlsServingDialer, TlsTunnel};
pub use raw::{RawRecv, RawSend, RawTls};
pub use server::{
    serve, serve_reverse, ServerRecv, ServerSend, TlsAccepted, TlsConnection, TlsIncoming,
    TlsOpening, TlsServer,
};
pub use stream::{H2Recv, H2Send};

/// HTTP/2 stream window: bandwidth-delay product of a fast link.
const STREAM_WINDOW: u32 = 4 << 20;
/// HTTP/2 connection window: room for 256 stream windows. A stream whose app stops reading
/// keeps its window's worth of credit until the app reads again, so a connection window of a
/// few stream windows let four stalled app connections freeze every other stream of the tunnel
/// connection. Memory stays bounded per stream by [`STREAM_WINDOW`], and per connection by this.
const CONNECTION_WINDOW: u32 = 1 << 30;
/// Largest HTTP/2 frame we accept.
const MAX_FRAME: u32 = 1 << 20;
/// How often a tunnel connection the service side dialed PINGs the app side (as HTTP/2's
/// server it would otherwise send nothing on a quiet connection).
const DIALED_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(1);
/// Bytes h2 may queue per stream before `send` waits.
const SEND_BUFFER: usize = 1 << 20;
/// How long a connection that h2 closed cleanly waits for the peer to close its side (and a
/// client's `close` for that), so that closing never resets what is still in flight.
const LINGER: std::time::Duration = std::time::Duration::from_secs(2);

/// The kind of handshake failure a TLS handshake's error stands for.
pub(crate) fn tls_failure(e: &std::io::Error) -> amb_proto::HandshakeFailure {
    use amb_proto::HandshakeFailure;
    match e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(problem)) => {
            let alert = rustls::AlertDescription::from(problem.clone());
            HandshakeFailure::from_alert(u8::from(alert))
        }
        Some(rustls::Error::NoCertificatesPresented) => HandshakeFailure::NoCertificate,
        Some(rustls::Error::AlertReceived(_)) => HandshakeFailure::RefusedByPeer,
        _ => HandshakeFailure::Other,
    }
}

impl TlsError {
    /// The kind of handshake failure this is; `None` if no handshake took place.
    pub fn handshake_failure(&self) -> Option<amb_proto::HandshakeFailure> {
        use amb_proto::HandshakeFailure;
        match self {
            TlsError::Handshake(e) => Some(tls_failure(e)),
            TlsError::H2(_) => Some(HandshakeFailure::Other),
            TlsError::Rejected { .. } => Some(HandshakeFailure::RefusedByPeer),
            TlsError::Connect(_) | TlsError::ServerName(_) => None,
        }
    }
}

/// Errors dialing a TLS tunnel. The engine names the peer and address.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The address took no TCP connection.
    #[error("TCP connect: {0}")]
    Connect(std::io::Error),
    /// The TLS handshake failed: certificate rejected, ALPN or version mismatch.
    #[error("TLS handshake: {0}")]
    Handshake(std::io::Error),
    /// The HTTP/2 preface exchange failed.
    #[error("HTTP/2 handshake: {0}")]
    H2(h2::Error),
    /// The server refused this client after the handshake (certificate rejected) or went away.
    #[error("the server rejected the connection: {why}")]
    Rejected {
        /// What the server or h2 said.
        why: String,
    },
    /// The server name is not a valid DNS name or IP address.
    #[error("{0:?} is not a valid server name")]
    ServerName(String),
}

/// TCP_NODELAY and keep-alive on a tunnel socket.
fn tune_tcp(stream: &tokio::net::TcpStream) {
    let _ = stream.set_nodelay(true);
    let sock = socket2::SockRef::from(stream);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(std::time::Duration::from_secs(15))
        .with_interval(std::time::Duration::from_secs(5));
    let _ = sock.set_tcp_keepalive(&keepalive);
}
