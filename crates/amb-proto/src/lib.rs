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
pub use header::{decode_open_header, encode_open_header, HeaderError, OpenHeader};
pub use identity::{AllowList, Peer, PeerIdentity, San, SanParseError, WildcardError};
pub use limits::{Limits, RefusalBudget};
pub use route::{RouteName, RouteNameError};
pub use routes::{RouteChange, RouteTable};
pub use status::{Refusal, ResetCode, REFUSAL_HEADER};
pub use stream::{Dialer, IncomingStream, Retirement, StreamError, StreamRecv, StreamSend, Tunnel};

/// ALPN protocol id of amb over QUIC; the trailing number is the wire version.
pub const ALPN_QUIC: &[u8] = b"amb/1";
/// ALPN protocol id of amb over TLS: HTTP/2, whose CONNECT streams carry app connections.
pub const ALPN_H2: &[u8] = b"h2";
/// Wire version written at the start of every QUIC stream-open header.
pub const WIRE_VERSION: u8 = 1;
