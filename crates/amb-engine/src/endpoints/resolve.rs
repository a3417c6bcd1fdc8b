//! Name lookups, through the resolver the process was told to use (`--dns-server`) or the
//! system's: a host's addresses, and a service's SRV records.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::TokioResolver;

use amb_spec::Discovery;

use super::EtcdTls;

/// One server of a discovered set: an SRV record's target (RFC 2782), or an etcd key's
/// `HOST:PORT` (priority 0, weight 1).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Located {
    /// Lower first; the next priority only when all of the lowest are down.
    pub priority: u16,
    /// The target host, without the trailing dot.
    pub host: String,
    /// Its port.
    pub port: u16,
    /// Its share within its priority.
    pub weight: u16,
}

impl std::fmt::Display for Located {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Located {
            priority,
            host,
            port,
            weight,
        } = self;
        write!(f, "{host}:{port} (priority {priority}, weight {weight})")
    }
}

/// An SRV answer: its targets, sorted (priority, host, port), none twice; and how long it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SrvAnswer {
    /// The targets.
    pub targets: Vec<Located>,
    /// The records' time to live.
    pub ttl: Duration,
}

/// The usable targets of `records`, sorted: a target of `.` says the service is not offered there
/// (RFC 2782); a host and port listed twice keeps its lowest priority.
pub fn located_set(mut records: Vec<Located>) -> Vec<Located> {
    records.retain(|r| !r.host.is_empty() && r.host != ".");
    records.sort();
    let mut seen = std::collections::HashSet::new();
    records.retain(|r| seen.insert((r.host.clone(), r.port)));
    records
}

/// The process's resolver; clones share it.
#[derive(Clone, Default)]
pub struct Resolver(Arc<Inner>);

#[derive(Default)]
struct Inner {
    /// `None`: the system's (getaddrinfo for addresses, resolv.conf's servers for SRV).
    server: Option<SocketAddr>,
    dns: OnceLock<Result<TokioResolver, String>>,
    /// How `etcds://` registries are reached.
    etcd_tls: EtcdTls,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.server {
            Some(server) => write!(f, "Resolver({server})"),
            None => f.write_str("Resolver(system)"),
        }
    }
}

impl Resolver {
    /// The system's resolver.
    pub fn system() -> Self {
        Resolver::default()
    }

    /// Lookups go to the DNS server at `server` (UDP, TCP for long answers) if given, else
    /// the system's; `etcds://` registries are reached with `etcd_tls`.
    pub fn new(server: Option<SocketAddr>, etcd_tls: EtcdTls) -> Self {
        Resolver(Arc::new(Inner {
            server,
            dns: OnceLock::new(),
            etcd_tls,
        }))
    }

    /// How `etcds://` registries are reached.
    pub fn etcd_tls(&self) -> &EtcdTls {
        &self.0.etcd_tls
    }

    /// The servers `discovery` lists now, looked up once (for `amb check --connect`).
    pub async fn list(&self, discovery: &Discovery) -> Result<Vec<Located>, String> {
        match discovery {
            Discovery::Srv(name) => Ok(self.lookup_srv(name).await?.targets),
            Discovery::Etcd(key) => super::etcd::list(key, &self.0.etcd_tls).await,
        }
    }

    /// The DNS client, made on first use: a system without resolv.conf fails only if it needs one.
    fn dns(&self) -> Result<&TokioResolver, String> {
        let made = self.0.dns.get_or_init(|| {
            // Our own schedule follows the records' TTLs: no cache in between.
            let tune = |opts: &mut ResolverOpts| {
                opts.cache_size = 0;
                opts.timeout = Duration::from_secs(2);
                opts.attempts = 2;
            };
            let builder = match self.0.server {
                Some(server) => {
                    let connections = [ConnectionConfig::udp(), ConnectionConfig::tcp()]
                        .map(|mut c| {
                            c.port = server.port();
                            c
                        })
                        .to_vec();
                    let name_server = NameServerConfig::new(server.ip(), true, connections);
                    TokioResolver::builder_with_config(
                        ResolverConfig::from_name_servers(vec![name_server]),
                        TokioRuntimeProvider::default(),
                    )
                }
                None => TokioResolver::builder_tokio()
                    .map_err(|e| format!("reading the system's resolver configuration: {e}"))?,
            };
            let mut builder = builder;
            tune(builder.options_mut());
            builder
                .build()
                .map_err(|e| format!("making a DNS resolver: {e}"))
        });
        made.as_ref().map_err(Clone::clone)
    }

    /// The addresses of `host`, with `port`.
    pub async fn lookup_host(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        if self.0.server.is_none() {
            return Ok(tokio::net::lookup_host((host, port)).await?.collect());
        }
        let dns = self.dns().map_err(io::Error::other)?;
        let ips = dns
            .lookup_ip(host)
            .await
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(ips.iter().map(|ip| SocketAddr::new(ip, port)).collect())
    }

    /// The SRV records of `name`.
    pub async fn lookup_srv(&self, name: &str) -> Result<SrvAnswer, String> {
        let dns = self.dns()?;
        let fqdn = format!("{}.", name.trim_end_matches('.'));
        let lookup = dns.srv_lookup(fqdn).await.map_err(|e| match e {
            e if e.is_no_records_found() => "no SRV records".to_owned(),
            e => e.to_string(),
        })?;
        let ttl = lookup
            .valid_until()
            .saturating_duration_since(std::time::Instant::now());
        let records = lookup
            .answers()
            .iter()
            .filter_map(|record| match &record.data {
                RData::SRV(srv) => Some(Located {
                    priority: srv.priority,
                    host: srv.target.to_string().trim_end_matches('.').to_owned(),
                    port: srv.port,
                    weight: srv.weight,
                }),
                _ => None,
            })
            .collect();
        match located_set(records) {
            targets if targets.is_empty() => Err("no usable SRV records".to_owned()),
            targets => Ok(SrvAnswer { targets, ttl }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn srv(priority: u16, host: &str, port: u16, weight: u16) -> Located {
        Located {
            priority,
            host: host.into(),
            port,
            weight,
        }
    }

    #[test]
    fn targets_sort_by_priority_and_drop_the_unusable() {
        let targets = located_set(vec![
            srv(20, "b", 1, 5),
            srv(10, "a", 1, 0),
            srv(10, ".", 1, 1),
            srv(5, "b", 1, 9),
        ]);
        assert_eq!(targets, [srv(5, "b", 1, 9), srv(10, "a", 1, 0)]);
    }
}
