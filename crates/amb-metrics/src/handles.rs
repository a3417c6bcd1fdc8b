//! Handles into [`Metrics`](crate::Metrics)' families, made once per route, upstream or tunnel
//! connection, so counting a connection is a few atomic adds and no label lookup.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

use crate::{
    ByteLabels, DialLabels, EndLabels, Metrics, RefusalLabels, RouteLabels, Side, UpstreamLabels,
};

/// How an app connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectionEnd {
    /// Both directions ended cleanly.
    Ok,
    /// Either end, or the tunnel, reset it.
    Reset,
    /// It was refused before any byte was relayed.
    Refused,
}

impl ConnectionEnd {
    /// The label value, as the access log says it too.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionEnd::Ok => "ok",
            ConnectionEnd::Reset => "reset",
            ConnectionEnd::Refused => "refused",
        }
    }
}

/// The counters of one route on one side; clones share them.
#[derive(Clone, Debug)]
pub struct RouteMetrics(Arc<RouteCounters>);

#[derive(Debug)]
struct RouteCounters {
    side: Side,
    route: String,
    open: Gauge,
    ok: Counter,
    reset: Counter,
    refused: Counter,
    up: Counter,
    down: Counter,
    stream_open: Histogram,
    refusals: Family<RefusalLabels, Counter>,
}

impl RouteMetrics {
    pub(crate) fn new(m: &Metrics, side: Side, route: &str) -> Self {
        let route = route.to_owned();
        let ended = |end| {
            m.connections.get_or_create_owned(&EndLabels {
                side,
                route: route.clone(),
                end,
            })
        };
        let bytes = |direction| {
            m.bytes.get_or_create_owned(&ByteLabels {
                side,
                route: route.clone(),
                direction,
            })
        };
        let labels = RouteLabels {
            side,
            route: route.clone(),
        };
        RouteMetrics(Arc::new(RouteCounters {
            side,
            open: m.connections_open.get_or_create_owned(&labels),
            ok: ended("ok"),
            reset: ended("reset"),
            refused: ended("refused"),
            up: bytes("up"),
            down: bytes("down"),
            stream_open: m.stream_open.get_or_create_owned(&labels),
            refusals: m.refusals.clone(),
            route,
        }))
    }

    /// Counts an app connection refused for `reason` before it was counted open.
    pub fn refused(&self, reason: &'static str) {
        let counters = &self.0;
        counters.refused.inc();
        let labels = RefusalLabels {
            side: counters.side,
            route: counters.route.clone(),
            reason,
        };
        counters.refusals.get_or_create(&labels).inc();
    }

    /// Counts an app connection open until the returned guard drops; one dropped without
    /// [`OpenConnection::ended`] counts as reset.
    pub fn connection(&self) -> OpenConnection {
        self.0.open.inc();
        OpenConnection {
            route: self.clone(),
            ended: false,
        }
    }
}

/// An app connection counted as open; it counts once, by the first end it is told.
#[derive(Debug)]
pub struct OpenConnection {
    route: RouteMetrics,
    ended: bool,
}

impl OpenConnection {
    /// Its stream opened, `after` the connection arrived.
    pub fn opened(&self, after: Duration) {
        self.route.0.stream_open.observe(after.as_secs_f64());
    }

    /// A timer that records the stream-open time, from the arrival, when it is observed
    /// (e.g. when the server's answer arrives, later than the code that counts the end).
    pub fn open_timer(&self, since: std::time::Instant) -> OpenTimer {
        OpenTimer {
            histogram: self.route.0.stream_open.clone(),
            since,
        }
    }

    /// It was refused for `reason` (a refusal's name).
    pub fn refused(&mut self, reason: &'static str) {
        if !std::mem::replace(&mut self.ended, true) {
            self.route.refused(reason);
        }
    }

    /// It ended `how` (ok or reset), having relayed `up` bytes toward the service and `down`
    /// back.
    pub fn ended(&mut self, how: ConnectionEnd, up: u64, down: u64) {
        if std::mem::replace(&mut self.ended, true) {
            return;
        }
        let r = &self.route.0;
        match how {
            ConnectionEnd::Ok => r.ok.inc(),
            ConnectionEnd::Reset => r.reset.inc(),
            ConnectionEnd::Refused => r.refused.inc(),
        };
        if up > 0 {
            r.up.inc_by(up);
        }
        if down > 0 {
            r.down.inc_by(down);
        }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        let counters = &self.route.0;
        counters.open.dec();
        if !self.ended {
            counters.reset.inc();
        }
    }
}

/// Records one stream-open time when observed.
#[derive(Debug)]
pub struct OpenTimer {
    histogram: Histogram,
    since: std::time::Instant,
}

impl OpenTimer {
    /// The stream is open (or refused) now.
    pub fn observe(self) {
        self.histogram.observe(self.since.elapsed().as_secs_f64());
    }
}

/// The dial counters of one upstream of a route.
#[derive(Clone, Debug)]
pub struct UpstreamMetrics {
    ok: Counter,
    refused: Counter,
    timeout: Counter,
    seconds: Histogram,
}

impl UpstreamMetrics {
    pub(crate) fn new(m: &Metrics, route: &str, upstream: &str) -> Self {
        let outcome = |outcome| {
            m.dials.get_or_create_owned(&DialLabels {
                route: route.to_owned(),
                upstream: upstream.to_owned(),
                outcome,
            })
        };
        UpstreamMetrics {
            ok: outcome("ok"),
            refused: outcome("refused"),
            timeout: outcome("timeout"),
            seconds: m.dial_seconds.get_or_create_owned(&UpstreamLabels {
                route: route.to_owned(),
                upstream: upstream.to_owned(),
            }),
        }
    }

    /// A dial connected after `took`.
    pub fn connected(&self, took: Duration) {
        self.ok.inc();
        self.seconds.observe(took.as_secs_f64());
    }

    /// A dial failed: refused (or unresolvable), or timed out.
    pub fn failed(&self, timed_out: bool) {
        match timed_out {
            true => self.timeout.inc(),
            false => self.refused.inc(),
        };
    }
}

/// A tunnel connection counted as up until this drops.
#[derive(Debug)]
pub struct TunnelUp(Gauge);

impl TunnelUp {
    pub(crate) fn new(gauge: Gauge) -> Self {
        gauge.inc();
        TunnelUp(gauge)
    }
}

impl Drop for TunnelUp {
    fn drop(&mut self) {
        self.0.dec();
    }
}
