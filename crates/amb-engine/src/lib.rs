//! The amb engine: client listeners and tunnel supervision, the server's route decisions and
//! upstream dials, the endpoints layer both sides dial through, the relay between sockets and
//! tunnel streams, and graceful shutdown. Its settings hold specs ([`amb_spec`]), from which
//! it builds its runtime objects.
//!
//! The transports are reached only through the traits of [`amb_proto::stream`], so every piece
//! here serves QUIC and TLS alike.

mod access;
mod client;
mod direct;
pub mod endpoints;
mod lifecycle;
pub mod relay;
mod reload;
mod reverse;
mod server;
mod tally;
mod throttle;
mod upstream;
mod upstream_set;

pub use client::{probe_peers, Client, ClientSettings, ClientTransport, Listeners, PeerProbe};
pub use direct::{probe_service, DirectClient, DirectListeners, DirectSettings};
pub use endpoints::{TlsConnector, UpstreamStream};
pub use reload::Reload;
pub use reverse::AcceptSettings;
pub use server::{
    probe_upstreams, Registration, Routes, Server, ServerSettings, ServerTransports, UpstreamProbe,
};
pub use upstream::Upstream;
pub use upstream_set::{pick, Candidate, Lease, UpstreamSet};

use std::net::SocketAddr;
use std::sync::Arc;

use amb_metrics::Metrics;
use tokio::sync::watch;

/// Errors that stop a client or server from starting. Messages name the file or address.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A socket could not be bound.
    #[error("cannot listen on {addr} ({proto}): {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// `tcp` or `udp`.
        proto: &'static str,
        /// The OS error (address in use, permission denied...).
        source: std::io::Error,
    },
    /// Certificates or keys are unusable.
    #[error(transparent)]
    Pki(#[from] amb_pki::PkiError),
    /// QUIC set-up failed.
    #[error(transparent)]
    Quic(#[from] amb_quic::QuicError),
    /// TLS set-up failed.
    #[error(transparent)]
    Tls(#[from] amb_tls::TlsError),
    /// The metrics endpoint could not bind.
    #[error(transparent)]
    Metrics(#[from] amb_metrics::EndpointError),
    /// The settings contradict each other.
    #[error("{0}")]
    Config(String),
}

/// The metrics endpoint, bound with its side's other sockets and served while the side runs.
struct MetricsEndpoint(Option<std::net::TcpListener>);

impl MetricsEndpoint {
    fn bind(addr: Option<SocketAddr>) -> Result<Self, EngineError> {
        Ok(MetricsEndpoint(addr.map(amb_metrics::bind).transpose()?))
    }

    /// Serves it until the returned sender is told `true` (or dropped).
    fn serve(self, metrics: &Arc<Metrics>) -> watch::Sender<bool> {
        let (stop, stopped) = watch::channel(false);
        if let Some(listener) = self.0 {
            tokio::spawn(amb_metrics::serve(listener, metrics.clone(), stopped));
        }
        stop
    }
}

/// Binds a UDP socket at `addr` (a port TCP took already, for a shared port number); returns it
/// and the address it got.
fn bind_udp(addr: SocketAddr) -> Result<(std::net::UdpSocket, SocketAddr), EngineError> {
    let err = |source| EngineError::Bind {
        addr,
        proto: "udp",
        source,
    };
    let udp = std::net::UdpSocket::bind(addr).map_err(err)?;
    let bound = udp.local_addr().map_err(err)?;
    Ok((udp, bound))
}

/// Binds a TCP listener with the options a tunnel endpoint wants.
fn bind_tcp(addr: SocketAddr) -> Result<tokio::net::TcpListener, EngineError> {
    let err = |source| EngineError::Bind {
        addr,
        proto: "tcp",
        source,
    };
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    // Accepted sockets inherit it (Linux), which saves a syscall per connection.
    socket.set_nodelay(true).map_err(err)?;
    socket.bind(addr).map_err(err)?;
    socket.listen(4096).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn accepted_sockets_have_nodelay_without_a_call_per_connection() {
        let listener = bind_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let _app = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(accepted.nodelay().unwrap());
    }
}
