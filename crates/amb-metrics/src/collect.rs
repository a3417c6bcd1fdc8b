//! Metrics worked out at each scrape: seconds until certificates expire (which move with the
//! clock), and the health of the upstreams the routes have now (a discovered set's members come
//! and go, and so do their series).

use std::sync::{Mutex, PoisonError};
use std::time::SystemTime;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;

use crate::Side;

/// One loaded certificate's expiry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertificateExpiry {
    /// `leaf` (this side's own) or `ca` (a trusted CA).
    pub kind: &'static str,
    /// Its subject's common name, or the whole subject when it has none.
    pub subject: String,
    /// When it stops being valid.
    pub not_after: SystemTime,
}

/// One upstream's health, as a scrape reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamHealth {
    /// The route.
    pub route: String,
    /// The upstream as configured, or as discovered.
    pub upstream: String,
    /// Whether new connections may go to it.
    pub healthy: bool,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertLabels {
    side: Side,
    kind: &'static str,
    subject: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HealthLabels {
    route: String,
    upstream: String,
}

/// The certificates each side has loaded.
#[derive(Debug, Default)]
pub(crate) struct Certificates(Mutex<Vec<(Side, CertificateExpiry)>>);

impl Certificates {
    pub(crate) fn replace(&self, side: Side, certs: Vec<CertificateExpiry>) {
        let mut all = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        all.retain(|(s, _)| *s != side);
        all.extend(certs.into_iter().map(|c| (side, c)));
    }
}

impl Collector for Certificates {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let certs = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let mut family = encoder.encode_descriptor(
            "amb_certificate_expiry",
            "Seconds until a loaded certificate expires (negative once it has)",
            Some(&Unit::Seconds),
            MetricType::Gauge,
        )?;
        let now = SystemTime::now();
        for (side, cert) in certs {
            let left = match cert.not_after.duration_since(now) {
                Ok(left) => left.as_secs_f64(),
                Err(past) => -past.duration().as_secs_f64(),
            };
            let labels = CertLabels {
                side,
                kind: cert.kind,
                subject: cert.subject,
            };
            ConstGauge::new(left.round()).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

type Report = Box<dyn Fn(&mut Vec<UpstreamHealth>) + Send + Sync>;

/// What reports the upstreams' health, once a server runs.
#[derive(Default)]
pub(crate) struct Health(Mutex<Option<Report>>);

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Health")
    }
}

impl Health {
    pub(crate) fn set(&self, report: Report) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(report);
    }
}

impl Collector for Health {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut upstreams = Vec::new();
        if let Some(report) = &*self.0.lock().unwrap_or_else(PoisonError::into_inner) {
            report(&mut upstreams);
        }
        if upstreams.is_empty() {
            return Ok(());
        }
        let mut family = encoder.encode_descriptor(
            "amb_upstream_healthy",
            "1 while new connections may go to the upstream (not marked down by failed dials or health checks)",
            None,
            MetricType::Gauge,
        )?;
        for up in upstreams {
            let labels = HealthLabels {
                route: up.route,
                upstream: up.upstream,
            };
            ConstGauge::new(i64::from(up.healthy)).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}
