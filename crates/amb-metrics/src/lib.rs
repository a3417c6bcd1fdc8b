//! amb's metrics: one [`Metrics`] per process, which the engine counts into (atomics on the
//! hot path, through handles made once per route, upstream or peer), encoded as Prometheus text
//! on each scrape; and the small HTTP endpoint ([`serve`]) that answers `/metrics`, `/healthz`
//! and `/readyz`.
//!
//! Labels take only bounded values: sides, directions, transports, reasons, and the route,
//! upstream and peer names the configuration gives. Never a peer's address or port.

mod collect;
mod endpoint;
mod handles;

use std::fmt::Write as _;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

pub use collect::{CertificateExpiry, UpstreamHealth};
pub use endpoint::{bind, serve, EndpointError};
pub use handles::{
    ConnectionEnd, OpenConnection, OpenTimer, RouteMetrics, TunnelUp, UpstreamMetrics,
};

use collect::{Certificates, Health};

/// Which ambassador counts: the server (service side) or the client (app side).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Side {
    /// `amb server`.
    Server,
    /// `amb client`.
    Client,
}

/// Which way a tunnel connection was made, seen from this process.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Direction {
    /// This process dialed it.
    Dialed,
    /// This process accepted it.
    Accepted,
}

impl EncodeLabelValue for Side {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        encoder.write_str(match self {
            Side::Server => "server",
            Side::Client => "client",
        })
    }
}

impl EncodeLabelValue for Direction {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        encoder.write_str(match self {
            Direction::Dialed => "dialed",
            Direction::Accepted => "accepted",
        })
    }
}

/// Answers `/readyz`: `Err` with a short reason while not ready.
pub trait Readiness: Send + Sync + 'static {
    /// Ready now, or why not.
    fn ready(&self) -> Result<(), String>;
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    side: Side,
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndLabels {
    side: Side,
    route: String,
    end: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ByteLabels {
    side: Side,
    route: String,
    /// `up`: from the app toward the service; `down`: back.
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    side: Side,
    route: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    route: String,
    upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DialLabels {
    route: String,
    upstream: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TunnelLabels {
    direction: Direction,
    /// The peer as configured (dialed); empty for accepted connections.
    peer: String,
    transport: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandshakeLabels {
    direction: Direction,
    transport: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    what: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

/// A histogram family whose members share one set of buckets.
type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// Latency buckets from 100 µs to about 6.5 s, doubling.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 17))
}

/// Every metric of one process.
pub struct Metrics {
    registry: Registry,
    connections_open: Family<RouteLabels, Gauge>,
    connections: Family<EndLabels, Counter>,
    bytes: Family<ByteLabels, Counter>,
    stream_open: Histograms<RouteLabels>,
    refusals: Family<RefusalLabels, Counter>,
    dials: Family<DialLabels, Counter>,
    dial_seconds: Histograms<UpstreamLabels>,
    tunnels: Family<TunnelLabels, Gauge>,
    handshakes: Family<TunnelLabels, Counter>,
    handshake_failures: Family<HandshakeLabels, Counter>,
    reloads: Family<ReloadLabels, Counter>,
    last_reload: Gauge<f64, std::sync::atomic::AtomicU64>,
    certificates: Arc<Certificates>,
    health: Arc<Health>,
    readiness: Mutex<Vec<Arc<dyn Readiness>>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// A process's metrics, all at zero, with `version` in `amb_build_info`.
    pub fn new(version: &'static str) -> Arc<Self> {
        let mut registry = Registry::default();
        let m = Metrics {
            registry: Registry::default(),
            connections_open: Family::default(),
            connections: Family::default(),
            bytes: Family::default(),
            stream_open: Family::new_with_constructor(latency_histogram),
            refusals: Family::default(),
            dials: Family::default(),
            dial_seconds: Family::new_with_constructor(latency_histogram),
            tunnels: Family::default(),
            handshakes: Family::default(),
            handshake_failures: Family::default(),
            reloads: Family::default(),
            last_reload: Gauge::default(),
            certificates: Arc::default(),
            health: Arc::default(),
            readiness: Mutex::default(),
        };
        let r = &mut registry;
        r.register(
            "amb_build",
            "amb's version",
            Info::new(BuildLabels { version }),
        );
        r.register(
            "amb_connections_open",
            "App connections being carried, per route",
            m.connections_open.clone(),
        );
        r.register(
            "amb_connections",
            "App connections carried, per route, by how they ended (ok, reset, refused)",
            m.connections.clone(),
        );
        r.register_with_unit(
            "amb_relayed",
            "Bytes relayed for app connections, per route: up (app to service) and down",
            Unit::Bytes,
            m.bytes.clone(),
        );
        r.register_with_unit(
            "amb_stream_open",
            "Time to open a stream: on the client from accept to the server's answer, on the server from the stream's arrival to the upstream connected",
            Unit::Seconds,
            m.stream_open.clone(),
        );
        r.register(
            "amb_refusals",
            "App connections refused, per route, by reason",
            m.refusals.clone(),
        );
        r.register(
            "amb_upstream_dials",
            "Upstream dials, per route and upstream, by outcome (ok, refused, timeout)",
            m.dials.clone(),
        );
        r.register_with_unit(
            "amb_upstream_dial",
            "Time to connect to an upstream, per route and upstream",
            Unit::Seconds,
            m.dial_seconds.clone(),
        );
        r.register(
            "amb_tunnel_connections",
            "Tunnel connections up, by direction, peer (as configured; empty when accepted) and transport",
            m.tunnels.clone(),
        );
        r.register(
            "amb_handshakes",
            "Tunnel handshakes that succeeded",
            m.handshakes.clone(),
        );
        r.register(
            "amb_handshake_failures",
            "Tunnel handshakes that failed, by reason",
            m.handshake_failures.clone(),
        );
        r.register(
            "amb_reloads",
            "Reloads of the configuration file or the certificates, by result",
            m.reloads.clone(),
        );
        r.register_with_unit(
            "amb_last_reload_success_timestamp",
            "When the last reload succeeded (Unix time); 0 before the first",
            Unit::Seconds,
            m.last_reload.clone(),
        );
        r.register_collector(Box::new(m.certificates.clone()));
        r.register_collector(Box::new(m.health.clone()));
        Arc::new(Metrics { registry, ..m })
    }

    /// The counters of `route` on `side`, made once and kept by whatever carries its
    /// connections.
    pub fn route(&self, side: Side, route: &str) -> RouteMetrics {
        RouteMetrics::new(self, side, route)
    }

    /// Counts one app connection of `route` refused for `reason` (a refusal's name), where no
    /// [`RouteMetrics`] is at hand (a route the configuration lacks: name it `(unknown)`).
    pub fn refused(&self, side: Side, route: &str, reason: &'static str) {
        let route = route.to_owned();
        let end = EndLabels {
            side,
            route: route.clone(),
            end: "refused",
        };
        self.connections.get_or_create(&end).inc();
        let labels = RefusalLabels {
            side,
            route,
            reason,
        };
        self.refusals.get_or_create(&labels).inc();
    }

    /// The dial counters of one upstream of `route`.
    pub fn upstream(&self, route: &str, upstream: &str) -> UpstreamMetrics {
        UpstreamMetrics::new(self, route, upstream)
    }

    /// Counts a handshake that succeeded and the tunnel connection up until the returned
    /// guard drops. `peer`: as configured, when dialed.
    pub fn tunnel_up(&self, direction: Direction, peer: &str, transport: &'static str) -> TunnelUp {
        let labels = TunnelLabels {
            direction,
            peer: peer.to_owned(),
            transport,
        };
        self.handshakes.get_or_create(&labels).inc();
        TunnelUp::new(self.tunnels.get_or_create_owned(&labels))
    }

    /// Counts a failed handshake; `reason` names its kind (`unknown_ca`, `expired`...).
    pub fn handshake_failed(
        &self,
        direction: Direction,
        transport: &'static str,
        reason: &'static str,
    ) {
        let labels = HandshakeLabels {
            direction,
            transport,
            reason,
        };
        self.handshake_failures.get_or_create(&labels).inc();
    }

    /// Counts a reload of `what` (`config` or `certificates`).
    pub fn reloaded(&self, what: &'static str, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.reloads
            .get_or_create(&ReloadLabels { what, result })
            .inc();
        if ok {
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            self.last_reload.set(now);
        }
    }

    /// The certificates `side` has loaded now (replacing those it loaded before).
    pub fn certificates_loaded(&self, side: Side, certs: Vec<CertificateExpiry>) {
        self.certificates.replace(side, certs);
    }

    /// Reports the upstreams' health on each scrape: `report` pushes one entry per upstream.
    pub fn report_health(&self, report: impl Fn(&mut Vec<UpstreamHealth>) + Send + Sync + 'static) {
        self.health.set(Box::new(report));
    }

    /// Adds a condition `/readyz` checks.
    pub fn add_readiness(&self, check: Arc<dyn Readiness>) {
        self.readiness
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(check);
    }

    /// Ready when every condition is; else the first reason.
    pub fn ready(&self) -> Result<(), String> {
        let checks = self
            .readiness
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        checks.iter().try_for_each(|check| check.ready())
    }

    /// Every metric, in the Prometheus text format (version 0.0.4).
    pub fn encode(&self) -> String {
        let mut text = String::with_capacity(16 * 1024);
        if prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry).is_err()
        {
            // Writing to a String cannot fail; a collector that did is left out.
            let _ = writeln!(text, "# encoding failed");
        }
        text
    }
}

/// The `Content-Type` of [`Metrics::encode`]'s text.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

#[cfg(test)]
mod tests;
