//! The amb wire protocol, with no I/O: route names, the QUIC stream-open header, the status a
//! server answers a stream with, reset codes, peer identities and the authorization decision.
//!
//! Both transports speak these same meanings; they only move bytes. Everything here is pure and
//! unit-tested, in the manner of `quinn-proto`.

pub mod connection;
pub mod handshake;
pub mod header;
pub mod identity;
pub mod limits;
pub mod route;
pub mod routes;
pub mod status;
pub mod stream;

pub use connection::{
    Close, Closer, ConnectionEnd, DrainCause, OpenFailure, OpeningStream, ServerConnection,
};
pub use handshake::{FailedHandshake, HandshakeFailure, OnFailedHandshake};
pub use header::{
    decode_open_header, encode_open_header, open_header_needs, AppAddrs, HeaderError, OpenHeader,
};
pub use identity::{AllowList, Peer, PeerIdentity, San, SanParseError, WildcardError};
pub use limits::{Limits, RefusalBudget};
pub use route::{RouteName, RouteNameError};
pub use routes::{RouteChange, RouteTable};
pub use status::{Refusal, ResetCode, REFUSAL_HEADER};
pub use stream::{
    Dialer, IncomingStream, Retirement, Serving, StreamError, StreamRecv, StreamSend, Tunnel,
};

/// ALPN protocol id of amb over QUIC; the trailing number is the wire version.
pub const ALPN_QUIC: &[u8] = b"amb/1";
/// ALPN protocol id of amb over QUIC whose stream-open headers may carry the app's connection
/// (version 2). Offered first beside [`ALPN_QUIC`], so either side of a version before it
/// still meets the other on version 1.
pub const ALPN_QUIC_2: &[u8] = b"amb/2";
/// ALPN protocol id of amb over TLS: HTTP/2, whose CONNECT streams carry app connections.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN protocol id of a reverse tunnel over QUIC: the service side dialed, the app side opens
/// the streams, with version 2 headers. A forward peer meeting it fails at the handshake.
pub const ALPN_QUIC_REVERSE: &[u8] = b"amb-reverse/2";
/// ALPN protocol id of a reverse tunnel over TLS: the service side dialed and is the HTTP/2
/// server; the app side, the HTTP/2 client, sends the CONNECTs.
pub const ALPN_H2_REVERSE: &[u8] = b"amb-reverse/h2";
/// Wire version written at the start of every QUIC stream-open header that carries no app
/// addresses (and in the server's welcome).
pub const WIRE_VERSION: u8 = 1;

/// The ALPN ids a configuration for `alpn` offers, most preferred first: QUIC's two versions,
/// or `alpn` alone.
pub fn alpn_offers(alpn: &[u8]) -> Vec<Vec<u8>> {
    if alpn == ALPN_QUIC || alpn == ALPN_QUIC_2 {
        vec![ALPN_QUIC_2.to_vec(), ALPN_QUIC.to_vec()]
    } else {
        vec![alpn.to_vec()]
    }
}

/// Header names a TLS client's CONNECT carries the app's connection in (`IP:PORT`).
pub const APP_SOURCE_HEADER: &str = "amb-app-source";
/// See [`APP_SOURCE_HEADER`].
pub const APP_DESTINATION_HEADER: &str = "amb-app-destination";
