//! The endpoints layer, shared by upstreams (server) and peers (client): a [`Source`] yields
//! the set of endpoints a configured name stands for and its changes, a [`Balancer`] picks the
//! order each new connection tries them in and feeds "none of these answered" back to the
//! source, and a [`Connector`] turns an upstream endpoint into a connected stream. Transports
//! never resolve names: they are handed an address and give back a tunnel.

mod balance;
mod connect;
mod discover;
mod etcd;
mod proxy;
mod resolve;
mod secure;
mod source;

pub use balance::{dial_order, race, Balancer, DialError, Failures, Won, ATTEMPT_DELAY};
pub use connect::{Connector, DialProgress, ResetUnlessFinished, UpstreamStream};
pub use discover::{discover, Discovered, MAX_REFRESH, MIN_REFRESH};
pub use etcd::{register, EtcdTls, LEASE_TTL};
pub use proxy::{proxy_v2_header, Origin, PP2_TYPE_AMB_IDENTITY};
pub use resolve::{located_set, Located, Resolver, SrvAnswer};
pub use secure::TlsConnector;
#[cfg(test)]
pub(crate) use source::Periods;
pub use source::{EndpointSet, Role, Source, LOOKUP_LIMIT, RELOOKUP_AFTER_FAILURE, RESOLVE_EVERY};

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use amb_spec::{HostPort, PeerSpec, UpstreamSpec, UpstreamTarget};

/// Where one instance of a service is.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Endpoint {
    /// A TCP address (or UDP, for a QUIC peer).
    Tcp(SocketAddr),
    /// A Unix socket on this host.
    Unix(Arc<Path>),
}

/// Address families, which a dial alternates between (Happy Eyeballs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
    /// A Unix socket.
    Unix,
}

impl Endpoint {
    /// Its address family.
    pub fn family(&self) -> Family {
        match self {
            Endpoint::Tcp(addr) if addr.is_ipv4() => Family::V4,
            Endpoint::Tcp(_) => Family::V6,
            Endpoint::Unix(_) => Family::Unix,
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp(addr) => addr.fmt(f),
            Endpoint::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// The source of a `host:port`: the address itself, or the name looked up by `resolver`.
fn host_port_source(text: &str, role: Role, addr: &HostPort, resolver: &Resolver) -> Arc<Source> {
    match addr {
        HostPort::Addr(addr) => Source::fixed(text, role, vec![Endpoint::Tcp(*addr)]),
        HostPort::Name { host, port } => Source::dns(text, role, host, *port, resolver),
    }
}

/// The source of an upstream's endpoints.
pub fn upstream_source(spec: &UpstreamSpec, resolver: &Resolver) -> Arc<Source> {
    let text = spec.to_string();
    match spec.target() {
        UpstreamTarget::Tcp(addr) => host_port_source(&text, Role::Upstream, addr, resolver),
        UpstreamTarget::Unix(path) => Source::fixed(
            &text,
            Role::Upstream,
            vec![Endpoint::Unix(Arc::from(path.as_path()))],
        ),
    }
}

/// The source of the addresses of a peer (one server, not a discovered set: those are
/// resolved into peers first).
pub fn peer_source(spec: &PeerSpec, addr: &HostPort, resolver: &Resolver) -> Arc<Source> {
    host_port_source(&spec.to_string(), Role::Peer, addr, resolver)
}
