//! What the user configured, parsed and validated once: routes and their upstreams, peers,
//! listeners. Specs are plain data (`Eq`, no I/O, no live resolvers), so a configuration can be
//! compared with the next one; the engine builds its runtime objects from them.

mod discovery;
mod host_port;
mod links;
mod listener;
mod peer;
mod route;
mod upstream;
mod upstreams;

pub use discovery::{Discovery, DiscoveryError, EtcdKey};
pub use host_port::HostPort;
pub use links::{docker_links, DockerLink, DockerLinkError};
pub use listener::{diff_listeners, ListenerChange, ListenerSpec, ListenerSpecError};
pub use peer::{PeerList, PeerSpec, PeerSpecError};
pub use route::{RouteSpec, RouteSpecError};
pub use upstream::{UpstreamSpec, UpstreamSpecError, UpstreamTarget};
pub use upstreams::{
    Balance, BalanceError, HealthCheck, HealthCheckKind, HealthCheckKindError, ProxyProtocol,
    ProxyProtocolError, RedisAuth, Secret, UpstreamSetSpec, UpstreamTls, UpstreamsError,
    WeightedUpstream, DEFAULT_HEALTH_INTERVAL, MAX_UPSTREAMS, MAX_WEIGHT,
};
