//! amb over TLS 1.3: app connections multiplexed as HTTP/2 CONNECT streams over mTLS
//! connections (the HBONE idea). The route name is the CONNECT `:authority`; the server's
//! answer is an HTTP status; later failures are `RST_STREAM` with an [`amb_proto::ResetCode`].

mod client;
mod coalesce;
mod server;
mod stream;

pub use client::{TlsDialer, TlsTunnel};
pub use server::{serve, TlsIncoming, TlsServer};
pub use stream::{H2Recv, H2Send};

use amb_proto::dial::Failures;

/// HTTP/2 stream window: bandwidth-delay product of a fast link.
const STREAM_WINDOW: u32 = 4 << 20;
/// HTTP/2 connection window: room for 256 stream windows. A stream whose app stops reading
/// keeps its window's worth of credit until the app reads again, so a connection window of a
/// few stream windows let four stalled app connections freeze every other stream of the tunnel
/// connection. Memory stays bounded per stream by [`STREAM_WINDOW`], and per connection by this.
const CONNECTION_WINDOW: u32 = 1 << 30;
/// Largest HTTP/2 frame we accept.
const MAX_FRAME: u32 = 1 << 20;
/// Bytes h2 may queue per stream before `send` waits.
const SEND_BUFFER: usize = 1 << 20;
/// How long a connection that h2 closed cleanly waits for the peer to close its side (and a
/// client's `close` for that), so that closing never resets what is still in flight.
const LINGER: std::time::Duration = std::time::Duration::from_secs(2);

/// Errors setting up or dialing a TLS tunnel. Messages name the address or peer.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The peer's name did not resolve.
    #[error("resolving {peer}: {why}")]
    Resolve {
        /// The peer as given.
        peer: String,
        /// Why.
        why: String,
    },
    /// No address of the peer took a TCP connection.
    #[error("TCP connect to {peer}: {failures}")]
    Connect {
        /// The peer as given.
        peer: String,
        /// Each address tried, with the OS error.
        failures: Failures<std::io::Error>,
    },
    /// The TLS handshake failed: certificate rejected, ALPN or version mismatch.
    #[error("TLS handshake with {peer}: {source}")]
    Handshake {
        /// The peer.
        peer: String,
        /// What rustls said.
        source: std::io::Error,
    },
    /// The HTTP/2 preface exchange failed.
    #[error("HTTP/2 handshake with {peer}: {source}")]
    H2 {
        /// The peer.
        peer: String,
        /// What h2 said.
        source: h2::Error,
    },
    /// The server refused this client after the handshake (certificate rejected) or went away.
    #[error("server {peer} rejected the connection: {why}")]
    Rejected {
        /// The peer.
        peer: String,
        /// What the server or h2 said.
        why: String,
    },
    /// A step did not finish in time.
    #[error("{what} with {peer} timed out")]
    Timeout {
        /// The peer.
        peer: String,
        /// Which step.
        what: &'static str,
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
