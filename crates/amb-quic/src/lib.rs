//! amb over QUIC (quinn): one bidirectional stream per app connection.
//!
//! A stream starts with the [`amb_proto::header`] stream-open header; the server answers with
//! one status byte before any upstream bytes; later failures are QUIC stream resets carrying
//! an [`amb_proto::ResetCode`].

mod client;
mod server;
mod stream;

pub use client::{QuicDialed, QuicDialer, QuicServingDialer, QuicTunnel, LIVENESS_DEADLINE};
pub use server::{serve, QuicAccepted, QuicConnection, QuicIncoming, QuicOpening, QuicServer};
pub use stream::{QuicRecv, QuicSend};

use std::net::SocketAddr;
use std::sync::Arc;

use amb_proto::Limits;
use aws_lc_rs::{hkdf, hmac};
use quinn::{IdleTimeout, TransportConfig, VarInt};

/// The kind of handshake failure a QUIC connection's error stands for: the TLS alert in its
/// CRYPTO_ERROR code (RFC 9001 §4.8).
pub(crate) fn quic_failure(e: &quinn::ConnectionError) -> amb_proto::HandshakeFailure {
    use amb_proto::HandshakeFailure;
    match e {
        quinn::ConnectionError::TransportError(error) => match u64::from(error.code) {
            code @ 0x100..=0x1ff => HandshakeFailure::from_alert((code - 0x100) as u8),
            _ => HandshakeFailure::Other,
        },
        quinn::ConnectionError::ConnectionClosed(_)
        | quinn::ConnectionError::ApplicationClosed(_) => HandshakeFailure::RefusedByPeer,
        quinn::ConnectionError::TimedOut => HandshakeFailure::Timeout,
        _ => HandshakeFailure::Other,
    }
}

impl QuicError {
    /// The kind of handshake failure this is; `None` if no handshake was started.
    pub fn handshake_failure(&self) -> Option<amb_proto::HandshakeFailure> {
        match self {
            QuicError::Handshake(e) => Some(quic_failure(e)),
            QuicError::Rejected { .. } => Some(amb_proto::HandshakeFailure::RefusedByPeer),
            QuicError::Socket { .. } | QuicError::Tls(_) | QuicError::Connect(_) => None,
        }
    }
}

/// Errors setting up or dialing a QUIC tunnel. The engine names the peer and address.
#[derive(Debug, thiserror::Error)]
pub enum QuicError {
    /// The UDP socket could not be set up.
    #[error("QUIC socket on {addr}: {source}")]
    Socket {
        /// The local address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The TLS configuration does not suit QUIC.
    #[error("QUIC TLS configuration: {0}")]
    Tls(String),
    /// The connection could not be started.
    #[error("QUIC connect: {0}")]
    Connect(quinn::ConnectError),
    /// The handshake failed: certificate rejected, ALPN mismatch, no answer.
    #[error("QUIC handshake: {0}")]
    Handshake(quinn::ConnectionError),
    /// The server closed the connection right after the handshake (certificate rejected) or
    /// spoke another protocol.
    #[error("the server rejected the connection: {why}")]
    Rejected {
        /// What the server said.
        why: String,
    },
}

/// What the server writes on its first unidirectional stream once it has verified the client:
/// the wire version. In TLS 1.3 the client finishes first, so only this proves acceptance.
const WELCOME: [u8; 1] = [amb_proto::WIRE_VERSION];

/// What the server writes on a later unidirectional stream when it starts to shut down: open
/// no new streams here (QUIC has no GOAWAY of its own). Live streams run on to their end.
const DRAIN_NOTICE: &[u8] = b"drain";

/// The largest UDP payload amb sends or accepts. Path MTU discovery climbs toward it from
/// 1,200 bytes: on a 1,500-byte Ethernet path it settles just under 1,472 (the most an IPv4
/// datagram carries there), on loopback and jumbo-frame links it gets here, and bulk throughput on loopback doubled (3.5–4.2 → 7.1–8.2 Gb/s). It is
/// bounded by quinn's send batches: ten datagrams go out in one GSO send, which must fit the
/// 64 KiB of one UDP send (at 8,000 bytes every batch failed and throughput fell to 30 Mb/s).
const MAX_DATAGRAM: u16 = 6_000;

/// Stream receive window: bandwidth-delay product of a fast link.
const STREAM_WINDOW: u32 = 4 << 20;
/// Connection receive window: room for 256 stream windows, so streams whose apps stop reading
/// (each keeps its window's worth of credit) cannot freeze the other streams of the connection,
/// as eight of them did with a 32 MiB window. Memory stays bounded per stream and by this.
const CONNECTION_WINDOW: u32 = 1 << 30;

/// The keys a server makes its stateless resets (RFC 9000 §10.3) and its connection IDs with,
/// derived from its private key: a server restarted with the same key takes a packet of a
/// connection its previous process held for one of its own making, and answers it with a
/// reset the client accepts; the client redials at once instead of waiting for silence to tell.
#[derive(Clone)]
pub struct ResetKey {
    reset: Arc<hmac::Key>,
    connection_ids: u64,
}

impl ResetKey {
    /// Derives the keys from secret material (the server's private key, DER) with
    /// HKDF-SHA256; the material cannot be recovered from them.
    pub fn derive(secret: &[u8]) -> Self {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"amb/1 QUIC").extract(secret);
        let bound = "a SHA-256 block is within HKDF's output bound";
        let reset = prk
            .expand(&[b"stateless reset"], hmac::HMAC_SHA256)
            .expect(bound);
        let mut connection_ids = [0u8; 32];
        prk.expand(&[b"connection ids"], hkdf::HKDF_SHA256)
            .and_then(|okm| okm.fill(&mut connection_ids))
            .expect(bound);
        let (connection_ids, _) = connection_ids.split_first_chunk::<8>().expect("32 > 8");
        ResetKey {
            reset: Arc::new(hmac::Key::from(reset)),
            connection_ids: u64::from_le_bytes(*connection_ids),
        }
    }
}

/// Endpoint settings for both sides: accept datagrams up to [`MAX_DATAGRAM`]; a server's
/// stateless resets and connection IDs made with its [`ResetKey`] (a client's with random keys).
fn endpoint_config(reset: Option<&ResetKey>) -> quinn::EndpointConfig {
    let mut config = match reset {
        Some(key) => {
            let mut config = quinn::EndpointConfig::new(key.reset.clone());
            let connection_ids = key.connection_ids;
            config.cid_generator(move || {
                Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(
                    connection_ids,
                ))
            });
            config
        }
        None => quinn::EndpointConfig::default(),
    };
    config
        .max_udp_payload_size(MAX_DATAGRAM)
        .expect("MAX_DATAGRAM is within QUIC's bounds");
    config
}

/// Which streams one side of a tunnel connection takes from its peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Role {
    /// The peer opens the streams (bidirectional, one per app connection): the service side.
    pub(crate) accepts_streams: bool,
    /// The peer tells this side things on unidirectional streams, one at a time (the welcome,
    /// the drain notice); this side also keeps alive often enough to tell the peer is gone.
    pub(crate) hears_notices: bool,
}

impl Role {
    /// A forward tunnel's server: takes the streams, tells.
    pub(crate) const SERVER: Role = Role {
        accepts_streams: true,
        hears_notices: false,
    };
    /// A forward tunnel's client, and a reverse tunnel's app side: opens the streams, hears
    /// the welcome (forward) and the drain notice.
    pub(crate) const OPENER: Role = Role {
        accepts_streams: false,
        hears_notices: true,
    };
    /// A reverse tunnel's service side: dials, hears the welcome, then takes the streams.
    pub(crate) const SERVICE_DIALER: Role = Role {
        accepts_streams: true,
        hears_notices: true,
    };
}

/// Transport parameters for one side: stream caps as its [`Role`] says, idle timeout,
/// keep-alives, flow-control windows sized for a fast link, path MTU discovery up to
/// [`MAX_DATAGRAM`].
fn transport_config(limits: &Limits, role: Role) -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    let bidi = if role.accepts_streams {
        limits.max_streams_per_connection
    } else {
        0
    };
    let uni = u32::from(role.hears_notices);
    let keep_alive = if role.hears_notices {
        limits.keep_alive_interval().min(client::KEEP_ALIVE)
    } else {
        limits.keep_alive_interval()
    };
    t.max_concurrent_bidi_streams(VarInt::from_u32(bidi))
        .max_concurrent_uni_streams(VarInt::from_u32(uni))
        .max_idle_timeout(IdleTimeout::try_from(limits.idle_timeout).ok())
        .keep_alive_interval(Some(keep_alive))
        .stream_receive_window(VarInt::from_u32(STREAM_WINDOW))
        .receive_window(VarInt::from_u32(CONNECTION_WINDOW))
        .send_window(32 << 20);
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_DATAGRAM);
    t.mtu_discovery_config(Some(mtu));
    Arc::new(t)
}

/// Enlarges a UDP socket's kernel buffers (best effort: the kernel caps them).
fn tune_udp(socket: &std::net::UdpSocket) {
    let sock = socket2::SockRef::from(socket);
    let _ = sock.set_recv_buffer_size(8 << 20);
    let _ = sock.set_send_buffer_size(8 << 20);
}

/// Lets the endpoint send its CONNECTION_CLOSE frames before the process exits.
async fn flush_close(endpoint: &quinn::Endpoint) {
    let _ = tokio::time::timeout(std::time::Duration::from_millis(500), endpoint.wait_idle()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_keys_follow_the_secret_and_only_it() {
        let tag = |key: &ResetKey| hmac::sign(&key.reset, b"a connection id").as_ref().to_vec();
        let (one, again, other) = (
            ResetKey::derive(b"server key"),
            ResetKey::derive(b"server key"),
            ResetKey::derive(b"another key"),
        );
        assert_eq!(tag(&one), tag(&again), "a restart makes the same resets");
        assert_eq!(one.connection_ids, again.connection_ids);
        assert_ne!(tag(&one), tag(&other));
        assert_ne!(one.connection_ids, other.connection_ids);
        // The two keys are not one another.
        assert_ne!(tag(&one)[..8], one.connection_ids.to_le_bytes());
    }
}
